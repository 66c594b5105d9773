"""The scoring stage's control flow (opd/teachers/feedback.py) on a fake teacher pool.

The real pool, engines and combination rules run in the integration tests; this pins down what the stage
does with what the teachers return: the reverse KL taken before corrections, verdicts stored with the samples,
corrections cut where the teacher first disagrees, and a `ScoredRound` that survives a checkpoint as JSON.
"""

import json

import numpy as np
import pytest

from opd.buffer.sample import Sample
from opd.config import OPDConfig
from opd.data import Encoded, Prompt
from opd.teachers.feedback import Feedback, ScoredRound, reverse_kl, topk_coverage
from opd.teachers.judge import exact_answer


class FakePool:
    """One teacher: log-prob -1 for every student token, except -9 at position 2 of prompt 0's responses."""

    default, names = "t", ["t"]

    def __init__(self) -> None:
        self.corrections: list[tuple] = []
        self.scored_prompts: list = []

    def score(self, samples: list[Sample], top_k: int, prompts=None) -> dict[str, float]:
        self.scored_prompts.append(prompts)
        for s in samples:
            s.teacher_logprobs = np.full(s.num_tokens, -1.0, np.float32)
            if s.prompt_index == 0:
                s.teacher_logprobs[2] = -9.0
            s.teacher_topk_ids = np.tile(np.arange(top_k), (s.num_tokens, 1))
            s.teacher_topk_logprobs = np.full((s.num_tokens, top_k), -2.0, np.float16)
        return {"t": float(len(samples))}

    def correct(self, names, prompt_ids, prefixes, budgets, temperature, seed, prompts) -> list[np.ndarray]:
        self.corrections.append((names, prefixes, budgets, seed, prompts))
        return [np.array([7, 7, 7])] * len(names)


class Tok:
    def decode(self, ids, skip_special_tokens=True) -> str:
        return " ".join(str(int(i)) for i in ids)

    def batch_decode(self, seqs, skip_special_tokens=True) -> list[str]:
        return [self.decode(s) for s in seqs]


def student(prompt_index: int, response: list[int]) -> Sample:
    r = len(response)
    return Sample(np.array([1]), np.array(response), np.full(r, -0.5, np.float32), 3, prompt_index, None)


@pytest.fixture
def stage() -> tuple[Feedback, FakePool]:
    cfg = OPDConfig()
    cfg.judge.kind = "verifier"  # exact_answer: the last number of the response against the prompt's answer
    cfg.correction.enabled = True
    cfg.correction.outside_top_k = False
    cfg.correction.threshold = -4.0
    pool = FakePool()
    by_index = {i: Encoded(Prompt(i, f"p{i}", answer), [1]) for i, answer in enumerate(["4", "9"])}
    return Feedback(cfg, pool, Tok(), by_index, exact_answer), pool


def test_feedback_scores_judges_and_corrects_in_place(stage):
    feedback, pool = stage
    samples = [student(0, [1, 2, 3, 4]), student(1, [5, 6])]
    scored = feedback(samples, seed=11)

    # reverse KL on the student's own samples, before any correction: (0.5 + 0.5 + 8.5 + 0.5 + 0.5 + 0.5) / 6
    assert scored.metrics["train/reverse_kl"] == pytest.approx(11 / 6)
    assert scored.tokens == 6 and scored.share == {"t": 2.0} and scored.metrics["teachers/t_samples"] == 2.0
    # verdicts on what the student wrote: "1 2 3 4" ends in 4 (right), "5 6" in 6 (not 9)
    assert [s.judge_score for s in scored.samples] == [1.0, 0.0]
    assert scored.metrics["judge/mean_score"] == 0.5
    # prompt 0's response is cut at its first unlikely token (position 2) and the teacher writes the rest
    first, second = scored.samples
    assert first.response_ids.tolist() == [1, 2, 7, 7, 7] and first.correction_start == 2
    assert second.correction_start is None and scored.samples is samples
    # teachers get each sample's prompt, which one with another tokenizer renders its own way
    p0, p1 = (feedback.by_index[i].prompt for i in (0, 1))
    assert pool.scored_prompts == [[p0, p1]]
    assert pool.corrections == [(["t"], [[1, 2]], [feedback.cfg.rollout.max_new_tokens - 2], 11, [p0])]
    assert scored.metrics["correction/rate"] == 0.5 and scored.metrics["correction/position"] == [2]
    assert scored.metrics["correction/teacher_tokens"] == 3.0
    # the samples table shows what the student wrote, and the correction beside it
    row = scored.examples[0]
    assert row["student_response"] == "1 2 3 4" and row["teacher_correction"] == "7 7 7"
    assert row["corrected_at"] == 2 and row["judge_score"] == 1.0 and row["policy_version"] == 3
    # after the correction only the student's own prefix counts towards the reverse KL
    assert reverse_kl(scored.samples) == pytest.approx((0.5 + 0.5 + 0.5 + 0.5) / 4)


def test_topk_coverage_is_the_share_of_the_students_positions_with_a_teacher_top_k(stage):
    feedback, _ = stage
    scored = feedback([student(1, [5, 6])], seed=0)
    assert scored.metrics["train/topk_coverage"] == 1.0  # the fake teacher fills every position
    bridged = student(1, [5, 6, 7, 8])  # across tokenizers: positions 1 and 3 got no top-k (all -inf)
    bridged.teacher_topk_logprobs = np.array([[-1.0, -2.0], [-np.inf] * 2, [-np.inf, -3.0], [-np.inf] * 2])
    assert topk_coverage([bridged]) == 0.5
    bridged.correction_start = 1  # only what the student wrote itself counts: position 0
    assert topk_coverage([bridged]) == 1.0 and topk_coverage([]) == 0.0


def test_scored_state_survives_a_checkpoint_as_json(stage):
    feedback, _ = stage
    scored = feedback([student(1, [5, 6])], seed=0)  # no correction: mean position is NaN
    state = json.loads(json.dumps(scored.to_state()))
    back = ScoredRound.from_state(scored.samples, state)
    assert np.isnan(back.metrics.pop("correction/mean_position"))
    assert np.isnan(scored.metrics.pop("correction/mean_position"))
    assert back == scored
