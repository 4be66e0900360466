"""The built-in demo over several seeds: every comparison row as mean and per seed, and the gates.

Runs the demo (`vcp_jax.demo.run`, as `python main.py --config configs/demo.py` does) once per
seed into `<workdir>/seed_<s>` (each resumable stage by stage, as the demo is), or with
`--aggregate_only` only reads their `metrics.json`. Then writes `<workdir>/seeds.md` and
`<workdir>/seeds.json`: for each comparison row the mean over seeds of VCP, random init and
VCP - random, the per-seed differences with their 95% intervals, the chance level and how many
seeds have VCP - random > 0; the stage times per seed and their mean; and the demo's gate checks,
PASS / FAIL per seed (the numbers are reported as measured, never adjusted):

- pretraining: held-out VCP accuracy >= 0.5 on every kept cloze option
  (`<seed>/pretrain/metrics.json`, `val_accuracy/<option>`),
- random-init fine-tuning video top-1 >= 3x chance, and >= 4x chance,
- VCP - random > 0 on fine-tuning video top-1, linear-eval video top-1 and retrieval top-1.

    PYTHONPATH=. python -m benchmarks.demo_seeds --workdir /tmp/vcp_seeds              # 3 seeds
    PYTHONPATH=. python -m benchmarks.demo_seeds --config configs/demo.py:size=tiny \\
        --workdir /tmp/vcp_seeds_tiny --seeds 0
    PYTHONPATH=. python -m benchmarks.demo_seeds --workdir /tmp/vcp_seeds --aggregate_only
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import math
import statistics
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from benchmarks import _common

DEFAULT_CONFIG = "configs/demo.py"
DEFAULT_CACHE = "~/.cache/vcp_jax/jax_cache"  # main.py's --compilation_cache default
MARKDOWN, JSON = "seeds.md", "seeds.json"
# The gates of the demo's issue. Thresholds are fixed here so that every run is judged alike.
OPTION_ACCURACY_GATE = 0.5
CHANCE_MULTIPLES = (3, 4)
DIFFERENCE_GATES = ("fine-tuning: video top-1", "linear eval: video top-1", "retrieval: top-1")
RANDOM_FINETUNE_ROW = "fine-tuning: video top-1"


class BenchmarkError(Exception):
    """A problem with the command line or the workdir, said in one line (exit status 2)."""


def parse_ints(text: str, what: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]: distinct integers, in the order given."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BenchmarkError(f"{what}: {text!r} is not a comma-separated list of "
                             f"integers") from None
    if not values or len(set(values)) != len(values):
        raise BenchmarkError(f"{what}: {text!r} must name at least one value, each once")
    return values


def load_config(spec: str) -> ml_collections.ConfigDict:
    """A demo config from `PATH[:ARGS]` (as `main.py --config` takes it, e.g. `:size=tiny`)."""
    from absl import flags  # noqa: PLC0415 - config_paths reports a missing file as a flag error

    from vcp_jax import config_paths  # noqa: PLC0415

    try:
        resolved = config_paths.resolve_config_path(spec)
    except flags.Error as e:
        raise BenchmarkError(f"--config: {e}") from None
    path, _, args = resolved.partition(":")
    module_spec = importlib.util.spec_from_file_location("_benchmark_demo_config", path)
    if module_spec is None or module_spec.loader is None:
        raise BenchmarkError(f"--config: cannot load {path}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    try:
        config = module.get_config(args)
    except ValueError as e:  # the config's own argument check (an unknown size, ...)
        raise BenchmarkError(f"--config {spec}: {e}") from None
    if config.get("task") != "demo":
        raise BenchmarkError(f"--config {spec}: task is {config.get('task')!r}, not 'demo'")
    return config


def seed_config(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
    """A copy of the demo config with one seed (every stage takes it from `config.seed`)."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.seed = seed
    return config


def setup(compilation_cache: str) -> None:
    """What `main.py` does before a run: JAX's compilation cache and a quiet console."""
    from vcp_jax import main as vcp_main  # noqa: PLC0415 - JAX only when something runs

    vcp_main.enable_compilation_cache(compilation_cache)
    vcp_main.setup_console(0)


@contextlib.contextmanager
def workdir_run(workdir: Path) -> Iterator[None]:
    """`workdir` as `main.py` holds one: created and probed, locked (no second run in it), its
    library logs in `log.txt`, SIGTERM / SIGINT ending the run after a checkpoint."""
    from vcp_jax import main as vcp_main  # noqa: PLC0415
    from vcp_jax import signals  # noqa: PLC0415

    lock = vcp_main.open_workdir(workdir)
    # setup_logging adds file handlers to these loggers; they are removed afterwards so that
    # the next workdir's run does not also log into this one's file.
    loggers = [logging.getLogger(), logging.getLogger("py.warnings")]
    before = [list(lg.handlers) for lg in loggers]
    try:
        vcp_main.setup_logging(workdir, 0)
        with signals.handle_signals():
            yield
    finally:
        for lg, handlers in zip(loggers, before, strict=True):
            for handler in [h for h in lg.handlers if h not in handlers]:
                lg.removeHandler(handler)
                handler.close()
        if lock is not None:
            lock.release()


