"""BatchNorm statistics re-estimated before frozen evaluations (`vcp_jax.bn_calibration`)."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from configs import retrieval as retrieval_config
from tests.conftest import TINY_DATASET_CONFIG, tiny_config
from tests.tiny_configs import tiny_finetune_config
from vcp_jax import backbone as backbone_lib
from vcp_jax import (
    bn_calibration,
    checkpointing,
    config_utils,
    datasets,
    finetune,
    input_pipeline,
    models,
    parallel,
    pretrain,
    reporting,
    retrieval,
)


def _pure(tree) -> dict[str, np.ndarray]:
    return backbone_lib.flatten(jax.tree.map(np.asarray, nnx.to_pure_dict(tree)))


def _clip_stream(data_dir: Path, batch_size: int = 8):
    """Centre-cropped 8x24x24 clips of the tiny dataset's train videos, shuffled, endless."""
    config = tiny_config(data_dir)
    source = datasets.data_source(config.data, "train")
    sampler = input_pipeline.ClipSampler(source, 8, 24, random_crop_=False)
    return input_pipeline.train_stream(np.arange(len(source)), sampler,
                                       global_batch=batch_size, seed=0)


def _clip_forward(model, batch, index):
    del index
    return model(batch["clip"].astype(np.float32) / 255.0)


# --------------------------------------------------------------------------------------------
# The estimate
# --------------------------------------------------------------------------------------------


class _OneBatchNorm(nnx.Module):
    def __init__(self):
        # Three statistic groups, as the VCP model's: calibration uses one over all rows.
        self.bn = models.BatchNorm(5, batch_groups=3)

    def __call__(self, x):
        return self.bn(x)


def _numpy_population(batches: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The mean over the batches of each batch's mean and unbiased variance per channel."""
    axes = tuple(range(batches[0].ndim - 1))
    means = [b.astype(np.float64).mean(axes) for b in batches]
    variances = [b.astype(np.float64).var(axes, ddof=1) for b in batches]
    return np.mean(means, 0), np.mean(variances, 0)


def test_one_batchnorm_gets_the_population_statistics() -> None:
    rng = np.random.default_rng(0)
    # Batches with different means and spreads: a momentum EMA would weigh the last ones most.
    batches = [(rng.normal(2.0 * i, 1.0 + i, (6, 2, 3, 3, 5))).astype(np.float32)
               for i in range(4)]
    model = _OneBatchNorm()
    model.eval()
    before = _pure(nnx.state(model))
    stats = bn_calibration.estimate_batch_stats(
        model, ({"x": b} for b in batches), lambda m, b, i: m(b["x"]),
        parallel.JitStrategy([jax.devices()[0]]))
    mean, var = _numpy_population(batches)
    got = _pure(stats)
    np.testing.assert_allclose(got["bn/mean"], mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["bn/var"], var, rtol=1e-5)
    # The model itself is untouched: its statistics, parameters, mode and groups.
    after = _pure(nnx.state(model))
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)
    assert model.bn.use_running_average and model.bn.batch_groups == 3
    assert model.bn.momentum == 0.9


def test_first_layer_of_a_backbone_gets_the_population_statistics(tiny_dataset: Path) -> None:
    backbone = models.create_backbone("r3d", rngs=nnx.Rngs(params=0), width=4)
    stream = _clip_stream(tiny_dataset)
    batches = [stream[i] for i in range(3)]
    stats = bn_calibration.estimate_batch_stats(backbone, iter(batches), _clip_forward,
                                                parallel.JitStrategy([jax.devices()[0]]))
    # bn1's input is conv1's output, which no BatchNorm influences.
    conv1 = [np.asarray(backbone.conv1(b["clip"].astype(np.float32) / 255.0)) for b in batches]
    mean, var = _numpy_population(conv1)
    got = _pure(stats)
    np.testing.assert_allclose(got["bn1/mean"], mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["bn1/var"], var, rtol=1e-4)
    params = nnx.state(backbone, nnx.BatchStat)  # same structure as the model's own
    assert jax.tree.structure(stats) == jax.tree.structure(params)


def _features_summary(features: np.ndarray) -> tuple[float, float]:
    """(rms of the values, mean cosine similarity of different rows)."""
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    cosine = unit @ unit.T
    return (float(np.sqrt(np.mean(features**2))),
            float(cosine[~np.eye(len(features), dtype=bool)].mean()))


