"""The comparison page and its plots, rendered from the figures workflow_scripts.study.compare computed
(workflow_scripts.study.comparison.Study)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from workflow_scripts.study import stats
from workflow_scripts.common.cells import fixed, with_ci
from workflow_scripts.common import paths
from workflow_scripts.study.comparison import AGE_BANDS, Study
from workflow_scripts.study.arms import BASELINES, EXPECTED_BASELINES, MORE_REAL, REFERENCE, SYNTHETIC, kind_of
from workflow_scripts.common.errors import DataError
from workflow_scripts.common.tables import LABEL_JOIN


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
    reader_study: Path | None = None  # score_reader_study's pooled.md, once readers' answers exist


def caveats(inputs: PageInputs) -> list[str]:
    config, study = inputs.config, inputs.study
    notes = []
    if config["model"]["pretrained"] == "tiny":
        notes.append("**The generator is the offline tiny model with random weights**: its images are noise-like, so every "
                     "figure here exercises the pipeline and says nothing about real synthetic X-rays. Set `model.pretrained` "
                     "to Stable Diffusion 1.5 for real results.")
    elif Path(str(config["model"]["pretrained"])).name == "demo-base":
        notes.append("**The generator is the demo's tiny base** (pretrained on unlabelled phantom films, then LoRA fine-tuned "
                     "on the labelled ones): what it can show is that the LoRA teaches the labels (prompt adherence with and "
                     "without LoRA, in the fidelity section) and how the study reads a generator of phantoms; not whether "
                     "Stable Diffusion 1.5's images of real radiographs help a classifier.")
    if config["dataset"]["csv"] == paths.DEMO_CSV:
        notes.append("**The data are the embedded phantoms**, drawings for trying the pipeline, not medical images.")
    first = next(iter(study.runs.values()))[0].metrics
    notes.append(f"Every classifier run started from {first['pretrained_weights']}, ran {first['optimizer_steps']} "
                 f"optimizer steps and shares classifier config hash {first['config_hash']} (the train_classifier "
                 "settings that define a run; `classifier_config_hash` in the provenance below).")
    single = [name for name, runs in study.runs.items() if len(runs) == 1]
    if single:
        notes.append(f"{', '.join(single)}: one training seed only, so its intervals lack training-seed variance and are too "
                     "narrow; run more seeds (`classifier.seeds`).")
    ceiling = next((name for name, arm in study.arms.items() if arm.kind is MORE_REAL), None)
    if ceiling is not None and REFERENCE in study.diffs and study.diffs[REFERENCE][ceiling].verdict != stats.GAIN:
        d = study.diffs[REFERENCE][ceiling]
        notes.append(f"**The positive control {ceiling} does not read gain** (Δ {d.delta:+.3f}, {detectable(d.mde)}): "
                     f"as many new real images gave no gain this study could see, so its other *no measurable "
                     "difference* verdicts say little. More seeds or test patients (`snakemake plan_power`) may help.")
    if not inputs.counted.startswith("before"):
        notes.append(f"Rare labels (†) are counted on the training split {inputs.counted}.")
    return notes


def detectable(mde: float) -> str:
    """How large a Δ could have hidden: the MDE, or that none is found reliably (its SE rests on under 1 df)."""
    return f"could have detected ≥ {mde:+.2f}" if math.isfinite(mde) else "could not reliably detect any Δ: under 1 df"


def verdict_text(row: dict[str, Any], column: str) -> str:
    """The verdict; "no measurable difference" says how small a gain the study could have seen."""
    verdict, mde = row[f"verdict_vs_{column}"], row.get(f"mde_vs_{column}", float("nan"))
    if verdict == stats.NO_DIFFERENCE and not math.isnan(mde):
        return f"{verdict} ({detectable(mde)})"
    return verdict or "–"


def share_text(row: dict[str, Any]) -> str:
    """A synthetic arm's Δ as a share of more_real's, with Fieller's 95 % interval (shown only where
    more_real reads gain; "unbounded" where the interval is)."""
    share, low, high = (row.get(f"share_of_more_real{end}", float("nan")) for end in ("", "_ci_low", "_ci_high"))
    if not math.isfinite(share):
        return ""
    return f"{share:.0%} [{low:.0%}, {high:.0%}]" if math.isfinite(low) and math.isfinite(high) else f"{share:.0%} [unbounded]"


def seed_level_text(study: Study) -> str:
    """How the seed-level variance behind every Δ was estimated: pooled over arms, or each arm's own."""
    seeds = study.seeds
    if seeds is None or not seeds.levels:
        return ""
    if seeds.pooled:
        return (f" The seed-level variance is **pooled** over the {seeds.arms_pooled} arms with 2+ seeds ({seeds.df:.0f} df; "
                f"Bartlett's test of equal seed variances p = {seeds.homogeneity_p:.2f} ≥ {stats.HOMOGENEITY_ALPHA}).")
    return (" The seed-level variance is each arm's own (not pooled: "
            + (f"Bartlett's test of equal seed variances p = {seeds.homogeneity_p:.3f} < {stats.HOMOGENEITY_ALPHA})."
               if seeds.homogeneity_p < stats.HOMOGENEITY_ALPHA else "fewer than two arms with 2+ seeds)."))


