"""Combine several teachers' signals for the same sample into one `Scored` (pure numpy).

Two kinds of `combine.rule`:
- merging rules (`RULES`: `mean_logprob`, `mixture`) turn every weighted teacher's signal for a sample into one;
- selecting rules pick ONE teacher per prompt before scoring, so only that teacher scores it: `route` by a
  prompt field (`route_teacher`), `best_of` by judge scores of the teachers' own answers (`pick_best`).

Every merging rule has the signature of `Rule`:

    rule(signals, weights=None, *, vocab_size, top_k) -> Scored

- `signals`: teacher name -> that teacher's `Scored` for this sample, in config order. All teachers must
  cover the same R response tokens.
- `weights`: teacher name -> non-negative weight, normalised to sum 1 (`None`: uniform). Used by the
  weighted rules (`mean_logprob`, `mixture`); it must name exactly the teachers in `signals`.
- `vocab_size` (V): the student vocabulary size, for the estimate of mass outside a teacher's top-k.
- `top_k`: K of the result; every rule returns `topk_ids`/`topk_logprobs` of shape [R, top_k], sorted by
  decreasing log-prob and padded with (id 0, -inf) as the engine pads.

Top-k entries whose log-prob is -inf are padding: they are never matched, never enter a union and
never count towards a teacher's top-k mass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from opd.registry import Registry
from opd.rollout.engine import Scored

# A teacher's missing (outside top-k) mass is floored here: float32 top-k log-probs can sum to slightly
# above 1, and a mass of exactly 0 would make every id outside that teacher's top-k impossible.
REST_MASS_FLOOR = 1e-7


class Rule(Protocol):
    def __call__(
        self, signals: Mapping[str, Scored], weights: Mapping[str, float] | None = None, *, vocab_size: int, top_k: int
    ) -> Scored: ...


RULES: Registry[Rule] = Registry("combine rule")
SELECTING = ("route", "best_of")
"""Rules that pick one teacher per prompt before scoring, so nothing is merged."""


# ---------------------------------------------------------------- validation and helpers


def _check_signals(signals: Mapping[str, Scored]) -> int:
    """Check shapes; return R. Teachers disagreeing on R are named, since that means misaligned tokenizations."""
    if not signals:
        raise ValueError("no teacher signals to combine")
    lengths = {}
    for name, s in signals.items():
        lp, ids, vals = np.asarray(s.logprobs), np.asarray(s.topk_ids), np.asarray(s.topk_logprobs)
        if lp.ndim != 1 or ids.ndim != 2 or ids.shape != vals.shape or ids.shape[0] != lp.shape[0]:
            raise ValueError(
                f"teacher {name!r}: expected logprobs [R] and top-k [R, K], got logprobs {lp.shape}, "
                f"topk_ids {ids.shape}, topk_logprobs {vals.shape}"
            )
        lengths[name] = lp.shape[0]
    if len(set(lengths.values())) > 1:
        listing = ", ".join(f"{n!r}: {r}" for n, r in lengths.items())
        raise ValueError(f"teachers disagree on the number of response tokens ({listing})")
    return next(iter(lengths.values()))


def _check_sizes(vocab_size: int, top_k: int) -> None:
    if vocab_size < 1 or top_k < 1:
        raise ValueError(f"vocab_size and top_k must be positive, got vocab_size={vocab_size}, top_k={top_k}")


def _normalised_weights(signals: Mapping[str, Scored], weights: Mapping[str, float] | None) -> dict[str, float]:
    """Weights summing to 1, in `signals` order, teachers with weight 0 dropped (they cannot contribute)."""
    if weights is None:
        return {name: 1.0 / len(signals) for name in signals}
    unknown = [n for n in weights if n not in signals]
    missing = [n for n in signals if n not in weights]
    if unknown or missing:
        raise ValueError(
            f"weights must name exactly the teachers {list(signals)}; unknown: {unknown}, missing: {missing}"
        )
    bad = {n: w for n, w in weights.items() if not (np.isfinite(w) and w >= 0)}
    if bad:
        raise ValueError(f"weights must be finite and non-negative, got {bad}")
    total = float(sum(weights.values()))
    if total <= 0:
        raise ValueError(f"weights must have a positive sum, got {dict(weights)}")
    return {n: float(weights[n]) / total for n in signals if weights[n] > 0}


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    """log(sum(exp(x))) along `axis`; all -inf gives -inf (not NaN)."""
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(m, axis=axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def rest_logprob(topk_logprobs: np.ndarray, vocab_size: int) -> np.ndarray:
    """[R] per-id log-prob a teacher gives an id outside its top-k: the missing mass spread evenly.

    log(max(1 - sum exp(topk), REST_MASS_FLOOR) / max(V - n, 1)) with n the non-padding entries at that
    position; -inf when n >= V (the top-k already lists the whole vocabulary).
    """
    vals = np.asarray(topk_logprobs, dtype=np.float64)
    valid = vals > -np.inf
    n = valid.sum(axis=1)
    mass = 1.0 - np.where(valid, np.exp(np.where(valid, vals, 0.0)), 0.0).sum(axis=1)
    rest = np.log(np.maximum(mass, REST_MASS_FLOOR)) - np.log(np.maximum(vocab_size - n, 1))
    return np.where(n >= vocab_size, -np.inf, rest)


def _union(
    signals: Mapping[str, Scored], names: Sequence[str], vocab_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidates = union of the teachers' top-k ids per position, and each teacher's log-prob for each.

    Returns ids [R, C], keep [R, C] (first occurrence of a non-padding id) and log-probs [T, R, C], where
    a teacher lacking the id in its top-k contributes its `rest_logprob` estimate.
    """
    ids = np.concatenate([np.asarray(signals[n].topk_ids, dtype=np.int64) for n in names], axis=1)
    vals = np.concatenate([np.asarray(signals[n].topk_logprobs, dtype=np.float64) for n in names], axis=1)
    valid = vals > -np.inf
    same = (ids[:, :, None] == ids[:, None, :]) & valid[:, None, :]
    earlier = np.tril(np.ones((ids.shape[1], ids.shape[1]), dtype=bool), k=-1)
    keep = valid & ~(same & earlier).any(axis=2)
    per_teacher = []
    for n in names:
        t_ids = np.asarray(signals[n].topk_ids, dtype=np.int64)
        t_vals = np.asarray(signals[n].topk_logprobs, dtype=np.float64)
        match = (ids[:, :, None] == t_ids[:, None, :]) & (t_vals > -np.inf)[:, None, :]
        found = np.take_along_axis(t_vals, match.argmax(axis=2), axis=1) if t_ids.shape[1] else np.zeros(ids.shape)
        rest = rest_logprob(t_vals, vocab_size)
        per_teacher.append(np.where(match.any(axis=2), found, rest[:, None]))
    return ids, keep, np.stack(per_teacher)


