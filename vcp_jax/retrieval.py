"""Video retrieval with a backbone's features (VCOP's protocol, docs/method.md §4.2).

No training. A backbone (from `init_from`: a pretraining or fine-tuning workdir, or random
init) embeds every video as the mean of its `num_clips` test clips' features, BatchNorm in
inference mode. The test videos of a fold (split 1 in the papers) are the queries, its training
videos the gallery; a query is a hit at k when one of its k most cosine-similar gallery videos
has its class.

- `clip_features`: the conv5 map max-pooled with window and stride (1,2,2), rounding down, and
  flattened (512 x 2 x 3 x 3 = 9,216 values at the paper's size), or its 512-d global average.
- `Embedder` / `feature_step`: a batch of videos' clips `(B, K, T, S, S, 3)` -> their features
  `(B, D)`, the pure function the parallel strategy compiles (jit or pmap).
- `extract_features`: every video of a split once, on any number of devices and hosts (padded
  batches, `parallel.gather`).
- `topk_neighbours`: each query's k nearest gallery videos, on the device in chunks of queries,
  so UCF101's 3,783 x 9,537 similarity matrix never exists whole (nor on the host).
- `topk_accuracy`, and `run()`: `retrieval.json` (with the chance levels, the gallery's class
  counts and each query's first-hit rank), `features.npz`, `topk.png`, `examples.json` and
  `examples.png` in the workdir.

    python main.py --config configs/retrieval.py:dataset=ucf101 \
        --config.init_from=~/runs/vcp_r3d --workdir ~/runs/vcp_r3d_retrieval_ucf101
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import simplejpeg
import tqdm
from flax import nnx

from vcp_jax import backbone as backbone_lib
from vcp_jax import (
    bn_calibration,
    checkpointing,
    config_utils,
    datasets,
    input_pipeline,
    models,
    parallel,
    provenance,
    reporting,
    stats,
)
from vcp_jax import modality as modality_lib

FEATURES = ("conv5", "pooled")
MERGES = ("mean", "concat")  # retrieval.merge: of the L2-normalised features of two backbones
POOL = (1, 2, 2)  # max-pool window and stride over (T, H, W) of the conv5 map
EXAMPLE_NEIGHBOURS = 5  # nearest gallery videos shown per example query

State = tuple[nnx.State, nnx.State]  # (parameters, BatchNorm statistics) of an `Embedder`


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises `ConfigError` naming the key and what is allowed (after `resolve_init`).

    The model, the parallel strategy with the batch and how clips are read are checked as every
    stage checks them (`models`, `parallel`, `input_pipeline`); the rest is retrieval's own.
    """
    models.validate_config(config)
    parallel.validate_config(config)
    input_pipeline.validate_config(config)
    config_utils.check_choice(config, "data.name", datasets.DATASETS)
    config_utils.check_choice(config, "retrieval.feature", FEATURES)
    if config.retrieval.get("merge_with"):
        config_utils.check_choice(config, "retrieval.merge", MERGES)
    bn_calibration.validate_config(config)
    for key in ("retrieval.clip_len", "retrieval.num_clips", "retrieval.chunk_size"):
        config_utils.check_positive(config, key)
    config_utils.check_positive(config, "retrieval.num_examples", allow_zero=True)
    topk = config_utils.get(config, "retrieval.topk")
    if (not isinstance(topk, Sequence) or not topk
            or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in topk)):
        raise config_utils.ConfigError(
            f"config.retrieval.topk={topk!r} must be a non-empty sequence of ints >= 1")
    datasets.fold_of(config.data)  # a UserError unless data.builder_config names a fold


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------


def clip_features(feature_map: jax.Array, kind: str) -> jax.Array:
    """Conv5 maps `(N, T', H', W', C)` -> clip features `(N, D)` float32.

    'conv5': max-pool with window = stride = (1, 2, 2) and no padding (7x7 -> 3x3, floor),
    flattened in PyTorch's (C, T, H, W) order so that the values match the reference code's
    element for element (cosine similarities do not depend on the order): D = C T' (H'//2)
    (W'//2), 512 x 2 x 3 x 3 = 9,216 for 16 x 112 x 112 clips at width 64.
    'pooled': the global average over (T', H', W'), D = C (the backbone's own output).
    """
    if kind == "pooled":
        return models.global_avg_pool(feature_map)
    if kind != "conv5":
        raise ValueError(f"unknown feature {kind!r}; expected one of {FEATURES}")
    pooled = nnx.max_pool(feature_map.astype(jnp.float32), POOL, strides=POOL, padding="VALID")
    return pooled.transpose(0, 4, 1, 2, 3).reshape(pooled.shape[0], -1)


