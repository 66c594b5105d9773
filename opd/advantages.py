"""Per-token advantages for `loss.type=reverse_kl`: the variance reduction the on-policy distillation literature uses.

On a token the student sampled itself, `r_t = log p_teacher(y_t) - log p_student(y_t)` is a one-sample estimate of
`-KL(student || teacher)` at that position; the policy gradient `-sum_t A_t * grad log p_student(y_t)` turns it into
a training signal. What `A_t` is:

* `loss.discount` (gamma): `A_t = G_t = sum_{s >= t} gamma^(s-t) r_s`. gamma = 0 (the default) credits each token with
  its own reward only (the Thinking Machines / Qwen3 recipe): in expectation, the gradient of `sum_t KL_t` with the
  prefix distribution held fixed. gamma = 1 is the return-to-go: in expectation, the exact gradient of the
  sequence-level `KL(student || teacher)` (MiniLLM), since a token also changes which prefixes the later tokens see.
  In between trades that bias for variance.
* `loss.baseline=group`: subtract, at each position t, the mean of `G_t` over the *other* samples of the same prompt
  that reach t (leave-one-out, as RLOO). It does not depend on the sample's own tokens, so the expected gradient is
  unchanged, while the part of the return all of a prompt's samples share cancels.
* `loss.baseline=optimal`: subtract, at each position t, the constant that minimises the variance of the
  gradient at the logits there, `E[r |g|^2] / E[|g|^2]` under the student's own distribution (`g` the gradient of
  `log p_student(y_t)` with respect to the position's logits; the teacher's log-probs from its top-k, its tail taken
  as even; `opd.losses.optimal_reverse_kl_baseline`). A function of the prefix, so unbiased for every discount
  (the minimiser for the per-token reward, discount 0). It needs the student's logits, so the learner's objective
  subtracts it, and nothing here changes.
* `loss.normalize_advantages`: divide every advantage of the round by their standard deviation (over the student's
  own tokens). A per-round step size, not an unbiased change: the deviation is estimated from the same samples,
  an effect that shrinks as rounds grow.

Pure numpy over per-sample arrays; `assign` writes them onto a round's samples (the driver has the whole round,
so groups are complete), and the learner's `reverse_kl` objective reads them instead of `r_t`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

BASELINES = ("none", "group", "optimal")


def rewards(logprobs: np.ndarray, teacher_logprobs: np.ndarray) -> np.ndarray:
    """`r_t = log p_teacher - log p_student` on the sampled tokens, float64."""
    return np.asarray(teacher_logprobs, dtype=np.float64) - np.asarray(logprobs, dtype=np.float64)


def discounted_returns(reward: np.ndarray, discount: float) -> np.ndarray:
    """`G_t = sum_{s >= t} discount^(s-t) r_s` (a reverse running sum); `discount=0` gives `r` back."""
    if discount == 0.0:
        return np.array(reward, dtype=np.float64)
    out = np.empty(len(reward), dtype=np.float64)
    running = 0.0
    for t in range(len(reward) - 1, -1, -1):
        running = reward[t] + discount * running
        out[t] = running
    return out


def leave_one_out(returns: Sequence[np.ndarray], groups: Sequence[int]) -> list[np.ndarray]:
    """Each sample's returns less, position by position, the mean return of the other samples of its group (those
    at least that long); 0 where no other sample reaches a position, so a lone sample keeps its returns."""
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    out: list[np.ndarray] = [np.empty(0)] * len(returns)
    for idx in members.values():
        width = max((len(returns[i]) for i in idx), default=0)
        total, count = np.zeros(width), np.zeros(width)
        for i in idx:
            total[: len(returns[i])] += returns[i]
            count[: len(returns[i])] += 1
        for i in idx:
            n = len(returns[i])
            others = count[:n] - 1
            mean = np.divide(total[:n] - returns[i], others, out=np.zeros(n), where=others > 0)
            out[i] = returns[i] - mean
    return out


def advantages(
    rewards_: Sequence[np.ndarray], groups: Sequence[int], discount: float, baseline: str, normalize: bool
) -> list[np.ndarray]:
    """Per-token advantages for each sample's rewards (see the module docstring); `groups` is each one's prompt."""
    if baseline not in BASELINES:
        raise ValueError(f"baseline={baseline!r}; expected one of {BASELINES}")
    adv = [discounted_returns(r, discount) for r in rewards_]
    if baseline == "group":
        adv = leave_one_out(adv, groups)
    if normalize:
        std = float(_flat(adv).std())
        if std > 0:
            adv = [a / std for a in adv]
    return adv


def shapes_advantages(loss) -> bool:
    """Whether `loss` (the config's section) asks for more than the plain per-token reward."""
    return loss.type == "reverse_kl" and (loss.discount > 0 or loss.baseline == "group" or loss.normalize_advantages)


def assign(samples: list, loss) -> dict[str, float]:
    """Fill each sample's `advantages` over the tokens it wrote itself, from its teacher log-probs; returns metrics."""
    own = [s.student_tokens for s in samples]
    r = [rewards(s.logprobs[:n], s.teacher_logprobs[:n]) for s, n in zip(samples, own, strict=True)]
    adv = advantages(r, [s.prompt_index for s in samples], loss.discount, loss.baseline, loss.normalize_advantages)
    for s, a in zip(samples, adv, strict=True):
        s.advantages = a.astype(np.float32)
    return {"train/reward_std": float(_flat(r).std()), "train/advantage_std": float(_flat(adv).std())}


def _flat(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Every token's value in one array (a single 0 when there are none, so a deviation is 0, not NaN)."""
    return np.concatenate([a for a in arrays if len(a)] or [np.zeros(1)])
