"""Pretext comparison: VCP and VCOP, each on RGB and on residual frames, in the demo's world.

For each seed (`--seeds`) four backbones are pretrained with the demo's pretraining stage
(`demo.stage_configs` of the demo config with `seed = s`) changed only in the pretext
(`config.pretext`: vcp | vcop) and the input (`model.modality`: rgb | res): the same videos,
clip length, interval, held-out tuples, steps, batch and optimiser. VCOP orders the 3 clips the
cloze samples (the cloze's `clip_len`, `interval`, `num_clips`, `eval_tuples_per_video`); the
cloze's options and remote gap have no VCOP counterpart. Residual frames use each pretext's own
formula (VCP's `(roll(x, 1, T) - x + 1) / 2`, VCOP's `x - roll(x, 1, T)`, `vcp_jax.modality`).

Each backbone then goes through the demo's fine-tuning, linear evaluation and retrieval stages
unchanged (the input modality comes from the checkpoint), and so does random init, once per
seed and input: random init (RGB) is the demo's own, random init (res) the same stages on
residual frames (the formula of stages without a pretext, VCP's); the demo's per-init settings
(`config.init_overrides`) apply as in the demo: "pretrained" to all four backbones (chosen for
VCP on RGB, not retuned here), "random" to both random inits. A residual variant is compared
with random init on residual frames, so that the difference is the pretraining's and not the
input's; random init (res) is compared with random init (RGB), which is the input's effect.

Runs, each a folder of demo stages, resumed and reused as the demo's stages are
(`demo.run_stage`: a finished stage with the same config is read, an interrupted one resumed):

    <workdir>/seed_<s>/{vcp_rgb,vcp_res,vcop_rgb,vcop_res}/  pretrain, finetune_vcp,
                                                              linear_vcp, retrieval_vcp
    <workdir>/seed_<s>/{random_rgb,random_res}/               finetune_random, linear_random,
                                                              retrieval_random

(`_vcp` is the demo's name for "from this folder's pretraining", whatever its pretext.) With
`--demo_workdir` (a `benchmarks.demo_seeds` workdir) VCP-RGB and random init (RGB) of seed s are
read from `<demo_workdir>/seed_<s>/` instead: every stage there must be finished with the config
this script would run (its `demo_stage.json`), else nothing runs; nothing is written there.

Writes `<workdir>/pretext_comparison.md`, `.json` (per backbone and protocol: held-out pretext
accuracy, fine-tuning video top-1, linear-eval video top-1, retrieval top-1; mean over seeds and
per seed; the difference to the reference random init with each seed's paired 95% interval;
chance) and `pretext_comparison.png` (grouped bars per protocol, per-seed dots, chance).

    PYTHONPATH=. python -m benchmarks.pretext_comparison --workdir /tmp/vcp_pretexts \\
        --demo_workdir /tmp/vcp_seeds                   # reuses demo_seeds' VCP-RGB and random
    PYTHONPATH=. python -m benchmarks.pretext_comparison --config configs/demo.py:size=tiny \\
        --workdir /tmp/vcp_pretexts_tiny --seeds 0
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

from benchmarks import _common, demo_seeds
from benchmarks.demo_seeds import BenchmarkError, fmt, fmt_ci

# Each backbone: (pretext, or None for random init; input modality).
KINDS: dict[str, tuple[str | None, str]] = {
    "vcp_rgb": ("vcp", "rgb"), "vcp_res": ("vcp", "res"),
    "vcop_rgb": ("vcop", "rgb"), "vcop_res": ("vcop", "res"),
    "random_rgb": (None, "rgb"), "random_res": (None, "res"),
}
LABELS = {"vcp_rgb": "VCP-RGB", "vcp_res": "VCP-res", "vcop_rgb": "VCOP-RGB",
          "vcop_res": "VCOP-res", "random_rgb": "random init (RGB)",
          "random_res": "random init (res)"}
# What each backbone's difference is taken against: random init on the same input.
REFERENCE = {"vcp_rgb": "random_rgb", "vcp_res": "random_res", "vcop_rgb": "random_rgb",
             "vcop_res": "random_res", "random_res": "random_rgb"}
# What `--demo_workdir` provides: the demo's own VCP pretraining and random init.
FROM_DEMO = ("vcp_rgb", "random_rgb")
# Within a seed the random inits run first: minutes, against a pretraining's quarter hour.
RUN_ORDER = ("random_rgb", "random_res", "vcp_rgb", "vcp_res", "vcop_rgb", "vcop_res")
# The demo's comparison row (vcp_jax.demo.comparison) of each downstream protocol.
PROTOCOLS = {"finetune": "fine-tuning: video top-1", "linear": "linear eval: video top-1",
             "retrieval": "retrieval: top-1"}
PRETEXT = "pretext"  # the pretraining's own held-out accuracy, a row of the table too
PROTOCOL_LABELS = {PRETEXT: "pretext: held-out accuracy", **PROTOCOLS}
OUTPUT = "pretext_comparison"


@dataclasses.dataclass(frozen=True)
class Run:
    """One backbone of one seed: the demo stages that make and evaluate it, in `folder`."""

    seed: int
    kind: str
    folder: Path
    reused: bool = False  # a demo_seeds folder: checked and read, never run or written

    @property
    def label(self) -> str:
        return LABELS[self.kind]

    @property
    def pretext(self) -> str | None:
        return KINDS[self.kind][0]

    @property
    def modality(self) -> str:
        return KINDS[self.kind][1]

    def stage(self, protocol: str) -> str:
        """The demo stage (its folder name) that measures `protocol` for this backbone."""
        if protocol == PRETEXT:
            return "pretrain"
        return f"{protocol}_{'random' if self.pretext is None else 'vcp'}"

    @property
    def protocols(self) -> tuple[str, ...]:
        return ((PRETEXT,) if self.pretext is not None else ()) + tuple(PROTOCOLS)

    @property
    def stages(self) -> tuple[str, ...]:
        return tuple(self.stage(p) for p in self.protocols)


def plan(workdir: Path, seeds: Sequence[int], demo_workdir: Path | None = None) -> list[Run]:
    """Every run, seed by seed in `RUN_ORDER`; VCP-RGB and random init (RGB) from
    `demo_workdir`'s seed folders when it is given."""
    runs = []
    for seed in seeds:
        for kind in RUN_ORDER:
            if demo_workdir is not None and kind in FROM_DEMO:
                runs.append(Run(seed, kind, demo_seeds.seed_dir(demo_workdir, seed), True))
            else:
                runs.append(Run(seed, kind, demo_seeds.seed_dir(workdir, seed) / kind))
    return runs


