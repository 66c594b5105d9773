"""The run's configuration: one structured schema holding every default.

YAML files in `conf/` only override it, and `key=value` arguments override those.
Each section checks itself in `__post_init__` (OmegaConf.to_object builds sections before
the whole), `OPDConfig` checks the rules across sections. Valid names (loss types, combine
rules, buffer orders) are read from the modules that own them, which import numpy at most,
so a bad key, type or path is reported in well under a second, before Ray, torch or vLLM.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from opd.buffer.replay import ORDERS as BUFFER_ORDERS
from opd.catalog import BUILTINS, names
from opd.learner.loss_types import LOSS_TYPES
from opd.licenses import LicenseWarning, license_problems
from opd.teachers.combine import RULES, SELECTING

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
BUILTIN = "builtin:"
COMBINE_RULES = (*RULES.names(), *SELECTING)
"""Every combine.rule: the merging rules of opd/teachers/combine.py, then those that pick one teacher per prompt.
The names are read from the modules that implement them (numpy at most, no torch): one list, no copies."""


class ConfigError(ValueError):
    """A configuration the run cannot start with; the message names the key."""


def at_least_one(section: str, config: object, *names: str) -> None:
    """Counts and sizes that must be >= 1, named `section.name` in the error."""
    for name in names:
        value = getattr(config, name)
        if value < 1:
            raise ConfigError(f"{section}.{name}={value} must be >= 1")


def one_of(key: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(valid)}")


@dataclass
class EngineConfig:
    """vLLM engine settings shared by rollout workers and vLLM teachers."""

    dtype: str = "auto"
    """Weights dtype inside vLLM; `auto` keeps the checkpoint's."""
    max_model_len: int = 256
    """Longest prompt + response the engine accepts."""
    gpu_memory_utilization: float = 0.1
    """Fraction of device memory vLLM may take (on CPU: of a NUMA node's RAM)."""
    enforce_eager: bool = True
    """Skip CUDA graph capture; start-up matters more than decode speed for small models."""
    tensor_parallel_size: int = 1
    cpu_kv_cache_gib: int = 1
    """KV cache size on CPU (VLLM_CPU_KVCACHE_SPACE); ignored on GPU."""
    cpu_threads_bind: str = "nobind"
    """On CPU, VLLM_CPU_OMP_THREADS_BIND. vLLM's `auto` pins an engine's threads as if it owned the node (one
    core kept for its scheduler, compute on the rest), so every engine opd starts on a node computes on the same
    cores; `nobind` leaves placement to the OS. Core lists like `0-3` pin explicitly. Ignored on GPU."""
    cpu_in_process: bool = True
    """On CPU, run vLLM's engine core inside the actor's process (VLLM_ENABLE_V1_MULTIPROCESSING=0). Its own
    process would busy-poll for requests and pass every step's output through a socket, on the cores the
    engine computes on. Ignored on GPU, where that process overlaps scheduling with the device's work."""


@dataclass
class StudentConfig:
    model: str = f"{BUILTIN}addition-student"
    """Hugging Face id or local checkpoint dir; `builtin:addition-student` is built on first use."""


@dataclass
class TeacherConfig:
    name: str = "teacher"
    model: str = f"{BUILTIN}addition-teacher"
    backend: Literal["vllm", "transformers"] = "vllm"
    """vllm: top-k log-probs via prompt_logprobs (temperature 1). transformers: full logits."""
    weight: float = 1.0
    replicas: int = 1
    gpus_per_replica: float = 0
    cpus_per_replica: float = 1
    license: str = "unspecified"
    """SPDX-style id (apache-2.0, mit, llama3.1, gemma, ...) or proprietary-api; checked by the licence gate
    (opd/licenses.py) and recorded in the student's provenance.json."""
    source: str = ""
    """Where the teacher came from (hub id and revision, URL, internal registry); recorded with the student."""
    accept_terms: str = ""
    """For a teacher whose terms restrict training other models: why this use is allowed (e.g. a written
    agreement). Empty refuses such a teacher; any text lets it run and is recorded in provenance.json."""

    @property
    def built_in(self) -> bool:
        """Made by opd from random weights (`builtin:`), so no third party's terms apply."""
        return self.model.startswith(BUILTIN)


