"""The built-in demo: every stage on synthetic videos, and whether VCP beats random init.

Stages, each in its own sub-workdir of the demo's workdir (a killed demo resumes stage by stage:
a finished stage is not rerun, an interrupted one resumes from its checkpoints):

    pretrain          VCP pretraining on the unlabelled videos
    finetune_vcp      fine-tuning from the VCP checkpoint          (few labelled videos)
    finetune_random   fine-tuning from random init                 (same videos, same steps)
    retrieval_vcp     nearest-neighbour retrieval with the VCP backbone
    retrieval_random  ... with a random backbone
    probe_vcp         the VCP head trained on the frozen VCP backbone
    probe_random      ... on a frozen random backbone

The comparison table goes to the console and to `report.md` (with plots). Every number is
measured on held-out videos: the fine-tuning dataset's test split, and the pretraining dataset's
test split for the probe.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from vcp_jax import config_utils, reporting

STAGES = ("pretrain", "finetune_vcp", "finetune_random", "retrieval_vcp", "retrieval_random",
          "probe_vcp", "probe_random")
RESULT_FILES = {"pretrain": "metrics.json", "finetune": "metrics.json",
                "retrieval": "retrieval.json", "probe": "metrics.json"}
REPORT = "report.md"


def _with_cache(node: Any, cache: str) -> Any:
    """Every string of a config with "{cache}" replaced by the demo's cache folder."""
    if isinstance(node, ml_collections.ConfigDict):
        for key, value in node.items():
            node[key] = _with_cache(value, cache)
        return node
    if isinstance(node, str) and "{cache}" in node:
        return node.replace("{cache}", cache)
    return node


def stage_configs(config: ml_collections.ConfigDict, workdir: Path) -> dict[str, Any]:
    """The full config of each stage, with the demo's seed, cache and hand-overs applied."""
    cache = str(Path(config.cache_dir).expanduser())
    pre = _with_cache(copy.deepcopy(config.pretrain), cache)
    ft = _with_cache(copy.deepcopy(config.finetune), cache)
    ret = _with_cache(copy.deepcopy(config.retrieval), cache)
    probe = _with_cache(copy.deepcopy(config.probe), cache)
    # The probe runs on the pretraining videos with the pretraining cloze; retrieval on the
    # fine-tuning videos; every backbone has the pretrained architecture.
    probe.data = copy.deepcopy(pre.data)
    probe.cloze = copy.deepcopy(pre.cloze)
    ret.data = copy.deepcopy(ft.data)
    ret.retrieval.clip_len = ft.finetune.clip_len
    for stage in (pre, ft, ret, probe):
        stage.seed = config.seed
        stage.model.arch = pre.model.arch
        stage.model.width = pre.model.width
    vcp = str(workdir / "pretrain")
    stages = {"pretrain": pre}
    for name, stage in (("finetune", ft), ("retrieval", ret), ("probe", probe)):
        stages[f"{name}_vcp"] = copy.deepcopy(stage)
        stages[f"{name}_vcp"].init_from = vcp
        stages[f"{name}_random"] = copy.deepcopy(stage)
    return stages


