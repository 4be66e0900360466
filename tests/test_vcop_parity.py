"""VCOP and residual-frame input against the reference PyTorch networks (tests/torch_reference.py:
[V]'s `VCOPN`, [U]'s `VCOPN(res=True)` and `VCPN(modality='res')`) with the same weights.

Random weights and random BatchNorm statistics, copied across with `vcp_jax.convert_torch`
(backbone and head, as a VCOP checkpoint converts), training mode, SGD as [U]/[V] (momentum 0.9,
weight decay 5e-4): logits, loss, gradients, BatchNorm running statistics (per clip position) and
the parameters after the step, in float32 (one step, each backbone) and float64 (two steps, so
momentum acts). Dropout is the one random part: the reference's `nn.Dropout` is given the masks
vcp-jax draws, so both sides drop the same units.

The reference always runs in float64 here (weights and inputs drawn in float32, so both sides
start from the same values): vcp-jax in float32 is compared with the exact result. PyTorch's own
float32 step is the noisier side on these tiny tuples: for VCOP on R3D it differs from its
float64 step by up to 8e-2 of a tensor's largest gradient (BatchNorm over few values amplifies
rounding), where vcp-jax float32 is within 2e-5 of it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import default as default_config
from vcp_jax import backbone as backbone_lib
from vcp_jax import convert_torch as ct
from vcp_jax import modality as modality_lib
from vcp_jax import models, trainer, vcop

torch = pytest.importorskip("torch")
from tests import torch_reference as ref  # noqa: E402 - needs torch

_FAST_COMPILE = {"xla_backend_optimization_level": 0}
LR = 0.01
WIDTH = 4
TUPLES = (4, 3, 3, 8, 16, 16)  # (B, N, C, T, H, W): the smallest clips every arch takes
F32_TOL = {"logits": 1e-4, "loss": 1e-5, "grads": 1e-3, "zero_grads": 1e-5, "params": 3e-4,
           "batch_stats": 1e-5}
F64_TOL = {"logits": 1e-8, "loss": 1e-8, "grads": 1e-8, "zero_grads": 1e-12, "params": 1e-8,
           "batch_stats": 1e-8}


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine's cores are shared; the sizes here are tiny
    yield
    torch.set_num_threads(threads)


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected|."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def ndhwc(x: torch.Tensor) -> np.ndarray:
    """`(B, N, C, T, H, W)` -> `(B, N, T, H, W, C)`."""
    return np.moveaxis(x.detach().numpy(), -4, -1).copy()


def numpy_of(named) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in named}


def as_jax_paths(arch: str, named: dict[str, np.ndarray], collection: str
                 ) -> dict[str, np.ndarray]:
    """A reference wrapper's `{torch name: array}` as vcp-jax's flat paths: the backbone by the
    converter's key table, the head `fc*.weight` -> `head/fc*/kernel` (transposed)."""
    out = {f"{backbone_lib.BACKBONE}/{e.path}": ct.to_jax_layout(named["base_network." + key])
           for key, e in ct.key_table(arch, WIDTH).items() if e.collection == collection}
    if collection == "params":
        for key, value in named.items():
            if key.split(".")[0] in ct.WRAPPER_HEADS:
                module, leaf = key.split(".")
                out[f"head/{module}/{'kernel' if leaf == 'weight' else 'bias'}"] = (
                    value.T if leaf == "weight" else value)
    return out


class FixedDropout(torch.nn.Module):
    """`nn.Dropout(p=0.5)` with given keep-masks: `x * mask / (1 - p)`, as PyTorch computes it."""

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask.to(x.dtype) * 2.0


def reference_net(pretext: str, arch: str, res: bool, seed: int = 0) -> torch.nn.Module:
    """The randomised reference model in training mode (float32 weights; `.double()` them)."""
    generator = torch.Generator().manual_seed(seed)
    base = ref.create_backbone(arch, WIDTH)
    if pretext == "vcop":
        net = ref.VCOPN(base, res=res)
        net = ref.randomize_(net, generator).train()
        net.dropout = FixedDropout()
    else:
        net = ref.randomize_(ref.VCPN(base, modality="res" if res else "rgb"), generator).train()
    return net


