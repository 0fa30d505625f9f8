"""Is a cache or a checkpoint whole? Small checks that the resumable state of a run (the LoRA's latent
cache, its step checkpoints) is what was written, so that a file cut short or corrupted on disk is
rebuilt or skipped with a note instead of ending in a traceback or being used.

- `array_crc`: a CRC-32 of an array's shape and bytes, in row order (read in chunks, so a
  memory-mapped file is never copied whole). A CRC, not a cryptographic hash: it guards against
  accidents (a cut file, a bad block, rows moved), at about twice sha256's speed.
- `latent_cache_problem`: what is wrong with a latent cache folder (`latents.npy`, `prompts.json`,
  `check.json` holding the CRC written with it; a NaN or infinite latent), or None.
- `checkpoint_problem` / `latest_intact`: what is wrong with a checkpoint folder (every JSON parses,
  every safetensors and `.pt` file loads), and the newest intact one of a list.
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

CHUNK_BYTES = 64 * 2**20
LATENT_CHECK = "check.json"


def array_crc(array: np.ndarray) -> str:
    crc = zlib.crc32(f"{array.shape}{array.dtype}".encode())
    rows = max(1, CHUNK_BYTES // max(1, array[:1].nbytes))
    for start in range(0, len(array), rows):
        crc = zlib.crc32(np.ascontiguousarray(array[start:start + rows]).data, crc)
    return f"{crc:08x}"


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0][:200]


def latent_cache_problem(folder: Path) -> str | None:
    """None when `folder` holds a latent cache as written: latents.npy of the recorded shape and CRC,
    and one prompt per image. Otherwise what is wrong, for the note."""
    try:
        check = json.loads((folder / LATENT_CHECK).read_text())
        array = np.load(folder / "latents.npy", mmap_mode="r")
        prompts = json.loads((folder / "prompts.json").read_text())
    except (OSError, ValueError) as error:  # cut short: "mmap length is greater than file size", bad JSON
        return f"unreadable ({_first_line(error)})"
    if not isinstance(check, dict) or list(array.shape) != check.get("shape"):
        return f"latents.npy has shape {list(array.shape)}, {LATENT_CHECK} records {check.get('shape') if isinstance(check, dict) else check}"
    if not isinstance(prompts, list) or len(prompts) != len(array):
        return f"prompts.json lists {len(prompts) if isinstance(prompts, list) else 'no'} prompts for {len(array)} images"
    if check.get("crc32") != array_crc(array):
        return "latents.npy is not what was written (its CRC differs)"
    nonfinite = nonfinite_rows(array)
    if nonfinite:  # written so by an older version, which cached what the VAE gave: rebuilt, and checked then
        return f"latents.npy holds NaN or infinite values for {nonfinite} image(s)"
    return None


def nonfinite_rows(array: np.ndarray) -> int:
    """How many rows (images) of `array` hold a NaN or infinite value, read in chunks."""
    rows = max(1, CHUNK_BYTES // max(1, array[:1].nbytes))
    return sum(int((~np.isfinite(np.asarray(array[start:start + rows]).reshape(min(rows, len(array) - start), -1))
                    .all(axis=1)).sum()) for start in range(0, len(array), rows))


def write_latent_check(folder: Path) -> None:
    """Record the shape and CRC of `folder/latents.npy` (called once the whole cache is written)."""
    array = np.load(folder / "latents.npy", mmap_mode="r")
    (folder / LATENT_CHECK).write_text(json.dumps({"shape": list(array.shape), "crc32": array_crc(array)}) + "\n")


def checkpoint_problem(folder: Path) -> str | None:
    """None when every file of a checkpoint folder reads back: position.json (with its fingerprint),
    each JSON, safetensors and torch file. Otherwise what is wrong, naming the file."""
    import torch
    from safetensors.torch import load_file

    if not (folder / "position.json").is_file():
        return "no position.json"
    for path in sorted(folder.iterdir()):
        try:
            if path.suffix == ".json":
                value = json.loads(path.read_text())
                if path.name == "position.json" and not (isinstance(value, dict) and isinstance(value.get("fingerprint"), dict)):
                    return "position.json records no fingerprint"
            elif path.suffix == ".safetensors":
                load_file(path)
            elif path.suffix == ".pt":
                torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:  # noqa: BLE001 - any failure to read back means damaged (safetensors, pickle, zip errors)
            return f"{path.name} does not read back ({_first_line(error)})"
    return None


def latest_intact(checkpoints: Sequence[Path]) -> Path | None:
    """The newest checkpoint (the list is oldest first) that reads back whole. Each damaged newer one
    is moved aside to `<name>.damaged` with a note, so that the previous one is used."""
    for folder in reversed(checkpoints):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        aside = folder.with_name(folder.name + ".damaged")
        if aside.exists():
            import shutil

            shutil.rmtree(aside)
        os.replace(folder, aside)
        print(f"note: checkpoint {folder} is damaged: {problem}; moved it to {aside.name} and using the previous one",
              file=sys.stderr)
    return None
