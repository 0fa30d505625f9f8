"""Loading and validating the workflow configuration, shared by Snakemake and the command line.

Defaults live in config/schema.yaml (Stable Diffusion 1.5 values); config files overlay them.
Each stage declares the configuration it reads in STAGE_CONFIG. Snakemake writes exactly that part
to results/config/<stage>.yaml (rules/common.smk), so a job re-runs exactly when it changes, and the
stage reads it back restricted to the same declaration: reading anything else fails by name.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import string
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from workflow_scripts.common.errors import ConfigError, run_stage
from workflow_scripts.common.label_text import vocabulary_clashes

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "config" / "schema.yaml"


# What each stage reads: whole sections, or single keys as "section.key". The rule of the same name
# gets exactly this (and re-runs when it changes); the stage cannot read anything else.
STAGE_CONFIG: dict[str, tuple[str, ...]] = {
    "prepare_dataset": ("dataset", "split", "balance", "prompt"),
    "verify_dataset": ("dataset", "verify", "model.resolution", "model.crop"),
    "train_lora": ("dataset", "split", "balance", "prompt", "model", "training", "hardware"),
    "plan_generation": ("dataset", "prompt", "generation", "classifier.ratios", "classifier.pool_headroom"),
    "generate_label": ("dataset", "prompt", "model", "generation", "hardware", "classifier.ratios",
                       "classifier.pool_headroom"),
    "merge_generation": (),
    "make_noise_images": (),
    # The classifier keys a run reads, and not seeds, controls or the pool headroom: adding a seed or
    # a control leaves the runs already made alone.
    "train_classifier": ("dataset", "split", "balance", *(f"classifier.{key}" for key in (
        "model", "pretrained", "allow_random_init", "image_size", "epochs", "batch_size", "learning_rate", "weight_decay", "ratios",
        "bootstrap_samples", "num_workers", "train_steps", "validation_every", "pretrain_fraction", "deterministic")),
                         "hardware.allow_tf32", "hardware.cudnn_benchmark"),
    "audit_memorization": ("dataset", "model", "evaluation"),
    "evaluate_fidelity": ("dataset", "model", "evaluation", "classifier.bootstrap_samples"),
    "compare": ("dataset", "split", "model", "generation", "classifier"),
    "estimate_cost": ("dataset.labels", "split", "model.resolution", "model.lora_rank", "model.pretrained", "training",
                      "generation", "classifier", "evaluation"),
    "reader_study": ("dataset.labels", "model.resolution", "model.crop", *(f"reader_study.{key}" for key in (
        "images_per_label", "real_splits", "repeats", "image_size", "seed"))),
    "score_reader_study": ("reader_study.answers_dir", "reader_study.bootstrap_samples", "reader_study.seed"),
    "plan_power": ("dataset", "classifier"),
    "download_weights": ("model.pretrained", "classifier.model", "classifier.pretrained", "classifier.allow_random_init",
                         "evaluation"),
}


# Declared keys that a stage reads but that do not change what it computes: how fast it runs, how
# far a run goes, what it logs. Declared, a change still reaches the stage (its rule re-runs and reads
# the new value), but `result_hash` leaves them out, so the result keeps its identity.
NOT_RESULT: dict[str, tuple[str, ...]] = {
    "train_lora": ("hardware",),
    "train_classifier": ("classifier.num_workers",),
}


class DeclaredConfig(dict):
    """A stage's configuration holding only what the stage declares. Reading anything else would be
    a value whose change does not re-run the stage's rule, so it fails, naming the key and stage."""

    def __init__(self, values: Mapping[str, Any], stage: str, prefix: str = "") -> None:
        super().__init__()
        self.stage, self.prefix = stage, prefix
        for key, value in values.items():
            self[key] = DeclaredConfig(value, stage, f"{prefix}{key}.") if isinstance(value, Mapping) else value

    def __missing__(self, key: str) -> Any:
        raise ConfigError(
            f"stage {self.stage} reads config '{self.prefix}{key}', which it does not declare: add it to "
            f"STAGE_CONFIG[{self.stage!r}] in workflow_scripts/common/config.py (its rule then re-runs when it changes)"
        )

    def get(self, key: str, default: Any = None) -> Any:
        """A declared key's value. Every declared key is present (the schema fills its default), so a
        default could only stand in for an undeclared key, and hide that a change of it would not
        re-run the stage: an undeclared key fails as with `config[key]`, default or not."""
        if key not in self:
            raise ConfigError(f"stage {self.stage} reads config '{self.prefix}{key}' with an in-code default "
                              f"{default!r}, but does not declare it: add it to STAGE_CONFIG[{self.stage!r}] in "
                              "workflow_scripts/common/config.py (the schema's default applies then)")
        return self[key]


