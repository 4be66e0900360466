"""Shared test fixtures: the real data in ../shared/data, skipped cleanly when absent."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# Eight simulated CPU devices for the whole session (before anything imports jax), so every test
# of the training code runs the data-parallel path it runs on 8 GPUs.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# One JAX compilation cache for the session, inherited by the processes the tests start (main.py
# runs, the notebook's kernel, 2-process runs): a step compiled once is loaded after that, as
# `main.py --compilation_cache` does for users. Fresh per session, so no test sees an old entry.
# Made by the first process (pytest-xdist's workers inherit it) and removed by that one only.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _JAX_CACHE = tempfile.mkdtemp(prefix="vcp_jax_tests_jax_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _JAX_CACHE
    atexit.register(shutil.rmtree, _JAX_CACHE, ignore_errors=True)

import pytest  # noqa: E402

from tests.tiny_configs import TINY_DATASET_CONFIG, tiny_config  # noqa: E402, F401

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("VCP_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of official split files and real clips; skips the test when it is absent."""
    if not (SHARED_DATA / "samples" / "manifest.csv").is_file():
        pytest.skip(f"real test data not found at {SHARED_DATA} (see DEVELOPERS.md)")
    return SHARED_DATA


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
