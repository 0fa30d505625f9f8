"""Data stage: read a chest X-ray dataset, check it, split it by patient, balance, write prompts.

    python -m workflow_scripts.data.prepare_dataset --config config/config.yaml --out-dir results/data [--workers N]

Reads NIH ChestX-ray14 (`Data_Entry_2017.csv`), CheXpert (`train.csv`) or a generic CSV into one
frame (`common/labels.py`), resolves every row to exactly one file (`data/resolve.py`), refuses bad input with
the file/row at fault (or skips it and reports it, with `dataset.on_bad_image: skip`), splits
patients into train/val/test, optionally caps the training images per label, and writes
`{train,val,test}.csv` (`common/tables.py`) with path, labels, prompt, patient and split (then sex and age where the
source has them). The user's dataset is only ever read.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from workflow_scripts.common import paths
from workflow_scripts.common.errors import DataError, run_stage
from workflow_scripts.common.config import add_config_arguments, config_from_args, result_hash
from workflow_scripts.common.labels import DEMOGRAPHIC_COLUMNS, FORMATS, check_rows, note, read_dataset, skip_frame
from workflow_scripts.data.resolve import NOT_FOUND, check_images, check_same_content, check_same_files, resolve_paths
from workflow_scripts.common.tables import LABEL_JOIN, SPLIT_COLUMNS, SPLITS, assert_patient_disjoint, label_counts, make_prompt
from workflow_scripts.study.design import more_real_ratio, reserve_patients

MIN_GROUP = 3  # patients a rarest-label group needs to give one each to train, val and test


# ----------------------------------------------------------------------------- split, balance, prompts


def patient_groups(frame: pd.DataFrame) -> dict[str, list[str]]:
    """Patients grouped by their rarest label (counted in images), each group sorted."""
    counts = Counter(label for labels in frame["labels"] for label in labels)
    patient_labels: dict[str, set[str]] = {}
    for patient, labels in zip(frame["patient"], frame["labels"]):
        patient_labels.setdefault(patient, set()).update(labels)
    groups: dict[str, list[str]] = {}
    for patient in sorted(patient_labels):
        rarest = min(patient_labels[patient], key=lambda label: (counts[label], label))
        groups.setdefault(rarest, []).append(patient)
    return groups


def split_by_patient(frame: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int) -> pd.Series:
    """Assign every patient (so all of their images) to one split.

    Patients are grouped by their rarest label and each group is divided in the requested
    proportions, so rare labels reach val and test too instead of landing there by chance.
    """
    groups = patient_groups(frame)
    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    for label in sorted(groups):
        patients = list(rng.permutation(groups[label]))
        n = len(patients)
        n_test = int(round(n * test_fraction))
        n_val = int(round(n * val_fraction))
        if n >= MIN_GROUP:  # every group big enough gets at least one test and (if asked) one val patient
            n_test = max(n_test, 1)
            n_val = max(n_val, 1 if val_fraction > 0 else 0)
        for position, patient in enumerate(patients):
            assignment[patient] = "test" if position < n_test else "val" if position < n_test + n_val else "train"
    return frame["patient"].map(assignment)


def split_failure(frame: pd.DataFrame, empty: str, csv_path: Path, skipped: int) -> str:
    """Why the `empty` split got no patient: the rarest-label groups and which are too small."""
    groups = patient_groups(frame)
    sizes = ", ".join(f"{label} {len(patients)}" for label, patients in sorted(groups.items()))
    small = [label for label, patients in sorted(groups.items()) if len(patients) < MIN_GROUP]
    after = f" after leaving out {skipped} unusable image(s)" if skipped else ""
    key = "split.val_fraction" if empty == "val" else "split.test_fraction"
    return (
        f"{csv_path}: the {empty} split is empty{after}. {frame['patient'].nunique()} patients are grouped by "
        f"their rarest label (patients per group: {sizes}); a group gives a patient to {'test' if empty == 'train' else empty} "
        f"only with at least {MIN_GROUP} patients or when {key} x its size rounds to 1 or more. Groups too small: "
        f"{small}. Add patients with these labels, remove the rarest labels from dataset.labels (and their "
        f"rows), or raise {key}"
    )


def balance_training(frame: pd.DataFrame, max_per_label: int | None, seed: int) -> pd.DataFrame:
    """Keep at most `max_per_label` training images per label.

    Images are considered rarest-label first (random order within), and one is kept only while
    every one of its labels is under the cap: rare labels keep all their images, common ones are
    cut down to the cap.
    """
    if max_per_label is None:
        return frame
    label_counts = Counter(label for labels in frame["labels"] for label in labels)
    rng = np.random.default_rng(seed)
    order = sorted(
        range(len(frame)),
        key=lambda i, tie=rng.random(len(frame)): (min(label_counts[label] for label in frame["labels"].iloc[i]), tie[i]),
    )
    kept_counts: Counter[str] = Counter()
    keep = []
    for i in order:
        labels = frame["labels"].iloc[i]
        if all(kept_counts[label] < max_per_label for label in labels):
            kept_counts.update(labels)
            keep.append(i)
    return frame.iloc[sorted(keep)].reset_index(drop=True)


# ----------------------------------------------------------------------------- the stage


def _leave_out(
    frame: pd.DataFrame, reasons: Sequence[str | None], on_bad_image: str, root: Path, csv_path: Path
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows whose image is unusable: stop naming the first (`error`), or drop them with a report."""
    bad = [(row, image, reason) for row, image, reason in zip(frame["row"], frame["image"], reasons) if reason]
    if bad and on_bad_image == "error":
        row, image, reason = bad[0]
        hint = " None of the images was found: check dataset.images, the folder the label file's paths are " \
               "relative to." if len(bad) == len(frame) and all(reason == NOT_FOUND for *_, reason in bad) else ""
        raise DataError(
            f"{csv_path} line {row}: image {image} under {root}: {reason}. {len(bad)} image(s) are unusable; "
            f"fix them, or set dataset.on_bad_image: skip to leave them out with a report.{hint}"
        )
    keep = [reason is None for reason in reasons]
    return frame[keep].reset_index(drop=True), skip_frame(csv_path, bad)


