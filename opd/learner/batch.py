"""Turn samples into padded tensors the learner trains on (pure; no Ray, no DeepSpeed)."""

from __future__ import annotations

import numpy as np
import torch

from opd.buffer.sample import Sample


def collate(samples: list[Sample], pad_id: int, top_k: int) -> dict[str, torch.Tensor]:
    """Right-pad prompt+response sequences; per-token fields are aligned to *targets*.

    `input_ids` is [B, L]; every other per-token tensor is [B, L-1] and entry t belongs
    to token t+1 (the one logits[:, t] predicts), so losses never shift again.
    `mask` is the sample's weight on the response tokens the student wrote (the distillation loss reads it),
    `sft_mask` is 1 on tokens a teacher correction wrote (cross-entropy): the judge's weight scored the
    student's own response, and a response judged bad is exactly the one whose correction should be learnt.
    `advantage_bonus` is each sample's judge bonus, spread over its `mask`; `advantages` (when every sample has
    them) the per-token advantages opd/advantages.py shaped.
    """
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    width = max(lengths)
    n = len(samples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    shape = (n, width - 1)
    mask = torch.zeros(shape)
    sft_mask = torch.zeros(shape)
    bonus = torch.zeros(shape)
    shaped = torch.zeros(shape)
    has_advantages = all(s.advantages is not None for s in samples)
    old_lp = torch.zeros(shape)
    teacher_lp = torch.zeros(shape)
    topk_ids = torch.zeros((*shape, top_k), dtype=torch.long)
    topk_lp = torch.full((*shape, top_k), float("-inf"))
    has_teacher = all(s.teacher_logprobs is not None for s in samples)
    for i, s in enumerate(samples):
        p, r = len(s.prompt_ids), len(s.response_ids)
        input_ids[i, : p + r] = torch.tensor(np.concatenate([s.prompt_ids, s.response_ids]).astype(np.int64))
        attention[i, : p + r] = 1
        span = slice(p - 1, p - 1 + r)
        own = p - 1 + s.student_tokens
        mask[i, p - 1 : own] = s.weight
        sft_mask[i, own : p - 1 + r] = 1.0
        bonus[i, p - 1 : own] = s.advantage_bonus
        if has_advantages:
            shaped[i, p - 1 : own] = torch.from_numpy(np.asarray(s.advantages, dtype=np.float32))
        old_lp[i, span] = torch.tensor(np.asarray(s.logprobs, dtype=np.float32))
        if has_teacher:
            teacher_lp[i, span] = torch.tensor(s.teacher_logprobs)
            k = min(top_k, s.teacher_topk_ids.shape[1])
            topk_ids[i, span, :k] = torch.tensor(s.teacher_topk_ids[:, :k])
            topk_lp[i, span, :k] = torch.tensor(s.teacher_topk_logprobs[:, :k])
    batch = {"input_ids": input_ids, "attention_mask": attention, "mask": mask, "old_logprobs": old_lp}
    if any(s.correction_start is not None for s in samples):
        batch["sft_mask"] = sft_mask
    if any(s.advantage_bonus for s in samples):
        batch["advantage_bonus"] = bonus
    if has_advantages:
        batch["advantages"] = shaped
    if has_teacher:
        batch |= {"teacher_logprobs": teacher_lp, "topk_ids": topk_ids, "topk_logprobs": topk_lp}
    return batch


def first_scored(batch: dict[str, torch.Tensor]) -> int:
    """The first position of a collated batch that any row's loss covers (`mask` or `sft_mask` non-zero), 0 if
    none: the positions before it predict only prompt tokens, in every row."""
    covered = batch["mask"] != 0
    if "sft_mask" in batch:
        covered |= batch["sft_mask"] != 0
    columns = covered.any(0).nonzero()
    return int(columns[0]) if len(columns) else 0
