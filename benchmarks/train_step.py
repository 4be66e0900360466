"""VCP train-step throughput per backbone and dtype: compile time, step time, tuples/s, FLOPs, MFU.

Runs the real `vcp_jax.pretrain.train_step` (cloze on the device, forward + backward of the 3 clips,
SGD update) compiled through `parallel.JitStrategy()` on random uint8 batches: clips
(B, 3, T, S, S, 3), remote (B, T, S, S, 3), has_remote (B,). The config starts from
`configs.default.get_config(arch)`. Reports the compile time, the median step time after warm-up
(`block_until_ready`), tuples/s, the model FLOPs of one step as XLA counts them
(`cost_analysis()['flops']` of the compiled step: per device) and the MFU where the device's peak
is known (GPU/TPU; on CPU it is n/a).

Paper sizes (the GPU command; minutes per step on a 2-core CPU):

    PYTHONPATH=. python -m benchmarks.train_step --paper --arch all --dtype float32,bfloat16

XLA's FLOP count at the paper sizes without running a step (what a CPU can do):

    PYTHONPATH=. python -m benchmarks.train_step --paper --arch all --compile_only

Small sizes for a CPU, with both 3D-conv implementations:

    PYTHONPATH=. python -m benchmarks.train_step --arch all --width 8 --crop 32 \\
        --conv_impl native,conv2d --steps 5
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks import _common

# Peak dense FLOP/s per device: (substring of jax's device_kind, {dtype: (peak, what it is)}).
# float32 matmuls/convs run as TF32 on A100/H100/H200 under JAX's default precision, and as bf16
# passes on TPU, so those are the float32 ceilings. First match wins (H100 PCIe before H100).
PEAKS: list[tuple[str, dict[str, tuple[float, str]]]] = [
    ("h100 pcie", {"bfloat16": (756.0e12, "H100 PCIe bf16 dense"),
                   "float32": (378.0e12, "H100 PCIe tf32 dense")}),
    ("h100", {"bfloat16": (989.4e12, "H100 SXM bf16 dense"),
              "float32": (494.7e12, "H100 SXM tf32 dense")}),
    ("h200", {"bfloat16": (989.4e12, "H200 bf16 dense"),
              "float32": (494.7e12, "H200 tf32 dense")}),
    ("a100", {"bfloat16": (312.0e12, "A100 bf16 dense"),
              "float32": (156.0e12, "A100 tf32 dense")}),
    ("tpu v4", {"bfloat16": (275.0e12, "TPU v4 bf16"),
                "float32": (275.0e12, "TPU v4 bf16 (f32 runs as bf16 passes)")}),
    ("tpu v5 lite", {"bfloat16": (197.0e12, "TPU v5e bf16"),
                     "float32": (197.0e12, "TPU v5e bf16 (f32 runs as bf16 passes)")}),
    ("tpu v5e", {"bfloat16": (197.0e12, "TPU v5e bf16"),
                 "float32": (197.0e12, "TPU v5e bf16 (f32 runs as bf16 passes)")}),
]

# docs/method.md §7: model GFLOP of one pretraining tuple (3 clips 16x112x112, forward + backward)
# at width 64.
SPEC_GFLOP_PER_TUPLE = {"c3d": 693.0, "r3d": 358.0, "r21d": 385.0}
SPEC_GFLOP_FORWARD = {"c3d": 77.0, "r3d": 39.8, "r21d": 42.7}  # one 16x112x112 clip
# The paper's sizes; its batch (8 tuples) is `--batch_size`'s default, so `--paper --batch_size 64`
# measures batch 64.
PAPER = {"crop": 112, "clip_len": 16, "width": 64}


def peak_flops(device_kind: str, dtype: str) -> tuple[float, str] | None:
    kind = device_kind.lower()
    for key, by_dtype in PEAKS:
        if key in kind:
            return by_dtype.get(dtype)
    return None


def xla_flops(compiled: Any) -> float:
    """'flops' of a compiled executable's cost analysis (a dict, or a list of dicts in old jax)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return float("nan")
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    if not cost:
        return float("nan")
    return float(cost.get("flops", float("nan")))


