"""Our own tables: the split CSVs prepare_dataset writes, the synthetic image lists of generation,
and the values our JSON outputs hold.

Every stage reads its data through these, so the columns, the label separator and the checks
(a split file holds only its split; no patient or film in two splits; every listed image exists)
live in one place.
"""

from __future__ import annotations

import math
import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from workflow_scripts.common import paths
from workflow_scripts.common import config
from workflow_scripts.common.errors import DataError
from workflow_scripts.common.label_text import file_key  # noqa: F401 (re-exported: stages import it from here)
from workflow_scripts.common.labels import read_csv_checked

SPLITS = ("train", "val", "test", "reserve")  # reserve: patients kept for the more_real control (study.reserve_patients)
SPLIT_COLUMNS = ["path", "labels", "prompt", "patient", "split"]  # then sex, age where the source has them
LABEL_JOIN = config.LABEL_JOIN  # labels within a cell of our own CSVs (no label may contain it: config checks)
PROB_PREFIX = "prob_"  # predictions.csv (train_classifier): one column prob_<class> per class
RESULT_COLUMNS = ["file", "prompt", "labels", "seed", "steps", "guidance", "scheduler", "checkpoint", "dtype", "device"]


# ----------------------------------------------------------------------------- splits


def make_prompt(labels: Sequence[str], template: str = "A chest X-ray with {labels}") -> str:
    """`["Fibrosis", "Pneumonia"]` -> "A chest X-ray with Fibrosis and Pneumonia" (labels already in
    vocabulary order). The template is checked at config time (config.prompt_template_problem)."""
    return template.format(labels=" and ".join(labels))


def label_counts(split: pd.DataFrame) -> dict[str, int]:
    return dict(Counter(label for labels in split["labels"] for label in labels.split(LABEL_JOIN)))


# The split CSVs a stage reads: the files its rule names ({"train": path, ...}, as the CLIs' --train
# --val --test give them), or a folder holding train.csv, val.csv and test.csv (tests, notebooks).
Splits = Mapping[str, "str | Path"] | str | Path


def split_path(splits: Splits, split: str) -> Path:
    """The CSV of `split` among `splits`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if isinstance(splits, Mapping):
        if splits.get(split) is None:
            raise ValueError(f"no {split} split given (--{split})")
        return Path(splits[split])
    return Path(splits) / f"{split}.csv"


def add_split_arguments(parser: Any, splits: Sequence[str] = SPLITS) -> None:
    """--train/--val/--test: the split CSVs a stage reads (its rule names them)."""
    for name in splits:
        parser.add_argument(f"--{name}", type=Path, default=Path(paths.split_csv(name)),
                            help=f"the {name} split CSV (prepare_dataset)")


def splits_from_args(args: Any, splits: Sequence[str] = SPLITS) -> dict[str, Path]:
    return {name: getattr(args, name) for name in splits}


def load_split(splits: Splits, split: str) -> pd.DataFrame:
    """One split as written by `prepare`, checked to hold only that split. Training code reads its
    data through this (with split='train'), so a val or test image cannot reach a model."""
    path = split_path(splits, split)
    frame = read_csv_checked(path, SPLIT_COLUMNS, f"{split} split", "; run (or re-run) the prepare_dataset rule")
    wrong = frame[frame["split"] != split]
    if not wrong.empty:
        raise DataError(f"{path} line {wrong.index[0] + 2}: row of split {wrong.iloc[0]['split']!r} in the {split} file")
    return frame


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


def _identity(path: str) -> tuple[int, int] | str:
    """(device, inode) of a file, one for all its names (hard links too); its real path if it is gone."""
    try:
        info = os.stat(path)
    except OSError:
        return os.path.realpath(path)
    return info.st_dev, info.st_ino


def assert_files_disjoint(splits: dict[str, pd.DataFrame]) -> None:
    """Raise DataError naming a file (by device and inode, so hard links count) listed twice,
    within or across splits."""
    seen: dict[tuple[int, int] | str, tuple[str, str]] = {}
    for name, frame in splits.items():
        for path in frame["path"].astype(str):
            real = _identity(path)
            if real in seen:
                other_split, other_path = seen[real]
                raise DataError(f"{os.path.realpath(path)} is in the {other_split} split (as {other_path}) and in the {name} split "
                                f"(as {path}): one film listed twice; re-run prepare_dataset")
            seen[real] = (name, path)


# ----------------------------------------------------------------------------- synthetic images


def read_generation_results(csv_path: str | Path) -> pd.DataFrame:
    """A generation_results.csv with a `path` column added: each `file` as written (relative to the
    working directory) or, failing that, relative to the CSV's folder. Raises DataError naming the
    line of an image that is missing."""
    csv_path = Path(csv_path)
    frame = read_csv_checked(csv_path, ["file", "labels"], "synthetic image list", "; run the generation stage first")
    paths = []
    for line, file in enumerate(frame["file"], start=2):
        found = next((path for path in (Path(file), csv_path.parent / file) if path.is_file()), None)
        if found is None:
            raise DataError(f"{csv_path} line {line}: image {file} not found (also looked in {csv_path.parent})")
        paths.append(str(found))
    return frame.assign(path=paths)


def save_png_atomically(pixels: np.ndarray, path: Path) -> None:
    """8-bit grayscale PNG, written beside its final name and renamed: a kill leaves no truncated file."""
    partial = path.with_name(path.name + ".partial")
    Image.fromarray(pixels).save(partial, format="PNG")
    os.replace(partial, path)


def write_json_atomically(path: Path, value: Any) -> None:
    """`value` as strict JSON (json_safe) at `path`, written whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(json_safe(value), indent=2, allow_nan=False) + "\n")
    os.replace(partial, path)


def json_safe(value: Any) -> Any:
    """`value` with NaN and infinities as null (strict JSON has no NaN: a diverged fp16 loss, an
    undefined AUROC) and numpy scalars as Python numbers, through dicts, lists and tuples."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value
