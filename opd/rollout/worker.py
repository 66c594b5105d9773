"""Rollout worker: a Ray actor owning one vLLM engine loaded with the student."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from opd.buffer.sample import Sample, Samples
from opd.plan import Placed
from opd.rollout import engine as vllm_engine


class RolloutWorker(Placed):
    """Samples responses with the current student and receives new weights from the learner.

    `version` is the learner step whose weights the engine holds; every sample carries
    it, so the buffer and the metrics can prove which policy produced what.
    """

    def __init__(self, model: str, engine_cfg, weight_backend: str, seed: int, colocate: bool = False) -> None:
        sleep = {"enable_sleep_mode": True} if colocate else {}  # GPU only: frees memory for a colocated learner
        if weight_backend == "ipc":
            # CUDA IPC handles are tuples that vLLM's msgpack refuses to carry to its engine-core process
            # without this (the process inherits it from here); the engine only reads handles from the learner.
            os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        self.llm = vllm_engine.make_llm(
            model,
            engine_cfg,
            seed,
            logprobs_mode="processed_logprobs",
            worker_extension_cls="opd.rollout.weight_sync.WorkerExtension",
            weight_transfer_config={"backend": weight_backend},
            **sleep,
        )
        self.stop_ids = vllm_engine.stop_token_ids(model)
        self.version = 0
        self.asleep: set[str] = set()
        """The engine's memory still released by `sleep` (vLLM's tags: weights, kv_cache)."""

    def ready(self) -> int:
        return self.version

    def generate(
        self,
        prompt_ids: list[list[int]],
        meta: list[dict[str, Any]],
        n: int,
        max_tokens: int,
        temperature: float,
        seed: int | None,
        top_p: float = 1.0,
    ) -> tuple[list[Sample], float]:
        """n samples per prompt (`meta[i]`, e.g. the prompt index, rides along with prompt i), and the seconds
        the engine was busy (the pipeline's stage timing)."""
        self.check_awake()
        t0 = time.perf_counter()
        outs = vllm_engine.sample(self.llm, prompt_ids, n, max_tokens, temperature, seed, self.stop_ids, top_p)
        samples = []
        for p, m, pairs in zip(prompt_ids, meta, outs, strict=True):
            for ids, lps in pairs:
                samples.append(Sample(np.asarray(p, np.int64), ids, lps, self.version, **m))
        return Samples(samples), time.perf_counter() - t0

    def score(self, prompt_ids: list[list[int]], response_ids: list[list[int]], top_k: int):
        """The student's own per-token log-probs (used to check weight sync end to end)."""
        self.check_awake()
        return vllm_engine.score(self.llm, prompt_ids, response_ids, top_k)

    # The four calls vLLM's weight-transfer engines drive (VLLMWeightSyncClient protocol).
    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def start_weight_update(self) -> None:
        self.wake("weights")  # a sync straight after `sleep` still lands in mapped memory
        self.llm.start_weight_update()

    def update_weights(self, update_info: dict) -> None:
        self.llm.update_weights({"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.llm.finish_weight_update(weight_version)
        self.wake("kv_cache")  # after the sync: its buffers had the KV cache's room meanwhile
        self.llm.reset_prefix_cache()  # cached KV was computed with the old weights
        if weight_version is not None:
            self.version = int(weight_version)

    def sleep(self) -> None:
        """Free the engine's GPU memory while a colocated learner steps: level 2 discards the weights and the KV
        cache. The weight sync after the step overwrites every weight, so level 1's copy of them to host memory
        and back each round would be wasted (vLLM keeps the model's buffers, e.g. rotary tables, itself)."""
        self.llm.sleep(level=2)
        self.asleep = {"weights", "kv_cache"}

    def wake_up(self) -> None:
        """Map the weights' memory back for the weight sync that follows; the KV cache wakes once the weights
        have landed (`finish_weight_update`), so the sync's buffers never compete with it for the GPU."""
        self.wake("weights")

    def wake(self, tag: str) -> None:
        if tag in self.asleep:
            self.llm.wake_up(tags=[tag])
            self.asleep.discard(tag)

    def check_awake(self) -> None:
        """Refuse to sample from discarded weights: after `sleep`, only a weight sync makes the engine usable."""
        if self.asleep:
            raise RuntimeError(
                f"the rollout engine's {' and '.join(sorted(self.asleep))} memory is still released by sleep(): "
                "a weight sync must follow wake_up() before it generates"
            )
