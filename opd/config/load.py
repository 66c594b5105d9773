"""Loading a config: schema <- YAML in `conf/` (with its `base:` chain) <- `key=value` overrides, then the paths
it names; and writing it back as YAML or a dict."""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from opd.catalog import BUILTIN, lookup, names
from opd.config.aliases import did_you_mean, did_you_mean_in
from opd.config.base import ConfigError
from opd.config.schema import OPDConfig
from opd.secrets import redact

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _builtin_kind(value: str) -> str | None:
    entry = lookup(value)
    return entry.kind if entry else None


def check_paths(cfg: OPDConfig, not_here: list[str] | None = None) -> None:
    """Local paths must exist; `builtin:` names are built later; `org/name` may be a hub id. With `not_here` (a
    dry run, maybe of a cluster's config off the cluster), a path that does not exist is noted there instead of
    refused: it may exist where the run will run."""
    from opd.data.files import NO_SUCH_FILE, source_problem  # here: a config needs no jinja2 (opd.data imports it)

    def missing(message: str) -> None:
        if not_here is None:
            raise ConfigError(message)
        not_here.append(message)

    models = {"student.model": cfg.student.model}
    models |= {f"teachers.{i}.model": t.model for i, t in enumerate(cfg.teachers) if t.backend != "openai"}
    for i, t in enumerate(cfg.teachers):
        if t.backend == "openai":
            check_served_tokenizer(i, t)
    for key, value in models.items():
        if value.startswith(BUILTIN):
            if _builtin_kind(value) != "model":
                raise ConfigError(f"{key}={value}: unknown built-in model; use one of {', '.join(names('model'))}")
        elif not Path(value).exists() and not _HUB_ID.match(value):
            missing(f"{key}={value}: no such directory, and not a hub id like org/name")
        elif Path(value).exists() and not (Path(value) / "config.json").exists():
            raise ConfigError(f"{key}={value}: directory has no config.json, so it is not a model checkpoint")
    sources = {"data.train": cfg.data.train}
    sources |= {f"data.eval.{name}" if name else "data.eval": path for name, path in cfg.data.eval_sets().items()}
    for key, value in sources.items():
        if value.startswith(BUILTIN):
            if _builtin_kind(value) != "data":
                raise ConfigError(f"{key}={value}: unknown built-in data; use one of {', '.join(names('data'))}")
        elif problem := source_problem(value):
            if problem == NO_SUCH_FILE:
                missing(f"{key}={value}: {problem}")
            else:
                raise ConfigError(f"{key}={value}: {problem}")
    if cfg.data.chat_template not in ("auto", "none") and not Path(cfg.data.chat_template).is_file():
        raise ConfigError(f"data.chat_template={cfg.data.chat_template}: no such file (auto, none or a Jinja file)")


def check_served_tokenizer(i: int, t) -> None:
    """A served teacher's `model` is the server's name for it; opd still tokenizes for it, from a local dir."""
    if t.tokenizer is None:
        if not Path(t.model).is_dir():
            raise ConfigError(
                f"teachers.{i}.tokenizer is required: teachers.{i}.model={t.model} is the name the server serves, "
                "not a local dir, and opd sends prompts as token ids in the served model's tokenizer"
            )
    elif not Path(t.tokenizer).is_dir():
        raise ConfigError(f"teachers.{i}.tokenizer={t.tokenizer}: no such directory (a local tokenizer or checkpoint)")
    path = Path(t.tokenizer_path)
    if not any((path / name).is_file() for name in ("config.json", "generation_config.json")):
        key = "tokenizer" if t.tokenizer else "model"
        raise ConfigError(
            f"teachers.{i}.{key}={path}: needs the served checkpoint's config.json or generation_config.json beside "
            "its tokenizer (they name the ids that end a turn); the weights are not needed"
        )


def resolve_config_file(name: str) -> Path:
    """`--config-name` may be a path or a name under conf/ (with or without .yaml)."""
    for candidate in (Path(name), CONF_DIR / name, CONF_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"--config-name={name}: no such file here or in {CONF_DIR}")


def read_yaml(path: Path):
    """One YAML file; a syntax error is one line naming file:line:column and what is wrong, not PyYAML's trace."""
    import yaml

    try:
        return OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        what = " ".join(str(part) for part in (getattr(err, "context", None), getattr(err, "problem", None)) if part)
        raise ConfigError(f"{where}: malformed YAML: {what or err}") from None