def _runner(task: str) -> Callable[[ml_collections.ConfigDict, Path], dict[str, Any]]:
    import importlib  # noqa: PLC0415 - each stage's module only when it runs

    return importlib.import_module(f"vcp_jax.{task}").run


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Runs (or resumes) every stage, then writes the comparison to the console and report.md."""
    workdir = Path(workdir).expanduser()
    stages = stage_configs(config, workdir)
    results: dict[str, dict[str, Any]] = {}
    times = _earlier_times(workdir)  # a resumed demo still reports every stage's time
    demo_start = time.perf_counter()
    for i, name in enumerate(STAGES, 1):
        task = name.split("_")[0]
        stage_dir = workdir / name
        done = stage_dir / RESULT_FILES[task]
        if done.is_file():
            reporting.console(f"[{i}/{len(STAGES)}] {name}: done before ({done})")
            results[name] = reporting.read_json(done)
            continue
        reporting.console(f"\n[{i}/{len(STAGES)}] {name}")
        start = time.perf_counter()
        try:
            results[name] = _runner(task)(stages[name], stage_dir)
        except config_utils.UserError as e:
            raise config_utils.UserError(f"demo stage {name}: {e}") from e
        times[name] = time.perf_counter() - start
    this_run = time.perf_counter() - demo_start
    table = comparison(results)
    report = render_report(config, workdir, results, table, times)
    if reporting.is_main_process():
        (workdir / REPORT).write_text(report)
    reporting.console("\n" + render_table(table) + f"\n\nthis run: {this_run / 60:.1f} min; "
                      f"report: {workdir / REPORT}")
    summary = {"task": "demo", "comparison": table,
               "stage_seconds": {name: times[name] for name in STAGES if name in times},
               "total_stage_seconds": sum(times.get(name, 0.0) for name in STAGES),
               "this_run_seconds": this_run,
               "stages": {name: str(workdir / name) for name in STAGES}}
    reporting.write_json(workdir / "metrics.json", summary)
    return summary


def _earlier_times(workdir: Path) -> dict[str, float]:
    """Stage times recorded by an earlier (interrupted or finished) run of this demo."""
    path = workdir / "metrics.json"
    try:
        earlier = reporting.read_json(path).get("stage_seconds", {})
    except (OSError, ValueError, AttributeError):
        return {}
    # A stage whose results are gone reruns, and its new time replaces the recorded one.
    return {name: float(t) for name, t in earlier.items() if name in STAGES}


# --------------------------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------------------------


def _get(result: dict[str, Any], *keys: str) -> float | None:
    value: Any = result
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value) if isinstance(value, int | float) else None


def comparison(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows (metric, VCP, random init, difference) of the numbers that answer "does VCP help?"."""
    rows = []

    def add(metric: str, vcp: float | None, random: float | None) -> None:
        diff = None if vcp is None or random is None else vcp - random
        rows.append({"metric": metric, "vcp": vcp, "random_init": random, "difference": diff})

    ft_v, ft_r = results.get("finetune_vcp", {}), results.get("finetune_random", {})
    add("fine-tuning: video top-1", _get(ft_v, "test", "video_top1"),
        _get(ft_r, "test", "video_top1"))
    add("fine-tuning: video top-5", _get(ft_v, "test", "video_top5"),
        _get(ft_r, "test", "video_top5"))
    add("fine-tuning: clip top-1", _get(ft_v, "test", "clip_top1"),
        _get(ft_r, "test", "clip_top1"))
    ret_v, ret_r = results.get("retrieval_vcp", {}), results.get("retrieval_random", {})
    for k in sorted({int(k) for k in ret_v.get("topk", {})} | {int(k) for k in
                                                               ret_r.get("topk", {})}):
        add(f"retrieval: top-{k}", _get(ret_v, "topk", str(k)), _get(ret_r, "topk", str(k)))
    pr_v, pr_r = results.get("probe_vcp", {}), results.get("probe_random", {})
    add("VCP probe: accuracy", _get(pr_v, "test_vcp_accuracy"),
        _get(pr_r, "test_vcp_accuracy"))
    for name in pr_v.get("option_names", []):
        add(f"VCP probe: {name}", _get(pr_v, f"test_accuracy/{name}"),
            _get(pr_r, f"test_accuracy/{name}"))
    pre = results.get("pretrain", {})
    if "val_vcp_accuracy" in pre:
        add("pretraining: held-out VCP accuracy", _get(pre, "val_vcp_accuracy"), None)
    return rows


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None or not np.isfinite(value):
        return "-"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def render_table(rows: list[dict[str, Any]]) -> str:
    width = max(len(r["metric"]) for r in rows) if rows else 10
    lines = [f"{'':{width}}  {'VCP':>7}  {'random':>7}  {'VCP-rnd':>7}",
             f"{'-' * width}  {'-' * 7}  {'-' * 7}  {'-' * 7}"]
    for r in rows:
        lines.append(f"{r['metric']:{width}}  {_fmt(r['vcp']):>7}  {_fmt(r['random_init']):>7}  "
                     f"{_fmt(r['difference'], signed=True):>7}")
    return "\n".join(lines)


