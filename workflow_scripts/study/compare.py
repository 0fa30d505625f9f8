"""The final comparison: do synthetic X-rays help a classifier, beyond what noise or rebalancing give?

    python -m workflow_scripts.study.compare --config config/config.yaml \\
        --runs results/classifier/*_seed* --out-dir results

Reads the classifier runs given with `--runs` (each a folder with metrics.json, predictions.csv and
composition.csv), refuses to mix runs whose starting weights, config hash or optimizer steps
differ, and writes one row per arm (ratio arms, then controls): macro AUROC with its 95% interval,
the difference from the real-only arm `ratio0` (and, for synthetic arms, from the noise and
rebalanced controls) with interval, Holm-adjusted p and a verdict in words, per-label AUROC where
the test split has enough positives, each arm's label composition, subgroups by sex and age where
the test split records them, and fidelity and audit once. Intervals: workflow_scripts.study.stats (a
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

from workflow_scripts.common import paths
from workflow_scripts.common.errors import ConfigError, DataError, run_stage
from workflow_scripts.study import stats
from workflow_scripts.common.config import add_config_arguments, config_from_args
from workflow_scripts.study import compare_report as report
from workflow_scripts.classifier.classifier_model import class_names
from workflow_scripts.study.comparison import (AGE_BANDS, BOOTSTRAP_SEED, Run, Study, align_test_split, analyse,
                                               check_matched, group_arms, load_run, run_counts, scores_of)
from workflow_scripts.study.arms import MORE_REAL, REFERENCE, SYNTHETIC, Arm
from workflow_scripts.common.tables import Splits, add_split_arguments, label_counts, load_split, splits_from_args

# ----------------------------------------------------------------------------- reading


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


def more_real_share(study: Study, name: str) -> tuple[float, float, float]:
    """Δ vs ratio0 of a synthetic arm as a fraction of the more_real control's Δ, with Fieller's 95 %
    interval; NaN unless more_real reads *gain* (without a ceiling the study could see, the ratio of
    two noisy Δs says nothing). Both Δs share ratio0: its seed variance and the paired patient
    covariance enter the interval."""
    nan = (float("nan"),) * 3
    ceiling = next((arm for arm, spec in study.arms.items() if spec.kind is MORE_REAL), None)
    if ceiling is None or study.arms[name].kind is not SYNTHETIC or REFERENCE not in study.diffs:
        return nan
    top, bottom = study.diffs[REFERENCE][name], study.diffs[REFERENCE][ceiling]
    if bottom.verdict != stats.GAIN:
        return nan
    boot, labels = study.boot, study.evaluated
    reference = stats.macro(boot[REFERENCE].patient_samples, labels)
    pair = np.stack([stats.macro(boot[arm].patient_samples, labels) - reference for arm in (name, ceiling)])
    pair = pair[:, np.isfinite(pair).all(axis=0)]
    seeds = study.seeds or stats.seed_model(boot, labels)
    covariance = float(np.cov(pair)[0, 1]) + seeds.levels[REFERENCE].variance / len(boot[REFERENCE].seed_values)
    return stats.ratio_interval(top, bottom, covariance)


def comparison_table(study: Study) -> pd.DataFrame:
    rows = []
    for name, arm in study.arms.items():
        result, runs = study.boot[name], study.runs[name]
        seed_macros = stats.macro(result.seed_values, study.evaluated)
        low, high = stats.interval(stats.macro(result.samples, study.evaluated))
        row: dict[str, Any] = {
            "arm": name, "arm_kind": str(arm.kind), "ratio": arm.ratio, "seeds": len(runs),
            "n_real_train": run_counts(runs, "n_real_train"), "n_synthetic_train": run_counts(runs, "n_synthetic_train"),
            "optimizer_steps": runs[0].metrics["optimizer_steps"],
            "test_images": study.n_images, "test_patients": study.n_patients,
            "macro_auroc_mean": float(np.mean(seed_macros)),
            "macro_auroc_sd": float(np.std(seed_macros, ddof=1)) if len(seed_macros) > 1 else float("nan"),
            "macro_auroc_ci_low": low, "macro_auroc_ci_high": high,
        }
        for column, diffs in study.diffs.items():
            d = diffs.get(name)
            nan = float("nan")
            row.update({f"delta_vs_{column}": d.delta if d else nan, f"delta_vs_{column}_ci_low": d.low if d else nan,
                        f"delta_vs_{column}_ci_high": d.high if d else nan, f"p_vs_{column}": d.p if d else nan,
                        f"p_holm_vs_{column}": d.p_holm if d else nan, f"verdict_vs_{column}": d.verdict if d else "",
                        f"mde_vs_{column}": d.mde if d else nan, f"p_gain_vs_{column}": d.p_gain if d else nan})
        share = more_real_share(study, name)
        row.update({"share_of_more_real": share[0], "share_of_more_real_ci_low": share[1], "share_of_more_real_ci_high": share[2]})
        if study.headline is not None:
            row["p_headline"] = study.headline.p.get(name, float("nan"))
            row["p_holm_headline"] = study.headline.p_holm.get(name, float("nan"))
            row["verdict_headline"] = ((stats.GAIN if name in study.headline.gains else stats.NO_DIFFERENCE)
                                       if name in study.headline.p else "")
        for k, label in enumerate(study.classes):
            shown = bool(study.evaluated[k])
            label_low, label_high = stats.interval(result.samples[:, k]) if shown else (float("nan"), float("nan"))
            row.update({f"auroc_{label}": float(result.estimate[k]) if shown else float("nan"),
                        f"auroc_{label}_ci_low": label_low, f"auroc_{label}_ci_high": label_high,
                        f"test_positives_{label}": int(study.positives[k])})
        rows.append(row)
    return pd.DataFrame(rows)


def composition_table(runs_by_arm: dict[str, list[Run]], classes: list[str]) -> pd.DataFrame:
    """Real, synthetic and effective (after the rebalanced control's oversampling) training positives
    per label and arm ("a-b" where seeds differ)."""
    rows = []
    for name, runs in runs_by_arm.items():
        for label in classes:
            row: dict[str, Any] = {"arm": name, "label": label}
            for column in ("real_positives", "synthetic_positives", "effective_positives"):
                values = set()
                for run in runs:
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


def subgroup_arm(arms: dict[str, Arm]) -> str | None:
    """The arm the subgroup table shows beside ratio0, fixed by a rule set before any test result:
    the largest synthetic arm (the study's strongest dose), else the first other arm in table order."""
    synthetic = [name for name, arm in arms.items() if arm.kind is SYNTHETIC]
    if synthetic:
        return max(synthetic, key=lambda name: arms[name].ratio)
    return next((name for name in arms if name != REFERENCE), None)


def subgroup_table(study: Study, test: pd.DataFrame, targets: np.ndarray, patients: np.ndarray, min_positives: int,
                   n_boot: int) -> tuple[pd.DataFrame, str | None]:
    """Macro AUROC of ratio0 and the pre-specified arm (`subgroup_arm`) within each sex and age band
    (descriptive: intervals from the same bootstrap restricted to the group, no multiplicity correction)."""
    groups = subgroups(test)
    chosen = subgroup_arm(study.arms)
    if not groups or chosen is None:
        return pd.DataFrame(), None
    rows = []
    for variable, group, mask in groups:
        positives = targets[mask].sum(axis=0)
        labels = study.evaluated & (positives >= min_positives)
        row: dict[str, Any] = {"variable": variable, "group": group, "test_images": int(mask.sum()),
                               "test_patients": int(len(np.unique(patients[mask]))), "labels_averaged": int(labels.sum())}
        if labels.any():
            arms = {name: scores_of(study.runs[name], mask) for name in (REFERENCE, chosen)}
            boot = stats.hierarchical_bootstrap(targets[mask], patients[mask], arms, n_boot, seed=BOOTSTRAP_SEED)
            for name, prefix in ((REFERENCE, "ratio0"), (chosen, "best")):
                row[f"{prefix}_auroc"] = float(stats.macro(boot[name].estimate, labels))
                row[f"{prefix}_ci_low"], row[f"{prefix}_ci_high"] = stats.interval(stats.macro(boot[name].samples, labels))
            d = stats.differences(boot, REFERENCE, [chosen], labels)[chosen]
            row.update({"delta": d.delta, "delta_ci_low": d.low, "delta_ci_high": d.high})
        rows.append(row)
    return pd.DataFrame(rows), chosen


# ----------------------------------------------------------------------------- the stage


def compare(config: dict[str, Any], run_dirs: list[Path], fidelity_page: Path, lora_summary: Path, data_dir: Splits,
            prepare_summary: Path | None, synthetic_csv: Path, out_dir: Path,
            reader_study: Path | None = None) -> pd.DataFrame:
    classes = class_names(config["dataset"]["labels"])
    settings = config["classifier"]
    if not run_dirs:
        raise ConfigError("--runs: give the classifier run folders to compare (e.g. results/classifier/*_seed*)")
    runs = [load_run(Path(path), classes) for path in run_dirs]
    check_matched(runs)
    arms, runs_by_arm = group_arms(runs)
    test, targets = align_test_split(runs, load_split(data_dir, "test"), classes)
    patients = test["patient"].astype(str).to_numpy()
    min_positives, n_boot = settings["min_test_positives"], settings["bootstrap_samples"]
    study = analyse(arms, runs_by_arm, targets, patients, classes, min_positives, n_boot, untrained_labels(prepare_summary))
    table = comparison_table(study)
    counts, counted = training_counts(data_dir, prepare_summary, classes)
    rare = rare_labels(counts, classes)
    groups, best = subgroup_table(study, test, targets, patients, min_positives, n_boot)

    provenance = {
        # One hash, named: what defines every classifier run of the study (metrics.json's config_hash,
        # equal across runs); the table's own settings are in results/config/compare.yaml.
        "classifier_config_hash": runs[0].metrics["config_hash"],
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
        composition=composition_table(runs_by_arm, classes), subgroups=groups, best=best, fidelity_page=fidelity_page,
        lora_summary=lora_summary, provenance=provenance, reader_study=reader_study))
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
    parser.add_argument("--fidelity", type=Path, default=Path(paths.FIDELITY_PAGE),
                        help="the fidelity stage's page, included in the table's page")
    parser.add_argument("--lora-summary", type=Path, default=Path(paths.LORA_SUMMARY))
    add_split_arguments(parser, ["train", "test"])
    parser.add_argument("--prepare-summary", type=Path, default=Path(paths.PREPARE_SUMMARY),
                        help="the data stage's summary (pre-balance label counts, labels without training images)")
    parser.add_argument("--reader-study", type=Path, default=None,
                        help="the reader study's pooled row (score_reader_study's pooled.md), shown when given")
    parser.add_argument("--synthetic", type=Path, default=Path(paths.GENERATED))
    parser.add_argument("--out-dir", type=Path, default=Path(paths.RESULTS))
    args = parser.parse_args(argv)
    table = compare(config_from_args(args, "compare"), args.runs, args.fidelity, args.lora_summary,
                    splits_from_args(args, ["train", "test"]), args.prepare_summary, args.synthetic, args.out_dir,
                    args.reader_study)
    shown = ["arm", "seeds", "macro_auroc_mean", "delta_vs_ratio0", "p_holm_vs_ratio0", "verdict_vs_ratio0", "mde_vs_ratio0"]
    print(textwrap.indent(table[shown].to_string(index=False), "  "))
    print(f"table: {args.out_dir / 'comparison.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