def load_into(model: nnx.Module, params: dict, batch_stats: dict, dtype) -> None:
    """Sets `model`'s variables (an abstract model becomes a real one)."""
    for kind, values in ((nnx.Param, params), (nnx.BatchStat, batch_stats)):
        state = nnx.state(model, kind)
        nnx.replace_by_pure_dict(state, jax.tree.map(lambda v: jnp.asarray(v, dtype), values))
        nnx.update(model, state)


def train_config(arch: str):
    config = default_config.get_config(arch)
    config.model.width = WIDTH
    config.model.conv_impl = "native"
    config.optimizer.learning_rate = LR
    config.optimizer.scale_with_batch = False
    return config


def jax_twin(pretext: str, arch: str, net: torch.nn.Module, dtype=jnp.float32):
    """vcp-jax's VCOP / VCP model with `net`'s weights, converted as a checkpoint is (backbone and
    head), and its train state."""

    def build() -> nnx.Module:
        backbone = models.create_backbone(arch, rngs=nnx.Rngs(0), width=WIDTH, dtype=dtype,
                                          conv_impl="native")
        if pretext == "vcop":
            return vcop.VCOPModel(backbone, rngs=nnx.Rngs(1), dtype=dtype)
        return models.VCPModel(backbone, rngs=nnx.Rngs(1), dtype=dtype)

    model = nnx.eval_shape(build)
    converted = ct.convert_state_dict(arch, net.state_dict())
    assert converted.pretext == pretext and converted.dropped == ()
    load_into(model, *converted.model_state(), dtype)
    return trainer.create_train_state(model, train_config(arch))