def forward_flops(args: argparse.Namespace, arch: str, dtype: str, conv_impl: str) -> float:
    """XLA's FLOPs of the backbone's forward pass on one clip (eval mode), to check method §7."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from vcp_jax import models  # noqa: PLC0415

    backbone = models.create_backbone(arch, rngs=nnx.Rngs(0), width=args.width,
                                      dtype=models.DTYPES[dtype], conv_impl=conv_impl)
    backbone.eval()
    graphdef, state = nnx.split(backbone)
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    clip = jnp.zeros((1, args.clip_len, args.crop, args.crop, 3), jnp.float32)
    return xla_flops(forward.lower(state, clip).compile())


def make_config(args: argparse.Namespace, arch: str, dtype: str, conv_impl: str) -> Any:
    from configs import default  # noqa: PLC0415

    config = default.get_config(arch)
    config.model.width = args.width
    config.model.dtype = dtype
    config.model.conv_impl = conv_impl
    config.cloze.clip_len = args.clip_len
    config.cloze.interval = args.clip_len // 2
    config.cloze.remote_gap = args.clip_len
    config.data.crop_size = args.crop
    config.batch_size = args.batch_size
    return config


def random_batch(args: argparse.Namespace, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    b, t, s = args.batch_size, args.clip_len, args.crop
    return {
        "clips": rng.integers(0, 256, (b, 3, t, s, s, 3), dtype=np.uint8),
        "remote": rng.integers(0, 256, (b, t, s, s, 3), dtype=np.uint8),
        "has_remote": rng.random(b) < 0.9,
    }


def bench_one(args: argparse.Namespace, arch: str, dtype: str, conv_impl: str) -> dict[str, Any]:
    import jax  # noqa: PLC0415

    from vcp_jax import parallel, pretrain  # noqa: PLC0415

    config = make_config(args, arch, dtype, conv_impl)
    pretrain.validate_config(config)
    load_before = _common.load_average()
    state, ctx = pretrain.create_train_state(config)
    num_params = sum(int(np.size(x)) for x in jax.tree.leaves(state.params))
    strategy = parallel.JitStrategy()
    jitted = strategy.compile(functools.partial(pretrain.train_step, ctx=ctx), donate_state=True)
    state = strategy.put_state(state)
    batch = strategy.put_batch(random_batch(args))

    start = time.perf_counter()
    compiled = jitted.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    flops = xla_flops(compiled)

    times = [float("nan")]
    metrics = {"loss": np.nan}
    if args.compile_only:
        steps = 0
    else:
        times, steps = [], args.warmup + args.steps
    for i in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times) if times else float("nan")
    device_kind = jax.devices()[0].device_kind
    peak = peak_flops(device_kind, dtype)
    per_device = flops / step_s if flops == flops else float("nan")
    return {
        "arch": arch,
        "dtype": dtype,
        "conv": conv_impl if conv_impl != "auto" else f"auto->{_resolved()}",
        "params_m": num_params / 1e6,
        "compile_s": compile_s,
        "step_s": step_s,
        "min_step_s": min(times),
        "tuples_s": args.batch_size / step_s,
        "gflop_step": flops / 1e9,
        "gflop_tuple": flops * strategy.num_devices / args.batch_size / 1e9,
        "tflops": per_device / 1e12,
        "mfu": per_device / peak[0] if peak else float("nan"),
        "peak": peak[1] if peak else "n/a",
        "loss": float(np.asarray(metrics["loss"])),
        "load": f"{load_before} -> {_common.load_average()}",
    }


def _resolved() -> str:
    from vcp_jax import conv  # noqa: PLC0415

    return conv.auto_impl()


def _split(value: str, allowed: Sequence[str]) -> list[str]:
    items = list(allowed) if value == "all" else [v.strip() for v in value.split(",") if v.strip()]
    for item in items:
        if item not in allowed:
            raise SystemExit(f"error: {item!r} is not one of {list(allowed)}")
    return items


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="r3d", help="c3d, r3d, r21d, comma list, or all")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16, comma list, all")
    parser.add_argument("--conv_impl", default="auto",
                        help="native, conv2d, conv2d_mm, auto (conv2d_mm on CPU, native "
                             "elsewhere), comma list")
    parser.add_argument("--batch_size", type=int, default=8,
                        help="global batch (tuples); 8 as in the paper, also with --paper")
    parser.add_argument("--crop", type=int, default=56)
    parser.add_argument("--clip_len", type=int, default=16)
    parser.add_argument("--width", type=int, default=16, help="64 in the paper")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--compile_only", action="store_true",
                        help="compile and report XLA's FLOPs without running steps (e.g. the "
                             "paper sizes on a CPU)")
    parser.add_argument("--paper", action="store_true",
                        help="the paper's sizes: crop 112, clip_len 16, width 64 (the batch "
                             "is --batch_size)")
    args = parser.parse_args(argv)
    if args.paper:
        for key, value in PAPER.items():
            setattr(args, key, value)

    from vcp_jax import conv, models  # noqa: PLC0415

    archs = _split(args.arch, models.ARCHS)
    dtypes = _split(args.dtype, tuple(models.DTYPES))
    impls = _split(args.conv_impl, conv.CONV_IMPLS)
    _common.print_header("VCP train step (jit, random uint8 batches)")
    print(f"batch {args.batch_size} tuples, 3 clips x {args.clip_len} frames x {args.crop}^2 "
          f"(+ remote clip), width {args.width}; {args.warmup} warm-up + {args.steps} timed "
          "steps, median\n")

    results = []
    for arch in archs:
        for dtype in dtypes:
            for impl in impls:
                r = bench_one(args, arch, dtype, impl)
                results.append(r)
                print(f"  {arch} {dtype} {r['conv']}: compile {r['compile_s']:.1f} s, "
                      f"{r['gflop_tuple']:.2f} GFLOP/tuple, step "
                      f"{r['step_s'] * 1e3:.1f} ms, {r['tuples_s']:.2f} tuples/s "
                      f"(load {r['load']})", flush=True)
    print()
    rows = [[r["arch"], r["dtype"], r["conv"], r["params_m"], r["compile_s"], r["step_s"] * 1e3,
             r["min_step_s"] * 1e3, r["tuples_s"], r["gflop_step"], r["gflop_tuple"],
             r["tflops"] * 1e3, r["mfu"] * 100, r["peak"]] for r in results]
    print(_common.table(["arch", "dtype", "conv", "params M", "compile s", "step ms (med)",
                         "step ms (min)", "tuples/s", "GFLOP/step", "GFLOP/tuple", "GFLOP/s",
                         "MFU %", "peak"], rows))
    paper = (args.width, args.crop, args.clip_len) == (64, 112, 16)
    if paper:
        print("\ndocs/method.md §7 model cost per tuple at these sizes (GFLOP): "
              + ", ".join(f"{a} {SPEC_GFLOP_PER_TUPLE[a]:.0f}" for a in archs))
    if args.compile_only:
        rows = []
        for r in results:
            fwd = forward_flops(args, r["arch"], r["dtype"], r["conv"].split("->")[-1]) / 1e9
            rows.append([r["arch"], r["dtype"], r["conv"], fwd, r["gflop_tuple"],
                         r["gflop_tuple"] / (3 * fwd),
                         SPEC_GFLOP_FORWARD[r["arch"]] if paper else float("nan")])
        print("\nXLA's forward FLOPs of one clip (backbone only) and the train step's multiple of "
              "3 clips' forward:")
        print(_common.table(["arch", "dtype", "conv", "fwd GFLOP/clip", "step GFLOP/tuple",
                             "step / (3 x fwd)", "docs/method.md §7 fwd GFLOP/clip"], rows))
    impls_seen = {r["conv"] for r in results}
    if len(impls_seen) > 1:
        print("\nspeed-up over native (native step time / this one's):")
        for arch in archs:
            for dtype in dtypes:
                by = {r["conv"].split("->")[-1]: r["step_s"] for r in results
                      if r["arch"] == arch and r["dtype"] == dtype}
                for impl, step_s in by.items():
                    if "native" in by and impl != "native":
                        print(f"  {arch} {dtype} {impl}: {by['native'] / step_s:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
