"""Side-by-side speed and memory of LoRA training and sampling, on one model, in one run.

    python -m workflow_scripts.benchmark                       # tiny model on CPU, full-size SD 1.5 on a GPU
    python -m workflow_scripts.benchmark --model sd15 --device cuda --json benchmarks/benchmark.json
    python -m workflow_scripts.benchmark --quick               # smallest settings (the test)

What it measures, all on the same model, compute dtype, resolution and LoRA config (peft, rank 4,
UNET_LORA_TARGETS, one shared AdamW from `lora_training.make_optimizer`):

1. training images/s of two loops, alternated repeat by repeat (ours, reference, ours, ...) after
   warm-up steps; the speed-up is the median of the per-repeat ratios ours / reference:
   - *ours*: the code that trains — `lora_training`'s phases as `train_lora` runs them
     (`build_trainable_model`, the fp16 memory-mapped `LatentCache` in device or host mode,
     `Prompts`, `LoraLoop.micro_step` under accelerate, `optimizer_step_done`, host sync every
     LOG_EVERY steps);
   - *reference*: the diffusers example `train_text_to_image_lora.py`: every step encodes the batch's
     pixels with the VAE (`latent_dist.sample() * scaling_factor`) and its token ids with the text
     encoder, then noise / timestep / UNet / MSE / backward / clip / AdamW, and reads the loss back
     every step (`train_loss += avg_loss.item()`). Its pixels and token ids already sit on the device
     (no data loading is timed), which favours the reference. Both loops keep each epoch's order on
     the device, as train_lora does;
   then, beside these figures, ours with each GPU lever (`hardware:` keys allow_tf32,
   cudnn_benchmark, channels_last, compile_unet) added alone (CUDA only; n/a on CPU);
2. sampling images/s (classifier-free guidance 7.5, DPM-Solver++, VAE decode included) at several
   step counts and batch sizes, with a StableDiffusionPipeline built from the same components: with
   the LoRA attached (the old way), then fused as `generate_xrays` samples (and compiled with
   `--compile-sampling` on CUDA);
3. peak memory of a training step at batch 1 with and without gradient checkpointing
   (`torch.cuda.max_memory_allocated` on a GPU; on a CPU the sampled peak of the process RSS above
   its level before the step, which is approximate and says so);
4. model FLOPs per training step (counted with `torch.utils.flop_counter.FlopCounterMode` on one
   forward + backward of each loop) and the achieved TFLOP/s against a measured matmul peak.

`--model tiny` is the offline random-weight tiny model (`base_model.build_tiny_pipeline`);
`--model sd15` builds the full-size SD 1.5 architecture with random weights from the component
configs in `shared/sd15-arch` (speed and memory do not depend on weight values). The results are
printed as markdown (stdout; progress goes to stderr) and written as JSON with `--json`; the last line
printed is `train speed-up vs reference: <x>x`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from workflow_scripts.base_model import (NIH_LABELS, PROMPT_TEMPLATE, SD15_ARCH_CANDIDATES, build_tiny_pipeline,
                                         load_components, make_scheduler)
from workflow_scripts.lora_training import (GIB, LOG_EVERY, UNET_LORA_TARGETS, LatentCache, LoraLoop, Prompts,
                                            build_trainable_model, compile_settings, encode_latent_cache, epoch_order,
                                            gpu_levers, hardware_settings, library_versions, make_optimizer, tokenize)
from workflow_scripts.bench_machine import (RssSampler, machine_info, matmul_peak_tflops,  # noqa: F401
                                            register_cpu_attention_flops, release_host_memory, synchronize)
from workflow_scripts.bench_report import GUIDANCE, REFERENCE_TFLOP_PER_IMAGE, SCHEDULER, render, speedup_line
from workflow_scripts.errors import UserError, run_stage
from workflow_scripts.tables import json_safe

SEED = 0
LEARNING_RATE = 1e-4  # the diffusers example's default; the value does not change the speed
MAX_GRAD_NORM = 1.0
NUM_PROMPTS = 8  # distinct prompts in the synthetic training set (the project has one per label set)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class BenchmarkError(UserError, RuntimeError):
    """The benchmark cannot run as asked; the message says what to change."""


# ----------------------------------------------------------------------------- settings


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m workflow_scripts.benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["auto", "tiny", "sd15"], default="auto",
                        help="tiny (default on CPU) or the full-size SD 1.5 architecture (default on a GPU)")
    parser.add_argument("--tiny-dir", type=Path, help="tiny model folder (built there if missing; default: a temp dir)")
    parser.add_argument("--sd15-arch", type=Path, help="SD 1.5 component configs (default: shared/sd15-arch)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                        help="compute dtype (auto: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--resolution", type=int, help="pixels (default: 64 tiny, 512 sd15)")
    parser.add_argument("--batch-size", type=int, help="training batch size (default: 8 on a GPU, 4 on CPU)")
    parser.add_argument("--lora-rank", type=int, default=4, help="LoRA rank (alpha = rank)")
    parser.add_argument("--steps", type=int, help="timed training steps per repeat (default 20)")
    parser.add_argument("--repeats", type=int, help="alternating repeats of each loop (default 5)")
    parser.add_argument("--warmup", type=int, help="untimed warm-up steps of each loop (default 3)")
    parser.add_argument("--gen-steps", type=int, nargs="+", default=[20, 30, 50], help="sampling steps to time")
    parser.add_argument("--gen-batch-sizes", type=int, nargs="+",
                        help="sampling batch sizes (default: 1 4 8 on a GPU, 1 4 on CPU)")
    parser.add_argument("--gen-repeats", type=int, help="timed pipeline calls per setting (default 2)")
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--tf32", action="store_true", help="lever hardware.allow_tf32 in the main figures (CUDA only)")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="lever hardware.cudnn_benchmark (CUDA only)")
    parser.add_argument("--channels-last", action="store_true", help="lever hardware.channels_last (CUDA only)")
    parser.add_argument("--compile", action="store_true", help="lever hardware.compile_unet: torch.compile the UNet (CUDA only)")
    parser.add_argument("--compile-sampling", action="store_true", help="lever hardware.compile_sampling (CUDA only)")
    parser.add_argument("--skip-levers", action="store_true", help="skip the one-lever-at-a-time training figures")
    parser.add_argument("--cache-budget-gb", type=float, default=4.0,
                        help="hardware.latent_cache_device_budget_gb (0: the host-memory path)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch during the run (default: torch's own)")
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    parser.add_argument("--quick", action="store_true", help="smallest settings (for tests)")
    args = parser.parse_args(argv)
    for name in ("batch_size", "steps", "repeats", "gen_repeats", "lora_rank", "resolution", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup is not None and args.warmup < 0:
        parser.error("--warmup must be at least 0")
    if any(v < 1 for v in args.gen_steps + (args.gen_batch_sizes or [])):
        parser.error("--gen-steps and --gen-batch-sizes must be at least 1")
    return args


@dataclass
class Settings:
    device: torch.device
    dtype: torch.dtype
    dtype_name: str
    model: str
    resolution: int
    batch_size: int
    lora_rank: int
    steps: int
    repeats: int
    warmup: int
    gen_steps: list[int]
    gen_batch_sizes: list[int]
    gen_repeats: int
    memory_steps: int
    matmul_size: int
    levers: dict[str, bool]
    cache_budget_gb: float


def resolve_settings(args: argparse.Namespace) -> Settings:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BenchmarkError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    gpu = device.type == "cuda"
    dtype_name = args.dtype if args.dtype != "auto" else ("bf16" if gpu else "fp32")
    if dtype_name == "fp16" and not gpu:
        raise BenchmarkError("--dtype fp16 needs a CUDA GPU; use fp32 or bf16 on CPU")
    if dtype_name == "bf16" and gpu and not torch.cuda.is_bf16_supported():
        raise BenchmarkError("--dtype bf16: this GPU does not support bf16; use fp16 or fp32")
    model = args.model if args.model != "auto" else ("sd15" if gpu else "tiny")
    resolution = args.resolution or (512 if model == "sd15" else 64)
    if resolution % 8:
        raise BenchmarkError(f"--resolution must be a multiple of 8, got {resolution}")
    quick = args.quick
    return Settings(
        device=device, dtype=DTYPES[dtype_name], dtype_name=dtype_name, model=model, resolution=resolution,
        batch_size=args.batch_size or (2 if quick else 8 if gpu else 4),
        lora_rank=args.lora_rank,
        steps=args.steps or (2 if quick else 20),
        repeats=args.repeats or (3 if quick else 5),
        warmup=args.warmup if args.warmup is not None else (1 if quick else 3),
        gen_steps=list(dict.fromkeys(args.gen_steps)),
        gen_batch_sizes=list(dict.fromkeys(args.gen_batch_sizes or ([1, 2] if quick else [1, 4, 8] if gpu else [1, 4]))),
        gen_repeats=args.gen_repeats or (1 if quick else 2),
        memory_steps=1 if quick else 3,
        matmul_size=(8192 if gpu else 256 if quick else 1024),
        levers=gpu_levers({"allow_tf32": args.tf32, "cudnn_benchmark": args.cudnn_benchmark, "channels_last": args.channels_last,
                           "compile_unet": args.compile, "compile_sampling": args.compile_sampling}, device, False),
        cache_budget_gb=args.cache_budget_gb,
    )


# ----------------------------------------------------------------------------- the model


@dataclass
class Model:
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any | None
    noise_scheduler: Any
    source: str


def sd15_arch_dir(path: Path | None) -> Path:
    candidates = [Path(path)] if path else list(SD15_ARCH_CANDIDATES)
    for folder in candidates:
        if (folder / "unet" / "config.json").is_file():
            return folder
    raise BenchmarkError("no SD 1.5 component configs (unet/config.json) in " + " or ".join(map(str, candidates))
                         + "; pass --sd15-arch DIR")


def build_sd15(arch: Path, device: torch.device) -> Model:
    """The full-size SD 1.5 architecture with random weights, created directly on the device."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device(device):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(arch / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(arch / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(arch / "text_encoder"))
    noise_scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(arch / "scheduler"))
    return Model(unet, vae, text_encoder, None, noise_scheduler, f"{arch} (SD 1.5 architecture, random weights)")


