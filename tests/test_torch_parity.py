"""vcp-jax against the reference PyTorch networks (tests/torch_reference.py) with the same weights.

Random weights and random BatchNorm statistics (fresh BatchNorm layers would hide a swapped mean
and variance), copied across with `vcp_jax.convert_torch`:

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
from vcp_jax import models, pretrain, trainer

torch = pytest.importorskip("torch")
from tests import torch_reference as ref  # noqa: E402 - needs torch

_FAST_COMPILE = {"xla_backend_optimization_level": 0}
LR = 0.01  # [U]'s
TRAIN_WIDTH = 4
TRAIN_TUPLES = (4, 3, 3, 8, 16, 16)  # (B, N, C, T, H, W): the smallest clips every arch takes


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine's cores are shared; the sizes here are tiny
    yield
    torch.set_num_threads(threads)


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected|."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def ndhwc(x: torch.Tensor) -> np.ndarray:
    """NC...DHW -> N...DHWC: `(B, C, T, H, W)` or `(B, N, C, T, H, W)`."""
    return np.moveaxis(x.detach().numpy(), -4, -1).copy()


def numpy_of(named: Iterator[tuple[str, torch.Tensor]]) -> dict[str, np.ndarray]:
    """Copies (never views: torch updates its tensors in place)."""
    return {k: v.detach().numpy().copy() for k, v in named}


def as_jax_paths(arch: str, width: int, named: dict[str, np.ndarray], collection: str,
                 prefix: str = "base_network.") -> dict[str, np.ndarray]:
    """A VCPN's `{torch name: array}` as vcp-jax's flat `{'backbone/...': array}` (+ the head)."""
    out = {f"{backbone_lib.BACKBONE}/{entry.path}": ct.to_jax_layout(named[prefix + key])
           for key, entry in ct.key_table(arch, width).items() if entry.collection == collection}
    if collection == "params" and "fc.weight" in named:
        out["head/fc/kernel"] = named["fc.weight"].T
        out["head/fc/bias"] = named["fc.bias"]
    return out


def reference_vcpn(arch: str, seed: int = 0) -> tuple[torch.nn.Module, list[tuple]]:
    """A randomised [U] VCPN at TRAIN_WIDTH in training mode, and two batches for it."""
    generator = torch.Generator().manual_seed(seed)
    vcpn = ref.randomize_(ref.VCPN(ref.create_backbone(arch, TRAIN_WIDTH)), generator).train()
    batches = [(torch.rand(*TRAIN_TUPLES, generator=generator),
                torch.randint(0, 5, (TRAIN_TUPLES[0],), generator=generator)) for _ in range(2)]
    return vcpn, batches


def load_into(model: nnx.Module, params: dict, batch_stats: dict, dtype) -> None:
    """Sets `model`'s variables (an abstract model becomes a real one)."""
    for kind, values in ((nnx.Param, params), (nnx.BatchStat, batch_stats)):
        state = nnx.state(model, kind)
        nnx.replace_by_pure_dict(state, jax.tree.map(lambda v: jnp.asarray(v, dtype), values))
        nnx.update(model, state)


def pretrain_config(arch: str, **model_overrides):
    """The default pretraining config (so `bn_stats` is the default), shrunk and at [U]'s lr."""
    config = default_config.get_config(arch)
    config.model.width = TRAIN_WIDTH
    config.model.conv_impl = "native"  # compiles faster than conv2d; both are tested for parity
    config.optimizer.learning_rate = LR
    config.optimizer.scale_with_batch = False
    for key, value in model_overrides.items():
        config.model[key] = value
    return config


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
    state_dict = vcpn.state_dict()
    converted = ct.convert_state_dict(arch, state_dict)
    params = {backbone_lib.BACKBONE: converted.params,
              "head": {"fc": {"kernel": state_dict["fc.weight"].numpy().T.copy(),
                              "bias": state_dict["fc.bias"].numpy().copy()}}}
    load_into(model, params, {backbone_lib.BACKBONE: converted.batch_stats}, dtype)
    return trainer.create_train_state(model, config)


@functools.partial(jax.jit, static_argnums=0, compiler_options=_FAST_COMPILE)
def _jax_step(ctx: trainer.StepContext, state: trainer.TrainState, tuples: jax.Array,
              labels: jax.Array):
    """The pretraining update (`trainer.update` with pretrain's loss) on given tuples and labels,
    plus the gradients it applied."""

    def loss_fn(model: nnx.Module) -> tuple[jax.Array, jax.Array]:
        logits = model(tuples)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

    def grad_fn(params: nnx.State) -> jax.Array:
        return loss_fn(nnx.merge(ctx.train_graphdef, params, state.batch_stats, copy=True))[0]

    new_state, loss, logits = trainer.update(state, ctx, loss_fn)
    return new_state, loss, logits, jax.grad(grad_fn)(state.params)


