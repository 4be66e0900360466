"""Config checks whose errors name the key and the allowed values."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import ml_collections


class ConfigError(ValueError):
    """A config value is missing or not allowed; the message names the key."""


def get(config: ml_collections.ConfigDict, key: str) -> Any:
    """`config.a.b.c` for key 'a.b.c', or a ConfigError naming the missing key."""
    value: Any = config
    for part in key.split("."):
        try:
            value = value[part]
        except (KeyError, TypeError, AttributeError):
            raise ConfigError(f"config.{key} is missing") from None
    return value


def check_choice(config: ml_collections.ConfigDict, key: str, allowed: Iterable[Any]) -> Any:
    """The value at `key`, which must be one of `allowed`."""
    allowed = tuple(allowed)
    value = get(config, key)
    if value not in allowed:
        raise ConfigError(f"config.{key}={value!r} is not allowed; choose one of {allowed}")
    return value


def check_positive(config: ml_collections.ConfigDict, key: str, *, allow_zero: bool = False) -> Any:
    """The value at `key`, which must be a number > 0 (or >= 0 with `allow_zero`)."""
    value = get(config, key)
    if not isinstance(value, int | float) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"config.{key}={value!r} must be a number {bound}")
    return value
