"""The transformers teacher backend on one NVIDIA GPU, at a real vocabulary size, in bf16.

A Qwen2-shaped model with random weights and Qwen's 151,936-token vocabulary scores and samples on CUDA. With
that vocabulary the logits budget cuts a round's sequences into several padded batches; the result must be what
one sequence at a time gives, to bf16 rounding. Skipped without CUDA.

    pytest -s tests/gpu/test_hf_teacher_cuda.py     # -s also prints the scoring throughput
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from opd.teachers import hf

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
VOCAB = 151_936


@pytest.fixture(scope="module")
def model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=4,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).to("cuda", torch.bfloat16).eval()


def sequences(n: int, seed: int = 0) -> tuple[list, list]:
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, VOCAB, size=int(rng.integers(64, 256))).tolist() for _ in range(n)]
    responses = [rng.integers(3, VOCAB, size=int(rng.integers(128, 512))).tolist() for _ in range(n)]
    return prompts, responses


def test_scoring_cuts_batches_to_the_logit_budget_and_matches_one_sequence_at_a_time(model):
    prompts, responses = sequences(24)
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
    groups = hf.batches(lengths, VOCAB)
    assert 1 < len(groups) < len(lengths)  # several rows a batch, and more than one batch
    batched = hf.score(model, prompts, responses, 20, 1.0)
    alone = hf.score(model, prompts, responses, 20, 1.0, budget=1)
    gaps = np.concatenate([np.abs(a.logprobs - b.logprobs) for a, b in zip(batched, alone, strict=True)])
    print(f"\nbf16 batched vs alone: mean |gap| {gaps.mean():.2e}, max {gaps.max():.2e} over {gaps.size} tokens")
    assert gaps.mean() < 1e-2 and gaps.max() < 0.25
    for s, r in zip(batched, responses, strict=True):
        assert s.logprobs.shape == (len(r),) and s.topk_ids.shape == s.topk_logprobs.shape == (len(r), 20)
        assert np.isfinite(s.logprobs).all() and (s.logprobs <= 0).all()
        assert (np.diff(s.topk_logprobs, axis=1) <= 0).all()  # top-k sorted, best first
        assert (s.topk_logprobs[:, 0] >= s.logprobs - 1e-3).all()  # nothing beats the top-1

    prompts, responses = sequences(256, seed=1)
    tokens = sum(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    for call in ("first", "second"):  # the first meets new batch shapes; padded widths make the second reuse them
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        hf.score(model, prompts, responses, 20, 1.0)
        torch.cuda.synchronize()
        print(f"{call} call: scored {tokens} tokens in {time.perf_counter() - t0:.2f} s")


def test_sampling_on_cuda_returns_each_prompts_responses_with_their_logprobs(model):
    prompts, _ = sequences(8, seed=2)
    out = hf.sample(model, prompts, 4, 32, 1.0, seed=0)
    assert [len(pairs) for pairs in out] == [4] * 8
    for pairs in out:
        for ids, lps in pairs:
            assert 1 <= len(ids) <= 32 and lps.shape == ids.shape
            assert np.isfinite(lps).all() and (lps <= 0).all()
            assert 2 not in ids[:-1].tolist()  # cut after the first eos
