"""Samples on disk as one safetensors file: flat arrays plus offsets, the scalars as columns, text as metadata.

A buffer shard writes its contents with `save` at every checkpoint and reads them back with `load` on
resume. safetensors (not pickle) so the file is safe to open, readable from any language, and loaded
without executing code; the write goes to a temporary name and is renamed, so a reader never sees half.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.numpy import load_file, save_file

from opd.buffer.sample import TEXT, Sample, Samples, from_columns, to_columns


def save(samples: list[Sample], path: str | Path) -> None:
    """Write `samples` to `path` atomically (temp file, then rename)."""
    tensors, text = to_columns(samples)
    metadata = {name: json.dumps(values) for name, values in text.items()}
    metadata["count"] = str(len(samples))
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load(path: str | Path) -> Samples:
    """The samples `save` wrote to `path`, equal field by field."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata()
    return from_columns(load_file(str(path)), {name: json.loads(metadata[name]) for name in TEXT})
