"""Orbax checkpoints of a training run: resume, the best validation loss, damaged steps.

A run's checkpoint holds the train state (params, BatchNorm statistics, optimizer state, step,
rng) and the resolved config; the data stream needs no state of its own, as its position is a
function of the step (`input_pipeline`). Saves are asynchronous. The last
`keep_checkpoints` are kept, plus the one with the lowest validation loss (`best.json` names it;
the next stage starts from it). Handing a backbone from one stage to the next (reading it out of
such a checkpoint, or writing one that holds nothing else) is `vcp_jax.backbone`'s.

What is refused or survived (docs/faults.md): a state with a non-finite value is never saved
(nor ranked best); a resumed run's config is compared with the one stored in the checkpoint
(`check_resume_config`; changes to what is trained are refused unless `allow_config_changes`
names them) and the restored shapes with the model's; a checkpoint that cannot be restored is
reported by its step and moved aside, and the previous intact one is used; a failed save (full
disk, read-only folder) is one `StorageError` naming the path and the cause. After each
completed save a marker file (`SAVED_MARKER`) names the step, for whoever waits on the disk.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from vcp_jax import config_utils
from vcp_jax.config_utils import ConfigError, UserError
from vcp_jax.workdir import StorageError, describe_os_error, storage_errno

BEST_FILE = "best.json"
CHECKPOINTS_DIR = "checkpoints"


BROKEN_SUFFIX = ".broken"  # a step folder that could not be restored is moved to `<step>.broken`


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable or does not fit the model; names the path."""


class NonFiniteError(CheckpointError):
    """A state (or a backbone) holds NaN or infinite values: never saved, never loaded."""


class ConfigChangeError(ConfigError):
    """A resumed run's config differs from its checkpoint's in keys that change what it trains."""


