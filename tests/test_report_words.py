"""Words of the table and fidelity page that a reader acts on: the audit's real-test verdict (checked by
simulating the audit's own threshold), plurals, the share of more_real explained, the landing summary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from workflow_scripts.fidelity.report import negative_control_verdict
from workflow_scripts.report.report_pages import markdown_page, summary_fragment


def _audit_verdicts(rng: np.random.Generator, copies: float, reps: int = 1000, calibration: int = 2000, n: int = 200,
                    quantile: float = 1.0) -> float:
    """Share of simulated audits reading "above calibration": the threshold is the quantile of real
    val -> train distances (as audit.calibrated_threshold); `copies` of the test films lie closer."""
    above = 0
    for _ in range(reps):
        threshold = np.percentile(rng.gamma(4.0, size=calibration), quantile)
        test = rng.gamma(4.0, size=n)
        test[rng.random(n) < copies] = 0.0  # near-identical films of other patients
        above += "above calibration" in negative_control_verdict(int((test < threshold).sum()), n, quantile)
    return above / reps


def test_the_real_test_verdict_reads_above_calibration_rarely_by_chance_and_mostly_when_it_is() -> None:
    rng = np.random.default_rng(0)
    assert _audit_verdicts(rng, copies=0.0) < 0.06  # the calibrated rate itself: a false alarm about 5 % of the time
    assert _audit_verdicts(rng, copies=0.04, reps=200) > 0.8  # 4 % near-copies on top of 1 %: seen
    assert "as calibrated" in negative_control_verdict(5, 200, 1.0)  # the 5 of 200 at 1 %


def test_the_landing_summary_holds_the_headline_every_arm_and_the_caveats(tmp_path: Path) -> None:
    (tmp_path / "comparison.md").write_text(
        "# Do synthetic chest X-rays help a classifier?\n\n> **The data are the embedded phantoms**, not medical.\n\n"
        "**Headline: do synthetic images give a gain over ratio0 and noise?** **no synthetic arm shows it**.\n\n"
        "| arm | x |\n|---|---|\n| ratio0 | 1 |\n\n![AUROC](plots/auroc.png)\n")
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "auroc.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    pd.DataFrame({"arm": ["ratio0", "ratio50", "more_real", "ratio10"], "macro_auroc_mean": [0.81, 0.74, 0.866, 0.8],
                  "delta_vs_ratio0": [np.nan, -0.07, 0.056, -0.01], "delta_vs_ratio0_ci_low": [np.nan, -0.1, 0.026, -0.04],
                  "delta_vs_ratio0_ci_high": [np.nan, -0.04, 0.085, 0.02],
                  "verdict_vs_ratio0": ["", "loss", "gain", "no measurable difference"],
                  "mde_vs_ratio0": [np.nan, 0.05, 0.05, 0.057], "seeds": 4,
                  "test_patients": 175}).to_csv(tmp_path / "comparison.csv", index=False)
    summary = summary_fragment(tmp_path / "comparison.md", tmp_path / "comparison.csv")
    assert "Headline" in summary and "embedded phantoms" in summary
    assert "<b>more_real</b></td><td>0.866</td><td>+0.056<br><small>[+0.026, +0.085]</small></td><td>gain" in summary
    # a "no difference" says how large a difference could have hidden, and the table its n
    assert "<td>no measurable difference<br><small>could have detected ≥ +0.057</small></td>" in summary
    assert "n per arm: 4 training seeds × 175 test patients" in summary
    assert "Read before citing (1):</b> The data are the embedded phantoms" in summary
    page = markdown_page(tmp_path / "comparison.md", "t")
    assert "<table>" in page and 'src="data:image/png;base64,' in page  # the plot travels inside the page


def test_a_rerun_names_the_changed_keys_only(tmp_path: Path) -> None:
    from workflow_scripts.common.rerun_reasons import changed_keys, stage_changes

    old = {"classifier": {"epochs": 1, "seeds": [0, 1], "model": "m"}, "split": {"seed": 7}}
    new = {"classifier": {"epochs": 2, "seeds": [0, 1, 2], "model": "m"}, "split": {"seed": 7}, "hardware": {"x": True}}
    assert changed_keys(old, new) == ["classifier.epochs 1 -> 2", "classifier.seeds [0, 1] -> [0, 1, 2]",
                                      'hardware "(absent)" -> {"x": true}']
    (tmp_path / "train_classifier.yaml").write_text("# written by write_stage_config\nclassifier: {epochs: 1, model: m}\n")
    lines = stage_changes({"train_classifier": {"classifier": {"epochs": 2, "model": "m"}}, "compare": {}}, tmp_path)
    assert lines == ["  train_classifier: classifier.epochs 1 -> 2"]  # compare never ran: nothing to compare
