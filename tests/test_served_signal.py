"""A served teacher's signal parsed from canned completions JSON, its config checks, licence gate and client
retries against a local stub server (no vLLM)."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler

import numpy as np
import pytest

from opd import plan
from opd.config import ConfigError, TeacherConfig
from opd.config.models import check_teachers
from opd.licenses import license_problems
from opd.teachers import served
from opd.teachers.served import Endpoint, ServedClient, ServedTeacherError
from tests.stack import http_server


def _row(entries: dict[int, tuple[float, int]]) -> dict:
    return {str(k): {"logprob": lp, "rank": rank, "decoded_token": "x"} for k, (lp, rank) in entries.items()}


def test_prompt_logprobs_become_the_sampled_token_logprob_and_the_top_k_in_rank_order():
    # prompt [5, 6], response [7, 9]: position 2 has 7 in the top-2, position 3 has 9 outside it (rank 4).
    choice = {
        "prompt_logprobs": [
            None,
            _row({6: (-0.5, 1), 3: (-1.5, 2)}),
            _row({4: (-1.0, 2), 7: (-0.2, 1)}),
            _row({9: (-3.0, 4), 8: (-0.1, 1), 2: (-2.5, 2)}),
        ]
    }
    got = served.parse_scored(choice, 2, [7, 9], 2)
    np.testing.assert_allclose(got.logprobs, [-0.2, -3.0])
    assert got.topk_ids.tolist() == [[7, 4], [8, 2]]
    np.testing.assert_allclose(got.topk_logprobs, [[-0.2, -1.0], [-0.1, -2.5]])
    compact = got.compact()
    assert compact.topk_ids.dtype == np.int32 and compact.topk_logprobs.dtype == np.float16


def test_prompt_logprobs_that_do_not_match_the_request_are_refused():
    rows = [None, _row({6: (-0.5, 1)}), _row({4: (-1.0, 1)})]
    with pytest.raises(ServedTeacherError, match="not for the response tokens"):
        served.parse_scored({"prompt_logprobs": rows}, 2, [7], 1)
    with pytest.raises(ServedTeacherError, match="positions"):
        served.parse_scored({"prompt_logprobs": rows}, 2, [7, 8], 1)
    with pytest.raises(ServedTeacherError, match="max-logprobs"):
        served.parse_scored({"prompt_logprobs": [None, None, _row({7: (-1.0, 1)})]}, 2, [7], 2)


def test_samples_come_back_per_prompt_in_choice_index_order():
    choices = [
        {"index": i, "token_ids": [10 + i, 2], "logprobs": {"token_logprobs": [-0.1 * i, -0.5]}} for i in (3, 0, 2, 1)
    ]
    out = served.parse_samples(choices, 2, 2)
    assert [[ids.tolist() for ids, _ in per] for per in out] == [[[10, 2], [11, 2]], [[12, 2], [13, 2]]]
    np.testing.assert_allclose(out[1][1][1], [-0.3, -0.5])
    with pytest.raises(ServedTeacherError, match="return_token_ids"):
        served.parse_samples([{"index": 0, "text": "hi"}], 1, 1)


def test_requests_send_token_ids_and_ask_for_the_signal():
    body = served.score_body("m", [[1, 2, 3]], 5)
    assert body["prompt"] == [[1, 2, 3]] and body["prompt_logprobs"] == 5 and body["max_tokens"] == 1
    body = served.sample_body("m", [[1], [2, 3]], 2, 8, 0.7, None, [0])
    assert body["prompt"] == [[1], [2, 3]] and body["stop_token_ids"] == [0] and "seed" not in body
    assert body["return_token_ids"] and body["logprobs"] == 0 and body["top_p"] == 1.0


def _served(**kw) -> TeacherConfig:
    served = {"model": "served-name", "backend": "openai", "url": "http://127.0.0.1:8000/v1", "license": "apache-2.0"}
    return TeacherConfig(**(served | kw))


def test_a_served_teacher_is_checked_and_reserves_a_thin_cpu_slice():
    check_teachers([_served(tokenizer="/tmp")])
    for kw, key in (
        ({"url": ""}, "teachers.0.url"),
        ({"gpus_per_replica": 1}, "teachers.0.gpus_per_replica"),
        ({"api_key_env": "sk-abc123-secret"}, "teachers.0.api_key_env"),
        ({"max_concurrency": 0}, "teachers.0.max_concurrency"),
    ):
        with pytest.raises(ConfigError, match=key) as err:
            check_teachers([_served(**kw)])
        assert "sk-abc123" not in str(err.value)
    assert plan.teacher_resources(_served(cpus_per_replica=4)) == (plan.SERVED_TEACHER_CPUS, 0.0)


def test_the_served_tokenizer_is_required_unless_model_is_a_local_dir(tmp_path):
    from opd.config.load import check_served_tokenizer

    with pytest.raises(ConfigError, match=r"teachers\.0\.tokenizer is required"):
        check_served_tokenizer(0, _served())
    with pytest.raises(ConfigError, match=r"teachers\.0\.tokenizer=/nope"):
        check_served_tokenizer(0, _served(tokenizer="/nope"))
    with pytest.raises(ConfigError, match=r"generation_config\.json"):
        check_served_tokenizer(0, _served(model=str(tmp_path)))
    (tmp_path / "config.json").write_text("{}")
    check_served_tokenizer(0, _served(model=str(tmp_path)))
    check_served_tokenizer(0, _served(tokenizer=str(tmp_path)))


def test_closed_provider_endpoints_need_accept_terms():
    errors, _ = license_problems([_served(url="https://api.openai.com/v1", license="apache-2.0")])
    assert errors and "teachers.0.url is api.openai.com" in errors[0] and "accept_terms" in errors[0]
    errors, notes = license_problems([_served(url="https://api.openai.com/v1", accept_terms="written agreement X")])
    assert not errors and any("written agreement X" in n for n in notes)
    assert not license_problems([_served(license="apache-2.0")])[0]


@pytest.mark.parametrize(
    ("url", "model", "closed"),
    [
        ("https://api.openai.com./v1", "gpt-4o", "openai.com"),  # a trailing dot is the same host
        ("https://eu.api.openai.com/v1", "gpt-4o", "openai.com"),  # a subdomain
        ("https://my-org.openai.azure.com/openai/deployments/x", "gpt-4o", "openai.azure.com"),  # Azure OpenAI
        ("https://API.Anthropic.com/v1", "claude", "anthropic.com"),
        ("https://openrouter.ai/api/v1", "anthropic/claude-3.5-sonnet", "openrouter.ai"),  # a router to a closed one
        ("https://openrouter.ai/api/v1", "qwen/qwen-2.5-72b-instruct", None),  # the same router to open weights
        ("https://notopenai.com/v1", "m", None),  # a suffix of the name is not a subdomain
        ("http://127.0.0.1:8000/v1", "m", None),
    ],
)
def test_closed_providers_are_found_by_domain_and_behind_routers(url, model, closed):
    errors, _ = license_problems([_served(url=url, model=model)])
    if closed is None:
        assert not errors
    else:
        assert errors and f"({closed})" in errors[0] and "accept_terms" in errors[0]


def test_a_served_teacher_must_state_its_licence():
    errors, _ = license_problems([_served(license="unspecified")])
    assert errors and "teachers.0.license is unspecified, but a served teacher" in errors[0]
    assert not license_problems([_served(license="proprietary-api", accept_terms="agreement 7")])[0]


class _Stub(BaseHTTPRequestHandler):
    """Answers /v1/models; /v1/completions fails with `status` (and counts the tries)."""

    status, tries = 503, 0

    def do_GET(self):
        self._send(200, {"data": [{"id": "m", "max_model_len": 99}]})

    def do_POST(self):
        type(self).tries += 1
        self.rfile.read(int(self.headers["Content-Length"]))
        assert self.headers["Authorization"] == "Bearer k"
        self._send(type(self).status, {"error": "down"})

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub():
    with http_server(_Stub) as server:
        yield server


def test_the_client_retries_server_errors_and_fails_at_once_on_a_refused_request(stub, waits):
    endpoint = Endpoint(f"http://127.0.0.1:{stub.server_port}/v1", "m", "k", 2, 5.0, deadline_s=5.0)
    assert "k'" not in repr(endpoint) and "api_key" not in repr(endpoint)
    client = ServedClient(endpoint)
    assert client.max_model_len() == 99
    _Stub.status, _Stub.tries = 503, 0
    with pytest.raises(ServedTeacherError, match="HTTP 503"):
        client.score([[1]], [[2]], 1)
    assert _Stub.tries == 3 and waits == [1.0, 2.0]  # the next wait, 4 s, would pass the 5 s deadline
    _Stub.status, _Stub.tries = 400, 0
    with pytest.raises(ServedTeacherError, match="HTTP 400"):
        client.sample([[1]], 1, 4, 0.0, None, [0])
    assert _Stub.tries == 1
