"""The built-in demo: every stage on synthetic videos, and whether VCP beats random init.

Stages, each in its own sub-workdir of the demo's workdir (a killed demo resumes stage by stage:
a finished stage is not rerun, an interrupted one resumes from its checkpoints, as long as the
stage's config, recorded in `demo_stage.json`, and the run of the stage it starts from are
unchanged; otherwise the old folder is moved to `<stage>.stale` and the stage runs again):

    pretrain          VCP pretraining on the unlabelled videos
    finetune_vcp      fine-tuning from the VCP checkpoint          (few labelled videos)
    finetune_random   fine-tuning from random init                 (same videos, same steps)
    linear_vcp        linear evaluation: a classifier on the frozen VCP backbone (same videos)
    linear_random     ... on a frozen random backbone
    retrieval_vcp     nearest-neighbour retrieval with the VCP backbone
    retrieval_random  ... with a random backbone
    probe_vcp         the VCP head trained on the frozen VCP backbone
    probe_random      ... on a frozen random backbone

The comparison table goes to the console and to `report.md` (with plots). Every number is
measured on held-out videos: the fine-tuning dataset's test split, and the pretraining dataset's
test split for the probe. With so few test items each number comes with its 95% interval, the
difference VCP - random init with a paired one, and the chance level (`vcp_jax.stats`).
"""

from __future__ import annotations

import copy
import json
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from vcp_jax import config_utils, reporting, stats

STAGES = ("pretrain", "finetune_vcp", "finetune_random", "linear_vcp", "linear_random",
          "retrieval_vcp", "retrieval_random", "probe_vcp", "probe_random")
RESULT_FILES = {"pretrain": "metrics.json", "finetune": "metrics.json",
                "linear": "metrics.json", "retrieval": "retrieval.json", "probe": "metrics.json"}
REPORT = "report.md"
# In each stage's folder from the moment it starts: the stage's config (and the run of the stage
# it starts from), compared before a finished stage is reused or an interrupted one resumed.
STAGE_RECORD = "demo_stage.json"
STALE_SUFFIX = ".stale"
# `config.init_overrides` keys and the stage-name suffix of that init's runs.
INIT_SUFFIXES = {"pretrained": "vcp", "random": "random"}


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
    lin = _with_cache(copy.deepcopy(config.linear), cache)
    ret = _with_cache(copy.deepcopy(config.retrieval), cache)
    probe = _with_cache(copy.deepcopy(config.probe), cache)
    # The probe runs on the pretraining videos with the pretraining cloze; retrieval on the
    # fine-tuning videos, and linear evaluation on them with fine-tuning's test protocol (only
    # its optimiser and steps are its own); every backbone has the pretrained architecture.
    lin.data = copy.deepcopy(ft.data)
    lin.finetune = copy.deepcopy(ft.finetune)
    lin.finetune.freeze_backbone = True
    probe.data = copy.deepcopy(pre.data)
    probe.cloze = copy.deepcopy(pre.cloze)
    ret.data = copy.deepcopy(ft.data)
    ret.retrieval.clip_len = ft.finetune.clip_len
    for stage in (pre, ft, lin, ret, probe):
        stage.seed = config.seed
        stage.model.arch = pre.model.arch
        stage.model.width = pre.model.width
    vcp = str(workdir / "pretrain")
    stages = {"pretrain": pre}
    for name, stage in (("finetune", ft), ("linear", lin), ("retrieval", ret),
                        ("probe", probe)):
        stages[f"{name}_vcp"] = copy.deepcopy(stage)
        stages[f"{name}_vcp"].init_from = vcp
        stages[f"{name}_random"] = copy.deepcopy(stage)
    _apply_init_overrides(stages, config.get("init_overrides"))
    return stages


def _apply_init_overrides(stages: dict[str, Any], overrides: Any) -> None:
    """`config.init_overrides.<init>.<stage>`: settings of one init's copy of a stage.

    Each init gets the settings it does best with, chosen on validation data: a pretrained
    backbone and a random one need not want the same fine-tuning rate (docs/demo.md), and
    comparing both at one rate would measure the rate as much as the init.
    """
    if not overrides:
        return
    for init, partials in overrides.items():
        if init not in INIT_SUFFIXES:
            raise config_utils.ConfigError(
                f"config.init_overrides.{init}: choose one of {tuple(INIT_SUFFIXES)}")
        for stage, partial in (partials or {}).items():
            name = f"{stage}_{INIT_SUFFIXES[init]}"
            if name not in stages:
                raise config_utils.ConfigError(
                    f"config.init_overrides.{init}.{stage}: not a stage with two inits; choose "
                    f"one of {tuple(s.rsplit('_', 1)[0] for s in STAGES if s.endswith('_vcp'))}")
            _merge(stages[name], partial, f"config.init_overrides.{init}.{stage}")


