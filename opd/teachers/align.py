"""Cross-tokenizer alignment through character offsets (pure functions, Hugging Face fast tokenizers).

A teacher with another tokenizer scores the student's response as text: the student's tokens are decoded,
the text is re-tokenized for the teacher, and the teacher's per-token log-probs are projected back onto
the student's tokens by where each token ends in the text (`project_logprobs`). `TokenBridge` puts these
together for one (student, teacher) tokenizer pair: responses to the teacher, its signal back, and corrections
the teacher writes back to the student. Prompts do not go through the text: the teacher renders the conversation
with its own chat template (`opd.teachers.prompts`).
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from opd.rollout.engine import Scored


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: printable character -> the byte it stands for."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _byte_level_spans(tokenizer, token_ids: list[int], text: str) -> list[tuple[int, int]] | None:
    """Exact spans for byte-level BPE, or None when the tokenizer is not one (or decodes differently).

    Each token's bytes are fed to an incremental UTF-8 decoder; the characters it emits are the ones that
    token completes. A multi-byte character split over tokens therefore belongs to the token holding its
    last byte, and the tokens before it get an empty span.
    """
    from tokenizers import decoders

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not isinstance(backend.decoder, decoders.ByteLevel):
        return None
    table = _byte_decoder()
    special = {int(i): t.content for i, t in backend.get_added_tokens_decoder().items()}
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    spans, pieces, end = [], [], 0
    for k, tok_id in enumerate(token_ids):
        if tok_id in special:
            piece = special[tok_id].encode("utf-8")
        else:
            token = backend.id_to_token(int(tok_id))
            if token is None or any(c not in table for c in token):
                return None
            piece = bytes(table[c] for c in token)
        chars = decoder.decode(piece, final=k == len(token_ids) - 1)
        spans.append((end, end + len(chars)))
        pieces.append(chars)
        end += len(chars)
    return spans if "".join(pieces) == text else None


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def char_spans(tokenizer, token_ids: Sequence[int]) -> list[tuple[int, int]]:
    """Character span of each token in `tokenizer.decode(token_ids)` (default decode arguments).

    Spans tile the decoded text: contiguous, non-decreasing, from 0 to len(text). A token completing no
    character (e.g. the first byte of a multi-byte character) gets an empty span at its position.

    Byte-level BPE (as `opd.tiny`): exact, O(n), from each token's bytes (see `_byte_level_spans`); the result
    is checked against `tokenizer.decode`. Other tokenizers: prefix decoding, O(n^2) — token i ends where
    `decode(ids[:i + 1])` stops agreeing with the full text (its longest common prefix), which is exact
    whenever decoding a prefix yields a prefix of the text, and attributes characters a later token
    changes (half-decoded bytes shown as U+FFFD, cleanup of spaces) to the token that fixes them.
    """
    ids = [int(t) for t in token_ids]
    text = tokenizer.decode(ids)
    spans = _byte_level_spans(tokenizer, ids, text)
    if spans is not None:
        return spans
    spans, end = [], 0
    for i in range(len(ids)):
        prefix = text if i == len(ids) - 1 else tokenizer.decode(ids[: i + 1])
        new_end = max(end, _common_prefix_len(prefix, text))
        spans.append((end, new_end))
        end = new_end
    return spans


def retokenize(text: str, tokenizer) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and character offsets of `text` under `tokenizer`, with no special tokens added.

    Offsets are the tokenizer's own `return_offsets_mapping` into `text`. They need not tile the text
    (trimmed leading spaces, several byte tokens sharing one character's offsets); `project_logprobs` reads
    their ends, which are reliable, and whether they are empty.
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [(int(a), int(b)) for a, b in enc["offset_mapping"]]


def _checked_src_ends(src_spans: Sequence[tuple[int, int]]) -> np.ndarray:
    src_ends = np.asarray([e for _, e in src_spans], dtype=np.int64)
    if np.any(np.diff(src_ends) < 0):
        raise ValueError(f"student span ends must be non-decreasing, got {src_ends.tolist()}")
    return src_ends


def _owners(src_ends: np.ndarray, dst_spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """The student token each teacher token is attributed to, by the rule `project_logprobs` documents.

    Shared with `TokenBridge.project`, so that a position's top-k is kept only where its log-prob came
    from exactly one teacher token. `src_ends` must be non-empty and non-decreasing.
    """
    dst_ends = np.asarray([e for _, e in dst_spans], dtype=np.int64)
    dst_empty = np.asarray([s >= e for s, e in dst_spans], dtype=bool)
    owner = np.where(
        dst_empty, np.searchsorted(src_ends, dst_ends, side="right"), np.searchsorted(src_ends, dst_ends, side="left")
    )
    return np.minimum(owner, len(src_ends) - 1)


def project_logprobs(
    src_spans: Sequence[tuple[int, int]], dst_spans: Sequence[tuple[int, int]], dst_logprobs: np.ndarray
) -> np.ndarray:
    """Teacher (dst) per-token log-probs mapped onto the student's (src) tokens of the same text: float32 [len(src)].

    Rule (chain rule over text): a student token's log-prob is the sum of the log-probs of the teacher tokens
    that END inside it, i.e. the teacher tokens whose end e satisfies end(previous student token) < e <=
    end(this student token). Summed over a student token, that is log p(text up to where the teacher last
    completed a token | text before), so the student tokens' values add up to the teacher's sequence log-prob.

    Edge cases, each keeping every teacher token attributed exactly once (sum over src == sum over dst):
    - a teacher token straddling a student boundary goes to the student token in which it ends; student
      tokens inside it that complete no teacher token get 0.0 (log 1: no evidence of their own);
    - an empty teacher span (start == end at p: part of a character, as `char_spans` gives the leading bytes
      of a split character) goes with the character it helps build: the first student token ending after p;
    - empty student spans (a student token holding only the leading bytes of a character) receive nothing:
      teacher tokens ending at the same position go to the earliest student token with that end;
    - teacher tokens ending at or before the first student end go to the first student token, those ending
      past the last student end (text the student tokens do not cover) go to the last one;
    - -inf propagates: a student token containing an impossible teacher token is impossible.
    Student spans: only ends are read, and they must be non-decreasing. Teacher spans: ends, plus whether
    the span is empty. Identical tokenizations give the identity, except that a token completing no
    character has its log-prob folded into the token that completes the character.
    """
    dst_logprobs = np.asarray(dst_logprobs, dtype=np.float64)
    if len(dst_spans) != len(dst_logprobs):
        raise ValueError(f"{len(dst_spans)} teacher spans but {len(dst_logprobs)} teacher log-probs")
    src_ends = _checked_src_ends(src_spans)
    if len(src_ends) == 0:
        if len(dst_spans):
            raise ValueError("cannot project teacher log-probs onto an empty student sequence")
        return np.zeros(0, dtype=np.float32)
    owner = _owners(src_ends, dst_spans)
    out = np.zeros(len(src_ends), dtype=np.float64)
    np.add.at(out, owner, dst_logprobs)
    return out.astype(np.float32)


def text_to_ids(text: str, tokenizer) -> list[int]:
    """Student ids for a correction the teacher wrote as plain text: the canonical encoding, no special tokens.

    A thin wrapper so callers state intent; for byte-level tokenizers `decode(text_to_ids(t)) == t` for any
    text made of characters the tokenizer's alphabet covers.
    """
    return list(tokenizer.encode(text, add_special_tokens=False))


# ---------------------------------------------------------------- a (student, teacher) tokenizer pair


@dataclass
class Bridged:
    """One sample as the teacher reads it, plus what `TokenBridge.project` needs to map its signal back.

    `prompt_ids`/`response_ids` are teacher ids (the student's own ids for a same-vocabulary teacher). The
    spans are character spans into the decoded response, one per student / teacher response token; a
    trailing EOS is one virtual character after the text, so its log-prob maps EOS to EOS. Both are None when
    nothing was re-tokenized.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    student_spans: list[tuple[int, int]] | None = None
    teacher_spans: list[tuple[int, int]] | None = None


class TokenBridge:
    """Lets a teacher with another tokenizer score and correct the student's samples, through the text.

    Built once per (student, teacher) pair. With equal vocabularies (`same_vocab`) every method is the
    identity, so same-tokenizer teachers pay nothing. Otherwise ids travel as decoded text, re-tokenized on
    the other side, and special tokens are handled explicitly rather than as text: a trailing student EOS
    becomes the teacher's EOS (and back), a leading student BOS the teacher's BOS.

    Signal quality across tokenizers: the sampled tokens' log-probs are exact by the chain rule (summed per
    student token, see `project_logprobs`), but the top-k is partial: it is kept only at positions where one
    student token and one teacher token cover the same text, and only for the ids whose token string the
    student vocabulary also has. Losses that read the top-k therefore see just that shared, aligned part.
    """

    def __init__(self, student, teacher) -> None:
        self.student, self.teacher = student, teacher
        s_vocab, t_vocab = student.get_vocab(), teacher.get_vocab()
        self.same_vocab: bool = s_vocab == t_vocab
        self._s_eos, self._t_eos = student.eos_token_id, teacher.eos_token_id
        self._s_bos, self._t_bos = student.bos_token_id, teacher.bos_token_id
        # Teacher id -> student id with the identical token string (special tokens by content), -1 if none.
        self._to_student = np.full(max(t_vocab.values(), default=0) + 1, -1, dtype=np.int64)
        if self.same_vocab:
            return
        for token, t_id in t_vocab.items():
            s_id = s_vocab.get(token)
            if s_id is not None:
                self._to_student[t_id] = s_id
        # BOS and EOS map to each other whatever their strings; EOS last, so it wins where the two coincide.
        for t_id, s_id in ((self._t_bos, self._s_bos), (self._t_eos, self._s_eos)):
            if t_id is not None and s_id is not None and t_id < len(self._to_student):
                self._to_student[self._to_student == s_id] = -1
                self._to_student[t_id] = s_id

    # -------------------------------------------------------------- student -> teacher

    def _split_eos(self, response_ids: Sequence[int]) -> tuple[list[int], bool]:
        ids = [int(t) for t in response_ids]
        if ids and self._s_eos is not None and ids[-1] == self._s_eos:
            return ids[:-1], True
        return ids, False

    def to_teacher(self, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> Bridged:
        """The student's response in teacher ids after `prompt_ids`, for scoring, plus the spans `project` needs.

        `prompt_ids` are already the teacher's: the prompt as it renders it (`TeacherPrompts`), so the response
        is re-tokenized on its own, starts on a token boundary, and the teacher scores exactly the response text.
        Special tokens other than BOS/EOS are decoded as their text; a teacher with an added token of the same
        content reads it back as that token. A trailing student EOS becomes the teacher's EOS, or is dropped
        when the teacher has none (the student's EOS position then gets log-prob 0 and no top-k).
        """
        if self.same_vocab:
            return Bridged([int(t) for t in prompt_ids], [int(t) for t in response_ids])
        body, eos = self._split_eos(response_ids)
        text = self.student.decode(body)
        student_spans = char_spans(self.student, body)
        teacher_ids, teacher_spans = retokenize(text, self.teacher)
        if eos:
            student_spans.append((len(text), len(text) + 1))
            if self._t_eos is not None:
                teacher_ids.append(self._t_eos)
                teacher_spans.append((len(text), len(text) + 1))
        return Bridged([int(t) for t in prompt_ids], teacher_ids, student_spans, teacher_spans)

    def prefix_for_teacher(self, prompt_ids: Sequence[int], response_prefix_ids: Sequence[int]) -> list[int]:
        """The teacher's prompt ids + the partial student response in teacher ids: what a correcting teacher
        continues from.

        The partial response is re-tokenized on its own, so its last teacher token may be shorter than the one
        the teacher would use for the finished word (e.g. "wh" where it would write "what"); the teacher
        continues from exactly the student's text either way.
        """
        if self.same_vocab:
            return [int(t) for t in (*prompt_ids, *response_prefix_ids)]
        body, eos = self._split_eos(response_prefix_ids)
        ids = [int(t) for t in prompt_ids] + retokenize(self.student.decode(body), self.teacher)[0]
        return [*ids, self._t_eos] if eos and self._t_eos is not None else ids

    # -------------------------------------------------------------- teacher -> student

    def project(self, bridged: Bridged, teacher: Scored, top_k: int) -> Scored:
        """The teacher's signal on its response tokens mapped onto the student's: [R_student], [R_student, top_k].

        `logprobs`: `project_logprobs` (sums of teacher log-probs per student token; exact in total).
        Top-k: at a student position whose text is exactly one teacher token's (that teacher token and no
        other attributed to it), each teacher top-k id becomes the student id with the identical token string;
        ids with no student equivalent are dropped, the rest keep the teacher's order. Every other position
        gets an empty top-k (id 0, -inf: the engine's padding). Same vocabulary: `teacher` unchanged.
        """
        if self.same_vocab:
            return teacher
        if bridged.student_spans is None or bridged.teacher_spans is None:
            raise ValueError("this Bridged carries no spans: it was not made by a cross-tokenizer TokenBridge")
        src_spans, dst_spans = bridged.student_spans, bridged.teacher_spans
        t_ids = np.asarray(teacher.topk_ids, dtype=np.int64)
        t_vals = np.asarray(teacher.topk_logprobs, dtype=np.float32)
        if t_ids.ndim != 2 or t_ids.shape != t_vals.shape or len(t_ids) != len(dst_spans):
            raise ValueError(
                f"expected teacher top-k [{len(dst_spans)}, K], got ids {t_ids.shape} and log-probs {t_vals.shape}"
            )
        logprobs = project_logprobs(src_spans, dst_spans, teacher.logprobs)
        ids = np.zeros((len(src_spans), top_k), dtype=np.int64)
        vals = np.full((len(src_spans), top_k), -np.inf, dtype=np.float32)
        src, dst = self._one_to_one(src_spans, dst_spans)
        if len(src) == 0 or top_k == 0:
            return Scored(logprobs, ids, vals)
        table = self._to_student
        rows_ids, rows_vals = t_ids[dst], t_vals[dst]
        in_table = (rows_ids >= 0) & (rows_ids < len(table))
        mapped = np.where(in_table, table[np.where(in_table, rows_ids, 0)], -1)
        keep = (mapped >= 0) & (rows_vals > -np.inf)
        order = np.argsort(~keep, axis=1, kind="stable")[:, :top_k]  # kept entries first, in the teacher's order
        keep = np.take_along_axis(keep, order, axis=1)
        width = order.shape[1]
        ids[src, :width] = np.where(keep, np.take_along_axis(mapped, order, axis=1), 0)
        vals[src, :width] = np.where(keep, np.take_along_axis(rows_vals, order, axis=1), -np.inf)
        return Scored(logprobs, ids, vals)

    @staticmethod
    def _one_to_one(
        src_spans: Sequence[tuple[int, int]], dst_spans: Sequence[tuple[int, int]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(student index, teacher index) pairs covering the same non-empty text, each the other's only partner.

        A token's text runs from the previous token's end to its own end: teacher offsets need not tile the
        text (a trimmed leading space), but the text before a token is always what precedes that end. Such a
        pair has the same context and predicts the same string, so their next-token distributions compare.
        """
        if not src_spans or not dst_spans:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        src_ends = _checked_src_ends(src_spans)
        dst_ends = np.asarray([e for _, e in dst_spans], dtype=np.int64)
        owner = _owners(src_ends, dst_spans)
        per_src = np.bincount(owner, minlength=len(src_ends))
        src_starts = np.concatenate([[0], src_ends[:-1]])
        dst_starts = np.concatenate([[0], dst_ends[:-1]])
        ok = (
            (per_src[owner] == 1)
            & (dst_starts == src_starts[owner])
            & (dst_ends == src_ends[owner])
            & (dst_ends > dst_starts)
        )
        return owner[ok], np.flatnonzero(ok)

    def to_student_text_ids(self, teacher_ids: Sequence[int]) -> list[int]:
        """A continuation the teacher wrote (a correction) as student ids, through its text.

        Decoded with the teacher's tokenizer and re-encoded canonically with the student's (`text_to_ids`);
        a trailing teacher EOS becomes the student's EOS (dropped if the student has none).
        """
        ids = [int(t) for t in teacher_ids]
        if self.same_vocab:
            return ids
        eos = bool(ids) and self._t_eos is not None and ids[-1] == self._t_eos
        out = text_to_ids(self.teacher.decode(ids[:-1] if eos else ids), self.student)
        return [*out, self._s_eos] if eos and self._s_eos is not None else out
