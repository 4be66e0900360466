"""conv2d_mm's weight gradient, formulation by formulation, at R3D's demo and paper shapes.

Interleaved in one process (each round runs every formulation once per layer); prints the
minimum and median per layer and the ratio to the first formulation ("before": the weight
gradient as it was before its loop over clips; "now": `conv._weight_grad`; "all looped": its
channel-major loop for every layer, not only those under 32 input channels; "budget N": the loop
with another im2col budget per step).

    PYTHONPATH=. python -m benchmarks.conv_wgrad --sizes demo,paper --rounds 5 --budgets 256,4096
    PYTHONPATH=. python -m benchmarks.conv_wgrad --step --rounds 20   # the whole demo step
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from vcp_jax import conv

# name, cin, cout, kernel, stride, padding, input (T, H, W), clips
LAYERS = {
    "demo": [  # R3D width 8, 8x32x32 clips, 16 tuples of 3
        ("conv1", 3, 8, (3, 7, 7), (1, 2, 2), (1, 3, 3), (8, 32, 32), 48),
        ("conv2", 8, 8, (3, 3, 3), (1, 1, 1), (1, 1, 1), (8, 16, 16), 48),
        ("conv3a s2", 8, 16, (3, 3, 3), (2, 2, 2), (1, 1, 1), (8, 16, 16), 48),
        ("conv3b", 16, 16, (3, 3, 3), (1, 1, 1), (1, 1, 1), (4, 8, 8), 48),
        ("conv4a s2", 16, 32, (3, 3, 3), (2, 2, 2), (1, 1, 1), (4, 8, 8), 48),
        ("conv4b", 32, 32, (3, 3, 3), (1, 1, 1), (1, 1, 1), (2, 4, 4), 48),
        ("conv5a s2", 32, 64, (3, 3, 3), (2, 2, 2), (1, 1, 1), (2, 4, 4), 48),
        ("conv5b", 64, 64, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 2, 2), 48),
    ],
    "paper": [  # R3D width 64, 16x112x112 clips, 2 clips (a third of a batch-2 step)
        ("conv1", 3, 64, (3, 7, 7), (1, 2, 2), (1, 3, 3), (16, 112, 112), 2),
        ("conv2", 64, 64, (3, 3, 3), (1, 1, 1), (1, 1, 1), (16, 56, 56), 2),
        ("conv3a s2", 64, 128, (3, 3, 3), (2, 2, 2), (1, 1, 1), (16, 56, 56), 2),
        ("conv3b", 128, 128, (3, 3, 3), (1, 1, 1), (1, 1, 1), (8, 28, 28), 2),
        ("conv4a s2", 128, 256, (3, 3, 3), (2, 2, 2), (1, 1, 1), (8, 28, 28), 2),
    ],
}



def weight_grad_before(x: jax.Array, g: jax.Array, k_shape: tuple[int, ...], strides: Any,
                       padding: Any, precision: Any = None) -> jax.Array:
    """conv2d_mm's weight gradient before the chunked loop (git history: vcp_jax/conv.py):
    channels-last shifted windows of the whole batch concatenated, (M, taps * C)^T @ (M, J * O)."""
    n, t, h, w, c = x.shape
    kt, kh, kw, _, cout = k_shape
    st, sh, sw = strides
    to, ho, wo = g.shape[1:4]
    xp = jnp.pad(x, ((0, 0), (0, 0), padding[1], padding[2], (0, 0)))
    taps_hw = [(b, e) for b in range(kh) for e in range(kw)]
    group = max(1, min(len(taps_hw), conv._WGRAD_ROWS // c))
    grads: list[Any] = [None] * kt
    for phase in conv._phases(t, kt, st, padding[0][0], to):
        frames = conv._frames_of(xp, phase, st)
        gs = conv._shifted(g, phase).reshape(-1, len(phase.taps) * cout)
        blocks = []
        for q in range(0, len(taps_hw), group):
            taps = taps_hw[q : q + group]
            windows = [frames[:, :, b : b + sh * (ho - 1) + 1 : sh,
                              e : e + sw * (wo - 1) + 1 : sw, :] for b, e in taps]
            lhs = windows[0] if len(windows) == 1 else jnp.concatenate(windows, axis=-1)
            blocks.append(lax.dot_general(
                lhs.reshape(-1, len(taps) * c), gs, (((0,), (0,)), ((), ())),
                precision=precision, preferred_element_type=jnp.float32))
        d = jnp.concatenate(blocks, axis=0).reshape(kh, kw, c, len(phase.taps), cout)
        for j, a in enumerate(phase.taps):
            grads[a] = d[:, :, :, j, :]
    zeros = jnp.zeros((kh, kw, c, cout), jnp.float32)
    return jnp.stack([zeros if d is None else d for d in grads])


def _with(**settings: int) -> Any:
    """conv2d_mm's weight gradient with other module settings (read when traced)."""
    base = conv._weight_grad  # not the module attribute at call time: --step swaps it for fn

    def fn(x: jax.Array, g: jax.Array, k_shape: tuple[int, ...], strides: Any, padding: Any,
           precision: Any = None) -> jax.Array:
        saved = {name: getattr(conv, name) for name in settings}
        for name, value in settings.items():
            setattr(conv, name, value)
        try:
            return base(x, g, k_shape, strides, padding, precision)
        finally:
            for name, value in saved.items():
                setattr(conv, name, value)
    return fn


