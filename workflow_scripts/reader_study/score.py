"""Reader study scoring stage: how well readers tell synthetic from real, and which findings they see.

    python -m workflow_scripts.reader_study.score --config results/config/score_reader_study.yaml \\
        --key results/reader_study/key.csv --answers-dir results/reader_study/answers \\
        --out-dir results/reader_study

Reads every CSV in the answers folder (never writes there). Per reader and for all readers pooled:
accuracy at telling real from synthetic, sensitivity and specificity for "synthetic", the AUROC of
the confidence-weighted "synthetic" score (95 % intervals: Wilson or a bootstrap over patients per
reader; for the pooled row an Obuchowski-Rockette MRMC interval, readers and patients random, on the
images every reader answered), consistency on repeated images, reading time and image quality, and
per label how often the label is marked on real films that have it and on synthetic images prompted
with it (expert prompt adherence); Fleiss' kappa between readers when there are two or more.
An image shown twice is scored on the showing the reader answered that was displayed first.
Outputs: scores.csv, scores.md, pooled.md (the pooled row, which comparison.md includes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from workflow_scripts.common import paths
from workflow_scripts.common.errors import run_stage
from workflow_scripts.common.config import add_config_arguments, config_from_args
from workflow_scripts.reader_study.agreement import bootstrap_interval, fleiss_kappa, rank_auroc, wilson_interval
from workflow_scripts.reader_study.answers import POOLED_NAME, read_answers
from workflow_scripts.reader_study.design import FINDING_JOIN, marked_column, read_study
from workflow_scripts.reader_study.mrmc import mrmc_accuracy, mrmc_auroc
from workflow_scripts.reader_study.report import render_pooled, render_scores, safe_cell

POOLED = POOLED_NAME


def scored_answers(answers: pd.DataFrame, key: pd.DataFrame) -> pd.DataFrame:
    """Answers joined with the key: `item` (the image, a repeat counted as its original), `repeat`
    (not the first-displayed showing this reader answered of the item: left out of accuracy), whether
    it is synthetic, whether the answer is right, the signed confidence score and the labels shown."""
    shown = key.loc[answers["image_id"]]
    position = pd.Series(range(len(key)), index=key.index)
    frame = answers.assign(
        item=[original or image for image, original in zip(shown["image_id"], shown["repeat_of"])],
        position=position.loc[answers["image_id"]].to_numpy(),
        synthetic=(shown["source"] == "synthetic").to_numpy(),
        labels=[frozenset(text.split(FINDING_JOIN)) if text else frozenset() for text in shown["labels"]],
    )
    earliest = frame.groupby(["reader", "item"])["position"].transform("min")
    frame["repeat"] = frame["position"] != earliest
    frame["correct"] = (frame["answer"] == "synthetic") == frame["synthetic"]
    frame["score"] = np.where(frame["answer"] == "synthetic", 1, -1) * frame["confidence"]
    for column, empty in (("quality", ""), ("reason", ""), ("seconds", np.nan), ("x", np.nan), ("y", np.nan)):
        if column not in frame:
            frame[column] = empty
    return frame.reset_index(drop=True)


def rate(part: int, whole: int) -> float:
    return part / whole if whole else float("nan")


def auroc(synthetic: np.ndarray, scores: np.ndarray) -> float:
    if len(np.unique(synthetic)) < 2:
        return float("nan")
    return float(roc_auc_score(synthetic, scores))


def item_rows(frame: pd.DataFrame) -> list[np.ndarray]:
    """Per distinct image, the row positions of its answers: resampling images keeps all of an image's answers."""
    return [np.asarray(rows) for rows in frame.groupby("item", sort=True).indices.values()]


def label_arrays(frame: pd.DataFrame, label: str) -> tuple[np.ndarray, np.ndarray]:
    """Per answer: does the image carry `label` (real: has it; synthetic: prompted with it), is it marked."""
    carries = frame["labels"].map(lambda labels: label in labels).to_numpy(bool)
    return carries, frame["findings"].map(lambda marked: label in marked).to_numpy(bool)


