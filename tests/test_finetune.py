"""Fine-tuning, the 10-clip test, the hand-over of a backbone between stages, and the probe."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from tests.conftest import tiny_config
from tests.tiny_configs import tiny_finetune_config, tiny_pretraining
from vcp_jax import backbone as backbone_lib
from vcp_jax import (
    checkpointing,
    config_utils,
    datasets,
    finetune,
    input_pipeline,
    parallel,
    pretrain,
)


def finetune_config(data_dir: Path, **overrides):
    """configs/finetune.py on the tiny dataset, shrunk like `tiny_config`."""
    return tiny_finetune_config(data_dir, **overrides)


@pytest.fixture(scope="module")
def pretrained(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workdir of a 2-step VCP pretraining run on the tiny dataset."""
    return tiny_pretraining(tiny_config(tiny_dataset), tmp_path_factory.mktemp("pretrained"))


def _data(config):
    return finetune.finetune_data(config)


# --------------------------------------------------------------------------------------------
# Steps on 1 and 8 devices
# --------------------------------------------------------------------------------------------


def _finetune_steps(strategy, config, batch, num_classes, steps=2):
    state, ctx = finetune.create_train_state(config, num_classes,
                                             bn_axis_name=strategy.axis_name)
    step = strategy.compile(functools.partial(finetune.train_step, ctx=ctx), donate_state=False)
    state = strategy.put_state(state)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, strategy.put_batch(batch))
        losses.append(float(strategy.fetch(metrics)["loss"]))
    return losses, strategy.get_state(state)


@pytest.mark.slow
def test_finetune_step_is_the_same_on_1_and_8_devices(tiny_dataset: Path) -> None:
    config = finetune_config(tiny_dataset)
    data = _data(config)
    batch = data.train[0]
    assert batch["clip"].shape == (8, 8, 24, 24, 3)
    n = len(data.class_names)
    one, one_state = _finetune_steps(parallel.JitStrategy([jax.devices()[0]]), config, batch, n)
    for strategy in (parallel.JitStrategy(), parallel.PmapStrategy()):
        losses, state = _finetune_steps(strategy, config, batch, n)
        np.testing.assert_allclose(losses, one, rtol=1e-5)
        for a, b in ((state.params, one_state.params),
                     (state.batch_stats, one_state.batch_stats)):
            jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
                         jax.tree.map(np.asarray, a), jax.tree.map(np.asarray, b))


def _test_outputs(strategy, config, data, state, ctx):
    test_fn = strategy.compile(functools.partial(finetune.test_step, ctx=ctx),
                               donate_state=False)
    iterator = input_pipeline.make_iterator(data.test, config, prefetch_processes=False)
    return parallel.gather(strategy.put_state(state), iterator, test_fn, strategy)


