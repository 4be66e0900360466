"""One-shot accelerator check of the VCP train step: the phases that `gpu_check.sh` runs.

Each phase appends JSON rows to a file (one line per measurement, written as soon as it is
taken), so a phase that is killed or crashes leaves what it measured; `report` prints the table.
Every measurement is guarded: an error (out of memory, an unsupported op) becomes a row with
that status and the phase goes on. A phase stops starting new work past `--deadline` (Unix
time), and its rows say 'skipped (time budget)'.

Phases:

- `env`: the device, JAX and library versions, CUDA and cuDNN as jaxlib reports them (and the
  nvidia-* wheels), `jax.print_environment_info()`, and a warning for a cuDNN with a known
  problem here: 9.10.2 to 9.15 (a 3D-convolution TF32 kernel that computes wrong results;
  pytorch/pytorch#167024) and 9.11 or newer on a pre-Ampere GPU (JAX's convolutions fail;
  jax-ml/jax#30663).
- `precision`: TF32 effects. R3D's features on the device at JAX's default precision (TF32 for
  float32 convolutions on Ampere and newer) and under `jax.default_matmul_precision('highest')`,
  each against the CPU's float32 output (max and relative difference); then the train step's
  time at float32 default, float32 highest and bfloat16. On a machine without an accelerator it
  compares CPU default with CPU highest and says so.
- `roofline`: the projection of `benchmarks/roofline.py` (per arch and dtype, H100 and H200)
  at the phase's sizes and first batch size; `report` prints it beside the measured steps.
- `convs`: R3D's convolutions at the paper's batch (8 tuples = 24 clips of 16x112x112): forward,
  input gradient and weight gradient, per `conv_impl`, and PyTorch/cuDNN's for the same shapes
  where torch sees a GPU. JAX issue #31662 reports the gradients of strided 3D convolutions far
  slower than PyTorch's on CUDA; this says whether R3D's stride-2 convs are hit.
- `steps`: the real `pretrain.train_step` (cloze on the device, forward + backward, SGD) per
  arch x dtype x batch x conv_impl; the compiles of a phase run concurrently on the host's
  cores, the timed steps one after another. Without the data packages (tensorflow-datasets,
  grain, ...) `vcp_jax.pretrain` does not import; the phase then times the model step (the same
  network, loss and SGD on the same inputs, without the cloze) and says so in every row.
- `torch`: the PyTorch reference R3D step (`benchmarks/torch_reference.py`) on the same GPU,
  float32 (TF32 allowed, as JAX's default precision) and bfloat16 autocast.
- `report`: one table of all step rows (tuples/s, step ms, MFU, the roofline bound and the
  measured / bound ratio, input-wait fraction), the precision checks, the bfloat16 / float32
  step-time ratios, then the conv and PyTorch rows, which conv_impl was fastest per arch and
  dtype, and the training loop (`benchmarks/loop.py`, run by gpu_check.sh at the default
  `data.num_threads`).

MFU uses the model FLOPs that XLA counts for the native step at the paper sizes (per tuple:
C3D 590.1, R3D 313.8, R(2+1)D 365.9 GFLOP; benchmarks/RESULTS.md) for every conv_impl, so the
implementations are compared on the same work, over the peak of `train_step.PEAKS` (H100/H200:
989.4 TFLOP/s bf16, 494.7 TF32 for float32).

`--smoke` shrinks everything (width 4, 16x16 crops, 8-frame clips, batches 2 and 4) so the whole
check runs on a CPU in about a minute; `tests/test_gpu_check.py` runs it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import os
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import _common

PAPER = {"width": 64, "crop": 112, "clip_len": 16}
SMOKE = {"width": 4, "crop": 16, "clip_len": 8}
# XLA's FLOPs of the native train step per tuple at the paper sizes (RESULTS.md, section 3).
MODEL_GFLOP_PER_TUPLE = {"c3d": 590.1, "r3d": 313.8, "r21d": 365.9}
ARCHS = ("c3d", "r3d", "r21d")
DTYPES = ("float32", "bfloat16")
IMPLS = ("native", "conv2d", "conv2d_mm")

# R3D's convolutions (name, cin, cout, kernel, stride, padding, input T x H x W) at width 64.
R3D_CONVS = [
    ("conv2 3x3x3", 64, 64, (3, 3, 3), (1, 1, 1), (1, 1, 1), (16, 56, 56)),
    ("conv3 3x3x3 s2", 64, 128, (3, 3, 3), (2, 2, 2), (1, 1, 1), (16, 56, 56)),
    ("conv3 1x1x1 s2", 64, 128, (1, 1, 1), (2, 2, 2), (0, 0, 0), (16, 56, 56)),
    ("conv4 3x3x3 s2", 128, 256, (3, 3, 3), (2, 2, 2), (1, 1, 1), (8, 28, 28)),
    ("conv5 3x3x3 s2", 256, 512, (3, 3, 3), (2, 2, 2), (1, 1, 1), (4, 14, 14)),
]


# ----------------------------------------------------------------------------- rows

# The rows a phase still owes, by key: written with a 'killed' status if the phase is stopped
# (SIGTERM from gpu_check.sh's time limit) before it measures them.
PENDING: dict[Any, dict[str, Any]] = {}


class Killed(Exception):
    """Raised in the main thread by SIGTERM."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Killed()


