"""vcp_jax.stats against values worked out by hand or by enumeration, and the demo's comparison
rows on fake stage results shaped as the stages write them. Pure and fast (no JAX work)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from vcp_jax import demo, stats

# --------------------------------------------------------------------------------------------
# Wilson interval
# --------------------------------------------------------------------------------------------


def test_wilson_interval_known_values() -> None:
    z2 = stats.Z95**2
    # 0 or n successes: one end at 0 (1), the other at z^2 / (n + z^2) from it.
    assert stats.wilson_interval(0, 10) == pytest.approx((0.0, z2 / (10 + z2)))
    assert stats.wilson_interval(10, 10) == pytest.approx((10 / (10 + z2), 1.0))
    assert stats.wilson_interval(0, 10)[1] == pytest.approx(0.27753, abs=1e-5)
    # 5 / 10: symmetric about 0.5 (R: binom::binom.wilson(5, 10) = 0.2365931, 0.7634069).
    assert stats.wilson_interval(5, 10) == pytest.approx((0.2365931, 0.7634069), abs=1e-6)
    # 1 / 3 of 30, by the formula written out.
    p, n = 10 / 30, 30
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = stats.Z95 / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    assert stats.wilson_interval(10, 30) == pytest.approx((centre - half, centre + half))
    assert stats.wilson_interval(0, 0) is None
    with pytest.raises(ValueError):
        stats.wilson_interval(11, 10)


def test_accuracy_interval_rounds_the_fraction_to_a_count() -> None:
    assert stats.accuracy_interval(1 / 3, 30) == stats.wilson_interval(10, 30)
    assert stats.accuracy_interval(None, 30) is None
    assert stats.accuracy_interval(0.5, None) is None
    assert stats.accuracy_interval(float("nan"), 30) is None


# --------------------------------------------------------------------------------------------
# Chance levels
# --------------------------------------------------------------------------------------------


def test_classifier_and_option_chance() -> None:
    assert stats.classifier_chance(10) == pytest.approx(0.1)
    assert stats.classifier_chance(10, k=5) == pytest.approx(0.5)
    assert stats.classifier_chance(4, k=5) == 1.0  # top-5 of 4 classes always hits
    assert stats.option_chance(5) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        stats.classifier_chance(0)


def _enumerated_chance(query_label: int, gallery: list[int], k: int) -> float:
    """Every ordering of the gallery equally likely: the fraction with a hit in the first k."""
    orders = list(itertools.permutations(gallery))
    return sum(query_label in order[:k] for order in orders) / len(orders)


def test_retrieval_chance_by_hand_and_by_enumeration() -> None:
    gallery = [0, 0, 1, 1, 2, 2]  # 6 videos, 2 per class
    counts = [2, 2, 2]
    # k = 1: 2 of 6 are of the class. k = 2: 1 - C(4, 2) / C(6, 2) = 1 - 6/15 = 3/5.
    assert stats.retrieval_chance([0, 1, 2], counts, 1) == pytest.approx(1 / 3)
    assert stats.retrieval_chance([0, 1, 2], counts, 2) == pytest.approx(3 / 5)
    # k = 5 draws 5 of 6: at most one video left out, so always a hit; k beyond N: the gallery.
    assert stats.retrieval_chance([0], counts, 5) == 1.0
    assert stats.retrieval_chance([0], counts, 50) == 1.0
    for k in range(1, 7):
        want = _enumerated_chance(0, gallery, k)
        assert stats.retrieval_chance([0, 1, 2], counts, k) == pytest.approx(want), k
    # Uneven classes: the queries' chances are averaged, a class absent from the gallery is 0.
    gallery, counts = [0, 1, 1, 2, 2, 2], [1, 2, 3, 0]
    for k in (1, 2, 3):
        want = np.mean([_enumerated_chance(c, gallery, k) for c in (0, 2, 2, 3)])
        assert stats.retrieval_chance([0, 2, 2, 3], counts, k) == pytest.approx(want), k
    assert stats.retrieval_chance([3], counts, 3) == 0.0
    # A UCF101-sized gallery: exact big-integer binomials, no overflow.
    assert 0 < stats.retrieval_chance([0], [100] * 101, 50) < 1


# --------------------------------------------------------------------------------------------
# Paired difference
# --------------------------------------------------------------------------------------------


def _paired_items(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Correlated 0/1 correctness of two predictors on n items, P(a) = 0.7 and P(b) = 0.5 (the
    true difference 0.2): a shared difficulty per item, plus noise of each predictor's own."""
    rng = np.random.default_rng(seed)
    difficulty = rng.uniform(size=n)
    a = np.where(rng.uniform(size=n) < 0.8, difficulty, rng.uniform(size=n)) < 0.7
    b = np.where(rng.uniform(size=n) < 0.8, difficulty, rng.uniform(size=n)) < 0.5
    return a, b


