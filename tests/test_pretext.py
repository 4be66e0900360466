"""The pretext family wired into the stages: VCOP pretraining (`config.pretext='vcop'`) and
residual-frame input (`model.modality='res'`), carried from a checkpoint to the stages that start
from it; a mismatched modality refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import tiny_config
from tests.tiny_configs import tiny_finetune_config, tiny_pretraining, tiny_vcop_config
from vcp_jax import backbone as backbone_lib
from vcp_jax import checkpointing, config_utils, finetune, pretrain, vcop
from vcp_jax import modality as modality_lib


def _stored_config(workdir: Path) -> dict:
    step_dir, _ = backbone_lib.find_checkpoint(workdir)
    return checkpointing.read_config(step_dir)


@pytest.fixture(scope="module")
def saved_backbones(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory
                    ) -> dict[str, Path]:
    """Random width-4 R3D backbones saved with the config of a VCOP pretraining on RGB
    ('rgb') and of a VCP pretraining on residual frames ('res'): quick stand-ins for trained
    ones wherever only the hand-over matters."""
    from tests.test_retrieval import save_random_backbone

    root = tmp_path_factory.mktemp("saved_backbones")
    rgb = tiny_vcop_config(tiny_dataset)
    rgb.model.residual_formula = "vcop"
    res = tiny_config(tiny_dataset)
    res.model.modality, res.model.residual_formula = "res", "vcp"
    save_random_backbone(root / "rgb", rgb, seed=1)
    save_random_backbone(root / "res", res, seed=2)
    return {"rgb": root / "rgb", "res": root / "res"}


@pytest.fixture(scope="module")
def vcop_pretrained(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workdir of a 2-step VCOP pretraining on the tiny dataset (RGB)."""
    return tiny_pretraining(tiny_vcop_config(tiny_dataset),
                            tmp_path_factory.mktemp("vcop_pretrained"))


