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


def test_a_weight_sync_past_its_deadline_aborts_the_transfer_group_and_finishes_the_gathers():
    """An NCCL broadcast to a stuck engine never returns by itself; aborting the communicator ends it (the send
    raises), the source then joins the gathers the other learner ranks wait in, and the driver is told to replace
    the rollout group (WeightSendTimeout)."""
    import threading

    from opd.learner.group import WeightSendTimeout
    from opd.rollout.weight_sync import send_within

    class StuckTransfer:
        def __init__(self) -> None:
            self.aborted = threading.Event()
            self.source = SimpleNamespace(finished=[], finish_after_failure=lambda: self.source.finished.append(1))

        def send_weights(self) -> None:
            self.aborted.wait(30)
            raise RuntimeError("NCCL communicator was aborted")

        def shutdown(self) -> None:
            self.aborted.set()

    stuck = StuckTransfer()
    with pytest.raises(WeightSendTimeout, match="transfer group was aborted"):
        send_within(stuck, 0.2)
    assert stuck.aborted.is_set() and stuck.source.finished == [1]
    source = SimpleNamespace(finish_after_failure=lambda: pytest.fail("finished a sync that went through"))
    done = SimpleNamespace(send_weights=lambda: None, source=source, shutdown=lambda: pytest.fail("aborted"))
    send_within(done, 5)


def test_a_send_stopped_part_way_joins_the_gathers_it_did_not_reach(monkeypatch):
    """ZeRO-3 gathers a layer at a time on every learner rank; rank 0 stopped sending after the first group (its
    receiver gone) must still go through the other groups' gathers, or the other ranks wait in the next one."""
    import deepspeed
    import torch

    from opd.learner.weights import ZeroWeightSource

    entered: list[int] = []

    class Gathered:
        def __init__(self, params, modifier_rank=None) -> None:
            self.params = params

        def __enter__(self) -> None:
            if fail_at is not None and len(entered) == fail_at:
                raise RuntimeError("gloo: connection reset by peer")
            entered.append(len(self.params))

        def __exit__(self, *exc) -> None:
            pass

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", Gathered)
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.embed_tokens = torch.nn.Embedding(4, 2)
    model.model.layers = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(3))
    source = ZeroWeightSource(model)
    assert len(source.groups()) == 4

    fail_at = None
    sending = source.iter_groups()
    next(sending)  # the first group went out, then the broadcast failed
    assert source.finish_after_failure() == 3 and entered == [1, 2, 2, 2]
    assert source.finish_after_failure() == 0  # nothing left
    entered.clear()
    assert len(list(source.iter_groups())) == 4 and source.finish_after_failure() == 0  # a whole send: none left

    entered.clear()
    source.start_send()  # a send that failed before its first gather (a worker's RPC): every gather is owed
    assert source.finish_after_failure() == 4 and entered == [1, 2, 2, 2]

    entered.clear()
    fail_at = 1  # the second gather itself failed (a learner rank died): there is no collective left to join
    with pytest.raises(RuntimeError, match="connection reset"):
        list(source.iter_groups())
    assert source.finish_after_failure() == 0 and entered == [1]


class _RecordingLLM:
    """A vLLM `LLM` that records the calls a rollout worker makes on it."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: self.calls.append((name, *args, *sorted(kwargs.items())))


def _worker(monkeypatch, colocate: bool):
    from opd.rollout import worker

    llm = _RecordingLLM()
    monkeypatch.setattr(worker.vllm_engine, "make_llm", lambda *a, **kw: llm)
    monkeypatch.setattr(worker.vllm_engine, "stop_token_ids", lambda model: [0])
    monkeypatch.setattr(worker.vllm_engine, "sample", lambda llm, prompts, *a: [[] for _ in prompts])
    return worker.RolloutWorker("m", EngineConfig(), "ipc", 0, colocate=colocate), llm


def test_colocated_engines_discard_weights_and_wake_the_kv_cache_only_after_the_sync(monkeypatch):
    """Level 2: the sync overwrites every weight, so level 1's GPU->CPU->GPU copy each round was wasted."""
    w, llm = _worker(monkeypatch, colocate=True)
    w.sleep()
    w.wake_up()
    with pytest.raises(RuntimeError, match="weight sync must follow"):
        w.generate([[1]], [{}], 1, 4, 1.0, 0)
    w.start_weight_update()
    w.update_weights({"names": []})
    w.finish_weight_update("3")
    assert llm.calls == [
        ("sleep", ("level", 2)),
        ("wake_up", ("tags", ["weights"])),
        ("start_weight_update",),
        ("update_weights", {"update_info": {"names": []}}),
        ("finish_weight_update", "3"),
        ("wake_up", ("tags", ["kv_cache"])),
        ("reset_prefix_cache",),
    ]
    assert w.version == 3 and w.generate([[1]], [{}], 1, 4, 1.0, 0)[0] == []


