"""`python -m vcp_jax.convert_torch`: reference checkpoints (written here by `torch.save` from the
reference architectures in tests/torch_reference.py, with the reference's key names) become
vcp-jax backbone checkpoints that give the reference's outputs and fine-tune."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default as default_config
from configs import finetune as finetune_config
from vcp_jax import backbone as backbone_lib
from vcp_jax import checkpointing, finetune, models, trainer, vcop
from vcp_jax import convert_torch as ct
from vcp_jax import modality as modality_lib
from vcp_jax.config_utils import ConfigError

torch = pytest.importorskip("torch")
from tests import torch_reference as ref  # noqa: E402 - needs torch

WIDTH = 4
EXPECTED_PARAMS = {"c3d": 27_661_440, "r3d": 14_361_792, "r21d": 14_365_303}  # docs/method.md §2
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _randomized(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    return ref.randomize_(module, torch.Generator().manual_seed(seed)).eval()


# ----------------------------------------------------------------------------- the key table


@pytest.mark.parametrize("arch", models.ARCHS)
def test_key_table_is_the_reference_state_dict(arch: str) -> None:
    for width in (WIDTH, 64):
        with torch.device("meta"):  # shapes only
            state_dict = ref.create_backbone(arch, width).state_dict()
        table = ct.key_table(arch, width)
        assert set(table) == {k for k in state_dict if not k.endswith("num_batches_tracked")}
        for key, entry in table.items():
            assert entry.torch_shape == tuple(state_dict[key].shape), key
    num_params = sum(int(np.prod(e.shape)) for e in ct.key_table(arch, 64).values()
                     if e.collection == "params")
    assert num_params == EXPECTED_PARAMS[arch]


def test_torch_key_names() -> None:
    assert ct.torch_key("c3d", "conv3a/conv/kernel") == "conv3a.weight"
    assert ct.torch_key("c3d", "conv3a/bn/mean") == "bn3a.running_mean"
    assert ct.torch_key("c3d", "conv1/bn/scale") == "bn1.weight"
    assert ct.torch_key("r3d", "conv1/kernel") == "conv1.temporal_spatial_conv.weight"
    assert (ct.torch_key("r3d", "layers/1/0/downsample_conv/kernel")
            == "conv3.block1.downsampleconv.temporal_spatial_conv.weight")
    assert ct.torch_key("r3d", "layers/0/1/bn2/var") == "conv2.blocks.0.bn2.running_var"
    assert ct.torch_key("r21d", "conv1/bn/bias") == "conv1.bn.bias"
    assert (ct.torch_key("r21d", "layers/3/0/conv1/temporal/kernel")
            == "conv5.block1.conv1.temporal_conv.weight")
    assert (ct.torch_key("r21d", "layers/2/0/downsample_bn/scale")
            == "conv4.block1.downsamplebn.weight")


# ----------------------------------------------------------------------------- files


def _bare(arch):
    return _randomized(ref.create_backbone(arch, WIDTH)), ""


def _classifier(arch):
    net = _randomized(ref.create_backbone(arch, WIDTH, with_classifier=True, num_classes=7))
    return net, ""


def _vcp(arch):
    return _randomized(ref.VCPN(ref.create_backbone(arch, WIDTH))), "base_network."


def _vcop(arch):
    return _randomized(ref.VCOPN(ref.create_backbone(arch, WIDTH))), "base_network."


def _data_parallel(arch):
    """[U]'s VCPN saved from `nn.DataParallel` (keys 'module.base_network...')."""
    vcpn = _randomized(ref.VCPN(ref.create_backbone(arch, WIDTH)))
    return torch.nn.DataParallel(vcpn), "module.base_network."


def _inner_data_parallel(arch):
    """A VCOPN whose backbone was wrapped (keys 'base_network.module...')."""
    vcopn = _randomized(ref.VCOPN(ref.create_backbone(arch, WIDTH)))
    vcopn.base_network = torch.nn.DataParallel(vcopn.base_network)
    return vcopn, "base_network.module."


