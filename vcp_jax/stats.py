"""How much a test accuracy says: 95% intervals, paired differences and chance levels.

The demo compares two backbones (VCP pretraining, random init) on the same few test items
(30 test videos at the demo's size), where a difference of 0.1 may be a few videos. These are
the statistics its comparison table reports:

- `wilson_interval`: the Wilson score interval of an accuracy over n items. Unlike the normal
  approximation it stays inside [0, 1] and is not empty at 0 or n successes.
- `paired_difference`: the mean difference of two predictors' per-item correctness on the same
  items, with a seeded paired (percentile) bootstrap interval over the items. Pairing removes
  the items' own difficulty from the noise, so it is narrower than an interval that treats the
  two accuracies as independent. The bootstrap needs no normal approximation (which fails for
  few items and accuracies near 0 or 1) and is deterministic for a seed.
- chance levels: `classifier_chance` (a guess uniform over C classes: 1/C for top-1,
  min(k, C)/C for top-k), `retrieval_chance` (the hypergeometric chance that k gallery items
  drawn at random include one of the query's class) and `option_chance` (the VCP probe).

Pure Python and numpy, nothing random without a seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: two-sided 95% intervals
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion `successes / n` (95% for the default z).

    None when n is 0 (nothing measured).
    """
    if n <= 0:
        return None
    if not 0 <= successes <= n:
        raise ValueError(f"successes={successes} must be within [0, n={n}]")
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # Clipped because rounding can leave the ends a hair outside [0, 1] at 0 or n successes.
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_interval(accuracy: float | None, n: int | None) -> tuple[float, float] | None:
    """`wilson_interval` of an accuracy given as a fraction of n items (rounded to a count)."""
    if accuracy is None or n is None or n <= 0 or not math.isfinite(accuracy):
        return None
    return wilson_interval(min(max(round(accuracy * n), 0), n), n)


def paired_difference(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    level: float = 0.95,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, tuple[float, float]]:
    """mean(a - b) of per-item scores (e.g. 0/1 correctness) on the same items, and its interval.

    The interval is the percentile interval of a paired bootstrap: the items are resampled with
    replacement (the same draw for a and b, which keeps the pairing), `resamples` times, seeded.
    A resample's mean depends only on how often each distinct difference is drawn, so the
    resamples are drawn as multinomial counts over the distinct values: the same distribution
    as resampling items one by one, in O(resamples) memory for any number of items.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 1 or a.shape != b.shape or len(a) == 0:
        raise ValueError(f"need two equally long, non-empty 1-d sequences (got {a.shape}, "
                         f"{b.shape})")
    diff = a - b
    n = len(diff)
    values, counts = np.unique(diff, return_counts=True)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, counts / n, size=resamples)  # (resamples, distinct values)
    means = draws @ values / n
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(diff.mean()), (float(low), float(high))


def classifier_chance(num_classes: int, k: int = 1) -> float:
    """Top-k accuracy of a guess uniform over the classes (independent of the video): min(k, C)/C.

    With balanced test classes this is also the best a label-blind predictor can do; with
    unbalanced ones, always guessing the most frequent class does better.
    """
    if num_classes < 1 or k < 1:
        raise ValueError(f"need num_classes >= 1 and k >= 1 (got {num_classes}, {k})")
    return min(k, num_classes) / num_classes


def retrieval_chance(
    query_labels: Sequence[int] | np.ndarray, gallery_class_counts: Sequence[int], k: int
) -> float:
    """Top-k retrieval accuracy of a random ranking, averaged over the queries.

    A query with n_c gallery videos of its class, in a gallery of N, is a hit at k unless all
    k videos drawn without replacement miss its class: 1 - C(N - n_c, k) / C(N, k)
    (hypergeometric), exact in integers. k beyond N counts the whole gallery, as
    `retrieval.topk_accuracy` does.
    """
    counts = [int(c) for c in gallery_class_counts]
    total = sum(counts)
    labels = np.asarray(query_labels, np.int64)
    if len(labels) == 0 or total == 0 or k < 1:
        return float("nan")
    k = min(k, total)
    per_class = {}  # the chance of each class present among the queries, computed once
    for c in np.unique(labels):
        same = counts[c] if 0 <= c < len(counts) else 0
        # Python's int / int is correctly rounded even for binomials far beyond float range.
        per_class[int(c)] = 1.0 - math.comb(total - same, k) / math.comb(total, k)
    return float(np.mean([per_class[int(c)] for c in labels]))


def option_chance(num_options: int) -> float:
    """The VCP probe's chance accuracy: a guess uniform over the cloze options."""
    return classifier_chance(num_options)