def write_row(path: Path, row: dict[str, Any], key: Any = None) -> None:
    """Appends one JSON row and flushes it to disk (a killed phase keeps its rows)."""
    PENDING.pop(key, None)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
    brief = {k: v for k, v in row.items() if k not in ("kind", "traceback")}
    print("  " + json.dumps(brief), flush=True)


def read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill
                pass
    return rows


def _error(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return "error: " + (text[:200] + "..." if len(text) > 200 else text)


class Clock:
    """The phase's deadline: `left()` seconds remain; `expired(margin)`."""

    def __init__(self, deadline: float | None):
        self.deadline = deadline

    def left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.time()

    def expired(self, margin: float = 0.0) -> bool:
        return self.left() < margin


def _timed_loop(step: Callable[[], Any], min_seconds: float, max_steps: int) -> tuple[float, int]:
    """Median seconds per call over repeats of about `min_seconds` (after 2 warm-up calls)."""
    import jax  # noqa: PLC0415

    for _ in range(2):
        jax.block_until_ready(step())
    start = time.perf_counter()
    jax.block_until_ready(step())
    one = max(time.perf_counter() - start, 1e-6)
    n = int(min(max_steps, max(3, min_seconds / one)))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        out = None
        for _ in range(max(1, n // 3)):
            out = step()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / max(1, n // 3))
    return statistics.median(times), n


# ----------------------------------------------------------------------------- env


# cuDNN versions with a known problem for this model: (first, last, applies(compute capability),
# what, where it is documented).
CUDNN_KNOWN_ISSUES = [
    ((9, 10, 2), (9, 15, 99), lambda cc: cc is None or cc >= (8, 0),
     "a 3D-convolution TF32 kernel in cuDNN 9.10.2 to 9.15 computes wrong results (NVIDIA's "
     "report quoted in github.com/pytorch/pytorch/pull/167024; a bfloat16 conv3d report in the "
     "same range: pytorch/pytorch#163539); check the precision rows, use a cuDNN outside the "
     "range, or precision 'highest' for float32",
     "pytorch/pytorch#167024"),
    ((9, 11, 0), (99, 0, 0), lambda cc: cc is not None and cc < (8, 0),
     "cuDNN 9.11 and newer break JAX's convolutions on pre-Ampere GPUs (e.g. Colab's T4): "
     "github.com/jax-ml/jax/issues/30663; install a JAX whose CUDA wheels bring cuDNN <= 9.10",
     "jax-ml/jax#30663"),
]


def parse_cudnn_version(value: Any) -> tuple[int, int, int] | None:
    """(major, minor, patch) from cuDNN's integer version (9.10.2 is 91002; 8.9.7 is 8907) or a
    '9.10.2.21' string; None when unknown."""
    if value is None:
        return None
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        v = int(value)
        if v >= 90000:
            return v // 10000, (v % 10000) // 100, v % 100
        return v // 1000, (v % 1000) // 100, v % 100
    parts = [int(p) for p in str(value).split(".")[:3] if p.isdigit()]
    if len(parts) < 2:
        return None
    return (parts + [0])[0], parts[1], (parts + [0, 0])[2]


def cudnn_warnings(cudnn: tuple[int, int, int] | None,
                   compute_capability: tuple[int, int] | None) -> list[str]:
    """The known problems that apply to this cuDNN on a GPU of this compute capability."""
    if cudnn is None:
        return []
    return [f"cuDNN {'.'.join(map(str, cudnn))}: {what}"
            for first, last, applies, what, _ in CUDNN_KNOWN_ISSUES
            if first <= cudnn <= last and applies(compute_capability)]


def accelerator_versions() -> dict[str, Any]:
    """CUDA and cuDNN versions as jaxlib reports them, and the nvidia-* wheels installed."""
    import importlib.metadata  # noqa: PLC0415

    out: dict[str, Any] = {}
    try:
        from jax._src.lib import cuda_versions  # noqa: PLC0415 - jaxlib's CUDA plugin, if any
    except Exception:  # noqa: BLE001 - absent on CPU-only jaxlib
        cuda_versions = None
    if cuda_versions is not None:
        for key, fn in (("cuda_runtime", "cuda_runtime_get_version"),
                        ("cudnn", "cudnn_get_version"), ("cublas", "cublas_get_version")):
            try:
                out[key] = getattr(cuda_versions, fn)()
            except Exception as e:  # noqa: BLE001 - reported, not raised
                out[key] = f"n/a ({type(e).__name__})"
    wheels = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith(("nvidia-cudnn", "nvidia-cuda-runtime", "nvidia-cublas",
                            "jax-cuda", "jax_cuda")):
            wheels[name] = dist.version
    out["wheels"] = wheels
    if "cudnn" not in out:  # from the wheel when jaxlib cannot say
        out["cudnn"] = next((v for k, v in wheels.items() if k.startswith("nvidia-cudnn")), None)
    return out


def _compute_capability(device: Any) -> tuple[int, int] | None:
    cc = getattr(device, "compute_capability", None)
    try:
        major, minor = str(cc).split(".")[:2]
        return int(major), int(minor)
    except (ValueError, TypeError):
        return None


def phase_env(args: argparse.Namespace) -> None:
    import jax  # noqa: PLC0415

    versions = {}
    for name in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "grain",
                 "tensorflow_datasets", "ml_collections"):
        try:
            versions[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001 - any import failure is reported, not raised
            versions[name] = f"missing ({type(e).__name__})"
    devices = jax.devices()
    accel = accelerator_versions()
    cc = _compute_capability(devices[0])
    warnings = cudnn_warnings(parse_cudnn_version(accel.get("cudnn")), cc)
    try:
        info = jax.print_environment_info(return_string=True)
    except Exception as e:  # noqa: BLE001 - reported, not raised
        info = f"jax.print_environment_info failed: {_error(e)}"
    print(info, flush=True)
    for w in warnings:
        print(f"  WARNING: {w}", flush=True)
    write_row(args.rows, {
        "kind": "env", "backend": jax.default_backend(), "device": devices[0].device_kind,
        "num_devices": len(devices), "host": _common.cpu_model(), "cores": os.cpu_count(),
        "versions": versions, "load": _common.load_average(),
        "compute_capability": None if cc is None else f"{cc[0]}.{cc[1]}",
        "cuda": accel, "warnings": warnings,
    })


# ----------------------------------------------------------------------------- convs


def _conv_shapes(args: argparse.Namespace) -> list[tuple[Any, ...]]:
    if not args.smoke:
        return R3D_CONVS
    return [("smoke 3x3x3 s2", 4, 8, (3, 3, 3), (2, 2, 2), (1, 1, 1), (8, 16, 16))]


def phase_convs(args: argparse.Namespace) -> None:
    """fwd / dgrad / wgrad of R3D's convs per conv_impl and dtype, and torch's where it runs."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from vcp_jax import conv  # noqa: PLC0415

    clock = Clock(args.deadline)
    clips = 3 * (2 if args.smoke else args.batch_sizes[0])
    impls = [i for i in args.impls if i in conv.CONV_IMPLS]
    jobs = []
    for name, cin, cout, kernel, stride, pad, thw in _conv_shapes(args):
        for dtype in args.dtypes:
            for impl in impls:
                jobs.append((name, cin, cout, kernel, stride, pad, thw, dtype, impl))

    def build(job: tuple[Any, ...]) -> dict[str, Any]:
        name, cin, cout, kernel, stride, pad, thw, dtype, impl = job
        dt = jnp.dtype(dtype)
        x = jnp.ones((clips, *thw, cin), dt)
        k = jnp.ones((*kernel, cin, cout), dt) * 0.01
        fn = conv.resolve(impl)
        pads = [(p, p) for p in pad]

        def f(x: jax.Array, k: jax.Array) -> jax.Array:
            return fn(x, k, stride, pads, dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))

        g = jnp.ones(jax.eval_shape(f, x, k).shape, dt)
        fns = {
            "fwd": (jax.jit(f), (x, k)),
            "dgrad": (jax.jit(lambda x, k, g: jax.vjp(lambda x: f(x, k), x)[1](g)[0]), (x, k, g)),
            "wgrad": (jax.jit(lambda x, k, g: jax.vjp(lambda k: f(x, k), k)[1](g)[0]), (x, k, g)),
        }
        compiled = {kind: (fn_.lower(*a).compile(), a) for kind, (fn_, a) in fns.items()}
        gflop = 2 * np.prod(g.shape) * cin * np.prod(kernel) / 1e9
        return {"compiled": compiled, "gflop": gflop}

    def base(job: tuple[Any, ...]) -> dict[str, Any]:
        name, *_, dtype, impl = job
        return {"kind": "conv", "conv": name, "dtype": dtype, "impl": impl, "clips": clips,
                "status": "ok"}

    PENDING.update({job: base(job) for job in jobs})
    built = _compile_concurrently(jobs, build, clock, args.workers)
    for job in jobs:
        row = base(job)
        result = built.get(job)
        if isinstance(result, str):
            write_row(args.rows, {**row, "status": result}, job)
            continue
        for kind, (compiled, a) in result["compiled"].items():
            if clock.expired(5):
                row[kind + "_ms"] = None
                row["status"] = "skipped (time budget)"
                continue
            try:
                sec, _ = _timed_loop(lambda c=compiled, a=a: c(*a), args.conv_seconds, 50)
                row[kind + "_ms"] = sec * 1e3
                row[kind + "_tflops"] = result["gflop"] / sec / 1e3
            except Exception as e:  # noqa: BLE001 - reported in the row
                row[kind + "_ms"] = None
                row["status"] = _error(e)
        write_row(args.rows, row, job)
    _torch_convs(args, clips, clock)


def _torch_convs(args: argparse.Namespace, clips: int, clock: Clock) -> None:
    """The same convs in PyTorch (cuDNN, channels-last 3D), when torch sees a GPU (or smoke)."""
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        return
    device = "cuda" if torch.cuda.is_available() else ("cpu" if args.smoke else None)
    if device is None:
        return
    torch.backends.cudnn.benchmark = True
    for name, cin, cout, kernel, stride, pad, thw in _conv_shapes(args):
        for dtype in args.dtypes:
            row = {"kind": "conv", "conv": name, "dtype": dtype, "impl": f"torch ({device})",
                   "clips": clips, "status": "ok"}
            if clock.expired(10):
                write_row(args.rows, {**row, "status": "skipped (time budget)"})
                continue
            try:
                dt = getattr(torch, dtype)
                fmt = torch.channels_last_3d
                x = torch.randn(clips, cin, *thw, device=device, dtype=dt).to(memory_format=fmt)
                w = (torch.randn(cout, cin, *kernel, device=device, dtype=dt) * 0.01).to(
                    memory_format=fmt)
                y = torch.nn.functional.conv3d(x, w, None, stride, pad)
                g = torch.randn_like(y)
                gflop = 2 * g.numel() * cin * float(np.prod(kernel)) / 1e9

                def run(mask: list[bool] | None, x=x, w=w, g=g, stride=stride, pad=pad) -> None:
                    with torch.no_grad():
                        if mask is None:
                            torch.nn.functional.conv3d(x, w, None, stride, pad)
                        else:
                            torch.ops.aten.convolution_backward(
                                g, x, w, None, stride, pad, (1, 1, 1), False, (0, 0, 0), 1,
                                mask)

                for kind, mask in (("fwd", None), ("dgrad", [True, False, False]),
                                   ("wgrad", [False, True, False])):
                    sec = _torch_time(torch, device, functools.partial(run, mask),
                                      args.conv_seconds)
                    row[kind + "_ms"] = sec * 1e3
                    row[kind + "_tflops"] = gflop / sec / 1e3
            except Exception as e:  # noqa: BLE001 - reported in the row
                row["status"] = _error(e)
            write_row(args.rows, row)


def _torch_time(torch: Any, device: str, fn: Callable[[], Any], min_seconds: float) -> float:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    sync()
    start = time.perf_counter()
    fn()
    sync()
    n = int(min(50, max(3, min_seconds / max(time.perf_counter() - start, 1e-6))))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(max(1, n // 3)):
            fn()
        sync()
        times.append((time.perf_counter() - start) / max(1, n // 3))
    return statistics.median(times)


# ----------------------------------------------------------------------------- steps


def _compile_concurrently(jobs: Sequence[Any], build: Callable[[Any], Any], clock: Clock,
                          workers: int) -> dict[Any, Any]:
    """{job: build(job) or an error/skip string}; XLA compiles release the GIL, so a thread
    pool overlaps them (autotuning on the device still runs one at a time)."""
    out: dict[Any, Any] = {}

    def guarded(job: Any) -> Any:
        if clock.expired(20):
            return "skipped (time budget)"
        try:
            return build(job)
        except Exception as e:  # noqa: BLE001 - reported in the row
            traceback.print_exc()
            return _error(e)

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        for job, result in zip(jobs, pool.map(guarded, jobs), strict=True):
            out[job] = result
    finally:  # on SIGTERM, do not wait for compiles still running
        pool.shutdown(wait=False, cancel_futures=True)
    return out


def _pretrain_or_none(force_model_step: bool) -> tuple[Any, str]:
    """`vcp_jax.pretrain` (the real step) or None and why it does not import."""
    if force_model_step:
        return None, "--model_step"
    try:
        from vcp_jax import pretrain  # noqa: PLC0415
    except ImportError as e:
        return None, f"{type(e).__name__}: {e}"
    return pretrain, ""


def _build_step(args: argparse.Namespace, arch: str, dtype: str, batch: int, impl: str,
                pretrain: Any) -> dict[str, Any]:
    """State, batch and the lowered step of one configuration (compiled by the caller)."""
    import jax  # noqa: PLC0415

    from benchmarks import train_step as bench  # noqa: PLC0415
    from vcp_jax import parallel  # noqa: PLC0415

    ns = argparse.Namespace(width=args.width, crop=args.crop, clip_len=args.clip_len,
                            batch_size=batch)
    host_batch = bench.random_batch(ns)
    strategy = parallel.JitStrategy()
    if pretrain is not None:
        config = bench.make_config(ns, arch, dtype, impl)
        pretrain.validate_config(config)
        state, ctx = pretrain.create_train_state(config)
        step_fn = functools.partial(pretrain.train_step, ctx=ctx)
        jitted = strategy.compile(step_fn, donate_state=True)
    else:
        state, step_fn = _model_step(args, arch, dtype, impl)
        jitted = jax.jit(step_fn, donate_argnums=(0,))
    state = strategy.put_state(state)
    batch_arrays = strategy.put_batch(host_batch)
    lowered = jitted.lower(state, batch_arrays)
    return {"state": state, "batch": batch_arrays, "lowered": lowered,
            "num_devices": strategy.num_devices}


def _model_step(args: argparse.Namespace, arch: str, dtype: str, impl: str) -> tuple[Any, Any]:
    """The fallback without the data packages: VCPModel forward + backward + SGD, no cloze."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import optax  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from vcp_jax import models  # noqa: PLC0415

    dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    rngs = nnx.Rngs(params=0)
    backbone = models.create_backbone(arch, rngs=rngs, width=args.width, dtype=dt,
                                      conv_impl=impl)
    model = models.VCPModel(backbone, 3, 5, rngs=rngs, dtype=dt)
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.01, momentum=0.9))

    def step(state: Any, batch: dict[str, jax.Array]) -> tuple[Any, jax.Array]:
        params, rest, opt_state = state
        x = batch["clips"].astype(jnp.float32) / 255.0
        labels = batch["has_remote"].astype(jnp.int32)

        def loss_fn(params: Any) -> tuple[jax.Array, Any]:
            m = nnx.merge(graphdef, params, rest, copy=True)
            logits = m(x)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            _, _, new_rest = nnx.split(m, nnx.Param, ...)  # BatchNorm statistics and the like
            return loss, new_rest

        (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), new_rest, opt_state), loss

    return (params, rest, tx.init(params)), step


def phase_steps(args: argparse.Namespace) -> None:
    from benchmarks import train_step as bench  # noqa: PLC0415

    clock = Clock(args.deadline)
    pretrain, why = _pretrain_or_none(args.model_step)
    step_kind = "pretrain.train_step" if pretrain is not None else "model step (no cloze)"
    if pretrain is None:
        print(f"  vcp_jax.pretrain does not import ({why}): timing the model step instead; "
              "carry the data packages as wheels for the real step (gpu_check.sh --help)",
              flush=True)
    jobs = [(arch, dtype, batch, impl) for arch in args.archs for impl in args.impls
            for dtype in args.dtypes for batch in args.batch_sizes]

    def build(job: tuple[str, str, int, str]) -> dict[str, Any]:
        start = time.perf_counter()
        built = _build_step(args, *job, pretrain)
        built["compiled"] = built.pop("lowered").compile()
        built["compile_s"] = time.perf_counter() - start
        return built

    def base(job: tuple[str, str, int, str]) -> dict[str, Any]:
        arch, dtype, batch, impl = job
        return {"kind": "step", "arch": arch, "dtype": dtype, "batch": batch, "conv": impl,
                "step": step_kind, "status": "ok"}

    PENDING.update({job: base(job) for job in jobs})
    # States are built and lowered in the pool too: cheap next to XLA's compile, and the
    # threads' overlap is what keeps the phase inside its budget.
    built = _compile_concurrently(jobs, build, clock, args.workers)
    for job in jobs:
        arch, dtype, batch, impl = job
        row = base(job)
        result = built.get(job)
        if isinstance(result, str):
            write_row(args.rows, {**row, "status": result}, job)
            continue
        if clock.expired(5):
            write_row(args.rows, {**row, "status": "skipped (time budget)"}, job)
            continue
        compiled, box = result["compiled"], [result["state"]]

        def one(compiled=compiled, box=box, batch_arrays=result["batch"]) -> Any:
            box[0], metrics = compiled(box[0], batch_arrays)
            return metrics

        try:
            sec, n = _timed_loop(one, args.min_seconds, 100)
            flops = bench.xla_flops(compiled) * result["num_devices"]
            row.update(_step_numbers(args, arch, dtype, batch, sec, flops))
            row.update(compile_s=result["compile_s"], steps=n)
        except Exception as e:  # noqa: BLE001 - reported in the row
            row["status"] = _error(e)
        finally:
            result.clear()  # frees the state and batch before the next configuration
        write_row(args.rows, row, job)


def _step_numbers(args: argparse.Namespace, arch: str, dtype: str, batch: int, sec: float,
                  xla_flops: float) -> dict[str, Any]:
    import jax  # noqa: PLC0415

    from benchmarks import train_step as bench  # noqa: PLC0415

    paper = (args.width, args.crop, args.clip_len) == tuple(PAPER.values())
    model_flops = (MODEL_GFLOP_PER_TUPLE[arch] * 1e9 * batch if paper else xla_flops)
    kind = jax.devices()[0].device_kind
    peak = bench.peak_flops(kind, dtype)
    per_device = model_flops / jax.device_count() / sec
    return {"step_ms": sec * 1e3, "tuples_s": batch / sec,
            "xla_gflop_tuple": xla_flops / batch / 1e9,
            "mfu": per_device / peak[0] if peak else None,
            "peak": peak[1] if peak else f"unknown ({kind})"}


# ----------------------------------------------------------------------------- torch step


def phase_torch(args: argparse.Namespace) -> None:
    """The PyTorch reference R3D step on the GPU (cuDNN benchmark mode), f32 and bf16."""
    clock = Clock(args.deadline)
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        print("  torch not installed: no PyTorch reference row", flush=True)
        return
    device = "cuda" if torch.cuda.is_available() else ("cpu" if args.smoke else None)
    if device is None:
        print("  torch sees no GPU: no PyTorch reference row", flush=True)
        return
    from benchmarks import torch_reference  # noqa: PLC0415

    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True  # JAX's default precision on GPU: TF32
    torch.backends.cudnn.allow_tf32 = True
    def base(dtype: str, batch: int) -> dict[str, Any]:
        return {"kind": "step", "arch": "r3d", "dtype": dtype, "batch": batch,
                "conv": f"torch ({device})", "step": "PyTorch reference", "status": "ok"}

    PENDING.update({("torch", d, b): base(d, b) for d in args.dtypes for b in args.batch_sizes})
    for dtype in args.dtypes:
        for batch in args.batch_sizes:
            key, row = ("torch", dtype, batch), base(dtype, batch)
            if clock.expired(10):
                write_row(args.rows, {**row, "status": "skipped (time budget)"}, key)
                continue
            try:
                model = torch_reference.build_torch_vcp_r3d(torch, args.width).to(device)
                model = model.to(memory_format=torch.channels_last_3d)
                opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9,
                                      weight_decay=5e-4)
                x = torch.rand(batch, 3, 3, args.clip_len, args.crop, args.crop, device=device)
                y = torch.randint(0, 5, (batch,), device=device)

                def step(model=model, opt=opt, x=x, y=y, dtype=dtype) -> None:
                    opt.zero_grad(set_to_none=True)
                    with torch.autocast(device, torch.bfloat16, enabled=dtype == "bfloat16"):
                        loss = torch.nn.functional.cross_entropy(model(x), y)
                    loss.backward()
                    opt.step()

                sec = _torch_time(torch, device, step, args.min_seconds)
                row.update(_step_numbers(args, "r3d", dtype, batch, sec, float("nan")))
                row["xla_gflop_tuple"] = None
                del model, opt, x, y
                if device == "cuda":
                    torch.cuda.empty_cache()
            except Exception as e:  # noqa: BLE001 - reported in the row
                row["status"] = _error(e)
            write_row(args.rows, row, key)