@pytest.mark.slow
def test_vcop_pretraining_reports_per_order_accuracy_and_fine_tunes(
    tiny_dataset: Path, vcop_pretrained: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    metrics = json.loads((vcop_pretrained / "metrics.json").read_text())
    assert metrics["pretext"] == "vcop" and metrics["modality"]["modality"] == "rgb"
    names = vcop.order_names(3)
    assert metrics["order_names"] == list(names)
    assert "val_vcp_accuracy" not in metrics and "option_names" not in metrics
    assert 0 <= metrics["val_vcop_accuracy"] <= 1
    assert metrics["chance_accuracy"] == pytest.approx(1 / 6)
    for name in names:
        assert f"val_accuracy/{name}" in metrics and f"val_order_fraction/{name}" in metrics
    assert sum(metrics[f"val_order_fraction/{n}"] for n in names) == pytest.approx(1)
    stored = _stored_config(vcop_pretrained)
    assert stored["pretext"] == "vcop"
    assert stored["model"]["modality"] == "rgb" and stored["model"]["residual_formula"] == "vcop"

    # Its backbone fine-tunes through init_from like VCP's; the head is reported as not loaded.
    capsys.readouterr()
    config = tiny_finetune_config(tiny_dataset, pretrained=vcop_pretrained, num_train_steps=1)
    result = finetune.run(config, tmp_path / "ft")
    out = capsys.readouterr().out
    assert "loaded the r3d width 4 backbone" in out and "not loaded: head" in out
    assert 0 <= result["test"]["video_top1"] <= 1
    assert result["modality"]["modality"] == "rgb"


def test_pretext_is_validated(tiny_dataset: Path, tmp_path: Path) -> None:
    config = tiny_config(tiny_dataset)
    config.pretext = "vcpp"
    with pytest.raises(config_utils.ConfigError, match=r"config\.pretext.*'vcp'.*'vcop'"):
        pretrain.run(config, tmp_path / "w")
    config = tiny_vcop_config(tiny_dataset)
    config.vcop.num_clips = 1
    with pytest.raises(config_utils.ConfigError, match=r"config\.vcop\.num_clips"):
        pretrain.run(config, tmp_path / "w2")


# --------------------------------------------------------------------------------------------
# Residual frames, carried from pretraining to fine-tuning
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def res_pretrained(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workdir of a 2-step VCP pretraining on residual frames."""
    config = tiny_config(tiny_dataset)
    config.model.modality = "res"
    return tiny_pretraining(config, tmp_path_factory.mktemp("res_pretrained"))


@pytest.mark.slow
def test_residual_pretraining_fine_tunes_on_residual_frames(
    tiny_dataset: Path, res_pretrained: Path, tmp_path: Path
) -> None:
    metrics = json.loads((res_pretrained / "metrics.json").read_text())
    assert metrics["modality"] == {"modality": "res", "residual_formula": "vcp",
                                   "residual_edge": "roll"}
    assert _stored_config(res_pretrained)["model"]["modality"] == "res"
    # Fine-tuning leaves model.modality unset: the checkpoint's is applied.
    config = tiny_finetune_config(tiny_dataset, pretrained=res_pretrained, num_train_steps=1)
    assert config.model.modality is None
    result = finetune.run(config, tmp_path / "ft")
    assert result["modality"]["modality"] == "res"
    assert result["modality"]["residual_formula"] == "vcp"
    # ... and recorded in the fine-tuned checkpoint, for the stages after it.
    assert _stored_config(tmp_path / "ft")["model"]["modality"] == "res"


def test_a_modality_mismatch_is_refused_unless_forced(
    tiny_dataset: Path, saved_backbones: dict[str, Path], tmp_path: Path
) -> None:
    res_pretrained = saved_backbones["res"]
    config = tiny_finetune_config(tiny_dataset, pretrained=res_pretrained, num_train_steps=1)
    config.model.modality = "rgb"
    with pytest.raises(modality_lib.ModalityMismatchError,
                       match=r"residual frames.*RGB frames.*config\.force_modality"):
        finetune.run(config, tmp_path / "ft")
    assert not (tmp_path / "ft" / "checkpoints").exists()  # refused before any work
    # A matching explicit setting passes the check (it fails later only for other reasons).
    config.model.modality = "res"
    assert backbone_lib.resolve_init(config, tmp_path / "ft2") is not None
    assert config.model.residual_formula == "vcp"
    config = tiny_finetune_config(tiny_dataset, pretrained=res_pretrained, num_train_steps=1)
    config.model.modality = "rgb"
    config.force_modality = True
    backbone_lib.resolve_init(config, tmp_path / "ft3")
    assert config.model.modality == "rgb"


def test_the_probe_takes_the_checkpoints_modality(
    saved_backbones: dict[str, Path], tmp_path: Path
) -> None:
    res_pretrained = saved_backbones["res"]
    from configs import probe as probe_config

    config = probe_config.get_config()
    config.init_from = str(res_pretrained)
    assert config.model.modality is None
    backbone_lib.resolve_init(config, tmp_path / "probe")
    assert (config.model.modality, config.model.residual_formula) == ("res", "vcp")


# --------------------------------------------------------------------------------------------
# Merged retrieval: an RGB and a residual backbone together
# --------------------------------------------------------------------------------------------


def test_merged_retrieval_of_an_rgb_and_a_residual_backbone(
    tiny_dataset: Path, saved_backbones: dict[str, Path], tmp_path: Path
) -> None:
    vcop_pretrained, res_pretrained = saved_backbones["rgb"], saved_backbones["res"]
    import numpy as np

    from tests.test_retrieval import tiny_retrieval_config
    from vcp_jax import retrieval

    config = tiny_retrieval_config(tiny_dataset, topk=(1, 5), num_examples=0)
    config.init_from = str(vcop_pretrained)
    config.retrieval.merge_with = str(res_pretrained)
    config.retrieval.merge = "concat"
    results = retrieval.run(config, tmp_path / "merged")
    assert results["modality"]["modality"] == "rgb"
    merged = results["merged_with"]
    assert merged["modality"]["modality"] == "res" and merged["merge"] == "concat"
    dims = merged["feature_dims"]
    assert results["feature_dim"] == sum(dims) and len(merged["topk_percent_each"]) == 2
    saved = np.load(tmp_path / "merged" / "features.npz")
    for features in (saved["query_features"], saved["gallery_features"]):
        assert features.shape[1] == sum(dims)
        for part in (features[:, :dims[0]], features[:, dims[0]:]):  # each L2-normalised
            np.testing.assert_allclose(np.linalg.norm(part, axis=1), 1, rtol=1e-5)
    # The mean of the two normalised features (equal sizes here), and a bad switch named.
    np.testing.assert_allclose(
        retrieval.merge_features([saved["query_features"][:, :dims[0]],
                                  saved["query_features"][:, dims[0]:]], "mean"),
        (saved["query_features"][:, :dims[0]] + saved["query_features"][:, dims[0]:]) / 2,
        rtol=1e-6)
    config.retrieval.merge = "sum"
    with pytest.raises(config_utils.ConfigError, match=r"config\.retrieval\.merge"):
        retrieval.run(config, tmp_path / "bad")
