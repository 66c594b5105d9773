"""Kill a run mid-way (the whole process group, as a lost node would), resume it, and get the same student.

Rounds are seeded by policy version and the controller's RNG, DeepSpeed restores optimizer state
exactly, and vLLM samples per request seed, so resume-after-kill must match an uninterrupted run.

One scenario kills a run for real. The others need only what such a kill leaves on disk, so they take it without a
third run: the uninterrupted run is stopped (SIGSTOP) once the checkpoint is saved, its output directory copied as
it stands (what a SIGKILL at that moment would leave: nothing the stopped driver has not written reaches the disk),
and continued; the copy is resumed. Two runs a scenario instead of three.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from opd import checkpoint
from opd.buffer import spill
from tests.stack import COSINE, killed_while_saving, launch, run_with_fault, start
from tests.stack import checkpointed_overrides as overrides

pytestmark = pytest.mark.integration

VARYING = ("_s", "per_s", "idle_fraction", "wandb")  # timings differ between runs; everything else must not


# The async variant checkpoints a buffer that is not empty: each round trains on the 32 of its 64 samples the
# teacher disagrees with most; the rest wait in two buffer shards (at most 2 versions old) and go in the checkpoint.
# One optimizer step a round, so a round's samples are 1 version old and the ones left over 2. The teachers'
# feedback (scores, verdicts, corrections) on the next round runs on a thread while a round learns, so the
# checkpoint also holds that round, scored, and the one after it, generated.
ASYNC_SHARDED = (
    "pipeline.mode=async",
    "learner.mini_batches=1",
    "buffer.num_shards=2",
    "buffer.order=disagreement",
    "buffer.train_per_round=32",
    "buffer.max_staleness=2",
    "judge.kind=verifier",
    "correction.enabled=true",
    "correction.outside_top_k=false",
    "correction.threshold=-6",
)


def killed_while_checkpointing(args: list[str], out: Path, round_: int) -> None:
    """Run launch.py and kill it whole while the checkpoint of `round_` is being written (tests/test_checkpoint.py
    kills a save at each of its points; this is the whole stack)."""
    with open(out.parent / f"{out.name}-killed.log", "w") as log:
        killed_while_saving(start(args, stdout=log, stderr=subprocess.STDOUT), out, round_)


def copied_after_checkpoint(args: list[str], out: Path, round_: int, copy: Path) -> dict:
    """Run launch.py to the end, copying its output directory to `copy` while the driver is stopped right after
    `round_` is saved (the state a kill then would leave); returns the finished run's summary."""
    summary, _ = run_with_fault(args, out, lambda sid: shutil.copytree(out, copy, symlinks=True), round_)
    return summary


def weights(path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


def comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not any(x in k for x in VARYING) and not isinstance(v, list)}


def lists(row: dict) -> dict:
    """Histogram values (correction positions): compared exactly, since approx does not take nested lists."""
    return {k: v for k, v in row.items() if isinstance(v, list)}


def test_resume_after_kill_matches_an_uninterrupted_run(cosine_run, tiny_assets, tmp_path, shared_ray):
    """The whole run is killed for real while it writes its round-4 checkpoint, and resumes from round 2's. Under a
    cosine schedule that moves the lr at every step, so the resumed run must also pick the schedule up at the
    checkpoint's step; every round's student is exported (conftest's `cosine_run`, the uninterrupted run, is shared
    with the export test)."""
    _, straight = cosine_run
    lrs = [r["learner/lr"] for r in straight["rounds"][1:]]  # 4 rounds of 4 steps: warm-up, then decay
    assert lrs[1] > lrs[2] > lrs[3] and lrs[0] < lrs[1]  # learner/lr is compared with the rest below

    out = tmp_path / "crashed"
    killed_while_checkpointing(overrides(tiny_assets, out, COSINE), out, round_=4)
    assert checkpoint.latest(out).name == "round_000002"  # the half-written round 4 is never picked
    resumed = launch([*overrides(tiny_assets, out, COSINE), "resume=auto"], ray_address=shared_ray)
    assert_resumed_like_straight(straight, resumed, out, kept=["round_000002", "round_000004"])
    assert not list((out / "checkpoints").glob("*.tmp"))  # the resumed run's first save cleared it


