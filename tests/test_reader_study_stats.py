"""The reader study's statistics against textbook values and by their coverage."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom
from sklearn.metrics import roc_auc_score

from workflow_scripts.reader_study.agreement import bootstrap_interval, fleiss_kappa, rank_auroc, wilson_interval

# Fleiss (1971), as tabulated on Wikipedia's "Fleiss' kappa": 10 subjects, 14 raters, 5 categories;
# P-bar = 0.378, P-bar_e = 0.213, kappa = 0.210.
FLEISS_EXAMPLE = np.array([
    [0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
    [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7],
])


def test_fleiss_kappa_matches_the_textbook_example() -> None:
    assert fleiss_kappa(FLEISS_EXAMPLE) == pytest.approx(0.210, abs=5e-4)


def test_fleiss_kappa_is_one_for_full_agreement_and_negative_for_split_votes() -> None:
    assert fleiss_kappa(np.array([[2, 0], [0, 2], [2, 0]])) == pytest.approx(1.0)
    assert fleiss_kappa(np.array([[1, 1], [1, 1], [1, 1]])) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="same number"):
        fleiss_kappa(np.array([[2, 0], [1, 0]]))


def test_wilson_interval_matches_published_values() -> None:
    # Newcombe (1998), Table I: 0/10 -> [0, 0.2775]; 81/263 -> [0.2553, 0.3662].
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)


@pytest.mark.parametrize("n", [10, 20, 40, 100])
def test_a_guessing_readers_interval_covers_50_percent_at_the_stated_rate(n: int) -> None:
    # Exact coverage over every possible count of correct answers of a reader at chance.
    coverage = sum(binom.pmf(k, n, 0.5) for k in range(n + 1) if wilson_interval(k, n)[0] <= 0.5 <= wilson_interval(k, n)[1])
    assert coverage >= 0.93


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_more_images() -> None:
    rng = np.random.default_rng(0)
    small, large = rng.random(20) < 0.5, rng.random(2000) < 0.5
    low_s, high_s = bootstrap_interval(lambda picks: small[picks].mean(), len(small), 500, 0)
    low_l, high_l = bootstrap_interval(lambda picks: large[picks].mean(), len(large), 500, 0)
    assert low_s <= small.mean() <= high_s and low_l <= large.mean() <= high_l
    assert high_l - low_l < (high_s - low_s) / 4


def test_the_bootstraps_rank_auroc_equals_sklearns_with_ties() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        targets = rng.random(50) < 0.5
        scores = rng.integers(-5, 6, 50) * (rng.random(50) < 0.8)  # confidence-weighted answers: many ties
        assert rank_auroc(targets, scores) == pytest.approx(roc_auc_score(targets, scores))
    assert np.isnan(rank_auroc(np.ones(5, bool), np.arange(5)))
