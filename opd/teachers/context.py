"""Prompts too long for a served teacher's context, found before any actor starts.

The student's engine and an in-process teacher have the context the config gives them; a served teacher
(backend=openai) has whatever its server was started with, which opd learns only by asking it. A prompt longer
than that would first fail mid-run, in a score call that no retry can mend, and take the teacher out of the pool
(or the run down) without naming the prompt. So each served teacher's context is asked for on the driver and
every prompt it would read is put through the length check the student's prompts go through
(`opd.data.encoding.fitting`): an error naming `file:line`, or skipped and counted with `data.on_error=skip`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from opd.data import ChatFormat, DataError, Prompt
from opd.data.encoding import fitting
from opd.teachers.align import TokenBridge
from opd.teachers.combine import routed_teacher
from opd.teachers.prompts import TeacherPrompts

if TYPE_CHECKING:
    from opd.config import OPDConfig, TeacherConfig


def served_context(t: TeacherConfig, timeout_s: float) -> int | None:
    """The context length teacher `t`'s server declares; None when it declares none or cannot be reached from
    the driver (its replicas, elsewhere in the cluster, may reach it: the run then goes on unchecked)."""
    from opd.teachers.pool import served_endpoint
    from opd.teachers.served import ServedClient, ServedTeacherError

    try:
        return ServedClient(served_endpoint(t, timeout_s)).max_model_len()
    except ServedTeacherError as err:
        print(f"WARNING: prompts not checked against teacher {t.name!r}'s context: {err}", flush=True)
        return None


def _reads(cfg: OPDConfig, name: str, prompt: Prompt) -> bool:
    """Whether teacher `name` reads `prompt`: every teacher does, except that with combine.rule=route only the one
    the prompt is routed to (an unroutable prompt is reported by the student's encoding)."""
    combine = cfg.combine
    if combine.rule != "route":
        return True
    try:
        return routed_teacher(combine, prompt) == name
    except ValueError:
        return False


def fit_served_teachers(
    cfg: OPDConfig,
    student: str,
    tokenizers: dict[str, str],
    train: list[Prompt],
    evals: dict[str, list[Prompt]],
    context: Callable[[TeacherConfig, float], int | None] = served_context,
) -> tuple[list[Prompt], dict[str, list[Prompt]], int]:
    """`train` and `evals` (each eval set cut to `data.eval_size`, as a run reads it) less the prompts too long
    for a served teacher, and how many those were; a `DataError` naming the first one unless
    `data.on_error=skip`.

    `tokenizers`: each teacher's local tokenizer dir; `context`: a served teacher's context length (None:
    unknown, not checked). A prompt must leave room for `rollout.max_new_tokens` of response, as the student's
    does, counted in the tokens the teacher reads it in (`TeacherPrompts`).
    """
    served = [t for t in cfg.teachers if t.backend == "openai"]
    if not served:
        return train, evals, 0
    from transformers import AutoTokenizer

    data = cfg.data
    sets = [(None, data.train, train)]
    sets += [(name, source, evals[name][: data.eval_size]) for name, source in data.eval_sets().items()]
    too_long: list[set[int]] = [set() for _ in sets]
    student_tokenizer = AutoTokenizer.from_pretrained(student)
    for t in served:
        max_len = context(t, cfg.faults.teacher_timeout_s)
        if max_len is None:
            continue
        bridge = TokenBridge(student_tokenizer, AutoTokenizer.from_pretrained(tokenizers[t.name]))
        chat = ChatFormat(student_tokenizer, data) if bridge.same_vocab else TeacherPrompts(bridge, data).format
        limit = max_len - cfg.rollout.max_new_tokens
        why = (
            f"teacher {t.name!r} is served with max_model_len={max_len}, so with rollout.max_new_tokens the limit "
            f"is {limit} (serve it with a longer --max-model-len, shorten the prompt, or set data.on_error=skip)"
        )
        for dropped, (_, source, prompts) in zip(too_long, sets, strict=True):
            read = [p for p in prompts if _reads(cfg, t.name, p)]
            fit, _ = fitting(chat.ids, read, limit, source, data.on_error, why)
            dropped |= {p.index for p in read} - {p.index for p, _ in fit}
    kept = []
    for dropped, (_, source, prompts) in zip(too_long, sets, strict=True):
        kept.append([p for p in prompts if p.index not in dropped])
        if not kept[-1]:
            raise DataError(f"{source}: no prompt fits the context of the served teachers ({len(dropped)} too long)")
    names = [name for name, _, _ in sets[1:]]
    return kept[0], dict(zip(names, kept[1:], strict=True)), sum(map(len, too_long))
