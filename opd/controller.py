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

import numpy as np
import ray

from opd.buffer.replay import ReplayBuffer
from opd.buffer.sample import Sample
from opd.config import OPDConfig
from opd.data import DataError, Prompt, is_correct
from opd.learner.group import LearnerGroup, mean_metrics
from opd.monitoring import Monitor
from opd.partition import chunks
from opd.rollout.worker import RolloutWorker
from opd.teachers.combine import route_teacher
from opd.teachers.pool import TeacherPool


@dataclass
class Encoded:
    prompt: Prompt
    ids: list[int]
    teacher: str | None = None
    """The teacher this prompt is routed to (combine.rule=route), else None."""


def encode(tokenizer, prompts: list[Prompt], limit: int, source: str, route=None) -> list[Encoded]:
    """Tokenize prompts (and route each to a teacher); a prompt with no room for a response is an error."""
    out = []
    for p in prompts:
        ids = tokenizer.encode(p.text)
        if len(ids) > limit:
            raise DataError(
                f"{source}: prompt #{p.index + 1} is {len(ids)} tokens; with rollout.max_new_tokens the limit is "
                f"{limit} (raise rollout.engine.max_model_len or shorten it)"
            )
        try:
            teacher = route(p) if route else None
        except ValueError as err:
            raise DataError(f"{source}: prompt #{p.index + 1}: {err}") from None
        out.append(Encoded(p, ids, teacher))
    return out


def _route(combine, prompt: Prompt) -> str:
    return route_teacher(prompt.fields, combine.route_field, combine.routes, combine.default)


class IncompatibleModels(ValueError):
    """Student and teacher cannot be paired as configured (found before any actor starts)."""


def check_tokenizers(student_tokenizer, teachers: dict[str, str]) -> None:
    """Token-level teacher signal is indexed by the student's token ids, so vocabularies must match."""
    from transformers import AutoTokenizer

    vocab = student_tokenizer.get_vocab()
    for name, path in teachers.items():
        if AutoTokenizer.from_pretrained(path).get_vocab() != vocab:
            raise IncompatibleModels(
                f"teacher {name!r} ({path}) has a different tokenizer than the student; token-level losses need "
                "the same vocabulary (cross-tokenizer teachers are not supported yet)"
            )


