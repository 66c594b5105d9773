"""The unit that flows from rollout workers through teachers and the buffer to the learner."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Sample:
    """One response to one prompt, with everything the learner needs to train on it.

    Arrays over the response are aligned: entry j belongs to response token j.
    Teacher fields are filled by the teacher pool; `version` is the policy version
    (learner step) of the weights that generated the response.
    """

    prompt_ids: np.ndarray
    response_ids: np.ndarray
    logprobs: np.ndarray
    version: int
    prompt_index: int = -1
    answer: str | None = None
    teacher: str | None = None
    """The teacher this sample is routed to; None lets every teacher score it (combined by rule)."""
    teacher_logprobs: np.ndarray | None = None
    teacher_topk_ids: np.ndarray | None = None
    teacher_topk_logprobs: np.ndarray | None = None
    correction_start: int | None = None
    """Teacher correction: response tokens from here on were written by the teacher (trained by SFT)."""
    judge_score: float | None = None
    """Whole-response score in [0, 1] from the judge (None: not judged or no verdict)."""
    weight: float = 1.0
    """Scales this sample's loss (judge.use=weight)."""
    advantage_bonus: float = 0.0
    """Added to every token's policy-gradient advantage (judge.advantage_coef x group-centred score)."""

    @property
    def num_tokens(self) -> int:
        return len(self.response_ids)

    @property
    def teacher_nbytes(self) -> int:
        """Bytes of teacher signal this sample carries (what moves from teacher actors to the learner)."""
        fields = (self.teacher_logprobs, self.teacher_topk_ids, self.teacher_topk_logprobs)
        return sum(x.nbytes for x in fields if x is not None)

    @property
    def student_tokens(self) -> int:
        """Response tokens the student wrote itself (all of them unless the teacher corrected it)."""
        return self.num_tokens if self.correction_start is None else self.correction_start