def _top(ids: np.ndarray, scores: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """The `top_k` highest scores per row (stable: earlier candidates win ties), -inf entries as (0, -inf)."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
    out_ids = np.take_along_axis(ids, order, axis=1)
    out_vals = np.take_along_axis(scores, order, axis=1)
    pad = top_k - out_ids.shape[1]
    if pad > 0:
        out_ids = np.pad(out_ids, ((0, 0), (0, pad)))
        out_vals = np.pad(out_vals, ((0, 0), (0, pad)), constant_values=-np.inf)
    out_ids = np.where(out_vals > -np.inf, out_ids, 0)
    return out_ids.astype(np.int64), out_vals.astype(np.float32)


# ---------------------------------------------------------------- rules


@RULES.register("mean_logprob")
def mean_logprob(
    signals: Mapping[str, Scored],
    weights: Mapping[str, float] | None = None,
    *,
    vocab_size: int,
    top_k: int,
) -> Scored:
    """Weighted product of experts: p(x) = prod_i p_i(x)^w_i / Z — the student is pushed to where all agree.

    One normalised distribution for both fields, so the sampled-token log-prob and the top-k describe the
    same target (and the mass outside the top-k, which the learner's losses use, is meaningful):

    - candidates are the union U of the teachers' top-k ids; a teacher missing an id contributes its
      `rest_logprob` (its missing mass spread evenly over the ids outside its top-k);
    - the V - |U| ids outside the union all score sum_i w_i rest_i (every teacher's rest estimate);
    - Z sums both parts, so identical teachers give back that teacher exactly;
    - the sampled token's log-prob is sum_i w_i lp_i (each teacher's exact value) minus log Z;
    - the `top_k` highest of U are kept.

    The approximation is the even spread of each teacher's missing mass; with full vocabularies it is exact.
    """
    _check_sizes(vocab_size, top_k)
    _check_signals(signals)
    w = _normalised_weights(signals, weights)
    names = list(w)
    ids, keep, per_teacher = _union(signals, names, vocab_size)
    wv = np.asarray([w[n] for n in names])[:, None, None]
    scores = np.where(keep, (wv * per_teacher).sum(axis=0), -np.inf)
    with np.errstate(divide="ignore"):
        rest = sum(w[n] * rest_logprob(np.asarray(signals[n].topk_logprobs), vocab_size) for n in names)
        outside = np.maximum(vocab_size - keep.sum(axis=1), 0)
        outside_mass = np.where(outside > 0, np.log(outside) + rest, -np.inf)
    log_z = _logsumexp(np.concatenate([scores, outside_mass[:, None]], axis=1), axis=1)
    log_z = np.where(np.isfinite(log_z), log_z, 0.0)
    poe = np.where(keep, scores - log_z[:, None], -np.inf)
    lp = sum(w[n] * np.asarray(signals[n].logprobs, dtype=np.float64) for n in names) - log_z
    top_ids, top_vals = _top(ids, poe, top_k)
    return Scored(np.asarray(lp, dtype=np.float32), top_ids, top_vals)


@RULES.register("mixture")
def mixture(
    signals: Mapping[str, Scored],
    weights: Mapping[str, float] | None = None,
    *,
    vocab_size: int,
    top_k: int,
) -> Scored:
    """Weighted mixture: p(x) = sum_i w_i p_i(x) — covers every teacher's modes (mass-covering).

    Sampled token: logsumexp_i(log w_i + lp_i), exact. Top-k: over the union of the teachers' top-k ids,
    each id scored the same way, a teacher missing the id contributing its `rest_logprob` estimate (the only
    approximation). The mixture of normalised distributions is normalised, so no renormalisation is done:
    the result keeps the full-vocabulary meaning `Scored` promises (mass outside = 1 - sum exp(top-k)).
    """
    _check_sizes(vocab_size, top_k)
    _check_signals(signals)
    w = _normalised_weights(signals, weights)
    names = list(w)
    log_w = np.log(np.asarray([w[n] for n in names]))
    lps = np.stack([np.asarray(signals[n].logprobs, dtype=np.float64) for n in names])
    lp = _logsumexp(log_w[:, None] + lps, axis=0)
    ids, keep, per_teacher = _union(signals, names, vocab_size)
    mix = np.where(keep, _logsumexp(log_w[:, None, None] + per_teacher, axis=0), -np.inf)
    top_ids, top_vals = _top(ids, mix, top_k)
    return Scored(np.asarray(lp, dtype=np.float32), top_ids, top_vals)


def route_teacher(prompt_fields: Mapping[str, object], key: str, table: Mapping[str, str], default: str | None) -> str:
    """The teacher for a prompt: `table[str(prompt_fields[key])]`, else `default`.

    With no match and no default this is a ValueError naming the field value and the known routes, since
    silently sending a prompt to an arbitrary teacher would train on the wrong expert.
    """
    if key in prompt_fields and str(prompt_fields[key]) in table:
        return table[str(prompt_fields[key])]
    if default is not None:
        return default
    found = f"{key}={prompt_fields[key]!r}" if key in prompt_fields else f"no field {key!r}"
    raise ValueError(f"no teacher route for prompt with {found}; known routes: {sorted(table)} and no default")


def routed_teacher(combine, prompt) -> str:
    """`route_teacher` for a `Prompt` under a config's `combine` section (its route_field, routes and default)."""
    return route_teacher(prompt.fields, combine.route_field, combine.routes, combine.default)


def generate_routed(
    pool, combine, prompts: list, n: int, max_tokens: int, temperature: float, seed: int | None
) -> list:
    """The teachers' own samples for encoded prompts (`TeacherPool.generate`), in input order: under
    combine.rule=route each prompt's by the teacher `encode` routed it to (`Encoded.teacher`), under any other rule
    (best_of's judged assignments included) all by the first teacher. Offline KD's training responses and the
    held-out teacher accuracy both come from here."""
    groups: dict[str | None, list[int]] = {}
    for i, e in enumerate(prompts):
        groups.setdefault(e.teacher if combine.rule == "route" else None, []).append(i)
    outs: list = [None] * len(prompts)
    for teacher, idx in groups.items():
        part = [prompts[i] for i in idx]
        answers = pool.generate(
            [e.ids for e in part], n, max_tokens, temperature, seed, [e.prompt for e in part], teacher
        )
        for i, answer in zip(idx, answers, strict=True):
            outs[i] = answer
    return outs


def pick_best(scores: Mapping[str, float], order: Sequence[str]) -> str:
    """Name with the highest score; ties go to the earlier name in `order`, NaN never wins.

    If every score is NaN (no verdict) the first name in `order` — the pool's default teacher — is returned.
    """
    if not order:
        raise ValueError("no teachers to choose from")
    best = order[0]
    best_score = -np.inf
    for name in order:
        s = float(scores[name])
        if s > best_score:  # NaN compares False: never taken
            best, best_score = name, s
    return best