@functools.partial(jax.jit, static_argnums=(0, 1), compiler_options=_FAST_COMPILE)
def _jax_step(pretext: str, ctx: trainer.StepContext, state: trainer.TrainState,
              inputs: jax.Array, labels: jax.Array, dropout_keys: jax.Array):
    """The training update on given inputs and labels (VCOP: `vcop.loss_and_logits`, the loss of
    `vcop.train_step`; VCP: pretraining's), plus the gradients it applied."""

    def loss_fn(model: nnx.Module) -> tuple[jax.Array, jax.Array]:
        if pretext == "vcop":
            return vcop.loss_and_logits(model, inputs, labels, dropout_keys)
        logits = model(inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

    def grad_fn(params: nnx.State) -> jax.Array:
        return loss_fn(nnx.merge(ctx.train_graphdef, params, state.batch_stats, copy=True))[0]

    new_state, loss, logits = trainer.update(state, ctx, loss_fn)
    return new_state, loss, logits, jax.grad(grad_fn)(state.params)


def torch_step(net, optimizer, tuples, labels):
    """[V]'s / [U]'s `train()` body: forward, cross-entropy, backward, `optimizer.step()`."""
    optimizer.zero_grad()
    logits = net(tuples)
    loss = torch.nn.functional.cross_entropy(logits, labels)
    loss.backward()
    grads = numpy_of((k, p.grad) for k, p in net.named_parameters())
    optimizer.step()
    return loss.item(), logits.detach().numpy(), grads


def state_errors(arch, net, state, grads=None, j_grads=None) -> dict[str, float]:
    """Worst relative errors of the gradients, the parameters and the BatchNorm statistics."""
    errors = {}
    if grads is not None:
        expected = as_jax_paths(arch, grads, "params")
        actual = backbone_lib.flatten(j_grads.to_pure_dict())
        assert set(actual) == set(expected)
        # Relative to each tensor's largest gradient, or to 1e-3 of the model's largest for
        # tensors whose gradient is (nearly) zero. C3D's conv biases feed BatchNorm, which
        # subtracts them again: their gradient is 0 in exact arithmetic, checked on its own.
        zero = {k for k in expected if arch == "c3d" and k.endswith("conv/bias")}
        scale = max(np.abs(g).max() for g in expected.values())
        errors["grads"] = max(np.abs(actual[k] - g).max() / max(np.abs(g).max(), 1e-3 * scale)
                              for k, g in expected.items() if k not in zero)
        errors["zero_grads"] = max(
            (max(np.abs(actual[k]).max(), np.abs(expected[k]).max()) / scale for k in zero),
            default=0.0)
    expected = as_jax_paths(arch, numpy_of(net.named_parameters()), "params")
    actual = backbone_lib.flatten(state.params.to_pure_dict())
    assert set(actual) == set(expected)
    errors["params"] = max(relative_error(actual[k], v) for k, v in expected.items())
    expected = as_jax_paths(arch, numpy_of(net.named_buffers()), "batch_stats")
    actual = backbone_lib.flatten(state.batch_stats.to_pure_dict())
    assert set(actual) == set(expected)
    errors["batch_stats"] = max(relative_error(actual[k], v) for k, v in expected.items())
    return errors


def compare(pretext: str, arch: str, res: bool, dtype, num_steps: int, tol: dict[str, float]
            ) -> dict[str, float]:
    """`num_steps` steps on both sides from the same weights; asserts and returns the worst
    relative error of each quantity."""
    net = reference_net(pretext, arch, res)
    state, ctx = jax_twin(pretext, arch, net, dtype)
    net = net.double()  # the exact reference (see the module docstring)
    formula = modality_lib.default_formula(pretext)
    input_modality = modality_lib.InputModality("res" if res else "rgb", formula)
    sgd = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(1)
    worst: dict[str, float] = {}
    for step in range(num_steps):
        tuples = torch.rand(*TUPLES, generator=generator).double()
        keys = jax.random.split(jax.random.PRNGKey(step), TUPLES[0])
        order_keys, dropout_keys = vcop.example_streams(keys)
        if pretext == "vcop":
            # The orders `vcop.train_step` draws, then both networks on the shuffled tuples.
            labels = vcop.draw_orders(order_keys)
            order = torch.from_numpy(vcop.orders()[np.asarray(labels)]).long()  # (B, N)
            tuples = tuples[torch.arange(TUPLES[0])[:, None], order]
            net.dropout.mask = torch.from_numpy(np.array(
                vcop.dropout_masks(dropout_keys, 3 * 512, vcop.DROPOUT)))
        else:
            labels = jax.random.randint(keys[0], (TUPLES[0],), 0, 5)
        loss, logits, grads = torch_step(net, sgd, tuples, torch.from_numpy(np.asarray(labels))
                                         .long())
        inputs = input_modality(jnp.asarray(ndhwc(tuples), dtype))
        state, j_loss, j_logits, j_grads = _jax_step(pretext, ctx, state, inputs, labels,
                                                     dropout_keys)
        errors = {"logits": relative_error(j_logits, logits),
                  "loss": abs(float(j_loss) - loss) / abs(loss),
                  **state_errors(arch, net, state, grads, j_grads)}
        for key, value in errors.items():
            worst[key] = max(worst.get(key, 0.0), value)
    for key, value in worst.items():
        assert value <= tol[key], (pretext, arch, res, key, value, tol[key])
    return worst


# ----------------------------------------------------------------------------- VCOP


# R3D stays in the quick run (`-m "not slow"`); the other backbones and tests are slow.
@pytest.mark.parametrize("arch", [a if a == "r3d" else pytest.param(a, marks=pytest.mark.slow)
                                  for a in models.ARCHS])
def test_vcop_train_step_matches_reference_float32(arch: str) -> None:
    """[V]'s VCOPN on RGB clips, one SGD step in float32, each backbone."""
    compare("vcop", arch, res=False, dtype=jnp.float32, num_steps=1, tol=F32_TOL)


@pytest.mark.slow
def test_vcop_residual_train_steps_match_reference_float64() -> None:
    """[U]'s VCOPN(res=True) (`clip - torch.roll(clip, 1, 2)`), two steps in float64: equal to
    1e-8, so the residual's sign, axis and wrap-around, per-position BatchNorm, the pair order,
    dropout scaling and SGD would each show."""
    with jax.enable_x64(True):
        compare("vcop", "r3d", res=True, dtype=jnp.float64, num_steps=2, tol=F64_TOL)


@pytest.mark.slow
def test_vcop_train_step_end_to_end_float32() -> None:
    """`vcop.train_step` itself (uint8 tuples in; order, dropout masks and residual drawn inside
    the jitted step) against VCOPN(res=True) fed the same orders and masks: loss, gradient norm,
    BatchNorm statistics and the parameters after the step."""
    net = reference_net("vcop", "r3d", res=True)
    state, ctx = jax_twin("vcop", "r3d", net)
    net = net.double()
    ctx = dataclasses.replace(ctx, task=vcop.Task(3, 6, modality_lib.InputModality("res",
                                                                                    "vcop")))
    frames = np.random.default_rng(2).integers(0, 256, (4, 3, 8, 16, 16, 3), np.uint8)
    step = jax.jit(functools.partial(vcop.train_step, ctx=ctx), compiler_options=_FAST_COMPILE)
    new_state, metrics = step(state, {"clips": jnp.asarray(frames)})

    keys = trainer.example_keys(state.rng, state.step, 4, None)
    order_keys, dropout_keys = vcop.example_streams(keys)
    labels = np.asarray(vcop.draw_orders(order_keys))
    shuffled = np.stack([f[np.array(vcop.ORDERS[label])] for f, label in zip(frames, labels,
                                                                             strict=True)])
    net.dropout.mask = torch.from_numpy(np.asarray(vcop.dropout_masks(dropout_keys, 1536, 0.5)))
    tuples = torch.from_numpy(np.moveaxis(shuffled, -1, 2).copy()).double() / 255.0
    sgd = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    loss, _, grads = torch_step(net, sgd, tuples, torch.from_numpy(labels).long())
    assert abs(float(metrics["loss"]) - loss) <= 1e-5 * loss
    grad_norm = np.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads.values()))
    assert abs(float(metrics["grad_norm"]) - grad_norm) <= 1e-4 * grad_norm
    errors = state_errors("r3d", net, new_state)
    assert errors["params"] <= F32_TOL["params"] and errors["batch_stats"] <= 1e-5, errors


