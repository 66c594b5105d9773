"""The GPU machine's one-command check (tests/gpu/check.py): its runner's lines, and the whole check rehearsed on CPU
(fp32, one gloo rank, vLLM present)."""

import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from tests.gpu import check

ROOT = Path(__file__).resolve().parents[1]
CPU_CHECKS = ("hf_teacher", "learner_setup", "learner_step", "weight_metadata", "weight_sync_round_trip")
LINE = re.compile(r"^(PASS|FAIL|SKIP) (\w+): (.+)$", re.M)


def _run_faked(env: check.Env, capsys) -> dict[str, tuple[str, str]]:
    """Every check's line with the checks themselves faked: each passes, and those that build a Context field
    fill it."""

    def fake(name: str):
        def fn(ctx):
            for field, builder in check.BUILT_BY.items():
                if builder == name:
                    setattr(ctx, field, object())
            return True, "ran"

        return fn

    ctx = check.learner.Context(env.device, check.learner.CPU_SIZE, Path("unused"))
    assert check.run_all([replace(c, fn=fake(c.name)) for c in check.CHECKS], env, ctx)
    lines = LINE.findall(capsys.readouterr().out)
    assert [name for _, name, _ in lines] == [c.name for c in check.CHECKS]  # one line per check, in order
    return {name: (status, text) for status, name, text in lines}


def test_on_cpu_every_cuda_check_skips_with_its_reason(capsys):
    lines = _run_faked(check.Env("cpu", 0, vllm=True, ray=True), capsys)
    for c in check.CHECKS:
        status, text = lines[c.name]
        if "cuda" in c.needs:
            assert status == "SKIP" and text.startswith("needs CUDA"), (c.name, text)
        else:
            assert (status, text) == ("PASS", "ran"), c.name
    assert set(CPU_CHECKS) == {c.name for c in check.CHECKS if "cuda" not in c.needs}
    assert "needs 2 GPUs (0 here)" in lines["tp2_engine"][1]


def test_missing_packages_and_gpus_are_named_and_a_failed_builder_skips_its_users(capsys):
    lines = _run_faked(check.Env("cuda", 1, vllm=False, ray=False), capsys)
    assert lines["vllm_engine"] == ("SKIP", "needs vLLM (not installed)")
    assert lines["zero_gpu_actor"] == ("SKIP", "needs Ray (not installed)")
    assert lines["nccl_weight_sync"] == (
        "SKIP",
        "needs 2 GPUs (1 here); needs vLLM (not installed); needs Ray (not installed)",
    )
    assert lines["two_rank_learner"] == ("SKIP", "needs 2 GPUs (1 here); needs Ray (not installed)")
    assert lines["learner_step"] == ("PASS", "ran")
    ctx = check.learner.Context("cuda", check.learner.CPU_SIZE, Path("unused"))
    step = next(c for c in check.CHECKS if c.name == "learner_step")
    assert check.run_check(step, check.Env("cuda", 1, vllm=True, ray=True), ctx) == "SKIP"
    assert "SKIP learner_step: needs learner_setup, which did not pass" in capsys.readouterr().out


def test_a_raising_check_is_one_fail_line_and_the_run_goes_on(capsys):
    def broken(ctx):
        raise RuntimeError("engine died\nmore")

    ctx = check.learner.Context("cpu", check.learner.CPU_SIZE, Path("unused"))
    checks = [check.Check("first", broken), check.Check("second", lambda ctx: (True, "fine"))]
    assert not check.run_all(checks, check.Env("cpu", 0, vllm=True, ray=True), ctx)
    out = capsys.readouterr().out
    assert LINE.findall(out) == [("FAIL", "first", "RuntimeError: engine died"), ("PASS", "second", "fine")]


@pytest.mark.integration  # DeepSpeed start-up and two ZeRO-3 steps: 25-45 s on 2 cores
def test_gpu_check_passes_every_check_on_cpu():
    cmd = [sys.executable, "tests/gpu/check.py", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    verdicts = {name: status for status, name, _ in LINE.findall(proc.stdout)}
    assert verdicts == {c.name: "PASS" if c.name in CPU_CHECKS else "SKIP" for c in check.CHECKS}, proc.stdout
