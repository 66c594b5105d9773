"""vLLM engine construction and the two things opd asks of one: sample, and score.

Shared by rollout workers (the student) and vLLM-backed teachers, so both see the
same engine settings and the same log-prob conventions. Both ask for token ids only (`detokenize=False`):
decoding every sampled and top-k token to text was 15% of a tiny model's generation time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from opd import devices


@dataclass
class Scored:
    """Teacher signal for one sequence's response tokens (length R each).

    `topk_ids`/`topk_logprobs` are [R, K]; log-probs are float32 and normalised over the
    full vocabulary, so the mass outside the top-k is `1 - exp(topk).sum()`.
    """

    logprobs: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray

    def compact(self) -> Scored:
        """The form that travels from teacher actors: top-k ids as int32, top-k log-probs as float16.

        Halves the bytes per token of the top-k (the bulk of the signal); float16 keeps log-probs above -8 to
        within 0.004 nats and -inf exact. The sampled-token log-probs stay float32: the reverse-KL advantage
        is a difference of two of them.
        """
        return Scored(
            np.asarray(self.logprobs, np.float32),
            np.asarray(self.topk_ids, np.int32),
            np.asarray(self.topk_logprobs, np.float16),
        )


def _unbatch(lengths: np.ndarray, *flat: np.ndarray) -> ScoredBatch:
    ends = np.cumsum(lengths)
    parts = [np.split(f, ends[:-1]) for f in flat]
    return ScoredBatch(Scored(*fields) for fields in zip(*parts, strict=True))


class ScoredBatch(list):
    """Teacher signal for many sequences, crossing Ray as three flat arrays and their lengths instead of three
    small arrays per sequence (as `opd.buffer.sample.Samples` does for samples)."""

    def __reduce__(self):
        if not self:
            return ScoredBatch, ()
        lengths = np.asarray([len(s.logprobs) for s in self], np.int64)
        fields = ("logprobs", "topk_ids", "topk_logprobs")
        return _unbatch, (lengths, *(np.concatenate([getattr(s, f) for s in self]) for f in fields))


def stop_token_ids(model: str) -> list[int]:
    """The ids that end a model's turn: its generation config's `eos_token_id` (one id or a list: Qwen's chat
    models end a turn with <|im_end|> and a text with <|endoftext|>) and its tokenizer's eos.

    vLLM 0.32 stops at the same ids on its own (its input processor adds both to every request's stop ids, with
    either `generation_config` setting); opd passes them explicitly to both backends, so a response ends where the
    model declares a turn ends whichever backend wrote it. Without a generation_config.json, config.json's
    `eos_token_id` counts, as in transformers and vLLM.
    """
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    try:
        declared = GenerationConfig.from_pretrained(model).eos_token_id
    except OSError:  # no generation_config.json
        declared = GenerationConfig.from_model_config(AutoConfig.from_pretrained(model)).eos_token_id
    ids = {declared} if isinstance(declared, int) else set(declared or ())
    eos = AutoTokenizer.from_pretrained(model).eos_token_id
    return sorted(ids if eos is None else ids | {eos})


GPU_MEMORY_SHARE = 0.9
"""`gpu_memory_utilization` by default on GPU, per whole GPU an engine's actor reserves: the rest is headroom for
CUDA's context, NCCL and PyTorch's allocator outside vLLM's accounting."""
CPU_MEMORY_UTILIZATION = 0.1


def device_settings(engine, gpus: float) -> dict:
    """`enforce_eager` and `gpu_memory_utilization` as `engine` (an `EngineConfig`) sets them or, where it leaves
    them None, as fits the `gpus` the engine's actor reserved: CUDA graphs and 0.9 of its share of the GPU on a
    GPU; eager and 0.1 on CPU. The CPU-friendly values once were the schema's defaults, which left GPU runs eager
    on a tenth of the memory unless the config said otherwise."""
    on_gpu = gpus > 0
    share = GPU_MEMORY_SHARE * min(gpus, 1.0) if on_gpu else CPU_MEMORY_UTILIZATION
    return {
        "enforce_eager": not on_gpu if engine.enforce_eager is None else engine.enforce_eager,
        "gpu_memory_utilization": share if engine.gpu_memory_utilization is None else engine.gpu_memory_utilization,
    }


def eager_start_up() -> None:
    """Start an eager CPU engine without two costs of vLLM's start-up that buy nothing there (3.3 s of a tiny
    engine's 13 s on one core, measured in tests/README.md):

    - vLLM compiles one helper of its sampler with inductor (`batched_count_greater_than`, the sampled token's rank
      among the log-probs) at the first call that asks for log-probs: 2.2 s. Eager, it counts the same.
      TORCH_COMPILE_DISABLE reaches an engine core in its own process (`cpu_in_process=false`).
    - It collects garbage five times while it starts, each walking every object the imports made: 1.1 s.
      Frozen, those are skipped; they live as long as the process anyway.
    """
    import gc

    import torch._dynamo

    os.environ["TORCH_COMPILE_DISABLE"] = "1"
    torch._dynamo.config.disable = True
    gc.freeze()


