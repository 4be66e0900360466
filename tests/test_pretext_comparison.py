"""benchmarks/pretext_comparison.py without training: the plan of runs, the stage configs,
reuse of a demo_seeds workdir (and its refusal), and the table, JSON and plot from results
written in the layout the demo's stages write them."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from benchmarks import demo_seeds
from benchmarks import pretext_comparison as pc
from vcp_jax import demo, reporting

TINY = "configs/demo.py:size=tiny"
N = 8  # test videos / queries of the fake stages


@pytest.fixture(scope="module")
def config() -> Any:
    return demo_seeds.load_config(TINY)


def _flat(config: Any) -> dict[str, Any]:
    return demo._flatten(json.loads(config.to_json_best_effort()))


# -------------------------------------------------------------------------- fake stage results


def _ranks(correct: int) -> list[int]:
    return [1] * correct + [2] * (N - correct)  # the first `correct` items right at top-1


def _classifier(correct: int) -> dict[str, Any]:
    """A fine-tuning / linear-evaluation metrics.json (the keys demo.comparison reads)."""
    labels = [i % 4 for i in range(N)]
    return {"task": "finetune", "class_names": ["right", "left", "up", "down"],
            "test": {"video_top1": correct / N, "num_test_videos": N,
                     "per_video": {"index": list(range(N)), "label": labels,
                                   "predicted": labels, "label_rank": _ranks(correct)}}}


def _retrieval(correct: int) -> dict[str, Any]:
    return {"task": "retrieval", "num_queries": N, "topk": {"1": correct / N, "5": 1.0},
            "chance_topk": {"1": 0.25, "5": 1.0},
            "per_query": {"label": [i % 4 for i in range(N)], "first_hit_rank": _ranks(correct)}}


def _pretrain(pretext: str, accuracy: float) -> dict[str, Any]:
    return {"task": "pretrain", "pretext": pretext, f"val_{pretext}_accuracy": accuracy,
            "val_tuples": 48, "chance_accuracy": 0.25 if pretext == "vcp" else 1 / 6}


def _write_run(run: pc.Run, correct: dict[str, int], pretext_accuracy: float = 0.9,
               stages: dict[str, Any] | None = None) -> None:
    """`run`'s result files (and, given its stage configs, the records the demo writes)."""
    pretrain_id = uuid.uuid4().hex
    for protocol in run.protocols:
        name = run.stage(protocol)
        folder = run.folder / name
        folder.mkdir(parents=True, exist_ok=True)
        if protocol == pc.PRETEXT:
            result, file = _pretrain(run.pretext, pretext_accuracy), "metrics.json"
        elif protocol == "retrieval":
            result, file = _retrieval(correct[protocol]), "retrieval.json"
        else:
            result, file = _classifier(correct[protocol]), "metrics.json"
        reporting.write_json(folder / file, result)
        if stages is not None:
            record = {"stage": name, "run_id": pretrain_id if name == "pretrain"
                      else uuid.uuid4().hex,
                      "config": json.loads(stages[name].to_json_best_effort())}
            if name.endswith("_vcp"):
                record["init_from_run"] = {"stage": "pretrain", "run_id": pretrain_id}
            reporting.write_json(folder / demo.STAGE_RECORD, record)


# The fake numbers: correct test items out of N per backbone and protocol.
CORRECT = {"vcp_rgb": 6, "vcp_res": 7, "vcop_rgb": 4, "vcop_res": 5, "random_rgb": 2,
           "random_res": 3}


def _write_all(runs: list[pc.Run]) -> None:
    for run in runs:
        # Seed 1 one item better than seed 0 everywhere, retrieval one below fine-tuning.
        c = CORRECT[run.kind] + run.seed
        _write_run(run, {"finetune": c, "linear": c, "retrieval": c - 1},
                   pretext_accuracy=0.5 + 0.1 * run.seed)


def _write_demo_seed(config: Any, demo_workdir: Path, seed: int) -> list[pc.Run]:
    """A finished demo_seeds folder of `seed` for what the comparison takes from it."""
    runs = [r for r in pc.plan(Path("/unused"), [seed], demo_workdir) if r.reused]
    for run in runs:
        c = CORRECT[run.kind]
        _write_run(run, {"finetune": c, "linear": c, "retrieval": c},
                   stages=pc.stage_configs(config, run))
    return runs


# -------------------------------------------------------------------------- the plan and configs


