"""Prompt files: JSONL with a `prompt` field per line and an optional `answer`.

Bad rows never train the student silently: each one is either a `DataError` naming
file and line (`data.on_error=fail`) or skipped, counted and warned about with file
and line (`skip`; the first few are named, then a total).
"""

from __future__ import annotations

import codecs
import json
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ON_ERROR = ("skip", "fail")
MAX_NAMED_SKIPS = 10
"""Skipped lines named one by one in warnings; the rest are only counted."""


class DataError(ValueError):
    pass


class SkippedLine(UserWarning):
    """A prompt-file line skipped under data.on_error=skip (the message names file, line and reason)."""


@dataclass(frozen=True)
class Prompt:
    index: int
    """Position among the file's kept prompts (0-based)."""
    text: str
    answer: str | None = None
    fields: dict = field(default_factory=dict)
    """The row's other fields (e.g. `domain`, which can route the prompt to a teacher)."""
    line: int = -1
    """1-based line of the prompt file this prompt came from (-1: not read from a file)."""


def _json_type(value) -> str:
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _parse(raw: bytes) -> Prompt | str:
    """A prompt, or the reason this line is not one."""
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "UTF-16 text (byte-order mark); save the file as UTF-8"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return f"not UTF-8 ({err.reason} at byte {err.start})"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        return f"malformed JSON ({err.msg})"
    if not isinstance(row, dict):
        return f"no `prompt` field (the line is a JSON {_json_type(row)}, not an object)"
    if "prompt" not in row:
        return "no `prompt` field"
    prompt = row["prompt"]
    if not isinstance(prompt, str):
        return f"`prompt` is not a string (got {_json_type(prompt)})"
    if not prompt.strip():
        return "`prompt` is empty"
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"`prompt` is not valid Unicode (unpaired surrogate escape at character {err.start})"
    answer = row.get("answer")
    rest = {k: v for k, v in row.items() if k not in ("prompt", "answer")}
    return Prompt(-1, prompt, None if answer is None else str(answer), rest)


def load_prompts(path: str | Path, on_error: str = "fail") -> tuple[list[Prompt], int]:
    """Read a prompt file. Returns the prompts and how many lines were skipped.

    Blank lines are ignored (not counted); a UTF-8 byte-order mark and Windows line endings are accepted.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"data.on_error={on_error!r} is not one of {', '.join(ON_ERROR)}")
    prompts: list[Prompt] = []
    skipped = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            if not raw.strip():
                continue
            parsed = _parse(raw.rstrip(b"\r\n"))
            if isinstance(parsed, str):
                if on_error == "fail":
                    raise DataError(f"{path}:{lineno}: {parsed} (set data.on_error=skip to skip such lines)")
                skipped += 1
                if skipped <= MAX_NAMED_SKIPS:
                    warnings.warn(f"{path}:{lineno}: {parsed}; skipped (data.on_error=skip)", SkippedLine, stacklevel=2)
                continue
            prompts.append(Prompt(len(prompts), parsed.text, parsed.answer, parsed.fields, lineno))
    if skipped > MAX_NAMED_SKIPS:
        warnings.warn(f"{path}: {skipped} lines skipped in all (data.on_error=skip)", SkippedLine, stacklevel=2)
    if not prompts:
        if not skipped:
            raise DataError(f"{path}: no prompts (the file is empty or has only blank lines)")
        raise DataError(f"{path}: no usable prompts ({skipped} lines skipped)")
    return prompts, skipped


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def final_answer(text: str) -> str | None:
    """The last number in a response: the answer convention of the built-in task and of GSM8K-style data."""
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def last_number_correct(response: str, answer: str | None) -> bool:
    """True when the response's last number is `answer` (GSM8K-style data; the built-in task marks its answer:
    `opd.tasks.addition.marked_answer_correct`)."""
    return answer is not None and final_answer(response) == answer.strip()


@dataclass
class Encoded:
    """A prompt as the student's tokenizer reads it, and the teacher it is assigned to."""

    prompt: Prompt
    ids: list[int]
    teacher: str | None = None
    """The teacher this prompt is routed to (combine.rule=route, or best_of once judged), else None."""


def encode(
    tokenizer,
    prompts: list[Prompt],
    limit: int,
    source: str,
    route: Callable[[Prompt], str] | None = None,
    on_error: str = "fail",
) -> tuple[list[Encoded], int]:
    """Tokenize prompts (and route each to a teacher). Returns them and how many were skipped.

    A prompt with no room for a response is an error naming file and line, or skipped and counted
    with `data.on_error=skip`; an unroutable prompt is always an error (it means a wrong routing table).
    """
    out, skipped = [], 0
    for p in prompts:
        where = f"{source}:{p.line}" if p.line > 0 else f"{source}: prompt #{p.index + 1}"
        ids = tokenizer.encode(p.text)
        if len(ids) > limit:
            if on_error == "skip":
                skipped += 1
                continue
            raise DataError(
                f"{where}: prompt is {len(ids)} tokens; with rollout.max_new_tokens the limit is {limit} "
                "(raise rollout.engine.max_model_len, shorten it, or set data.on_error=skip)"
            )
        try:
            teacher = route(p) if route else None
        except ValueError as err:
            raise DataError(f"{where}: {err}") from None
        out.append(Encoded(p, ids, teacher))
    if not out:
        raise DataError(f"{source}: no prompt fits the context ({skipped} too long)")
    return out, skipped