# --------------------------------------------------------------------------------------------
# Configs and runs
# --------------------------------------------------------------------------------------------


def use_vcop(pre: ml_collections.ConfigDict) -> None:
    """The demo's VCP pretraining config, in place, as VCOP pretraining on the same clips.

    VCOP orders the 3 clips the cloze samples (clip length, interval, held-out tuples per
    video); the rest (videos, steps, batch, optimiser, seed, input) stays the demo's. The
    cloze's options and remote gap have no VCOP counterpart.
    """
    from vcp_jax import vcop  # noqa: PLC0415 - jax only when configs are built

    section = vcop.default_config()
    for key in ("clip_len", "interval", "num_clips", "eval_tuples_per_video"):
        section[key] = pre.cloze[key]
    with pre.unlocked():
        pre.pretext = "vcop"
        del pre["cloze"]
        pre.vcop = section


def stage_configs(config: ml_collections.ConfigDict, run: Run) -> dict[str, Any]:
    """The demo's stage configs of `run`'s seed and folder, with its pretext and input."""
    from vcp_jax import demo  # noqa: PLC0415

    stages = demo.stage_configs(demo_seeds.seed_config(config, run.seed), run.folder)
    if run.pretext is not None:
        stages["pretrain"].model.modality = run.modality
        if run.pretext == "vcop":
            use_vcop(stages["pretrain"])
    elif run.modality != "rgb":
        # Only here: the demo's random stages leave the modality unset (RGB), and random
        # init (RGB) must keep the demo's config to be reusable from a demo_seeds folder.
        for protocol in PROTOCOLS:
            stages[run.stage(protocol)].model.modality = run.modality
    return stages


