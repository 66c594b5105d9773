"""The sections that say what is distilled from what: engines, student, teachers and how they combine, judges,
corrections, and the prompt data."""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

from opd.catalog import BUILTIN, from_scratch, lookup
from opd.config.base import ConfigError, at_least_one, one_of
from opd.licenses import LicenseWarning, license_problems
from opd.secrets import split_userinfo
from opd.teachers.combine import RULES, SELECTING

COMBINE_RULES = (*RULES.names(), *SELECTING)
"""Every combine.rule: the merging rules of opd/teachers/combine.py, then those that pick one teacher per prompt.
The names are read from the modules that implement them (numpy at most, no torch): one list, no copies."""


@dataclass
class EngineConfig:
    """vLLM engine settings shared by rollout workers and vLLM teachers."""

    dtype: str = "auto"
    """Weights dtype inside vLLM; `auto` keeps the checkpoint's."""
    max_model_len: int = 256
    """Longest prompt + response the engine accepts."""
    gpu_memory_utilization: float | None = None
    """Fraction of device memory vLLM may take (on CPU: of a NUMA node's RAM); None: 0.9 x the engine's share of its
    GPUs (0.9 on whole GPUs, 0.45 on half of one), 0.1 on CPU. The device is what the engine's actor reserves."""
    enforce_eager: bool | None = None
    """Skip CUDA graph capture (faster start-up, slower decoding); None: true on CPU, false on GPU. The device is
    what the engine's actor reserves."""
    tensor_parallel_size: int = 1
    """GPUs one engine shards over: equal to the GPUs its actor holds (rollout.gpus_per_worker,
    teachers.N.gpus_per_replica); 1 on a fraction of a GPU or on CPU."""
    kv_cache_memory_bytes: int | None = None
    """On GPU, the KV cache's size per GPU in bytes, instead of what `gpu_memory_utilization` leaves after vLLM's
    memory profiling. Set it with rollout.colocate: the learner shares the GPU, so free memory is no guide."""
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
    """The model being distilled: the one the rollout workers sample from and the learner trains."""

    model: str = f"{BUILTIN}addition-student"
    """Hugging Face id or local checkpoint dir; `builtin:addition-student` is built on first use."""


@dataclass
class TeacherConfig:
    """One teacher: its model, how it is run (vLLM, transformers or a server), its replicas and its terms."""

    name: str = "teacher"
    """Unique name that combine.routes, judge.teacher and correction.teacher refer to; it also labels the teacher
    in metrics, the run summary and provenance.json."""
    model: str = f"{BUILTIN}addition-teacher"
    """Hugging Face id or local checkpoint dir; with backend=openai, the name the server serves the model under."""
    backend: Literal["vllm", "transformers", "openai"] = "vllm"
    """vllm: top-k log-probs via prompt_logprobs (temperature 1). transformers: full logits. openai: a teacher
    served elsewhere, reached at `url` (a vLLM OpenAI-compatible server; opd/teachers/served.py)."""
    url: str = ""
    """backend=openai: the server's `/v1` base, e.g. http://10.0.0.5:8000/v1."""
    tokenizer: str | None = None
    """backend=openai: a local dir with the served model's tokenizer and config.json or generation_config.json (no
    weights needed); default `model` when that is a local dir. Prompts travel as token ids, so opd must tokenize
    exactly as the server's model does."""
    api_key_env: str = ""
    """backend=openai: the NAME of the environment variable holding the server's API key (empty: none). The key
    itself is read on the driver when the run starts and never written to config, logs or provenance."""
    max_concurrency: int = 4
    """backend=openai: requests each replica keeps in flight."""
    request_timeout_s: float = 120.0
    """backend=openai: how long one HTTP request may take before it is given up and retried. Separate from
    faults.teacher_timeout_s, the deadline of a whole teacher call of many requests: a request stuck on a dropped
    connection is retried within the call instead of using up the call's whole time."""
    weight: float = 1.0
    """Its share when a merging combine.rule (mean_logprob, mixture) merges several teachers' signals, normalised
    over the teachers scoring the sample; 0: it scores only samples routed to it."""
    replicas: int = 1
    """Copies of the teacher, each an actor with the model loaded (or, served, a client); calls are split evenly
    over them."""
    gpus_per_replica: float = 0
    """GPUs each replica reserves (a fraction shares a GPU); with backend=vllm, whole GPUs are the engine's
    tensor-parallel size (teacher_engine.tensor_parallel_size). 0 on CPU and for backend=openai."""
    cpus_per_replica: float = 1
    """CPUs each replica reserves in Ray; a served teacher (backend=openai) reserves 0.1 whatever this says."""
    license: str = "unspecified"
    """SPDX-style id (apache-2.0, mit, llama3.1, gemma, ...) or proprietary-api; checked by the licence gate
    (opd/licenses.py) and recorded in the student's provenance.json."""
    source: str = ""
    """Where the teacher came from (hub id and revision, URL, internal registry); recorded with the student."""
    accept_terms: str = ""
    """For a teacher whose terms restrict training other models: why this use is allowed (e.g. a written
    agreement). Empty refuses such a teacher; any text lets it run and is recorded in provenance.json."""

    def __post_init__(self) -> None:
        """A built-in teacher made from third-party weights (builtin:smollm2-135m-instruct) carries their licence
        and source unless the entry says otherwise."""
        entry = lookup(self.model)
        if entry is not None and entry.licence is not None and self.license == "unspecified":
            self.license, self.source = entry.licence, self.source or entry.source

    @property
    def from_scratch(self) -> bool:
        """Made by opd from random weights (the addition built-ins), so no third party's terms apply."""
        return from_scratch(self.model)

    @property
    def tokenizer_path(self) -> str:
        """Where this teacher's tokenizer is read: `tokenizer` for a served teacher that names one, else `model`."""
        return self.tokenizer or self.model


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
        if t.backend == "openai":
            check_served(i, t)
    errors, notes = license_problems(teachers)
    if errors:
        raise ConfigError("; ".join(errors))
    for note in notes:
        warnings.warn(note, LicenseWarning, stacklevel=2)


