"""The official UCF101 / HMDB51 releases: a download checked with `--verify`, a build's counts."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from pathlib import Path

import pytest

from tfds_builders import build as build_cli
from tfds_builders import official, summary
from vcp_jax.data import synthetic

UCF_LINE = ("13,320 videos in 101 classes (fold 1: 9,537 train + 3,783 test), as the official "
            "UCF101 release")


def test_counts_against_the_release() -> None:
    assert official.compare_counts(official.UCF101, 1, 9_537, 3_783, 101) == (True, UCF_LINE)
    ok, line = official.compare_counts(official.HMDB51, 2, 3_570, 1_530, 51)
    assert ok and line == ("5,100 videos in 51 classes (fold 2: 3,570 train + 1,530 test), as "
                           "the official HMDB51 release; 1,666 of its 6,766 videos unused in "
                           "this fold")
    ok, line = official.compare_counts(official.UCF101, 1, 9_530, 3_780, 101)
    assert not ok and line.startswith("warning: 13,310 videos in 101 classes (fold 1: 9,530")
    assert "the official UCF101 release has 13,320 in 101" in line
    assert "3 test): 10 missing or skipped. Is the copy complete?" in line
    ok, line = official.compare_counts(official.HMDB51, 1, 3_570, 1_530, 50)
    assert not ok and "in 50 classes" in line and "missing" not in line


def _report(dataset: str, train: int, test: int, classes: int, **extra: object) -> dict:
    names = [f"c{i}" for i in range(classes)]

    def facts(n: int) -> dict:
        videos = [summary.VideoFacts(f"{names[i % classes]}/v{i}.avi", names[i % classes], 80,
                                     1000) for i in range(n)]
        return summary.split_facts(videos, [], names)

    return {"dataset": dataset, "splits": {"train": facts(train), "test": facts(test)}, **extra}


def test_the_build_summary_compares_with_the_release(tmp_path: Path) -> None:
    report = _report("ucf101_frames/split1_48x64", 9_537, 3_783, 101)
    assert summary.format_summary(report).splitlines()[-1] == f"  {UCF_LINE}"
    short = summary.format_summary(_report("hmdb51_frames/split3", 3_500, 1_530, 51))
    assert short.splitlines()[-1].startswith("  warning: 5,030 videos in 51 classes (fold 3")
    assert "70 missing or skipped" in short
    # Not the release: another dataset, or the synthetic generator's videos in its layout.
    assert official.report_check(_report("d/split1", 1, 1, 1)) is None
    assert official.report_check(_report("ucf101_frames/split1", 8, 4, 4, synthetic=True)) is None
    (tmp_path / synthetic.MARKER_NAME).write_text("{}")
    older = _report("ucf101_frames/split1", 8, 4, 4, manual_dir=str(tmp_path))  # no flag yet
    assert official.report_check(older) is None
    assert official.SYNTHETIC_MARKER == synthetic.MARKER_NAME


def test_an_archive_is_checked_by_size_and_sha256(tmp_path: Path) -> None:
    path = tmp_path / "UCF101TrainTestSplits-RecognitionTask.zip"
    path.write_bytes(b"abc")
    ok, line = official.check_archive(official.UCF101.archives[1], path)
    assert not ok and line == (f"warning: {path}: 3 bytes; the official "
                               "UCF101TrainTestSplits-RecognitionTask.zip has 113,943")
    archive = dataclasses.replace(official.UCF101.archives[0],
                                  sha256=hashlib.sha256(b"abc").hexdigest())
    assert official.check_archive(archive, path) == (
        True, f"{path}: 3 bytes, sha256 as the official UCF101.rar")
    ok, line = official.check_archive(official.UCF101.archives[0], path)
    assert not ok and f"sha256 {hashlib.sha256(b'abc').hexdigest()}; the official" in line
    for release in official.RELEASES.values():
        for archive in release.archives:
            assert archive.sha256 is not None and len(archive.sha256) == 64


def test_verify_a_download(shared_data: Path, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    """The official split files with 3 of the 13,320 videos: the lists agree with the release,
    the videos do not, and a corrupt archive is named; nothing is built."""
    manual, data_dir = tmp_path / "manual", tmp_path / "data"
    samples = shared_data / "samples" / "ucf101"
    for clip in samples.glob("*/*.avi"):
        (manual / "UCF-101" / clip.parent.name).mkdir(parents=True, exist_ok=True)
        os.symlink(clip, manual / "UCF-101" / clip.parent.name / clip.name)
    shutil.copytree(shared_data / "ucf101" / "ucfTrainTestlist", manual / "ucfTrainTestlist")
    (manual / "UCF101TrainTestSplits-RecognitionTask.zip").write_bytes(b"not the zip")
    status = build_cli.main(["ucf101_frames", f"--manual_dir={manual}",
                             f"--data_dir={data_dir}", "--verify"])
    out = capsys.readouterr().out
    assert status == 1, out
    assert "UCF101TrainTestSplits-RecognitionTask.zip: 11 bytes; the official" in out
    assert f"  split files: {UCF_LINE}" in out
    assert ("split files: 13,320 videos in 101 classes (fold 3: 9,624 train + 3,696 test), as "
            "the official UCF101 release") in out
    assert ("  warning: videos: 3 of the listed videos found in 3 class folders of "
            f"{manual / 'UCF-101'}; the official release has 13,320 in 101") in out
    assert out.rstrip().endswith("ucf101_frames: differs from the official release (see the "
                                 "warnings above)")
    assert not (data_dir / "ucf101_frames").exists()


def test_the_download_instructions_name_every_archive_and_count() -> None:
    from tfds_builders import hmdb51_frames, ucf101_frames

    for builder, release in ((ucf101_frames.Builder, official.UCF101),
                             (hmdb51_frames.Builder, official.HMDB51)):
        text = builder.MANUAL_DOWNLOAD_INSTRUCTIONS
        for archive in release.archives:
            assert archive.name in text and archive.sha256 in text
        assert f"{release.videos:,} videos in {release.classes} classes" in text
        train, test = release.folds[1]
        assert f"{train:,}" in text and f"{test:,}" in text and "--verify" in text
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for release in official.RELEASES.values():
        for archive in release.archives:
            assert archive.sha256 in readme, archive.name
