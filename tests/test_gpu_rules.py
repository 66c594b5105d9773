"""The GPU path's rules and wiring, checked on CPU: config refusals, engine arguments, the weight-transfer
handshake and its teardown (vLLM, Ray and the transfer engines faked where they would need a GPU)."""

import os
from types import SimpleNamespace

import pytest
import torch

from opd.config import ConfigError, EngineConfig, load_config
from opd.config.schema import weight_backend

COLOCATED = ["rollout.colocate=true", "rollout.gpus_per_worker=0.5", "learner.gpus_per_shard=0.5"]


def test_colocation_must_fit_one_gpu():
    load_config("default", COLOCATED)
    with pytest.raises(ConfigError, match=r"rollout\.gpus_per_worker=1\.0 \+ learner\.gpus_per_shard=0\.5"):
        load_config("default", [*COLOCATED, "rollout.gpus_per_worker=1"])


@pytest.mark.parametrize(
    "overrides",
    [
        [*COLOCATED, "rollout.weight_sync=nccl"],
        ["rollout.weight_sync=nccl", "rollout.gpus_per_worker=0.5", "learner.gpus_per_shard=1"],
        ["rollout.weight_sync=nccl", "rollout.gpus_per_worker=1", "learner.gpus_per_shard=0.5"],
        ["rollout.weight_sync=nccl"],  # on CPU: no GPU at all
    ],
)
def test_nccl_is_refused_where_transfer_ranks_share_gpus(overrides):
    with pytest.raises(ConfigError, match=r"rollout\.weight_sync=nccl"):
        load_config("default", overrides)


def test_auto_weight_sync_picks_nccl_only_for_whole_gpus():
    whole = ["rollout.gpus_per_worker=1", "learner.gpus_per_shard=1"]
    assert weight_backend(load_config("default", whole)) == "nccl"
    assert weight_backend(load_config("default", [*whole, "rollout.weight_sync=nccl"])) == "nccl"
    shared = ["rollout.gpus_per_worker=0.25", "learner.gpus_per_shard=0.25", "learner.num_shards=1"]
    assert weight_backend(load_config("default", shared)) == "gloo"
    assert weight_backend(load_config("default", COLOCATED)) == "ipc"
    assert weight_backend(load_config("default")) == "gloo"


def test_tensor_parallel_size_must_match_the_gpus_an_engine_holds():
    load_config("default", ["rollout.gpus_per_worker=2", "rollout.engine.tensor_parallel_size=2"])
    load_config("default", ["rollout.gpus_per_worker=0.5"])  # a fraction of one GPU: no sharding
    for overrides in (
        ["rollout.gpus_per_worker=2"],
        ["rollout.gpus_per_worker=0.5", "rollout.engine.tensor_parallel_size=2"],
        ["teachers.0.gpus_per_replica=2"],
    ):
        with pytest.raises(ConfigError, match="tensor_parallel_size"):
            load_config("default", overrides)
    # transformers teachers have no vLLM engine to shard
    load_config("default", ["teachers.0.gpus_per_replica=2", "teachers.0.backend=transformers"])


def _fake_llm(monkeypatch) -> dict:
    import vllm

    made = {}
    monkeypatch.setattr(vllm, "LLM", lambda **kw: made.update(kw))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for key in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_ENABLE_V1_MULTIPROCESSING"):
        monkeypatch.setenv(key, "unset")  # restored afterwards
    return made


def test_tensor_parallel_engines_use_the_multiprocessing_executor_and_kv_cache_bytes_pass_through(monkeypatch):
    from opd.rollout import engine

    made = _fake_llm(monkeypatch)
    engine.make_llm("m", EngineConfig(), 0)
    assert "distributed_executor_backend" not in made and "kv_cache_memory_bytes" not in made
    engine.make_llm("m", EngineConfig(tensor_parallel_size=2, kv_cache_memory_bytes=2**30), 0)
    assert made["distributed_executor_backend"] == "mp" and made["tensor_parallel_size"] == 2
    assert made["kv_cache_memory_bytes"] == 2**30


