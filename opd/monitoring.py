"""Where metrics go: W&B (offline in tests), `summary.json`, and a progress line.

Monitoring never stops training: a W&B failure is reported once and the run goes on.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path

_SECRET = re.compile(r"(key|token|secret|password)", re.IGNORECASE)


def redact(config: dict) -> dict:
    """Drop values of keys that look like credentials before anything is logged."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out[k] = redact(v)
        elif _SECRET.search(k):
            out[k] = "***"
        else:
            out[k] = v
    return out


def _finite(metrics: dict[str, float]) -> dict[str, float | None]:
    return {k: (v if v is None or isinstance(v, int | str) or math.isfinite(v) else None) for k, v in metrics.items()}


class Monitor:
    def __init__(self, output_dir: str, config: dict, mode: str, project: str, group: str | None, name: str | None):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.history: list[dict] = []
        self.run = None
        if mode == "disabled":
            return
        try:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.run = wandb.init(
                project=project, group=group, name=name, mode=mode, dir=str(self.output_dir), config=redact(config)
            )
        except Exception as err:
            warnings.warn(f"W&B disabled: {err}", stacklevel=2)

    @property
    def wandb_dir(self) -> str | None:
        return self.run.dir if self.run is not None else None

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.history.append({"round": step, **_finite(metrics)})
        if self.run is None:
            return
        try:
            self.run.log({k: v for k, v in metrics.items() if v is not None}, step=step)
        except Exception as err:
            warnings.warn(f"W&B log failed, disabling it: {err}", stacklevel=2)
            self.run = None

    def finish(self, final: dict) -> dict:
        """Write summary.json, close W&B, and return the summary."""
        summary = {"final": _finite(final), "rounds": self.history, "wandb_dir": self.wandb_dir}
        tmp = self.output_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(self.output_dir / "summary.json")
        if self.run is not None:
            try:
                self.run.summary.update({f"final/{k}": v for k, v in _finite(final).items() if v is not None})
                self.run.finish()
            except Exception as err:
                warnings.warn(f"W&B finish failed: {err}", stacklevel=2)
        return summary
