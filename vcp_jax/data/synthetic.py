"""Synthetic motion dataset, written as real Xvid ``.avi`` files in the UCF101 / HMDB51 layouts.

Each class is a *motion pattern* (translation, rotation, zoom, oscillation, orbit) of one to three
randomly textured objects over a random textured background. Everything a single frame shows
(background, textures, colours, shapes, sizes, positions, orientations) is drawn from the same
distribution for every class, so a model can only tell the classes apart by looking at how frames
change over time. That is what makes this dataset a fair test bed for temporal self-supervised
pretraining (VCP) before the real UCF101 / HMDB51 are at hand.

The scene lives on a torus: objects that leave the frame on one side come back on the other. Besides
keeping every motion going forever without changing its direction (a bounce would turn "move right"
into "move left"), this makes object positions uniform over the frame at every time step, whatever
the class.

Command line::

    python -m vcp_jax.data.synthetic --layout=ucf101 --out=/tmp/synth_ucf101
    python -m vcp_jax.data.synthetic --layout=hmdb51 --out=/tmp/synth_hmdb51 --num_classes=24

Python::

    info = generate("/tmp/synth", layout="ucf101", num_classes=4, videos_per_class=6,
                    num_frames=40, height=32, width=48, seed=0)
    info.videos_dir, info.splits_dir, info.class_names, info.num_videos

Output layouts (the official ones, split files byte-compatible with the real ones):

- ``ucf101``: ``OUT/UCF101/<Class>/v_<Class>_gXX_cYY.avi`` and ``OUT/ucfTrainTestlist/`` with
  ``classInd.txt``, ``trainlist0{1,2,3}.txt``, ``testlist0{1,2,3}.txt`` (CRLF). Videos are spread
  over groups g01..g25; fold k tests on groups 1-7, 8-14, 15-21 as in the official splits.
- ``hmdb51``: ``OUT/hmdb51_org/<class>/<name>.avi`` and ``OUT/testTrainMulti_7030_splits/``
  with ``<class>_test_split{1,2,3}.txt`` lines ``name.avi N `` (LF, trailing space; 1 train,
  2 test, 0 unused). Some names carry the characters real HMDB names have (``!`` ``[`` ``]`` ``(``
  ``)`` ``&`` ``'`` ``;`` ``#``).

A ``OUT/synthetic.json`` marker records the parameters; rerunning with the same parameters skips the
work, rerunning with different ones is an error rather than a silent mix of two datasets.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import json
import math
import multiprocessing
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

# Bump when the rendered content or the layout changes, so stale datasets are not reused.
FORMAT_VERSION = 1
MARKER_NAME = "synthetic.json"
LAYOUTS = ("ucf101", "hmdb51")

# Official folder names of the two layouts: (videos folder, splits folder).
_FOLDERS = {
    "ucf101": ("UCF101", "ucfTrainTestlist"),
    "hmdb51": ("hmdb51_org", "testTrainMulti_7030_splits"),
}

# UCF101 has 25 groups per class; official fold k (1-based) tests on groups 7(k-1)+1 .. 7k.
_UCF_GROUPS = 25
_UCF_TEST_GROUPS = {1: range(1, 8), 2: range(8, 15), 3: range(15, 22)}
_NUM_FOLDS = 3

MIN_VIDEOS_PER_CLASS = 4  # Smallest count that gives every class train and test videos per fold.
MAX_VIDEOS_PER_CLASS = _UCF_GROUPS * 99  # File names have two-digit clip numbers cYY.
MIN_FRAMES = 16  # One clip.
MIN_SIZE = 16

# Apparent object size is ``base * z`` with ``z`` log-uniform in [_Z_LO, _Z_HI] for every class;
# zoom classes sweep ``z`` over that same range, so object size in a still never gives zoom away.
_Z_LO, _Z_HI = 0.6, 1.6


# --------------------------------------------------------------------------------------------
# Motion classes
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Motion:
    """One motion class.

    Attributes:
      name: UCF-style CamelCase class name (``MoveRight``); ``hmdb_name`` gives ``move_right``.
      kind: ``translate``, ``rotate``, ``zoom``, ``oscillate`` or ``orbit``.
      direction: unit vector ``(x, y)`` in image coordinates (y points down) for ``translate``
        and ``oscillate``.
      sign: +1 clockwise / zoom in, -1 anticlockwise / zoom out (``rotate``, ``orbit``, ``zoom``).
      fast: for ``translate``, the fast speed range instead of the normal one.
    """

    name: str
    kind: str
    direction: tuple[float, float] = (0.0, 0.0)
    sign: int = 1
    fast: bool = False

    @property
    def hmdb_name(self) -> str:
        """HMDB-style lowercase_with_underscores name."""
        return re.sub(r"(?<!^)(?=[A-Z])", "_", self.name).lower()


_S = 1.0 / math.sqrt(2.0)
_DIRECTIONS = {  # Image coordinates: x right, y down.
    "Right": (1.0, 0.0),
    "Left": (-1.0, 0.0),
    "Up": (0.0, -1.0),
    "Down": (0.0, 1.0),
    "UpRight": (_S, -_S),
    "UpLeft": (-_S, -_S),
    "DownRight": (_S, _S),
    "DownLeft": (-_S, _S),
}


def _motions() -> tuple[Motion, ...]:
    # Order matters: the first ``num_classes`` are used. The first 10 (the default) pair every
    # motion with its time reverse or its rotated twin, so neither a still frame nor a motion
    # energy statistic separates them; only the direction of change over time does.
    d = _DIRECTIONS
    out = [
        Motion("MoveRight", "translate", d["Right"]),
        Motion("MoveLeft", "translate", d["Left"]),
        Motion("MoveUp", "translate", d["Up"]),
        Motion("MoveDown", "translate", d["Down"]),
        Motion("RotateClockwise", "rotate", sign=1),
        Motion("RotateAnticlockwise", "rotate", sign=-1),
        Motion("ZoomIn", "zoom", sign=1),
        Motion("ZoomOut", "zoom", sign=-1),
        Motion("OscillateHorizontal", "oscillate", d["Right"]),
        Motion("OscillateVertical", "oscillate", d["Down"]),
        Motion("MoveUpRight", "translate", d["UpRight"]),
        Motion("MoveUpLeft", "translate", d["UpLeft"]),
        Motion("MoveDownRight", "translate", d["DownRight"]),
        Motion("MoveDownLeft", "translate", d["DownLeft"]),
        Motion("OrbitClockwise", "orbit", sign=1),
        Motion("OrbitAnticlockwise", "orbit", sign=-1),
    ]
    out += [Motion(f"Move{k}Fast", "translate", v, fast=True) for k, v in d.items()]
    out += [
        Motion("OscillateDiagonal", "oscillate", d["UpRight"]),
        Motion("OscillateAntidiagonal", "oscillate", d["DownRight"]),
    ]
    return tuple(out)


MOTIONS: tuple[Motion, ...] = _motions()
MAX_CLASSES = len(MOTIONS)


def select_motions(num_classes: int, classes: Sequence[str] | None = None) -> tuple[Motion, ...]:
    """The motions of a dataset: ``classes`` by (UCF-style) name, else the first ``num_classes``."""
    if not classes:
        return MOTIONS[:num_classes]
    by_name = {m.name: m for m in MOTIONS}
    unknown = [c for c in classes if c not in by_name]
    if unknown:
        raise ValueError(f"unknown classes {unknown}; choose from {', '.join(by_name)}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes must be distinct, got {list(classes)}")
    return tuple(by_name[c] for c in classes)


def class_names(
    layout: str, num_classes: int, classes: Sequence[str] | None = None
) -> tuple[str, ...]:
    """The dataset's class names (see `select_motions`), spelled as ``layout`` spells them."""
    _check_layout(layout)
    motions = select_motions(num_classes, classes)
    return tuple(m.name if layout == "ucf101" else m.hmdb_name for m in motions)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Object:
    """A textured sprite and its state at t=0 (all drawn class-independently)."""

    sprite: np.ndarray  # (D, D, 4) float32: premultiplied RGB in [0, 255], alpha in [0, 1].
    base: float  # Apparent diameter in pixels at z = 1 (the sprite holds it at z = _Z_HI).
    center: np.ndarray  # (2,) float, (x, y) on the W x H torus.
    angle: float  # Degrees, OpenCV convention (positive = anticlockwise on screen).
    log_z: float  # In [log _Z_LO, log _Z_HI].
    phase: float  # In [0, 1), for periodic motions.


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: tuple[int, int]) -> np.ndarray:
    """(h, w, 3) float32 colour noise in [0, 1], smooth at the scale of ``cells`` grid cells."""
    low = rng.random((cells[0], cells[1], 3), dtype=np.float32)
    return np.clip(cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC), 0.0, 1.0)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A random static background, (h, w, 3) float32 in [0, 255]: colour blobs plus finer grain."""
    base = rng.uniform(40.0, 215.0, size=3).astype(np.float32)
    coarse = _smooth_noise(rng, h, w, (int(rng.integers(2, 5)), int(rng.integers(2, 6))))
    fine = _smooth_noise(rng, h, w, (max(2, h // 6), max(2, w // 6)))
    bg = base + rng.uniform(40.0, 110.0) * (coarse - 0.5) + rng.uniform(10.0, 40.0) * (fine - 0.5)
    return np.clip(bg, 0.0, 255.0).astype(np.float32)


def _sprite(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random textured shape, (size, size, 4) float32 premultiplied RGBA.

    The texture has no symmetry (stripes at a random angle plus colour blobs), so rotation shows.
    """
    d = size
    r = (d - 2) / 2.0
    c = (d - 1) / 2.0
    # Draw the mask 4x larger and shrink it: smooth (anti-aliased) edges at any sprite size.
    ss = 4
    big = np.zeros((d * ss, d * ss), np.uint8)
    cb, rb = c * ss + (ss - 1) / 2.0, r * ss
    shape = int(rng.integers(4))
    if shape == 0:  # Disc.
        cv2.circle(big, (round(cb), round(cb)), round(rb), 255, -1, cv2.LINE_AA)
    elif shape == 1:  # Square.
        half = rb * rng.uniform(0.6, 0.7)
        p0, p1 = round(cb - half), round(cb + half)
        cv2.rectangle(big, (p0, p0), (p1, p1), 255, -1, cv2.LINE_AA)
    elif shape == 2:  # Ellipse.
        axes = (round(rb), round(rb * rng.uniform(0.45, 0.8)))
        cv2.ellipse(big, (round(cb), round(cb)), axes, 0.0, 0.0, 360.0, 255, -1, cv2.LINE_AA)
    else:  # Irregular blob: a star-ish polygon with random radii.
        n = int(rng.integers(5, 10))
        theta = np.sort(rng.uniform(0.0, 2 * np.pi, n))
        rad = rb * rng.uniform(0.55, 1.0, n)
        pts = np.stack([cb + rad * np.cos(theta), cb + rad * np.sin(theta)], -1)
        cv2.fillPoly(big, [np.round(pts).astype(np.int32)], 255, cv2.LINE_AA)
    alpha = cv2.resize(big, (d, d), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0

    yy, xx = np.mgrid[0:d, 0:d].astype(np.float32)
    ang = rng.uniform(0.0, np.pi)
    period = rng.uniform(0.25, 0.6) * d
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(ang) + yy * np.sin(ang)) / period)
    c1, c2 = rng.uniform(0.0, 255.0, (2, 3)).astype(np.float32)
    blobs = _smooth_noise(rng, d, d, (3, 3))
    rgb = c1 + (c2 - c1) * stripes[..., None]
    rgb = np.clip(rgb + 120.0 * (blobs - 0.5), 0.0, 255.0)
    # A contrasting rim keeps the object visible on a background of similar colour.
    rim = alpha - cv2.erode(alpha, np.ones((3, 3), np.uint8))
    rim_colour = rng.uniform(0.0, 50.0) if rng.random() < 0.5 else rng.uniform(205.0, 255.0)
    rgb = rgb * (1.0 - rim[..., None]) + rim_colour * rim[..., None]
    return np.concatenate([rgb * alpha[..., None], alpha[..., None]], -1).astype(np.float32)


