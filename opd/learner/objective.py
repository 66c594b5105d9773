"""Named training objectives: each turns (student logits, batch) into a loss.

The learner is algorithm-blind: it computes logits and calls the objective named by
`loss.type`. Objectives only combine the pure functions in `opd.losses`. Each implements a name
declared, torch-free, in `opd.learner.loss_types` (which config validation reads).

An objective is written as token sums (`Sums`): every loss and metric is a token mean, and sums over chunks of
positions add up, so the same code scores a whole micro-batch at once or chunk by chunk (opd/learner/chunked.py,
`learner.loss_chunk_tokens`) without a full-vocabulary tensor for the whole micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from opd import losses
from opd.learner.loss_types import LOSS_TYPES
from opd.registry import Registry

Sums = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""Name -> (sum of value x weight, sum of weight) over the positions scored; "loss" carries the gradient."""
Terms = Callable[[torch.Tensor, dict[str, torch.Tensor], object, float], Sums]
Objective = Callable[[torch.Tensor, dict[str, torch.Tensor], object, float], tuple[torch.Tensor, dict[str, float]]]
TERMS: Registry[Terms] = Registry("loss.type")
OBJECTIVES: Registry[Objective] = Registry("loss.type")
CORRECTION = "correction_sft_nll"
"""The corrections' cross-entropy among the sums (over `sft_mask`)."""


def implements(name: str) -> Callable[[Terms], Terms]:
    """Register the objective of a declared loss type; an undeclared name fails here, listing the declared ones."""
    LOSS_TYPES.get(name)

    def register(terms: Terms) -> Terms:
        TERMS.register(name)(terms)
        OBJECTIVES.register(name)(lambda logits, batch, cfg, temperature: means(terms(logits, batch, cfg, temperature)))
        return terms

    return register


def means(sums: Sums) -> tuple[torch.Tensor, dict[str, float]]:
    """Sums -> (loss, metrics) as token means; a denominator under 1 counts as 1 (as `losses.masked_mean`)."""
    mean = {k: total / weight.clamp(min=1.0) for k, (total, weight) in sums.items()}
    return mean.pop("loss"), {k: float(v.detach()) for k, v in mean.items()}


def micro_batch_sums(logits: torch.Tensor, batch: dict[str, torch.Tensor], cfg, temperature: float) -> Sums:
    """The sums of `loss.type` (`cfg`) and, where the batch has corrections, their cross-entropy."""
    sums = TERMS.get(cfg.type)(logits, batch, cfg, temperature)
    if "sft_mask" in batch:
        sums[CORRECTION] = losses.masked_sums(
            losses.sft_per_token(logits, _targets(batch), batch["sft_mask"]), batch["sft_mask"]
        )
    return sums


