import copy
import json
import re

import pytest

from opd.config import ConfigError, DataConfig, load_config
from opd.data import DataError, Prompt, SkippedLine, encode, final_answer, last_number_correct, load_prompts


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


# -- conversations: a list of {role, content} messages ---------------------------------------------------


def test_conversation_keeps_its_messages_and_shows_the_last_user_turn(tmp_path):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+2="}]
    chat += [{"role": "assistant", "content": "3"}, {"role": "user", "content": "and 2+2?", "name": "extra"}]
    (p,), _ = load_prompts(write(tmp_path, json.dumps({"prompt": chat, "answer": 4}).encode() + b"\n"))
    assert p.text == "and 2+2?" and p.answer == "4"
    assert p.messages == tuple({"role": m["role"], "content": m["content"]} for m in chat)
    assert p.conversation == p.messages
    assert Prompt(0, "1+2=").conversation == ({"role": "user", "content": "1+2="},)


@pytest.mark.parametrize(
    ("prompt", "reason"),
    [
        ([], "`prompt` is an empty conversation"),
        (["1+1="], r"`prompt` is not a string \(got array\) or a list of messages \(item 1 is a string\)"),
        ([{"role": "human", "content": "hi"}], r"`prompt` message 1 has role 'human'; expected one of system, "),
        ([{"content": "hi"}], "`prompt` message 1 has role None"),
        ([{"role": "user", "content": None}], r"`prompt` message 1 \(user\) content is not a string \(got null\)"),
        ([{"role": "user", "content": [{"type": "text"}]}], r"content is not a string \(got array\)"),
        ([{"role": "system", "content": "Be brief."}], "`prompt` conversation has no user message"),
        ([{"role": "user", "content": "1+1="}, {"role": "user", "content": " "}], "last user message is empty"),
        ([{"role": "user", "content": "1+\ud800"}], r"message 1 \(user\) is not valid Unicode"),
    ],
)
def test_bad_conversation_names_file_line_and_message(tmp_path, prompt, reason):
    path = write(tmp_path, GOOD + json.dumps({"prompt": prompt}).encode() + b"\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:3: .*{reason}"):
        load_prompts(path)
    with pytest.warns(SkippedLine, match=reason):
        assert load_prompts(path, on_error="skip")[1] == 1


def test_prompt_and_answer_keys(tmp_path):
    path = write(tmp_path, b'{"messages": [{"role": "user", "content": "1+2="}], "solution": 3, "prompt": "x"}\n')
    (p,), _ = load_prompts(path, prompt_key="messages", answer_key="solution")
    assert (p.text, p.answer, p.fields) == ("1+2=", "3", {"prompt": "x"})
    with pytest.raises(DataError, match=r":1: no `question` field"):
        load_prompts(path, prompt_key="question")


# -- chat templates: rendering and tokenizing on the student side ---------------------------------------

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level tokenizer that adds a BOS to whatever it encodes, as Llama's and Gemma's do."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from opd.tiny import EOS, PAD, train_tokenizer

    backend = train_tokenizer(["1+2=3", "<|im_start|>user\n"], 300).backend_tokenizer
    backend.add_special_tokens(["<s>"])
    bos = ("<s>", backend.token_to_id("<s>"))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[bos])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token=EOS, pad_token=PAD)


def chat_tokenizer(tokenizer, template: str | None):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


def encode_one(tokenizer, prompt: Prompt, **data) -> list[int]:
    (e,), _ = encode(tokenizer, [prompt], 1000, "p.jsonl", data=DataConfig(**data))
    return e.ids


CONVERSATION = ({"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"})
CONVERSATION += ({"role": "user", "content": "2+2="},)


def test_auto_without_a_tokenizer_template_is_todays_raw_text(tokenizer):
    assert encode_one(tokenizer, Prompt(0, "1+2=")) == tokenizer.encode("1+2=")
    assert encode_one(tokenizer, Prompt(0, "1+2="), chat_template="none") == tokenizer.encode("1+2=")


def test_auto_renders_with_the_tokenizer_template_and_generation_prompt(tokenizer):
    tok = chat_tokenizer(tokenizer, CHATML)
    ids = encode_one(tok, Prompt(0, "1+2="))
    assert tok.decode(ids) == "<|im_start|>user\n1+2=<|im_end|>\n<|im_start|>assistant\n"
    assert tok.bos_token_id not in ids  # the template writes no BOS, so none is added (as apply_chat_template)
    messages = list(CONVERSATION)
    assert (
        encode_one(tok, Prompt(0, "2+2=", messages=CONVERSATION))
        == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    )
    assert encode_one(tok, Prompt(0, "1+2="), chat_template="none") == tokenizer.encode("1+2=")


