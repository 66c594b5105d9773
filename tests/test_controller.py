"""The driver's round logic with fake groups, in-process and in seconds (no Ray actors, no models).

The real `Controller`, schedules and `RolloutGroup` run; only the actors are fakes: rollout workers whose
`generate` records the policy version they hold when launched, a learner that counts optimizer steps and
pushes its step as the version, a teacher feedback that passes samples through. `ray.get`/`ray.kill` are
replaced in the rollout group's module, so a worker can die between a launch and its collection.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import ray

from opd import checkpoint
from opd.buffer.replay import ReplayBuffer
from opd.buffer.sample import Sample
from opd.controller import Controller
from opd.data import Encoded, Prompt
from opd.rollout import group as rollout_group
from opd.rollout.group import RolloutGroup
from opd.teachers.feedback import ScoredRound

PROMPTS, PER_ROUND, SAMPLES, MINI_BATCHES = 40, 4, 2, 2


class Call:
    """`actor.method.remote(...)` of a fake actor: runs at once, its result read by the faked `ray.get`."""

    def __init__(self, worker: FakeWorker, fn) -> None:
        self.worker, self.fn = worker, fn

    def remote(self, *args):
        return (self.worker, self.fn(*args))


class FakeWorker:
    def __init__(self) -> None:
        self.version, self.dead = 0, False
        self.generate = Call(self, self._generate)
        self.ready = Call(self, lambda: self.version)

    def _generate(self, ids, meta, n, max_tokens, temperature, seed, top_p):
        """Samples made now, with the weights held now (as a vLLM engine does for a launch)."""
        out = [
            Sample(np.asarray(p), np.asarray([seed or 0, k]), np.zeros(2, np.float32), self.version, **m)
            for p, m in zip(ids, meta, strict=True)
            for k in range(n)
        ]
        return out, 0.0


def fake_get(refs, timeout=None):
    if any(worker.dead for worker, _ in refs):
        raise ray.exceptions.RayActorError()
    return [result for _, result in refs]


class FakeRollout(RolloutGroup):
    """The real group with fake workers; `kill_after` kills a worker once that many launches were made."""

    def __init__(self, cfg, kill_after: int | None = None) -> None:
        self.kill_after, self.launches = kill_after, 0
        super().__init__(cfg, "student", "gloo", placement=None)

    def spawn(self) -> list:
        return [FakeWorker() for _ in range(self.cfg.rollout.num_workers)]

    def launch(self, prompts, n, temperature, seed, top_p=1.0):
        out = super().launch(prompts, n, temperature, seed, top_p)
        self.launches += 1
        if self.launches == self.kill_after:
            self.workers[0].dead = True  # dies after generating: the samples never reach the driver
        return out


class FakeLearner:
    """Counts optimizer steps and records what each step trained on: (prompt index, sampled version) pairs."""

    def __init__(self) -> None:
        self.step, self.trained, self.workers = 0, [], []

    def connect_rollout(self, workers, ranks_per_engine, backend) -> None:
        self.workers = workers

    def train(self, mini_batches):
        out = []
        for mb in mini_batches:
            self.trained.append([(s.prompt_index, s.version) for s in mb])
            self.step += 1
            out.append({"loss": 0.0, "learner_step_s": 0.0})
        return out

    def send_weights(self) -> dict[str, float]:
        for w in self.workers:
            w.version = self.step
        return {"version": self.step, "weight_sync_s": 0.0, "weight_sync_gb": 0.0, "weight_sync_gb_per_s": 0.0}

    def save_state(self, path: str) -> None:
        Path(path).mkdir(parents=True)
        (Path(path) / "step.json").write_text(json.dumps(self.step))

    def load_state(self, path: str) -> int:
        self.step = json.loads((Path(path) / "step.json").read_text())
        return self.step

    def save(self, path: str) -> None:  # as save_pretrained does: the directory with the weights in it
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "model.safetensors").write_text(json.dumps(self.step))


class Buffer(ReplayBuffer):
    """The real buffer shard, in-process, saved to a folder as `ShardedBuffer` does."""

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True)
        super().save(str(folder / "shard.safetensors"))

    def load(self, folder: Path) -> int:
        return super().load(str(folder / "shard.safetensors"))


class PassThrough:
    """Teacher feedback that scores nothing: the round's samples as they are."""

    def __call__(self, samples, seed) -> ScoredRound:
        return ScoredRound(list(samples), {}, {"teacher": float(len(samples))}, [], len(samples), 0.0)

    def assign_best_teachers(self, prompts) -> None:
        pass


