"""Bad input is refused (or skipped and counted) before training, with a message that says where.

Extends tests/test_data.py and tests/test_config.py: prompt-file encodings and shapes, the skip
policy's warnings and counts, impossible config combinations, model paths, and secrets in logs.
"""

from __future__ import annotations

import codecs
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from opd.config import ConfigError, load_config, to_dict
from opd.data import MAX_NAMED_SKIPS, DataError, Prompt, SkippedLine, load_prompts
from opd.secrets import REDACTED, redact

ROOT = Path(__file__).resolve().parents[2]
GOOD = b'{"prompt": "1+2=", "answer": "3"}\n{"prompt": "2+2="}\n'
SECRET = "sk-proj-Zq8c1XwLh0Vb7n2Ty5Rm9Kd4"


def write(tmp_path: Path, content: bytes, name: str = "prompts.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


# -- prompt files: every bad line, both policies ---------------------------------------------------

BAD_LINES = {
    "trailing comma": (b'{"prompt": "1+1=",}', "malformed JSON"),
    "single quotes": (b"{'prompt': '1+1='}", "malformed JSON"),
    "two objects on a line": (b'{"prompt": "1+1="} {"prompt": "2+2="}', "malformed JSON"),
    "other field name": (b'{"text": "1+1=", "answer": "2"}', "no `prompt` field"),
    "field name case": (b'{"Prompt": "1+1="}', "no `prompt` field"),
    "empty prompt": (b'{"prompt": ""}', "`prompt` is empty"),
    "escaped whitespace prompt": (b'{"prompt": "\\t\\n "}', "`prompt` is empty"),
    "number prompt": (b'{"prompt": 12}', r"`prompt` is not a string \(got number\)"),
    "boolean prompt": (b'{"prompt": true}', r"`prompt` is not a string \(got boolean\)"),
    "null prompt": (b'{"prompt": null}', r"`prompt` is not a string \(got null\)"),
    "list prompt": (b'{"prompt": ["1+1="]}', r"`prompt` is not a string \(got array\)"),
    "array line": (b'[{"prompt": "1+1="}]', r"no `prompt` field \(the line is a JSON array, not an object\)"),
    "string line": (b'"1+1="', "no `prompt` field .the line is a JSON string"),
    "number line": (b"42", "no `prompt` field .the line is a JSON number"),
    "null line": (b"null", "no `prompt` field .the line is a JSON null"),
    "latin-1 byte": (b'{"prompt": "caf\xe9="}', r"not UTF-8 \(invalid continuation byte at byte 15\)"),
    "truncated multibyte": (b'{"prompt": "\xe2\x82="}', "not UTF-8"),
    "unpaired surrogate escape": (b'{"prompt": "1+\\ud800="}', "`prompt` is not valid Unicode .unpaired surrogate"),
}


@pytest.mark.parametrize(("line", "reason"), BAD_LINES.values(), ids=BAD_LINES.keys())
def test_fail_policy_names_file_line_and_reason(tmp_path, line, reason):
    # A blank line before the bad one: the number is the physical line, not the prompt count.
    path = write(tmp_path, GOOD + b"\n" + line + b"\n" + b'{"prompt": "3+3="}\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:4: {reason}.*data\.on_error=skip"):
        load_prompts(path, on_error="fail")


@pytest.mark.parametrize(("line", "reason"), BAD_LINES.values(), ids=BAD_LINES.keys())
def test_skip_policy_counts_and_warns_with_file_and_line(tmp_path, line, reason):
    path = write(tmp_path, GOOD + line + b"\n" + b'{"prompt": "3+3="}\n')
    with pytest.warns(SkippedLine, match=rf"{re.escape(str(path))}:3: {reason}") as caught:
        prompts, skipped = load_prompts(path, on_error="skip")
    assert skipped == 1 and len(caught) == 1
    assert [p.text for p in prompts] == ["1+2=", "2+2=", "3+3="]
    assert [(p.index, p.line) for p in prompts] == [(0, 1), (1, 2), (2, 4)]


def test_skip_policy_names_the_first_lines_then_counts_the_rest(tmp_path):
    bad = MAX_NAMED_SKIPS + 5
    path = write(tmp_path, GOOD + b"{bad\n" * bad)
    with pytest.warns(SkippedLine) as caught:
        prompts, skipped = load_prompts(path, on_error="skip")
    assert skipped == bad and len(prompts) == 2
    messages = [str(w.message) for w in caught]
    assert len(messages) == MAX_NAMED_SKIPS + 1
    assert messages[0].startswith(f"{path}:3: malformed JSON")
    assert messages[-1] == f"{path}: {bad} lines skipped in all (data.on_error=skip)"


def test_unknown_policy_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"data\.on_error='ignore'"):
        load_prompts(write(tmp_path, GOOD), on_error="ignore")


# -- prompt files: encodings and line endings that are fine -----------------------------------------


@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_utf8_bom_and_windows_line_endings_are_accepted(tmp_path, on_error):
    content = codecs.BOM_UTF8 + b'{"prompt": "1+2=", "answer": "3"}\r\n\r\n{"prompt": "caf\xc3\xa9 2+2="}\r\n'
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped, nothing to warn about
        prompts, skipped = load_prompts(write(tmp_path, content), on_error=on_error)
    assert skipped == 0
    assert [(p.text, p.answer, p.line) for p in prompts] == [("1+2=", "3", 1), ("café 2+2=", None, 3)]


def test_bom_only_counts_at_the_start_of_the_file(tmp_path):
    path = write(tmp_path, GOOD + codecs.BOM_UTF8 + b'{"prompt": "3+3="}\n')
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:3: malformed JSON"):
        load_prompts(path)


def test_windows_line_endings_keep_line_numbers_and_clean_answers(tmp_path):
    path = write(tmp_path, GOOD.replace(b"\n", b"\r\n") + b'{"prompt": 7}\r\n')
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:3: "):
        load_prompts(path)
    with pytest.warns(SkippedLine, match=rf"{re.escape(str(path))}:3: "):
        prompts, skipped = load_prompts(path, on_error="skip")
    assert skipped == 1 and prompts[0].answer == "3" and not any("\r" in p.text for p in prompts)


def test_utf16_file_says_to_save_as_utf8(tmp_path):
    path = write(tmp_path, '{"prompt": "1+2="}\n'.encode("utf-16"))
    where = re.escape(str(path))
    with pytest.raises(DataError, match=rf"^{where}:1: UTF-16 .*save the file as UTF-8"):
        load_prompts(path, on_error="fail")
    with (
        pytest.warns(SkippedLine, match=rf"^{where}:1: UTF-16"),
        pytest.raises(DataError, match=rf"^{where}: no usable prompts \(2 lines skipped\)"),
    ):
        load_prompts(path, on_error="skip")


@pytest.mark.parametrize("content", [b"", b"\n", b"  \n\t\n\r\n", codecs.BOM_UTF8 + b"\n\n"], ids=repr)
@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_blank_only_file_is_an_error_naming_the_file(tmp_path, content, on_error):
    path = write(tmp_path, content)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: no prompts \(the file is empty"):
        load_prompts(path, on_error=on_error)


def test_file_of_only_bad_lines_reports_the_skip_count(tmp_path):
    path = write(tmp_path, b'{"prompt": ""}\n\n[1]\n')
    with pytest.warns(SkippedLine), pytest.raises(DataError, match=r"no usable prompts \(2 lines skipped\)"):
        load_prompts(path, on_error="skip")


def test_prompt_keeps_its_line_and_other_fields(tmp_path):
    path = write(tmp_path, b'\n{"prompt": "1+1=", "answer": 2, "domain": "math"}\n')
    (p,) = load_prompts(path)[0]
    assert p == Prompt(0, "1+1=", "2", {"domain": "math"}, line=2)
    assert Prompt(0, "x").line == -1


# -- oversized lines and repeated prompts ----------------------------------------------------------


@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_a_line_over_the_size_limit_is_named_without_being_read_whole(tmp_path, monkeypatch, on_error):
    import tracemalloc

    from opd.data import files

    monkeypatch.setattr(files, "MAX_ROW_BYTES", 4096)
    huge = b'{"prompt": "' + b"1+" * 4_000_000 + b'1="}\n'  # 8 MB on one line
    path = write(tmp_path, GOOD + huge + b'{"prompt": "3+3="}\n')
    tracemalloc.start()
    try:
        if on_error == "fail":
            with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: the line is over 4,096 bytes"):
                load_prompts(path, on_error=on_error)
        else:
            with pytest.warns(SkippedLine, match=rf"^{re.escape(str(path))}:3: the line is over 4,096 bytes"):
                prompts, skipped = load_prompts(path, on_error=on_error)
            assert skipped == 1 and [(p.text, p.line) for p in prompts][-1] == ("3+3=", 4)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000  # read in pieces of the limit, never the 8 MB line


def test_a_line_just_within_the_size_limit_is_read(tmp_path, monkeypatch):
    from opd.data import files

    line = b'{"prompt": "1+1="}'
    monkeypatch.setattr(files, "MAX_ROW_BYTES", len(line))
    path = write(tmp_path, line + b"\n" + line.replace(b"1+1", b"2+2"))  # the last line without a newline
    assert [p.line for p in load_prompts(path)[0]] == [1, 2]
    monkeypatch.setattr(files, "MAX_ROW_BYTES", len(line) - 1)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:1: the line is over"):
        load_prompts(path)


def test_repeated_prompts_are_kept_counted_and_the_first_named(tmp_path):
    from opd.data import DuplicatePrompts

    path = write(tmp_path, GOOD + b'{"prompt": "3+3="}\n\n{"prompt": "2+2=", "answer": "4"}\n' + GOOD)
    where = re.escape(str(path))
    with pytest.warns(
        DuplicatePrompts, match=rf"^{where}: repeated prompts: 3 \(the first: {where}:5, the same as {where}:2\); kept"
    ) as caught:
        prompts, _ = load_prompts(path)
    assert len(caught) == 1 and len(prompts) == 6


# -- prompts longer than the context ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from opd.tiny import train_tokenizer

    return train_tokenizer(["1+2=3", "40+17=57"], 40)  # one token per character here


def test_prompt_longer_than_the_context_names_file_and_line_or_is_skipped(tmp_path, tokenizer):
    from opd.data import encode

    path = write(tmp_path, b'{"prompt": "1+2="}\n\n{"prompt": "40+17="}\n')
    prompts, _ = load_prompts(path)
    assert [p.line for p in prompts] == [1, 3]
    encoded, skipped = encode(tokenizer, prompts, 6, str(path))
    assert [len(e.ids) for e in encoded] == [4, 6] and skipped == 0
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:3: prompt is 6 tokens.*limit is 5"):
        encode(tokenizer, prompts, 5, str(path))
    encoded, skipped = encode(tokenizer, prompts, 5, str(path), on_error="skip")
    assert [e.prompt.line for e in encoded] == [1] and skipped == 1
    with pytest.raises(DataError, match="no prompt fits"):
        encode(tokenizer, prompts, 3, str(path), on_error="skip")


# -- config: rejected before Ray, naming the key ----------------------------------------------------


def test_unknown_key_fails_fast_in_launch_before_ray():
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "launch.py", "learner.lrr=1"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    elapsed = time.perf_counter() - t0
    assert proc.returncode != 0 and proc.stdout == ""
    assert "learner.lrr" in proc.stderr and "Did you mean: 'lr'" in proc.stderr
    assert "ray" not in proc.stderr.lower()
    assert elapsed < 5, f"took {elapsed:.1f}s"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["learner.lr=abc"], r"^learner\.lr: Value 'abc'.*Float"),
        (["loss.top_k=abc"], r"^loss\.top_k: .*Integer"),
        (["data.on_error=ignore"], r"^data\.on_error: .*'skip', 'fail'"),
        (["teachers.0.backend=hf"], r"^teachers\[0\]\.backend"),
        (["teachers.0.nope=1"], r"^teachers\[0\]\.nope"),
        (["loss.top_k=0"], r"^loss\.top_k=0 must be >= 1"),
        (["faults.max_nonfinite_steps=0"], r"^faults\.max_nonfinite_steps=0 must be >= 1"),
        (["learner.num_shards=3"], r"256 samples .*learner\.num_shards=3"),
        (["learner.num_shards=3", "learner.mini_batches=1"], r"learner\.mini_batches=1 x learner\.num_shards=3"),
        (["rollout.max_new_tokens=128"], r"rollout\.max_new_tokens=128 .*rollout\.engine\.max_model_len=128"),
        (["pipeline.mode=async", "pipeline.depth=0"], r"pipeline\.depth=0"),
        (["pipeline.mode=async", "pipeline.depth=2"], r"depth=2 .*8 policy versions.*buffer\.max_staleness=4"),
    ],
)
def test_bad_or_impossible_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("default", overrides)


