"""The official releases of UCF101 and HMDB51: their archives and how many videos they hold.

A copy of a dataset from any mirror can be checked against these figures:
`python -m tfds_builders.build <name> --manual_dir=DIR --verify` hashes the archives found in
DIR and counts the videos and split-file entries it holds; every build summary (and `--summary`)
compares the built dataset with the release and warns when they differ.

The sha256 sums are the ones published with other loaders of the same files: torchvision's
dataset resources (pytorch/vision, `torchvision/prototype/datasets/_builtin/ucf101.py` and
`hmdb51.py`) and tensorflow-datasets' `url_checksums/ucf101.txt`, which agree on
`UCF101TrainTestSplits-RecognitionTask.zip`; tensorflow-datasets' also publishes its own copy of
the UCF101 videos, `UCF101_videos.zip`. A size is given where one of them publishes it.
The counts are those of the official split files (13,320 UCF101 videos in 101 classes; 6,766
HMDB51 videos in 51 classes, each fold 70 train + 30 test videos per class, the rest unused).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class Archive:
    """One archive of the official release."""

    name: str  # as downloaded
    sha256: str | None  # None: no published sum
    size: int | None  # bytes; None: no published size


@dataclasses.dataclass(frozen=True)
class Release:
    """What the official release of one dataset holds."""

    builder: str  # 'ucf101_frames'
    title: str
    videos: int  # distinct videos in the split files (and in the videos archive)
    classes: int
    folds: Mapping[int, tuple[int, int]]  # fold -> (train, test) videos listed
    archives: tuple[Archive, ...]
    mirrors: tuple[Archive, ...] = ()  # other published archives of the same files

    def unused(self, fold: int) -> int:
        """Videos that the fold's split files mark unused (HMDB51 only)."""
        train, test = self.folds[fold]
        return self.videos - train - test


UCF101 = Release(
    builder="ucf101_frames",
    title="UCF101",
    videos=13_320,
    classes=101,
    folds={1: (9_537, 3_783), 2: (9_586, 3_734), 3: (9_624, 3_696)},
    archives=(
        # about 6.5 GB: UCF-101/<Class>/v_<Class>_gXX_cYY.avi
        Archive("UCF101.rar",
                "ca8dfadb4c891cb11316f94d52b6b0ac2a11994e67a0cae227180cd160bd8e55", None),
        # ucfTrainTestlist/: classInd.txt, trainlist0{1,2,3}.txt, testlist0{1,2,3}.txt
        Archive("UCF101TrainTestSplits-RecognitionTask.zip",
                "5c0d1a53b8ed364a2ac830a73f405e51bece7d98ce1254fd19ed4a36b224bd27", 113_943),
    ),
    mirrors=(
        # tensorflow-datasets' copy of the videos (its `ucf101` dataset downloads it from
        # https://storage.googleapis.com/thumos14_files/UCF101_videos.zip).
        # UCF101/<Class>/v_<Class>_gXX_cYY.avi
        Archive("UCF101_videos.zip",
                "dabf56f573cd19c79e096563529fec8126a2a34e18e10c72eb621dd687532b0d", 6_960_400_115),
    ),
)

HMDB51 = Release(
    builder="hmdb51_frames",
    title="HMDB51",
    videos=6_766,
    classes=51,
    folds={1: (3_570, 1_530), 2: (3_570, 1_530), 3: (3_570, 1_530)},
    archives=(
        # about 2 GB: 51 <class>.rar, each holding <class>/<video>.avi
        Archive("hmdb51_org.rar",
                "9e714a0d8b76104d76e932764a7ca636f929fff66279cda3f2e326fa912a328e", None),
        # testTrainMulti_7030_splits/<class>_test_split{1,2,3}.txt, 153 files
        Archive("test_train_splits.rar",
                "229c94f845720d01eb3946d39f39292ea962d50a18136484aa47c1eba251d2b7", None),
    ),
)

RELEASES = {r.builder: r for r in (UCF101, HMDB51)}
# The synthetic generator (vcp_jax.data.synthetic) marks its output folder with this file; its
# datasets use the official layouts but are not the release.
SYNTHETIC_MARKER = "synthetic.json"
_FOLD = re.compile(r"/split(\d)")


def release_of(dataset: str) -> Release | None:
    """The release of a dataset named as `ucf101_frames/split1_48x64` (None for others)."""
    return RELEASES.get(dataset.split("/")[0])


def fold_of(dataset: str) -> int | None:
    match = _FOLD.search(dataset)
    return int(match.group(1)) if match else None


def compare_counts(release: Release, fold: int, train: int, test: int, classes: int,
                   ) -> tuple[bool, str]:
    """(as the release?, one line) for the videos of one fold and the classes holding them."""
    want_train, want_test = release.folds[fold]
    unused = release.unused(fold)
    unused_note = f"; {unused:,} of its {release.videos:,} videos unused in this fold" if unused \
        else ""
    got = (f"{train + test:,} videos in {classes} classes (fold {fold}: {train:,} train + "
           f"{test:,} test)")
    if (train, test, classes) == (want_train, want_test, release.classes):
        return True, f"{got}, as the official {release.title} release{unused_note}"
    missing = want_train + want_test - train - test
    return False, (
        f"warning: {got}; the official {release.title} release has {want_train + want_test:,} "
        f"in {release.classes} (fold {fold}: {want_train:,} train + {want_test:,} test"
        f"{unused_note})"
        + (f": {missing:,} missing or skipped" if missing > 0 else "")
        + ". Is the copy complete? `--verify` checks the archives.")


def report_check(report: Mapping[str, Any]) -> str | None:
    """The comparison line of a build report with its official release (None: not one of them,
    or a synthetic dataset in the official layout)."""
    dataset = str(report.get("dataset", ""))
    release, fold = release_of(dataset), fold_of(dataset)
    if release is None or fold not in release.folds or report.get("synthetic"):
        return None
    manual_dir = report.get("manual_dir")
    if manual_dir and (Path(manual_dir) / SYNTHETIC_MARKER).is_file():
        return None
    splits = report.get("splits") or {}
    if not {"train", "test"} <= set(splits):
        return None
    present = set()
    for facts in splits.values():
        present |= {c for c, n in (facts.get("videos_per_class") or {}).items() if n}
    return compare_counts(release, fold, splits["train"]["written"], splits["test"]["written"],
                          len(present))[1]


def sha256(path: Path, on_bytes: Callable[[int], object] | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    return digest.hexdigest()


def check_archive(archive: Archive, path: Path,
                  on_bytes: Callable[[int], object] | None = None) -> tuple[bool, str]:
    """(as published?, one line) for a downloaded archive: its size and sha256."""
    size = path.stat().st_size
    if archive.size is not None and size != archive.size:
        return False, (f"warning: {path}: {size:,} bytes; the official {archive.name} has "
                       f"{archive.size:,}")
    if archive.sha256 is None:
        return True, f"{path}: {size:,} bytes (no published sha256 to compare)"
    digest = sha256(path, on_bytes)
    if digest != archive.sha256:
        return False, (f"warning: {path}: sha256 {digest}; the official {archive.name} has "
                       f"{archive.sha256}")
    return True, f"{path}: {size:,} bytes, sha256 as the official {archive.name}"
