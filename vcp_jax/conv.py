"""3D convolutions for the backbones: XLA's native op, or 2D-conv formulations for fast CPU runs.

XLA:CPU lowers 3D convolutions (and their gradients) to slow generic code, while 2D convolutions
and matrix products go to its optimised library kernels (YNNPACK). A `(kt, kh, kw)` conv equals a
`(kh, kw)` conv of every frame with the kt temporal taps stacked as output channels, then a sum
over the taps shifted in time. Same parameters, same result (to float rounding). Three ways:

- `'native'`: `lax.conv_general_dilated` on the 5-D arrays; what accelerators run best.
- `'conv2d'`: the formulation above, differentiated by JAX (`conv3d_via_conv2d`).
- `'conv2d_mm'`: the same forward pass with a hand-written VJP (`conv3d_conv2d_mm`) that keeps
  every piece on XLA:CPU's fast kernels; measured about 2x faster than `'conv2d'` for R3D's
  paper-size train step on a 2-core CPU, and as fast as PyTorch/oneDNN (benchmarks/RESULTS.md).
  Differences from `'conv2d'`:
  * temporal strides: each temporal phase of the input (frames r, r + s, ...) meets only the
    taps it feeds, so a stride-2 conv computes exactly the needed outputs instead of every
    frame's (`'conv2d'` does 2x the work in R3D's downsampling convs), and no 2D conv runs on
    the zero frames of the temporal padding;
  * weight gradient: per temporal phase, one matrix product of the time-shifted output gradient
    with the spatially shifted input (im2col), a few kernel taps at a time; for inputs of under
    32 channels the im2col is channel-major and built in a loop over the batch a few clips at a
    time, in a cache-sized buffer (3-8x faster for R3D's demo-size conv1 and conv2, 1.2x for its
    paper-size conv1). Autodiff of `'conv2d'` gives a 2D convolution whose window is the whole
    frame, which XLA:CPU runs at under a tenth of its matmul speed (R3D's weight gradients: 3x
    PyTorch's time);
  * input gradient: for stride-1 convs the same forward formulation on the output gradient with
    the flipped kernel (a wide-output 2D conv; autodiff's transposed form is a narrow-output
    one, 2-3x slower in XLA:CPU); for strided convs one matrix product per temporal phase and a
    col2im sum of strided pads (autodiff's form is an input-dilated conv, which XLA:CPU runs on
    its slow generic path);
  * 1x1x1 convs (the ResNet shortcuts): a strided slice and a matrix product.
- `'auto'`: `'conv2d_mm'` on CPU, `'native'` elsewhere (`auto_impl`).

All implementations take NDHWC input and DHWIO kernels (`nnx.Conv`'s layout), explicit padding and
no dilation or feature groups: what the three backbones use.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLS = ("native", "conv2d", "conv2d_mm", "auto")

_LAYOUT = ("NDHWC", "DHWIO", "NDHWC")
_LAYOUT_2D = ("NHWC", "HWIO", "NHWC")
Padding = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
Strides = tuple[int, int, int]


def _check_supported(
    lhs: jax.Array,
    rhs: jax.Array,
    padding: Any,
    lhs_dilation: Sequence[int] | None,
    rhs_dilation: Sequence[int] | None,
    dimension_numbers: Any,
    feature_group_count: int,
    name: str,
) -> None:
    """Raises NotImplementedError for what the 2D formulations do not cover."""
    if any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))) or (
        feature_group_count != 1
    ):
        raise NotImplementedError(f"{name} supports neither dilation nor groups")
    if isinstance(padding, str):
        raise NotImplementedError(f"{name} needs explicit padding")
    if lhs.ndim != 5 or rhs.ndim != 5:
        raise NotImplementedError(f"{name} is for 3D convolutions, got {lhs.shape}, {rhs.shape}")
    if dimension_numbers is not None and (
        lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _LAYOUT)
    ):
        raise NotImplementedError(f"{name} needs the {_LAYOUT} layout, got {dimension_numbers}")
    if lhs.shape[-1] != rhs.shape[3]:
        raise ValueError(f"input channels {lhs.shape[-1]} != kernel's {rhs.shape[3]}")


def conv3d_via_conv2d(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
    **unused: Any,
) -> jax.Array:
    """Drop-in for `lax.conv_general_dilated` on NDHWC input and DHWIO kernels (as `nnx.Conv`).

    Supports strides and explicit padding; not dilation or feature groups (VCP needs neither).
    """
    _check_supported(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                     feature_group_count, "conv3d_via_conv2d")
    batch, frames, height, width, channels = lhs.shape
    kt, kh, kw, cin, cout = rhs.shape
    st, sh, sw = window_strides
    (pt0, pt1), pad_h, pad_w = padding
    # (kh, kw, cin, kt * cout): every temporal tap becomes a group of output channels.
    kernel = jnp.moveaxis(rhs, 0, 3).reshape(kh, kw, cin, kt * cout)
    y = lax.conv_general_dilated(
        lhs.reshape(batch * frames, height, width, channels),
        kernel,
        (sh, sw),
        [tuple(pad_h), tuple(pad_w)],
        dimension_numbers=_LAYOUT_2D,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    y = y.reshape(batch, frames, *y.shape[1:3], kt, cout)
    if pt0 or pt1:
        y = jnp.pad(y, ((0, 0), (pt0, pt1), (0, 0), (0, 0), (0, 0), (0, 0)))
    out_frames = (frames + pt0 + pt1 - kt) // st + 1
    stop = lambda k: k + st * (out_frames - 1) + 1  # noqa: E731
    out = y[:, 0 : stop(0) : st, :, :, 0, :]
    for k in range(1, kt):
        out = out + y[:, k : stop(k) : st, :, :, k, :]
    return out


# ----------------------------------------------------------------------------- conv2d_mm


def _out_size(size: int, k: int, s: int, pad: tuple[int, int]) -> int:
    return (size + pad[0] + pad[1] - k) // s + 1


@dataclasses.dataclass(frozen=True)
class _Phase:
    """One temporal phase r of a conv with temporal stride s and kt taps.

    Padded frame `r + s * i` feeds taps `r + s * j` (j < len(taps)) of output frame `i - j`.
    Only `i` in `[i0, i1)` are real (unpadded) frames; `first` is the first one's index in the
    input. Phases whose frames are all padding are dropped.
    """

    taps: tuple[int, ...]
    i0: int
    i1: int
    first: int

    @property
    def frames(self) -> int:
        return self.i1 - self.i0


def _phases(frames: int, kt: int, st: int, pt0: int, out_frames: int) -> list[_Phase]:
    phases = []
    for r in range(min(st, kt)):
        taps = tuple(range(r, kt, st))
        i0 = max(0, -((r - pt0) // st))  # first i with r + st * i - pt0 >= 0
        i1 = min(out_frames + len(taps) - 1, (frames - 1 - r + pt0) // st + 1)
        if i1 > i0:
            phases.append(_Phase(taps, i0, i1, r + st * i0 - pt0))
    return phases


def _frames_of(x: jax.Array, phase: _Phase, st: int) -> jax.Array:
    """The real input frames of `phase`: x[:, first::st][:, :frames] (a view when st = 1)."""
    if st == 1 and phase.first == 0 and phase.frames == x.shape[1]:
        return x
    return x[:, phase.first : phase.first + st * (phase.frames - 1) + 1 : st]


def _conv_by_phases(
    x: jax.Array, k: jax.Array, strides: Strides, padding: Padding, precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """The forward pass: per temporal phase, one 2D conv of its real frames with its taps
    stacked as output channels, then the taps' outputs summed at their time shifts."""
    n, t, h, w, c = x.shape
    kt, kh, kw, _, cout = k.shape
    st, sh, sw = strides
    to = _out_size(t, kt, st, padding[0])
    ho, wo = _out_size(h, kh, sh, padding[1]), _out_size(w, kw, sw, padding[2])
    out = None
    for phase in _phases(t, kt, st, padding[0][0], to):
        m, taps = phase.frames, phase.taps
        kernel = jnp.stack([k[a] for a in taps], axis=3).reshape(kh, kw, c, len(taps) * cout)
        y = lax.conv_general_dilated(
            _frames_of(x, phase, st).reshape(n * m, h, w, c), kernel, (sh, sw),
            [padding[1], padding[2]], dimension_numbers=_LAYOUT_2D, precision=precision,
            preferred_element_type=preferred_element_type,
        ).reshape(n, m, ho, wo, len(taps), cout)
        for j in range(len(taps)):  # phase frame i feeds output frame i - j
            lo, hi = max(0, phase.i0 - j), min(to, phase.i1 - j)
            if hi <= lo:
                continue
            term = y[:, lo + j - phase.i0 : hi + j - phase.i0, :, :, j, :]
            if lo or hi < to:
                term = jnp.pad(term, ((0, 0), (lo, to - hi), (0, 0), (0, 0), (0, 0)))
            out = term if out is None else out + term
    if out is None:  # every tap lands on padding
        out = jnp.zeros((n, to, ho, wo, cout), preferred_element_type or x.dtype)
    return out


