"""Opening the built datasets (`ucf101_frames`, `hmdb51_frames`): sources, per-video facts, splits.

A dataset is named by `config.data` (`name`, `builder_config` such as `split1` or
`split1_48x64`, `data_dir`). Reading never builds anything: a dataset that is not built is a
`UserError` with the command that builds it. The synthetic demo dataset is the exception the
config asks for explicitly (`data.synthetic`): `prepare()` generates its videos and builds it
with the real builder the first time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

import tfds_builders  # noqa: F401 - registers ucf101_frames / hmdb51_frames
from vcp_jax import config_utils
from vcp_jax.config_utils import UserError

_INDEX_FILE = "video_index_{split}.json"
DATASETS = ("ucf101_frames", "hmdb51_frames")


class DatasetNotBuiltError(UserError):
    """The dataset a config names is not in its `data_dir`; the message says how to build it."""


def data_dir(data: ml_collections.ConfigDict) -> Path:
    return Path(data.data_dir).expanduser()


def builder_config(data: ml_collections.ConfigDict) -> str:
    """The TFDS builder config, `data.builder_config` (the official fold and the frame size).

    A `data` section that still sets the deprecated `data.config` (a config file not yet updated,
    used without `main.run_task`, which renames the key) gets that one, with a message.
    """
    if "config" in data:
        config_utils.warn_deprecated("data.config", "data.builder_config", "set in the config")
        return str(data.config)
    return str(data.builder_config)


def fold_of(data: ml_collections.ConfigDict) -> int:
    """The official fold of the builder config: `split2_64x85` -> 2."""
    name = builder_config(data)
    if not name.startswith("split") or not name[5:6].isdigit():
        raise UserError(
            f"config.data.builder_config={name!r} names no fold (expected 'split1', ...)")
    return int(name[5])


def with_fold(data: ml_collections.ConfigDict, fold: int) -> str:
    """`data.builder_config` with its fold replaced: ('split1_48x64', 2) -> 'split2_48x64'."""
    name = builder_config(data)
    return f"split{fold}{name[6:]}"


def builder(data: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """The TFDS builder of `data.name/data.builder_config` (reads metadata, builds nothing)."""
    if data.name not in DATASETS:
        raise UserError(f"config.data.name={data.name!r} is not allowed; choose one of {DATASETS}")
    return tfds.builder(f"{data.name}/{builder_config(data)}", data_dir=str(data_dir(data)))


def data_source(data: ml_collections.ConfigDict, split: str) -> Any:
    """The random-access source of one split; a `DatasetNotBuiltError` if it is not built."""
    b = builder(data)
    if not b.is_prepared():
        raise DatasetNotBuiltError(
            f"dataset {data.name}/{builder_config(data)} is not built in {data_dir(data)}. "
            f"Build it with:\n"
            f"  python -m tfds_builders.build {data.name} --manual_dir=<downloaded archives or "
            f"videos> --data_dir={data_dir(data)} --config={builder_config(data)}"
        )
    return b.as_data_source(split=split)


@dataclasses.dataclass(frozen=True)
class VideoIndex:
    """Per-video facts of one split, read once and cached beside the dataset."""

    num_frames: np.ndarray  # (N,) int64, decoded frame counts
    labels: np.ndarray  # (N,) int64
    video_ids: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.num_frames)


def video_index(source: Any, split: str) -> VideoIndex:
    """Frame counts, labels and ids of every example of `source` (one pass, then cached)."""
    cache = None
    info_dir = getattr(getattr(source, "dataset_info", None), "data_dir", None)
    if info_dir:
        cache = Path(info_dir) / _INDEX_FILE.format(split=split)
        if cache.is_file():
            raw = json.loads(cache.read_text())
            if len(raw["num_frames"]) == len(source):
                return VideoIndex(np.asarray(raw["num_frames"], np.int64),
                                  np.asarray(raw["labels"], np.int64), tuple(raw["video_ids"]))
    logging.info("indexing %d videos of split %s (once; cached in %s)", len(source), split, cache)
    num_frames, labels, ids = [], [], []
    for i in range(len(source)):
        example = source[i]
        num_frames.append(int(example["num_frames"]))
        labels.append(int(example["label"]))
        video_id = example["video_id"]
        ids.append(video_id.decode() if isinstance(video_id, bytes) else str(video_id))
    index = VideoIndex(np.asarray(num_frames, np.int64), np.asarray(labels, np.int64), tuple(ids))
    if cache is not None:
        try:
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps(
                {"num_frames": num_frames, "labels": labels, "video_ids": ids}))
            tmp.replace(cache)
        except OSError:  # a read-only dataset folder just means no cache
            pass
    return index


def class_names(source: Any) -> tuple[str, ...]:
    return tuple(source.dataset_info.features["label"].names)


def holdout_split(
    num_videos: int, num_holdout: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices): a fixed random subset of the train split held out.

    Pretraining holds 800 UCF101 train videos out for validation, fine-tuning 800 (UCF101) or
    400 (HMDB51). The subset depends only on `seed` and the number of videos, so every run and
    every host agrees on it.
    """
    if not 0 <= num_holdout < num_videos:
        raise UserError(
            f"config.data.num_val_videos must be in [0, {num_videos}) for this split, "
            f"got {num_holdout}"
        )
    order = np.random.default_rng(seed).permutation(num_videos)
    return np.sort(order[num_holdout:]), np.sort(order[:num_holdout])