def _sample_scene(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, list[_Object]]:
    """Background and objects; the draw does not depend on the class at all."""
    bg = _background(rng, h, w)
    objects = []
    for _ in range(int(rng.integers(2, 5))):
        base = rng.uniform(0.2, 0.3) * min(h, w)
        # Native resolution is the largest apparent size, so the sprite is only ever shrunk.
        d = max(8, math.ceil(base * _Z_HI) + 2)
        objects.append(
            _Object(
                sprite=_sprite(rng, d),
                base=base,
                center=rng.uniform(0.0, 1.0, 2) * np.array([w, h]),
                angle=float(rng.uniform(0.0, 360.0)),
                log_z=float(rng.uniform(math.log(_Z_LO), math.log(_Z_HI))),
                phase=float(rng.random()),
            )
        )
    return bg, objects


APPEARANCES = ("varied", "shared")
_SHARED_OBJECT_SIZE = 0.3  # apparent diameter of a shared-world object, fraction of the frame


@functools.lru_cache(maxsize=8)
def _shared_world(world_seed: int, h: int, w: int, texture_pool: int) -> tuple[np.ndarray, tuple]:
    """The ``shared`` appearance: one plain background colour and ``texture_pool`` sprites.

    Drawn once per world seed, so every video of every dataset of that world (the unlabelled
    and the labelled one) shows the same background and the same few sprite textures: a scene
    then says nothing about its video or its class, and only the motion is left to learn.
    """
    rng = np.random.default_rng([0x574F524C, world_seed])  # "WORL"
    colour = rng.uniform(40.0, 215.0, size=3).astype(np.float32)
    bg = np.broadcast_to(colour, (h, w, 3)).astype(np.float32)
    base = _SHARED_OBJECT_SIZE * min(h, w)
    sprites = tuple(_sprite(rng, max(8, math.ceil(base) + 2)) for _ in range(texture_pool))
    return bg, sprites


