"""A seeded schedule of faults injected into the built-in demo; each run compared with the same run left alone.

    python bench/chaos.py                          # seed 0, 10 rounds: about 9 minutes on 2 cores
    python bench/chaos.py seed=3 rounds=12 out=outputs/bench/chaos3
    python bench/chaos.py learner.lr=1e-3          # any other key=value overrides every run

Two runs of the demo (conf/default.yaml cut to `rounds` rounds, a checkpoint every round), each once left alone and
once under faults; the seed picks the round of each fault and which process it hits:

    in-process  the teacher in a vLLM actor: a rollout worker killed, a teacher replica killed, a teacher replica
                hung (SIGSTOP), a learner shard killed, the replay-buffer shard killed, and the whole run killed
                (SIGKILL of its process group: driver, Ray, every actor) while it writes a checkpoint, then resumed
                with `resume=auto` as a user would
    served      the teacher behind a vLLM OpenAI server on 127.0.0.1, reached through a proxy run here: the proxy
                answers 429 for a while, and the server is killed and started again (the proxy answers 503 while
                it is down, as a load balancer would)

A fault is recovered when what it hit came back (a new process in the actor's place, the run resumed, the server
answering again) and the run then finished every round. Prints a line per fault, then

    chaos  faults injected <K>  recovered <K>  runs finished <n>/<n>  samples lost 0  final weights match: yes

samples lost: over every round, the samples the run left alone trained on that the faulted one did not; weights:
the two final students' largest difference, a match at most 1e-6 (float rounding). Writes <out>/chaos.json.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.chaos_served import Proxy, Server  # noqa: E402
from tests.stack import killed_while_saving, session_pids, start, stopped_after, summary_of  # noqa: E402

OWN = ("seed=", "rounds=", "out=")
"""The bench's own arguments; every other `key=value` is a config override."""

ACTOR_FAULTS: dict[str, tuple[str, signal.Signals]] = {
    "rollout worker killed": ("ray::RolloutWorker", signal.SIGKILL),
    "teacher replica killed": ("ray::TeacherWorker", signal.SIGKILL),
    "teacher replica hung": ("ray::TeacherWorker", signal.SIGSTOP),
    "learner shard killed": ("ray::LearnerShard", signal.SIGKILL),
    "buffer shard killed": ("ray::ReplayBuffer", signal.SIGKILL),
}
"""What each in-process fault hits (a process title in the run's session) and with which signal."""

KILLED_SAVING = "run killed while checkpointing"
THROTTLED, RESTARTED = "server answers 429 for 20 s", "server killed and restarted"
THROTTLE_S = 20.0
MATCH = 1e-6
"""Largest weight difference that counts as the same student (float rounding)."""


@dataclass
class Fault:
    kind: str
    round: int
    """Injected once this round's checkpoint is saved (KILLED_SAVING: while it is being written)."""
    pick: int
    """Which of the processes it may hit (modulo their count)."""
    injected: bool = False
    came_back: bool = False
    note: str = ""


def schedule(kinds: list[str], rounds: int, rng: random.Random) -> list[Fault]:
    """One fault of each kind, in the seed's order, at distinct rounds in 2..rounds-1: every fault comes after a
    checkpoint (the run-wide kill resumes from one rather than starting over) and before the last round."""
    if rounds - 2 < len(kinds):
        raise SystemExit(f"rounds={rounds}: {len(kinds)} faults need at least {len(kinds) + 2} rounds")
    order, at = rng.sample(kinds, len(kinds)), sorted(rng.sample(range(2, rounds), len(kinds)))
    return [Fault(kind, r, rng.randrange(8)) for kind, r in zip(order, at, strict=True)]


def demo_args(out: Path, rounds: int, overrides: list[str]) -> list[str]:
    return [
        f"rounds={rounds}",
        "checkpoint.every=1",
        f"eval.every={rounds}",
        "faults.learner_resumes=2",  # a learner shard and a buffer shard each restart the run once
        f"output_dir={out}",
        *overrides,
    ]


