"""The teacher pool: named teachers, each with replicas, behind a few calls (score, generate, complete, correct).

Failures stay inside the pool: a dead replica is restarted by Ray and its in-flight calls re-run there
(`faults.max_restarts`); a call that hangs past `faults.teacher_timeout_s` gets its replicas replaced by fresh
actors (not restarted by Ray: a hang is not a crash, and must not use up the restarts a crash may need) and is
re-issued, up to `faults.teacher_retries` times; a teacher that still fails stops the run or, with
`faults.on_teacher_failure=drop`, leaves the pool with a loud warning while the others carry on. A served
teacher (backend=openai) is a replica like any other: a dead server's calls fail and take the same path, each
retry a little later than the last.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from opd import plan
from opd.buffer.sample import Sample
from opd.config import ConfigError, DataConfig
from opd.data import Encoded, Prompt
from opd.partition import chunks
from opd.secrets import split_userinfo
from opd.teachers.served import Endpoint
from opd.teachers.worker import TeacherWorker

T = TypeVar("T")


RETRY_BACKOFF_S = 1.0
"""Wait before a teacher call's first retry, doubled for each further one."""


def served_endpoint(t, deadline_s: float) -> Endpoint:
    """A served teacher's endpoint, its API key read here on the driver from the variable `api_key_env` names
    and basic-auth credentials taken out of its URL (both then travel only inside the endpoint, which never
    prints them). `deadline_s` bounds each call, the pool's own wait for it (faults.teacher_timeout_s)."""
    key = None
    if t.api_key_env:
        key = os.environ.get(t.api_key_env)
        if not key:
            raise ConfigError(
                f"teacher {t.name!r}: api_key_env={t.api_key_env}, but ${t.api_key_env} is not set on the driver"
            )
    url, userinfo = split_userinfo(t.url)
    if key and userinfo:
        raise ConfigError(
            f"teacher {t.name!r}: url carries credentials and api_key_env names a key; use one (both would need "
            "the one Authorization header)"
        )
    return Endpoint(url, t.model, key, t.max_concurrency, t.request_timeout_s, deadline_s, basic_auth=userinfo)


