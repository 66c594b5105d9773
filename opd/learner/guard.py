"""Non-finite guard for learner steps: skip a step whose loss is NaN/inf, count it, stop after too many in a row.

Pure torch, no DeepSpeed, so it is testable on its own. The learner shard uses it like this
(every call below is made on every rank, in the same order, because the verdicts are collectives):

    counter = SkipCounter(cfg.faults.max_nonfinite_steps)
    skipped = False
    for i, chunk in enumerate(chunks):
        logits = ...; loss = ...
        finite = finite_everywhere(loss.detach())        # one verdict for all ranks
        if not finite:
            loss = safe_loss(loss, logits, finite=False)  # zero, still connected to the graph
            skipped = True
        engine.backward(loss)
        if i < len(chunks) - 1:
            engine.step()                                 # no optimizer step before the boundary
        else:
            with frozen_lr(engine.optimizer, freeze=skipped):
                engine.step()                             # the optimizer step: lr 0 if skipped
    counter.update(skipped)                               # raises NonFiniteStep after `limit` in a row

A skipped micro-batch still runs backward (on a zero loss), so DeepSpeed's gradient hooks, reductions
and accumulation counters see the same sequence on every rank as for a good micro-batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


class NonFiniteStep(RuntimeError):
    """The learner met numbers it cannot train on; the message says what happened and what to do.

    Picklable with its `in_a_row` count (Ray re-raises it on the controller).
    """

    def __init__(self, message: str, in_a_row: int = 0) -> None:
        super().__init__(message)
        self.in_a_row = in_a_row

    def __reduce__(self):
        return type(self), (str(self), self.in_a_row)

    @classmethod
    def too_many(cls, in_a_row: int, limit: int, total: int) -> NonFiniteStep:
        steps = "1 learner step" if in_a_row == 1 else f"{in_a_row} learner steps"
        return cls(
            f"{steps} in a row had a non-finite loss (NaN/inf) and were skipped "
            f"(faults.max_nonfinite_steps={limit}; {total} skipped in this run), so the run stops instead of "
            "training on nothing. What to do: lower learner.lr (or learner.grad_clip); check the teacher signal "
            "(teacher log-probs, combine weights) and the prompt data of the last rounds; then resume from the "
            "last checkpoint (resume=auto), or raise faults.max_nonfinite_steps if the spikes are rare.",
            in_a_row,
        )


def finite_everywhere(value: torch.Tensor) -> bool:
    """True if every element of `value` is finite, on this rank and, under torch.distributed, on every rank.

    With an initialized process group the local verdict is all-reduced (MIN of a 0/1 int tensor on
    `value`'s device), so all ranks return the same answer: ranks must never disagree on whether to
    step. It is then a collective, so every rank must call it at the same point.
    """
    with torch.no_grad():
        ok = torch.isfinite(value.detach()).all()
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        flag = ok.to(device=value.device, dtype=torch.int32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())
    return bool(ok.item())


def safe_loss(loss: torch.Tensor, logits: torch.Tensor, *, finite: bool | None = None) -> torch.Tensor:
    """The loss to backpropagate for this micro-batch: `loss` itself if finite everywhere, else a zero.

    The zero is `(logits * 0).sum()`: connected to the graph through every parameter that produced the
    logits, so backward runs the same hooks and reductions as a real loss and leaves zero gradients
    (0 * finite = 0 elementwise; summing first could overflow to inf in half precision and give NaN).
    Pass `finite` when `finite_everywhere(loss)` was already computed, to save a collective.

    Raises NonFiniteStep if the logits themselves are not finite (on any rank): then the weights are
    already corrupted and skipping steps cannot help; only a checkpoint can.
    Under torch.distributed this is a collective: call it on every rank.
    """
    if finite is None:
        finite = finite_everywhere(loss)
    if finite:
        return loss
    if not finite_everywhere(logits):
        raise NonFiniteStep(
            "the student's logits are NaN/inf: its weights are corrupted, and skipping steps cannot repair "
            "them. What to do: resume from the last checkpoint (resume=auto) with a lower learner.lr "
            "(or learner.grad_clip), and check the teacher signal and prompt data of the last rounds."
        )
    return (logits * 0).sum().to(loss.dtype)


class SkipCounter:
    """Counts skipped learner steps; `limit` skips in a row raise NonFiniteStep.

    Every rank holds one and feeds it the same all-reduced verdicts, so all ranks stop at the same step.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"faults.max_nonfinite_steps={limit} must be >= 1")
        self.limit = limit
        self.total = 0
        """Steps skipped so far."""
        self.in_a_row = 0
        """Steps skipped since the last good one."""

    def update(self, skipped: bool) -> None:
        if not skipped:
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise NonFiniteStep.too_many(self.in_a_row, self.limit, self.total)


@contextmanager
def frozen_lr(optimizer: Any, freeze: bool) -> Iterator[None]:
    """With `freeze`, every param group's lr is 0 inside the block (one optimizer step) and restored after.

    Works on a torch optimizer and on anything with `.param_groups` (DeepSpeed's ZeRO optimizers expose
    the wrapped optimizer's groups). With lr 0, AdamW changes no weight: the update and the decoupled
    weight decay are both scaled by lr. The step still happens, though: AdamW's moment estimates take in
    the step's gradient (the finite micro-batches' gradients; skipped ones contributed zeros) and its
    step count advances (bias correction). That keeps optimizer state identical across ranks and
    DeepSpeed's bookkeeping uniform, at the price of slightly damped moments after a skip.

    A group whose lr was changed inside the block (e.g. an lr scheduler stepped by `engine.step()`)
    keeps the new value; only the zeros set here are undone.
    """
    if not freeze:
        yield
        return
    saved = []
    for group in optimizer.param_groups:
        lr = group["lr"]
        # A fresh object per group, so "still ours" can be told by identity (a scheduler may also write 0.0).
        zero = torch.zeros_like(lr) if isinstance(lr, torch.Tensor) else float("0")
        group["lr"] = zero
        saved.append((group, lr, zero))
    try:
        yield
    finally:
        for group, lr, zero in saved:
            if group["lr"] is zero:
                group["lr"] = lr
