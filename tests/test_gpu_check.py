"""The GPU machine's one-command check (tests/gpu/check.py), rehearsed on CPU: fp32, one gloo rank, vLLM present."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ("hf_teacher", "learner_step", "weight_metadata", "weight_sync_round_trip")


@pytest.mark.integration  # DeepSpeed start-up and two ZeRO-3 steps: 25-45 s on 2 cores
def test_gpu_check_passes_every_check_on_cpu():
    cmd = [sys.executable, "tests/gpu/check.py", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    verdicts = {name: verdict for verdict, name in re.findall(r"^(PASS|FAIL|SKIPPED) (\w+):", proc.stdout, re.M)}
    assert {name: verdicts.get(name) for name in CHECKS} == dict.fromkeys(CHECKS, "PASS"), proc.stdout
