"""Distillation losses as pure tensor functions (torch only, no project imports).

Conventions shared by every function here:

* ``logits`` are ``[B, T, V]`` and already aligned, so position ``t`` scores token ``t`` (the caller has shifted).
* ``mask`` is ``[B, T]`` (float or bool), 1 on response tokens and 0 elsewhere.
* A loss reduces to a scalar as a token mean over the mask: ``sum(x * mask) / clamp(sum(mask), min=1)``.
  Values at masked-out positions are zeroed with ``torch.where`` first, so padding that produces ``inf``/``nan``
  there cannot leak into the result.
* Logits are upcast to float32 before any softmax: bf16 log-probs are too coarse for importance ratios and KLs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "generalized_jsd",
    "generalized_jsd_per_token",
    "masked_mean",
    "masked_sums",
    "optimal_reverse_kl_baseline",
    "policy_gradient_loss",
    "policy_gradient_per_token",
    "reverse_kl_advantage",
    "reverse_kl_sampled_tail_per_token",
    "sft_on_teacher",
    "sft_per_token",
    "tempered",
    "token_logprobs",
    "topk_kl",
    "topk_kl_per_token",
    "topk_student_logprobs",
    "with_rest",
]

_EPS = 1e-8
_TAIL_MASS = 1e-4
"""Student mass off the teacher's top-k below which the sampled tail's baseline is 0 (see reverse_kl_sampled_tail)."""


def masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """Token mean of ``x`` ``[B, T]`` over ``mask`` ``[B, T]`` -> scalar; plain mean when ``mask`` is None.

    Masked-out entries are replaced by 0 before weighting, so ``inf``/``nan`` at padding positions is harmless, and the
    denominator is clamped at 1 so an all-padding batch gives 0 instead of ``nan``.
    """
    if mask is None:
        return x.mean()
    total, weight = masked_sums(x, mask)
    return total / weight.clamp(min=1.0)


def masked_sums(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum(x * mask), sum(mask))`` with ``x`` zeroed where ``mask`` is not positive: the two halves of a token mean.

    Sums add up over chunks of positions, so a token mean over a whole micro-batch can be built chunk by chunk.
    """
    m = mask.to(x.dtype)
    x = torch.where(m > 0, x, torch.zeros_like(x))
    return (x * m).sum(), m.sum()


