"""Start a run: the checks that need the models, the placement plan, then every actor group, in order.

Everything that can refuse the run (a GPU build of vLLM asked to run on CPU, top-k larger than the vocabulary,
tokenizers that cannot be mixed, a misspelt verifier, prompts with no room for a response, an `output_dir` some
node of the cluster does not see) is checked here before any actor starts; then the groups come up (engines take
a minute to load) and are handed to the `Controller`, which only runs rounds.
"""

from __future__ import annotations

import time
from functools import partial

import ray

from opd import plan, shared_storage
from opd.buffer.sharded import ShardedBuffer
from opd.compat import check_cpu_attention, check_top_k, cross_tokenizer_teachers
from opd.config import ConfigError, OPDConfig
from opd.config.schema import weight_backend
from opd.controller import Controller
from opd.data import Prompt, encode
from opd.evaluation import Evaluator
from opd.learner.group import LearnerGroup
from opd.monitoring import Monitor
from opd.provenance import StudentCard
from opd.rollout.group import RolloutGroup
from opd.teachers import judge
from opd.teachers.combine import routed_teacher
from opd.teachers.feedback import Feedback
from opd.teachers.pool import TeacherPool


def eval_verifier_name(cfg: OPDConfig) -> str:
    """`eval.verifier`, or the judge's verifier when there is one, else the last-number rule."""
    if cfg.eval.verifier is not None:
        return cfg.eval.verifier
    return cfg.judge.verifier if cfg.judge.kind == "verifier" else "exact_answer"


def resolve_verifier(key: str, spec: str) -> judge.Verifier:
    """Resolved before any actor starts, so a misspelt `module:function` is an error naming the key at once."""
    try:
        return judge.get_verifier(spec)
    except ValueError as err:
        raise ConfigError(f"{key}: {err}") from None


def start(
    cfg: OPDConfig,
    student: str,
    teachers: dict[str, str],
    train: list[Prompt],
    evals: dict[str, list[Prompt]],
    monitor: Monitor,
    card: StudentCard | None = None,
) -> Controller:
    """Check, then start every actor of the run (Ray is already up); returns the controller that runs it, which
    writes each saved student's provenance with `card`."""
    from transformers import AutoTokenizer

    plan.check_vllm_build(cfg)
    tokenizer = AutoTokenizer.from_pretrained(student)
    check_top_k(cfg.loss.top_k, len(tokenizer))
    check_cpu_attention(cfg, student, teachers)
    bridged = cross_tokenizer_teachers(tokenizer, teachers, cfg.combine.rule)
    verifier = resolve_verifier("judge.verifier", cfg.judge.verifier) if cfg.judge.kind == "verifier" else None
    eval_verifier = resolve_verifier("eval.verifier", eval_verifier_name(cfg))
    limit = cfg.rollout.engine.max_model_len - cfg.rollout.max_new_tokens
    route = partial(routed_teacher, cfg.combine) if cfg.combine.rule == "route" else None
    data = cfg.data
    train_set, too_long = encode(tokenizer, train, limit, data.train, route, data.on_error, data)
    eval_sets, too_long_eval = {}, 0
    for name, source in data.eval_sets().items():
        eval_sets[name], skipped = encode(
            tokenizer, evals[name][: data.eval_size], limit, source, route, data.on_error, data
        )
        too_long_eval += skipped
    if too_long or too_long_eval:
        print(f"skipped {too_long} train and {too_long_eval} eval prompts too long for the context", flush=True)

    t0 = time.perf_counter()
    plan.check_fit(cfg, ray.cluster_resources())
    shared_storage.check_cluster(cfg.output_dir)  # checkpoints are written from every learner rank's node
    print(plan.describe(cfg), flush=True)
    groups = plan.reserve(cfg)
    print(
        f"starting {cfg.rollout.num_workers} rollout workers (vLLM), "
        f"{sum(t.replicas for t in cfg.teachers)} teacher replicas, {cfg.learner.num_shards} learner shards "
        f"(DeepSpeed ZeRO-{cfg.learner.zero_stage}); engines take a minute to load",
        flush=True,
    )
    if bridged:
        print(f"teachers {bridged} have another tokenizer: their signal is re-tokenized through text", flush=True)
    backend = weight_backend(cfg)
    rollout = RolloutGroup(cfg, student, backend, groups["rollout"])
    pool = TeacherPool(
        cfg.teachers,
        cfg.combine,
        cfg.teacher_engine,
        cfg.rollout.temperature,
        cfg.seed,
        teachers,
        student,
        len(tokenizer),
        cfg.faults,
        cfg.loss.top_k,
        {t.name: groups[f"teacher:{t.name}"] for t in cfg.teachers},
        cfg.data,
    )
    feedback = Feedback(cfg, pool, tokenizer, {e.prompt.index: e for e in train_set}, verifier)
    buf = cfg.buffer
    buffer = ShardedBuffer(buf.num_shards, buf.capacity, buf.max_staleness, buf.order)
    if cfg.rollout.colocate:
        rollout.ready()  # vLLM sizes its KV cache from the free GPU memory: the learner must not allocate meanwhile
    learner = LearnerGroup(
        student,
        cfg.learner,
        cfg.loss,
        cfg.rollout.temperature,
        Controller.samples_per_step(cfg) // cfg.learner.mini_batches,
        cfg.rounds * cfg.learner.mini_batches,
        cfg.correction.sft_weight,
        cfg.faults.max_nonfinite_steps,
        groups["learner"],
        colocate=cfg.rollout.colocate,
    )
    rollout.ready()
    pool.ready()
    rollout.connect(learner)
    print(f"all actors ready in {time.perf_counter() - t0:.0f}s; weight sync over {backend}", flush=True)
    roles = {"rollout worker": rollout.workers, "learner shard": learner.shards}
    print(plan.placement(roles | {f"teacher {n}": r for n, r in pool.replicas.items()}), flush=True)
    evaluator = Evaluator(cfg, eval_sets, rollout, pool, feedback, tokenizer, eval_verifier)
    return Controller(cfg, train_set, rollout, pool, feedback, buffer, learner, evaluator, monitor, card)
