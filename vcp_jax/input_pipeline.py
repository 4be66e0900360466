"""Input pipelines: grain over `tfds.data_source`, TensorFlow-free.

Elements, all uint8 `(..., T, H, W, C)` with their own crop, decoding only the JPEG frames they
need into preallocated arrays:

- a pretraining **tuple** (`sample_tuple`): 3 context clips and, where the video has room, a
  remote clip; the cloze (which option fills the blank) is drawn on the device, in the step;
- a fine-tuning **clip** (`sample_clip`): one random clip of a video, random crop;
- the **test clips** of a video (`sample_multi_clips`): `num_clips` clips evenly spread over the
  video (centres `linspace(T/2, L - T/2, num_clips)`), centre crop; for the 10-clip test and
  retrieval.

Streams are defined by global positions, not by hosts: training element `g` of the global stream
is sampled with a generator seeded by (seed, g), and global batch `k` is elements
`[k * B, (k + 1) * B)`, of which host `p` reads (and decodes) only its slice
`[k * B + p * b, k * B + (p + 1) * b)`. So 1 host and 4 hosts train on the same batches, and a run
that restarts at step `s` simply starts the stream at batch `s` (no iterator state to save).
Evaluation sets are padded to whole global batches with copies marked `valid=False`, so every
host runs the same number of steps and every video counts once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
import simplejpeg

from vcp_jax import cloze as cloze_lib
from vcp_jax import config_utils
from vcp_jax.config_utils import UserError

Batch = dict[str, np.ndarray]
Sampler = Callable[[int, np.random.Generator], Batch]


def validate_config(config: ml_collections.ConfigDict) -> None:
    """How every stage reads its clips: `data.crop_size` > 0, `data.num_threads` and
    `data.num_workers` >= 0; a `ConfigError` names the key."""
    config_utils.check_positive(config, "data.crop_size")
    for key in ("data.num_threads", "data.num_workers"):
        config_utils.check_positive(config, key, allow_zero=True)


# --------------------------------------------------------------------------------------------
# Decoding and cropping
# --------------------------------------------------------------------------------------------


def frame_size(frames: Sequence[bytes]) -> tuple[int, int]:
    height, width = simplejpeg.decode_jpeg_header(frames[0])[:2]
    return int(height), int(width)


def _decode_clip(
    frames: Sequence[bytes], first: int, clip_len: int, y: int, x: int, size: int,
    out: np.ndarray,
) -> None:
    """Decodes `clip_len` frames from `first` and writes their (y, x) crop into `out` (T,h,w,C).

    Frame indices past the end of the video repeat its last frame (videos shorter than a clip).
    """
    last = len(frames) - 1
    for t in range(clip_len):
        image = simplejpeg.decode_jpeg(frames[min(first + t, last)], colorspace="RGB")
        out[t] = image[y : y + size, x : x + size]


def random_crop(rng: np.random.Generator, height: int, width: int, size: int) -> tuple[int, int]:
    _check_crop(height, width, size)
    return int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))


def center_crop(height: int, width: int, size: int) -> tuple[int, int]:
    _check_crop(height, width, size)
    return (height - size) // 2, (width - size) // 2


def _check_crop(height: int, width: int, size: int) -> None:
    if height < size or width < size:
        raise UserError(f"config.data.crop_size={size} is larger than the frames "
                        f"({height}x{width})")


# --------------------------------------------------------------------------------------------
# Pretraining tuples
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
    `remote_gap` frames after the tuple ends. Either side may be empty.
    """
    ranges = []
    before_last = start - spec.remote_gap - spec.clip_len
    if before_last >= 0:
        ranges.append((0, before_last))
    after_first = start + spec.span + spec.remote_gap
    if after_first <= num_frames - spec.clip_len:
        ranges.append((after_first, num_frames - spec.clip_len))
    return ranges


def sample_tuple(example: dict[str, Any], rng: np.random.Generator, spec: TupleSpec) -> Batch:
    """One pretraining element from one video example (its `frames` are JPEG bytes).

    Returns `clips` (3, T, S, S, C) uint8, `remote` (T, S, S, C) uint8 (zeros without room),
    `has_remote` bool, `label` (the action class, unused by VCP).
    """
    frames = example["frames"]
    num_frames = len(frames)
    if num_frames < spec.span:
        raise ValueError(f"video with {num_frames} frames is shorter than a tuple ({spec.span})")
    height, width = frame_size(frames)
    size, clip_len = spec.crop_size, spec.clip_len
    start = int(rng.integers(0, num_frames - spec.span + 1))
    clips = np.zeros((len(spec.offsets), clip_len, size, size, 3), np.uint8)
    for i, offset in enumerate(spec.offsets):
        y, x = random_crop(rng, height, width, size)
        _decode_clip(frames, start + offset, clip_len, y, x, size, clips[i])
    remote = np.zeros((clip_len, size, size, 3), np.uint8)
    ranges = remote_ranges(num_frames, start, spec) if spec.need_remote else []
    if ranges:
        # One side at random among those with room, then a start within it.
        low, high = ranges[int(rng.integers(0, len(ranges)))]
        y, x = random_crop(rng, height, width, size)
        _decode_clip(frames, int(rng.integers(low, high + 1)), clip_len, y, x, size, remote)
    return {
        "clips": clips,
        "remote": remote,
        "has_remote": np.bool_(bool(ranges)),
        "label": np.int32(example["label"]),
    }