def test_a_bos_the_template_writes_is_not_doubled(tokenizer):
    tok = chat_tokenizer(tokenizer, "{{ bos_token }}" + CHATML)
    ids = encode_one(tok, Prompt(0, "1+2="))
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    messages = [{"role": "user", "content": "1+2="}]
    assert ids == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]


def test_system_prompt_is_added_only_when_the_conversation_has_none(tokenizer):
    tok = chat_tokenizer(tokenizer, CHATML)
    text = tok.decode(encode_one(tok, Prompt(0, "1+2="), system_prompt="Be brief."))
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1+2=")
    own = ({"role": "system", "content": "Think."}, {"role": "user", "content": "1+2="})
    text = tok.decode(encode_one(tok, Prompt(0, "1+2=", messages=own), system_prompt="Be brief."))
    assert "Think." in text and "Be brief." not in text


def test_chat_template_kwargs_reach_the_template(tokenizer):
    tok = chat_tokenizer(tokenizer, CHATML)
    text = tok.decode(encode_one(tok, Prompt(0, "1+2="), chat_template_kwargs={"enable_thinking": False}))
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert "<think>" not in tok.decode(
        encode_one(tok, Prompt(0, "1+2="), chat_template_kwargs={"enable_thinking": True})
    )


def test_jinja_file_template_overrides_the_tokenizer(tokenizer, tmp_path):
    path = tmp_path / "plain.jinja"
    path.write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:")
    for tok in (tokenizer, chat_tokenizer(tokenizer, CHATML)):
        ids = encode_one(tok, Prompt(0, "2+2=", messages=CONVERSATION), chat_template=str(path))
        assert tok.decode(ids) == "user: 1+2=\nassistant: 3\nuser: 2+2=\nassistant:"


def test_conversation_without_a_template_names_the_key_and_row(tokenizer, tmp_path):
    path = write(tmp_path, b'\n\n{"chat": [{"role": "user", "content": "1+2="}]}\n')
    prompts, _ = load_prompts(path, prompt_key="chat")
    for setting, why in (("none", "data.chat_template=none"), ("auto", "the student tokenizer has no chat template")):
        with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: `chat` is a list of messages, but .*{why}"):
            encode(tokenizer, prompts, 100, str(path), data=DataConfig(prompt_key="chat", chat_template=setting))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"system_prompt": "Hi."}, r"data\.system_prompt is set, but .*auto and the student tokenizer has no chat"),
        ({"chat_template_kwargs": {"enable_thinking": False}}, r"data\.chat_template_kwargs is set, but .*no chat"),
        ({"chat_template": "missing.jinja"}, r"data\.chat_template=missing\.jinja: no such file"),
    ],
)
def test_chat_settings_that_cannot_apply_are_refused(tokenizer, data, message):
    with pytest.raises(DataError, match=message):
        encode(tokenizer, [Prompt(0, "1+2=")], 100, "p.jsonl", data=DataConfig(**data))


def test_config_refuses_chat_settings_with_no_template_to_take_them():
    with pytest.raises(ConfigError, match=r"^data\.system_prompt needs a chat template, but data\.chat_template=none"):
        load_config("default", ["data.chat_template=none", "data.system_prompt=Be brief."])
    with pytest.raises(ConfigError, match=r"^data\.chat_template_kwargs needs a chat template"):
        load_config("default", ["data.chat_template=none", "data.chat_template_kwargs.enable_thinking=false"])
    cfg = load_config("default", ["data.system_prompt=Be brief.", "data.chat_template_kwargs.enable_thinking=false"])
    assert cfg.data.chat_template_kwargs == {"enable_thinking": False}


def test_template_errors_are_data_errors(tokenizer, tmp_path):
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m.content }}")
    with pytest.raises(DataError, match=rf"chat_template={re.escape(str(broken))}: .*'endfor'"):
        encode(tokenizer, [Prompt(0, "1+2=")], 100, "p.jsonl", data=DataConfig(chat_template=str(broken)))
    strict = tmp_path / "strict.jinja"
    strict.write_text(
        "{% if messages|length > 1 %}{{ raise_exception('one turn only') }}{% endif %}{{ messages[0].content }}"
    )
    with pytest.raises(DataError, match=r"p\.jsonl: prompt #1: the chat template refused `prompt`: one turn only"):
        encode(
            tokenizer,
            [Prompt(0, "2+2=", messages=CONVERSATION)],
            100,
            "p.jsonl",
            data=DataConfig(chat_template=str(strict)),
        )