def test_paired_difference_contains_the_truth_and_shrinks_with_n() -> None:
    # Coverage: over 200 simulated test sets of 100 items, about 95% of the intervals hold 0.2.
    covered = 0
    for seed in range(200):
        a, b = _paired_items(100, seed)
        diff, (low, high) = stats.paired_difference(a, b, resamples=500)
        assert diff == pytest.approx(a.mean() - b.mean()) and low <= diff <= high
        covered += low <= 0.2 <= high
    assert 0.88 <= covered / 200 <= 0.99, covered
    # Width ~ 1/sqrt(n), as the normal approximation's 2 z sd / sqrt(n).
    widths = []
    for n in (100, 1000, 10000):
        a, b = _paired_items(n, seed=n)
        low, high = stats.paired_difference(a, b)[1]
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]
    d = a.astype(float) - b
    assert widths[2] == pytest.approx(2 * stats.Z95 * d.std() / math.sqrt(len(d)), rel=0.1)


def test_paired_difference_is_seeded_and_pairs_the_items() -> None:
    a, b = _paired_items(50, seed=3)
    assert stats.paired_difference(a, b) == stats.paired_difference(a, b)
    # The same answers every time: no difference, an interval of 0 width.
    assert stats.paired_difference(a, a) == (0.0, (0.0, 0.0))
    # Pairing: with b's correct items a subset of a's, every resample has a >= b; the
    # intervals of the two accuracies alone would overlap.
    nested_a, nested_b = np.arange(50) < 30, np.arange(50) < 25
    assert stats.paired_difference(nested_a, nested_b)[1][0] >= 0
    assert stats.wilson_interval(25, 50)[1] > stats.wilson_interval(30, 50)[0]
    # The multinomial draw matches resampling the items one by one (same distribution).
    d = a.astype(float) - b
    rng = np.random.default_rng(0)
    naive = d[rng.integers(0, len(d), (4000, len(d)))].mean(1)
    low, high = stats.paired_difference(a, b, resamples=4000)[1]
    assert low == pytest.approx(np.quantile(naive, 0.025), abs=0.03)
    assert high == pytest.approx(np.quantile(naive, 0.975), abs=0.03)
    with pytest.raises(ValueError):
        stats.paired_difference([], [])
    with pytest.raises(ValueError):
        stats.paired_difference([1, 0], [1])


# --------------------------------------------------------------------------------------------
# The demo's comparison rows
# --------------------------------------------------------------------------------------------


def _finetune(ranks: list[int], *, per_video: bool = True, train: float | None = None,
              step: int = 4) -> dict:
    """A fold's metrics.json: 4 classes, one test video per class, the labels' ranks given."""
    ranks_ = np.asarray(ranks)
    test = {"video_top1": float((ranks_ == 1).mean()), "video_top5": float((ranks_ <= 5).mean()),
            "clip_top1": 0.5, "num_test_videos": len(ranks), "num_clips": 4}
    if per_video:
        test["per_video"] = {"index": list(range(len(ranks))), "label": list(range(len(ranks))),
                             "predicted": [0] * len(ranks), "label_rank": ranks}
    if train is not None:
        test["train_video_top1"] = train
    return {"task": "finetune", "class_names": ["a", "b", "c", "d"], "chosen_step": step,
            "best_checkpoint_step": step, "test": test}


def _retrieval(ranks: list[int]) -> dict:
    """retrieval.json: 4 queries of classes 0, 0, 1, 2; a gallery of 2 + 1 + 3 videos."""
    labels, counts = [0, 0, 1, 2], [2, 1, 3]
    ranks_ = np.asarray(ranks)
    ks = (1, 5, 10, 20)
    return {"task": "retrieval", "num_queries": 4, "num_gallery": 6,
            "topk": {str(k): float(((ranks_ > 0) & (ranks_ <= k)).mean()) for k in ks},
            "chance_topk": {str(k): stats.retrieval_chance(labels, counts, k) for k in ks},
            "gallery_class_counts": counts,
            "per_query": {"label": labels, "first_hit_rank": ranks}}


def _probe(accuracy: float, per_option: dict[str, float]) -> dict:
    return {"task": "probe", "test_vcp_accuracy": accuracy, "test_tuples": 40,
            "chance_accuracy": 0.5, "option_names": list(per_option),
            **{f"test_accuracy/{k}": v for k, v in per_option.items()},
            **{f"test_option_fraction/{k}": 0.5 for k in per_option}}


def _fake_results() -> dict:
    return {
        "pretrain": {"task": "pretrain", "val_vcp_accuracy": 0.6, "val_tuples": 16,
                     "chance_accuracy": 0.2},
        "finetune_vcp": _finetune([1, 1, 2, 1], train=1.0, step=4),
        "finetune_random": _finetune([1, 3, 4, 2], train=0.75, step=2),
        "linear_vcp": _finetune([1, 2, 2, 2], per_video=False),
        "linear_random": _finetune([2, 2, 2, 2], per_video=False),
        "retrieval_vcp": _retrieval([1, 2, 0, 1]),
        "retrieval_random": _retrieval([3, 1, 0, 0]),
        "probe_vcp": _probe(0.75, {"original": 1.0, "rotation": 0.5}),
        "probe_random": _probe(0.5, {"original": 0.5, "rotation": 0.5}),
    }