def finish(sums: Sums, batch: dict[str, torch.Tensor], sft_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """A micro-batch's loss and metrics from its sums: the objective's, with the corrections' folded in."""
    sums = dict(sums)
    correction = sums.pop(CORRECTION, None)
    loss, metrics = means(sums)
    if correction is None:
        return loss, metrics
    return _with_sft(loss, metrics, correction[0] / correction[1].clamp(min=1.0), batch, sft_weight)


def _targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return batch["input_ids"][:, 1:]


def _sums(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Metric sums: detached."""
    total, weight = losses.masked_sums(x.detach(), mask)
    return total.detach(), weight


@implements("reverse_kl")
def reverse_kl(logits, batch, cfg, temperature):
    """On-policy distillation: per-token reverse KL to the teacher as the advantage of an IS policy gradient."""
    mask = batch["mask"]
    logprobs = losses.token_logprobs(logits, _targets(batch), temperature)
    # The per-token reward, on the student's own tokens; the sample's weight scales its loss once, below.
    own = (mask > 0).float()
    adv = losses.reverse_kl_advantage(batch["teacher_logprobs"], batch["old_logprobs"], own)
    sums = {"reverse_kl": _sums(-adv, mask)}
    if "advantages" in batch:  # discounted, baselined or normalised on the driver (opd/advantages.py)
        adv = batch["advantages"] * own
    if cfg.baseline == "optimal":  # needs the student's distribution: here, not on the driver
        baseline = losses.optimal_reverse_kl_baseline(
            losses.tempered(logits, temperature), batch["topk_ids"], batch["topk_logprobs"]
        )
        adv = adv - baseline * own
    if "advantage_bonus" in batch:  # judge scores mixed into the advantage
        adv = adv + batch["advantage_bonus"]
    per_token, w, clipped = losses.policy_gradient_per_token(logprobs, batch["old_logprobs"], adv, cfg.is_cap)
    return sums | {
        "loss": losses.masked_sums(per_token, mask),
        "is_weight_mean": _sums(w, mask),
        "is_clipped_frac": _sums(clipped, mask),
        "sampler_learner_logprob_gap": _gap(logprobs, batch),
    }


def _gap(own: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean |learner log-prob - sampler log-prob| over the sampled tokens: the weight-sync check.

    Before the learner's first update of a round this is ~1e-7 when the rollout engines hold exactly the
    learner's weights, so a stale or corrupted sync shows up at once (the controller logs the first mini-batch's).
    """
    return _sums((own.detach() - batch["old_logprobs"]).abs(), batch["mask"])


def _off_policy_mask(logits, batch, cfg, temperature) -> tuple[torch.Tensor, Sums]:
    """The token mask weighted by truncated importance ratios learner/sampler (capped at `loss.is_cap`).

    Samples generated by an older policy (async pipeline) are reweighted towards the learner's own
    distribution; on policy the ratio is 1 (to ~1e-7), so this is a no-op there. The same log-probs give
    the weight-sync check.
    """
    with torch.no_grad():
        own = losses.token_logprobs(logits, _targets(batch), temperature)
        ratio = torch.exp(own - batch["old_logprobs"])
        weight = ratio.clamp(max=cfg.is_cap)
    mask = batch["mask"] * weight
    return mask, {
        "is_weight_mean": _sums(weight, batch["mask"]),
        "is_clipped_frac": _sums((ratio > cfg.is_cap).float(), batch["mask"]),
        "sampler_learner_logprob_gap": _gap(own, batch),
    }


@implements("jsd")
def jsd(logits, batch, cfg, temperature):
    """Generalized JSD (GKD) between student and teacher over the teacher's top-k ids plus the rest of the mass, or
    with `loss.tail=sampled` (beta=1) the full-vocabulary reverse KL, its part off the top-k sampled."""
    mask, sums = _off_policy_mask(logits, batch, cfg, temperature)
    scaled = losses.tempered(logits, temperature)
    if cfg.tail == "sampled":  # beta=1 (config checks it): the full-vocabulary reverse KL, its tail sampled
        per_token, _ = losses.reverse_kl_sampled_tail_per_token(
            scaled, batch["topk_ids"], batch["topk_logprobs"], _targets(batch), batch["teacher_logprobs"]
        )
    else:
        student = losses.topk_student_logprobs(scaled, batch["topk_ids"], batch["topk_logprobs"])
        teacher = losses.with_rest(batch["topk_logprobs"])
        per_token = losses.generalized_jsd_per_token(losses.with_rest(student), teacher, cfg.beta)
    loss = losses.masked_sums(per_token, mask)
    return sums | {"loss": loss, "jsd": (loss[0].detach(), loss[1])}


@implements("topk_kl")
def topk_kl(logits, batch, cfg, temperature):
    """Forward KL on the teacher's top-k with the remaining mass in one bucket."""
    mask, sums = _off_policy_mask(logits, batch, cfg, temperature)
    per_token = losses.topk_kl_per_token(
        losses.tempered(logits, temperature), batch["topk_ids"], batch["topk_logprobs"]
    )
    loss = losses.masked_sums(per_token, mask)
    return sums | {"loss": loss, "topk_kl": (loss[0].detach(), loss[1])}


@implements("sft")
def sft(logits, batch, cfg, temperature):
    """Cross-entropy on teacher-written tokens (offline KD, corrections)."""
    loss = losses.masked_sums(losses.sft_per_token(logits, _targets(batch), batch["mask"]), batch["mask"])
    return {"loss": loss, "sft_nll": (loss[0].detach(), loss[1])}


def with_corrections(
    loss: torch.Tensor, metrics: dict[str, float], logits: torch.Tensor, batch: dict[str, torch.Tensor], weight: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Add cross-entropy on teacher-corrected tokens to a distillation loss, as one token-weighted mean."""
    if "sft_mask" not in batch:
        return loss, metrics
    return _with_sft(loss, metrics, losses.sft_on_teacher(logits, _targets(batch), batch["sft_mask"]), batch, weight)


def _with_sft(loss, metrics, sft, batch, weight) -> tuple[torch.Tensor, dict[str, float]]:
    """The distillation loss is a mean over the student's own tokens (`mask`), SFT a mean over the teacher's
    (`sft_mask`); each is weighted by its share of the micro-batch's tokens, SFT also by `weight`, so a
    batch with few corrections is not dominated by them."""
    own, fixed = batch["mask"].sum(), batch["sft_mask"].sum()
    total = (loss * own + weight * sft * fixed) / (own + fixed).clamp(min=1)
    return total, {**metrics, CORRECTION: float(sft.detach())}
