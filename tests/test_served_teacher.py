"""A teacher served by a real vLLM OpenAI-compatible server on 127.0.0.1: the same signal as the in-process vLLM
teacher, a distillation run through it, and what the run does when the server dies (retries, then a clear error,
the checkpoint standing). Nothing but 127.0.0.1 is contacted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from opd import checkpoint
from tests.stack import ROOT, free_port, start, stopped_after, tiny_overrides, vllm_server

pytestmark = pytest.mark.integration

KEY_ENV, KEY = "OPD_TEST_SERVED_KEY", "sk-served-test-0123456789"
TOP_K = 5


def _serve(model: str, port: int, log: Path) -> subprocess.Popen:
    """The tiny teacher served by vLLM behind an API key, healthy."""
    flags = ["--gpu-memory-utilization", "0.1", "--max-model-len", "256", "--api-key", KEY]
    return vllm_server(model, port, flags, log)


@pytest.fixture(scope="module")
def served(tiny_assets, tmp_path_factory):
    """One server for the module's tests; killed (its whole session) at the end."""
    port, model, log = free_port(), str(tiny_assets["teacher"]), tmp_path_factory.mktemp("served") / "server.log"
    handle = {"url": f"http://127.0.0.1:{port}/v1", "model": model, "port": port, "log": log}
    handle["proc"] = _serve(model, port, log)
    try:
        yield handle
    finally:
        if handle["proc"].poll() is None:
            os.killpg(handle["proc"].pid, signal.SIGKILL)
        handle["proc"].wait()


@pytest.fixture
def server(served):
    """The module's server, started again if a test before this one killed it (the outage test does), so the
    tests pass in any order."""
    if served["proc"].poll() is not None:
        served["proc"] = _serve(served["model"], served["port"], served["log"])
    return served


IN_PROCESS = """
import json, sys
import numpy as np
from opd.config import EngineConfig
from opd.rollout import engine

if __name__ == "__main__":
    path, k = sys.argv[1], int(sys.argv[2])
    prompts, responses = json.loads(sys.argv[3])
    llm = engine.make_llm(path, EngineConfig(dtype="float32"), 0, logprobs_mode="processed_logprobs")
    scored = engine.score(llm, prompts, responses, k)
    greedy = engine.sample(llm, prompts, 1, 8, 0.0, None, engine.stop_token_ids(path))
    print("RESULT " + json.dumps({
        "logprobs": [s.logprobs.tolist() for s in scored],
        "topk_ids": [s.topk_ids.tolist() for s in scored],
        "topk_logprobs": [s.topk_logprobs.tolist() for s in scored],
        "greedy": [[ids.tolist(), lps.tolist()] for pairs in greedy for ids, lps in pairs],
    }))
"""


def test_served_scores_and_samples_equal_the_in_process_vllm_teacher(server):
    from opd.rollout import engine
    from opd.teachers.served import Endpoint, ServedClient

    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 40, size=n).tolist() for n in (4, 9, 6)]
    responses = [rng.integers(3, 40, size=n).tolist() for n in (7, 1, 12)]
    client = ServedClient(Endpoint(server["url"], server["model"], KEY, 2, 60.0))
    got = client.score(prompts, responses, TOP_K)
    greedy = client.sample(prompts, 1, 8, 0.0, None, engine.stop_token_ids(server["model"]))
    proc = subprocess.run(
        [sys.executable, "-c", IN_PROCESS, server["model"], str(TOP_K), json.dumps([prompts, responses])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT ")).removeprefix("RESULT "))
    for i, s in enumerate(got):
        np.testing.assert_allclose(s.logprobs, want["logprobs"][i], atol=1e-5)
        np.testing.assert_allclose(s.topk_logprobs, want["topk_logprobs"][i], atol=1e-5)
        assert s.topk_ids.tolist() == want["topk_ids"][i]
    for (ids, lps), (want_ids, want_lps) in zip([p[0] for p in greedy], want["greedy"], strict=True):
        assert ids.tolist() == want_ids
        np.testing.assert_allclose(lps, want_lps, atol=1e-5)


def test_a_run_distils_through_the_server_and_stops_clearly_when_it_dies(server, tiny_assets, tmp_path, monkeypatch):
    """Runs through round 2 on the served teacher; then the server is killed: each call is retried
    (faults.teacher_retries) and the run ends with an error naming the teacher and the URL, its round-2
    checkpoint intact. The API key is passed by variable name and written nowhere."""
    out = tmp_path / "run"
    args = [
        *tiny_overrides(tiny_assets, out),
        "teachers.0.name=served",
        "teachers.0.backend=openai",
        f"teachers.0.url={server['url']}",
        f"teachers.0.api_key_env={KEY_ENV}",
        "teachers.0.license=apache-2.0",
        "rollout.num_workers=1",
        "learner.num_shards=1",
        "rounds=50",
        "checkpoint.every=1",
        "eval.every=50",
        "data.eval_size=8",
        "eval.samples_per_prompt=1",
        "faults.teacher_retries=1",
        "faults.teacher_timeout_s=5",  # a dead server's requests are retried until this deadline, then the call
    ]
    monkeypatch.setenv(KEY_ENV, KEY)
    proc = start(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stopped_after(proc, out, 2)
        os.killpg(server["proc"].pid, signal.SIGKILL)
        server["proc"].wait()
        os.kill(proc.pid, signal.SIGCONT)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0, stdout[-3000:]
    assert "teacher 'served' call failed (attempt 1)" in stdout, stdout[-3000:]
    assert "teacher 'served' failed 2 times" in stderr and server["url"] in stderr, stderr[-3000:]
    saved = checkpoint.latest(out)
    assert saved is not None and checkpoint.load(saved)["round"] >= 2
    written = [
        p.read_bytes() for p in out.rglob("*") if p.is_file() and p.suffix in (".json", ".yaml", ".md", ".jsonl")
    ]
    assert written and not any(KEY.encode() in b for b in written) and KEY not in stdout + stderr