def _shared_scene(
    rng: np.random.Generator, h: int, w: int, world_seed: int, texture_pool: int,
    num_objects: int,
) -> tuple[np.ndarray, list[_Object]]:
    """A scene of the shared world: pooled textures at random positions and orientations."""
    bg, sprites = _shared_world(world_seed, h, w, texture_pool)
    objects = []
    for _ in range(num_objects):
        sprite = sprites[int(rng.integers(len(sprites)))]
        objects.append(_Object(
            sprite=sprite, base=float(sprite.shape[0] - 2),
            center=rng.uniform(0.0, 1.0, 2) * np.array([w, h]),
            angle=float(rng.uniform(0.0, 360.0)), log_z=0.0, phase=float(rng.random()),
        ))
    return bg.copy(), objects


def _paste(canvas: np.ndarray, sprite: np.ndarray, matrix: np.ndarray, extent: float) -> None:
    """Alpha-composites ``sprite`` warped by the 2x3 ``matrix`` onto ``canvas``, in place.

    Only the bounding box (half-size ``extent`` around the mapped sprite centre) is warped, which
    keeps the per-frame cost proportional to the object, not the frame.
    """
    h, w = canvas.shape[:2]
    d = sprite.shape[0]
    c = (d - 1) / 2.0
    cx = matrix[0, 0] * c + matrix[0, 1] * c + matrix[0, 2]
    cy = matrix[1, 0] * c + matrix[1, 1] * c + matrix[1, 2]
    x0, x1 = max(0, math.floor(cx - extent)), min(w, math.ceil(cx + extent) + 1)
    y0, y1 = max(0, math.floor(cy - extent)), min(h, math.ceil(cy + extent) + 1)
    if x0 >= x1 or y0 >= y1:
        return
    m = matrix.copy()
    m[0, 2] -= x0
    m[1, 2] -= y0
    warped = cv2.warpAffine(
        sprite,
        m,
        (x1 - x0, y1 - y0),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(0.0, 0.0, 0.0, 0.0),
    )
    # "over" compositing with premultiplied colour: out = roi * (1 - a) + rgb. OpenCV
    # arithmetic, because numpy broadcasting costs ~10x more on these small arrays.
    inv_alpha = cv2.cvtColor(1.0 - warped[..., 3], cv2.COLOR_GRAY2RGB)
    out = cv2.multiply(canvas[y0:y1, x0:x1], inv_alpha)
    cv2.add(out, cv2.cvtColor(warped, cv2.COLOR_RGBA2RGB), dst=out)
    canvas[y0:y1, x0:x1] = out


