"""TRL's GKDTrainer (fully on-policy) and opd on the same distillation job, one after the other, side by side.

TRL's newer DistillationTrainer (always on-policy) runs the same job too, generating with transformers: its vLLM
mode (`use_vllm=True`) needs vLLM <= 0.31 and fails to load weights into vLLM 0.32's CPU engine.

    python bench/vs_trl.py                                   # the built-in addition demo: 6 rounds of 16 x 4 samples
    python bench/vs_trl.py cache_dir=/work/main/outputs/cache rounds=10
    python bench/vs_trl.py preset=smollm2                    # SmolLM2-135M-Instruct -> its 4-layer pruned copy,
                                                             # chat prompts, 3 rounds of 4 x 4 samples of <= 256 tokens
    python bench/vs_trl.py preset=smollm2 rollout.max_new_tokens=16 rounds=2   # a quick check that it runs

The tiny preset (the default) is the addition demo: rounds of a few hundred milliseconds, where fixed costs
(Ray hops, vLLM's per-step scheduling, actor start-up) decide. The smollm2 preset (bench/presets.py) is a
realistic scale: a 49,152-token vocabulary and long responses, where generation, teacher scoring and the learner's
step are real compute; after the three runs it also prints each opd stage against the bare engine doing the same
work (bench/stages.py). Chat prompts reach TRL as conversations, which it renders with the same tokenizer template
opd does (checked to give opd's token ids).

Both distil the same student from the same teacher on the same prompts, in the same order, with the same
objective (reverse KL on the student's own samples: TRL `lmbda=1, beta=1`, opd `loss.type=jsd, beta=1`; TRL
takes it over the full vocabulary, opd over the teacher's top `loss.top_k`), learning rate, gradient clip,
optimizer steps, batch per step and token budget (`rollout.max_new_tokens`). TRL's batch per step is one opd
round split into `learner.mini_batches` steps, and it runs `rounds x mini_batches` steps.

Prints one line per figure: on-policy samples/s of each and their ratio (against GKDTrainer), and the
reverse KL(student || teacher) per response token reached after the same number of samples, measured on
both final students by one evaluator here (target: opd <= TRL). Throughput skips the first step of TRL and
the first round of opd (warm-up); model loading and opd's start-up (Ray, vLLM engines) are outside it and
shown on a line of their own. opd's teacher scores with the transformers backend unless overridden
(`teachers.0.backend=vllm`). Any `key=value` argument overrides the opd config, and TRL follows it.
"""

from __future__ import annotations

import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.cpu_share import ActorSampler  # noqa: E402
from bench.presets import VS_TRL, check_same_rendering, split, trl_prompt  # noqa: E402
from bench.stages import compare  # noqa: E402

EVAL_SAMPLES = 2
EVAL_ROWS = 8
"""Rows the evaluator scores at once: 8 x 300 positions x 49,152 float32 logits are 0.5 GB."""
EVAL_SEED = 1234
OUT = "outputs/bench/vs_trl"
OPD_STAGES = ("round", "generate", "score", "learn", "sync")
"""`pipeline/<stage>_s`: an opd round and the seconds each of its stages was busy."""
BACKEND = "teachers.0.backend=transformers"
"""The teacher's forward pass, as TRL runs it; vLLM's prompt log-probs are slower at this size (bench/README.md)."""


def prompt_order(num_prompts: int, seed: int, count: int) -> list[int]:
    """Indices of the first `count` training prompts opd draws: `Controller.next_prompts` (seeded shuffle,
    popped from the end, reshuffled each epoch)."""
    rng, order, out = random.Random(seed), [], []
    while len(out) < count:
        if not order:
            order = list(range(num_prompts))
            rng.shuffle(order)
        out.append(order.pop())
    return out


def reference_ids(prompt, tokenizer, max_new_tokens: int) -> list[int]:
    """A reference completion for the collator's `labels`: an addition prompt's scratchpad + eos, else
    `max_new_tokens` stand-in tokens (the pruned SmolLM2 student writes to the limit).

    On-policy, TRL replaces it with the student's own sample before the loss, but the Trainer divides the loss by
    the number of these label tokens, so there should be about as many as the student writes.
    """
    from opd.tasks import addition

    eos = tokenizer.eos_token_id
    match = re.fullmatch(r"(\d+)\+(\d+)=", prompt.text)
    if match is None:
        return [eos] * max_new_tokens
    return [*tokenizer.encode(addition.solve(int(match[1]), int(match[2])), add_special_tokens=False), eos]