# ----------------------------------------------------------------------------- precision


def phase_precision(args: argparse.Namespace) -> None:
    """TF32 effects: the backbone's output on the device at default precision and at 'highest'
    against the CPU's float32 output (on a CPU-only machine: CPU default against CPU highest,
    labelled so), then the train step's time at float32 default, float32 highest and bfloat16."""
    import jax  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from vcp_jax import conv, models  # noqa: PLC0415

    clock = Clock(args.deadline)
    arch = args.archs[0]
    device = jax.devices()[0]
    cpu = jax.devices("cpu")[0]
    on_cpu = device.platform == "cpu"
    label = ("cpu default vs cpu highest (no accelerator here)" if on_cpu
             else f"{device.device_kind} vs cpu float32")
    clips = 2 if args.smoke else 4
    x = np.random.default_rng(0).standard_normal(
        (clips, args.clip_len, args.crop, args.crop, 3)).astype(np.float32)
    base = {"kind": "precision", "arch": arch, "clips": clips, "compare": label,
            "status": "ok"}
    try:
        with jax.default_device(cpu):
            backbone = models.create_backbone(arch, rngs=nnx.Rngs(params=0), width=args.width,
                                              conv_impl="conv2d_mm")
        graphdef, state = nnx.split(backbone)

        def features(state: Any, x: Any) -> Any:  # training mode: batch statistics
            return nnx.merge(graphdef, state, copy=True)(x)

        cpu_state = jax.device_put(state, cpu)
        with jax.default_matmul_precision("highest"):
            ref = np.asarray(jax.jit(features)(cpu_state, jax.device_put(x, cpu)))
        # On the device: the conv implementation 'auto' picks there (native on a GPU).
        models.set_conv_impl(backbone, conv.auto_impl(device.platform))
        graphdef, state = nnx.split(backbone)
        dev_state, dev_x = jax.device_put(state, device), jax.device_put(x, device)
        scale = float(np.abs(ref).max())
        for precision in ("default", "highest"):
            row = {**base, "precision": precision}
            try:
                if precision == "default":
                    out = np.asarray(jax.jit(features)(dev_state, dev_x))
                else:
                    with jax.default_matmul_precision("highest"):
                        out = np.asarray(jax.jit(features)(dev_state, dev_x))
                diff = float(np.abs(out - ref).max())
                row.update(max_abs_diff=diff, rel_diff=diff / max(scale, 1e-30),
                           ref_max=scale)
            except Exception as e:  # noqa: BLE001 - reported in the row
                row["status"] = _error(e)
            write_row(args.rows, row)
    except Exception as e:  # noqa: BLE001 - reported in the row
        write_row(args.rows, {**base, "precision": "both", "status": _error(e)})

    # Step time: float32 at default precision and at 'highest', and bfloat16.
    pretrain, _ = _pretrain_or_none(args.model_step)
    impl = conv.auto_impl(device.platform)
    batch = args.batch_sizes[0]
    for dtype, precision in (("float32", "default"), ("float32", "highest"),
                             ("bfloat16", "default")):
        row = {"kind": "precision_step", "arch": arch, "dtype": dtype, "precision": precision,
               "batch": batch, "conv": impl, "status": "ok",
               "step": "pretrain.train_step" if pretrain is not None else "model step (no cloze)"}
        if clock.expired(10):
            write_row(args.rows, {**row, "status": "skipped (time budget)"})
            continue
        try:
            if precision == "highest":
                with jax.default_matmul_precision("highest"):
                    built = _build_step(args, arch, dtype, batch, impl, pretrain)
                    compiled = built.pop("lowered").compile()
            else:
                built = _build_step(args, arch, dtype, batch, impl, pretrain)
                compiled = built.pop("lowered").compile()
            box = [built["state"]]

            def one(compiled=compiled, box=box, batch_arrays=built["batch"]) -> Any:
                box[0], metrics = compiled(box[0], batch_arrays)
                return metrics

            sec, _ = _timed_loop(one, args.min_seconds, 50)
            row.update(step_ms=1e3 * sec, tuples_s=batch / sec)
            built.clear()
        except Exception as e:  # noqa: BLE001 - reported in the row
            row["status"] = _error(e)
        write_row(args.rows, row)


