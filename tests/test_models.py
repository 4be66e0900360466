"""Tests for vcp_jax.models: exact parameter counts and shapes (abstractly, at full size) and real
forward/backward passes of tiny-width backbones on CPU."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vcp_jax import models
from vcp_jax.models import (
    ARCHS,
    C3D,
    R3D,
    Classifier,
    R2Plus1D,
    VCPHead,
    VCPModel,
    count_params,
    create_backbone,
)

EXPECTED_PARAMS = {"c3d": 27_661_440, "r3d": 14_361_792, "r21d": 14_365_303}
FULL_CLIP = jax.ShapeDtypeStruct((2, 16, 112, 112, 3), jnp.float32)
# (T, H) of each stage's output map on a 16x112x112 clip (H == W).
STAGE_TH = {
    "c3d": [(16, 56), (8, 28), (4, 14), (2, 7), (2, 7)],
    "r3d": [(16, 56), (16, 56), (8, 28), (4, 14), (2, 7)],
    "r21d": [(16, 56), (16, 56), (8, 28), (4, 14), (2, 7)],
}
STAGE_C = [64, 64, 128, 256, 512]
C3D_STAGE_C = [64, 128, 256, 512, 512]


@functools.cache
def abstract_backbone(arch: str, width: int = 64) -> nnx.Module:
    """The backbone as shapes only: nothing allocated or initialised (a shared, cached copy)."""
    return nnx.eval_shape(lambda: create_backbone(arch, rngs=nnx.Rngs(0), width=width))


# ----------------------------------------------------------------------------- full size, abstract


@pytest.mark.parametrize("arch", ARCHS)
def test_param_counts(arch):
    assert count_params(abstract_backbone(arch)) == EXPECTED_PARAMS[arch]


def test_backbone_classes():
    assert isinstance(abstract_backbone("c3d"), C3D)
    assert isinstance(abstract_backbone("r3d"), R3D)
    assert isinstance(abstract_backbone("r21d"), R2Plus1D)


@pytest.mark.parametrize("arch", ARCHS)
def test_head_param_counts(arch):
    def build_classifier():
        return Classifier(create_backbone(arch, rngs=nnx.Rngs(0)), 101, rngs=nnx.Rngs(1))

    def build_vcp():
        return VCPModel(create_backbone(arch, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))

    classifier = nnx.eval_shape(build_classifier)
    vcp = nnx.eval_shape(build_vcp)
    assert count_params(classifier) - EXPECTED_PARAMS[arch] == 51_813
    assert count_params(vcp) - EXPECTED_PARAMS[arch] == 1536 * 5 + 5
    assert count_params(vcp.head) == 1536 * 5 + 5


def test_count_params_excludes_batch_stats():
    bn = models.BatchNorm(7)
    assert count_params(bn) == 14
    assert count_params(nnx.eval_shape(lambda: models.BatchNorm(7))) == 14


@pytest.mark.parametrize("arch", ARCHS)
def test_full_size_shapes(arch):
    model = abstract_backbone(arch)
    assert model.num_features == 512
    stages = nnx.eval_shape(lambda m, x: m.stages(x), model, FULL_CLIP)
    channels = C3D_STAGE_C if arch == "c3d" else STAGE_C
    assert [s.shape for s in stages] == [
        (2, t, h, h, c) for (t, h), c in zip(STAGE_TH[arch], channels, strict=True)
    ]
    fmap = nnx.eval_shape(lambda m, x: m.feature_map(x), model, FULL_CLIP)
    assert fmap.shape == (2, 2, 7, 7, 512)
    pooled = nnx.eval_shape(lambda m, x: m(x), model, FULL_CLIP)
    assert pooled.shape == (2, 512) and pooled.dtype == jnp.float32


def test_vcp_model_full_size_shape():
    model = nnx.eval_shape(
        lambda: VCPModel(create_backbone("r3d", rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
    )
    tuples = jax.ShapeDtypeStruct((2, 3, 16, 112, 112, 3), jnp.float32)
    logits = nnx.eval_shape(lambda m, x: m(x), model, tuples)
    assert logits.shape == (2, 5) and logits.dtype == jnp.float32


def test_unknown_arch():
    with pytest.raises(ValueError, match="r2d") as info:
        create_backbone("r2d", rngs=nnx.Rngs(0))
    for arch in ARCHS:
        assert arch in str(info.value)


def test_param_dtype_must_be_float32():
    with pytest.raises(ValueError):
        R3D(width=4, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))


def test_width_scales_channels():
    model = abstract_backbone("r21d", width=8)
    assert model.num_features == 64
    fmap = nnx.eval_shape(lambda m, x: m.feature_map(x), model, FULL_CLIP)
    assert fmap.shape == (2, 2, 7, 7, 64)


# ----------------------------------------------------------------------------- tiny, real


def test_kernel_init_matches_pytorch():
    """kaiming_uniform(a=sqrt(5)): U(+-b), b = 1/sqrt(fan_in), std b/sqrt(3)."""
    fan_in = 3 * 3 * 3 * 32
    bound = 1.0 / math.sqrt(fan_in)
    direct = models.torch_kernel_init(jax.random.key(0), (3, 3, 3, 32, 32))
    model = R3D(width=4, rngs=nnx.Rngs(0))
    in_model = model.layers[3][0].conv2.kernel[...]  # conv5's second conv, 32 -> 32
    for kernel in (np.asarray(direct), np.asarray(in_model)):
        assert kernel.shape == (3, 3, 3, 32, 32) and kernel.dtype == jnp.float32
        assert np.abs(kernel).max() <= bound
        assert np.abs(kernel).max() > 0.99 * bound
        np.testing.assert_allclose(kernel.std(), bound / math.sqrt(3), rtol=0.03)
        np.testing.assert_allclose(kernel.mean(), 0.0, atol=0.02 * bound)


def test_bias_init_matches_pytorch():
    model = C3D(width=4, rngs=nnx.Rngs(0))
    bias = np.asarray(model.conv5a.conv.bias[...])  # 32 -> 32, 3x3x3, with bias
    bound = 1.0 / math.sqrt(27 * 32)
    assert np.abs(bias).max() <= bound
    assert np.abs(bias).max() > bound / 2  # drawn, not zeros
    head = VCPHead(32, rngs=nnx.Rngs(0))
    hb = 1.0 / math.sqrt(3 * 32)
    assert np.abs(np.asarray(head.fc.kernel[...])).max() <= hb
    assert 0 < np.abs(np.asarray(head.fc.bias[...])).max() <= hb


def test_batchnorm_settings():
    model = C3D(width=4, rngs=nnx.Rngs(0))
    bn = model.conv1.bn
    assert bn.momentum == 0.9 and bn.epsilon == 1e-5
    assert not bn.use_running_average  # modules start in train mode, like PyTorch
    np.testing.assert_array_equal(bn.scale[...], 1.0)
    np.testing.assert_array_equal(bn.bias[...], 0.0)
    model.eval()
    assert bn.use_running_average
    model.train()
    assert not bn.use_running_average


def test_r21d_mid_widths():
    model = abstract_backbone("r21d")
    assert model.conv1.spatial.out_features == 83  # floor(3*49*3*64 / (49*3 + 3*64))
    assert model.conv1.spatial.kernel.shape == (1, 7, 7, 3, 83)
    assert model.conv1.temporal.kernel.shape == (3, 1, 1, 83, 64)
    shortcut = model.layers[1][0].downsample_conv
    assert shortcut.spatial.kernel.shape == (1, 1, 1, 64, 42)  # 64*128 // (64 + 128)
    assert shortcut.spatial.strides == (1, 2, 2) and shortcut.temporal.strides == (2, 1, 1)
    assert model.layers[1][0].conv1.spatial.kernel.shape == (1, 3, 3, 64, 230)


def test_bn_axis_name_is_passed():
    model = nnx.eval_shape(
        lambda: create_backbone("r21d", rngs=nnx.Rngs(0), width=4, bn_axis_name="batch")
    )
    bns = [m for _, m in nnx.iter_graph(model) if isinstance(m, models.BatchNorm)]
    # conv1: 2 (one inside the factorised conv); 4 blocks x 4; 3 projection shortcuts x 2.
    assert len(bns) == 2 + 4 * 4 + 3 * 2
    assert all(bn.axis_name == "batch" for bn in bns)
    assert all(bn.batch_groups == 1 for bn in bns)  # a bare backbone: plain BatchNorm


TINY_CLIP = (2, 16, 32, 32, 3)


def _batch_stats(model: nnx.Module) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.BatchStat))]


# Tiny models compile in seconds and run in milliseconds: compile without XLA's backend
# optimisations (about 40% faster on CPU). Hence plain jax.jit on the split model, not nnx.jit.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


@functools.partial(jax.jit, static_argnums=0, compiler_options=_FAST_COMPILE)
def _jit_grad(graphdef, state, x, labels):
    def loss_fn(m):
        logits = m(x)
        return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(len(labels)), labels]), logits

    model = nnx.merge(graphdef, state)
    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    return loss, logits, grads, nnx.state(model)


def _train_step(model: nnx.Module, x: jax.Array, labels: jax.Array):
    """Loss, logits and parameter gradients; updates `model`'s BatchNorm stats like nnx.jit."""
    loss, logits, grads, new_state = _jit_grad(*nnx.split(model), x, labels)
    nnx.update(model, new_state)
    return loss, logits, grads


