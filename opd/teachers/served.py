"""A teacher served elsewhere: an OpenAI-compatible completions endpoint (a running vLLM server) in place of an
in-process engine.

Only the completions API with token-id prompts is used, so nothing is re-tokenized on the way: scoring asks for
vLLM's `prompt_logprobs` (the actual token's log-prob and rank plus the top-k, per prompt position) with
`max_tokens=1`, generation for the sampled token ids (`return_token_ids`) and their log-probs. The parsing is pure
functions over the JSON, so the signal is checked against canned responses without a server; the `Scored` it
builds is the one the in-process vLLM backend builds from the same numbers. Only the stdlib is used (urllib); the
requests, their retries and timeouts are `opd.teachers.served_http`'s.

Token ids only mean something in the tokenizer they were made with, so at start-up (`check_tokenizer`) the
server's tokenization of a probe text is compared with the local tokenizer's, and every id the server returns is
checked against the teacher's vocabulary.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from opd.rollout.engine import Scored, request_seeds
from opd.teachers import served_http
from opd.teachers.served_http import Endpoint, ServedTeacherError, post

__all__ = [
    "CHUNK",
    "PROBE",
    "Endpoint",
    "ServedClient",
    "ServedTeacherError",
    "check_tokenizer",
    "local_vocab_size",
    "parse_samples",
    "parse_scored",
    "sample_body",
    "score_body",
]

CHUNK = 16
"""Sequences per request: large enough that a server batches them, small enough that `max_concurrency` requests
keep it busy and one failed request re-sends little."""

PROBE = 'Probe: 12 + 345 = 357.\n  Tabs\tand  spaces, ÜNÏCÖDÉ, 日本語, emoji 🙂, <b>markup</b> & "quotes".'
"""Text the server and the local tokenizer must split alike: digits, runs of whitespace, non-ASCII and markup,
where tokenizers of one family but different versions most often part ways."""


def local_vocab_size(path: str) -> int | None:
    """The served model's vocabulary size from the config.json beside its local tokenizer (a multimodal model's
    text config's), None where there is none: the ids a server may return are those of the model's embedding,
    which can be larger than the tokenizer."""
    file = Path(path) / "config.json"
    if not file.is_file():
        return None
    config = json.loads(file.read_text())
    size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return int(size) if size else None


def check_ids(ids: np.ndarray, vocab: int | None, what: str) -> None:
    """Ids from the server index the teacher's vocabulary downstream (the bridge, the loss): one outside it is a
    server answering for another model, and is refused here rather than read as some other token."""
    bad = ids[(ids < 0) | (ids >= vocab)] if vocab else ids[ids < 0]
    if bad.size:
        where = f"outside the teacher's vocabulary [0, {vocab})" if vocab else "negative"
        raise ServedTeacherError(f"{what} id {int(bad[0])} is {where}")


def ordered(choices: object, count: int) -> list[dict]:
    """A response's choices in index order: exactly `count`, indexed 0..count-1, or an error saying what is off."""
    if not isinstance(choices, list):
        raise ServedTeacherError("the response has no `choices` list")
    if len(choices) != count:
        raise ServedTeacherError(f"expected {count} choices, got {len(choices)}")
    if not all(isinstance(c, dict) and isinstance(c.get("index"), int) for c in choices):
        raise ServedTeacherError("a choice has no integer `index`")
    out = sorted(choices, key=lambda c: c["index"])
    if [c["index"] for c in out] != list(range(count)):
        raise ServedTeacherError(f"choice indexes {[c['index'] for c in out]} are not 0..{count - 1}")
    return out


def score_body(model: str, sequences: list[list[int]], top_k: int) -> dict:
    """Teacher-force each prompt + response: vLLM's `prompt_logprobs` give each position's log-prob and top-k."""
    return {
        "model": model,
        "prompt": [[int(t) for t in seq] for seq in sequences],
        "max_tokens": 1,
        "temperature": 1.0,
        "prompt_logprobs": top_k,
    }


