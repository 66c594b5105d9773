"""Spawn the learner's shards and address them as one."""

from __future__ import annotations

import time

import ray

from opd import plan
from opd.buffer.sample import Sample, Samples
from opd.partition import chunks


class LearnerDied(RuntimeError):
    """A learner shard's actor died: the step cannot complete; the run restarts from its last checkpoint."""


class WeightSendTimeout(TimeoutError):
    """A weight sync outlived its deadline and its transfer group was aborted (NCCL has no timeout of its own):
    the rollout workers are stuck in the receive, so the rollout group is replaced and the transfer group formed
    again, as for a dead worker (`RolloutGroup.sync_weights`)."""


PING_TIMEOUT_S = 30.0
"""How long `any_dead` waits for the shards' answers: a dead shard's ping fails within seconds (once Ray has seen
the process go); a live one may be busy for longer, still working through the call's queued steps."""


def any_dead(probes: list, timeout_s: float) -> bool:
    """Whether any actor behind `probes` (one cheap call per shard) has died: its call fails with RayActorError.

    A live shard answers, or is still busy when `timeout_s` is up (perhaps blocked in a collective with the dead
    one) and counts as alive; a dead one's failure is looked for as soon as each answer arrives.
    """
    deadline = time.monotonic() + timeout_s
    pending = list(probes)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            return False
        try:
            ray.get(ready)
        except ray.exceptions.RayActorError:
            return True
    return False


def gather(refs: list, shards: list) -> list:
    """ray.get for a call to every shard in `shards`: a step in which a shard died raises `LearnerDied`.

    Results are awaited one at a time because the surviving shards of a step block in a collective with
    the dead one; waiting for all of them would hang until the collective's timeout. The first failure may
    be a survivor's (its collective's peer is gone: e.g. gloo's "Connection reset by peer") rather than the
    dead shard's, so any other error is raised as itself only once every shard is seen alive.

    A RayTaskError was raised by the shard's own code, so the shard lived, even when it is a RayActorError too (Ray
    makes it one when its cause is): mid weight sync, a rollout worker that rank 0 sent to died, which the rollout
    group replaces (`RolloutGroup.sync_weights`) without a learner restart.
    """
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        try:
            ray.get(ready)
        except Exception as err:
            if isinstance(err, ray.exceptions.RayActorError) and not isinstance(err, ray.exceptions.RayTaskError):
                raise LearnerDied(f"a learner shard died ({type(err).__name__})") from err
            if any_dead([s.__ray_ready__.remote() for s in shards], PING_TIMEOUT_S):
                raise LearnerDied(f"a learner shard died ({type(err).__name__} on a survivor first)") from err
            raise
    return ray.get(refs)


def mean_metrics(parts: list[dict[str, float]]) -> dict[str, float]:
    """Each metric's mean over the parts (shards, mini-batches) that report it: a part with no corrected sample
    reports no correction loss, which became rare late in a run with corrections and made this a KeyError."""
    values: dict[str, list[float]] = {}
    for m in parts:
        for k, v in m.items():
            values.setdefault(k, []).append(v)
    return {k: sum(v) / len(v) for k, v in values.items()}


class LearnerGroup:
    """`learner.num_shards` DeepSpeed ranks: rank 0 first (it picks the rendezvous), then the rest."""

    def __init__(
        self,
        model: str,
        cfg,
        loss_cfg,
        temperature: float,
        samples_per_step: int,
        total_steps: int,
        sft_weight: float,
        max_nonfinite_steps: int,
        group,
        colocate: bool = False,
    ) -> None:
        """`total_steps`: the run's optimizer steps, which the lr schedule spans; `colocate`: each shard shares its
        GPU with a sleeping rollout engine (see `LearnerShard`)."""
        from opd.learner.shard import LearnerShard  # here, not at the top: it imports torch, DeepSpeed's and vLLM's
        # weight-transfer code, which only the shards need (seconds of every driver's start-up)

        actor = ray.remote(num_cpus=cfg.cpus_per_shard, num_gpus=cfg.gpus_per_shard)(LearnerShard)
        n = cfg.num_shards
        self.shards = [
            actor.options(**plan.slot(group, rank)).remote(
                rank, n, model, cfg, loss_cfg, temperature, sft_weight, max_nonfinite_steps, colocate
            )
            for rank in range(n)
        ]
        address, port = self.rendezvous()
        self.on_all("setup", address, port, samples_per_step // n, total_steps)
        self.step = 0
        """The shards' step (the policy version), counted here: every `train_step` is one."""

    def on_all(self, method: str, *args) -> list:
        """`method(*args)` called on every shard; their results in rank order (see `gather`)."""
        return gather([getattr(s, method).remote(*args) for s in self.shards], self.shards)

    def rendezvous(self) -> tuple[str, int]:
        return gather([self.shards[0].rendezvous.remote()], self.shards)[0]

    def train(self, mini_batches: list[list[Sample]]) -> list[dict[str, float]]:
        """One optimizer step per mini-batch, each split evenly across shards; the metrics of each step.

        Every step is queued at once (an actor runs its calls in order), so a shard starts the next step as soon
        as it finishes one instead of waiting for the driver to see the result and send the next slice.
        """
        n = len(self.shards)
        refs = [
            s.train_step.remote(Samples(p))
            for mb in mini_batches
            for s, p in zip(self.shards, chunks(mb, n), strict=True)
        ]
        results = gather(refs, self.shards)
        self.step += len(mini_batches)
        return [mean_metrics(results[i * n : (i + 1) * n]) for i in range(len(mini_batches))]

    def connect_rollout(self, rollout_handles: list, ranks_per_engine: int, backend: str) -> None:
        """Form the weight-transfer group: learner rank 0 plus every rank of every rollout engine."""
        address, port = self.rendezvous()
        world = 1 + ranks_per_engine * len(rollout_handles)
        self.on_all("init_weight_transfer", address, port, world, rollout_handles, backend)

    def send_weights(self) -> dict[str, float]:
        return self.on_all("send_weights")[0]

    def save_state(self, path: str) -> None:
        self.on_all("save_state", path)

    def load_state(self, path: str) -> int:
        self.step = self.on_all("load_state", path)[0]
        return self.step

    def save(self, path: str) -> None:
        self.on_all("save", path)
