"""Plan a study: how many training seeds and test patients reach a target minimum detectable effect.

    python -m workflow_scripts.power --config config/config.yaml \\
        --runs results/classifier/*_seed* --test results/data/test.csv --out results/power.md

Reads finished classifier runs (a pilot such as ratio0 with a few seeds, or a whole study), takes
the study's own variance components from the same two-level bootstrap as the table
(workflow_scripts.stats), and prints the minimum detectable effect (MDE) of a Δ vs ratio0 for
other numbers of seeds per arm and test patients, and the fewest seeds that reach
`classifier.target_mde` at each test-set size.

The model (docs/reading-the-table.md): Var(Δ) = V_patients · n / N + 2 σ²_seed / S for S seeds per
arm and N test patients (n: the pilot's), t with the Satterthwaite degrees of freedom of the seed
terms, tested at 0.05 / m (Holm's first level for m arms compared with ratio0), power 80 %.
V_patients: the paired patient-level bootstrap variance of the compared arms' Δ vs ratio0 (mean
over arms); in a ratio0-only pilot, that of two halves of its seeds (a floor: real arms that train
on other data differ on some patients more than seeds do). σ²_seed: the seed-level variance of one
run's macro AUROC, pooled over arms (deviations from the arm mean, less the part the patient
level already carries). More test patients shrink only the first term: when 2 σ²_seed / S alone
exceeds the target, only more seeds help.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from workflow_scripts.errors import run_stage
from workflow_scripts import stats
from workflow_scripts.classifier_model import class_names
from workflow_scripts.comparison import align_test_split, check_matched, group_arms, load_run
from workflow_scripts.config import ConfigError, add_config_arguments, config_from_args
from workflow_scripts.labels import DataError, read_csv_checked
from workflow_scripts.study import REFERENCE

SEED_GRID = (2, 3, 5, 8, 10, 15, 20, 30)
PATIENT_FACTORS = (1, 2, 4, 10)
BOOTSTRAP_SEED = 0


def variance_components(boot: dict[str, stats.ArmBootstrap], labels: np.ndarray) -> dict[str, Any]:
    """Seed variance of one run (pooled over arms with 2+ seeds) and the patient-level variance of a Δ vs ratio0."""
    pooled, dof = 0.0, 0
    for result in boot.values():
        if result.seed_terms is not None and len(result.seed_values) > 1:
            spread = stats.macro(result.seed_terms, labels)
            pooled += float(np.var(spread, ddof=1)) * (len(spread) - 1)
            dof += len(spread) - 1
    others = [name for name in boot if name != REFERENCE]
    reference = stats.macro(boot[REFERENCE].patient_samples, labels)
    if others:
        patient_var = float(np.mean([np.nanvar(stats.macro(boot[name].patient_samples, labels) - reference, ddof=1)
                                     for name in others]))
        source = f"Δ of {len(others)} arm(s) vs {REFERENCE}"
    else:
        patient_var = float("nan")
        source = "none"
    return {"seed_var": pooled / dof if dof else float("nan"), "seed_df": dof, "patient_var": patient_var,
            "patient_source": source}


def halves_patient_var(targets: np.ndarray, patients: np.ndarray, scores: np.ndarray, labels: np.ndarray, n_boot: int) -> float:
    """Ratio0-only pilot: the paired patient-level variance of (mean of its first half of seeds -
    mean of the second half), as if they were two arms."""
    half = len(scores) // 2
    boot = stats.hierarchical_bootstrap(targets, patients, {"a": scores[:half], "b": scores[half:2 * half]}, n_boot,
                                        seed=BOOTSTRAP_SEED)
    difference = stats.macro(boot["a"].patient_samples, labels) - stats.macro(boot["b"].patient_samples, labels)
    return float(np.nanvar(difference, ddof=1))


def planned_mde(components: dict[str, Any], seeds: int, patient_factor: float, level: float) -> float:
    """MDE of a Δ vs ratio0 with `seeds` per arm and patient_factor times the pilot's test patients."""
    seed_part = components["seed_var"] / seeds if np.isfinite(components["seed_var"]) else 0.0
    patient_part = components["patient_var"] / patient_factor
    df = stats.satterthwaite(patient_part, [(seed_part, seeds - 1), (seed_part, seeds - 1)])
    return stats.mde(float(np.sqrt(patient_part + 2 * seed_part)), df, level)


