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

    @property
    def num_tokens(self) -> int:
        return len(self.response_ids)
