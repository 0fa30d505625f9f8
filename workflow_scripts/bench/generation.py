"""The benchmark's sampling figures: images/s of a StableDiffusionPipeline built from the trained
components, with the LoRA attached, fused (as `generate_xrays` samples) and, where
hardware.compile_sampling applies, fused and compiled. Used by `workflow_scripts.bench`."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from tqdm import tqdm

from workflow_scripts.models.base_model import make_scheduler
from workflow_scripts.models.tiny_model import NIH_LABELS, PROMPT_TEMPLATE
from workflow_scripts.bench.machine import synchronize
from workflow_scripts.bench.report import GUIDANCE, SCHEDULER
from workflow_scripts.bench.training import SEED, Bench, uncompile
from workflow_scripts.common.hardware import compile_settings
from workflow_scripts.lora.lora_model import cast


def measure_generation(bench: Bench, settings, progress: tqdm) -> list[dict[str, Any]]:
    """Sampling with the LoRA attached (as before), then fused as generate_xrays samples (and, where
    hardware.compile_sampling applies, compiled). The first two are eager even when the training
    figures compiled the UNet."""
    from diffusers import StableDiffusionPipeline

    model = bench.model
    unet = bench.accelerator.unwrap_model(bench.unet)
    uncompile(unet)
    cast(unet, settings.dtype)  # the LoRA too: the pipeline samples in the compute dtype
    unet.eval()
    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
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
            rows += time_sampling(pipe, bench, settings, batch, variant, prompt, progress)
    return rows


def time_sampling(pipe, bench: Bench, settings, batch: int, variant: str, prompt: str,
                  progress: tqdm) -> list[dict[str, Any]]:
    device, tokenizer = settings.device, bench.model.tokenizer
    if tokenizer is not None:
        inputs: dict[str, Any] = {"prompt": [prompt] * batch, "negative_prompt": [""] * batch}
    else:  # no tokenizer for SD 1.5 here: embeddings of random token ids (a text encoder pass is ~0.1% of the work)
        with torch.inference_mode():
            embeds = bench.model.text_encoder(bench.input_ids[:1])[0]
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
                     "prompt_input": "prompt text" if tokenizer is not None else "prompt_embeds"})
    return rows