def left_alone(args: list[str], out: Path) -> dict:
    """launch.py to the end, its output in <out>.log; the run's summary."""
    log = out.parent / f"{out.name}.log"
    with open(log, "w") as f:
        proc = start(args, stdout=f, stderr=subprocess.STDOUT)
        rc = proc.wait(timeout=3600)
    if rc != 0:
        raise SystemExit(f"the run left alone failed ({rc}): {log}\n{log.read_text()[-3000:]}")
    return summary_of(log.read_text())


def replaced(sid: int, title: str, before: set[int], timeout: float = 600) -> float | None:
    """Seconds until a process titled `title` that was not in `before` runs in session `sid`; None if none did."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if set(session_pids(sid, title)) - before:
            return time.time() - t0
        try:
            os.kill(sid, 0)
        except ProcessLookupError:
            return None
        time.sleep(0.2)
    return None


def hit_actor(fault: Fault, sid: int) -> None:
    """Send the fault's signal to one of its processes, let the driver go on, and wait for a new one."""
    title, sig = ACTOR_FAULTS[fault.kind]
    pids = session_pids(sid, title)
    victim = pids[fault.pick % len(pids)]
    os.kill(victim, sig)
    fault.injected = True
    os.kill(sid, signal.SIGCONT)
    took = replaced(sid, title, set(pids))
    fault.came_back = took is not None
    fault.note = f"pid {victim}; " + (f"a new {title} after {took:.0f} s" if took is not None else "none came back")


def under_faults(args: list[str], out: Path, faults: list[Fault], hit: Callable[[Fault, int], None]) -> dict | None:
    """launch.py with `faults` injected in turn (`hit` for those at a saved round); its summary, None if it failed.
    A run killed while checkpointing is started again with resume=auto, its output appended to the same log."""
    log = out.parent / f"{out.name}.log"
    with open(log, "w") as f:
        proc = start(args, stdout=f, stderr=subprocess.STDOUT)
        for fault in faults:
            print(f"  round {fault.round:2d}  {fault.kind} ...", end=" ", flush=True)
            if fault.kind == KILLED_SAVING:
                tmp = killed_while_saving(proc, out, fault.round, timeout=1800)
                fault.injected = True
                fault.note = f"killed while {tmp.name} was being written; resumed with resume=auto"
                proc = start([*args, "resume=auto"], stdout=f, stderr=subprocess.STDOUT)
            else:
                stopped_after(proc, out, fault.round)
                try:
                    hit(fault, proc.pid)
                finally:
                    os.kill(proc.pid, signal.SIGCONT)
            print(fault.note, flush=True)
        rc = proc.wait(timeout=3600)
    text = log.read_text()
    if KILLED_SAVING in [f.kind for f in faults]:
        (fault,) = [f for f in faults if f.kind == KILLED_SAVING]
        fault.came_back = "resumed from" in text
    if rc != 0:
        print(f"the run under faults failed ({rc}): {log}\n{text[-3000:]}", flush=True)
        return None
    return summary_of(text)


def trained(summary: dict) -> dict[int, float]:
    """Samples each round trained on (counted by the policy lag they were used at)."""
    rows = [r for r in summary["rounds"] if r["round"] >= 1]
    return {r["round"]: sum(v for k, v in r.items() if k.startswith("buffer/used_at_lag_")) for r in rows}


def weight_gap(a: dict, b: dict) -> float:
    """Largest difference between the two runs' final students."""
    from safetensors.torch import load_file

    wa, wb = (load_file(str(Path(s["final"]["student_path"]) / "model.safetensors")) for s in (a, b))
    if wa.keys() != wb.keys():
        return float("inf")
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def compare(name: str, alone: dict, faulted: dict | None, faults: list[Fault]) -> dict:
    """What one pair of runs gives the summary line."""
    finished = faulted is not None and [r["round"] for r in faulted["rounds"]] == [r["round"] for r in alone["rounds"]]
    want, got = trained(alone), trained(faulted) if faulted else {}
    lost = sum(max(0.0, n - got.get(r, 0.0)) for r, n in want.items())
    gap = weight_gap(alone, faulted) if finished else float("inf")
    for f in faults:
        f.came_back = f.came_back and finished
    return {
        "run": name,
        "finished": finished,
        "samples_lost": lost,
        "weight_gap": gap,
        "student_accuracy": [
            alone["final"]["student_accuracy_after"],
            (faulted or {}).get("final", {}).get("student_accuracy_after"),
        ],
        "faults": [asdict(f) for f in faults],
    }


