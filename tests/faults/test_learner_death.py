"""A learner call in which a shard died raises LearnerDied whichever error surfaces first (opd/learner/group.py).

No Ray: `ray.wait`/`ray.get` are replaced by a script of which result arrives when, so every ordering is exact.
"""

from __future__ import annotations

import pytest
from ray.exceptions import ActorDiedError, RayTaskError

from opd.learner import group
from opd.learner.group import LearnerDied, any_dead, gather

HANGS = object()
"""A result that never arrives (a survivor blocked in a collective with the dead shard)."""


class Script:
    """Fake `ray.wait`/`ray.get` over string refs: `outcomes[ref]` is a value, an exception or HANGS; refs
    become ready in the order they were first listed in `arrival` (the rest in the order asked for)."""

    def __init__(self, outcomes: dict, arrival: list[str]) -> None:
        self.outcomes, self.arrival = outcomes, arrival

    def wait(self, pending: list, num_returns: int = 1, timeout: float | None = None) -> tuple[list, list]:
        assert num_returns == 1
        order = [r for r in self.arrival if r in pending] + [r for r in pending if r not in self.arrival]
        ready = [r for r in order if self.outcomes[r] is not HANGS][:1]
        if not ready:
            assert timeout is not None, "waited without a timeout on a result that never arrives"
            return [], pending
        return ready, [r for r in pending if r not in ready]

    def get(self, refs):
        if not isinstance(refs, list):
            return self.get([refs])[0]
        for r in refs:
            assert self.outcomes[r] is not HANGS, f"ray.get on {r}, which never arrives"
            if isinstance(self.outcomes[r], BaseException):
                raise self.outcomes[r]
        return [self.outcomes[r] for r in refs]


class Shard:
    """A fake actor handle: its `__ray_ready__` ping is the ref `ping<rank>`."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.__ray_ready__ = self

    def remote(self) -> str:
        return f"ping{self.rank}"


def run(monkeypatch, outcomes: dict, arrival: list[str], shards: int = 2):
    script = Script(outcomes, arrival)
    monkeypatch.setattr(group.ray, "wait", script.wait)
    monkeypatch.setattr(group.ray, "get", script.get)
    steps = [r for r in outcomes if not r.startswith("ping")]
    return gather(steps, [Shard(i) for i in range(shards)])


def collective_error() -> RuntimeError:
    return RuntimeError("[gloo/transport/tcp/pair.cc] Connection reset by peer")


# Refs `s<step><rank>`: every step of the call queued on both shards; shard 1 was killed.
def dead_shard_1(survivor_error: BaseException | object) -> dict:
    dead = ActorDiedError()
    return {"s00": survivor_error, "s01": dead, "s10": HANGS, "s11": dead, "ping0": HANGS, "ping1": dead}


def test_the_dead_shards_actor_error_first(monkeypatch):
    with pytest.raises(LearnerDied, match="a learner shard died") as err:
        run(monkeypatch, dead_shard_1(HANGS), arrival=["s01"])
    assert isinstance(err.value.__cause__, ActorDiedError)


def test_a_survivors_collective_error_first_then_the_actor_error(monkeypatch):
    with pytest.raises(LearnerDied, match="a learner shard died") as err:
        run(monkeypatch, dead_shard_1(collective_error()), arrival=["s00", "s01"])
    assert "Connection reset by peer" in str(err.value.__cause__)


def test_an_error_with_every_shard_alive_stays_itself(monkeypatch):
    class NonFinite(RuntimeError):
        pass

    outcomes = {"s00": 1, "s01": 1, "s10": NonFinite("nan"), "s11": NonFinite("nan"), "ping0": True, "ping1": True}
    with pytest.raises(NonFinite, match="nan"):
        run(monkeypatch, outcomes, arrival=["s00", "s01", "s11"])


def test_an_error_with_every_shard_alive_but_busy_stays_itself(monkeypatch):
    outcomes = {"s00": collective_error(), "s01": HANGS, "ping0": HANGS, "ping1": HANGS}
    with pytest.raises(RuntimeError, match="Connection reset"):
        run(monkeypatch, outcomes, arrival=["s00"])


def test_a_rollout_worker_dying_under_a_live_shard_is_no_dead_learner(monkeypatch):
    """Mid weight sync, rank 0's call to a dead rollout worker fails: the driver gets a RayTaskError that Ray also
    makes an ActorDiedError. The shard raised it, so it is alive: the error stays itself for the rollout group."""
    worker_died = RayTaskError("send_weights", "Traceback", ActorDiedError()).as_instanceof_cause()
    outcomes = {"s00": worker_died, "s01": HANGS, "ping0": True, "ping1": HANGS}
    with pytest.raises(ActorDiedError) as err:
        run(monkeypatch, outcomes, arrival=["s00"])
    assert err.value is worker_died


def test_all_results_fine(monkeypatch):
    outcomes = {"s00": {"loss": 1.0}, "s01": {"loss": 2.0}, "s10": {"loss": 3.0}, "s11": {"loss": 4.0}}
    assert run(monkeypatch, outcomes, arrival=["s11", "s00"]) == [{"loss": x} for x in (1.0, 2.0, 3.0, 4.0)]


@pytest.mark.parametrize(
    ("outcomes", "dead"),
    [
        ({"a": True, "b": True}, False),
        ({"a": HANGS, "b": True}, False),
        ({"a": HANGS, "b": ActorDiedError()}, True),
        ({"a": ActorDiedError(), "b": HANGS}, True),
    ],
)
def test_any_dead_tells_a_dead_actor_from_a_busy_one(monkeypatch, outcomes, dead):
    script = Script(outcomes, arrival=[])
    monkeypatch.setattr(group.ray, "wait", script.wait)
    monkeypatch.setattr(group.ray, "get", script.get)
    assert any_dead(list(outcomes), timeout_s=0.1) is dead