class TeacherFailed(RuntimeError):
    """A teacher kept failing after every retry."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


class TeacherPool:
    """Named teachers, each with replicas; requests are spread evenly over a teacher's replicas.

    With several teachers, a sample routed to one teacher (`Sample.teacher`) is scored by that
    teacher alone; otherwise every teacher with weight > 0 scores it and `combine.rule` merges
    the signals. A single teacher's signal is used as it is, never re-approximated.
    """

    def __init__(
        self,
        teachers,
        combine,
        engine_cfg,
        temperature: float,
        seed: int,
        model_paths: dict[str, str],
        student: str,
        vocab_size: int,
        faults,
        top_k: int,
        groups: dict,
        data: DataConfig,
    ) -> None:
        """`data`: the chat settings each teacher renders prompts with."""
        from opd.teachers.combine import RULES, SELECTING

        self.faults = faults
        self.lock = threading.RLock()
        self.starts: dict[str, list[Callable[[], Any]]] = {}
        """Per teacher, how to start each replica: a hung one is replaced by a fresh actor with the same options."""
        for t in teachers:
            cpus, gpus = plan.teacher_resources(t)
            actor = ray.remote(
                num_cpus=cpus, num_gpus=gpus, max_restarts=faults.max_restarts, max_task_retries=faults.max_restarts
            )(TeacherWorker)
            endpoint = served_endpoint(t, faults.teacher_timeout_s) if t.backend == "openai" else None
            path = t.tokenizer_path if endpoint else model_paths[t.name]
            slots = [actor.options(**plan.slot(groups[t.name], i)) for i in range(t.replicas)]
            self.starts[t.name] = [
                partial(slot.remote, path, t.backend, engine_cfg, temperature, seed + i, student, top_k, data, endpoint)
                for i, slot in enumerate(slots)
            ]
        self.replicas: dict[str, list] = {name: [start() for start in starts] for name, starts in self.starts.items()}
        self.weights = {t.name: t.weight for t in teachers}
        # Selecting rules route every sample to one teacher, so nothing is ever merged.
        self.rule = None if combine.rule in SELECTING else RULES.get(combine.rule)
        self.vocab_size = vocab_size
        self.default = teachers[0].name
        self.names = [t.name for t in teachers]
        self.dropped: list[str] = []

    def ready(self) -> None:
        ray.get([r.ready.remote() for reps in self.replicas.values() for r in reps])

    def _submit(self, name: str, method: str, columns: list[list], *args) -> list:
        """Send each replica its share of every column; the refs come back in input order."""
        reps = self.replicas[name]
        shares = zip(*(chunks(col, len(reps)) for col in columns), strict=True)
        return [getattr(rep, method).remote(*share, *args) for rep, share in zip(reps, shares, strict=True) if share[0]]

    def _wait(self, name: str, refs: list, resubmit: Callable[[], list]) -> list:
        """Results of `refs` flattened in input order, with the timeout and retries of `faults`."""
        error: Exception | None = None
        for attempt in range(self.faults.teacher_retries + 1):
            if attempt:
                time.sleep(RETRY_BACKOFF_S * 2 ** (attempt - 1))  # a restarting server gets a moment before the retry
                refs = resubmit()
            try:
                return [x for part in ray.get(refs, timeout=self.faults.teacher_timeout_s) for x in part]
            except (GetTimeoutError, RayActorError, RayTaskError) as err:
                error = err
                print(f"WARNING: teacher {name!r} call failed (attempt {attempt + 1}): {err!r:.300}", flush=True)
                if isinstance(err, GetTimeoutError):  # a hung replica: replace it so the retry is not queued behind
                    self._replace(name)
        raise TeacherFailed(name, f"teacher {name!r} failed {self.faults.teacher_retries + 1} times: {error!r:.300}")

    def _replace(self, name: str) -> None:
        """Kill a hung teacher's replicas for good, start fresh ones with the same options and wait until they
        have loaded, so the retry's timeout measures the call, not the engine start-up.

        Not a Ray restart (`ray.kill(no_restart=False)`): that uses up one of the replica's lifetime
        `faults.max_restarts`, and a teacher that hung that many times in a long run would die for good at its
        next hang or crash. Fresh actors start with the full count, kept for crashes.
        """
        for rep in self.replicas[name]:
            ray.kill(rep, no_restart=True)
        self.replicas[name] = reps = [start() for start in self.starts[name]]
        try:
            ray.get([rep.ready.remote() for rep in reps], timeout=self.faults.restart_timeout_s)
        except (GetTimeoutError, RayActorError) as err:
            raise TeacherFailed(name, f"teacher {name!r} did not come back after being replaced: {err!r:.300}") from err

    def _call(self, name: str, method: str, columns: list[list], *args) -> list:
        def submit() -> list:
            return self._submit(name, method, columns, *args)

        return self._wait(name, submit(), submit)

    def _surviving(self, work: Callable[[], T]) -> T:
        """Run `work`; when a teacher fails for good, drop it (or stop, per config) and run `work` again.

        One caller at a time: async feedback runs on a thread while the controller may ask for best_of answers
        or an eval, and a drop must not change the pool under a call in flight.
        """
        with self.lock:
            while True:
                try:
                    return work()
                except TeacherFailed as err:
                    self._drop(err)

    def _resolve(self, name: str | None) -> str | None:
        """A dropped teacher's work goes to the first remaining one."""
        return self.default if name in self.dropped else name

    def _drop(self, err: TeacherFailed) -> None:
        """Take a failing teacher out (faults.on_teacher_failure=drop and others remain), else re-raise."""
        name = err.name
        alive = [n for n in self.names if n != name]
        if self.faults.on_teacher_failure == "stop" or not alive:
            raise err
        warnings.warn(f"teacher {name!r} dropped from the pool: {err}; continuing with {alive}", stacklevel=2)
        print(f"WARNING: teacher {name!r} dropped after repeated failures; continuing with {alive}", flush=True)
        self.names, self.dropped = alive, [*self.dropped, name]
        self.weights.pop(name, None)
        del self.starts[name]
        for rep in self.replicas.pop(name):
            ray.kill(rep, no_restart=True)
        self.default = alive[0]

    def score(self, samples: list[Sample], top_k: int, prompts: list[Prompt]) -> dict[str, float]:
        """Fill each sample's teacher fields in place.

        `prompts[i]` is sample i's prompt (`prompts_of`), which a teacher with another tokenizer renders its own
        way. Returns each teacher's share of the signal, in
        samples: 1 per routed sample, its normalised weight per merged one (what provenance.json reports as the
        teacher's contribution).
        """
        return self._surviving(lambda: self._score(samples, top_k, prompts))

    def _score(self, samples: list[Sample], top_k: int, prompts: list[Prompt]) -> dict[str, float]:
        for s in samples:
            s.teacher = self._resolve(s.teacher)
        wanted = {
            name: [i for i, s in enumerate(samples) if s.teacher in (None, name)]
            for name, weight in self.weights.items()
            if weight > 0 or any(s.teacher == name for s in samples)
        }
        columns = {
            name: [
                [samples[i].prompt_ids.tolist() for i in idx],
                [samples[i].response_ids.tolist() for i in idx],
                [prompts[i] for i in idx],
            ]
            for name, idx in wanted.items()
            if idx
        }
        # Every teacher's calls are in flight before any is awaited, so teachers score concurrently.
        pending = {name: self._submit(name, "score", cols, top_k) for name, cols in columns.items()}
        signals: list[dict] = [{} for _ in samples]
        for name, refs in pending.items():
            results = self._wait(name, refs, lambda n=name: self._submit(n, "score", columns[n], top_k))
            for i, scored in zip(wanted[name], results, strict=True):
                signals[i][name] = scored
        share = dict.fromkeys(wanted, 0.0)
        for s, by_teacher in zip(samples, signals, strict=True):
            if len(by_teacher) == 1:
                scored = next(iter(by_teacher.values()))
                share[next(iter(by_teacher))] += 1.0
            else:
                weights = {n: self.weights[n] for n in by_teacher}
                scored = self.rule(by_teacher, weights, vocab_size=self.vocab_size, top_k=top_k)
                for n, w in weights.items():
                    share[n] += w / sum(weights.values())
            s.teacher_logprobs = scored.logprobs
            s.teacher_topk_ids, s.teacher_topk_logprobs = scored.topk_ids, scored.topk_logprobs
        return share

    def generate(
        self,
        prompt_ids: list[list[int]],
        n: int,
        max_tokens: int,
        temperature: float,
        seed: int | None,
        prompts: list[Prompt],
        name: str | None = None,
    ) -> list:
        """Teacher `name`'s own samples (the first teacher's by default), per prompt n (token ids, log-probs):
        offline KD, teacher accuracy.

        `prompts[i]`: the prompt `prompt_ids[i]` renders, which a teacher with another tokenizer renders its own way.
        """
        cols = [prompt_ids, prompts]
        return self._surviving(
            lambda: self._call(self._resolve(name or self.default), "generate", cols, n, max_tokens, temperature, seed)
        )

    def complete(self, name: str, texts: list[str], max_tokens: int, temperature: float) -> list[str | None]:
        """Teacher `name` answers each text as a user turn in its chat template: judge verdicts on rubrics."""
        return self._surviving(lambda: self._call(self._resolve(name), "complete", [texts], max_tokens, temperature))

    def answer(self, name: str, prompts: list[Encoded], max_tokens: int, temperature: float) -> list[str | None]:
        """Teacher `name`'s text answer to each prompt as it reads it: combine.rule=best_of's candidates."""
        cols = [[e.ids for e in prompts], [e.prompt for e in prompts]]
        return self._surviving(lambda: self._call(self._resolve(name), "answer", cols, max_tokens, temperature))

    def correct(
        self,
        names: list[str],
        prompt_ids: list,
        prefixes: list,
        budgets: list[int],
        temperature: float,
        seed: int,
        prompts: list[Prompt],
    ) -> list:
        """Per item, teacher `names[i]` continues the prompt (`prompts[i]`, rendered its way) + the kept response
        prefix: student token ids back."""

        def work() -> list:
            out: list = [None] * len(names)
            resolved = [self._resolve(n) for n in names]
            for name in dict.fromkeys(resolved):
                idx = [i for i, n in enumerate(resolved) if n == name]
                cols = [[x[i] for i in idx] for x in (prompt_ids, prefixes, budgets, prompts)]
                for i, ids in zip(idx, self._call(name, "continue_response", cols, temperature, seed), strict=True):
                    out[i] = ids
            return out

        return self._surviving(work)
