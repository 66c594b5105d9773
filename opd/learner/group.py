"""Spawn the learner's shards and address them as one."""

from __future__ import annotations

import ray

from opd import plan
from opd.buffer.sample import Sample, Samples
from opd.learner.shard import LearnerShard
from opd.partition import chunks


class LearnerDied(RuntimeError):
    """A learner shard's actor died: the step cannot complete; the run restarts from its last checkpoint."""


def _get(refs: list) -> list:
    """ray.get for learner calls: a dead shard becomes `LearnerDied` as soon as it is seen.

    Results are awaited one at a time because the surviving shards of a step block in a collective with
    the dead one; waiting for all of them would hang until the collective's timeout.
    """
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        try:
            ray.get(ready)
        except ray.exceptions.RayActorError as err:
            raise LearnerDied(f"a learner shard died ({type(err).__name__})") from err
    return ray.get(refs)


def mean_metrics(per_shard: list[dict[str, float]]) -> dict[str, float]:
    keys = per_shard[0].keys()
    return {k: sum(m[k] for m in per_shard) / len(per_shard) for k in keys}


class LearnerGroup:
    """`learner.num_shards` DeepSpeed ranks: rank 0 first (it picks the rendezvous), then the rest."""

    def __init__(
        self,
        model: str,
        cfg,
        loss_cfg,
        temperature: float,
        samples_per_step: int,
        sft_weight: float,
        max_nonfinite_steps: int,
        group,
    ) -> None:
        actor = ray.remote(num_cpus=cfg.cpus_per_shard, num_gpus=cfg.gpus_per_shard)(LearnerShard)
        n = cfg.num_shards
        self.shards = [
            actor.options(**plan.slot(group, rank)).remote(
                rank, n, model, cfg, loss_cfg, temperature, sft_weight, max_nonfinite_steps
            )
            for rank in range(n)
        ]
        address, port = ray.get(self.shards[0].rendezvous.remote())
        ray.get([s.setup.remote(address, port, samples_per_step // n) for s in self.shards])

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
        results = _get(refs)
        return [mean_metrics(results[i * n : (i + 1) * n]) for i in range(len(mini_batches))]

    def connect_rollout(self, rollout_handles: list, ranks_per_engine: int, backend: str) -> None:
        """Form the weight-transfer group: learner rank 0 plus every rank of every rollout engine."""
        address, port = ray.get(self.shards[0].rendezvous.remote())
        world = 1 + ranks_per_engine * len(rollout_handles)
        ray.get([s.init_weight_transfer.remote(address, port, world, rollout_handles, backend) for s in self.shards])

    def send_weights(self) -> dict[str, float]:
        return _get([s.send_weights.remote() for s in self.shards])[0]

    def save_state(self, path: str) -> None:
        _get([s.save_state.remote(path) for s in self.shards])

    def load_state(self, path: str) -> int:
        return _get([s.load_state.remote(path) for s in self.shards])[0]

    def save(self, path: str) -> None:
        ray.get([s.save.remote(path) for s in self.shards])
