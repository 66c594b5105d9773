"""Multi-digit addition written out column by column: the built-in demo task.

A prompt is `"357+468="`. The response works from the least significant column, one
`|`-separated step per column, writing the carry-in as `+1` when there is one, and ends
with the answer after the fixed marker `ans `:

    7+8=15|5+6+1=12|3+4+1=8|ans 825

`make_example` gives both operands the same length; `solve` also handles a shorter operand,
which contributes `0` once it runs out (`57+468=` -> `7+8=15|5+6+1=12|0+4+1=5|ans 525`).

The scratchpad is what makes the task learnable by a tiny transformer in minutes: each step
is a local digit sum plus a carry read from the step before, and the answer is a copy of the
step results in reverse. It is also what gives distillation something to do: a weak student
fumbles digit look-ups, carries and the final copy, and the teacher's per-token distribution
says exactly where.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable
from pathlib import Path

MARKER = "ans "
_ANSWER = re.compile(r"(?:^|\|)" + re.escape(MARKER) + r"([0-9]+)\s*$")  # ASCII digits only, at the very end


def make_example(rng: random.Random, min_digits: int, max_digits: int) -> dict[str, str]:
    """One problem: both operands have the same number of digits, drawn from `min_digits`..`max_digits`.

    Equal lengths keep column i of the scratchpad at the same place in both operands, which
    a tiny model learns several times faster than mixed lengths; carries still chain freely.
    """
    digits = rng.randint(min_digits, max_digits)
    a, b = _operand(rng, digits), _operand(rng, digits)
    return {"prompt": f"{a}+{b}=", "response": solve(a, b), "answer": str(a + b)}


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)


def solve(a: int, b: int) -> str:
    """The reference scratchpad for `a+b` (see the module docstring for the format)."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x, y = (int(d[i]) if i < len(d) else 0 for d in (da, db))
        total = x + y + carry
        steps.append(f"{x}+{y}{'+1' if carry else ''}={total}")
        carry = total // 10
    return "|".join(steps) + f"|{MARKER}{a + b}"


def extract_answer(text: str) -> str | None:
    """The decimal answer after the final `|ans ` marker, or None if the response does not end with one.

    Only the end of the response counts, so a truncated or rambling generation that never
    reaches a well-formed `ans <digits>` is treated as unanswered rather than guessed at.
    A trailing end-of-text token (if the decoder kept it) is ignored.
    """
    text = text.replace("<|endoftext|>", "").rstrip()
    m = _ANSWER.search(text)
    if m is None:
        return None
    digits = m.group(1)
    return digits.lstrip("0") or "0"


def marked_answer_correct(response: str, answer: str) -> bool:
    """True when the response's final answer equals `answer` numerically (leading zeros ignored)."""
    got = extract_answer(response)
    return got is not None and got == (answer.strip().lstrip("0") or "0")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """Write one JSON object per line (UTF-8), creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
