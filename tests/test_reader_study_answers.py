"""Answers are never scored against the wrong key, no answers file ends in a traceback, and the
scores say what a reader did (round 2, items 6-15)."""

from __future__ import annotations

import csv
import subprocess
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import tree_checksum
from tests.reader_study_inputs import build_study, make_study_inputs, study_config, write_answers
from tests.test_reader_study import key_answers
from workflow_scripts.reader_study import score as score_stage
from workflow_scripts.reader_study.design import read_study


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reader_study")
    data, synthetic = make_study_inputs(root)
    build_study(study_config(), data, synthetic, root / "study")
    return root


@pytest.fixture
def study(built: Path, tmp_path: Path) -> Path:
    """A fresh copy of one built study (inputs beside it, as make_study_inputs wrote them) per test."""
    for name in ("data", "films", "synthetic", "study"):
        shutil.copytree(built / name, tmp_path / name)
    for table in [*(tmp_path / "data").glob("*.csv"), *(tmp_path / "synthetic").glob("*.csv"), tmp_path / "study" / "key" / "key.csv"]:
        table.write_text(table.read_text().replace(str(built), str(tmp_path)))  # the copy's own files
    return tmp_path / "study"


def scored(study: Path, answers: Path, capsys: pytest.CaptureFixture) -> subprocess.CompletedProcess:
    capsys.readouterr()
    code = score_stage.main(["--key", str(study / "key" / "key.csv"), "--answers-dir", str(answers),
                             "--out-dir", str(study / "scores"), "--bootstrap-samples", "100"])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return subprocess.CompletedProcess([], code, out, err)


def test_a_rebuild_with_another_key_is_another_study_and_the_old_key_is_kept(study: Path, tmp_path: Path, capsys) -> None:
    old_key, old_meta = read_study(study / "key" / "key.csv")
    write_answers(tmp_path / "answers" / "r1.csv", "r1", key_answers(old_key))
    build_study(study_config(), tmp_path / "data", tmp_path / "synthetic" / "generation_results.csv", study)
    assert read_study(study / "key" / "key.csv")[1]["study"] == old_meta["study"], "the same key keeps its id"
    build_study(study_config(repeats=3), tmp_path / "data", tmp_path / "synthetic" / "generation_results.csv", study)
    new_meta = read_study(study / "key" / "key.csv")[1]
    assert new_meta["study"] != old_meta["study"], "item 6: a changed key kept its id"
    result = scored(study, tmp_path / "answers", capsys)
    assert result.returncode == 2 and "belongs to another study" in result.stderr and f"history/{old_meta['study']}" in result.stderr
    kept = study / "key" / "history" / old_meta["study"] / "key.csv"
    assert score_stage.main(["--key", str(kept), "--answers-dir", str(tmp_path / "answers"), "--out-dir",
                             str(tmp_path / "old"), "--bootstrap-samples", "100"]) == 0
    assert pd.read_csv(tmp_path / "old" / "scores.csv").set_index("reader").loc["r1", "accuracy"] == 1.0


