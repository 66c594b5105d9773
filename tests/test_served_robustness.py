"""A served teacher's client against a stand-in server on 127.0.0.1 answering canned responses: throttling and
Retry-After, per-request timeouts inside a call's deadline, bodies that are cut short, not JSON or lack fields, ids
outside the vocabulary, and the start-up check that the server tokenizes as the local tokenizer does."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from typing import ClassVar

import pytest

from opd.config import ConfigError, TeacherConfig
from opd.config.models import check_served
from opd.teachers import served, served_http
from opd.teachers.pool import served_endpoint
from opd.teachers.served import Endpoint, ServedClient, ServedTeacherError
from tests.stack import http_server

MODELS = {"data": [{"id": "m", "max_model_len": 99}]}
HANG = "hang"
"""An answer that never comes (until the test ends): a request stuck on a dead connection."""


def truncated(body: dict) -> tuple[int, bytes, dict]:
    """A 200 whose Content-Length promises more than is sent before the connection closes."""
    data = json.dumps(body).encode()
    return 200, data[:10], {"Content-Length": str(len(data))}


class _Canned(BaseHTTPRequestHandler):
    """Answers the n-th request with `answers[n]` (the last repeats): a dict (200 JSON), a (status, body, headers)
    triple, HANG, or a callable of the request's JSON body returning one of those. `delay_s` before every answer."""

    answers: ClassVar[list] = []
    asked: ClassVar[list[tuple[str, dict | None]]] = []
    delay_s: ClassVar[float] = 0.0
    release: ClassVar[threading.Event]

    def do_GET(self):
        self._answer(None)

    def do_POST(self):
        self._answer(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

    def _answer(self, body: dict | None) -> None:
        cls = type(self)
        cls.asked.append((self.path, body))
        answer = cls.answers[min(len(cls.asked), len(cls.answers)) - 1]
        answer = answer(body) if callable(answer) else answer
        if answer == HANG or cls.release.wait(cls.delay_s):
            cls.release.wait(30)
            return
        status, data, headers = (200, answer, {}) if isinstance(answer, dict) else answer
        data = data if isinstance(data, bytes) else json.dumps(data).encode()
        with contextlib.suppress(OSError):  # the client may have given up meanwhile
            self.send_response(status)
            for key, value in {"Content-Length": str(len(data)), **headers}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def serve() -> Iterator[Callable[..., tuple[str, type[_Canned]]]]:
    """serve(*answers, delay_s=0) -> (the stand-in's /v1 URL, its handler class with `asked`)."""
    with contextlib.ExitStack() as stack:
        release = threading.Event()
        stack.callback(release.set)

        def start(*answers, delay_s: float = 0.0) -> tuple[str, type[_Canned]]:
            attrs = {"answers": list(answers), "asked": [], "delay_s": delay_s, "release": release}
            handler = type("Handler", (_Canned,), attrs)
            server = stack.enter_context(http_server(handler))
            return f"http://127.0.0.1:{server.server_port}/v1", handler

        yield start


def _row(entries: dict[int, tuple[float, int]]) -> dict:
    return {str(k): {"logprob": lp, "rank": rank} for k, (lp, rank) in entries.items()}


def _scored(token: int = 7, other: int = 4) -> dict:
    """A choice scoring prompt [5] + response [token] with the top-2 {token, other}."""
    return {"index": 0, "prompt_logprobs": [None, _row({token: (-0.2, 1), other: (-1.0, 2)})]}


def _samples(body: dict) -> dict:
    """The answer to a sampling request: one token per sample."""
    count = len(body["prompt"]) * body["n"]
    return {"choices": [{"index": i, "token_ids": [3], "logprobs": {"token_logprobs": [-0.5]}} for i in range(count)]}


# 1. Throttling and retries


def test_429_and_503_are_retried_after_the_servers_retry_after_capped(serve, waits):
    url, handler = serve(
        (429, {"error": "slow down"}, {"Retry-After": "7"}),
        (503, {"error": "overloaded"}, {"Retry-After": "3600"}),
        MODELS,
    )
    assert ServedClient(Endpoint(url, "m")).max_model_len() == 99
    assert waits == [7.0, served_http.RETRY_AFTER_CAP_S] and len(handler.asked) == 3


def test_without_retry_after_the_backoff_doubles_and_other_5xx_ignore_it(serve, waits, monkeypatch):
    monkeypatch.setattr(served_http, "BACKOFF_S", 0.25)
    url, _ = serve((429, {}, {}), (500, {}, {"Retry-After": "9"}), MODELS)
    assert ServedClient(Endpoint(url, "m")).max_model_len() == 99
    assert waits == [0.25, 0.5]


def test_other_4xx_fail_at_once_with_the_servers_message(serve, waits):
    url, handler = serve((400, {"error": "prompt too long"}, {"Retry-After": "1"}))
    with pytest.raises(ServedTeacherError, match=r"HTTP 400.*prompt too long") as err:
        ServedClient(Endpoint(url, "m")).sample([[1]], 1, 4, 0.0, None, [0])
    assert err.value.status == 400 and f"{url}/completions" in str(err.value)
    assert len(handler.asked) == 1 and waits == []


def test_connection_errors_are_retried_until_the_calls_deadline_then_fail_naming_the_url(waits):
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    with pytest.raises(ServedTeacherError, match=r"refused.*after 9 tries at the call's deadline \(60 s") as err:
        ServedClient(Endpoint(dead, "m", deadline_s=60.0)).max_model_len()
    assert f"{dead}/models" in str(err.value)
    assert waits == [1.0, 2.0, 4.0, 8.0] + [10.0] * 4  # doubling, capped: 55 s; the next 10 s would pass 60 s


def test_a_server_that_restarts_within_the_deadline_is_waited_for(serve, waits):
    """Down for a minute (a model loading again): 503s, then the answer, all inside one call's deadline."""
    url, handler = serve(*[(503, {"error": "loading"}, {})] * 8, MODELS)
    assert ServedClient(Endpoint(url, "m", deadline_s=600.0)).max_model_len() == 99
    assert len(handler.asked) == 9 and sum(waits) == 1 + 2 + 4 + 8 + 10 * 4


# 2. Per-request timeout and the call's deadline


def test_a_stuck_request_is_given_up_after_its_own_timeout_and_retried_within_the_call(serve, waits):
    url, handler = serve(HANG, MODELS)
    start = time.monotonic()
    assert ServedClient(Endpoint(url, "m", timeout_s=0.3, deadline_s=60.0)).max_model_len() == 99
    assert time.monotonic() - start < 5 and len(handler.asked) == 2 and len(waits) == 1


def test_a_call_of_many_requests_ends_at_its_deadline_not_after_each_requests_timeout(serve, waits):
    # 6 requests one at a time, 0.5 s each: 3 s in all, each well inside its 5 s timeout; the call's deadline is 1.2 s.
    url, handler = serve(_samples, delay_s=0.5)
    client = ServedClient(Endpoint(url, "m", max_concurrency=1, timeout_s=5.0, deadline_s=1.2))
    start = time.monotonic()
    with pytest.raises(ServedTeacherError, match=r"call's deadline \(1\.2 s"):
        client.sample([[1]] * (6 * served.CHUNK), 1, 4, 0.0, None, [0])
    assert time.monotonic() - start < 2.5
    assert len(handler.asked) < 6  # the requests still queued at the deadline were never sent


def test_a_served_teachers_request_timeout_is_its_own_and_the_call_deadline_is_the_pools():
    t = TeacherConfig(name="s", model="m", backend="openai", url="http://127.0.0.1:8000/v1", request_timeout_s=30.0)
    endpoint = served_endpoint(t, 600.0)
    assert (endpoint.timeout_s, endpoint.deadline_s) == (30.0, 600.0)
    with pytest.raises(ConfigError, match=r"teachers\.0\.request_timeout_s=0"):
        check_served(0, TeacherConfig(name="s", model="m", backend="openai", url=t.url, request_timeout_s=0))


# 3. Bodies that are not the signal


def test_bodies_cut_short_or_not_json_are_retried(serve, waits):
    url, handler = serve(truncated(MODELS), (200, b'{"data": [', {}), MODELS)
    assert ServedClient(Endpoint(url, "m")).max_model_len() == 99
    assert len(handler.asked) == 3


@pytest.mark.parametrize(
    ("answer", "wrong"),
    [
        (truncated(MODELS), "IncompleteRead"),
        ((200, b"<html>bad gateway</html>", {}), "not JSON"),
        ((200, b"[1, 2]", {}), "not an object"),
    ],
)
def test_a_body_that_stays_unreadable_fails_naming_the_url(serve, waits, answer, wrong):
    url, handler = serve(answer)
    with pytest.raises(ServedTeacherError, match=wrong) as err:
        ServedClient(Endpoint(url, "m", deadline_s=5.0)).max_model_len()
    assert f"{url}/models" in str(err.value) and len(handler.asked) == 3 and waits == [1.0, 2.0]


@pytest.mark.parametrize(
    ("answer", "wrong"),
    [
        ({"object": "text_completion"}, "no `choices`"),
        ({"choices": []}, "expected 1 choices, got 0"),
        ({"choices": [{"text": "x"}]}, "no integer `index`"),
        ({"choices": [{"index": 0, "text": "x"}]}, "prompt_logprobs"),
        ({"choices": [{"index": 0, "prompt_logprobs": [None, None]}]}, "not a token -> log-prob map"),
        ({"choices": [{"index": 0, "prompt_logprobs": [None, {"7": {"logprob": -1.0}}]}]}, "lacks the field 'rank'"),
    ],
)
def test_a_response_without_the_signal_fails_at_once_naming_the_url_and_what_is_missing(serve, waits, answer, wrong):
    url, handler = serve(answer)
    with pytest.raises(ServedTeacherError, match=wrong) as err:
        ServedClient(Endpoint(url, "m")).score([[5]], [[7]], 1)
    assert f"{url}/completions" in str(err.value) and len(handler.asked) == 1


def test_samples_without_their_fields_fail_naming_the_url(serve, waits):
    url, _ = serve({"choices": [{"index": 0, "token_ids": [3]}], "usage": {}})
    with pytest.raises(ServedTeacherError, match="0 sampled-token log-probs for 1 tokens") as err:
        ServedClient(Endpoint(url, "m")).sample([[1]], 1, 4, 0.0, None, [0])
    assert f"{url}/completions" in str(err.value)


# 4. Ids outside the vocabulary


def test_returned_ids_outside_the_vocabulary_are_refused_naming_the_url(serve, waits):
    url, _ = serve({"choices": [_scored(other=5000)]})
    client = ServedClient(Endpoint(url, "m"), vocab=100)
    with pytest.raises(ServedTeacherError, match=r"top-k token id 5000 is outside the teacher's vocabulary \[0, 100\)"):
        client.score([[5]], [[7]], 2)
    url, _ = serve({"choices": [{"index": 0, "token_ids": [3, 100], "logprobs": {"token_logprobs": [-1.0, -1.0]}}]})
    with pytest.raises(ServedTeacherError, match=r"sampled token id 100 is outside") as err:
        ServedClient(Endpoint(url, "m"), vocab=100).sample([[1]], 1, 4, 0.0, None, [0])
    assert f"{url}/completions" in str(err.value)
    url, _ = serve({"choices": [{"index": 0, "token_ids": [-1], "logprobs": {"token_logprobs": [-1.0]}}]})
    with pytest.raises(ServedTeacherError, match="sampled token id -1 is negative"):
        ServedClient(Endpoint(url, "m")).sample([[1]], 1, 4, 0.0, None, [0])


def test_ids_inside_the_vocabulary_pass(serve, waits):
    url, _ = serve({"choices": [_scored(other=99)]})
    (scored,) = ServedClient(Endpoint(url, "m"), vocab=100).score([[5]], [[7]], 2)
    assert scored.topk_ids.tolist() == [[7, 99]]


def test_the_vocabulary_size_is_read_from_the_local_config(tmp_path):
    assert served.local_vocab_size(str(tmp_path)) is None
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"vocab_size": 7}}))
    assert served.local_vocab_size(str(tmp_path)) == 7
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 151936}))
    assert served.local_vocab_size(str(tmp_path)) == 151936


