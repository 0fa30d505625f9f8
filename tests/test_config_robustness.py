"""Issue #26, what to build 2: every number of the configuration finite, in YAML and on `--config`; a
key written twice in a YAML file refused naming the file and both lines; `null` on `--config` is null."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from workflow_scripts.data import prepare_dataset
from workflow_scripts.common.config import load_config, validate_config
from workflow_scripts.common.errors import ConfigError

DEMO = REPO / "config" / "config.yaml"


@pytest.mark.parametrize("key", ["generation.guidance_scale", "split.test_fraction", "split.val_fraction",
                                 "classifier.learning_rate", "model.lora_alpha"])
def test_nan_passes_no_range_check_in_yaml(tmp_path: Path, key: str) -> None:
    section, name = key.split(".")
    path = tmp_path / "nan.yaml"
    path.write_text(f"{section}:\n  {name}: .nan\n")
    with pytest.raises(ConfigError, match=rf"{key}: nan is not a finite number"):
        load_config([DEMO, path])


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "nan"])
def test_nan_passes_no_range_check_on_config(value: str) -> None:
    # `snakemake --config "generation={guidance_scale: .nan}"` delivers the nested value as a string.
    config = load_config([DEMO])
    config["generation"]["guidance_scale"] = value
    with pytest.raises(ConfigError, match=r"generation.guidance_scale: .*(is not a finite number|is not of type 'number')"):
        validate_config(config)


def test_nan_split_fraction_stops_the_cli_without_a_traceback(tmp_path: Path, capsys) -> None:
    assert prepare_dataset.main(["--set", "split.test_fraction=.nan", "--out-dir", str(tmp_path / "out")]) == 2
    assert "split.test_fraction: nan is not a finite number" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_yaml_file_with_the_same_key_twice_is_refused_naming_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text("split:\n  seed: 1\nclassifier:\n  seeds: [0]\nsplit:\n  test_fraction: 0.2\n")
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(ConfigError, match=rf"{path}: key 'split' is written twice, on line 1 and on line 5"):
        load_config([DEMO, path])
    nested = tmp_path / "nested.yaml"
    nested.write_text("split:\n  seed: 1\n  test_fraction: 0.2\n  seed: 2\n")
    with pytest.raises(ConfigError, match=r"key 'seed' is written twice, on line 2 and on line 4"):
        load_config([DEMO, nested])
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_a_duplicate_key_and_nan_on_config_stop_snakemake_naming_them(tmp_path: Path) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text("split:\n  seed: 1\nsplit:\n  test_fraction: 0.2\n")
    snakemake = [sys.executable, "-m", "snakemake", "-n", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path)]
    result = subprocess.run([*snakemake, "--configfile", str(DEMO), str(path)], capture_output=True, text=True)
    assert result.returncode != 0 and f"{path}: key 'split' is written twice, on line 1 and on line 3" in result.stdout + result.stderr
    result = subprocess.run([*snakemake, "--configfile", str(DEMO), "--config", "generation={guidance_scale: .nan}"],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "generation.guidance_scale: nan is not a finite number" in result.stdout + result.stderr


def test_null_on_config_means_null_where_the_key_allows_it() -> None:
    # `snakemake --config "dataset={patient_column: null}"` delivers the string 'null'.
    config = load_config([REPO / "config" / "generic_csv.yaml"])
    config["dataset"]["patient_column"] = "null"
    config["dataset"]["allow_missing_patient"] = "true"
    config["split"]["more_real_ratio"] = "~"
    validate_config(config)
    assert config["dataset"]["patient_column"] is None and config["split"]["more_real_ratio"] is None
    config["dataset"]["path_column"] = "null"  # a key that does not allow null keeps the string
    validate_config(config)
    assert config["dataset"]["path_column"] == "null"


def test_a_reserve_for_an_arm_that_never_runs(tmp_path: Path, capsys) -> None:
    import pandas as pd

    from workflow_scripts.data.demo_dataset import make_demo_dataset
    from workflow_scripts.data.prepare_dataset import prepare

    make_demo_dataset(tmp_path / "demo", num_patients=16, size=64, seed=0)
    data = [f"dataset.csv={tmp_path / 'demo' / 'Data_Entry_2017.csv'}", f"dataset.images={tmp_path / 'demo' / 'images'}",
            "split.test_fraction=0.25", "balance.max_per_label=null"]
    config = load_config([DEMO], [*data, "classifier.controls=[noise]"])
    assert config["split"]["more_real_ratio"] is None
    assert "split.more_real_ratio 50 read as null" in capsys.readouterr().err
    prepare(config, tmp_path / "without")
    with_more_real = load_config([DEMO], [*data, "classifier.controls=[noise, more_real]"])
    prepare(with_more_real, tmp_path / "with")
    without = {name: pd.read_csv(tmp_path / "without" / f"{name}.csv") for name in ("train", "reserve")}
    assert without["reserve"].empty  # every training patient stays in training
    assert len(without["train"]) == len(pd.read_csv(tmp_path / "with" / "train.csv")) + len(pd.read_csv(tmp_path / "with" / "reserve.csv"))


def test_cyrillic_labels_get_a_unique_key_and_a_valid_file_name(tmp_path: Path) -> None:
    import re

    from PIL import Image

    from workflow_scripts.generation.pipeline import label_key, parse_labels
    from workflow_scripts.lora.lora_validation import slug

    vocabulary = ["Кардиомегалия", "Отёк", "Сardiomegaly", "Cardiomegaly", "No Finding", "Mass", "Mass!"]
    keys = [label_key([label]) for label in vocabulary]
    assert len(set(keys)) == len(keys) and all(keys)  # on main: '' for both Cyrillic labels
    assert all(re.fullmatch(r"[A-Za-z0-9_]+(\+[A-Za-z0-9_]+)*", key) for key in keys)  # the label wildcard (rules/common.smk)
    assert keys[3:6] == ["Cardiomegaly", "No_Finding", "Mass"]  # readable keys unchanged
    assert [parse_labels(key, vocabulary) for key in keys] == [[label] for label in vocabulary]
    assert slug("A chest X-ray with Mass") == "A_chest_X_ray_with_Mass"
    name = slug("Кардиомегалия")  # a validation image named after its label
    Image.new("L", (4, 4)).save(tmp_path / f"{name}.png")  # on main: '.png', "unknown file extension"


# ----------------------------------------------------------------------------- round 3, the rest (robust-26b)


def test_two_labels_with_one_file_key_are_refused_naming_both(capsys) -> None:
    # NIH writes Pleural_Thickening; a hand-written vocabulary may add the spaced spelling beside it.
    with pytest.raises(ConfigError, match=r"dataset.labels: 'Pleural Thickening' and 'Pleural_Thickening' get one file "
                                          r"name 'Pleural_Thickening'"):
        load_config([DEMO], ["dataset.labels=[Pleural Thickening, Pleural_Thickening, No Finding]"])
    assert prepare_dataset.main(["--set", "dataset.labels=[Mass, mass, No Finding]", "--out-dir", "/nonexistent/out"]) == 2
    assert "'Mass' and 'mass' get the file names 'Mass' and 'mass', one name on a case-insensitive filesystem" in capsys.readouterr().err


def test_two_labels_that_look_alike_are_refused_showing_the_difference() -> None:
    with pytest.raises(ConfigError, match=r"'\u0421ardiomegaly' \(character 1 is U\+0421 CYRILLIC CAPITAL LETTER ES\) and "
                                          r"'Cardiomegaly' look the same on screen"):
        load_config([DEMO], ["dataset.labels=[\u0421ardiomegaly, Cardiomegaly, No Finding]"])
    load_config([DEMO], ["dataset.labels=[Кардиомегалия, Отёк, No Finding]"])  # another script is no clash


@pytest.mark.parametrize(("text", "message"), [
    ("split:\n\tseed: 1\n", "config/config.yaml line 2, column 1: not valid YAML: found character '\\t' that cannot start "
                            "any token (a tab: YAML indents with spaces only)"),
    ("# every key commented out\n", "config/config.yaml: the config file is empty"),
])
def test_a_tab_indented_or_empty_config_file_is_refused_naming_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    # Snakemake reads the demo overlay (config/config.yaml of the working directory) itself, and says only
    # "Config file is not valid JSON or YAML" / "must be given as JSON or YAML with keys at top level".
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text(text)
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode != 0 and message in result.stdout + result.stderr, result.stdout + result.stderr
    assert (tmp_path / "config" / "config.yaml").read_text() == text
    with pytest.raises(ConfigError, match=re.escape(message.replace("config/config.yaml", str(tmp_path / "config" / "config.yaml")))):
        load_config([tmp_path / "config" / "config.yaml"])  # a stage's --config FILE: the same message
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ConfigError, match="empty.yaml: the config file is empty"):
        load_config([tmp_path / "empty.yaml"])
