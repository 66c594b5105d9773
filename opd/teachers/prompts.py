"""Prompts as a teacher reads them: the student's token ids, or the conversation in the teacher's own chat markup.

A teacher with the student's vocabulary scores the very ids the student saw. A teacher with another tokenizer
would read the student's chat markup as plain text if it got the student's ids re-tokenized, so it renders the
prompt's messages itself, with its own template (`ChatFormat(own_template=True)`: the renderer the student's
prompts go through, with the same `data.system_prompt` and `data.chat_template_kwargs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from opd.data import ChatFormat, Prompt
from opd.teachers.align import TokenBridge

if TYPE_CHECKING:
    from opd.config import DataConfig


class TeacherPrompts:
    """One teacher's prompt ids, each conversation rendered once: prompts come back every epoch and every eval."""

    def __init__(self, bridge: TokenBridge, data: DataConfig) -> None:
        self.bridge = bridge
        self.format = ChatFormat(bridge.teacher, data, own_template=True)
        self._rendered: dict[tuple, list[int]] = {}

    def ids(self, student_ids: Sequence[int], prompt: Prompt) -> list[int]:
        """Teacher ids of the prompt the student wrote `student_ids`' response to.

        Same vocabulary: `student_ids` themselves. Another tokenizer: `prompt`'s conversation with the teacher's
        template (raw text when it has none or data.chat_template=none).
        """
        if self.bridge.same_vocab:
            return [int(t) for t in student_ids]
        key = tuple((m["role"], m["content"]) for m in prompt.conversation)
        if key not in self._rendered:
            self._rendered[key] = self.format.ids(prompt)
        return self._rendered[key]

    def user_turn(self, text: str) -> list[int]:
        """`text` as one user turn in the teacher's template (raw text without one), no system prompt: a rubric.

        Not cached: every rubric holds another response.
        """
        return self.format.ids(Prompt(-1, text), system=False)
