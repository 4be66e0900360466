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

from configs import finetune as finetune_config
from vcp_jax import checkpointing, finetune, models, trainer
from vcp_jax import convert_torch as ct

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


# (arch, how the file was made, what it saves, the head keys it must drop)
FILES = [
    ("r3d", _bare, "state_dict", ()),
    ("c3d", _classifier, "state_dict", ("linear.bias", "linear.weight")),
    ("r21d", _vcp, "state_dict", ("fc.bias", "fc.weight")),
    ("r3d", _vcop, "state_dict", ("fc7.bias", "fc7.weight", "fc8.bias", "fc8.weight")),
    ("c3d", _data_parallel, "wrapped", ("module.fc.bias", "module.fc.weight")),
    ("r21d", _inner_data_parallel, "wrapped",
     ("fc7.bias", "fc7.weight", "fc8.bias", "fc8.weight")),
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


@pytest.mark.parametrize("arch,make,saved,dropped", FILES,
                         ids=[f"{a}-{m.__name__.strip('_')}" for a, m, _, _ in FILES])
def test_convert_reference_checkpoint(tmp_path, capsys, arch, make, saved, dropped) -> None:
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

    loaded = checkpointing.load_backbone(out)
    assert loaded.arch == arch and loaded.width == WIDTH and loaded.task == "convert_torch"
    assert loaded.config["source"] == str(path.absolute())
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
        nnx.replace_by_pure_dict(state, checkpointing.assign_backbone(
            target, values, what=what, source=loaded.path))
        nnx.update(backbone, state)
    backbone.eval()
    clips = torch.rand(2, 3, 8, 16, 16, generator=torch.Generator().manual_seed(5))
    expected = _features(net, clips)
    actual = _forward(*nnx.split(backbone), jnp.asarray(np.moveaxis(clips.numpy(), 1, -1)))
    assert np.abs(actual - expected).max() <= 1e-5 * np.abs(expected).max()


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
    source = trainer.resolve_init(config, tmp_path / "finetune")
    assert (config.model.arch, config.model.width) == ("r3d", WIDTH)
    state, ctx = finetune.create_train_state(config, num_classes=3)
    state = trainer.init_backbone(state, source)

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
