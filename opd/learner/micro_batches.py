"""How one shard's slice of an optimizer step splits into micro-batches: a fixed number of sequences each
(`learner.micro_batch_size`), or packed by length under a token budget (`learner.max_tokens_per_micro_batch`)."""

from __future__ import annotations

import torch

from opd.buffer.sample import Sample


def by_count(samples: list[Sample], size: int) -> list[list[Sample]]:
    """Consecutive runs of `size` samples (the last may be shorter)."""
    return [samples[i : i + size] for i in range(0, len(samples), size)]


def by_tokens(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices into `lengths` packed longest first, so each micro-batch's padded size (rows x its longest
    sequence) stays within `budget` tokens and rows of like length share a micro-batch (little padding).
    A sequence longer than the budget gets a micro-batch of its own."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def split(samples: list[Sample], cfg) -> list[list[Sample]]:
    """This shard's micro-batches under `cfg` (LearnerConfig)."""
    if not cfg.max_tokens_per_micro_batch:
        return by_count(samples, cfg.micro_batch_size)
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    return [[samples[i] for i in group] for group in by_tokens(lengths, cfg.max_tokens_per_micro_batch)]


def agreed_count(count: int, device: torch.device) -> int:
    """The most micro-batches any rank has: every ZeRO rank must run as many forward/backward passes (gradient
    reduction and the non-finite guard are collectives), so ranks with fewer pad with empty ones."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return count
    n = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    return int(n.item())
