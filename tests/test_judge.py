"""Judges: built-in and imported verifiers, rubric rendering, score parsing, group advantages."""

from __future__ import annotations

import math
from collections.abc import Mapping

import pytest

from opd.data import final_answer
from opd.teachers.judge import (
    VERIFIERS,
    JudgeRecord,
    contains_answer,
    exact_answer,
    get_verifier,
    group_advantage,
    judge_summary,
    non_empty,
    parse_score,
    render_rubric,
    run_verifier,
)

NOT_CALLABLE = 42


def my_verifier(response: str, answer: str | None, fields: Mapping[str, object]) -> float | None:
    """Imported by spec in the tests below: 1.0 when the response mentions the row's `keyword` field."""
    return 1.0 if str(fields.get("keyword", "")) in response else 0.0


# --- built-in verifiers -------------------------------------------------------------------------


def test_exact_answer() -> None:
    assert exact_answer("so 3+4 = 7", "7", {}) == 1.0
    assert exact_answer("it is 7, no wait 8", "7", {}) == 0.0
    assert exact_answer("7", " 7 ", {}) == 1.0
    assert exact_answer("7", None, {}) is None


def test_contains_answer() -> None:
    assert contains_answer("The capital is Paris.", "Paris", {}) == 1.0
    assert contains_answer("The capital is Lyon.", "Paris", {}) == 0.0
    assert contains_answer("anything", None, {}) is None
    assert contains_answer("anything", "  ", {}) is None


def test_non_empty() -> None:
    assert non_empty("x", None, {}) == 1.0
    assert non_empty(" \n\t", "7", {}) == 0.0
    assert non_empty("", None, {}) == 0.0


def test_builtins_are_registered() -> None:
    assert {"exact_answer", "contains_answer", "non_empty"} <= set(VERIFIERS.names())
    assert get_verifier("exact_answer") is exact_answer
    assert get_verifier("non_empty") is non_empty


# --- module:function resolution -----------------------------------------------------------------


def test_get_verifier_imports_module_function() -> None:
    assert callable(get_verifier("opd.data:final_answer"))
    assert get_verifier("opd.data:final_answer") is final_answer
    fn = get_verifier("tests.test_judge:my_verifier")
    assert fn("the word is banana", None, {"keyword": "banana"}) == 1.0
    assert fn("the word is apple", None, {"keyword": "banana"}) == 0.0


def test_get_verifier_from_a_user_module(tmp_path, monkeypatch) -> None:
    (tmp_path / "my_judges.py").write_text("def long_enough(response, answer, fields):\n    return len(response) > 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    record = run_verifier(get_verifier("my_judges:long_enough"), "long", None, {})
    assert record == JudgeRecord(1.0, "True")


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("exact_answr", ["exact_answr", "exact_answer", "contains_answer", "non_empty"]),
        ("no_such_module_xyz:fn", ["no_such_module_xyz:fn", "cannot import"]),
        ("opd.data:no_such_function", ["opd.data:no_such_function", "no attribute"]),
        ("tests.test_judge:NOT_CALLABLE", ["tests.test_judge:NOT_CALLABLE", "not a function"]),
        (":fn", [":fn", "module:function"]),
        ("opd.data:", ["opd.data:", "module:function"]),
    ],
)
def test_get_verifier_errors_name_the_spec(spec: str, words: list[str]) -> None:
    with pytest.raises(ValueError) as err:
        get_verifier(spec)
    for word in words:
        assert word in str(err.value)


# --- run_verifier never raises for a bad verdict ------------------------------------------------


def test_run_verifier_good_and_none() -> None:
    assert run_verifier(exact_answer, "= 7", "7", {}).score == 1.0
    none = run_verifier(exact_answer, "= 7", None, {})
    assert none.score is None and none.error is None


def test_run_verifier_out_of_range() -> None:
    record = run_verifier(lambda r, a, f: 2.0, "x", None, {})
    assert record.score is None
    assert record.error is not None and "2" in record.error and "0..1" in record.error
    assert run_verifier(lambda r, a, f: -0.1, "x", None, {}).score is None
    assert run_verifier(lambda r, a, f: math.nan, "x", None, {}).error is not None


