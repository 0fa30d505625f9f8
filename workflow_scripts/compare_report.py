"""The comparison page and its plots, rendered from the figures workflow_scripts.compare computed
(workflow_scripts.comparison.Study)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from workflow_scripts.comparison import AGE_BANDS, CONTROL_REFERENCES, DEMO_CSV, REFERENCE, Study
from workflow_scripts.labels import DataError
from workflow_scripts.tables import LABEL_JOIN

KIND_NAMES = {"real": "real only", "synthetic": "real + synthetic", "control_rebalanced": "control: real, rebalanced",
              "control_noise": "control: noise for synthetic", "control_pretrain": "synthetic pre-training, real fine-tuning"}


@dataclass
class PageInputs:
    config: dict[str, Any]
    study: Study
    table: pd.DataFrame
    rare: list[str]
    counts: dict[str, int]  # real training images per label (see `counted`)
    counted: str
    composition: pd.DataFrame
    subgroups: pd.DataFrame
    best: str | None
    fidelity_page: Path
    lora_summary: Path
    provenance: dict[str, Any]


def number_or_text(value: Any, digits: int = 2) -> str:
    """A number rounded, or a status text shortened for a table cell (the reason is given once, above it)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        text = str(value)
        return "unavailable (see note)" if text.startswith("unavailable") else text
    return "–" if math.isnan(number) else f"{number:.{digits}f}"


def with_ci(value: float, low: float, high: float, signed: bool = False) -> str:
    if not math.isfinite(value):
        return "–"
    form = "+.3f" if signed else ".3f"
    return f"{value:{form}} [{low:{form}}, {high:{form}}]"


def caveats(inputs: PageInputs) -> list[str]:
    config, study = inputs.config, inputs.study
    notes = []
    if config["model"]["pretrained"] == "tiny":
        notes.append("**The generator is the offline tiny model with random weights**: its images are noise-like, so every "
                     "figure here exercises the pipeline and says nothing about real synthetic X-rays. Set `model.pretrained` "
                     "to Stable Diffusion 1.5 for real results.")
    if config["dataset"]["csv"] == DEMO_CSV:
        notes.append("**The data are the embedded phantoms**, drawings for trying the pipeline, not medical images.")
    first = next(iter(study.arms.values())).runs[0].metrics
    notes.append(f"Every run started from the same classifier weights ({first['pretrained_weights']}), ran "
                 f"{first['optimizer_steps']} optimizer steps and shares config hash {first['config_hash']}.")
    single = [name for name, arm in study.arms.items() if len(arm.runs) == 1]
    if single:
        notes.append(f"{', '.join(single)}: one training seed only, so its intervals lack training-seed variance and are too "
                     "narrow; run more seeds (`classifier.seeds`).")
    if not inputs.counted.startswith("before"):
        notes.append(f"Rare labels (†) are counted on the training split {inputs.counted}.")
    return notes


