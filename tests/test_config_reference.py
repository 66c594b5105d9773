"""docs/config.md matches the schema, every key is documented, and TRL's / verl's names for opd's keys lead to them."""

from pathlib import Path

import pytest

from opd.config import ConfigError, load_config
from opd.config.aliases import ALIASES, did_you_mean
from opd.config.reference import COMMAND, first_sentence, is_key, keys, render

ROOT = Path(__file__).resolve().parent.parent


def test_docs_config_md_is_generated_from_the_schema():
    assert (ROOT / "docs" / "config.md").read_text() == render(), f"docs/config.md is out of date: run `{COMMAND}`"


def test_every_key_and_section_has_a_docstring():
    missing = [k.path for k in keys() if not k.doc]
    assert not missing, f"give these fields a docstring (the string literal right after the field): {missing}"


def test_the_reference_reads_keys_types_and_defaults():
    found = {k.path: k for k in keys()}
    assert found["rollout.engine.max_model_len"].type == "int"
    assert found["teachers.N.backend"].type == "vllm | transformers | openai"
    assert found["resume"].type == "str | null" and found["resume"].default == "null"
    assert found["teachers.N.url"].default == '""'
    assert found["learner.lora"].type == "section"
    assert is_key("teachers.0.model") and is_key("rounds") and not is_key("learning_rate")


def test_first_sentence_skips_abbreviations():
    assert first_sentence("Extra variables, e.g. {a: 1} for Qwen3. More.") == "Extra variables, e.g. {a: 1} for Qwen3."
    assert first_sentence("on_policy: one. offline: two. Then more.") == "on_policy: one. offline: two."


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_alias_names_an_opd_key(name):
    alias = ALIASES[name]
    assert is_key(alias.key), f"{name} -> {alias.key}, which is not a key of the schema"
    assert alias.source in ("TRL", "verl")
    # A foreign name that is also an opd key must mean that key: loading would accept it as opd's.
    assert not is_key(name) or alias.key == name


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("learning_rate=1e-5", "learning_rate: not an opd key (TRL's name); did you mean learner.lr=1e-5?"),
        (
            "actor_rollout_ref.actor.optim.lr=1e-5",
            "actor_rollout_ref.actor.optim.lr: not an opd key (verl's name); did you mean learner.lr=1e-5?",
        ),
        ("data.train_files=a.parquet", "did you mean data.train=a.parquet?"),
        ("actor_rollout_ref.rollout.n=8", "did you mean rollout.samples_per_prompt=8?"),
        ("trainer.project_name=p", "did you mean wandb.project=p?"),
        ("lmbda=1", "did you mean mode=on_policy?"),
        ("trainer.resume_mode=disable", "did you mean resume=null?"),
        ("num_train_epochs=3", "did you mean rounds? (a pass over data.train"),
        ("beta=0.3", "did you mean loss.beta=0.3? (used by loss.type=jsd"),
    ],
)
def test_a_foreign_override_gets_opd_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("default", [override])
    assert message in str(err.value)
    assert str(err.value).startswith(override.split("=")[0] + ": not an opd key")


def test_an_unknown_key_that_is_no_alias_keeps_the_plain_error():
    with pytest.raises(ConfigError, match=r"nope: .*not in") as err:
        load_config("default", ["learner.nope=1"])
    assert "did you mean learner" not in str(err.value)
    assert did_you_mean("seed", "1") is None  # opd's own key as well as TRL's: never reported


def test_a_foreign_key_in_a_config_file_gets_opd_key(tmp_path):
    path = tmp_path / "from_verl.yaml"
    path.write_text("base: default\ntrainer:\n  experiment_name: first\nactor_rollout_ref:\n  rollout:\n    n: 8\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    message = str(err.value)
    assert message.startswith("trainer.experiment_name: not an opd key (verl's name); did you mean wandb.name=first?")
    assert str(path) in message