def test_ten_clip_test_counts_every_video_once_on_any_devices(tiny_dataset: Path) -> None:
    config = finetune_config(tiny_dataset)
    data = _data(config)
    assert data.num_test_videos % config.finetune.test_batch_size, "the test needs padding"
    state, ctx = finetune.create_train_state(config, len(data.class_names))
    one = _test_outputs(parallel.JitStrategy([jax.devices()[0]]), config, data, state, ctx)
    assert sorted(one["index"].tolist()) == list(range(data.num_test_videos))
    for strategy in (parallel.JitStrategy(), parallel.PmapStrategy()):
        state, ctx = finetune.create_train_state(config, len(data.class_names),
                                                 bn_axis_name=strategy.axis_name)
        out = _test_outputs(strategy, config, data, state, ctx)
        np.testing.assert_array_equal(out["index"], one["index"])
        np.testing.assert_array_equal(out["label"], one["label"])
        np.testing.assert_allclose(out["logits"], one["logits"], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(out["clip_correct"], one["clip_correct"])


def test_video_level_accuracy_from_clip_logits() -> None:
    names = ("a", "b", "c", "d", "e", "f")
    # 3 videos, mean logits already averaged; video 0 right, video 1 wrong but in the top 5,
    # video 2 wrong and its class ranked last.
    logits = np.array([[5.0, 1, 0, 0, 0, 0], [2.0, 1, 0, 0, 0, 0], [0.0, 5, 4, 3, 2, 1]])
    outputs = {"logits": logits, "label": np.array([0, 1, 0]),
               "clip_correct": np.array([10, 3, 0]), "index": np.arange(3)}
    summary = finetune.summarize_test(outputs, names, num_clips=10)
    assert summary["video_top1"] == pytest.approx(1 / 3)
    assert summary["video_top5"] == pytest.approx(2 / 3)
    assert summary["clip_top1"] == pytest.approx(13 / 30)
    assert summary["per_class_accuracy"]["a"] == pytest.approx(0.5)
    assert summary["per_class_accuracy"]["b"] == 0.0
    assert summary["per_class_accuracy"]["c"] is None  # no test video of class c
    confusion = np.asarray(summary["confusion"])
    assert confusion.sum() == 3 and confusion[0, 0] == 1 and confusion[1, 0] == 1
    assert confusion[0, 1] == 1
    # Per video, by index: the predicted class and the label's rank (top-k iff rank <= k).
    assert summary["per_video"] == {"index": [0, 1, 2], "label": [0, 1, 0],
                                    "predicted": [0, 0, 1], "label_rank": [1, 2, 6]}


# --------------------------------------------------------------------------------------------
# Stage to stage
# --------------------------------------------------------------------------------------------


def test_init_from_puts_exactly_the_backbone_in(tiny_dataset: Path, pretrained: Path,
                                                tmp_path: Path) -> None:
    config = finetune_config(tiny_dataset, pretrained=pretrained)
    source = backbone_lib.resolve_init(config, tmp_path / "new_workdir")
    assert (config.model.arch, config.model.width) == ("r3d", 4)
    assert source.dropped == ("head",)
    fresh, _ = finetune.create_train_state(config, 4)
    loaded = backbone_lib.init_backbone(fresh, source)
    # The backbone's parameters and BN statistics are the checkpoint's, exactly.
    saved = backbone_lib.flatten(pretrained_state(pretrained, config)["params"]["backbone"])
    got = backbone_lib.flatten(loaded.params.to_pure_dict()["backbone"])
    assert saved.keys() == got.keys()
    for key in saved:
        np.testing.assert_array_equal(got[key], saved[key])
    saved_bn = backbone_lib.flatten(
        pretrained_state(pretrained, config)["batch_stats"]["backbone"])
    got_bn = backbone_lib.flatten(loaded.batch_stats.to_pure_dict()["backbone"])
    for key in saved_bn:
        np.testing.assert_array_equal(got_bn[key], saved_bn[key])
    assert any(np.any(v != 0) for v in saved_bn.values())
    # Nothing else: the new head and the optimizer state are as initialised.
    jax.tree.map(np.testing.assert_array_equal, loaded.params["fc"], fresh.params["fc"])
    jax.tree.map(np.testing.assert_array_equal, loaded.opt_state, fresh.opt_state)


def pretrained_state(workdir: Path, config) -> dict:
    """The whole saved state, read with Orbax alone (NNX Variables' 'value' level removed)."""
    import orbax.checkpoint as ocp

    step_dir, _ = backbone_lib.find_checkpoint(workdir)
    restored = ocp.PyTreeCheckpointer().restore(step_dir / "state")

    def strip(tree):
        if isinstance(tree, dict):
            if set(tree) == {"value"}:
                return tree["value"]
            return {k: strip(v) for k, v in tree.items()}
        return tree

    return strip(restored)


def test_init_from_errors_name_the_checkpoint(tiny_dataset: Path, pretrained: Path,
                                              tmp_path: Path) -> None:
    config = finetune_config(tiny_dataset, init_from=str(tmp_path / "missing"))
    with pytest.raises(checkpointing.CheckpointError, match="missing.*does not exist"):
        backbone_lib.resolve_init(config, tmp_path / "w1")
    (tmp_path / "empty").mkdir()
    config = finetune_config(tiny_dataset, init_from=str(tmp_path / "empty"))
    with pytest.raises(checkpointing.CheckpointError, match="no checkpoint in"):
        backbone_lib.resolve_init(config, tmp_path / "w2")
    config = finetune_config(tiny_dataset, init_from=str(pretrained))
    config.model.arch = "c3d"
    with pytest.raises(checkpointing.CheckpointError,
                       match=rf"{pretrained}.*arch='r3d'.*model.arch='c3d'"):
        backbone_lib.resolve_init(config, tmp_path / "w3")
    config = finetune_config(tiny_dataset, init_from=str(pretrained))
    config.model.width = 8
    with pytest.raises(checkpointing.CheckpointError, match="width=4.*model.width=8"):
        backbone_lib.resolve_init(config, tmp_path / "w4")
    # A checkpoint without a backbone (e.g. some other pytree saved by Orbax).
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(
        tmp_path / "other" / "checkpoints", options=ocp.CheckpointManagerOptions(create=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()})
    manager.save(1, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"params": {"encoder": {"w": np.ones(3)}},
                                     "batch_stats": {}}),
        config=ocp.args.JsonSave({"model": {"arch": "r3d", "width": 4}})))
    manager.wait_until_finished()
    config = finetune_config(tiny_dataset, init_from=str(tmp_path / "other"))
    with pytest.raises(checkpointing.CheckpointError, match=r"has no backbone.*encoder"):
        backbone_lib.resolve_init(config, tmp_path / "w5")
    # A backbone of the right name but another shape: names the key.
    other = finetune_config(tiny_dataset)
    other.model.width = 8
    state8, _ = finetune.create_train_state(other, 4)
    backbone_lib.save_backbone(
        tmp_path / "wide", params=state8.params.to_pure_dict()["backbone"],
        batch_stats=state8.batch_stats.to_pure_dict()["backbone"],
        config={"model": {"arch": "r3d", "width": 4}})  # lies about its width
    config = finetune_config(tiny_dataset, init_from=str(tmp_path / "wide"))
    source = backbone_lib.resolve_init(config, tmp_path / "w6")
    fresh, _ = finetune.create_train_state(config, 4)
    with pytest.raises(checkpointing.CheckpointError, match=r"'bn1/bias'.*shape \(8,\)"):
        backbone_lib.init_backbone(fresh, source)


