"""The `loss.type` names, declared without torch: what config validation and the model card know of each.

The objectives' torch implementations are registered under these names in opd/learner/objective.py, which
refuses a name not declared here (and a test checks that every declared name has one). The declaration is
apart from the implementation because config validation must stay sub-second, and importing torch alone
takes over a second; making objective.py import torch lazily would instead put an import in every function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from opd.registry import Registry


@dataclass(frozen=True)
class LossType:
    mode: Literal["on_policy", "offline"]
    """The run `mode` it trains in: on_policy on the student's own samples, offline on teacher-written ones."""
    description: str
    """One line for the model card (DISTILLATION.md); `{beta}` and `{top_k}` are filled from the loss settings."""


LOSS_TYPES: Registry[LossType] = Registry("loss.type")
LOSS_TYPES.add(
    "reverse_kl",
    LossType("on_policy", "on-policy reverse KL: the student samples, the teacher's log-probs score every token"),
)
LOSS_TYPES.add(
    "jsd", LossType("on_policy", "generalised Jensen-Shannon divergence between student and teacher (beta={beta})")
)
LOSS_TYPES.add("topk_kl", LossType("on_policy", "KL divergence over the teacher's top-{top_k} tokens"))
LOSS_TYPES.add("sft", LossType("offline", "cross-entropy on teacher-written samples"))

TAILS = ("bucket", "sampled")
"""`loss.tail`: how jsd at beta=1 treats the vocabulary outside the teacher's top-k. bucket: one "rest" category;
sampled: the full-vocabulary reverse KL, exact over the top-k and estimated from the sampled token elsewhere."""