@pytest.mark.slow
def test_vcop_inference_matches_reference() -> None:
    """Inference mode (`model.eval()`, no dropout, running statistics) on both sides."""
    net = reference_net("vcop", "c3d", res=False).eval()
    net.dropout = torch.nn.Dropout(p=0.5).eval()
    state, ctx = jax_twin("vcop", "c3d", net)
    tuples = torch.rand(*TUPLES, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = net.double()(tuples.double()).numpy()
    model = trainer.eval_model(state, ctx)
    actual = jax.jit(lambda g, s, x: nnx.merge(g, s)(x), static_argnums=0,
                     compiler_options=_FAST_COMPILE)(*nnx.split(model), jnp.asarray(ndhwc(tuples)))
    assert relative_error(actual, expected) <= 1e-5


# ----------------------------------------------------------------------------- VCP on residuals


@pytest.mark.slow
def test_vcp_residual_train_step_matches_reference_float32() -> None:
    """[U]'s VCPN(modality='res') (`((torch.roll(x, 1, 2) - x) + 1) / 2`), one step in float32."""
    compare("vcp", "r3d", res=True, dtype=jnp.float32, num_steps=1, tol=F32_TOL)


@pytest.mark.slow
def test_vcp_residual_train_steps_match_reference_float64() -> None:
    with jax.enable_x64(True):
        compare("vcp", "r3d", res=True, dtype=jnp.float64, num_steps=2, tol=F64_TOL)
