"""Credentials kept out of everything a run writes: config.yaml, provenance.json and DISTILLATION.md beside every
saved student, W&B's config, the dry-run's print, error messages naming a served teacher's URL.

Config values never need to hold a credential (a served teacher's key is read from the environment variable that
`api_key_env` names), but users put them there anyway: a `ray://user:pass@head` address, a URL with basic auth in
front of a proxy, a token pasted into `wandb` settings. Each is replaced here, wherever it sits. Only the stdlib is
imported: config validation and the dry-run use it.
"""

from __future__ import annotations

import re

REDACTED = "***"
_NAME_PARTS = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
_SECRET_ENDINGS = ("key", "keys", "token", "secret", "secrets", "password", "passwd", "credential", "credentials")
_SECRET_PARTS = {"auth", "authorization", "pat", "pwd", "bearer"}
_SECRET_VALUE = re.compile(
    r"\bsk-[\w-]{16,}|\bhf_[A-Za-z0-9]{20,}|\bgh[pousr]_[A-Za-z0-9]{20,}|\bgithub_pat_\w{20,}|\bxox[abprs]-[\w-]{10,}"
    r"|\bAKIA[0-9A-Z]{16}\b|\bAIza[\w-]{35}|\bglpat-[\w-]{20,}|\bBearer\s+\S{8,}"
)
"""Values that are credentials whatever their key: API keys of common providers, bearer tokens."""
_URL_USERINFO = re.compile(r"(?<=://)[^/\s@]+@")
"""The `user:password@` (or `token@`) part of a URL: dropped, the rest of the URL kept (it says where)."""
_ENV_ASSIGNMENT = re.compile(r"^([A-Za-z_]\w*)=")


_COLUMN_NAMES = {"prompt_key", "answer_key", "api_key_env"}
"""Config keys that name something (a data column, the environment variable holding a served teacher's key), not
a credential."""


def _secret_name(name: str) -> bool:
    """`api_key`, `WANDB_API_KEY`, `hfToken`, `client-secret`, `db_password`: yes. `max_new_tokens`, `top_k`: no."""
    if name in _COLUMN_NAMES:
        return False
    parts = [p.lower() for p in _NAME_PARTS.findall(name)]
    return any(p.endswith(_SECRET_ENDINGS) or p in _SECRET_PARTS for p in parts)


def _redact_value(value):
    if isinstance(value, dict):
        return redact(value)
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    if isinstance(value, str):
        if _SECRET_VALUE.search(value):
            return REDACTED
        value = without_userinfo(value)
        env = _ENV_ASSIGNMENT.match(value)  # "HF_TOKEN=..." in a list of environment settings
        if env and _secret_name(env.group(1)):
            return f"{env.group(1)}={REDACTED}"
    return value


def redact(config: dict) -> dict:
    """A copy of `config` safe to log: credentials become `***`, at any depth (dicts, lists of dicts).

    A value is dropped when its key names a credential (whole value, even a dict or list) or when it looks
    like one itself (a provider API key, a bearer token, a URL with a password), whatever its key.
    """
    return {k: REDACTED if _secret_name(str(k)) else _redact_value(v) for k, v in config.items()}


def without_userinfo(text: str) -> str:
    """`text` with the credentials of any URL in it replaced: `https://u:p@host/v1` -> `https://***@host/v1`."""
    return _URL_USERINFO.sub(f"{REDACTED}@", text)


def split_userinfo(url: str) -> tuple[str, str | None]:
    """A URL without its `user:password@` part, and that part (None when there is none): basic auth travels in a
    header, so the URL itself can be printed."""
    match = _URL_USERINFO.search(url)
    if match is None:
        return url, None
    return url[: match.start()] + url[match.end() :], match.group(0)[:-1]


def safe_config(cfg) -> dict:
    """The run's config as plain data with every credential replaced: what any file or log may hold."""
    from opd.config import to_dict

    return redact(to_dict(cfg))


def safe_yaml(cfg) -> str:
    """`safe_config` as YAML (config.yaml, the dry-run's print)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(safe_config(cfg)))