def ids_hash(video_ids: Sequence[str]) -> str:
    """A short hash of a list of video ids (order-independent): what a run saw, in 16 hex digits."""
    digest = hashlib.sha256("\n".join(sorted(video_ids)).encode()).hexdigest()
    return digest[:16]


def describe(data: ml_collections.ConfigDict, split: str, index: VideoIndex,
             indices: np.ndarray) -> dict[str, Any]:
    """Provenance of the videos a stage used: dataset, fold, split, count and ids hash."""
    return {
        "dataset": f"{data.name}/{builder_config(data)}",
        "data_dir": str(data_dir(data)),
        "split": split,
        "num_videos": int(len(indices)),
        "video_ids_sha256_16": ids_hash([index.video_ids[i] for i in indices]),
    }


# --------------------------------------------------------------------------------------------
# The synthetic dataset of the demo
# --------------------------------------------------------------------------------------------


# Beside a synthetic build's data (in its TFDS version folder): the generator options it was built
# from, so a build of other options is detected and rebuilt rather than silently reused.
SYNTHETIC_RECORD = "synthetic_options.json"
# Keys of `data.synthetic` that are not generator arguments, and generator arguments that do not
# change the content (how many processes render it): neither makes a build stale.
_NOT_GENERATE_ARGS = ("manual_dir", "build_workers")
_NOT_CONTENT = ("workers",)


def synthetic_options(data: ml_collections.ConfigDict) -> dict[str, Any]:
    """What a synthetic build is made from: every content argument of `synthetic.generate`, and
    the generator's format version (bumped when the rendering changes), as plain JSON data."""
    from vcp_jax.data import synthetic  # noqa: PLC0415

    options = {k: v for k, v in data.synthetic.items()
               if k not in _NOT_GENERATE_ARGS + _NOT_CONTENT}
    return json.loads(json.dumps({"format_version": synthetic.FORMAT_VERSION, **options},
                                 sort_keys=True))


def describe_changes(old: dict[str, Any], new: dict[str, Any]) -> str:
    """`videos_per_class 12 -> 60, seed 0 -> 1`: the keys whose values differ."""
    missing = object()
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            changes.append(f"{key} {'unset' if a is missing else a} -> "
                           f"{'unset' if b is missing else b}")
    return ", ".join(changes) or "none"


