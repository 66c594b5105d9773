"""The replay buffer without Ray: a shard's order, capacity and staleness, sharding maths, the on-disk format."""

import pickle

import numpy as np
import pytest

from opd.buffer import spill
from opd.buffer.replay import ReplayBuffer, disagreement
from opd.buffer.sample import Samples, from_columns
from opd.buffer.sharded import merge_stats, quotas, shard_of
from tests.test_pieces import sample


def test_shard_serves_fifo_evicts_the_oldest_and_drops_stale_samples():
    buf = ReplayBuffer(capacity=3, max_staleness=1)
    buf.add([sample([1], [2], version=v) for v in (0, 1, 2, 3)])
    assert buf.size() == 3
    taken, stats = buf.take(3, version=3)
    assert [s.version for s in taken] == [2, 3]
    assert stats["dropped_stale"] == 1 and stats["taken"] == 2 and stats["staleness_sum"] == 1
    assert stats["used_at_lag_0"] == 1 and stats["used_at_lag_1"] == 1 and stats["buffer_size"] == 0
    assert stats["evicted"] == 1
    assert buf.take(3, version=3)[1] | {"buffer_size": 0} == {  # counts are per take
        "buffer_size": 0,
        "taken": 0,
        "staleness_sum": 0,
        "dropped_stale": 0,
        "evicted": 0,
    }


def test_disagreement_order_serves_the_samples_furthest_from_the_teacher_first():
    buf = ReplayBuffer(capacity=10, max_staleness=5, order="disagreement")
    gaps = [0.1, 2.0, 0.5]
    for g in gaps:
        s = sample([1], [2, 3], version=0)
        s.teacher_logprobs = s.logprobs - g  # the student is g nats/token above the teacher
        buf.add([s])
    taken, _ = buf.take(2, version=0)
    assert [round(disagreement(s), 3) for s in taken] == [2.0, 0.5]
    assert buf.size() == 1 and disagreement(buf.take(5, version=0)[0][0]) == pytest.approx(0.1)


def test_unknown_order_is_refused():
    with pytest.raises(ValueError, match=r"buffer\.order='lifo'"):
        ReplayBuffer(1, 1, order="lifo")


def test_shards_fill_evenly_and_a_prompt_keeps_its_shard():
    counts = np.bincount([shard_of(i, 4) for i in range(400)], minlength=4)
    assert counts.min() >= 80, counts
    assert shard_of(17, 4) == shard_of(17, 4)


def test_quotas_follow_the_fill_and_never_exceed_it():
    assert quotas(10, [30, 10, 0]) == [8, 2, 0]
    assert quotas(7, [3, 3, 3]) in ([3, 2, 2], [2, 3, 2], [2, 2, 3])
    assert sum(quotas(7, [3, 3, 3])) == 7
    assert quotas(10, [2, 3]) == [2, 3]


def test_merged_stats_add_counts_and_average_staleness_over_taken_samples():
    a = {"taken": 3.0, "staleness_sum": 3.0, "buffer_size": 1.0, "used_at_lag_1": 3.0}
    b = {"taken": 1.0, "staleness_sum": 0.0, "buffer_size": 2.0, "used_at_lag_0": 1.0}
    merged = merge_stats([a, b])
    assert merged == {"mean_staleness": 0.75, "buffer_size": 3.0, "used_at_lag_0": 1.0, "used_at_lag_1": 3.0}


def _assert_same_samples(got_samples, want_samples) -> None:
    for got, want in zip(got_samples, want_samples, strict=True):
        for name, value in vars(want).items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(getattr(got, name), value)
                assert getattr(got, name).dtype == value.dtype, name
            else:
                assert getattr(got, name) == value, name


def _full_and_bare():
    full = sample([1, 2], [3, 4, 5], version=7, k=3)
    full.prompt_index, full.answer, full.teacher = 12, "42", "big"
    full.correction_start, full.judge_score, full.weight, full.advantage_bonus = 1, 0.25, 0.5, -0.1
    bare = sample([9], [], version=2, teacher=False)  # no teacher signal, empty response
    bare.response_ids = np.array([], dtype=np.int64)
    return [full, bare]


def test_spilled_samples_load_back_field_by_field(tmp_path):
    spill.save(_full_and_bare(), tmp_path / "s.safetensors")
    back = spill.load(tmp_path / "s.safetensors")
    assert not (tmp_path / "s.safetensors.tmp").exists()
    _assert_same_samples(back, _full_and_bare())
    assert spill.load(_empty(tmp_path)) == []


def test_samples_cross_processes_as_columns_and_come_back_field_by_field():
    # What Ray does to a `Samples` sent to or returned from an actor: pickle it, by `__reduce__`, as columns.
    reduced = Samples(_full_and_bare()).__reduce__()
    assert reduced[0] is from_columns and len(reduced[1][0]) < 30  # a few arrays, not six per sample
    back = pickle.loads(pickle.dumps(Samples(_full_and_bare()), protocol=5))
    assert type(back) is Samples  # forwarded again (buffer -> learner) as columns too
    _assert_same_samples(back, _full_and_bare())
    assert pickle.loads(pickle.dumps(Samples())) == []


def _empty(tmp_path):
    spill.save([], tmp_path / "e.safetensors")
    return tmp_path / "e.safetensors"


def test_a_shard_saves_and_reloads_its_contents(tmp_path):
    buf = ReplayBuffer(capacity=5, max_staleness=1)
    buf.add([sample([1], [2], version=v) for v in (0, 1)])
    buf.save(str(tmp_path / "shard.safetensors"))
    other = ReplayBuffer(capacity=5, max_staleness=1)
    assert other.load(str(tmp_path / "shard.safetensors")) == 2
    assert [s.version for s in other.take(5, version=1)[0]] == [0, 1]
    assert other.load(str(tmp_path / "missing.safetensors")) == 0
