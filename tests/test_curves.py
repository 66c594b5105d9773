"""Learning curves (opd/curves.py): the points they plot and the PNG every run leaves in its output_dir."""

from __future__ import annotations

from opd import curves
from opd.monitoring import Monitor

HISTORY = [
    {"round": 0, "eval/student_accuracy": 0.1, "eval/reverse_kl": 1.5, "eval/teacher_accuracy": 1.0},
    {"round": 1, "train/teacher_tokens": 100.0, "train/reverse_kl": 1.2},
    {
        "round": 2,
        "train/teacher_tokens": 210.0,
        "train/reverse_kl": 1.0,
        "eval/student_accuracy": 0.4,
        "eval/reverse_kl": 0.9,
    },
]


def test_points_follow_rounds_or_teacher_tokens_and_the_first_eval_sits_at_zero():
    assert curves.points(HISTORY, curves.ACCURACY) == ([0, 2], [0.1, 0.4])
    assert curves.points(HISTORY, curves.ACCURACY, x=curves.TEACHER_TOKENS) == ([0.0, 210.0], [0.1, 0.4])
    assert curves.points(HISTORY, curves.KL, prefix="train/") == ([1, 2], [1.2, 1.0])


def test_named_eval_sets_each_get_their_curve():
    history = [{"round": 0, "eval/gsm/student_accuracy": 0.2, "eval/math/student_accuracy": 0.1}]
    assert curves.eval_prefixes(history) == ["eval/gsm/", "eval/math/"]
    assert curves.eval_prefixes([{"round": 0}]) == ["eval/"]


def test_a_finished_run_leaves_curves_png_in_its_output_dir(tmp_path):
    monitor = Monitor(str(tmp_path), {}, "disabled", "p", None, None, history=HISTORY)
    summary = monitor.finish({"teacher_accuracy": 1.0})
    png = tmp_path / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert summary["rounds"] == HISTORY


def test_several_runs_against_teacher_tokens_in_one_plot(tmp_path):
    fig = curves.plot({"a": HISTORY, "b": HISTORY[:1]}, tmp_path / "both.png", x=curves.TEACHER_TOKENS)
    accuracy, kl = fig.axes
    assert [line.get_label() for line in accuracy.lines] == ["a", "b"]
    assert accuracy.get_xlabel() == "teacher tokens"
    assert len(kl.lines) == 3  # a's and b's held-out KL, a's on-policy KL (b has none)


def test_an_online_run_whose_wandb_cannot_start_stops_with_the_reason(tmp_path, monkeypatch):
    """Asked to be watched in W&B, a run does not go on unwatched; offline, W&B trouble only warns."""
    import pytest

    from opd.monitoring import MonitorError

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login either
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    with pytest.raises(MonitorError, match=r"wandb.mode=online, but W&B could not start \(UsageError: No API key"):
        Monitor(str(tmp_path / "run"), {}, "online", "p", None, None, entity="team", tags=["a"])
