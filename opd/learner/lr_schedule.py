"""The learning rate of each optimizer step (`learner.lr_schedule`), as a pure function of the step.

Torch-free so the schedule is tested against its definition alone; the learner shard applies it through a
torch `LambdaLR` handed to DeepSpeed, which steps it after every optimizer step and saves it in checkpoints.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(step: int, total_steps: int, schedule: str, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> float:
    """The multiplier of `learner.lr` at optimizer step `step` (0-based) of a run of `total_steps` steps.

    Warm-up rises linearly from 0: step s < warmup_steps gets (s + 1) / (warmup_steps + 1), so no step is wasted
    at lr 0 and step `warmup_steps` is the first at the full lr. Then `constant` stays at 1; `linear` and `cosine`
    fall from 1 to `min_lr_ratio`, which the last step (total_steps - 1) reaches exactly.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    decay_steps = total_steps - 1 - warmup_steps
    progress = min(1.0, (step - warmup_steps) / decay_steps) if decay_steps > 0 else 0.0
    shape = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def lr_at(
    step: int, lr: float, total_steps: int, schedule: str, warmup_steps: int = 0, min_lr_ratio: float = 0.0
) -> float:
    """The learning rate of optimizer step `step` (0-based): `lr` x `lr_factor`, as LambdaLR computes it."""
    return lr * lr_factor(step, total_steps, schedule, warmup_steps, min_lr_ratio)
