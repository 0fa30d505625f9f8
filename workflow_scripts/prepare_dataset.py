"""Data stage: read a chest X-ray dataset, check it, split it by patient, balance, write prompts.

    python -m workflow_scripts.prepare_dataset --config config/config.yaml --out-dir results/data

Reads NIH ChestX-ray14 (`Data_Entry_2017.csv`), CheXpert (`train.csv`) or a generic CSV into one
frame (path, labels, patient), refuses bad input with the file/row at fault (or skips it and
reports it, with `dataset.on_bad_image: skip`), splits patients into train/val/test, optionally caps
the training images per label, and writes `{train,val,test}.csv` with path, labels, prompt, patient
and split. The user's dataset is only ever read.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from workflow_scripts.config import ConfigError, add_config_arguments, config_from_args, config_hash
from workflow_scripts.images import check_image

SPLITS = ("train", "val", "test")
SPLIT_COLUMNS = ["path", "labels", "prompt", "patient", "split"]
SKIP_COLUMNS = ["source", "row", "path", "reason"]
LABEL_JOIN = "|"  # labels within a cell of our own CSVs
NIH_COLUMNS = ("Image Index", "Finding Labels", "Patient ID")
CHEXPERT_PATIENT = re.compile(r"(patient\d+)")


class DataError(ValueError):
    """The dataset cannot be used as it is; the message names the file and row at fault."""


# ----------------------------------------------------------------------------- reading


def read_csv_checked(csv_path: Path, required: Sequence[str], what: str, hint: str = "") -> pd.DataFrame:
    """A CSV as strings, refused with the file named when missing, empty, unreadable or short of
    `required` columns (`hint` says which format was expected)."""
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: {what} not found{hint}")
    try:
        frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{csv_path}: the file is empty (expected a header and one row per image)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise DataError(f"{csv_path}: not a readable CSV ({error})") from None
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise DataError(f"{csv_path}: missing column(s) {missing}; found {list(frame.columns)}{hint}")
    return frame


def _read_label_file(csv_path: Path, required: Sequence[str], format_name: str) -> pd.DataFrame:
    frame = read_csv_checked(csv_path, required, "label file (dataset.csv)",
                             f". dataset.format '{format_name}' expects {list(required)}")
    if frame.empty:
        raise DataError(f"{csv_path}: no rows below the header")
    # Line numbers as a user sees them in an editor: header is line 1.
    frame.insert(0, "row", np.arange(2, len(frame) + 2))
    return frame


def _split_labels(cell: str, separator: str) -> list[str]:
    return [label.strip() for label in cell.split(separator) if label.strip()]


def read_nih(csv_path: Path) -> pd.DataFrame:
    frame = _read_label_file(csv_path, NIH_COLUMNS, "nih")
    return pd.DataFrame({
        "row": frame["row"],
        "image": frame["Image Index"].str.strip(),
        "labels": [_split_labels(cell, "|") for cell in frame["Finding Labels"]],
        "patient": frame["Patient ID"].str.strip(),
    })


def read_chexpert(
    csv_path: Path, vocabulary: Sequence[str], uncertain_policy: str, frontal_only: bool
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """CheXpert: one column per observation, 1 positive, 0 negative, -1 uncertain, blank unmentioned."""
    frame = _read_label_file(csv_path, ["Path", *vocabulary], "chexpert")
    skipped = []
    keep = np.ones(len(frame), dtype=bool)
    if frontal_only and "Frontal/Lateral" in frame.columns:
        lateral = frame["Frontal/Lateral"].str.strip().str.lower() != "frontal"
        keep &= ~lateral.to_numpy()  # lateral views are filtered by design, not reported as bad
    labels_per_row = []
    for index, record in frame.iterrows():
        values = {label: record[label].strip() for label in vocabulary}
        bad = {label: value for label, value in values.items() if value not in ("", "1", "0", "-1", "1.0", "0.0", "-1.0")}
        if bad:
            raise DataError(f"{csv_path} line {record['row']}: unexpected value(s) {bad}; CheXpert uses 1, 0, -1 or blank")
        positive = [label for label, value in values.items() if value in ("1", "1.0")]
        uncertain = [label for label, value in values.items() if value in ("-1", "-1.0")]
        if uncertain and uncertain_policy == "positive":
            positive = [label for label in vocabulary if label in positive or label in uncertain]
        if uncertain and uncertain_policy == "exclude" and keep[index]:
            keep[index] = False
            skipped.append((record["row"], record["Path"], f"uncertain label(s) {uncertain} (dataset.uncertain_policy: exclude)"))
        if "No Finding" in positive and len(positive) > 1:
            positive.remove("No Finding")  # a finding wins over a contradictory "No Finding"
        if not positive and keep[index]:
            keep[index] = False
            skipped.append((record["row"], record["Path"], "no positive label in dataset.labels"))
        labels_per_row.append(positive)
    patients = [CHEXPERT_PATIENT.search(path) for path in frame["Path"]]
    result = pd.DataFrame({
        "row": frame["row"],
        "image": frame["Path"].str.strip(),
        "labels": labels_per_row,
        "patient": [match.group(1) if match else path for match, path in zip(patients, frame["Path"])],
    })[keep].reset_index(drop=True)
    return result, _skip_frame(csv_path, skipped)


def read_generic_csv(
    csv_path: Path, path_column: str, labels_column: str, separator: str, patient_column: str | None
) -> pd.DataFrame:
    required = [path_column, labels_column] + ([patient_column] if patient_column else [])
    frame = _read_label_file(csv_path, required, "csv")
    if patient_column is None:
        print("note: dataset.patient_column is null: every image counts as its own patient, so "
              "follow-up films of one patient may land in different splits", file=sys.stderr)
    return pd.DataFrame({
        "row": frame["row"],
        "image": frame[path_column].str.strip(),
        "labels": [_split_labels(cell, separator) for cell in frame[labels_column]],
        "patient": frame[patient_column].str.strip() if patient_column else frame[path_column].str.strip(),
    })


def _skip_frame(csv_path: Path, skipped: list[tuple[Any, str, str]]) -> pd.DataFrame:
    return pd.DataFrame(
        [(str(csv_path), row, path, reason) for row, path, reason in skipped], columns=SKIP_COLUMNS
    )


def read_dataset(dataset: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The configured label file as (frame with row, image, labels, patient; rows skipped by policy)."""
    csv_path = Path(dataset["csv"])
    skipped = _skip_frame(csv_path, [])
    if dataset["format"] == "nih":
        frame = read_nih(csv_path)
    elif dataset["format"] == "chexpert":
        frame, skipped = read_chexpert(csv_path, dataset["labels"], dataset["uncertain_policy"], dataset["frontal_only"])
    else:
        frame = read_generic_csv(
            csv_path, dataset["path_column"], dataset["labels_column"], dataset["label_separator"], dataset["patient_column"]
        )
    if frame.empty:
        raise DataError(f"{csv_path}: no usable rows (all {len(skipped)} rows skipped, see the skip report)")
    return frame, skipped