def _motion_params(motion: Motion, rng: np.random.Generator, h: int, w: int) -> dict[str, float]:
    """Per-video speed / period / amplitude, in pixels and frames scaled to the frame size."""
    s = min(h, w)
    if motion.kind == "translate":
        frac = rng.uniform(0.035, 0.05) if motion.fast else rng.uniform(0.010, 0.018)
        return {"speed": frac * s}
    if motion.kind == "rotate":
        return {"deg_per_frame": rng.uniform(3.0, 6.0)}
    if motion.kind == "zoom":
        return {"period": rng.uniform(40.0, 70.0)}  # Frames for one sweep from _Z_LO to _Z_HI.
    if motion.kind == "oscillate":
        return {"amplitude": rng.uniform(0.15, 0.25) * s, "period": rng.uniform(16.0, 32.0)}
    if motion.kind == "orbit":
        return {"radius": rng.uniform(0.12, 0.2) * s, "period": rng.uniform(30.0, 60.0)}
    raise ValueError(f"unknown motion kind {motion.kind!r}")


def render_video(
    motion: Motion | int,
    *,
    num_frames: int,
    height: int,
    width: int,
    seed: int,
    video_index: int,
    camera_pan: float = 0.0,
    top_light: float = 0.0,
    appearance: str = "varied",
    world_seed: int = 0,
    texture_pool: int = 1,
    num_objects: int = 3,
) -> np.ndarray:
    """Renders one video, ``(num_frames, height, width, 3)`` uint8 RGB, before encoding.

    The appearance (scene) is drawn from one RNG stream and the motion parameters from another,
    both seeded from ``(seed, class index, video_index)``; the scene draw never looks at the class.
    ``camera_pan`` > 0 adds a camera pan, the same for every class: the whole scene drifts in a
    random direction at up to ``camera_pan`` of the frame size per frame (class motion is then
    relative to the background, as in hand-held footage). ``top_light`` > 0 lights the frame
    from above, up to that many grey levels brighter at the top than at the bottom (fixed to the
    camera, like sky over ground): scenes then have an up and a down, as real footage does.
    ``appearance='shared'`` draws the scene from a world shared by every video (one plain
    background colour, ``texture_pool`` sprite textures, ``num_objects`` objects of one size,
    all from ``world_seed``) instead of a new background and new textures per video.
    """
    idx = MOTIONS.index(motion) if isinstance(motion, Motion) else int(motion)
    motion = MOTIONS[idx]
    scene_ss, motion_ss = np.random.SeedSequence([seed, idx, video_index]).spawn(2)
    if appearance == "shared":
        bg, objects = _shared_scene(np.random.default_rng(scene_ss), height, width, world_seed,
                                    texture_pool, num_objects)
    else:
        bg, objects = _sample_scene(np.random.default_rng(scene_ss), height, width)
    mrng = np.random.default_rng(motion_ss)
    params = _motion_params(motion, mrng, height, width)
    # Small per-object speed jitter, so several objects do not move as one rigid block.
    jitter = mrng.uniform(0.85, 1.15, len(objects))
    # The camera's own stream, so the scene and motion draws stay as they are without it.
    prng = np.random.default_rng(np.random.SeedSequence([seed, idx, video_index, 2]))
    pan = np.zeros(2)
    if camera_pan > 0:
        theta = prng.uniform(0.0, 2 * np.pi)
        speed = prng.uniform(0.5, 1.0) * camera_pan * min(height, width)
        pan = speed * np.array([math.cos(theta), math.sin(theta)])
    light = None
    if top_light > 0:
        amplitude = prng.uniform(0.5, 1.0) * top_light
        light = amplitude * (0.5 - np.linspace(0.0, 1.0, height, dtype=np.float32))[:, None, None]
    return _render(motion, params, jitter, bg, objects, num_frames, pan, light)


def _object_state(
    motion: Motion, params: dict[str, float], obj: _Object, jit: float, t: int
) -> tuple[np.ndarray, float, float]:
    """Centre ``(x, y)`` (not yet wrapped), angle (degrees) and zoom ``z`` of ``obj`` at frame t."""
    center, angle, log_z = obj.center.astype(np.float64), obj.angle, obj.log_z
    kind = motion.kind
    if kind == "translate":
        center = center + np.array(motion.direction) * params["speed"] * jit * t
    elif kind == "rotate":
        # OpenCV angles are anticlockwise on screen, so clockwise means decreasing.
        angle = angle - motion.sign * params["deg_per_frame"] * jit * t
    elif kind == "zoom":
        # Sawtooth in log scale: a steady zoom that restarts at the other end of the range.
        # With the random start, log z stays uniform at every frame, as for the other classes.
        log_lo, log_span = math.log(_Z_LO), math.log(_Z_HI / _Z_LO)
        u = (log_z - log_lo) / log_span + motion.sign * jit * t / params["period"]
        log_z = log_lo + (u % 1.0) * log_span
    elif kind == "oscillate":
        arg = 2 * np.pi * (obj.phase + jit * t / params["period"])
        center = center + np.array(motion.direction) * params["amplitude"] * math.sin(arg)
    elif kind == "orbit":
        # Screen y points down, so an increasing angle runs clockwise on screen.
        arg = 2 * np.pi * (obj.phase + motion.sign * jit * t / params["period"])
        center = center + params["radius"] * np.array([math.cos(arg), math.sin(arg)])
    return center, angle, math.exp(log_z)


