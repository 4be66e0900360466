"""Where the CPU train step's time goes: a per-HLO profile of one R3D VCP step, by category.

Runs the real `pretrain.train_step` (as `benchmarks/torch_reference.py` does), traces a few
steps with `jax.profiler.trace`, reads the trace back (`jax.profiler.ProfileData`: XLA:CPU
records one event per executed HLO instruction, named as in the compiled module) and sums the
events per HLO instruction. Each instruction is put in a category from the compiled module's
text (its opcode, its fusion's ops, and the metadata XLA keeps: the jaxpr op name, whose
`transpose(...)` marks autodiff's backward pass, and the Python source line, mapped here to the
function of `vcp_jax` it is in):

- convolution forward and backward (anything traced in `vcp_jax.conv`): the 2D convs and
  matmuls; the im2col of the weight gradient (shifted inputs concatenated); the other pads,
  slices and sums (tap sums, the col2im of strided input gradients); copies and transposes,
- BatchNorm forward / backward (`vcp_jax.models.BatchNorm`),
- copies / transposes (copy, transpose and the fusions XLA names after them),
- elementwise and the rest (ReLU, residual adds, pooling, the head, the loss, the cloze, SGD).

The per-op times are the events' wall durations on the executing threads: with 2 cores
XLA:CPU runs up to 2 ops at once, so their sum can exceed the step's wall time; the shares are
of the summed op time. On a shared machine the absolute times are noisy (say which load ran).

    PYTHONPATH=. python -m benchmarks.profile_step --size demo    # width 8, 3 x 8x32x32, batch 16
    PYTHONPATH=. python -m benchmarks.profile_step --size paper --batch 2
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import _common

SIZES = {  # width, crop, clip_len, batch: the demo's pretraining (configs/demo.py) and the paper's
    "demo": {"width": 8, "crop": 32, "clip_len": 8, "batch": 16},
    "paper": {"width": 64, "crop": 112, "clip_len": 16, "batch": 2},
}
REPO = Path(__file__).resolve().parent.parent
# Events that are bookkeeping, not HLO instructions.
_SKIP = re.compile(r"^(ThreadpoolListener|end: |ThunkExecutor|Pjit|ParseArguments|"
                   r"CommonPjRt|Handle inputs|Allocate|PythonRefManager|SlinkyThreadPool|\$)")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([\w\-]+)\((.*)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_FRAME = re.compile(r"stack_frame_id=(\d+)")


# ----------------------------------------------------------------------------- the HLO module


def _section(text: str, name: str) -> list[str]:
    """The lines of one of the module's stack-frame tables (FileNames, FunctionNames, ...)."""
    parts = text.split("\n" + name + "\n", 1)
    return parts[1].split("\n\n", 1)[0].splitlines() if len(parts) == 2 else []


def _stack_frames(text: str) -> Any:
    """A function: stack_frame_id -> [(file, function, line)], innermost first, from the tables
    XLA prints at the top of the module (a frame's printed parent id is the parent's id + 1)."""
    files = {int(n): f.strip('"') for n, f in (ln.split(" ", 1) for ln in
                                                _section(text, "FileNames"))}
    funcs = {int(n): f.strip('"') for n, f in (ln.split(" ", 1) for ln in
                                                _section(text, "FunctionNames"))}
    locs, frames = {}, {}
    for ln in _section(text, "FileLocations"):
        fields = dict(re.findall(r"(\w+)=(\d+)", ln))
        locs[int(ln.split()[0])] = (files.get(int(fields["file_name_id"]), "?"),
                                    funcs.get(int(fields["function_name_id"]), "?"),
                                    int(fields["line"]))
    for ln in _section(text, "StackFrames"):
        fields = dict(re.findall(r"(\w+)=(\d+)", ln))
        frames[int(ln.split()[0])] = (int(fields["file_location_id"]),
                                      int(fields["parent_frame_id"]) - 1)

    def chain(frame_id: int | None) -> list[tuple[str, str, int]]:
        out = []
        while frame_id in frames and len(out) < 64:
            loc, parent = frames[frame_id]
            out.append(locs.get(loc, ("?", "?", 0)))
            if parent == frame_id:
                break
            frame_id = parent
        return out

    return chain


def parse_hlo(text: str) -> dict[str, dict[str, Any]]:
    """Instruction name -> opcode, op_name, call stack, and for fusions the opcodes they call."""
    chain = _stack_frames(text)
    computations: dict[str, list[str]] = {}
    current = None
    instrs: dict[str, dict[str, Any]] = {}
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            words = line.split()
            current = (words[1] if words[0] == "ENTRY" else words[0]).lstrip("%")
            computations[current] = []
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, _, opcode, rest = m.groups()
        if current is not None:
            computations[current].append(opcode)
        op_name = _OP_NAME.search(rest)
        frame = _FRAME.search(rest)
        calls = re.search(r"calls=%?([\w.\-]+)", rest)
        instrs[name] = {
            "opcode": opcode, "op_name": op_name.group(1) if op_name else "",
            "stack": chain(int(frame.group(1))) if frame else [],
            "calls": calls.group(1) if calls else None,
            "operands": re.findall(r"%([\w.\-]+)", rest.split("metadata=")[0]),
            "users": [],
        }
    for name, info in instrs.items():
        info["called_ops"] = computations.get(info["calls"], []) if info["calls"] else []
        for operand in info["operands"]:
            if operand in instrs and operand != name:
                instrs[operand]["users"].append(name)
    for info in instrs.values():
        info["user_opcodes"] = sorted({instrs[u]["opcode"] for u in info["users"]})
    return instrs


