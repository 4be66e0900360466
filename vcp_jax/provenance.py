"""`provenance.json` in every workdir: what a user compares when a number does not reproduce.

The fully resolved config, the code (git commit, and whether the tree had uncommitted changes),
package versions, the machine (devices, hosts), the data (dataset, fold, split, number of videos
and a hash of their ids) and where the backbone came from.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import ml_collections

from vcp_jax import backbone as backbone_lib
from vcp_jax import checkpointing, reporting

FILE = "provenance.json"
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "tensorflow-datasets",
            "array-record", "ml-collections", "numpy", "simplejpeg", "av",
            "opencv-python-headless", "torch")


def git_state(path: Path | None = None) -> dict[str, Any]:
    """The commit of the checkout holding `path` (this package by default) and if it is dirty."""
    where = Path(path or Path(__file__).resolve().parent)

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=where, capture_output=True, text=True,
                                 timeout=10, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "note": "not a git checkout (installed package?)"}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status)}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def machine() -> dict[str, Any]:
    devices = jax.devices()
    return {
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
        "hostname": socket.gethostname(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


def collect(
    config: ml_collections.ConfigDict,
    *,
    data: dict[str, Any] | None = None,
    init_from: backbone_lib.BackboneCheckpoint | None = None,
) -> dict[str, Any]:
    return {
        "written": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": sys.argv,
        "git": git_state(),
        "packages": package_versions(),
        "machine": machine(),
        "data": data or {},
        "init_from": None if init_from is None else {
            "path": str(init_from.path), "step": init_from.step, "task": init_from.task,
            "arch": init_from.arch, "width": init_from.width,
            "num_params": init_from.num_params, "dropped": list(init_from.dropped),
        },
        "config": checkpointing.config_to_dict(config),
    }


def write(
    workdir: Path,
    config: ml_collections.ConfigDict,
    *,
    data: dict[str, Any] | None = None,
    init_from: backbone_lib.BackboneCheckpoint | None = None,
) -> dict[str, Any]:
    """Writes `workdir/provenance.json` (process 0) and returns what it wrote.

    A resumed run keeps the records of its earlier starts under `earlier` (newest first), so the
    backbone a run was initialised from stays on record after a restart.
    """
    record = collect(config, data=data, init_from=init_from)
    path = Path(workdir) / FILE
    if path.is_file():
        try:
            old = reporting.read_json(path)
            record["earlier"] = [{k: v for k, v in old.items() if k != "earlier"},
                                 *old.get("earlier", [])]
        except (OSError, ValueError):
            pass  # an unreadable old record is replaced
    reporting.write_json(path, record)
    return record
