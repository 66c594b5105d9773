"""Teacher corrections: where a response goes wrong, the corrected sample, and how the learner trains on it."""

import numpy as np
import pytest
import torch

from opd.buffer.sample import Sample
from opd.config import LossConfig
from opd.learner import objective
from opd.learner.batch import collate
from opd.teachers.correct import corrected, first_unlikely

NEG = -np.inf


def scored_sample() -> Sample:
    s = Sample(np.array([5, 6]), np.array([7, 8, 9, 1]), np.array([-1.0, -1.1, -1.2, -1.3], np.float32), 0)
    s.teacher_logprobs = np.array([-0.5, -1.0, -9.0, -0.2], np.float32)
    s.teacher_topk_ids = np.array([[7, 3], [2, 3], [9, 4], [0, 0]])
    s.teacher_topk_logprobs = np.array([[-0.5, -2], [-0.3, -1.0], [-9, -0.1], [NEG, NEG]], np.float32)
    return s


def test_first_unlikely_by_threshold_or_outside_top_k():
    s = scored_sample()
    args = (s.response_ids, s.teacher_logprobs, s.teacher_topk_ids, s.teacher_topk_logprobs)
    assert first_unlikely(*args, threshold=-4.0, outside_top_k=False) == 2
    assert first_unlikely(*args, threshold=-4.0, outside_top_k=True) == 1  # token 8 is not in [2, 3]
    assert first_unlikely(*args, threshold=-10.0, outside_top_k=False) is None
    # an all-padding top-k row (position 3) says nothing: token 1 there is not flagged
    s.teacher_topk_ids[1] = [8, 3]
    assert first_unlikely(*args, threshold=-10.0, outside_top_k=True) is None


def test_corrected_keeps_the_prefix_and_appends_the_teacher_continuation():
    s = corrected(scored_sample(), 2, np.array([4, 4, 1]))
    assert s.response_ids.tolist() == [7, 8, 4, 4, 1]
    assert s.correction_start == 2 and s.student_tokens == 2 and s.num_tokens == 5
    assert s.logprobs.tolist() == pytest.approx([-1.0, -1.1, 0, 0, 0])
    assert s.teacher_logprobs.tolist() == [-0.5, -1.0, 0, 0, 0]
    assert np.isinf(s.teacher_topk_logprobs[2:]).all() and s.teacher_topk_ids.shape == (5, 2)


def test_collate_splits_distillation_and_sft_tokens_and_weights_only_the_students_tokens():
    s = corrected(scored_sample(), 1, np.array([4, 1]))
    s.weight = 0.5
    plain = scored_sample()
    plain.advantage_bonus = 0.25
    batch = collate([s, plain], pad_id=0, top_k=2)
    # targets start at t = 1 (prompt length 2): the student wrote 1 token of s, the teacher 2
    assert batch["mask"][0].tolist() == [0, 0.5, 0, 0, 0]
    # the judge's weight scored the student's response; the teacher's correction of it is learnt in full
    assert batch["sft_mask"][0].tolist() == [0, 0, 1, 1, 0]
    assert batch["mask"][1].tolist() == [0, 1, 1, 1, 1] and batch["sft_mask"][1].sum() == 0
    assert batch["advantage_bonus"][1].tolist() == [0, 0.25, 0.25, 0.25, 0.25]
    assert batch["advantage_bonus"][0].sum() == 0


def test_with_corrections_is_a_token_weighted_mean_of_distillation_and_sft():
    batch = collate([corrected(scored_sample(), 1, np.array([4, 1]))], pad_id=0, top_k=2)
    logits = torch.randn(1, 4, 10, requires_grad=True)
    loss, metrics = objective.OBJECTIVES.get("jsd")(logits, batch, LossConfig(top_k=2, beta=1.0), 1.0)
    total, metrics = objective.with_corrections(loss, metrics, logits, batch, weight=2.0)
    sft = metrics["correction_sft_nll"]
    assert float(total) == pytest.approx((float(loss) * 1 + 2.0 * sft * 2) / 3, rel=1e-5)
    total.backward()
    # the SFT term reaches the teacher-written positions, nothing reaches the prompt or padding
    assert logits.grad[0, 2:4].abs().sum() > 0 and logits.grad[0, 0].abs().sum() == 0
    assert objective.with_corrections(loss, {}, logits, collate([scored_sample()], 0, 2), 2.0)[0] is loss


def test_judge_bonus_shifts_the_reverse_kl_advantage():
    base = collate([scored_sample()], pad_id=0, top_k=2)
    bonus = scored_sample()
    bonus.advantage_bonus = 1.0
    logits = torch.zeros(1, 5, 10, requires_grad=True)
    grads = []
    for batch in (base, collate([bonus], pad_id=0, top_k=2)):
        loss, _ = objective.OBJECTIVES.get("reverse_kl")(logits, batch, LossConfig(), 1.0)
        (g,) = torch.autograd.grad(loss, logits)
        grads.append(g)
    assert not torch.allclose(grads[0], grads[1])
