"""What a run writes for people: TensorBoard scalars, JSON results and PNG plots (process 0 only).

Every writer here is a no-op on processes other than 0, so stage code calls them unconditionally
and a multi-host run writes each file once. The plots need matplotlib (a dependency of the
package); without it a stage still ends with its results, and says once "plots skipped: install
matplotlib".
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np


def is_main_process() -> bool:
    return jax.process_index() == 0


def console(message: str) -> None:
    """A line for people on the console (process 0 only); library logs go to the log file."""
    if is_main_process():
        print(message, flush=True)


def metric_writer(workdir: Path) -> Any:
    """A tensorboardX writer in `workdir/tensorboard` (None on processes other than 0)."""
    if not is_main_process():
        return None
    return _summary_writer_class()(str(Path(workdir) / "tensorboard"))


@functools.cache
def _summary_writer_class() -> type:
    """tensorboardX's SummaryWriter, imported without PyTorch.

    tensorboardX imports torch whenever it is installed (the test setup and the checkpoint
    converter install it), only to accept torch tensors; the writers here pass Python floats.
    That import was 2.9 s of a 10 s tiny run on 2 cores, paid by every run. Blocking it for the
    import leaves tensorboardX on its numpy-only path; a later `import torch` works as usual.
    """
    blocked = "torch" not in sys.modules
    if blocked:
        sys.modules["torch"] = None  # type: ignore[assignment] - makes `import torch` fail
    try:
        from tensorboardX import SummaryWriter  # noqa: PLC0415 - only process 0 writes
    finally:
        if blocked:
            del sys.modules["torch"]
    return SummaryWriter


def write_scalars(writer: Any, step: int, scalars: Mapping[str, Any], prefix: str = "") -> None:
    """Every finite number of `scalars` as a TensorBoard scalar (no-op without a writer)."""
    if writer is None:
        return
    for name, value in scalars.items():
        if isinstance(value, int | float) and math.isfinite(float(value)):
            writer.add_scalar(prefix + name, float(value), step)
    writer.flush()


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; null reads as "not measured"
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Path, data: Any) -> None:
    """Writes `data` as indented JSON, atomically (a reader never sees half a file)."""
    if not is_main_process():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=2) + "\n")
    tmp.replace(path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


PLOTS_SKIPPED = "plots skipped: install matplotlib"


@functools.cache
def plotting_available() -> bool:
    """Whether matplotlib is installed; when it is not, says so once per process (process 0)."""
    try:
        import matplotlib  # noqa: F401, PLC0415 - the plots are the only users
    except ImportError:
        console(PLOTS_SKIPPED)
        return False
    return True


def figure(figsize: tuple[float, float]) -> Any:
    """A matplotlib `Figure` of its own (the object API: no pyplot, no global backend), so
    writing a plot leaves a notebook's or a user's pyplot and backend as they were. The one
    plotting policy of vcp-jax: every plot is made here and saved with `fig.savefig`."""
    from matplotlib.figure import Figure  # noqa: PLC0415 - plotting is optional work at the end

    return Figure(figsize=figsize)


def plot_confusion(
    path: Path, matrix: np.ndarray, names: Sequence[str], title: str, *, normalize: bool = True
) -> None:
    """A confusion matrix (rows: true class, columns: predicted) as a PNG."""
    if not is_main_process() or not plotting_available():
        return
    matrix = np.asarray(matrix, np.float64)
    shown = matrix / np.maximum(matrix.sum(1, keepdims=True), 1) if normalize else matrix
    n = len(names)
    size = min(4 + 0.18 * n, 24)
    fig = figure((size, size * 0.9))
    ax = fig.subplots()
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    ticks = np.arange(n)
    label_size = 8 if n <= 26 else max(3, int(200 / n))
    ax.set_xticks(ticks, names, rotation=90, fontsize=label_size)
    ax.set_yticks(ticks, names, fontsize=label_size)
    if n <= 12:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{shown[i, j]:.2f}" if normalize else f"{int(matrix[i, j])}",
                        ha="center", va="center", fontsize=8,
                        color="white" if shown[i, j] > 0.6 * (shown.max() or 1) else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_curves(
    path: Path,
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    logx: bool = False,
) -> None:
    """Named (x, y) curves on one plot, as a PNG."""
    if not is_main_process() or not plotting_available():
        return
    fig = figure((6, 4))
    ax = fig.subplots()
    for name, (x, y) in curves.items():
        ax.plot(x, y, marker="o", label=name)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_bars(
    path: Path,
    groups: Mapping[str, Mapping[str, float]],
    *,
    title: str,
    ylabel: str,
) -> None:
    """Grouped bars: `groups[series][category] = value`, as a PNG."""
    if not is_main_process() or not plotting_available():
        return
    series = list(groups)
    categories = list(dict.fromkeys(c for s in series for c in groups[s]))
    x = np.arange(len(categories))
    width = 0.8 / max(len(series), 1)
    fig = figure((max(6, 0.9 * len(categories) + 2), 4))
    ax = fig.subplots()
    for i, name in enumerate(series):
        values = [groups[name].get(c, float("nan")) for c in categories]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(x, categories, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
