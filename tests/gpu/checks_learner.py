"""The checks that need neither vLLM engines nor Ray: a ZeRO-3 learner shard driven in this process, the
transformers teacher's scoring, and the gloo weight transfer's round trip; with the `Size`, checkpoints and
`Context` every check module shares (tests/gpu/check.py runs them)."""

from __future__ import annotations

import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Size:
    """The model and batch one check run uses: real-vocabulary sizes on a GPU, tiny ones on 2 CPU cores."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    prompt_len: int
    response_len: int
    samples: int
    micro_batch: int
    chunk_tokens: int
    top_k: int


GPU_SIZE = Size(151_936, 896, 4864, 4, 14, 2, 64, 1024, 8, 4, 256, 16)
CPU_SIZE = Size(2048, 64, 128, 2, 2, 1, 8, 48, 8, 4, 16, 8)
BF16_TOL = (1e-2, 0.25)
"""(mean, max) |log-prob gap| allowed in bf16: tests/gpu/test_hf_teacher_cuda.py's batched-vs-alone bound."""
FP32_TOL = (1e-5, 1e-4)


@dataclass
class Context:
    """What the checks of one run share: the device, the model size, the checkpoints, and what earlier checks built
    (each is None until the check that builds it passes; a check needing it SKIPs otherwise)."""

    device: str
    size: Size
    checkpoint: Path
    """The learner's checkpoint."""
    other: Path | None = None
    """A second checkpoint of the same architecture, other weights: the engines start from it, so a weight sync
    that lands shows as log-probs moving from its reference to the learner's (`hf_reference`)."""
    references: dict[str, Any] | None = None
    shard: Any = None
    engine: Any = None
    """The in-process colocated `RolloutWorker` (`vllm_engine`)."""


