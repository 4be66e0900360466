"""Tests for the synthetic motion dataset (vcp_jax.data.synthetic): layouts, formats, motion."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from vcp_jax.data import synthetic

REPO_ROOT = Path(__file__).resolve().parent.parent

# Tiny sizes: the whole file must run in seconds on a CPU.
TINY = dict(num_frames=40, height=32, width=48, seed=0, workers=1)

UCF_TRAIN_RE = re.compile(r"^([A-Za-z]+)/v_([A-Za-z]+)_g(\d\d)_c(\d\d)\.avi (\d+)$")
UCF_TEST_RE = re.compile(r"^([A-Za-z]+)/v_([A-Za-z]+)_g(\d\d)_c(\d\d)\.avi$")
HMDB_LINE_RE = re.compile(r"^(\S+\.avi) ([012]) $")
HMDB_AWKWARD = set("![]()&';#")


@pytest.fixture(scope="module")
def ucf(tmp_path_factory) -> synthetic.SyntheticDataset:
    out = tmp_path_factory.mktemp("ucf")
    return synthetic.generate(out, layout="ucf101", num_classes=4, videos_per_class=5, **TINY)


@pytest.fixture(scope="module")
def hmdb(tmp_path_factory) -> synthetic.SyntheticDataset:
    out = tmp_path_factory.mktemp("hmdb")
    return synthetic.generate(out, layout="hmdb51", num_classes=3, videos_per_class=6, **TINY)


def _crlf_lines(path: Path) -> list[str]:
    """Lines of a UCF split file, asserting the official CRLF endings (no bare LF or CR)."""
    data = path.read_bytes()
    assert data.endswith(b"\r\n"), path
    assert data.count(b"\n") == data.count(b"\r\n") == data.count(b"\r"), path
    return data.decode("ascii").split("\r\n")[:-1]


def _hmdb_lines(path: Path) -> list[tuple[str, int]]:
    """(name, label) of an HMDB split file, asserting LF endings and the trailing space."""
    data = path.read_bytes()
    assert data.endswith(b" \n") and b"\r" not in data, path
    out = []
    for line in data.decode("utf-8").split("\n")[:-1]:
        m = HMDB_LINE_RE.match(line)
        assert m, repr(line)
        out.append((m.group(1), int(m.group(2))))
    # The official files list names in byte order.
    assert [n for n, _ in out] == sorted(n for n, _ in out), path
    return out


def _decode(path: Path) -> np.ndarray:
    with av.open(str(path), metadata_errors="ignore") as container:
        stream = container.streams.video[0]
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])


def _videos(info: synthetic.SyntheticDataset) -> list[str]:
    return sorted(p.relative_to(info.videos_dir).as_posix() for p in info.videos_dir.rglob("*"))


# ------------------------------------------------------------------------------------------
# Layouts and split files
# ------------------------------------------------------------------------------------------


def test_ucf_layout_and_split_files(ucf):
    assert ucf.videos_dir == ucf.root / "UCF101"
    assert ucf.splits_dir == ucf.root / "ucfTrainTestlist"
    assert ucf.num_videos == 20
    assert ucf.class_names == ("MoveRight", "MoveLeft", "MoveUp", "MoveDown")
    assert sorted(p.name for p in ucf.splits_dir.iterdir()) == sorted(
        ["classInd.txt"] + [f"{k}list0{i}.txt" for k in ("train", "test") for i in (1, 2, 3)]
    )
    class_ind = _crlf_lines(ucf.splits_dir / "classInd.txt")
    assert class_ind == [f"{i + 1} {n}" for i, n in enumerate(ucf.class_names)]
    label_of = {n: i + 1 for i, n in enumerate(ucf.class_names)}

    videos = _videos(ucf)
    assert len([v for v in videos if v.endswith(".avi")]) == ucf.num_videos
    for fold, test_groups in ((1, range(1, 8)), (2, range(8, 15)), (3, range(15, 22))):
        train = _crlf_lines(ucf.splits_dir / f"trainlist0{fold}.txt")
        test = _crlf_lines(ucf.splits_dir / f"testlist0{fold}.txt")
        train_paths = []
        for line in train:
            m = UCF_TRAIN_RE.match(line)
            assert m, repr(line)
            folder, cls, group, _, label = m.groups()
            assert folder == cls and label_of[cls] == int(label)  # 1-based, as classInd.
            assert int(group) not in test_groups
            train_paths.append(line.rsplit(" ", 1)[0])
        for line in test:
            m = UCF_TEST_RE.match(line)
            assert m, repr(line)
            assert int(m.group(3)) in test_groups  # Official splits are by group.
        # Every video is listed exactly once per fold, under its exact name.
        assert sorted(train_paths + test) == [v for v in videos if v.endswith(".avi")]
        for cls in ucf.class_names:
            assert any(p.startswith(cls + "/") for p in train_paths)
            assert any(p.startswith(cls + "/") for p in test)


def test_ucf_format_matches_official_files(shared_data):
    """The regexes the synthetic files are checked with also accept every official line."""
    folder = shared_data / "ucf101" / "ucfTrainTestlist"
    classes = _crlf_lines(folder / "classInd.txt")
    assert all(re.match(r"^\d+ [A-Za-z]+$", line) for line in classes)
    for fold in (1, 2, 3):
        assert all(UCF_TRAIN_RE.match(x) for x in _crlf_lines(folder / f"trainlist0{fold}.txt"))
        assert all(UCF_TEST_RE.match(x) for x in _crlf_lines(folder / f"testlist0{fold}.txt"))


def test_hmdb_layout_and_split_files(hmdb):
    assert hmdb.videos_dir == hmdb.root / "hmdb51_org"
    assert hmdb.splits_dir == hmdb.root / "testTrainMulti_7030_splits"
    assert hmdb.class_names == ("move_right", "move_left", "move_up")
    assert len(list(hmdb.splits_dir.iterdir())) == 3 * len(hmdb.class_names)
    awkward = 0
    for cls in hmdb.class_names:
        on_disk = sorted(p.name for p in (hmdb.videos_dir / cls).iterdir())
        assert len(on_disk) == 6
        awkward += sum(bool(HMDB_AWKWARD & set(n)) for n in on_disk)
        assigned = []
        for fold in (1, 2, 3):
            lines = _hmdb_lines(hmdb.splits_dir / f"{cls}_test_split{fold}.txt")
            assert sorted(n for n, _ in lines) == on_disk  # Same names, as on disk.
            assert all(f"_{cls}_" in n for n, _ in lines)
            labels = [lab for _, lab in lines]
            assert labels.count(1) > labels.count(2) >= 1
            assigned.append(labels)
        assert len({tuple(a) for a in assigned}) == 3  # A different assignment per fold.
    assert awkward >= len(hmdb.class_names)  # Every class has a name a naive parser trips on.


def test_hmdb_names_cover_awkward_characters_at_default_size(tmp_path):
    jobs, splits = synthetic._plan("hmdb51", tmp_path, 10, 12)
    names = [p.name for p, _, _ in jobs]
    assert len(set(names)) == len(names) == 120
    assert HMDB_AWKWARD <= set("".join(names))
    assert any(n.startswith("#") for n in names)  # Real lists have lines starting with '#'.
    # Roughly 70/30 of the used videos, a few unused, over the whole default dataset.
    counts = np.bincount([int(x.split()[-1]) for lines in splits.values() for x in lines])
    assert 0 < counts[0] < counts[2] < counts[1]
    assert 0.25 <= counts[2] / (counts[1] + counts[2]) <= 0.35


def test_hmdb_format_matches_official_files(shared_data):
    folder = shared_data / "hmdb51" / "testTrainMulti_7030_splits"
    for name in ("wave_test_split1.txt", "pullup_test_split2.txt", "pick_test_split3.txt"):
        assert {lab for _, lab in _hmdb_lines(folder / name)} == {0, 1, 2}


def test_every_fold_has_train_and_test():
    for videos_per_class in range(synthetic.MIN_VIDEOS_PER_CLASS, 300):
        groups = [g for g, _ in synthetic.ucf_group_clip(videos_per_class)]
        assert all(1 <= g <= 25 for g in groups)
        for lo, hi in ((1, 7), (8, 14), (15, 21)):
            n_test = sum(lo <= g <= hi for g in groups)
            assert 0 < n_test < videos_per_class, (videos_per_class, lo)
        folds = synthetic.hmdb_split_labels(0, videos_per_class)
        for labels in folds:
            assert labels.count(1) > 0 and labels.count(2) > 0, videos_per_class
        assert folds[0] != folds[1] != folds[2] != folds[0], videos_per_class


# ------------------------------------------------------------------------------------------
# Videos
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["ucf", "hmdb"])
def test_videos_decode(which, request):
    info = request.getfixturevalue(which)
    paths = sorted(info.videos_dir.rglob("*.avi"))
    assert len(paths) == info.num_videos
    for path in paths[:: max(1, len(paths) // 4)]:
        with av.open(str(path), metadata_errors="ignore") as container:
            assert len(container.streams) == 1  # One video stream, no audio.
            stream = container.streams.video[0]
            assert stream.codec_context.name == "mpeg4"
            assert stream.codec_context.codec_tag == "XVID"
            assert float(stream.average_rate) == pytest.approx(25.0)
            frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        assert frames.shape == (40, 32, 48, 3) and frames.dtype == np.uint8


def test_deterministic_given_seed(ucf, tmp_path):
    kw = dict(layout="ucf101", num_classes=2, videos_per_class=5, **(TINY | dict(num_frames=16)))
    same = synthetic.generate(tmp_path / "same", **kw)
    other = synthetic.generate(tmp_path / "other", **(kw | dict(seed=1)))
    for rel in _videos(same):
        if not rel.endswith(".avi"):
            continue
        a = _decode(same.videos_dir / rel)
        # The fixture has the same seed and more frames: its first 16 decoded frames match.
        np.testing.assert_array_equal(a, _decode(ucf.videos_dir / rel)[:16])
        assert not np.array_equal(a, _decode(other.videos_dir / rel))


# ------------------------------------------------------------------------------------------
# The class is in the motion, not in the appearance
# ------------------------------------------------------------------------------------------


def _frame_shifts(frames: np.ndarray, k: int = 4) -> np.ndarray:
    """(dx, dy) between consecutive frame differences, k frames apart (phase correlation).

    Differencing removes the static background; on the torus the difference image of a
    translating scene is itself translated, so the phase-correlation peak is the motion.
    """
    g = frames.astype(np.float64).mean(-1)
    out = []
    for t in range(0, len(g) - 2 * k, k):
        (dx, dy), _ = cv2.phaseCorrelate(g[t + k] - g[t], g[t + 2 * k] - g[t + k])
        out.append((dx, dy))
    return np.array(out)


def test_translation_direction_from_decoded_video(ucf):
    expected = {"MoveRight": (1, 0), "MoveLeft": (-1, 0), "MoveUp": (0, -1), "MoveDown": (0, 1)}
    for cls, (sx, sy) in expected.items():
        for path in sorted((ucf.videos_dir / cls).glob("*.avi")):
            dx, dy = np.median(_frame_shifts(_decode(path)), axis=0)
            along, across = (dx * sx + dy * sy), abs(dx * sy) + abs(dy * sx)
            assert along > 0.5 and across < 0.5 * along, (path.name, dx, dy)


def test_oscillation_axis_from_decoded_video(tmp_path):
    for cls, axis in (("OscillateHorizontal", 0), ("OscillateVertical", 1)):
        idx = [m.name for m in synthetic.MOTIONS].index(cls)
        for i in range(2):
            frames = synthetic.render_video(
                idx, num_frames=40, height=32, width=48, seed=0, video_index=i
            )
            synthetic.write_video(tmp_path / "v.avi", frames, 25.0)
            shifts = np.abs(_frame_shifts(_decode(tmp_path / "v.avi")))
            mean = np.median(shifts, axis=0)
            assert mean[axis] > 2 * mean[1 - axis], (cls, i, mean)


def _marker_track(motion: synthetic.Motion, params: dict, frames: int = 6) -> np.ndarray:
    """Renders one object whose only visible pixel blob sits right of its centre; returns the
    blob centroid per frame, relative to the object centre (40, 40)."""
    d = 21
    sprite = np.zeros((d, d, 4), np.float32)
    sprite[9:12, 16:19] = (255.0, 255.0, 255.0, 1.0)  # Premultiplied white, right of centre.
    obj = synthetic._Object(
        sprite=sprite,
        base=d - 2,
        center=np.array([40.0, 40.0]),
        angle=0.0,
        log_z=np.log(synthetic._Z_HI),
        phase=0.0,
    )
    bg = np.zeros((80, 80, 3), np.float32)
    video = synthetic._render(motion, params, np.ones(1), bg, [obj], frames)
    out = []
    for f in video:
        ys, xs = np.nonzero(f[..., 0] > 64)
        out.append((xs.mean() - 40.0, ys.mean() - 40.0))
    return np.array(out)


@pytest.mark.parametrize("sign", [1, -1])
def test_rotation_and_orbit_sense(sign):
    """Clockwise means clockwise on screen (image y points down)."""
    rot = synthetic.Motion("R", "rotate", sign=sign)
    track = _marker_track(rot, {"deg_per_frame": 10.0})
    # Cross product of successive positions: > 0 is clockwise on screen with y down.
    cross = track[:-1, 0] * track[1:, 1] - track[:-1, 1] * track[1:, 0]
    assert np.all(np.sign(cross) == sign), track
    orbit = synthetic.Motion("O", "orbit", sign=sign)
    obj = synthetic._Object(np.zeros((4, 4, 4), np.float32), 2.0, np.zeros(2), 0.0, 0.0, 0.0)
    centers = np.array(
        [
            synthetic._object_state(orbit, {"radius": 10.0, "period": 20.0}, obj, 1.0, t)[0]
            for t in range(5)
        ]
    )
    cross = centers[:-1, 0] * centers[1:, 1] - centers[:-1, 1] * centers[1:, 0]
    assert np.all(np.sign(cross) == sign)


@pytest.mark.parametrize("sign", [1, -1])
def test_zoom_sense(sign):
    zoom = synthetic.Motion("Z", "zoom", sign=sign)
    obj = synthetic._Object(
        np.zeros((4, 4, 4), np.float32),
        2.0,
        np.zeros(2),
        0.0,
        float(np.log(synthetic._Z_LO * synthetic._Z_HI) / 2),
        0.0,
    )
    z = [synthetic._object_state(zoom, {"period": 50.0}, obj, 1.0, t)[2] for t in range(10)]
    assert np.all(np.sign(np.diff(z)) == sign)  # Away from the sawtooth restart.
    assert synthetic._Z_LO <= min(z) and max(z) <= synthetic._Z_HI


def test_single_frames_do_not_reveal_class():
    """Mean colour of a frame does not predict the class (leave-one-out nearest centroid)."""
    feats, labels = [], []
    for c in range(4):
        for i in range(8):
            f = synthetic.render_video(c, num_frames=16, height=32, width=48, seed=0, video_index=i)
            feats.append(f[i % 16].reshape(-1, 3).mean(0))
            labels.append(c)
    x, y = np.array(feats), np.array(labels)
    hits = 0
    for j in range(len(x)):
        keep = np.arange(len(x)) != j
        centroids = np.stack([x[keep & (y == c)].mean(0) for c in range(4)])
        hits += int(np.argmin(((centroids - x[j]) ** 2).sum(1)) == y[j])
    assert hits / len(x) < 0.5  # Chance is 0.25.


# ------------------------------------------------------------------------------------------
# Arguments, idempotence, command line
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(num_classes=synthetic.MAX_CLASSES + 1), f"between 2 and {synthetic.MAX_CLASSES}"),
        (dict(videos_per_class=3), "videos_per_class"),
        (dict(num_frames=15), "num_frames"),
        (dict(height=31), "height"),
        (dict(width=8), "width"),
        (dict(layout="kinetics"), "layout"),
        (dict(seed=-1), "seed"),
    ],
)
def test_invalid_arguments(tmp_path, override, message):
    kw = dict(layout="ucf101", num_classes=2, videos_per_class=4, **TINY) | override
    with pytest.raises(ValueError, match=message):
        synthetic.generate(tmp_path, **kw)
    assert not any(tmp_path.iterdir())  # Nothing written.


def test_at_least_24_motion_classes():
    assert synthetic.MAX_CLASSES >= 24
    for layout in synthetic.LAYOUTS:
        names = synthetic.class_names(layout, synthetic.MAX_CLASSES)
        assert len(set(names)) == len(names)
    assert all(re.fullmatch(r"[A-Z][A-Za-z]+", m.name) for m in synthetic.MOTIONS)
    assert all(re.fullmatch(r"[a-z]+(_[a-z]+)*", m.hmdb_name) for m in synthetic.MOTIONS)


def test_idempotent_and_refuses_to_mix(ucf, tmp_path):
    kw = dict(layout="ucf101", num_classes=4, videos_per_class=5, **TINY)
    again = synthetic.generate(ucf.root, **kw)
    assert not again.generated and again.num_videos == ucf.num_videos
    marker = json.loads((ucf.root / synthetic.MARKER_NAME).read_text())
    assert marker["complete"] and marker["params"]["seed"] == 0
    with pytest.raises(ValueError, match="different parameters"):
        synthetic.generate(ucf.root, **(kw | dict(seed=1)))
    with pytest.raises(ValueError, match="different parameters"):
        synthetic.generate(ucf.root, **(kw | dict(layout="hmdb51")))
    # A folder that looks like a real dataset (no marker) is never written into.
    (tmp_path / "UCF101" / "ApplyEyeMakeup").mkdir(parents=True)
    with pytest.raises(ValueError, match="refusing"):
        synthetic.generate(tmp_path, **kw)


def test_command_line(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "vcp_jax.data.synthetic",
        "--layout=hmdb51",
        f"--out={tmp_path}",
        "--num_classes=2",
        "--videos_per_class=4",
        "--num_frames=16",
        "--height=16",
        "--width=24",
    ]
    run = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "wrote: 8 videos" in run.stdout and len(run.stdout.strip().splitlines()) == 1
    assert len(list((tmp_path / "hmdb51_org").rglob("*.avi"))) == 8
    assert len(list((tmp_path / "testTrainMulti_7030_splits").iterdir())) == 6
    run = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "skipped" in run.stdout
    run = subprocess.run(
        cmd + ["--num_classes=99"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode != 0 and str(synthetic.MAX_CLASSES) in run.stderr


def test_camera_pan_moves_the_whole_scene():
    # RotateClockwise: the objects spin in place, so any global shift is the camera's.
    still = synthetic.render_video(4, num_frames=12, height=48, width=64, seed=0, video_index=1)
    panned = synthetic.render_video(
        4, num_frames=12, height=48, width=64, seed=0, video_index=1, camera_pan=0.05
    )
    np.testing.assert_array_equal(panned[0], still[0])  # the same scene, before it moves
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY).astype(np.float32) for f in (panned[0], panned[4])]
    (dx, dy), _ = cv2.phaseCorrelate(gray[0], gray[1])
    # 4 frames at 0.5..1.0 x 0.05 x 48 pixels per frame: 4.8 to 9.6 pixels of global shift
    # (measured with some slack: the objects' own motion pulls the estimate a little).
    assert 4 <= np.hypot(dx, dy) <= 12
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY).astype(np.float32) for f in (still[0], still[4])]
    (dx, dy), _ = cv2.phaseCorrelate(gray[0], gray[1])
    assert np.hypot(dx, dy) < 1.5  # a static camera: the background stays
    with pytest.raises(ValueError, match="camera_pan"):
        synthetic.generate("/nonexistent", layout="ucf101", camera_pan=0.5)


def test_top_light_brightens_the_top_of_every_frame():
    lit = synthetic.render_video(4, num_frames=4, height=48, width=64, seed=0, video_index=1,
                                 top_light=80)
    plain = synthetic.render_video(4, num_frames=4, height=48, width=64, seed=0, video_index=1)
    added = lit.astype(np.float64) - plain
    assert added[:, :4].mean() > 15 and added[:, -4:].mean() < -15  # up is brighter than down
    with pytest.raises(ValueError, match="top_light"):
        synthetic.generate("/nonexistent", layout="ucf101", top_light=-1)


# --- the demo's world: classes by name, shared appearance ---------------------------------------


def _motion_index(name: str) -> int:
    return synthetic.MOTIONS.index(synthetic.select_motions(0, [name])[0])


def test_shared_world_has_one_background_and_the_pooled_textures():
    """appearance='shared': every video of a world shows the same plain background, and only the
    pooled textures; the first frames of two classes are then alike in their colours."""
    kwargs = dict(num_frames=4, height=48, width=48, seed=3, appearance="shared", world_seed=7,
                  texture_pool=1, num_objects=2)
    a = synthetic.render_video(_motion_index("MoveDownFast"), video_index=0, **kwargs)
    b = synthetic.render_video(_motion_index("MoveUpFast"), video_index=5, **kwargs)
    # The background colour (the most common pixel) is the world's, whatever the class or video.
    def mode(frame: np.ndarray) -> tuple[int, ...]:
        values, counts = np.unique(frame.reshape(-1, 3), axis=0, return_counts=True)
        return tuple(values[counts.argmax()])

    assert mode(a[0]) == mode(b[0])
    other_world = synthetic.render_video(_motion_index("MoveDownFast"), video_index=0,
                                         **{**kwargs, "world_seed": 8})
    assert mode(other_world[0]) != mode(a[0])
    # Objects cover part of the frame, not all of it, and they move.
    assert 0.05 < np.mean(np.any(a[0] != np.array(mode(a[0]), np.uint8), -1)) < 0.9
    assert np.abs(a[1].astype(int) - a[0]).mean() > 1.0


def test_shared_world_objects_move_the_class_way():
    kwargs = dict(num_frames=3, height=48, width=48, seed=0, video_index=1, appearance="shared")
    for name, (dx, dy) in (("MoveDownFast", (0, 1)), ("MoveRightFast", (1, 0))):
        v = synthetic.render_video(_motion_index(name), **kwargs).astype(np.float32)
        errors = {}
        for sx, sy in ((0, 1), (0, -1), (1, 0), (-1, 0)):
            errors[(sx, sy)] = np.abs(np.roll(v[0], (2 * sy, 2 * sx), (0, 1)) - v[1]).mean()
        assert min(errors, key=errors.get) == (dx, dy), (name, errors)


def test_classes_by_name_one_class_allowed(tmp_path):
    info = synthetic.generate(tmp_path / "gravity", layout="ucf101", classes=["MoveDownFast"],
                              videos_per_class=4, num_frames=16, height=32, width=32,
                              appearance="shared", workers=1)
    assert info.class_names == ("MoveDownFast",)
    assert info.num_videos == 4
    assert (info.splits_dir / "classInd.txt").read_bytes() == b"1 MoveDownFast\r\n"
    marker = json.loads((tmp_path / "gravity" / synthetic.MARKER_NAME).read_text())
    assert marker["params"]["classes"] == ["MoveDownFast"]
    assert marker["params"]["appearance"] == "shared"
    hmdb = synthetic.generate(tmp_path / "dirs", layout="hmdb51",
                              classes=["MoveLeftFast", "MoveUpFast"], videos_per_class=4,
                              num_frames=16, height=32, width=32, workers=1)
    assert hmdb.class_names == ("move_left_fast", "move_up_fast")


@pytest.mark.parametrize("override, message", [
    ({"classes": ["NoSuchMotion"]}, "unknown classes"),
    ({"classes": ["MoveUpFast", "MoveUpFast"]}, "distinct"),
    ({"appearance": "cartoon"}, "appearance"),
    ({"appearance": "shared", "texture_pool": 0}, "texture_pool"),
])
def test_invalid_world_arguments(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        synthetic.generate(tmp_path, layout="ucf101", videos_per_class=4, num_frames=16,
                           height=32, width=32, workers=1, **override)
