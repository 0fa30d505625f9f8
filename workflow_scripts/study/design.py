"""The augmentation study's shared machinery: the step budget every arm takes, how images are drawn
from a pool, and the patients reserved for the more_real control. Read by the generation plan, the
data stage and the arm kinds (workflow_scripts.study.arms, where each arm is defined; docs/study-design.md).

Every arm takes the same number of optimizer steps (`classifier.train_steps`; null: the real-only
arm's `epochs` x ceil(n_real / batch_size)) and is validated at the same steps. Synthetic draws
are stratified by label combination (the generation key): proportional allocation with largest
remainders, so an arm's label composition is the same for every seed, while each seed draws a
different subset of the pool (the plan generates `classifier.pool_headroom` times the largest need).
The more_real reserve: whole training patients, taken before balancing, that no other arm, LoRA,
generation plan, fidelity reference or test set sees.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from workflow_scripts.common.errors import ConfigError, DataError
from workflow_scripts.common.config import result_hash
from workflow_scripts.common.labels import read_csv_checked
from workflow_scripts.common.tables import LABEL_JOIN, SPLITS

RESERVE_SPLIT = SPLITS[-1]  # the data stage's split of patients kept for the more_real control


def largest_ratio(config: Mapping[str, Any]) -> int:
    return max(config["classifier"]["ratios"])


def more_real_ratio(config: Mapping[str, Any]) -> int | None:
    """`split.more_real_ratio`: the synthetic share the more_real control mirrors (None: no reserve)."""
    value = config["split"].get("more_real_ratio")
    return None if value is None else int(value)


def study_hash(config: Mapping[str, Any]) -> str:
    """metrics.json's `config_hash`: equal for all arms and seeds of one study (seeds, controls and
    the pool headroom are not train_classifier's result-defining keys: config.result_hash)."""
    return result_hash(config, "train_classifier")


# ----------------------------------------------------------------------------- budgets


def synthetic_count(n_real: int, ratio: int) -> int:
    """Synthetic images for a `ratio` percent synthetic share with `n_real` real ones:
    round(n_real * ratio / (100 - ratio)), halves rounded up, in exact integer arithmetic."""
    if not 0 <= ratio < 100:
        raise ValueError(f"ratio must be a percentage in [0, 100); got {ratio}")
    return (2 * n_real * ratio + (100 - ratio)) // (2 * (100 - ratio))


def pool_size_needed(config: Mapping[str, Any], n_real: int) -> int:
    """Synthetic images the generation plan must provide: the largest arm's draw times
    `classifier.pool_headroom`, so that its seeds draw different subsets."""
    needed = synthetic_count(n_real, largest_ratio(config))
    return math.ceil(needed * float(config["classifier"].get("pool_headroom", 2.0)) - 1e-9)


def steps_per_epoch(n_real: int, batch_size: int) -> int:
    return max(1, math.ceil(n_real / batch_size))


def train_steps(config: Mapping[str, Any], n_real: int) -> int:
    """Optimizer steps of every arm: `classifier.train_steps`, or the real-only arm's
    `epochs` x ceil(n_real / batch_size)."""
    settings = config["classifier"]
    if settings.get("train_steps"):
        return int(settings["train_steps"])
    return int(settings["epochs"]) * steps_per_epoch(n_real, int(settings["batch_size"]))


def validation_points(config: Mapping[str, Any], n_real: int) -> list[int]:
    """The optimizer steps after which every arm is validated: every `classifier.validation_every`
    steps (null: one real-only epoch) and always after the last step."""
    total = train_steps(config, n_real)
    every = config["classifier"].get("validation_every") or steps_per_epoch(n_real, int(config["classifier"]["batch_size"]))
    points = list(range(int(every), total + 1, int(every)))
    return points if points and points[-1] == total else [*points, total]


