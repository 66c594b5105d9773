"""The checks that start Ray actors as a run does (its config, placement groups, `plan.slot`, the rollout and learner
groups): a 0-GPU actor beside a GPU one; with two GPUs or more, NCCL weight sync from a learner actor to an engine
actor, a learner of two ranks, and an engine tensor-parallel over two GPUs."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.gpu.checks_learner import Context, learner_overrides, samples
from tests.gpu.checks_vllm import ENGINE_LEN, SYNC_GAP, gap, probes, sampled

ROOT = Path(__file__).resolve().parents[2]
CALL_TIMEOUT_S = 300.0
"""The longest one actor call may take here (an engine's start-up included)."""


def ensure_ray() -> None:
    """A local Ray of this machine's CPUs and GPUs, started once; its actors import opd and tests from the repo."""
    import ray
    import torch

    if not ray.is_initialized():
        env = {"env_vars": {"PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}}
        cpus, gpus = os.cpu_count(), torch.cuda.device_count()
        ray.init(address="local", num_cpus=cpus, num_gpus=gpus, include_dashboard=False, runtime_env=env)


class Remote:
    """An actor's methods called as plain ones (each `ray.get` bounded), so one helper checks in-process and
    remote engines alike."""

    def __init__(self, handle) -> None:
        self.handle = handle

    def __getattr__(self, name: str):
        import ray

        return lambda *args: ray.get(getattr(self.handle, name).remote(*args), timeout=CALL_TIMEOUT_S)


def run_config(ctx: Context, rollout_gpus: float, shards: int, shard_gpus: float, *extra: str):
    """A run's config for one bf16 rollout worker and the learner checks' ZeRO-3 learner."""
    from opd.config import load_config

    learner = [
        f"{section}.{key}={value}"
        for section, values in learner_overrides(ctx.size, shards, shard_gpus).items()
        for key, value in values.items()
    ]
    rollout = [
        f"student.model={ctx.checkpoint}",
        "rollout.num_workers=1",
        f"rollout.gpus_per_worker={rollout_gpus}",
        "rollout.engine.dtype=bfloat16",
        f"rollout.engine.max_model_len={ENGINE_LEN}",
        "rollout.engine.enforce_eager=true",  # start-up time: vllm_engine checks CUDA graphs
        "rollout.engine.gpu_memory_utilization=0.5",
    ]
    return load_config("default", [*rollout, *learner, *extra])


@contextmanager
def placed(cfg) -> Iterator[dict]:
    """The run's placement groups (`plan.reserve`), removed afterwards, which kills every actor placed in them."""
    ensure_ray()
    from ray.util.placement_group import remove_placement_group

    from opd import plan

    groups = plan.reserve(cfg)
    try:
        yield groups
    finally:
        for group in {id(g): g for g in groups.values()}.values():
            remove_placement_group(group)


def learner_group(ctx: Context, cfg, group):
    from opd.learner.group import LearnerGroup

    return LearnerGroup(str(ctx.checkpoint), cfg.learner, cfg.loss, 1.0, ctx.size.samples, 2, 0.0, 3, group)


class Probe:
    """What an actor sees of the node's GPUs."""

    def devices(self) -> tuple[str | None, int]:
        import torch

        return os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.device_count()


def check_zero_gpu_actor(ctx: Context) -> tuple[bool, str]:
    """An actor placed in a bundle without GPU, beside one with a GPU, sees no CUDA device (`plan.slot`)."""
    ensure_ray()
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from opd import plan

    group = placement_group([{"CPU": 1, "GPU": 1}, {"CPU": 1}])
    ray.get(group.ready(), timeout=CALL_TIMEOUT_S)
    try:
        probe = ray.remote(Probe)
        seen = [
            Remote(probe.options(num_cpus=1, num_gpus=gpus, **plan.slot(group, i)).remote()).devices()
            for i, gpus in enumerate((1, 0))
        ]
    finally:
        remove_placement_group(group)
    (gpu_env, gpu_count), (cpu_env, cpu_count) = seen
    return gpu_count == 1 and cpu_count == 0, (
        f"GPU actor: CUDA_VISIBLE_DEVICES={gpu_env!r}, {gpu_count} device; 0-GPU actor beside it: "
        f"CUDA_VISIBLE_DEVICES={cpu_env!r}, {cpu_count} devices"
    )


def check_nccl_weight_sync(ctx: Context) -> tuple[bool, str]:
    """A learner actor and an engine actor on a GPU each: the run's NCCL weight sync moves the engine from its own
    checkpoint's log-probs to the learner's."""
    from opd.config.schema import weight_backend
    from opd.rollout.group import RolloutGroup

    cfg = run_config(ctx, 1, 1, 1)
    backend = weight_backend(cfg)
    with placed(cfg) as groups:
        rollout = RolloutGroup(cfg, str(ctx.other), backend, groups["rollout"])
        learner = learner_group(ctx, cfg, groups["learner"])
        rollout.ready(timeout=CALL_TIMEOUT_S)
        rollout.connect(learner)
        worker = Remote(rollout.workers[0])
        before = gap(worker.score(*probes(ctx), 1), ctx.references[ctx.checkpoint])
        sync = rollout.sync_weights()
        after = gap(worker.score(*probes(ctx), 1), ctx.references[ctx.checkpoint])
    ok = backend == "nccl" and after < SYNC_GAP < before
    return ok, (
        f"weight_sync={backend}: {sync['weight_sync_gb']:.2f} GB in {sync['weight_sync_s']:.2f} s; probe |gap| to the "
        f"learner's checkpoint {before:.2f} -> {after:.3f} (tol {SYNC_GAP:g})"
    )


def check_two_rank_learner(ctx: Context) -> tuple[bool, str]:
    """Two learner actors on a GPU each take a ZeRO-3 bf16 step together over NCCL."""
    cfg = run_config(ctx, 0, 2, 1)
    with placed(cfg) as groups:
        learner = learner_group(ctx, cfg, groups["learner"])
        stats = learner.train([samples(ctx.size, 1)])[0]
    ok = math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"])
    return ok, (
        f"2 ranks, {int(stats['tokens'])} tokens a rank: loss {stats['loss']:.4f}, grad_norm {stats['grad_norm']:.3g}, "
        f"step {stats['learner_step_s']:.2f} s"
    )


def check_tp2_engine(ctx: Context) -> tuple[bool, str]:
    """An engine actor holding two GPUs shards the student over both (vLLM's mp executor inside the placement
    group), samples, and scores the probes as transformers does."""
    from opd.rollout.group import RolloutGroup

    cfg = run_config(ctx, 2, 1, 0, "rollout.engine.tensor_parallel_size=2")
    with placed(cfg) as groups:
        worker = Remote(RolloutGroup(cfg, str(ctx.checkpoint), "gloo", groups["rollout"]).workers[0])
        ok, figures = sampled(worker, ctx)
        off = gap(worker.score(*probes(ctx), 1), ctx.references[ctx.checkpoint])
    return ok and off < SYNC_GAP, f"TP=2: {figures}; probe |gap| to transformers {off:.3f} (tol {SYNC_GAP:g})"
