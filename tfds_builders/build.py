"""Builds `ucf101_frames` or `hmdb51_frames` without TensorFlow (flags named as in `tfds build`).

    python -m tfds_builders.build ucf101_frames --manual_dir=~/data/ucf101 \
        --data_dir=~/tensorflow_datasets [--config=split1] [--num_workers=N]

`--config` takes `split1`, `split2`, `split3`, or a size/quality variant such as `split1_64x85`
or `split1_128x171_q75`; `--config=all` builds the three folds. A build that was interrupted is
simply run again: its leftovers are removed and archives already extracted are reused.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import tensorflow_datasets as tfds

from tfds_builders import BUILDERS


def remove_incomplete(data_dir: Path, name: str, config: str) -> None:
    """Deletes what an interrupted build left (TFDS writes into `incomplete.*` folders)."""
    for leftover in (data_dir / name / config).glob("incomplete.*"):
        print(f"removing the leftovers of an interrupted build: {leftover}")
        shutil.rmtree(leftover, ignore_errors=True)


def build(
    name: str,
    *,
    manual_dir: Path,
    data_dir: Path,
    config: str = "split1",
    num_workers: int | None = None,
) -> tfds.core.DatasetBuilder:
    """Builds one config of one dataset; returns the builder (already-built data is reused)."""
    if name not in BUILDERS:
        raise ValueError(f"dataset must be one of {sorted(BUILDERS)}, got {name!r}")
    data_dir, manual_dir = Path(data_dir).expanduser(), Path(manual_dir).expanduser()
    builder = BUILDERS[name](config=config, data_dir=str(data_dir), num_workers=num_workers)
    if not builder.is_prepared() and (not manual_dir.is_dir() or not any(manual_dir.iterdir())):
        raise FileNotFoundError(
            f"manual dir {manual_dir} is missing or empty. "
            f"{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}"
        )
    remove_incomplete(data_dir, name, builder.builder_config.name)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
    )
    return builder


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("datasets", nargs="+", choices=sorted(BUILDERS), metavar="NAME",
                        help=f"one or more of {sorted(BUILDERS)}")
    parser.add_argument("--manual_dir", required=True, type=Path,
                        help="folder with the archives or extracted videos and split files")
    parser.add_argument("--data_dir", default="~/tensorflow_datasets", type=Path,
                        help="where the built datasets go")
    parser.add_argument("--config", default="split1",
                        help="split1 (default), split2, split3, all, or e.g. split1_64x85")
    parser.add_argument("--num_workers", type=int, default=None,
                        help="decoding processes (default: every core)")
    args = parser.parse_args(argv)
    configs = ["split1", "split2", "split3"] if args.config == "all" else [args.config]
    for name in args.datasets:
        for config in configs:
            try:
                builder = build(name, manual_dir=args.manual_dir, data_dir=args.data_dir,
                                config=config, num_workers=args.num_workers)
            except (FileNotFoundError, ValueError) as e:
                print(f"error: {name}/{config}: {e}", file=sys.stderr)
                return 2
            print(f"{name}/{builder.builder_config.name} is ready in {builder.data_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