def check_reused(config: ml_collections.ConfigDict, run: Run, demo_workdir: Path,
                 config_spec: str) -> None:
    """Every stage of a run taken from `demo_workdir` is finished, with the config (and the
    pretraining run) this script would use; a `BenchmarkError` that says what to do otherwise."""
    from vcp_jax import demo  # noqa: PLC0415

    stages = stage_configs(config, run)
    for name in run.stages:
        done = run.folder / name / demo.RESULT_FILES[name.split("_")[0]]
        changed = demo.stage_changes(stages, name, run.folder)
        if not done.is_file():
            problem = f"is not finished (no {done})"
        elif changed:
            problem = (f"was run with another config (differs in {', '.join(changed[:8])}"
                       f"{', ...' if len(changed) > 8 else ''})")
        else:
            continue
        raise BenchmarkError(
            f"seed {run.seed}: cannot take {run.label} from --demo_workdir: {run.folder / name} "
            f"{problem}; run `python -m benchmarks.demo_seeds --workdir {demo_workdir} --seeds "
            f"{run.seed} --config {config_spec}` first, or leave out --demo_workdir to run it "
            f"here")


def read_run(run: Run) -> dict[str, dict[str, Any]]:
    """The results of `run` per protocol, as its stages wrote them."""
    from vcp_jax import demo, reporting  # noqa: PLC0415

    results = {}
    for protocol in run.protocols:
        name = run.stage(protocol)
        path = run.folder / name / demo.RESULT_FILES[name.split("_")[0]]
        if not path.is_file():
            raise BenchmarkError(f"seed {run.seed}, {run.label}: no {path}; run without "
                                 f"--aggregate_only")
        results[protocol] = reporting.read_json(path)
    return results


def headline(result: dict[str, Any], protocol: str) -> float | None:
    """The one number of a stage's result the comparison is about (top-1 or pretext
    accuracy)."""
    if protocol == PRETEXT:
        return demo_seeds.number(result.get(f"val_{result.get('pretext', 'vcp')}_accuracy"))
    if protocol == "retrieval":
        return demo_seeds.number(result.get("topk", {}).get("1"))
    return demo_seeds.number(result.get("test", {}).get("video_top1"))


def run_line(run: Run, results: dict[str, dict[str, Any]], seconds: float | None) -> str:
    """A run in one console line: its numbers, and how long it took (or where it came from)."""
    parts = []
    for protocol in run.protocols:
        value = fmt(headline(results[protocol], protocol))
        if protocol == PRETEXT:
            chance = demo_seeds.number(results[protocol].get("chance_accuracy"))
            parts.append(f"pretext {value} (chance {fmt(chance)})")
        else:
            parts.append(f"{protocol} {value}")
    when = (f"from {run.folder}" if run.reused else
            f"{seconds:.0f} s" if seconds is not None else "")
    return f"seed {run.seed} {run.label:<17}  " + ", ".join(parts) + f"  [{when}]"


def run_all(config: ml_collections.ConfigDict, runs: Sequence[Run]) -> None:
    """Runs (resumes, or reuses) every run's stages, one summary line per run."""
    from vcp_jax import demo  # noqa: PLC0415

    for i, run in enumerate(runs, 1):
        start = time.perf_counter()
        if not run.reused:
            print(f"\n=== [{i}/{len(runs)}] seed {run.seed}, {run.label}: {run.folder} ===",
                  flush=True)
            stages = stage_configs(config, run)
            for name in run.stages:
                demo.run_stage(stages, name, run.folder)
        seconds = None if run.reused else time.perf_counter() - start
        print(f"[{i}/{len(runs)}] {run_line(run, read_run(run), seconds)}", flush=True)


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------


