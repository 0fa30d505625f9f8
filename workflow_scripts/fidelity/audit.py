"""Memorization audit: is any synthetic image a (slightly altered) copy of a training image?

    python -m workflow_scripts.fidelity.audit --config config/config.yaml \\
        --train results/data/train.csv --val results/data/val.csv --test results/data/test.csv \\
        --synthetic results/synthetic/generation_results.csv --out-dir results/evaluation

Similarity: every image goes through the LoRA training transform (to model.resolution), one
antialiased resize to `evaluation.audit_size` px, and is compared by normalised cross-correlation
(NCC: zero mean, unit norm, so brightness and contrast changes, and mild gamma, barely move it)
maximised over shifts of up to `evaluation.audit_max_shift` px and slight zooms (0-5 % cropped a side).
Distance = 1 - max NCC, against every training image (exhaustive, in blocks of bounded memory on a
GPU or CPU: fidelity/audit_search.py; its cost is printed before it starts).

Calibration: the threshold is the `evaluation.audit_quantile` percentile of the distances from each
real *val* image (other patients, never trained on) to its nearest training image. A synthetic image
closer to a training image than that is flagged. The pipeline checks itself on every run:
perturbed copies of training images (1-2 px shift, ±10 % brightness, gamma 0.8-1.2, 2-5 % crop)
should be flagged, real *test* images (not used to calibrate) should mostly not be.

Outputs in <out-dir>/audit/: flagged.csv (column `file` as in generation_results.csv), audit.csv
(every synthetic image, its nearest training image and distance), pairs/ (the top-k closest pairs
side by side) and pairs.csv; <out-dir>/audit_summary.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from workflow_scripts.common import paths
from workflow_scripts.common.errors import DataError, run_stage
from workflow_scripts.common.config import add_config_arguments, config_from_args, config_hash
from workflow_scripts.fidelity.audit_search import (DEFAULT_BLOCK_MB, describe_cost, estimate_seconds,
                                                    nearest_aligned, search_cost)
from workflow_scripts.fidelity.features import ModelImages, resize_antialiased
from workflow_scripts.common.tables import Splits, add_split_arguments, load_split, read_generation_results, split_path, splits_from_args
CONTROL_KINDS = ("shift", "brightness", "gamma", "crop")
AUDIT_COLUMNS = ["file", "labels", "nearest_train", "distance", "ncc", "flagged"]
QUANTILES = (0, 1, 5, 25, 50, 75, 100)


# ----------------------------------------------------------------------------- images


def thumbnails_from_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 1, R, R) in [0, 1] -> (N, size, size) float32, one antialiased resize."""
    return resize_antialiased(images.float(), size)[:, 0]


def thumbnails(paths: Sequence[str | Path], resolution: int, size: int, batch_size: int = 64,
               num_workers: int = 0) -> torch.Tensor:
    """Every image through the training transform to `resolution`, then to `size` px."""
    if not paths:
        return torch.empty((0, size, size))
    loader = torch.utils.data.DataLoader(ModelImages(paths, resolution), batch_size=batch_size, num_workers=num_workers)
    return torch.cat([thumbnails_from_images(batch, size) for batch in loader])


def perturb(image: torch.Tensor, kind: str, rng: np.random.Generator) -> tuple[torch.Tensor, str]:
    """A slightly altered copy of one (1, R, R) image in [0, 1], and what was done."""
    side = image.shape[-1]
    if kind == "shift":
        dy, dx = (int(rng.integers(1, 3)) * int(rng.choice([-1, 1])) for _ in range(2))
        padded = F.pad(image[None], (2, 2, 2, 2), mode="replicate")[0]
        return padded[:, 2 - dy:2 - dy + side, 2 - dx:2 - dx + side], f"shift {dy:+d},{dx:+d} px"
    if kind == "brightness":
        factor = float(rng.uniform(0.9, 1.1))
        return (image * factor).clamp(0, 1), f"brightness x{factor:.3f}"
    if kind == "gamma":
        gamma = float(rng.uniform(0.8, 1.2))
        return image.clamp(0, 1) ** gamma, f"gamma {gamma:.3f}"
    if kind == "crop":
        fraction = float(rng.uniform(0.02, 0.05))
        margin = max(1, round(side * fraction))
        cropped = image[:, margin:side - margin, margin:side - margin]
        return F.interpolate(cropped[None], size=(side, side), mode="bilinear", align_corners=False, antialias=True)[0], \
            f"crop {margin} px a side"
    raise ValueError(f"unknown perturbation {kind!r}; choose from {CONTROL_KINDS}")


