"""R3D's convolutions one by one: forward, input gradient, weight gradient, per implementation.

Where a train step's time goes, layer by layer: every 3D conv of R3D at the paper's width and
clip size (conv1 3x7x7 stride (1,2,2); the 3x3x3 convs, stride 1 and 2; the 1x1x1 stride-2
shortcuts) on `--clips` clips, timed for each `conv_impl` and, when torch is installed, for
PyTorch's `conv3d` / `convolution_backward` (oneDNN on CPU, cuDNN on GPU; channels-last 3D).
Interleaved: each round runs every implementation once per measurement, so a shared machine's
load falls on all alike; the minimum over the rounds is reported, with the process CPU seconds
of that run, and the totals per kind. FLOPs count every kernel tap (as PyTorch computes them).

    PYTHONPATH=. python -m benchmarks.conv_layers --clips 2 --impls conv2d,conv2d_mm --rounds 3
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from benchmarks import _common

# name, cin, cout, kernel, stride, padding, input (T, H, W): R3D at width 64, 16x112x112 clips.
LAYERS = [
    ("conv1", 3, 64, (3, 7, 7), (1, 2, 2), (1, 3, 3), (16, 112, 112)),
    ("conv2", 64, 64, (3, 3, 3), (1, 1, 1), (1, 1, 1), (16, 56, 56)),
    ("conv3a s2", 64, 128, (3, 3, 3), (2, 2, 2), (1, 1, 1), (16, 56, 56)),
    ("conv3b", 128, 128, (3, 3, 3), (1, 1, 1), (1, 1, 1), (8, 28, 28)),
    ("conv3 1x1 s2", 64, 128, (1, 1, 1), (2, 2, 2), (0, 0, 0), (16, 56, 56)),
    ("conv4a s2", 128, 256, (3, 3, 3), (2, 2, 2), (1, 1, 1), (8, 28, 28)),
    ("conv4b", 256, 256, (3, 3, 3), (1, 1, 1), (1, 1, 1), (4, 14, 14)),
    ("conv4 1x1 s2", 128, 256, (1, 1, 1), (2, 2, 2), (0, 0, 0), (8, 28, 28)),
    ("conv5a s2", 256, 512, (3, 3, 3), (2, 2, 2), (1, 1, 1), (4, 14, 14)),
    ("conv5b", 512, 512, (3, 3, 3), (1, 1, 1), (1, 1, 1), (2, 7, 7)),
    ("conv5 1x1 s2", 256, 512, (1, 1, 1), (2, 2, 2), (0, 0, 0), (4, 14, 14)),
]
KINDS = ("fwd", "dgrad", "wgrad")


def _out_shape(thw: Sequence[int], k: Sequence[int], s: Sequence[int], p: Sequence[int]
               ) -> tuple[int, ...]:
    return tuple((d + 2 * q - kk) // ss + 1 for d, kk, ss, q in zip(thw, k, s, p, strict=True))


def jax_calls(impl: str, layer: tuple[Any, ...], clips: int) -> dict[str, Callable[[], Any]]:
    import jax  # noqa: PLC0415

    from vcp_jax import conv  # noqa: PLC0415

    _, cin, cout, k, s, p, thw = layer
    fn = conv.resolve(impl)
    pads = [(q, q) for q in p]

    def f(x: jax.Array, w: jax.Array) -> jax.Array:
        return fn(x, w, s, pads, dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))

    x = jax.random.normal(jax.random.PRNGKey(0), (clips, *thw, cin))
    w = jax.random.normal(jax.random.PRNGKey(1), (*k, cin, cout)) * 0.05
    g = jax.random.normal(jax.random.PRNGKey(2), (clips, *_out_shape(thw, k, s, p), cout))
    fwd = jax.jit(f)
    dgrad = jax.jit(lambda x, w, g: jax.vjp(lambda x: f(x, w), x)[1](g)[0])
    wgrad = jax.jit(lambda x, w, g: jax.vjp(lambda w: f(x, w), w)[1](g)[0])
    return {"fwd": lambda: fwd(x, w).block_until_ready(),
            "dgrad": lambda: dgrad(x, w, g).block_until_ready(),
            "wgrad": lambda: wgrad(x, w, g).block_until_ready()}


def torch_calls(torch: Any, layer: tuple[Any, ...], clips: int) -> dict[str, Callable[[], Any]]:
    _, cin, cout, k, s, p, thw = layer
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fmt = torch.channels_last_3d
    x = torch.randn(clips, cin, *thw, device=device).to(memory_format=fmt)
    w = (torch.randn(cout, cin, *k, device=device) * 0.05).to(memory_format=fmt)
    g = torch.randn(clips, cout, *_out_shape(thw, k, s, p), device=device).to(memory_format=fmt)

    def backward(mask: list[bool]) -> None:
        torch.ops.aten.convolution_backward(g, x, w, None, s, p, (1, 1, 1), False, (0, 0, 0), 1,
                                            mask)
        sync()

    def forward() -> None:
        with torch.no_grad():
            torch.nn.functional.conv3d(x, w, None, s, p)
        sync()

    return {"fwd": forward, "dgrad": lambda: backward([True, False, False]),
            "wgrad": lambda: backward([False, True, False])}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--impls", default="conv2d,conv2d_mm",
                        help="vcp_jax conv implementations, comma list")
    parser.add_argument("--clips", type=int, default=2, help="batch of clips per call")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", default="", help="comma list of layer names (default all)")
    parser.add_argument("--no_torch", action="store_true")
    args = parser.parse_args(argv)
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    torch = None
    if not args.no_torch:
        try:
            import torch  # noqa: PLC0415
        except ImportError:
            print("torch not installed (optional): JAX implementations only")
    names = ([*impls, "torch"] if torch is not None else impls)
    wanted = {n.strip() for n in args.layers.split(",") if n.strip()}
    _common.print_header(f"R3D convolutions, {args.clips} clips per call (interleaved)")

    rows, totals = [], {(n, k): [0.0, 0.0] for n in names for k in KINDS}
    for layer in LAYERS:
        if wanted and layer[0] not in wanted:
            continue
        _, cin, cout, k, s, p, thw = layer
        gflop = 2 * args.clips * np.prod(_out_shape(thw, k, s, p)) * cout * cin * np.prod(k) / 1e9
        calls = {impl: jax_calls(impl, layer, args.clips) for impl in impls}
        if torch is not None:
            calls["torch"] = torch_calls(torch, layer, args.clips)
        for kind in KINDS:
            if layer[0] == "conv1" and kind == "dgrad":
                continue  # the input clip needs no gradient
            best = {n: (float("inf"), 0.0) for n in names}
            for n in names:
                calls[n][kind]()  # compile / warm up
            for _ in range(args.rounds):
                for n in names:
                    wall, cpu = time.perf_counter(), time.process_time()
                    calls[n][kind]()
                    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                    if wall < best[n][0]:
                        best[n] = (wall, cpu)
            for n in names:
                totals[(n, kind)][0] += best[n][0]
                totals[(n, kind)][1] += best[n][1]
            rows.append([layer[0], kind, gflop] + [
                f"{best[n][0] * 1e3:,.0f} ({gflop / best[n][0]:.1f})" for n in names])
            print(f"  {layer[0]} {kind}: " + ", ".join(
                f"{n} {best[n][0] * 1e3:.0f} ms" for n in names)
                + f"  (load {_common.load_average()})", flush=True)
    print(f"\nload average at the end: {_common.load_average()}\n")
    print("ms per call, best of the rounds (GFLOP/s in brackets):")
    print(_common.table(["layer", "kind", "GFLOP", *names], rows))
    print("\ntotals, s (wall; process CPU seconds in brackets):")
    print(_common.table(["kind", *names], [
        [kind] + [f"{totals[(n, kind)][0]:.2f} ({totals[(n, kind)][1]:.2f})" for n in names]
        for kind in KINDS] + [["all"] + [
            f"{sum(totals[(n, k)][0] for k in KINDS):.2f} "
            f"({sum(totals[(n, k)][1] for k in KINDS):.2f})" for n in names]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