# (arch, how the file was made, what it saves, the head keys it must drop, the head it imports)
FILES = [
    ("r3d", _bare, "state_dict", (), None),
    ("c3d", _classifier, "state_dict", ("linear.bias", "linear.weight"), None),
    ("r21d", _vcp, "state_dict", (), "vcp"),
    ("r3d", _vcop, "state_dict", (), "vcop"),
    ("c3d", _data_parallel, "wrapped", (), "vcp"),
    ("r21d", _inner_data_parallel, "wrapped", (), "vcop"),
]


@functools.partial(jax.jit, static_argnums=0, compiler_options=_FAST_COMPILE)
def _forward(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


def _backbone_of(net: torch.nn.Module) -> torch.nn.Module:
    net = getattr(net, "module", net)
    net = getattr(net, "base_network", net)
    return getattr(net, "module", net)


def _features(net: torch.nn.Module, clips: torch.Tensor) -> np.ndarray:
    backbone = _backbone_of(net)
    with torch.no_grad():
        if getattr(backbone, "with_classifier", False):
            backbone.with_classifier = False  # the features the classifier's linear reads
            try:
                return backbone(clips).numpy()
            finally:
                backbone.with_classifier = True
        return backbone(clips).numpy()


@pytest.mark.parametrize("arch,make,saved,dropped,pretext", FILES,
                         ids=[f"{a}-{m.__name__.strip('_')}" for a, m, _, _, _ in FILES])
def test_convert_reference_checkpoint(tmp_path, capsys, arch, make, saved, dropped,
                                      pretext) -> None:
    net, prefix = make(arch)
    state_dict = net.state_dict()
    assert any(k.endswith("num_batches_tracked") for k in state_dict)
    path = tmp_path / "model.pt"
    torch.save(state_dict if saved == "state_dict" else {"state_dict": state_dict, "epoch": 3},
               path)
    out = tmp_path / "converted"

    assert ct.main(["--arch", arch, "--checkpoint", str(path), "--out", str(out)]) == 0
    console = capsys.readouterr().out
    assert f"{arch} width {WIDTH}" in console
    if dropped:
        assert "dropped (heads): " + ", ".join(dropped) in console
    else:
        assert "dropped" not in console
    if pretext:
        assert f"imported the {pretext.upper()} head" in console
    else:
        assert "imported" not in console

    loaded = backbone_lib.load_backbone(out)
    assert loaded.arch == arch and loaded.width == WIDTH and loaded.task == "convert_torch"
    assert loaded.config["source"] == str(path.absolute())
    assert loaded.config.get("pretext") == pretext
    assert loaded.dropped == (("head",) if pretext else ())  # stages read the backbone only
    # Exactly the reference's tensors, in vcp-jax's layout.
    table = ct.key_table(arch, WIDTH)
    for key, entry in table.items():
        values = loaded.params if entry.collection == "params" else loaded.batch_stats
        np.testing.assert_array_equal(
            values[entry.path], ct.to_jax_layout(state_dict[prefix + key].numpy()), err_msg=key)
    assert len(loaded.params) + len(loaded.batch_stats) == len(table)

    # The reference's outputs: a vcp-jax backbone with the loaded weights, in eval mode.
    backbone = nnx.eval_shape(lambda: models.create_backbone(arch, rngs=nnx.Rngs(0), width=WIDTH))
    for kind, values, what in ((nnx.Param, loaded.params, "parameters"),
                               (nnx.BatchStat, loaded.batch_stats, "BatchNorm statistics")):
        state = nnx.state(backbone, kind)
        target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), state.to_pure_dict())
        nnx.replace_by_pure_dict(state, backbone_lib.assign_backbone(
            target, values, what=what, source=loaded.path))
        nnx.update(backbone, state)
    backbone.eval()
    clips = torch.rand(2, 3, 8, 16, 16, generator=torch.Generator().manual_seed(5))
    expected = _features(net, clips)
    actual = _forward(*nnx.split(backbone), jnp.asarray(np.moveaxis(clips.numpy(), 1, -1)))
    assert np.abs(actual - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.slow
def test_converted_checkpoint_fine_tunes(tmp_path) -> None:
    """Fine-tuning with `init_from` a converted VCP model: the stage takes arch and width from
    the checkpoint, its classifier's backbone gives the reference's features, and it trains."""
    net, _ = _vcp("r3d")
    torch.save(net.state_dict(), tmp_path / "vcp.pt")
    ct.convert("r3d", tmp_path / "vcp.pt", tmp_path / "converted")

    config = finetune_config.get_config()
    config.init_from = str(tmp_path / "converted")
    config.model.conv_impl = "native"
    config.optimizer.learning_rate = 0.05
    config.num_train_steps = 10
    source = backbone_lib.resolve_init(config, tmp_path / "finetune")
    assert (config.model.arch, config.model.width) == ("r3d", WIDTH)
    state, ctx = finetune.create_train_state(config, num_classes=3)
    state = backbone_lib.init_backbone(state, source)

    clips = torch.rand(2, 3, 8, 16, 16, generator=torch.Generator().manual_seed(6))
    expected = _features(net, clips)
    actual = _forward(*nnx.split(trainer.eval_model(state, ctx).backbone),
                      jnp.asarray(np.moveaxis(clips.numpy(), 1, -1)))
    assert np.abs(actual - expected).max() <= 1e-5 * np.abs(expected).max()

    frames = np.random.default_rng(0).integers(0, 256, (2, 8, 16, 16, 3), np.uint8)
    batch = {"clip": jnp.asarray(frames), "label": jnp.array([0, 2])}
    step = jax.jit(functools.partial(finetune.train_step, ctx=ctx),
                   compiler_options=_FAST_COMPILE)
    losses = []
    for _ in range(3):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


# ----------------------------------------------------------------------------- VCOP with its head


def test_vcop_checkpoint_converts_with_its_head(tmp_path, capsys) -> None:
    """A `torch.save` of [U]'s VCOPN(res=True) state dict (the reference's keys: `base_network.*`
    with `num_batches_tracked`, `fc7.*`, `fc8.*`) converts with `--modality res` into a checkpoint
    whose backbone and head make vcp-jax's VCOP model give the reference's logits (inference
    mode, residual input), and whose config records the modality and the pretext."""
    net = _randomized(ref.VCOPN(ref.create_backbone("r3d", WIDTH), res=True), seed=3)
    state_dict = net.state_dict()
    assert {"fc7.weight", "fc7.bias", "fc8.weight", "fc8.bias",
            "base_network.bn1.num_batches_tracked"} <= set(state_dict)
    torch.save(state_dict, tmp_path / "vcop.pt")
    out = tmp_path / "converted"
    assert ct.main(["--arch", "r3d", "--checkpoint", str(tmp_path / "vcop.pt"), "--out", str(out),
                    "--modality", "res"]) == 0
    console = capsys.readouterr().out
    assert ("imported the VCOP head (fc7.bias, fc7.weight, fc8.bias, fc8.weight: 3 clips, 6 "
            "classes) as head/") in console and "res input" in console

    head, config = ct.load_head(out)
    assert config["pretext"] == "vcop" and config["head"] == {"num_clips": 3, "num_classes": 6}
    for name in ("fc7", "fc8"):
        np.testing.assert_array_equal(head[name]["kernel"], state_dict[f"{name}.weight"].numpy().T)
        np.testing.assert_array_equal(head[name]["bias"], state_dict[f"{name}.bias"].numpy())
    loaded = backbone_lib.load_backbone(out)
    recorded = modality_lib.from_checkpoint_config(loaded.config)
    assert recorded == modality_lib.InputModality("res", "vcop", "roll")

    # As a VCOP stage would start from it: backbone (init_from) and head, the recorded modality.
    config = default_config.get_config("r3d")
    config.vcop = vcop.default_config()
    config.model.width = WIDTH
    config.model.conv_impl = "native"
    with config.unlocked():
        config.model.update(recorded.to_config())
    state, ctx = vcop.create_train_state(config)
    assert ctx.task.modality == recorded
    state = vcop.init_head(backbone_lib.init_backbone(state, loaded), head)
    model = trainer.eval_model(state, ctx)
    tuples = torch.rand(2, 3, 3, 8, 16, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = net(tuples).numpy()
    inputs = ctx.task.modality(jnp.asarray(np.moveaxis(tuples.numpy(), 2, -1)))
    actual = _forward(*nnx.split(model), inputs)
    assert actual.shape == (2, 6)
    assert np.abs(actual - expected).max() <= 1e-5 * np.abs(expected).max()


def test_head_errors_and_other_heads() -> None:
    """A VCOP head of the wrong shape names the key; a head that is neither VCP's nor VCOP's
    (`VCOPN_RNN`: `lstm.*` and `fc.*`) is dropped, the backbone converts."""
    backbone = {f"base_network.{k}": v for k, v in _state_dict("r3d").items()}
    f = 8 * WIDTH
    vcop_head = {"fc7.weight": torch.zeros(512, 2 * f), "fc7.bias": torch.zeros(512),
                 "fc8.weight": torch.zeros(6, 1536), "fc8.bias": torch.zeros(6)}
    converted = ct.convert_state_dict("r3d", {**backbone, **vcop_head})
    assert converted.pretext == "vcop" and converted.num_clips == 3
    assert converted.head["fc8"]["kernel"].shape == (1536, 6)
    four = {**vcop_head, "fc8.weight": torch.zeros(24, 3072), "fc8.bias": torch.zeros(24)}
    assert ct.convert_state_dict("r3d", {**backbone, **four}).num_clips == 4
    bad = {**vcop_head, "fc8.weight": torch.zeros(6, 1000)}
    assert "'fc8.weight' has shape (6, 1000)" in _error("r3d", {**backbone, **bad})
    bad = {**vcop_head, "fc7.weight": torch.zeros(512, 100)}
    assert "'fc7.weight' reads 100 features" in _error("r3d", {**backbone, **bad})
    partial = {k: v for k, v in vcop_head.items() if k != "fc8.bias"}
    assert "the VCOP head needs the keys" in _error("r3d", {**backbone, **partial})
    rnn = {"lstm.weight_ih_l0": torch.zeros(4, 2), "fc.weight": torch.zeros(6, 2),
           "fc.bias": torch.zeros(6)}
    converted = ct.convert_state_dict("r3d", {**backbone, **rnn})
    assert converted.head is None and converted.dropped == tuple(sorted(rnn))
    vcp_head = {"fc.weight": torch.zeros(5, 3 * f), "fc.bias": torch.zeros(5)}
    converted = ct.convert_state_dict("r3d", {**backbone, **vcp_head})
    assert (converted.pretext, converted.num_clips, converted.num_classes) == ("vcp", 3, 5)


def test_init_head_refuses_a_head_that_does_not_fit() -> None:
    config = default_config.get_config("r3d")
    config.vcop = vcop.default_config()
    config.model.width = WIDTH
    with config.unlocked():
        config.model.modality = "rgb"
    state, _ = vcop.create_train_state(config)
    head = jax.tree.map(np.asarray, nnx.to_pure_dict(state.params)["head"])
    head["fc8"]["kernel"] = np.zeros((1536, 24), np.float32)
    with pytest.raises(ConfigError, match=r"head 'fc8/kernel' has shape \(1536, 24\)"):
        vcop.init_head(state, head)


def test_load_head_of_a_backbone_checkpoint(tmp_path) -> None:
    torch.save(_randomized(ref.create_backbone("r3d", WIDTH)).state_dict(), tmp_path / "b.pt")
    ct.convert("r3d", tmp_path / "b.pt", tmp_path / "out")
    with pytest.raises(ct.ConversionError, match="holds no head"):
        ct.load_head(tmp_path / "out")
    config = backbone_lib.load_backbone(tmp_path / "out").config
    assert modality_lib.from_checkpoint_config(config) == modality_lib.InputModality()


# ----------------------------------------------------------------------------- errors


def _save(tmp_path: Path, obj) -> Path:
    path = tmp_path / "bad.pt"
    torch.save(obj, path)
    return path


def _state_dict(arch: str) -> dict:
    with torch.device("meta"):
        net = ref.create_backbone(arch, WIDTH)
    return {k: torch.zeros(v.shape) for k, v in net.state_dict().items()}


def _error(arch: str, state_dict: dict) -> str:
    with pytest.raises(ct.ConversionError) as info:
        ct.convert_state_dict(arch, state_dict, source="model.pt")
    return str(info.value)


def test_unknown_key_is_named() -> None:
    state_dict = _state_dict("r3d")
    state_dict["conv6.block1.bn1.weight"] = torch.zeros(4)
    message = _error("r3d", state_dict)
    assert "unknown keys conv6.block1.bn1.weight" in message and "model.pt" in message
    vcp = {f"base_network.{k}": v for k, v in _state_dict("r3d").items()}
    vcp["projector.weight"] = torch.zeros(3, 3)  # not a head the reference has
    assert "unknown keys projector.weight" in _error("r3d", vcp)


def test_missing_key_is_named() -> None:
    state_dict = _state_dict("c3d")
    del state_dict["bn4b.running_var"]
    assert "missing keys bn4b.running_var" in _error("c3d", state_dict)
    vcp = {f"base_network.{k}": v for k, v in _state_dict("c3d").items()}
    del vcp["base_network.conv2.weight"]
    assert "missing keys base_network.conv2.weight" in _error("c3d", vcp)
    assert "no backbone key 'bn1.weight'" in _error("c3d", {"fc.weight": torch.zeros(2, 2)})


def test_shape_mismatch_is_named() -> None:
    state_dict = _state_dict("r21d")
    state_dict["conv3.block1.conv2.spatial_conv.weight"] = torch.zeros(5, 8, 1, 3, 3)
    message = _error("r21d", state_dict)
    assert "'conv3.block1.conv2.spatial_conv.weight' has shape (5, 8, 1, 3, 3)" in message
    expected = ct.key_table("r21d", WIDTH)["conv3.block1.conv2.spatial_conv.weight"].torch_shape
    assert str(expected) in message


def test_wrong_arch_names_the_right_one() -> None:
    message = _error("c3d", _state_dict("r21d"))
    assert "use --arch r21d" in message and "conv1.spatial_conv.weight" in message


def test_unreadable_files(tmp_path, capsys) -> None:
    with pytest.raises(ct.ConversionError, match="holds no state dict"):
        ct.load_state_dict(_save(tmp_path, {"epoch": 3, "args": "x"}))
    with pytest.raises(ct.ConversionError, match="not a state dict"):
        ct.load_state_dict(_save(tmp_path, [torch.zeros(2)]))
    with pytest.raises(ct.ConversionError, match="is not a file"):
        ct.load_state_dict(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ct.ConversionError, match="cannot read"):
        ct.load_state_dict(tmp_path / "junk.pt")
    nested = {"model_state_dict": {"state_dict": _state_dict("r3d")}}
    assert set(ct.load_state_dict(_save(tmp_path, nested))) == set(_state_dict("r3d"))

    out = tmp_path / "out"
    assert ct.main(["--arch", "c3d", "--checkpoint", str(_save(tmp_path, _state_dict("r3d"))),
                    "--out", str(out)]) == 2
    assert "use --arch r3d" in capsys.readouterr().err
    assert not out.exists()


def test_a_non_finite_checkpoint_is_refused(tmp_path, capsys) -> None:
    """A NaN weight (a diverged PyTorch run) is refused, naming the tensor; nothing is written."""
    state_dict = _state_dict("r3d")
    state_dict["bn1.weight"][0] = float("nan")
    out = tmp_path / "out"
    assert ct.main(["--arch", "r3d", "--checkpoint", str(_save(tmp_path, state_dict)),
                    "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds non-finite values (1 of" in err and "diverged" in err, err
    assert not (out / checkpointing.CHECKPOINTS_DIR).exists()