def test_a_fine_tuned_backbone_is_not_tested_on_another_fold(
    tiny_dataset: Path, pretrained: Path, tmp_path: Path
) -> None:
    config = finetune_config(tiny_dataset)
    state, _ = finetune.create_train_state(config, 4)
    stored = finetune_config(tiny_dataset)
    stored.finetune.fold = 2
    backbone_lib.save_backbone(tmp_path / "ft2", params=state.params.to_pure_dict()["backbone"],
                               batch_stats=state.batch_stats.to_pure_dict()["backbone"],
                               config=stored)
    source = backbone_lib.load_backbone(tmp_path / "ft2")
    assert source.fold == 2

    def check(data) -> None:  # what every stage passes: the fold it tests on
        backbone_lib.check_fold(source, dataset=data.name, fold=datasets.fold_of(data),
                                builder_config_of=functools.partial(datasets.with_fold, data))

    with pytest.raises(config_utils.UserError,
                       match="fine-tuned on ucf101_frames fold 2.*builder_config='split2_32x43'"):
        check(config.data)  # config.data is fold 1
    config.data.builder_config = "split2_32x43"
    check(config.data)  # its own fold: fine


# --------------------------------------------------------------------------------------------
# Frozen backbones (the probe, linear evaluation)
# --------------------------------------------------------------------------------------------


def _backbone_arrays(state) -> tuple[dict, dict]:
    return (backbone_lib.flatten(jax.tree.map(np.asarray, state.params.to_pure_dict()
                                               ["backbone"])),
            backbone_lib.flatten(jax.tree.map(np.asarray, state.batch_stats.to_pure_dict()
                                               ["backbone"])))


def test_probe_steps_leave_the_backbone_bit_identical(tiny_dataset: Path) -> None:
    config = tiny_config(tiny_dataset)
    config.optimizer.learning_rate = 0.5
    batch = pretrain.pretrain_data(config).train[0]
    strategy = parallel.JitStrategy()
    state, ctx = pretrain.create_train_state(config, frozen_backbone=True)
    before = _backbone_arrays(state)
    head_before = np.asarray(state.params["head"]["fc"]["kernel"][...]).copy()
    step = strategy.compile(functools.partial(pretrain.train_step, ctx=ctx), donate_state=False)
    placed = strategy.put_state(state)
    for _ in range(3):
        placed, _ = step(placed, strategy.put_batch(batch))
    after = _backbone_arrays(strategy.get_state(placed))
    for b, a in zip(before, after, strict=True):
        for key in b:
            assert b[key].tobytes() == a[key].tobytes(), key
    head_after = np.asarray(strategy.get_state(placed).params["head"]["fc"]["kernel"][...])
    assert np.abs(head_after - head_before).max() > 1e-4  # the head did train


def test_frozen_backbone_gets_no_gradient(tiny_dataset: Path) -> None:
    config = finetune_config(tiny_dataset)
    config.finetune.freeze_backbone = True
    state, ctx = finetune.create_train_state(config, 4)
    assert ctx.train_graphdef is ctx.eval_graphdef  # BatchNorm in inference mode
    batch = jax.tree.map(np.asarray, _data(config).train[0])
    # The optimizer holds no state for the backbone (multi_transform with set_to_zero).
    momentum_leaves = jax.tree.leaves(state.opt_state)
    head_size = sum(x.size for x in jax.tree.leaves(state.params["fc"]))
    assert sum(np.size(x) for x in momentum_leaves) <= head_size + 8
    # The backward pass never reaches a backbone convolution.
    jaxpr = jax.make_jaxpr(functools.partial(finetune.train_step, ctx=ctx))(state, batch)
    text = str(jaxpr)
    forward_convs = text.count("conv_general_dilated")
    model = nnx.merge(ctx.eval_graphdef, state.params, state.batch_stats)
    inference = str(jax.make_jaxpr(lambda x: model(x))(np.zeros((8, 8, 24, 24, 3), np.float32)))
    assert forward_convs == inference.count("conv_general_dilated")