def in_process(out: Path, rounds: int, rng: random.Random, overrides: list[str]) -> dict:
    faults = schedule([*ACTOR_FAULTS, KILLED_SAVING], rounds, rng)
    extra = ["faults.teacher_timeout_s=10", *overrides]  # a demo teacher call takes well under a second
    print("in-process teacher: the run left alone", flush=True)
    alone = left_alone(demo_args(out / "alone", rounds, extra), out / "alone")
    print("in-process teacher: the run under faults", flush=True)
    faulted = under_faults(demo_args(out / "faulted", rounds, extra), out / "faulted", faults, hit_actor)
    return compare("in-process", alone, faulted, faults)


def served(out: Path, rounds: int, rng: random.Random, overrides: list[str]) -> dict:
    from opd.assets import ensure_builtin

    faults = schedule([THROTTLED, RESTARTED], rounds, rng)
    model = ensure_builtin("addition-teacher", ROOT / "outputs" / "cache")
    with Server(model, out / "server.log") as server, Proxy(server) as proxy:
        extra = [
            "teachers.0.backend=openai",
            f"teachers.0.model={model}",
            f"teachers.0.url={proxy.url}",
            "teachers.0.license=apache-2.0",
            "faults.teacher_timeout_s=300",  # the restarted server loads its model inside one call's deadline
            *overrides,
        ]

        def hit(fault: Fault, sid: int) -> None:
            if fault.kind == THROTTLED:
                proxy.throttle(THROTTLE_S)
                fault.injected = True
                os.kill(sid, signal.SIGCONT)
                fault.came_back = proxy.wait_answered(after=time.time() + THROTTLE_S)
                fault.note = f"{proxy.refused[429]} requests answered 429, then served again"
            else:
                server.stop()
                fault.injected = True
                os.kill(sid, signal.SIGCONT)
                time.sleep(5)  # the run meets the outage before the server starts loading again
                took = server.start()
                fault.came_back = proxy.wait_answered(after=time.time())
                fault.note = f"down for {took + 5:.0f} s, {proxy.refused[503]} requests answered 503 meanwhile"

        print("served teacher: the run left alone", flush=True)
        alone = left_alone(demo_args(out / "served_alone", rounds, extra), out / "served_alone")
        print("served teacher: the run under faults", flush=True)
        faulted = under_faults(demo_args(out / "served_faulted", rounds, extra), out / "served_faulted", faults, hit)
    return compare("served", alone, faulted, faults)


def main(argv: list[str]) -> None:
    own = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in argv if a.startswith(OWN)}
    overrides = [a for a in argv if not a.startswith(OWN)]
    seed, rounds = int(own.get("seed", 0)), int(own.get("rounds", 10))
    out = Path(own.get("out", "outputs/bench/chaos")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    t0 = time.time()
    runs = [in_process(out, rounds, rng, overrides), served(out, rounds, rng, overrides)]
    faults = [f for run in runs for f in run["faults"]]
    gap = max(run["weight_gap"] for run in runs)
    for run in runs:
        print(f"{run['run']:>10}: finished {run['finished']}  samples lost {run['samples_lost']:g}  weight gap "
              f"{run['weight_gap']:.2e}  student accuracy alone/faulted {run['student_accuracy']}")  # fmt: skip
    line = (
        f"chaos  faults injected {sum(f['injected'] for f in faults)}  recovered {sum(f['came_back'] for f in faults)}"
        f"  runs finished {sum(r['finished'] for r in runs)}/{len(runs)}"
        f"  samples lost {sum(r['samples_lost'] for r in runs):g}"
        f"  final weights match: {'yes' if gap <= MATCH else f'no (largest difference {gap:.2e})'}"
    )
    result = {"seed": seed, "rounds": rounds, "overrides": overrides, "minutes": (time.time() - t0) / 60, "runs": runs}
    (out / "chaos.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"{(time.time() - t0) / 60:.1f} min; {out / 'chaos.json'}")
    print(line)


if __name__ == "__main__":
    main(sys.argv[1:])
