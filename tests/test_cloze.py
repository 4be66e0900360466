"""Property tests of the VCP cloze (vcp_jax/cloze.py): every option, label statistics, config."""

from __future__ import annotations

import functools
import itertools

import jax
import ml_collections
import numpy as np
import pytest

from vcp_jax import cloze

IDENTITY = (0, 1, 2, 3)


def _config(**overrides) -> ml_collections.ConfigDict:
    config = cloze.default_config()
    config.update(overrides)
    return config


def _inputs(seed: int, b: int, t: int, h: int, w: int, c: int = 3, dtype=np.uint8):
    """Random clips (B, 3, T, H, W, C) and remote (B, T, H, W, C)."""
    rng = np.random.default_rng(seed)
    clips = rng.integers(0, 256, (b, 3, t, h, w, c)).astype(dtype)
    remote = rng.integers(0, 256, (b, t, h, w, c)).astype(dtype)
    return clips, remote


# Static, hashable config: equal configs and shapes share one compilation across tests.
_make_cloze = jax.jit(cloze.make_cloze, static_argnames="config")


def _cloze(config, clips, remote, has_remote, seed=0):
    """Runs make_cloze under jit, returns numpy arrays."""
    frozen = ml_collections.FrozenConfigDict(config)
    tuples, labels = _make_cloze(jax.random.key(seed), clips, remote, has_remote, config=frozen)
    return np.asarray(tuples), np.asarray(labels)


def _quadrants(clip: np.ndarray) -> list[np.ndarray]:
    """The 4 quadrants A, B, C, D of every frame of a (T, H, W, C) clip."""
    hm, wm = clip.shape[1] // 2, clip.shape[2] // 2
    return [clip[:, :hm, :wm], clip[:, :hm, wm:], clip[:, hm:, :wm], clip[:, hm:, wm:]]


def _identify(orig: np.ndarray, blank: np.ndarray, remote: np.ndarray) -> set[tuple]:
    """Every description of `blank` as an option applied to `orig` (T, H, W, C)."""
    found = set()
    if np.array_equal(blank, orig):
        found.add(("original",))
    if np.array_equal(blank, remote):
        found.add(("remote",))
    if blank.shape[1] == blank.shape[2]:
        for k in (1, 2, 3):
            if np.array_equal(blank, np.rot90(orig, k, axes=(1, 2))):
                found.add(("rotation", 90 * k))
    src, dst = _quadrants(orig), _quadrants(blank)
    perm = tuple(next((i for i in range(4) if np.array_equal(d, src[i])), -1) for d in dst)
    if sorted(perm) == list(IDENTITY) and perm != IDENTITY:
        found.add(("permutation", perm))
    n = orig.shape[0] // 4
    blocks = [orig[i * n : (i + 1) * n] for i in range(4)]
    order = tuple(
        next((i for i in range(4) if np.array_equal(blank[j * n : (j + 1) * n], blocks[i])), -1)
        for j in range(4)
    )
    moved = [j for j in range(4) if order[j] != j]
    if sorted(order) == list(IDENTITY) and len(moved) == 2 and order[moved[0]] == moved[1]:
        found.add(("adjacent_shuffle", tuple(moved)))
    return found


def _check_tuples(config, clips, remote, tuples, labels) -> dict[str, set]:
    """Checks every sample against its label; returns the parameters seen per class name."""
    names = cloze.class_names(config)
    assert labels.dtype == np.int32
    assert labels.min() >= 0 and labels.max() < len(names)
    assert tuples.shape == clips.shape and tuples.dtype == clips.dtype
    np.testing.assert_array_equal(tuples[:, 0], clips[:, 0])
    np.testing.assert_array_equal(tuples[:, 2], clips[:, 2])
    seen: dict[str, set] = {name: set() for name in names}
    for i, label in enumerate(labels):
        name = names[label]
        found = _identify(clips[i, 1], tuples[i, 1], remote[i])
        assert len(found) == 1, (i, name, found)  # random content: no ambiguity
        (desc,) = found
        if name.startswith("rotation_"):
            assert desc == ("rotation", int(name.split("_")[1])), (i, name, desc)
        else:
            assert desc[0] == name, (i, name, desc)
        seen[name].add(desc[1:])
    return seen


