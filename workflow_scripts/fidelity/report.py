"""fidelity.md (ready to include in results/comparison.md) and the fidelity plots.

Plots show only reliable values: KID (unbiased at any n >= 2), FID only where n >= feature dims,
MS-SSIM and AUROC where defined.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from workflow_scripts.common.cells import finite, significant
from workflow_scripts.fidelity import BASE, BASE_PROMPTED, FLOOR, PROMPTED, REAL_VAL, SYNTHETIC
from workflow_scripts.fidelity import distances


def _fidelity_tables(result: dict[str, Any]) -> list[str]:
    rows = pd.DataFrame(result["rows"])
    metrics = distances.SET_METRICS
    headers = [header for metric in metrics for header in metric.table_headers]
    lines: list[str] = []
    for name, info in result["settings"]["extractors"].items():
        if not info["status"].startswith("ok"):
            lines += [f"**{name}**: {info['status']}", ""]
            continue
        mine = rows[rows["extractor"] == name]
        base = (mine["comparison"] == BASE).any()
        lines += [f"**{name}** ({info['description']}; input {info['input_size']} px). "
                  "Each cell: synthetic vs real val (floor: real train vs real val, same n)"
                  + ("; the base model without LoRA, same prompts and seeds, in its own columns" if base else "") + ".", "",
                  "| " + " | ".join(["label", "n", *headers]
                                    + (["KID without LoRA", "precision / recall without LoRA"] if base else [])) + " |",
                  "|---|" + "---:|" * (1 + len(headers) + 2 * base)]
        for label in dict.fromkeys(mine["label"]):
            syn = mine[(mine["label"] == label) & (mine["comparison"] == SYNTHETIC)].iloc[0]
            flo = mine[(mine["label"] == label) & (mine["comparison"] == FLOOR)].iloc[0]
            cells = [label, str(int(syn["n"])), *(cell for metric in metrics for cell in metric.shown(syn, flo))]
            if base:
                off = mine[(mine["label"] == label) & (mine["comparison"] == BASE)].iloc[0]
                cells += [distances.kid_shown(off, flo), f"{significant(off.get('precision'))} / {significant(off.get('recall'))}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def negative_control_verdict(flagged: int, n: int, quantile_percent: float | None) -> str:
    """The real-test flag rate read against the rate the threshold was calibrated for: a threshold at
    the q-th percentile of real val -> train distances flags about q % of unseen real films by design.
    More than Binomial(n, q)'s 95th percentile reads "above calibration"."""
    from scipy.stats import binom

    if not n or quantile_percent is None:
        return "Real test images: no verdict (no test images or no calibration quantile recorded)."
    expected = quantile_percent / 100
    ceiling = int(binom.ppf(0.95, n, expected))
    rate = f"{flagged} of {n} ({flagged / n:.1%})"
    if flagged <= ceiling:
        return (f"**Real test images: as calibrated.** {rate} flagged; the threshold sits at the {quantile_percent:g}% "
                f"quantile of real val -> train distances, so about {expected * n:.1f} of {n} unseen real films are "
                f"expected under it by design (up to {ceiling} is within chance, 95%).")
    return (f"**Real test images: above calibration.** {rate} flagged, more than the {ceiling} that {quantile_percent:g}% "
            f"calibration allows by chance (95%): real films of other patients lie this close to training films more "
            "often than the val films did (near-identical films across patients, or a val split unlike test); read the "
            "synthetic flag count with that in mind.")