# 5. The server tokenizes as the local tokenizer does


def test_the_tokenizer_check_asks_the_servers_root_tokenize_and_passes_a_match(serve, waits):
    url, handler = serve({"tokens": [1, 2, 3], "count": 3, "max_model_len": 99})
    served.check_tokenizer(Endpoint(url, "m"), lambda text: [1, 2, 3], "/tok")
    ((path, body),) = handler.asked
    assert path == "/tokenize" and body == {"model": "m", "prompt": served.PROBE, "add_special_tokens": False}


def test_a_server_that_tokenizes_otherwise_is_refused(serve, waits):
    url, _ = serve({"tokens": [1, 2, 3, 4]})
    with pytest.raises(ServedTeacherError, match=r"otherwise than the local tokenizer \(/tok\): from token 2") as err:
        served.check_tokenizer(Endpoint(url, "m"), lambda text: [1, 2, 9, 4], "/tok")
    assert url.removesuffix("/v1") + "/tokenize" in str(err.value)


def test_a_server_without_tokenize_is_let_through_with_a_warning(serve, waits):
    url, _ = serve((404, {"detail": "Not Found"}, {}))
    with pytest.warns(UserWarning, match="not checked"):
        served.check_tokenizer(Endpoint(url, "m"), lambda text: [1], "/tok")


def test_the_worker_refuses_a_server_with_another_tokenizer_before_any_call(serve, waits, tiny_assets):
    from transformers import AutoTokenizer

    from opd.config import DataConfig
    from opd.teachers.worker import TeacherWorker

    path = str(tiny_assets["teacher"])
    ids = AutoTokenizer.from_pretrained(path).encode(served.PROBE, add_special_tokens=False)
    args = (path, "openai", None, 1.0, 0, str(tiny_assets["student"]), 2, DataConfig())
    url, _ = serve(lambda body: MODELS if body is None else {"tokens": ids})
    worker = TeacherWorker(*args, Endpoint(url, "m"))
    assert worker.max_len == 99 and worker.client.vocab == served.local_vocab_size(path)
    url, _ = serve(lambda body: MODELS if body is None else {"tokens": ids[::-1]})
    with pytest.raises(ServedTeacherError, match="otherwise than the local tokenizer"):
        TeacherWorker(*args, Endpoint(url, "m"))
