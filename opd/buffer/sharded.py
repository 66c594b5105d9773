"""The replay buffer as `buffer.num_shards` Ray actors: samples placed by a hash of their prompt, drawn from all.

Shards hold the samples off the driver and write their own checkpoint files in parallel, so neither the
buffer's memory nor its checkpoint I/O goes through one process. With one shard this is the plain buffer.
A shard that dies takes its samples with it: the call raises `BufferDied`, and the run restarts from its last
checkpoint (launch.py), which holds every shard's samples.
"""

from __future__ import annotations

from pathlib import Path

import ray

from opd.buffer.replay import ReplayBuffer
from opd.buffer.sample import Sample, Samples


class BufferDied(RuntimeError):
    """A replay-buffer shard's actor died, and the samples it held with it: the run restarts from its last
    checkpoint, as for a dead learner shard."""


def gather(refs: list) -> list:
    """ray.get for calls to the shards: one on a shard that died raises `BufferDied`."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayActorError as err:
        raise BufferDied(f"a replay-buffer shard died ({type(err).__name__})") from err


def shard_of(prompt_index: int, num_shards: int) -> int:
    """A prompt's shard: a multiplicative hash, so consecutive prompts spread out and a prompt's samples stay
    together (the same prompt always lands on the same shard, run after run)."""
    return (prompt_index * 2654435761) % 2**32 % num_shards


def quotas(n: int, sizes: list[int]) -> list[int]:
    """How many of n samples to draw from each shard: proportional to the shards' fill (largest remainder),
    never more than a shard holds."""
    total = sum(sizes)
    if total <= n:
        return list(sizes)
    exact = [n * s / total for s in sizes]
    out = [int(x) for x in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: out[i] - exact[i])
    for i in by_remainder[: n - sum(out)]:
        out[i] += 1
    return out


def merge_stats(per_shard: list[dict[str, float]]) -> dict[str, float]:
    """One set of buffer metrics from every shard's `take`: counts add up, staleness is a mean over taken."""
    keys = {k for stats in per_shard for k in stats}
    total = {k: sum(stats.get(k, 0.0) for stats in per_shard) for k in keys}
    taken = total.pop("taken")
    total["mean_staleness"] = total.pop("staleness_sum") / taken if taken else 0.0
    return total


class ShardedBuffer:
    """Driver-side handle on the shard actors; same calls as one `ReplayBuffer`, plus `save`/`load` to a folder."""

    def __init__(self, num_shards: int, capacity: int, max_staleness: int, order: str) -> None:
        per_shard = -(-capacity // num_shards)
        actor = ray.remote(num_cpus=0)(ReplayBuffer)
        self.shards = [actor.remote(per_shard, max_staleness, order) for _ in range(num_shards)]

    def add(self, samples: list[Sample]) -> None:
        parts: list[list[Sample]] = [[] for _ in self.shards]
        for s in samples:
            parts[shard_of(s.prompt_index, len(self.shards))].append(s)
        gather([shard.add.remote(Samples(p)) for shard, p in zip(self.shards, parts, strict=True) if p])

    def take(self, n: int, version: int) -> tuple[list[Sample], dict[str, float]]:
        """Up to n samples for a learner at `version`, drawn from the shards in proportion to their fill."""
        sizes = gather([shard.size.remote() for shard in self.shards])
        draws = zip(self.shards, quotas(n, sizes), strict=True)
        results = gather([shard.take.remote(q, version) for shard, q in draws])
        batch = [s for samples, _ in results for s in samples]
        return batch, merge_stats([stats for _, stats in results])

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        gather([shard.save.remote(str(folder / f"shard_{i:03d}.safetensors")) for i, shard in enumerate(self.shards)])

    def load(self, folder: Path) -> int:
        """Refill the shards from `save`'s files; the shard count must be the one the checkpoint was made with."""
        files = sorted(folder.glob("shard_*.safetensors"))
        if len(files) != len(self.shards):
            raise ValueError(
                f"{folder} holds {len(files)} buffer shards but buffer.num_shards={len(self.shards)}: "
                "resume with the shard count the run was started with"
            )
        return sum(gather([shard.load.remote(str(f)) for shard, f in zip(self.shards, files, strict=True)]))
