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

from vcp_jax import backbone as backbone_lib
from vcp_jax import (
    bn_calibration,
    config_utils,
    datasets,
    input_pipeline,
    models,
    parallel,
    reporting,
    trainer,
)
from vcp_jax import modality as modality_lib

FOLD_DIR = "fold_{}"
HEADLINE = ("video_top1", "video_top5", "clip_top1")  # averaged over folds


# --------------------------------------------------------------------------------------------
# Config and model
# --------------------------------------------------------------------------------------------


def validate_config(config: ml_collections.ConfigDict) -> None:
    trainer.validate_config(config)
    for key in ("finetune.clip_len", "finetune.num_test_clips", "finetune.test_batch_size"):
        config_utils.check_positive(config, key)
    if config.finetune.freeze_backbone:  # linear evaluation: see `bn_calibration`
        bn_calibration.validate_config(config)
    if config.data.get("train_videos_per_class") is not None:
        config_utils.check_positive(config, "data.train_videos_per_class")
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
    # What the backbone reads (the init_from backbone's, `backbone.resolve_init`); RGB: the
    # identity, the same program.
    modality: modality_lib.InputModality = modality_lib.RGB


def input_modality(config: ml_collections.ConfigDict) -> modality_lib.InputModality:
    """The config's modality once `resolve_init` has completed it (RGB when it is unset)."""
    if config.model.get("modality") is None:
        return modality_lib.RGB
    return modality_lib.from_config(config, pretext="finetune")


def create_train_state(
    config: ml_collections.ConfigDict, num_classes: int, *, bn_axis_name: str | None = None
) -> tuple[trainer.TrainState, trainer.StepContext]:
    """Backbone + a new Dense head (PyTorch-style init from `config.seed`) and the step context."""
    rngs = nnx.Rngs(params=config.seed)
    dtype = models.DTYPES[config.model.dtype]
    backbone = models.create_backbone(
        config.model.arch, rngs=rngs, width=config.model.width, dtype=dtype,
        bn_axis_name=bn_axis_name, conv_impl=config.model.conv_impl,
    )
    model = models.Classifier(backbone, num_classes, rngs=rngs, dtype=dtype)
    frozen = (trainer.path_has(backbone_lib.BACKBONE) if config.finetune.freeze_backbone
              else None)
    return trainer.create_train_state(model, config, frozen=frozen, axis_name=bn_axis_name,
                                      task=Task(num_classes, input_modality(config)))


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------


def calibration_forward(
    model: nnx.Module, batch: dict[str, jax.Array], index: jax.Array, *,
    ctx: trainer.StepContext | None = None, rng: jax.Array | None = None,
) -> jax.Array:
    """The backbone on a batch of training clips, for `bn_calibration` (linear evaluation)."""
    del index, rng  # the clips are the batch's own; nothing is drawn on the device
    modality = ctx.task.modality if ctx is not None else modality_lib.RGB
    return model.backbone(modality(models.to_input(batch["clip"])))


def train_step(
    state: trainer.TrainState, batch: dict[str, jax.Array], ctx: trainer.StepContext
) -> tuple[trainer.TrainState, dict[str, jax.Array]]:
    """One SGD step on a batch of clips `(B, T, H, W, C)` with their action labels."""
    return trainer.classification_update(
        state, ctx, ctx.task.modality(models.to_input(batch["clip"])), batch["label"])


def eval_step(
    state: trainer.TrainState, batch: dict[str, jax.Array], ctx: trainer.StepContext
) -> dict[str, jax.Array]:
    """Validation sums over the valid clips of a batch: loss, correct, count."""
    logits = trainer.eval_model(state, ctx)(ctx.task.modality(models.to_input(batch["clip"])))
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
    inputs = ctx.task.modality(models.to_input(clips.reshape(b * k, *clips.shape[2:])))
    logits = trainer.eval_model(state, ctx)(inputs)
    logits = logits.reshape(b, k, -1)
    clip_correct = jnp.sum(jnp.argmax(logits, -1) == batch["label"][:, None], axis=1)
    return {"logits": jnp.mean(logits, axis=1), "clip_correct": clip_correct,
            "label": batch["label"], "index": batch["index"], "valid": batch["valid"]}


