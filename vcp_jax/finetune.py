"""Fine-tuning for action recognition, and the 10-clip video-level test (docs/method.md §4).

Train on one random 16-frame clip per video per epoch (random 112 crop), hold train videos out to
choose the checkpoint with the lowest validation loss, then test that checkpoint: 10 clips per
test video at evenly spread positions, centre crop, the video's score the mean of its clips'
logits. Reported per fold: video-level top-1 and top-5, clip-level top-1, per-class accuracy and
the confusion matrix; with several folds, each fold in `<workdir>/fold_<k>` and their mean.

    python main.py --config configs/finetune.py:dataset=hmdb51 --config.init_from=DIR --workdir W
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from flax import nnx

from vcp_jax import (
    checkpointing,
    config_utils,
    datasets,
    input_pipeline,
    models,
    parallel,
    provenance,
    reporting,
    trainer,
)

FOLD_DIR = "fold_{}"
HEADLINE = ("video_top1", "video_top5", "clip_top1")  # averaged over folds


# --------------------------------------------------------------------------------------------
# Config and model
# --------------------------------------------------------------------------------------------


def validate_config(config: ml_collections.ConfigDict) -> None:
    trainer.validate_config(config)
    for key in ("finetune.clip_len", "finetune.num_test_clips", "finetune.test_batch_size"):
        config_utils.check_positive(config, key)
    folds = tuple(config.finetune.folds)
    if not folds or any(f not in (1, 2, 3) for f in folds):
        raise config_utils.ConfigError(
            f"config.finetune.folds={folds!r}: each fold must be 1, 2 or 3")
    if config.finetune.test_batch_size % jax.device_count():
        raise config_utils.ConfigError(
            f"config.finetune.test_batch_size={config.finetune.test_batch_size} must be "
            f"divisible by the number of devices ({jax.device_count()})")


@dataclasses.dataclass(frozen=True)
class Task:
    num_classes: int


def create_train_state(
    config: ml_collections.ConfigDict, num_classes: int, *, bn_axis_name: str | None = None
) -> tuple[trainer.TrainState, trainer.StepContext]:
    """Backbone + a new Dense head (PyTorch-style init from `config.seed`) and the step context."""
    rngs = nnx.Rngs(params=config.seed)
    dtype = trainer.DTYPES[config.model.dtype]
    backbone = models.create_backbone(
        config.model.arch, rngs=rngs, width=config.model.width, dtype=dtype,
        bn_axis_name=bn_axis_name, conv_impl=config.model.conv_impl,
    )
    model = models.Classifier(backbone, num_classes, rngs=rngs, dtype=dtype)
    frozen = (trainer.path_has(checkpointing.BACKBONE) if config.finetune.freeze_backbone
              else None)
    return trainer.create_train_state(model, config, frozen=frozen, axis_name=bn_axis_name,
                                      task=Task(num_classes))


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------


def to_input(frames: jax.Array) -> jax.Array:
    return frames.astype(jnp.float32) / 255.0


def train_step(
    state: trainer.TrainState, batch: dict[str, jax.Array], ctx: trainer.StepContext
) -> tuple[trainer.TrainState, dict[str, jax.Array]]:
    """One SGD step on a batch of clips `(B, T, H, W, C)` with their action labels."""
    inputs, labels = to_input(batch["clip"]), batch["label"]

    def loss_fn(model: nnx.Module) -> tuple[jax.Array, jax.Array]:
        logits = model(inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

    state, loss, logits = trainer.update(state, ctx, loss_fn)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return state, trainer.reduce_metrics({"loss": loss, "accuracy": accuracy}, ctx)


def eval_step(
    state: trainer.TrainState, batch: dict[str, jax.Array], ctx: trainer.StepContext
) -> dict[str, jax.Array]:
    """Validation sums over the valid clips of a batch: loss, correct, count."""
    logits = trainer.eval_model(state, ctx)(to_input(batch["clip"]))
    valid = batch["valid"].astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    sums = {"loss": jnp.sum(loss * valid), "correct": jnp.sum(correct * valid),
            "count": jnp.sum(valid)}
    return trainer.sum_metrics(sums, ctx)


def test_step(
    state: trainer.TrainState, batch: dict[str, jax.Array], ctx: trainer.StepContext
) -> dict[str, jax.Array]:
    """Per video: the mean of its K clips' logits `(B, C)` and how many clips were right `(B,)`."""
    clips = batch["clips"]  # (B, K, T, H, W, C)
    b, k = clips.shape[:2]
    logits = trainer.eval_model(state, ctx)(to_input(clips.reshape(b * k, *clips.shape[2:])))
    logits = logits.reshape(b, k, -1)
    clip_correct = jnp.sum(jnp.argmax(logits, -1) == batch["label"][:, None], axis=1)
    return {"logits": jnp.mean(logits, axis=1), "clip_correct": clip_correct,
            "label": batch["label"], "index": batch["index"], "valid": batch["valid"]}


