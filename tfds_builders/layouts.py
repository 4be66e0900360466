"""Finds a dataset's videos and split files in the user's manual dir, by content, not by name.

Users arrive with the archives as distributed or unpacked the usual ways, and the folder names
vary: `unrar x UCF101.rar` gives `UCF-101/`, mmaction2 renames it `videos/`, unpacking
`hmdb51_org.rar` and then its 51 per-class archives in place leaves the class folders directly in
the download folder. So nothing here relies on one folder name:

1. The split files are the folder, up to 3 levels below the manual dir, holding `classInd.txt`
   (UCF101) or `<class>_test_split<N>.txt` files (HMDB51); else the official splits archive.
2. The videos are the folder, up to 2 levels below the manual dir, whose sub-folders are named as
   the classes of those split files and hold videos the split files list (so UCF101's `Fencing/`
   is not taken for HMDB51's `fencing/` when both datasets share a download folder); else
   (HMDB51) a folder of per-class `<class>.rar` files; else the official videos archive.
3. An archive is checked before anything is written (does it hold the dataset?), extracted
   resumably under `extract_root` (never modified), then searched like the manual dir. When the
   user deleted an archive after a complete extraction, the extracted copy is used.

Several candidates, or none, raise `ManualDirError` listing what was found and the accepted
layouts: guessing between two copies of a dataset would build the wrong one silently.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import tqdm

from vcp_jax.data import archives as archives_lib
from vcp_jax.data import splits as splits_lib

SPLITS_DEPTH = 3  # split folders: manual_dir/a/b/ucfTrainTestlist at most
VIDEOS_DEPTH = 2  # videos folders: manual_dir/UCF101/UCF-101 at most (class folders one deeper)
ARCHIVES_DEPTH = 1  # the official archives: in manual_dir or one folder down
_SCAN_DEPTH = max(SPLITS_DEPTH, VIDEOS_DEPTH + 1)
_PER_CLASS_MARKER = ".extracted-per-class-archives.done"


class ManualDirError(FileNotFoundError):
    """The manual dir holds none, or several, of the accepted layouts of a dataset's files."""


@dataclasses.dataclass(frozen=True)
class DatasetLayout:
    """What a dataset's downloads look like (a builder's `LAYOUT`)."""

    dataset: str  # 'ucf101' or 'hmdb51', for the split parser
    title: str  # 'UCF101', for messages
    videos_archives: tuple[str, ...]  # e.g. ('UCF101.rar',); any of them, matched ignoring case
    splits_archives: tuple[str, ...]
    splits_hint: str  # what marks the split folder, e.g. 'classInd.txt'
    instructions: str  # the accepted layouts, shown in every error (MANUAL_DOWNLOAD_INSTRUCTIONS)
    per_class_archives: bool = False  # HMDB51: the videos also come as one <class>.rar per class


@dataclasses.dataclass(frozen=True)
class Located:
    """Where a dataset's files are, and how they were found (for the console and the report)."""

    manual_dir: Path
    videos_root: Path  # holds <class>/<video>.avi
    splits_dir: Path
    class_names: tuple[str, ...]
    class_folders: int  # how many classes have a folder holding listed videos in videos_root
    videos_found: int  # how many of the videos the split files list are in videos_root
    videos_listed: int
    videos_from: str  # 'folder', or the archive(s) extracted, e.g. 'UCF101.rar'
    splits_from: str

    def describe(self) -> str:
        """Where the videos and the split files were found, and how many videos are missing."""

        def origin(source: str) -> str:
            return "" if source == "folder" else f"; extracted from {source}"

        lines = [
            f"  videos       {self.videos_root} ({self.videos_found:,} of the "
            f"{self.videos_listed:,} listed videos, {self.class_folders} of "
            f"{len(self.class_names)} classes{origin(self.videos_from)})",
            f"  split files  {self.splits_dir}"
            + (f" ({origin(self.splits_from)[2:]})" if self.splits_from != "folder" else ""),
        ]
        if self.videos_found < self.videos_listed:
            lines.append(
                f"  missing      {self.videos_listed - self.videos_found:,} listed videos are not "
                f"in {self.videos_root} (those of this fold are skipped and named in the report)"
            )
        return "\n".join(lines)


