"""The whole run's schema, `OPDConfig`: its sections, and the rules that tie sections together.

Each section checks itself in `__post_init__` (OmegaConf.to_object builds sections before the whole); the
rules across sections are here, in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from opd.config.base import ConfigError
from opd.config.models import (
    CombineConfig,
    CorrectionConfig,
    DataConfig,
    EngineConfig,
    JudgeConfig,
    StudentConfig,
    TeacherConfig,
    check_teachers,
)
from opd.config.training import (
    BufferConfig,
    CheckpointConfig,
    EvalConfig,
    FaultConfig,
    LearnerConfig,
    LossConfig,
    PipelineConfig,
    RayConfig,
    RolloutConfig,
    WandbConfig,
)
from opd.learner.loss_types import LOSS_TYPES


@dataclass
class OPDConfig:
    """Every key of a run; docs/config.md lists them (`python -m opd.config.reference` writes it)."""

    student: StudentConfig = field(default_factory=StudentConfig)
    """The model being distilled."""
    teachers: list[TeacherConfig] = field(default_factory=lambda: [TeacherConfig()])
    """The models distilled from, one entry each (`teachers.0.model=...`); the first also writes mode=offline's
    samples and is the default judge. A config built on another (`base:`) that lists teachers keeps, for each
    entry named as in its base, what the base set (GPUs, replicas, licence) unless it sets it again."""
    combine: CombineConfig = field(default_factory=CombineConfig)
    """How several teachers' signals become one per sample."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """Whole-response scores (a Python verifier or a teacher reading a rubric) stored with every sample."""
    correction: CorrectionConfig = field(default_factory=CorrectionConfig)
    """Teacher corrections: the teacher rewrites a student response from its first unlikely token."""
    data: DataConfig = field(default_factory=DataConfig)
    """The training and held-out prompts, and how they are read and rendered."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """The student's rollout workers and what each round samples."""
    teacher_engine: EngineConfig = field(default_factory=EngineConfig)
    """The vLLM engine of every teacher with backend=vllm."""
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    """The DeepSpeed learner that trains the student."""
    buffer: BufferConfig = field(default_factory=BufferConfig)
    """The replay buffer between scoring and learning."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The distillation objective."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation of the student (greedy accuracy, pass@k, reverse KL to the teacher)."""
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    """Whether consecutive rounds' stages run in turn or overlap."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints to resume from, and exports of the student while the run goes on."""
    faults: FaultConfig = field(default_factory=FaultConfig)
    """How a run survives failing actors and bad numbers."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases logging."""
    ray: RayConfig = field(default_factory=RayConfig)
    """The Ray cluster and how the actors are placed on it."""
    mode: Literal["on_policy", "offline"] = "on_policy"
    """on_policy: the student samples, the teacher scores. offline: the teacher samples, the student imitates."""
    rounds: int = 30
    """Rounds to run: each samples rollout.prompts_per_round x samples_per_prompt responses, scores them and takes
    learner.mini_batches optimizer steps (fewer rounds if max_teacher_tokens is reached first)."""
    max_teacher_tokens: int = 0
    """Stop after the round in which the teacher tokens spent (response tokens it scored, plus those it wrote as
    corrections or offline samples) reach this; 0: no limit. A cost cap for a served teacher."""
    output_dir: str = "outputs/default"
    """Where the run writes config.yaml, metrics, curves.png, checkpoints/, the final student/ and its exports
    (resume=PATH writes to PATH instead)."""
    cache_dir: str = "outputs/cache"
    """Where built-in models and data are built once and reused."""
    seed: int = 0
    """Seeds the training prompts' order and every sampler: rollout workers, teachers and evaluation."""
    resume: str | None = None
    """auto: continue from the newest complete checkpoint in output_dir (start fresh if none);
    a path: continue from that run directory's newest checkpoint, writing to it."""

    def __post_init__(self) -> None:
        """Each section checked itself as it was built (sections are built before the whole); here, the whole."""
        if self.rounds < 1:
            raise ConfigError(f"rounds={self.rounds} must be >= 1")
        if self.max_teacher_tokens < 0:
            raise ConfigError(f"max_teacher_tokens={self.max_teacher_tokens} must be >= 0 (0: no limit)")
        check_teachers(self.teachers)
        check_across(self)