def test_plan_runs_every_backbone_per_seed_in_its_own_folder(tmp_path: Path) -> None:
    runs = pc.plan(tmp_path, [0, 1])
    assert [(r.seed, r.kind) for r in runs] == [(s, k) for s in (0, 1) for k in pc.RUN_ORDER]
    assert all(not r.reused and r.folder == tmp_path / f"seed_{r.seed}" / r.kind for r in runs)
    by_kind = {r.kind: r for r in runs if r.seed == 0}
    assert by_kind["vcop_res"].stages == ("pretrain", "finetune_vcp", "linear_vcp",
                                          "retrieval_vcp")
    assert by_kind["random_res"].stages == ("finetune_random", "linear_random",
                                            "retrieval_random")


def test_plan_takes_vcp_rgb_and_random_rgb_from_the_demo_workdir(tmp_path: Path) -> None:
    demo_dir = tmp_path / "seeds"
    runs = pc.plan(tmp_path / "out", [2], demo_dir)
    reused = {r.kind: r.folder for r in runs if r.reused}
    assert reused == {"vcp_rgb": demo_dir / "seed_2", "random_rgb": demo_dir / "seed_2"}
    assert all(r.folder == tmp_path / "out" / "seed_2" / r.kind for r in runs if not r.reused)


def test_stage_configs_change_only_the_pretext_and_the_input(config: Any,
                                                              tmp_path: Path) -> None:
    runs = {r.kind: r for r in pc.plan(tmp_path, [3])}
    demo_stages = demo.stage_configs(demo_seeds.seed_config(config, 3), tmp_path)
    base = _flat(demo_stages["pretrain"])

    def changed(kind: str, stage: str = "pretrain") -> set[str]:
        new = _flat(pc.stage_configs(config, runs[kind])[stage])
        old = _flat(demo_stages[stage])
        return {k for k in set(new) | set(old) if new.get(k, "absent") != old.get(k, "absent")}

    assert changed("vcp_rgb") == set()
    assert changed("vcp_res") == {"model.modality"}
    vcop_rgb = pc.stage_configs(config, runs["vcop_rgb"])["pretrain"]
    assert vcop_rgb.pretext == "vcop" and "cloze" not in vcop_rgb
    for key in ("clip_len", "interval", "num_clips", "eval_tuples_per_video"):
        assert vcop_rgb.vcop[key] == base[f"cloze.{key}"]
    assert all(k == "pretext" or k.split(".")[0] in ("cloze", "vcop")
               for k in changed("vcop_rgb"))
    assert changed("vcop_res") == changed("vcop_rgb") | {"model.modality"}
    # Downstream: the demo's stages, from this folder's pretraining; random init (RGB) is the
    # demo's config exactly, random init (res) differs only in the input.
    vcop_stages = pc.stage_configs(config, runs["vcop_res"])
    assert vcop_stages["finetune_vcp"].init_from == str(runs["vcop_res"].folder / "pretrain")
    for protocol in pc.PROTOCOLS:
        assert changed("random_rgb", f"{protocol}_random") == set()
        assert changed("random_res", f"{protocol}_random") == {"model.modality"}
        assert pc.stage_configs(config, runs["random_res"])[
            f"{protocol}_random"].model.modality == "res"


# -------------------------------------------------------------------------- reuse and refusal


def test_a_finished_matching_demo_seed_is_reused(config: Any, tmp_path: Path) -> None:
    for run in _write_demo_seed(config, tmp_path / "seeds", 0):
        pc.check_reused(config, run, tmp_path / "seeds", TINY)  # no error


def test_an_unfinished_demo_pretraining_is_refused(config: Any, tmp_path: Path) -> None:
    runs = _write_demo_seed(config, tmp_path / "seeds", 0)
    (tmp_path / "seeds" / "seed_0" / "pretrain" / "metrics.json").unlink()
    vcp = next(r for r in runs if r.kind == "vcp_rgb")
    with pytest.raises(pc.BenchmarkError, match=r"seed 0: cannot take VCP-RGB .*pretrain is "
                                                r"not finished .*benchmarks.demo_seeds"):
        pc.check_reused(config, vcp, tmp_path / "seeds", TINY)


def test_a_demo_pretraining_of_another_config_is_refused(config: Any, tmp_path: Path) -> None:
    runs = _write_demo_seed(config, tmp_path / "seeds", 0)
    record = tmp_path / "seeds" / "seed_0" / "pretrain" / demo.STAGE_RECORD
    changed = reporting.read_json(record)
    changed["config"]["num_train_steps"] += 1
    reporting.write_json(record, changed)
    vcp = next(r for r in runs if r.kind == "vcp_rgb")
    with pytest.raises(pc.BenchmarkError, match="another config .*num_train_steps"):
        pc.check_reused(config, vcp, tmp_path / "seeds", TINY)


