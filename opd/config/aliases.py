"""TRL's and verl's names for opd's keys, in one table: docs/config.md prints it, and loading a config turns an
unknown key that is one of them into a "did you mean" (opd/config/load.py).

TRL's names are those of `TrainingArguments`, `GKDConfig` and `DistillationConfig`; verl's are the dotted keys
of its `ppo_trainer.yaml`. tests/test_config_reference.py checks that every opd key named here exists.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Alias:
    source: str
    """The framework that uses the name: TRL or verl."""
    key: str
    """opd's key for it."""
    note: str = ""
    """How the meaning differs, when it does (shown in the docs and after the "did you mean")."""
    values: Mapping[str, str] = field(default_factory=dict)
    """Foreign value -> opd value, where they are spelled differently."""
    same_value: bool = True
    """Whether any other value means the same in opd; if not, the hint names the key without a value."""


def _trl(key: str, note: str = "", values: Mapping[str, str] | None = None, same_value: bool = True) -> Alias:
    return Alias("TRL", key, note, values or {}, same_value)


def _verl(key: str, note: str = "", values: Mapping[str, str] | None = None, same_value: bool = True) -> Alias:
    return Alias("verl", key, note, values or {}, same_value)


ROUNDS_PER_EPOCH = "a pass over data.train is its size / rollout.prompts_per_round rounds"