def test_async_sharded_buffer_is_checkpointed_with_its_waiting_samples_and_resumes_exactly(
    tiny_assets, tmp_path, shared_ray
):
    out, copy = tmp_path / "run", tmp_path / "copy"
    args = [*overrides(tiny_assets, out, ASYNC_SHARDED), f"ray.address={shared_ray}"]
    straight = copied_after_checkpoint(args, out, 2, copy)
    saved = copy / "checkpoints" / "round_000002"
    waiting = [spill.load(f) for f in sorted((saved / "buffer").glob("shard_*.safetensors"))]
    assert len(waiting) == 2 and sum(map(len, waiting)) > 0
    ahead, generated = spill.load(saved / "ahead.safetensors"), spill.load(saved / "generated.safetensors")
    assert len(ahead) == len(generated) == 64
    assert all(s.teacher_logprobs is not None and s.judge_score is not None for s in ahead)
    assert all(s.teacher_logprobs is None for s in generated)
    assert {s.version for s in ahead} == {1} and {s.version for s in generated} == {2}
    for r in straight["rounds"][1:]:  # each step trains on 32 samples, counted by the lag they were used at
        assert sum(v for k, v in r.items() if k.startswith("buffer/used_at_lag_")) == 32
        assert r["correction/rate"] > 0 and r["judge/scored_fraction"] == 1
    resumed = launch([*overrides(tiny_assets, copy, ASYNC_SHARDED), "resume=auto"], ray_address=shared_ray)
    assert_resumed_like_straight(straight, resumed, copy, kept=["round_000002", "round_000004"])


# pipeline.depth=2: generation runs two rounds ahead of learning, so a checkpoint holds the next round scored
# and the two after it generated (one with each of the last two versions), and samples are two versions old.
ASYNC_DEEP = ("pipeline.mode=async", "pipeline.depth=2", "learner.mini_batches=1", "buffer.max_staleness=2", "rounds=5")


def test_async_depth_two_trains_two_rounds_behind_and_resumes_exactly(tiny_assets, tmp_path, shared_ray):
    out, copy = tmp_path / "run", tmp_path / "copy"
    args = [*overrides(tiny_assets, out, ASYNC_DEEP), f"ray.address={shared_ray}"]
    straight = copied_after_checkpoint(args, out, 2, copy)
    used = [{k: v for k, v in r.items() if k.startswith("buffer/used_at_lag_")} for r in straight["rounds"][1:]]
    # round 1 is generated in turn, rounds 2 and 3 before the first sync, the rest two syncs before they learn
    lags = [0, 1, 2, 2, 2]
    assert used == [{f"buffer/used_at_lag_{lag}": 64.0} for lag in lags]

    saved = copy / "checkpoints" / "round_000002"
    ahead, generated = spill.load(saved / "ahead.safetensors"), spill.load(saved / "generated.safetensors")
    assert [s.version for s in ahead] == [0] * 64 and all(s.teacher_logprobs is not None for s in ahead)
    assert [s.version for s in generated] == [1] * 64 + [2] * 64  # rounds 4 and 5, unscored
    assert all(s.teacher_logprobs is None for s in generated)
    state = json.loads((saved / "controller.json").read_text())
    assert [len(prompts) for prompts in state["generated"]] == [16, 16]

    resumed = launch([*overrides(tiny_assets, copy, ASYNC_DEEP), "resume=auto"], ray_address=shared_ray)
    assert_resumed_like_straight(straight, resumed, copy, kept=["round_000004", "round_000005"])


def assert_resumed_like_straight(straight: dict, resumed: dict, out: Path, kept: list[str]) -> None:
    """Metrics continue where the checkpoint stopped, every round once and equal to the straight run's, and the
    final student is the same to float rounding."""
    import torch

    assert [r["round"] for r in resumed["rounds"]] == [r["round"] for r in straight["rounds"]]
    for a, b in zip(straight["rounds"], resumed["rounds"], strict=True):
        assert comparable(a) == pytest.approx(comparable(b), rel=1e-5, abs=1e-6), (a["round"], a, b)
        assert lists(a) == lists(b)
    a, b = weights(straight["final"]["student_path"]), weights(resumed["final"]["student_path"])
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff <= 1e-6, f"resumed student differs from the uninterrupted one by {diff}"
    assert all(torch.isfinite(t).all() for t in b.values())
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == kept
    assert json.loads((out / "summary.json").read_text())["final"] == resumed["final"]
