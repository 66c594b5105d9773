"""The objective scored over chunks of positions (`learner.loss_chunk_tokens`): no [batch, positions, vocabulary]
float32 logits for the whole micro-batch, forward or backward.

The learner hands over the last hidden states and the LM head; each chunk of positions gets its logits, float32
log-softmax and token sums (`objective.Sums`) under `torch.utils.checkpoint`, so only its hidden states are kept
and the backward recomputes one chunk's logits at a time. The sums add up to the whole micro-batch's, so the
loss is the same token mean as `objective.finish` on the full logits.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from opd.learner import objective


def chunk_batch(batch: dict[str, torch.Tensor], start: int, end: int) -> dict[str, torch.Tensor]:
    """Positions [start, end) of a collated batch: per-token fields sliced; `input_ids` keeps one more so that
    its [:, 1:] are still the targets of those positions."""
    out = {k: v[:, start:end] for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    return out | {"input_ids": batch["input_ids"][:, start : end + 1]}


def loss(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    cfg,
    temperature: float,
    sft_weight: float,
    chunk_tokens: int,
) -> tuple[torch.Tensor, dict[str, float]]:
    """(loss, metrics) of `loss.type` (`cfg`) with the corrections, as `objective.finish` would give on the logits
    `head(hidden)`; `hidden` is [B, T, H] aligned as the logits (position t predicts token t+1).
    A chunk spans about `chunk_tokens` tokens: chunk_tokens // B positions of every row, at least one."""
    rows, positions = hidden.shape[:2]
    step = max(1, chunk_tokens // rows)
    names: list[str] = []

    def score(h: torch.Tensor, part: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        sums = objective.micro_batch_sums(head(h).float(), part, cfg, temperature)
        names[:] = sorted(sums)
        return tuple(x for name in names for x in sums[name])

    total: list[torch.Tensor] | None = None
    for start in range(0, positions, step):
        end = min(start + step, positions)
        part = chunk_batch(batch, start, end)
        flat = checkpoint(score, hidden[:, start:end], part, use_reentrant=False)
        total = list(flat) if total is None else [a + b for a, b in zip(total, flat, strict=True)]
    sums = {name: (total[2 * i], total[2 * i + 1]) for i, name in enumerate(names)}
    return objective.finish(sums, batch, sft_weight)
