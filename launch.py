"""Run on-policy distillation.

    python launch.py [--config-name NAME_OR_PATH] [key=value ...]
    python launch.py --multirun loss.beta=0,0.5,1 learner.lr=1e-5,3e-5    # a grid of runs
    python launch.py --dry-run [...]    # check and print the config and resource plan, start nothing

Reads conf/default.yaml unless told otherwise. The config is parsed and checked
before anything heavy is imported, so a typo fails in well under a second.
Joins the Ray cluster at `ray.address` / RAY_ADDRESS if set, else starts a local one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-name", default="default", help="a file under conf/ (without .yaml) or a path")
    parser.add_argument(
        "--multirun",
        action="store_true",
        help="comma-separated values form a grid: loss.beta=0,0.5,1 learner.lr=1e-5,3e-5",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check the config, print it with the resources it needs (each grid point's with --multirun), and exit",
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. learner.lr=3e-5 teachers.0.model=org/m")
    return parser.parse_args(argv)


def local_cpus(cfg) -> int:
    """Logical CPUs a local Ray needs so that every actor of the plan can be placed."""
    from opd.plan import needs

    return max(int(needs(cfg)["CPU"] + 0.999), os.cpu_count() or 1)


def resolve(name: str, cache_dir: str) -> str:
    """A model or data reference as a path: `builtin:` ones are built (once) into the cache."""
    from opd.catalog import BUILTIN

    if not name.startswith(BUILTIN):
        return name
    from opd.assets import ensure_builtin

    return str(ensure_builtin(name.removeprefix(BUILTIN), cache_dir))


def main(argv: list[str]) -> dict:
    from opd.config import ConfigError, load_config
    from opd.monitoring import SUMMARY_FILE, SUMMARY_LINE

    args = parse_args(argv)
    if args.multirun:
        return sweep(args.config_name, args.overrides, args.dry_run)
    not_here: list[str] | None = [] if args.dry_run else None  # a dry run may check a cluster's config off it
    try:
        cfg = load_config(args.config_name, args.overrides, not_here)
        check_output_dir(cfg.output_dir, cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    if args.dry_run:
        unchecked = check_models(cfg, conversations=check_data(cfg))
        show(cfg)
        for message in not_here or []:
            print(f"not found here (fine if it exists where the run will run): {message}", flush=True)
        for note in unchecked:
            print(note, flush=True)
        return {}
    summary = run(cfg)
    report(summary["final"])
    # Every round's metrics are in the file (a 300-round run's is ~1 MB): the terminal gets its path, last.
    print(SUMMARY_LINE + os.path.abspath(os.path.join(cfg.output_dir, SUMMARY_FILE)), flush=True)
    return summary


def check_output_dir(output_dir: str, address: str | None) -> None:
    """On a Ray cluster the driver's working directory is Ray's temporary copy of the code (`ray job submit`), and
    learner ranks on other nodes write checkpoints under their own node's copy: a relative `output_dir` would be
    lost with the job. Refused there; a path on storage every node mounts is what works."""
    from opd.config import ConfigError
    from opd.secrets import without_userinfo

    if address and not os.path.isabs(output_dir):
        raise ConfigError(
            f"output_dir={output_dir} is relative, but the run joins the Ray cluster at {without_userinfo(address)}: "
            "give an absolute path on storage every node mounts (e.g. output_dir=/shared/runs/NAME)"
        )


def run(cfg) -> dict:
    """One distillation run on a validated config; returns its summary."""
    from opd import checkpoint
    from opd.catalog import BUILTIN
    from opd.config import ConfigError
    from opd.data import DataError, load_prompts, repeats
    from opd.provenance import StudentCard
    from opd.secrets import safe_yaml
    from opd.teachers.context import fit_served_teachers

    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if cfg.resume not in (None, "auto"):
        cfg.output_dir = cfg.resume  # resuming a run directory continues writing into it
    try:
        resume = checkpoint.resume_point(cfg.resume, cfg.output_dir)
    except FileNotFoundError as err:
        sys.exit(f"error: {err}")

    os.makedirs(cfg.output_dir, exist_ok=True)
    with open(os.path.join(cfg.output_dir, "config.yaml"), "w") as f:
        f.write(safe_yaml(cfg))  # credentials replaced, as in every file a run writes
    # The prompts first, the user's files before built-in sets: a data error is reported before any built-in
    # (models included: a set is built as one) is built, which takes minutes on a fresh machine.
    sources = {"train": cfg.data.train} | {f"eval:{n}" if n else "eval": p for n, p in cfg.data.eval_sets().items()}
    data = cfg.data
    load = partial(load_prompts, on_error=data.on_error, prompt_key=data.prompt_key, answer_key=data.answer_key)
    data_files, loaded = {}, {}
    try:
        for role, source in sorted(sources.items(), key=lambda item: item[1].startswith(BUILTIN)):
            data_files[role] = resolve(source, cfg.cache_dir)
            loaded[role] = load(data_files[role])
    except DataError as err:
        sys.exit(f"data error: {err}")
    data_files = {role: data_files[role] for role in sources}  # the config's order, for the provenance record
    (train, skipped_train) = loaded.pop("train")
    loaded = {role.partition(":")[2]: result for role, result in loaded.items()}
    evals = {name: prompts for name, (prompts, _) in loaded.items()}
    skipped_eval = sum(skipped for _, skipped in loaded.values())
    repeated = len(repeats(train))
    if skipped_train or skipped_eval or repeated:
        print(
            f"{len(train)} train prompts, {repeated} repeating an earlier one (kept); "
            f"skipped {skipped_train} train and {skipped_eval} eval rows (data.on_error=skip)",
            flush=True,
        )
    student = resolve(cfg.student.model, cfg.cache_dir)
    # A served teacher's model is the name its server serves; what runs here reads its local tokenizer.
    teachers = {t.name: resolve(t.tokenizer_path, cfg.cache_dir) for t in cfg.teachers}
    try:
        train, evals, too_long = fit_served_teachers(cfg, student, teachers, train, evals)
    except DataError as err:
        sys.exit(f"data error: {err}")
    except ConfigError as err:
        sys.exit(f"error: {err}")
    if too_long:
        print(f"skipped {too_long} prompts too long for a served teacher's context (data.on_error=skip)", flush=True)

    card = StudentCard(cfg, student, teachers, data_files, started)
    if resume is not None and (changed := checkpoint.changes(checkpoint.load(resume).get("inputs"), card.inputs())):
        sys.exit(
            f"error: cannot resume from {resume}: it was written with other inputs ({'; '.join(changed)}), and "
            "the resumed run would not continue the same one. Restore them, or start afresh in another output_dir"
        )
    once = partial(attempt, cfg, student, teachers, train, evals, card=card)
    return resuming(once, resume, cfg.output_dir, cfg.faults.learner_resumes)


def resuming(once: Callable[[Path | None], dict], resume: Path | None, output_dir: str, restarts: int) -> dict:
    """`once(resume)`, started again `restarts` times from the newest checkpoint when a learner or replay-buffer
    shard died: what it held is lost with it, and the checkpoint has it (with every other actor's state)."""
    from opd import checkpoint
    from opd.buffer.sharded import BufferDied
    from opd.learner.group import LearnerDied

    while True:
        try:
            return once(resume)
        except (LearnerDied, BufferDied) as err:
            resume = checkpoint.latest(output_dir)
            if restarts == 0 or resume is None:
                why = "no checkpoint to resume from (set checkpoint.every)" if resume is None else "no restarts left"
                sys.exit(f"error: {err}; {why}")
            restarts -= 1
            print(f"{err}: restarting every actor from {resume}", flush=True)


def driver_env_vars(defaults: dict[str, str]) -> dict[str, str]:
    """`defaults` less the variables a submitted job's runtime env already sets: Ray refuses a driver runtime env
    that names a key the job's (`ray job submit --runtime-env-json`) also names, and the user's value wins."""
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    taken = (job.get("runtime_env") or {}).get("env_vars") or {}
    return {k: v for k, v in defaults.items() if k not in taken}


def attempt(cfg, student: str, teachers: dict[str, str], train: list, evals: dict[str, list], resume, card) -> dict:
    """Start Ray and every actor, run (or resume) the rounds, and always shut Ray down; `card` writes each saved
    student's provenance.json and DISTILLATION.md (the final one's and every export's)."""
    import ray

    from opd import checkpoint
    from opd.compat import IncompatibleModels
    from opd.config import ConfigError, to_dict
    from opd.data import DataError
    from opd.learner.guard import NonFiniteStep
    from opd.monitoring import Monitor, MonitorError
    from opd.plan import PlanError, actor_env
    from opd.startup import start

    state = checkpoint.load(resume) if resume else {}
    wandb = cfg.wandb
    try:  # before Ray: a run that cannot log where it was told to stops here, having started nothing
        monitor = Monitor(
            cfg.output_dir,
            to_dict(cfg),
            wandb.mode,
            wandb.project,
            wandb.group,
            wandb.name,
            history=state.get("history"),
            run_id=state.get("wandb_id"),
            entity=wandb.entity,
            tags=list(wandb.tags),
        )
    except MonitorError as err:
        sys.exit(f"error: {err}")
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    env_vars = {"TOKENIZERS_PARALLELISM": "false", **actor_env(cfg)}
    if address:  # under `ray job submit`, the job's --working-dir already carries the code to every node
        ray.init(address=address, runtime_env={"env_vars": driver_env_vars(env_vars)})
    else:
        here = os.path.dirname(os.path.abspath(__file__))
        env = {"env_vars": {**env_vars, "PYTHONPATH": here}}
        # "local": a Ray of its own even where `ray start` left a cluster on this machine, which ray.init() would
        # otherwise join (and then refuse num_cpus for).
        ray.init(address="local", num_cpus=local_cpus(cfg), runtime_env=env, include_dashboard=False)
    try:
        return start(cfg, student, teachers, train, evals, monitor, card).run(resume)
    except (ConfigError, DataError, IncompatibleModels, PlanError) as err:
        sys.exit(f"error: {err}")
    except NonFiniteStep as err:  # raised on a learner shard; Ray keeps the original as `cause`
        sys.exit(f"error: {getattr(err, 'cause', err)}")
    finally:
        monitor.close()
        ray.shutdown()  # also flushes actor logs, so nothing prints after the summary


def check_data(cfg) -> bool:
    """What a dry run reads of the data: the first rows of every local prompt file, as the run would read them.
    Returns whether the training prompts are conversations (a chat template then matters)."""
    from opd.catalog import BUILTIN
    from opd.data import DataError, check_first_rows, source_problem

    data, conversations = cfg.data, False
    for key, source in {"data.train": data.train, **{f"data.eval {n}": p for n, p in data.eval_sets().items()}}.items():
        if source.startswith(BUILTIN) or source_problem(source):
            continue  # built-ins are opd's own; a path that is not here was reported already
        try:
            first = check_first_rows(source, data.prompt_key, data.answer_key)
        except DataError as err:
            sys.exit(f"data error: {key}: {err}")
        conversations |= key == "data.train" and bool(first.messages)
    return conversations


def check_models(cfg, conversations: bool = False) -> list[str]:
    """What a dry run checks of the models that are here (local checkpoints and built-ins already in the cache):
    the same checks a run makes before starting any actor (top-k against the vocabulary, vLLM's CPU head sizes,
    teachers that another tokenizer makes incompatible with the combine rule, the eval verifier). Returns the models
    it could not check, each with the reason, and what it warns of."""
    from opd.catalog import BUILTIN, lookup
    from opd.compat import IncompatibleModels, check_cpu_attention, check_top_k, cross_tokenizer_teachers
    from opd.config import ConfigError
    from opd.startup import eval_verifier_name, resolve_verifier

    unchecked: list[str] = []

    def here(reference: str) -> str | None:
        entry = lookup(reference)
        path = os.path.join(cfg.cache_dir, entry.group, entry.path) if entry else reference
        found = os.path.isfile(os.path.join(path, "config.json"))
        if not found:
            what = (
                "a built-in, built when the run starts" if reference.startswith(BUILTIN) else "not a local checkpoint"
            )
            unchecked.append(f"not checked here: {reference} ({what})")
        return path if found else None

    try:
        resolve_verifier("eval.verifier", eval_verifier_name(cfg))
        student = here(cfg.student.model)
        teachers = {t.name: path for t in cfg.teachers if t.backend != "openai" and (path := here(t.model))}
        if student is None:
            return unchecked
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(student)
        check_top_k(cfg.loss.top_k, len(tokenizer))
        if conversations and cfg.data.chat_template == "auto" and not getattr(tokenizer, "chat_template", None):
            unchecked.append(
                f"warning: the training prompts are conversations, but {cfg.student.model} has no chat "
                "template, so the student would read each as its last user turn; set data.chat_template=FILE.jinja "
                "(or data.chat_template=none to mean it)"
            )
        check_cpu_attention(cfg, student, teachers)
        cross_tokenizer_teachers(tokenizer, teachers, cfg.combine.rule)
    except (ConfigError, IncompatibleModels) as err:
        sys.exit(f"error: {err}")
    return unchecked


def show(cfg) -> None:
    """What `--dry-run` prints: the config as the run would see it and the resources it would ask Ray for."""
    from opd.plan import describe
    from opd.secrets import safe_yaml

    print(safe_yaml(cfg) + describe(cfg), flush=True)


def sweep(config_name: str, overrides: list[str], dry_run: bool = False) -> dict:
    """Run every point of the override grid in turn; all configs are checked before the first run."""
    from opd import sweep as grid
    from opd.config import ConfigError, load_config
    from opd.monitoring import SUMMARY_LINE

    points = grid.expand(overrides)
    keys = grid.varying(points)
    try:
        base = load_config(config_name, overrides=[p for p in points[0] if p.partition("=")[0] not in keys])
        name = f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
        root = os.path.join(base.output_dir, name)
        configs = []
        for i, point in enumerate(points):
            label = grid.run_name(point, keys)
            extra = [f"output_dir={root}/{i:03d}", f"wandb.group={base.wandb.group or name}", f"wandb.name={label}"]
            configs.append((label, load_config(config_name, [*point, *extra])))
            check_output_dir(configs[-1][1].output_dir, configs[-1][1].ray.address or os.environ.get("RAY_ADDRESS"))
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    print(f"{name}: {len(configs)} runs over {', '.join(keys) or 'one point'} -> {root}", flush=True)
    if dry_run:
        show_sweep(configs)
        return {}
    rows = []
    for i, (label, cfg) in enumerate(configs, start=1):
        print(f"[{i}/{len(configs)}] {label}", flush=True)
        final = run(cfg)["final"]
        rows.append({"run": label, "output_dir": cfg.output_dir, **final})
    columns = ["run", "student_accuracy_after", "reverse_kl_before", "reverse_kl_after", "teacher_tokens"]
    text = grid.table(rows, columns)
    with open(os.path.join(root, "sweep.md"), "w") as f:
        f.write(text + "\n")
    result = {"sweep": name, "runs": rows}
    with open(os.path.join(root, "sweep.json"), "w") as f:
        json.dump(result, f, indent=2)
    print("\n" + text, flush=True)
    # Like a single run's: the last line names the file with every run's final figures.
    print(SUMMARY_LINE + os.path.abspath(os.path.join(root, "sweep.json")), flush=True)
    return result


def show_sweep(configs: list) -> None:
    """What `--multirun --dry-run` prints: the first point's config and plan in full, then each point's keys that
    differ across the grid (a 6-point sweep of the whole config was a thousand lines), then one short line."""
    from opd import sweep as grid
    from opd.plan import describe
    from opd.secrets import safe_config

    show(configs[0][1])
    plans = {describe(cfg) for _, cfg in configs}
    changes = grid.differences([safe_config(cfg) for _, cfg in configs])
    for i, ((label, cfg), changed) in enumerate(zip(configs, changes, strict=True), start=1):
        print(f"[{i}/{len(configs)}] {label}: " + "  ".join(f"{k}={v}" for k, v in changed.items()), flush=True)
        if len(plans) > 1:
            print(describe(cfg), flush=True)
    print(f"dry run: {len(configs)} runs checked, nothing started", flush=True)


def report(final: dict) -> None:
    """The few numbers a person looks for first: every eval set's, each named when there are several."""

    def fmt(x) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    sets = final["eval_sets"]
    lines = []
    for name, figures in sets.items():
        of = f" on {name}" if len(sets) > 1 else ""
        lines += [
            f"teacher accuracy{of} {fmt(figures['teacher_accuracy'])}",
            f"student accuracy{of} {fmt(figures['student_accuracy_before'])} -> "
            f"{fmt(figures['student_accuracy_after'])}",
            f"reverse KL (student||teacher, nats/token){of} {fmt(figures['reverse_kl_before'])} -> "
            f"{fmt(figures['reverse_kl_after'])}",
        ]
    print("\n" + "\n".join(lines) + f"\nstudent checkpoint: {final['student_path']}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
