"""`datasets.prepare()`: the synthetic dataset is rebuilt when its generator parameters change,
and nothing the generator did not write is ever deleted."""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections
import pytest

from vcp_jax import config_utils, datasets
from vcp_jax.data import synthetic

CONFIG = "split1_16x16"


def _data(root: Path, **overrides) -> ml_collections.ConfigDict:
    """The smallest synthetic UCF101-layout dataset the generator allows (2 classes x 4 videos)."""
    data = ml_collections.ConfigDict()
    data.name = "ucf101_frames"
    data.builder_config = CONFIG
    data.data_dir = str(root / "tfds")
    data.synthetic = ml_collections.ConfigDict(dict(
        manual_dir=str(root / "videos"), layout="ucf101", num_classes=2, videos_per_class=4,
        num_frames=16, height=16, width=16, seed=0, workers=1, build_workers=1))
    for key, value in overrides.items():
        data.synthetic[key] = value
    return data


def _num_videos(data: ml_collections.ConfigDict) -> int:
    info = datasets.builder(data).info
    return sum(info.splits[s].num_examples for s in ("train", "test"))


def test_a_changed_generator_parameter_regenerates_and_rebuilds(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _data(tmp_path)
    datasets.prepare(data)
    assert _num_videos(data) == 8
    record = json.loads((Path(datasets.builder(data).data_dir)
                         / datasets.SYNTHETIC_RECORD).read_text())
    assert record["generator_options"]["videos_per_class"] == 4
    capsys.readouterr()

    # The same parameters: nothing is generated or built again.
    marker = tmp_path / "videos" / synthetic.MARKER_NAME
    before = marker.stat().st_mtime_ns
    datasets.prepare(data)
    assert "changed" not in capsys.readouterr().out
    assert marker.stat().st_mtime_ns == before

    # One parameter changed: the videos are regenerated and the build is replaced.
    changed = _data(tmp_path, videos_per_class=6)
    datasets.prepare(changed)
    out = capsys.readouterr().out
    assert "synthetic dataset parameters changed (videos_per_class 4 -> 6)" in out, out
    assert _num_videos(changed) == 12
    assert json.loads(marker.read_text())["params"]["videos_per_class"] == 6
    assert len(list((tmp_path / "videos" / "UCF101").rglob("*.avi"))) == 12

    # Another frame size built from the old videos' successor: built from the new videos.
    other = _data(tmp_path, videos_per_class=6)
    other.config = "split2_16x16"
    datasets.prepare(other)
    assert _num_videos(other) == 12


def test_a_legacy_build_of_the_same_videos_is_adopted(tmp_path: Path) -> None:
    data = _data(tmp_path)
    datasets.prepare(data)
    built = Path(datasets.builder(data).data_dir)
    (built / datasets.SYNTHETIC_RECORD).unlink()  # as built before builds recorded options
    info_file = built / "dataset_info.json"
    before = info_file.stat().st_mtime_ns
    datasets.prepare(data)
    assert info_file.stat().st_mtime_ns == before  # not rebuilt
    assert (built / datasets.SYNTHETIC_RECORD).is_file()


def test_folders_the_generator_did_not_write_are_never_deleted(tmp_path: Path) -> None:
    # Videos without the generator's marker (a user's own data): refused, left as they are.
    own = tmp_path / "videos" / "UCF101" / "Walk" / "v_Walk_g01_c01.avi"
    own.parent.mkdir(parents=True)
    own.write_bytes(b"not a synthetic video")
    with pytest.raises(config_utils.UserError, match="did not create"):
        datasets.prepare(_data(tmp_path))
    assert own.read_bytes() == b"not a synthetic video"
    with pytest.raises(ValueError, match="missing"):
        synthetic.remove(tmp_path / "videos")
    assert own.is_file()

    # A build that records no options and was not built from these videos: refused, kept.
    other = tmp_path / "elsewhere"
    data = _data(other)
    datasets.prepare(data)
    built = Path(datasets.builder(data).data_dir)
    (built / datasets.SYNTHETIC_RECORD).unlink()
    moved = _data(other, videos_per_class=6)
    moved.synthetic.manual_dir = str(other / "other_videos")
    with pytest.raises(config_utils.UserError, match="refusing to replace"):
        datasets.prepare(moved)
    assert (built / "dataset_info.json").is_file()
