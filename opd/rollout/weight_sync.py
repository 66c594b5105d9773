"""Weight transfer from the learner to vLLM rollout engines.

GPU clusters use vLLM's own `nccl` (cross-node) or `ipc` (colocated) engines. vLLM
has no CPU transport, and `collective_rpc` cannot carry tensors, so this module adds
one: `gloo`, registered in vLLM's `WeightTransferEngineFactory` registry. It has the
same shape as vLLM's NCCL engine (learner rank 0 broadcasts into a process group
that every rollout worker joins), so the learner and controller drive both alike.

Weights travel in layer-sized groups, one flat buffer per dtype per group: the
learner gathers one ZeRO-3 layer at a time (bounded memory) and the wire sees a few
large messages instead of one per tensor.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.distributed as dist
from vllm.distributed.weight_transfer import (
    TrainerWeightTransferEngine,
    WeightSource,
    WeightTransferEngine,
    WeightTransferEngineFactory,
    WeightTransferTrainerFactory,
)
from vllm.distributed.weight_transfer.base import (
    TrainerInitInfo,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

if TYPE_CHECKING:
    from vllm.distributed.weight_transfer import VLLMWeightSyncClient

BACKEND = "gloo"
_TIMEOUT = datetime.timedelta(minutes=5)


def open_group(address: str, port: int, rank: int, world_size: int) -> dist.ProcessGroupGloo:
    """A gloo group outside torch's default group (vLLM and DeepSpeed each own that)."""
    store = dist.TCPStore(address, port, world_size, is_master=rank == 0, timeout=_TIMEOUT)
    return dist.ProcessGroupGloo(dist.PrefixStore("opd-weights", store), rank, world_size, _TIMEOUT)


