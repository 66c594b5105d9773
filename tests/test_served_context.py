"""Prompts too long for a served teacher's context are found before the run starts, naming file:line (the
server's context is faked here; `served_context` asks a real one)."""

from __future__ import annotations

import re

import pytest

from opd.config import DataConfig, OPDConfig, TeacherConfig
from opd.config.models import CombineConfig
from opd.data import DataError, load_prompts
from opd.teachers import served
from opd.teachers.context import fit_served_teachers, served_context
from opd.tiny import train_tokenizer

TEXTS = ["1+2=3", "40+17=57"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, str]:
    """The student's tokenizer (one token per character here) and a teacher's that merges digits."""
    root = tmp_path_factory.mktemp("tokenizers")
    train_tokenizer(TEXTS, 40).save_pretrained(root / "student")
    train_tokenizer(TEXTS * 20, 300, split_digits=False).save_pretrained(root / "other")
    return {"student": str(root / "student"), "other": str(root / "other")}


def config(path, tokenizers: dict[str, str], on_error: str = "fail", **teacher) -> OPDConfig:
    t = TeacherConfig(
        **{"name": "big", "model": "served", "backend": "openai", "url": "http://127.0.0.1:1/v1"}
        | {"tokenizer": tokenizers["student"], "license": "apache-2.0"}
        | teacher
    )
    cfg = OPDConfig(teachers=[t], data=DataConfig(train=str(path), eval=str(path), on_error=on_error))
    cfg.rollout.max_new_tokens = 4
    return cfg


def fit(cfg: OPDConfig, tokenizers: dict[str, str], max_len: int | None = 10):
    train, _ = load_prompts(cfg.data.train)
    paths = {t.name: t.tokenizer_path for t in cfg.teachers}
    return fit_served_teachers(cfg, tokenizers["student"], paths, train, {"": train}, lambda t, timeout: max_len)


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "1+2="}\n\n{"prompt": "40+17=40+17="}\n{"prompt": "40+17="}\n')
    return path


def test_a_prompt_longer_than_the_served_context_names_file_line_and_teacher(prompts, tokenizers):
    where = re.escape(f"{prompts}:3")
    message = rf"^{where}: prompt is 12 tokens; teacher 'big' is served with max_model_len=10, .* limit is 6"
    with pytest.raises(DataError, match=message):
        fit(config(prompts, tokenizers), tokenizers)
    train, evals, skipped = fit(config(prompts, tokenizers), tokenizers, max_len=16)
    assert skipped == 0 and len(train) == len(evals[""]) == 3


def test_with_on_error_skip_the_prompt_is_left_out_of_train_and_eval(prompts, tokenizers):
    train, evals, skipped = fit(config(prompts, tokenizers, "skip"), tokenizers)
    assert [p.line for p in train] == [p.line for p in evals[""]] == [1, 4] and skipped == 2
    with pytest.raises(DataError, match=r"no prompt fits the context of the served teachers \(3 too long\)"):
        fit(config(prompts, tokenizers, "skip"), tokenizers, max_len=6)


def test_a_teacher_with_another_tokenizer_counts_its_own_tokens(prompts, tokenizers):
    cfg = config(prompts, tokenizers, tokenizer=tokenizers["other"])
    with pytest.raises(DataError, match=rf"{re.escape(str(prompts))}:3: prompt is 8 tokens"):
        fit(cfg, tokenizers, max_len=8)  # not the student's 12 tokens: the teacher's digits merge


def test_only_prompts_routed_to_the_teacher_and_only_served_teachers_are_checked(tmp_path, prompts, tokenizers):
    path = tmp_path / "routed.jsonl"
    path.write_text('{"prompt": "1+2=", "domain": "math"}\n{"prompt": "40+17=40+17=", "domain": "chat"}\n')
    cfg = config(path, tokenizers)
    cfg.combine = CombineConfig(rule="route", routes={"math": "big", "chat": "other"})
    cfg.teachers.append(TeacherConfig(name="other"))
    assert fit(cfg, tokenizers)[2] == 0  # the long prompt goes to the in-process teacher
    cfg = OPDConfig(data=DataConfig(train=str(prompts), eval=str(prompts)))
    assert fit(cfg, tokenizers, max_len=1)[2] == 0  # no served teacher


def test_a_server_not_reached_from_the_driver_leaves_the_check_to_the_run(monkeypatch, tokenizers, capsys, prompts):
    def unreachable(client) -> int:
        raise served.ServedTeacherError("connection refused")

    monkeypatch.setattr(served.ServedClient, "max_model_len", unreachable)
    assert served_context(config(prompts, tokenizers).teachers[0], 5.0) is None
    assert "prompts not checked against teacher 'big'" in capsys.readouterr().out