def load_model(args: argparse.Namespace, settings: Settings, scratch: Path) -> Model:
    if settings.model == "sd15":
        return build_sd15(sd15_arch_dir(args.sd15_arch), settings.device)
    tiny_dir = args.tiny_dir or scratch / "tiny-sd"
    if not (tiny_dir / "model_index.json").is_file():
        build_tiny_pipeline(tiny_dir, resolution=64, seed=SEED)  # any multiple of 8 px runs on it
    components = load_components("tiny", tiny_dir)
    return Model(components.unet, components.vae, components.text_encoder, components.tokenizer,
                 components.noise_scheduler, f"{components.source} (tiny random-weight SD 1.5 look-alike)")


def cast(module: torch.nn.Module, *args, **kwargs) -> torch.nn.Module:
    """`module.to(...)` without diffusers' warning that every dtype cast logs (even with nothing to keep in fp32)."""
    logger = logging.getLogger("diffusers.models.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return module.to(*args, **kwargs)
    finally:
        logger.setLevel(level)


def count_params(module: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


# ----------------------------------------------------------------------------- the two training loops


class Bench:
    """One model, one optimizer, a synthetic training set, and a step function per loop. Ours is
    `lora_training`'s code, the very phases `train_lora` runs; the reference is typed out below."""

    def __init__(self, model: Model, settings: Settings, scratch: Path):
        from accelerate import Accelerator
        from diffusers.optimization import get_scheduler

        self.s = settings
        self.device, self.dtype = settings.device, settings.dtype
        self.unet, self.vae, self.text_encoder = model.unet, model.vae, model.text_encoder
        self.noise_scheduler = model.noise_scheduler
        self.scaling = self.vae.config.scaling_factor
        device, dtype = self.device, self.dtype
        mixed = {torch.float32: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        self.accelerator = Accelerator(mixed_precision=mixed, cpu=device.type == "cpu")

        # 1. the trainable model, as train_lora builds it (levers applied later, after the FLOP count).
        training = {"seed": SEED, "gradient_checkpointing": False, "use_8bit_adam": False, "learning_rate": LEARNING_RATE,
                    "adam_weight_decay": 1e-2, "train_batch_size": settings.batch_size, "gradient_accumulation_steps": 1,
                    "max_grad_norm": MAX_GRAD_NORM, "snr_gamma": None, "noise_offset": 0.0}
        model_cfg = {"lora_rank": settings.lora_rank, "lora_alpha": settings.lora_rank, "train_text_encoder": False}
        no_levers = dict.fromkeys(("allow_tf32", "cudnn_benchmark", "channels_last", "compile_unet", "compile_sampling"), False)
        with quiet_casts():
            trained = build_trainable_model(model, model_cfg, training, {"enable_xformers": False}, no_levers, device, dtype)
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, training, device)
        lr_scheduler = get_scheduler("constant", optimizer=self.optimizer)
        unet, optimizer = self.accelerator.prepare(trained["unet"], self.optimizer)
        self.scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

        # A synthetic training set: random pixels in [-1, 1] and a few distinct prompts.
        self.pool = max(4 * settings.batch_size, 8)
        generator = torch.Generator().manual_seed(SEED)
        pixels = torch.rand(self.pool, 3, settings.resolution, settings.resolution, generator=generator) * 2 - 1
        if model.tokenizer is not None:
            prompts = [PROMPT_TEMPLATE.format(label=label) for label in NIH_LABELS[:NUM_PROMPTS]]
            prompt_ids = tokenize(model.tokenizer, prompts)
        else:  # no vocabulary for SD 1.5 here: random token ids of CLIP's length (77) time the same
            vocab = self.text_encoder.config.vocab_size
            prompt_ids = torch.randint(0, vocab, (NUM_PROMPTS, self.text_encoder.config.max_position_embeddings),
                                       generator=generator)
        index = [i % len(prompt_ids) for i in range(self.pool)]
        self.input_ids = prompt_ids.to(device)[torch.tensor(index, device=device)]  # what the reference's dataset yields

        # 2. ours: the one-time caches (fp16 memory-mapped VAE latent distributions, one embedding per prompt).
        synchronize(device)
        started = time.perf_counter()
        batches = ((chunk, [""] * len(chunk)) for chunk in pixels.split(settings.batch_size))
        folder = encode_latent_cache(self.vae, batches, self.pool, scratch / "latents", device)
        cache = LatentCache(folder, device, budget_bytes=settings.cache_budget_gb * GIB)
        prompts = Prompts.from_ids(index, prompt_ids, self.text_encoder, device, dtype, False, self.accelerator.autocast)
        synchronize(device)
        self.cache_seconds = time.perf_counter() - started
        self.cache_mode = cache.mode
        # 3./4. the step and the optimizer-step phase train_lora runs.
        self.loop = LoraLoop(self.accelerator, unet, self.text_encoder, self.noise_scheduler, {"unet": unet}, optimizer,
                             lr_scheduler, cache, prompts, self.scaling, training)
        self.loops = {settings.batch_size: self.loop}

        # The reference runs VAE and text encoder in the compute dtype every step (weight_dtype in the example).
        cast(self.vae, dtype)
        self.pixels = pixels.to(device, dtype)
        self.step_counts = {"ours": 0, "reference": 0}
        self.orders: dict[tuple[str, int], tuple[int, torch.Tensor]] = {}
        self.last_loss = float("nan")

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def apply_levers(self, levers: dict[str, bool]) -> None:
        """The training levers as train_lora applies them (`hardware:` keys); TF32 and cudnn.benchmark
        are process flags set by the caller."""
        if levers.get("channels_last"):
            cast(self.unet, memory_format=torch.channels_last)
            cast(self.vae, memory_format=torch.channels_last)
            self.pixels = self.pixels.contiguous(memory_format=torch.channels_last)
        if levers.get("compile_unet"):
            compile_settings()
            self.unet.compile()

    def ours_loop(self, batch: int) -> LoraLoop:
        if batch not in self.loops:
            self.loops[batch] = self.loop.with_batch_size(batch)
        return self.loops[batch]

    def indices(self, loop: str, batch: int) -> torch.Tensor:
        """The reference's batch as train_lora picks it: a seeded permutation per epoch, kept on the device."""
        step = self.step_counts[loop]
        epoch, slot = divmod(step, self.pool // batch)
        cached = self.orders.get((loop, batch))
        if cached is None or cached[0] != epoch:
            cached = (epoch, epoch_order(self.pool, SEED, epoch).to(self.device))
            self.orders[(loop, batch)] = cached
        return cached[1][slot * batch:(slot + 1) * batch]

    # -- ours: train_lora's phases
    def ours_step(self, batch: int) -> None:
        loop = self.ours_loop(batch)
        loop.micro_step(self.step_counts["ours"])
        loop.optimizer_step_done()
        self.step_counts["ours"] += 1
        if self.step_counts["ours"] % LOG_EVERY == 0:  # train_lora's host sync every LOG_EVERY steps
            self.last_loss = loop.mean_loss()

    # -- reference: the diffusers example's step
    def reference_loss(self, batch: int) -> torch.Tensor:
        indices = self.indices("reference", batch)
        latents = self.vae.encode(self.pixels[indices]).latent_dist.sample()
        latents = latents * self.scaling
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  device=latents.device).long()
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states = self.text_encoder(self.input_ids[indices], return_dict=False)[0]
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        with self.autocast():  # accelerate autocasts the prepared UNet's forward
            model_pred = self.unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")

    def reference_step(self, batch: int) -> None:
        loss = self.reference_loss(batch)
        self.last_loss = loss.detach().item()  # the example's `train_loss += avg_loss.item()` every step
        if self.scaler is not None:  # fp16: loss scaling, as accelerate does
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)
        self.step_counts["reference"] += 1

    def step(self, loop: str, batch: int) -> None:
        (self.ours_step if loop == "ours" else self.reference_step)(batch)

    def run(self, loop: str, batch: int, steps: int, progress: tqdm | None = None) -> float:
        """Seconds for `steps` steps of one loop, device work included."""
        self.unet.train()
        synchronize(self.device)
        started = time.perf_counter()
        for _ in range(steps):
            self.step(loop, batch)
            if progress is not None:
                progress.update(1)
        synchronize(self.device)
        return time.perf_counter() - started

    def count_flops(self, loop: str, batch: int) -> int:
        """Model FLOPs of one forward + backward of a loop's step (the optimizer step is not counted)."""
        from torch.utils.flop_counter import FlopCounterMode

        register_cpu_attention_flops()
        self.unet.train()
        with FlopCounterMode(display=False) as counter:
            loss = self.ours_loop(batch).loss(self.step_counts["ours"]) if loop == "ours" else self.reference_loss(batch)
            loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        return int(counter.get_total_flops())


@contextlib.contextmanager
def quiet_casts():
    """diffusers logs a warning on every dtype cast of a model, even with nothing to keep in fp32."""
    logger = logging.getLogger("diffusers.models.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# ----------------------------------------------------------------------------- memory


def measure_memory(bench: Bench, settings: Settings, progress: tqdm) -> dict[str, Any]:
    gpu = settings.device.type == "cuda"
    rows = []
    for loop in ("ours", "reference"):
        for checkpointing in (False, True):
            if checkpointing:
                bench.unet.enable_gradient_checkpointing()
            else:
                bench.unet.disable_gradient_checkpointing()
            bench.run(loop, 1, 1)  # untimed: a first step at this batch size (autotuning, compile, optimizer state)
            row: dict[str, Any] = {"loop": loop, "gradient_checkpointing": checkpointing, "batch_size": 1,
                                   "steps": settings.memory_steps}
            if gpu:
                gc.collect()
                torch.cuda.empty_cache()
                torch.cuda.synchronize(settings.device)
                resident = torch.cuda.memory_allocated(settings.device)
                torch.cuda.reset_peak_memory_stats(settings.device)
                bench.run(loop, 1, settings.memory_steps)
                peak = torch.cuda.max_memory_allocated(settings.device)
                row.update(gpu_peak_allocated_bytes=peak, gpu_resident_before_bytes=resident,
                           gpu_peak_above_resident_bytes=peak - resident,
                           gpu_peak_reserved_bytes=torch.cuda.max_memory_reserved(settings.device),
                           cpu_rss_peak_delta_bytes=None)
            else:
                release_host_memory()
                with RssSampler() as sampler:
                    bench.run(loop, 1, settings.memory_steps)
                delta = sampler.peak - sampler.baseline if sampler.baseline else None
                row.update(gpu_peak_allocated_bytes=None, gpu_resident_before_bytes=None,
                           gpu_peak_above_resident_bytes=None, gpu_peak_reserved_bytes=None,
                           cpu_rss_peak_delta_bytes=delta)
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


# ----------------------------------------------------------------------------- generation


TRAINING_LEVERS = ("allow_tf32", "cudnn_benchmark", "channels_last", "compile_unet")


def measure_levers(bench: Bench, settings: Settings, baseline: float) -> dict[str, Any]:
    """Ours' training images/s with each `hardware:` lever added alone to the main run's settings.
    The levers apply on CUDA only (train_lora keeps them off on CPU), so a CPU run reports none."""
    if settings.device.type != "cuda":
        return {"rows": [{"lever": lever, "applied": False, "images_per_second": None} for lever in TRAINING_LEVERS],
                "baseline_images_per_second": baseline,
                "note": "n/a on CPU: the hardware levers apply on CUDA only and train_lora keeps them off on CPU"}
    rows, batch = [], settings.batch_size
    for lever in TRAINING_LEVERS:
        if settings.levers[lever]:
            rows.append({"lever": lever, "applied": True, "images_per_second": baseline, "note": "on in the main run"})
            continue
        levers = {**settings.levers, lever: True}
        with hardware_settings(levers, False):
            bench.apply_levers({lever: True})
            synchronize(settings.device)
            started = time.perf_counter()
            bench.run("ours", batch, max(settings.warmup, 1))  # warm-up (autotuning, compilation)
            warmup_seconds = time.perf_counter() - started
            seconds = bench.run("ours", batch, settings.steps)
            if lever == "channels_last":
                cast(bench.unet, memory_format=torch.contiguous_format)
                cast(bench.vae, memory_format=torch.contiguous_format)
        rows.append({"lever": lever, "applied": True, "images_per_second": batch * settings.steps / seconds,
                     "speedup_vs_main": batch * settings.steps / seconds / baseline, "warmup_seconds": warmup_seconds})
    return {"rows": rows, "baseline_images_per_second": baseline,
            "note": "each lever added alone to the main run's settings; compile_unet measured last and left applied"}


def measure_generation(model: Model, bench: Bench, settings: Settings, progress: tqdm) -> list[dict[str, Any]]:
    """Sampling with the LoRA attached (as before), then fused as generate_xrays samples (and, where
    hardware.compile_sampling applies, compiled)."""
    from diffusers import StableDiffusionPipeline

    unet = bench.accelerator.unwrap_model(bench.unet)
    with quiet_casts():
        cast(unet, settings.dtype)  # the LoRA too: the pipeline samples in the compute dtype
    unet.eval()
    pipe = StableDiffusionPipeline(vae=bench.vae, text_encoder=bench.text_encoder, tokenizer=model.tokenizer,
                                   unet=unet, scheduler=make_scheduler(SCHEDULER, model.noise_scheduler.config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    prompt = PROMPT_TEMPLATE.format(label=NIH_LABELS[0])
    variants = ["lora attached", "lora fused"] + (["lora fused, compiled"] if settings.levers["compile_sampling"] else [])
    rows = []
    for variant in variants:
        if variant == "lora fused":
            pipe.fuse_lora()
            pipe.unload_lora_weights()  # generate_xrays: fused weights, no adapter layers
        elif variant.endswith("compiled"):
            compile_settings()
            pipe.unet.compile()
        for batch in settings.gen_batch_sizes:
            rows += time_sampling(pipe, bench, model, settings, batch, variant, prompt, progress)
    return rows


def time_sampling(pipe, bench: Bench, model: Model, settings: Settings, batch: int, variant: str, prompt: str,
                  progress: tqdm) -> list[dict[str, Any]]:
    device = settings.device
    if model.tokenizer is not None:
        inputs: dict[str, Any] = {"prompt": [prompt] * batch, "negative_prompt": [""] * batch}
    else:  # no tokenizer for SD 1.5 here: embeddings of random token ids (a text encoder pass is ~0.1% of the work)
        with torch.inference_mode():
            embeds = bench.text_encoder(bench.input_ids[:1])[0]
        inputs = {"prompt_embeds": embeds.expand(batch, -1, -1).clone(),
                  "negative_prompt_embeds": torch.zeros_like(embeds).expand(batch, -1, -1).clone()}

    def call(steps: int) -> None:
        generators = [torch.Generator(device=device).manual_seed(SEED + i) for i in range(batch)]
        with torch.inference_mode():
            pipe(**inputs, num_inference_steps=steps, guidance_scale=GUIDANCE, height=settings.resolution,
                 width=settings.resolution, generator=generators, output_type="np")

    call(2)  # warm-up at this batch size (allocator, autotuning, compile)
    rows = []
    for steps in settings.gen_steps:
        times = []
        for _ in range(settings.gen_repeats):
            synchronize(device)
            started = time.perf_counter()
            call(steps)
            synchronize(device)
            times.append(time.perf_counter() - started)
            progress.update(1)
        seconds = statistics.median(times)
        rows.append({"variant": variant, "steps": steps, "batch_size": batch, "images_per_second": batch / seconds,
                     "seconds_per_batch": seconds, "per_repeat_seconds": times, "guidance": GUIDANCE,
                     "scheduler": SCHEDULER, "vae_decode": True, "dtype": str(settings.dtype).removeprefix("torch."),
                     "prompt_input": "prompt text" if model.tokenizer is not None else "prompt_embeds"})
    return rows


# ----------------------------------------------------------------------------- the run


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    settings = resolve_settings(args)
    device = settings.device
    scratch = Path(tempfile.mkdtemp(prefix="benchmark-"))
    try:
        model = load_model(args, settings, scratch)
        with hardware_settings(settings.levers, False):
            return _benchmark(args, settings, model, device, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _benchmark(args: argparse.Namespace, settings: Settings, model: Model, device: torch.device, scratch: Path) -> dict[str, Any]:
    bench = Bench(model, settings, scratch)
    batch = settings.batch_size
    result: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "versions": library_versions(),
        "model": settings.model,
        "model_source": model.source,
        "parameters": {"unet": count_params(bench.unet), "vae": count_params(bench.vae),
                       "text_encoder": count_params(bench.text_encoder),
                       "lora_trainable": count_params(bench.unet, trainable=True)},
        "dtype": settings.dtype_name,
        "autocast": settings.dtype != torch.float32,
        "resolution": settings.resolution,
        "batch_size": batch,
        "lora": {"rank": settings.lora_rank, "alpha": settings.lora_rank, "targets": UNET_LORA_TARGETS},
        "levers": settings.levers,
        "latent_cache_mode": bench.cache_mode,
    }

    # FLOPs of one step of each loop, counted eagerly before any lever changes the model.
    flops = {loop: bench.count_flops(loop, batch) for loop in ("ours", "reference")}
    bench.apply_levers(settings.levers)

    # 1. training: warm-up, then alternating repeats.
    total = 2 * settings.warmup + 2 * settings.steps * settings.repeats
    times: dict[str, list[float]] = {"ours": [], "reference": []}
    with tqdm(total=total, desc="training (ours vs reference)", unit="step", file=sys.stderr, dynamic_ncols=True) as progress:
        for loop in ("ours", "reference"):
            if settings.warmup:
                bench.run(loop, batch, settings.warmup, progress)
        for _ in range(settings.repeats):
            for loop in ("ours", "reference"):
                times[loop].append(bench.run(loop, batch, settings.steps, progress))
    images = batch * settings.steps
    ips = {loop: [images / seconds for seconds in times[loop]] for loop in times}
    ratios = [o / r for o, r in zip(ips["ours"], ips["reference"])]
    training: dict[str, Any] = {"steps_per_repeat": settings.steps, "repeats": settings.repeats,
                                "warmup_steps": settings.warmup, "one_time_cache_seconds": bench.cache_seconds,
                                "cached_images": bench.pool, "last_loss": bench.last_loss}
    for loop in ("ours", "reference"):
        per_step = [seconds / settings.steps for seconds in times[loop]]
        achieved = [flops[loop] / s / 1e12 for s in per_step]
        training[loop] = {"images_per_second": statistics.median(ips[loop]), "per_repeat_images_per_second": ips[loop],
                          "seconds_per_step": statistics.median(per_step), "flops_per_step": flops[loop],
                          "tflop_per_image": flops[loop] / batch / 1e12,
                          "achieved_tflops": statistics.median(achieved)}
    training["per_repeat_ratios"] = ratios
    training["speedup"] = statistics.median(ratios)
    result["training"] = training

    # 4. compute: the matmul peak on this device, in the compute dtype.
    peak = matmul_peak_tflops(device, settings.dtype, settings.matmul_size)
    for loop in ("ours", "reference"):
        training[loop]["fraction_of_matmul_peak"] = training[loop]["achieved_tflops"] / peak["tflops"]
    result["compute"] = {"matmul_peak": peak,
                         "flop_counter": "torch.utils.flop_counter.FlopCounterMode, one forward + backward per loop "
                                         "(optimizer step not counted)",
                         "references_md_tflop_per_image_sd15_512": REFERENCE_TFLOP_PER_IMAGE}

    # 3. memory at batch 1, with and without gradient checkpointing.
    if not args.skip_memory:
        with tqdm(total=4, desc="memory (batch 1)", unit="setting", file=sys.stderr, dynamic_ncols=True) as progress:
            result["memory"] = measure_memory(bench, settings, progress)

    # The GPU levers one at a time beside the figures above (after memory: compile stays applied).
    if not args.skip_levers:
        result["lever_sweep"] = measure_levers(bench, settings, training["ours"]["images_per_second"])

    # 2. generation (last: it casts the LoRA weights to the compute dtype, then fuses them).
    if not args.skip_generation:
        total = len(settings.gen_batch_sizes) * len(settings.gen_steps) * settings.gen_repeats * (3 if settings.levers["compile_sampling"] else 2)
        with tqdm(total=total, desc="generation", unit="call", file=sys.stderr, dynamic_ncols=True) as progress:
            result["generation"] = measure_generation(model, bench, settings, progress)
    return result


@run_stage
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = benchmark(args)
    finally:
        torch.set_num_threads(threads)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        partial = args.json.with_name(args.json.name + ".partial")
        partial.write_text(json.dumps(json_safe(result), indent=2, allow_nan=False) + "\n")
        os.replace(partial, args.json)
    print(render(result))
    print(speedup_line(result))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