def _shifted(g: jax.Array, phase: _Phase) -> jax.Array:
    """The output gradient `(N, To, Ho, Wo, O)` at each of `phase`'s taps' time shifts:
    `(N, frames, Ho, Wo, J, O)` with `[:, i - i0, ..., j, :] = g[:, i - j]` (zero outside)."""
    to = g.shape[1]
    zero = jnp.zeros((), g.dtype)
    return jnp.stack([
        lax.pad(g, zero, [(0, 0, 0), (j - phase.i0, phase.i1 - to - j, 0), (0, 0, 0), (0, 0, 0),
                          (0, 0, 0)])
        for j in range(len(phase.taps))], axis=-2)


# Weight gradient: spatial taps per matrix product, so that its rows (taps x input channels) reach
# about this many: fewer taps per product copy less of the input at once, more make larger
# products. Measured flat between 64 and 192 rows for C = 64 on the 2-core CPU.
_WGRAD_ROWS = 192
# Weight gradient of the small-channel convs: clips per step of its loop, so that one step's
# im2col (taps x channels x output voxels, float32) stays under about this many bytes: a
# cache-sized buffer (L2: 512 KiB a core on the 2-core AMD EPYC) that the loop reuses, instead of
# one of tens of MB written, page-faulted in and read once. benchmarks/conv_wgrad.py, R3D's demo
# conv1 + conv2 on that CPU, interleaved: 0.25-1 MiB 3.5-8x faster than one pass over the batch
# (the spread is the machine's noise, not the budget's), 4-16 MiB 3-4x.
_WGRAD_CHUNK_BYTES = 512 << 10
# Weight gradient: below this many input channels the im2col is built channel-major (each tap's
# window a copy of whole rows) in a loop over the batch; from it up channels-last (each tap's
# window C-element pieces, which for 32 and more channels copy about as fast and need no
# transpose of the input) in one pass, as measured fastest per layer (benchmarks/conv_wgrad.py).
_WGRAD_CHANNEL_MAJOR_BELOW = 32


