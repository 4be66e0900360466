"""Pretraining input-pipeline throughput (tuples/s per core) at the paper's sizes.

Frames stored at 128x171 JPEG q90 (the builder's `split1` config), crop 112, clip_len 16, 3
context clips + a remote clip (docs/method.md §1, §7). Builds a small dataset with the real
builder from synthetic 320x240 videos of 150 frames in a temporary folder (or reuses
`--data_dir`), then:

  (a) `input_pipeline.sample_tuple` in one thread over many tuples        -> tuples/s/core
  (b) the bare JPEG decode (simplejpeg) of exactly the frames those tuples read (48, plus 16 when
      the tuple has a remote clip), without crop or copy                   -> the decode bound
  (c) the full grain pipeline (`pretrain_data` + `make_iterator`, 1 and 2 threads) -> tuples/s,
      and the same batches read inline (`data.train[k]`: source read + sampling + batching, no
      iterator threads) to separate the iterator's overhead; once more over an index list of
      UCF101's size (grain's shuffle costs ~4 ms per element on an 8-entry index, 0.03 ms at 8,564)

(a) and (b) also run on the real UCF101 sample clips of ../shared/data/samples, encoded in memory
by `encode_video` exactly as the builder stores them, when that folder is present. Rates are given
per wall second and per CPU second of this process (the per-core rate when other jobs share the
machine). docs/method.md §7 anchors: decode bound about 215 tuples/s/core; decode + crop +
stacking 176-207; the reference PyTorch loader 11-13.

    PYTHONPATH=. python -m benchmarks.input_pipeline [--tuples 200] [--batches 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import simplejpeg

from benchmarks import _common

SPEC_DECODE_BOUND = 215.0  # tuples/s/core, docs/method.md §7
SPEC_DECODE_CROP = "176-207"  # tuples/s/core, docs/method.md §7
SPEC_REFERENCE = 12.0  # tuples/s/core, the reference PyTorch loader (11 to 13), docs/method.md §7


class _RecordingFrames(list):
    """A frame list that records which indices were read (to replay exactly those decodes)."""

    def __init__(self, frames: Sequence[bytes]):
        super().__init__(frames)
        self.reads: list[int] = []

    def __getitem__(self, index: Any) -> Any:
        self.reads.append(index)
        return super().__getitem__(index)


def make_config(args: argparse.Namespace, data_dir: Path) -> Any:
    from configs import default  # noqa: PLC0415

    config = default.get_config("r3d")
    config.data.data_dir = str(data_dir)
    config.data.builder_config = args.config
    config.data.num_val_videos = 0
    config.data.crop_size = args.crop
    config.data.num_workers = 0
    config.cloze.clip_len = args.clip_len
    config.cloze.interval = args.clip_len // 2
    config.cloze.remote_gap = args.clip_len
    config.batch_size = args.batch_size
    return config


def build_synthetic(args: argparse.Namespace, root: Path) -> Path:
    """Synthetic videos -> the real builder at `args.config`; returns the data_dir."""
    from tfds_builders import build  # noqa: PLC0415
    from vcp_jax.data import synthetic  # noqa: PLC0415

    start = time.perf_counter()
    synthetic.generate(root / "videos", layout="ucf101", num_classes=args.num_classes,
                       videos_per_class=args.videos_per_class, num_frames=args.num_frames,
                       height=240, width=320, seed=0, workers=2)
    generated = time.perf_counter()
    build.build("ucf101_frames", manual_dir=root / "videos", data_dir=root / "tfds",
                config=args.config, num_workers=2)
    print(f"\nsynthetic dataset: generated in {generated - start:.1f} s, built in "
          f"{time.perf_counter() - generated:.1f} s (2 workers) under {root}\n")
    return root / "tfds"


def load_examples(data_dir: Path, config_name: str) -> list[dict[str, Any]]:
    import tensorflow_datasets as tfds  # noqa: PLC0415

    source = tfds.data_source(f"ucf101_frames/{config_name}", split="train",
                              data_dir=str(data_dir))
    return [{"frames": list(ex["frames"]), "label": ex["label"]} for ex in
            (source[i] for i in range(len(source)))]


def sample_clip_examples(samples_dir: Path) -> list[dict[str, Any]]:
    """The UCF101 sample clips encoded at 128x171 q90 (area), as the builder stores them."""
    from vcp_jax.data import video  # noqa: PLC0415

    return [{"frames": video.encode_video(p).frames, "label": 0}
            for p in sorted((samples_dir / "ucf101").glob("*/*.avi"))]


def bench_sampling(
    name: str, examples: list[dict[str, Any]], spec: Any, args: argparse.Namespace
) -> list[list[Any]]:
    """Rows for (a) sample_tuple and (b) the decode of the same frames, on `examples`."""
    from vcp_jax import input_pipeline  # noqa: PLC0415

    examples = [ex for ex in examples if len(ex["frames"]) >= spec.span]
    if not examples:
        print(f"{name}: no video has the {spec.span} frames a tuple needs; skipped")
        return []
    n = args.tuples
    picks = [examples[i % len(examples)] for i in range(n)]

    # Which frames each tuple reads (the first read of each tuple is the header probe).
    reads: list[bytes] = []
    frames_per_tuple, with_remote = [], 0
    for i, ex in enumerate(picks):
        recorder = _RecordingFrames(ex["frames"])
        out = input_pipeline.sample_tuple({**ex, "frames": recorder}, np.random.default_rng(i),
                                          spec)
        indices = recorder.reads[1:]
        frames_per_tuple.append(len(indices))
        with_remote += bool(out["has_remote"])
        reads += [ex["frames"][k] for k in indices]

    def run_sample() -> None:
        for i, ex in enumerate(picks):
            input_pipeline.sample_tuple(ex, np.random.default_rng(i), spec)

    def run_decode() -> None:
        for data in reads:
            simplejpeg.decode_jpeg(data, colorspace="RGB")

    rows = []
    loads = [_common.load_average()]
    times = {"(a) sample_tuple": [], "(b) JPEG decode only": []}
    for _ in range(args.repeats):  # interleaved, so both see the same load
        times["(a) sample_tuple"] += _common.repeat(run_sample, 1)
        times["(b) JPEG decode only"] += _common.repeat(run_decode, 1)
    loads.append(_common.load_average())
    mean_bytes = float(np.mean([len(b) for b in reads]))
    for label, runs in times.items():
        best, median = _common.rate_stats(n, [w for w, _ in runs])
        cpu_best, cpu_median = _common.rate_stats(n, [c for _, c in runs])
        rows.append([name, label, best, median, cpu_best, cpu_median,
                     statistics.median(c / w for w, c in runs)])
    print(f"{name}: {len(examples)} videos, {n} tuples, {np.mean(frames_per_tuple):.1f} frames "
          f"decoded per tuple ({with_remote}/{n} with a remote clip), {mean_bytes / 1e3:.2f} KB "
          f"per JPEG frame; load {loads[0]} -> {loads[1]}")
    return rows


UCF101_TRAIN_VIDEOS = 8_564  # split-1 train videos after holding 800 out (configs/default.py)


def ucf_sized_stream(config: Any, train_videos: np.ndarray) -> Any:
    """`pretrain_data`'s training stream over an index list repeated to UCF101's 8,564 entries.

    grain's `shuffle` maps each position through `index_shuffle`, whose cost per element falls
    with the dataset size (about 4 ms at 8 entries, 0.03 ms at 8,564 on this machine): a tiny
    benchmark dataset would charge the pipeline a cost that the real one does not pay.
    """
    import grain  # noqa: PLC0415

    from vcp_jax import input_pipeline  # noqa: PLC0415

    source = input_pipeline.data_source(config.data, "train")
    spec = input_pipeline.TupleSpec.from_config(config)
    return (
        grain.MapDataset.source(np.resize(train_videos, UCF101_TRAIN_VIDEOS))
        .shuffle(seed=config.seed)
        .repeat()
        .random_map(input_pipeline._SampleTuple(source, spec), seed=config.seed)
        .batch(config.batch_size, drop_remainder=True)
    )


def bench_grain(config: Any, args: argparse.Namespace) -> list[list[Any]]:
    """Rows for (c): the grain training stream, read inline and with `num_threads` threads."""
    from vcp_jax import input_pipeline  # noqa: PLC0415

    data = input_pipeline.pretrain_data(config)
    source = input_pipeline.data_source(config.data, "train")
    long_enough = np.flatnonzero(input_pipeline.video_lengths(source, "train") >=
                                 input_pipeline.TupleSpec.from_config(config).span)
    streams = {
        f"pretrain_data ({data.num_train_videos} videos)": data.train,
        f"same, index of {UCF101_TRAIN_VIDEOS:,}": ucf_sized_stream(config, long_enough),
    }
    n = args.batches * config.batch_size
    rows = []

    def add_row(stream: str, how: str, runs: list[tuple[float, float]], load: str) -> None:
        rows.append([stream, how, *_common.rate_stats(n, [w for w, _ in runs]),
                     *_common.rate_stats(n, [c for _, c in runs]),
                     statistics.median(c / w for w, c in runs),
                     f"{load} -> {_common.load_average()}"])

    for stream, dataset in streams.items():
        dataset[0]  # opens the files

        def inline(dataset: Any = dataset) -> None:  # in this thread: no iterator, no prefetch
            for k in range(1, args.batches + 1):
                dataset[k]

        load = _common.load_average()
        add_row(stream, "inline [k]", _common.repeat(inline, args.repeats), load)
        for threads in [int(t) for t in args.threads.split(",")]:
            config.data.num_threads = threads
            runs = []
            load = _common.load_average()
            for _ in range(args.repeats):
                iterator = input_pipeline.make_iterator(dataset, config, prefetch_processes=False)
                next(iterator)  # starts the threads and fills the prefetch buffer
                wall, cpu = time.perf_counter(), time.process_time()
                for _ in range(args.batches):
                    next(iterator)
                runs.append((time.perf_counter() - wall, time.process_time() - cpu))
                del iterator
            add_row(stream, f"make_iterator, {threads} thread(s)", runs, load)
    print(f"grain: batch {config.batch_size}, {args.batches} batches per run (iterators: after "
          "1 warm-up batch)")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", type=Path, default=None,
                        help="an already built data_dir with ucf101_frames/<config> (default: "
                             "generate and build a synthetic one in a temporary folder)")
    parser.add_argument("--config", default="split1", help="builder config (128x171 q90)")
    parser.add_argument("--samples_dir", type=Path, default=_common.SAMPLES_DIR)
    parser.add_argument("--num_classes", type=int, default=2)
    parser.add_argument("--videos_per_class", type=int, default=6)
    parser.add_argument("--num_frames", type=int, default=150)
    parser.add_argument("--crop", type=int, default=112)
    parser.add_argument("--clip_len", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--tuples", type=int, default=200, help="tuples per run of (a) and (b)")
    parser.add_argument("--batches", type=int, default=20, help="batches per run of (c)")
    parser.add_argument("--threads", default="1,2", help="grain thread counts of (c)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    _common.print_header("pretraining input pipeline", with_jax=False)
    from vcp_jax import input_pipeline  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="vcp_bench_") as tmp:
        data_dir = args.data_dir or build_synthetic(args, Path(tmp))
        config = make_config(args, data_dir)
        spec = input_pipeline.TupleSpec.from_config(config)
        print(f"tuple: 3 clips x {spec.clip_len} frames at offsets {spec.offsets} (span "
              f"{spec.span}), remote clip >= {spec.remote_gap} frames away, crop "
              f"{spec.crop_size}; frames {args.config}\n")

        rows = bench_sampling("synthetic (built)", load_examples(data_dir, args.config), spec,
                              args)
        if (args.samples_dir / "ucf101").is_dir():
            rows += bench_sampling("UCF101 sample clips", sample_clip_examples(args.samples_dir),
                                   spec, args)
        else:
            print(f"no sample clips under {args.samples_dir}: real-frame rows skipped")
        print()
        print("(a)/(b): single thread, tuples per second")
        print(_common.table(["frames", "measurement", "tuples/s best", "median",
                             "tuples/cpu-s best", "median", "cpu/wall"], rows))
        print()
        grain_rows = bench_grain(config, args)
        print("(c): grain pipeline (pretrain_data + make_iterator), tuples per second")
        print(_common.table(["stream", "read by", "tuples/s best", "median",
                             "tuples/cpu-s best", "median", "cpu/wall", "load before -> after"],
                            grain_rows))
        print()

    by_name = {(r[0], r[1]): r for r in rows}
    compare = []
    for name in dict.fromkeys(r[0] for r in rows):
        a, b = by_name[name, "(a) sample_tuple"], by_name[name, "(b) JPEG decode only"]
        compare.append([name, a[4], b[4], a[4] / b[4], a[4] / SPEC_REFERENCE])
    print("per core (best tuples per CPU second) against docs/method.md §7: decode bound "
          f"{SPEC_DECODE_BOUND:.0f}, decode + crop + stack {SPEC_DECODE_CROP}, reference "
          f"PyTorch loader 11-13 tuples/s/core")
    print(_common.table(["frames", "(a) sample_tuple", "(b) decode bound", "(a)/(b)",
                         "(a) / reference (12)"], compare))
    return 0


if __name__ == "__main__":
    sys.exit(main())
