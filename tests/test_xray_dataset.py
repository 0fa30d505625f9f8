"""The LoRA's (and fidelity's, and verify's) image transform, written without torchvision, gives
torchvision's tensors bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from workflow_scripts.data.xray_dataset import model_transform


def _torchvision_transform(resolution: int, crop: str):
    """The transform as it was written with torchvision (the reference)."""
    from functools import partial

    from torchvision import transforms

    from workflow_scripts.data.xray_dataset import pad_to_square

    if crop == "pad":
        square = [transforms.Grayscale(num_output_channels=1), transforms.Lambda(partial(pad_to_square, resolution=resolution))]
    else:
        square = [transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR, antialias=True),
                  transforms.CenterCrop(resolution)]
    return transforms.Compose([*square, transforms.Grayscale(num_output_channels=3), transforms.ToTensor(),
                               transforms.Normalize([0.5], [0.5])])


@pytest.mark.parametrize("crop", ["center", "pad"])
def test_the_transform_is_torchvision_s_bit_for_bit(crop: str) -> None:
    rng = np.random.default_rng(0)
    for height, width, mode in ((100, 80, "L"), (80, 101, "L"), (64, 64, "L"), (33, 47, "RGB"), (200, 150, "RGB")):
        pixels = rng.integers(0, 256, (height, width, 3) if mode == "RGB" else (height, width), dtype=np.uint8)
        image = Image.fromarray(pixels, mode)
        for resolution in (32, 33, 64):
            ours, reference = model_transform(resolution, crop)(image), _torchvision_transform(resolution, crop)(image)
            assert ours.dtype == reference.dtype and ours.shape == reference.shape == (3, resolution, resolution)
            assert torch.equal(ours, reference), (height, width, mode, resolution, crop)


def test_an_unknown_crop_is_refused() -> None:
    with pytest.raises(ValueError, match="model.crop must be one of"):
        model_transform(32, "stretch")