# ----------------------------------------------------------------------------- checks


def check_rows(frame: pd.DataFrame, vocabulary: Sequence[str], csv_path: Path) -> pd.DataFrame:
    """Labels in the vocabulary and in vocabulary order, no empty fields, no duplicate images."""
    known = set(vocabulary)
    order = {label: position for position, label in enumerate(vocabulary)}
    for record in frame.itertuples():
        where = f"{csv_path} line {record.row} ({record.image or 'no image name'})"
        if not record.image:
            raise DataError(f"{where}: empty image path")
        if not record.patient:
            raise DataError(f"{where}: empty patient id")
        if not record.labels:
            raise DataError(f"{where}: no label (use 'No Finding' for normal images if it is in dataset.labels)")
        unknown = [label for label in record.labels if label not in known]
        if unknown:
            raise DataError(
                f"{where}: unknown label(s) {unknown}; dataset.labels is {list(vocabulary)}. "
                "Add the label to dataset.labels or correct the row"
            )
        if "No Finding" in record.labels and len(record.labels) > 1:
            raise DataError(f"{where}: 'No Finding' together with findings {record.labels}")
        if len(set(record.labels)) != len(record.labels):
            raise DataError(f"{where}: a label is repeated: {record.labels}")
    duplicated = frame[frame["image"].duplicated(keep=False)]
    if not duplicated.empty:
        first = duplicated.iloc[0]["image"]
        rows = duplicated[duplicated["image"] == first]["row"].tolist()
        raise DataError(
            f"{csv_path}: image {first} is listed more than once (lines {rows}); "
            f"{duplicated['image'].nunique()} image(s) are duplicated. Keep one row per image"
        )
    frame = frame.copy()
    frame["labels"] = [sorted(labels, key=order.__getitem__) for labels in frame["labels"]]
    return frame


