"""The latent cache: every training image's VAE latent distribution, encoded once.

`encode_latent_cache` writes it (each process encodes its share into one fp16 memory-mapped file,
atomically); `LatentCache` serves it as fp32 (mean, std) batches, from the device when it fits
`hardware.latent_cache_device_budget_gb`, else gathered per batch from host memory. A NaN or infinite
latent is refused when it is encoded, naming the image, and never cached.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workflow_scripts.common.errors import TrainingError
from workflow_scripts.lora.integrity import latent_cache_problem, write_latent_check

GIB = 2**30


def latent_shape(vae, resolution: int) -> tuple[int, int, int]:
    """(channels, h, w) of one image's latent: each VAE block after the first halves the side."""
    side = resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    return vae.config.latent_channels, side, side


def shard(count: int, batch_size: int, rank: int, world: int) -> range:
    """The images process `rank` of `world` encodes: whole batches in file order, so that its batches
    are those one process would encode, and the shares differ by at most one batch."""
    per = math.ceil(count / batch_size / world) * batch_size
    return range(min(rank * per, count), min((rank + 1) * per, count))


@torch.no_grad()
def encode_latent_cache(vae, batches: Callable[[range], Iterable[tuple[Any, ...]]], count: int,
                        batch_size: int, folder: Path, shape: tuple[int, ...], device: torch.device, rank: int = 0,
                        world: int = 1, barrier: Callable[[], Any] = lambda: None, show_progress: bool = False) -> Path:
    """Write `latents.npy` (count x 2 x C x h x w, fp16: mean and std of each image's VAE latent) and
    `prompts.json` into `folder`. Each of the `world` processes encodes its `shard`, given as
    `batches(rows)` (pixels, prompts and, for the messages, the images' names), straight into the one
    memory-mapped file (no host copy of the whole cache), so no process waits for the whole encode.
    Atomic: a killed encode leaves only `<folder>.partial`. The shape and CRC written in `check.json`
    let a later run rebuild a cache damaged on disk (integrity)."""
    from tqdm import tqdm

    if (folder / "latents.npy").is_file():  # every process looks before the first barrier: all agree
        problem = latent_cache_problem(folder)  # a cache cut short or corrupted on disk is rebuilt
        if problem is None:
            return folder
        if rank == 0:
            print(f"note: latent cache {folder}: {problem}; rebuilding it", file=sys.stderr)
    if count == 0:
        raise TrainingError("latent cache: the training split has no images")
    partial = folder.with_name(folder.name + ".partial")
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        np.lib.format.open_memmap(partial / "latents.npy", mode="w+", dtype=np.float16, shape=(count, 2, *shape)).flush()
    barrier()
    rows, prompts = shard(count, batch_size, rank, world), []
    array, row = np.load(partial / "latents.npy", mmap_mode="r+"), rows.start
    for pixels, batch_prompts, *names in tqdm(batches(rows), desc="caching latents", unit="batch",
                                              disable=not show_progress, file=sys.stderr):
        dist = vae.encode(pixels.to(device, vae.dtype)).latent_dist
        values = torch.stack([dist.mean, dist.std], dim=1).to(torch.float16).cpu().numpy()
        refuse_nonfinite_latents(values, row, names[0] if names else None, vae.dtype)
        array[row:row + len(values)] = values
        row += len(values)
        prompts.extend(batch_prompts)
    if row != rows.stop:
        raise TrainingError(f"latent cache: process {rank} expected images {rows.start}-{rows.stop}, encoded up to {row}")
    array.flush()
    del array
    (partial / f"prompts-{rank}.json").write_text(json.dumps(prompts))
    barrier()
    if rank == 0:
        shares = [partial / f"prompts-{r}.json" for r in range(world)]
        (partial / "prompts.json").write_text(json.dumps([p for path in shares for p in json.loads(path.read_text())]))
        for path in shares:
            path.unlink()
        write_latent_check(partial)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(partial, folder)
    barrier()
    return folder


def refuse_nonfinite_latents(values: np.ndarray, first_row: int, names: Sequence[str] | None, dtype: torch.dtype) -> None:
    """Stop before a NaN or infinite latent is cached: every loss on it would be NaN, and the loss's
    message could only guess at the learning rate. The cause is the image or the VAE's precision."""
    bad = np.flatnonzero(~np.isfinite(values.reshape(len(values), -1)).all(axis=1))
    if bad.size:
        shown = [str(names[i]) if names else f"image {first_row + i} of the split (file order)" for i in bad[:3]]
        raise TrainingError(
            f"latent cache: the VAE ({str(dtype).removeprefix('torch.')}) gave NaN or infinite latents for {bad.size} "
            f"image(s) of a batch ({', '.join(shown)}); nothing was cached and no checkpoint was touched. The cause is "
            "the input image (open it: is it a normal radiograph?) or the VAE's precision (an fp16 VAE overflows on "
            "some images: training.mixed_precision no or bf16), not the learning rate")


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

