"""What `train_lora` measures of its own LoRA while it trains, on patients it never trained on.

1. `ValLoss`: the diffusion loss of the **val split** under its labelled prompts, with the same
   noise and timesteps at every evaluation (a fixed generator), so two checkpoints differ only by
   their weights. Step 0 is the base without LoRA (peft's gaussian init leaves B = 0), so the curve
   starts at what the base alone scores. Kept per checkpoint in `position.json` (a resumed run goes
   on with it), in TensorBoard (`val/loss`) and in `training_summary.json`;
2. `best_step`: the checkpoint that `training.select_checkpoint: val_loss` makes final;
3. `plot_losses`: `final/loss_curve.png`, the train and val losses by step;
4. `run_validation`: validation images per prompt into TensorBoard and `validation/step-N/`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workflow_scripts.common.faults import maybe_fail
from workflow_scripts.lora.lora_model import diffusion_loss
from workflow_scripts.common.tables import file_key, make_prompt

#: Timesteps each val image is scored at (evenly spread over the schedule): one random timestep per
#: image would make the curve as noisy as the training loss.
VAL_TIMESTEPS = 4


@dataclass
class ValLoss:
    """The val split's cached latents and prompt embeddings, and the fixed noise they are scored with."""

    latents: torch.Tensor  # (n, C, h, w): the posterior means, scaled, fp32
    embeds: torch.Tensor | None  # (n, tokens, dim) with a frozen text encoder; None when it trains
    ids: torch.Tensor  # token ids (n, tokens)
    seed: int
    batch_size: int

    @classmethod
    def build(cls, cache, prompts, scaling: float, seed: int, batch_size: int) -> ValLoss:
        mean, _ = cache.gather(torch.arange(len(cache), device=cache.device), torch.arange(len(cache)))
        embeds = prompts.embeds[prompts.index] if prompts.embeds is not None else None
        return cls(mean * scaling, embeds, prompts.ids[prompts.index], seed, batch_size)

    def __len__(self) -> int:
        return len(self.latents)

    @torch.no_grad()
    def __call__(self, unet, text_encoder, noise_scheduler, autocast) -> float:
        """The training loss (`diffusion_loss`, unweighted) over the val images, each at VAL_TIMESTEPS
        fixed timesteps and fixed noise."""
        was_training = unet.training
        unet.eval()
        device, total, count = self.latents.device, 0.0, 0
        steps = noise_scheduler.config.num_train_timesteps
        grid = torch.linspace(0, steps - 1, VAL_TIMESTEPS + 2, device=device)[1:-1].round().long()
        generator = torch.Generator(device=device).manual_seed(self.seed)
        for start in range(0, len(self), self.batch_size):
            latents = self.latents[start:start + self.batch_size]
            with autocast():
                embeds = (self.embeds[start:start + self.batch_size] if self.embeds is not None
                          else text_encoder(self.ids[start:start + self.batch_size])[0])
                for t in grid:
                    loss = diffusion_loss(unet, noise_scheduler, latents, embeds, generator, snr_gamma=None,
                                          noise_offset=0.0, timesteps=t.repeat(len(latents)))
                    total += loss.item() * len(latents)
                    count += len(latents)
        unet.train(was_training)
        return total / count


def best_step(history: list[dict[str, float]]) -> int | None:
    """The step of the lowest val loss among the checkpoints (step 0, the base, is not one)."""
    saved = [entry for entry in history if entry["step"] > 0]
    return min(saved, key=lambda entry: (entry["loss"], -entry["step"]))["step"] if saved else None


def plot_losses(train: list[tuple[int, float]], val: list[dict[str, float]], path: Path, chosen: int | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    if train:
        ax.plot(*zip(*train), color="0.6", lw=1, label="train loss (mean since last log)")
    if val:
        ax.plot([e["step"] for e in val], [e["loss"] for e in val], "o-", color="C0", label="val loss (val split, fixed noise)")
        ax.axhline(val[0]["loss"], color="C0", ls=":", lw=1, label="val loss of the base without LoRA")
    if chosen is not None:
        ax.axvline(chosen, color="C3", ls="--", lw=1, label=f"final LoRA: step {chosen}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("diffusion loss (epsilon MSE)")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- validation images


def validation_prompts(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(file name, prompt) per validation image grid: one per label named by the label, unless
    training.validation_prompts lists prompts (each named by its own text)."""
    prompts = config["training"]["validation_prompts"]
    if prompts:
        return [(slug(prompt), prompt) for prompt in prompts]
    return [(slug(label), make_prompt([label], config["prompt"]["template"])) for label in config["dataset"]["labels"]]


def slug(text: str) -> str:
    """A validation image's file name: ASCII text as before; any other (Cyrillic) by tables.file_key, never empty."""
    ascii_slug = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")
    return ascii_slug if ascii_slug and text.isascii() else file_key(text)


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
    for name, prompt in validation_prompts(config):
        generator = torch.Generator(device=device).manual_seed(config["training"]["seed"])
        with autocast():
            images = pipeline(prompt, num_images_per_prompt=count, height=resolution, width=resolution, generator=generator,
                              num_inference_steps=config["training"]["validation_inference_steps"], output_type="np").images
        grid = np.concatenate(list((np.clip(images, 0, 1) * 255).round().astype(np.uint8)), axis=1)  # H x (count*W) x 3
        Image.fromarray(grid).save(step_dir / f"{name}.png")
        if writer is not None:
            writer.add_image(f"validation/image_{name}", grid, step, dataformats="HWC")
        maybe_fail("validation")
    unet.train(was_training)
