"""Plan a study: how many training seeds and test patients reach a target minimum detectable effect.

    python -m workflow_scripts.study.power --config config/config.yaml \\
        --runs results/classifier/*_seed* --test results/data/test.csv --out results/power.md

Reads finished classifier runs (a pilot such as ratio0 with a few seeds, or a whole study), prints
the MDE the table prints for them (the same `comparison.analyse`), takes the study's variance
components from the same two-level bootstrap (workflow_scripts.study.stats), and prints the MDE of a Δ
vs ratio0 for other numbers of seeds per arm and test patients, and the fewest seeds that reach
`classifier.target_mde` at each test-set size.

The model (docs/reading-the-table.md), for S seeds per arm and f times the pilot's test patients:
    Var(Δ) = V_patients / f + 2 (σ²_seed + σ²_interaction / f) / S
V_patients: the paired patient-level variance of a Δ vs ratio0 that no seed averages away (the
bootstrap variance of the compared arms' Δ less their seeds' interaction / S; in a ratio0-only
pilot, from two halves of its seeds, a floor: real arms that train on other data differ on some
patients more than seeds do). σ²_seed: the seed-level variance of one run's macro AUROC (the seeds'
spread less the interaction), pooled over arms. σ²_interaction: the part of one run's spread that
comes from seeds ranking single films differently; it is measured on the test set, so it shrinks
with more test patients AND with more seeds. The MDE is the table's own (`stats.mde`): noncentral t
at 0.05 / m (Holm's first level for m arms compared with ratio0), power 80 %, with the
Satterthwaite df of the seed variance pooled over the study's arms, as the table pools it (the
spread less the interaction, held at 0 or above: `stats.positive_part_variance`), and of the
patient-level variance (`stats.patient_df`: in proportion to the test patients, plus the
resamples' own noise).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from workflow_scripts.common import paths
from workflow_scripts.common.errors import ConfigError, DataError, run_stage
from workflow_scripts.study import stats
from workflow_scripts.classifier.classifier_model import class_names
from workflow_scripts.study.comparison import align_test_split, analyse, check_matched, group_arms, load_run
from workflow_scripts.common.config import add_config_arguments, config_from_args
from workflow_scripts.common.labels import read_csv_checked
from workflow_scripts.study.arms import REFERENCE

SEED_GRID = (2, 3, 5, 8, 10, 15, 20, 30)
PATIENT_FACTORS = (1, 2, 4, 10)
BOOTSTRAP_SEED = 0  # the halves' bootstrap (the table's own runs through comparison.analyse)


def variance_components(boot: dict[str, stats.ArmBootstrap], labels: np.ndarray) -> dict[str, Any]:
    """σ²_seed, σ²_interaction (pooled over arms with 2+ seeds, weights S - 1) and V_patients of a Δ vs ratio0."""
    spreads = {name: result.seed_spread(labels) for name, result in boot.items() if len(result.seed_values) > 1}
    dfs = {name: len(boot[name].seed_values) - 1 for name in spreads}
    dof = sum(dfs.values())
    raw = sum(dfs[name] * spread[0] for name, spread in spreads.items()) / dof if dof else float("nan")
    interaction = max(0.0, sum(dfs[name] * spread[1] for name, spread in spreads.items()) / dof) if dof else 0.0
    others = [name for name in boot if name != REFERENCE]
    reference = stats.macro(boot[REFERENCE].patient_samples, labels)
    patient_var, source, patient_df = float("nan"), "none", float("inf")
    if others:
        per_seed = {name: spreads.get(name, (0.0, 0.0))[1] / len(boot[name].seed_values) for name in boot}
        patient_var = max(0.0, float(np.mean([np.nanvar(stats.macro(boot[name].patient_samples, labels) - reference, ddof=1)
                                              - per_seed[name] - per_seed[REFERENCE] for name in others])))
        source = f"Δ of {len(others)} arm(s) vs {REFERENCE}"
        patient_df = sampling_df(boot, others, REFERENCE, labels)
    return {"seed_var": max(0.0, raw - interaction) if dof else float("nan"), "interaction_var": interaction, "seed_df": dof,
            "patient_var": patient_var, "patient_source": source, "patient_df": patient_df,
            "n_boot": len(boot[REFERENCE].patient_samples)}


def sampling_df(boot: dict[str, stats.ArmBootstrap], arms: list[str], reference: str, labels: np.ndarray) -> float:
    """The df of the patient-level variance of a Δ vs `reference` from the test patients alone (no
    resampling noise; harmonic mean over `arms`): it grows in proportion to the test patients."""
    if boot[reference].jackknife is None:
        return float("inf")
    left_out = stats.macro(boot[reference].jackknife, labels)
    dfs = [stats.patient_df(stats.macro(boot[name].jackknife, labels) - left_out, float("inf")) for name in arms]
    return float(len(dfs) / sum(1 / df for df in dfs))


def halves_patient_var(targets: np.ndarray, patients: np.ndarray, scores: np.ndarray, labels: np.ndarray, n_boot: int,
                       interaction: float) -> tuple[float, float]:
    """Ratio0-only pilot: the paired patient-level variance of (mean of its first half of seeds -
    mean of the second half), as if they were two arms, less their seeds' interaction, and its df."""
    half = len(scores) // 2
    boot = stats.hierarchical_bootstrap(targets, patients, {"a": scores[:half], "b": scores[half:2 * half]}, n_boot,
                                        seed=BOOTSTRAP_SEED)
    difference = stats.macro(boot["a"].patient_samples, labels) - stats.macro(boot["b"].patient_samples, labels)
    return max(0.0, float(np.nanvar(difference, ddof=1)) - 2 * interaction / half), sampling_df(boot, ["a"], "b", labels)


