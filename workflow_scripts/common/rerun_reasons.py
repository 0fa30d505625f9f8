"""Which configuration keys changed since a stage last ran, in one line per stage.

Snakemake's own re-run reason for `write_stage_config` prints the whole declared configuration before
and after (kilobytes); this names the keys: `train_classifier: classifier.epochs 1 -> 2`.
rules/common.smk prints it at the start of every dry run and run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from workflow_scripts.common import paths


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """'key old -> new' for every leaf that differs (added and removed keys included), sorted by key."""
    changes = []
    for key in sorted(set(old) | set(new)):
        name, before, after = f"{prefix}{key}", old.get(key, "(absent)"), new.get(key, "(absent)")
        if isinstance(before, Mapping) and isinstance(after, Mapping):
            changes += changed_keys(before, after, f"{name}.")
        elif before != after:
            changes.append(f"{name} {json.dumps(before)} -> {json.dumps(after)}")
    return changes


def stage_changes(declared: Mapping[str, Mapping[str, Any]], folder: str | Path = paths.STAGE_CONFIG) -> list[str]:
    """One line per stage whose <folder>/<stage>.yaml exists and differs from what it declares now."""
    lines = []
    for stage, part in declared.items():
        path = Path(folder) / f"{stage}.yaml"
        if not path.is_file():
            continue
        try:
            written = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            continue
        changes = changed_keys(written, part)
        if changes:
            lines.append(f"  {stage}: {'; '.join(changes)}")
    return lines
