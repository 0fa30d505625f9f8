"""Issue #26, what to build 3: a finished run with one result file cut short is refused naming the file
and what to re-run, never a traceback; nothing of the run is modified."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from test_compare import LABELS, write_study

from conftest import REPO
from workflow_scripts.study.compare import main


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


def _generated_key(out: Path, key: str, count: int) -> Path:
    """A label folder as generate_key leaves it: count PNGs (copies of a real film) and their list."""
    import shutil

    import pandas as pd

    from conftest import SHARED_DATA
    from workflow_scripts.common.tables import RESULT_COLUMNS

    (out / key).mkdir(parents=True)
    films = sorted((SHARED_DATA / "images").glob("*.png"))[:count]
    rows = []
    for index, film in enumerate(films):
        shutil.copyfile(film, out / key / f"{key}_{index:04d}.png")
        rows.append([str(out / key / f"{key}_{index:04d}.png"), f"A chest X-ray with {key}", key, index, 10, 7.5,
                     "dpmsolver++", "results/lora/final", "float32", "cpu"])
    pd.DataFrame(rows, columns=RESULT_COLUMNS).to_csv(out / key / "generation_results.csv", index=False)
    return out / key / "generation_results.csv"


def _cut_last_line(path: Path) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]))  # cut at a line boundary: every line whole, one image fewer


@pytest.mark.parametrize("damage, message, plan", [
    (cut_in_last_number, "its last line ends without a line break, so it was cut short", False),
    (_cut_last_line, "it lists 3 images where the plan (results/synthetic/plan.csv) asks for 4", True),
])
def test_a_cut_per_label_generation_list_is_named_not_blamed_on_images_per_label(tmp_path: Path, capsys, damage,
                                                                                message: str, plan: bool) -> None:
    from workflow_scripts.generation.merge_generation import main as merge_main

    out = tmp_path / "synthetic"
    lists = [_generated_key(out, key, 4) for key in ("Mass", "No_Finding")]
    (out / "plan.csv").write_text("key,labels,prompt,count\nMass,Mass,A chest X-ray with Mass,4\n"
                                  "No_Finding,No Finding,A chest X-ray with No Finding,4\n")
    damage(lists[0])
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*")) if p.is_file()}
    code = merge_main(["--config", str(REPO / "config" / "config.yaml"), "--results", *map(str, lists),
                       *(["--plan", str(out / "plan.csv")] if plan else []), "--merged", str(out / "generation_results.csv")])
    err = capsys.readouterr().err
    assert code == 2 and f"{lists[0]}: {message}" in err, err  # on main: merged; the classifier then said
    assert "generate_label for Mass" in err and "images_per_label" not in err  # "raise generation.images_per_label"
    assert not (out / "generation_results.csv").exists()
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in before} == before
