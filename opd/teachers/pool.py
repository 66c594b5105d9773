"""The teacher pool: named teachers, each with replicas, behind two calls (score, generate)."""

from __future__ import annotations

import ray

from opd.buffer.sample import Sample
from opd.partition import chunks
from opd.teachers.worker import TeacherWorker


class TeacherPool:
    """Spreads each request evenly over a teacher's replicas and reassembles the answers in order."""

    def __init__(self, teachers, engine_cfg, temperature: float, seed: int, model_paths: dict[str, str]) -> None:
        self.replicas: dict[str, list] = {}
        for t in teachers:
            actor = ray.remote(num_cpus=t.cpus_per_replica, num_gpus=t.gpus_per_replica)(TeacherWorker)
            self.replicas[t.name] = [
                actor.remote(model_paths[t.name], t.backend, engine_cfg, temperature, seed + i)
                for i in range(t.replicas)
            ]
        self.default = teachers[0].name

    def ready(self) -> None:
        ray.get([r.ready.remote() for reps in self.replicas.values() for r in reps])

    def _fan_out(self, name: str, method: str, columns: list[list], *args) -> list:
        """Call `method` on every replica with its share of each column; results come back in order."""
        reps = self.replicas[name]
        shares = zip(*(chunks(col, len(reps)) for col in columns), strict=True)
        refs = [getattr(rep, method).remote(*share, *args) for rep, share in zip(reps, shares, strict=True) if share[0]]
        return [x for part in ray.get(refs) for x in part]

    def score(self, samples: list[Sample], top_k: int, name: str | None = None) -> list[Sample]:
        """Fill each sample's teacher fields in place (and return them)."""
        columns = [[s.prompt_ids.tolist() for s in samples], [s.response_ids.tolist() for s in samples]]
        for s, scored in zip(samples, self._fan_out(name or self.default, "score", columns, top_k), strict=True):
            s.teacher_logprobs = scored.logprobs
            s.teacher_topk_ids, s.teacher_topk_logprobs = scored.topk_ids, scored.topk_logprobs
        return samples

    def generate(
        self,
        prompt_ids: list[list[int]],
        n: int,
        max_tokens: int,
        temperature: float,
        seed: int | None,
        name: str | None = None,
    ) -> list:
        """The teacher's own samples, per prompt a list of n (token ids, log-probs)."""
        return self._fan_out(name or self.default, "generate", [prompt_ids], n, max_tokens, temperature, seed)
