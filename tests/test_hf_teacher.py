"""The transformers teacher backend: batched scoring equals scoring one sequence at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from opd.teachers import hf


def test_batches_keep_each_batch_within_the_logit_budget():
    lengths = [5, 30, 12, 7, 30, 100]
    vocab = 10
    groups = hf.batches(lengths, vocab, budget=4 * vocab * 60)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:  # rows x longest row x vocab x 4 bytes; a lone oversized sequence still gets its own batch
        assert len(g) == 1 or len(g) * max(lengths[i] for i in g) * vocab * 4 <= 4 * vocab * 60
    assert [lengths[g[0]] for g in groups] == sorted(lengths[g[0]] for g in groups)
    assert [100] in [[lengths[i] for i in g] for g in groups]


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_batched_scoring_matches_one_sequence_at_a_time(tiny_assets, arch):
    from transformers import AutoModelForCausalLM

    name = "teacher" if arch == "qwen2" else "other_tokenizer_teacher"
    model = AutoModelForCausalLM.from_pretrained(tiny_assets[name]).eval()
    vocab = model.config.vocab_size
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, vocab, size=n).tolist() for n in (4, 9, 6, 4)]
    responses = [rng.integers(3, vocab, size=n).tolist() for n in (7, 1, 12, 3)]
    temperature, k = 0.7, 5
    # The default budget packs all four into one padded batch; budget=1 then scores each alone.
    batched = hf.score(model, prompts, responses, k, temperature)
    for p, r, got in zip(prompts, responses, batched, strict=True):
        ids = torch.tensor([[*p, *r]])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0, len(p) - 1 : -1] / temperature, -1)
        np.testing.assert_allclose(got.logprobs, logprobs[torch.arange(len(r)), torch.tensor(r)], atol=1e-5)
        top = logprobs.topk(k, -1)
        np.testing.assert_allclose(got.topk_logprobs, top.values, atol=1e-5)
        assert (got.topk_ids == top.indices.numpy()).all()
    one_by_one = hf.score(model, prompts, responses, k, temperature, budget=1)
    for a, b in zip(batched, one_by_one, strict=True):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
