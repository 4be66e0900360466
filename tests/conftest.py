"""Shared test fixtures: the real data in ../shared/data, skipped cleanly when absent."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# XLA's backend (LLVM) optimisations off, for the session and the main.py runs it starts: the
# tests' models are tiny and run a few steps each, so compiling is most of their time. Without
# those passes the tiny R3D train step compiles in 2/3 of the time (25 s -> 17 s on 2 cores) and
# runs 3x slower (63 -> 191 ms), which the tests' few steps do not notice (tests/test_models.py
# and `benchmarks/gpu_check.sh --smoke` do the same). The tests compare runs compiled alike (1 and
# 8 devices, straight and resumed, 1 and 2 processes; the demo and the notebook, which reuses the
# demo's compiled steps); test_main's and test_packaging's runs keep XLA's defaults, as users
# run them.
FAST_COMPILE_XLA_FLAG = "--xla_backend_optimization_level=0"


def xla_flags(num_devices: int) -> str:
    """XLA_FLAGS for a test process: `num_devices` simulated CPU devices, fast compiles."""
    return f"--xla_force_host_platform_device_count={num_devices} {FAST_COMPILE_XLA_FLAG}"


# Eight simulated CPU devices for the whole session (before anything imports jax), so every test
# of the training code runs the data-parallel path it runs on 8 GPUs.
os.environ.setdefault("XLA_FLAGS", xla_flags(8))
# One JAX compilation cache for the session, inherited by the processes the tests start (main.py
# runs, the notebook's kernel, 2-process runs): a step compiled once is loaded after that, as
# `main.py --compilation_cache` does for users. Fresh per session, so no test sees an old entry.
# Made by the first process (pytest-xdist's workers inherit it) and removed by that one only.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _JAX_CACHE = tempfile.mkdtemp(prefix="vcp_jax_tests_jax_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _JAX_CACHE
    atexit.register(shutil.rmtree, _JAX_CACHE, ignore_errors=True)
# Every compilation stored, not only those of a second or more (JAX's default, which main.py keeps
# for users): a tiny-config main.py run otherwise compiles ~100 small programs afresh each time
# (the per-shape parameter inits, Orbax's per-device slices of the first save), 3-4 s of a warm
# 14 s run on 2 cores, and the suite starts about 40 such runs.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest  # noqa: E402

from tests.tiny_configs import TINY_DATASET_CONFIG, tiny_config  # noqa: E402, F401

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("VCP_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


# The test files that take longest in the full run on 2 cores, longest first. pytest-xdist hands
# out whole files (`--dist loadfile`) in collection order (pyproject.toml turns off its default
# reordering, which puts the files with the most tests first and so started these few-test,
# minutes-long files last, the run waiting on them at its end); starting the longest first lets
# the many short files fill in around them. Only the order depends on this list: a file missing
# from it runs after these, in the usual order.
LONGEST_FILES_FIRST = (
    "test_multihost.py",
    "test_pretrain.py",
    "test_gpu_check.py",
    "test_demo.py",
    "test_finetune.py",
    "test_faults.py",
    "test_models.py",
    "test_vcop_parity.py",
    "test_torch_parity.py",
    "test_pretext.py",
    "test_packaging.py",
    "test_bn_calibration.py",
    "test_convert_torch.py",
    "test_vcop.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The files of LONGEST_FILES_FIRST first, in its order (a stable sort: each file's tests
    stay together and in their order, so module fixtures are still made once)."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


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