def _built_from(built: tfds.core.DatasetBuilder, manual_dir: Path) -> bool:
    """Whether a build's report says it was built from the videos in `manual_dir`."""
    from tfds_builders import summary  # noqa: PLC0415

    report = Path(built.data_dir) / summary.REPORT_NAME
    try:
        source = json.loads(report.read_text()).get("manual_dir")
    except (OSError, ValueError, AttributeError):
        return False
    return source is not None and Path(source).expanduser().resolve() == manual_dir.resolve()


def prepare(data: ml_collections.ConfigDict) -> None:
    """Generates and builds the synthetic dataset when the config asks for one that is missing.

    A build records the generator options it was made from (`SYNTHETIC_RECORD`); when the
    config's differ, the stale build and, if they were made with other options, the stale
    generated videos are deleted and made again. Both are the demo's own cache: only a build
    that records its options (or whose build report names these generated videos) and only
    videos under the generator's marker are ever deleted.

    Real datasets are never downloaded (no network at run time): a missing one is an error, raised
    when it is opened, that says how to build it.
    """
    synthetic_config = data.get("synthetic")
    if not synthetic_config:
        return
    from tfds_builders import build as build_lib  # noqa: PLC0415 - only to build
    from vcp_jax.data import synthetic  # noqa: PLC0415

    manual_dir = Path(synthetic_config.manual_dir).expanduser()
    wanted = synthetic_options(data)
    built = builder(data)
    record = Path(built.data_dir) / SYNTHETIC_RECORD
    name = f"{data.name}/{builder_config(data)}"
    reason = None  # why an existing build is replaced; None: no build to replace
    recorded = None
    if built.is_prepared():
        try:
            recorded = json.loads(record.read_text())["generator_options"]
        except (OSError, ValueError, KeyError, TypeError):
            recorded = None
        if recorded == wanted:
            return
        if recorded is None and not _built_from(built, manual_dir):
            raise UserError(
                f"{name} in {data_dir(data)} records no synthetic dataset parameters "
                f"({record} is missing) and was not built from {manual_dir}: refusing to replace "
                f"it. Delete it, or point config.data.data_dir elsewhere.")
        if recorded is not None:
            reason = describe_changes(recorded, wanted)
    # Every other key of `data.synthetic` is an argument of `synthetic.generate`.
    options = {k: v for k, v in synthetic_config.items() if k not in _NOT_GENERATE_ARGS}
    tfds.disable_progress_bar()  # the builder shows its own bar per split; TFDS's add noise
    if reason is not None:
        print(f"synthetic dataset parameters changed ({reason}): regenerating {manual_dir} "
              f"if needed and rebuilding {name}")
    elif recorded is None and not built.is_prepared():
        print(f"generating synthetic videos in {manual_dir}, building {name}")
    regenerated = False
    try:
        try:
            synthetic.generate(manual_dir, **options)  # skips the work when it is already there
        except synthetic.ParamsMismatchError as e:
            # The videos are the generator's (its marker says so) but of other parameters: this
            # build and any other made from them are stale (each is rebuilt when prepared).
            if reason is None:
                print(f"synthetic dataset parameters changed "
                      f"({describe_changes(e.old, e.new)}): regenerating {manual_dir} and "
                      f"building {name}")
            synthetic.remove(manual_dir)
            synthetic.generate(manual_dir, **options)
            regenerated = True
    except ValueError as e:  # e.g. the folder holds videos the generator did not write
        raise UserError(f"config.data.synthetic: {e}") from None
    if built.is_prepared():
        if recorded is None and not regenerated:
            # Built from these very videos before builds recorded their options: adopt it.
            _write_record(record, wanted, manual_dir)
            return
        shutil.rmtree(built.data_dir)
    built = build_lib.build(data.name, manual_dir=manual_dir, data_dir=data_dir(data),
                            config=builder_config(data),
                            num_workers=synthetic_config.get("build_workers"))
    _write_record(Path(built.data_dir) / SYNTHETIC_RECORD, wanted, manual_dir)


def _write_record(path: Path, options: dict[str, Any], manual_dir: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"generator_options": options, "manual_dir": str(manual_dir)},
                              indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
