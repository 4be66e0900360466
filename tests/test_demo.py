"""The demo as users run it, at its CI size (`configs/demo.py:size=tiny`): the README's main
command, then the Colab notebook (notebooks/quickstart.ipynb) top to bottom.

Runs `main.py` in a subprocess as a user does (one CPU device; XLA's quickest compilation, as
the other tests: tests/conftest.py), with the generated videos, built datasets and workdir in a
temporary folder: both synthetic datasets are
generated and built by the real builders, then all nine stages run on the real code path. The
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

from tests.conftest import FAST_COMPILE_XLA_FLAG, REPO_ROOT
from vcp_jax import demo

NOTEBOOK = REPO_ROOT / "notebooks" / "quickstart.ipynb"

# Rows with a paired interval of the difference (per-item results of both runs), and without.
PAIRED_ROWS = ("fine-tuning: video top-1", "fine-tuning: video top-5", "linear eval: video top-1",
               "retrieval: top-1", "retrieval: top-5", "retrieval: top-10")
TABLE_ROWS = (*PAIRED_ROWS, "VCP probe: accuracy")
NUM = r"\d\.\d{3}"
SIGNED = r"[+-]\d\.\d{3}"


@pytest.fixture(scope="module")
def tiny_demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo's `cache_dir` (generated videos, built datasets): made by the first test,
    reused by the next, as a user's second run does (one file, so never two at once)."""
    return tmp_path_factory.mktemp("tiny_demo_cache")


def _run_demo(workdir: Path, cache: Path) -> str:
    cmd = [sys.executable, "main.py", "--config", "configs/demo.py:size=tiny",
           f"--workdir={workdir}", f"--config.cache_dir={cache}"]
    # One CPU device, as a user runs it, compiled quickly (tests/conftest.py: the steps are
    # tiny and few, so compiling is most of the time; test_main's run keeps XLA's defaults).
    env = {**os.environ, "XLA_FLAGS": FAST_COMPILE_XLA_FLAG}
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def _ran(stdout: str) -> set[str]:
    """The stages a run ran (rather than found done): `[i/n] name` lines without 'done before'."""
    return {m.group(1) for m in re.finditer(r"^\[\d+/\d+\] (\w+)$", stdout,
                                            flags=re.MULTILINE)}