# --------------------------------------------------------------------------------------------
# Fine-tuning clips and the test clips of a video
# --------------------------------------------------------------------------------------------


def sample_clip(
    example: dict[str, Any], rng: np.random.Generator, clip_len: int, crop_size: int,
    *, random_crop_: bool = True,
) -> Batch:
    """One clip of `clip_len` consecutive frames at a random start, random (or centre) crop.

    Videos shorter than a clip start at frame 0 and repeat their last frame.
    Returns `clip` (T, S, S, C) uint8 and `label`.
    """
    frames = example["frames"]
    height, width = frame_size(frames)
    start = int(rng.integers(0, max(len(frames) - clip_len, 0) + 1))
    y, x = (random_crop(rng, height, width, crop_size) if random_crop_
            else center_crop(height, width, crop_size))
    clip = np.zeros((clip_len, crop_size, crop_size, 3), np.uint8)
    _decode_clip(frames, start, clip_len, y, x, crop_size, clip)
    return {"clip": clip, "label": np.int32(example["label"])}


def multi_clip_starts(num_frames: int, clip_len: int, num_clips: int) -> list[int]:
    """Starts of `num_clips` clips spread evenly: centres `linspace(T/2, L - T/2, n)`, minus T/2.

    For T = 16: centres `linspace(8, L - 8, 10)`, `start = int(centre - 8)` (the reference's
    positions). A video shorter than a clip (L < T) gives starts clamped to 0: every clip is the
    whole video followed by repeats of its last frame.
    """
    half = clip_len / 2
    centres = np.linspace(half, num_frames - half, num_clips)
    return [max(0, int(c - half)) for c in centres]


def sample_multi_clips(
    example: dict[str, Any], clip_len: int, crop_size: int, num_clips: int
) -> Batch:
    """The test clips of a video, centre crop: `clips` (K, T, S, S, C) uint8 and `label`."""
    frames = example["frames"]
    height, width = frame_size(frames)
    y, x = center_crop(height, width, crop_size)
    clips = np.zeros((num_clips, clip_len, crop_size, crop_size, 3), np.uint8)
    for i, start in enumerate(multi_clip_starts(len(frames), clip_len, num_clips)):
        _decode_clip(frames, start, clip_len, y, x, crop_size, clips[i])
    return {"clips": clips, "label": np.int32(example["label"])}


# --------------------------------------------------------------------------------------------
# Host-sharded streams by global position
# --------------------------------------------------------------------------------------------


def host_batch_size(global_batch: int, process_count: int) -> int:
    if global_batch % process_count:
        raise UserError(
            f"config.batch_size={global_batch} must be divisible by the number of hosts "
            f"({process_count})"
        )
    return global_batch // process_count


def _global_position(i: int, global_batch: int, host_batch: int, process_index: int) -> int:
    """Host element `i` -> its position in the global stream (host p reads slice p of a batch)."""
    k, j = divmod(i, host_batch)
    return k * global_batch + process_index * host_batch + j


class _LocateTrain(grain.transforms.Map):
    """Host element `i` -> (global position g, video index of global element g)."""

    def __init__(self, stream: grain.MapDataset, global_batch: int, host_batch: int,
                 process_index: int):
        self.stream, self.global_batch = stream, global_batch
        self.host_batch, self.process_index = host_batch, process_index

    def map(self, i: int) -> tuple[int, int]:
        g = _global_position(int(i), self.global_batch, self.host_batch, self.process_index)
        return g, int(self.stream[g])


class _SampleTrain(grain.transforms.Map):
    """(g, video) -> element, sampled with a generator seeded by (seed, g)."""

    def __init__(self, sampler: Sampler, seed: int):
        self.sampler, self.seed = sampler, seed

    def map(self, located: tuple[int, int]) -> Batch:
        g, video = located
        element = self.sampler(video, np.random.default_rng([self.seed, g]))
        element["index"] = np.int32(video)
        return element


