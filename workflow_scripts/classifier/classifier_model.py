"""The study's classifier, as a library: its labels, its images, its timm model and its metrics.

`train_classifier` (the stage) trains it; `fidelity` scores synthetic images with a trained one
(`load_classifier`); `compare` names its outputs (`class_names`).
Images: read_xray -> short side resized to classifier.image_size -> center crop -> 3 channels ->
the model's ImageNet mean/std. No flips: left and right matter in a chest X-ray.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from workflow_scripts.models.base_model import hub_offline, hub_unreachable_reason
from workflow_scripts.common.errors import ConfigError, DataError
from workflow_scripts.common.images import BadImageError, read_xray
from workflow_scripts.common.labels import NO_FINDING
from workflow_scripts.common.tables import LABEL_JOIN



# ----------------------------------------------------------------------------- labels


def class_names(vocabulary: Sequence[str]) -> list[str]:
    """The classifier's outputs: the label vocabulary without "No Finding" (the all-zero target)."""
    classes = [label for label in vocabulary if label != NO_FINDING]
    if not classes:
        raise ConfigError(f"dataset.labels {list(vocabulary)} holds no finding to classify")
    return classes


def encode_labels(labels: Sequence[str], classes: Sequence[str], where: str = "",
                  paths: Sequence[str] | None = None) -> np.ndarray:
    """`"Effusion|Mass"` cells -> a (n, len(classes)) 0/1 float32 matrix; "No Finding" is all zero."""
    index = {label: position for position, label in enumerate(classes)}
    targets = np.zeros((len(labels), len(classes)), dtype=np.float32)
    for row, cell in enumerate(labels):
        parts = [part.strip() for part in str(cell).split(LABEL_JOIN) if part.strip()]
        image = f" ({paths[row]})" if paths is not None else ""
        if not parts:
            raise DataError(f"{where or 'labels'} row {row + 2}{image}: no label (normal images are 'No Finding')")
        for label in parts:
            if label == NO_FINDING:
                continue
            if label not in index:
                raise DataError(
                    f"{where or 'labels'} row {row + 2}{image}: label {label!r} is not in dataset.labels "
                    f"{[*classes, NO_FINDING]}"
                )
            targets[row, index[label]] = 1.0
    return targets


# ----------------------------------------------------------------------------- images


def _interpolation(name: str) -> int:
    return {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST, "bicubic": Image.BICUBIC,
            "lanczos": Image.LANCZOS}.get(str(name), Image.BICUBIC)


def film_pixels(image: Image.Image, size: int, interpolation: str = "bicubic") -> np.ndarray:
    """Grayscale X-ray -> (size, size) uint8: short side to `size`, center crop. Deliberately no flip.
    What the decode-once cache (classifier_cache) stores; `normalize` makes the model's input."""
    image = image.convert("L")
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), _interpolation(interpolation))
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.array(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


def normalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 films (..., size, size) -> float (..., 3, size, size): replicated to 3 channels and
    normalized with the model's mean/std, on the films' device (a batch: on the GPU, after a uint8 copy)."""
    scaled = (pixels.float() / 255.0).unsqueeze(-3)
    shape = (3, *pixels.shape[-2:])
    channels = scaled.expand(*pixels.shape[:-2], *shape)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    return (channels - mean_t) / std_t


def preprocess(image: Image.Image, size: int, mean: Sequence[float], std: Sequence[float],
               interpolation: str = "bicubic") -> torch.Tensor:
    """Grayscale X-ray -> (3, size, size) float tensor: `film_pixels`, then `normalize`."""
    return normalize(torch.from_numpy(film_pixels(image, size, interpolation)), mean, std)


def read_film(path: str, size: int, interpolation: str = "bicubic") -> np.ndarray:
    """`film_pixels` of the file at `path`; a bad image is a DataError naming it."""
    try:
        image = read_xray(path)
    except BadImageError as error:
        # DataError takes one argument, so it also survives the trip out of a DataLoader worker.
        raise DataError(str(error)) from None
    return film_pixels(image, size, interpolation)


class FilmDataset(torch.utils.data.Dataset):
    """(uint8 film (size, size), target vector) per row, decoded from its file at every access:
    the classifier's path without the decode-once cache."""

    def __init__(self, paths: Sequence[str], targets: np.ndarray | None, size: int, interpolation: str = "bicubic") -> None:
        self.paths = [str(path) for path in paths]
        self.targets = targets if targets is not None else np.zeros((len(self.paths), 0), dtype=np.float32)
        self.size, self.interpolation = size, interpolation

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        film = read_film(self.paths[index], self.size, self.interpolation)
        return torch.from_numpy(film), torch.from_numpy(self.targets[index])


def _seed_worker(worker_id: int) -> None:
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def make_loader(dataset: torch.utils.data.Dataset, batch_size: int, num_workers: int, shuffle: bool = False,
                seed: int = 0, drop_last: bool = False) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed), worker_init_fn=_seed_worker,
        persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available(),
    )


# ----------------------------------------------------------------------------- model


