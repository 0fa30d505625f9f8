"""Statistics of a reader study: Wilson intervals, Fleiss' kappa, a bootstrap over images.

Small and self-contained so each is tested on its own (tests/test_reader_study_stats.py): Fleiss'
kappa against the textbook example of Fleiss (1971), the Wilson interval by its coverage.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.stats import norm, rankdata

LEVEL = 0.95


def wilson_interval(successes: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval of a proportion (NaN for n = 0): good coverage even at small n and near 0 or 1."""
    if n == 0:
        return float("nan"), float("nan")
    z = norm.ppf(0.5 + level / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def fleiss_kappa(counts: np.ndarray) -> float:
    """Fleiss' kappa of a subjects x categories table of rating counts, every subject rated by the
    same number of raters (>= 2). NaN when agreement by chance is total (one category only)."""
    counts = np.asarray(counts, dtype=float)
    raters = counts.sum(axis=1)
    if counts.ndim != 2 or len(counts) == 0 or np.any(raters != raters[0]) or raters[0] < 2:
        raise ValueError("Fleiss' kappa needs a subjects x categories table with the same number (>= 2) of raters per subject")
    m = raters[0]
    p_subject = ((counts * counts).sum(axis=1) - m) / (m * (m - 1))
    p_category = counts.sum(axis=0) / counts.sum()
    observed, chance = p_subject.mean(), (p_category * p_category).sum()
    return float("nan") if chance == 1 else float((observed - chance) / (1 - chance))


def rank_auroc(targets: np.ndarray, scores: np.ndarray) -> float:
    """AUROC as the Mann-Whitney statistic (ties count half), equal to sklearn's roc_auc_score and
    about a hundred times faster: for the bootstrap's thousands of resamples. NaN with one class only."""
    targets = np.asarray(targets, dtype=bool)
    positives, negatives = int(targets.sum()), int((~targets).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[targets].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def bootstrap_interval(statistic: Callable[[np.ndarray], float], n_items: int, n_boot: int, seed: int,
                       level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of `statistic(indices)` over resamples of the items (images) with
    replacement; resamples where the statistic is undefined (NaN) are left out."""
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, n_items, n_items)) for _ in range(n_boot)], dtype=float)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    return float(np.quantile(values, (1 - level) / 2)), float(np.quantile(values, (1 + level) / 2))
