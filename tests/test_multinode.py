"""Two Ray nodes on this machine (`ray start`), a job sent with `ray job submit`, actors on both nodes.

The head and the second node each get 3 CPUs, and the run needs 4 (a rollout worker, a teacher and two
learner shards), so Ray must place actors on both; the run prints where each landed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.stack import ROOT, summary_of, tiny_overrides

pytestmark = pytest.mark.integration
RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli(*args: str, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([RAY, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"ray {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture
def two_node_cluster(tmp_path):
    """A head (with the job server) and a worker node, stopped afterwards whatever happens."""
    gcs, dashboard = free_port(), free_port()
    temp = Path("/tmp") / f"ray-mn-{os.getpid()}"  # short: unix socket paths have a length limit
    # Token auth off: both nodes are this machine (a real cluster keeps it on and shares the token file).
    env = dict(os.environ, RAY_ADDRESS="", RAY_AUTH_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    try:
        ray_cli(
            "start",
            "--head",
            f"--port={gcs}",
            "--num-cpus=3",
            "--num-gpus=0",
            "--include-dashboard=true",
            f"--dashboard-port={dashboard}",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
            env=env,
        )
        ray_cli("start", f"--address=127.0.0.1:{gcs}", "--num-cpus=3", "--num-gpus=0", env=env)
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120, env=env)
        shutil.rmtree(temp, ignore_errors=True)


def test_job_submitted_to_a_two_node_cluster_uses_both_nodes(two_node_cluster, tiny_assets, tmp_path):
    address, env = two_node_cluster
    args = [
        *tiny_overrides(tiny_assets, tmp_path / "run"),
        "rollout.num_workers=1",
        "learner.num_shards=2",
        "rounds=2",
        "wandb.mode=offline",
    ]
    runtime_env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline"}}
    proc = ray_cli(
        "job",
        "submit",
        f"--address={address}",
        "--working-dir=.",
        f"--runtime-env-json={json.dumps(runtime_env)}",
        "--",
        sys.executable,
        "launch.py",
        *args,
        env=env,
        timeout=1500,
    )
    logs = proc.stdout
    assert "succeeded" in logs.lower(), logs[-3000:]
    nodes = set(re.findall(r"^\s+(?:rollout worker|learner shard|teacher \S+) \d+: node (\S+)", logs, re.M))
    assert len(nodes) == 2, logs[logs.find("placement:") :][:2000]
    summary = summary_of(logs)  # the job runs on this machine: the path launch.py prints is readable here
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
