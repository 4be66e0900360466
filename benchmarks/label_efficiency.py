"""Label efficiency: VCP vs random init as the number of labelled videos per class grows.

For each number n of labelled videos per class (`--labels`) and each seed (`--seeds`), runs the
demo's fine-tuning and linear-evaluation stages (`demo.stage_configs` of the demo config, with
`data.train_videos_per_class = n` and `seed = s`, nothing else changed: the same steps, optimiser
and test videos) from the seed's VCP pretraining and from random init. The pretraining is the
one `benchmarks.demo_seeds` ran in `<demo_workdir>/seed_<s>/pretrain` (refused if missing or run
with another config); each run goes to `<workdir>/labels_<n>/seed_<s>/<stage>` and is reused
when its metrics.json exists with the same config, resumed when interrupted (as demo stages are).

Writes `<workdir>/label_efficiency.md`, `.json` (test video top-1 per n x {fine-tuning, linear} x
{VCP, random init, VCP - random}: mean over seeds and per seed, with each seed's paired 95%
interval in the JSON) and `label_efficiency.png` (top-1 vs labelled videos per class, log x; VCP
and random init, fine-tuning solid and linear dashed, mean with the min-max band over seeds,
chance).

    PYTHONPATH=. python -m benchmarks.demo_seeds --workdir /tmp/vcp_seeds        # pretrainings
    PYTHONPATH=. python -m benchmarks.label_efficiency --demo_workdir /tmp/vcp_seeds
    PYTHONPATH=. python -m benchmarks.label_efficiency --config configs/demo.py:size=tiny \\
        --demo_workdir /tmp/vcp_seeds_tiny --seeds 0 --labels 1,2     # tiny: 3 train videos/class
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from benchmarks import _common, demo_seeds
from benchmarks.demo_seeds import BenchmarkError, fmt

STAGES = ("finetune_vcp", "finetune_random", "linear_vcp", "linear_random")
# The demo's comparison rows used here (vcp_jax.demo.comparison), by protocol.
PROTOCOLS = {"finetune": "fine-tuning: video top-1", "linear": "linear eval: video top-1"}
PROTOCOL_LABELS = {"finetune": "fine-tuning", "linear": "linear"}
OUTPUT = "label_efficiency"


def pretrain_dir(demo_workdir: Path, seed: int) -> Path:
    return demo_seeds.seed_dir(demo_workdir, seed) / "pretrain"


def run_dir(workdir: Path, labels: int, seed: int) -> Path:
    return workdir / f"labels_{labels}" / f"seed_{seed}"


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def check_pretraining(config: ml_collections.ConfigDict, demo_workdir: Path,
                      seed: int) -> None:
    """The seed's VCP pretraining is finished and was run with this config's pretrain stage.

    A pretraining of another config (another size, another seed) would either fail to load
    (another width) or, worse, load and be reported under the wrong name.
    """
    from vcp_jax import demo, reporting  # noqa: PLC0415

    folder = pretrain_dir(demo_workdir, seed)
    if not (folder / "metrics.json").is_file():
        raise BenchmarkError(
            f"seed {seed}: no finished VCP pretraining in {folder} (no metrics.json); run "
            f"`python -m benchmarks.demo_seeds --workdir {demo_workdir} --seeds {seed}` with the "
            f"same --config first")
    record = folder / demo.STAGE_RECORD
    if not record.is_file():
        print(f"warning: {record} is missing: cannot check that {folder} was run with this "
              f"config", flush=True)
        return
    stages = demo.stage_configs(demo_seeds.seed_config(config, seed), demo_workdir)
    wanted = _flat(json.loads(stages["pretrain"].to_json_best_effort()))
    recorded = _flat(reporting.read_json(record).get("config", {}))
    changed = sorted(k for k in set(wanted) | set(recorded) if wanted.get(k) != recorded.get(k))
    if changed:
        raise BenchmarkError(
            f"seed {seed}: {folder} was pretrained with another config (differs in "
            f"{', '.join(changed[:8])}{', ...' if len(changed) > 8 else ''}); use the --config "
            f"that benchmarks.demo_seeds ran with")


def check_labelled_videos(config: ml_collections.ConfigDict, most: int) -> None:
    """Every class of the labelled dataset has at least `most` training videos (after the
    validation hold-out, as fine-tuning draws them), on every fold the demo fine-tunes."""
    from vcp_jax import datasets, demo  # noqa: PLC0415

    ft = demo.stage_configs(config, Path("."))["finetune_random"]
    for fold in ft.finetune.folds:
        data = ml_collections.ConfigDict(ft.data.to_dict())
        data.builder_config = datasets.with_fold(data, fold)
        datasets.prepare(data)  # built by the demo already; builds it otherwise
        source = datasets.data_source(data, "train")
        index = datasets.video_index(source, "train")
        names = datasets.class_names(source)
        train_idx, _ = datasets.holdout_split(len(index), data.num_val_videos, seed=0)
        counts = np.bincount(index.labels[train_idx], minlength=len(names))
        if counts.min() < most:
            short = ", ".join(f"{names[i]} {counts[i]}" for i in np.flatnonzero(counts < most))
            raise BenchmarkError(
                f"--labels asks for {most} labelled videos per class, but fold {fold} of "
                f"{data.name}/{data.builder_config} has fewer training videos in: {short}")
        print(f"labelled dataset {data.name}/{data.builder_config}: {counts.min()} to "
              f"{counts.max()} training videos per class, {len(names)} classes (largest n: "
              f"{most})", flush=True)


def link_pretraining(folder: Path, target: Path) -> None:
    """`<run dir>/pretrain` -> the demo's pretraining.

    `demo.stage_configs(config, run dir)` then points `init_from` here, and `demo.run_stage`
    records the pretraining's run id with each VCP run, as in the demo itself: a pretraining
    that is rerun later invalidates the runs built on it instead of being mixed with them.
    """
    link = folder / "pretrain"
    folder.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():
        if link.resolve() == target.resolve():
            return
        link.unlink()
    elif link.exists():
        raise BenchmarkError(f"{link} exists and is not a link to {target}; move it away")
    link.symlink_to(target.resolve(), target_is_directory=True)


def run_all(config: ml_collections.ConfigDict, demo_workdir: Path, workdir: Path,
            labels: Sequence[int], seeds: Sequence[int]) -> None:
    from vcp_jax import demo  # noqa: PLC0415

    total = len(labels) * len(seeds)
    for i, (n, seed) in enumerate(((n, s) for n in labels for s in seeds), 1):
        folder = run_dir(workdir, n, seed)
        link_pretraining(folder, pretrain_dir(demo_workdir, seed))
        stages = demo.stage_configs(demo_seeds.seed_config(config, seed), folder)
        for name in STAGES:
            stages[name].data.train_videos_per_class = n
        print(f"\n=== {n} labelled videos per class, seed {seed} ({i}/{total}): {folder} ===",
              flush=True)
        for name in STAGES:
            demo.run_stage(stages, name, folder)


# --------------------------------------------------------------------------------------------
# The table and the plot
# --------------------------------------------------------------------------------------------


def collect(workdir: Path, labels: Sequence[int], seeds: Sequence[int]) -> list[dict[str, Any]]:
    """Per n and protocol: each seed's VCP, random init, difference (95% CI), and the means."""
    from vcp_jax import demo, reporting  # noqa: PLC0415

    entries = []
    for n in labels:
        per_seed: dict[int, dict[str, dict[str, Any]]] = {}
        for seed in seeds:
            results = {}
            for name in STAGES:
                path = run_dir(workdir, n, seed) / name / "metrics.json"
                if not path.is_file():
                    raise BenchmarkError(f"no {path}; run without --aggregate_only")
                results[name] = reporting.read_json(path)
            rows = {r["metric"]: r for r in demo.comparison(results)}
            per_seed[seed] = {p: rows.get(metric, {}) for p, metric in PROTOCOLS.items()}
        for protocol in PROTOCOLS:
            seeds_rows = {s: per_seed[s][protocol] for s in seeds}
            values = {key: [demo_seeds.number(r.get(key)) for r in seeds_rows.values()]
                      for key in ("vcp", "random_init", "difference", "chance")}
            entries.append({
                "labels_per_class": n,
                "protocol": protocol,
                "chance": demo_seeds.mean(values["chance"]),
                "vcp_mean": demo_seeds.mean(values["vcp"]),
                "random_init_mean": demo_seeds.mean(values["random_init"]),
                "difference_mean": demo_seeds.mean(values["difference"]),
                "seeds_positive": sum(d is not None and d > 0 for d in values["difference"]),
                "per_seed": {s: {"vcp": demo_seeds.number(r.get("vcp")),
                                 "random_init": demo_seeds.number(r.get("random_init")),
                                 "difference": demo_seeds.number(r.get("difference")),
                                 "difference_ci": r.get("difference_ci"), "n": r.get("n"),
                                 "train_accuracy": r.get("train_accuracy")}
                             for s, r in seeds_rows.items()},
            })
    return entries


