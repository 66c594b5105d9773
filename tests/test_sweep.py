import subprocess
import sys
from pathlib import Path

from opd.sweep import expand, run_name, table, varying

ROOT = Path(__file__).resolve().parent.parent


def test_grid_is_the_cartesian_product_in_order():
    points = expand(["loss.beta=0,0.5,1", "learner.lr=1e-5,3e-5", "rounds=4"])
    assert len(points) == 6
    assert points[0] == ["loss.beta=0", "learner.lr=1e-5", "rounds=4"]
    assert points[-1] == ["loss.beta=1", "learner.lr=3e-5", "rounds=4"]
    assert varying(points) == ["loss.beta", "learner.lr"]
    assert run_name(points[1], varying(points)) == "loss.beta=0,learner.lr=3e-5"


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
