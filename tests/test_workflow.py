"""The data stage through Snakemake on a micro demo config: DAG, outputs, overrides, lint."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO

MICRO = """
model: {pretrained: tiny}  # random weights: these tests check plumbing, not learning
demo: {num_patients: 24, size: 64, seed: 1}
split: {test_fraction: 0.25}  # 24 patients: not the demo's data-limited split
balance: {max_per_label: null}
verify: {max_images: 32, contact_sheet_images: 4}
training: {lr_scheduler: constant_with_warmup, lr_warmup_steps: 0, max_train_steps: 6, save_steps: 3, validation_steps: 6, num_validation_images: 1,
           validation_inference_steps: 2, validation_prompts: [A chest X-ray with Mass]}
generation: {images_per_label: 4, num_inference_steps: 2, batch_size: 4}
classifier: {image_size: 32, epochs: 1, ratios: [0, 50], seeds: [0, 1], bootstrap_samples: 20, batch_size: 16,
             controls: [rebalanced, duplicate_real, noise, more_real]}
evaluation: {fid_dims: 64, kid_subset_size: 4, kid_subsets: 5}
"""


def snakemake(workdir: Path, *args: str, targets: tuple[str, ...] = (), check: bool = True) -> subprocess.CompletedProcess:
    # Targets come first: --configfile and --config take every value after them.
    command = [sys.executable, "-m", "snakemake", *targets, "-s", str(REPO / "Snakefile"), "-d", str(workdir),
               "--configfile", str(REPO / "config" / "config.yaml"), str(workdir / "micro.yaml"), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("workflow")
    (workdir / "micro.yaml").write_text(MICRO)
    snakemake(workdir, "--cores", "1", "--resources", "gpu=1", "--config", "split={seed: 7}")
    return workdir


@pytest.mark.slow  # the whole DAG through Snakemake, once per module
def test_data_stage_runs_end_to_end_on_the_demo(demo_run: Path) -> None:
    data = demo_run / "results" / "data"
    report = json.loads((data / "verify_report.json").read_text())
    assert report["tensor_shape"] == [3, 64, 64]
    assert -1.0 <= report["min"] < report["max"] <= 1.0
    assert report["samples_per_split"]["train"] > report["samples_per_split"]["test"] > 0
    assert len(report["sample_prompts"]) == 10 and all(p.startswith("A chest X-ray with ") for p in report["sample_prompts"])
    assert (data / "verify_contact_sheet.png").stat().st_size > 10_000
    assert "| Cardiomegaly |" in (data / "verify_report.md").read_text()
    for rule in ("demo_dataset", "prepare_dataset", "verify_dataset", "build_tiny_model", "train_lora"):
        assert (demo_run / "logs" / rule / f"{rule}.log").exists()
        assert (demo_run / "benchmarks" / rule / f"{rule}.tsv").exists()


@pytest.mark.slow  # the whole DAG through Snakemake, once per module
def test_lora_is_trained_through_snakemake_and_checkpoints_survive(demo_run: Path) -> None:
    lora = demo_run / "results" / "lora"
    summary = json.loads((lora / "final" / "training_summary.json").read_text())
    assert summary["steps"] == 6 and summary["base_model"].endswith("results/models/tiny-sd")
    assert (lora / "final" / "pytorch_lora_weights.safetensors").stat().st_size > 0
    assert sorted(p.name for p in (lora / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-6"]
    assert list((lora / "logs").glob("events.out.tfevents.*"))


@pytest.mark.slow  # the whole DAG through Snakemake, once per module
def test_generation_runs_one_job_per_label_and_merges(demo_run: Path) -> None:
    synthetic = demo_run / "results" / "synthetic"
    merged = pd.read_csv(synthetic / "generation_results.csv")
    labels = ["Cardiomegaly", "Effusion", "Nodule", "Mass", "Pneumothorax", "Fibrosis", "Pneumonia", "No Finding"]
    plan = pd.read_csv(synthetic / "plan.csv")
    assert sorted(set(merged["labels"])) == sorted(labels) and len(merged) == plan["count"].sum()
    assert (plan["count"] >= 4).all()  # images_per_label is a floor, topped up for the 50% classifier ratio
    assert len(merged) >= len(pd.read_csv(demo_run / "results" / "data" / "train.csv"))
    assert all((demo_run / file).is_file() for file in merged["file"])
    for key in ("Mass", "No_Finding"):
        assert (synthetic / key / "generation_results.csv").is_file()
        assert (demo_run / "logs" / "generate_label" / f"{key}.log").is_file()


@pytest.mark.slow  # the whole DAG through Snakemake, once per module
def test_the_whole_dag_ends_in_the_comparison_table(demo_run: Path) -> None:
    results = demo_run / "results"
    table = pd.read_csv(results / "comparison.csv")
    ratio_arms = table[table["arm_kind"].isin(["real", "synthetic"])]
    assert ratio_arms["arm"].tolist() == ["ratio0", "ratio50"]
    assert (table["seeds"] == 2).all()
    assert ratio_arms["n_synthetic_train"].tolist()[0] == 0 and ratio_arms["n_synthetic_train"].tolist()[1] > 0
    assert table["verdict_vs_ratio0"].iloc[1:].isin(["gain", "loss", "no measurable difference"]).all()
    page = (results / "comparison.md").read_text()
    assert "random weights" in page and "| ratio50 |" in page
    assert "unavailable" in page  # no Inception weights offline: never a made-up number
    steps = set()
    for arm in ("ratio0", "ratio50", "rebalanced", "noise"):
        for seed in (0, 1):
            run = results / "classifier" / f"{arm}_seed{seed}"
            steps.add(json.loads((run / "metrics.json").read_text())["optimizer_steps"])
            assert (run / "composition.csv").is_file()
    assert len(steps) == 1  # every arm of the study trains for the same number of optimizer steps
    assert (results / "synthetic_noise" / "generation_results.csv").is_file()
    assert (results / "evaluation" / "audit_summary.json").is_file()
    assert (results / "plots" / "auroc_vs_ratio.png").is_file()
    # the optional count-matched control (Pink et al. 2026): in the table, compared, and drawn
    duplicate = table.set_index("arm").loc["duplicate_real"]
    assert duplicate["arm_kind"] == "control_duplicate_real" and duplicate["n_synthetic_train"] == 0
    assert table.set_index("arm").loc["ratio50", "verdict_vs_duplicate_real"] in ("gain", "loss", "no measurable difference")
    added = pd.read_csv(results / "classifier" / "duplicate_real_seed0" / "training_set.csv")
    largest = pd.read_csv(results / "classifier" / "ratio50_seed0" / "training_set.csv")
    assert len(added) == len(largest) and set(added["path"]) <= set(pd.read_csv(results / "data" / "train.csv")["path"])
    assert "| duplicate_real | control: real duplicates, count-matched |" in page


@pytest.fixture(scope="module")
def report_page(demo_run: Path) -> Path:
    snakemake(demo_run, "--report", str(demo_run / "report.html"))
    return demo_run / "report.html"


@pytest.mark.slow  # the whole DAG through Snakemake, once per module
def test_report_page_holds_the_table_and_plots(report_page: Path) -> None:
    page = report_page.read_text(errors="replace")
    for name in ("comparison.html", "comparison.csv", "auroc_vs_ratio.png", "fidelity.html", "verify_report.html",
                 "curves_ratio50.png", "prompt_adherence.png"):
        assert name in page, name


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.mark.slow
@pytest.mark.skipif(not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
                    reason="Chromium not installed: apt-get install chromium chromium-driver (.ci/run does)")
def test_the_report_opens_on_the_answer_in_a_browser(report_page: Path, tmp_path: Path) -> None:
    """Headless Chromium opens the report: its first screen names the study's arms and the headline
    as text, and the comparison page renders as a table (not a download link).
    REPORT_SCREENS=<folder> keeps the screenshots."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1366,900", f"--user-data-dir={tmp_path / 'p'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)), options=options)
    screens = Path(os.environ.get("REPORT_SCREENS", tmp_path))
    screens.mkdir(parents=True, exist_ok=True)
    try:
        driver.get(report_page.as_uri())
        summary = WebDriverWait(driver, 30).until(lambda d: d.find_element(By.CSS_SELECTOR, ".cxr-summary"))
        driver.save_screenshot(str(screens / "report_landing.png"))
        shown = summary.text
        assert "Headline" in shown and "Δ vs ratio0" in shown
        for arm in ("ratio0", "ratio50", "noise", "more_real", "rebalanced"):
            assert arm in shown, arm
        # The whole landing text on the first screen: Snakemake's report centres it vertically, so a text
        # taller than the window loses its top (the headline) above the page, where no scrolling reaches.
        top, bottom = driver.execute_script("const r = arguments[0].closest('.document').getBoundingClientRect();"
                                            "return [r.top, r.bottom];", summary)
        assert 0 <= top and bottom <= driver.execute_script("return window.innerHeight")
        assert "Read before citing" in shown  # the caveats travel with the answer, folded
        # The full table: its link opens comparison.html in the report's frame.
        driver.find_element(By.LINK_TEXT, "the whole table").click()
        frame = WebDriverWait(driver, 30).until(lambda d: d.find_element(By.TAG_NAME, "iframe"))
        driver.switch_to.frame(frame)
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.TAG_NAME, "table"))
        cells = [cell.text for cell in driver.find_elements(By.CSS_SELECTOR, "table td")]
        assert "more_real" in cells and "ratio50" in cells
        driver.switch_to.default_content()
        driver.save_screenshot(str(screens / "report_comparison.png"))
    finally:
        driver.quit()


