"""The README's main command, end to end: the demo at its CI size (`configs/demo.py:size=tiny`).

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

TABLE_ROWS = ("fine-tuning: video top-1", "fine-tuning: video top-5", "fine-tuning: clip top-1",
              "retrieval: top-1", "retrieval: top-5", "VCP probe: accuracy")


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
def test_tiny_demo_end_to_end_and_resume(tmp_path: Path) -> None:
    workdir, cache = tmp_path / "demo", tmp_path / "cache"
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
