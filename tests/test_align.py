"""Tests for opd.teachers.align with two tiny byte-level BPE tokenizers that split the same text differently."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from opd.teachers import align
from opd.teachers.align import char_spans, project_logprobs, retokenize, text_to_ids
from opd.tiny import train_tokenizer

# Digits are always single tokens in opd.tiny (individual_digits pre-tokenizer), so "123+456=579" alone tokenizes
# identically under any vocab size; words around it are what the two vocab sizes merge differently.
TEXT = "what is 123+456? 123+456=579. the answer is 579."
ACCENTED = "café au lait"  # 'é' is two bytes: the small tokenizer splits it over two tokens


@pytest.fixture(scope="module")
def tokenizers():
    corpus = [f"what is {a}+{b}? {a}+{b}={a + b}. the answer is {a + b}." for a in range(0, 100, 7) for b in (3, 58)]
    corpus += ["café au lait", "déjà vu"]
    return train_tokenizer(corpus, 262), train_tokenizer(corpus, 300)


def tokens(tok, text: str) -> list[str]:
    return [tok.decode([i]) for i in tok.encode(text, add_special_tokens=False)]


def test_the_two_tokenizers_split_differently(tokenizers):
    small, large = tokenizers
    assert tokens(small, TEXT)[:3] == ["w", "h", "at"]
    assert tokens(large, TEXT)[0] == "what"
    assert small.encode(TEXT, add_special_tokens=False) != large.encode(TEXT, add_special_tokens=False)
    # The claim in the comment above TEXT:
    assert len(small.encode("123+456=579", add_special_tokens=False)) == 11


@pytest.mark.parametrize("text", [TEXT, ACCENTED])
def test_char_spans_tile_the_decoded_text(tokenizers, text):
    for tok in tokenizers:
        ids = text_to_ids(text, tok)
        spans = char_spans(tok, ids)
        assert len(spans) == len(ids)
        assert spans[0][0] == 0 and spans[-1][1] == len(text)
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
        assert "".join(text[s:e] for s, e in spans) == text
        if text.isascii():  # every token is whole characters: agrees with the tokenizer's own offsets
            assert spans == retokenize(text, tok)[1]


def test_char_spans_split_character_belongs_to_its_last_byte(tokenizers):
    small, _ = tokenizers
    ids = text_to_ids("café", small)
    assert [small.convert_ids_to_tokens(i) for i in ids][-2:] == ["Ã", "©"]  # the two bytes of 'é'
    assert char_spans(small, ids)[-2:] == [(3, 3), (3, 4)]
    # A lone leading byte decodes to U+FFFD, one character, and the spans follow decode().
    assert small.decode(ids[-2:-1]) == "\ufffd"
    assert char_spans(small, ids[-2:-1]) == [(0, 1)]
    # Special tokens decode as their text.
    eos = small.eos_token_id
    assert char_spans(small, [*ids, eos]) == [*char_spans(small, ids), (4, 4 + len(small.eos_token))]


def test_char_spans_prefix_decoding_fallback_agrees(tokenizers, monkeypatch):
    """The generic path (for non-byte-level tokenizers) gives the same spans, split characters included."""
    small, large = tokenizers
    expected = {(id(t), s): char_spans(t, text_to_ids(s, t)) for t in tokenizers for s in (TEXT, ACCENTED)}
    monkeypatch.setattr(align, "_byte_level_spans", lambda *a: None)
    for tok in (small, large):
        for s in (TEXT, ACCENTED):
            assert char_spans(tok, text_to_ids(s, tok)) == expected[(id(tok), s)]


@pytest.mark.parametrize("text", [TEXT, ACCENTED])
def test_retokenize_round_trips_without_special_tokens(tokenizers, text):
    for tok in tokenizers:
        ids, offsets = retokenize(text, tok)
        assert tok.decode(ids) == text
        assert tok.eos_token_id not in ids and len(offsets) == len(ids)
        assert ids == text_to_ids(text, tok)
    # Student ids -> text -> teacher ids: the path a cross-tokenizer teacher takes.
    small, large = tokenizers
    teacher_ids, _ = retokenize(small.decode(text_to_ids(text, small)), large)
    assert large.decode(teacher_ids) == text


def test_project_hand_made_straddling():
    # Text "abcdef". Student: ab | cd | ef. Teacher: abc | def — both teacher tokens straddle a student boundary.
    src = [(0, 2), (2, 4), (4, 6)]
    dst = [(0, 3), (3, 6)]
    out = project_logprobs(src, dst, np.array([-1.0, -2.0]))
    # "abc" ends inside "cd", "def" inside "ef"; "ab" completes no teacher token -> log 1 = 0.
    np.testing.assert_array_equal(out, [0.0, -1.0, -2.0])
    assert out.dtype == np.float32

    # Teacher finer than student: a | b | cdef -> student "ab" gets a + b.
    out = project_logprobs([(0, 2), (2, 6)], [(0, 1), (1, 2), (2, 6)], np.array([-0.5, -0.25, -3.0]))
    np.testing.assert_array_equal(out, [-0.75, -3.0])

    # Ends on a boundary stay on the left; text beyond the student's last end goes to the last token.
    out = project_logprobs([(0, 2), (2, 4)], [(0, 2), (2, 5)], np.array([-1.0, -2.0]))
    np.testing.assert_array_equal(out, [-1.0, -2.0])

    # An empty teacher span (leading bytes of a character at 2) goes with the character it builds;
    # an empty student span at the same place gets nothing.
    out = project_logprobs([(0, 2), (2, 2), (2, 3)], [(0, 2), (2, 2), (2, 3)], np.array([-1.0, -0.5, -0.25]))
    np.testing.assert_array_equal(out, [-1.0, 0.0, -0.75])

    # -inf propagates to the student token that contains it.
    out = project_logprobs([(0, 3), (3, 6)], [(0, 2), (2, 3), (3, 6)], np.array([-1.0, -np.inf, -2.0]))
    assert out[0] == -np.inf and out[1] == -2.0


def test_project_identity_for_identical_tokenizations(tokenizers):
    small, _ = tokenizers
    spans = char_spans(small, text_to_ids(TEXT, small))
    lps = -np.arange(1, len(spans) + 1, dtype=np.float32) / 7
    np.testing.assert_array_equal(project_logprobs(spans, spans, lps), lps)


@pytest.mark.parametrize("text", [TEXT, ACCENTED])
def test_project_across_real_tokenizers_preserves_total(tokenizers, text):
    rng = np.random.default_rng(0)
    for student, teacher in (tokenizers, tokenizers[::-1]):
        src = char_spans(student, text_to_ids(text, student))
        for dst in (retokenize(text, teacher)[1], char_spans(teacher, text_to_ids(text, teacher))):
            lps = rng.uniform(-3, 0, len(dst))
            out = project_logprobs(src, dst, lps)
            assert out.sum() == pytest.approx(lps.sum(), rel=1e-5)
            assert (out <= 0).all()


def test_project_what_onto_w_h_at(tokenizers):
    """Student (small) writes w|h|at, teacher (large) 'what': only 'at' completes the teacher token."""
    small, large = tokenizers
    src = char_spans(small, text_to_ids(TEXT, small))
    dst_ids, dst = retokenize(TEXT, large)
    lps = np.linspace(-1, -2, len(dst))
    out = project_logprobs(src, dst, lps)
    assert out[:3].tolist() == [0.0, 0.0, pytest.approx(lps[0])]
    # Reverse: the large student's 'what' collects all three small-teacher log-probs.
    small_lps = np.array([-0.5, -0.25, -0.125] + [-1.0] * (len(src) - 3))
    back = project_logprobs(char_spans(large, dst_ids), src, small_lps)
    assert back[0] == pytest.approx(-0.875)


def test_project_validation():
    with pytest.raises(ValueError, match="2 teacher spans but 1"):
        project_logprobs([(0, 1)], [(0, 1), (1, 2)], np.array([-1.0]))
    with pytest.raises(ValueError, match="non-decreasing"):
        project_logprobs([(0, 3), (0, 2)], [(0, 3)], np.array([-1.0]))
    with pytest.raises(ValueError, match="empty student"):
        project_logprobs([], [(0, 1)], np.array([-1.0]))
    assert project_logprobs([], [], np.zeros(0)).shape == (0,)
    np.testing.assert_array_equal(project_logprobs([(0, 1)], [], np.zeros(0)), [0.0])
