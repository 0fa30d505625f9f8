"""Configuration: every shipped config validates, bad values are refused by key, overrides round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import REPO
from workflow_scripts.config import ConfigError, apply_overrides, load_config, overrides_between

SHIPPED = sorted((REPO / "config").glob("*.yaml"))


@pytest.mark.parametrize("path", [p for p in SHIPPED if p.name != "schema.yaml"], ids=lambda p: p.name)
def test_shipped_configs_validate_and_keep_the_seed_knob_names(path: Path) -> None:
    config = load_config([REPO / "config" / "config.yaml", path])
    for section, key in [("model", "lora_rank"), ("model", "lora_alpha"), ("training", "train_batch_size"),
                         ("training", "gradient_accumulation_steps"), ("training", "gradient_checkpointing"),
                         ("training", "mixed_precision"), ("training", "use_8bit_adam"), ("training", "num_train_epochs"),
                         ("training", "save_steps"), ("training", "validation_steps"), ("hardware", "enable_attention_slicing"),
                         ("hardware", "enable_vae_slicing"), ("hardware", "enable_xformers")]:
        assert key in config[section]
    assert config["dataset"]["format"] in {"nih", "chexpert", "csv"}


def test_real_data_configs_use_sd15_at_512_and_their_vocabularies() -> None:
    nih = load_config([REPO / "config" / "config.yaml", REPO / "config" / "nih_chestxray14.yaml"])
    assert nih["model"]["resolution"] == 512 and "stable-diffusion-v1-5" in nih["model"]["pretrained"]
    assert len(nih["dataset"]["labels"]) == 15 and "Pleural_Thickening" in nih["dataset"]["labels"]
    chexpert = load_config([REPO / "config" / "config.yaml", REPO / "config" / "chexpert.yaml"])
    assert "Pleural Effusion" in chexpert["dataset"]["labels"] and chexpert["dataset"]["format"] == "chexpert"


def test_every_default_config_key_is_commented() -> None:
    for number, line in enumerate((REPO / "config" / "config.yaml").read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped and not stripped.startswith(("#", "-")) and not stripped.endswith(":"):
            assert "#" in line, f"config/config.yaml line {number} has no comment: {line!r}"


def test_defaults_are_filled_in(tmp_path: Path) -> None:
    path = tmp_path / "minimal.yaml"
    path.write_text("dataset: {format: csv}\n")
    config = load_config([path])
    assert config["training"]["learning_rate"] == 1.0e-4
    assert config["dataset"]["on_bad_image"] == "error"
    assert config["split"]["seed"] == 42


@pytest.mark.parametrize(("override", "message"), [
    ("training.mixed_precision=fp8", r"training.mixed_precision: 'fp8' is not one of"),
    ("model.lora_rank=0", r"model.lora_rank: 0 is less than the minimum of 1"),
    ("dataset.on_bad_image=ignore", r"dataset.on_bad_image: 'ignore' is not one of"),
    ("training.learning_rat=0.1", r"training: Additional properties are not allowed \('learning_rat' was unexpected\)"),
    ("split.test_fraction=0.7", r"split.test_fraction: 0.7 is greater than or equal to the maximum of 0.5"),
    ("model.resolution=500", r"model.resolution: 500 is not a multiple of 8"),
    ("prompt.template=A chest X-ray", r"prompt.template: 'A chest X-ray' does not match"),
    ("dataset.labels=[]", r"dataset.labels: \[\] should be non-empty"),
])
def test_bad_values_are_refused_naming_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config([REPO / "config" / "config.yaml"], [override])


def test_split_must_leave_patients_for_training() -> None:
    with pytest.raises(ConfigError, match="at least 20% of patients for training"):
        load_config([REPO / "config" / "config.yaml"], ["split.val_fraction=0.4", "split.test_fraction=0.45"])


def test_missing_and_malformed_config_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config([tmp_path / "nope.yaml"])
    (tmp_path / "bad.yaml").write_text("dataset: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config([tmp_path / "bad.yaml"])


def test_overrides_between_reproduces_the_effective_config() -> None:
    base = load_config([REPO / "config" / "config.yaml"])
    effective = apply_overrides(base, ["split.seed=7", "dataset.labels=[A, B]", "training.max_train_steps=12"])
    assert apply_overrides(base, ["training.learning_rate=5e-3"])["training"]["learning_rate"] == 0.005
    flags = overrides_between(base, effective)
    assert sorted(flags) == ['dataset.labels=["A", "B"]', "split.seed=7", "training.max_train_steps=12"]
    assert apply_overrides(base, flags) == effective
    assert overrides_between(base, base) == []


def test_schema_documents_a_default_for_every_leaf() -> None:
    schema = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())
    for section, body in schema["properties"].items():
        for key, spec in body["properties"].items():
            assert "default" in spec and "description" in spec, f"{section}.{key}"


def test_string_scalars_from_snakemake_overrides_are_coerced_by_schema_type() -> None:
    # `snakemake --config 'split={seed: 7}'` delivers nested values as strings.
    config = load_config([REPO / "config" / "config.yaml"])
    config["split"]["seed"] = "7"
    config["balance"]["max_per_label"] = "null"
    config["training"]["gradient_checkpointing"] = "true"
    config["training"]["mixed_precision"] = "no"  # an enum of strings: must stay the string "no"
    from workflow_scripts.config import validate_config

    validate_config(config)
    assert config["split"]["seed"] == 7 and config["balance"]["max_per_label"] is None
    assert config["training"]["gradient_checkpointing"] is True and config["training"]["mixed_precision"] == "no"
    config["split"]["seed"] = "seven"
    with pytest.raises(ConfigError, match="split.seed: 'seven' is not of type 'integer'"):
        validate_config(config)
