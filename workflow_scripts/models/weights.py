"""The weights a configuration needs, where the workflow looks for each, and whether it is there.

One inventory, read three ways: Snakemake checks it while it builds the DAG (a dry run and the first
seconds of a run list it, and stop naming every missing file before any job starts: rules/weights.smk),
`snakemake download_weights` fetches what is missing on a machine that reaches the hub, and
`python -m workflow_scripts.models.weights --config ...` prints it.

Entries:
* the Stable Diffusion base (`model.pretrained`): `tiny` is built by the workflow; a local folder is
  present when it holds model_index.json (any diffusers folder, e.g. a shipped demo base); a hub id
  when the Hugging Face cache holds its model_index.json;
* the classifier's ImageNet weights (`classifier.pretrained: true`): timm's file in the Hugging Face
  or torch hub cache. Missing, the run stops unless `classifier.allow_random_init: true`;
* each feature extractor in `evaluation.extractors` (Inception for FID, torchxrayvision, RAD-DINO):
  missing, the fidelity table reads "unavailable" for it, so the check lists it and does not stop.

Only file-system look-ups: no network, no model is loaded.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workflow_scripts.common import paths
from workflow_scripts.common.config import add_config_arguments, config_from_args
from workflow_scripts.common.errors import ConfigError, run_stage
from workflow_scripts.models.model_location import local_folder, pretrained_kind

SD15_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# The diffusers layout only: SD 1.5's repository also holds single-file checkpoints (~12 GB) the workflow never reads.
SD15_FILES = ["*.json", "*.txt", "*/diffusion_pytorch_model.safetensors", "*/model.safetensors"]
# pytorch-fid's FID_WEIGHTS_URL and torchxrayvision's densenet121-res224-all weights_url (tests check
# they still match the installed packages); spelled out so that the check imports neither torch nor them.
FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
XRV_WEIGHTS_URL = ("https://github.com/mlmed/torchxrayvision/releases/download/v1/"
                   "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt")
RAD_DINO_ID = "microsoft/rad-dino"
# timm's default pretrained weights (hf_hub_id) of the models the shipped configs and tests name, spelled out
# for the same reason: `import timm` costs seconds (torch, torchvision.ops, torch._dynamo) in every dry run.
# Other models ask timm; tests/test_weights.py checks these still match it.
TIMM_HUB_IDS = {"test_byobnet": "timm/test_byobnet.r160_in1k", "densenet121": "timm/densenet121.ra_in1k",
                "resnet18": "timm/resnet18.a1_in1k"}


@dataclass(frozen=True)
class Weight:
    """One weight file (or folder) the configuration needs."""

    name: str  # what it is, for people
    key: str  # the config key that asks for it
    source: str  # hub id or URL it comes from
    location: str  # where the workflow looks for it
    present: bool
    required: bool  # missing -> the run stops
    consequence: str = ""  # what happens without it
    fetch: list[str] = field(default_factory=list)  # one command that gets it (argv), empty: nothing to fetch


def torch_hub_dir() -> Path:
    """torch.hub.get_dir() without importing torch: $TORCH_HOME/hub, else $XDG_CACHE_HOME/torch/hub."""
    home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(home).expanduser() / "hub"


def hf_cached(repo_id: str, filename: str) -> str | None:
    """The Hugging Face cache's copy of `filename` in `repo_id` (HF_HOME), or None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename)
    except ValueError:  # not a valid repo id
        return None
    return found if isinstance(found, str) and os.path.isfile(found) else None


def hf_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _download(url: str, folder: Path) -> list[str]:
    code = ("import sys, torch.hub; torch.hub.download_url_to_file(sys.argv[1], sys.argv[2])")
    return [sys.executable, "-c", code, url, str(folder / os.path.basename(url))]


