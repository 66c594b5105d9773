"""Shared fixtures: tiny checkpoints and prompt files built on the fly (no hub access)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> dict[str, Path]:
    """Teachers and a smaller student sharing one tokenizer, a teacher with its own tokenizer, and prompt files.

    The teacher is untrained but opinionated (scaled embeddings give peaked next-token
    distributions), so the student has a clear target to move towards in a few rounds.
    """
    import torch

    from opd.tiny import TinySpec, build_model, save_checkpoint, train_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    rng = random.Random(0)
    rows = []
    for _ in range(300):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        rows.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})
    tok = train_tokenizer([r["prompt"] + r["answer"] for r in rows], 40)
    teacher = build_model(tok, TinySpec(layers=2, hidden=64, heads=2), seed=1)
    with torch.no_grad():
        teacher.model.embed_tokens.weight.mul_(4.0)
    student = build_model(tok, TinySpec(layers=1, hidden=64, heads=2), seed=2)
    big = build_model(tok, TinySpec(layers=3, hidden=128, heads=4, kv_heads=2, intermediate=256), seed=3)
    # Same text, another family and tokenizer: digits merge ("86" is one token), so its signal must be bridged.
    other_tok = train_tokenizer([r["prompt"] + r["answer"] for r in rows], 320, split_digits=False)
    other = build_model(other_tok, TinySpec(layers=2, hidden=64, heads=2), seed=4, arch="gpt2")
    with torch.no_grad():
        for model in (big, other):
            model.get_input_embeddings().weight.mul_(4.0)
    return {
        "teacher": save_checkpoint(teacher, tok, root / "teacher"),
        "big_teacher": save_checkpoint(big, tok, root / "big_teacher"),
        "other_tokenizer_teacher": save_checkpoint(other, other_tok, root / "other_tokenizer_teacher"),
        "student": save_checkpoint(student, tok, root / "student"),
        "train": write_jsonl(root / "train.jsonl", rows[:240]),
        "eval": write_jsonl(root / "eval.jsonl", rows[240:]),
    }


@pytest.fixture(scope="session")
def smollm2_assets(tmp_path_factory) -> dict[str, Path]:
    """The SmolLM2 built-ins by name (opd/pretrained.py), built once per session through the built-in cache.

    About 45 s on 2 cores (dequantizing the GGUF), 700 MB on disk; tests using it are `integration`.
    """
    from opd.assets import ensure_builtin
    from opd.catalog import BUILTINS, SMOLLM2

    cache = tmp_path_factory.mktemp("cache")
    return {name: ensure_builtin(name, cache) for name, entry in BUILTINS.items() if entry.group == SMOLLM2}