def check_served(i: int, t: TeacherConfig) -> None:
    """A served teacher needs a URL the client can reach and reserves no GPU (the server holds the model)."""
    if not re.match(r"^https?://[^/\s]+", t.url):
        raise ConfigError(f"teachers.{i}.url={t.url!r}: backend=openai needs the server's base URL, http(s)://HOST/v1")
    if t.gpus_per_replica:
        raise ConfigError(
            f"teachers.{i}.gpus_per_replica={t.gpus_per_replica}: a served teacher (backend=openai) "
            "holds no model, so it reserves no GPU"
        )
    if t.max_concurrency < 1:
        raise ConfigError(f"teachers.{i}.max_concurrency={t.max_concurrency} must be >= 1")
    if t.request_timeout_s <= 0:
        raise ConfigError(f"teachers.{i}.request_timeout_s={t.request_timeout_s} must be > 0")
    if t.api_key_env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", t.api_key_env):
        raise ConfigError(
            f"teachers.{i}.api_key_env must be the NAME of an environment variable holding the key, not the key "
            "itself (keys never go in a config)"
        )
    parts = urllib.parse.urlsplit(t.url)
    credentials = bool(t.api_key_env or parts.username or parts.password)
    if credentials and parts.scheme == "http" and not _loopback(parts.hostname or ""):
        url = split_userinfo(t.url)[0]
        raise ConfigError(
            f"teachers.{i}.url={url}: a key or password would cross the network in clear over http; use https "
            "(vLLM's --ssl-keyfile/--ssl-certfile, or a TLS proxy). Plain http is kept for loopback only"
        )


def _loopback(host: str) -> bool:
    """localhost or a loopback address: a request to it never leaves the machine."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    """kind=rubric: the most tokens the judging teacher writes (greedily) for its verdict."""
    use: Literal["record", "filter", "weight"] = "record"
    """record: log only; filter: drop samples scoring below min_score; weight: scale each sample's loss by its score."""
    min_score: float = 0.5
    """use=filter: samples scoring below this (scores are normalised to [0, 1]) get weight 0, so do not train."""
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
    """Turn teacher corrections on (mode=on_policy only); the tokens the teacher writes count towards
    max_teacher_tokens."""
    threshold: float = -4.0
    """A student token is unlikely when the teacher's log-prob of it is below this..."""
    outside_top_k: bool = True
    """...or (if true) when it is not among the teacher's loss.top_k most likely tokens."""
    teacher: str | None = None
    """The teacher that writes continuations (default: the sample's routed teacher, else the first)."""
    temperature: float = 0.0
    """Sampling temperature of the continuation (0: greedy)."""
    sft_weight: float = 1.0
    """Weight of the cross-entropy on the teacher's continuation tokens; each loss is a mean over its own tokens,
    and the two are mixed by their token counts."""

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
    """What to do with a malformed row, or a prompt too long for rollout.engine.max_model_len: skip it (counted) or
    stop, naming file and line."""
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
