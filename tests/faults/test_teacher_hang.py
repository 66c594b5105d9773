"""A hung teacher is replaced by a fresh actor, not restarted by Ray (no Ray here: its calls are faked).

Ray restarts an actor at most `faults.max_restarts` times in its life. Restarting a hung teacher that way used
one of them per hang, so the fourth hang of a long run (max_restarts=3) killed the teacher for good; a fresh actor
with the same options leaves them all to crashes.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from ray.exceptions import GetTimeoutError, RayActorError

from opd.config import DataConfig, TeacherConfig
from opd.config.models import CombineConfig
from opd.teachers import pool as pool_module
from opd.teachers.pool import TeacherPool


class Ref:
    def __init__(self, actor: FakeActor, value) -> None:
        self.actor, self.value = actor, value


class FakeActor:
    """A replica whose `generate` calls hang while the fake Ray says so, and which Ray restarts at most
    `max_restarts` times (each `kill(no_restart=False)` uses one)."""

    def __init__(self, ray: FakeRay, options: dict, args: tuple) -> None:
        self.ray, self.options, self.args = ray, options, args
        self.restarts_left = options["max_restarts"]
        self.dead = False
        self.ready = SimpleNamespace(remote=lambda: Ref(self, "ready"))
        self.generate = SimpleNamespace(remote=self._generate)

    def _generate(self, prompt_ids, prompts, *args) -> Ref:
        hung = self.ray.hangs > 0
        self.ray.hangs -= hung
        return Ref(self, None if hung else [f"answer to {p}" for p in prompt_ids])


class FakeRay:
    """`ray.remote`, `get` and `kill` as the pool uses them, recording every actor started and killed."""

    def __init__(self) -> None:
        self.hangs = 0
        self.started: list[FakeActor] = []
        self.kills: list[tuple[FakeActor, bool]] = []

    def remote(self, **actor_options):
        def wrap(cls):
            def options(**slot):
                def start(*args) -> FakeActor:
                    self.started.append(FakeActor(self, actor_options | slot, args))
                    return self.started[-1]

                return SimpleNamespace(remote=start)

            return SimpleNamespace(options=options)

        return wrap

    def get(self, refs: list[Ref], timeout: float | None = None) -> list:
        if any(r.actor.dead for r in refs):
            raise RayActorError()
        if any(r.value is None for r in refs):
            raise GetTimeoutError()
        return [r.value for r in refs]

    def kill(self, actor: FakeActor, no_restart: bool = True) -> None:
        self.kills.append((actor, no_restart))
        if no_restart or actor.restarts_left == 0:
            actor.dead = True
        else:
            actor.restarts_left -= 1


@pytest.fixture
def ray(monkeypatch) -> FakeRay:
    fake = FakeRay()
    for name in ("remote", "get", "kill"):
        monkeypatch.setattr(pool_module.ray, name, getattr(fake, name))
    monkeypatch.setattr(pool_module.plan, "slot", lambda group, i: {"bundle": (group, i)})
    monkeypatch.setattr(pool_module, "RETRY_BACKOFF_S", 0.0)
    return fake


def make_pool(replicas: int = 2) -> TeacherPool:
    faults = SimpleNamespace(
        max_restarts=3, teacher_retries=1, teacher_timeout_s=1.0, restart_timeout_s=1.0, on_teacher_failure="stop"
    )
    teacher = TeacherConfig(name="t", replicas=replicas)
    return TeacherPool(
        [teacher], CombineConfig(), None, 1.0, 7, {"t": "/teacher"}, "/student", 32, faults, 4, {"t": "g"}, DataConfig()
    )


def test_a_hung_teacher_is_replaced_by_fresh_actors_with_the_same_options(ray):
    pool = make_pool()
    first = list(pool.replicas["t"])
    ray.hangs = 2  # both replicas' shares of the first call hang
    assert pool.generate([[1], [2]], 1, 8, 1.0, None, ["a", "b"]) == ["answer to [1]", "answer to [2]"]
    assert ray.kills == [(a, True) for a in first]  # killed for good: no Ray restart used
    fresh = pool.replicas["t"]
    assert len(ray.started) == 4 and fresh == ray.started[2:]
    assert [(a.options, a.args) for a in fresh] == [(a.options, a.args) for a in first]
    assert [a.options["bundle"] for a in fresh] == [("g", 0), ("g", 1)]  # each in its own placement bundle
    assert [a.args[4] for a in fresh] == [7, 8]  # and with its own seed


def test_more_hangs_than_max_restarts_in_a_run_never_kill_the_teacher_for_good(ray):
    pool = make_pool(replicas=1)
    for call in range(pool.faults.max_restarts + 3):
        ray.hangs = 1
        assert pool.generate([[call]], 1, 8, 1.0, None, ["p"]) == [f"answer to [{call}]"]
    assert len(ray.started) == 1 + pool.faults.max_restarts + 3
    assert all(no_restart for _, no_restart in ray.kills)
    assert pool.replicas["t"][0].restarts_left == pool.faults.max_restarts  # every crash restart still left
