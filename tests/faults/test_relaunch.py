"""Control flow of re-issuing generation after a rollout worker died (no Ray actors: `ray.get` is faked).

In async with `pipeline.depth` > 1 several rounds are in flight on the rollout group when a worker dies. The
first launch to fail replaces the group; the others were launched on the group that is gone and are only
re-issued, so one death costs one replacement (which re-sends the learner's weights), not one per round.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import ray

from opd.rollout import group as rollout_group
from opd.rollout.group import Launch, RolloutGroup

DEAD = "a ref on a worker that died"


class Fake:
    """The parts of a RolloutGroup that `collect` drives: the group counter, `replace` and `launch`."""

    collect = RolloutGroup.collect

    def __init__(self, max_restarts: int = 3, deaths_per_launch: int = 0) -> None:
        self.cfg = SimpleNamespace(faults=SimpleNamespace(max_restarts=max_restarts))
        self.restarts = 0
        self.launches: list[tuple] = []
        self.deaths_per_launch = deaths_per_launch  # re-issued launches that die again (a worker that keeps dying)

    def replace(self) -> None:
        self.restarts += 1

    def launch(self, prompts, n, temperature, seed, top_p=1.0) -> Launch:
        self.launches.append((seed, self.restarts))
        dies = len(self.launches) <= self.deaths_per_launch
        return Launch(prompts, (n, temperature, seed, top_p), [DEAD if dies else seed], group=self.restarts)


@pytest.fixture(autouse=True)
def fake_get(monkeypatch):
    def get(refs):
        if DEAD in refs:
            raise ray.exceptions.RayActorError()
        return [([f"sample of seed {r}"], 0.5) for r in refs]

    monkeypatch.setattr(rollout_group.ray, "get", get)


def in_flight(seed: int) -> Launch:
    return Launch([], (4, 1.0, seed, 1.0), [DEAD], group=0)


def test_rounds_in_flight_on_a_replaced_group_are_reissued_without_a_second_replacement():
    c = Fake()
    first, second = in_flight(7), in_flight(8)
    assert c.collect(first) == ["sample of seed 7"] and first.busy_s == 0.5
    assert c.collect(second) == ["sample of seed 8"]
    assert c.restarts == 1  # one death, one replacement
    assert c.launches == [(7, 1), (8, 1)]  # both re-issued on the new group, same seeds
    assert (first.group, second.group) == (1, 1)


def test_a_worker_of_the_new_group_dying_too_replaces_it_again_up_to_max_restarts():
    c = Fake(max_restarts=2, deaths_per_launch=1)  # the first re-issue dies as well
    assert c.collect(in_flight(7)) == ["sample of seed 7"]
    assert c.restarts == 2 and c.launches == [(7, 1), (7, 2)]
    c = Fake(max_restarts=2, deaths_per_launch=5)
    with pytest.raises(ray.exceptions.RayActorError):
        c.collect(in_flight(7))
    assert c.restarts == 2


def test_the_feedback_thread_hands_a_dead_worker_back_without_replacing_anything():
    c = Fake()
    with pytest.raises(ray.exceptions.RayActorError):
        c.collect(in_flight(7), restart=False)
    assert c.restarts == 0 and c.launches == []
