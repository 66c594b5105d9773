"""The controller: rounds of generate -> teacher score -> buffer -> learn -> sync weights.

Resources are set up once (`setup`), then `run` reads top to bottom. Every remote call
is explicit, so what runs where, and in which order, is visible here.
"""

from __future__ import annotations

import os
import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import ray

from opd import checkpoint, plan
from opd.buffer import spill
from opd.buffer.sample import Sample
from opd.buffer.sharded import ShardedBuffer
from opd.compat import check_top_k, cross_tokenizer_teachers
from opd.config import OPDConfig
from opd.data import Encoded, Prompt, encode, is_correct
from opd.learner.group import LearnerGroup, mean_metrics
from opd.monitoring import Monitor
from opd.partition import chunks
from opd.rollout.worker import RolloutWorker
from opd.teachers import judge
from opd.teachers.combine import route_teacher
from opd.teachers.feedback import Feedback, Scored, reverse_kl
from opd.teachers.pool import TeacherPool

AHEAD = "ahead.safetensors"
"""In an async checkpoint: the next round's samples, generated and scored before the checkpoint."""
GENERATED = "generated.safetensors"
"""In an async checkpoint: the samples of the round after the next, generated before the checkpoint."""


@dataclass
class Pending:
    """A round's generation in flight (refs) or done (samples), and the teachers' feedback on it."""

    prompts: list[Encoded]
    args: tuple
    """(n, temperature, seed) of the launch, to re-issue it after a worker died."""
    refs: list
    samples: list[Sample] | None = None
    busy_s: float = 0.0
    feedback: Future | None = None
    """Resolves to the `Scored` samples; async computes it on a thread while the learner trains."""
    generated: threading.Event = field(default_factory=threading.Event)
    """async: set by the feedback thread once it has the samples (or found a rollout worker dead)."""
    group: int = 0
    """The rollout group launched on (`Controller.rollout_restarts` then): a failure of a group already replaced
    needs a re-launch, not another replacement."""


def finished(value) -> Future:
    """A future that is already done: feedback computed in turn, or restored from a checkpoint."""
    out: Future = Future()
    out.set_result(value)
    return out


def _assigned(prompts: list[Encoded]) -> dict[str, str]:
    """Prompt position -> teacher, for prompts a teacher was picked for (saved, since best_of picks are costly)."""
    return {str(i): e.teacher for i, e in enumerate(prompts) if e.teacher is not None}


