"""The augmentation study's design, in one place: its arms, their step budget, and which images
each arm trains on. Read by the generation plan, the classifier and the Snakemake rules.

Arms (`classifier.ratios`, `classifier.controls`; docs/study-design.md):
- `ratio{R}`: all real training images plus synthetic_count(n_real, R) synthetic ones, R % of the
  mix (`ratio0` is the real-only baseline);
- `rebalanced` (control): real images only, oversampled so that every label has exactly the
  positives of the largest synthetic arm: each synthetic image that arm draws is mirrored by a
  duplicate of a real image with the same label combination;
- `noise` (control, the null generator): the largest synthetic arm with every synthetic image
  replaced by noise of the same size (results/synthetic_noise/, row for row the same labels),
  drawn with the same function and seed, so it mirrors that arm row for row;
- `pretrain` (control, optional): the largest arm's synthetic draw alone for
  `classifier.pretrain_fraction` of the steps, then the real images alone for the rest.

- `more_real` (positive control): all real training images plus synthetic_count(n_real, R) more
  REAL images, R = `split.more_real_ratio`, drawn (stratified by label combination, per seed) from
  patients the data stage reserved before balancing (results/data/reserve.csv), whom no other arm,
  LoRA, generation plan, fidelity reference or test set sees: what as many new real X-rays would give.

The vocabulary (arm kinds, their table order, display names, references) is `ArmKind`, here only.
Every arm takes the same number of optimizer steps (`classifier.train_steps`; null: the real-only
arm's `epochs` x ceil(n_real / batch_size)) and is validated at the same steps. Synthetic draws
are stratified by label combination (the generation key): proportional allocation with largest
remainders, so an arm's label composition is the same for every seed, while each seed draws a
different subset of the pool (the plan generates `classifier.pool_headroom` times the largest need).
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from enum import StrEnum
from typing import Any

import numpy as np
import pandas as pd

from workflow_scripts.errors import ConfigError, DataError
from workflow_scripts.config import result_hash
from workflow_scripts.labels import read_csv_checked
from workflow_scripts.tables import LABEL_JOIN, SPLITS

REFERENCE = "ratio0"  # the real-only arm every other arm is compared with


class ArmKind(StrEnum):
    """The kinds of arm, in table order. Each carries its display name, the control name it answers
    to in `classifier.controls` (None for ratio arms), the pool it draws from, and the arms it is
    compared with (each such arm gives the table a Δ column family). A str, so metrics.json keeps
    the plain value (`"control_noise"`). A new arm kind is one member here plus its behaviour."""

    REAL = ("real", "real only", None, None, ())
    SYNTHETIC = ("synthetic", "real + synthetic", None, "generated", (REFERENCE, "noise", "rebalanced"))
    REBALANCED = ("control_rebalanced", "control: real, rebalanced", "rebalanced", "generated", (REFERENCE,))
    NOISE = ("control_noise", "control: noise for synthetic", "noise", "noise", (REFERENCE,))
    PRETRAIN = ("control_pretrain", "synthetic pre-training, real fine-tuning", "pretrain", "generated",
                (REFERENCE, "noise", "rebalanced"))
    MORE_REAL = ("control_more_real", "positive control: more real images", "more_real", "reserve", (REFERENCE,))

    def __new__(cls, value: str, display: str, control: str | None, pool: str | None,
                references: tuple[str, ...]) -> ArmKind:
        member = str.__new__(cls, value)
        member._value_ = value
        member.display, member.control, member.pool, member.references = display, control, pool, references
        return member

    def __str__(self) -> str:
        return self.value

    @property
    def order(self) -> int:
        return list(ArmKind).index(self)

    @property
    def is_control(self) -> bool:
        return self.control is not None


CONTROLS = tuple(kind.control for kind in ArmKind if kind.is_control)
CONTROL_KINDS = {kind.control: kind for kind in ArmKind if kind.is_control}
# Reference arms in column order (ratio0, then the controls a synthetic arm must also beat).
REFERENCES = tuple(dict.fromkeys(ref for kind in ArmKind for ref in kind.references))
ARM_PATTERN = r"ratio\d+|" + "|".join(CONTROLS)  # the {arm} wildcard
RESERVE_SPLIT = SPLITS[-1]  # the data stage's split of patients kept for the more_real control
COMPOSITION_COLUMNS = ["label", "real_positives", "synthetic_positives", "effective_positives"]
MIX_COLUMNS = ["path", "labels", "source", "phase"]


@dataclass(frozen=True)
class Arm:
    """One arm of the study. `ratio`: its synthetic share in percent (the noise arm counts its noise
    images as synthetic; the pretrain arm the share of its synthetic draw; more_real the share of its
    added real images); `draw_ratio`: whose draw it uses (its own, or the mirrored arm's for a control)."""

    name: str
    kind: ArmKind
    ratio: int
    draw_ratio: int

    @property
    def pool(self) -> str | None:
        """"generated", "noise", "reserve" or None (the real-only arm needs no pool)."""
        return self.kind.pool

    @property
    def compared_with(self) -> tuple[str, ...]:
        return self.kind.references


def table_order(arm: Arm) -> tuple[int, int, str]:
    """Rows of the table: real, ratio arms by share, then the controls in ArmKind order."""
    return arm.kind.order, arm.ratio, arm.name


def largest_ratio(config: Mapping[str, Any]) -> int:
    return max(config["classifier"]["ratios"])


def more_real_ratio(config: Mapping[str, Any]) -> int | None:
    """`split.more_real_ratio`: the synthetic share the more_real control mirrors (None: no reserve)."""
    value = config["split"].get("more_real_ratio")
    return None if value is None else int(value)


def parse_arm(name: str, config: Mapping[str, Any]) -> Arm:
    """`ratio25`, or a control name -> Arm. Controls mirror the largest ratio of `classifier.ratios`,
    which must then be above 0; more_real mirrors `split.more_real_ratio`."""
    if not re.fullmatch(ARM_PATTERN, name):
        raise ConfigError(f"arm {name!r}: expected ratio<percent> (e.g. ratio0, ratio25) or one of {list(CONTROLS)}")
    if name.startswith("ratio"):
        ratio = int(name[len("ratio"):])
        if not 0 <= ratio < 100:
            raise ConfigError(f"arm {name!r}: the synthetic share must be a percentage in [0, 100)")
        return Arm(name, ArmKind.REAL if ratio == 0 else ArmKind.SYNTHETIC, ratio, ratio)
    kind = CONTROL_KINDS[name]
    if kind is ArmKind.MORE_REAL:
        mirrored = more_real_ratio(config)
        if mirrored is None:
            raise ConfigError("the more_real control draws from patients the data stage reserves: set split.more_real_ratio "
                              "(the synthetic share it mirrors, e.g. the smallest of classifier.ratios) or drop it from "
                              "classifier.controls")
        return Arm(name, kind, mirrored, mirrored)
    top = largest_ratio(config)
    if top == 0:
        raise ConfigError(f"the {name} control mirrors the largest synthetic arm, but classifier.ratios "
                          f"{config['classifier']['ratios']} has none above 0; add one or set classifier.controls: []")
    return Arm(name, kind, 0 if kind is ArmKind.REBALANCED else top, top)


def study_arms(config: Mapping[str, Any]) -> list[Arm]:
    """The arms the configuration asks for: one per ratio (ascending), then the controls in order."""
    ratios = sorted(config["classifier"]["ratios"])
    if 0 not in ratios:
        raise ConfigError("classifier.ratios must include 0: every arm is compared with the real-only classifier")
    return [parse_arm(f"ratio{ratio}", config) for ratio in ratios] + [
        parse_arm(name, config) for name in config["classifier"].get("controls", [])]


def arm_names(config: Mapping[str, Any]) -> list[str]:
    return [arm.name for arm in study_arms(config)]


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


def phase_steps(arm: Arm, config: Mapping[str, Any], total: int) -> list[tuple[str, int]]:
    """(phase, steps) in training order; only the pretrain control has two phases."""
    if arm.kind is not ArmKind.PRETRAIN:
        return [("train", total)]
    if total < 2:
        raise ConfigError(f"the pretrain control needs at least 2 optimizer steps; classifier.train_steps gives {total}")
    pretrain = min(total - 1, max(1, round(total * float(config["classifier"].get("pretrain_fraction", 0.5)))))
    return [("pretrain", pretrain), ("finetune", total - pretrain)]


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


def arm_training_set(arm: Arm, real: pd.DataFrame, pool: pd.DataFrame | None, seed: int) -> tuple[pd.DataFrame, dict[str, Any]]:
    """What `arm` trains on for `seed`: columns path, labels, source (real | synthetic | noise |
    oversampled) and phase (train, or pretrain/finetune); real rows first, in their order. `pool`:
    the generated (or, for the noise arm, noise) images with `path` and `labels`, exclusions
    already dropped. Also returns facts for metrics.json (n_drawn, rebalance_shortfall)."""
    real_rows = pd.DataFrame({"path": real["path"].astype(str).to_numpy(), "labels": real["labels"].astype(str).to_numpy(),
                              "source": "real", "phase": "finetune" if arm.kind is ArmKind.PRETRAIN else "train"})
    n_draw = synthetic_count(len(real), arm.draw_ratio)
    info: dict[str, Any] = {"n_drawn": n_draw if arm.pool else 0}
    if not arm.pool or n_draw == 0:
        return real_rows[MIX_COLUMNS], info
    available = 0 if pool is None else len(pool)
    if arm.pool == "reserve" and 0 < available < n_draw:
        # a small dataset whose reserve had to keep its patients (the last image of a label stays in
        # training): more_real adds every reserved image, and metrics.json says how many it lacks
        info.update(n_drawn=available, more_real_shortfall=n_draw - available)
        n_draw = available
    if available < n_draw:
        raise DataError(
            f"arm {arm.name} (synthetic draw of ratio {arm.draw_ratio}%) with {len(real)} real training images needs "
            f"{n_draw} {'reserved real' if arm.pool == 'reserve' else 'synthetic'} images, but the pool lists only {available}; "
            + ("raise split.more_real_ratio" if arm.pool == "reserve" else
               "raise generation.images_per_label or classifier.pool_headroom (or lower the ratio)"))
    drawn = pool.iloc[stratified_draw(pool, n_draw, seed)]
    if arm.kind is ArmKind.REBALANCED:
        duplicates, info["rebalance_shortfall"] = oversample_mirror(real, drawn["labels"].astype(str).tolist(), seed)
        extra = duplicates.assign(source="oversampled", phase="train")
    else:  # more_real's reserved images are real images: counted as real, like the arm's own
        source = {"noise": "noise", "reserve": "real"}.get(arm.pool, "synthetic")
        extra = pd.DataFrame({"path": drawn["path"].astype(str).to_numpy(), "labels": drawn["labels"].astype(str).to_numpy(),
                              "source": source, "phase": "pretrain" if arm.kind is ArmKind.PRETRAIN else "train"})
    return pd.concat([real_rows, extra], ignore_index=True)[MIX_COLUMNS], info


def _positives(cells: Iterable[str], vocabulary: Sequence[str]) -> dict[str, int]:
    counts = dict.fromkeys(vocabulary, 0)
    for cell in cells:
        for label in set(str(cell).split(LABEL_JOIN)):
            if label in counts:
                counts[label] += 1
    return counts


def composition(mix: pd.DataFrame, vocabulary: Sequence[str]) -> pd.DataFrame:
    """composition.csv: per label of the vocabulary ("No Finding" counts images labelled so), the
    positives among the real images, among the synthetic (or noise) images, and the effective
    positives the arm trains on (real + synthetic, or real + oversampled duplicates)."""
    real = _positives(mix.loc[mix["source"] == "real", "labels"], vocabulary)
    synthetic = _positives(mix.loc[mix["source"].isin(["synthetic", "noise"]), "labels"], vocabulary)
    effective = _positives(mix["labels"], vocabulary)
    return pd.DataFrame([{"label": label, "real_positives": real[label], "synthetic_positives": synthetic[label],
                          "effective_positives": effective[label]} for label in vocabulary], columns=COMPOSITION_COLUMNS)


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
