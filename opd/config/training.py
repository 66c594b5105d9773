"""The sections that say how the run trains and runs: rollout, learner, loss, buffer, evaluation, pipeline,
checkpoints, faults, W&B and Ray."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from opd.advantages import BASELINES
from opd.buffer.replay import ORDERS as BUFFER_ORDERS
from opd.config.base import ConfigError, at_least_one, one_of
from opd.config.models import EngineConfig
from opd.learner.loss_types import LOSS_TYPES, TAILS


@dataclass
class RolloutConfig:
    """The student's vLLM rollout workers: what a round samples, with which resources and engine."""

    num_workers: int = 2
    """Student vLLM engines (one Ray actor each); a round's prompts are spread evenly over them."""
    prompts_per_round: int = 64
    """Training prompts each round draws, in a seeded shuffle of data.train that is reshuffled on every pass."""
    samples_per_prompt: int = 4
    """Responses sampled per prompt: a round makes prompts_per_round x samples_per_prompt samples."""
    max_new_tokens: int = 48
    """The most tokens a response may have (the student's; in mode=offline the teacher's); a prompt must fit in
    engine.max_model_len minus this (a longer one is an error, or skipped with data.on_error=skip)."""
    temperature: float = 1.0
    """Sampling temperature of the round's responses (the teacher's in mode=offline); the learner takes the
    student's log-probs at the same temperature, as the importance ratios need."""
    gpus_per_worker: float = 0
    """GPUs each rollout worker reserves (vLLM tensor parallel size on a GPU cluster)."""
    cpus_per_worker: float = 1
    """CPUs each rollout worker reserves in Ray."""
    colocate: bool = False
    """Rollout worker i and learner shard i share placement bundle i (the same GPUs); engines sleep (vLLM sleep
    mode frees their memory) while the learner steps and wake for the weight sync. GPUs only."""
    weight_sync: Literal["auto", "gloo", "nccl", "ipc"] = "auto"
    """Learner -> rollout transport: auto is ipc (CUDA IPC, no copy over the wire) when colocated, nccl when
    rollout workers have GPUs, else gloo (CPU)."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """The student's vLLM engine in every rollout worker."""

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
class LoraConfig:
    """Low-rank adapters (PEFT LoRA) on the student; rank 0 trains every weight."""

    rank: int = 0
    """LoRA rank r; 0 is full fine-tuning. Only the adapters train; engines sample with the merged weights."""
    alpha: float = 16.0
    """LoRA scale numerator: each adapted weight is W + alpha / rank * B @ A."""
    dropout: float = 0.0
    """Dropout on the adapters' input while training (nonzero makes the learner's log-probs differ from the
    sampler's)."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Module names (suffixes) that get adapters, as PEFT's `target_modules`; ["all-linear"] is every linear but
    the LM head."""

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ConfigError(f"learner.lora.rank={self.rank} must be >= 0 (0 is full fine-tuning)")
        if self.alpha <= 0:
            raise ConfigError(f"learner.lora.alpha={self.alpha} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"learner.lora.dropout={self.dropout} must lie in [0, 1)")
        if not self.target_modules:
            raise ConfigError("learner.lora.target_modules must name at least one module")


@dataclass
class LearnerConfig:
    """The learner shards that train the student with DeepSpeed: optimizer, batching, resources, LoRA."""

    num_shards: int = 2
    """Learner actors, the DeepSpeed data-parallel ranks; each optimizer step's samples are split evenly over them."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 0 replicates everything, 1 shards the optimizer state, 2 also the gradients, 3 also the
    weights (partitioned while loading, for a student larger than one device)."""
    lr: float = 1e-3
    """Peak learning rate: every step's under lr_schedule=constant without warm-up."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """How the lr moves over the run's rounds x mini_batches optimizer steps, after any warm-up: constant, or
    linear / cosine decay to min_lr_ratio x lr at the last step (opd/learner/lr_schedule.py)."""
    warmup_steps: int = 0
    """Optimizer steps over which the lr rises linearly from 0 to lr before the schedule starts."""
    min_lr_ratio: float = 0.0
    """Where linear / cosine decay ends, as a fraction of lr."""
    weight_decay: float = 0.0
    """AdamW's (decoupled) weight decay, on every trainable weight."""
    micro_batch_size: int = 32
    """Sequences per forward/backward on one shard (unless max_tokens_per_micro_batch packs by tokens)."""
    max_tokens_per_micro_batch: int = 0
    """Pack each shard's samples, longest first, into micro-batches of at most this many padded tokens (rows x
    longest sequence; a longer one trains alone) instead of micro_batch_size sequences; 0 is off. The step is
    still one token mean; shards agree on the number of micro-batches (a collective)."""
    loss_chunk_tokens: int = 0
    """Score the loss over chunks of about this many tokens (LM head, float32 log-softmax and divergence per
    chunk, recomputed in the backward), so no float32 [batch, positions, vocabulary] logits exist for the whole
    micro-batch: for long responses and large vocabularies. 0 is off (full logits at once)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward (Hugging Face gradient checkpointing,
    non-reentrant) instead of keeping them: less memory for about a third more compute."""
    mini_batches: int = 1
    """Optimizer steps per round: the round's samples are split into this many batches."""
    grad_clip: float = 1.0
    """Clip the gradient's global norm to this before each optimizer step (DeepSpeed gradient_clipping); 0: no
    clipping."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend: auto picks nccl when the shards reserve GPUs (gpus_per_shard > 0), else gloo."""
    bf16: bool = True
    """Train in bf16 on GPUs (CPU always trains in fp32)."""
    gpus_per_shard: float = 0
    """GPUs each shard's actor reserves: 0 (CPU) or 1 (a shard trains on one GPU); a fraction only for a single
    shard, or colocated where the rollout worker's share makes up the rest of the GPU."""
    cpus_per_shard: float = 1
    """CPUs each shard's actor reserves in Ray."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters on the student; rank 0 (the default) trains every weight."""

    def __post_init__(self) -> None:
        at_least_one("learner", self, "num_shards", "micro_batch_size", "mini_batches")
        for key in ("max_tokens_per_micro_batch", "loss_chunk_tokens"):
            if getattr(self, key) < 0:
                raise ConfigError(f"learner.{key}={getattr(self, key)} must be >= 0 (0 is off)")
        if self.lr <= 0:
            raise ConfigError(f"learner.lr={self.lr} must be > 0")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"learner.zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        if self.warmup_steps < 0:
            raise ConfigError(f"learner.warmup_steps={self.warmup_steps} must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"learner.min_lr_ratio={self.min_lr_ratio} must lie in [0, 1]")


@dataclass
class LossConfig:
    type: str = "reverse_kl"
    """The objective by name: opd/learner/loss_types.py declares them (README "Losses" compares them)."""
    beta: float = 0.5
    """loss.type=jsd: the generalized JSD's interpolation (GKD's beta): 0 is forward KL, 1 is reverse KL."""
    top_k: int = 8
    """Teacher alternatives kept per token (top-k KL / JSD on top-k logits)."""
    is_cap: float = 2.0
    """Cap on the importance weight between the learner and the sampling policy."""
    discount: float = 0.0
    """reverse_kl: each token's advantage is its reward plus the later ones' discounted by this (0: its own reward
    only; 1: the whole rest of the response, the exact sequence-level gradient). See opd/advantages.py."""
    baseline: str = "none"
    """reverse_kl: none; group (subtract, per position, the mean return of the prompt's other samples); optimal
    (subtract, per position, the variance-minimising constant at the logits, from the student's distribution and
    the teacher's top-k)."""
    normalize_advantages: bool = False
    """reverse_kl: divide each round's advantages by their standard deviation."""
    tail: str = "bucket"
    """jsd at beta=1 (reverse KL): the vocabulary outside the teacher's top-k as one "rest" category (bucket), or
    the full-vocabulary KL, exact over the top-k and estimated from each sampled token elsewhere (sampled; for a
    student far from its teacher over a large vocabulary, opd/losses.py reverse_kl_sampled_tail_per_token)."""

    def __post_init__(self) -> None:
        one_of("loss.type", self.type, LOSS_TYPES.names())
        one_of("loss.baseline", self.baseline, BASELINES)
        one_of("loss.tail", self.tail, TAILS)
        if self.tail == "sampled" and (self.type != "jsd" or self.beta != 1.0):
            raise ConfigError(
                f"loss.tail=sampled estimates the reverse KL's tail: it needs loss.type=jsd and loss.beta=1, "
                f"not loss.type={self.type} loss.beta={self.beta}"
            )
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"loss.beta={self.beta} must lie in [0, 1]")
        if not 0.0 <= self.discount <= 1.0:
            raise ConfigError(f"loss.discount={self.discount} must lie in [0, 1]")
        if self.baseline == "optimal" and self.normalize_advantages:
            raise ConfigError(
                "loss.normalize_advantages scales the driver's advantages by their deviation before "
                "loss.baseline=optimal is subtracted in the learner: use one of the two"
            )
        if self.type != "reverse_kl":
            for key, default in (("discount", 0.0), ("baseline", "none"), ("normalize_advantages", False)):
                if getattr(self, key) != default:
                    raise ConfigError(f"loss.{key} shapes reverse_kl's advantages; loss.type={self.type} has none")
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
    export_every: int = 0
    """Write the student as a Hugging Face checkpoint, with provenance.json and DISTILLATION.md, to
    output_dir/student_round_N every N rounds while the run goes on; 0 never (output_dir/student is always
    written at the end)."""

    def __post_init__(self) -> None:
        if self.export_every < 0:
            raise ConfigError(f"checkpoint.export_every={self.export_every} must be >= 0")


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
    """When a learner shard or a replay-buffer shard dies, restart every actor from the last checkpoint this many
    times."""

    def __post_init__(self) -> None:
        at_least_one("faults", self, "max_nonfinite_steps")


@dataclass
class WandbConfig:
    """Weights & Biases logging of every round's metrics and sample tables."""

    mode: Literal["online", "offline", "disabled"] = "offline"
    """online: stream to the W&B server; offline: write the W&B run under output_dir/wandb (upload later with `wandb
    sync`); disabled: no W&B. The summary, metrics and curves in output_dir are written either way."""
    project: str = "opd"
    """W&B project the run is logged to."""
    group: str | None = None
    """W&B group the run joins; None: none (--multirun groups its runs under the sweep's name)."""
    name: str | None = None
    """W&B run name; None: W&B picks one (--multirun names each run after its grid point)."""
    entity: str | None = None
    """W&B team or user the project belongs to; None: the API key's default entity (or WANDB_ENTITY)."""
    tags: list[str] = field(default_factory=list)
    """W&B tags of the run, e.g. [qwen, sweep-3], to filter runs by in the W&B UI."""


@dataclass
class RayConfig:
    address: str | None = None
    """Existing cluster to join (or set RAY_ADDRESS); a local one is started otherwise."""
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement-group strategy for each role's actors: PACK fills few nodes, SPREAD spreads over many."""
    placement_timeout_s: float = 120.0
    """How long to wait for the cluster to place every role before failing with the plan."""
    keep_freed_memory: bool = True
    """On a run that reserves no GPU, every actor's process keeps the memory it frees for reuse (glibc malloc:
    no mmap, no trimming) instead of handing each tensor over 32 MB back to the kernel and faulting it in again,
    zeroed, on the next step. A CPU step then stops paying page faults; a process stays at its high-water mark."""
    gloo_socket_ifname: str = ""
    """The network interface gloo connects over (GLOO_SOCKET_IFNAME in every actor, e.g. eth0): the learner's
    process group on CPU and the gloo weight sync to the rollout workers. Needed on a multi-node cluster whose
    hostnames resolve to addresses the other nodes cannot reach (127.0.1.1, a container bridge), where gloo would
    otherwise stall. Empty: gloo uses the hostname's address, unless the cluster's environment sets the variable."""