def arms_table(inputs: PageInputs) -> list[str]:
    study, table = inputs.study, inputs.table
    controls = [column for column in study.diffs if column != REFERENCE]
    shares = "share_of_more_real" in table and table["share_of_more_real"].notna().any()
    header = ("| arm | kind | synthetic share | seeds | real + synthetic images | test images / patients | macro AUROC (mean ± sd) "
              "| 95% CI | Δ vs ratio0 [95% CI] | p (Holm) | verdict |" + (" share of more_real's Δ ¹ |" if shares else "")
              + "".join(f" Δ vs {c} [95% CI] | verdict vs {c} |" for c in controls))
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---|---|---:|---|" + ("---:|" if shares else "") + "---|---|" * len(controls)]
    for row in table.to_dict("records"):
        sd = "" if not math.isfinite(row["macro_auroc_sd"]) else f" ± {row['macro_auroc_sd']:.3f}"
        cells = [row["arm"], kind_of(row["arm_kind"]).display, f"{row['ratio']}%", str(row["seeds"]),
                 f"{row['n_real_train']} + {row['n_synthetic_train']}", f"{row['test_images']} / {row['test_patients']}",
                 f"{row['macro_auroc_mean']:.3f}{sd}", f"[{row['macro_auroc_ci_low']:.3f}, {row['macro_auroc_ci_high']:.3f}]"]
        if row["arm"] == REFERENCE:
            cells += ["reference", "", ""]
        else:
            cells += [with_ci(row["delta_vs_ratio0"], row["delta_vs_ratio0_ci_low"], row["delta_vs_ratio0_ci_high"], True),
                      fixed(row["p_holm_vs_ratio0"], 3), verdict_text(row, REFERENCE)]
        if shares:
            cells.append(share_text(row))
        for c in controls:
            cells += [with_ci(row[f"delta_vs_{c}"], row[f"delta_vs_{c}_ci_low"], row[f"delta_vs_{c}_ci_high"], True),
                      verdict_text(row, c)]
        lines.append("| " + " | ".join(cells) + " |")
    if shares:
        lines += ["", "¹ Share of more_real's Δ: the arm's Δ vs ratio0 divided by that of the more_real positive control "
                      "(as many new real images as the synthetic arm adds): how much of a real-data gain the synthetic "
                      "images reach. 100 %: as much as new real films; 0 %: nothing; below 0: the arm loses where more "
                      "real data gains (−83 %: it loses 0.83 times what more_real gains). A point estimate, read only "
                      "where more_real reads gain."]
    return lines


