"""A dead replay-buffer shard restarts the run from its last checkpoint, as a dead learner shard does.

No Ray: the shards are in-process `ReplayBuffer`s behind fake actor handles (`ray.remote`/`ray.get` replaced), and
the restart loop (`launch.resuming`) runs a fake attempt against a real checkpoint directory.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import ray
from ray.exceptions import ActorDiedError

from launch import resuming
from opd import checkpoint
from opd.buffer.sharded import BufferDied, ShardedBuffer
from opd.learner.group import LearnerDied
from tests.test_pieces import sample


class Handle:
    """A fake actor handle: `handle.method.remote(*args)` is a ref that `get` runs; a dead handle's fail."""

    def __init__(self, shard) -> None:
        self.shard, self.dead = shard, False

    def __getattr__(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(remote=lambda *args: (self, getattr(self.shard, name), args))


def get(refs: list) -> list:
    if any(handle.dead for handle, _, _ in refs):
        raise ActorDiedError()
    return [method(*args) for _, method, args in refs]


@pytest.fixture
def buffer(monkeypatch) -> ShardedBuffer:
    monkeypatch.setattr(ray, "remote", lambda **options: lambda cls: SimpleNamespace(remote=lambda *a: Handle(cls(*a))))
    monkeypatch.setattr(ray, "get", get)
    buf = ShardedBuffer(num_shards=2, capacity=100, max_staleness=4, order="fifo")
    buf.add([sample([i], [1, 2]) for i in range(8)])
    return buf


@pytest.mark.parametrize(
    "call",
    [
        lambda buf, folder: buf.add([sample([1], [2])]),
        lambda buf, folder: buf.take(4, version=0),
        lambda buf, folder: buf.save(folder),
        lambda buf, folder: buf.load(folder),
    ],
    ids=["add", "take", "save", "load"],
)
def test_a_call_on_a_dead_shard_raises_buffer_died(buffer, tmp_path, call):
    buffer.save(tmp_path)
    assert len(buffer.take(100, version=0)[0]) == 8  # alive: every shard answers
    buffer.shards[1].dead = True
    with pytest.raises(BufferDied, match="a replay-buffer shard died") as err:
        call(buffer, tmp_path)
    assert isinstance(err.value.__cause__, ActorDiedError)


def checkpointed(output_dir, round_: int):
    """A published checkpoint of `round_` that `checkpoint.latest` accepts."""
    tmp = checkpoint.begin(output_dir, round_)
    (tmp / "learner").mkdir()
    (tmp / "learner" / "state").write_text("")
    return checkpoint.commit(tmp, {"round": round_}, keep=2)


class Attempt:
    """A run attempt (`launch.attempt`): raises each of `deaths` in turn, then finishes; records where it started."""

    def __init__(self, *deaths: Exception) -> None:
        self.deaths, self.started = list(deaths), []

    def __call__(self, resume) -> dict:
        self.started.append(resume)
        if self.deaths:
            raise self.deaths.pop(0)
        return {"final": "done"}


def test_a_dead_buffer_shard_restarts_every_actor_from_the_newest_checkpoint(tmp_path, capsys):
    checkpointed(tmp_path, 1)
    newest = checkpointed(tmp_path, 2)
    once = Attempt(BufferDied("a replay-buffer shard died (ActorDiedError)"))
    assert resuming(once, None, str(tmp_path), restarts=1) == {"final": "done"}
    assert once.started == [None, newest]
    out = capsys.readouterr().out
    assert f"a replay-buffer shard died (ActorDiedError): restarting every actor from {newest}" in out


def test_buffer_and_learner_deaths_share_the_restart_budget(tmp_path):
    checkpointed(tmp_path, 1)
    once = Attempt(LearnerDied("a learner shard died"), BufferDied("a replay-buffer shard died"))
    with pytest.raises(SystemExit, match="a replay-buffer shard died; no restarts left"):
        resuming(once, None, str(tmp_path), restarts=1)
    assert len(once.started) == 2


def test_a_dead_buffer_shard_without_a_checkpoint_stops_the_run_saying_so(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint to resume from"):
        resuming(Attempt(BufferDied("a replay-buffer shard died")), None, str(tmp_path), restarts=1)
