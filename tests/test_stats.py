"""The statistics every table uses: AUROC against scikit-learn, Holm, the verdict, and the
calibration test that proves the intervals are honest (and that the old ones were not)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import calibration
from workflow_scripts.study import stats
from workflow_scripts.study.stats import (
    GAIN,
    LOSS,
    NO_DIFFERENCE,
    auroc_columns,
    bootstrap_p_value,
    cluster_counts,
    differences,
    hierarchical_bootstrap,
    holm,
    interval,
    verdict,
    weighted_auroc_columns,
)


def test_auroc_columns_match_sklearn_including_ties_and_missing_classes() -> None:
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 2, (60, 3)).astype(float)
    scores = np.round(rng.random((60, 3)), 1)  # many ties
    targets[:, 2] = 0  # no positive: undefined
    got = auroc_columns(targets, scores)
    for k in range(2):
        assert got[k] == pytest.approx(roc_auc_score(targets[:, k], scores[:, k]))
    assert np.isnan(got[2])


def test_weighted_auroc_matches_sklearn_sample_weight_for_every_resample() -> None:
    rng = np.random.default_rng(1)
    targets = rng.integers(0, 2, (50, 3)).astype(float)
    scores = np.column_stack([np.round(rng.random(50), 1), rng.random(50), np.round(rng.random(50), 1)])  # with and without ties
    targets[:, 2] = scores[:, 2] > 0.5  # ties across the classes at every level, highest and lowest scores of each class
    index, counts = cluster_counts(np.repeat(np.arange(25), 2), 6, rng)
    got = weighted_auroc_columns(targets, scores, index, counts)
    for b in range(6):
        for k in range(3):
            assert got[b, k] == pytest.approx(roc_auc_score(targets[:, k], scores[:, k], sample_weight=counts[b, index]))
    assert np.isnan(weighted_auroc_columns(np.zeros((50, 1)), scores[:, :1], index, counts)).all()


def test_cluster_counts_keep_the_films_of_a_patient_together() -> None:
    index, counts = cluster_counts(np.array([7, 7, 7, 3, 9, 9]), 100, np.random.default_rng(0))
    assert index.tolist() == [1, 1, 1, 0, 2, 2]
    assert (counts.sum(axis=1) == 3).all() and counts.std(axis=0).min() > 0  # three patients drawn each time


def test_leaving_one_patient_out_matches_auroc_on_the_rest() -> None:
    rng = np.random.default_rng(3)
    patient = rng.permutation(np.repeat(np.arange(30), 1 + rng.poisson(1.5, 30)))
    targets = (rng.random((len(patient), 3)) < 0.3).astype(float)
    scores = np.round(rng.random(targets.shape) + targets, 1)  # ties, also within a patient
    targets[:, 2] = patient == patient[0]  # label 2's positives all in one patient
    got = stats.leave_one_out_auroc(targets, scores, patient)
    want = np.array([auroc_columns(targets[patient != p], scores[patient != p]) for p in range(30)])
    np.testing.assert_allclose(got, want, atol=1e-12)  # NaN where a class runs out, in both
    assert np.isnan(got[patient[0], 2]) and np.isfinite(np.delete(got[:, 2], patient[0])).all()


def test_patient_df_is_about_n_for_normal_influences_and_smaller_when_few_patients_weigh_much() -> None:
    rng = np.random.default_rng(0)
    normal = [stats.patient_df(rng.normal(0, 1, 400), float("inf")) for _ in range(200)]
    assert np.median(normal) == pytest.approx(400, rel=0.1)
    heavy = np.median([stats.patient_df(rng.standard_t(3, 400), float("inf")) for _ in range(200)])
    assert heavy < 150
    assert stats.patient_df(rng.normal(0, 1, 400), 101) < 100  # the resamples' own noise: B - 1 df at most


def test_holm_matches_the_textbook_example() -> None:
    # p = (0.01, 0.04, 0.03, 0.005): sorted 0.005*4, 0.01*3, 0.03*2, 0.04*1, then running maxima
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adjusted = holm([0.2, float("nan"), 0.6])
    assert adjusted[0] == pytest.approx(0.4) and np.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.6)


def test_verdict_words() -> None:
    assert verdict(0.02, 0.01) == GAIN
    assert verdict(-0.02, 0.01) == LOSS
    assert verdict(0.02, 0.2) == NO_DIFFERENCE == verdict(-0.02, float("nan"))


def test_p_value_and_interval_agree_and_are_never_zero() -> None:
    assert bootstrap_p_value(np.full(99, 0.1)) == pytest.approx(0.02)
    assert bootstrap_p_value(np.zeros(50)) == 1.0
    samples = np.random.default_rng(0).normal(0.5, 0.1, 4000)
    assert interval(samples) == pytest.approx((0.5 - 1.96 * 0.1, 0.5 + 1.96 * 0.1), abs=0.01)


def test_identical_arms_give_a_zero_difference_with_zero_width() -> None:
    rng = np.random.default_rng(2)
    targets = rng.integers(0, 2, (40, 2)).astype(float)
    scores = rng.random((3, 40, 2))
    result = hierarchical_bootstrap(targets, np.arange(40) // 2, {"a": scores, "b": scores.copy()}, 50, seed=0)
    assert result["a"].samples.shape == (50, 2)
    # seeds are resampled per arm, so identical arms differ only when their seeds differ: with one seed they cannot
    single = hierarchical_bootstrap(targets, np.arange(40) // 2, {"a": scores[:1], "b": scores[:1].copy()}, 50, seed=0)
    d = differences(single, "a", ["b"])["b"]
    assert (d.delta, d.low, d.high, d.p, d.verdict) == (0.0, 0.0, 0.0, 1.0, NO_DIFFERENCE)


def test_bartlett_matches_scipy() -> None:
    from scipy.stats import bartlett as scipy_bartlett

    rng = np.random.default_rng(5)
    samples = [rng.normal(0, sd, n) for sd, n in ((1, 4), (1.5, 6), (3, 5))]
    expected = scipy_bartlett(*samples).pvalue
    assert stats.bartlett([np.var(x, ddof=1) for x in samples], [len(x) - 1 for x in samples]) == pytest.approx(expected)
    assert stats.bartlett([0.0, 0.0], [2, 2]) == 1.0 and stats.bartlett([0.0, 1.0], [2, 2]) == 0.0


def arm(seed_macros: list[float], interaction_sd: float = 0.0) -> stats.ArmBootstrap:
    """An arm whose seeds score `seed_macros` on the whole test set and whose single-seed patient
    resamples spread by interaction_sd beyond the seed mean's (one label)."""
    rng = np.random.default_rng(len(seed_macros))
    common = rng.normal(0, 0.01, 4000)
    per_seed = np.array([m + common + rng.normal(0, interaction_sd, 4000) for m in seed_macros])[..., None]
    values = np.array(seed_macros)[:, None]
    return stats.ArmBootstrap(values, per_seed.mean(axis=0), per_seed.mean(axis=0), per_seed)


