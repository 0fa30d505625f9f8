"""The final comparison: do synthetic X-rays help a classifier, beyond what noise or rebalancing give?

    python -m workflow_scripts.compare --config config/config.yaml \\
        --runs results/classifier/*_seed* --out-dir results

Reads the classifier runs given with `--runs` (each a folder with metrics.json, predictions.csv and
composition.csv), refuses to mix runs whose starting weights, config hash or optimizer steps
differ, and writes one row per arm (ratio arms, then controls): macro AUROC with its 95% interval,
the difference from the real-only arm `ratio0` (and, for synthetic arms, from the noise and
rebalanced controls) with interval, Holm-adjusted p and a verdict in words, per-label AUROC where
the test split has enough positives, each arm's label composition, subgroups by sex and age where
the test split records them, and fidelity and audit once. Intervals: workflow_scripts.stats (a
paired bootstrap over test patients and training seeds). Outputs: comparison.csv, comparison.md,
plots/auroc_vs_ratio.png, plots/real_vs_synthetic.png under --out-dir.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from workflow_scripts.errors import ConfigError, run_stage
from workflow_scripts import stats
from workflow_scripts.config import add_config_arguments, config_from_args, config_hash
from workflow_scripts import compare_report as report
from workflow_scripts.classifier_model import class_names
from workflow_scripts.comparison import AGE_BANDS, CONTROL_REFERENCES, REFERENCE, Arm, Run, Study
from workflow_scripts.labels import DataError
from workflow_scripts.tables import LABEL_JOIN, Splits, add_split_arguments, label_counts, load_split, splits_from_args

KIND_ORDER = ("real", "synthetic", "control_rebalanced", "control_noise", "control_pretrain")
REQUIRED_METRICS = ("arm", "arm_kind", "ratio", "seed", "optimizer_steps", "config_hash", "pretrained_weights", "classes",
                    "n_real_train", "n_synthetic_train")
MATCHED = ("pretrained_weights", "config_hash", "optimizer_steps")  # must be equal across all runs of a study
BOOTSTRAP_SEED = 0


# ----------------------------------------------------------------------------- reading


def load_run(run_dir: Path, classes: list[str]) -> Run:
    """One run folder, checked: the metrics keys the table needs, a probability column per class."""
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        raise DataError(f"{metrics_path}: not found; is {run_dir} a classifier run folder?")
    metrics = json.loads(metrics_path.read_text())
    missing = [key for key in REQUIRED_METRICS if key not in metrics]
    if missing:
        raise DataError(f"{metrics_path}: missing {', '.join(missing)}; re-run the classifier with this version")
    if metrics["arm_kind"] not in KIND_ORDER:
        raise DataError(f"{metrics_path}: arm_kind {metrics['arm_kind']!r} is not one of {', '.join(KIND_ORDER)}")
    if list(metrics["classes"]) != classes:
        raise DataError(f"{metrics_path}: classes {metrics['classes']} differ from dataset.labels without 'No Finding' {classes}")
    predictions_path = run_dir / "predictions.csv"
    if not predictions_path.is_file():
        raise DataError(f"{predictions_path}: not found")
    predictions = pd.read_csv(predictions_path, dtype={"path": str, "labels": str}, keep_default_na=False)
    columns = [f"prob_{label}" for label in classes]
    absent = [c for c in ["path", *columns] if c not in predictions.columns]
    if absent:
        raise DataError(f"{predictions_path}: missing columns {', '.join(absent)}")
    predictions = predictions.sort_values("path", kind="stable")
    composition_path = run_dir / "composition.csv"
    if not composition_path.is_file():
        raise DataError(f"{composition_path}: not found (label composition of the run's training set)")
    composition = pd.read_csv(composition_path)
    return Run(run_dir, metrics, predictions["path"].tolist(), predictions[columns].to_numpy(dtype=float), composition)


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


def group_arms(runs: list[Run]) -> dict[str, Arm]:
    """Runs by arm, in table order (real, ratio arms by share, then the controls); one run per seed."""
    arms: dict[str, Arm] = {}
    for run in runs:
        m = run.metrics
        arm = arms.setdefault(m["arm"], Arm(m["arm"], m["arm_kind"], int(m["ratio"] or 0)))
        if (arm.kind, arm.ratio) != (m["arm_kind"], int(m["ratio"] or 0)):
            raise DataError(f"{run.path}: arm {arm.name} is {m['arm_kind']} at {m['ratio']}% here but {arm.kind} at {arm.ratio}% "
                            f"in {arm.runs[0].path}")
        if any(other.metrics["seed"] == m["seed"] for other in arm.runs):
            raise DataError(f"{run.path}: arm {arm.name} seed {m['seed']} given twice")
        arm.runs.append(run)
    if REFERENCE not in arms:
        raise DataError(f"no run of the real-only arm {REFERENCE} among --runs; every arm is compared with it")
    for arm in arms.values():
        arm.runs.sort(key=lambda run: run.metrics["seed"])
    return dict(sorted(arms.items(), key=lambda item: (KIND_ORDER.index(item[1].kind), item[1].ratio, item[0])))


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


def untrained_labels(summary_path: Path | None) -> tuple[str, ...]:
    """Labels the data stage let through without any training image (dataset.allow_absent_labels):
    no classifier learned them, so the table shows no AUROC for them and leaves them out of the macro."""
    return tuple(json.loads(summary_path.read_text()).get("labels_absent", [])) if summary_path and summary_path.is_file() else ()


def training_counts(data_dir: Splits, summary_path: Path | None, classes: list[str]) -> tuple[dict[str, int], str]:
    """Real training images per label before balancing (from prepare_summary.json), and where from."""
    if summary_path and summary_path.is_file():
        before = json.loads(summary_path.read_text()).get("label_counts_before_balance", {}).get("train")
        if before is not None:
            return {label: int(before.get(label, 0)) for label in classes}, "before balancing"
    counts = label_counts(load_split(data_dir, "train"))
    return {label: counts.get(label, 0) for label in classes}, "after balancing (prepare_summary.json has no pre-balance counts)"


def rare_labels(counts: dict[str, int], classes: list[str]) -> list[str]:
    """The third of the classes with the fewest real training images; a label tied with the last
    of them is rare too (ties are never broken by name)."""
    ordered = sorted(counts[label] for label in classes)
    threshold = ordered[max(1, math.ceil(len(classes) / 3)) - 1]
    return [label for label in classes if counts[label] <= threshold]


# ----------------------------------------------------------------------------- analysis


def scores_of(arm: Arm, keep: np.ndarray | None = None) -> np.ndarray:
    scores = np.stack([run.scores for run in arm.runs])
    return scores if keep is None else scores[:, keep]


def analyse(arms: dict[str, Arm], targets: np.ndarray, patients: np.ndarray, classes: list[str], min_positives: int,
            n_boot: int, untrained: tuple[str, ...] = ()) -> Study:
    positives = targets.sum(axis=0).astype(int)
    evaluated = (positives >= min_positives) & ~np.isin(classes, list(untrained))
    if not evaluated.any():
        raise DataError(f"no label has {min_positives} or more positives in the test split (counts: "
                        f"{dict(zip(classes, positives.tolist()))}); lower classifier.min_test_positives or use more data")
    boot = stats.hierarchical_bootstrap(targets, patients, {name: scores_of(arm) for name, arm in arms.items()}, n_boot,
                                        seed=BOOTSTRAP_SEED)
    references = {"ratio0": REFERENCE}
    diffs = {"ratio0": stats.differences(boot, REFERENCE, [name for name in arms if name != REFERENCE], evaluated)}
    synthetic = [name for name, arm in arms.items() if arm.kind in ("synthetic", "control_pretrain")]
    for column, kind in CONTROL_REFERENCES.items():
        control = next((name for name, arm in arms.items() if arm.kind == kind), None)
        if control is not None and synthetic:
            references[column] = control
            diffs[column] = stats.differences(boot, control, synthetic, evaluated)
    return Study(arms, classes, positives, evaluated, boot, diffs, references, len(targets), len(np.unique(patients)),
                 tuple(untrained))


def comparison_table(study: Study) -> pd.DataFrame:
    rows = []
    for name, arm in study.arms.items():
        result = study.boot[name]
        seed_macros = stats.macro(result.seed_values, study.evaluated)
        low, high = stats.interval(stats.macro(result.samples, study.evaluated))
        row: dict[str, Any] = {
            "arm": name, "arm_kind": arm.kind, "ratio": arm.ratio, "seeds": len(arm.runs),
            "n_real_train": arm.counts("n_real_train"), "n_synthetic_train": arm.counts("n_synthetic_train"),
            "optimizer_steps": arm.runs[0].metrics["optimizer_steps"],
            "test_images": study.n_images, "test_patients": study.n_patients,
            "macro_auroc_mean": float(np.mean(seed_macros)),
            "macro_auroc_sd": float(np.std(seed_macros, ddof=1)) if len(seed_macros) > 1 else float("nan"),
            "macro_auroc_ci_low": low, "macro_auroc_ci_high": high,
        }
        for column, diffs in [("ratio0", study.diffs["ratio0"]), *[(c, study.diffs[c]) for c in CONTROL_REFERENCES if c in study.diffs]]:
            d = diffs.get(name)
            row.update({f"delta_vs_{column}": d.delta if d else float("nan"),
                        f"delta_vs_{column}_ci_low": d.low if d else float("nan"),
                        f"delta_vs_{column}_ci_high": d.high if d else float("nan"),
                        f"p_vs_{column}": d.p if d else float("nan"), f"p_holm_vs_{column}": d.p_holm if d else float("nan"),
                        f"verdict_vs_{column}": d.verdict if d else ""})
        for k, label in enumerate(study.classes):
            shown = bool(study.evaluated[k])
            label_low, label_high = stats.interval(result.samples[:, k]) if shown else (float("nan"), float("nan"))
            row.update({f"auroc_{label}": float(result.estimate[k]) if shown else float("nan"),
                        f"auroc_{label}_ci_low": label_low, f"auroc_{label}_ci_high": label_high,
                        f"test_positives_{label}": int(study.positives[k])})
        rows.append(row)
    return pd.DataFrame(rows)


def composition_table(arms: dict[str, Arm], classes: list[str]) -> pd.DataFrame:
    """Real, synthetic and effective (after the rebalanced control's oversampling) training positives
    per label and arm ("a-b" where seeds differ)."""
    rows = []
    for name, arm in arms.items():
        for label in classes:
            row: dict[str, Any] = {"arm": name, "label": label}
            for column in ("real_positives", "synthetic_positives", "effective_positives"):
                values = set()
                for run in arm.runs:
                    match = run.composition.loc[run.composition["label"] == label, column] if column in run.composition else []
                    if len(match) != 1:
                        raise DataError(f"{run.path / 'composition.csv'}: no single row with label {label!r} and column {column!r}")
                    values.add(int(match.iloc[0]))
                row[column] = min(values) if len(values) == 1 else f"{min(values)}-{max(values)}"
            rows.append(row)
    return pd.DataFrame(rows)


def subgroups(test: pd.DataFrame) -> list[tuple[str, str, np.ndarray]]:
    """(variable, group, mask) for sex (M/F) and age bands, where the test split has those columns."""
    groups = []
    if "sex" in test.columns:
        sex = test["sex"].astype(str).str.strip().str.upper()
        groups += [("sex", value, (sex == value).to_numpy()) for value in ("F", "M")]
    if "age" in test.columns:
        age = pd.to_numeric(test["age"], errors="coerce").to_numpy()
        groups += [("age", name, (age >= low) & (age < high)) for low, high, name in AGE_BANDS]
    return groups


def subgroup_table(study: Study, test: pd.DataFrame, targets: np.ndarray, patients: np.ndarray, min_positives: int,
                   n_boot: int) -> tuple[pd.DataFrame, str | None]:
    """Macro AUROC of ratio0 and the best synthetic arm within each sex and age band (descriptive:
    intervals from the same bootstrap restricted to the group, no multiplicity correction)."""
    groups = subgroups(test)
    others = [name for name, arm in study.arms.items() if arm.kind == "synthetic"] or [n for n in study.arms if n != REFERENCE]
    if not groups or not others:
        return pd.DataFrame(), None
    best = max(others, key=lambda name: float(stats.macro(study.boot[name].estimate, study.evaluated)))
    rows = []
    for variable, group, mask in groups:
        positives = targets[mask].sum(axis=0)
        labels = study.evaluated & (positives >= min_positives)
        row: dict[str, Any] = {"variable": variable, "group": group, "test_images": int(mask.sum()),
                               "test_patients": int(len(np.unique(patients[mask]))), "labels_averaged": int(labels.sum())}
        if labels.any():
            arms = {name: scores_of(study.arms[name], mask) for name in (REFERENCE, best)}
            boot = stats.hierarchical_bootstrap(targets[mask], patients[mask], arms, n_boot, seed=BOOTSTRAP_SEED)
            for name, prefix in ((REFERENCE, "ratio0"), (best, "best")):
                row[f"{prefix}_auroc"] = float(stats.macro(boot[name].estimate, labels))
                row[f"{prefix}_ci_low"], row[f"{prefix}_ci_high"] = stats.interval(stats.macro(boot[name].samples, labels))
            d = stats.differences(boot, REFERENCE, [best], labels)[best]
            row.update({"delta": d.delta, "delta_ci_low": d.low, "delta_ci_high": d.high})
        rows.append(row)
    return pd.DataFrame(rows), best


# ----------------------------------------------------------------------------- the stage


def compare(config: dict[str, Any], run_dirs: list[Path], fidelity_page: Path, lora_summary: Path, data_dir: Splits,
            prepare_summary: Path | None, synthetic_csv: Path, out_dir: Path) -> pd.DataFrame:
    classes = class_names(config["dataset"]["labels"])
    settings = config["classifier"]
    if not run_dirs:
        raise ConfigError("--runs: give the classifier run folders to compare (e.g. results/classifier/*_seed*)")
    runs = [load_run(Path(path), classes) for path in run_dirs]
    check_matched(runs)
    arms = group_arms(runs)
    test, targets = align_test_split(runs, load_split(data_dir, "test"), classes)
    patients = test["patient"].astype(str).to_numpy()
    min_positives, n_boot = settings["min_test_positives"], settings["bootstrap_samples"]
    study = analyse(arms, targets, patients, classes, min_positives, n_boot, untrained_labels(prepare_summary))
    table = comparison_table(study)
    counts, counted = training_counts(data_dir, prepare_summary, classes)
    rare = rare_labels(counts, classes)
    groups, best = subgroup_table(study, test, targets, patients, min_positives, n_boot)

    provenance = {
        "config_hash": config_hash(config),
        "runs_config_hash": runs[0].metrics["config_hash"],
        "optimizer_steps": runs[0].metrics["optimizer_steps"],
        "runs": [str(run.path) for run in runs],
        "bootstrap": {"resamples": n_boot, "seed": BOOTSTRAP_SEED, "level": stats.LEVEL},
        "classifier": {"model": settings["model"], "min_test_positives": min_positives},
        "split_seed": config["split"]["seed"], "generation_seed": config["generation"]["seed"],
        "lora_summary": str(lora_summary),
        "classifier_versions": runs[0].metrics.get("versions"),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / "comparison.csv", index=False)
    page = report.render_page(report.PageInputs(
        config=config, study=study, table=table, rare=rare, counts=counts, counted=counted,
        composition=composition_table(arms, classes), subgroups=groups, best=best, fidelity_page=fidelity_page,
        lora_summary=lora_summary, provenance=provenance))
    (out_dir / "comparison.md").write_text(page)
    synthetic = pd.read_csv(synthetic_csv, dtype={"labels": str}) if synthetic_csv.is_file() else None
    report.make_plots(table, classes, rare, load_split(data_dir, "train"), synthetic, out_dir / "plots")
    return table


@run_stage
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--runs", type=Path, nargs="+", required=True, metavar="DIR",
                        help="classifier run folders (metrics.json, predictions.csv, composition.csv), all arms and seeds")
    parser.add_argument("--fidelity", type=Path, default=Path("results/evaluation/fidelity.md"),
                        help="the fidelity stage's page, included in the table's page")
    parser.add_argument("--lora-summary", type=Path, default=Path("results/lora/final/training_summary.json"))
    add_split_arguments(parser, ["train", "test"])
    parser.add_argument("--prepare-summary", type=Path, default=Path("results/data/prepare_summary.json"),
                        help="the data stage's summary (pre-balance label counts, labels without training images)")
    parser.add_argument("--synthetic", type=Path, default=Path("results/synthetic/generation_results.csv"))
    parser.add_argument("--out-dir", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    table = compare(config_from_args(args, "compare"), args.runs, args.fidelity, args.lora_summary,
                    splits_from_args(args, ["train", "test"]), args.prepare_summary, args.synthetic, args.out_dir)
    shown = ["arm", "seeds", "macro_auroc_mean", "delta_vs_ratio0", "p_holm_vs_ratio0", "verdict_vs_ratio0"]
    print(textwrap.indent(table[shown].to_string(index=False), "  "))
    print(f"table: {args.out_dir / 'comparison.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