def test_comparison_rows_differences_and_chance() -> None:
    rows = {r["metric"]: r for r in demo.comparison(_fake_results())}
    assert list(rows) == [
        "fine-tuning: video top-1", "fine-tuning: video top-5", "linear eval: video top-1",
        "retrieval: top-1", "retrieval: top-5", "retrieval: top-10",  # no top-20 row
        "VCP probe: accuracy", "VCP probe: original", "VCP probe: rotation",
        "pretraining: held-out VCP accuracy"]
    for row in rows.values():
        assert set(row) >= {"metric", "vcp", "random_init", "difference", "vcp_ci",
                            "random_ci", "difference_ci", "chance", "n"}

    top1 = rows["fine-tuning: video top-1"]
    assert (top1["vcp"], top1["random_init"], top1["n"]) == (0.75, 0.25, 4)
    assert top1["difference"] == pytest.approx(0.5)
    assert top1["chance"] == pytest.approx(0.25)
    assert top1["vcp_ci"] == pytest.approx(list(stats.wilson_interval(3, 4)))
    assert top1["random_ci"] == pytest.approx(list(stats.wilson_interval(1, 4)))
    # Paired over the 4 test videos: correct (1, 1, 0, 1) vs (1, 0, 0, 0).
    want = stats.paired_difference([1, 1, 0, 1], [1, 0, 0, 0])[1]
    assert top1["difference_ci"] == pytest.approx(list(want))
    assert top1["chosen_step"] == {"vcp": 4, "random_init": 2}
    assert top1["train_accuracy"] == {"vcp": 1.0, "random_init": 0.75}
    top5 = rows["fine-tuning: video top-5"]
    assert top5["chance"] == 1.0  # 4 classes
    assert top5["difference"] == 0.0 and top5["difference_ci"] == [0.0, 0.0]
    assert "chosen_step" not in top5

    linear = rows["linear eval: video top-1"]
    assert linear["difference"] == pytest.approx(0.25)
    assert linear["difference_ci"] is None  # no per-video results: Wilson intervals only
    assert linear["vcp_ci"] is not None and linear["chance"] == pytest.approx(0.25)
    assert "train_accuracy" not in linear and linear["chosen_step"] == {"vcp": 4,
                                                                        "random_init": 4}

    ret1 = rows["retrieval: top-1"]
    assert (ret1["vcp"], ret1["random_init"], ret1["n"]) == (0.5, 0.25, 4)
    assert ret1["chance"] == pytest.approx(np.mean([2 / 6, 2 / 6, 1 / 6, 3 / 6]))
    want = stats.paired_difference([1, 0, 0, 1], [0, 1, 0, 0])[1]
    assert ret1["difference_ci"] == pytest.approx(list(want))
    ret10 = rows["retrieval: top-10"]
    assert ret10["chance"] == 1.0  # k beyond the gallery of 6
    assert (ret10["vcp"], ret10["random_init"]) == (0.75, 0.5)

    probe = rows["VCP probe: accuracy"]
    assert probe["difference"] == pytest.approx(0.25) and probe["difference_ci"] is None
    assert probe["n"] == 40 and probe["chance"] == 0.5
    assert rows["VCP probe: original"]["n"] == 20  # half of the tuples have that option
    pre = rows["pretraining: held-out VCP accuracy"]
    assert pre["random_init"] is None and pre["difference"] is None and pre["random_ci"] is None
    assert (pre["n"], pre["chance"]) == (16, 0.2)


def test_comparison_tolerates_missing_stages_and_fields() -> None:
    assert demo.comparison({}) == []
    results = _fake_results()
    del results["linear_vcp"], results["linear_random"]
    for name in ("finetune_vcp", "finetune_random"):
        del results[name]["chosen_step"], results[name]["test"]["per_video"]
    del results["retrieval_vcp"]["chance_topk"]  # recomputed from the class counts
    rows = {r["metric"]: r for r in demo.comparison(results)}
    assert "linear eval: video top-1" not in rows
    top1 = rows["fine-tuning: video top-1"]
    assert top1["difference_ci"] is None and top1["chosen_step"] == {"vcp": 4, "random_init": 2}
    assert rows["retrieval: top-1"]["chance"] == pytest.approx(np.mean([2, 2, 1, 3]) / 6)


def test_render_table_shows_chance_values_and_the_difference_interval() -> None:
    rows = demo.comparison(_fake_results())
    table = demo.render_table(rows)
    assert "chance" in table and "VCP-rnd [95% CI]" in table
    line = next(x for x in table.splitlines() if x.startswith("fine-tuning: video top-1"))
    assert line.split()[3:7] == ["0.250", "0.750", "0.250", "+0.500"]
    assert line.rstrip().endswith("4")
    assert "fine-tuning: checkpoint step VCP 4, random 2" in table
