"""Responses checked against a prompt's reference answer."""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def final_answer(text: str) -> str | None:
    """The last number in a response: the answer convention of the built-in task and of GSM8K-style data."""
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def last_number_correct(response: str, answer: str | None) -> bool:
    """True when the response's last number is `answer` (GSM8K-style data; the built-in task marks its answer:
    `opd.tasks.addition.marked_answer_correct`)."""
    return answer is not None and final_answer(response) == answer.strip()
