"""`--config demo` from anywhere: config names and `configs/...` paths resolved to the package.

In a checkout, `python main.py --config configs/demo.py` reads the file relative to the current
directory, as ml_collections does. After `pip install`, the same configs ship as the top-level
`configs` package (they import each other as `from configs import default`), so the `vcp-jax`
command accepts, from any directory:

    vcp-jax --config demo --workdir DIR                  # a bare name: configs/demo.py
    vcp-jax --config configs/finetune.py:arch=r3d ...    # a checkout-style path, with arguments

A value that names an existing file is left alone; a local file wins over the packaged one.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

from absl import flags

CONFIG_FLAG = "config"
PACKAGE = "configs"


class ConfigNotFoundError(flags.Error):
    """`--config` names no file and no packaged config (an absl flags error: a usage error)."""


def packaged_configs_dir() -> Path | None:
    """The folder of the importable `configs` package, found without importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def available_configs(directory: Path | None = None) -> list[str]:
    """Names that `--config NAME` accepts: the packaged config files, without `.py`."""
    directory = packaged_configs_dir() if directory is None else directory
    if directory is None:
        return []
    return sorted(p.stem for p in directory.glob("*.py") if p.stem != "__init__")


def resolve_config_path(value: str, directory: Path | None = None) -> str:
    """The `--config` value with its file part pointing at a file that exists.

    `value` is `PATH` or `PATH:ARGS` (big_vision-style arguments for `get_config`, kept as they
    are). PATH is returned unchanged if it exists relative to the current directory; otherwise a
    bare name (`demo`), a file name (`demo.py`) or a checkout path (`configs/demo.py`) becomes the
    packaged `configs/demo.py`. Anything else raises ConfigNotFoundError naming the choices.
    """
    path, sep, args = value.partition(":")
    if Path(path).expanduser().is_file():
        return value
    directory = packaged_configs_dir() if directory is None else directory
    relative = Path(path)
    if relative.parts[:1] == (PACKAGE,):
        relative = Path(*relative.parts[1:])
    if len(relative.parts) == 1 and not relative.is_absolute():
        name = relative.name if relative.suffix == ".py" else f"{relative.name}.py"
        if directory is not None and (directory / name).is_file():
            return f"{directory / name}{sep}{args}"
    names = available_configs(directory)
    choices = ", ".join(names) if names else "none found (is the `configs` package installed?)"
    raise ConfigNotFoundError(
        f"--config={value}: no file {path!r} relative to {Path.cwd()}, and no packaged config of "
        f"that name. Pass a path to a config file, or one of these names: {choices}"
    )


def resolve_config_flag(argv: Sequence[str]) -> list[str]:
    """`argv` (program name first) with the `--config` value resolved by `resolve_config_path`.

    Accepts the spellings absl accepts (`--config=V`, `--config V`, `-config=V`, `-config V`),
    leaves `--config.key=value` overrides and everything after `--` alone, and returns a copy.
    """
    argv = list(argv)
    i = 1
    while i < len(argv) and argv[i] != "--":
        arg = argv[i]
        name, eq, value = arg.lstrip("-").partition("=")
        if arg.startswith("-") and name == CONFIG_FLAG:
            if eq:
                argv[i] = arg[: len(arg) - len(value)] + resolve_config_path(value)
            elif i + 1 < len(argv):
                i += 1
                argv[i] = resolve_config_path(argv[i])
        i += 1
    return argv