class Collator:
    """The fields GKDTrainer reads, from rows of `prompt_ids` (as opd renders them) and `completion_ids`:
    left-padded `prompts` + `prompt_attention_mask`, and `input_ids`/`attention_mask`/`labels` (-100 on the
    prompt and padding) of prompt + completion."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer

    def __call__(self, rows: list[dict]):
        import torch

        pad = self.tok.pad_token_id
        prompts = [r["prompt_ids"] for r in rows]
        completions = [r["completion_ids"] for r in rows]
        width = max(map(len, prompts))
        full = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
        out = {
            "prompts": [[pad] * (width - len(p)) + p for p in prompts],
            "prompt_attention_mask": [[0] * (width - len(p)) + [1] * len(p) for p in prompts],
            "input_ids": [],
            "attention_mask": [],
            "labels": [],
        }
        for p, c in zip(prompts, completions, strict=True):
            rest = full - len(p) - len(c)
            out["input_ids"].append(p + c + [pad] * rest)
            out["attention_mask"].append([1] * (len(p) + len(c)) + [0] * rest)
            out["labels"].append([-100] * len(p) + c + [-100] * rest)
        return {k: torch.tensor(v) for k, v in out.items()}


def run_trl(cfg, student: str, teacher: str, train: list, chat, trainer_name: str = "gkd") -> dict:
    """TRL's GKDTrainer (`gkd`) or DistillationTrainer (`distillation`, Hugging Face generation) on opd's prompts in
    opd's order, rendered as opd renders them (`chat`: its ChatFormat); samples/s from its step clock, skipping
    step 1."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    t_start = time.perf_counter()
    per_round = cfg.rollout.prompts_per_round * cfg.rollout.samples_per_prompt
    batch, steps = per_round // cfg.learner.mini_batches, cfg.rounds * cfg.learner.mini_batches
    picks = [train[i] for i in prompt_order(len(train), cfg.seed, cfg.rounds * cfg.rollout.prompts_per_round)]
    tokenizer = AutoTokenizer.from_pretrained(student)
    check_same_rendering(chat, picks[0])

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    teacher_model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    if trainer_name == "gkd":
        config, trainer_cls = GKDConfig, GKDTrainer
        specific = {"lmbda": 1.0, "max_new_tokens": cfg.rollout.max_new_tokens}
        extra = {"data_collator": Collator(tokenizer)}
        rows = [
            {"prompt_ids": chat.ids(p), "completion_ids": reference_ids(p, tokenizer, cfg.rollout.max_new_tokens)}
            for p in picks
        ]
    else:  # always on-policy; top_k=0 samples from the whole distribution, as opd and GKDTrainer do
        config, trainer_cls = DistillationConfig, DistillationTrainer
        specific = {"max_completion_length": cfg.rollout.max_new_tokens, "top_k": 0, "shuffle_dataset": False}
        extra = {}
        rows = [{"prompt": trl_prompt(chat, p)} for p in picks]
    rows = [r for r in rows for _ in range(cfg.rollout.samples_per_prompt)]
    args = config(
        output_dir=f"{OUT}/trl-{trainer_name}",
        beta=1.0,
        temperature=cfg.rollout.temperature,
        **specific,
        learning_rate=cfg.learner.lr,
        lr_scheduler_type="constant",  # opd's AdamW has no schedule
        warmup_steps=0,
        weight_decay=cfg.learner.weight_decay,
        max_grad_norm=cfg.learner.grad_clip,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        max_steps=steps,
        train_sampling_strategy="sequential",  # opd's prompt order, one round's prompts per batch
        gradient_checkpointing=False,  # SFTConfig turns it on, which also turns off the KV cache in generation
        bf16=False,
        fp16=False,
        use_cpu=True,
        seed=cfg.seed,
        report_to=[],
        save_strategy="no",
        logging_steps=10**6,
        disable_tqdm=True,
        dataloader_pin_memory=False,
    )
    clock = StepClock()
    trainer = trainer_cls(
        model=model,
        teacher_model=teacher_model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[clock],
        **extra,
    )
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    ends = clock.ends
    if len(ends) != steps:
        raise RuntimeError(f"TRL ran {len(ends)} steps, expected {steps}")
    return {
        "samples_per_s": (steps - 1) * batch / (ends[-1] - ends[0]) if steps > 1 else float("nan"),
        "all_samples_per_s": steps * batch / train_s,
        "samples": steps * batch,
        "wall_s": time.perf_counter() - t_start,
        "model": trainer.model.eval(),
    }


