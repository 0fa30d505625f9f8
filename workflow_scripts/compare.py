"""The final comparison: do synthetic X-rays help a classifier, and do they look real?

    python -m workflow_scripts.compare --config config/config.yaml --out-dir results

One row per synthetic ratio: macro AUROC on the real, patient-disjoint test split (mean ± std over
seeds; 95% CI by bootstrap over test images), its difference from 0% synthetic (paired bootstrap:
the same resampled test images for both), AUROC per label with the rare labels marked, and beside
them the fidelity figures (FID, KID, domain distance), the memorization audit's flagged count and
the LoRA's training time and speed. Writes `comparison.csv`, `comparison.md` and plots under
`plots/`. Every figure names its source files, seeds and settings at the bottom of the page.
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
from scipy.stats import rankdata

from workflow_scripts.config import ConfigError, add_config_arguments, config_from_args, config_hash
from workflow_scripts.prepare_dataset import LABEL_JOIN, DataError, label_counts, load_split
from workflow_scripts.train_classifier import class_names

DEMO_CSV = "results/demo_data/Data_Entry_2017.csv"


def auroc_columns(targets: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUROC of every column at once (Mann-Whitney via average ranks); NaN where a column lacks a class."""
    positives = targets.sum(axis=0)
    negatives = targets.shape[0] - positives
    ranks = rankdata(scores, axis=0)
    rank_sum = (ranks * targets).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)
    return np.where((positives > 0) & (negatives > 0), auc, np.nan)


def macro(aurocs: np.ndarray) -> float:
    return float(np.nanmean(aurocs)) if np.isfinite(aurocs).any() else float("nan")


def load_run(run_dir: Path, classes: list[str]) -> dict[str, Any]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    predictions = pd.read_csv(run_dir / "predictions.csv", dtype={"labels": str}, keep_default_na=False).sort_values("path")
    targets = np.array([[label in labels.split(LABEL_JOIN) for label in classes] for labels in predictions["labels"]], dtype=float)
    scores = predictions[[f"prob_{label}" for label in classes]].to_numpy(dtype=float)
    return {"metrics": metrics, "paths": predictions["path"].tolist(), "targets": targets, "scores": scores}


def bootstrap_ratios(runs: dict[int, list[dict[str, Any]]], n_boot: int, seed: int) -> dict[int, np.ndarray]:
    """Per ratio: the seed-averaged macro AUROC on `n_boot` resamples of the test images, the same
    resamples for every ratio so that differences are paired."""
    first = next(iter(runs.values()))[0]
    for ratio_runs in runs.values():
        for run in ratio_runs:
            if run["paths"] != first["paths"]:
                raise DataError("the classifier runs were evaluated on different test images; re-run them")
    n = len(first["paths"])
    rng = np.random.default_rng(seed)
    samples = {ratio: np.empty(n_boot) for ratio in runs}
    for b in range(n_boot):
        index = rng.integers(0, n, n)
        for ratio, ratio_runs in runs.items():
            samples[ratio][b] = np.mean([macro(auroc_columns(run["targets"][index], run["scores"][index])) for run in ratio_runs])
    return samples


def percentile_ci(values: np.ndarray) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if not len(values):
        return float("nan"), float("nan")
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def rare_labels(train: pd.DataFrame, classes: list[str]) -> list[str]:
    """The third of the classes with the fewest real training images (at least one)."""
    counts = label_counts(train)
    ordered = sorted(classes, key=lambda label: (counts.get(label, 0), label))
    return ordered[:max(1, math.ceil(len(classes) / 3))]