def test_every_option_default():
    config = cloze.default_config()  # T = 16
    clips, remote = _inputs(16, 128, 16, 8, 8)
    tuples, labels = _cloze(config, clips, remote, np.ones(128, bool), seed=16)
    seen = _check_tuples(config, clips, remote, tuples, labels)
    assert all(seen.values()), seen  # every option occurs
    assert {a for (a,) in seen["rotation"]} == {90, 180, 270}
    assert len(seen["permutation"]) > 5  # random non-identity orders, not a fixed one
    assert {p for (p,) in seen["adjacent_shuffle"]} == set(itertools.combinations(range(4), 2))


def test_fixed_permutation_neighbours_per_angle():
    config = _config(
        clip_len=8, permutation="fixed", shuffle_pairs="neighbours", rotation_classes="per_angle"
    )
    assert cloze.class_names(config) == (
        "original",
        "rotation_90",
        "rotation_180",
        "rotation_270",
        "permutation",
        "adjacent_shuffle",
        "remote",
    )
    assert cloze.num_classes(config) == 7
    clips, remote = _inputs(1, 256, 8, 8, 8)
    tuples, labels = _cloze(config, clips, remote, np.ones(256, bool))
    seen = _check_tuples(config, clips, remote, tuples, labels)
    assert all(seen.values()), seen
    assert seen["permutation"] == {((3, 2, 1, 0),)}
    assert {p for (p,) in seen["adjacent_shuffle"]} == {(0, 1), (1, 2), (2, 3)}


def test_fixed_permutation_layout():
    """[U]'s order: A|B over C|D becomes D|C over B|A (positions rotated, contents not)."""
    config = _config(clip_len=4, options=("original", "permutation"), permutation="fixed")
    quads = [np.full((1, 1, 4, 2, 2, 1), v, np.uint8) for v in (1, 2, 3, 4)]  # A B C D
    a, b, c, d = quads
    frame = np.concatenate([np.concatenate([a, b], 4), np.concatenate([c, d], 4)], 3)
    frame[..., 0, 0, 0] += 10  # mark the top-left pixel of A: contents must not rotate
    clips = np.broadcast_to(frame, (32, 3, 4, 4, 4, 1)).copy()
    tuples, labels = _cloze(config, clips, None, None)
    assert set(labels) == {0, 1}
    want = np.concatenate([np.concatenate([d, c], 4), np.concatenate([b, a], 4)], 3)[0, 0]
    want[..., 2, 2, 0] += 10  # A's top-left pixel, now at the top-left of the bottom-right slot
    for i in np.flatnonzero(labels == 1):
        np.testing.assert_array_equal(tuples[i, 1], want)


@pytest.mark.parametrize(
    "options",
    [
        ("original", "rotation", "permutation"),
        ("original", "adjacent_shuffle", "remote"),
        ("rotation", "remote"),
    ],
)
def test_option_subsets(options):
    config = _config(clip_len=8, options=options)
    assert cloze.class_names(config) == options
    clips, remote = _inputs(3, 128, 8, 8, 8)
    has_remote = np.arange(128) % 2 == 0
    if "remote" not in options:  # then remote and has_remote are optional
        remote, has_remote = np.zeros_like(remote), None
    tuples, labels = _cloze(config, clips, None if has_remote is None else remote, has_remote)
    seen = _check_tuples(config, clips, remote, tuples, labels)
    assert all(seen.values()), seen
    if has_remote is not None:
        assert not np.any((labels == options.index("remote")) & ~has_remote)


def _label_counts(config, b, has_remote, seed):
    clips = np.zeros((b, 3, 4, 2, 2, 1), np.uint8)
    _, labels = _cloze(config, clips, clips[:, 0], has_remote, seed=seed)
    return np.bincount(labels, minlength=cloze.num_classes(config))