def seed_dir(workdir: Path, seed: int) -> Path:
    return workdir / f"seed_{seed}"


def run_seed(config: ml_collections.ConfigDict, seed: int, workdir: Path) -> None:
    from vcp_jax import demo  # noqa: PLC0415

    with workdir_run(seed_dir(workdir, seed)):
        demo.run(seed_config(config, seed), seed_dir(workdir, seed))


def read_seed(workdir: Path, seed: int) -> dict[str, Any]:
    """A finished demo's `metrics.json` with its pretraining's as `pretrain_metrics`."""
    from vcp_jax import reporting  # noqa: PLC0415

    folder = seed_dir(workdir, seed)
    path = folder / "metrics.json"
    if not path.is_file():
        raise BenchmarkError(f"seed {seed}: no {path}; run the demo for it first (without "
                             f"--aggregate_only)")
    result = reporting.read_json(path)
    pretrain = folder / "pretrain" / "metrics.json"
    result["pretrain_metrics"] = reporting.read_json(pretrain) if pretrain.is_file() else {}
    # The seed in the folder's name must be the one the demo ran with: a folder copied or
    # renamed by hand would otherwise be averaged under the wrong seed.
    record = folder / "pretrain" / "demo_stage.json"
    if record.is_file():
        ran = reporting.read_json(record).get("config", {}).get("seed")
        if ran is not None and int(ran) != seed:
            raise BenchmarkError(f"{folder} holds a demo run with seed {ran}, not {seed}")
    return result


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------