def check_teachers(teachers: list[TeacherConfig]) -> None:
    """Each entry by its index, unique names, and the licence gate: its errors refuse the config, its warnings
    are issued once, here (`LicenseWarning`), when the config is validated."""
    if not teachers:
        raise ConfigError("teachers is empty: at least one teacher is needed")
    names = [t.name for t in teachers]
    if len(set(names)) != len(names):
        raise ConfigError(f"teachers: names must be unique, got {names}")
    for i, t in enumerate(teachers):
        if t.weight < 0:
            raise ConfigError(f"teachers.{i}.weight={t.weight} must be >= 0")
        if t.replicas < 1:
            raise ConfigError(f"teachers.{i}.replicas must be >= 1")
    errors, notes = license_problems(teachers)
    if errors:
        raise ConfigError("; ".join(errors))
    for note in notes:
        warnings.warn(note, LicenseWarning, stacklevel=2)


@dataclass
class CombineConfig:
    """How several teachers' signals become one per sample (see opd/teachers/combine.py)."""

    rule: str = "mean_logprob"
    """mean_logprob: weighted product of experts; mixture: weighted mixture of probabilities;
    route: one teacher per prompt, picked by a prompt field; best_of: the best-judged teacher."""
    route_field: str = "domain"
    """Prompt field whose value picks the teacher when rule=route."""
    routes: dict[str, str] = field(default_factory=dict)
    """Field value -> teacher name, for rule=route."""
    default: str | None = None
    """Teacher for prompts whose field value has no route (None: such a prompt is an error)."""

    def __post_init__(self) -> None:
        one_of("combine.rule", self.rule, COMBINE_RULES)
        if self.rule == "route" and not self.routes and self.default is None:
            raise ConfigError("combine.rule=route needs combine.routes (field value -> teacher) or combine.default")


DEFAULT_RUBRIC = (
    "Rate the response to the task from 0 (wrong or useless) to 10 (fully correct).\n"
    "Task: {prompt}\nResponse: {response}\nScore:"
)


@dataclass
class JudgeConfig:
    """Whole-response scores stored with every rollout (see opd/teachers/judge.py)."""

    kind: Literal["none", "verifier", "rubric"] = "none"
    """verifier: a Python function scores the response; rubric: a teacher writes a score (LLM-as-judge)."""
    verifier: str = "exact_answer"
    """Built-in verifier name or `module:function` taking (response, answer, fields) -> score in [0, 1] or None."""
    teacher: str | None = None
    """The teacher that judges with the rubric (default: the first teacher)."""
    rubric: str = DEFAULT_RUBRIC
    """Judge prompt with {prompt} and {response}; the first number the judge writes, out of 10, is the score."""
    max_tokens: int = 8
    use: Literal["record", "filter", "weight"] = "record"
    """record: log only; filter: drop samples scoring below min_score; weight: scale each sample's loss by its score."""
    min_score: float = 0.5
    advantage_coef: float = 0.0
    """loss.type=reverse_kl: add coef x (score - mean score of the prompt's samples) to every token's advantage."""

    def __post_init__(self) -> None:
        if self.kind == "none" and (self.use != "record" or self.advantage_coef):
            raise ConfigError(f"judge.use={self.use} / judge.advantage_coef need a judge: set judge.kind")
        if self.kind == "rubric" and ("{prompt}" not in self.rubric or "{response}" not in self.rubric):
            raise ConfigError("judge.rubric must contain {prompt} and {response}")
        if not 0.0 <= self.min_score <= 1.0:
            raise ConfigError(f"judge.min_score={self.min_score} must lie in [0, 1] (scores are normalised)")


