"""LoRA fine-tuning of Stable Diffusion 1.5 on the prepared training split (the stage CLI).

    python -m workflow_scripts.lora.train_lora --config config/config.yaml [--resume latest|none|PATH]
    accelerate launch --multi_gpu --num_processes 4 -m workflow_scripts.lora.train_lora --config ...

The whole run reads top to bottom in this file; the model and its loss are in `lora_model`, the
latent cache in `latent_cache`, checkpoints and the exported LoRA in `lora_checkpoints`, the val
loss and validation images in `lora_validation`. The phases, in the order of the code:
1. config and device: `train` picks the device and the `hardware:` levers that apply there;
2. models (`setup_run`): base model (hub id, local diffusers folder, or the offline `tiny` model)
   frozen, LoRA (peft) on the UNet attention projections (optionally the text encoder);
3. the latent cache: every training image encoded to its VAE latent distribution once, each process
   encoding its share (fp16, memory-mapped; on the device when it fits `hardware.latent_cache_device_budget_gb`, else
   gathered per batch from host memory), and every distinct prompt once;
4. the loop (`train_steps`): all randomness of a micro-step (latent sample, noise, timestep) comes
   from a generator seeded by (seed, micro-step, rank), and each epoch's order from (seed, epoch): a
   run resumed from any checkpoint follows the very same path as one never stopped. The host reads
   the loss back only every LOG_EVERY steps (progress bar, NaN check, TensorBoard);
5. at an optimizer step: every `save_steps` an atomic checkpoint (LoRA weights, optimizer, LR
   scheduler, scaler, RNG, position) in results/lora/checkpoints/ — not a Snakemake output, so it
   survives failures and re-runs resume from it; every `validation_steps` sample images into TensorBoard;
6. the final write (`write_final`): `final/pytorch_lora_weights.safetensors` (`StableDiffusionPipeline.load_lora_weights(dir)`),
   `final/lora_kohya.safetensors` (WebUI / ComfyUI) and `final/training_summary.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from workflow_scripts.common import paths
from workflow_scripts.models.base_model import DEFAULT_TINY_DIR, load_components
from workflow_scripts.common.config import add_config_arguments, config_from_args, config_hash, result_hash
from workflow_scripts.common.errors import TrainingError, run_stage
from workflow_scripts.common.faults import maybe_fail
from workflow_scripts.common.hardware import DTYPES, gpu_levers, hardware_settings
from workflow_scripts.lora.latent_cache import GIB, LatentCache, encode_latent_cache, latent_shape
from workflow_scripts.lora.lora_checkpoints import (CHECKPOINT_PREFIX, Position, choose_checkpoint, load_checkpoint,
                                                    load_lora_state, resume_fingerprint, save_checkpoint, write_lora)
from workflow_scripts.lora.lora_model import (Denoiser, LoraSpec, Prompts, Trainable, build_trainable_model,
                                              diffusion_loss, library_versions, make_optimizer, set_train_mode)
from workflow_scripts.lora.lora_validation import ValLoss, best_step, plot_losses, run_validation
from workflow_scripts.common.tables import Splits, add_split_arguments, split_path, splits_from_args

LOG_EVERY = 10  # optimizer steps between host syncs


# ----------------------------------------------------------------------------- 1. config and device


@dataclass(frozen=True)
class Run:
    """What the phases of one training run share."""

    config: dict[str, Any]
    spec: LoraSpec
    accelerator: Any
    components: Any
    trainable: Trainable  # the models prepared by accelerate, the parameters listed once
    optimizer: Any
    lr_scheduler: Any
    denoiser: Denoiser
    cache: LatentCache
    prompts: Prompts
    order: BatchOrder
    levers: dict[str, bool]
    data_hash: str
    total_steps: int
    checkpoints_dir: Path
    fingerprint: dict[str, Any]
    val_loss: ValLoss | None  # None: no val split given, or it is empty

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def train(config: dict[str, Any], data_dir: Splits, output_dir: Path, tiny_dir: Path, resume: str = "latest") -> dict[str, Any]:
    """The phases in order: models and cache, the checkpoint to resume from, the loop, the final write.
    Leaves the process able to train again (accelerate and torch keep process-wide state)."""
    from accelerate.state import AcceleratorState, GradientState

    training, hardware = config["training"], config["hardware"]
    device_type = "cuda" if torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU") not in ("1", "true") else "cpu"
    levers = gpu_levers(hardware, torch.device(device_type), training["deterministic"])
    try:
        with hardware_settings(levers, training["deterministic"]):
            run = setup_run(config, data_dir, output_dir, tiny_dir, levers)
            start_from = choose_start(run, resume)
            position = (load_checkpoint(start_from, run.trainable.models, run.optimizer, run.lr_scheduler, run.accelerator)
                        if start_from else Position())
            if start_from and run.main:
                print(f"resuming from {start_from} (step {position.micro_step // run.spec.accumulation})", file=sys.stderr)
            last_loss = train_steps(run, position, start_from, output_dir)
            summary = write_final(run, position, last_loss, start_from, output_dir) if run.main else {}
            run.accelerator.wait_for_everyone()
            run.accelerator.end_training()
            return summary
    finally:
        AcceleratorState._reset_state()
        GradientState._reset_state()


# ----------------------------------------------------------------------------- 2. models and 3. the cache


def setup_run(config: dict[str, Any], data_dir: Path, output_dir: Path, tiny_dir: Path, levers: dict[str, bool]) -> Run:
    """Phases 2 and 3: the trainable model, the latent cache, prompts, optimizer and schedule."""
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    model_cfg, training, hardware = config["model"], config["training"], config["hardware"]
    spec = LoraSpec.from_config(config)
    if training["mixed_precision"] == "fp16" and not torch.cuda.is_available():
        raise TrainingError("training.mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on this machine")
    accelerator = Accelerator(mixed_precision=training["mixed_precision"], gradient_accumulation_steps=spec.accumulation)
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    weight_dtype = DTYPES["fp32" if training["mixed_precision"] == "no" else training["mixed_precision"]]

    components = load_components(model_cfg["pretrained"], tiny_dir)
    trainable = build_trainable_model(components, spec, levers, device, weight_dtype)

    data_hash = train_data_hash(data_dir)
    key = config_hash([components.source, model_cfg["resolution"], model_cfg["crop"], data_hash])
    count, batches = image_batches(data_dir, model_cfg["resolution"], model_cfg["crop"], spec.batch_size)
    folder = encode_latent_cache(components.vae, batches, count, spec.batch_size, output_dir / "cache" / f"latents-{key}",
                                 latent_shape(components.vae, model_cfg["resolution"]), device, rank, world,
                                 accelerator.wait_for_everyone, show_progress=accelerator.is_main_process)
    cache = LatentCache(folder, device, hardware["latent_cache_device_budget_gb"] * GIB)
    if accelerator.is_main_process:
        print(cache.describe() + f" (budget hardware.latent_cache_device_budget_gb: {hardware['latent_cache_device_budget_gb']})",
              file=sys.stderr)
        print("GPU levers: " + (", ".join(k for k, v in levers.items() if v) or "none")
              + (", deterministic kernels" if training["deterministic"] else ""), file=sys.stderr)
    prompts = Prompts.build(cache.prompts, components.tokenizer, components.text_encoder, device, weight_dtype,
                            spec.train_text_encoder, accelerator.autocast)

    order = BatchOrder(len(cache), spec.seed, spec.batch_size, device, rank, world)
    if order.batches_per_epoch == 0:
        raise TrainingError(f"{len(cache)} training images are fewer than one batch "
                            f"(training.train_batch_size {spec.batch_size} x {world} processes); lower the batch size")
    total_steps = total_optimizer_steps(training, order.batches_per_epoch)
    optimizer = make_optimizer(trainable.params, spec, device)
    lr_scheduler = get_scheduler(training["lr_scheduler"], optimizer=optimizer,
                                 num_warmup_steps=training["lr_warmup_steps"], num_training_steps=total_steps)
    *models, optimizer = accelerator.prepare(*trainable.models.values(), optimizer)
    trainable = Trainable(dict(zip(trainable.models, models)), trainable.params)
    denoiser = Denoiser(trainable.models["unet"], trainable.models.get("text_encoder", components.text_encoder),
                        components.noise_scheduler, components.vae.config.scaling_factor, accelerator.autocast)
    checkpoints_dir = output_dir / "checkpoints"
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    val_loss = build_val_loss(config, data_dir, output_dir, components, spec, accelerator, weight_dtype)
    return Run(config, spec, accelerator, components, trainable, optimizer, lr_scheduler, denoiser, cache, prompts, order,
               levers, data_hash, total_steps, checkpoints_dir, resume_fingerprint(config, components.source, data_hash, world),
               val_loss)


def build_val_loss(config: dict[str, Any], data_dir: Splits, output_dir: Path, components, spec: LoraSpec, accelerator,
                   weight_dtype: torch.dtype) -> ValLoss | None:
    """The val split's latents (the first `training.val_loss_images`, cached like the training
    images) and prompts, for the held-out loss at every checkpoint; None without a val split."""
    import hashlib

    model_cfg = config["model"]
    if not accelerator.is_main_process:  # the main process alone scores the val split
        return None
    try:
        val_csv = split_path(data_dir, "val")
    except ValueError:  # no --val given
        return None
    if not val_csv.is_file():
        return None
    count, batches = image_batches(data_dir, model_cfg["resolution"], model_cfg["crop"], spec.batch_size, split="val")
    count = min(count, config["training"]["val_loss_images"] or count)
    if count == 0:
        return None
    key = config_hash([components.source, model_cfg["resolution"], model_cfg["crop"], count,
                       hashlib.sha256(val_csv.read_bytes()).hexdigest()[:16]])
    device = accelerator.device
    folder = encode_latent_cache(components.vae, batches, count, spec.batch_size, output_dir / "cache" / f"val-latents-{key}",
                                 latent_shape(components.vae, model_cfg["resolution"]), device)
    cache = LatentCache(folder, device, config["hardware"]["latent_cache_device_budget_gb"] * GIB)
    prompts = Prompts.build(cache.prompts, components.tokenizer, components.text_encoder, device, weight_dtype,
                            spec.train_text_encoder, accelerator.autocast)
    return ValLoss.build(cache, prompts, components.vae.config.scaling_factor, spec.seed, spec.batch_size)


def train_data_hash(data_dir: Splits) -> str:
    import hashlib

    return hashlib.sha256(split_path(data_dir, "train").read_bytes()).hexdigest()[:16]


def image_batches(data_dir: Path, resolution: int, crop: str, batch_size: int, split: str = "train"):
    """The number of images of `split`, and `batches(rows)`: (pixels, prompts, paths) of those rows, in file order."""
    from torch.utils.data import DataLoader, Subset

    from workflow_scripts.data.xray_dataset import XrayPromptDataset

    dataset = XrayPromptDataset(data_dir, resolution, split=split, crop=crop)
    workers = min(4, os.cpu_count() or 1) if len(dataset) > 256 else 0

    def batches(rows: range):
        loader = DataLoader(Subset(dataset, rows), batch_size=batch_size, num_workers=workers)
        return ((batch["pixel_values"], batch["prompt"], batch["path"]) for batch in loader)

    return len(dataset), batches


def total_optimizer_steps(training: dict[str, Any], batches_per_epoch: int) -> int:
    accumulation = training["gradient_accumulation_steps"]
    return training["max_train_steps"] or math.ceil(training["num_train_epochs"] * batches_per_epoch / accumulation)


# ----------------------------------------------------------------------------- 4. one micro-step


def epoch_order(num_images: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_images, generator=generator)


def step_generator(seed: int, micro_step: int, rank: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + micro_step) * 64 + rank)


class BatchOrder:
    """The images of each micro-step: every epoch a permutation seeded by (seed, epoch), dealt out
    batch by batch to the processes in turn. An epoch's order is computed once and kept on the
    device: no per-step host work in device mode."""

    def __init__(self, num_images: int, seed: int, batch_size: int, device: torch.device, rank: int = 0, world: int = 1):
        self.num_images, self.seed, self.batch_size, self.device = num_images, seed, batch_size, device
        self.rank, self.world = rank, world
        self.batches_per_epoch = num_images // (batch_size * world)
        self._epoch: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def __call__(self, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's images at `micro_step`, on the device and on the host."""
        epoch, slot = divmod(micro_step, self.batches_per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            order = epoch_order(self.num_images, self.seed, epoch)
            self._epoch = (epoch, order, order.to(self.device))
        start = (slot * self.world + self.rank) * self.batch_size
        return self._epoch[2][start:start + self.batch_size], self._epoch[1][start:start + self.batch_size]


def micro_batch_loss(denoiser: Denoiser, spec: LoraSpec, cache: LatentCache, prompts: Prompts,
                     indices: tuple[torch.Tensor, torch.Tensor], micro_step: int, rank: int = 0) -> torch.Tensor:
    """The loss of a micro-step's images (`BatchOrder`): latents sampled from the cached distribution,
    noise and timesteps from a generator seeded by (seed, micro-step, rank)."""
    device = cache.device
    generator = step_generator(spec.seed, micro_step, rank, device)
    mean, std = cache.gather(*indices)
    latents = (mean + std * torch.randn(mean.shape, generator=generator, device=device)) * denoiser.scaling  # fp32
    with denoiser.autocast():
        if prompts.embeds is not None:
            embeds = prompts.embeds[prompts.index[indices[0]]]
        else:
            embeds = denoiser.text_encoder(prompts.ids[prompts.index[indices[0]]])[0]
        return diffusion_loss(denoiser.unet, denoiser.noise_scheduler, latents, embeds, generator, spec.snr_gamma,
                              spec.noise_offset)


def optimize(accelerator, params: list[torch.nn.Parameter], optimizer, loss: torch.Tensor, max_grad_norm: float) -> None:
    """Backward, and at the end of an accumulation window clip and step (inside `accelerator.accumulate`,
    accelerate's optimizer steps only then)."""
    accelerator.backward(loss)
    if accelerator.sync_gradients:
        accelerator.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- 4. the loop and 5. checkpoints


def choose_start(run: Run, resume: str) -> Path | None:
    """The checkpoint every process resumes from (the main process chooses; None: start fresh)."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    chosen = [choose_checkpoint(run.checkpoints_dir, resume, run.fingerprint) if run.main else None]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(chosen)
    return chosen[0]


def train_steps(run: Run, position: Position, last_saved: Path | None, output_dir: Path) -> float:
    """Phases 4 and 5, the loop: accumulate micro-batches, step; then, where due, read the loss back
    (the one host sync), log, checkpoint and validate. Returns the last loss read."""
    accelerator, spec, training = run.accelerator, run.spec, run.config["training"]
    trainable, optimizer, world = run.trainable, run.optimizer, run.accelerator.num_processes
    writer = None
    if run.main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(output_dir / "logs"))
    progress = tqdm(total=run.total_steps, initial=position.micro_step // spec.accumulation, desc="train_lora",
                    unit="step", disable=not run.main, file=sys.stderr, dynamic_ncols=True)
    last_loss, logged = float("nan"), (position.images_seen, position.train_seconds)
    loss_sum, loss_count = torch.zeros((), device=accelerator.device), 0  # on the device until the next sync
    set_train_mode(trainable)
    if run.val_loss is not None and not position.val_loss:
        record_val_loss(run, position, 0, writer)  # the base without LoRA
    clock = time.perf_counter()  # runs only while training: checkpoints and validation are not counted
    while position.micro_step < run.total_steps * spec.accumulation:
        with accelerator.accumulate(*trainable.models.values()):
            loss = micro_batch_loss(run.denoiser, spec, run.cache, run.prompts, run.order(position.micro_step),
                                    position.micro_step, accelerator.process_index)
            optimize(accelerator, trainable.params, optimizer, loss, spec.max_grad_norm)
        loss_sum, loss_count = loss_sum + loss.detach(), loss_count + 1
        position.micro_step += 1
        position.images_seen += spec.batch_size * world
        if position.micro_step % spec.accumulation:
            continue
        run.lr_scheduler.step()
        step = position.micro_step // spec.accumulation
        progress.update(1)
        maybe_fail("train_step")
        final = step == run.total_steps
        if not (final or step % LOG_EVERY == 0 or step % training["save_steps"] == 0 or step % training["validation_steps"] == 0):
            continue
        last_loss = (loss_sum / loss_count).item()  # waits for the device: the clock stops after it
        position.train_seconds += time.perf_counter() - clock
        loss_sum, loss_count = torch.zeros_like(loss_sum), 0
        if not math.isfinite(last_loss):
            kept = f"the last good checkpoint is {last_saved}" if last_saved else "no checkpoint was saved yet"
            raise TrainingError(f"loss became {last_loss} by step {step}; training stopped and {kept}. The cached "
                                "latents are finite (checked as they were cached), so training itself diverged: try a "
                                "lower training.learning_rate, bf16 instead of fp16, or a smaller training.max_grad_norm")
        speed = (position.images_seen - logged[0]) / max(position.train_seconds - logged[1], 1e-9)
        logged = (position.images_seen, position.train_seconds)
        position.train_loss.append((step, round(last_loss, 6)))
        progress.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{speed:.1f}")
        if writer is not None:
            writer.add_scalar("train/loss", last_loss, step)
            writer.add_scalar("train/lr", run.lr_scheduler.get_last_lr()[0], step)
            writer.add_scalar("train/images_per_second", speed, step)
        if final or step % training["save_steps"] == 0:
            if run.main:
                if run.val_loss is not None:
                    record_val_loss(run, position, step, writer)
                    progress.set_postfix(loss=f"{last_loss:.4f}", val=f"{position.val_loss[-1]['loss']:.4f}")
                protect = best_step(position.val_loss) if training["select_checkpoint"] == "val_loss" else None
                last_saved = save_checkpoint(run.checkpoints_dir, step, trainable.models, optimizer, run.lr_scheduler,
                                             accelerator, position, run.fingerprint, training["checkpoints_total_limit"],
                                             protect)
            accelerator.wait_for_everyone()
        if (final or step % training["validation_steps"] == 0) and run.main:
            run_validation(run.components, accelerator.unwrap_model(run.denoiser.unet),
                           accelerator.unwrap_model(run.denoiser.text_encoder), run.config, step, accelerator.device,
                           writer, output_dir / "validation", accelerator.autocast)
            set_train_mode(trainable)
        accelerator.wait_for_everyone()
        clock = time.perf_counter()
    progress.close()
    if writer is not None:
        writer.close()
    return last_loss


def record_val_loss(run: Run, position: Position, step: int, writer) -> None:
    unet = run.accelerator.unwrap_model(run.denoiser.unet)
    loss = run.val_loss(unet, run.accelerator.unwrap_model(run.denoiser.text_encoder), run.denoiser.noise_scheduler,
                        run.denoiser.autocast)
    position.val_loss.append({"step": step, "loss": round(loss, 6)})
    if writer is not None:
        writer.add_scalar("val/loss", loss, step)


# ----------------------------------------------------------------------------- 6. the final LoRA


def select_final(run: Run, position: Position) -> int:
    """The step whose LoRA becomes final: the last, or (training.select_checkpoint: val_loss) the
    checkpoint with the lowest val loss, whose weights are then loaded into the model."""
    chosen = best_step(position.val_loss) if run.config["training"]["select_checkpoint"] == "val_loss" else None
    if chosen is None or chosen == run.total_steps:
        return run.total_steps
    load_lora_state(run.checkpoints_dir / f"{CHECKPOINT_PREFIX}{chosen}", run.trainable.models, run.accelerator)
    print(f"final LoRA: checkpoint {chosen} (lowest val loss {min(e['loss'] for e in position.val_loss if e['step'] > 0):.5f})",
          file=sys.stderr)
    return chosen


def peak_memory_bytes(device: torch.device) -> dict[str, int]:
    import resource

    peak = {"host_max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        peak["gpu_max_allocated"] = torch.cuda.max_memory_allocated(device)
    return peak


def write_final(run: Run, position: Position, last_loss: float, start_from: Path | None, output_dir: Path) -> dict[str, Any]:
    """Phase 6: the final LoRA (diffusers and kohya formats) and training_summary.json, atomically."""
    config, accelerator = run.config, run.accelerator
    model_cfg, training, device = config["model"], config["training"], accelerator.device
    final, partial = output_dir / "final", output_dir / "final.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    chosen = select_final(run, position)
    plot_losses(position.train_loss, position.val_loss, partial / "loss_curve.png", chosen)
    write_lora(partial, accelerator.unwrap_model(run.denoiser.unet),
               accelerator.unwrap_model(run.denoiser.text_encoder) if run.spec.train_text_encoder else None)
    summary = {
        "steps": run.total_steps,
        "epochs": round(position.micro_step / run.order.batches_per_epoch, 3),
        "final_loss": last_loss,
        "final_step": chosen,
        "select_checkpoint": training["select_checkpoint"],
        "val_loss": position.val_loss,  # [{"step", "loss"}]: step 0 is the base without LoRA
        "val_images": len(run.val_loss) if run.val_loss is not None else 0,
        "train_images": len(run.cache),
        "images_seen": position.images_seen,
        "train_seconds": round(position.train_seconds, 3),
        "images_per_second": round(position.images_seen / max(position.train_seconds, 1e-9), 3),
        "peak_memory_bytes": peak_memory_bytes(device),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "processes": accelerator.num_processes,
        "base_model": run.components.source,
        "lora_rank": model_cfg["lora_rank"],
        "lora_alpha": model_cfg["lora_alpha"],
        "mixed_precision": training["mixed_precision"],
        "latent_cache": {"mode": run.cache.mode, "bytes": run.cache.nbytes},
        "gpu_levers": run.levers,
        "deterministic": training["deterministic"],
        "seed": training["seed"],
        "resumed_from": str(start_from) if start_from else None,
        "train_data_hash": run.data_hash,
        "config_hash": result_hash(config, "train_lora"),
        "versions": library_versions(),
    }
    (partial / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    return summary


@run_stage
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    add_split_arguments(parser, ["train", "val"])
    parser.add_argument("--output-dir", type=Path, default=Path(paths.LORA), help="checkpoints/, logs/, final/")
    parser.add_argument("--tiny-dir", type=Path, default=DEFAULT_TINY_DIR, help="where model.pretrained: tiny lives")
    parser.add_argument("--resume", default="latest", help="latest (default), none, or a checkpoint-N folder")
    args = parser.parse_args(argv)
    summary = train(config_from_args(args, "train_lora"), splits_from_args(args, ["train", "val"]), args.output_dir, args.tiny_dir, args.resume)
    if summary:
        print(f"trained {summary['steps']} steps ({summary['epochs']} epochs) in {summary['train_seconds']:.0f} s, "
              f"{summary['images_per_second']:.1f} images/s, final loss {summary['final_loss']:.4f}"
              + (f", val loss {summary['val_loss'][0]['loss']:.4f} (base) -> {summary['val_loss'][-1]['loss']:.4f}"
                 if summary["val_loss"] else "") + "; "
              f"LoRA in {args.output_dir / 'final'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