def seed_values(results: dict[str, dict[str, dict[str, Any]]], kind: str,
                protocol: str) -> dict[str, Any]:
    """One seed's number of a backbone on a protocol, against its reference random init:
    value, its Wilson 95% interval, the reference's value, the difference with its paired 95%
    interval (where both stages saved per-item results), chance and n."""
    from vcp_jax import demo, stats  # noqa: PLC0415

    own = results[kind][protocol]
    if protocol == PRETEXT:
        value, n = headline(own, protocol), own.get("val_tuples")
        interval = stats.accuracy_interval(value, n)
        return {"value": value, "value_ci": None if interval is None else list(interval),
                "reference": None, "difference": None, "difference_ci": None,
                "chance": demo_seeds.number(own.get("chance_accuracy")), "n": n}
    reference = REFERENCE.get(kind)
    pair = {f"{protocol}_vcp": own,
            f"{protocol}_random": results[reference][protocol] if reference else {}}
    row = next((r for r in demo.comparison(pair) if r["metric"] == PROTOCOLS[protocol]), {})
    return {"value": demo_seeds.number(row.get("vcp")), "value_ci": row.get("vcp_ci"),
            "reference": demo_seeds.number(row.get("random_init")),
            "difference": demo_seeds.number(row.get("difference")),
            "difference_ci": row.get("difference_ci"),
            "chance": demo_seeds.number(row.get("chance")), "n": row.get("n")}