@functools.partial(jax.jit, static_argnums=0, compiler_options=_FAST_COMPILE)
def _jit_forward(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


def _forward(model: nnx.Module, x: jax.Array) -> jax.Array:
    return _jit_forward(*nnx.split(model), x)


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if a != "r3d" else a
                                  for a in ARCHS])  # R3D, the demo's, in the quick set
def test_tiny_forward_backward(arch):
    model = Classifier(create_backbone(arch, rngs=nnx.Rngs(0), width=4), 7, rngs=nnx.Rngs(1))
    x = jax.random.uniform(jax.random.key(0), TINY_CLIP)
    before = _batch_stats(model)
    loss, logits, grads = _train_step(model, x, jnp.array([1, 5]))
    assert logits.shape == (2, 7) and logits.dtype == jnp.float32
    assert np.isfinite(float(loss))
    g = [np.asarray(v) for v in jax.tree.leaves(grads)]  # numpy: no compile per shape
    assert len(g) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert all(np.isfinite(v).all() for v in g)
    assert all(np.abs(v).max() > 0 for v in g)  # every weight gets a gradient
    after = _batch_stats(model)
    assert all(not np.allclose(a, b) for a, b in zip(before, after, strict=True))

    model.eval()
    eval_logits = _forward(model, x)
    assert eval_logits.shape == (2, 7) and np.isfinite(eval_logits).all()
    for a, b in zip(after, _batch_stats(model), strict=True):
        np.testing.assert_array_equal(a, b)


