"""A real teacher of another family: Qwen2.5-Coder-0.5B-Instruct teaches SmolLM2-135M-Instruct, on-policy and offline.

    python bench/real_pair.py                        # conf/qwen_to_smollm2.yaml to 6,400 teacher tokens (~55 min)
    python bench/real_pair.py budget=16000 out=outputs/bench/rp_long
    python bench/real_pair.py wandb.mode=online      # any key=value overrides both runs

Both methods start from the same student and teacher, with conf/qwen_to_smollm2.yaml's settings, on the built-in
word problems (held-out accuracy: greedy, the response's last number against the answer):

    opd      on-policy distillation, the config's objective (the teacher's top-k projected onto the student's
             vocabulary through the text at every position of the student's own samples)
    offline  offline KD at the teacher tokens opd spent: the teacher writes responses to the training prompts
             (sampled, its own chat template), the student imitates them (mode=offline, loss.type=sft)

Prints one line per method with its held-out accuracy and standard error, then

    real pair  teacher <T>  student <S0> -> opd <S1>  offline <S2>  teacher tokens <N>

and writes `<out>/real_pair.png` (held-out accuracy against teacher tokens, both methods). Each run's curves also
land in W&B (group `real_pair`).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIG = "qwen_to_smollm2"
BUDGET = 6_400
OWN = ("budget=", "out=")
"""The bench's own arguments; every other `key=value` is a config override."""


def parse(argv: list[str]) -> tuple[int, Path, list[str]]:
    own = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in argv if a.startswith(OWN)}
    out = Path(own.get("out", "outputs/bench/real_pair"))
    return int(own.get("budget", BUDGET)), out, [a for a in argv if not a.startswith(OWN)]


def standard_error(accuracy: float, n: int) -> float:
    """Of a proportion measured on n prompts."""
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / n)


def main(argv: list[str]) -> None:
    from launch import run
    from opd import curves
    from opd.config import load_config

    budget, out, overrides = parse(argv)
    out.mkdir(parents=True, exist_ok=True)
    # An evaluation costs 1-2 minutes here (128 prompts scored by a 0.5B teacher on 2 cores): about five per run.
    # Once the student answers with just the number, both methods spend about as many teacher tokens a round (its
    # 2-4 token answers scored, or the teacher's own written), so they evaluate at about the same teacher tokens.
    methods = {
        "opd": [f"max_teacher_tokens={budget}", "eval.every=14"],
        "offline": ["mode=offline", "loss.type=sft", "eval.every=12"],
    }
    histories, finals = {}, {}
    for name, extra in methods.items():
        if name == "offline":  # the tokens on-policy spent, not the budget it may have stopped short of
            extra = [*extra, f"max_teacher_tokens={finals['opd']['teacher_tokens']}"]
        cfg = load_config(
            CONFIG,
            [
                "rounds=100000",  # the teacher-token budget ends each run
                f"output_dir={out / name}",
                "wandb.group=real_pair",
                f"wandb.name={name}",
                *extra,
                *overrides,
            ],
        )
        summary = run(cfg)
        histories[name], finals[name] = summary["rounds"], summary["final"]
        print(f"[real_pair] {name} done: {finals[name]['student_accuracy_after']:.3f}", flush=True)
    n = min(cfg.data.eval_size, len(Path(cfg_eval_path(cfg)).read_text().splitlines()))
    teacher, before = finals["opd"]["teacher_accuracy"], finals["opd"]["student_accuracy_before"]
    print(f"\nheld-out prompts: {n}; standard errors in brackets")
    print(f"{'':<10}{'accuracy':>10}{'(se)':>9}{'teacher tokens':>16}{'rounds':>8}")
    print(f"{'teacher':<10}{teacher:>10.3f}{f'({standard_error(teacher, n):.3f})':>9}")
    print(f"{'student':<10}{before:>10.3f}{f'({standard_error(before, n):.3f})':>9}")
    for name, final in finals.items():
        acc = final["student_accuracy_after"]
        se = f"({standard_error(acc, n):.3f})"
        print(f"{name:<10}{acc:>10.3f}{se:>9}{final['teacher_tokens']:>16}{final['rounds']:>8}")
    plot = out / "real_pair.png"
    title = "Qwen2.5-Coder-0.5B-Instruct -> SmolLM2-135M-Instruct, word problems"
    curves.plot(histories, plot, x=curves.TEACHER_TOKENS, teacher_accuracy=teacher, title=title)
    print(
        f"real pair  teacher {teacher:.3f}  student {before:.3f} -> opd {finals['opd']['student_accuracy_after']:.3f}"
        f"  offline {finals['offline']['student_accuracy_after']:.3f}"
        f"  teacher tokens {finals['opd']['teacher_tokens']}"
    )
    print(f"plot: {plot}")


def cfg_eval_path(cfg) -> str:
    """The held-out prompt file the runs evaluated on (a `builtin:` one resolved in the cache)."""
    from launch import resolve

    return resolve(cfg.data.eval, cfg.cache_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