def consistency(frame: pd.DataFrame) -> tuple[float, int]:
    """Share of repeated images answered the same (real/synthetic) both times, and the number of pairs."""
    repeats = frame[frame["repeat"]].set_index(["reader", "item"])["answer"]
    firsts = frame[~frame["repeat"]].set_index(["reader", "item"])["answer"]
    both = repeats.index.intersection(firsts.index)
    if len(both) == 0:
        return float("nan"), 0
    return float((repeats.loc[both] == firsts.loc[both]).mean()), len(both)


def score_row(name: str, frame: pd.DataFrame, vocabulary: list[str], pooled: bool, n_boot: int, seed: int) -> dict[str, Any]:
    """One row of scores.csv, on each reader's first-displayed answers. Intervals: Wilson for the
    rates of one reader, a bootstrap over patients (all answers on a patient's film together) for
    AUROC and for the pooled row; `score` replaces the pooled ones by MRMC intervals where it can."""
    first = frame[~frame["repeat"]].reset_index(drop=True)
    rows = item_rows(first)
    correct_of, synthetic, scores = (first[column].to_numpy() for column in ("correct", "synthetic", "score"))

    def boot(statistic):  # statistic(answer positions) over resampled patients
        return bootstrap_interval(lambda picks: statistic(np.concatenate([rows[i] for i in picks])), len(rows), n_boot, seed)

    def proportion(hits: np.ndarray, on: np.ndarray) -> tuple[float, float, float, int]:
        k, n = int((hits & on).sum()), int(on.sum())
        low, high = boot(lambda at: rate(int((hits[at] & on[at]).sum()), int(on[at].sum()))) if pooled else wilson_interval(k, n)
        return rate(k, n), low, high, n

    row: dict[str, Any] = {"reader": name, "n": len(first), "correct": int(correct_of.sum())}
    everyone = np.ones(len(first), bool)
    for column, on in (("accuracy", everyone), ("sensitivity", synthetic), ("specificity", ~synthetic)):
        value, low, high, _ = proportion(correct_of, on)
        row |= {column: value, f"{column}_ci_low": low, f"{column}_ci_high": high}
    row["interval"] = "bootstrap over patients" if pooled else "Wilson"
    auc_low, auc_high = boot(lambda at: rank_auroc(synthetic[at], scores[at]))
    agreement, pairs = consistency(frame)
    row |= {"auroc": auroc(synthetic, scores), "auroc_ci_low": auc_low, "auroc_ci_high": auc_high,
            "consistency": agreement, "repeat_pairs": pairs, "median_seconds": float(first["seconds"].median())}
    for source, is_synthetic in (("real", False), ("synthetic", True)):
        rated = first[(synthetic == is_synthetic) & (first["quality"] != "")]
        row[f"{source}_non_diagnostic"] = rate(int((rated["quality"] == "non-diagnostic").sum()), len(rated))
        row[f"{source}_quality_rated"] = len(rated)
    for label in vocabulary:
        carries, marked_of = label_arrays(first, label)
        for source, is_synthetic in (("real", False), ("synthetic", True)):
            value, low, high, shown = proportion(marked_of, carries & (synthetic == is_synthetic))
            column = marked_column(source, label)
            row |= {f"{column}_n": shown, column: value, f"{column}_low": low, f"{column}_high": high}
    return row