def _route(combine, prompt: Prompt) -> str:
    return route_teacher(prompt.fields, combine.route_field, combine.routes, combine.default)


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
        # Resolved here, before any actor starts: a misspelt `module:function` is an error within seconds.
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
        self.ahead: Pending | None = None
        """async: the next round, generated and being scored on `self.background` while this round learns."""
        self.generating: list[Pending] = []
        """async: the `pipeline.depth` rounds after the next, oldest first; the newest generates with the weights
        of this round's sync, the others are generated and wait for the feedback thread."""
        self.background = ThreadPoolExecutor(1, thread_name_prefix="opd-feedback")
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
        self.feedback = Feedback(cfg, self.teachers, self.tokenizer, self.by_index, self.verifier)
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
        # The workers take up the learner's version, not `self.version`: in async the learner has stepped since the
        # last sync.
        self.learner.send_weights()

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
            metrics = self.round(r)
            if r % cfg.eval.every == 0 or r == cfg.rounds:
                metrics |= self.evaluate()
                self.monitor.table("samples", self.examples, step=r)
            self.monitor.log(metrics, step=r)
            if cfg.checkpoint.every and (r % cfg.checkpoint.every == 0 or r == cfg.rounds):
                self.save_checkpoint(r)
            bar.set_postfix(
                {k: f"{metrics[k]:.3g}" for k in ("train/reverse_kl", "eval/student_accuracy") if k in metrics}
            )
        self.background.shutdown()
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
        # async: the next round's samples (generated and scored, see `round`) and the following round's
        # (generated) travel with the checkpoint, so a resumed run trains on exactly what an uninterrupted one would.
        if self.ahead is not None:
            scored = self.ahead.feedback.result()
            state["ahead"] = {"generate_s": self.ahead.busy_s, "feedback": scored.to_state()}
            spill.save(scored.samples, tmp / AHEAD)
        if self.generating:
            state["generated"] = [[e.prompt.index for e in p.prompts] for p in self.generating]
            spill.save([s for p in self.generating for s in self.collect(p)[0]], tmp / GENERATED)
        checkpoint.commit(tmp, state, self.cfg.checkpoint.keep)

    def restore(self, path: Path) -> int:
        """Load a checkpoint into the running actors and push its weights to the rollout workers."""
        state = checkpoint.load(path)
        if "ahead" in state:
            scored = Scored.from_state(spill.load(path / AHEAD), state["ahead"]["feedback"])
            self.ahead = Pending([], (), [], scored.samples, state["ahead"]["generate_s"], finished(scored))
        if "generated" in state:
            samples, n = spill.load(path / GENERATED), self.cfg.rollout.samples_per_prompt
            for indices in state["generated"]:  # one list of prompt indices per round, samples in that order
                k = len(indices) * n
                self.generating.append(Pending([self.by_index[i] for i in indices], (), [], samples[:k]))
                samples = samples[k:]
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
        return state["round"]

    def launch_round(self, ahead: int = 0) -> Pending:
        """The next round's prompts, generating with the weights the rollout workers hold now.

        Seeded by the policy version; `ahead` > 0 sets apart the extra rounds async launches before the first sync.
        """
        cfg = self.cfg
        prompts = self.next_prompts(cfg.rollout.prompts_per_round)
        if cfg.combine.rule == "best_of":
            self.feedback.assign_best_teachers(prompts)
        seed = self.version - ahead  # negative only then: versions are >= 0
        return self.launch(prompts, cfg.rollout.samples_per_prompt, cfg.rollout.temperature, seed=seed)

    def teacher_round(self) -> Pending:
        """mode=offline: the teacher writes the round's responses, the student imitates them."""
        cfg, t0 = self.cfg.rollout, time.perf_counter()
        prompts = self.next_prompts(cfg.prompts_per_round)
        outs = self.teachers.generate(
            [e.ids for e in prompts], cfg.samples_per_prompt, cfg.max_new_tokens, cfg.temperature, None
        )
        return Pending(prompts, (), [], self.as_samples(prompts, outs), time.perf_counter() - t0)

    def round(self, r: int) -> dict[str, float]:
        """Round r: samples, the teachers' feedback on them, one learner step per mini-batch, a weight sync.

        sync runs these in turn. async overlaps rounds: while round r learns, round r+1 is scored on a thread
        as soon as it is generated, and once round r's weights are synced round r+1+d starts generating
        (d = pipeline.depth), so samples are trained on d rounds (d x learner.mini_batches versions) after they
        were generated. With d = 1 round r+1 generates during round r; with d = 2 it was generated during
        round r-1, so generating, scoring and learning each have a round of their own.
        """
        cfg = self.cfg
        overlapped = cfg.pipeline.mode == "async"
        t_round = time.perf_counter()
        if overlapped:
            if self.ahead is None:  # the first round: nothing was generated or scored before it
                self.ahead = self.launch_round()
                self.ahead.feedback = finished(self.feedback(self.collect(self.ahead)[0], cfg.seed + r))
                launches = min(cfg.pipeline.depth, cfg.rounds - r)
                self.generating = [self.launch_round(ahead=k) for k in range(launches)]
            current = self.ahead
            self.ahead = self.generating.pop(0) if self.generating else None
            if self.ahead is not None:
                self.ahead.feedback = self.background.submit(self.feedback_when_generated, self.ahead, cfg.seed + r + 1)
        else:
            current = self.launch_round() if cfg.mode == "on_policy" else self.teacher_round()
            self.collect(current)
        gen_wait = time.perf_counter() - t_round

        t0 = time.perf_counter()
        scored = current.feedback.result() if overlapped else self.feedback(current.samples, cfg.seed + r)
        score_wait = time.perf_counter() - t0
        samples = scored.samples
        for name, n in scored.share.items():
            self.signal_share[name] = self.signal_share.get(name, 0.0) + n
        self.teacher_tokens += scored.tokens
        self.examples = scored.examples
        self.buffer.add(samples)
        batch, buffer_stats = self.buffer.take(self.train_per_round, self.version)

        if cfg.rollout.colocate:  # hand the shared GPUs to the learner
            ray.get([w.sleep.remote() for w in self.rollout])
        t0 = time.perf_counter()
        learner = self.learner.train(chunks(batch, cfg.learner.mini_batches))
        learn_s = time.perf_counter() - t0
        if cfg.rollout.colocate:
            ray.get([w.wake_up.remote() for w in self.rollout])
        if self.ahead is not None:  # new weights land once the generation in flight is done with the old ones
            t0 = time.perf_counter()
            self.ahead.generated.wait()
            if self.ahead.samples is None:  # a rollout worker died: replace it now the learner is free, score here
                self.ahead.feedback = finished(self.feedback(self.collect(self.ahead)[0], cfg.seed + r + 1))
            for pending in self.generating:  # depth > 1: the rounds after it, generated while this one learned
                self.collect(pending)
            gen_wait += time.perf_counter() - t0
        sync = self.sync_weights()
        if overlapped and r + 1 + cfg.pipeline.depth <= cfg.rounds:
            self.generating.append(self.launch_round())
        round_s = time.perf_counter() - t_round

        metrics = {f"learner/{k}": v for k, v in mean_metrics(learner).items()}
        # The sync check (objectives on the student's own samples report it): only the first mini-batch meets a
        # learner that has not moved since the weights went out.
        if "sampler_learner_logprob_gap" in learner[0]:
            metrics["learner/sampler_learner_logprob_gap"] = learner[0]["sampler_learner_logprob_gap"]
        metrics |= {f"buffer/{k}": v for k, v in buffer_stats.items()}
        teacher_bytes = sum(s.teacher_nbytes for s in samples)
        tokens = scored.tokens
        metrics |= {
            "train/response_tokens": tokens / len(samples),
            "train/teacher_tokens": float(self.teacher_tokens),
            "pipeline/round_s": round_s,
            "pipeline/generate_s": current.busy_s,
            "pipeline/generate_wait_s": gen_wait,
            "pipeline/score_s": scored.busy_s,
            "pipeline/score_wait_s": score_wait,
            "pipeline/learn_s": learn_s,
            "pipeline/sync_s": sync["weight_sync_s"],
            "pipeline/learner_idle_fraction": 1.0 - learn_s / round_s,
            "pipeline/samples_per_s": len(samples) / round_s,
            "pipeline/teacher_bytes_per_token": teacher_bytes / max(tokens, 1),
            "tokens_per_s": tokens / max(current.busy_s, 1e-9),
            "scored_tokens_per_s": tokens / max(scored.busy_s, 1e-9),
            "weight_sync_s": sync["weight_sync_s"],
            "weight_sync_gb": sync["weight_sync_gb"],
            "weight_sync_gb_per_s": sync["weight_sync_gb_per_s"],
            "learner_step_s": sum(m["learner_step_s"] for m in learner),
            "policy_version": float(self.version),
            "faults/rollout_restarts": float(self.rollout_restarts),
        }
        return metrics | scored.metrics

    def feedback_when_generated(self, pending: Pending, seed: int) -> Scored | None:
        """async, on the feedback thread: the teachers' feedback on `pending` once it is generated.

        A dead rollout worker is left to the controller (None): replacing it re-sends the learner's weights,
        which must not happen in the middle of the learner's step.
        """
        try:
            self.collect(pending, restart=False)
        except ray.exceptions.RayActorError:
            return None
        finally:
            pending.generated.set()
        return self.feedback(pending.samples, seed)

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
        return Pending(prompts, (n, temperature, seed), refs, group=self.rollout_restarts)

    def collect(self, pending: Pending, restart: bool = True) -> tuple[list[Sample], float]:
        """The samples of a launch and the longest worker's busy seconds. A dead worker is replaced and the
        request re-issued (same seeds, so the same samples), unless `restart` is off: then the error is raised.

        In async with `pipeline.depth` > 1 several launches were in flight on the group that lost the worker;
        the first to fail replaces the group, the others are only re-issued on the new one.
        """
        failures = 0
        while pending.samples is None:
            try:
                parts = ray.get(pending.refs)
                pending.busy_s = max((busy for _, busy in parts), default=0.0)
                pending.samples = [s for part, _ in parts for s in part]
            except ray.exceptions.RayActorError:
                if not restart:
                    raise
                if pending.group == self.rollout_restarts:
                    failures += 1
                    if failures > self.cfg.faults.max_restarts:
                        raise
                    self.restart_rollout()
                again = self.launch(pending.prompts, *pending.args)
                pending.refs, pending.group = again.refs, again.group
        return pending.samples, pending.busy_s

    def evaluate(self) -> dict[str, float]:
        """Greedy accuracy and reverse KL to the teacher on the held-out prompts."""
        if self.cfg.combine.rule == "best_of":
            self.feedback.assign_best_teachers(self.evals)
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
