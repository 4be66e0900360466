"""The real training loop end to end: input pipeline + host-to-device + step + logging + saving.

Runs `pretrain.run` / `finetune.run` exactly as `main.py` does (the built-in synthetic datasets,
generated and built by the real builders on first use, in `--cache`), at a chosen size, for each
combination of input threads and device prefetch, and then the same loop on *fake data* (the first
real batch repeated, as flax's `fake_data_benchmark`: no decoding) and the step alone (the compiled
step on one resident batch). Per run it prints:

- steps/s and tuples/s of the loop after its first step (the first step is the compile),
- the fraction of that wall time the loop waited for its next batch (`input wait`),
- step ms alone and the loop's overhead over it (`loop / step`: 1.00 means input fully hidden),
- compile seconds (the first step), XLA's FLOPs of the step, achieved GFLOP/s and the MFU where the
  device's peak is known (GPU/TPU; n/a on CPU),
- this process's CPU seconds per wall second during training (`cpu/wall`: cores busy).

    PYTHONPATH=. python -m benchmarks.loop                       # demo size, both tasks
    PYTHONPATH=. python -m benchmarks.loop --task pretrain --threads 1,2,4 --prefetch 1,2
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import _common, train_step

TASKS = ("pretrain", "finetune")


def make_config(task: str, args: argparse.Namespace, threads: int, prefetch: int) -> Any:
    """The demo's stage config (configs/demo.py) with the benchmark's sizes."""
    from configs import demo  # noqa: PLC0415

    stages = demo.get_config(f"size={args.size}")
    config = stages.pretrain if task == "pretrain" else stages.finetune
    cache = str(Path(args.cache).expanduser())
    config.data.data_dir = config.data.data_dir.replace("{cache}", cache)
    config.data.synthetic.manual_dir = config.data.synthetic.manual_dir.replace("{cache}", cache)
    config.model.arch = args.arch
    config.model.width = args.width
    config.model.dtype = args.dtype
    if args.data_config:
        config.data.builder_config = args.data_config
    config.data.crop_size = args.crop
    config.data.num_threads = threads
    config.data.num_workers = args.workers
    config.batch_size = args.batch_size
    config.prefetch_to_device = prefetch
    config.num_train_steps = args.steps
    config.log_every_steps = max(1, args.steps // 4)
    # One evaluation and one save, at the end: the loop's timing keeps them apart from training.
    config.eval_every_steps = args.steps
    config.checkpoint_every_steps = args.steps
    if task == "pretrain":
        config.cloze.clip_len = args.clip_len
        config.cloze.interval = args.clip_len // 2
        config.cloze.remote_gap = args.clip_len
    else:
        config.finetune.clip_len = args.clip_len
        config.finetune.num_test_clips = 2
    return config


class BatchRecorder:
    """Wraps `input_pipeline.make_iterator` for the training stream (the call with `start`, the
    resume step; evaluation streams pass through): keeps its first batch, in fake mode repeats it.
    """

    def __init__(self, fake: bool):
        self.fake = fake
        self.first: dict[str, np.ndarray] | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        from vcp_jax import input_pipeline  # noqa: PLC0415

        original = input_pipeline.make_iterator

        def make_iterator(*a: Any, **kw: Any) -> Iterator[dict[str, np.ndarray]]:
            real = original(*a, **kw)
            if "start" not in kw:  # an evaluation stream
                return real
            self.first = next(real)
            if self.fake:  # the decoded batch again and again: no input work at all
                return itertools.repeat(self.first)
            return itertools.chain([self.first], real)

        input_pipeline.make_iterator = make_iterator
        try:
            yield
        finally:
            input_pipeline.make_iterator = original


def run_loop(task: str, config: Any, fake: bool) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    from vcp_jax import finetune, pretrain  # noqa: PLC0415

    recorder = BatchRecorder(fake)
    with tempfile.TemporaryDirectory(prefix="vcp_loop_bench_") as workdir, recorder.installed():
        if task == "pretrain":
            metrics = pretrain.run(config, workdir)
        else:
            metrics = finetune.run(config, workdir)
    assert recorder.first is not None
    return metrics["loop_timing"], recorder.first


def step_alone(task: str, config: Any, batch: dict[str, np.ndarray],
               steps: int) -> dict[str, float]:
    """The compiled train step on one resident batch: median ms and XLA's FLOPs per step."""
    import jax  # noqa: PLC0415

    from vcp_jax import finetune, parallel, pretrain  # noqa: PLC0415

    module = pretrain if task == "pretrain" else finetune
    module.validate_config(config)
    if task == "pretrain":
        state, ctx = pretrain.create_train_state(config)
    else:
        state, ctx = finetune.create_train_state(config, int(config.data.synthetic.num_classes))
    strategy = parallel.JitStrategy()
    jitted = strategy.compile(functools.partial(module.train_step, ctx=ctx), donate_state=True)
    state, device_batch = strategy.put_state(state), strategy.put_batch(batch)
    compiled = jitted.lower(state, device_batch).compile()
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        state, metrics = compiled(state, device_batch)
        jax.block_until_ready((state, metrics))
        if i >= 2:
            times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times), "flops": train_step.xla_flops(compiled)}