def where(stack: list[tuple[str, str, int]]) -> str:
    """The innermost frame in vcp_jax ('models.BatchNorm.__call__'), else the library's name."""
    for file, function, _ in stack:
        path = Path(file)
        if "vcp_jax" in path.parts:
            return f"{path.stem}.{function}"
    for file, _, _ in stack:
        for lib in ("flax", "optax", "jax"):
            if lib in Path(file).parts:
                return lib
    return "?"


_CONV_OPS = {"convolution", "dot"}
_MOVE_OPS = {"copy", "transpose"}
_PLUMBING = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "reshape",
             "broadcast", "slice", "iota", "convert"}


def categorize(name: str, info: dict[str, Any] | None) -> tuple[str, str]:
    """(category, the vcp_jax function or library it comes from) of one HLO instruction.

    Convolution work (anything traced inside `vcp_jax.conv`, or a native convolution) is split
    by pass and by what the instruction does: the 2D convs and matmuls, the copies and
    transposes, and the rest (pads, slices, concatenations and sums that assemble the kernel
    taps, the col2im of strided input gradients). A hand-written VJP (`conv2d_mm`) is traced
    from its call site, so its input and weight gradients are not told apart here.
    """
    if info is None:
        return "other (not in the module)", "?"
    fn = where(info["stack"])
    backward = "transpose(" in info["op_name"]
    opcode = info["opcode"]
    ops = set(info["called_ops"]) | {opcode}
    moves = ops - _PLUMBING
    is_move = opcode in _MOVE_OPS or (opcode == "fusion" and (
        (moves and moves <= _MOVE_OPS) or bool(re.match(r"(transpose|copy)", name))))
    is_conv = bool(ops & _CONV_OPS) or (opcode == "custom-call" and "conv" in name.lower())
    pass_ = "backward" if backward else "forward"
    if fn.startswith("conv.") or (is_conv and fn in ("flax", "?")):
        if is_conv:
            return f"conv {pass_}: 2D convs and matmuls", fn
        if is_move:
            return f"conv {pass_}: copies / transposes", fn
        if backward and (opcode == "concatenate" or info["user_opcodes"] == ["concatenate"]):
            # The spatially shifted inputs gathered side by side (im2col) for the weight
            # gradient's matrix products.
            return "conv backward: im2col (shifted inputs, concatenated)", fn
        return f"conv {pass_}: pads, slices, sums", fn
    if is_conv:  # the head's Dense layer
        return f"matmul {pass_} (head)", fn
    if is_move:
        return "copies / transposes (outside convs)", fn
    if "BatchNorm" in fn:
        return "BatchNorm " + pass_, fn
    if "cloze" in fn or "example_keys" in fn:
        return "cloze and its random keys (on device)", fn
    if fn == "optax" or "update_with_norm" in fn:
        return "optimizer (SGD, weight decay, grad norm)", fn
    return f"elementwise / other {pass_}", fn


# ----------------------------------------------------------------------------- the trace


def trace_events(logdir: str) -> list[tuple[str, float]]:
    """(event name, seconds) of the HLO instruction events in the trace written to `logdir`."""
    from jax.profiler import ProfileData  # noqa: PLC0415

    files = glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)
    if not files:
        raise RuntimeError(f"no trace written in {logdir}")
    out = []
    for plane in ProfileData.from_file(files[0]).planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):
                continue
            for event in line.events:
                if event.duration_ns > 0 and not _SKIP.match(event.name):
                    out.append((event.name, event.duration_ns / 1e9))
    return out


def build_step(size: dict[str, int], conv_impl: str, dtype: str, arch: str = "r3d") -> Any:
    """(compiled step, state box, batch): the real train step, as torch_reference builds it."""
    from benchmarks import train_step as bench  # noqa: PLC0415
    from vcp_jax import parallel, pretrain  # noqa: PLC0415

    ns = argparse.Namespace(width=size["width"], crop=size["crop"], clip_len=size["clip_len"],
                            batch_size=size["batch"])
    config = bench.make_config(ns, arch, dtype, conv_impl)
    pretrain.validate_config(config)
    state, ctx = pretrain.create_train_state(config)
    strategy = parallel.JitStrategy()
    import functools  # noqa: PLC0415

    jitted = strategy.compile(functools.partial(pretrain.train_step, ctx=ctx), donate_state=True)
    box = [strategy.put_state(state)]
    batch = strategy.put_batch(bench.random_batch(ns))
    compiled = jitted.lower(box[0], batch).compile()
    return compiled, box, batch


