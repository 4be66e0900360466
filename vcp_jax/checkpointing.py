"""Orbax checkpoints: a training run's own (resume, best validation loss) and the hand-over of a
backbone from one stage to the next (pretrain -> fine-tune / retrieval / probe).

A run's checkpoint holds the train state (params, BatchNorm statistics, optimizer state, step,
rng) and the resolved config; the data stream needs no state of its own, as its position is a
function of the step (`input_pipeline`). Saves are asynchronous. The last
`keep_checkpoints` are kept, plus the one with the lowest validation loss (`best.json` names it;
the next stage starts from it).

A backbone is read out of any such checkpoint with `load_backbone(path)`: only the `backbone`
subtree of the parameters and of the BatchNorm statistics is restored (Orbax partial restore),
together with the config that built it, so a later stage rebuilds the same architecture without
the user repeating it. `save_backbone` writes a checkpoint with nothing but a backbone (what the
PyTorch converter produces); `load_backbone` reads both kinds alike.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from vcp_jax.config_utils import UserError

BEST_FILE = "best.json"
CHECKPOINTS_DIR = "checkpoints"
BACKBONE = "backbone"  # the name of the backbone's subtree in every model (VCPModel, Classifier)


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable or does not fit the model; names the path."""


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
        """Saves asynchronously; `metrics['val_loss']` (if any) ranks it for the best one."""
        metrics = {k: v for k, v in (metrics or {}).items()
                   if isinstance(v, int | float) and not _is_nan(v)} or None
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                config=ocp.args.JsonSave(config_to_dict(self.config)),
            ),
            metrics=metrics,
        )
        if metrics and "val_loss" in metrics and jax.process_index() == 0:
            best = _read_best(self.directory)
            if best is None or metrics["val_loss"] < best["val_loss"]:
                (self.directory / BEST_FILE).write_text(
                    json.dumps({"step": step, "val_loss": metrics["val_loss"]}) + "\n"
                )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore_latest(self, state: Any) -> tuple[Any, int]:
        """(restored state, step) from the newest checkpoint, or (`state`, 0) when there is none.

        `state` gives the structure, shapes and dtypes.
        """
        step = self.manager.latest_step()
        if step is None:
            return state, 0
        return self.restore_state(state, step), int(step)

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

    def best_step(self) -> int | None:
        """The step with the lowest validation loss saved so far, if any was evaluated.

        None also when that save never reached the disk (the run died while it was in flight).
        """
        best = _read_best(self.directory)
        if best is None or int(best["step"]) not in self.manager.all_steps():
            return None
        return int(best["step"])

    def wait(self) -> None:
        """Blocks until the asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as plain JSON data (what a checkpoint and provenance.json store)."""
    return json.loads(config.to_json_best_effort())


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _read_best(directory: Path) -> dict[str, Any] | None:
    path = directory / BEST_FILE
    return json.loads(path.read_text()) if path.is_file() else None


# --------------------------------------------------------------------------------------------
# Stage to stage: the backbone of a checkpoint
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BackboneCheckpoint:
    """A backbone read from a checkpoint: flat `'conv1/kernel' -> array` maps and provenance."""

    params: dict[str, np.ndarray]
    batch_stats: dict[str, np.ndarray]
    config: dict[str, Any]  # the resolved config of the run that wrote it
    path: Path  # the checkpoint's step folder
    step: int
    dropped: tuple[str, ...]  # top-level parameter subtrees that were not loaded (the heads)

    @property
    def arch(self) -> str:
        return self.config["model"]["arch"]

    @property
    def width(self) -> int:
        return int(self.config["model"]["width"])

    @property
    def task(self) -> str:
        return self.config.get("task", "pretrain")

    @property
    def fold(self) -> int | None:
        """The fold whose train split the checkpoint was fine-tuned on (None: pretraining)."""
        fold = self.config.get("finetune", {}).get("fold") if self.task == "finetune" else None
        return int(fold) if fold is not None else None

    @property
    def num_params(self) -> int:
        return sum(int(np.prod(v.shape)) for v in self.params.values())

    def describe(self) -> str:
        return (f"{self.arch} width {self.width} backbone ({self.num_params:,} parameters, "
                f"{len(self.batch_stats)} BatchNorm statistics) from the {self.task} checkpoint "
                f"{self.path} (step {self.step})")


def find_own_steps(workdir: str | Path) -> list[int]:
    """The checkpoint steps already on disk in a run's `workdir` (empty for a new run)."""
    directory = Path(workdir).expanduser() / CHECKPOINTS_DIR
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir()
                  if p.name.isdigit() and (p / "state").is_dir())


def find_checkpoint(path: str | Path) -> tuple[Path, int]:
    """(step folder, step) for a workdir, its `checkpoints/` folder or one step folder.

    In a folder of steps: the best-validation-loss step (`best.json`) when it is on disk, else the
    latest. Raises `CheckpointError` naming the path and what was found instead.
    """
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise CheckpointError(f"init_from: {path} does not exist")
    if (path / "state").is_dir() and path.name.isdigit():
        return path, int(path.name)
    directory = path / CHECKPOINTS_DIR if (path / CHECKPOINTS_DIR).is_dir() else path
    steps = sorted(int(p.name) for p in directory.iterdir()
                   if p.name.isdigit() and (p / "state").is_dir())
    if not steps:
        children = sorted(p.name for p in path.iterdir())[:10]
        nested = sorted(str(p.parent.parent.relative_to(path))
                        for p in path.glob(f"*/{CHECKPOINTS_DIR}/*/state"))
        hint = (f"; did you mean one of its stages: {', '.join(dict.fromkeys(nested))}?"
                if nested else f" (it holds: {', '.join(children) or 'nothing'})")
        raise CheckpointError(f"init_from: no checkpoint in {directory}{hint}")
    best = _read_best(directory)
    step = int(best["step"]) if best is not None and int(best["step"]) in steps else steps[-1]
    return directory / str(step), step