def check_across(cfg: OPDConfig) -> None:
    """Rules that tie sections together; each message names the keys and why."""
    loss = LOSS_TYPES.get(cfg.loss.type)
    if cfg.mode == "offline" and loss.mode != "offline":
        offline = " or ".join(n for n in LOSS_TYPES.names() if LOSS_TYPES.get(n).mode == "offline")
        raise ConfigError(f"mode=offline trains on teacher samples, so it needs loss.type={offline}")
    if cfg.mode == "on_policy" and loss.mode != "on_policy":
        raise ConfigError(f"loss.type={cfg.loss.type} imitates teacher samples; use it with mode=offline")
    names = [t.name for t in cfg.teachers]
    if cfg.combine.rule == "route":
        for value, teacher in [*cfg.combine.routes.items(), ("combine.default", cfg.combine.default)]:
            if teacher is not None and teacher not in names:
                raise ConfigError(f"combine.routes: {value!r} -> {teacher!r}, which is not a teacher name ({names})")
    for key, teacher in (("judge.teacher", cfg.judge.teacher), ("correction.teacher", cfg.correction.teacher)):
        if teacher is not None and teacher not in names:
            raise ConfigError(f"{key}={teacher!r} is not a teacher name ({names})")
    if cfg.judge.kind == "none" and cfg.combine.rule == "best_of":
        raise ConfigError("combine.rule=best_of ranks the teachers' own answers by judge score: set judge.kind")
    if cfg.judge.advantage_coef and cfg.loss.type != "reverse_kl":
        raise ConfigError("judge.advantage_coef mixes scores into the policy-gradient advantage: loss.type=reverse_kl")
    if cfg.loss.baseline == "group" and cfg.rollout.samples_per_prompt < 2:
        raise ConfigError(
            "loss.baseline=group compares each sample with the prompt's other samples: "
            f"rollout.samples_per_prompt={cfg.rollout.samples_per_prompt} must be >= 2"
        )
    if cfg.correction.enabled and cfg.mode != "on_policy":
        raise ConfigError("correction.enabled rewrites the student's own samples: it needs mode=on_policy")
    steps = cfg.rounds * cfg.learner.mini_batches
    if cfg.learner.warmup_steps > steps:
        raise ConfigError(
            f"learner.warmup_steps={cfg.learner.warmup_steps} is more than the run's {steps} optimizer steps "
            f"(rounds={cfg.rounds} x learner.mini_batches={cfg.learner.mini_batches}): the lr would never reach "
            "learner.lr; lower it or run longer"
        )
    if cfg.mode == "on_policy" and cfg.rollout.temperature == 0:
        raise ConfigError(
            "rollout.temperature=0 samples greedily, but on-policy learning takes the student's log-probs at the "
            "sampling temperature (logits / 0): use a temperature > 0 (greedy accuracy is what eval reports)"
        )
    for i, t in enumerate(cfg.teachers):
        if t.backend in ("vllm", "openai") and cfg.rollout.temperature != 1.0 and cfg.mode == "on_policy":
            raise ConfigError(
                f"teachers.{i}.backend={t.backend} scores at temperature 1 (vLLM prompt log-probs skip temperature), "
                f"but rollout.temperature={cfg.rollout.temperature}; use backend=transformers or temperature 1"
            )
    check_batches(cfg.rollout, cfg.learner, cfg.buffer)
    if cfg.pipeline.mode == "async":
        check_async(cfg)
    if cfg.rollout.colocate:
        if cfg.rollout.gpus_per_worker <= 0 or cfg.learner.gpus_per_shard <= 0:
            raise ConfigError(
                "rollout.colocate shares GPUs between engines and learner: set rollout.gpus_per_worker "
                "and learner.gpus_per_shard (vLLM sleep mode needs a GPU)"
            )
        if cfg.rollout.num_workers != cfg.learner.num_shards:
            raise ConfigError(
                f"rollout.colocate pairs rollout worker i with learner shard i: rollout.num_workers="
                f"{cfg.rollout.num_workers} must equal learner.num_shards={cfg.learner.num_shards}"
            )
        shared = cfg.rollout.gpus_per_worker + cfg.learner.gpus_per_shard
        if shared > 1:
            raise ConfigError(
                f"rollout.colocate puts a rollout worker and a learner shard on one GPU: rollout.gpus_per_worker="
                f"{cfg.rollout.gpus_per_worker} + learner.gpus_per_shard={cfg.learner.gpus_per_shard} must be <= 1"
            )
    check_gpus(cfg)


def weight_backend(cfg: OPDConfig) -> str:
    """`rollout.weight_sync`, with `auto` resolved: ipc when colocated, nccl when every transfer rank (learner
    shard, rollout worker) holds whole GPUs of its own, else gloo (NCCL refuses two ranks on one GPU)."""
    backend = cfg.rollout.weight_sync
    if backend != "auto":
        return backend
    if cfg.rollout.colocate:
        return "ipc"
    return "nccl" if cfg.rollout.gpus_per_worker >= 1 and cfg.learner.gpus_per_shard >= 1 else "gloo"


