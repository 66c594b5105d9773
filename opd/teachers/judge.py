"""Whole-response judges: a Python verifier or a teacher's rubric score, normalised to [0, 1].

A judge scores a finished response (unlike distillation, which scores every token). Scores are
stored with each rollout and can be logged, filter samples, weight their loss, or be mixed into a
policy-gradient advantage (`group_advantage`). `None` means "no verdict" (no reference answer, an
unreadable judge output, a verifier that failed); a bad verdict never raises, because one odd sample
must not kill a long run. Pure Python: no Ray, torch or vLLM here.
"""

from __future__ import annotations

import importlib
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from opd.data import last_number_correct
from opd.grading import math_verdict
from opd.registry import Registry

Verifier = Callable[[str, str | None, Mapping[str, object]], float | None]
"""(response text, reference answer or None, the prompt's other fields) -> score in [0, 1] or None."""

RAW_CHARS = 200
"""How much of a judge's output (or a bad verifier return) a record keeps for debugging."""


@dataclass
class JudgeRecord:
    """One response's verdict: `score` in [0, 1] or None, what the judge wrote, and why it failed if it did."""

    score: float | None
    raw: str = ""
    error: str | None = None


VERIFIERS: Registry[Verifier] = Registry("verifier")


@VERIFIERS.register("exact_answer")
def exact_answer(response: str, answer: str | None, fields: Mapping[str, object]) -> float | None:
    """1.0 when the response's final number is the reference answer (GSM8K-style), None without a reference."""
    if answer is None:
        return None
    return 1.0 if last_number_correct(response, answer) else 0.0


@VERIFIERS.register("math")
def math_answer(response: str, answer: str | None, fields: Mapping[str, object]) -> float | None:
    """1.0 when the response's answer (`\\boxed{}` first) equals the reference mathematically (opd.grading),
    None without a readable reference."""
    verdict = math_verdict(response, answer)
    return None if verdict is None else float(verdict)


@VERIFIERS.register("contains_answer")
def contains_answer(response: str, answer: str | None, fields: Mapping[str, object]) -> float | None:
    """1.0 when the reference answer appears anywhere in the response (free-form answers), None without one."""
    if answer is None or not answer.strip():
        return None  # an empty reference would be "contained" in every response
    return 1.0 if answer.strip() in response else 0.0


@VERIFIERS.register("non_empty")
def non_empty(response: str, answer: str | None, fields: Mapping[str, object]) -> float | None:
    """1.0 for any non-blank response: a sanity judge that needs no reference."""
    return 1.0 if response.strip() else 0.0


def get_verifier(spec: str) -> Verifier:
    """A built-in verifier by name, or `package.module:function` imported on demand.

    Raises ValueError naming `spec` so a typo in a config fails before any actor starts.
    """
    if ":" not in spec:
        if spec in VERIFIERS:
            return VERIFIERS.get(spec)
        raise ValueError(
            f"unknown verifier {spec!r}; built-ins: {', '.join(VERIFIERS.names())} (or give package.module:function)"
        )
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise ValueError(f"verifier {spec!r}: expected package.module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, but also errors raised while the module runs
        raise ValueError(
            f"verifier {spec!r}: cannot import module {module_name!r} ({type(err).__name__}: {err})"
        ) from err
    obj: object = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"verifier {spec!r}: module {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"verifier {spec!r}: {attr_path!r} is a {type(obj).__name__}, not a function")
    return obj  # type: ignore[return-value]


def run_verifier(fn: Verifier, response: str, answer: str | None, fields: Mapping[str, object]) -> JudgeRecord:
    """Call a verifier; a crash or a value that is not a number in [0, 1] becomes a record with `error`, not a raise."""
    name = getattr(fn, "__name__", repr(fn))
    try:
        value = fn(response, answer, fields)
    except Exception as err:
        return JudgeRecord(None, error=f"verifier {name} raised {type(err).__name__}: {err}"[: RAW_CHARS * 2])
    if value is None:
        return JudgeRecord(None)
    raw = repr(value)[:RAW_CHARS]
    if not isinstance(value, numbers.Real):  # bools are fine (True -> 1.0); numpy scalars register as Real
        return JudgeRecord(None, raw, f"verifier {name} returned {type(value).__name__}, not a number")
    score = float(value)
    if not (math.isfinite(score) and 0.0 <= score <= 1.0):
        return JudgeRecord(None, raw, f"verifier {name} returned {score:g}, outside 0..1")
    return JudgeRecord(score, raw)


_PLACEHOLDER = re.compile(r"\{(prompt|response)\}")


def render_rubric(template: str, prompt: str, response: str) -> str:
    """Fill {prompt} and {response} only, in one pass.

    Not str.format: user prompts and code responses are full of other braces. One pass, so a
    literal "{response}" inside the prompt stays as the user wrote it.
    """
    values = {"prompt": prompt, "response": response}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


# A minus sign counts only when it is not glued to a word ("8-9" reads 8, "-3" reads -3).
_SCORE = re.compile(r"(?:(?<![\w.])-)?\d+(?:\.\d+)?")


def parse_score(text: str, scale: float = 10.0) -> JudgeRecord:
    """The first number the judge wrote, divided by `scale` ("Score: 8/10" -> 0.8).

    The first number, because judges often go on to explain or repeat the scale; a number outside
    0..scale is an error rather than a clipped score, so a confused judge shows in the logs.
    """
    if scale <= 0:
        raise ValueError(f"judge scale must be positive, got {scale}")
    raw = text[:RAW_CHARS]
    found = _SCORE.search(text)
    if found is None:
        return JudgeRecord(None, raw, "no number in judge output")
    value = float(found.group())
    if not 0.0 <= value <= scale:
        return JudgeRecord(None, raw, f"judge wrote {found.group()}, outside 0..{scale:g}")
    return JudgeRecord(value / scale, raw)


def group_advantage(scores: Sequence[float | None], groups: Sequence[int]) -> list[float]:
    """Each score minus the mean score of its group (the samples of one prompt): a GRPO-style baseline.

    A sample without a score gets advantage 0 and is left out of its group's mean, so missing
    verdicts neither push nor pull the policy.
    """
    if len(scores) != len(groups):
        raise ValueError(f"group_advantage: {len(scores)} scores but {len(groups)} group ids")
    totals: dict[int, float] = {}
    counts: dict[int, int] = {}
    for score, group in zip(scores, groups, strict=True):
        if score is not None:
            totals[group] = totals.get(group, 0.0) + score
            counts[group] = counts.get(group, 0) + 1
    return [
        0.0 if score is None else score - totals[group] / counts[group]
        for score, group in zip(scores, groups, strict=True)
    ]


def judge_summary(records: Sequence[JudgeRecord]) -> dict[str, float]:
    """Metrics for a batch of verdicts.

    `judge/mean_score` is over scored records only and is left out when none was scored (0 would
    read as "all wrong"); `judge/parse_failures` counts records with an error (unreadable judge
    output or a failed verifier), not those that simply had no reference.
    """
    scored = [r.score for r in records if r.score is not None]
    out: dict[str, float] = {
        "judge/scored_fraction": len(scored) / len(records) if records else 0.0,
        "judge/parse_failures": float(sum(r.error is not None for r in records)),
    }
    if scored:
        out["judge/mean_score"] = sum(scored) / len(scored)
    return out
