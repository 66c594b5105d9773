"""LoRA on the student: the merged weights the engines get and the saved student, against PEFT's own merge."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from opd.config import ConfigError, load_config
from opd.config.training import LoraConfig
from opd.learner import lora
from opd.learner.weights import MergedSource
from tests.stack import ROOT, launch, tiny_overrides


def tiny_lora_model(targets: list[str]) -> torch.nn.Module:
    cfg = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = lora.wrap(AutoModelForCausalLM.from_config(cfg), LoraConfig(rank=4, alpha=8, target_modules=targets))
    with torch.no_grad():  # lora_B starts at zero: give the adapters something to merge
        for name, p in model.named_parameters():
            if lora.is_adapter(name):
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("targets", [LoraConfig().target_modules, ["all-linear"]])
def test_merged_tensors_equal_peft_merge_and_unload(targets):
    model = tiny_lora_model(targets)
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    source = MergedSource(model)
    sent = dict(source)
    assert [m.name for m in source.metadata()] == list(sent)
    assert set(sent) <= set(expected)
    assert any(n.endswith("q_proj.weight") for n in source.layers)
    for name, tensor in sent.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6)
    # Only the adapters train; the model itself is not merged in place.
    assert all(lora.is_adapter(n) == p.requires_grad for n, p in model.named_parameters())
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_saved_student_is_the_merged_base_model(tmp_path):
    model = tiny_lora_model(LoraConfig().target_modules)
    source = MergedSource(model)
    gathered = {id(source.params[n]): t.clone() for n, t in source}
    base, state = lora.base_state(model)
    state = {k: gathered.get(id(v), v.detach()) for k, v in state.items()}
    base.save_pretrained(tmp_path, state_dict=state)
    lora.save_adapter(model, tmp_path / "adapter", write=True)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "Qwen2ForCausalLM"
    assert not any(lora.is_adapter(n) for n, _ in loaded.named_parameters())
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4


@pytest.mark.parametrize(
    "override",
    ["learner.lora.rank=-1", "learner.lora.alpha=0", "learner.lora.dropout=1", "learner.lora.target_modules=[]"],
)
def test_bad_lora_keys_are_named(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config("default", [override])


ZERO_SCRIPT = """
import sys, torch
from safetensors.torch import load_file
from opd.config import load_config
from opd.learner.shard import LearnerShard
model, out = sys.argv[1:]
for stage in (0, 1, 2, 3):
    cfg = load_config("default", [f"learner.zero_stage={stage}", "learner.lora.rank=4", "learner.micro_batch_size=2"])
    shard = LearnerShard(0, 1, model, cfg.learner, cfg.loss, 1.0, 0.0, 3)
    shard.setup("127.0.0.1", 29500, 2, 10)
    params = shard.engine.module.named_parameters()
    sizes = {n: (p.ds_numel if stage == 3 else p.numel(), p.requires_grad) for n, p in params}
    trainable = sum(k for k, grad in sizes.values() if grad)
    assert trainable == sum(k for n, (k, _) in sizes.items() if "lora_" in n) < sum(k for k, _ in sizes.values())
    if stage < 3:  # the optimizer's (flattened, under ZeRO) state covers just them
        assert sum(p.numel() for g in shard.engine.optimizer.param_groups for p in g["params"]) == trainable
    before = dict(shard.weight_source())
    before = {n: t.clone() for n, t in before.items()}
    for _ in range(2):
        loss = shard.engine(input_ids=torch.arange(16).view(2, 8)).logits.log_softmax(-1)[..., 3].mean()
        shard.engine.backward(loss)
        shard.engine.step()
    after = {n: t.clone() for n, t in shard.weight_source()}
    changed = {n for n in after if not torch.equal(before[n], after[n])}
    assert changed and changed <= set(shard.weight_source().layers), (stage, changed)
    shard.save_state(f"{out}/state{stage}")
    assert shard.load_state(f"{out}/state{stage}") == 0
    assert all(torch.equal(t, after[n]) for n, t in shard.weight_source())
    shard.save(f"{out}/student{stage}")
    saved = load_file(f"{out}/student{stage}/model.safetensors")
    assert all(torch.equal(saved[n], t) for n, t in after.items() if n in saved), stage
    assert changed <= set(saved), stage
    print("STAGE", stage, flush=True)
"""


def test_lora_trains_checkpoints_and_saves_under_every_zero_stage(tiny_assets, tmp_path):
    """One rank on gloo: only adapted weights move, a DeepSpeed checkpoint restores them, the save is merged."""
    cmd = [sys.executable, "-c", ZERO_SCRIPT, str(tiny_assets["student"]), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("STAGE") == 4
    for stage in range(4):
        assert (tmp_path / f"student{stage}" / "adapter" / "adapter_config.json").exists()


def reachable_teacher(student: Path, out: Path) -> Path:
    """The student with a random rank-8 change to every weight LoRA adapts: a teacher LoRA can reach exactly.

    The tiny teacher of conftest.py is peaked through its scaled embeddings, which LoRA does not adapt (and the
    final norm undoes any scaling the adapted layers could give), so a LoRA student closes little of that gap.
    """
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(student)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, w in model.named_parameters():
            if any(name.endswith(f"{m}.weight") for m in LoraConfig().target_modules):
                a = torch.randn(w.shape[0], 8, generator=gen)
                b = torch.randn(8, w.shape[1], generator=gen)
                w.add_(a @ b / 8)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(student).save_pretrained(out)
    return out


@pytest.mark.integration
def test_lora_run_trains_syncs_merged_weights_and_saves_a_merged_student(tiny_assets, tmp_path, shared_ray):
    teacher = reachable_teacher(tiny_assets["student"], tmp_path / "teacher")
    overrides = [*tiny_overrides(tiny_assets, tmp_path), "rollout.num_workers=1", "learner.num_shards=2"]
    summary = launch(
        [*overrides, f"teachers.0.model={teacher}", "learner.zero_stage=3", "learner.lora.rank=8", "rounds=3"],
        ray_address=shared_ray,
    )
    trained = [r for r in summary["rounds"] if "learner/loss" in r]
    gaps = [r.get("learner/sampler_learner_logprob_gap", 1.0) for r in trained]
    assert len(gaps) == 3 and max(gaps) < 1e-4, summary["rounds"]  # the engines sample with the merged weights
    final = summary["final"]
    assert final["reverse_kl_after"] < 0.8 * final["reverse_kl_before"], final

    path = Path(final["student_path"])
    assert (path / "adapter" / "adapter_config.json").exists()
    student = AutoModelForCausalLM.from_pretrained(path)
    before = AutoModelForCausalLM.from_pretrained(tiny_assets["student"])
    assert type(student) is type(before)
    assert student.state_dict().keys() == before.state_dict().keys()
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, before.state_dict()[k])]
    assert changed and all(k.endswith("proj.weight") for k in changed), changed  # only what LoRA adapts