def test_vcp_model_runs_backbone_once_in_clip_order():
    model = VCPModel(create_backbone("r3d", rngs=nnx.Rngs(0), width=4), rngs=nnx.Rngs(1))
    model.eval()
    tuples = jax.random.uniform(jax.random.key(1), (2, 3, 8, 16, 16, 3))

    @functools.partial(jax.jit, static_argnums=0, compiler_options=_FAST_COMPILE)
    def both(graphdef, state, t):
        m = nnx.merge(graphdef, state)
        # The reference runs the backbone per clip and concatenates the features in clip order.
        feats = [m.backbone(t[:, i]) for i in range(3)]
        return m(t), m.head.fc(jnp.concatenate(feats, axis=1))

    logits, expected = both(*nnx.split(model), tuples)
    assert logits.shape == (2, 5) and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)

    # One backbone pass on the merged (B*N, ...) batch: as many convs as one clip batch needs
    # (R3D: conv1, 4 blocks x 2, 3 projection shortcuts).
    def n_convs(fn, *args):
        return str(
            jax.make_jaxpr(lambda s, *a: fn(nnx.merge(graphdef, s), *a))(state, *args)
        ).count("conv_general_dilated[")

    graphdef, state = nnx.split(model)
    assert n_convs(lambda m, t: m(t), tuples) == 12
    assert n_convs(lambda m, c: m.backbone(c), tuples[:, 0]) == 12


@pytest.mark.slow
def test_bfloat16_compute():
    backbone = create_backbone("r3d", rngs=nnx.Rngs(0), width=4, dtype=jnp.bfloat16)
    model = Classifier(backbone, 7, rngs=nnx.Rngs(1), dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model)))
    x = jax.random.uniform(jax.random.key(2), TINY_CLIP)
    loss, logits, grads = _train_step(model, x, jnp.array([1, 5]))
    assert logits.dtype == jnp.float32 and np.isfinite(logits).all()
    assert np.isfinite(float(loss))
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(grads))
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(grads))
    # Params and BatchNorm stats stay float32 after the update of the stats.
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model)))
    fmap = nnx.eval_shape(lambda m, c: m.feature_map(c), model.backbone, x)
    assert fmap.dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- BatchNorm groups


