"""Parsers for the official UCF101 and HMDB51 train/test split files.

The files are read exactly as distributed: UCF101's lists have CRLF line endings, HMDB51's have a
trailing space on every line. A missing or malformed file raises `SplitFileError` naming the file
and the line, so a build never starts on a wrong split.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

FOLDS = (1, 2, 3)
UCF101_SPLITS_FOLDER = "ucfTrainTestlist"
HMDB51_SPLITS_FOLDER = "testTrainMulti_7030_splits"

_UCF_GROUP = re.compile(r"_g(\d+)_c\d+$")
_HMDB_SPLIT_FILE = re.compile(r"^(?P<cls>.+)_test_split(?P<fold>[123])\.txt$")


class SplitFileError(ValueError):
    """A split file is missing or does not have the official format."""


@dataclasses.dataclass(frozen=True)
class VideoEntry:
    """One video of a split: where it is (relative to the videos root) and what it is."""

    relpath: str  # e.g. 'ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi'
    label: int  # 0-based, in the official class order
    class_name: str
    video_id: str  # the file name without extension
    group: str = ""  # UCF101 only: 'g08'


@dataclasses.dataclass(frozen=True)
class Split:
    """The official train and test lists of one fold."""

    class_names: tuple[str, ...]
    train: tuple[VideoEntry, ...]
    test: tuple[VideoEntry, ...]
    unused: tuple[VideoEntry, ...] = ()


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yields (1-based line number, stripped text) for non-blank lines; tolerates CRLF/spaces."""
    if not path.is_file():
        raise SplitFileError(f"split file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SplitFileError(f"{path}: not valid UTF-8 text ({e})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if line:
            yield number, line


def _check_fold(fold: int) -> None:
    if fold not in FOLDS:
        raise ValueError(f"fold must be one of {FOLDS}, got {fold!r}")


# --------------------------------------------------------------------------------------------
# UCF101
# --------------------------------------------------------------------------------------------


def read_ucf101_classes(splits_dir: Path) -> tuple[str, ...]:
    """Class names from `classInd.txt` (`1 ApplyEyeMakeup` ...), in the official 1-based order."""
    path = Path(splits_dir) / "classInd.txt"
    names = []
    for number, line in _lines(path):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise SplitFileError(f"{path}:{number}: expected '<index> <ClassName>', got {line!r}")
        if int(parts[0]) != len(names) + 1:
            raise SplitFileError(
                f"{path}:{number}: class index {parts[0]} out of order (expected {len(names) + 1})"
            )
        names.append(parts[1])
    if not names:
        raise SplitFileError(f"{path}: no classes listed")
    return tuple(names)


def _ucf101_entry(
    path: Path, number: int, relpath: str, class_index: dict[str, int]
) -> VideoEntry:
    parts = relpath.replace("\\", "/").split("/")
    if len(parts) != 2 or not parts[1].lower().endswith(".avi"):
        raise SplitFileError(
            f"{path}:{number}: expected 'Class/v_Class_gXX_cYY.avi', got {relpath!r}"
        )
    class_name, filename = parts
    if class_name not in class_index:
        raise SplitFileError(f"{path}:{number}: class {class_name!r} is not in classInd.txt")
    video_id = filename[: -len(".avi")]
    match = _UCF_GROUP.search(video_id)
    return VideoEntry(
        relpath=f"{class_name}/{filename}",
        label=class_index[class_name],
        class_name=class_name,
        video_id=video_id,
        group=f"g{int(match.group(1)):02d}" if match else "",
    )


def read_ucf101_split(splits_dir: Path, fold: int) -> Split:
    """Parses `trainlist0N.txt` / `testlist0N.txt` of one fold (N in 1..3).

    Labels come from the class folder through `classInd.txt`; the 1-based label written in the
    train list must agree with it (a disagreement is a malformed file). The folder, not the file
    name, names the class: `HandstandPushups/v_HandStandPushups_g01_c01.avi` is class 37.
    """
    _check_fold(fold)
    splits_dir = Path(splits_dir)
    classes = read_ucf101_classes(splits_dir)
    class_index = {name: i for i, name in enumerate(classes)}

    train = []
    path = splits_dir / f"trainlist{fold:02d}.txt"
    for number, line in _lines(path):
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise SplitFileError(
                f"{path}:{number}: expected 'Class/file.avi <label>', got {line!r}"
            )
        entry = _ucf101_entry(path, number, parts[0], class_index)
        if int(parts[1]) != entry.label + 1:
            raise SplitFileError(
                f"{path}:{number}: label {parts[1]} disagrees with class {entry.class_name!r} "
                f"(index {entry.label + 1} in classInd.txt)"
            )
        train.append(entry)

    test = []
    path = splits_dir / f"testlist{fold:02d}.txt"
    for number, line in _lines(path):
        parts = line.split()
        if len(parts) != 1:
            raise SplitFileError(f"{path}:{number}: expected 'Class/file.avi', got {line!r}")
        test.append(_ucf101_entry(path, number, parts[0], class_index))

    _check_disjoint(splits_dir, train, test)
    return Split(class_names=classes, train=tuple(train), test=tuple(test))


# --------------------------------------------------------------------------------------------
# HMDB51
# --------------------------------------------------------------------------------------------


def read_hmdb51_classes(splits_dir: Path) -> tuple[str, ...]:
    """The class names, sorted: the official order (as in every HMDB51 label map)."""
    splits_dir = Path(splits_dir)
    if not splits_dir.is_dir():
        raise SplitFileError(f"split folder not found: {splits_dir}")
    names = set()
    for path in splits_dir.iterdir():
        match = _HMDB_SPLIT_FILE.match(path.name)
        if match:
            names.add(match.group("cls"))
    if not names:
        raise SplitFileError(f"{splits_dir}: no '<class>_test_split<N>.txt' files")
    return tuple(sorted(names))


def read_hmdb51_split(splits_dir: Path, fold: int) -> Split:
    """Parses every `<class>_test_split<N>.txt`: `name.avi 1 ` train, `2` test, `0` unused."""
    _check_fold(fold)
    splits_dir = Path(splits_dir)
    classes = read_hmdb51_classes(splits_dir)
    buckets: dict[str, list[VideoEntry]] = {"0": [], "1": [], "2": []}
    for label, class_name in enumerate(classes):
        path = splits_dir / f"{class_name}_test_split{fold}.txt"
        for number, line in _lines(path):
            # Names may contain spaces in principle; the flag is always the last token.
            name, _, flag = line.rpartition(" ")
            name = name.strip()
            if flag not in buckets or not name.lower().endswith(".avi"):
                raise SplitFileError(
                    f"{path}:{number}: expected '<name>.avi <0|1|2>', got {line!r}"
                )
            buckets[flag].append(
                VideoEntry(
                    relpath=f"{class_name}/{name}",
                    label=label,
                    class_name=class_name,
                    video_id=name[: -len(".avi")],
                )
            )
    _check_disjoint(splits_dir, buckets["1"], buckets["2"])
    return Split(
        class_names=classes,
        train=tuple(buckets["1"]),
        test=tuple(buckets["2"]),
        unused=tuple(buckets["0"]),
    )


def _check_disjoint(where: Path, train: list[VideoEntry], test: list[VideoEntry]) -> None:
    for name, entries in (("train", train), ("test", test)):
        seen = set()
        for entry in entries:
            if entry.relpath in seen:
                raise SplitFileError(f"{where}: {entry.relpath!r} is listed twice in {name}")
            seen.add(entry.relpath)
    both = {e.relpath for e in train} & {e.relpath for e in test}
    if both:
        raise SplitFileError(
            f"{where}: {len(both)} videos in both train and test, e.g. {min(both)!r}"
        )


def is_split_folder(dataset: str, file_names: Iterable[str]) -> bool:
    """Whether a folder holding `file_names` holds the split files of `dataset`.

    The builders find the split files by content, not by folder name: the official folders
    (`ucfTrainTestlist/`, `testTrainMulti_7030_splits/`) are often renamed (mmaction2 moves the
    files into `annotations/`) or unpacked straight into the download folder.
    """
    names = set(file_names)
    if dataset == "ucf101":
        return "classInd.txt" in names
    if dataset == "hmdb51":
        return any(_HMDB_SPLIT_FILE.match(name) for name in names)
    raise ValueError(f"dataset must be one of {sorted(_READERS)}, got {dataset!r}")


def read_classes(dataset: str, splits_dir: Path) -> tuple[str, ...]:
    """The official class names of `dataset` ('ucf101' or 'hmdb51'), read from its split files."""
    readers = {"ucf101": read_ucf101_classes, "hmdb51": read_hmdb51_classes}
    if dataset not in readers:
        raise ValueError(f"dataset must be one of {sorted(readers)}, got {dataset!r}")
    return readers[dataset](splits_dir)


def read_split(dataset: str, splits_dir: Path, fold: int) -> Split:
    """`read_ucf101_split` or `read_hmdb51_split` by dataset name ('ucf101' or 'hmdb51')."""
    if dataset not in _READERS:
        raise ValueError(f"dataset must be one of {sorted(_READERS)}, got {dataset!r}")
    return _READERS[dataset](splits_dir, fold)


_READERS = {"ucf101": read_ucf101_split, "hmdb51": read_hmdb51_split}
