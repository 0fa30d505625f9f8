"""The final table from fixture run folders (no classifier training): arms and controls as rows,
refusal of mismatched runs, n/a below the positives floor, rarity with ties, verdicts, subgroups."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO
from PIL import Image

from workflow_scripts.study.compare import compare, main, rare_labels
from workflow_scripts.common.config import load_config
from workflow_scripts.common.errors import DataError

LABELS = ["Effusion", "Mass", "Pneumonia", "No Finding"]
CLASSES = LABELS[:3]
ARMS = {"ratio0": ("real", 0), "ratio10": ("synthetic", 10), "ratio50": ("synthetic", 50),
        "rebalanced": ("control_rebalanced", 0), "noise": ("control_noise", 50)}
SEEDS = (0, 1, 2)


def write_study(root: Path, arms: dict[str, tuple[str, int]] = ARMS, quality: dict[str, float] | None = None,
                demographics: bool = False, metric_overrides: dict[str, dict] | None = None) -> dict[str, Path]:
    """Everything compare reads, as the earlier stages would have written it. `quality`: per arm, how
    strongly its scores separate positives (1 = as the reference); `metric_overrides`: run -> metrics keys."""
    rng = np.random.default_rng(1)
    quality, metric_overrides = quality or {}, metric_overrides or {}
    data = root / "data"
    data.mkdir(parents=True)
    image = root / "img.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(image)
    # balanced training split: Effusion and Mass tie, as max_per_label makes them; before balancing they differ
    train_labels = ["Effusion"] * 5 + ["Mass"] * 5 + ["Pneumonia"] * 2 + ["No Finding"] * 3
    pd.DataFrame({"path": str(image), "labels": train_labels, "prompt": "p", "patient": range(len(train_labels)), "split": "train"}
                 ).to_csv(data / "train.csv", index=False)
    (data / "prepare_summary.json").write_text(json.dumps(
        {"label_counts_before_balance": {"train": {"Effusion": 900, "Mass": 40, "Pneumonia": 40, "No Finding": 2000}}}))
    # 60 patients, 2 films each; Pneumonia has only 3 positive films
    n = 120
    labels = np.array(["Effusion", "Mass", "Mass|Effusion", "No Finding"] * (n // 4), dtype=object)
    labels[[5, 50, 95]] = "Pneumonia"
    test = pd.DataFrame({"path": [f"t{i:03d}.png" for i in range(n)], "labels": labels, "prompt": "p",
                         "patient": [f"p{i // 2}" for i in range(n)], "split": "test"})
    if demographics:
        test["sex"] = np.where(np.arange(n) // 2 % 2 == 0, "F", "M")
        test["age"] = np.array([25, 45, 70])[np.arange(n) // 2 % 3]
    test.to_csv(data / "test.csv", index=False)
    truth = np.array([[c in cell.split("|") for c in CLASSES] for cell in labels], float)
    runs = []
    for arm, (kind, ratio) in arms.items():
        for seed in SEEDS:
            run = root / "classifier" / f"{arm}_seed{seed}"
            run.mkdir(parents=True)
            probs = truth * quality.get(arm, 1.0) + rng.normal(0, 0.6, truth.shape)
            frame = pd.DataFrame({"path": test["path"], "labels": labels})
            for k, label in enumerate(CLASSES):
                frame[f"prob_{label}"] = probs[:, k]
            frame.sample(frac=1, random_state=seed).to_csv(run / "predictions.csv", index=False)  # row order must not matter
            n_syn = round(15 * ratio / (100 - ratio))
            metrics = {"arm": arm, "arm_kind": kind, "ratio": ratio, "seed": seed, "optimizer_steps": 40, "config_hash": "abc123",
                       "pretrained_weights": "none (classifier.pretrained: false)", "classes": CLASSES, "n_real_train": 15,
                       "n_synthetic_train": n_syn, "versions": {}}
            metrics.update(metric_overrides.get(run.name, {}))
            (run / "metrics.json").write_text(json.dumps(metrics))
            synthetic = np.array([n_syn // 3, n_syn // 3, n_syn - 2 * (n_syn // 3)])
            # the rebalanced control repeats real images up to the largest arm's positives (ratio50: 15 synthetic)
            effective = np.array([10, 10, 7]) if kind == "control_rebalanced" else np.array([5, 5, 2]) + synthetic
            pd.DataFrame({"label": CLASSES, "real_positives": [5, 5, 2], "synthetic_positives": synthetic,
                          "effective_positives": effective}).to_csv(run / "composition.csv", index=False)
            runs.append(run)
    evaluation = root / "evaluation"
    evaluation.mkdir()
    (evaluation / "fidelity.md").write_text("## Do the synthetic images look real?\n\nKID (n=4): 0.1 (floor 0.01)\n\n"
                                            "## Memorization audit\n\n1 of 16 synthetic images flagged.\n")
    lora = root / "lora_summary.json"
    lora.write_text(json.dumps({"steps": 10, "epochs": 1, "train_images": 14, "train_seconds": 3.5, "images_per_second": 40.0,
                                "device": "cpu", "base_model": "results/models/tiny-sd", "lora_rank": 4}))
    synthetic = root / "generation_results.csv"
    pd.DataFrame({"file": [str(image)] * 4, "labels": LABELS}).to_csv(synthetic, index=False)
    return {"data": data, "summary": data / "prepare_summary.json", "runs": runs, "evaluation": evaluation / "fidelity.md",
            "lora": lora, "synthetic": synthetic}


def run_compare(tmp_path: Path, min_positives: int = 5, reader_study: Path | None = None,
                **study) -> tuple[pd.DataFrame, str, Path]:
    paths = write_study(tmp_path / "in", **study)
    config = load_config([REPO / "config" / "config.yaml"], [f"dataset.labels={LABELS}", "classifier.bootstrap_samples=200",
                                                            f"classifier.min_test_positives={min_positives}"])
    out = tmp_path / "out"
    table = compare(config, paths["runs"], paths["evaluation"], paths["lora"], paths["data"], paths["summary"], paths["synthetic"], out,
                    reader_study)
    return table, (out / "comparison.md").read_text(), out


def test_one_row_per_arm_ratio_arms_then_controls_with_control_deltas(tmp_path: Path) -> None:
    table, page, out = run_compare(tmp_path)
    assert table["arm"].tolist() == ["ratio0", "ratio10", "ratio50", "rebalanced", "noise"]
    assert table["seeds"].tolist() == [3] * 5 and (table["test_images"] == 120).all() and (table["test_patients"] == 60).all()
    assert table["n_synthetic_train"].tolist() == [0, 2, 15, 0, 15]
    synthetic = table["arm_kind"] == "synthetic"
    for column in ("delta_vs_noise", "delta_vs_rebalanced", "verdict_vs_noise", "p_holm_vs_rebalanced"):
        assert table.loc[synthetic, column].notna().all() and (table.loc[synthetic, column] != "").all(), column
    assert table.loc[~synthetic, "delta_vs_noise"].isna().all()  # controls are not compared with themselves
    assert np.isnan(table["delta_vs_ratio0"].iloc[0]) and table["delta_vs_ratio0"].iloc[1:].notna().all()
    assert (table["macro_auroc_ci_low"] < table["macro_auroc_ci_high"]).all()
    saved = pd.read_csv(out / "comparison.csv")
    assert saved.shape == table.shape and saved["arm"].tolist() == table["arm"].tolist()
    assert {p.name for p in (out / "plots").iterdir()} == {"auroc_vs_ratio.png", "real_vs_synthetic.png"}
    assert (out / "plots" / "auroc_vs_ratio.png").stat().st_size > 5_000
    assert "control: noise for synthetic" in page and "| rebalanced |" in page
    assert "Saravanan" in page and "200 resamples" in page and "Holm" in page  # the page says how intervals were made
    # label composition per arm
    assert "| Pneumonia † | 40 | 2 + 0 | 2 + 2 | 2 + 5 | 2 + 0 = 7 | 2 + 5 |" in page


def test_a_label_without_training_images_is_left_out_of_the_table(tmp_path: Path) -> None:
    # dataset.allow_absent_labels: the data stage lists the label; no classifier learned it.
    paths = write_study(tmp_path / "in")
    summary_path = paths["data"] / "prepare_summary.json"
    summary = json.loads(summary_path.read_text())
    summary_path.write_text(json.dumps({**summary, "labels_absent": ["Effusion"]}))
    config = load_config([REPO / "config" / "config.yaml"], [f"dataset.labels={LABELS}", "classifier.min_test_positives=5"])
    table = compare(config, paths["runs"], paths["evaluation"], paths["lora"], paths["data"], paths["summary"], paths["synthetic"],
                    tmp_path / "out")
    page = (tmp_path / "out" / "comparison.md").read_text()
    assert table["auroc_Effusion"].isna().all() and table["auroc_Mass"].notna().all()
    assert "n/a (no training image)" in page and "no training image (dataset.allow_absent_labels): Effusion" in page
    assert "Macro AUROC over Mass (1 of 3 labels" in page


@pytest.mark.parametrize("key, value", [("config_hash", "other"), ("pretrained_weights", "timm/resnet18.a1_in1k"),
                                        ("optimizer_steps", 80)])
def test_runs_that_differ_in_weights_config_or_steps_are_refused_by_name(tmp_path: Path, key: str, value) -> None:
    with pytest.raises(DataError, match=rf"{key} differs: .*ratio50_seed1"):
        run_compare(tmp_path, metric_overrides={"ratio50_seed1": {key: value}})


def test_the_cli_refuses_with_a_message_and_status_2(tmp_path: Path, capsys) -> None:
    paths = write_study(tmp_path / "in", metric_overrides={"noise_seed0": {"config_hash": "zzz"}})
    status = main(["--config", str(REPO / "config" / "config.yaml"), "--set", f"dataset.labels={LABELS}",
                   "--runs", *map(str, paths["runs"]), "--train", str(paths["data"] / "train.csv"),
                   "--test", str(paths["data"] / "test.csv"), "--fidelity", str(paths["evaluation"]),
                   "--prepare-summary", str(paths["summary"]), "--lora-summary", str(tmp_path / "none.json"),
                   "--synthetic", str(tmp_path / "none.csv"), "--out-dir", str(tmp_path / "out")])
    assert status == 2
    assert "config_hash differs" in capsys.readouterr().err and not (tmp_path / "out" / "comparison.md").exists()


def test_labels_below_the_positives_floor_read_na_and_leave_the_macro(tmp_path: Path) -> None:
    table, page, _ = run_compare(tmp_path, min_positives=5)
    assert table["auroc_Pneumonia"].isna().all() and table["auroc_Mass"].notna().all()
    assert (table["test_positives_Pneumonia"] == 3).all()
    assert "Macro AUROC over Effusion, Mass (2 of 3 labels; left out, fewer than 5 test positives: Pneumonia (3))" in page
    assert page.count("n/a (3 positives)") == len(table)
    shown, page, _ = run_compare(tmp_path / "low", min_positives=3)
    assert shown["auroc_Pneumonia"].notna().all() and "Macro AUROC over Effusion, Mass, Pneumonia (3 of 3 labels)" in page


def _read(root: Path) -> str:
    return (root / "out" / "comparison.md").read_text()


def test_rarity_ties_are_not_broken_by_name() -> None:
    classes = ["Atelectasis", "Hernia", "Mass", "Zebra", "Effusion", "Nodule"]
    counts = {"Atelectasis": 40, "Hernia": 10, "Mass": 40, "Zebra": 40, "Effusion": 500, "Nodule": 300}
    # two rare slots (a third of six): Hernia, then a three-way tie at 40 that all share the mark
    assert rare_labels(counts, classes) == ["Atelectasis", "Hernia", "Mass", "Zebra"]
    assert rare_labels({**counts, "Atelectasis": 41, "Zebra": 39}, classes) == ["Hernia", "Zebra"]


def test_rarity_comes_from_the_counts_before_balancing(tmp_path: Path) -> None:
    # after balancing Effusion and Mass tie at 5; before, Mass (40) and Pneumonia (40) are the rare ones
    _, page, _ = run_compare(tmp_path)
    assert "Mass † (" in page and "Pneumonia † (" in page and "Effusion † (" not in page


def test_verdict_words_follow_the_planted_differences(tmp_path: Path) -> None:
    table, page, _ = run_compare(tmp_path, quality={"ratio10": 1.0, "ratio50": 3.0, "noise": 0.2, "rebalanced": 1.0})
    verdicts = dict(zip(table["arm"], table["verdict_vs_ratio0"]))
    assert verdicts["ratio50"] == "gain" and verdicts["noise"] == "loss"
    assert verdicts["ratio10"] == "no measurable difference"
    assert dict(zip(table["arm"], table["verdict_vs_noise"]))["ratio50"] == "gain"
    holm = table.set_index("arm")["p_holm_vs_ratio0"]
    raw = table.set_index("arm")["p_vs_ratio0"]
    assert (holm.dropna() >= raw.dropna()).all()  # Holm never lowers a p-value
    assert "| gain |" in page and "| loss |" in page
    # a no-difference verdict says how small a gain the study could have seen; every compared row has its MDE
    mde = table.set_index("arm")["mde_vs_ratio0"]
    assert mde.drop("ratio0").gt(0).all() and np.isnan(mde["ratio0"])
    assert f"no measurable difference (could have detected ≥ {mde['ratio10']:+.2f})" in page
    assert table.set_index("arm")["mde_vs_noise"].dropna().index.tolist() == ["ratio10", "ratio50"]


def test_more_real_is_a_control_and_each_synthetic_delta_is_a_share_of_it(tmp_path: Path) -> None:
    arms = {**ARMS, "more_real": ("control_more_real", 50)}
    table, page, _ = run_compare(tmp_path, arms=arms, quality={"more_real": 3.0, "ratio50": 2.0, "noise": 1.0})
    rows = table.set_index("arm")
    assert table["arm"].tolist() == ["ratio0", "ratio10", "ratio50", "rebalanced", "noise", "more_real"]
    assert rows.loc["more_real", "verdict_vs_ratio0"] == "gain" and np.isnan(rows.loc["more_real", "delta_vs_noise"])
    share = rows.loc["ratio50", "delta_vs_ratio0"] / rows.loc["more_real", "delta_vs_ratio0"]
    assert rows.loc["ratio50", "share_of_more_real"] == pytest.approx(share) and 0 < share < 1
    low, high = rows.loc["ratio50", ["share_of_more_real_ci_low", "share_of_more_real_ci_high"]]
    assert low < share < high  # Fieller's interval: the ratio of two noisy Δs is never printed bare
    assert np.isnan(rows.loc["noise", "share_of_more_real"])  # only synthetic arms are stated as a share
    assert "positive control: more real images" in page and f"{share:.0%} [{low:.0%}, {high:.0%}]" in page
    # the headline: ratio50 beats ratio0, noise and rebalanced at once; its p is the largest one-sided p against a gain
    assert rows.loc["ratio50", "verdict_headline"] == "gain" and rows.loc["ratio10", "verdict_headline"] == "no measurable difference"
    one_sided = rows.loc["ratio50", ["p_gain_vs_ratio0", "p_gain_vs_noise", "p_gain_vs_rebalanced"]]
    assert rows.loc["ratio50", "p_headline"] == pytest.approx(one_sided.max())
    assert (one_sided * 2).tolist() == pytest.approx(rows.loc["ratio50", ["p_vs_ratio0", "p_vs_noise", "p_vs_rebalanced"]].tolist())
    assert "**Headline: do synthetic images give a gain over ratio0 and noise and rebalanced?** **yes**: ratio50" in page


def test_a_positive_control_without_a_gain_is_a_caveat(tmp_path: Path) -> None:
    _, page, _ = run_compare(tmp_path, arms={"ratio0": ("real", 0), "more_real": ("control_more_real", 50)})
    assert "**The positive control more_real does not read gain**" in page and "could have detected ≥ +" in page


def test_no_share_of_more_real_unless_more_real_reads_gain(tmp_path: Path) -> None:
    # more_real as good as ratio0: a share of a Δ the study cannot tell from 0 would be noise over noise
    table, page, _ = run_compare(tmp_path, arms={**ARMS, "more_real": ("control_more_real", 50)}, quality={"ratio50": 2.0})
    rows = table.set_index("arm")
    assert rows.loc["more_real", "verdict_vs_ratio0"] != "gain"
    assert rows["share_of_more_real"].isna().all() and "Δ / Δ of more_real |" not in page


def test_the_headline_needs_a_gain_over_every_reference(tmp_path: Path) -> None:
    # ratio50 beats ratio0 and rebalanced but not noise, which is as good: no headline gain
    table, page, _ = run_compare(tmp_path, quality={"ratio50": 3.0, "noise": 3.0})
    rows = table.set_index("arm")
    assert rows.loc["ratio50", "verdict_vs_ratio0"] == "gain" and rows.loc["ratio50", "verdict_headline"] == "no measurable difference"
    assert "**no synthetic arm shows it**" in page


@pytest.mark.slow  # the full suite's (the quick tier stays under 3 minutes)
def test_subgroups_by_sex_and_age_only_when_the_test_split_has_them(tmp_path: Path) -> None:
    _, page, _ = run_compare(tmp_path / "with", demographics=True)
    assert "## Subgroups" in page
    for group in ("| sex F |", "| sex M |", "| age <40 |", "| age 40-59 |", "| age >=60 |"):
        assert group in page, group
    assert "ratio50 (the largest synthetic arm, chosen by a rule fixed before any test result)" in page
    _, page, _ = run_compare(tmp_path / "without")
    assert "Subgroups" not in page


def test_fidelity_and_audit_are_included_once_from_the_fidelity_stage(tmp_path: Path) -> None:
    _, page, _ = run_compare(tmp_path / "md")
    assert page.count("KID (n=4): 0.1 (floor 0.01)") == 1 and page.count("## Memorization audit") == 1
    assert "tiny base" in page and "phantoms" in page  # the demo honesty banner: what its generator can and cannot show
    paths = write_study(tmp_path / "none" / "in")
    paths["evaluation"].unlink()
    config = load_config([REPO / "config" / "config.yaml"], [f"dataset.labels={LABELS}", "classifier.min_test_positives=5"])
    with pytest.raises(DataError, match="fidelity.md not found"):
        compare(config, paths["runs"], paths["evaluation"], paths["lora"], paths["data"], paths["summary"], paths["synthetic"],
                tmp_path / "none" / "out")


def test_a_run_scored_on_other_images_is_refused(tmp_path: Path) -> None:
    paths = write_study(tmp_path / "in")
    predictions = paths["runs"][4] / "predictions.csv"
    pd.read_csv(predictions).iloc[1:].to_csv(predictions, index=False)
    config = load_config([REPO / "config" / "config.yaml"], [f"dataset.labels={LABELS}", "classifier.min_test_positives=5"])
    with pytest.raises(DataError, match="ratio10_seed1.*not those of the test split"):
        compare(config, paths["runs"], paths["evaluation"], paths["lora"], paths["data"], paths["summary"], paths["synthetic"], tmp_path / "out")


def test_ratio0_is_required(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="ratio0"):
        run_compare(tmp_path, arms={"ratio50": ("synthetic", 50)})


def test_a_no_difference_says_how_large_a_delta_could_have_hidden_or_that_none_is_found() -> None:
    from workflow_scripts.study.compare_report import verdict_text

    row = {"verdict_vs_ratio0": "no measurable difference", "mde_vs_ratio0": 0.0512}
    assert verdict_text(row, "ratio0") == "no measurable difference (could have detected ≥ +0.05)"
    # an SE on under 1 df (two seeds that tie, a handful of test patients): no Δ is found reliably,
    # which the page says in words rather than as "≥ +inf"
    row["mde_vs_ratio0"] = float("inf")
    assert verdict_text(row, "ratio0") == "no measurable difference (could not reliably detect any Δ: under 1 df)"
    assert verdict_text({"verdict_vs_ratio0": "gain", "mde_vs_ratio0": 0.05}, "ratio0") == "gain"
