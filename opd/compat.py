"""Can the configured student and teachers be paired? Checked on the driver before any actor starts."""

from __future__ import annotations


class IncompatibleModels(ValueError):
    """Student and teachers cannot be paired as configured (found before any actor starts)."""


def check_top_k(top_k: int, vocab_size: int) -> None:
    if top_k > vocab_size:
        raise IncompatibleModels(f"loss.top_k={top_k} is larger than the student's vocabulary ({vocab_size} tokens)")


def cross_tokenizer_teachers(student_tokenizer, teachers: dict[str, str], rule: str) -> list[str]:
    """Teachers whose vocabulary differs from the student's: their signal is bridged through text.

    A bridged teacher's log-probs are exact per word-piece sequence (chain rule) but not per student token,
    so rules that stay exact under re-bracketing (sums of log-probs: mean_logprob; one teacher per prompt:
    route, best_of) work, while a per-token `mixture` of probabilities would be meaningless.
    """
    from transformers import AutoTokenizer

    vocab = student_tokenizer.get_vocab()
    bridged = [name for name, path in teachers.items() if AutoTokenizer.from_pretrained(path).get_vocab() != vocab]
    if bridged and rule == "mixture" and len(teachers) > 1:
        raise IncompatibleModels(
            f"teachers {bridged} use another tokenizer than the student; combine.rule=mixture mixes per-token "
            "probabilities, which is undefined across tokenizations: use mean_logprob, route or best_of"
        )
    return bridged


VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
"""Attention head sizes vLLM's CPU attention runs: `CPUAttentionBackend.get_supported_head_sizes()` in
vllm/v1/attention/backends/cpu_attn.py (vLLM 0.32). A copy, not an import: importing it loads torch and most of
vLLM on the driver (8 s here); tests/test_compat.py checks the copy against vLLM's list."""


def head_size(model: str) -> int:
    """Attention head size of a checkpoint (local dir or hub id): `head_dim`, else hidden_size / heads."""
    from transformers import AutoConfig

    text = AutoConfig.from_pretrained(model).get_text_config()
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def check_cpu_attention(cfg, student: str, teachers: dict[str, str]) -> None:
    """Refuse models that vLLM's CPU attention cannot run, before any actor starts.

    vLLM only finds out inside each engine's first forward pass ("Unsupported CPU attention configuration"),
    after every actor has started. Checked: the student (always vLLM) unless rollout workers have GPUs, and each
    `backend: vllm` teacher unless its replicas have GPUs (GPU attention backends take other sizes).
    `student` and `teachers` (name -> path) are the resolved model paths, `cfg` the run's `OPDConfig`.
    """
    allowed = ", ".join(map(str, VLLM_CPU_HEAD_SIZES))
    problems = []
    if cfg.rollout.gpus_per_worker == 0 and (size := head_size(student)) not in VLLM_CPU_HEAD_SIZES:
        problems.append(
            f"student.model={student}: attention head size {size}; use a student whose head size is one of these "
            "(the rollout engine is always vLLM)"
        )
    for i, t in enumerate(cfg.teachers):
        if t.backend != "vllm" or t.gpus_per_replica > 0 or t.name not in teachers:  # not given: a dry run
            continue
        if (size := head_size(teachers[t.name])) not in VLLM_CPU_HEAD_SIZES:
            problems.append(
                f"teachers.{i}.model={teachers[t.name]} (teacher {t.name!r}): attention head size {size}; "
                f"set teachers.{i}.backend=transformers"
            )
    if problems:
        raise IncompatibleModels(f"vLLM's CPU attention runs head sizes {allowed} only:\n  " + "\n  ".join(problems))
