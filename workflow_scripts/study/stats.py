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
paired patient-level bootstrap variance (it holds the seed x patient interaction at 1 / S) plus
each arm's seed-level variance / S: the seeds' spread less that interaction, pooled over the arms
where Bartlett's test finds their spreads alike (`seed_model`). The t reference distribution takes
the Welch-Satterthwaite degrees of freedom of the pieces behind it: the seed variance (the raw
spread, S - 1 df per arm or their sum when pooled, less the interaction and held at 0 or above,
which varies less than the raw spread: `positive_part_variance`) and the patient variance
(`patient_df`, from each test patient's influence, found by leaving the patient out), so the
p-value is valid at any level, in particular at the α/m Holm tests first. Its interval is Δ ± t·SE;
its minimum detectable effect (`mde`) is the true Δ the test at the level the verdict uses calls a
gain in 80 % of studies like this one (noncentral t, corrected for SE being estimated), checked by
simulating the table.

AUROC on a resample (and with one patient left out) is computed in workflow_scripts.study.auroc.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import brentq
from scipy.special import gammaln
from scipy.stats import chi2, norm
from scipy.stats import nct as noncentral_t
from scipy.stats import t as student_t

from workflow_scripts.study.auroc import (auroc_columns, cluster_counts, column_entries, leave_one_out_auroc,  # noqa: F401 (re-exported)
                                    weighted_auroc_columns)

LEVEL = 0.95  # two-sided interval level; alpha = 1 - LEVEL for the verdict
ALPHA = 1 - LEVEL
POWER = 0.8  # the minimum detectable effect is detected with this probability
GAIN, LOSS, NO_DIFFERENCE = "gain", "loss", "no measurable difference"


@dataclass
class ArmBootstrap:
    """One arm: per-label AUROC of each seed on the whole test set, their mean (the estimate) and
    the bootstrap distribution of that mean (resamples x labels)."""

    seed_values: np.ndarray  # (seeds, labels)
    samples: np.ndarray  # (resamples, labels)
    patient_samples: np.ndarray | None = None  # (resamples, labels): the seed mean on each patient resample
    seed_samples: np.ndarray | None = None  # (seeds, resamples, labels): each seed on each patient resample
    jackknife: np.ndarray | None = None  # (patients, labels): the seed mean with each test patient left out in turn

    def seed_spread(self, labels: np.ndarray | None = None) -> tuple[float, float]:
        """The variance between seeds of the macro AUROC on the whole test set (S - 1 df), and the part
        of it that the seed x patient interaction explains (seeds ranking single films differently:
        the patient bootstrap of the seed mean already carries it), about (mean single-seed bootstrap
        variance - bootstrap variance of the seed mean) * S / (S - 1). (0, 0) for one seed."""
        n_seeds = len(self.seed_values)
        if n_seeds < 2 or self.seed_samples is None:
            return 0.0, 0.0
        raw = float(np.var(macro(self.seed_values, labels), ddof=1))
        return raw, float(interaction_variance(macro(self.seed_samples, labels)))

    @property
    def estimate(self) -> np.ndarray:
        return self.seed_values.mean(axis=0)  # seeds share the test set, so a label is undefined in all or none


def seed_scale(n_seeds: int, level: float = LEVEL) -> float:
    """Factor on each seed's deviation from the arm mean: sqrt(S / (S - 1)) makes the bootstrap
    variance of the seed mean unbiased, and t / z widens it to Student-t width for the S - 1
    degrees of freedom of one arm's seed mean (with few seeds, normal-width intervals would cover
    too rarely: at 3 seeds t / z is 4.30 / 1.96)."""
    quantile = 1 - (1 - level) / 2
    return float(np.sqrt(n_seeds / (n_seeds - 1)) * student_t.ppf(quantile, n_seeds - 1) / norm.ppf(quantile))


def seed_shrink(values: np.ndarray, full: np.ndarray) -> np.ndarray:
    """Per label, the share (as a factor on deviations) of the seeds' spread that is not already in
    the patient level. Seeds and patients are crossed, not nested: the patient level carries the
    part of the seed-to-seed spread that comes from seeds ranking individual films differently
    (their interaction), about (mean single-seed bootstrap variance - bootstrap variance of the
    mean) * S / (S - 1). Counted twice, the interval covers far above its nominal rate when seeds
    differ little."""
    spread = (full - full.mean(axis=0)).var(axis=0, ddof=1)
    interaction = interaction_variance(values, ddof=0)
    share = np.divide(spread - interaction, spread, out=np.zeros_like(spread), where=spread > 0)
    return np.sqrt(np.clip(np.nan_to_num(share), 0.0, 1.0))


def interaction_variance(seed_samples: np.ndarray, ddof: int = 1) -> np.ndarray:
    """The part of the seeds' spread on the whole test set that the seed x patient interaction
    explains, from each seed's value on each patient resample (seeds, resamples, ...): (mean
    single-seed bootstrap variance - bootstrap variance of the seed mean) x S / (S - 1). One
    formula for the arm's interval (`seed_shrink`, per label) and for the seed term of a Δ's
    variance (`ArmBootstrap.seed_spread`, on the macro)."""
    n_seeds = seed_samples.shape[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # resamples where a label is undefined
        single = np.nanvar(seed_samples, axis=1, ddof=ddof).mean(axis=0)
        mean = np.nanvar(seed_samples.mean(axis=0), axis=0, ddof=ddof)
    return (single - mean) * n_seeds / (n_seeds - 1)


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
        jackknife = np.mean([leave_one_out_auroc(targets, np.asarray(run, float), index) for run in scores], axis=0)
        result[name] = ArmBootstrap(seed_values, samples, patient_samples, per_seed[name], jackknife)
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


def t_p_value(delta: float, se: float, df: float, side: str = "two-sided") -> float:
    """p-value of Δ = 0 from the t distribution with `df` degrees of freedom: two-sided, or one-sided
    against a gain (`side="gain"`: small when Δ is large and positive)."""
    if not (np.isfinite(delta) and np.isfinite(se)):
        return float("nan")
    if se <= 0:
        return (1.0 if delta == 0 else 0.0) if side != "gain" else (0.0 if delta > 0 else 1.0)
    if side == "gain":
        return float(student_t.sf(delta / se, df))
    return float(min(1.0, 2 * student_t.sf(abs(delta) / se, df)))


def mde(se: float, df: float, level: float, power: float = POWER, estimated: bool = True) -> float:
    """Minimum detectable effect: the true Δ that the two-sided t test at `level` calls a gain with
    probability `power`, for a study whose Δ has standard error `se` estimated with `df` degrees of
    freedom. Δ̂ / SE-hat is then noncentral t, so the MDE is SE times the noncentrality at which
    P(T'(df, ncp) > t(1 - level/2, df)) = power (t plus t(power) falls short of it at few df).
    `estimated`: `se` is one study's own estimate, whose mean is c4(df) x SE; dividing by c4 makes
    the printed MDE right on average (the plug-in figure reads low, and a true Δ at it is found less
    often than promised). A planner that knows its SE passes False."""
    if not (np.isfinite(se) and se > 0):
        return float("nan") if not np.isfinite(se) else 0.0
    return float(se * noncentrality(df, level, power) / (c4(df) if estimated else 1.0))


def c4(df: float) -> float:
    """E[sqrt(chi2_df / df)]: the mean of an estimated standard error over its true value."""
    if not np.isfinite(df) or df > 1e4:
        return 1.0
    return float(np.exp(0.5 * np.log(2 / df) + gammaln((df + 1) / 2) - gammaln(df / 2)))


def noncentrality(df: float, level: float, power: float = POWER) -> float:
    """The noncentrality at which a noncentral t with `df` exceeds the two-sided critical value at
    `level` with probability `power` (normal where df is infinite)."""
    if not np.isfinite(df) or df > 1e4:
        return float(norm.ppf(1 - level / 2) + norm.ppf(power))
    if df < 1:  # SE-hat too uncertain for any Δ to be found reliably (at 1 df the ncp is 16 at 0.05, 98 at 0.05 / 6)
        return float("inf")
    critical = student_t.ppf(1 - level / 2, df)
    start = critical + student_t.ppf(power, df)  # below the answer: the noncentral t is wider than t
    return float(brentq(lambda ncp: noncentral_t.sf(critical, df, ncp) - power, start - 1, 3 * start + 10, xtol=1e-6))


def satterthwaite(total: float, pieces: Sequence[tuple[float, float]], sampling_variance: float = 0.0) -> float:
    """Welch-Satterthwaite degrees of freedom of a variance estimate `total` whose uncertainty comes
    from the mean squares `pieces` (coefficient x mean square, its df; infinite df: known) and from
    pieces that are no scaled chi-square, given by the sum of their sampling variances."""
    denominator = sum(v * v / df for v, df in pieces if v > 0 and np.isfinite(df) and df > 0) + sampling_variance / 2
    return float(total * total / denominator) if denominator > 0 and total > 0 else float("inf")


def positive_part_variance(mean_square: float, interaction: float, df: float) -> float:
    """Sampling variance of a seed variance estimated as (raw spread - interaction), held at 0 or
    above, where the raw spread is mean_square x chi2(df) / df and the interaction is known: the
    positive part varies less than the raw spread where the two are close, as they are when seeds
    differ little beyond ranking single films differently. With no interaction it is the raw spread's
    2 mean_square^2 / df. Closed form from E[Y; Y > y] = df P(chi2(df + 2) > y) and
    E[Y^2; Y > y] = df (df + 2) P(chi2(df + 4) > y) for Y = chi2(df)."""
    if not (mean_square > 0 and np.isfinite(df) and df > 0):
        return 0.0
    y = max(interaction, 0.0) * df / mean_square
    first = mean_square * chi2.sf(y, df + 2) - interaction * chi2.sf(y, df)
    second = (mean_square ** 2 * (df + 2) / df * chi2.sf(y, df + 4) - 2 * interaction * mean_square * chi2.sf(y, df + 2)
              + interaction ** 2 * chi2.sf(y, df))
    return float(max(second - first * first, 0.0))


def patient_df(leave_one_out: np.ndarray, n_boot: int) -> float:
    """Degrees of freedom of the patient-level bootstrap variance of a Δ, from its values with each
    test patient left out: a variance that rests on n patients' influences ψ (ψ_i = (n - 1)(mean -
    leave-out value)) has df 2 (Σψ²)² / Var-hat(Σψ²) (n for normal ψ, fewer where a few patients
    weigh much, as positives of a rare label do), and B resamples add their own noise (B - 1 df).
    Counted as known, the patient term gave the t test 60-170 df where its SE² had 15-35: null arms
    flagged too often at Holm's small first level, power below 80 % at the printed MDE."""
    values = np.asarray(leave_one_out, float)
    values = values[np.isfinite(values)]
    n = len(values)
    squares = ((n - 1) * (values - values.mean())) ** 2
    spread = n / max(n - 1, 1) * float(((squares - squares.mean()) ** 2).sum())
    sampling = 2 * float(squares.sum()) ** 2 / spread if n > 2 and spread > 0 else float("inf")
    return float(1 / (1 / sampling + 1 / max(n_boot - 1, 1)))


def bartlett(variances: Sequence[float], dfs: Sequence[float]) -> float:
    """Bartlett's test that variances with these degrees of freedom share one value: its p-value
    (1 where fewer than two variances, or all zero; 0 where only some are zero)."""
    v, n = np.asarray(variances, float), np.asarray(dfs, float)
    if len(v) < 2 or not (v > 0).any():
        return 1.0
    if not (v > 0).all():
        return 0.0
    total = n.sum()
    pooled = float((n * v).sum() / total)
    statistic = (total * np.log(pooled) - (n * np.log(v)).sum()) / (1 + ((1 / n).sum() - 1 / total) / (3 * (len(v) - 1)))
    return float(chi2.sf(statistic, len(v) - 1))


HOMOGENEITY_ALPHA = 0.10  # the seed variance is pooled over arms unless Bartlett's test rejects at this level


@dataclass(frozen=True)
class SeedLevel:
    """The seed-level variance of one run's macro AUROC, (raw spread - interaction) held at 0 or
    above, from the seeds of `arms` (one arm, or every arm it is pooled over): their raw spread
    between seeds (df-weighted), the interaction part of it, and the raw spread's df."""

    raw: float = 0.0
    interaction: float = 0.0
    df: float = 0.0
    arms: tuple[str, ...] = ()
    pooled: bool = False

    @property
    def variance(self) -> float:
        return max(0.0, self.raw - self.interaction)

    def sampling_variance(self) -> float:
        """How much the variance estimate varies from study to study (`positive_part_variance`, the
        observed raw spread standing for its expectation, as Satterthwaite's mean squares do). Never
        more than the raw spread's own 2 raw^2 / df: holding at 0 only takes variation away."""
        return positive_part_variance(self.raw, self.interaction, self.df)


@dataclass(frozen=True)
class SeedModel:
    """Each arm's SeedLevel, and whether they are one pooled estimate (Bartlett's p on the arms' raw
    seed variances at least HOMOGENEITY_ALPHA) or each arm's own."""

    levels: dict[str, SeedLevel]
    pooled: bool
    homogeneity_p: float
    df: float  # degrees of freedom of the pooled raw seed variance (sum of S - 1), or of one arm's

    @property
    def arms_pooled(self) -> int:
        return next((len(level.arms) for level in self.levels.values() if level.pooled), 0)


def seed_model(results: Mapping[str, ArmBootstrap], labels: np.ndarray | None = None, pool: bool = True) -> SeedModel:
    """The seed level of every arm: pooled over the arms with 2+ seeds when `pool` and Bartlett's
    test does not reject a common seed variance, else each arm's own. Pooling buys degrees of
    freedom (7 arms x 3 seeds: 14 instead of 2 per arm), which is most of the power at few seeds."""
    spreads = {name: arm.seed_spread(labels) for name, arm in results.items() if len(arm.seed_values) > 1}
    dfs = {name: len(results[name].seed_values) - 1 for name in spreads}
    own = {name: SeedLevel(raw, interaction, dfs[name], (name,)) for name, (raw, interaction) in spreads.items()}
    levels = {name: own.get(name, SeedLevel(arms=(name,))) for name in results}
    p = bartlett([raw for raw, _ in spreads.values()], list(dfs.values()))
    if not pool or len(spreads) < 2 or p < HOMOGENEITY_ALPHA:
        return SeedModel(levels, False, p, float(np.mean(list(dfs.values()))) if dfs else 0.0)
    total = sum(dfs.values())
    raw = sum(dfs[name] * spread[0] for name, spread in spreads.items()) / total
    interaction = sum(dfs[name] * spread[1] for name, spread in spreads.items()) / total
    shared = SeedLevel(raw, interaction, float(total), tuple(spreads), True)
    return SeedModel({name: shared if name in spreads else levels[name] for name in results}, True, p, float(total))


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
    p_gain: float = float("nan")  # one-sided p against a gain (the headline's)


def difference_components(results: Mapping[str, ArmBootstrap], reference: str, name: str, labels: np.ndarray | None = None,
                          seeds: SeedModel | None = None) -> tuple[float, float, float]:
    """Δ of macro AUROC (arm - reference), its standard error and degrees of freedom: the paired
    patient-level bootstrap variance (it holds the seed x patient interaction at 1 / S) plus each
    arm's seed-level variance / S (one term where pooled), with the Satterthwaite df of the pieces
    behind it: the patient variance (`patient_df`) and the seed variance (`SeedLevel.sampling_variance`)."""
    seeds = seeds or seed_model({key: results[key] for key in (reference, name)}, labels, pool=False)
    arm, ref = results[name], results[reference]
    delta = float(macro(arm.estimate, labels)) - float(macro(ref.estimate, labels))
    patient = macro(arm.patient_samples if arm.patient_samples is not None else arm.samples, labels) - macro(
        ref.patient_samples if ref.patient_samples is not None else ref.samples, labels)
    patient = patient[np.isfinite(patient)]
    patient_var = float(np.var(patient, ddof=1)) if len(patient) > 1 else float("nan")
    pieces = []
    if arm.jackknife is not None and ref.jackknife is not None:
        pieces.append((patient_var, patient_df(macro(arm.jackknife, labels) - macro(ref.jackknife, labels), len(patient))))
    weights: dict[SeedLevel, float] = {}  # each seed level (pooled: one, shared by both arms) -> its coefficient
    for key in (name, reference):
        weights[seeds.levels[key]] = weights.get(seeds.levels[key], 0.0) + 1 / len(results[key].seed_values)
    seed_var = sum(weight * level.variance for level, weight in weights.items())
    sampling = sum(weight ** 2 * level.sampling_variance() for level, weight in weights.items())
    total = patient_var + seed_var
    return delta, float(np.sqrt(total)), satterthwaite(total, pieces, sampling)


def differences(results: Mapping[str, ArmBootstrap], reference: str, compared: Sequence[str],
                labels: np.ndarray | None = None, alpha: float = ALPHA, seeds: SeedModel | None = None) -> dict[str, Difference]:
    """Macro-AUROC difference of each compared arm from `reference`: estimate, Δ ± t·SE interval,
    t p-values (two-sided, and one-sided against a gain), Holm-adjusted two-sided p over `compared`
    (one family), the verdict, and the minimum detectable effect at alpha / m (the level Holm's first
    step uses; a later step uses a larger level, so the figure is never optimistic)."""
    rows = {name: difference_components(results, reference, name, labels, seeds) for name in compared}
    adjusted = holm([t_p_value(delta, se, df) for delta, se, df in rows.values()])
    level = alpha / max(1, len(rows))
    out = {}
    for (name, (delta, se, df)), p_holm in zip(rows.items(), adjusted):
        half = float(student_t.ppf(1 - alpha / 2, df) * se)
        out[name] = Difference(delta, delta - half, delta + half, t_p_value(delta, se, df), float(p_holm),
                               verdict(delta, p_holm, alpha), se, df, mde(se, df, level), level,
                               t_p_value(delta, se, df, side="gain"))
    return out


def ratio_interval(top: Difference, bottom: Difference, covariance: float, level: float = LEVEL) -> tuple[float, float, float]:
    """top.delta / bottom.delta with Fieller's interval (Fieller 1954) at `level`, t with the smaller
    df; (ratio, NaN, NaN) where the denominator is not clear of 0 at that level (the interval is unbounded)."""
    ratio = top.delta / bottom.delta if bottom.delta else float("nan")
    t2 = float(student_t.ppf(1 - (1 - level) / 2, min(top.df, bottom.df))) ** 2
    a = bottom.delta ** 2 - t2 * bottom.se ** 2
    b = top.delta * bottom.delta - t2 * covariance
    c = top.delta ** 2 - t2 * top.se ** 2
    if not (np.isfinite(a) and a > 0) or b * b - a * c < 0:
        return ratio, float("nan"), float("nan")
    root = float(np.sqrt(b * b - a * c))
    return ratio, (b - root) / a, (b + root) / a


def intersection_union(parts: Sequence[Difference]) -> tuple[float, bool]:
    """The headline test "gain over every reference": p = the largest of the parts' one-sided p
    against a gain (Berger 1982: an intersection-union test needs no correction, its level is that
    of each part), and whether every Δ is positive."""
    if not parts:
        return float("nan"), False
    return float(max(part.p_gain for part in parts)), bool(all(part.delta > 0 for part in parts))