def reverse_kl(samples: list[Sample]) -> float:
    """Per-token Monte Carlo estimate of KL(student || teacher) on the student's own samples."""
    tokens = sum(s.num_tokens for s in samples)
    gap = sum(float((s.logprobs - s.teacher_logprobs).sum()) for s in samples)
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
        check_tokenizers(self.tokenizer, teachers)
        limit = cfg.rollout.engine.max_model_len - cfg.rollout.max_new_tokens
        route = partial(_route, cfg.combine) if cfg.combine.rule == "route" else None
        self.train = encode(self.tokenizer, train, limit, cfg.data.train, route)
        self.evals = encode(self.tokenizer, evals[: cfg.data.eval_size], limit, cfg.data.eval, route)
        self.rng = random.Random(cfg.seed)
        self.order: list[int] = []
        self.version = 0
        self.teacher_tokens = 0

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        t0 = time.perf_counter()
        print(
            f"starting {cfg.rollout.num_workers} rollout workers (vLLM), "
            f"{sum(t.replicas for t in cfg.teachers)} teacher replicas, {cfg.learner.num_shards} learner shards "
            f"(DeepSpeed ZeRO-{cfg.learner.zero_stage}); engines take a minute to load",
            flush=True,
        )
        worker = ray.remote(num_cpus=cfg.rollout.cpus_per_worker, num_gpus=cfg.rollout.gpus_per_worker)(RolloutWorker)
        backend = cfg.rollout.weight_sync
        if backend == "auto":
            backend = "nccl" if cfg.rollout.gpus_per_worker > 0 else "gloo"
        self.rollout = [
            worker.remote(self.student, cfg.rollout.engine, backend, cfg.seed + i)
            for i in range(cfg.rollout.num_workers)
        ]
        self.teachers = TeacherPool(
            cfg.teachers,
            cfg.combine,
            cfg.teacher_engine,
            cfg.rollout.temperature,
            cfg.seed,
            self.teacher_paths,
            len(self.tokenizer),
        )
        self.buffer = ray.remote(num_cpus=0)(ReplayBuffer).remote(cfg.buffer.capacity, cfg.buffer.max_staleness)
        batch = cfg.rollout.prompts_per_round * cfg.rollout.samples_per_prompt
        self.learner = LearnerGroup(
            self.student, cfg.learner, cfg.loss, cfg.rollout.temperature, batch // cfg.learner.mini_batches
        )
        ray.get([w.ready.remote() for w in self.rollout])
        self.teachers.ready()
        self.learner.connect_rollout(self.rollout, cfg.rollout.engine.tensor_parallel_size, backend)
        print(f"all actors ready in {time.perf_counter() - t0:.0f}s; weight sync over {backend}", flush=True)

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        before = self.evaluate()
        teacher_acc = self.teacher_accuracy()
        self.monitor.log({**before, "teacher_accuracy": teacher_acc}, step=0)
        bar = tqdm(range(1, cfg.rounds + 1), desc="distilling", unit="round", dynamic_ncols=True)
        metrics: dict[str, float] = {}
        for r in bar:
            metrics = self.round()
            if r % cfg.eval.every == 0 or r == cfg.rounds:
                metrics |= self.evaluate()
            self.monitor.log(metrics, step=r)
            bar.set_postfix(
                {k: f"{metrics[k]:.3g}" for k in ("train/reverse_kl", "eval/student_accuracy") if k in metrics}
            )
        student_path = os.path.abspath(os.path.join(cfg.output_dir, "student"))
        self.learner.save(student_path)
        final = {
            "teacher_accuracy": teacher_acc,
            "student_accuracy_before": before.get("eval/student_accuracy"),
            "student_accuracy_after": metrics.get("eval/student_accuracy"),
            "reverse_kl_before": before["eval/reverse_kl"],
            "reverse_kl_after": metrics["eval/reverse_kl"],
            "teacher_tokens": self.teacher_tokens,
            "rounds": cfg.rounds,
            "policy_version": self.version,
            "student_path": student_path,
        }
        return self.monitor.finish(final)

    def round(self) -> dict[str, float]:
        cfg = self.cfg
        prompts = self.next_prompts(cfg.rollout.prompts_per_round)

        t0 = time.perf_counter()
        if cfg.mode == "on_policy":
            samples = self.generate(prompts, cfg.rollout.samples_per_prompt, cfg.rollout.temperature, seed=self.version)
        else:
            samples = self.teacher_samples(prompts, cfg.rollout.samples_per_prompt, cfg.rollout.temperature)
        gen_s = time.perf_counter() - t0
        tokens = sum(s.num_tokens for s in samples)

        t0 = time.perf_counter()
        if cfg.mode == "on_policy":
            scored_by = self.teachers.score(samples, cfg.loss.top_k)
        score_s = time.perf_counter() - t0
        self.teacher_tokens += tokens

        ray.get(self.buffer.add.remote(samples))
        batch, buffer_stats = ray.get(self.buffer.take.remote(len(samples), self.version))

        learner = [self.learner.train_step(mb) for mb in chunks(batch, cfg.learner.mini_batches)]
        sync = self.learner.send_weights()
        self.version = int(sync["version"])
        ray.get([w.set_version.remote(self.version) for w in self.rollout])

        metrics = {f"learner/{k}": v for k, v in mean_metrics(learner).items()}
        metrics |= {f"buffer/{k}": v for k, v in buffer_stats.items()}
        metrics |= {
            "train/generate_s": gen_s,
            "train/score_s": score_s,
            "train/tokens_per_s": tokens / gen_s,
            "train/response_tokens": tokens / len(samples),
            "train/teacher_tokens": float(self.teacher_tokens),
            "weight_sync_s": sync["weight_sync_s"],
            "weight_sync_gb_per_s": sync["weight_sync_gb_per_s"],
            "learner_step_s": sum(m["learner_step_s"] for m in learner),
            "tokens_per_s": tokens / gen_s,
            "policy_version": float(self.version),
        }
        if cfg.mode == "on_policy":
            metrics["train/reverse_kl"] = reverse_kl(batch)
            metrics |= {f"teachers/{name}_samples": float(n) for name, n in scored_by.items()}
        return metrics

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
        parts = chunks(prompts, len(self.rollout))
        refs = []
        for i, (w, part) in enumerate(zip(self.rollout, parts, strict=True)):
            if not part:
                continue
            meta = [{"prompt_index": e.prompt.index, "answer": e.prompt.answer, "teacher": e.teacher} for e in part]
            s = None if seed is None else self.cfg.seed * 1_000_003 + seed * len(self.rollout) + i
            refs.append(
                w.generate.remote([e.ids for e in part], meta, n, self.cfg.rollout.max_new_tokens, temperature, s)
            )
        return [s for part in ray.get(refs) for s in part]

    def teacher_samples(self, prompts: list[Encoded], n: int, temperature: float) -> list[Sample]:
        """Offline KD data: the teacher writes the responses the student will imitate."""
        outs = self.teachers.generate([e.ids for e in prompts], n, self.cfg.rollout.max_new_tokens, temperature, None)
        return self.as_samples(prompts, outs)

    def evaluate(self) -> dict[str, float]:
        """Greedy accuracy and reverse KL to the teacher on the held-out prompts."""
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
