"""The HTTP layer of a served teacher (`opd.teachers.served`): where the server is, and one JSON request with its
retries, its timeouts and the check of what came back.

A request is retried when a retry may succeed: a refused or dropped connection, a timeout, a 5xx, a 429 (the
server asks to slow down, often saying for how long in `Retry-After`), a body cut short or not JSON. It is retried
until the deadline of the call it serves (`faults.teacher_timeout_s`), not a fixed number of times, so a server
that restarts (a minute or more to load a model) is waited for rather than failed after a few seconds. Any other
4xx is a request the server will never take, and a body that parses but lacks what was asked for is a server that
does not speak vLLM's API: both fail at once. Each request has its own timeout (`Endpoint.timeout_s`), so a stuck
request is given up and sent again, and a call of many requests ends when its deadline says.
"""

from __future__ import annotations

import base64
import http.client
import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from typing import TypeVar

T = TypeVar("T")

BACKOFF_S = 1.0
"""Wait before a request's second try, doubled for each further one (unless the server says `Retry-After`)..."""

BACKOFF_CAP_S = 10.0
"""...up to this: a server back from an outage is found again within this long."""

RETRY_AFTER_CAP_S = 60.0
"""The longest `Retry-After` honoured: a server asking for more still gets its retry after this long."""

THROTTLED = (429, 503)
"""Statuses with which a server asks the client to come back later, the wait often in `Retry-After`."""


class ServedTeacherError(RuntimeError):
    """The endpoint refused or failed a request after every try, or answered something that is not the signal.
    `status` is the HTTP status of a refusal (None for anything else), for a caller that treats one apart."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


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
    timeout_s: float = 120.0
    """One HTTP request's timeout (teachers.N.request_timeout_s): a stuck request is given up and retried."""
    deadline_s: float = 600.0
    """The most one call (a score or sample of however many requests) may take, its retries included
    (faults.teacher_timeout_s, the pool's own wait for the call)."""
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

    def at(self, path: str) -> str:
        """`path` under the `/v1` base (the OpenAI API)."""
        return self.url.rstrip("/") + path

    def at_root(self, path: str) -> str:
        """`path` at the server's root, where vLLM serves what is not OpenAI's API (/tokenize, /health)."""
        return self.url.rstrip("/").removesuffix("/v1") + path


def pause(seconds: float) -> None:
    """The wait between tries; a test replaces it (and `now`) to see the waits without waiting."""
    time.sleep(seconds)


def now() -> float:
    """The clock deadlines are measured on."""
    return time.monotonic()


def retry_after_s(headers: Message | None) -> float | None:
    """A `Retry-After` in seconds, capped at RETRY_AFTER_CAP_S; None when absent or not a number of seconds (the
    HTTP-date form is not honoured: the client's and server's clocks need not agree)."""
    value = (headers or {}).get("Retry-After", "")
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return min(seconds, RETRY_AFTER_CAP_S) if math.isfinite(seconds) and seconds >= 0 else None


def _body_of(err: urllib.error.HTTPError) -> str:
    """The start of an error answer's body (the server's message), or nothing when even that fails to arrive."""
    try:
        return err.read()[:500].decode(errors="replace")
    except (OSError, http.client.HTTPException):
        return ""


def _describe(err: Exception) -> str:
    """What a parser found wrong, for a message that also names the URL."""
    if isinstance(err, ServedTeacherError):
        return str(err)
    if isinstance(err, KeyError):
        return f"the response lacks the field {err.args[0]!r}"
    return f"malformed response ({type(err).__name__}: {err})"


def post(
    endpoint: Endpoint,
    url: str,
    body: dict | None = None,
    deadline: float | None = None,
    parse: Callable[[dict], T] = lambda payload: payload,
) -> T:
    """One JSON request (GET without a body) and `parse` of its answer, retried as the module says.

    `deadline` (time.monotonic()) bounds every try and wait; None gives the request an endpoint's whole deadline.
    Every error names the URL: a refusal with the server's message, an answer `parse` cannot read with what it
    lacks.
    """
    headers = {"Content-Type": "application/json"}
    if auth := endpoint.authorization():
        headers["Authorization"] = auth
    data = None if body is None else json.dumps(body).encode()
    deadline = now() + endpoint.deadline_s if deadline is None else deadline
    where = f"served teacher {endpoint.model!r} at {url}"
    error, wait, tries = "not sent", 0.0, 0
    while True:
        if tries and now() + wait >= deadline:
            raise ServedTeacherError(
                f"{where}: {error}; still failing after {tries} tr{'y' if tries == 1 else 'ies'} at the call's "
                f"deadline ({endpoint.deadline_s:g} s, faults.teacher_timeout_s)"
            )
        if tries:
            pause(wait)
        left = deadline - now()
        if left <= 0:
            raise ServedTeacherError(f"{where}: {error}; the call's deadline ({endpoint.deadline_s:g} s) has passed")
        wait = min(BACKOFF_S * 2**tries, BACKOFF_CAP_S)
        tries += 1
        request = urllib.request.Request(url, data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=min(endpoint.timeout_s, left)) as response:
                payload = json.loads(response.read())
        except urllib.error.HTTPError as err:
            error = f"HTTP {err.code}: {_body_of(err)}"
            if err.code < 500 and err.code not in THROTTLED:
                raise ServedTeacherError(f"{where}: {error}", err.code) from err
            if err.code in THROTTLED and (asked := retry_after_s(err.headers)) is not None:
                wait = asked
            continue
        except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException) as err:
            error = repr(err)  # IncompleteRead (a body cut short) is an HTTPException
            continue
        except ValueError as err:
            error = f"the body is not JSON ({err})"
            continue
        if not isinstance(payload, dict):
            error = f"the body is JSON but not an object: {str(payload)[:200]}"
            continue
        try:
            return parse(payload)
        except (ServedTeacherError, KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as err:
            raise ServedTeacherError(f"{where}: {_describe(err)}") from err
