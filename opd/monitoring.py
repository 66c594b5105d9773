"""Where metrics go: W&B (offline in tests), `summary.json`, and a progress line.

Monitoring never stops training: a W&B failure is reported once and the run goes on.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

from opd.secrets import redact

SUMMARY_FILE = "summary.json"
"""In `output_dir`: the final figures and every round's metrics (what launch.py points to when it ends)."""
SUMMARY_LINE = "summary: "
"""How launch.py's last stdout line starts: the path of the run's summary file follows."""


def _finite(metrics: dict) -> dict:
    """NaN/inf become None (JSON has no NaN); lists, dicts, ints and strings pass through."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


class MonitorError(RuntimeError):
    """wandb.mode=online, and W&B could not start: the run was asked to be watched there, so it does not go on."""


class Monitor:
    def __init__(
        self,
        output_dir: str,
        config: dict,
        mode: str,
        project: str,
        group: str | None,
        name: str | None,
        history: list[dict] | None = None,
        run_id: str | None = None,
        entity: str | None = None,
        tags: list[str] | None = None,
    ):
        """`history` and `run_id` come from a checkpoint when resuming: the curves continue in the same W&B run.
        A W&B that cannot start stops an online run (`MonitorError`); offline, the run goes on without it."""
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.history: list[dict] = list(history or [])
        self.run = None
        if mode == "disabled":
            return
        try:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.run = wandb.init(
                project=project,
                entity=entity,
                group=group,
                name=name,
                tags=tags or None,
                mode=mode,
                dir=str(self.output_dir),
                config=redact(config),
                id=run_id,
                resume="allow" if run_id else None,
            )
        except Exception as err:
            if mode == "online":
                raise MonitorError(
                    f"wandb.mode=online, but W&B could not start ({type(err).__name__}: {err}); check WANDB_API_KEY, "
                    "wandb.entity and the network, or run with wandb.mode=offline and `wandb sync` later"
                ) from err
            warnings.warn(f"W&B disabled: {err}", stacklevel=2)

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    @property
    def wandb_dir(self) -> str | None:
        return self.run.dir if self.run is not None else None

    def log(self, metrics: dict[str, float | list], step: int) -> None:
        """Scalars become curves; a list of numbers (e.g. correction positions) becomes a W&B histogram."""
        self.history.append({"round": step, **_finite(metrics)})
        if self.run is None:
            return
        try:
            import wandb

            present = {k: v for k, v in metrics.items() if v is not None and v != []}
            self.run.log({k: wandb.Histogram(v) if isinstance(v, list) else v for k, v in present.items()}, step=step)
        except Exception as err:
            warnings.warn(f"W&B log failed, disabling it: {err}", stacklevel=2)
            self.run = None

    def table(self, name: str, rows: list[dict], step: int) -> None:
        """Example rows as a W&B table and appended to `<output_dir>/<name>.jsonl` (readable without W&B)."""
        if not rows:
            return
        with open(self.output_dir / f"{name}.jsonl", "a") as f:
            f.writelines(json.dumps({"round": step, **row}) + "\n" for row in rows)
        if self.run is None:
            return
        try:
            import wandb

            columns = list(rows[0])
            self.run.log({name: wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])}, step=step)
        except Exception as err:
            warnings.warn(f"W&B table failed: {err}", stacklevel=2)

    def finish(self, final: dict) -> dict:
        """Write summary.json, close W&B, and return the summary."""
        summary = {"final": _finite(final), "rounds": self.history, "wandb_dir": self.wandb_dir}
        tmp = self.output_dir / f"{SUMMARY_FILE}.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(self.output_dir / SUMMARY_FILE)
        plotted = self.plot_curves(final.get("teacher_accuracy"))
        if self.run is not None:
            try:
                import wandb

                self.run.summary.update({f"final/{k}": v for k, v in _finite(final).items() if v is not None})
                if plotted is not None:
                    self.run.log({"curves": wandb.Image(str(plotted))})
            except Exception as err:
                warnings.warn(f"W&B summary failed: {err}", stacklevel=2)
        self.close()
        return summary

    def plot_curves(self, teacher_accuracy: float | None) -> Path | None:
        """`output_dir/curves.png`: held-out accuracy and reverse KL per round, readable without W&B."""
        from opd import curves

        path = self.output_dir / "curves.png"
        try:
            curves.plot({"student": self.history}, path, teacher_accuracy=teacher_accuracy)
        except Exception as err:
            warnings.warn(f"curves.png not written: {err}", stacklevel=2)
            return None
        return path

    def close(self) -> None:
        """Finish the W&B run (idempotent: also called when a run stops early, so the next attempt can resume it)."""
        if self.run is None:
            return
        try:
            self.run.finish()
        except Exception as err:
            warnings.warn(f"W&B finish failed: {err}", stacklevel=2)
        self.run = None
