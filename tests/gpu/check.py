"""One-command check of opd's GPU paths on a machine with NVIDIA GPUs (sized for 10 minutes; not yet run).

    python tests/gpu/check.py                # CUDA
    python tests/gpu/check.py --device cpu   # rehearsal: fp32, gloo; every CUDA check SKIPs

Prints one line per check, `PASS name: figures`, `FAIL name: figures or error` or `SKIP name: reason`, and exits
non-zero on any FAIL. A check SKIPs when what it needs is missing (CUDA, 2 GPUs, vLLM, Ray) or when the check that
builds what it uses did not pass. In order:

- `hf_teacher`: `opd.teachers.hf.score` equals a plain forward pass per sequence, to the device dtype's tolerance.
- `hf_reference`: transformers' bf16 log-probs of probe sequences under the learner's checkpoint and under a second
  one with other weights, which the engine checks start from (tests/gpu/checks_vllm.py).
- `vllm_engine`: a colocated rollout worker's CUDA engine (sleep mode, CUDA graphs) starts, samples, and scores the
  probes as transformers does.
- `learner_setup`: one `LearnerShard` (in this process, no Ray) set up at ZeRO-3, bf16 on CUDA.
- `ipc_sleep_sync`: the engine sleeps at level 2, its weights wake, the shard's weights arrive over CUDA IPC, the KV
  cache wakes; the engine then scores as the learner's checkpoint and samples again.
- `learner_step`: two steps of the shard with the chunked objective; figures: losses, peak memory.
- `weight_metadata`: the shard's weight source announces the names, shapes and dtypes it then yields.
- `weight_sync_round_trip`: the gloo trainer engine's send into its worker engine's receive path, bit-equal.
- `zero_gpu_actor`: a Ray actor whose bundle holds no GPU, beside one that holds a GPU, sees no CUDA device.
- `nccl_weight_sync`, `two_rank_learner`, `tp2_engine` (2 GPUs): the run's NCCL weight sync between a learner actor
  and an engine actor; two learner ranks stepping together; an engine tensor-parallel over two GPUs
  (tests/gpu/checks_ray.py).

Without vLLM, `opd.learner.shard` gets a stand-in `WeightSource` (one parameter per gather group) and the header
line says so.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.gpu import checks_learner as learner  # noqa: E402  (the repo root first)
from tests.gpu import checks_ray as cluster  # noqa: E402
from tests.gpu import checks_vllm as engines  # noqa: E402


@dataclass(frozen=True)
class Env:
    """What this machine offers the checks."""

    device: str
    gpus: int
    vllm: bool
    ray: bool


@dataclass(frozen=True)
class Check:
    name: str
    fn: Callable[[learner.Context], tuple[bool, str]]
    needs: tuple[str, ...] = ()
    """cuda, 2gpus, vllm, ray, and the Context fields earlier checks build (`BUILT_BY`)."""


BUILT_BY = {"references": "hf_reference", "engine": "vllm_engine", "shard": "learner_setup"}
"""The check that fills each Context field other checks use."""

IN_PROCESS = [
    Check("hf_teacher", learner.check_hf_teacher),
    Check("hf_reference", engines.check_hf_reference, ("cuda",)),  # before any shard: see its docstring
    Check("vllm_engine", engines.check_vllm_engine, ("cuda", "vllm", "references")),
    Check("learner_setup", learner.check_learner_setup),
    Check("ipc_sleep_sync", engines.check_ipc_sleep_sync, ("cuda", "vllm", "engine", "shard")),  # before steps
    Check("learner_step", learner.check_learner_step, ("shard",)),
    Check("weight_metadata", learner.check_weight_metadata, ("shard",)),
    Check("weight_sync_round_trip", learner.check_weight_sync, ("vllm", "shard")),
]
WITH_RAY = [
    Check("zero_gpu_actor", cluster.check_zero_gpu_actor, ("cuda", "ray")),
    Check("nccl_weight_sync", cluster.check_nccl_weight_sync, ("cuda", "2gpus", "vllm", "ray", "references")),
    Check("two_rank_learner", cluster.check_two_rank_learner, ("cuda", "2gpus", "ray")),
    Check("tp2_engine", cluster.check_tp2_engine, ("cuda", "2gpus", "vllm", "ray", "references")),
]
CHECKS = IN_PROCESS + WITH_RAY


def skip_reason(check: Check, env: Env, ctx: learner.Context) -> str:
    """Why `check` cannot run here ('' when it can): every missing need, in one line."""
    unmet = {
        "cuda": "" if env.device == "cuda" else "needs CUDA (--device cpu)",
        "2gpus": "" if env.gpus >= 2 else f"needs 2 GPUs ({env.gpus} here)",
        "vllm": "" if env.vllm else "needs vLLM (not installed)",
        "ray": "" if env.ray else "needs Ray (not installed)",
    }
    reasons = [unmet[n] for n in check.needs if unmet.get(n)]
    if not reasons:  # what earlier checks built is looked for only where this machine could build it
        reasons = [
            f"needs {BUILT_BY[n]}, which did not pass" for n in check.needs if n in BUILT_BY and not getattr(ctx, n)
        ]
    return "; ".join(reasons)


def run_check(check: Check, env: Env, ctx: learner.Context) -> str:
    """Run or skip `check` and print its one line; a raised error is a FAIL naming it. Returns the status."""
    reason = skip_reason(check, env, ctx)
    if reason:
        status, figures = "SKIP", reason
    else:
        try:
            ok, figures = check.fn(ctx)
            status = "PASS" if ok else "FAIL"
        except Exception as e:  # one broken check must not hide the others' lines
            traceback.print_exc(file=sys.stderr)
            status, figures = "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    print(f"{status} {check.name}: {figures}", flush=True)
    return status


def run_all(checks: list[Check], env: Env, ctx: learner.Context) -> bool:
    """Every check's line, in order; whether none FAILed."""
    return "FAIL" not in [run_check(c, env, ctx) for c in checks]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    device = parser.parse_args().device
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # no check may reach a GPU in the rehearsal
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        print("FAIL setup: no CUDA device (use --device cpu to rehearse)")
        return 1
    have = {name: importlib.util.find_spec(name) is not None for name in ("vllm", "ray")}
    env = Env(device, torch.cuda.device_count(), **have)
    if not env.vllm:
        learner.install_weight_source_stand_in()
    size = learner.GPU_SIZE if device == "cuda" else learner.CPU_SIZE
    where = f"{env.gpus} x {torch.cuda.get_device_name()}" if device == "cuda" else f"{os.cpu_count()} CPU cores"
    print(
        f"INFO {where}, torch {torch.__version__}, python {sys.version.split()[0]}; vLLM "
        f"{'present' if env.vllm else 'absent: stand-in WeightSource, one parameter per gather group'}; Ray "
        f"{'present' if env.ray else 'absent'}; learner.loss_chunk_tokens "
        f"{'present' if learner.chunked_objective_landed() else 'absent: default objective'}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        ctx = learner.Context(device, size, learner.build_checkpoint(size, Path(tmp) / "model"))
        ok = run_all(IN_PROCESS, env, ctx)
        engines.close_engine(ctx)  # its GPU memory goes to the Ray checks' actors
        ok &= run_all(WITH_RAY, env, ctx)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
