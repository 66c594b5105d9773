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

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _builtin_kind(value: str) -> str | None:
    entry = lookup(value)
    return entry.kind if entry else None


def check_paths(cfg: OPDConfig) -> None:
    """Local paths must exist; `builtin:` names are built later; `org/name` may be a hub id."""
    from opd.data.files import source_problem  # here: loading a config needs no jinja2 (opd.data imports it)

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
            raise ConfigError(f"{key}={value}: no such directory, and not a hub id like org/name")
        elif Path(value).exists() and not (Path(value) / "config.json").exists():
            raise ConfigError(f"{key}={value}: directory has no config.json, so it is not a model checkpoint")
    sources = {"data.train": cfg.data.train}
    sources |= {f"data.eval.{name}" if name else "data.eval": path for name, path in cfg.data.eval_sets().items()}
    for key, value in sources.items():
        if value.startswith(BUILTIN):
            if _builtin_kind(value) != "data":
                raise ConfigError(f"{key}={value}: unknown built-in data; use one of {', '.join(names('data'))}")
        elif problem := source_problem(value):
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


def load_yaml(path: Path, seen: tuple[Path, ...] = ()):
    """A conf/ file with its `base:` chain applied: `base: default` means "the demo, plus these changes"."""
    data = OmegaConf.load(path)
    base = data.pop("base", None)
    if base is None:
        return data
    parent = resolve_config_file(str(base))
    if parent.resolve() in seen:
        raise ConfigError(f"{path}: base: {base} makes a cycle")
    return OmegaConf.merge(load_yaml(parent, (*seen, path.resolve())), data)


class ForeignKeyError(ConfigError):
    """An override whose key is not opd's but another framework's name for one (opd/config/aliases.py)."""


def load_config(config_name: str = "default", overrides: list[str] | None = None) -> OPDConfig:
    """Merge schema <- YAML <- `key=value` overrides, validate, and return plain dataclasses."""
    overrides = overrides or []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
    schema = OmegaConf.structured(OPDConfig)
    path = resolve_config_file(config_name)
    try:
        data = load_yaml(path)
        try:
            merged = OmegaConf.merge(schema, data)
        except (ConfigAttributeError, ConfigKeyError) as err:  # an unknown key; TRL's or verl's name for one?
            if hint := did_you_mean_in(OmegaConf.to_container(data), getattr(err, "full_key", None) or ""):
                raise ConfigError(hint) from None
            raise
        for item in overrides:
            # One at a time, so `teachers.0.model=...` indexes the list instead of replacing it with a dict.
            key, value = item.split("=", 1)
            try:
                OmegaConf.update(merged, key, OmegaConf.from_dotlist([f"v={value}"]).v, merge=True)
            except (ConfigAttributeError, ConfigKeyError):
                if hint := did_you_mean(key, value):
                    raise ForeignKeyError(hint) from None
                raise
        cfg = OmegaConf.to_object(merged)
    except ForeignKeyError:
        raise  # the key came from the command line, not from the config file
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"{key}: {str(err).splitlines()[0]} (config {path})") from None
    except ConfigError as err:
        raise ConfigError(f"{err} (config {path})") from None
    check_paths(cfg)
    return cfg


def to_yaml(cfg: OPDConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: OPDConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))