class Embedder(nnx.Module):
    """A backbone as a video embedder: `(B, K, T, S, S, 3)` clips in [0, 1] -> `(B, D)`.

    A video's feature is the mean of its K clip features. The backbone sits under the name
    every model gives it (`backbone_lib.BACKBONE`), so a checkpoint's backbone loads into it
    as into the pretraining and fine-tuning models (`backbone_lib.with_backbone`).
    """

    def __init__(self, backbone: nnx.Module, feature: str):
        self.backbone = backbone
        self.feature = feature

    def __call__(self, clips: jax.Array) -> jax.Array:
        b, k = clips.shape[:2]
        maps = self.backbone.feature_map(clips.reshape(b * k, *clips.shape[2:]))
        return clip_features(maps, self.feature).reshape(b, k, -1).mean(axis=1)


def create_embedder(
    config: ml_collections.ConfigDict, source: backbone_lib.BackboneCheckpoint | None
) -> tuple[nnx.GraphDef, State]:
    """The embedder in inference mode, split into (graphdef, (params, batch_stats)).

    The backbone's weights come from `source`, or from a PyTorch-style random init seeded by
    `config.seed`; an error names any key or shape of `source` that does not fit.
    """
    backbone = models.create_backbone(
        config.model.arch, rngs=nnx.Rngs(params=config.seed), width=config.model.width,
        dtype=models.DTYPES[config.model.dtype], conv_impl=config.model.conv_impl)
    embedder = Embedder(backbone, config.retrieval.feature)
    embedder.eval()  # BatchNorm normalises with its running statistics
    graphdef, params, batch_stats = nnx.split(embedder, nnx.Param, nnx.BatchStat)
    if source is not None:
        params, batch_stats = backbone_lib.with_backbone(params, batch_stats, source)
    return graphdef, (params, batch_stats)


def feature_step(
    state: State, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef,
    modality: modality_lib.InputModality = modality_lib.RGB,
) -> dict[str, jax.Array]:
    """A batch of videos -> `features` `(B, D)` float32, with `label`, `index` and `valid`.

    `batch['clips']`: `(B, K, T, S, S, 3)` uint8, fed as `modality` says (the backbone's
    input: RGB, or residual frames). Per-example outputs (no cross-device reduction), for
    `parallel.gather`.
    """
    features = nnx.merge(graphdef, *state)(modality(models.to_input(batch["clips"])))
    return {"features": features, "label": batch["label"], "index": batch["index"],
            "valid": batch["valid"]}


def feature_dim(graphdef: nnx.GraphDef, state: State, config: ml_collections.ConfigDict) -> int:
    """D for this config's clips (shapes only, nothing computed); a `ConfigError` when 0."""
    size = config.data.crop_size
    clips = jax.ShapeDtypeStruct((1, 1, config.retrieval.clip_len, size, size, 3), jnp.float32)
    dim = jax.eval_shape(lambda s, x: nnx.merge(graphdef, *s)(x), state, clips).shape[-1]
    if dim == 0:
        raise config_utils.ConfigError(
            f"the conv5 map of {config.retrieval.clip_len}-frame {size}x{size} clips is too "
            f"small for the {POOL} max-pool; use larger clips (config.retrieval.clip_len, "
            f"config.data.crop_size) or config.retrieval.feature='pooled'")
    return int(dim)


def calibration_batches(
    config: ml_collections.ConfigDict, source: Any, num_videos: int
) -> grain.MapDataset:
    """Training-split clips for `bn_calibration`: an endless stream of global batches of
    `config.batch_size` clips, one random clip of a video in shuffled order (every video once
    per epoch), centre crop as the features'; this host's part. Never the test videos."""
    sampler = input_pipeline.ClipSampler(source, config.retrieval.clip_len,
                                         config.data.crop_size, random_crop_=False)
    return input_pipeline.train_stream(
        np.arange(num_videos), sampler, global_batch=config.batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count())