def make_llm(model: str, engine, seed: int, **extra):
    """Build a vLLM `LLM` from an `EngineConfig`; CPU settings are applied only without CUDA.

    `generation_config="vllm"`: vLLM's neutral sampling defaults, not the checkpoint's (e.g. top_k 20, top_p 0.95),
    whose truncated distribution would no longer be the one the log-probs describe. vLLM applies a checkpoint's
    defaults only to calls without `SamplingParams`, which opd never makes; this keeps it so. The checkpoint's
    end-of-turn ids still apply (`stop_token_ids`).
    """
    import torch
    from vllm import LLM

    if engine.tensor_parallel_size > 1:
        # Inside a Ray placement group vLLM would pick its Ray executor, which refuses a multi-GPU bundle;
        # its multiprocessing executor shards over the GPUs this actor holds.
        extra.setdefault("distributed_executor_backend", "mp")
    if engine.kv_cache_memory_bytes is not None:
        extra.setdefault("kv_cache_memory_bytes", engine.kv_cache_memory_bytes)
    settings = device_settings(engine, devices.reserved_gpus())
    if not torch.cuda.is_available():
        # vLLM 0.32's CPU runner crashes ("CPU Generator does not use offset") when a step ends partway through a
        # seeded request's prompt and discards its sampled token: every opd sampling call is seeded, and 256
        # chat prompts of 60 tokens overflow a step's 4,096 tokens. Whole prompts only, then.
        extra.setdefault("enable_chunked_prefill", False)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(engine.cpu_kv_cache_gib))
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = engine.cpu_threads_bind
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if engine.cpu_in_process else "1"
        if settings["enforce_eager"]:
            eager_start_up()
    with devices.one_start_per_gpu(devices.assigned_gpus()):  # engines sharing a GPU start one at a time
        return LLM(
            model=model,
            dtype=engine.dtype,
            max_model_len=engine.max_model_len,
            tensor_parallel_size=engine.tensor_parallel_size,
            seed=seed,
            generation_config="vllm",
            **settings,
            **extra,
        )


def request_seeds(seed: int | None, count: int) -> list[int | None]:
    """One seed per prompt of a seeded call, drawn from `seed`.

    vLLM seeds a request's k-th sample with seed + k, so prompts sent with one seed draw the same random numbers
    (identical responses wherever their distributions agree, a round's samples correlated across prompts) and
    calls seeded s and s + 1 share all but one stream. Seeds spread by `np.random.SeedSequence` keep every
    prompt's samples independent and a call with the same `seed` reproducible.
    """
    if seed is None:
        return [None] * count
    return [int(x) for x in np.random.SeedSequence(seed).generate_state(count) % 2**31]


def sample(
    llm,
    prompts: list[list[int]],
    n: int,
    max_tokens: int,
    temperature: float,
    seed: int | None,
    stop_ids: list[int],
    top_p: float = 1.0,
):
    """Sample `n` continuations per prompt. Returns, per prompt, n (token ids, log-probs) pairs.

    Log-probs are those of the distribution actually sampled from (temperature applied, nothing truncated: top_k 0,
    top_p 1; the engine runs with `logprobs_mode=processed_logprobs`); greedy when temperature is 0. Only
    evaluation's pass@k samples truncate (`eval.top_p`), and nothing trains on their log-probs. A response
    ends with the first of `stop_ids` (`stop_token_ids(model)`), which it keeps.
    """
    from vllm import SamplingParams

    params = [
        SamplingParams(
            n=n,
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=0,
            top_p=top_p,
            stop_token_ids=list(stop_ids),
            logprobs=0,
            seed=s,
            detokenize=False,
            flat_logprobs=True,
        )
        for s in request_seeds(seed, len(prompts))
    ]
    outputs = llm.generate([{"prompt_token_ids": [int(t) for t in p]} for p in prompts], params, use_tqdm=False)
    result = []
    for out in outputs:
        pairs = []
        for c in out.outputs:
            ids = np.asarray(c.token_ids, dtype=np.int64)
            at = positions(c.logprobs, 0, len(ids), 1)  # one entry a token: the sampled one
            pairs.append((ids, np.asarray(c.logprobs.logprobs, dtype=np.float32)[at]))
        result.append(pairs)
    return result


def score(llm, prompts: list[list[int]], responses: list[list[int]], top_k: int) -> list[Scored]:
    """Teacher-force prompt+response and read each response token's log-prob and the top-k.

    Uses vLLM's `prompt_logprobs`: entry i is log p(token_i | tokens_<i) plus the top-k
    alternatives, computed from raw logits (temperature 1).
    """
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=top_k, temperature=1.0, detokenize=False, flat_logprobs=True)
    seqs = [{"prompt_token_ids": [int(t) for t in (*p, *r)]} for p, r in zip(prompts, responses, strict=True)]
    outputs = llm.generate(seqs, params, use_tqdm=False)
    scored = []
    for p, r, out in zip(prompts, responses, outputs, strict=True):
        flat = out.prompt_logprobs  # per position: the token itself, then the top-k by rank
        at = positions(flat, len(p), len(r), 1 + top_k)
        lps, ids = np.asarray(flat.logprobs, dtype=np.float32), np.asarray(flat.token_ids, dtype=np.int64)
        if not np.array_equal(ids[at], np.asarray(r, dtype=np.int64)):
            raise RuntimeError("vLLM's prompt log-probs are not for the response tokens that were sent")
        top = at[:, None] + 1 + np.arange(top_k)
        scored.append(Scored(lps[at], ids[top], lps[top]))
    return scored


def positions(flat, start: int, count: int, width: int) -> np.ndarray:
    """Where positions start..start+count begin in vLLM's `FlatLogprobs` lists, each `width` entries long.

    Flat log-probs are a few lists per sequence instead of a dict of objects per token (vLLM builds those in
    Python, a third of a small teacher's scoring time).
    """
    at = np.asarray(flat.start_indices[start : start + count], dtype=np.int64)
    ends = np.asarray(flat.end_indices[start : start + count], dtype=np.int64)
    if len(at) != count or not (ends - at == width).all():
        raise RuntimeError(f"vLLM returned log-probs for {len(at)} positions, not {count} of {width} entries each")
    return at
