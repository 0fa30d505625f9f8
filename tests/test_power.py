"""The power planner: variance components from finished runs, the MDE for other seeds and test
patients, and the seeds needed for a target; consistent with the table's own MDE."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from test_compare import LABELS, write_study

from workflow_scripts.study import power
from workflow_scripts.study.compare import compare
from workflow_scripts.common.config import load_config


def planner_config(target: float = 0.05) -> dict:
    return load_config([REPO / "config" / "config.yaml"], [f"dataset.labels={LABELS}", "classifier.bootstrap_samples=300",
                                                          "classifier.min_test_positives=5", f"classifier.target_mde={target}",
                                                          "classifier.ratios=[0, 10, 50]", "classifier.controls=[rebalanced, noise]"])


def test_more_seeds_and_patients_shrink_the_mde_and_seed_variance_sets_a_floor() -> None:
    components = {"seed_var": 0.02 ** 2, "interaction_var": 0.015 ** 2, "seed_df": 8, "patient_var": 0.01 ** 2,
                  "patient_source": "test"}
    level = 0.05 / 4
    by_seeds = [power.planned_mde(components, s, 1, level, 5) for s in (2, 3, 5, 10, 20)]
    by_patients = [power.planned_mde(components, 5, f, level, 5) for f in (1, 2, 4, 10)]
    assert by_seeds == sorted(by_seeds, reverse=True) and by_patients == sorted(by_patients, reverse=True)
    # more test patients alone cannot go below the seed term: sqrt(2 * 0.02^2 / 5) * ~(z + z_0.8)
    assert by_patients[-1] > np.sqrt(2 * 0.02 ** 2 / 5) * 3.0
    # with 2 seeds, more test patients still help (the pooled seed df no longer collapses to 1 per arm)
    two = [power.planned_mde(components, 2, f, level, 5) for f in (1, 2, 4, 10, 100)]
    assert two == sorted(two, reverse=True)


def test_the_interaction_shrinks_with_seeds_and_patients_alike() -> None:
    # all of the patient-level variance of a Δ is seed x patient interaction: doubling the seeds
    # halves Var(Δ) exactly as doubling the test patients does (the old planner held it fixed
    # across seeds); the seeds also add degrees of freedom, so they buy a little more
    components = {"seed_var": 0.0, "interaction_var": 0.02 ** 2, "seed_df": 8, "patient_var": 0.0, "patient_source": "test"}
    level = 0.05 / 6
    six, doubled, now = (power.planned_mde(components, s, f, level, 7) for s, f in ((6, 1), (3, 2), (3, 1)))
    assert six <= doubled < now
    assert doubled == pytest.approx(now / np.sqrt(2), rel=0.05)  # SE / sqrt(2), df about the same


def test_the_planner_reads_a_study_and_agrees_with_the_table(tmp_path: Path) -> None:
    paths = write_study(tmp_path / "in", quality={"ratio50": 1.5})
    config = planner_config()
    table = compare(config, paths["runs"], paths["evaluation"], paths["lora"], paths["data"], paths["summary"], paths["synthetic"],
                    tmp_path / "out")
    out = tmp_path / "power.md"
    page = power.power(config, paths["runs"], paths["data"] / "test.csv", out)
    assert out.read_text() == page and "| seeds per arm |" in page
    # one MDE: the planner prints the table's own figures, arm by arm
    now = dict(re.findall(r"(\w+) ([+-][0-9.]+)", re.search(r"MDE now, as the table prints it.*?\*\*(.*?)\*\*", page).group(1)))
    assert {name: float(value) for name, value in now.items()} == {
        row["arm"]: pytest.approx(row["mde_vs_ratio0"], abs=6e-4) for row in table.dropna(subset=["mde_vs_ratio0"]).to_dict("records")}
    # and its grid at this study's design expects about what the table prints (pooled components, no c4)
    grid = float(re.search(r"^\| 3 † \| ([+-][0-9.]+) \|", page, re.M).group(1))
    table_mde = float(np.median(table["mde_vs_ratio0"].dropna()))
    assert abs(grid - table_mde) <= 0.35 * table_mde, (grid, table_mde)
    seeds = [int(n) for n in re.findall(r"- \d+ test patients: (\d+) seeds per arm", page)]
    assert seeds and seeds == sorted(seeds, reverse=True)  # more patients never need more seeds


def test_a_ratio0_only_pilot_is_enough_to_plan(tmp_path: Path) -> None:
    paths = write_study(tmp_path / "in", arms={"ratio0": ("real", 0)})
    page = power.power(planner_config(0.5), paths["runs"], paths["data"] / "test.csv", None)
    assert "two halves of ratio0's seeds (a floor)" in page and "- 60 test patients: 2 seeds per arm" in page


def test_the_cli_refuses_one_seed_of_ratio0_with_a_message(tmp_path: Path, capsys) -> None:
    paths = write_study(tmp_path / "in", arms={"ratio0": ("real", 0)})
    config = tmp_path / "c.yaml"
    config.write_text("classifier: {min_test_positives: 5}\ndataset: {labels: " + str(LABELS) + "}\n")
    code = power.main(["--config", str(REPO / "config" / "config.yaml"), str(config), "--runs", str(paths["runs"][0]),
                       "--test", str(paths["data"] / "test.csv")])
    assert code == 2 and "only ratio0 with one seed" in capsys.readouterr().err
