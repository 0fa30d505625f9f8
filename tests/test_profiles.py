"""Scaling on existing engines: the SLURM profile and the multi-GPU launcher render as documented."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO


def dry_run(workdir: Path, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--nolock", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
                             "--configfile", str(REPO / "config" / "config.yaml"), *args],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def job_resources(output: str) -> dict[str, str]:
    """Rule name -> its 'resources:' line, from a dry run's job listing."""
    found = {}
    for block in re.split(r"\n(?=\[|rule |localrule |checkpoint )", output):
        rule = re.search(r"^(?:local)?(?:rule|checkpoint) (\w+):", block, re.M)
        resources = re.search(r"^\s+resources: (.*)$", block, re.M)
        if rule and resources:
            found[rule.group(1)] = resources.group(1)
    return found


@pytest.mark.slow  # a Snakemake dry run; the quick tier keeps one (test_workflow.py)
def test_slurm_profile_maps_gpu_rules_to_gpus_and_sets_runtimes(tmp_path: Path) -> None:
    # --workflow-profile none: the local profile's global `gpu: 1` cap must not throttle a cluster.
    output = dry_run(tmp_path, "--profile", "profiles/slurm", "--workflow-profile", "none")
    resources = job_resources(output)
    assert "gpu=1" in resources["train_lora"] and "runtime=1440" in resources["train_lora"]
    assert "slurm_partition=gpu" in resources["train_lora"] and "cpus_per_task=8" in resources["train_lora"]
    assert "gpu=1" in resources["train_classifier"] and "gpu=1" in resources["evaluate_fidelity"]
    assert "gpu" not in resources["prepare_dataset"].replace("slurm_partition=gpu", "")
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    assert profile["executor"] == "slurm" and "resources" not in profile  # no global GPU cap on a cluster


@pytest.mark.slow  # several Snakemake dry runs (about 3 CPU s each)
def test_more_gpus_for_train_lora_launch_accelerate(tmp_path: Path) -> None:
    output = dry_run(tmp_path, "--cores", "8", "--resources", "gpu=4", "--set-resources", "train_lora:gpu=4", "-p")
    assert "accelerate launch --multi_gpu --num_processes 4 -m workflow_scripts.lora.train_lora" in output
    single = dry_run(tmp_path / "single", "--cores", "1", "--resources", "gpu=1", "-p")
    assert "python -m workflow_scripts.lora.train_lora" in single and "accelerate launch" not in single


def test_local_profile_caps_gpu_jobs() -> None:
    profile = yaml.safe_load((REPO / "profiles" / "default" / "config.yaml").read_text())
    assert profile["resources"] == {"gpu": 1}
