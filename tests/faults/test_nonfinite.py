"""The learner's non-finite guard (opd/learner/guard.py), on plain torch: no DeepSpeed, no process group."""

import pickle

import pytest
import torch

from opd.config import FaultConfig
from opd.learner.guard import NonFiniteStep, SkipCounter, finite_everywhere, frozen_lr, safe_loss

INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize(
    ("value", "finite"),
    [
        (torch.tensor(1.5), True),
        (torch.zeros(3, 4), True),
        (torch.empty(0), True),
        (torch.tensor([1.0, INF]), False),
        (torch.tensor([-INF, 0.0]), False),
        (torch.tensor([[0.0, 1.0], [NAN, 2.0]]), False),
        (torch.tensor(NAN, dtype=torch.bfloat16), False),
        (torch.tensor([1, 2, 3]), True),
    ],
)
def test_finite_everywhere_detects_nan_and_inf(value, finite):
    assert not torch.distributed.is_initialized()
    assert finite_everywhere(value) is finite


def test_finite_everywhere_accepts_a_tensor_that_requires_grad():
    w = torch.ones(2, requires_grad=True)
    assert finite_everywhere(w * 2) is True
    assert finite_everywhere(w * INF) is False


def small_model(seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 3)


def test_finite_loss_passes_through_unchanged():
    model = small_model()
    logits = model(torch.randn(5, 4))
    loss = logits.pow(2).mean()
    assert safe_loss(loss, logits) is loss


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_safe_loss_is_a_connected_zero_with_zero_gradients(bad):
    model = small_model()
    logits = model(torch.randn(5, 4))
    loss = logits.sum() * bad
    safe = safe_loss(loss, logits)
    assert safe is not loss and safe.requires_grad and safe.dtype == loss.dtype
    assert safe.item() == 0.0
    safe.backward()
    # Every parameter that produced the logits got a gradient (the same hooks fire as for a real loss), all zero.
    for p in model.parameters():
        assert p.grad is not None
        assert torch.equal(p.grad, torch.zeros_like(p))


def test_safe_loss_zero_survives_logits_whose_sum_overflows_half_precision():
    logits = torch.full((4, 1000), 60000.0, dtype=torch.float16, requires_grad=True)
    assert finite_everywhere(logits) and not finite_everywhere(logits.sum())
    safe = safe_loss(torch.tensor(NAN), logits)
    assert safe.item() == 0.0
    safe.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_safe_loss_trusts_a_verdict_it_is_given():
    logits = small_model()(torch.randn(2, 4))
    loss = logits.mean()
    assert safe_loss(loss, logits, finite=False).item() == 0.0


@pytest.mark.parametrize("bad", [NAN, INF])
def test_non_finite_logits_mean_corrupted_weights(bad):
    model = small_model()
    with torch.no_grad():
        model.weight[0, 0] = bad
    logits = model(torch.randn(5, 4))
    with pytest.raises(NonFiniteStep, match=r"logits.*corrupted.*checkpoint"):
        safe_loss(logits.sum(), logits)


def test_skip_counter_resets_on_a_good_step_and_counts_the_total():
    counter = SkipCounter(3)
    for skipped in (True, True, False, True, True, False):
        counter.update(skipped)
    assert counter.in_a_row == 0 and counter.total == 4
    counter.update(True)
    assert counter.in_a_row == 1 and counter.total == 5


def test_skip_counter_raises_at_the_limit_naming_the_count_and_what_to_do():
    counter = SkipCounter(3)
    counter.update(True)
    counter.update(True)
    with pytest.raises(NonFiniteStep) as err:
        counter.update(True)
    message = str(err.value)
    assert "3 learner steps in a row" in message
    assert "faults.max_nonfinite_steps=3" in message
    for advice in ("learner.lr", "teacher", "data", "checkpoint"):
        assert advice in message
    assert err.value.in_a_row == 3


def test_skip_counter_limit_one_stops_at_the_first_skip_and_limit_zero_is_refused():
    counter = SkipCounter(1)
    counter.update(False)
    with pytest.raises(NonFiniteStep, match="1 learner step in a row"):
        counter.update(True)
    with pytest.raises(ValueError, match=r"faults\.max_nonfinite_steps"):
        SkipCounter(0)