def test_seed_variance_is_pooled_over_arms_only_where_homogeneous_and_its_df_counts_the_raw_spread() -> None:
    alike = {name: arm([0.80 + d for d in shift]) for name, shift in
             (("ratio0", (0.0, 0.01, -0.01)), ("a", (0.005, -0.008, 0.012)), ("b", (-0.01, 0.0, 0.009)))}
    pooled = stats.seed_model(alike)
    assert pooled.pooled and pooled.df == 6 and pooled.levels["a"] is pooled.levels["b"]
    raw = np.mean([np.var(macro_values.seed_values[:, 0], ddof=1) for macro_values in alike.values()])
    assert pooled.levels["a"].variance == pytest.approx(raw, rel=0.05)  # no interaction here
    d_pooled = stats.differences(alike, "ratio0", ["a"], seeds=pooled)["a"]
    d_own = stats.differences(alike, "ratio0", ["a"])["a"]
    assert d_pooled.df > d_own.df  # 6 df of pooled spread instead of 2 + 2
    assert pooled.arms_pooled == 3
    # an arm with one seed has no seed spread to pool: the count is of the others, whichever arm comes first
    assert stats.seed_model({"one": arm([0.8]), **alike}).arms_pooled == 3
    wild = {**alike, "b": arm([0.5, 0.9, 0.7])}
    assert not stats.seed_model(wild).pooled  # Bartlett rejects one arm whose seeds spread 30 times as far
    # the interaction explains most of the spread: the seed term (raw spread less the interaction)
    # keeps most of the raw spread's uncertainty while its size shrinks, so its df falls below
    # S - 1 = 2 per arm
    noisy = {name: arm([0.80 + d for d in (0.0, 0.02, -0.02)], interaction_sd=0.017) for name in ("ratio0", "a")}
    spread, interaction = noisy["a"].seed_spread()
    assert 0 < interaction < spread
    assert stats.differences(noisy, "ratio0", ["a"])["a"].df < 4


