"""vcp_jax/host_memory.py: freed host memory stays with the process (glibc), opt-out by env."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vcp_jax import host_memory

REPO_ROOT = Path(__file__).resolve().parent.parent

# A fresh process (the setting binds before its threads start): allocates and frees a 256 MB
# buffer, then times the page faults of allocating and filling it again.
_PROBE = """
import resource, sys
from vcp_jax import host_memory
applied = host_memory.keep_freed_memory()
import numpy as np
np.ones(64 << 20, np.float32).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
np.ones(64 << 20, np.float32).sum()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(keep: str) -> tuple[bool, int]:
    # NumPy's own huge pages off: 4 KiB pages, as XLA's buffers get them, so faults count pages.
    env = {**os.environ, host_memory.ENV: keep, "PYTHONPATH": str(REPO_ROOT),
           "NUMPY_MADVISE_HUGEPAGE": "0"}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_a_freed_buffer_is_reused_without_page_faults() -> None:
    applied, faults = _probe("1")
    assert applied
    # 256 MB is 65536 pages of 4 KiB: refaulted under glibc's defaults, reused when kept.
    assert faults < 1000, faults
    applied, faults = _probe("0")
    assert not applied
    assert faults > 30000, faults


def test_it_is_applied_once_per_process() -> None:
    first = host_memory.keep_freed_memory()  # the test session applied it already (conftest)
    assert host_memory.keep_freed_memory() is first
