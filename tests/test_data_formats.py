"""Prompt files in every format: JSONL, a JSON array, Parquet, and `datasets` save_to_disk directories.

Each reads to the same prompts, names a bad row as `file row N` (JSONL: `file:line`, tests/test_data.py and
tests/faults/test_bad_input.py), or skips and counts it with on_error=skip; config validation accepts them.
"""

from __future__ import annotations

import json
import re

import pytest

from opd.config import ConfigError, load_config
from opd.data import DataError, DuplicatePrompts, SkippedLine, load_prompts

ROWS = [{"prompt": "1+2=", "answer": "3", "domain": "math"}, {"prompt": "2+2=", "answer": None, "domain": "chat"}]
CHATS = [
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+2="}]},
    {
        "prompt": [
            {"role": "user", "content": "2+2="},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "and 3+3?"},
        ]
    },
]


def write_json(path, rows):
    path.write_text(json.dumps(rows))
    return path


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_dataset(path, rows):
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


WRITERS = {
    "jsonl": ("p.jsonl", write_jsonl),
    "json": ("p.json", write_json),
    "parquet": ("p.parquet", write_parquet),
    "datasets": ("saved", write_dataset),
}


def where(path, fmt: str, n: int) -> str:
    return re.escape(f"{path}:{n}" if fmt == "jsonl" else f"{path} row {n}")


@pytest.mark.parametrize("fmt", WRITERS)
def test_every_format_reads_the_same_prompts(tmp_path, fmt):
    name, writer = WRITERS[fmt]
    prompts, skipped = load_prompts(writer(tmp_path / name, ROWS))
    assert skipped == 0
    assert [(p.index, p.line, p.text, p.answer, p.fields) for p in prompts] == [
        (0, 1, "1+2=", "3", {"domain": "math"}),
        (1, 2, "2+2=", None, {"domain": "chat"}),
    ]
    assert prompts[1].where == f"{tmp_path / name}{':2' if fmt == 'jsonl' else ' row 2'}"


@pytest.mark.parametrize("fmt", WRITERS)
def test_every_format_reads_conversations(tmp_path, fmt):
    name, writer = WRITERS[fmt]
    prompts, _ = load_prompts(writer(tmp_path / name, CHATS))
    assert [p.messages for p in prompts] == [tuple(r["prompt"]) for r in CHATS]
    assert [p.text for p in prompts] == ["1+2=", "and 3+3?"]  # the last user turn


@pytest.mark.parametrize("fmt", WRITERS)
def test_prompt_and_answer_keys_name_the_columns(tmp_path, fmt):
    name, writer = WRITERS[fmt]
    rows = [{"question": "1+2=", "solution": 3, "prompt": "not this"}]
    (p,), _ = load_prompts(writer(tmp_path / name, rows), prompt_key="question", answer_key="solution")
    assert (p.text, p.answer, p.fields) == ("1+2=", "3", {"prompt": "not this"})


@pytest.mark.parametrize("fmt", WRITERS)
def test_bad_row_is_named_or_skipped_and_counted(tmp_path, fmt):
    name, writer = WRITERS[fmt]
    path = writer(tmp_path / name, [*ROWS, {"prompt": "   ", "answer": None, "domain": "x"}])
    with pytest.raises(DataError, match=rf"^{where(path, fmt, 3)}: `prompt` is empty .*data\.on_error=skip"):
        load_prompts(path)
    with pytest.warns(SkippedLine, match=rf"^{where(path, fmt, 3)}: `prompt` is empty; skipped"):
        prompts, skipped = load_prompts(path, on_error="skip")
    assert skipped == 1 and [p.text for p in prompts] == ["1+2=", "2+2="]


@pytest.mark.parametrize("fmt", ["json", "parquet", "datasets"])
def test_missing_prompt_column_names_the_key_and_row(tmp_path, fmt):
    name, writer = WRITERS[fmt]
    path = writer(tmp_path / name, [{"text": "1+2="}])
    with pytest.raises(DataError, match=rf"^{where(path, fmt, 1)}: no `question` field"):
        load_prompts(path, prompt_key="question")


@pytest.mark.parametrize("fmt", ["json", "parquet", "datasets"])
def test_a_prompt_over_the_size_limit_is_named_by_file_and_row(tmp_path, monkeypatch, fmt):
    from opd.data import files

    monkeypatch.setattr(files, "MAX_ROW_BYTES", 100)
    name, writer = WRITERS[fmt]
    path = writer(tmp_path / name, [*ROWS, {"prompt": "1+" * 50 + "1=", "answer": None, "domain": "x"}])
    with pytest.raises(DataError, match=rf"^{where(path, fmt, 3)}: `prompt` is over 100 characters"):
        load_prompts(path)
    with pytest.warns(SkippedLine, match=rf"^{where(path, fmt, 3)}: `prompt` is over 100 characters"):
        assert load_prompts(path, on_error="skip")[1] == 1


