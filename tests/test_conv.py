"""The conv2d formulation of 3D convolution equals XLA's native one, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from vcp_jax import conv

CASES = [  # kernel, strides, padding: every conv shape the three backbones use
    ((3, 3, 3), (1, 1, 1), (1, 1, 1)),
    ((3, 7, 7), (1, 2, 2), (1, 3, 3)),
    ((3, 3, 3), (2, 2, 2), (1, 1, 1)),
    ((1, 1, 1), (2, 2, 2), (0, 0, 0)),
    ((1, 3, 3), (1, 2, 2), (0, 1, 1)),
    ((3, 1, 1), (2, 1, 1), (1, 0, 0)),
]


@pytest.mark.parametrize("kernel, strides, padding", CASES)
def test_matches_native(kernel, strides, padding) -> None:
    key_x, key_k = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(key_x, (2, 6, 9, 10, 3))
    k = jax.random.normal(key_k, (*kernel, 3, 5))
    pads = [(p, p) for p in padding]
    dn = ("NDHWC", "DHWIO", "NDHWC")

    def native(x, k):
        return lax.conv_general_dilated(x, k, strides, pads, dimension_numbers=dn)

    def ours(x, k):
        return conv.conv3d_via_conv2d(x, k, strides, pads)

    np.testing.assert_allclose(ours(x, k), native(x, k), rtol=1e-4, atol=1e-4)
    grads = [jax.grad(lambda x, k, f=f: jnp.sum(f(x, k) ** 2), argnums=(0, 1))(x, k)
             for f in (ours, native)]
    for a, b in zip(*grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


def test_resolve() -> None:
    assert conv.resolve("native") is lax.conv_general_dilated
    assert conv.resolve("conv2d") is conv.conv3d_via_conv2d
    with pytest.raises(ValueError, match="conv_impl"):
        conv.resolve("winograd")