def summarize_test(
    outputs: dict[str, np.ndarray], class_names: tuple[str, ...], num_clips: int
) -> dict[str, Any]:
    """Video-level top-1/top-5, clip-level top-1, per-class accuracy and the confusion matrix."""
    logits, labels = outputs["logits"], outputs["label"].astype(np.int64)
    num_classes, count = len(class_names), len(labels)
    if count == 0:
        return {"num_test_videos": 0}
    order = np.argsort(-logits, axis=1, kind="stable")
    top1 = order[:, 0] == labels
    top5 = np.any(order[:, :5] == labels[:, None], axis=1)
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (labels, order[:, 0]), 1)
    per_class_total = confusion.sum(1)
    per_class = {name: (float(confusion[i, i] / per_class_total[i]) if per_class_total[i]
                        else None) for i, name in enumerate(class_names)}
    return {
        "video_top1": float(top1.mean()),
        "video_top5": float(top5.mean()),
        "clip_top1": float(outputs["clip_correct"].sum() / (count * num_clips)),
        "num_test_videos": int(count),
        "num_clips": num_clips,
        "averaging": f"mean of the {num_clips} clip logits per video",
        "per_class_accuracy": per_class,
        "confusion": confusion.tolist(),  # confusion[true, predicted]
    }


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FinetuneData:
    train: Any
    val: Any
    test: Any
    num_train_videos: int
    num_val_videos: int
    num_test_videos: int
    class_names: tuple[str, ...]
    provenance: dict[str, Any]


def finetune_data(
    config: ml_collections.ConfigDict, *, process_index: int = 0, process_count: int = 1
) -> FinetuneData:
    """Training clips (train split minus held-out videos), validation clips, test clip sets."""
    source = datasets.data_source(config.data, "train")
    test_source = datasets.data_source(config.data, "test")
    index = datasets.video_index(source, "train")
    test_index = datasets.video_index(test_source, "test")
    train_idx, val_idx = datasets.holdout_split(len(index), config.data.num_val_videos, seed=0)
    test_idx = np.arange(len(test_index))
    clip_len, crop = config.finetune.clip_len, config.data.crop_size
    shard = dict(process_index=process_index, process_count=process_count)
    train = input_pipeline.train_stream(
        train_idx, input_pipeline.ClipSampler(source, clip_len, crop, random_crop_=True),
        global_batch=config.batch_size, seed=config.seed, **shard)
    val = input_pipeline.eval_batches(
        val_idx, input_pipeline.ClipSampler(source, clip_len, crop, random_crop_=False),
        global_batch=config.batch_size, **shard)
    test = input_pipeline.eval_batches(
        test_idx, input_pipeline.MultiClipSampler(test_source, clip_len, crop,
                                                  config.finetune.num_test_clips),
        global_batch=config.finetune.test_batch_size, **shard)
    described = {
        "train": datasets.describe(config.data, "train", index, train_idx),
        "validation": datasets.describe(config.data, "train (held out)", index, val_idx),
        "test": datasets.describe(config.data, "test", test_index, test_idx),
    }
    return FinetuneData(train, val, test, len(train_idx), len(val_idx), len(test_idx),
                        datasets.class_names(source), described)


