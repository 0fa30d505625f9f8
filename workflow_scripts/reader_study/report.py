"""scores.md and pooled.md: the reader study's scores in words a reader of the table can use."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from workflow_scripts.reader_study.design import marked_column

MEANING = [
    "**Accuracy** is the share of images whose source (real or synthetic) the reader named correctly. Half the "
    "images are synthetic, so a reader who guesses scores about 50 %: an accuracy whose interval covers 50 % means "
    "the reader could not tell these synthetic images from real films (at this number of images). Well above 50 %: "
    "the synthetic images give themselves away. Well below 50 %: the reader took synthetic images for real ones "
    "(and real ones for synthetic) more often than not.",
    "**Sensitivity** is the share of synthetic images called synthetic, **specificity** the share of real films "
    "called real: a reader who always answers \"real\" scores 50 % accuracy with sensitivity 0 % and specificity "
    "100 %, which says nothing about the images.",
    "**AUROC** ranks the images by the reader's confidence-weighted \"synthetic\" score (synthetic at confidence 5 "
    "highest, real at confidence 5 lowest): 0.5 means the confidence says nothing about the source, 1.0 a perfect "
    "separation.",
    "**Consistency** is the share of repeated images the reader answered the same way both times.",
    "**Findings marked**: on real films that have a label, how often the reader marks it (the reader's own "
    "sensitivity, the reference), and on synthetic images prompted with that label, how often the reader sees it "
    "(expert prompt adherence). A synthetic rate near the real rate means the label is drawn as convincingly as on "
    "real films.",
    "**Fleiss' kappa**: agreement between readers on real/synthetic beyond chance (0: chance, 1: full agreement), on "
    "the images every reader answered.",
]


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(text: str) -> str:
    """A name for a CSV cell a spreadsheet will not run: a leading = + - @ (a formula) gets a quote."""
    return "'" + text if str(text).startswith(FORMULA_START) else str(text)


def md_cell(text: str) -> str:
    """A name for a markdown table cell: | would split the cell, and HTML and markup are shown as typed."""
    escaped = str(text).replace("\\", "\\\\")
    for char in "|*_`[]<>#":
        escaped = escaped.replace(char, "\\" + char)
    return escaped


def percent(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.0f} %"


def with_interval(value: float, low: float, high: float, as_percent: bool = True) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    if as_percent:
        return f"{percent(value)} [{percent(low)}, {percent(high)}]" if math.isfinite(low) else percent(value)
    return f"{value:.2f} [{low:.2f}, {high:.2f}]" if math.isfinite(low) else f"{value:.2f}"


def reader_table(scores: pd.DataFrame) -> list[str]:
    lines = ["| reader | images | accuracy [95 % CI] | sensitivity (synthetic called synthetic) | specificity (real called real) "
             "| AUROC [95 % CI] | consistency (pairs) | median s per image | non-diagnostic: real / synthetic |",
             "|---|---:|---|---|---|---|---|---:|---|"]
    for row in scores.to_dict("records"):
        repeats = f"{percent(row['consistency'])} ({row['repeat_pairs']})" if row["repeat_pairs"] else "n/a"
        cells = [with_interval(row[name], row[f"{name}_ci_low"], row[f"{name}_ci_high"]) for name in ("accuracy", "sensitivity", "specificity")]
        seconds = "n/a" if not math.isfinite(row["median_seconds"]) else f"{row['median_seconds']:.0f}"
        quality = " / ".join(percent(row[f"{source}_non_diagnostic"]) for source in ("real", "synthetic"))
        lines.append(f"| {md_cell(row['reader'])} | {row['n']} | {' | '.join(cells)}"
                     f" | {with_interval(row['auroc'], row['auroc_ci_low'], row['auroc_ci_high'], False)} | {repeats}"
                     f" | {seconds} | {quality} |")
    return lines


def adherence_table(scores: pd.DataFrame, vocabulary: list[str]) -> list[str]:
    lines = ["| label | reader | marked on real films with it | marked on synthetic images prompted with it |",
             "|---|---|---|---|"]
    for label in vocabulary:
        for row in scores.to_dict("records"):
            cells = []
            for source in ("real", "synthetic"):
                column = marked_column(source, label)
                shown = row[f"{column}_n"]
                cells.append(f"{with_interval(row[column], row[f'{column}_low'], row[f'{column}_high'])} of {shown}"
                             if shown else "none shown")
            lines.append(f"| {label} | {md_cell(row['reader'])} | {cells[0]} | {cells[1]} |")
    return lines


def reasons_table(answers: pd.DataFrame, key: pd.DataFrame | None) -> list[str]:
    """Why readers said synthetic, by what the image was: the tells readers see on synthetic images,
    and what misleads them on real films."""
    if key is None or "reason" not in answers or not (answers["reason"].fillna("") != "").any():
        return []
    given = answers[answers["reason"].fillna("") != ""]
    sources = key.loc[given["image_id"], "source"].to_numpy()
    counts = pd.crosstab(given["reason"].to_numpy(), sources).reindex(columns=["synthetic", "real"], fill_value=0)
    lines = ["## Why readers said synthetic", "", "| reason | on synthetic images | on real films |", "|---|---:|---:|"]
    lines += [f"| {md_cell(reason)} | {row['synthetic']} | {row['real']} |" for reason, row in counts.iterrows()]
    return lines + [""]


def kappa_line(pooled: dict[str, Any]) -> str:
    if not pooled["kappa_images"]:
        return "Fleiss' kappa: n/a (needs two or more readers who answered the same images)."
    value = with_interval(pooled["fleiss_kappa"], pooled["fleiss_kappa_ci_low"], pooled["fleiss_kappa_ci_high"], False)
    return (f"Fleiss' kappa between readers on real/synthetic: {value}"
            f" on {int(pooled['kappa_images'])} images every reader answered (bootstrap over images).")


def render_scores(scores: pd.DataFrame, meta: dict[str, Any], answers: pd.DataFrame, key: pd.DataFrame | None = None) -> str:
    pooled = scores.iloc[-1].to_dict()
    files = sorted(set(answers["file"]))
    lines = [f"# Reader study {meta['study']}: scores", "",
             f"{len(scores) - 1} reader(s), {len(answers)} answers from {len(files)} file(s); study of "
             f"{sum(meta['images'].values())} images ({', '.join(f'{n} {source}' for source, n in sorted(meta['images'].items()))}) "
             f"+ {meta['repeats']} repeated, {meta['image_size']} px. Intervals: 95 %; per reader Wilson (rates) and a "
             f"bootstrap over patients (AUROC); all readers: {pooled['interval']}.", "",
             *reader_table(scores), "", kappa_line(pooled), "",
             *reasons_table(answers, key),
             "## Findings marked (expert prompt adherence)", "", *adherence_table(scores, meta["findings"]), "",
             "## What the scores mean", ""]
    lines += [f"- {text}" for text in MEANING]
    if meta.get("notes"):
        lines += ["", "## Notes from building the study", ""] + [f"- {note}" for note in meta["notes"]]
    return "\n".join(lines) + "\n"


def chance_words(row: dict[str, Any]) -> str:
    """What the accuracy interval says against guessing (50 %)."""
    low, high = row["accuracy_ci_low"], row["accuracy_ci_high"]
    if not (math.isfinite(low) and math.isfinite(high)):
        return "too few answers for an interval"
    if low <= 0.5 <= high:
        return "the interval covers 50 %, so the readers could not tell the synthetic images from real ones"
    if low > 0.5:
        return "above 50 %: the readers told the synthetic images from real ones better than guessing"
    return "below 50 %: the readers took the synthetic images for real (and the real for synthetic) more often than not"


def render_pooled(scores: pd.DataFrame, meta: dict[str, Any]) -> str:
    """The section comparison.md includes: the pooled row, in one sentence and one table row."""
    pooled = scores.iloc[-1].to_dict()
    return "\n".join([
        "## Expert reader study", "",
        f"{len(scores) - 1} reader(s) told real from synthetic on {pooled['n']} answers (study {meta['study']}): "
        f"accuracy {with_interval(pooled['accuracy'], pooled['accuracy_ci_low'], pooled['accuracy_ci_high'])}, "
        f"AUROC {with_interval(pooled['auroc'], pooled['auroc_ci_low'], pooled['auroc_ci_high'], False)} "
        f"sensitivity {percent(pooled['sensitivity'])}, specificity {percent(pooled['specificity'])} "
        f"(95 % intervals, {pooled['interval']}): {chance_words(pooled)}. "
        + kappa_line(pooled) + " Per reader and per label: reader_study/scores.md.", ""])
