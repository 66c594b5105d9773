import json
import random
import re

import pytest

from opd.tasks.addition import extract_answer, make_example, marked_answer_correct, solve, write_jsonl


def test_scratchpad_format():
    assert solve(357, 468) == "7+8=15|5+6+1=12|3+4+1=8|ans 825"
    assert solve(57, 468) == "7+8=15|5+6+1=12|0+4+1=5|ans 525"  # a short operand contributes zeros
    assert solve(9999, 1) == "9+1=10|9+0+1=10|9+0+1=10|9+0+1=10|ans 10000"  # the last carry is the leading digit
    assert solve(12, 34) == "2+4=6|1+3=4|ans 46"


@pytest.mark.parametrize(("lo", "hi"), [(1, 1), (2, 4), (3, 3)])
def test_make_example_is_consistent(lo, hi):
    rng = random.Random(0)
    for _ in range(300):
        ex = make_example(rng, lo, hi)
        assert set(ex) == {"prompt", "response", "answer"}
        m = re.fullmatch(r"(\d+)\+(\d+)=", ex["prompt"])
        assert m, ex["prompt"]
        a, b = m.groups()
        assert lo <= len(a) == len(b) <= hi
        assert all(len(x) == 1 or x[0] != "0" for x in (a, b))
        assert ex["answer"] == str(int(a) + int(b))
        assert ex["response"] == solve(int(a), int(b))
        assert ex["response"].count("|") == len(a)
        assert extract_answer(ex["response"]) == ex["answer"]
        assert marked_answer_correct(ex["response"], ex["answer"])


def test_make_example_is_seeded():
    first = [make_example(random.Random(7), 2, 4) for _ in range(3)]
    assert first == [make_example(random.Random(7), 2, 4) for _ in range(3)]
    rng = random.Random(7)
    assert len({make_example(rng, 2, 4)["prompt"] for _ in range(100)}) > 90


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7+8=15|5+6+1=12|3+4+1=8|ans 825", "825"),
        ("7+8=15|5+6+1=12|3+4+1=8|ans 825<|endoftext|>", "825"),  # eos kept by the decoder
        ("7+8=15|ans 825 \n", "825"),  # trailing whitespace
        ("ans 42", "42"),  # no scratchpad is still an answer
        ("ans 0", "0"),
        ("ans 007", "7"),  # compared as a number
        ("2+4=6|ans 12|ans 46", "46"),  # only the final marker counts
        ("", None),
        ("7+8=15|5+6+1=12|3+4+1=8", None),  # never reached the marker
        ("7+8=15|5+6+1=12|3+4+1=8|ans ", None),  # truncated right after the marker
        ("7+8=15|5+6+1=12|3+4+1=8|ans", None),
        ("7+8=15|ans 825|6+1=7", None),  # kept going after the answer
        ("7+8=15|ans 8a5", None),  # not a decimal
        ("7+8=15|ans -825", None),
        ("7+8=15|ans 8 25", None),
        ("7+8=15|ans \u0668\u0662\u0665", None),  # non-ASCII digits
        ("7+8=15|ans825", None),  # marker without its space
        ("7+8=15|xans 825", None),  # marker must start a step
        ("7+8=15 825", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_marked_answer_correct():
    good = "7+8=15|5+6+1=12|3+4+1=8|ans 825"
    assert marked_answer_correct(good, "825")
    assert marked_answer_correct(good, " 825 ")
    assert not marked_answer_correct(good, "826")
    assert not marked_answer_correct("7+8=15|5+6+1=12|3+4+1=8|ans 82", "825")
    assert not marked_answer_correct("7+8=15|5+6+1=12|3+4+1=8|", "825")
    assert not marked_answer_correct("garbage 825", "825")  # the right number without the marker does not count
    assert marked_answer_correct("ans 0", "0")


def test_write_jsonl_round_trips(tmp_path):
    rows = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "10+20=", "answer": "30"}]
    path = write_jsonl(tmp_path / "sub" / "x.jsonl", rows)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows
