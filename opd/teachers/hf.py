"""The transformers backend of a teacher: score and sample with a plain Hugging Face model.

The counterpart of `opd.rollout.engine`'s vLLM `score`/`sample`, with the same return types. Scoring is a
forward pass over padded batches: for small teachers (and any temperature) it beats vLLM's prompt log-probs,
whose per-token Python objects dominate when the model itself is cheap.
"""

from __future__ import annotations

import inspect
from collections.abc import Collection

import numpy as np

from opd.rollout.engine import Scored

LOGIT_BYTES = 1 << 30
"""Largest float32 [rows, positions, vocab] tensor a scoring pass may hold; batches are cut to fit it (the
peak is about twice this: the logits and their log-softmax)."""
PAD_TO = 64
"""On GPUs batch widths are rounded up to a multiple of this, so a few shapes recur: attention kernels (cuDNN's
on Hopper) plan each new shape, which costs more than the padding."""
CPU_PAD_TO = 8
"""On CPU nothing is planned and padding is compute: the built-in teacher scored a round 2.2x slower at 64."""


def width(length: int, multiple: int = PAD_TO) -> int:
    return -(-length // multiple) * multiple


def padded(rows: list[list[int]], columns: int, fill: int, left: bool = False):
    """Rows of token ids as one [len(rows), columns] tensor and its attention mask, padded on the right (scoring)
    or on the left (generation, so every row's next token lands in the same column)."""
    import torch

    ids = torch.full((len(rows), columns), fill, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        at = slice(columns - len(r), columns) if left else slice(0, len(r))
        ids[i, at] = torch.tensor(r, dtype=torch.long)
        mask[i, at] = 1
    return ids, mask


def batches(lengths: list[int], vocab_size: int, budget: int = LOGIT_BYTES, multiple: int = PAD_TO) -> list[list[int]]:
    """Indices grouped into batches padded to a `multiple`, shortest sequences first, each batch's logits within
    `budget` bytes.

    Sorting by length keeps padding small; a sequence too long for the budget on its own still gets a batch.
    """
    out: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if out and (len(out[-1]) + 1) * width(lengths[i], multiple) * vocab_size * 4 <= budget:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def score(
    model, prompts: list, responses: list, top_k: int, temperature: float, budget: int = LOGIT_BYTES
) -> list[Scored]:
    """Each response token's log-prob under `model` at `temperature`, and the model's own top-k there.

    Sequences are right-padded: with causal attention no real position sees the padding, so the result equals
    scoring each sequence alone (up to float rounding of batched matmuls).
    """
    import torch

    seqs = [[*map(int, p), *map(int, r)] for p, r in zip(prompts, responses, strict=True)]
    out: list[Scored | None] = [None] * len(seqs)
    vocab = model.config.get_text_config().vocab_size
    multiple = CPU_PAD_TO if model.device.type == "cpu" else PAD_TO
    keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    for batch in batches([len(s) for s in seqs], vocab, budget, multiple):
        ids, mask = padded([seqs[i] for i in batch], width(max(len(seqs[i]) for i in batch), multiple), 0)
        # Position j predicts token j+1. Positions before `first` predict only prompt tokens in every row: no LM
        # head, log-softmax or top-k there (a prompt's share of the [rows, positions, vocab] work).
        first = max(0, min(len(prompts[i]) for i in batch) - 1) if keep else 0
        inputs = {"input_ids": ids.to(model.device), "attention_mask": mask.to(model.device)}
        with torch.no_grad():
            logits = model(**inputs, **({"logits_to_keep": ids.shape[1] - first} if keep else {})).logits
            logprobs = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
            del logits
            own = logprobs.gather(-1, ids[:, first + 1 :, None].to(logprobs.device))[..., 0].cpu().numpy()
            top = logprobs.topk(min(top_k, logprobs.shape[-1]), dim=-1)
            top_ids, top_values = top.indices.cpu().numpy(), top.values.cpu().numpy()
        for row, i in enumerate(batch):
            span = slice(len(prompts[i]) - 1 - first, len(seqs[i]) - 1 - first)
            out[i] = Scored(own[row, span].astype(np.float32), top_ids[row, span], top_values[row, span])
    return out  # type: ignore[return-value]


GENERATE_ROWS = 256
"""Sequences one `generate` call decodes at most (bounds the KV cache of a call)."""
UNSHAPED = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
"""Logit processors that would move greedy and sampled decoding off the model's own distribution, switched off."""
UNTRUNCATED = {"top_k": 0, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}
"""Sampling over the full distribution. `generate` fills every setting a call leaves unset from the checkpoint's
generation_config (e.g. top_k 20, top_p 0.95), then transformers' own defaults (top_k 50): either would sample
from a truncated distribution while the log-probs returned are the full one's."""


def sample(
    model,
    prompts: list,
    n: int,
    max_tokens: int,
    temperature: float,
    seed: int | None,
    stop_ids: Collection[int] | None = None,
) -> list:
    """`n` continuations per prompt with `model.generate`; per prompt, n (token ids, log-probs) pairs.

    Prompts are left-padded into batches. Log-probs are those of the distribution sampled from (temperature
    applied, nothing truncated; greedy at 0 reads temperature 1), taken by one scoring pass afterwards rather than
    from `output_scores`, which would hold [rows, steps, vocab] logits at once. A response ends with the first of
    `stop_ids` (`opd.rollout.engine.stop_token_ids`; by default the model's generation config's eos ids).
    """
    import torch

    if seed is not None:
        torch.manual_seed(seed)
    sampling = (
        {"do_sample": True, "temperature": temperature, **UNTRUNCATED} if temperature > 0 else {"do_sample": False}
    )
    if stop_ids is None:
        eos = model.generation_config.eos_token_id
        stop_ids = [eos] if isinstance(eos, int) else list(eos or ())
    stops = set(stop_ids)
    pad = model.generation_config.pad_token_id
    pad = min(stops, default=None) if pad is None else pad
    rows = [[int(t) for t in p] for p in prompts for _ in range(n)]
    responses: list[list[int]] = []
    for at in range(0, len(rows), GENERATE_ROWS):
        chunk = rows[at : at + GENERATE_ROWS]
        longest = max(len(r) for r in chunk)
        ids, mask = padded(chunk, longest, pad if pad is not None else 0, left=True)
        out = model.generate(
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            max_new_tokens=max_tokens,
            eos_token_id=sorted(stops) or None,
            pad_token_id=pad,
            **UNSHAPED,
            **sampling,
        )
        for tokens in out[:, longest:].tolist():
            responses.append(tokens[: next((i + 1 for i, t in enumerate(tokens) if t in stops), len(tokens))])
    scored = score(model, rows, responses, 1, temperature if temperature > 0 else 1.0)
    pairs = [(np.asarray(r, np.int64), s.logprobs) for r, s in zip(responses, scored, strict=True)]
    return [pairs[i * n : (i + 1) * n] for i in range(len(prompts))]
