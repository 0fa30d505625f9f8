"""The noise control's images: the null generator, one noise image per generated image.

    python -m workflow_scripts.generation.noise_images --synthetic results/synthetic/generation_results.csv \\
        --train results/data/train.csv --output-dir results/synthetic_noise

Each generated image (a row of generation_results.csv) gets a noise image of the same size at
`<output-dir>/<key>/<name>.png`, drawn from its recorded `seed`: independent Gaussian pixels with the
mean and standard deviation of the real training images' pixels (measured on up to 256 of them,
resized to the generated size), rounded and clipped to 8-bit grayscale. Matching the intensity
statistics keeps the classifier's input range as with real images, so the noise arm differs from the
synthetic arm in content only. `<output-dir>/generation_results.csv` lists them with the same columns
and rows (same labels, prompt and seed, in the same order) plus `source_file`, the generated image
each one replaces; the noise arm draws from it with the same function and seed as the largest
synthetic arm, so it mirrors that arm row for row. `noise_summary.json` records the statistics.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from workflow_scripts.common import paths
from workflow_scripts.common.errors import DataError, run_stage
from workflow_scripts.common.config import add_config_arguments, config_from_args
from workflow_scripts.common.images import read_xray
from workflow_scripts.common.tables import (RESULT_COLUMNS, add_split_arguments, load_split, read_generation_results,
                                            save_png_atomically, splits_from_args)

MAX_REAL_IMAGES = 256


def intensity_stats(paths: Sequence[str], size: tuple[int, int], max_images: int = MAX_REAL_IMAGES) -> dict[str, Any]:
    """Mean and standard deviation (0-255 scale) of the pixels of up to `max_images` images (evenly
    spaced through `paths`), each read as grayscale and resized to `size` (width, height)."""
    if not paths:
        raise DataError("no real training image to measure the noise images' intensity on")
    chosen = [paths[i] for i in np.unique(np.linspace(0, len(paths) - 1, min(max_images, len(paths))).round().astype(int))]
    pixels = np.concatenate([
        np.asarray(read_xray(path).convert("L").resize(size, Image.BILINEAR), dtype=np.float64).ravel() for path in chosen])
    return {"mean": float(pixels.mean()), "std": float(pixels.std()), "real_images_measured": len(chosen),
            "measured_at": list(size)}


def noise_image(seed: int, size: tuple[int, int], mean: float, std: float) -> np.ndarray:
    """(height, width) uint8 Gaussian noise N(mean, std^2), rounded and clipped, from np.random.default_rng(seed)."""
    width, height = size
    values = np.random.default_rng(int(seed)).normal(mean, std, size=(height, width))
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def make_noise_images(generated: pd.DataFrame, real_paths: Sequence[str], out_dir: Path,
                      show_progress: bool = True) -> tuple[pd.DataFrame, dict[str, Any]]:
    """One noise image per row of `generated` (a generation_results.csv read with its `path`
    column); returns the noise list (generation_results columns + source_file) and the statistics."""
    sizes = [Image.open(path).size for path in generated["path"]]  # header only
    common = Counter(sizes).most_common(1)[0][0] if sizes else (64, 64)
    stats = intensity_stats(list(real_paths), common)
    files = [out_dir / Path(file).parent.name / Path(file).name for file in generated["file"]]
    files = [file.with_suffix(".png") for file in files]
    if len(set(files)) != len(files):
        raise DataError("generation_results.csv lists two images with the same folder and file name; "
                        "the noise images would overwrite each other")
    for file, size, seed in tqdm(list(zip(files, sizes, generated["seed"])), desc="noise images", unit="img",
                                 disable=not show_progress, file=sys.stderr):
        file.parent.mkdir(parents=True, exist_ok=True)
        save_png_atomically(noise_image(int(seed), size, stats["mean"], stats["std"]), file)
    noise = pd.DataFrame({
        "file": [str(file) for file in files], "prompt": generated["prompt"].to_numpy(),
        "labels": generated["labels"].to_numpy(), "seed": generated["seed"].to_numpy(), "steps": 0, "guidance": 0.0,
        "scheduler": "noise", "checkpoint": "none (Gaussian noise, the null generator)",
        "source_file": generated["file"].to_numpy(),
    }, columns=[*RESULT_COLUMNS, "source_file"])
    return noise, {"distribution": "independent Gaussian pixels, rounded and clipped to 0-255",
                   "seed": "each image's generation seed", **stats, "images": len(noise)}


@run_stage
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--synthetic", type=Path, default=Path(paths.GENERATED),
                        help="the generated images to mirror")
    add_split_arguments(parser, ["train"])  # the real training images' intensity
    parser.add_argument("--output-dir", type=Path, default=Path(paths.SYNTHETIC_NOISE))
    args = parser.parse_args(argv)
    config_from_args(args, "make_noise_images")  # a bad configuration is refused here as in every stage
    generated = read_generation_results(args.synthetic)
    noise, summary = make_noise_images(generated, load_split(splits_from_args(args, ["train"]), "train")["path"].tolist(), args.output_dir)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    noise.to_csv(args.output_dir / "generation_results.csv", index=False)
    (args.output_dir / "noise_summary.json").write_text(json.dumps({**summary, "mirrors": str(args.synthetic)}, indent=2) + "\n")
    print(f"{len(noise)} noise images (mean {summary['mean']:.1f}, std {summary['std']:.1f}) in {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
