"""A backbone crossing stages: find, read, load, save and assign it; where a run starts from.

Every model (`VCPModel`, `Classifier`, retrieval's `Embedder`) holds its backbone under the name
`BACKBONE`, so a backbone moves between them by that subtree alone:

- `load_backbone(path)` reads the backbone of any run's checkpoint (a workdir, its
  `checkpoints/` folder or one step folder; the lowest-validation-loss step of a folder): only
  the `backbone` subtree of the parameters and of the BatchNorm statistics (an Orbax partial
  restore), with the config that built it, so a later stage rebuilds the same architecture
  without the user repeating it. `save_backbone` writes a checkpoint with nothing but a backbone
  (what the PyTorch converter produces); `load_backbone` reads both kinds alike.
- `resolve_init(config, workdir)`: how a run starts, resume > init_from > scratch (as big_vision
  and scenic order them), with `config.model` completed from the checkpoint; before any data or
  compile work, so a wrong `init_from` fails at once.
- `with_backbone` / `init_backbone`: a model's state with its backbone taken from a checkpoint
  (every key and shape must fit; an error names the key).
- `check_fold`: a backbone fine-tuned on one fold is never tested on another fold's test videos
  (which are its training videos).

A backbone with a non-finite value is never loaded (`check_finite_backbone`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from vcp_jax import checkpointing, config_utils, models
from vcp_jax import modality as modality_lib
from vcp_jax.checkpointing import CHECKPOINTS_DIR, CheckpointError, NonFiniteError

BACKBONE = "backbone"  # the name of the backbone's subtree in every model (VCPModel, Classifier)


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

    @property
    def pretext(self) -> str | None:
        """The pretext the backbone was pretrained with, when its config records one."""
        return self.config.get("pretext")

    @property
    def modality(self) -> modality_lib.InputModality:
        """The input the backbone was trained on (RGB when its config records none)."""
        return modality_lib.from_checkpoint_config(self.config)

    def describe(self) -> str:
        return (f"{self.arch} width {self.width} backbone ({self.num_params:,} parameters, "
                f"{len(self.batch_stats)} BatchNorm statistics) from the {self.task} checkpoint "
                f"{self.path} (step {self.step})")


def find_checkpoint(path: str | Path) -> tuple[Path, int]:
    """(step folder, step) for a workdir, its `checkpoints/` folder or one step folder.

    In a folder of steps: the best-validation-loss step (`best.json`) when it is on disk, else the
    latest. Raises `CheckpointError` naming the path and what was found instead.
    """
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise CheckpointError(f"init_from: {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"init_from: {path} is a file; give a workdir, its "
                              f"{CHECKPOINTS_DIR}/ folder or one of its step folders")
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
    best = checkpointing.read_best(directory)
    step = int(best["step"]) if best is not None and int(best["step"]) in steps else steps[-1]
    return directory / str(step), step


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
    config = checkpointing.read_config(step_dir)
    if "model" not in config or "arch" not in config["model"]:
        raise CheckpointError(f"init_from: the config in {step_dir} names no model.arch")
    checkpointer = ocp.PyTreeCheckpointer()

    def damaged(reason: str) -> CheckpointError:
        return CheckpointError(f"init_from: the checkpoint {step_dir} is damaged ({reason}); "
                               f"point init_from at another step folder of {step_dir.parent}"
                               + _other_steps(step_dir))

    try:
        metadata = checkpointer.metadata(step_dir / "state").item_metadata.tree
    except Exception:  # noqa: BLE001 - None (no metadata file) or an unreadable one
        raise damaged("its state's metadata cannot be read") from None
    missing = [k for k in ("params", "batch_stats")
               if BACKBONE not in (metadata.get(k) or {})]
    if missing:
        raise CheckpointError(
            f"init_from: the checkpoint {step_dir} has no backbone ({' and '.join(missing)} "
            f"lack a '{BACKBONE}' subtree; it holds {sorted(metadata.get('params') or {})})"
        )
    target = {k: {BACKBONE: metadata[k][BACKBONE]} for k in ("params", "batch_stats")}
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), target)
    try:
        restored = checkpointer.restore(
            step_dir / "state",
            args=ocp.args.PyTreeRestore(
                item=abstract,
                restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                          abstract),
                partial_restore=True,
            ),
        )
    except Exception as e:  # noqa: BLE001 - unreadable arrays
        raise damaged(checkpointing.short_reason(e)) from None
    check_finite_backbone(restored, f"the checkpoint {step_dir}")
    return BackboneCheckpoint(
        params=_without_variable_keys(flatten(restored["params"][BACKBONE])),
        batch_stats=_without_variable_keys(flatten(restored["batch_stats"][BACKBONE])),
        config=config,
        path=step_dir,
        step=step,
        dropped=tuple(sorted(str(k) for k in metadata["params"] if k != BACKBONE)),
    )


def _other_steps(step_dir: Path) -> str:
    others = [s for s in checkpointing.find_own_steps(step_dir.parent.parent, step_dir.parent.name)
              if str(s) != step_dir.name]
    return f" (there: {', '.join(map(str, others))})" if others else ""


def check_finite_backbone(tree: Any, where: str, *, prefix: str = "init_from",
                          hint: str = "it comes from a diverged run; pick an earlier "
                                      "checkpoint") -> None:
    """Refuses a backbone with NaN or infinite values (a diverged run's, or a bad conversion):
    every stage built on it would report numbers without meaning."""
    flat = flatten(tree)
    bad = {k: v for k, v in flat.items()
           if np.issubdtype(v.dtype, np.inexact) and not np.isfinite(v).all()}
    if bad:
        count = sum(int((~np.isfinite(v)).sum()) for v in bad.values())
        total = sum(int(v.size) for v in flat.values())
        raise NonFiniteError(
            f"{prefix}: the backbone in {where} holds non-finite values ({count:,} of "
            f"{total:,}, in {checkpointing.some(sorted(bad))}): {hint}")


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
    return save_model(workdir, params={BACKBONE: dict(params)},
                      batch_stats={BACKBONE: dict(batch_stats)}, config=config, step=step)


def save_model(
    workdir: str | Path,
    *,
    params: Mapping[str, Any],
    batch_stats: Mapping[str, Any],
    config: ml_collections.ConfigDict | Mapping[str, Any],
    step: int = 0,
) -> Path:
    """`save_backbone` for a whole model's nested pure dicts (the backbone under `BACKBONE`,
    a head beside it): stages read the backbone alone with a partial restore. Returns the step
    folder."""
    if isinstance(config, ml_collections.ConfigDict):
        config = checkpointing.config_to_dict(config)
    directory = Path(workdir).expanduser().absolute() / CHECKPOINTS_DIR
    write_errors = checkpointing.storage_errors(f"cannot write the checkpoint in {directory}")
    with write_errors, ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(create=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()},
    ) as manager:
        state = {"params": dict(params), "batch_stats": dict(batch_stats)}
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


# --------------------------------------------------------------------------------------------
# Where a run starts: resume > init_from > scratch
# --------------------------------------------------------------------------------------------


def resolve_init(
    config: ml_collections.ConfigDict, workdir: Path
) -> BackboneCheckpoint | None:
    """Decides how a run starts (resume > init_from > scratch) and completes `config.model`.

    Returns the backbone to start from, or None (resume, or scratch). A stage that starts from
    a checkpoint rebuilds its architecture from the config stored there, so `model.arch` and
    `model.width` may be left unset (None); a value given explicitly must agree. Called before
    any data or compile work, so a wrong `init_from` fails at once.
    """
    own = checkpointing.find_own_steps(workdir)
    if own:
        # The newest checkpoint whose config reads (a damaged one is reported and moved aside
        # by `trainer.init_state`); a changed config is refused here, before any data or
        # compile work.
        for step in reversed(own):
            step_dir = Path(workdir) / CHECKPOINTS_DIR / str(step)
            try:
                stored = checkpointing.read_config(step_dir, what="resume")
            except CheckpointError:
                continue
            checkpointing.check_resume_config(stored, config, step=step, where=step_dir,
                                              skip_unset=True)
            _fill_model_config(config, stored["model"], step_dir)
            _fill_modality(config, modality_lib.from_checkpoint_config(stored))
            return None
        raise CheckpointError(
            f"no checkpoint in {Path(workdir) / CHECKPOINTS_DIR} has a readable "
            f"config (steps {', '.join(map(str, own))}); delete the folder (or choose another "
            f"--workdir) to start again")
    source = load_backbone(config.init_from) if config.get("init_from") else None
    if source is not None:
        _fill_model_config(config, source.config["model"], source.path)
    elif config.model.get("arch") is None:
        raise config_utils.ConfigError(
            f"config.model.arch is not set and there is no config.init_from to take it from; "
            f"choose one of {models.ARCHS}"
        )
    if config.model.get("width") is None:
        config.model.width = 64
    _fill_modality(config, source.modality if source is not None else None,
                   where=f"the init_from checkpoint {source.path}" if source is not None else "")
    return source


def _fill_modality(
    config: ml_collections.ConfigDict, recorded: modality_lib.InputModality | None, *,
    where: str = "",
) -> None:
    """Completes `config.model.{modality, residual_formula, residual_edge}`.

    Unset (None) keys take the recorded backbone's (`recorded`: the resumed checkpoint's, or
    the init_from backbone's), else RGB and the pretext's formula. A modality set explicitly
    that differs from the init_from backbone's is refused (`check_backbone_modality`) unless
    `config.force_modality`; a resumed run's changes are refused by the resume check.
    """
    modality_lib.validate(config, allow_unset=True)  # a bad value named before anything
    model = config.model
    pretext = config.get("pretext") or "vcp"
    given = model.get("modality")
    formula = model.get("residual_formula")
    edge = model.get("residual_edge")
    if recorded is not None and given in (None, recorded.modality):
        # The recorded backbone's input, where the config leaves a key unset.
        chosen = modality_lib.InputModality(recorded.modality, formula or recorded.formula,
                                            edge or recorded.edge)
    else:
        chosen = modality_lib.InputModality(
            given or "rgb", formula or modality_lib.default_formula(pretext), edge or "roll")
    if where and recorded is not None and (chosen.is_residual or recorded.is_residual):
        # RGB on both sides: the formula and edge do not apply.
        chosen = modality_lib.check_backbone_modality(
            recorded, chosen, force=bool(config.get("force_modality", False)), source=where)
    with config.unlocked():
        for key, value in chosen.to_config().items():
            model[key] = value
    modality_lib.validate(config)
    if chosen.is_residual and chosen.edge == "extra_frame":
        raise config_utils.ConfigError(
            "config.model.residual_edge='extra_frame' is not wired into the stages yet (the "
            "input pipeline loads clip_len frames); use 'roll', the reference's")


def _fill_model_config(
    config: ml_collections.ConfigDict, stored: Mapping[str, Any], where: Path
) -> None:
    for key in ("arch", "width"):
        given, value = config.model.get(key), stored[key]
        if given is not None and given != value:
            raise CheckpointError(
                f"the checkpoint {where} holds a backbone with model.{key}={value!r}, but "
                f"config.model.{key}={given!r}; drop the override or pick another checkpoint"
            )
        config.model[key] = value


def with_backbone(
    params: nnx.State, batch_stats: nnx.State, source: BackboneCheckpoint
) -> tuple[nnx.State, nnx.State]:
    """Copies of a model's parameters and BatchNorm statistics with their `backbone` subtree
    taken from `source` (every key and shape must fit); the rest (a head) stays as it is."""

    def put(tree: nnx.State, loaded: dict[str, np.ndarray], what: str) -> nnx.State:
        pure = nnx.to_pure_dict(tree)
        pure[BACKBONE] = assign_backbone(pure[BACKBONE], loaded, what=what, source=source.path)
        new = jax.tree.map(lambda x: x, tree)  # a copy with the same Variable structure
        nnx.replace_by_pure_dict(new, pure)
        return new

    return (put(params, source.params, "parameters"),
            put(batch_stats, source.batch_stats, "BatchNorm statistics"))


def init_backbone(state: Any, source: BackboneCheckpoint) -> Any:
    """`state` (a `trainer.TrainState`) with its backbone's parameters and BatchNorm statistics
    taken from `source`; everything else (the new head, the optimizer state) stays as
    initialised."""
    params, batch_stats = with_backbone(state.params, state.batch_stats, source)
    return state.replace(params=params, batch_stats=batch_stats)


def check_fold(
    source: BackboneCheckpoint, *, dataset: str, fold: int,
    builder_config_of: Callable[[int], str],
) -> None:
    """Refuses to test a fine-tuned backbone on a fold whose test videos it trained on.

    `dataset`, `fold`: what the stage tests on; `builder_config_of(f)`: its builder config for
    fold f (`datasets.with_fold`), named in the message. A backbone fine-tuned on fold f of a
    dataset has seen the train videos of fold f, which are test videos of the other folds;
    testing it there would count training videos.
    """
    if source.fold is None:
        return
    trained_on = source.config.get("data", {}).get("name")
    if trained_on != dataset:
        return
    if fold != source.fold:
        raise config_utils.UserError(
            f"the backbone in {source.path} was fine-tuned on {trained_on} fold {source.fold}; "
            f"fold {fold}'s test videos include videos it trained on. Test it on fold "
            f"{source.fold} (config.data.builder_config="
            f"'{builder_config_of(source.fold)}') or start from a checkpoint that was not "
            f"fine-tuned on {trained_on}."
        )
