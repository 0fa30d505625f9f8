"""Reading the readers' answer CSVs (the page's export) and checking every line against the key.

Nothing in the answers folder is written: a bad file is reported, by name and line, for its owner to fix.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

import pandas as pd

from workflow_scripts.reader_study.design import (
    ANSWER_COLUMNS, CONFIDENCES, FINDING_JOIN, SOURCES, StudyError, split_image_id)

MAX_LISTED = 20  # errors listed at once; the rest are counted
STUDY_ID = re.compile(r"^[0-9a-f]{8}$")


def answer_files(answers_dir: Path) -> list[Path]:
    if not answers_dir.is_dir():
        raise StudyError(f"{answers_dir}: answers folder not found; put the readers' exported CSV files there "
                         "(reader_study.answers_dir)")
    files = sorted(path for path in answers_dir.iterdir() if path.suffix.lower() == ".csv" and path.is_file())
    if not files:
        raise StudyError(f"{answers_dir}: no .csv files; put the readers' exported answer files there")
    return files


def check_row(cells: list[str], key: pd.DataFrame, meta: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """One data row as an answer, or the reason it is refused."""
    if len(cells) != len(ANSWER_COLUMNS):
        return None, f"{len(cells)} fields, expected {len(ANSWER_COLUMNS)} ({','.join(ANSWER_COLUMNS)})"
    reader, image_id, answer, confidence, findings = (cell.strip() for cell in cells)
    if not reader:
        return None, "empty reader name"
    if image_id not in key.index:
        study, _ = split_image_id(image_id)
        if STUDY_ID.match(study) and study != meta["study"]:
            return None, (f"image {image_id} belongs to another study ({study}); this key is study {meta['study']}: "
                          "the file comes from another study's page")
        return None, f"unknown image id {image_id!r} (not in the key of study {meta['study']})"
    if answer not in SOURCES:
        return None, f"answer {answer!r}, expected real or synthetic"
    if not confidence.isdigit() or int(confidence) not in CONFIDENCES:
        return None, f"confidence {confidence!r}, expected a whole number from 1 to 5"
    marked = [finding for finding in findings.split(FINDING_JOIN) if finding]
    unknown = [finding for finding in marked if finding not in meta["findings"]]
    if unknown:
        return None, f"finding(s) {unknown} not in the study's vocabulary {meta['findings']}"
    return {"reader": reader, "image_id": image_id, "answer": answer, "confidence": int(confidence),
            "findings": frozenset(marked)}, None


def read_file(path: Path, key: pd.DataFrame, meta: dict[str, Any], errors: list[str]) -> list[dict[str, Any]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except (UnicodeDecodeError, csv.Error) as error:
        errors.append(f"{path}: not a readable CSV ({error})")
        return []
    if not rows or [cell.strip() for cell in rows[0]] != ANSWER_COLUMNS:
        errors.append(f"{path} line 1: header {rows[0] if rows else '(empty file)'}, expected {','.join(ANSWER_COLUMNS)} "
                      "(the page's Export answers writes it)")
        return []
    answers = []
    for line, cells in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in cells):
            continue
        answer, problem = check_row(cells, key, meta)
        if problem:
            errors.append(f"{path} line {line}: {problem}")
            if "another study" in problem:  # the whole file belongs elsewhere: once is enough
                return []
        else:
            answers.append({**answer, "file": str(path), "line": line})
    return answers


def read_answers(answers_dir: Path, key: pd.DataFrame, meta: dict[str, Any]) -> pd.DataFrame:
    """Every answer of every CSV in `answers_dir`; raises StudyError listing each bad line and each
    image answered twice by one reader."""
    errors: list[str] = []
    answers: list[dict[str, Any]] = []
    for path in answer_files(answers_dir):
        answers += read_file(path, key, meta, errors)
    seen: dict[tuple[str, str], str] = {}
    for answer in answers:
        where = f"{answer['file']} line {answer['line']}"
        pair = (answer["reader"], answer["image_id"])
        if pair in seen:
            errors.append(f"{where}: reader {pair[0]!r} answered image {pair[1]} twice (first at {seen[pair]})")
        seen.setdefault(pair, where)
    if errors:
        more = f"\n  ... and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED else ""
        raise StudyError(f"{len(errors)} problem(s) in the answers; nothing was scored:\n  " + "\n  ".join(errors[:MAX_LISTED]) + more)
    return pd.DataFrame(answers)
