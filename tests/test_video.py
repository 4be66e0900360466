"""Decoding every real sample clip, and the bad files a build must survive."""

import csv
from pathlib import Path

import numpy as np
import pytest

from vcp_jax.data import video


def _manifest(shared_data: Path) -> list[dict[str, str]]:
    with open(shared_data / "samples" / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_every_sample_clip_decodes_to_its_frame_count(shared_data: Path) -> None:
    rows = _manifest(shared_data)
    assert len(rows) == 8
    for row in rows:
        path = shared_data / "samples" / row["path"]
        encoded = video.encode_video(path, height=64, width=85, jpeg_quality=75)
        assert encoded.num_frames == int(row["decoded_frames"]), row["path"]
        assert encoded.header_frames == int(row["header_frames"]), row["path"]
        assert (encoded.source_height, encoded.source_width) == (
            int(row["height"]),
            int(row["width"]),
        )
        assert encoded.fps == pytest.approx(float(row["fps"]), abs=0.01)
        first = video.decode_jpeg(encoded.frames[0])
        assert first.shape == (64, 85, 3) and first.dtype == np.uint8
        # Resizing keeps the picture: the first frame's mean colour matches the manifest's.
        assert first.mean() == pytest.approx(float(row["first_frame_rgb_mean"]), abs=3.0)


def test_default_size_is_128x171(shared_data: Path) -> None:
    path = shared_data / "samples" / "hmdb51" / "wave" / "TrumanShow_wave_f_nm_np1_fr_med_26.avi"
    frames = list(video.iter_frames(path))
    assert len(frames) == 48 and frames[0].shape == (240, 432, 3)
    encoded = video.encode_video(path)
    assert video.decode_jpeg(encoded.frames[-1]).shape == (128, 171, 3)


@pytest.mark.parametrize("kind", ["missing", "empty", "garbage", "truncated", "header_only"])
def test_bad_files_raise_video_decode_error(shared_data: Path, tmp_path: Path, kind: str) -> None:
    source = (
        shared_data / "samples" / "ucf101" / "SoccerJuggling" / "v_SoccerJuggling_g23_c01.avi"
    ).read_bytes()
    path = tmp_path / "bad.avi"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(50_000))
    elif kind == "truncated":
        path.write_bytes(source[: len(source) // 2])
    elif kind == "header_only":
        path.write_bytes(source[:5000])
    with pytest.raises(video.VideoDecodeError, match="bad.avi"):
        video.encode_video(path, height=32, width=43)


def test_unknown_resize_method() -> None:
    with pytest.raises(ValueError, match="resize_method"):
        video.encode_video("x.avi", resize_method="nearest-ish")