def resolve_paths(images: Sequence[str], root: Path) -> list[Path | None]:
    """Each image's file under `root`; names not found directly are looked up by file name anywhere
    below `root` (NIH ships its PNGs in images_001/images/ ... images_012/images/)."""
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found (dataset.images)")
    direct = [root / image for image in images]
    if all(path.is_file() for path in direct):
        return list(direct)
    by_name: dict[str, Path] = {}
    for folder, _, files in os.walk(root):
        for name in files:
            by_name.setdefault(name, Path(folder) / name)
    return [path if path.is_file() else by_name.get(Path(image).name) for path, image in zip(direct, images)]


def find_bad_images(paths: Sequence[Path | None], decode: bool, workers: int | None = None) -> list[str | None]:
    """The reason each image is unusable, or None. Decoding runs in threads (PIL releases the GIL)."""
    def reason(path: Path | None) -> str | None:
        if path is None:
            return "file not found"
        if not decode:
            return None if path.is_file() else "file not found"
        return check_image(path)

    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        return list(tqdm(pool.map(reason, paths), total=len(paths), desc="checking images", unit="img",
                         disable=len(paths) < 50, file=sys.stderr))


def drop_bad_images(
    frame: pd.DataFrame, root: Path, on_bad_image: str, image_check: str, csv_path: Path
) -> tuple[pd.DataFrame, pd.DataFrame]:
    paths = resolve_paths(frame["image"].tolist(), root)
    reasons = find_bad_images(paths, decode=image_check == "decode")
    bad = [(row, image, reason) for row, image, reason in zip(frame["row"], frame["image"], reasons) if reason]
    if bad and on_bad_image == "error":
        row, image, reason = bad[0]
        raise DataError(
            f"{csv_path} line {row}: image {image} under {root}: {reason}. {len(bad)} image(s) are unusable; "
            "fix them, or set dataset.on_bad_image: skip to leave them out with a report"
        )
    frame = frame.assign(path=[str(path) if path else "" for path in paths])
    frame = frame[[reason is None for reason in reasons]].reset_index(drop=True)
    return frame, _skip_frame(csv_path, bad)


# ----------------------------------------------------------------------------- split, balance, prompts


def split_by_patient(frame: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int) -> pd.Series:
    """Assign every patient (so all of their images) to one split.

    Patients are grouped by their rarest label and each group is divided in the requested
    proportions, so rare labels reach val and test too instead of landing there by chance.
    """
    label_counts = Counter(label for labels in frame["labels"] for label in labels)
    patient_labels: dict[str, set[str]] = {}
    for patient, labels in zip(frame["patient"], frame["labels"]):
        patient_labels.setdefault(patient, set()).update(labels)
    groups: dict[str, list[str]] = {}
    for patient in sorted(patient_labels):
        rarest = min(patient_labels[patient], key=lambda label: (label_counts[label], label))
        groups.setdefault(rarest, []).append(patient)

    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    for label in sorted(groups):
        patients = list(rng.permutation(groups[label]))
        n = len(patients)
        n_test = int(round(n * test_fraction))
        n_val = int(round(n * val_fraction))
        if n >= 3:  # every group big enough gets at least one test and (if asked) one val patient
            n_test = max(n_test, 1)
            n_val = max(n_val, 1 if val_fraction > 0 else 0)
        for position, patient in enumerate(patients):
            assignment[patient] = "test" if position < n_test else "val" if position < n_test + n_val else "train"
    return frame["patient"].map(assignment)


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


def make_prompt(labels: Sequence[str], template: str = "A chest X-ray with {labels}") -> str:
    """`["Fibrosis", "Pneumonia"]` -> "A chest X-ray with Fibrosis and Pneumonia" (labels already in vocabulary order)."""
    return template.format(labels=" and ".join(labels))


