"""Input pipelines: grain over `tfds.data_source`, TensorFlow-free.

A pretraining element is one VCP tuple sampled from one video: 3 context clips (3, T, H, W, C)
and, where the video has room, a remote clip, all uint8 with their own random crop. Only the JPEG
frames a tuple needs are decoded, into preallocated arrays. The cloze itself (which option fills
the blank) is drawn on the device, inside the jitted train step (`vcp_jax.cloze`).

Determinism: training tuples are drawn from (seed, position in the stream) by grain, so a run that
restarts at step k sees exactly the batches an uninterrupted run sees; validation tuples use
seed = example index (SPEC 1), so VCP accuracy is reproducible and does not depend on the batch
size or the number of hosts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import ml_collections
import numpy as np
import simplejpeg
import tensorflow_datasets as tfds

import tfds_builders  # noqa: F401 - registers ucf101_frames / hmdb51_frames
from vcp_jax import cloze as cloze_lib

Batch = dict[str, np.ndarray]
_LENGTHS_FILE = "num_frames_{split}.json"


# --------------------------------------------------------------------------------------------
# Data sources and the held-out validation videos
# --------------------------------------------------------------------------------------------


def data_source(data: ml_collections.ConfigDict, split: str) -> Any:
    """The random-access `tfds.data_source` of `data.name/data.config`, with a clear error."""
    data_dir = str(Path(data.data_dir).expanduser())
    name = f"{data.name}/{data.config}"
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir)
    except Exception as e:  # TFDS raises several types for a dataset that is not built
        raise FileNotFoundError(
            f"dataset {name} (split {split!r}) is not built in {data_dir}: {e}\n"
            f"Build it with: python -m tfds_builders.build {data.name} "
            f"--manual_dir=<videos> --data_dir={data_dir} --config={data.config}"
        ) from e


def video_lengths(source: Any, split: str) -> np.ndarray:
    """Decoded frame counts of every example, cached beside the dataset after the first pass."""
    cache = None
    data_dir = getattr(getattr(source, "dataset_info", None), "data_dir", None)
    if data_dir:
        cache = Path(data_dir) / _LENGTHS_FILE.format(split=split)
        if cache.is_file():
            lengths = np.asarray(json.loads(cache.read_text()), np.int64)
            if len(lengths) == len(source):
                return lengths
    lengths = np.asarray([int(source[i]["num_frames"]) for i in range(len(source))], np.int64)
    if cache is not None:
        try:
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps(lengths.tolist()))
            tmp.replace(cache)
        except OSError:  # a read-only dataset folder just means no cache
            pass
    return lengths


def holdout_split(
    num_videos: int, num_holdout: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices): a fixed random subset of the train split held out.

    SPEC 3 holds 800 UCF101 train videos out for validation; the subset depends only on `seed`
    and the number of videos, so every run and every host agrees on it.
    """
    if not 0 <= num_holdout < num_videos:
        raise ValueError(
            f"data.num_val_videos must be in [0, {num_videos}) for this split, got {num_holdout}"
        )
    order = np.random.default_rng(seed).permutation(num_videos)
    return np.sort(order[num_holdout:]), np.sort(order[:num_holdout])


# --------------------------------------------------------------------------------------------
# Tuple sampling (one video -> context clips + remote clip)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TupleSpec:
    """Where a tuple's clips lie in time, and the crop, from the cloze and data configs."""

    clip_len: int
    offsets: tuple[int, ...]  # start of each context clip relative to the tuple start
    remote_gap: int
    crop_size: int
    need_remote: bool

    @property
    def span(self) -> int:
        return self.offsets[-1] + self.clip_len

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> TupleSpec:
        return cls(
            clip_len=config.cloze.clip_len,
            offsets=tuple(cloze_lib.clip_offsets(config.cloze)),
            remote_gap=config.cloze.remote_gap,
            crop_size=config.data.crop_size,
            need_remote="remote" in config.cloze.options,
        )


