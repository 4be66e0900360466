"""Dataset-build throughput per core: decode .avi + resize to 128x171 + JPEG encode (q90).

Runs `vcp_jax.data.video.encode_video` (exactly what the builder's worker processes run) in this
one process over the real sample clips of ../shared/data/samples (UCF101 and HMDB51 .avi), for the
'area' and 'bilinear' resize methods, plus two partial stages (decode only; decode + resize) that
show where the time goes. Each measurement is repeated (default 3 times, interleaved) and the best
and median are reported, as frames per wall second and per CPU second of this process (the latter
is the per-core rate even when other jobs share the machine). Also reports the stored bytes per
frame at a few JPEG qualities and extrapolates the UCF101 build (about 2.48 M frames).

    PYTHONPATH=. python -m benchmarks.build_throughput [--repeats 3] [--samples_dir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import simplejpeg

from benchmarks import _common
from vcp_jax.data import video

UCF101_FRAMES = 2.48e6  # docs/method.md §7: frames in UCF101 (13,320 videos)
SPEC_ANCHORS = {"area": 1517.0, "bilinear": 3903.0}  # docs/method.md §7, frames/s/core
SPEC_BYTES = {75: 4.2e3, 90: 6.5e3, 95: 8.9e3}  # docs/method.md §7, bytes/frame at 128x171 4:2:0


def find_clips(samples_dir: Path) -> dict[str, list[Path]]:
    """The sample .avi clips of UCF101 and HMDB51, by dataset (empty when the folder is absent)."""
    return {
        name: sorted((samples_dir / name).glob("*/*.avi")) for name in ("ucf101", "hmdb51")
    }


def _decode_only(paths: Sequence[Path]) -> int:
    n = 0
    for path in paths:
        for _ in video.iter_frames(path):
            n += 1
    return n


def _decode_resize(paths: Sequence[Path], method: str, height: int, width: int) -> int:
    interpolation = video.RESIZE_METHODS[method]
    n = 0
    for path in paths:
        for rgb in video.iter_frames(path):
            cv2.resize(rgb, (width, height), interpolation=interpolation)
            n += 1
    return n


def _encode(paths: Sequence[Path], method: str, height: int, width: int, quality: int) -> int:
    n = 0
    for path in paths:
        n += video.encode_video(path, height=height, width=width, jpeg_quality=quality,
                                resize_method=method).num_frames
    return n


def stored_bytes(
    clips: dict[str, list[Path]], height: int, width: int, qualities: Sequence[int]
) -> dict[str, dict[int, float]]:
    """Mean JPEG bytes per frame (4:2:0, area resize), by dataset ('all') and quality."""
    sizes: dict[str, dict[int, list[int]]] = {}
    for name, paths in clips.items():
        if not paths:
            continue
        sizes[name] = {q: [] for q in qualities}
        for path in paths:
            for rgb in video.iter_frames(path):
                small = np.ascontiguousarray(
                    cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)
                )
                for q in qualities:
                    sizes[name][q].append(len(simplejpeg.encode_jpeg(
                        small, quality=q, colorspace="RGB", colorsubsampling="420")))
    if len(sizes) > 1:
        sizes["all"] = {q: [b for name in list(sizes) for b in sizes[name][q]] for q in qualities}
    return {name: {q: float(np.mean(b)) for q, b in by_q.items()} for name, by_q in sizes.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples_dir", type=Path, default=_common.SAMPLES_DIR,
                        help="folder with ucf101/<Class>/*.avi and hmdb51/<class>/*.avi")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=171)
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of the build")
    parser.add_argument("--size_qualities", default="75,90,95",
                        help="JPEG qualities of the stored-size table (comma separated)")
    parser.add_argument("--methods", default="area,bilinear")
    parser.add_argument("--no_stages", action="store_true",
                        help="skip the decode-only and decode+resize rows")
    args = parser.parse_args(argv)

    _common.print_header("dataset build throughput (1 process = 1 core)", with_jax=False)
    clips = find_clips(args.samples_dir)
    paths = [p for ps in clips.values() for p in ps]
    if not paths:
        print(f"skipped: no sample clips found under {args.samples_dir} "
              "(expected ucf101/<Class>/*.avi and hmdb51/<class>/*.avi)")
        return 0
    video.limit_threads()  # as in the builder's worker processes
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    print(f"clips: {len(clips['ucf101'])} UCF101 + {len(clips['hmdb51'])} HMDB51 from "
          f"{args.samples_dir}")
    num_frames = _decode_only(paths)  # also warms the page cache and the codec libraries
    print(f"frames: {num_frames} decoded; target {args.height}x{args.width}, JPEG "
          f"q{args.quality} 4:2:0; {args.repeats} repeats (interleaved)\n")

    datasets = [name for name, ps in clips.items() if ps]
    counts = {name: sum(1 for p in clips[name] for _ in video.iter_frames(p)) for name in datasets}
    counts["all"] = num_frames
    # (row name, frames, fn); the full encode runs per dataset, 'all' sums a round's datasets.
    jobs: list[tuple[str, str, Callable[[], int]]] = []
    if not args.no_stages:
        jobs.append(("decode only", "all", lambda: _decode_only(paths)))
        for m in methods:
            jobs.append((f"decode + resize ({m})", "all",
                         lambda m=m: _decode_resize(paths, m, args.height, args.width)))
    for m in methods:
        for name in datasets:
            jobs.append((f"decode + resize + encode ({m})", name,
                         lambda m=m, name=name: _encode(clips[name], m, args.height, args.width,
                                                        args.quality)))
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for _ in range(args.repeats):
        round_times: dict[tuple[str, str], tuple[float, float]] = {}
        for stage, name, fn in jobs:
            round_times[stage, name] = _common.repeat(fn, 1)[0]
        for m in methods:
            stage = f"decode + resize + encode ({m})"
            parts = [round_times[stage, name] for name in datasets]
            round_times[stage, "all"] = (sum(w for w, _ in parts), sum(c for _, c in parts))
        for key, value in round_times.items():
            times.setdefault(key, []).append(value)
    load_after = _common.load_average()

    rows = []
    for (stage, name), runs in times.items():
        best, median = _common.rate_stats(counts[name], [w for w, _ in runs])
        cpu_best, cpu_median = _common.rate_stats(counts[name], [c for _, c in runs])
        rows.append([stage, name, counts[name], best, median, cpu_best, cpu_median,
                     statistics.median(c / w for w, c in runs)])
    print(_common.table(["stage", "clips", "frames", "frames/s best", "median",
                         "frames/cpu-s best", "median", "cpu/wall"], rows))
    print(f"(load average after: {load_after}; frames/cpu-s counts this process's CPU time only)\n")

    ref = "ucf101" if "ucf101" in datasets else "all"
    rows = []
    for m in methods:
        runs = times[f"decode + resize + encode ({m})", ref]
        best, median = _common.rate_stats(counts[ref], [w for w, _ in runs])
        cpu_best, _ = _common.rate_stats(counts[ref], [c for _, c in runs])
        rows.append([m, best, SPEC_ANCHORS.get(m, float("nan")),
                     UCF101_FRAMES / best / 60, UCF101_FRAMES / median / 60,
                     UCF101_FRAMES / cpu_best / 60])
    print(f"UCF101 build (2.48 M frames), extrapolated from the {ref} clips:")
    print(_common.table(["resize", "frames/s/core best", "method §7 anchor", "core-min (best)",
                         "core-min (median)", "core-min (cpu-s best)"], rows))
    print()

    qualities = [int(q) for q in args.size_qualities.split(",") if q.strip()]
    if args.quality not in qualities:
        qualities.append(args.quality)
    sizes = stored_bytes(clips, args.height, args.width, sorted(qualities))
    rows = []
    for q in sorted(qualities):
        row: list[object] = [f"q{q}"]
        for name in sizes:
            row.append(sizes[name][q] / 1e3)
        ref_size = sizes.get("ucf101", sizes.get("all", next(iter(sizes.values()))))[q]
        row += [ref_size * UCF101_FRAMES / 1e9, SPEC_BYTES.get(q, float("nan")) / 1e3]
        rows.append(row)
    print(f"stored size at {args.height}x{args.width}, 4:2:0, area resize (KB = 1000 bytes):")
    print(_common.table(
        ["quality", *(f"KB/frame {n}" for n in sizes), "UCF101 GB (est.)", "method §7 KB/frame"],
        rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
