"""Teachers read the conversation their own way: the student's ids for a teacher with its tokenizer, the teacher's
own chat template for one with another (opd/teachers/prompts.py), on every path a prompt reaches a teacher.

Tiny tokenizers with two different chat templates and tiny GPT-2 teachers run in-process (`TeacherWorker` with the
transformers backend); the pool's calls go straight to them, without Ray.
"""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest

from opd.buffer.sample import Sample
from opd.config import DataConfig, OPDConfig
from opd.data import Encoded, Prompt, encode
from opd.teachers.align import TokenBridge
from opd.teachers.feedback import Feedback, prompts_of
from opd.teachers.pool import TeacherPool
from opd.teachers.prompts import TeacherPrompts
from opd.teachers.worker import TeacherWorker

STUDENT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEACHER_TEMPLATE = (
    "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% if think is defined and think %} <think>{% endif %}{% endif %}"
)
CONVERSATION = (
    {"role": "user", "content": "What is 12+34?"},
    {"role": "assistant", "content": "46"},
    {"role": "user", "content": "And 46+21?"},
)
PROMPT = Prompt(0, "And 46+21?", "67", messages=CONVERSATION)
SYSTEM = "Add the numbers."


@pytest.fixture(scope="module")
def tokenizers():
    """(student, teacher): byte-level BPE of different vocabularies (single digits vs merged) and templates."""
    from opd.tiny import train_tokenizer

    corpus = [f"What is {a}+{b}? And {b}+{a}? {a + b} user assistant system" for a in range(0, 99, 7) for b in (3, 21)]
    student, teacher = train_tokenizer(corpus, 300), train_tokenizer(corpus, 400, split_digits=False)
    student.chat_template, teacher.chat_template = STUDENT_TEMPLATE, TEACHER_TEMPLATE
    return student, teacher


def own_rendering(tokenizer, messages, **kwargs) -> list[int]:
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True, **kwargs)[
        "input_ids"
    ]


def student_ids(student, prompt: Prompt, data: DataConfig) -> list[int]:
    (e,), _ = encode(student, [prompt], 1000, "p.jsonl", data=data)
    return e.ids


def test_a_teacher_with_another_tokenizer_renders_the_messages_with_its_own_template(tokenizers):
    student, teacher = tokenizers
    data = DataConfig(system_prompt=SYSTEM, chat_template_kwargs={"think": True})
    prompts = TeacherPrompts(TokenBridge(student, teacher), data)
    ids = prompts.ids(student_ids(student, PROMPT, data), PROMPT)
    system = ({"role": "system", "content": SYSTEM},)
    assert ids == own_rendering(teacher, system + CONVERSATION, think=True)
    assert teacher.decode(ids).startswith("[system] Add the numbers.\n[user] What is 12+34?\n")
    assert teacher.decode(ids).endswith("[user] And 46+21?\n[assistant] <think>")
    # not the student's chat markup re-tokenized
    assert "<|im_start|>" in student.decode(student_ids(student, PROMPT, data))
    assert "<|im_start|>" not in teacher.decode(ids)


def test_a_teacher_with_the_students_tokenizer_scores_the_students_ids(tokenizers):
    student, _ = tokenizers
    same = copy.deepcopy(student)
    same.chat_template = TEACHER_TEMPLATE  # even with a template of its own: the ids the student saw
    data = DataConfig(system_prompt=SYSTEM)
    ids = student_ids(student, PROMPT, data)
    assert TeacherPrompts(TokenBridge(student, same), data).ids(ids, PROMPT) == ids
    assert ids == own_rendering(student, ({"role": "system", "content": SYSTEM}, *CONVERSATION))


def test_each_conversation_is_rendered_once(tokenizers, monkeypatch):
    student, teacher = tokenizers
    prompts = TeacherPrompts(TokenBridge(student, teacher), DataConfig())
    calls = []
    render = prompts.format.ids
    monkeypatch.setattr(prompts.format, "ids", lambda p, system=True: calls.append(p) or render(p, system))
    ids = student_ids(student, PROMPT, DataConfig())
    first = prompts.ids(ids, PROMPT)
    # another epoch, or the same conversation in another set (other index): the rendering is reused
    assert prompts.ids(ids, PROMPT) == first and prompts.ids(ids, Prompt(7, PROMPT.text, messages=CONVERSATION))
    other = Prompt(1, "What is 12+34?")
    assert prompts.ids(student_ids(student, other, DataConfig()), other) == own_rendering(teacher, other.conversation)
    assert calls == [PROMPT, other]


def test_raw_text_for_a_teacher_without_a_template_and_for_everyone_with_none(tokenizers):
    student, teacher = tokenizers
    plain = copy.deepcopy(teacher)
    plain.chat_template = None
    data = DataConfig(system_prompt=SYSTEM)
    # no template of its own: the last user turn as plain text (nothing can take the system prompt)
    raw = TeacherPrompts(TokenBridge(student, plain), data)
    assert raw.ids(student_ids(student, PROMPT, data), PROMPT) == plain.encode("And 46+21?")
    # data.chat_template=none: raw text for the student and every teacher
    none = DataConfig(chat_template="none")
    flat = Prompt(0, "What is 12+34?")
    prompts = TeacherPrompts(TokenBridge(student, teacher), none)
    assert prompts.ids(student_ids(student, flat, none), flat) == teacher.encode("What is 12+34?")


def test_a_rubric_is_one_user_turn_without_the_system_prompt(tokenizers):
    student, teacher = tokenizers
    prompts = TeacherPrompts(TokenBridge(student, teacher), DataConfig(system_prompt=SYSTEM))
    rubric = "Task: 1+2= Response: 3 Score (0-10):"
    assert prompts.user_turn(rubric) == own_rendering(teacher, [{"role": "user", "content": rubric}])


