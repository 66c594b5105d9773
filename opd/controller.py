"""The controller: rounds of generate -> teacher feedback -> buffer -> learn -> sync weights.

It gets its actor groups already started (`opd/startup.py`) and only runs rounds: `round` reads top to
bottom, and when each round is generated and scored (in turn, or ahead of learning) is the schedule's job
(`opd/schedule.py`). Every group is a small object with a few calls, so a unit test drives the same
loop with fakes in-process (tests/test_controller.py).
"""

from __future__ import annotations

import os
import random
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from opd import checkpoint
from opd.buffer.sample import teacher_written
from opd.config import OPDConfig
from opd.data import Encoded
from opd.evaluation import prefix
from opd.learner.group import mean_metrics
from opd.monitoring import Monitor
from opd.partition import chunks
from opd.rollout.group import Launch
from opd.schedule import AsyncSchedule, Ready, SyncSchedule
from opd.teachers.combine import generate_routed


def _assigned(prompts: list[Encoded]) -> dict[str, str]:
    """Prompt position -> teacher, for prompts a teacher was picked for (saved, since best_of picks are costly)."""
    return {str(i): e.teacher for i, e in enumerate(prompts) if e.teacher is not None}


class Controller:
    def __init__(
        self,
        cfg: OPDConfig,
        train: list[Encoded],
        rollout,
        teachers,
        feedback,
        buffer,
        learner,
        evaluator,
        monitor: Monitor,
        card: Callable[[str, Mapping[str, float]], None] | None = None,
    ) -> None:
        """The groups: `RolloutGroup`, `TeacherPool`, `Feedback`, `ShardedBuffer`, `LearnerGroup`, `Evaluator`.
        `card(path, signal_share)` writes a saved student's provenance (`opd.provenance.StudentCard`)."""
        self.card = card
        self.cfg, self.train, self.monitor = cfg, train, monitor
        self.rollout, self.teachers, self.feedback = rollout, teachers, feedback
        self.buffer, self.learner, self.evaluator = buffer, learner, evaluator
        self.by_index = {e.prompt.index: e for e in train}
        self.rng = random.Random(cfg.seed)
        self.order: list[int] = []
        self.version = 0
        self.teacher_tokens = 0
        self.rounds_done = 0
        self.signal_share: dict[str, float] = {}
        self.examples: list[dict] = []
        produce = self.launch_round if cfg.mode == "on_policy" else self.teacher_round
        if cfg.pipeline.mode == "async":
            self.schedule = AsyncSchedule(produce, rollout, feedback, cfg.seed, cfg.pipeline.depth, cfg.rounds)
        else:
            self.schedule = SyncSchedule(produce, rollout, feedback, cfg.seed)

    @staticmethod
    def samples_per_step(cfg: OPDConfig) -> int:
        """Samples each round's learner steps take from the buffer."""
        return cfg.buffer.train_per_round or cfg.rollout.prompts_per_round * cfg.rollout.samples_per_prompt

    # -- the loop ------------------------------------------------------------------------------
    def run(self, resume: Path | None = None) -> dict:
        """Rounds until `cfg.rounds`, from the start or from the checkpoint `resume`; returns the summary."""
        from tqdm import tqdm

        cfg = self.cfg
        start = 0
        if resume is None:
            self.monitor.log(self.evaluator.student() | self.evaluator.teacher_accuracy(), step=0)
        else:
            start = self.restore(resume)
            print(f"resumed from {resume} at round {start}, policy version {self.version}", flush=True)
        # The progress line: the train reverse KL and each eval set's greedy accuracy.
        shown = {"train/reverse_kl": "kl"}
        shown |= {f"{prefix(n)}student_accuracy": f"acc{n and f'[{n}]'}" for n in self.evaluator.sets}
        self.rounds_done = start
        bar = tqdm(range(start + 1, cfg.rounds + 1), desc="distilling", unit="round", dynamic_ncols=True)
        bar.update(start)
        for r in bar:
            metrics = self.round(r)
            self.rounds_done = r
            last = r == cfg.rounds or 0 < cfg.max_teacher_tokens <= self.teacher_tokens
            if r % cfg.eval.every == 0 or last:
                metrics |= self.evaluator.student()
                self.monitor.table("samples", self.examples, step=r)
            self.monitor.log(metrics, step=r)
            # Before the checkpoint: a round that is checkpointed has its export, so a resume need not redo it.
            if cfg.checkpoint.export_every and r % cfg.checkpoint.export_every == 0:
                self.export(os.path.abspath(os.path.join(cfg.output_dir, f"student_round_{r}")))
            if cfg.checkpoint.every and (r % cfg.checkpoint.every == 0 or last):
                self.save_checkpoint(r)
            bar.set_postfix({label: f"{metrics[k]:.3g}" for k, label in shown.items() if k in metrics})
            if last:
                if r < cfg.rounds:
                    print(f"\nmax_teacher_tokens={cfg.max_teacher_tokens} reached at round {r}", flush=True)
                break
        bar.close()
        self.schedule.close()
        student_path = os.path.abspath(os.path.join(cfg.output_dir, "student"))
        self.export(student_path)
        return self.monitor.finish(self.summary(student_path))

    def export(self, path: str) -> None:
        """The student as a Hugging Face checkpoint in `path`, with its provenance when there is a card; written
        beside it and renamed into place, so a crash mid-export never leaves a broken student where one was."""
        staged = f"{path}.tmp"
        shutil.rmtree(staged, ignore_errors=True)
        self.learner.save(staged)
        if self.card is not None:
            self.card(path, self.signal_share, into=staged)
        checkpoint.publish(Path(staged), Path(path))

    def round(self, r: int) -> dict[str, float]:
        """Round r: the round's scored samples, through the buffer, one learner step per mini-batch, a sync."""
        t0 = time.perf_counter()
        ready = self.schedule.take(r)
        self.account(ready)
        self.buffer.add(ready.scored.samples)
        batch, buffer_stats = self.buffer.take(self.samples_per_step(self.cfg), self.version)
        learner, learn_s = self.learn(batch)
        wait_s = self.schedule.before_sync(r)
        sync = self.rollout.sync_weights()
        self.version = int(sync["version"])
        self.schedule.after_sync(r)
        return self.metrics(ready, learner, buffer_stats, sync, learn_s, wait_s, time.perf_counter() - t0)

    def account(self, ready: Ready) -> None:
        """Totals over the run: teacher tokens and each teacher's share of the signal (provenance.json)."""
        for name, n in ready.scored.share.items():
            self.signal_share[name] = self.signal_share.get(name, 0.0) + n
        self.teacher_tokens += ready.scored.teacher_tokens
        self.examples = ready.scored.examples

    def learn(self, batch: list) -> tuple[list[dict[str, float]], float]:
        """`learner.mini_batches` optimizer steps on the batch; colocated engines sleep meanwhile."""
        if self.cfg.rollout.colocate:
            self.rollout.sleep()
        t0 = time.perf_counter()
        metrics = self.learner.train(chunks(batch, self.cfg.learner.mini_batches))
        learn_s = time.perf_counter() - t0
        if self.cfg.rollout.colocate:
            self.rollout.wake_up()
        return metrics, learn_s

    def metrics(
        self, ready: Ready, learner: list, buffer_stats: dict, sync: dict, learn_s: float, wait_s: float, round_s: float
    ) -> dict[str, float]:
        """What round r logs: the learner's, the buffer's, each stage's timing and the weight sync's."""
        scored = ready.scored
        samples, tokens = scored.samples, scored.tokens
        out = {f"learner/{k}": v for k, v in mean_metrics(learner).items()}
        # The sync check (objectives on the student's own samples report it): only the first mini-batch meets a
        # learner that has not moved since the weights went out.
        if "sampler_learner_logprob_gap" in learner[0]:
            out["learner/sampler_learner_logprob_gap"] = learner[0]["sampler_learner_logprob_gap"]
        out |= {f"buffer/{k}": v for k, v in buffer_stats.items()}
        teacher_bytes = sum(s.teacher_nbytes for s in samples)
        out |= {
            "train/response_tokens": tokens / len(samples),
            "train/teacher_tokens": float(self.teacher_tokens),
            "pipeline/round_s": round_s,
            "pipeline/generate_s": ready.generate_s,
            "pipeline/generate_wait_s": ready.generate_wait_s + wait_s,
            "pipeline/score_s": scored.busy_s,
            "pipeline/score_wait_s": ready.score_wait_s,
            "pipeline/learn_s": learn_s,
            "pipeline/sync_s": sync["weight_sync_s"],
            "pipeline/learner_idle_fraction": 1.0 - learn_s / round_s,
            "pipeline/samples_per_s": len(samples) / round_s,
            "pipeline/teacher_bytes_per_token": teacher_bytes / max(tokens, 1),
            "tokens_per_s": tokens / max(ready.generate_s, 1e-9),
            "scored_tokens_per_s": tokens / max(scored.busy_s, 1e-9),
            "weight_sync_s": sync["weight_sync_s"],
            "weight_sync_gb": sync["weight_sync_gb"],
            "weight_sync_gb_per_s": sync["weight_sync_gb_per_s"],
            "learner_step_s": sum(m["learner_step_s"] for m in learner),
            "policy_version": float(self.version),
            "faults/rollout_restarts": float(self.rollout.restarts),
        }
        return out | scored.metrics

    def summary(self, student_path: str) -> dict:
        """The run's final figures; the first eval set's at the top level, every set's under `eval_sets`."""
        first, last = self.monitor.history[0], self.monitor.history[-1]
        per_set = {
            name: {
                "teacher_accuracy": first.get(f"{prefix(name)}teacher_accuracy"),
                "student_accuracy_before": first.get(f"{prefix(name)}student_accuracy"),
                "student_accuracy_after": last.get(f"{prefix(name)}student_accuracy"),
                "reverse_kl_before": first[f"{prefix(name)}reverse_kl"],
                "reverse_kl_after": last[f"{prefix(name)}reverse_kl"],
            }
            for name in self.evaluator.sets
        }
        return {
            **next(iter(per_set.values())),
            "eval_sets": per_set,
            "teacher_tokens": self.teacher_tokens,
            "teacher_signal_share": self.signal_share,
            "rounds": self.rounds_done,
            "policy_version": self.version,
            "student_path": student_path,
        }

    # -- what each round trains on -------------------------------------------------------------
    def next_prompts(self, n: int) -> list[Encoded]:
        """The next n training prompts: a seeded shuffle, reshuffled each epoch."""
        out = []
        while len(out) < n:
            if not self.order:
                self.order = list(range(len(self.train)))
                self.rng.shuffle(self.order)
            out.append(self.train[self.order.pop()])
        return out

    def launch_round(self, ahead: int = 0) -> Launch:
        """The next round's prompts, generating with the weights the rollout workers hold now.

        Seeded by the policy version; `ahead` > 0 sets apart the extra rounds async launches before the first sync.
        """
        rollout = self.cfg.rollout
        prompts = self.next_prompts(rollout.prompts_per_round)
        if self.cfg.combine.rule == "best_of":
            self.feedback.assign_best_teachers(prompts)
        seed = self.version - ahead  # negative only then: versions are >= 0
        return self.rollout.launch(prompts, rollout.samples_per_prompt, rollout.temperature, seed)

    def teacher_round(self, ahead: int = 0) -> Launch:
        """mode=offline: the teacher writes the round's responses, the student imitates them."""
        cfg, t0 = self.cfg.rollout, time.perf_counter()
        prompts = self.next_prompts(cfg.prompts_per_round)
        n, combine = cfg.samples_per_prompt, self.cfg.combine  # under route, each prompt by its own teacher
        outs = generate_routed(self.teachers, combine, prompts, n, cfg.max_new_tokens, cfg.temperature, None)
        return Launch.done(prompts, teacher_written(prompts, outs, self.version), time.perf_counter() - t0)

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
            "assigned": {"train": _assigned(self.train)}
            | {f"eval:{n}": _assigned(p) for n, p in self.evaluator.sets.items()},
            "inputs": self.card.inputs() if self.card is not None else None,  # what a resume must not change
        }
        checkpoint.commit(tmp, state | self.schedule.save(tmp), self.cfg.checkpoint.keep)

    def restore(self, path: Path) -> int:
        """Load a checkpoint into the running actors and push its weights to the rollout workers."""
        state = checkpoint.load(path)
        self.schedule.restore(path, state, self.by_index)
        step = self.learner.load_state(str(path / "learner"))
        if step != state["version"]:
            raise RuntimeError(f"{path}: learner step {step} does not match policy version {state['version']}")
        self.buffer.load(path / "buffer")
        self.version, self.teacher_tokens = state["version"], state["teacher_tokens"]
        self.signal_share, self.order = state["signal_share"], state["order"]
        checkpoint.set_rng_state(self.rng, state["rng"])
        for name, encoded in [("train", self.train), *((f"eval:{n}", p) for n, p in self.evaluator.sets.items())]:
            for index, teacher in state["assigned"][name].items():
                encoded[int(index)].teacher = teacher
        self.learner.send_weights()
        return state["round"]