def test_positive_part_variance_matches_draws_of_the_clipped_seed_variance() -> None:
    # the seed variance the table uses is (raw spread - interaction) held at 0 or above, the raw
    # spread a scaled chi-square; its sampling variance (the seed piece of the Satterthwaite df) is
    # checked against 400 000 draws (Monte Carlo SE of a variance there about 0.5 %)
    rng = np.random.default_rng(3)
    for mean_square, interaction, df in ((1.0, 0.0, 2), (1.0, 0.9, 2), (1.0, 0.9, 12), (2.0, 0.5, 4), (1.0, 1.0, 4)):
        raw = mean_square * rng.chisquare(df, 400_000) / df
        drawn = np.maximum(raw - interaction, 0.0).var()
        assert stats.positive_part_variance(mean_square, interaction, df) == pytest.approx(drawn, rel=0.03)
    assert stats.positive_part_variance(1.0, 0.0, 2) == pytest.approx(1.0)  # no interaction: the raw spread's 2 m^2 / df
    # where the interaction explains most of the spread (93 %, as in the calibration designs), the
    # held-at-0 estimate varies about half as much as the raw spread that the df used to count
    assert stats.positive_part_variance(1.0, 0.93, 4) < 0.6 * stats.positive_part_variance(1.0, 0.0, 4)


def test_the_seed_piece_never_lowers_the_df_below_what_the_raw_spread_gave() -> None:
    # holding at 0 only takes variation away (x -> max(x - i, 0) is 1-Lipschitz), so the seed piece's
    # variance is at most the raw spread's 2 raw^2 / df; two seeds with equal AUROC on the whole test
    # set but a large interaction (the micro workflow's case) once gave the table 0.1 df and a crash
    rng = np.random.default_rng(0)
    for raw, interaction, df in zip(rng.exponential(1, 200), rng.exponential(1, 200), rng.integers(1, 30, 200)):
        assert stats.positive_part_variance(raw, interaction, df) <= 2 * raw * raw / df * (1 + 1e-9)
    assert stats.SeedLevel(raw=0.0, interaction=0.0137, df=1).sampling_variance() == 0.0
    assert stats.mde(1.0, 0.2, 0.01) == float("inf")  # below 1 df no Δ is found reliably; no solver failure


def test_mde_is_the_noncentral_t_and_reads_high_by_c4_for_an_estimated_se() -> None:
    from scipy.stats import nct, t as student_t

    for df, level in ((4, 0.05), (14, 0.05 / 6), (float("inf"), 0.05)):
        ncp = stats.mde(1.0, df, level, estimated=False)
        critical = student_t.ppf(1 - level / 2, df)
        assert nct.sf(critical, df, ncp) == pytest.approx(0.8, abs=1e-4) if np.isfinite(df) else ncp == pytest.approx(2.8016, abs=1e-3)
        assert stats.mde(1.0, df, level) == pytest.approx(ncp / stats.c4(df))
    assert stats.c4(4) == pytest.approx(0.9400, abs=1e-4) and stats.c4(float("inf")) == 1.0


def test_arm_intervals_widen_with_t_at_s_minus_1_df() -> None:
    assert stats.seed_scale(3) == pytest.approx(np.sqrt(1.5) * 4.3027 / 1.95996, rel=1e-4)


# ----------------------------------------------------------------------------- calibration

