"""From the label file's image names to files on disk, and which of those files a model can use.

A row resolves to exactly one existing file: `dataset.images / <path as written>`. Only for NIH
(whose PNGs ship in images_001/images/ ... images_012/images/) is a name not found there looked up
by file name below the images folder, and only when that name is unique; a name found twice stops
the run with the candidates listed. A missing file is reported missing, never replaced.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from workflow_scripts.images import MIN_SIDE, check_image
from workflow_scripts.labels import DataError

NOT_FOUND = "file not found"


def check_images_root(root: Path) -> None:
    if Path(os.path.realpath(root)) == Path(root.anchor or "/"):
        raise DataError(f"dataset.images: {str(root)!r} is the filesystem root; point it at the folder that holds "
                        "the images (the folder the label file's paths are relative to)")
    if root.is_file():
        raise DataError(f"{root}: is a file, not a folder (dataset.images must be the folder of the images)")
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found (dataset.images)")


def _files_by_name(root: Path) -> dict[str, list[Path]]:
    by_name: dict[str, list[Path]] = {}
    for folder, _, files in os.walk(root):
        for name in files:
            by_name.setdefault(name, []).append(Path(folder) / name)
    return by_name


def resolve_paths(
    frame: pd.DataFrame, root: Path, search_by_name: bool, csv_path: Path
) -> tuple[list[Path | None], list[str | None]]:
    """(file or None, reason it is unusable or None) for every row of `frame` (columns row, image).

    `search_by_name` (NIH): a bare name not found directly under `root` is looked up anywhere below
    it; a name found more than once raises DataError listing the candidates."""
    check_images_root(root)
    paths: list[Path | None] = []
    reasons: list[str | None] = []
    by_name: dict[str, list[Path]] | None = None
    for row, image in zip(frame["row"], frame["image"]):
        direct = root / image
        if direct.is_file():
            paths.append(direct)
            reasons.append(None)
            continue
        if direct.is_dir():
            paths.append(None)
            reasons.append(f"{direct} is a folder, not an image file")
            continue
        if search_by_name and Path(image).name == image:
            by_name = _files_by_name(root) if by_name is None else by_name
            candidates = by_name.get(image, [])
            if len(candidates) > 1:
                listed = ", ".join(str(path) for path in sorted(candidates)[:5])
                raise DataError(
                    f"{csv_path} line {row}: image {image} is not directly under {root} and {len(candidates)} "
                    f"files of that name are below it ({listed}); which one the row means is unknown. "
                    "Remove the copies, or point dataset.images at the folder that holds the right one"
                )
            if candidates:
                paths.append(candidates[0])
                reasons.append(None)
                continue
        paths.append(None)
        reasons.append(NOT_FOUND)
    return paths, reasons


def check_same_files(frame: pd.DataFrame, csv_path: Path) -> None:
    """Refuse two rows that are one file (x.png, ./x.png, sub/../x.png, a symlink to x.png), so one
    film cannot reach two patients or two splits. `frame` has row, image, path (resolved or None)."""
    seen: dict[str, tuple[int, str]] = {}
    for row, image, path in zip(frame["row"], frame["image"], frame["path"]):
        if path is None:
            continue
        real = os.path.realpath(path)
        if real in seen:
            first_row, first_image = seen[real]
            raise DataError(
                f"{csv_path} lines {first_row} and {row}: {first_image} and {image} are the same file ({real}); "
                "keep one row per image"
            )
        seen[real] = (row, image)


def _problem(path: str, decode: bool, min_side: int) -> str | None:
    # Top level so that worker processes can unpickle it.
    if not decode:
        return None if os.path.isfile(path) else NOT_FOUND
    return check_image(path, min_side=min_side)


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def find_bad_images(
    paths: Sequence[Path], decode: bool, min_side: int = MIN_SIDE, workers: int | None = None
) -> list[str | None]:
    """The reason each image is unusable, or None. With several workers, images are decoded in a
    process pool in chunks (decoding is CPU-bound); the result is the same as a serial check."""
    check = functools.partial(_problem, decode=decode, min_side=min_side)
    workers = max(1, workers or default_workers())
    names = [str(path) for path in paths]
    progress = functools.partial(tqdm, total=len(names), desc="checking images", unit="img",
                                 disable=len(names) < 50, file=sys.stderr)
    if workers == 1 or len(names) < 2 * workers or not decode:
        return list(progress(map(check, names)))
    chunksize = max(1, min(64, len(names) // (workers * 4)))
    with ProcessPoolExecutor(workers) as pool:
        return list(progress(pool.map(check, names, chunksize=chunksize)))