def stage_config(config: Mapping[str, Any], stage: str) -> dict[str, Any]:
    """The part of a validated `config` that `stage` declares in STAGE_CONFIG, as plain data."""
    if stage not in STAGE_CONFIG:
        raise ConfigError(f"unknown stage {stage!r}; the stages are {', '.join(STAGE_CONFIG)}")
    part: dict[str, Any] = {}
    for item in STAGE_CONFIG[stage]:
        section, _, key = item.partition(".")
        if key:
            part.setdefault(section, {})[key] = copy.deepcopy(config[section][key])
        else:
            part[section] = copy.deepcopy(dict(config[section]))
    # Keys sorted, so that the order of keys in a config file never counts as a change.
    return json.loads(json.dumps(part, sort_keys=True))


def result_config(config: Mapping[str, Any], stage: str, ignore: Iterable[str] = ()) -> dict[str, Any]:
    """What defines a result of `stage`: the part of `config` it declares, less NOT_RESULT[stage] and
    less `ignore` (whole sections or "section.key"), e.g. the keys a resumed run may change."""
    part = stage_config(config, stage)
    for item in (*NOT_RESULT.get(stage, ()), *ignore):
        section, _, key = item.partition(".")
        if key:
            part.get(section, {}).pop(key, None)
        else:
            part.pop(section, None)
    return part


def result_hash(config: Mapping[str, Any], stage: str, ignore: Iterable[str] = ()) -> str:
    """The fingerprint of what defines a result of `stage` (`result_config`), recorded in its outputs."""
    return config_hash(result_config(config, stage, ignore))