def _cached_weights(pretrained_cfg: Mapping[str, Any]) -> str | None:
    """A local copy of the model's pretrained weights (HF cache or torch hub cache), or None."""
    hf_hub_id = pretrained_cfg.get("hf_hub_id")
    if hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo_id, _, revision = hf_hub_id.partition("@")
        filename = pretrained_cfg.get("hf_hub_filename")
        candidates = [filename] if filename else ["model.safetensors", "pytorch_model.safetensors", "pytorch_model.bin"]
        for candidate in candidates:
            found = try_to_load_from_cache(repo_id, candidate, revision=revision or None)
            if isinstance(found, str) and os.path.isfile(found):
                return found
    url = pretrained_cfg.get("url")
    if url:
        from urllib.parse import urlparse

        local = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
        if local.is_file():
            return str(local)
    return None


def _weights_source(pretrained_cfg: Mapping[str, Any]) -> str:
    return str(pretrained_cfg.get("hf_hub_id") or pretrained_cfg.get("url") or pretrained_cfg.get("file") or "unknown")


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


def create_model(name: str, pretrained: bool, num_classes: int,
                 allow_random_init: bool = False) -> tuple[torch.nn.Module, str]:
    """`timm.create_model(name, pretrained, num_classes)` that never hangs offline: without network,
    weights come from the local cache; where they cannot be had, a ConfigError, or random init with
    `allow_random_init` (classifier.allow_random_init). Returns the model and what it started from,
    in words (recorded in metrics.json, quoted by the table)."""
    import timm

    if not timm.is_model(name):
        raise ConfigError(f"classifier.model {name!r} is not a timm model (e.g. resnet18, densenet121, "
                          "convnext_tiny; `timm.list_models()` lists them)")
    if not pretrained:
        return (timm.create_model(name, pretrained=False, num_classes=num_classes),
                "random initialisation (classifier.pretrained: false)")

    try:
        cfg_object = timm.models.get_pretrained_cfg(name)
    except RuntimeError as error:  # e.g. an unknown pretrained tag: resnet18.nope
        raise ConfigError(f"classifier.model {name!r}: {error}") from None
    cfg = cfg_object.to_dict() if cfg_object is not None else {}
    source = _weights_source(cfg)
    if not (cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("file")):
        reason = f"timm lists no pretrained weights for {name}"
    else:
        offline = "HF_HUB_OFFLINE is set" if hub_offline() else hub_unreachable_reason(cfg.get("hf_hub_id") or name)
        local = _cached_weights(cfg) if offline else None
        if offline and local is None:
            reason = f"{offline} and {source} is not in the local cache"
        else:
            try:
                overlay = {"pretrained_cfg_overlay": {"file": local}} if local else {}
                model = timm.create_model(name, pretrained=True, num_classes=num_classes, **overlay)
                return model, f"ImageNet weights (timm: {source})"
            except Exception as exc:  # noqa: BLE001 - download, cache and format errors all mean "no weights"
                reason = _short(f"{type(exc).__name__}: {exc}")
    if not allow_random_init:
        raise ConfigError(f"classifier.pretrained: ImageNet weights for {name} unavailable ({reason}). Fetch them "
                          "with `snakemake download_weights` (or `python -m workflow_scripts.models.weights --download`) where "
                          "the hub is reachable, or set classifier.allow_random_init: true to train from random "
                          "initialisation, or classifier.pretrained: false.")
    print(f"warning: ImageNet weights for {name} unavailable ({reason}); training from random initialisation "
          "(classifier.allow_random_init: true)", file=sys.stderr)
    return (timm.create_model(name, pretrained=False, num_classes=num_classes),
            f"random initialisation: no ImageNet weights for {name} ({reason}; classifier.allow_random_init: true)")


def model_data_config(model: torch.nn.Module) -> dict[str, Any]:
    import timm.data

    data_config = timm.data.resolve_model_data_config(model)
    return {"mean": [float(v) for v in data_config["mean"]], "std": [float(v) for v in data_config["std"]],
            "interpolation": str(data_config.get("interpolation", "bicubic"))}


def load_classifier(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained model of a run (its model.pt, or the run folder), in eval mode on the CPU, and its
    metadata: model, classes, image_size, mean, std, interpolation, pretrained_weights, ..."""
    import timm

    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise DataError(f"{path}: classifier not found; run the train_classifier stage first")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    meta = {key: value for key, value in checkpoint.items() if key != "state_dict"}
    model = timm.create_model(meta["model"], pretrained=False, num_classes=len(meta["classes"]))
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    return model, meta


# ----------------------------------------------------------------------------- metrics


def macro_auroc(Y: np.ndarray, S: np.ndarray) -> float | None:
    """Point estimate only (model selection on val): mean AUROC over labels with both classes."""
    from workflow_scripts.study.stats import auroc_columns

    values = auroc_columns(np.asarray(Y, dtype=float), np.asarray(S, dtype=float))
    return float(np.nanmean(values)) if np.isfinite(values).any() else None