def planned_mde(components: dict[str, Any], seeds: int, patient_factor: float, level: float, arms: int = 2) -> float:
    """The MDE a study with `seeds` per arm, patient_factor times the pilot's test patients and
    `arms` arms (whose seed variance the table pools) would print, on average."""
    seed_var = components["seed_var"] if np.isfinite(components["seed_var"]) else 0.0
    spread = seed_var + components["interaction_var"] / patient_factor  # what the planned study's seeds vary by
    total = components["patient_var"] / patient_factor + 2 * spread / seeds
    # the table's patient piece: its bootstrap variance (with the interaction / S), df from the
    # patients (in proportion to them) and from the resamples
    patient = components["patient_var"] / patient_factor + 2 * components["interaction_var"] / patient_factor / seeds
    noise = 1 / (components.get("patient_df", np.inf) * patient_factor) + 1 / max(components.get("n_boot", np.inf) - 1, 1)
    patient_df = 1 / noise if noise > 0 else np.inf
    # the table's seed piece: the spread pooled over `arms` less the interaction, held at 0 or above
    interaction = components["interaction_var"] / patient_factor
    sampling = (2 / seeds) ** 2 * stats.positive_part_variance(spread, interaction, arms * (seeds - 1))
    df = stats.satterthwaite(total, [(patient, patient_df)], sampling)
    return stats.mde(float(np.sqrt(total)), df, level, estimated=False)


def plan(components: dict[str, Any], n_patients: int, seeds_now: int, compared: int, target: float,
         table_mdes: dict[str, float], pooled: bool = True) -> list[str]:
    """The page: the table's MDE now, the components, a grid over seeds x test patients, the seeds
    needed per size. `pooled`: whether the table pooled the seed variance over its arms (if not, the
    plan does not either: each Δ then rests on its two arms' seeds)."""
    level = stats.ALPHA / max(1, compared)
    arms = compared + 1 if pooled else 2
    now = ", ".join(f"{name} {value:+.3f}" for name, value in table_mdes.items()) or "none (ratio0 only)"
    lines = ["# Planning the study: seeds and test patients for a target minimum detectable effect", "",
             f"MDE now, as the table prints it (`mde_vs_{REFERENCE}`): **{now}**.", "",
             f"Variance components from the finished runs ({n_patients} test patients, {seeds_now} seed(s) per arm): "
             f"seed-level sd of one run's macro AUROC {np.sqrt(components['seed_var']):.4f} (pooled over arms, "
             f"{components['seed_df']} df); seed × patient interaction sd {np.sqrt(components['interaction_var']):.4f} per run; "
             f"patient-level sd of a Δ vs {REFERENCE} {np.sqrt(components['patient_var']):.4f} "
             f"(from {components['patient_source']}; {components.get('patient_df', np.inf):.0f} df from the test patients, "
             "the resamples add their own).", "",
             f"Expected MDE of a study with {compared + 1} arms: the true Δ vs {REFERENCE} the table calls a gain with 80% "
             f"probability at the level Holm's first step uses for {compared} arm(s) (α = {level:.4f}), "
             + (f"its seed variance pooled over the {arms} arms as the table pooled it. " if pooled else
                "its seed variance each arm's own, as in the table (Bartlett's test rejected pooling). ")
             + "Rows marked † (3 or fewer seeds) are unreliable: the seed variance rests on "
             "2 df per arm, the pooling needs every arm's seeds to agree, and one study's MDE may lie far from this figure.", "",
             "| seeds per arm | " + " | ".join(f"{n_patients * f} test patients" for f in PATIENT_FACTORS) + " |",
             "|---:|" + "---:|" * len(PATIENT_FACTORS)]
    for seeds in SEED_GRID:
        lines.append(f"| {seeds}{' †' if seeds <= 3 else ''} | "
                     + " | ".join(f"{planned_mde(components, seeds, f, level, arms):+.3f}" for f in PATIENT_FACTORS) + " |")
    lines += ["", f"Target MDE {target:+.3f} (`classifier.target_mde`):", ""]
    for factor in PATIENT_FACTORS:
        enough = next((s for s in range(2, 201) if planned_mde(components, s, factor, level, arms) <= target), None)
        lines.append(f"- {n_patients * factor} test patients: " + (f"{enough} seeds per arm" + (" (†)" if enough <= 3 else "")
                                                                  if enough else "not reachable with up to 200 seeds"))
    if not np.isfinite(components["seed_var"]):
        return lines + ["", "The seed variance is unknown (one seed per arm), so the rows cannot differ: run 2 or more seeds "
                        "of an arm to plan the number of seeds.", ""]
    return lines + ["", advice(components, max(seeds_now, 2), level, arms), ""]