def remote_ranges(num_frames: int, start: int, spec: TupleSpec) -> list[tuple[int, int]]:
    """Inclusive ranges of remote-clip starts at least `remote_gap` frames outside the tuple.

    Before the tuple: the clip must end `remote_gap` frames before it starts; after: it must start
    `remote_gap` frames after the tuple ends. Either side may be empty (SPEC 1).
    """
    ranges = []
    before_last = start - spec.remote_gap - spec.clip_len
    if before_last >= 0:
        ranges.append((0, before_last))
    after_first = start + spec.span + spec.remote_gap
    if after_first <= num_frames - spec.clip_len:
        ranges.append((after_first, num_frames - spec.clip_len))
    return ranges


def _decode_clip(
    frames: Sequence[bytes], first: int, spec: TupleSpec, y: int, x: int, out: np.ndarray
) -> None:
    """Decodes frames[first:first+clip_len] and writes their (y, x) crop into `out` (T,h,w,C)."""
    size = spec.crop_size
    for t in range(spec.clip_len):
        image = simplejpeg.decode_jpeg(frames[first + t], colorspace="RGB")
        out[t] = image[y : y + size, x : x + size]


def _random_crop(rng: np.random.Generator, height: int, width: int, size: int) -> tuple[int, int]:
    if height < size or width < size:
        raise ValueError(f"data.crop_size={size} is larger than the frames ({height}x{width})")
    return int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))


def sample_tuple(example: dict[str, Any], rng: np.random.Generator, spec: TupleSpec) -> Batch:
    """One pretraining element from one video example (its `frames` are JPEG bytes).

    Returns `clips` (3, T, S, S, C) uint8, `remote` (T, S, S, C) uint8 (zeros without room),
    `has_remote` bool, `label` (the action class, unused by VCP), `num_frames`.
    """
    frames = example["frames"]
    num_frames = len(frames)
    if num_frames < spec.span:
        raise ValueError(f"video with {num_frames} frames is shorter than a tuple ({spec.span})")
    first = simplejpeg.decode_jpeg_header(frames[0])
    height, width = first[0], first[1]
    size = spec.crop_size
    start = int(rng.integers(0, num_frames - spec.span + 1))
    clips = np.zeros((len(spec.offsets), spec.clip_len, size, size, 3), np.uint8)
    for i, offset in enumerate(spec.offsets):
        y, x = _random_crop(rng, height, width, size)
        _decode_clip(frames, start + offset, spec, y, x, clips[i])
    remote = np.zeros((spec.clip_len, size, size, 3), np.uint8)
    ranges = remote_ranges(num_frames, start, spec) if spec.need_remote else []
    if ranges:
        # One side at random among those with room, then a start within it.
        low, high = ranges[int(rng.integers(0, len(ranges)))]
        y, x = _random_crop(rng, height, width, size)
        _decode_clip(frames, int(rng.integers(low, high + 1)), spec, y, x, remote)
    return {
        "clips": clips,
        "remote": remote,
        "has_remote": np.bool_(bool(ranges)),
        "label": np.int32(example["label"]),
    }


class _SampleTuple(grain.transforms.RandomMap):
    """grain transform: video index -> tuple, with grain's per-element generator (training)."""

    def __init__(self, source: Any, spec: TupleSpec):
        self.source, self.spec = source, spec

    def random_map(self, index: int, rng: np.random.Generator) -> Batch:
        element = sample_tuple(self.source[int(index)], rng, self.spec)
        element["index"] = np.int32(index)
        return element


class _SampleEvalTuple(grain.transforms.Map):
    """grain transform: video index -> tuple drawn with seed = example index (evaluation)."""

    def __init__(self, source: Any, spec: TupleSpec):
        self.source, self.spec = source, spec

    def map(self, index: int) -> Batch:
        rng = np.random.default_rng(int(index))
        element = sample_tuple(self.source[int(index)], rng, self.spec)
        element["index"] = np.int32(index)
        element["valid"] = np.bool_(True)
        return element


# --------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PretrainData:
    """The training stream and the validation batches of one host, plus what was left out."""

    train: grain.MapDataset  # infinite, batched; element k is the host's batch of step k
    val: grain.MapDataset  # finite, batched, last batch padded (`valid` marks real tuples)
    num_train_videos: int
    num_val_videos: int
    num_too_short: int