def summarize_test(
    outputs: dict[str, np.ndarray], class_names: tuple[str, ...], num_clips: int
) -> dict[str, Any]:
    """Video-level top-1/top-5, clip-level top-1, per-class accuracy, the confusion matrix, and
    each test video's predicted class and label rank (`per_video`)."""
    logits, labels = outputs["logits"], outputs["label"].astype(np.int64)
    num_classes, count = len(class_names), len(labels)
    if count == 0:
        return {"num_test_videos": 0}
    order = np.argsort(-logits, axis=1, kind="stable")
    top1 = order[:, 0] == labels
    # 1 + the position of the true class in each video's ranking: top-k correct iff rank <= k.
    rank = 1 + np.argmax(order == labels[:, None], axis=1)
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
        # Per test video, in test-split order: what paired comparisons of two runs on the
        # same videos need (`stats.paired_difference`).
        "per_video": _per_video(outputs.get("index"), labels, order[:, 0], rank),
    }


def _per_video(index: np.ndarray | None, labels: np.ndarray, predicted: np.ndarray,
               rank: np.ndarray) -> dict[str, list[int]]:
    """Test videos' label, predicted class and the label's rank, ordered by video index."""
    index = np.arange(len(labels)) if index is None else np.asarray(index).astype(np.int64)
    order = np.argsort(index, kind="stable")
    return {"index": index[order].tolist(), "label": labels[order].tolist(),
            "predicted": predicted[order].tolist(), "label_rank": rank[order].tolist()}


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
    # The training videos (the subset trained on) as test clip sets: the train accuracy that
    # shows memorisation next to the test accuracy.
    train_test: Any = None
    train_class_counts: dict[str, int] = dataclasses.field(default_factory=dict)


# Mixed with `config.seed` so the subset's draw is not the same random stream as other draws
# seeded by it.
_SUBSET_STREAM = 0x5B5E7