class RunCheckpoints:
    """A run's `CheckpointManager` in `directory`, with the items `state` and `config`."""

    def __init__(self, directory: Path, config: ml_collections.ConfigDict):
        self.directory = Path(directory).absolute()
        self.config = config
        policy = checkpoint_managers.AnyPreservationPolicy([
            checkpoint_managers.LatestN(n=config.keep_checkpoints),
            checkpoint_managers.BestN(
                get_metric_fn=lambda metrics: metrics["val_loss"],
                reverse=True,  # sorted from highest to lowest loss; the last n are kept
                n=1,
                keep_checkpoints_without_metrics=False,
            ),
        ])
        self._in_flight: int | None = None  # the step of the save still being written
        with storage_errors(f"cannot use the checkpoint folder {self.directory}"):
            self.manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(
                    preservation_policy=policy,
                    enable_async_checkpointing=True,
                    create=True,
                ),
                item_handlers={
                    "state": ocp.StandardCheckpointHandler(),
                    "config": ocp.JsonCheckpointHandler(),
                },
            )

    def save(self, step: int, state: Any, *, metrics: dict[str, Any] | None = None) -> None:
        """Saves asynchronously; a finite `metrics['val_loss']` ranks it for the best one.

        A state holding a NaN or an infinity is refused (`NonFiniteError`): a diverged run must
        not replace the checkpoints it could be resumed from. Storage failures (of this save, or
        of the previous one, which Orbax reports here) are a `StorageError`.
        """
        if not tree_is_finite(state):
            raise NonFiniteError(
                f"the state at step {step} holds non-finite values; it was not saved")
        metrics = {k: v for k, v in (metrics or {}).items()
                   if isinstance(v, int | float) and math.isfinite(v)}
        # Only a finite validation loss ranks a checkpoint (the best-N policy reads it).
        metrics = metrics if "val_loss" in metrics else None
        with self._save_errors(step):
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    config=ocp.args.JsonSave(config_to_dict(self.config)),
                ),
                metrics=metrics,
            )
            self._in_flight = step
            if metrics and jax.process_index() == 0:
                best = read_best(self.directory)
                if best is None or metrics["val_loss"] < best["val_loss"]:
                    (self.directory / BEST_FILE).write_text(
                        json.dumps({"step": step, "val_loss": metrics["val_loss"]}) + "\n"
                    )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def saved_steps(self) -> list[int]:
        """The steps whose checkpoints are complete on disk, read from the disk."""
        return find_own_steps(self.directory.parent, self.directory.name)

    def restore_latest(self, state: Any) -> tuple[Any, int]:
        """(restored state, step) from the newest intact checkpoint, or (`state`, 0) without one.

        `state` gives the structure, shapes and dtypes. See `restore_newest`.
        """
        if self.manager.latest_step() is None:
            return state, 0
        restored, step, _ = self.restore_newest(state)
        return restored, step

    def restore_newest(
        self, state: Any, *, check_config: Callable[[int, dict[str, Any]], None] | None = None,
    ) -> tuple[Any, int, list[str]]:
        """(state, step, warnings) from the newest checkpoint that restores, newest first.

        Before each candidate is read, `check_config(step, stored_config)` may refuse it (a
        changed config is never crossed silently, whichever step it is met at) and its shapes are
        compared with `state`'s (a mismatch is an error, not a damaged checkpoint). A checkpoint
        that cannot be read, or holds non-finite values, is moved to `<step>.broken` and the
        previous one is tried; each such step is named in the warnings.
        """
        warnings: list[str] = []
        broken: list[int] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            step_dir = self.directory / str(step)
            try:
                stored = read_config(step_dir, what="resume")
            except CheckpointError:
                warnings.append(f"the checkpoint of step {step} cannot be restored (its config "
                                f"cannot be read)")
                broken.append(step)
                continue
            if check_config is not None:
                check_config(step, stored)
            reason = self._restore_problem(state, step_dir)
            restored = None
            if reason is None:
                try:
                    restored = self.restore_state(state, step)
                except Exception as e:  # noqa: BLE001 - any failure to read is a damaged step
                    reason = short_reason(e)
            if reason is None and not tree_is_finite(restored):
                reason = "it holds non-finite values (saved by a diverged run)"
            if reason is not None:
                warnings.append(f"the checkpoint of step {step} cannot be restored ({reason})")
                broken.append(step)
                continue
            if broken:
                moved = self._move_aside(broken)
                warnings.append(f"moved {'; '.join(moved)}; resuming from the checkpoint of "
                                f"step {step} instead")
            return restored, step, warnings
        raise CheckpointError(
            f"no checkpoint in {self.directory} can be restored: {'; '.join(warnings)}. Delete "
            f"the folder (or choose another --workdir) to start again")

    def _restore_problem(self, state: Any, step_dir: Path) -> str | None:
        """Why the state in `step_dir` cannot be restored into `state` (None: it looks fine).

        Reads the checkpoint's metadata only, so a damaged checkpoint is found without the
        restore machinery's own failure messages. A structure or shape that differs from the
        model's raises: the config or the code changed, and an older step would not fit either.
        """
        try:
            metadata = ocp.PyTreeCheckpointer().metadata(step_dir / "state").item_metadata
            stored = {_key(path): tuple(m.shape) for path, m in
                      jax.tree_util.tree_flatten_with_path(metadata.tree)[0]}
        except Exception:  # noqa: BLE001 - unreadable metadata: a damaged checkpoint
            return "its state's metadata cannot be read"
        wanted = {_key(path): tuple(np.shape(x)) for path, x in
                  jax.tree_util.tree_flatten_with_path(state)[0]}
        missing = sorted(set(wanted) - set(stored))
        extra = sorted(set(stored) - set(wanted))
        wrong = [f"{k} {stored[k]} (the model's: {wanted[k]})"
                 for k in sorted(set(stored) & set(wanted)) if stored[k] != wanted[k]]
        if missing or extra or wrong:
            parts = [f"missing {some(missing)}" if missing else "",
                     f"unexpected {some(extra)}" if extra else "",
                     f"shapes {some(wrong)}" if wrong else ""]
            raise CheckpointError(
                f"the checkpoint {step_dir} does not fit this run's model: "
                + "; ".join(p for p in parts if p)
                + ". Was it written by another config or version? Resume it with the config it "
                "was written with, or choose another --workdir")
        return None

    def _move_aside(self, steps: list[int]) -> list[str]:
        """Moves step folders to `<step>.broken` (process 0; every process then reloads)."""
        moved = []
        for step in steps:
            source = self.directory / str(step)
            target = source.with_name(f"{step}{BROKEN_SUFFIX}")
            if jax.process_index() == 0:
                with storage_errors(f"cannot move the damaged checkpoint {source} aside"):
                    if target.exists():
                        shutil.rmtree(target)
                    source.rename(target)
            moved.append(f"step {step} to {target}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils  # noqa: PLC0415

            multihost_utils.sync_global_devices("vcp_jax_moved_broken_checkpoints")
        self.manager.reload()
        return moved

    def restore_state(self, state: Any, step: int) -> Any:
        """The state of checkpoint `step` as host numpy arrays (the strategy places them).

        `state` gives the structure, shapes and dtypes. Host arrays, not device arrays, because
        the devices that saved a checkpoint are not always this run's (another host count, or
        an array committed to one host's device, which other hosts cannot read).
        """
        abstract = jax.tree.map(lambda x: np.zeros(np.shape(x), x.dtype), state)
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )
        return restored["state"]

    def check_free_space(self, state: Any) -> None:
        """A `StorageError` when the disk cannot hold one more checkpoint of `state`.

        Checked before training, so a nearly full disk is reported in seconds, not at the
        first save (`shutil.disk_usage`; file systems that report no real figure pass).
        """
        needed = sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
                     for x in jax.tree.leaves(state))
        try:
            free = shutil.disk_usage(self.directory).free
        except OSError:
            return
        if 0 < free < needed:
            raise StorageError(
                f"the checkpoint folder {self.directory} has {free / 2**20:.1f} MiB free; a "
                f"checkpoint of this run needs about {needed / 2**20:.1f} MiB")

    def best_step(self) -> int | None:
        """The step with the lowest validation loss saved so far, if any was evaluated.

        None also when that save never reached the disk (the run died while it was in flight).
        """
        best = read_best(self.directory)
        if best is None or int(best["step"]) not in self.manager.all_steps():
            return None
        return int(best["step"])

    def wait(self) -> None:
        """Blocks until the asynchronous saves are on disk (`StorageError` if one failed)."""
        with self._save_errors(None):
            self.manager.wait_until_finished()
            self._in_flight = None

    def close(self) -> None:
        with self._save_errors(None):
            self.manager.close()
            self._in_flight = None

    def _save_errors(self, step: int | None) -> contextlib.AbstractContextManager[None]:
        """A failed save as one `StorageError`: the path, the cause, the last complete step."""

        def message(cause: str) -> str:
            saved = self.saved_steps()
            last = (f"the last complete checkpoint is step {saved[-1]}" if saved
                    else "no checkpoint is complete")
            # Orbax reports a failed asynchronous save when the next save (or the wait) starts.
            failed = self._in_flight if self._in_flight is not None else step
            which = f"the checkpoint of step {failed}" if failed is not None else "a checkpoint"
            return (f"cannot save {which} in {self.directory}: {cause}; {last}. Free some space "
                    f"(or fix the folder) and run the same command again to resume")

        return _as_storage_error(message)