def host_batch_size(global_batch: int, process_count: int) -> int:
    if global_batch % process_count:
        raise ValueError(
            f"batch_size={global_batch} must be divisible by the number of hosts ({process_count})"
        )
    return global_batch // process_count


def _pad_batch(elements: Sequence[Batch], size: int) -> Batch:
    """Stacks elements and pads to `size` with copies of the first marked `valid=False`."""
    pads = [dict(elements[0], valid=np.bool_(False)) for _ in range(size - len(elements))]
    return {key: np.stack([e[key] for e in (*elements, *pads)]) for key in elements[0]}


def pretrain_data(
    config: ml_collections.ConfigDict, *, process_index: int = 0, process_count: int = 1
) -> PretrainData:
    """Builds the VCP pretraining stream (train split minus held-out videos) and validation."""
    source = data_source(config.data, "train")
    spec = TupleSpec.from_config(config)
    lengths = video_lengths(source, "train")
    train_idx, val_idx = holdout_split(len(source), config.data.num_val_videos, seed=0)
    long_enough = lengths >= spec.span
    num_too_short = int((~long_enough).sum())
    if num_too_short:
        logging.info("%d of %d videos are shorter than a tuple (%d frames) and are skipped",
                     num_too_short, len(source), spec.span)
    train_idx = train_idx[long_enough[train_idx]]
    val_idx = val_idx[long_enough[val_idx]]
    if len(train_idx) == 0:
        raise ValueError(f"no training video has the {spec.span} frames a tuple needs")
    batch = host_batch_size(config.batch_size, process_count)

    # Each host reads its own shard of the videos; grain's seeded shuffle reshuffles every epoch.
    train = (
        grain.MapDataset.source(train_idx[process_index::process_count])
        .shuffle(seed=config.seed)
        .repeat()
        .random_map(_SampleTuple(source, spec), seed=config.seed)
        .batch(batch, drop_remainder=True)
    )
    val = (
        grain.MapDataset.source(val_idx[process_index::process_count])
        .map(_SampleEvalTuple(source, spec))
        .batch(batch, batch_fn=lambda els: _pad_batch(els, batch))
    )
    return PretrainData(
        train=train,
        val=val,
        num_train_videos=len(train_idx),
        num_val_videos=len(val_idx),
        num_too_short=num_too_short,
    )


def make_iterator(
    dataset: grain.MapDataset,
    config: ml_collections.ConfigDict,
    *,
    prefetch_processes: bool = True,
) -> grain.DatasetIterator:
    """A checkpointable iterator with threaded (and optionally multi-process) prefetching.

    JPEG decoding releases the GIL, so threads (`data.num_threads`) scale on one process;
    `data.num_workers` > 0 adds grain worker processes for hosts with many cores.
    """
    threads = max(1, config.data.num_threads)
    iter_ds = dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
    )
    if prefetch_processes and config.data.num_workers > 0:
        iter_ds = iter_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=config.data.num_workers)
        )
    return iter(iter_ds)


def ensure_dataset(data: ml_collections.ConfigDict) -> None:
    """Generates and builds the synthetic dataset when the config asks for one that is missing.

    Real datasets are never downloaded (no network at run time): a missing one is an error that
    says how to build it.
    """
    synthetic_config = data.get("synthetic")
    if not synthetic_config:
        return
    from tfds_builders import build as build_lib  # noqa: PLC0415
    from vcp_jax.data import synthetic  # noqa: PLC0415

    data_dir = Path(data.data_dir).expanduser()
    built = data_dir / data.name / data.config
    if any(built.glob("*/dataset_info.json")):
        return
    manual_dir = Path(synthetic_config.manual_dir).expanduser()
    print(f"generating synthetic videos in {manual_dir}, building {data.name}/{data.config}")
    # Every other key of `data.synthetic` is an argument of `synthetic.generate`.
    not_generate_args = ("manual_dir", "build_workers")
    options = {k: v for k, v in synthetic_config.items() if k not in not_generate_args}
    synthetic.generate(manual_dir, **options)
    build_lib.build(data.name, manual_dir=manual_dir, data_dir=data_dir, config=data.config,
                    num_workers=synthetic_config.get("build_workers"))
