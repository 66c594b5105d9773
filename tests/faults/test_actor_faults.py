"""Actors die mid-run (SIGKILL of their processes); the run replaces them and finishes every round."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.faults.test_resume import overrides
from tests.stack import ROOT

pytestmark = pytest.mark.integration


def session_pids(sid: int, title: str) -> list[int]:
    """Processes of one run (its session) whose title starts with `title`, e.g. ray::RolloutWorker."""
    out = subprocess.run(["ps", "-eo", "pid,sid,args"], capture_output=True, text=True, check=True).stdout
    rows = (line.split(None, 2) for line in out.splitlines()[1:])
    return [int(pid) for pid, s, args in rows if int(s) == sid and args.startswith(title)]


def test_killed_rollout_worker_and_teacher_replica_are_replaced(tiny_assets, tmp_path):
    out = tmp_path / "run"
    args = [*overrides(tiny_assets, out), "rounds=6", "checkpoint.every=1", "faults.teacher_timeout_s=120"]
    env = dict(os.environ, WANDB_MODE="offline")
    proc = subprocess.Popen(
        [sys.executable, "launch.py", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        marker = out / "checkpoints" / "round_000002" / "controller.json"
        deadline = time.time() + 900
        while not marker.exists():
            assert proc.poll() is None and time.time() < deadline, "the run ended or stalled before round 2"
            time.sleep(0.2)
        victims = session_pids(proc.pid, "ray::RolloutWorker")[:1] + session_pids(proc.pid, "ray::TeacherWorker")[:1]
        assert len(victims) == 2, victims
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr[-4000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    rounds = [r for r in summary["rounds"] if r["round"] >= 1]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5, 6]
    assert rounds[-1]["faults/rollout_restarts"] >= 1
    # after the rebuild the new engines hold exactly the learner's weights again
    assert all(r["learner/sampler_learner_logprob_gap"] < 1e-3 for r in rounds[1:])