@dataclass
class CorrectionConfig:
    """Teacher corrections: keep the student's response up to its first unlikely token, let the teacher finish it.

    The student then learns the kept prefix with the distillation loss and the teacher's continuation with
    `sft` (cross-entropy), weighted by `sft_weight`.
    """

    enabled: bool = False
    threshold: float = -4.0
    """A student token is unlikely when the teacher's log-prob of it is below this..."""
    outside_top_k: bool = True
    """...or (if true) when it is not among the teacher's loss.top_k most likely tokens."""
    teacher: str | None = None
    """The teacher that writes continuations (default: the sample's routed teacher, else the first)."""
    temperature: float = 0.0
    """Sampling temperature of the continuation (0: greedy)."""
    sft_weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.enabled:
            return
        if self.threshold > 0:
            raise ConfigError(f"correction.threshold={self.threshold} is a log-prob, so it must be <= 0")
        if self.sft_weight < 0 or self.temperature < 0:
            raise ConfigError("correction.sft_weight and correction.temperature must be >= 0")


_SET_NAME = re.compile(r"[\w.-]+")


@dataclass
class DataConfig:
    train: str = f"{BUILTIN}addition/train"
    """Prompt file: .jsonl, .json (an array of rows), .parquet, or a datasets save_to_disk directory (DIR:SPLIT for
    a DatasetDict), with a `data.prompt_key` column (and an optional `data.answer_key`)."""
    eval: Any = f"{BUILTIN}addition/eval"
    """Held-out prompts, in any format `data.train` takes: one file, or named sets `{gsm8k: FILE, held_out: FILE}`,
    each evaluated and reported on its own (`eval/<set>/...`; a single file's metrics are `eval/...`)."""
    eval_size: int = 128
    """Held-out prompts used for accuracy and reverse KL (the first N of each eval set)."""
    on_error: Literal["skip", "fail"] = "fail"
    """What to do with a malformed line: skip it (counted) or stop naming file and line."""
    prompt_key: str = "prompt"
    """Column holding the prompt: a string (one user turn) or a list of {role, content} messages."""
    answer_key: str = "answer"
    """Column holding the optional reference answer; every other column reaches routing and verifiers."""
    chat_template: str = "auto"
    """auto (the student tokenizer's template when it has one, else raw text), none (raw text), or a Jinja file."""
    system_prompt: str | None = None
    """System turn added to conversations that have none (needs a chat template)."""
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra variables for the chat template, e.g. {enable_thinking: false} for Qwen3."""

    def __post_init__(self) -> None:
        at_least_one("data", self, "eval_size")
        sets = self.eval_sets()
        if not sets or not all(isinstance(v, str) for v in sets.values()):
            raise ConfigError(f"data.eval={self.eval!r} must be a file or a mapping of set names to files")
        for name in sets:
            if isinstance(self.eval, dict) and not _SET_NAME.fullmatch(str(name)):
                raise ConfigError(
                    f"data.eval.{name}: a set name is letters, digits, '_', '-' or '.' (it names metrics)"
                )
        if self.chat_template == "none" and (self.system_prompt or self.chat_template_kwargs):
            used = "data.system_prompt" if self.system_prompt else "data.chat_template_kwargs"
            raise ConfigError(f"{used} needs a chat template, but data.chat_template=none passes prompts as raw text")

    def eval_sets(self) -> dict[str, str]:
        """Set name -> file; the one set of a plain `data.eval` file is unnamed ("")."""
        return dict(self.eval) if isinstance(self.eval, dict) else {"": self.eval}


@dataclass
class RolloutConfig:
    num_workers: int = 2
    prompts_per_round: int = 64
    samples_per_prompt: int = 4
    max_new_tokens: int = 48
    temperature: float = 1.0
    gpus_per_worker: float = 0
    """GPUs each rollout worker reserves (vLLM tensor parallel size on a GPU cluster)."""
    cpus_per_worker: float = 1
    colocate: bool = False
    """Rollout worker i and learner shard i share placement bundle i (the same GPUs); engines sleep (vLLM sleep
    mode frees their memory) while the learner steps and wake for the weight sync. GPUs only."""
    weight_sync: Literal["auto", "gloo", "nccl", "ipc"] = "auto"
    """Learner -> rollout transport: auto is ipc (CUDA IPC, no copy over the wire) when colocated, nccl when
    rollout workers have GPUs, else gloo (CPU)."""
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        at_least_one("rollout", self, "num_workers", "prompts_per_round", "samples_per_prompt", "max_new_tokens")
        if self.temperature < 0:
            raise ConfigError(f"rollout.temperature={self.temperature} must be >= 0")
        if self.weight_sync == "ipc" and not self.colocate:
            raise ConfigError(
                "rollout.weight_sync=ipc hands over CUDA memory on one GPU: it needs rollout.colocate=true"
            )
        if self.max_new_tokens >= self.engine.max_model_len:
            raise ConfigError(
                f"rollout.max_new_tokens={self.max_new_tokens} leaves no room for a prompt in "
                f"rollout.engine.max_model_len={self.engine.max_model_len}"
            )


@dataclass
class LearnerConfig:
    num_shards: int = 2
    zero_stage: int = 2
    lr: float = 1e-3
    weight_decay: float = 0.0
    micro_batch_size: int = 32
    """Sequences per forward/backward on one shard."""
    mini_batches: int = 1
    """Optimizer steps per round: the round's samples are split into this many batches."""
    grad_clip: float = 1.0
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend: auto picks nccl with CUDA, gloo without."""
    bf16: bool = True
    """Train in bf16 on GPUs (CPU always trains in fp32)."""
    gpus_per_shard: float = 0
    """GPUs each shard's actor reserves; 1 on a GPU cluster."""
    cpus_per_shard: float = 1

    def __post_init__(self) -> None:
        at_least_one("learner", self, "num_shards", "micro_batch_size", "mini_batches")
        if self.lr <= 0:
            raise ConfigError(f"learner.lr={self.lr} must be > 0")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"learner.zero_stage={self.zero_stage} must be 0, 1, 2 or 3")


