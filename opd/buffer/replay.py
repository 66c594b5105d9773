"""Replay buffer: where scored rollouts wait for the learner, tagged with their policy version."""

from __future__ import annotations

from collections import deque

from opd.buffer.sample import Sample


class ReplayBuffer:
    """FIFO of scored samples with a staleness bound, run as one Ray actor.

    `take` serves the oldest samples first and refuses any generated more than
    `max_staleness` policy versions before the learner's current one (they are dropped
    and counted, never trained on silently). Capacity overflow evicts the oldest.
    """

    def __init__(self, capacity: int, max_staleness: int) -> None:
        self.items: deque[Sample] = deque()
        self.capacity, self.max_staleness = capacity, max_staleness
        self.added = self.evicted = self.dropped_stale = 0

    def add(self, samples: list[Sample]) -> int:
        self.items.extend(samples)
        self.added += len(samples)
        while len(self.items) > self.capacity:
            self.items.popleft()
            self.evicted += 1
        return len(self.items)

    def take(self, n: int, version: int) -> tuple[list[Sample], dict[str, float]]:
        """Up to n fresh-enough samples for a learner at `version`, plus what they cost in staleness."""
        out: list[Sample] = []
        while self.items and len(out) < n:
            s = self.items.popleft()
            if version - s.version > self.max_staleness:
                self.dropped_stale += 1
                continue
            out.append(s)
        lags = [version - s.version for s in out]
        stats = {
            "buffer_size": float(len(self.items)),
            "mean_staleness": sum(lags) / len(lags) if lags else 0.0,
            "dropped_stale": float(self.dropped_stale),
            "evicted": float(self.evicted),
        }
        return out, stats

    def snapshot(self) -> list[Sample]:
        """Everything waiting, oldest first (saved with each checkpoint)."""
        return list(self.items)

    def restore(self, samples: list[Sample]) -> None:
        self.items = deque(samples)

    def __len__(self) -> int:
        return len(self.items)
