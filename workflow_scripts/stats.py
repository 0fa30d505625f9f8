"""Statistics for the augmentation study: AUROC, a two-level bootstrap, Holm, the verdict rule.

Every table of the project takes its intervals from here, so the calibration tests in
tests/test_stats.py vouch for all of them.

The estimate of an arm is its AUROC averaged over training seeds, measured on one real test set.
It varies for two independent reasons: which patients happened to land in the test set, and
which training runs happened to be drawn. The bootstrap resamples both (a hierarchical bootstrap,
Saravanan, Berman & Sober 2020, "Application of the hierarchical bootstrap to multi-level data in
neuroscience", Neurons, Behavior, Data analysis and Theory 3(5)), with seeds and patients crossed:

1. test patients are drawn with replacement (every film of a drawn patient comes along, so films
   of one patient are never treated as independent); the SAME patient draw serves every arm, so
   a difference between arms is paired on the test set;
2. within each arm its training seeds are drawn with replacement, independently of other arms
   (runs of different arms are separate trainings): each seed's deviation from the arm mean is
   drawn with replacement, scaled to an unbiased variance and to Student-t width for few seeds
   (`seed_scale`), less the part of the seed spread the patient level already carries (seeds and
   patients are crossed, `seed_resample`). An arm with one seed carries no seed variance, and the
   report says so.

A difference between two arms (`differences`) is tested on the t scale: its variance is the
paired patient-level bootstrap variance plus each arm's seed-level variance (its seeds'
deviations, shrunk as above, / S), and the t reference distribution takes the Welch-Satterthwaite
degrees of freedom of the seed terms (S - 1 per arm; the patient term counts as known). So the
p-value is valid at any level, in particular at the α/m Holm tests first, not only at 95 %. Its
interval is Δ ± t·SE and its minimum detectable effect (`mde`) is (t_{1-a/2} + t_{0.8})·SE at
the level a the verdict uses: the true Δ called a gain in 80 % of studies like this one.

AUROC on a resample is computed from the bootstrap counts of the patients: every score column is
sorted once into a sparse patients-to-segments matrix, and all resamples go through one sparse
product (cost ~ resamples x images per column, no per-resample sort).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import sparse
from scipy.stats import norm, rankdata
from scipy.stats import t as student_t

LEVEL = 0.95  # two-sided interval level; alpha = 1 - LEVEL for the verdict
ALPHA = 1 - LEVEL
POWER = 0.8  # the minimum detectable effect is detected with this probability
GAIN, LOSS, NO_DIFFERENCE = "gain", "loss", "no measurable difference"


def auroc_columns(targets: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUROC of every column at once (Mann-Whitney with average ranks); NaN where a column lacks a class."""
    positives = targets.sum(axis=0)
    negatives = targets.shape[0] - positives
    rank_sum = (rankdata(scores, axis=0) * targets).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)
    return np.where((positives > 0) & (negatives > 0), auc, np.nan)


