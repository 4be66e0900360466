"""The Video Cloze Procedure: fill the blank (middle) clip of a tuple with one of 5 options.

A tuple is `num_clips` clips of `clip_len` frames; the middle clip is the *blank*. Each sample draws
an *option* and the blank is replaced by it; the label is the option's index in `config.options`:

  0 'original'          the clip unchanged;
  1 'rotation'          every frame rotated by 90, 180 or 270 degrees (as `np.rot90`, i.e.
                        counter-clockwise), angle uniform per sample;
  2 'permutation'       every frame's 2x2 quadrants re-assembled in a non-identity order (one
                        order per sample, shared by all its frames);
  3 'adjacent_shuffle'  the clip cut into 4 sub-clips of T/4 frames, two distinct ones swapped;
  4 'remote'            the clip replaced by a remote clip of the same video (input pipeline).

The option is uniform over `config.options`; samples whose video has no room for a remote clip
draw uniformly from the other allowed options.

Every option is a re-indexing of the blank (or of the remote clip): a frame map over
`[blank; remote]` (T,) and a pixel map over the H*W positions of a frame (H*W,). Both are rows
of small constant tables chosen per sample, so the whole cloze is two batched gathers, pure and
jittable (docs/method.md §1).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

OPTION_NAMES: tuple[str, ...] = (
    "original",
    "rotation",
    "permutation",
    "adjacent_shuffle",
    "remote",
)
"""Canonical option names, in canonical (label) order."""

ROTATION_ANGLE_NAMES: tuple[str, ...] = ("rotation_90", "rotation_180", "rotation_270")
"""Class names that replace 'rotation' when `rotation_classes='per_angle'`."""

_ORIGINAL, _ROTATION, _PERMUTATION, _ADJACENT_SHUFFLE, _REMOTE = range(len(OPTION_NAMES))

_CHOICES: dict[str, tuple[str, ...]] = {
    "rotation_classes": ("single", "per_angle"),
    "permutation": ("random", "fixed"),
    "shuffle_pairs": ("any", "neighbours"),
}

# Quadrants in raster order: 0=A (top left), 1=B (top right), 2=C (bottom left), 3=D (bottom right).
# A permutation `p` puts quadrant p[q] of the original at position q.
_RANDOM_PERMUTATIONS: tuple[tuple[int, ...], ...] = tuple(
    p for p in itertools.permutations(range(4)) if p != (0, 1, 2, 3)
)  # the 23 non-identity orders
_FIXED_PERMUTATION: tuple[int, ...] = (3, 2, 1, 0)  # [U]: top row D|C, bottom row B|A

_SWAP_PAIRS: dict[str, tuple[tuple[int, int], ...]] = {
    "any": tuple(itertools.combinations(range(4), 2)),  # 6 pairs
    "neighbours": ((0, 1), (1, 2), (2, 3)),
}


def default_config() -> ml_collections.ConfigDict:
    """The cloze section of the pretraining config, with the defaults of docs/method.md §1."""
    return ml_collections.ConfigDict(
        {
            "clip_len": 16,  # frames per clip (T)
            "interval": 8,  # frames between consecutive clips
            "num_clips": 3,  # clips per tuple; the middle one is the blank
            "remote_gap": 16,  # min frames between the tuple and a remote clip
            "options": OPTION_NAMES,  # allowed options, canonical order
            "rotation_classes": "single",  # 'single' | 'per_angle' (one class per angle)
            "permutation": "random",  # 'random' (23 orders) | 'fixed' ([U]'s D|C over B|A)
            "shuffle_pairs": "any",  # 'any' (6 pairs) | 'neighbours' (3 pairs)
            "reference_offsets": False,  # True: [U]'s overlapping offsets i*(num_clips+interval)
            # Tuples drawn from each validation (and probe test) video, each with its own start,
            # option and cloze key: more draws, steadier per-option accuracies on few videos.
            "eval_tuples_per_video": 1,
        }
    )


_INT_KEYS: dict[str, int] = {"clip_len": 1, "interval": 0, "num_clips": 3, "remote_gap": 0,
                             "eval_tuples_per_video": 1}


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError, naming the key and its allowed values, if `config` is not a valid cloze.

    Cheap and Python-level; `make_cloze` calls it at trace time.
    """
    expected = set(default_config().keys())
    keys = set(config.keys())
    if keys - expected or expected - keys:
        raise ValueError(
            f"cloze config: unknown keys {sorted(keys - expected)}, missing keys "
            f"{sorted(expected - keys)}; the keys are {sorted(expected)}"
        )
    for key, minimum in _INT_KEYS.items():
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
            raise ValueError(f"cloze config {key}={value!r}: must be an integer >= {minimum}")
    if config.num_clips % 2 != 1:
        raise ValueError(
            f"cloze config num_clips={config.num_clips}: must be odd so that there is a middle clip"
        )
    for key, allowed in _CHOICES.items():
        if config[key] not in allowed:
            raise ValueError(f"cloze config {key}={config[key]!r}: allowed values are {allowed}")
    if not isinstance(config.reference_offsets, bool):
        raise ValueError(
            f"cloze config reference_offsets={config.reference_offsets!r}: must be True or False"
        )

    options = config.options
    if isinstance(options, str) or not isinstance(options, Sequence):
        raise ValueError(
            f"cloze config options={options!r}: must be a tuple of names from {OPTION_NAMES}"
        )
    options = tuple(options)
    unknown = [name for name in options if name not in OPTION_NAMES]
    if unknown:
        raise ValueError(
            f"cloze config options: unknown {unknown}; allowed values are {OPTION_NAMES}"
        )
    canonical = tuple(name for name in OPTION_NAMES if name in options)
    if options != canonical:
        raise ValueError(
            f"cloze config options={options}: must be distinct and in the canonical order "
            f"{OPTION_NAMES}, i.e. {canonical}"
        )
    if len(options) < 2:
        raise ValueError(
            f"cloze config options={options}: need at least 2 of {OPTION_NAMES} to classify"
        )
    if "adjacent_shuffle" in options and config.clip_len % 4 != 0:
        raise ValueError(
            f"cloze config clip_len={config.clip_len}: must be divisible by 4 when options "
            "include 'adjacent_shuffle' (4 sub-clips)"
        )


