"""The training Dataset: one split's images as diffusion-model tensors, with their prompts.

Used by verify_dataset and by LoRA training, so what the report shows is what the model sees.
No random augmentation: a horizontal flip would move the heart to the right (dextrocardia).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from workflow_scripts.images import read_xray
from workflow_scripts.prepare_dataset import load_split


def model_transform(resolution: int) -> transforms.Compose:
    """Resize the short side, center-crop, grayscale to 3 channels, scale to [-1, 1]."""
    return transforms.Compose([
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR, antialias=True),
        transforms.CenterCrop(resolution),
        transforms.Grayscale(num_output_channels=3),
        transforms.ToTensor(),
        transforms.Normalize([0.5], [0.5]),
    ])


def to_model_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    return model_transform(resolution)(image)


class XrayPromptDataset(Dataset):
    """Images of one split (train by default) with their prompts, read through `load_split`."""

    def __init__(self, data_dir: str | Path, resolution: int, split: str = "train") -> None:
        self.frame = load_split(data_dir, split)
        self.transform = model_transform(resolution)

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