def _numpy_batchnorm(x, groups, mean, var, scale, bias, m=0.9, eps=1e-5):
    """PyTorch's BatchNorm3d called once per group, in group order, on channels-last numpy."""
    x = np.asarray(x, np.float64)
    xg = x.reshape(x.shape[0] // groups, groups, *x.shape[1:])
    mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
    out = np.empty_like(xg)
    for g in range(groups):
        rows = xg[:, g].reshape(-1, x.shape[-1])
        mu, v, n = rows.mean(0), rows.var(0), rows.shape[0]
        out[:, g] = (xg[:, g] - mu) / np.sqrt(v + eps) * scale + bias
        mean = m * mean + (1 - m) * mu
        var = m * var + (1 - m) * v * n / (n - 1)  # unbiased, as PyTorch
    return out.reshape(x.shape), mean, var


@pytest.mark.parametrize("groups", [1, 3])
def test_batchnorm_statistic_groups(groups):
    bn = models.BatchNorm(5, batch_groups=groups)
    rng = np.random.default_rng(0)
    for v, value in ((bn.scale, rng.uniform(0.5, 1.5, 5)), (bn.bias, rng.normal(0, 0.3, 5)),
                     (bn.mean, rng.normal(0, 0.3, 5)), (bn.var, rng.uniform(0.5, 2, 5))):
        v[...] = jnp.asarray(value, jnp.float32)
    before = [np.asarray(v[...]) for v in (bn.mean, bn.var, bn.scale, bn.bias)]
    # Each group (row % groups) gets its own offset and spread, so pooling them would show.
    x = rng.normal(size=(6, 2, 3, 3, 5)) * (1 + np.arange(6) % 3)[:, None, None, None, None]
    x += (np.arange(6) % 3)[:, None, None, None, None]
    y = bn(jnp.asarray(x, jnp.float32))
    expected, mean, var = _numpy_batchnorm(x, groups, *before)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.mean[...], mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(bn.var[...], var, rtol=1e-6, atol=1e-6)

    bn.eval()  # inference: the running statistics, whatever the groups
    y = bn(jnp.asarray(x, jnp.float32))
    expected = (x - mean) / np.sqrt(var + 1e-5) * before[2] + before[3]
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_batchnorm_errors():
    with pytest.raises(ValueError, match="7 rows do not split into 3 groups"):
        models.BatchNorm(4, batch_groups=3)(jnp.ones((7, 2, 4)))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        models.BatchNorm(4)(jnp.ones((1, 1, 4)))
    with pytest.raises(ValueError, match="batch_groups"):
        models.BatchNorm(4, batch_groups=0)


def test_vcp_model_sets_the_backbone_groups():
    def groups(module):
        return {m.batch_groups for _, m in nnx.iter_modules(module)
                if isinstance(m, models.BatchNorm)}

    def build(**kwargs):
        return VCPModel(create_backbone("r21d", rngs=nnx.Rngs(0), width=4), rngs=nnx.Rngs(1),
                        **kwargs)

    assert groups(abstract_backbone("r21d", width=4)) == {1}  # a bare backbone
    vcp = nnx.eval_shape(build)
    assert vcp.bn_stats == "per_clip" and groups(vcp) == {3}  # the default
    Classifier(vcp.backbone, 7, rngs=nnx.Rngs(1))  # fine-tuning: one clip, one group
    assert groups(vcp.backbone) == {1}
    assert groups(nnx.eval_shape(lambda: build(num_clips=4, bn_stats="per_clip"))) == {4}
    assert groups(nnx.eval_shape(lambda: build(bn_stats="pooled"))) == {1}
    with pytest.raises(ValueError, match="per_clip"):
        nnx.eval_shape(lambda: build(bn_stats="per_position"))
    assert models.BN_STATS == ("per_clip", "pooled")


TINY_TUPLES = (4, 3, 8, 16, 16, 3)


def _tiny_vcp(bn_stats: str = "per_clip", bn_axis_name: str | None = None):
    backbone = create_backbone("r3d", rngs=nnx.Rngs(0), width=4, bn_axis_name=bn_axis_name,
                               conv_impl="native")  # compiles faster than conv2d
    return VCPModel(backbone, rngs=nnx.Rngs(1), bn_stats=bn_stats)


def _ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(len(labels)), labels])


