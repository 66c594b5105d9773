"""Unit tests of the plain functions behind the actors (no Ray, no vLLM engines)."""

import math

import numpy as np
import pytest
import torch

from opd.buffer.sample import Sample
from opd.learner import objective
from opd.learner.batch import collate
from opd.partition import chunks
from opd.secrets import redact


def sample(prompt, response, version=0, teacher=True, k=2):
    r = len(response)
    s = Sample(np.array(prompt), np.array(response), np.full(r, -1.0, np.float32), version)
    if teacher:
        s.teacher_logprobs = np.full(r, -0.5, np.float32)
        s.teacher_topk_ids = np.tile(np.arange(k), (r, 1))
        s.teacher_topk_logprobs = np.full((r, k), -0.7, np.float32)
    return s


def test_collate_aligns_per_token_fields_to_targets():
    batch = collate([sample([5, 6], [7, 8, 9]), sample([5], [4])], pad_id=0, top_k=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 4, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    # entry t scores input_ids[t+1]: the response tokens 7, 8, 9 sit at t = 1, 2, 3
    assert batch["mask"].tolist() == [[0, 1, 1, 1], [1, 0, 0, 0]]
    assert batch["old_logprobs"][0].tolist() == [0, -1, -1, -1]
    assert batch["teacher_logprobs"][1].tolist() == [-0.5, 0, 0, 0]
    assert batch["topk_logprobs"].shape == (2, 4, 2)
    assert torch.isinf(batch["topk_logprobs"][1, 1]).all()


def test_collate_without_teacher_signal_has_no_teacher_fields():
    batch = collate([sample([1], [2], teacher=False)], pad_id=0, top_k=2)
    assert "teacher_logprobs" not in batch and batch["mask"].tolist() == [[1]]


def test_chunks_are_contiguous_and_near_equal():
    assert chunks(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert chunks([1], 3) == [[1], [], []]


def test_objective_registry_rejects_duplicates_and_names_known_losses():
    with pytest.raises(ValueError, match="already registered"):
        objective.OBJECTIVES.register("reverse_kl")(lambda *a: None)
    with pytest.raises(KeyError, match=r"loss\.type 'nope'; valid: jsd, reverse_kl, sft, topk_kl"):
        objective.OBJECTIVES.get("nope")


@pytest.mark.parametrize("name", ["reverse_kl", "jsd", "topk_kl", "sft"])
def test_every_objective_gives_a_finite_differentiable_loss(name):
    from opd.config import LossConfig

    batch = collate([sample([1, 2], [3, 1, 2]), sample([2], [3, 3])], pad_id=0, top_k=2)
    logits = torch.randn(2, batch["mask"].shape[1], 5, requires_grad=True)
    loss, metrics = objective.OBJECTIVES.get(name)(logits, batch, LossConfig(top_k=2), 1.0)
    loss.backward()
    assert torch.isfinite(loss) and logits.grad.abs().sum() > 0
    # padding positions get no gradient
    assert logits.grad[1, 2:].abs().sum() == 0
    assert all(np.isfinite(v) for v in metrics.values())


def test_reverse_kl_objective_reports_the_sampled_reverse_kl():
    from opd.config import LossConfig

    batch = collate([sample([1], [2, 3])], pad_id=0, top_k=2)
    _, metrics = objective.OBJECTIVES.get("reverse_kl")(torch.zeros(1, 2, 4), batch, LossConfig(), 1.0)
    assert metrics["reverse_kl"] == pytest.approx(-1.0 - -0.5)


@pytest.mark.parametrize("name", ["reverse_kl", "jsd", "topk_kl", "sft"])
def test_objectives_on_the_students_samples_report_the_sync_check(name):
    """|learner - sampler| log-prob of the sampled tokens: uniform logits over 4 ids against the sampler's -1.
    SFT trains on tokens someone else wrote, so it has no sync to check."""
    from opd.config import LossConfig

    batch = collate([sample([1], [2, 3])], pad_id=0, top_k=2)
    _, metrics = objective.OBJECTIVES.get(name)(torch.zeros(1, 2, 4), batch, LossConfig(top_k=2), 1.0)
    if name == "sft":
        assert "sampler_learner_logprob_gap" not in metrics
    else:
        assert metrics["sampler_learner_logprob_gap"] == pytest.approx(math.log(4) - 1.0)


def test_redact_hides_credentials_at_any_depth():
    out = redact({"wandb": {"api_key": "abc", "project": "p"}, "token": "t", "lr": 1})
    assert out == {"wandb": {"api_key": "***", "project": "p"}, "token": "***", "lr": 1}


def test_plan_refuses_a_cluster_too_small_naming_every_role():
    from opd.config import load_config
    from opd.plan import PlanError, check_fit, needs

    cfg = load_config("default", ["learner.gpus_per_shard=1", "rollout.gpus_per_worker=1"])
    assert needs(cfg) == {"CPU": 5.0, "GPU": 4.0}
    check_fit(cfg, {"CPU": 8.0, "GPU": 4.0})
    with pytest.raises(PlanError, match=r"4 GPU needed, 2 in the cluster(.|\n)*learner\.num_shards x learner"):
        check_fit(cfg, {"CPU": 8.0, "GPU": 2.0})
    with pytest.raises(PlanError, match="5 CPU needed, 1 in the cluster"):
        check_fit(cfg, {"CPU": 1.0, "GPU": 4.0})


def test_actors_keep_freed_memory_only_on_a_run_without_gpus():
    from opd.config import load_config
    from opd.plan import KEEP_FREED_MEMORY, actor_env

    assert actor_env(load_config("default", [])) == KEEP_FREED_MEMORY
    assert actor_env(load_config("default", ["ray.keep_freed_memory=false"])) == {}
    assert actor_env(load_config("default", ["learner.gpus_per_shard=1"])) == {}


def test_kept_memory_is_reused_instead_of_faulted_in_again():
    """What `ray.keep_freed_memory` buys, on this machine's glibc: a training-like step (128 MB activations, freed
    at its end) faults its activations in again, zeroed page by page, on every repeat by default (4 x 32,768
    pages); with the settings, once the heap has grown to the step's high-water mark, mostly not."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from opd.plan import KEEP_FREED_MEMORY

    code = (
        "import resource, torch\n"
        "w, x = torch.randn(256, 8192, requires_grad=True), torch.randn(4096, 256)\n"
        "for i in range(8):\n"
        "    if i == 2: start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    torch.log_softmax(x @ w, dim=-1).mean().backward()\n"
        "    w.grad = None\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)\n"
    )

    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[always]" in thp.read_text():
        pytest.skip("transparent huge pages for every mapping: the counts below assume 4-KiB pages")

    def faults(extra: dict[str, str]) -> int:
        env = {k: v for k, v in os.environ.items() if k not in KEEP_FREED_MEMORY} | extra
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        return int(run.stdout)

    default, kept = faults({}), faults(KEEP_FREED_MEMORY)
    assert default > 6 * 4 * 32768 * 0.9  # the last 6 steps: every 128 MB activation faulted in again
    assert kept < default / 2


def test_placement_bundles_per_role_and_colocation_shares_them():
    from opd.config import ConfigError, load_config
    from opd.plan import bundles

    cfg = load_config("default", ["learner.gpus_per_shard=1", "rollout.gpus_per_worker=0.5"])
    out = bundles(cfg)
    assert set(out) == {"rollout", "teacher:addition", "learner"}
    assert out["learner"] == [{"CPU": 1.0, "GPU": 1.0}] * 2 and out["rollout"] == [{"CPU": 1.0, "GPU": 0.5}] * 2
    shared = bundles(
        load_config("default", ["learner.gpus_per_shard=0.5", "rollout.gpus_per_worker=0.5", "rollout.colocate=true"])
    )
    assert set(shared) == {"rollout", "teacher:addition"} and shared["rollout"] == [{"CPU": 2.0, "GPU": 1.0}] * 2
    with pytest.raises(ConfigError, match=r"weight_sync=ipc .*rollout\.colocate=true"):
        load_config("default", ["rollout.weight_sync=ipc"])
    with pytest.raises(ConfigError, match=r"rollout\.colocate .*GPU"):
        load_config("default", ["rollout.colocate=true"])
    with pytest.raises(ConfigError, match=r"rollout\.num_workers=1 must equal learner\.num_shards=2"):
        load_config(
            "default",
            [
                "rollout.colocate=true",
                "rollout.gpus_per_worker=0.5",
                "learner.gpus_per_shard=0.5",
                "rollout.num_workers=1",
            ],
        )


def test_driver_env_leaves_out_what_a_submitted_job_already_sets(monkeypatch):
    import json

    from launch import driver_env_vars

    defaults = {"TOKENIZERS_PARALLELISM": "false", "OTHER": "1"}
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert driver_env_vars(defaults) == defaults
    job = {"runtime_env": {"working_dir": "gcs://x.zip", "env_vars": {"TOKENIZERS_PARALLELISM": "true"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    assert driver_env_vars(defaults) == {"OTHER": "1"}


def test_the_report_names_each_eval_set_when_there_are_several(capsys):
    from launch import report

    figures = {"teacher_accuracy": 1.0, "student_accuracy_before": 0.5, "student_accuracy_after": None}
    held_out = figures | {"reverse_kl_before": 0.8, "reverse_kl_after": 0.01}
    train = figures | {"student_accuracy_after": 0.994, "reverse_kl_before": 0.7, "reverse_kl_after": 0.007}
    report({"eval_sets": {"held_out": held_out, "train": train}, "student_path": "/ckpt"})
    out = capsys.readouterr().out
    assert "student accuracy on held_out 0.500 -> n/a\n" in out
    assert "student accuracy on train 0.500 -> 0.994\n" in out
    assert "reverse KL (student||teacher, nats/token) on train 0.700 -> 0.007\n" in out
    assert out.endswith("student checkpoint: /ckpt\n")
    report({"eval_sets": {"": held_out}, "student_path": "/ckpt"})  # one set: the lines README shows, unnamed
    assert "\nteacher accuracy 1.000\nstudent accuracy 0.500 -> n/a\n" in capsys.readouterr().out


def test_cpu_engines_get_the_configured_thread_binding_and_process(monkeypatch):
    """vLLM's `auto` binding would pin every engine on a node to the same cores, and its engine-core process
    would busy-poll beside the actor; opd passes its own settings."""
    import vllm

    from opd.config import EngineConfig
    from opd.rollout import engine

    made = {}
    env = engine.os.environ
    monkeypatch.setattr(
        vllm,
        "LLM",
        lambda **kw: made.update(kw, bind=env["VLLM_CPU_OMP_THREADS_BIND"], mp=env["VLLM_ENABLE_V1_MULTIPROCESSING"]),
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # restored afterwards, like the binding
    for bind, in_process in (("nobind", True), ("0-1", False)):
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "auto")
        monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "unset")
        engine.make_llm("some/model", EngineConfig(cpu_threads_bind=bind, cpu_in_process=in_process), seed=3)
        assert made["bind"] == bind and made["model"] == "some/model" and made["seed"] == 3
        assert made["mp"] == ("0" if in_process else "1")
        assert made["enable_chunked_prefill"] is False  # a split seeded prompt crashes vLLM's CPU sampler
    assert EngineConfig().cpu_threads_bind == "nobind" and EngineConfig().cpu_in_process


def test_an_eager_cpu_engine_starts_without_compiling_or_walking_the_imports(monkeypatch):
    """vLLM compiles a sampler helper with inductor at its first log-probs (2.2 s) and collects garbage over every
    imported object while it starts (1.1 s): an eager CPU engine does neither. One that is to compile keeps both."""
    import gc

    import torch._dynamo
    import vllm

    from opd.config import EngineConfig
    from opd.rollout import engine

    seen = []
    monkeypatch.setattr(vllm, "LLM", lambda **kw: seen.append((kw["enforce_eager"], torch._dynamo.config.disable)))
    monkeypatch.setattr(gc, "freeze", lambda: seen.append("frozen"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TORCH_COMPILE_DISABLE", "0")
    for eager in (False, None):  # None: eager, as on every CPU
        monkeypatch.setattr(torch._dynamo.config, "disable", False)
        engine.make_llm("some/model", EngineConfig(enforce_eager=eager), seed=3)
    assert seen == [(False, False), "frozen", (True, True)]
    assert engine.os.environ["TORCH_COMPILE_DISABLE"] == "1"  # for an engine core in a process of its own


def test_teacher_signal_crosses_processes_as_three_flat_arrays():
    import pickle

    from opd.rollout.engine import Scored, ScoredBatch

    rng = np.random.default_rng(0)
    batch = ScoredBatch(
        Scored(
            rng.random(r).astype(np.float32),
            rng.integers(0, 9, (r, 3), np.int32),
            rng.random((r, 3)).astype(np.float16),
        )
        for r in (4, 0, 2)  # an empty response among them
    )
    _, (lengths, *flat) = batch.__reduce__()
    assert lengths.tolist() == [4, 0, 2] and [f.shape for f in flat] == [(6,), (6, 3), (6, 3)]
    back = pickle.loads(pickle.dumps(batch, protocol=5))
    assert type(back) is ScoredBatch and len(back) == 3
    for got, want in zip(back, batch, strict=True):
        for name in ("logprobs", "topk_ids", "topk_logprobs"):
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
            assert getattr(got, name).dtype == getattr(want, name).dtype
    assert pickle.loads(pickle.dumps(ScoredBatch())) == []


def test_request_seeds_are_distinct_reproducible_and_apart_from_the_next_calls():
    from opd.rollout.engine import request_seeds

    seeds = request_seeds(5, 64)
    assert len(set(seeds)) == 64 and all(0 <= s < 2**31 for s in seeds)
    assert request_seeds(5, 64) == seeds and request_seeds(None, 3) == [None] * 3
    # vLLM seeds sample k of a request with seed + k: the next call's streams must not be this one's shifted
    streams = {s + k for s in seeds for k in range(8)}
    assert not streams & {s + k for s in request_seeds(6, 64) for k in range(8)}


def test_learner_metrics_average_over_the_parts_that_report_them():
    from opd.learner.group import mean_metrics

    parts = [{"loss": 1.0, "correction_sft_nll": 2.0}, {"loss": 3.0}]  # the second shard had no corrected sample
    assert mean_metrics(parts) == {"loss": 2.0, "correction_sft_nll": 2.0}
