"""The checks that start a vLLM engine in this process, on one GPU: start-up and generation with CUDA graphs, and the
colocated path (sleep at level 2, weights woken, CUDA-IPC weight sync from the in-process learner, KV cache woken).

Whether weights landed is read from log-probs: the engine starts from `Context.other` and the learner holds
`Context.checkpoint`, two models of one architecture with other weights; `hf_reference` scores probe sequences
under both with transformers, and an engine must agree with the one whose weights it should hold.
"""

from __future__ import annotations

import time

import numpy as np

from tests.gpu.checks_learner import Context

ENGINE_LEN = 256
"""The engines' max_model_len: the probes and the sampled responses are far shorter."""
ENGINE_MEMORY = 0.3
"""gpu_memory_utilization of the in-process engine: the learner shard shares its GPU."""
SYNC_GAP = 5e-2
"""Mean |log-prob gap| allowed between a bf16 engine and the bf16 transformers reference of the weights it holds
(tests/gpu/test_gpu_smoke.py's bound); a model with other weights is off by nats."""


def probes(ctx: Context) -> tuple[list[list[int]], list[list[int]]]:
    """Fixed prompts and responses every engine check scores."""
    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, ctx.size.vocab, 16).tolist() for _ in range(4)]
    return prompts, [rng.integers(3, ctx.size.vocab, 32).tolist() for _ in prompts]


def gap(scored: list, reference: np.ndarray) -> float:
    """Mean |log-prob gap| of an engine's `score` output against a reference's."""
    return float(np.abs(np.concatenate([s.logprobs for s in scored]) - reference).mean())


def check_hf_reference(ctx: Context) -> tuple[bool, str]:
    """The probes' log-probs under both checkpoints in bf16 with transformers: the references the engine checks
    compare with. Runs before any learner shard exists in this process (which would make transformers partition
    every model it loads, `HfDeepSpeedConfig`)."""
    import torch
    from transformers import AutoModelForCausalLM

    from opd.teachers import hf
    from tests.gpu.checks_learner import build_checkpoint

    other = build_checkpoint(ctx.size, ctx.checkpoint.parent / "other", seed=1)
    prompts, responses = probes(ctx)
    references = {}
    for path in (ctx.checkpoint, other):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to("cuda").eval()
        references[path] = np.concatenate([s.logprobs for s in hf.score(model, prompts, responses, 1, 1.0)])
        del model
    torch.cuda.empty_cache()  # the engine checks size vLLM's share from the free memory
    ctx.other, ctx.references = other, references
    apart = float(np.abs(references[ctx.checkpoint] - references[other]).mean())
    return apart > 4 * SYNC_GAP, f"{len(references[other])} probe tokens; the two checkpoints differ by {apart:.2f}"


def engine_config(**settings):
    from opd.config import EngineConfig

    return EngineConfig(dtype="bfloat16", max_model_len=ENGINE_LEN, **settings)


def sampled(worker, ctx: Context) -> tuple[bool, str]:
    """Generate two samples per probe prompt: responses of finite, non-positive log-probs."""
    prompts, _ = probes(ctx)
    samples, busy = worker.generate(prompts, [{}] * len(prompts), 2, 32, 1.0, 0)
    lps = np.concatenate([s.logprobs for s in samples])
    ok = len(samples) == 2 * len(prompts) and all(len(s.response_ids) for s in samples)
    ok &= bool(np.isfinite(lps).all() and (lps <= 0).all())
    return ok, f"{len(samples)} samples, {sum(len(s.response_ids) for s in samples)} tokens in {busy:.2f} s"


def check_vllm_engine(ctx: Context) -> tuple[bool, str]:
    """A colocated rollout worker's engine (sleep mode on, CUDA graphs as the GPU default) starts, samples, and
    scores the probes as transformers does."""
    from opd.rollout.engine import device_settings
    from opd.rollout.worker import RolloutWorker

    engine = engine_config(gpu_memory_utilization=ENGINE_MEMORY)
    t0 = time.perf_counter()
    worker = RolloutWorker(str(ctx.other), engine, "ipc", 0, colocate=True)
    start_s = time.perf_counter() - t0
    ctx.engine = worker
    ok, figures = sampled(worker, ctx)
    off = gap(worker.score(*probes(ctx), 1), ctx.references[ctx.other])
    eager = device_settings(engine, 1.0)["enforce_eager"]
    return ok and off < SYNC_GAP, (
        f"started in {start_s:.0f} s (enforce_eager={eager}); {figures}; probe |gap| to transformers {off:.3f} "
        f"(tol {SYNC_GAP:g})"
    )


def check_ipc_sleep_sync(ctx: Context) -> tuple[bool, str]:
    """Sleep (level 2) frees the engine's memory, the learner's weights arrive over CUDA IPC into the woken weights,
    and the engine then scores as the learner's checkpoint does and samples again (its KV cache woke)."""
    import torch
    from vllm.distributed.weight_transfer import WeightTransferTrainerFactory

    from opd.rollout.weight_sync import trainer_init_info

    worker, source = ctx.engine, ctx.shard.weight_source()
    before = gap(worker.score(*probes(ctx), 1), ctx.references[ctx.checkpoint])
    free = torch.cuda.mem_get_info()[0]
    worker.sleep()
    freed = torch.cuda.mem_get_info()[0] - free
    worker.wake_up()
    weights = sum(int(np.prod(m.shape)) * m.dtype.itemsize for m in source.metadata())
    t0 = time.perf_counter()
    info = trainer_init_info("ipc", 0, "", 0, 1, 0)  # no parameter here outgrows the default 1 GiB buffer
    # The worker is the client: the calls RolloutGroupClient fans out over Ray go to its own LLM here.
    WeightTransferTrainerFactory.trainer_init(info, client=worker, source=source).send_weights()
    sync_s = time.perf_counter() - t0
    after = gap(worker.score(*probes(ctx), 1), ctx.references[ctx.checkpoint])
    ok, figures = sampled(worker, ctx)
    ok &= freed >= weights and after < SYNC_GAP < before
    return ok, (
        f"sleep freed {freed / 2**30:.2f} GiB (weights {weights / 2**30:.2f} GiB); sync {sync_s:.2f} s; probe |gap| "
        f"to the learner's checkpoint {before:.2f} -> {after:.3f} (tol {SYNC_GAP:g}); then {figures}"
    )


def close_engine(ctx: Context) -> None:
    """Stop the in-process engine (its engine-core process holds its share of the GPU) before the Ray checks."""
    if ctx.engine is not None:
        ctx.engine.llm.llm_engine.engine_core.shutdown()
        ctx.engine = None
