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
no trimming. Measured there (benchmarks/RESULTS.md §5): at the paper's size 0 faults a step
instead of 1.1 million, the step 6.0-7.3 s instead of 11.5-19 s back to back and 20-28 s after a
pause. But the demo (32x32 crops, width 8: no buffer near glibc's 32 MB `mmap` threshold, and
compile- and input-bound) ran its first run 23% slower with it (320 s against 259 s; one arena
for every thread's small allocations), with identical results. So `configure(config)` keeps
freed memory only for paper-sized inputs: when a stage's `data.crop_size` is at least
`MIN_CROP_SIZE` (the sizes in between are not measured).

It must run before JAX starts its threads (each thread's first `malloc` picks its arena):
`main.py` calls `configure` before anything touches JAX. `VCP_JAX_KEEP_FREED_MEMORY=1` keeps
freed memory whatever the input, `=0` never. Elsewhere than glibc (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Any

ENV = "VCP_JAX_KEEP_FREED_MEMORY"
# `configure`'s threshold: the paper's 112 gains ~2x a step, the demo's 32 loses 23% end to end.
MIN_CROP_SIZE = 64
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
    if _env_choice() is False:
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


def _env_choice() -> bool | None:
    """`VCP_JAX_KEEP_FREED_MEMORY`: True (1, on), False (0, off) or None (unset, auto)."""
    value = os.environ.get(ENV, "auto").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    return None


def largest_crop_size(config: Any) -> int:
    """The largest `data.crop_size` in `config` and the stage configs nested in it (the demo's),
    0 without one."""
    sizes = [0]
    if hasattr(config, "items"):
        data = config.get("data")
        if data is not None and hasattr(data, "get") and data.get("crop_size"):
            sizes.append(int(data.get("crop_size")))
        sizes += [largest_crop_size(value) for _, value in config.items()]
    return max(sizes)


def configure(config: Any) -> bool:
    """Keeps freed memory (`keep_freed_memory`) for paper-sized inputs (module docstring), or as
    `VCP_JAX_KEEP_FREED_MEMORY` says; True if it did."""
    choice = _env_choice()
    if choice is None:
        choice = largest_crop_size(config) >= MIN_CROP_SIZE
    return keep_freed_memory() if choice else False