def row(task: str, mode: str, config: Any, timing: dict[str, float],
        alone: dict[str, float]) -> dict[str, Any]:
    import jax  # noqa: PLC0415

    steps, wall = timing["train_steps"], timing["train_seconds"]
    step_s = wall / steps
    device_kind = jax.devices()[0].device_kind
    peak = train_step.peak_flops(device_kind, config.model.dtype)
    flops_s = alone["flops"] * jax.device_count() / step_s
    return {
        "task": task,
        "input": mode,
        "threads": config.data.num_threads if mode == "real" else "-",
        "prefetch": config.prefetch_to_device,
        "steps/s": 1 / step_s,
        "tuples/s" if task == "pretrain" else "clips/s": config.batch_size / step_s,
        "input wait": timing["input_wait_seconds"] / wall,
        "step ms (loop)": 1000 * step_s,
        "step ms (alone)": 1000 * alone["step_s"],
        "loop / step": step_s / alone["step_s"],
        "compile s": timing["first_step_seconds"],
        "GFLOP/step": alone["flops"] / 1e9,
        "GFLOP/s": flops_s / 1e9,
        "MFU %": 100 * flops_s / (peak[0] * jax.device_count()) if peak else "n/a",
        "cpu/wall": timing["train_cpu_seconds"] / wall,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="all", help=f"{', '.join(TASKS)} or all")
    parser.add_argument("--size", default="full", choices=("full", "tiny"),
                        help="the demo's datasets: full, or tiny (fewer, shorter videos)")
    parser.add_argument("--arch", default="r3d")
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--dtype", default="float32", help="model.dtype: float32 or bfloat16")
    parser.add_argument("--data_config", default="",
                        help="frame size of the built dataset (default: the demo's split1_48x64; "
                             "split1 is the paper's 128x171)")
    parser.add_argument("--crop", type=int, default=32)
    parser.add_argument("--clip_len", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40, help="loop steps per run")
    parser.add_argument("--threads", default="1,2", help="input threads (data.num_threads) to try")
    parser.add_argument("--prefetch", default="1,2",
                        help="batches placed on the devices ahead (1: none ahead of the step)")
    parser.add_argument("--workers", type=int, default=0, help="grain worker processes")
    parser.add_argument("--cache", default="",
                        help="where the synthetic datasets are generated and built (default: the "
                             "demo's, ~/.cache/vcp_jax/demo[_tiny])")
    parser.add_argument("--rows", default="",
                        help="also append each row as JSON to this file (benchmarks/gpu_check.sh)")
    args = parser.parse_args(argv)
    args.cache = args.cache or "~/.cache/vcp_jax/demo" + ("_tiny" if args.size == "tiny" else "")
    tasks = list(TASKS) if args.task == "all" else [args.task]
    threads = [int(t) for t in args.threads.split(",")]
    prefetches = [int(p) for p in args.prefetch.split(",")]
    logging.getLogger("absl").setLevel(logging.WARNING)

    _common.print_header("training loop, end to end")
    print(f"  {args.arch} width {args.width}, crop {args.crop}, clip {args.clip_len}, "
          f"batch {args.batch_size}, {args.steps} steps per run (the first one is the compile)\n")
    rows = []
    for task in tasks:
        alone = None
        for n_threads, prefetch in itertools.product(threads, prefetches):
            config = make_config(task, args, n_threads, prefetch)
            timing, batch = run_loop(task, config, fake=False)
            if alone is None:
                alone = step_alone(task, config, batch, steps=max(5, args.steps // 4))
            rows.append(row(task, "real", config, timing, alone))
        config = make_config(task, args, threads[-1], prefetches[-1])
        timing, _ = run_loop(task, config, fake=True)
        rows.append(row(task, "fake", config, timing, alone))
    print()
    print(f"load average at the end: {_common.load_average()}")
    for task in tasks:
        task_rows = [r for r in rows if r["task"] == task]
        print()
        print(_common.table(list(task_rows[0]), [list(r.values()) for r in task_rows]))
    if args.rows:
        with open(args.rows, "a") as f:
            for r in rows:
                f.write(json.dumps({"kind": "e2e", "arch": args.arch, "dtype": args.dtype,
                                    "batch": args.batch_size, **r,
                                    "tuples_s": r.get("tuples/s", r.get("clips/s")),
                                    "input_wait": r["input wait"]}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