def test_main_refuses_before_running_anything(config: Any, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    # Seed 0 is there, seed 1 is not: nothing runs, not even seed 0's own runs.
    _write_demo_seed(config, tmp_path / "seeds", 0)
    rc = pc.main(["--workdir", str(tmp_path / "out"), "--demo_workdir", str(tmp_path / "seeds"),
                  "--config", TINY, "--seeds", "0,1"])
    assert rc == 2
    assert "seed 1: cannot take " in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------------- the aggregation


def test_table_and_json_from_the_runs_results(tmp_path: Path) -> None:
    runs = pc.plan(tmp_path, [0, 1])
    _write_all(runs)
    entries = pc.summarise(tmp_path, TINY, runs, None)
    get = {(e["protocol"], e["kind"]): e for e in entries}
    # Every backbone on every downstream protocol, the pretexts' own accuracy for the four.
    assert len(entries) == 4 + 3 * 6

    e = get[("finetune", "vcop_res")]
    assert e["reference"] == "random_res"
    assert e["per_seed"][0]["value"] == 5 / N and e["per_seed"][1]["value"] == 6 / N
    assert e["per_seed"][0]["reference"] == 3 / N
    assert e["difference_mean"] == pytest.approx(2 / N)
    assert e["seeds_positive"] == 2 and e["chance"] == 0.25
    low, high = e["per_seed"][0]["difference_ci"]
    assert low <= 2 / N <= high
    assert get[("retrieval", "vcp_rgb")]["mean"] == pytest.approx((5 + 6) / 2 / N)
    assert get[("retrieval", "vcp_rgb")]["reference"] == "random_rgb"
    assert get[("linear", "random_res")]["reference"] == "random_rgb"
    assert get[("linear", "random_rgb")]["reference"] is None
    assert get[("linear", "random_rgb")]["difference_mean"] is None
    # The pretext row reads each pretext's own accuracy key and chance, against nothing.
    assert get[("pretext", "vcop_rgb")]["mean"] == pytest.approx(0.55)
    assert get[("pretext", "vcop_rgb")]["chance"] == pytest.approx(1 / 6)
    assert get[("pretext", "vcp_res")]["chance"] == 0.25
    assert ("pretext", "random_rgb") not in get

    saved = json.loads((tmp_path / "pretext_comparison.json").read_text())
    assert saved["seeds"] == [0, 1] and len(saved["runs"]) == 12
    assert saved["entries"][0]["protocol"] == "pretext"
    md = (tmp_path / "pretext_comparison.md").read_text()
    assert ("| fine-tuning: video top-1 | VCOP-res | 0.250 | 0.688 (0.625 / 0.750) | "
            "random init (res) | +0.250 (+0.250 / +0.250) |") in md
    assert "| pretext: held-out accuracy | VCOP-RGB | 0.167 | 0.550 (0.500 / 0.600) | - |" in md
    if reporting.plotting_available():
        assert (tmp_path / "pretext_comparison.png").stat().st_size > 0


def test_aggregate_only_reads_the_demo_workdir_too(config: Any, tmp_path: Path) -> None:
    _write_demo_seed(config, tmp_path / "seeds", 0)
    _write_all([r for r in pc.plan(tmp_path / "out", [0], tmp_path / "seeds") if not r.reused])
    rc = pc.main(["--workdir", str(tmp_path / "out"), "--demo_workdir", str(tmp_path / "seeds"),
                  "--seeds", "0", "--aggregate_only"])
    assert rc == 0
    saved = json.loads((tmp_path / "out" / "pretext_comparison.json").read_text())
    assert {r["backbone"] for r in saved["runs"] if r["reused"]} == set(pc.FROM_DEMO)
    vcp = next(e for e in saved["entries"]
               if e["protocol"] == "finetune" and e["kind"] == "vcp_rgb")
    assert vcp["per_seed"]["0"]["value"] == 6 / N and vcp["per_seed"]["0"]["reference"] == 2 / N


def test_aggregate_only_without_results_says_so(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert pc.main(["--workdir", str(tmp_path), "--seeds", "0", "--aggregate_only"]) == 2
    assert "run without --aggregate_only" in capsys.readouterr().err
