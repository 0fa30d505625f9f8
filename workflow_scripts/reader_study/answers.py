"""Reading the readers' answer CSVs (the page's export) and checking every line against the key.

Nothing in the answers folder is written: a bad file is reported, by name and line, for its owner to
fix. Rules (docs/reader-study.md): every file but dotfiles must be a .csv export; reader names are
trimmed, NFC-normalised and matched case-insensitively ("Dr A" and "dr  a" are one reader; their
answers from several files merge, and an image answered twice is an error); a name with control
characters is refused.
"""

from __future__ import annotations

import csv
import math
import re
import unicodedata
from pathlib import Path
from typing import Any

import pandas as pd

from workflow_scripts.reader_study.design import (
    ANSWER_COLUMNS, EXTRA_COLUMNS, FINDING_JOIN, QUALITIES, REASONS, SOURCES, StudyError, split_image_id)

POOLED_NAME = "all readers"  # score.POOLED
MAX_LISTED = 20  # errors listed at once; the rest are counted
STUDY_ID = re.compile(r"^[0-9a-f]{8}$")
CONFIDENCE = re.compile(r"^[1-5]$")
HEADERS = (ANSWER_COLUMNS, ANSWER_COLUMNS + EXTRA_COLUMNS)
BIDI_CONTROLS = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")  # text that displays reversed


def answer_files(answers_dir: Path) -> list[Path]:
    """The .csv files of the folder; any other file (an .xlsx, a .csv.txt) is refused by name,
    dotfiles (.DS_Store) are left out."""
    if not answers_dir.is_dir():
        raise StudyError(f"{answers_dir}: answers folder not found; put the readers' exported CSV files there "
                         "(reader_study.answers_dir)")
    entries = sorted(path for path in answers_dir.iterdir() if not path.name.startswith("."))
    other = [path.name for path in entries if path.suffix.lower() != ".csv" or not path.is_file()]
    if other:
        raise StudyError(f"{answers_dir}: {', '.join(other)}: not .csv files; only the page's CSV exports are read: "
                         "save them as .csv (an .xlsx: File > Save as CSV) or move them out of the folder")
    if not entries:
        raise StudyError(f"{answers_dir}: no .csv files; put the readers' exported answer files there")
    return entries


def reader_name(text: str) -> tuple[str | None, str | None]:
    """The name as shown (NFC, trimmed, inner whitespace collapsed), or why it is refused."""
    name = " ".join(unicodedata.normalize("NFC", text).split())
    if not name:
        return None, "empty reader name"
    if any(unicodedata.category(char) == "Cc" or char in BIDI_CONTROLS for char in text if char not in " \t"):
        return None, f"reader name {text!r} holds control characters"
    if name.casefold() == POOLED_NAME:
        return None, f"reader name {name!r} is the name of the pooled row; use another"
    return name, None


def check_extras(cells: list[str]) -> tuple[dict[str, Any] | None, str | None]:
    """quality, reason, x, y, seconds: each may be empty."""
    quality, reason, x, y, seconds = (cell.strip() for cell in cells)
    if quality and quality not in QUALITIES:
        return None, f"quality {quality!r}, expected one of {', '.join(QUALITIES)} or empty"
    if reason and reason not in REASONS:
        return None, f"reason {reason!r}, expected one of {', '.join(REASONS)} or empty"
    values = {}
    for name, text, high in (("x", x, 1.0), ("y", y, 1.0), ("seconds", seconds, math.inf)):
        try:
            value = float(text) if text else math.nan
        except ValueError:
            value = -1.0
        if text and not (0 <= value <= high):
            return None, f"{name} {text!r}, expected a number from 0 to {high:g} or empty"
        values[name] = value
    return {"quality": quality, "reason": reason, **values}, None


