"""A teacher served elsewhere: an OpenAI-compatible completions endpoint (a running vLLM server) in place of an
in-process engine.

Only the completions API with token-id prompts is used, so nothing is re-tokenized on the way: scoring asks for
vLLM's `prompt_logprobs` (the actual token's log-prob and rank plus the top-k, per prompt position) with
`max_tokens=1`, generation for the sampled token ids (`return_token_ids`) and their log-probs. The parsing is pure
functions over the JSON, so the signal is checked against canned responses without a server; the `Scored` it
builds is the one the in-process vLLM backend builds from the same numbers. Only the stdlib is used (urllib).
"""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from opd.rollout.engine import Scored, request_seeds

CHUNK = 16
"""Sequences per request: large enough that a server batches them, small enough that `max_concurrency` requests
keep it busy and one failed request re-sends little."""

ATTEMPTS = 3
"""Tries of one request (a refused connection, a 5xx) before the call fails and the teacher pool's own retries
(`faults.teacher_retries`) take over."""


class ServedTeacherError(RuntimeError):
    """The endpoint refused or failed a request after every try."""


@dataclass(frozen=True)
class Endpoint:
    """Where a served teacher is and how to talk to it. The key never leaves this object: it is left out of
    repr, so an error message or a log line that prints the endpoint shows only the URL and model."""

    url: str
    """The server's `/v1` base, e.g. http://10.0.0.5:8000/v1."""
    model: str
    """The name the server serves the model under."""
    api_key: str | None = field(default=None, repr=False)
    max_concurrency: int = 4
    timeout_s: float = 600.0
    basic_auth: str | None = field(default=None, repr=False)
    """`user:password` (percent-encoded, as a URL carries it) for HTTP basic auth, e.g. a proxy in front of the
    server; taken out of the configured URL (`opd.secrets.split_userinfo`), so `url` never holds it."""

    def authorization(self) -> str | None:
        """The Authorization header's value: the bearer key, else basic auth, else none."""
        if self.api_key:
            return f"Bearer {self.api_key}"
        if self.basic_auth:
            user, _, password = self.basic_auth.partition(":")
            pair = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}"
            return "Basic " + base64.b64encode(pair.encode()).decode()
        return None


