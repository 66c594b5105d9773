"""Shared fixtures: tiny checkpoints and prompt files built on the fly (no hub access)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from opd.catalog import QWEN_05B, SMOLLM2
from tests.stack import COSINE, ROOT, checkpointed_overrides, free_port, launch, ray_node

BUILDER = pytest.StashKey[subprocess.Popen]()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> dict[str, Path]:
    """Teachers and a smaller student sharing one tokenizer, a teacher with its own tokenizer, and prompt files.

    The teacher is untrained but opinionated (scaled embeddings give peaked next-token
    distributions), so the student has a clear target to move towards in a few rounds.
    """
    import torch

    from opd.tiny import TinySpec, build_model, save_checkpoint, train_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    rng = random.Random(0)
    rows = []
    for _ in range(300):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        rows.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})
    tok = train_tokenizer([r["prompt"] + r["answer"] for r in rows], 40)
    teacher = build_model(tok, TinySpec(layers=2, hidden=64, heads=2), seed=1)
    with torch.no_grad():
        teacher.model.embed_tokens.weight.mul_(4.0)
    student = build_model(tok, TinySpec(layers=1, hidden=64, heads=2), seed=2)
    big = build_model(tok, TinySpec(layers=3, hidden=128, heads=4, kv_heads=2, intermediate=256), seed=3)
    # Same text, another family and tokenizer: digits merge ("86" is one token), so its signal must be bridged.
    other_tok = train_tokenizer([r["prompt"] + r["answer"] for r in rows], 320, split_digits=False)
    other = build_model(other_tok, TinySpec(layers=2, hidden=64, heads=2), seed=4, arch="gpt2")
    with torch.no_grad():
        for model in (big, other):
            model.get_input_embeddings().weight.mul_(4.0)
    return {
        "teacher": save_checkpoint(teacher, tok, root / "teacher"),
        "big_teacher": save_checkpoint(big, tok, root / "big_teacher"),
        "other_tokenizer_teacher": save_checkpoint(other, other_tok, root / "other_tokenizer_teacher"),
        "student": save_checkpoint(student, tok, root / "student"),
        "train": write_jsonl(root / "train.jsonl", rows[:240]),
        "eval": write_jsonl(root / "eval.jsonl", rows[240:]),
    }


def machine_cache() -> Path:
    """Built-in sets shared by every test session on this machine (OPD_TEST_CACHE to move it): each set is keyed by
    its versioned name, built atomically and, where fetched, checked against pinned hashes, so a later session
    reuses it as it is; a fresh machine (CI) builds it once."""
    return Path(os.environ.get("OPD_TEST_CACHE", Path.home() / ".cache" / "opd-tests"))


MACHINE_SETS = {"smollm2_assets": SMOLLM2, "qwen_teacher": QWEN_05B}
"""The fixtures that read built-in sets from the machine's cache, and the set each needs."""


