"""The placement plan: which actors a run starts, what each reserves, and whether the cluster can hold them.

Checked against the cluster's resources right after Ray starts and before any actor is created, so
"more learner shards than GPUs" is one clear error instead of actors pending forever.
"""

from __future__ import annotations

from dataclasses import dataclass

from opd.devices import visible_devices_env, vllm_build


class PlanError(ValueError):
    """The cluster cannot hold (or this install cannot run) the actors the config asks for."""


@dataclass(frozen=True)
class Role:
    key: str
    """Stable id of the role's placement group: rollout, learner, teacher:<name> (rollout+learner colocated)."""
    name: str
    count: int
    cpus: float
    gpus: float
    keys: str
    """The config keys that size this role (named in errors)."""


SERVED_TEACHER_CPUS = 0.1
"""What one replica of a served teacher (backend=openai) reserves: a thin actor that only waits on HTTP, so it
takes a slice of a CPU whatever teachers.N.cpus_per_replica says, and no GPU (the server holds the model)."""


def teacher_resources(t) -> tuple[float, float]:
    """(CPUs, GPUs) one replica of teacher `t` (a TeacherConfig) reserves."""
    if t.backend == "openai":
        return SERVED_TEACHER_CPUS, 0.0
    return t.cpus_per_replica, t.gpus_per_replica


def roles(cfg) -> list[Role]:
    out = [
        Role(
            "rollout",
            "rollout worker",
            cfg.rollout.num_workers,
            cfg.rollout.cpus_per_worker,
            cfg.rollout.gpus_per_worker,
            "rollout.num_workers x rollout.{cpus,gpus}_per_worker",
        )
    ]
    out += [
        Role(
            f"teacher:{t.name}",
            f"teacher {t.name!r}",
            t.replicas,
            *teacher_resources(t),
            f"teachers.{i}.replicas x teachers.{i}.{{cpus,gpus}}_per_replica",
        )
        for i, t in enumerate(cfg.teachers)
    ]
    out.append(
        Role(
            "learner",
            "learner shard",
            cfg.learner.num_shards,
            cfg.learner.cpus_per_shard,
            cfg.learner.gpus_per_shard,
            "learner.num_shards x learner.{cpus,gpus}_per_shard",
        )
    )
    return out


def bundles(cfg) -> dict[str, list[dict[str, float]]]:
    """Placement-group bundles per role; colocated rollout workers and learner shards share one group."""
    out = {}
    for r in roles(cfg):
        bundle = {"CPU": max(r.cpus, 0.01)} | ({"GPU": r.gpus} if r.gpus else {})
        out[r.key] = [dict(bundle) for _ in range(r.count)]
    if cfg.rollout.colocate:
        learner = out.pop("learner")
        out["rollout"] = [
            {k: a.get(k, 0) + b.get(k, 0) for k in a | b} for a, b in zip(out["rollout"], learner, strict=True)
        ]
    return out


def reserve(cfg) -> dict:
    """One placement group per role (`ray.placement` strategy), ready before any actor starts.

    A group that cannot be placed within `ray.placement_timeout_s` (too few resources on any node, even when
    the cluster's totals suffice) is a PlanError naming the role; every group is released first.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    groups = {key: placement_group(b, strategy=cfg.ray.placement, name=f"opd-{key}") for key, b in bundles(cfg).items()}
    pending = {key: pg.ready() for key, pg in groups.items()}
    ready, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=cfg.ray.placement_timeout_s)
    missing = [key for key, ref in pending.items() if ref not in ready]
    if missing:
        for pg in groups.values():
            remove_placement_group(pg)
        wanted = {key: bundles(cfg)[key] for key in missing}
        raise PlanError(
            f"could not place {missing} within ray.placement_timeout_s={cfg.ray.placement_timeout_s:g} with "
            f"ray.placement={cfg.ray.placement} (bundles {wanted}); each bundle must fit on one node.\n{describe(cfg)}"
        )
    if cfg.rollout.colocate:
        groups["learner"] = groups["rollout"]
    return groups


def slot(group, index: int) -> dict:
    """Actor options placing an actor in bundle `index` of a placement group; an actor whose bundle holds no GPU
    starts with none visible (`devices.visible_devices_env`: Ray would leave it every GPU of its node).

    Each role has bundles of its own, except colocated pairs, whose shared bundle holds GPUs for both."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    hidden = visible_devices_env(group.bundle_specs[index].get("GPU", 0))
    strategy = PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=index)
    return {"scheduling_strategy": strategy} | ({"runtime_env": {"env_vars": hidden}} if hidden else {})


