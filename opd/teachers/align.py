"""Cross-tokenizer alignment through character offsets (pure functions, Hugging Face fast tokenizers).

A teacher with another tokenizer scores the student's response as text: the student's tokens are decoded,
the text is re-tokenized for the teacher, and the teacher's per-token log-probs are projected back onto
the student's tokens by where each token ends in the text (`project_logprobs`).
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from functools import lru_cache

import numpy as np


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
    src_ends = np.asarray([e for _, e in src_spans], dtype=np.int64)
    dst_ends = np.asarray([e for _, e in dst_spans], dtype=np.int64)
    dst_empty = np.asarray([s >= e for s, e in dst_spans], dtype=bool)
    if len(src_ends) == 0:
        if len(dst_ends):
            raise ValueError("cannot project teacher log-probs onto an empty student sequence")
        return np.zeros(0, dtype=np.float32)
    if np.any(np.diff(src_ends) < 0):
        raise ValueError(f"student span ends must be non-decreasing, got {src_ends.tolist()}")
    owner = np.where(
        dst_empty, np.searchsorted(src_ends, dst_ends, side="right"), np.searchsorted(src_ends, dst_ends, side="left")
    )
    owner = np.minimum(owner, len(src_ends) - 1)
    out = np.zeros(len(src_ends), dtype=np.float64)
    np.add.at(out, owner, dst_logprobs)
    return out.astype(np.float32)


def text_to_ids(text: str, tokenizer) -> list[int]:
    """Student ids for a correction the teacher wrote as plain text: the canonical encoding, no special tokens.

    A thin wrapper so callers state intent; for byte-level tokenizers `decode(text_to_ids(t)) == t` for any
    text made of characters the tokenizer's alphabet covers.
    """
    return list(tokenizer.encode(text, add_special_tokens=False))