def locate(
    layout: DatasetLayout, manual_dir: Path, extract_root: Path, fold: int = 1
) -> Located:
    """Finds (or extracts) the videos and split files of `layout` in `manual_dir`.

    Args:
        layout: the dataset's layout.
        manual_dir: the user's download folder; only read.
        extract_root: where archives are extracted (writable). When it lies inside `manual_dir`
            (`--data_dir` inside it), it and its parent are not searched, so the builders' own
            extractions are never taken for a folder of the user's.
        fold: the official fold whose lists name the videos to look for.

    Raises:
        ManualDirError: none, or several, of the accepted layouts (the message lists both).
        ArchiveError: an archive is corrupt, or does not hold what its name promises.
        SplitFileError: the split files found are malformed.
    """
    manual_dir, extract_root = Path(manual_dir).expanduser(), Path(extract_root).expanduser()
    if not manual_dir.is_dir():
        raise ManualDirError(
            f"the manual dir {manual_dir} does not exist.\n\n{layout.instructions}"
        )
    tree = _scan(manual_dir, _SCAN_DEPTH, skip=(extract_root, extract_root.parent))
    splits_dir, splits_from = _locate_splits(layout, manual_dir, tree, extract_root)
    split = splits_lib.read_split(layout.dataset, splits_dir, fold)
    listed = _Listed.of(split, splits_dir)
    found, videos_from = _locate_videos(layout, manual_dir, tree, extract_root, listed)
    return Located(
        manual_dir=manual_dir,
        videos_root=found.path,
        splits_dir=splits_dir,
        class_names=split.class_names,
        class_folders=found.classes,
        videos_found=found.videos,
        videos_listed=listed.count,
        videos_from=videos_from,
        splits_from=splits_from,
    )


# --------------------------------------------------------------------------------------------
# Split files
# --------------------------------------------------------------------------------------------


def _locate_splits(
    layout: DatasetLayout, manual_dir: Path, tree: dict[Path, _Folder], extract_root: Path
) -> tuple[Path, str]:
    found = _split_folders(layout, tree)
    if len(found) == 1:
        return found[0], "folder"
    if found:
        raise _several(layout, manual_dir, "folders holding the split files",
                       [(p, f"holds {layout.splits_hint}") for p in found])
    archives = _named_files(tree, layout.splits_archives)
    if len(archives) > 1:
        raise _several(layout, manual_dir, "split archives", [(p, "") for p in archives])
    for archive in archives:
        dest = extract_root / _stem(archive.name)
        if not archives_lib.is_extracted(archive, dest):
            print(f"extracting {archive} into {dest}")
            archives_lib.extract(archive, dest)
        found = _split_folders(layout, _scan(dest, SPLITS_DEPTH))
        if len(found) != 1:
            raise archives_lib.ArchiveError(
                f"{archive} holds {'no' if not found else 'several'} folders of {layout.title} "
                f"split files ({layout.splits_hint}); its top level: "
                f"{archives_lib.describe_top_level(archives_lib.member_names(archive))}"
            )
        return found[0], archive.name
    for name in layout.splits_archives:  # extracted by an earlier build, archive since deleted
        dest = extract_root / _stem(name)
        if archives_lib.is_extracted(manual_dir / name, dest):
            found = _split_folders(layout, _scan(dest, SPLITS_DEPTH))
            if len(found) == 1:
                return found[0], f"{name} (deleted since)"
    raise _none(
        layout, manual_dir, tree,
        f"no {layout.title} split files in {manual_dir}: no folder up to {SPLITS_DEPTH} levels "
        f"below it holds {layout.splits_hint}, and there is no "
        f"{' or '.join(layout.splits_archives)}",
    )


def _split_folders(layout: DatasetLayout, tree: dict[Path, _Folder]) -> list[Path]:
    return [
        folder.path
        for folder in tree.values()
        if folder.depth <= SPLITS_DEPTH and splits_lib.is_split_folder(layout.dataset, folder.files)
    ]


# --------------------------------------------------------------------------------------------
# Videos
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Listed:
    """The videos the split files list: casefolded class -> casefolded file names."""

    names: dict[str, set[str]]
    splits_dir: Path
    example: str  # one listed video, 'Class/name.avi', for messages
    count: int

    @classmethod
    def of(cls, split: splits_lib.Split, splits_dir: Path) -> _Listed:
        names: dict[str, set[str]] = {c.casefold(): set() for c in split.class_names}
        entries = split.train + split.test + split.unused
        for entry in entries:
            folder, _, name = entry.relpath.partition("/")
            names.setdefault(folder.casefold(), set()).add(name.casefold())
        example = entries[0].relpath if entries else f"{split.class_names[0]}/<video>.avi"
        return cls(names, splits_dir, example, len(entries))

    def count_in(self, class_folder: str, files: Iterable[str]) -> int:
        wanted = self.names.get(class_folder.casefold())
        return sum(1 for f in files if f.casefold() in wanted) if wanted else 0

    def is_class_archive(self, name: str) -> bool:
        return name.lower().endswith(".rar") and name[: -len(".rar")].casefold() in self.names


