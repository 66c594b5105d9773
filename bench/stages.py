"""Each opd stage against the bare engine doing the same work in one process, after an opd run (bench/vs_trl.py).

- rollout: vLLM's `LLM.generate` on the prompts of opd's timed rounds, with opd's engine settings and sampling
  (n samples a prompt, temperature, stop ids, token ids only), one call a round after one warm-up call;
- teacher scoring: one plain transformers forward over the same right-padded prompt+response batch, its
  log-softmax and top-k (what the transformers teacher backend computes), no Ray, no actor;
- learner: a plain torch AdamW step on the same samples and teacher top-k, with opd's objective code
  (`opd.learner.objective`) in opd's micro-batches, no DeepSpeed, no Ray;
- weight sync: a memory copy of the same bytes (`Tensor.copy_`), the bound of any transport on one machine.

Tokens are response tokens; opd's figures are its per-round `tokens_per_s`, `scored_tokens_per_s`, response
tokens over `pipeline/learn_s` and `weight_sync_gb_per_s`, averaged over the same timed rounds.

Beside each rate, the cores the stage's own process used on average and the cores the rest of the machine used
meanwhile (bench/cpu_share.py): for opd, the actor running the stage against everything else (Ray's own
processes, the idle actors); for the bare engine, the bench's process (and its children) against everything else.
Where opd/bare matches the ratio of the cores, the gap is the share of the machine opd's stage did not get.
"""

from __future__ import annotations

import time

import numpy as np

from bench.cpu_share import STAGE_TITLES, ActorSampler, Shares


def opd_rates(rounds: list[dict], samples_per_round: int) -> dict[str, float]:
    """opd's own stage rates over its timed rounds (summary.json's per-round entries)."""

    def total(key: str) -> float:
        return sum(r[key] for r in rounds)

    tokens = sum(r["train/response_tokens"] * samples_per_round for r in rounds)
    return {
        "rollout": tokens / total("pipeline/generate_s"),
        "teacher scoring": tokens / total("pipeline/score_s"),
        "learner": tokens / total("pipeline/learn_s"),
        "weight sync": total("weight_sync_gb") / total("weight_sync_s"),
        "sync_gb": total("weight_sync_gb") / len(rounds),
    }


def bare_rollout(cfg, student: str, prompts: list[list[list[int]]], shares: Shares):
    """vLLM alone: response tokens/s over one `generate` call per round, and the last round's samples."""
    from vllm import SamplingParams

    from opd.rollout.engine import make_llm, stop_token_ids

    llm = make_llm(student, cfg.rollout.engine, cfg.seed)
    params = SamplingParams(
        n=cfg.rollout.samples_per_prompt,
        max_tokens=cfg.rollout.max_new_tokens,
        temperature=cfg.rollout.temperature,
        top_k=0,
        top_p=1.0,
        stop_token_ids=stop_token_ids(student),
        logprobs=0,
        seed=cfg.seed,
        detokenize=False,
        flat_logprobs=True,
    )

    def generate(batch: list[list[int]]):
        return llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)

    generate(prompts[0])  # warm-up, as opd's first round
    tokens, seconds = 0, 0.0
    for batch in prompts[1:]:
        t0 = time.perf_counter()
        with shares.window("rollout"):
            outputs = generate(batch)
        seconds += time.perf_counter() - t0
        tokens += sum(len(c.token_ids) for o in outputs for c in o.outputs)
    pairs = [(list(o.prompt_token_ids), list(c.token_ids)) for o in outputs for c in o.outputs]
    return tokens / seconds, pairs


