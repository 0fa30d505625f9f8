"""Reading label files (NIH ChestX-ray14, CheXpert, generic CSV) into one checked frame.

Every reader returns one row per image with `row` (the line in the user's file, header = line 1),
`image` (the path as written), `labels` (list), `patient`, and `sex` / `age` where the source has
them. Bad rows raise `DataError` naming the file, line and value at fault.
"""

from __future__ import annotations

import csv
import re
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from workflow_scripts.common.errors import DataError
from workflow_scripts.common.label_text import looks_like, shown, shown_list

SKIP_COLUMNS = ["source", "row", "path", "reason"]
NIH_COLUMNS = ("Image Index", "Finding Labels", "Patient ID")
NIH_DEMOGRAPHICS = ("Patient Gender", "Patient Age")
CHEXPERT_DEMOGRAPHICS = ("Sex", "Age")
CHEXPERT_PATIENT = re.compile(r"patient(\d+)")  # a whole path component: patient00001
CHEXPERT_VIEW = re.compile(r"_(frontal|lateral)\.[a-z]+$", re.IGNORECASE)  # view1_frontal.jpg
NIH_IMAGE_NAME = re.compile(r"^(\d+)_\d+\.png$", re.IGNORECASE)  # 00000075_000.png: patient 75, film 0
DEMOGRAPHIC_COLUMNS = ("sex", "age")
NO_FINDING = "No Finding"
SUPPORT_DEVICES = "Support Devices"  # a CheXpert observation that is no pathology
# Spellings of "no value" that pandas, R, Excel and hand edits leave in id cells: as empty as a blank.
MISSING_SPELLINGS = frozenset({"nan", "none", "null", "na", "n/a", "#n/a", "nil", "<na>", "nat", "-", "?"})


def note(message: str, notes: list[str] | None) -> None:
    """A warning the user should see (stderr) and that the summary keeps."""
    print(f"note: {message}", file=sys.stderr)
    if notes is not None:
        notes.append(message)


# ----------------------------------------------------------------------------- CSV