def write_stage_config(path: str | Path, stage: str, declared: Mapping[str, Any]) -> None:
    """<paths.STAGE_CONFIG>/<stage>.yaml: what `stage_config` gave, as the file the stage then reads."""
    with open(path, "w") as handle:
        handle.write(f"# The configuration stage {stage} reads (STAGE_CONFIG in workflow_scripts/common/config.py).\n")
        yaml.safe_dump(dict(declared), handle, sort_keys=False)


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Merge `update` into a copy of `base` the way Snakemake merges config files (dicts
    recursively, everything else replaced)."""
    merged = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_scalar(text: str) -> Any:
    """YAML, except that `5e-3` is a number (PyYAML's YAML 1.1 would keep it a string)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "infinity") else value
        except ValueError:
            pass
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """`training.learning_rate=2e-4` -> (["training", "learning_rate"], 0.0002); values are YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. training.learning_rate=2e-4")
    return key.strip().split("."), parse_scalar(raw)


def apply_overrides(config: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    result = copy.deepcopy(dict(config))
    for text in overrides:
        keys, value = parse_override(text)
        node = result
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: {key!r} is not a section")
        node[keys[-1]] = value
    return result


def _load_schema() -> dict[str, Any]:
    with open(SCHEMA_PATH) as handle:
        return yaml.safe_load(handle)


def _as_integer(value: Any, types: list[str], where: str) -> Any:
    """A float with no fractional part (7.0, 1e9) where the schema asks for an integer, as that
    integer with a note: JSON Schema counts 7.0 as an integer, but numpy seeds and the messages
    ("1000000000.0 px") need the int. 7.5 stays a float, for the schema to refuse by key."""
    if (isinstance(value, float) and not isinstance(value, bool) and "integer" in types and "number" not in types
            and math.isfinite(value) and value.is_integer()):
        print(f"note: {where}: {value!r} read as the integer {int(value)}", file=sys.stderr)
        return int(value)
    return value


YAML_NULLS = ("null", "Null", "NULL", "~")


def _coerce(value: Any, spec: Mapping[str, Any], where: str = "") -> Any:
    """`value` as the number, boolean or null the schema `spec` asks for, where it is a string that
    reads as one or a float that is a whole number where an integer is asked for; lists item by item
    and mappings key by key; anything else unchanged."""
    if isinstance(value, dict):
        coerce_scalars(value, spec, where)
        return value
    if isinstance(value, list):
        return [_coerce(item, spec.get("items", {}), f"{where}[{index}]") for index, item in enumerate(value)]
    types = spec.get("type", [])
    types = [types] if isinstance(types, str) else types
    if isinstance(value, str) and value.strip() in YAML_NULLS and "null" in types:
        # `--config "dataset={patient_column: null}"`: Snakemake's parser keeps `null` a string; for a
        # key that allows null it means null (a column literally named "null" cannot be named so).
        return None
    if not isinstance(value, str) or not types or "string" in types:
        return _as_integer(value, types, where)
    parsed = _as_integer(parse_scalar(value), types, where)
    if isinstance(parsed, bool):
        accepted = "boolean" in types
    else:
        accepted = (isinstance(parsed, int) and "integer" in types) or (
            isinstance(parsed, (int, float)) and "number" in types) or (parsed is None and "null" in types)
    return parsed if accepted else value


def coerce_scalars(config: dict[str, Any], schema: Mapping[str, Any], where: str = "") -> None:
    """Turn strings into the numbers, booleans or nulls the schema asks for, in place, also inside
    lists: `snakemake --config 'classifier={seeds: [0, 1]}'` parses nested values with YAML's
    BaseLoader, which keeps every scalar a string; without this '0' would be refused. Whole floats
    where an integer is asked for become ints (with a note); `where` is the dotted key so far."""
    for key, spec in schema.get("properties", {}).items():
        if key in config:
            config[key] = _coerce(config[key], spec, f"{where}{key}" if not where else f"{where}.{key}")


def nonfinite_errors(value: Any, where: str = "") -> list[str]:
    """'dotted.key: nan is not a finite number' for every NaN or infinity in `value`: every comparison
    with NaN is false, so the schema's ranges (minimum, maximum) would let it through."""
    if isinstance(value, Mapping):
        return [error for key, item in value.items() for error in nonfinite_errors(item, f"{where}.{key}" if where else str(key))]
    if isinstance(value, list):
        return [error for index, item in enumerate(value) for error in nonfinite_errors(item, f"{where}[{index}]")]
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{where}: {value!r} is not a finite number; every number of the configuration must be finite"]
    return []


def config_errors(config: Mapping[str, Any]) -> list[str]:
    """Every schema violation and non-finite number as 'dotted.key: what is wrong', in a stable order."""
    validator = jsonschema.Draft202012Validator(_load_schema())
    messages = []
    for error in sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path))):
        where = ".".join(str(part) for part in error.absolute_path) or "(top level)"
        messages.append(f"{where}: {error.message}")
    return messages + nonfinite_errors(config)


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """Validate in place with Snakemake's validator (which fills in the schema's defaults) after
    listing every error in plain words. Returns the same dict."""
    from snakemake.utils import validate  # imported here: Snakemake is heavy to import

    coerce_scalars(config, _load_schema())
    errors = config_errors(config)
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
    validate(config, str(SCHEMA_PATH), set_default=True)
    _check_cross_field_rules(config)
    _no_reserve_without_more_real(config)
    return config


def _no_reserve_without_more_real(config: dict[str, Any]) -> None:
    """The data stage reserves patients only for the more_real control: without it in
    classifier.controls, split.more_real_ratio would take patients from training for nothing."""
    split, controls = config["split"], config.get("classifier", {}).get("controls", [])
    if split.get("more_real_ratio") is not None and "more_real" not in controls:
        print(f"note: split.more_real_ratio {split['more_real_ratio']} read as null: classifier.controls {controls} has no "
              "more_real, so no patients are reserved for it", file=sys.stderr)
        split["more_real_ratio"] = None


