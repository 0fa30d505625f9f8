"""The final table: AUROC math, paired deltas, rows and columns, rare labels, honest caveats."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from conftest import REPO
from workflow_scripts.compare import auroc_columns, compare, rare_labels
from workflow_scripts.config import load_config

LABELS = ["Effusion", "Mass", "Pneumonia", "No Finding"]
CLASSES = LABELS[:3]


def test_auroc_columns_match_sklearn_including_ties_and_missing_classes() -> None:
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 2, (60, 3)).astype(float)
    scores = np.round(rng.random((60, 3)), 1)  # many ties
    targets[:, 2] = 0  # no positive: undefined
    got = auroc_columns(targets, scores)
    for k in range(2):
        assert got[k] == pytest.approx(roc_auc_score(targets[:, k], scores[:, k]))
    assert np.isnan(got[2])


def test_rare_labels_are_the_third_with_fewest_training_images() -> None:
    train = pd.DataFrame({"labels": ["Effusion"] * 9 + ["Mass"] * 5 + ["Pneumonia"] + ["No Finding"] * 4})
    assert rare_labels(train, CLASSES) == ["Pneumonia"]


def write_inputs(root: Path, ratios: list[int], seeds: list[int], identical: bool) -> dict[str, Path]:
    """Everything compare reads, as the earlier stages would have written it."""
    rng = np.random.default_rng(1)
    data = root / "data"
    data.mkdir(parents=True)
    image = root / "img.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(image)
    train_labels = ["Effusion"] * 6 + ["Mass"] * 4 + ["Pneumonia"] + ["No Finding"] * 3
    pd.DataFrame({"path": str(image), "labels": train_labels, "prompt": "p", "patient": range(len(train_labels)), "split": "train"}
                 ).to_csv(data / "train.csv", index=False)
    test_labels = ["Effusion", "Mass|Effusion", "Pneumonia", "No Finding", "Mass", "Pneumonia", "No Finding", "Effusion"] * 5
    truth = np.array([[c in labels.split("|") for c in CLASSES] for labels in test_labels], float)
    for ratio in ratios:
        for seed in seeds:
            run = root / "classifier" / f"ratio{ratio}_seed{seed}"
            run.mkdir(parents=True)
            noise = 0.0 if identical else rng.normal(0, 0.3 + ratio / 100, truth.shape)
            probs = np.clip(truth * 0.6 + 0.2 + noise, 0, 1)
            frame = pd.DataFrame({"path": [f"t{i}.png" for i in range(len(test_labels))], "labels": test_labels})
            for k, label in enumerate(CLASSES):
                frame[f"prob_{label}"] = probs[:, k]
            frame.to_csv(run / "predictions.csv", index=False)
            (run / "metrics.json").write_text(json.dumps({"n_real_train": 14, "n_synthetic_train": round(14 * ratio / (100 - ratio)),
                                                          "pretrained_weights": "none (classifier.pretrained: false)", "versions": {}}))
    evaluation = root / "evaluation"
    evaluation.mkdir()
    rows = [{"label": label, "n_real": 5, "n_synthetic": 4, "fid": "unavailable: no Inception weights",
             "kid_mean": "unavailable: no Inception weights", "kid_std": "", "domain_fd": 12.5, "notes": ""} for label in LABELS] + [
        {"label": "overall", "n_real": 14, "n_synthetic": 16, "fid": "unavailable: no Inception weights",
         "kid_mean": "unavailable: no Inception weights", "kid_std": "", "domain_fd": 9.0, "notes": ""}]
    pd.DataFrame(rows).to_csv(evaluation / "fidelity.csv", index=False)
    (evaluation / "fidelity.json").write_text(json.dumps({"settings": {"tool": "pytorch-fid 0.3.0", "dims": 2048, "resize": "bilinear 299",
                                                                      "inception_status": "unavailable: no Inception weights"}}))
    (evaluation / "audit_summary.json").write_text(json.dumps({"n": 16, "flagged": 1, "thresholds": {
        "feature_cosine_distance": 0.02, "pixel_mean_abs_difference": 0.03}}))
    lora = root / "lora_summary.json"
    lora.write_text(json.dumps({"steps": 10, "epochs": 1, "train_images": 14, "train_seconds": 3.5, "images_per_second": 40.0,
                                "device": "cpu", "base_model": "results/models/tiny-sd", "lora_rank": 4}))
    synthetic = root / "generation_results.csv"
    pd.DataFrame({"file": [str(image)] * 4, "labels": CLASSES + ["No Finding"]}).to_csv(synthetic, index=False)
    return {"data": data, "classifier": root / "classifier", "evaluation": evaluation, "lora": lora, "synthetic": synthetic}


def run_compare(tmp_path: Path, identical: bool = False, ratios=(0, 10, 25, 50), seeds=(0, 1, 2)) -> tuple[pd.DataFrame, Path]:
    paths = write_inputs(tmp_path / "in", list(ratios), list(seeds), identical)
    config = load_config([REPO / "config" / "config.yaml"], [f"dataset.labels={LABELS}", f"classifier.ratios={list(ratios)}",
                                                            f"classifier.seeds={list(seeds)}", "classifier.bootstrap_samples=50"])
    out = tmp_path / "out"
    table = compare(config, paths["classifier"], paths["evaluation"], paths["lora"], paths["data"], paths["synthetic"], out)
    return table, out


def test_table_has_a_row_per_ratio_and_the_promised_columns(tmp_path: Path) -> None:
    table, out = run_compare(tmp_path)
    assert table["synthetic_percent"].tolist() == [0, 10, 25, 50]
    for column in ("macro_auroc_mean", "macro_auroc_std", "macro_auroc_ci_low", "macro_auroc_ci_high", "delta_vs_0",
                   "delta_ci_low", "delta_ci_high", "auroc_Effusion", "auroc_Mass", "auroc_Pneumonia (rare)",
                   "fid_overall", "kid_overall", "domain_fd_overall", "audit_flagged", "lora_train_seconds", "lora_images_per_second"):
        assert column in table.columns, column
    assert table["delta_vs_0"].iloc[0] == 0.0
    assert (table["macro_auroc_ci_low"] <= table["macro_auroc_mean"] + 0.05).all()
    assert (table["macro_auroc_ci_high"] >= table["macro_auroc_ci_low"]).all()
    assert table["audit_flagged"].iloc[0] == "1/16" and table["fid_overall"].iloc[0].startswith("unavailable")
    assert pd.read_csv(out / "comparison.csv").shape == table.shape
    for plot in ("auroc_vs_ratio.png", "fidelity_per_label.png", "real_vs_synthetic.png"):
        assert (out / "plots" / plot).stat().st_size > 5_000


def test_identical_runs_give_a_zero_delta_with_a_zero_width_paired_ci(tmp_path: Path) -> None:
    table, _ = run_compare(tmp_path, identical=True)
    assert np.allclose(table["delta_vs_0"], 0) and np.allclose(table["delta_ci_low"], 0) and np.allclose(table["delta_ci_high"], 0)
    assert np.allclose(table["macro_auroc_std"], 0)


def test_markdown_says_what_the_numbers_are_and_are_not(tmp_path: Path) -> None:
    _, out = run_compare(tmp_path)
    page = (out / "comparison.md").read_text()
    assert "random weights" in page and "phantoms" in page  # the demo's figures are labelled as such
    assert "unavailable: no Inception weights" in page  # the reason, stated once above the tables
    assert page.count("unavailable: no Inception weights") == 1 and "| unavailable (see note) |" in page
    assert "mean absolute pixel difference 0.03" in page
    assert "Pneumonia †" in page
    assert sum(line.startswith("| 50% |") for line in page.splitlines()) == 1
    assert '"seeds": [\n      0,\n      1,\n      2\n    ]' in page  # provenance block


def test_ratios_without_zero_are_refused_by_the_schema() -> None:
    from workflow_scripts.config import ConfigError

    with pytest.raises(ConfigError, match="classifier.ratios"):
        load_config([REPO / "config" / "config.yaml"], ["classifier.ratios=[10, 25]"])
