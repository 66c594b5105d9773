"""Cores each stage's own process got, and what the rest of the machine took meanwhile (bench/stages.py's table).

On a machine of a few cores a stage's speed is bounded by the cores its process gets. While an opd stage runs,
Ray's own processes (GCS, raylet, dashboard agent, log and autoscaler monitors) and the idle actors take a share
that a bare engine alone in one process does not pay. `ActorSampler` measures that share for opd's actors during a
run; `Shares.window` the same for the bench's own process around a bare engine's timed work.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil

STAGE_TITLES = {
    "rollout": "ray::RolloutWorker.generate",
    "teacher scoring": "ray::TeacherWorker.score",
    "learner": "ray::LearnerShard.train_step",
}
"""Ray retitles an actor's process `ray::Class.method` while the method runs."""
RAY_SERVICES = ("gcs_server", "raylet", "ray::DashboardAgent", "dashboard", "log_monitor", "monitor.py", "runtime_env")
"""Words in the command line of Ray's own processes (not actors): GCS, raylet, agents, monitors."""
REST = ("driver", "other actors", "Ray services", "rest")
"""What `ActorSampler` splits the rest of the machine into; `rest` is every other process and the kernel."""


def part_of_rest(pid: int, title: str) -> str:
    """Which of `REST` a process other than the stage's belongs to."""
    if pid == os.getpid():
        return "driver"
    if any(word in title for word in RAY_SERVICES):
        return "Ray services"
    return "other actors" if title.startswith("ray::") else "rest"


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (every core, every process, the kernel)."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq


def processes() -> dict[int, tuple[float, str]]:
    """Every process's (CPU seconds so far, title); processes that vanish while read are left out."""
    out = {}
    for p in psutil.process_iter(["cmdline", "cpu_times"]):
        times, cmdline = p.info["cpu_times"], p.info["cmdline"]
        if times is not None:
            out[p.pid] = (times.user + times.system, " ".join(cmdline or []).strip())
    return out


class Shares:
    """Per stage: seconds measured, CPU seconds of the stage's own process(es), CPU seconds of everything else."""

    def __init__(self) -> None:
        self.totals: dict[str, list[float]] = {}

    def add(self, stage: str, seconds: float, own: float, machine: float) -> None:
        total = self.totals.setdefault(stage, [0.0, 0.0, 0.0])
        total[0] += seconds
        total[1] += own
        total[2] += max(0.0, machine - own)

    def cores(self, stage: str) -> tuple[float, float]:
        """(cores the stage's process used, cores the rest of the machine used) on average; NaN if never seen."""
        seconds, own, rest = self.totals.get(stage, (0.0, 0.0, 0.0))
        return (own / seconds, rest / seconds) if seconds else (float("nan"), float("nan"))

    @contextmanager
    def window(self, stage: str) -> Iterator[None]:
        """Credit the block to `stage`, with this process and its children as the stage's own."""

        def own() -> float:
            tree = [psutil.Process(), *psutil.Process().children(recursive=True)]
            return sum(t.user + t.system for t in (p.cpu_times() for p in tree))

        own0, busy0, t0 = own(), machine_busy_s(), time.perf_counter()
        yield
        self.add(stage, time.perf_counter() - t0, own() - own0, machine_busy_s() - busy0)


class ActorSampler(Shares):
    """Samples every process every `period` s in a thread; an interval in which one process carried a stage's
    title at both ends is credited to that stage (a context manager: it samples while the block runs). `parts`
    splits each stage's rest by `REST`, in CPU seconds: the driver (this process), the other actors, Ray's own
    services, and everything else."""

    def __init__(self, period: float = 0.5) -> None:
        super().__init__()
        self.parts: dict[str, dict[str, float]] = {}
        self.period = period
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ActorSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        before, busy, t = processes(), machine_busy_s(), time.perf_counter()
        while not self._done.wait(self.period):
            after, busy_now, now = processes(), machine_busy_s(), time.perf_counter()
            for pid, (cpu, title) in after.items():
                stage = next((s for s, name in STAGE_TITLES.items() if title == name), None)
                if stage is not None and pid in before and before[pid][1] == title:
                    self.add(stage, now - t, cpu - before[pid][0], busy_now - busy)
                    self._split(stage, pid, before, after, busy_now - busy)
            before, busy, t = after, busy_now, now

    def _split(self, stage: str, own: int, before: dict, after: dict, machine: float) -> None:
        parts = self.parts.setdefault(stage, dict.fromkeys(REST, 0.0))
        seen = after[own][0] - before[own][0]
        for pid, (cpu, title) in after.items():
            if pid != own and pid in before:
                used = max(0.0, cpu - before[pid][0])
                parts[part_of_rest(pid, title)] += used
                seen += used
        parts["rest"] += max(0.0, machine - seen)

    def rest_cores(self, stage: str) -> dict[str, float]:
        """`parts` of a stage as cores on average."""
        seconds = self.totals.get(stage, (0.0,))[0]
        return {k: v / seconds for k, v in self.parts.get(stage, {}).items()} if seconds else {}
