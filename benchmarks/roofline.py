"""A roofline projection of the VCP train step on H100 / H200: per layer FLOPs, bytes, time bound.

A PROJECTION, computed on paper (no GPU runs here): for every layer of C3D, R3D and R(2+1)D at the
paper's sizes (VCP tuples of 3 clips of 16x112x112, width 64, the paper's batch of 8 tuples per
step), the FLOPs and the bytes one train step moves through the layer, forward and backward, and
from a GPU's peak throughput and memory bandwidth the lower bound on the layer's time:
`max(FLOPs / peak, bytes / bandwidth)`, per kernel (a conv's forward, input gradient and weight
gradient are three kernels). Summed over the layers: the bound on the step time, the MFU the step
would reach if every layer ran at its bound (compute-bound layers at peak, memory-bound ones at
full bandwidth), which layers are memory-bound, and how many host cores the input pipeline then
needs to keep up.

Where the numbers come from (`source` column):

- convolutions: XLA's cost analysis (`jax.jit(f).lower(...).cost_analysis()`) of the conv alone,
  its input gradient and its weight gradient (`jax.linear_transpose`), as XLA's HLO states them:
  FLOPs = the kernel taps that land on real input (padding taps are not counted), bytes = input +
  kernel + output. The lowered (backend-independent) module is used, not the CPU-compiled one:
  XLA:CPU rewrites bfloat16 convs into float32 ones with converts and adds layout copies to weight
  gradients (3x the bytes), which a GPU does not do.
- BatchNorm (+ ReLU), residual add + ReLU, max-pool, pool + head + loss: XLA's cost analysis of
  the *compiled* (CPU) function, i.e. after XLA's fusion, with the real `vcp_jax.models.BatchNorm`
  (per-clip statistic groups, float32 statistics); the backward is the cost of forward + backward
  minus the forward's. A GPU fuses these differently; the analytic minimum (each pass reads its
  inputs and writes its outputs once: BN forward 2 reads + 1 write, backward 4 reads + 1 write)
  is given beside it (`min MB`).
- the SGD update (momentum, weight decay): analytic (read parameter, gradient, momentum; write
  parameter, momentum; float32).

Peak numbers (dense, no sparsity), from NVIDIA's H100 and H200 datasheets (their Tensor Core
figures are quoted with 2:4 sparsity; dense is half): H100 SXM5 989.4 TFLOP/s bf16, 494.7 TF32,
66.9 FP32 (non-tensor), 3.35 TB/s HBM3; H200 SXM the same compute and 4.8 TB/s HBM3e.
`--dtype float32` uses TF32 (JAX's default precision for float32 convolutions on Ampere and newer
GPUs); `float32-highest` (`jax.default_matmul_precision('highest')`) uses the FP32 peak.

Input pipeline: `sample_tuple` decodes 122 tuples/s per core on real UCF101 frames and the grain
stream delivers about 70% of that (benchmarks/RESULTS.md section 2); `--tuples_per_core` and
`--pipeline_efficiency` change them.

    PYTHONPATH=. python -m benchmarks.roofline                     # all archs, bf16 and f32
    PYTHONPATH=. python -m benchmarks.roofline --arch r3d --dtype bfloat16 --layers --json out.json

Compiles only (abstract shapes on the CPU backend; nothing of paper size is executed): about a
minute on 2 CPU cores for all three backbones.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks import _common

# ----------------------------------------------------------------------------- devices

# Dense peaks (FLOP/s) and HBM bandwidth (B/s). NVIDIA H100 datasheet (SXM5): bf16 1,979 and
# TF32 989 TFLOP/s "with sparsity" (dense is half), FP32 67 TFLOP/s, 3.35 TB/s; H200 datasheet:
# the same Tensor Core figures, 4.8 TB/s. The bf16/TF32 values are train_step.PEAKS's.
DEVICES: dict[str, dict[str, Any]] = {
    "h100": {"name": "H100 SXM", "bfloat16": 989.4e12, "float32": 494.7e12,
             "float32-highest": 66.9e12, "hbm": 3.35e12},
    "h200": {"name": "H200 SXM", "bfloat16": 989.4e12, "float32": 494.7e12,
             "float32-highest": 66.9e12, "hbm": 4.8e12},
}
PEAK_NAMES = {"bfloat16": "bf16 tensor", "float32": "TF32 tensor (JAX default)",
              "float32-highest": "FP32 (precision highest)"}
PAPER = {"width": 64, "crop": 112, "clip_len": 16, "batch": 8}
TINY = {"width": 4, "crop": 16, "clip_len": 8, "batch": 2}
NUM_CLIPS, NUM_CLASSES = 3, 5
# benchmarks/RESULTS.md section 2: sample_tuple on real UCF101 frames, tuples/s per core; the grain
# stream reached 65-75% of it.
TUPLES_PER_CORE = 122.0
PIPELINE_EFFICIENCY = 0.7

Shape = tuple[int, ...]


# ----------------------------------------------------------------------------- layers


@dataclasses.dataclass
class Layer:
    """One layer of the step: a conv, a BatchNorm (+ ReLU), a pool, a residual add, the head."""

    name: str
    kind: str  # conv | bn | bn_relu | bias_bn_relu | maxpool | add_relu | head | sgd
    shape: Shape  # input (N, T, H, W, C)
    out: Shape  # output
    conv: dict[str, Any] | None = None  # cin, cout, kernel, stride, padding, first
    pool: tuple[Shape, Shape] | None = None  # window, strides
    params: int = 0  # learnable parameters (for the SGD row and the check against the model)
    # Filled by `measure`: {"fwd": (flops, bytes), "dgrad": ..., "wgrad": ..., "bwd": ...}.
    costs: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    min_bytes: dict[str, float] = dataclasses.field(default_factory=dict)  # analytic, per kernel
    source: str = ""


def _conv_out(thw: Shape, kernel: Shape, stride: Shape, padding: Shape) -> Shape:
    return tuple((n + 2 * p - k) // s + 1 for n, k, s, p in
                 zip(thw, kernel, stride, padding, strict=True))


class _Net:
    """Builds the layer list of a backbone while tracking the feature map's shape."""

    def __init__(self, clips: int, clip_len: int, crop: int):
        self.shape: Shape = (clips, clip_len, crop, crop, 3)
        self.layers: list[Layer] = []

    def conv(self, name: str, cout: int, kernel: Shape, stride: Shape, padding: Shape,
             bias: bool = False, shape: Shape | None = None) -> Shape:
        shape = shape or self.shape
        n, *thw, cin = shape
        out = (n, *_conv_out(tuple(thw), kernel, stride, padding), cout)
        self.layers.append(Layer(
            name, "conv", shape, out, params=math.prod(kernel) * cin * cout + (cout if bias else 0),
            conv={"cin": cin, "cout": cout, "kernel": kernel, "stride": stride,
                  "padding": padding, "first": cin == 3 and not self.layers}))
        return out

    def bn(self, name: str, shape: Shape, relu: bool, bias: bool = False) -> Shape:
        kind = ("bias_" if bias else "") + ("bn_relu" if relu else "bn")
        self.layers.append(Layer(name, kind, shape, shape, params=2 * shape[-1]))
        return shape

    def conv_bn(self, name: str, cout: int, kernel: Shape, stride: Shape, padding: Shape,
                relu: bool, bias: bool = False, shape: Shape | None = None) -> Shape:
        out = self.conv(name, cout, kernel, stride, padding, bias, shape)
        return self.bn(name + ".bn", out, relu, bias)

    def maxpool(self, name: str, window: Shape) -> None:
        n, *thw, c = self.shape
        out = (n, *(d // w for d, w in zip(thw, window, strict=True)), c)
        self.layers.append(Layer(name, "maxpool", self.shape, out, pool=(window, window)))
        self.shape = out

    def add_relu(self, name: str) -> None:
        self.layers.append(Layer(name, "add_relu", self.shape, self.shape))

    def head(self) -> None:
        c = self.shape[-1]
        self.layers.append(Layer("pool + head + loss", "head", self.shape,
                                 (self.shape[0] // NUM_CLIPS, NUM_CLASSES),
                                 params=NUM_CLIPS * c * NUM_CLASSES + NUM_CLASSES))


def _c3d(net: _Net, width: int) -> None:
    w = (width, 2 * width, 4 * width, 8 * width, 8 * width)
    k3, s1, p1 = (3, 3, 3), (1, 1, 1), (1, 1, 1)
    plan = [("conv1", w[0], (1, 2, 2)), ("conv2", w[1], (2, 2, 2)), ("conv3a", w[2], None),
            ("conv3b", w[2], (2, 2, 2)), ("conv4a", w[3], None), ("conv4b", w[3], (2, 2, 2)),
            ("conv5a", w[4], None), ("conv5b", w[4], None)]
    for name, cout, pool in plan:
        net.shape = net.conv_bn(name, cout, k3, s1, p1, relu=True, bias=True)
        if pool:
            net.maxpool(f"pool after {name}", pool)


def _resnet(net: _Net, width: int, factorised: bool) -> None:
    def conv(name: str, cin: int, cout: int, kernel: Shape, stride: Shape, padding: Shape,
             relu_after: bool, shape: Shape) -> Shape:
        """R3D: one conv + BN; R(2+1)D: spatial conv + BN + ReLU + temporal conv, then BN."""
        if not factorised:
            return net.conv_bn(name, cout, kernel, stride, padding, relu_after, shape=shape)
        kt, kh, kw = kernel
        mid = (kt * kh * kw * cin * cout) // (kh * kw * cin + kt * cout)
        s = net.conv_bn(name + ".spatial", mid, (1, kh, kw), (1, *stride[1:]),
                        (0, *padding[1:]), relu=True, shape=shape)
        s = net.conv(name + ".temporal", cout, (kt, 1, 1), (stride[0], 1, 1),
                     (padding[0], 0, 0), shape=s)
        return net.bn(name + ".bn", s, relu_after)

    w = (width, 2 * width, 4 * width, 8 * width)
    net.shape = conv("conv1", 3, w[0], (3, 7, 7), (1, 2, 2), (1, 3, 3), True, net.shape)
    cin = w[0]
    for i, cout in enumerate(w):
        stage = f"conv{i + 2}"
        s = 2 if i > 0 else 1
        x = net.shape
        res = conv(stage + ".conv1", cin, cout, (3, 3, 3), (s, s, s), (1, 1, 1), True, x)
        res = conv(stage + ".conv2", cout, cout, (3, 3, 3), (1, 1, 1), (1, 1, 1), False, res)
        if i > 0:
            conv(stage + ".downsample", cin, cout, (1, 1, 1), (2, 2, 2), (0, 0, 0), False, x)
        net.shape = res
        net.add_relu(stage + " add + relu")
        cin = cout


def build_layers(arch: str, width: int, crop: int, clip_len: int, batch: int) -> list[Layer]:
    """The layers of one VCP train step of `arch` on `batch` tuples (3 clips each)."""
    net = _Net(NUM_CLIPS * batch, clip_len, crop)
    if arch == "c3d":
        _c3d(net, width)
    elif arch in ("r3d", "r21d"):
        _resnet(net, width, factorised=arch == "r21d")
    else:
        raise ValueError(f"unknown arch {arch!r}")
    net.head()
    params = sum(layer.params for layer in net.layers)
    net.layers.append(Layer("SGD update", "sgd", (params,), (params,), params=0))
    return net.layers


# ----------------------------------------------------------------------------- costs


def _cpu_struct(shape: Shape, dtype: Any) -> Any:
    """An abstract array placed on the CPU backend (the lowering target, whatever else exists)."""
    import jax  # noqa: PLC0415
    from jax.sharding import SingleDeviceSharding  # noqa: PLC0415

    return jax.ShapeDtypeStruct(shape, dtype, sharding=SingleDeviceSharding(jax.devices("cpu")[0]))


def _cost(stage: Any) -> tuple[float, float]:
    cost = stage.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    cost = cost or {}
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def _lowered_cost(fn: Callable[..., Any], *args: Any) -> tuple[float, float]:
    import jax  # noqa: PLC0415

    return _cost(jax.jit(fn).lower(*args))


def _compiled_cost(fn: Callable[..., Any], *args: Any) -> tuple[float, float]:
    """(flops of the lowered module, bytes of the compiled one): FLOPs do not change with fusion;
    bytes are counted after XLA's fusion."""
    import jax  # noqa: PLC0415

    lowered = jax.jit(fn).lower(*args)
    # XLA's fusion is decided before the backend's code generation, which is not needed here.
    compiled = lowered.compile(compiler_options={"xla_backend_optimization_level": 0})
    return _cost(lowered)[0], _cost(compiled)[1]


def conv_costs(layer: Layer, dtype: Any) -> dict[str, tuple[float, float]]:
    """XLA's (flops, bytes) of the conv's forward, input gradient (not for the first conv: the
    clips get no gradient) and weight gradient."""
    import jax  # noqa: PLC0415
    from jax import lax  # noqa: PLC0415

    c = layer.conv
    assert c is not None
    padding = tuple((p, p) for p in c["padding"])

    def conv(x: Any, w: Any) -> Any:
        return lax.conv_general_dilated(x, w, c["stride"], padding,
                                        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))

    x = _cpu_struct(layer.shape, dtype)
    w = _cpu_struct((*c["kernel"], c["cin"], c["cout"]), dtype)
    y = _cpu_struct(layer.out, dtype)

    def dgrad(dy: Any, w: Any) -> Any:
        return jax.linear_transpose(lambda x_: conv(x_, w), x)(dy)[0]

    def wgrad(x: Any, dy: Any) -> Any:
        return jax.linear_transpose(lambda w_: conv(x, w_), w)(dy)[0]

    out = {"fwd": _lowered_cost(conv, x, w), "wgrad": _lowered_cost(wgrad, x, y)}
    if not c["first"]:
        out["dgrad"] = _lowered_cost(dgrad, y, w)
    return out


def _elementwise_fns(layer: Layer, dtype: Any) -> tuple[Callable[..., Any], list[Any], Any]:
    """(f(params, *inputs) -> output, abstract inputs, params) of a non-conv layer."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from vcp_jax import models  # noqa: PLC0415

    x = _cpu_struct(layer.shape, dtype)
    c = layer.shape[-1]
    if layer.kind in ("bn", "bn_relu", "bias_bn_relu"):
        bn = models.BatchNorm(c, dtype=dtype, batch_groups=NUM_CLIPS)
        graphdef, state = nnx.split(bn)
        params = {"bn": state, "bias": jnp.zeros((c,), jnp.float32)}

        def f(p: Any, x: Any) -> Any:
            if layer.kind == "bias_bn_relu":  # C3D's conv bias, added before BatchNorm
                x = x + p["bias"].astype(x.dtype)
            y = nnx.merge(graphdef, p["bn"])(x)
            return jax.nn.relu(y) if layer.kind != "bn" else y

        return f, [x], params
    if layer.kind == "add_relu":
        return (lambda p, a, b: jax.nn.relu(a + b)), [x, x], {}
    if layer.kind == "maxpool":
        window, strides = layer.pool

        def pool(p: Any, x: Any) -> Any:
            return nnx.max_pool(x, window, strides)

        return pool, [x], {}
    if layer.kind == "head":
        b = layer.shape[0] // NUM_CLIPS
        params = {"w": jnp.zeros((NUM_CLIPS * c, NUM_CLASSES), jnp.float32),
                  "b": jnp.zeros((NUM_CLASSES,), jnp.float32)}

        def head(p: Any, x: Any) -> Any:
            feats = models.global_avg_pool(x).reshape(b, NUM_CLIPS * c)
            logits = feats.astype(dtype) @ p["w"].astype(dtype) + p["b"].astype(dtype)
            logp = jax.nn.log_softmax(logits.astype(jnp.float32))
            return -logp[:, 0].mean()

        return head, [x], params
    raise ValueError(layer.kind)


def elementwise_costs(layer: Layer, dtype: Any) -> dict[str, tuple[float, float]]:
    """XLA's (flops, bytes) of the layer's forward, and of its backward (forward + backward minus
    forward: the backward recomputes nothing the forward had, in XLA's fused program)."""
    import jax  # noqa: PLC0415

    f, inputs, params = _elementwise_fns(layer, dtype)
    params = jax.tree.map(lambda a: _cpu_struct(a.shape, a.dtype), params)
    out = jax.eval_shape(f, params, *inputs)
    dy = _cpu_struct(out.shape, out.dtype)

    def fwd_bwd(p: Any, dy: Any, *xs: Any) -> Any:
        _, vjp = jax.vjp(f, p, *xs)
        return vjp(dy)

    fwd = _compiled_cost(f, params, *inputs)
    both = _compiled_cost(fwd_bwd, params, dy, *inputs)
    return {"fwd": fwd, "bwd": (max(both[0] - fwd[0], 0.0), max(both[1] - fwd[1], 0.0))}


def _itemsize(dtype: Any) -> int:
    import numpy as np  # noqa: PLC0415

    return np.dtype(dtype).itemsize


def min_bytes(layer: Layer, dtype: Any) -> dict[str, float]:
    """The analytic minimum of bytes moved per kernel: each reads its inputs and writes its outputs
    once (BatchNorm forward: a statistics pass and a normalising pass, 2 reads + 1 write; backward:
    a reduction pass over dy and x, then dx from dy and x, 4 reads + 1 write)."""
    size = math.prod(layer.shape) * _itemsize(dtype)
    out = math.prod(layer.out) * _itemsize(dtype)
    if layer.kind == "conv":
        c = layer.conv
        w = math.prod(c["kernel"]) * c["cin"] * c["cout"] * _itemsize(dtype)
        parts = {"fwd": size + w + out, "wgrad": size + out + w}
        if not c["first"]:
            parts["dgrad"] = out + w + size
        return parts
    if layer.kind in ("bn", "bn_relu", "bias_bn_relu"):
        return {"fwd": 3 * size, "bwd": 5 * size}
    if layer.kind == "add_relu":  # fwd: a, b -> y; bwd: dy, y -> dx (shared by both branches)
        return {"fwd": 3 * size, "bwd": 3 * size}
    if layer.kind == "maxpool":  # bwd: dy and x (the argmax) -> dx
        return {"fwd": size + out, "bwd": out + 2 * size}
    if layer.kind == "head":  # the feature map read once, its gradient written once
        return {"fwd": size, "bwd": size}
    if layer.kind == "sgd":
        return {"update": 5 * 4 * layer.shape[0]}
    raise ValueError(layer.kind)


def measure(layers: Sequence[Layer], dtype_name: str, workers: int = 2) -> None:
    """Fills every layer's `costs`, `min_bytes` and `source` (compiles run `workers` at a time;
    layers of equal shape share one analysis)."""
    import jax.numpy as jnp  # noqa: PLC0415

    dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[dtype_name]

    def key(layer: Layer) -> Any:
        conv = None if layer.conv is None else tuple(sorted(
            (k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in layer.conv.items()))
        return (layer.kind, layer.shape, layer.out, conv, layer.pool)

    def one(layer: Layer) -> dict[str, tuple[float, float]]:
        if layer.kind == "conv":
            return conv_costs(layer, dtype)
        if layer.kind == "sgd":
            p = layer.shape[0]
            return {"update": (5.0 * p, 5 * 4.0 * p)}
        return elementwise_costs(layer, dtype)

    unique: dict[Any, Layer] = {}
    for layer in layers:
        unique.setdefault(key(layer), layer)
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        results = dict(zip(unique, pool.map(one, unique.values()), strict=True))
    for layer in layers:
        layer.costs = results[key(layer)]
        layer.min_bytes = min_bytes(layer, dtype)
        layer.source = {"conv": "XLA (lowered HLO)", "sgd": "analytic"}.get(
            layer.kind, "XLA (compiled, fused)")


# ----------------------------------------------------------------------------- the bound


def kernel_time(flops: float, nbytes: float, peak: float, bandwidth: float) -> tuple[float, str]:
    """Lower bound on one kernel's seconds and what bounds it ('compute' or 'memory')."""
    compute, memory = flops / peak, nbytes / bandwidth
    return (compute, "compute") if compute >= memory else (memory, "memory")


def layer_costs(layer: Layer, bytes_from: str) -> dict[str, tuple[float, float]]:
    """(flops, bytes) per kernel, bytes from XLA ('xla') or the analytic minimum ('min')."""
    if bytes_from == "xla":
        return dict(layer.costs)
    return {part: (flops, layer.min_bytes[part]) for part, (flops, _) in layer.costs.items()}


def layer_bound(layer: Layer, peak: float, bandwidth: float,
                bytes_from: str = "min") -> dict[str, Any]:
    """The layer's bound (seconds, sum over its kernels) and its class: 'memory' when the time its
    kernels spend bound by memory is more than half the layer's bound."""
    total = memory_s = compute_s = 0.0
    costs = layer_costs(layer, bytes_from)
    for flops, nbytes in costs.values():
        t, by = kernel_time(flops, nbytes, peak, bandwidth)
        total += t
        memory_s += t if by == "memory" else 0.0
        compute_s += flops / peak
    flops = sum(f for f, _ in costs.values())
    nbytes = sum(b for _, b in costs.values())
    return {"seconds": total, "compute_seconds": compute_s, "flops": flops, "bytes": nbytes,
            "intensity": flops / nbytes if nbytes else float("inf"),
            "bound": "memory" if memory_s > total / 2 else "compute"}


def project(layers: Sequence[Layer], device: dict[str, Any], dtype: str, batch: int,
            tuples_per_core: float = TUPLES_PER_CORE,
            pipeline_efficiency: float = PIPELINE_EFFICIENCY) -> dict[str, Any]:
    """The step's bound on one device: per layer and summed, MFU at the bound, host cores.

    The bound uses the analytic minimum of bytes (what a well-fused GPU program moves; for convs
    it equals XLA's count); `xla_fused_*` is the same with the bytes of XLA:CPU's fusion for the
    non-conv layers (a pessimistic bound: a GPU fuses at least as well)."""
    peak, bandwidth = device[dtype], device["hbm"]
    rows = [layer_bound(layer, peak, bandwidth, "min") for layer in layers]
    xla_rows = [layer_bound(layer, peak, bandwidth, "xla") for layer in layers]
    step = sum(r["seconds"] for r in rows)
    xla_step = sum(r["seconds"] for r in xla_rows)
    flops = sum(r["flops"] for r in rows)
    nbytes = sum(r["bytes"] for r in rows)
    memory_s = sum(r["seconds"] for r in rows if r["bound"] == "memory")
    tuples_s = batch / step
    return {
        "device": device["name"], "dtype": dtype, "peak_tflops": peak / 1e12,
        "hbm_tbs": bandwidth / 1e12, "batch": batch, "layers": rows,
        "gflop_tuple": flops / batch / 1e9, "gb_tuple": nbytes / batch / 1e9,
        "step_ms": 1e3 * step, "compute_only_ms": 1e3 * flops / peak,
        "memory_bound_ms": 1e3 * memory_s, "memory_bound_share": memory_s / step,
        "memory_bound_layers": [layer.name for layer, r in zip(layers, rows, strict=True)
                                if r["bound"] == "memory"],
        "tuples_s": tuples_s, "mfu": flops / (peak * step),
        "xla_fused_step_ms": 1e3 * xla_step, "xla_fused_mfu": flops / (peak * xla_step),
        "xla_fused_gb_tuple": sum(r["bytes"] for r in xla_rows) / batch / 1e9,
        "cores_sample_tuple": tuples_s / tuples_per_core,
        "cores_grain": tuples_s / (tuples_per_core * pipeline_efficiency),
    }


# ----------------------------------------------------------------------------- the model check


def model_flops(arch: str, width: int, crop: int, clip_len: int, batch: int, dtype: str) -> float:
    """XLA's FLOPs of the real VCPModel's loss and parameter gradient (native convs), lowered on
    abstract shapes: what the per-layer sum should add up to (less the SGD update)."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import optax  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from vcp_jax import models  # noqa: PLC0415

    dt = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[dtype]

    def make() -> Any:
        rngs = nnx.Rngs(0)
        backbone = models.create_backbone(arch, rngs=rngs, width=width, dtype=dt,
                                          conv_impl="native")
        return models.VCPModel(backbone, NUM_CLIPS, NUM_CLASSES, rngs=rngs, dtype=dt)

    model = nnx.eval_shape(make)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = jax.tree.map(lambda a: _cpu_struct(a.shape, a.dtype), (params, rest))
    x = _cpu_struct((batch, NUM_CLIPS, clip_len, crop, crop, 3), dt)
    labels = _cpu_struct((batch,), jnp.int32)

    def loss_grad(params: Any, rest: Any, x: Any, labels: Any) -> Any:
        def loss(params: Any) -> Any:
            logits = nnx.merge(graphdef, params, rest, copy=True)(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        return jax.grad(loss)(params)

    return _lowered_cost(loss_grad, params, rest, x, labels)[0]


def model_params(arch: str, width: int) -> int:
    from flax import nnx  # noqa: PLC0415

    from vcp_jax import models  # noqa: PLC0415

    def make() -> Any:
        rngs = nnx.Rngs(0)
        backbone = models.create_backbone(arch, rngs=rngs, width=width, conv_impl="native")
        return models.VCPModel(backbone, NUM_CLIPS, NUM_CLASSES, rngs=rngs)

    return models.count_params(nnx.eval_shape(make))


# ----------------------------------------------------------------------------- report


def run(archs: Sequence[str], dtypes: Sequence[str], devices: Sequence[str], sizes: dict[str, int],
        check: bool = True, workers: int = 2, tuples_per_core: float = TUPLES_PER_CORE,
        pipeline_efficiency: float = PIPELINE_EFFICIENCY) -> dict[str, Any]:
    """Layers, costs, projections (and the check against the whole model) per arch and dtype."""
    out: dict[str, Any] = {"sizes": sizes, "devices": {d: dict(DEVICES[d]) for d in devices},
                           "tuples_per_core": tuples_per_core,
                           "pipeline_efficiency": pipeline_efficiency, "archs": {}}
    for arch in archs:
        out["archs"][arch] = {}
        for dtype in dtypes:
            cost_dtype = "float32" if dtype.startswith("float32") else dtype
            layers = build_layers(arch, sizes["width"], sizes["crop"], sizes["clip_len"],
                                  sizes["batch"])
            start = time.perf_counter()
            measure(layers, cost_dtype, workers)
            entry: dict[str, Any] = {
                "analysis_s": time.perf_counter() - start,
                "layers": [{"name": layer.name, "kind": layer.kind, "out": layer.out,
                            "costs": layer.costs, "min_bytes": layer.min_bytes,
                            "source": layer.source} for layer in layers],
                "projections": {d: project(layers, DEVICES[d], dtype, sizes["batch"],
                                           tuples_per_core, pipeline_efficiency)
                                for d in devices},
            }
            if check:
                layer_flops = sum(f for layer in layers if layer.kind != "sgd"
                                  for f, _ in layer.costs.values())
                whole = model_flops(arch, sizes["width"], sizes["crop"], sizes["clip_len"],
                                    sizes["batch"], cost_dtype)
                entry["check"] = {
                    "layer_flops": layer_flops, "model_flops": whole,
                    "layer_params": sum(layer.params for layer in layers),
                    "model_params": model_params(arch, sizes["width"]),
                }
            out["archs"][arch][dtype] = entry
    return out


def _mb(nbytes: float) -> float:
    return nbytes / 1e6


def layer_table(result: dict[str, Any], arch: str, dtype: str) -> str:
    entry = result["archs"][arch][dtype]
    devices = list(entry["projections"])
    headers = ["layer", "kind", "output", "GFLOP fwd", "GFLOP bwd", "min MB fwd", "min MB bwd",
               "XLA MB", "FLOP/B"]
    for d in devices:
        headers += [f"{d} us", f"{d} bound"]
    headers.append("bytes source")
    rows = []
    for i, layer in enumerate(entry["layers"]):
        costs, mins = layer["costs"], layer["min_bytes"]
        fwd_parts = [k for k in costs if k in ("fwd", "update")]
        bwd_parts = [k for k in costs if k not in fwd_parts]
        proj = [entry["projections"][d]["layers"][i] for d in devices]
        row = [layer["name"], layer["kind"], "x".join(str(s) for s in layer["out"][1:]),
               sum(costs[k][0] for k in fwd_parts) / 1e9,
               sum(costs[k][0] for k in bwd_parts) / 1e9,
               _mb(sum(mins[k] for k in fwd_parts)), _mb(sum(mins[k] for k in bwd_parts)),
               _mb(sum(b for _, b in costs.values())), proj[0]["intensity"]]
        for p in proj:
            row += [1e6 * p["seconds"], p["bound"]]
        rows.append([*row, layer["source"]])
    return _common.table(headers, rows)


def summary_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for arch, by_dtype in result["archs"].items():
        for entry in by_dtype.values():
            for p in entry["projections"].values():
                rows.append({"arch": arch, **p})
    return rows


def summary_table(result: dict[str, Any]) -> str:
    headers = ["arch", "dtype", "device", "peak TF/s", "TB/s", "GFLOP/tuple", "GB/tuple",
               "compute-only ms", "bound ms", "memory-bound ms", "mem-bound %", "tuples/s",
               "MFU at bound %", "XLA:CPU-fused ms", "its MFU %", "cores (sample_tuple)",
               "cores (grain)"]
    rows = [[p["arch"], p["dtype"], p["device"], p["peak_tflops"], p["hbm_tbs"],
             p["gflop_tuple"], p["gb_tuple"], p["compute_only_ms"], p["step_ms"],
             p["memory_bound_ms"], 100 * p["memory_bound_share"], p["tuples_s"], 100 * p["mfu"],
             p["xla_fused_step_ms"], 100 * p["xla_fused_mfu"], p["cores_sample_tuple"],
             p["cores_grain"]] for p in summary_rows(result)]
    return _common.table(headers, rows)


def markdown_summary(result: dict[str, Any]) -> str:
    """The summary as a markdown table (for RESULTS.md)."""
    lines = ["| arch | dtype | device | GFLOP / tuple | GB / tuple (min) | compute-only ms | "
             "bound ms | in memory-bound layers | tuples/s at bound | MFU at bound | "
             "with XLA:CPU's fusion: ms / MFU | host cores (sample_tuple / grain) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in summary_rows(result):
        lines.append(
            f"| {p['arch']} | {p['dtype']} | {p['device']} | {p['gflop_tuple']:.0f} | "
            f"{p['gb_tuple']:.2f} | {p['compute_only_ms']:.2f} | {p['step_ms']:.2f} | "
            f"{100 * p['memory_bound_share']:.0f}% | {p['tuples_s']:,.0f} | "
            f"{100 * p['mfu']:.0f}% | {p['xla_fused_step_ms']:.1f} / "
            f"{100 * p['xla_fused_mfu']:.0f}% | {p['cores_sample_tuple']:.1f} / "
            f"{p['cores_grain']:.1f} |")
    return "\n".join(lines)


def kind_table(result: dict[str, Any], arch: str, dtype: str, device: str) -> str:
    """Bound time per kind of kernel (conv fwd / dgrad / wgrad apart) on one device, min bytes."""
    entry = result["archs"][arch][dtype]
    dev = result["devices"][device]
    peak, bw = dev[dtype], dev["hbm"]
    acc: dict[str, list[float]] = {}
    for layer in entry["layers"]:
        for part, (flops, _) in layer["costs"].items():
            nbytes = layer["min_bytes"][part]
            kind = "bn" if layer["kind"].endswith("bn") else layer["kind"]
            kind = "bn_relu" if kind == "bias_bn_relu" else kind
            t, by = kernel_time(flops, nbytes, peak, bw)
            a = acc.setdefault(f"{kind} {part}", [0.0, 0.0, 0.0, 0.0])
            a[0] += flops
            a[1] += nbytes
            a[2] += t
            a[3] += t if by == "memory" else 0.0
    total = sum(a[2] for a in acc.values())
    rows = [[name, a[0] / 1e9, a[1] / 1e6, 1e3 * a[2], 100 * a[2] / total,
             "memory" if a[3] > a[2] / 2 else "compute"] for name, a in acc.items()]
    rows.sort(key=lambda r: -r[3])
    return _common.table(["kernels", "GFLOP", "min MB", "bound ms", "% of bound", "bound by"],
                         rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="c3d,r3d,r21d")
    parser.add_argument("--dtype", default="bfloat16,float32",
                        help="bfloat16, float32 (TF32 peak), float32-highest (FP32 peak)")
    parser.add_argument("--device", default="h100,h200", help=f"of {sorted(DEVICES)}")
    parser.add_argument("--batch", type=int, default=None,
                        help="tuples per step per GPU (default: the paper's 8)")
    parser.add_argument("--tiny", action="store_true",
                        help="width 4, 16x16 crops, 8-frame clips, batch 2 (tests)")
    parser.add_argument("--layers", action="store_true", help="print the per-layer tables")
    parser.add_argument("--no_check", action="store_true",
                        help="skip the check of the layer sums against the whole model")
    parser.add_argument("--tuples_per_core", type=float, default=TUPLES_PER_CORE)
    parser.add_argument("--pipeline_efficiency", type=float, default=PIPELINE_EFFICIENCY)
    parser.add_argument("--bandwidth", type=float, default=None,
                        help="override every device's HBM bandwidth (TB/s)")
    parser.add_argument("--workers", type=int, default=2, help="concurrent XLA compiles")
    parser.add_argument("--json", default="", help="write everything to this JSON file")
    parser.add_argument("--markdown", action="store_true", help="also print a markdown summary")
    args = parser.parse_args(argv)
    sizes = dict(TINY if args.tiny else PAPER)
    if args.batch:
        sizes["batch"] = args.batch
    devices = [d.strip() for d in args.device.split(",") if d.strip()]
    if args.bandwidth:
        for d in devices:
            DEVICES[d] = {**DEVICES[d], "hbm": args.bandwidth * 1e12}
    _common.print_header("roofline projection (computed on paper, not measured)")
    print(f"  sizes: width {sizes['width']}, clips {sizes['clip_len']}x{sizes['crop']}x"
          f"{sizes['crop']}, {NUM_CLIPS} clips per tuple, batch {sizes['batch']} tuples per GPU")
    for d in devices:
        dev = DEVICES[d]
        print(f"  {dev['name']}: " + ", ".join(
            f"{PEAK_NAMES[k]} {dev[k] / 1e12:.1f} TFLOP/s" for k in PEAK_NAMES)
            + f", HBM {dev['hbm'] / 1e12:.2f} TB/s")
    print()
    result = run([a.strip() for a in args.arch.split(",")],
                 [t.strip() for t in args.dtype.split(",")], devices, sizes,
                 check=not args.no_check, workers=args.workers,
                 tuples_per_core=args.tuples_per_core,
                 pipeline_efficiency=args.pipeline_efficiency)
    for arch, by_dtype in result["archs"].items():
        for dtype, entry in by_dtype.items():
            if args.layers:
                print(f"PROJECTION, {arch} {dtype}, per layer (us per step of "
                      f"{sizes['batch']} tuples):")
                print(layer_table(result, arch, dtype))
                print()
            print(f"PROJECTION, {arch} {dtype} on {DEVICES[devices[0]]['name']}, per kind of "
                  f"kernel:")
            print(kind_table(result, arch, dtype, devices[0]))
            check = entry.get("check")
            if check:
                print(f"check: layer sum {check['layer_flops'] / 1e9:.2f} GFLOP vs the whole "
                      f"model's loss + gradient {check['model_flops'] / 1e9:.2f} "
                      f"({check['layer_flops'] / check['model_flops']:.4f}x); parameters "
                      f"{check['layer_params']:,} vs the model's {check['model_params']:,}")
            print(f"(XLA analysis {entry['analysis_s']:.1f} s)\n")
    print("PROJECTION: lower bound on the VCP train step per GPU (every kernel at its roofline, "
          "analytic minimum bytes; 'XLA:CPU-fused': the non-conv layers' bytes as XLA:CPU fuses "
          "them)")
    print(summary_table(result))
    print(f"\ncores: tuples/s at the bound over {args.tuples_per_core:.0f} tuples/s per core "
          f"(sample_tuple) and over {args.pipeline_efficiency:.0%} of it (the grain stream)")
    if args.markdown:
        print()
        print(markdown_summary(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
