import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from opd.monitoring import SUMMARY_LINE
from opd.sweep import expand, run_name, table, varying
from tests.stack import tiny_overrides

ROOT = Path(__file__).resolve().parent.parent


def test_grid_is_the_cartesian_product_in_order():
    points = expand(["loss.beta=0,0.5,1", "learner.lr=1e-5,3e-5", "rounds=4"])
    assert len(points) == 6
    assert points[0] == ["loss.beta=0", "learner.lr=1e-5", "rounds=4"]
    assert points[-1] == ["loss.beta=1", "learner.lr=3e-5", "rounds=4"]
    assert varying(points) == ["loss.beta", "learner.lr"]
    assert run_name(points[1], varying(points)) == "loss.beta=0,learner.lr=3e-5"


def test_a_key_given_twice_keeps_its_last_values():
    assert expand(["learner.lr=1e-2", "rounds=2", "learner.lr=1e-3,1e-2"]) == [
        ["learner.lr=1e-3", "rounds=2"],
        ["learner.lr=1e-2", "rounds=2"],
    ]


def test_commas_inside_brackets_do_not_split():
    assert expand(["data.tags=[a,b]"]) == [["data.tags=[a,b]"]]


def test_table_formats_floats_and_missing_values():
    text = table([{"run": "a", "x": 0.123456}, {"run": "b"}], ["run", "x"])
    assert text.splitlines() == ["| run | x |", "|---|---|", "| a | 0.1235 |", "| b | n/a |"]


def test_a_bad_point_stops_the_sweep_before_any_run():
    proc = subprocess.run(
        [sys.executable, "launch.py", "--multirun", "loss.beta=0.5,3"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode != 0 and "loss.beta=3" in proc.stderr and "runs over" not in proc.stdout


@pytest.mark.integration
def test_multirun_gives_each_point_its_own_run_grouped_in_wandb_and_a_table(tiny_assets, tmp_path, shared_ray):
    args = [*tiny_overrides(tiny_assets, tmp_path), "rollout.num_workers=1", "learner.num_shards=1", "rounds=1"]
    args.append(f"ray.address={shared_ray}")  # every point joins the suite's cluster
    proc = subprocess.run(
        [sys.executable, "launch.py", "--multirun", *args, "learner.lr=1e-3,1e-2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1500,
        env=dict(os.environ, WANDB_MODE="offline"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]  # like a single run's: the file with every run's final figures
    assert last.startswith(SUMMARY_LINE) and last.endswith("sweep.json"), last
    result = json.loads(Path(last.removeprefix(SUMMARY_LINE)).read_text())
    runs = result["runs"]
    assert [r["run"] for r in runs] == ["learner.lr=1e-3", "learner.lr=1e-2"]
    root = Path(runs[0]["output_dir"]).parent
    assert root.name == result["sweep"] and len({r["output_dir"] for r in runs}) == 2
    assert all(r["run"] in (root / "sweep.md").read_text() for r in runs)
    assert json.loads((root / "sweep.json").read_text()) == result
    for r, lr in zip(runs, (1e-3, 1e-2), strict=True):
        out = Path(r["output_dir"])
        summary = json.loads((out / "summary.json").read_text())
        assert summary["final"]["reverse_kl_after"] == r["reverse_kl_after"]
        cfg = OmegaConf.load(out / "config.yaml")
        assert cfg.learner.lr == lr and cfg.wandb.group == result["sweep"] and cfg.wandb.name == r["run"]
        assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))
