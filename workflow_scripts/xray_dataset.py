"""The training Dataset: one split's images as diffusion-model tensors, with their prompts.

Used by verify_dataset and by LoRA training, so what the report shows is what the model sees.
No random augmentation: a horizontal flip would move the heart to the right (dextrocardia).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision import transforms

from workflow_scripts.images import read_xray
from workflow_scripts.tables import load_split


CROPS = ("center", "pad")


def pad_to_square(image: Image.Image, resolution: int) -> Image.Image:
    """Fit the long side to `resolution` and pad the short one with black, centred: the whole film stays in."""
    return ImageOps.pad(image, (resolution, resolution), method=Image.Resampling.BILINEAR, color=0)


def model_transform(resolution: int, crop: str = "center") -> transforms.Compose:
    """Make the image square (`center`: resize the short side, centre-crop the long one; `pad`: fit the
    long side, pad the short one), grayscale to 3 channels, scale to [-1, 1]."""
    if crop not in CROPS:
        raise ValueError(f"model.crop must be one of {CROPS}, got {crop!r}")
    if crop == "pad":
        square = [transforms.Grayscale(num_output_channels=1), transforms.Lambda(partial(pad_to_square, resolution=resolution))]
    else:
        square = [transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR, antialias=True),
                  transforms.CenterCrop(resolution)]
    return transforms.Compose([
        *square,
        transforms.Grayscale(num_output_channels=3),
        transforms.ToTensor(),
        transforms.Normalize([0.5], [0.5]),
    ])


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