def bare_teacher(teacher: str, pairs: list, top_k: int, shares: Shares):
    """One transformers forward over the batch: response tokens/s, and each response's teacher log-probs/top-k."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    seqs = [p + r for p, r in pairs]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    mask = (torch.arange(width)[None] < torch.tensor([len(s) for s in seqs])[:, None]).long()
    t0 = time.perf_counter()
    with torch.no_grad(), shares.window("teacher scoring"):
        logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), dim=-1)
        own = logprobs.gather(-1, ids[:, 1:, None])[..., 0]
        top = logprobs.topk(top_k, dim=-1)
    seconds = time.perf_counter() - t0
    spans = [slice(len(p) - 1, len(p) + len(r) - 1) for p, r in pairs]
    scored = [(own[i, s].numpy(), top.indices[i, s].numpy(), top.values[i, s].numpy()) for i, s in enumerate(spans)]
    return sum(len(r) for _, r in pairs) / seconds, scored


def bare_learner(cfg, student: str, pairs: list, scored: list, shares: Shares) -> float:
    """Plain torch AdamW steps on the batch in opd's micro-batches: response tokens/s of the second step."""
    import torch
    from transformers import AutoModelForCausalLM

    from opd.buffer.sample import Sample
    from opd.learner import objective
    from opd.learner.batch import collate

    samples = []
    for (p, r), (own, top_ids, top_values) in zip(pairs, scored, strict=True):
        s = Sample(np.array(p), np.array(r), np.zeros(len(r), np.float32), 0)
        s.teacher_logprobs, s.teacher_topk_ids, s.teacher_topk_logprobs = own, top_ids, top_values
        samples.append(s)
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).train()
    optim = torch.optim.AdamW(model.parameters(), lr=cfg.learner.lr, weight_decay=cfg.learner.weight_decay)
    size, tokens = cfg.learner.micro_batch_size, sum(len(r) for _, r in pairs)
    loss_fn = objective.OBJECTIVES.get(cfg.loss.type)

    def step() -> float:
        t0 = time.perf_counter()
        for start in range(0, len(samples), size):
            part = samples[start : start + size]
            batch = collate(part, pad_id=0, top_k=cfg.loss.top_k)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
            loss, metrics = loss_fn(logits, batch, cfg.loss, 1.0)
            loss, _ = objective.with_corrections(loss, metrics, logits, batch, 1.0)
            (loss * len(part) / len(samples)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.learner.grad_clip)
        optim.step()
        optim.zero_grad()
        return time.perf_counter() - t0

    step()  # the allocator's and AdamW's state warm-up
    with shares.window("learner"):
        return tokens / step()


def bare_copy(gb: float) -> float:
    """GB/s of copying `gb` gigabytes from one buffer to another, best of 3."""
    import torch

    src = torch.randint(0, 255, (int(gb * 1e9),), dtype=torch.uint8)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return gb / best


def compare(
    cfg, student: str, teacher: str, rounds: list[dict], prompts: list[list[list[int]]], opd_cores: ActorSampler
) -> None:
    """Print opd's rate per stage, the bare engine's on the same work, and opd's share of it.

    `rounds` are opd's timed rounds; `prompts` the token ids of its rounds' prompts, the untimed first round's first;
    `opd_cores` what an `ActorSampler` measured during opd's run.
    """
    ours = opd_rates(rounds, cfg.rollout.prompts_per_round * cfg.rollout.samples_per_prompt)
    bare_cores = Shares()
    rollout, pairs = bare_rollout(cfg, student, prompts, bare_cores)
    scoring, scored = bare_teacher(teacher, pairs, cfg.loss.top_k, bare_cores)
    bare = {
        "rollout": rollout,
        "teacher scoring": scoring,
        "learner": bare_learner(cfg, student, pairs, scored, bare_cores),
        "weight sync": bare_copy(ours["sync_gb"]),
    }
    what = {
        "rollout": "vLLM LLM.generate alone",
        "teacher scoring": "one transformers forward + top-k",
        "learner": "plain torch AdamW step, opd objective",
        "weight sync": f"memory copy of {ours['sync_gb']:.3f} GB",
    }
    print(f"{'stage':<17}{'opd':>10}{'bare':>10}{'opd/bare':>10}  unit      bare engine")
    for stage, rate in bare.items():
        unit = "GB/s" if stage == "weight sync" else "tokens/s"
        print(f"{stage:<17}{ours[stage]:>10.1f}{rate:>10.1f}{ours[stage] / rate:>10.2f}  {unit:<9} {what[stage]}")
    print(f"{'stage':<17}{'opd cores':>10}{'bare cores':>11}{'ratio':>7}{'rest, opd':>11}{'rest, bare':>11}")
    for stage in STAGE_TITLES:
        (own, rest), (own_bare, rest_bare) = opd_cores.cores(stage), bare_cores.cores(stage)
        print(f"{stage:<17}{own:>10.2f}{own_bare:>11.2f}{own / own_bare:>7.2f}{rest:>11.2f}{rest_bare:>11.2f}")
    for stage in STAGE_TITLES:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in opd_cores.rest_cores(stage).items())
        print(f"rest of the machine during opd's {stage} (cores)  {parts}")
