"""Start-up check that every node of a multi-node cluster sees the run's `output_dir`.

Learner ranks write their checkpoint shards and the exports under `output_dir` on whichever node they run; a
node-local directory there would only fail, or silently split a checkpoint across nodes, when the first checkpoint
is written (or read back on resume). A token file written by the driver and read back on every node catches it
before any actor starts.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from opd.plan import PlanError

READ_TIMEOUT_S = 120.0
"""How long one node's read may take (a worker process starts on each node first)."""


class SharedStorageError(PlanError):
    """Some node of the cluster does not see the driver's `output_dir`."""


def check_shared(output_dir: str, nodes: list[str], read_on: Callable[[str, str], str | None]) -> None:
    """Write a random token under `output_dir` and have every node in `nodes` read it back with
    `read_on(node_id, path)` (its text, None when the file is not there); a `SharedStorageError` names each node
    that does not see it. The token file is removed again whatever happens."""
    os.makedirs(output_dir, exist_ok=True)
    token = secrets.token_hex(16)
    path = os.path.join(os.path.abspath(output_dir), f".opd-shared-check-{token[:12]}")
    with open(path, "w") as f:
        f.write(token)
    try:
        with ThreadPoolExecutor(max_workers=min(len(nodes), 16) or 1) as pool:
            seen = dict(zip(nodes, pool.map(lambda node: _seen(read_on, node, path, token), nodes), strict=True))
    finally:
        os.remove(path)
    blind = {node: why for node, why in seen.items() if why}
    if blind:
        lines = "\n".join(f"  node {node}: {why}" for node, why in blind.items())
        raise SharedStorageError(
            f"output_dir={output_dir} is not shared by every node of the cluster: learner ranks write checkpoints "
            f"there from their own nodes, so it must be on storage every node mounts at the same path (NFS, a "
            f"ReadWriteMany volume; cluster/README.md).\n{lines}"
        )


def _seen(read_on: Callable[[str, str], str | None], node: str, path: str, token: str) -> str:
    """Why `node` does not see the token file at `path` ('' when it does)."""
    try:
        found = read_on(node, path)
    except Exception as err:  # a node that cannot answer is as unusable for checkpoints as a blind one
        return f"could not read {path}: {type(err).__name__}: {err}"
    if found is None:
        return f"{path} does not exist there"
    return "" if found == token else f"{path} holds something else there"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def read_on_node(node_id: str, path: str) -> str | None:
    """The text at `path` as the Ray node `node_id` sees it (None: not there), read by a task pinned to it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(_read).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)
    )
    return ray.get(task.remote(path), timeout=READ_TIMEOUT_S)


def alive_nodes() -> list[str]:
    import ray

    return [n["NodeID"] for n in ray.nodes() if n["Alive"]]


def check_cluster(output_dir: str) -> None:
    """`check_shared` over the alive nodes of the Ray cluster this driver joined, when it has more than one (on a
    single node every actor sees the driver's files)."""
    nodes = alive_nodes()
    if len(nodes) > 1:
        check_shared(output_dir, nodes, read_on_node)