def header_only(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.csv").write_text("reader,image_id,answer,confidence,findings\n")


@pytest.mark.parametrize("case, make, message", [
    ("header only", header_only, "hold(s) a header but no answer"),
    ("xlsx", lambda folder: (folder / "r1.xlsx").write_bytes(b"PK\x03\x04"), "r1.xlsx: not .csv files"),
    ("csv.txt", lambda folder: (folder / "r1.csv.txt").write_text("x"), "r1.csv.txt: not .csv files"),
    ("binary", lambda folder: (folder / "r1.csv").write_bytes(b"\xff\xfe\x00garbage\x00"), "r1.csv"),
])
def test_odd_answer_files_are_reported_not_tracebacks(study: Path, case: str, make, message: str, capsys) -> None:
    answers = study / "answers"
    answers.mkdir(exist_ok=True)
    make(answers)
    before = tree_checksum(answers)
    result = scored(study, answers, capsys)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert tree_checksum(answers) == before


@pytest.mark.parametrize("confidence", ["3.0", "\u00b3", "", "0", "6", "x", "\u0663"])
def test_odd_confidence_values_are_refused_by_line(study: Path, confidence: str, capsys) -> None:
    key, _ = read_study(study / "key" / "key.csv")
    path = study / "answers" / "r1.csv"
    path.parent.mkdir()
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows([["reader", "image_id", "answer", "confidence", "findings"],
                                      ["r1", key.index[0], "real", confidence, "No Finding"]])
    result = scored(study, study / "answers", capsys)
    assert result.returncode == 2 and f"{path} line 2: confidence" in result.stderr


def test_names_are_matched_ignoring_case_and_spacing_and_control_characters_refused(study: Path, capsys) -> None:
    key, _ = read_study(study / "key" / "key.csv")
    rows = key_answers(key)
    answers = study / "answers"
    write_answers(answers / "a1.csv", "Dr A", rows[:5])
    write_answers(answers / "a2.csv", " Dr  A ", rows[5:])  # one reader, two partial exports: merged
    assert scored(study, answers, capsys).returncode == 0
    scores = pd.read_csv(study / "scores" / "scores.csv").set_index("reader")
    assert list(scores.index) == ["Dr A", score_stage.POOLED]
    write_answers(answers / "a3.csv", "dr a", rows[:1])  # the same reader again: answered twice
    result = scored(study, answers, capsys)
    assert result.returncode == 2 and f"{answers / 'a3.csv'} line 2: reader 'Dr A' answered image" in result.stderr
    (answers / "a3.csv").unlink()
    write_answers(answers / "a4.csv", "Eve\u202egnp.exe", rows[:1])
    result = scored(study, answers, capsys)
    assert result.returncode == 2 and f"{answers / 'a4.csv'} line 2: reader name" in result.stderr


def test_names_cannot_inject_formulas_or_break_the_markdown_table(study: Path, capsys) -> None:
    key, _ = read_study(study / "key" / "key.csv")
    write_answers(study / "answers" / "x.csv", '=HYPERLINK("http://x","y")', key_answers(key))
    write_answers(study / "answers" / "y.csv", "A|B", key_answers(key, flip=True))
    assert scored(study, study / "answers", capsys).returncode == 0
    with open(study / "scores" / "scores.csv", newline="") as handle:
        readers = [row["reader"] for row in csv.DictReader(handle)]
    assert "'=HYPERLINK(\"http://x\",\"y\")" in readers and not any(name.startswith("=") for name in readers)
    table = [line for line in (study / "scores" / "scores.md").read_text().splitlines() if line.startswith("| A")]
    assert table and table[0].startswith("| A\\|B |")
    columns = (study / "scores" / "scores.md").read_text().splitlines()
    header = next(line for line in columns if line.startswith("| reader | images"))
    assert table[0].count(" | ") == header.count(" | ")


def test_the_first_displayed_showing_is_the_one_scored_even_when_only_the_repeat_was_answered(study: Path, capsys) -> None:
    key, _ = read_study(study / "key" / "key.csv")
    position = {image: index for index, image in enumerate(key.index)}
    repeats = key[key["repeat_of"] != ""]
    assert len(repeats) == 2 and all(position[row.repeat_of] < position[image] for image, row in repeats.iterrows()), \
        "item 11: a repeat is displayed before its original"
    answers = [(image, row.source, 5, row.labels) for image, row in repeats.iterrows()]  # only the second showings
    write_answers(study / "answers" / "late.csv", "late", answers)
    assert scored(study, study / "answers", capsys).returncode == 0
    scores = pd.read_csv(study / "scores" / "scores.csv").set_index("reader")
    assert scores.loc["late", "n"] == 2 and scores.loc["late", "accuracy"] == 1.0 and scores.loc["late", "repeat_pairs"] == 0


def test_sensitivity_and_specificity_expose_a_reader_who_always_says_real(study: Path, capsys) -> None:
    key, _ = read_study(study / "key" / "key.csv")
    write_answers(study / "answers" / "real.csv", "always real", [(image, "real", 3, row.labels) for image, row in key.iterrows()])
    rng = np.random.default_rng(3)
    write_answers(study / "answers" / "coin.csv", "coin",
                  [(image, str(rng.choice(["real", "synthetic"])), int(rng.integers(1, 6)), row.labels) for image, row in key.iterrows()])
    assert scored(study, study / "answers", capsys).returncode == 0
    scores = pd.read_csv(study / "scores" / "scores.csv").set_index("reader")
    lazy = scores.loc["always real"]
    assert lazy["accuracy"] == 0.5 and lazy["sensitivity"] == 0.0 and lazy["specificity"] == 1.0
    pooled = scores.loc[score_stage.POOLED]
    assert pooled["interval"].startswith("MRMC (Obuchowski-Rockette): 2 readers x 18 patients")
    assert pooled["accuracy_ci_low"] < 0.5 < pooled["accuracy_ci_high"]
    assert np.isfinite(pooled[["sensitivity_ci_low", "specificity_ci_high", "auroc_ci_low", "auroc_df"]].astype(float)).all()
    text = (study / "scores" / "pooled.md").read_text()
    assert "sensitivity" in text and "MRMC" in text
