"""The pretraining stage (VCP, or VCOP with `config.pretext='vcop'`), and the probe (the same
task on a frozen backbone).

`config.pretext` selects the task module the stage runs: this one (VCP) or `vcop` (clip order
prediction); both offer `validate_config`, `create_train_state`, `train_step`, `eval_step` and
`calibration_forward`, and everything else of the stage (data, `trainer.run_stage`, the report)
is shared. `config.model.modality='res'` feeds residual frames, computed on the device inside the
step (VCP: after the cloze, as [U]).

`train_step(state, batch, ctx) -> (state, metrics)` draws the cloze on the device (each tuple's
key is folded from the step and its position in the global batch, so every parallel strategy
draws the same options), runs the backbone on the 3 clips and takes an SGD step. `eval_step`
draws the held-out tuples' options from their example indices, so VCP accuracy is reproducible.

    python main.py --config configs/pretrain_r3d.py --workdir ~/runs/vcp_r3d
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import re
import sys
import types
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from vcp_jax import backbone as backbone_lib
from vcp_jax import (
    bn_calibration,
    cloze,
    config_utils,
    datasets,
    input_pipeline,
    models,
    parallel,
    reporting,
    trainer,
    vcop,
)
from vcp_jax import modality as modality_lib

EVAL_CLOZE_SEED = 0  # the validation cloze keys are fold_in(PRNGKey(0), example index)


# --------------------------------------------------------------------------------------------
# Config and model
# --------------------------------------------------------------------------------------------


PRETEXTS = ("vcp", "vcop")  # config.pretext
# What a pretext's classes are (cloze options, clip orders), as its metric keys name them
# (`val_<word>_fraction/<name>`, `<word>_names`) and the closing summary prints them.
CLASS_WORDS = {"vcp": "option", "vcop": "order"}


def pretext_of(config: ml_collections.ConfigDict) -> str:
    """`config.pretext` ('vcp' when absent: configs written before it existed); a
    `ConfigError` naming the key and the allowed values otherwise."""
    if config.get("pretext") is None:
        return "vcp"
    config_utils.check_choice(config, "pretext", PRETEXTS)
    return config.pretext


def task_module(config: ml_collections.ConfigDict) -> types.ModuleType:
    """The module of the pretext task the stage runs: `vcop` for 'vcop', else this one (VCP)."""
    return vcop if pretext_of(config) == "vcop" else sys.modules[__name__]


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises `ConfigError` naming the key and the allowed values for anything not allowed."""
    trainer.validate_config(config)
    config_utils.check_choice(config, "model.bn_stats", models.BN_STATS)
    if pretext_of(config) == "vcop":
        vcop.validate_config(config)  # config.vcop.*, and the modality
        return
    if config.model.get("modality") is not None:
        modality_lib.validate(config)
    try:
        cloze.validate_config(config.cloze)
    except ValueError as e:
        # "cloze config clip_len=6: ..." names the key as config.cloze.clip_len.
        message, named = re.subn(r"^cloze config (\w+)=", r"config.cloze.\1=", str(e))
        raise config_utils.ConfigError(message if named else f"config.cloze: {e}") from None


def create_model(
    config: ml_collections.ConfigDict, *, rngs: nnx.Rngs, bn_axis_name: str | None = None
) -> models.VCPModel:
    """Backbone + VCP head as the config says."""
    dtype = models.DTYPES[config.model.dtype]
    backbone = models.create_backbone(
        config.model.arch, rngs=rngs, width=config.model.width, dtype=dtype,
        bn_axis_name=bn_axis_name, conv_impl=config.model.conv_impl,
    )
    return models.VCPModel(
        backbone, num_clips=config.cloze.num_clips, num_classes=cloze.num_classes(config.cloze),
        rngs=rngs, dtype=dtype, bn_stats=config.model.bn_stats,
    )


@dataclasses.dataclass(frozen=True)
class Task:
    """The VCP task's static settings, closed over by the steps."""

    cloze_config: ml_collections.ConfigDict
    num_classes: int
    # What the backbone reads, applied after the cloze (RGB: the identity, the same program).
    modality: modality_lib.InputModality = modality_lib.RGB