# ----------------------------------------------------------------------------- roofline


def phase_roofline(args: argparse.Namespace) -> None:
    """The projection of `benchmarks/roofline.py` for the archs, dtypes and first batch size, to
    be printed beside the measured steps (computed on the host's CPU backend)."""
    from benchmarks import roofline  # noqa: PLC0415

    sizes = dict(roofline.TINY if args.smoke else roofline.PAPER)
    sizes.update(width=args.width, crop=args.crop, clip_len=args.clip_len,
                 batch=args.batch_sizes[0])
    dtypes = [d for d in args.dtypes if d in ("float32", "bfloat16")]
    for arch in args.archs:
        if Clock(args.deadline).expired(10):
            write_row(args.rows, {"kind": "roofline", "arch": arch,
                                  "status": "skipped (time budget)"})
            continue
        try:
            result = roofline.run([arch], dtypes, list(roofline.DEVICES), sizes, check=False,
                                  workers=args.workers)
        except Exception as e:  # noqa: BLE001 - reported in the row
            write_row(args.rows, {"kind": "roofline", "arch": arch, "status": _error(e)})
            continue
        for p in roofline.summary_rows(result):
            write_row(args.rows, {
                "kind": "roofline", "arch": arch, "dtype": p["dtype"], "device": p["device"],
                "batch": p["batch"], "bound_ms": p["step_ms"],
                "bound_ms_per_tuple": p["step_ms"] / p["batch"], "tuples_s": p["tuples_s"],
                "mfu": p["mfu"], "memory_bound_share": p["memory_bound_share"],
                "xla_fused_ms": p["xla_fused_step_ms"], "cores_grain": p["cores_grain"],
                "status": "ok"})