def test_skip_counter_takes_the_configured_limit():
    limit = FaultConfig().max_nonfinite_steps
    counter = SkipCounter(limit)
    for _ in range(limit - 1):
        counter.update(True)
    with pytest.raises(NonFiniteStep, match=f"{limit} learner steps in a row"):
        counter.update(True)


def test_non_finite_step_survives_pickling_as_ray_sends_it():
    err = NonFiniteStep.too_many(4, 4, 9)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is NonFiniteStep and str(back) == str(err) and back.in_a_row == 4


def adamw_step(freeze: bool, weight_decay: float = 0.1):
    model = small_model()
    optim = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=weight_decay)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(8, 4)).pow(2).mean().backward()
    with frozen_lr(optim, freeze):
        if freeze:
            assert all(g["lr"] == 0.0 for g in optim.param_groups)
        optim.step()
    return model, optim, before


def test_frozen_lr_step_changes_no_weight_and_restores_lr():
    model, optim, before = adamw_step(freeze=True)
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)
    assert [g["lr"] for g in optim.param_groups] == [0.1]
    # The step did happen: AdamW's moments saw the gradient (documented in frozen_lr).
    state = optim.state[next(model.parameters())]
    assert int(state["step"]) == 1 and state["exp_avg"].abs().sum() > 0


def test_unfrozen_step_changes_weights():
    model, optim, before = adamw_step(freeze=False)
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert [g["lr"] for g in optim.param_groups] == [0.1]


def test_frozen_lr_restores_lr_when_the_step_raises():
    optim = torch.optim.AdamW(small_model().parameters(), lr=0.05)
    with pytest.raises(RuntimeError, match="boom"), frozen_lr(optim, True):
        raise RuntimeError("boom")
    assert optim.param_groups[0]["lr"] == 0.05


def test_frozen_lr_on_any_object_with_param_groups_keeps_a_scheduler_update():
    class Wrapper:  # what DeepSpeed's ZeRO optimizers look like from outside
        def __init__(self) -> None:
            self.param_groups = [{"lr": 1e-3}, {"lr": 2e-3}, {"lr": 5e-4}]

    opt = Wrapper()
    with frozen_lr(opt, True):
        assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0, 0.0]
        opt.param_groups[1]["lr"] = 1.5e-3  # an lr scheduler stepping inside engine.step()
        opt.param_groups[2]["lr"] = 0.0  # ...possibly to exactly zero (warm-up)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1.5e-3, 0.0]
    with frozen_lr(opt, False):
        assert opt.param_groups[0]["lr"] == 1e-3


def test_frozen_lr_with_a_tensor_lr():
    model = small_model()
    lr = torch.tensor(0.1)
    optim = torch.optim.AdamW(model.parameters(), lr=lr)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(8, 4)).sum().backward()
    with frozen_lr(optim, True):
        optim.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert optim.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(0.1)


def test_guarded_accumulation_loop_skips_only_the_poisoned_step():
    """The shard's pattern (guard.py docstring) with plain torch: two micro-batches per optimizer step."""
    model = small_model()
    optim = torch.optim.AdamW(model.parameters(), lr=0.1)
    counter = SkipCounter(2)
    x = torch.randn(2, 6, 4)
    history = []
    for poison in (False, True, False, True, True):
        before = [p.detach().clone() for p in model.parameters()]
        skipped = False
        for i in range(2):
            logits = model(x[i])
            loss = logits.pow(2).mean() * (NAN if poison and i == 1 else 1.0)
            finite = finite_everywhere(loss)
            if not finite:
                loss = safe_loss(loss, logits, finite=False)
                skipped = True
            (loss / 2).backward()
        try:
            with frozen_lr(optim, freeze=skipped):
                optim.step()
            counter.update(skipped)
        except NonFiniteStep:
            history.append("stop")
            break
        finally:
            optim.zero_grad()
        changed = any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
        history.append("step" if changed else "skip")
        assert all(torch.isfinite(p).all() for p in model.parameters())
    assert history == ["step", "skip", "step", "skip", "stop"]
    assert counter.total == 3 and optim.param_groups[0]["lr"] == 0.1