def base_model_weight(pretrained: str) -> Weight:
    """model.pretrained: tiny (built by the build_tiny_model rule), a local diffusers folder, or a hub id."""
    key = "model.pretrained"
    if pretrained == "tiny":
        return Weight("Stable Diffusion base: the tiny random-weight model", key, "built offline",
                      f"{paths.TINY_SD} (the build_tiny_model rule builds it)", True, False)
    folder = local_folder(pretrained)
    if (folder / "model_index.json").is_file():
        return Weight("Stable Diffusion base (local diffusers folder)", key, pretrained, str(folder), True, True)

    cached = hf_cached(pretrained, "model_index.json") if pretrained_kind(pretrained) == "hub" else None
    if cached:
        return Weight("Stable Diffusion base (Hugging Face cache)", key, pretrained, str(Path(cached).parent), True, True)
    # A hub id ("owner/name") or a folder that is not there yet: "models/sd15" with models/ present is a folder.
    first = pretrained.split("/", 1)[0]
    is_folder = pretrained_kind(pretrained) == "local" or Path(first).is_dir()
    include = ["--include", *SD15_FILES]
    if is_folder:
        return Weight("Stable Diffusion base (local diffusers folder)", key, SD15_ID,
                      f"{folder}/model_index.json", False, True, "LoRA training and generation cannot start",
                      ["hf", "download", SD15_ID, "--local-dir", str(folder), *include])
    return Weight("Stable Diffusion base (Hugging Face hub id)", key, pretrained,
                  f"{hf_cache_dir()} (HF_HOME), model_index.json of {pretrained}", False, True,
                  "LoRA training and generation cannot start", ["hf", "download", pretrained, *include])


def timm_pretrained_cfg(model: str) -> dict[str, Any]:
    """timm's pretrained config of `model` (its default tag, or the one named: resnet18.a1_in1k)."""
    import timm

    if not timm.is_model(model):
        raise ConfigError(f"classifier.model {model!r} is not a timm model (e.g. resnet18, densenet121)")
    try:
        cfg_object = timm.models.get_pretrained_cfg(model)
    except RuntimeError as error:  # an unknown pretrained tag
        raise ConfigError(f"classifier.model {model!r}: {error}") from None
    return cfg_object.to_dict() if cfg_object is not None else {}


def classifier_weight(model: str, pretrained: bool, allow_random_init: bool) -> Weight | None:
    """The timm model's ImageNet weights (None with classifier.pretrained: false: nothing to load)."""
    if not pretrained:
        return None
    cfg = {"hf_hub_id": TIMM_HUB_IDS[model]} if model in TIMM_HUB_IDS else timm_pretrained_cfg(model)
    name, key = f"classifier ImageNet weights ({model})", "classifier.pretrained"
    required = not allow_random_init
    consequence = ("classifiers start from random initialisation (classifier.allow_random_init: true)" if allow_random_init
                   else "train_classifier cannot start: download them, or set classifier.allow_random_init: true "
                        "(random initialisation) or classifier.pretrained: false")
    hub_id, url = cfg.get("hf_hub_id"), cfg.get("url")
    if hub_id:
        repo_id = hub_id.partition("@")[0]
        filenames = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else ["model.safetensors", "pytorch_model.bin"]
        found = next((path for path in (hf_cached(repo_id, f) for f in filenames) if path), None)
        return Weight(name, key, repo_id, found or f"{hf_cache_dir()} (HF_HOME), {' or '.join(filenames)} of {repo_id}",
                      found is not None, required, consequence,
                      ["hf", "download", repo_id, *filenames[:1], "config.json"])
    if url:
        folder = torch_hub_dir() / "checkpoints"
        path = folder / os.path.basename(url)
        return Weight(name, key, url, str(path), path.is_file(), required, consequence, _download(url, folder))
    return Weight(name, key, "none", f"timm lists no pretrained weights for {model}", False, required, consequence)


def extractor_weights(evaluation: Mapping[str, Any]) -> list[Weight]:
    """The fidelity feature extractors' weights, for those in evaluation.extractors."""
    listed = evaluation["extractors"]
    weights = []
    if "inception" in listed:
        configured = evaluation.get("inception_weights")
        folder = torch_hub_dir() / "checkpoints"
        path = Path(configured).expanduser() if configured else folder / os.path.basename(FID_WEIGHTS_URL)
        weights.append(Weight("Inception for FID (pytorch-fid)", "evaluation.inception_weights", FID_WEIGHTS_URL,
                              str(path), path.is_file(), False, "the fidelity table reads 'unavailable' for inception",
                              _download(FID_WEIGHTS_URL, path.parent)))
    if "xrv" in listed:
        folder = Path(evaluation.get("xrv_weights_dir") or "~/.torchxrayvision/models_data").expanduser()
        path = folder / os.path.basename(XRV_WEIGHTS_URL)
        weights.append(Weight("torchxrayvision DenseNet-121 (densenet121-res224-all)", "evaluation.xrv_weights_dir",
                              XRV_WEIGHTS_URL, str(path), path.is_file(), False,
                              "the fidelity table reads 'unavailable' for xrv", _download(XRV_WEIGHTS_URL, folder)))
    if "rad_dino" in listed:
        source = evaluation.get("rad_dino") or RAD_DINO_ID
        local = Path(source).expanduser()
        if (local / "config.json").is_file():
            found: str | None = str(local)
        else:
            cached = hf_cached(source, "config.json")
            found = str(Path(cached).parent) if cached else None
        where = found or (str(local) if local.is_dir() else f"{hf_cache_dir()} (HF_HOME), config.json of {source}")
        weights.append(Weight("RAD-DINO", "evaluation.rad_dino", source, where, found is not None, False,
                              "the fidelity table reads 'unavailable' for rad_dino",
                              ["hf", "download", RAD_DINO_ID] if not local.is_dir() else
                              ["hf", "download", RAD_DINO_ID, "--local-dir", str(local)]))
    return weights


