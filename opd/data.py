"""Prompt files: JSONL with a `prompt` field per line and an optional `answer`.

Bad rows never train the student silently: each one is either a `DataError` naming
file and line (`data.on_error=fail`) or skipped and counted (`skip`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path


class DataError(ValueError):
    pass


@dataclass(frozen=True)
class Prompt:
    index: int
    text: str
    answer: str | None = None
    fields: dict = field(default_factory=dict)
    """The row's other fields (e.g. `domain`, which can route the prompt to a teacher)."""


def _parse(raw: bytes) -> Prompt | str:
    """A prompt, or the reason this line is not one."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return f"not UTF-8 ({err.reason} at byte {err.start})"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        return f"malformed JSON ({err.msg})"
    if not isinstance(row, dict) or "prompt" not in row:
        return "no `prompt` field"
    if not isinstance(row["prompt"], str) or not row["prompt"].strip():
        return "`prompt` is empty or not a string"
    answer = row.get("answer")
    rest = {k: v for k, v in row.items() if k not in ("prompt", "answer")}
    return Prompt(-1, row["prompt"], None if answer is None else str(answer), rest)


def load_prompts(path: str | Path, on_error: str = "fail") -> tuple[list[Prompt], int]:
    """Read a prompt file. Returns the prompts and how many lines were skipped."""
    prompts: list[Prompt] = []
    skipped = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            parsed = _parse(raw.rstrip(b"\r\n"))
            if isinstance(parsed, str):
                if on_error == "fail":
                    raise DataError(f"{path}:{lineno}: {parsed} (set data.on_error=skip to skip such lines)")
                skipped += 1
                continue
            prompts.append(Prompt(len(prompts), parsed.text, parsed.answer, parsed.fields))
    if not prompts:
        raise DataError(f"{path}: no usable prompts ({skipped} lines skipped)")
    return prompts, skipped


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def final_answer(text: str) -> str | None:
    """The last number in a response: the answer convention of the built-in task and of GSM8K-style data."""
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def is_correct(response: str, answer: str | None) -> bool:
    return answer is not None and final_answer(response) == answer.strip()
