"""The controller: rounds of generate -> teacher score -> buffer -> learn -> sync weights.

Resources are set up once (`setup`), then `run` reads top to bottom. Every remote call
is explicit, so what runs where, and in which order, is visible here.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import ray

from opd import checkpoint, plan
from opd.buffer import spill
from opd.buffer.sample import Sample
from opd.buffer.sharded import ShardedBuffer
from opd.config import OPDConfig
from opd.data import DataError, Prompt, is_correct
from opd.learner.group import LearnerGroup, mean_metrics
from opd.monitoring import Monitor
from opd.partition import chunks
from opd.rollout.worker import RolloutWorker
from opd.teachers import judge
from opd.teachers.combine import pick_best, route_teacher
from opd.teachers.correct import corrected, first_unlikely
from opd.teachers.pool import TeacherPool

AHEAD = "ahead.safetensors"
"""In a checkpoint: the async pipeline's samples for the next round, generated before the checkpoint."""


@dataclass
class Pending:
    """A generation in flight (refs), or done (samples): async rounds hold the next round's in `Controller.next`."""

    prompts: list[Encoded]
    args: tuple
    """(n, temperature, seed) of the launch, to re-issue it after a worker died."""
    refs: list
    samples: list[Sample] | None = None
    busy_s: float = 0.0


@dataclass
class Encoded:
    prompt: Prompt
    ids: list[int]
    teacher: str | None = None
    """The teacher this prompt is routed to (combine.rule=route, or best_of once judged), else None."""


def encode(
    tokenizer, prompts: list[Prompt], limit: int, source: str, route=None, on_error: str = "fail"
) -> tuple[list[Encoded], int]:
    """Tokenize prompts (and route each to a teacher). Returns them and how many were skipped.

    A prompt with no room for a response is an error naming file and line, or skipped and counted
    with `data.on_error=skip`; an unroutable prompt is always an error (it means a wrong routing table).
    """
    out, skipped = [], 0
    for p in prompts:
        where = f"{source}:{p.line}" if p.line > 0 else f"{source}: prompt #{p.index + 1}"
        ids = tokenizer.encode(p.text)
        if len(ids) > limit:
            if on_error == "skip":
                skipped += 1
                continue
            raise DataError(
                f"{where}: prompt is {len(ids)} tokens; with rollout.max_new_tokens the limit is {limit} "
                "(raise rollout.engine.max_model_len, shorten it, or set data.on_error=skip)"
            )
        try:
            teacher = route(p) if route else None
        except ValueError as err:
            raise DataError(f"{where}: {err}") from None
        out.append(Encoded(p, ids, teacher))
    if not out:
        raise DataError(f"{source}: no prompt fits the context ({skipped} too long)")
    return out, skipped


def _assigned(prompts: list[Encoded]) -> dict[str, str]:
    """Prompt position -> teacher, for prompts a teacher was picked for (saved, since best_of picks are costly)."""
    return {str(i): e.teacher for i, e in enumerate(prompts) if e.teacher is not None}


def _route(combine, prompt: Prompt) -> str:
    return route_teacher(prompt.fields, combine.route_field, combine.routes, combine.default)


class IncompatibleModels(ValueError):
    """Student and teachers cannot be paired as configured (found before any actor starts)."""


def check_top_k(top_k: int, vocab_size: int) -> None:
    if top_k > vocab_size:
        raise IncompatibleModels(f"loss.top_k={top_k} is larger than the student's vocabulary ({vocab_size} tokens)")


def cross_tokenizer_teachers(student_tokenizer, teachers: dict[str, str], rule: str) -> list[str]:
    """Teachers whose vocabulary differs from the student's: their signal is bridged through text.

    A bridged teacher's log-probs are exact per word-piece sequence (chain rule) but not per student token,
    so rules that stay exact under re-bracketing (sums of log-probs: mean_logprob; one teacher per prompt:
    route, best_of) work, while a per-token `mixture` of probabilities would be meaningless.
    """
    from transformers import AutoTokenizer

    vocab = student_tokenizer.get_vocab()
    bridged = [name for name, path in teachers.items() if AutoTokenizer.from_pretrained(path).get_vocab() != vocab]
    if bridged and rule == "mixture" and len(teachers) > 1:
        raise IncompatibleModels(
            f"teachers {bridged} use another tokenizer than the student; combine.rule=mixture mixes per-token "
            "probabilities, which is undefined across tokenizations: use mean_logprob, route or best_of"
        )
    return bridged


