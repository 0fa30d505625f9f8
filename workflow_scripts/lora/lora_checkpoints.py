"""`train_lora`'s files: the step checkpoints it resumes from and the LoRA it exports.

- `save_checkpoint` / `load_checkpoint`: checkpoint-<step>/ (LoRA weights, optimizer, LR scheduler,
  scaler, RNG, `Position`), written atomically; the oldest beyond `checkpoints_total_limit` pruned;
- `choose_checkpoint`: the one to resume from, never one made under another configuration
  (`resume_fingerprint`, which leaves out RESUMABLE_TRAINING_KEYS);
- `write_lora`: `pytorch_lora_weights.safetensors` (diffusers' `load_lora_weights(dir)`) and
  `lora_kohya.safetensors` (AUTOMATIC1111 WebUI / ComfyUI).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workflow_scripts.common.config import result_config
from workflow_scripts.common.errors import TrainingError
from workflow_scripts.common.faults import maybe_fail
from workflow_scripts.lora.integrity import checkpoint_problem, latest_intact

CHECKPOINT_PREFIX = "checkpoint-"
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name; `load_lora_weights(dir)` finds it
KOHYA_FILE = "lora_kohya.safetensors"  # AUTOMATIC1111 / ComfyUI / kohya naming (lora_unet_..., lora_te_...)


# Keys of `training:` that only extend or observe a run: a checkpoint made under other values of these
# may be resumed (config.result_config(config, "train_lora", ignore=...) leaves them out of its fingerprint).
RESUMABLE_TRAINING_KEYS = tuple(f"training.{key}" for key in (
    "num_train_epochs", "max_train_steps", "save_steps", "checkpoints_total_limit", "validation_steps",
    "num_validation_images", "validation_inference_steps", "validation_prompts", "deterministic", "val_loss_images",
    "select_checkpoint"))


@dataclass
class Position:
    """Where training stands, in micro-batches: everything else derives from it."""

    micro_step: int = 0
    images_seen: int = 0
    train_seconds: float = 0.0
    val_loss: list[dict[str, float]] = field(default_factory=list)  # {"step", "loss"} at step 0 and every checkpoint
    train_loss: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss since the last log)


# ----------------------------------------------------------------------------- checkpoints


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().cpu().clone() for name, param in model.named_parameters() if param.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [name for name in state if name not in params]
    if missing:
        raise TrainingError(f"checkpoint holds weights the model lacks, e.g. {missing[0]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    found = [p for p in checkpoints_dir.glob(f"{CHECKPOINT_PREFIX}*") if re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))


def resume_fingerprint(config: dict[str, Any], source: str, data_hash: str, world_size: int) -> dict[str, Any]:
    """What must be equal for a checkpoint to continue this run: the result-defining keys of `model:`
    and `training:` less RESUMABLE_TRAINING_KEYS (epochs, step limits, saving, validation,
    determinism), the resolved base model (for model.pretrained), the training data (for the data
    sections) and the number of processes."""
    defining = result_config(config, "train_lora", ignore=("dataset", "split", "balance", "prompt", "model.pretrained",
                                                           *RESUMABLE_TRAINING_KEYS))
    return {"base_model": source, **defining["model"], **defining["training"], "train_data": data_hash,
            "processes": world_size}


def save_checkpoint(checkpoints_dir: Path, step: int, models: dict[str, torch.nn.Module], optimizer, lr_scheduler,
                    accelerator, position: Position, fingerprint: dict[str, Any], keep: int,
                    protect: int | None = None) -> Path:
    """Write checkpoint-<step> atomically: a run killed mid-save leaves only a `.partial` folder,
    which is ignored and cleared, and the previous checkpoint stays usable."""
    from safetensors.torch import save_file

    final = checkpoints_dir / f"{CHECKPOINT_PREFIX}{step}"
    partial = checkpoints_dir / f"{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name, model in models.items():
        save_file(trainable_state(accelerator.unwrap_model(model)), partial / f"lora_{name}.safetensors")
    maybe_fail("checkpoint_save")
    # Also in diffusers' format, so any checkpoint can be sampled (generate_xrays --checkpoint checkpoint-N).
    write_lora(partial, accelerator.unwrap_model(models["unet"]),
               accelerator.unwrap_model(models["text_encoder"]) if "text_encoder" in models else None)
    torch.save({
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }, partial / "training_state.pt")
    (partial / "position.json").write_text(json.dumps({"step": step, **asdict(position), "fingerprint": fingerprint}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    for old in list_checkpoints(checkpoints_dir)[:-keep]:
        if old.name != f"{CHECKPOINT_PREFIX}{protect}":  # the lowest val loss stays for select_checkpoint: val_loss
            shutil.rmtree(old, ignore_errors=True)
    return final


def choose_checkpoint(checkpoints_dir: Path, resume: str, fingerprint: dict[str, Any]) -> Path | None:
    """The checkpoint to resume from: `latest` (default), `none`, or a path. A checkpoint made under
    another configuration is never used silently: its folder is moved aside and training starts fresh."""
    for partial in checkpoints_dir.glob("*.partial"):
        shutil.rmtree(partial, ignore_errors=True)  # a save that was killed midway
    if resume == "none":
        return None
    if resume == "latest":
        found = list_checkpoints(checkpoints_dir)
        if not found:
            return None
        chosen = latest_intact(found)  # a damaged checkpoint is moved aside with a note: the previous one is used
        if chosen is None:
            return None
    else:
        chosen = Path(resume)
        if not (chosen / "position.json").is_file():
            raise TrainingError(f"--resume {resume}: not a checkpoint folder (no position.json)")
        if problem := checkpoint_problem(chosen):
            raise TrainingError(f"--resume {resume}: the checkpoint is damaged: {problem}")
    recorded = json.loads((chosen / "position.json").read_text())["fingerprint"]
    differences = {key: (recorded.get(key), value) for key, value in fingerprint.items() if recorded.get(key) != value}
    if not differences:
        return chosen
    if resume != "latest":
        raise TrainingError(f"--resume {resume}: made under another configuration: "
                            + ", ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in differences.items()))
    stale = checkpoints_dir.parent / f"checkpoints_stale_{time.strftime('%Y%m%d-%H%M%S')}"
    os.replace(checkpoints_dir, stale)
    checkpoints_dir.mkdir()
    print("note: the checkpoints in " + str(checkpoints_dir) + " were made under another configuration ("
          + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in differences.items())
          + f"); moved them to {stale} and starting fresh", file=sys.stderr)
    return None


def restore_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def load_checkpoint(path: Path, models: dict[str, torch.nn.Module], optimizer, lr_scheduler, accelerator) -> Position:
    load_lora_state(path, models, accelerator)
    state = torch.load(path / "training_state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if accelerator.scaler is not None and state["scaler"] is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    restore_rng(state["rng"])
    recorded = json.loads((path / "position.json").read_text())
    return Position(recorded["micro_step"], recorded["images_seen"], recorded["train_seconds"],
                    recorded.get("val_loss", []), [tuple(pair) for pair in recorded.get("train_loss", [])])


def load_lora_state(folder: Path, models: dict[str, torch.nn.Module], accelerator) -> None:
    """The LoRA weights of checkpoint `folder` into `models` (optimizer and position untouched)."""
    from safetensors.torch import load_file

    for name, model in models.items():
        load_trainable_state(accelerator.unwrap_model(model), load_file(folder / f"lora_{name}.safetensors"))


# ----------------------------------------------------------------------------- the exported LoRA


def kohya_key(key: str) -> str:
    """diffusers' kohya key -> the clients' naming. The text encoder's modules are named as in the
    original CLIP checkpoint, `lora_te_text_model_encoder_layers_...` (kohya sd-scripts, ComfyUI,
    AUTOMATIC1111); diffusers writes `lora_te1_` and, on transformers 5 (whose CLIPTextModel has no
    `text_model` level), drops `text_model_`, and every client then ignores those weights."""
    if not key.startswith("lora_te1_"):
        return key
    rest = key.removeprefix("lora_te1_")
    return "lora_te_" + (rest if rest.startswith("text_model_") else "text_model_" + rest)


def readable(path: Path) -> None:
    """Permissions as the umask gives any new file (safetensors writes 0600), so that a WebUI
    running as another user can read the LoRA like the other outputs."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def write_lora(directory: Path, unet: torch.nn.Module, text_encoder: torch.nn.Module | None) -> None:
    """`pytorch_lora_weights.safetensors` as diffusers writes it (LoRA config in its metadata, so
    `load_lora_weights` restores the scale when alpha != rank), and `lora_kohya.safetensors`, the
    same weights in the kohya format AUTOMATIC1111 WebUI and ComfyUI read (alpha per module)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    models = {"unet": unet, **({"text_encoder": text_encoder} if text_encoder is not None else {})}
    # save_embedding_layers=False: LoRA never touches the embeddings; "auto" would look the base up on the hub
    # (a network call, and a warning offline) to decide whether the vocabulary grew.
    peft_layers = {name: get_peft_model_state_dict(model, save_embedding_layers=False) for name, model in models.items()}
    meta = {name: model.peft_config["default"].to_dict() for name, model in models.items()}
    StableDiffusionPipeline.save_lora_weights(
        directory, unet_lora_layers=convert_state_dict_to_diffusers(peft_layers["unet"]),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(peft_layers["text_encoder"]) if text_encoder is not None else None,
        unet_lora_adapter_metadata=meta["unet"], text_encoder_lora_adapter_metadata=meta.get("text_encoder"),
        weight_name=LORA_FILE, safe_serialization=True)
    kohya = convert_state_dict_to_kohya({f"{name}.{key}": value for name, layers in peft_layers.items()
                                         for key, value in layers.items()})
    alpha = float(meta["unet"]["lora_alpha"])
    # diffusers writes alpha = rank (scale 1); the scale is alpha / rank, so record the real alpha.
    kohya = {kohya_key(key): (torch.tensor(alpha) if key.endswith(".alpha") else value.detach().float().cpu().contiguous())
             for key, value in kohya.items()}
    save_file(kohya, directory / KOHYA_FILE, metadata={"ss_network_module": "networks.lora",
                                                       "ss_network_dim": str(meta["unet"]["r"]),
                                                       "ss_network_alpha": str(alpha)})
    for name in (LORA_FILE, KOHYA_FILE):
        readable(directory / name)

