"""Long responses: the loss scored chunk by chunk, gradient checkpointing and token-budget micro-batches give the
gradients of today's full-logits path (tiny Llama, CPU)."""

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from opd.buffer.sample import Sample
from opd.config import ConfigError, LossConfig
from opd.config.training import LearnerConfig
from opd.learner import chunked, micro_batches, objective
from opd.learner.batch import collate, first_scored

VOCAB, K = 40, 3


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        num_hidden_layers=2,
        vocab_size=VOCAB,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).double()


def sample(rng, prompt_len: int, response_len: int, correction: int | None = None, **fields) -> Sample:
    s = Sample(
        rng.integers(1, VOCAB, prompt_len),
        rng.integers(1, VOCAB, response_len),
        rng.uniform(-3, -0.1, response_len).astype(np.float32),
        0,
        **fields,
    )
    s.teacher_logprobs = rng.uniform(-3, -0.1, response_len).astype(np.float32)
    s.teacher_topk_ids = np.stack([rng.choice(VOCAB, K, replace=False) for _ in range(response_len)])
    s.teacher_topk_logprobs = np.log(rng.dirichlet(np.ones(K + 1), response_len)[:, :K]).astype(np.float32)
    s.correction_start = correction
    return s


def batch_of_samples() -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    samples = [
        sample(rng, 3, 9, correction=4, advantage_bonus=0.3),
        sample(rng, 2, 5, weight=0.5),
        sample(rng, 4, 11),
    ]
    return collate(samples, pad_id=0, top_k=K)


def grads(model: torch.nn.Module) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return out


LOSSES = [("reverse_kl", {}), ("jsd", {}), ("jsd", {"beta": 1.0, "tail": "sampled"}), ("topk_kl", {}), ("sft", {})]


@pytest.mark.parametrize(("name", "settings"), LOSSES, ids=lambda x: x if isinstance(x, str) else "-".join(x))
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_tokens", [1, 7, 10_000])
def test_chunked_loss_has_the_full_logits_loss_gradients_and_metrics(name, settings, temperature, chunk_tokens):
    batch = batch_of_samples()
    assert "sft_mask" in batch and "advantage_bonus" in batch  # the corrections' SFT term is in every loss
    cfg = LossConfig(type=name, top_k=K, **({"beta": 0.3} | settings))
    model = tiny_model()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    logits = model(**inputs).logits[:, :-1].float()
    loss, metrics = objective.OBJECTIVES.get(name)(logits, batch, cfg, temperature)
    loss, metrics = objective.with_corrections(loss, metrics, logits, batch, 2.0)
    loss.backward()
    expected = grads(model)

    out = model(**inputs, logits_to_keep=1, output_hidden_states=True)
    hidden = out.hidden_states[-1][:, :-1]
    got_loss, got_metrics = chunked.loss(
        hidden, model.get_output_embeddings(), batch, cfg, temperature, 2.0, chunk_tokens
    )
    got_loss.backward()
    # The objective runs in float32: the sampled tail's per-token estimates (+-3 nats on this random signal) cancel
    # to a loss of ~0.06, so its rounding is ~1e-7 absolute, not relative.
    assert float(got_loss.detach()) == pytest.approx(float(loss.detach()), rel=1e-6, abs=1e-6)
    assert got_metrics == pytest.approx(metrics, rel=1e-6, abs=1e-6)
    for a, b in zip(grads(model), expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("name", "settings"), LOSSES, ids=lambda x: x if isinstance(x, str) else "-".join(x))
