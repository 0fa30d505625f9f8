"""What the page, the key and the answers share: the columns, the image ids and reading the key back.

The study id prefixes every image id, so answers given on another study's page are recognised as
such instead of being scored against the wrong key. It is a keyed hash (HMAC) of the whole key under
a random secret kept beside the key and never shipped: the same key gives the same id, any change of
the key another one, and a reader who has every image of the page cannot test guesses of the key
against it (round 1 hashed the content with the seed, and 20 images' key fell to a 44 s search).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from workflow_scripts.common.errors import DataError
from workflow_scripts.common.labels import NO_FINDING, read_csv_checked

KEY_COLUMNS = ["image_id", "source", "labels", "repeat_of", "file"]
ANSWER_COLUMNS = ["reader", "image_id", "answer", "confidence", "findings"]
# What the page exports besides (round 1's five columns alone are still read): image quality, why a
# synthetic answer (a reason and where on the image, x/y as fractions of its side), seconds spent.
EXTRA_COLUMNS = ["quality", "reason", "x", "y", "seconds"]
QUALITIES = ("good", "adequate", "poor", "non-diagnostic")
REASONS = ("anatomy", "texture or noise", "edges or borders", "devices or text", "the finding", "other")
SOURCES = ("real", "synthetic")
CONFIDENCES = (1, 2, 3, 4, 5)
FINDING_JOIN = "|"


class StudyError(DataError):
    """The reader study cannot be built or scored from what it was given (the message says why)."""


SECRET_FILE = "secret.txt"  # beside key.csv; not a declared output, so a rebuild keeps it


def study_secret(key_dir: Path) -> bytes:
    """The key folder's secret (32 random hex digits), made on first use and kept across rebuilds."""
    path = key_dir / SECRET_FILE
    if not path.is_file():
        key_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(16) + "\n")
        path.chmod(0o600)
    text = path.read_text().strip()
    if not re.fullmatch(r"[0-9a-f]{32}", text):
        raise StudyError(f"{path}: not a study secret (32 hex digits); delete it to make a new one "
                         "(answers to pages built with the old one will then read as another study)")
    return text.encode()


def study_id(secret: bytes, content: Sequence[Sequence[Any]]) -> str:
    """8 hex digits of HMAC-SHA256(secret, the key's content): the same key gives the same id; another
    key (other images, order, repeats) another id; without the secret nothing about the key can be
    checked against it."""
    return hmac.new(secret, json.dumps(list(map(list, content))).encode(), hashlib.sha256).hexdigest()[:8]


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
