"""Checkpoints and exports are durable and published whole (opd/checkpoint.py, pure filesystem)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from opd import checkpoint


def saved(out, round_: int, keep: int = 3):
    tmp = checkpoint.begin(out, round_)
    (tmp / "learner").mkdir()
    (tmp / "learner" / "state.pt").write_text("weights")
    return checkpoint.commit(tmp, {"round": round_}, keep)


def test_a_checkpoint_is_fsynced_file_by_file_and_directory_by_directory_before_its_rename(tmp_path, monkeypatch):
    synced, renamed = [], []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: renamed.append((str(a), len(synced))) or real_replace(a, b))
    final = saved(tmp_path, 2)
    tmp = str(final) + ".tmp"
    publish_at = dict(renamed)[tmp]
    before = set(synced[:publish_at])
    assert {f"{tmp}/learner/state.pt", f"{tmp}/{checkpoint.STATE}", f"{tmp}/learner", tmp} <= before
    assert str(final.parent) in synced[publish_at:]  # the rename itself made durable


def test_old_checkpoints_go_only_after_the_new_one_is_published(tmp_path, monkeypatch):
    for r in (1, 2):
        saved(tmp_path, r, keep=2)
    events = []
    real_replace, real_rmtree = os.replace, checkpoint.shutil.rmtree
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("publish", str(b))) or real_replace(a, b))
    monkeypatch.setattr(
        checkpoint.shutil, "rmtree", lambda p, **kw: events.append(("delete", str(p))) or real_rmtree(p, **kw)
    )
    saved(tmp_path, 3, keep=2)
    publish = events.index(("publish", str(tmp_path / "checkpoints" / "round_000003")))
    delete = events.index(("delete", str(tmp_path / "checkpoints" / "round_000001")))
    assert publish < delete
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["round_000002", "round_000003"]


def test_the_newest_checkpoint_that_loads_is_picked_and_a_broken_one_named(tmp_path):
    saved(tmp_path, 1)
    broken = saved(tmp_path, 2)
    (broken / checkpoint.STATE).write_text('{"round": 2, "hist')  # torn by a disk error
    empty = saved(tmp_path, 3)
    for f in (empty / "learner").iterdir():
        f.unlink()
    with pytest.warns(UserWarning) as caught:
        assert checkpoint.latest(tmp_path).name == "round_000001"
    reasons = [str(w.message) for w in caught]
    assert any("round_000003" in r and "learner's state is missing" in r for r in reasons)
    assert any("round_000002" in r and "does not load" in r for r in reasons)


# A save killed for real (SIGKILL, nothing flushed or cleaned up) at each point of its writing: the learner's files
# half written, the controller state written but nothing published, right after the rename that publishes it, while
# the oldest is pruned. `keep=1`, so the prune point deletes the only earlier checkpoint.
KILLED_SAVE = textwrap.dedent(
    """
    import os, shutil, signal, sys
    from opd import checkpoint
    out, point = sys.argv[1], sys.argv[2]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    def save(round_):
        tmp = checkpoint.begin(out, round_)
        (tmp / "learner").mkdir()
        with open(tmp / "learner" / "state.pt", "w") as f:
            f.write("weights")
            if round_ == 2 and point == "learner":
                f.flush()
                die()
        if round_ == 2 and point == "state":
            checkpoint.publish = lambda staged, final: die()
        if round_ == 2 and point == "rename":
            replace = os.replace
            os.replace = lambda a, b: (replace(a, b), die())
        if round_ == 2 and point == "prune":
            rmtree = shutil.rmtree
            shutil.rmtree = lambda p, **kw: die() if "round_000001" in str(p) else rmtree(p, **kw)
        checkpoint.commit(tmp, {"round": round_}, keep=1)
    save(1)
    save(2)
    """
)


@pytest.mark.parametrize(("point", "survivor"), [("learner", 1), ("state", 1), ("rename", 2), ("prune", 2)])
def test_a_save_killed_at_any_point_leaves_a_checkpoint_that_loads(tmp_path, point, survivor):
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(tmp_path), point], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr  # it died at the point, not before or after
    found = checkpoint.latest(tmp_path)
    assert found is not None and checkpoint.load(found)["round"] == survivor
    checkpoint.begin(tmp_path, 3)  # the next save clears what the killed one left half-written
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "round_000002.tmp" not in left and found.name in left


def test_begin_clears_every_stale_tmp(tmp_path):
    for r in (4, 7):
        (tmp_path / "checkpoints" / f"round_{r:06d}.tmp" / "learner").mkdir(parents=True)
    tmp = checkpoint.begin(tmp_path, 9)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [tmp.name]


def test_an_export_replaces_the_old_one_whole(tmp_path):
    final = tmp_path / "student"
    for version in ("old", "new"):
        staged = tmp_path / "student.tmp"
        staged.mkdir()
        (staged / "model.safetensors").write_text(version)
        checkpoint.publish(staged, final)
        assert (final / "model.safetensors").read_text() == version
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]


def test_resume_refuses_a_changed_prompt_file_or_batch_shape_before_starting_anything(tiny_assets, tmp_path):
    import subprocess
    import sys

    from opd.config import load_config
    from opd.provenance import StudentCard
    from tests.stack import ROOT

    out = tmp_path / "run"
    base = [
        f"student.model={tiny_assets['student']}",
        f"teachers.0.model={tiny_assets['teacher']}",
        f"data.eval={tiny_assets['eval']}",
        f"output_dir={out}",
    ]
    cfg = load_config("default", [*base, f"data.train={tiny_assets['train']}"])
    card = StudentCard(cfg, "s", {}, {"train": str(tiny_assets["train"])}, "then")
    tmp = checkpoint.begin(out, 2)
    (tmp / "learner").mkdir()
    (tmp / "learner" / "state.pt").write_text("weights")
    checkpoint.commit(tmp, {"round": 2, "inputs": card.inputs()}, keep=2)

    edited = tmp_path / "train.jsonl"
    edited.write_text("".join(tiny_assets["train"].read_text().splitlines(keepends=True)[1:]))  # one row fewer
    cases = [
        ([f"data.train={edited}"], "the train prompt file's sha256: "),
        ([f"data.train={tiny_assets['train']}", "rollout.prompts_per_round=32"], "rollout.prompts_per_round: 64 -> 32"),
    ]
    for extra, change in cases:
        cmd = [sys.executable, "launch.py", *base, *extra, "resume=auto"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and f"cannot resume from {out}/checkpoints/round_000002" in proc.stderr
        assert change in proc.stderr and "Started a local Ray" not in proc.stdout + proc.stderr, proc.stderr[-2000:]