@pytest.mark.parametrize("chunk_tokens", [0, 7])
def test_loss_from_the_first_scored_position_is_the_whole_sequences(name, settings, chunk_tokens):
    """What the shard does: the LM head and the loss start at the first position any row scores (the shortest
    prompt's last token), and loss, metrics and gradients are those of every position's logits."""
    rng = np.random.default_rng(3)
    batch = collate([sample(rng, 6, 5, correction=3), sample(rng, 9, 4), sample(rng, 7, 6)], pad_id=0, top_k=K)
    first, width = first_scored(batch), batch["input_ids"].shape[1]
    assert first == 5
    cfg = LossConfig(type=name, top_k=K, **({"beta": 0.3} | settings))
    model = tiny_model()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    logits = model(**inputs).logits[:, :-1].float()
    loss, metrics = objective.with_corrections(
        *objective.OBJECTIVES.get(name)(logits, batch, cfg, 1.0), logits, batch, 2.0
    )
    loss.backward()
    expected = grads(model)

    scored = chunked.chunk_batch(batch, first, width - 1)
    if chunk_tokens:
        hidden = model(**inputs, logits_to_keep=1, output_hidden_states=True).hidden_states[-1][:, first:-1]
        got_loss, got_metrics = chunked.loss(hidden, model.get_output_embeddings(), scored, cfg, 1.0, 2.0, chunk_tokens)
    else:
        part = model(**inputs, logits_to_keep=width - first).logits[:, :-1].float()
        assert part.shape[1] == width - 1 - first
        got = objective.OBJECTIVES.get(name)(part, scored, cfg, 1.0)
        got_loss, got_metrics = objective.with_corrections(*got, part, scored, 2.0)
    got_loss.backward()
    assert float(got_loss.detach()) == pytest.approx(float(loss.detach()), rel=1e-6, abs=1e-6)
    assert got_metrics == pytest.approx(metrics, rel=1e-6, abs=1e-6)
    for a, b in zip(grads(model), expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_first_scored_position_counts_corrections_and_ignores_weightless_rows():
    rng = np.random.default_rng(4)
    assert first_scored(collate([sample(rng, 4, 3), sample(rng, 6, 2)], pad_id=0, top_k=K)) == 3
    # a row of weight 0 (a sample the judge gave nothing) scores nothing
    assert first_scored(collate([sample(rng, 4, 3, weight=0.0), sample(rng, 6, 2)], pad_id=0, top_k=K)) == 5
    assert first_scored(collate([sample(rng, 4, 3, weight=0.0)], pad_id=0, top_k=K)) == 0
    # a correction's tokens are scored (cross-entropy) even where the student's own tokens weigh nothing
    fixed = sample(rng, 4, 3, correction=1, weight=0.0)
    assert first_scored(collate([fixed, sample(rng, 6, 2)], pad_id=0, top_k=K)) == 4


def test_chunks_never_hold_the_whole_micro_batchs_logits():
    """Every logits tensor the LM head makes, forward or recomputed in the backward, spans one chunk."""
    batch = batch_of_samples()
    model = tiny_model()
    shapes = []
    head = model.get_output_embeddings()
    head.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        logits_to_keep=1,
        output_hidden_states=True,
    )
    shapes.clear()
    loss, _ = chunked.loss(out.hidden_states[-1][:, :-1], head, batch, LossConfig(type="jsd", top_k=K), 1.0, 1.0, 6)
    loss.backward()
    positions = batch["mask"].shape[1]
    assert len(shapes) == 2 * -(-positions // 2)  # each chunk once forward, once recomputed
    assert all(s[:2] == (3, 2) or s[:2] == (3, positions % 2) for s in shapes)


def test_gradient_checkpointing_trains_the_same_gradients():
    batch = batch_of_samples()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    result = []
    for checkpointing in (False, True):
        model = tiny_model()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        logits = model(**inputs).logits[:, :-1].float()
        loss, _ = objective.OBJECTIVES.get("jsd")(logits, batch, LossConfig(type="jsd", top_k=K), 1.0)
        loss.backward()
        result.append(grads(model))
    for a, b in zip(*result, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_token_budget_packs_longest_first_within_the_budget():
    lengths = [5, 30, 7, 12, 6, 29, 50]
    groups = micro_batches.by_tokens(lengths, budget=60)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert groups == [[6], [1, 5], [3, 2, 4, 0]]  # 50 | 30+29 (2x30) | 12, 7, 6, 5 (4x12)
    for g in groups:
        assert len(g) * max(lengths[i] for i in g) <= 60
    assert micro_batches.by_tokens([100, 3], budget=10) == [[0], [1]]  # too long for the budget: alone
    assert micro_batches.by_tokens([], budget=10) == []


def test_split_by_count_or_by_tokens():
    rng = np.random.default_rng(1)
    samples = [sample(rng, 2, n) for n in (3, 9, 4, 8)]

    def indices(groups):
        return [[next(i for i, s in enumerate(samples) if s is x) for x in g] for g in groups]

    assert indices(micro_batches.split(samples, LearnerConfig(micro_batch_size=3))) == [[0, 1, 2], [3]]
    # padded lengths 5, 11, 6, 10: 11 + 10 fill 2 x 11 = 22, then 6 + 5
    assert indices(micro_batches.split(samples, LearnerConfig(max_tokens_per_micro_batch=22))) == [[1, 3], [2, 0]]
    assert micro_batches.agreed_count(2, torch.device("cpu")) == 2  # no process group: this rank's own


def test_packed_micro_batches_reweighted_by_tokens_give_the_one_batch_token_mean():
    """What the shard does: each micro-batch's token-mean loss x its share of the step's tokens (an empty padding
    micro-batch weighs 0) gives the gradient of one token mean over all samples."""
    rng = np.random.default_rng(2)
    samples = [sample(rng, 2, n) for n in (3, 9, 4, 8, 2)]
    cfg = LossConfig(type="sft", top_k=K)

    def loss_of(model, part):
        batch = collate(part, pad_id=0, top_k=K)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        return objective.OBJECTIVES.get("sft")(logits, batch, cfg, 1.0)[0]

    model = tiny_model()
    loss_of(model, samples).backward()
    expected = grads(model)
    total = sum(s.num_tokens for s in samples)
    groups = [*micro_batches.split(samples, LearnerConfig(max_tokens_per_micro_batch=24)), []]
    for group in groups:
        (loss_of(model, group or samples[:1]) * sum(s.num_tokens for s in group) / total).backward()
    for a, b in zip(grads(model), expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("key", ["max_tokens_per_micro_batch", "loss_chunk_tokens"])
def test_config_refuses_a_negative_budget(key):
    with pytest.raises(ConfigError, match=f"learner.{key}"):
        LearnerConfig(**{key: -1})


SHARD_SCRIPT = """
import sys, numpy as np, torch, deepspeed
from opd.buffer.sample import Sample
from opd.config import load_config
from opd.learner.shard import LearnerShard

model, port = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
samples = []
for p, r, fix in ((3, 9, 4), (2, 10, None), (2, 3, None), (1, 4, None)):  # 12, 12, 5, 5 tokens
    s = Sample(rng.integers(1, 30, p), rng.integers(1, 30, r), rng.uniform(-3, -0.1, r).astype(np.float32), 0)
    s.teacher_logprobs = rng.uniform(-3, -0.1, r).astype(np.float32)
    s.teacher_topk_ids = np.stack([rng.choice(30, 2, replace=False) for _ in range(r)])
    s.teacher_topk_logprobs = np.log(rng.dirichlet(np.ones(3), r)[:, :2]).astype(np.float32)
    s.correction_start = fix
    samples.append(s)
LONG = ["learner.loss_chunk_tokens=5", "learner.gradient_checkpointing=true"]
RUNS = [(2, "jsd", []), (2, "jsd", [*LONG, "learner.max_tokens_per_micro_batch=24"]), (3, "jsd", []),
        (3, "jsd", [*LONG, "learner.max_tokens_per_micro_batch=24"]), (2, "reverse_kl", []),
        (2, "reverse_kl", [*LONG, "learner.max_tokens_per_micro_batch=12"])]
for stage, loss, keys in RUNS:
    cfg = load_config("default", [f"learner.zero_stage={stage}", "learner.micro_batch_size=2", f"loss.type={loss}",
                                  "loss.top_k=2", "learner.lr=1e-4", *keys])
    shard = LearnerShard(0, 1, model, cfg.learner, cfg.loss, 1.0, 0.5, 3)
    shard.setup("127.0.0.1", port, len(samples), 10)
    params = list(shard.engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        before = [p.detach().clone() for p in params]
    m = shard.train_step(samples)
    with deepspeed.zero.GatheredParameters(params):
        moved = max(float((p - b).abs().max()) for p, b in zip(params, before))
    print("RESULT", m["loss"], m["correction_sft_nll"], m["grad_norm"], m.get("jsd", 0.0), moved,
          shard.engine.global_steps, flush=True)
"""


def test_shard_trains_the_same_step_with_the_long_response_keys_on(tiny_assets):
    """One gloo rank under ZeRO-2 and ZeRO-3: chunked loss, gradient checkpointing and token-budget micro-batches
    give the default path's loss, gradient norm and one optimizer step. jsd's budget packs the same pairs as
    micro_batch_size=2 (its importance-weighted mean is per micro-batch); reverse_kl's, a token sum, runs each
    sample alone: 4 micro-batches where DeepSpeed was set up for 2, told where the step falls."""
    import subprocess
    import sys

    from opd.learner.shard import free_port
    from tests.stack import ROOT

    cmd = [sys.executable, "-c", SHARD_SCRIPT, str(tiny_assets["student"]), str(free_port())]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [[float(x) for x in line.split()[1:]] for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert len(rows) == 6
    for off, on in (rows[0:2], rows[2:4], rows[4:6]):
        assert off[4] > 0 and on[4] > 0 and off[5] == on[5] == 1  # one optimizer step each
        assert [on[0], on[2]] == pytest.approx([off[0], off[2]], rel=1e-5)  # loss, gradient norm
    for off, on in (rows[0:2], rows[2:4]):  # the same micro-batches: per-micro-batch metrics agree too
        assert on == pytest.approx(off, rel=1e-5)