def test_possible_neighbours_of_the_impossible_combinations_are_accepted():
    load_config("default", ["learner.num_shards=4"])  # 256 samples = 4 mini-batches x 4 shards x 16
    load_config("default", ["rollout.max_new_tokens=127"])  # one token left for the prompt
    load_config("default", ["loss.top_k=64"])  # vLLM teachers are started with max_logprobs >= loss.top_k
    load_config("default", ["pipeline.mode=async", "pipeline.depth=2", "buffer.max_staleness=8"])


def test_top_k_larger_than_the_vocabulary_is_refused_before_actors_start(tokenizer):
    from opd.compat import IncompatibleModels, check_top_k

    check_top_k(len(tokenizer), len(tokenizer))
    with pytest.raises(IncompatibleModels, match=rf"loss\.top_k={len(tokenizer) + 1} .*{len(tokenizer)} tokens"):
        check_top_k(len(tokenizer) + 1, len(tokenizer))


@pytest.mark.parametrize("key", ["student.model", "teachers.0.model"])
def test_model_path_that_is_not_a_model_names_the_key(tmp_path, key):
    (tmp_path / "tokenizer.json").write_text("{}")  # looks like a model dir, but no config.json
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}={re.escape(str(tmp_path))}: .*config\.json"):
        load_config("default", [f"{key}={tmp_path}"])