def run_opd(cfg) -> dict:
    """A whole opd run; samples/s over rounds 2.. (round 1 carries the engines' warm-up)."""
    from launch import run

    t_start = time.perf_counter()
    summary = run(cfg)
    wall_s = time.perf_counter() - t_start
    rounds = summary["rounds"][1:]  # entry 0 is the eval before training
    steady = [r for r in rounds if r["round"] >= 2]

    def rate(rs: list[dict]) -> float:
        samples = sum(r["pipeline/samples_per_s"] * r["pipeline/round_s"] for r in rs)
        return samples / sum(r["pipeline/round_s"] for r in rs) if rs else float("nan")

    samples = sum(r["pipeline/samples_per_s"] * r["pipeline/round_s"] for r in rounds)
    return {
        "samples_per_s": rate(steady),
        "all_samples_per_s": rate(rounds),
        "samples": round(samples),
        "wall_s": wall_s,
        "student_path": summary["final"]["student_path"],
        "own_reverse_kl": summary["final"]["reverse_kl_after"],
        "stages": {k: sum(r[f"pipeline/{k}_s"] for r in steady) / len(steady) for k in OPD_STAGES},
        "steady": steady,
    }


def reverse_kl(student, teacher, prompts: list[list[int]], pad: int, stops: list[int], max_new_tokens: int):
    """Mean (student log-prob - teacher log-prob) per response token of the student's own samples (temperature 1,
    EVAL_SAMPLES per prompt, seeded, cut after the first of `stops`), and its standard error over responses. Plain
    transformers, no Ray; scored EVAL_ROWS rows at a time to bound the float32 logits."""
    import torch

    ids = [p for p in prompts for _ in range(EVAL_SAMPLES)]
    width = max(map(len, ids))
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
    prompt_mask = (torch.arange(width) >= width - torch.tensor([len(x) for x in ids])[:, None]).long()
    torch.manual_seed(EVAL_SEED)
    with torch.no_grad():
        seq = student.generate(
            input_ids=input_ids,
            attention_mask=prompt_mask,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            eos_token_id=stops,
        )
        response = seq[:, width:]
        is_eos = torch.isin(response, torch.tensor(stops)).long()
        mask = ((is_eos.cumsum(1) - is_eos) == 0).float()  # up to and including the first stop
        attention = torch.cat([prompt_mask, mask.long()], dim=1)
        positions = (attention.cumsum(1) - 1).clamp(min=0)

        def logprobs(model):
            out = []
            for rows in torch.arange(len(seq)).split(EVAL_ROWS):
                logits = model(input_ids=seq[rows], attention_mask=attention[rows], position_ids=positions[rows]).logits
                lps = torch.log_softmax(logits[:, width - 1 : -1].float(), dim=-1)
                out.append(lps.gather(-1, response[rows, :, None]).squeeze(-1))
            return torch.cat(out)

        gap = (logprobs(student) - logprobs(teacher)) * mask
    per_response, tokens = gap.sum(1), mask.sum(1)
    kl = float(per_response.sum() / tokens.sum())
    se = float(((per_response - kl * tokens) ** 2).sum().sqrt() / tokens.sum())
    return kl, se