def test_a_random_backbones_features_spread_out(tiny_dataset: Path) -> None:
    backbone = models.create_backbone("r3d", rngs=nnx.Rngs(params=0), width=4)
    backbone.eval()
    stream = _clip_stream(tiny_dataset)
    clips = np.concatenate([stream[i]["clip"] for i in range(2)]) / 255.0  # 16 clips
    graphdef, params, initial = nnx.split(backbone, nnx.Param, nnx.BatchStat)
    pooled = jax.jit(lambda s, x: nnx.merge(graphdef, params, s)(x))
    stats = bn_calibration.estimate_batch_stats(
        backbone, (stream[i] for i in range(2, 34)), _clip_forward, parallel.JitStrategy())
    rms_before, cos_before = _features_summary(np.asarray(pooled(initial, clips)))
    rms_after, cos_after = _features_summary(np.asarray(pooled(stats, clips)))
    assert cos_before > 0.95, cos_before  # never-estimated statistics: nearly one direction
    assert rms_after > 10 * rms_before, (rms_before, rms_after)
    assert cos_after < 0.85, cos_after


@pytest.mark.slow
def test_jit_pmap_and_one_device_give_the_same_statistics(tiny_dataset: Path) -> None:
    assert jax.device_count() == 8, "conftest sets 8 simulated devices"
    config = tiny_config(tiny_dataset)
    train = pretrain.pretrain_data(config).train
    results = {}
    for name, strategy in (("one", parallel.JitStrategy([jax.devices()[0]])),
                           ("jit", parallel.JitStrategy()), ("pmap", parallel.PmapStrategy())):
        # The probe's model (per-clip statistic groups) and its calibration pass.
        state, ctx = pretrain.create_train_state(config, bn_axis_name=strategy.axis_name,
                                                 frozen_backbone=True)
        model = nnx.merge(ctx.eval_graphdef, state.params, state.batch_stats)
        forward = functools.partial(pretrain.calibration_forward, ctx=ctx,
                                    rng=np.asarray(state.rng))
        stats = bn_calibration.estimate_batch_stats(model, (train[i] for i in range(2)),
                                                    forward, strategy)
        assert jax.tree.structure(stats) == jax.tree.structure(state.batch_stats)
        results[name] = _pure(stats)
    assert not np.allclose(results["one"]["backbone/bn1/var"], 1.0)
    for name in ("jit", "pmap"):
        for key, value in results["one"].items():
            np.testing.assert_allclose(results[name][key], value, rtol=1e-4, atol=1e-6,
                                       err_msg=f"{name} {key}")


# --------------------------------------------------------------------------------------------
# The modes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "origin", "recalibrated", "statistics"), [
    ("auto", "random", True, "re-estimated"),
    ("auto", "init_from", False, "from checkpoint"),
    ("auto", "resumed", False, "from checkpoint"),
    ("always", "init_from", True, "re-estimated"),
    ("always", "resumed", False, "from checkpoint"),  # its head trained with the stored ones
    ("never", "random", False, "initial (never estimated)"),
    ("never", "init_from", False, "from checkpoint"),
])
def test_modes(tiny_dataset: Path, capsys, mode: str, origin: str, recalibrated: bool,
               statistics: str) -> None:
    config = tiny_finetune_config(tiny_dataset)
    config.bn_recalibration, config.bn_recalibration_clips = mode, 12
    backbone = models.create_backbone("r3d", rngs=nnx.Rngs(params=0), width=4)
    stats, record = bn_calibration.recalibrate(
        config, backbone, _clip_stream(tiny_dataset), _clip_forward, parallel.JitStrategy(),
        clips_per_batch=8, origin=origin)
    assert record["mode"] == mode and record["backbone"] == origin
    assert record["recalibrated"] is recalibrated and record["statistics"] == statistics
    line = capsys.readouterr().out
    if recalibrated:
        assert record["clips"] == 16 and record["batches"] == 2  # 12 clips: 2 batches of 8
        assert "BatchNorm statistics re-estimated on 16 training clips" in line
        assert not np.allclose(_pure(stats)["bn1/var"], 1.0)
    else:
        assert stats is None and "BatchNorm statistics: " in line


def test_config_errors_name_the_key(tiny_dataset: Path) -> None:
    config = tiny_finetune_config(tiny_dataset)
    config.bn_recalibration = "sometimes"
    with pytest.raises(config_utils.ConfigError,
                       match=r"config\.bn_recalibration='sometimes'.*'auto', 'always', 'never'"):
        bn_calibration.validate_config(config)
    config.bn_recalibration, config.bn_recalibration_clips = "auto", 0
    with pytest.raises(config_utils.ConfigError, match=r"config\.bn_recalibration_clips=0"):
        bn_calibration.validate_config(config)
    # Linear evaluation checks them before any data work; full fine-tuning ignores them.
    config.finetune.freeze_backbone = True
    with pytest.raises(config_utils.ConfigError, match="bn_recalibration_clips"):
        finetune.validate_config(config)
    config.finetune.freeze_backbone = False
    finetune.validate_config(config)


