"""The jobs the benches run by name (`preset=tiny|smollm2`), and what the TRL side needs to read opd's prompts.

`tiny` is the built-in addition demo (`conf/default.yaml`): seconds a round, so fixed costs decide. `smollm2` is
SmolLM2-135M-Instruct teaching its 4-layer pruned copy on chat prompts with responses of up to 256 tokens
(`conf/smollm2_chat.yaml`), the scale where generation, teacher scoring and the learner's step cost real compute.
"""

from __future__ import annotations

from dataclasses import dataclass

PRESET_KEY = "preset="


@dataclass(frozen=True)
class Preset:
    config: str
    """The conf/ YAML the job starts from."""
    overrides: tuple[str, ...]
    """What the bench changes in it; the command line's `key=value` overrides come after."""
    eval_prompts: int
    """Held-out prompts the bench's own evaluator samples from."""


SMOLLM2 = (
    "rollout.prompts_per_round=4",
    "rollout.samples_per_prompt=4",
    "rollout.max_new_tokens=256",
    "rollout.engine.max_model_len=320",  # the ChatML prompt (44-60 tokens) + 256
    "teacher_engine.max_model_len=320",
    "learner.mini_batches=1",  # one optimizer step on a round's 16 samples: TRL's batch of 16
    "data.eval_size=16",
    "eval.every=1000",  # opd's own eval only before the first and after the last round
)
"""Both benches' SmolLM2 job: 16 samples of up to 256 tokens a round (about 30-40 s on 2 cores)."""

VS_TRL = {
    "tiny": Preset(
        "default",
        (
            "rounds=6",
            "rollout.prompts_per_round=16",
            "rollout.samples_per_prompt=4",
            "learner.mini_batches=1",  # one optimizer step per round of 64 samples, so TRL generates 64 at once
            "learner.lr=3e-4",  # TRL's side runs AdamW at opd's lr with no schedule: so does opd here
            "learner.lr_schedule=constant",
            "learner.warmup_steps=0",
            "eval.every=1000",
            "data.eval_size=64",
        ),
        64,
    ),
    "smollm2": Preset(
        "smollm2_chat",
        # TRL's loss is the exact reverse KL over all 49,152 tokens; opd's is exact over the teacher's top-k and
        # sampled beyond it. With the top 4096 exact the sampled rest no longer shows in 3 steps (bench/README.md).
        ("rounds=3", *SMOLLM2, "loss.top_k=4096"),
        16,
    ),
}
SYNC_VS_ASYNC = {
    "tiny": Preset("default", ("rounds=12", "eval.every=1000"), 0),
    "smollm2": Preset("smollm2_chat", ("rounds=4", *SMOLLM2), 0),
}


def split(argv: list[str], presets: dict[str, Preset]) -> tuple[Preset, list[str]]:
    """The `preset=NAME` argument's preset (`tiny` without one) and the other arguments, in order."""
    names = [a.removeprefix(PRESET_KEY) for a in argv if a.startswith(PRESET_KEY)]
    name = names[-1] if names else "tiny"
    if name not in presets:
        raise SystemExit(f"preset={name}: not one of {', '.join(presets)}")
    return presets[name], [a for a in argv if not a.startswith(PRESET_KEY)]


def trl_prompt(chat, prompt):
    """The prompt as TRL's DistillationTrainer takes it: the conversation when opd renders a chat template (TRL then
    applies the same tokenizer template with the generation prompt, no special tokens added), else the raw text."""
    return list(prompt.conversation) if chat.template is not None else prompt.text


def check_same_rendering(chat, prompt) -> None:
    """TRL's rendering of a chat prompt (`apply_chat_template(tokenize=True, add_generation_prompt=True)`) must give
    opd's token ids (`ChatFormat.ids`), or the two would train on different prompts."""
    if chat.template is None:
        return
    theirs = chat.tokenizer.apply_chat_template(
        [trl_prompt(chat, prompt)], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"][0]
    if list(theirs) != chat.ids(prompt):
        raise RuntimeError(f"TRL would render prompt {prompt.index} as other token ids than opd")
