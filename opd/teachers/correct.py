"""Teacher corrections (pure numpy): where a student response goes wrong, and the corrected sample.

The teacher reads the student's response token by token; the first token it finds unlikely (its
log-prob under a threshold, or outside the teacher's top-k) is where the response goes wrong. The
prefix before it is kept as the student wrote it (trained by the distillation loss, on-policy); the
teacher writes the rest from there (trained by cross-entropy, `sft_on_teacher`).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from opd.buffer.sample import Sample


def first_unlikely(
    response_ids: np.ndarray,
    teacher_logprobs: np.ndarray,
    topk_ids: np.ndarray | None,
    topk_logprobs: np.ndarray | None,
    threshold: float,
    outside_top_k: bool,
) -> int | None:
    """Index of the first response token the teacher finds unlikely, or None when it accepts them all.

    `outside_top_k` counts a token as unlikely when it is not among the teacher's (non-padding) top-k;
    a top-k of width 0 or all padding at a position (e.g. an unaligned cross-tokenizer position) says
    nothing there, so only the threshold applies.
    """
    bad = np.asarray(teacher_logprobs) < threshold
    if outside_top_k and topk_ids is not None and topk_ids.size:
        listed = np.isfinite(topk_logprobs)
        known = listed.any(axis=1)
        inside = ((np.asarray(topk_ids) == np.asarray(response_ids)[:, None]) & listed).any(axis=1)
        bad |= known & ~inside
    hits = np.flatnonzero(bad)
    return int(hits[0]) if hits.size else None


def corrected(sample: Sample, position: int, continuation: np.ndarray) -> Sample:
    """The sample with its response cut at `position` and the teacher's `continuation` appended.

    Per-token student/teacher fields keep the prefix and are zero-padded over the continuation, which
    only the SFT term reads (through `correction_start`), so the distillation loss never sees them.
    """
    cont = np.asarray(continuation, dtype=np.int64)
    tail = len(cont)

    def cut(x: np.ndarray | None) -> np.ndarray | None:
        if x is None:
            return None
        pad = np.zeros((tail, *x.shape[1:]), dtype=x.dtype)
        if x.ndim == 2 and np.issubdtype(x.dtype, np.floating):
            pad[:] = -np.inf  # top-k padding convention
        return np.concatenate([x[:position], pad])

    return replace(
        sample,
        response_ids=np.concatenate([np.asarray(sample.response_ids[:position], dtype=np.int64), cont]),
        logprobs=cut(np.asarray(sample.logprobs, dtype=np.float32)),
        teacher_logprobs=cut(sample.teacher_logprobs),
        teacher_topk_ids=cut(sample.teacher_topk_ids),
        teacher_topk_logprobs=cut(sample.teacher_topk_logprobs),
        correction_start=position,
    )