def train_stream(
    indices: np.ndarray,
    sampler: Sampler,
    *,
    global_batch: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """An endless, reshuffled-every-epoch stream of host batches: element k feeds step k + 1.

    `sampler(video_index, rng) -> element`. Random access: `stream[k]` is the same in every run
    and on any number of hosts (each host holding its slice of the global batch).
    """
    if len(indices) == 0:
        raise UserError("no video to train on")
    host_batch = host_batch_size(global_batch, process_count)
    stream = grain.MapDataset.source(np.asarray(indices)).shuffle(seed=seed).repeat()
    return (
        grain.MapDataset.range(len(stream) // process_count)
        .map(_LocateTrain(stream, global_batch, host_batch, process_index))
        .map(_SampleTrain(sampler, seed))
        .batch(host_batch, drop_remainder=True)
    )


# The `index` of an evaluation element drawn a second (third, ...) time from its video:
# video + draw * DRAW_STRIDE, so that every draw has its own cloze key (folded from `index`)
# while the first draw keeps the video's own index, and with it the elements of one draw.
DRAW_STRIDE = 1 << 24


class _LocateEval(grain.transforms.Map):
    """Host element `i` -> (video, draw, valid): padding past the end repeats the first item."""

    def __init__(self, items: np.ndarray, global_batch: int, host_batch: int,
                 process_index: int):
        self.items, self.global_batch = items, global_batch
        self.host_batch, self.process_index = host_batch, process_index

    def map(self, i: int) -> tuple[int, int, bool]:
        g = _global_position(int(i), self.global_batch, self.host_batch, self.process_index)
        if g < len(self.items):
            return int(self.items[g, 0]), int(self.items[g, 1]), True
        return int(self.items[0, 0]), int(self.items[0, 1]), False


class _SampleEval(grain.transforms.Map):
    """(video, draw, valid) -> element, sampled with a generator seeded by (video, draw)."""

    def __init__(self, sampler: Sampler):
        self.sampler = sampler

    def map(self, located: tuple[int, int, bool]) -> Batch:
        video, draw, valid = located
        rng = np.random.default_rng(video if draw == 0 else (video, draw))
        element = self.sampler(video, rng)
        element["index"] = np.int32(video + draw * DRAW_STRIDE)
        element["valid"] = np.bool_(valid)
        return element


def eval_batches(
    indices: np.ndarray,
    sampler: Sampler,
    *,
    global_batch: int,
    process_index: int = 0,
    process_count: int = 1,
    draws_per_video: int = 1,
) -> grain.MapDataset:
    """The host's batches of a finite evaluation set, padded to whole global batches.

    Element generators are seeded by the video index (and the draw, for the `draws_per_video`
    - 1 further elements of each video): the same elements every time, whatever the batch size
    or number of hosts. Every host gets `ceil(N * draws_per_video / B)` batches.
    """
    if len(indices) == 0:
        return grain.MapDataset.source([])
    if not 1 <= draws_per_video <= np.iinfo(np.int32).max // DRAW_STRIDE:
        raise ValueError(f"draws_per_video={draws_per_video}: must be in [1, 127]")
    indices = np.asarray(indices)
    items = np.stack([np.tile(indices, draws_per_video),
                      np.repeat(np.arange(draws_per_video), len(indices))], axis=1)
    host_batch = host_batch_size(global_batch, process_count)
    num_batches = math.ceil(len(items) / global_batch)
    return (
        grain.MapDataset.range(num_batches * host_batch)
        .map(_LocateEval(items, global_batch, host_batch, process_index))
        .map(_SampleEval(sampler))
        .batch(host_batch)
    )


def make_iterator(
    dataset: grain.MapDataset,
    config: ml_collections.ConfigDict,
    *,
    start: int = 0,
    prefetch_processes: bool = True,
) -> grain.DatasetIterator:
    """An iterator over `dataset[start:]` with threaded (and optionally multi-process) reading.

    JPEG decoding releases the GIL, so threads (`data.num_threads`) scale on one process;
    `data.num_workers` > 0 adds grain worker processes for hosts with many cores.
    """
    if start:
        dataset = dataset[start:]
    threads = max(1, config.data.num_threads)
    iter_ds = dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
    )
    if prefetch_processes and config.data.num_workers > 0:
        iter_ds = iter_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=config.data.num_workers)
        )
    return iter(iter_ds)


# --------------------------------------------------------------------------------------------
# Samplers over a data source (picklable, for grain worker processes)
# --------------------------------------------------------------------------------------------


class TupleSampler:
    """video index -> pretraining tuple."""

    def __init__(self, source: Any, spec: TupleSpec):
        self.source, self.spec = source, spec

    def __call__(self, video: int, rng: np.random.Generator) -> Batch:
        return sample_tuple(self.source[video], rng, self.spec)


class ClipSampler:
    """video index -> one random clip (random crop for training, centre crop for validation)."""

    def __init__(self, source: Any, clip_len: int, crop_size: int, *, random_crop_: bool):
        self.source, self.clip_len, self.crop_size = source, clip_len, crop_size
        self.random_crop = random_crop_

    def __call__(self, video: int, rng: np.random.Generator) -> Batch:
        return sample_clip(self.source[video], rng, self.clip_len, self.crop_size,
                           random_crop_=self.random_crop)


class MultiClipSampler:
    """video index -> its `num_clips` test clips (deterministic; the generator is unused)."""

    def __init__(self, source: Any, clip_len: int, crop_size: int, num_clips: int):
        self.source, self.clip_len = source, clip_len
        self.crop_size, self.num_clips = crop_size, num_clips

    def __call__(self, video: int, rng: np.random.Generator) -> Batch:
        del rng
        return sample_multi_clips(self.source[video], self.clip_len, self.crop_size,
                                 self.num_clips)