def simulate(rng: np.random.Generator, effect: float = 0.0, n_patients: int = 120, n_seeds: int = 5, n_labels: int = 2,
             seed_sd: float = 0.6, names: tuple[str, ...] = ("reference", "arm")) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """A test set clustered by patient (3.6 films per patient on average, as in NIH; a patient random
    effect raises both the chance of a finding and the scores of all their films), and two arms whose
    seeds differ in quality (a seed-level random effect on the score gap between positives and
    negatives) and in per-film noise. `effect` plants a true difference in every arm after the
    first of `names` (default: two arms, "reference" and "arm")."""
    patient = np.repeat(np.arange(n_patients), 1 + rng.poisson(2.6, n_patients))
    n = len(patient)
    u = rng.normal(0, 1, (n_patients, n_labels))[patient]
    targets = (rng.random((n, n_labels)) < 1 / (1 + np.exp(0.5 - u))).astype(float)
    base = targets + u + rng.normal(0, 1, (n, n_labels))
    arms = {}
    for name in names:  # the first is the reference; `effect` is planted in every other arm
        planted = 0.0 if name == names[0] else effect
        quality = rng.normal(0, seed_sd, (n_seeds, 1, n_labels))
        arms[name] = base[None] + (planted + quality) * targets[None] + rng.normal(0, 0.5, (n_seeds, n, n_labels))
    return targets, patient, arms


def run_study(repeats: int, effect: float = 0.0, todays_method: bool = False, seed_sd: float = 0.6) -> tuple[float, float]:
    """Share of repeats whose 95% Δ interval covers 0, and share with the verdict "gain"."""
    rng = np.random.default_rng(1)
    covered = gains = 0
    for repeat in range(repeats):
        targets, patient, arms = simulate(rng, effect, seed_sd=seed_sd)
        if todays_method:  # image-level bootstrap, seeds averaged inside each resample
            result = hierarchical_bootstrap(targets, np.arange(len(patient)), arms, 200, seed=repeat, resample_seeds=False)
        else:
            result = hierarchical_bootstrap(targets, patient, arms, 200, seed=repeat)
        d = differences(result, "reference", ["arm"])["arm"]
        covered += d.low <= 0 <= d.high
        gains += d.verdict == GAIN
    return covered / repeats, gains / repeats


def test_calibration_todays_image_level_seed_averaged_bootstrap_is_too_narrow() -> None:
    # the same simulation with the old method: patients and seeds ignored, the interval misses 0 far
    # too often. 60 repeats: SE 6.5 points at 50 % (a calibrated method covers in 95 %)
    coverage, false_gains = run_study(60, todays_method=True)
    assert coverage < 0.80, coverage
    assert false_gains > 0.1


def test_calibration_a_planted_difference_is_detected() -> None:
    coverage, gains = run_study(40, effect=1.0)
    assert gains >= 0.9 and coverage <= 0.1


# Calibration of the table's own verdicts: every study below is simulated run by run
# (tests/calibration.py) and goes through comparison.analyse -> compare.comparison_table; a rate is
# the share of repeats whose table reads so. Each check allows the nominal rate plus MC_MARGIN
# binomial standard errors of that share (about a 2.3 % chance that a calibrated method fails
# one bound by chance); the repeats, the standard error and the rate are in each message.
# Quick tier: 60 test patients x ~2.4 films, 2 labels, 100 resamples. The slow tier repeats the
# power checks with enough repeats that a 5-point miss fails (SE <= 1.6 points), adds 5 seeds in a
# seven-arm table, and the demo-size positive control.
MC_MARGIN = 2.0
# The MDE may read conservative, never optimistic: a true Δ at it must read gain in at least 80 %
# (less MC_MARGIN SE) and at most POWER_CEILING, the 80 ± 5 % that #28 asks for. Measured: about
# 82 % at 3 seeds, 81 % at 5. The seed variance is held at 0 or above, so where seeds differ little
# beyond ranking single films differently it reads high (SE² 5-13 % above the Δ's variance across
# 3-seed studies, 3-6 % at 5 seeds), and the printed MDE with it.
POWER_CEILING = 0.85
QUICK = calibration.replace(calibration.DEMO, n_patients=60, n_labels=2, n_boot=100)
PAIR3 = calibration.replace(QUICK, arms=calibration.PAIR)
PAIR5 = calibration.replace(PAIR3, n_seeds=5)
SEVEN3 = QUICK
SEVEN5 = calibration.replace(QUICK, n_seeds=5)
# score-scale effects that put more_real's true Δ at the table's MDE in each design (found once
# by simulation; each test checks that the planted Δ and the printed MDE agree)
AT_MDE = {"pair3": 1.34, "pair5": 1.11, "seven3": 1.74, "seven5": 1.5}