def headline_lines(study: Study) -> list[str]:
    """One line for the table's question, tested at 5 % for the whole table (intersection-union)."""
    head = study.headline
    if head is None:
        return []
    against = " and ".join(head.references)
    if head.gains:
        answer = (f"**yes**: {', '.join(head.gains)} gain{'s' if len(head.gains) == 1 else ''} over {against} "
                  f"(one-sided intersection-union p, Holm over the synthetic arms: "
                  + ", ".join(f"{name} {head.p_holm[name]:.3f}" for name in head.gains) + ")")
    else:
        best = min(head.p_holm, key=lambda name: head.p_holm[name])
        answer = (f"**no synthetic arm shows it** (smallest one-sided intersection-union p, Holm over the synthetic arms: "
                  f"{best} {head.p_holm[best]:.3f})")
    missing = [name for name in EXPECTED_BASELINES if name not in head.references]
    note = f" Without the {' and '.join(missing)} control{'s' if len(missing) > 1 else ''} the line tests fewer references." if missing else ""
    return [f"**Headline: do synthetic images give a gain over {against}?** {answer}. This line is one test at 5 % for "
            f"the whole table: an arm counts only if it gains over every reference at once.{note}", ""]


def method_text(inputs: PageInputs) -> list[str]:
    study = inputs.study
    n_boot = inputs.provenance["bootstrap"]["resamples"]
    families = [f"the {len(diffs)} arm{'' if len(diffs) == 1 else 's'} compared with {ref}" for ref, diffs in study.diffs.items()]
    return [
        "**How the intervals were computed.** A paired two-level (hierarchical) bootstrap "
        f"with {n_boot} resamples (Saravanan et al. 2020): each resample draws the {study.n_patients} test patients with "
        "replacement, all films of a drawn patient together, the same draw for every arm (so differences are paired), and "
        "draws each arm's training seeds with replacement (deviations between seeds scaled by √(S/(S−1))·t/z for S seeds, t with S − 1 df, "
        "so that few seeds widen the interval). An arm's AUROC is the mean over its seeds; its 95% interval is the "
        "bootstrap percentile interval. Δ: its standard error adds the paired patient-level bootstrap variance and each "
        "arm's seed variance (the seeds' spread less the seed × patient interaction the patient level already holds); "
        "interval Δ ± t·SE and two-sided p from Student's t with the Welch–Satterthwaite degrees of freedom of both "
        "estimated pieces (the seed variance and the patient-level variance), so p is valid at every level, also at the "
        "α/m Holm tests first." + seed_level_text(study) + " p is "
        "Holm-adjusted within each family (" + "; ".join(families) + "). Per-label and subgroup intervals are not "
        "adjusted for multiplicity.",
        "",
        ("**Verdict.** *gain* (or *loss*) when the Holm-adjusted p is below 0.05 and Δ is positive (negative); otherwise "
        "*no measurable difference*, which is not evidence that the arms are equal: it comes with the minimum detectable "
        "effect (`mde_vs_<reference>` in comparison.csv), the true Δ a study like this one calls a gain with 80% "
        "probability at the level Holm's first step uses (0.05 / arms in the family; noncentral t with the Δ's df, "
        "calibrated by simulating this table). Each family keeps its chance of any "
        "false gain or loss at 5%; over the whole table (several families) that chance is larger, which is why the "
        "headline line has its own test. The 95% intervals are not adjusted, so an interval may exclude 0 while the "
        "adjusted verdict reads no measurable difference. A gain over ratio0 that is not also a gain over the "
        f"{' or '.join(BASELINES)} control may come from more positives or longer exposure, not from realistic images; the more_real "
        "control shows what as many new real images give (¹ share of more_real's Δ: a synthetic arm's share of that "
        "gain, with Fieller's 95% interval, shown only where more_real reads gain)."),
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
             (f"Macro AUROC of ratio0 and {best} (the largest synthetic arm, chosen by a rule fixed before any test result) "
              "within each group of the test split, over the averaged "
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
            f"{fixed(lora.get('train_seconds'), 1)} s, {fixed(lora.get('images_per_second'), 1)} images/s on "
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
    lines += headline_lines(study) + arms_table(inputs) + [""] + method_text(inputs) + [""]
    lines += ["## AUROC per label", ""] + per_label_table(inputs) + [""]
    lines += ["## Label composition of each arm", ""] + composition_lines(inputs) + [""]
    lines += subgroup_lines(inputs)
    lines += fidelity_lines(inputs.fidelity_page)
    if inputs.reader_study is not None and inputs.reader_study.is_file():
        lines += [inputs.reader_study.read_text().rstrip(), ""]
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
    # Constrained layout and a legend outside the axes: no label is cut and the legend covers no point.
    figure, axis = plt.subplots(figsize=(8, 4.5), layout="constrained")
    is_control = table["arm_kind"].map(lambda value: kind_of(value).is_control).astype(bool)
    ratio_arms = table[~is_control].sort_values("ratio")
    errors = [ratio_arms["macro_auroc_mean"] - ratio_arms["macro_auroc_ci_low"],
              ratio_arms["macro_auroc_ci_high"] - ratio_arms["macro_auroc_mean"]]
    reference = table[table["arm"] == REFERENCE]
    if len(reference):
        ref = reference.iloc[0]
        axis.axhspan(ref["macro_auroc_ci_low"], ref["macro_auroc_ci_high"], color="grey", alpha=0.12, linewidth=0)
        axis.axhline(ref["macro_auroc_mean"], color="grey", linestyle="--", linewidth=1,
                     label=f"{REFERENCE}, real only (95% CI)")
    marker, color = SYNTHETIC.marker
    axis.errorbar(ratio_arms["ratio"], ratio_arms["macro_auroc_mean"], yerr=errors, color=color, marker=marker, capsize=4,
                  linewidth=2, label="real + synthetic (95% CI)")
    # Controls get their own slots right of the ratios, named on the axis: a control mirrors a ratio
    # (more_real and noise both mirror the largest) but is not "x % synthetic" (more_real has none).
    ratios = sorted(ratio_arms["ratio"].unique()) or [0]
    step = max(10.0, (max(ratios) - min(ratios)) / 4)
    ticks, names = list(ratios), [f"{ratio}" for ratio in ratios]
    controls = table[is_control]
    for slot, row in enumerate(controls.to_dict("records"), start=1):
        marker, color = kind_of(row["arm_kind"]).marker
        x = max(ratios) + slot * step
        axis.errorbar([x], [row["macro_auroc_mean"]], capsize=4, marker=marker, color=color, linestyle="none", markersize=8,
                      yerr=[[row["macro_auroc_mean"] - row["macro_auroc_ci_low"]], [row["macro_auroc_ci_high"] - row["macro_auroc_mean"]]],
                      label=f"{row['arm']}" + (f" (mirrors {row['ratio']}%)" if row["ratio"] else ""))
        ticks.append(x)
        names.append(str(row["arm"]))
    if len(controls):
        axis.axvline(max(ratios) + step / 2, color="lightgrey", linewidth=1)
    axis.set_xticks(ticks, names, rotation=30 if len(controls) else 0, ha="right" if len(controls) else "center")
    axis.set_xlim(min(ratios) - step / 2, ticks[-1] + step / 2)
    axis.set(xlabel="synthetic share of the training set (%), then the controls", ylabel="test macro AUROC",
             title="AUROC vs synthetic share")
    figure.legend(loc="outside right upper", fontsize=7)
    figure.savefig(plot_dir / "auroc_vs_ratio.png", dpi=110)
    plt.close(figure)
    real_vs_synthetic(classes, train, synthetic, plot_dir / "real_vs_synthetic.png")


def real_vs_synthetic(classes: list[str], train: pd.DataFrame, synthetic: pd.DataFrame | None, path: Path) -> None:
    """Three real and three synthetic training images per label, side by side."""
    import matplotlib.pyplot as plt

    from workflow_scripts.common.images import read_xray

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
