"""The training Dataset: one split's images as diffusion-model tensors, with their prompts.

Used by verify_dataset and by LoRA training, so what the report shows is what the model sees.
No random augmentation: a horizontal flip would move the heart to the right (dextrocardia).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from workflow_scripts.common.images import read_xray
from workflow_scripts.common.tables import load_split


CROPS = ("center", "pad")


def pad_to_square(image: Image.Image, resolution: int) -> Image.Image:
    """Fit the long side to `resolution` and pad the short one with black, centred: the whole film stays in."""
    return ImageOps.pad(image, (resolution, resolution), method=Image.Resampling.BILINEAR, color=0)


def model_transform(resolution: int, crop: str = "center") -> Callable[[Image.Image], torch.Tensor]:
    """Make the image square (`center`: resize the short side, centre-crop the long one; `pad`: fit the
    long side, pad the short one), grayscale to 3 channels, scale to [-1, 1]. torchvision's
    Resize/CenterCrop/Grayscale/ToTensor/Normalize, written out with PIL and numpy (bit-identical,
    tests/test_train_lora.py) because importing torchvision costs every job that reads films seconds
    (torchvision.ops imports torch._dynamo)."""
    if crop not in CROPS:
        raise ValueError(f"model.crop must be one of {CROPS}, got {crop!r}")
    return partial(_to_model_tensor, resolution=resolution, crop=crop)


def _to_model_tensor(image: Image.Image, resolution: int, crop: str) -> torch.Tensor:
    if crop == "pad":
        image = pad_to_square(image.convert("L"), resolution)
    else:
        image = _center_crop(_resize_short_side(image, resolution), resolution)
    gray = np.asarray(image.convert("L"), dtype=np.uint8)
    pixels = torch.from_numpy(np.ascontiguousarray(np.stack([gray] * 3))).to(torch.get_default_dtype()).div(255)
    return pixels.sub_(0.5).div_(0.5)


def _resize_short_side(image: Image.Image, size: int) -> Image.Image:
    """torchvision's Resize(size) on a PIL image: the short side to `size`, the long side truncated."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_size = (new_short, new_long) if width <= height else (new_long, new_short)
    return image if new_size == image.size else image.resize(new_size, Image.Resampling.BILINEAR)


def _center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision's CenterCrop(size) on a PIL image at least `size` on both sides."""
    width, height = image.size
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


class XrayPromptDataset(Dataset):
    """Images of one split (train by default) with their prompts, read through `load_split`."""

    def __init__(self, data_dir: str | Path, resolution: int, split: str = "train", crop: str = "center") -> None:
        self.frame = load_split(data_dir, split)
        self.transform = model_transform(resolution, crop)

    def __len__(self) -> int:
        return len(self.frame)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.frame.iloc[index]
        return {
            "pixel_values": self.transform(read_xray(record["path"])),
            "prompt": record["prompt"],
            "labels": record["labels"],
            "path": record["path"],
        }
