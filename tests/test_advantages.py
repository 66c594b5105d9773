"""reverse_kl's advantages (opd/advantages.py): each variant's expected gradient against its definition, computed
exactly by enumerating every group of responses of a tabular two-token policy."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from opd import advantages as A
from opd import losses
from opd.buffer.sample import Sample
from opd.config import ConfigError, load_config
from opd.learner.batch import collate
from opd.learner.objective import OBJECTIVES

V, GROUP = 3, 3
SEQS = list(itertools.product(range(V), repeat=2))


def policy(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a two-token autoregressive policy: first token [V], second token given the first [V, V]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, generator=g), torch.randn(V, V, generator=g)


def token_logprobs(first: torch.Tensor, second: torch.Tensor, y: tuple[int, int]) -> torch.Tensor:
    return torch.stack([first.log_softmax(-1)[y[0]], second.log_softmax(-1)[y[0], y[1]]])


TEACHER = tuple(t.log_softmax(-1) for t in policy(7))


def teacher_logprobs(y: tuple[int, int]) -> np.ndarray:
    return np.array([TEACHER[0][y[0]].item(), TEACHER[1][y[0], y[1]].item()])


def expected_gradient(discount: float, baseline: str) -> torch.Tensor:
    """E over every group of GROUP responses of the estimator's gradient per sample, exactly: opd's advantages
    into opd's policy-gradient loss (on policy, so the importance weight is 1)."""
    first, second = (t.clone().requires_grad_(True) for t in policy(0))
    with torch.no_grad():
        prob = {y: token_logprobs(first, second, y).sum().exp().item() for y in SEQS}
    total = torch.zeros(V + V * V, dtype=torch.float64)
    for group in itertools.product(SEQS, repeat=GROUP):
        lps = [token_logprobs(first, second, y) for y in group]
        rewards = [A.rewards(lp.detach().numpy(), teacher_logprobs(y)) for lp, y in zip(lps, group, strict=True)]
        adv = A.advantages(rewards, [0] * GROUP, discount, baseline, normalize=False)
        loss = sum(
            losses.policy_gradient_per_token(lp, lp.detach(), torch.tensor(a), is_cap=2.0)[0].sum()
            for lp, a in zip(lps, adv, strict=True)
        )
        grads = torch.autograd.grad(loss, (first, second))
        weight = np.prod([prob[y] for y in group])
        total += weight * torch.cat([g.flatten() for g in grads]).double()
    return total / GROUP


def definition(discount: float) -> torch.Tensor:
    """discount=1: the gradient of the sequence-level KL(student || teacher); discount=0: of the per-position KLs
    summed with the prefix distribution held fixed."""
    first, second = (t.clone().requires_grad_(True) for t in policy(0))
    p0, p1 = first.log_softmax(-1), second.log_softmax(-1)
    q0, q1 = TEACHER
    kl0 = (p0.exp() * (p0 - q0)).sum()
    kl1 = (p1.exp() * (p1 - q1)).sum(-1)  # [V]: at each first token
    prefix = p0.exp() if discount == 1.0 else p0.exp().detach()
    objective = kl0 + (prefix * kl1).sum()  # for discount=1 this is exactly KL of the two-token sequences
    grads = torch.autograd.grad(objective, (first, second))
    return torch.cat([g.flatten() for g in grads]).double()


@pytest.mark.parametrize("discount", [0.0, 1.0])
@pytest.mark.parametrize("baseline", ["none", "group"])
def test_expected_gradient_is_the_definition(discount, baseline):
    torch.testing.assert_close(expected_gradient(discount, baseline), definition(discount), rtol=1e-5, atol=1e-6)


def test_group_baseline_leaves_a_discounted_gradient_unchanged():
    torch.testing.assert_close(expected_gradient(0.5, "group"), expected_gradient(0.5, "none"), rtol=1e-5, atol=1e-6)


def test_the_two_objectives_differ_so_the_checks_above_can_tell_them_apart():
    assert (definition(0.0) - definition(1.0)).abs().max() > 1e-2


