"""vcp-jax against the reference PyTorch networks (tests/torch_reference.py) with the same weights.

Random weights and random BatchNorm statistics (fresh BatchNorm layers would hide a swapped mean
and variance), copied across with `vcp_jax.convert_torch` (tests/parity.py):

- inference: the three backbones agree to float32 rounding;
- one VCP training step with the default config (`model.bn_stats='per_clip'`): logits, loss,
  gradients, BatchNorm running statistics and the parameters after `optim.SGD`'s step agree
  within float32 tolerance;
- two steps in float64 (both sides): the same, to 1e-8, so any difference in semantics (pooled
  statistics, biased running variance, update order, momentum, L2 before momentum) would show;
- `bn_stats='pooled'` is the deviation it is documented to be;
- fine-tuning's classifier uses plain one-clip BatchNorm, as [U]'s.
"""

from __future__ import annotations

import copy
import functools

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from vcp_jax import backbone as backbone_lib
from vcp_jax import convert_torch as ct
from vcp_jax import models, pretrain, trainer

torch = pytest.importorskip("torch")
from tests import parity  # noqa: E402 - needs torch
from tests import torch_reference as ref  # noqa: E402 - needs torch
from tests.parity import one_torch_thread  # noqa: E402, F401 - autouse: one torch thread here


def reference_vcpn(arch: str, seed: int = 0) -> tuple[torch.nn.Module, list[tuple]]:
    """A randomised [U] VCPN at `parity.WIDTH` in training mode, and two batches for it."""
    generator = torch.Generator().manual_seed(seed)
    vcpn = ref.randomize_(ref.VCPN(ref.create_backbone(arch, parity.WIDTH)), generator).train()
    batches = [(torch.rand(*parity.TUPLES, generator=generator),
                torch.randint(0, 5, (parity.TUPLES[0],), generator=generator)) for _ in range(2)]
    return vcpn, batches


def jax_twin(arch: str, vcpn: torch.nn.Module, config, dtype=jnp.float32):
    """vcp-jax's VCP model as pretraining builds it, with `vcpn`'s weights, and its state.

    float64 (which configs do not offer) builds the same model with `models` directly.
    """
    if dtype == jnp.float64:
        def build() -> models.VCPModel:
            backbone = models.create_backbone(arch, rngs=nnx.Rngs(0), width=config.model.width,
                                              dtype=dtype, conv_impl=config.model.conv_impl)
            return models.VCPModel(backbone, rngs=nnx.Rngs(1), dtype=dtype)
    else:
        def build() -> models.VCPModel:
            return pretrain.create_model(config, rngs=nnx.Rngs(0))
    model = nnx.eval_shape(build)
    parity.load_reference(model, arch, vcpn, dtype)
    return trainer.create_train_state(model, config)


def compare_step(arch: str, dtype, num_steps: int, tol: dict[str, float]) -> dict[str, float]:
    """Runs `num_steps` steps on both sides; returns the worst relative error of each quantity."""
    vcpn, batches = reference_vcpn(arch)
    torch_dtype = torch.float64 if dtype == jnp.float64 else torch.float32
    vcpn = vcpn.to(torch_dtype)
    state, ctx = jax_twin(arch, vcpn, parity.train_config(arch), dtype)
    sgd = torch.optim.SGD(vcpn.parameters(), lr=parity.LR, momentum=0.9, weight_decay=5e-4)
    worst: dict[str, float] = {}
    for tuples, labels in batches[:num_steps]:
        tuples = tuples.to(torch_dtype)
        loss, logits, grads = parity.torch_step(vcpn, sgd, tuples, labels)
        state, j_loss, j_logits, j_grads = parity.jax_step(
            "vcp", ctx, state, jnp.asarray(parity.ndhwc(tuples)), jnp.asarray(labels.numpy()))
        errors = {"logits": parity.relative_error(j_logits, logits),
                  "loss": abs(float(j_loss) - loss) / abs(loss),
                  **parity.state_errors(arch, vcpn, state, grads, j_grads)}
        for key, value in errors.items():
            worst[key] = max(worst.get(key, 0.0), value)
    for key, value in worst.items():
        assert value <= tol[key], (arch, key, value, tol[key])
    return worst


# ----------------------------------------------------------------------------- inference