def _weight_grad_clips(
    x: jax.Array, g: jax.Array, k_shape: tuple[int, ...], strides: Strides, padding: Padding,
    precision: Any = None,
) -> jax.Array:
    """dL/dk of a few clips: per temporal phase and group of spatial taps, one matrix product

        (taps * C, M) @ (M, J * O) -> (taps * C, J * O),  M = clips * frames * Ho * Wo,

    of the input's shifted windows and the output gradient shifted in time (the phase's J
    temporal taps, channels-last). Under `_WGRAD_CHANNEL_MAJOR_BELOW` input channels the input
    is transposed once to (C, N, T, H, W), so that every tap's window is a copy of whole rows,
    not of C-element pieces (3x faster for conv1's 3 channels); from it up both operands stay
    channels-last and XLA:CPU's matmul contracts their major axis without transposing copies."""
    n, t, h, w, c = x.shape
    kt, kh, kw, _, cout = k_shape
    st, sh, sw = strides
    to, ho, wo = g.shape[1:4]
    acc = jnp.promote_types(x.dtype, jnp.float32)
    major = c < _WGRAD_CHANNEL_MAJOR_BELOW
    if major:
        xp = jnp.pad(jnp.moveaxis(x, -1, 0), ((0, 0), (0, 0), (0, 0), padding[1], padding[2]))
    else:
        xp = jnp.pad(x, ((0, 0), (0, 0), padding[1], padding[2], (0, 0)))
    taps_hw = [(b, e) for b in range(kh) for e in range(kw)]
    group = max(1, min(len(taps_hw), _WGRAD_ROWS // c))
    grads: list[jax.Array | None] = [None] * kt
    for phase in _phases(t, kt, st, padding[0][0], to):
        time_sl = slice(phase.first, phase.first + st * (phase.frames - 1) + 1, st)
        frames = xp[:, :, time_sl] if major else xp[:, time_sl]
        gs = _shifted(g, phase).reshape(-1, len(phase.taps) * cout)  # (M, J * O)
        blocks = []
        for q in range(0, len(taps_hw), group):
            taps = taps_hw[q : q + group]
            windows = [
                (slice(b, b + sh * (ho - 1) + 1, sh), slice(e, e + sw * (wo - 1) + 1, sw))
                for b, e in taps]
            if major:  # (taps, C, N, frames, Ho, Wo) -> (taps * C, M)
                lhs = jnp.stack([frames[..., hs, ws] for hs, ws in windows])
                lhs, dims = lhs.reshape(len(taps) * c, -1), (((1,), (0,)), ((), ()))
            else:  # (N, frames, Ho, Wo, taps * C) -> (M, taps * C)
                lhs = jnp.concatenate([frames[:, :, hs, ws] for hs, ws in windows], axis=-1)
                lhs, dims = lhs.reshape(-1, len(taps) * c), (((0,), (0,)), ((), ()))
            blocks.append(lax.dot_general(lhs, gs, dims, precision=precision,
                                          preferred_element_type=acc))
        d = jnp.concatenate(blocks, axis=0).reshape(kh, kw, c, len(phase.taps), cout)
        for j, a in enumerate(phase.taps):
            grads[a] = d[:, :, :, j, :]
    zeros = jnp.zeros((kh, kw, c, cout), acc)
    return jnp.stack([zeros if d is None else d for d in grads])


def _clips_per_step(n: int, per_clip_bytes: int) -> int:
    """Clips per step of the weight gradient's loop: the largest divisor of `n` whose clips'
    im2col fits in `_WGRAD_CHUNK_BYTES`, at least 1 (read when traced, so that tests and
    benchmarks can change it)."""
    fit = max(1, _WGRAD_CHUNK_BYTES // max(1, per_clip_bytes))
    return max(d for d in range(1, min(n, fit) + 1) if n % d == 0)


def _weight_grad(
    x: jax.Array, g: jax.Array, k_shape: tuple[int, ...], strides: Strides, padding: Padding,
    precision: Any = None,
) -> jax.Array:
    """dL/dk (float32; float64 for float64 input) by `_weight_grad_clips`. Under
    `_WGRAD_CHANNEL_MAJOR_BELOW` input channels, summed over the batch in a loop (`lax.scan`) of
    `_clips_per_step` clips a step, so that the im2col is a cache-sized buffer that every step
    reuses (or one clip's); from it up in one pass over the batch, where a loop measured slower
    (R3D's 64-512-channel convs at the paper's size: one clip's im2col is 10-350 MB, no reuse,
    and the loop loses the overlap of the batch's ops)."""
    n = x.shape[0]
    kt, kh, kw, c, cout = k_shape
    per_clip = 4 * g.shape[1] * g.shape[2] * g.shape[3] * kh * kw * c
    clips = _clips_per_step(n, per_clip) if c < _WGRAD_CHANNEL_MAJOR_BELOW else n
    if clips == n:
        return _weight_grad_clips(x, g, k_shape, strides, padding, precision)

    def step(acc: jax.Array, xg: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        return acc + _weight_grad_clips(*xg, k_shape, strides, padding, precision), None

    xs = x.reshape(n // clips, clips, *x.shape[1:])
    gs = g.reshape(n // clips, clips, *g.shape[1:])
    acc = jnp.zeros(k_shape, jnp.promote_types(x.dtype, jnp.float32))
    return lax.scan(step, acc, (xs, gs))[0]


def _input_grad_col2im(
    g: jax.Array, k: jax.Array, x_shape: tuple[int, ...], strides: Strides, padding: Padding,
    precision: Any = None,
) -> jax.Array:
    """dL/dx of a strided conv: per temporal phase, (M, J * O) @ (J * O, kh * kw * C), then
    each spatial tap's slice added at its strided position (col2im, one fused sum of pads)."""
    n, t, h, w, c = x_shape
    kt, kh, kw, _, cout = k.shape
    st, sh, sw = strides
    to, ho, wo = g.shape[1:4]
    (ph0, ph1), (pw0, pw1) = padding[1], padding[2]
    hp, wp = h + ph0 + ph1, w + pw0 + pw1
    zero = jnp.zeros((), g.dtype)
    dx = None
    for phase in _phases(t, kt, st, padding[0][0], to):
        taps, m = phase.taps, phase.frames
        gs = _shifted(g, phase).reshape(-1, len(taps) * cout)
        kernel = jnp.transpose(jnp.stack([k[a] for a in taps]), (0, 4, 1, 2, 3))
        z = lax.dot(gs, kernel.reshape(len(taps) * cout, kh * kw * c), precision=precision)
        z = z.reshape(n, m, ho, wo, kh, kw, c)
        acc = None
        for b in range(kh):
            for e in range(kw):
                piece = lax.pad(z[:, :, :, :, b, e, :], zero, [
                    (0, 0, 0), (0, 0, 0), (b, hp - b - sh * (ho - 1) - 1, sh - 1),
                    (e, wp - e - sw * (wo - 1) - 1, sw - 1), (0, 0, 0)])
                acc = piece if acc is None else acc + piece
        acc = acc[:, :, ph0 : ph0 + h, pw0 : pw0 + w]
        last = phase.first + st * (m - 1)
        piece = lax.pad(acc, zero, [(0, 0, 0), (phase.first, t - 1 - last, st - 1),
                                    (0, 0, 0), (0, 0, 0), (0, 0, 0)])
        dx = piece if dx is None else dx + piece
    return jnp.zeros(x_shape, g.dtype) if dx is None else dx


def _input_grad(
    g: jax.Array, k: jax.Array, x_shape: tuple[int, ...], strides: Strides, padding: Padding,
    precision: Any = None,
) -> jax.Array:
    """dL/dx: a stride-1 conv's is the forward formulation on `g` with the kernel flipped and
    its channels swapped (padding k - 1 - p); strided convs go through `_input_grad_col2im`."""
    flipped_pad = tuple((size - 1 - p0, size - 1 - p1)
                        for size, (p0, p1) in zip(k.shape[:3], padding, strict=True))
    if strides == (1, 1, 1) and min(min(p) for p in flipped_pad) >= 0:
        kernel = jnp.swapaxes(k[::-1, ::-1, ::-1], 3, 4)
        return _conv_by_phases(g, kernel, strides, flipped_pad, precision)  # type: ignore[arg-type]
    return _input_grad_col2im(g, k, x_shape, strides, padding, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv2d_mm(x: jax.Array, k: jax.Array, strides: Strides, padding: Padding,
               precision: Any) -> jax.Array:
    return _conv_by_phases(x, k, strides, padding, precision)


def _conv2d_mm_fwd(x: jax.Array, k: jax.Array, strides: Strides, padding: Padding,
                   precision: Any) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _conv_by_phases(x, k, strides, padding, precision), (x, k)


def _conv2d_mm_bwd(strides: Strides, padding: Padding, precision: Any,
                   residuals: tuple[jax.Array, jax.Array], g: jax.Array,
                   ) -> tuple[jax.Array, jax.Array]:
    x, k = residuals
    g = g.astype(x.dtype)
    dx = _input_grad(g, k, x.shape, strides, padding, precision)
    dk = _weight_grad(x, g, k.shape, strides, padding, precision)
    return dx.astype(x.dtype), dk.astype(k.dtype)


_conv2d_mm.defvjp(_conv2d_mm_fwd, _conv2d_mm_bwd)


def _pointwise(x: jax.Array, k: jax.Array, strides: Strides, padding: Padding,
               precision: Any, preferred_element_type: Any) -> jax.Array:
    """A 1x1x1 conv: (padding,) a strided slice and a matrix product over the channels; JAX's
    own gradients of these are a matmul and an interior pad, and a matmul."""
    if any(p != (0, 0) for p in padding):
        x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    if strides != (1, 1, 1):
        x = x[:, :: strides[0], :: strides[1], :: strides[2]]
    return lax.dot_general(x, k[0, 0, 0], (((4,), (0,)), ((), ())), precision=precision,
                           preferred_element_type=preferred_element_type)


def conv3d_conv2d_mm(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
    **unused: Any,
) -> jax.Array:
    """Drop-in for `lax.conv_general_dilated` (NDHWC, DHWIO, explicit padding, no dilation or
    groups) with the fast CPU forward and backward passes described in the module docstring."""
    _check_supported(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                     feature_group_count, "conv3d_conv2d_mm")
    strides: Strides = tuple(int(s) for s in window_strides)  # type: ignore[assignment]
    pads: Padding = tuple((int(p0), int(p1)) for p0, p1 in padding)  # type: ignore[assignment]
    if rhs.shape[:3] == (1, 1, 1):
        return _pointwise(lhs, rhs, strides, pads, precision, preferred_element_type)
    out = _conv2d_mm(lhs, rhs, strides, pads, precision)
    return out if preferred_element_type is None else out.astype(preferred_element_type)


# ----------------------------------------------------------------------------- choice


_IMPL_FNS = {
    "native": lax.conv_general_dilated,
    "conv2d": conv3d_via_conv2d,
    "conv2d_mm": conv3d_conv2d_mm,
}


def auto_impl(backend: str | None = None) -> str:
    """The implementation 'auto' stands for on `backend` (default: JAX's default backend).

    CPU: 'conv2d_mm', the fastest measured there (benchmarks/RESULTS.md). GPU and TPU: 'native'
    (cuDNN / the TPU compiler handle 3D convolutions directly; `benchmarks/gpu_check.sh`
    measures the alternatives on a GPU).
    """
    return "conv2d_mm" if (backend or jax.default_backend()) == "cpu" else "native"


def resolve(conv_impl: str) -> Any:
    """The conv function for `conv_impl` (one of `CONV_IMPLS`; 'auto' per `auto_impl`)."""
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
    return _IMPL_FNS[auto_impl() if conv_impl == "auto" else conv_impl]