# ----------------------------------------------------------------------------- report


def _roofline_for(roofs: list[dict[str, Any]], device: str, arch: str,
                  dtype: str) -> dict[str, Any] | None:
    """The projection row for this arch and dtype on the GPU measured (H200 if the device says so,
    else H100's numbers)."""
    name = "H200 SXM" if "h200" in device.lower() else "H100 SXM"
    return next((r for r in roofs if r.get("status") == "ok" and r["arch"] == arch
                 and r["dtype"] == dtype and r["device"] == name), None)


def report(rows: list[dict[str, Any]]) -> str:
    """The one table of train steps (beside the roofline projection), the precision checks, then
    the conv table and the fastest conv_impl per case, then the training loop."""
    env = [r for r in rows if r.get("kind") == "env"]
    steps = [r for r in rows if r.get("kind") == "step"]
    convs = [r for r in rows if r.get("kind") == "conv"]
    e2e_rows = [r for r in rows if r.get("kind") == "e2e"]
    roofs = [r for r in rows if r.get("kind") == "roofline"]
    precision = [r for r in rows if r.get("kind") == "precision"]
    precision_steps = [r for r in rows if r.get("kind") == "precision_step"]
    # The real loop's input wait (its real-input row with the most threads) per step row.
    e2e = {(r.get("arch"), r.get("dtype"), r.get("batch")): r for r in e2e_rows
           if r.get("input") == "real"}
    out = []
    device = env[-1]["device"] if env else "?"
    if env:
        e = env[-1]
        out.append(f"device: {e['num_devices']} x {e['device']} ({e['backend']}), host "
                   f"{e['host']} with {e['cores']} cores; " + ", ".join(
                       f"{k} {v}" for k, v in e["versions"].items()))
        cuda = e.get("cuda") or {}
        out.append(f"CUDA runtime {cuda.get('cuda_runtime') or 'n/a'}, cuDNN "
                   f"{cuda.get('cudnn') or 'n/a'}, compute capability "
                   f"{e.get('compute_capability') or 'n/a'}; wheels: "
                   + (", ".join(f"{k} {v}" for k, v in cuda.get("wheels", {}).items())
                      or "none"))
        for w in e.get("warnings", []):
            out.append(f"WARNING: {w}")
    table = []
    for r in steps:
        wait = e2e.get((r["arch"], r["dtype"], r["batch"]), {}).get("input_wait")
        roof = _roofline_for(roofs, device, r["arch"], r["dtype"])
        bound = None if roof is None else roof["bound_ms_per_tuple"] * r["batch"]
        ratio = (None if bound is None or not r.get("step_ms")
                 else r["step_ms"] / bound)
        table.append([r["arch"], r["dtype"], r["batch"], r["conv"], r.get("compile_s"),
                      r.get("step_ms"), r.get("tuples_s"),
                      None if r.get("mfu") is None else 100 * r["mfu"],
                      _fmt_small(bound), _fmt_small(ratio),
                      "n/a (step only)" if wait is None else f"{100 * wait:.1f}%",
                      r["step"], r["status"]])
    out.append("\nVCP train step (3 clips per tuple; MFU from the native step's model FLOPs; "
               "roofline: the PROJECTION of benchmarks/roofline.py for "
               f"{'H200' if 'h200' in device.lower() else 'H100'} at this batch, measured / "
               "bound >= 1):")
    out.append(_common.table(
        ["arch", "dtype", "batch", "conv", "compile s", "step ms", "tuples/s", "MFU %",
         "roofline ms", "step / roofline", "input wait", "step", "status"],
        [[_blank(c) for c in row] for row in table]))
    if roofs:
        out.append("\nroofline PROJECTION (computed, not measured; per step at the batch "
                   "given):")
        keys = ["arch", "dtype", "device", "batch", "bound_ms", "tuples_s", "mfu",
                "memory_bound_share", "xla_fused_ms", "cores_grain", "status"]
        out.append(_common.table(keys, [[_fmt_small(r.get(k)) for k in keys] for r in roofs]))
    if precision:
        out.append("\nprecision: the backbone's output against the CPU's float32 "
                   "('highest') output:")
        keys = ["arch", "clips", "compare", "precision", "max_abs_diff", "rel_diff", "status"]
        out.append(_common.table(keys, [[_fmt_small(r.get(k)) for k in keys]
                                        for r in precision]))
    if precision_steps:
        ref = next((r.get("step_ms") for r in precision_steps if r["dtype"] == "float32"
                    and r["precision"] == "default" and r.get("step_ms")), None)
        out.append("\nstep time by dtype and precision (x: over float32 at default precision; "
                   "float32 default is TF32 on Ampere and newer GPUs):")
        prow = [[r["arch"], r["dtype"], r["precision"], r["batch"], r["conv"], r.get("step_ms"),
                 r.get("tuples_s"), None if not (ref and r.get("step_ms")) else
                 r["step_ms"] / ref, r["step"], r["status"]] for r in precision_steps]
        out.append(_common.table(["arch", "dtype", "precision", "batch", "conv", "step ms",
                                  "tuples/s", "x f32 default", "step", "status"],
                                 [[_blank(c) for c in row] for row in prow]))
    ratios = []
    for r in steps:
        if r["dtype"] == "bfloat16" and r.get("step_ms"):
            f32 = next((s for s in steps if s["dtype"] == "float32" and s.get("step_ms")
                        and (s["arch"], s["batch"], s["conv"]) == (r["arch"], r["batch"],
                                                                    r["conv"])), None)
            if f32:
                ratios.append(f"  {r['arch']} batch {r['batch']} {r['conv']}: bf16 / f32 step "
                              f"time {r['step_ms'] / f32['step_ms']:.2f}")
    if ratios:
        out.append("\nbfloat16 / float32 step time (the steps phase):")
        out.extend(ratios)
    if convs:
        out.append("\nR3D's convolutions (ms per call; TFLOP/s in brackets):")
        crow = []
        for r in convs:
            cells = []
            for kind in ("fwd", "dgrad", "wgrad"):
                ms, tf = r.get(kind + "_ms"), r.get(kind + "_tflops")
                cells.append("n/a" if ms is None else f"{ms:.2f} ({tf:.1f})")
            crow.append([r["conv"], r["dtype"], r["impl"], r["clips"], *cells, r["status"]])
        out.append(_common.table(["conv", "dtype", "impl", "clips", "fwd", "dgrad", "wgrad",
                                  "status"], crow))
    best = {}
    for r in steps:
        if r.get("tuples_s") and not r["conv"].startswith("torch"):
            key = (r["arch"], r["dtype"], r["batch"])
            if key not in best or r["tuples_s"] > best[key]["tuples_s"]:
                best[key] = r
    if best:
        out.append("\nfastest conv_impl per arch / dtype / batch (auto picks "
                   f"{_auto_name()} here):")
        for (arch, dtype, batch), r in sorted(best.items()):
            out.append(f"  {arch} {dtype} batch {batch}: {r['conv']} "
                       f"({r['tuples_s']:.1f} tuples/s)")
    if e2e_rows:
        out.append("\nThe training loop end to end (benchmarks/loop.py: synthetic videos, the real "
                   "input pipeline at the default data.num_threads; fake = the first batch "
                   "repeated, no decoding):")
        keys = ["task", "arch", "dtype", "batch", "input", "threads", "prefetch", "steps/s",
                "tuples_s", "input wait", "step ms (loop)", "step ms (alone)", "loop / step",
                "compile s", "MFU %", "cpu/wall"]
        out.append(_common.table(keys, [[_blank(r.get(k)) for k in keys] for r in e2e_rows]))
    else:
        out.append("\ninput wait: no end-to-end loop rows (the loop phase did not run or "
                   "failed; see its log above).")
    return "\n".join(out)