def torch_step(vcpn: torch.nn.Module, optimizer, tuples: torch.Tensor, labels: torch.Tensor):
    """[U]'s `train()` body: forward, cross-entropy, backward, `optimizer.step()`."""
    optimizer.zero_grad()
    logits = vcpn(tuples)
    loss = torch.nn.functional.cross_entropy(logits, labels)
    loss.backward()
    grads = numpy_of((k, p.grad) for k, p in vcpn.named_parameters())
    optimizer.step()
    return loss.item(), logits.detach().numpy(), grads


def compare_step(arch: str, dtype, num_steps: int, tol: dict[str, float]) -> dict[str, float]:
    """Runs `num_steps` steps on both sides; returns the worst relative error of each quantity."""
    vcpn, batches = reference_vcpn(arch)
    torch_dtype = torch.float64 if dtype == jnp.float64 else torch.float32
    vcpn = vcpn.to(torch_dtype)
    state, ctx = jax_twin(arch, vcpn, pretrain_config(arch), dtype)
    sgd = torch.optim.SGD(vcpn.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    worst: dict[str, float] = {}
    for tuples, labels in batches[:num_steps]:
        tuples = tuples.to(torch_dtype)
        loss, logits, grads = torch_step(vcpn, sgd, tuples, labels)
        state, j_loss, j_logits, j_grads = _jax_step(ctx, state, jnp.asarray(ndhwc(tuples)),
                                                     jnp.asarray(labels.numpy()))
        errors = {"logits": relative_error(j_logits, logits),
                  "loss": abs(float(j_loss) - loss) / abs(loss)}
        expected = as_jax_paths(arch, TRAIN_WIDTH, grads, "params")
        actual = backbone_lib.flatten(j_grads.to_pure_dict())
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
        expected = as_jax_paths(arch, TRAIN_WIDTH, numpy_of(vcpn.named_parameters()), "params")
        actual = backbone_lib.flatten(state.params.to_pure_dict())
        errors["params"] = max(relative_error(actual[k], v) for k, v in expected.items())
        expected = as_jax_paths(arch, TRAIN_WIDTH, numpy_of(vcpn.named_buffers()), "batch_stats")
        actual = backbone_lib.flatten(state.batch_stats.to_pure_dict())
        assert set(actual) == set(expected)
        errors["batch_stats"] = max(relative_error(actual[k], v) for k, v in expected.items())
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
    load_into(model, converted.params, converted.batch_stats, jnp.float32)
    model.eval()
    for conv_impl in ("native", "conv2d"):
        models.set_conv_impl(model, conv_impl)
        actual = _forward(*nnx.split(model), jnp.asarray(ndhwc(clips)))
        assert actual.shape == expected.shape == (2, 128)
        error = relative_error(actual, expected)
        assert error <= 1e-5, (conv_impl, error)  # float32 rounding is about 2e-7 here


@functools.partial(jax.jit, static_argnums=0, compiler_options=_FAST_COMPILE)
def _forward(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


# ----------------------------------------------------------------------------- VCP training


@pytest.mark.parametrize("arch", [a if a == "r3d" else pytest.param(a, marks=pytest.mark.slow)
                                  for a in models.ARCHS])  # R3D in the quick set
def test_vcp_train_step_matches_reference_float32(arch: str) -> None:
    """The default config's step, in float32: [U]'s loss, gradients, BN statistics and SGD."""
    compare_step(arch, jnp.float32, num_steps=1, tol={
        "logits": 1e-4, "loss": 1e-5, "grads": 1e-3, "zero_grads": 1e-5, "params": 3e-4,
        "batch_stats": 1e-5})


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
        compare_step(arch, jnp.float64, num_steps=2, tol={
            "logits": 1e-8, "loss": 1e-8, "grads": 1e-8, "zero_grads": 1e-12, "params": 1e-8,
            "batch_stats": 1e-8})


def test_pooled_bn_stats_is_not_the_reference() -> None:
    """'pooled' equals the backbone run on all 3B clips as one batch, which [U] never does."""
    vcpn, batches = reference_vcpn("r3d")
    tuples, labels = batches[0]
    pooled_vcpn = copy.deepcopy(vcpn)

    def pooled_forward(t: torch.Tensor) -> torch.Tensor:  # one backbone call on (B*N, ...)
        b, n = t.shape[:2]
        feats = pooled_vcpn.base_network(t.reshape(b * n, *t.shape[2:]))
        return pooled_vcpn.fc(feats.reshape(b, -1))

    state, ctx = jax_twin("r3d", vcpn, pretrain_config("r3d", bn_stats="pooled"))
    with torch.no_grad():
        per_clip = vcpn(tuples).numpy()
        pooled = pooled_forward(tuples).numpy()
    state, _, logits, _ = _jax_step(ctx, state, jnp.asarray(ndhwc(tuples)),
                                    jnp.asarray(labels.numpy()))
    assert relative_error(logits, pooled) <= 1e-4
    assert relative_error(logits, per_clip) > 1e-2  # measured: 5% on full-size models
    expected = as_jax_paths("r3d", TRAIN_WIDTH, numpy_of(pooled_vcpn.named_buffers()),
                            "batch_stats")
    actual = backbone_lib.flatten(state.batch_stats.to_pure_dict())
    assert max(relative_error(actual[k], v) for k, v in expected.items()) <= 1e-5


# ----------------------------------------------------------------------------- fine-tuning


def test_classifier_train_step_matches_reference() -> None:
    """Fine-tuning: [U]'s backbone `with_classifier=True` on one clip per video, one SGD step."""
    generator = torch.Generator().manual_seed(2)
    net = ref.randomize_(ref.create_backbone("r3d", TRAIN_WIDTH, with_classifier=True,
                                             num_classes=7), generator).train()
    clips = torch.rand(4, 3, 8, 16, 16, generator=generator)
    labels = torch.tensor([0, 3, 6, 3])
    def build() -> models.Classifier:
        backbone = models.create_backbone("r3d", rngs=nnx.Rngs(0), width=TRAIN_WIDTH,
                                          conv_impl="native")
        return models.Classifier(backbone, 7, rngs=nnx.Rngs(1))

    model = nnx.eval_shape(build)
    state_dict = net.state_dict()
    converted = ct.convert_state_dict("r3d", state_dict)
    assert converted.dropped == ("linear.bias", "linear.weight")
    params = {backbone_lib.BACKBONE: converted.params,
              "fc": {"kernel": state_dict["linear.weight"].numpy().T.copy(),
                     "bias": state_dict["linear.bias"].numpy().copy()}}
    load_into(model, params, {backbone_lib.BACKBONE: converted.batch_stats}, jnp.float32)
    state, ctx = trainer.create_train_state(model, pretrain_config("r3d"))
    sgd = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    loss, logits, grads = torch_step(net, sgd, clips, labels)
    state, j_loss, j_logits, j_grads = _jax_step(ctx, state, jnp.asarray(ndhwc(clips)),
                                                 jnp.asarray(labels.numpy()))
    assert relative_error(j_logits, logits) <= 1e-4
    assert abs(float(j_loss) - loss) <= 1e-5 * loss
    named = {**grads, "fc.weight": grads["linear.weight"], "fc.bias": grads["linear.bias"]}
    expected = as_jax_paths("r3d", TRAIN_WIDTH, named, "params", prefix="")
    actual = backbone_lib.flatten(j_grads.to_pure_dict())
    expected = {k.replace("head/", ""): v for k, v in expected.items()}
    assert max(relative_error(actual[k], v) for k, v in expected.items()) <= 1e-3
    expected = as_jax_paths("r3d", TRAIN_WIDTH, numpy_of(net.named_buffers()), "batch_stats",
                            prefix="")
    actual = backbone_lib.flatten(state.batch_stats.to_pure_dict())
    assert max(relative_error(actual[k], v) for k, v in expected.items()) <= 1e-5


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

    j_x = jnp.asarray(ndhwc(x))
    (j_y, new_state), vjp = jax.vjp(f, state, j_x)
    zero_state = jax.tree.map(jnp.zeros_like, new_state)
    d_state, d_x = vjp((jnp.asarray(ndhwc(cotangent)), zero_state))
    assert relative_error(j_y, ndhwc(y)) <= 1e-6
    assert relative_error(d_x, ndhwc(x.grad)) <= 1e-5
    assert relative_error(d_state["scale"][...], bn.weight.grad.numpy()) <= 1e-5
    assert relative_error(d_state["bias"][...], bn.bias.grad.numpy()) <= 1e-5
    assert relative_error(new_state["mean"][...], bn.running_mean.numpy()) <= 1e-6
    assert relative_error(new_state["var"][...], bn.running_var.numpy()) <= 1e-6