def parse_scored(choice: dict, prompt_len: int, response: list[int], top_k: int, vocab: int | None = None) -> Scored:
    """A completions choice's prompt log-probs -> the response tokens' `Scored`.

    Position i of `prompt_logprobs` maps token id (a JSON string key) to {logprob, rank}: the actual token, and
    the top-k by rank 1..k (the actual token is one of them when its rank is <= k).
    """
    rows = choice.get("prompt_logprobs")
    if not isinstance(rows, list) or len(rows) != prompt_len + len(response):
        raise ServedTeacherError(
            f"expected prompt log-probs for {prompt_len + len(response)} positions, got "
            f"{len(rows) if isinstance(rows, list) else 'none'}: does the server support vLLM's `prompt_logprobs`?"
        )
    logprobs = np.empty(len(response), np.float32)
    topk_ids = np.empty((len(response), top_k), np.int64)
    topk_logprobs = np.empty((len(response), top_k), np.float32)
    for j, token in enumerate(response):
        row = rows[prompt_len + j]
        if not isinstance(row, dict):
            raise ServedTeacherError(f"prompt log-probs at position {prompt_len + j} are not a token -> log-prob map")
        entries = {int(k): v for k, v in row.items()}
        if int(token) not in entries:
            raise ServedTeacherError("the server's prompt log-probs are not for the response tokens that were sent")
        logprobs[j] = entries[int(token)]["logprob"]
        top = sorted((v["rank"], k) for k, v in entries.items() if v["rank"] <= top_k)
        if len(top) != top_k:
            raise ServedTeacherError(f"expected the top {top_k} at each position, got {len(top)}: raise --max-logprobs")
        topk_ids[j] = [k for _, k in top]
        topk_logprobs[j] = [entries[k]["logprob"] for _, k in top]
    check_ids(topk_ids, vocab, "a top-k token")
    return Scored(logprobs, topk_ids, topk_logprobs)


def sample_body(
    model: str,
    prompts: list[list[int]],
    n: int,
    max_tokens: int,
    temperature: float,
    seed: int | None,
    stop_ids: list[int],
) -> dict:
    """Sampling as the in-process engine samples (`engine.sample`): nothing truncated, the stop ids kept, token
    ids and each sampled token's log-prob back."""
    body = {
        "model": model,
        "prompt": [[int(t) for t in p] for p in prompts],
        "n": n,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": 1.0,
        "top_k": 0,
        "stop_token_ids": [int(t) for t in stop_ids],
        "logprobs": 0,
        "return_token_ids": True,
        "skip_special_tokens": False,
    }
    return body if seed is None else body | {"seed": int(seed)}


