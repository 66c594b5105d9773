"""Turning a prompt file's rows into Prompts: the prompt and answer columns, and conversations.

A prompt is a string (one user turn) or a conversation: a list of `{"role", "content"}` messages, the TRL / verl
convention. Bad rows never train the student silently: each one is either a `DataError` naming file and row
(`data.on_error=fail`) or skipped, counted and warned about with file and row (`skip`; the first few are named,
then a total).
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import opd.data.files as files
from opd.data.files import DataError, Unreadable, json_type, read_rows

ON_ERROR = ("skip", "fail")
MAX_NAMED_SKIPS = 10
"""Skipped rows named one by one in warnings; the rest are only counted."""
ROLES = ("system", "developer", "user", "assistant", "tool")


class SkippedLine(UserWarning):
    """A prompt-file row skipped under data.on_error=skip (the message names file, line or row, and reason)."""


class DuplicatePrompts(UserWarning):
    """A prompt file repeats prompts (the message counts them and names the first). They are kept, since a repeat
    can be on purpose (to weigh a prompt more), but an accidental one skews training unnoticed."""


@dataclass(frozen=True)
class Prompt:
    index: int
    """Position among the file's kept prompts (0-based)."""
    text: str
    """The user-visible prompt: the string itself, or a conversation's last user turn (what a rubric judge and
    teachers that read plain text see; the earlier turns are in `messages`)."""
    answer: str | None = None
    fields: dict = field(default_factory=dict)
    """The row's other columns (e.g. `domain`, which can route the prompt to a teacher; verifiers get them)."""
    line: int = -1
    """1-based line (JSONL) or row (other formats) this prompt came from (-1: not read from a file)."""
    messages: tuple[dict, ...] = ()
    """The conversation as `{"role", "content"}` dicts when the prompt column holds one; () for a plain string."""
    where: str = field(default="", compare=False)
    """`file:line` or `file row N`, for messages about this prompt ("" when not read from a file)."""

    @property
    def conversation(self) -> tuple[dict, ...]:
        """The messages a chat template renders: a plain string is one user turn."""
        return self.messages or ({"role": "user", "content": self.text},)


def _unicode_problem(text: str) -> str | None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"not valid Unicode (unpaired surrogate escape at character {err.start})"
    return None


def _conversation(value: list, key: str) -> tuple[tuple[dict, ...], str] | str:
    """(messages, last user turn's content), or why `value` is not a conversation."""
    if not value:
        return f"`{key}` is an empty conversation (no messages)"
    messages = []
    for i, message in enumerate(value, start=1):
        if not isinstance(message, dict):
            return f"`{key}` is not a string (got array) or a list of messages (item {i} is a {json_type(message)})"
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            return f"`{key}` message {i} has role {role!r}; expected one of {', '.join(ROLES)}"
        if not isinstance(content, str):
            return f"`{key}` message {i} ({role}) content is not a string (got {json_type(content)})"
        if problem := _unicode_problem(content):
            return f"`{key}` message {i} ({role}) is {problem}"
        messages.append({"role": role, "content": content})
    users = [m["content"] for m in messages if m["role"] == "user"]
    if not users:
        return f"`{key}` conversation has no user message"
    if not users[-1].strip():
        return f"`{key}` conversation's last user message is empty"
    return tuple(messages), users[-1]


def to_prompt(row: object, prompt_key: str, answer_key: str, unit: str) -> Prompt | str:
    """A prompt (index and position not yet set), or the reason this row is not one."""
    if not isinstance(row, dict):
        return f"no `{prompt_key}` field (the {unit} is a JSON {json_type(row)}, not an object)"
    if prompt_key not in row:
        text = [k for k, v in row.items() if isinstance(v, str | list)]
        hint = f"; if the prompts are in one of them, data.prompt_key=<column> (e.g. data.prompt_key={text[0]})"
        return f"no `{prompt_key}` field (its columns: {', '.join(map(str, row)) or 'none'}){hint if text else ''}"
    value, messages = row[prompt_key], ()
    if isinstance(value, list):
        parsed = _conversation(value, prompt_key)
        if isinstance(parsed, str):
            return parsed
        messages, value = parsed
    elif not isinstance(value, str):
        return f"`{prompt_key}` is not a string (got {json_type(value)})"
    elif not value.strip():
        return f"`{prompt_key}` is empty"
    elif problem := _unicode_problem(value):
        return f"`{prompt_key}` is {problem}"
    if (sum(len(m["content"]) for m in messages) if messages else len(value)) > files.MAX_ROW_BYTES:
        return f"`{prompt_key}` is over {files.MAX_ROW_BYTES:,} characters"
    answer = row.get(answer_key)
    rest = {k: v for k, v in row.items() if k not in (prompt_key, answer_key)}
    return Prompt(-1, value, None if answer is None else str(answer), rest, messages=messages)