LABEL_JOIN = "|"  # labels within a cell of the split CSVs (tables.LABEL_JOIN; kept here to check names)
PROMPT_FIELDS = ("labels",)  # the placeholders tables.make_prompt fills


def prompt_template_problem(template: str) -> str | None:
    """Why `template` cannot make one prompt per label set (an unknown or positional placeholder,
    a stray brace, no {labels}), or None. Checked at config time, not after every image is decoded."""
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as error:
        return f"{error} (write a literal brace as {{{{ or }}}})"
    unknown = [field for field in fields if field not in PROMPT_FIELDS]
    if unknown:
        shown = ", ".join("{" + field + "}" for field in unknown)
        return f"placeholder(s) {shown} are not filled by the workflow; the only placeholder is {{labels}}"
    if not fields:
        return "no {labels} placeholder: every image would get the same prompt"
    try:
        template.format(labels="Mass")
    except ValueError as error:  # a bad format spec, e.g. {labels:d}
        return f"cannot be filled ({error})"
    return None


def _check_cross_field_rules(config: Mapping[str, Any]) -> None:
    split = config["split"]
    if split["val_fraction"] + split["test_fraction"] >= 0.8:
        raise ConfigError(
            "split.val_fraction + split.test_fraction must leave at least 20% of patients for "
            f"training; got {split['val_fraction']} + {split['test_fraction']}"
        )
    if split["val_fraction"] == 0:
        raise ConfigError("split.val_fraction: 0 leaves the val split empty, but the classifier picks its best "
                          "checkpoint on val; give val a share of the patients (e.g. 0.15)")
    dataset = config["dataset"]
    joined = [label for label in dataset["labels"] if LABEL_JOIN in label]
    if joined:
        raise ConfigError(f"dataset.labels: {joined} contain {LABEL_JOIN!r}, the character the split files join "
                          "labels with, so they would be read back as two labels; rename them (e.g. '_' for '|')")
    clashes = vocabulary_clashes(dataset["labels"])
    if clashes:
        raise ConfigError("dataset.labels: " + "; ".join(clashes) + ". If two of them are one finding, keep one spelling "
                          "(and write it so in the label file); otherwise rename one")
    for key in ("csv", "images"):
        if dataset[key].startswith("~"):
            raise ConfigError(f"dataset.{key}: {dataset[key]!r} starts with '~', which is not expanded to your home "
                              "folder; write the full path")
    problem = prompt_template_problem(config["prompt"]["template"])
    if problem:
        raise ConfigError(f"prompt.template: {config['prompt']['template']!r}: {problem}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key written twice in one mapping is an error: PyYAML keeps
    the last value and drops the first without a word (a second `split:` block loses the first's seed)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.setdefault(key, key_node.start_mark.line)
        except TypeError:  # an unhashable key: construct_mapping says so
            continue
        if first != key_node.start_mark.line:
            raise ConfigError(f"{key_node.start_mark.name}: key {key!r} is written twice, on line {first + 1} and on line "
                              f"{key_node.start_mark.line + 1}; YAML would keep only the second: merge them into one")
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """One config file as a mapping; a missing file, bad YAML, a duplicate key or a top level that is
    not a mapping is a ConfigError naming the file (and the lines)."""
    try:
        with open(path) as handle:
            loaded = yaml.load(handle, Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as error:
        raise ConfigError(_yaml_error(path, error)) from None
    if loaded is None:  # Snakemake refuses such a file too, naming neither file nor line
        raise ConfigError(f"{path}: the config file is empty (or holds only comments); write the keys to change, or "
                          "leave the file out")
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return loaded


def _yaml_error(path: str | Path, error: yaml.YAMLError) -> str:
    """One line naming the file, the line and column, and what is wrong (a tab is the usual culprit)."""
    mark = getattr(error, "problem_mark", None)
    where = f"{path} line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    if "\t" in problem or "'\\t'" in problem:
        problem += " (a tab: YAML indents with spaces only)"
    return f"{where}: not valid YAML: {problem}"


def check_config_files(paths: Iterable[str | Path]) -> None:
    """Read config files strictly: a duplicate key (PyYAML keeps the last without a word), bad YAML
    (a tab) or an empty file is refused naming the file and line, which Snakemake's reader does not."""
    for path in paths:
        read_config_file(path)


def load_config(paths: Iterable[str | Path], overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Merge YAML files in order, apply `--set` overrides, validate and fill defaults."""
    config: dict[str, Any] = {}
    for path in paths:
        config = deep_merge(config, read_config_file(path))
    return validate_config(apply_overrides(config, overrides))


def config_hash(section: Any) -> str:
    """A short, stable fingerprint of (part of) a configuration, recorded in outputs."""
    return hashlib.sha256(json.dumps(section, sort_keys=True, default=str).encode()).hexdigest()[:16]


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", nargs="+", default=["config/config.yaml"], metavar="FILE",
        help="config file(s), merged in order (default: config/config.yaml)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
        help="override one key, e.g. --set split.seed=7 (repeatable)",
    )


def load_stage_config(paths: Iterable[str | Path], stage: str, overrides: Iterable[str] = ()) -> DeclaredConfig:
    """`load_config`, restricted to what `stage` declares (see STAGE_CONFIG)."""
    return DeclaredConfig(stage_config(load_config(paths, overrides), stage), stage)


def config_from_args(args: argparse.Namespace, stage: str) -> DeclaredConfig:
    return load_stage_config(args.config, stage, args.overrides)


# ----------------------------------------------------------------------------- key reference


def _type_text(spec: Mapping[str, Any]) -> str:
    if "enum" in spec:
        return " \\| ".join(f"`{value}`" for value in spec["enum"])
    types = spec.get("type", "")
    text = " or ".join(types) if isinstance(types, list) else types
    if text == "array" and "items" in spec:
        text = f"list of {spec['items'].get('type', 'values')}"
    limits = [f"{word} {spec[key]}" for key, word in [("minimum", "≥"), ("exclusiveMinimum", ">"),
                                                       ("maximum", "≤"), ("exclusiveMaximum", "<"),
                                                       ("multipleOf", "multiple of")] if key in spec]
    return ", ".join([text, *limits])


def reference_markdown(schema: Mapping[str, Any] | None = None) -> str:
    """docs/config-reference.md: every key of the schema with its type, default and meaning."""
    schema = schema or _load_schema()
    lines = ["# Configuration reference", "",
             "Generated from `config/schema.yaml` by `python -m workflow_scripts.common.config --reference`; do not edit.",
             "Defaults are the values for Stable Diffusion 1.5 at 512 px on one GPU; `config/config.yaml` (the demo)",
             "overrides some of them. Which stage reads which section: `STAGE_CONFIG` in `workflow_scripts/common/config.py`.",
             ""]
    stages = {section: [stage for stage, items in STAGE_CONFIG.items() if any(i.split(".")[0] == section for i in items)]
              for section in schema["properties"]}
    for section, body in schema["properties"].items():
        lines += [f"## `{section}`", "", " ".join(body.get("description", "").split())]
        if stages[section]:
            lines[-1] += f" Read by: {', '.join(stages[section])}."
        lines += ["", "| key | type | default | meaning |", "|---|---|---|---|"]
        for key, spec in body["properties"].items():
            default = json.dumps(spec.get("default"), ensure_ascii=False)
            meaning = " ".join(str(spec.get("description", "")).split()).replace("|", "\\|")
            lines.append(f"| `{section}.{key}` | {_type_text(spec)} | `{default}` | {meaning} |")
        lines.append("")
    return "\n".join(lines)


@run_stage
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Configuration tools.")
    parser.add_argument("--reference", action="store_true", help="print the per-key reference (docs/config-reference.md)")
    add_config_arguments(parser)
    parser.add_argument("--stage", choices=list(STAGE_CONFIG), help="print the part of the config this stage reads")
    args = parser.parse_args(argv)
    if args.reference:
        print(reference_markdown(), end="")
    else:
        config = load_config(args.config, args.overrides)
        print(yaml.safe_dump(stage_config(config, args.stage) if args.stage else config, sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