def post(endpoint: Endpoint, path: str, body: dict | None = None) -> dict:
    """One JSON request (GET without a body), retried with backoff on connection errors and 5xx answers; a 4xx
    answer is a request the server will never take, so it fails at once with the server's message."""
    url = endpoint.url.rstrip("/") + path
    headers = {"Content-Type": "application/json"}
    if auth := endpoint.authorization():
        headers["Authorization"] = auth
    data = None if body is None else json.dumps(body).encode()
    error = ""
    for attempt in range(ATTEMPTS):
        if attempt:
            time.sleep(2 ** (attempt - 1))
        request = urllib.request.Request(url, data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=endpoint.timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            error = f"HTTP {err.code}: {err.read()[:500].decode(errors='replace')}"
            if err.code < 500:
                break
        except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
            error = repr(err)
    raise ServedTeacherError(f"served teacher {endpoint.model!r} at {url}: {error}")


def score_body(model: str, sequences: list[list[int]], top_k: int) -> dict:
    """Teacher-force each prompt + response: vLLM's `prompt_logprobs` give each position's log-prob and top-k."""
    return {
        "model": model,
        "prompt": [[int(t) for t in seq] for seq in sequences],
        "max_tokens": 1,
        "temperature": 1.0,
        "prompt_logprobs": top_k,
    }


def parse_scored(choice: dict, prompt_len: int, response: list[int], top_k: int) -> Scored:
    """A completions choice's prompt log-probs -> the response tokens' `Scored`.

    Position i of `prompt_logprobs` maps token id (a JSON string key) to {logprob, rank}: the actual token, and
    the top-k by rank 1..k (the actual token is one of them when its rank is <= k).
    """
    rows = choice.get("prompt_logprobs")
    if rows is None or len(rows) != prompt_len + len(response):
        raise ServedTeacherError(
            f"expected prompt log-probs for {prompt_len + len(response)} positions, got "
            f"{'none' if rows is None else len(rows)}: does the server support vLLM's `prompt_logprobs`?"
        )
    logprobs = np.empty(len(response), np.float32)
    topk_ids = np.empty((len(response), top_k), np.int64)
    topk_logprobs = np.empty((len(response), top_k), np.float32)
    for j, token in enumerate(response):
        entries = {int(k): v for k, v in rows[prompt_len + j].items()}
        if int(token) not in entries:
            raise ServedTeacherError("the server's prompt log-probs are not for the response tokens that were sent")
        logprobs[j] = entries[int(token)]["logprob"]
        top = sorted((v["rank"], k) for k, v in entries.items() if v["rank"] <= top_k)
        if len(top) != top_k:
            raise ServedTeacherError(f"expected the top {top_k} at each position, got {len(top)}: raise --max-logprobs")
        topk_ids[j] = [k for _, k in top]
        topk_logprobs[j] = [entries[k]["logprob"] for _, k in top]
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


def parse_samples(choices: list[dict], prompts: int, n: int) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """Choices (index = prompt x n + sample) -> per prompt, n (token ids, sampled-token log-probs) pairs."""
    if len(choices) != prompts * n:
        raise ServedTeacherError(f"expected {prompts * n} choices, got {len(choices)}")
    out: list[list] = [[] for _ in range(prompts)]
    for c in sorted(choices, key=lambda c: c["index"]):
        ids = c.get("token_ids")
        if ids is None:
            raise ServedTeacherError("the server returned no token_ids: does it support vLLM's `return_token_ids`?")
        lps = (c.get("logprobs") or {}).get("token_logprobs") or []
        if len(lps) != len(ids):
            raise ServedTeacherError(f"{len(lps)} sampled-token log-probs for {len(ids)} tokens")
        out[c["index"] // n].append((np.asarray(ids, np.int64), np.asarray(lps, np.float32)))
    return out


class ServedClient:
    """Scores and samples through an endpoint, `max_concurrency` requests in flight at a time."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.pool = ThreadPoolExecutor(max_workers=endpoint.max_concurrency)

    def max_model_len(self) -> int | None:
        """The context length the server declares (vLLM's /v1/models lists `max_model_len`), None if it does not."""
        models = post(self.endpoint, "/models").get("data", [])
        lens = [m.get("max_model_len") for m in models if m.get("id") == self.endpoint.model]
        if not lens:
            served = [m.get("id") for m in models]
            raise ServedTeacherError(f"{self.endpoint.url} serves {served}, not {self.endpoint.model!r}")
        return lens[0]

    def score(self, prompts: list[list[int]], responses: list[list[int]], top_k: int) -> list[Scored]:
        """`engine.score`'s result, from requests of up to CHUNK sequences each."""

        def one(part: list[tuple[list[int], list[int]]]) -> list[Scored]:
            body = score_body(self.endpoint.model, [[*p, *r] for p, r in part], top_k)
            choices = sorted(post(self.endpoint, "/completions", body)["choices"], key=lambda c: c["index"])
            if len(choices) != len(part):
                raise ServedTeacherError(f"expected {len(part)} choices, got {len(choices)}")
            return [parse_scored(c, len(p), r, top_k) for c, (p, r) in zip(choices, part, strict=True)]

        pairs = list(zip(prompts, responses, strict=True))
        parts = [pairs[i : i + CHUNK] for i in range(0, len(pairs), CHUNK)]
        return [x for result in self.pool.map(one, parts) for x in result]

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

        def one(job: tuple[list[list[int]], int | None]) -> list:
            part, part_seed = job
            body = sample_body(self.endpoint.model, part, n, max_tokens, temperature, part_seed, stop_ids)
            return parse_samples(post(self.endpoint, "/completions", body)["choices"], len(part), n)

        if seed is None:
            jobs = [(prompts[i : i + CHUNK], None) for i in range(0, len(prompts), CHUNK)]
        else:
            jobs = [([p], s) for p, s in zip(prompts, request_seeds(seed, len(prompts)), strict=True)]
        return [x for result in self.pool.map(one, jobs) for x in result]