def _assert_uniform(counts, probs):
    n = counts.sum()
    probs = np.asarray(probs, float)
    sigma = np.sqrt(n * probs * (1 - probs))
    z = (counts - n * probs) / np.where(sigma > 0, sigma, 1)
    assert np.all(np.abs(z) < 5), (counts, n * probs)
    assert np.all(counts[probs == 0] == 0), counts


def test_labels_uniform_with_room():
    counts = _label_counts(_config(clip_len=4), 20000, np.ones(20000, bool), seed=5)
    _assert_uniform(counts, [0.2] * 5)


def test_no_remote_label_without_room():
    counts = _label_counts(_config(clip_len=4), 20000, np.zeros(20000, bool), seed=6)
    _assert_uniform(counts, [0.25] * 4 + [0])


def test_labels_mixed_room():
    has_remote = np.arange(20000) % 4 == 0
    config = _config(clip_len=4)
    clips = np.zeros((20000, 3, 4, 2, 2, 1), np.uint8)
    _, labels = _cloze(config, clips, clips[:, 0], has_remote, seed=7)
    _assert_uniform(np.bincount(labels[has_remote], minlength=5), [0.2] * 5)
    _assert_uniform(np.bincount(labels[~has_remote], minlength=5), [0.25] * 4 + [0])


def test_per_angle_label_frequencies():
    config = _config(clip_len=4, rotation_classes="per_angle")
    counts = _label_counts(config, 20000, np.ones(20000, bool), seed=8)
    # The option draw stays uniform over the 5 options; the angle splits rotation in 3.
    _assert_uniform(counts, [0.2, 0.2 / 3, 0.2 / 3, 0.2 / 3, 0.2, 0.2, 0.2])


def test_random_permutations_and_pairs_uniform():
    """All 23 non-identity quadrant orders and all 6 pairs, uniformly."""
    b = 23 * 400
    config = _config(clip_len=4, options=("permutation", "adjacent_shuffle"))
    clip = np.arange(4 * 2 * 2, dtype=np.float32).reshape(4, 2, 2, 1)  # distinct pixels
    clips = np.broadcast_to(clip, (b, 3, 4, 2, 2, 1))
    tuples, labels = _cloze(config, clips, None, None, seed=9)
    perms = [tuple(int(v) for v in tuples[i, 1, 0].reshape(4)) for i in np.flatnonzero(labels == 0)]
    pairs = [
        tuple(np.flatnonzero(tuples[i, 1, :, 0, 0, 0] != clip[:, 0, 0, 0]))
        for i in np.flatnonzero(labels == 1)
    ]
    all_perms = [p for p in itertools.permutations(range(4)) if p != IDENTITY]
    perm_counts = np.array([perms.count(p) for p in all_perms])
    assert perm_counts.sum() == len(perms)
    _assert_uniform(perm_counts, [1 / 23] * 23)
    all_pairs = list(itertools.combinations(range(4), 2))
    pair_counts = np.array([pairs.count(p) for p in all_pairs])
    assert pair_counts.sum() == len(pairs)
    _assert_uniform(pair_counts, [1 / 6] * 6)


def test_jit_closure_and_static_agree_and_deterministic():
    config = _config(clip_len=8)
    clips, remote = _inputs(10, 32, 8, 4, 4)
    has_remote = np.arange(32) % 3 != 0
    key = jax.random.key(11)
    closed = jax.jit(lambda k, x, r, h: cloze.make_cloze(k, x, r, h, config))(
        key, clips, remote, has_remote
    )
    static = _cloze(config, clips, remote, has_remote, seed=11)  # FrozenConfigDict, static
    again = _cloze(config, clips, remote, has_remote, seed=11)
    for other in (static, again):
        np.testing.assert_array_equal(closed[0], other[0])
        np.testing.assert_array_equal(closed[1], other[1])
    different = _cloze(config, clips, remote, has_remote, seed=12)
    assert not np.array_equal(different[1], closed[1])


def test_dtype_preserved():
    """uint8 in, uint8 out is checked by every property test; here float clips, uint8 remote."""
    config = _config(clip_len=4)
    clips, remote = _inputs(13, 64, 4, 4, 4)
    tuples, labels = _cloze(config, clips.astype(np.float32), remote, np.ones(64, bool))
    assert tuples.dtype == np.float32 and labels.dtype == np.int32
    _check_tuples(config, clips.astype(np.float32), remote, tuples, labels)


