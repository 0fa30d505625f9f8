"""The benchmark's two training loops on one model, and the figures measured on them (memory, levers).

*Ours* is `train_lora`'s own step as its `train_steps` runs it (`BatchOrder`,
`micro_batch_loss`, `optimize` under `accelerator.accumulate`, a host sync every LOG_EVERY steps);
the *reference* is the diffusers example's step, typed out in `reference_loss` / `reference_step`.
Used by `workflow_scripts.bench`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from workflow_scripts.models.tiny_model import NIH_LABELS, PROMPT_TEMPLATE
from workflow_scripts.bench.machine import RssSampler, register_cpu_attention_flops, release_host_memory, synchronize
from workflow_scripts.common.hardware import DTYPE_NAMES, compile_settings, gpu_levers, hardware_settings
from workflow_scripts.lora.latent_cache import GIB, LatentCache, encode_latent_cache, latent_shape
from workflow_scripts.lora.lora_model import (Denoiser, LoraSpec, Prompts, Trainable, build_trainable_model, cast,
                                              make_optimizer, tokenize)
from workflow_scripts.lora.train_lora import LOG_EVERY, BatchOrder, micro_batch_loss, optimize

SEED = 0
NUM_PROMPTS = 8  # distinct prompts in the synthetic training set (the project has one per label set)
TRAINING_LEVERS = ("allow_tf32", "cudnn_benchmark", "channels_last", "compile_unet")


@dataclass
class Bench:
    """One model, one optimizer, a synthetic training set (random pixels, a few prompts) with its
    one-time caches, and where each loop stands."""

    device: torch.device
    dtype: torch.dtype
    accelerator: Any
    model: Any  # the benchmark's Model: unet, vae, text_encoder, tokenizer, noise_scheduler
    spec: LoraSpec
    trainable: Trainable
    optimizer: Any  # accelerate's wrapper (ours) ...
    reference_optimizer: Any  # ... and the same AdamW bare (the reference steps it itself)
    lr_scheduler: Any
    denoiser: Denoiser
    cache: LatentCache
    prompts: Prompts
    pixels: torch.Tensor  # what the reference's dataset yields: pixels and token ids, already on the device
    input_ids: torch.Tensor
    cache_seconds: float
    scaler: Any = None
    step_counts: dict[str, int] = dataclasses.field(default_factory=lambda: {"ours": 0, "reference": 0})
    orders: dict[tuple[str, int], BatchOrder] = dataclasses.field(default_factory=dict)
    loss_sum: torch.Tensor | None = None
    last_loss: float = float("nan")

    @property
    def unet(self):
        return self.trainable.models["unet"]

    @property
    def pool(self) -> int:
        return len(self.cache)


def build_bench(model, device: torch.device, dtype: torch.dtype, batch_size: int, lora_rank: int, resolution: int,
                cache_budget_gb: float, scratch: Path) -> Bench:
    """The trainable model as train_lora builds it (levers applied later, after the FLOP count), the
    synthetic training set, and ours' one-time caches (timed)."""
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    accelerator = Accelerator(mixed_precision="no" if dtype == torch.float32 else DTYPE_NAMES[dtype], cpu=device.type == "cpu")
    spec = LoraSpec(rank=lora_rank, alpha=lora_rank, seed=SEED, batch_size=batch_size)
    trainable = build_trainable_model(model, spec, gpu_levers(dict.fromkeys(TRAINING_LEVERS + ("compile_sampling",), False),
                                                              device, False), device, dtype)
    reference_optimizer = make_optimizer(trainable.params, spec, device)
    lr_scheduler = get_scheduler("constant", optimizer=reference_optimizer)
    unet, optimizer = accelerator.prepare(trainable.models["unet"], reference_optimizer)
    trainable = Trainable({"unet": unet}, trainable.params)

    pool = max(4 * batch_size, 8)
    generator = torch.Generator().manual_seed(SEED)
    pixels = torch.rand(pool, 3, resolution, resolution, generator=generator) * 2 - 1
    if model.tokenizer is not None:
        prompt_ids = tokenize(model.tokenizer, [PROMPT_TEMPLATE.format(label=label) for label in NIH_LABELS[:NUM_PROMPTS]])
    else:  # no vocabulary for SD 1.5 here: random token ids of CLIP's length (77) time the same
        config = model.text_encoder.config
        prompt_ids = torch.randint(0, config.vocab_size, (NUM_PROMPTS, config.max_position_embeddings), generator=generator)
    index = [i % len(prompt_ids) for i in range(pool)]

    synchronize(device)
    started = time.perf_counter()
    folder = encode_latent_cache(model.vae, lambda rows: ((chunk, [""] * len(chunk)) for chunk in pixels[rows.start:rows.stop]
                                                          .split(batch_size)),
                                 pool, batch_size, scratch / "latents", latent_shape(model.vae, resolution), device)
    cache = LatentCache(folder, device, budget_bytes=cache_budget_gb * GIB)
    prompts = Prompts.from_ids(index, prompt_ids, model.text_encoder, device, dtype, False, accelerator.autocast)
    synchronize(device)
    cache_seconds = time.perf_counter() - started

    cast(model.vae, dtype)  # the reference runs VAE and text encoder in the compute dtype every step
    denoiser = Denoiser(unet, model.text_encoder, model.noise_scheduler, model.vae.config.scaling_factor,
                        accelerator.autocast)
    return Bench(device, dtype, accelerator, model, spec, trainable, optimizer, reference_optimizer, lr_scheduler, denoiser, cache, prompts,
                 pixels.to(device, dtype), prompt_ids.to(device)[torch.tensor(index, device=device)], cache_seconds,
                 scaler=torch.amp.GradScaler(device.type) if dtype == torch.float16 else None,
                 loss_sum=torch.zeros((), device=device))


