"""Teacher feedback on a round's samples: token scores, whole-response verdicts, corrections.

One stage of the pipeline. The controller runs it in turn (`pipeline.mode=sync`) or on a thread beside the
learner (`async`), so it holds no state between rounds: everything a round's feedback produced travels in
the returned `ScoredRound` (and, in async, in the checkpoint).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import partial

import numpy as np

from opd import advantages
from opd.buffer.sample import Sample
from opd.config import OPDConfig
from opd.data import Encoded, Prompt
from opd.teachers import judge
from opd.teachers.combine import pick_best
from opd.teachers.correct import corrected, first_unlikely
from opd.teachers.pool import TeacherPool

SHOWN = 8
"""Samples per round kept for the W&B samples table (and samples.jsonl)."""


@dataclass
class ScoredRound:
    """A round's samples with the teachers' signal in them, and what giving it measured."""

    samples: list[Sample]
    metrics: dict[str, float | list]
    share: dict[str, float]
    """Teacher -> its share of this round's signal, in samples (provenance.json sums these)."""
    examples: list[dict]
    tokens: int
    """Response tokens as generated (before corrections rewrote any)."""
    busy_s: float

    @property
    def teacher_tokens(self) -> int:
        """What the round cost the teachers: the response tokens they scored, plus those they wrote as corrections."""
        return self.tokens + int(self.metrics.get("correction/teacher_tokens", 0))

    def to_state(self) -> dict:
        """Everything but the samples, as JSON (the samples go to a safetensors file beside it)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "samples"}

    @classmethod
    def from_state(cls, samples: list[Sample], state: dict) -> ScoredRound:
        return cls(samples, **state)


def reverse_kl(samples: list[Sample]) -> float:
    """Per-token Monte Carlo estimate of KL(student || teacher) on the tokens the student wrote itself."""
    tokens = sum(s.student_tokens for s in samples)
    gap = sum(float((s.logprobs - s.teacher_logprobs)[: s.student_tokens].sum()) for s in samples)
    return gap / max(tokens, 1)


def topk_coverage(samples: list[Sample]) -> float:
    """Share of the student's own response positions at which the teacher's top-k reached it: 1 with one tokenizer;
    across tokenizers, only positions where one student and one teacher token cover the same text keep a top-k
    (`opd.teachers.align.TokenBridge.project`), so this is how much of the top-k signal the objective sees."""
    rows = [np.isfinite(s.teacher_topk_logprobs[: s.student_tokens]).any(axis=-1) for s in samples]
    return float(np.concatenate(rows).mean()) if rows and sum(map(len, rows)) else 0.0


def prompts_of(samples: list[Sample], by_index: Mapping[int, Encoded]) -> list[Prompt]:
    """Each sample's prompt, from the set its `prompt_index` points into (indices are per set: train and each eval
    set have their own), for the teachers that render prompts their own way."""
    return [by_index[s.prompt_index].prompt for s in samples]


class Feedback:
    """Calls the teacher pool for a round's samples, per `teachers.combine`, `judge` and `correction`."""

    def __init__(
        self,
        cfg: OPDConfig,
        teachers: TeacherPool,
        tokenizer,
        by_index: dict[int, Encoded],
        verifier: judge.Verifier | None = None,
    ) -> None:
        """`verifier`: judge.kind=verifier's function, resolved by the caller before any actor starts."""
        self.cfg, self.teachers, self.tokenizer, self.by_index = cfg, teachers, tokenizer, by_index
        self.verifier = verifier

    def __call__(self, samples: list[Sample], seed: int) -> ScoredRound:
        """Score (on-policy), judge and correct `samples` in place; `seed` seeds the teachers' corrections."""
        cfg = self.cfg
        t0 = time.perf_counter()
        tokens = int(sum(s.num_tokens for s in samples))
        metrics: dict[str, float | list] = {}
        share: dict[str, float] = {}
        if cfg.mode == "on_policy":
            share = self.teachers.score(samples, cfg.loss.top_k, prompts_of(samples, self.by_index))
            metrics |= {f"teachers/{name}_samples": n for name, n in share.items()}
            # Before corrections: the student's own samples, so this is the unbiased on-policy estimate.
            metrics["train/reverse_kl"] = reverse_kl(samples)
            if cfg.loss.top_k:
                metrics["train/topk_coverage"] = topk_coverage(samples)
        if cfg.judge.kind != "none":
            metrics |= self.judge(samples)
        shown = [s.response_ids for s in samples[:SHOWN]]
        if cfg.correction.enabled:
            metrics |= self.correct(samples, seed)
        if advantages.shapes_advantages(cfg.loss):  # after corrections: over the tokens the student wrote
            metrics |= advantages.assign(samples, cfg.loss)
        examples = self.sample_rows(samples[:SHOWN], shown)
        return ScoredRound(samples, metrics, share, examples, tokens, time.perf_counter() - t0)

    def sample_rows(self, samples: list[Sample], written: list) -> list[dict]:
        """What a person reads to see what the student does: prompt, its response, the correction, the verdict."""
        decode = partial(self.tokenizer.decode, skip_special_tokens=True)
        return [
            {
                "prompt": self.tokenizer.decode(s.prompt_ids),  # with its chat markup: what the student read
                "student_response": decode(ids),
                "teacher_correction": None
                if s.correction_start is None
                else decode(s.response_ids[s.correction_start :]),
                "corrected_at": s.correction_start,
                "judge_score": None if s.judge_score is None else float(s.judge_score),
                "teacher": s.teacher,
                "policy_version": int(s.version),
            }
            for s, ids in zip(samples, written, strict=True)
        ]

    def judge(self, samples: list[Sample]) -> dict[str, float]:
        """Score every response as a whole, store it with the sample, and apply `judge.use`."""
        cfg = self.cfg.judge
        prompts = [self.by_index[s.prompt_index] for s in samples]
        texts = self.tokenizer.batch_decode([s.response_ids for s in samples], skip_special_tokens=True)
        records = self.judge_texts(prompts, texts)
        scores = [r.score for r in records]
        bonus = judge.group_advantage(scores, [s.prompt_index for s in samples])
        for s, score, b in zip(samples, scores, bonus, strict=True):
            s.judge_score = score
            s.advantage_bonus = cfg.advantage_coef * b
            if cfg.use == "weight":
                s.weight = score or 0.0
            elif cfg.use == "filter":  # kept in the batch with no weight, so every shard's step keeps its shape
                s.weight = float(score is not None and score >= cfg.min_score)
        metrics = judge.judge_summary(records)
        if cfg.use == "filter":
            metrics["judge/filtered_fraction"] = sum(s.weight == 0 for s in samples) / len(samples)
        return metrics

    def judge_texts(self, prompts: list[Encoded], texts: list[str]) -> list[judge.JudgeRecord]:
        """Verdicts on responses to `prompts`: a Python verifier, or a teacher reading the rubric as a user turn."""
        cfg = self.cfg.judge
        if cfg.kind == "verifier":
            return [
                judge.run_verifier(self.verifier, t, e.prompt.answer, e.prompt.fields)
                for e, t in zip(prompts, texts, strict=True)
            ]
        asks = [judge.render_rubric(cfg.rubric, e.prompt.text, t) for e, t in zip(prompts, texts, strict=True)]
        verdicts = self.teachers.complete(cfg.teacher or self.teachers.default, asks, cfg.max_tokens, 0.0)
        too_long = judge.JudgeRecord(None, error="judge prompt does not fit the judge's context (raise max_model_len)")
        return [too_long if v is None else judge.parse_score(v) for v in verdicts]

    def assign_best_teachers(self, prompts: list[Encoded]) -> None:
        """combine.rule=best_of: each teacher answers each new prompt once (the conversation as it reads it); the
        best-judged one teaches it."""
        todo = [e for e in prompts if e.teacher is None]
        if not todo:
            return
        names = self.teachers.names
        answers = {
            n: [a or "" for a in self.teachers.answer(n, todo, self.cfg.rollout.max_new_tokens, 0.0)] for n in names
        }
        verdicts = {n: self.judge_texts(todo, answers[n]) for n in names}
        for i, e in enumerate(todo):
            scores = {n: np.nan if verdicts[n][i].score is None else verdicts[n][i].score for n in names}
            e.teacher = pick_best(scores, names)

    def correct(self, samples: list[Sample], seed: int) -> dict[str, float | list]:
        """Teacher corrections, in place: cut each response at its first unlikely token, the teacher writes the rest."""
        cfg, budget = self.cfg.correction, self.cfg.rollout.max_new_tokens
        found = [
            first_unlikely(
                s.response_ids,
                s.teacher_logprobs,
                s.teacher_topk_ids,
                s.teacher_topk_logprobs,
                cfg.threshold,
                cfg.outside_top_k,
            )
            for s in samples
        ]
        todo = [(i, int(j)) for i, j in enumerate(found) if j is not None]
        if todo:
            names = [cfg.teacher or samples[i].teacher or self.teachers.default for i, _ in todo]
            conts = self.teachers.correct(
                names,
                [samples[i].prompt_ids.tolist() for i, _ in todo],
                [samples[i].response_ids[:j].tolist() for i, j in todo],
                [budget - j for _, j in todo],
                cfg.temperature,
                seed,
                prompts_of([samples[i] for i, _ in todo], self.by_index),
            )
            for (i, j), cont in zip(todo, conts, strict=True):
                samples[i] = corrected(samples[i], j, cont)
        positions = [j for _, j in todo]
        return {
            "correction/rate": len(todo) / len(samples),
            "correction/mean_position": float(np.mean(positions)) if positions else float("nan"),
            "correction/teacher_tokens": float(sum(s.num_tokens - s.student_tokens for s in samples)),
            "correction/position": positions,
        }
