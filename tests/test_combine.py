"""Tests for opd.teachers.combine on hand-written distributions (V = 4, R = 2, K = 2), expected values by math.log."""

from __future__ import annotations

import math

import numpy as np
import pytest

from opd.rollout.engine import Scored
from opd.teachers import combine
from opd.teachers.combine import RULES, mean_logprob, mixture, pick_best, route_teacher

V = 4
L = math.log
NEG = -math.inf

# Full distributions the teachers' top-2 are cut from (row = position).
A_FULL = [[0.5, 0.3, 0.1, 0.1], [0.1, 0.2, 0.6, 0.1]]
B_FULL = [[0.2, 0.1, 0.65, 0.05], [0.05, 0.15, 0.7, 0.1]]
SAMPLED = [1, 3]  # the student's tokens


def scored(full: list[list[float]], k: int = 2, sampled: list[int] = SAMPLED) -> Scored:
    """A teacher's Scored: sampled-token log-probs and the top-k of each row, by decreasing probability."""
    ids = [sorted(range(len(row)), key=lambda i: -row[i])[:k] for row in full]
    return Scored(
        np.array([L(row[t]) for row, t in zip(full, sampled, strict=True)], dtype=np.float32),
        np.array(ids, dtype=np.int64),
        np.array([[L(row[i]) for i in r] for row, r in zip(full, ids, strict=True)], dtype=np.float32),
    )


@pytest.fixture
def signals() -> dict[str, Scored]:
    return {"A": scored(A_FULL), "B": scored(B_FULL)}


def as_dict(s: Scored, row: int) -> dict[int, float]:
    """Non-padding top-k entries of one row as id -> log-prob."""
    return {int(i): float(v) for i, v in zip(s.topk_ids[row], s.topk_logprobs[row], strict=True) if v > NEG}


def test_rest_logprob_spreads_missing_mass_over_the_rest_of_the_vocab(signals):
    # A row 0: top-2 hold 0.8, 2 ids left -> 0.1 each; B row 1: top-2 hold 0.85 -> 0.075 each.
    np.testing.assert_allclose(combine.rest_logprob(signals["A"].topk_logprobs, V), [L(0.1), L(0.1)], rtol=1e-6)
    np.testing.assert_allclose(combine.rest_logprob(signals["B"].topk_logprobs, V), [L(0.075), L(0.075)], rtol=1e-6)
    # Padding does not count as an entry; a top-k covering the whole vocabulary leaves no rest.
    padded = np.array([[L(0.9), NEG]], dtype=np.float32)
    assert combine.rest_logprob(padded, V)[0] == pytest.approx(L(0.1 / 3), rel=1e-6)
    assert combine.rest_logprob(np.log(np.full((1, 4), 0.25)), V)[0] == NEG


# ---------------------------------------------------------------- mean_logprob (product of experts)


def test_mean_logprob_is_the_normalised_weighted_geometric_mean(signals):
    out = mean_logprob(signals, {"A": 1.0, "B": 3.0}, vocab_size=V, top_k=2)
    wa, wb = 0.25, 0.75
    assert out.logprobs.dtype == np.float32 and out.topk_ids.dtype == np.int64

    # Row 0: union {0, 1, 2}. A lacks 2 (rest (1 - .8) / 2 = .1), B lacks 1 (rest (1 - .85) / 2 = .075);
    # the one id outside the union (3) gets both rests. Z normalises over all four.
    raw = {0: wa * L(0.5) + wb * L(0.2), 1: wa * L(0.3) + wb * L(0.075), 2: wa * L(0.1) + wb * L(0.65)}
    z0 = L(sum(math.exp(v) for v in raw.values()) + math.exp(wa * L(0.1) + wb * L(0.075)))
    expected = dict(sorted(((i, v - z0) for i, v in raw.items()), key=lambda kv: -kv[1])[:2])
    assert list(out.topk_ids[0]) == list(expected)  # sorted by decreasing log-prob: [2, 0]
    np.testing.assert_allclose(out.topk_logprobs[0], list(expected.values()), rtol=1e-6)

    # Row 1: both teachers list {2, 1}; the two ids outside (0, 3) share A's .1 and B's .075 rests.
    raw = {2: wa * L(0.6) + wb * L(0.7), 1: wa * L(0.2) + wb * L(0.15)}
    z1 = L(sum(math.exp(v) for v in raw.values()) + 2 * math.exp(wa * L(0.1) + wb * L(0.075)))
    assert as_dict(out, 1) == pytest.approx({i: v - z1 for i, v in raw.items()}, rel=1e-6)
    assert np.exp(out.topk_logprobs[1].astype(np.float64)).sum() < 1

    # Sampled tokens: 1 (A .3, B .1) and 3 (A .1, B .1: each teacher's own value, not a rest estimate),
    # normalised by the same Z as the top-k: one distribution.
    np.testing.assert_allclose(out.logprobs, [wa * L(0.3) + wb * L(0.1) - z0, L(0.1) - z1], rtol=1e-6)


