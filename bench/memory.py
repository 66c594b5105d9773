"""The learner's peak memory for one optimizer step on long responses, today's path against the long-response one.

    python bench/memory.py                          # response lengths 1024 4096 8192, 4 layers
    python bench/memory.py lengths=1024,2048 layers=30 chunk=1024

A SmolLM2-135M-shaped student (Llama: hidden 576, 9 heads, 3 KV heads, intermediate 1536, vocabulary 49,152,
tied embeddings; `layers` decoder layers, 4 by default as the pruned student, random weights from the config)
trains one step on one sequence (64 prompt + N response tokens, random teacher top-16) with the demo's objective
(`loss.type=jsd`, beta 1, the real opd.learner objective code) and a real AdamW step, float32 on the CPU. No
DeepSpeed or Ray: a plain torch loop that computes the loss as LearnerShard.micro_batch_loss does.

    off: full float32 logits, then the objective (learner.loss_chunk_tokens=0, gradient_checkpointing=false)
    on:  learner.loss_chunk_tokens=`chunk` (512) and learner.gradient_checkpointing=true

(learner.max_tokens_per_micro_batch packs several sequences; one sequence per step has nothing to pack.)
Each configuration runs in a fresh subprocess, which reports its peak resident set (`ru_maxrss`) and the peak
above what it held before the step (the model and its weights built, nothing trained). Prints a table and the
ratio of the peaks at the longest length.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT, TOP_K = 64, 16


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def one_step(length: int, on: bool, layers: int, chunk: int) -> dict[str, float]:
    """One optimizer step in this process; run it in a fresh one for an honest peak."""
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from opd.buffer.sample import Sample
    from opd.config import LossConfig
    from opd.learner import chunked, objective
    from opd.learner.batch import collate

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    config = LlamaConfig(
        hidden_size=576,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        num_hidden_layers=layers,
        vocab_size=49152,
        tie_word_embeddings=True,
        max_position_embeddings=PROMPT + length,
    )
    model = LlamaForCausalLM(config)
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
    s = Sample(rng.integers(0, 49152, PROMPT), rng.integers(0, 49152, length), np.full(length, -2.0, np.float32), 0)
    s.teacher_logprobs = np.full(length, -1.0, np.float32)
    s.teacher_topk_ids = rng.integers(0, 49152, (length, TOP_K))
    s.teacher_topk_logprobs = np.full((length, TOP_K), np.log(0.9 / TOP_K), np.float32)
    batch = collate([s], pad_id=0, top_k=TOP_K)
    cfg = LossConfig(type="jsd", beta=1.0, top_k=TOP_K)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    before = peak_mb()
    t0 = time.perf_counter()
    if on:
        out = model(**inputs, logits_to_keep=1, output_hidden_states=True)
        hidden = out.hidden_states[-1][:, :-1]
        loss, _ = chunked.loss(hidden, model.get_output_embeddings(), batch, cfg, 1.0, 1.0, chunk)
    else:
        logits = model(**inputs).logits[:, :-1].float()
        loss, metrics = objective.OBJECTIVES.get("jsd")(logits, batch, cfg, 1.0)
        loss, _ = objective.with_corrections(loss, metrics, logits, batch, 1.0)
    loss.backward()
    optim.step()
    return {"peak_mb": peak_mb(), "step_mb": peak_mb() - before, "seconds": time.perf_counter() - t0}


def main(argv: list[str]) -> None:
    args = dict(a.split("=", 1) for a in argv)
    if "child" in args:
        print(json.dumps(one_step(int(args["length"]), args["on"] == "1", int(args["layers"]), int(args["chunk"]))))
        return
    lengths = [int(x) for x in args.get("lengths", "1024,4096,8192").split(",")]
    layers, chunk = int(args.get("layers", 4)), int(args.get("chunk", 512))
    print(f"SmolLM2-135M-shaped student, {layers} layers, float32 CPU, one AdamW step on 1 sequence ({PROMPT} prompt")
    print(f"+ N response tokens), loss.type=jsd top-16; on = loss_chunk_tokens={chunk} + gradient_checkpointing")
    print(
        f"{'response tokens':>16} {'off peak MB':>12} {'on peak MB':>11} {'off step MB':>12} {'on step MB':>11}"
        f" {'off s':>6} {'on s':>6}"
    )
    rows = {}
    for length in lengths:
        res = []
        for on in ("0", "1"):
            cmd = [
                sys.executable,
                __file__,
                "child=1",
                f"length={length}",
                f"on={on}",
                f"layers={layers}",
                f"chunk={chunk}",
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            res.append(json.loads(out.strip().splitlines()[-1]))
        off, on_ = rows[length] = res
        print(
            f"{length:>16} {off['peak_mb']:>12.0f} {on_['peak_mb']:>11.0f} {off['step_mb']:>12.0f}"
            f" {on_['step_mb']:>11.0f} {off['seconds']:>6.1f} {on_['seconds']:>6.1f}",
            flush=True,
        )
    off, on_ = rows[lengths[-1]]
    print(
        f"peak memory ratio off/on at {lengths[-1]} tokens: {off['peak_mb'] / on_['peak_mb']:.1f}x"
        f" (target >= 4x); above the built model: {off['step_mb'] / on_['step_mb']:.1f}x"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
