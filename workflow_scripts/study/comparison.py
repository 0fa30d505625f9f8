"""What `compare` (the stage) computes and `compare_report` renders: the runs, arms and figures of one study,
how runs are read and checked, and the analysis itself (`analyse`), shared with the power planner so
that plan_power prints the table's own MDE."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from workflow_scripts.study import stats
from workflow_scripts.study.arms import REFERENCE, SYNTHETIC, Arm, kind_of, references, table_order
from workflow_scripts.common.errors import DataError
from workflow_scripts.common.tables import LABEL_JOIN, PROB_PREFIX

AGE_BANDS = ((0, 40, "<40"), (40, 60, "40-59"), (60, 200, ">=60"))
REQUIRED_METRICS = ("arm", "arm_kind", "ratio", "seed", "optimizer_steps", "config_hash", "pretrained_weights", "classes",
                    "n_real_train", "n_synthetic_train")
MATCHED = ("pretrained_weights", "config_hash", "optimizer_steps")  # must be equal across all runs of a study
BOOTSTRAP_SEED = 0


@dataclass
class Run:
    path: Path
    metrics: dict[str, Any]
    images: list[str]
    scores: np.ndarray  # (images, classes), rows in the order of `images`
    composition: pd.DataFrame


def run_counts(runs: list[Run], key: str) -> int | str:
    """One figure for an arm's runs; "a-b" if its seeds differ (they should not)."""
    values = sorted({int(run.metrics[key]) for run in runs})
    return values[0] if len(values) == 1 else f"{values[0]}-{values[-1]}"


@dataclass(frozen=True)
class Headline:
    """"Does a synthetic arm gain over ratio0 AND every baseline control that ran (arms.BASELINES)?"
    for each synthetic arm: the intersection-union p (largest of its one-sided p against a gain), Holm over the synthetic arms,
    one verdict for the table as a whole at 5 %."""

    references: tuple[str, ...]
    p: dict[str, float]  # arm -> intersection-union p
    p_holm: dict[str, float]
    all_positive: dict[str, bool]
    gains: tuple[str, ...]


@dataclass
class Study:
    arms: dict[str, Arm]
    runs: dict[str, list[Run]]  # arm name -> its runs, one per seed, by seed
    classes: list[str]
    positives: np.ndarray  # test positives per class
    evaluated: np.ndarray  # bool per class: trained on, and enough test positives to be shown and averaged
    boot: dict[str, stats.ArmBootstrap]
    diffs: dict[str, dict[str, stats.Difference]]  # reference arm -> arm -> difference
    n_images: int
    n_patients: int
    untrained: tuple[str, ...] = ()  # labels without training images (dataset.allow_absent_labels): never shown
    headline: Headline | None = None
    seeds: stats.SeedModel | None = None  # the seed level behind every Δ: pooled over arms, or each arm's own


# ----------------------------------------------------------------------------- reading runs


def rerun_hint(run_dir: Path) -> str:
    return (f"the run is damaged (cut short or overwritten): delete {run_dir} and run Snakemake again, which "
            "trains this arm and seed again")


def read_run_table(path: Path, run_dir: Path, **read_csv: Any) -> pd.DataFrame:
    """A CSV of a run folder; unreadable (cut short, not text) is a DataError naming it and what to re-run."""
    try:
        return pd.read_csv(path, **read_csv)
    except (ValueError, UnicodeDecodeError) as error:  # pandas' ParserError and EmptyDataError are ValueErrors
        raise DataError(f"{path}: not a readable table ({str(error).splitlines()[0][:200]}); {rerun_hint(run_dir)}") from None


def probabilities(predictions: pd.DataFrame, columns: list[str], path: Path, run_dir: Path) -> np.ndarray:
    """The probability columns as floats; a cell that is not a finite number (a row cut short) is a
    DataError naming its line of the file."""
    values = predictions[columns].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    bad = ~np.isfinite(values)
    if bad.any():
        row, column = np.argwhere(bad)[0]
        raise DataError(f"{path}, line {row + 2}: {columns[column]} is {predictions[columns[column]].iloc[row]!r}, "
                        f"not a number; {rerun_hint(run_dir)}")
    return values