def profile(size: dict[str, int], conv_impl: str, dtype: str, steps: int,
            arch: str = "r3d") -> dict[str, Any]:
    import jax  # noqa: PLC0415

    compiled, box, batch = build_step(size, conv_impl, dtype, arch)

    def step() -> None:
        box[0], metrics = compiled(box[0], batch)
        jax.block_until_ready((box[0], metrics))

    for _ in range(2):
        step()
    walls = []
    logdir = tempfile.mkdtemp(prefix="vcp_profile_")
    with jax.profiler.trace(logdir):
        for _ in range(steps):
            start = time.perf_counter()
            step()
            walls.append(time.perf_counter() - start)
    events = trace_events(logdir)
    text = compiled.as_text()
    instrs = parse_hlo(text)
    per_op: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for name, sec in events:
        per_op[name][0] += sec / steps
        per_op[name][1] += 1
    ops = []
    for name, (sec, count) in per_op.items():
        category, fn = categorize(name, instrs.get(name))
        info = instrs.get(name) or {}
        ops.append({"op": name, "opcode": info.get("opcode", "?"), "category": category,
                    "function": fn, "seconds": sec, "calls_per_step": count / steps})
    return {"size": size, "conv_impl": conv_impl, "dtype": dtype, "steps": steps,
            "step_wall_s": sorted(walls)[len(walls) // 2], "ops": ops,
            "hlo_instructions": len(instrs), "load": _common.load_average(), "hlo": text}


def category_table(result: dict[str, Any]) -> list[list[Any]]:
    total = sum(op["seconds"] for op in result["ops"])
    acc: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for op in result["ops"]:
        acc[op["category"]][0] += op["seconds"]
        acc[op["category"]][1] += op["calls_per_step"]
    rows = [[cat, 1e3 * sec, 100 * sec / total, int(round(n))] for cat, (sec, n) in acc.items()]
    rows.sort(key=lambda r: -r[1])
    rows.append(["all ops", 1e3 * total, 100.0, int(round(sum(r[3] for r in rows)))])
    return rows


def function_table(result: dict[str, Any], top: int) -> list[list[Any]]:
    total = sum(op["seconds"] for op in result["ops"])
    acc: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for op in result["ops"]:
        key = (op["category"], op["function"])
        acc[key][0] += op["seconds"]
        acc[key][1] += op["calls_per_step"]
    rows = [[cat, fn, 1e3 * sec, 100 * sec / total, int(round(n))]
            for (cat, fn), (sec, n) in acc.items()]
    rows.sort(key=lambda r: -r[2])
    return rows[:top]


def op_table(result: dict[str, Any], top: int) -> list[list[Any]]:
    total = sum(op["seconds"] for op in result["ops"])
    ops = sorted(result["ops"], key=lambda op: -op["seconds"])[:top]
    return [[op["op"], op["opcode"], op["category"], op["function"], 1e3 * op["seconds"],
             100 * op["seconds"] / total] for op in ops]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="demo", help="demo, paper, or both (comma list)")
    parser.add_argument("--batch", type=int, default=None, help="tuples (default per size)")
    parser.add_argument("--conv_impl", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--arch", default="r3d")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (after 2 warm-up)")
    parser.add_argument("--top", type=int, default=15, help="rows of the per-function table")
    parser.add_argument("--json", default="", help="also write everything to this JSON file")
    parser.add_argument("--hlo", default="", help="write the compiled HLO module(s) here")
    args = parser.parse_args(argv)
    _common.print_header("where the train step's time goes (XLA:CPU per-HLO profile)")
    results = []
    for name in [s.strip() for s in args.size.split(",") if s.strip()]:
        size = dict(SIZES[name])
        if args.batch:
            size["batch"] = args.batch
        result = profile(size, args.conv_impl, args.dtype, args.steps, args.arch)
        result["name"] = name
        results.append(result)
        total = sum(op["seconds"] for op in result["ops"])
        print(f"{name}: {args.arch} width {size['width']}, 3 x {size['clip_len']}x{size['crop']}"
              f"x{size['crop']}, batch {size['batch']}, conv_impl {args.conv_impl}, "
              f"{args.dtype}: step {result['step_wall_s']:.3f} s wall (median of "
              f"{args.steps}), ops {total:.3f} s summed over threads, "
              f"{result['hlo_instructions']} HLO instructions; load {result['load']}")
        print(_common.table(["category", "ms / step", "% of op time", "ops run / step"],
                            category_table(result)))
        print()
        print(_common.table(["category", "function", "ms / step", "%", "ops run / step"],
                            function_table(result, args.top)))
        print()
        print(_common.table(["HLO op", "opcode", "category", "function", "ms / step", "%"],
                            op_table(result, 10)))
        print()
    if args.json:
        Path(args.json).write_text(json.dumps(
            [{k: v for k, v in r.items() if k != "hlo"} for r in results], indent=1))
    if args.hlo:
        Path(args.hlo).write_text("\n\n".join(r["hlo"] for r in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
