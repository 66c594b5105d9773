"""Named training objectives: each turns (student logits, batch) into a loss.

The learner is algorithm-blind: it computes logits and calls the objective named by
`loss.type`. Objectives only combine the pure functions in `opd.losses`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from opd import losses
from opd.registry import Registry

Objective = Callable[[torch.Tensor, dict[str, torch.Tensor], object, float], tuple[torch.Tensor, dict[str, float]]]
OBJECTIVES: Registry[Objective] = Registry("loss.type")


def _targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return batch["input_ids"][:, 1:]


def _mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float((x * mask).sum() / mask.sum().clamp(min=1))


@OBJECTIVES.register("reverse_kl")
def reverse_kl(logits, batch, cfg, temperature):
    """On-policy distillation: per-token reverse KL to the teacher as the advantage of an IS policy gradient."""
    mask = batch["mask"]
    logprobs = losses.token_logprobs(logits, _targets(batch), temperature)
    adv = losses.reverse_kl_advantage(batch["teacher_logprobs"], batch["old_logprobs"], mask)
    metrics = {"reverse_kl": -_mean(adv, mask)}
    if "advantage_bonus" in batch:  # judge scores mixed into the advantage
        adv = adv + batch["advantage_bonus"]
    loss, pg = losses.policy_gradient_loss(logprobs, batch["old_logprobs"], adv, mask, cfg.is_cap)
    metrics |= pg
    return loss, metrics


def _topk_student_logits(logits: torch.Tensor, batch: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    """Student logits at the teacher's top-k ids; padded slots get -inf like the teacher's."""
    gathered = (logits / temperature).gather(-1, batch["topk_ids"])
    return gathered.masked_fill(torch.isinf(batch["topk_logprobs"]), float("-inf"))


@OBJECTIVES.register("jsd")
def jsd(logits, batch, cfg, temperature):
    """Generalized JSD (GKD) between student and teacher, renormalised over the teacher's top-k."""
    mask = batch["mask"]
    student = _topk_student_logits(logits, batch, temperature)
    loss = losses.generalized_jsd(student, batch["topk_logprobs"], cfg.beta, 1.0, mask)
    return loss, {"jsd": float(loss.detach())}


@OBJECTIVES.register("topk_kl")
def topk_kl(logits, batch, cfg, temperature):
    """Forward KL on the teacher's top-k with the remaining mass in one bucket."""
    loss = losses.topk_kl(logits / temperature, batch["topk_ids"], batch["topk_logprobs"], batch["mask"])
    return loss, {"topk_kl": float(loss.detach())}


@OBJECTIVES.register("sft")
def sft(logits, batch, cfg, temperature):
    """Cross-entropy on teacher-written tokens (offline KD, corrections)."""
    loss = losses.sft_on_teacher(logits, _targets(batch), batch["mask"])
    return loss, {"sft_nll": float(loss.detach())}


def with_corrections(
    loss: torch.Tensor, metrics: dict[str, float], logits: torch.Tensor, batch: dict[str, torch.Tensor], weight: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Add cross-entropy on teacher-corrected tokens to a distillation loss, as one token-weighted mean.

    The distillation loss is a mean over the student's own tokens (`mask`), SFT a mean over the teacher's
    (`sft_mask`); each is weighted by its share of the micro-batch's tokens, SFT also by `weight`, so a
    batch with few corrections is not dominated by them.
    """
    if "sft_mask" not in batch:
        return loss, metrics
    own, fixed = batch["mask"].sum(), batch["sft_mask"].sum()
    sft = losses.sft_on_teacher(logits, _targets(batch), batch["sft_mask"])
    total = (loss * own + weight * sft * fixed) / (own + fixed).clamp(min=1)
    return total, {**metrics, "correction_sft_nll": float(sft.detach())}