def collect(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One entry per protocol and backbone (in `PROTOCOL_LABELS`, `KINDS` order): the mean
    over seeds of its value, its reference's and their difference, and each seed's."""
    seeds = list(dict.fromkeys(run.seed for run in runs))
    results: dict[int, dict[str, dict[str, dict[str, Any]]]] = {s: {} for s in seeds}
    for run in runs:
        results[run.seed][run.kind] = read_run(run)
    entries = []
    for protocol in PROTOCOL_LABELS:
        for kind in KINDS:
            if protocol == PRETEXT and KINDS[kind][0] is None:
                continue
            per_seed = {s: seed_values(results[s], kind, protocol) for s in seeds}
            diffs = [v["difference"] for v in per_seed.values()]
            entries.append({
                "protocol": protocol, "kind": kind, "label": LABELS[kind],
                "reference": None if protocol == PRETEXT else REFERENCE.get(kind),
                "chance": demo_seeds.mean([v["chance"] for v in per_seed.values()]),
                "mean": demo_seeds.mean([v["value"] for v in per_seed.values()]),
                "reference_mean": demo_seeds.mean([v["reference"] for v in per_seed.values()]),
                "difference_mean": demo_seeds.mean(diffs),
                "seeds_positive": sum(d is not None and d > 0 for d in diffs),
                "seeds_measured": sum(d is not None for d in diffs),
                "per_seed": per_seed,
            })
    return entries


# --------------------------------------------------------------------------------------------
# The table and the plot
# --------------------------------------------------------------------------------------------


def render(entries: list[dict[str, Any]], seeds: Sequence[int]) -> list[str]:
    """The markdown table: a row per protocol and backbone."""
    label = " / ".join(map(str, seeds))

    def per(e: dict[str, Any], key: str, signed: bool = False) -> str:
        return " / ".join(fmt(e["per_seed"][s][key], signed) for s in seeds)

    lines = [f"| protocol | backbone | chance | mean ({label}) | compared with | minus it: "
             f"mean ({label}) | 95% CI of the difference, per seed | seeds > 0 |",
             "|---|---|---|---|---|---|---|---|"]
    for e in entries:
        if e["reference"] is None:
            compared = diff = ci = positive = "-"
        else:
            compared = LABELS[e["reference"]]
            diff = f"{fmt(e['difference_mean'], True)} ({per(e, 'difference', True)})"
            ci = " / ".join(fmt_ci(e["per_seed"][s]["difference_ci"]) for s in seeds)
            positive = f"{e['seeds_positive']}/{e['seeds_measured']}"
        lines.append(f"| {PROTOCOL_LABELS[e['protocol']]} | {e['label']} | {fmt(e['chance'])} | "
                     f"{fmt(e['mean'])} ({per(e, 'value')}) | {compared} | {diff} | {ci} | "
                     f"{positive} |")
    return lines


COLORS = {"vcp_rgb": "C0", "vcp_res": "C0", "vcop_rgb": "C2", "vcop_res": "C2",
          "random_rgb": "C7", "random_res": "C7"}


def plot(path: Path, entries: list[dict[str, Any]], seeds: Sequence[int]) -> bool:
    """Grouped bars: a group per protocol, a bar per backbone (the mean over seeds), a dot per
    seed and the chance level over each bar; residual inputs hatched. False without
    matplotlib."""
    from vcp_jax import reporting  # noqa: PLC0415

    if not reporting.is_main_process() or not reporting.plotting_available():
        return False
    fig = reporting.figure((9.0, 4.6))
    ax = fig.subplots()
    kinds = list(KINDS)
    width = 0.8 / len(kinds)
    groups = list(PROTOCOL_LABELS)
    chance_labelled = False
    for g, protocol in enumerate(groups):
        for k, kind in enumerate(kinds):
            e = next((e for e in entries if e["protocol"] == protocol and e["kind"] == kind),
                     None)
            if e is None or e["mean"] is None:
                continue
            x = g + (k - (len(kinds) - 1) / 2) * width
            ax.bar(x, e["mean"], width, color=COLORS[kind], alpha=0.75, edgecolor="black",
                   linewidth=0.5, hatch="//" if KINDS[kind][1] == "res" else None,
                   label=LABELS[kind] if g == len(groups) - 1 else None)
            values = [e["per_seed"][s]["value"] for s in seeds]
            values = [v for v in values if v is not None]
            ax.plot([x] * len(values), values, "o", color="black", markersize=3)
            if e["chance"] is not None:
                ax.hlines(e["chance"], x - width / 2, x + width / 2, color="red",
                          linestyle=":", label=None if chance_labelled else "chance")
                chance_labelled = True
    ax.set_xticks(range(len(groups)), [PROTOCOL_LABELS[p] for p in groups], fontsize=8)
    ax.set_ylabel("accuracy (held-out / test)")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"pretexts and inputs: mean over seeds {', '.join(map(str, seeds))} "
                 f"(dots: seeds)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=4, loc="lower center", bbox_to_anchor=(0.5, -0.32))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def render_markdown(config_spec: str, runs: Sequence[Run], seeds: Sequence[int],
                    table: list[str], plotted: bool) -> str:
    reused = sorted({str(r.folder) for r in runs if r.reused})
    lines = [
        "# Pretext comparison: VCP and VCOP, on RGB and on residual frames",
        "",
        f"`{config_spec}`, seeds {', '.join(map(str, seeds))}. Each backbone is pretrained "
        "with the demo's pretraining stage changed only in the pretext (VCP or VCOP, which "
        "orders the same 3 clips) and the input (RGB or residual frames, each pretext's own "
        "formula), then evaluated with the demo's fine-tuning, linear evaluation and retrieval "
        "(test videos of the demo's fold). Random init is evaluated once per seed and input "
        "(residual frames: VCP's formula, the one of stages without a pretext). A backbone's "
        "difference is taken against random init on the same input; random init (res) against "
        "random init (RGB), the input's own effect. The pretext row is each pretraining's "
        "held-out accuracy on its own task: VCP's and VCOP's have different chance levels and "
        "are not comparable with each other. Every pretrained backbone is fine-tuned with the "
        "demo's settings for a pretrained start (`config.init_overrides.pretrained`, chosen on "
        "the validation fold for VCP on RGB; not tuned for VCOP or residual input), random init "
        "with the demo's for random init.",
        "",
        "Mean over seeds, each seed's in parentheses. Intervals are 95%: the difference's is a "
        "paired bootstrap over the same test videos or queries (vcp_jax.stats, as in the "
        "demo's report); each value's Wilson interval is in the JSON. Chance: 1/classes for "
        "top-1, the hypergeometric chance of the gallery for retrieval, 1/options or 1/orders "
        "for the pretext.",
        "",
        *table,
        "",
        *([f"![pretext comparison]({OUTPUT}.png)", ""] if plotted else []),
        "Runs: `seed_<s>/<backbone>/<stage>/` in this folder"
        + (f"; VCP-RGB and random init (RGB) from {', '.join(f'`{r}`' for r in reused)}"
           if reused else "") + ".",
    ]
    return "\n".join(lines) + "\n"


def summarise(workdir: Path, config_spec: str, runs: Sequence[Run],
              demo_workdir: Path | None) -> list[dict[str, Any]]:
    """Reads every run, writes pretext_comparison.md / .json / .png, prints the table."""
    from vcp_jax import reporting  # noqa: PLC0415

    seeds = list(dict.fromkeys(run.seed for run in runs))
    entries = collect(runs)
    table = render(entries, seeds)
    workdir.mkdir(parents=True, exist_ok=True)
    plotted = plot(workdir / f"{OUTPUT}.png", entries, seeds)
    (workdir / f"{OUTPUT}.md").write_text(
        render_markdown(config_spec, runs, seeds, table, plotted))
    reporting.write_json(workdir / f"{OUTPUT}.json", {
        "config": config_spec, "seeds": seeds,
        "demo_workdir": None if demo_workdir is None else str(demo_workdir),
        "references": REFERENCE,
        "runs": [{"seed": r.seed, "backbone": r.kind, "folder": str(r.folder),
                  "reused": r.reused} for r in runs],
        "entries": entries})
    print()
    print("\n".join(table))
    print(f"\n{workdir / OUTPUT}.md, .json" + (", .png" if plotted else ""))
    return entries


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--workdir", required=True,
                        help="the runs go to <workdir>/seed_<s>/<backbone>; the table beside")
    parser.add_argument("--demo_workdir", default="",
                        help="a benchmarks.demo_seeds --workdir (spelled as given to it): VCP-RGB "
                             "and random init (RGB) of seed s are read from its seed_<s>/")
    demo_seeds.add_seed_arguments(
        parser, config_help="the demo config, PATH[:ARGS] (the one demo_seeds ran with)",
        aggregate_help="run nothing: read the runs' results and write the table/plot")
    args = parser.parse_args(argv)
    from vcp_jax import config_utils  # noqa: PLC0415

    workdir = Path(args.workdir).expanduser()
    demo_workdir = Path(args.demo_workdir).expanduser() if args.demo_workdir else None
    try:
        seeds = demo_seeds.parse_ints(args.seeds, "--seeds")
        runs = plan(workdir, seeds, demo_workdir)
        if not args.aggregate_only:
            config = demo_seeds.load_config(args.config)
            for run in runs:  # all of them before anything runs
                if run.reused:
                    check_reused(config, run, demo_workdir, args.config)
            _common.print_header("pretext comparison: VCP / VCOP x RGB / residual")
            demo_seeds.setup(args.compilation_cache)
            start = time.perf_counter()
            with demo_seeds.workdir_run(workdir):
                run_all(config, runs)
            print(f"\nthis run: {(time.perf_counter() - start) / 60:.1f} min", flush=True)
        summarise(workdir, args.config, runs, demo_workdir)
    except (BenchmarkError, config_utils.UserError) as e:
        return demo_seeds.report_error(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
