"""Base Stable Diffusion model: loading with clear errors, and SD 1.5's noise schedule.

(The offline tiny model is built by ``workflow_scripts.models.tiny_model``.)

1. ``tiny_model.build_tiny_pipeline`` builds a *small, randomly initialised* pipeline with the same component
   classes as Stable Diffusion 1.5 (``UNet2DConditionModel`` with cross-attention blocks,
   ``AutoencoderKL``, ``CLIPTextModel`` + ``CLIPTokenizer``, SD 1.5's DDPM noise schedule) and saves it in
   the diffusers folder layout.  Everything downstream (LoRA fine-tuning, sampling, evaluation) can then
   run end to end on a CPU without any download: ``StableDiffusionPipeline.from_pretrained(dir)`` and
   ``UNet2DConditionModel.from_pretrained(dir, subfolder="unet")`` work exactly as on a real SD 1.5 folder.
   The weights are random, so images are noise-like: the tiny model checks the *plumbing*, not quality.

2. ``resolve_pretrained`` / ``load_components`` / ``load_pipeline`` load the configured base model
   (``model.pretrained`` in the config): ``tiny``, a local diffusers folder, or a Hugging Face hub id;
   failures become a ``ModelNotFoundError`` that says exactly what to do.

Its command line is the ``build_tiny_model`` stage (``python -m workflow_scripts.models.build_tiny_model``).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workflow_scripts.common import paths
from workflow_scripts.common.errors import ModelNotFoundError
from workflow_scripts.models.model_location import REPO_ROOT as _REPO_ROOT
from workflow_scripts.models.model_location import local_folder
from workflow_scripts.models.model_location import pretrained_kind as _kind

# --------------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------------

#: Default location of the tiny model (the ``build_tiny_model`` rule's output).
DEFAULT_TINY_DIR = Path(paths.TINY_SD)

#: Where the SD 1.5 component configs (no weights) may live: ``shared/`` in or beside the repository.
SD15_ARCH_CANDIDATES = (_REPO_ROOT / "shared" / "sd15-arch", _REPO_ROOT.parent / "shared" / "sd15-arch")

#: SD 1.5's noise schedule (from its scheduler_config.json); used if the shared copy is absent.
SD15_SCHEDULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "clip_sample": False,
    "skip_prk_steps": True,
    "trained_betas": None,
}



@dataclass
class Components:
    """The pieces of a Stable Diffusion model needed for training."""

    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    noise_scheduler: Any
    source: str  # the resolved location: a folder path or a hub id
    kind: str = ""  # "tiny", "local" or "hub"


def sd15_scheduler_config(arch_dir: Path | None = None) -> dict[str, Any]:
    """SD 1.5's scheduler_config.json values (from ``shared/sd15-arch`` when present), minus ``_class_name``."""
    cfg = dict(SD15_SCHEDULER_DEFAULTS)
    candidates = (Path(arch_dir),) if arch_dir is not None else SD15_ARCH_CANDIDATES
    for folder in candidates:
        path = folder / "scheduler" / "scheduler_config.json"
        if path.is_file():
            data = json.loads(path.read_text())
            cfg.update({k: v for k, v in data.items() if not k.startswith("_")})
            break
    return cfg


def sd15_noise_scheduler(arch_dir: Path | None = None):
    """A ``DDPMScheduler`` with SD 1.5's settings (SD 1.5 ships a PNDM config; DDPM is the training one).

    ``from_config`` keeps the PNDM-only keys (``set_alpha_to_one``, ``skip_prk_steps``) in the saved config,
    like ``DDPMScheduler.from_pretrained`` on a real SD 1.5 folder does.
    """
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(sd15_scheduler_config(arch_dir))


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _is_diffusers_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file()


