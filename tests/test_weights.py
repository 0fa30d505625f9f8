"""The weights check: every weight a configuration needs is listed with where it is looked for, a
missing required one stops Snakemake before any job, and download_weights fetches only what is missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import REPO, make_config, make_nih_dataset
from workflow_scripts.models import weights
from workflow_scripts.classifier.classifier_model import create_model
from workflow_scripts.common.errors import ConfigError


def fake_hf_file(cache: Path, repo_id: str, filename: str) -> Path:
    """A file as `hf download` leaves it in the Hugging Face cache (snapshot + refs/main)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text("0" * 40)
    path = repo / "snapshots" / ("0" * 40) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{}")
    return path


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return cache


def test_the_spelled_out_urls_are_the_packages_own() -> None:
    import torchxrayvision as xrv
    from pytorch_fid.inception import FID_WEIGHTS_URL

    assert weights.FID_WEIGHTS_URL == FID_WEIGHTS_URL
    assert weights.XRV_WEIGHTS_URL == xrv.models.model_urls["densenet121-res224-all"]["weights_url"]
    for model, hub_id in weights.TIMM_HUB_IDS.items():  # the whole of timm's answer that classifier_weight reads
        cfg = weights.timm_pretrained_cfg(model)
        assert (cfg["hf_hub_id"], cfg.get("hf_hub_filename")) == (hub_id, None), model
    # A model or tag outside the table asks timm.
    assert weights.classifier_weight("resnet18.a1_in1k", True, False).source == weights.TIMM_HUB_IDS["resnet18"]


def test_the_base_model_is_tiny_a_local_folder_or_a_hub_id(tmp_path: Path, hf_cache: Path) -> None:
    tiny = weights.base_model_weight("tiny")
    assert tiny.present and not tiny.required  # built by the workflow
    folder = tmp_path / "demo-base"
    missing = weights.base_model_weight(str(folder))
    assert not missing.present and missing.required and "model_index.json" in missing.location
    assert missing.fetch[:3] == ["hf", "download", weights.SD15_ID] and str(folder) in missing.fetch
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")  # any diffusers folder: present once model_index.json is there
    assert weights.base_model_weight(str(folder)).present
    hub = weights.base_model_weight(weights.SD15_ID)
    assert not hub.present and str(hf_cache) in hub.location and "--local-dir" not in hub.fetch
    fake_hf_file(hf_cache, weights.SD15_ID, "model_index.json")
    assert weights.base_model_weight(weights.SD15_ID).present


def test_a_pretrained_classifier_without_weights_is_required_unless_random_init_is_allowed(hf_cache: Path) -> None:
    strict = weights.classifier_weight("resnet18", True, allow_random_init=False)
    assert not strict.present and strict.required and strict.fetch[:3] == ["hf", "download", strict.source]
    assert not weights.classifier_weight("resnet18", True, allow_random_init=True).required
    assert weights.classifier_weight("resnet18", False, allow_random_init=False) is None
    fake_hf_file(hf_cache, strict.source, "model.safetensors")
    assert weights.classifier_weight("resnet18", True, allow_random_init=False).present
    with pytest.raises(ConfigError, match="not a timm model"):
        weights.classifier_weight("no_such_net", True, False)


def test_missing_weights_stop_naming_every_one_and_how_to_get_it(tmp_path: Path, hf_cache: Path) -> None:
    config = make_config(None, f"model.pretrained={tmp_path / 'sd15'}", "classifier.model=resnet18",
                         "classifier.allow_random_init=false")
    inventory = weights.inventory(config)
    assert [weight.key for weight in inventory] == ["model.pretrained", "classifier.pretrained",
                                                    "evaluation.inception_weights", "evaluation.xrv_weights_dir",
                                                    "evaluation.rad_dino"]
    message = weights.stop_message(inventory)
    assert message.startswith("2 required weight files are missing")
    assert message.count("MISSING") == 2 and "missing Inception" in message  # fidelity ones are listed, not fatal
    assert "hf download stable-diffusion-v1-5/stable-diffusion-v1-5" in message and "snakemake download_weights" in message
    assert weights.stop_message(weights.inventory(make_config(None, "evaluation.extractors=[pixels]"))) is None


def test_download_fetches_only_what_is_missing(tmp_path: Path, hf_cache: Path) -> None:
    config = make_config(None, "evaluation.extractors=[pixels, inception]", "classifier.pretrained=false")
    calls = []
    failed = weights.download(weights.inventory(config), run=lambda argv: calls.append(argv) or SimpleNamespace(returncode=0))
    assert len(calls) == 1 and weights.FID_WEIGHTS_URL in calls[0]  # tiny is built, not fetched
    assert not failed


def test_create_model_stops_without_weights_unless_random_init_is_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="classifier.allow_random_init: true"):
        create_model("resnet18", True, 3)
    _, started = create_model("resnet18", True, 3, allow_random_init=True)
    assert started.startswith("random initialisation: no ImageNet weights for resnet18")


def _nih_dry_run(workdir: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "snakemake", "-n", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
               "--configfile", str(REPO / "config" / "nih_chestxray14.yaml")]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, **env})


@pytest.mark.slow  # a Snakemake dry run; the inventory itself is checked in process above
def test_a_dry_run_of_the_nih_config_stops_before_any_job_naming_the_missing_weights(tmp_path: Path) -> None:
    make_nih_dataset(tmp_path / "data" / "nih", num_patients=12)
    env = {"HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch"), "HF_HUB_OFFLINE": "1"}
    result = _nih_dry_run(tmp_path, env)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "2 required weight files are missing, so nothing was run" in output
    assert "MISSING Stable Diffusion base" in output and "MISSING classifier ImageNet weights (densenet121)" in output
    assert "Job stats" not in output and not (tmp_path / "results").exists()
    # With both in the Hugging Face cache the same dry run plans the study and lists them as there.
    fake_hf_file(tmp_path / "hf" / "hub", weights.SD15_ID, "model_index.json")
    head = weights.classifier_weight("densenet121", True, False)
    fake_hf_file(tmp_path / "hf" / "hub", head.source, "model.safetensors")
    result = _nih_dry_run(tmp_path, env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok      Stable Diffusion base" in result.stderr and "Job stats" in result.stdout