class ColumnOperator:
    """One score column turned, once, into a sparse matrix that maps patient bootstrap counts to the
    figures its AUROC needs, so every resample costs one sparse product instead of a sort.

    Sorted by score, the tie groups that hold a positive (K of them) cut the negatives into
    segments. For each of those groups k the rows hold, per patient, the number of negative films
    in the segment just below k, the negatives tied with k and the positives in k; a last row
    counts every negative. With counts c (patients) the weighted AUROC is
    sum_k pos_k * (cumsum_k(segment) + tie_k / 2) / (sum_k pos_k * negatives)."""

    def __init__(self, target: np.ndarray, score: np.ndarray, patient: np.ndarray, n_patients: int) -> None:
        _, group = np.unique(score, return_inverse=True)  # tie groups, in score order
        positive = target > 0
        pos_groups = np.unique(group[positive])
        k = len(pos_groups)
        neg_group = group[~positive]
        above = np.searchsorted(pos_groups, neg_group, side="right")  # first positive group above the negative
        tied = np.searchsorted(pos_groups, neg_group, side="left")
        is_tied = (tied < k) & (pos_groups[np.minimum(tied, k - 1)] == neg_group) if k else np.zeros(len(neg_group), bool)
        keep = above < k
        rows = np.concatenate([above[keep], k + tied[is_tied], 2 * k + np.searchsorted(pos_groups, group[positive]),
                               np.full(len(neg_group), 3 * k)])
        cols = np.concatenate([patient[~positive][keep], patient[~positive][is_tied], patient[positive], patient[~positive]])
        self.k = k
        self.matrix = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(3 * k + 1, n_patients))

    def auroc(self, counts_t: np.ndarray) -> np.ndarray:
        """AUROC under each column of `counts_t` (patients x resamples, bootstrap counts)."""
        k = self.k
        if k == 0:
            return np.full(counts_t.shape[1], np.nan)
        sums = self.matrix @ counts_t  # (3k + 1, resamples)
        below = np.cumsum(sums[:k], axis=0)
        positives = sums[2 * k:3 * k]
        pairs = positives.sum(axis=0) * sums[3 * k]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(pairs > 0, (positives * (below + 0.5 * sums[k:2 * k])).sum(axis=0) / pairs, np.nan)