def variants(budgets: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "before": weight_grad_before, "now": conv._weight_grad,
        "all looped": _with(_WGRAD_CHANNEL_MAJOR_BELOW=1 << 30),
        "channels-last": _with(_WGRAD_CHANNEL_MAJOR_BELOW=0),
        "major one pass": _with(_WGRAD_CHUNK_BYTES=1 << 40),
    }
    for b in filter(None, budgets.split(",")):
        out[f"budget {b}KiB"] = _with(_WGRAD_CHUNK_BYTES=int(b) << 10)
    return out


def step_ab(args: argparse.Namespace) -> None:
    """R3D's whole train step (`pretrain.train_step`, demo sizes by default) compiled once per
    weight-gradient variant (`--variants`, default before,now), timed alternately step by step."""
    import functools  # noqa: PLC0415

    from benchmarks import train_step  # noqa: PLC0415
    from vcp_jax import parallel, pretrain  # noqa: PLC0415

    step_args = argparse.Namespace(batch_size=args.batch_size, clip_len=args.clip_len,
                                   crop=args.crop, width=args.width)
    config = train_step.make_config(step_args, "r3d", args.dtype, "conv2d_mm")
    batch_np = train_step.random_batch(step_args)
    runs = {}
    table = variants(args.budgets)
    for name in args.variants.split(",") if args.variants else ["before", "now"]:
        fn = table[name]
        saved, conv._weight_grad = conv._weight_grad, fn  # looked up when the VJP is traced
        try:
            state, ctx = pretrain.create_train_state(config)
            strategy = parallel.JitStrategy()
            jitted = strategy.compile(functools.partial(pretrain.train_step, ctx=ctx),
                                      donate_state=True)
            state, batch = strategy.put_state(state), strategy.put_batch(batch_np)
            compiled = jitted.lower(state, batch).compile()
        finally:
            conv._weight_grad = saved
        state, metrics = compiled(state, batch)  # warm-up
        jax.block_until_ready(state)
        runs[name] = [compiled, state, batch, [], float(metrics["loss"])]
    print("first-step loss: " + ", ".join(f"{k} {r[4]:.6f}" for k, r in runs.items()))
    for _ in range(args.rounds):
        for run in runs.values():
            compiled, state, batch, times, _ = run
            t0 = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - t0)
            run[1] = state
    first = next(iter(runs))
    print(f"R3D train step, batch {args.batch_size}, 3 x {args.clip_len}x{args.crop}^2, width "
          f"{args.width}, {args.dtype}, {args.rounds} rounds (s per step, min / median; "
          f"{first} / variant per round):")
    for name, run in runs.items():
        ratios = [a / b for a, b in zip(runs[first][3], run[3], strict=True)]
        print(f"  {name:15s} {min(run[3]):.3f} / {np.median(run[3]):.3f}   "
              f"{np.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}x)")