KEEP_FREED_MEMORY = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}
"""glibc's settings for `ray.keep_freed_memory`: serve every allocation from the heap (no mmap, whose chunks go
back to the kernel on free) and never trim the heap. Read once, when a process starts."""


def actor_env(cfg) -> dict[str, str]:
    """Environment variables every actor's process starts with: `KEEP_FREED_MEMORY` when the config asks for it
    and the plan reserves no GPU (a GPU process's large tensors live in the device's own caching allocator, and its
    host memory, e.g. weights staged while loading, should go back to the kernel); GLOO_SOCKET_IFNAME when
    `ray.gloo_socket_ifname` names the interface (else gloo's own pick, or the cluster's setting, stands)."""
    env = dict(KEEP_FREED_MEMORY) if cfg.ray.keep_freed_memory and needs(cfg)["GPU"] == 0 else {}
    return env | ({"GLOO_SOCKET_IFNAME": cfg.ray.gloo_socket_ifname} if cfg.ray.gloo_socket_ifname else {})


def needs(cfg) -> dict[str, float]:
    """Total CPUs and GPUs the plan reserves."""
    rs = roles(cfg)
    return {"CPU": sum(r.count * r.cpus for r in rs), "GPU": sum(r.count * r.gpus for r in rs)}


def cpu_vllm_roles(cfg) -> list[str]:
    """The config keys that put a vLLM engine on CPU: rollout workers (always vLLM) or a backend=vllm teacher
    reserving no GPU."""
    keys = ["rollout.gpus_per_worker=0"] if cfg.rollout.gpus_per_worker == 0 else []
    return keys + [
        f"teachers.{i}.gpus_per_replica=0 (backend=vllm)"
        for i, t in enumerate(cfg.teachers)
        if t.backend == "vllm" and t.gpus_per_replica == 0
    ]


def check_vllm_build(cfg, build: str | None = None) -> None:
    """A PlanError when the plan runs vLLM on CPU but the installed vLLM (`build`, default: this node's,
    `devices.vllm_build`) targets a GPU: such a build has no CPU platform, and every engine would fail only after
    the actors had started. Nodes of one cluster are assumed to share one image."""
    build = build or vllm_build()
    on_cpu = cpu_vllm_roles(cfg)
    if on_cpu and build in ("cuda", "rocm"):
        raise PlanError(
            f"{', '.join(on_cpu)} runs vLLM on CPU, but the installed vLLM is a {build} build, which cannot: "
            "reserve GPUs for those roles (a transformers teacher runs on CPU: teachers.N.backend=transformers), "
            "or install vLLM's CPU build"
        )


def check_fit(cfg, available: dict[str, float]) -> None:
    """A PlanError naming every role and its keys when the cluster's totals cannot hold the plan.

    Totals are a necessary condition (a GPU actor also needs a single node with that many GPUs free, which
    Ray reports as pending); on an autoscaling cluster raise the limits or start the nodes first.
    """
    want = needs(cfg)
    short = {k: (v, available.get(k, 0.0)) for k, v in want.items() if v > available.get(k, 0.0) + 1e-9}
    if not short:
        return
    lines = [f"  {r.count} x {r.name}: {r.cpus:g} CPU, {r.gpus:g} GPU each  ({r.keys})" for r in roles(cfg)]
    missing = ", ".join(f"{v:g} {k} needed, {have:g} in the cluster" for k, (v, have) in short.items())
    raise PlanError(f"the cluster cannot hold this run: {missing}. The plan:\n" + "\n".join(lines))


def describe(cfg) -> str:
    """One line per role, printed at start."""
    want = needs(cfg)
    rows = [f"  {r.count} x {r.name:<22} {r.cpus:g} CPU  {r.gpus:g} GPU each" for r in roles(cfg)]
    return f"plan ({want['CPU']:g} CPU, {want['GPU']:g} GPU):\n" + "\n".join(rows)


class Placed:
    """Mixin for actor classes: where the actor runs, for the placement printed at start."""

    def where(self) -> str:
        import ray

        ctx = ray.get_runtime_context()
        gpus = ctx.get_accelerator_ids().get("GPU", [])
        where = f"node {ctx.get_node_id()[:8]} ({ray.util.get_node_ip_address()})"
        return where + (f", GPU {','.join(map(str, gpus))}" if gpus else "")


def placement(handles: dict[str, list]) -> str:
    """Where each started actor landed: role, node address and the GPUs Ray gave it."""
    import ray

    rows = [
        f"  {role} {i}: {where}"
        for role, actors in handles.items()
        for i, where in enumerate(ray.get([a.where.remote() for a in actors]))
    ]
    return "placement:\n" + "\n".join(rows)