def number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def aggregate_rows(per_seed: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per comparison row (in the demo's order): means over the seeds that measured
    it, and each seed's VCP, random init, difference, its 95% interval and n."""
    metrics: list[str] = []
    by_seed: dict[int, dict[str, dict[str, Any]]] = {}
    for seed, result in per_seed.items():
        by_seed[seed] = {row["metric"]: row for row in result.get("comparison", [])}
        metrics += [m for m in by_seed[seed] if m not in metrics]
    rows = []
    for metric in metrics:
        seeds = {}
        for seed in per_seed:
            row = by_seed[seed].get(metric, {})
            seeds[seed] = {"vcp": number(row.get("vcp")),
                           "random_init": number(row.get("random_init")),
                           "difference": number(row.get("difference")),
                           "difference_ci": row.get("difference_ci"),
                           "chance": number(row.get("chance")), "n": row.get("n")}
        diffs = [s["difference"] for s in seeds.values()]
        rows.append({
            "metric": metric,
            "chance": mean([s["chance"] for s in seeds.values()]),
            "vcp_mean": mean([s["vcp"] for s in seeds.values()]),
            "random_init_mean": mean([s["random_init"] for s in seeds.values()]),
            "difference_mean": mean(diffs),
            "seeds_positive": sum(d is not None and d > 0 for d in diffs),
            "seeds_measured": sum(d is not None for d in diffs),
            "per_seed": seeds,
        })
    return rows


def stage_times(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Stage seconds per seed (as each demo recorded them, from the run that ran the stage)
    and their mean over the seeds that recorded them."""
    stages: list[str] = []
    for result in per_seed.values():
        stages += [s for s in result.get("stage_seconds", {}) if s not in stages]
    per = {seed: {s: number(r.get("stage_seconds", {}).get(s)) for s in stages}
           for seed, r in per_seed.items()}
    totals = {seed: number(r.get("total_stage_seconds")) for seed, r in per_seed.items()}
    return {"stages": stages, "per_seed": per, "total_per_seed": totals,
            "mean": {s: mean([per[seed][s] for seed in per]) for s in stages},
            "total_mean": mean(list(totals.values()))}


# --------------------------------------------------------------------------------------------
# Gates
# --------------------------------------------------------------------------------------------


def _verdict(ok: bool | None) -> str:
    return "N/A" if ok is None else "PASS" if ok else "FAIL"


def _row_of(result: dict[str, Any], metric: str) -> dict[str, Any]:
    return next((r for r in result.get("comparison", []) if r["metric"] == metric), {})


def option_gate(result: dict[str, Any]) -> dict[str, Any]:
    """Held-out (pretraining validation) VCP accuracy >= 0.5 on every kept option.

    The probe's per-option rows are another measurement (a new head on the frozen backbone)
    and are not used here. An option with no held-out tuple has no accuracy: N/A.
    """
    pre = result.get("pretrain_metrics", {})
    names = pre.get("option_names") or []
    accuracies = {name: number(pre.get(f"val_accuracy/{name}")) for name in names}
    if not accuracies:
        return {"status": "N/A", "detail": "no per-option held-out accuracies in "
                                           "pretrain/metrics.json", "values": {}}
    measured = [a for a in accuracies.values() if a is not None]
    # One measured option below the bar fails the gate whatever the unmeasured ones would be.
    if any(a < OPTION_ACCURACY_GATE for a in measured):
        ok: bool | None = False
    else:
        ok = True if len(measured) == len(accuracies) else None
    total = number(pre.get("val_tuples"))

    def tuples(name: str) -> str:
        fraction = number(pre.get(f"val_option_fraction/{name}"))
        return "" if fraction is None or total is None else f" (n {round(fraction * total)})"

    detail = ", ".join(f"{n} {'-' if a is None else f'{a:.2f}'}{tuples(n)}"
                       for n, a in accuracies.items())
    return {"status": _verdict(ok), "detail": detail, "values": accuracies}


def gates(per_seed: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each gate with its status and the numbers behind it, per seed."""
    out = []
    out.append({"gate": f"pretraining: held-out VCP accuracy >= {OPTION_ACCURACY_GATE} on "
                        f"every option", "seeds": {s: option_gate(r) for s, r in per_seed.items()}})
    for multiple in CHANCE_MULTIPLES:
        seeds = {}
        for s, result in per_seed.items():
            row = _row_of(result, RANDOM_FINETUNE_ROW)
            value, chance = number(row.get("random_init")), number(row.get("chance"))
            ok = None if value is None or chance is None else value >= multiple * chance
            seeds[s] = {"status": _verdict(ok), "values": {"random_init": value, "chance": chance},
                        "detail": "-" if ok is None else
                        f"{value:.3f} vs {multiple} x {chance:.3f} = {multiple * chance:.3f}"}
        out.append({"gate": f"random-init {RANDOM_FINETUNE_ROW} >= {multiple}x chance",
                    "seeds": seeds})
    for metric in DIFFERENCE_GATES:
        seeds = {}
        for s, result in per_seed.items():
            diff = number(_row_of(result, metric).get("difference"))
            seeds[s] = {"status": _verdict(None if diff is None else diff > 0),
                        "values": {"difference": diff},
                        "detail": "-" if diff is None else f"{diff:+.3f}"}
        out.append({"gate": f"VCP - random > 0 on {metric}", "seeds": seeds})
    return out


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def fmt_ci(interval: Sequence[float] | None) -> str:
    if not interval:
        return "-"
    return f"[{interval[0]:+.3f}, {interval[1]:+.3f}]"


def render_rows(rows: list[dict[str, Any]], seeds: Sequence[int]) -> list[str]:
    label = " / ".join(str(s) for s in seeds)
    lines = [f"| metric | chance | VCP | random init | VCP - random | per seed ({label}) | "
             f"per-seed 95% CI of VCP - random | seeds > 0 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per = r["per_seed"]
        lines.append(
            f"| {r['metric']} | {fmt(r['chance'])} | {fmt(r['vcp_mean'])} | "
            f"{fmt(r['random_init_mean'])} | {fmt(r['difference_mean'], True)} | "
            + " / ".join(fmt(per[s]["difference"], True) for s in seeds) + " | "
            + " / ".join(fmt_ci(per[s]["difference_ci"]) for s in seeds) + " | "
            + f"{r['seeds_positive']}/{r['seeds_measured']} |")
    return lines


def render_times(times: dict[str, Any], seeds: Sequence[int]) -> list[str]:
    def sec(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    lines = ["| stage | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
             "|---|" + "---|" * (len(seeds) + 1)]
    for stage in times["stages"]:
        lines.append(f"| {stage} | " + " | ".join(sec(times["per_seed"][s][stage])
                                                   for s in seeds)
                     + f" | {sec(times['mean'][stage])} |")
    lines.append("| total | " + " | ".join(sec(times["total_per_seed"][s]) for s in seeds)
                 + f" | {sec(times['total_mean'])} |")
    return lines


def render_gates(checks: list[dict[str, Any]], seeds: Sequence[int]) -> list[str]:
    lines = ["| gate | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|" + "---|" * len(seeds)]
    for g in checks:
        lines.append(f"| {g['gate']} | " + " | ".join(
            f"{g['seeds'][s]['status']} ({g['seeds'][s]['detail']})" for s in seeds) + " |")
    return lines


def render_markdown(config_spec: str, seeds: Sequence[int], rows: list[dict[str, Any]],
                    times: dict[str, Any], checks: list[dict[str, Any]]) -> str:
    lines = [
        f"# The demo over seeds {', '.join(map(str, seeds))}",
        "",
        f"`{config_spec}`, one demo per seed in `seed_<s>/` (its own report.md per seed). "
        "VCP, random init, VCP - random and chance: means over the seeds that measured the row. "
        "Per seed: VCP - random, and its 95% interval (paired bootstrap over the test items; "
        "'-' where the runs save no per-item results, as for the probe). 'seeds > 0': seeds with "
        "VCP - random > 0, of those that measured it.",
        "",
        *render_rows(rows, seeds),
        "",
        "## Gates",
        "",
        "PASS / FAIL per seed on the numbers as measured; N/A where a number is missing.",
        "",
        *render_gates(checks, seeds),
        "",
        "## Stage times (s)",
        "",
        "Wall-clock seconds per stage, from the run that ran it (a resumed demo keeps earlier "
        "ones; data generation and dataset builds count in the first stage that needs them).",
        "",
        *render_times(times, seeds),
    ]
    return "\n".join(lines) + "\n"


def summarise(workdir: Path, config_spec: str, seeds: Sequence[int]) -> dict[str, Any]:
    """Reads every seed's results, writes seeds.md / seeds.json, prints the tables."""
    from vcp_jax import reporting  # noqa: PLC0415

    per_seed = {s: read_seed(workdir, s) for s in seeds}
    rows = aggregate_rows(per_seed)
    times = stage_times(per_seed)
    checks = gates(per_seed)
    markdown = render_markdown(config_spec, seeds, rows, times, checks)
    (workdir / MARKDOWN).write_text(markdown)
    summary = {"config": config_spec, "seeds": list(seeds), "rows": rows,
               "stage_seconds": times, "gates": checks}
    reporting.write_json(workdir / JSON, summary)
    print()
    print("\n".join(render_rows(rows, seeds)))
    print()
    print("\n".join(render_times(times, seeds)))
    print()
    print("gates (PASS / FAIL per seed, on the numbers as measured):")
    for g in checks:
        print(f"  {g['gate']}")
        for s in seeds:
            print(f"    seed {s}: {g['seeds'][s]['status']:4}  {g['seeds'][s]['detail']}")
    print(f"\n{workdir / MARKDOWN}, {workdir / JSON}")
    return summary


def add_seed_arguments(parser: argparse.ArgumentParser, *, config_help: str,
                       aggregate_help: str) -> None:
    """The options every benchmark over the demo's seeds takes: --config, --seeds,
    --aggregate_only and --compilation_cache (this script, label_efficiency,
    pretext_comparison)."""
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=config_help)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated config.seed values")
    parser.add_argument("--aggregate_only", action="store_true", help=aggregate_help)
    parser.add_argument("--compilation_cache", default=DEFAULT_CACHE,
                        help="JAX's persistent compilation cache, as main.py's (empty: off)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--workdir", required=True,
                        help="the seeds' demos go to <workdir>/seed_<s>; seeds.md, seeds.json")
    add_seed_arguments(
        parser,
        config_help="the demo config, PATH[:ARGS] as main.py takes it "
                    "(configs/demo.py:size=tiny for the tiny size)",
        aggregate_help="run nothing: read <workdir>/seed_<s>/metrics.json of each seed")
    args = parser.parse_args(argv)
    from vcp_jax import config_utils  # noqa: PLC0415

    workdir = Path(args.workdir).expanduser()
    try:
        seeds = parse_ints(args.seeds, "--seeds")
        if not args.aggregate_only:
            config = load_config(args.config)
            # Other jobs on the machine change the stage times: say what it was.
            _common.print_header("the demo over seeds")
            setup(args.compilation_cache)
            for i, seed in enumerate(seeds, 1):
                print(f"\n=== seed {seed} ({i}/{len(seeds)}): {seed_dir(workdir, seed)} ===",
                      flush=True)
                run_seed(config, seed, workdir)
        summarise(workdir, args.config, seeds)
    except (BenchmarkError, config_utils.UserError) as e:
        return report_error(e)
    return 0


def report_error(error: Exception) -> int:
    """One line on stderr for a user's error or a stop; the exit status to return."""
    # A run stopped by a signal did what it was asked: no "error:" for it.
    from vcp_jax import signals  # noqa: PLC0415

    prefix = "" if isinstance(error, signals.Stopped) else "error: "
    print(f"{prefix}{error}", file=sys.stderr, flush=True)
    return getattr(error, "exit_code", 2)


if __name__ == "__main__":
    sys.exit(main())