@pytest.mark.slow  # the whole DAG through Snakemake, once per module
def test_command_line_overrides_reach_the_stage(demo_run: Path) -> None:
    summary = json.loads((demo_run / "results" / "data" / "prepare_summary.json").read_text())
    assert summary["seeds"]["split"] == 7


@pytest.mark.slow  # the whole DAG through Snakemake, once per module
def test_rerunning_one_target_is_a_no_op_then_forced(demo_run: Path) -> None:
    result = snakemake(demo_run, "--cores", "1", "--config", "split={seed: 7}", "-n", targets=("results/data/train.csv",))
    assert "Nothing to be done" in result.stdout + result.stderr
    result = snakemake(demo_run, "--cores", "1", "--config", "split={seed: 7}", "-n", "--forcerun", "prepare_dataset")
    assert "prepare_dataset" in result.stdout and "demo_dataset" not in result.stdout.split("Job stats")[-1]


@pytest.mark.slow  # the whole DAG through Snakemake, once per module
def test_changed_split_settings_rerun_the_data_stage(demo_run: Path) -> None:
    result = snakemake(demo_run, "--cores", "1", "--config", "split={seed: 8}", "-n")
    assert "prepare_dataset" in result.stdout


def _scheduled(result: subprocess.CompletedProcess) -> set[str]:
    """Rule names in a dry run's job stats table."""
    stats = result.stdout.split("Job stats:")[-1].split("Reasons:")[0]
    return {line.split()[0] for line in stats.splitlines()[3:] if line.strip() and line.split()[0] != "total"}