def create_train_state(
    config: ml_collections.ConfigDict,
    *,
    bn_axis_name: str | None = None,
    frozen_backbone: bool = False,
) -> tuple[trainer.TrainState, trainer.StepContext]:
    """A fresh state (PyTorch-style init from `config.seed`) and the step context."""
    model = create_model(config, rngs=nnx.Rngs(params=config.seed), bn_axis_name=bn_axis_name)
    modality = (modality_lib.from_config(config, pretext="vcp")
                if config.model.get("modality") is not None else modality_lib.RGB)
    task = Task(config.cloze, cloze.num_classes(config.cloze), modality)
    return trainer.create_train_state(
        model, config, axis_name=bn_axis_name, task=task,
        frozen=trainer.path_has(backbone_lib.BACKBONE) if frozen_backbone else None,
    )


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------


def cloze_per_sample(
    keys: jax.Array, batch: dict[str, jax.Array], config: ml_collections.ConfigDict
) -> tuple[jax.Array, jax.Array]:
    """`make_cloze` with one key per tuple, so a tuple's option does not depend on its batch."""

    def one(key: jax.Array, clips: jax.Array, remote: jax.Array, has_remote: jax.Array):
        tuples, labels = cloze.make_cloze(key, clips[None], remote[None], has_remote[None], config)
        return tuples[0], labels[0]

    return jax.vmap(one)(keys, batch["clips"], batch["remote"], batch["has_remote"])


def train_step(
    state: trainer.TrainState, batch: dict[str, jax.Array], ctx: trainer.StepContext
) -> tuple[trainer.TrainState, dict[str, jax.Array]]:
    """One SGD step on a batch of tuples: cloze on device, forward, backward, update."""
    keys = trainer.example_keys(state.rng, state.step, batch["clips"].shape[0], ctx.axis_name)
    tuples, labels = cloze_per_sample(keys, batch, ctx.task.cloze_config)
    return trainer.classification_update(state, ctx, ctx.task.modality(models.to_input(tuples)),
                                         labels)


def calibration_forward(
    model: nnx.Module, batch: dict[str, jax.Array], index: jax.Array, *,
    ctx: trainer.StepContext, rng: jax.Array,
) -> jax.Array:
    """The backbone on the clips of batch `index`'s tuples as `train_step` draws them at step
    `index` (same keys: the probe's own training tuples), for `bn_calibration`."""
    keys = trainer.example_keys(rng, index, batch["clips"].shape[0], ctx.axis_name)
    tuples, _ = cloze_per_sample(keys, batch, ctx.task.cloze_config)
    inputs = ctx.task.modality(models.to_input(tuples))
    return model.backbone(inputs.reshape(-1, *inputs.shape[2:]))


def eval_step(
    state: trainer.TrainState, batch: dict[str, jax.Array], ctx: trainer.StepContext
) -> dict[str, jax.Array]:
    """Sums over the valid tuples of a batch: loss, correct, per-option counts, confusion."""
    base = jax.random.PRNGKey(EVAL_CLOZE_SEED)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(batch["index"])
    tuples, labels = cloze_per_sample(keys, batch, ctx.task.cloze_config)
    logits = trainer.eval_model(state, ctx)(ctx.task.modality(models.to_input(tuples)))
    valid = batch["valid"].astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    predicted = jnp.argmax(logits, -1)
    correct = (predicted == labels).astype(jnp.float32) * valid
    truth = jax.nn.one_hot(labels, ctx.task.num_classes) * valid[:, None]
    sums = {
        "loss": jnp.sum(loss * valid),
        "correct": jnp.sum(correct),
        "count": jnp.sum(valid),
        "has_remote": jnp.sum(batch["has_remote"].astype(jnp.float32) * valid),
        "option_correct": jnp.sum(truth * correct[:, None], axis=0),
        "option_count": jnp.sum(truth, axis=0),
        # confusion[true, predicted]
        "confusion": truth.T @ jax.nn.one_hot(predicted, ctx.task.num_classes),
    }
    return trainer.sum_metrics(sums, ctx)


