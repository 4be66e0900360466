"""vcp_jax/host_memory.py: freed host memory stays with the process (glibc) for paper-sized
inputs, or as the environment says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from configs import demo, pretrain_r3d
from vcp_jax import host_memory

REPO_ROOT = Path(__file__).resolve().parent.parent

# A fresh process (the setting binds before its threads start): decides for a config of the
# given crop size, allocates and frees a 256 MB buffer, then counts the page faults of
# allocating and filling it again.
_PROBE = """
import resource, sys
import ml_collections
from vcp_jax import host_memory
config = ml_collections.ConfigDict({"data": {"crop_size": int(sys.argv[1])}})
applied = host_memory.configure(config)
import numpy as np
np.ones(64 << 20, np.float32).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
np.ones(64 << 20, np.float32).sum()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(keep: str, crop_size: int) -> tuple[bool, int]:
    # NumPy's own huge pages off: 4 KiB pages, as XLA's buffers get them, so faults count pages.
    env = {**os.environ, host_memory.ENV: keep, "PYTHONPATH": str(REPO_ROOT),
           "NUMPY_MADVISE_HUGEPAGE": "0"}
    out = subprocess.run([sys.executable, "-c", _PROBE, str(crop_size)], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
@pytest.mark.parametrize(("keep", "crop_size", "expected"), [
    ("auto", 112, True), ("auto", 32, False), ("1", 32, True), ("0", 112, False)])
def test_a_freed_buffer_is_reused_without_page_faults_when_kept(
        keep: str, crop_size: int, expected: bool) -> None:
    applied, faults = _probe(keep, crop_size)
    assert applied is expected
    # 256 MB is 65536 pages of 4 KiB: refaulted under glibc's defaults, reused when kept.
    if expected:
        assert faults < 1000, faults
    else:
        assert faults > 30000, faults


def test_the_paper_configs_keep_it_and_the_demo_does_not() -> None:
    assert host_memory.largest_crop_size(pretrain_r3d.get_config()) == 112
    assert host_memory.largest_crop_size(demo.get_config()) == 32  # its stages' crops, nested
    assert host_memory.largest_crop_size(demo.get_config()) < host_memory.MIN_CROP_SIZE <= 112
