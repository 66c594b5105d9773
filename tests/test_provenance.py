"""Licence gate and provenance record: no torch or Ray, runs in well under a second."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from opd.config import OPDConfig, TeacherConfig
from opd.licenses import LICENSES, LicenseWarning, license_problems, lookup
from opd.provenance import MISSING, build_provenance, file_sha256, write_model_card


def two_teachers(**second) -> OPDConfig:
    first = TeacherConfig(name="big", model="org/big", license="apache-2.0", source="hub:org/big@abc123")
    other = {"name": "meta", "model": "meta-llama/Llama-3.1-8B", "license": "llama3.1", **second}
    return OPDConfig(teachers=[first, TeacherConfig(**other)])


def provenance_for(cfg: OPDConfig, tmp_path: Path, **kw) -> dict:
    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "1+1="}\n')
    args = {
        "student_path": str(tmp_path / "student"),
        "student_base": "org/small",
        "teacher_paths": {"big": "/models/big"},
        "signal_share": {t.name: 1.0 for t in cfg.teachers},
        "data_files": {"train": str(train), "eval": str(tmp_path / "nope.jsonl")},
        "started": "2025-01-01T00:00:00+00:00",
        "finished": "2025-01-01T01:00:00+00:00",
        "opd_version": "0.1.0",
    }
    return build_provenance(cfg, **(args | kw))


def test_table_covers_the_common_licenses_with_lowercase_ids():
    for lid in ("apache-2.0", "mit", "cc-by-nc-4.0", "llama2", "llama3.3", "llama4", "gemma", "qwen", "deepseek"):
        assert lid in LICENSES
    assert all(key == key.lower() == lic.id for key, lic in LICENSES.items())
    assert LICENSES["llama2"].restricts_training and LICENSES["proprietary-api"].restricts_training
    assert not LICENSES["llama3.1"].restricts_training and "Llama" in LICENSES["llama3.1"].notice
    assert lookup(" Apache-2.0 ") is LICENSES["apache-2.0"] and lookup("wtfpl-9") is None


@pytest.mark.parametrize("license_id", ["llama2", "proprietary-api", "Llama2"])
def test_restricted_license_without_accept_terms_is_refused(license_id):
    first = TeacherConfig(name="big", model="org/big", license="apache-2.0")
    errors, _ = license_problems([first, TeacherConfig(name="api", model="org/api", license=license_id)])
    assert len(errors) == 1
    assert f"teachers.1.license={license_id}" in errors[0]
    assert "teachers.1.accept_terms=" in errors[0]


def test_accept_terms_lets_a_restricted_teacher_run_with_a_warning_and_is_recorded(tmp_path):
    why = "the student is a Llama 2 derivative"
    cfg = two_teachers(license="llama2", accept_terms=why)
    errors, warnings = license_problems(cfg.teachers)
    assert errors == []
    assert any("teachers.1.license=llama2" in w and why in w for w in warnings)
    record = provenance_for(cfg, tmp_path)
    assert record["teachers"][1]["accept_terms"] == why
    assert record["teachers"][1]["license"]["restricts_training"] is True


def test_unknown_id_warns_naming_it_and_unspecified_warns_but_builtin_does_not():
    cfg = two_teachers(license="wtfpl-9")
    errors, warnings = license_problems(cfg.teachers)
    assert errors == [] and len(warnings) == 1 and "teachers.1.license=wtfpl-9" in warnings[0]
    errors, warnings = license_problems(two_teachers(license="unspecified").teachers)
    assert errors == [] and len(warnings) == 1 and "teachers.1.license" in warnings[0]
    assert license_problems(OPDConfig().teachers) == ([], [])  # built-in teacher: made here, nobody's terms


def test_the_config_issues_the_gate_warnings_once():
    from opd.config import load_config

    with pytest.warns(LicenseWarning) as caught:
        load_config("default", ["teachers.0.license=wtfpl-9"])
    notes = [str(w.message) for w in caught if issubclass(w.category, LicenseWarning)]
    assert len(notes) == 1 and "teachers.0.license=wtfpl-9" in notes[0]


def test_permissive_licenses_raise_nothing():
    assert license_problems(two_teachers(license="mit").teachers) == ([], [])


def test_signal_share_is_normalised(tmp_path):
    cfg = two_teachers()
    record = provenance_for(cfg, tmp_path, signal_share={"big": 300, "meta": 100})
    assert [t["signal_share"] for t in record["teachers"]] == pytest.approx([0.75, 0.25])
    zero = provenance_for(cfg, tmp_path, signal_share={})
    assert [t["signal_share"] for t in zero["teachers"]] == [0.0, 0.0]


def test_file_sha256_matches_hashlib(tmp_path):
    path = tmp_path / "blob.bin"
    payload = bytes(range(256)) * 5000  # spans several read chunks
    path.write_bytes(payload)
    assert file_sha256(path, chunk_size=4096) == hashlib.sha256(payload).hexdigest()


def test_provenance_records_paths_data_dates_notices_and_config(tmp_path):
    cfg = two_teachers(license="gemma")
    record = provenance_for(cfg, tmp_path)
    big, meta = record["teachers"]
    assert big["path"] == "/models/big" and meta["path"] == "meta-llama/Llama-3.1-8B"  # default: the model id
    assert big["license"]["id"] == "apache-2.0" and big["source"] == "hub:org/big@abc123"
    assert meta["license"]["url"] == LICENSES["gemma"].url
    assert record["data"]["train"]["sha256"] == file_sha256(tmp_path / "train.jsonl")
    assert record["data"]["eval"]["sha256"] == MISSING
    assert record["dates"] == {"started": "2025-01-01T00:00:00+00:00", "finished": "2025-01-01T01:00:00+00:00"}
    assert record["notices"] == [LICENSES["gemma"].notice]
    assert record["config"]["loss"]["type"] == cfg.loss.type and len(record["config"]["teachers"]) == 2


def test_notices_are_deduplicated(tmp_path):
    cfg = OPDConfig(
        teachers=[
            TeacherConfig(name="a", model="org/a", license="gemma"),
            TeacherConfig(name="b", model="org/b", license="Gemma"),
        ]
    )
    assert provenance_for(cfg, tmp_path, teacher_paths={})["notices"] == [LICENSES["gemma"].notice]


def test_write_model_card_writes_both_files_atomically(tmp_path):
    why = "written agreement with the API provider, ref 42"
    cfg = OPDConfig(
        teachers=[
            TeacherConfig(name="big", model="org/big", license="llama3.3"),
            TeacherConfig(name="api", model="vendor/api", license="proprietary-api", accept_terms=why),
            TeacherConfig(name="mystery", model="org/mystery", license="wtfpl-9"),
        ]
    )
    record = provenance_for(cfg, tmp_path, signal_share={"big": 2, "api": 1, "mystery": 1})
    out = tmp_path / "student"
    write_model_card(out, record)
    assert sorted(p.name for p in out.iterdir()) == ["DISTILLATION.md", "provenance.json"]  # no temp files left
    assert json.loads((out / "provenance.json").read_text()) == record
    card = (out / "DISTILLATION.md").read_text()
    for name in ("big", "api", "mystery"):
        lic = LICENSES.get(next(t.license for t in cfg.teachers if t.name == name))
        assert f"`{lic.id if lic else 'wtfpl-9'}`" in card
    assert "Llama 3.3 Community License Agreement" in card and "50.0%" in card
    for notice in record["notices"]:
        assert notice in card
    assert why in card and "org/small" in card and "reverse_kl" in card
    assert file_sha256(tmp_path / "train.jsonl") in card and "mystery" in card.split("## Licence notices")[1]

    write_model_card(out, record | {"dates": {"started": "x", "finished": "y"}})  # overwrite in place
    assert sorted(p.name for p in out.iterdir()) == ["DISTILLATION.md", "provenance.json"]
    assert json.loads((out / "provenance.json").read_text())["dates"]["started"] == "x"


def test_failed_write_leaves_no_temp_file_and_keeps_the_old_card(tmp_path, monkeypatch):
    out = tmp_path / "student"
    record = provenance_for(two_teachers(), tmp_path)
    write_model_card(out, record)
    before = (out / "provenance.json").read_text()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_model_card(out, record | {"dates": {"started": "x", "finished": "y"}})
    assert (out / "provenance.json").read_text() == before
    assert sorted(p.name for p in out.iterdir()) == ["DISTILLATION.md", "provenance.json"]


def test_module_imports_no_heavy_frameworks():
    code = (
        "import sys, opd.provenance; "
        "print([m for m in ('torch', 'ray', 'vllm', 'transformers', 'deepspeed') if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_config_refuses_a_restricted_teacher_before_anything_starts():
    from opd.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"teachers\.0\.license=proprietary-api.*accept_terms"):
        load_config("default", ["teachers.0.license=proprietary-api"])
    cfg = load_config("default", ["teachers.0.license=proprietary-api", "teachers.0.accept_terms=our own API"])
    assert cfg.teachers[0].accept_terms == "our own API"
