"""Tests for vcp_jax.vcop (clip order prediction) and vcp_jax.modality (residual-frame input), on
CPU without PyTorch; the equality with the reference networks is tests/test_vcop_parity.py."""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import default as default_config
from vcp_jax import backbone as backbone_lib
from vcp_jax import config_utils, models, pretrain, trainer, vcop
from vcp_jax import modality as modality_lib

_FAST_COMPILE = {"xla_backend_optimization_level": 0}
WIDTH = 4
TUPLES = (4, 3, 8, 16, 16, 3)  # (B, N, T, H, W, C)


# ----------------------------------------------------------------------------- orders


def test_orders_are_itertools_permutations() -> None:
    assert vcop.ORDERS == tuple(itertools.permutations(range(3)))
    assert vcop.order_names() == ("012", "021", "102", "120", "201", "210")
    assert vcop.num_classes(3) == 6 and vcop.num_classes(4) == 24
    np.testing.assert_array_equal(vcop.orders(4), list(itertools.permutations(range(4))))


def v_order_class_index(order: tuple[int, ...]) -> int:
    """[V] train_vcop.py's `order_class_index`."""
    classes = list(itertools.permutations(list(range(len(order)))))
    return classes.index(tuple(order))


def test_reorder_is_the_reference_shuffle() -> None:
    """[V] shuffles `zip(tuple_clip, tuple_order)`: position p then holds clip `order[p]`, and the
    label is the index of `order` among the permutations."""
    clips = np.arange(2 * 3 * 2).reshape(2, 3, 2)  # 2 tuples of 3 "clips" (2 values each)
    for label, order in enumerate(vcop.ORDERS):
        labels = jnp.array([label, 0])
        out = np.asarray(vcop.reorder(jnp.asarray(clips), labels))
        # [V]: clip_and_order = list(zip(tuple_clip, tuple_order)), shuffled into `order`.
        shuffled = [list(zip(clips[0], range(3), strict=True))[i] for i in order]
        tuple_clip, tuple_order = zip(*shuffled, strict=True)
        np.testing.assert_array_equal(out[0], np.stack(tuple_clip))
        assert v_order_class_index(tuple_order) == label
        np.testing.assert_array_equal(out[1], clips[1])  # label 0: the identity


def test_shuffle_is_uniform_and_jit_pmap_agree() -> None:
    """The orders of a global batch, keys folded from (step, position): the same under jit on 16
    tuples and under pmap on 8 devices x 2 tuples; every order is drawn."""
    base = jax.random.PRNGKey(3)
    tuples = jnp.arange(16 * 3, dtype=jnp.uint8).reshape(16, 3, 1)

    def draw(tuples, axis_name=None):
        keys = trainer.example_keys(base, jnp.int32(5), tuples.shape[0], axis_name)
        order_keys, dropout_keys = vcop.example_streams(keys)
        shuffled, labels = vcop.shuffle_tuples(order_keys, tuples)
        return shuffled, labels, vcop.dropout_masks(dropout_keys, 10, 0.5)

    shuffled, labels, masks = jax.jit(draw)(tuples)
    p_shuffled, p_labels, p_masks = jax.pmap(functools.partial(draw, axis_name="b"),
                                             axis_name="b")(tuples.reshape(8, 2, 3, 1))
    np.testing.assert_array_equal(p_labels.reshape(16), labels)
    np.testing.assert_array_equal(p_shuffled.reshape(16, 3, 1), shuffled)
    np.testing.assert_array_equal(p_masks.reshape(16, 10), masks)
    for b in range(16):
        np.testing.assert_array_equal(shuffled[b], tuples[b][np.array(vcop.ORDERS[labels[b]])])

    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(6000))
    counts = np.bincount(np.asarray(vcop.draw_orders(keys)), minlength=6)
    assert counts.min() > 900 and counts.max() < 1100, counts
    keep = np.asarray(vcop.dropout_masks(keys[:100], 1536, 0.5))
    assert 0.47 < keep.mean() < 0.53 and not (keep[0] == keep[1]).all()


def test_eval_orders_come_from_the_example_index() -> None:
    index = jnp.array([7, 3, 7])
    labels = vcop.draw_orders(vcop.eval_keys(index))
    assert labels[0] == labels[2]
    np.testing.assert_array_equal(labels, vcop.draw_orders(vcop.eval_keys(index)))


def test_config_and_tuple_spec() -> None:
    config = vcop_config()
    vcop.validate_config(config)
    spec = vcop.tuple_spec(config)
    assert spec.offsets == (0, 24, 48) and spec.span == 64 and not spec.need_remote
    config.vcop.num_clips = 1
    with pytest.raises(config_utils.ConfigError, match=r"config\.vcop\.num_clips=1"):
        vcop.validate_config(config)
    config.vcop.num_clips = 3
    config.model.modality = "flow"
    with pytest.raises(config_utils.ConfigError, match=r"config\.model\.modality='flow'"):
        vcop.validate_config(config)