# --------------------------------------------------------------------------------------------
# The stages: what ran is in their metrics
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_probe_records_and_keeps_its_statistics(tiny_dataset: Path, tmp_path: Path) -> None:
    config = tiny_config(tiny_dataset)
    config.task = "probe"
    config.num_train_steps = 2
    config.bn_recalibration_clips = 48  # 2 batches of 8 tuples x 3 clips
    workdir = tmp_path / "probe"
    pretrain.train_vcp(config, workdir, frozen_backbone=True)
    record = reporting.read_json(workdir / "metrics.json")["bn_statistics"]
    assert record == {"mode": "auto", "recalibrated": True, "backbone": "random",
                      "statistics": "re-estimated", "clips": 48, "batches": 2}
    stored = backbone_lib.load_backbone(workdir).batch_stats  # the head trained with these
    assert not np.allclose(stored["bn1/var"], 1.0)

    # Resumed (extended by a step, as --allow_config_change=num_train_steps allows): the
    # checkpoint's statistics, not estimated again.
    config.num_train_steps = 3
    with checkpointing.allow_config_changes(["num_train_steps"]):
        pretrain.train_vcp(config, workdir, frozen_backbone=True)
    record = reporting.read_json(workdir / "metrics.json")["bn_statistics"]
    assert record == {"mode": "auto", "recalibrated": False, "backbone": "resumed",
                      "statistics": "from checkpoint"}
    again = backbone_lib.load_backbone(workdir).batch_stats
    for key, value in stored.items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)


@pytest.mark.slow
def test_linear_evaluation_records_its_statistics(tiny_dataset: Path, tmp_path: Path,
                                                  capsys) -> None:
    config = tiny_finetune_config(tiny_dataset, num_train_steps=1, bn_recalibration_clips=16)
    config.finetune.freeze_backbone = True
    result = finetune.run(config, tmp_path / "linear")
    assert result["bn_statistics"] == {"mode": "auto", "recalibrated": True,
                                       "backbone": "random", "statistics": "re-estimated",
                                       "clips": 16, "batches": 2}
    metrics = reporting.read_json(tmp_path / "linear" / "metrics.json")
    assert metrics["bn_statistics"] == result["bn_statistics"]
    assert "BatchNorm statistics re-estimated on 16 training clips (random backbone" in (
        capsys.readouterr().out)


def _save_backbone(workdir: Path, data_dir: Path) -> dict[str, np.ndarray]:
    """A width-4 R3D with random weights and distinctive BatchNorm statistics, as init_from."""
    backbone = models.create_backbone("r3d", rngs=nnx.Rngs(params=7), width=4)
    rng = np.random.default_rng(7)
    stats = jax.tree_util.tree_map_with_path(
        lambda path, x: (rng.uniform(0.5, 2.0, x.shape) if "var" in str(path[-1])
                         else rng.normal(0, 0.5, x.shape)).astype(np.float32),
        jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(backbone, nnx.BatchStat))))
    backbone_lib.save_backbone(workdir, params=nnx.to_pure_dict(nnx.state(backbone, nnx.Param)),
                               batch_stats=stats, config=tiny_config(data_dir))
    return backbone_lib.flatten(stats)


def _retrieval_config(data_dir: Path, **overrides):
    config = retrieval_config.get_config("dataset=ucf101")
    config.data.data_dir = str(data_dir)
    config.data.builder_config = TINY_DATASET_CONFIG
    config.data.crop_size = 24
    config.data.num_threads = 2
    config.retrieval.update(clip_len=8, num_clips=2, feature="pooled", num_examples=0)
    config.batch_size = 8
    config.bn_recalibration_clips = 16
    for key, value in overrides.items():
        config[key] = value
    return config


@pytest.mark.parametrize(("mode", "init", "recalibrated"), [
    ("auto", False, True), ("never", False, False), ("auto", True, False), ("always", True, True),
])
def test_retrieval_modes(tiny_dataset: Path, tmp_path: Path, mode: str, init: bool,
                         recalibrated: bool) -> None:
    config = _retrieval_config(tiny_dataset, bn_recalibration=mode)
    if init:
        _save_backbone(tmp_path / "pretrained", tiny_dataset)
        config.init_from = str(tmp_path / "pretrained")
    else:
        config.model.arch, config.model.width = "r3d", 4
    results = retrieval.run(config, tmp_path / "retrieval")
    record = results["bn_statistics"]
    assert record["recalibrated"] is recalibrated and record["mode"] == mode
    assert record["backbone"] == ("init_from" if init else "random")
    assert record["statistics"] == ("re-estimated" if recalibrated else "from checkpoint" if init
                                    else "initial (never estimated)")
    assert reporting.read_json(tmp_path / "retrieval" / "retrieval.json")["bn_statistics"] == (
        record)
    features = np.load(tmp_path / "retrieval" / "features.npz")["gallery_features"]
    _, cosine = _features_summary(features)
    if not init:  # a random backbone: spread out only with re-estimated statistics
        assert (cosine < 0.85) if recalibrated else (cosine > 0.95), cosine