def resolve_pretrained(pretrained: str, tiny_dir: Path = DEFAULT_TINY_DIR) -> str:
    """Map ``model.pretrained`` to what ``from_pretrained`` gets: a folder path or a hub id.

    * ``"tiny"`` -> ``tiny_dir`` (must have been built);
    * an existing local folder (or anything that looks like a path) -> that folder, which must be a
      diffusers Stable Diffusion folder (``model_index.json`` or ``unet/config.json``);
    * otherwise a Hugging Face hub id, returned as is.
    """
    pretrained = str(pretrained).strip()
    if not pretrained:
        raise ModelNotFoundError("model.pretrained is empty: set it to 'tiny', a local folder or a hub id")
    kind = _kind(pretrained)
    if kind == "tiny":
        tiny_dir = Path(tiny_dir)
        if not _is_diffusers_folder(tiny_dir):
            raise ModelNotFoundError(
                f"the tiny offline model is not built at '{tiny_dir}'. Build it first: run the "
                f"build_tiny_model rule (snakemake build_tiny_model) or "
                f"`python -m workflow_scripts.models.build_tiny_model --build-tiny {tiny_dir}`."
            )
        return str(tiny_dir)
    if kind == "local":
        path = local_folder(pretrained)
        if not path.exists():
            raise ModelNotFoundError(
                f"model.pretrained '{pretrained}' looks like a local folder but it does not exist "
                f"(working directory: {Path.cwd()}). " + _download_hint("stable-diffusion-v1-5/stable-diffusion-v1-5", pretrained)
            )
        if not path.is_dir() or not _is_diffusers_folder(path):
            raise ModelNotFoundError(
                f"'{pretrained}' is not a diffusers Stable Diffusion folder: it has neither "
                f"model_index.json nor unet/config.json. Point model.pretrained at the folder that holds "
                f"model_index.json and the unet/, vae/, text_encoder/, tokenizer/, scheduler/ subfolders "
                f"(as downloaded by `hf download stable-diffusion-v1-5/stable-diffusion-v1-5 "
                f"--local-dir models/sd15`); single-file .ckpt/.safetensors checkpoints are not supported."
            )
        return str(path)
    return pretrained


