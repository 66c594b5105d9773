"""Run `launch.py` as a user would, on the tiny assets of conftest.py (shared by the integration tests)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from opd import checkpoint
from opd.monitoring import SUMMARY_LINE

ROOT = Path(__file__).resolve().parent.parent


def launch(overrides: list[str], timeout: int = 1500) -> dict:
    env = dict(os.environ, WANDB_MODE="offline")
    proc = subprocess.run(
        [sys.executable, "launch.py", *overrides], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1].startswith(SUMMARY_LINE)  # what README says the run ends with
    return summary_of(proc.stdout)


def summary_of(output: str) -> dict:
    """The run's summary.json, which launch.py names on its last stdout line (`summary: PATH`); `output` may go on
    after it (a Ray job's log ends with the job's status)."""
    named = [line for line in output.splitlines() if line.startswith(SUMMARY_LINE)]
    assert named, output[-3000:]
    return json.loads(Path(named[-1].removeprefix(SUMMARY_LINE)).read_text())


def start(overrides: list[str], **popen) -> subprocess.Popen:
    """launch.py in its own session (the driver's pid is the session id), niced below the test that watches it:
    the watcher must get a core the moment it wakes, or a tiny run (~0.3 s a round) goes by before it acts."""
    env = dict(os.environ, WANDB_MODE="offline")
    cmd = ["nice", "-n", "10", sys.executable, "launch.py", *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, **popen)


def stopped_after(proc: subprocess.Popen, out: Path, round_: int, timeout: float = 900) -> None:
    """Wait until `round_` is checkpointed, then stop (SIGSTOP) the run's driver so it issues no further call
    until the caller continues it (SIGCONT) or kills the run. Fails if the run had already saved its last round
    (`rounds` of the config.yaml it wrote at start)."""
    from omegaconf import OmegaConf

    marker = out / "checkpoints" / f"round_{round_:06d}" / checkpoint.STATE
    deadline = time.time() + timeout
    while not marker.exists():
        assert proc.poll() is None, f"the run ended before round {round_} was saved"
        assert time.time() < deadline, f"round {round_} was not saved within {timeout:.0f}s"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGSTOP)
    done, rounds = checkpoint.latest(out), OmegaConf.load(out / "config.yaml").rounds
    assert done is not None and checkpoint.load(done)["round"] < rounds, f"stopped too late, at {done}"


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
        "learner.lr_schedule=constant",  # the demo's warm-up and decay span 300 rounds; these runs take a few
        "learner.warmup_steps=0",
        # On-policy reverse KL taken exactly over the teacher's top-k at each position of the student's own
        # samples: the demo's objective. The sampled-token gradient (loss.type=reverse_kl) is too noisy to
        # assert a drop within 6 rounds on a random teacher; its maths is unit-tested in test_losses/test_pieces.
        "loss.type=jsd",
        "loss.beta=1.0",
        "eval.samples_per_prompt=8",
        "eval.every=3",
        f"output_dir={out}",
    ]