def _merge(target: ml_collections.ConfigDict, partial: Any, where: str) -> None:
    for key, value in partial.items():
        if key not in target:
            raise config_utils.ConfigError(f"{where}.{key}: the stage has no key {key!r}")
        if isinstance(value, (dict, ml_collections.ConfigDict)):
            _merge(target[key], value, f"{where}.{key}")
        else:
            target[key] = value


def runners() -> dict[str, Callable[[ml_collections.ConfigDict, Path], dict[str, Any]]]:
    """Who runs what: the function each stage name's prefix calls (linear evaluation is
    fine-tuning with `finetune.freeze_backbone`). Imported when the stages run."""
    from vcp_jax import finetune, pretrain, probe, retrieval  # noqa: PLC0415

    return {"pretrain": pretrain.run, "finetune": finetune.run, "linear": finetune.run,
            "retrieval": retrieval.run, "probe": probe.run}


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Runs (or resumes) every stage, then writes the comparison to the console and report.md."""
    workdir = Path(workdir).expanduser()
    stages = stage_configs(config, workdir)
    results: dict[str, dict[str, Any]] = {}
    times = _earlier_times(workdir)  # a resumed demo still reports every stage's time
    demo_start = time.perf_counter()
    for i, name in enumerate(STAGES, 1):
        start = time.perf_counter()
        results[name], ran = _stage(stages, name, workdir, f"[{i}/{len(STAGES)}] ")
        if ran:
            times[name] = time.perf_counter() - start
    this_run = time.perf_counter() - demo_start
    table = comparison(results)
    report = render_report(config, stages, workdir, results, table, times)
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


def run_stage(stages: dict[str, Any], name: str, workdir: str | Path) -> dict[str, Any]:
    """Runs one stage of `stage_configs(...)` in `<workdir>/<name>` as `run` does; its results.

    A finished stage is reused and an interrupted one resumed only when its recorded config (and
    the run of the stage it starts from) is the same; otherwise its folder is moved aside to
    `<name>.stale` and the stage runs from scratch.
    """
    return _stage(stages, name, Path(workdir).expanduser(), "")[0]


def stage_changes(stages: dict[str, Any], name: str, workdir: str | Path) -> list[str]:
    """What in `<workdir>/<name>`'s record differs from `stages[name]` (its config, or a rerun
    of the stage it starts from), named as `run_stage` names them before rerunning it; [] when
    nothing differs or the folder is absent or empty. For a caller that may only read a run."""
    workdir = Path(workdir).expanduser()
    return _changed_keys(workdir / name, _stage_identity(stages, name, workdir))


def _stage(stages: dict[str, Any], name: str, workdir: Path,
           label: str) -> tuple[dict[str, Any], bool]:
    """(results, whether it ran) of one stage; `label` prefixes its console lines."""
    task = name.split("_")[0]
    stage_dir = workdir / name
    done = stage_dir / RESULT_FILES[task]
    wanted = _stage_identity(stages, name, workdir)
    changed = _changed_keys(stage_dir, wanted)
    if changed:
        # Never mix two configs in one stage folder (checkpoints, metrics): the old one is
        # kept aside, once, and the stage starts from scratch.
        stale = stage_dir.with_name(name + STALE_SUFFIX)
        if reporting.is_main_process():
            if stale.exists():
                shutil.rmtree(stale)
            stage_dir.rename(stale)
        shown = ", ".join(changed[:8]) + (f", ... ({len(changed)} keys)"
                                         if len(changed) > 8 else "")
        reporting.console(f"{label}{name}: config differs from the earlier run's ({shown}); "
                          f"moved it to {stale}, rerunning from scratch")
    elif done.is_file():
        reporting.console(f"{label}{name}: done before ({done})")
        return reporting.read_json(done), False
    reporting.console(f"\n{label}{name}")
    if not (stage_dir / STAGE_RECORD).is_file():
        reporting.write_json(stage_dir / STAGE_RECORD,
                             {"stage": name, "run_id": uuid.uuid4().hex, **wanted})
    try:
        return runners()[task](stages[name], stage_dir), True
    except config_utils.UserError as e:
        raise config_utils.UserError(f"demo stage {name}: {e}") from e


def _stage_identity(stages: dict[str, Any], name: str, workdir: Path) -> dict[str, Any]:
    """What a stage's results depend on: its full config and the run of the stage it starts from.

    A stage that starts from another stage's checkpoint (`init_from` = that stage's folder, e.g.
    the `*_vcp` stages from `pretrain`) records that stage's run id, which is new whenever that
    stage runs from scratch, so a rerun pretraining invalidates every stage built on it.
    """
    config = stages[name]
    identity: dict[str, Any] = {"config": json.loads(config.to_json_best_effort())}
    init_from = config.get("init_from")
    for other in STAGES:
        if other != name and init_from is not None and str(init_from) == str(workdir / other):
            record = _read_record(workdir / other) or {}
            identity["init_from_run"] = {"stage": other, "run_id": record.get("run_id")}
    return identity


def _read_record(stage_dir: Path) -> dict[str, Any] | None:
    try:
        record = reporting.read_json(stage_dir / STAGE_RECORD)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _changed_keys(stage_dir: Path, wanted: dict[str, Any]) -> list[str]:
    """The keys in which a stage folder's recorded config differs from `wanted` ([]: none).

    A folder with results but no record (a demo from before records, or not the demo's) counts
    as different: its config is unknown.
    """
    if not stage_dir.is_dir() or not any(stage_dir.iterdir()):
        return []
    record = _read_record(stage_dir)
    if record is None:
        return [f"no recorded config ({STAGE_RECORD} is missing)"]
    old = _flatten({k: record.get(k) for k in wanted})
    new = _flatten(wanted)
    keys = sorted(k for k in set(old) | set(new) if old.get(k, _MISSING) != new.get(k, _MISSING))
    # `config.data.num_val_videos` reads better without the leading "config."; a new run of
    # the stage a stage starts from is named by that stage.
    named = []
    for key in keys:
        if key.startswith("init_from_run."):
            label = f"{wanted.get('init_from_run', {}).get('stage', 'init_from')} was rerun"
        else:
            label = key.removeprefix("config.")
        if label not in named:
            named.append(label)
    return named


_MISSING = object()


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: config keys by their dotted names."""
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


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


def _find(result: Any, key: str) -> Any:
    """The value of `key` in `result` or its nested dicts (shallowest first), else None."""
    level = [result]
    while level:
        for node in level:
            if key in node and node[key] is not None:
                return node[key]
        level = [v for node in level for v in node.values() if isinstance(v, dict)]
    return None


def _count(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and value >= 0 else None


MAIN_TOPK = (1, 5, 10)  # retrieval rows; larger k are near 1 with the demo's small gallery
FINETUNE_KINDS = (("finetune", "fine-tuning"), ("linear", "linear eval"))


def _row(metric: str, vcp: float | None, random: float | None, *, n: int | None,
         n_random: int | None = None, chance: float | None = None,
         paired: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
    """One comparison row: both accuracies with their Wilson intervals, the difference with its
    paired bootstrap interval (when per-item results of both exist), chance and n."""
    diff = None if vcp is None or random is None else vcp - random
    diff_ci = None
    if diff is not None and paired is not None:
        diff_ci = list(stats.paired_difference(*paired)[1])
    vcp_ci = stats.accuracy_interval(vcp, n)
    random_ci = stats.accuracy_interval(random, n if n_random is None else n_random)
    return {"metric": metric, "vcp": vcp, "random_init": random, "difference": diff,
            "vcp_ci": None if vcp_ci is None else list(vcp_ci),
            "random_ci": None if random_ci is None else list(random_ci),
            "difference_ci": diff_ci, "chance": chance,
            "n": n if n is not None else n_random}


def _paired_ranks(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str,
                  align: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-item ranks of two runs (`a[key]`, `b[key]`), when both hold them for the same items
    (equal `align` lists: video indices or query labels in split order)."""
    if not isinstance(a, dict) or not isinstance(b, dict):
        return None
    if a.get(align) is None or a.get(align) != b.get(align) or not a.get(key):
        return None
    ranks = np.asarray(a[key], np.int64), np.asarray(b[key], np.int64)
    return ranks if ranks[0].shape == ranks[1].shape == (len(a[align]),) else None


def _hits(ranks: tuple[np.ndarray, np.ndarray] | None, k: int) -> tuple[np.ndarray, ...] | None:
    """Per-item top-k correctness from 1-based ranks (0: not ranked, a miss)."""
    return None if ranks is None else tuple((r > 0) & (r <= k) for r in ranks)


def _finetune_rows(label: str, vcp: dict[str, Any], random: dict[str, Any],
                   ks: tuple[int, ...]) -> list[dict[str, Any]]:
    """Video top-k of a fine-tuning (or linear evaluation) pair of runs, on one fold."""
    test_v, test_r = vcp.get("test", {}), random.get("test", {})
    if not test_v and not test_r:
        return []
    names = vcp.get("class_names") or random.get("class_names")
    ranks = _paired_ranks(test_v.get("per_video"), test_r.get("per_video"), "label_rank",
                          "index")
    rows = []
    for k in ks:
        row = _row(f"{label}: video top-{k}", _get(test_v, f"video_top{k}"),
                   _get(test_r, f"video_top{k}"), n=_count(test_v.get("num_test_videos")),
                   n_random=_count(test_r.get("num_test_videos")),
                   chance=stats.classifier_chance(len(names), k) if names else None,
                   paired=_hits(ranks, k))
        if k == 1:
            # Next to the test accuracy: the step the checkpoint was chosen at, and the
            # accuracy on the training videos (does it fit them at all?), where recorded.
            pair = (("vcp", vcp), ("random_init", random))
            steps = {key: _find(result, "chosen_step") or result.get("best_checkpoint_step")
                     for key, result in pair}
            train = {key: _find(result, "train_video_top1") for key, result in pair}
            if any(v is not None for v in steps.values()):
                row["chosen_step"] = steps
            if any(v is not None for v in train.values()):
                row["train_accuracy"] = train
        rows.append(row)
    return rows


def comparison(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows that answer "does VCP help?", from the stages' results (as they write them).

    Each row: `metric`, `vcp`, `random_init`, `difference` (VCP - random), the 95% intervals
    `vcp_ci`, `random_ci` (Wilson, over the n test items) and `difference_ci` (paired bootstrap
    over the same items; None where the per-item results are not saved, as for the probe),
    `chance` and `n`. Fine-tuning and linear-evaluation top-1 rows also carry `chosen_step` and
    `train_accuracy` ({'vcp', 'random_init'}) when the runs recorded them.
    """
    rows = []
    for kind, label in FINETUNE_KINDS:
        rows += _finetune_rows(label, results.get(f"{kind}_vcp", {}),
                               results.get(f"{kind}_random", {}),
                               (1, 5) if kind == "finetune" else (1,))

    ret_v, ret_r = results.get("retrieval_vcp", {}), results.get("retrieval_random", {})
    ks = {int(k) for k in ret_v.get("topk", {})} | {int(k) for k in ret_r.get("topk", {})}
    ranks = _paired_ranks(ret_v.get("per_query"), ret_r.get("per_query"), "first_hit_rank",
                          "label")
    for k in sorted(ks & set(MAIN_TOPK)):
        chance = _get(ret_v, "chance_topk", str(k))
        per_query, counts = ret_v.get("per_query") or {}, ret_v.get("gallery_class_counts")
        if chance is None and per_query.get("label") and counts:
            chance = stats.retrieval_chance(per_query["label"], counts, k)
        rows.append(_row(f"retrieval: top-{k}", _get(ret_v, "topk", str(k)),
                         _get(ret_r, "topk", str(k)), n=_count(ret_v.get("num_queries")),
                         n_random=_count(ret_r.get("num_queries")), chance=chance,
                         paired=_hits(ranks, k)))

    # The probe saves no per-tuple correctness: its rows have Wilson intervals only.
    pr_v, pr_r = results.get("probe_vcp", {}), results.get("probe_random", {})
    names = pr_v.get("option_names") or pr_r.get("option_names") or []
    chance = (_get(pr_v, "chance_accuracy") or _get(pr_r, "chance_accuracy")
              or (stats.option_chance(len(names)) if names else None))
    if pr_v or pr_r:
        rows.append(_row("VCP probe: accuracy", _get(pr_v, "test_vcp_accuracy"),
                         _get(pr_r, "test_vcp_accuracy"), n=_count(pr_v.get("test_tuples")),
                         n_random=_count(pr_r.get("test_tuples")), chance=chance))

    def option_count(result: dict[str, Any], name: str) -> int | None:
        fraction, total = (_get(result, f"test_option_fraction/{name}"),
                           _get(result, "test_tuples"))
        return None if fraction is None or total is None else round(fraction * total)

    for name in names:
        # Per option: the accuracy on the tuples with that option (a class's recall).
        rows.append(_row(f"VCP probe: {name}", _get(pr_v, f"test_accuracy/{name}"),
                         _get(pr_r, f"test_accuracy/{name}"), n=option_count(pr_v, name),
                         n_random=option_count(pr_r, name), chance=chance))
    pre = results.get("pretrain", {})
    if "val_vcp_accuracy" in pre:
        rows.append(_row("pretraining: held-out VCP accuracy", _get(pre, "val_vcp_accuracy"),
                         None, n=_count(pre.get("val_tuples")),
                         chance=_get(pre, "chance_accuracy")))
    return rows


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None or not np.isfinite(value):
        return "-"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _fmt_ci(interval: list[float] | None, signed: bool = False) -> str:
    if not interval:
        return ""
    return f"[{_fmt(interval[0], signed)}, {_fmt(interval[1], signed)}]"


def _with_ci(value: float | None, interval: list[float] | None, signed: bool = False) -> str:
    """'+0.067 [-0.100, +0.233]': a value and its 95% interval, where there is one."""
    return f"{_fmt(value, signed)} {_fmt_ci(interval, signed)}".rstrip()


def _difference(row: dict[str, Any]) -> str:
    return _with_ci(row["difference"], row["difference_ci"], signed=True)


def _notes(rows: list[dict[str, Any]]) -> list[str]:
    """Chosen step and train accuracy of the fine-tuning and linear-evaluation runs."""
    notes = []
    for r in rows:
        parts = []
        steps, train = r.get("chosen_step"), r.get("train_accuracy")
        if steps:
            parts.append(f"checkpoint step VCP {steps.get('vcp', '-')}, random "
                         f"{steps.get('random_init', '-')}")
        if train:
            parts.append(f"train video top-1 VCP {_fmt(train.get('vcp'))}, random "
                         f"{_fmt(train.get('random_init'))} (test: {_fmt(r['vcp'])}, "
                         f"{_fmt(r['random_init'])})")
        if parts:
            notes.append(f"{r['metric'].split(':')[0]}: " + "; ".join(parts))
    return notes


def render_table(rows: list[dict[str, Any]]) -> str:
    """The console table: chance, VCP, random init, the difference [95% CI] and n per row."""
    width = max(len(r["metric"]) for r in rows) if rows else 10
    diffs = [_difference(r) for r in rows]
    dw = max([len("VCP-rnd [95% CI]"), *map(len, diffs)])
    lines = [f"{'':{width}}  {'chance':>6}  {'VCP':>6}  {'random':>6}  "
             f"{'VCP-rnd [95% CI]':<{dw}}  {'n':>5}",
             f"{'-' * width}  {'-' * 6}  {'-' * 6}  {'-' * 6}  {'-' * dw}  {'-' * 5}"]
    for r, diff in zip(rows, diffs, strict=True):
        n = "-" if r.get("n") is None else str(r["n"])
        lines.append(f"{r['metric']:{width}}  {_fmt(r['chance']):>6}  {_fmt(r['vcp']):>6}  "
                     f"{_fmt(r['random_init']):>6}  {diff:<{dw}}  {n:>5}".rstrip())
    notes = _notes(rows)
    return "\n".join([*lines, "", *notes] if notes else lines)


INTERVALS = (
    "Intervals are 95%. VCP's and random init's accuracies: the Wilson score interval over the "
    "n test items (videos, queries or VCP tuples). VCP - random: a paired bootstrap over the "
    "same test items (each item's correctness with both backbones resampled together, "
    f"{stats.BOOTSTRAP_RESAMPLES} resamples, seed {stats.BOOTSTRAP_SEED}), where both runs saved "
    "per-item results; the probe saves none, so only its two Wilson intervals are given. "
    "Chance: a guess uniform over the C classes (top-1 1/C, top-5 min(5, C)/C) or the VCP "
    "options (1/options); for retrieval, the hypergeometric chance that k gallery videos drawn "
    "at random include one of the query's class, 1 - C(N - n_c, k) / C(N, k) for a gallery of "
    "N videos with n_c of its class, averaged over the queries. An interval of the difference "
    "that contains 0 means the demo cannot tell the two backbones apart."
)


def render_report(
    config: ml_collections.ConfigDict,
    stages: dict[str, Any],
    workdir: Path,
    results: dict[str, dict[str, Any]],
    rows: list[dict[str, Any]],
    times: dict[str, float],
) -> str:
    """report.md: what ran, the comparison table, and the plots (written beside it)."""
    plots = _plots(workdir, results)
    ft = results.get("finetune_vcp", {})
    rates = {init: stages[f"finetune_{init}"].optimizer.learning_rate
             for init in ("vcp", "random")}
    pre = config.pretrain
    lin = config.get("linear")
    linear = (f" Linear evaluation: a classifier on each frozen backbone, same videos, "
              f"{lin.num_train_steps} steps at learning rate {lin.optimizer.learning_rate}."
              if lin is not None else "")
    lines = [
        "# VCP demo: does VCP pretraining beat random init?",
        "",
        f"Pretraining: {pre.model.arch} (width {pre.model.width}) with VCP on "
        f"{results.get('pretrain', {}).get('num_train_videos', '?')} unlabelled synthetic videos "
        f"({pre.data.name}/{pre.data.builder_config}), {pre.num_train_steps} steps of "
        f"{pre.batch_size} tuples. Fine-tuning: {ft.get('num_train_videos', '?')} labelled "
        f"videos of another synthetic dataset ({config.finetune.data.name}), "
        f"{config.finetune.num_train_steps} steps at peak learning rate {rates['vcp']} from "
        f"VCP and {rates['random']} from random init, tested on "
        f"{ft.get('test', {}).get('num_test_videos', '?')} held-out videos "
        f"({ft.get('test', {}).get('averaging', '')}).{linear} Seed {config.seed}.",
        "",
        "| metric | chance | VCP [95% CI] | random init [95% CI] | VCP - random [95% CI] | n |",
        "|---|---|---|---|---|---|",
        *[f"| {r['metric']} | {_fmt(r['chance'])} | {_with_ci(r['vcp'], r['vcp_ci'])} | "
          f"{_with_ci(r['random_init'], r['random_ci'])} | {_difference(r)} | "
          f"{'-' if r.get('n') is None else r['n']} |" for r in rows],
        "",
        INTERVALS,
        "",
    ]
    notes = _notes(rows)
    if notes:
        lines += [*[f"- {note}" for note in notes], ""]
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
        if ret_v.get("chance_topk"):
            ks = sorted(int(k) for k in ret_v["chance_topk"])
            curves["chance (random ranking)"] = (ks, [ret_v["chance_topk"][str(k)] for k in ks])
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
    lin = {label: results.get(name, {}).get("test", {}) for label, name in
           (("VCP", "linear_vcp"), ("random init", "linear_random"))}
    if all(ft.values()):
        groups = {label: {"video top-1": t.get("video_top1", 0.0),
                          "video top-5": t.get("video_top5", 0.0),
                          "clip top-1": t.get("clip_top1", 0.0)} for label, t in ft.items()}
        if all(lin.values()):
            for label, t in lin.items():
                groups[label]["linear eval: video top-1"] = t.get("video_top1", 0.0)
        reporting.plot_bars(workdir / "finetune.png", groups,
                            title="fine-tuning and linear evaluation: held-out test videos",
                            ylabel="accuracy")
        plots.append(("Fine-tuning and linear evaluation", "finetune.png"))
        for label, name in (("VCP", "finetune_vcp"), ("random init", "finetune_random")):
            if (workdir / name / "confusion.png").is_file():
                plots.append((f"Fine-tuning confusion ({label})", f"{name}/confusion.png"))
    return plots