def calibration_forward(
    model: nnx.Module, batch: dict[str, jax.Array], index: jax.Array, *,
    modality: modality_lib.InputModality = modality_lib.RGB,
) -> jax.Array:
    """An `Embedder`'s backbone on a batch of clips, with the features' input (`modality`)."""
    del index  # the clips are the batch's own; nothing is drawn on the device
    return model.backbone(modality(models.to_input(batch["clip"])))


def video_batches(
    config: ml_collections.ConfigDict, source: Any, num_videos: int
) -> grain.MapDataset:
    """Every video of `source` once as its `num_clips` test clips (centre crop, evenly spread),
    in global batches of `config.batch_size` padded with `valid=False`: this host's part."""
    sampler = input_pipeline.MultiClipSampler(source, config.retrieval.clip_len,
                                              config.data.crop_size, config.retrieval.num_clips)
    return input_pipeline.eval_batches(
        np.arange(num_videos), sampler, global_batch=config.batch_size,
        process_index=jax.process_index(), process_count=jax.process_count())


def extract_features(
    state: Any,
    batches: grain.MapDataset,
    step_fn: Any,
    strategy: parallel.Strategy,
    config: ml_collections.ConfigDict,
    *,
    desc: str,
) -> dict[str, np.ndarray]:
    """`features` `(N, D)`, `label` and `index` `(N,)` of every video of `batches`, in order.

    `state` is placed by `strategy`, `step_fn` is `feature_step` compiled by it. Every host
    gets every video's feature; padding is dropped, so each video counts once.
    """
    iterator = input_pipeline.make_iterator(batches, config)
    bar = tqdm.tqdm(iterator, total=len(batches), desc=desc, unit="batch", leave=False,
                    disable=not reporting.is_main_process(), dynamic_ncols=True)
    out = parallel.gather(state, bar, step_fn, strategy)
    bar.close()
    return out


# --------------------------------------------------------------------------------------------
# Nearest neighbours and top-k accuracy
# --------------------------------------------------------------------------------------------


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Rows of `x` `(N, D)` scaled to unit length (zero rows stay zero)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


