"""Config checks whose errors name the key and the allowed values; user errors in general."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from typing import Any

import ml_collections


class UserError(Exception):
    """Something the user can fix (config, data, paths): `main` prints it without a traceback."""


class ConfigError(UserError, ValueError):
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


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every leaf key of `config` as a dotted path ('optimizer.learning_rate', ...)."""
    keys = []
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(flat_keys(value, path + "."))
        else:
            keys.append(path)
    return keys


def nearest_keys(key: str, known: Sequence[str], n: int = 3) -> list[str]:
    """The known keys closest to `key`, by their last component first, then by whole path."""
    leaf = key.rsplit(".", 1)[-1]

    def score(candidate: str) -> float:
        whole = difflib.SequenceMatcher(None, key, candidate).ratio()
        last = difflib.SequenceMatcher(None, leaf, candidate.rsplit(".", 1)[-1]).ratio()
        return max(whole, last)

    ranked = sorted(known, key=score, reverse=True)
    return [k for k in ranked[:n] if score(k) >= 0.75]


def unknown_override_message(argv: Sequence[str], error: BaseException) -> str:
    """The message for `--config.<key>=...` naming a key the config does not have."""
    from ml_collections.config_flags import config_flags  # noqa: PLC0415

    overrides = [a.split("=", 1)[0][len("--config."):] for a in argv
                 if a.startswith("--config.")]
    config_path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if config_path is None and "--config" in argv[:-1]:
        config_path = argv[list(argv).index("--config") + 1]
    try:
        config = config_flags.ConfigFileFlagParser("config", lock_config=False).parse(config_path)
        known = flat_keys(config)
    except Exception:  # noqa: BLE001 - the config itself failed: report the original error
        return f"could not apply the config overrides: {error}"
    unknown = [key for key in overrides if key not in known
               and not any(k.startswith(key + ".") for k in known)]
    if not unknown:
        return f"could not apply the config overrides: {error}"
    lines = []
    for key in unknown:
        near = nearest_keys(key, known)
        hint = f"; did you mean {', '.join('config.' + k for k in near)}?" if near else ""
        lines.append(f"config.{key} is not a key of {config_path}{hint}")
    return "\n".join(lines)
