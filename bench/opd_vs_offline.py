"""On-policy distillation against offline KD at the same teacher cost, on the built-in addition task, in one process.

    python bench/opd_vs_offline.py                         # every method to 1.7M teacher tokens (~20 min)
    python bench/opd_vs_offline.py budget=600000 rounds=100 methods=jsd,offline
    python bench/opd_vs_offline.py wandb.mode=online       # any key=value overrides every run

Every method starts from the same built-in student and teacher with the demo's settings (conf/default.yaml: its
rounds and learning-rate schedule) and runs until the teacher has spent `budget` tokens (`max_teacher_tokens`:
response tokens it scored, plus those it wrote as corrections or offline samples) or the rounds run out, then the
held-out set is evaluated. The default budget is about what 275 of the demo's 300 rounds cost, so the schedule has
nearly reached its end wherever a method spends a round's worth of tokens per round:

    jsd          on-policy, the demo's objective (generalised JSD over the teacher's top-k)
    reverse_kl   on-policy, the sampled-token policy gradient less the per-position optimal baseline
    corrections  on-policy jsd, and the teacher rewrites each sample from its first unlikely token
    offline      offline KD: the teacher writes the responses, the student imitates them (mode=offline, sft)

Prints one line per method (greedy accuracy and reverse KL at the budget), then
`accuracy at equal teacher tokens  opd <best on-policy>  offline <acc>  teacher <acc>`, and writes
`<out>/opd_vs_offline.png` (accuracy and reverse KL against teacher tokens, every method). Each run's curves also
land in W&B (group `opd_vs_offline`, one run per method) with a summary table of the methods.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BUDGET = 1_700_000
METHODS = {
    "jsd": ["loss.type=jsd"],
    "reverse_kl": ["loss.type=reverse_kl", "loss.baseline=optimal"],
    "corrections": ["loss.type=jsd", "correction.enabled=true"],
    "offline": ["mode=offline", "loss.type=sft"],
}
OWN = ("budget=", "methods=", "out=")
"""The bench's own arguments; every other `key=value` is a config override."""


def parse(argv: list[str]) -> tuple[int, list[str], Path, list[str]]:
    own = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in argv if a.startswith(OWN)}
    methods = own.get("methods", ",".join(METHODS)).split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        sys.exit(f"unknown methods {unknown}; expected some of {list(METHODS)}")
    out = Path(own.get("out", "outputs/bench/opd_vs_offline"))
    return int(own.get("budget", BUDGET)), methods, out, [a for a in argv if not a.startswith(OWN)]


def summary_table(cfg, rows: list[dict], plot: Path) -> None:
    """The methods side by side as one W&B run of the group: a table and the plot."""
    if cfg.wandb.mode == "disabled":
        return
    import wandb

    run = wandb.init(
        project=cfg.wandb.project, group="opd_vs_offline", name="summary", mode=cfg.wandb.mode, dir=str(plot.parent)
    )
    columns = list(rows[0])
    run.log({"methods": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])})
    run.log({"opd_vs_offline": wandb.Image(str(plot))})
    run.finish()


def main(argv: list[str]) -> None:
    from launch import run
    from opd import curves
    from opd.config import load_config

    budget, methods, out, overrides = parse(argv)
    out.mkdir(parents=True, exist_ok=True)
    histories, rows, teacher = {}, [], None
    for name in methods:
        cfg = load_config(
            "default",
            [
                f"max_teacher_tokens={budget}",
                f"output_dir={out / name}",
                "wandb.group=opd_vs_offline",
                f"wandb.name={name}",
                *METHODS[name],
                *overrides,
            ],
        )
        summary = run(cfg)
        final = summary["final"]
        histories[name], teacher = summary["rounds"], final["teacher_accuracy"]
        rows.append(
            {
                "method": name,
                "accuracy": final["student_accuracy_after"],
                "reverse_kl": final["reverse_kl_after"],
                "teacher_tokens": final["teacher_tokens"],
                "rounds": final["rounds"],
            }
        )
    plot = out / "opd_vs_offline.png"
    curves.plot(histories, plot, x=curves.TEACHER_TOKENS, teacher_accuracy=teacher, title="at equal teacher tokens")
    print(f"\n{'method':<13}{'accuracy':>9}{'reverse KL':>12}{'teacher tokens':>16}{'rounds':>8}")
    for r in rows:
        print(
            f"{r['method']:<13}{r['accuracy']:>9.3f}{r['reverse_kl']:>12.3f}{r['teacher_tokens']:>16}{r['rounds']:>8}"
        )
    on_policy = [r["accuracy"] for r in rows if r["method"] != "offline"]
    offline = [r["accuracy"] for r in rows if r["method"] == "offline"]
    opd = f"{max(on_policy):.3f}" if on_policy else "-"
    off = f"{offline[0]:.3f}" if offline else "-"
    print(f"accuracy at equal teacher tokens  opd {opd}  offline {off}  teacher {teacher:.3f}")
    print(f"plot: {plot}")
    summary_table(cfg, rows, plot)


if __name__ == "__main__":
    main(sys.argv[1:])