def read_csv_checked(
    csv_path: Path, required: Sequence[str], what: str, hint: str = "", keep_blank_lines: bool = False
) -> pd.DataFrame:
    """A CSV as strings, refused with the file named when missing, a folder, empty, unreadable or
    short of `required` columns (`hint` says which format was expected). With `keep_blank_lines`,
    blank lines stay as rows of empty strings, so row i is line i + 2 of the file."""
    if csv_path.is_dir():
        raise DataError(f"{csv_path}: is a folder, not a CSV file ({what}); point it at the file itself")
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: {what} not found{hint}")
    above = leading_blank_lines(csv_path)
    try:
        frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False, skip_blank_lines=not keep_blank_lines,
                            skiprows=above)
    except pd.errors.EmptyDataError:
        raise DataError(f"{csv_path}: the file is empty (expected a header and one row per image)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise DataError(f"{csv_path}: not a readable CSV ({error})") from None
    header = _header(csv_path)
    missing = [column for column in required if column not in header]
    if missing:
        lookalikes = [f"{shown(column)} is not {shown(twin)}" for column in missing if (twin := looks_like(column, header))]
        raise DataError(f"{csv_path}: missing column(s) {shown_list(missing)}; found {shown_list(header)}{hint}"
                        + (f" (a column only looks like it: {'; '.join(lookalikes)})" if lookalikes else ""))
    twice = sorted({column for column, count in Counter(header).items() if count > 1 and column in required})
    if twice:  # pandas would rename the second one 'x.1' and read the first without a word
        where = "; ".join(f"{column!r} in columns {[i + 1 for i, name in enumerate(header) if name == column]}"
                          for column in twice)
        raise DataError(f"{csv_path}: header names a column it reads more than once ({where}); which one holds the "
                        "data is unknown. Rename or remove the extra column")
    return frame


def leading_blank_lines(csv_path: Path) -> int:
    """How many blank (or whitespace-only) lines come before the header: they are skipped like every
    blank line, and the header is the line after them."""
    count = 0
    with open(csv_path, encoding="utf-8-sig", errors="replace", newline="") as handle:
        for line in handle:
            if line.strip():
                break
            count += 1
    return count


def _header(csv_path: Path) -> list[str]:
    """The header row as written (pandas renames a repeated name 'x' to 'x.1')."""
    with open(csv_path, encoding="utf-8-sig", errors="replace", newline="") as handle:
        for _ in range(leading_blank_lines(csv_path)):
            handle.readline()
        return next(csv.reader(handle), [])


def record_lines(csv_path: Path) -> list[int]:
    """The line each data record starts on (the file's first line is line 1; blank lines before the
    header are skipped, blank lines after it counted as records, as pandas reads them with
    skip_blank_lines=False): a quoted cell holding a newline spans lines."""
    above = leading_blank_lines(csv_path)
    with open(csv_path, encoding="utf-8-sig", errors="replace", newline="") as handle:
        for _ in range(above):
            handle.readline()
        reader = csv.reader(handle)
        next(reader, None)
        starts, end = [], above + reader.line_num
        for _ in reader:
            starts.append(end + 1)
            end = above + reader.line_num
    return starts


def _read_label_file(csv_path: Path, required: Sequence[str], format_name: str, notes: list[str] | None) -> pd.DataFrame:
    frame = read_csv_checked(csv_path, required, "label file (dataset.csv)",
                             f". dataset.format '{format_name}' expects {list(required)}", keep_blank_lines=True)
    # Line numbers as a user sees them in an editor (the file's first line is line 1), counted before blank lines
    # are dropped and across quoted newlines, so that messages point at the right line. (Should the
    # csv module and pandas ever count records differently, rows fall back to index + 2.)
    lines, above = record_lines(csv_path), leading_blank_lines(csv_path)
    if above:
        note(f"{csv_path}: {above} blank line(s) before the header ignored (the header is line {above + 1})", notes)
    frame.insert(0, "row", lines if len(lines) == len(frame) else np.arange(above + 2, above + len(frame) + 2))
    blank = (frame.drop(columns="row").apply(lambda column: column.str.strip()) == "").all(axis=1)
    if blank.any():
        inner = frame["row"][blank & (frame.index < np.flatnonzero(~blank).max(initial=-1))].tolist()
        if inner:
            note(f"{csv_path}: {len(inner)} blank line(s) ignored (first: line {inner[0]})", notes)
        frame = frame[~blank].reset_index(drop=True)
    if frame.empty:
        raise DataError(f"{csv_path}: no rows below the header")
    return frame


def _split_labels(cell: str, separator: str) -> list[str]:
    return [label.strip() for label in cell.split(separator) if label.strip()]


# ----------------------------------------------------------------------------- demographics


def normalise_sex(value: str) -> str:
    """'M' / 'F' from M, F, Male, Female (any case); '' when unknown or anything else."""
    value = str(value).strip().lower()
    return {"m": "M", "male": "M", "f": "F", "female": "F"}.get(value, "")


def normalise_age(value: str) -> str:
    """Integer years as text ('68', from 68, 68.0 or NIH's older '068Y'); '' when unknown or out of
    0..120 (the NIH file holds a few impossible ages such as 412)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*[yY]?\s*", str(value))
    if not match:
        return ""
    years = int(float(match.group(1)))
    return str(years) if 0 <= years <= 120 else ""


def _demographics(frame: pd.DataFrame, sex_column: str | None, age_column: str | None) -> dict[str, list[str]]:
    columns = {}
    if sex_column and sex_column in frame.columns:
        columns["sex"] = [normalise_sex(value) for value in frame[sex_column]]
    if age_column and age_column in frame.columns:
        columns["age"] = [normalise_age(value) for value in frame[age_column]]
    return columns


# ----------------------------------------------------------------------------- formats


def _nih_patient(csv_path: Path, row: int, image: str, patient_id: str) -> str:
    """The NIH patient id as a number without leading zeros (`00029548` and `29548` are one
    patient), cross-checked with the patient number in the image name."""
    if is_missing(patient_id):
        return patient_id  # refused by check_rows like an empty id
    if not re.fullmatch(r"\d+", patient_id):
        raise DataError(f"{csv_path} line {row} ({image}): Patient ID {patient_id!r} is not a number; "
                        "NIH patient ids are numeric")
    patient = str(int(patient_id))
    match = NIH_IMAGE_NAME.match(Path(image).name)
    if match and str(int(match.group(1))) != patient:
        raise DataError(f"{csv_path} line {row} ({image}): the image name says patient {int(match.group(1))} "
                        f"but Patient ID is {patient_id}; correct the row")
    return patient


def is_missing(value: str) -> bool:
    """An empty cell or a spelling of "no value" (NaN, None, null, NA, ...), any case."""
    return not value.strip() or value.strip().lower() in MISSING_SPELLINGS


def _without_zeros(patient: str) -> str:
    """'007' -> '7', 'P-0042' -> 'P-42': every run of digits as its number; '12.0' -> '12' too (a
    spreadsheet's round trip writes the id 12 as the float 12.0, the same patient spelled otherwise)."""
    whole = re.fullmatch(r"(\d+)\.0+", patient)
    return re.sub(r"\d+", lambda match: str(int(match.group())), whole.group(1) if whole else patient)


def generic_patients(csv_path: Path, rows: Sequence[int], ids: Sequence[str], zeros: str) -> list[str]:
    """Generic-CSV patient ids under dataset.patient_id_zeros: `merge` reads ids that differ only by
    leading zeros (007, 7) as one patient, `keep` as two, `refuse` stops naming both spellings."""
    if zeros == "merge":
        return [patient if is_missing(patient) else _without_zeros(patient) for patient in ids]
    if zeros == "refuse":
        spellings: dict[str, dict[str, int]] = {}
        for row, patient in zip(rows, ids):
            if not is_missing(patient):
                spellings.setdefault(_without_zeros(patient), {}).setdefault(patient, row)
        clash = next((found for found in spellings.values() if len(found) > 1), None)
        if clash:
            shown = ", ".join(f"{patient!r} (line {row})" for patient, row in clash.items())
            raise DataError(f"{csv_path}: patient ids {shown} differ only by leading zeros (or a trailing .0); whether they are one "
                            "patient is unknown. Set dataset.patient_id_zeros: merge (one patient) or keep (two "
                            "patients), or correct the ids")
    return list(ids)


def read_nih(csv_path: Path, notes: list[str] | None = None) -> pd.DataFrame:
    frame = _read_label_file(csv_path, NIH_COLUMNS, "nih", notes)
    images = frame["Image Index"].str.strip()
    return pd.DataFrame({
        "row": frame["row"],
        "image": images,
        "labels": [_split_labels(cell, "|") for cell in frame["Finding Labels"]],
        "patient": [_nih_patient(csv_path, row, image, patient.strip()) if patient.strip() else ""
                    # (blank or a missing-value spelling: refused by check_rows)
                    for row, image, patient in zip(frame["row"], images, frame["Patient ID"])],
        **_demographics(frame, *NIH_DEMOGRAPHICS),
    })


def _chexpert_labels(
    csv_path: Path, record: pd.Series, vocabulary: Sequence[str], uncertain_policy: str
) -> tuple[list[str], list[str]]:
    """(positive labels, uncertain labels) of one CheXpert row."""
    values = {label: record[label].strip() for label in vocabulary}
    bad = {label: value for label, value in values.items() if value not in ("", "1", "0", "-1", "1.0", "0.0", "-1.0")}
    if bad:
        raise DataError(f"{csv_path} line {record['row']}: unexpected value(s) {bad}; CheXpert uses 1, 0, -1 or blank")
    positive = [label for label, value in values.items() if value in ("1", "1.0")]
    uncertain = [label for label, value in values.items() if value in ("-1", "-1.0")]
    if uncertain and uncertain_policy == "positive":
        positive = [label for label in vocabulary if label in positive or label in uncertain]
    if NO_FINDING in positive and len(positive) > 1:
        # CheXpert marks No Finding only where no pathology is positive or uncertain; Support Devices
        # is no pathology, so "No Finding" beside it stands (the device is the label). Beside a finding
        # the row contradicts itself: which one is true is unknown.
        findings = [label for label in positive if label not in (NO_FINDING, SUPPORT_DEVICES)]
        if findings:
            raise DataError(f"{csv_path} line {record['row']} ({record['Path'].strip()}): 'No Finding' is positive "
                            f"together with finding(s) {findings}; which is true is unknown. Correct the row (No Finding "
                            "blank or 0, or the findings)")
        positive.remove(NO_FINDING)
    return positive, uncertain


def _chexpert_view(csv_path: Path, row: int, path: str, view: str) -> str:
    """'frontal' or 'lateral': the Frontal/Lateral cell, or where it is blank the file name
    (view1_frontal.jpg); neither says it: refused, since the row can be neither kept nor left out."""
    view = view.strip().lower() or ("" if not CHEXPERT_VIEW.search(path.strip()) else
                                    CHEXPERT_VIEW.search(path.strip()).group(1).lower())
    if view not in ("frontal", "lateral"):
        raise DataError(f"{csv_path} line {row} ({path.strip()}): Frontal/Lateral is {view or 'blank'!r} and the file "
                        "name does not say the view (..._frontal.jpg / ..._lateral.jpg); write Frontal or Lateral, "
                        "or set dataset.frontal_only: false")
    return view


def chexpert_patient_folder(path: str) -> re.Match[str] | None:
    """The match of the path's last component that is exactly `patientNNNNN` (CheXpert's
    .../patient00001/study1/view1_frontal.jpg), or None. The last, and whole: a folder above the
    tree (`/data/patient2_backup/CheXpert-v1.0/...`) must not make every film patient 2."""
    parts = re.split(r"[\\/]", path)
    return next((match for part in reversed(parts) if (match := CHEXPERT_PATIENT.fullmatch(part))), None)


def read_chexpert(
    csv_path: Path, vocabulary: Sequence[str], uncertain_policy: str, frontal_only: bool,
    notes: list[str] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """CheXpert: one column per observation, 1 positive, 0 negative, -1 uncertain, blank unmentioned.

    An image with no positive label of the vocabulary is a negative: it keeps its place (in val and
    test too) labelled "No Finding" when that label is in the vocabulary, and is skipped with a
    report otherwise. Lateral views are left out by design with `frontal_only` (counted in a note)."""
    frame = _read_label_file(csv_path, ["Path", *vocabulary], "chexpert", notes)
    skipped = []
    keep = np.ones(len(frame), dtype=bool)
    if frontal_only and "Frontal/Lateral" in frame.columns:
        keep &= np.array([_chexpert_view(csv_path, row, path, view) == "frontal"
                          for row, path, view in zip(frame["row"], frame["Path"], frame["Frontal/Lateral"])])
        if (~keep).any():
            note(f"{csv_path}: {int((~keep).sum())} of {len(frame)} rows are lateral views, left out "
                 "(dataset.frontal_only: true)", notes)
    if not keep.any():
        raise DataError(f"{csv_path}: all {len(frame)} rows are lateral views (column Frontal/Lateral) and "
                        "dataset.frontal_only is true, so no image is left; set dataset.frontal_only: false "
                        "or use a label file with frontal views")
    labels_per_row = []
    for index, record in frame.iterrows():
        positive, uncertain = _chexpert_labels(csv_path, record, vocabulary, uncertain_policy)
        if uncertain and uncertain_policy == "exclude" and keep[index]:
            keep[index] = False
            skipped.append((record["row"], record["Path"], f"uncertain label(s) {uncertain} (dataset.uncertain_policy: exclude)"))
        if not positive and NO_FINDING in vocabulary:
            positive = [NO_FINDING]  # a negative for every label of the vocabulary
        if not positive and keep[index]:
            keep[index] = False
            reason = "no positive label in dataset.labels and 'No Finding' is not in dataset.labels (add it to keep negatives)"
            skipped.append((record["row"], record["Path"], reason))
        labels_per_row.append(positive)
    paths = frame["Path"].str.strip()
    matches = [chexpert_patient_folder(path) for path in paths]
    orphans = [row for row, match, kept in zip(frame["row"], matches, keep) if kept and not match]
    if orphans:
        note(f"{csv_path}: {len(orphans)} path(s) have no patientNNNNN folder (first: line {orphans[0]}); each "
             "counts as its own patient, so follow-up films of one patient may land in different splits", notes)
    result = pd.DataFrame({
        "row": frame["row"],
        "image": paths,
        "labels": labels_per_row,
        # patient1 and patient00001 are one patient: written as CheXpert writes them, five digits.
        "patient": [f"patient{int(match.group(1)):05d}" if match else path for match, path in zip(matches, paths)],
        **_demographics(frame, *CHEXPERT_DEMOGRAPHICS),
    })[keep].reset_index(drop=True)
    return result, skip_frame(csv_path, skipped)


def read_generic_csv(csv_path: Path, dataset: dict[str, Any], notes: list[str] | None = None) -> pd.DataFrame:
    path_column, labels_column, patient_column = dataset["path_column"], dataset["labels_column"], dataset["patient_column"]
    if patient_column is None and not dataset["allow_missing_patient"]:
        raise DataError(
            f"{csv_path}: dataset.patient_column is null, so films of one patient could land in both train "
            "and test. Name the patient id column in dataset.patient_column, or set "
            "dataset.allow_missing_patient: true to count every image as its own patient"
        )
    if patient_column is not None and patient_column == path_column and not dataset["allow_missing_patient"]:
        raise DataError(
            f"{csv_path}: dataset.patient_column and dataset.path_column both name {path_column!r}, so every image "
            "would be its own patient and follow-up films could land in both train and test. Name the patient id "
            "column, or set dataset.allow_missing_patient: true to accept one patient per image"
        )
    optional = [dataset[key] for key in ("sex_column", "age_column") if dataset.get(key)]
    required = [path_column, labels_column] + ([patient_column] if patient_column else []) + optional
    frame = _read_label_file(csv_path, required, "csv", notes)
    if patient_column is None or patient_column == path_column:
        note("dataset.allow_missing_patient: every image counts as its own patient, so follow-up films "
             "of one patient may land in different splits", notes)
    images = frame[path_column].str.strip()
    return pd.DataFrame({
        "row": frame["row"],
        "image": images,
        "labels": [_split_labels(cell, dataset["label_separator"]) for cell in frame[labels_column]],
        "patient": generic_patients(csv_path, frame["row"], frame[patient_column].str.strip(), dataset["patient_id_zeros"])
        if patient_column and patient_column != path_column else images,
        **_demographics(frame, dataset.get("sex_column"), dataset.get("age_column")),
    })


def skip_frame(csv_path: Path, skipped: list[tuple[Any, str, str]]) -> pd.DataFrame:
    return pd.DataFrame(
        [(str(csv_path), row, path, reason) for row, path, reason in skipped], columns=SKIP_COLUMNS
    )


@dataclass(frozen=True)
class LabelFormat:
    """A `dataset.format`: `read(label file, the dataset section, notes)` returns (frame with row,
    image, labels, patient[, sex, age]; rows skipped by policy). `search_by_name`: an image not at its
    listed path is looked for by file name under dataset.images (NIH's images_0xx/images folders)."""

    read: Callable[[Path, dict[str, Any], list[str] | None], tuple[pd.DataFrame, pd.DataFrame]]
    search_by_name: bool = False


# A new format is one entry here plus the `dataset.format` enum in the schema (docs/extending.md).
FORMATS: dict[str, LabelFormat] = {
    "nih": LabelFormat(lambda path, dataset, notes: (read_nih(path, notes), skip_frame(path, [])), search_by_name=True),
    "chexpert": LabelFormat(lambda path, dataset, notes: read_chexpert(path, dataset["labels"], dataset["uncertain_policy"],
                                                                       dataset["frontal_only"], notes)),
    "csv": LabelFormat(lambda path, dataset, notes: (read_generic_csv(path, dataset, notes), skip_frame(path, []))),
}


def read_dataset(dataset: dict[str, Any], notes: list[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The configured label file, read by its format's entry in FORMATS."""
    return FORMATS[dataset["format"]].read(Path(dataset["csv"]), dataset, notes)


# ----------------------------------------------------------------------------- row checks


def check_rows(frame: pd.DataFrame, vocabulary: Sequence[str], csv_path: Path) -> pd.DataFrame:
    """Labels in the vocabulary and in vocabulary order, no empty fields, no image listed twice."""
    known = set(vocabulary)
    order = {label: position for position, label in enumerate(vocabulary)}
    for record in frame.itertuples():
        where = f"{csv_path} line {record.row} ({record.image or 'no image name'})"
        if not record.image:
            raise DataError(f"{where}: empty image path")
        if is_missing(record.patient):
            spelled = f" ({record.patient!r}, a spelling of 'no value')" if record.patient.strip() else ""
            raise DataError(f"{where}: empty patient id{spelled}; every film needs its patient's id")
        if not record.labels:
            raise DataError(f"{where}: no label (use 'No Finding' for normal images if it is in dataset.labels)")
        unknown = [label for label in record.labels if label not in known]
        if unknown:
            lookalikes = [f"{shown(label)} is not {shown(twin)}" for label in unknown
                          if (twin := looks_like(label, vocabulary))]
            raise DataError(
                f"{where}: unknown label(s) {shown_list(unknown)}; dataset.labels is {shown_list(vocabulary)}. "
                + (f"It only looks like a label of dataset.labels: {'; '.join(lookalikes)}. " if lookalikes else "")
                + "Add the label to dataset.labels or correct the row"
            )
        if NO_FINDING in record.labels and len(record.labels) > 1:
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
