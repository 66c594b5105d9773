"""Two real teachers routed by domain: Qwen2.5-Coder-0.5B-Instruct for word problems, SmolLM2-135M-Instruct (the
student's own starting checkpoint) for column addition; the student learns each domain from its own teacher.

    python bench/route_pair.py                 # conf/qwen_route.yaml: 12 rounds (~20 min on 2 cores, both runs)
    python bench/route_pair.py rounds=24       # any key=value overrides both runs

Writes the config's data files (the built-in word problems and addition sets, each row tagged with its `domain`,
1,000 of each interleaved for training, one held-out file per domain), then two runs:

    routed    the config: each prompt scored by the teacher its domain routes to
    swapped   one round with the routes swapped, for the other teacher's accuracy on each domain (is the route the
              better teacher?)

and prints, per domain, the routed teacher and its accuracy, the other teacher's, the student's before -> after,
and each teacher's share of the signal, ending with

    route  <domain> <teacher> <T> (other <T'>) student <S0> -> <S1>  ...  share <teacher> <x> ...

The same figures are in each run's summary.json (`eval_sets`, `teacher_signal_share`) and in W&B (`eval/<domain>/...`,
`teachers/<name>_samples`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIG = "qwen_route"
PER_DOMAIN = 1000
"""Training prompts of each domain (the built-in word problems have 2,000, the addition set more)."""


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def write_domains(cfg) -> None:
    """The config's train and eval files, from the built-in set named like each domain, rows tagged `domain`."""
    from opd.assets import ensure_builtin

    def tagged(name: str, domain: str) -> list[dict]:
        rows = read_jsonl(ensure_builtin(name, cfg.cache_dir))
        return [{"prompt": r["prompt"], "answer": r["answer"], "domain": domain} for r in rows]

    domains = list(cfg.combine.routes)
    train = [tagged(f"{d}/train", d)[:PER_DOMAIN] for d in domains]
    write_jsonl(ROOT / cfg.data.train, [row for group in zip(*train, strict=True) for row in group])
    for domain, path in cfg.data.eval.items():
        write_jsonl(ROOT / path, tagged(f"{domain}/eval", domain))


def main(argv: list[str]) -> None:
    from launch import run
    from opd.config import load_config

    write_domains(load_config(CONFIG, argv, not_here=[]))  # the data files it names are the ones to write
    routed_cfg = load_config(CONFIG, ["wandb.group=route_pair", "wandb.name=routed", *argv])
    routes = dict(routed_cfg.combine.routes)
    (a, ta), (b, tb) = routes.items()
    swapped_cfg = load_config(
        CONFIG,
        [
            f"output_dir={routed_cfg.output_dir}_swapped",
            "wandb.group=route_pair",
            "wandb.name=swapped",
            *argv,
            "rounds=1",
            f"combine.routes.{a}={tb}",
            f"combine.routes.{b}={ta}",
        ],
    )
    report(run(routed_cfg)["final"], run(swapped_cfg)["final"], routes, routed_cfg.data.eval_size)


def report(routed: dict, swapped: dict, routes: dict[str, str], eval_size: int) -> None:
    """The table and the one-line result, from the two runs' final figures (summary.json's `final`)."""
    total = sum(routed["teacher_signal_share"].values()) or 1.0
    print(f"\nheld-out prompts per domain: {eval_size}")
    print(f"{'domain':<16}{'teacher':<10}{'accuracy':>9}{'other':>8}{'student':>9}{'after':>8}{'share':>8}")
    line = ["route"]
    for domain, teacher in routes.items():
        mine, other = routed["eval_sets"][domain], swapped["eval_sets"][domain]
        acc, other_acc = mine["teacher_accuracy"], other["teacher_accuracy"]
        before, after = mine["student_accuracy_before"], mine["student_accuracy_after"]
        share = routed["teacher_signal_share"].get(teacher, 0.0) / total
        print(f"{domain:<16}{teacher:<10}{acc:>9.3f}{other_acc:>8.3f}{before:>9.3f}{after:>8.3f}{share:>8.2f}")
        line.append(f"{domain} {teacher} {acc:.3f} (other {other_acc:.3f}) student {before:.3f} -> {after:.3f}")
    shares = "  ".join(f"{n} {v / total:.2f}" for n, v in routed["teacher_signal_share"].items())
    print("  ".join(line) + f"  share {shares}")


if __name__ == "__main__":
    main(sys.argv[1:])
