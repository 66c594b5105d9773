"""Two Ray nodes on this machine (`ray start`), a job sent with `ray job submit`, actors on both nodes.

The head and the second node each get 3 CPUs, and the run needs 4 (a rollout worker, a teacher and two
learner shards), so Ray must place actors on both; the run prints where each landed.

The job carries the code by PYTHONPATH, not `--working-dir` as on a real cluster: nodes on one machine share one
session directory, and each node's runtime-env agent unpacks a job's working_dir into it, so the second node's
unpacking replaced the directory under the running driver (seen: FileNotFoundError for the driver's own cwd).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.stack import RAY, RAY_ENV, ROOT, free_port, ray_node, summary_of, tiny_overrides

pytestmark = pytest.mark.integration


NO_AGENT_YET = "No available agent to submit job, please try again later"
"""What the job server answers until a node's dashboard agent has registered, a few seconds after `ray start`."""


def ray_cli(*args: str, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    deadline = time.time() + 120
    while True:
        proc = subprocess.run([RAY, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
        if proc.returncode == 0 or NO_AGENT_YET not in proc.stderr or time.time() > deadline:
            break
        time.sleep(1)  # the job server asks for this: its agent is still starting
    assert proc.returncode == 0, f"ray {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture
def two_node_cluster():
    """A head (with the job server) and a worker node, each killed with all it started afterwards (not `ray stop`,
    which would also stop the suite's shared cluster)."""
    gcs, dashboard = free_port(), free_port()
    temp = Path("/tmp") / f"ray-mn-{os.getpid()}"  # short: unix socket paths have a length limit
    head = ("--head", f"--port={gcs}", "--num-cpus=3", "--num-gpus=0", "--include-dashboard=true")
    try:
        with (
            ray_node(*head, f"--dashboard-port={dashboard}", f"--temp-dir={temp}"),
            ray_node(f"--address=127.0.0.1:{gcs}", "--num-cpus=3", "--num-gpus=0"),
        ):
            yield f"http://127.0.0.1:{dashboard}", dict(os.environ, **RAY_ENV)
    finally:
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
    runtime_env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}}
    proc = ray_cli(
        "job",
        "submit",
        f"--address={address}",
        f"--runtime-env-json={json.dumps(runtime_env)}",
        "--",
        sys.executable,
        str(ROOT / "launch.py"),
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
