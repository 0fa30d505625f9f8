"""What `compare` (the stage) computes and `compare_report` renders: the runs, arms and figures of one study."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from workflow_scripts import stats

DEMO_CSV = "results/demo_data/Data_Entry_2017.csv"
REFERENCE = "ratio0"  # the real-only arm every other arm is compared with
CONTROL_REFERENCES = {"noise": "control_noise", "rebalanced": "control_rebalanced"}  # column name -> arm_kind
AGE_BANDS = ((0, 40, "<40"), (40, 60, "40-59"), (60, 200, ">=60"))


@dataclass
class Run:
    path: Path
    metrics: dict[str, Any]
    images: list[str]
    scores: np.ndarray  # (images, classes), rows in the order of `images`
    composition: pd.DataFrame


@dataclass
class Arm:
    name: str
    kind: str
    ratio: int
    runs: list[Run] = field(default_factory=list)

    def counts(self, key: str) -> int | str:
        """One figure for the arm; "a-b" if its seeds differ (they should not)."""
        values = sorted({int(run.metrics[key]) for run in self.runs})
        return values[0] if len(values) == 1 else f"{values[0]}-{values[-1]}"


@dataclass
class Study:
    arms: dict[str, Arm]
    classes: list[str]
    positives: np.ndarray  # test positives per class
    evaluated: np.ndarray  # bool per class: trained on, and enough test positives to be shown and averaged
    boot: dict[str, stats.ArmBootstrap]
    diffs: dict[str, dict[str, stats.Difference]]  # reference column -> arm -> difference
    references: dict[str, str]  # reference column -> arm name
    n_images: int
    n_patients: int
    untrained: tuple[str, ...] = ()  # labels without training images (dataset.allow_absent_labels): never shown
