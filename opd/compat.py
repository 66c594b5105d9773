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
