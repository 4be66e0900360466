"""notebooks/quickstart.ipynb, executed top to bottom at its smallest setting, as CI runs it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

NOTEBOOK = REPO_ROOT / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_runs_without_errors(tmp_path: Path) -> None:
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    env = {
        "VCP_DEMO_SIZE": "tiny",
        "VCP_DEMO_WORKDIR": str(tmp_path / "workdir"),
        "VCP_DEMO_CACHE": str(tmp_path / "cache"),
    }
    saved = {k: os.environ.get(k) for k in (*env, "XLA_FLAGS")}
    os.environ.update(env)
    os.environ.pop("XLA_FLAGS", None)  # one CPU device, as on a Colab CPU runtime
    try:
        client = nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                                         resources={"metadata": {"path": str(NOTEBOOK.parent)}})
        client.execute()  # raises CellExecutionError on the first failing cell
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    outputs = "".join(
        out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
        for out in cell.get("outputs", []) if out.get("output_type") == "stream"
    )
    assert "VCP-rnd" in outputs  # the comparison table was printed
    images = sum(1 for cell in notebook.cells if cell.cell_type == "code"
                 for out in cell.get("outputs", []) if "image/png" in out.get("data", {}))
    assert images >= 3  # the sample frames and the comparison plots, inline
    workdir = tmp_path / "workdir"
    assert (workdir / "report.md").is_file()
    for stage in ("pretrain", "finetune_vcp", "finetune_random", "probe_vcp", "probe_random"):
        assert (workdir / stage / "metrics.json").is_file(), stage
    for stage in ("retrieval_vcp", "retrieval_random"):
        assert (workdir / stage / "retrieval.json").is_file(), stage
