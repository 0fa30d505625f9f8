"""The LoRA training pieces, shared by `train_lora` (whose `train_steps` is the loop) and `benchmark`.

1. `LoraSpec.from_config` / `build_trainable_model`: frozen base in the compute dtype, LoRA (peft)
   weights in fp32, and the trainable parameters, listed once (`Trainable`);
2. `encode_latent_cache` / `LatentCache` (latent_cache.py, re-exported here): every training image's
   VAE latent distribution, once, in an fp16 memory-mapped file;
3. `BatchOrder`, `micro_batch_loss`, `optimize`: which images a micro-step takes, its loss (latents
   sampled from the cache, noise in fp32), and backward / clip / optimizer step;
4. `write_lora`: the final files (diffusers format, plus a kohya-format copy for WebUI / ComfyUI).
`gpu_levers` / `hardware_settings` turn the `hardware:` keys into torch settings; `library_versions`
records the libraries a run used.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from workflow_scripts.errors import TrainingError
from workflow_scripts.hardware import apply_cuda_levers
from workflow_scripts.latent_cache import LatentCache, encode_latent_cache, latent_shape, shard  # noqa: F401 (re-exported)

UNET_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
LOG_EVERY = 10  # optimizer steps between host syncs
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name; `load_lora_weights(dir)` finds it
KOHYA_FILE = "lora_kohya.safetensors"  # AUTOMATIC1111 / ComfyUI / kohya naming (lora_unet_..., lora_te_...)
GIB = 2**30
# `training.mixed_precision` (and the benchmark's --dtype) -> the compute dtype of the frozen weights.
COMPUTE_DTYPES = {"no": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MIXED_PRECISION = {torch.float32: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}

# Keys of `training:` that only extend or observe a run: a checkpoint made under other values of these
# may be resumed (config.result_config(config, "train_lora", ignore=...) leaves them out of its fingerprint).
RESUMABLE_TRAINING_KEYS = tuple(f"training.{key}" for key in (
    "num_train_epochs", "max_train_steps", "save_steps", "checkpoints_total_limit", "validation_steps",
    "num_validation_images", "validation_inference_steps", "validation_prompts", "deterministic", "val_loss_images",
    "select_checkpoint"))


# ----------------------------------------------------------------------------- hardware


def gpu_levers(hardware: dict[str, Any], device: torch.device, deterministic: bool) -> dict[str, bool]:
    """The GPU levers that apply: as configured on CUDA, all off on CPU (where they gain nothing or
    only add compile time). Deterministic training turns cudnn.benchmark off (it picks kernels by timing)."""
    cuda = device.type == "cuda"
    return {
        "allow_tf32": cuda and hardware["allow_tf32"],
        "cudnn_benchmark": cuda and hardware["cudnn_benchmark"] and not deterministic,
        "channels_last": cuda and hardware["channels_last"],
        "compile_unet": cuda and hardware["compile_unet"],
        "compile_sampling": cuda and hardware["compile_sampling"],
    }


def hardware_settings(levers: dict[str, bool], deterministic: bool) -> contextlib.AbstractContextManager[None]:
    """Process-wide torch flags for the block (TF32, cudnn.benchmark, deterministic kernels), restored after."""
    return apply_cuda_levers(levers["allow_tf32"], levers["cudnn_benchmark"], deterministic)


def compile_settings() -> None:
    """Several graphs are met (training batch, validation / sampling batches): raise dynamo's
    recompile limit so it does not fall back to eager."""
    import torch._dynamo as dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, max(getattr(dynamo.config, name), 64))


def library_versions() -> dict[str, str]:
    import accelerate
    import diffusers
    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__, "transformers": transformers.__version__}


# ----------------------------------------------------------------------------- 1. the trainable model


@dataclass(frozen=True)
class LoraSpec:
    """What the pieces below read of `model:`, `training:` and `hardware:`: the LoRA, its optimizer
    and one micro-step. The benchmark builds one directly; `train_lora` takes it from the config."""

    rank: int
    alpha: float
    seed: int
    batch_size: int
    train_text_encoder: bool = False
    accumulation: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 1e-2
    use_8bit_adam: bool = False
    max_grad_norm: float = 1.0
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    gradient_checkpointing: bool = False
    enable_xformers: bool = False

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LoraSpec:
        model, training = config["model"], config["training"]
        return cls(rank=model["lora_rank"], alpha=model["lora_alpha"], seed=training["seed"],
                   batch_size=training["train_batch_size"], train_text_encoder=model["train_text_encoder"],
                   accumulation=training["gradient_accumulation_steps"], learning_rate=training["learning_rate"],
                   weight_decay=training["adam_weight_decay"], use_8bit_adam=training["use_8bit_adam"],
                   max_grad_norm=training["max_grad_norm"], snr_gamma=training["snr_gamma"],
                   noise_offset=training["noise_offset"], gradient_checkpointing=training["gradient_checkpointing"],
                   enable_xformers=config["hardware"]["enable_xformers"])


@dataclass(frozen=True)
class Trainable:
    """The trained models by name ("unet", maybe "text_encoder") and their trainable parameters,
    listed once (accelerate's wrappers keep the same parameter objects)."""

    models: dict[str, torch.nn.Module]
    params: list[torch.nn.Parameter]


def cast(module: torch.nn.Module, *args, **kwargs) -> torch.nn.Module:
    """`module.to(...)` without diffusers' warning, which it logs on every dtype cast even when no
    module has to stay in fp32."""
    logger = logging.getLogger("diffusers.models.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return module.to(*args, **kwargs)
    finally:
        logger.setLevel(level)


def add_lora(model: torch.nn.Module, rank: int, alpha: float, targets: list[str]) -> None:
    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets))


