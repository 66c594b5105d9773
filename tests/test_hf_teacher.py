"""The transformers teacher backend: batched scoring equals scoring one sequence at a time; generation stops at
the model's stop ids and samples its full distribution."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from opd.teachers import hf


def test_batches_keep_each_batch_within_the_logit_budget():
    lengths = [5, 30, 12, 7, 30, 100, 64]
    vocab = 10
    budget = 4 * vocab * 128  # two rows of 64 positions, or one of 128
    groups = hf.batches(lengths, vocab, budget)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:  # rows x padded width x vocab x 4 bytes
        assert len(g) * hf.width(max(lengths[i] for i in g)) * vocab * 4 <= budget
    assert [[lengths[i] for i in g] for g in groups] == [[5, 7], [12, 30], [30, 64], [100]]
    assert hf.batches([500], vocab, budget) == [[0]]  # too long for the budget alone: still scored
    # CPU pads to multiples of 8 (hf.CPU_PAD_TO), so more rows fit the same budget.
    fine = hf.batches(lengths, vocab, budget, multiple=hf.CPU_PAD_TO)
    assert [[lengths[i] for i in g] for g in fine] == [[5, 7, 12, 30], [30, 64], [100]]


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
    # A model whose forward takes no `logits_to_keep` is scored from every position's logits, to the same values.
    every_position = hf.score(WholeLogits(model), prompts, responses, k, temperature)
    for a, b, c in zip(batched, one_by_one, every_position, strict=True):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
        np.testing.assert_allclose(a.logprobs, c.logprobs, atol=1e-5)
        assert (a.topk_ids == c.topk_ids).all()


class WholeLogits(torch.nn.Module):
    """A causal LM whose forward has no `logits_to_keep` (older or remote-code models)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.device = model, model.config, model.device

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


def test_batched_generation_matches_one_prompt_at_a_time(tiny_assets):
    """Left-padded batches decode what each prompt alone decodes; log-probs are the sampled distribution's."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_assets["teacher"]).eval()
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, model.config.vocab_size, size=n).tolist() for n in (3, 8, 5)]
    greedy = hf.sample(model, prompts, 2, 6, 0.0, None)
    eos = model.generation_config.eos_token_id
    for p, pairs in zip(prompts, greedy, strict=True):
        alone = model.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False)[0, len(p) :].tolist()
        alone = alone[: alone.index(eos) + 1] if eos in alone else alone
        assert [ids.tolist() for ids, _ in pairs] == [alone, alone]
    sampled = hf.sample(model, prompts, 3, 6, 0.8, seed=5)
    assert [len(pairs) for pairs in sampled] == [3, 3, 3]
    for p, pairs in zip(prompts, sampled, strict=True):
        for ids, lps in pairs:
            assert 1 <= len(ids) <= 6 and len(lps) == len(ids)
            full = torch.tensor([[*p, *ids.tolist()]])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(input_ids=full).logits[0, len(p) - 1 : -1] / 0.8, -1)
            np.testing.assert_allclose(lps, logprobs[torch.arange(len(ids)), torch.from_numpy(ids)], atol=1e-5)
    assert [[i.tolist() for i, _ in ps] for ps in hf.sample(model, prompts, 3, 6, 0.8, seed=5)] == [
        [i.tolist() for i, _ in ps] for ps in sampled
    ]


def test_stop_ids_are_the_generation_configs_eos_list_and_the_tokenizers_eos(tiny_assets, tmp_path):
    """Qwen-style checkpoints declare several end-of-turn ids (`eos_token_id: [<|im_end|>, <|endoftext|>]`); a
    checkpoint without generation_config.json falls back to config.json's eos, as transformers and vLLM do."""
    from transformers import AutoTokenizer

    from opd.rollout.engine import stop_token_ids

    eos = AutoTokenizer.from_pretrained(tiny_assets["teacher"]).eos_token_id
    path = shutil.copytree(tiny_assets["teacher"], tmp_path / "teacher")
    assert stop_token_ids(str(path)) == [eos]
    generation = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": [7, 5]}))
    assert stop_token_ids(str(path)) == sorted({5, 7, eos})
    (path / "generation_config.json").unlink()
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "eos_token_id": 9}))
    assert stop_token_ids(str(path)) == sorted({9, eos})


def test_generation_stops_at_any_stop_id_and_ignores_the_checkpoints_sampling_defaults(tiny_assets):
    """A response ends with the first of the stop ids, whichever it is; a checkpoint's generation_config (top_k,
    top_p, repetition penalty) does not change what is sampled, so the log-probs describe the sampling distribution."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_assets["teacher"]).eval()
    eos = model.generation_config.eos_token_id
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, model.config.vocab_size, size=n).tolist() for n in (3, 8, 5)]
    greedy = [ids.tolist() for pairs in hf.sample(model, prompts, 1, 8, 0.0, None, [eos]) for ids, _ in pairs]
    stop = next(t for r in greedy for t in r[1:] if t != eos)  # a token some response writes after its first
    cut = [ids.tolist() for pairs in hf.sample(model, prompts, 1, 8, 0.0, None, [eos, stop]) for ids, _ in pairs]
    assert cut == [r[: r.index(stop) + 1] if stop in r else r for r in greedy] != greedy

    sampled = hf.sample(model, prompts, 4, 8, 1.5, 3, [eos])
    model.generation_config.update(top_k=1, top_p=0.1, repetition_penalty=3.0, no_repeat_ngram_size=2)
    again = hf.sample(model, prompts, 4, 8, 1.5, 3, [eos])
    assert [[i.tolist() for i, _ in ps] for ps in again] == [[i.tolist() for i, _ in ps] for ps in sampled]
    assert any(ids.tolist() != greedy[p][: len(ids)] for p, ps in enumerate(sampled) for ids, _ in ps)
