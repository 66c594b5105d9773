"""Several teachers on the real stack: every combine rule, a teacher with another tokenizer, judges, corrections.

Teachers are tiny random models, so the judges' verdicts are mostly "wrong"; the tests check that each
signal is produced, recorded and trained on, and that the student moves towards the product of experts
(the mixture's test is in test_integration.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import write_jsonl
from tests.stack import launch, tiny_overrides

pytestmark = pytest.mark.integration


def share_of_digits(response: str, answer: str | None, fields: dict) -> float:
    """A verifier that tells two random teachers apart (best_of needs them to differ)."""
    return sum(c.isdigit() for c in response) / max(len(response), 1)


def base(assets: dict[str, Path], out: Path) -> list[str]:
    overrides = [o for o in tiny_overrides(assets, out) if not o.startswith("teachers.")]
    return [*overrides, "rollout.num_workers=1", "learner.num_shards=1", "learner.zero_stage=2"]


def teachers(*entries: str) -> str:
    return f"teachers=[{', '.join(entries)}]"


def rounds(summary: dict) -> list[dict]:
    return [r for r in summary["rounds"] if r["round"] >= 1]


def test_product_of_experts_of_two_sizes_with_a_verifier(tiny_assets, tmp_path, shared_ray):
    """Two teachers of different sizes as a weighted product of experts; the student's reverse KL to it falls."""
    summary = launch(
        [
            *base(tiny_assets, tmp_path),
            teachers(
                f"{{name: small, model: {tiny_assets['teacher']}, license: apache-2.0, source: test}}",
                f"{{name: big, model: {tiny_assets['big_teacher']}, license: mit, source: test, weight: 0.5}}",
            ),
            "combine.rule=mean_logprob",
            "judge.kind=verifier",
            "judge.verifier=exact_answer",
            "rounds=4",
        ],
        ray_address=shared_ray,
    )
    final = summary["final"]
    assert final["reverse_kl_after"] < final["reverse_kl_before"], final
    for r in rounds(summary):
        assert r["teachers/small_samples"] == pytest.approx(64 / 1.5)
        assert r["teachers/big_samples"] == pytest.approx(64 * 0.5 / 1.5)
        assert r["judge/scored_fraction"] == 1.0 and r["judge/mean_score"] >= 0
    student = Path(final["student_path"])
    record = json.loads((student / "provenance.json").read_text())
    assert [t["license"]["id"] for t in record["teachers"]] == ["apache-2.0", "mit"]
    assert sum(t["signal_share"] for t in record["teachers"]) == pytest.approx(1.0)
    assert "big" in (student / "DISTILLATION.md").read_text()


def test_route_by_domain_to_teachers_of_other_sizes_and_tokenizers_with_a_rubric_judge(
    tiny_assets, tmp_path, shared_ray
):
    """Each prompt goes to the teacher its `domain` names, one of them a GPT-2 with its own tokenizer (its signal
    is bridged through character offsets); a teacher judges every response with a rubric and filters."""
    names = ["small", "big", "other"]
    rows = [json.loads(line) for line in Path(tiny_assets["train"]).read_text().splitlines()]
    train = write_jsonl(tmp_path / "train.jsonl", [{**r, "domain": names[i % 3]} for i, r in enumerate(rows)])
    summary = launch(
        [
            *base(tiny_assets, tmp_path),
            f"data.train={train}",
            teachers(
                f"{{name: small, model: {tiny_assets['teacher']}}}",
                f"{{name: big, model: {tiny_assets['big_teacher']}}}",
                f"{{name: other, model: {tiny_assets['other_tokenizer_teacher']}, backend: transformers}}",
            ),
            "combine.rule=route",
            "combine.routes={small: small, big: big, other: other}",
            "combine.default=small",  # the eval prompts carry no domain
            "judge.kind=rubric",
            "judge.teacher=big",
            "judge.rubric='Task: {prompt}{response} Score (0-10):'",
            "judge.use=filter",
            "judge.min_score=0.0",
            "rounds=2",
        ],
        ray_address=shared_ray,
    )
    for r in rounds(summary):
        assert sum(r[f"teachers/{n}_samples"] for n in names) == 64
        assert all(r[f"teachers/{n}_samples"] > 0 for n in names)
        assert math.isfinite(r["learner/jsd"]) and math.isfinite(r["train/reverse_kl"])
        # a random judge rarely writes a number in range: every verdict is either a score or a recorded failure
        failures = r["judge/parse_failures"] / 64
        assert r["judge/scored_fraction"] + failures == pytest.approx(1.0)
        # min_score 0 keeps every scored response and drops (weight 0) every unparsable verdict
        assert r["judge/filtered_fraction"] == pytest.approx(1.0 - r["judge/scored_fraction"])


def test_best_of_picks_the_best_judged_teacher_per_prompt_and_corrects(tiny_assets, tmp_path, shared_ray):
    """Each teacher answers each prompt once, the verifier picks the better one, which scores the prompt's
    samples and rewrites each from its first unlikely token; samples are weighted by their judge score."""
    summary = launch(
        [
            *base(tiny_assets, tmp_path),
            teachers(
                f"{{name: small, model: {tiny_assets['teacher']}}}",
                f"{{name: big, model: {tiny_assets['big_teacher']}}}",
            ),
            "combine.rule=best_of",
            "judge.kind=verifier",
            "judge.verifier=tests.test_multi_teacher:share_of_digits",
            "judge.use=weight",
            "correction.enabled=true",
            "correction.outside_top_k=false",
            "correction.threshold=-6",
            "rounds=3",
        ],
        ray_address=shared_ray,
    )
    final = summary["final"]
    for r in rounds(summary):
        assert r["teachers/small_samples"] + r["teachers/big_samples"] == 64
        assert 0 <= r["judge/mean_score"] <= 1
        assert 0 < r["correction/rate"] <= 1 and len(r["correction/position"]) == r["correction/rate"] * 64
        assert r["learner/correction_sft_nll"] > 0 and r["correction/teacher_tokens"] > 0
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert rows and all({"prompt", "student_response", "teacher_correction", "judge_score"} <= set(r) for r in rows)
    assert any(r["teacher_correction"] is not None for r in rows)
    assert sum(final["teacher_signal_share"].values()) == 64 * 3