def bound(rate: float, repeats: int) -> float:
    return rate + MC_MARGIN * math.sqrt(rate * (1 - rate) / repeats)


def described(name: str, share: float, repeats: int) -> str:
    return f"{name}: {share:.3f} (SE {calibration.Rates.se(share, repeats):.3f}, {repeats} repeats)"


@pytest.mark.parametrize("design", [PAIR3, pytest.param(PAIR5, marks=pytest.mark.slow),
                                    pytest.param(calibration.replace(PAIR3, seed_sd=0.0), marks=pytest.mark.slow)],
                         ids=["3 seeds", "5 seeds", "seeds differ only film by film"])
def test_identical_arms_read_gain_or_loss_at_most_5_percent_and_their_intervals_cover(design) -> None:
    # two arms from one training process: gain or loss (Holm's level is alpha for one arm) at most
    # 5 %; the 95 % Δ interval covers the true Δ of 0 in at least 95 % and at most 99 % (seeds that
    # only rank single films differently: counting their spread at both levels would cover far
    # above 95 %). 300 repeats: SE 1.3 points at 5 %
    repeats = 300
    result = calibration.rates(repeats, design, seed=100 + design.n_seeds)
    flagged, covered = result.flagged.mean(), result.covered.mean()
    assert flagged <= bound(0.05, repeats), described("gain or loss", flagged, repeats)
    assert 0.95 - MC_MARGIN * calibration.Rates.se(0.95, repeats) <= covered <= 0.99, described("coverage", covered, repeats)
    assert flagged >= 0.005  # not vacuous: a test that never rejects would pass the bound


def power_at_mde(design, effect: float, repeats: int, seed: int, plan_seeds: int | None = None,
                 check_power: bool = True) -> calibration.Rates:
    """Plant more_real's Δ near the table's MDE. The printed MDE (its mean over repeats) must sit at the
    true Δ (the mean estimate: Δ-hat is unbiased) within 2.5 standard errors of their difference + 1 %,
    and the table must read gain in at least 80 % - MC_MARGIN SE and at most POWER_CEILING, the rate
    moved by the plant's offset from the printed MDE (1 point per %, about the slope of a power
    curve at 80 %): the claim is power at the printed figure, not at wherever the plant landed."""
    result = calibration.rates(repeats, design, effect, seed=seed, plan_seeds=plan_seeds)
    truth, printed, gain = result.delta.mean(), result.mde.mean(), result.gain.mean()
    offset = (truth - printed) / truth  # a plant above the printed MDE reads gain more often
    se = math.sqrt(result.delta.var() + result.mde.var()) / math.sqrt(repeats) / truth
    message = (f"{described('gain', gain, repeats)}; true Δ {truth:.4f}, mean printed MDE {printed:.4f} "
               f"(offset {offset:+.1%} ± {se:.1%}), so about {gain - offset:.1%} at the MDE; df printed: median "
               f"{np.median(result.df):.1f}, harmonic mean {1 / np.mean(1 / result.df):.1f}; from SE²'s spread "
               f"{result.df_from_spread():.1f}; SE² / Var(Δ-hat) {result.se2.mean() / result.delta.var():.3f}")
    assert abs(offset) <= 2.5 * se + 0.01, message
    if check_power:
        assert 0.8 - MC_MARGIN * calibration.Rates.se(0.8, repeats) <= gain - offset <= POWER_CEILING, message
    print(message)
    return result


