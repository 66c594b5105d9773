"""The real Qwen2.5-Coder-0.5B-Instruct teacher scoring SmolLM2-135M-Instruct's responses across tokenizers.

The teacher's path as its actor runs it (opd/teachers/worker.py): the conversation in Qwen's own chat template, the
student's response re-tokenized through its text, scored by vLLM and projected onto the student's tokens; checked
against Qwen in transformers on the same text, computed here without opd's alignment code.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.stack import ROOT

pytestmark = pytest.mark.integration

SCRIPT = """
import json, sys
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from opd.config import DataConfig, EngineConfig
from opd.data import ChatFormat, Prompt
from opd.rollout import engine
from opd.teachers.align import TokenBridge
from opd.teachers.prompts import TeacherPrompts

if __name__ == "__main__":
    teacher_dir, student_dir, k = sys.argv[1], sys.argv[2], 8
    student, teacher = AutoTokenizer.from_pretrained(student_dir), AutoTokenizer.from_pretrained(teacher_dir)
    data = DataConfig()
    bridge, student_format = TokenBridge(student, teacher), ChatFormat(student, data)
    prompts = TeacherPrompts(bridge, data)
    cases = [
        ("Anna has 12 apples and gets 30 more. How many apples does Anna have now? Answer with just the number.",
         "42"),
        ("What is 7 times 8? Answer with just the number.", "The answer is 56."),
        ("What is 93 minus 27? Answer with just the number.", "66 marbles, since 93-27=66"),
    ]
    rows = []
    for i, (question, answer) in enumerate(cases):
        prompt = Prompt(i, question, messages=({"role": "user", "content": question},))
        response = [*student.encode(answer, add_special_tokens=False), student.eos_token_id]
        rows.append((prompt, bridge.to_teacher(prompts.ids(student_format.ids(prompt), prompt), response), answer))
    llm = engine.make_llm(teacher_dir, EngineConfig(dtype="float32", max_model_len=256), 0)
    scored = engine.score(llm, [b.prompt_ids for _, b, _ in rows], [b.response_ids for _, b, _ in rows], k)
    projected = [bridge.project(b, s, k) for (_, b, _), s in zip(rows, scored)]

    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    vocab = student.get_vocab()
    result = []
    for (prompt, bridged, answer), got in zip(rows, projected):
        # Direct: Qwen's template with the generation prompt, then the answer's text and <|im_end|>, as Qwen reads it.
        head = teacher.apply_chat_template(list(prompt.conversation), add_generation_prompt=True, tokenize=False)
        n_head = len(teacher(head, add_special_tokens=False)["input_ids"])
        ids = teacher(head + answer, add_special_tokens=False)["input_ids"] + [teacher.eos_token_id]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)[n_head - 1 :]
        own = logprobs.gather(-1, torch.tensor(ids[n_head:])[:, None])[:, 0].numpy()
        top = logprobs.topk(k).indices.numpy()
        # Student and teacher positions covering the same text: equal character ends, and equal previous ends.
        s_ids = student.encode(answer, add_special_tokens=False)
        t_ids = ids[n_head:-1]
        s_ends = [len(student.decode(s_ids[: j + 1])) for j in range(len(s_ids))] + [len(answer) + 1]
        t_ends = [len(teacher.decode(t_ids[: t + 1])) for t in range(len(t_ids))] + [len(answer) + 1]
        pairs = [
            (j, t) for j in range(len(s_ends)) for t in range(len(t_ends))
            if s_ends[j] == t_ends[t] and (j == t == 0 or (j > 0 and t > 0 and s_ends[j - 1] == t_ends[t - 1]))
        ]
        # The top-k ids with a student token of the same string; special tokens (BOS and EOS map to each other
        # whatever their strings) are left out of the comparison.
        specials = set(teacher.all_special_ids) | set(student.all_special_ids)
        shared = lambda t: [
            vocab[x] for x in teacher.convert_ids_to_tokens([int(i) for i in top[t] if int(i) not in specials])
            if x in vocab and vocab[x] not in specials
        ]
        kept = lambda j: [int(i) for i in got.topk_ids[j][got.topk_logprobs[j] > -np.inf]
                          if int(i) not in specials]
        result.append({
            "prompt_ids_equal": bridged.prompt_ids == ids[:n_head],
            "response_ids_equal": bridged.response_ids == ids[n_head:],
            "total_gap": abs(float(got.logprobs.sum()) - float(own.sum())),
            "teacher_total": float(own.sum()),
            "positions": len(got.logprobs),
            "pairs": len(pairs),
            "aligned_gap": max(abs(float(got.logprobs[j]) - float(own[t])) for j, t in pairs),
            "topk_as_direct": all(
                kept(j) == shared(t) for j, t in pairs
            ),
            "topk_only_where_aligned": all(
                (got.topk_logprobs[j] == -np.inf).all() for j in set(range(len(got.logprobs))) - {j for j, _ in pairs}
            ),
        })
    print("RESULT " + json.dumps(result))
"""


def test_qwen_scores_smollm2_responses_through_text_as_transformers_does(qwen_teacher, smollm2_assets):
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(qwen_teacher), str(smollm2_assets["smollm2-135m-instruct"])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT ")).removeprefix("RESULT "))
    for row in rows:
        assert row["prompt_ids_equal"] and row["response_ids_equal"], row  # Qwen reads exactly its own rendering
        assert row["total_gap"] < 1e-3 * max(1.0, abs(row["teacher_total"])), row  # the chain rule, in total
        assert row["aligned_gap"] < 1e-3 and row["topk_as_direct"] and row["topk_only_where_aligned"], row
    # Digits are single tokens in both vocabularies: "42<eos>" aligns at every position.
    assert rows[0]["pairs"] == rows[0]["positions"] == 3, rows[0]
