"""The teacher pool: named teachers, each with replicas, behind two calls (score, generate)."""

from __future__ import annotations

import ray

from opd.buffer.sample import Sample
from opd.partition import chunks
from opd.teachers.worker import TeacherWorker


class TeacherPool:
    """Named teachers, each with replicas; requests are spread evenly over a teacher's replicas.

    With several teachers, a sample routed to one teacher (`Sample.teacher`) is scored by that
    teacher alone; otherwise every teacher with weight > 0 scores it and `combine.rule` merges
    the signals. A single teacher's signal is used as it is, never re-approximated.
    """

    def __init__(
        self,
        teachers,
        combine,
        engine_cfg,
        temperature: float,
        seed: int,
        model_paths: dict[str, str],
        vocab_size: int,
    ) -> None:
        from opd.teachers.combine import RULES, SELECTING

        self.replicas: dict[str, list] = {}
        for t in teachers:
            actor = ray.remote(num_cpus=t.cpus_per_replica, num_gpus=t.gpus_per_replica)(TeacherWorker)
            self.replicas[t.name] = [
                actor.remote(model_paths[t.name], t.backend, engine_cfg, temperature, seed + i)
                for i in range(t.replicas)
            ]
        self.weights = {t.name: t.weight for t in teachers}
        # Selecting rules route every sample to one teacher, so nothing is ever merged.
        self.rule = None if combine.rule in SELECTING else RULES.get(combine.rule)
        self.vocab_size = vocab_size
        self.default = teachers[0].name

    def ready(self) -> None:
        ray.get([r.ready.remote() for reps in self.replicas.values() for r in reps])

    def _submit(self, name: str, method: str, columns: list[list], *args) -> list:
        """Send each replica its share of every column; the refs come back in input order."""
        reps = self.replicas[name]
        shares = zip(*(chunks(col, len(reps)) for col in columns), strict=True)
        return [getattr(rep, method).remote(*share, *args) for rep, share in zip(reps, shares, strict=True) if share[0]]

    def score(self, samples: list[Sample], top_k: int) -> dict[str, int]:
        """Fill each sample's teacher fields in place; returns how many samples each teacher scored."""
        wanted = {
            name: [i for i, s in enumerate(samples) if s.teacher in (None, name)]
            for name, weight in self.weights.items()
            if weight > 0 or any(s.teacher == name for s in samples)
        }
        pending = {
            name: self._submit(
                name,
                "score",
                [[samples[i].prompt_ids.tolist() for i in idx], [samples[i].response_ids.tolist() for i in idx]],
                top_k,
            )
            for name, idx in wanted.items()
            if idx
        }
        signals: list[dict] = [{} for _ in samples]
        for name, refs in pending.items():
            for i, scored in zip(wanted[name], (x for part in ray.get(refs) for x in part), strict=True):
                signals[i][name] = scored
        for s, by_teacher in zip(samples, signals, strict=True):
            if len(by_teacher) == 1:
                scored = next(iter(by_teacher.values()))
            else:
                weights = {n: self.weights[n] for n in by_teacher}
                scored = self.rule(by_teacher, weights, vocab_size=self.vocab_size, top_k=top_k)
            s.teacher_logprobs = scored.logprobs
            s.teacher_topk_ids, s.teacher_topk_logprobs = scored.topk_ids, scored.topk_logprobs
        return {name: len(idx) for name, idx in wanted.items()}

    def generate(
        self,
        prompt_ids: list[list[int]],
        n: int,
        max_tokens: int,
        temperature: float,
        seed: int | None,
        name: str | None = None,
    ) -> list:
        """A teacher's own samples (the first teacher's unless named), per prompt n (token ids, log-probs)."""
        refs = self._submit(name or self.default, "generate", [prompt_ids], n, max_tokens, temperature, seed)
        return [x for part in ray.get(refs) for x in part]