def test_prompt_file_given_as_a_model_is_not_a_model(tmp_path):
    path = write(tmp_path, GOOD)
    with pytest.raises(ConfigError, match=r"^student\.model=.*config\.json"):
        load_config("default", [f"student.model={path}"])


def test_a_secret_passed_as_a_config_key_is_not_echoed():
    proc = subprocess.run(
        [sys.executable, "launch.py", f"wandb.api_key={SECRET}"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0 and "wandb.api_key" in proc.stderr
    assert SECRET not in proc.stderr + proc.stdout


# -- secrets never reach logs or W&B ---------------------------------------------------------------


def test_redact_nested_config_lists_of_dicts_and_env_like_fields():
    PATH = "/usr/local/bin:/usr/bin"
    config = {
        "wandb": {"project": "opd", "api_key": SECRET, "apiKey": SECRET},
        "teachers": [
            {"name": "local", "model": "org/m", "license": "mit"},
            {"name": "remote", "model": "api", "api_key": SECRET, "headers": {"Authorization": f"Bearer {SECRET}"}},
        ],
        "env": {"HF_TOKEN": "hf_x", "OPENAI_API_KEY": "x", "SERVICE_CREDS": SECRET, "PATH": PATH},
        "runtime_env": {"env_vars": ["WANDB_API_KEY=abc123", "TOKENIZERS_PARALLELISM=false"]},
        "ray": {"address": "ray://admin:hunter2@head:10001"},
        "secrets": {"anything": "here"},
        "rollout": {"max_new_tokens": 48},
        "judge": {"max_tokens": 8},
        "loss": {"top_k": 16},
        "student": {"model": "hf_internal/student"},  # a hub id, not a token
    }
    snapshot = repr(config)
    out = redact(config)
    assert repr(config) == snapshot, "redact must not modify its input"
    assert SECRET not in repr(out) and "hunter2" not in repr(out) and "abc123" not in repr(out)
    assert out["wandb"] == {"project": "opd", "api_key": REDACTED, "apiKey": REDACTED}
    assert out["teachers"][0] == config["teachers"][0]
    assert out["teachers"][1]["api_key"] == REDACTED and out["teachers"][1]["headers"]["Authorization"] == REDACTED
    assert out["env"] == {"HF_TOKEN": REDACTED, "OPENAI_API_KEY": REDACTED, "SERVICE_CREDS": REDACTED, "PATH": PATH}
    assert out["runtime_env"]["env_vars"] == [f"WANDB_API_KEY={REDACTED}", "TOKENIZERS_PARALLELISM=false"]
    assert out["ray"]["address"] == f"ray://{REDACTED}@head:10001"  # where stays, the credentials go
    assert out["secrets"] == REDACTED
    # Settings that merely contain "token" or "k" in their name stay readable in W&B.
    assert out["rollout"] == {"max_new_tokens": 48} and out["judge"] == {"max_tokens": 8}
    assert out["loss"] == {"top_k": 16} and out["student"] == {"model": "hf_internal/student"}


def test_redact_keeps_every_value_of_a_real_config():
    config = to_dict(load_config("default"))
    assert redact(config) == config