def load_yaml(path: Path, seen: tuple[Path, ...] = ()):
    """A conf/ file with its `base:` chain applied: `base: default` means "the demo, plus these changes". A base is
    looked up beside the file that names it first (a folder of configs builds on itself wherever it is), then as
    `--config-name` is."""
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    beside = [path.parent / str(base), path.parent / f"{base}.yaml"]
    parent = next((p for p in beside if p.is_file()), None) or resolve_config_file(str(base))
    if parent.resolve() in seen:
        raise ConfigError(f"{path}: base: {base} makes a cycle")
    inherited = load_yaml(parent, (*seen, path.resolve()))
    return OmegaConf.merge(inherited, with_base_teachers(data, inherited))


def with_base_teachers(data, base):
    """`data` whose `teachers:` entries are merged with the base's entries of the same name: a derived config that
    lists its teachers (to change one, or the set) keeps what the base said of each (GPUs, engine, licence) instead
    of OmegaConf's whole-list replacement dropping it. Entries with a new name are taken as written."""
    if "teachers" not in data or "teachers" not in base:
        return data
    by_name = {str(t.get("name")): t for t in base.teachers if OmegaConf.is_dict(t) and "name" in t}
    merged = [OmegaConf.merge(by_name[str(t.name)], t) if t.get("name") in by_name else t for t in data.teachers]
    return OmegaConf.merge(data, {"teachers": merged})


def _shown(item: str) -> str:
    """An override as an error message may show it: a credential's value replaced (`wandb.api_key=***`)."""
    key, value = item.split("=", 1)
    leaf = key.rsplit(".", 1)[-1]
    return f"{key}={redact({leaf: value})[leaf]}"


def _named(err: Exception, source: str) -> ConfigError:
    """`err` as one line naming its key and where the value came from: an override, or the config file."""
    if isinstance(err, ConfigError):
        return ConfigError(f"{err} ({source})")
    key = getattr(err, "full_key", None) or "?"
    return ConfigError(f"{key}: {str(err).splitlines()[0]} ({source})")


def load_config(
    config_name: str = "default", overrides: list[str] | None = None, not_here: list[str] | None = None
) -> OPDConfig:
    """Merge schema <- YAML <- `key=value` overrides, validate, and return plain dataclasses. `not_here`: collect
    local paths that do not exist instead of refusing them (`check_paths`)."""
    overrides = overrides or []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
    schema = OmegaConf.structured(OPDConfig)
    path = resolve_config_file(config_name)
    data = load_yaml(path)  # a malformed file names itself, file:line:column
    try:
        merged = OmegaConf.merge(schema, data)
    except (ConfigAttributeError, ConfigKeyError) as err:  # an unknown key; TRL's or verl's name for one?
        if hint := did_you_mean_in(OmegaConf.to_container(data), getattr(err, "full_key", None) or ""):
            raise ConfigError(f"{hint} (config {path})") from None
        raise _named(err, f"config {path}") from None
    except OmegaConfBaseException as err:
        raise _named(err, f"config {path}") from None
    for item in overrides:
        # One at a time, so `teachers.0.model=...` indexes the list instead of replacing it with a dict.
        key, value = item.split("=", 1)
        try:
            OmegaConf.update(merged, key, OmegaConf.from_dotlist([f"v={value}"]).v, merge=True)
        except (ConfigAttributeError, ConfigKeyError) as err:
            if hint := did_you_mean(key, value):
                raise ConfigError(hint) from None
            raise _named(err, f"override {_shown(item)}") from None
        except OmegaConfBaseException as err:
            raise _named(err, f"override {_shown(item)}") from None
    try:
        cfg = OmegaConf.to_object(merged)
    except (OmegaConfBaseException, ConfigError) as err:
        # A check's message starts with the key it refuses (`rounds=0 must be >= 1`): was that key overridden?
        key = getattr(err, "full_key", None) or "".join(re.findall(r"^([\w.]+)=", str(err))[:1])
        given = [item for item in overrides if key and item.split("=", 1)[0] == key]
        raise _named(err, f"override {_shown(given[-1])}" if given else f"config {path}") from None
    check_paths(cfg, not_here)
    return cfg


def to_dict(cfg: OPDConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))
