"""LoRA fine-tuning of Stable Diffusion 1.5 on the prepared training split.

    python -m workflow_scripts.train_lora --config config/config.yaml [--resume latest|none|PATH]
    accelerate launch --multi_gpu --num_processes 4 -m workflow_scripts.train_lora --config ...

One loop, read top to bottom:
1. load the base model (hub id, local diffusers folder, or the offline `tiny` model), freeze it and
   add LoRA (peft) to the UNet attention projections (and optionally the text encoder);
2. encode every training image to VAE latents once and every distinct prompt once (no random
   augmentation exists to redo: flipping a chest X-ray is wrong), cached on disk;
3. train on the cached tensors. All randomness of a micro-step (latent sample, noise, timestep)
   comes from a generator seeded by (seed, micro-step, rank), and each epoch's order from
   (seed, epoch): a run resumed from any checkpoint follows the very same path as one never stopped;
4. every `save_steps`: an atomic checkpoint (LoRA weights, optimizer, LR scheduler, scaler, RNG,
   position) in results/lora/checkpoints/ — not a Snakemake output, so it survives failures and
   re-runs resume from it; every `validation_steps`: sample images into TensorBoard;
5. at the end: `final/pytorch_lora_weights.safetensors` (loads with
   `StableDiffusionPipeline.load_lora_weights(dir)`) and `final/training_summary.json`.
The host reads the loss back only every LOG_EVERY steps (progress bar, NaN check, TensorBoard).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from workflow_scripts.base_model import ModelNotFoundError, load_components
from workflow_scripts.config import ConfigError, add_config_arguments, config_from_args, config_hash
from workflow_scripts.faults import maybe_fail
from workflow_scripts.images import BadImageError
from workflow_scripts.prepare_dataset import DataError, make_prompt

UNET_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
LOG_EVERY = 10  # optimizer steps between host syncs
CHECKPOINT_PREFIX = "checkpoint-"


class TrainingError(RuntimeError):
    """Training cannot start or cannot go on; the message says why and what to do."""


@dataclass
class Position:
    """Where training stands, in micro-batches: everything else derives from it."""

    micro_step: int = 0
    images_seen: int = 0
    train_seconds: float = 0.0


# ----------------------------------------------------------------------------- model


def add_lora(model: torch.nn.Module, rank: int, alpha: float, targets: list[str]) -> None:
    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets))


def place(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move to the device; cast only when the dtype changes (diffusers warns on every explicit cast)."""
    model.to(device)
    if next(model.parameters()).dtype != dtype:
        model.to(dtype=dtype)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().cpu().clone() for name, param in model.named_parameters() if param.requires_grad}


