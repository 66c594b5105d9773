"""Credentials stay out of every file and log a run writes; a served teacher's URL may carry basic auth."""

from __future__ import annotations

import json
import subprocess
import sys
from http.server import BaseHTTPRequestHandler
from typing import ClassVar

import pytest

from opd.config import ConfigError, TeacherConfig, load_config
from opd.provenance import build_provenance
from opd.secrets import REDACTED, safe_yaml, split_userinfo, without_userinfo
from opd.teachers.pool import served_endpoint
from opd.teachers.served import ServedClient, ServedTeacherError
from tests.stack import ROOT, http_server

PASSWORD = "hunter2-s3cret"


def leaky_config(tiny_assets):
    url = f"https://proxy-user:{PASSWORD}@teachers.example.com/v1"
    return load_config(
        "default",
        [
            f"data.train={tiny_assets['train']}",
            f"data.eval={tiny_assets['eval']}",
            f"ray.address=ray://admin:{PASSWORD}@head:10001",
            f"teachers=[{{name: served, model: m, backend: openai, url: '{url}', tokenizer: {tiny_assets['teacher']},"
            " license: apache-2.0}]",
        ],
    )


def test_config_yaml_and_provenance_hold_no_credential_and_keep_where_things_are(tiny_assets, tmp_path):
    cfg = leaky_config(tiny_assets)
    text = safe_yaml(cfg)
    assert PASSWORD not in text
    assert f"ray://{REDACTED}@head:10001" in text and f"https://{REDACTED}@teachers.example.com/v1" in text
    record = build_provenance(
        cfg,
        student_path=str(tmp_path),
        student_base="base",
        teacher_paths={},
        signal_share={"served": 1.0},
        data_files={},
        started="then",
        finished="now",
    )
    dumped = json.dumps(record)
    assert PASSWORD not in dumped
    assert record["teachers"][0]["endpoint"] == f"https://{REDACTED}@teachers.example.com/v1"


def test_the_dry_run_prints_no_credential(tiny_assets, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "launch.py",
            "--dry-run",
            f"data.train={tiny_assets['train']}",
            "ray.address=ray://u:p4ss@h:1",
            f"output_dir={tmp_path}",  # a run joining a cluster writes to shared storage
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "p4ss" not in proc.stdout + proc.stderr and f"ray://{REDACTED}@h:1" in proc.stdout


def test_userinfo_is_split_from_a_url_and_kept_nowhere_else():
    assert split_userinfo("https://u:p%40ss@host:8000/v1") == ("https://host:8000/v1", "u:p%40ss")
    assert split_userinfo("http://127.0.0.1:8000/v1") == ("http://127.0.0.1:8000/v1", None)
    assert (
        without_userinfo("see http://a:b@x and https://tok@y/z")
        == f"see http://{REDACTED}@x and https://{REDACTED}@y/z"
    )


class _Auth(BaseHTTPRequestHandler):
    seen: ClassVar[list[str | None]] = []

    def do_GET(self):
        type(self).seen.append(self.headers["Authorization"])
        self.send_response(500)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def auth_server():
    with http_server(_Auth) as server:
        yield server


def test_credentials_in_a_served_url_become_basic_auth_and_errors_do_not_show_them(auth_server, waits):
    t = TeacherConfig(
        name="s", model="m", backend="openai", url=f"http://me:{PASSWORD}@127.0.0.1:{auth_server.server_port}/v1"
    )
    endpoint = served_endpoint(t, 5.0)
    assert PASSWORD not in endpoint.url and PASSWORD not in repr(endpoint)
    _Auth.seen = []
    with pytest.raises(ServedTeacherError) as err:
        ServedClient(endpoint).max_model_len()
    assert PASSWORD not in str(err.value) and f"127.0.0.1:{auth_server.server_port}" in str(err.value)
    assert _Auth.seen and set(_Auth.seen) == {"Basic bWU6aHVudGVyMi1zM2NyZXQ="}  # me:hunter2-s3cret


def test_a_key_and_url_credentials_together_are_refused(monkeypatch):
    monkeypatch.setenv("OPD_TEST_KEY", "sk-test")
    t = TeacherConfig(name="s", model="m", backend="openai", url="https://a:b@h/v1", api_key_env="OPD_TEST_KEY")
    with pytest.raises(ConfigError, match="url carries credentials and api_key_env names a key"):
        served_endpoint(t, 5.0)


@pytest.mark.parametrize(
    ("url", "key", "refused"),
    [
        ("http://10.0.0.5:8000/v1", "TEACHER_KEY", True),
        (f"http://u:{PASSWORD}@teachers.internal/v1", "", True),
        ("http://127.0.0.1:8000/v1", "TEACHER_KEY", False),
        ("http://localhost:8000/v1", "TEACHER_KEY", False),
        ("https://10.0.0.5:8000/v1", "TEACHER_KEY", False),
        ("http://10.0.0.5:8000/v1", "", False),  # no credential to protect
    ],
)
def test_credentials_over_plain_http_leave_the_machine_only_over_https(url, key, refused):
    from opd.config.models import check_served

    t = TeacherConfig(name="s", model="m", backend="openai", url=url, api_key_env=key, license="mit")
    if not refused:
        check_served(0, t)
        return
    with pytest.raises(ConfigError, match="over http; use https") as err:
        check_served(0, t)
    assert PASSWORD not in str(err.value)
