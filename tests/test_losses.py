"""Tests for opd.losses against values computed by hand with math.log on small explicit distributions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from opd.losses import (
    generalized_jsd,
    masked_mean,
    masked_sums,
    policy_gradient_loss,
    reverse_kl_advantage,
    reverse_kl_sampled_tail_per_token,
    sft_on_teacher,
    tempered,
    token_logprobs,
    topk_kl,
)

# Two distributions over V = 3 written out by hand.
P = [0.5, 0.3, 0.2]  # teacher
Q = [0.2, 0.5, 0.3]  # student


def logits_of(*rows: list[float]) -> torch.Tensor:
    """[1, T, V] logits whose softmax is exactly each row (log of the probabilities)."""
    return torch.tensor([[[math.log(x) for x in row] for row in rows]], dtype=torch.float32)


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)


def scalar(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


# ---------------------------------------------------------------- token_logprobs / masked_mean


def test_token_logprobs_by_hand() -> None:
    logits = logits_of(P, Q)
    ids = torch.tensor([[0, 2]])
    assert_close(token_logprobs(logits, ids), torch.tensor([[math.log(0.5), math.log(0.3)]]))


def test_token_logprobs_temperature() -> None:
    # logits 2*log(p) at temperature 2 are log(p) again.
    logits = 2.0 * logits_of(P)
    out = token_logprobs(logits, torch.tensor([[1]]), temperature=2.0)
    assert_close(out, torch.tensor([[math.log(0.3)]]))
    # At temperature 1 the same logits give p^2 / sum p^2.
    z = sum(x * x for x in P)
    assert_close(token_logprobs(logits, torch.tensor([[1]])), torch.tensor([[math.log(0.09 / z)]]))


def test_tempered_divides_in_float32_and_copies_nothing_at_temperature_one() -> None:
    logits = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(0))
    assert tempered(logits, 1.0) is logits  # no [B, T, V] copy
    assert_close(tempered(logits, 2.0), logits / 2.0)
    half = tempered(logits.bfloat16(), 1.0)
    assert half.dtype == torch.float32 and torch.equal(half, logits.bfloat16().float())


def test_token_logprobs_bf16_upcast() -> None:
    logits = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(0)).bfloat16()
    ids = torch.tensor([[0, 3, 6], [1, 2, 5]])
    out = token_logprobs(logits, ids)
    assert out.dtype == torch.float32
    ref = torch.log_softmax(logits.float(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    assert_close(out, ref)


def test_masked_mean_ignores_nan_and_empty_mask() -> None:
    x = torch.tensor([[1.0, 3.0, float("nan")], [float("-inf"), 5.0, 7.0]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 0]], dtype=torch.bool)
    assert_close(masked_mean(x, mask), scalar(3.0))  # (1 + 3 + 5) / 3
    assert_close(masked_mean(x, torch.zeros(2, 3)), scalar(0.0))
    assert_close(masked_mean(torch.tensor([[1.0, 2.0, 6.0]]), None), scalar(3.0))


def test_masked_sums_over_chunks_of_positions_add_up_to_the_token_mean() -> None:
    x = torch.tensor([[1.0, 3.0, float("nan"), 2.0], [float("-inf"), 5.0, 7.0, 4.0]])
    mask = torch.tensor([[1.0, 0.5, 0.0, 2.0], [0.0, 1.0, 0.0, 1.0]])
    parts = [masked_sums(x[:, i : i + 1], mask[:, i : i + 1]) for i in range(4)]
    total, weight = sum(p[0] for p in parts), sum(p[1] for p in parts)
    assert_close(weight, scalar(5.5))
    assert_close(total / weight, masked_mean(x, mask))  # (1 + 1.5 + 4 + 5 + 4) / 5.5


# ---------------------------------------------------------------- reverse_kl_advantage


def test_reverse_kl_advantage_by_hand_and_detached() -> None:
    teacher = torch.tensor([[math.log(0.5), math.log(0.1), float("-inf")]])
    student = torch.tensor([[math.log(0.25), math.log(0.4), -1.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    adv = reverse_kl_advantage(teacher, student, mask)
    assert_close(adv, torch.tensor([[math.log(2.0), math.log(0.25), 0.0]]))
    assert not adv.requires_grad
    # Positive where the teacher likes the sampled token more than the student does, negative where less.
    assert adv[0, 1] < 0 < adv[0, 0]


# ---------------------------------------------------------------- policy_gradient_loss


def test_policy_gradient_loss_value_grad_and_cap() -> None:
    old = torch.tensor([[math.log(0.5), math.log(0.5), math.log(0.5), math.log(0.5)]])
    # Raw ratios: 1.0, 3.0 (> cap 2), 0.5, 4.0 (masked out).
    new_vals = [math.log(0.5), math.log(1.5), math.log(0.25), math.log(2.0)]
    logprobs = torch.tensor([new_vals], requires_grad=True)
    adv = torch.tensor([[2.0, -1.0, 4.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, metrics = policy_gradient_loss(logprobs, old, adv, mask, is_cap=2.0)

    w = [1.0, 2.0, 0.5]  # truncated weights on the three response tokens
    expected = -sum(wi * ai * lp for wi, ai, lp in zip(w, [2.0, -1.0, 4.0], new_vals[:3], strict=True)) / 3
    assert_close(loss, scalar(expected))

    loss.backward()
    expected_grad = torch.tensor([[-1.0 * 2.0 / 3, -2.0 * -1.0 / 3, -0.5 * 4.0 / 3, 0.0]])
    assert_close(logprobs.grad, expected_grad)

    assert metrics["is_weight_mean"] == pytest.approx((1.0 + 2.0 + 0.5) / 3)
    assert metrics["is_clipped_frac"] == pytest.approx(1 / 3)  # the masked ratio 4.0 does not count
    assert isinstance(metrics["is_weight_mean"], float)


def test_policy_gradient_loss_on_policy_is_plain_reinforce() -> None:
    lp = torch.tensor([[-0.3, -1.2], [-2.0, -0.7]], requires_grad=True)
    adv = torch.tensor([[0.5, -1.5], [2.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, metrics = policy_gradient_loss(lp, lp.detach().clone(), adv, mask, is_cap=10.0)
    assert_close(loss, scalar(-(0.5 * -0.3 + -1.5 * -1.2 + 2.0 * -2.0) / 3))
    assert metrics == {"is_weight_mean": pytest.approx(1.0), "is_clipped_frac": 0.0}
    loss.backward()
    assert_close(lp.grad, -adv * mask / 3)


def test_policy_gradient_loss_overflowing_ratio_is_capped() -> None:
    lp = torch.tensor([[0.0]], requires_grad=True)
    old = torch.tensor([[-1000.0]])  # exp(1000) = inf before truncation
    loss, metrics = policy_gradient_loss(lp - 1.0, old, torch.tensor([[1.0]]), torch.ones(1, 1), is_cap=5.0)
    assert torch.isfinite(loss)
    assert_close(loss, scalar(5.0))  # -(5 * 1 * -1)
    assert metrics["is_clipped_frac"] == 1.0


# ---------------------------------------------------------------- generalized_jsd


def test_jsd_beta0_is_forward_kl_by_hand() -> None:
    out = generalized_jsd(logits_of(Q), logits_of(P), beta=0.0)
    assert_close(out, scalar(kl(P, Q)))


def test_jsd_beta1_is_reverse_kl_by_hand() -> None:
    out = generalized_jsd(logits_of(Q), logits_of(P), beta=1.0)
    assert_close(out, scalar(kl(Q, P)))
    assert abs(kl(P, Q) - kl(Q, P)) > 1e-3  # the two really differ, so the two tests above are not vacuous


@pytest.mark.parametrize("beta", [0.5, 0.3, 0.9])
def test_jsd_mixture_by_hand(beta: float) -> None:
    m = [(1 - beta) * q + beta * p for p, q in zip(P, Q, strict=True)]
    expected = beta * kl(P, m) + (1 - beta) * kl(Q, m)
    assert_close(generalized_jsd(logits_of(Q), logits_of(P), beta=beta), scalar(expected))


def test_jsd_half_is_symmetric_and_bounded() -> None:
    a = generalized_jsd(logits_of(Q), logits_of(P), beta=0.5)
    b = generalized_jsd(logits_of(P), logits_of(Q), beta=0.5)
    assert_close(a, b)
    assert 0.0 < a.item() < math.log(2.0)
    # beta <-> 1 - beta with the arguments swapped is the same divergence.
    assert_close(
        generalized_jsd(logits_of(Q), logits_of(P), beta=0.2), generalized_jsd(logits_of(P), logits_of(Q), beta=0.8)
    )


@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 1.0])
def test_jsd_zero_when_equal(beta: float) -> None:
    x = torch.randn(2, 3, 11, generator=torch.Generator().manual_seed(1))
    # Shifting logits by a per-token constant does not change the distribution.
    assert_close(generalized_jsd(x, x + 3.0, beta=beta), scalar(0.0), atol=1e-6, rtol=0)


def test_jsd_temperature() -> None:
    out = generalized_jsd(2.0 * logits_of(Q), 2.0 * logits_of(P), beta=0.0, temperature=2.0)
    assert_close(out, scalar(kl(P, Q)))


def test_jsd_mask_excludes_tokens() -> None:
    student = logits_of(Q, [0.9, 0.05, 0.05], Q)
    teacher = logits_of(P, [0.05, 0.05, 0.9], [0.1, 0.1, 0.8])
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    expected = (kl(P, Q) + kl([0.1, 0.1, 0.8], Q)) / 2
    assert_close(generalized_jsd(student, teacher, beta=0.0, mask=mask), scalar(expected))
    # Without a mask, all three tokens are averaged.
    expected_all = (kl(P, Q) + kl([0.05, 0.05, 0.9], [0.9, 0.05, 0.05]) + kl([0.1, 0.1, 0.8], Q)) / 3
    assert_close(generalized_jsd(student, teacher, beta=0.0), scalar(expected_all))


def test_jsd_on_gathered_topk_renormalises() -> None:
    # Gathering entries 0 and 1 renormalises P to [0.625, 0.375] and Q to [2/7, 5/7].
    ids = torch.tensor([[[0, 1]]])
    s = logits_of(Q).gather(-1, ids)
    t = logits_of(P).gather(-1, ids)
    p2, q2 = [0.5 / 0.8, 0.3 / 0.8], [0.2 / 0.7, 0.5 / 0.7]
    assert_close(generalized_jsd(s, t, beta=0.0), scalar(kl(p2, q2)))
    m = [0.5 * a + 0.5 * b for a, b in zip(p2, q2, strict=True)]
    assert_close(generalized_jsd(s, t, beta=0.5), scalar(0.5 * kl(p2, m) + 0.5 * kl(q2, m)))


def test_jsd_handles_neg_inf_logits_and_grad() -> None:
    # Teacher gives token 2 zero probability (-inf logit): forward KL is finite, no nan in value or gradient.
    teacher = torch.tensor([[[math.log(0.6), math.log(0.4), float("-inf")]]])
    student = logits_of(Q).requires_grad_(True)
    out = generalized_jsd(student, teacher, beta=0.0)
    assert_close(out, scalar(kl([0.6, 0.4, 0.0], Q)))
    out.backward()
    # d KL(p || softmax(z)) / dz = q - p
    assert_close(student.grad, torch.tensor([[[0.2 - 0.6, 0.5 - 0.4, 0.3 - 0.0]]]))


def test_jsd_rejects_bad_beta() -> None:
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(logits_of(Q), logits_of(P), beta=1.5)


# ---------------------------------------------------------------- topk_kl

P4 = [0.5, 0.25, 0.15, 0.1]  # teacher over V = 4
Q4 = [0.4, 0.1, 0.3, 0.2]  # student over V = 4


def teacher_topk(ids: list[int], p: list[float] = P4) -> tuple[torch.Tensor, torch.Tensor]:
    lp = [math.log(p[i]) if i >= 0 else float("-inf") for i in ids]
    return torch.tensor([[ids]]), torch.tensor([[lp]])


def test_topk_kl_rest_bucket_by_hand() -> None:
    ids, lp = teacher_topk([0, 1])
    out = topk_kl(logits_of(Q4), ids, lp, torch.ones(1, 1))
    # Categories {0}, {1}, rest={2, 3}: teacher [0.5, 0.25, 0.25], student [0.4, 0.1, 0.5].
    expected = 0.5 * math.log(0.5 / 0.4) + 0.25 * math.log(0.25 / 0.1) + 0.25 * math.log(0.25 / 0.5)
    assert_close(out, scalar(expected))
    # The rest bucket matters: dropping it would give a different number.
    assert abs(expected - (0.5 * math.log(0.5 / 0.4) + 0.25 * math.log(0.25 / 0.1))) > 0.1


def test_topk_kl_full_k_equals_forward_kl() -> None:
    ids, lp = teacher_topk([2, 0, 3, 1])  # K == V, any order
    student = logits_of(Q4).requires_grad_(True)
    out = topk_kl(student, ids, lp, torch.ones(1, 1))
    assert_close(out, scalar(kl(P4, Q4)))
    out.backward()
    assert_close(student.grad, torch.tensor([[[q - p for p, q in zip(P4, Q4, strict=True)]]]))
    # And it agrees with generalized_jsd at beta = 0 on the same full distributions.
    assert_close(out, generalized_jsd(logits_of(Q4), logits_of(P4), beta=0.0))


def test_topk_kl_padding_contributes_nothing() -> None:
    ids, lp = teacher_topk([0, 1])
    ref = topk_kl(logits_of(Q4), ids, lp, torch.ones(1, 1))
    # Padding with -inf log-probs, carrying a duplicate id (0) and an out-of-range id (-1).
    ids_pad = torch.tensor([[[0, 1, 0, -1]]])
    lp_pad = torch.cat([lp, torch.full((1, 1, 2), float("-inf"))], dim=-1)
    student = logits_of(Q4).requires_grad_(True)
    out = topk_kl(student, ids_pad, lp_pad, torch.ones(1, 1))
    assert_close(out, ref)
    out.backward()
    assert torch.isfinite(student.grad).all()


def test_topk_kl_zero_when_student_matches_and_positive_otherwise() -> None:
    ids, lp = teacher_topk([1, 0])
    assert_close(topk_kl(logits_of(P4), ids, lp, torch.ones(1, 1)), scalar(0.0), atol=1e-6, rtol=0)
    # A student that agrees on the top-k but moves mass inside the rest bucket: still 0 (coarsening).
    assert_close(topk_kl(logits_of([0.5, 0.25, 0.05, 0.2]), ids, lp, torch.ones(1, 1)), scalar(0.0), atol=1e-6, rtol=0)
    assert topk_kl(logits_of(Q4), ids, lp, torch.ones(1, 1)).item() > 0


def test_topk_kl_rest_mass_clamped_when_student_has_none() -> None:
    # Student puts (almost) all its mass on the teacher's top-2, teacher keeps 0.25 outside: large but finite.
    student = torch.tensor([[[0.0, 0.0, -60.0, -60.0]]], requires_grad=True)
    ids, lp = teacher_topk([0, 1])
    out = topk_kl(student, ids, lp, torch.ones(1, 1))
    expected = 0.5 * math.log(0.5 / 0.5) + 0.25 * math.log(0.25 / 0.5) + 0.25 * math.log(0.25 / 1e-8)
    assert_close(out, scalar(expected))
    out.backward()
    assert torch.isfinite(student.grad).all()


def test_topk_kl_mask_excludes_tokens() -> None:
    student = logits_of(Q4, [0.97, 0.01, 0.01, 0.01])
    ids = torch.tensor([[[0, 1], [3, 2]]])
    lp = torch.tensor([[[math.log(0.5), math.log(0.25)], [math.log(0.9), float("-inf")]]])
    mask = torch.tensor([[1.0, 0.0]])
    expected = 0.5 * math.log(0.5 / 0.4) + 0.25 * math.log(0.25 / 0.1) + 0.25 * math.log(0.25 / 0.5)
    assert_close(topk_kl(student, ids, lp, mask), scalar(expected))
    # With the second token included the mean changes: teacher [0.9 | 0.1], student [0.01 | 0.99].
    second = 0.9 * math.log(0.9 / 0.01) + 0.1 * math.log(0.1 / 0.99)
    assert_close(topk_kl(student, ids, lp, torch.ones(1, 2)), scalar((expected + second) / 2))


# ---------------------------------------------------------------- reverse KL with a sampled tail


def sampled_tail_expectation(theta: torch.Tensor, teacher: torch.Tensor, ids: list[int], k_valid: int):
    """E over x ~ softmax(theta) of the per-token loss and estimate at one position, enumerating every x (the
    probabilities detached: the expectation the learner's samples estimate), and the gradient of that loss."""
    vocab = theta.shape[-1]
    s = torch.softmax(theta.detach(), -1)
    top_lp = torch.log(teacher)[ids].clone()
    top_lp[k_valid:] = float("-inf")  # padding entries: any id, -inf log-prob
    loss, value = torch.zeros(()), torch.zeros(())
    for x in range(vocab):
        per_token, estimate = reverse_kl_sampled_tail_per_token(
            theta.expand(1, 1, vocab),
            torch.tensor([[ids]]),
            top_lp.view(1, 1, -1),
            torch.tensor([[x]]),
            torch.log(teacher[x]).view(1, 1),
        )
        loss, value = loss + s[x] * per_token[0, 0], value + s[x] * estimate[0, 0]
    (grad,) = torch.autograd.grad(loss, theta)
    return loss, value, grad


@pytest.mark.parametrize(("ids", "k_valid"), [([2, 5], 2), ([4, 0, 1], 2), ([0, 1, 2, 3, 4, 5], 6), ([3], 0)])
def test_sampled_tail_is_unbiased_for_the_full_reverse_kl_and_its_gradient(ids: list[int], k_valid: int) -> None:
    """Enumerating the sampled token: the expected value is the full-vocabulary KL(student || teacher) and the
    expected gradient is its gradient, whatever the teacher's top-k (some of it padding, all of the vocabulary,
    none of it); the loss's value is the estimate."""
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(6, generator=gen, dtype=torch.float64).float().requires_grad_()
    teacher = torch.softmax(torch.randn(6, generator=gen) * 2, -1)
    loss, value, grad = sampled_tail_expectation(theta, teacher, ids, k_valid)
    s = torch.log_softmax(theta, -1)
    full = (s.exp() * (s - torch.log(teacher))).sum()
    (want,) = torch.autograd.grad(full, theta)
    assert_close(value, full.detach())
    assert_close(loss.detach(), full.detach())
    assert_close(grad, want)


def test_sampled_tail_has_no_variance_when_both_tails_are_flat() -> None:
    """The baseline assumes an evenly spread teacher tail: when both tails are flat, every sampled token's gradient
    is already the full KL's gradient (a zero-variance estimator); only the tails' shape is left to sampling."""
    theta = torch.log(torch.tensor([0.3, 0.2, 0.125, 0.125, 0.125, 0.125])).requires_grad_()
    teacher = torch.tensor([0.1, 0.5, 0.1, 0.1, 0.1, 0.1])
    s = torch.log_softmax(theta, -1)
    (want,) = torch.autograd.grad((s.exp() * (s - torch.log(teacher))).sum(), theta)
    for x in range(6):
        per_token, _ = reverse_kl_sampled_tail_per_token(
            theta.expand(1, 1, 6),
            torch.tensor([[[1, 0]]]),
            torch.log(teacher[[1, 0]]).view(1, 1, 2),
            torch.tensor([[x]]),
            torch.log(teacher[x]).view(1, 1),
        )
        (grad,) = torch.autograd.grad(per_token.sum(), theta)
        assert_close(grad, want)  # a tail token's sampled term is 0 after the baseline; a top-k token has none


def test_sampled_tail_by_hand_and_the_bucket_misses_the_tail() -> None:
    """Teacher [0.5, 0.3, 0.1, 0.1], top-1 = {0}; student [0.1, 0.1, 0.1, 0.7]. The sampled token 3 lies in the tail:
    estimate = head 0.1 log(0.1/0.5) + log(0.7/0.1). The rest-bucket KL sees only [0.1 | 0.9] against [0.5 | 0.5]."""
    student = logits_of([0.1, 0.1, 0.1, 0.7])
    teacher_top = torch.tensor([[[math.log(0.5)]]])
    _, estimate = reverse_kl_sampled_tail_per_token(
        student, torch.tensor([[[0]]]), teacher_top, torch.tensor([[3]]), torch.tensor([[math.log(0.1)]])
    )
    assert_close(estimate, torch.tensor([[0.1 * math.log(0.1 / 0.5) + math.log(0.7 / 0.1)]]))
    # A sampled token in the top-k adds nothing to the exact head.
    _, in_top = reverse_kl_sampled_tail_per_token(
        student, torch.tensor([[[0]]]), teacher_top, torch.tensor([[0]]), torch.tensor([[math.log(0.5)]])
    )
    assert_close(in_top, torch.tensor([[0.1 * math.log(0.1 / 0.5)]]))
    full = kl([0.1, 0.1, 0.1, 0.7], [0.5, 0.3, 0.1, 0.1])
    bucket = kl([0.1, 0.9], [0.5, 0.5])
    assert bucket < 0.5 * full  # 0.37 against 1.09: what the bucket cannot see


# ---------------------------------------------------------------- sft_on_teacher


def test_sft_by_hand() -> None:
    logits = logits_of(P, Q, Q)
    targets = torch.tensor([[0, 1, -100]])  # last position is padding with an ignore-index id
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert_close(sft_on_teacher(logits, targets, mask), scalar(-(math.log(0.5) + math.log(0.5)) / 2))


def test_sft_equals_cross_entropy() -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 5, 13, generator=gen, requires_grad=True)
    targets = torch.randint(0, 13, (3, 5), generator=gen)
    mask = torch.ones(3, 5)
    mask[0, 3:] = 0
    mask[2, :2] = 0
    ref = F.cross_entropy(
        logits.reshape(-1, 13), targets.masked_fill(mask == 0, -100).reshape(-1), ignore_index=-100, reduction="mean"
    )
    out = sft_on_teacher(logits, targets, mask)
    assert_close(out, ref)
    (g_out,) = torch.autograd.grad(out, logits)
    (g_ref,) = torch.autograd.grad(ref, logits)
    assert_close(g_out, g_ref)
