"""Configuration: shipped configs stand alone on the schema's SD 1.5 defaults, bad values are refused by
key, overrides of lists are coerced, and each stage sees only the configuration it declares."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO
from workflow_scripts.common.errors import ConfigError
from workflow_scripts.common.config import (
    NOT_RESULT,
    STAGE_CONFIG,
    DeclaredConfig,
    apply_overrides,
    load_config,
    load_stage_config,
    result_config,
    result_hash,
    stage_config,
    validate_config,
)

SHIPPED = sorted((REPO / "config").glob("*.yaml"))
REAL_DATA = ["nih_chestxray14.yaml", "chexpert.yaml", "generic_csv.yaml"]


@pytest.mark.parametrize("path", [p for p in SHIPPED if p.name != "schema.yaml"], ids=lambda p: p.name)
def test_shipped_configs_validate_and_keep_the_seed_knob_names(path: Path) -> None:
    config = load_config([path])  # each config stands alone on the schema's defaults
    for section, key in [("model", "lora_rank"), ("model", "lora_alpha"), ("training", "train_batch_size"),
                         ("training", "gradient_accumulation_steps"), ("training", "gradient_checkpointing"),
                         ("training", "mixed_precision"), ("training", "use_8bit_adam"), ("training", "num_train_epochs"),
                         ("training", "save_steps"), ("training", "validation_steps"), ("hardware", "enable_attention_slicing"),
                         ("hardware", "enable_vae_slicing"), ("hardware", "enable_xformers")]:
        assert key in config[section]
    assert config["dataset"]["format"] in {"nih", "chexpert", "csv"}


def test_real_data_configs_use_sd15_at_512_and_their_vocabularies() -> None:
    nih = load_config([REPO / "config" / "nih_chestxray14.yaml"])
    assert nih["model"]["resolution"] == 512 and "stable-diffusion-v1-5" in nih["model"]["pretrained"]
    assert len(nih["dataset"]["labels"]) == 15 and "Pleural_Thickening" in nih["dataset"]["labels"]
    chexpert = load_config([REPO / "config" / "chexpert.yaml"])
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
    ("prompt.template=A chest X-ray", r"prompt.template: 'A chest X-ray': no \{labels\} placeholder"),
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


def test_overrides_are_yaml_values() -> None:
    base = load_config([REPO / "config" / "config.yaml"])
    effective = apply_overrides(base, ["split.seed=7", "dataset.labels=[A, B]", "training.learning_rate=5e-3"])
    assert effective["split"]["seed"] == 7 and effective["dataset"]["labels"] == ["A", "B"]
    assert effective["training"]["learning_rate"] == 0.005 and base["split"]["seed"] == 42


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
    validate_config(config)
    assert config["split"]["seed"] == 7 and config["balance"]["max_per_label"] is None
    assert config["training"]["gradient_checkpointing"] is True and config["training"]["mixed_precision"] == "no"
    config["split"]["seed"] = "seven"
    with pytest.raises(ConfigError, match="split.seed: 'seven' is not of type 'integer'"):
        validate_config(config)


def test_list_and_nested_overrides_are_coerced_like_scalars() -> None:
    # `snakemake --config 'classifier={seeds: [0, 1]}'` delivers list items as strings too.
    config = load_config([REPO / "config" / "config.yaml"])
    config["classifier"]["seeds"] = ["0", "1"]
    config["classifier"]["ratios"] = ["0", "25"]
    config["training"]["validation_prompts"] = ["7"]  # a list of strings stays strings
    validate_config(config)
    assert config["classifier"]["seeds"] == [0, 1] and config["classifier"]["ratios"] == [0, 25]
    assert config["training"]["validation_prompts"] == ["7"]
    config["classifier"]["seeds"] = ["0", "x"]
    with pytest.raises(ConfigError, match="classifier.seeds.1: 'x' is not of type 'integer'"):
        validate_config(config)


def test_effective_lora_settings_of_every_shipped_config(capsys: pytest.CaptureFixture[str]) -> None:
    keys = [("model", "lora_rank"), ("model", "lora_alpha"), ("training", "learning_rate"), ("model", "resolution"),
            ("model", "pretrained")]
    with capsys.disabled():
        print("\nconfig: " + ", ".join(f"{section}.{key}" for section, key in keys))
        for path in SHIPPED:
            if path.name != "schema.yaml":
                config = load_config([path])
                print(f"  {path.name}: " + ", ".join(str(config[section][key]) for section, key in keys))
    for name in REAL_DATA:
        config = load_config([REPO / "config" / name])
        assert [config[section][key] for section, key in keys] == [
            4, 4, 1.0e-4, 512, "stable-diffusion-v1-5/stable-diffusion-v1-5"], name


def test_real_data_configs_hold_only_what_they_mean() -> None:
    # Training, generation and evaluation settings come from the schema, so a change of recipe is made once;
    # the one dataset-specific model key is CheXpert's padding of its non-square films.
    for name in REAL_DATA:
        values = yaml.safe_load((REPO / "config" / name).read_text())
        assert set(values) <= {"dataset", "split", "balance", "model"}, (name, set(values))
        assert values.get("model", {}) == ({"crop": "pad"} if name == "chexpert.yaml" else {}), name
    assert load_config([REPO / "config" / "chexpert.yaml"])["model"]["crop"] == "pad"
    assert load_config([REPO / "config" / "nih_chestxray14.yaml"])["model"]["crop"] == "center"


def test_a_stage_sees_only_what_it_declares() -> None:
    config = load_stage_config([REPO / "config" / "config.yaml"], "plan_generation")
    assert config["classifier"]["ratios"] == [0, 10, 25, 50] and config["generation"]["plan"] == "fixed"
    with pytest.raises(ConfigError, match=r"stage plan_generation reads config 'classifier.epochs', which it does not "
                                          r"declare.*STAGE_CONFIG\['plan_generation'\]"):
        config["classifier"]["epochs"]
    with pytest.raises(ConfigError, match="stage plan_generation reads config 'training'"):
        config.get("training")
    assert set(stage_config(load_config([REPO / "config" / "config.yaml"]), "merge_generation")) == set()


def test_a_stage_reading_an_undeclared_section_fails(tmp_path: Path) -> None:
    from workflow_scripts.generation.pipeline import generation_plan

    train = pd.DataFrame({"labels": ["Mass", "Effusion"]})
    declared = load_stage_config([REPO / "config" / "config.yaml"], "plan_generation")
    assert generation_plan(declared, train)["count"].sum() > 0
    # The same function handed the classifier's configuration reads `generation`, which it lacks.
    with pytest.raises(ConfigError, match="stage train_classifier reads config 'generation'"):
        generation_plan(load_stage_config([REPO / "config" / "config.yaml"], "train_classifier"), train)


def test_every_rule_gets_its_own_stage_config() -> None:
    """A rule that runs a stage reads results/config/<its name>.yaml, and each declared stage has a rule."""
    rules = {}
    for smk in (REPO / "rules").glob("*.smk"):
        for block in re.split(r"^(?=(?:rule|checkpoint) )", smk.read_text(), flags=re.M)[1:]:
            rules[re.match(r"\w+ (\w+):", block).group(1)] = block
    shared = {"train_classifier_seed": "train_classifier",  # one seed alone runs the arm rule's stage
              "generate_without_lora": "generate_label"}  # the LoRA-off control samples as generate_label does
    for name, block in rules.items():
        if "--config" in block:
            stage = shared.get(name, name)
            assert f'stage_config_file("{stage}")' in block and "--config {input.config}" in block, name
    assert set(STAGE_CONFIG) <= set(rules)


def test_committed_config_reference_is_up_to_date() -> None:
    from workflow_scripts.common.config import reference_markdown

    committed = (REPO / "docs" / "config-reference.md").read_text()
    assert committed == reference_markdown(), "regenerate: python -m workflow_scripts.common.config --reference > docs/config-reference.md"
    assert "| `model.lora_rank` | integer, ≥ 1, ≤ 256 | `4` |" in committed


def test_one_function_says_what_defines_a_result() -> None:
    """result_hash: every declared key but NOT_RESULT's and `ignore`'s moves it; those do not. A new
    result-defining key needs only its STAGE_CONFIG declaration."""
    config = load_config([REPO / "config" / "config.yaml"])
    for stage, items in STAGE_CONFIG.items():
        base = result_hash(config, stage)
        for item in items:
            section, _, key = item.partition(".")
            keys = [key] if key else list(config[section])
            for name in keys:
                value = config[section][name]
                changed = {**config, section: {**config[section], name: [value, "changed"]}}
                unhashed = section in NOT_RESULT.get(stage, ()) or f"{section}.{name}" in NOT_RESULT.get(stage, ())
                assert (result_hash(changed, stage) == base) == unhashed, f"{stage}: {section}.{name}"
    # Keys a stage does not read never count; `ignore` leaves out whole sections or single keys.
    assert result_hash({**config, "generation": {}}, "train_lora") == result_hash(config, "train_lora")
    part = result_config(config, "train_lora", ignore=("dataset", "training.max_train_steps"))
    assert "dataset" not in part and "max_train_steps" not in part["training"] and "seed" in part["training"]
    assert "hardware" not in part and "num_workers" not in result_config(config, "train_classifier")["classifier"]


def test_an_in_code_default_does_not_stand_in_for_a_declaration() -> None:
    declared = DeclaredConfig(stage_config(load_config([REPO / "config" / "config.yaml"]), "train_classifier"),
                              "train_classifier")
    assert declared["classifier"].get("epochs", 99) == declared["classifier"]["epochs"]  # declared: its value
    with pytest.raises(ConfigError, match=r"classifier.controls.*in-code default \[\].*STAGE_CONFIG"):
        declared["classifier"].get("controls", [])