class Monitor:
    def __init__(self) -> None:
        self.history: list[dict] = []
        self.run_id = None

    def log(self, metrics, step) -> None:
        self.history.append(dict(metrics))


def config(mode: str = "sync", depth: int = 1, rounds: int = 6, tmp: Path | None = None):
    return SimpleNamespace(
        seed=0,
        mode="on_policy",
        rounds=rounds,
        output_dir=str(tmp),
        rollout=SimpleNamespace(
            num_workers=2,
            prompts_per_round=PER_ROUND,
            samples_per_prompt=SAMPLES,
            temperature=1.0,
            max_new_tokens=2,
            colocate=False,
            engine=SimpleNamespace(tensor_parallel_size=1),
        ),
        pipeline=SimpleNamespace(mode=mode, depth=depth),
        learner=SimpleNamespace(mini_batches=MINI_BATCHES),
        buffer=SimpleNamespace(train_per_round=0),
        combine=SimpleNamespace(rule="mean_logprob"),
        faults=SimpleNamespace(max_restarts=2),
        checkpoint=SimpleNamespace(keep=2),
    )


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    monkeypatch.setattr(rollout_group.ray, "get", fake_get)
    monkeypatch.setattr(rollout_group.ray, "kill", lambda actor, no_restart=True: None)


def controller(cfg, kill_after: int | None = None, learner: FakeLearner | None = None) -> Controller:
    train = [Encoded(Prompt(i, f"p{i}"), [i]) for i in range(PROMPTS)]
    rollout = FakeRollout(cfg, kill_after)
    learner = learner or FakeLearner()
    rollout.connect(learner)
    evaluator = SimpleNamespace(sets={"": []})
    buffer = Buffer(capacity=1000, max_staleness=8)
    return Controller(cfg, train, rollout, None, PassThrough(), buffer, learner, evaluator, Monitor())


def run(c: Controller, rounds: range) -> list[dict]:
    return [c.round(r) for r in rounds]


def staleness(c: Controller) -> list[int]:
    """Per optimizer step: the learner's step minus the version the batch was sampled with."""
    return [step - max(v for _, v in batch) for step, batch in enumerate(c.learner.trained)]


def test_sync_trains_each_round_on_samples_of_the_weights_just_synced():
    c = controller(config("sync"))
    metrics = run(c, range(1, 7))
    # Each round's first step meets fresh samples; its second step is one version past them.
    assert staleness(c) == [0, 1] * 6
    assert c.version == 6 * MINI_BATCHES and c.rollout.launches == 6
    assert metrics[-1]["policy_version"] == 12.0 and metrics[-1]["faults/rollout_restarts"] == 0.0
    prompts = [p for batch in c.learner.trained for p, _ in batch]
    assert len(prompts) == 6 * PER_ROUND * SAMPLES


@pytest.mark.parametrize("depth", [1, 2])
def test_async_trains_on_samples_depth_rounds_old_and_generates_nothing_past_the_last_round(depth):
    c = controller(config("async", depth))
    run(c, range(1, 7))
    per_round = [staleness(c)[i] for i in range(0, len(c.learner.trained), MINI_BATCHES)]
    # Round 1 trains on round 1's samples; the pipeline then lags `depth` rounds (depth x mini_batches versions)
    # once it is full, and the rounds launched before the first sync lag by how far they were ahead.
    expected = [0, *[min(r, depth) * MINI_BATCHES for r in range(1, 6)]]
    assert per_round == expected
    assert c.rollout.launches == 6  # one generation per round, none for rounds after the last
    assert c.version == 6 * MINI_BATCHES


