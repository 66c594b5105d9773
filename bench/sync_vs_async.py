"""The same distillation job with pipeline.mode=sync and =async, one after the other, compared side by side.

    python bench/sync_vs_async.py                  # the built-in addition demo, 12 rounds each
    python bench/sync_vs_async.py rounds=20 rollout.num_workers=1
    python bench/sync_vs_async.py teachers.0.backend=vllm     # the demo's own teacher backend

The teacher scores with the transformers backend unless overridden. Prints one line per figure: samples/s of
each mode and their ratio (target: async >= 1.5x sync), the learner's idle fraction (target: async < 10%), the
final held-out reverse KL of each (target: within 5%) and how busy the machine's CPUs were. Then a table of
mean seconds per round: each stage busy, and the controller waiting for generation and for teacher feedback.
Timings skip the first round (engine warm-up). Any `key=value` argument overrides both runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BACKEND = "teachers.0.backend=transformers"
"""At this model size a plain forward pass scores faster than vLLM's prompt log-probs (bench/README.md)."""
STAGES = ("round", "generate", "generate_wait", "score", "score_wait", "learn", "sync")
"""`pipeline/<stage>_s`, averaged over the timed rounds."""


class CpuClock:
    """The machine's CPU seconds, busy and in all, read when the monitor logs each round.

    Wraps `Monitor.log` for one run; the busy fraction between the ends of rounds 1 and N-1 leaves out the warm-up
    round and the last round's evaluation. It bounds what overlap can give: a pipeline that keeps every core busy
    cannot go faster by overlapping more.
    """

    def __init__(self) -> None:
        self.at: dict[int, tuple[float, float]] = {}

    def __enter__(self) -> CpuClock:
        import psutil

        from opd.monitoring import Monitor

        self.original = Monitor.log

        def log(monitor, metrics: dict, step: int) -> None:
            times = psutil.cpu_times()
            self.at[step] = (sum(times) - times.idle - getattr(times, "iowait", 0.0), sum(times))
            self.original(monitor, metrics, step)

        Monitor.log = log
        return self

    def __exit__(self, *exc) -> None:
        from opd.monitoring import Monitor

        Monitor.log = self.original

    def busy_fraction(self, first: int, last: int) -> float:
        (busy0, total0), (busy1, total1) = self.at[first], self.at[last]
        return (busy1 - busy0) / (total1 - total0)


def measure(summary: dict) -> dict[str, float]:
    rounds = [r for r in summary["rounds"] if r["round"] >= 2]  # round 1 carries the warm-up
    samples = sum(r["pipeline/samples_per_s"] * r["pipeline/round_s"] for r in rounds)
    seconds = sum(r["pipeline/round_s"] for r in rounds)
    learn = sum(r["pipeline/learn_s"] for r in rounds)
    return {
        "samples_per_s": samples / seconds,
        "learner_idle_fraction": 1 - learn / seconds,
        "reverse_kl": summary["final"]["reverse_kl_after"],
        **{stage: sum(r[f"pipeline/{stage}_s"] for r in rounds) / len(rounds) for stage in STAGES},
    }


def main(overrides: list[str]) -> None:
    import psutil

    from launch import run
    from opd.config import load_config

    results = {}
    for mode in ("sync", "async"):
        cfg = load_config(
            "default",
            [
                "rounds=12",
                "eval.every=1000",
                "wandb.mode=disabled",
                BACKEND,
                f"output_dir=outputs/bench/sync_vs_async/{mode}",
                *overrides,
                f"pipeline.mode={mode}",
            ],
        )
        with CpuClock() as clock:
            results[mode] = measure(run(cfg))
        results[mode]["cpu_busy"] = clock.busy_fraction(1, cfg.rounds - 1)
    sync, rest = results["sync"], results["async"]
    kl_gap = abs(rest["reverse_kl"] - sync["reverse_kl"]) / sync["reverse_kl"]
    print(f"sync  samples/s            {sync['samples_per_s']:.1f}")
    print(f"async samples/s            {rest['samples_per_s']:.1f}")
    print(f"async/sync throughput      {rest['samples_per_s'] / sync['samples_per_s']:.2f}x   (target >= 1.5x)")
    idle = f"sync {sync['learner_idle_fraction']:.1%}, async {rest['learner_idle_fraction']:.1%}"
    print(f"learner idle fraction      {idle}   (target: async < 10%)")
    print(
        f"final reverse KL           sync {sync['reverse_kl']:.4f}, async {rest['reverse_kl']:.4f}, "
        f"differ by {kl_gap:.1%}   (target <= 5%)"
    )
    cpu = f"sync {sync['cpu_busy']:.1%}, async {rest['cpu_busy']:.1%}"
    print(f"machine CPU busy           {cpu}   (rounds 2 to {cfg.rounds - 1}, all {psutil.cpu_count()} cores)")
    print("mean seconds per round  " + "  ".join(f"{stage:>13}" for stage in STAGES))
    for mode, row in results.items():
        print(f"{mode:<23}" + "".join(f"  {row[stage]:13.3f}" for stage in STAGES))


if __name__ == "__main__":
    main(sys.argv[1:])
