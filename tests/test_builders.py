"""Building `ucf101_frames` and `hmdb51_frames` from real sample clips and from synthetic data."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

import tfds_builders  # noqa: F401 - registers the builders
from tfds_builders import build as build_cli
from tfds_builders import video_frames
from vcp_jax.data import splits, synthetic, video

SMALL = "split1_32x43"  # tiny frames keep the tests fast; the code path is the default one


def _restricted_ucf101(shared_data: Path, manual: Path) -> dict[str, str]:
    """A manual dir with the real sample clips and the official lists restricted to them."""
    samples = shared_data / "samples" / "ucf101"
    present = {f"{p.parent.name}/{p.name}" for p in samples.glob("*/*.avi")}
    (manual / "UCF101").mkdir(parents=True)
    for relpath in present:
        (manual / "UCF101" / relpath).parent.mkdir(exist_ok=True)
        os.symlink(samples / relpath, manual / "UCF101" / relpath)
    official = shared_data / "ucf101" / "ucfTrainTestlist"
    lists = manual / "ucfTrainTestlist"
    lists.mkdir()
    shutil.copy(official / "classInd.txt", lists / "classInd.txt")
    expected = {}
    for fold in (1, 2, 3):
        for kind in ("train", "test"):
            lines = (official / f"{kind}list{fold:02d}.txt").read_bytes().split(b"\r\n")
            kept = [line for line in lines if line.split(b" ")[0].decode() in present]
            (lists / f"{kind}list{fold:02d}.txt").write_bytes(b"\r\n".join(kept) + b"\r\n")
            if fold == 1:
                for line in kept:
                    expected[line.split(b" ")[0].decode()] = kind
    return expected


def test_ucf101_from_real_samples(shared_data: Path, tmp_path: Path) -> None:
    manual, data_dir = tmp_path / "manual", tmp_path / "data"
    expected = _restricted_ucf101(shared_data, manual)
    assert sorted(expected.values()) == ["test", "test", "train"]
    assert (
        build_cli.main(
            [
                "ucf101_frames",
                f"--manual_dir={manual}",
                f"--data_dir={data_dir}",
                f"--config={SMALL}",
                "--num_workers=1",
            ]
        )
        == 0
    )
    train = tfds.data_source(f"ucf101_frames/{SMALL}", split="train", data_dir=str(data_dir))
    test = tfds.data_source(f"ucf101_frames/{SMALL}", split="test", data_dir=str(data_dir))
    assert (len(train), len(test)) == (1, 2)
    example = train[0]
    assert example["video_id"] == b"v_SoccerJuggling_g23_c01"
    assert example["num_frames"] == len(example["frames"]) == 240
    assert example["group"] == b"g23"
    assert (example["source_height"], example["source_width"]) == (240, 320)
    assert example["fps"] == pytest.approx(29.97, abs=0.01)
    frame = video.decode_jpeg(example["frames"][100])
    assert frame.shape == (32, 43, 3)
    builder = tfds.builder(f"ucf101_frames/{SMALL}", data_dir=str(data_dir))
    label = builder.info.features["label"]
    assert label.num_classes == 101 and label.names[example["label"]] == "SoccerJuggling"
    by_id = {ex["video_id"].decode(): ex for ex in (test[0], test[1])}
    assert by_id["v_ApplyEyeMakeup_g01_c01"]["num_frames"] == 164
    assert by_id["v_Basketball_g01_c01"]["num_frames"] == 141
    report = json.loads((Path(builder.data_dir) / video_frames.REPORT_NAME).read_text())
    assert report["splits"]["train"]["written"] == 1 and report["splits"]["test"]["skipped"] == []


def test_hmdb51_from_real_samples(shared_data: Path, tmp_path: Path) -> None:
    manual, data_dir = tmp_path / "manual", tmp_path / "data"
    samples = shared_data / "samples" / "hmdb51" / "wave"
    (manual / "hmdb51_org" / "wave").mkdir(parents=True)
    names = {p.name for p in samples.glob("*.avi")}
    for name in names:
        os.symlink(samples / name, manual / "hmdb51_org" / "wave" / name)
    official = shared_data / "hmdb51" / "testTrainMulti_7030_splits"
    lists = manual / "testTrainMulti_7030_splits"
    lists.mkdir()
    for path in official.glob("*_test_split*.txt"):  # keep all 51 classes, lines of the samples
        kept = [
            line
            for line in path.read_text().splitlines(keepends=True)
            if line.split(" ")[0] in names
        ]
        (lists / path.name).write_text("".join(kept))
    builder = build_cli.build(
        "hmdb51_frames", manual_dir=manual, data_dir=data_dir, config=SMALL, num_workers=2
    )
    label = builder.info.features["label"]
    assert label.num_classes == 51 and label.names[-1] == "wave"
    train = tfds.data_source(f"hmdb51_frames/{SMALL}", split="train", data_dir=str(data_dir))
    test = tfds.data_source(f"hmdb51_frames/{SMALL}", split="test", data_dir=str(data_dir))
    # Fold 1: RATRACE train, TrumanShow test, SchoolRules unused (left out).
    assert [ex["video_id"] for ex in (train[0], test[0])] == [
        b"RATRACE_wave_f_nm_np1_fr_goo_37",
        b"TrumanShow_wave_f_nm_np1_fr_med_26",
    ]
    # Decoded frame counts, not the header's (which is one more for these DivX files).
    assert (train[0]["num_frames"], test[0]["num_frames"]) == (72, 48)
    assert train[0]["source_width"] == 560 and test[0]["source_width"] == 432


def test_bad_videos_are_skipped_and_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manual, data_dir = tmp_path / "manual", tmp_path / "data"
    info = synthetic.generate(
        manual,
        layout="ucf101",
        num_classes=3,
        videos_per_class=5,
        num_frames=24,
        height=32,
        width=48,
        seed=1,
    )
    split = splits.read_ucf101_split(info.splits_dir, 1)
    corrupt, truncated, missing = split.train[0], split.train[1], split.test[0]
    (info.videos_dir / corrupt.relpath).write_bytes(b"RIFF" + bytes(3000))
    data = (info.videos_dir / truncated.relpath).read_bytes()
    (info.videos_dir / truncated.relpath).write_bytes(data[: len(data) // 2])
    (info.videos_dir / missing.relpath).unlink()
    builder = build_cli.build(
        "ucf101_frames", manual_dir=manual, data_dir=data_dir, config=SMALL, num_workers=1
    )
    report = json.loads((Path(builder.data_dir) / video_frames.REPORT_NAME).read_text())
    skipped = {s["video"]: s["reason"] for s in report["splits"]["train"]["skipped"]}
    assert set(skipped) == {corrupt.relpath, truncated.relpath}
    assert skipped[truncated.relpath].startswith("truncated (decoded ")
    assert skipped[corrupt.relpath].startswith("cannot open")  # the path is in "video"
    assert report["splits"]["test"]["skipped"] == [
        {"video": missing.relpath, "reason": "file not found"}
    ]
    printed = capsys.readouterr().out
    assert "skipped (3):" in printed
    assert f"    test: {missing.relpath}: file not found" in printed
    assert f"    train: {truncated.relpath}: truncated (decoded " in printed
    train = tfds.data_source(f"ucf101_frames/{SMALL}", split="train", data_dir=str(data_dir))
    assert len(train) == len(split.train) - 2
    assert report["splits"]["train"]["written"] == len(split.train) - 2


def test_synthetic_build_and_interrupted_rebuild(tmp_path: Path) -> None:
    manual, data_dir = tmp_path / "manual", tmp_path / "data"
    info = synthetic.generate(
        manual,
        layout="hmdb51",
        num_classes=3,
        videos_per_class=6,
        num_frames=20,
        height=32,
        width=48,
        seed=2,
    )
    # A build killed half-way leaves an `incomplete.*` folder behind; the next run completes.
    stale = data_dir / "hmdb51_frames" / SMALL / "incomplete.ABC123_1.0.0"
    stale.mkdir(parents=True)
    (stale / "hmdb51_frames-train.array_record-00000-of-00001").write_bytes(b"partial")
    builder = build_cli.build(
        "hmdb51_frames", manual_dir=manual, data_dir=data_dir, config=SMALL, num_workers=1
    )
    assert not stale.exists()
    split = splits.read_hmdb51_split(info.splits_dir, 1)
    train = tfds.data_source(f"hmdb51_frames/{SMALL}", split="train", data_dir=str(data_dir))
    assert len(train) == len(split.train)
    assert builder.info.features["label"].names == list(split.class_names)
    example = train[0]
    assert example["num_frames"] == 20
    frames = np.stack([video.decode_jpeg(f) for f in example["frames"]])
    assert frames.shape == (20, 32, 43, 3) and frames.std() > 5


def test_missing_split_file_stops_the_build(tmp_path: Path) -> None:
    manual = tmp_path / "manual"
    info = synthetic.generate(
        manual,
        layout="ucf101",
        num_classes=3,
        videos_per_class=4,
        num_frames=16,
        height=32,
        width=48,
        seed=3,
    )
    (info.splits_dir / "testlist01.txt").unlink()
    with pytest.raises(splits.SplitFileError, match="testlist01.txt"):
        build_cli.build(
            "ucf101_frames", manual_dir=manual, data_dir=tmp_path / "d", config=SMALL, num_workers=1
        )


def test_missing_manual_dir_says_where_to_get_the_data(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="crcv.ucf.edu"):
        build_cli.build(
            "ucf101_frames", manual_dir=tmp_path / "nothing", data_dir=tmp_path / "d", config=SMALL
        )


def test_config_names() -> None:
    assert video_frames.make_config("split2").fold == 2
    config = video_frames.make_config("split1_64x85_q75")
    assert (config.height, config.width, config.jpeg_quality) == (64, 85, 75)
    with pytest.raises(ValueError, match="split1"):
        video_frames.make_config("split4")
