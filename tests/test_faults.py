"""Faults through Snakemake: stages killed (SIGTERM, SIGKILL) at exact points resume or restart cleanly,
end where an uninterrupted run ends, and never touch the user's dataset."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, tree_checksum
from workflow_scripts.data.demo_dataset import make_demo_dataset
from workflow_scripts.common.faults import ENV
from workflow_scripts.common.images import check_image

pytestmark = pytest.mark.slow  # every test here runs Snakemake for real, several times

LORA_SUMMARY = "results/lora/final/training_summary.json"  # one of train_lora's declared outputs
MICRO = """
model: {{pretrained: tiny}}  # random weights: these tests check plumbing, not learning
dataset: {{csv: {csv}, images: {images}}}
demo: {{num_patients: 16, size: 64, seed: 0}}
verify: {{max_images: 8, contact_sheet_images: 2}}
training: {{lr_scheduler: constant_with_warmup, lr_warmup_steps: 0, train_batch_size: 4, max_train_steps: 8, save_steps: 2,
           validation_steps: 4, num_validation_images: 1,
           validation_inference_steps: 1, validation_prompts: [A chest X-ray with Mass]}}
generation: {{images_per_label: 5, num_inference_steps: 2, batch_size: 2}}
classifier: {{image_size: 32, epochs: 2, ratios: [0], controls: [], seeds: [0], bootstrap_samples: 10, batch_size: 16}}
"""


@pytest.fixture(scope="module")
def user_data(tmp_path_factory) -> Path:
    """The user's dataset: lives outside the workflow's folders, must never change."""
    root = tmp_path_factory.mktemp("user_data")
    make_demo_dataset(root, num_patients=16, size=64, seed=0)
    return root


def workdir_for(tmp_path: Path, user_data: Path) -> Path:
    (tmp_path / "micro.yaml").write_text(MICRO.format(csv=user_data / "Data_Entry_2017.csv", images=user_data / "images"))
    return tmp_path


def snakemake(workdir: Path, target: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != ENV}
    if fault:
        env[ENV] = fault
    # The target comes first: --configfile takes every value after it.
    command = [sys.executable, "-m", "snakemake", target, "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", "1",
               "--resources", "gpu=1", "--configfile", str(REPO / "config" / "config.yaml"), str(workdir / "micro.yaml")]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)


def ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def copy_without(done: Path, workdir: Path, *stale: str) -> Path:
    """A copy of a finished working directory less the `stale` globs: Snakemake finds the earlier stages
    done (copytree keeps mtimes and .snakemake/metadata) and runs only the stage a test kills, not the
    data stage and tiny model again."""
    shutil.copytree(done, workdir, symlinks=True, dirs_exist_ok=True)
    for pattern in stale:
        for path in workdir.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return workdir


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, user_data) -> Path:
    workdir = workdir_for(tmp_path_factory.mktemp("uninterrupted"), user_data)
    ok(snakemake(workdir, LORA_SUMMARY))
    ok(snakemake(workdir, "results/classifier/ratio0_seed0/metrics.json"))
    return workdir


def test_train_lora_killed_at_several_points_resumes_to_the_same_lora(tmp_path, user_data, uninterrupted) -> None:
    before = tree_checksum(user_data)
    workdir = copy_without(uninterrupted, tmp_path, "results/lora")
    # Mid-epoch by SIGTERM (checkpoint-2 exists), then SIGKILL while checkpoint-6 is half written (after
    # checkpoint-4), then SIGKILL during the validation of step 8 (after checkpoint-8).
    for fault in ("train_step:3:TERM", "checkpoint_save:2:KILL", "validation:1:KILL"):
        result = snakemake(workdir, LORA_SUMMARY, fault)
        assert result.returncode != 0, f"{fault}: the run should have died"
        assert not (workdir / LORA_SUMMARY).exists()  # no final LoRA file is left by a failed job
    checkpoints = sorted(p.name for p in (workdir / "results" / "lora" / "checkpoints").iterdir())
    assert "checkpoint-8" in checkpoints and not any(name.endswith(".partial") for name in checkpoints)
    ok(snakemake(workdir, LORA_SUMMARY))
    summary = json.loads((workdir / "results" / "lora" / "final" / "training_summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-8") and summary["steps"] == 8
    ours = load_file(workdir / "results" / "lora" / "final" / "pytorch_lora_weights.safetensors")
    reference = load_file(uninterrupted / "results" / "lora" / "final" / "pytorch_lora_weights.safetensors")
    assert ours.keys() == reference.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-5, atol=1e-6)
    assert tree_checksum(user_data) == before


def test_generation_killed_mid_label_makes_only_the_missing_images(uninterrupted, user_data) -> None:
    target = "results/synthetic/Mass/generation_results.csv"
    folder = uninterrupted / "results" / "synthetic" / "Mass"
    result = snakemake(uninterrupted, target, "image_saved:3:KILL")  # dies inside the second batch
    assert result.returncode != 0
    survivors = sorted(folder.glob("*.png"))
    assert [p.name for p in survivors] == ["Mass_0000.png", "Mass_0001.png", "Mass_0002.png"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in survivors}
    ok(snakemake(uninterrupted, target))
    assert sorted(p.name for p in folder.glob("*.png")) == [f"Mass_{i:04d}.png" for i in range(5)]
    assert all(mtimes[p.name] == p.stat().st_mtime_ns for p in survivors)  # not made again
    assert not list(folder.glob("*.partial"))
    assert all(check_image(p) is None for p in folder.glob("*.png"))  # no truncated PNG


def test_classifier_killed_mid_training_reruns_clean_to_the_same_result(tmp_path, uninterrupted) -> None:
    workdir = copy_without(uninterrupted, tmp_path, "results/classifier*")
    target = "results/classifier/ratio0_seed0/metrics.json"
    result = snakemake(workdir, target, "classifier_validation:1:KILL")
    assert result.returncode != 0 and not (workdir / target).exists()
    ok(snakemake(workdir, target))
    ours = json.loads((workdir / target).read_text())
    reference = json.loads((uninterrupted / target).read_text())
    assert ours["test"]["macro"]["auroc"] == pytest.approx(reference["test"]["macro"]["auroc"], abs=1e-9)
    assert not (workdir / "results" / "classifier" / "ratio0_seed0.partial").exists()


def test_hard_kill_of_snakemake_itself_recovers_with_unlock_then_the_same_command(tmp_path, user_data) -> None:
    """Power loss or a pre-empted allocation kills Snakemake and its jobs at once: the working directory
    stays locked. `snakemake --unlock`, then the same command, finishes the run."""
    import signal
    import time

    workdir = workdir_for(tmp_path, user_data)
    target = "results/data/train.csv"
    env = {key: value for key, value in os.environ.items() if key != ENV}
    command = [sys.executable, "-m", "snakemake", target, "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", "1",
               "--resources", "gpu=1", "--configfile", str(REPO / "config" / "config.yaml"), str(workdir / "micro.yaml")]
    locks = workdir / ".snakemake" / "locks"
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (locks.is_dir() and any(locks.iterdir())):
        assert process.poll() is None, "Snakemake ended before it could be killed"
        assert time.monotonic() < deadline, "Snakemake never took its lock"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # Snakemake and every job it started, with no chance to clean up
    process.wait()
    assert any(locks.iterdir()) and not (workdir / target).exists()

    again = snakemake(workdir, target)
    assert again.returncode != 0 and "--unlock" in again.stdout + again.stderr  # what the user sees
    unlock = subprocess.run([*command, "--unlock"], capture_output=True, text=True, env=env, timeout=300)
    ok(unlock)
    ok(snakemake(workdir, target))
    assert (workdir / target).is_file() and not (locks.is_dir() and any(locks.iterdir()))
