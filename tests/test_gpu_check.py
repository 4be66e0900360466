"""`benchmarks/gpu_check.sh --smoke`: every phase of the accelerator check runs, on a CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_cudnn_versions_and_known_issues() -> None:
    parse = gpu_check.parse_cudnn_version
    assert parse(91002) == (9, 10, 2) and parse(8907) == (8, 9, 7)
    assert parse("9.15.1.9") == (9, 15, 1) and parse("91600") == (9, 16, 0)
    assert parse(None) is None and parse("n/a") is None
    hopper, turing = (9, 0), (7, 5)
    warn = gpu_check.cudnn_warnings
    # 3D-conv TF32 bug: 9.10.2 up to 9.15, on GPUs with TF32 (Ampere and newer).
    assert warn((9, 10, 1), hopper) == [] and warn((9, 16, 0), hopper) == []
    for bad in ((9, 10, 2), (9, 13, 0), (9, 15, 1)):
        assert len(warn(bad, hopper)) == 1 and "pytorch/pull/167024" in warn(bad, hopper)[0]
    # cuDNN 9.11+ on a pre-Ampere GPU (a T4 is 7.5): JAX's convolutions fail.
    assert warn((9, 10, 1), turing) == []
    assert any("30663" in w for w in warn((9, 11, 0), turing))
    assert any("30663" in w for w in warn((9, 17, 0), turing))
    assert not any("30663" in w for w in warn((9, 17, 0), hopper))
    assert warn(None, hopper) == []


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
    env = next(r for r in rows if r["kind"] == "env")
    assert "cuda" in env and env["warnings"] == [], env  # no cuDNN on a CPU machine
    # Precision: on a CPU, CPU default against CPU highest (labelled so), and the step times.
    precision = [r for r in rows if r["kind"] == "precision"]
    assert sorted(r["precision"] for r in precision) == ["default", "highest"], log
    for r in precision:
        assert r["status"] == "ok" and "no accelerator" in r["compare"], r
        assert r["max_abs_diff"] < 1e-4 and r["ref_max"] > 0, r
    timed = [r for r in rows if r["kind"] == "precision_step"]
    assert sorted((r["dtype"], r["precision"]) for r in timed) == [
        ("bfloat16", "default"), ("float32", "default"), ("float32", "highest")], log
    # On a loaded machine the phase may reach its time limit before the last configuration.
    assert timed[0]["status"] == "ok" and timed[0]["step_ms"] > 0, timed
    assert all(r["status"] in ("ok", "skipped (time budget)") for r in timed), timed
    # The roofline projection, for H100 and H200 and both dtypes.
    roofs = [r for r in rows if r["kind"] == "roofline"]
    assert {(r["dtype"], r["device"]) for r in roofs} == {
        (d, g) for d in ("float32", "bfloat16") for g in ("H100 SXM", "H200 SXM")}, log
    assert all(r["status"] == "ok" and 0 < r["mfu"] <= 1 and r["bound_ms"] > 0 for r in roofs)
    # The training loop end to end on the tiny synthetic videos: real input and fake input.
    loops = {r["input"]: r for r in rows if r["kind"] == "e2e"}
    assert set(loops) == {"real", "fake"}, log
    for r in loops.values():
        assert r["tuples_s"] > 0 and 0 <= r["input wait"] <= 1 and r["step ms (alone)"] > 0, r
    from configs import default  # noqa: PLC0415

    assert loops["real"]["threads"] == default.get_config("r3d").data.num_threads  # the default

    table = (tmp_path / "table.txt").read_text()
    for column in ("tuples/s", "step ms", "MFU %", "input wait", "loop / step", "roofline ms",
                   "step / roofline", "roofline PROJECTION", "x f32 default",
                   "cpu default vs cpu highest", "CUDA runtime"):
        assert column in table, table
