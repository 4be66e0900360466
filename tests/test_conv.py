"""The 2D formulations of 3D convolution equal XLA's native one, in values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from vcp_jax import conv

LAYOUT = ("NDHWC", "DHWIO", "NDHWC")
IMPLS = {"conv2d": conv.conv3d_via_conv2d, "conv2d_mm": conv.conv3d_conv2d_mm}

CASES = [  # kernel, strides, padding: every conv shape the three backbones use
    ((3, 3, 3), (1, 1, 1), (1, 1, 1)),
    ((3, 7, 7), (1, 2, 2), (1, 3, 3)),
    ((3, 3, 3), (2, 2, 2), (1, 1, 1)),
    ((1, 1, 1), (2, 2, 2), (0, 0, 0)),
    ((1, 3, 3), (1, 2, 2), (0, 1, 1)),
    ((3, 1, 1), (2, 1, 1), (1, 0, 0)),
    ((1, 7, 7), (1, 2, 2), (0, 3, 3)),  # R(2+1)D's conv1, spatial half
    ((3, 1, 1), (1, 1, 1), (1, 0, 0)),  # and temporal half
]
# Beyond the backbones: no padding, odd strides, a kernel longer than the temporal stride's
# phases, and asymmetric padding (the code paths for all-padding phases and negative flips).
EXTRA_CASES = [
    ((3, 3, 3), (2, 2, 2), (0, 0, 0)),
    ((2, 3, 2), (3, 1, 2), (1, 0, 1)),
    ((4, 3, 3), (2, 3, 1), (2, 1, 0)),
]


def _pair(impl, kernel, strides, padding, frames, dtype=jnp.float32):
    key_x, key_k = jax.random.split(jax.random.PRNGKey(frames))
    x = jax.random.normal(key_x, (2, frames, 9, 10, 3), dtype)
    k = jax.random.normal(key_k, (*kernel, 3, 5), dtype)
    pads = [(p, p) for p in padding] if isinstance(padding[0], int) else list(padding)

    def native(x, k):
        return lax.conv_general_dilated(x, k, strides, pads, dimension_numbers=LAYOUT,
                                        precision=lax.Precision.HIGHEST)

    def ours(x, k):
        return IMPLS[impl](x, k, strides, pads, dimension_numbers=LAYOUT,
                           precision=lax.Precision.HIGHEST)

    return x, k, native, ours


def _assert_same(impl, kernel, strides, padding, frames) -> None:
    x, k, native, ours = _pair(impl, kernel, strides, padding, frames)

    @jax.jit  # one compilation per case: eager gradients would compile op by op
    def values_and_grads(x, k):
        # A non-linear loss, so the cotangent differs per output element.
        return [(f(x, k), jax.grad(lambda x, k, f=f: jnp.sum(jnp.sin(f(x, k))), (0, 1))(x, k))
                for f in (ours, native)]

    (y, (dx, dk)), (y_ref, (dx_ref, dk_ref)) = values_and_grads(x, k)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dk, dk_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("kernel, strides, padding", CASES)
def test_matches_native(impl, kernel, strides, padding) -> None:
    _assert_same(impl, kernel, strides, padding, frames=6)


@pytest.mark.parametrize("frames", [1, 2])
@pytest.mark.parametrize("kernel, strides, padding", [CASES[0], CASES[2], CASES[5]])
def test_conv2d_mm_short_clips(frames, kernel, strides, padding) -> None:
    """R3D's last stages see 2-4 frames: taps and phases that land on padding only."""
    _assert_same("conv2d_mm", kernel, strides, padding, frames)


@pytest.mark.parametrize("kernel, strides, padding", EXTRA_CASES)
def test_conv2d_mm_general_shapes(kernel, strides, padding) -> None:
    _assert_same("conv2d_mm", kernel, strides, padding, frames=7)


def test_conv2d_mm_asymmetric_padding() -> None:
    _assert_same("conv2d_mm", (3, 3, 3), (1, 1, 1), ((2, 0), (0, 1), (1, 2)), frames=5)
    _assert_same("conv2d_mm", (3, 3, 3), (2, 2, 2), ((0, 2), (1, 0), (2, 1)), frames=5)


def test_conv2d_mm_bfloat16_dtypes() -> None:
    """bfloat16 in, bfloat16 out and gradients, close to float32's (the model's mixed mode)."""
    x, k, native, ours = _pair("conv2d_mm", (3, 3, 3), (2, 2, 2), (1, 1, 1), 6, jnp.bfloat16)
    y = jax.jit(ours)(x, k)
    assert y.dtype == jnp.bfloat16
    dx, dk = jax.jit(jax.grad(lambda x, k: jnp.sum(ours(x, k).astype(jnp.float32) ** 2),
                              (0, 1)))(x, k)
    assert dx.dtype == dk.dtype == jnp.bfloat16
    ref = jax.jit(native)(x.astype(jnp.float32), k.astype(jnp.float32))
    np.testing.assert_allclose(y.astype(jnp.float32), ref, rtol=0.05, atol=0.3)


def test_rejects_what_it_does_not_implement() -> None:
    x, k = jnp.zeros((1, 4, 6, 6, 3)), jnp.zeros((3, 3, 3, 3, 2))
    pads = [(1, 1)] * 3
    for fn in IMPLS.values():
        with pytest.raises(NotImplementedError, match="dilation"):
            fn(x, k, (1, 1, 1), pads, rhs_dilation=(2, 2, 2))
        with pytest.raises(NotImplementedError, match="padding"):
            fn(x, k, (1, 1, 1), "SAME")
        with pytest.raises(NotImplementedError, match="layout"):
            fn(x, k, (1, 1, 1), pads, dimension_numbers=("NCDHW", "OIDHW", "NCDHW"))
    # nnx.Conv passes its dimension numbers as a ConvDimensionNumbers: accepted.
    dn = lax.conv_dimension_numbers(x.shape, k.shape, LAYOUT)
    assert conv.conv3d_conv2d_mm(x, k, (1, 1, 1), pads, dimension_numbers=dn).shape == (
        1, 4, 6, 6, 2)


def test_resolve() -> None:
    assert conv.resolve("native") is lax.conv_general_dilated
    assert conv.resolve("conv2d") is conv.conv3d_via_conv2d
    assert conv.resolve("conv2d_mm") is conv.conv3d_conv2d_mm
    assert conv.auto_impl("cpu") == "conv2d_mm"
    assert conv.auto_impl("gpu") == conv.auto_impl("tpu") == "native"
    assert conv.resolve("auto") is conv.resolve(conv.auto_impl())
    with pytest.raises(ValueError, match="conv_impl"):
        conv.resolve("winograd")
