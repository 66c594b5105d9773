"""The transformers backend of a teacher: score and sample with a plain Hugging Face model.

The counterpart of `opd.rollout.engine`'s vLLM `score`/`sample`, with the same return types. Scoring is a
forward pass over padded batches: for small teachers (and any temperature) it beats vLLM's prompt log-probs,
whose per-token Python objects dominate when the model itself is cheap.
"""

from __future__ import annotations

import numpy as np

from opd.rollout.engine import Scored

LOGIT_BYTES = 1 << 30
"""Largest float32 logits tensor one scoring forward pass may produce; batches are cut to fit it."""


def batches(lengths: list[int], vocab_size: int, budget: int = LOGIT_BYTES) -> list[list[int]]:
    """Indices grouped into padded batches, shortest sequences first, each batch's logits within `budget` bytes.

    Sorting by length keeps padding small; a sequence too long for the budget on its own still gets a batch.
    """
    out: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if out and (len(out[-1]) + 1) * lengths[i] * vocab_size * 4 <= budget:
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
    for batch in batches([len(s) for s in seqs], vocab, budget):
        width = max(len(seqs[i]) for i in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(batch):
            ids[row, : len(seqs[i])] = torch.tensor(seqs[i])
            mask[row, : len(seqs[i])] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
        for row, i in enumerate(batch):
            start, end = len(prompts[i]), len(seqs[i])
            logprobs = torch.log_softmax(logits[row, start - 1 : end - 1].float() / temperature, dim=-1)
            tokens = ids[row, start:end].to(logprobs.device)
            top = logprobs.topk(min(top_k, logprobs.shape[-1]), dim=-1)
            out[i] = Scored(
                logprobs.gather(-1, tokens[:, None])[:, 0].cpu().numpy().astype(np.float32),
                top.indices.cpu().numpy(),
                top.values.cpu().numpy(),
            )
    return out  # type: ignore[return-value]


def sample(model, prompts: list, n: int, max_tokens: int, temperature: float, seed: int | None) -> list:
    """`n` continuations per prompt with `model.generate`; per prompt, n (token ids, log-probs) pairs.

    Log-probs are those of the distribution sampled from (temperature applied); responses end after eos.
    """
    import torch

    if seed is not None:
        torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    eos = model.generation_config.eos_token_id
    result = []
    for prompt in prompts:
        ids = torch.tensor([[int(t) for t in prompt]] * n, device=model.device)
        gen = model.generate(
            ids, max_new_tokens=max_tokens, output_scores=True, return_dict_in_generate=True, **sampling
        )
        pairs = []
        for i in range(n):
            tokens = gen.sequences[i, len(prompt) :].tolist()
            lps = [float(torch.log_softmax(s[i].float(), -1)[t]) for s, t in zip(gen.scores, tokens, strict=False)]
            if eos in tokens:
                cut = tokens.index(eos) + 1
                tokens, lps = tokens[:cut], lps[:cut]
            pairs.append((np.asarray(tokens, np.int64), np.asarray(lps, np.float32)))
        result.append(pairs)
    return result
