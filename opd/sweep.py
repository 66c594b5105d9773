"""Config sweeps: `launch.py --multirun loss.beta=0,0.5,1 learner.lr=1e-5,3e-5` runs the grid.

Each point is a separate run with its own output dir, grouped under one W&B group;
every point's config is validated before the first run starts.
"""

from __future__ import annotations

import itertools
import re

_SPLIT = re.compile(r",(?![^\[\]{}]*[\]}])")  # commas outside [...] and {...}


def expand(overrides: list[str]) -> list[list[str]]:
    """The cartesian product of comma-separated override values, in the order given.

    A key given twice keeps its last value, at the place it was first given, as in a single run's overrides
    (`rounds=4 ... rounds=8` means 8): a sweep can vary a key a base list of overrides also sets.
    """
    axes: dict[str, list[str]] = {}
    for item in overrides:
        key, _, value = item.partition("=")
        axes[key] = [f"{key}={v}" for v in _SPLIT.split(value)]
    return [list(point) for point in itertools.product(*axes.values())]


def varying(points: list[list[str]]) -> list[str]:
    """Keys whose value differs across the grid (they name the runs)."""
    keys = [item.partition("=")[0] for item in points[0]]
    return [k for i, k in enumerate(keys) if len({p[i] for p in points}) > 1]


def run_name(point: list[str], keys: list[str]) -> str:
    return ",".join(item for item in point if item.partition("=")[0] in keys) or "base"


def table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of `rows` (one per run) over `columns`."""

    def cell(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else ("n/a" if v is None else str(v))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def flat(config: dict, prefix: str = "") -> dict[str, object]:
    """A nested config as dotted keys: `{"learner": {"lr": 1e-4}}` -> `{"learner.lr": 1e-4}`; list items by index."""
    out: dict[str, object] = {}
    items = config.items() if isinstance(config, dict) else enumerate(config)
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, dict | list) and value:
            out |= flat(value, f"{name}.")
        else:
            out[name] = value
    return out


def differences(configs: list[dict]) -> list[dict[str, object]]:
    """Per config, the dotted keys whose value is not the same in every config of the grid (what a dry run of a
    sweep shows per point, instead of every point's whole config)."""
    flats = [flat(c) for c in configs]
    keys = sorted({k for f in flats for k in f})
    differing = [k for k in keys if len({repr(f.get(k)) for f in flats}) > 1]
    return [{k: f.get(k) for k in differing} for f in flats]