def reverse_kl(samples: list[Sample]) -> float:
    """Per-token Monte Carlo estimate of KL(student || teacher) on the tokens the student wrote itself."""
    tokens = sum(s.student_tokens for s in samples)
    gap = sum(float((s.logprobs - s.teacher_logprobs)[: s.student_tokens].sum()) for s in samples)
    return gap / max(tokens, 1)


class Controller:
    def __init__(
        self,
        cfg: OPDConfig,
        student: str,
        teachers: dict[str, str],
        train: list[Prompt],
        evals: list[Prompt],
        monitor: Monitor,
    ) -> None:
        from transformers import AutoTokenizer

        self.cfg, self.student, self.teacher_paths, self.monitor = cfg, student, teachers, monitor
        self.tokenizer = AutoTokenizer.from_pretrained(student)
        check_top_k(cfg.loss.top_k, len(self.tokenizer))
        self.bridged = cross_tokenizer_teachers(self.tokenizer, teachers, cfg.combine.rule)
        self.verifier = judge.get_verifier(cfg.judge.verifier) if cfg.judge.kind == "verifier" else None
        limit = cfg.rollout.engine.max_model_len - cfg.rollout.max_new_tokens
        route = partial(_route, cfg.combine) if cfg.combine.rule == "route" else None
        self.train, too_long = encode(self.tokenizer, train, limit, cfg.data.train, route, cfg.data.on_error)
        self.evals, too_long_eval = encode(
            self.tokenizer, evals[: cfg.data.eval_size], limit, cfg.data.eval, route, cfg.data.on_error
        )
        if too_long or too_long_eval:
            print(f"skipped {too_long} train and {too_long_eval} eval prompts too long for the context", flush=True)
        self.by_index = {e.prompt.index: e for e in self.train}
        self.rng = random.Random(cfg.seed)
        self.order: list[int] = []
        self.version = 0
        self.teacher_tokens = 0
        self.signal_share: dict[str, float] = {}
        self.rollout_restarts = 0
        self.examples: list[dict] = []
        self.next: Pending | None = None
        """async: the next round's generation, launched before this round learns."""
        made = cfg.rollout.prompts_per_round * cfg.rollout.samples_per_prompt
        self.train_per_round = cfg.buffer.train_per_round or made
        """Samples each learner step takes from the buffer."""

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        t0 = time.perf_counter()
        plan.check_fit(cfg, ray.cluster_resources())
        print(plan.describe(cfg), flush=True)
        self.groups = plan.reserve(cfg)
        print(
            f"starting {cfg.rollout.num_workers} rollout workers (vLLM), "
            f"{sum(t.replicas for t in cfg.teachers)} teacher replicas, {cfg.learner.num_shards} learner shards "
            f"(DeepSpeed ZeRO-{cfg.learner.zero_stage}); engines take a minute to load",
            flush=True,
        )
        if self.bridged:
            print(
                f"teachers {self.bridged} have another tokenizer: their signal is re-tokenized through text", flush=True
            )
        backend = cfg.rollout.weight_sync
        if backend == "auto":
            gpu = cfg.rollout.gpus_per_worker > 0
            backend = "ipc" if cfg.rollout.colocate else "nccl" if gpu else "gloo"
        self.sync_backend = backend
        self.rollout = self.spawn_rollout()
        self.teachers = TeacherPool(
            cfg.teachers,
            cfg.combine,
            cfg.teacher_engine,
            cfg.rollout.temperature,
            cfg.seed,
            self.teacher_paths,
            self.student,
            len(self.tokenizer),
            cfg.faults,
            cfg.loss.top_k,
            {t.name: self.groups[f"teacher:{t.name}"] for t in cfg.teachers},
        )
        buf = cfg.buffer
        self.buffer = ShardedBuffer(buf.num_shards, buf.capacity, buf.max_staleness, buf.order)
        self.learner = LearnerGroup(
            self.student,
            cfg.learner,
            cfg.loss,
            cfg.rollout.temperature,
            self.train_per_round // cfg.learner.mini_batches,
            cfg.correction.sft_weight,
            cfg.faults.max_nonfinite_steps,
            self.groups["learner"],
        )
        ray.get([w.ready.remote() for w in self.rollout])
        self.teachers.ready()
        self.learner.connect_rollout(self.rollout, cfg.rollout.engine.tensor_parallel_size, backend)
        print(f"all actors ready in {time.perf_counter() - t0:.0f}s; weight sync over {backend}", flush=True)
        roles = {"rollout worker": self.rollout, "learner shard": self.learner.shards}
        print(plan.placement(roles | {f"teacher {n}": r for n, r in self.teachers.replicas.items()}), flush=True)

    def spawn_rollout(self) -> list:
        cfg = self.cfg.rollout
        worker = ray.remote(num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker)(RolloutWorker)
        return [
            worker.options(**plan.slot(self.groups["rollout"], i)).remote(
                self.student, cfg.engine, self.sync_backend, self.cfg.seed + i, cfg.colocate
            )
            for i in range(cfg.num_workers)
        ]

    def sync_weights(self) -> dict[str, float]:
        """Push the learner's weights to every rollout worker, replacing the group first if a worker died
        (a broadcast to a dead peer would hang until the collective times out)."""
        try:
            ray.get([w.ready.remote() for w in self.rollout], timeout=120)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            self.restart_rollout()
        sync = self.learner.send_weights()
        self.version = int(sync["version"])
        ray.get([w.set_version.remote(self.version) for w in self.rollout])
        return sync

    def restart_rollout(self) -> None:
        """Replace every rollout worker after one died: the weight-transfer group spans them all, so it is rebuilt
        and the learner's current weights are pushed before any request is re-issued."""
        self.rollout_restarts += 1
        print(f"WARNING: a rollout worker died; restarting the rollout group (restart {self.rollout_restarts})")
        for w in self.rollout:
            ray.kill(w, no_restart=True)
        self.rollout = self.spawn_rollout()
        ray.get([w.ready.remote() for w in self.rollout])
        self.learner.connect_rollout(self.rollout, self.cfg.rollout.engine.tensor_parallel_size, self.sync_backend)
        self.learner.send_weights()
        ray.get([w.set_version.remote(self.version) for w in self.rollout])

    # -- the loop ------------------------------------------------------------------------------
    def run(self, resume: Path | None = None) -> dict:
        """Rounds until `cfg.rounds`, from the start or from the checkpoint `resume`; returns the summary."""
        from tqdm import tqdm

        cfg = self.cfg
        start = 0
        if resume is None:
            before = self.evaluate()
            self.monitor.log({**before, "teacher_accuracy": self.teacher_accuracy()}, step=0)
        else:
            start = self.restore(resume)
            print(f"resumed from {resume} at round {start}, policy version {self.version}", flush=True)
        bar = tqdm(range(start + 1, cfg.rounds + 1), desc="distilling", unit="round", dynamic_ncols=True)
        bar.update(start)
        for r in bar:
            metrics = self.round()
            if r % cfg.eval.every == 0 or r == cfg.rounds:
                metrics |= self.evaluate()
                self.monitor.table("samples", self.examples, step=r)
            self.monitor.log(metrics, step=r)
            if cfg.checkpoint.every and (r % cfg.checkpoint.every == 0 or r == cfg.rounds):
                self.save_checkpoint(r)
            bar.set_postfix(
                {k: f"{metrics[k]:.3g}" for k in ("train/reverse_kl", "eval/student_accuracy") if k in metrics}
            )
        student_path = os.path.abspath(os.path.join(cfg.output_dir, "student"))
        self.learner.save(student_path)
        first, last = self.monitor.history[0], self.monitor.history[-1]
        final = {
            "teacher_accuracy": first.get("teacher_accuracy"),
            "student_accuracy_before": first.get("eval/student_accuracy"),
            "student_accuracy_after": last.get("eval/student_accuracy"),
            "reverse_kl_before": first["eval/reverse_kl"],
            "reverse_kl_after": last["eval/reverse_kl"],
            "teacher_tokens": self.teacher_tokens,
            "teacher_signal_share": self.signal_share,
            "rounds": cfg.rounds,
            "policy_version": self.version,
            "student_path": student_path,
        }
        return self.monitor.finish(final)

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, round_: int) -> None:
        """Learner, buffer and controller state for `round_`, complete or not at all (see opd/checkpoint.py)."""
        tmp = checkpoint.begin(self.cfg.output_dir, round_)
        self.learner.save_state(str(tmp / "learner"))
        self.buffer.save(tmp / "buffer")
        state = {
            "round": round_,
            "version": self.version,
            "teacher_tokens": self.teacher_tokens,
            "signal_share": self.signal_share,
            "order": self.order,
            "rng": checkpoint.rng_state(self.rng),
            "history": self.monitor.history,
            "wandb_id": self.monitor.run_id,
            "assigned": {"train": _assigned(self.train), "eval": _assigned(self.evals)},
        }
        # async: the next round's samples (already generated, see `round`) travel with the checkpoint, so a
        # resumed run trains on exactly what an uninterrupted one would.
        if self.next is not None:
            state["ahead"] = [e.prompt.index for e in self.next.prompts]
            spill.save(self.next.samples, tmp / AHEAD)
        checkpoint.commit(tmp, state, self.cfg.checkpoint.keep)

    def restore(self, path: Path) -> int:
        """Load a checkpoint into the running actors and push its weights to the rollout workers."""
        state = checkpoint.load(path)
        if "ahead" in state:
            self.next = Pending([self.by_index[i] for i in state["ahead"]], (), [], spill.load(path / AHEAD))
        step = self.learner.load_state(str(path / "learner"))
        if step != state["version"]:
            raise RuntimeError(f"{path}: learner step {step} does not match policy version {state['version']}")
        self.buffer.load(path / "buffer")
        self.version, self.teacher_tokens = state["version"], state["teacher_tokens"]
        self.signal_share, self.order = state["signal_share"], state["order"]
        checkpoint.set_rng_state(self.rng, state["rng"])
        for name, encoded in (("train", self.train), ("eval", self.evals)):
            for index, teacher in state["assigned"][name].items():
                encoded[int(index)].teacher = teacher
        self.learner.send_weights()
        ray.get([w.set_version.remote(self.version) for w in self.rollout])
        return state["round"]

    def launch_round(self) -> Pending:
        """The next round's prompts, generating with the weights the rollout workers hold now."""
        cfg = self.cfg
        prompts = self.next_prompts(cfg.rollout.prompts_per_round)
        if cfg.combine.rule == "best_of":
            self.assign_best_teachers(prompts)
        return self.launch(prompts, cfg.rollout.samples_per_prompt, cfg.rollout.temperature, seed=self.version)

    def round(self) -> dict[str, float]:
        cfg = self.cfg
        t_round = time.perf_counter()
        if cfg.mode == "on_policy":
            pending, self.next = self.next or self.launch_round(), None
            samples, gen_busy = self.collect(pending)
            if cfg.pipeline.mode == "async":  # round r+1 generates while round r is scored and learned
                self.next = self.launch_round()
        else:
            prompts = self.next_prompts(cfg.rollout.prompts_per_round)
            t0 = time.perf_counter()
            samples = self.teacher_samples(prompts, cfg.rollout.samples_per_prompt, cfg.rollout.temperature)
            gen_busy = time.perf_counter() - t0
        gen_wait = time.perf_counter() - t_round
        tokens = sum(s.num_tokens for s in samples)

        t0 = time.perf_counter()
        extra: dict[str, float] = {}
        if cfg.mode == "on_policy":
            share = self.teachers.score(samples, cfg.loss.top_k)
            for name, n in share.items():
                self.signal_share[name] = self.signal_share.get(name, 0.0) + n
                extra[f"teachers/{name}_samples"] = n
            # Before corrections: the student's own samples, so this is the unbiased on-policy estimate.
            extra["train/reverse_kl"] = reverse_kl(samples)
        if cfg.judge.kind != "none":
            extra |= self.judge(samples)
        shown = [s.response_ids for s in samples[: self.SHOWN]]
        if cfg.correction.enabled:
            extra |= self.correct(samples)
        self.examples = self.sample_rows(samples[: self.SHOWN], shown)
        score_s = time.perf_counter() - t0
        self.teacher_tokens += tokens

        self.buffer.add(samples)
        batch, buffer_stats = self.buffer.take(self.train_per_round, self.version)

        if cfg.rollout.colocate:  # hand the shared GPUs to the learner
            ray.get([w.sleep.remote() for w in self.rollout])
        t0 = time.perf_counter()
        learner = [self.learner.train_step(mb) for mb in chunks(batch, cfg.learner.mini_batches)]
        learn_s = time.perf_counter() - t0
        if cfg.rollout.colocate:
            ray.get([w.wake_up.remote() for w in self.rollout])
        if self.next is not None:  # new weights land once the in-flight generation is done with the old ones
            self.collect(self.next)
        sync = self.sync_weights()
        round_s = time.perf_counter() - t_round

        metrics = {f"learner/{k}": v for k, v in mean_metrics(learner).items()}
        # The sync check: only the first mini-batch meets a learner that has not moved since the weights went out.
        metrics["learner/sampler_learner_logprob_gap"] = learner[0]["sampler_learner_logprob_gap"]
        metrics |= {f"buffer/{k}": v for k, v in buffer_stats.items()}
        teacher_bytes = sum(s.teacher_nbytes for s in samples)
        metrics |= {
            "train/response_tokens": tokens / len(samples),
            "train/teacher_tokens": float(self.teacher_tokens),
            "pipeline/round_s": round_s,
            "pipeline/generate_s": gen_busy,
            "pipeline/generate_wait_s": gen_wait,
            "pipeline/score_s": score_s,
            "pipeline/learn_s": learn_s,
            "pipeline/sync_s": sync["weight_sync_s"],
            "pipeline/learner_idle_fraction": 1.0 - learn_s / round_s,
            "pipeline/samples_per_s": len(samples) / round_s,
            "pipeline/teacher_bytes_per_token": teacher_bytes / max(tokens, 1),
            "tokens_per_s": tokens / max(gen_busy, 1e-9),
            "scored_tokens_per_s": tokens / max(score_s, 1e-9),
            "weight_sync_s": sync["weight_sync_s"],
            "weight_sync_gb": sync["weight_sync_gb"],
            "weight_sync_gb_per_s": sync["weight_sync_gb_per_s"],
            "learner_step_s": sum(m["learner_step_s"] for m in learner),
            "policy_version": float(self.version),
            "faults/rollout_restarts": float(self.rollout_restarts),
        }
        return metrics | extra

    # -- pieces --------------------------------------------------------------------------------
    def next_prompts(self, n: int) -> list[Encoded]:
        """The next n training prompts: a seeded shuffle, reshuffled each epoch."""
        out = []
        while len(out) < n:
            if not self.order:
                self.order = list(range(len(self.train)))
                self.rng.shuffle(self.order)
            out.append(self.train[self.order.pop()])
        return out

    def generate(self, prompts: list[Encoded], n: int, temperature: float, seed: int | None) -> list[Sample]:
        """The student's samples, prompts spread evenly over the rollout workers."""
        return self.collect(self.launch(prompts, n, temperature, seed))[0]

    def launch(self, prompts: list[Encoded], n: int, temperature: float, seed: int | None) -> Pending:
        """Start generating on every rollout worker; `collect` waits for it."""
        parts = chunks(prompts, len(self.rollout))
        refs = []
        for i, (w, part) in enumerate(zip(self.rollout, parts, strict=True)):
            if not part:
                continue
            meta = [{"prompt_index": e.prompt.index, "answer": e.prompt.answer, "teacher": e.teacher} for e in part]
            # Non-negative: vLLM treats a negative seed as "unseeded", which made eval samples (seed -1) random.
            s = None if seed is None else (self.cfg.seed * 1_000_003 + seed * len(self.rollout) + i) % 2**31
            refs.append(
                w.generate.remote([e.ids for e in part], meta, n, self.cfg.rollout.max_new_tokens, temperature, s)
            )
        return Pending(prompts, (n, temperature, seed), refs)

    def collect(self, pending: Pending) -> tuple[list[Sample], float]:
        """The samples of a launch and the longest worker's busy seconds. A dead worker is replaced and the
        request re-issued (same seeds, so the same samples)."""
        failures = 0
        while pending.samples is None:
            try:
                parts = ray.get(pending.refs)
                pending.samples = [s for part, _ in parts for s in part]
                pending.busy_s = max((busy for _, busy in parts), default=0.0)
            except ray.exceptions.RayActorError:
                failures += 1
                if failures > self.cfg.faults.max_restarts:
                    raise
                self.restart_rollout()
                pending.refs = self.launch(pending.prompts, *pending.args).refs
        return pending.samples, pending.busy_s

    def teacher_samples(self, prompts: list[Encoded], n: int, temperature: float) -> list[Sample]:
        """Offline KD data: the teacher writes the responses the student will imitate."""
        outs = self.teachers.generate([e.ids for e in prompts], n, self.cfg.rollout.max_new_tokens, temperature, None)
        return self.as_samples(prompts, outs)

    SHOWN = 8
    """Samples per eval round in the W&B samples table (and samples.jsonl)."""

    def sample_rows(self, samples: list[Sample], written: list) -> list[dict]:
        """What a person reads to see what the student does: prompt, its response, the correction, the verdict."""
        decode = partial(self.tokenizer.decode, skip_special_tokens=True)
        return [
            {
                "prompt": decode(s.prompt_ids),
                "student_response": decode(ids),
                "teacher_correction": None
                if s.correction_start is None
                else decode(s.response_ids[s.correction_start :]),
                "corrected_at": s.correction_start,
                "judge_score": s.judge_score,
                "teacher": s.teacher,
                "policy_version": s.version,
            }
            for s, ids in zip(samples, written, strict=True)
        ]

    def judge(self, samples: list[Sample]) -> dict[str, float]:
        """Score every response as a whole, store it with the sample, and apply `judge.use`."""
        cfg = self.cfg.judge
        prompts = [self.by_index[s.prompt_index] for s in samples]
        texts = self.tokenizer.batch_decode([s.response_ids for s in samples], skip_special_tokens=True)
        records = self.judge_texts(prompts, texts)
        scores = [r.score for r in records]
        bonus = judge.group_advantage(scores, [s.prompt_index for s in samples])
        for s, score, b in zip(samples, scores, bonus, strict=True):
            s.judge_score = score
            s.advantage_bonus = cfg.advantage_coef * b
            if cfg.use == "weight":
                s.weight = score or 0.0
            elif cfg.use == "filter":  # kept in the batch with no weight, so every shard's step keeps its shape
                s.weight = float(score is not None and score >= cfg.min_score)
        metrics = judge.judge_summary(records)
        if cfg.use == "filter":
            metrics["judge/filtered_fraction"] = sum(s.weight == 0 for s in samples) / len(samples)
        return metrics

    def judge_texts(self, prompts: list[Encoded], texts: list[str]) -> list[judge.JudgeRecord]:
        """Verdicts on responses to `prompts`: a Python verifier, or a teacher reading the rubric."""
        cfg = self.cfg.judge
        if cfg.kind == "verifier":
            return [
                judge.run_verifier(self.verifier, t, e.prompt.answer, e.prompt.fields)
                for e, t in zip(prompts, texts, strict=True)
            ]
        asks = [judge.render_rubric(cfg.rubric, e.prompt.text, t) for e, t in zip(prompts, texts, strict=True)]
        verdicts = self.teachers.complete(cfg.teacher or self.teachers.default, asks, cfg.max_tokens, 0.0)
        too_long = judge.JudgeRecord(None, error="judge prompt does not fit the judge's context (raise max_model_len)")
        return [too_long if v is None else judge.parse_score(v) for v in verdicts]

    def assign_best_teachers(self, prompts: list[Encoded]) -> None:
        """combine.rule=best_of: each teacher answers each new prompt once; the best-judged one teaches it."""
        todo = [e for e in prompts if e.teacher is None]
        if not todo:
            return
        names = self.teachers.names
        texts = [e.prompt.text for e in todo]
        answers = {
            n: [a or "" for a in self.teachers.complete(n, texts, self.cfg.rollout.max_new_tokens, 0.0)] for n in names
        }
        verdicts = {n: self.judge_texts(todo, answers[n]) for n in names}
        for i, e in enumerate(todo):
            scores = {n: np.nan if verdicts[n][i].score is None else verdicts[n][i].score for n in names}
            e.teacher = pick_best(scores, names)

    def correct(self, samples: list[Sample]) -> dict[str, float | list]:
        """Teacher corrections, in place: cut each response at its first unlikely token, the teacher writes the rest."""
        cfg, budget = self.cfg.correction, self.cfg.rollout.max_new_tokens
        found = [
            first_unlikely(
                s.response_ids,
                s.teacher_logprobs,
                s.teacher_topk_ids,
                s.teacher_topk_logprobs,
                cfg.threshold,
                cfg.outside_top_k,
            )
            for s in samples
        ]
        todo = [(i, j) for i, j in enumerate(found) if j is not None]
        if todo:
            names = [cfg.teacher or samples[i].teacher or self.teachers.default for i, _ in todo]
            conts = self.teachers.correct(
                names,
                [samples[i].prompt_ids.tolist() for i, _ in todo],
                [samples[i].response_ids[:j].tolist() for i, j in todo],
                [budget - j for _, j in todo],
                cfg.temperature,
                self.cfg.seed + self.version,
            )
            for (i, j), cont in zip(todo, conts, strict=True):
                samples[i] = corrected(samples[i], j, cont)
        positions = [j for _, j in todo]
        return {
            "correction/rate": len(todo) / len(samples),
            "correction/mean_position": float(np.mean(positions)) if positions else float("nan"),
            "correction/teacher_tokens": float(sum(s.num_tokens - s.student_tokens for s in samples)),
            "correction/position": positions,
        }

    def evaluate(self) -> dict[str, float]:
        """Greedy accuracy and reverse KL to the teacher on the held-out prompts."""
        if self.cfg.combine.rule == "best_of":
            self.assign_best_teachers(self.evals)
        greedy = self.generate(self.evals, 1, 0.0, seed=None)
        accuracy = self.accuracy(greedy)
        metrics = {} if accuracy is None else {"eval/student_accuracy": accuracy}
        samples = self.generate(self.evals, self.cfg.eval.samples_per_prompt, self.cfg.rollout.temperature, seed=-1)
        self.teachers.score(samples, 1)
        metrics["eval/reverse_kl"] = reverse_kl(samples)
        return metrics

    def teacher_accuracy(self) -> float | None:
        outs = self.teachers.generate([e.ids for e in self.evals], 1, self.cfg.rollout.max_new_tokens, 0.0, None)
        return self.accuracy(self.as_samples(self.evals, outs))

    def as_samples(self, prompts: list[Encoded], outs: list) -> list[Sample]:
        """Wrap responses written by the teacher (n per prompt) as samples."""
        return [
            Sample(np.asarray(e.ids), ids, lps, self.version, e.prompt.index, e.prompt.answer)
            for e, pairs in zip(prompts, outs, strict=True)
            for ids, lps in pairs
        ]

    def accuracy(self, samples: list[Sample]) -> float | None:
        """Share of responses whose final answer matches; None when the prompts carry no answers."""
        if all(s.answer is None for s in samples):
            return None
        texts = self.tokenizer.batch_decode([s.response_ids for s in samples], skip_special_tokens=True)
        return sum(is_correct(t, s.answer) for t, s in zip(texts, samples, strict=True)) / len(samples)
