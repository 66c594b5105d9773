"""One-step arithmetic word problems as chat prompts: the built-in task for the SmolLM2 pair.

Each example is a conversation with one user turn and an integer answer, so greedy accuracy says
whether distillation moved the student toward a teacher that is right more often (the
answer is the response's last number: `opd.data.last_number_correct`). The numbers stay
small (sums and differences under 100, one-digit products): a 135M instruct model gets some of them
right, a pruned copy of it far fewer. Everything is drawn from a seeded `random.Random`.
"""

from __future__ import annotations

import random
from collections.abc import Callable

NAMES = ("Anna", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Lena")
ITEMS = ("apple", "book", "marble", "pencil", "sticker", "cookie", "coin", "card", "shell", "balloon")
INSTRUCTION = "Answer with just the number."


def _ordered(r: random.Random) -> tuple[int, int]:
    x, y = r.randint(2, 99), r.randint(2, 99)
    return max(x, y), min(x, y)


def _divisible(r: random.Random) -> tuple[int, int]:
    quotient, divisor = r.randint(2, 9), r.randint(2, 9)
    return quotient * divisor, divisor


# (template, how the operands are drawn, the answer): a, b and the answer are non-negative integers.
_Problem = tuple[str, Callable[[random.Random], tuple[int, int]], Callable[[int, int], int]]
_PROBLEMS: list[_Problem] = [
    (
        "{name} has {a} {item}s and gets {b} more. How many {item}s does {name} have now?",
        lambda r: (r.randint(2, 50), r.randint(2, 49)),
        lambda a, b: a + b,
    ),
    (
        "{name} had {a} {item}s and gave {b} of them away. How many {item}s does {name} have left?",
        lambda r: (r.randint(10, 99), r.randint(1, 9)),
        lambda a, b: a - b,
    ),
    (
        "There are {a} bags with {b} {item}s in each bag. How many {item}s are there in all?",
        lambda r: (r.randint(2, 9), r.randint(2, 9)),
        lambda a, b: a * b,
    ),
    (
        "{name} shares {a} {item}s equally among {b} friends. How many {item}s does each friend get?",
        _divisible,
        lambda a, b: a // b,
    ),
    ("What is {a} plus {b}?", lambda r: (r.randint(2, 99), r.randint(2, 99)), lambda a, b: a + b),
    ("What is {a} minus {b}?", _ordered, lambda a, b: a - b),
    ("What is {a} times {b}?", lambda r: (r.randint(2, 9), r.randint(2, 9)), lambda a, b: a * b),
]


def make_example(rng: random.Random) -> dict:
    """One problem: `prompt` as a chat message list (one user turn) and `answer` as a decimal string."""
    template, draw, solve = rng.choice(_PROBLEMS)
    a, b = draw(rng)
    question = template.format(name=rng.choice(NAMES), item=rng.choice(ITEMS), a=a, b=b)
    return {"prompt": [{"role": "user", "content": f"{question} {INSTRUCTION}"}], "answer": str(solve(a, b))}


def make_splits(seed: int, train_size: int, eval_size: int) -> tuple[list[dict], list[dict]]:
    """Train and eval examples, every prompt distinct, none of eval's in train (eval is drawn first)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits = []
    for size in (eval_size, train_size):
        rows: list[dict] = []
        while len(rows) < size:
            ex = make_example(rng)
            text = ex["prompt"][0]["content"]
            if text not in seen:
                seen.add(text)
                rows.append(ex)
        splits.append(rows)
    eval_rows, train_rows = splits
    return train_rows, eval_rows
