"""The model `train_lora` trains and its loss: Stable Diffusion's frozen base in the compute dtype
with LoRA (peft) weights in fp32 on the UNet attention projections (optionally the text encoder).

- `LoraSpec.from_config`: what the model, its optimizer and one micro-step read of the config;
- `build_trainable_model` / `make_optimizer`: the model and the parameters it trains, listed once (`Trainable`);
- `Prompts`: each image's prompt, tokenized (and embedded, text encoder frozen) once;
- `diffusion_loss`: the denoising loss of a batch (epsilon or v target, optionally min-SNR weighted),
  noised in fp32; `train_lora`'s loop and `lora_validation.ValLoss` both score with it.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from workflow_scripts.common.errors import TrainingError
from workflow_scripts.common.hardware import compile_settings

UNET_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def library_versions() -> dict[str, str]:
    import accelerate
    import diffusers
    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__, "transformers": transformers.__version__}



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


# ----------------------------------------------------------------------------- prompts and loss


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


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


def noise_batch(noise_scheduler, latents: torch.Tensor, generator: torch.Generator, noise_offset: float,
                timesteps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy latents, target, timesteps), all in fp32 whatever the compute dtype: `add_noise` casts
    the schedule to the latents' dtype, and bf16 would round sigma at t=0 and t=1 to exactly 0.
    Autocast casts the UNet's input later. Timesteps are drawn uniformly unless given."""
    latents = latents.float()
    batch, device = latents.shape[0], latents.device
    noise = torch.randn(latents.shape, generator=generator, device=device)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((batch, latents.shape[1], 1, 1), generator=generator, device=device)
    if timesteps is None:
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), generator=generator,
                                  device=device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return noisy, target, timesteps


def diffusion_loss(unet, noise_scheduler, latents: torch.Tensor, prompt_embeds: torch.Tensor,
                   generator: torch.Generator, snr_gamma: float | None, noise_offset: float,
                   timesteps: torch.Tensor | None = None) -> torch.Tensor:
    """The denoising loss of one batch (epsilon or v target), optionally min-SNR weighted: the mean
    over its images. Noise (and, unless given, timesteps) come from `generator`."""
    from diffusers.training_utils import compute_snr

    noisy, target, timesteps = noise_batch(noise_scheduler, latents, generator, noise_offset, timesteps)
    prediction = unet(noisy, timesteps, prompt_embeds, return_dict=False)[0]
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is None:
        return per_sample.mean()
    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=snr_gamma)
    weights = clipped / (snr + 1) if noise_scheduler.config.prediction_type == "v_prediction" else clipped / snr
    return (per_sample * weights).mean()


