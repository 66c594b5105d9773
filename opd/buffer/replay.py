"""Replay buffer shard: where scored rollouts wait for the learner, tagged with their policy version."""

from __future__ import annotations

from collections import Counter, deque
from pathlib import Path

import numpy as np

from opd.buffer import spill
from opd.buffer.sample import Sample, Samples

ORDERS = ("fifo", "disagreement")
"""Every `buffer.order` (see `ReplayBuffer`); config validation reads them here."""


def disagreement(s: Sample) -> float:
    """How far the student is from the teacher on this sample: the mean of log p_student - log p_teacher over
    the tokens it wrote (its reverse-KL estimate). Unscored samples rank last."""
    n = s.student_tokens
    if s.teacher_logprobs is None or n == 0:
        return float("-inf")
    return float(np.mean(s.logprobs[:n] - s.teacher_logprobs[:n]))


class ReplayBuffer:
    """One shard of the replay buffer, run as one Ray actor (`opd.buffer.sharded` spreads samples over several).

    - Capacity: at most `capacity` samples; when full, the oldest are evicted first (and counted).
    - Staleness: `take` never serves a sample generated more than `max_staleness` policy versions before the
      learner's current one; such samples are dropped and counted, never trained on silently.
    - Metrics: `take` reports what happened since the previous take (taken, at which lag, dropped, evicted).
    - Order: `fifo` serves the oldest first; `disagreement` serves those the teacher disagrees with most
      first (priority sampling), the others wait for a later step or go stale.
    """

    def __init__(self, capacity: int, max_staleness: int, order: str = "fifo") -> None:
        if order not in ORDERS:
            raise ValueError(f"buffer.order={order!r}; valid: {', '.join(ORDERS)}")
        self.items: deque[Sample] = deque()
        self.capacity, self.max_staleness, self.order = capacity, max_staleness, order
        self.evicted = 0
        """Evicted since the last `take` (metrics are per take, so a resumed shard needs no counters)."""

    def add(self, samples: list[Sample]) -> int:
        self.items.extend(samples)
        while len(self.items) > self.capacity:
            self.items.popleft()
            self.evicted += 1
        return len(self.items)

    def take(self, n: int, version: int) -> tuple[list[Sample], dict[str, float]]:
        """Up to n fresh-enough samples for a learner at `version`, plus what they cost in staleness."""
        fresh = [s for s in self.items if version - s.version <= self.max_staleness]
        dropped = len(self.items) - len(fresh)
        if self.order == "disagreement":
            ranked = sorted(range(len(fresh)), key=lambda i: -disagreement(fresh[i]))  # stable: ties stay FIFO
            chosen = set(ranked[:n])
        else:
            chosen = set(range(min(n, len(fresh))))
        out = Samples(s for i, s in enumerate(fresh) if i in chosen)
        self.items = deque(s for i, s in enumerate(fresh) if i not in chosen)
        lags = [version - s.version for s in out]
        stats = {
            "buffer_size": float(len(self.items)),
            "taken": float(len(out)),
            "staleness_sum": float(sum(lags)),
            "dropped_stale": float(dropped),
            "evicted": float(self.evicted),
            **{f"used_at_lag_{lag}": float(c) for lag, c in sorted(Counter(lags).items())},
        }
        self.evicted = 0
        return out, stats

    def size(self) -> int:
        return len(self.items)

    def save(self, path: str) -> None:
        """Everything waiting, oldest first, to one safetensors file (with each checkpoint)."""
        spill.save(list(self.items), path)

    def load(self, path: str) -> int:
        """Replace the contents with what `save` wrote (on resume); a missing file means an empty shard."""
        self.items = deque(spill.load(path) if Path(path).is_file() else [])
        return len(self.items)