def assert_patient_disjoint(splits: dict[str, pd.DataFrame]) -> None:
    """Raise DataError naming a patient found in two splits."""
    seen: dict[str, str] = {}
    for name, frame in splits.items():
        for patient in frame["patient"].astype(str).unique():
            if patient in seen and seen[patient] != name:
                raise DataError(
                    f"patient {patient} is in both the {seen[patient]} and the {name} split: "
                    "test results would leak; re-run prepare_dataset"
                )
            seen[patient] = name


# ----------------------------------------------------------------------------- the stage


def prepare(config: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Run the whole data stage and write the split CSVs, skip report and summary to `out_dir`."""
    dataset = config["dataset"]
    csv_path, root = Path(dataset["csv"]), Path(dataset["images"])
    vocabulary = dataset["labels"]

    frame, skipped_by_policy = read_dataset(dataset)
    frame = check_rows(frame, vocabulary, csv_path)
    frame["split"] = split_by_patient(frame, config["split"]["val_fraction"], config["split"]["test_fraction"], config["split"]["seed"])
    rows_before_balance = int((frame["split"] == "train").sum())
    train = balance_training(frame[frame["split"] == "train"].reset_index(drop=True), config["balance"]["max_per_label"], config["balance"]["seed"])
    frame = pd.concat([train, frame[frame["split"] != "train"]], ignore_index=True)
    # Only images that will be used are decoded: a balanced draw from 112k NIH images stays fast.
    frame, skipped_images = drop_bad_images(frame, root, dataset["on_bad_image"], dataset["image_check"], csv_path)

    frame["prompt"] = [make_prompt(labels, config["prompt"]["template"]) for labels in frame["labels"]]
    frame["labels"] = [LABEL_JOIN.join(labels) for labels in frame["labels"]]
    splits = {name: frame[frame["split"] == name][SPLIT_COLUMNS].reset_index(drop=True) for name in SPLITS}
    assert_patient_disjoint(splits)
    if splits["train"].empty or splits["test"].empty:
        raise DataError(f"{csv_path}: too few usable patients to split ({frame['patient'].nunique()}); need at least 3")

    out_dir.mkdir(parents=True, exist_ok=True)
    for name, split in splits.items():
        split.to_csv(out_dir / f"{name}.csv", index=False)
    skipped = pd.concat([skipped_by_policy, skipped_images], ignore_index=True)
    skipped.to_csv(out_dir / "skipped.csv", index=False)

    summary = {
        "dataset": {key: dataset[key] for key in ("format", "csv", "images")},
        "labels": vocabulary,
        "images": {name: len(split) for name, split in splits.items()},
        "patients": {name: int(split["patient"].nunique()) for name, split in splits.items()},
        "label_counts": {name: label_counts(split) for name, split in splits.items()},
        "train_images_before_balance": rows_before_balance,
        "skipped": len(skipped),
        "seeds": {"split": config["split"]["seed"], "balance": config["balance"]["seed"]},
        "config_hash": config_hash({key: config[key] for key in ("dataset", "split", "balance", "prompt")}),
    }
    (out_dir / "prepare_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def label_counts(split: pd.DataFrame) -> dict[str, int]:
    return dict(Counter(label for labels in split["labels"] for label in labels.split(LABEL_JOIN)))


def load_split(data_dir: str | Path, split: str) -> pd.DataFrame:
    """One split as written by `prepare`, checked to hold only that split. Training code reads its
    data through this (with split='train'), so a val or test image cannot reach a model."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    path = Path(data_dir) / f"{split}.csv"
    frame = read_csv_checked(path, SPLIT_COLUMNS, f"{split} split", "; run (or re-run) the prepare_dataset rule")
    wrong = frame[frame["split"] != split]
    if not wrong.empty:
        raise DataError(f"{path} line {wrong.index[0] + 2}: row of split {wrong.iloc[0]['split']!r} in the {split} file")
    return frame


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--out-dir", default="results/data", type=Path, help="where the split CSVs go")
    args = parser.parse_args(argv)
    try:
        summary = prepare(config_from_args(args, "prepare_dataset"), args.out_dir)
    except (DataError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    images, patients = summary["images"], summary["patients"]
    print("prepared: " + ", ".join(f"{name} {images[name]} images / {patients[name]} patients" for name in SPLITS)
          + f"; skipped {summary['skipped']} (see {args.out_dir / 'skipped.csv'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
