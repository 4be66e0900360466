"""The dataset summary: what a build wrote, per split and per class, and what it skipped.

Printed after every build and stored in `build_report.json` beside the dataset, so a user sees at
once whether the build is the dataset they meant (every class there, no mass of skipped files,
videos long enough for a pretraining tuple, as many videos as the official release: a warning
says when the counts differ). `describe_built` gives the same summary for a dataset
built earlier, from its report, or by reading the dataset when the report lacks the figures.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tfds_builders import official

REPORT_NAME = "build_report.json"
# A VCP pretraining tuple: 3 clips of 16 frames, gaps of 8 (docs/method.md §1): 3*16 + 2*8.
TUPLE_FRAMES = 64
_LISTED_IN_CONSOLE = 8  # skipped or short videos named in the console; the report has all


@dataclasses.dataclass(frozen=True)
class VideoFacts:
    """One written video, as the summary counts it."""

    video: str  # 'Class/name.avi', as in the split files
    class_name: str
    frames: int
    bytes: int  # the JPEG bytes of its frames


def split_facts(
    written: Sequence[VideoFacts],
    skipped: Sequence[dict[str, str]],
    class_names: Sequence[str],
    *,
    listed: int | None = None,
    min_frames: int = TUPLE_FRAMES,
) -> dict[str, Any]:
    """The figures of one split, as stored under `splits/<name>` in the report (JSON-ready)."""
    frames = sorted(v.frames for v in written)
    per_class = dict.fromkeys(class_names, 0)
    for v in written:
        per_class[v.class_name] = per_class.get(v.class_name, 0) + 1
    return {
        "listed": len(written) + len(skipped) if listed is None else listed,
        "written": len(written),
        "skipped": sorted(skipped, key=lambda s: s["video"]),
        "frames": sum(frames),
        "bytes": sum(v.bytes for v in written),
        "frames_per_video": {
            "min": frames[0],
            "median": statistics.median(frames),
            "max": frames[-1],
        }
        if frames
        else None,
        "videos_per_class": per_class,
        "too_short": sorted(
            ({"video": v.video, "frames": v.frames} for v in written if v.frames < min_frames),
            key=lambda s: s["video"],
        ),
    }


def has_figures(report: dict[str, Any]) -> bool:
    """Whether `report` holds the per-class figures (reports of version 1.0.0 builds do not)."""
    splits = report.get("splits") or {}
    return bool(splits) and all("videos_per_class" in facts for facts in splits.values())


def format_summary(report: dict[str, Any], path: Path | None = None, width: int = 0) -> str:
    """The human summary of a build report: one table per split, classes, short and skipped."""
    width = width or min(shutil.get_terminal_size((100, 20)).columns, 120)
    splits: dict[str, dict[str, Any]] = report["splits"]
    written = sum(f["written"] for f in splits.values())
    skipped = [(name, s) for name, f in splits.items() for s in f["skipped"]]
    lines = [f"{report['dataset']}: {written:,} videos written, {len(skipped):,} skipped"
             + (f" (report: {path})" if path else "")]
    if report.get("videos_root"):
        lines.append(f"  from {report['videos_root']}")

    header = ("split", "videos", "skipped", "frames/video min/median/max", "frames", "JPEG bytes")
    rows = [header]
    for name, f in splits.items():
        fpv = f["frames_per_video"]
        rows.append((
            name,
            f"{f['written']:,}",
            f"{len(f['skipped']):,}",
            f"{fpv['min']:,} / {fpv['median']:,g} / {fpv['max']:,}" if fpv else "-",
            f"{f['frames']:,}",
            _bytes(f["bytes"]),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        cells = [row[i].rjust(w) if i else row[i].ljust(w) for i, w in enumerate(widths)]
        lines.append("  " + "  ".join(cells))

    min_frames = report.get("min_tuple_frames", TUPLE_FRAMES)
    short = [(name, s) for name, f in splits.items() for s in f["too_short"]]
    counts = ", ".join(f"{len(f['too_short']):,} {name}" for name, f in splits.items())
    # The paper's tuple (3 clips of 16 frames, 8 apart); shorter clip settings need fewer.
    lines.append(f"  too short for the paper's pretraining tuple (< {min_frames} frames): "
                 + (counts if short else "none"))
    for name, s in short[:_LISTED_IN_CONSOLE]:
        lines.append(f"    {name}: {s['video']} ({s['frames']} frames)")
    if len(short) > _LISTED_IN_CONSOLE:
        lines.append(f"    ... {len(short) - _LISTED_IN_CONSOLE} more in the report")

    lines += _per_class(splits, width)

    if skipped:
        lines.append(f"  skipped ({len(skipped):,}):")
        for name, s in skipped[:_LISTED_IN_CONSOLE]:
            lines.append(f"    {name}: {s['video']}: {s['reason']}")
        if len(skipped) > _LISTED_IN_CONSOLE:
            lines.append(f"    ... {len(skipped) - _LISTED_IN_CONSOLE} more in the report")
    check = official.report_check(report)  # against the official release's counts
    if check is not None:
        lines.append(f"  {check}")
    return "\n".join(lines)


def _per_class(splits: dict[str, dict[str, Any]], width: int) -> list[str]:
    """`videos per class (train/test)` in columns; classes without any video named apart."""
    names = list(next(iter(splits.values()))["videos_per_class"]) if splits else []
    counts = {c: [f["videos_per_class"].get(c, 0) for f in splits.values()] for c in names}
    present = [c for c in names if any(counts[c])]
    empty = [c for c in names if not any(counts[c])]
    cells = [f"{c} {'/'.join(str(n) for n in counts[c])}" for c in present]
    lines = [f"  videos per class ({'/'.join(splits)}), {len(present)} of {len(names)} classes:"]
    if cells:
        cell_width = max(len(c) for c in cells) + 3
        per_row = max(1, (width - 4) // cell_width)
        for i in range(0, len(cells), per_row):
            lines.append("    " + "".join(c.ljust(cell_width) for c in cells[i:i + per_row])
                         .rstrip())
    if empty:
        line, shown = f"    no videos ({len(empty)}): ", 0
        for name in empty:
            if len(line) + len(name) + 12 > width and shown:
                break
            line += ("" if not shown else ", ") + name
            shown += 1
        lines.append(line + (f", ... ({len(empty) - shown} more)" if shown < len(empty) else ""))
    return lines


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    raise AssertionError  # unreachable


# --------------------------------------------------------------------------------------------
# A dataset built earlier
# --------------------------------------------------------------------------------------------


def load_report(data_dir: Path) -> dict[str, Any] | None:
    """The build report of the dataset in `data_dir`, or None when there is none."""
    path = Path(data_dir) / REPORT_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def describe_built(builder: Any, *, scan: bool = True) -> str:
    """The summary of the dataset `builder` (a prepared TFDS builder) points at, no rebuilding.

    From `build_report.json` when it has the figures; otherwise, with `scan`, by reading every
    example once (the skipped videos then come from the old report, if any).
    """
    data_dir = Path(builder.data_dir)
    report = load_report(data_dir)
    if report is not None and has_figures(report):
        return format_summary(report, data_dir / REPORT_NAME)
    if not scan:
        return (f"{builder.name}/{builder.builder_config.name}: no summary in its build report; "
                f"run the build command with --summary to read the dataset for one")
    return format_summary(scan_dataset(builder, report))


def scan_dataset(builder: Any, old_report: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report figures of a built dataset, from its examples (reads the whole dataset once)."""
    import tqdm  # noqa: PLC0415

    names = list(builder.info.features["label"].names)
    old_splits = (old_report or {}).get("splits", {})
    splits = {}
    for split in builder.info.splits:
        source = builder.as_data_source(split=split)
        written = []
        for i in tqdm.trange(len(source), desc=f"reading {builder.name} {split}", unit="video"):
            ex = source[i]
            class_name = names[int(ex["label"])]
            video_id = ex["video_id"]
            video_id = video_id.decode() if isinstance(video_id, bytes) else str(video_id)
            written.append(VideoFacts(
                video=f"{class_name}/{video_id}.avi",
                class_name=class_name,
                frames=int(ex["num_frames"]),
                bytes=sum(len(f) for f in ex["frames"]),
            ))
        skipped = old_splits.get(split, {}).get("skipped", [])
        splits[split] = split_facts(written, skipped, names)
    return {
        "dataset": f"{builder.name}/{builder.builder_config.name}",
        "min_tuple_frames": TUPLE_FRAMES,
        "splits": splits,
    }
