"""Builds `ucf101_frames` or `hmdb51_frames` without TensorFlow (flags named as in `tfds build`).

    python -m tfds_builders.build ucf101_frames --manual_dir=~/data/ucf101 \
        --data_dir=~/tensorflow_datasets [--config=split1] [--num_workers=N]
    python -m tfds_builders.build ucf101_frames --data_dir=~/tensorflow_datasets --summary
    python -m tfds_builders.build ucf101_frames --manual_dir=~/data/ucf101 --verify

`--manual_dir` holds the downloaded archives, or their contents unpacked the usual way (see each
builder's MANUAL_DOWNLOAD_INSTRUCTIONS): the videos and split files are found by content.
`--config` takes `split1`, `split2`, `split3`, or a size/quality variant such as `split1_64x85`
or `split1_128x171_q75`; `--config=all` builds the three folds. A build that was interrupted is
simply run again: its leftovers are removed and archives already extracted are reused. Every
build ends with a summary (also in `build_report.json`) that compares the videos with the official
release's; `--summary` prints it again for a dataset built earlier, without rebuilding.
`--verify` checks a download from any mirror before a build: the size and sha256 of the official
archives in `--manual_dir`, and the videos and split files it holds (for all three folds) against
the official counts; the exit status is 1 when anything differs. Nothing is ever downloaded.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from tfds_builders import BUILDERS, layouts, official
from tfds_builders import summary as summary_lib
from vcp_jax.data import splits as splits_lib


def remove_incomplete(data_dir: Path, name: str, config: str) -> None:
    """Deletes what an interrupted build left (TFDS writes into `incomplete.*` folders)."""
    for leftover in (data_dir / name / config).glob("incomplete.*"):
        print(f"removing the leftovers of an interrupted build: {leftover}")
        shutil.rmtree(leftover, ignore_errors=True)


def _builder(name: str, data_dir: Path, config: str, num_workers: int | None = None) -> Any:
    if name not in BUILDERS:
        raise ValueError(f"dataset must be one of {sorted(BUILDERS)}, got {name!r}")
    return BUILDERS[name](config=config, data_dir=str(data_dir), num_workers=num_workers)


def build(
    name: str,
    *,
    manual_dir: Path,
    data_dir: Path,
    config: str = "split1",
    num_workers: int | None = None,
) -> tfds.core.DatasetBuilder:
    """Builds one config of one dataset; returns the builder (already-built data is reused).

    The manual dir is searched before TFDS starts, so a wrong layout fails at once with the list
    of what was found and what is accepted (`layouts.ManualDirError`).
    """
    data_dir, manual_dir = Path(data_dir).expanduser(), Path(manual_dir).expanduser()
    builder = _builder(name, data_dir, config, num_workers)
    if builder.is_prepared():
        print(f"{name}/{builder.builder_config.name} is already built in {builder.data_dir}")
        print(summary_lib.describe_built(builder, scan=False))
        return builder
    builder.locate_data(manual_dir)
    remove_incomplete(data_dir, name, builder.builder_config.name)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
    )
    return builder


def summarize(name: str, *, data_dir: Path, config: str = "split1") -> str:
    """The summary of a dataset built earlier (from its report, or by reading it); no building."""
    data_dir = Path(data_dir).expanduser()
    builder = _builder(name, data_dir, config)
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"{name}/{builder.builder_config.name} is not built in {data_dir}; build it with: "
            f"python -m tfds_builders.build {name} --manual_dir=DIR --data_dir={data_dir} "
            f"--config={builder.builder_config.name}"
        )
    return summary_lib.describe_built(builder)


def verify(name: str, *, manual_dir: Path, data_dir: Path) -> bool:
    """Checks a download against the official release; prints one line per check, True if all
    agree. The archives are hashed; the videos and split files are located as a build does
    (archives that hold them are extracted once under `data_dir`, and a build reuses that)."""
    import tqdm  # noqa: PLC0415

    release = official.RELEASES[name]
    manual_dir, data_dir = Path(manual_dir).expanduser(), Path(data_dir).expanduser()
    print(f"{name}: checking {manual_dir} against the official {release.title} release "
          f"({release.videos:,} videos in {release.classes} classes)")
    ok = True
    for archive in release.archives + release.mirrors:
        for path in layouts.find_archives(manual_dir, [archive.name]):
            with tqdm.tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                           desc=f"sha256 {path.name}", leave=False) as bar:
                good, line = official.check_archive(archive, path, bar.update)
            ok &= good
            print(f"  {line}")
    for fold in sorted(release.folds):
        builder = _builder(name, data_dir, f"split{fold}")
        located = builder.locate_data(manual_dir)
        split = splits_lib.read_split(builder.LAYOUT.dataset, located.splits_dir, fold)
        good, line = official.compare_counts(release, fold, len(split.train), len(split.test),
                                             len(split.class_names))
        ok &= good
        print(f"  split files: {line.removeprefix('warning: ')}" if good else f"  {line}")
        if fold == min(release.folds):
            found = (located.videos_found, located.class_folders)
            want = (release.videos, release.classes)
            good = found == want
            ok &= good
            print(f"  {'' if good else 'warning: '}videos: {found[0]:,} of the listed videos "
                  f"found in {found[1]} class folders of {located.videos_root}"
                  + (", as the official release" if good else
                     f"; the official release has {want[0]:,} in {want[1]}"))
    print(f"{name}: " + ("as the official release" if ok else
                         "differs from the official release (see the warnings above)"))
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("datasets", nargs="+", choices=sorted(BUILDERS), metavar="NAME",
                        help=f"one or more of {sorted(BUILDERS)}")
    parser.add_argument("--manual_dir", type=Path,
                        help="folder with the downloaded archives, or their unpacked contents")
    parser.add_argument("--data_dir", default="~/tensorflow_datasets", type=Path,
                        help="where the built datasets go")
    parser.add_argument("--config", default="split1",
                        help="split1 (default), split2, split3, all, or e.g. split1_64x85")
    parser.add_argument("--num_workers", type=int, default=None,
                        help="decoding processes (default: every core)")
    parser.add_argument("--summary", action="store_true",
                        help="print the summary of the already built dataset; build nothing")
    parser.add_argument("--verify", action="store_true",
                        help="check the archives and videos in --manual_dir against the official "
                             "release (sizes, sha256, counts); build nothing")
    args = parser.parse_args(argv)
    if not args.summary and args.manual_dir is None:
        parser.error("--manual_dir is required to build or verify (or pass --summary)")
    if args.verify:
        try:
            results = [verify(name, manual_dir=args.manual_dir, data_dir=args.data_dir)
                       for name in args.datasets]
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0 if all(results) else 1
    configs = ["split1", "split2", "split3"] if args.config == "all" else [args.config]
    # One bar per split is ours; TFDS's own bars (splits, examples, shuffling) only add noise.
    tfds.disable_progress_bar()
    for name in args.datasets:
        for config in configs:
            try:
                if args.summary:
                    print(summarize(name, data_dir=args.data_dir, config=config))
                    continue
                builder = build(name, manual_dir=args.manual_dir, data_dir=args.data_dir,
                                config=config, num_workers=args.num_workers)
            except (FileNotFoundError, ValueError) as e:
                print(f"error: {name}/{config}: {e}", file=sys.stderr)
                return 2
            print(f"{name}/{builder.builder_config.name} is ready in {builder.data_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
