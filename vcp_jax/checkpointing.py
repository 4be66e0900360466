"""Orbax checkpoints of a training run, and its TensorBoard scalars.

A checkpoint holds the train state (params, BatchNorm statistics, optimizer state, step, rng), the
grain iterator's position and the config. Saves are asynchronous. The last `keep_checkpoints` are
kept, plus the one with the lowest validation loss (the one fine-tuning starts from, SPEC 3).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

_BEST_FILE = "best.json"


class Checkpointer:
    """A `CheckpointManager` in `directory` with the items `state`, `data` and `config`."""

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
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=policy,
                enable_async_checkpointing=True,
                create=True,
            ),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
            },
        )

    def save(
        self, step: int, state: Any, iterator: Any, *, metrics: dict[str, float] | None = None
    ) -> None:
        metrics = {k: v for k, v in (metrics or {}).items() if not _is_nan(v)} or None
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(iterator),
                config=ocp.args.JsonSave(json.loads(self.config.to_json_best_effort())),
            ),
            metrics=metrics,
        )
        if metrics and "val_loss" in metrics and jax.process_index() == 0:
            best = self._read_best()
            if best is None or metrics["val_loss"] < best["val_loss"]:
                (self.directory / _BEST_FILE).write_text(
                    json.dumps({"step": step, "val_loss": metrics["val_loss"]}) + "\n"
                )

    def restore_latest(self, state: Any, iterator: Any) -> tuple[Any, int]:
        """(restored state, step) from the newest checkpoint, or (`state`, 0) when there is none.

        `state` gives the structure, shapes and dtypes; the iterator is moved to where it was.
        """
        step = self.manager.latest_step()
        if step is None:
            return state, 0
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract),
                data=grain.checkpoint.CheckpointRestore(iterator),
            ),
        )
        return restored["state"], int(step)

    def restore_state(self, state: Any, step: int | None = None) -> Any:
        """The state of checkpoint `step` (default: the best, else the latest), to fine-tune."""
        step = step if step is not None else (self.best_step() or self.manager.latest_step())
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )
        return restored["state"]

    def best_step(self) -> int | None:
        """The step with the lowest validation loss saved so far, if any was evaluated.

        None also when that save never reached the disk (the run died while it was in flight).
        """
        best = self._read_best()
        if best is None or int(best["step"]) not in self.manager.all_steps():
            return None
        return int(best["step"])

    def _read_best(self) -> dict[str, Any] | None:
        path = self.directory / _BEST_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def wait(self) -> None:
        """Blocks until the asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def metric_writer(workdir: Path) -> Any:
    """A tensorboardX writer in `workdir/tensorboard`."""
    from tensorboardX import SummaryWriter  # noqa: PLC0415 - imported only on the main host

    return SummaryWriter(str(Path(workdir) / "tensorboard"))


def write_scalars(writer: Any, step: int, scalars: dict[str, float], prefix: str = "") -> None:
    if writer is None:
        return
    for name, value in scalars.items():
        if isinstance(value, int | float) and not _is_nan(float(value)):
            writer.add_scalar(prefix + name, float(value), step)
    writer.flush()