def render_markdown(result: dict[str, Any], plots: list[Path], out_dir: Path) -> str:
    settings = result["settings"]
    lines = ["## Fidelity, diversity, prompt adherence and memorization", "",
             f"Reference: {settings['reference']}. Floor: {settings['floor']}: what real radiographs score. "
             f"Preprocessing, for real and synthetic alike: {settings['preprocessing']}. "
             "n: per label, every set subsampled to the smallest of synthetic, real val and real train. "
             f"KID: {settings['kid']['implementation']}, subsets of min({settings['kid']['subset_size']}, n); "
             "FID only where n >= feature dims, else n/a (n < d); precision/recall/density/coverage: "
             f"{settings['prdc']['implementation']}, k = {settings['prdc']['k']}.", "",
             "### Fidelity", ""]
    lines += _fidelity_tables(result)

    lines += ["### Diversity", "",
              f"{settings['diversity']}: lower = more diverse; a synthetic value far above the real one means "
              "the generator repeats itself (mode collapse).", "",
              "| label | images | pairs | MS-SSIM synthetic | MS-SSIM real val |", "|---|---:|---:|---:|---:|"]
    diversity = pd.DataFrame(result["diversity"])
    for label in dict.fromkeys(diversity["label"]) if len(diversity) else []:
        syn = diversity[(diversity["label"] == label) & (diversity["set"] == "synthetic")].iloc[0]
        real = diversity[(diversity["label"] == label) & (diversity["set"] == "real val")].iloc[0]
        lines.append(f"| {label} | {syn['images']} | {syn['pairs']} | {significant(syn['ms_ssim'] if syn['ms_ssim'] is not None else syn['notes'])} "
                     f"| {significant(real['ms_ssim'] if real['ms_ssim'] is not None else real['notes'])} |")
    lines.append("")

    lines += ["### Prompt adherence", "",
              f"Scored by: {settings['adherence']} (trained on real images only, it never saw synthetic ones). Per label, the AUROC of its score "
              "for that label: prompted label vs the rest on synthetic images, true label vs the rest on real val images "
              "(95% bootstrap CI). 0.5 = the synthetic images do not show what they were asked to show.", ""]
    adherence = pd.DataFrame(result["adherence"])
    if len(adherence):
        base = (adherence["set"] == BASE_PROMPTED).any()
        if base:
            lines += ["The same prompts and seeds drawn by the base model without LoRA are scored the same way: "
                      "the difference between the two columns is what the LoRA taught.", ""]
        lines += ["| label | synthetic: n pos / neg | AUROC synthetic (LoRA) |" + (" AUROC base without LoRA |" if base else "")
                  + " real val: n pos / neg | AUROC real val |", "|---|---:|---:|" + ("---:|" if base else "") + "---:|---:|"]

        def auroc(row: pd.Series) -> str:
            if finite(row["auroc"]) is None:
                return row["notes"] or "n/a"
            ci = f" [{significant(row['ci_low'], 2)}, {significant(row['ci_high'], 2)}]" if finite(row["ci_low"]) is not None else ""
            return f"{significant(row['auroc'], 3)}{ci}"

        for label in dict.fromkeys(adherence["label"]):
            mine = adherence[adherence["label"] == label].set_index("set")
            syn, real = mine.loc[PROMPTED], mine.loc[REAL_VAL]
            off = f" {auroc(mine.loc[BASE_PROMPTED])} |" if base else ""
            lines.append(f"| {label} | {syn['positives']} / {syn['negatives']} | {auroc(syn)} |{off} "
                         f"{real['positives']} / {real['negatives']} | {auroc(real)} |")
    else:
        lines.append(settings["adherence"])
    lines.append("")

    lines += ["### Memorization audit", ""]
    audit = result.get("audit")
    if audit:
        positive, negative = audit["positive_control"], audit["negative_control"]
        lines += [f"{audit['flagged']} of {audit['n']} synthetic images flagged as possible copies of a training image "
                  f"(listed in `{audit['files']['flagged']}`; the closest {len(audit['pairs'])} pairs side by side in "
                  f"`{audit['files']['pairs']}/`). Similarity: {audit['similarity']}. Threshold "
                  f"{audit['thresholds']['distance']:.4g}: the {audit['thresholds']['calibration']}.",
                  "",
                  "| check | n | flagged |", "|---|---:|---:|",
                  f"| synthetic images | {audit['n']} | {audit['flagged']} |",
                  f"| planted perturbed copies of training images (must be caught) | {positive['n']} | {positive['flagged']} |",
                  f"| real test images, other patients (must not be) | {negative['n']} | {negative['flagged']} |", "",
                  negative_control_verdict(negative["flagged"], negative["n"], audit["thresholds"].get("quantile_percent")), ""]
    else:
        lines += ["unavailable: no audit_summary.json given", ""]

    if plots:
        lines += [f"![{plot.stem}]({plot.relative_to(out_dir.parent) if out_dir.parent in plot.parents else plot})" for plot in plots]
        lines.append("")
    return "\n".join(lines)