def _all_unusable(skipped: pd.DataFrame, out_dir: Path) -> DataError:
    """Every image was left out: write the skip report anyway and say why, with the first reasons."""
    out_dir.mkdir(parents=True, exist_ok=True)
    skipped.to_csv(out_dir / "skipped.csv", index=False)
    first = "; ".join(f"line {row} {path}: {reason}" for row, path, reason in
                      skipped[["row", "path", "reason"]].head(3).itertuples(index=False))
    # Reasons without the file name in front and the hint behind, counted: "file not found x 371".
    kinds = Counter(str(reason).rsplit(" -- ", 1)[0].split(": ", 1)[-1] for reason in skipped["reason"])
    hint = " (none was found: check dataset.images, the folder the label file's paths are relative to)" \
        if (skipped["reason"] == NOT_FOUND).all() else ""
    return DataError(f"all {len(skipped)} images unusable{hint}: first reasons: {first}. By reason: "
                     + ", ".join(f"{kind} x {count}" for kind, count in kinds.most_common(5))
                     + f". Every reason is in {out_dir / 'skipped.csv'}")


def _skipped_as_bad(label: str, unusable: pd.DataFrame) -> str:
    """', k training image(s) skipped as unusable (line L path: reason; ...)' for `label`, or ''."""
    mine = unusable[[label in labels for labels in unusable["labels"]]]
    if mine.empty:
        return ""
    first = "; ".join(f"line {row} {image}: {str(reason).rsplit(' -- ', 1)[0].split(': ', 1)[-1]}"
                      for row, image, reason in mine[["row", "image", "reason"]].head(3).itertuples(index=False))
    return f", {len(mine)} training image(s) skipped as unusable ({first})"


def check_label_coverage(splits: dict[str, pd.DataFrame], everything: pd.DataFrame, vocabulary: Sequence[str],
                         allow_absent: bool, csv_path: Path, notes: list[str], unusable: pd.DataFrame) -> list[str]:
    """Labels of the vocabulary without a training image: an error, or (opted in) the list of labels
    to leave out of generation and of the table. A label without test images gets a note.
    `unusable`: rows skipped as bad images (row, image, labels, split, reason); counted as images of
    the label file, and the training ones named in the error."""
    in_file = Counter(label for labels in [*everything["labels"], *unusable["labels"]] for label in labels)
    train = label_counts(splits["train"])
    absent = [label for label in vocabulary if label not in train]
    if absent and not allow_absent:
        train_unusable = unusable[unusable["split"] == "train"]
        where = ", ".join(f"{label}: {in_file[label]} image(s) in the label file{_skipped_as_bad(label, train_unusable)}"
                          for label in absent)
        raise DataError(
            f"{csv_path}: label(s) {absent} of dataset.labels have no training image ({where}); the LoRA would "
            "never see their prompt and the classifier could not learn them. Remove them from dataset.labels, add "
            "images, or set dataset.allow_absent_labels: true to leave them out of generation and of the table"
        )
    if absent:
        note(f"labels without a training image, left out of generation and of the table: {absent}", notes)
    untested = [label for label in vocabulary if label not in label_counts(splits["test"]) and label not in absent]
    if untested:
        note(f"labels without a test image (no AUROC can be computed for them): {untested}", notes)
    return absent


