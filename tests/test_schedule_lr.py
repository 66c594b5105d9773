"""learner.lr_schedule: `lr_at` against its definition, the LambdaLR the learner builds from it, the config checks."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from opd.config import ConfigError, load_config
from opd.learner.lr_schedule import lr_at, lr_factor

LR, TOTAL = 0.1, 11


def test_constant_without_warmup_is_the_lr_at_every_step():
    assert [lr_at(s, LR, TOTAL, "constant") for s in range(TOTAL)] == [LR] * TOTAL


def test_warmup_rises_linearly_from_zero_and_reaches_the_lr_at_step_warmup_steps():
    got = [lr_at(s, LR, TOTAL, "constant", warmup_steps=4) for s in range(TOTAL)]
    assert got[:5] == pytest.approx([LR * (s + 1) / 5 for s in range(5)])
    assert got[4:] == [LR] * (TOTAL - 4)


@pytest.mark.parametrize("ratio", [0.0, 0.1, 1.0])
def test_linear_falls_evenly_from_the_lr_to_the_floor_at_the_last_step(ratio):
    got = [lr_at(s, LR, TOTAL, "linear", warmup_steps=1, min_lr_ratio=ratio) for s in range(TOTAL)]
    assert got[0] == pytest.approx(LR / 2)
    decay = [LR * (ratio + (1 - ratio) * (1 - (s - 1) / (TOTAL - 2))) for s in range(1, TOTAL)]
    assert got[1:] == pytest.approx(decay)
    assert got[1] == pytest.approx(LR) and got[-1] == pytest.approx(LR * ratio)


@pytest.mark.parametrize("ratio", [0.0, 0.25])
def test_cosine_follows_half_a_cosine_from_the_lr_to_the_floor(ratio):
    warmup = 3
    got = [lr_at(s, LR, TOTAL, "cosine", warmup_steps=warmup, min_lr_ratio=ratio) for s in range(TOTAL)]
    span = TOTAL - 1 - warmup
    expected = [LR * (s + 1) / (warmup + 1) for s in range(warmup)]
    expected += [
        LR * (ratio + (1 - ratio) * (1 + math.cos(math.pi * (s - warmup) / span)) / 2) for s in range(warmup, TOTAL)
    ]
    assert got == pytest.approx(expected)
    assert got[warmup] == pytest.approx(LR) and got[-1] == pytest.approx(LR * ratio)
    assert all(a >= b for a, b in zip(got[warmup:-1], got[warmup + 1 :], strict=True))


def test_no_room_to_decay_keeps_the_peak_and_steps_past_the_end_stay_at_the_floor():
    assert lr_at(0, LR, 1, "cosine") == LR  # a one-step run: no decay span
    assert lr_at(2, LR, 3, "cosine", warmup_steps=2) == LR
    assert lr_at(50, LR, TOTAL, "linear", min_lr_ratio=0.2) == pytest.approx(LR * 0.2)


def test_an_unknown_schedule_is_named():
    with pytest.raises(ValueError, match=r"'step'.*constant, linear, cosine"):
        lr_factor(0, TOTAL, "step")


@pytest.mark.parametrize(("schedule", "warmup"), [("constant", 0), ("cosine", 2), ("linear", 0)])
def test_lambda_lr_as_the_learner_builds_it_gives_lr_at_bit_for_bit(schedule, warmup):
    """What the shard hands DeepSpeed: LambdaLR over `lr_factor`, stepped after each optimizer step."""
    param = torch.nn.Parameter(torch.zeros(1))
    optim = torch.optim.AdamW([param], lr=LR)
    factor = partial(lr_factor, total_steps=TOTAL, schedule=schedule, warmup_steps=warmup, min_lr_ratio=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optim, factor)
    seen = []
    for _ in range(TOTAL):
        seen.append(optim.param_groups[0]["lr"])
        optim.step()
        scheduler.step()
    assert seen == [lr_at(s, LR, TOTAL, schedule, warmup, 0.1) for s in range(TOTAL)]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("learner.warmup_steps=-1", "learner.warmup_steps"),
        ("learner.min_lr_ratio=-0.1", "learner.min_lr_ratio"),
        ("learner.min_lr_ratio=1.5", "learner.min_lr_ratio"),
        ("learner.lr_schedule=step", "learner.lr_schedule"),
        ("checkpoint.export_every=-2", "checkpoint.export_every"),
    ],
)
def test_bad_schedule_and_export_keys_are_refused_by_name(tiny_assets, override, key):
    data = [f"data.train={tiny_assets['train']}", f"data.eval={tiny_assets['eval']}"]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("default", [*data, override])


def test_the_schema_default_is_constant_without_warmup_and_no_exports():
    """The schema's (conf/default.yaml, the demo, chooses a cosine schedule for itself)."""
    from opd.config.training import CheckpointConfig, LearnerConfig

    learner = LearnerConfig()
    assert (learner.lr_schedule, learner.warmup_steps, learner.min_lr_ratio) == ("constant", 0, 0.0)
    assert CheckpointConfig().export_every == 0