def _fmt_small(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.3g}"
    return _blank(value)


def _auto_name() -> str:
    try:
        from vcp_jax import conv  # noqa: PLC0415

        return conv.auto_impl()
    except Exception:  # noqa: BLE001 - the report must print whatever happens
        return "?"


def _blank(value: Any) -> Any:
    return "n/a" if value is None else value


# ----------------------------------------------------------------------------- main


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("phase", choices=("env", "convs", "steps", "precision", "roofline",
                                          "torch", "report"))
    parser.add_argument("--rows", type=Path, required=True, help="JSON-lines file of results")
    parser.add_argument("--deadline", type=float, default=None,
                        help="Unix time after which no new measurement starts")
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--batch_sizes", default="8,64", help="tuples per step (global)")
    parser.add_argument("--min_seconds", type=float, default=None,
                        help="time each step configuration for about this long (default 1; "
                             "0 with --smoke: the fewest timed calls)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="concurrent XLA compiles")
    parser.add_argument("--model_step", action="store_true",
                        help="time the model step even when vcp_jax.pretrain imports")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes (width 4, 16x16 crops, 8 frames, batches 2 and 4)")
    args = parser.parse_args(argv)
    # The smoke run shows that every phase runs and reports, not how fast: each measurement takes
    # the fewest calls _timed_loop / _torch_time make (6), not about a second.
    if args.min_seconds is None:
        args.min_seconds = 0.0 if args.smoke else 1.0
    args.conv_seconds = 0.0 if args.smoke else 0.2  # per conv and pass
    sizes = SMOKE if args.smoke else PAPER
    for key, value in sizes.items():
        setattr(args, key, value)
    args.archs, args.dtypes, args.impls = _csv(args.archs), _csv(args.dtypes), _csv(args.impls)
    args.batch_sizes = [int(b) for b in _csv(args.batch_sizes)]
    if args.phase == "report":
        print(report(read_rows(args.rows)))
        return 0
    print(f"== gpu_check {args.phase} (load {_common.load_average()}) ==", flush=True)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        {"env": phase_env, "convs": phase_convs, "steps": phase_steps,
         "precision": phase_precision, "roofline": phase_roofline,
         "torch": phase_torch}[args.phase](args)
    except Killed:
        for key, row in list(PENDING.items()):
            write_row(args.rows, {**row, "status": "killed at the phase's time limit"}, key)
        return 124
    return 0


if __name__ == "__main__":
    sys.exit(main())