def prepare(config: dict[str, Any], out_dir: Path, workers: int | None = None) -> dict[str, Any]:
    """Run the whole data stage and write the split CSVs, skip report and summary to `out_dir`.
    `workers`: processes decoding images (None: all cores)."""
    dataset = config["dataset"]
    csv_path, root = Path(dataset["csv"]), Path(dataset["images"])
    vocabulary, policy = dataset["labels"], dataset["on_bad_image"]
    notes: list[str] = []

    frame, skipped_by_policy = read_dataset(dataset, notes)
    if frame.empty:
        raise _all_unusable(skipped_by_policy, out_dir)
    frame = check_rows(frame, vocabulary, csv_path)
    paths, reasons = resolve_paths(frame, root, search_by_name=FORMATS[dataset["format"]].search_by_name, csv_path=csv_path,
                                   allow_outside=dataset["allow_outside_paths"], notes=notes)
    frame["path"] = paths
    check_same_files(frame, csv_path)
    frame, skipped_missing = _leave_out(frame, reasons, policy, root, csv_path)
    skipped = pd.concat([skipped_by_policy, skipped_missing], ignore_index=True)
    if frame.empty:
        raise _all_unusable(skipped, out_dir)

    frame["split"] = split_by_patient(frame, config["split"]["val_fraction"], config["split"]["test_fraction"], config["split"]["seed"])
    train = frame[frame["split"] == "train"].reset_index(drop=True)
    # The more_real control's patients leave the training split before balancing (and the LoRA).
    train, reserve = reserve_patients(train, more_real_ratio(config), config["split"]["seed"])
    rows_before_balance = len(train)
    counts_before_balance = dict(Counter(label for labels in train["labels"] for label in labels))
    train = balance_training(train, config["balance"]["max_per_label"], config["balance"]["seed"])
    frame = pd.concat([train, reserve, frame[frame["split"] != "train"]], ignore_index=True)
    # Only images that will be used are decoded: a balanced draw from 112k NIH images stays fast.
    checked = check_images(frame["path"].tolist(), dataset["image_check"] == "decode", dataset["min_image_side"], workers)
    reasons = [reason for reason, _ in checked]
    unusable = frame.assign(reason=reasons)[[reason is not None for reason in reasons]]
    frame, skipped_images = _leave_out(frame, reasons, policy, root, csv_path)
    check_same_content(frame, [digest for reason, digest in checked if reason is None], csv_path)
    skipped = pd.concat([skipped, skipped_images], ignore_index=True)
    if frame.empty:
        raise _all_unusable(skipped, out_dir)

    frame["path"] = frame["path"].map(str)
    frame["prompt"] = [make_prompt(labels, config["prompt"]["template"]) for labels in frame["labels"]]
    label_lists = frame["labels"]
    frame["labels"] = [LABEL_JOIN.join(labels) for labels in label_lists]
    columns = SPLIT_COLUMNS + [column for column in DEMOGRAPHIC_COLUMNS if column in frame.columns]
    splits = {name: frame[frame["split"] == name][columns].reset_index(drop=True) for name in SPLITS}
    assert_patient_disjoint(splits)
    for name in ("train", "test", "val"):
        if splits[name].empty:
            raise DataError(split_failure(frame.assign(labels=label_lists), name, csv_path, len(skipped_images)))
    absent = check_label_coverage(splits, frame.assign(labels=label_lists), vocabulary, dataset["allow_absent_labels"],
                                  csv_path, notes, unusable)

    out_dir.mkdir(parents=True, exist_ok=True)
    for name, split in splits.items():
        split.to_csv(out_dir / f"{name}.csv", index=False)
    skipped.to_csv(out_dir / "skipped.csv", index=False)

    summary = {
        "dataset": {key: dataset[key] for key in ("format", "csv", "images")},
        "labels": vocabulary,
        "labels_absent": absent,
        "images": {name: len(split) for name, split in splits.items()},
        "patients": {name: int(split["patient"].nunique()) for name, split in splits.items()},
        "label_counts": {name: label_counts(split) for name, split in splits.items()},
        "label_counts_before_balance": {"train": counts_before_balance},
        "train_images_before_balance": rows_before_balance,
        "demographics": [column for column in DEMOGRAPHIC_COLUMNS if column in frame.columns],
        "skipped": len(skipped),
        "notes": notes,
        "seeds": {"split": config["split"]["seed"], "balance": config["balance"]["seed"]},
        "config_hash": result_hash(config, "prepare_dataset"),
    }
    (out_dir / "prepare_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


@run_stage
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--out-dir", default=paths.DATA, type=Path, help="where the split CSVs go")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes decoding images (default: all cores; the rule passes its threads)")
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers: {args.workers} is less than 1")
    summary = prepare(config_from_args(args, "prepare_dataset"), args.out_dir, args.workers)
    images, patients = summary["images"], summary["patients"]
    print("prepared: " + ", ".join(f"{name} {images[name]} images / {patients[name]} patients" for name in SPLITS)
          + f"; skipped {summary['skipped']} (see {args.out_dir / 'skipped.csv'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
