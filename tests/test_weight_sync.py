"""The gloo weight-transfer engine's wire format, and a real learner->engine transfer between processes."""

import multiprocessing as mp
import socket

import pytest
import torch

from opd.rollout.weight_sync import RELOAD_LOGGER, GlooUpdateInfo, broadcast, buffer_sizes, open_group, pack, unpack


def test_pack_unpack_round_trips_mixed_dtypes_in_order():
    tensors = [torch.randn(2, 3), torch.arange(4, dtype=torch.int64), torch.randn(5), torch.randn(1, 1, 2)]
    buffers = pack(tensors)
    assert set(buffers) == {"float32", "int64"} and buffers["float32"].numel() == 13
    dtypes = [str(t.dtype).removeprefix("torch.") for t in tensors]
    shapes = [list(t.shape) for t in tensors]
    assert buffer_sizes(dtypes, shapes) == {"float32": 13, "int64": 4}
    for got, want in zip(unpack(buffers, dtypes, shapes), tensors, strict=True):
        assert torch.equal(got, want)


def test_update_info_rejects_inconsistent_lengths():
    with pytest.raises(ValueError, match="disagree"):
        GlooUpdateInfo(names=["a", "b"], dtype_names=["float32"] * 2, shapes=[[1], [1]], group_sizes=[1])


def _receiver(port: int, shapes, queue) -> None:
    group = open_group("127.0.0.1", port, 1, 2)
    bufs = {name: torch.empty(n) for name, n in buffer_sizes(["float32"] * len(shapes), shapes).items()}
    broadcast(group, bufs)
    queue.put([t.tolist() for t in unpack(bufs, ["float32"] * len(shapes), shapes)])


def test_broadcast_reaches_another_process():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tensors = [torch.randn(3, 4), torch.randn(7)]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_receiver, args=(port, [list(t.shape) for t in tensors], queue))
    proc.start()
    broadcast(open_group("127.0.0.1", port, 0, 2), pack(tensors))
    received = queue.get(timeout=60)
    proc.join(timeout=60)
    for got, want in zip(received, tensors, strict=True):
        assert torch.equal(torch.tensor(got), want)


def test_reload_warnings_for_layers_no_checkpoint_holds_are_dropped_and_others_kept():
    """vLLM warns on every weight update about the rotary cache and a tied LM head; a real miss still shows."""
    import logging

    logger = logging.getLogger(RELOAD_LOGGER)
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        for layer in ("RotaryEmbedding", "Llama3RotaryEmbedding", "ParallelLMHead", "QKVParallelLinear"):
            logger.warning("%s: Failed to load weights", layer)
        logger.warning("%s: Delayed processing", "RotaryEmbedding")
    finally:
        logger.removeHandler(handler)
    assert seen == ["QKVParallelLinear: Failed to load weights", "RotaryEmbedding: Delayed processing"]