@contextlib.contextmanager
def _as_storage_error(message: Callable[[str], str]) -> Iterator[None]:
    """Storage failures (no space, read-only, ...) as one `StorageError`: `message(cause)`."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        if storage_errno(e) is None:
            raise
        raise StorageError(message(describe_os_error(e))) from None


def storage_errors(what: str) -> contextlib.AbstractContextManager[None]:
    return _as_storage_error(lambda cause: f"{what}: {cause}")


def _key(path: tuple[Any, ...]) -> str:
    """A pytree path as 'params/backbone/conv1/kernel/value', alike for a state and its
    checkpoint's metadata (attribute names, dict keys and sequence indices all as names)."""
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def some(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f" ... ({len(items)} in all)" if len(items) > n else "")


def short_reason(error: BaseException) -> str:
    """The first line of a restore failure, shortened (TensorStore's run to many lines)."""
    text = str(error).strip().splitlines()
    first = text[0] if text else type(error).__name__
    return first if len(first) <= 200 else first[:200] + " ..."


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def tree_is_finite(tree: Any) -> bool:
    """Whether every floating-point value of `tree` is finite.

    Host arrays are checked on the host; device arrays with one small jitted reduction (every
    process calls it with the same global arrays, so all get the same answer).
    """
    leaves = [x for x in jax.tree.leaves(tree)
              if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
    if not leaves:
        return True
    if all(isinstance(x, np.ndarray | np.generic) for x in leaves):
        return all(bool(np.isfinite(x).all()) for x in leaves)
    return bool(np.asarray(_all_finite(leaves)))


# --------------------------------------------------------------------------------------------
# Resuming with a changed config
# --------------------------------------------------------------------------------------------

# Keys that may differ between a run and the checkpoints it resumes: how it is executed, logged
# and saved, and where its data is read from, not what it trains. Every other difference is
# refused unless named by `allow_config_changes` (main.py's --allow_config_change).
RESUME_FREE_KEYS = (
    "init_from",  # unused when a run resumes its own checkpoints
    "parallel", "prefetch_to_device",
    "log_every_steps", "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints",
    "data.data_dir", "data.num_threads", "data.num_workers",
    "data.synthetic.manual_dir", "data.synthetic.build_workers", "data.synthetic.workers",
    "model.conv_impl",  # the same parameters and results, computed another way
    # A resumed frozen backbone keeps its checkpoint's BatchNorm statistics.
    "bn_recalibration", "bn_recalibration_clips",
    # The test after training, not the training.
    "finetune.num_test_clips", "finetune.test_batch_size", "finetune.folds",
    "cache_dir",
)

_ALLOWED_CHANGES: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "allowed_config_changes", default=())