def number_or_text(value: Any, digits: int = 2) -> str:
    """A number rounded, or a status text shortened for a table cell (the reason is given once, above it)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        text = str(value)
        return "unavailable (see note)" if text.startswith("unavailable") else text
    return "–" if math.isnan(number) else f"{number:.{digits}f}"


def comparison_table(runs: dict[int, list[dict[str, Any]]], classes: list[str], rare: list[str],
                     samples: dict[int, np.ndarray], fidelity: pd.DataFrame, audit: dict[str, Any],
                     lora: dict[str, Any]) -> pd.DataFrame:
    overall = fidelity[fidelity["label"] == "overall"].iloc[0]
    # AUROC per label of every run on the whole test set, computed once.
    aurocs = {ratio: np.array([auroc_columns(run["targets"], run["scores"]) for run in ratio_runs]) for ratio, ratio_runs in runs.items()}
    seed_macros = {ratio: np.array([macro(row) for row in values]) for ratio, values in aurocs.items()}
    rows = []
    for ratio in sorted(runs):
        ratio_runs = runs[ratio]
        per_label = np.nanmean(aurocs[ratio], axis=0)
        ci_low, ci_high = percentile_ci(samples[ratio])
        delta_low, delta_high = percentile_ci(samples[ratio] - samples[0])
        row = {
            "synthetic_percent": ratio,
            "seeds": len(ratio_runs),
            "real_train_images": ratio_runs[0]["metrics"]["n_real_train"],
            "synthetic_train_images": ratio_runs[0]["metrics"]["n_synthetic_train"],
            "macro_auroc_mean": float(seed_macros[ratio].mean()),
            "macro_auroc_std": float(seed_macros[ratio].std(ddof=1)) if len(ratio_runs) > 1 else 0.0,
            "macro_auroc_ci_low": ci_low,
            "macro_auroc_ci_high": ci_high,
            "delta_vs_0": float(seed_macros[ratio].mean() - seed_macros[0].mean()),
            "delta_ci_low": delta_low,
            "delta_ci_high": delta_high,
        }
        row.update({f"auroc_{label}" + (" (rare)" if label in rare else ""): float(value) for label, value in zip(classes, per_label)})
        row.update({
            "fid_overall": overall["fid"], "kid_overall": overall["kid_mean"], "domain_fd_overall": overall["domain_fd"],
            "audit_flagged": f"{audit['flagged']}/{audit['n']}",
            "lora_train_seconds": lora.get("train_seconds"), "lora_images_per_second": lora.get("images_per_second"),
        })
        rows.append(row)
    return pd.DataFrame(rows)


def caveats(config: dict[str, Any], runs: dict[int, list[dict[str, Any]]], fidelity_settings: dict[str, Any]) -> list[str]:
    notes = []
    if config["model"]["pretrained"] == "tiny":
        notes.append("**The generator is the offline tiny model with random weights**: its images are noise-like, so every "
                     "figure here exercises the pipeline and says nothing about real synthetic X-rays. Set `model.pretrained` "
                     "to Stable Diffusion 1.5 for real results.")
    if config["dataset"]["csv"] == DEMO_CSV:
        notes.append("**The data are the embedded phantoms**, drawings for trying the pipeline, not medical images.")
    weights = {run["metrics"]["pretrained_weights"] for ratio_runs in runs.values() for run in ratio_runs}
    notes += [f"Classifier initial weights: {w}." for w in sorted(weights)]
    notes.append(f"FID/KID: {fidelity_settings.get('tool', 'pytorch-fid')}, {fidelity_settings.get('dims')} dims, "
                 f"{fidelity_settings.get('resize', '')}; Inception weights: {fidelity_settings.get('inception_status', '?')}.")
    return notes


def render_markdown(table: pd.DataFrame, classes: list[str], rare: list[str], fidelity: pd.DataFrame, audit: dict[str, Any],
                    lora: dict[str, Any], notes: list[str], provenance: dict[str, Any]) -> str:
    label_columns = [c for c in table.columns if c.startswith("auroc_")]
    lines = ["# Do synthetic chest X-rays help a classifier?", ""]
    lines += [f"> {note}" for note in notes] + [""]
    lines += ["## Classifier on real test patients", "",
              "Macro AUROC over " + ", ".join(classes) + f" (mean ± std over {int(table['seeds'].iloc[0])} seeds; "
              "95% CI: bootstrap over test images; Δ: paired bootstrap against 0%). † rare label (fewest training images).", "",
              "| synthetic | real + synthetic images | macro AUROC | 95% CI | Δ vs 0% | Δ 95% CI | "
              + " | ".join(c.removeprefix("auroc_").replace(" (rare)", " †") for c in label_columns) + " |",
              "|---:|---:|---:|---|---:|---|" + "---:|" * len(label_columns)]
    for values in table.to_dict("records"):
        lines.append(
            f"| {values['synthetic_percent']}% | {values['real_train_images']} + {values['synthetic_train_images']} | "
            f"{values['macro_auroc_mean']:.3f} ± {values['macro_auroc_std']:.3f} | "
            f"[{values['macro_auroc_ci_low']:.3f}, {values['macro_auroc_ci_high']:.3f}] | {values['delta_vs_0']:+.3f} | "
            f"[{values['delta_ci_low']:+.3f}, {values['delta_ci_high']:+.3f}] | "
            + " | ".join(number_or_text(values[c], 3) for c in label_columns) + " |")
    lines += ["", "## Do the synthetic images look real?", "",
              "Synthetic images of a label against the real training images of that label. Domain distance: Fréchet "
              "distance in the penultimate features of the real-only classifier.", "",
              "| label | real | synthetic | FID | KID | domain distance | notes |", "|---|---:|---:|---|---|---:|---|"]
    for row in fidelity.itertuples(index=False):
        marker = " †" if row.label in rare else ""
        lines.append(f"| {row.label}{marker} | {row.n_real} | {row.n_synthetic} | {number_or_text(row.fid)} | "
                     f"{number_or_text(row.kid_mean, 4)} | {number_or_text(row.domain_fd)} | {row.notes if isinstance(row.notes, str) else ''} |")
    thresholds = audit.get("thresholds", {})
    lines += ["", "## Memorization audit", "",
              f"{audit['flagged']} of {audit['n']} synthetic images lie closer to a real training image than the thresholds "
              f"(cosine distance of classifier features {thresholds.get('feature_cosine_distance', '?')}, "
              f"mean absolute pixel difference {thresholds.get('pixel_mean_abs_difference', '?')}); "
              "each flagged pair is saved side by side in `results/evaluation/audit_pairs/`. Do not share flagged images.", "",
              "## LoRA training", "",
              f"{lora.get('steps')} steps ({lora.get('epochs')} epochs) on {lora.get('train_images')} images in "
              f"{number_or_text(lora.get('train_seconds'), 1)} s, {number_or_text(lora.get('images_per_second'), 1)} images/s on "
              f"{lora.get('device')}; base model `{lora.get('base_model')}`, LoRA rank {lora.get('lora_rank')}.", "",
              "![AUROC vs synthetic share](plots/auroc_vs_ratio.png)", "", "![fidelity per label](plots/fidelity_per_label.png)", "",
              "![real vs synthetic](plots/real_vs_synthetic.png)", "", "## Provenance", "", "```",
              json.dumps(provenance, indent=2), "```", ""]
    return "\n".join(lines)


def make_plots(table: pd.DataFrame, classes: list[str], rare: list[str], fidelity: pd.DataFrame, train: pd.DataFrame,
               synthetic: pd.DataFrame, plot_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from workflow_scripts.images import read_xray

    plot_dir.mkdir(parents=True, exist_ok=True)
    x = table["synthetic_percent"].to_numpy()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for column in [c for c in table.columns if c.startswith("auroc_")]:
        label = column.removeprefix("auroc_")
        axis.plot(x, table[column], marker="o", alpha=0.6, linestyle="--" if "(rare)" in label else "-", label=label)
    axis.plot(x, table["macro_auroc_mean"], color="black", linewidth=2.5, marker="s", label="macro (95% CI)")
    axis.fill_between(x, table["macro_auroc_ci_low"], table["macro_auroc_ci_high"], color="black", alpha=0.12)
    axis.set(xlabel="synthetic share of the training set (%)", ylabel="test AUROC", xticks=x, title="AUROC vs synthetic share")
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(plot_dir / "auroc_vs_ratio.png", dpi=110)
    plt.close(figure)

    per_label = fidelity[fidelity["label"] != "overall"]
    figure, axis = plt.subplots(figsize=(7, 4))
    values = pd.to_numeric(per_label["domain_fd"], errors="coerce")
    axis.bar(per_label["label"], values, color=["tab:red" if label in rare else "tab:blue" for label in per_label["label"]])
    axis.set(ylabel="domain Fréchet distance (lower = closer to real)", title="Fidelity per label (red: rare)")
    axis.tick_params(axis="x", rotation=45)
    figure.tight_layout()
    figure.savefig(plot_dir / "fidelity_per_label.png", dpi=110)
    plt.close(figure)

    shown = [label for label in [*classes, "No Finding"] if label in set(per_label["label"])]
    figure, axes = plt.subplots(len(shown), 6, figsize=(9, 1.6 * len(shown)), squeeze=False)
    for row, label in enumerate(shown):
        real = train[train["labels"].str.split(LABEL_JOIN).map(lambda labels, label=label: label in labels)]["path"].head(3).tolist()
        fake = synthetic[synthetic["labels"].str.split(LABEL_JOIN).map(lambda labels, label=label: label in labels)]["file"].head(3).tolist()
        for column, path in enumerate(real + [None] * (3 - len(real)) + fake + [None] * (3 - len(fake))):
            axis = axes[row][column]
            axis.axis("off")
            if path is not None:
                axis.imshow(read_xray(path), cmap="gray")
        axes[row][0].set_title(label, fontsize=8, loc="left")
    axes[0][1].set_title("real", fontsize=8)
    axes[0][4].set_title("synthetic", fontsize=8)
    figure.tight_layout()
    figure.savefig(plot_dir / "real_vs_synthetic.png", dpi=90)
    plt.close(figure)


def compare(config: dict[str, Any], classifier_dir: Path, evaluation_dir: Path, lora_summary: Path, data_dir: Path,
            synthetic_csv: Path, out_dir: Path) -> pd.DataFrame:
    classes = class_names(config["dataset"]["labels"])
    settings = config["classifier"]
    runs = {ratio: [load_run(classifier_dir / f"ratio{ratio}_seed{seed}", classes) for seed in settings["seeds"]]
            for ratio in sorted(settings["ratios"])}
    if 0 not in runs:
        raise ConfigError("classifier.ratios must include 0: every ratio is compared with the real-only classifier")
    train = load_split(data_dir, "train")
    rare = rare_labels(train, classes)
    samples = bootstrap_ratios(runs, settings["bootstrap_samples"], seed=0)
    fidelity = pd.read_csv(evaluation_dir / "fidelity.csv", keep_default_na=False)
    fidelity_settings = json.loads((evaluation_dir / "fidelity.json").read_text()).get("settings", {})
    audit = json.loads((evaluation_dir / "audit_summary.json").read_text())
    lora = json.loads(lora_summary.read_text())
    table = comparison_table(runs, classes, rare, samples, fidelity, audit, lora)

    provenance = {
        "config_hash": config_hash(config),
        "classifier": {"model": settings["model"], "ratios": settings["ratios"], "seeds": settings["seeds"],
                       "bootstrap_samples": settings["bootstrap_samples"], "runs": str(classifier_dir)},
        "split_seed": config["split"]["seed"], "generation_seed": config["generation"]["seed"],
        "lora": {"summary": str(lora_summary), "seed": lora.get("seed"), "config_hash": lora.get("config_hash"),
                 "versions": lora.get("versions")},
        "fidelity": {"file": str(evaluation_dir / "fidelity.json"), **{k: fidelity_settings.get(k) for k in ("tool", "dims", "resize")}},
        "classifier_versions": runs[0][0]["metrics"].get("versions"),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / "comparison.csv", index=False)
    notes = caveats(config, runs, fidelity_settings)
    (out_dir / "comparison.md").write_text(render_markdown(table, classes, rare, fidelity, audit, lora, notes, provenance))
    make_plots(table, classes, rare, fidelity, train, pd.read_csv(synthetic_csv, dtype={"labels": str}), out_dir / "plots")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--classifier-dir", type=Path, default=Path("results/classifier"))
    parser.add_argument("--evaluation-dir", type=Path, default=Path("results/evaluation"))
    parser.add_argument("--lora-summary", type=Path, default=Path("results/lora/final/training_summary.json"))
    parser.add_argument("--data-dir", type=Path, default=Path("results/data"))
    parser.add_argument("--synthetic", type=Path, default=Path("results/synthetic/generation_results.csv"))
    parser.add_argument("--out-dir", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    try:
        table = compare(config_from_args(args, "compare"), args.classifier_dir, args.evaluation_dir, args.lora_summary,
                        args.data_dir, args.synthetic, args.out_dir)
    except (ConfigError, DataError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(textwrap.indent(table[["synthetic_percent", "macro_auroc_mean", "macro_auroc_std", "delta_vs_0"]].to_string(index=False), "  "))
    print(f"table: {args.out_dir / 'comparison.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