def inventory(config: Mapping[str, Any]) -> list[Weight]:
    """Every weight the configuration needs, in the order the run needs them."""
    classifier = config["classifier"]
    found = [base_model_weight(str(config["model"]["pretrained"]))]
    head = classifier_weight(classifier["model"], classifier["pretrained"], classifier["allow_random_init"])
    if head is not None:
        found.append(head)
    return found + extractor_weights(config["evaluation"])


def missing_required(weights: Sequence[Weight]) -> list[Weight]:
    return [weight for weight in weights if weight.required and not weight.present]


def fetch_text(fetch: Sequence[str]) -> str:
    """A fetch command for people: `hf download ...` as is, a URL download as "download URL to PATH"."""
    if fetch[:2] == [sys.executable, "-c"]:
        return f"download {fetch[3]} to {fetch[4]}"
    return shlex.join(fetch)


def render(weights: Sequence[Weight]) -> str:
    """The inventory as text: one line per weight, then how to get what is missing."""
    lines = ["Weights this configuration needs:"]
    for weight in weights:
        state = "ok     " if weight.present else ("MISSING" if weight.required else "missing")
        lines.append(f"  {state} {weight.name} [{weight.key}]: {weight.location}")
        if not weight.present and weight.consequence:
            lines.append(f"          without it: {weight.consequence}")
    fetches = [weight for weight in weights if not weight.present and weight.fetch]
    if fetches:
        lines.append("Get what is missing on a machine that reaches the hub: `snakemake download_weights` "
                     "(with the same --configfile), or one by one:")
        lines += [f"  {fetch_text(weight.fetch)}" for weight in fetches]
    return "\n".join(lines)


def stop_message(weights: Sequence[Weight]) -> str | None:
    """None when every required weight is there; else one message naming every missing one."""
    missing = missing_required(weights)
    if not missing:
        return None
    names = "; ".join(f"{weight.name} [{weight.key}]" for weight in missing)
    files = "weight file is" if len(missing) == 1 else "weight files are"
    return f"{len(missing)} required {files} missing, so nothing was run: {names}.\n{render(weights)}"


def download(weights: Sequence[Weight], run: Any = subprocess.run) -> list[Weight]:
    """Fetch every missing weight that has a fetch command; returns those whose command failed."""
    failed = []
    for weight in weights:
        if weight.present or not weight.fetch:
            continue
        print(f"fetching {weight.name}: {fetch_text(weight.fetch)}", flush=True)
        if run(weight.fetch).returncode != 0:
            failed.append(weight)
    return failed


@run_stage
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workflow_scripts.models.weights",
                                     description="List the weights a configuration needs, where they are looked for, "
                                                 "and whether they are there; --download fetches the missing ones.")
    add_config_arguments(parser)
    parser.add_argument("--download", action="store_true", help="fetch every missing weight (needs the network)")
    parser.add_argument("--check", action="store_true", help="exit 2 when a required weight is missing")
    args = parser.parse_args(argv)
    config = config_from_args(args, "download_weights")
    weights = inventory(config)
    if args.download:
        failed = download(weights)
        weights = inventory(config)
        if failed:
            raise ConfigError("could not fetch: " + ", ".join(weight.name for weight in failed) + "\n" + render(weights))
    print(render(weights))
    message = stop_message(weights)
    if message and (args.check or args.download):
        raise ConfigError(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