def render(entries: list[dict[str, Any]], seeds: Sequence[int]) -> list[str]:
    label = " / ".join(map(str, seeds))

    def cell(e: dict[str, Any], key: str, signed: bool = False) -> str:
        per = " / ".join(fmt(e["per_seed"][s][key], signed) for s in seeds)
        return f"{fmt(e[key + '_mean'], signed)} ({per})"

    lines = [f"| labelled videos / class | protocol | chance | VCP: mean ({label}) | random "
             f"init: mean ({label}) | VCP - random: mean ({label}) | seeds > 0 |",
             "|---|---|---|---|---|---|---|"]
    for e in entries:
        lines.append(f"| {e['labels_per_class']} | {PROTOCOL_LABELS[e['protocol']]} | "
                     f"{fmt(e['chance'])} | {cell(e, 'vcp')} | {cell(e, 'random_init')} | "
                     f"{cell(e, 'difference', True)} | {e['seeds_positive']}/{len(seeds)} |")
    return lines


def plot(path: Path, entries: list[dict[str, Any]], seeds: Sequence[int]) -> bool:
    """The label-efficiency plot; False when matplotlib is missing."""
    from vcp_jax import reporting  # noqa: PLC0415

    if not reporting.is_main_process() or not reporting.plotting_available():
        return False
    # The Figure API (no pyplot): no global figure state, no interactive backend needed.
    from matplotlib.figure import Figure  # noqa: PLC0415

    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    labels = sorted({e["labels_per_class"] for e in entries})
    for protocol, style in (("finetune", "-"), ("linear", "--")):
        for key, name, color in (("vcp", "VCP", "C0"), ("random_init", "random init", "C1")):
            xs, means, lows, highs = [], [], [], []
            for e in entries:
                values = [e["per_seed"][s][key] for s in seeds]
                values = [v for v in values if v is not None]
                if e["protocol"] != protocol or not values:
                    continue
                xs.append(e["labels_per_class"])
                means.append(float(np.mean(values)))
                lows.append(min(values))
                highs.append(max(values))
            if not xs:
                continue
            ax.plot(xs, means, linestyle=style, marker="o" if style == "-" else "s", color=color,
                    label=f"{name}, {PROTOCOL_LABELS[protocol]}")
            ax.fill_between(xs, lows, highs, color=color, alpha=0.15, linewidth=0)
    chances = {e["chance"] for e in entries if e["chance"] is not None}
    if len(chances) == 1:
        ax.axhline(chances.pop(), color="grey", linestyle=":", label="chance")
    ax.set_xscale("log")
    ax.set_xticks(labels, [str(n) for n in labels])
    ax.minorticks_off()
    ax.set_xlabel("labelled training videos per class")
    ax.set_ylabel("test video top-1")
    ax.set_ylim(bottom=0)
    ax.set_title(f"label efficiency: mean and min-max over seeds {', '.join(map(str, seeds))}",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def summarise(workdir: Path, config_spec: str, demo_workdir: Path, labels: Sequence[int],
              seeds: Sequence[int]) -> None:
    from vcp_jax import reporting  # noqa: PLC0415

    entries = collect(workdir, labels, seeds)
    table = render(entries, seeds)
    png = workdir / f"{OUTPUT}.png"
    plotted = plot(png, entries, seeds)
    markdown = [
        "# Label efficiency: VCP vs random init",
        "",
        f"`{config_spec}`: the demo's fine-tuning and linear-evaluation stages with n labelled "
        f"training videos per class (the same steps, optimiser and test videos for every n), "
        f"from the VCP pretraining of each seed in `{demo_workdir}/seed_<s>/pretrain` and from "
        "random init. Test video top-1; mean over the seeds, each seed's in parentheses (their "
        "paired 95% intervals are in the JSON).",
        "",
        *table,
        "",
        *([f"![label efficiency]({png.name})", ""] if plotted else []),
    ]
    (workdir / f"{OUTPUT}.md").write_text("\n".join(markdown))
    reporting.write_json(workdir / f"{OUTPUT}.json",
                         {"config": config_spec, "demo_workdir": str(demo_workdir),
                          "labels": list(labels), "seeds": list(seeds), "entries": entries})
    print()
    print("\n".join(table))
    print(f"\n{workdir / OUTPUT}.md, .json" + (", .png" if plotted else ""))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--demo_workdir", required=True,
                        help="benchmarks.demo_seeds' --workdir: the VCP pretraining of seed s is "
                             "<demo_workdir>/seed_<s>/pretrain")
    parser.add_argument("--workdir", default="",
                        help="where the runs and the table go (default: "
                             "<demo_workdir>/label_efficiency)")
    parser.add_argument("--labels", default="2,4,8,16",
                        help="labelled training videos per class (data.train_videos_per_class)")
    demo_seeds.add_seed_arguments(
        parser, config_help="the demo config demo_seeds ran with, PATH[:ARGS]",
        aggregate_help="run nothing: read the runs' metrics.json and write the table/plot")
    args = parser.parse_args(argv)
    from vcp_jax import config_utils  # noqa: PLC0415

    demo_workdir = Path(args.demo_workdir).expanduser()
    workdir = Path(args.workdir).expanduser() if args.workdir else demo_workdir / OUTPUT
    try:
        labels = sorted(demo_seeds.parse_ints(args.labels, "--labels"))
        seeds = demo_seeds.parse_ints(args.seeds, "--seeds")
        if labels[0] < 1:
            raise BenchmarkError(f"--labels {args.labels}: each must be at least 1")
        if not args.aggregate_only:
            config = demo_seeds.load_config(args.config)
            for seed in seeds:  # all of them before anything runs
                check_pretraining(config, demo_workdir, seed)
            _common.print_header("label efficiency: VCP vs random init")
            demo_seeds.setup(args.compilation_cache)
            with demo_seeds.workdir_run(workdir):
                check_labelled_videos(config, labels[-1])
                run_all(config, demo_workdir, workdir, labels, seeds)
        summarise(workdir, args.config, demo_workdir, labels, seeds)
    except (BenchmarkError, config_utils.UserError) as e:
        return demo_seeds.report_error(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
