"""Prompts as the student reads them: rendered with a chat template (or raw), tokenized, routed to a teacher.

`data.chat_template`: `auto` renders with the student tokenizer's own template when it has one (raw text when it
has none, as the built-in task's tokenizer), `none` always passes the raw text, anything else is a Jinja file.
A rendered prompt ends with the generation prompt (the assistant turn's header) and is tokenized with
`add_special_tokens=False`: the template writes every special token it wants, so a BOS it writes is not doubled
(`apply_chat_template(tokenize=True)` and vLLM's chat endpoint do the same). Raw text is tokenized as before
chat templates existed here (`tokenizer.encode(text)`), so the built-in task's prompt ids did not change.
A teacher with another tokenizer renders the same messages with its own template (`ChatFormat(own_template=True)`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2

from opd.data.files import DataError
from opd.data.prompts import Prompt

if TYPE_CHECKING:
    from opd.config import DataConfig

SYSTEM_ROLES = ("system", "developer")


@dataclass
class Encoded:
    """A prompt as the student's tokenizer reads it, and the teacher it is assigned to."""

    prompt: Prompt
    ids: list[int]
    teacher: str | None = None
    """The teacher this prompt is routed to (combine.rule=route, or best_of once judged), else None."""


class ChatFormat:
    """Prompt -> token ids under `data.chat_template`, `data.system_prompt` and `data.chat_template_kwargs`.

    The one renderer of prompts: the student's (`encode`) and, with `own_template`, a teacher's with another
    tokenizer (`opd.teachers.prompts`). Settings that cannot apply to the student (a missing or malformed Jinja
    file; a system prompt or template arguments with no template to take them) are a `DataError` here, before any
    prompt is encoded.
    """

    def __init__(self, tokenizer, data: DataConfig, own_template: bool = False) -> None:
        """`own_template`: the tokenizer's own template whatever `data.chat_template` names (a Jinja file there is
        the student's), unless it is `none`; with no template, raw text, a conversation read by its last user turn
        (`Prompt.text`) and the system prompt and template arguments left out, since that tokenizer has nothing to
        take them. How a teacher with another tokenizer reads the student's prompts."""
        self.tokenizer, self.key, self.system_prompt = tokenizer, data.prompt_key, data.system_prompt
        self.kwargs = dict(data.chat_template_kwargs)
        self.own_template = own_template
        self.template: str | None = None
        self.raw_reason = "data.chat_template=none"
        """Why prompts are raw text, for messages (when `template` is None)."""
        source = f"data.chat_template={data.chat_template}"
        if data.chat_template == "auto" or (own_template and data.chat_template != "none"):
            self.template = getattr(tokenizer, "chat_template", None) or None
            self.raw_reason = "data.chat_template=auto and the student tokenizer has no chat template"
            if own_template:
                source = f"the chat template of {getattr(tokenizer, 'name_or_path', '') or 'the tokenizer'}"
        elif data.chat_template != "none":
            if not Path(data.chat_template).is_file():
                raise DataError(f"data.chat_template={data.chat_template}: no such file (auto, none or a Jinja file)")
            self.template = Path(data.chat_template).read_text(encoding="utf-8")
            if not self.template.strip():
                raise DataError(f"data.chat_template={data.chat_template}: the file is empty")
        if self.template is None and not own_template and (self.system_prompt or self.kwargs):
            used = "data.system_prompt" if self.system_prompt else "data.chat_template_kwargs"
            raise DataError(f"{used} is set, but prompts are raw text: {self.raw_reason}")
        if self.template is not None:
            try:  # a syntax error would otherwise surface once per prompt
                jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(self.template)
            except jinja2.TemplateSyntaxError as err:
                raise DataError(f"{source}: {err.message} (line {err.lineno})") from None

    def ids(self, prompt: Prompt, system: bool = True) -> list[int]:
        """The prompt's token ids; a `DataError` without the row's name when this prompt cannot be rendered.

        `system=False` leaves `data.system_prompt` out: a judge's rubric is a turn of its own, not the task's.
        """
        if self.template is None:
            if prompt.messages and not self.own_template:
                raise DataError(
                    f"`{self.key}` is a list of messages, but {self.raw_reason}; a conversation needs a chat template "
                    "(data.chat_template=auto with a tokenizer that has one, or a Jinja file)"
                )
            return list(self.tokenizer.encode(prompt.text))
        messages = list(prompt.conversation)
        if system and self.system_prompt and not any(m["role"] in SYSTEM_ROLES for m in messages):
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        try:
            text = self.tokenizer.apply_chat_template(
                messages, chat_template=self.template, tokenize=False, add_generation_prompt=True, **self.kwargs
            )
        except jinja2.TemplateError as err:
            raise DataError(f"the chat template refused `{self.key}`: {err}") from None
        return list(self.tokenizer.encode(text, add_special_tokens=False))


def where(prompt: Prompt, source: str) -> str:
    """`file:line` or `file row N` of a prompt, for messages (its position among `source`'s when not read from one)."""
    return prompt.where or (f"{source}:{prompt.line}" if prompt.line > 0 else f"{source}: prompt #{prompt.index + 1}")


def fitting(
    ids: Callable[[Prompt], list[int]], prompts: list[Prompt], limit: int, source: str, on_error: str, why: str
) -> tuple[list[tuple[Prompt, list[int]]], int]:
    """Each prompt of at most `limit` tokens (as `ids` renders it) with its ids, and how many were longer.

    A longer prompt is a `DataError` naming file and row, the length and `why` (the limit and what raises it), or
    skipped and counted with `data.on_error=skip`; one `ids` cannot render is always an error. The one length check
    of prompts, whatever context they must fit: the student's engine's (`encode`) or a served teacher's.
    """
    out, skipped = [], 0
    for p in prompts:
        try:
            rendered = ids(p)
        except DataError as err:
            raise DataError(f"{where(p, source)}: {err}") from None
        if len(rendered) <= limit:
            out.append((p, rendered))
        elif on_error == "skip":
            skipped += 1
        else:
            raise DataError(f"{where(p, source)}: prompt is {len(rendered)} tokens; {why}")
    return out, skipped


def encode(
    tokenizer,
    prompts: list[Prompt],
    limit: int,
    source: str,
    route: Callable[[Prompt], str] | None = None,
    on_error: str = "fail",
    data: DataConfig | None = None,
) -> tuple[list[Encoded], int]:
    """Render and tokenize prompts (and route each to a teacher). Returns them and how many were skipped.

    `data` gives the chat settings (`DataConfig`'s defaults when None). A prompt with no room for a response is
    an error naming file and row, or skipped and counted with `data.on_error=skip`; a prompt the chat template
    cannot render or an unroutable one is always an error (it means wrong settings, not one bad row).
    """
    if data is None:
        from opd.config import DataConfig

        data = DataConfig()
    why = (
        f"with rollout.max_new_tokens the limit is {limit} "
        "(raise rollout.engine.max_model_len, shorten it, or set data.on_error=skip)"
    )
    fit, skipped = fitting(ChatFormat(tokenizer, data).ids, prompts, limit, source, on_error, why)
    out = []
    for p, ids in fit:
        try:
            teacher = route(p) if route else None
        except ValueError as err:
            raise DataError(f"{where(p, source)}: {err}") from None
        out.append(Encoded(p, ids, teacher))
    if not out:
        raise DataError(f"{source}: no prompt fits the context ({skipped} too long)")
    return out, skipped
