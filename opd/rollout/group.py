"""The rollout workers as one group: spawn, launch, collect (with restart and re-issue), replace, weight sync.

The weight-transfer group spans the learner's rank 0 and every rollout engine, so one dead worker, found while
generating or while syncing, means the whole group is replaced, reconnected to the learner and sent its weights
before any request is re-issued.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray

from opd import plan
from opd.buffer.sample import Sample
from opd.data import Encoded
from opd.learner.group import PING_TIMEOUT_S, WeightSendTimeout, any_dead
from opd.partition import chunks
from opd.rollout.worker import RolloutWorker


@dataclass
class Launch:
    """A generation in flight (`refs`) or done (`samples`) on the rollout group."""

    prompts: list[Encoded]
    args: tuple
    """(n, temperature, seed, top_p) of the launch, to re-issue it after a worker died."""
    refs: list
    samples: list[Sample] | None = None
    busy_s: float = 0.0
    """The busiest worker's engine seconds (the pipeline's stage timing)."""
    group: int = 0
    """`RolloutGroup.restarts` when launched: a failure of a group already replaced needs a re-launch, not
    another replacement."""

    @classmethod
    def done(cls, prompts: list[Encoded], samples: list[Sample], busy_s: float = 0.0) -> Launch:
        """Samples that need no generating (written by the teacher, or restored from a checkpoint)."""
        return cls(prompts, (), [], samples, busy_s)


class RolloutGroup:
    """`rollout.num_workers` vLLM engines with the student, addressed as one."""

    def __init__(self, cfg, student: str, backend: str, placement) -> None:
        """`cfg`: the whole OPDConfig (rollout settings, seed, faults); `backend`: the weight transport."""
        self.cfg, self.student, self.backend, self.placement = cfg, student, backend, placement
        self.restarts = 0
        self.learner = None
        self.pushed: dict[str, float] | None = None
        """The last push's figures (its `version` is the learner step the workers hold)."""
        self.workers = self.spawn()

    def spawn(self) -> list:
        rollout = self.cfg.rollout
        worker = ray.remote(num_cpus=rollout.cpus_per_worker, num_gpus=rollout.gpus_per_worker)(RolloutWorker)
        return [
            worker.options(**plan.slot(self.placement, i)).remote(
                self.student, rollout.engine, self.backend, self.cfg.seed + i, rollout.colocate
            )
            for i in range(rollout.num_workers)
        ]

    def ready(self, timeout: float | None = None) -> None:
        ray.get([w.ready.remote() for w in self.workers], timeout=timeout)

    def connect(self, learner) -> None:
        """Form the weight-transfer group with the learner (`LearnerGroup`), which pushes every sync."""
        self.learner = learner
        learner.connect_rollout(self.workers, self.cfg.rollout.engine.tensor_parallel_size, self.backend)

    def sync_weights(self) -> dict[str, float]:
        """The learner's weights on every worker; the figures of the push that put them there.

        A worker found dead first (a broadcast to a dead peer would hang until the collective times out), or
        by a push that failed, has the group replaced, and the replacement's push is the sync; so has a push that
        outlived its deadline (`WeightSendTimeout`: the transfer group was aborted with the workers stuck in the
        receive). Workers that hold the learner's step already (async replaces a group after the learner's step,
        in `before_sync`) are sent nothing again.
        """
        try:
            self.ready(timeout=120)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return self.replace()
        if self.pushed is not None and self.pushed["version"] == self.learner.step:
            return self.pushed
        try:
            return self.push()
        except ray.exceptions.RayTaskError as err:  # the learner's send failed, the learner alive (else LearnerDied)
            if isinstance(err.cause, WeightSendTimeout):
                return self.replace(f"{err.cause}")
            if not any_dead([w.ready.remote() for w in self.workers], PING_TIMEOUT_S):
                raise
        return self.replace()

    def push(self) -> dict[str, float]:
        """`learner.send_weights`, remembered: a sync with nothing learned since sends nothing."""
        self.pushed = self.learner.send_weights()
        return self.pushed

    def replace(self, why: str = "a rollout worker died") -> dict[str, float]:
        """Replace every worker after one died (or a sync stuck), reconnect the learner and push its current
        weights (in async the learner has stepped since the last sync: the workers take up its version); the
        push's figures."""
        self.restarts += 1
        print(f"WARNING: {why}; restarting the rollout group (restart {self.restarts})", flush=True)
        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers = self.spawn()
        self.ready()
        self.connect(self.learner)
        return self.push()

    def sleep(self) -> None:
        """Colocated: hand the shared GPUs to the learner."""
        ray.get([w.sleep.remote() for w in self.workers])

    def wake_up(self) -> None:
        ray.get([w.wake_up.remote() for w in self.workers])

    def launch(
        self, prompts: list[Encoded], n: int, temperature: float, seed: int | None, top_p: float = 1.0
    ) -> Launch:
        """Start generating, prompts spread evenly over the workers; `collect` waits for it."""
        parts = chunks(prompts, len(self.workers))
        refs = []
        for i, (w, part) in enumerate(zip(self.workers, parts, strict=True)):
            if not part:
                continue
            meta = [{"prompt_index": e.prompt.index, "answer": e.prompt.answer, "teacher": e.teacher} for e in part]
            # Non-negative: vLLM treats a negative seed as "unseeded", which made eval samples (seed -1) random.
            s = None if seed is None else (self.cfg.seed * 1_000_003 + seed * len(self.workers) + i) % 2**31
            max_tokens = self.cfg.rollout.max_new_tokens
            refs.append(w.generate.remote([e.ids for e in part], meta, n, max_tokens, temperature, s, top_p))
        return Launch(prompts, (n, temperature, seed, top_p), refs, group=self.restarts)

    def collect(self, launch: Launch, restart: bool = True) -> list[Sample]:
        """The samples of a launch (its busiest worker's seconds land in `launch.busy_s`). A dead worker is
        replaced and the request re-issued (same seeds, so the same samples), unless `restart` is off: then the
        error is raised (the async feedback thread hands it back to the controller).

        In async with `pipeline.depth` > 1 several launches were in flight on the group that lost the worker;
        the first to fail replaces the group, the others are only re-issued on the new one.
        """
        failures = 0
        while launch.samples is None:
            try:
                parts = ray.get(launch.refs)
                launch.busy_s = max((busy for _, busy in parts), default=0.0)
                launch.samples = [s for part, _ in parts for s in part]
            except ray.exceptions.RayActorError:
                if not restart:
                    raise
                if launch.group == self.restarts:
                    failures += 1
                    if failures > self.cfg.faults.max_restarts:
                        raise
                    self.replace()
                again = self.launch(launch.prompts, *launch.args)
                launch.refs, launch.group = again.refs, again.group
        return launch.samples

    def generate(
        self, prompts: list[Encoded], n: int, temperature: float, seed: int | None, top_p: float = 1.0
    ) -> list[Sample]:
        return self.collect(self.launch(prompts, n, temperature, seed, top_p))
