"""Where and how the classifier computes: device, mixed precision, memory format, worker counts and
scoring (`predict`). Pure choices, so they are tested on a CPU; train_classifier applies them.

On CUDA: autocast in bf16 where the GPU supports it, else fp16 with a GradScaler (fp16's range is
too small for unscaled gradients); channels-last tensors (faster convolutions on tensor cores);
TF32 and cudnn.benchmark from `hardware` unless `classifier.deterministic` asks for deterministic
kernels (set by hardware.apply_cuda_levers, as for LoRA training and generation). On CPU: fp32,
channels-last (oneDNN's faster convolution path), no flags.
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from workflow_scripts.classifier.classifier_model import normalize
from workflow_scripts.data.resolve import default_workers
from workflow_scripts.common.hardware import DTYPE_NAMES


def machine_cores() -> int:
    """CPU cores this process may use (its affinity mask, not the whole machine's)."""
    return max(1, default_workers())


def loader_workers(requested: int, cores: int | None = None) -> int:
    """DataLoader worker processes for the decoding path: as asked, but never more than the cores
    this process may use (more only adds processes that compete for the same cores)."""
    return max(0, min(int(requested), cores if cores is not None else machine_cores()))


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def amp_dtype(device_type: str, bf16_supported: bool) -> torch.dtype | None:
    """The autocast dtype: bf16 on a CUDA GPU that supports it, else fp16; None (fp32) elsewhere."""
    if device_type != "cuda":
        return None
    return torch.bfloat16 if bf16_supported else torch.float16


@dataclass(frozen=True)
class Precision:
    """How the classifier runs on `device`: autocast dtype (None: fp32), GradScaler on (fp16 only),
    channels-last memory format."""

    device: torch.device
    dtype: torch.dtype | None
    channels_last: bool

    @property
    def needs_scaler(self) -> bool:
        return self.dtype == torch.float16

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type, enabled=self.needs_scaler)

    def describe(self) -> str:
        if self.dtype is None:
            return "fp32" + (", channels-last" if self.channels_last else "")
        kind = DTYPE_NAMES[self.dtype] + (" (GradScaler)" if self.needs_scaler else "")
        return f"{kind} autocast" + (", channels-last" if self.channels_last else "")

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def model_input(self, films: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
        """uint8 films (batch, size, size) on the host -> the model's normalized float input on the
        device: a quarter of the bytes of a float copy cross the bus (the copy is asynchronous
        from pinned memory), normalization runs on the device."""
        images = normalize(films.to(self.device, non_blocking=True), mean, std)
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images


def precision_for(device: torch.device) -> Precision:
    if device.type == "cuda":
        return Precision(device, amp_dtype("cuda", torch.cuda.is_bf16_supported()), channels_last=True)
    # channels-last on CPU too: oneDNN's convolutions run 1.4-1.7x faster on it (test_byobnet, 1-2 threads)
    return Precision(device, None, channels_last=True)


def host_value(tensor: torch.Tensor) -> float:
    """The one place a classifier loop reads a device value back (a host sync): at log points only."""
    return float(tensor)


@torch.no_grad()
def predict(model: torch.nn.Module, loader: Iterable, precision: Precision, mean: Sequence[float],
            std: Sequence[float]) -> tuple[np.ndarray, float]:
    """Sigmoid probabilities (images, classes) and the mean BCE loss over `loader`'s (uint8 films,
    targets): validation, test and the fidelity stage's prompt adherence all score through here."""
    model.eval()
    loss_fn = torch.nn.BCEWithLogitsLoss(reduction="sum")
    probs, total, count = [], torch.zeros((), device=precision.device), 0
    for films, targets in loader:
        with precision.autocast():
            logits = model(precision.model_input(films, mean, std)).float()
        targets = targets.to(precision.device, non_blocking=True)
        total += loss_fn(logits, targets)
        count += targets.numel()
        probs.append(torch.sigmoid(logits))
    return torch.cat(probs).cpu().numpy(), host_value(total) / max(count, 1)