@pytest.mark.slow  # the whole DAG through Snakemake, once per module
def test_a_classifier_override_reruns_only_the_classifier_fidelity_and_table(demo_run: Path) -> None:
    # `seeds: [0, 1]` is the micro config's value, given as a list override: coerced, so it changes nothing.
    result = snakemake(demo_run, "-n", "--config", "split={seed: 7}", "classifier={epochs: 2, seeds: [0, 1]}")
    assert _scheduled(result) == {"write_stage_config", "train_classifier", "evaluate_fidelity", "compare",
                                  "render_report_pages", "plot_training_curves", "all"}
    assert "results/config/train_classifier.yaml" in result.stdout and "results/config/train_lora.yaml" not in result.stdout


@pytest.mark.slow  # the whole DAG through Snakemake, once per module
def test_one_seed_of_an_arm_reruns_alone_and_the_workflow_takes_it_up(demo_run: Path) -> None:
    # An arm's seeds run in one job; its log names the command that re-trains one seed alone
    # (docs/long-runs.md). Snakemake then re-runs what reads that seed, not the arm.
    log = (demo_run / "logs" / "train_classifier" / "ratio0.log").read_text()
    command = next(line.split(": ", 1)[1] for line in log.splitlines() if line.startswith("re-run seed 1 alone: "))
    rerun, kept = (demo_run / "results" / "classifier" / f"ratio0_seed{seed}" / "metrics.json" for seed in (1, 0))
    before = {path: path.stat().st_mtime_ns for path in (rerun, kept)}
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "workflow_scripts.classifier.train_classifier"]
    result = subprocess.run([sys.executable, *argv[1:]], cwd=demo_run, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert rerun.stat().st_mtime_ns > before[rerun] and kept.stat().st_mtime_ns == before[kept]
    assert json.loads(rerun.read_text())["seed"] == 1
    scheduled = _scheduled(snakemake(demo_run, "-n", "--config", "split={seed: 7}"))
    assert "compare" in scheduled and not scheduled & {"train_classifier", "train_classifier_seed"}, scheduled
    snakemake(demo_run, "--cores", "1", "--resources", "gpu=1", "--config", "split={seed: 7}")  # the table takes it up


@pytest.mark.slow  # the whole DAG through Snakemake, once per module
def test_a_generation_override_does_not_retrain_the_lora(demo_run: Path) -> None:
    result = snakemake(demo_run, "-n", "--config", "split={seed: 7}", "generation={num_inference_steps: 3}")
    scheduled = _scheduled(result)
    assert "plan_generation" in scheduled and "compare" in scheduled
    assert not scheduled & {"train_lora", "prepare_dataset", "verify_dataset", "build_tiny_model"}


@pytest.mark.slow  # the whole DAG through Snakemake, once per module
def test_each_stage_gets_only_its_declared_config(demo_run: Path) -> None:
    written = yaml.safe_load((demo_run / "results" / "config" / "plan_generation.yaml").read_text())
    assert set(written) == {"classifier", "dataset", "generation", "prompt"} and set(written["classifier"]) == {"ratios", "pool_headroom"}
    assert yaml.safe_load((demo_run / "results" / "config" / "prepare_dataset.yaml").read_text())["split"]["seed"] == 7


def test_dry_run_and_lint_of_the_default_config_are_clean() -> None:
    # --forceall: every job is listed with its command, also where a demo run in this checkout is up to date
    dry = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-p", "--forceall", "--cores", "1"], cwd=REPO,
                         capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    # one job at a time under --cores 1: the LoRA loop may use every core; with two jobs at once, its share
    from workflow_scripts.data.resolve import default_workers

    cores = default_workers()
    assert f"OMP_NUM_THREADS={cores} MKL_NUM_THREADS={cores} python -m workflow_scripts.lora.train_lora" in dry.stdout
    assert f"--threads {cores}" in dry.stdout  # an arm's seeds side by side
    lint = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=REPO, capture_output=True, text=True)
    assert lint.returncode == 0 and "Congratulations" in lint.stdout + lint.stderr, lint.stdout + lint.stderr


