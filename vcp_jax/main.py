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

Before any data or compile work the workdir is created, a small file is written into it (a
path under a file, a read-only folder or a full disk end here, in one line) and it is locked
(`<workdir>/run.lock`: one run per workdir; process 0 of a multi-host run locks for all). A run
that resumes its checkpoints with another config is refused, naming the keys, unless
`--allow_config_change` names them. Exit status (docs/faults.md): 0 done, 1 a bug (traceback),
2 a user error, 3 training diverged, 128 + n stopped by signal n (143 SIGTERM, 130 SIGINT) after
saving a checkpoint.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from vcp_jax import config_paths, config_utils, host_memory
from vcp_jax import workdir as workdir_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and metrics.json go.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host runs).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (with --distributed).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --distributed).")
flags.DEFINE_integer("process_id", None, "This process's index (with --distributed).")
flags.DEFINE_list(
    "allow_config_change", [],
    "Config keys (or sections, e.g. 'optimizer') whose new values a resumed run accepts, "
    "comma-separated: e.g. num_train_steps to train a finished run further. Without it, a "
    "run that resumes checkpoints written with another model, data, cloze, optimizer, batch "
    "size or step count is refused, naming the keys.")
flags.DEFINE_string(
    "compilation_cache", "~/.cache/vcp_jax/jax_cache",
    "JAX's persistent compilation cache: a rerun, a resumed run or a stage that compiles the same "
    "step again (the demo's VCP and random-init runs) loads it instead of compiling. Empty to "
    "disable; JAX_COMPILATION_CACHE_DIR, when set, wins.")

TASKS = ("pretrain", "finetune", "retrieval", "probe", "demo")
LOG_FILE = "log.txt"


def stages() -> dict[str, Callable[[Any, Path], dict[str, Any]]]:
    """Who runs what: the function each `config.task` (one of `TASKS`) calls.

    Imported when a run starts, not with this module: after `--distributed` has initialised
    JAX, and without the stages' libraries for `--help` and config errors.
    """
    from vcp_jax import demo, finetune, pretrain, probe, retrieval  # noqa: PLC0415

    return {"pretrain": pretrain.run, "finetune": finetune.run, "retrieval": retrieval.run,
            "probe": probe.run, "demo": demo.run}


def run_task(config: Any, workdir: str | Path) -> dict[str, Any]:
    """Runs `config.task` in `workdir`; importable from notebooks (no flags involved)."""
    host_memory.configure(config)  # in a notebook, effective only before any JAX work
    config_utils.migrate_deprecated_keys(config)
    task = config_utils.check_choice(config, "task", TASKS)
    return stages()[task](config, workdir)


class _QuietFileHandler(logging.FileHandler):
    """A log file that stops, silently, when it cannot be written (a full disk): Python's
    default prints a traceback to the console for every record, hundreds of lines that bury
    the one message saying what failed."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        del record
        self.setLevel(logging.CRITICAL + 1)


def _not_library_failure_noise(record: logging.LogRecord) -> bool:
    """Console filter: Orbax's and asyncio's error records (with their tracebacks) stay in the
    log file; the failures behind them reach the console as one message (a `UserError`)."""
    return not ("/orbax/" in record.pathname or record.name == "asyncio")


def _unraisablehook_for_closed_loops(previous: Any) -> Any:
    """`sys.unraisablehook`, minus TensorStore's callbacks failing on Orbax's closed event loop.

    After a failed checkpoint read or write (a damaged checkpoint, a full disk), TensorStore's
    pending callbacks each report `RuntimeError: Event loop is closed`: hundreds of tracebacks
    after the failure itself, which is reported as one message. They go to the log file.
    """

    def hook(unraisable: Any) -> None:
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            logging.info("after a failed checkpoint operation: %s", value)
            return
        previous(unraisable)

    hook.quiets_closed_loops = True  # type: ignore[attr-defined]
    return hook


def setup_console(verbosity: int) -> None:
    """The console gets only the libraries' errors unless `verbosity` is 1 (info) or more."""
    # Quiet the console before anything initialises a JAX backend (which logs at INFO).
    console_level = {0: logging.ERROR, 1: logging.INFO}.get(max(verbosity, 0), logging.DEBUG)
    handler = absl_logging.get_absl_handler()
    handler.setLevel(console_level)
    if verbosity < 1 and _not_library_failure_noise not in handler.filters:
        handler.addFilter(_not_library_failure_noise)
    if verbosity < 1 and not getattr(sys.unraisablehook, "quiets_closed_loops", False):
        sys.unraisablehook = _unraisablehook_for_closed_loops(sys.unraisablehook)


