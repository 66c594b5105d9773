"""Two rounds of the real stack on ONE NVIDIA GPU: rollout worker, teacher and learner share the device.

Fractional GPU reservations (0.25 each) let Ray place all three roles on one device. NCCL refuses two ranks
of one communicator on the same GPU, so `rollout.weight_sync=auto` sends the weights over gloo here (nccl needs
whole GPUs per rank; an explicit `nccl` on a shared GPU is refused by the config). The learner is one ZeRO-3
shard in bf16, so its gathered-parameter paths (weight sync, save) run. Skipped without CUDA; the config it
uses is still validated on CPU by `test_gpu_smoke_config_is_valid`.

    pytest tests/gpu
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from opd.config import load_config
from opd.config.schema import weight_backend
from tests.stack import launch, tiny_overrides

ROUNDS = 2
SINGLE_GPU = [
    "rollout.num_workers=1",
    "rollout.gpus_per_worker=0.25",
    "teachers.0.gpus_per_replica=0.25",
    "learner.num_shards=1",
    "learner.gpus_per_shard=0.25",
    "learner.zero_stage=3",
    "rollout.engine.gpu_memory_utilization=0.15",
    "teacher_engine.gpu_memory_utilization=0.15",
    "rollout.engine.dtype=bfloat16",
    "teacher_engine.dtype=bfloat16",
    f"rounds={ROUNDS}",
]
# The learner trains in bf16 (learner.bf16) and both vLLM engines run bf16, so the learner's log-prob of a
# sampled token differs from the sampler's by bf16 rounding and kernel differences (~1e-2) even when weight
# sync is exact. The CPU test (fp32 everywhere) asserts 1e-3; a broken or skipped sync gives gaps of
# order 1 here, since the learner has moved (lr 1e-2) while the sampler would still hold the old weights.
BF16_LOGPROB_GAP = 5e-2


def on_gpu(test):
    """Marks for a test that needs the real stack on a CUDA device."""
    needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA)")
    return pytest.mark.gpu(pytest.mark.integration(needs_cuda(test)))


def gpu_overrides(assets: dict[str, Path], out: Path) -> list[str]:
    return [*tiny_overrides(assets, out), *SINGLE_GPU]


def test_gpu_smoke_config_is_valid(tiny_assets, tmp_path):
    """Runs everywhere: the GPU test's overrides parse and validate, and the plan fits on one device."""
    cfg = load_config("default", gpu_overrides(tiny_assets, tmp_path))
    assert cfg.rounds == ROUNDS
    assert cfg.rollout.num_workers == 1 and cfg.learner.num_shards == 1 and len(cfg.teachers) == 1
    assert cfg.rollout.engine.dtype == cfg.teacher_engine.dtype == "bfloat16"
    # On one shared GPU weight_sync=auto picks gloo: NCCL refuses two ranks on one device.
    assert cfg.rollout.weight_sync == "auto" and weight_backend(cfg) == "gloo"
    assert cfg.learner.zero_stage == 3 and cfg.learner.bf16
    gpus = (
        cfg.rollout.num_workers * cfg.rollout.gpus_per_worker
        + sum(t.replicas * t.gpus_per_replica for t in cfg.teachers)
        + cfg.learner.num_shards * cfg.learner.gpus_per_shard
    )
    assert 0 < gpus <= 1, gpus
    vllm_memory = cfg.rollout.num_workers * cfg.rollout.engine.gpu_memory_utilization + sum(
        t.replicas * cfg.teacher_engine.gpu_memory_utilization for t in cfg.teachers if t.backend == "vllm"
    )
    assert vllm_memory < 0.5, vllm_memory  # leaves the rest of the device to the DeepSpeed learner


@pytest.fixture(scope="module")
def gpu_run(tiny_assets, tmp_path_factory):
    """`launch.py` on one GPU; returns (completed process, summary, output dir).

    `tests.stack.launch` returns only the parsed summary, so `subprocess.run` is wrapped for the call to keep
    the completed process too (its stdout carries the "weight sync over ..." line).
    """
    out = tmp_path_factory.mktemp("gpu_run")
    procs: list[subprocess.CompletedProcess] = []
    real_run = subprocess.run

    def recording_run(*args, **kwargs):
        proc = real_run(*args, **kwargs)
        procs.append(proc)
        return proc

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(subprocess, "run", recording_run)
        summary = launch(gpu_overrides(tiny_assets, out))
    return procs[-1], summary, out


def trained_rounds(summary: dict) -> list[dict]:
    return [r for r in summary["rounds"] if r["round"] >= 1]  # round 0 is the evaluation before training


@on_gpu
def test_runs_two_rounds_on_one_shared_gpu(gpu_run):
    proc, summary, _ = gpu_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "weight sync over gloo" in proc.stdout, proc.stdout[-4000:]
    assert [r["round"] for r in trained_rounds(summary)] == list(range(1, ROUNDS + 1))
    assert summary["final"]["rounds"] == summary["final"]["policy_version"] == ROUNDS


@on_gpu
def test_every_round_syncs_weights(gpu_run):
    _, summary, _ = gpu_run
    for r in trained_rounds(summary):
        assert r["weight_sync_s"] > 0, r


@on_gpu
def test_sampler_and_learner_agree_after_sync(gpu_run):
    """From round 2 on, samples come from synced weights (see BF16_LOGPROB_GAP for the tolerance)."""
    _, summary, _ = gpu_run
    later = [r for r in trained_rounds(summary) if r["round"] >= 2]
    assert later
    for r in later:
        assert r["learner/sampler_learner_logprob_gap"] < BF16_LOGPROB_GAP, r


@on_gpu
def test_student_is_saved(gpu_run):
    _, summary, out = gpu_run
    student = Path(summary["final"]["student_path"])
    assert student.resolve() == (out / "student").resolve()
    assert (student / "model.safetensors").is_file(), sorted(p.name for p in student.iterdir())