def optimal_baseline_gradients(discount: float, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and the second moment over responses of the `reverse_kl` objective's gradient with
    `loss.baseline=optimal`, exactly: the driver's returns into the learner's objective, the teacher's top-`k` ids
    (the highest, as a teacher sends them) as the top-k signal."""
    cfg = load_config("default", ["loss.type=reverse_kl", "loss.baseline=optimal", f"loss.discount={discount}"]).loss
    first, second = (t.clone().requires_grad_(True) for t in policy(0))
    mean = torch.zeros(V + V * V, dtype=torch.float64)
    square = torch.zeros(V + V * V, dtype=torch.float64)
    for y in SEQS:
        lp = token_logprobs(first, second, y)
        teacher = torch.stack([TEACHER[0], TEACHER[1][y[0]]])  # [2, V]: the teacher at each position
        top_lp, top_ids = teacher.topk(k, dim=-1)
        batch = {
            "input_ids": torch.tensor([[0, *y]]),
            "mask": torch.ones(1, 2),
            "old_logprobs": lp.detach()[None],
            "teacher_logprobs": torch.tensor(teacher_logprobs(y), dtype=torch.float32)[None],
            "topk_ids": top_ids[None],
            "topk_logprobs": top_lp[None],
        }
        if A.shapes_advantages(cfg):
            rewards = A.rewards(lp.detach().numpy(), teacher_logprobs(y))
            (adv,) = A.advantages([rewards], [0], discount, cfg.baseline, normalize=False)
            batch["advantages"] = torch.tensor(adv, dtype=torch.float32)[None]
        logits = torch.stack([first, second[y[0]]])[None]
        loss, _ = OBJECTIVES.get("reverse_kl")(logits, batch, cfg, 1.0)
        grad = torch.cat([g.flatten() for g in torch.autograd.grad(2 * loss, (first, second))]).double()
        weight = lp.sum().exp().item()
        mean += weight * grad
        square += weight * grad**2
    return mean, square


@pytest.mark.parametrize("discount", [0.0, 1.0])
@pytest.mark.parametrize("k", [1, V])
def test_optimal_baseline_gradient_is_the_definition(discount, k):
    """Unbiased whether the baseline is exact (the whole vocabulary as top-k) or not (a top-1 and a two-token tail
    the teacher does not spread evenly)."""
    torch.testing.assert_close(optimal_baseline_gradients(discount, k)[0], definition(discount), rtol=1e-5, atol=1e-6)


def test_optimal_baseline_lowers_the_gradients_variance():
    """Below no baseline and below the plain expectation `E[r] = -KL` at each position, which is worse than none
    here: rare tokens carry both the largest rewards and the largest gradients."""
    cfg = load_config("default", ["loss.type=reverse_kl"]).loss
    first, second = (t.clone().requires_grad_(True) for t in policy(0))
    square = {"none": torch.zeros(V + V * V, dtype=torch.float64), "mean": torch.zeros(V + V * V, dtype=torch.float64)}
    for y in SEQS:
        lp = token_logprobs(first, second, y)
        reward = torch.tensor(A.rewards(lp.detach().numpy(), teacher_logprobs(y)))
        with torch.no_grad():
            s = (first.log_softmax(-1), second.log_softmax(-1)[y[0]])
            t = (TEACHER[0], TEACHER[1][y[0]])
            kl = torch.stack([(a.exp() * (a - b)).sum() for a, b in zip(s, t, strict=True)]).double()
        for name, adv in (("none", reward), ("mean", reward + kl)):
            loss = losses.policy_gradient_per_token(lp, lp.detach(), adv, cfg.is_cap)[0].sum()
            grads = torch.autograd.grad(loss, (first, second), retain_graph=True)
            grad = torch.cat([g.flatten() for g in grads]).double()
            square[name] += lp.sum().exp().item() * grad**2
    mean, optimal = optimal_baseline_gradients(0.0, V)
    variance = {k: float((v - definition(0.0) ** 2).sum()) for k, v in square.items()}
    variance["optimal"] = float((optimal - mean**2).sum())
    assert variance["optimal"] < 0.9 * variance["none"] < 0.9 * variance["mean"], variance


def test_optimal_baseline_by_its_definition():
    """Against `E[r |g|^2] / E[|g|^2]` summed over the vocabulary by hand: with the whole vocabulary as the top-k,
    and with a top-2 whose teacher tail is even (ids 2-5), where the tail assumption is exact too; a padded top-k
    entry (-inf, id -1) changes nothing."""
    student, teacher = torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    teacher[..., 2:] = 0.0
    s, t = student.log_softmax(-1), teacher.log_softmax(-1)
    p = s.exp()
    score = 1 - 2 * p + (p * p).sum(-1, keepdim=True)
    want = (p * score * (t - s)).sum(-1) / (p * score).sum(-1)
    full = torch.arange(6).expand(2, 3, 6)
    torch.testing.assert_close(losses.optimal_reverse_kl_baseline(student, full, t), want)
    ids = torch.tensor([0, 1, -1]).expand(2, 3, 3)
    top = torch.cat([t[..., :2], torch.full((2, 3, 1), float("-inf"))], dim=-1)
    torch.testing.assert_close(losses.optimal_reverse_kl_baseline(student, ids, top), want)


def test_discounted_returns_by_hand():
    np.testing.assert_allclose(A.discounted_returns(np.array([1.0, 2.0, 4.0]), 0.5), [1 + 1 + 1, 2 + 2, 4])
    np.testing.assert_allclose(A.discounted_returns(np.array([1.0, 2.0, 4.0]), 0.0), [1, 2, 4])
    assert A.discounted_returns(np.array([]), 0.9).shape == (0,)


def test_leave_one_out_uses_only_the_other_samples_of_the_group_that_reach_each_position():
    returns = [np.array([1.0, 2.0, 3.0]), np.array([3.0, 4.0]), np.array([5.0]), np.array([9.0, 9.0])]
    out = A.leave_one_out(returns, [0, 0, 0, 1])
    np.testing.assert_allclose(out[0], [1 - 4, 2 - 4, 3 - 0])  # position 2: nobody else reaches it
    np.testing.assert_allclose(out[1], [3 - 3, 4 - 2])
    np.testing.assert_allclose(out[2], [5 - 2])
    np.testing.assert_allclose(out[3], [9, 9])  # alone in its group


def test_normalised_advantages_are_the_plain_ones_over_their_standard_deviation():
    rng = np.random.default_rng(0)
    rewards = [rng.normal(size=n) for n in (3, 5, 2, 4)]
    plain = A.advantages(rewards, [0, 0, 1, 1], 0.3, "group", normalize=False)
    scaled = A.advantages(rewards, [0, 0, 1, 1], 0.3, "group", normalize=True)
    std = np.concatenate(plain).std()
    for p, s in zip(plain, scaled, strict=True):
        np.testing.assert_allclose(s, p / std)
    assert np.concatenate(scaled).std() == pytest.approx(1.0)


def test_assign_covers_the_tokens_the_student_wrote_and_the_objective_trains_on_them():
    def sample(index, correction_start=None):
        return Sample(
            np.array([1, 2]),
            np.array([3, 4, 5]),
            np.log(np.array([0.5, 0.25, 0.5], dtype=np.float32)),
            0,
            prompt_index=index,
            teacher_logprobs=np.log(np.array([0.25, 0.25, 0.125], dtype=np.float32)),
            teacher_topk_ids=np.zeros((3, 1), dtype=np.int64),
            teacher_topk_logprobs=np.zeros((3, 1), dtype=np.float32),
            correction_start=correction_start,
        )

    samples = [sample(0), sample(0, correction_start=2), sample(1)]
    cfg = load_config("default", ["loss.type=reverse_kl", "loss.discount=1.0", "loss.baseline=group"]).loss
    metrics = A.assign(samples, cfg)
    assert [len(s.advantages) for s in samples] == [3, 2, 3] and metrics["train/advantage_std"] > 0
    batch = collate(samples, pad_id=0, top_k=1)
    expected = torch.zeros_like(batch["mask"])
    for i, s in enumerate(samples):
        expected[i, 1 : 1 + len(s.advantages)] = torch.from_numpy(s.advantages)
    torch.testing.assert_close(batch["advantages"], expected)

    logits = torch.randn(*batch["input_ids"].shape, 8, requires_grad=True)
    loss, _ = OBJECTIVES.get("reverse_kl")(logits[:, :-1], batch, cfg, 1.0)
    lp = losses.token_logprobs(logits[:, :-1], batch["input_ids"][:, 1:])
    w = torch.exp(lp.detach() - batch["old_logprobs"]).clamp(max=cfg.is_cap)
    want = losses.masked_mean(-(w * expected * lp), batch["mask"])
    torch.testing.assert_close(loss, want)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["loss.type=jsd", "loss.discount=0.5"], "loss.discount"),
        (["loss.type=jsd", "loss.normalize_advantages=true"], "loss.normalize_advantages"),
        (["loss.type=reverse_kl", "loss.baseline=mean"], "loss.baseline"),
        (["loss.type=reverse_kl", "loss.discount=1.5"], "loss.discount"),
        (["loss.type=reverse_kl", "loss.baseline=optimal", "loss.normalize_advantages=true"], "normalize"),
        (["loss.type=reverse_kl", "loss.baseline=group", "rollout.samples_per_prompt=1"], "loss.baseline"),
    ],
)
def test_bad_advantage_settings_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config("default", overrides)