def setup_logging(workdir: Path, verbosity: int) -> Path:
    """Library logs to `workdir/log.txt`; the console gets only their errors unless `verbosity`
    is 1 (info) or more. Process 0 writes `log.txt`, every other process `log.<index>.txt`."""
    setup_console(verbosity)
    import jax  # noqa: PLC0415 - after jax.distributed.initialize()

    workdir_lib.make_dir(workdir, "--workdir")
    index = jax.process_index()
    path = workdir / (LOG_FILE if index == 0 else f"log.{index}.txt")
    try:
        file_handler = _QuietFileHandler(path)
    except OSError as e:
        raise workdir_lib.StorageError(
            f"cannot write the log {path}: {workdir_lib.describe_os_error(e)}") from None
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
    host_memory.configure(FLAGS.config)  # before JAX starts its threads (host_memory.py)
    if FLAGS.distributed or FLAGS.coordinator_address:
        initialize_distributed()
    enable_compilation_cache(FLAGS.compilation_cache)
    setup_console(FLAGS.verbosity)
    from vcp_jax import checkpointing, signals  # noqa: PLC0415 - after distributed init

    workdir = Path(FLAGS.workdir).expanduser()
    lock = None
    try:
        # Before run_task: a renamed key that the config file sets yields to the command line.
        config_utils.migrate_deprecated_keys(FLAGS.config, config_utils.override_keys(sys.argv))
        allowed = check_allowed_changes(FLAGS.config, FLAGS.allow_config_change)
        lock = open_workdir(workdir)
        setup_logging(workdir, FLAGS.verbosity)
        with signals.handle_signals(), checkpointing.allow_config_changes(allowed):
            run_task(FLAGS.config, workdir)
    except config_utils.UserError as e:
        # A run stopped by a signal did what it was asked: no "error:" for it.
        prefix = "" if isinstance(e, signals.Stopped) else "error: "
        print(f"{prefix}{e}", file=sys.stderr, flush=True)
        sys.exit(getattr(e, "exit_code", 2))
    finally:
        if lock is not None:
            lock.release()


def open_workdir(workdir: Path) -> workdir_lib.WorkdirLock | None:
    """Creates and probes `workdir` on every process, then locks it on process 0 (None
    elsewhere); a failure on any process stops all of them, each with one message."""
    import jax  # noqa: PLC0415

    error: config_utils.UserError | None = None
    lock = None
    try:
        workdir_lib.prepare(workdir)
    except config_utils.UserError as e:
        error = e
    if not workdir_lib.all_processes_ok(error is None):
        raise error or config_utils.UserError("another process could not use the workdir; "
                                              "see its message")
    if jax.process_index() == 0:
        try:
            lock = workdir_lib.WorkdirLock.acquire(workdir)
        except config_utils.UserError as e:
            error = e
    if not workdir_lib.all_processes_ok(error is None):
        raise error or config_utils.UserError("process 0 could not lock the workdir; see its "
                                              "message")
    if lock is not None and lock.taken_over is not None:
        print(f"took over the lock {lock.path} of "
              f"{workdir_lib.describe_owner(lock.taken_over)}, which is gone", flush=True)
    return lock


def check_allowed_changes(config: Any, keys: list[str]) -> list[str]:
    """The `--allow_config_change` entries without a leading 'config.'; each must be a key or a
    section of the config."""
    known = config_utils.flat_keys(config)
    checked = []
    for key in keys:
        key = key.strip().removeprefix("config.")
        if not any(k == key or k.startswith(key + ".") for k in known):
            near = config_utils.nearest_keys(key, known)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise config_utils.UserError(
                f"--allow_config_change: {key} is not a key of the config{hint}")
        checked.append(key)
    return checked


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
    renamed = config_utils.rename_deprecated_overrides(argv)
    if renamed != list(argv):
        # ml_collections reads the `--config.` overrides from sys.argv itself.
        argv = sys.argv[:] = renamed
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
    for name in ("config", "workdir", "allow_config_change", "distributed",
                 "coordinator_address", "num_processes", "process_id", "compilation_cache"):
        FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[name])
    app.run(main, flags_parser=parse_flags)
