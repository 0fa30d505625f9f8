"""The arms of the study, each kind defined once: its pool of images, how its training set is built,
which arms it is compared with, its display name and plot marker. The Snakemake rules (the pool
file a run takes, the {arm} wildcard, a target per control), the classifier (`read_pool`,
`arm_training_set`) and the table (references, order, names, markers) all read `KINDS`.

A new kind is one `register(ArmKind(...))` below (a `build` function if no existing one fits), plus
its name in config/schema.yaml's `classifier.controls` enum (docs/extending.md). The budgets, the
stratified draws and the more_real reserve the kinds use are in workflow_scripts.study.design.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from workflow_scripts.common import paths
from workflow_scripts.common.errors import ConfigError, DataError
from workflow_scripts.common.labels import read_csv_checked
from workflow_scripts.study.design import (drop_excluded, largest_ratio, more_real_ratio, oversample_mirror,
                                           read_reserve, stratified_draw, synthetic_count)
from workflow_scripts.common.tables import LABEL_JOIN, read_generation_results

REFERENCE = "ratio0"  # the real-only arm every other arm is compared with
BASELINES = ("noise", "rebalanced", "duplicate_real")  # the controls a synthetic arm must also beat, in column order (the headline's)
EXPECTED_BASELINES = ("noise", "rebalanced")  # the headline says when one of these did not run (duplicate_real is optional)
SYNTHETIC_SOURCES = ("synthetic", "noise")  # training_set.csv sources counted as synthetic images
COMPOSITION_COLUMNS = ["label", "real_positives", "synthetic_positives", "effective_positives"]
MIX_COLUMNS = ["path", "labels", "source", "phase"]


# ----------------------------------------------------------------------------- pools


@dataclass(frozen=True)
class Pool:
    """A list of images an arm draws from: train_classifier's `--synthetic`, made by
    `rules.<rule>.output.<output>` (rules/common.smk's classifier_inputs)."""

    name: str
    rule: str
    output: str
    default: str  # train_classifier's --synthetic when none is given
    what: str  # its images, in errors
    hint: str  # what to do when it holds too few
    audited: bool  # the memorization audit's flagged images are dropped from it (--exclude-synthetic)


GENERATED = Pool("generated", "merge_generation", "results", paths.GENERATED, "synthetic",
                 "raise generation.images_per_label or classifier.pool_headroom (or lower the ratio)", audited=True)
NOISE_IMAGES = Pool("noise", "make_noise_images", "results", paths.NOISE_GENERATED, "synthetic",
                    "raise generation.images_per_label or classifier.pool_headroom (or lower the ratio)", audited=True)
RESERVE = Pool("reserve", "prepare_dataset", "reserve", paths.split_csv("reserve"), "reserved real",
               "raise split.more_real_ratio", audited=False)


# ----------------------------------------------------------------------------- arm kinds

# (arm, real training split, pool or None, images to add, seed) -> the added rows (path, labels, source,
# phase) and facts for metrics.json
Build = Callable[["Arm", pd.DataFrame, "pd.DataFrame | None", int, int], "tuple[pd.DataFrame, dict[str, Any]]"]
Mirror = Callable[[str, Mapping[str, Any]], int]  # (control name, config) -> the synthetic share whose draw it takes


@dataclass(frozen=True)
class ArmKind:
    """One kind of arm. `value` is metrics.json's `arm_kind`; table order is registration order."""

    value: str
    display: str  # the table's kind column
    control: str | None  # its name in classifier.controls and its arm name (None: the ratio arms, ratio<R>)
    pool: Pool | None  # the images it draws from (None: the real split is all it needs)
    references: tuple[str, ...]  # the arms it is compared with: a Δ column family each
    marker: tuple[str, str]  # the AUROC plot's marker and colour (controls)
    build: Build  # what it adds to the real split
    mirror: Mirror | None = None  # a control's draw share (the ratio arms' is their own)
    shows_share: bool = True  # the table's synthetic share is the mirrored one (False: 0, no synthetic image added)
    phased: bool = False  # its added images alone first, then the real split alone (the pretrain control)
    reads_pool_images: bool = True  # False: only the pool's labels are read (its images are never opened)

    def __str__(self) -> str:
        return self.value

    @property
    def order(self) -> int:
        return list(KINDS).index(self.value)

    @property
    def is_control(self) -> bool:
        return self.control is not None


KINDS: dict[str, ArmKind] = {}  # value -> kind, in table order


def register(kind: ArmKind) -> ArmKind:
    if kind.value in KINDS or (kind.control and kind.control in controls()):
        raise ValueError(f"arm kind {kind.value} ({kind.control}) is registered twice")
    KINDS[kind.value] = kind
    return kind


def kind_of(value: str) -> ArmKind:
    """The kind named by metrics.json's `arm_kind`."""
    if value not in KINDS:
        raise DataError(f"arm_kind {value!r} is not one of {', '.join(KINDS)}")
    return KINDS[value]


def controls() -> tuple[str, ...]:
    return tuple(kind.control for kind in KINDS.values() if kind.control)


def references() -> tuple[str, ...]:
    """Reference arms in column order (ratio0, then the controls a synthetic arm must also beat)."""
    return tuple(dict.fromkeys(ref for kind in KINDS.values() for ref in kind.references))


def arm_pattern() -> str:
    """The {arm} wildcard: ratio<percent> or a control's name."""
    return r"ratio\d+|" + "|".join(map(re.escape, controls()))


def _largest(name: str, config: Mapping[str, Any]) -> int:
    top = largest_ratio(config)
    if top == 0:
        raise ConfigError(f"the {name} control mirrors the largest synthetic arm, but classifier.ratios "
                          f"{config['classifier']['ratios']} has none above 0; add one or set classifier.controls: []")
    return top


def _more_real(name: str, config: Mapping[str, Any]) -> int:
    mirrored = more_real_ratio(config)
    if mirrored is None:
        raise ConfigError(f"the {name} control draws from patients the data stage reserves: set split.more_real_ratio "
                          "(the synthetic share it mirrors, e.g. the smallest of classifier.ratios) or drop it from "
                          "classifier.controls")
    return mirrored


def _rows(frame: pd.DataFrame, source: str, phase: str) -> pd.DataFrame:
    return pd.DataFrame({"path": frame["path"].astype(str).to_numpy(), "labels": frame["labels"].astype(str).to_numpy(),
                         "source": source, "phase": phase})[MIX_COLUMNS]


def _enough(arm: Arm, real: pd.DataFrame, pool: pd.DataFrame | None, n: int) -> pd.DataFrame:
    available = 0 if pool is None else len(pool)
    if available < n:
        raise DataError(f"arm {arm.name} (synthetic draw of ratio {arm.draw_ratio}%) with {len(real)} real training images "
                        f"needs {n} {arm.pool.what} images, but the pool lists only {available}; {arm.pool.hint}")
    return pool


def nothing(arm: Arm, real: pd.DataFrame, pool: pd.DataFrame | None, n: int, seed: int) -> tuple[pd.DataFrame, dict]:
    """The real-only arm adds nothing."""
    return pd.DataFrame(columns=MIX_COLUMNS), {}


def drawn(source: str) -> Build:
    """`n` images of the pool, stratified by label combination (design.stratified_draw, seeded), as `source`."""

    def build(arm: Arm, real: pd.DataFrame, pool: pd.DataFrame | None, n: int, seed: int) -> tuple[pd.DataFrame, dict]:
        pool = _enough(arm, real, pool, n)
        return _rows(pool.iloc[stratified_draw(pool, n, seed)], source, "pretrain" if arm.kind.phased else "train"), {}

    return build


def mirrored_duplicates(arm: Arm, real: pd.DataFrame, pool: pd.DataFrame | None, n: int, seed: int) -> tuple[pd.DataFrame, dict]:
    """rebalanced: a real duplicate with the same label combination for each image the largest arm draws."""
    labels = _enough(arm, real, pool, n).iloc[stratified_draw(pool, n, seed)]["labels"].astype(str).tolist()
    duplicates, shortfall = oversample_mirror(real, labels, seed)
    return _rows(duplicates, "oversampled", "train"), {"rebalance_shortfall": shortfall}


def reserved(arm: Arm, real: pd.DataFrame, pool: pd.DataFrame | None, n: int, seed: int) -> tuple[pd.DataFrame, dict]:
    """more_real: new real images of reserved patients, drawn like a synthetic arm's, counted as real."""
    info: dict[str, Any] = {}
    if pool is not None and 0 < len(pool) < n:
        # a small dataset whose reserve had to keep its patients (the last image of a label stays in
        # training): more_real adds every reserved image, and metrics.json says how many it lacks
        info.update(n_drawn=len(pool), more_real_shortfall=n - len(pool))
        n = len(pool)
    return drawn("real")(arm, real, pool, n, seed)[0], info


def duplicated(arm: Arm, real: pd.DataFrame, pool: pd.DataFrame | None, n: int, seed: int) -> tuple[pd.DataFrame, dict]:
    """duplicate_real (Pink et al. 2026): `n` duplicates of real training images drawn uniformly, in
    seeded random order pass after pass (each image repeated as evenly as possible): the largest
    arm's image count and exposure, with the real split's label prevalence (unlike rebalanced)."""
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(real)) for _ in range(-(-n // len(real)))])[:n]
    return _rows(real.iloc[np.sort(order)], "oversampled", "train"), {}


REAL = register(ArmKind("real", "real only", None, None, (), ("s", "black"), nothing))
SYNTHETIC = register(ArmKind("synthetic", "real + synthetic", None, GENERATED, (REFERENCE, *BASELINES), ("s", "black"),
                             drawn("synthetic")))
REBALANCED = register(ArmKind("control_rebalanced", "control: real, rebalanced", "rebalanced", GENERATED, (REFERENCE,),
                              ("D", "tab:blue"), mirrored_duplicates, _largest, shows_share=False, reads_pool_images=False))
DUPLICATE_REAL = register(ArmKind("control_duplicate_real", "control: real duplicates, count-matched", "duplicate_real", None,
                                  (REFERENCE,), ("P", "tab:orange"), duplicated, _largest, shows_share=False))
NOISE = register(ArmKind("control_noise", "control: noise for synthetic", "noise", NOISE_IMAGES, (REFERENCE,),
                         ("x", "tab:red"), drawn("noise"), _largest))
PRETRAIN = register(ArmKind("control_pretrain", "synthetic pre-training, real fine-tuning", "pretrain", GENERATED,
                            (REFERENCE, *BASELINES), ("^", "tab:green"), drawn("synthetic"), _largest, phased=True))
MORE_REAL = register(ArmKind("control_more_real", "positive control: more real images", "more_real", RESERVE, (REFERENCE,),
                             ("*", "tab:purple"), reserved, _more_real))


# ----------------------------------------------------------------------------- arms


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
    def pool(self) -> Pool | None:
        return self.kind.pool

    @property
    def compared_with(self) -> tuple[str, ...]:
        return self.kind.references


def table_order(arm: Arm) -> tuple[int, int, str]:
    """Rows of the table: real, ratio arms by share, then the controls in KINDS order."""
    return arm.kind.order, arm.ratio, arm.name


def parse_arm(name: str, config: Mapping[str, Any]) -> Arm:
    """`ratio25`, or a control name -> Arm. A control's draw share is its kind's `mirror`."""
    if not re.fullmatch(arm_pattern(), name):
        raise ConfigError(f"arm {name!r}: expected ratio<percent> (e.g. ratio0, ratio25) or one of {list(controls())}")
    if name.startswith("ratio"):
        ratio = int(name[len("ratio"):])
        if not 0 <= ratio < 100:
            raise ConfigError(f"arm {name!r}: the synthetic share must be a percentage in [0, 100)")
        return Arm(name, REAL if ratio == 0 else SYNTHETIC, ratio, ratio)
    kind = next(kind for kind in KINDS.values() if kind.control == name)
    draw = kind.mirror(name, config)
    return Arm(name, kind, draw if kind.shows_share else 0, draw)


def study_arms(config: Mapping[str, Any]) -> list[Arm]:
    """The arms the configuration asks for: one per ratio (ascending), then the controls in order."""
    ratios = sorted(config["classifier"]["ratios"])
    if 0 not in ratios:
        raise ConfigError("classifier.ratios must include 0: every arm is compared with the real-only classifier")
    return [parse_arm(f"ratio{ratio}", config) for ratio in ratios] + [
        parse_arm(name, config) for name in config["classifier"].get("controls", [])]


def arm_names(config: Mapping[str, Any]) -> list[str]:
    return [arm.name for arm in study_arms(config)]


def phase_steps(arm: Arm, config: Mapping[str, Any], total: int) -> list[tuple[str, int]]:
    """(phase, steps) in training order; only a phased kind (pretrain) has two."""
    if not arm.kind.phased:
        return [("train", total)]
    if total < 2:
        raise ConfigError(f"the {arm.name} control needs at least 2 optimizer steps; classifier.train_steps gives {total}")
    pretrain = min(total - 1, max(1, round(total * float(config["classifier"].get("pretrain_fraction", 0.5)))))
    return [("pretrain", pretrain), ("finetune", total - pretrain)]


# ----------------------------------------------------------------------------- what an arm trains on


def read_pool(arm: Arm, pool_csv: str | Path | None, exclude_csv: str | Path | None) -> tuple[pd.DataFrame | None, int]:
    """The pool `arm` draws from (with a `path` column) minus the images listed in `exclude_csv`
    (audited pools only), and how many were dropped. A kind that reads only labels never opens the
    pool's image files."""
    pool_kind = arm.pool
    if pool_kind is None:
        return None, 0
    if pool_csv is None:
        raise DataError(f"arm {arm.name} needs its image list (--synthetic, e.g. {pool_kind.default})")
    if pool_kind is RESERVE:  # new real images: the data stage's reserve.csv, never audited
        return read_reserve(Path(pool_csv)), 0
    if arm.kind.reads_pool_images:
        pool = read_generation_results(pool_csv)
    else:
        pool = read_csv_checked(Path(pool_csv), ["file", "labels"], "synthetic image list", "; run the generation stage first")
        pool = pool.assign(path=pool["file"])
    # The noise list names the generated image each noise image replaces; the two cannot be swapped.
    if (pool_kind is NOISE_IMAGES) != ("source_file" in pool.columns):
        raise DataError(f"--synthetic {pool_csv}: arm {arm.name} needs a {pool_kind.name} image list "
                        f"({pool_kind.default}, made by the {pool_kind.rule} rule)")
    excluded: list[str] = []
    if exclude_csv is not None and pool_kind.audited:
        excluded = read_csv_checked(Path(exclude_csv), ["file"], "synthetic exclusion list (--exclude-synthetic)")["file"].tolist()
    return drop_excluded(pool, excluded)


def arm_training_set(arm: Arm, real: pd.DataFrame, pool: pd.DataFrame | None, seed: int) -> tuple[pd.DataFrame, dict[str, Any]]:
    """What `arm` trains on for `seed`: columns path, labels, source (real | synthetic | noise |
    oversampled) and phase (train, or pretrain/finetune); real rows first, in their order. `pool`:
    the arm's pool (read_pool), exclusions already dropped. Also returns facts for metrics.json
    (n_drawn, and a kind's own, e.g. rebalance_shortfall)."""
    real_rows = _rows(real, "real", "finetune" if arm.kind.phased else "train")
    n = synthetic_count(len(real), arm.draw_ratio)
    info: dict[str, Any] = {"n_drawn": n}
    if n == 0:
        return real_rows, info
    added, facts = arm.kind.build(arm, real, pool, n, seed)
    return pd.concat([real_rows, added], ignore_index=True)[MIX_COLUMNS], {**info, **facts}


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
    synthetic = _positives(mix.loc[mix["source"].isin(SYNTHETIC_SOURCES), "labels"], vocabulary)
    effective = _positives(mix["labels"], vocabulary)
    return pd.DataFrame([{"label": label, "real_positives": real[label], "synthetic_positives": synthetic[label],
                          "effective_positives": effective[label]} for label in vocabulary], columns=COMPOSITION_COLUMNS)