def arms_table(inputs: PageInputs) -> list[str]:
    study, table = inputs.study, inputs.table
    controls = [column for column in CONTROL_REFERENCES if column in study.diffs]
    header = ("| arm | kind | synthetic share | seeds | real + synthetic images | test images / patients | macro AUROC (mean ± sd) "
              "| 95% CI | Δ vs ratio0 [95% CI] | p (Holm) | verdict |"
              + "".join(f" Δ vs {study.references[c]} [95% CI] | verdict vs {c} |" for c in controls))
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---|---|---:|---|" + "---|---|" * len(controls)]
    for row in table.to_dict("records"):
        sd = "" if not math.isfinite(row["macro_auroc_sd"]) else f" ± {row['macro_auroc_sd']:.3f}"
        cells = [row["arm"], KIND_NAMES[row["arm_kind"]], f"{row['ratio']}%", str(row["seeds"]),
                 f"{row['n_real_train']} + {row['n_synthetic_train']}", f"{row['test_images']} / {row['test_patients']}",
                 f"{row['macro_auroc_mean']:.3f}{sd}", f"[{row['macro_auroc_ci_low']:.3f}, {row['macro_auroc_ci_high']:.3f}]"]
        if row["arm"] == REFERENCE:
            cells += ["reference", "", ""]
        else:
            cells += [with_ci(row["delta_vs_ratio0"], row["delta_vs_ratio0_ci_low"], row["delta_vs_ratio0_ci_high"], True),
                      number_or_text(row["p_holm_vs_ratio0"], 3), row["verdict_vs_ratio0"]]
        for c in controls:
            cells += [with_ci(row[f"delta_vs_{c}"], row[f"delta_vs_{c}_ci_low"], row[f"delta_vs_{c}_ci_high"], True),
                      row[f"verdict_vs_{c}"] or "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def method_text(inputs: PageInputs) -> list[str]:
    study = inputs.study
    n_boot = inputs.provenance["bootstrap"]["resamples"]
    families = [f"the {len(study.diffs['ratio0'])} arms compared with ratio0"] + [
        f"the {len(study.diffs[c])} synthetic arms compared with {study.references[c]}" for c in CONTROL_REFERENCES if c in study.diffs]
    return [
        "**How the intervals were computed.** 95% percentile intervals from a paired two-level (hierarchical) bootstrap "
        f"with {n_boot} resamples (Saravanan et al. 2020): each resample draws the {study.n_patients} test patients with "
        "replacement, all films of a drawn patient together, the same draw for every arm (so differences are paired), and "
        "draws each arm's training seeds with replacement (deviations between seeds scaled by √(S/(S−1))·t/z for S seeds, "
        "so that few seeds widen the interval). An arm's AUROC is the mean over its seeds. p: two-sided bootstrap p-value "
        "of Δ = 0, Holm-adjusted within each family (" + "; ".join(families) + "). Per-label and subgroup intervals are "
        "not adjusted for multiplicity.",
        "",
        ("**Verdict.** *gain* (or *loss*) when the Holm-adjusted p is below 0.05 and Δ is positive (negative); otherwise "
        "*no measurable difference*, which is not evidence that the arms are equal. The 95% intervals are not adjusted, so an "
        "interval may exclude 0 while the verdict, adjusted for the number of arms compared, reads no measurable "
        "difference. A gain over ratio0 that is not also a "
        "gain over the noise or rebalanced control may come from more positives or longer exposure, not from realistic images."),
    ]


def per_label_table(inputs: PageInputs) -> list[str]:
    study, minimum = inputs.study, inputs.config["classifier"]["min_test_positives"]
    header = "| arm | " + " | ".join(f"{label}{' †' if label in inputs.rare else ''} ({k} pos.)"
                                      for label, k in zip(study.classes, study.positives)) + " |"
    lines = [header, "|---|" + "---|" * len(study.classes)]
    for row in inputs.table.to_dict("records"):
        cells = []
        for label, shown, k in zip(study.classes, study.evaluated, study.positives):
            cells.append(with_ci(row[f"auroc_{label}"], row[f"auroc_{label}_ci_low"], row[f"auroc_{label}_ci_high"])
                         if shown else "n/a (no training image)" if label in study.untrained else f"n/a ({k} positives)")
        lines.append(f"| {row['arm']} | " + " | ".join(cells) + " |")
    return [(f"AUROC per label, mean over seeds [95% CI], shown where the test split has at least {minimum} positives "
            "(`classifier.min_test_positives`)."), "", *lines]


def composition_lines(inputs: PageInputs) -> list[str]:
    arms = list(inputs.study.arms)
    comp = inputs.composition.set_index(["arm", "label"])
    lines = [("Training positives per label, real + synthetic (\"a-b\" where seeds differ); \"= n\" gives the positives "
              "the classifier sees where real images are repeated (the rebalanced control's oversampling). Real training "
              f"images per label {inputs.counted}: in the second column."), "",
             "| label | real training images | " + " | ".join(arms) + " |", "|---|---:|" + "---:|" * len(arms)]

    def cell(arm: str, label: str) -> str:
        real, synthetic, effective = (comp.loc[(arm, label), column]
                                      for column in ("real_positives", "synthetic_positives", "effective_positives"))
        shown = f"{real} + {synthetic}"
        both = all(isinstance(value, (int, np.integer)) for value in (real, synthetic, effective))
        return shown if both and effective == real + synthetic else f"{shown} = {effective}"

    for label in inputs.study.classes:
        cells = [cell(arm, label) for arm in arms]
        lines.append(f"| {label}{' †' if label in inputs.rare else ''} | {inputs.counts[label]} | " + " | ".join(cells) + " |")
    return lines


def subgroup_lines(inputs: PageInputs) -> list[str]:
    if inputs.subgroups.empty:
        return []
    best, minimum = inputs.best, inputs.config["classifier"]["min_test_positives"]
    lines = ["## Subgroups", "",
             (f"Macro AUROC of ratio0 and the best synthetic arm ({best}) within each group of the test split, over the averaged "
             f"labels with at least {minimum} positives in the group; intervals from the same bootstrap within the group, "
             f"descriptive (no multiplicity correction). Age bands: {', '.join(band[2] for band in AGE_BANDS)} years."), "",
             f"| group | test images / patients | labels averaged | ratio0 [95% CI] | {best} [95% CI] | Δ [95% CI] |",
             "|---|---:|---:|---|---|---|"]
    for row in inputs.subgroups.to_dict("records"):
        if row["labels_averaged"] == 0:
            values = ["n/a (no label with enough positives)"] * 3
        else:
            values = [with_ci(row["ratio0_auroc"], row["ratio0_ci_low"], row["ratio0_ci_high"]),
                      with_ci(row["best_auroc"], row["best_ci_low"], row["best_ci_high"]),
                      with_ci(row["delta"], row["delta_ci_low"], row["delta_ci_high"], True)]
        lines.append(f"| {row['variable']} {row['group']} | {row['test_images']} / {row['test_patients']} | "
                     f"{row['labels_averaged']} | " + " | ".join(values) + " |")
    return lines + [""]


def fidelity_lines(page: Path) -> list[str]:
    """The fidelity stage's own section (fidelity, diversity, adherence and the audit, each once,
    with its n and its real-vs-real floor), included verbatim from its fidelity.md."""
    if not page.is_file():
        raise DataError(f"{page} not found: run the evaluate_fidelity stage first")
    return [page.read_text().rstrip(), ""]


def lora_lines(path: Path) -> list[str]:
    if not path.is_file():
        return ["## LoRA training", "", f"unavailable: {path} not found.", ""]
    lora = json.loads(path.read_text())
    return ["## LoRA training", "",
            (f"{lora.get('steps')} steps ({lora.get('epochs')} epochs) on {lora.get('train_images')} images in "
            f"{number_or_text(lora.get('train_seconds'), 1)} s, {number_or_text(lora.get('images_per_second'), 1)} images/s on "
            f"{lora.get('device')}; base model `{lora.get('base_model')}`, LoRA rank {lora.get('lora_rank')}."), ""]


def render_page(inputs: PageInputs) -> str:
    study = inputs.study
    averaged = [label for label, shown in zip(study.classes, study.evaluated) if shown]
    left_out = [f"{label} ({k})" for label, shown, k in zip(study.classes, study.evaluated, study.positives)
                if not shown and label not in study.untrained]
    minimum = inputs.config["classifier"]["min_test_positives"]
    lines = ["# Do synthetic chest X-rays help a classifier?", ""]
    lines += [f"> {note}" for note in caveats(inputs)] + [""]
    lines += ["## Classifier on real test patients", "",
              f"Macro AUROC over {', '.join(averaged)} ({len(averaged)} of {len(study.classes)} labels"
              + (f"; left out, fewer than {minimum} test positives: {', '.join(left_out)}" if left_out else "")
              + (f"; left out, no training image (dataset.allow_absent_labels): {', '.join(study.untrained)}"
                 if study.untrained else "") + "). "
              f"Test split: {study.n_images} images of {study.n_patients} patients. † rare label (the third of the labels with "
              f"the fewest real training images, counted {inputs.counted}; ties share the mark).", ""]
    lines += arms_table(inputs) + [""] + method_text(inputs) + [""]
    lines += ["## AUROC per label", ""] + per_label_table(inputs) + [""]
    lines += ["## Label composition of each arm", ""] + composition_lines(inputs) + [""]
    lines += subgroup_lines(inputs)
    lines += fidelity_lines(inputs.fidelity_page)
    lines += lora_lines(inputs.lora_summary)
    lines += ["![AUROC vs synthetic share](plots/auroc_vs_ratio.png)", "", "![real vs synthetic](plots/real_vs_synthetic.png)", "",
              "## Provenance", "", "```", json.dumps(inputs.provenance, indent=2), "```", ""]
    return "\n".join(lines)


def make_plots(table: pd.DataFrame, classes: list[str], rare: list[str], train: pd.DataFrame, synthetic: pd.DataFrame | None,
               plot_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(7, 4.5))
    ratio_arms = table[table["arm_kind"].isin(["real", "synthetic"])].sort_values("ratio")
    errors = [ratio_arms["macro_auroc_mean"] - ratio_arms["macro_auroc_ci_low"],
              ratio_arms["macro_auroc_ci_high"] - ratio_arms["macro_auroc_mean"]]
    axis.errorbar(ratio_arms["ratio"], ratio_arms["macro_auroc_mean"], yerr=errors, color="black", marker="s", capsize=4,
                  linewidth=2, label="real + synthetic (95% CI)")
    markers = {"control_rebalanced": ("D", "tab:blue"), "control_noise": ("x", "tab:red"), "control_pretrain": ("^", "tab:green")}
    for row in table[~table["arm_kind"].isin(["real", "synthetic"])].to_dict("records"):
        marker, color = markers[row["arm_kind"]]
        axis.errorbar([row["ratio"] + 1.0], [row["macro_auroc_mean"]], capsize=4, marker=marker, color=color, linestyle="none",
                      yerr=[[row["macro_auroc_mean"] - row["macro_auroc_ci_low"]], [row["macro_auroc_ci_high"] - row["macro_auroc_mean"]]],
                      label=f"{row['arm']} ({KIND_NAMES[row['arm_kind']]})")
    axis.set(xlabel="synthetic share of the training set (%)", ylabel="test macro AUROC", title="AUROC vs synthetic share",
             xticks=sorted(ratio_arms["ratio"].unique()))
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(plot_dir / "auroc_vs_ratio.png", dpi=110)
    plt.close(figure)
    real_vs_synthetic(classes, train, synthetic, plot_dir / "real_vs_synthetic.png")


def real_vs_synthetic(classes: list[str], train: pd.DataFrame, synthetic: pd.DataFrame | None, path: Path) -> None:
    """Three real and three synthetic training images per label, side by side."""
    import matplotlib.pyplot as plt

    from workflow_scripts.images import read_xray

    def having(frame: pd.DataFrame, column: str, label: str) -> list[str]:
        return frame[frame["labels"].str.split(LABEL_JOIN).map(lambda labels: label in labels)][column].head(3).tolist()

    shown = [label for label in [*classes, "No Finding"] if having(train, "path", label)]
    figure, axes = plt.subplots(len(shown), 6, figsize=(9, 1.6 * len(shown)), squeeze=False)
    for row, label in enumerate(shown):
        real = having(train, "path", label)
        fake = having(synthetic, "file", label) if synthetic is not None else []
        for column, image in enumerate(real + [None] * (3 - len(real)) + fake + [None] * (3 - len(fake))):
            axis = axes[row][column]
            axis.axis("off")
            if image is not None:
                axis.imshow(read_xray(image), cmap="gray")
        axes[row][0].set_title(label, fontsize=8, loc="left")
    axes[0][1].set_title("real", fontsize=8)
    axes[0][4].set_title("synthetic", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
