"""Video decoding for the dataset builders: PyAV decode, OpenCV resize, JPEG encode.

Frames are streamed (decode -> resize -> encode one at a time), so a long video never sits in
memory at full resolution. The real-data pitfalls of UCF101/HMDB51 (docs/method.md §6) are handled
here: non-UTF-8 stream titles, audio streams, wrong header frame counts, varying sizes and rates.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import av
import cv2
import numpy as np
import simplejpeg

RESIZE_METHODS = {
    "area": cv2.INTER_AREA,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
}

# DivX files with packed B-frames announce one frame more than they decode (docs/method.md
# §6); a file that decodes noticeably fewer frames than its header announces was cut short.
_HEADER_SLACK_FRAMES = 2


class VideoDecodeError(RuntimeError):
    """A video is missing, empty, truncated or cannot be decoded."""


@dataclasses.dataclass(frozen=True)
class EncodedVideo:
    """A video's frames as JPEG bytes, resized, plus facts about the source."""

    frames: list[bytes]
    fps: float
    source_height: int
    source_width: int
    header_frames: int

    @property
    def num_frames(self) -> int:
        return len(self.frames)


def _open(path: Path) -> av.container.InputContainer:
    if not path.is_file():
        raise VideoDecodeError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise VideoDecodeError(f"{path}: empty file")
    try:
        # Many HMDB51 files carry a non-UTF-8 stream title that PyAV cannot decode by default.
        return av.open(str(path), metadata_errors="ignore")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise VideoDecodeError(f"{path}: cannot open ({e})") from None


def iter_frames(path: Path | str) -> Iterator[np.ndarray]:
    """Yields every decoded frame of the first video stream as RGB uint8 (H, W, 3).

    Raises `VideoDecodeError` for a missing/empty/undecodable file. Audio streams are ignored.
    """
    path = Path(path)
    container = _open(path)
    with container:
        if not container.streams.video:
            raise VideoDecodeError(f"{path}: no video stream")
        stream = container.streams.video[0]
        # One thread per decoder: the builder runs one process per core already.
        stream.thread_type = "SLICE"
        try:
            for frame in container.decode(stream):
                yield frame.to_ndarray(format="rgb24")
        except (av.FFmpegError, ValueError) as e:
            raise VideoDecodeError(f"{path}: decoding failed ({e})") from None


def probe(path: Path | str) -> tuple[float, int]:
    """(fps, header frame count) of the first video stream; 0 frames when the header has none."""
    path = Path(path)
    with _open(path) as container:
        if not container.streams.video:
            raise VideoDecodeError(f"{path}: no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        return float(rate) if rate else 0.0, int(stream.frames or 0)


def encode_video(
    path: Path | str,
    *,
    height: int = 128,
    width: int = 171,
    jpeg_quality: int = 90,
    resize_method: str = "area",
) -> EncodedVideo:
    """Decodes `path`, resizes every frame to (height, width) and JPEG-encodes it (4:2:0).

    Raises `VideoDecodeError` when the file is missing, empty, undecodable, has no frames, or was
    truncated (decodes clearly fewer frames than its header announces).
    """
    if resize_method not in RESIZE_METHODS:
        raise ValueError(
            f"resize_method must be one of {sorted(RESIZE_METHODS)}, got {resize_method!r}"
        )
    path = Path(path)
    fps, header_frames = probe(path)
    interpolation = RESIZE_METHODS[resize_method]
    frames: list[bytes] = []
    source_hw = (0, 0)
    for rgb in iter_frames(path):
        source_hw = rgb.shape[:2]
        if source_hw != (height, width):
            rgb = cv2.resize(rgb, (width, height), interpolation=interpolation)
        frames.append(
            simplejpeg.encode_jpeg(
                np.ascontiguousarray(rgb), quality=jpeg_quality, colorspace="RGB",
                colorsubsampling="420",
            )
        )
    if not frames:
        raise VideoDecodeError(f"{path}: no frames decoded")
    if header_frames and len(frames) < header_frames - _HEADER_SLACK_FRAMES:
        raise VideoDecodeError(
            f"{path}: truncated (decoded {len(frames)} of {header_frames} frames in the header)"
        )
    return EncodedVideo(
        frames=frames,
        fps=fps,
        source_height=int(source_hw[0]),
        source_width=int(source_hw[1]),
        header_frames=header_frames,
    )


def decode_jpeg(data: bytes) -> np.ndarray:
    """One JPEG frame to RGB uint8 (H, W, 3)."""
    return simplejpeg.decode_jpeg(data, colorspace="RGB")


def limit_threads() -> None:
    """Keeps a worker process to one core: OpenCV would otherwise start a thread per core."""
    cv2.setNumThreads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
