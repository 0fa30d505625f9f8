"""Cost before a run: the stored FLOP counts re-count, the work per stage follows the study's own
arithmetic (arms, steps, generation plan, audit search), and the command reads the NIH and demo configs."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, make_config
from workflow_scripts.study import arms, cost, flops, design as study
from workflow_scripts.classifier.classifier_model import class_names
from workflow_scripts.common.config import load_config
from workflow_scripts.data.demo_dataset import make_demo_dataset
from workflow_scripts.fidelity.audit_search import search_cost
from workflow_scripts.generation.generate_xrays import generation_plan
from workflow_scripts.data.prepare_dataset import prepare
from workflow_scripts.common.tables import load_split

NIH = REPO / "config" / "nih_chestxray14.yaml"
NIH_SIZES = ["--train-images", "10000", "--val-images", "11200", "--test-images", "22400"]


@pytest.mark.slow  # the full suite's (the quick tier stays under 3 minutes)
def test_the_stored_counts_are_what_flop_counter_mode_counts() -> None:
    # Re-counted at the smallest stored size (the meta device makes the size nearly free; building
    # the models is the cost). The larger entries were counted by the same call.
    assert flops.count_sd15(flops.SD15_ARCH, [64])[64] == cost.SD15_FLOP[64]
    demo = make_config()
    key = (demo["classifier"]["model"], demo["classifier"]["image_size"], len(class_names(demo["dataset"]["labels"])))
    assert flops.count_classifier(*key) == cost.CLASSIFIER_FLOP[key]


def test_the_counts_are_consistent_across_sizes() -> None:
    table = cost.SD15_FLOP
    for resolution, counts in table.items():
        # A training step is a forward pass plus a backward pass through the frozen base (inputs'
        # gradients only; none for the text context's projections) and the LoRA.
        assert 1.5 * counts["unet_forward"] < counts["unet_train"] < 3 * counts["unet_forward"], resolution
        assert counts["vae_decode"] > counts["vae_encode"] > 0 and counts["text_encode"] == table[64]["text_encode"]
    for small, large in zip(sorted(table), sorted(table)[1:]):  # pixels squared, attention up to their square
        for part in ("unet_forward", "unet_train", "vae_encode", "vae_decode"):
            assert table[small][part] < table[large][part] < (large / small) ** 4 * table[small][part], (part, large)
    for (model, size, classes), counts in cost.CLASSIFIER_FLOP.items():
        assert 2 * counts["classifier_forward"] < counts["classifier_train"] <= 3.05 * counts["classifier_forward"]


def test_the_nih_estimate_follows_the_study(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    # --data-dir names a folder without splits: a demo run's results/data in the checkout must not stand in
    assert cost.main(["--config", str(NIH), *NIH_SIZES, "--data-dir", str(tmp_path / "no-splits"), "--gpu", "h100",
                      "--out", str(tmp_path / "cost.md")]) == 0
    page = capsys.readouterr().out
    assert (tmp_path / "cost.md").read_text() == page
    config = load_config([NIH])
    runs = len(arms.arm_names(config)) * len(config["classifier"]["seeds"])
    assert runs >= 30
    steps = study.train_steps(config, 10000)
    pool = study.pool_size_needed(config, 10000)
    lora_steps = math.ceil(config["training"]["num_train_epochs"] * (10000 // config["training"]["train_batch_size"]))
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in page.splitlines() if line.startswith("| ")}
    assert rows["train_lora"][1:3] == ["10,000", f"{lora_steps:,}"]
    assert rows["generate"][1] == f"{pool:,}" and rows["generate"][3] == f"{pool * 50:,}"
    assert rows["train_classifier"][2:5] == [f"{runs * steps:,}", "0", str(runs)]
    audit = search_cost(pool + 2000 + 200 + 200, 10000, 64, 3)
    assert rows["audit_memorization"][6] == f"{audit['flop'] / 1e12:,.0f}"
    assert "H100 SXM" in page and "**total**" in page and "at least" in page  # no splits: the pool's lower bound
    # The LoRA stage's FLOP: 8 images a step through the counted UNet training step, the cache, and
    # validation: 4 images of each of the 15 labels every 500 steps, 30 guided steps each.
    counts = cost.SD15_FLOP[512]
    validation_images = math.ceil(lora_steps / 500) * 15 * 4
    expected = (lora_steps * 8 * counts["unet_train"] + 10000 * (counts["vae_encode"] + counts["text_encode"])
                + validation_images * (30 * 2 * counts["unet_forward"] + counts["vae_decode"]))
    assert rows["train_lora"][3] == f"{validation_images * 30:,}"
    assert float(rows["train_lora"][6].replace(",", "")) == pytest.approx(expected / 1e12, rel=0.01)


def test_a_control_added_to_the_study_adds_its_runs(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    cost.main(["--config", str(NIH), *NIH_SIZES, "--data-dir", str(tmp_path / "no-splits"),
               "--set", "classifier.controls=[rebalanced, noise, pretrain]"])
    assert "| train_classifier |" in capsys.readouterr().out
    config = load_config([NIH], ["classifier.controls=[rebalanced, noise, pretrain]"])
    sizes = cost.Sizes(10000, 11200, 22400, None, "given")
    assert cost.classifier_stage(config, sizes, cost.model_flop(config))["classifier_runs"] == \
        len(arms.arm_names(config)) * 5 == 35


@pytest.mark.slow  # the full suite's (the quick tier stays under 3 minutes)
def test_the_demo_estimate_reads_the_prepared_splits_and_matches_the_generation_plan(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_demo_dataset(tmp_path / "demo", 40, 64, 0)
    config = make_config({"csv": str(tmp_path / "demo" / "Data_Entry_2017.csv"), "images": str(tmp_path / "demo" / "images")})
    prepare(config, tmp_path / "data")
    config_file = tmp_path / "config.yaml"
    config_file.write_text((REPO / "config" / "config.yaml").read_text())
    assert cost.main(["--config", str(config_file), "--data-dir", str(tmp_path / "data"), "--gpu", "l4"]) == 0
    page = capsys.readouterr().out
    train = load_split(tmp_path / "data", "train")
    planned = int(generation_plan(config, train)["count"].sum())
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in page.splitlines() if line.startswith("| ")}
    assert rows["generate"][1] == f"{planned:,}" and f"{len(train)} train" in page and "tiny model" in page


def test_without_splits_or_sizes_the_command_says_what_to_give(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cost.main(["--config", str(NIH), "--data-dir", str(tmp_path)]) == 2
    assert "--train-images" in capsys.readouterr().err
    assert cost.main(["--config", str(NIH), *NIH_SIZES, "--utilisation", "1.5"]) == 2
    assert "--utilisation" in capsys.readouterr().err


def test_hours_take_the_longer_of_compute_and_decoding() -> None:
    stage = {"flop": 989.4e12 * 3600, "decodes": 0}
    assert cost.hours(stage, "h100", 1.0, 16, 20) == pytest.approx((1.0, 2.0))
    stage["decodes"] = 16 * 3600 * 50 * 3  # 3 hours of decoding at 20 ms on 16 cores
    assert cost.hours(stage, "h100", 1.0, 16, 20) == pytest.approx((3.0, 3.0))


@pytest.mark.slow  # a Snakemake dry run
def test_the_snakemake_target_needs_only_the_data_stage(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "snakemake", "estimate_cost", "-n", "--cores", "1", "-s",
                          str(REPO / "Snakefile"), "-d", str(tmp_path), "--configfile", str(REPO / "config" / "config.yaml")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    jobs = {line.split()[0] for line in run.stdout.splitlines() if line and line.split()[-1].isdigit()}
    assert {"prepare_dataset", "estimate_cost"} <= jobs and not jobs & {"train_lora", "generate_label", "train_classifier"}