def train_subset(
    train_idx: np.ndarray,
    labels: np.ndarray,
    per_class: int,
    seed: int,
    class_names: tuple[str, ...],
) -> np.ndarray:
    """A stratified random subset of `train_idx`: `per_class` videos of every class, sorted.

    It depends only on `seed` and the videos, never on the init or the step count, so runs that
    differ only in their backbone (VCP and random init of one demo seed) train on the same
    videos. A class with fewer than `per_class` videos is a `UserError`.
    """
    rng = np.random.default_rng([seed, _SUBSET_STREAM])
    chosen = []
    for label, name in enumerate(class_names):
        videos = train_idx[labels[train_idx] == label]
        if len(videos) < per_class:
            raise config_utils.UserError(
                f"config.data.train_videos_per_class={per_class}, but class {name!r} has only "
                f"{len(videos)} training videos (after holding out config.data.num_val_videos)")
        chosen.append(rng.choice(videos, per_class, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else train_idx[:0]


def finetune_data(
    config: ml_collections.ConfigDict, *, process_index: int = 0, process_count: int = 1
) -> FinetuneData:
    """Training clips (train split minus held-out videos), validation clips, test clip sets.

    With `data.train_videos_per_class` the training videos are a stratified subset, drawn with
    `config.seed` from those left after the validation hold-out.
    """
    source = datasets.data_source(config.data, "train")
    test_source = datasets.data_source(config.data, "test")
    index = datasets.video_index(source, "train")
    test_index = datasets.video_index(test_source, "test")
    names = datasets.class_names(source)
    train_idx, val_idx = datasets.holdout_split(len(index), config.data.num_val_videos, seed=0)
    per_class = config.data.get("train_videos_per_class")
    if per_class is not None:
        train_idx = train_subset(train_idx, index.labels, int(per_class), config.seed, names)
    test_idx = np.arange(len(test_index))
    clip_len, crop = config.finetune.clip_len, config.data.crop_size
    warn_short_videos(clip_len, {"train": index.num_frames[train_idx],
                                 "held-out": index.num_frames[val_idx],
                                 "test": test_index.num_frames})
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
    train_test = input_pipeline.eval_batches(
        train_idx, input_pipeline.MultiClipSampler(source, clip_len, crop,
                                                   config.finetune.num_test_clips),
        global_batch=config.finetune.test_batch_size, **shard)
    counts = np.bincount(index.labels[train_idx], minlength=len(names))
    class_counts = {name: int(counts[i]) for i, name in enumerate(names)}
    described = {
        "train": {**datasets.describe(config.data, "train", index, train_idx),
                  "train_videos_per_class": per_class, "class_counts": class_counts},
        "validation": datasets.describe(config.data, "train (held out)", index, val_idx),
        "test": datasets.describe(config.data, "test", test_index, test_idx),
    }
    return FinetuneData(train, val, test, len(train_idx), len(val_idx), len(test_idx),
                        names, described, train_test=train_test,
                        train_class_counts=class_counts)


def warn_short_videos(clip_len: int, num_frames: dict[str, np.ndarray]) -> None:
    """Says how many videos (per split) are shorter than a clip: their clips repeat the last
    frame, which a user should know before reading the accuracy."""
    short = {name: int((np.asarray(n) < clip_len).sum()) for name, n in num_frames.items()}
    if not any(short.values()):
        return
    shortest = min(int(np.min(n)) for n in num_frames.values() if len(n))
    counts = ", ".join(f"{count} of {len(num_frames[name])} {name}"
                       for name, count in short.items() if count)
    reporting.console(
        f"warning: {counts} videos are shorter than config.finetune.clip_len={clip_len} frames "
        f"(the shortest has {shortest}); their clips repeat the last frame")


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
                           "train_video_top1": results[f]["test"].get("train_video_top1"),
                           "best_checkpoint_step": results[f]["best_checkpoint_step"]}
                  for f in folds},
        "effective_learning_rate": trainer.effective_learning_rate(config),
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
    config_utils.migrate_deprecated_keys(config)
    config.finetune.fold = fold
    config.finetune.folds = (fold,)
    config.data.builder_config = datasets.with_fold(config.data, fold)
    done = workdir / "metrics.json"
    if done.is_file():
        result = reporting.read_json(done)
        if result.get("task") == "finetune" and result.get("fold") == fold:
            reporting.console(f"fold {fold}: already done ({done})")
            return result
    source = backbone_lib.resolve_init(config, workdir)
    validate_config(config)
    if source is not None:
        backbone_lib.check_fold(
            source, dataset=config.data.name, fold=fold,
            builder_config_of=functools.partial(datasets.with_fold, config.data))
    datasets.prepare(config.data)
    data = finetune_data(config, process_index=jax.process_index(),
                         process_count=jax.process_count())
    fill_schedule(config, data.num_train_videos)
    mode = "linear evaluation" if config.finetune.freeze_backbone else "fine-tuning"
    per_class = config.data.get("train_videos_per_class")
    lr = trainer.effective_learning_rate(config)
    modality = input_modality(config)
    reporting.console(
        f"{mode}: {config.model.arch} (width {config.model.width}) on "
        f"{modality.describe()} of {config.data.name} fold "
        f"{fold}: {data.num_train_videos} train videos"
        + (f" ({per_class} per class)" if per_class is not None else "")
        + f", {data.num_val_videos} held out, {data.num_test_videos} test videos, "
        f"{len(data.class_names)} classes; {config.num_train_steps} steps, "
        f"{trainer.describe_learning_rate(config)}")

    frozen = config.finetune.freeze_backbone
    run = trainer.run_stage(
        config, workdir, source=source,
        create_state=lambda axis: create_train_state(config, len(data.class_names),
                                                     bn_axis_name=axis),
        train=data.train, train_step=train_step, eval_step=eval_step,
        evaluate=lambda s, fn, strategy: evaluate(s, data.val, fn, strategy, config),
        provenance_data=data.provenance, desc=f"{mode} fold {fold}",
        # Linear evaluation normalises with the frozen backbone's running statistics,
        # re-estimated on the training clips for a random backbone (config.bn_recalibration);
        # fine-tuning trains them and is left as it is.
        calibration_forward=calibration_forward if frozen else None,
        clips_per_batch=config.batch_size)
    # The lowest-validation-loss checkpoint; without held-out videos (data.num_val_videos=0)
    # nothing ranks the checkpoints and the last step is tested.
    result, state, strategy, best_step = run.loop, run.state, run.strategy, run.chosen_step
    chosen_by = ("lowest validation loss" if result.best_step is not None
                 else "last step (no validation videos)" if data.num_val_videos == 0
                 else "last step")
    ctx, bn_statistics = run.ctx, run.bn_statistics
    test_fn = strategy.compile(functools.partial(test_step, ctx=ctx), donate_state=False)
    test = test_videos(state, data, test_fn, strategy, config)
    # The same multi-clip test on the videos it trained on: a train accuracy far above the test
    # accuracy is memorisation (few labelled videos), not a representation that generalises.
    train_eval = test_videos(state, data, test_fn, strategy, config, batches=data.train_test,
                             desc="train-video test")
    train_eval = {k: train_eval[k] for k in ("video_top1", "video_top5", "clip_top1",
                                             "num_test_videos", "num_clips") if k in train_eval}
    train_eval["num_videos"] = train_eval.pop("num_test_videos", 0)
    test["train_video_top1"] = train_eval.get("video_top1")
    label = (f"{config.data.name} fold {fold}, {test['num_test_videos']} test videos, "
             f"{test.get('num_clips')} clips each, mean of clip logits; step {best_step}")
    final = {
        "task": "finetune",
        "dataset": config.data.name,
        "fold": fold,
        "mode": mode,
        "best_checkpoint_step": best_step,
        "chosen_step": best_step,
        "chosen_by": chosen_by,
        "effective_learning_rate": lr,
        "val_metrics_last": result.val_metrics,
        "num_train_videos": data.num_train_videos,
        "train_videos_per_class": per_class,  # None: every training video
        "train_class_counts": data.train_class_counts,
        "num_val_videos": data.num_val_videos,
        "class_names": list(data.class_names),
        "backbone": source.describe() if source is not None else "random init (or resumed)",
        # The input the backbone read: the init_from backbone's unless set (and forced).
        "modality": modality.to_config(),
        **({"bn_statistics": bn_statistics} if bn_statistics is not None else {}),
        "label": label,
        "test": test,
        "train_eval": train_eval,  # the chosen checkpoint on its training videos, same test
        "loop_timing": result.timing,  # this run's loop (a resumed run: since the resume)
    }
    reporting.write_json(workdir / "confusion.json", {
        "label": label, "class_names": list(data.class_names),
        "confusion": test.get("confusion"), "rows": "true class", "columns": "predicted"})
    reporting.plot_confusion(workdir / "confusion.png", np.asarray(test.get("confusion")),
                             data.class_names, f"confusion: {label}")
    reporting.write_json(workdir / "metrics.json", final)
    nan = float("nan")
    reporting.console(
        f"fold {fold} test ({test['num_test_videos']} videos, {test.get('num_clips')} clips "
        f"each): video top-1 {test.get('video_top1', nan):.3f}, top-5 "
        f"{test.get('video_top5', nan):.3f}, clip top-1 "
        f"{test.get('clip_top1', nan):.3f}\n"
        f"fold {fold}: test video top-1 {test.get('video_top1', nan):.2f} (train "
        f"{train_eval.get('video_top1', nan):.2f}) at step {best_step}\n"
        f"metrics: {workdir / 'metrics.json'}")
    return final


