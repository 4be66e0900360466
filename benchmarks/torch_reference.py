"""The PyTorch reference R3D VCP train step against vcp-jax's, interleaved in one process.

The reference ([U] `BestJuly/VCP`, docs/method.md §2) trains R3D ("ResNet-10-3D") with a VCP head
in PyTorch; this script defines that model here (NCDHW, as the reference), runs its SGD step
(forward of the 3 clip positions, one backbone call each as [U] does, cross-entropy, backward,
SGD momentum 0.9 and weight decay 5e-4), and runs vcp-jax's real `pretrain.train_step` (cloze on
the device, forward + backward, SGD update, jitted through `parallel.JitStrategy`) for each
`--conv_impl`. Every round runs each variant once, in turn (A B C A B C ...), so a shared
machine's load drifts over all of them alike; the ratio to PyTorch is taken per round and the
median of those ratios is the robust figure. The load average is printed with every round.

vcp-jax runs as `main.py` runs it: keeping the host memory a step frees at the paper's size,
not at the demo's (`host_memory.configure`); PyTorch with glibc's defaults, as the reference
code runs, and with `--torch_keep_freed_memory` also keeping it (row `torch+keep`).

Each variant lives in its own worker process (started once, driven in turn by this one), as a
user runs one framework or the other: in one process a PyTorch step slows the JAX step after it
(paper size, 2-core EPYC: 12.6-13.1 s per JAX step before the first PyTorch step, 18-21 s
after it, 13.6-15.8 s after `torch.set_num_threads(1)`; not the threads' spin-wait, which
OMP_WAIT_POLICY=PASSIVE leaves as it is). `--same_process` measures the old way.

PyTorch is an optional dependency (`pip install torch`, the CPU build): without it the script
says so and exits with status 0 after the JAX-only rows.

Sizes: `paper` is 3 clips of 16x112x112 at width 64 (docs/method.md §2); `demo` is the synthetic
demo's R3D (`configs/pretrain_synthetic.py`): width 8, 32x32 crops, 16-frame clips, batch 16.

    PYTHONPATH=. python -m benchmarks.torch_reference --size paper --batch_size 2
    PYTHONPATH=. python -m benchmarks.torch_reference --size demo --conv_impl conv2d,native,auto

What the two steps do not share: the JAX step also draws the cloze on the device and converts
uint8 frames to float (the reference does both in its data loader), which is well under 1% of
the step at either size.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks import _common

SIZES = {  # width, crop, clip_len, default batch sizes
    "paper": {"width": 64, "crop": 112, "clip_len": 16, "batch_sizes": (2, 8)},
    "demo": {"width": 8, "crop": 32, "clip_len": 16, "batch_sizes": (16,)},
}
NUM_CLIPS, NUM_CLASSES = 3, 5
# docs/method.md §2: R3D's learnable backbone parameters at width 64 (the VCP head adds
# 1536 * 5 + 5).
R3D_PARAMS_WIDTH_64 = 14_361_792


def torch_or_none() -> Any:
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        return None
    return torch


# ----------------------------------------------------------------------------- the reference model


def build_torch_vcp_r3d(torch: Any, width: int) -> Any:
    """[U]'s VCP model on [V]'s R3D (`layer_sizes=(1, 1, 1, 1)`), as docs/method.md §2 states it.

    conv1 3x7x7 stride (1,2,2) pad (1,3,3) + BN + ReLU (no max-pool); 4 stages of one basic
    block, widths width*(1,2,4,8), stages 3-5 downsampling by 2 in T, H, W with a 1x1x1 stride-2
    conv + BN shortcut; convs without bias; global average pool; the 3 clip features
    concatenated -> Linear(3 * 8 * width -> 5). PyTorch's default init and BatchNorm.
    """
    nn = torch.nn

    def conv(cin: int, cout: int, k: Any, s: Any = 1, p: Any = 0) -> Any:
        return nn.Conv3d(cin, cout, k, s, p, bias=False)

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, downsample: bool):
            super().__init__()
            s = 2 if downsample else 1
            self.conv1, self.bn1 = conv(cin, cout, 3, s, 1), nn.BatchNorm3d(cout)
            self.conv2, self.bn2 = conv(cout, cout, 3, 1, 1), nn.BatchNorm3d(cout)
            self.shortcut = (nn.Sequential(conv(cin, cout, 1, 2), nn.BatchNorm3d(cout))
                             if downsample else nn.Identity())

        def forward(self, x: Any) -> Any:
            res = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
            return torch.relu(self.shortcut(x) + res)

    class R3D(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            w = (width, 2 * width, 4 * width, 8 * width)
            self.stem = nn.Sequential(conv(3, w[0], (3, 7, 7), (1, 2, 2), (1, 3, 3)),
                                      nn.BatchNorm3d(w[0]), nn.ReLU())
            self.layers = nn.Sequential(*(Block(cin, cout, i > 0) for i, (cin, cout) in
                                          enumerate(zip((w[0], *w[:3]), w, strict=True))))
            self.num_features = w[3]

        def forward(self, x: Any) -> Any:
            return self.layers(self.stem(x)).mean(dim=(2, 3, 4))

    class VCPN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.base_network = R3D()
            self.fc = nn.Linear(NUM_CLIPS * self.base_network.num_features, NUM_CLASSES)

        def forward(self, tuples: Any) -> Any:
            """`(B, N, C, T, H, W)` -> logits; one backbone call per clip position, as [U]."""
            feats = [self.base_network(tuples[:, i]) for i in range(NUM_CLIPS)]
            return self.fc(torch.cat(feats, dim=1))

    return VCPN()


def make_torch_step(torch: Any, width: int, crop: int, clip_len: int, batch_size: int,
                    channels_last: bool) -> Callable[[], None]:
    """One reference SGD step per call, on a fixed random batch (float32, NCDHW clips)."""
    torch.manual_seed(0)
    model = build_torch_vcp_r3d(torch, width)
    if width == 64:
        backbone = sum(p.numel() for p in model.base_network.parameters())
        assert backbone == R3D_PARAMS_WIDTH_64, backbone
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.rand(batch_size, NUM_CLIPS, 3, clip_len, crop, crop)
    y = torch.randint(0, NUM_CLASSES, (batch_size,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step


# ----------------------------------------------------------------------------- the vcp-jax step


def make_jax_step(width: int, crop: int, clip_len: int, batch_size: int, conv_impl: str,
                  dtype: str, arch: str = "r3d") -> tuple[Callable[[], None], float]:
    """One vcp-jax train step per call (state donated and carried); also the compile seconds."""
    import jax  # noqa: PLC0415

    from benchmarks import train_step as bench  # noqa: PLC0415
    from vcp_jax import host_memory, parallel, pretrain  # noqa: PLC0415

    args = argparse.Namespace(width=width, crop=crop, clip_len=clip_len, batch_size=batch_size)
    config = bench.make_config(args, arch, dtype, conv_impl)
    host_memory.configure(config)  # as main.py: before this process's first JAX work
    pretrain.validate_config(config)
    state, ctx = pretrain.create_train_state(config)
    strategy = parallel.JitStrategy()
    jitted = strategy.compile(functools.partial(pretrain.train_step, ctx=ctx), donate_state=True)
    box = [strategy.put_state(state)]
    batch = strategy.put_batch(bench.random_batch(args))
    start = time.perf_counter()
    compiled = jitted.lower(box[0], batch).compile()
    compile_s = time.perf_counter() - start

    def step() -> None:
        box[0], metrics = compiled(box[0], batch)
        jax.block_until_ready((box[0], metrics))

    return step, compile_s


# ----------------------------------------------------------------------------- timing


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _timed(step: Callable[[], None]) -> tuple[float, float, int]:
    """One call of `step`: (wall s, this process's cpu s, its minor page faults)."""
    faults, cpu, wall = _minor_faults(), time.process_time(), time.perf_counter()
    step()
    return time.perf_counter() - wall, time.process_time() - cpu, _minor_faults() - faults


def _torch_step_factory(width: int, crop: int, clip_len: int, batch_size: int,
                        channels_last: bool, keep_freed_memory: bool = False,
                        ) -> tuple[Callable[[], None], float | None]:
    if keep_freed_memory:
        from vcp_jax import host_memory  # noqa: PLC0415

        host_memory.keep_freed_memory()
    return make_torch_step(torch_or_none(), width, crop, clip_len, batch_size,
                           channels_last), None


def _worker(conn: Any, factory: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """A worker process: builds one step, then times one call per "step" message until "stop"."""
    try:
        step, compile_s = factory(*args)
        conn.send(("ready", compile_s))
    except BaseException as e:  # reported in the parent, which owns the console
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    while conn.recv() == "step":
        conn.send(_timed(step))


class _Remote:
    """A step in its own process (spawned, so that neither framework's threads or allocator
    state are inherited): `()` runs one timed call there."""

    def __init__(self, factory: Callable[..., Any], args: tuple[Any, ...]):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker, args=(child, factory, args), daemon=True)
        self.process.start()
        status, payload = self.conn.recv()  # ("ready", compile s or None) or ("error", text)
        if status != "ready":
            self.close()
            raise RuntimeError(f"the worker for {factory.__name__}{args} failed: {payload}")
        self.compile_s = payload

    def __call__(self) -> tuple[float, float, int]:
        self.conn.send("step")
        return self.conn.recv()

    def close(self) -> None:
        if self.process.is_alive():
            self.conn.send("stop")
        self.process.join(timeout=30)


def run_interleaved(steps: dict[str, Callable[[], tuple[float, float, int]]], rounds: int,
                    warmup: int) -> dict[str, list[tuple[float, float, int]]]:
    """`rounds` rounds of one timed call of every step in turn: {name: [(wall s, cpu s,
    faults)]}."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    out: dict[str, list[tuple[float, float, int]]] = {name: [] for name in steps}
    for r in range(rounds):
        line = []
        for name, step in steps.items():
            out[name].append(step())
            line.append(f"{name} {out[name][-1][0]:.2f} s")
        print(f"  round {r + 1}/{rounds}: " + ", ".join(line)
              + f"  (load {_common.load_average()})", flush=True)
    return out


def summarize(times: dict[str, list[tuple[float, float, int]]], batch_size: int,
              reference: str | None) -> list[list[Any]]:
    rows = []
    for name, runs in times.items():
        walls = [w for w, _, _ in runs]
        med = statistics.median(walls)
        if reference is not None and reference in times:
            ratios = [r[0] / w for r, w in zip(times[reference], walls, strict=True)]
            vs = statistics.median(ratios)
            spread = f"{min(ratios):.2f}-{max(ratios):.2f}"
        else:
            vs, spread = float("nan"), "n/a"
        rows.append([name, batch_size, med, min(walls), batch_size / med,
                     statistics.median(c for _, c, _ in runs),
                     statistics.median(f for _, _, f in runs) / 1e3, vs, spread])
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="paper", help="paper, demo, or all")
    parser.add_argument("--batch_size", default=None,
                        help="comma list of batches (tuples); default paper 2,8 and demo 16")
    parser.add_argument("--conv_impl", default="conv2d,auto",
                        help="vcp-jax conv implementations to time, comma list")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (after warm-up)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--torch_channels_last", action="store_true",
                        help="also time PyTorch with channels_last_3d tensors (oneDNN's "
                             "preferred layout; the reference code uses the default)")
    parser.add_argument("--no_torch", action="store_true", help="time the JAX steps only")
    parser.add_argument("--torch_keep_freed_memory", action="store_true",
                        help="also time PyTorch keeping the memory a step frees, as vcp-jax "
                             "does at the paper's size (vcp_jax/host_memory.py)")
    parser.add_argument("--same_process", action="store_true",
                        help="run every step in this process (the default gives each its own "
                             "worker process: see the module docstring)")
    args = parser.parse_args(argv)

    from vcp_jax import conv  # noqa: PLC0415

    sizes = list(SIZES) if args.size == "all" else [s.strip() for s in args.size.split(",")]
    impls = [i.strip() for i in args.conv_impl.split(",") if i.strip()]
    for impl in impls:
        if impl not in conv.CONV_IMPLS:
            raise SystemExit(f"error: conv_impl {impl!r} is not one of {conv.CONV_IMPLS}")
    torch = None if args.no_torch else torch_or_none()
    _common.print_header("PyTorch reference R3D step vs vcp-jax (interleaved)")
    # oneDNN (PyTorch) gains far more than XLA:CPU from AVX-512 and AMX: the ratio depends on them.
    ext = _common.cpu_vector_extensions()
    print("CPU " + _common.cpu_model() + ": " + ", ".join(
        f"{f} {'yes' if ext[f] else 'no'}" for f in ("avx2", "avx512f", "avx512_bf16",
                                                      "amx_tile", "amx_bf16")) + "\n")
    if torch is None and not args.no_torch:
        print("PyTorch is not installed (an optional dependency: pip install torch); timing the "
              "vcp-jax steps alone.\n")
    elif torch is not None:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, oneDNN "
              f"{'on' if torch.backends.mkldnn.is_available() else 'off'}\n")

    all_rows = []
    for size in sizes:
        if size not in SIZES:
            raise SystemExit(f"error: size {size!r} is not one of {list(SIZES)}")
        spec = SIZES[size]
        batches = ([int(b) for b in args.batch_size.split(",")] if args.batch_size
                   else spec["batch_sizes"])
        dims = (spec["width"], spec["crop"], spec["clip_len"])
        for batch_size in batches:
            print(f"{size}: R3D width {dims[0]}, {NUM_CLIPS} clips x {dims[2]} x {dims[1]}^2, "
                  f"batch {batch_size} tuples, {args.dtype} (JAX)", flush=True)
            makers: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]] = {}
            if torch is not None:
                makers["torch"] = (_torch_step_factory, (*dims, batch_size, False))
                if args.torch_keep_freed_memory:
                    makers["torch+keep"] = (_torch_step_factory, (*dims, batch_size, False, True))
                if args.torch_channels_last:
                    makers["torch-cl"] = (_torch_step_factory, (*dims, batch_size, True))
            for impl in impls:
                name = f"jax-{impl}" if impl != "auto" else f"jax-auto->{conv.auto_impl()}"
                makers[name] = (make_jax_step, (*dims, batch_size, impl, args.dtype))
            steps: dict[str, Any] = {}
            try:
                for name, (factory, fargs) in makers.items():
                    if args.same_process:
                        step, compile_s = factory(*fargs)
                        steps[name] = functools.partial(_timed, step)
                    else:
                        steps[name] = _Remote(factory, fargs)
                        compile_s = steps[name].compile_s
                    if compile_s is not None:
                        print(f"  {name}: compiled in {compile_s:.1f} s", flush=True)
                times = run_interleaved(steps, args.rounds, args.warmup)
            finally:
                for step in steps.values():
                    if isinstance(step, _Remote):
                        step.close()
            rows = summarize(times, batch_size, "torch" if torch is not None else None)
            all_rows += [[size, *row] for row in rows]
            print()

    print(f"load average at the end: {_common.load_average()}\n")
    print(_common.table(
        ["size", "step", "batch", "step s (med)", "step s (min)", "tuples/s", "cpu s/step",
         "page faults/step (k)", "x torch (med)", "x torch (range)"], all_rows))
    print("\n`x torch`: PyTorch's step time over this step's, per round (> 1: faster than "
          "PyTorch); median and range over the rounds.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