def test_run_verifier_not_a_number() -> None:
    record = run_verifier(lambda r, a, f: "0.5", "x", None, {})
    assert record.score is None
    assert record.error is not None and "str" in record.error


def test_run_verifier_exception() -> None:
    def broken(response: str, answer: str | None, fields: Mapping[str, object]) -> float | None:
        raise ZeroDivisionError("boom")

    record = run_verifier(broken, "x", "1", {})
    assert record.score is None
    assert record.error is not None
    assert "broken" in record.error and "ZeroDivisionError" in record.error and "boom" in record.error


# --- rubric ---------------------------------------------------------------------------------------


def test_render_rubric_leaves_other_braces_alone() -> None:
    template = "Task: {prompt}\nResponse: {response}\nScore:"
    prompt = "Write f(x) = {x: 1} in JSON, then say {response} and {0}"
    out = render_rubric(template, prompt, "def f(): return {'a': 1}")
    assert out == (
        "Task: Write f(x) = {x: 1} in JSON, then say {response} and {0}\nResponse: def f(): return {'a': 1}\nScore:"
    )


def test_render_rubric_default_template() -> None:
    from opd.config.models import DEFAULT_RUBRIC

    out = render_rubric(DEFAULT_RUBRIC, "2+2=", "4")
    assert "Task: 2+2=" in out and "Response: 4" in out and "{" not in out


# --- parse_score ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "score"),
    [("7", 0.7), ("Score: 8/10", 0.8), (" 9.5 ", 0.95), ("0", 0.0), ("10", 1.0), ("8-9, mostly right", 0.8)],
)
def test_parse_score_reads_first_number(text: str, score: float) -> None:
    record = parse_score(text)
    assert record.score == pytest.approx(score)
    assert record.error is None
    assert record.raw == text


@pytest.mark.parametrize(("text", "error"), [("twelve", "no number"), ("", "no number"), ("12", "12, outside 0..10")])
def test_parse_score_failures(text: str, error: str) -> None:
    record = parse_score(text)
    assert record.score is None
    assert record.error is not None and error in record.error


def test_parse_score_negative_and_scale() -> None:
    assert parse_score("-3").score is None
    assert parse_score("4", scale=5).score == pytest.approx(0.8)
    assert parse_score("7", scale=5).error == "judge wrote 7, outside 0..5"
    with pytest.raises(ValueError):
        parse_score("1", scale=0)


def test_parse_score_truncates_raw() -> None:
    record = parse_score("5" + "!" * 500)
    assert record.score == pytest.approx(0.5)
    assert len(record.raw) == 200


# --- group advantage and summary --------------------------------------------------------------------


def test_group_advantage() -> None:
    scores = [1.0, 0.0, None, 0.5, None, None]
    groups = [0, 0, 0, 1, 2, 2]
    assert group_advantage(scores, groups) == pytest.approx([0.5, -0.5, 0.0, 0.0, 0.0, 0.0])


def test_group_advantage_interleaved_groups() -> None:
    assert group_advantage([1.0, 0.2, 0.0, 0.4], [3, 7, 3, 7]) == pytest.approx([0.5, -0.1, -0.5, 0.1])
    assert group_advantage([], []) == []
    with pytest.raises(ValueError):
        group_advantage([1.0], [0, 1])


def test_judge_summary() -> None:
    records = [
        JudgeRecord(1.0, "10"),
        JudgeRecord(0.5, "5"),
        JudgeRecord(None, "twelve", "no number in judge output"),
        JudgeRecord(None),  # no reference answer: not a failure
    ]
    assert judge_summary(records) == pytest.approx(
        {"judge/mean_score": 0.75, "judge/scored_fraction": 0.5, "judge/parse_failures": 1.0}
    )


def test_judge_summary_nothing_scored() -> None:
    summary = judge_summary([JudgeRecord(None, "", "no number in judge output")])
    assert summary == {"judge/scored_fraction": 0.0, "judge/parse_failures": 1.0}
    assert judge_summary([]) == {"judge/scored_fraction": 0.0, "judge/parse_failures": 0.0}
