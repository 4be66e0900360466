"""The demo as users run it, at its CI size (`configs/demo.py:size=tiny`): the README's main
command, then the Colab notebook (notebooks/quickstart.ipynb) top to bottom.

Runs `main.py` in a subprocess exactly as a user does (one CPU device: no XLA_FLAGS), with the
generated videos, built datasets and workdir in a temporary folder: both synthetic datasets are
generated and built by the real builders, then all seven stages run on the real code path. The
tiny size shows no effect of pretraining (a few steps on 8-frame clips); the full size's numbers
are in benchmarks/RESULTS.md. Then the resumption contract: rerunning the same command skips
every finished stage, and deleting one stage's result file reruns that stage only.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from vcp_jax import demo

NOTEBOOK = REPO_ROOT / "notebooks" / "quickstart.ipynb"

TABLE_ROWS = ("fine-tuning: video top-1", "fine-tuning: video top-5", "fine-tuning: clip top-1",
              "retrieval: top-1", "retrieval: top-5", "VCP probe: accuracy")


@pytest.fixture(scope="module")
def tiny_demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo's `cache_dir` (generated videos, built datasets): made by the first test,
    reused by the next, as a user's second run does (one file, so never two at once)."""
    return tmp_path_factory.mktemp("tiny_demo_cache")


def _run_demo(workdir: Path, cache: Path) -> str:
    cmd = [sys.executable, "main.py", "--config", "configs/demo.py:size=tiny",
           f"--workdir={workdir}", f"--config.cache_dir={cache}"]
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # as a user runs it: one CPU device
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def _ran(stdout: str) -> set[str]:
    """The stages a run ran (rather than found done): `[i/7] name` lines without 'done before'."""
    return {m.group(1) for m in re.finditer(r"^\[\d/7\] (\w+)$", stdout, flags=re.MULTILINE)}


def _skipped(stdout: str) -> set[str]:
    return {m.group(1) for m in re.finditer(r"^\[\d/7\] (\w+): done before", stdout,
                                            flags=re.MULTILINE)}


@pytest.mark.slow
def test_tiny_demo_end_to_end_and_resume(tmp_path: Path, tiny_demo_cache: Path) -> None:
    workdir, cache = tmp_path / "demo", tiny_demo_cache
    stdout = _run_demo(workdir, cache)

    # Every stage ran, each in its own sub-workdir with its results file.
    assert _ran(stdout) == set(demo.STAGES), stdout[-3000:]
    for name in demo.STAGES:
        result_file = workdir / name / demo.RESULT_FILES[name.split("_")[0]]
        assert result_file.is_file(), result_file
        json.loads(result_file.read_text())
    # The datasets were generated and built in the cache folder, not in the home folder.
    assert (cache / "videos_pretrain" / "synthetic.json").is_file()
    assert (cache / "videos_finetune" / "synthetic.json").is_file()
    assert (cache / "tensorflow_datasets" / "ucf101_frames").is_dir()
    assert (cache / "tensorflow_datasets" / "hmdb51_frames").is_dir()

    # The comparison table on the console and in report.md, with its plots.
    assert re.search(r"VCP\s+random\s+VCP-rnd", stdout), stdout[-3000:]
    for row in TABLE_ROWS:
        assert re.search(rf"^{re.escape(row)}\s+\d\.\d{{3}}\s+\d\.\d{{3}}\s+[+-]\d\.\d{{3}}$",
                         stdout, flags=re.MULTILINE), (row, stdout[-3000:])
    report = (workdir / demo.REPORT).read_text()
    assert "| metric | VCP | random init | VCP - random |" in report
    for row in TABLE_ROWS:
        assert f"| {row} |" in report, row
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (workdir / image).is_file(), image
    assert "finetune.png" in report and "retrieval_topk.png" in report
    summary = json.loads((workdir / "metrics.json").read_text())
    assert set(summary["stage_seconds"]) == set(demo.STAGES)

    # The same command again: every stage is found done, none reruns; the table is printed.
    stdout = _run_demo(workdir, cache)
    assert _skipped(stdout) == set(demo.STAGES) and not _ran(stdout), stdout[-3000:]
    assert "fine-tuning: video top-1" in stdout

    # One stage's results file gone: that stage alone runs again.
    (workdir / "finetune_random" / "metrics.json").unlink()
    stdout = _run_demo(workdir, cache)
    assert _ran(stdout) == {"finetune_random"}, stdout[-3000:]
    assert _skipped(stdout) == set(demo.STAGES) - {"finetune_random"}
    assert (workdir / "finetune_random" / "metrics.json").is_file()


@pytest.mark.slow
def test_quickstart_notebook_runs_without_errors(tmp_path: Path, tiny_demo_cache: Path) -> None:
    """notebooks/quickstart.ipynb top to bottom, smallest setting (the demo's cache reused)."""
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    env = {
        "VCP_DEMO_SIZE": "tiny",
        "VCP_DEMO_WORKDIR": str(tmp_path / "workdir"),
        "VCP_DEMO_CACHE": str(tiny_demo_cache),
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