def summarize_eval(
    sums: dict[str, np.ndarray] | None, class_names: tuple[str, ...], *, pretext: str,
    prefix: str = "val",
) -> dict[str, Any]:
    """Mean loss, accuracy, per-class accuracy and fraction, and the confusion matrix, from the
    evaluation sums of either pretext (`eval_step`'s, `vcop.eval_step`'s).

    Keys: `{prefix}_{pretext}_accuracy`, and per class `{prefix}_accuracy/<name>` and
    `{prefix}_<word>_fraction/<name>`, `<word>` the pretext's `CLASS_WORDS` entry (the sums count
    the classes as `<word>_correct` and `<word>_count`). VCP adds the fraction of tuples whose
    cloze drew the remote option.
    """
    if sums is None:
        return {}
    word = CLASS_WORDS[pretext]
    count = max(float(sums["count"]), 1.0)
    metrics: dict[str, Any] = {
        f"{prefix}_loss": float(sums["loss"]) / count,
        f"{prefix}_{pretext}_accuracy": float(sums["correct"]) / count,
        f"{prefix}_tuples": int(sums["count"]),
    }
    if pretext == "vcp":  # only the cloze has a remote option
        metrics[f"{prefix}_has_remote_fraction"] = float(sums["has_remote"]) / count
    for name, correct, total in zip(
        class_names, sums[f"{word}_correct"], sums[f"{word}_count"], strict=True
    ):
        total = float(total)
        metrics[f"{prefix}_accuracy/{name}"] = float(correct) / total if total else float("nan")
        metrics[f"{prefix}_{word}_fraction/{name}"] = total / count
    metrics[f"{prefix}_confusion"] = np.asarray(sums["confusion"]).astype(int).tolist()
    return metrics


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def tuple_spec(config: ml_collections.ConfigDict) -> tuple[input_pipeline.TupleSpec, str]:
    """Where the pretext's tuples lie, and the config section that says so ('cloze' or
    'vcop')."""
    section = tuple_spec_section(config)
    if section == "vcop":
        return vcop.tuple_spec(config), section
    return input_pipeline.TupleSpec.from_config(config), section


def eval_tuples_per_video(config: ml_collections.ConfigDict) -> int:
    """Validation (and test) tuples drawn per video (`<section>.eval_tuples_per_video`)."""
    return int(config[tuple_spec_section(config)].get("eval_tuples_per_video", 1))


def tuple_spec_section(config: ml_collections.ConfigDict) -> str:
    return "vcop" if pretext_of(config) == "vcop" else "cloze"


def num_clips(config: ml_collections.ConfigDict) -> int:
    return int(config[tuple_spec_section(config)].num_clips)


def class_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The pretext's classes: the cloze options, or the clip orders ('012', '021', ...)."""
    if pretext_of(config) == "vcop":
        return vcop.order_names(config.vcop.num_clips)
    return cloze.class_names(config.cloze)


@dataclasses.dataclass
class PretrainData:
    """The training stream and the evaluation batches of one host, plus what was left out."""

    train: Any  # grain.MapDataset, endless; element k is the host's batch of step k + 1
    val: Any  # grain.MapDataset, finite; batches padded (`valid` marks real tuples)
    test: Any | None  # the test split's tuples (the probe's report), or None
    num_train_videos: int
    num_val_videos: int
    num_test_videos: int
    num_too_short: int
    provenance: dict[str, Any]