def pack(tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Flatten tensors into one contiguous buffer per dtype, in order."""
    by_dtype: dict[str, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(str(t.dtype).removeprefix("torch."), []).append(t.detach().reshape(-1))
    return {name: torch.cat(parts) for name, parts in sorted(by_dtype.items())}


def unpack(buffers: dict[str, torch.Tensor], dtype_names: list[str], shapes: list[list[int]]) -> list[torch.Tensor]:
    """Inverse of `pack`: views into `buffers`, one per (dtype, shape), in order."""
    offsets = dict.fromkeys(buffers, 0)
    out = []
    for dtype_name, shape in zip(dtype_names, shapes, strict=True):
        n = int(torch.Size(shape).numel())
        start = offsets[dtype_name]
        out.append(buffers[dtype_name][start : start + n].view(shape))
        offsets[dtype_name] = start + n
    return out


def buffer_sizes(dtype_names: list[str], shapes: list[list[int]]) -> dict[str, int]:
    """Element count of each per-dtype buffer `pack` would build."""
    sizes: dict[str, int] = {}
    for dtype_name, shape in zip(dtype_names, shapes, strict=True):
        sizes[dtype_name] = sizes.get(dtype_name, 0) + int(torch.Size(shape).numel())
    return dict(sorted(sizes.items()))


def broadcast(group: dist.ProcessGroupGloo, buffers: dict[str, torch.Tensor]) -> None:
    for buf in buffers.values():
        group.broadcast([buf], dist.BroadcastOptions()).wait()


@dataclass
class GlooInitInfo(WeightTransferInitInfo):
    """Worker side: where to meet the learner, and this engine's first rank."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int


@dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    """One sync: every parameter's name/dtype/shape in send order, cut into groups."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    group_sizes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not len(self.names) == len(self.dtype_names) == len(self.shapes) == sum(self.group_sizes):
            raise ValueError("names, dtype_names, shapes and group_sizes disagree on the parameter count")


class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
    """Inference side: receive grouped flat buffers and load them with `load_weights`."""

    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group: dist.ProcessGroupGloo | None = None

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        rank = init_info.rank_offset + self.parallel_config.rank
        self.group = open_group(init_info.master_address, init_info.master_port, rank, init_info.world_size)

    def start_weight_update(self) -> None:
        # Checkpoint-format weights are loaded layer by layer and re-processed by vLLM
        # (fused qkv, packed layouts), exactly as its NCCL engine does.
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)
        # On CPU, vLLM prepacks each GEMM's weight (oneDNN) when it processes a layer.
        # A tied LM head loads nothing of its own, so reload skips it and it would keep
        # computing logits from the old embedding: repack it from the shared weight.
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

        for module in self.model.modules():
            if isinstance(module, ParallelLMHead) and hasattr(module, "cpu_linear"):
                module.quant_method.process_weights_after_loading(module)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class ends with torch.accelerator.synchronize(), which has no CPU backend.
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("gloo weight transfer used before init_weight_transfer_engine()")
        start = 0
        for size in update_info.group_sizes:
            sl = slice(start, start + size)
            dtypes, shapes = update_info.dtype_names[sl], update_info.shapes[sl]
            buffers = {
                name: torch.empty(n, dtype=getattr(torch, name), device=self.device)
                for name, n in buffer_sizes(dtypes, shapes).items()
            }
            broadcast(self.group, buffers)
            self.model.load_weights(list(zip(update_info.names[sl], unpack(buffers, dtypes, shapes), strict=True)))
            start += size

    def shutdown(self) -> None:
        self.group = None


@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    """Learner side: the group's address and size (learner rank 0 + every inference rank)."""

    backend: ClassVar[str] = BACKEND
    master_address: str
    master_port: int
    world_size: int


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """Learner side: every learner rank iterates the source (ZeRO-3 gathers are collectives);
    rank 0 broadcasts each gathered group while the workers receive it."""

    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client: VLLMWeightSyncClient, source: WeightSource, is_sender: bool) -> None:
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.group: dist.ProcessGroupGloo | None = None

    @classmethod
    def trainer_init(
        cls, init_info: GlooTrainerInitInfo, *, client: VLLMWeightSyncClient, source: WeightSource | None = None
    ) -> GlooTrainerWeightTransferEngine:
        if source is None:
            raise ValueError("the gloo weight transfer needs a WeightSource")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender)
        if engine.is_sender:
            worker_info = GlooInitInfo(init_info.master_address, init_info.master_port, 1, init_info.world_size)
            with ThreadPoolExecutor(max_workers=1) as pool:
                pending = pool.submit(client.init_weight_transfer_engine, asdict(worker_info))
                engine.group = open_group(init_info.master_address, init_info.master_port, 0, init_info.world_size)
                pending.result()
        return engine

    def send_weights(self) -> None:
        assert self.source is not None
        groups = self.source.groups()
        if not self.is_sender:
            for _ in self.source.iter_groups():
                pass
            return
        meta = {m.name: m for m in self.source.metadata()}
        ordered = [meta[name] for group in groups for name in group]
        info = GlooUpdateInfo(
            names=[m.name for m in ordered],
            dtype_names=[str(m.dtype).removeprefix("torch.") for m in ordered],
            shapes=[list(m.shape) for m in ordered],
            group_sizes=[len(g) for g in groups],
        )
        self.client.start_weight_update()
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(self.client.update_weights, asdict(info))
            for _names, tensors in self._checked_groups(groups):
                broadcast(self.group, pack(tensors))
            pending.result()
        self.client.finish_weight_update()

    def _checked_groups(self, groups: list[list[str]]) -> Iterator[tuple[list[str], list[torch.Tensor]]]:
        for expected, (names, tensors) in zip(groups, self.source.iter_groups(), strict=True):
            if names != expected:
                raise RuntimeError(f"weight source yielded {names[:2]}... where {expected[:2]}... was announced")
            yield names, tensors

    def shutdown(self) -> None:
        self.group = None


def trainer_init_info(
    backend: str, rank: int, address: str, port: int, world_size: int, largest_bytes: int
) -> TrainerInitInfo:
    """The learner side's init info for `backend`. IPC is packed: each layer is copied into one reused buffer
    (at least 1 GiB, and as large as the largest parameter) that the engines read, instead of every gathered
    tensor being kept alive, a full model copy per rank, until the engines have loaded them all."""
    if backend == "ipc":  # colocated on the same GPUs: CUDA IPC handles, no rendezvous
        from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo
        from vllm.distributed.weight_transfer.packed_tensor import DEFAULT_PACKED_BUFFER_SIZE_BYTES

        size = max(DEFAULT_PACKED_BUFFER_SIZE_BYTES, largest_bytes)
        return IPCTrainerInitInfo(rank=rank, packed=True, packed_buffer_size_bytes=size)
    if backend == "nccl":
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        return NCCLTrainerInitInfo(address, port, world_size, rank=rank)
    return GlooTrainerInitInfo(address, port, world_size, rank=rank)


NCCL_SEND_TIMEOUT_S = 600.0
"""How long one NCCL weight sync may take before its group is aborted (a layer's broadcast takes seconds)."""


