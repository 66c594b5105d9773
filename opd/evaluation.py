"""Evaluation on held-out prompt sets: the student's greedy accuracy, pass@k and mean@k, its reverse KL to the
teacher, and the teacher's own accuracy (the ceiling the student is distilled towards).

Each set's metrics are named `eval/<set>/...`; the one set of a plain `data.eval` file is unnamed (`eval/...`).
"""

from __future__ import annotations

import numpy as np

from opd.buffer.sample import Sample, teacher_written
from opd.data import Encoded
from opd.grading import pass_at_k
from opd.teachers.combine import generate_routed
from opd.teachers.feedback import prompts_of, reverse_kl
from opd.teachers.judge import Verifier, run_verifier

PASSING = 0.5
"""A response is correct when the verifier scores it at least this (binary verifiers give 0 or 1)."""


def prefix(name: str) -> str:
    """The metric prefix of an eval set: `eval/` for the unnamed one, `eval/<name>/` otherwise."""
    return f"eval/{name}/" if name else "eval/"


def pass_and_mean_at_k(correct: list[bool], prompt_indices: list[int], k: int) -> tuple[float, float]:
    """pass@k and mean@k over prompts, each prompt's k samples graded `correct` (in any order)."""
    per_prompt: dict[int, list[bool]] = {}
    for index, ok in zip(prompt_indices, correct, strict=True):
        per_prompt.setdefault(index, []).append(ok)
    passes = [pass_at_k(len(oks), sum(oks), min(k, len(oks))) for oks in per_prompt.values()]
    means = [sum(oks) / len(oks) for oks in per_prompt.values()]
    return float(np.mean(passes)), float(np.mean(means))


class Evaluator:
    """Runs on the rollout group and the teacher pool between rounds; holds nothing but the eval sets."""

    def __init__(
        self, cfg, sets: dict[str, list[Encoded]], rollout, teachers, feedback, tokenizer, verifier: Verifier
    ) -> None:
        """`sets`: name -> prompts ("" for a plain `data.eval`); `feedback`: the round's `Feedback`, for
        combine.rule=best_of's teacher assignment; `verifier`: what grades an answer (`eval.verifier`)."""
        self.cfg, self.sets, self.rollout, self.teachers = cfg, sets, rollout, teachers
        self.feedback, self.tokenizer, self.verifier = feedback, tokenizer, verifier

    def student(self) -> dict[str, float]:
        return {k: v for name, prompts in self.sets.items() for k, v in self.student_on(name, prompts).items()}

    def student_on(self, name: str, prompts: list[Encoded]) -> dict[str, float]:
        """Greedy accuracy, pass@k and mean@k (when the prompts carry answers), and reverse KL to the teacher."""
        cfg, key = self.cfg, prefix(name)
        if cfg.combine.rule == "best_of":
            self.feedback.assign_best_teachers(prompts)
        metrics = {}
        greedy = self.grade(prompts, self.rollout.generate(prompts, 1, 0.0, seed=None))
        if greedy is not None:
            metrics[f"{key}student_accuracy"] = sum(greedy) / len(greedy)
        k, temperature = cfg.eval.samples_per_prompt, cfg.rollout.temperature
        samples = self.rollout.generate(prompts, k, temperature, seed=-1)
        self.teachers.score(samples, 1, prompts_of(samples, {e.prompt.index: e for e in prompts}))
        metrics[f"{key}reverse_kl"] = reverse_kl(samples)
        if greedy is not None:
            pass_temperature = temperature if cfg.eval.temperature is None else cfg.eval.temperature
            if (pass_temperature, cfg.eval.top_p) != (temperature, 1.0):
                samples = self.rollout.generate(prompts, k, pass_temperature, seed=-2, top_p=cfg.eval.top_p)
            correct = self.grade(prompts, samples)
            at_k = pass_and_mean_at_k(correct, [s.prompt_index for s in samples], k)
            metrics[f"{key}pass@{k}"], metrics[f"{key}mean@{k}"] = at_k
        return metrics

    def teacher_accuracy(self) -> dict[str, float]:
        """Each set's teacher greedy accuracy (`eval/<set>/teacher_accuracy`), for sets with answers: under
        combine.rule=route each prompt's answer is its own routed teacher's, else the first teacher's."""
        out = {}
        for name, prompts in self.sets.items():
            max_tokens = self.cfg.rollout.max_new_tokens
            outs = generate_routed(self.teachers, self.cfg.combine, prompts, 1, max_tokens, 0.0, None)
            correct = self.grade(prompts, teacher_written(prompts, outs, 0))
            if correct is not None:
                out[f"{prefix(name)}teacher_accuracy"] = sum(correct) / len(correct)
        return out

    def grade(self, prompts: list[Encoded], samples: list[Sample]) -> list[bool] | None:
        """Whether each response is correct; None when the prompts carry no answers."""
        if all(s.answer is None for s in samples):
            return None
        fields = {e.prompt.index: e.prompt.fields for e in prompts}
        texts = self.tokenizer.batch_decode([s.response_ids for s in samples], skip_special_tokens=True)
        scores = [
            run_verifier(self.verifier, t, s.answer, fields[s.prompt_index]).score
            for t, s in zip(texts, samples, strict=True)
        ]
        return [score is not None and score >= PASSING for score in scores]