# -- every path on in-process workers -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tokenizers, tmp_path_factory):
    """A student tokenizer, a teacher with the student's tokenizer and one with its own (GPT-2, 1 layer)."""
    from opd.tiny import TinySpec, build_model, save_checkpoint

    student, teacher = tokenizers
    root = tmp_path_factory.mktemp("prompts")
    spec = TinySpec(layers=1, hidden=32, heads=1, intermediate=64)
    student.save_pretrained(root / "student")
    return {
        "student": root / "student",
        "same": save_checkpoint(build_model(student, spec, seed=1, arch="gpt2"), student, root / "same"),
        "other": save_checkpoint(build_model(teacher, spec, seed=2, arch="gpt2"), teacher, root / "other"),
    }


class Spy:
    """Records the teacher-token prompts a worker's model is asked to score or continue."""

    def __init__(self, worker: TeacherWorker) -> None:
        self.scored, self.generated = [], []
        score, generate = worker._score, worker._generate
        worker._score = lambda p, r, k: self.scored.append(p) or score(p, r, k)
        worker._generate = lambda p, *args: self.generated.append(p) or generate(p, *args)


def in_process_pool(workers: dict[str, TeacherWorker]) -> TeacherPool:
    """A `TeacherPool` whose teachers are the given workers, called directly (one replica each, no Ray)."""
    pool = TeacherPool.__new__(TeacherPool)
    pool.lock, pool.dropped, pool.names = threading.RLock(), [], list(workers)
    pool.default, pool.weights, pool.rule, pool.vocab_size = pool.names[0], dict.fromkeys(workers, 1.0), None, 0
    pool._submit = lambda name, method, columns, *args: [getattr(workers[name], method)(*columns, *args)]
    pool._wait = lambda name, refs, resubmit: [x for part in refs for x in part]
    return pool


@pytest.fixture(scope="module")
def stack(checkpoints, tokenizers):
    data = DataConfig(system_prompt=SYSTEM)
    student = str(checkpoints["student"])
    workers = {
        name: TeacherWorker(str(checkpoints[name]), "transformers", None, 1.0, 0, student, 4, data)
        for name in ("other", "same")
    }
    (encoded,), _ = encode(tokenizers[0], [PROMPT], 1000, "p.jsonl", data=data)
    expected = {
        "other": own_rendering(tokenizers[1], ({"role": "system", "content": SYSTEM}, *CONVERSATION)),
        "same": encoded.ids,
    }
    return workers, encoded, expected, data


def test_scoring_reads_each_teachers_rendering_and_returns_student_positions(stack, tokenizers):
    workers, encoded, expected, _ = stack
    spies = {name: Spy(w) for name, w in workers.items()}
    pool = in_process_pool(workers)
    response = [*tokenizers[0].encode(" 67"), tokenizers[0].eos_token_id]
    samples = [Sample(np.asarray(encoded.ids), np.asarray(response), np.zeros(len(response), np.float32), 0, 0)]
    pool.rule = lambda signals, weights, **_: next(iter(signals.values()))
    pool.score(samples, 4, prompts_of(samples, {0: encoded}))
    assert spies["other"].scored == [[expected["other"]]] and spies["same"].scored == [[expected["same"]]]
    assert samples[0].teacher_logprobs.shape == (len(response),)


def test_offline_generation_best_of_answers_and_corrections_use_each_teachers_rendering(stack, tokenizers):
    workers, encoded, expected, _ = stack
    pool = in_process_pool(workers)
    for name in workers:
        spy = Spy(workers[name])
        pool.default = name
        (pairs,) = pool.generate([encoded.ids], 1, 3, 0.0, None, [encoded.prompt])
        assert spy.generated == [[expected[name]]] and len(pairs) == 1
        (text,) = pool.answer(name, [encoded], 3, 0.0)
        assert spy.generated[-1] == [expected[name]] and isinstance(text, str)
        prefix = tokenizers[0].encode(" 6")
        (cont,) = pool.correct([name], [encoded.ids], [prefix], [3], 0.0, 0, [encoded.prompt])
        bridge = workers[name].bridge
        assert spy.generated[-1] == [bridge.prefix_for_teacher(expected[name], prefix)] and len(cont) <= 3


def test_feedback_sends_best_of_answers_and_rubrics_in_each_teachers_template(stack, tokenizers):
    workers, encoded, expected, _ = stack
    student, teacher = tokenizers
    spies = {name: Spy(w) for name, w in workers.items()}
    asked = []
    complete = workers["other"].complete
    workers["other"].complete = lambda texts, *args: asked.extend(texts) or complete(texts, *args)
    cfg = OPDConfig()
    cfg.judge.kind, cfg.judge.teacher, cfg.judge.rubric = "rubric", "other", "Task: {prompt} Answer: {response}"
    cfg.rollout.max_new_tokens = 3
    feedback = Feedback(cfg, in_process_pool(workers), student, {0: encoded})
    todo = Encoded(encoded.prompt, encoded.ids)
    feedback.assign_best_teachers([todo])
    assert todo.teacher in workers
    # each teacher answered its own rendering of the conversation
    assert spies["same"].generated == [[expected["same"]]] and spies["other"].generated[0] == [expected["other"]]
    # the judge read each answer's rubric as one user turn of its template (no system prompt)
    assert len(asked) == 2 and all(t.startswith("Task: And 46+21? Answer: ") for t in asked)
    rubrics = [ids for call in spies["other"].generated[1:] for ids in call]
    assert rubrics == [own_rendering(teacher, [{"role": "user", "content": t}]) for t in asked]