def _skipped(stdout: str) -> set[str]:
    return {m.group(1) for m in re.finditer(r"^\[\d+/\d+\] (\w+): done before", stdout,
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
    # Columns: chance, VCP, random, VCP - random [95% CI] (paired rows), n.
    assert re.search(r"chance\s+VCP\s+random\s+VCP-rnd \[95% CI\]\s+n", stdout), stdout[-3000:]
    for row in TABLE_ROWS:
        interval = rf" \[{SIGNED}, {SIGNED}\]" if row in PAIRED_ROWS else ""
        assert re.search(rf"^{re.escape(row)}\s+{NUM}\s+{NUM}\s+{NUM}\s+{SIGNED}{interval}\s+\d+$",
                         stdout, flags=re.MULTILINE), (row, stdout[-3000:])
    report = (workdir / demo.REPORT).read_text()
    assert ("| metric | chance | VCP [95% CI] | random init [95% CI] | VCP - random [95% CI] "
            "| n |") in report
    assert "hypergeometric" in report and "Wilson" in report
    for row in TABLE_ROWS:
        assert f"| {row} |" in report, row
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (workdir / image).is_file(), image
    assert "finetune.png" in report and "retrieval_topk.png" in report
    summary = json.loads((workdir / "metrics.json").read_text())
    assert set(summary["stage_seconds"]) == set(demo.STAGES)
    rows = {r["metric"]: r for r in summary["comparison"]}
    for row in PAIRED_ROWS:
        assert rows[row]["difference_ci"] is not None and rows[row]["n"] > 0, rows[row]
        assert 0 < rows[row]["chance"] <= 1 and rows[row]["vcp_ci"] is not None
    assert rows["fine-tuning: video top-1"]["chance"] == 0.25  # 4 classes at the tiny size
    linear = json.loads((workdir / "linear_vcp" / "metrics.json").read_text())
    assert linear["mode"] == "linear evaluation"

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

    # The learning rate that trained, and the train accuracy next to the test accuracy.
    for name in ("pretrain", "finetune_vcp", "probe_vcp"):
        metrics = json.loads((workdir / name / "metrics.json").read_text())
        assert metrics["effective_learning_rate"] > 0, name
    finetuned = json.loads((workdir / "finetune_vcp" / "metrics.json").read_text())
    assert 0 <= finetuned["test"]["train_video_top1"] <= 1
    assert finetuned["chosen_step"] == finetuned["best_checkpoint_step"]


def test_a_stage_is_reused_only_with_the_config_it_ran_with(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`demo.run`'s bookkeeping with stand-in stages (no training): what reruns, what is kept."""
    from configs import demo as demo_config

    calls: list[str] = []

    def runner(task):
        def run(config, stage_dir):
            calls.append(stage_dir.name)
            result = {"task": task}
            (stage_dir / demo.RESULT_FILES[task]).write_text(json.dumps(result))
            return result
        return run

    monkeypatch.setattr(demo, "runners", lambda: {task: runner(task) for task in demo.RESULT_FILES})
    monkeypatch.setattr(demo, "comparison", lambda results, *a, **k: [])
    monkeypatch.setattr(demo, "render_report", lambda *a, **k: "")
    monkeypatch.setattr(demo, "render_table", lambda *a, **k: "")
    workdir = tmp_path / "demo"
    config = demo_config.get_config("size=tiny")
    config.cache_dir = str(tmp_path / "cache")

    def run_demo() -> set[str]:
        calls.clear()
        demo.run(config, workdir)
        return set(calls)

    assert run_demo() == set(demo.STAGES)
    assert all((workdir / name / demo.STAGE_RECORD).is_file() for name in demo.STAGES)
    assert run_demo() == set()  # the same config: every stage reused

    # A changed fine-tuning config: those two stages rerun from scratch, the old ones aside.
    capsys.readouterr()
    config.finetune.num_train_steps += 1
    assert run_demo() == {"finetune_vcp", "finetune_random"}
    out = capsys.readouterr().out
    assert re.search(r"finetune_vcp: config differs from the earlier run's \(num_train_steps\)",
                     out), out
    assert (workdir / "finetune_vcp.stale" / demo.STAGE_RECORD).is_file()

    # A changed pretraining: it reruns, and so does every stage that starts from it.
    config.pretrain.num_train_steps += 1
    stages = demo.stage_configs(config, workdir)
    from_pretrain = {name for name in demo.STAGES
                     if stages[name].get("init_from") == str(workdir / "pretrain")}
    assert from_pretrain >= {"finetune_vcp", "probe_vcp"}
    assert run_demo() == {"pretrain"} | from_pretrain
    assert "pretrain was rerun" in capsys.readouterr().out

    # An interrupted stage (no results yet) with the same config resumes in its folder.
    (workdir / "probe_random" / "metrics.json").unlink()
    (workdir / "probe_random" / "checkpoint").write_text("kept")
    assert run_demo() == {"probe_random"}
    assert (workdir / "probe_random" / "checkpoint").read_text() == "kept"
    # A stage folder that records no config (an older demo's) is not trusted.
    (workdir / "retrieval_random" / demo.STAGE_RECORD).unlink()
    assert run_demo() == {"retrieval_random"}
    assert "no recorded config" in capsys.readouterr().out


def test_init_overrides_set_one_inits_stage_and_name_a_wrong_key(tmp_path: Path) -> None:
    """`config.init_overrides`: the demo's per-init fine-tuning rates reach exactly those two
    stages (linear evaluation keeps its own rate), and a wrong key is named."""
    from configs import demo as demo_config
    from vcp_jax import config_utils

    config = demo_config.get_config("size=tiny")
    stages = demo.stage_configs(config, tmp_path)
    assert stages["finetune_vcp"].optimizer.learning_rate == 0.3
    assert stages["finetune_random"].optimizer.learning_rate == 0.03
    assert stages["linear_vcp"].optimizer.learning_rate == \
        stages["linear_random"].optimizer.learning_rate == config.linear.optimizer.learning_rate
    # Everything else of the two fine-tuning stages is the same.
    vcp, random = (stages[f"finetune_{i}"].to_dict() for i in ("vcp", "random"))
    for run in (vcp, random):
        run.pop("init_from", None)
        run["optimizer"].pop("learning_rate")
    assert vcp == random

    for bad, message in (
            ({"pretrained": {"finetune": {"optimizer": {"lr": 1.0}}}},
             "config.init_overrides.pretrained.finetune.optimizer.lr: the stage has no key"),
            ({"vcp": {}}, "config.init_overrides.vcp: choose one of ('pretrained', 'random')"),
            ({"random": {"pretrain": {"seed": 1}}},
             "config.init_overrides.random.pretrain: not a stage with two inits")):
        config.init_overrides = bad
        with pytest.raises(config_utils.ConfigError, match=re.escape(message)):
            demo.stage_configs(config, tmp_path)


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
    # One CPU device, as on a Colab CPU runtime; compiled as _run_demo's runs (which it reuses
    # from the session's compilation cache).
    os.environ["XLA_FLAGS"] = FAST_COMPILE_XLA_FLAG
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