def class_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The label space: `config.options`, with 'rotation' expanded per angle if asked.

    The draw is over options either way, so with `rotation_classes='per_angle'` each angle class
    gets a third of the rotation frequency (1/15 each with the 5 default options).
    """
    validate_config(config)
    names: list[str] = []
    for name in config.options:
        if name == "rotation" and config.rotation_classes == "per_angle":
            names.extend(ROTATION_ANGLE_NAMES)
        else:
            names.append(name)
    return tuple(names)


def num_classes(config: ml_collections.ConfigDict) -> int:
    """Number of cloze classes, the width of the VCP head's output."""
    return len(class_names(config))


def clip_offsets(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """First frame of each clip relative to the tuple start: (0, 24, 48) by default.

    With `reference_offsets=True`, [U]'s overlapping `i * (num_clips + interval)`: (0, 11, 22).
    """
    validate_config(config)
    step = (
        config.num_clips + config.interval
        if config.reference_offsets
        else (config.clip_len + config.interval)
    )
    return tuple(i * step for i in range(config.num_clips))


def tuple_span(config: ml_collections.ConfigDict) -> int:
    """Frames a tuple occupies, `num_clips * clip_len + (num_clips - 1) * interval` (64 by default).

    Videos shorter than this are not used, and remote clips are sought at least `remote_gap` frames
    outside it. With `reference_offsets=True` the clips themselves cover fewer frames (0..37) but,
    as in [U], the span (video eligibility, remote room) stays the nominal one.
    """
    validate_config(config)
    return config.num_clips * config.clip_len + (config.num_clips - 1) * config.interval


def _tables(
    config: ml_collections.ConfigDict, t: int, h: int, w: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Per-sample lookup tables, built in numpy at trace time.

    Returns:
      ops: (K,) canonical option id of each allowed option.
      frame_maps: (F, T) indices into the frames of `[blank; remote]` (2T frames).
      frame_base: (K,) row of `frame_maps` for each allowed option (+ pair index for shuffles).
      pixel_maps: (P, H*W) indices into the flattened pixels of a frame.
      pixel_base: (K,) row of `pixel_maps` for each option (+ angle / permutation index).
      n_perms, n_pairs: how many permutations and swap pairs the draws range over.
    """
    options = tuple(config.options)
    ops = np.array([OPTION_NAMES.index(name) for name in options], np.int32)

    identity_t = np.arange(t)
    frame_rows: list[np.ndarray] = [identity_t]
    frame_base = np.zeros(len(options), np.int32)
    pairs = _SWAP_PAIRS[config.shuffle_pairs]
    if "adjacent_shuffle" in options:
        frame_base[options.index("adjacent_shuffle")] = len(frame_rows)
        blocks = identity_t.reshape(4, t // 4)
        for i, j in pairs:
            order = list(range(4))
            order[i], order[j] = j, i
            frame_rows.append(blocks[order].reshape(t))
    if "remote" in options:
        frame_base[options.index("remote")] = len(frame_rows)
        frame_rows.append(t + identity_t)

    identity_hw = np.arange(h * w).reshape(h, w)
    pixel_rows: list[np.ndarray] = [identity_hw.reshape(-1)]
    pixel_base = np.zeros(len(options), np.int32)
    if "rotation" in options:
        pixel_base[options.index("rotation")] = len(pixel_rows)
        pixel_rows.extend(np.rot90(identity_hw, k).reshape(-1) for k in (1, 2, 3))
    perms = (_FIXED_PERMUTATION,) if config.permutation == "fixed" else _RANDOM_PERMUTATIONS
    if "permutation" in options:
        pixel_base[options.index("permutation")] = len(pixel_rows)
        hm, wm = h // 2, w // 2
        quadrants = [
            identity_hw[:hm, :wm],
            identity_hw[:hm, wm:],
            identity_hw[hm:, :wm],
            identity_hw[hm:, wm:],
        ]
        for p in perms:
            q = [quadrants[i] for i in p]
            pixel_rows.append(np.block([[q[0], q[1]], [q[2], q[3]]]).reshape(-1))

    return (
        ops,
        np.stack(frame_rows).astype(np.int32),
        frame_base,
        np.stack(pixel_rows).astype(np.int32),
        pixel_base,
        len(perms),
        len(pairs),
    )


def _check_shapes(
    config: ml_collections.ConfigDict,
    clips: jax.Array,
    remote: jax.Array | None,
    has_remote: jax.Array | None,
) -> None:
    if clips.ndim != 6 or clips.shape[1] != config.num_clips or clips.shape[2] != config.clip_len:
        raise ValueError(
            f"clips must be (B, num_clips={config.num_clips}, clip_len={config.clip_len}, H, W, C);"
            f" got {clips.shape}"
        )
    b, _, t, h, w, c = clips.shape
    if "rotation" in config.options and h != w:
        raise ValueError(f"option 'rotation' needs square frames (H == W); got H={h}, W={w}")
    if "permutation" in config.options and (h % 2 or w % 2):
        raise ValueError(f"option 'permutation' needs even H and W (2x2 quadrants); got {h}x{w}")
    if "remote" in config.options:
        if remote is None or has_remote is None:
            raise ValueError("option 'remote' is allowed: pass `remote` and `has_remote`")
        if tuple(remote.shape) != (b, t, h, w, c):
            raise ValueError(
                f"remote must be (B, T, H, W, C) = {(b, t, h, w, c)}; got {remote.shape}"
            )
        if tuple(has_remote.shape) != (b,):
            raise ValueError(f"has_remote must be (B,) = {(b,)}; got {has_remote.shape}")


def make_cloze(
    key: jax.Array,
    clips: jax.Array,
    remote: jax.Array | None,
    has_remote: jax.Array | None,
    config: ml_collections.ConfigDict,
) -> tuple[jax.Array, jax.Array]:
    """Fills the blank of each tuple with a random option.

    Args:
      key: PRNG key; split into independent keys for the label, angle, permutation and pair.
      clips: (B, num_clips, T, H, W, C), any dtype (uint8 from the input pipeline, or float).
      remote: (B, T, H, W, C) remote clip per sample (anything where `has_remote` is False). May be
        None when 'remote' is not among `config.options`.
      has_remote: (B,) bool, whether the video had room for a remote clip. Where False the option is
        drawn uniformly from the other allowed options. May be None without 'remote'.
      config: the cloze config (see `default_config`); Python-level, close over it under jit.

    Returns:
      tuples: same shape and dtype as `clips`; clip `num_clips // 2` replaced by its option, the
        context clips unchanged.
      labels: (B,) int32 indices into `class_names(config)`.
    """
    validate_config(config)
    clips = jnp.asarray(clips)
    _check_shapes(config, clips, remote, has_remote)
    b, _, t, h, w, c = clips.shape
    ops, frame_maps, frame_base, pixel_maps, pixel_base, n_perms, n_pairs = _tables(config, t, h, w)
    n_options = len(ops)

    label_key, angle_key, perm_key, pair_key = jax.random.split(key, 4)
    if "remote" in config.options:
        # 'remote' is last in canonical order: without room, draw from the first n_options - 1.
        maxval = jnp.where(jnp.asarray(has_remote, bool), n_options, n_options - 1)
    else:
        maxval = n_options
    option = jax.random.randint(label_key, (b,), 0, maxval)  # index into config.options
    angle = jax.random.randint(angle_key, (b,), 0, 3)  # 0, 1, 2 -> 90, 180, 270 degrees
    perm = jax.random.randint(perm_key, (b,), 0, n_perms)
    pair = jax.random.randint(pair_key, (b,), 0, n_pairs)

    op = jnp.asarray(ops)[option]
    frame_row = jnp.asarray(frame_base)[option] + jnp.where(op == _ADJACENT_SHUFFLE, pair, 0)
    pixel_row = (
        jnp.asarray(pixel_base)[option]
        + jnp.where(op == _ROTATION, angle, 0)
        + jnp.where(op == _PERMUTATION, perm, 0)
    )

    mid = config.num_clips // 2
    source = clips[:, mid].reshape(b, t, h * w, c)
    if "remote" in config.options:
        remote = jnp.asarray(remote).astype(clips.dtype).reshape(b, t, h * w, c)
        source = jnp.concatenate([source, remote], axis=1)  # (B, 2T, H*W, C)
    blank = source
    if len(frame_maps) > 1:
        frames = jnp.asarray(frame_maps)[frame_row]  # (B, T)
        blank = jax.vmap(lambda x, i: x[i])(blank, frames)
    if len(pixel_maps) > 1:
        pixels = jnp.asarray(pixel_maps)[pixel_row]  # (B, H*W)
        blank = jax.vmap(lambda x, i: x[:, i])(blank, pixels)
    tuples = clips.at[:, mid].set(blank.reshape(b, t, h, w, c))

    class_base = np.cumsum(
        [0]
        + [
            3 if name == "rotation" and config.rotation_classes == "per_angle" else 1
            for name in config.options
        ]
    )[:-1]
    labels = jnp.asarray(class_base, jnp.int32)[option]
    if config.rotation_classes == "per_angle":
        labels = labels + jnp.where(op == _ROTATION, angle, 0)
    return tuples, labels.astype(jnp.int32)