@dataclasses.dataclass(frozen=True)
class _VideosFolder:
    path: Path
    classes: int  # class folders holding listed videos
    videos: int  # listed videos in them

    def note(self, listed: _Listed) -> str:
        return (f"{self.videos:,} of the {listed.count:,} listed videos, {self.classes} of "
                f"{len(listed.names)} classes")


def _locate_videos(
    layout: DatasetLayout,
    manual_dir: Path,
    tree: dict[Path, _Folder],
    extract_root: Path,
    listed: _Listed,
) -> tuple[_VideosFolder, str]:
    found = _video_folders(tree, listed)
    if len(found) == 1:
        return found[0], "folder"
    if found:
        raise _several(layout, manual_dir, f"folders holding {layout.title} class folders",
                       [(f.path, f.note(listed)) for f in found])
    dest = extract_root / _stem(layout.videos_archives[0])

    if layout.per_class_archives:
        per_class = _per_class_archive_folders(tree, listed)
        if len(per_class) > 1:
            raise _several(layout, manual_dir, "folders of per-class archives",
                           [(p, f"{len(rars)} of {len(listed.names)} <class>.rar")
                            for p, rars in per_class])
        if per_class:
            folder, rars = per_class[0]
            _extract_per_class(folder, rars, dest)
            return _extracted_videos(layout, dest, listed, f"{len(rars)} <class>.rar in {folder}")

    archives = _named_files(tree, layout.videos_archives)
    if len(archives) > 1:
        raise _several(layout, manual_dir, "video archives", [(p, "") for p in archives])
    for archive in archives:
        if not archives_lib.is_extracted(archive, dest):
            names = archives_lib.member_names(archive)
            if not _holds_dataset(names, listed, layout.per_class_archives):
                raise archives_lib.ArchiveError(
                    f"{archive} does not hold {layout.title} videos: none of its "
                    f"{len(names):,} files is a video listed in {listed.splits_dir} (such as "
                    f"{listed.example})"
                    + (" or a <class>.rar" if layout.per_class_archives else "")
                    + f"; its top level: {archives_lib.describe_top_level(names)}"
                )
            print(f"extracting {archive} into {dest} (once; an interrupted run resumes)")
            archives_lib.extract(archive, dest, nested=layout.per_class_archives)
        return _extracted_videos(layout, dest, listed, archive.name)

    # Extracted by an earlier build, the archives deleted since.
    deleted = [n for n in layout.videos_archives if archives_lib.is_extracted(manual_dir / n, dest)]
    if layout.per_class_archives and (dest / _PER_CLASS_MARKER).is_file():
        deleted.append("<class>.rar")
    if deleted:
        return _extracted_videos(layout, dest, listed, f"{deleted[0]} (deleted since)")
    raise _none(
        layout, manual_dir, tree,
        f"no {layout.title} videos in {manual_dir}: no folder up to {VIDEOS_DEPTH} levels below "
        f"it holds class folders with the videos listed in {listed.splits_dir} (such as "
        f"{listed.example})"
        + (", nor <class>.rar files" if layout.per_class_archives else "")
        + f", and there is no {' or '.join(layout.videos_archives)}",
    )


def _video_folders(tree: dict[Path, _Folder], listed: _Listed) -> list[_VideosFolder]:
    """Every folder holding class folders with listed videos in them."""
    found = []
    for folder in tree.values():
        if folder.depth > VIDEOS_DEPTH:
            continue
        classes = videos = 0
        for name in folder.dirs:
            sub = tree.get(folder.path / name)
            count = listed.count_in(name, sub.files) if sub is not None else 0
            classes, videos = classes + bool(count), videos + count
        if classes:
            found.append(_VideosFolder(folder.path, classes, videos))
    return found


def _per_class_archive_folders(
    tree: dict[Path, _Folder], listed: _Listed
) -> list[tuple[Path, list[str]]]:
    found = []
    for folder in tree.values():
        if folder.depth <= VIDEOS_DEPTH:
            rars = [f for f in folder.files if listed.is_class_archive(f)]
            if rars:
                found.append((folder.path, rars))
    return found