def _kl_from_logprobs(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p || q)`` summed over the last dim, from log-probs ``[..., V]`` -> ``[...]``.

    Entries with ``p == 0`` (``log_p == -inf``) contribute exactly 0 (and a zero gradient), where the naive
    ``exp(log_p) * (log_p - log_q)`` would give ``0 * inf = nan``.
    """
    support = torch.isfinite(log_p)
    safe_log_p = torch.where(support, log_p, torch.zeros_like(log_p))
    term = torch.exp(safe_log_p) * (safe_log_p - log_q)
    return torch.where(support, term, torch.zeros_like(term)).sum(dim=-1)


def tempered(logits: Tensor, temperature: float) -> Tensor:
    """``logits / temperature`` in float32. At temperature 1 float32 logits come back as they are: the division
    would be one more ``[B, T, V]`` tensor (and, under autograd, kept until backward) for nothing."""
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


def token_logprobs(logits: Tensor, ids: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probability of ``ids`` ``[B, T]`` under ``log_softmax(logits / temperature)`` (``logits`` ``[B, T, V]``).

    Returns float32 ``[B, T]``. Computed as ``gather - logsumexp`` so the full ``[B, T, V]`` log-softmax is never kept;
    the temperature must match the one the sampler used, or the importance ratios are biased.
    """
    scaled = tempered(logits, temperature)
    picked = scaled.gather(-1, ids.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(scaled, dim=-1)


def reverse_kl_advantage(teacher_logprobs: Tensor, student_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Per-token advantage ``(teacher_logprobs - student_logprobs) * mask``, detached, ``[B, T]``.

    On tokens the student sampled itself, ``log p_teacher - log p_student`` is a single-sample estimate of the negative
    reverse KL ``-KL(student || teacher)`` at that token; used as a per-token reward in a policy gradient it gives
    on-policy distillation (Thinking Machines "On-Policy Distillation"; Qwen3). Detached because it is a reward, not a
    path for gradients. Masked positions are exactly 0 even if the log-probs there are ``-inf``.
    """
    adv = (teacher_logprobs.float() - student_logprobs.float()).detach()
    m = mask.to(adv.dtype)
    return torch.where(m > 0, adv, torch.zeros_like(adv)) * m


def policy_gradient_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, is_cap: float
) -> tuple[Tensor, dict[str, float]]:
    """Truncated importance-sampled policy-gradient loss; all inputs ``[B, T]``, returns ``(scalar loss, metrics)``.

    ``w = exp(logprobs - old_logprobs).detach().clamp(max=is_cap)`` corrects for the rollout policy (``old_logprobs``,
    e.g. a slightly stale vLLM copy) differing from the learner; truncating it at ``is_cap`` bounds the variance (TIS).
    The loss is the token mean of ``-(w * advantages * logprobs)``, so its gradient w.r.t. ``logprobs`` is
    ``-w * A * mask / num_tokens``. ``advantages`` are treated as constants (detached).

    Metrics (python floats, over masked tokens): ``is_weight_mean`` is the mean of the applied (truncated) weight,
    ``is_clipped_frac`` the fraction of tokens whose raw ratio exceeded ``is_cap``.
    """
    per_token, w, clipped = policy_gradient_per_token(logprobs, old_logprobs, advantages, is_cap)
    loss = masked_mean(per_token, mask)
    with torch.no_grad():
        metrics = {"is_weight_mean": masked_mean(w, mask).item(), "is_clipped_frac": masked_mean(clipped, mask).item()}
    return loss, metrics


def policy_gradient_per_token(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, is_cap: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``policy_gradient_loss`` before the token mean: ``(-(w * A * logprobs), w, 1.0 where the ratio was capped)``."""
    ratio = torch.exp(logprobs.detach().float() - old_logprobs.detach().float())
    w = ratio.clamp(max=is_cap)
    return -(w * advantages.detach().float() * logprobs.float()), w, (ratio > is_cap).float()


def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024), as TRL's ``GKDTrainer.generalized_jsd_loss``.

    ``student_logits`` and ``teacher_logits`` are ``[B, T, V]``; both are divided by ``temperature`` and
    log-softmaxed over the last dim. ``beta == 0`` gives forward ``KL(teacher || student)`` (mode covering),
    ``beta == 1`` reverse ``KL(student || teacher)`` (mode seeking); otherwise, with the mixture
    ``m = (1 - beta) * student + beta * teacher``, ``jsd = beta * KL(teacher || m) + (1 - beta) * KL(student || m)``.
    Summed over the last dim per token, then token mean over ``mask`` (plain mean over all tokens when None).

    The last dim may also be top-k log-probs ``[B, T, K]`` (the same K ids for both models); the result is then the
    divergence between the two distributions renormalised over those K entries, unless the caller appends the rest of
    the mass first (``with_rest``), which the learner's ``jsd`` objective does.
    ``-inf`` logits (zero probability) are allowed and contribute 0 where they are in the first argument of a KL.
    """
    return masked_mean(generalized_jsd_per_token(student_logits, teacher_logits, beta, temperature), mask)


def generalized_jsd_per_token(
    student_logits: Tensor, teacher_logits: Tensor, beta: float, temperature: float = 1.0
) -> Tensor:
    """``generalized_jsd`` per position ``[B, T]``, before the token mean."""
    s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0:
        jsd = _kl_from_logprobs(t, s)
    elif beta == 1:
        jsd = _kl_from_logprobs(s, t)
    else:
        if not 0.0 < beta < 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        log_m = torch.logsumexp(torch.stack([s + math.log(1.0 - beta), t + math.log(beta)]), dim=0)
        jsd = beta * _kl_from_logprobs(t, log_m) + (1.0 - beta) * _kl_from_logprobs(s, log_m)
    return jsd


def with_rest(logprobs: Tensor) -> Tensor:
    """Top-k log-probs ``[..., K]`` normalised over the FULL vocabulary -> ``[..., K+1]`` with the rest appended.

    The extra entry is ``log(1 - sum exp(logprobs))``, the mass outside the K ids, so the result is a proper
    distribution over K+1 categories (K ids and "anything else"). A divergence between two such coarsenings is a
    lower bound of the full-vocab one that still sees mass a model puts outside the other's top-k; renormalising over
    the K ids instead would let a student leak mass off the teacher's top-k at no cost. ``-inf`` entries (padding)
    count as zero mass. The rest is clamped at 1e-8, since reduced-precision top-k values may sum a hair over 1.
    """
    total = torch.logsumexp(logprobs.float(), dim=-1, keepdim=True)
    rest = torch.log((-torch.expm1(total.clamp(max=0.0))).clamp(min=_EPS))
    return torch.cat([logprobs.float(), rest], dim=-1)


def topk_kl(student_logits: Tensor, topk_ids: Tensor, teacher_topk_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Forward ``KL(teacher || student)`` over the teacher's top-k ids plus one "rest" bucket -> scalar.

    ``student_logits`` ``[B, T, V]``; ``topk_ids`` ``[B, T, K]`` long; ``teacher_topk_logprobs`` ``[B, T, K]``
    normalised over the FULL vocabulary (what a serving engine returns), ``-inf`` marking padding entries, which
    contribute 0 whatever id they carry. Student log-probs come from a full-vocab log-softmax, gathered at the same
    ids. With the mass outside the top-k as one extra category for both sides (``with_rest``), this is the exact KL
    between the two (K+1)-category coarsenings: it is >= 0, 0 when the student matches the teacher, equals the full
    forward KL when K == V, and still pushes the student's mass off tokens the teacher puts outside its top-k.
    Token mean over ``mask``.
    """
    return masked_mean(topk_kl_per_token(student_logits, topk_ids, teacher_topk_logprobs), mask)


def topk_kl_per_token(student_logits: Tensor, topk_ids: Tensor, teacher_topk_logprobs: Tensor) -> Tensor:
    """``topk_kl`` per position ``[B, T]``, before the token mean."""
    student = topk_student_logprobs(student_logits, topk_ids, teacher_topk_logprobs)
    return _kl_from_logprobs(with_rest(teacher_topk_logprobs), with_rest(student))


def topk_student_logprobs(student_logits: Tensor, topk_ids: Tensor, teacher_topk_logprobs: Tensor) -> Tensor:
    """The student's full-vocab log-probs ``[B, T, K]`` at the teacher's top-k ids; ``-inf`` where the teacher's are
    (padding, whose ids may be -1). Computed as ``gather - logsumexp``: no ``[B, T, V]`` log-softmax is kept."""
    return _student_on_top(student_logits, topk_ids, teacher_topk_logprobs)[3]


def reverse_kl_sampled_tail_per_token(
    student_logits: Tensor,
    topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    sampled_ids: Tensor,
    teacher_sampled_logprobs: Tensor,
) -> tuple[Tensor, Tensor]:
    """The full-vocabulary reverse ``KL(student || teacher)`` per position ``[B, T]``, from the teacher's top-k alone
    plus its log-prob of the token the student sampled there -> ``(loss, estimate)``.

    ``KL = sum_{j in K} s_j log(s_j / t_j) + sum_{j not in K} s_j log(s_j / t_j)``. The first sum (the head) is
    exact. The second (the tail) is where a student far from its teacher keeps most of its divergence: spread over a
    large vocabulary, its mass lands on tokens the teacher gives almost nothing, which one "rest" bucket
    (``with_rest``) cannot see once the teacher's own rest is large. With ``x ~ s`` the sampled token and
    ``r = log s_x - log t_x``, ``1{x not in K} r`` estimates the tail without bias, and its gradient is
    ``E_x[1{x not in K} r grad log s_x] + grad s_rest`` (``s_rest`` the student's mass off the top-k), which the
    surrogate ``head + 1{x not in K} stopgrad(r - b) log s_x + (1 + b) s_rest`` has in expectation for any ``b`` that
    does not depend on ``x``. ``b`` is the baseline of a uniform teacher tail (``_uniform_tail_baseline``): most of
    ``r`` is the teacher's tail log-prob, about the same for every tail token, and it is taken out of the sampled
    term, which then carries only each token's deviation from it. ``loss`` carries that gradient with the
    estimate's value; ``estimate`` is the detached value. Both assume ``x`` was drawn from the student; samples from
    an older policy need the importance weight s_x / sampler_x (the learner's mask has it). ``-inf`` teacher
    entries are padding, as in ``topk_student_logprobs``.
    """
    logits, norm, ids, top = _student_on_top(student_logits, topk_ids, teacher_topk_logprobs)
    valid = torch.isfinite(teacher_topk_logprobs)
    head = _kl_from_logprobs(top, teacher_topk_logprobs)
    own = logits.gather(-1, sampled_ids.long().unsqueeze(-1)).squeeze(-1) - norm.squeeze(-1)
    in_top = ((ids == sampled_ids.long().unsqueeze(-1)) & valid).any(dim=-1)
    log_ratio = (own - teacher_sampled_logprobs.float()).detach()
    tail = torch.where(in_top, torch.zeros_like(own), log_ratio)
    rest = -torch.expm1(torch.logsumexp(top, dim=-1))
    baseline = _uniform_tail_baseline(logits, norm, top, rest.detach(), teacher_topk_logprobs)
    centred = torch.where(in_top, torch.zeros_like(own), log_ratio - baseline)
    estimate = (head + tail).detach()
    surrogate = head + centred * own + (1.0 + baseline) * rest
    return estimate + (surrogate - surrogate.detach()), estimate  # the value exactly the estimate


def optimal_reverse_kl_baseline(student_logits: Tensor, topk_ids: Tensor, teacher_topk_logprobs: Tensor) -> Tensor:
    """The variance-minimising baseline, per position ``[B, T]`` (detached), for the sampled-token reward of
    ``reverse_kl``, ``r_x = log t_x - log s_x`` with ``x ~ s``, at the logits: ``b = E[r_x |g_x|^2] / E[|g_x|^2]``,
    ``g_x = onehot(x) - s`` the gradient of ``log s_x`` with respect to the position's logits, so
    ``|g_x|^2 = 1 - 2 s_x + |s|^2`` (the optimal constant baseline of Greensmith et al. 2004, with the logits as the
    parameters). The teacher's log-probs are exact over its top-k and taken as even over the rest of the vocabulary.

    A function of the position, not of the token sampled there, so the policy gradient's expectation is unchanged
    for any such value; this one is chosen for its variance. The plain expectation ``E[r_x]`` (minus the KL) is not:
    rare tokens have both the largest rewards (``-log s_x``) and the largest ``|g_x|``, and on a two-token policy
    over three tokens it raised the variance 3.6-fold (tests/test_advantages.py)."""
    with torch.no_grad():
        logits = student_logits.float()
        norm = torch.logsumexp(logits, dim=-1, keepdim=True)
        valid = torch.isfinite(teacher_topk_logprobs)
        vocab = logits.shape[-1]
        tail = _even_tail_logprob(teacher_topk_logprobs, vocab)
        ids = torch.where(valid, topk_ids.long(), torch.full_like(topk_ids, vocab, dtype=torch.long))
        rows = []
        for row, n, row_ids, row_tail, row_top in zip(logits, norm, ids, tail, teacher_topk_logprobs, strict=True):
            # [positions, vocab] temporaries, a sequence at a time; padding's ids write to a spare column
            teacher = row_tail[:, None].expand(-1, vocab + 1).clone()
            teacher.scatter_(-1, row_ids, row_top.float())
            own = row - n
            p = own.exp()
            weight = p * (1.0 - 2.0 * p + (p * p).sum(-1, keepdim=True))
            reward = torch.where(p > 0, teacher[:, :vocab] - own, torch.zeros_like(own))
            den = weight.sum(-1)
            rows.append(torch.where(den > _EPS, (weight * reward).sum(-1) / den.clamp(min=_EPS), torch.zeros_like(den)))
        return torch.stack(rows)


def _student_on_top(
    student_logits: Tensor, topk_ids: Tensor, teacher_topk_logprobs: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(float32 logits, their logsumexp [B, T, 1], the top-k ids with padding at 0, the student's log-probs at
    them [B, T, K] with -inf at the teacher's padding)``."""
    logits = student_logits.float()
    norm = torch.logsumexp(logits, dim=-1, keepdim=True)
    valid = torch.isfinite(teacher_topk_logprobs)
    ids = torch.where(valid, topk_ids.long(), torch.zeros_like(topk_ids, dtype=torch.long))
    top = (logits.gather(-1, ids) - norm).masked_fill(~valid, float("-inf"))
    return logits, norm, ids, top


def _uniform_tail_baseline(
    logits: Tensor, norm: Tensor, student_top: Tensor, student_rest: Tensor, teacher_top: Tensor
) -> Tensor:
    """``E[log s_x - log t_x | x off the top-k]`` were the teacher's tail mass spread evenly over its tail tokens,
    ``[B, T]``, detached: the student's mean tail log-prob (its full entropy less the top-k's share, over its
    tail mass) less ``log(t_rest / (V - k))``. A function of the position, not of the sampled token."""
    with torch.no_grad():
        # -entropy, a row at a time: [positions, vocab] temporaries, not [batch, positions, vocab] ones
        total = torch.stack([((row - n).exp() * (row - n)).sum(-1) for row, n in zip(logits, norm, strict=True)])
        finite = torch.isfinite(student_top)
        top = torch.where(finite, student_top, torch.zeros_like(student_top))
        head = (top.exp() * top * finite).sum(-1)
        baseline = (total - head) / student_rest.clamp(min=_EPS) - _even_tail_logprob(teacher_top, logits.shape[-1])
        # With next to no tail the mean above is rounding error over a tiny mass; any value is unbiased, 0 is exact.
        return torch.where(student_rest > _TAIL_MASS, baseline, torch.zeros_like(baseline))


def _even_tail_logprob(teacher_top: Tensor, vocab: int) -> Tensor:
    """``log(t_rest / (V - k))`` ``[B, T]``: the teacher's log-prob of each token off its top-k were its tail mass
    spread evenly over them (``-inf`` top-k entries are padding and count as tail tokens)."""
    rest = (-torch.expm1(torch.logsumexp(teacher_top.float(), dim=-1).clamp(max=0.0))).clamp(min=_EPS)
    return torch.log(rest) - torch.log((vocab - torch.isfinite(teacher_top).sum(-1)).clamp(min=1).float())


def sft_on_teacher(logits: Tensor, target_ids: Tensor, mask: Tensor) -> Tensor:
    """Token-mean cross-entropy of ``target_ids`` ``[B, T]`` under ``logits`` ``[B, T, V]`` over ``mask`` -> scalar.

    The offline-KD / correction SFT loss on teacher-written tokens. Masked-out positions may hold any id (e.g. -100
    padding); they are replaced by 0 before the gather and excluded from the mean.
    """
    return masked_mean(sft_per_token(logits, target_ids, mask), mask)


def sft_per_token(logits: Tensor, target_ids: Tensor, mask: Tensor) -> Tensor:
    """``sft_on_teacher`` per position ``[B, T]`` (the negative log-likelihood), before the token mean."""
    ids = torch.where(mask.bool(), target_ids.long(), torch.zeros_like(target_ids, dtype=torch.long))
    return -token_logprobs(logits, ids)
