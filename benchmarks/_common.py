"""Shared helpers of the benchmarks: the machine, load averages, timing statistics, tables."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLES_DIR = REPO_ROOT.parent / "shared" / "data" / "samples"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# The x86 vector extensions that decide CPU conv speed (oneDNN uses AVX-512 / AMX where present;
# XLA:CPU gains less from them): /proc/cpuinfo flag -> name.
VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_vector_extensions() -> dict[str, bool]:
    """Which of `VECTOR_FLAGS` the CPU reports (all False where /proc/cpuinfo is unreadable)."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {f: f in flags for f in VECTOR_FLAGS}


def vector_extensions_line() -> str:
    ext = cpu_vector_extensions()
    have = [f for f, present in ext.items() if present]
    lacks = [f for f, present in ext.items() if not present]
    return ("vector extensions: " + (", ".join(have) or "none of " + ", ".join(VECTOR_FLAGS))
            + (f" (no {', '.join(lacks)})" if have and lacks else ""))


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def load_average() -> str:
    """The 1/5/15-minute load averages, as `uptime` prints them."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "n/a"
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine_lines(with_jax: bool = True) -> list[str]:
    """A few lines that say what machine the numbers were measured on."""
    mem = memory_gib()
    lines = [
        f"cpu: {cpu_model()}, {os.cpu_count()} cores ({usable_cores()} usable)"
        + (f", {mem:.1f} GiB RAM" if mem else ""),
        vector_extensions_line(),
        f"python {platform.python_version()}, {platform.system()} {platform.release()}",
    ]
    if with_jax:
        import jax  # noqa: PLC0415 - only the benchmarks that need it pay for the import

        devices = jax.devices()
        lines.append(
            f"jax {jax.__version__}: backend {jax.default_backend()}, {len(devices)} x "
            f"{devices[0].device_kind}"
        )
    lines.append(f"load average (1/5/15 min) at start: {load_average()}")
    return lines


def print_header(title: str, with_jax: bool = True) -> None:
    print(f"== {title} ==")
    for line in machine_lines(with_jax):
        print("  " + line)
    print()


def repeat(fn: Callable[[], Any], repeats: int) -> list[tuple[float, float]]:
    """Runs `fn` `repeats` times: [(wall seconds, process CPU seconds)] of each run."""
    out = []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        out.append((time.perf_counter() - wall, time.process_time() - cpu))
    return out


def rate_stats(count: float, times: Sequence[float]) -> tuple[float, float]:
    """(best, median) rate of `count` items over each of `times` (seconds)."""
    rates = [count / t for t in times if t > 0]
    if not rates:
        return float("nan"), float("nan")
    return max(rates), statistics.median(rates)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with right-aligned numbers (floats as given, pre-formatted)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for k, row in enumerate(cells):
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(
            zip(row, widths, strict=True))]
        lines.append("  ".join(padded))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # nan
            return "n/a"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
