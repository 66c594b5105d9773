"""The start-up check that every node of a multi-node cluster sees output_dir (Ray faked: nodes are callables)."""

import pytest

from opd import shared_storage
from opd.plan import PlanError
from opd.shared_storage import SharedStorageError, check_shared


def _sees(path: str) -> str | None:
    with open(path) as f:
        return f.read()


def test_every_node_reading_the_token_passes_and_the_token_file_is_removed(tmp_path):
    out = tmp_path / "run"
    read = []
    check_shared(str(out), ["a", "b", "c"], lambda node, path: read.append(node) or _sees(path))
    assert sorted(read) == ["a", "b", "c"] and list(out.iterdir()) == []


def test_a_node_that_does_not_see_output_dir_is_named(tmp_path):
    def read_on(node: str, path: str) -> str | None:
        if node == "blind":
            return None
        if node == "broken":
            raise TimeoutError("no answer")
        return "stale" if node == "other" else _sees(path)

    with pytest.raises(SharedStorageError, match="storage every node mounts") as err:
        check_shared(str(tmp_path), ["head", "blind", "broken", "other"], read_on)
    text = str(err.value)
    assert "node blind:" in text and "does not exist there" in text and "TimeoutError: no answer" in text
    assert "node other:" in text and "node head" not in text and f"output_dir={tmp_path}" in text
    assert isinstance(err.value, PlanError)  # launch.py reports it as a plan error and exits
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("nodes", "checked"), [(["n1"], False), (["n1", "n2"], True)])
def test_the_cluster_check_runs_only_on_several_nodes(monkeypatch, tmp_path, nodes, checked):
    seen = []
    monkeypatch.setattr(shared_storage, "alive_nodes", lambda: nodes)
    monkeypatch.setattr(shared_storage, "read_on_node", lambda node, path: seen.append(node) or _sees(path))
    shared_storage.check_cluster(str(tmp_path))
    assert seen == (nodes if checked else [])


def test_alive_nodes_skips_dead_ones(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "nodes", lambda: [{"NodeID": "a", "Alive": True}, {"NodeID": "b", "Alive": False}])
    assert shared_storage.alive_nodes() == ["a"]


def test_start_checks_output_dir_before_any_actor_starts():
    """Wired into opd/startup.py's start, before the placement groups are reserved."""
    import inspect

    from opd import startup

    source = inspect.getsource(startup.start)
    assert source.index("shared_storage.check_cluster(cfg.output_dir)") < source.index("plan.reserve(cfg)")