def order(bench: Bench, loop: str, batch: int) -> BatchOrder:
    """Each loop's images as train_lora picks them: a seeded permutation per epoch, kept on the device."""
    key = (loop, batch)
    if key not in bench.orders:
        bench.orders[key] = BatchOrder(bench.pool, SEED, batch, bench.device)
    return bench.orders[key]


def ours_loss(bench: Bench, batch: int) -> torch.Tensor:
    step = bench.step_counts["ours"]
    return micro_batch_loss(bench.denoiser, bench.spec, bench.cache, bench.prompts, order(bench, "ours", batch)(step), step)


def ours_step(bench: Bench, batch: int) -> None:
    """train_lora's micro-step (no accumulation), LR schedule, and host sync every LOG_EVERY steps."""
    with bench.accelerator.accumulate(bench.unet):
        loss = ours_loss(bench, batch)
        optimize(bench.accelerator, bench.trainable.params, bench.optimizer, loss, bench.spec.max_grad_norm)
    bench.loss_sum += loss.detach()
    bench.lr_scheduler.step()
    bench.step_counts["ours"] += 1
    if bench.step_counts["ours"] % LOG_EVERY == 0:
        bench.last_loss = (bench.loss_sum / LOG_EVERY).item()
        bench.loss_sum = torch.zeros_like(bench.loss_sum)


def autocast(bench: Bench):
    if bench.dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(bench.device.type, dtype=bench.dtype)


def reference_loss(bench: Bench, batch: int) -> torch.Tensor:
    """The diffusers example's loss: VAE encode and text encoder every step, then noise / UNet / MSE."""
    indices, _ = order(bench, "reference", batch)(bench.step_counts["reference"])
    model, scheduler = bench.model, bench.model.noise_scheduler
    latents = model.vae.encode(bench.pixels[indices]).latent_dist.sample()
    latents = latents * model.vae.config.scaling_factor
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device).long()
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    encoder_hidden_states = model.text_encoder(bench.input_ids[indices], return_dict=False)[0]
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    with autocast(bench):  # accelerate autocasts the prepared UNet's forward
        model_pred = bench.unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
    return F.mse_loss(model_pred.float(), target.float(), reduction="mean")


def reference_step(bench: Bench, batch: int) -> None:
    loss = reference_loss(bench, batch)
    bench.last_loss = loss.detach().item()  # the example's `train_loss += avg_loss.item()` every step
    params, max_norm = bench.trainable.params, bench.spec.max_grad_norm
    if bench.scaler is not None:  # fp16: loss scaling, as accelerate does
        bench.scaler.scale(loss).backward()
        bench.scaler.unscale_(bench.reference_optimizer)
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        bench.scaler.step(bench.reference_optimizer)
        bench.scaler.update()
    else:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        bench.reference_optimizer.step()
    bench.reference_optimizer.zero_grad(set_to_none=False)
    bench.step_counts["reference"] += 1


def run(bench: Bench, loop: str, batch: int, steps: int, progress: tqdm | None = None) -> float:
    """Seconds for `steps` steps of one loop, device work included."""
    step = ours_step if loop == "ours" else reference_step
    bench.unet.train()
    synchronize(bench.device)
    started = time.perf_counter()
    for _ in range(steps):
        step(bench, batch)
        if progress is not None:
            progress.update(1)
    synchronize(bench.device)
    return time.perf_counter() - started