def planted_copies(images: torch.Tensor, seed: int) -> tuple[torch.Tensor, list[str]]:
    """One perturbed copy per image, the kinds taken in turn."""
    rng = np.random.default_rng(seed)
    copies, notes = [], []
    for index, image in enumerate(images):
        copy, note = perturb(image, CONTROL_KINDS[index % len(CONTROL_KINDS)], rng)
        copies.append(copy)
        notes.append(note)
    return (torch.stack(copies) if copies else images[:0]), notes


# ----------------------------------------------------------------------------- similarity


def search_all(queries: dict[str, torch.Tensor], train: torch.Tensor, max_shift: int, device: str,
               block_mb: int) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, Any]]:
    """One pass over the training thumbnails for every query set, its cost printed before it starts:
    per set, (nearest training index, distance); and the search's counted cost."""
    everything = torch.cat(list(queries.values()))
    size = int(train.shape[-1])
    cost = search_cost(len(everything), len(train), size, max_shift)
    # Large searches also get a time estimate (its measurement takes a second or two).
    estimate = estimate_seconds(cost, size, max_shift, device, block_mb << 20) if cost["multiply_adds"] > 1e11 else None
    print(describe_cost(cost, estimate, str(device)), flush=True)
    index, distance = nearest_aligned(everything, train, max_shift, device=device, block_bytes=block_mb << 20,
                                      progress=True)
    bounds = np.cumsum([0] + [len(q) for q in queries.values()])
    return {name: (index[a:b], distance[a:b]) for name, a, b in zip(queries, bounds[:-1], bounds[1:])}, cost


def calibrated_threshold(real_floor: np.ndarray, quantile_percent: float) -> float:
    """The `quantile_percent` percentile of real val -> train nearest-neighbour distances."""
    if len(real_floor) == 0:
        raise DataError("the audit needs real val images to calibrate its threshold; the val split is empty")
    return float(np.percentile(real_floor, quantile_percent))


# ----------------------------------------------------------------------------- outputs


def _font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def save_pair(left: torch.Tensor, right: torch.Tensor, captions: tuple[str, str], out_path: Path, panel: int = 256) -> Path:
    """Two (R, R) images in [0, 1] side by side, `panel` px each, with a caption strip under each."""
    strip = 34
    canvas = Image.new("L", (2 * panel, panel + strip), color=0)
    draw = ImageDraw.Draw(canvas)
    for column, (image, caption) in enumerate(zip((left, right), captions)):
        pixels = (image.clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
        canvas.paste(Image.fromarray(pixels).resize((panel, panel), Image.Resampling.BILINEAR), (column * panel, 0))
        for line_number, line in enumerate(caption.split("\n")[:2]):
            draw.text((column * panel + 4, panel + 3 + 15 * line_number), line[:48], fill=255, font=_font(11))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_path, format="PNG")
    return out_path


def _draw(n: int, k: int, seed: int) -> np.ndarray:
    """k of range(n) without replacement (all when k >= n), sorted."""
    return np.arange(n) if k >= n else np.sort(np.random.default_rng(seed).choice(n, k, replace=False))


def _quantiles(values: np.ndarray) -> dict[str, float]:
    return {f"q{q}": float(np.percentile(values, q)) for q in QUANTILES} if len(values) else {}