def test_defaults_and_offsets():
    config = cloze.default_config()
    assert config.clip_len == 16 and config.interval == 8 and config.num_clips == 3
    assert config.remote_gap == 16
    assert tuple(config.options) == cloze.OPTION_NAMES
    assert cloze.OPTION_NAMES == (
        "original",
        "rotation",
        "permutation",
        "adjacent_shuffle",
        "remote",
    )
    assert cloze.class_names(config) == cloze.OPTION_NAMES and cloze.num_classes(config) == 5
    assert cloze.clip_offsets(config) == (0, 24, 48)
    assert cloze.tuple_span(config) == 64
    config.reference_offsets = True
    assert cloze.clip_offsets(config) == (0, 11, 22)
    assert cloze.tuple_span(config) == 64


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"options": ("original", "rotate")}, ["options", "rotate", "adjacent_shuffle"]),
        ({"options": ("rotation", "original")}, ["options", "canonical"]),
        ({"options": ("original", "original")}, ["options", "canonical"]),
        ({"options": ("original",)}, ["options", "at least 2"]),
        ({"options": "original"}, ["options"]),
        ({"rotation_classes": "each"}, ["rotation_classes", "per_angle"]),
        ({"permutation": "reference"}, ["permutation", "'fixed'"]),
        ({"shuffle_pairs": "neighbors"}, ["shuffle_pairs", "neighbours"]),
        ({"clip_len": 6}, ["clip_len", "divisible by 4"]),
        ({"clip_len": 0}, ["clip_len", ">= 1"]),
        ({"num_clips": 4}, ["num_clips", "odd"]),
        ({"num_clips": 1}, ["num_clips", ">= 3"]),
        ({"interval": -1}, ["interval"]),
        ({"remote_gap": 1.5}, ["remote_gap"]),
        ({"reference_offsets": "yes"}, ["reference_offsets"]),
    ],
)
def test_validate_config_errors(overrides, words):
    config = cloze.default_config()
    with config.ignore_type():
        config.update(overrides)
    with pytest.raises(ValueError) as info:
        cloze.validate_config(config)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_validate_config_keys():
    cloze.validate_config(cloze.default_config())
    cloze.validate_config(_config(clip_len=6, options=("original", "rotation")))  # no shuffle
    config = cloze.default_config()
    config.permutaton = "fixed"  # typo
    with pytest.raises(ValueError, match="permutaton"):
        cloze.validate_config(config)


def test_shape_errors():
    """Shape problems are trace-time ValueErrors (checked with eval_shape: nothing compiles)."""

    def trace(clips, remote, has_remote, config):
        fn = functools.partial(cloze.make_cloze, config=config)
        return jax.eval_shape(fn, jax.random.key(0), clips, remote, has_remote)

    room = np.ones(4, bool)
    clips, remote = _inputs(14, 4, 4, 4, 6)  # H != W
    with pytest.raises(ValueError, match="rotation"):
        trace(clips, remote, room, _config(clip_len=4))
    no_rotation = _config(clip_len=4, options=("original", "permutation", "remote"))
    trace(clips, remote, room, no_rotation)  # fine without rotation
    clips, remote = _inputs(15, 4, 4, 5, 5)  # odd H, W
    with pytest.raises(ValueError, match="permutation"):
        trace(clips, remote, room, no_rotation)
    trace(clips, remote, room, _config(clip_len=4, options=("original", "rotation", "remote")))
    with pytest.raises(ValueError, match="clip_len"):
        trace(clips, remote, room, _config(clip_len=8, options=("original", "remote")))
    with pytest.raises(ValueError, match="remote"):
        trace(clips, None, None, _config(clip_len=4, options=("original", "remote")))
    with pytest.raises(ValueError, match="remote"):
        trace(clips, remote[:, :2], room, _config(clip_len=4, options=("original", "remote")))
    with pytest.raises(ValueError, match="has_remote"):
        trace(clips, remote, room[:2], _config(clip_len=4, options=("original", "remote")))