def evaluate(state: Any, batches: Any, eval_fn: Any, strategy: parallel.Strategy,
             config: ml_collections.ConfigDict) -> dict[str, float]:
    """Validation loss and clip accuracy on the held-out train videos."""
    iterator = input_pipeline.make_iterator(batches, config, prefetch_processes=False)
    sums = parallel.accumulate(state, iterator, eval_fn, strategy)
    if sums is None:
        return {}
    count = max(float(sums["count"]), 1.0)
    return {"val_loss": float(sums["loss"]) / count,
            "val_accuracy": float(sums["correct"]) / count,
            "val_videos": int(sums["count"])}


def test_videos(state: Any, data: FinetuneData, test_fn: Any, strategy: parallel.Strategy,
                config: ml_collections.ConfigDict, *, batches: Any = None,
                desc: str = "10-clip test") -> dict[str, Any]:
    """The 10-clip test of every test video (each counted once on any number of hosts).

    `batches`: other videos' clip sets to test the same way (default: the test split's).
    """
    batches = data.test if batches is None else batches
    iterator = input_pipeline.make_iterator(batches, config, prefetch_processes=False)
    bar = tqdm.tqdm(iterator, total=len(batches), desc=desc, unit="batch",
                    disable=not reporting.is_main_process(), leave=False, dynamic_ncols=True)
    outputs = parallel.gather(state, bar, test_fn, strategy)
    return summarize_test(outputs, data.class_names, config.finetune.num_test_clips)
