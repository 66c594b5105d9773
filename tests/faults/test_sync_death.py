"""A rollout worker that dies during the weight sync, and the sync after a rollout group's replacement.

The real `Controller`, schedules and `RolloutGroup` with the fakes of tests/test_controller.py, and a learner that
records each push: which weights (its step) went to which workers. A worker that dies in the middle of a push fails
the learner's send as Ray reports it to the driver: a RayTaskError that is also the worker's ActorDiedError.
"""

from __future__ import annotations

import pytest
import ray
from ray.exceptions import ActorDiedError, RayTaskError

from opd.learner.group import WeightSendTimeout
from tests.test_controller import FakeLearner, config, controller, fake_get, run


class Learner(FakeLearner):
    """Records (step, workers) per push; a worker dies in the middle of push `dies_in` (counted from 1), or while
    the learner trains for step `dies_training` (the sync then finds it dead before pushing)."""

    def __init__(self, dies_in: int | None = None, dies_training: int | None = None) -> None:
        super().__init__()
        self.pushes: list[tuple[int, tuple]] = []
        self.dies_in, self.dies_training = dies_in, dies_training

    def send_weights(self) -> dict[str, float]:
        self.pushes.append((self.step, tuple(self.workers)))
        if len(self.pushes) == self.dies_in:
            self.workers[0].dead = True
            raise RayTaskError("send_weights", "Traceback", ActorDiedError()).as_instanceof_cause()
        return super().send_weights()

    def train(self, mini_batches):
        if self.step == self.dies_training:
            self.workers[0].dead = True
        return super().train(mini_batches)


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    monkeypatch.setattr(ray, "get", fake_get)
    monkeypatch.setattr(ray, "wait", lambda refs, num_returns=1, timeout=None: (refs[:num_returns], refs[num_returns:]))
    monkeypatch.setattr(ray, "kill", lambda actor, no_restart=True: None)


MODES = [("sync", 1), ("async", 1), ("async", 2)]


@pytest.mark.parametrize(("mode", "depth"), MODES)
def test_a_worker_dying_mid_sync_is_replaced_and_the_run_goes_on_at_the_learners_version(mode, depth):
    reference = controller(config(mode, depth))
    expected = run(reference, range(1, 7))
    c = controller(config(mode, depth), learner=Learner(dies_in=3))  # round 3's sync
    metrics = run(c, range(1, 7))
    assert c.rollout.restarts == 1
    assert [m["policy_version"] for m in metrics] == [m["policy_version"] for m in expected]
    assert c.learner.trained == reference.learner.trained  # same prompts, sampled at the same versions
    assert all(w.version == c.learner.step for w in c.rollout.workers)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_push_past_its_deadline_replaces_the_rollout_group_and_the_run_goes_on(mode, capsys):
    """An NCCL sync aborted at its deadline (opd.rollout.weight_sync.send_within) leaves the workers stuck in the
    receive, all alive: the group is replaced and the new one sent the weights, as for a dead worker."""

    class Stuck(Learner):
        def send_weights(self) -> dict[str, float]:
            self.pushes.append((self.step, tuple(self.workers)))
            if len(self.pushes) == 3:
                err = WeightSendTimeout("weight sync took over 600s: its transfer group was aborted")
                raise RayTaskError("send_weights", "Traceback", err).as_instanceof_cause()
            return FakeLearner.send_weights(self)

    reference = controller(config(mode))
    expected = run(reference, range(1, 7))
    c = controller(config(mode), learner=Stuck())
    metrics = run(c, range(1, 7))
    assert c.rollout.restarts == 1 and not any(w.dead for w in c.rollout.workers)
    assert "WARNING: weight sync took over 600s: its transfer group was aborted; restarting the rollout group" in (
        capsys.readouterr().out
    )
    assert [m["policy_version"] for m in metrics] == [m["policy_version"] for m in expected]
    assert c.learner.trained == reference.learner.trained
    assert all(w.version == c.learner.step for w in c.rollout.workers)


def test_a_push_that_fails_with_every_worker_alive_stays_its_error():
    class Broken(FakeLearner):
        def send_weights(self) -> dict[str, float]:
            raise RayTaskError("send_weights", "RuntimeError: out of memory", RuntimeError()).as_instanceof_cause()

    c = controller(config("sync"), learner=Broken())
    with pytest.raises(RuntimeError, match="out of memory"):
        run(c, range(1, 2))
    assert c.rollout.restarts == 0


@pytest.mark.parametrize(
    ("mode", "depth", "death"),
    [
        ("sync", 1, {"dies_training": 4}),  # found dead when the sync starts
        ("sync", 1, {"dies_in": 3}),  # dies in the middle of a push
        ("async", 1, {"dies_in": 3}),
        ("async", 1, {"kill_after": 3}),  # the feedback thread finds it; replaced in `before_sync`, after learning
        ("async", 2, {"kill_after": 3}),
        ("sync", 1, {"kill_after": 3}),  # dies generating, before learning: the new workers then need two pushes
    ],
)
def test_no_workers_are_sent_the_same_weights_twice(mode, depth, death):
    kill_after = death.pop("kill_after", None)
    c = controller(config(mode, depth), kill_after=kill_after, learner=Learner(**death))
    run(c, range(1, 7))
    assert c.rollout.restarts == 1
    pushes = c.learner.pushes
    assert len(set(pushes)) == len(pushes), [(step, [id(w) for w in workers]) for step, workers in pushes]
