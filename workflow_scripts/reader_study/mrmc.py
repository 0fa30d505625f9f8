"""Multi-reader multi-case interval of a figure of merit averaged over readers (Obuchowski-Rockette,
readers and cases random, one test), as OR-DBM MRMC, MRMCaov and RJafroc compute it for a single
treatment: error variance and covariances from the jackknife over cases, Hillis' (2007) degrees of
freedom. Checked against the published Van Dyke example and by simulation
(tests/test_reader_study_stats.py).

    SE = sqrt(MS(R) / r + max(Cov2, 0)),  df = (MS(R) + r max(Cov2, 0))^2 / (MS(R)^2 / (r - 1))

A case is a patient (one film per patient in the study), so resampling cases keeps a patient whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import t as student_t

LEVEL = 0.95


@dataclass(frozen=True)
class MrmcInterval:
    estimate: float  # the figure of merit averaged over readers
    se: float
    df: float
    low: float
    high: float
    ms_r: float  # reader mean square of the per-reader figures
    cov2: float  # jackknife error covariance between two readers' figures (same cases)
    var: float  # jackknife error variance of one reader's figure


def auroc_jackknife(truth: np.ndarray, scores: np.ndarray) -> tuple[float, np.ndarray]:
    """Empirical AUROC (ties half) and its n leave-one-case-out values, without n refits."""
    truth = np.asarray(truth, bool)
    positives, negatives = scores[truth], scores[~truth]
    psi = (positives[:, None] > negatives[None, :]) + 0.5 * (positives[:, None] == negatives[None, :])
    total, m, n = psi.sum(), len(positives), len(negatives)
    out = np.empty(len(truth))
    out[truth] = (total - psi.sum(axis=1)) / ((m - 1) * n) if m > 1 else np.nan
    out[~truth] = (total - psi.sum(axis=0)) / (m * (n - 1)) if n > 1 else np.nan
    return float(total / (m * n)), out


def mean_jackknife(values: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean (accuracy of 0/1 correct answers) and its leave-one-case-out values."""
    values = np.asarray(values, float)
    return float(values.mean()), (values.sum() - values) / (len(values) - 1)


def or_interval(figures: np.ndarray, jackknife: np.ndarray, level: float = LEVEL) -> MrmcInterval:
    """OR interval from per-reader figures (r,) and their leave-one-case-out values (r, n)."""
    figures, jackknife = np.asarray(figures, float), np.asarray(jackknife, float)
    readers, cases = jackknife.shape
    if readers < 2 or cases < 3:
        raise ValueError(f"an MRMC interval needs 2 or more readers and 3 or more cases (got {readers}, {cases})")
    centred = jackknife - jackknife.mean(axis=1, keepdims=True)
    covariance = (cases - 1) / cases * centred @ centred.T
    var = float(np.mean(np.diag(covariance)))
    cov2 = float((covariance.sum() - np.trace(covariance)) / (readers * (readers - 1)))
    estimate = float(figures.mean())
    ms_r = float(figures.var(ddof=1))
    error = ms_r + readers * max(cov2, 0.0)
    se = float(np.sqrt(error / readers))
    df = float(error ** 2 / (ms_r ** 2 / (readers - 1))) if ms_r > 0 else np.inf
    half = student_t.ppf(0.5 + level / 2, df) * se if se > 0 else 0.0
    return MrmcInterval(estimate, se, df, estimate - half, estimate + half, ms_r, cov2, var)


def mrmc_auroc(truth: np.ndarray, scores: np.ndarray, level: float = LEVEL) -> MrmcInterval:
    """`scores` (readers, cases) rank cases by how sure each reader is the case is positive."""
    pairs = [auroc_jackknife(truth, row) for row in np.asarray(scores, float)]
    return or_interval(np.array([fom for fom, _ in pairs]), np.array([jack for _, jack in pairs]), level)


def mrmc_accuracy(correct: np.ndarray, level: float = LEVEL) -> MrmcInterval:
    """`correct` (readers, cases): 1 where the reader named the case's source right."""
    pairs = [mean_jackknife(row) for row in np.asarray(correct, float)]
    return or_interval(np.array([fom for fom, _ in pairs]), np.array([jack for _, jack in pairs]), level)
