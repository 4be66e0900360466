"""Retrieval: top-k against brute force, the conv5 feature, jit/pmap extraction, run(), errors."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from configs import retrieval as retrieval_config
from tests.conftest import TINY_DATASET_CONFIG, tiny_config
from vcp_jax import backbone as backbone_lib
from vcp_jax import (
    checkpointing,
    config_utils,
    datasets,
    input_pipeline,
    models,
    parallel,
    reporting,
    retrieval,
)
from vcp_jax.stats import retrieval_chance

# --------------------------------------------------------------------------------------------
# Top-k neighbours and accuracy
# --------------------------------------------------------------------------------------------


def brute_force(queries: np.ndarray, gallery: np.ndarray, k: int):
    """Cosine similarities in float64, all sorted (stable: ties towards the lower index)."""
    q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    g = gallery / np.maximum(np.linalg.norm(gallery, axis=1, keepdims=True), 1e-12)
    sims = q.astype(np.float64) @ g.astype(np.float64).T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), order


def tied_features(rng: np.random.Generator, n: int) -> np.ndarray:
    """Rows with four entries of +-1 in 6 dims: unit rows of +-0.5, every dot product exact,
    so there are many exact ties and float32 on the device equals float64 here."""
    x = np.zeros((n, 6), np.float32)
    for row in x:
        row[rng.choice(6, 4, replace=False)] = rng.choice([-1.0, 1.0], 4)
    return x


@pytest.mark.parametrize("k", [1, 5, 23, 40])  # 23: the whole gallery; 40: more than it
@pytest.mark.parametrize("chunk_size", [1, 5, 16, 100])  # 5 and 16 do not divide 37 queries
def test_topk_with_ties_equals_brute_force_exactly(k: int, chunk_size: int) -> None:
    rng = np.random.default_rng(0)
    queries, gallery = tied_features(rng, 37), tied_features(rng, 23)
    gallery[3] = gallery[17]  # identical rows: tied with every query
    gallery[5] = 0.0  # a zero row: similarity 0 to all, tied with orthogonal rows
    gallery[9] = -0.0
    sims, indices = retrieval.topk_neighbours(queries, gallery, k, chunk_size)
    want_sims, want_indices = brute_force(queries, gallery, k)
    assert indices.shape == sims.shape == (37, min(k, 23))
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_array_equal(sims, want_sims.astype(np.float32))
    # The fixture has ties that decide the list: the k-th and the next are equally similar.
    full, _ = brute_force(queries, gallery, 23)
    assert k >= 23 or (full[:, k - 1] == full[:, k]).any()
    assert (np.diff(full, axis=1) == 0).any()


def test_topk_on_gaussian_features_equals_brute_force() -> None:
    rng = np.random.default_rng(1)
    scales = rng.uniform(0.1, 10, (50, 1)).astype(np.float32)  # cosine ignores the scale
    queries = rng.normal(size=(50, 16)).astype(np.float32) * scales
    gallery = rng.normal(size=(70, 16)).astype(np.float32)
    sims, indices = retrieval.topk_neighbours(queries, gallery, 10, chunk_size=7)
    want_sims, want_indices = brute_force(queries, gallery, 10)
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_allclose(sims, want_sims, atol=1e-6)


def test_topk_accuracy_is_any_hit_among_the_first_k() -> None:
    rng = np.random.default_rng(2)
    queries, gallery = tied_features(rng, 40), tied_features(rng, 12)
    query_labels, gallery_labels = rng.integers(0, 4, 40), rng.integers(0, 4, 12)
    _, neighbours = retrieval.topk_neighbours(queries, gallery, 50, chunk_size=8)
    accuracy = retrieval.topk_accuracy(neighbours, query_labels, gallery_labels, (1, 3, 12, 50))
    _, order = brute_force(queries, gallery, 12)
    for k in (1, 3, 12, 50):
        hits = [(gallery_labels[order[q, :k]] == query_labels[q]).any() for q in range(40)]
        assert accuracy[k] == pytest.approx(np.mean(hits)), k
    assert accuracy[50] == accuracy[12]  # k beyond the gallery: the whole gallery
    assert accuracy[1] < accuracy[12]
    # Queries of classes 0, 1, 2 all ranked (2, 0, 1): first hits at ranks 2, 3 and 1.
    manual = retrieval.topk_accuracy(np.array([[2, 0, 1]] * 3), np.array([0, 1, 2]),
                                     np.array([0, 1, 2]), (1, 2, 3))
    assert manual == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: 1.0}
    # Per query, the first hit's rank: hit at k iff 0 < rank <= k, as topk_accuracy counts.
    ranks = retrieval.first_hit_ranks(neighbours, query_labels, gallery_labels)
    for k in (1, 3, 12, 50):
        assert ((ranks > 0) & (ranks <= k)).mean() == pytest.approx(accuracy[k]), k
    np.testing.assert_array_equal(retrieval.first_hit_ranks(
        np.array([[2, 0, 1]] * 3), np.array([0, 1, 2]), np.array([0, 1, 2])), [2, 3, 1])
    assert retrieval.first_hit_ranks(np.array([[0, 1]]), np.array([2]),
                                     np.array([0, 1, 2])).tolist() == [0]  # no hit


# --------------------------------------------------------------------------------------------
# The feature
# --------------------------------------------------------------------------------------------


def test_conv5_feature_is_the_max_pool_flattened_like_pytorch() -> None:
    rng = np.random.default_rng(3)
    fmap = rng.normal(size=(3, 2, 7, 7, 5)).astype(np.float32)  # (N, T', H', W', C)
    got = np.asarray(retrieval.clip_features(fmap, "conv5"))
    # Window = stride = (1, 2, 2), floor: the last row and column are dropped (7 -> 3).
    pooled = fmap[:, :, :6, :6].reshape(3, 2, 3, 2, 3, 2, 5).max(axis=(3, 5))
    want = pooled.transpose(0, 4, 1, 2, 3).reshape(3, -1)  # PyTorch's (C, T, H, W) order
    assert got.shape == (3, 5 * 2 * 3 * 3)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(np.asarray(retrieval.clip_features(fmap, "pooled")),
                               fmap.mean(axis=(1, 2, 3)), rtol=1e-6)


@pytest.mark.parametrize("arch", models.ARCHS)
def test_feature_is_9216_d_at_the_papers_size(arch: str) -> None:
    config = retrieval_config.get_config(f"arch={arch}")  # 16-frame 112x112 clips
    embedder = nnx.eval_shape(lambda: retrieval.Embedder(  # shapes only: nothing computed
        models.create_backbone(arch, rngs=nnx.Rngs(0), width=64), "conv5"))
    graphdef, params, stats = nnx.split(embedder, nnx.Param, nnx.BatchStat)
    assert retrieval.feature_dim(graphdef, (params, stats), config) == 512 * 2 * 3 * 3
    conv5 = jax.ShapeDtypeStruct((1, 2, 7, 7, 512), np.float32)
    assert jax.eval_shape(lambda m: retrieval.clip_features(m, "pooled"), conv5).shape == (1, 512)


# --------------------------------------------------------------------------------------------
# Extraction on the tiny dataset
# --------------------------------------------------------------------------------------------


def tiny_retrieval_config(data_dir: Path, **retrieval_settings):
    config = retrieval_config.get_config("dataset=ucf101")
    config.data.data_dir = str(data_dir)
    config.data.builder_config = TINY_DATASET_CONFIG
    config.data.crop_size = 24
    config.data.num_threads = 2
    config.retrieval.clip_len = 8
    config.retrieval.num_clips = 3
    config.batch_size = 8
    config.retrieval.update(retrieval_settings)
    return config


def test_jit_and_pmap_features_equal_one_device(tiny_dataset: Path) -> None:
    assert jax.device_count() == 8, "conftest sets 8 simulated devices"
    config = tiny_retrieval_config(tiny_dataset)
    config.model.arch, config.model.width = "r3d", 4
    source = datasets.data_source(config.data, "train")
    num_videos = len(source)
    assert num_videos % config.batch_size, "the last batch must need padding"
    graphdef, state = retrieval.create_embedder(config, None)
    batches = retrieval.video_batches(config, source, num_videos)
    results = {}
    for name, strategy in (("one", parallel.JitStrategy([jax.devices()[0]])),
                           ("jit", parallel.JitStrategy()), ("pmap", parallel.PmapStrategy())):
        step = strategy.compile(functools.partial(retrieval.feature_step, graphdef=graphdef),
                                donate_state=False)
        results[name] = retrieval.extract_features(strategy.put_state(state), batches, step,
                                                   strategy, config, desc=name)
    labels = datasets.video_index(source, "train").labels
    for name, out in results.items():
        np.testing.assert_array_equal(out["index"], np.arange(num_videos), err_msg=name)
        np.testing.assert_array_equal(out["label"], labels, err_msg=name)
        np.testing.assert_allclose(out["features"], results["one"]["features"],
                                   rtol=1e-5, atol=1e-6, err_msg=name)
    assert results["one"]["features"].shape == (num_videos, 4 * 8)  # 1x1x1 map of 32 channels


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def save_random_backbone(workdir: Path, config, seed: int = 7):
    """A width-4 R3D with random weights and random BatchNorm statistics, as a checkpoint."""
    backbone = models.create_backbone("r3d", rngs=nnx.Rngs(params=seed), width=4)
    rng = np.random.default_rng(seed)
    stats = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(backbone, nnx.BatchStat)))
    stats = jax.tree_util.tree_map_with_path(
        lambda path, x: (rng.uniform(0.5, 2.0, x.shape) if "var" in str(path[-1])
                         else rng.normal(0, 0.5, x.shape)).astype(np.float32), stats)
    params = nnx.to_pure_dict(nnx.state(backbone, nnx.Param))
    backbone_lib.save_backbone(workdir, params=params, batch_stats=stats, config=config)
    return params, stats


def test_run_end_to_end(tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    pretrained = tiny_config(tiny_dataset)  # the stored config: task 'pretrain', r3d, width 4
    params, stats = save_random_backbone(tmp_path / "pretrain", pretrained)
    config = tiny_retrieval_config(tiny_dataset, topk=(1, 5, 50), num_examples=3)
    config.init_from = str(tmp_path / "pretrain")
    workdir = tmp_path / "retrieval"
    results = retrieval.run(config, workdir)

    for name in ("retrieval.json", "features.npz", "topk.png", "examples.json", "examples.png",
                 "provenance.json"):
        assert (workdir / name).is_file(), name
    assert reporting.read_json(workdir / "retrieval.json") == results
    query_index = datasets.video_index(datasets.data_source(config.data, "test"), "test")
    gallery_index = datasets.video_index(datasets.data_source(config.data, "train"), "train")
    assert results["num_queries"] == len(query_index) > 0
    assert results["num_gallery"] == len(gallery_index) > 0
    assert results["fold"] == 1 and results["feature_dim"] == 32
    assert "r3d width 4 backbone" in results["backbone"]
    assert set(results["topk"]) == {"1", "5", "50"}
    assert results["topk"]["50"] == 1.0  # 50 > gallery: every class is in the gallery

    # The numbers follow from the saved features by brute force.
    saved = np.load(workdir / "features.npz")
    np.testing.assert_array_equal(saved["query_labels"], query_index.labels)
    assert list(saved["gallery_video_ids"]) == list(gallery_index.video_ids)
    _, order = brute_force(saved["query_features"], saved["gallery_features"],
                           len(gallery_index))
    for k in (1, 5, 50):
        hits = (saved["gallery_labels"][order[:, :k]] == saved["query_labels"][:, None]).any(1)
        assert results["topk"][str(k)] == pytest.approx(hits.mean())
        assert results["topk_percent"][str(k)] == pytest.approx(100 * hits.mean())
        ranks = np.asarray(results["per_query"]["first_hit_rank"])
        assert ((ranks > 0) & (ranks <= k)).mean() == pytest.approx(hits.mean())
        assert results["chance_topk"][str(k)] == pytest.approx(retrieval_chance(
            saved["query_labels"], np.bincount(saved["gallery_labels"], minlength=4), k))
    assert results["per_query"]["label"] == saved["query_labels"].tolist()
    assert results["gallery_class_counts"] == np.bincount(saved["gallery_labels"]).tolist()
    assert results["chance_topk"]["50"] == 1.0

    # A query's feature is the saved backbone's (inference-mode BatchNorm with the saved
    # statistics) mean over its clips, computed here without the pipeline.
    backbone = models.create_backbone("r3d", rngs=nnx.Rngs(params=0), width=4)
    for kind, tree in ((nnx.Param, params), (nnx.BatchStat, stats)):
        state = nnx.state(backbone, kind)
        nnx.replace_by_pure_dict(state, tree)
        nnx.update(backbone, state)
    backbone.eval()
    graphdef, weights = nnx.split(backbone)
    video = 1
    clips = input_pipeline.sample_multi_clips(
        datasets.data_source(config.data, "test")[video], 8, 24, 3)["clips"]
    want = jax.jit(lambda w, x: retrieval.clip_features(
        nnx.merge(graphdef, w).feature_map(x / 255.0), "conv5").mean(0))(weights, clips)
    np.testing.assert_allclose(saved["query_features"][video], want, rtol=1e-4, atol=1e-5)

    examples = reporting.read_json(workdir / "examples.json")["examples"]
    assert len(examples) == 3 and all(len(e["neighbours"]) == 5 for e in examples)
    first = examples[0]["neighbours"][0]
    assert first["hit"] == (first["label"] == examples[0]["query"]["label"])
    provenance = reporting.read_json(workdir / "provenance.json")
    assert provenance["data"]["queries"]["num_videos"] == len(query_index)
    assert provenance["data"]["gallery"]["split"] == "train"
    assert provenance["init_from"]["arch"] == "r3d"
    out = capsys.readouterr().out
    assert "retrieval on ucf101_frames/split1_32x43 (fold 1)" in out
    assert "retrieval top-1/5/50: " in out


# --------------------------------------------------------------------------------------------
# User errors: before any data or compile work
# --------------------------------------------------------------------------------------------


def config_without_data(tmp_path: Path):
    """A retrieval config whose dataset does not exist: any data work would fail differently."""
    config = retrieval_config.get_config()
    config.data.data_dir = str(tmp_path / "no_dataset_here")
    config.model.width = 4
    return config


def test_user_errors_come_before_data_work(tmp_path: Path) -> None:
    pretrained = tiny_config(tmp_path)
    save_random_backbone(tmp_path / "pretrain", pretrained)

    config = config_without_data(tmp_path)
    config.init_from = str(tmp_path / "missing")
    with pytest.raises(checkpointing.CheckpointError, match="missing does not exist"):
        retrieval.run(config, tmp_path / "w1")

    config = config_without_data(tmp_path)
    config.init_from, config.model.arch = str(tmp_path / "pretrain"), "c3d"
    with pytest.raises(checkpointing.CheckpointError, match=r"model\.arch='r3d'.*'c3d'"):
        retrieval.run(config, tmp_path / "w2")

    config = config_without_data(tmp_path)  # neither arch nor init_from
    with pytest.raises(config_utils.ConfigError, match=r"model\.arch is not set"):
        retrieval.run(config, tmp_path / "w3")

    finetuned = tiny_config(tmp_path)
    finetuned.task = "finetune"
    finetuned.finetune = {"fold": 2}
    finetuned.data.name = "ucf101_frames"
    save_random_backbone(tmp_path / "finetune_fold2", finetuned)
    config = config_without_data(tmp_path)
    config.init_from = str(tmp_path / "finetune_fold2")
    with pytest.raises(config_utils.UserError, match=r"fine-tuned on ucf101_frames fold 2"):
        retrieval.run(config, tmp_path / "w4")

    config = config_without_data(tmp_path)  # the pretraining workdir as retrieval's own
    config.init_from = str(tmp_path / "pretrain")
    with pytest.raises(config_utils.UserError, match="holds a training run's checkpoints"):
        retrieval.run(config, tmp_path / "pretrain")

    config = config_without_data(tmp_path)  # the same checkpoint from a fresh workdir is fine
    config.init_from = str(tmp_path / "pretrain")
    with pytest.raises(datasets.DatasetNotBuiltError):
        retrieval.run(config, tmp_path / "w5")


def test_config_arguments() -> None:
    config = retrieval_config.get_config("dataset=hmdb51,arch=c3d")
    assert (config.data.name, config.model.arch, config.task) == ("hmdb51_frames", "c3d",
                                                                  "retrieval")
    assert retrieval_config.get_config().model.arch is None
    assert "optimizer" not in retrieval_config.get_config()  # retrieval does not train
    with pytest.raises(ValueError, match="dataset='kinetics'"):
        retrieval_config.get_config("dataset=kinetics")
    with pytest.raises(ValueError, match="unknown config arguments"):
        retrieval_config.get_config("fold=2")
    config = retrieval_config.get_config("arch=r3d")
    config.model.width, config.retrieval.topk = 4, (1, 0)
    with pytest.raises(config_utils.ConfigError, match=r"retrieval\.topk"):
        retrieval.validate_config(config)
    config.retrieval.topk, config.batch_size = (1, 5), 12
    with pytest.raises(config_utils.ConfigError, match="batch_size=12"):
        retrieval.validate_config(config)
