"""Config checks whose errors name the key and the allowed values; user errors in general."""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
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


# --- deprecated keys ----------------------------------------------------------------------------

# Keys of every `data` section (the stage's own, and each demo stage's) that were renamed: old ->
# new. The old name still works for one release: a config file or a `--config.` override that sets
# it sets the new key, with a message.
DEPRECATED_DATA_KEYS = {"config": "builder_config"}
_OLD_OVERRIDE = re.compile(
    r"^(-{1,2}config\.(?:\w+\.)*data\.)(" + "|".join(DEPRECATED_DATA_KEYS) + r")(=.*)?$")
_told: set[str] = set()


def warn_deprecated(old: str, new: str, where: str) -> None:
    """Says once per process that `old` (a dotted key) is deprecated in favour of `new`."""
    if old in _told:
        return
    _told.add(old)
    print(f"warning: config.{old} ({where}) is deprecated and will be removed in the next "
          f"release; use config.{new}", file=sys.stderr, flush=True)


def _renamed(arg: str) -> tuple[str, str, str] | None:
    """(the argument with the new key, old dotted key, new dotted key) for an old override."""
    match = _OLD_OVERRIDE.match(arg)
    if not match:
        return None
    prefix, old, value = match.group(1), match.group(2), match.group(3) or ""
    new = DEPRECATED_DATA_KEYS[old]
    dotted = prefix.lstrip("-").removeprefix("config.")
    return f"{prefix}{new}{value}", dotted + old, dotted + new


def rename_deprecated_overrides(argv: Sequence[str]) -> list[str]:
    """`--config.data.config=X` -> `--config.data.builder_config=X` (any `data` section), said once.

    A copy: the caller's list is not modified. Arguments after `--` are left alone.
    """
    renamed = list(argv)
    for i, arg in enumerate(renamed):
        if arg == "--":
            break
        new = _renamed(arg)
        if new is not None:
            renamed[i] = new[0]
            warn_deprecated(new[1], new[2], "on the command line")
    return renamed


def _data_sections(
    config: ml_collections.ConfigDict, prefix: str = ""
) -> Iterator[tuple[str, ml_collections.ConfigDict]]:
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            if key == "data":
                yield f"{prefix}{key}", value
            yield from _data_sections(value, f"{prefix}{key}.")


def migrate_deprecated_keys(
    config: ml_collections.ConfigDict, overridden: Iterable[str] = ()
) -> ml_collections.ConfigDict:
    """Moves the renamed keys that a config file still sets to their new names, in place.

    `config.data.config = 'split2'` in a config file sets `data.builder_config`, unless the
    command line set that key (`overridden`: the dotted keys of its `--config.` overrides, which
    win over the file). The old key is removed, so the stored config and provenance name only the
    new one. Idempotent; returns `config`.
    """
    overridden = set(overridden)
    moves = [(path, section, old, new) for path, section in _data_sections(config)
             for old, new in DEPRECATED_DATA_KEYS.items() if old in section]
    if not moves:
        return config
    with config.unlocked():
        for path, section, old, new in moves:
            value = section[old]
            warn_deprecated(f"{path}.{old}", f"{path}.{new}", "set in the config file")
            if isinstance(value, ml_collections.ConfigDict):
                raise ConfigError(f"config.{path}.{old} must be a string such as 'split1'")
            del section[old]
            if f"{path}.{new}" not in overridden:
                section[new] = value
    return config


def override_keys(argv: Sequence[str]) -> list[str]:
    """The dotted keys that `--config.<key>=...` arguments set ('data.builder_config', ...)."""
    keys = []
    for arg in argv:
        if arg == "--":
            break
        if re.match(r"^-{1,2}config\.", arg):
            arg = (_renamed(arg) or (arg,))[0]
            keys.append(arg.lstrip("-").removeprefix("config.").split("=", 1)[0])
    return keys
