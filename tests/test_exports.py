"""Students written during the run (checkpoint.export_every) and the lr schedule, end to end; the card alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opd import provenance
from opd.config import load_config
from opd.learner.lr_schedule import lr_at
from opd.provenance import StudentCard


def test_student_card_writes_provenance_and_hashes_the_data_once(tiny_assets, tmp_path, monkeypatch):
    cfg = load_config("default", [f"data.train={tiny_assets['train']}", f"data.eval={tiny_assets['eval']}"])
    hashed = []
    monkeypatch.setattr(provenance, "file_sha256", lambda path: hashed.append(path) or "abc")
    provenance._cached_sha256.cache_clear()
    files = {"train": str(tiny_assets["train"]), "eval": str(tmp_path / "gone.jsonl")}
    card = StudentCard(cfg, "base", {"addition": "/teacher"}, files, started="then")
    for r in (1, 2):
        card(str(tmp_path / f"student_round_{r}"), {"addition": 3.0 * r})
    record = json.loads((tmp_path / "student_round_2" / "provenance.json").read_text())
    assert record["student"] == {"base": "base", "path": str(tmp_path / "student_round_2")}
    assert record["teachers"][0]["signal_share"] == 1.0 and record["teachers"][0]["path"] == "/teacher"
    assert record["data"]["train"]["sha256"] == "abc" and record["data"]["eval"]["sha256"] == provenance.MISSING
    assert record["dates"]["started"] == "then"
    assert "student_round_2" in (tmp_path / "student_round_2" / "DISTILLATION.md").read_text()
    assert hashed == [str(tiny_assets["train"])]
    provenance._cached_sha256.cache_clear()


@pytest.mark.integration
def test_cosine_schedule_and_exports_every_round(cosine_run):
    """4 rounds of 4 optimizer steps under cosine with warm-up; the student written after every round (conftest's
    `cosine_run`, which the resume test also reads)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out, summary = cosine_run
    steps, lr, rounds = 4, 1e-2, 4  # learner.mini_batches and learner.lr of tiny_overrides, and the run's rounds
    for r in summary["rounds"][1:]:  # a round logs the mean lr of its optimizer steps
        expected = [
            lr_at(s, lr, rounds * steps, "cosine", 3, 0.1) for s in range((r["round"] - 1) * steps, r["round"] * steps)
        ]
        assert r["learner/lr"] == pytest.approx(sum(expected) / steps, rel=1e-12), r["round"]
    assert summary["rounds"][-1]["learner/lr"] < summary["rounds"][2]["learner/lr"]

    exports = [out / f"student_round_{r}" for r in range(1, rounds + 1)]
    for path in exports:
        AutoModelForCausalLM.from_pretrained(path)
        record = json.loads((path / "provenance.json").read_text())
        assert record["student"]["path"] == str(path) and (path / "DISTILLATION.md").is_file()
        assert record["config"]["checkpoint"]["export_every"] == 1
    weights = [load_file(str(p / "model.safetensors")) for p in [*exports, Path(summary["final"]["student_path"])]]
    assert any(not (weights[0][k] == weights[1][k]).all() for k in weights[0])  # round 2 trained on
    assert all((weights[-2][k] == weights[-1][k]).all() for k in weights[-2])  # the last export is the final student
    assert (Path(summary["final"]["student_path"]) / "provenance.json").is_file()
