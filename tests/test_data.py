import pytest

from opd.data import DataError, final_answer, last_number_correct, load_prompts


def write(tmp_path, content: bytes):
    path = tmp_path / "p.jsonl"
    path.write_bytes(content)
    return path


GOOD = b'{"prompt": "1+2=", "answer": "3"}\n{"prompt": "2+2="}\n'


def test_reads_prompts_and_optional_answers(tmp_path):
    prompts, skipped = load_prompts(write(tmp_path, GOOD + b"\n"))
    assert skipped == 0
    assert [(p.index, p.text, p.answer) for p in prompts] == [(0, "1+2=", "3"), (1, "2+2=", None)]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b'{"prompt": "1+', "malformed JSON"),
        (b'{"question": "x"}', "no `prompt`"),
        (b'{"prompt": "   "}', "empty"),
        (b'{"prompt": 7}', "not a string"),
        (b'["prompt"]', "no `prompt`"),
        (b'{"prompt": "caf\xe9"}', "not UTF-8"),
    ],
)
def test_bad_line_fails_with_file_and_line(tmp_path, line, reason):
    path = write(tmp_path, GOOD + line + b"\n")
    with pytest.raises(DataError, match=rf"{path}:3: .*{reason}"):
        load_prompts(path)


def test_skip_policy_counts_skipped_lines(tmp_path):
    path = write(tmp_path, GOOD + b"{bad\n" + b'{"prompt": ""}\n' + b'{"prompt": "5+5="}\n')
    prompts, skipped = load_prompts(path, on_error="skip")
    assert skipped == 2
    assert [p.text for p in prompts] == ["1+2=", "2+2=", "5+5="]
    assert [p.index for p in prompts] == [0, 1, 2]


def test_file_with_nothing_usable_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no usable prompts"):
        load_prompts(write(tmp_path, b"{bad\n"), on_error="skip")


def test_final_answer_is_the_last_number():
    assert final_answer("7+8=15 c1|ans 825") == "825"
    assert final_answer("no digits") is None
    assert last_number_correct("... so 1081", "1081") and not last_number_correct("... so 1080", "1081")
    assert not last_number_correct("1081", None)
