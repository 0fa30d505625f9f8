"""`python -m workflow_scripts.bench --stage classifier`: the classifier's data path, decoding
every film at every step vs the decode-once cache, side by side in one run on NIH-size films.

    python -m workflow_scripts.bench --stage classifier                 # 96 films of 1024² px, 224 px input
    python -m workflow_scripts.bench --stage classifier --quick         # smallest settings (the test)

Films: the dev films (shared/data/cxr-dev, NIH ChestX-ray14, 256 px) upscaled to `--film-size`
(1024: NIH's size) and written as 8-bit PNGs into a scratch folder. Upscaled films are smoother than
real ones, so they decode somewhat faster: the decoding path measured here is, if anything, favoured.

Measured, alternated repeat by repeat (decoded, cached, decoded, ...), each repeat's first batch
untimed (worker start-up, first touch of the cache):
1. data path items/s: the batches of a training schedule turned into the model's normalized input on
   the device: `classifier_cache.decoded_batches` (FilmDataset in `--workers` DataLoader workers,
   what `train_classifier --no-cache` runs) vs `CachedBatches` over `cache_films` (what it runs by
   default). The speed-up is the median of the per-repeat ratios; the last line printed is
   `classifier data path speed-up vs decoding every step: N×`;
2. training items/s: the same batches feeding full optimizer steps of the classifier (timm model,
   random init: speed does not depend on the weights; autocast and channels-last as in training);
3. the one-off cost of building the cache (films/s, all cores).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from workflow_scripts.common.errors import run_stage
from workflow_scripts.classifier.classifier_cache import CachedBatches, FilmStore, cache_films, decoded_batches
from workflow_scripts.bench.machine import report, torch_threads
from workflow_scripts.common.hardware import apply_cuda_levers
from workflow_scripts.classifier.classifier_device import (describe_device, loader_workers, machine_cores,
                                                           precision_for)
from workflow_scripts.classifier.classifier_model import create_model

DEV_FILMS = Path(__file__).resolve().parents[3] / "shared" / "data" / "cxr-dev" / "images"  # beside the repository
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as timm's models use
CLASSES = 14  # NIH ChestX-ray14's findings


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m workflow_scripts.bench --stage classifier",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--films", type=int, default=96, help="distinct films (default 96)")
    parser.add_argument("--film-size", type=int, default=1024, help="side of the PNGs in px (default 1024, NIH's)")
    parser.add_argument("--source", type=Path, default=DEV_FILMS, help="folder of films to upscale")
    parser.add_argument("--image-size", type=int, default=224, help="classifier input side in px (default 224)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=6, help="timed batches per repeat of the data path (default 6)")
    parser.add_argument("--train-steps", type=int, default=3, help="timed optimizer steps per repeat (default 3; 0: skip)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats of each path (default 3)")
    parser.add_argument("--workers", type=int, help="DataLoader workers of the decoding path (default: all cores)")
    parser.add_argument("--model", default="resnet18", help="timm model for the training figures (default resnet18)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, help="CPU threads for torch during the run (default: torch's own)")
    parser.add_argument("--scratch", type=Path, help="folder for the films and the cache (default: a temp dir, removed)")
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    parser.add_argument("--quick", action="store_true", help="smallest settings (for tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.films, args.film_size, args.image_size, args.batch_size = 8, 128, 32, 4
        args.batches, args.train_steps, args.repeats = 2, 1, 2
    for key in ("films", "film_size", "image_size", "batch_size", "batches", "repeats"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1")
    return args


def make_films(source: Path, count: int, size: int, folder: Path) -> list[str]:
    """`count` PNGs of size x size px, the films of `source` upscaled (cycled if there are fewer)."""
    films = sorted(p for p in source.glob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    if not films:
        raise SystemExit(f"error: no PNG/JPEG films in {source}; pass --source with a folder of films")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"film_{i:05d}.png"
        with Image.open(films[i % len(films)]) as image:
            image.convert("L").resize((size, size), Image.Resampling.BICUBIC).save(path)
        paths.append(str(path))
    return paths


def _schedule(n: int, batch_size: int, batches: int, seed: int) -> list[list[int]]:
    """Random batches over n films, as a training schedule draws them (every film once per pass)."""
    rng = np.random.default_rng(seed)
    needed = batches * batch_size
    order = np.concatenate([rng.permutation(n) for _ in range(-(-needed // n))])[:needed]
    return order.reshape(batches, batch_size).tolist()


def _timed(batches, consume, device: torch.device) -> float:
    """Items/s over all batches but the first (start-up), syncing the device before each clock read."""
    started, items = None, 0
    for films, targets in batches:
        consume(films, targets)
        if started is None:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        else:
            items += len(films)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return items / (time.perf_counter() - started)


def _run_pair(args: argparse.Namespace, films: list[str], store: FilmStore, workers: int, batches_per_repeat: int,
              consume, device: torch.device) -> dict[str, Any]:
    """Items/s of the decoding and the cached path, alternated repeat by repeat, and their ratio."""
    targets = np.zeros((len(films), CLASSES), dtype=np.float32)
    rates: dict[str, list[float]] = {"decoded": [], "cached": []}
    for repeat in range(args.repeats):
        order = _schedule(len(films), args.batch_size, batches_per_repeat + 1, seed=repeat)
        rates["decoded"].append(_timed(decoded_batches(films, targets, order, args.image_size, "bicubic", workers),
                                       consume, device))
        rates["cached"].append(_timed(CachedBatches(store, films, targets, order), consume, device))
    ratios = [c / d for c, d in zip(rates["cached"], rates["decoded"])]
    return {"decoded_items_per_second": statistics.median(rates["decoded"]),
            "cached_items_per_second": statistics.median(rates["cached"]),
            "per_repeat": rates, "per_repeat_ratios": ratios, "speedup": statistics.median(ratios)}


def bench_device(args: argparse.Namespace) -> torch.device:
    """--device cuda, or auto where a GPU is present; else the CPU."""
    return torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")


def benchmark(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    device = bench_device(args)
    precision = precision_for(device)
    workers = loader_workers(args.workers if args.workers is not None else machine_cores())
    films = make_films(args.source, args.films, args.film_size, scratch / "films")
    started = time.perf_counter()
    cached = cache_films(films, scratch / "cache", "bench", args.image_size, "bicubic", show_progress=False)
    build_seconds = time.perf_counter() - started
    store = FilmStore({"bench": (films, cached)})
    print(f"classifier benchmark: {len(films)} films of {args.film_size}² px -> {args.image_size} px, batch "
          f"{args.batch_size}, {workers} decoding workers, {describe_device(device)}", file=sys.stderr)

    result: dict[str, Any] = {
        "device": describe_device(device), "precision": precision.describe(), "films": len(films),
        "film_size": args.film_size, "film_megabytes": sum(os.path.getsize(p) for p in films) / len(films) / 1e6,
        "image_size": args.image_size, "batch_size": args.batch_size, "decoding_workers": workers,
        "cores": machine_cores(), "repeats": args.repeats,
        "cache_build": {"seconds": build_seconds, "films_per_second": len(films) / build_seconds,
                        "threads": machine_cores()},
    }
    result["data_path"] = _run_pair(args, films, store, workers, args.batches,
                                    lambda f, t: precision.model_input(f, MEAN, STD), device)
    if args.train_steps:
        result["training"] = {"model": args.model, **_run_pair(
            args, films, store, workers, args.train_steps, _train_step(args, precision), device)}
    return result


def _train_step(args: argparse.Namespace, precision):
    """One optimizer step of the classifier as train_classifier takes it (autocast, scaler, AdamW)."""
    model, _ = create_model(args.model, False, CLASSES)
    model = precision.prepare_model(model).train()
    fused = {"fused": True} if precision.device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **fused)
    scaler, loss_fn = precision.scaler(), torch.nn.BCEWithLogitsLoss()

    def step(films: torch.Tensor, targets: torch.Tensor) -> None:
        images = precision.model_input(films, MEAN, STD)
        with precision.autocast():
            loss = loss_fn(model(images).float(), targets.to(precision.device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return step


def render(result: dict[str, Any]) -> str:
    data, training = result["data_path"], result.get("training")
    model = f"training items/s ({training['model']})" if training else "training items/s"
    lines = [f"## Classifier data path ({result['films']} films of {result['film_size']}² px, "
             f"{result['film_megabytes']:.2f} MB each -> {result['image_size']} px, batch {result['batch_size']}, "
             f"{result['device']}, {result['precision']})", "",
             f"| path | data items/s | {model} |", "|---|---|---|"]
    for key, name in (("decoded", f"decoded every step ({result['decoding_workers']} workers)"),
                      ("cached", "decode-once cache (main process)")):
        shown = f"{training[f'{key}_items_per_second']:.1f}" if training else "skipped"
        lines.append(f"| {name} | {data[f'{key}_items_per_second']:.1f} | {shown} |")
    if training:
        lines.append(f"| speed-up | {data['speedup']:.2f}× | {training['speedup']:.2f}× |")
    build = result["cache_build"]
    lines += ["", f"Cache build (decode once, {build['threads']} threads): {build['films_per_second']:.1f} films/s; "
              f"medians of {result['repeats']} alternated repeats, first batch of each untimed."]
    return "\n".join(lines)


def speedup_line(result: dict[str, Any]) -> str:
    return f"classifier data path speed-up vs decoding every step: {result['data_path']['speedup']:.1f}×"


@run_stage
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="bench-classifier-"))
    cuda = bench_device(args).type == "cuda"
    try:
        with torch_threads(args.threads), apply_cuda_levers(allow_tf32=cuda, cudnn_benchmark=cuda):  # config defaults
            result = benchmark(args, scratch)
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    return report(result, args.json, render(result), speedup_line(result))
