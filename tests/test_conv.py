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


# The weight gradient's shapes: conv1's 7x7 on 3 channels with spatial stride 2, a strided 3x3x3,
# kernels of 1 in time or space (R(2+1)D's halves), odd sizes, asymmetric padding.
WGRAD_CASES = [
    ((3, 7, 7), (1, 2, 2), ((1, 1), (3, 3), (3, 3)), 3),
    ((3, 3, 3), (2, 2, 2), ((1, 1), (1, 1), (1, 1)), 3),
    ((1, 7, 7), (1, 2, 2), ((0, 0), (3, 3), (3, 3)), 2),
    ((3, 1, 1), (2, 1, 1), ((1, 1), (0, 0), (0, 0)), 4),
    ((7, 1, 1), (1, 1, 1), ((3, 3), (0, 0), (0, 0)), 3),
    ((2, 3, 2), (3, 1, 2), ((1, 0), (0, 2), (2, 1)), 5),
]


@pytest.mark.parametrize("clips", [1, 2, 6])  # clips (of 6) a step of the loop; 6: no loop
@pytest.mark.parametrize("kernel, strides, padding, cin", WGRAD_CASES)
def test_weight_grad_equals_native_grad_float64(kernel, strides, padding, cin, clips,
                                                monkeypatch) -> None:
    """conv2d_mm's weight gradient, in its loop over clips or in one pass, channel-major or
    channels-last, equals the gradient of XLA's native conv to float64 rounding."""
    with jax.enable_x64(True):
        kx, kk, kg = jax.random.split(jax.random.PRNGKey(7), 3)
        x = jax.random.normal(kx, (6, 5, 11, 9, cin), jnp.float64)
        k = jax.random.normal(kk, (*kernel, cin, 4), jnp.float64)
        y, vjp = jax.vjp(lambda k: lax.conv_general_dilated(
            x, k, strides, padding, dimension_numbers=LAYOUT,
            precision=lax.Precision.HIGHEST), k)
        g = jax.random.normal(kg, y.shape, jnp.float64)
        per_clip = 4 * int(np.prod(y.shape[1:4])) * kernel[1] * kernel[2] * cin
        monkeypatch.setattr(conv, "_WGRAD_CHUNK_BYTES", clips * per_clip)
        if cin == 2:  # also the channels-last im2col (in one pass), on one case
            monkeypatch.setattr(conv, "_WGRAD_CHANNEL_MAJOR_BELOW", 2)
        (dk_ref,) = vjp(g)
        dk = jax.jit(conv._weight_grad, static_argnums=(2, 3, 4))(x, g, k.shape, strides,
                                                                   padding)
        assert dk.dtype == jnp.float64
        np.testing.assert_allclose(dk, dk_ref, rtol=1e-10, atol=1e-10)


def test_weight_grad_loop_in_the_vjp(monkeypatch) -> None:
    """The loop over clips, inside the custom VJP under jit, float32: as autodiff of native."""
    for case, one_clip_bytes in [(CASES[1], 88_200), (CASES[2], 8_100)]:
        monkeypatch.setattr(conv, "_WGRAD_CHUNK_BYTES", one_clip_bytes)  # of 2: one a step
        x, k, _, ours = _pair("conv2d_mm", *case, frames=6)
        loss = lambda k, x=x, f=ours: jnp.sum(f(x, k))  # noqa: E731
        assert "scan" in str(jax.make_jaxpr(jax.grad(loss))(k))
        _assert_same("conv2d_mm", *case, frames=6)


def test_clips_per_step(monkeypatch) -> None:
    monkeypatch.setattr(conv, "_WGRAD_CHUNK_BYTES", 1000)
    assert conv._clips_per_step(48, 100) == 8  # 10 fit; the largest divisor of 48 below
    assert conv._clips_per_step(7, 100) == 7
    assert conv._clips_per_step(7, 200) == 1  # 5 fit, 7 is prime
    assert conv._clips_per_step(6, 5000) == 1  # not even one fits: one a step
