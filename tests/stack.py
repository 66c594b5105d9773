"""Run `launch.py` as a user would, on the tiny assets of conftest.py (shared by the integration tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def launch(overrides: list[str], timeout: int = 1500) -> dict:
    env = dict(os.environ, WANDB_MODE="offline")
    proc = subprocess.run(
        [sys.executable, "launch.py", *overrides], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def tiny_overrides(assets: dict[str, Path], out: Path) -> list[str]:
    return [
        f"student.model={assets['student']}",
        f"teachers.0.model={assets['teacher']}",
        f"data.train={assets['train']}",
        f"data.eval={assets['eval']}",
        "data.eval_size=48",
        "rollout.prompts_per_round=16",
        "rollout.samples_per_prompt=4",
        "rollout.max_new_tokens=8",
        "learner.micro_batch_size=16",
        "learner.mini_batches=4",
        "learner.lr=1e-2",
        # On-policy reverse KL taken exactly over the teacher's top-k at each position of the student's own
        # samples: the demo's objective. The sampled-token gradient (loss.type=reverse_kl) is too noisy to
        # assert a drop within 6 rounds on a random teacher; its maths is unit-tested in test_losses/test_pieces.
        "loss.type=jsd",
        "loss.beta=1.0",
        "eval.samples_per_prompt=8",
        "eval.every=3",
        f"output_dir={out}",
    ]
