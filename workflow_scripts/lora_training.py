"""The LoRA training loop in named phases, shared by `train_lora` (the stage) and `benchmark`.

1. `build_trainable_model`: frozen base in the compute dtype, LoRA (peft) weights in fp32;
2. `encode_latent_cache` / `LatentCache`: every training image's VAE latent distribution, once, in
   an fp16 memory-mapped file, served from the device or gathered per batch from host memory;
3. `LoraLoop.micro_step`: one micro-batch (sample latents, noise in fp32, loss, backward, clip, step);
4. `LoraLoop.optimizer_step_done`: what happens when an optimizer step completes (LR schedule,
   the loss kept on the device for the next host sync);
5. `write_lora`: the final files (diffusers format, plus a kohya-format copy for WebUI / ComfyUI).
`gpu_levers` / `hardware_settings` turn the `hardware:` keys into torch settings; `library_versions`
records the libraries a run used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import shutil
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from workflow_scripts.errors import TrainingError

UNET_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
LOG_EVERY = 10  # optimizer steps between host syncs
LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"  # AUTOMATIC1111 / ComfyUI / kohya naming (lora_unet_..., lora_te1_...)
GIB = 2**30

# Keys of `training:` that only extend or observe a run: a checkpoint made under other values of these
# may be resumed. Every other key of `model:` and `training:` changes the result and starts fresh.
RESUMABLE_TRAINING_KEYS = frozenset({
    "num_train_epochs", "max_train_steps", "save_steps", "checkpoints_total_limit", "validation_steps",
    "num_validation_images", "validation_inference_steps", "validation_prompts", "deterministic",
})


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


@contextlib.contextmanager
def hardware_settings(levers: dict[str, bool], deterministic: bool) -> Iterator[None]:
    """Process-wide torch flags for the block (TF32, cudnn.benchmark, deterministic kernels), restored after."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled())
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = levers["allow_tf32"]
    torch.backends.cudnn.benchmark = levers["cudnn_benchmark"]
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; read when CUDA starts (before any GPU work).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
         torch.backends.cudnn.deterministic) = saved[:4]
        torch.use_deterministic_algorithms(saved[4])


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


def add_lora(model: torch.nn.Module, rank: int, alpha: float, targets: list[str]) -> None:
    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets))


