"""Side-by-side speed and memory of LoRA training and sampling, on one model, in one run.

    python -m workflow_scripts.bench                           # tiny model on CPU, full-size SD 1.5 on a GPU
    python -m workflow_scripts.bench --model sd15 --device cuda --json benchmarks/benchmark.json
    python -m workflow_scripts.bench --quick                   # smallest settings (the test)
    python -m workflow_scripts.bench --demo-breakdown          # a finished run: seconds per rule (workflow_scripts.bench.breakdown)

What it measures, all on the same model, compute dtype, resolution and LoRA config (peft, rank 4,
UNET_LORA_TARGETS, one shared AdamW from `lora_model.make_optimizer`):

1. training images/s of two loops, alternated repeat by repeat (ours, reference, ours, ...) after
   warm-up steps; the speed-up is the median of the per-repeat ratios ours / reference:
   - *ours*: the code that trains — `train_lora`'s step as its `train_steps` runs it
     (`build_trainable_model`, the fp16 memory-mapped `LatentCache` in device or host mode,
     `Prompts`, `BatchOrder`, `micro_batch_loss` and `optimize` under accelerate, the LR schedule,
     host sync every LOG_EVERY steps; `bench.training`);
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
   the LoRA attached (the old way), then fused as `generate_xrays` samples, both eager, (and
   compiled with `--compile-sampling` on CUDA; `bench.generation`);
3. peak memory of a training step at batch 1 with and without gradient checkpointing
   (`torch.cuda.max_memory_allocated` on a GPU; on a CPU the sampled peak of the process RSS above
   its level before the step, which is approximate and says so);
4. model FLOPs per training step (counted with `torch.utils.flop_counter.FlopCounterMode` on one
   forward + backward of each loop) and the achieved TFLOP/s against a measured matmul peak.

`--model tiny` is the offline random-weight tiny model (`tiny_model.build_tiny_pipeline`);
`--model sd15` builds the full-size SD 1.5 architecture with random weights from the component
configs in `shared/sd15-arch` (speed and memory do not depend on weight values). The results are
printed as markdown (stdout; progress goes to stderr) and written as JSON with `--json`; the last line
printed is `train speed-up vs reference: <x>x`.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from workflow_scripts.models.base_model import SD15_ARCH_CANDIDATES, load_components
from workflow_scripts.bench.generation import measure_generation
from workflow_scripts.bench.machine import (machine_info, matmul_peak_tflops, register_cpu_attention_flops,  # noqa: F401
                                            report, torch_threads)
from workflow_scripts.bench.report import REFERENCE_TFLOP_PER_IMAGE, render, speedup_line
from workflow_scripts.bench.training import (SEED, apply_levers, build_bench, count_flops, measure_levers, measure_memory,
                                             run)
from workflow_scripts.common.hardware import DTYPES, gpu_levers, hardware_settings
from workflow_scripts.lora.lora_model import UNET_LORA_TARGETS, library_versions
from workflow_scripts.common.errors import UserError, run_stage
from workflow_scripts.models.tiny_model import build_tiny_pipeline


class BenchmarkError(UserError, RuntimeError):
    """The benchmark cannot run as asked; the message says what to change."""


# ----------------------------------------------------------------------------- settings


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m workflow_scripts.bench", description=__doc__,
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
    parser.add_argument("--stage", choices=["lora", "classifier"], default="lora",
                        help="lora (this page) or classifier: the decode-once data path (workflow_scripts.bench.classifier)")
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


def count_params(module: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


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
    bench = build_bench(model, settings.device, settings.dtype, settings.batch_size, settings.lora_rank,
                        settings.resolution, settings.cache_budget_gb, scratch)
    batch = settings.batch_size
    result: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "versions": library_versions(),
        "model": settings.model,
        "model_source": model.source,
        "parameters": {"unet": count_params(bench.unet), "vae": count_params(model.vae),
                       "text_encoder": count_params(model.text_encoder),
                       "lora_trainable": count_params(bench.unet, trainable=True)},
        "dtype": settings.dtype_name,
        "autocast": settings.dtype != torch.float32,
        "resolution": settings.resolution,
        "batch_size": batch,
        "lora": {"rank": settings.lora_rank, "alpha": settings.lora_rank, "targets": UNET_LORA_TARGETS},
        "levers": settings.levers,
        "latent_cache_mode": bench.cache.mode,
    }

    # FLOPs of one step of each loop, counted eagerly before any lever changes the model.
    flops = {loop: count_flops(bench, loop, batch) for loop in ("ours", "reference")}
    apply_levers(bench, settings.levers)

    # 1. training: warm-up, then alternating repeats.
    total = 2 * settings.warmup + 2 * settings.steps * settings.repeats
    times: dict[str, list[float]] = {"ours": [], "reference": []}
    with tqdm(total=total, desc="training (ours vs reference)", unit="step", file=sys.stderr, dynamic_ncols=True) as progress:
        for loop in ("ours", "reference"):
            if settings.warmup:
                run(bench, loop, batch, settings.warmup, progress)
        for _ in range(settings.repeats):
            for loop in ("ours", "reference"):
                times[loop].append(run(bench, loop, batch, settings.steps, progress))
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
            result["memory"] = measure_memory(bench, settings.memory_steps, progress)

    # The GPU levers one at a time beside the figures above, each undone after its figure.
    if not args.skip_levers:
        result["lever_sweep"] = measure_levers(bench, settings.levers, batch, settings.warmup, settings.steps,
                                               training["ours"]["images_per_second"])

    # 2. generation (last: it casts the LoRA weights to the compute dtype, then fuses them).
    if not args.skip_generation:
        total = len(settings.gen_batch_sizes) * len(settings.gen_steps) * settings.gen_repeats * (3 if settings.levers["compile_sampling"] else 2)
        with tqdm(total=total, desc="generation", unit="call", file=sys.stderr, dynamic_ncols=True) as progress:
            result["generation"] = measure_generation(bench, settings, progress)
    return result


@run_stage
def main(argv: list[str] | None = None) -> int:
    stage = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    stage.add_argument("--stage", choices=["lora", "classifier"], default="lora")
    stage.add_argument("--demo-breakdown", action="store_true")
    chosen, argv = stage.parse_known_args(argv)
    if chosen.demo_breakdown:  # a finished run's seconds per rule (workflow_scripts.bench.breakdown, which starts faster)
        from workflow_scripts.bench import breakdown

        parser = argparse.ArgumentParser(description=breakdown.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        breakdown.add_arguments(parser)
        return breakdown.run(parser.parse_args(argv))
    if chosen.stage == "classifier":  # its own options: --stage classifier --help
        from workflow_scripts.bench import classifier

        return classifier.main(argv)
    args = parse_args(argv)
    with torch_threads(args.threads):
        result = benchmark(args)
    return report(result, args.json, render(result), speedup_line(result))


if __name__ == "__main__":
    sys.exit(main())
