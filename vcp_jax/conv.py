"""3D convolution as one 2D convolution plus a temporal shift-and-sum, for fast CPU runs.

XLA:CPU lowers 3D convolutions (and their gradients) to a slow generic loop, while 2D ones use
its optimised kernels. A `(kt, kh, kw)` conv equals a `(kh, kw)` conv of every frame with the kt
temporal taps stacked as output channels, then a sum over the taps shifted in time. Same
parameters, same result (to float rounding); measured 3x faster forward on the 2-core CPU for
16-channel 56x56 clips. Accelerators keep XLA's native 3D convolution (`conv_impl='native'`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLS = ("native", "conv2d", "auto")


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
    if any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))) or (
        feature_group_count != 1
    ):
        raise NotImplementedError("conv3d_via_conv2d supports neither dilation nor groups")
    if isinstance(padding, str):
        raise NotImplementedError("conv3d_via_conv2d needs explicit padding")
    batch, frames, height, width, channels = lhs.shape
    kt, kh, kw, cin, cout = rhs.shape
    assert cin == channels, (lhs.shape, rhs.shape)
    st, sh, sw = window_strides
    (pt0, pt1), pad_h, pad_w = padding
    # (kh, kw, cin, kt * cout): every temporal tap becomes a group of output channels.
    kernel = jnp.moveaxis(rhs, 0, 3).reshape(kh, kw, cin, kt * cout)
    y = lax.conv_general_dilated(
        lhs.reshape(batch * frames, height, width, channels),
        kernel,
        (sh, sw),
        [tuple(pad_h), tuple(pad_w)],
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
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


def resolve(conv_impl: str) -> Any:
    """The conv function for `conv_impl`: 'auto' picks conv2d on CPU, native elsewhere."""
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
    if conv_impl == "auto":
        conv_impl = "conv2d" if jax.default_backend() == "cpu" else "native"
    return conv3d_via_conv2d if conv_impl == "conv2d" else lax.conv_general_dilated