def build_trainable_model(components, spec: LoraSpec, levers: dict[str, bool], device: torch.device,
                          weight_dtype: torch.dtype) -> Trainable:
    """Frozen base in the compute dtype with LoRA on the UNet (and optionally the text encoder), LoRA
    weights in fp32."""
    from diffusers.training_utils import cast_training_params

    torch.manual_seed(spec.seed)  # LoRA's gaussian init draws from the global generator
    unet, text_encoder, vae = components.unet, components.text_encoder, components.vae
    vae.requires_grad_(False)
    cast(vae, device, torch.float32)  # fp32: used once for encoding; SD's VAE overflows in fp16
    add_lora(unet, spec.rank, spec.alpha, UNET_LORA_TARGETS)
    cast(unet, device, weight_dtype)
    text_encoder.requires_grad_(False)
    if spec.train_text_encoder:
        add_lora(text_encoder, spec.rank, spec.alpha, TEXT_LORA_TARGETS)
    cast(text_encoder, device, weight_dtype)
    models = {"unet": unet, **({"text_encoder": text_encoder} if spec.train_text_encoder else {})}
    cast_training_params(list(models.values()), dtype=torch.float32)
    if spec.enable_xformers:
        try:
            unet.enable_xformers_memory_efficient_attention()
        except Exception as error:  # xformers missing or unsupported on this device
            raise TrainingError(f"hardware.enable_xformers: {error}; install xformers or set it to false (PyTorch SDPA is used then)") from None
    if spec.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if spec.train_text_encoder:
            # Non-reentrant: the frozen embeddings do not require grad, and a reentrant checkpoint
            # would then cut the LoRA layers inside it off the graph.
            if hasattr(text_encoder, "activation_checkpointing_enable"):  # transformers >= 5.2 name
                text_encoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if levers["channels_last"]:
        unet.to(memory_format=torch.channels_last)
    if levers["compile_unet"]:
        compile_settings()
        unet.compile()
    return Trainable(models, [p for model in models.values() for p in model.parameters() if p.requires_grad])