def _download_hint(repo_id: str, local_dir: str = "models/sd15") -> str:
    return (
        f"Download it where the network allows: `hf download {repo_id} --local-dir {local_dir}` "
        f"(or `snakemake download_weights`), copy the folder here and set model.pretrained: {local_dir} "
        f"in your config; or log in (`hf auth login`) "
        f"if the hub asks for it. For an offline demo use model.pretrained: tiny."
    )


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE as set *now* (huggingface_hub reads them only at import)."""
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - very old huggingface_hub
        return False


def hub_unreachable_reason(repo_id: str, timeout: float = 10.0) -> str | None:
    """One quick request to the hub (no retries); returns why it failed, or None if it answered.

    huggingface_hub retries connection errors with back-off for every file (minutes when offline), so we
    probe once first and, when the hub is unreachable, load from the local cache only.
    """
    try:
        from huggingface_hub import constants
        from huggingface_hub.utils import get_session

        endpoint = os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")
        get_session().head(f"{endpoint}/api/models/{repo_id}", timeout=timeout)
        return None  # any HTTP answer (200, 401, 404...) means it is reachable
    except Exception as exc:  # noqa: BLE001 - connection, DNS, proxy, timeout errors
        return f"the Hugging Face hub is unreachable ({type(exc).__name__}: {exc})"


def _quiet_known_warnings() -> None:
    """Silence deprecation noise that diffusers itself triggers in huggingface_hub while loading."""
    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")


def _load_errors() -> tuple[type[BaseException], ...]:
    # KeyError: a model_index.json without the keys diffusers reads (e.g. "_class_name")
    errors: list[type[BaseException]] = [OSError, ValueError, KeyError, ConnectionError, TimeoutError]
    try:
        from huggingface_hub import errors as hf_errors

        for name in (
            "HfHubHTTPError", "OfflineModeIsEnabled", "EntryNotFoundError", "LocalEntryNotFoundError",
            "RepositoryNotFoundError", "RevisionNotFoundError", "GatedRepoError", "HFValidationError",
        ):
            if hasattr(hf_errors, name):
                errors.append(getattr(hf_errors, name))
    except Exception:  # pragma: no cover
        pass
    for mod_name, attr in (("httpx", "HTTPError"), ("httpx2", "HTTPError"), ("requests", "RequestException")):
        try:
            mod = __import__(mod_name)
            errors.append(getattr(mod, attr))
        except Exception:
            pass
    return tuple(errors)


def _hub_kwargs(pretrained: str, kind: str) -> tuple[dict[str, Any], str | None]:
    """Extra from_pretrained kwargs for a hub id (local_files_only when offline) and the offline reason."""
    if kind != "hub":
        return {}, None
    if hub_offline():
        return {"local_files_only": True}, "HF_HUB_OFFLINE is set and it is not in the local cache"
    reason = hub_unreachable_reason(pretrained)
    if reason:
        return {"local_files_only": True}, reason + " and it is not in the local cache"
    return {}, None


def _not_found(pretrained: str, exc: BaseException, offline_reason: str | None) -> ModelNotFoundError:
    reason = offline_reason or f"{type(exc).__name__}: {exc}"
    reason = " ".join(str(reason).split())
    if len(reason) > 500:
        reason = reason[:500] + "..."
    hint = _download_hint(pretrained)
    extra = f" No local folder '{pretrained}' exists either (working directory: {Path.cwd()})."
    first = pretrained.split("/", 1)[0]
    if first and Path(first).is_dir():
        # e.g. "models/sd15" with models/ present: most likely a local folder that is missing
        hint = _download_hint("stable-diffusion-v1-5/stable-diffusion-v1-5", pretrained)
    return ModelNotFoundError(f"could not load Stable Diffusion '{pretrained}' ({reason}).{extra} {hint}")


def load_components(
    pretrained: str, tiny_dir: Path = DEFAULT_TINY_DIR, dtype: torch.dtype = torch.float32
) -> Components:
    """Load tokenizer, text encoder, VAE, UNet and the DDPM noise scheduler the standard way.

    Hub ids use the standard Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``) and download when the
    network allows; any failure raises ``ModelNotFoundError`` with instructions.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    source = resolve_pretrained(pretrained, tiny_dir)
    kind = _kind(str(pretrained).strip())
    extra, offline_reason = _hub_kwargs(source, kind)
    hint = (" Is it complete (unet/, vae/, text_encoder/, tokenizer/, scheduler/ with weights)?"
            + (f" Rebuild it with `python -m workflow_scripts.models.build_tiny_model --build-tiny {source}`."
               if kind == "tiny" else ""))
    with _loading(source, kind, offline_reason, hint):
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **extra)
        noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **extra)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype, **extra)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", dtype=dtype, **extra)
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", dtype=dtype, **extra)
    return Components(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        unet=unet,
        noise_scheduler=noise_scheduler,
        source=source,
        kind=kind,
    )


def load_pipeline(pretrained: str, tiny_dir: Path = DEFAULT_TINY_DIR, dtype: torch.dtype = torch.float32):
    """``StableDiffusionPipeline.from_pretrained`` with safety_checker=None and clear errors."""
    from diffusers import StableDiffusionPipeline

    source = resolve_pretrained(pretrained, tiny_dir)
    kind = _kind(str(pretrained).strip())
    extra, offline_reason = _hub_kwargs(source, kind)
    with _loading(source, kind, offline_reason):
        return StableDiffusionPipeline.from_pretrained(
            source,
            dtype=dtype,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            **extra,
        )


@contextlib.contextmanager
def _loading(source: str, kind: str, offline_reason: str | None, hint: str = ""):
    """Known loading warnings silenced; a failed load raised as ModelNotFoundError that says what to
    download (hub) or which folder is broken (`hint`: what to check there)."""
    try:
        with warnings.catch_warnings():
            _quiet_known_warnings()
            yield
    except _load_errors() as exc:
        if kind == "hub":
            raise _not_found(source, exc, offline_reason) from exc
        raise ModelNotFoundError(
            f"could not load the Stable Diffusion folder '{source}' ({type(exc).__name__}: {exc}).{hint}") from exc


def make_scheduler(name: str, config: dict[str, Any]):
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                           EulerDiscreteScheduler, PNDMScheduler)

    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    classes = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "euler_a": EulerAncestralDiscreteScheduler, "pndm": PNDMScheduler}
    return classes[name].from_config(config)
