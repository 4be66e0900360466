"""Host memory that a step frees stays with the process for the next step (glibc's malloc).

XLA:CPU allocates every step's temporaries (gigabytes at the paper's size) with `malloc` and
frees them when the step ends. Under glibc's defaults a block over 32 MB is its own `mmap` and
goes back to the kernel when freed, and each thread's arena trims its heap: the next step
page-faults every page in again, zeroed by the kernel (R3D's VCP step at the paper's size, batch
2: 1.1 million faults, 4.5 GB, a step). On a VM that hands freed pages back to its host (free
page reporting, as on the 2-core machine this project is measured on) each of those faults also
waits for the host, and a step that follows a pause of a few seconds (an evaluation, a
checkpoint, the PyTorch step of an interleaved benchmark) takes twice as long.

`keep_freed_memory()` tells glibc to keep freed memory: one arena, no `mmap` for large blocks,
no trimming. Measured there (benchmarks/RESULTS.md §5): 0 faults a step instead of 1.1 million,
the paper-size step 6.0-6.9 s instead of 11.5-16 s back to back and 20-28 s after a pause, peak
resident memory 4.6 GB instead of 4.7 GB. The price: memory a run has used is not given back to
the system until it ends (its peak stays resident).

It must run before JAX starts its threads (each thread's first `malloc` picks its arena):
`main.py` calls it first thing. Set `VCP_JAX_KEEP_FREED_MEMORY=0` to keep glibc's defaults.
Elsewhere than glibc (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

ENV = "VCP_JAX_KEEP_FREED_MEMORY"
# mallopt's parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Sets glibc's malloc to keep what the process frees (module docstring); True if it did.

    Called once per process (again: returns the first answer). Does nothing, returning False,
    when `VCP_JAX_KEEP_FREED_MEMORY=0`, off Linux or without glibc.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - raises AttributeError off glibc (musl)
    except (OSError, AttributeError):
        return False
    # mallopt takes an int: -1 is read as the largest size_t, "never trim".
    _applied = all(libc.mallopt(param, value) == 1 for param, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
    return _applied