@pytest.mark.slow
def test_per_clip_bn_equals_the_backbone_called_per_position():
    """[U] calls the backbone once per clip position; 'per_clip' gets the same in one call."""
    model = _tiny_vcp("per_clip")
    model.backbone.bn1.mean[...] = jnp.full((4,), 0.3)  # not fresh: the order of updates shows
    tuples = jax.random.uniform(jax.random.key(0), TINY_TUPLES)
    labels = jnp.array([0, 1, 4, 2])
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, compiler_options=_FAST_COMPILE)
    def both(state):
        def batched(m):
            return _ce(m(tuples), labels)

        def per_position(m):
            models.set_bn_groups(m.backbone, 1)
            feats = jnp.stack([m.backbone(tuples[:, i]) for i in range(3)], axis=1)
            return _ce(m.head(feats), labels)

        out = []
        for fn in (batched, per_position):
            m = nnx.merge(graphdef, state)
            loss, grads = nnx.value_and_grad(fn)(m)
            out.append((loss, grads, nnx.state(m, nnx.BatchStat)))
        return out

    (loss, grads, stats), (ref_loss, ref_grads, ref_stats) = both(state)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for tree, ref in ((grads, ref_grads), (stats, ref_stats)):
        for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(ref), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())


def test_pooled_bn_is_one_batch_and_differs_from_per_clip():
    tuples = jax.random.uniform(jax.random.key(0), TINY_TUPLES)
    pooled = _tiny_vcp("pooled")
    per_clip = _tiny_vcp("per_clip")

    @functools.partial(jax.jit, static_argnums=(0, 1), compiler_options=_FAST_COMPILE)
    def run(graphdef, pooled_graphdef, state):
        flat = tuples.reshape(-1, *tuples.shape[2:])
        m = nnx.merge(pooled_graphdef, state)
        one_batch = m.head(m.backbone(flat).reshape(4, 3, -1))
        return (nnx.merge(pooled_graphdef, state)(tuples), one_batch,
                nnx.merge(graphdef, state)(tuples))

    pooled_gd, state = nnx.split(pooled)
    per_clip_gd, _ = nnx.split(per_clip)
    logits, one_batch, per_clip_logits = run(per_clip_gd, pooled_gd, state)
    np.testing.assert_allclose(logits, one_batch, rtol=1e-5, atol=1e-6)
    assert np.abs(logits - per_clip_logits).max() > 1e-3 * np.abs(per_clip_logits).max()


@pytest.mark.slow
def test_per_clip_bn_statistics_are_global_across_devices():
    """pmap over 8 devices with the BN axis equals 1 device: logits, grads and BN statistics.

    (jit on a mesh needs nothing: the batch is one global array; test_pretrain checks both.)
    """
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    tuples = jax.random.uniform(jax.random.key(0), (8, *TINY_TUPLES[1:]))
    labels = jnp.arange(8) % 5
    model = _tiny_vcp("per_clip")
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    pmap_graphdef = nnx.graphdef(nnx.eval_shape(lambda: _tiny_vcp("per_clip", "batch")))

    def step(graphdef, params, stats, tuples, labels, axis_name=None):
        def loss_fn(params):
            m = nnx.merge(graphdef, params, stats, copy=True)
            logits = m(tuples)
            return _ce(logits, labels), (logits, nnx.state(m, nnx.BatchStat))

        (_, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        if axis_name is not None:
            grads = jax.lax.pmean(grads, axis_name)
        return logits, grads, new_stats

    one = jax.jit(functools.partial(step, graphdef), compiler_options=_FAST_COMPILE)
    logits, grads, new_stats = one(params, stats, tuples, labels)
    pmapped = jax.pmap(functools.partial(step, pmap_graphdef, axis_name="batch"),
                       axis_name="batch", in_axes=(None, None, 0, 0))
    p_logits, p_grads, p_stats = pmapped(params, stats, tuples.reshape(8, 1, *tuples.shape[1:]),
                                         labels.reshape(8, 1))

    # float32 sums in another order (per device, then across devices): seen up to 1.7e-6 apart
    # on logits of about 1 in CI, so the bound is 1e-5, well below any real disagreement.
    np.testing.assert_allclose(p_logits.reshape(8, -1), logits, rtol=1e-4, atol=1e-5)
    for tree, ref in ((p_grads, grads), (p_stats, new_stats)):
        for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(ref), strict=True):
            np.testing.assert_allclose(a[0], b, rtol=1e-4, atol=1e-5 * np.abs(b).max())