def read_config(step_dir: Path) -> dict[str, Any]:
    """The config stored with a checkpoint step."""
    try:
        return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir / "config")
    except Exception as e:  # noqa: BLE001 - any unreadable config is the same user error
        raise CheckpointError(
            f"init_from: cannot read the config stored in {step_dir}: {e}") from e


def flatten(tree: Mapping[Any, Any]) -> dict[str, np.ndarray]:
    """A nested dict of arrays as `{'a/b/c': array}` (int keys of NNX lists become '0', '1')."""
    flat, _ = jax.tree_util.tree_flatten_with_path(dict(tree))
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): np.asarray(v)
            for path, v in flat}


def load_backbone(path: str | Path) -> BackboneCheckpoint:
    """The backbone parameters and BatchNorm statistics of the checkpoint at `path`.

    `path`: a workdir, its `checkpoints/` folder or one step folder (see `find_checkpoint`).
    Restores nothing else (no head, no optimizer state): an Orbax partial restore.
    """
    step_dir, step = find_checkpoint(path)
    config = read_config(step_dir)
    if "model" not in config or "arch" not in config["model"]:
        raise CheckpointError(f"init_from: the config in {step_dir} names no model.arch")
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        metadata = checkpointer.metadata(step_dir / "state").item_metadata.tree
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"init_from: cannot read the state in {step_dir}: {e}") from e
    missing = [k for k in ("params", "batch_stats")
               if BACKBONE not in (metadata.get(k) or {})]
    if missing:
        raise CheckpointError(
            f"init_from: the checkpoint {step_dir} has no backbone ({' and '.join(missing)} "
            f"lack a '{BACKBONE}' subtree; it holds {sorted(metadata.get('params') or {})})"
        )
    target = {k: {BACKBONE: metadata[k][BACKBONE]} for k in ("params", "batch_stats")}
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), target)
    restored = checkpointer.restore(
        step_dir / "state",
        args=ocp.args.PyTreeRestore(
            item=abstract,
            restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                      abstract),
            partial_restore=True,
        ),
    )
    return BackboneCheckpoint(
        params=_without_variable_keys(flatten(restored["params"][BACKBONE])),
        batch_stats=_without_variable_keys(flatten(restored["batch_stats"][BACKBONE])),
        config=config,
        path=step_dir,
        step=step,
        dropped=tuple(sorted(str(k) for k in metadata["params"] if k != BACKBONE)),
    )


def _without_variable_keys(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """'conv1/kernel/value' -> 'conv1/kernel': a saved `nnx.State` stores each Variable's array
    under a 'value' key; a pure dict (`save_backbone`, the converter) does not."""
    return {k.removesuffix("/value"): v for k, v in flat.items()}


def save_backbone(
    workdir: str | Path,
    *,
    params: Mapping[str, Any],
    batch_stats: Mapping[str, Any],
    config: ml_collections.ConfigDict | Mapping[str, Any],
    step: int = 0,
) -> Path:
    """Writes a checkpoint holding only a backbone, which `init_from=workdir` accepts.

    `params` / `batch_stats`: the backbone's nested dicts, as
    `nnx.state(backbone, nnx.Param).to_pure_dict()` gives them. `config` must name
    `model.arch` and `model.width`. Returns the step folder.
    """
    if isinstance(config, ml_collections.ConfigDict):
        config = config_to_dict(config)
    directory = Path(workdir).expanduser().absolute() / CHECKPOINTS_DIR
    with ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(create=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()},
    ) as manager:
        state = {"params": {BACKBONE: dict(params)}, "batch_stats": {BACKBONE: dict(batch_stats)}}
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(jax.tree.map(np.asarray, state)),
            config=ocp.args.JsonSave(dict(config)),
        ))
        manager.wait_until_finished()
    return directory / str(step)


def assign_backbone(
    target: Mapping[str, Any], loaded: Mapping[str, np.ndarray], *, what: str, source: Path
) -> dict[str, Any]:
    """`target` (a backbone's nested pure dict) with every leaf replaced by `loaded`'s value.

    Every key must be present on both sides with the same shape; an error names the key.
    """
    flat_target = flatten(target)
    missing = sorted(set(flat_target) - set(loaded))
    unexpected = sorted(set(loaded) - set(flat_target))
    if missing or unexpected:
        raise CheckpointError(
            f"init_from: the {what} in {source} do not fit this backbone: "
            + "; ".join(filter(None, [
                f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}" if missing else "",
                f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
                if unexpected else "",
            ]))
        )
    for key, value in flat_target.items():
        if value.shape != loaded[key].shape:
            raise CheckpointError(
                f"init_from: {what} {key!r} in {source} has shape {loaded[key].shape}, this "
                f"backbone expects {value.shape}"
            )

    def replace(path: tuple[Any, ...], leaf: Any) -> Any:
        key = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        return loaded[key].astype(np.asarray(leaf).dtype)

    return jax.tree_util.tree_map_with_path(replace, dict(target))