def repeats(prompts: list[Prompt]) -> list[tuple[Prompt, Prompt]]:
    """Each prompt that repeats an earlier one (the same conversation as the student reads it), with that one."""
    first: dict[tuple, Prompt] = {}
    out = []
    for p in prompts:
        key = tuple((m["role"], m["content"]) for m in p.conversation)
        if key in first:
            out.append((p, first[key]))
        else:
            first[key] = p
    return out


def load_prompts(
    path: str | Path, on_error: str = "fail", prompt_key: str = "prompt", answer_key: str = "answer"
) -> tuple[list[Prompt], int]:
    """Read a prompt file (`opd.data.files.FORMATS`). Returns the prompts and how many rows were skipped.

    `prompt_key` names the prompt column (a string or a list of messages), `answer_key` the optional reference
    answer; every other column is kept in `Prompt.fields`.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"data.on_error={on_error!r} is not one of {', '.join(ON_ERROR)}")
    rows = read_rows(str(path))
    prompts: list[Prompt] = []
    skipped = 0
    for n, row in rows.items:
        parsed = row.reason if isinstance(row, Unreadable) else to_prompt(row, prompt_key, answer_key, rows.unit)
        if isinstance(parsed, str):
            if on_error == "fail":
                # Skipping helps where some rows are good; where the first rows already fail (a prompt column that
                # is not there), every row likely does, and skipping would leave nothing.
                skip = f" (set data.on_error=skip to skip such {rows.unit}s)" if prompts else ""
                raise DataError(f"{rows.where(n)}: {parsed}{skip}")
            skipped += 1
            if skipped <= MAX_NAMED_SKIPS:
                warnings.warn(f"{rows.where(n)}: {parsed}; skipped (data.on_error=skip)", SkippedLine, stacklevel=2)
            continue
        prompts.append(replace(parsed, index=len(prompts), line=n, where=rows.where(n)))
    if skipped > MAX_NAMED_SKIPS:
        warnings.warn(f"{path}: {skipped} {rows.unit}s skipped in all (data.on_error=skip)", SkippedLine, stacklevel=2)
    if not prompts:
        if not skipped:
            empty = "the file is empty or has only blank lines" if rows.unit == "line" else "the file has no rows"
            raise DataError(f"{path}: no prompts ({empty})")
        raise DataError(f"{path}: no usable prompts ({skipped} {rows.unit}s skipped)")
    if repeated := repeats(prompts):
        again, first = repeated[0]
        warnings.warn(
            f"{path}: repeated prompts: {len(repeated)} (the first: {again.where}, the same as {first.where}); "
            "kept, as a repeat may be on purpose",
            DuplicatePrompts,
            stacklevel=2,
        )
    return prompts, skipped


def check_first_rows(
    path: str | Path, prompt_key: str = "prompt", answer_key: str = "answer", rows: int = 20
) -> Prompt:
    """Read the first `rows` rows of a prompt file as a run would (`--dry-run`) and return the first prompt: a
    DataError when none of them is one (a prompt column that is not there names the columns that are)."""
    read = read_rows(str(path))
    reasons = []
    for n, row in itertools.islice(read.items, rows):
        parsed = row.reason if isinstance(row, Unreadable) else to_prompt(row, prompt_key, answer_key, read.unit)
        if not isinstance(parsed, str):
            return parsed
        reasons.append(f"{read.where(n)}: {parsed}")
    raise DataError(
        f"none of the first {len(reasons)} {read.unit}s is a prompt; {reasons[0]}" if reasons else "no rows"
    )
