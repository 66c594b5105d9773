"""Evaluation on held-out prompts: the student's greedy accuracy and reverse KL to the teacher, and the
teacher's own accuracy (the ceiling the student is distilled towards)."""

from __future__ import annotations

from opd.buffer.sample import Sample, teacher_written
from opd.data import Encoded, last_number_correct
from opd.teachers.feedback import reverse_kl


class Evaluator:
    """Runs on the rollout group and the teacher pool between rounds; holds nothing but the eval prompts."""

    def __init__(self, cfg, prompts: list[Encoded], rollout, teachers, feedback, tokenizer) -> None:
        """`feedback`: the round's `Feedback`, for combine.rule=best_of's teacher assignment of eval prompts."""
        self.cfg, self.prompts, self.rollout, self.teachers = cfg, prompts, rollout, teachers
        self.feedback, self.tokenizer = feedback, tokenizer

    def student(self) -> dict[str, float]:
        """Greedy accuracy (when the prompts carry answers) and reverse KL to the teacher on sampled responses."""
        if self.cfg.combine.rule == "best_of":
            self.feedback.assign_best_teachers(self.prompts)
        greedy = self.rollout.generate(self.prompts, 1, 0.0, seed=None)
        accuracy = self.accuracy(greedy)
        metrics = {} if accuracy is None else {"eval/student_accuracy": accuracy}
        samples = self.rollout.generate(
            self.prompts, self.cfg.eval.samples_per_prompt, self.cfg.rollout.temperature, seed=-1
        )
        self.teachers.score(samples, 1)
        metrics["eval/reverse_kl"] = reverse_kl(samples)
        return metrics

    def teacher_accuracy(self) -> float | None:
        outs = self.teachers.generate([e.ids for e in self.prompts], 1, self.cfg.rollout.max_new_tokens, 0.0, None)
        return self.accuracy(teacher_written(self.prompts, outs, 0))

    def accuracy(self, samples: list[Sample]) -> float | None:
        """Share of responses whose final answer matches; None when the prompts carry no answers."""
        if all(s.answer is None for s in samples):
            return None
        texts = self.tokenizer.batch_decode([s.response_ids for s in samples], skip_special_tokens=True)
        return sum(last_number_correct(t, s.answer) for t, s in zip(texts, samples, strict=True)) / len(samples)