@functools.partial(jax.jit, static_argnames="k")
def _nearest(queries: jax.Array, gallery: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Queries `(c, D)`, unit-length gallery `(G, D)` -> the top-k similarities and indices."""
    sims = jnp.matmul(l2_normalize(queries), gallery.T, precision=jax.lax.Precision.HIGHEST)
    # top_k orders -0.0 below +0.0; one zero keeps ties among zeros broken by index alone.
    sims = jnp.where(sims == 0, 0.0, sims)
    return jax.lax.top_k(sims, k)  # equal values: the lower gallery index first


def topk_neighbours(
    queries: np.ndarray, gallery: np.ndarray, k: int, chunk_size: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's k most cosine-similar gallery rows: (similarities, indices), each `(Q, k)`.

    Queries `(Q, D)`, gallery `(G, D)`. Computed on the default device, `chunk_size` queries at
    a time against the whole gallery (one compiled shape: the last chunk is padded), so only a
    `(chunk_size, G)` block of similarities ever exists. Rows are sorted by decreasing
    similarity, ties towards the lower gallery index; k larger than G gives G columns.
    """
    num_queries, num_gallery = len(queries), len(gallery)
    if num_gallery == 0 or k < 1 or chunk_size < 1:
        raise ValueError(f"need a gallery, k >= 1 and chunk_size >= 1 (got G={num_gallery}, "
                         f"k={k}, chunk_size={chunk_size})")
    k = min(k, num_gallery)
    if num_queries == 0:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
    unit_gallery = jax.jit(l2_normalize)(jnp.asarray(gallery, jnp.float32))
    chunk = min(chunk_size, num_queries)
    results = []
    for start in range(0, num_queries, chunk):  # dispatched asynchronously, fetched below
        block = np.asarray(queries[start : start + chunk], np.float32)
        padded = np.pad(block, ((0, chunk - len(block)), (0, 0)))
        results.append((len(block), _nearest(jnp.asarray(padded), unit_gallery, k)))
    sims = np.concatenate([np.asarray(s)[:n] for n, (s, _) in results])
    indices = np.concatenate([np.asarray(i)[:n] for n, (_, i) in results])
    return sims, indices


def topk_accuracy(
    neighbours: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray,
    ks: Iterable[int],
) -> dict[int, float]:
    """The fraction of queries with their class among their k nearest gallery videos, per k.

    `neighbours` `(Q, K)`: gallery indices, nearest first. A k beyond K (a gallery smaller than
    k) counts the whole ranked list.
    """
    hits = np.asarray(gallery_labels)[neighbours] == np.asarray(query_labels)[:, None]
    hit_by = np.logical_or.accumulate(hits, axis=1)  # (Q, K): a hit within the first j + 1
    width = neighbours.shape[1]
    return {int(k): float(hit_by[:, min(k, width) - 1].mean()) if len(hits) else float("nan")
            for k in ks}


def first_hit_ranks(
    neighbours: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray
) -> np.ndarray:
    """Per query, the rank (1 = nearest) of its first gallery video of its class, 0 if none of
    its K ranked neighbours has it: a hit at k iff 0 < rank <= k, as in `topk_accuracy`."""
    hits = np.asarray(gallery_labels)[neighbours] == np.asarray(query_labels)[:, None]
    return np.where(hits.any(axis=1), 1 + np.argmax(hits, axis=1), 0).astype(np.int64)


def class_counts(labels: np.ndarray, num_classes: int) -> list[int]:
    """How many videos of each class (by label) `labels` holds."""
    return np.bincount(np.asarray(labels, np.int64), minlength=num_classes).tolist()


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


def pick_examples(
    sims: np.ndarray, neighbours: np.ndarray, query_labels: np.ndarray,
    gallery_labels: np.ndarray, query_ids: Sequence[str], gallery_ids: Sequence[str],
    class_names: Sequence[str], num_examples: int,
) -> list[dict[str, Any]]:
    """`num_examples` queries spread evenly over the test split, with their nearest videos."""
    num_queries = len(neighbours)
    chosen = np.unique(np.linspace(0, num_queries - 1, min(num_examples, num_queries)).astype(int))
    examples = []
    for q in chosen:
        label = int(query_labels[q])
        examples.append({
            "query": {"index": int(q), "video_id": query_ids[q], "label": label,
                      "class": class_names[label]},
            "neighbours": [
                {"rank": r + 1, "index": int(g), "video_id": gallery_ids[g],
                 "label": int(gallery_labels[g]), "class": class_names[gallery_labels[g]],
                 "similarity": float(sims[q, r]), "hit": bool(gallery_labels[g] == label)}
                for r, g in enumerate(neighbours[q, :EXAMPLE_NEIGHBOURS])],
        })
    return examples


def middle_frame(source: Any, index: int) -> np.ndarray:
    """The middle frame of video `index` of a data source, `(H, W, 3)` uint8."""
    frames = source[index]["frames"]
    return simplejpeg.decode_jpeg(frames[len(frames) // 2], colorspace="RGB")


def plot_examples(
    path: Path, examples: list[dict[str, Any]], query_source: Any, gallery_source: Any,
    title: str,
) -> None:
    """One row per query: its middle frame, then its nearest gallery videos' (green: its class,
    red: another)."""
    if not reporting.plotting_available():
        return
    cols = 1 + max(len(e["neighbours"]) for e in examples)
    fig = reporting.figure((1.9 * cols, 1.9 * len(examples) + 0.4))
    axes = fig.subplots(len(examples), cols, squeeze=False)
    for row, example in zip(axes, examples, strict=True):
        query = example["query"]
        cells = [(query_source, query["index"], f"query\n{query['class']}", "black")]
        cells += [(gallery_source, n["index"], f"{n['rank']}: {n['class']}\n"
                   f"cos {n['similarity']:.3f}", "tab:green" if n["hit"] else "tab:red")
                  for n in example["neighbours"]]
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_frame_on(False)
        for ax, (source, index, label, color) in zip(row, cells, strict=False):
            ax.imshow(middle_frame(source, index))
            ax.set_title(label, fontsize=7, color=color)
            ax.set_frame_on(True)
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(3 if color != "black" else 1)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def save_features(path: Path, **arrays: Any) -> None:
    """`np.savez` atomically (process 0 only): a reader never sees half a file."""
    if not reporting.is_main_process():
        return
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def _refuse_training_workdir(workdir: Path) -> None:
    if checkpointing.find_own_steps(workdir):
        raise config_utils.UserError(
            f"the workdir {workdir} holds a training run's checkpoints; retrieval writes its "
            f"results into a workdir of its own. Pass --config.init_from={workdir} and another "
            f"--workdir.")


@dataclasses.dataclass
class Split:
    """The videos of one side of the retrieval: the test split (queries) or train (gallery)."""

    split: str  # 'test' or 'train'
    source: Any  # the random-access data source
    index: datasets.VideoIndex  # labels and video ids, in source order
    features: np.ndarray | None = None  # (N, D) float32 once extracted

    def __len__(self) -> int:
        return len(self.index)


def open_split(data: ml_collections.ConfigDict, split: str) -> Split:
    source = datasets.data_source(data, split)
    return Split(split, source, datasets.video_index(source, split))


def embed_split(
    split: Split, state: Any, step_fn: Any, strategy: parallel.Strategy,
    config: ml_collections.ConfigDict, *, desc: str, origin: str,
) -> None:
    """Fills `split.features`; checks that every video came once and every value is finite."""
    out = extract_features(state, video_batches(config, split.source, len(split)), step_fn,
                           strategy, config, desc=desc)
    if not np.array_equal(out.get("index"), np.arange(len(split))):
        raise RuntimeError(f"{desc}: the batches did not cover every video exactly once")
    if not np.isfinite(out["features"]).all():
        raise config_utils.UserError(
            f"the {origin} gives non-finite features for {split.split} videos; has it diverged?")
    split.features = out["features"]


def write_outputs(
    workdir: Path, results: dict[str, Any], queries: Split, gallery: Split,
    sims: np.ndarray, neighbours: np.ndarray, num_examples: int,
) -> None:
    """`features.npz`, `topk.png`, `examples.json` / `examples.png` and `retrieval.json`."""
    class_names = datasets.class_names(queries.source)
    save_features(
        workdir / "features.npz",
        query_features=queries.features, gallery_features=gallery.features,
        query_labels=queries.index.labels, gallery_labels=gallery.index.labels,
        query_video_ids=np.asarray(queries.index.video_ids, str),
        gallery_video_ids=np.asarray(gallery.index.video_ids, str),
        neighbours=neighbours, similarities=sims, class_names=np.asarray(class_names, str))
    ks = [int(k) for k in results["topk"]]
    what = (f"{results['dataset']}/{results['data_config']}: {len(queries)} test queries, "
            f"{len(gallery)} train videos")
    reporting.plot_curves(
        workdir / "topk.png",
        {f"{results['feature']} ({results['feature_dim']}-d)":
         (ks, [results["topk_percent"][str(k)] for k in ks])},
        title=what, xlabel="k", ylabel="top-k accuracy (%)", logx=True)
    if num_examples and len(queries) and reporting.is_main_process():
        examples = pick_examples(sims, neighbours, queries.index.labels, gallery.index.labels,
                                 queries.index.video_ids, gallery.index.video_ids, class_names,
                                 num_examples)
        reporting.write_json(workdir / "examples.json", {"label": what, "examples": examples})
        plot_examples(workdir / "examples.png", examples, queries.source, gallery.source,
                      f"nearest train videos of test queries ({what})")
    reporting.write_json(workdir / "retrieval.json", results)


@dataclasses.dataclass
class PreparedBackbone:
    """One backbone ready to embed videos: its embedder, input and description."""

    config: ml_collections.ConfigDict  # resolved (arch, width, modality)
    source: backbone_lib.BackboneCheckpoint | None
    modality: modality_lib.InputModality
    graphdef: nnx.GraphDef
    state: State
    dim: int
    origin: str


def _prepare_backbone(config: ml_collections.ConfigDict,
                      source: backbone_lib.BackboneCheckpoint | None) -> PreparedBackbone:
    modality = modality_lib.from_config(config, pretext="retrieval")  # resolve_init's
    graphdef, state = create_embedder(config, source)
    origin = (source.describe() if source is not None else
              f"randomly initialised {config.model.arch} width {config.model.width} backbone "
              f"(seed {config.seed})")
    return PreparedBackbone(config, source, modality, graphdef, state,
                            feature_dim(graphdef, state, config), origin)


def _embed_both(
    backbone: PreparedBackbone, config: ml_collections.ConfigDict, gallery: Split,
    queries: Split, strategy: parallel.Strategy,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any] | None]:
    """(gallery features, query features, BatchNorm record) of one backbone."""
    state = backbone.state
    # Inference-mode BatchNorm with a random backbone's initial statistics (mean 0, var 1)
    # makes every video's feature nearly the same; config.bn_recalibration re-estimates them
    # on the gallery (train split) clips first. 'never' keeps the reference code's protocol.
    new_stats, bn_statistics = bn_calibration.recalibrate(
        config, nnx.merge(backbone.graphdef, *state),
        calibration_batches(config, gallery.source, len(gallery)),
        functools.partial(calibration_forward, modality=backbone.modality), strategy,
        clips_per_batch=config.batch_size,
        origin="random" if backbone.source is None else "init_from")
    if new_stats is not None:
        state = (state[0], new_stats)
    step_fn = strategy.compile(
        functools.partial(feature_step, graphdef=backbone.graphdef, modality=backbone.modality),
        donate_state=False)
    placed = strategy.put_state(state)
    for name, split in (("gallery", gallery), ("query", queries)):
        embed_split(split, placed, step_fn, strategy, config, desc=f"{name} features",
                    origin=backbone.origin)
    return gallery.features, queries.features, bn_statistics


def merge_features(features: Sequence[np.ndarray], how: str) -> np.ndarray:
    """Several backbones' features of the same videos `(N, D_i)` as one: each L2-normalised,
    then their mean ('mean', all D_i equal) or their concatenation ('concat')."""
    unit = [np.asarray(l2_normalize(jnp.asarray(f, jnp.float32))) for f in features]
    if how == "mean":
        return np.mean(unit, axis=0)
    if how == "concat":
        return np.concatenate(unit, axis=1)
    raise ValueError(f"unknown merge {how!r}; expected one of {MERGES}")


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Retrieval (`config.task='retrieval'`): test videos against train videos, top-k accuracy.

    Writes `retrieval.json` (returned), `features.npz`, `topk.png`, `examples.json`,
    `examples.png` and `provenance.json` into `workdir`. A wrong `init_from` or config fails
    before any data or compile work.
    """
    workdir = Path(workdir).expanduser()
    config = copy.deepcopy(config)  # filled in below (arch and width from init_from)
    config_utils.migrate_deprecated_keys(config)
    _refuse_training_workdir(workdir)
    source = backbone_lib.resolve_init(config, workdir)
    validate_config(config)
    if source is not None:
        backbone_lib.check_fold(
            source, dataset=config.data.name, fold=datasets.fold_of(config.data),
            builder_config_of=functools.partial(datasets.with_fold, config.data))
    first = _prepare_backbone(config, source)
    second = None
    if config.retrieval.get("merge_with"):
        # The other backbone (e.g. the residual-frame one next to an RGB one): its own
        # architecture and modality, from its checkpoint.
        other = copy.deepcopy(config)
        other.init_from = config.retrieval.merge_with
        for key in ("arch", "width", "modality", "residual_formula", "residual_edge"):
            other.model[key] = None
        other_source = backbone_lib.resolve_init(other, workdir)
        backbone_lib.check_fold(
            other_source, dataset=config.data.name, fold=datasets.fold_of(config.data),
            builder_config_of=functools.partial(datasets.with_fold, config.data))
        second = _prepare_backbone(other, other_source)
    backbones = [first] + ([second] if second is not None else [])
    dim = (sum(b.dim for b in backbones) if second is not None
           and config.retrieval.merge == "concat" else first.dim)
    if second is not None and config.retrieval.merge == "mean" and second.dim != first.dim:
        raise config_utils.ConfigError(
            f"config.retrieval.merge='mean' needs features of one size; the backbones give "
            f"{first.dim:,} and {second.dim:,}: use config.retrieval.merge='concat'")
    settings, fold = config.retrieval, datasets.fold_of(config.data)
    origin = first.origin

    datasets.prepare(config.data)
    queries, gallery = open_split(config.data, "test"), open_split(config.data, "train")
    if not len(gallery):
        raise config_utils.UserError(
            f"{config.data.name}/{config.data.builder_config} has no train videos to retrieve")
    merged = (f"; merged ({settings.merge} of the L2-normalised features) with the "
              f"{second.origin} on {second.modality.describe()}" if second is not None else "")
    reporting.console(
        f"retrieval on {config.data.name}/{config.data.builder_config} (fold {fold}): "
        f"{len(queries)} test videos as queries, {len(gallery)} train videos as the gallery; "
        f"{settings.feature} features ({dim:,}-d), mean of {settings.num_clips} clips of "
        f"{settings.clip_len} frames of {first.modality.describe()}; the {origin}{merged}")
    workdir.mkdir(parents=True, exist_ok=True)
    provenance.write(workdir, config, init_from=source, data={
        name: datasets.describe(config.data, s.split, s.index, np.arange(len(s)))
        for name, s in (("queries", queries), ("gallery", gallery))})

    strategy = parallel.make_strategy(config.parallel)
    each = []  # per backbone: (gallery features, query features, bn_statistics)
    for backbone in backbones:
        each.append(_embed_both(backbone, config, gallery, queries, strategy))
    bn_statistics = each[0][2]
    topk = tuple(int(k) for k in settings.topk)
    accuracy_each = []
    if second is not None:
        for gallery_features, query_features, _ in each:
            _, alone = topk_neighbours(query_features, gallery_features, max(topk),
                                       settings.chunk_size)
            accuracy_each.append(topk_accuracy(alone, queries.index.labels,
                                               gallery.index.labels, topk))
        gallery.features = merge_features([e[0] for e in each], settings.merge)
        queries.features = merge_features([e[1] for e in each], settings.merge)
    else:
        gallery.features, queries.features = each[0][0], each[0][1]

    sims, neighbours = topk_neighbours(queries.features, gallery.features, max(topk),
                                       settings.chunk_size)
    accuracy = topk_accuracy(neighbours, queries.index.labels, gallery.index.labels, topk)
    counts = class_counts(gallery.index.labels, len(datasets.class_names(queries.source)))
    results: dict[str, Any] = {
        "task": "retrieval",
        "dataset": config.data.name,
        "data_config": config.data.builder_config,
        "fold": fold,
        "queries": "test",
        "gallery": "train",
        "num_queries": len(queries),
        "num_gallery": len(gallery),
        "feature": settings.feature,
        "feature_dim": dim,
        "num_clips": settings.num_clips,
        "clip_len": settings.clip_len,
        "crop_size": config.data.crop_size,
        "similarity": "cosine",
        "backbone": origin,
        "modality": first.modality.to_config(),  # the backbone's input (init_from's unless set)
        # With retrieval.merge_with: the second backbone, how the features were merged, and
        # each backbone's top-k alone (in %, next to the merged `topk_percent`).
        **({"merged_with": {
            "backbone": second.origin, "modality": second.modality.to_config(),
            "merge": settings.merge, "feature_dims": [b.dim for b in backbones],
            "topk_percent_each": [{str(k): 100 * v for k, v in a.items()}
                                  for a in accuracy_each]}} if second is not None else {}),
        "bn_statistics": bn_statistics,
        "topk": {str(k): v for k, v in accuracy.items()},  # fractions of the queries
        "topk_percent": {str(k): 100 * v for k, v in accuracy.items()},
        # A random ranking's top-k accuracy (hypergeometric, `stats.retrieval_chance`).
        "chance_topk": {str(k): stats.retrieval_chance(queries.index.labels, counts, k)
                        for k in topk},
        "gallery_class_counts": counts,
        # Per query (test video, in split order), for paired comparisons of two backbones on
        # the same queries (`stats.paired_difference`); kept last as the longest entry.
        "per_query": {
            "label": np.asarray(queries.index.labels).astype(int).tolist(),
            "first_hit_rank": first_hit_ranks(neighbours, queries.index.labels,
                                              gallery.index.labels).tolist()},
    }
    write_outputs(workdir, results, queries, gallery, sims, neighbours, settings.num_examples)
    reporting.console(
        f"retrieval top-{'/'.join(map(str, topk))}: "
        + " / ".join(f"{100 * accuracy[k]:.1f}" for k in topk)
        + f" % ({len(queries)} queries, {len(gallery)} gallery videos)\n"
        f"results: {workdir / 'retrieval.json'}")
    return results