@pytest.mark.slow  # Monte Carlo calibration (hundreds of simulated tables); the quick tier keeps the identical-arms check
def test_a_true_delta_at_the_printed_mde_reads_gain_80_percent_and_plan_power_predicts_5_seeds() -> None:
    # pairs with 3 and with 5 seeds, 250 repeats each (power itself is checked with more repeats
    # below). The 3-seed studies double as pilots: plan_power's mean prediction for 5 seeds must be
    # within 10 % of the mean MDE the 5-seed tables print (the SE of each mean is about 1 %)
    pilots = power_at_mde(PAIR3, AT_MDE["pair3"], 250, seed=203, plan_seeds=5, check_power=False)
    studies = power_at_mde(PAIR5, AT_MDE["pair5"], 250, seed=205, check_power=False)
    predicted, printed = float(np.mean(pilots.planned)), float(studies.mde.mean())
    message = f"3-seed pilots predict {predicted:.4f} for 5 seeds, 5-seed tables print {printed:.4f}"
    assert abs(predicted - printed) <= 0.10 * printed, message
    print(message)


@pytest.mark.slow  # Monte Carlo calibration (hundreds of simulated tables); the quick tier keeps the identical-arms check
def test_inside_a_seven_arm_table_the_mde_holds_and_the_headline_and_families_stay_at_5_percent() -> None:
    # more_real planted at its MDE among six arms compared with ratio0 (Holm's first level 0.05 / 6);
    # every other arm is truly equal to ratio0, so the headline (synthetic arms vs ratio0, noise and
    # rebalanced) and the ratio0 family's other verdicts are under the null. 200 repeats: SE 1.5
    # points at 5 %; the printed MDE must agree with the planted Δ (its power: the slow test below)
    repeats = 200
    result = power_at_mde(SEVEN3, AT_MDE["seven3"], repeats, seed=300, check_power=False)
    assert result.headline.mean() <= bound(0.05, repeats), described("headline yes", result.headline.mean(), repeats)
    assert result.null_family.mean() <= bound(0.05, repeats), described("null arms flagged", result.null_family.mean(), repeats)


@pytest.mark.slow
@pytest.mark.parametrize("name,design,repeats", [("pair3", PAIR3, 2000), ("pair5", PAIR5, 640), ("seven3", SEVEN3, 2000),
                                                 ("seven5", SEVEN5, 640)])
def test_slow_power_at_the_printed_mde_to_within_5_points(name: str, design, repeats: int) -> None:
    # SE 0.9 points at 80 % with 2000 repeats (3 seeds, about 82 % measured), 1.6 with 640 (5 seeds,
    # about 81 %): a method that overstates power fails below 80 - 2 SE (one at 75 % always), one
    # more than 5 points conservative above 85 % (one at 86 % in 88 % of runs at 3 seeds)
    power_at_mde(design, AT_MDE[name], repeats, seed=500 + len(design.arms) * 10 + design.n_seeds)


def demo_design() -> calibration.Design:
    """The demo's study as config/config.yaml sets it: its arms and seeds, its test patients
    (demo.num_patients x split.test_fraction, ~2.4 films each), 200 resamples; components as measured."""
    from conftest import REPO
    from workflow_scripts.common.config import load_config
    from workflow_scripts.study.arms import arm_names

    config = load_config([REPO / "config" / "config.yaml"])
    arms = tuple(name for name in arm_names(config) if name in calibration.SEVEN_ARMS)
    patients = round(config["demo"]["num_patients"] * config["split"]["test_fraction"])
    return calibration.replace(calibration.DEMO, arms=arms, n_seeds=len(config["classifier"]["seeds"]),
                               n_patients=patients, n_boot=config["classifier"]["bootstrap_samples"])


@pytest.mark.slow
def test_slow_the_demos_positive_control_reads_gain_in_90_percent_and_identical_arms_stay_at_5() -> None:
    # more_real's true Δ +0.05 (the demo measured +0.046 to +0.056) in the demo's own design:
    # 600 repeats, SE 1.2 points at 90 % and 0.9 at 5 %; the other arms equal ratio0 (family and
    # headline at 5 %). Measured: null family 3.5 % here; an earlier 300 repeats (seed 600) read
    # 7.7 % (SE 1.5), 4.9 % (SE 0.7) over both
    design, repeats = demo_design(), 600
    result = calibration.rates(repeats, design, 0.73, seed=601)
    gain = result.gain.mean()
    message = f"{design}: {described('gain', gain, repeats)}, true Δ {result.delta.mean():.4f}"
    message += (f"; {described('null arms flagged', result.null_family.mean(), repeats)}; "
                f"{described('headline yes', result.headline.mean(), repeats)}")
    print(message)
    assert abs(result.delta.mean() - 0.05) <= 0.003, message
    assert gain >= 0.90, message
    assert result.null_family.mean() <= bound(0.05, repeats), described("null arms flagged", result.null_family.mean(), repeats)
    assert result.headline.mean() <= bound(0.05, repeats), described("headline yes", result.headline.mean(), repeats)