@dataclass
class LossConfig:
    type: str = "reverse_kl"
    """The objective by name: opd/learner/loss_types.py declares them (README "Losses" compares them)."""
    beta: float = 0.5
    """Generalized JSD interpolation: 0 is forward KL, 1 is reverse KL."""
    top_k: int = 8
    """Teacher alternatives kept per token (top-k KL / JSD on top-k logits)."""
    is_cap: float = 2.0
    """Cap on the importance weight between the learner and the sampling policy."""

    def __post_init__(self) -> None:
        one_of("loss.type", self.type, LOSS_TYPES.names())
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"loss.beta={self.beta} must lie in [0, 1]")
        at_least_one("loss", self, "top_k")


@dataclass
class BufferConfig:
    capacity: int = 65536
    """Samples held at most; the oldest are evicted first."""
    max_staleness: int = 4
    """Samples generated more than this many policy versions (optimizer steps) ago are never trained on; async
    trains on samples pipeline.depth rounds, i.e. depth x learner.mini_batches versions, old."""
    num_shards: int = 1
    """Buffer actors; samples are placed by a hash of their prompt and drawn from every shard."""
    order: str = "fifo"
    """fifo (oldest first) or disagreement (samples the teacher disagrees with most first: priority sampling)."""
    train_per_round: int = 0
    """Samples the learner trains on per round; 0: as many as the round generates. Fewer, with
    order=disagreement, trains on the ones the teacher disagrees with most; the rest wait in the buffer for a
    later round while fresh enough (max_staleness), then are dropped and counted."""

    def __post_init__(self) -> None:
        if self.train_per_round < 0:
            raise ConfigError(f"buffer.train_per_round={self.train_per_round} must be >= 0")
        at_least_one("buffer", self, "num_shards", "capacity")
        one_of("buffer.order", self.order, BUFFER_ORDERS)