def pretrain_data(
    config: ml_collections.ConfigDict,
    *,
    process_index: int = 0,
    process_count: int = 1,
    with_test: bool = False,
) -> PretrainData:
    """The VCP stream (train split minus held-out videos), validation and optional test tuples.

    Videos shorter than a tuple (64 frames at the paper's settings) are skipped and counted.
    """
    source = datasets.data_source(config.data, "train")
    index = datasets.video_index(source, "train")
    spec, section = tuple_spec(config)
    train_idx, val_idx = datasets.holdout_split(len(index), config.data.num_val_videos, seed=0)
    long_enough = index.num_frames >= spec.span
    num_too_short = int((~long_enough).sum())
    train_idx = train_idx[long_enough[train_idx]]
    val_idx = val_idx[long_enough[val_idx]]
    if len(train_idx) == 0:
        c = config[section]
        raise config_utils.ConfigError(
            f"no training video of {config.data.name}/{config.data.builder_config} has the "
            f"{spec.span} frames a tuple needs (config.{section}.num_clips={c.num_clips} x "
            f"config.{section}.clip_len={c.clip_len} + {c.num_clips - 1} x "
            f"config.{section}.interval={c.interval}); the longest has "
            f"{int(index.num_frames.max(initial=0))}")
    shard = dict(process_index=process_index, process_count=process_count)
    sampler = input_pipeline.TupleSampler(source, spec)
    train = input_pipeline.train_stream(train_idx, sampler, global_batch=config.batch_size,
                                        seed=config.seed, **shard)
    draws = eval_tuples_per_video(config)
    val = input_pipeline.eval_batches(val_idx, sampler, global_batch=config.batch_size,
                                      draws_per_video=draws, **shard)
    described = {"train": datasets.describe(config.data, "train", index, train_idx),
                 "validation": datasets.describe(config.data, "train (held out)", index, val_idx)}
    test, num_test = None, 0
    if with_test:
        test_source = datasets.data_source(config.data, "test")
        test_index = datasets.video_index(test_source, "test")
        test_idx = np.flatnonzero(test_index.num_frames >= spec.span)
        num_too_short += len(test_index) - len(test_idx)
        test = input_pipeline.eval_batches(
            test_idx, input_pipeline.TupleSampler(test_source, spec),
            global_batch=config.batch_size, draws_per_video=draws, **shard)
        num_test = len(test_idx)
        described["test"] = datasets.describe(config.data, "test", test_index, test_idx)
    return PretrainData(train, val, test, len(train_idx), len(val_idx), num_test,
                        num_too_short, described)


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def evaluate(
    state: Any, batches: Any, eval_fn: Any, strategy: parallel.Strategy,
    config: ml_collections.ConfigDict, prefix: str = "val",
) -> dict[str, Any]:
    """The pretext's loss and accuracy on every tuple of `batches` (deterministic tuples, and
    options or orders)."""
    iterator = input_pipeline.make_iterator(batches, config, prefetch_processes=False)
    sums = parallel.accumulate(state, iterator, eval_fn, strategy)
    return summarize_eval(sums, class_names(config), pretext=pretext_of(config), prefix=prefix)


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Pretraining (`config.task='pretrain'`) with `config.pretext`; resumes from the last
    checkpoint in `workdir`."""
    return train_vcp(config, Path(workdir), frozen_backbone=False)


def train_vcp(
    config: ml_collections.ConfigDict, workdir: Path, *, frozen_backbone: bool
) -> dict[str, Any]:
    """Trains the pretext's model, VCP or VCOP (`config.pretext`; the probe: only its head),
    and writes `metrics.json`.

    With `frozen_backbone` (the probe) the backbone comes from `init_from` (or stays random),
    never trains, and the final report is on the test split's tuples, from the checkpoint with
    the lowest validation loss.
    """
    workdir = Path(workdir).expanduser()
    config = copy.deepcopy(config)  # filled in below (arch and width from init_from)
    config_utils.migrate_deprecated_keys(config)
    task = task_module(config)
    source = backbone_lib.resolve_init(config, workdir)
    validate_config(config)
    if config.get("num_train_steps") is None:
        raise config_utils.ConfigError("config.num_train_steps must be set")
    if frozen_backbone:
        bn_calibration.validate_config(config)
    if frozen_backbone and source is not None:
        backbone_lib.check_fold(
            source, dataset=config.data.name, fold=datasets.fold_of(config.data),
            builder_config_of=functools.partial(datasets.with_fold, config.data))
    datasets.prepare(config.data)
    data = pretrain_data(config, process_index=jax.process_index(),
                         process_count=jax.process_count(), with_test=frozen_backbone)
    pretext = pretext_of(config).upper()
    modality = modality_lib.from_config(config, pretext=pretext_of(config))
    draws = eval_tuples_per_video(config)
    what = f"{pretext} probe" if frozen_backbone else f"{pretext} pretraining"
    reporting.console(
        f"{what}: {config.model.arch} (width {config.model.width}) on {modality.describe()} "
        f"of {data.num_train_videos} videos of {config.data.name}/"
        f"{config.data.builder_config}, validating on {data.num_val_videos}"
        + (f" (x{draws} tuples)" if draws > 1 else "")
        + (f", testing on {data.num_test_videos}" if frozen_backbone else "")
        + (f" ({data.num_too_short} too short for a tuple, skipped)" if data.num_too_short
           else "")
        + f"; {config.num_train_steps} steps, {trainer.describe_learning_rate(config)}")

    run = trainer.run_stage(
        config, workdir, source=source,
        create_state=lambda axis: task.create_train_state(config, bn_axis_name=axis,
                                                          frozen_backbone=frozen_backbone),
        train=data.train, train_step=task.train_step, eval_step=task.eval_step,
        evaluate=lambda s, fn, strategy: evaluate(s, data.val, fn, strategy, config),
        provenance_data=data.provenance, desc=what,
        # The probe's frozen backbone normalises with its running statistics, re-estimated on
        # its training tuples for a random backbone (config.bn_recalibration).
        calibration_forward=task.calibration_forward if frozen_backbone else None,
        clips_per_batch=config.batch_size * num_clips(config),
        restore_best=frozen_backbone)
    result, strategy, eval_fn = run.loop, run.strategy, run.eval_fn
    val_metrics = result.val_metrics or evaluate(result.state, data.val, eval_fn, strategy,
                                                 config)
    names, word = class_names(config), CLASS_WORDS[pretext_of(config)]
    final: dict[str, Any] = {
        "task": config.task,
        "pretext": pretext_of(config),
        # The input the backbone read (model.modality, residual_formula, residual_edge), as
        # its checkpoint records it for the stages that start from it.
        "modality": modality.to_config(),
        "step": config.num_train_steps,
        **val_metrics,
        "best_checkpoint_step": result.best_step,
        "effective_learning_rate": trainer.effective_learning_rate(config),
        "num_train_videos": data.num_train_videos,
        "num_val_videos": data.num_val_videos,
        "num_too_short": data.num_too_short,
        "chance_accuracy": 1.0 / run.ctx.task.num_classes,
        f"{word}_names": list(names),
        "loop_timing": result.timing,  # this run's loop (a resumed run: since the resume)
    }
    if frozen_backbone:
        test = evaluate(run.state, data.test, eval_fn, strategy, config, prefix="test")
        final.update(test)
        final["num_test_videos"] = data.num_test_videos
        final["backbone"] = source.describe() if source is not None else "random init"
        final["bn_statistics"] = run.bn_statistics
        title = (f"{pretext} probe, {config.data.name}/{config.data.builder_config} test tuples "
                 f"({test.get('test_tuples', 0)}), step {run.chosen_step}")
        reporting.plot_confusion(workdir / "confusion.png", np.asarray(test["test_confusion"]),
                                 names, title)
    reporting.write_json(workdir / "metrics.json", final)
    key = "test" if frozen_backbone else "val"
    per_class = ", ".join(f"{n} {final.get(f'{key}_accuracy/{n}', float('nan')):.2f}"
                          for n in names)
    reporting.console(
        f"{'test' if frozen_backbone else 'held-out'} {pretext} accuracy "
        f"{final.get(f'{key}_{pretext.lower()}_accuracy', float('nan')):.3f} "
        f"(chance {final['chance_accuracy']:.3f}); "
        f"per {word}: {per_class}\n"
        f"metrics: {workdir / 'metrics.json'}")
    return final