def fill_schedule(config: ml_collections.ConfigDict, num_train_videos: int) -> None:
    """`num_train_steps` from `num_epochs`, and per-epoch evaluation and checkpoints, if unset."""
    steps_per_epoch = max(1, math.ceil(num_train_videos / config.batch_size))
    if config.get("num_train_steps") is None:
        config.num_train_steps = int(config.num_epochs * steps_per_epoch)
    for key in ("eval_every_steps", "checkpoint_every_steps"):
        if config.get(key) is None:
            config[key] = steps_per_epoch


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Fine-tunes and tests on every fold of `config.finetune.folds`; writes `metrics.json`.

    Each fold runs (and resumes) in its own sub-workdir; a fold that is complete is not rerun.
    """
    workdir = Path(workdir).expanduser()
    folds = tuple(config.finetune.folds)
    if len(folds) == 1:
        return run_fold(config, workdir, folds[0])
    results = {}
    for fold in folds:
        reporting.console(f"--- fold {fold} of {list(folds)} ---")
        results[fold] = run_fold(config, workdir / FOLD_DIR.format(fold), fold)
    mean = {key: float(np.mean([results[f]["test"][key] for f in folds])) for key in HEADLINE}
    summary = {
        "task": "finetune",
        "dataset": config.data.name,
        "folds": {str(f): {"workdir": str(workdir / FOLD_DIR.format(f)),
                           **{k: results[f]["test"][k] for k in HEADLINE},
                           "best_checkpoint_step": results[f]["best_checkpoint_step"]}
                  for f in folds},
        "mean": mean,
        "num_clips": config.finetune.num_test_clips,
        "averaging": "per fold: video-level accuracy; mean: unweighted over the folds",
    }
    reporting.write_json(workdir / "metrics.json", summary)
    reporting.console(
        f"{config.data.name} folds {', '.join(map(str, folds))}: video top-1 "
        + " / ".join(f"{results[f]['test']['video_top1']:.3f}" for f in folds)
        + f"; mean top-1 {mean['video_top1']:.3f}, top-5 {mean['video_top5']:.3f}, "
        f"clip top-1 {mean['clip_top1']:.3f}\nmetrics: {workdir / 'metrics.json'}")
    return summary


def run_fold(config: ml_collections.ConfigDict, workdir: Path, fold: int) -> dict[str, Any]:
    """Fine-tunes on one fold's train split and tests the lowest-validation-loss checkpoint."""
    config = copy.deepcopy(config)
    config.finetune.fold = fold
    config.finetune.folds = (fold,)
    config.data.config = datasets.with_fold(config.data, fold)
    done = workdir / "metrics.json"
    if done.is_file():
        result = reporting.read_json(done)
        if result.get("task") == "finetune" and result.get("fold") == fold:
            reporting.console(f"fold {fold}: already done ({done})")
            return result
    source = trainer.resolve_init(config, workdir)
    validate_config(config)
    if source is not None:
        trainer.check_fold(source, config.data)
    datasets.prepare(config.data)
    data = finetune_data(config, process_index=jax.process_index(),
                         process_count=jax.process_count())
    fill_schedule(config, data.num_train_videos)
    mode = "linear evaluation" if config.finetune.freeze_backbone else "fine-tuning"
    reporting.console(
        f"{mode}: {config.model.arch} (width {config.model.width}) on {config.data.name} fold "
        f"{fold}: {data.num_train_videos} train videos, {data.num_val_videos} held out, "
        f"{data.num_test_videos} test videos, {len(data.class_names)} classes; "
        f"{config.num_train_steps} steps")

    strategy = parallel.make_strategy(config.parallel)
    state, ctx = create_train_state(config, len(data.class_names),
                                    bn_axis_name=strategy.axis_name)
    checkpoints = checkpointing.RunCheckpoints(workdir / checkpointing.CHECKPOINTS_DIR, config)
    state, start_step, started = trainer.init_state(state, checkpoints, source)
    reporting.console(started)
    provenance.write(workdir, config, data=data.provenance, init_from=source)

    train_fn = strategy.compile(functools.partial(train_step, ctx=ctx), donate_state=True)
    eval_fn = strategy.compile(functools.partial(eval_step, ctx=ctx), donate_state=False)
    writer = reporting.metric_writer(workdir)
    result = trainer.train_loop(
        config=config,
        state=strategy.put_state(state),
        train_fn=train_fn,
        train_iter=input_pipeline.make_iterator(data.train, config, start=start_step),
        evaluate=lambda s: evaluate(s, data.val, eval_fn, strategy, config),
        strategy=strategy,
        checkpoints=checkpoints,
        start_step=start_step,
        writer=writer,
        desc=f"{mode} fold {fold}",
        eval_line=trainer.eval_line,
    )
    best_step = result.best_step or config.num_train_steps
    state = result.state
    if best_step != config.num_train_steps:
        state = strategy.put_state(
            checkpoints.restore_state(strategy.get_state(result.state), best_step))
    test_fn = strategy.compile(functools.partial(test_step, ctx=ctx), donate_state=False)
    test = test_videos(state, data, test_fn, strategy, config)
    checkpoints.close()
    label = (f"{config.data.name} fold {fold}, {test['num_test_videos']} test videos, "
             f"{test.get('num_clips')} clips each, mean of clip logits; step {best_step}")
    final = {
        "task": "finetune",
        "dataset": config.data.name,
        "fold": fold,
        "mode": mode,
        "best_checkpoint_step": best_step,
        "val_metrics_last": result.val_metrics,
        "num_train_videos": data.num_train_videos,
        "num_val_videos": data.num_val_videos,
        "class_names": list(data.class_names),
        "backbone": source.describe() if source is not None else "random init (or resumed)",
        "label": label,
        "test": test,
        "loop_timing": result.timing,  # this run's loop (a resumed run: since the resume)
    }
    reporting.write_json(workdir / "confusion.json", {
        "label": label, "class_names": list(data.class_names),
        "confusion": test.get("confusion"), "rows": "true class", "columns": "predicted"})
    reporting.plot_confusion(workdir / "confusion.png", np.asarray(test.get("confusion")),
                             data.class_names, f"confusion: {label}")
    reporting.write_json(workdir / "metrics.json", final)
    reporting.console(
        f"fold {fold} test ({test['num_test_videos']} videos, {test.get('num_clips')} clips "
        f"each): video top-1 {test.get('video_top1', float('nan')):.3f}, top-5 "
        f"{test.get('video_top5', float('nan')):.3f}, clip top-1 "
        f"{test.get('clip_top1', float('nan')):.3f}\nmetrics: {workdir / 'metrics.json'}")
    return final


def evaluate(state: Any, batches: Any, eval_fn: Any, strategy: parallel.Strategy,
             config: ml_collections.ConfigDict) -> dict[str, float]:
    """Validation loss and clip accuracy on the held-out train videos."""
    iterator = input_pipeline.make_iterator(batches, config, prefetch_processes=False)
    sums = trainer.accumulate(state, iterator, eval_fn, strategy)
    if sums is None:
        return {}
    count = max(float(sums["count"]), 1.0)
    return {"val_loss": float(sums["loss"]) / count,
            "val_accuracy": float(sums["correct"]) / count,
            "val_videos": int(sums["count"])}


def test_videos(state: Any, data: FinetuneData, test_fn: Any, strategy: parallel.Strategy,
                config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The 10-clip test of every test video (each counted once on any number of hosts)."""
    iterator = input_pipeline.make_iterator(data.test, config, prefetch_processes=False)
    bar = tqdm.tqdm(iterator, total=len(data.test), desc="10-clip test", unit="batch",
                    disable=not reporting.is_main_process(), leave=False, dynamic_ncols=True)
    outputs = trainer.gather(state, bar, test_fn, strategy)
    return summarize_test(outputs, data.class_names, config.finetune.num_test_clips)