def set_train_mode(trainable: Trainable) -> None:
    """Train mode for every trained model: transformers runs gradient checkpointing only in train mode."""
    for model in trainable.models.values():
        model.train()


def make_optimizer(params: list[torch.nn.Parameter], spec: LoraSpec, device: torch.device):
    if spec.use_8bit_adam:
        if device.type != "cuda":
            raise TrainingError("training.use_8bit_adam needs a CUDA GPU (bitsandbytes); set it to false on this machine")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise TrainingError("training.use_8bit_adam needs bitsandbytes: pip install bitsandbytes, "
                                "or set training.use_8bit_adam: false") from None
        return bnb.optim.AdamW8bit(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    return torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay, fused=device.type == "cuda")


# ----------------------------------------------------------------------------- 3. one micro-step


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


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


def noise_batch(noise_scheduler, latents: torch.Tensor, generator: torch.Generator,
                noise_offset: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy latents, target, timesteps), all in fp32 whatever the compute dtype: `add_noise` casts
    the schedule to the latents' dtype, and bf16 would round sigma at t=0 and t=1 to exactly 0.
    Autocast casts the UNet's input later."""
    latents = latents.float()
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
    return noisy, target, timesteps


def diffusion_loss(unet, noise_scheduler, latents: torch.Tensor, prompt_embeds: torch.Tensor,
                   generator: torch.Generator, snr_gamma: float | None, noise_offset: float) -> torch.Tensor:
    """The denoising loss of one batch (epsilon or v target), optionally min-SNR weighted."""
    from diffusers.training_utils import compute_snr

    noisy, target, timesteps = noise_batch(noise_scheduler, latents, generator, noise_offset)
    prediction = unet(noisy, timesteps, prompt_embeds, return_dict=False)[0]
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is None:
        return per_sample.mean()
    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=snr_gamma)
    weights = clipped / (snr + 1) if noise_scheduler.config.prediction_type == "v_prediction" else clipped / snr
    return (per_sample * weights).mean()


@dataclass(frozen=True)
class Prompts:
    """Each cached image's prompt as an index into the distinct prompts, their token ids, and (text
    encoder frozen) their embeddings, computed once."""

    index: torch.Tensor
    ids: torch.Tensor
    embeds: torch.Tensor | None

    @classmethod
    def build(cls, prompts: list[str], tokenizer, text_encoder, device: torch.device, weight_dtype: torch.dtype,
              trained_encoder: bool, autocast) -> Prompts:
        unique = sorted(set(prompts))
        position = {prompt: i for i, prompt in enumerate(unique)}
        return cls.from_ids([position[p] for p in prompts], tokenize(tokenizer, unique), text_encoder, device,
                            weight_dtype, trained_encoder, autocast)

    @classmethod
    def from_ids(cls, index: list[int], ids: torch.Tensor, text_encoder, device: torch.device, weight_dtype: torch.dtype,
                 trained_encoder: bool, autocast) -> Prompts:
        ids = ids.to(device)
        embeds = None
        if not trained_encoder:
            with torch.no_grad(), autocast():
                embeds = text_encoder(ids)[0].to(weight_dtype)
        return cls(torch.tensor(index, device=device), ids, embeds)


@dataclass(frozen=True)
class Denoiser:
    """What a micro-batch's loss runs: the (prepared) UNet and text encoder, the noise schedule, the
    VAE's latent scaling and the autocast context of the compute dtype."""

    unet: Any
    text_encoder: Any
    noise_scheduler: Any
    scaling: float
    autocast: Callable[[], Any]


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


def total_optimizer_steps(training: dict[str, Any], batches_per_epoch: int) -> int:
    accumulation = training["gradient_accumulation_steps"]
    return training["max_train_steps"] or math.ceil(training["num_train_epochs"] * batches_per_epoch / accumulation)


# ----------------------------------------------------------------------------- 4. the written LoRA


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
    peft_layers = {name: get_peft_model_state_dict(model) for name, model in models.items()}
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