@pytest.mark.parametrize(("mode", "depth"), [("sync", 1), ("async", 1), ("async", 2)])
def test_a_rollout_worker_dying_mid_round_replaces_the_group_once_and_loses_no_round(mode, depth):
    reference = controller(config(mode, depth))
    run(reference, range(1, 7))
    c = controller(config(mode, depth), kill_after=3)  # dies with a round (or two, at depth 2) in flight
    run(c, range(1, 7))
    assert c.rollout.restarts == 1
    # The re-issued launch uses the same seeds on workers that got the learner's current weights, so the run
    # trains on the same prompts, in the same order.
    prompts = [[p for p, _ in batch] for batch in c.learner.trained]
    assert prompts == [[p for p, _ in batch] for batch in reference.learner.trained]
    assert c.version == reference.version


@pytest.mark.parametrize(("mode", "depth"), [("sync", 1), ("async", 1), ("async", 2)])
def test_resume_with_rounds_in_flight_trains_on_exactly_what_an_uninterrupted_run_would(tmp_path, mode, depth):
    whole = controller(config(mode, depth, tmp=tmp_path / "whole"))
    run(whole, range(1, 7))

    first = controller(config(mode, depth, tmp=tmp_path / "cut"))
    run(first, range(1, 4))
    first.save_checkpoint(3)
    resumed = controller(config(mode, depth, tmp=tmp_path / "cut"))
    assert resumed.restore(checkpoint.latest(tmp_path / "cut")) == 3
    run(resumed, range(4, 7))

    assert first.learner.trained + resumed.learner.trained == whole.learner.trained
    assert resumed.version == whole.version and resumed.order == whole.order
    # Nothing in flight was generated twice: the resumed run launched only what the cut one had not.
    assert first.rollout.launches + resumed.rollout.launches == whole.rollout.launches


class RunMonitor(Monitor):
    """What `Controller.run` also calls: example tables and the final summary."""

    def table(self, name, rows, step) -> None:
        pass

    def finish(self, final) -> dict:
        return {"final": final, "rounds": self.history}


@pytest.mark.parametrize(("mode", "depth"), [("sync", 1), ("async", 2)])
def test_max_teacher_tokens_stops_after_the_round_that_reaches_it_and_evaluates_there(tmp_path, mode, depth):
    cfg = config(mode, depth, rounds=10, tmp=tmp_path)
    cfg.max_teacher_tokens = 2 * PER_ROUND * SAMPLES + 1  # the fake teacher spends one token per sample
    cfg.eval = SimpleNamespace(every=100)
    cfg.checkpoint.every = cfg.checkpoint.export_every = 0
    c = controller(cfg)
    c.monitor = RunMonitor()
    evals = []
    c.evaluator = SimpleNamespace(
        sets={"": []},
        student=lambda: evals.append(c.version) or {"eval/student_accuracy": 0.5, "eval/reverse_kl": 0.1},
        teacher_accuracy=lambda: {"eval/teacher_accuracy": 1.0},
    )
    summary = c.run()
    assert summary["final"]["rounds"] == 3 and c.teacher_tokens == 3 * PER_ROUND * SAMPLES
    assert len(c.learner.trained) == 3 * MINI_BATCHES
    assert evals == [0, 3 * MINI_BATCHES]  # before training, and after the last round run


def test_an_export_that_dies_half_written_leaves_the_last_student_whole(tmp_path):
    cfg = config("sync", 1, rounds=2, tmp=tmp_path)
    c = controller(cfg)
    path = str(tmp_path / "student")
    c.export(path)
    before = (tmp_path / "student" / "model.safetensors").read_text()

    def dies_writing(staged: str) -> None:
        Path(staged).mkdir(parents=True, exist_ok=True)
        (Path(staged) / "model.safetensors").write_text("half")
        raise OSError("disk full")

    c.learner.save = dies_writing
    with pytest.raises(OSError, match="disk full"):
        c.export(path)
    assert (tmp_path / "student" / "model.safetensors").read_text() == before
