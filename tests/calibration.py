"""A simulated study for the calibration tests: classifier runs of every arm built as `Run` objects
and driven through the project's own `comparison.analyse` -> `compare.comparison_table`, so a rate
measured here is the rate of the table's verdicts, not of a formula.

The test set is clustered by patient (1 + Poisson films each; a patient random effect raises both
the chance of a finding and the scores of all their films). A run's score for a film is
    label separation · target + patient effect + film difficulty      (shared by every run)
  + arm × film noise                                                   (shared by an arm's seeds)
  + (planted effect + seed quality) · target + seed × film noise       (one run)
so the table sees all three variance components the study has: seeds, patients, and their
interaction. `DEMO` is tuned to the demo's measured components (plan_power on the demo's runs:
seed-level sd of one run's macro AUROC 0.0085, patient-level sd of a Δ 0.0121 at 175 patients
x ~2.4 films with 3 seeds; ratio0 macro AUROC ~0.81)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from workflow_scripts.study import compare
from workflow_scripts.study.comparison import Run, Study, analyse
from workflow_scripts.study.arms import parse_arm

SEVEN_ARMS = ("ratio0", "ratio10", "ratio25", "ratio50", "rebalanced", "noise", "more_real")
PAIR = ("ratio0", "more_real")
CONFIG = {"classifier": {"ratios": [0, 10, 25, 50]}, "split": {"more_real_ratio": 50}}


@dataclass(frozen=True)
class Design:
    n_patients: int = 175
    films: float = 2.4  # mean films per patient
    n_labels: int = 4
    n_seeds: int = 3
    arms: tuple[str, ...] = SEVEN_ARMS
    separation: float = 2.7  # label signal on the score scale
    seed_sd: float = 0.095  # seed quality (score scale), common to a run's labels
    seed_film_sd: float = 1.8  # seed x film noise: the interaction
    arm_film_sd: float = 1.3  # arm x film noise, shared by an arm's seeds
    n_boot: int = 100


DEMO = Design()


def simulate(rng: np.random.Generator, design: Design, effects: dict[str, float] | None = None
             ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """targets (films, labels), patient ids (films,), scores per arm (seeds, films, labels)."""
    effects = effects or {}
    d = design
    patient = np.repeat(np.arange(d.n_patients), 1 + rng.poisson(d.films - 1, d.n_patients))
    n, shape = len(patient), (len(patient), d.n_labels)
    u = rng.normal(0, 1, (d.n_patients, d.n_labels))[patient]
    targets = (rng.random(shape) < 1 / (1 + np.exp(1.5 - u))).astype(float)
    base = d.separation * targets + 0.5 * u + rng.normal(0, 1, shape)
    scores = {}
    for name in d.arms:
        arm = base + rng.normal(0, d.arm_film_sd, shape)
        quality = effects.get(name, 0.0) + rng.normal(0, d.seed_sd, (d.n_seeds, 1, 1))
        scores[name] = arm[None] + quality * targets[None] + rng.normal(0, d.seed_film_sd, (d.n_seeds, n, d.n_labels))
    return targets, patient, scores


def runs_of(scores: dict[str, np.ndarray]) -> dict[str, list[Run]]:
    metrics = {"optimizer_steps": 40, "n_real_train": 100, "n_synthetic_train": 0}
    empty = pd.DataFrame()
    return {name: [Run(Path(f"{name}_seed{s}"), metrics, [], run, empty) for s, run in enumerate(arm)]
            for name, arm in scores.items()}


def study(rng: np.random.Generator, design: Design, effects: dict[str, float] | None = None) -> tuple[pd.DataFrame, Study]:
    """One simulated study: its comparison table (analyse -> compare.comparison_table, indexed by arm) and Study."""
    targets, patient, scores = simulate(rng, design, effects)
    arms = {name: parse_arm(name, CONFIG) for name in design.arms}
    classes = [f"L{k}" for k in range(design.n_labels)]
    result = analyse(arms, runs_of(scores), targets, patient, classes, 3, design.n_boot)
    return compare.comparison_table(result).set_index("arm"), result


def table(rng: np.random.Generator, design: Design, effects: dict[str, float] | None = None) -> pd.DataFrame:
    return study(rng, design, effects)[0]


def tables(repeats: int, design: Design, effects: dict[str, float] | None = None, seed: int = 0) -> list[pd.DataFrame]:
    rng = np.random.default_rng(seed)
    return [table(rng, design, effects) for _ in range(repeats)]


@dataclass
class Rates:
    """What `repeats` simulated tables read, for the arm `planted` (its Δ vs ratio0) and the rest."""

    repeats: int
    gain: np.ndarray  # planted arm reads gain vs ratio0
    flagged: np.ndarray  # planted arm reads gain or loss vs ratio0
    covered: np.ndarray  # its 95 % Δ interval covers the planted arm's true Δ (0 when nothing is planted)
    delta: np.ndarray
    mde: np.ndarray
    null_family: np.ndarray  # any other arm of the ratio0 family reads gain or loss (all truly equal to ratio0)
    headline: np.ndarray  # the headline reads yes
    planned: np.ndarray  # plan_power's expected MDE from this study for `plan_seeds` seeds (NaN unless asked)
    se2: np.ndarray  # the planted arm's SE² of its Δ vs ratio0
    df: np.ndarray  # and its degrees of freedom

    def df_from_spread(self) -> float:
        """The df that SE²'s spread across the studies shows, 2 E[SE²]² / Var(SE²): what the printed
        df (Satterthwaite's, per study) estimates."""
        return float(2 * self.se2.mean() ** 2 / self.se2.var(ddof=1))

    @staticmethod
    def se(share: float, repeats: int) -> float:
        return float(np.sqrt(max(share * (1 - share), 1e-12) / repeats))


def rates(repeats: int, design: Design, effect: float = 0.0, planted: str = "more_real", seed: int = 0,
          truth: float = 0.0, plan_seeds: int | None = None) -> Rates:
    """Run `repeats` studies with `effect` planted in `planted` and tally the table's verdicts."""
    from workflow_scripts.study import power, stats

    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(repeats):
        frame, result = study(rng, design, {planted: effect} if effect else None)
        row = frame.loc[planted]
        others = frame.drop(index=["ratio0", planted])
        planned = float("nan")
        if plan_seeds:
            components = power.variance_components(result.boot, result.evaluated)
            level = stats.ALPHA / (len(design.arms) - 1)
            planned = power.planned_mde(components, plan_seeds, 1, level, len(design.arms))
        difference = result.diffs["ratio0"][planted]
        rows.append((row["verdict_vs_ratio0"] == stats.GAIN, row["verdict_vs_ratio0"] != stats.NO_DIFFERENCE,
                     row["delta_vs_ratio0_ci_low"] <= truth <= row["delta_vs_ratio0_ci_high"], row["delta_vs_ratio0"],
                     row["mde_vs_ratio0"], bool((others["verdict_vs_ratio0"] != stats.NO_DIFFERENCE).any()),
                     bool(frame.get("verdict_headline", pd.Series(dtype=str)).eq(stats.GAIN).any()), planned,
                     difference.se ** 2, difference.df))
    return Rates(repeats, *(np.array(column) for column in zip(*rows)))


__all__ = ["DEMO", "Design", "PAIR", "Rates", "SEVEN_ARMS", "rates", "replace", "simulate", "study", "table", "tables"]
