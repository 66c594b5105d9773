"""Tests for opd.teachers.align with two tiny byte-level BPE tokenizers that split the same text differently."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest

from opd.rollout.engine import Scored
from opd.teachers import align
from opd.teachers.align import Bridged, TokenBridge, char_spans, project_logprobs, retokenize, text_to_ids
from opd.tiny import PAD, train_tokenizer

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


# ---------------------------------------------------------------- TokenBridge

ADDITION_TEMPLATES = (
    "Question: what is {a} plus {b}? Answer: {a}+{b}={c}.",
    "Compute the sum {a}+{b}. We add the digits and carry: {a}+{b}={c}, so the result is {c}.",
    "Add {a} and {b} together; the total equals {c}.",
)
PROMPT = "Question: what is 12 plus 34? Answer:"
RESPONSE = " Compute the sum 12+34. We add the digits and carry: 12+34=46, so the result is 46."


@pytest.fixture(scope="session")
def pair():
    """(student, teacher): same addition corpus, vocab 280 vs 400 (the corpus runs out of merges at 332).

    The student splits words the teacher keeps whole ("Qu|es|t|i|o|n" vs "Question"); both share every
    single byte, the digits and the merges the student has.
    """
    corpus = [
        t.format(a=a, b=b, c=a + b) for t in ADDITION_TEMPLATES for a in range(0, 100, 9) for b in range(5, 100, 13)
    ]
    return train_tokenizer(corpus, 280), train_tokenizer(corpus, 400)


def with_special(tok, **tokens):
    """A copy of `tok` with other special-token roles (same vocabulary), e.g. eos_token=PAD or eos_token=None."""
    tok = copy.deepcopy(tok)
    for name, value in tokens.items():
        setattr(tok, name, value)
    return tok


def enc(tok, text: str) -> list[int]:
    return text_to_ids(text, tok)


def hand_scored(n: int, k: int, seed: int = 0) -> Scored:
    rng = np.random.default_rng(seed)
    return Scored(
        rng.uniform(-3, -0.1, n).astype(np.float32),
        np.zeros((n, k), dtype=np.int64),
        np.full((n, k), -np.inf, dtype=np.float32),
    )


def test_pair_tokenizes_differently(pair):
    student, teacher = pair
    assert len(student.get_vocab()) == 280 and len(teacher.get_vocab()) > 280
    assert enc(student, RESPONSE) != enc(teacher, RESPONSE)
    assert not TokenBridge(student, teacher).same_vocab


def test_same_vocab_is_identity(pair):
    student, _ = pair
    bridge = TokenBridge(student, copy.deepcopy(student))
    assert bridge.same_vocab
    prompt, response = enc(student, PROMPT), [*enc(student, RESPONSE), student.eos_token_id]
    bridged = bridge.to_teacher(prompt, response)
    assert bridged == Bridged(prompt, response)
    scored = hand_scored(len(response), 4)
    assert bridge.project(bridged, scored, top_k=4) is scored
    assert bridge.to_student_text_ids(response) == response
    assert bridge.prefix_for_teacher(prompt, response[:5]) == prompt + response[:5]


@pytest.mark.parametrize("reverse", [False, True])
def test_to_teacher_round_trips_text(pair, reverse):
    student, teacher = pair[::-1] if reverse else pair
    bridge = TokenBridge(student, teacher)
    bridged = bridge.to_teacher(enc(teacher, PROMPT), enc(student, RESPONSE))
    assert teacher.decode(bridged.prompt_ids) == PROMPT
    assert teacher.decode(bridged.response_ids) == RESPONSE
    # Re-tokenized separately: the response is the teacher's own encoding of its text, starting on a boundary.
    assert bridged.prompt_ids == enc(teacher, PROMPT) and bridged.response_ids == enc(teacher, RESPONSE)
    # The prompt is the teacher's already (its own rendering): it is passed through as it is.
    assert bridge.to_teacher([7, 8, 9], enc(student, RESPONSE)).prompt_ids == [7, 8, 9]
    assert bridged.student_spans == char_spans(student, enc(student, RESPONSE))
    assert len(bridged.teacher_spans) == len(bridged.response_ids)


@pytest.mark.parametrize("eos", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_project_keeps_sum_and_shapes(pair, eos, reverse):
    student, teacher = pair[::-1] if reverse else pair
    bridge = TokenBridge(student, teacher)
    response = enc(student, RESPONSE) + ([student.eos_token_id] if eos else [])
    bridged = bridge.to_teacher(enc(teacher, PROMPT), response)
    scored = hand_scored(len(bridged.response_ids), 5)
    out = bridge.project(bridged, scored, top_k=3)
    assert out.logprobs.shape == (len(response),) and out.logprobs.dtype == np.float32
    assert out.topk_ids.shape == out.topk_logprobs.shape == (len(response), 3)
    assert out.logprobs.sum() == pytest.approx(scored.logprobs.sum(), rel=1e-5)
    # Empty response: empty everything.
    empty = bridge.project(bridge.to_teacher([], []), hand_scored(0, 5), top_k=3)
    assert empty.logprobs.shape == (0,) and empty.topk_ids.shape == (0, 3)


def test_eos_maps_both_ways(pair):
    student, teacher = pair
    # Give the teacher another EOS (its "<|pad|>", id 1): the mapping must go by role, not by id or string.
    teacher = with_special(teacher, eos_token=PAD)
    s_eos, t_eos = student.eos_token_id, teacher.eos_token_id
    assert (s_eos, t_eos) == (0, 1)
    bridge = TokenBridge(student, teacher)
    body = enc(student, RESPONSE)
    bridged = bridge.to_teacher([], [*body, s_eos])
    assert bridged.response_ids == [*enc(teacher, RESPONSE), t_eos]
    assert bridge.prefix_for_teacher([], [*body, s_eos]) == bridged.response_ids

    scored = hand_scored(len(bridged.response_ids), 3)
    # At the EOS position the teacher ranks its EOS, then the string "<|endoftext|>" (not its EOS), then ".".
    scored.topk_ids[-1] = [t_eos, teacher.convert_tokens_to_ids("<|endoftext|>"), teacher.convert_tokens_to_ids(".")]
    scored.topk_logprobs[-1] = [-0.1, -3.0, -4.0]
    out = bridge.project(bridged, scored, top_k=3)
    assert out.logprobs[-1] == scored.logprobs[-1]  # EOS on EOS, nothing else attributed to it
    assert out.topk_ids[-1].tolist() == [s_eos, student.convert_tokens_to_ids("."), 0]
    np.testing.assert_array_equal(out.topk_logprobs[-1], np.array([-0.1, -4.0, -np.inf], dtype=np.float32))

    assert bridge.to_student_text_ids([*enc(teacher, RESPONSE), t_eos]) == [*body, s_eos]
    # The teacher's "<|endoftext|>" in the middle is just text (an added token of the student's too).
    assert bridge.to_student_text_ids([teacher.convert_tokens_to_ids("<|endoftext|>")]) == [s_eos]


def test_eos_without_teacher_eos(pair):
    student, teacher = pair
    bridge = TokenBridge(student, with_special(teacher, eos_token=None))
    bridged = bridge.to_teacher([], [*enc(student, "12+34"), student.eos_token_id])
    assert bridged.response_ids == enc(teacher, "12+34")
    out = bridge.project(bridged, hand_scored(len(bridged.response_ids), 2), top_k=2)
    assert out.logprobs.shape == (6,) and out.logprobs[-1] == 0.0 and (out.topk_logprobs[-1] == -np.inf).all()


def test_topk_on_aligned_positions(pair):
    student, teacher = pair
    bridge = TokenBridge(student, teacher)
    s_ids = enc(student, RESPONSE)
    bridged = bridge.to_teacher([], s_ids)
    t_ids = bridged.response_ids
    teacher_only = teacher.convert_tokens_to_ids("Ġdigits")
    assert teacher_only >= 280 and "Ġdigits" not in student.get_vocab()
    plus = teacher.convert_tokens_to_ids("+")

    # Each teacher position ranks: a teacher-only token, its own token, "+", then padding.
    scored = hand_scored(len(t_ids), 5)
    scored.topk_ids[:, :3] = np.stack([np.full(len(t_ids), teacher_only), t_ids, np.full(len(t_ids), plus)], 1)
    scored.topk_logprobs[:, :3] = [-0.5, -1.0, -2.0]
    out = bridge.project(bridged, scored, top_k=4)

    # Independently: a student token is aligned when a teacher token covers exactly its characters.
    s_spans, t_spans = char_spans(student, s_ids), char_spans(teacher, t_ids)
    aligned = [span in t_spans for span in s_spans]
    assert 0 < sum(aligned) < len(s_ids)  # "1", "+", " the" ... align; "Co|m|p|u|t|e" under "ĠCompute" do not
    for i, sid in enumerate(s_ids):
        if aligned[i]:
            # The teacher-only id is dropped; its own token becomes the student's token at i (same string).
            assert out.topk_ids[i].tolist() == [sid, student.convert_tokens_to_ids("+"), 0, 0]
            assert out.topk_logprobs[i].tolist() == [-1.0, -2.0, -np.inf, -np.inf]
            assert out.logprobs[i] == scored.logprobs[t_spans.index(s_spans[i])]
        else:
            assert out.topk_ids[i].tolist() == [0] * 4 and (out.topk_logprobs[i] == -np.inf).all()

    # top_k narrower than what survives truncates, in the teacher's order.
    narrow = bridge.project(bridged, scored, top_k=1)
    assert narrow.topk_ids[:, 0].tolist() == [sid if a else 0 for sid, a in zip(s_ids, aligned, strict=True)]


def test_topk_needs_one_teacher_token_with_the_same_text(pair):
    """Hand-made spans: only a student token whose text is exactly one teacher token's keeps a top-k."""
    bridge = TokenBridge(*pair)

    def topk_rows(student_spans, teacher_spans):
        n = len(teacher_spans)
        scored = hand_scored(n, 1)
        scored.topk_ids[:, 0], scored.topk_logprobs[:, 0] = 60, -1.0  # a single byte: shared, same id in both
        bridged = Bridged([], [60] * n, student_spans, teacher_spans)
        return (bridge.project(bridged, scored, top_k=1).topk_logprobs[:, 0] == -1.0).tolist()

    # Two teacher byte tokens sharing one character's offsets (as `retokenize` gives a split 'é'): not 1:1.
    assert topk_rows([(0, 1), (1, 2)], [(0, 1), (1, 2), (1, 2)]) == [True, False]
    # An empty teacher span (leading byte) plus the byte completing the character: not 1:1 either.
    assert topk_rows([(0, 1), (1, 2)], [(0, 1), (1, 1), (1, 2)]) == [True, False]
    # Trimmed leading spaces in teacher offsets: a token's text runs from the previous end, so these align.
    assert topk_rows([(0, 4), (4, 8)], [(1, 4), (5, 8)]) == [True, True]
    # Straddling: "abc|def" against "ab|cd|ef" shares no token text.
    assert topk_rows([(0, 2), (2, 4), (4, 6)], [(0, 3), (3, 6)]) == [False, False, False]