# ----------------------------------------------------------------------------- the network


def vcop_config(**model) -> ml_collections.ConfigDict:
    config = default_config.get_config("r3d")
    config.vcop = vcop.default_config()
    config.model.width = WIDTH
    config.model.conv_impl = "native"
    config.model.modality = "rgb"
    config.optimizer.scale_with_batch = False
    for key, value in model.items():
        config.model[key] = value
    return config


def test_model_structure_and_names() -> None:
    """fc7 (2F -> 512) and fc8 (3 x 512 -> 6) under `head`, the backbone's BatchNorm in 3
    statistic groups (one per clip position, as VCPModel)."""
    model = nnx.eval_shape(lambda: vcop.create_model(vcop_config(), rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param).to_pure_dict()
    head = jax.tree.map(lambda x: x.shape, params["head"])
    f = 8 * WIDTH
    assert head == {"fc7": {"kernel": (2 * f, 512), "bias": (512,)},
                    "fc8": {"kernel": (3 * 512, 6), "bias": (6,)}}
    assert set(params) == {backbone_lib.BACKBONE, "head"}
    groups = {m.batch_groups for _, m in nnx.iter_modules(model)
              if isinstance(m, models.BatchNorm)}
    assert groups == {3}
    pooled = nnx.eval_shape(lambda: vcop.create_model(vcop_config(bn_stats="pooled"),
                                                      rngs=nnx.Rngs(0)))
    assert {m.batch_groups for _, m in nnx.iter_modules(pooled)
            if isinstance(m, models.BatchNorm)} == {1}
    full = nnx.eval_shape(lambda: vcop.VCOPHead(512, rngs=nnx.Rngs(0)))
    assert models.count_params(full) == 1024 * 512 + 512 + 1536 * 6 + 6  # [V]'s fc7 + fc8


def test_head_pairs_and_dropout() -> None:
    """The head by hand: pairs (0,1), (0,2), (1,2) through fc7 + ReLU, concatenated, dropout with
    the masks of `dropout_keys` (kept values x2), fc8."""
    head = vcop.VCOPHead(5, rngs=nnx.Rngs(0))
    feats = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 5))
    keys = jax.random.split(jax.random.PRNGKey(2), 2)
    w7, b7 = head.fc7.kernel[...], head.fc7.bias[...]
    hidden = jnp.concatenate([jax.nn.relu(jnp.concatenate([feats[:, i], feats[:, j]], -1) @ w7
                                          + b7) for i, j in ((0, 1), (0, 2), (1, 2))], -1)
    keep = vcop.dropout_masks(keys, 3 * 512, 0.5)
    expected = (hidden * keep * 2.0) @ head.fc8.kernel[...] + head.fc8.bias[...]
    np.testing.assert_allclose(head(feats, keys), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="dropout_keys"):
        head(feats)
    head.eval()
    expected = hidden @ head.fc8.kernel[...] + head.fc8.bias[...]
    np.testing.assert_allclose(head(feats), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # 45 s on 2 cores: VCOP's compiled train and eval steps
def test_train_and_eval_steps() -> None:
    """`train_step` (jit) runs, and equals its pmap twin on 2 devices x 4 tuples (same orders,
    dropout masks, global BatchNorm statistics); `eval_step` counts every valid tuple once, per
    order."""
    config = vcop_config(modality="res")
    state, ctx = vcop.create_train_state(config)
    assert ctx.task == vcop.Task(3, 6, modality_lib.InputModality("res", "vcop"))
    frames = np.random.default_rng(0).integers(0, 256, (8, *TUPLES[1:]), np.uint8)
    batch = {"clips": jnp.asarray(frames)}
    step = jax.jit(functools.partial(vcop.train_step, ctx=ctx), compiler_options=_FAST_COMPILE)
    new_state, metrics = step(state, batch)
    assert int(new_state.step) == 1 and np.isfinite(float(metrics["loss"]))
    assert abs(float(metrics["loss"]) - math.log(6)) < 1.0

    p_state, p_ctx = vcop.create_train_state(config, bn_axis_name="batch")
    replicated = jax.tree.map(lambda x: jnp.stack([x] * 2), p_state)
    p_batch = {"clips": batch["clips"].reshape(2, 4, *TUPLES[1:])}
    p_step = jax.pmap(functools.partial(vcop.train_step, ctx=p_ctx), axis_name="batch",
                      devices=jax.devices()[:2]).lower(replicated, p_batch).compile(
                          compiler_options=_FAST_COMPILE)
    p_new, p_metrics = p_step(replicated, p_batch)
    np.testing.assert_allclose(p_metrics["loss"][0], metrics["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(p_new.params),
                    strict=True):
        np.testing.assert_allclose(b[0], a, rtol=1e-4, atol=1e-6)

    eval_batch = {"clips": batch["clips"], "index": jnp.arange(8),
                  "valid": jnp.array([True] * 6 + [False] * 2)}
    sums = jax.jit(functools.partial(vcop.eval_step, ctx=ctx),
                   compiler_options=_FAST_COMPILE)(new_state, eval_batch)
    assert float(sums["count"]) == 6 and float(sums["order_count"].sum()) == 6
    summary = pretrain.summarize_eval(jax.device_get(sums), vcop.order_names(), pretext="vcop")
    assert summary["val_tuples"] == 6 and "val_accuracy/210" in summary
    assert sum(map(sum, summary["val_confusion"])) == 6


# ----------------------------------------------------------------------------- residual frames


def test_residual_formulas_are_the_references() -> None:
    """[U] VCPN.diff: (roll(x, 1, T) - x + 1) / 2; [U] VCOPN(res=True): x - roll(x, 1, T), with
    torch.roll's wrap-around (frame 0 against the last frame)."""
    x = np.random.default_rng(0).random((2, 3, 5, 4, 4, 3)).astype(np.float32)
    shift = np.roll(x, 1, axis=2)  # roll on T of (B, N, T, H, W, C)
    np.testing.assert_array_equal(modality_lib.residual(x, "vcp"), ((shift - x) + 1) / 2)
    np.testing.assert_array_equal(modality_lib.residual(x, "vcop"), x - shift)
    np.testing.assert_array_equal(modality_lib.residual(x, "vcop")[:, :, 0], x[:, :, 0]
                                  - x[:, :, -1])
    np.testing.assert_array_equal(modality_lib.residual(x, "vcop")[:, :, 3], x[:, :, 3]
                                  - x[:, :, 2])
    r = modality_lib.residual(x, "vcp")
    assert 0 <= float(r.min()) and float(r.max()) <= 1


def test_extra_frame_has_no_wrap_around() -> None:
    """From T + 1 frames (the one before the clip first): frames 1..T-1 are the reference's,
    frame 0 differs the clip's first frame with its true predecessor."""
    y = np.random.default_rng(1).random((2, 6, 4, 4, 3)).astype(np.float32)
    clip = y[:, 1:]
    for formula in modality_lib.FORMULAS:
        out = np.asarray(modality_lib.residual_extra_frame(y, formula))
        reference = np.asarray(modality_lib.residual(clip, formula))
        assert out.shape == clip.shape
        np.testing.assert_array_equal(out[:, 1:], reference[:, 1:])
    np.testing.assert_array_equal(modality_lib.residual_extra_frame(y, "vcop")[:, 0],
                                  y[:, 1] - y[:, 0])
    m = modality_lib.InputModality("res", "vcp", "extra_frame")
    assert m.frames_needed(16) == 17 and modality_lib.InputModality().frames_needed(16) == 16
    np.testing.assert_array_equal(jax.jit(m)(y), modality_lib.residual_extra_frame(y, "vcp"))
    np.testing.assert_array_equal(modality_lib.InputModality()(clip), clip)


def test_modality_config() -> None:
    config = vcop_config()
    assert modality_lib.from_config(config) == modality_lib.InputModality("rgb", "vcp", "roll")
    config.model.modality = "res"
    assert modality_lib.from_config(config, "vcop").formula == "vcop"
    assert modality_lib.from_config(config, "vcp").formula == "vcp"
    with config.unlocked():
        config.model.residual_edge = "clamp"
    with pytest.raises(config_utils.ConfigError,
                       match=r"config\.model\.residual_edge='clamp'.*'roll', 'extra_frame'"):
        modality_lib.validate(config)
    config.model.residual_edge = None
    config.model.modality = None
    with pytest.raises(config_utils.ConfigError, match=r"config\.model\.modality=None"):
        modality_lib.validate(config)
    modality_lib.validate(config, allow_unset=True)


def test_checkpoint_modality() -> None:
    """Old and converted RGB checkpoints record nothing: RGB. A mismatch is refused with both
    modalities and the ways out named; forced, the config's wins; unset, the checkpoint's."""
    rgb = modality_lib.from_checkpoint_config({"model": {"arch": "r3d", "width": 4}})
    assert rgb == modality_lib.InputModality()
    res = modality_lib.from_checkpoint_config(
        {"model": {"modality": "res"}, "pretext": "vcop"})
    assert res == modality_lib.InputModality("res", "vcop", "roll")
    assert modality_lib.check_backbone_modality(res, None) == res
    assert modality_lib.check_backbone_modality(res, res) == res
    with pytest.raises(modality_lib.ModalityMismatchError) as info:
        modality_lib.check_backbone_modality(res, rgb, source="init_from=/runs/vcop_res")
    message = str(info.value)
    assert "init_from=/runs/vcop_res" in message and "residual frames" in message
    assert "RGB frames" in message and "config.model.modality='res'" in message
    assert "config.force_modality=True" in message
    assert modality_lib.check_backbone_modality(res, rgb, force=True) == rgb
    other = modality_lib.InputModality("res", "vcp")
    with pytest.raises(modality_lib.ModalityMismatchError, match="residual_formula='vcop'"):
        modality_lib.check_backbone_modality(res, other)