@pytest.mark.slow  # a second dry run
def test_with_several_cores_a_torch_job_keeps_snakemakes_share() -> None:
    two = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-p", "--forceall", "--cores", "2"], cwd=REPO,
                         capture_output=True, text=True)
    assert "OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python -m workflow_scripts.lora.train_lora" in two.stdout, two.stdout[-2000:]
    assert "--threads 1" in two.stdout


def _scheduled_runs(dry_run_output: str) -> set[str]:
    return set(re.findall(r"results/classifier/(\w+_seed\d+)/metrics\.json", dry_run_output))


@pytest.mark.slow  # several Snakemake dry runs (about 3 CPU s each)
def test_each_control_is_its_own_target_and_can_be_left_out(tmp_path: Path) -> None:
    (tmp_path / "micro.yaml").write_text("classifier: {ratios: [0, 25], seeds: [0, 1], controls: [rebalanced, noise, more_real]}\n")
    listed = snakemake(tmp_path, "-n", "--cores", "1")
    assert _scheduled_runs(listed.stdout) == {f"{arm}_seed{seed}" for arm in ("ratio0", "ratio25", "rebalanced", "noise",
                                                                              "more_real") for seed in (0, 1)}
    assert "make_noise_images" in listed.stdout
    assert listed.stdout.count("rule train_classifier:") == 5  # one job per arm runs both seeds
    (tmp_path / "micro.yaml").write_text("classifier: {ratios: [0, 25], seeds: [0, 1], controls: []}\n")
    without = snakemake(tmp_path, "-n", "--cores", "1")
    assert _scheduled_runs(without.stdout) == {f"ratio{r}_seed{s}" for r in (0, 25) for s in (0, 1)}
    assert "make_noise_images" not in without.stdout
    only = snakemake(tmp_path, "-n", "--cores", "1", targets=("train_noise_control", "train_pretrain_control"))
    assert _scheduled_runs(only.stdout) == {f"{arm}_seed{seed}" for arm in ("noise", "pretrain") for seed in (0, 1)}
    assert "make_noise_images" in only.stdout
    one = snakemake(tmp_path, "-n", "--cores", "1", targets=("results/classifier/rebalanced_seed7/metrics.json",))
    assert _scheduled_runs(one.stdout) == {"rebalanced_seed7"} and "make_noise_images" not in one.stdout
    assert "rule train_classifier_seed:" in one.stdout  # a seed outside classifier.seeds runs alone


def test_missing_real_dataset_stops_snakemake_with_a_pointer(tmp_path: Path) -> None:
    (tmp_path / "micro.yaml").write_text("dataset: {csv: data/nih/Data_Entry_2017.csv, images: data/nih}\n")
    result = snakemake(tmp_path, "-n", check=False)
    assert result.returncode != 0
    assert "dataset.csv: data/nih/Data_Entry_2017.csv not found" in result.stdout + result.stderr


def test_bad_config_stops_snakemake_with_the_key(tmp_path: Path) -> None:
    (tmp_path / "micro.yaml").write_text("training: {mixed_precision: fp8}\n")
    result = snakemake(tmp_path, "-n", check=False)
    assert result.returncode != 0
    assert "training.mixed_precision: 'fp8' is not one of" in result.stdout + result.stderr