def main(argv: list[str]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launch import resolve
    from opd.config import load_config
    from opd.data import load_prompts
    from opd.data.encoding import ChatFormat
    from opd.rollout.engine import stop_token_ids

    preset, overrides = split(argv, VS_TRL)
    cfg = load_config(
        preset.config,
        [*preset.overrides, "wandb.mode=disabled", f"output_dir={OUT}/opd", BACKEND, *overrides],
    )
    if cfg.mode != "on_policy" or cfg.loss.type != "jsd" or cfg.loss.beta != 1.0 or len(cfg.teachers) != 1:
        sys.exit("this bench compares one teacher, mode=on_policy, loss.type=jsd, loss.beta=1 (TRL's lmbda=1, beta=1)")
    student = resolve(cfg.student.model, cfg.cache_dir)
    teacher = resolve(cfg.teachers[0].model, cfg.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(student)
    chat = ChatFormat(tokenizer, cfg.data)
    train = load_prompts(resolve(cfg.data.train, cfg.cache_dir))[0]
    evals = [chat.ids(p) for p in load_prompts(resolve(cfg.data.eval, cfg.cache_dir))[0][: preset.eval_prompts]]

    trl = run_trl(cfg, student, teacher, train, chat)
    distillation = run_trl(cfg, student, teacher, train, chat, "distillation")
    with ActorSampler() as opd_cores:
        opd = run_opd(cfg)
    if trl["samples"] != opd["samples"]:
        raise RuntimeError(f"TRL trained on {trl['samples']} samples, opd on {opd['samples']}")

    def load(path: str):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    teacher_model = load(teacher)
    stops = stop_token_ids(student)
    args = (teacher_model, evals, tokenizer.pad_token_id, stops, cfg.rollout.max_new_tokens)
    kl_start = reverse_kl(load(student), *args)
    kl_trl = reverse_kl(trl["model"], *args)
    kl_distillation = reverse_kl(distillation["model"], *args)
    kl_opd = reverse_kl(load(opd["student_path"]), *args)
    del teacher_model, trl["model"], distillation["model"]

    ratio = opd["samples_per_s"] / trl["samples_per_s"]
    n = opd["samples"]
    print(f"TRL GKDTrainer  samples/s  {trl['samples_per_s']:.2f}")
    print(f"TRL DistillationTrainer (transformers generation)  samples/s  {distillation['samples_per_s']:.2f}")
    print(f"opd             samples/s  {opd['samples_per_s']:.2f}")
    print(f"opd/TRL throughput  {ratio:.2f}x  (against GKDTrainer; target >= 1.5x)")
    print(
        f"reverse KL after {n} samples  TRL {kl_trl[0]:.4f} ± {kl_trl[1]:.4f}, opd {kl_opd[0]:.4f} ± {kl_opd[1]:.4f}"
        f"  (target: opd <= TRL; {len(evals)} held-out prompts x {EVAL_SAMPLES} samples)"
    )
    print(f"reverse KL of the starting student  {kl_start[0]:.4f} ± {kl_start[1]:.4f}")
    print(f"reverse KL after {n} samples, DistillationTrainer  {kl_distillation[0]:.4f} ± {kl_distillation[1]:.4f}")
    print(
        f"samples/s with the first step/round  TRL {trl['all_samples_per_s']:.2f}, opd {opd['all_samples_per_s']:.2f}"
    )
    wall = f"TRL {trl['wall_s']:.0f}s, DistillationTrainer {distillation['wall_s']:.0f}s, opd {opd['wall_s']:.0f}s"
    print(f"wall time of each whole run (loading, start-up, opd's own evals)  {wall}")
    stages = ", ".join(f"{k} {v:.3f}" for k, v in opd["stages"].items())
    print(f"opd mean seconds per round (rounds 2-{cfg.rounds})  {stages}")
    print(f"opd's own end-of-run eval (vLLM, {cfg.data.eval_size} prompts)  reverse KL {opd['own_reverse_kl']:.4f}")
    if preset.config != "default":
        per_round = cfg.rollout.prompts_per_round
        picks = prompt_order(len(train), cfg.seed, cfg.rounds * per_round)
        rounds = [[chat.ids(train[i]) for i in picks[k : k + per_round]] for k in range(0, len(picks), per_round)]
        compare(cfg, student, teacher, opd["steady"], rounds, opd_cores)


if __name__ == "__main__":
    main(sys.argv[1:])