def check_row(cells: list[str], key: pd.DataFrame, meta: dict[str, Any], width: int) -> tuple[dict[str, Any] | None, str | None]:
    """One data row as an answer, or the reason it is refused."""
    if len(cells) != width:
        return None, f"{len(cells)} fields, expected {width} (as in the header)"
    reader, problem = reader_name(cells[0])
    if problem:
        return None, problem
    image_id, answer, confidence, findings = (cell.strip() for cell in cells[1:5])
    if image_id not in key.index:
        study, _ = split_image_id(image_id)
        if STUDY_ID.match(study) and study != meta["study"]:
            return None, (f"image {image_id} belongs to another study ({study}); this key is study {meta['study']}: "
                          "the file comes from another study's page (an earlier build's key is kept in the key "
                          f"folder's history/{study}/)")
        return None, f"unknown image id {image_id!r} (not in the key of study {meta['study']})"
    if answer not in SOURCES:
        return None, f"answer {answer!r}, expected real or synthetic"
    if not CONFIDENCE.match(confidence):
        return None, f"confidence {confidence!r}, expected a whole number from 1 to 5"
    marked = [finding for finding in findings.split(FINDING_JOIN) if finding]
    unknown = [finding for finding in marked if finding not in meta["findings"]]
    if unknown:
        return None, f"finding(s) {unknown} not in the study's vocabulary {meta['findings']}"
    extras, problem = check_extras(cells[5:]) if width > len(ANSWER_COLUMNS) else ({}, None)
    if problem:
        return None, problem
    return {"reader": reader, "image_id": image_id, "answer": answer, "confidence": int(confidence),
            "findings": frozenset(marked), **extras}, None


def read_file(path: Path, key: pd.DataFrame, meta: dict[str, Any], errors: list[str]) -> list[dict[str, Any]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except (UnicodeDecodeError, csv.Error, OSError) as error:
        errors.append(f"{path}: not a readable CSV ({error})")
        return []
    header = [cell.strip() for cell in rows[0]] if rows else []
    if header not in HEADERS:
        errors.append(f"{path} line 1: header {rows[0] if rows else '(empty file)'}, expected {','.join(ANSWER_COLUMNS)}"
                      f"[,{','.join(EXTRA_COLUMNS)}] (the page's Export answers writes it)")
        return []
    answers = []
    for line, cells in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in cells):
            continue
        answer, problem = check_row(cells, key, meta, len(header))
        if problem:
            errors.append(f"{path} line {line}: {problem}")
            if "another study" in problem:  # the whole file belongs elsewhere: once is enough
                return []
        else:
            answers.append({**answer, "file": str(path), "line": line})
    return answers


def merge_readers(answers: list[dict[str, Any]], errors: list[str]) -> None:
    """One reader per case-folded name (shown as first met); an image answered twice by one reader,
    within or across files, is an error."""
    shown: dict[str, str] = {}
    seen: dict[tuple[str, str], str] = {}
    for answer in answers:
        folded = answer["reader"].casefold()
        answer["reader"] = shown.setdefault(folded, answer["reader"])
        where = f"{answer['file']} line {answer['line']}"
        pair = (folded, answer["image_id"])
        if pair in seen:
            errors.append(f"{where}: reader {answer['reader']!r} answered image {pair[1]} twice (first at {seen[pair]}; "
                          "names are matched ignoring case and spacing)")
        seen.setdefault(pair, where)


def read_answers(answers_dir: Path, key: pd.DataFrame, meta: dict[str, Any]) -> pd.DataFrame:
    """Every answer of every CSV in `answers_dir`; raises StudyError listing each bad line and each
    image answered twice by one reader, or when no file holds an answer."""
    errors: list[str] = []
    answers: list[dict[str, Any]] = []
    files = answer_files(answers_dir)
    for path in files:
        answers += read_file(path, key, meta, errors)
    merge_readers(answers, errors)
    if errors:
        more = f"\n  ... and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED else ""
        raise StudyError(f"{len(errors)} problem(s) in the answers; nothing was scored:\n  " + "\n  ".join(errors[:MAX_LISTED]) + more)
    if not answers:
        raise StudyError(f"{answers_dir}: {', '.join(path.name for path in files)} hold(s) a header but no answer; "
                         "a reader exports after answering")
    return pd.DataFrame(answers)