def _render(
    motion: Motion,
    params: dict[str, float],
    jitter: np.ndarray,
    bg: np.ndarray,
    objects: Sequence[_Object],
    num_frames: int,
    pan: np.ndarray | None = None,
    light: np.ndarray | None = None,
) -> np.ndarray:
    """Draws ``objects`` (in order, later ones on top) over ``bg`` for ``num_frames`` frames.

    ``pan`` (pixels per frame, x and y) shifts the whole scene, wrapping around the frame edges;
    ``light`` ((h, 1, 1) grey levels) is added to every frame, fixed to the camera.
    """
    h, w = bg.shape[:2]
    torus = np.array([w, h], np.float64)
    frames = np.empty((num_frames, h, w, 3), np.uint8)
    canvas = np.empty_like(bg)
    panning = pan is not None and bool(np.any(pan))
    for t in range(num_frames):
        shift = pan * t if panning else np.zeros(2)
        if panning:
            matrix = np.array([[1.0, 0.0, shift[0]], [0.0, 1.0, shift[1]]])
            cv2.warpAffine(bg, matrix, (w, h), dst=canvas, flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_WRAP)
        else:
            np.copyto(canvas, bg)
        for obj, jit in zip(objects, jitter, strict=True):
            center, angle, z = _object_state(motion, params, obj, float(jit), t)
            _paste_wrapped(canvas, obj, (center + shift) % torus, angle, z, torus)
        if light is not None:
            canvas += light
        np.clip(canvas, 0.0, 255.0, out=canvas)
        frames[t] = (canvas + 0.5).astype(np.uint8)
    return frames


