"""A teacher whose numbers are all NaN: every learner step is skipped and counted, then the run stops clearly."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.stack import ROOT, tiny_overrides

pytestmark = pytest.mark.integration


def test_nan_teacher_steps_are_skipped_then_the_run_stops_with_a_clear_message(tiny_assets, tmp_path, shared_ray):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    broken = tmp_path / "nan_teacher"
    model = AutoModelForCausalLM.from_pretrained(tiny_assets["teacher"])
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    model.save_pretrained(broken)
    AutoTokenizer.from_pretrained(tiny_assets["teacher"]).save_pretrained(broken)

    args = [
        *tiny_overrides(tiny_assets, tmp_path / "run"),
        f"teachers.0.model={broken}",
        "teachers.0.backend=transformers",
        "rollout.num_workers=1",
        "learner.num_shards=2",
        "faults.max_nonfinite_steps=2",
        "rounds=5",
        f"ray.address={shared_ray}",
    ]
    env = dict(os.environ, WANDB_MODE="offline")
    proc = subprocess.run(
        [sys.executable, "launch.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=1200, env=env
    )
    assert proc.returncode != 0
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and "2" in message and "faults.max_nonfinite_steps=2" in message, message
    assert not (tmp_path / "run" / "student").exists()  # nothing trained on NaN was saved