def test_mean_logprob_of_identical_teachers_is_that_teacher(signals):
    out = mean_logprob({"A": signals["A"], "A2": signals["A"]}, vocab_size=V, top_k=2)
    np.testing.assert_allclose(out.logprobs, signals["A"].logprobs, rtol=1e-6)
    np.testing.assert_array_equal(out.topk_ids, signals["A"].topk_ids)
    # A's own full-vocabulary values: the 0.2 outside its top-2 stays outside.
    np.testing.assert_allclose(out.topk_logprobs[0], [L(0.5), L(0.3)], rtol=1e-6)


def test_mean_logprob_zero_weight_teacher_is_ignored_even_with_minus_inf(signals):
    dead = Scored(np.full(2, NEG, np.float32), np.zeros((2, 2), np.int64), np.full((2, 2), NEG, np.float32))
    out = mean_logprob({"A": signals["A"], "dead": dead}, {"A": 2.0, "dead": 0.0}, vocab_size=V, top_k=2)
    np.testing.assert_allclose(out.logprobs, signals["A"].logprobs, rtol=1e-6)
    assert np.isfinite(out.topk_logprobs).all()


# ---------------------------------------------------------------- mixture


def test_mixture_is_log_of_weighted_probabilities(signals):
    out = mixture(signals, {"A": 0.5, "B": 0.5}, vocab_size=V, top_k=2)
    np.testing.assert_allclose(out.logprobs, [L(0.5 * 0.3 + 0.5 * 0.1), L(0.5 * 0.1 + 0.5 * 0.1)], rtol=1e-6)
    # Row 0 union {0, 1, 2}: 0 -> .5*.5 + .5*.2 = .35; 1 -> .5*.3 + .5*rest_B(.075); 2 -> .5*rest_A(.1) + .5*.65.
    # Top-2 is [2, 0], not renormalised (full-vocabulary log-probs).
    assert list(out.topk_ids[0]) == [2, 0]
    np.testing.assert_allclose(out.topk_logprobs[0], [L(0.375), L(0.35)], rtol=1e-6)
    assert as_dict(out, 1) == pytest.approx({2: L(0.65), 1: L(0.175)}, rel=1e-6)


def test_mixture_unequal_weights_and_larger_k_pads(signals):
    out = mixture(signals, {"A": 1.0, "B": 3.0}, vocab_size=V, top_k=4)
    assert out.topk_ids.shape == (2, 4)
    # Row 0 has a 3-id union, so the 4th entry is padding (id 0, -inf), as the engine pads.
    assert out.topk_ids[0, 3] == 0 and out.topk_logprobs[0, 3] == NEG
    expected = {
        0: L(0.25 * 0.5 + 0.75 * 0.2),
        1: L(0.25 * 0.3 + 0.75 * 0.075),
        2: L(0.25 * 0.1 + 0.75 * 0.65),
    }
    assert as_dict(out, 0) == pytest.approx(expected, rel=1e-6)
    assert out.logprobs[0] == pytest.approx(L(0.25 * 0.3 + 0.75 * 0.1), rel=1e-6)


def test_padding_entries_never_match_a_real_id():
    # A's second slot is padding with id 0; B really lists id 0. A must use its rest estimate for id 0
    # (0.1 spread over the 3 ids it does not list), not the padding's -inf.
    a = Scored(np.array([L(0.9)], np.float32), np.array([[3, 0]]), np.array([[L(0.9), NEG]], np.float32))
    b = Scored(np.array([L(0.2)], np.float32), np.array([[0, 3]]), np.array([[L(0.5), L(0.2)]], np.float32))
    out = mixture({"A": a, "B": b}, vocab_size=V, top_k=3)
    assert as_dict(out, 0) == pytest.approx({3: L(0.5 * 0.9 + 0.5 * 0.2), 0: L(0.5 * 0.1 / 3 + 0.5 * 0.5)}, rel=1e-6)
    assert list(out.topk_ids[0]) == [3, 0, 0] and out.topk_logprobs[0, 2] == NEG
    poe = mean_logprob({"A": a, "B": b}, vocab_size=V, top_k=2)
    assert np.isfinite(poe.topk_logprobs).all()


