"""Build tiny Hugging Face checkpoints on the fly (no hub access needed).

Tests and the demo save these to disk and load them back through exactly the code
path a user's checkpoint takes (`AutoTokenizer` / `AutoModelForCausalLM` / vLLM).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 300, split_digits: bool = True):
    """A byte-level BPE tokenizer trained on `texts` (256 bytes + merges up to `vocab_size`), one token per digit.

    Byte-level round-trips any text exactly (so cross-tokenizer alignment and answer
    parsing see what the model wrote); single digits make arithmetic learnable.
    `split_digits=False` lets digits merge, giving a genuinely different tokenization of
    the same text (the cross-tokenizer teacher in tests).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    steps = [pre_tokenizers.Digits(individual_digits=True)] if split_digits else []
    tok.pre_tokenizer = pre_tokenizers.Sequence([*steps, pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    # The full byte alphabet keeps every text encodable: a character the corpus never showed must not vanish.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, model_max_length=1024)


@dataclass(frozen=True)
class TinySpec:
    """Size of a tiny Qwen2 decoder. head_dim 32 is the smallest vLLM's CPU attention takes."""

    layers: int = 2
    hidden: int = 64
    heads: int = 2
    kv_heads: int = 1
    intermediate: int = 128
    max_positions: int = 256


def build_model(tokenizer, spec: TinySpec, seed: int = 0, arch: str = "qwen2"):
    """A randomly initialised causal LM sized by `spec` for `tokenizer`.

    `qwen2` is the default family. `gpt2` is another family whose checkpoints keep the tokenizer's own
    pre-tokenization (Qwen2's tokenizer class re-imposes single-digit splitting on load), so a GPT-2
    teacher can genuinely tokenize the same text differently from a Qwen2 student.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    if arch == "gpt2":
        gpt2 = GPT2Config(
            vocab_size=len(tokenizer),
            n_embd=spec.hidden,
            n_layer=spec.layers,
            n_head=spec.heads,
            n_inner=spec.intermediate,
            n_positions=spec.max_positions,
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        return GPT2LMHeadModel(gpt2)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        head_dim=spec.hidden // spec.heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
        torch_dtype="float32",
    )
    return Qwen2ForCausalLM(config)


def save_checkpoint(model, tokenizer, path: str | Path) -> Path:
    """Save model and tokenizer side by side, as a hub checkpoint directory looks."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