@pytest.mark.parametrize("arch", models.ARCHS)
def test_backbone_inference_matches_reference(arch: str) -> None:
    """A width-16 backbone on 2 clips of 16x64x64 in eval mode, both conv implementations."""
    generator = torch.Generator().manual_seed(1)
    backbone = ref.randomize_(ref.create_backbone(arch, width=16), generator).eval()
    clips = torch.rand(2, 3, 16, 64, 64, generator=generator)
    with torch.no_grad():
        expected = backbone(clips).numpy()
    converted = ct.convert_state_dict(arch, backbone.state_dict())
    model = nnx.eval_shape(lambda: models.create_backbone(arch, rngs=nnx.Rngs(0), width=16))
    parity.load_into(model, converted.params, converted.batch_stats, jnp.float32)
    model.eval()
    for conv_impl in ("native", "conv2d"):
        models.set_conv_impl(model, conv_impl)
        actual = _forward(*nnx.split(model), jnp.asarray(parity.ndhwc(clips)))
        assert actual.shape == expected.shape == (2, 128)
        error = parity.relative_error(actual, expected)
        assert error <= 1e-5, (conv_impl, error)  # float32 rounding is about 2e-7 here


@functools.partial(jax.jit, static_argnums=0, compiler_options=parity.FAST_COMPILE)
def _forward(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


# ----------------------------------------------------------------------------- VCP training


@pytest.mark.parametrize("arch", [a if a == "r3d" else pytest.param(a, marks=pytest.mark.slow)
                                  for a in models.ARCHS])  # R3D in the quick set
def test_vcp_train_step_matches_reference_float32(arch: str) -> None:
    """The default config's step, in float32: [U]'s loss, gradients, BN statistics and SGD."""
    compare_step(arch, jnp.float32, num_steps=1, tol=parity.F32_TOL)


def test_vcp_train_steps_match_reference_float64() -> None:
    """Two steps in float64 on both sides (momentum acts from the second step): equal to 1e-8.

    In float32 the second step's gradients already differ by about 4e-4 between PyTorch float32
    and float64 themselves (BatchNorm over 4 clips amplifies rounding), too loose to tell a
    semantic difference from noise; float64 can. One arch: what is checked here (statistics
    per clip position, update order, unbiased variance, SGD) does not depend on it; the float32
    test covers each (measured here: c3d 1.6e-12, r3d 2.9e-12, r21d 1.5e-10 in the gradients).
    """
    arch = "r3d"
    with jax.enable_x64(True):
        compare_step(arch, jnp.float64, num_steps=2, tol=parity.F64_TOL)


def test_pooled_bn_stats_is_not_the_reference() -> None:
    """'pooled' equals the backbone run on all 3B clips as one batch, which [U] never does."""
    vcpn, batches = reference_vcpn("r3d")
    tuples, labels = batches[0]
    pooled_vcpn = copy.deepcopy(vcpn)

    def pooled_forward(t: torch.Tensor) -> torch.Tensor:  # one backbone call on (B*N, ...)
        b, n = t.shape[:2]
        feats = pooled_vcpn.base_network(t.reshape(b * n, *t.shape[2:]))
        return pooled_vcpn.fc(feats.reshape(b, -1))

    state, ctx = jax_twin("r3d", vcpn, parity.train_config("r3d", bn_stats="pooled"))
    with torch.no_grad():
        per_clip = vcpn(tuples).numpy()
        pooled = pooled_forward(tuples).numpy()
    state, _, logits, _ = parity.jax_step("vcp", ctx, state, jnp.asarray(parity.ndhwc(tuples)),
                                          jnp.asarray(labels.numpy()))
    assert parity.relative_error(logits, pooled) <= 1e-4
    assert parity.relative_error(logits, per_clip) > 1e-2  # measured: 5% on full-size models
    expected = parity.as_jax_paths("r3d", parity.WIDTH,
                                   parity.numpy_of(pooled_vcpn.named_buffers()), "batch_stats")
    actual = backbone_lib.flatten(state.batch_stats.to_pure_dict())
    assert max(parity.relative_error(actual[k], v) for k, v in expected.items()) <= 1e-5


# ----------------------------------------------------------------------------- fine-tuning


def test_classifier_train_step_matches_reference() -> None:
    """Fine-tuning: [U]'s backbone `with_classifier=True` on one clip per video, one SGD step."""
    generator = torch.Generator().manual_seed(2)
    net = ref.randomize_(ref.create_backbone("r3d", parity.WIDTH, with_classifier=True,
                                             num_classes=7), generator).train()
    clips = torch.rand(4, 3, 8, 16, 16, generator=generator)
    labels = torch.tensor([0, 3, 6, 3])
    def build() -> models.Classifier:
        backbone = models.create_backbone("r3d", rngs=nnx.Rngs(0), width=parity.WIDTH,
                                          conv_impl="native")
        return models.Classifier(backbone, 7, rngs=nnx.Rngs(1))

    model = nnx.eval_shape(build)
    state_dict = net.state_dict()
    converted = ct.convert_state_dict("r3d", state_dict)
    assert converted.dropped == ("linear.bias", "linear.weight")
    params = {backbone_lib.BACKBONE: converted.params,
              "fc": {"kernel": state_dict["linear.weight"].numpy().T.copy(),
                     "bias": state_dict["linear.bias"].numpy().copy()}}
    parity.load_into(model, params, {backbone_lib.BACKBONE: converted.batch_stats}, jnp.float32)
    state, ctx = trainer.create_train_state(model, parity.train_config("r3d"))
    sgd = torch.optim.SGD(net.parameters(), lr=parity.LR, momentum=0.9, weight_decay=5e-4)
    loss, logits, grads = parity.torch_step(net, sgd, clips, labels)
    state, j_loss, j_logits, j_grads = parity.jax_step(
        "vcp", ctx, state, jnp.asarray(parity.ndhwc(clips)), jnp.asarray(labels.numpy()))
    assert parity.relative_error(j_logits, logits) <= 1e-4
    assert abs(float(j_loss) - loss) <= 1e-5 * loss
    named = {**grads, "fc.weight": grads["linear.weight"], "fc.bias": grads["linear.bias"]}
    expected = parity.as_jax_paths("r3d", parity.WIDTH, named, "params", prefix="")
    actual = backbone_lib.flatten(j_grads.to_pure_dict())
    expected = {k.replace("head/", ""): v for k, v in expected.items()}
    assert max(parity.relative_error(actual[k], v) for k, v in expected.items()) <= 1e-3
    expected = parity.as_jax_paths("r3d", parity.WIDTH, parity.numpy_of(net.named_buffers()),
                                   "batch_stats", prefix="")
    actual = backbone_lib.flatten(state.batch_stats.to_pure_dict())
    assert max(parity.relative_error(actual[k], v) for k, v in expected.items()) <= 1e-5


# ----------------------------------------------------------------------------- one BatchNorm


@pytest.mark.parametrize("groups", [1, 3])
def test_batchnorm_matches_torch_called_per_group(groups: int) -> None:
    """`BatchNorm(batch_groups=G)` on `(B * G, ...)` == `nn.BatchNorm3d` on each group in turn:
    outputs, gradients (input, scale, bias) and running statistics (unbiased variance)."""
    generator = torch.Generator().manual_seed(3)
    bn = ref.randomize_(torch.nn.BatchNorm3d(6), generator).train()
    x = torch.randn(2 * groups, 6, 2, 3, 3, generator=generator) * 2 + 1
    x.requires_grad_(True)
    cotangent = torch.randn(2 * groups, 6, 2, 3, 3, generator=generator)
    j_bn = models.BatchNorm(6, batch_groups=groups)
    for name, value in (("scale", bn.weight), ("bias", bn.bias), ("mean", bn.running_mean),
                        ("var", bn.running_var)):
        getattr(j_bn, name)[...] = jnp.asarray(value.detach().numpy())

    rows = x.reshape(2, groups, *x.shape[1:])
    y = torch.stack([bn(rows[:, g]) for g in range(groups)], dim=1).reshape(x.shape)
    y.backward(cotangent)

    graphdef, state = nnx.split(j_bn)

    def f(state, x):
        module = nnx.merge(graphdef, state)
        return module(x), nnx.state(module)

    j_x = jnp.asarray(parity.ndhwc(x))
    (j_y, new_state), vjp = jax.vjp(f, state, j_x)
    zero_state = jax.tree.map(jnp.zeros_like, new_state)
    d_state, d_x = vjp((jnp.asarray(parity.ndhwc(cotangent)), zero_state))
    assert parity.relative_error(j_y, parity.ndhwc(y)) <= 1e-6
    assert parity.relative_error(d_x, parity.ndhwc(x.grad)) <= 1e-5
    assert parity.relative_error(d_state["scale"][...], bn.weight.grad.numpy()) <= 1e-5
    assert parity.relative_error(d_state["bias"][...], bn.bias.grad.numpy()) <= 1e-5
    assert parity.relative_error(new_state["mean"][...], bn.running_mean.numpy()) <= 1e-6
    assert parity.relative_error(new_state["var"][...], bn.running_var.numpy()) <= 1e-6