def test_topk_split_character_across_real_tokenizers(tokenizers):
    small, large = tokenizers
    bridge = TokenBridge(large, small)  # the student has "café" whole, the teacher c|a|f|Ã|©
    bridged = bridge.to_teacher([], enc(large, "café"))
    assert len(bridged.response_ids) == 5
    scored = hand_scored(5, 1)
    scored.topk_ids[:, 0], scored.topk_logprobs[:, 0] = bridged.response_ids, -1.0
    out = bridge.project(bridged, scored, top_k=1)
    assert out.logprobs[0] == pytest.approx(scored.logprobs.sum()) and out.topk_logprobs[0, 0] == -np.inf


@pytest.mark.parametrize("text", [RESPONSE, " carry: 99+5=104", ACCENTED])
def test_to_student_text_ids_round_trips(pair, text):
    student, teacher = pair
    for s, t in ((student, teacher), (teacher, student)):
        ids = TokenBridge(s, t).to_student_text_ids(enc(t, text))
        assert ids == enc(s, text) and s.decode(ids) == text


def test_prefix_for_teacher(pair):
    student, teacher = pair
    bridge = TokenBridge(student, teacher)
    prefix = enc(student, " Compute the sum 12+34. We add the di")
    ids = bridge.prefix_for_teacher(enc(teacher, PROMPT), prefix)
    assert ids == enc(teacher, PROMPT) + enc(teacher, " Compute the sum 12+34. We add the di")
    assert teacher.decode(ids) == PROMPT + " Compute the sum 12+34. We add the di"


def test_project_rejects_mismatched_teacher(pair):
    bridge = TokenBridge(*pair)
    bridged = bridge.to_teacher([], enc(pair[0], "12+34"))
    with pytest.raises(ValueError, match="top-k"):
        bridge.project(bridged, hand_scored(len(bridged.response_ids) + 1, 2), top_k=2)
    with pytest.raises(ValueError, match="no spans"):
        bridge.project(Bridged([], [1]), hand_scored(1, 2), top_k=2)
