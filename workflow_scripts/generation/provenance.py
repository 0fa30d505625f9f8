"""What made a generated image: a record per label folder, so that a re-run keeps an image only when
the LoRA, the base model, the prompt and every sampling setting that shapes its pixels are the same.

Each `<output-dir>/<key>/` folder holds `provenance.json` beside its PNGs:

    {"version": 1, "lora_sha256": "...", "base_model": "tiny", "base_fingerprint": "...",
     "prompt": "A chest X-ray with Mass", "negative_prompt": "", "steps": 30, "guidance": 7.5,
     "scheduler": "dpmsolver++", "seed": 0, "resolution": 512, "dtype": "float32"}

Every image of the folder was made under that record (each image's own seed derives from `seed`, the
key and its index: generation.image_seed). Before generating, `refresh_stale_images` compares the
record with the one of this run; on any difference, or when there is no record (a folder of an
older version, or made by hand), every image of the key is removed with a note naming what changed,
and the new record is written before the first image, so a run cut short resumes with images of one
record only. Not in the record: the batch size (a throughput lever) and the device (the same
settings give the same image on the same kind of device and dtype; re-running on another GPU keeps
a half-made folder instead of remaking it).

The LoRA's fingerprint is the sha256 of its weight file. The base model's is its id plus, for a
local folder (or `tiny`), each file's relative path, byte size and the sha256 of its first and last
MiB: a replaced or re-downloaded model of another content changes it, and reading a few MiB of a
4 GB model costs nothing beside sampling.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PROVENANCE_FILE = "provenance.json"
PROVENANCE_VERSION = 1  # raise when a change of code changes the pixels of the same record
EDGE = 2**20  # bytes hashed at each end of a base-model file


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_fingerprint(folder: Path) -> str:
    """sha256 over each file of a model folder: relative path, size, first and last MiB."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(EDGE)
            handle.seek(max(size - EDGE, 0))
            tail = handle.read(EDGE)
        digest.update(f"{path.relative_to(folder).as_posix()}\t{size}\n".encode())
        digest.update(hashlib.sha256(head + tail).digest())
    return digest.hexdigest()


def base_fingerprint(base: str | None, tiny_dir: Path) -> str | None:
    """The base model's content fingerprint where it is a folder here; None for a hub id (the id is
    recorded) or a model that cannot be found (generation then refuses it with its own message)."""
    if base is None:
        return None
    from workflow_scripts.models.base_model import resolve_pretrained
    from workflow_scripts.common.errors import ModelNotFoundError

    try:
        resolved = Path(resolve_pretrained(base, tiny_dir))
    except ModelNotFoundError:
        return None
    return folder_fingerprint(resolved) if resolved.is_dir() else None


def generation_record(settings: dict[str, Any], *, lora_sha256: str | None, base: str | None, base_print: str | None,
                      prompt: str, resolution: int, dtype: str) -> dict[str, Any]:
    """The record of one key: `settings` is the effective `generation:` section (config plus flags)."""
    return {"version": PROVENANCE_VERSION, "lora_sha256": lora_sha256, "base_model": base,
            "base_fingerprint": base_print, "prompt": prompt, "negative_prompt": settings["negative_prompt"] or "",
            "steps": int(settings["num_inference_steps"]), "guidance": float(settings["guidance_scale"]),
            "scheduler": settings["scheduler"], "seed": int(settings["seed"]), "resolution": int(resolution),
            "dtype": dtype}


def read_record(key_dir: Path) -> dict[str, Any] | None:
    """The recorded provenance, or None where there is none or it cannot be read (both: remake)."""
    try:
        record = json.loads((key_dir / PROVENANCE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def changed_fields(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    if old is None:
        return ["no provenance record"]
    return [name for name in new if old.get(name) != new[name]] + [name for name in old if name not in new]


def write_record(key_dir: Path, record: dict[str, Any]) -> None:
    partial = key_dir / (PROVENANCE_FILE + ".partial")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(partial, key_dir / PROVENANCE_FILE)


def reconcile_key(key_dir: Path, key: str, record: dict[str, Any]) -> int:
    """Keep the key's images when they were made under `record`; else remove them (with a note) and
    write `record`. Returns the number of images removed."""
    key_dir.mkdir(parents=True, exist_ok=True)
    old = read_record(key_dir)
    changed = changed_fields(old, record)
    if not changed:
        return 0
    images = sorted(key_dir.glob(f"{key}_*.png"))
    if images:
        print(f"{key}: {len(images)} existing image(s) were not made by this LoRA and these settings "
              f"({', '.join(changed)}): made again", file=sys.stderr)
    for image in images:
        image.unlink()
    (key_dir / "generation_results.csv").unlink(missing_ok=True)
    write_record(key_dir, record)
    return len(images)


def refresh_stale_images(config: dict[str, Any], jobs: Sequence[tuple], checkpoint: Path | None, output_dir: Path, *,
                         tiny_dir: Path, pretrained: str | None = None, sampling: dict[str, Any] | None = None) -> int:
    """Before `generation.generate` with the same arguments: remove each job's images that another
    LoRA, base model, prompt or sampling setting made, so that generation makes them again.
    `checkpoint` None: the base model alone (`pretrained`), recorded as LoRA None. Returns the number removed."""
    import torch

    from workflow_scripts.generation.pipeline import generation_dtype, lora_checkpoint
    from workflow_scripts.lora.lora_checkpoints import LORA_FILE

    settings = {**config["generation"], **{key: value for key, value in (sampling or {}).items() if value is not None}}
    lora_dir, recorded_base = lora_checkpoint(checkpoint) if checkpoint is not None else (None, None)
    base = pretrained or recorded_base
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = str(generation_dtype(settings["dtype"], device)).removeprefix("torch.")
    base_print, lora_sha256 = base_fingerprint(base, tiny_dir), file_sha256(lora_dir / LORA_FILE) if lora_dir else None
    removed = 0
    for key, _labels, prompt, _count in jobs:
        record = generation_record(settings, lora_sha256=lora_sha256, base=base, base_print=base_print,
                                   prompt=prompt, resolution=config["model"]["resolution"], dtype=dtype)
        removed += reconcile_key(Path(output_dir) / key, key, record)
    return removed