def main(argv: Any = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="demo", help="demo, paper, or demo,paper")
    parser.add_argument("--layers", default="", help="comma list of layer names (default all)")
    parser.add_argument("--variants", default="",
                        help="comma list of before, now, all looped, channels-last, major one "
                             "pass, budget NKiB (default all; --step: before,now)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--budgets", default="",
                        help="also time these im2col budgets per loop step, KiB, comma list")
    parser.add_argument("--step", action="store_true",
                        help="time R3D's whole train step instead, before vs now")
    parser.add_argument("--batch_size", type=int, default=16, help="--step: tuples per batch")
    parser.add_argument("--clip_len", type=int, default=8, help="--step")
    parser.add_argument("--crop", type=int, default=32, help="--step")
    parser.add_argument("--width", type=int, default=8, help="--step")
    args = parser.parse_args(argv)
    if args.step:
        step_ab(args)
        return
    fns_all = {k: v for k, v in variants(args.budgets).items()
               if not args.variants or k in args.variants.split(",")}
    dtype = jnp.dtype(args.dtype)
    for size in args.sizes.split(","):
        print(f"\n{size}, {dtype.name}: ms per weight gradient, min / median over {args.rounds}")
        print(f"{'layer':12s} " + " ".join(f"{v:>16s}" for v in fns_all)
              + "   ratio to first (median)")
        totals = dict.fromkeys(fns_all, 0.0)
        for layer in LAYERS[size]:
            name, cin, cout, k, s, p, thw, clips = layer
            if args.layers and name not in args.layers.split(","):
                continue
            x = jax.random.normal(jax.random.PRNGKey(0), (clips, *thw, cin), dtype)
            out = tuple((d + 2 * q - kk) // ss + 1
                        for d, kk, ss, q in zip(thw, k, s, p, strict=True))
            g = jax.random.normal(jax.random.PRNGKey(1), (clips, *out, cout), dtype)
            pads = tuple((q, q) for q in p)
            shape = (*k, cin, cout)
            fns = {v: jax.jit(lambda x, g, f=f, a=(shape, s, pads): f(x, g, *a))
                   for v, f in fns_all.items()}
            ref = None
            for v, f in fns.items():
                d = np.asarray(f(x, g).block_until_ready(), np.float64)
                if ref is None:
                    ref = d
                else:
                    err = np.abs(d - ref).max() / (np.abs(ref).max() + 1e-30)
                    if err > (1e-5 if dtype == jnp.float32 else 2e-2):
                        print(f"  !! {name} {v}: relative max error {err:.2e}")
            times: dict[str, list[float]] = {v: [] for v in fns}
            for _ in range(args.rounds):
                for v, f in fns.items():
                    t0 = time.perf_counter()
                    f(x, g).block_until_ready()
                    times[v].append(time.perf_counter() - t0)
            med = {v: float(np.median(t)) for v, t in times.items()}
            first = next(iter(med))
            for v in med:
                totals[v] += med[v]
            print(f"{name:12s} " + " ".join(
                f"{1e3 * min(times[v]):7.1f} /{1e3 * med[v]:7.1f}" for v in fns)
                + "   " + " ".join(f"{med[first] / med[v]:5.2f}x" for v in fns))
        first = next(iter(totals))
        print(f"{'total (med)':12s} " + " ".join(f"{1e3 * totals[v]:16.1f}" for v in totals)
              + "   " + " ".join(f"{totals[first] / totals[v]:5.2f}x" for v in totals))


if __name__ == "__main__":
    main()