def weighted_auroc_columns(targets: np.ndarray, scores: np.ndarray, clusters: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """AUROC of every column when cluster j of `clusters` (codes 0..P-1) is counted counts[b, j]
    times -> (resamples, columns)."""
    counts_t = np.ascontiguousarray(counts.T)  # (patients, resamples): the layout the sparse product reads fastest
    return np.stack([ColumnOperator(targets[:, k], scores[:, k], clusters, counts.shape[1]).auroc(counts_t)
                     for k in range(targets.shape[1])], axis=1)


@dataclass
class ArmBootstrap:
    """One arm: per-label AUROC of each seed on the whole test set, their mean (the estimate) and
    the bootstrap distribution of that mean (resamples x labels)."""

    seed_values: np.ndarray  # (seeds, labels)
    samples: np.ndarray  # (resamples, labels)
    patient_samples: np.ndarray | None = None  # (resamples, labels): the seed mean on each patient resample
    seed_terms: np.ndarray | None = None  # (seeds, labels): deviations from the seed mean, less the interaction

    def seed_variance(self, labels: np.ndarray | None = None) -> tuple[float, float]:
        """Seed-level variance of the macro seed mean, and its degrees of freedom (S - 1; one seed: 0, inf)."""
        n_seeds = len(self.seed_values)
        if self.seed_terms is None or n_seeds < 2:
            return 0.0, float("inf")
        return float(np.var(macro(self.seed_terms, labels), ddof=1) / n_seeds), float(n_seeds - 1)

    @property
    def estimate(self) -> np.ndarray:
        return self.seed_values.mean(axis=0)  # seeds share the test set, so a label is undefined in all or none


def cluster_counts(clusters: np.ndarray, n_boot: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Each image's cluster code (0..P-1) and the bootstrap counts (n_boot x P): the P clusters
    drawn with replacement; every image of a drawn cluster comes along as often as its cluster."""
    codes, index = np.unique(clusters, return_inverse=True)
    return index, rng.multinomial(len(codes), np.full(len(codes), 1 / len(codes)), size=n_boot).astype(float)


def seed_scale(n_seeds: int, level: float = LEVEL) -> float:
    """Factor on each seed's deviation from the arm mean: sqrt(S / (S - 1)) makes the bootstrap
    variance of the seed mean unbiased, and t / z widens it to Student-t width for the 2 (S - 1)
    degrees of freedom of a difference between two arms of S seeds (with few seeds, normal-width
    intervals would cover too rarely)."""
    quantile = 1 - (1 - level) / 2
    return float(np.sqrt(n_seeds / (n_seeds - 1)) * student_t.ppf(quantile, 2 * (n_seeds - 1)) / norm.ppf(quantile))


def seed_shrink(values: np.ndarray, full: np.ndarray) -> np.ndarray:
    """Per label, the share (as a factor on deviations) of the seeds' spread that is not already in
    the patient level. Seeds and patients are crossed, not nested: the patient level carries the
    part of the seed-to-seed spread that comes from seeds ranking individual films differently
    (their interaction), about (mean single-seed bootstrap variance - bootstrap variance of the
    mean) * S / (S - 1). Counted twice, the interval covers far above its nominal rate when seeds
    differ little."""
    n_seeds = values.shape[0]
    spread = (full - full.mean(axis=0)).var(axis=0, ddof=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # labels undefined in some resamples
        interaction = (np.nanvar(values, axis=1).mean(axis=0) - np.nanvar(values.mean(axis=0), axis=0)) * n_seeds / (n_seeds - 1)
    share = np.divide(spread - interaction, spread, out=np.zeros_like(spread), where=spread > 0)
    return np.sqrt(np.clip(np.nan_to_num(share), 0.0, 1.0))


def seed_resample(values: np.ndarray, full: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """The seed level of an arm's bootstrap. `values` (seeds, resamples, labels) holds each seed's
    AUROC on each patient resample, `full` (seeds, labels) each seed's AUROC on the whole test set.

    Returns (resamples, labels): the seed mean on the patient resample plus a resampled seed term,
    the seeds' deviations from their mean (shrunk by `seed_shrink`) drawn with replacement and
    widened by `seed_scale` (for the arm's own 95 % interval; differences use the t scale)."""
    n_seeds = values.shape[0]
    mean = values.mean(axis=0)
    if n_seeds == 1:
        return mean
    deviation = (full - full.mean(axis=0)) * seed_shrink(values, full)
    counts = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=n_boot)  # (resamples, seeds)
    term = (counts / n_seeds) @ deviation * seed_scale(n_seeds)
    # the widened seed term can step past AUROC's bounds; an AUROC outside [0, 1] is not a possible value
    return np.clip(mean + term, 0.0, 1.0)


def hierarchical_bootstrap(targets: np.ndarray, clusters: np.ndarray, arms: Mapping[str, np.ndarray], n_boot: int,
                           seed: int, resample_seeds: bool = True) -> dict[str, ArmBootstrap]:
    """Paired two-level bootstrap of every arm's seed-mean AUROC per label.

    targets: (images, labels) 0/1; clusters: (images,) patient ids; arms: name -> scores of shape
    (seeds, images, labels), all on the same images in the same order. The same patient resamples
    serve every arm (paired); seeds are resampled per arm. `resample_seeds=False` averages the
    seeds inside each resample instead (no seed variance; kept to show, in the calibration test,
    how much too narrow that is)."""
    targets = np.asarray(targets, dtype=float)
    rng = np.random.default_rng(seed)
    index, counts = cluster_counts(np.asarray(clusters), n_boot, rng)
    per_seed = {name: np.empty((len(scores), n_boot, targets.shape[1])) for name, scores in arms.items()}
    for name, scores in arms.items():
        for s, run in enumerate(scores):
            per_seed[name][s] = weighted_auroc_columns(targets, run, index, counts)
    result = {}
    for name, scores in arms.items():
        seed_values = np.stack([auroc_columns(targets, run) for run in scores])
        patient_samples = per_seed[name].mean(axis=0)
        if not resample_seeds:
            result[name] = ArmBootstrap(seed_values, patient_samples, patient_samples)
            continue
        samples = seed_resample(per_seed[name], seed_values, n_boot, rng)
        terms = ((seed_values - seed_values.mean(axis=0)) * seed_shrink(per_seed[name], seed_values)
                 if len(scores) > 1 else None)
        result[name] = ArmBootstrap(seed_values, samples, patient_samples, terms)
    return result


def run_aurocs(targets: np.ndarray, scores: np.ndarray, clusters: np.ndarray, n_boot: int, seed: int) -> dict[str, Any]:
    """One run's AUROC per label and macro (the mean over labels with both classes), each with a 95%
    percentile interval from the same cluster bootstrap as the table (clusters: patient ids, or one
    id per image where images are independent). A resample in which a label lacks a class leaves
    that label out of that resample. Used for the per-run figures in metrics.json and for prompt
    adherence; the comparison table adds the seed level (`hierarchical_bootstrap`)."""
    targets = np.asarray(targets, dtype=float).reshape(len(targets), -1)
    scores = np.asarray(scores, dtype=float).reshape(targets.shape)
    point = auroc_columns(targets, scores)
    index, counts = cluster_counts(np.asarray(clusters), n_boot, np.random.default_rng(seed))
    samples = weighted_auroc_columns(targets, scores, index, counts)  # (resamples, labels)
    positives = targets.sum(axis=0).astype(int)
    per_label = []
    for j in range(targets.shape[1]):
        if not np.isfinite(point[j]):
            missing = "positive" if positives[j] == 0 else "negative"
            per_label.append({"auroc": None, "ci_low": None, "ci_high": None, "positives": int(positives[j]),
                              "note": f"unavailable: no {missing} image"})
            continue
        low, high = interval(samples[:, j])
        per_label.append({"auroc": float(point[j]), "ci_low": low, "ci_high": high, "positives": int(positives[j])})
    used = np.flatnonzero(np.isfinite(point))
    if not len(used):
        return {"per_label": per_label, "macro": {"auroc": None, "ci_low": None, "ci_high": None, "labels_used": [],
                                                  "note": "unavailable: no label has both positive and negative images"}}
    low, high = interval(macro(samples, used))
    return {"per_label": per_label, "macro": {"auroc": float(point[used].mean()), "ci_low": low, "ci_high": high,
                                              "labels_used": used.tolist()}}


def macro(values: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
    """Mean over the chosen label columns (last axis), ignoring labels undefined in a resample."""
    chosen = values if labels is None else values[..., labels]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample where every label is undefined -> NaN
        return np.nanmean(chosen, axis=-1)


def interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of the finite bootstrap values (NaN, NaN when none are finite)."""
    samples = np.asarray(samples)[np.isfinite(samples)]
    if not len(samples):
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_p_value(delta_samples: np.ndarray) -> float:
    """Two-sided bootstrap p-value of "no difference": twice the smaller share of resampled
    differences on either side of 0, each counted with the +1 of Davison & Hinkley (1997), so it
    is never 0 and is below 1 - LEVEL about when the percentile interval excludes 0."""
    delta_samples = np.asarray(delta_samples)[np.isfinite(delta_samples)]
    if not len(delta_samples):
        return float("nan")
    n = len(delta_samples)
    below = (1 + np.sum(delta_samples <= 0)) / (n + 1)
    above = (1 + np.sum(delta_samples >= 0)) / (n + 1)
    return float(min(1.0, 2 * min(below, above)))


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjustment (Holm 1979): controls the family-wise error rate over the
    compared arms without assuming independence. NaN p-values stay NaN and are not counted."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    order = finite[np.argsort(p[finite], kind="stable")]
    m = len(order)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted


def verdict(delta: float, adjusted_p: float, alpha: float = ALPHA) -> str:
    """Gain / loss when the Holm-adjusted p-value is below alpha (the sign of Δ decides which),
    otherwise "no measurable difference" (which is not evidence of equality)."""
    if not np.isfinite(adjusted_p) or adjusted_p >= alpha or delta == 0:
        return NO_DIFFERENCE
    return GAIN if delta > 0 else LOSS


def t_p_value(delta: float, se: float, df: float) -> float:
    """Two-sided p-value of Δ = 0 from the t distribution with `df` degrees of freedom."""
    if not (np.isfinite(delta) and np.isfinite(se)):
        return float("nan")
    if se <= 0:
        return 1.0 if delta == 0 else 0.0
    return float(min(1.0, 2 * student_t.sf(abs(delta) / se, df)))


def mde(se: float, df: float, level: float, power: float = POWER) -> float:
    """Minimum detectable effect: the true Δ whose estimate clears the two-sided critical value at
    `level` with probability `power` (t with `df` degrees of freedom; normal when df is infinite)."""
    return float((student_t.ppf(1 - level / 2, df) + student_t.ppf(power, df)) * se)


def satterthwaite(patient_var: float, seed_vars: Sequence[tuple[float, float]]) -> float:
    """Welch-Satterthwaite degrees of freedom of patient_var + sum of seed variances (each with its
    own df); the bootstrap's patient variance counts as known (infinite df)."""
    total = patient_var + sum(v for v, _ in seed_vars)
    denominator = sum(v * v / df for v, df in seed_vars if v > 0 and np.isfinite(df))
    return float(total * total / denominator) if denominator > 0 else float("inf")


@dataclass(frozen=True)
class Difference:
    delta: float
    low: float
    high: float
    p: float
    p_holm: float
    verdict: str
    se: float = float("nan")
    df: float = float("nan")
    mde: float = float("nan")  # at the level the verdict uses (alpha / m, Holm's first step)
    mde_level: float = float("nan")


def difference_components(results: Mapping[str, ArmBootstrap], reference: str, name: str,
                          labels: np.ndarray | None = None) -> tuple[float, float, float]:
    """Δ of macro AUROC (arm - reference), its standard error and degrees of freedom."""
    arm, ref = results[name], results[reference]
    delta = float(macro(arm.estimate, labels)) - float(macro(ref.estimate, labels))
    patient = macro(arm.patient_samples if arm.patient_samples is not None else arm.samples, labels) - macro(
        ref.patient_samples if ref.patient_samples is not None else ref.samples, labels)
    patient = patient[np.isfinite(patient)]
    patient_var = float(np.var(patient, ddof=1)) if len(patient) > 1 else float("nan")
    seeds = [arm.seed_variance(labels), ref.seed_variance(labels)]
    return delta, float(np.sqrt(patient_var + sum(v for v, _ in seeds))), satterthwaite(patient_var, seeds)


def differences(results: Mapping[str, ArmBootstrap], reference: str, compared: Sequence[str],
                labels: np.ndarray | None = None, alpha: float = ALPHA) -> dict[str, Difference]:
    """Macro-AUROC difference of each compared arm from `reference`: estimate, Δ ± t·SE interval,
    t p-value, Holm-adjusted p over `compared` (one family), the verdict, and the minimum
    detectable effect at alpha / m (the level Holm's first step uses; a later step uses a larger
    level, so the figure is never optimistic)."""
    rows = {name: difference_components(results, reference, name, labels) for name in compared}
    adjusted = holm([t_p_value(delta, se, df) for delta, se, df in rows.values()])
    level = alpha / max(1, len(rows))
    out = {}
    for (name, (delta, se, df)), p_holm in zip(rows.items(), adjusted):
        half = float(student_t.ppf(1 - alpha / 2, df) * se)
        out[name] = Difference(delta, delta - half, delta + half, t_p_value(delta, se, df), float(p_holm),
                               verdict(delta, p_holm, alpha), se, df, mde(se, df, level), level)
    return out


def intersection_union(parts: Sequence[Difference]) -> tuple[float, bool]:
    """The headline test "gain over every reference": p = the largest of the parts' unadjusted p,
    and a gain only if every Δ is positive (Berger 1982: an intersection-union test needs no
    correction, its level is that of each part)."""
    if not parts:
        return float("nan"), False
    p = max(part.p for part in parts)
    return float(p), bool(all(part.delta > 0 for part in parts))
