"""`benchmarks/gpu_check.sh --smoke`: every phase of the accelerator check runs, on a CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_smoke(tmp_path: Path) -> None:
    # One CPU device, like the one GPU the check is for (conftest asks for 8 simulated ones).
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(GPU_CHECK_OUT=str(tmp_path), PYTHON=sys.executable, JAX_PLATFORMS="cpu")
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--smoke"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, log
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]

    steps = [r for r in rows if r["kind"] == "step" and not r["conv"].startswith("torch")]
    assert sorted((r["arch"], r["dtype"], r["conv"], r["step"]) for r in steps) == [
        ("c3d", "bfloat16", "native", "model step (no cloze)"),
        ("r3d", "float32", "conv2d_mm", "pretrain.train_step"),
        ("r3d", "float32", "native", "pretrain.train_step"),
    ], log
    for r in steps:
        assert r["status"] == "ok" and r["tuples_s"] > 0 and r["step_ms"] > 0, r
    convs = [r for r in rows if r["kind"] == "conv" and not r["impl"].startswith("torch")]
    assert {r["impl"] for r in convs} == {"native", "conv2d_mm"}
    assert all(r["status"] == "ok" and r["wgrad_ms"] > 0 for r in convs), convs
    assert [r["kind"] for r in rows].count("env") == 1
    # The training loop end to end on the tiny synthetic videos: real input and fake input.
    loops = {r["input"]: r for r in rows if r["kind"] == "e2e"}
    assert set(loops) == {"real", "fake"}, log
    for r in loops.values():
        assert r["tuples_s"] > 0 and 0 <= r["input wait"] <= 1 and r["step ms (alone)"] > 0, r

    table = (tmp_path / "table.txt").read_text()
    for column in ("tuples/s", "step ms", "MFU %", "input wait", "loop / step"):
        assert column in table, table
