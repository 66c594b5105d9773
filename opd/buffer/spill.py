"""Samples on disk as one safetensors file: flat arrays plus offsets, the scalars as columns, text as metadata.

A buffer shard writes its contents with `save` at every checkpoint and reads them back with `load` on
resume. safetensors (not pickle) so the file is safe to open, readable from any language, and loaded
without executing code; the write goes to a temporary name and is renamed, so a reader never sees half.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from opd.buffer.sample import Sample

_RAGGED = ("prompt_ids", "response_ids", "logprobs", "teacher_logprobs", "teacher_topk_ids", "teacher_topk_logprobs")
"""Per-sample arrays, concatenated along their first axis; a sample without one has length 0 there."""
_SCALARS = {"version": np.int64, "prompt_index": np.int64, "weight": np.float64, "advantage_bonus": np.float64}
_OPTIONAL = {"correction_start": np.int64, "judge_score": np.float64}
"""Optional scalars: a parallel `<name>.set` column says which are present."""
_TEXT = ("answer", "teacher")


def save(samples: list[Sample], path: str | Path) -> None:
    """Write `samples` to `path` atomically (temp file, then rename)."""
    tensors: dict[str, np.ndarray] = {}
    for name in _RAGGED:
        parts = [getattr(s, name) for s in samples]
        present = [np.asarray(p) for p in parts if p is not None]
        lengths = np.asarray([0 if p is None else len(p) for p in parts], dtype=np.int64)
        tensors[f"{name}.lengths"] = lengths
        tensors[f"{name}.present"] = np.asarray([p is not None for p in parts], dtype=np.uint8)
        if present:  # zero-length parts are left out, so an empty `np.array([])` cannot turn ids into floats
            tensors[name] = np.ascontiguousarray(np.concatenate([p for p in present if len(p)] or present[:1]))
    for name, dtype in _SCALARS.items():
        tensors[name] = np.asarray([getattr(s, name) for s in samples], dtype=dtype)
    for name, dtype in _OPTIONAL.items():
        values = [getattr(s, name) for s in samples]
        tensors[name] = np.asarray([0 if v is None else v for v in values], dtype=dtype)
        tensors[f"{name}.set"] = np.asarray([v is not None for v in values], dtype=np.uint8)
    metadata = {name: json.dumps([getattr(s, name) for s in samples]) for name in _TEXT}
    metadata["count"] = str(len(samples))
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load(path: str | Path) -> list[Sample]:
    """The samples `save` wrote to `path`, equal field by field."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    n = int(metadata["count"])
    columns: dict[str, list] = {}
    for name in _RAGGED:
        lengths, present = tensors[f"{name}.lengths"], tensors[f"{name}.present"]
        flat = tensors.get(name)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        columns[name] = [flat[starts[i] : starts[i + 1]] if present[i] else None for i in range(n)]
    for name in _SCALARS:
        columns[name] = tensors[name].tolist()
    for name in _OPTIONAL:
        present = tensors[f"{name}.set"].astype(bool).tolist()
        columns[name] = [v if ok else None for v, ok in zip(tensors[name].tolist(), present, strict=True)]
    for name in _TEXT:
        columns[name] = json.loads(metadata[name])
    return [Sample(**{name: values[i] for name, values in columns.items()}) for i in range(n)]
