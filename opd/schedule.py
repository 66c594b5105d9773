"""When each round is generated and scored: in turn (`pipeline.mode=sync`) or ahead of learning (`async`).

The controller asks a schedule for round r's scored samples (`take`), learns on them, lets the schedule
finish what is in flight on the old weights (`before_sync`), syncs, and tells it (`after_sync`), which is
when async starts the next generation. What is in flight travels with a checkpoint (`save` / `restore`),
so a resumed run trains on exactly what an uninterrupted one would.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import ray

from opd.buffer import spill
from opd.data import Encoded
from opd.rollout.group import Launch
from opd.teachers.feedback import ScoredRound

AHEAD = "ahead.safetensors"
"""In an async checkpoint: the next round's samples, generated and scored before the checkpoint."""
GENERATED = "generated.safetensors"
"""In an async checkpoint: the samples of the rounds after the next, generated before the checkpoint."""

Produce = Callable[[int], Launch]
"""Launch the next round's generation with the weights the workers hold now; the argument sets apart the
extra rounds async launches before the first sync (see `Controller.launch_round`)."""
Score = Callable[[list, int], ScoredRound]
"""The teachers' feedback on a round's samples, seeded."""


@dataclass
class Ready:
    """A round's scored samples as the learner gets them, and how long the driver waited for them."""

    scored: ScoredRound
    generate_s: float
    """The busiest rollout worker's engine seconds for this round (0 for teacher-written rounds)."""
    generate_wait_s: float
    score_wait_s: float


def finished(value) -> Future:
    """A future that is already done: feedback computed in turn, or restored from a checkpoint."""
    out: Future = Future()
    out.set_result(value)
    return out


@dataclass
class InFlight:
    """An async round between its launch and the learner: its generation and the teachers' feedback on it."""

    launch: Launch
    feedback: Future | None = None
    generated: threading.Event = field(default_factory=threading.Event)
    """Set by the feedback thread once it has the samples (or found a rollout worker dead)."""


class SyncSchedule:
    """Generate, score, learn and sync in turn."""

    def __init__(self, produce: Produce, rollout, feedback: Score, seed: int) -> None:
        """`rollout`: the `RolloutGroup` (its `collect` restarts dead workers); `seed` seeds round r's feedback
        with seed + r."""
        self.produce, self.rollout, self.feedback, self.seed = produce, rollout, feedback, seed

    def take(self, r: int) -> Ready:
        t0 = time.perf_counter()
        launch = self.produce(0)
        samples = self.rollout.collect(launch)
        t1 = time.perf_counter()
        scored = self.feedback(samples, self.seed + r)
        return Ready(scored, launch.busy_s, t1 - t0, time.perf_counter() - t1)

    def before_sync(self, r: int) -> float:
        """Wait until generation in flight is done with the old weights; returns the seconds waited."""
        return 0.0

    def after_sync(self, r: int) -> None:
        """The workers hold round r's weights."""

    def save(self, folder: Path) -> dict:
        """What is in flight, into `folder` (files) and the returned state (JSON)."""
        return {}

    def restore(self, folder: Path, state: dict, by_index: dict[int, Encoded]) -> None:
        """Put back what `save` wrote."""

    def close(self) -> None:
        pass


class AsyncSchedule(SyncSchedule):
    """While round r learns, round r+1 is scored on a thread as soon as it is generated, and once round r's
    weights are synced round r+1+d starts generating (d = `pipeline.depth`), so samples are trained on d rounds
    (d x learner.mini_batches versions) after they were generated. With d = 1 round r+1 generates during round
    r; with d = 2 it was generated during round r-1, so generating, scoring and learning each have a round of
    their own.
    """

    def __init__(self, produce: Produce, rollout, feedback: Score, seed: int, depth: int, rounds: int) -> None:
        super().__init__(produce, rollout, feedback, seed)
        self.depth, self.rounds = depth, rounds
        self.ahead: InFlight | None = None
        """The next round, generated and being scored on the feedback thread while this round learns."""
        self.generating: list[InFlight] = []
        """The `depth` rounds after the next, oldest first; the newest generates with the weights of this
        round's sync, the others are generated and wait for the feedback thread."""
        self.background = ThreadPoolExecutor(1, thread_name_prefix="opd-feedback")

    def take(self, r: int) -> Ready:
        t0 = time.perf_counter()
        if self.ahead is None:  # the first round: nothing was generated or scored before it
            launch = self.produce(0)
            self.ahead = InFlight(launch, finished(self.feedback(self.rollout.collect(launch), self.seed + r)))
            self.generating = [InFlight(self.produce(k)) for k in range(min(self.depth, self.rounds - r))]
        current = self.ahead
        self.ahead = self.generating.pop(0) if self.generating else None
        if self.ahead is not None:
            self.ahead.feedback = self.background.submit(self.feedback_when_generated, self.ahead, self.seed + r + 1)
        t1 = time.perf_counter()
        scored = current.feedback.result()
        return Ready(scored, current.launch.busy_s, t1 - t0, time.perf_counter() - t1)

    def feedback_when_generated(self, pending: InFlight, seed: int) -> ScoredRound | None:
        """On the feedback thread: the teachers' feedback on `pending` once it is generated.

        A dead rollout worker is left to the controller's thread (None): replacing it re-sends the learner's
        weights, which must not happen in the middle of the learner's step.
        """
        try:
            samples = self.rollout.collect(pending.launch, restart=False)
        except ray.exceptions.RayActorError:
            return None
        finally:
            pending.generated.set()
        return self.feedback(samples, seed)

    def before_sync(self, r: int) -> float:
        if self.ahead is None:
            return 0.0
        t0 = time.perf_counter()
        self.ahead.generated.wait()
        if self.ahead.launch.samples is None:  # a worker died: replace it now the learner is free, score here
            self.ahead.feedback = finished(self.feedback(self.rollout.collect(self.ahead.launch), self.seed + r + 1))
        for pending in self.generating:  # depth > 1: the rounds after it, generated while this one learned
            self.rollout.collect(pending.launch)
        return time.perf_counter() - t0

    def after_sync(self, r: int) -> None:
        if r + 1 + self.depth <= self.rounds:
            self.generating.append(InFlight(self.produce(0)))

    def save(self, folder: Path) -> dict:
        state: dict = {}
        if self.ahead is not None:
            scored = self.ahead.feedback.result()
            state["ahead"] = {"generate_s": self.ahead.launch.busy_s, "feedback": scored.to_state()}
            spill.save(scored.samples, folder / AHEAD)
        if self.generating:
            state["generated"] = [[e.prompt.index for e in p.launch.prompts] for p in self.generating]
            spill.save([s for p in self.generating for s in self.rollout.collect(p.launch)], folder / GENERATED)
        return state

    def restore(self, folder: Path, state: dict, by_index: dict[int, Encoded]) -> None:
        if "ahead" in state:
            scored = ScoredRound.from_state(spill.load(folder / AHEAD), state["ahead"]["feedback"])
            self.ahead = InFlight(Launch.done([], scored.samples, state["ahead"]["generate_s"]), finished(scored))
        if "generated" in state:
            samples = spill.load(folder / GENERATED)  # every round's, in order, the same number per prompt
            per_prompt = len(samples) // sum(len(indices) for indices in state["generated"])
            for indices in state["generated"]:  # one list of prompt indices per round
                k = per_prompt * len(indices)
                self.generating.append(InFlight(Launch.done([by_index[i] for i in indices], samples[:k])))
                samples = samples[k:]

    def close(self) -> None:
        self.background.shutdown()