def make_plots(fidelity: pd.DataFrame, diversity: pd.DataFrame, adherence: pd.DataFrame, plot_dir: Path) -> list[Path]:
    """KID (and FID where reliable) per label and extractor beside the floor; MS-SSIM; AUROC."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def bars(ax, labels: list[str], series: list[tuple[str, list[float | None], list[float] | None]], ylabel: str) -> None:
        x = np.arange(len(labels))
        width = 0.8 / max(len(series), 1)
        for k, (name, values, errors) in enumerate(series):
            missing = [v is None or not math.isfinite(v) for v in values]
            heights = [0.0 if gap else v for v, gap in zip(values, missing)]
            ax.bar(x + k * width, heights, width, yerr=errors, label=name, capsize=2)
            for xi, gap in zip(x + k * width, missing):
                if gap:
                    ax.text(xi, 0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
        ax.set_xticks(x + width * (len(series) - 1) / 2, labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)

    plotted = [metric.plot for metric in distances.SET_METRICS if metric.plot]
    for extractor in dict.fromkeys(fidelity["extractor"]):
        mine = fidelity[(fidelity["extractor"] == extractor)]
        syn, flo = mine[mine["comparison"] == SYNTHETIC], mine[mine["comparison"] == FLOOR]
        first = plotted[0][0]  # the first plotted metric (KID: defined at any n >= 2) picks the labels
        reliable = (syn[first].map(finite).notna().to_numpy() & flo[first].map(finite).notna().to_numpy())
        syn, flo = syn[reliable], flo[reliable]  # labels with n < 2 (or an unavailable extractor): not plotted
        if syn.empty:
            continue
        labels = [f"{label}\n(n={int(n)})" for label, n in zip(syn["label"], syn["n"])]
        panels = [plot for plot in plotted if syn[plot[0]].map(finite).notna().any()]
        # Constrained layout with the legend outside the axes: no label cut, no bar hidden.
        figure, axes = plt.subplots(1, len(panels), figsize=(4 + 4 * len(panels), 4), squeeze=False, layout="constrained")

        def series(frame: pd.DataFrame, value: str, spread: str | None) -> tuple[list, list | None]:
            return (list(frame[value].map(finite)),
                    list(frame[spread].map(lambda v: finite(v) or 0.0)) if spread else None)

        for axis, (value, spread, title) in zip(axes[0], panels):
            bars(axis, labels, [("synthetic vs real val", *series(syn, value, spread)),
                                ("floor: real train vs real val", *series(flo, value, spread))], title.split(" ")[0])
            axis.set_title(f"{title}, {extractor} features")
        figure.legend(*axes[0][0].get_legend_handles_labels(), loc="outside right upper", fontsize=8)
        path = plot_dir / f"fidelity_{extractor}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)

    if len(diversity) and diversity["ms_ssim"].map(finite).notna().any():
        syn, real = diversity[diversity["set"] == "synthetic"], diversity[diversity["set"] == "real val"]
        figure, ax = plt.subplots(figsize=(8, 4), layout="constrained")
        bars(ax, [f"{label}\n({int(n)} img)" for label, n in zip(syn["label"], syn["images"])],
             [("synthetic", list(syn["ms_ssim"].map(finite)), None), ("real val", list(real["ms_ssim"].map(finite)), None)],
             "mean pairwise MS-SSIM")
        ax.set_title("Diversity: mean pairwise MS-SSIM (lower = more diverse)", fontsize=10)
        figure.legend(loc="outside right upper", fontsize=8)
        path = plot_dir / "diversity_ms_ssim.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)

    if len(adherence) and adherence["auroc"].map(finite).notna().any():
        series = [(name, adherence[adherence["set"] == name]) for name in (PROMPTED, BASE_PROMPTED, REAL_VAL)
                  if (adherence["set"] == name).any()]
        figure, ax = plt.subplots(figsize=(8, 4), layout="constrained")

        def errors(frame: pd.DataFrame) -> np.ndarray:
            value = frame["auroc"].map(lambda v: finite(v) or 0.0).to_numpy()
            low = frame["ci_low"].map(lambda v: finite(v)).to_numpy(dtype=float)
            high = frame["ci_high"].map(lambda v: finite(v)).to_numpy(dtype=float)
            return np.nan_to_num(np.vstack([value - low, high - value]), nan=0.0).clip(min=0)

        x, width, top = np.arange(len(series[0][1])), 0.8 / len(series), 1.0
        for k, (name, frame) in enumerate(series):
            heights = frame["auroc"].map(lambda v: finite(v) or 0.0).to_numpy(dtype=float)
            spread = errors(frame)
            top = max(top, float((heights + spread[1]).max(initial=0.0)))
            ax.bar(x + width * k, heights, width, yerr=spread, capsize=2, label=name)
        ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="chance")
        ax.set_xticks(x + width * (len(series) - 1) / 2, series[0][1]["label"], rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, top + 0.05)  # room above 1.0: an interval reaching 1 keeps its cap
        ax.set_ylabel("AUROC of the real-only classifier")
        figure.legend(loc="outside right upper", fontsize=8)
        path = plot_dir / "prompt_adherence.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written