def advice(components: dict[str, Any], seeds: int, level: float, arms: int) -> str:
    """Which buys more from here: two more seeds per arm, or twice the test patients."""
    now = planned_mde(components, seeds, 1, level, arms)
    more_seeds, more_patients = planned_mde(components, seeds + 2, 1, level, arms), planned_mde(components, seeds, 2, level, arms)
    choice = "more seeds" if more_seeds < more_patients else "more test patients"
    floor = planned_mde(components, seeds, 1e6, level, arms)
    return (f"From {seeds} seeds: {seeds + 2} seeds per arm give {more_seeds:+.3f}, twice the test patients {more_patients:+.3f} "
            f"(now {now:+.3f}), so {choice} buy more here. With unlimited test patients {seeds} seeds still leave "
            f"{floor:+.3f}: the seeds' own variance is a floor that only more seeds lower.")


def power(config: dict[str, Any], run_dirs: list[Path], test_csv: Path, out: Path | None) -> str:
    classes = class_names(config["dataset"]["labels"])
    if not run_dirs:
        raise ConfigError("--runs: give finished classifier run folders (e.g. results/classifier/ratio0_seed*)")
    runs = [load_run(Path(path), classes) for path in run_dirs]
    check_matched(runs)
    arms, by_arm = group_arms(runs)
    test = read_csv_checked(test_csv, ["path", "labels", "patient"], "test split", "; run prepare_dataset first")
    test, targets = align_test_split(runs, test, classes)
    patients = test["patient"].astype(str).to_numpy()
    settings = config["classifier"]
    labels = targets.sum(axis=0) >= settings["min_test_positives"]
    if not labels.any():
        raise DataError(f"{test_csv}: no label has {settings['min_test_positives']} test positives")
    n_boot = settings["bootstrap_samples"]
    reference = np.stack([r.scores for r in by_arm[REFERENCE]])
    if len(arms) == 1 and len(reference) < 2:
        raise DataError(f"only {REFERENCE} with one seed among --runs: run 2 or more seeds (or other arms) to plan")
    study = analyse(arms, by_arm, targets, patients, classes, settings["min_test_positives"], n_boot)
    components = variance_components(study.boot, study.evaluated)
    if not np.isfinite(components["patient_var"]):
        halves, halves_df = halves_patient_var(targets, patients, reference, study.evaluated, n_boot, components["interaction_var"])
        components.update(patient_var=halves, patient_df=halves_df, patient_source=f"two halves of {REFERENCE}'s seeds (a floor)")
    table_mdes = {name: d.mde for name, d in study.diffs.get(REFERENCE, {}).items()}
    compared = max(1, len([name for name in arms if name != REFERENCE]),
                   len(config["classifier"]["ratios"]) - 1 + len(config["classifier"]["controls"]))
    page = "\n".join(plan(components, len(np.unique(patients)), min(len(r) for r in by_arm.values()), compared,
                          float(settings["target_mde"]), table_mdes, study.seeds is None or study.seeds.pooled))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(page)
    return page


@run_stage
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--runs", type=Path, nargs="+", required=True, metavar="DIR", help="finished classifier run folders")
    parser.add_argument("--test", type=Path, default=Path(paths.split_csv("test")), help="the test split the runs scored")
    parser.add_argument("--out", type=Path, default=None, help="also write the page here (e.g. results/power.md)")
    args = parser.parse_args(argv)
    print(power(config_from_args(args, "plan_power"), args.runs, args.test, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