def render_report(
    config: ml_collections.ConfigDict,
    workdir: Path,
    results: dict[str, dict[str, Any]],
    rows: list[dict[str, Any]],
    times: dict[str, float],
) -> str:
    """report.md: what ran, the comparison table, and the plots (written beside it)."""
    plots = _plots(workdir, results)
    ft = results.get("finetune_vcp", {})
    pre = config.pretrain
    lines = [
        "# VCP demo: does VCP pretraining beat random init?",
        "",
        f"Pretraining: {pre.model.arch} (width {pre.model.width}) with VCP on "
        f"{results.get('pretrain', {}).get('num_train_videos', '?')} unlabelled synthetic videos "
        f"({pre.data.name}/{pre.data.config}), {pre.num_train_steps} steps of "
        f"{pre.batch_size} tuples. Fine-tuning: {ft.get('num_train_videos', '?')} labelled "
        f"videos of another synthetic dataset ({config.finetune.data.name}), "
        f"{config.finetune.num_train_steps} steps, tested on "
        f"{ft.get('test', {}).get('num_test_videos', '?')} held-out videos "
        f"({ft.get('test', {}).get('averaging', '')}). Seed {config.seed}.",
        "",
        "| metric | VCP | random init | VCP - random |",
        "|---|---|---|---|",
        *[f"| {r['metric']} | {_fmt(r['vcp'])} | {_fmt(r['random_init'])} | "
          f"{_fmt(r['difference'], signed=True)} |" for r in rows],
        "",
    ]
    for title, name in plots:
        lines += [f"## {title}", "", f"![{title}]({name})", ""]
    if times:
        # Wall time of each stage, from the run that ran it (a resumed demo keeps earlier ones).
        lines += ["## Stage times", "", "| stage | seconds |", "|---|---|",
                  *[f"| {k} | {times[k]:.0f} |" for k in STAGES if k in times],
                  f"| total | {sum(times.values()):.0f} |", "",
                  "Wall-clock seconds per stage, from the run that ran it (data generation and "
                  "dataset builds are counted in the first stage that needs them).", ""]
    lines += ["Each stage's own outputs (metrics, plots, provenance, logs) are in its "
              "sub-folder: " + ", ".join(f"`{s}/`" for s in STAGES) + "."]
    return "\n".join(lines) + "\n"


def _plots(workdir: Path, results: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """The comparison plots, written to `workdir`; (title, file name) of each."""
    plots = []
    ret_v, ret_r = results.get("retrieval_vcp", {}), results.get("retrieval_random", {})
    if ret_v.get("topk") and ret_r.get("topk"):
        curves = {}
        for label, r in (("VCP", ret_v), ("random init", ret_r)):
            ks = sorted(int(k) for k in r["topk"])
            curves[label] = (ks, [r["topk"][str(k)] for k in ks])
        reporting.plot_curves(workdir / "retrieval_topk.png", curves,
                              title="retrieval: test queries vs train gallery", xlabel="k",
                              ylabel="top-k accuracy", logx=True)
        plots.append(("Retrieval top-k", "retrieval_topk.png"))
    pr_v, pr_r = results.get("probe_vcp", {}), results.get("probe_random", {})
    names = pr_v.get("option_names", [])
    if names:
        groups = {label: {n: r.get(f"test_accuracy/{n}") or 0.0 for n in names}
                  for label, r in (("VCP", pr_v), ("random init", pr_r))}
        reporting.plot_bars(workdir / "probe_options.png", groups,
                            title="VCP probe: test accuracy per option (frozen backbones)",
                            ylabel="accuracy")
        plots.append(("VCP probe per option", "probe_options.png"))
    ft = {label: results.get(name, {}).get("test", {}) for label, name in
          (("VCP", "finetune_vcp"), ("random init", "finetune_random"))}
    if all(ft.values()):
        groups = {label: {"video top-1": t.get("video_top1", 0.0),
                          "video top-5": t.get("video_top5", 0.0),
                          "clip top-1": t.get("clip_top1", 0.0)} for label, t in ft.items()}
        reporting.plot_bars(workdir / "finetune.png", groups,
                            title="fine-tuning: held-out test videos", ylabel="accuracy")
        plots.append(("Fine-tuning", "finetune.png"))
        for label, name in (("VCP", "finetune_vcp"), ("random init", "finetune_random")):
            if (workdir / name / "confusion.png").is_file():
                plots.append((f"Fine-tuning confusion ({label})", f"{name}/confusion.png"))
    return plots
