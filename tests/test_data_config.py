"""The data stage's configuration is checked before any image is read (issue 18): prompt templates
against the placeholders the code fills, integers as integers, label names against the split
files' join character."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO, SHARED_DATA
from test_data_integrity import nih_copy, run
from workflow_scripts.data import prepare_dataset
from workflow_scripts.common.errors import ConfigError
from workflow_scripts.common.config import load_config, prompt_template_problem

DEMO = [REPO / "config" / "config.yaml"]


@pytest.mark.parametrize(("template", "problem"), [
    ("A {view} chest X-ray with {labels}", "placeholder(s) {view} are not filled"),
    ("A chest X-ray {} with {labels}", "placeholder(s) {} are not filled"),
    ("A chest X-ray with {labels", "expected '}'"),
    ("A chest X-ray with {labels:d}", "cannot be filled"),
])
def test_bad_prompt_templates_are_refused_at_config_time(template: str, problem: str, capsys) -> None:
    assert problem in (prompt_template_problem(template) or "")
    # Through the stage: refused before the label file is even opened (it does not exist here).
    code = prepare_dataset.main(["--set", f"prompt.template={template}", "--set", "dataset.csv=/nonexistent.csv",
                                 "--out-dir", "/nonexistent/out"])
    err = capsys.readouterr().err
    assert code == 2 and "prompt.template" in err and problem in err and "Traceback" not in err


def test_good_templates_pass() -> None:
    for template in ("A chest X-ray with {labels}", "{labels}", "Radiograph: {labels} {{not a field}}", "{labels!s}"):
        assert prompt_template_problem(template) is None, template


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("split.seed", "7.0", 7), ("balance.seed", "5.0", 5), ("dataset.min_image_side", "1e9", 1_000_000_000),
    ("balance.max_per_label", "100.0", 100), ("classifier.seeds", "[0.0, 1.0]", [0, 1]),
])
def test_whole_floats_where_the_schema_says_integer_become_integers(key: str, value: str, expected, capsys) -> None:
    config = load_config(DEMO, [f"{key}={value}"])
    section, name = key.split(".")
    got = config[section][name]
    assert got == expected and all(type(item) is int for item in (got if isinstance(got, list) else [got]))
    assert f"{key}" in capsys.readouterr().err  # a note says it was read as an integer


@pytest.mark.parametrize(("key", "value"), [("split.seed", "7.5"), ("dataset.min_image_side", "2.5")])
def test_fractional_values_where_the_schema_says_integer_are_refused_by_key(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"{key}: {value} is not of type 'integer'"):
        load_config(DEMO, [f"{key}={value}"])


def test_float_seed_gives_the_splits_of_the_integer_seed(tmp_path: Path, capsys) -> None:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data/cxr-dev not present")
    csv, images, _ = nih_copy(tmp_path / "user")
    outputs = []
    for seed in ("7", "7.0"):
        code, err = run(tmp_path, capsys, csv, images, f"split.seed={seed}", "balance.seed=5.0")
        assert code == 0, err
        outputs.append(pd.concat([pd.read_csv(tmp_path / "out" / f"{name}.csv") for name in ("train", "val", "test")]))
    pd.testing.assert_frame_equal(outputs[0], outputs[1])


def test_label_names_with_the_join_character_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"dataset.labels: \['Nodule\|left'\] contain '\|'"):
        load_config(DEMO, ["dataset.format=csv", "dataset.label_separator=;", "dataset.labels=[Nodule|left, Mass]"])


def test_val_fraction_zero_and_tilde_paths_are_refused_by_key() -> None:
    with pytest.raises(ConfigError, match="split.val_fraction: 0 leaves the val split empty"):
        load_config(DEMO, ["split.val_fraction=0"])
    with pytest.raises(ConfigError, match="dataset.csv: '~/x.csv' starts with '~'"):
        load_config(DEMO, ["dataset.csv=~/x.csv"])
