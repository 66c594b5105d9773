"""Evaluation with fake rollout and teachers: several sets, the verifier that grades, pass@k and mean@k."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from opd.buffer.sample import Sample
from opd.config import ConfigError, load_config
from opd.data import Encoded, Prompt
from opd.evaluation import Evaluator, pass_and_mean_at_k
from opd.teachers.judge import get_verifier


class Tokenizer:
    """Token ids are characters."""

    def batch_decode(self, ids, skip_special_tokens=True):
        return ["".join(chr(t) for t in row) for row in ids]


def ids(text: str) -> np.ndarray:
    return np.asarray([ord(c) for c in text])


class Rollout:
    """Answers from a script: `answers[(prompt index, temperature)]` lists the texts of its samples in turn."""

    def __init__(self, answers: dict) -> None:
        self.answers, self.calls = answers, []

    def generate(self, prompts, n, temperature, seed, top_p=1.0):
        self.calls.append((n, temperature, seed, top_p))
        out = []
        for e in prompts:
            texts = self.answers[(e.prompt.index, temperature)]
            for k in range(n):
                response = ids(texts[k % len(texts)])
                out.append(Sample(np.asarray(e.ids), response, np.zeros(len(response)), 0, e.prompt.index,
                                  e.prompt.answer))  # fmt: skip
        return out


class Teachers:
    def __init__(self) -> None:
        self.asked: list[tuple[str | None, list[int]]] = []
        """(teacher, prompt ids) of each `generate`."""

    def score(self, samples, top_k, prompts):
        for s in samples:
            s.teacher_logprobs = s.logprobs - 0.5

    def generate(self, ids, n, max_tokens, temperature, seed, prompts, name=None):
        self.asked.append((name, [i[0] for i in ids]))
        answer = {None: "7", "sevens": "7", "nines": "9"}[name]  # the first teacher ("sevens") answers 7, "nines" 9
        return [[(np.asarray([ord(answer)]), np.zeros(1))] for _ in ids]


def cfg(**eval_keys):
    return SimpleNamespace(
        combine=SimpleNamespace(rule="mean_logprob"),
        rollout=SimpleNamespace(temperature=1.0, max_new_tokens=8),
        eval=SimpleNamespace(**({"samples_per_prompt": 4, "temperature": None, "top_p": 1.0} | eval_keys)),
    )


def prompts(answers: list[str | None]) -> list[Encoded]:
    return [Encoded(Prompt(i, f"q{i}", a), [i]) for i, a in enumerate(answers)]


def test_pass_and_mean_at_k_over_prompts():
    # prompt 0: 1 of 4 right, prompt 1: none, prompt 2: all.
    correct = [True, False, False, False] + [False] * 4 + [True] * 4
    passes, means = pass_and_mean_at_k(correct, [0] * 4 + [1] * 4 + [2] * 4, 4)
    assert passes == pytest.approx((1 + 0 + 1) / 3)
    assert means == pytest.approx((0.25 + 0 + 1) / 3)
    passes, _ = pass_and_mean_at_k(correct, [0] * 4 + [1] * 4 + [2] * 4, 2)
    assert passes == pytest.approx((0.5 + 0 + 1) / 3)  # 1 - C(3,2)/C(4,2) = 0.5


def test_sets_are_graded_and_named_apart_by_the_configured_verifier():
    answers = {(0, 0.0): ["so 12"], (0, 1.0): ["12", "3", "3", "3"], (1, 0.0): ["\\boxed{\\frac{1}{2}}"],
               (1, 1.0): ["0.5"]}  # fmt: skip
    sets = {"": prompts(["12", "1/2"]), "math": prompts(["12", "1/2"])}
    ev = Evaluator(cfg(), sets, Rollout(answers), Teachers(), None, Tokenizer(), get_verifier("math"))
    metrics = ev.student()
    for prefix in ("eval/", "eval/math/"):
        assert metrics[f"{prefix}student_accuracy"] == 1.0  # math-verify reads both greedy answers
        assert metrics[f"{prefix}pass@4"] == 1.0 and metrics[f"{prefix}mean@4"] == pytest.approx((0.25 + 1) / 2)
        assert metrics[f"{prefix}reverse_kl"] == pytest.approx(0.5)
    assert ev.teacher_accuracy() == {"eval/teacher_accuracy": 0.0, "eval/math/teacher_accuracy": 0.0}
    # The last-number rule cannot read \boxed{\frac{1}{2}}.
    last_number = Evaluator(cfg(), sets, Rollout(answers), Teachers(), None, Tokenizer(), get_verifier("exact_answer"))
    assert last_number.student()["eval/student_accuracy"] == 0.5


def test_pass_at_k_samples_at_eval_temperature_and_top_p_only_when_they_differ():
    answers = {(0, 0.0): ["1"], (0, 1.0): ["2"], (0, 0.6): ["1"]}
    rollout = Rollout(answers)
    ev = Evaluator(cfg(), {"": prompts(["1"])}, rollout, Teachers(), None, Tokenizer(), get_verifier("exact_answer"))
    assert ev.student()["eval/pass@4"] == 0.0 and len(rollout.calls) == 2  # the reverse-KL samples serve
    rollout = Rollout(answers)
    ev = Evaluator(cfg(temperature=0.6, top_p=0.9), {"": prompts(["1"])}, rollout, Teachers(), None, Tokenizer(),
                   get_verifier("exact_answer"))  # fmt: skip
    assert ev.student()["eval/pass@4"] == 1.0
    assert rollout.calls[-1] == (4, 0.6, -2, 0.9)


def test_under_route_each_prompt_is_answered_by_its_own_teacher():
    route = cfg()
    route.combine = SimpleNamespace(
        rule="route", route_field="domain", routes={"a": "sevens", "b": "nines"}, default=None
    )
    routed = [("a", "sevens"), ("b", "nines"), ("b", "nines"), ("a", "sevens")]  # as `encode` routes them
    sets = {"": [Encoded(Prompt(i, f"q{i}", "9", {"domain": d}), [i], t) for i, (d, t) in enumerate(routed)]}
    teachers = Teachers()
    ev = Evaluator(route, sets, Rollout({}), teachers, None, Tokenizer(), get_verifier("exact_answer"))
    assert ev.teacher_accuracy() == {"eval/teacher_accuracy": 0.5}  # the "nines" teacher's two prompts only
    assert teachers.asked == [("sevens", [0, 3]), ("nines", [1, 2])]
    first = Evaluator(cfg(), sets, Rollout({}), Teachers(), None, Tokenizer(), get_verifier("exact_answer"))
    assert first.teacher_accuracy() == {"eval/teacher_accuracy": 0.0}  # without routing: the first teacher's 7s


def test_prompts_without_answers_report_reverse_kl_only():
    ev = Evaluator(cfg(), {"": prompts([None])}, Rollout({(0, 0.0): ["x"], (0, 1.0): ["y"]}), Teachers(), None,
                   Tokenizer(), get_verifier("exact_answer"))  # fmt: skip
    assert set(ev.student()) == {"eval/reverse_kl"}
    assert ev.teacher_accuracy() == {}


def test_eval_sets_in_the_config(tiny_assets):
    base, path = [f"data.train={tiny_assets['train']}"], str(tiny_assets["eval"])
    cfg = load_config("default", [*base, f"data.eval={{arith: {tiny_assets['eval']}, again: {tiny_assets['eval']}}}"])
    assert cfg.data.eval_sets() == {"arith": path, "again": path}
    assert load_config("default", [*base, f"data.eval={tiny_assets['eval']}"]).data.eval_sets() == {"": path}
    with pytest.raises(ConfigError, match=r"data\.eval\.held=/nowhere\.jsonl: no such file"):
        load_config("default", [*base, "data.eval={held: /nowhere.jsonl}"])
    with pytest.raises(ConfigError, match=r"eval\.top_p=0\.0"):
        load_config("default", [*base, "eval.top_p=0"])
