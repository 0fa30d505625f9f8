"""Loading and validating the workflow configuration, shared by Snakemake and the command line.

Snakemake validates `config` in rules/common.smk and hands each stage the same files plus any
`--config` overrides (as `--set` flags), so a stage run by a rule and one run at the terminal see
the same effective configuration.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "config" / "schema.yaml"


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


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


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def overrides_between(base: Mapping[str, Any], effective: Mapping[str, Any]) -> list[str]:
    """The `--set KEY=VALUE` flags that turn `base` into `effective` (keys only added or changed;
    Snakemake overrides never remove keys). Values are written as JSON, which YAML reads back."""
    base_flat, effective_flat = _flatten(base), _flatten(effective)
    return [
        f"{key}={json.dumps(value)}"
        for key, value in sorted(effective_flat.items())
        if key not in base_flat or base_flat[key] != value
    ]


def _load_schema() -> dict[str, Any]:
    with open(SCHEMA_PATH) as handle:
        return yaml.safe_load(handle)


def coerce_scalars(config: dict[str, Any], schema: Mapping[str, Any]) -> None:
    """Turn strings into the numbers, booleans or nulls the schema asks for, in place.

    `snakemake --config 'split={seed: 7}'` parses nested values with YAML's BaseLoader, which
    keeps every scalar a string; without this such an override would be refused as '7'."""
    for key, spec in schema.get("properties", {}).items():
        value = config.get(key)
        if isinstance(value, dict):
            coerce_scalars(value, spec)
            continue
        types = spec.get("type", [])
        types = [types] if isinstance(types, str) else types
        if not isinstance(value, str) or not types or "string" in types:
            continue
        parsed = parse_scalar(value)
        if isinstance(parsed, bool):
            accepted = "boolean" in types
        else:
            accepted = (isinstance(parsed, int) and "integer" in types) or (
                isinstance(parsed, (int, float)) and "number" in types) or (parsed is None and "null" in types)
        if accepted:
            config[key] = parsed


def config_errors(config: Mapping[str, Any]) -> list[str]:
    """Every schema violation as 'dotted.key: what is wrong', in a stable order."""
    validator = jsonschema.Draft202012Validator(_load_schema())
    messages = []
    for error in sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path))):
        where = ".".join(str(part) for part in error.absolute_path) or "(top level)"
        messages.append(f"{where}: {error.message}")
    return messages


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
    return config


def _check_cross_field_rules(config: Mapping[str, Any]) -> None:
    split = config["split"]
    if split["val_fraction"] + split["test_fraction"] >= 0.8:
        raise ConfigError(
            "split.val_fraction + split.test_fraction must leave at least 20% of patients for "
            f"training; got {split['val_fraction']} + {split['test_fraction']}"
        )


def load_config(paths: Iterable[str | Path], overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Merge YAML files in order, apply `--set` overrides, validate and fill defaults."""
    config: dict[str, Any] = {}
    for path in paths:
        try:
            with open(path) as handle:
                loaded = yaml.safe_load(handle) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({error})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        config = deep_merge(config, loaded)
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


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return load_config(args.config, args.overrides)
