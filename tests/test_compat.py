"""Models the CPU engines cannot run are refused on the driver, from their config.json alone (no weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opd.compat import VLLM_CPU_HEAD_SIZES, IncompatibleModels, check_cpu_attention, head_size
from opd.config import load_config


def checkpoint(path: Path, hidden: int, heads: int, **extra) -> str:
    """A directory holding only a Llama config.json."""
    path.mkdir()
    fields = {"model_type": "llama", "hidden_size": hidden, "num_attention_heads": heads, "num_key_value_heads": heads}
    (path / "config.json").write_text(
        json.dumps({**fields, "intermediate_size": 2 * hidden, "vocab_size": 64, **extra})
    )
    return str(path)


def test_head_size_is_head_dim_or_hidden_size_over_heads(tmp_path):
    assert head_size(checkpoint(tmp_path / "a", 48, 4)) == 12
    assert head_size(checkpoint(tmp_path / "b", 48, 4, head_dim=64)) == 64  # Gemma-style: set apart from hidden


def test_a_student_vllm_cannot_run_on_cpu_is_refused_with_the_sizes_allowed(tmp_path):
    good, bad = checkpoint(tmp_path / "good", 128, 4), checkpoint(tmp_path / "bad", 48, 4)
    cfg = load_config("default")
    teachers = {cfg.teachers[0].name: good}
    with pytest.raises(IncompatibleModels) as err:
        check_cpu_attention(cfg, bad, teachers)
    message = str(err.value)
    assert f"student.model={bad}" in message and "head size 12" in message
    assert ", ".join(map(str, VLLM_CPU_HEAD_SIZES)) in message and "teachers" not in message
    check_cpu_attention(cfg, good, teachers)
    # Rollout workers with GPUs run another attention backend: not this check's business.
    check_cpu_attention(load_config("default", ["rollout.gpus_per_worker=1"]), bad, teachers)


def test_a_vllm_teacher_on_cpu_is_refused_and_pointed_at_the_transformers_backend(tmp_path):
    good, bad = checkpoint(tmp_path / "good", 128, 4), checkpoint(tmp_path / "bad", 48, 4)
    two = ["teachers=[{name: a}, {name: b}]"]
    with pytest.raises(IncompatibleModels) as err:
        check_cpu_attention(load_config("default", two), bad, {"a": good, "b": bad})
    message = str(err.value)
    assert f"student.model={bad}" in message  # every problem in one error
    assert f"teachers.1.model={bad} (teacher 'b')" in message and "teachers.1.backend=transformers" in message
    assert "teachers.0" not in message
    for way_out in ("teachers.1.backend=transformers", "teachers.1.gpus_per_replica=1"):
        check_cpu_attention(load_config("default", [*two, way_out]), good, {"a": good, "b": bad})


def test_the_builtin_addition_models_pass(tmp_path):
    """The demo's teacher and student (opd/assets.py recipes, built by opd/tiny.py) have a head size vLLM's CPU
    attention runs."""
    from opd import assets
    from opd.tiny import build_model, train_tokenizer

    tok = train_tokenizer(["12+34=46"], 270)
    paths = {}
    for name, recipe in (("teacher", assets.TEACHER), ("student", assets.STUDENT)):
        paths[name] = str(tmp_path / name)
        build_model(tok, recipe.spec).config.save_pretrained(paths[name])
    cfg = load_config("default")
    check_cpu_attention(cfg, paths["student"], {cfg.teachers[0].name: paths["teacher"]})


def test_the_sizes_allowed_are_vllms_own():
    pytest.importorskip("vllm")
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    assert list(VLLM_CPU_HEAD_SIZES) == CPUAttentionBackend.get_supported_head_sizes()