def send_within(transfer: TrainerWeightTransferEngine, timeout_s: float) -> None:
    """`transfer.send_weights()`, aborting the transfer group if it has not finished in `timeout_s`.

    NCCL has no timeout of its own: a broadcast to a stuck or dead engine would wait forever. vLLM's `shutdown`
    aborts the communicator (ncclCommAbort), which ends the waiting broadcast; the send's thread is then waited for
    (the source joins, on its way out, the gathers the other learner ranks wait in: `finish_after_failure`) and
    `WeightSendTimeout` tells the driver to replace the rollout group and form the transfer group again.
    """
    from opd.learner.group import WeightSendTimeout

    pool = ThreadPoolExecutor(max_workers=1)
    sending = pool.submit(send_and_finish, transfer)
    try:
        sending.result(timeout=timeout_s)
    except TimeoutError:
        transfer.shutdown()
        wait([sending], timeout=timeout_s)  # the aborted broadcast raises; the source then finishes its gathers
        raise WeightSendTimeout(f"weight sync took over {timeout_s:.0f}s: its transfer group was aborted") from None
    finally:
        pool.shutdown(wait=False)


def send_and_finish(transfer: TrainerWeightTransferEngine) -> None:
    """`transfer.send_weights()`; if it stops part-way, or before its first gather (a worker's RPC failed), the
    source (`opd.learner.weights.ZeroWeightSource`) still joins the gathers it did not reach."""
    source = transfer.source
    if hasattr(source, "start_send"):
        source.start_send()
    try:
        transfer.send_weights()
    except BaseException:
        if hasattr(source, "finish_after_failure"):
            source.finish_after_failure()
        raise


def register() -> None:
    """Add the gloo engines to vLLM's registries (idempotent: each process imports this once)."""
    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND, GlooWeightTransferEngine)
    if BACKEND not in WeightTransferTrainerFactory._registry:
        WeightTransferTrainerFactory.register_engine(BACKEND, GlooTrainerWeightTransferEngine)


register()


class QuietReload(logging.Filter):
    """Drops vLLM's per-update "<layer>: Failed to load weights" for the layers that never get any.

    The learner sends every parameter its model has, so a layer left without weights is one no checkpoint holds:
    the rotary cos/sin cache (computed) or a tied LM head (its weight is the embedding's, re-packed in
    `finish_weight_update` on CPU). vLLM warns about them on every update, i.e. every round; whether the rollout
    engines really hold the learner's weights is checked each round by `learner/sampler_learner_logprob_gap`.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        layer = record.args[0] if isinstance(record.args, tuple) and record.args else ""
        benign = isinstance(layer, str) and (layer.endswith("RotaryEmbedding") or layer == "ParallelLMHead")
        return not (record.msg == "%s: Failed to load weights" and benign)


RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"
logging.getLogger(RELOAD_LOGGER).addFilter(QuietReload())


class WorkerExtension:
    """Named as vLLM's `worker_extension_cls` so that vLLM imports this module inside its
    worker process (the one that owns the model), which registers the gloo engine and the
    `QuietReload` filter there."""


class RolloutGroupClient:
    """`VLLMWeightSyncClient` over several rollout-worker actors: each call fans out to all.

    Each engine joins the transfer group at its own ranks, so the init payload's
    `rank_offset` is shifted per engine (vLLM's single-engine Ray client cannot do this).
    """

    def __init__(self, handles: list, ranks_per_engine: int) -> None:
        self.handles = handles
        self.ranks_per_engine = ranks_per_engine
        self.version: int | None = None
        """The learner step of the weights being sent (set by the learner before each send): it lands on every
        worker with the weights, in `finish_weight_update`, so samples are never tagged with a stale version."""

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        """Each engine's ranks follow the previous engine's; IPC's handshake has no ranks (only `packed`)."""
        import ray

        base = init_info.get("rank_offset")
        ray.get(
            [
                h.init_weight_transfer_engine.remote(
                    init_info if base is None else dict(init_info, rank_offset=base + i * self.ranks_per_engine)
                )
                for i, h in enumerate(self.handles)
            ]
        )

    def start_weight_update(self) -> None:
        import ray

        ray.get([h.start_weight_update.remote() for h in self.handles])

    def update_weights(self, update_info: dict[str, Any]) -> None:
        import ray

        ray.get([h.update_weights.remote(update_info) for h in self.handles])

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        import ray

        if weight_version is None and self.version is not None:
            weight_version = str(self.version)
        ray.get([h.finish_weight_update.remote(weight_version) for h in self.handles])