def load_run(run_dir: Path, classes: list[str]) -> Run:
    """One run folder, checked: the metrics keys the table needs, a probability column per class."""
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        raise DataError(f"{metrics_path}: not found; is {run_dir} a classifier run folder?")
    try:
        metrics = json.loads(metrics_path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise DataError(f"{metrics_path}: not valid JSON ({error}); {rerun_hint(run_dir)}") from None
    if not isinstance(metrics, dict):
        raise DataError(f"{metrics_path}: not a JSON object; {rerun_hint(run_dir)}")
    missing = [key for key in REQUIRED_METRICS if key not in metrics]
    if missing:
        raise DataError(f"{metrics_path}: missing {', '.join(missing)}; re-run the classifier with this version")
    try:
        kind_of(metrics["arm_kind"])
    except DataError as error:
        raise DataError(f"{metrics_path}: {error}") from None
    if list(metrics["classes"]) != classes:
        raise DataError(f"{metrics_path}: classes {metrics['classes']} differ from dataset.labels without 'No Finding' {classes}")
    predictions_path = run_dir / "predictions.csv"
    if not predictions_path.is_file():
        raise DataError(f"{predictions_path}: not found")
    predictions = read_run_table(predictions_path, run_dir, dtype={"path": str, "labels": str}, keep_default_na=False)
    columns = [PROB_PREFIX + label for label in classes]
    absent = [c for c in ["path", *columns] if c not in predictions.columns]
    if absent:
        raise DataError(f"{predictions_path}: missing columns {', '.join(absent)}")
    predictions = predictions.sort_values("path", kind="stable")
    composition_path = run_dir / "composition.csv"
    if not composition_path.is_file():
        raise DataError(f"{composition_path}: not found (label composition of the run's training set)")
    composition = read_run_table(composition_path, run_dir)
    if "n_test" in metrics and len(predictions) != metrics["n_test"]:
        raise DataError(f"{predictions_path}: {len(predictions)} rows, but {metrics_path} records {metrics['n_test']} "
                        f"test images; {rerun_hint(run_dir)}")
    return Run(run_dir, metrics, predictions["path"].tolist(), probabilities(predictions, columns, predictions_path, run_dir),
               composition)


def check_matched(runs: list[Run]) -> None:
    """Refuse a study whose runs started from different weights, configs or step budgets."""
    problems = []
    for key in MATCHED:
        groups: dict[str, list[str]] = {}
        for run in runs:
            groups.setdefault(json.dumps(run.metrics[key]), []).append(str(run.path))
        if len(groups) > 1:
            problems.append(f"{key} differs: " + "; ".join(f"{value} in {', '.join(paths)}" for value, paths in groups.items()))
    if problems:
        raise DataError("these runs are not one study (an arm's Δ would mix in other differences); re-run them with one "
                        "configuration:\n  " + "\n  ".join(problems))


def group_arms(runs: list[Run]) -> tuple[dict[str, Arm], dict[str, list[Run]]]:
    """Arms in table order (study.table_order) and their runs, one per seed, by seed."""
    arms: dict[str, Arm] = {}
    grouped: dict[str, list[Run]] = {}
    for run in runs:
        m = run.metrics
        ratio = int(m["ratio"] or 0)
        arm = arms.setdefault(m["arm"], Arm(m["arm"], kind_of(m["arm_kind"]), ratio, int(m.get("draw_ratio") or ratio)))
        first = grouped.setdefault(arm.name, [])
        if (arm.kind.value, arm.ratio) != (m["arm_kind"], ratio):
            raise DataError(f"{run.path}: arm {arm.name} is {m['arm_kind']} at {m['ratio']}% here but {arm.kind} at {arm.ratio}% "
                            f"in {first[0].path}")
        if any(other.metrics["seed"] == m["seed"] for other in first):
            raise DataError(f"{run.path}: arm {arm.name} seed {m['seed']} given twice")
        first.append(run)
    if REFERENCE not in arms:
        raise DataError(f"no run of the real-only arm {REFERENCE} among --runs; every arm is compared with it")
    order = sorted(arms, key=lambda name: table_order(arms[name]))
    return {name: arms[name] for name in order}, {name: sorted(grouped[name], key=lambda run: run.metrics["seed"]) for name in order}


def align_test_split(runs: list[Run], test: pd.DataFrame, classes: list[str]) -> tuple[pd.DataFrame, np.ndarray]:
    """The test rows in the runs' (sorted) order and their 0/1 targets; every run must have scored
    exactly the images of the test split."""
    expected = sorted(test["path"])
    for run in runs:
        if run.images != expected:
            extra = sorted(set(run.images) - set(expected))[:3]
            lacking = sorted(set(expected) - set(run.images))[:3]
            raise DataError(f"{run.path / 'predictions.csv'}: its images are not those of the test split (not in it: {extra}; "
                            f"not scored: {lacking}); re-run the classifier on the current split")
    test = test.set_index("path").loc[expected].reset_index()
    targets = np.array([[label in labels.split(LABEL_JOIN) for label in classes] for labels in test["labels"]], dtype=float)
    return test, targets


# ----------------------------------------------------------------------------- the analysis (compare's and plan_power's)


def scores_of(runs: list[Run], keep: np.ndarray | None = None) -> np.ndarray:
    scores = np.stack([run.scores for run in runs])
    return scores if keep is None else scores[:, keep]


def headline(arms: dict[str, Arm], diffs: dict[str, dict[str, stats.Difference]]) -> Headline | None:
    """The table's one question, "does a synthetic arm gain over ratio0 AND the baseline controls
    (arms.BASELINES: noise, rebalanced)?",
    answered at 5 % for the table as a whole: per synthetic arm an intersection-union test over the
    references present (the largest of its one-sided p against a gain; no correction within an
    arm), Holm over the synthetic arms' one-sided p (a significant loss is no rejection here)."""
    synthetic = [name for name, arm in arms.items() if arm.kind is SYNTHETIC]
    present = tuple(ref for ref in references() if ref in diffs)
    if not synthetic:
        return None
    tests = {name: stats.intersection_union([diffs[ref][name] for ref in present]) for name in synthetic}
    adjusted = dict(zip(synthetic, stats.holm([p for p, _ in tests.values()])))
    gains = tuple(name for name in synthetic if tests[name][1] and adjusted[name] < stats.ALPHA)
    return Headline(present, {name: test[0] for name, test in tests.items()}, adjusted,
                    {name: test[1] for name, test in tests.items()}, gains)


def families(boot: dict[str, stats.ArmBootstrap], arms: dict[str, Arm], labels: np.ndarray | None = None,
             seeds: stats.SeedModel | None = None) -> dict[str, dict[str, stats.Difference]]:
    """Each reference arm present (ratio0, noise, rebalanced) with the arms compared with it: one Holm
    family each. `seeds`: the table's seed level (default: pooled over the arms where homogeneous)."""
    seeds = seeds or stats.seed_model(boot, labels)
    diffs = {}
    for reference in references():
        compared = [name for name, arm in arms.items() if reference in arm.compared_with and name != reference]
        if reference in arms and compared:
            diffs[reference] = stats.differences(boot, reference, compared, labels, seeds=seeds)
    return diffs


def analyse(arms: dict[str, Arm], runs: dict[str, list[Run]], targets: np.ndarray, patients: np.ndarray, classes: list[str],
            min_positives: int, n_boot: int, untrained: tuple[str, ...] = ()) -> Study:
    positives = targets.sum(axis=0).astype(int)
    evaluated = (positives >= min_positives) & ~np.isin(classes, list(untrained))
    if not evaluated.any():
        raise DataError(f"no label has {min_positives} or more positives in the test split (counts: "
                        f"{dict(zip(classes, positives.tolist()))}); lower classifier.min_test_positives or use more data")
    boot = stats.hierarchical_bootstrap(targets, patients, {name: scores_of(runs[name]) for name in arms}, n_boot,
                                        seed=BOOTSTRAP_SEED)
    seeds = stats.seed_model(boot, evaluated)
    diffs = families(boot, arms, evaluated, seeds)
    return Study(arms, runs, classes, positives, evaluated, boot, diffs, len(targets), len(np.unique(patients)),
                 tuple(untrained), headline(arms, diffs), seeds)