def place(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move to the device; cast only when the dtype changes (diffusers warns on every explicit cast)."""
    model.to(device)
    if next(model.parameters()).dtype != dtype:
        model.to(dtype=dtype)


def build_trainable_model(components, model_cfg: dict[str, Any], training: dict[str, Any], hardware: dict[str, Any],
                          levers: dict[str, bool], device: torch.device, weight_dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """Frozen base in the compute dtype with LoRA on the UNet (and optionally the text encoder), LoRA
    weights in fp32. Returns the trained models by name ("unet", maybe "text_encoder")."""
    from diffusers.training_utils import cast_training_params

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
    cast_training_params(list(trained.values()), dtype=torch.float32)
    if hardware["enable_xformers"]:
        try:
            unet.enable_xformers_memory_efficient_attention()
        except Exception as error:  # xformers missing or unsupported on this device
            raise TrainingError(f"hardware.enable_xformers: {error}; install xformers or set it to false (PyTorch SDPA is used then)") from None
    if training["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()
        if model_cfg["train_text_encoder"]:
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
    return trained


def set_train_mode(trained: dict[str, torch.nn.Module]) -> None:
    """Train mode for every trained model: transformers runs gradient checkpointing only in train mode."""
    for model in trained.values():
        model.train()


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


# ----------------------------------------------------------------------------- 2. the latent cache


def latent_bytes_per_image(resolution: int, latent_channels: int = 4, downscale: int = 8) -> int:
    """Bytes one image takes in the cache: mean and std of its latent, fp16."""
    return 2 * latent_channels * (resolution // downscale) ** 2 * np.dtype(np.float16).itemsize


@torch.no_grad()
def encode_latent_cache(vae, batches: Iterable[tuple[torch.Tensor, list[str]]], count: int, folder: Path,
                        device: torch.device, show_progress: bool = False) -> Path:
    """Write `latents.npy` (count x 2 x C x h x w, fp16: mean and std of each image's VAE latent) and
    `prompts.json` into `folder`, batch by batch into a memory-mapped file (no host copy of the whole
    cache), atomically: a killed encode leaves only `<folder>.partial`. Returns the folder."""
    from tqdm import tqdm

    if (folder / "latents.npy").is_file():
        return folder
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    array, prompts, start = None, [], 0
    for pixels, batch_prompts in tqdm(batches, desc="caching latents", unit="batch", disable=not show_progress, file=sys.stderr):
        dist = vae.encode(pixels.to(device, vae.dtype)).latent_dist
        rows = torch.stack([dist.mean, dist.std], dim=1).to(torch.float16).cpu().numpy()
        if array is None:
            array = np.lib.format.open_memmap(partial / "latents.npy", mode="w+", dtype=np.float16,
                                              shape=(count, *rows.shape[1:]))
        array[start:start + len(rows)] = rows
        start += len(rows)
        prompts.extend(batch_prompts)
    if start != count or array is None:
        raise TrainingError(f"latent cache: expected {count} images, encoded {start}")
    array.flush()
    del array
    (partial / "prompts.json").write_text(json.dumps(prompts))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    return folder


class LatentCache:
    """The cached latent distributions, served as fp32 (mean, std) batches on the device.

    `device` mode: the whole fp16 cache is copied to the device once (fits the budget).
    `host` mode: the memory-mapped file stays in host memory (the OS page cache, shared by all
    processes); each batch's rows are gathered, pinned and copied asynchronously. Both modes give
    the same values, so the same loss."""

    def __init__(self, folder: Path, device: torch.device, budget_bytes: float):
        self.array = np.load(folder / "latents.npy", mmap_mode="r")
        self.prompts: list[str] = json.loads((folder / "prompts.json").read_text())
        self.device = device
        self.nbytes = int(self.array.nbytes)
        self.mode = "device" if self.nbytes <= budget_bytes else "host"
        self.data = None
        if self.mode == "device":
            self.data = torch.empty(self.array.shape, dtype=torch.float16, device=device)
            for start in range(0, len(self.array), 1024):  # chunks: no whole host copy on the way
                self.data[start:start + 1024] = torch.from_numpy(np.array(self.array[start:start + 1024]))

    def __len__(self) -> int:
        return len(self.array)

    def describe(self) -> str:
        where = (f"on {self.device}" if self.mode == "device"
                 else "in host memory (memory-mapped, per-batch gather" + (", pinned)" if self.device.type == "cuda" else ")"))
        return f"latent cache: {len(self)} images, {self.nbytes / 2**20:,.1f} MiB fp16, {self.mode} mode: {where}"

    def gather(self, indices: torch.Tensor, indices_host: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 (mean, std) of the rows `indices` (on the device; `indices_host` the same on the CPU)."""
        if self.data is not None:
            rows = self.data[indices]
        else:
            rows = torch.from_numpy(self.array[indices_host.numpy()])
            if self.device.type == "cuda":
                rows = rows.pin_memory()
            rows = rows.to(self.device, non_blocking=True)
        rows = rows.float()
        return rows[:, 0], rows[:, 1]


# ----------------------------------------------------------------------------- 3. one step


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def epoch_order(num_images: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_images, generator=generator)


def step_generator(seed: int, micro_step: int, rank: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + micro_step) * 64 + rank)


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


@dataclass
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


@dataclass
class LoraLoop:
    """One training run's step machinery. `micro_step` runs one micro-batch; after every
    `accumulation` of them, `optimizer_step_done` advances the LR schedule."""

    accelerator: Any
    unet: Any
    text_encoder: Any
    noise_scheduler: Any
    trained: dict[str, torch.nn.Module]
    optimizer: Any
    lr_scheduler: Any
    cache: LatentCache
    prompts: Prompts
    scaling: float
    training: dict[str, Any]
    rank: int = 0
    world: int = 1
    params: list[torch.nn.Parameter] = field(default_factory=list)
    loss_sum: torch.Tensor | None = None
    loss_count: int = 0
    _order: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        self.params = [p for model in self.trained.values() for p in model.parameters() if p.requires_grad]
        self.loss_sum = torch.zeros((), device=self.cache.device)

    @property
    def batch(self) -> int:
        return self.training["train_batch_size"]

    @property
    def batches_per_epoch(self) -> int:
        return len(self.cache) // (self.batch * self.world)

    def with_batch_size(self, batch: int) -> LoraLoop:
        """The same model, optimizer and cache, stepping at another batch size."""
        return dataclasses.replace(self, training={**self.training, "train_batch_size": batch}, loss_sum=None,
                                   loss_count=0, _order=None)

    def batch_indices(self, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's images of a micro-step, on the device and on the host. The epoch's order is
        computed once per epoch and kept on the device: no per-step host work in device mode."""
        epoch, slot = divmod(micro_step, self.batches_per_epoch)
        if self._order is None or self._order[0] != epoch:
            order = epoch_order(len(self.cache), self.training["seed"], epoch)
            self._order = (epoch, order, order.to(self.cache.device))
        start = (slot * self.world + self.rank) * self.batch
        return self._order[2][start:start + self.batch], self._order[1][start:start + self.batch]

    def loss(self, micro_step: int) -> torch.Tensor:
        """The loss of a micro-step: latents sampled from the cached distribution, noise and timesteps
        from a generator seeded by (seed, micro-step, rank)."""
        indices, indices_host = self.batch_indices(micro_step)
        device = self.cache.device
        generator = step_generator(self.training["seed"], micro_step, self.rank, device)
        mean, std = self.cache.gather(indices, indices_host)
        latents = (mean + std * torch.randn(mean.shape, generator=generator, device=device)) * self.scaling  # fp32
        with self.accelerator.autocast():
            if self.prompts.embeds is not None:
                embeds = self.prompts.embeds[self.prompts.index[indices]]
            else:
                embeds = self.text_encoder(self.prompts.ids[self.prompts.index[indices]])[0]
            return diffusion_loss(self.unet, self.noise_scheduler, latents, embeds, generator,
                                  self.training["snr_gamma"], self.training["noise_offset"])

    def micro_step(self, micro_step: int) -> torch.Tensor:
        with self.accelerator.accumulate(*self.trained.values()):
            loss = self.loss(micro_step)
            self.accelerator.backward(loss)
            if self.accelerator.sync_gradients:
                self.accelerator.clip_grad_norm_(self.params, self.training["max_grad_norm"])
            self.optimizer.step()  # accelerate steps only when the accumulation window is complete
            self.optimizer.zero_grad(set_to_none=True)
        self.loss_sum += loss.detach()
        self.loss_count += 1
        return loss

    def optimizer_step_done(self) -> None:
        self.lr_scheduler.step()

    def mean_loss(self) -> float:
        """One host sync: the mean loss since the last call."""
        value = (self.loss_sum / max(self.loss_count, 1)).item()
        self.loss_sum, self.loss_count = torch.zeros((), device=self.cache.device), 0
        return value


def total_optimizer_steps(training: dict[str, Any], batches_per_epoch: int) -> int:
    accumulation = training["gradient_accumulation_steps"]
    return training["max_train_steps"] or math.ceil(training["num_train_epochs"] * batches_per_epoch / accumulation)


# ----------------------------------------------------------------------------- 5. the written LoRA


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
        safe_serialization=True)
    kohya = convert_state_dict_to_kohya({f"{name}.{key}": value for name, layers in peft_layers.items()
                                         for key, value in layers.items()})
    alpha = float(meta["unet"]["lora_alpha"])
    # diffusers writes alpha = rank (scale 1); the scale is alpha / rank, so record the real alpha.
    kohya = {key: (torch.tensor(alpha) if key.endswith(".alpha") else value.detach().float().cpu().contiguous())
             for key, value in kohya.items()}
    save_file(kohya, directory / KOHYA_FILE, metadata={"ss_network_module": "networks.lora",
                                                       "ss_network_dim": str(meta["unet"]["r"]),
                                                       "ss_network_alpha": str(alpha)})