def plan(components: dict[str, Any], n_patients: int, seeds_now: int, compared: int, target: float) -> list[str]:
    """The page: components, the MDE now, a grid over seeds x test patients, the seeds needed per size."""
    level = stats.ALPHA / max(1, compared)
    lines = ["# Planning the study: seeds and test patients for a target minimum detectable effect", "",
             f"Variance components from the finished runs ({n_patients} test patients, {seeds_now} seed(s) per arm): "
             f"seed-level sd of one run's macro AUROC {np.sqrt(components['seed_var']):.4f} "
             f"(pooled over arms, {components['seed_df']} df); patient-level sd of a Δ vs {REFERENCE} "
             f"{np.sqrt(components['patient_var']):.4f} (from {components['patient_source']}).", "",
             f"MDE: the true Δ vs {REFERENCE} called a gain with 80% probability at the level Holm's first step uses "
             f"for {compared} arm(s) compared with {REFERENCE} (α = {level:.4f}).", "",
             f"MDE now: **{planned_mde(components, max(seeds_now, 2), 1, level):+.3f}**" +
             ("" if seeds_now > 1 else " (one seed: its seed variance is unknown; the figure assumes none)"), "",
             "| seeds per arm | " + " | ".join(f"{n_patients * f} test patients" for f in PATIENT_FACTORS) + " |",
             "|---:|" + "---:|" * len(PATIENT_FACTORS)]
    for seeds in SEED_GRID:
        lines.append(f"| {seeds} | " + " | ".join(f"{planned_mde(components, seeds, f, level):+.3f}" for f in PATIENT_FACTORS) + " |")
    lines += ["", f"Target MDE {target:+.3f} (`classifier.target_mde`):", ""]
    for factor in PATIENT_FACTORS:
        enough = next((s for s in range(2, 201) if planned_mde(components, s, factor, level) <= target), None)
        lines.append(f"- {n_patients * factor} test patients: " + (f"{enough} seeds per arm" if enough else
                                                                  "not reachable with up to 200 seeds (more test patients)"))
    if not np.isfinite(components["seed_var"]):
        return lines + ["", "The seed variance is unknown (one seed per arm), so the rows cannot differ: run 2 or more seeds "
                        "of an arm to plan the number of seeds.", ""]
    lines += ["", f"With unlimited test patients the seeds alone set the MDE (e.g. 5 seeds: "
              f"{planned_mde(components, 5, 1e6, level):+.3f}); more test patients cannot go below it. With 2-3 "
              "seeds the MDE may even rise with more test patients: the t quantile uses the Welch-Satterthwaite "
              "df of the seed and patient terms, which falls to the seeds' few df as the patient term shrinks.", ""]
    return lines


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
    boot = stats.hierarchical_bootstrap(targets, patients, {name: np.stack([r.scores for r in by_arm[name]]) for name in arms},
                                        n_boot, seed=BOOTSTRAP_SEED)
    components = variance_components(boot, labels)
    if not np.isfinite(components["patient_var"]):
        reference = np.stack([r.scores for r in by_arm[REFERENCE]])
        if len(reference) < 2:
            raise DataError(f"only {REFERENCE} with one seed among --runs: run 2 or more seeds (or other arms) to plan")
        components.update(patient_var=halves_patient_var(targets, patients, reference, labels, n_boot),
                          patient_source=f"two halves of {REFERENCE}'s seeds (a floor)")
    compared = max(1, len([name for name in arms if name != REFERENCE]),
                   len(config["classifier"]["ratios"]) - 1 + len(config["classifier"]["controls"]))
    page = "\n".join(plan(components, len(np.unique(patients)), min(len(r) for r in by_arm.values()), compared,
                          float(settings["target_mde"])))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(page)
    return page


@run_stage
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--runs", type=Path, nargs="+", required=True, metavar="DIR", help="finished classifier run folders")
    parser.add_argument("--test", type=Path, default=Path("results/data/test.csv"), help="the test split the runs scored")
    parser.add_argument("--out", type=Path, default=None, help="also write the page here (e.g. results/power.md)")
    args = parser.parse_args(argv)
    print(power(config_from_args(args, "plan_power"), args.runs, args.test, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