@pytest.mark.slow
def test_slow_the_headline_at_its_least_favourable_null_and_its_power() -> None:
    # every synthetic arm and the noise control equally better than ratio0 (+~0.06): the line must
    # not read yes (a gain over noise is the question); then ratio50 alone planted over every
    # reference: its power is reported. 300 repeats each: SE 1.3 points at 5 %
    repeats, noise_like = 300, {"ratio10": 1.0, "ratio25": 1.0, "ratio50": 1.0, "noise": 1.0, "rebalanced": 1.0}
    rng = np.random.default_rng(700)
    yes = np.mean([calibration.table(rng, SEVEN3, noise_like)["verdict_headline"].eq(GAIN).any() for _ in range(repeats)])
    assert yes <= bound(0.05, repeats), described("headline yes", yes, repeats)
    power = calibration.rates(repeats, SEVEN3, AT_MDE["seven3"] * 1.3, planted="ratio50", seed=701).headline.mean()
    assert power >= 0.5, described("headline power, ratio50 over every reference", power, repeats)


# ----------------------------------------------------------------------------- one run's figures


def test_one_runs_aurocs_match_sklearn_with_patient_clustered_intervals() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    y = np.zeros((120, 3))
    y[:, 0] = rng.random(120) < 0.3
    y[:, 1] = rng.random(120) < 0.5
    scores = y * 0.8 + rng.normal(0, 0.5, y.shape)
    patients = np.arange(120) // 4  # four films per patient
    result = stats.run_aurocs(y, scores, patients, n_boot=300, seed=0)
    for j in (0, 1):
        row = result["per_label"][j]
        assert row["auroc"] == pytest.approx(roc_auc_score(y[:, j], scores[:, j]))
        assert row["ci_low"] < row["auroc"] < row["ci_high"] and row["positives"] == int(y[:, j].sum())
    assert result["per_label"][2] == {"auroc": None, "ci_low": None, "ci_high": None, "positives": 0,
                                      "note": "unavailable: no positive image"}
    macro = result["macro"]
    assert macro["labels_used"] == [0, 1]  # the label without positives is left out of the mean
    assert macro["auroc"] == pytest.approx(np.mean([result["per_label"][j]["auroc"] for j in (0, 1)]))
    assert result == stats.run_aurocs(y, scores, patients, n_boot=300, seed=0)  # seeded
    # Films of one patient move together: duplicating every film within its patient widens nothing
    # at the image level but must not narrow the patient-level interval.
    doubled = stats.run_aurocs(np.repeat(y, 2, axis=0), np.repeat(scores, 2, axis=0), np.repeat(patients, 2), 300, 0)
    width = macro["ci_high"] - macro["ci_low"]
    assert doubled["macro"]["ci_high"] - doubled["macro"]["ci_low"] == pytest.approx(width, rel=0.25)


def test_one_runs_perfect_separation_and_ties() -> None:
    perfect = stats.run_aurocs([0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.3, 0.7, 0.8, 0.9], np.arange(6), 50, 0)
    assert perfect["per_label"][0]["auroc"] == 1.0 and perfect["macro"]["ci_low"] == perfect["macro"]["ci_high"] == 1.0
    assert stats.run_aurocs([0, 1], [0.5, 0.5], np.arange(2), 10, 0)["per_label"][0]["auroc"] == pytest.approx(0.5)
    none = stats.run_aurocs(np.zeros((4, 2)), np.random.default_rng(0).random((4, 2)), np.arange(4), 10, 0)
    assert none["macro"]["auroc"] is None and none["macro"]["note"].startswith("unavailable")
