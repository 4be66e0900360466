"""What the UCF101 and HMDB51 frame builders share: configs, parallel encoding, the build report.

Each example is one video: its frames resized (128x171 by default) and stored as JPEG bytes in
`array_record` shards, so a training sample decodes only the frames it needs. No TensorFlow is
needed to write or read: `tfds.data_source(...)` reads the shards with grain-compatible random
access.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import multiprocessing
import os
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from tfds_builders import official
from tfds_builders import summary as summary_lib
from tfds_builders.layouts import DatasetLayout, Located, ManualDirError, locate
from vcp_jax.data import splits as splits_lib

if TYPE_CHECKING:  # decoding (PyAV, OpenCV) is imported by the workers only, see _encode_worker
    from vcp_jax.data import video as video_lib

__all__ = [
    "REPORT_NAME", "DatasetLayout", "Located", "ManualDirError", "VideoFramesBuilder",
    "VideoFramesConfig", "config_name", "make_config", "resolve_video_path",
]

REPORT_NAME = summary_lib.REPORT_NAME
_CONFIG_NAME = re.compile(r"^split(?P<fold>[123])(?:_(?P<h>\d+)x(?P<w>\d+))?(?:_q(?P<q>\d+))?$")
DEFAULT_HEIGHT, DEFAULT_WIDTH, DEFAULT_QUALITY = 128, 171, 90


@dataclasses.dataclass(eq=False)
class VideoFramesConfig(tfds.core.BuilderConfig):
    """One official fold at one frame size and JPEG quality.

    Names are `split{1,2,3}` for the default 128x171 q90 frames and `split1_64x85` or
    `split1_128x171_q75` for other sizes and qualities, so any of them can be named in
    `tfds.data_source('ucf101_frames/split1_64x85', ...)`.
    """

    fold: int = 1
    height: int = DEFAULT_HEIGHT
    width: int = DEFAULT_WIDTH
    jpeg_quality: int = DEFAULT_QUALITY
    resize_method: str = "area"


def config_name(fold: int, height: int, width: int, jpeg_quality: int) -> str:
    """The config name for a fold, frame size and quality (see `VideoFramesConfig`)."""
    name = f"split{fold}"
    if (height, width) != (DEFAULT_HEIGHT, DEFAULT_WIDTH):
        name += f"_{height}x{width}"
    if jpeg_quality != DEFAULT_QUALITY:
        name += f"_q{jpeg_quality}"
    return name


def make_config(name: str) -> VideoFramesConfig:
    """Parses a config name such as `split2` or `split1_64x85_q75`."""
    match = _CONFIG_NAME.match(name)
    if not match:
        raise ValueError(
            f"config must be 'split1', 'split2' or 'split3', optionally followed by '_<H>x<W>' "
            f"and '_q<quality>' (e.g. 'split1_64x85'); got {name!r}"
        )
    height = int(match["h"] or DEFAULT_HEIGHT)
    width = int(match["w"] or DEFAULT_WIDTH)
    quality = int(match["q"] or DEFAULT_QUALITY)
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality} in {name!r}")
    if height < 16 or width < 16:
        raise ValueError(f"frame size must be at least 16x16, got {height}x{width} in {name!r}")
    return VideoFramesConfig(
        name=config_name(int(match["fold"]), height, width, quality),
        description=f"Official fold {match['fold']}, frames {height}x{width}, JPEG q{quality}.",
        fold=int(match["fold"]),
        height=height,
        width=width,
        jpeg_quality=quality,
    )


def _encode_worker(args: tuple[str, str, dict[str, Any]]) -> tuple[str, Any]:
    """Runs in a pool process: (key, EncodedVideo) or (key, error message)."""
    # Imported here, not at the top: registering the builders (`import tfds_builders`, done by
    # every training run) must not load PyAV and OpenCV, which only a build needs.
    from vcp_jax.data import video as video_lib  # noqa: PLC0415

    key, path, kwargs = args
    try:
        return key, video_lib.encode_video(path, **kwargs)
    except video_lib.VideoDecodeError as e:
        return key, str(e)
    except Exception as e:  # noqa: BLE001 - any decoder crash is a bad video, not a dead build
        return key, f"{path}: {type(e).__name__}: {e}"


def _init_worker() -> None:
    from vcp_jax.data import video as video_lib  # noqa: PLC0415 - see _encode_worker

    video_lib.limit_threads()


class VideoFramesBuilder(tfds.core.GeneratorBasedBuilder, abc.ABC, skip_registration=True):
    """Base of `ucf101_frames` and `hmdb51_frames` (not registered itself)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: JPEG frames in array_record shards."}
    BUILDER_CONFIGS = [make_config(f"split{fold}") for fold in splits_lib.FOLDS]
    DEFAULT_CONFIG_NAME = "split1"
    LAYOUT: DatasetLayout

    def __init__(self, *, num_workers: int | None = None, **kwargs: Any):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)
        self.num_workers = num_workers or os.cpu_count() or 1
        self._report: dict[str, Any] = {}
        self._located: Located | None = None

    @classmethod
    def get_builder_config(
        cls, name: str, version: str | tfds.core.Version | None = None
    ) -> tfds.core.BuilderConfig | None:
        # Any `split<N>[_<H>x<W>][_q<Q>]` name is a valid config, not only the three listed.
        config = super().get_builder_config(name, version)
        if config is None and _CONFIG_NAME.match(name):
            config = make_config(name)
        return config

    @property
    def extract_root(self) -> Path:
        """Where archives from the manual dir are extracted (the archives stay untouched)."""
        return Path(self._data_dir_root) / "downloads" / "manual_extracted" / self.name

    # --- TFDS hooks ---------------------------------------------------------------------------

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            "frames": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
            # Names are read from the split files in _split_generators (the synthetic dataset
            # has its own classes), and stored with the dataset.
            "label": tfds.features.ClassLabel(),
            "video_id": tfds.features.Text(),
            "num_frames": tfds.features.Scalar(dtype=np.int32),
            "fps": tfds.features.Scalar(dtype=np.float32),
            "source_height": tfds.features.Scalar(dtype=np.int32),
            "source_width": tfds.features.Scalar(dtype=np.int32),
        }
        features.update(self._extra_features())
        return tfds.core.DatasetInfo(
            builder=self,
            description=self._description(),
            features=tfds.features.FeaturesDict(features),
            homepage=self._homepage(),
            citation=self._citation(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        # `build` locates the data first. Only without it is TFDS's `manual_dir` asked, which
        # refuses an empty folder: legitimate once the archives were deleted after extraction.
        located = self._located or self.locate_data(Path(dl_manager.manual_dir))
        splits_dir = located.splits_dir
        split = splits_lib.read_split(self.LAYOUT.dataset, splits_dir, self.builder_config.fold)
        label = self.info.features["label"]
        if label.num_classes is None:
            label.names = list(split.class_names)
        elif list(label.names) != list(split.class_names):
            raise ValueError(
                f"the split files in {splits_dir} list other classes than this dataset "
                f"was started with; build into another --data_dir"
            )
        config = self.builder_config
        print(f"{self.name}/{config.name}:\n{located.describe()}")
        self._report = {
            "dataset": f"{self.name}/{config.name}",
            "version": str(self.version),
            "frames": {"height": config.height, "width": config.width,
                       "jpeg_quality": config.jpeg_quality, "resize": config.resize_method},
            "manual_dir": str(located.manual_dir),
            "videos_root": str(located.videos_root),
            "videos_from": located.videos_from,
            "splits_dir": str(splits_dir),
            "splits_from": located.splits_from,
            "videos_found": located.videos_found,
            "class_folders": located.class_folders,
            "num_workers": self.num_workers,
            # The synthetic generator's videos in an official layout: not compared with the
            # official release in the summary.
            "synthetic": (located.manual_dir / official.SYNTHETIC_MARKER).is_file(),
            "min_tuple_frames": summary_lib.TUPLE_FRAMES,
            "splits": {},
        }
        return {
            "train": self._generate_examples(located.videos_root, split.train, "train"),
            "test": self._generate_examples(located.videos_root, split.test, "test"),
        }

    def _generate_examples(
        self, videos_root: Path, entries: Sequence[splits_lib.VideoEntry], split_name: str
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        config = self.builder_config
        kwargs = dict(
            height=config.height,
            width=config.width,
            jpeg_quality=config.jpeg_quality,
            resize_method=config.resize_method,
        )
        by_key = {entry.relpath: entry for entry in entries}
        jobs, skipped, resolved = [], [], {}
        for entry in entries:
            path = resolve_video_path(videos_root, entry.relpath)
            if path is None:
                skipped.append({"video": entry.relpath, "reason": "file not found"})
            else:
                jobs.append((entry.relpath, str(path), kwargs))
                resolved[entry.relpath] = str(path)

        start, frames = time.perf_counter(), 0
        written: list[summary_lib.VideoFacts] = []
        bar = tqdm.tqdm(total=len(jobs), desc=f"{self.name} {split_name}", unit="video")
        for key, result in self._map(jobs):
            bar.update()
            if isinstance(result, str):
                # The decoder names the full path; the report names the video as the lists do.
                reason = result.removeprefix(f"{resolved[key]}: ")
                skipped.append({"video": key, "reason": reason})
                bar.write(f"skipped {key}: {reason}")
                continue
            frames += result.num_frames
            entry = by_key[key]
            written.append(summary_lib.VideoFacts(
                key, entry.class_name, result.num_frames, sum(len(f) for f in result.frames)
            ))
            bar.set_postfix(frames_per_s=f"{frames / (time.perf_counter() - start):.0f}")
            yield key, self._example(entry, result)
        bar.close()
        elapsed = time.perf_counter() - start
        facts = summary_lib.split_facts(
            written, skipped, self.info.features["label"].names, listed=len(entries)
        )
        facts["seconds"] = round(elapsed, 2)
        facts["frames_per_second"] = round(frames / elapsed, 1) if elapsed else None
        self._report["splits"][split_name] = facts

    def _map(self, jobs: list[tuple[str, str, dict[str, Any]]]) -> Iterator[tuple[str, Any]]:
        if self.num_workers <= 1 or len(jobs) <= 1:
            _init_worker()
            yield from map(_encode_worker, jobs)
            return
        # 'spawn': the caller may have started threads (JAX, grain) that a fork would copy.
        context = multiprocessing.get_context("spawn")
        with context.Pool(min(self.num_workers, len(jobs)), initializer=_init_worker) as pool:
            yield from pool.imap_unordered(_encode_worker, jobs, chunksize=1)

    def _example(
        self, entry: splits_lib.VideoEntry, encoded: video_lib.EncodedVideo
    ) -> dict[str, Any]:
        return {
            "frames": encoded.frames,
            "label": entry.label,
            "video_id": entry.video_id,
            "num_frames": encoded.num_frames,
            "fps": encoded.fps,
            "source_height": encoded.source_height,
            "source_width": encoded.source_width,
        }

    def download_and_prepare(self, *args: Any, **kwargs: Any) -> None:
        """Builds the dataset, then writes the build report next to it and prints its summary."""
        self._report = {}
        super().download_and_prepare(*args, **kwargs)
        if self._report.get("splits"):
            path = Path(self.data_dir) / REPORT_NAME
            path.write_text(json.dumps(self._report, indent=2) + "\n")
            print(summary_lib.format_summary(self._report, path))

    # TFDS announces "Downloading and preparing dataset Unknown size ..." and "... downloaded and
    # prepared" in bold: nothing is downloaded here, and the summary above says what was built.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass

    # --- data location ------------------------------------------------------------------------

    def locate_data(self, manual_dir: Path) -> Located:
        """The videos and split files in `manual_dir`, found by content (see `layouts.py`).

        Archives are extracted (once, resumably) under `extract_root`. The result is kept for the
        build that follows, so the build command can check the manual dir before TFDS starts.
        """
        manual_dir = Path(manual_dir).expanduser()
        if self._located is None or self._located.manual_dir != manual_dir:
            self._located = locate(
                self.LAYOUT, manual_dir, self.extract_root, self.builder_config.fold
            )
        return self._located

    # --- per-dataset facts ----------------------------------------------------------------------

    @abc.abstractmethod
    def _description(self) -> str: ...

    def _extra_features(self) -> dict[str, tfds.features.FeatureConnector]:
        return {}

    def _homepage(self) -> str:
        return ""

    def _citation(self) -> str:
        path = Path(__file__).parent / self.name / "CITATIONS.bib"
        return path.read_text() if path.is_file() else ""


def resolve_video_path(videos_root: Path, relpath: str) -> Path | None:
    """The file for `Class/name.avi`, matching case-insensitively if the exact name is absent.

    Archive tools on case-insensitive file systems (and UCF101's HandstandPushups/HandStandPushups
    naming) can leave names whose case differs from the split files.
    """
    path = videos_root / relpath
    if path.is_file():
        return path
    folder = path.parent
    if not folder.is_dir():
        folder = _casefold_lookup(videos_root, path.parent.name)
        if folder is None:
            return None
    match = _casefold_lookup(folder, path.name)
    return match if match is not None and match.is_file() else None


def _casefold_lookup(folder: Path, name: str) -> Path | None:
    if not folder.is_dir():
        return None
    wanted = name.casefold()
    for child in folder.iterdir():
        if child.name.casefold() == wanted:
            return child
    return None
