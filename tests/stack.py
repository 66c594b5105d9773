"""Run `launch.py` as a user would, on the tiny assets of conftest.py (shared by the integration tests)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from opd import checkpoint
from opd.monitoring import SUMMARY_LINE

ROOT = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")
RAY_ENV = {"RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
"""Token auth off: every node of a test cluster is this machine (a real cluster keeps it on)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_node(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> Iterator[None]:
    """`ray start ARGS --block` in a session of its own, killed with everything it started on exit.

    Not `ray stop`, which stops every Ray process on the machine: the suite's shared cluster, another test's.
    """
    env = dict(os.environ, **RAY_ENV, **(env or {}))
    log = open(f"/tmp/ray-node-{os.getpid()}-{free_port()}.log", "w+")  # noqa: SIM115 (closed below)
    # Ports Ray fixes by default (each node's dashboard agent on 52365, the head's client server on 10001) would
    # collide with any other cluster on the machine, the suite's shared one or a run's own: each node gets free ones.
    ports = [f"--dashboard-agent-listen-port={free_port()}"]
    if "--head" in args:
        ports.append(f"--ray-client-server-port={free_port()}")
    cmd = [RAY, "start", *args, *ports, "--block", "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
    try:
        deadline = time.time() + timeout
        while "will now block forever" not in Path(log.name).read_text():  # printed once the node is up
            assert proc.poll() is None, f"ray start {' '.join(args)} failed:\n{Path(log.name).read_text()[-3000:]}"
            assert time.time() < deadline, f"ray start {' '.join(args)} not up in {timeout:.0f}s"
            time.sleep(0.2)
        yield
    finally:
        kill_session(proc.pid)
        proc.wait()
        log.close()
        os.unlink(log.name)


def vllm_server(model: str, port: int, flags: list[str], log: Path, timeout: float = 240) -> subprocess.Popen:
    """vLLM's OpenAI-compatible server for `model` on 127.0.0.1:`port` (CPU, float32, eager; log-probs as opd's
    engines give them), in a session of its own (kill that to stop it), its output appended to `log`; returned
    once it answers /health. `flags`: the server's further flags (context, API key)."""
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind")
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--dtype", "float32",
        "--enforce-eager", "--max-logprobs", "20", "--logprobs-mode", "processed_logprobs", "--port", str(port),
        "--host", "127.0.0.1", *flags,
    ]  # fmt: skip
    with open(log, "a") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + timeout
    while True:
        assert proc.poll() is None, f"the vLLM server exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"the vLLM server was not healthy within {timeout:.0f} s: {log}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(1)


@contextlib.contextmanager
def http_server(handler: type) -> Iterator:
    """`handler` (a BaseHTTPRequestHandler) served on 127.0.0.1 at a free port from a thread: a stand-in server."""
    from http.server import ThreadingHTTPServer

    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()


def kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid`: Ray puts its workers in process groups of their own."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid:  # after the name: state, ppid, pgrp, session
                os.kill(int(stat.parent.name), signal.SIGKILL)


def session_pids(sid: int, title: str) -> list[int]:
    """Processes of one run (its session) whose title starts with `title`, e.g. ray::RolloutWorker."""
    out = subprocess.run(["ps", "-eo", "pid,sid,args"], capture_output=True, text=True, check=True).stdout
    rows = (line.split(None, 2) for line in out.splitlines()[1:])
    return [int(pid) for pid, s, args in rows if int(s) == sid and args.startswith(title)]


def launch(overrides: list[str], ray_address: str | None = None, timeout: int = 1500) -> dict:
    """Run launch.py to the end and return its summary; on the cluster at `ray_address` (the `shared_ray` fixture)
    when given, else on a Ray of its own."""
    env = dict(os.environ, WANDB_MODE="offline")
    joins = [f"ray.address={ray_address}"] if ray_address else []
    cmd = [sys.executable, "launch.py", *overrides, *joins]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
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


def killed_while_saving(proc: subprocess.Popen, out: Path, round_: int, timeout: float = 900) -> Path:
    """SIGKILL every process of a run's session (driver, Ray, actors, engines) while the checkpoint of `round_` is
    being written: its `.tmp` directory is there, the learner shards writing their ZeRO state into it. Fails if the
    run ends, or does not begin that checkpoint within `timeout`, first; returns the `.tmp` directory."""
    tmp = out / "checkpoints" / f"round_{round_:06d}.tmp"
    try:
        deadline = time.time() + timeout
        while not tmp.exists():
            assert proc.poll() is None, f"the run ended before writing round {round_}'s checkpoint"
            assert time.time() < deadline, f"round {round_}'s checkpoint was not begun within {timeout:.0f}s"
            time.sleep(0.005)
    finally:
        kill_session(proc.pid)
        proc.wait()
    return tmp


def run_with_fault(args: list[str], out: Path, fault, round_: int = 2) -> tuple[dict, str]:
    """Start launch.py, stop its driver once `round_` is checkpointed, call `fault(session_id)`, continue the
    driver and return the finished run's summary and stdout. Stopped, the driver issues no call until the fault is
    in place; a fault may continue it itself (SIGCONT) to let the run reach a given state first."""
    return run_with_faults(args, out, {round_: fault})


def run_with_faults(args: list[str], out: Path, faults: dict[int, Callable[[int], None]]) -> tuple[dict, str]:
    """run_with_fault with a fault after each of several rounds, in round order."""
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: a run that fills a pipe's buffer would block
        proc = start(args, stdout=log, stderr=subprocess.STDOUT)
        try:
            for round_, fault in sorted(faults.items()):
                stopped_after(proc, out, round_)
                try:
                    fault(proc.pid)
                finally:
                    os.kill(proc.pid, signal.SIGCONT)
            proc.wait(timeout=900)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        log.seek(0)
        output = log.read()
    assert proc.returncode == 0, output[-4000:]
    return summary_of(output), output


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


COSINE = (
    "learner.lr_schedule=cosine",
    "learner.warmup_steps=3",
    "learner.min_lr_ratio=0.1",
    "checkpoint.export_every=1",
)
"""A schedule that moves the lr at every step (a resumed run must pick it up at the checkpoint's step), and the
student exported after every round."""


def checkpointed_overrides(assets: dict[str, Path], out: Path, extra: tuple[str, ...] = ()) -> list[str]:
    """4 rounds on one rollout worker and two ZeRO-2 shards, checkpointed and evaluated every 2 rounds: the runs
    that are killed, resumed and faulted."""
    return [
        *tiny_overrides(assets, out),
        "rollout.num_workers=1",
        "learner.num_shards=2",
        "learner.zero_stage=2",
        "rounds=4",
        "checkpoint.every=2",
        "eval.every=2",
        *extra,
    ]