def save_diffusers_lora(directory: Path, unet: torch.nn.Module, text_encoder: torch.nn.Module | None) -> None:
    """`pytorch_lora_weights.safetensors` as diffusers writes it, with the LoRA config (rank, alpha)
    in its metadata so `load_lora_weights` restores the right scale when alpha != rank."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    def layers_and_config(model):
        return convert_state_dict_to_diffusers(get_peft_model_state_dict(model)), model.peft_config["default"].to_dict()

    unet_layers, unet_meta = layers_and_config(unet)
    text_layers, text_meta = layers_and_config(text_encoder) if text_encoder is not None else (None, None)
    StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=unet_layers, text_encoder_lora_layers=text_layers,
                                              unet_lora_adapter_metadata=unet_meta, text_encoder_lora_adapter_metadata=text_meta,
                                              safe_serialization=True)


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [name for name in state if name not in params]
    if missing:
        raise TrainingError(f"checkpoint holds weights the model lacks, e.g. {missing[0]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


# ----------------------------------------------------------------------------- data


def train_data_hash(data_dir: Path) -> str:
    import hashlib

    return hashlib.sha256((data_dir / "train.csv").read_bytes()).hexdigest()[:16]


@torch.no_grad()
def encode_training_set(components, data_dir: Path, resolution: int, device: torch.device, cache_path: Path,
                        batch_size: int, show_progress: bool) -> dict[str, Any]:
    """VAE latent distributions (mean, std) of every training image, and the prompt of each.

    Latents are *sampled* from the cached distribution at every step, as the reference loop does
    by encoding every step, so caching changes the cost and not the training signal."""
    if cache_path.is_file():
        return torch.load(cache_path, map_location="cpu")
    from torch.utils.data import DataLoader

    from workflow_scripts.xray_dataset import XrayPromptDataset

    dataset = XrayPromptDataset(data_dir, resolution, split="train")
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=min(4, os.cpu_count() or 1) if len(dataset) > 256 else 0)
    means, stds, prompts = [], [], []
    vae = components.vae
    for batch in tqdm(loader, desc="caching latents", unit="batch", disable=not show_progress, file=sys.stderr):
        dist = vae.encode(batch["pixel_values"].to(device, vae.dtype)).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
        prompts.extend(batch["prompt"])
    cache = {"mean": torch.cat(means), "std": torch.cat(stds), "prompts": prompts}
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    partial = cache_path.with_suffix(".partial")
    torch.save(cache, partial)
    os.replace(partial, cache_path)
    return cache


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def epoch_order(num_images: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_images, generator=generator)


def step_generator(seed: int, micro_step: int, rank: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + micro_step) * 64 + rank)


# ----------------------------------------------------------------------------- loss


def diffusion_loss(unet, noise_scheduler, latents: torch.Tensor, prompt_embeds: torch.Tensor,
                   generator: torch.Generator, snr_gamma: float | None, noise_offset: float) -> torch.Tensor:
    """The denoising loss of one batch (epsilon or v target), optionally min-SNR weighted."""
    from diffusers.training_utils import compute_snr

    batch, device = latents.shape[0], latents.device
    noise = torch.randn(latents.shape, generator=generator, device=device)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((batch, latents.shape[1], 1, 1), generator=generator, device=device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), generator=generator, device=device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    prediction = unet(noisy, timesteps, prompt_embeds, return_dict=False)[0]
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is None:
        return per_sample.mean()
    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.clamp(snr, max=snr_gamma) / snr
    if noise_scheduler.config.prediction_type == "v_prediction":
        weights = torch.clamp(snr, max=snr_gamma) / (snr + 1)
    return (per_sample * weights).mean()


# ----------------------------------------------------------------------------- checkpoints


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    found = [p for p in checkpoints_dir.glob(f"{CHECKPOINT_PREFIX}*") if re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))


def resume_fingerprint(config: dict[str, Any], source: str, data_hash: str, world_size: int) -> dict[str, Any]:
    """What must be equal for a checkpoint to continue this run (epochs or step limits may change)."""
    return {
        "base_model": source,
        "resolution": config["model"]["resolution"],
        "lora_rank": config["model"]["lora_rank"],
        "lora_alpha": config["model"]["lora_alpha"],
        "train_text_encoder": config["model"]["train_text_encoder"],
        "train_data": data_hash,
        "train_batch_size": config["training"]["train_batch_size"],
        "gradient_accumulation_steps": config["training"]["gradient_accumulation_steps"],
        "seed": config["training"]["seed"],
        "processes": world_size,
    }


def save_checkpoint(checkpoints_dir: Path, step: int, models: dict[str, torch.nn.Module], optimizer, lr_scheduler,
                    accelerator, position: Position, fingerprint: dict[str, Any], keep: int) -> Path:
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
    save_diffusers_lora(partial, accelerator.unwrap_model(models["unet"]),
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
        chosen = found[-1]
    else:
        chosen = Path(resume)
        if not (chosen / "position.json").is_file():
            raise TrainingError(f"--resume {resume}: not a checkpoint folder (no position.json)")
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


def load_checkpoint(path: Path, models: dict[str, torch.nn.Module], optimizer, lr_scheduler, accelerator) -> Position:
    from safetensors.torch import load_file

    for name, model in models.items():
        load_trainable_state(accelerator.unwrap_model(model), load_file(path / f"lora_{name}.safetensors"))
    state = torch.load(path / "training_state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if accelerator.scaler is not None and state["scaler"] is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    recorded = json.loads((path / "position.json").read_text())
    return Position(recorded["micro_step"], recorded["images_seen"], recorded["train_seconds"])


# ----------------------------------------------------------------------------- validation


def validation_prompts(config: dict[str, Any]) -> list[str]:
    prompts = config["training"]["validation_prompts"]
    return prompts or [make_prompt([label], config["prompt"]["template"]) for label in config["dataset"]["labels"]]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text.removeprefix("A chest X-ray with ")).strip("_")


@torch.no_grad()
def run_validation(components, unet, text_encoder, config: dict[str, Any], step: int, device: torch.device,
                   writer, out_dir: Path, autocast) -> None:
    """Sample each validation prompt with the training components (no second model in memory)."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    from PIL import Image

    pipeline = StableDiffusionPipeline(
        vae=components.vae, text_encoder=text_encoder, tokenizer=components.tokenizer, unet=unet,
        scheduler=DPMSolverMultistepScheduler.from_config(components.noise_scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    resolution, count = config["model"]["resolution"], config["training"]["num_validation_images"]
    was_training = unet.training
    unet.eval()
    step_dir = out_dir / f"step-{step}"
    step_dir.mkdir(parents=True, exist_ok=True)
    for prompt in validation_prompts(config):
        generator = torch.Generator(device=device).manual_seed(config["training"]["seed"])
        with autocast():
            images = pipeline(prompt, num_images_per_prompt=count, height=resolution, width=resolution, generator=generator,
                              num_inference_steps=config["training"]["validation_inference_steps"], output_type="np").images
        grid = np.concatenate(list((np.clip(images, 0, 1) * 255).round().astype(np.uint8)), axis=1)  # H x (count*W) x 3
        Image.fromarray(grid).save(step_dir / f"{slug(prompt)}.png")
        if writer is not None:
            writer.add_image(f"validation/image_{slug(prompt)}", grid, step, dataformats="HWC")
        maybe_fail("validation")
    unet.train(was_training)


# ----------------------------------------------------------------------------- the loop


def make_optimizer(params: list[torch.nn.Parameter], training: dict[str, Any], device: torch.device):
    if training["use_8bit_adam"]:
        if device.type != "cuda":
            raise TrainingError("training.use_8bit_adam needs a CUDA GPU (bitsandbytes); set it to false on this machine")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise TrainingError("training.use_8bit_adam needs bitsandbytes: pip install bitsandbytes, "
                                "or set training.use_8bit_adam: false") from None
        return bnb.optim.AdamW8bit(params, lr=training["learning_rate"], weight_decay=training["adam_weight_decay"])
    return torch.optim.AdamW(params, lr=training["learning_rate"], weight_decay=training["adam_weight_decay"],
                             fused=device.type == "cuda")


def peak_memory_bytes(device: torch.device) -> dict[str, int]:
    import resource

    peak = {"host_max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        peak["gpu_max_allocated"] = torch.cuda.max_memory_allocated(device)
    return peak


def library_versions() -> dict[str, str]:
    import accelerate
    import diffusers
    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__, "transformers": transformers.__version__}


def train(config: dict[str, Any], data_dir: Path, output_dir: Path, tiny_dir: Path, resume: str = "latest") -> dict[str, Any]:
    """Train, and leave the process able to train again (accelerate keeps process-wide state)."""
    from accelerate.state import AcceleratorState, GradientState

    try:
        return _train(config, data_dir, output_dir, tiny_dir, resume)
    finally:
        AcceleratorState._reset_state()
        GradientState._reset_state()


def _train(config: dict[str, Any], data_dir: Path, output_dir: Path, tiny_dir: Path, resume: str) -> dict[str, Any]:
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    model_cfg, training, hardware = config["model"], config["training"], config["hardware"]
    if training["mixed_precision"] == "fp16" and not torch.cuda.is_available():
        raise TrainingError("training.mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on this machine")
    accelerator = Accelerator(mixed_precision=training["mixed_precision"],
                              gradient_accumulation_steps=training["gradient_accumulation_steps"])
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    main_process = accelerator.is_main_process
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(training["mixed_precision"], torch.float32)

    # 1. model: frozen base (in the compute dtype), LoRA weights trainable in fp32.
    components = load_components(model_cfg["pretrained"], tiny_dir)
    torch.manual_seed(training["seed"])  # LoRA's gaussian init draws from the global generator
    unet, text_encoder, vae = components.unet, components.text_encoder, components.vae
    vae.requires_grad_(False)
    place(vae, device, torch.float32)  # fp32: used once for encoding; SD's VAE overflows in fp16
    add_lora(unet, model_cfg["lora_rank"], model_cfg["lora_alpha"], UNET_LORA_TARGETS)
    place(unet, device, weight_dtype)
    text_encoder.requires_grad_(False)
    if model_cfg["train_text_encoder"]:
        add_lora(text_encoder, model_cfg["lora_rank"], model_cfg["lora_alpha"], TEXT_LORA_TARGETS)
    place(text_encoder, device, weight_dtype)
    trained = {"unet": unet, **({"text_encoder": text_encoder} if model_cfg["train_text_encoder"] else {})}
    for model in trained.values():
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    if hardware["enable_xformers"]:
        try:
            unet.enable_xformers_memory_efficient_attention()
        except Exception as error:  # xformers missing or unsupported on this device
            raise TrainingError(f"hardware.enable_xformers: {error}; install xformers or set it to false (PyTorch SDPA is used then)") from None
    if training["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()
        if model_cfg["train_text_encoder"]:
            text_encoder.gradient_checkpointing_enable()

    # 2. data: cached latents and prompt embeddings.
    data_hash = train_data_hash(data_dir)
    cache_path = output_dir / "cache" / f"latents-{config_hash([components.source, model_cfg['resolution'], data_hash])}.pt"
    if main_process:
        encode_training_set(components, data_dir, model_cfg["resolution"], device, cache_path,
                            training["train_batch_size"], show_progress=True)
    accelerator.wait_for_everyone()
    cache = encode_training_set(components, data_dir, model_cfg["resolution"], device, cache_path, 1, False)
    latent_mean, latent_std = cache["mean"].to(device), cache["std"].to(device)
    unique_prompts = sorted(set(cache["prompts"]))
    prompt_index = torch.tensor([unique_prompts.index(p) for p in cache["prompts"]], device=device)
    prompt_ids = tokenize(components.tokenizer, unique_prompts).to(device)
    with torch.no_grad(), accelerator.autocast():
        cached_embeds = None if model_cfg["train_text_encoder"] else text_encoder(prompt_ids)[0].to(weight_dtype)
    scaling = vae.config.scaling_factor

    num_images, batch = len(cache["prompts"]), training["train_batch_size"]
    batches_per_epoch = num_images // (batch * world)
    if batches_per_epoch == 0:
        raise TrainingError(f"{num_images} training images are fewer than one batch "
                            f"(training.train_batch_size {batch} x {world} processes); lower the batch size")
    accumulation = training["gradient_accumulation_steps"]
    total_steps = training["max_train_steps"] or math.ceil(training["num_train_epochs"] * batches_per_epoch / accumulation)
    total_micro = total_steps * accumulation

    # 3. optimizer, schedule, resume.
    params = [p for model in trained.values() for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, training, device)
    lr_scheduler = get_scheduler(training["lr_scheduler"], optimizer=optimizer,
                                 num_warmup_steps=training["lr_warmup_steps"], num_training_steps=total_steps)
    prepared = accelerator.prepare(*trained.values(), optimizer)
    trained = dict(zip(trained, prepared[:-1]))
    optimizer = prepared[-1]
    unet = trained["unet"]
    text_encoder = trained.get("text_encoder", text_encoder)

    checkpoints_dir = output_dir / "checkpoints"
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = resume_fingerprint(config, components.source, data_hash, world)
    accelerator.wait_for_everyone()
    chosen = [choose_checkpoint(checkpoints_dir, resume, fingerprint) if main_process else None]
    if world > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(chosen)  # every process resumes from the checkpoint the main one chose
    start_from = chosen[0]
    position = load_checkpoint(start_from, trained, optimizer, lr_scheduler, accelerator) if start_from else Position()
    if start_from and main_process:
        print(f"resuming from {start_from} (step {position.micro_step // accumulation})", file=sys.stderr)

    writer = None
    if main_process:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(output_dir / "logs"))
    progress = tqdm(total=total_steps, initial=position.micro_step // accumulation, desc="train_lora", unit="step",
                    disable=not main_process, file=sys.stderr, dynamic_ncols=True)
    loss_sum, loss_count, last_loss = torch.zeros((), device=device), 0, float("nan")
    last_saved: Path | None = start_from
    clock = time.perf_counter()  # runs only while training: checkpoints and validation are not counted
    logged = (position.images_seen, position.train_seconds)

    def stop_clock() -> None:
        position.train_seconds += time.perf_counter() - clock

    def check_finite(step: int) -> float:
        """One host sync: the mean loss since the last check, refused if NaN or inf."""
        nonlocal loss_sum, loss_count
        value = (loss_sum / max(loss_count, 1)).item()
        loss_sum, loss_count = torch.zeros((), device=device), 0
        if not math.isfinite(value):
            kept = f"the last good checkpoint is {last_saved}" if last_saved else "no checkpoint was saved yet"
            raise TrainingError(f"loss became {value} by step {step}; training stopped and {kept}. Try a lower "
                                "training.learning_rate, bf16 instead of fp16, or a smaller training.max_grad_norm")
        return value

    unet.train()
    order_epoch, order = -1, None
    while position.micro_step < total_micro:
        epoch, slot = divmod(position.micro_step, batches_per_epoch)
        if epoch != order_epoch:  # once per epoch, kept on the device: no per-step host work
            order, order_epoch = epoch_order(num_images, training["seed"], epoch).to(device), epoch
        start = (slot * world + rank) * batch
        indices = order[start:start + batch]
        generator = step_generator(training["seed"], position.micro_step, rank, device)

        with accelerator.accumulate(*trained.values()):
            latents = latent_mean[indices] + latent_std[indices] * torch.randn(
                latent_mean[indices].shape, generator=generator, device=device)
            latents = (latents * scaling).to(weight_dtype)
            with accelerator.autocast():
                if cached_embeds is not None:
                    embeds = cached_embeds[prompt_index[indices]]
                else:
                    embeds = text_encoder(prompt_ids[prompt_index[indices]])[0]
                loss = diffusion_loss(unet, components.noise_scheduler, latents, embeds, generator,
                                      training["snr_gamma"], training["noise_offset"])
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, training["max_grad_norm"])
            optimizer.step()  # accelerate steps only when the accumulation window is complete
            optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        loss_count += 1
        position.micro_step += 1
        position.images_seen += batch * world
        if position.micro_step % accumulation:
            continue

        # An optimizer step has completed.
        lr_scheduler.step()
        step = position.micro_step // accumulation
        progress.update(1)
        maybe_fail("train_step")
        log_now = step % LOG_EVERY == 0 or step == total_steps
        save_now = step % training["save_steps"] == 0 or step == total_steps
        validate_now = step % training["validation_steps"] == 0 or step == total_steps
        if not (log_now or save_now or validate_now):
            continue
        stop_clock()
        if log_now or loss_count:
            last_loss = check_finite(step)
            speed = (position.images_seen - logged[0]) / max(position.train_seconds - logged[1], 1e-9)
            logged = (position.images_seen, position.train_seconds)
            progress.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{speed:.1f}")
            if writer is not None:
                writer.add_scalar("train/loss", last_loss, step)
                writer.add_scalar("train/lr", lr_scheduler.get_last_lr()[0], step)
                writer.add_scalar("train/images_per_second", speed, step)
        if save_now:
            if main_process:
                last_saved = save_checkpoint(checkpoints_dir, step, trained, optimizer, lr_scheduler, accelerator,
                                             position, fingerprint, training["checkpoints_total_limit"])
            accelerator.wait_for_everyone()
        if validate_now and main_process:
            run_validation(components, accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder), config, step,
                           device, writer, output_dir / "validation", accelerator.autocast)
        accelerator.wait_for_everyone()
        clock = time.perf_counter()
    progress.close()

    # 5. the final LoRA, in the format diffusers' load_lora_weights reads.
    summary: dict[str, Any] = {}
    if main_process:
        final, partial = output_dir / "final", output_dir / "final.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        save_diffusers_lora(partial, accelerator.unwrap_model(unet),
                            accelerator.unwrap_model(text_encoder) if model_cfg["train_text_encoder"] else None)
        summary = {
            "steps": total_steps,
            "epochs": round(position.micro_step / batches_per_epoch, 3),
            "final_loss": last_loss,
            "train_images": num_images,
            "images_seen": position.images_seen,
            "train_seconds": round(position.train_seconds, 3),
            "images_per_second": round(position.images_seen / max(position.train_seconds, 1e-9), 3),
            "peak_memory_bytes": peak_memory_bytes(device),
            "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
            "processes": world,
            "base_model": components.source,
            "lora_rank": model_cfg["lora_rank"],
            "lora_alpha": model_cfg["lora_alpha"],
            "mixed_precision": training["mixed_precision"],
            "seed": training["seed"],
            "resumed_from": str(start_from) if start_from else None,
            "train_data_hash": data_hash,
            "config_hash": config_hash({key: config[key] for key in ("dataset", "split", "balance", "prompt", "model", "training")}),
            "versions": library_versions(),
        }
        (partial / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        writer.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--data-dir", type=Path, default=Path("results/data"), help="folder with train.csv")
    parser.add_argument("--output-dir", type=Path, default=Path("results/lora"), help="checkpoints/, logs/, final/")
    parser.add_argument("--tiny-dir", type=Path, default=Path("results/models/tiny-sd"), help="where model.pretrained: tiny lives")
    parser.add_argument("--resume", default="latest", help="latest (default), none, or a checkpoint-N folder")
    args = parser.parse_args(argv)
    try:
        summary = train(config_from_args(args, "train_lora"), args.data_dir, args.output_dir, args.tiny_dir, args.resume)
    except (ConfigError, DataError, BadImageError, ModelNotFoundError, TrainingError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if summary:
        print(f"trained {summary['steps']} steps ({summary['epochs']} epochs) in {summary['train_seconds']:.0f} s, "
              f"{summary['images_per_second']:.1f} images/s, final loss {summary['final_loss']:.4f}; "
              f"LoRA in {args.output_dir / 'final'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
