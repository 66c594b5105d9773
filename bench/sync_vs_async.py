"""The same distillation job with pipeline.mode=sync, =async and =async at depth 2, one after the other, side by side.

    python bench/sync_vs_async.py                  # the built-in addition demo, 12 rounds each
    python bench/sync_vs_async.py rounds=20 rollout.num_workers=1
    python bench/sync_vs_async.py teachers.0.backend=vllm     # the demo's own teacher backend
    python bench/sync_vs_async.py preset=smollm2   # SmolLM2-135M-Instruct -> its pruned copy, 4 rounds of 4 x 4
                                                   # chat samples of <= 256 tokens (bench/presets.py)

The teacher scores with the transformers backend unless overridden. Prints one line per run: samples/s and its
ratio to sync (target: async >= 1.5x), the learner's idle fraction (target: async < 10%), how busy the
machine's CPUs were, and the final held-out reverse KL and its gap to sync's (target: within 5%). Then a table
of mean seconds per round: each stage busy, and the controller waiting for generation and for teacher
feedback. Timings skip the first round (engine warm-up). Any `key=value` argument overrides every run.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.presets import SYNC_VS_ASYNC, split  # noqa: E402

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


def main(argv: list[str]) -> None:
    import psutil

    from launch import run
    from opd.config import load_config

    preset, overrides = split(argv, SYNC_VS_ASYNC)
    base = [*preset.overrides, "wandb.mode=disabled", BACKEND]
    steps = load_config(preset.config, [*base, *overrides]).learner.mini_batches
    variants = {  # depth 2 trains on samples two rounds (2 x mini_batches versions) old: staleness must allow it
        "sync": ["pipeline.mode=sync"],
        "async": ["pipeline.mode=async"],
        "async, depth 2": ["pipeline.mode=async", "pipeline.depth=2", f"buffer.max_staleness={2 * steps}"],
    }
    results = {}
    for name, variant in variants.items():
        out = f"output_dir=outputs/bench/sync_vs_async/{name.replace(', ', '_').replace(' ', '')}"
        cfg = load_config(preset.config, [*base, out, *overrides, *variant])
        with CpuClock() as clock:
            results[name] = measure(run(cfg))
        results[name]["cpu_busy"] = clock.busy_fraction(1, cfg.rounds - 1)
    sync = results["sync"]
    print(
        f"{'':<16}{'samples/s':>10}{'vs sync':>9}{'learner idle':>14}{'CPU busy':>10}{'reverse KL':>12}{'vs sync':>9}"
    )
    for name, row in results.items():
        ratio = f"{row['samples_per_s'] / sync['samples_per_s']:.2f}x" if name != "sync" else ""
        gap = f"{abs(row['reverse_kl'] - sync['reverse_kl']) / sync['reverse_kl']:.1%}" if name != "sync" else ""
        print(
            f"{name:<16}{row['samples_per_s']:>10.1f}{ratio:>9}{row['learner_idle_fraction']:>14.1%}"
            f"{row['cpu_busy']:>10.1%}{row['reverse_kl']:>12.4f}{gap:>9}"
        )
    print(
        "targets: async >= 1.5x sync, async learner idle < 10%, final reverse KL within 5% of sync; CPU busy: "
        f"rounds 2 to {cfg.rounds - 1}, all {psutil.cpu_count()} cores"
    )
    print("mean seconds per round  " + "  ".join(f"{stage:>13}" for stage in STAGES))
    for name, row in results.items():
        print(f"{name:<23}" + "".join(f"  {row[stage]:13.3f}" for stage in STAGES))


if __name__ == "__main__":
    main(sys.argv[1:])
