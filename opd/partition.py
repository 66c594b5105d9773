"""Dividing work among actors."""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


def chunks(items: list[T], parts: int) -> list[list[T]]:
    """`parts` contiguous, near-equal chunks in order (the first ones one longer when it does not divide)."""
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (i < extra)
        out.append(items[start:end])
        start = end
    return out
