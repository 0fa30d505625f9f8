"""LoRA training's checkpoints: the position a run stands at, and the atomic step checkpoints (LoRA
weights, optimizer, LR scheduler, scaler, RNG, position) in results/lora/checkpoints/ that a run
resumes from. A checkpoint made under another configuration (`resume_fingerprint`) is never used
silently; a damaged one is skipped (integrity.latest_intact).
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

from workflow_scripts.config import result_config
from workflow_scripts.errors import TrainingError
from workflow_scripts.faults import maybe_fail
from workflow_scripts.integrity import checkpoint_problem, latest_intact
from workflow_scripts.lora_training import RESUMABLE_TRAINING_KEYS, write_lora

CHECKPOINT_PREFIX = "checkpoint-"


@dataclass
class Position:
    """Where training stands, in micro-batches: everything else derives from it."""

    micro_step: int = 0
    images_seen: int = 0
    train_seconds: float = 0.0
    val_loss: list[dict[str, float]] = field(default_factory=list)  # {"step", "loss"} at step 0 and every checkpoint
    train_loss: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss since the last log)


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
    from safetensors.torch import load_file

    for name, model in models.items():
        load_trainable_state(accelerator.unwrap_model(model), load_file(path / f"lora_{name}.safetensors"))
    state = torch.load(path / "training_state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if accelerator.scaler is not None and state["scaler"] is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    restore_rng(state["rng"])
    recorded = json.loads((path / "position.json").read_text())
    return Position(recorded["micro_step"], recorded["images_seen"], recorded["train_seconds"],
                    recorded.get("val_loss", []), [tuple(pair) for pair in recorded.get("train_loss", [])])