def parse_samples(
    choices: list[dict], prompts: int, n: int, vocab: int | None = None
) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """Choices (index = prompt x n + sample) -> per prompt, n (token ids, sampled-token log-probs) pairs."""
    out: list[list] = [[] for _ in range(prompts)]
    for c in ordered(choices, prompts * n):
        ids = c.get("token_ids")
        if ids is None:
            raise ServedTeacherError("the server returned no token_ids: does it support vLLM's `return_token_ids`?")
        lps = (c.get("logprobs") or {}).get("token_logprobs") or []
        if len(lps) != len(ids):
            raise ServedTeacherError(f"{len(lps)} sampled-token log-probs for {len(ids)} tokens")
        ids = np.asarray(ids, np.int64)
        check_ids(ids, vocab, "a sampled token")
        out[c["index"] // n].append((ids, np.asarray(lps, np.float32)))
    return out


def check_tokenizer(endpoint: Endpoint, encode: Callable[[str], list[int]], local: str, text: str = PROBE) -> None:
    """Refuse a server that tokenizes `text` otherwise than `encode` (the local tokenizer read from `local`).

    Prompts travel as token ids, so a local tokenizer that is not the served model's would feed it other text
    without any error. vLLM's `/tokenize` (at the server root) says how the server splits; a server without it
    (404) is let through with a warning.
    """
    url = endpoint.at_root("/tokenize")
    body = {"model": endpoint.model, "prompt": text, "add_special_tokens": False}
    try:
        theirs = post(endpoint, url, body, parse=lambda payload: [int(t) for t in payload["tokens"]])
    except ServedTeacherError as err:
        if err.status != 404:
            raise
        warnings.warn(
            f"served teacher {endpoint.model!r}: {url} is not served (404), so whether the local tokenizer "
            f"({local}) is the served model's is not checked",
            stacklevel=2,
        )
        return
    ours = [int(t) for t in encode(text)]
    if theirs != ours:
        at = next(
            (i for i, (a, b) in enumerate(zip(theirs, ours, strict=False)) if a != b), min(len(theirs), len(ours))
        )
        raise ServedTeacherError(
            f"served teacher {endpoint.model!r} at {url} tokenizes a probe text otherwise than the local tokenizer "
            f"({local}): from token {at}, server {theirs[at : at + 8]} vs local {ours[at : at + 8]} ({len(theirs)} vs "
            f"{len(ours)} tokens). The local tokenizer must be the served model's own (teachers.N.tokenizer)"
        )


class ServedClient:
    """Scores and samples through an endpoint, `max_concurrency` requests in flight at a time, each call within
    the endpoint's deadline; `vocab`: the teacher's vocabulary size, which every returned id is checked against."""

    def __init__(self, endpoint: Endpoint, vocab: int | None = None) -> None:
        self.endpoint = endpoint
        self.vocab = vocab
        self.pool = ThreadPoolExecutor(max_workers=endpoint.max_concurrency)

    def max_model_len(self) -> int | None:
        """The context length the server declares (vLLM's /v1/models lists `max_model_len`), None if it does not."""

        def parse(payload: dict) -> int | None:
            lens = {m["id"]: m.get("max_model_len") for m in payload.get("data") or []}
            if self.endpoint.model not in lens:
                raise ServedTeacherError(f"the server serves {list(lens)}, not {self.endpoint.model!r}")
            return lens[self.endpoint.model]

        return post(self.endpoint, self.endpoint.at("/models"), parse=parse)

    def _map(self, one: Callable, jobs: list) -> list:
        """`one(job, deadline)` over the jobs on the pool, results flattened in order, all within one deadline;
        the first failure cancels the jobs not yet started."""
        deadline = served_http.now() + self.endpoint.deadline_s
        futures = [self.pool.submit(one, job, deadline) for job in jobs]
        try:
            return [x for f in futures for x in f.result()]
        finally:
            for f in futures:
                f.cancel()

    def score(self, prompts: list[list[int]], responses: list[list[int]], top_k: int) -> list[Scored]:
        """`engine.score`'s result, from requests of up to CHUNK sequences each."""

        def one(part: list[tuple[list[int], list[int]]], deadline: float) -> list[Scored]:
            def parse(payload: dict) -> list[Scored]:
                choices = ordered(payload.get("choices"), len(part))
                return [parse_scored(c, len(p), r, top_k, self.vocab) for c, (p, r) in zip(choices, part, strict=True)]

            body = score_body(self.endpoint.model, [[*p, *r] for p, r in part], top_k)
            return post(self.endpoint, self.endpoint.at("/completions"), body, deadline, parse)

        pairs = list(zip(prompts, responses, strict=True))
        return self._map(one, [pairs[i : i + CHUNK] for i in range(0, len(pairs), CHUNK)])

    def sample(
        self,
        prompts: list[list[int]],
        n: int,
        max_tokens: int,
        temperature: float,
        seed: int | None,
        stop_ids: list[int],
    ) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        """`engine.sample`'s result, from requests of up to CHUNK prompts each; seeded, one prompt a request, each
        with its own seed (`request_seeds`: the server seeds every prompt of a request alike)."""

        def one(job: tuple[list[list[int]], int | None], deadline: float) -> list:
            part, part_seed = job
            body = sample_body(self.endpoint.model, part, n, max_tokens, temperature, part_seed, stop_ids)
            return post(
                self.endpoint,
                self.endpoint.at("/completions"),
                body,
                deadline,
                lambda payload: parse_samples(payload.get("choices"), len(part), n, self.vocab),
            )

        if seed is None:
            jobs = [(prompts[i : i + CHUNK], None) for i in range(0, len(prompts), CHUNK)]
        else:
            jobs = [([p], s) for p, s in zip(prompts, request_seeds(seed, len(prompts)), strict=True)]
        return self._map(one, jobs)