def _paste_wrapped(
    canvas: np.ndarray,
    obj: _Object,
    center: np.ndarray,
    angle: float,
    z: float,
    torus: np.ndarray,
) -> None:
    """Draws ``obj`` at ``center`` and at its torus images that reach into the frame."""
    d = obj.sprite.shape[0]
    scale = obj.base * z / (d - 2)  # Sprite is the shape plus a 1 px empty border on each side.
    c = (d - 1) / 2.0
    extent = scale * d / math.sqrt(2.0) + 1.0  # Half-diagonal of the rotated sprite.
    w, h = torus
    for dx in (-w, 0.0, w):
        x = center[0] + dx
        if x + extent < 0 or x - extent > w:
            continue
        for dy in (-h, 0.0, h):
            y = center[1] + dy
            if y + extent < 0 or y - extent > h:
                continue
            m = cv2.getRotationMatrix2D((c, c), angle, scale)
            m[0, 2] += x - c
            m[1, 2] += y - c
            _paste(canvas, obj.sprite, m, extent)


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float) -> None:
    """Encodes ``(T, H, W, 3)`` uint8 RGB frames as MPEG-4 Part 2 with fourcc XVID in AVI."""
    t, h, w, _ = frames.shape
    with av.open(str(path), mode="w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=Fraction(str(fps)))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.codec_tag = "XVID"
        # One thread: frame-level output must not depend on thread scheduling (determinism).
        stream.codec_context.thread_count = 1
        # About 2 bits per pixel per frame: well above what Xvid needs for this smooth content,
        # so compression does not smear the motion (the encoder's q floor caps the real size).
        stream.bit_rate = int(2 * w * h * fps)
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_one(job: tuple[str, int, dict]) -> None:
    """Process-pool task: render and encode one video (path, motion index, render_video kwargs)."""
    path, motion_idx, kwargs = job
    cv2.setNumThreads(1)  # The pool already uses every core.
    kwargs = dict(kwargs)
    fps = kwargs.pop("fps")
    write_video(path, render_video(motion_idx, **kwargs), fps)


# --------------------------------------------------------------------------------------------
# Layouts and split files
# --------------------------------------------------------------------------------------------


def ucf_group_clip(videos_per_class: int) -> list[tuple[int, int]]:
    """(group, clip) for each video index of a class, both 1-based.

    Videos are spread evenly over the 25 groups (not round-robin), so each official test range
    (groups 1-7, 8-14, 15-21) gets a share of the videos even for small classes.
    """
    out, count = [], {}
    for i in range(videos_per_class):
        g = 1 + (i * _UCF_GROUPS) // videos_per_class
        count[g] = count.get(g, 0) + 1
        out.append((g, count[g]))
    return out


# Sources ("movies") of the HMDB-style names; every third one has the awkward characters real
# HMDB names have, so consecutive videos (two per source) hit one at least every 6 videos.
_HMDB_SOURCES = (
    "Hello!!!_Synthetic_World",
    "SynthMovie",
    "Random_Shapes_2",
    "(HQ)_Spinning_Things_[_NEW_]",
    "BlobFilms",
    "TexturedDiscs",
    "Tom_&_Jerry's_Moving_Shapes",
    "MotionStudy_07",
    "cartoon_loop",
    "#12_Moving;_Parts_(part_2)",
    "ZoomAndSpin",
    "Bounce_Physics",
)


def hmdb_video_names(class_idx: int, class_name: str, videos_per_class: int) -> list[str]:
    """HMDB-style file names ``<Source>_<class>_<f|h|u>_<cm|nm>_np1_<view>_<quality>_<k>.avi``.

    Deterministic, independent of the seed (like the official split files, names do not change
    between datasets).
    """
    rng = np.random.default_rng([0x484D4442, class_idx])  # "HMDB"
    names, count = [], {}
    for i in range(videos_per_class):
        src = _HMDB_SOURCES[(class_idx + i // 2) % len(_HMDB_SOURCES)]
        k = count.get(src, 0)
        count[src] = k + 1
        body = ("f", "h", "u")[rng.integers(3)]
        cam = ("cm", "nm")[rng.integers(2)]
        view = ("fr", "ba", "le", "ri")[rng.integers(4)]
        quality = ("goo", "med", "bad")[rng.integers(3)]
        names.append(f"{src}_{class_name}_{body}_{cam}_np1_{view}_{quality}_{k}.avi")
    return names


def hmdb_split_labels(class_idx: int, videos_per_class: int) -> list[list[int]]:
    """Per fold (3), per video: 1 train, 2 test, 0 unused.

    About 1/6 of the videos are unused and 30 % of the rest test, as in the official 70/30 splits.
    The test sets of the folds are consecutive windows of one random permutation, so they differ
    (and are disjoint whenever three of them fit).
    """
    n = videos_per_class
    n_unused = n // 6
    n_test = max(1, round(0.3 * (n - n_unused)))
    perm = np.random.default_rng([0x7030, class_idx]).permutation(n)
    folds = []
    for f in range(_NUM_FOLDS):
        rolled = np.roll(perm, -f * n_test)
        labels = [1] * n
        for j in rolled[:n_test]:
            labels[j] = 2
        for j in rolled[n_test : n_test + n_unused]:
            labels[j] = 0
        folds.append(labels)
    return folds


def _write_lines(path: Path, lines: Sequence[str], newline: str) -> None:
    # Binary write: the exact line endings of the official files, whatever the platform.
    path.write_bytes("".join(line + newline for line in lines).encode("utf-8"))


def _plan(
    layout: str, root: Path, num_classes: int, videos_per_class: int,
    classes: Sequence[str] | None = None,
) -> tuple[list[tuple[Path, int, int]], dict[str, list[str]]]:
    """Video jobs ``(path, class index, video index)`` and split files ``{filename: lines}``."""
    videos_dir, splits_dir = (root / f for f in _FOLDERS[layout])
    names = class_names(layout, num_classes, classes)
    jobs: list[tuple[Path, int, int]] = []
    splits: dict[str, list[str]] = {}
    if layout == "ucf101":
        gc = ucf_group_clip(videos_per_class)
        splits["classInd.txt"] = [f"{c + 1} {name}" for c, name in enumerate(names)]
        per_fold = {k: ([], []) for k in _UCF_TEST_GROUPS}
        for c, name in enumerate(names):
            for i, (g, clip) in enumerate(gc):
                rel = f"{name}/v_{name}_g{g:02d}_c{clip:02d}.avi"
                jobs.append((videos_dir / rel, c, i))
                for k, test_groups in _UCF_TEST_GROUPS.items():
                    train, test = per_fold[k]
                    if g in test_groups:
                        test.append(rel)
                    else:
                        train.append(f"{rel} {c + 1}")
        for k, (train, test) in per_fold.items():
            splits[f"trainlist{k:02d}.txt"] = train
            splits[f"testlist{k:02d}.txt"] = test
    else:
        for c, name in enumerate(names):
            vids = hmdb_video_names(c, name, videos_per_class)
            jobs += [(videos_dir / name / v, c, i) for i, v in enumerate(vids)]
            for f, labels in enumerate(hmdb_split_labels(c, videos_per_class)):
                # Official files list names in byte order, each line with a trailing space.
                pairs = sorted(zip(vids, labels, strict=True))
                lines = [f"{v} {lab} " for v, lab in pairs]
                splits[f"{name}_test_split{f + 1}.txt"] = lines
    return jobs, splits


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SyntheticDataset:
    """Where a generated dataset lives.

    Attributes:
      root: the output folder given to ``generate``.
      layout: ``ucf101`` or ``hmdb51``.
      videos_dir: ``root/UCF101`` or ``root/hmdb51_org`` (one sub-folder per class).
      splits_dir: ``root/ucfTrainTestlist`` or ``root/testTrainMulti_7030_splits``.
      class_names: in label order (UCF label k is ``class_names[k - 1]``).
      num_videos: number of ``.avi`` files.
      generated: False when an identical dataset was already there and nothing was written.
    """

    root: Path
    layout: str
    videos_dir: Path
    splits_dir: Path
    class_names: tuple[str, ...]
    num_videos: int
    generated: bool = True


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _validate(params: dict) -> None:
    _check_layout(params["layout"])
    n = params["num_classes"]
    if params.get("classes"):
        select_motions(n, params["classes"])  # names checked; one class is allowed when named
    elif not 2 <= n <= MAX_CLASSES:
        raise ValueError(
            f"num_classes must be between 2 and {MAX_CLASSES} (the number of defined motion "
            f"classes: {', '.join(m.name for m in MOTIONS)}), got {n}"
        )
    v = params["videos_per_class"]
    if not MIN_VIDEOS_PER_CLASS <= v <= MAX_VIDEOS_PER_CLASS:
        raise ValueError(
            f"videos_per_class must be between {MIN_VIDEOS_PER_CLASS} (so every class has train "
            f"and test videos in each of the 3 folds) and {MAX_VIDEOS_PER_CLASS}, got {v}"
        )
    if params["num_frames"] < MIN_FRAMES:
        raise ValueError(
            f"num_frames must be >= {MIN_FRAMES} (one clip), got {params['num_frames']}"
        )
    for key in ("height", "width"):
        x = params[key]
        if x < MIN_SIZE or x % 2:
            raise ValueError(f"{key} must be even and >= {MIN_SIZE} (yuv420p), got {x}")
    if params["seed"] < 0:
        raise ValueError(f"seed must be >= 0, got {params['seed']}")
    if not params["fps"] > 0:
        raise ValueError(f"fps must be > 0, got {params['fps']}")
    if not 0 <= params.get("camera_pan", 0.0) <= 0.1:
        raise ValueError(f"camera_pan must be in [0, 0.1], got {params['camera_pan']}")
    if not 0 <= params.get("top_light", 0.0) <= 255:
        raise ValueError(f"top_light must be in [0, 255], got {params['top_light']}")
    if params.get("appearance", "varied") not in APPEARANCES:
        raise ValueError(f"appearance must be one of {APPEARANCES}, got {params['appearance']!r}")
    for key in ("texture_pool", "num_objects"):
        if key in params and not 1 <= params[key] <= 16:
            raise ValueError(f"{key} must be in [1, 16], got {params[key]}")


class ParamsMismatchError(ValueError):
    """``out_dir`` holds a synthetic dataset generated with other parameters (``old``, ``new``)."""

    def __init__(self, message: str, old: dict, new: dict):
        super().__init__(message)
        self.old, self.new = old, new


def remove(out_dir: str | os.PathLike) -> None:
    """Deletes a dataset that ``generate`` wrote in ``out_dir``: its videos, splits and marker.

    Only what the marker proves the generator wrote (the layout's two folders); anything else in
    ``out_dir`` stays. Raises ValueError when ``out_dir`` holds no marker.
    """
    root = Path(out_dir)
    marker = _read_marker(root)
    if marker is None or marker.get("generator") != "vcp_jax.data.synthetic":
        raise ValueError(f"{root / MARKER_NAME} is missing: refusing to delete data in {root} "
                         "that the generator did not write")
    layout = marker.get("params", {}).get("layout")
    _check_layout(layout)
    for name in _FOLDERS[layout]:
        shutil.rmtree(root / name, ignore_errors=True)
    # The marker last: an interrupted removal still leaves the folder marked as the generator's.
    (root / MARKER_NAME).unlink()


def _read_marker(root: Path) -> dict | None:
    path = root / MARKER_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _write_marker(root: Path, params: dict, complete: bool, num_videos: int) -> None:
    marker = {
        "generator": "vcp_jax.data.synthetic",
        "params": params,
        "complete": complete,
        "num_videos": num_videos,
    }
    tmp = root / (MARKER_NAME + ".tmp")
    tmp.write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, root / MARKER_NAME)  # Atomic: a marker is either old or new, never torn.


def generate(
    out_dir: str | os.PathLike,
    *,
    layout: str = "ucf101",
    num_classes: int = 10,
    videos_per_class: int = 12,
    num_frames: int = 150,
    height: int = 120,
    width: int = 160,
    seed: int = 0,
    fps: float = 25.0,
    camera_pan: float = 0.0,
    top_light: float = 0.0,
    classes: Sequence[str] | None = None,
    appearance: str = "varied",
    world_seed: int = 0,
    texture_pool: int = 1,
    num_objects: int = 3,
    workers: int | None = None,
) -> SyntheticDataset:
    """Writes the synthetic dataset under ``out_dir`` (see the module docstring for the layout).

    Args:
      out_dir: output folder; created if needed.
      layout: ``ucf101`` or ``hmdb51``.
      num_classes: first ``num_classes`` of ``MOTIONS`` (2 .. ``MAX_CLASSES``).
      videos_per_class: at least 4.
      num_frames: frames per video, at least 16 (the default 150 fits a 64-frame VCP tuple plus a
        remote clip 16 frames away).
      height, width: frame size, even.
      seed: the content (not the file names or splits) depends on it; same seed, same frames.
      fps: frame rate written in the container.
      camera_pan: largest camera pan, as a fraction of the frame size per frame (0: static
        camera); the pan's direction and speed are random per video, never tied to the class.
      top_light: largest top-to-bottom brightness difference in grey levels (0: none); random
        per video, never tied to the class.
      classes: class names from ``MOTIONS`` (UCF-style, e.g. ``("MoveDownFast",)``) instead of
        the first ``num_classes``; ``num_classes`` is then their number (one class is allowed:
        an unlabelled pretraining world whose objects all move one way).
      appearance: ``varied`` (a new background and new textures per video) or ``shared`` (one
        plain background and a pool of ``texture_pool`` textures for every video of the world
        ``world_seed``, ``num_objects`` objects per video; see ``render_video``).
      workers: processes for rendering/encoding; None = all cores, 1 = in this process.

    Returns:
      A ``SyntheticDataset``; ``generated`` is False if an identical dataset was already there.

    Raises:
      ValueError: invalid arguments, or ``out_dir`` holds a different dataset.
    """
    params = {
        "format_version": FORMAT_VERSION,
        "layout": layout,
        "num_classes": int(num_classes),
        "videos_per_class": int(videos_per_class),
        "num_frames": int(num_frames),
        "height": int(height),
        "width": int(width),
        "seed": int(seed),
        "fps": float(fps),
    }
    if camera_pan:  # recorded only when used, so markers of static-camera datasets stay valid
        params["camera_pan"] = float(camera_pan)
    if top_light:
        params["top_light"] = float(top_light)
    if classes:
        classes = tuple(str(c) for c in classes)
        params["classes"] = list(classes)
        params["num_classes"] = num_classes = len(classes)
    if appearance != "varied":  # recorded only when used, as above
        params.update(appearance=appearance, world_seed=int(world_seed),
                      texture_pool=int(texture_pool), num_objects=int(num_objects))
    _validate(params)
    root = Path(out_dir)
    videos_dir, splits_dir = (root / f for f in _FOLDERS[layout])
    jobs, splits = _plan(layout, root, num_classes, videos_per_class, classes)
    motion_index = [MOTIONS.index(m) for m in select_motions(num_classes, classes)]
    info = SyntheticDataset(
        root=root,
        layout=layout,
        videos_dir=videos_dir,
        splits_dir=splits_dir,
        class_names=class_names(layout, num_classes, classes),
        num_videos=len(jobs),
    )

    marker = _read_marker(root)
    if marker is not None:
        if marker.get("params") != params:
            raise ParamsMismatchError(
                f"{root} already holds a synthetic dataset with different parameters "
                f"({marker.get('params')}); requested {params}. Use another --out or delete it.",
                old=marker.get("params") or {}, new=params,
            )
        if marker.get("complete"):
            return dataclasses.replace(info, generated=False)
        # Same parameters but interrupted: regenerate over it (same file names, so no leftovers).
    else:
        for folder in (videos_dir, splits_dir):
            if folder.exists() and any(folder.iterdir()):
                # No marker: this could be a real dataset; never write into it.
                raise ValueError(
                    f"{folder} exists and is not empty, but {root / MARKER_NAME} is missing: "
                    "refusing to write a synthetic dataset over data it did not create"
                )

    root.mkdir(parents=True, exist_ok=True)
    _write_marker(root, params, complete=False, num_videos=len(jobs))
    for path in {p.parent for p, _, _ in jobs}:
        path.mkdir(parents=True, exist_ok=True)
    splits_dir.mkdir(parents=True, exist_ok=True)
    newline = "\r\n" if layout == "ucf101" else "\n"
    for name, lines in splits.items():
        _write_lines(splits_dir / name, lines, newline)

    render_args = dict(num_frames=num_frames, height=height, width=width, seed=seed,
                       fps=float(fps), camera_pan=float(camera_pan), top_light=float(top_light),
                       appearance=appearance, world_seed=int(world_seed),
                       texture_pool=int(texture_pool), num_objects=int(num_objects))
    tasks = [(str(p), motion_index[c], {**render_args, "video_index": i}) for p, c, i in jobs]
    n_workers = min(workers or os.cpu_count() or 1, len(tasks))
    if n_workers <= 1:
        for task in tasks:
            _write_one(task)
    else:
        # Spawn, not fork: the caller may already run JAX (threads), and fork would copy its locks.
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(n_workers, mp_context=ctx) as pool:
            list(pool.map(_write_one, tasks, chunksize=max(1, len(tasks) // (8 * n_workers))))

    _write_marker(root, params, complete=True, num_videos=len(jobs))
    return info


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; prints a one-line summary."""
    parser = argparse.ArgumentParser(
        prog="python -m vcp_jax.data.synthetic",
        description="Write a synthetic motion dataset as Xvid .avi files in the official "
        "UCF101 or HMDB51 layout, with official-format split files.",
    )
    parser.add_argument("--layout", choices=LAYOUTS, required=True)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num_classes", type=int, default=10, help=f"2..{MAX_CLASSES}")
    parser.add_argument("--videos_per_class", type=int, default=12)
    parser.add_argument("--num_frames", type=int, default=150)
    parser.add_argument("--height", type=int, default=120)
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps", type=float, default=25.0)
    parser.add_argument("--camera_pan", type=float, default=0.0,
                        help="largest camera pan, fraction of the frame per frame (0: static)")
    parser.add_argument("--top_light", type=float, default=0.0,
                        help="largest top-to-bottom brightness difference, grey levels (0: none)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        info = generate(
            args.out,
            layout=args.layout,
            num_classes=args.num_classes,
            videos_per_class=args.videos_per_class,
            num_frames=args.num_frames,
            height=args.height,
            width=args.width,
            seed=args.seed,
            fps=args.fps,
            camera_pan=args.camera_pan,
            top_light=args.top_light,
            workers=args.workers,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    what = "wrote" if info.generated else "already complete (same parameters), skipped"
    print(
        f"synthetic {info.layout}: {what}: {info.num_videos} videos, {len(info.class_names)} "
        f"classes x {args.videos_per_class}, {args.num_frames} frames {args.height}x{args.width} "
        f"@ {args.fps:g} fps, seed {args.seed} -> {info.videos_dir} + {info.splits_dir} "
        f"({time.perf_counter() - start:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