def count_flops(bench: Bench, loop: str, batch: int) -> int:
    """Model FLOPs of one forward + backward of a loop's step (the optimizer step is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    register_cpu_attention_flops()
    bench.unet.train()
    with FlopCounterMode(display=False) as counter:
        loss = ours_loss(bench, batch) if loop == "ours" else reference_loss(bench, batch)
        loss.backward()
    bench.optimizer.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def apply_levers(bench: Bench, levers: dict[str, bool]) -> None:
    """The training levers as train_lora applies them (`hardware:` keys); TF32 and cudnn.benchmark
    are process flags set by the caller."""
    if levers.get("channels_last"):
        cast(bench.unet, memory_format=torch.channels_last)
        cast(bench.model.vae, memory_format=torch.channels_last)
        bench.pixels = bench.pixels.contiguous(memory_format=torch.channels_last)
    if levers.get("compile_unet"):
        compile_settings()
        bench.unet.compile()


def uncompile(module: torch.nn.Module) -> None:
    """Undo `module.compile()` (which only sets the compiled call): eager again."""
    module._compiled_call_impl = None


# ----------------------------------------------------------------------------- memory and levers


def measure_memory(bench: Bench, memory_steps: int, progress: tqdm) -> dict[str, Any]:
    gpu, device = bench.device.type == "cuda", bench.device
    rows = []
    for loop in ("ours", "reference"):
        for checkpointing in (False, True):
            if checkpointing:
                bench.unet.enable_gradient_checkpointing()
            else:
                bench.unet.disable_gradient_checkpointing()
            run(bench, loop, 1, 1)  # untimed: a first step at this batch size (autotuning, compile, optimizer state)
            row: dict[str, Any] = {"loop": loop, "gradient_checkpointing": checkpointing, "batch_size": 1, "steps": memory_steps}
            if gpu:
                gc.collect()
                torch.cuda.empty_cache()
                torch.cuda.synchronize(device)
                resident = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                run(bench, loop, 1, memory_steps)
                peak = torch.cuda.max_memory_allocated(device)
                row.update(gpu_peak_allocated_bytes=peak, gpu_resident_before_bytes=resident,
                           gpu_peak_above_resident_bytes=peak - resident,
                           gpu_peak_reserved_bytes=torch.cuda.max_memory_reserved(device), cpu_rss_peak_delta_bytes=None)
            else:
                release_host_memory()
                with RssSampler() as sampler:
                    run(bench, loop, 1, memory_steps)
                delta = sampler.peak - sampler.baseline if sampler.baseline else None
                row.update(gpu_peak_allocated_bytes=None, gpu_resident_before_bytes=None, gpu_peak_above_resident_bytes=None,
                           gpu_peak_reserved_bytes=None, cpu_rss_peak_delta_bytes=delta)
            progress.update(1)
            rows.append(row)
    bench.unet.disable_gradient_checkpointing()
    if gpu:
        note = ("torch.cuda.max_memory_allocated over the measured steps (model weights, resident before the step, "
                "included; 'above resident' is the step's own activations, gradients and optimizer work)")
    else:
        note = ("n/a on CPU: no GPU numbers. The CPU figure is the process RSS peak above its level just before the "
                "steps, sampled every 2 ms after malloc_trim; approximate (short spikes can be missed, memory the "
                "allocator kept from earlier steps can be reused), not a device-memory measurement")
    return {"rows": rows, "note": note}


def measure_levers(bench: Bench, main_levers: dict[str, bool], batch: int, warmup: int, steps: int,
                   baseline: float) -> dict[str, Any]:
    """Ours' training images/s with each `hardware:` lever added alone to the main run's settings,
    each undone after its figure. The levers apply on CUDA only (train_lora keeps them off on CPU),
    so a CPU run reports none."""
    if bench.device.type != "cuda":
        return {"rows": [{"lever": lever, "applied": False, "images_per_second": None} for lever in TRAINING_LEVERS],
                "baseline_images_per_second": baseline,
                "note": "n/a on CPU: the hardware levers apply on CUDA only and train_lora keeps them off on CPU"}
    rows = []
    for lever in TRAINING_LEVERS:
        if main_levers[lever]:
            rows.append({"lever": lever, "applied": True, "images_per_second": baseline, "note": "on in the main run"})
            continue
        with hardware_settings({**main_levers, lever: True}, False):
            apply_levers(bench, {lever: True})
            synchronize(bench.device)
            started = time.perf_counter()
            run(bench, "ours", batch, max(warmup, 1))  # warm-up (autotuning, compilation)
            warmup_seconds = time.perf_counter() - started
            seconds = run(bench, "ours", batch, steps)
            if lever == "channels_last":
                cast(bench.unet, memory_format=torch.contiguous_format)
                cast(bench.model.vae, memory_format=torch.contiguous_format)
                bench.pixels = bench.pixels.contiguous()
            if lever == "compile_unet":
                uncompile(bench.unet)
        rows.append({"lever": lever, "applied": True, "images_per_second": batch * steps / seconds,
                     "speedup_vs_main": batch * steps / seconds / baseline, "warmup_seconds": warmup_seconds})
    return {"rows": rows, "baseline_images_per_second": baseline,
            "note": "each lever added alone to the main run's settings, and undone after its figure"}