ALIASES: dict[str, Alias] = {
    # TRL: TrainingArguments
    "learning_rate": _trl("learner.lr"),
    "lr_scheduler_type": _trl("learner.lr_schedule", "opd has constant, linear and cosine"),
    "warmup_steps": _trl("learner.warmup_steps", "optimizer steps; TRL reads a value below 1 as a fraction of them"),
    "weight_decay": _trl("learner.weight_decay"),
    "max_grad_norm": _trl("learner.grad_clip"),
    "per_device_train_batch_size": _trl(
        "learner.micro_batch_size", "an optimizer step takes a round's samples / learner.mini_batches"
    ),
    "gradient_accumulation_steps": _trl(
        "learner.mini_batches",
        "no such key: each shard accumulates the micro-batches of its share of a step, and a step is a round's "
        "samples / learner.mini_batches",
        same_value=False,
    ),
    "gradient_checkpointing": _trl("learner.gradient_checkpointing"),
    "bf16": _trl("learner.bf16"),
    "max_steps": _trl("rounds", "a round takes learner.mini_batches optimizer steps (1 by default)"),
    "num_train_epochs": _trl("rounds", ROUNDS_PER_EPOCH, same_value=False),
    "seed": _trl("seed"),
    "output_dir": _trl("output_dir"),
    "save_steps": _trl("checkpoint.every", "counted in rounds"),
    "save_total_limit": _trl("checkpoint.keep"),
    "eval_steps": _trl("eval.every", "counted in rounds"),
    "resume_from_checkpoint": _trl(
        "resume", "auto, or a run directory (its newest checkpoint)", {"True": "auto", "true": "auto"}, False
    ),
    "report_to": _trl("wandb.mode", "online, offline or disabled", {"wandb": "online", "none": "disabled"}, False),
    "run_name": _trl("wandb.name"),
    # TRL: scripts' model arguments, GKDConfig, DistillationConfig
    "model_name_or_path": _trl("student.model"),
    "teacher_model_name_or_path": _trl("teachers.0.model"),
    "lmbda": _trl(
        "mode",
        "GKD's fraction of student-generated batches; opd's mode=on_policy is lmbda=1, and it mixes in no dataset "
        "completions",
        {"1": "on_policy", "1.0": "on_policy"},
        False,
    ),
    "seq_kd": _trl(
        "mode",
        "mode=offline with loss.type=sft trains on teacher samples",
        {"True": "offline", "true": "offline"},
        False,
    ),
    "beta": _trl("loss.beta", "used by loss.type=jsd, GKD's generalized JSD; the default reverse_kl ignores it"),
    "temperature": _trl("rollout.temperature"),
    "max_new_tokens": _trl("rollout.max_new_tokens"),
    "max_completion_length": _trl("rollout.max_new_tokens"),
    "vllm_gpu_memory_utilization": _trl("rollout.engine.gpu_memory_utilization"),
    "vllm_max_model_length": _trl("rollout.engine.max_model_len"),
    "vllm_tensor_parallel_size": _trl("rollout.engine.tensor_parallel_size"),
    # verl: data
    "data.train_files": _verl("data.train", "one file"),
    "data.val_files": _verl("data.eval", "one file, or named sets {name: FILE}"),
    "data.prompt_key": _verl("data.prompt_key"),
    "data.max_response_length": _verl("rollout.max_new_tokens"),
    "data.train_batch_size": _verl("rollout.prompts_per_round"),
    # verl: actor_rollout_ref
    "actor_rollout_ref.model.path": _verl("student.model"),
    "actor_rollout_ref.model.enable_gradient_checkpointing": _verl("learner.gradient_checkpointing"),
    "actor_rollout_ref.actor.optim.lr": _verl("learner.lr"),
    "actor_rollout_ref.actor.optim.lr_warmup_steps": _verl(
        "learner.warmup_steps", "opd has no ratio: verl's -1 defers to lr_warmup_steps_ratio", {"-1": "0"}
    ),
    "actor_rollout_ref.actor.optim.min_lr_ratio": _verl("learner.min_lr_ratio"),
    "actor_rollout_ref.actor.optim.warmup_style": _verl("learner.lr_schedule", "opd has constant, linear and cosine"),
    "actor_rollout_ref.actor.optim.weight_decay": _verl("learner.weight_decay"),
    "actor_rollout_ref.actor.grad_clip": _verl("learner.grad_clip"),
    "actor_rollout_ref.actor.ppo_mini_batch_size": _verl(
        "learner.mini_batches",
        "opd counts optimizer steps per round: data.train_batch_size / ppo_mini_batch_size",
        same_value=False,
    ),
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": _verl("learner.micro_batch_size"),
    "actor_rollout_ref.actor.ppo_max_token_len_per_gpu": _verl(
        "learner.max_tokens_per_micro_batch", "padded tokens (rows x longest sequence)"
    ),
    "actor_rollout_ref.rollout.n": _verl("rollout.samples_per_prompt"),
    "actor_rollout_ref.rollout.temperature": _verl("rollout.temperature"),
    "actor_rollout_ref.rollout.response_length": _verl("rollout.max_new_tokens"),
    "actor_rollout_ref.rollout.dtype": _verl("rollout.engine.dtype"),
    "actor_rollout_ref.rollout.gpu_memory_utilization": _verl("rollout.engine.gpu_memory_utilization"),
    "actor_rollout_ref.rollout.tensor_model_parallel_size": _verl("rollout.engine.tensor_parallel_size"),
    "actor_rollout_ref.rollout.enforce_eager": _verl("rollout.engine.enforce_eager"),
    "actor_rollout_ref.rollout.max_model_len": _verl("rollout.engine.max_model_len"),
    "actor_rollout_ref.rollout.val_kwargs.n": _verl("eval.samples_per_prompt"),
    "actor_rollout_ref.rollout.val_kwargs.temperature": _verl("eval.temperature"),
    "actor_rollout_ref.rollout.val_kwargs.top_p": _verl("eval.top_p"),
    # verl: trainer
    "trainer.total_training_steps": _verl("rounds", "a verl training step is one opd round"),
    "trainer.total_epochs": _verl("rounds", ROUNDS_PER_EPOCH, same_value=False),
    "trainer.project_name": _verl("wandb.project"),
    "trainer.experiment_name": _verl("wandb.name"),
    "trainer.default_local_dir": _verl("output_dir"),
    "trainer.save_freq": _verl("checkpoint.every", "0 is never", {"-1": "0"}),
    "trainer.max_actor_ckpt_to_keep": _verl("checkpoint.keep"),
    "trainer.test_freq": _verl("eval.every", "opd always evaluates before the first and after the last round"),
    "trainer.resume_mode": _verl("resume", "auto, null or a run directory", {"auto": "auto", "disable": "null"}, False),
    "trainer.resume_from_path": _verl("resume", "a run directory (its newest checkpoint)"),
}
"""Another framework's name -> opd's key. A name that is also opd's own key (seed, data.prompt_key) is listed
for the docs; loading never reports it."""


def did_you_mean(name: str, value: str | None = None) -> str | None:
    """The error for `name=value` when `name` is another framework's name for an opd key, else None."""
    alias = ALIASES.get(name)
    if alias is None or alias.key == name:
        return None
    suggestion = alias.key
    if value is not None and value in alias.values:
        suggestion += f"={alias.values[value]}"
    elif value is not None and alias.same_value:
        suggestion += f"={value}"
    note = f" ({alias.note})" if alias.note else ""
    return f"{name}: not an opd key ({alias.source}'s name); did you mean {suggestion}?{note}"


def did_you_mean_in(tree: Mapping, under: str = "") -> str | None:
    """The error for the first key of a config file's `tree` (plain dicts) that is another framework's name,
    among those at or below the dotted key `under` (where merging it into the schema failed)."""
    for name, value in _leaves(tree):
        if not under or name == under or name.startswith(f"{under}."):
            scalar = None if isinstance(value, Mapping | list) else _yaml_text(value)
            if hint := did_you_mean(name, scalar):
                return hint
    return None


def _leaves(tree: Mapping, prefix: str = ""):
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from _leaves(value, f"{name}.")
        else:
            yield name, value


def _yaml_text(value: object) -> str:
    """A scalar as it would be written in an override."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