@pytest.mark.parametrize("backend", ["ipc", "gloo", "nccl"])
def test_ipc_workers_allow_vllm_to_carry_ipc_handles(monkeypatch, backend):
    from opd.rollout import worker

    monkeypatch.delenv("VLLM_ALLOW_INSECURE_SERIALIZATION", raising=False)
    monkeypatch.setattr(worker.vllm_engine, "make_llm", lambda *a, **kw: None)
    monkeypatch.setattr(worker.vllm_engine, "stop_token_ids", lambda model: [0])
    worker.RolloutWorker("m", EngineConfig(), backend, 0, colocate=backend == "ipc")
    assert (os.environ.get("VLLM_ALLOW_INSECURE_SERIALIZATION") == "1") == (backend == "ipc")


class _Handle:
    def __init__(self, seen: list) -> None:
        self.init_weight_transfer_engine = SimpleNamespace(remote=seen.append)


def test_group_client_shifts_ranks_per_engine_and_passes_ipc_handshake_through(monkeypatch):
    import ray

    from opd.rollout.weight_sync import RolloutGroupClient

    monkeypatch.setattr(ray, "get", lambda refs, **kw: refs)
    seen: list = []
    client = RolloutGroupClient([_Handle(seen), _Handle(seen)], ranks_per_engine=2)
    client.init_weight_transfer_engine({"packed": True})  # vLLM's IPC handshake: no ranks
    assert seen == [{"packed": True}] * 2
    seen.clear()
    client.init_weight_transfer_engine({"master_port": 9, "rank_offset": 1, "world_size": 5})
    assert [s["rank_offset"] for s in seen] == [1, 3] and all(s["master_port"] == 9 for s in seen)


def test_ipc_transfer_is_packed_into_a_buffer_that_fits_the_largest_parameter():
    from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

    from opd.rollout.weight_sync import GlooTrainerInitInfo, trainer_init_info

    small = trainer_init_info("ipc", 1, "a", 9, 3, largest_bytes=10)
    assert isinstance(small, IPCTrainerInitInfo) and small.packed and small.packed_buffer_size_bytes == 2**30
    assert not small.is_sender
    assert trainer_init_info("ipc", 0, "a", 9, 3, largest_bytes=2**31).packed_buffer_size_bytes == 2**31
    nccl = trainer_init_info("nccl", 0, "a", 9, 3, 10)
    assert isinstance(nccl, NCCLTrainerInitInfo) and (nccl.master_port, nccl.world_size) == (9, 3)
    assert isinstance(trainer_init_info("gloo", 0, "a", 9, 3, 10), GlooTrainerInitInfo)


def test_reconnecting_the_learner_shuts_the_old_transfer_group_down(monkeypatch):
    from vllm.distributed.weight_transfer import WeightTransferTrainerFactory

    from opd.learner.shard import LearnerShard

    made = []

    class FakeTransfer:
        def __init__(self) -> None:
            self.closed = False

        def shutdown(self) -> None:
            self.closed = True

    def trainer_init(info, *, client, source):
        made.append(FakeTransfer())
        return made[-1]

    monkeypatch.setattr(WeightTransferTrainerFactory, "trainer_init", staticmethod(trainer_init))
    shard = LearnerShard(0, 1, "m", None, None, 1.0, 0.0, 3)
    shard.engine = SimpleNamespace(module=torch.nn.Linear(2, 2))
    shard.init_weight_transfer("a", 9, 2, [object()], "gloo")
    shard.init_weight_transfer("a", 9, 2, [object()], "gloo")
    assert [t.closed for t in made] == [True, False] and shard.transfer is made[1]


def test_a_weight_sync_past_its_deadline_aborts_the_transfer_group():
    """An NCCL broadcast to a dead engine never returns by itself; aborting the communicator ends it."""
    import threading

    from opd.rollout.weight_sync import send_within

    class StuckTransfer:
        def __init__(self) -> None:
            self.aborted = threading.Event()

        def send_weights(self) -> None:
            self.aborted.wait(30)

        def shutdown(self) -> None:
            self.aborted.set()

    stuck = StuckTransfer()
    with pytest.raises(TimeoutError, match="transfer group was aborted"):
        send_within(stuck, 0.2)
    assert stuck.aborted.is_set()
    done = SimpleNamespace(send_weights=lambda: None, shutdown=lambda: pytest.fail("aborted a finished sync"))
    send_within(done, 5)
