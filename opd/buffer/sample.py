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
    advantages: np.ndarray | None = None
    """Per-token advantages over the tokens the student wrote (loss.discount / baseline / normalize_advantages,
    opd/advantages.py); None: the learner takes each token's own reward."""

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


RAGGED = (
    "prompt_ids",
    "response_ids",
    "logprobs",
    "teacher_logprobs",
    "teacher_topk_ids",
    "teacher_topk_logprobs",
    "advantages",
)
"""Per-sample arrays, concatenated along their first axis; a sample without one has length 0 there."""
SCALARS = {"version": np.int64, "prompt_index": np.int64, "weight": np.float64, "advantage_bonus": np.float64}
OPTIONAL = {"correction_start": np.int64, "judge_score": np.float64}
"""Optional scalars: a parallel `<name>.set` column says which are present."""
TEXT = ("answer", "teacher")


def to_columns(samples: list[Sample]) -> tuple[dict[str, np.ndarray], dict[str, list]]:
    """Samples as a few flat arrays (ragged fields concatenated, with lengths) plus the text fields as lists.

    The layout both of the buffer's files on disk and of samples crossing Ray: a round's samples hold thousands of
    small arrays, which Ray serializes one by one; as columns they are about twenty.
    """
    arrays: dict[str, np.ndarray] = {}
    for name in RAGGED:
        parts = [getattr(s, name) for s in samples]
        present = [np.asarray(p) for p in parts if p is not None]
        arrays[f"{name}.lengths"] = np.asarray([0 if p is None else len(p) for p in parts], dtype=np.int64)
        arrays[f"{name}.present"] = np.asarray([p is not None for p in parts], dtype=np.uint8)
        if present:  # zero-length parts are left out, so an empty `np.array([])` cannot turn ids into floats
            arrays[name] = np.ascontiguousarray(np.concatenate([p for p in present if len(p)] or present[:1]))
    for name, dtype in SCALARS.items():
        arrays[name] = np.asarray([getattr(s, name) for s in samples], dtype=dtype)
    for name, dtype in OPTIONAL.items():
        values = [getattr(s, name) for s in samples]
        arrays[name] = np.asarray([0 if v is None else v for v in values], dtype=dtype)
        arrays[f"{name}.set"] = np.asarray([v is not None for v in values], dtype=np.uint8)
    return arrays, {name: [getattr(s, name) for s in samples] for name in TEXT}


def from_columns(arrays: dict[str, np.ndarray], text: dict[str, list]) -> Samples:
    """The samples `to_columns` took apart, equal field by field (ragged fields are views of the flat arrays)."""
    n = len(arrays["version"])
    columns: dict[str, list] = {}
    for name in RAGGED:
        if f"{name}.lengths" not in arrays:  # written before the field existed (a buffer spilled by an older opd)
            columns[name] = [None] * n
            continue
        lengths, present = arrays[f"{name}.lengths"], arrays[f"{name}.present"]
        flat = arrays.get(name)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        columns[name] = [flat[starts[i] : starts[i + 1]] if present[i] else None for i in range(n)]
    for name in SCALARS:
        columns[name] = arrays[name].tolist()
    for name in OPTIONAL:
        present = arrays[f"{name}.set"].astype(bool).tolist()
        columns[name] = [v if ok else None for v, ok in zip(arrays[name].tolist(), present, strict=True)]
    columns |= {name: list(text[name]) for name in TEXT}
    return Samples(Sample(**{name: values[i] for name, values in columns.items()}) for i in range(n))


class Samples(list):
    """A list of samples that crosses Ray as columns (`to_columns`): Ray's serializer then moves about twenty
    arrays instead of six per sample, which made a round's hops (worker -> driver -> buffer -> learner) several
    times slower than the arrays' size."""

    def __reduce__(self):
        return from_columns, to_columns(self)


def teacher_written(prompts: list, outs: list, version: int) -> list[Sample]:
    """Responses the teacher wrote (`outs[i]`: n (token ids, log-probs) pairs for `prompts[i]`, an `Encoded`)
    as samples: mode=offline trains on them, evaluation grades them."""
    return [
        Sample(np.asarray(e.ids), ids, lps, version, e.prompt.index, e.prompt.answer)
        for e, pairs in zip(prompts, outs, strict=True)
        for ids, lps in pairs
    ]