def _rate(flags: np.ndarray) -> dict[str, Any]:
    return {"n": int(len(flags)), "flagged": int(flags.sum()), "rate": float(flags.mean()) if len(flags) else None}


# ----------------------------------------------------------------------------- the audit


def audit(config: dict[str, Any], data_dir: Splits, synthetic_csv: str | Path, out_dir: str | Path,
          device: str = "cpu", num_workers: int = 0, block_mb: int = DEFAULT_BLOCK_MB) -> dict[str, Any]:
    """Run the calibrated audit; write flagged.csv, audit.csv, pairs/ and audit_summary.json. The
    search works in blocks of about `block_mb` MiB on `device`; its cost is printed before it starts."""
    evaluation = config["evaluation"]
    resolution, size = int(config["model"]["resolution"]), int(evaluation["audit_size"])
    max_shift, quantile = int(evaluation["audit_max_shift"]), float(evaluation["audit_quantile"])
    seed = int(evaluation["seed"])
    out_dir = Path(out_dir)
    audit_dir = out_dir / "audit"
    if audit_dir.exists():
        shutil.rmtree(audit_dir)  # our own output: stale pairs of an earlier run must not linger
    audit_dir.mkdir(parents=True)

    train, val, test = (load_split(data_dir, split) for split in ("train", "val", "test"))
    if train.empty:
        raise DataError(f"{split_path(data_dir, 'train')}: no training images")
    synthetic = read_generation_results(synthetic_csv)

    def thumbs(paths: list[str]) -> torch.Tensor:
        return thumbnails(paths, resolution, size, num_workers=num_workers)

    train_t = thumbs(train["path"].tolist())
    # Planted copies: perturbed training images, for the self-check below.
    rng = np.random.default_rng(seed)
    control_rows = np.sort(rng.choice(len(train), min(int(evaluation["audit_controls"]), len(train)), replace=False))
    originals = torch.stack([ModelImages(train["path"].tolist(), resolution)[i] for i in control_rows]) \
        if len(control_rows) else torch.empty((0, 1, resolution, resolution))
    copies, notes = planted_copies(originals, seed)
    # Calibration on (at most audit_calibration_images) val images, the negative control on as
    # many test images as there are planted copies: the search costs n_queries x n_train.
    val_rows = _draw(len(val), int(evaluation["audit_calibration_images"]), seed + 1)
    test_rows = _draw(len(test), int(evaluation["audit_controls"]), seed + 2)
    queries = {"val": thumbs(val["path"].iloc[val_rows].tolist()), "synthetic": thumbs(synthetic["path"].tolist()),
               "copies": thumbnails_from_images(copies, size), "test": thumbs(test["path"].iloc[test_rows].tolist())}
    found, cost = search_all(queries, train_t, max_shift, device, block_mb)

    floor = found["val"][1]
    threshold = calibrated_threshold(floor, quantile)
    syn_index, syn_distance = found["synthetic"]
    flagged = syn_distance < threshold
    # Self-checks with the threshold just computed: planted copies must be caught, held-out real
    # test images (not used to calibrate) must not.
    copy_index, copy_distance = found["copies"]
    copy_flags = copy_distance < threshold
    test_distance = found["test"][1]

    table = pd.DataFrame({
        "file": synthetic["file"].tolist(), "labels": synthetic["labels"].tolist(),
        "nearest_train": [train["path"].iloc[i] for i in syn_index], "distance": syn_distance,
        "ncc": 1.0 - syn_distance, "flagged": flagged,
    })[AUDIT_COLUMNS]
    table.to_csv(audit_dir / "audit.csv", index=False)
    table[table["flagged"]].assign(reason=f"distance < {threshold:.6g} (the {quantile:g}% quantile of real val->train)") \
        .drop(columns="flagged").to_csv(audit_dir / "flagged.csv", index=False)
    pairs = save_top_pairs(table, synthetic["path"].tolist(), int(evaluation["audit_top_k"]), resolution, audit_dir)

    by_kind = {kind: _rate(copy_flags[[i for i, note in enumerate(notes) if note.startswith(kind)]])
               for kind in CONTROL_KINDS}
    summary = {
        "n": int(len(table)),
        "flagged": int(flagged.sum()),
        "thresholds": {"distance": threshold, "quantile_percent": quantile,
                       "calibration": f"{quantile:g}% quantile of {len(floor)} real val -> train nearest-neighbour distances"},
        "similarity": f"1 - max normalised cross-correlation over shifts of up to {max_shift} px, {size} px thumbnails "
                      f"of the {resolution} px training transform",
        "n_real_train": int(len(train)),
        "search": {key: cost[key] for key in ("queries", "references", "windows", "multiply_adds")},
        "real_floor_quantiles": _quantiles(floor),
        "synthetic_quantiles": _quantiles(syn_distance),
        "positive_control": {**_rate(copy_flags), "what": "perturbed copies of training images", "by_kind": by_kind,
                             "nearest_is_source": float(np.mean(copy_index == control_rows))
                             if len(control_rows) else None},
        "negative_control": {**_rate(test_distance < threshold), "what": "real test images (not used to calibrate)"},
        "pairs": pairs,
        "files": {"flagged": str(audit_dir / "flagged.csv"), "audit": str(audit_dir / "audit.csv"),
                  "pairs": str(audit_dir / "pairs")},
        "seed": seed,
        "config_hash": config_hash(evaluation),
    }
    (out_dir / "audit_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def save_top_pairs(table: pd.DataFrame, synthetic_paths: list[str], k: int, resolution: int, audit_dir: Path
                   ) -> list[dict[str, Any]]:
    """The k synthetic images closest to a training image, each beside it, for a human to judge."""
    rows = []
    for rank, row in enumerate(np.argsort(table["distance"].to_numpy(), kind="stable")[:k], start=1):
        record = table.iloc[row]
        synthetic_image = ModelImages([synthetic_paths[row]], resolution)[0][0]
        train_image = ModelImages([record["nearest_train"]], resolution)[0][0]
        png = save_pair(synthetic_image, train_image, (
            f"synthetic: {Path(record['file']).name}\n{'FLAGGED' if record['flagged'] else 'not flagged'}",
            f"nearest train: {Path(record['nearest_train']).name}\ndistance {record['distance']:.4f}"),
            audit_dir / "pairs" / f"rank{rank:03d}_{Path(record['file']).stem}.png")
        rows.append({"rank": rank, "file": record["file"], "nearest_train": record["nearest_train"],
                     "distance": float(record["distance"]), "flagged": bool(record["flagged"]), "png": str(png)})
    pd.DataFrame(rows, columns=["rank", "file", "nearest_train", "distance", "flagged", "png"]).to_csv(
        audit_dir / "pairs.csv", index=False)
    return rows


@run_stage
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    add_split_arguments(parser, ["train", "val", "test"])
    parser.add_argument("--synthetic", type=Path, default=Path(paths.GENERATED))
    parser.add_argument("--out-dir", type=Path, default=Path(paths.EVALUATION))
    parser.add_argument("--device", default=None, help="cuda, cuda:0 or cpu (default: cuda if available)")
    parser.add_argument("--block-mb", type=int, default=DEFAULT_BLOCK_MB,
                        help=f"working memory of one block of the search on the device, MiB (default {DEFAULT_BLOCK_MB})")
    args = parser.parse_args(argv)
    config = config_from_args(args, "audit_memorization")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    summary = audit(config, splits_from_args(args, ["train", "val", "test"]), args.synthetic, args.out_dir, device=device, block_mb=args.block_mb)
    positive, negative = summary["positive_control"], summary["negative_control"]
    print(f"audit: {summary['flagged']} of {summary['n']} synthetic images flagged "
          f"(distance < {summary['thresholds']['distance']:.4g}, {summary['thresholds']['calibration']}); "
          f"planted copies flagged {positive['flagged']}/{positive['n']}, real test images {negative['flagged']}/{negative['n']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