@dataclass
class EvalConfig:
    every: int = 5
    """Evaluate every N rounds (and always before the first and after the last)."""
    samples_per_prompt: int = 2
    """k: student samples per eval prompt, for the reverse-KL estimate and, on prompts with answers, pass@k and
    mean@k (the unbiased estimators over these k samples)."""
    temperature: float | None = None
    """Temperature of the pass@k samples; None: rollout.temperature (then the reverse-KL samples serve)."""
    top_p: float = 1.0
    """Nucleus sampling of the pass@k samples (the reverse-KL samples always sample the full distribution)."""
    verifier: str | None = None
    """What counts as a correct eval answer: a judge verifier (exact_answer: the last number; math: math-verify,
    `\\boxed{}` first; contains_answer; `module:function`). None: judge.verifier when judge.kind=verifier, else
    exact_answer. A response is correct when the verifier scores it 0.5 or more."""

    def __post_init__(self) -> None:
        at_least_one("eval", self, "every", "samples_per_prompt")
        if self.temperature is not None and self.temperature < 0:
            raise ConfigError(f"eval.temperature={self.temperature} must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"eval.top_p={self.top_p} must lie in (0, 1]")


@dataclass
class PipelineConfig:
    mode: Literal["sync", "async"] = "sync"
    """sync: generate, score, learn and sync in turn. async: while the learner trains on round r, the teachers
    score round r+1 as soon as it is generated, and round r+1+depth generates from round r's sync on; samples are
    `depth` rounds (depth x learner.mini_batches versions) old when trained on, and truncated importance weights
    (loss.is_cap) correct for it."""
    depth: int = 1
    """async: rounds generated ahead of the one learning, i.e. how many rounds old samples are when trained on.
    1: a round's generation and its scoring run in turn while the previous round learns. 2: generation, scoring
    and learning each work on their own round at once (round r+3 generates from round r's sync on), so a round
    takes about the slowest stage instead of half the sum of all; samples are then two rounds old."""

    def __post_init__(self) -> None:
        if self.mode == "async" and self.depth < 1:
            raise ConfigError(f"pipeline.depth={self.depth}: async generates at least one round ahead")


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save learner (model, optimizer), controller state and replay buffer every N rounds; 0 never."""
    keep: int = 2
    """Complete checkpoints kept (older ones are deleted once a newer one is complete)."""


@dataclass
class FaultConfig:
    """How a run survives failing actors and bad numbers (see README "What a run survives")."""

    max_restarts: int = 3
    """Times Ray restarts a dead rollout worker or teacher replica (its in-flight calls are re-issued)."""
    teacher_timeout_s: float = 600.0
    """A teacher call taking longer than this is cancelled and retried."""
    teacher_retries: int = 2
    """Retries of a timed-out or failed teacher call before the teacher counts as failing."""
    restart_timeout_s: float = 900.0
    """How long a restarted actor may take to load its model again."""
    on_teacher_failure: Literal["drop", "stop"] = "stop"
    """drop: take a failing teacher out of the pool (if others remain) with a loud warning; stop: end the run."""
    max_nonfinite_steps: int = 3
    """Learner steps with a non-finite loss are skipped and counted; this many in a row stops the run."""
    learner_resumes: int = 1
    """When a learner shard dies, restart every actor from the last checkpoint this many times."""

    def __post_init__(self) -> None:
        at_least_one("faults", self, "max_nonfinite_steps")


@dataclass
class WandbConfig:
    mode: Literal["online", "offline", "disabled"] = "offline"
    project: str = "opd"
    group: str | None = None
    name: str | None = None


@dataclass
class RayConfig:
    address: str | None = None
    """Existing cluster to join (or set RAY_ADDRESS); a local one is started otherwise."""
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement-group strategy for each role's actors: PACK fills few nodes, SPREAD spreads over many."""
    placement_timeout_s: float = 120.0
    """How long to wait for the cluster to place every role before failing with the plan."""


@dataclass
class OPDConfig:
    student: StudentConfig = field(default_factory=StudentConfig)
    teachers: list[TeacherConfig] = field(default_factory=lambda: [TeacherConfig()])
    combine: CombineConfig = field(default_factory=CombineConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    correction: CorrectionConfig = field(default_factory=CorrectionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    teacher_engine: EngineConfig = field(default_factory=EngineConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    mode: Literal["on_policy", "offline"] = "on_policy"
    """on_policy: the student samples, the teacher scores. offline: the teacher samples, the student imitates."""
    rounds: int = 30
    output_dir: str = "outputs/default"
    cache_dir: str = "outputs/cache"
    """Where built-in models and data are built once and reused."""
    seed: int = 0
    resume: str | None = None
    """auto: continue from the newest complete checkpoint in output_dir (start fresh if none);
    a path: continue from that run directory's newest checkpoint, writing to it."""

    def __post_init__(self) -> None:
        """Each section checked itself as it was built (sections are built before the whole); here, the whole."""
        if self.rounds < 1:
            raise ConfigError(f"rounds={self.rounds} must be >= 1")
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
    if cfg.correction.enabled and cfg.mode != "on_policy":
        raise ConfigError("correction.enabled rewrites the student's own samples: it needs mode=on_policy")
    for i, t in enumerate(cfg.teachers):
        if t.backend == "vllm" and cfg.rollout.temperature != 1.0 and cfg.mode == "on_policy":
            raise ConfigError(
                f"teachers.{i}.backend=vllm scores at temperature 1 (vLLM prompt log-probs skip temperature), "
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


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _builtin_kind(value: str) -> str | None:
    entry = BUILTINS.get(value.removeprefix(BUILTIN))
    return entry.kind if entry else None


def check_paths(cfg: OPDConfig) -> None:
    """Local paths must exist; `builtin:` names are built later; `org/name` may be a hub id."""
    from opd.data.files import source_problem  # here: loading a config needs no jinja2 (opd.data imports it)

    models = {"student.model": cfg.student.model}
    models |= {f"teachers.{i}.model": t.model for i, t in enumerate(cfg.teachers)}
    for key, value in models.items():
        if value.startswith(BUILTIN):
            if _builtin_kind(value) != "model":
                raise ConfigError(f"{key}={value}: unknown built-in model; use one of {', '.join(names('model'))}")
        elif not Path(value).exists() and not _HUB_ID.match(value):
            raise ConfigError(f"{key}={value}: no such directory, and not a hub id like org/name")
        elif Path(value).exists() and not (Path(value) / "config.json").exists():
            raise ConfigError(f"{key}={value}: directory has no config.json, so it is not a model checkpoint")
    sources = {"data.train": cfg.data.train}
    sources |= {f"data.eval.{name}" if name else "data.eval": path for name, path in cfg.data.eval_sets().items()}
    for key, value in sources.items():
        if value.startswith(BUILTIN):
            if _builtin_kind(value) != "data":
                raise ConfigError(f"{key}={value}: unknown built-in data; use one of {', '.join(names('data'))}")
        elif problem := source_problem(value):
            raise ConfigError(f"{key}={value}: {problem}")
    if cfg.data.chat_template not in ("auto", "none") and not Path(cfg.data.chat_template).is_file():
        raise ConfigError(f"data.chat_template={cfg.data.chat_template}: no such file (auto, none or a Jinja file)")


def resolve_config_file(name: str) -> Path:
    """`--config-name` may be a path or a name under conf/ (with or without .yaml)."""
    for candidate in (Path(name), CONF_DIR / name, CONF_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"--config-name={name}: no such file here or in {CONF_DIR}")


def load_yaml(path: Path, seen: tuple[Path, ...] = ()):
    """A conf/ file with its `base:` chain applied: `base: default` means "the demo, plus these changes"."""
    data = OmegaConf.load(path)
    base = data.pop("base", None)
    if base is None:
        return data
    parent = resolve_config_file(str(base))
    if parent.resolve() in seen:
        raise ConfigError(f"{path}: base: {base} makes a cycle")
    return OmegaConf.merge(load_yaml(parent, (*seen, path.resolve())), data)


def load_config(config_name: str = "default", overrides: list[str] | None = None) -> OPDConfig:
    """Merge schema <- YAML <- `key=value` overrides, validate, and return plain dataclasses."""
    overrides = overrides or []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
    schema = OmegaConf.structured(OPDConfig)
    path = resolve_config_file(config_name)
    try:
        merged = OmegaConf.merge(schema, load_yaml(path))
        for item in overrides:
            # One at a time, so `teachers.0.model=...` indexes the list instead of replacing it with a dict.
            key, value = item.split("=", 1)
            OmegaConf.update(merged, key, OmegaConf.from_dotlist([f"v={value}"]).v, merge=True)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"{key}: {str(err).splitlines()[0]} (config {path})") from None
    except ConfigError as err:
        raise ConfigError(f"{err} (config {path})") from None
    check_paths(cfg)
    return cfg


def to_yaml(cfg: OPDConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: OPDConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


__all__ = ["ConfigError", "OPDConfig", "load_config", "to_dict", "to_yaml"]