def mrmc_columns(frame: pd.DataFrame) -> dict[str, Any]:
    """The pooled row's MRMC intervals (Obuchowski-Rockette, readers and patients random) on the
    patients every reader answered; {} with fewer than 2 readers or too few shared patients."""
    first = frame[~frame["repeat"]]
    readers = first["reader"].nunique()
    correct = first.pivot(index="reader", columns="item", values="correct").dropna(axis=1)
    if readers < 2 or correct.shape[1] < 4:
        return {}
    scores = first.pivot(index="reader", columns="item", values="score")[correct.columns].to_numpy(float)
    truth = first.drop_duplicates("item").set_index("item").loc[correct.columns, "synthetic"].to_numpy(bool)
    correct = correct.to_numpy(float)
    if truth.sum() < 2 or (~truth).sum() < 2:
        return {}
    row = {"interval": f"MRMC (Obuchowski-Rockette): {readers} readers x {len(truth)} patients all read"}
    for column, result in (("accuracy", mrmc_accuracy(correct)), ("sensitivity", mrmc_accuracy(correct[:, truth])),
                           ("specificity", mrmc_accuracy(correct[:, ~truth])), ("auroc", mrmc_auroc(truth, scores))):
        # the reader-averaged figure on the shared patients, which the interval is about
        row |= {column: result.estimate, f"{column}_ci_low": max(0.0, result.low),
                f"{column}_ci_high": min(1.0, result.high), f"{column}_df": result.df}
    return row


def kappa(frame: pd.DataFrame, n_boot: int, seed: int) -> dict[str, Any]:
    """Fleiss' kappa of the real/synthetic answers on the images every reader answered (first showings)."""
    first = frame[~frame["repeat"]]
    readers = first["reader"].nunique()
    table = pd.crosstab(first["item"], first["answer"]).reindex(columns=["real", "synthetic"], fill_value=0)
    table = table[table.sum(axis=1) == readers].to_numpy()
    if readers < 2 or len(table) == 0:
        return {"fleiss_kappa": float("nan"), "fleiss_kappa_ci_low": float("nan"),
                "fleiss_kappa_ci_high": float("nan"), "kappa_images": 0}
    low, high = bootstrap_interval(lambda picks: fleiss_kappa(table[picks]), len(table), n_boot, seed)
    return {"fleiss_kappa": fleiss_kappa(table), "fleiss_kappa_ci_low": low, "fleiss_kappa_ci_high": high,
            "kappa_images": len(table)}


def score(key: pd.DataFrame, meta: dict[str, Any], answers: pd.DataFrame, n_boot: int, seed: int) -> pd.DataFrame:
    frame = scored_answers(answers, key)
    rows = [score_row(reader, part, meta["findings"], False, n_boot, seed) for reader, part in frame.groupby("reader", sort=True)]
    rows.append(score_row(POOLED, frame, meta["findings"], True, n_boot, seed) | mrmc_columns(frame) | kappa(frame, n_boot, seed))
    return pd.DataFrame(rows)


@run_stage
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--key", type=Path, default=Path(paths.READER_STUDY_KEY_CSV))
    parser.add_argument("--answers-dir", type=Path, help="override reader_study.answers_dir")
    parser.add_argument("--bootstrap-samples", type=int, help="override reader_study.bootstrap_samples")
    parser.add_argument("--seed", type=int, help="override reader_study.seed")
    parser.add_argument("--out-dir", type=Path, default=Path(paths.READER_STUDY))
    args = parser.parse_args(argv)
    settings = dict(config_from_args(args, "score_reader_study")["reader_study"])
    settings |= {key: getattr(args, key) for key in ("answers_dir", "bootstrap_samples", "seed") if getattr(args, key) is not None}
    key, meta = read_study(args.key)
    answers = read_answers(Path(settings["answers_dir"]), key, meta)
    scores = score(key, meta, answers, settings["bootstrap_samples"], settings["seed"])
    args.out_dir.mkdir(parents=True, exist_ok=True)
    scores.assign(reader=scores["reader"].map(safe_cell)).to_csv(args.out_dir / "scores.csv", index=False)
    (args.out_dir / "scores.md").write_text(render_scores(scores, meta, answers, key))
    (args.out_dir / "pooled.md").write_text(render_pooled(scores, meta))
    print(scores[["reader", "n", "accuracy", "accuracy_ci_low", "accuracy_ci_high", "sensitivity", "specificity",
                  "auroc"]].to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