def _holds_dataset(names: Sequence[str], listed: _Listed, per_class: bool) -> bool:
    """Whether an archive's file names include a listed `<class>/<video>` (or `<class>.rar`)."""
    for name in names:
        parts = [p for p in name.split("/") if p]
        if 2 <= len(parts) <= VIDEOS_DEPTH + 2 and listed.count_in(parts[-2], parts[-1:]):
            return True
        if per_class and len(parts) <= VIDEOS_DEPTH + 1 and listed.is_class_archive(parts[-1]):
            return True
    return False


def _extract_per_class(folder: Path, rars: Sequence[str], dest: Path) -> None:
    """Extracts loose `<class>.rar` files (each holding `<class>/...`) into `dest`, resumably."""
    todo = [folder / r for r in sorted(rars) if not archives_lib.is_extracted(folder / r, dest)]
    if todo:
        print(f"extracting {len(todo)} per-class archives from {folder} into {dest}")
        for rar in tqdm.tqdm(todo, desc="Extracting", unit="archive"):
            archives_lib.extract(rar, dest, progress=False)
    # Lets a later build use the extraction once the user deleted the archives.
    marker = dest / _PER_CLASS_MARKER
    if todo or not marker.is_file():
        marker.write_text("\n".join(sorted(rars)) + "\n")


def _extracted_videos(
    layout: DatasetLayout, dest: Path, listed: _Listed, source: str
) -> tuple[_VideosFolder, str]:
    found = _video_folders(_scan(dest, VIDEOS_DEPTH + 1), listed)
    if len(found) != 1:
        raise archives_lib.ArchiveError(
            f"extracting {source} into {dest} gave {len(found) or 'no'} folders of "
            f"{layout.title} class folders; expected one"
        )
    return found[0], source


# --------------------------------------------------------------------------------------------
# Scanning and messages
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Folder:
    path: Path
    depth: int
    dirs: tuple[str, ...]
    files: tuple[str, ...]


def _scan(root: Path, max_depth: int, skip: Iterable[Path] = ()) -> dict[Path, _Folder]:
    """Every folder down to `max_depth` below `root` (hidden ones left out), listed once.

    Folder symlinks are followed (a user may link a videos folder from another disk); the depth
    bound keeps a cycle finite.
    """
    skipped = {_resolved(p) for p in skip}
    tree: dict[Path, _Folder] = {}
    queue = collections.deque([(root, 0)])
    while queue:
        path, depth = queue.popleft()
        dirs, files = [], []
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                (dirs if entry.is_dir() else files).append(entry.name)
            except OSError:
                continue
        tree[path] = _Folder(path, depth, tuple(dirs), tuple(files))
        if depth < max_depth:
            queue.extend(
                (path / d, depth + 1) for d in dirs if _resolved(path / d) not in skipped
            )
    return tree


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except OSError:
        return path


def find_archives(manual_dir: Path, names: Iterable[str]) -> list[Path]:
    """The files called `names` (ignoring case) in `manual_dir` or one folder down, as a build
    looks for the official archives."""
    return _named_files(_scan(Path(manual_dir).expanduser(), ARCHIVES_DEPTH), names)


def _named_files(tree: dict[Path, _Folder], names: Iterable[str]) -> list[Path]:
    wanted = {n.casefold() for n in names}
    return [
        folder.path / f
        for folder in tree.values()
        if folder.depth <= ARCHIVES_DEPTH
        for f in folder.files
        if f.casefold() in wanted
    ]


def _stem(archive_name: str) -> str:
    return archive_name.rsplit(".", 1)[0]


def _listing(manual_dir: Path, tree: dict[Path, _Folder], limit: int = 20) -> str:
    top = tree.get(manual_dir)
    if top is None or not (top.dirs or top.files):
        return f"{manual_dir} is empty."
    entries = [f"{d}/" for d in top.dirs] + list(top.files)
    more = f", ... ({len(entries) - limit} more)" if len(entries) > limit else ""
    return f"{manual_dir} holds: " + ", ".join(entries[:limit]) + more


def _none(
    layout: DatasetLayout, manual_dir: Path, tree: dict[Path, _Folder], what: str
) -> ManualDirError:
    return ManualDirError(f"{what}.\n{_listing(manual_dir, tree)}\n\n{layout.instructions}")


def _several(
    layout: DatasetLayout, manual_dir: Path, what: str, found: Sequence[tuple[Path, str]]
) -> ManualDirError:
    lines = "\n".join(f"  {path}" + (f"  ({note})" if note else "") for path, note in found)
    return ManualDirError(
        f"found {len(found)} {what} in {manual_dir}, expected one; remove or move the others, "
        f"or point --manual_dir at the one to use:\n{lines}\n\n{layout.instructions}"
    )
