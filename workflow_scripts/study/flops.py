"""Counted FLOPs per image of the workflow's models, with torch.utils.flop_counter.FlopCounterMode.

Counted on the meta device: the models are built from their configs with no weights and no
arithmetic, so counting SD 1.5 at 512 px takes seconds on any machine. FlopCounterMode counts
matrix products, convolutions and attention (2 FLOP per multiply-add); element-wise work is not
counted, as is usual for FLOP figures. Used by the cost estimate (workflow_scripts/study/cost.py), whose
stored table tests/test_cost.py re-counts here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

SD15_ARCH = Path(__file__).resolve().parents[3] / "shared" / "sd15-arch"
TEXT_TOKENS = 77


def _counted(run) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    return int(counter.get_total_flops())


def _component_config(arch_dir: Path, component: str) -> dict[str, Any]:
    path = Path(arch_dir) / component / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {component} config; point --arch at a diffusers SD 1.5 folder "
                                "(its unet/, vae/ and text_encoder/ config.json files suffice)")
    return json.loads(path.read_text())


def count_sd15(arch_dir: str | Path, resolutions: list[int], lora_rank: int = 4) -> dict[int, dict[str, int]]:
    """Per resolution in px, FLOP per image of SD 1.5: UNet forward (one sampling step, one prompt),
    UNet training step (forward and backward with LoRA of `lora_rank` on the attention projections,
    base frozen), VAE encode and decode, text encoder forward."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextConfig, CLIPTextModel

    arch_dir = Path(arch_dir)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(_component_config(arch_dir, "unet"))
        vae = AutoencoderKL.from_config(_component_config(arch_dir, "vae"))
        text = CLIPTextModel(CLIPTextConfig(**_component_config(arch_dir, "text_encoder")))
        context = torch.zeros((1, TEXT_TOKENS, unet.config.cross_attention_dim))
        timestep = torch.zeros((1,), dtype=torch.long)
        tokens = torch.zeros((1, TEXT_TOKENS), dtype=torch.long)
        counts: dict[int, dict[str, int]] = {}
        with torch.no_grad():
            text_flop = _counted(lambda: text(tokens))
            for resolution in resolutions:
                latents = torch.zeros((1, unet.config.in_channels, resolution // 8, resolution // 8))
                pixels = torch.zeros((1, 3, resolution, resolution))
                counts[resolution] = {"unet_forward": _counted(lambda: unet(latents, timestep, context)),
                                      "vae_encode": _counted(lambda: vae.encode(pixels)),
                                      "vae_decode": _counted(lambda: vae.decode(latents)),
                                      "text_encode": text_flop}
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        for resolution in resolutions:
            latents = torch.zeros((1, unet.config.in_channels, resolution // 8, resolution // 8))
            counts[resolution]["unet_train"] = _counted(
                lambda: unet(latents, timestep, context).sample.float().pow(2).mean().backward())
    return counts


def count_classifier(model_name: str, image_size: int, num_classes: int) -> dict[str, int]:
    """FLOP per image of a timm classifier at `image_size` px: forward (test, validation) and a
    training step (forward and backward, every weight trained)."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(model_name, pretrained=False, num_classes=num_classes)
        images = torch.zeros((1, 3, image_size, image_size))
        with torch.no_grad():
            forward = _counted(lambda: model(images))
        train = _counted(lambda: model(images).float().pow(2).mean().backward())
    return {"classifier_forward": forward, "classifier_train": train}