def test_a_conversation_over_the_size_limit_counts_every_message(tmp_path, monkeypatch):
    from opd.data import files

    monkeypatch.setattr(files, "MAX_ROW_BYTES", 100)
    turns = [{"role": "system", "content": "x" * 60}, {"role": "user", "content": "y" * 44 + "1+2="}]  # 108
    path = write_parquet(tmp_path / "p.parquet", [*CHATS, {"prompt": turns}, {"prompt": turns[-1:]}])
    with pytest.raises(DataError, match=rf"^{where(path, 'parquet', 3)}: `prompt` is over 100 characters"):
        load_prompts(path)
    turns[0]["content"] = "x" * 40
    assert len(load_prompts(write_parquet(tmp_path / "q.parquet", [{"prompt": turns}]))[0]) == 1


@pytest.mark.parametrize("fmt", WRITERS)
def test_repeated_prompts_are_named_in_every_format(tmp_path, fmt):
    name, writer = WRITERS[fmt]
    path = writer(tmp_path / name, [*ROWS, ROWS[0]])
    first = rf"the first: {where(path, fmt, 3)}, the same as {where(path, fmt, 1)}"
    with pytest.warns(DuplicatePrompts, match=rf"repeated prompts: 1 \({first}\)"):
        assert len(load_prompts(path)[0]) == 3


def test_json_rows_must_be_objects_in_an_array(tmp_path):
    path = write_json(tmp_path / "p.json", [{"prompt": "1+2="}, ["1+1="]])
    with pytest.raises(DataError, match=rf"^{where(path, 'json', 2)}: no `prompt` field \(the row is a JSON array"):
        load_prompts(path)
    with pytest.raises(DataError, match=r"holds a JSON array of row objects \(got object\)"):
        load_prompts(write_json(tmp_path / "o.json", {"prompt": "1+2="}))


def test_malformed_json_file_is_an_error_even_when_skipping(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('[{"prompt": "1+2="},]')
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: malformed JSON .*line 1 column"):
        load_prompts(path, on_error="skip")


def test_json_lines_named_json_gets_a_hint(tmp_path):
    path = write_jsonl(tmp_path / "p.json", ROWS)
    with pytest.raises(DataError, match=r"Extra data.*name the file \.jsonl"):
        load_prompts(path)


def test_file_that_is_not_parquet_is_an_error(tmp_path):
    path = tmp_path / "p.parquet"
    path.write_text('{"prompt": "1+2="}\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: not a readable Parquet file"):
        load_prompts(path)


def test_empty_table_has_no_prompts(tmp_path):
    with pytest.raises(DataError, match=r"no prompts \(the file has no rows\)"):
        load_prompts(write_json(tmp_path / "p.json", []))


@pytest.fixture
def dataset_dict(tmp_path):
    import datasets

    path = tmp_path / "dd"
    datasets.DatasetDict(
        train=datasets.Dataset.from_list([{"prompt": "1+2="}, {"prompt": "2+2="}]),
        test=datasets.Dataset.from_list([{"prompt": "3+3="}, {"prompt": ""}]),
    ).save_to_disk(str(path))
    return path


def test_dataset_dict_split_is_named_after_a_colon(dataset_dict):
    assert [p.text for p in load_prompts(f"{dataset_dict}:train")[0]] == ["1+2=", "2+2="]
    with pytest.raises(DataError, match=rf"^{re.escape(str(dataset_dict))}:test row 2: `prompt` is empty"):
        load_prompts(f"{dataset_dict}:test")


def test_dataset_dict_without_or_with_a_wrong_split_lists_its_splits(dataset_dict, tmp_path):
    with pytest.raises(DataError, match=r"is a DatasetDict with splits train, test; name one as .*:SPLIT"):
        load_prompts(dataset_dict)
    with pytest.raises(DataError, match=r"has no split 'validation' \(splits: train, test\)"):
        load_prompts(f"{dataset_dict}:validation")
    saved = write_dataset(tmp_path / "ds", ROWS)
    with pytest.raises(DataError, match=r"is a Dataset with no splits; drop `:train`"):
        load_prompts(f"{saved}:train")


@pytest.mark.parametrize(
    ("name", "reason"),
    [("p.csv", r"unsupported file type '\.csv'"), ("nope.jsonl", "no such file"), ("dir", "not a saved datasets")],
)
def test_unreadable_sources_are_refused_by_name(tmp_path, name, reason):
    path = tmp_path / name
    if name == "dir":
        path.mkdir()
    elif name.endswith(".csv"):
        path.write_text("prompt\n1+2=\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: {reason}"):
        load_prompts(path)


@pytest.mark.parametrize("fmt", ["json", "parquet", "datasets"])
def test_config_accepts_every_format(tmp_path, fmt):
    name, writer = WRITERS[fmt]
    path = writer(tmp_path / name, ROWS)
    cfg = load_config("default", [f"data.train={path}", f"data.eval={path}"])
    assert cfg.data.train == str(path)


def test_config_names_the_key_for_a_bad_source(dataset_dict, tmp_path):
    load_config("default", [f"data.eval={dataset_dict}:test"])
    with pytest.raises(ConfigError, match=r"^data\.train=.*: is a DatasetDict with splits train, test"):
        load_config("default", [f"data.train={dataset_dict}"])
    (tmp_path / "p.csv").touch()
    with pytest.raises(ConfigError, match=r"^data\.eval=.*p\.csv: unsupported file type"):
        load_config("default", [f"data.eval={tmp_path / 'p.csv'}"])
    with pytest.raises(ConfigError, match=r"^data\.chat_template=no/such\.jinja: no such file"):
        load_config("default", ["data.chat_template=no/such.jinja"])