@contextlib.contextmanager
def allow_config_changes(keys: Iterable[str]) -> Iterator[None]:
    """Within the block, a resumed run accepts new values of `keys` (a key, or a section such
    as 'optimizer' for all of its keys): what main.py's `--allow_config_change` sets."""
    token = _ALLOWED_CHANGES.set(tuple(keys))
    try:
        yield
    finally:
        _ALLOWED_CHANGES.reset(token)


def _covers(patterns: Iterable[str], key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in patterns)


def config_changes(
    stored: Mapping[str, Any], config: ml_collections.ConfigDict, *, skip_unset: bool = False,
) -> list[tuple[str, Any, Any]]:
    """(key, stored value, new value) for each key whose value differs, free keys left out.

    Keys that only one side has (a config written by an older version) are not compared;
    with `skip_unset`, neither are keys the new config leaves unset (None: a stage fills them
    in later, e.g. fine-tuning's `num_train_steps` from `num_epochs`).
    """
    changes: list[tuple[str, Any, Any]] = []

    def walk(old: Any, new: Any, prefix: str) -> None:
        if _covers(RESUME_FREE_KEYS, prefix):
            return
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            for k in sorted(set(old) & set(new)):
                walk(old[k], new[k], f"{prefix}.{k}" if prefix else str(k))
        elif old != new and not (skip_unset and new is None):
            changes.append((prefix, old, new))

    walk(_renamed_keys(stored), config_to_dict(config), "")
    return changes


def _renamed_keys(tree: Any, parent: str = "") -> Any:
    """A stored config with keys renamed since it was written under their new names
    (`data.config` -> `data.builder_config`), so a rename is not taken for a change."""
    if not isinstance(tree, Mapping):
        return tree
    renames = getattr(config_utils, "DEPRECATED_DATA_KEYS", {}) if parent == "data" else {}
    out = {}
    for key, value in tree.items():
        new = renames.get(key)
        out[new if new is not None and new not in tree else key] = _renamed_keys(value, key)
    return out


def check_resume_config(
    stored: Mapping[str, Any], config: ml_collections.ConfigDict, *, step: int, where: Path,
    skip_unset: bool = False,
) -> list[str]:
    """Refuses to resume the checkpoint of `step` (in `where`) with a config that differs in
    what it trains; returns the accepted changes, as `key old -> new`, for the console.

    Accepted: the free keys (`RESUME_FREE_KEYS`) and those `allow_config_changes` names. Never
    accepted: a `num_train_steps` below `step` (the result would be labelled with the wrong
    step).
    """
    new_steps = config.get("num_train_steps")
    if new_steps is not None and new_steps < step:
        raise ConfigError(
            f"config.num_train_steps={new_steps} is below the step of the checkpoint {where} "
            f"({step}): a run cannot be shortened after the fact; use another --workdir (with "
            f"--config.init_from={where.parent.parent} for its backbone)")
    changes = config_changes(stored, config, skip_unset=skip_unset)
    allowed = _ALLOWED_CHANGES.get()
    refused = [c for c in changes if not _covers(allowed, c[0])]
    if refused:
        shown = "; ".join(f"{k} {_short(old)} -> {_short(new)}" for k, old, new in refused[:8])
        more = f" (and {len(refused) - 8} more)" if len(refused) > 8 else ""
        flag = ",".join(dict.fromkeys(k for k, _, _ in refused))
        raise ConfigChangeError(
            f"the checkpoint {where} (step {step}) was written with another config: {shown}"
            f"{more}. Resuming would mix two runs: use another --workdir, or pass "
            f"--allow_config_change={flag} to resume with the new values")
    return [f"{k} {_short(old)} -> {_short(new)}" for k, old, new in changes]


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as plain JSON data (what a checkpoint and provenance.json store)."""
    return json.loads(config.to_json_best_effort())


def read_best(directory: Path) -> dict[str, Any] | None:
    path = directory / BEST_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):  # a damaged best.json only loses the choice of the best
        return None


def find_own_steps(workdir: str | Path, name: str = CHECKPOINTS_DIR) -> list[int]:
    """The checkpoint steps already on disk in a run's `workdir` (empty for a new run)."""
    directory = Path(workdir).expanduser() / name
    try:
        return sorted(int(p.name) for p in directory.iterdir()
                      if p.name.isdigit() and (p / "state").is_dir())
    except OSError:  # no such folder (a new run), or not a folder: the storage probe says so
        return []


def read_config(step_dir: Path, *, what: str = "init_from") -> dict[str, Any]:
    """The config stored with a checkpoint step; `what` starts the error message."""
    try:
        config = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir / "config")
    except Exception as e:  # noqa: BLE001 - any unreadable config is the same user error
        raise CheckpointError(
            f"{what}: cannot read the config stored in {step_dir}: {short_reason(e)}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{what}: the config stored in {step_dir} is not a config")
    return config

