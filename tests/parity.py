"""What the parity tests (tests/test_torch_parity.py, tests/test_vcop_parity.py) share: a
randomised reference network's weights and BatchNorm statistics moved into vcp-jax, one SGD step
on each side, and the two compared. Needs PyTorch (import it after `pytest.importorskip`).

The reference is `tests.torch_reference` (PyTorch only); this module is the bridge to vcp-jax.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from configs import default as default_config
from vcp_jax import backbone as backbone_lib
from vcp_jax import convert_torch as ct
from vcp_jax import trainer, vcop

FAST_COMPILE = {"xla_backend_optimization_level": 0}
LR = 0.01  # [U]'s and [V]'s
WIDTH = 4
TUPLES = (4, 3, 3, 8, 16, 16)  # (B, N, C, T, H, W): the smallest clips every arch takes
# Worst relative errors allowed after a step, in float32 (vcp-jax) and float64 (both sides; so
# that any difference in semantics would show).
F32_TOL = {"logits": 1e-4, "loss": 1e-5, "grads": 1e-3, "zero_grads": 1e-5, "params": 3e-4,
           "batch_stats": 1e-5}
F64_TOL = {"logits": 1e-8, "loss": 1e-8, "grads": 1e-8, "zero_grads": 1e-12, "params": 1e-8,
           "batch_stats": 1e-8}


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Autouse in the modules that import it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine's cores are shared; the sizes here are tiny
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- arrays


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected|."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def ndhwc(x: torch.Tensor) -> np.ndarray:
    """NC...DHW -> N...DHWC: `(B, C, T, H, W)` or `(B, N, C, T, H, W)`."""
    return np.moveaxis(x.detach().numpy(), -4, -1).copy()


def numpy_of(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, np.ndarray]:
    """Copies (never views: torch updates its tensors in place)."""
    return {k: v.detach().numpy().copy() for k, v in named}


def as_jax_paths(arch: str, width: int, named: dict[str, np.ndarray], collection: str,
                 prefix: str = "base_network.") -> dict[str, np.ndarray]:
    """A reference's `{torch name: array}` as vcp-jax's flat paths: the backbone (its keys
    behind `prefix`) by the converter's key table, a wrapper's head `fc*.weight` ->
    `head/fc*/kernel` (transposed)."""
    out = {f"{backbone_lib.BACKBONE}/{e.path}": ct.to_jax_layout(named[prefix + key])
           for key, e in ct.key_table(arch, width).items() if e.collection == collection}
    if collection == "params":
        for key, value in named.items():
            if key.split(".")[0] in ct.WRAPPER_HEADS:
                module, leaf = key.split(".")
                out[f"head/{module}/{'kernel' if leaf == 'weight' else 'bias'}"] = (
                    value.T if leaf == "weight" else value)
    return out


# ----------------------------------------------------------------------------- weights


def load_into(model: nnx.Module, params: dict, batch_stats: dict, dtype) -> None:
    """Sets `model`'s variables (an abstract model becomes a real one)."""
    for kind, values in ((nnx.Param, params), (nnx.BatchStat, batch_stats)):
        state = nnx.state(model, kind)
        nnx.replace_by_pure_dict(state, jax.tree.map(lambda v: jnp.asarray(v, dtype), values))
        nnx.update(model, state)


def load_reference(model: nnx.Module, arch: str, net: torch.nn.Module, dtype) -> ct.Converted:
    """Puts the reference `net`'s weights and BatchNorm statistics into `model` (abstract, from
    `nnx.eval_shape`), converted as a checkpoint is (backbone and head), in `dtype`."""
    converted = ct.convert_state_dict(arch, net.state_dict())
    load_into(model, *converted.model_state(), dtype)
    return converted


def train_config(arch: str, **model_overrides):
    """The default pretraining config (so `bn_stats` is the default), shrunk and at [U]'s lr."""
    config = default_config.get_config(arch)
    config.model.width = WIDTH
    config.model.conv_impl = "native"  # compiles faster than conv2d; both are tested for parity
    config.optimizer.learning_rate = LR
    config.optimizer.scale_with_batch = False
    for key, value in model_overrides.items():
        config.model[key] = value
    return config