def install_weight_source_stand_in() -> None:
    """Without vLLM, give `vllm.distributed.weight_transfer` the two names opd.learner imports from it.

    The stand-in's `groups()` is one parameter per group (vLLM's groups whole decoder layers): a valid partition,
    so metadata, iteration and ZeRO-3 gathers run as they do under vLLM, one parameter at a time.
    """
    import types
    from abc import ABC, abstractmethod

    @dataclass
    class ParamMeta:
        name: str
        dtype: object
        shape: tuple[int, ...]

    class WeightSource(ABC):
        @abstractmethod
        def metadata(self) -> list[ParamMeta]: ...

        def groups(self) -> list[list[str]]:
            return [[m.name] for m in self.metadata()]

    module = types.ModuleType("vllm.distributed.weight_transfer")
    module.ParamMeta, module.WeightSource = ParamMeta, WeightSource
    for name in ("vllm", "vllm.distributed"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["vllm.distributed.weight_transfer"] = module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_mb(device: str) -> float:
    """Peak memory since the last reset: CUDA allocations on a GPU, the process's peak RSS on CPU."""
    import resource

    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def build_checkpoint(size: Size, path: Path, seed: int = 0) -> Path:
    """A randomly initialised Qwen2 model of `size`, saved with a tiny tokenizer (only its pad id is read)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from opd.tiny import save_checkpoint, train_tokenizer

    tok = train_tokenizer(["0123456789+= abcdefghij"], 300)
    config = Qwen2Config(
        vocab_size=size.vocab,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        head_dim=size.hidden // size.heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # peaked next-token distributions, so top-k is not a coin toss among near-ties
        model.model.embed_tokens.weight.mul_(4.0)
    return save_checkpoint(model, tok, path)


def samples(size: Size, seed: int = 0) -> list:
    """Student samples with a teacher's top-k, as the buffer hands them to the learner."""
    import numpy as np

    from opd.buffer.sample import Sample

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(size.samples):
        n = size.response_len
        s = Sample(
            rng.integers(3, size.vocab, size.prompt_len),
            rng.integers(3, size.vocab, n),
            rng.uniform(-12, -0.1, n).astype(np.float32),
            0,
        )
        s.teacher_logprobs = rng.uniform(-12, -0.1, n).astype(np.float32)
        s.teacher_topk_ids = np.stack([rng.choice(size.vocab, size.top_k, replace=False) for _ in range(n)])
        s.teacher_topk_logprobs = np.log(rng.dirichlet(np.ones(size.top_k + 1), n)[:, : size.top_k]).astype(np.float32)
        out.append(s)
    return out


def chunked_objective_landed() -> bool:
    from opd.config.training import LearnerConfig

    return hasattr(LearnerConfig, "loss_chunk_tokens")


def learner_overrides(size: Size, shards: int, gpus: float) -> dict[str, Any]:
    """The learner and loss settings of every learner check: ZeRO-3, bf16 on a GPU, the chunked objective."""
    chunk = {"loss_chunk_tokens": size.chunk_tokens} if chunked_objective_landed() else {}
    learner = {"num_shards": shards, "gpus_per_shard": gpus, "zero_stage": 3, "lr": 1e-4, "bf16": True}
    loss = {"type": "jsd", "beta": 1.0, "top_k": size.top_k}
    return {"learner": learner | {"micro_batch_size": size.micro_batch} | chunk, "loss": loss}


def check_learner_setup(ctx: Context) -> tuple[bool, str]:
    """One ZeRO-3 learner rank, set up in this process on its own nccl/gloo group."""
    from opd.config import LossConfig
    from opd.config.training import LearnerConfig
    from opd.learner.shard import LearnerShard

    settings = learner_overrides(ctx.size, 1, float(ctx.device == "cuda"))
    learner, loss = LearnerConfig(**settings["learner"]), LossConfig(**settings["loss"])
    t0 = time.perf_counter()
    shard = LearnerShard(0, 1, str(ctx.checkpoint), learner, loss, 1.0, 0.0, 3)
    shard.setup("127.0.0.1", free_port(), ctx.size.samples, 2)
    ctx.shard = shard
    dtype = next(p.dtype for p in shard.engine.module.parameters())
    return True, f"ZeRO-3 shard in {str(dtype).removeprefix('torch.')}, set up in {time.perf_counter() - t0:.1f} s"


def check_learner_step(ctx: Context) -> tuple[bool, str]:
    import math

    import torch

    shard, size, device = ctx.shard, ctx.size, ctx.device

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    first = {n: t.float().cpu().clone() for n, t in shard.weight_source() if n.endswith("layers.0.mlp.up_proj.weight")}
    stats = [shard.train_step(samples(size, seed)) for seed in (1, 2)]
    peak = peak_mb(device)
    after = {n: t.float().cpu() for n, t in shard.weight_source() if n in first}
    moved = all(not torch.equal(first[n], after[n]) for n in first) and bool(first)
    finite = all(math.isfinite(s["loss"]) and math.isfinite(s["grad_norm"]) for s in stats)
    objective = f"chunked objective ({size.chunk_tokens} tokens)" if chunked_objective_landed() else "full logits"
    dtype = next(p.dtype for p in shard.engine.module.parameters())
    peak_name = "torch.cuda.max_memory_allocated" if device == "cuda" else "peak RSS"
    tokens = f"{size.samples}x{size.prompt_len + size.response_len} tokens, vocab {size.vocab}"
    figures = (
        f"ZeRO-3 {str(dtype).removeprefix('torch.')} {torch.distributed.get_backend()}, {objective}, {tokens}: "
        f"loss {stats[0]['loss']:.4f} -> {stats[1]['loss']:.4f}, grad_norm {stats[1]['grad_norm']:.3g}, "
        f"step {stats[1]['learner_step_s']:.2f} s, {peak_name} {peak:.0f} MB, weights moved: {moved}"
    )
    return finite and moved and (device == "cpu" or dtype == torch.bfloat16), figures


def check_hf_teacher(ctx: Context) -> tuple[bool, str]:
    """Batched `hf.score` against one plain forward pass per sequence, at temperature 0.8."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from opd.teachers import hf

    checkpoint, size, device = ctx.checkpoint, ctx.size, ctx.device

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).to(device).eval()
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, size.vocab, int(rng.integers(4, size.prompt_len + 1))).tolist() for _ in range(6)]
    responses = [rng.integers(3, size.vocab, int(rng.integers(8, size.response_len + 1))).tolist() for _ in range(6)]
    temperature, k = 0.8, size.top_k
    scored = hf.score(model, prompts, responses, k, temperature)
    own_gaps, top_gaps, overlap = [], [], []
    for p, r, s in zip(prompts, responses, scored, strict=True):
        ids = torch.tensor([p + r], device=device)
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float() / temperature, -1)
        logprobs = logprobs[len(p) - 1 :].cpu()
        own = logprobs.gather(-1, torch.tensor(r)[:, None])[:, 0].numpy()
        top = logprobs.topk(k, dim=-1)
        # Ties at bf16 may reorder ids; the plain pass must give hf's top ids hf's values, and the same k-th value.
        at_hf_ids = logprobs.gather(-1, torch.from_numpy(s.topk_ids).long()).numpy()
        own_gaps.append(np.abs(own - s.logprobs))
        top_gaps += [np.abs(at_hf_ids - s.topk_logprobs), np.abs(top.values.numpy() - s.topk_logprobs)]
        overlap.append(
            np.mean([len(set(a) & set(b)) / k for a, b in zip(top.indices.numpy(), s.topk_ids, strict=True)])
        )
    own_gap, top_gap = np.concatenate(own_gaps), np.concatenate([g.ravel() for g in top_gaps])
    mean_tol, max_tol = BF16_TOL if dtype == torch.bfloat16 else FP32_TOL
    ok = all(g.mean() < mean_tol and g.max() < max_tol for g in (own_gap, top_gap))
    figures = (
        f"{str(dtype).removeprefix('torch.')} T={temperature} top-{k}, {own_gap.size} tokens: sampled-token |gap| "
        f"mean {own_gap.mean():.1e} max {own_gap.max():.1e}; top-k |gap| mean {top_gap.mean():.1e} "
        f"max {top_gap.max():.1e} (tol mean {mean_tol:g} max {max_tol:g}); top-k id overlap {np.mean(overlap):.3f}"
    )
    return ok, figures


def check_weight_metadata(ctx: Context) -> tuple[bool, str]:
    import math

    source = ctx.shard.weight_source()
    announced = [(m.name, tuple(m.shape), m.dtype) for m in source.metadata()]
    yielded = [(n, tuple(t.shape), t.dtype) for n, t in source]  # shapes read inside each ZeRO-3 gather
    bad = [(a, y) for a, y in zip(announced, yielded, strict=False) if a != y]
    ok = announced == yielded and bool(announced)
    numel = sum(math.prod(s) for _, s, _ in yielded)
    dtypes = sorted({str(d).removeprefix("torch.") for _, _, d in yielded})
    figures = (
        f"{len(announced)} announced, {len(yielded)} yielded, {numel / 1e6:.1f}M elements, dtypes {dtypes}, "
        f"{len(source.groups())} gather groups"
    )
    return ok, figures + (f"; first mismatch {bad[0]}" if bad else "")


class Recorder:
    """The model side of a worker engine: keeps what `load_weights` receives."""

    def __init__(self) -> None:
        self.loaded: dict = {}

    def load_weights(self, weights) -> None:
        self.loaded |= {n: t.clone() for n, t in weights}


class InProcessClient:
    """A `VLLMWeightSyncClient` whose one "engine" is a `GlooWeightTransferEngine` in this process (rank 1)."""

    def __init__(self, worker) -> None:
        self.worker = worker

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        from opd.rollout.weight_sync import GlooInitInfo

        self.worker.init_transfer_engine(GlooInitInfo(**init_info))

    def start_weight_update(self) -> None: ...

    def update_weights(self, update_info: dict) -> None:
        self.worker.update_weights(update_info)

    def finish_weight_update(self, weight_version: str | None = None) -> None: ...


def check_weight_sync(ctx: Context) -> tuple[bool, str]:
    """The trainer engine's `send_weights` into the worker engine's receive path, over a 2-rank gloo group."""
    from types import SimpleNamespace

    import torch

    from opd.rollout import weight_sync

    worker = weight_sync.GlooWeightTransferEngine.__new__(weight_sync.GlooWeightTransferEngine)
    worker.group, worker.device, worker.model = None, torch.device(ctx.device), Recorder()
    worker.parallel_config = SimpleNamespace(rank=0)
    source = ctx.shard.weight_source()
    info = weight_sync.trainer_init_info("gloo", 0, "127.0.0.1", free_port(), 2, 0)
    t0 = time.perf_counter()
    trainer = weight_sync.WeightTransferTrainerFactory.trainer_init(info, client=InProcessClient(worker), source=source)
    trainer.send_weights()
    seconds = time.perf_counter() - t0
    sent = {n: t.detach().cpu().clone() for n, t in source}
    got = {n: t.cpu() for n, t in worker.model.loaded.items()}
    equal = [n for n in sent if n in got and got[n].dtype == sent[n].dtype and torch.equal(got[n], sent[n])]
    ok = len(equal) == len(sent) == len(got)
    nbytes = sum(t.numel() * t.element_size() for t in sent.values())
    figures = (
        f"{len(equal)}/{len(sent)} tensors bit-equal after the round trip, {nbytes / 2**20:.1f} MiB in {seconds:.2f} s"
    )
    return ok, figures
