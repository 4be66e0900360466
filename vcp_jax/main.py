"""The command line: `python main.py --config configs/<name>.py --workdir DIR [--config.k=v]`.

Runs the stage that `config.task` names (pretrain, finetune, retrieval, probe or demo). The
console shows progress bars, one line per evaluation and a final summary; library logs (Orbax,
grain, TFDS, JAX) go to `DIR/log.txt`, and only their errors to the console (`--verbosity=1`
shows their info and warnings there too). A user error
(an unknown config key, a dataset that is not built, a missing checkpoint) ends with one message
and exit status 2, never a traceback.

Multi-host (TPU pods, GPU clusters): `--distributed` calls `jax.distributed.initialize()` before
anything else touches JAX, with `--coordinator_address`, `--num_processes` and `--process_id` when
they are given (auto-detected on Cloud TPU and under SLURM otherwise); see `scripts/`.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from vcp_jax import config_paths, config_utils

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and metrics.json go.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host runs).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (with --distributed).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --distributed).")
flags.DEFINE_integer("process_id", None, "This process's index (with --distributed).")
flags.DEFINE_string(
    "compilation_cache", "~/.cache/vcp_jax/jax_cache",
    "JAX's persistent compilation cache: a rerun, a resumed run or a stage that compiles the same "
    "step again (the demo's VCP and random-init runs) loads it instead of compiling. Empty to "
    "disable; JAX_COMPILATION_CACHE_DIR, when set, wins.")

TASKS = ("pretrain", "finetune", "retrieval", "probe", "demo")
LOG_FILE = "log.txt"


def run_task(config: Any, workdir: str | Path) -> dict[str, Any]:
    """Runs `config.task` in `workdir`; importable from notebooks (no flags involved)."""
    task = config_utils.check_choice(config, "task", TASKS)
    module = importlib.import_module(f"vcp_jax.{task}")
    return module.run(config, workdir)


def setup_logging(workdir: Path, verbosity: int) -> Path:
    """Library logs to `workdir/log.txt`; the console gets only their errors unless `verbosity`
    is 1 (info) or more. Process 0 writes `log.txt`, every other process `log.<index>.txt`."""
    # Quiet the console before anything initialises a JAX backend (which logs at INFO).
    console_level = {0: logging.ERROR, 1: logging.INFO}.get(max(verbosity, 0), logging.DEBUG)
    absl_logging.get_absl_handler().setLevel(console_level)
    import jax  # noqa: PLC0415 - after jax.distributed.initialize()

    workdir.mkdir(parents=True, exist_ok=True)
    index = jax.process_index()
    path = workdir / (LOG_FILE if index == 0 else f"log.{index}.txt")
    file_handler = logging.FileHandler(path)
    file_handler.setFormatter(absl_logging.PythonFormatter())
    file_handler.setLevel(logging.DEBUG if verbosity > 1 else logging.INFO)
    root = logging.getLogger()
    root.addHandler(file_handler)
    root.setLevel(min(root.level or logging.INFO, logging.INFO))
    # Python warnings (deprecations from libraries) go to the log file, not the console.
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").propagate = False
    logging.getLogger("py.warnings").addHandler(file_handler)
    return path


def initialize_distributed() -> None:
    import jax  # noqa: PLC0415

    kwargs = {}
    if FLAGS.coordinator_address:
        kwargs["coordinator_address"] = FLAGS.coordinator_address
    if FLAGS.num_processes is not None:
        kwargs["num_processes"] = FLAGS.num_processes
    if FLAGS.process_id is not None:
        kwargs["process_id"] = FLAGS.process_id
    jax.distributed.initialize(**kwargs)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.distributed or FLAGS.coordinator_address:
        initialize_distributed()
    enable_compilation_cache(FLAGS.compilation_cache)
    workdir = Path(FLAGS.workdir).expanduser()
    setup_logging(workdir, FLAGS.verbosity)
    try:
        run_task(FLAGS.config, workdir)
    except config_utils.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def enable_compilation_cache(path: str) -> None:
    """JAX's persistent compilation cache in `path` (unless disabled or set by the environment).

    Only compilations of a second or more are stored (JAX's default threshold), so the cache holds
    the train, eval and test steps, not the many small helper programs.
    """
    import jax  # noqa: PLC0415 - after jax.distributed.initialize()
    from jax.experimental.compilation_cache import compilation_cache  # noqa: PLC0415

    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or not path:
        return
    jax.config.update("jax_compilation_cache_dir", str(Path(path).expanduser()))
    # Importing the configs may already have compiled something, and JAX decides once whether
    # the cache is on: make it decide again.
    compilation_cache.reset_cache()


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with an unknown `--config.key` named together with its near misses."""
    try:
        return FLAGS(config_paths.resolve_config_flag(argv))
    except flags.Error as e:
        message = str(e)
        if "Error whilst parsing config file" in message:
            # ml_collections puts the config file's whole traceback in the message: keep the
            # error itself (e.g. "ValueError: dataset='kinetics': choose one of [...]").
            lines = [line.strip() for line in message.splitlines() if line.strip()]
            message = f"{argv_config(argv)}: {lines[-1]}"
    except (AttributeError, KeyError) as e:  # ml_collections: an override of a key that is absent
        message = config_utils.unknown_override_message(argv, e)
    sys.stderr.write(f"error: {message}\nPass --helpshort or --helpfull to see the flags.\n")
    sys.exit(2)


def argv_config(argv: list[str]) -> str:
    """The `--config` value of a command line, for messages."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return "--config"


def run() -> None:
    """The entry point (`main.py` and the installed `vcp-jax` command)."""
    flags.mark_flags_as_required(["config", "workdir"])
    # Listed by --helpshort under the installed `vcp-jax` command too, not only under main.py.
    for name in ("config", "workdir", "distributed", "coordinator_address", "num_processes",
                 "process_id", "compilation_cache"):
        FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[name])
    app.run(main, flags_parser=parse_flags)