# ----------------------------------------------------------------------------- one step


@functools.partial(jax.jit, static_argnums=(0, 1), compiler_options=FAST_COMPILE)
def jax_step(pretext: str, ctx: trainer.StepContext, state: trainer.TrainState,
             inputs: jax.Array, labels: jax.Array, dropout_keys: jax.Array | None = None):
    """The training update on given inputs and labels (VCOP: `vcop.loss_and_logits`, the loss of
    `vcop.train_step`; otherwise pretraining's and fine-tuning's cross-entropy of
    `model(inputs)`), plus the gradients it applied."""

    def loss_fn(model: nnx.Module) -> tuple[jax.Array, jax.Array]:
        if pretext == "vcop":
            return vcop.loss_and_logits(model, inputs, labels, dropout_keys)
        logits = model(inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

    def grad_fn(params: nnx.State) -> jax.Array:
        return loss_fn(nnx.merge(ctx.train_graphdef, params, state.batch_stats, copy=True))[0]

    new_state, loss, logits = trainer.update(state, ctx, loss_fn)
    return new_state, loss, logits, jax.grad(grad_fn)(state.params)


def torch_step(net: torch.nn.Module, optimizer: torch.optim.Optimizer, tuples: torch.Tensor,
               labels: torch.Tensor) -> tuple[float, np.ndarray, dict[str, np.ndarray]]:
    """[U]'s / [V]'s `train()` body: forward, cross-entropy, backward, `optimizer.step()`."""
    optimizer.zero_grad()
    logits = net(tuples)
    loss = torch.nn.functional.cross_entropy(logits, labels)
    loss.backward()
    grads = numpy_of((k, p.grad) for k, p in net.named_parameters())
    optimizer.step()
    return loss.item(), logits.detach().numpy(), grads


def state_errors(arch: str, net: torch.nn.Module, state: trainer.TrainState,
                 grads: dict[str, np.ndarray] | None = None,
                 j_grads: nnx.State | None = None) -> dict[str, float]:
    """Worst relative errors of the gradients (when given), the parameters and the BatchNorm
    statistics of a reference wrapper (`base_network.*` and its head) and vcp-jax's twin."""
    errors = {}
    if grads is not None:
        expected = as_jax_paths(arch, WIDTH, grads, "params")
        actual = backbone_lib.flatten(j_grads.to_pure_dict())
        assert set(actual) == set(expected)
        # Relative to each tensor's largest gradient, or to 1e-3 of the model's largest for
        # tensors whose gradient is (nearly) zero and so rounding noise on both sides. C3D's
        # conv biases feed BatchNorm, which subtracts them again: their gradient is 0 in exact
        # arithmetic, which is checked on its own.
        zero = {k for k in expected if arch == "c3d" and k.endswith("conv/bias")}
        scale = max(np.abs(g).max() for g in expected.values())
        errors["grads"] = max(np.abs(actual[k] - g).max() / max(np.abs(g).max(), 1e-3 * scale)
                              for k, g in expected.items() if k not in zero)
        errors["zero_grads"] = max(
            (max(np.abs(actual[k]).max(), np.abs(expected[k]).max()) / scale for k in zero),
            default=0.0)
    expected = as_jax_paths(arch, WIDTH, numpy_of(net.named_parameters()), "params")
    actual = backbone_lib.flatten(state.params.to_pure_dict())
    assert set(actual) == set(expected)
    errors["params"] = max(relative_error(actual[k], v) for k, v in expected.items())
    expected = as_jax_paths(arch, WIDTH, numpy_of(net.named_buffers()), "batch_stats")
    actual = backbone_lib.flatten(state.batch_stats.to_pure_dict())
    assert set(actual) == set(expected)
    errors["batch_stats"] = max(relative_error(actual[k], v) for k, v in expected.items())
    return errors
