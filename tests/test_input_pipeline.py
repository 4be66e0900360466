"""The pretraining input pipeline on a tiny synthetic dataset built by the real builder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import tiny_config
from vcp_jax import input_pipeline


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
    source = input_pipeline.data_source(config.data, "train")
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


def test_short_videos_skipped_and_counted(tiny_dataset: Path) -> None:
    config = tiny_config(tiny_dataset)
    config.cloze.clip_len = 16
    config.cloze.interval = 20  # span 16 * 3 + 2 * 20 = 88 > 72 frames: every video too short
    with pytest.raises(ValueError, match="no training video"):
        input_pipeline.pretrain_data(config)
    config.cloze.interval = 8  # span 64 <= 72
    data = input_pipeline.pretrain_data(config)
    assert data.num_too_short == 0 and data.num_train_videos + data.num_val_videos == 20


def test_train_stream_deterministic_and_host_sharded(tiny_dataset: Path) -> None:
    config = tiny_config(tiny_dataset)
    first = input_pipeline.pretrain_data(config)
    second = input_pipeline.pretrain_data(config)
    for step in (0, 5):  # random access: batch k is the same in every run
        a, b = first.train[step], second.train[step]
        np.testing.assert_array_equal(a["clips"], b["clips"])
        np.testing.assert_array_equal(a["index"], b["index"])
    assert first.train[0]["clips"].shape == (8, 3, 8, 24, 24, 3)
    # Two hosts: each reads half of the videos, disjoint, with half the global batch.
    hosts = [input_pipeline.pretrain_data(config, process_index=i, process_count=2)
             for i in range(2)]
    seen = [{int(i) for k in range(6) for i in h.train[k]["index"]} for h in hosts]
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert hosts[0].train[0]["clips"].shape[0] == 4


def test_iterator_state_resumes(tiny_dataset: Path) -> None:
    config = tiny_config(tiny_dataset)
    data = input_pipeline.pretrain_data(config)
    it = input_pipeline.make_iterator(data.train, config)
    next(it), next(it)
    state = it.get_state()
    expected = next(it)
    resumed = input_pipeline.make_iterator(data.train, config)
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["clips"], expected["clips"])


def test_validation_tuples_use_the_example_index(tiny_dataset: Path) -> None:
    config = tiny_config(tiny_dataset)
    data = input_pipeline.pretrain_data(config)
    assert data.num_val_videos == 4
    batch = data.val[0]
    assert batch["valid"].tolist() == [True] * 4 + [False] * 4  # padded to the batch size
    # Different batch size, same tuples: each is drawn from its own example index.
    config.batch_size = 2
    small = input_pipeline.pretrain_data(config)
    np.testing.assert_array_equal(small.val[1]["clips"], batch["clips"][2:4])


def test_missing_dataset_says_how_to_build(tmp_path: Path, tiny_dataset: Path) -> None:
    config = tiny_config(tiny_dataset)
    config.data.data_dir = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="tfds_builders.build"):
        input_pipeline.pretrain_data(config)