def check_gpus(cfg: OPDConfig) -> None:
    """What the GPU transports and tensor-parallel engines need of the GPU shares; no share below 0."""
    rollout, learner = cfg.rollout, cfg.learner
    shares = {
        "rollout.gpus_per_worker": rollout.gpus_per_worker,
        "rollout.cpus_per_worker": rollout.cpus_per_worker,
        "learner.gpus_per_shard": learner.gpus_per_shard,
        "learner.cpus_per_shard": learner.cpus_per_shard,
    }
    for i, t in enumerate(cfg.teachers):
        shares |= {
            f"teachers.{i}.gpus_per_replica": t.gpus_per_replica,
            f"teachers.{i}.cpus_per_replica": t.cpus_per_replica,
        }
    for key, value in shares.items():
        if value < 0:
            raise ConfigError(f"{key}={value:g} must be >= 0 (a resource count; Ray would plan {value:g} of it)")
    if rollout.weight_sync == "nccl" and (
        rollout.colocate or rollout.gpus_per_worker < 1 or learner.gpus_per_shard < 1
    ):
        raise ConfigError(
            "rollout.weight_sync=nccl needs every transfer rank on GPUs of its own (NCCL refuses two ranks of one "
            f"group on one GPU): rollout.colocate={rollout.colocate}, rollout.gpus_per_worker="
            f"{rollout.gpus_per_worker} and learner.gpus_per_shard={learner.gpus_per_shard} share GPUs; "
            "use weight_sync=auto"
        )
    check_learner_gpus(rollout, learner)
    check_tensor_parallel(
        "rollout.engine.tensor_parallel_size", rollout.engine, "rollout.gpus_per_worker", rollout.gpus_per_worker
    )
    for i, t in enumerate(cfg.teachers):
        if t.backend == "vllm":
            check_tensor_parallel(
                "teacher_engine.tensor_parallel_size",
                cfg.teacher_engine,
                f"teachers.{i}.gpus_per_replica",
                t.gpus_per_replica,
            )


def check_learner_gpus(rollout: RolloutConfig, learner: LearnerConfig) -> None:
    """A learner shard trains on one device: at most one GPU, and a GPU of its own when there are several shards.

    Ray may place two fractional bundles on one GPU (PACK fills it first), and NCCL refuses two ranks of a group on
    one GPU; colocated, each bundle holds a rollout worker's share plus a shard's, which must then add up to the
    whole GPU. A share above 1 would reserve GPUs the shard never uses (it trains on its first).
    """
    gpus = learner.gpus_per_shard
    if gpus > 1:
        raise ConfigError(
            f"learner.gpus_per_shard={gpus:g}: a shard trains on one GPU; use 1 and more learner.num_shards"
        )
    if learner.num_shards == 1 or gpus in (0, 1):
        return
    if not rollout.colocate:
        raise ConfigError(
            f"learner.gpus_per_shard={gpus:g} with learner.num_shards={learner.num_shards}: Ray may place two "
            "shards on one GPU (NCCL refuses two ranks of a group on one GPU); use whole GPUs (1), or one shard"
        )
    if abs(rollout.gpus_per_worker + gpus - 1) > 1e-9:
        raise ConfigError(
            f"rollout.colocate with learner.num_shards={learner.num_shards}: rollout.gpus_per_worker="
            f"{rollout.gpus_per_worker:g} + learner.gpus_per_shard={gpus:g} must be 1, so that each pair holds a "
            "GPU of its own (Ray may place two smaller bundles, and their shards, on one GPU)"
        )


def check_tensor_parallel(key: str, engine: EngineConfig, gpus_key: str, gpus: float) -> None:
    """A vLLM engine on GPUs shards over exactly the GPUs its actor holds (a fraction of one GPU: no sharding)."""
    tp = engine.tensor_parallel_size
    if gpus > 0 and (gpus >= 1 or tp > 1) and tp != gpus:
        raise ConfigError(f"{key}={tp} must equal {gpus_key}={gpus}: the engine shards over the GPUs its actor holds")


def check_batches(rollout: RolloutConfig, learner: LearnerConfig, buffer: BufferConfig) -> None:
    """What a round trains on must split evenly into the learner's optimizer steps x shards."""
    made = rollout.prompts_per_round * rollout.samples_per_prompt
    step = learner.mini_batches * learner.num_shards
    split = f"split evenly into learner.mini_batches={learner.mini_batches} x learner.num_shards={learner.num_shards}"
    if buffer.train_per_round:
        if not 0 < buffer.train_per_round <= made:
            raise ConfigError(
                f"buffer.train_per_round={buffer.train_per_round} must be between 1 and the {made} samples a "
                "round makes (rollout.prompts_per_round x samples_per_prompt), or 0 for all of them"
            )
        if buffer.train_per_round % step:
            raise ConfigError(f"buffer.train_per_round={buffer.train_per_round} must {split}")
    elif made % step:
        raise ConfigError(
            f"a round makes {made} samples (rollout.prompts_per_round x samples_per_prompt), which must {split}"
        )


def check_async(cfg: OPDConfig) -> None:
    """pipeline.mode=async trains on samples generated `depth` rounds earlier, beside the learner."""
    if cfg.mode != "on_policy":
        raise ConfigError("pipeline.mode=async overlaps student generation with learning: it needs mode=on_policy")
    lag = cfg.pipeline.depth * cfg.learner.mini_batches
    if cfg.buffer.max_staleness < lag:
        raise ConfigError(
            f"pipeline.mode=async with pipeline.depth={cfg.pipeline.depth} trains on samples that many rounds "
            f"old, {lag} policy versions (learner.mini_batches={cfg.learner.mini_batches}, one per optimizer "
            f"step): buffer.max_staleness={cfg.buffer.max_staleness} must be at least that"
        )
    if cfg.rollout.colocate:
        raise ConfigError("rollout.colocate puts the engines to sleep while the learner steps: use pipeline.mode=sync")