def test_a_sync_straight_after_sleep_wakes_the_weights_first_and_awake_engines_wake_nothing(monkeypatch):
    w, llm = _worker(monkeypatch, colocate=True)
    w.sleep()
    w.start_weight_update()
    assert llm.calls[1:] == [("wake_up", ("tags", ["weights"])), ("start_weight_update",)]
    w, llm = _worker(monkeypatch, colocate=False)
    w.start_weight_update()
    w.finish_weight_update(None)
    assert [c[0] for c in llm.calls] == ["start_weight_update", "finish_weight_update", "reset_prefix_cache"]


@pytest.mark.parametrize(
    ("gpus", "engine", "expected"),
    [
        (0, EngineConfig(), (True, 0.1)),
        (1, EngineConfig(), (False, 0.9)),
        (2, EngineConfig(), (False, 0.9)),
        (0.5, EngineConfig(), (False, 0.45)),
        (1, EngineConfig(enforce_eager=True, gpu_memory_utilization=0.6), (True, 0.6)),
        (0, EngineConfig(enforce_eager=False, gpu_memory_utilization=0.2), (False, 0.2)),
    ],
)
def test_engine_defaults_follow_the_device_the_actor_reserved(gpus, engine, expected):
    from opd.rollout.engine import device_settings

    got = device_settings(engine, gpus)
    assert (got["enforce_eager"], got["gpu_memory_utilization"]) == pytest.approx(expected)


def test_make_llm_resolves_the_engine_defaults_from_the_reservation(monkeypatch):
    from opd import devices
    from opd.rollout import engine

    made = _fake_llm(monkeypatch)
    monkeypatch.setattr(devices, "reserved_gpus", lambda: 1.0)
    engine.make_llm("m", EngineConfig(), 0)
    assert (made["enforce_eager"], made["gpu_memory_utilization"]) == (False, 0.9)
    monkeypatch.setattr(devices, "reserved_gpus", lambda: 0.0)
    engine.make_llm("m", EngineConfig(), 0)
    assert (made["enforce_eager"], made["gpu_memory_utilization"]) == (True, 0.1)


def _ds_config(stage: int, bf16: bool) -> dict:
    return {"zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16}, "train_micro_batch_size_per_gpu": 1}


def test_the_student_loads_in_the_dtype_it_trains_in():
    """A bf16 GPU shard never holds an fp32 copy of the whole model on the host; a CPU shard stays fp32."""
    from opd.devices import learner_bf16
    from opd.learner.shard import load_dtype

    assert load_dtype(_ds_config(2, learner_bf16(True, gpus=1))) == torch.bfloat16
    assert load_dtype(_ds_config(3, learner_bf16(True, gpus=0))) == torch.float32
    assert load_dtype(_ds_config(3, learner_bf16(False, gpus=1))) == torch.float32


def test_zero3_loads_under_partitioned_init_and_other_stages_do_not():
    from transformers.integrations import deepspeed_config, is_deepspeed_zero3_enabled

    from opd.learner.shard import partitioned_loading

    assert partitioned_loading(_ds_config(2, True)) is None and not is_deepspeed_zero3_enabled()
    held = partitioned_loading(_ds_config(3, True))
    assert is_deepspeed_zero3_enabled() and deepspeed_config()["bf16"]["enabled"]  # zero.Init's config and dtype
    del held
    assert not is_deepspeed_zero3_enabled()


@pytest.mark.parametrize(
    ("stage", "gpus", "dtype", "partitioned"), [(3, 1, torch.bfloat16, True), (2, 0, torch.float32, False)]
)
def test_build_engine_loads_the_student_as_decided(monkeypatch, stage, gpus, dtype, partitioned):
    import deepspeed
    import transformers
    from transformers.integrations import is_deepspeed_zero3_enabled

    from opd.config.training import LearnerConfig
    from opd.devices import learner_bf16
    from opd.learner.shard import LearnerShard

    seen = {}

    def from_pretrained(path, dtype):
        seen.update(dtype=dtype, partitioned=is_deepspeed_zero3_enabled())
        return torch.nn.Linear(2, 2)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda path: None)
    monkeypatch.setattr(deepspeed, "initialize", lambda model, **kw: (model, None, None, None))
    cfg = LearnerConfig(zero_stage=stage, gpus_per_shard=gpus)
    shard = LearnerShard(0, 1, "m", cfg, None, 1.0, 0.0, 3)
    shard.build_engine(_ds_config(stage, learner_bf16(cfg.bf16, gpus)), 10)
    assert seen == {"dtype": dtype, "partitioned": partitioned}
