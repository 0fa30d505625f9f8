"""What the page, the key and the answers share: the columns, the image ids and reading the key back.

The study id (a hash of the study's content) prefixes every image id, so answers given on another
study's page are recognised as such instead of being scored against the wrong key.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from workflow_scripts.labels import NO_FINDING, DataError, read_csv_checked

KEY_COLUMNS = ["image_id", "source", "labels", "repeat_of", "file"]
ANSWER_COLUMNS = ["reader", "image_id", "answer", "confidence", "findings"]
SOURCES = ("real", "synthetic")
CONFIDENCES = (1, 2, 3, 4, 5)
FINDING_JOIN = "|"


class StudyError(DataError):
    """The reader study cannot be built or scored from what it was given (the message says why)."""


def study_id(entries: Sequence[tuple[str, str]], seed: int) -> str:
    """8 hex digits from the (source, image hash) pairs and the seed: the same study gets the same id,
    and a page with other images another one, so its answers are never scored against this key."""
    digest = hashlib.sha256(json.dumps([sorted(entries), seed]).encode()).hexdigest()
    return digest[:8]


def image_ids(study: str, count: int) -> list[str]:
    """`<study>-001` ... in display order: the position says nothing, the order being shuffled."""
    width = max(3, len(str(count)))
    return [f"{study}-{position:0{width}d}" for position in range(1, count + 1)]


def split_image_id(image_id: str) -> tuple[str, str]:
    study, _, position = image_id.rpartition("-")
    return study, position


def findings_vocabulary(labels: Sequence[str]) -> list[str]:
    """The dataset's labels, with "No Finding" last (added when the vocabulary lacks it)."""
    return [label for label in labels if label != NO_FINDING] + [NO_FINDING]


def marked_column(source: str, label: str) -> str:
    """scores.csv column of how often `label` is marked on images of `source` ("real_marked_no_finding")."""
    return f"{source}_marked_" + re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


def read_study(key_path: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """key.csv and the study.json beside it (study id, findings vocabulary), checked."""
    key = read_csv_checked(key_path, KEY_COLUMNS, "reader study key", "; run the reader_study rule first")
    meta_path = key_path.with_name("study.json")
    if not meta_path.is_file():
        raise StudyError(f"{meta_path} not found beside {key_path}; re-run the reader_study rule")
    meta = json.loads(meta_path.read_text())
    bad = key[~key["source"].isin(SOURCES)]
    if not bad.empty:
        raise StudyError(f"{key_path} line {bad.index[0] + 2}: source {bad.iloc[0]['source']!r} is neither real nor synthetic")
    if key["image_id"].duplicated().any():
        raise StudyError(f"{key_path}: image id {key.loc[key['image_id'].duplicated(), 'image_id'].iloc[0]} listed twice")
    return key.set_index("image_id", drop=False), meta
