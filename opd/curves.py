"""Learning curves as a PNG: held-out accuracy and reverse KL against rounds or teacher tokens, for one run
(`output_dir/curves.png`, also logged to W&B) or several side by side (bench/opd_vs_offline.py).

Reads the per-round metric records `Monitor` keeps (the `rounds` of summary.json), so a finished or resumed run
can be re-plotted from its summary alone.
"""

from __future__ import annotations

import itertools
from pathlib import Path

ACCURACY, KL, TEACHER_TOKENS = "student_accuracy", "reverse_kl", "train/teacher_tokens"


def points(history: list[dict], metric: str, x: str = "round", prefix: str = "eval/") -> tuple[list, list]:
    """`(xs, ys)` of `prefix + metric` over the records that have it; a record before any teacher token was spent
    (the evaluation before training) sits at x = 0."""
    xs, ys, spent = [], [], 0.0
    for record in history:
        spent = record.get(x, spent) if x != "round" else record["round"]
        value = record.get(prefix + metric)
        if value is not None:
            xs.append(spent)
            ys.append(value)
    return xs, ys


def eval_prefixes(history: list[dict]) -> list[str]:
    """`eval/` and each named eval set's `eval/<set>/`, in the order they first appear."""
    found: dict[str, None] = {}
    for record in history:
        for key in record:
            if key.startswith("eval/") and key.endswith("/" + ACCURACY):
                found[key.removesuffix(ACCURACY)] = None
    return list(found) or ["eval/"]


def plot(
    runs: dict[str, list[dict]],
    path: str | Path,
    x: str = "round",
    teacher_accuracy: float | None = None,
    title: str | None = None,
):
    """Accuracy (left) and reverse KL (right) of each run in `runs` (label -> per-round records) against `x`
    ("round" or a cumulative metric such as `train/teacher_tokens`); writes `path` and returns the figure."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt

    fig, (acc_ax, kl_ax) = plt.subplots(1, 2, figsize=(11, 4))
    colors = (f"C{i}" for i in itertools.count())  # one color per curve, the same on both axes
    for label, history in runs.items():
        for prefix in eval_prefixes(history):
            name = label if prefix == "eval/" else f"{label} {prefix.removeprefix('eval/').rstrip('/')}"
            color = next(colors)
            acc_ax.plot(*points(history, ACCURACY, x, prefix), marker="o", color=color, label=name)
            kl_ax.plot(*points(history, KL, x, prefix), marker="o", color=color, label=f"{name} held-out")
        train_kl = points(history, KL, x, prefix="train/")
        if train_kl[0]:
            kl_ax.plot(*train_kl, alpha=0.3, color=color, label=f"{label} on-policy samples")
    if teacher_accuracy is not None:
        acc_ax.axhline(teacher_accuracy, color="black", linestyle="--", label="teacher")
    xlabel = "round" if x == "round" else x.removeprefix("train/").replace("_", " ")
    acc_ax.set(xlabel=xlabel, ylabel="greedy accuracy (held-out)", ylim=(0, 1.05))
    kl_ax.set(xlabel=xlabel, ylabel="reverse KL (nats/token)")
    for ax in (acc_ax, kl_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig
