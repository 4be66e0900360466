"""Shared test fixtures: the real data in ../shared/data, skipped cleanly when absent."""

from __future__ import annotations

import os
from pathlib import Path

# Eight simulated CPU devices for the whole session (before anything imports jax), so every test
# of the training code runs the data-parallel path it runs on 8 GPUs.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("VCP_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of official split files and real clips; skips the test when it is absent."""
    if not (SHARED_DATA / "samples" / "manifest.csv").is_file():
        pytest.skip(f"real test data not found at {SHARED_DATA} (see DEVELOPERS.md)")
    return SHARED_DATA


TINY_DATASET_CONFIG = "split1_32x43"


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic UCF101-layout dataset, generated and built once: returns its data_dir.

    4 motion classes x 8 videos of 72 frames at 32x48, built with the real builder at 32x43.
    """
    from tfds_builders import build
    from vcp_jax.data import synthetic

    root = tmp_path_factory.mktemp("tiny_dataset")
    synthetic.generate(root / "videos", layout="ucf101", num_classes=4, videos_per_class=8,
                       num_frames=72, height=32, width=48, seed=0)
    build.build("ucf101_frames", manual_dir=root / "videos", data_dir=root / "tfds",
                config=TINY_DATASET_CONFIG, num_workers=1)
    return root / "tfds"


def tiny_config(data_dir: Path):
    """The synthetic pretraining config shrunk for unit tests: 8-frame clips, width-4 R3D."""
    from configs import pretrain_synthetic

    config = pretrain_synthetic.get_config()
    config.data.data_dir = str(data_dir)
    config.data.config = TINY_DATASET_CONFIG
    config.data.synthetic = None
    config.data.crop_size = 24
    config.data.num_val_videos = 4
    config.data.num_threads = 2
    config.cloze.clip_len = 8
    config.cloze.interval = 4
    config.cloze.remote_gap = 8
    config.model.width = 4
    config.batch_size = 8
    config.optimizer.warmup_steps = 0
    config.optimizer.schedule = "constant"
    config.optimizer.learning_rate = 0.01
    config.num_train_steps = 4
    config.log_every_steps = 2
    config.eval_every_steps = 2
    config.checkpoint_every_steps = 2
    return config
