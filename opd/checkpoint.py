"""Checkpoint directories: written atomically, found by round, pruned (pure filesystem, no Ray).

A checkpoint is `<output_dir>/checkpoints/round_000012/` holding the learner's DeepSpeed state
(`learner/`), the replay buffer (`buffer/`, one safetensors file per shard), the async pipeline's samples
generated ahead (`ahead.safetensors`) and the controller's state (`controller.json`). It is
written under a `.tmp` name, every file and directory in it fsynced, and only then renamed (and the rename
fsynced): a crash mid-write leaves a `.tmp` directory that is never picked (and is cleared by the next save), and
a power loss after the rename cannot leave a published checkpoint with missing bytes. Older checkpoints are
deleted only after that. A checkpoint that does not load anyway (a disk error, a hand edit) is skipped, with
the reason, for the newest one that does. Student exports are published the same way (`publish`).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path

_NAME = re.compile(r"^round_(\d{6})$")
STATE = "controller.json"
RESUME_KEYS = (
    "seed",
    "mode",
    "student.model",
    "data.prompt_key",
    "data.answer_key",
    "data.chat_template",
    "data.system_prompt",
    "rollout.prompts_per_round",
    "rollout.samples_per_prompt",
    "rollout.max_new_tokens",
    "learner.num_shards",
    "learner.zero_stage",
    "learner.mini_batches",
    "learner.micro_batch_size",
    "buffer.num_shards",
    "pipeline.mode",
    "pipeline.depth",
)
"""Config keys a resumed run must share with its checkpoint: they set the order prompts are drawn in, the shapes of
batches and of the saved optimizer and buffer state. The rest (learning rate, rounds, eval, logging) may change."""


def root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest(output_dir: str | Path) -> Path | None:
    """The newest checkpoint of a run directory that loads, or None; newer ones that do not are skipped, saying
    which and why."""
    found = [p for p in root(output_dir).glob("round_*") if _NAME.match(p.name) and (p / STATE).is_file()]
    for path in sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)), reverse=True):
        problem = unreadable(path)
        if problem is None:
            return path
        warnings.warn(f"skipping checkpoint {path}: {problem}", stacklevel=2)
    return None


def unreadable(path: Path) -> str | None:
    """Why a published checkpoint cannot be resumed from, or None when it can."""
    try:
        state = load(path)
    except (OSError, ValueError) as err:
        return f"{STATE} does not load ({err})"
    if not isinstance(state, dict) or "round" not in state:
        return f"{STATE} holds no round"
    learner = path / "learner"
    if not learner.is_dir() or not any(learner.iterdir()):
        return "the learner's state is missing"
    return None


def begin(output_dir: str | Path, round_: int) -> Path:
    """A fresh temporary directory for the checkpoint of `round_`; every `.tmp` a crash left is removed."""
    for stale in root(output_dir).glob("round_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root(output_dir) / f"round_{round_:06d}.tmp"
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, state: dict, keep: int) -> Path:
    """Write the controller state into `tmp` (whose other files are written), make it all durable, rename it
    complete, and only then prune old ones."""
    with open(tmp / STATE, "w") as f:
        json.dump(state, f)
    final = tmp.with_name(tmp.name.removesuffix(".tmp"))
    shutil.rmtree(final, ignore_errors=True)
    publish(tmp, final)
    done = sorted(p for p in root(final.parent.parent).glob("round_*") if _NAME.match(p.name))
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def publish(staged: Path, final: Path) -> None:
    """Move a fully written directory to `final`, durably: its files and directories fsynced first, the rename
    fsynced after. A directory already at `final` (an earlier export) is replaced only once the new one is in place:
    a crash in between leaves the old one as `final.old`, never a half-written one at `final`."""
    sync_tree(staged)
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staged, final)
    _fsync(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def sync_tree(path: Path) -> None:
    """fsync every file and directory under `path`, then `path` itself."""
    for directory, _, files in os.walk(path):
        for name in files:
            _fsync(Path(directory) / name)
        _fsync(Path(directory))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(path: Path) -> dict:
    """The controller state (`commit`) of a complete checkpoint."""
    return json.loads((path / STATE).read_text())


def rng_state(rng: random.Random) -> list:
    """`random.Random` state as JSON (tuples become lists)."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_rng_state(rng: random.Random, state: list) -> None:
    version, internal, gauss = state
    rng.setstate((version, tuple(internal), gauss))


def resume_point(resume: str | None, output_dir: str) -> Path | None:
    """Which checkpoint `resume=` names: auto (newest in output_dir, if any) or a run directory's newest."""
    if resume is None:
        return None
    found = latest(output_dir if resume == "auto" else resume)
    if found is None and resume != "auto":
        raise FileNotFoundError(f"resume={resume}: no complete checkpoint under {root(resume)}")
    return found


def fingerprint(config: dict, data_hashes: dict[str, str]) -> dict:
    """What `RESUME_KEYS` and the prompt files were when a checkpoint was written (stored in it as `inputs`)."""
    from opd.sweep import flat

    values = flat(config)
    return {"config": {k: values.get(k) for k in RESUME_KEYS}, "data": dict(data_hashes)}


def changes(saved: dict | None, current: dict) -> list[str]:
    """How `current` differs from a checkpoint's `inputs` (`fingerprint`), each as `what: then -> now`."""
    if not saved:
        return []
    out = [
        f"{key}: {saved['config'].get(key)!r} -> {value!r}"
        for key, value in current["config"].items()
        if key in saved["config"] and saved["config"][key] != value
    ]
    for role, sha in current["data"].items():
        if role in saved["data"] and saved["data"][role] != sha:
            out.append(f"the {role} prompt file's sha256: {saved['data'][role][:12]}... -> {sha[:12]}...")
    return out