# --------------------------------------------------------------------------------------------
# The stage end to end
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_finetune_run_from_a_pretraining_workdir(tiny_dataset: Path, pretrained: Path,
                                                 tmp_path: Path) -> None:
    config = finetune_config(tiny_dataset, pretrained=pretrained)
    result = finetune.run(config, tmp_path / "ft")
    assert result["fold"] == 1 and result["best_checkpoint_step"] in (1, 2)
    test = result["test"]
    assert test["num_test_videos"] == 12 and test["num_clips"] == 3
    assert 0 <= test["video_top1"] <= test["video_top5"] <= 1
    for name in ("metrics.json", "confusion.json", "confusion.png", "provenance.json"):
        assert (tmp_path / "ft" / name).is_file(), name
    provenance = (tmp_path / "ft" / "provenance.json").read_text()
    assert str(pretrained) in provenance and "video_ids_sha256_16" in provenance
    # The chosen checkpoint's accuracy on its own training videos, next to the test's.
    assert result["chosen_step"] == result["best_checkpoint_step"]
    assert result["chosen_by"] == "lowest validation loss"
    assert 0 <= test["train_video_top1"] <= 1
    assert result["train_eval"]["num_videos"] == result["num_train_videos"]
    # Run again: the fold is done, nothing is recomputed.
    again = finetune.run(config, tmp_path / "ft")
    assert again["test"]["video_top1"] == test["video_top1"]


# --------------------------------------------------------------------------------------------
# Few labelled videos: a stratified subset of the training videos
# --------------------------------------------------------------------------------------------


def test_train_subset_is_stratified_seeded_and_checked() -> None:
    labels = np.repeat(np.arange(3), 10)  # 3 classes x 10 videos
    train_idx = np.setdiff1d(np.arange(30), [0, 1, 2, 15])  # class 0 keeps 7, class 1 keeps 9
    names = ("a", "b", "c")
    subset = finetune.train_subset(train_idx, labels, 5, 0, names)
    assert np.isin(subset, train_idx).all() and len(np.unique(subset)) == 15
    np.testing.assert_array_equal(np.bincount(labels[subset]), [5, 5, 5])
    np.testing.assert_array_equal(finetune.train_subset(train_idx, labels, 5, 0, names), subset)
    others = [finetune.train_subset(train_idx, labels, 5, seed, names) for seed in (1, 2)]
    assert not any(np.array_equal(o, subset) for o in others)
    with pytest.raises(config_utils.UserError,
                       match=r"train_videos_per_class=8, but class 'a' has only 7"):
        finetune.train_subset(train_idx, labels, 8, 0, names)


def test_finetune_data_with_few_videos_per_class(tiny_dataset: Path) -> None:
    config = finetune_config(tiny_dataset)
    full = _data(config)
    config.data.train_videos_per_class = 2
    data = _data(config)
    assert data.num_train_videos == 2 * len(data.class_names)
    assert data.train_class_counts == dict.fromkeys(data.class_names, 2)
    assert data.provenance["train"]["train_videos_per_class"] == 2
    # The validation and test videos do not change; the subset depends on the seed only.
    assert data.num_val_videos == full.num_val_videos
    assert data.provenance["validation"] == full.provenance["validation"]
    assert data.provenance["test"] == full.provenance["test"]
    assert _data(config).provenance["train"] == data.provenance["train"]
    config.seed = 1
    assert _data(config).provenance["train"] != data.provenance["train"]
    config.data.train_videos_per_class = 100
    with pytest.raises(config_utils.UserError, match="train_videos_per_class=100, but class"):
        _data(config)


@pytest.mark.slow
def test_finetune_without_validation_videos_tests_the_last_step(
        tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = finetune_config(tiny_dataset)
    config.data.num_val_videos = 0
    config.data.train_videos_per_class = 1
    config.optimizer.base_batch_size = 4  # scale_with_batch: 1e-3 x 8 / 4
    result = finetune.run(config, tmp_path / "ft")
    assert result["num_val_videos"] == 0 and result["num_train_videos"] == 4
    assert result["chosen_step"] == config.num_train_steps
    assert result["chosen_by"] == "last step (no validation videos)"
    assert result["train_videos_per_class"] == 1
    assert result["train_eval"]["num_videos"] == 4
    assert result["effective_learning_rate"] == pytest.approx(2e-3)
    out = capsys.readouterr().out
    assert "peak learning rate 0.002 (0.001 x batch 8 / 4)" in out, out
    assert re.search(r"^fold 1: test video top-1 \d\.\d\d \(train \d\.\d\d\) at step 2$", out,
                     flags=re.MULTILINE), out
