"""VCOP and residual-frame input against the reference PyTorch networks (tests/torch_reference.py:
[V]'s `VCOPN`, [U]'s `VCOPN(res=True)` and `VCPN(modality='res')`) with the same weights.

Random weights and random BatchNorm statistics, copied across with `vcp_jax.convert_torch`
(backbone and head, as a VCOP checkpoint converts; tests/parity.py), training mode, SGD as
[U]/[V] (momentum 0.9, weight decay 5e-4): logits, loss, gradients, BatchNorm running statistics
(per clip position) and the parameters after the step, in float32 (one step, each backbone) and
float64 (two steps, so momentum acts). Dropout is the one random part: the reference's
`nn.Dropout` is given the masks vcp-jax draws, so both sides drop the same units.

The reference always runs in float64 here (weights and inputs drawn in float32, so both sides
start from the same values): vcp-jax in float32 is compared with the exact result. PyTorch's own
float32 step is the noisier side on these tiny tuples: for VCOP on R3D it differs from its
float64 step by up to 8e-2 of a tensor's largest gradient (BatchNorm over few values amplifies
rounding), where vcp-jax float32 is within 2e-5 of it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vcp_jax import modality as modality_lib
from vcp_jax import models, trainer, vcop

torch = pytest.importorskip("torch")
from tests import parity  # noqa: E402 - needs torch
from tests import torch_reference as ref  # noqa: E402 - needs torch
from tests.parity import one_torch_thread  # noqa: E402, F401 - autouse: one torch thread here


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
    base = ref.create_backbone(arch, parity.WIDTH)
    if pretext == "vcop":
        net = ref.VCOPN(base, res=res)
        net = ref.randomize_(net, generator).train()
        net.dropout = FixedDropout()
    else:
        net = ref.randomize_(ref.VCPN(base, modality="res" if res else "rgb"), generator).train()
    return net


def jax_twin(pretext: str, arch: str, net: torch.nn.Module, dtype=jnp.float32):
    """vcp-jax's VCOP / VCP model with `net`'s weights, converted as a checkpoint is (backbone and
    head), and its train state."""

    def build() -> nnx.Module:
        backbone = models.create_backbone(arch, rngs=nnx.Rngs(0), width=parity.WIDTH,
                                          dtype=dtype, conv_impl="native")
        if pretext == "vcop":
            return vcop.VCOPModel(backbone, rngs=nnx.Rngs(1), dtype=dtype)
        return models.VCPModel(backbone, rngs=nnx.Rngs(1), dtype=dtype)

    model = nnx.eval_shape(build)
    converted = parity.load_reference(model, arch, net, dtype)
    assert converted.pretext == pretext and converted.dropped == ()
    return trainer.create_train_state(model, parity.train_config(arch))


def compare(pretext: str, arch: str, res: bool, dtype, num_steps: int, tol: dict[str, float]
            ) -> dict[str, float]:
    """`num_steps` steps on both sides from the same weights; asserts and returns the worst
    relative error of each quantity."""
    net = reference_net(pretext, arch, res)
    state, ctx = jax_twin(pretext, arch, net, dtype)
    net = net.double()  # the exact reference (see the module docstring)
    formula = modality_lib.default_formula(pretext)
    input_modality = modality_lib.InputModality("res" if res else "rgb", formula)
    sgd = torch.optim.SGD(net.parameters(), lr=parity.LR, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(1)
    worst: dict[str, float] = {}
    for step in range(num_steps):
        tuples = torch.rand(*parity.TUPLES, generator=generator).double()
        keys = jax.random.split(jax.random.PRNGKey(step), parity.TUPLES[0])
        order_keys, dropout_keys = vcop.example_streams(keys)
        if pretext == "vcop":
            # The orders `vcop.train_step` draws, then both networks on the shuffled tuples.
            labels = vcop.draw_orders(order_keys)
            order = torch.from_numpy(vcop.orders()[np.asarray(labels)]).long()  # (B, N)
            tuples = tuples[torch.arange(parity.TUPLES[0])[:, None], order]
            net.dropout.mask = torch.from_numpy(np.array(
                vcop.dropout_masks(dropout_keys, 3 * 512, vcop.DROPOUT)))
        else:
            labels = jax.random.randint(keys[0], (parity.TUPLES[0],), 0, 5)
        loss, logits, grads = parity.torch_step(net, sgd, tuples,
                                                torch.from_numpy(np.asarray(labels)).long())
        inputs = input_modality(jnp.asarray(parity.ndhwc(tuples), dtype))
        state, j_loss, j_logits, j_grads = parity.jax_step(pretext, ctx, state, inputs, labels,
                                                           dropout_keys)
        errors = {"logits": parity.relative_error(j_logits, logits),
                  "loss": abs(float(j_loss) - loss) / abs(loss),
                  **parity.state_errors(arch, net, state, grads, j_grads)}
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
    compare("vcop", arch, res=False, dtype=jnp.float32, num_steps=1, tol=parity.F32_TOL)


@pytest.mark.slow
def test_vcop_residual_train_steps_match_reference_float64() -> None:
    """[U]'s VCOPN(res=True) (`clip - torch.roll(clip, 1, 2)`), two steps in float64: equal to
    1e-8, so the residual's sign, axis and wrap-around, per-position BatchNorm, the pair order,
    dropout scaling and SGD would each show."""
    with jax.enable_x64(True):
        compare("vcop", "r3d", res=True, dtype=jnp.float64, num_steps=2, tol=parity.F64_TOL)


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
    step = jax.jit(functools.partial(vcop.train_step, ctx=ctx),
                   compiler_options=parity.FAST_COMPILE)
    new_state, metrics = step(state, {"clips": jnp.asarray(frames)})

    keys = trainer.example_keys(state.rng, state.step, 4, None)
    order_keys, dropout_keys = vcop.example_streams(keys)
    labels = np.asarray(vcop.draw_orders(order_keys))
    shuffled = np.stack([f[np.array(vcop.ORDERS[label])] for f, label in zip(frames, labels,
                                                                             strict=True)])
    net.dropout.mask = torch.from_numpy(np.asarray(vcop.dropout_masks(dropout_keys, 1536, 0.5)))
    tuples = torch.from_numpy(np.moveaxis(shuffled, -1, 2).copy()).double() / 255.0
    sgd = torch.optim.SGD(net.parameters(), lr=parity.LR, momentum=0.9, weight_decay=5e-4)
    loss, _, grads = parity.torch_step(net, sgd, tuples, torch.from_numpy(labels).long())
    assert abs(float(metrics["loss"]) - loss) <= 1e-5 * loss
    grad_norm = np.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads.values()))
    assert abs(float(metrics["grad_norm"]) - grad_norm) <= 1e-4 * grad_norm
    errors = parity.state_errors("r3d", net, new_state)
    assert errors["params"] <= parity.F32_TOL["params"] and errors["batch_stats"] <= 1e-5, errors


@pytest.mark.slow
def test_vcop_inference_matches_reference() -> None:
    """Inference mode (`model.eval()`, no dropout, running statistics) on both sides."""
    net = reference_net("vcop", "c3d", res=False).eval()
    net.dropout = torch.nn.Dropout(p=0.5).eval()
    state, ctx = jax_twin("vcop", "c3d", net)
    tuples = torch.rand(*parity.TUPLES, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = net.double()(tuples.double()).numpy()
    model = trainer.eval_model(state, ctx)
    actual = jax.jit(lambda g, s, x: nnx.merge(g, s)(x), static_argnums=0,
                     compiler_options=parity.FAST_COMPILE)(*nnx.split(model),
                                                           jnp.asarray(parity.ndhwc(tuples)))
    assert parity.relative_error(actual, expected) <= 1e-5


# ----------------------------------------------------------------------------- VCP on residuals


@pytest.mark.slow
def test_vcp_residual_train_step_matches_reference_float32() -> None:
    """[U]'s VCPN(modality='res') (`((torch.roll(x, 1, 2) - x) + 1) / 2`), one step in float32."""
    compare("vcp", "r3d", res=True, dtype=jnp.float32, num_steps=1, tol=parity.F32_TOL)


@pytest.mark.slow
def test_vcp_residual_train_steps_match_reference_float64() -> None:
    with jax.enable_x64(True):
        compare("vcp", "r3d", res=True, dtype=jnp.float64, num_steps=2, tol=parity.F64_TOL)