# ---------------------------------------------------------------- route / best_of


def test_route_teacher_by_field():
    table = {"math": "A", "code": "B"}
    assert route_teacher({"domain": "code", "prompt": "x"}, "domain", table, None) == "B"
    assert route_teacher({"domain": "poetry"}, "domain", table, "A") == "A"
    with pytest.raises(ValueError, match=r"domain='poetry'.*\['code', 'math'\]"):
        route_teacher({"domain": "poetry"}, "domain", table, None)
    with pytest.raises(ValueError, match="no field 'domain'"):
        route_teacher({"prompt": "x"}, "domain", table, None)


def test_pick_best_highest_score_nan_never_wins_ties_by_order():
    assert pick_best({"A": 0.2, "B": 0.9}, ["A", "B"]) == "B"
    assert pick_best({"A": math.nan, "B": -5.0}, ["A", "B"]) == "B"
    assert pick_best({"A": 0.5, "B": 0.5}, ["A", "B"]) == "A"
    assert pick_best({"A": 0.5, "B": 0.5}, ["B", "A"]) == "B"
    assert pick_best({"A": math.nan, "B": math.nan}, ["B", "A"]) == "B"
    with pytest.raises(ValueError, match="no teachers"):
        pick_best({}, [])


# ---------------------------------------------------------------- registry and validation


def test_registry_lookup_and_duplicates():
    assert RULES.names() == ["mean_logprob", "mixture"]
    assert RULES.get("mixture") is mixture
    with pytest.raises(KeyError, match=r"mixtrue.*mean_logprob, mixture"):
        RULES.get("mixtrue")
    with pytest.raises(ValueError, match="already registered"):
        RULES.register("mixture")(mean_logprob)


def test_validation(signals):
    short = Scored(np.zeros(1, np.float32), np.zeros((1, 2), np.int64), np.zeros((1, 2), np.float32))
    for rule in (mean_logprob, mixture):
        with pytest.raises(ValueError, match=r"'A': 2, 'C': 1"):
            rule({"A": signals["A"], "C": short}, vocab_size=V, top_k=2)
        with pytest.raises(ValueError, match=r"unknown: \['C'\]"):
            rule(signals, {"A": 1.0, "B": 1.0, "C": 1.0}, vocab_size=V, top_k=2)
        with pytest.raises(ValueError, match=r"missing: \['B'\]"):
            rule(signals, {"A": 1.0}, vocab_size=V, top_k=2)
        with pytest.raises(ValueError, match="positive sum"):
            rule(signals, {"A": 0.0, "B": 0.0}, vocab_size=V, top_k=2)
        with pytest.raises(ValueError, match="non-negative"):
            rule(signals, {"A": 2.0, "B": -1.0}, vocab_size=V, top_k=2)
    bad_shape = Scored(np.zeros(2, np.float32), np.zeros((2, 2), np.int64), np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="'bad'"):
        mixture({"A": signals["A"], "bad": bad_shape}, vocab_size=V, top_k=2)


def test_teachers_write_for_the_prompts_routed_to_them_and_the_answers_keep_the_prompts_order():
    """Offline KD's responses and the teacher accuracy (opd.teachers.combine.generate_routed): under route each
    prompt goes to the teacher `encode` routed it to, one call per teacher; under any other rule all go to the
    first."""
    from types import SimpleNamespace

    from opd.data import Encoded, Prompt
    from opd.teachers.combine import generate_routed

    class Pool:
        def __init__(self) -> None:
            self.asked: list[tuple[str | None, list[int]]] = []

        def generate(self, ids, n, max_tokens, temperature, seed, prompts, name=None):
            self.asked.append((name, [i[0] for i in ids]))
            return [f"{name}:{i[0]}" for i in ids]

    route = SimpleNamespace(rule="route", route_field="domain", routes={"a": "qwen", "b": "smollm2"}, default=None)
    prompts = [Encoded(Prompt(i, f"q{i}", None, {"domain": d}), [i], route.routes[d]) for i, d in enumerate("abba")]
    pool = Pool()
    assert generate_routed(pool, route, prompts, 4, 8, 1.0, None) == ["qwen:0", "smollm2:1", "smollm2:2", "qwen:3"]
    assert pool.asked == [("qwen", [0, 3]), ("smollm2", [1, 2])]
    pool = Pool()
    assert generate_routed(pool, SimpleNamespace(rule="mixture"), prompts, 4, 8, 1.0, None) == [
        f"None:{i}" for i in range(4)
    ]
    assert pool.asked == [(None, [0, 1, 2, 3])]
