"""The input pipelines on a tiny synthetic dataset built by the real builder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO_ROOT, tiny_config
from vcp_jax import config_utils, datasets, input_pipeline, pretrain


def _spec(**overrides):
    base = dict(clip_len=16, offsets=(0, 24, 48), remote_gap=16, crop_size=8, need_remote=True)
    return input_pipeline.TupleSpec(**{**base, **overrides})


def test_remote_ranges_follow_spec() -> None:
    spec = _spec()
    assert spec.span == 64
    # A 64-frame video has no room for a remote clip anywhere.
    assert input_pipeline.remote_ranges(64, 0, spec) == []
    # 96 frames, tuple at 0: after only (64 + 16 = 80 is the first start, 80 + 16 = 96 fits).
    assert input_pipeline.remote_ranges(96, 0, spec) == [(80, 80)]
    # Tuple at 32 of 96: before only (a clip ending 16 frames before frame 32 starts at 0).
    assert input_pipeline.remote_ranges(96, 32, spec) == [(0, 0)]
    # Both sides in a long video.
    assert input_pipeline.remote_ranges(300, 100, spec) == [(0, 68), (180, 284)]


def test_sample_tuple_shapes_crops_and_remote(tiny_dataset: Path) -> None:
    config = tiny_config(tiny_dataset)
    source = datasets.data_source(config.data, "train")
    spec = input_pipeline.TupleSpec.from_config(config)
    example = source[0]
    element = input_pipeline.sample_tuple(example, np.random.default_rng(0), spec)
    assert element["clips"].shape == (3, 8, 24, 24, 3) and element["clips"].dtype == np.uint8
    assert element["remote"].shape == (8, 24, 24, 3)
    assert bool(element["has_remote"])  # 72 frames, span 32, gap 8: always room on one side
    assert element["clips"].std() > 1
    # Same generator seed -> same tuple; another seed -> another start or crop.
    again = input_pipeline.sample_tuple(example, np.random.default_rng(0), spec)
    other = input_pipeline.sample_tuple(example, np.random.default_rng(1), spec)
    np.testing.assert_array_equal(element["clips"], again["clips"])
    assert not np.array_equal(element["clips"], other["clips"])


@pytest.mark.parametrize(
    ("num_frames", "expected"),
    [
        (16, [0] * 10),  # exactly one clip long: every clip is the whole video
        (25, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]),  # centres 8 .. 17, one frame apart
        (106, [0, 10, 20, 30, 40, 50, 60, 70, 80, 90]),  # centres linspace(8, 98, 10)
        (100, [0, 9, 18, 28, 37, 46, 56, 65, 74, 84]),  # int() truncates 9.33, 18.67, ...
        (10, [0] * 10),  # shorter than a clip: clamped to 0, the last frame repeats
        (1, [0] * 10),
    ],
)
def test_multi_clip_starts(num_frames: int, expected: list[int]) -> None:
    starts = input_pipeline.multi_clip_starts(num_frames, 16, 10)
    assert starts == expected
    assert all(s + 16 <= max(num_frames, 16) for s in starts)


def test_the_reference_positions_for_ucf_lengths() -> None:
    # Centres linspace(8, L - 8, 10) and start = int(centre - 8), as the reference's test.
    for length in (29, 64, 150, 317, 1776):
        centres = np.linspace(8, length - 8, 10)
        assert input_pipeline.multi_clip_starts(length, 16, 10) == [int(c - 8) for c in centres]


def test_short_video_clips_repeat_the_last_frame(tiny_dataset: Path) -> None:
    config = tiny_config(tiny_dataset)
    source = datasets.data_source(config.data, "train")
    example = dict(source[0])
    example["frames"] = example["frames"][:5]  # a 5-frame video
    clips = input_pipeline.sample_multi_clips(example, clip_len=8, crop_size=24, num_clips=3)
    assert clips["clips"].shape == (3, 8, 24, 24, 3)
    for clip in clips["clips"]:
        for t in range(5, 8):
            np.testing.assert_array_equal(clip[t], clip[4])
    single = input_pipeline.sample_clip(example, np.random.default_rng(0), 8, 24)
    np.testing.assert_array_equal(single["clip"][7], single["clip"][4])


def test_multi_clips_are_centre_cropped_and_deterministic(tiny_dataset: Path) -> None:
    config = tiny_config(tiny_dataset)
    source = datasets.data_source(config.data, "train")
    example = source[3]
    a = input_pipeline.sample_multi_clips(example, clip_len=8, crop_size=24, num_clips=4)
    b = input_pipeline.sample_multi_clips(example, clip_len=8, crop_size=24, num_clips=4)
    np.testing.assert_array_equal(a["clips"], b["clips"])
    # The centre crop of the 32x43 frames: 24x24 at (4, 9), inside the 32x32 one at (0, 5).
    full = input_pipeline.sample_multi_clips(example, clip_len=8, crop_size=32, num_clips=4)
    np.testing.assert_array_equal(a["clips"][0], full["clips"][0][:, 4:28, 4:28])


def test_short_videos_skipped_and_counted(tiny_dataset: Path) -> None:
    config = tiny_config(tiny_dataset)
    config.cloze.clip_len = 16
    config.cloze.interval = 20  # span 16 * 3 + 2 * 20 = 88 > 72 frames: every video too short
    with pytest.raises(config_utils.UserError, match="no training video"):
        pretrain.pretrain_data(config)
    config.cloze.interval = 8  # span 64 <= 72
    data = pretrain.pretrain_data(config)
    assert data.num_too_short == 0 and data.num_train_videos + data.num_val_videos == 20


def test_train_stream_is_the_same_on_any_number_of_hosts(tiny_dataset: Path) -> None:
    config = tiny_config(tiny_dataset)
    first = pretrain.pretrain_data(config)
    second = pretrain.pretrain_data(config)
    for step in (0, 5):  # random access: batch k is the same in every run
        a, b = first.train[step], second.train[step]
        np.testing.assert_array_equal(a["clips"], b["clips"])
        np.testing.assert_array_equal(a["index"], b["index"])
    assert first.train[0]["clips"].shape == (8, 3, 8, 24, 24, 3)
    # Two hosts: each reads (and decodes) only its half of every global batch, and together
    # they hold exactly the one-host batch, tuple for tuple.
    hosts = [pretrain.pretrain_data(config, process_index=i, process_count=2) for i in range(2)]
    for step in (0, 3, 7):
        parts = [h.train[step] for h in hosts]
        assert parts[0]["clips"].shape[0] == 4
        for key in ("clips", "remote", "index", "has_remote"):
            np.testing.assert_array_equal(
                np.concatenate([p[key] for p in parts]), first.train[step][key])
    # Every epoch visits every training video once.
    per_epoch = first.num_train_videos
    seen = np.concatenate([first.train[k]["index"] for k in range(per_epoch // 8)])
    assert len(set(seen.tolist())) == len(seen)


def test_stream_restarts_at_a_step(tiny_dataset: Path) -> None:
    config = tiny_config(tiny_dataset)
    data = pretrain.pretrain_data(config)
    it = input_pipeline.make_iterator(data.train, config)
    batches = [next(it) for _ in range(3)]
    resumed = input_pipeline.make_iterator(data.train, config, start=2)
    np.testing.assert_array_equal(next(resumed)["clips"], batches[2]["clips"])


def test_eval_batches_pad_to_whole_global_batches(tiny_dataset: Path) -> None:
    config = tiny_config(tiny_dataset)
    data = pretrain.pretrain_data(config)
    assert data.num_val_videos == 4
    batch = data.val[0]
    assert len(data.val) == 1
    assert batch["valid"].tolist() == [True] * 4 + [False] * 4  # padded to the batch size
    # Different batch size, same tuples: each is drawn from its own example index.
    config.batch_size = 2
    small = pretrain.pretrain_data(config)
    np.testing.assert_array_equal(small.val[1]["clips"], batch["clips"][2:4])
    # 3 hosts, global batch 6: 4 videos -> 1 global batch; hosts hold 2+2+0 valid tuples and
    # the same number of batches, and the valid indices are the videos, once each.
    config.batch_size = 6
    hosts = [pretrain.pretrain_data(config, process_index=i, process_count=3) for i in range(3)]
    assert [len(h.val) for h in hosts] == [1, 1, 1]
    valid = np.concatenate([h.val[0]["index"][h.val[0]["valid"]] for h in hosts])
    np.testing.assert_array_equal(np.sort(valid), np.sort(batch["index"][batch["valid"]]))


def test_eval_draws_per_video_add_tuples_and_keep_the_first_draw(tiny_dataset: Path) -> None:
    config = tiny_config(tiny_dataset)
    one = pretrain.pretrain_data(config).val[0]
    config.cloze.eval_tuples_per_video = 3
    data = pretrain.pretrain_data(config)
    batches = [data.val[i] for i in range(len(data.val))]
    assert len(batches) == 2  # 4 videos x 3 draws = 12 tuples -> 2 batches of 8
    index = np.concatenate([b["index"][b["valid"]] for b in batches])
    assert len(index) == 12 and len(set(index.tolist())) == 12  # one cloze key per tuple
    videos = index % input_pipeline.DRAW_STRIDE
    assert sorted(np.bincount(videos).tolist())[-4:] == [3, 3, 3, 3]
    # The first draw of each video is the element of a one-draw evaluation; later draws differ.
    np.testing.assert_array_equal(batches[0]["clips"][:4], one["clips"][:4])
    np.testing.assert_array_equal(batches[0]["index"][:4], one["index"][:4])
    assert not np.array_equal(batches[0]["clips"][4:8], one["clips"][:4])


def test_missing_dataset_says_how_to_build_and_builds_nothing(
    tmp_path: Path, tiny_dataset: Path
) -> None:
    config = tiny_config(tiny_dataset)
    config.data.data_dir = str(tmp_path)
    with pytest.raises(datasets.DatasetNotBuiltError, match="tfds_builders.build"):
        pretrain.pretrain_data(config)
    assert not any(tmp_path.iterdir())  # nothing downloaded, prepared or created


def test_training_processes_do_not_import_the_video_decoder() -> None:
    # PyAV is for building datasets only. (OpenCV is imported by tensorflow_datasets itself.)
    code = ("import sys; import vcp_jax.pretrain, vcp_jax.input_pipeline; "
            "print(sorted(m for m in ('av',) if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                         text=True, env=dict(os.environ), check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
