"""Issue #26, what to build 3: a finished run with one result file cut short is refused naming the file
and what to re-run, never a traceback; nothing of the run is modified."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from test_compare import LABELS, write_study

from conftest import REPO
from workflow_scripts.compare import main


def cut_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def cut_in_last_number(path: Path) -> None:
    """Cut inside the last row, after its last comma: what a full disk or a killed copy leaves."""
    data = path.read_bytes().rstrip()
    path.write_bytes(data[: data.rfind(b",") + 1])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def compare_cli(paths: dict, out: Path) -> int:
    return main(["--config", str(REPO / "config" / "config.yaml"), "--set", f"dataset.labels={LABELS}",
                 "--set", "classifier.bootstrap_samples=50", "--runs", *map(str, paths["runs"]),
                 "--train", str(paths["data"] / "train.csv"), "--test", str(paths["data"] / "test.csv"),
                 "--fidelity", str(paths["evaluation"]), "--prepare-summary", str(paths["summary"]),
                 "--lora-summary", str(out / "no_lora_summary.json"), "--synthetic", str(out / "no_synthetic.csv"),
                 "--out-dir", str(out)])


@pytest.mark.parametrize("name, damage, message", [
    ("metrics.json", cut_half, "metrics.json: not valid JSON"),
    ("predictions.csv", cut_in_last_number, r"predictions.csv, line \d+: prob_\w+ is '[^']*', not a number"),
    ("predictions.csv", empty, "predictions.csv: not a readable table"),
    ("composition.csv", empty, "composition.csv: not a readable table"),
])
def test_a_finished_run_with_one_result_file_cut_short(tmp_path: Path, capsys, name: str, damage, message: str) -> None:
    paths = write_study(tmp_path / "in")
    run = paths["runs"][4]
    damage(run / name)
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((tmp_path / "in").rglob("*")) if p.is_file()}
    assert compare_cli(paths, tmp_path / "out") == 2  # on main: JSONDecodeError, "could not convert string to float"
    err = capsys.readouterr().err
    assert re.search(message, err) and f"delete {run} and run Snakemake again" in err, err
    assert not (tmp_path / "out" / "comparison.md").exists()
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in before} == before