def batch_schedule(phases_of_rows: Sequence[str], phases: Sequence[tuple[str, int]], batch_size: int,
                   seed: int) -> list[list[int]]:
    """Row indices of every optimizer step's batch. Within a phase, the rows of that phase in
    seeded random order, pass after pass (every row once per pass); batches are always full, so
    the step count is exactly the budget whatever the size of the mix."""
    rng = np.random.default_rng(seed)
    phases_of_rows = np.asarray(phases_of_rows)
    schedule: list[list[int]] = []
    for phase, steps in phases:
        rows = np.flatnonzero(phases_of_rows == phase)
        if rows.size == 0:
            raise ConfigError(f"phase {phase!r} has no training images")
        needed = steps * batch_size
        order = np.concatenate([rng.permutation(rows) for _ in range(-(-needed // rows.size))])[:needed]
        schedule += order.reshape(steps, batch_size).tolist()
    return schedule


# ----------------------------------------------------------------------------- draws


def allocate(sizes: Mapping[str, int], n: int) -> dict[str, int]:
    """Split `n` over strata in proportion to their sizes, by largest remainders (Hamilton). Ties
    in the remainder go to the larger stratum, then to the first in the given order: the result
    depends on the sizes only, never on a seed."""
    total = sum(sizes.values())
    if n > total:
        raise ValueError(f"cannot draw {n} from {total}")
    if n == 0 or total == 0:
        return {key: 0 for key in sizes}
    quotas = {key: n * size / total for key, size in sizes.items()}
    counts = {key: math.floor(quota) for key, quota in quotas.items()}
    order = sorted(sizes, key=lambda key: (-(quotas[key] - counts[key]), -sizes[key], list(sizes).index(key)))
    for key in order[: n - sum(counts.values())]:
        counts[key] += 1
    return counts


def stratified_draw(pool: pd.DataFrame, n: int, seed: int) -> np.ndarray:
    """Positions (ascending) of `n` rows of `pool` drawn without replacement, stratified by the
    `labels` column (one stratum per generation key): `allocate` fixes how many from each stratum,
    np.random.default_rng(seed) which ones."""
    if n > len(pool):
        raise ValueError(f"cannot draw {n} from {len(pool)}")
    labels = pool["labels"].astype(str).to_numpy()
    strata = {key: np.flatnonzero(labels == key) for key in sorted(set(labels))}
    counts = allocate({key: rows.size for key, rows in strata.items()}, n)
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(rows, size=counts[key], replace=False) for key, rows in strata.items() if counts[key]]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=int)


def drop_excluded(pool: pd.DataFrame, excluded: Iterable[str]) -> tuple[pd.DataFrame, int]:
    """The pool without the images listed in `excluded` (generation_results `file` values, e.g. the
    memorization audit's flags); the noise pool matches on its `source_file` column, so the noise
    arm loses the rows the generated arm loses. Returns the pool and how many rows were dropped."""
    excluded = {os.path.normpath(str(path)) for path in excluded}
    if not excluded:
        return pool, 0
    column = "source_file" if "source_file" in pool.columns else "file"
    keep = ~pool[column].astype(str).map(os.path.normpath).isin(excluded)
    return pool[keep.to_numpy()].reset_index(drop=True), int((~keep).sum())


def oversample_mirror(real: pd.DataFrame, mirrored_labels: Sequence[str], seed: int) -> tuple[pd.DataFrame, int]:
    """Duplicates of real images, one per entry of `mirrored_labels` (the label cells of the images
    the largest synthetic arm draws), each with the same label combination: real images with
    exactly those labels, cycled in seeded random order so each is repeated as evenly as possible.
    Where no real image has exactly that combination, images holding all of its labels stand in;
    where none does, the entry is left out. Returns the duplicates and how many were left out."""
    rng = np.random.default_rng(seed)
    cells = real["labels"].astype(str).to_numpy()
    label_sets = [frozenset(cell.split(LABEL_JOIN)) for cell in cells]
    rows, missing = [], 0
    wanted = pd.Series(list(mirrored_labels), dtype=str).value_counts(sort=False)
    for cell, count in sorted(wanted.items()):
        candidates = np.flatnonzero(cells == cell)
        if candidates.size == 0:
            need = frozenset(cell.split(LABEL_JOIN))
            candidates = np.array([i for i, have in enumerate(label_sets) if need <= have], dtype=int)
        if candidates.size == 0:
            missing += int(count)
            continue
        order = np.concatenate([rng.permutation(candidates) for _ in range(-(-int(count) // candidates.size))])
        rows += order[: int(count)].tolist()
    duplicates = real.iloc[sorted(rows)]
    return pd.DataFrame({"path": duplicates["path"].astype(str).to_numpy(),
                         "labels": duplicates["labels"].astype(str).to_numpy()}), missing


# ----------------------------------------------------------------------------- the more_real reserve


def reserve_patients(train: pd.DataFrame, ratio: int | None, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The training split (before balancing) without, and with only, the patients kept for the
    more_real control (`split.more_real_ratio`). Whole patients, in seeded random order, until the
    reserve holds at least synthetic_count(images left, ratio) images: as many new real images as
    the ratio arm adds synthetic ones, i.e. about `ratio` % of the training images, which every arm
    then trains without (the cost of the positive control). A patient who holds the last training
    image of a label stays in training. The reserve's rows get split "reserve"."""
    if ratio is None or train.empty:
        return train, train.iloc[:0].assign(split=RESERVE_SPLIT)
    if not 0 < ratio < 100:
        raise ConfigError(f"split.more_real_ratio: {ratio} is not a percentage in (0, 100)")
    patients = train["patient"].astype(str).to_numpy()
    labels = [set(cell.split(LABEL_JOIN)) if isinstance(cell, str) else set(cell) for cell in train["labels"]]
    left = Counter(label for cell in labels for label in cell)
    rows: dict[str, list[int]] = {}
    for row, patient in enumerate(patients):
        rows.setdefault(patient, []).append(row)
    kept: list[str] = []
    reserved, total = 0, len(train)
    for patient in np.random.default_rng(seed).permutation(np.array(sorted(rows), dtype=object)):
        if reserved >= synthetic_count(total - reserved, ratio):
            break
        theirs = Counter(label for row in rows[patient] for label in labels[row])
        if reserved + len(rows[patient]) >= total or any(left[label] <= count for label, count in theirs.items()):
            continue  # training keeps at least one image, and one of every label it has
        left.subtract(theirs)
        kept.append(patient)
        reserved += len(rows[patient])
    chosen = np.isin(patients, kept)
    return train[~chosen].reset_index(drop=True), train[chosen].reset_index(drop=True).assign(split=RESERVE_SPLIT)


def read_reserve(path: Path) -> pd.DataFrame:
    """The more_real control's pool: results/data/reserve.csv (path, labels, ...), refused when empty."""
    reserve = read_csv_checked(path, ["path", "labels", "patient", "split"], "more_real reserve",
                               "; run prepare_dataset with split.more_real_ratio set")
    if reserve.empty:
        raise DataError(f"{path}: no reserved patients; the more_real control needs split.more_real_ratio set before "
                        "prepare_dataset runs")
    return reserve