def pytest_collection_finish(session) -> None:
    """Build the machine-cached sets the selected tests need, and do not have yet, in the background (dequantizing
    GGUFs, 1-2 min on a fresh machine) while the tests that do not need them run. A fixture that needs a set before
    it is built waits on the set's lock (`opd.assets.ensure_set`); one whose build failed builds it again itself,
    and fails with the error."""
    if os.environ.get("PYTEST_XDIST_WORKER", "gw0") != "gw0":
        return  # one worker builds; the other waits on the set's lock if it needs it first
    needed = {MACHINE_SETS[f] for item in session.items for f in getattr(item, "fixturenames", ()) if f in MACHINE_SETS}
    missing = [group for group in dict.fromkeys(MACHINE_SETS.values()) if group in needed and not built(group)]
    if missing:
        machine_cache().mkdir(parents=True, exist_ok=True)
        log = open(machine_cache() / "build.log", "w")  # noqa: SIM115 (the builder's, closed below)
        code = "import sys; from pathlib import Path; from opd.assets import ensure_set\n"
        code += "for group in sys.argv[2:]: ensure_set(group, Path(sys.argv[1]))"
        cmd = [sys.executable, "-c", code, str(machine_cache()), *missing]
        session.config.stash[BUILDER] = subprocess.Popen(
            cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()


def pytest_sessionfinish(session) -> None:
    """A builder still running when the session ends early (`-x`) is stopped; its temp dir is swept next time."""
    builder = session.config.stash.get(BUILDER, None)
    if builder is not None and builder.poll() is None:
        os.killpg(builder.pid, signal.SIGKILL)
        builder.wait()


def built(group: str) -> bool:
    return (machine_cache() / group / "meta.json").is_file()


@pytest.fixture(scope="session")
def smollm2_assets() -> dict[str, Path]:
    """The SmolLM2 built-ins by name (opd/pretrained.py), through the built-in cache.

    About 45 s on 2 cores the first time (dequantizing the GGUF), 700 MB on disk; tests using it are `integration`.
    """
    from opd.assets import ensure_builtin
    from opd.catalog import BUILTINS, SMOLLM2

    return {name: ensure_builtin(name, machine_cache()) for name, entry in BUILTINS.items() if entry.group == SMOLLM2}


@pytest.fixture(scope="session")
def qwen_teacher() -> Path:
    """builtin:qwen2.5-coder-0.5b-instruct's checkpoint: fetched (491 MB) and converted the first time, about 1 min."""
    from opd.assets import ensure_builtin

    return ensure_builtin("qwen2.5-coder-0.5b-instruct", machine_cache())


@pytest.fixture
def waits(monkeypatch) -> list[float]:
    """A served teacher's waits between tries (opd/teachers/served_http.py), recorded instead of slept; the clock
    its deadlines are measured on moves on by each as if it had been slept."""
    from opd.teachers import served_http

    seen: list[float] = []
    clock = served_http.now
    monkeypatch.setattr(served_http, "pause", seen.append)
    monkeypatch.setattr(served_http, "now", lambda: clock() + sum(seen))
    return seen


@pytest.fixture(scope="session")
def shared_ray() -> Iterator[str]:
    """One Ray cluster for the session's runs that kill nothing: each joins it as a job (`ray.address`) instead of
    starting and stopping a Ray of its own, about 10 s a run on 2 cores. A job's actors and placement groups end
    with its driver, so runs stay apart; a test that kills processes or nodes starts its own cluster.

    8 logical CPUs: the largest plan of a test that joins it (6, conf/smollm2_chat.yaml) fits, as on a local Ray,
    which gets max(the plan's CPUs, the machine's cores).
    """
    port = free_port()
    with ray_node("--head", f"--port={port}", "--num-cpus=8", "--num-gpus=0", "--include-dashboard=false"):
        yield f"127.0.0.1:{port}"


@pytest.fixture(scope="session")
def cosine_run(tiny_assets, shared_ray, tmp_path_factory) -> tuple[Path, dict]:
    """Output dir and summary of one run read by two tests: 4 rounds of 4 steps under a cosine schedule with warm-up,
    two ZeRO-2 shards, a checkpoint every 2 rounds, the student exported after every round (`COSINE`). The export
    test reads its exports; the resume test resumes a killed copy of it and compares."""
    out = tmp_path_factory.mktemp("cosine") / "run"
    return out, launch(checkpointed_overrides(tiny_assets, out, COSINE), ray_address=shared_ray)


def pytest_addoption(parser) -> None:
    parser.addoption(
        "--order",
        default="file",
        help="file (as collected), reverse, or shuffle:SEED: run the tests in another order, to check that none "
        "depends on what ran before it (no plugin needed)",
    )


OWN_RAY = ("tests/faults/test_actor_faults.py", "tests/faults/test_resume.py", "tests/test_served_teacher.py")
"""Modules with runs on a Ray of their own (launch.py's local `ray.init`, killed with the run): its dashboard agent
takes a fixed port (52365), so two at once would collide."""
WITH_OWN_RAY = (*OWN_RAY, "tests/test_exports.py")
"""Run one after another by `make test`'s two workers: the `OWN_RAY` modules, and test_exports.py, which reads
test_resume.py's uninterrupted run (`cosine_run`)."""


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`make test`'s two workers (pytest-xdist) take whole modules, so a module's fixtures are built once, by the
    worker that runs all its tests; the `WITH_OWN_RAY` modules are one unit between them. Units are handed out in
    the order of `pytest_collection_modifyitems` (`--no-loadscope-reorder`)."""
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::")[0]
            return "own-ray" if module in WITH_OWN_RAY else module

    return ByModule(config, log)


def pytest_collection_modifyitems(config, items: list) -> None:
    """Longest work first, so `make test`'s two workers end together: the integration tests, from the runs on a Ray
    of their own (the longest unit of work) to those that read the machine-cached sets (built meanwhile in the
    background), then the unit tests, many short modules that fill whichever worker frees first. `--order`
    reorders from there."""

    def rank(item) -> tuple[bool, bool, bool]:
        unit = item.get_closest_marker("integration") is None
        own = item.nodeid.split("::")[0] in OWN_RAY
        return unit, not own, any(f in MACHINE_SETS for f in item.fixturenames)

    items.sort(key=rank)
    order = config.getoption("--order")
    if order == "reverse":
        items.reverse()
    elif order.startswith("shuffle:"):
        random.Random(int(order.removeprefix("shuffle:"))).shuffle(items)
    elif order != "file":
        raise pytest.UsageError(f"--order={order}: expected file, reverse or shuffle:SEED")


def pytest_configure(config) -> None:
    """A worker of `make test` computes on one thread: two workers' torch thread pools on two cores, each waiting
    for a thread the other worker's process holds, made some unit tests 60 times slower."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
