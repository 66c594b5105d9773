"""What every config section shares: the error a bad config raises and the small checks each section uses."""

from __future__ import annotations

from collections.abc import Sequence


class ConfigError(ValueError):
    """A configuration the run cannot start with; the message names the key."""


def at_least_one(section: str, config: object, *names: str) -> None:
    """Counts and sizes that must be >= 1, named `section.name` in the error."""
    for name in names:
        value = getattr(config, name)
        if value < 1:
            raise ConfigError(f"{section}.{name}={value} must be >= 1")


def one_of(key: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(valid)}")
