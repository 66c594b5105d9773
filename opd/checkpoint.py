"""Checkpoint directories: written atomically, found by round, pruned (pure filesystem, no Ray).

A checkpoint is `<output_dir>/checkpoints/round_000012/` holding the learner's DeepSpeed state
(`learner/`), the replay buffer (`buffer/`, one safetensors file per shard), the async pipeline's samples
generated ahead (`ahead.safetensors`) and the controller's state (`controller.json`). It is
written under a `.tmp` name and renamed when complete, so a crash mid-write leaves a `.tmp`
directory that is never picked (and is cleared by the next save).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

_NAME = re.compile(r"^round_(\d{6})$")
STATE = "controller.json"


def root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None."""
    found = [p for p in root(output_dir).glob("round_*") if _NAME.match(p.name) and (p / STATE).is_file()]
    return max(found, key=lambda p: int(_NAME.match(p.name).group(1)), default=None)


def begin(output_dir: str | Path, round_: int) -> Path:
    """A fresh temporary directory for the checkpoint of `round_` (a leftover from a crash is removed)."""
    tmp = root(output_dir) / f"round_{round_:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, state: dict, keep: int) -> Path:
    """Write the controller state into `tmp` (whose other files are written), rename it complete, prune old ones."""
    with open(tmp / STATE, "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    final = tmp.with_name(tmp.name.removesuffix(".tmp"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    done = sorted(p for p in root(final.parent.parent).glob("round_*") if _NAME.match(p.name))
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


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
