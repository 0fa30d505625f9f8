"""The reader study's statistics against textbook values and by their coverage."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom
from sklearn.metrics import roc_auc_score

from workflow_scripts.reader_study.agreement import bootstrap_interval, fleiss_kappa, rank_auroc, wilson_interval
from workflow_scripts.reader_study.mrmc import mrmc_accuracy, mrmc_auroc

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


# Van Dyke et al. (1993), the MRMC literature's worked example (RJafroc dataset02, MRMCaov VanDyke):
# 5 readers rate 69 normal then 45 abnormal cases from 1 to 5; treatment 1 (single spin-echo MRI),
# transcribed from RJafroc's inst/MRMCRuns/VD/VD.lrc. OR-DBM MRMC 2.51's published output for it
# (RJafroc inst/IowaResults/VanDyke.txt, Analysis 1 c): AUC 0.89703704, StdErr 0.03317360, DF 12.74,
# 95 % CI (0.82522360, 0.96885048), MS(R) 0.00308263, Cov2 0.00048396; per-reader AUCs below.
VAN_DYKE_TREATMENT_1 = [  # per reader: 69 normal cases, then 45 abnormal ones
    ("122151111111411111111131311214111113121211233131133111111221111332111", "555545554555434245555555154454553555115554451"),
    ("232222222322522232222222422223222222222222222222222222222432232222222", "535555542555442225555555243354552425225555352"),
    ("222235112242422232221232411322112224121412112222223211211221151421212", "545555555555542355555555252255552555225555552"),
    ("111111311111111111112111211112111111111111111111331111111111111311111", "555555555555555155555555554544553555125555555"),
    ("351211112221211122113221111211211231221113332111211111111341231212113", "525255551545452235555554144322151515115553552"),
]
VAN_DYKE_AUCS = [0.91964573, 0.85877617, 0.90386473, 0.97310789, 0.82979066]


def van_dyke() -> tuple[np.ndarray, np.ndarray]:
    ratings = np.array([[int(digit) for digit in normal + abnormal] for normal, abnormal in VAN_DYKE_TREATMENT_1], float)
    return np.r_[np.zeros(69, bool), np.ones(45, bool)], ratings


def test_the_mrmc_interval_reproduces_the_published_van_dyke_analysis() -> None:
    truth, ratings = van_dyke()
    assert ratings.shape == (5, 114)
    assert [rank_auroc(truth, row) for row in ratings] == pytest.approx(VAN_DYKE_AUCS, abs=1e-7)
    result = mrmc_auroc(truth, ratings)
    assert result.estimate == pytest.approx(0.89703704, abs=1e-7)
    assert result.ms_r == pytest.approx(0.00308263, abs=1e-8) and result.cov2 == pytest.approx(0.00048396, abs=1e-8)
    assert result.se == pytest.approx(0.03317360, abs=1e-7) and result.df == pytest.approx(12.74, abs=0.005)
    assert (result.low, result.high) == pytest.approx((0.82522360, 0.96885048), abs=1e-7)


def guessing_study(rng: np.random.Generator, readers: int = 4, cases: int = 40) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Readers who cannot tell: some cases look synthetic to everyone (a case effect), some readers
    say synthetic more often (a reader effect), none of it related to the truth. Population AUROC and
    accuracy are 0.5 exactly."""
    truth = np.arange(cases) < cases // 2
    latent = rng.normal(0, 1, cases)[None, :] + rng.normal(0, 0.7, (readers, 1)) + rng.normal(0, 1, (readers, cases))
    says_synthetic = latent > 0
    confidence = np.clip(np.ceil(np.abs(latent) * 2), 1, 5)
    return truth, np.where(says_synthetic, confidence, -confidence), says_synthetic == truth[None, :]


def test_the_mrmc_intervals_cover_chance_at_their_stated_rate_when_readers_cannot_tell() -> None:
    rng = np.random.default_rng(1)
    hits = np.zeros(2)
    runs = 400
    for _ in range(runs):
        truth, scores, correct = guessing_study(rng)
        for index, result in enumerate((mrmc_auroc(truth, scores), mrmc_accuracy(correct))):
            hits[index] += result.low <= 0.5 <= result.high
    # 95 % nominal; with 400 runs a coverage below 0.92 would be 2.8 standard errors short.
    assert (hits / runs >= 0.92).all(), hits / runs


def test_the_mrmc_interval_is_wider_than_one_that_ignores_the_case_effect() -> None:
    rng = np.random.default_rng(2)
    truth, scores, correct = guessing_study(rng, readers=6, cases=60)
    result = mrmc_accuracy(correct)
    naive = np.sqrt(result.estimate * (1 - result.estimate) / correct.size)  # every answer independent
    assert result.cov2 > 0 and result.se > naive
    with pytest.raises(ValueError, match="2 or more readers"):
        mrmc_accuracy(correct[:1])
