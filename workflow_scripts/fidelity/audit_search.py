"""The memorization audit's search, at any size: for each query thumbnail, the nearest reference
thumbnail by normalised cross-correlation (NCC) maximised over shifts and slight zooms.

Exhaustive, no candidate pre-selection (look-alike radiographs defeat coarse retrieval, and a
missed source would be a missed copy). Every shifted or zoomed window of a reference is normalised
on its own (zero mean, unit norm), so each is its own vector and the search is one matrix product
per block: query centre windows (Q, W²) x reference windows (W², R x n_windows), then a maximum
over windows and references. An FFT gives every shift of one pair at once but unnormalised, and
needs a transform per pair; the product of normalised windows costs the same multiply-adds and
runs at the BLAS/cuBLAS peak on CPU and GPU alike.

Memory is bounded by `block_bytes`: the reference block's windows and the query block's scores
each take at most half of it, whatever the number of images (the thumbnails themselves stay on the
host; only blocks go to the device). Arithmetic is float32 throughout (no TF32), so a search gives
the same nearest image and the same distance (to float rounding) whatever the block size.

    python -m workflow_scripts.fidelity.audit_search --queries 22400 --references 10000
        # the cost of a search that size: counted multiply-adds, and seconds from measured rates
    python -m workflow_scripts.fidelity.audit_search --queries 2000 --references 1000 --run
        # run a search that size on random thumbnails: measured throughput and peak memory
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from workflow_scripts.common.errors import ConfigError, DataError, run_stage

ZOOMS = (0.0, 0.02, 0.035, 0.05)  # fractions cropped from each side of a reference: a cropped copy is a zoomed one
DEFAULT_BLOCK_MB = 512
FLOAT = 4  # bytes of a float32


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Rows zero-mean and unit-norm (NCC = dot product of two such rows)."""
    x = x.reshape(*x.shape[:-2], -1) if x.dim() >= 3 else x
    x = x - x.mean(dim=-1, keepdim=True)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def zoom_margins(size: int) -> list[int]:
    """Pixels cropped from each side of a reference, one per distinct zoom of ZOOMS."""
    return sorted({round(size * zoom) for zoom in ZOOMS})


def window_side(size: int, max_shift: int) -> int:
    side = size - 2 * int(max_shift)
    if side < 4:
        raise ConfigError(f"evaluation.audit_max_shift {max_shift} leaves no window in {size} px thumbnails")
    return side


def n_windows(size: int, max_shift: int) -> int:
    """Windows per reference: every offset in [0, 2 max_shift]², for every zoom."""
    return len(zoom_margins(size)) * (2 * int(max_shift) + 1) ** 2


def search_cost(n_query: int, n_reference: int, size: int, max_shift: int) -> dict[str, Any]:
    """Counted work of a search: one multiply-add per pixel of a window, per window, per pair."""
    side, windows = window_side(size, max_shift), n_windows(size, max_shift)
    multiply_adds = int(n_query) * int(n_reference) * windows * side * side
    return {"queries": int(n_query), "references": int(n_reference), "windows": windows, "window_side": side,
            "multiply_adds": multiply_adds, "flop": 2 * multiply_adds}


def block_sizes(size: int, max_shift: int, block_bytes: int, n_reference: int | None = None) -> tuple[int, int]:
    """(queries, references) per block so that the reference windows (with the reference block and
    its temporaries) fit half of `block_bytes` and the query block's scores the other half."""
    side, windows = window_side(size, max_shift), n_windows(size, max_shift)
    half = max(1, int(block_bytes) // 2)
    references = max(1, half // (FLOAT * (windows * side * side + 4 * size * size)))
    references = min(references, n_reference) if n_reference else references
    queries = max(1, half // (FLOAT * (references * (windows + 1) + side * side)))
    return queries, references


def reference_windows(reference: torch.Tensor, max_shift: int) -> torch.Tensor:
    """(R, S, S) references -> (R * n_windows, W²) unit-normalised windows, reference-major: every
    offset window in [0, 2 max_shift]² and, per zoom, after cropping that fraction from each side
    and resizing back (antialiased bilinear). Normalised in place: no temporaries of their size."""
    count, size = reference.shape[0], reference.shape[-1]
    m, side = int(max_shift), window_side(reference.shape[-1], max_shift)
    offsets = (2 * m + 1) ** 2
    out = torch.empty((count, n_windows(size, m), side * side), dtype=torch.float32, device=reference.device)
    for zoom, margin in enumerate(zoom_margins(size)):
        if margin:
            cropped = reference[:, None, margin:size - margin, margin:size - margin]
            scaled = F.interpolate(cropped, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[:, 0]
        else:
            scaled = reference
        windows = out[:, zoom * offsets:(zoom + 1) * offsets]                 # (R, offsets, W²), dy-major
        windows.copy_(scaled.unfold(1, side, 1).unfold(2, side, 1).reshape(count, offsets, side * side))
        windows.sub_(windows.mean(dim=-1, keepdim=True))
        windows.div_(windows.norm(dim=-1, keepdim=True).clamp_min(1e-8))
    return out.reshape(count * out.shape[1], side * side)


def centre_windows(query: torch.Tensor, max_shift: int) -> torch.Tensor:
    """(N, S, S) queries -> (N, W²) unit-normalised centre windows."""
    size, m = query.shape[-1], int(max_shift)
    return _unit(query[:, m:size - m, m:size - m])


def nearest_aligned(query: torch.Tensor, reference: torch.Tensor, max_shift: int,
                    device: str | torch.device = "cpu", block_bytes: int = DEFAULT_BLOCK_MB << 20,
                    progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """For each query thumbnail (N, S, S): index of the nearest reference thumbnail and the distance
    1 - max NCC, the maximum over shifts of up to `max_shift` px and slight zooms (the query's centre
    window against every offset window of every reference, cropped 0-5 % a side). Ties go to the
    lowest reference index. Working memory on `device` stays within about `block_bytes`."""
    if len(reference) == 0:
        raise DataError("the audit needs at least one training image")
    size, m = int(query.shape[-1]), int(max_shift)
    windows = n_windows(size, m)
    q_block, r_block = block_sizes(size, m, block_bytes, len(reference))
    best = torch.full((len(query),), -2.0)
    where = torch.zeros(len(query), dtype=torch.long)
    with tqdm(total=len(query) * len(reference), unit="pair", unit_scale=True, desc="audit search",
              disable=not progress, mininterval=5) as bar:
        for q_start in range(0, len(query), q_block):
            q = centre_windows(query[q_start:q_start + q_block].to(device).float(), m)         # (Q, W²)
            q_best = torch.full((len(q),), -2.0, device=q.device)
            q_where = torch.zeros(len(q), dtype=torch.long, device=q.device)
            for r_start in range(0, len(reference), r_block):
                refs = reference[r_start:r_start + r_block].to(device).float()
                scores = q @ reference_windows(refs, m).T                                      # (Q, R * windows)
                score, index = scores.view(len(q), len(refs), windows).amax(dim=2).max(dim=1)
                del scores
                better = score > q_best
                q_best, q_where = torch.where(better, score, q_best), torch.where(better, index + r_start, q_where)
                bar.update(len(q) * len(refs))
            best[q_start:q_start + len(q)], where[q_start:q_start + len(q)] = q_best.cpu(), q_where.cpu()
    return where.numpy(), np.clip((1.0 - best).double().numpy(), 0.0, 2.0)


# ----------------------------------------------------------------------------- cost and throughput


def _timed(run, device: str | torch.device) -> float:
    start = time.perf_counter()
    run()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def estimate_seconds(cost: dict[str, Any], size: int, max_shift: int, device: str | torch.device = "cpu",
                     block_bytes: int = DEFAULT_BLOCK_MB << 20) -> tuple[float, float]:
    """(seconds, multiply-adds/s of the block product) for a search of `cost`'s size on `device`,
    from two measurements on random thumbnails: the windows of a few references (built once per
    query block) and one block product (the bulk of the work). About a second or two on a CPU."""
    q_block, r_block = block_sizes(size, max_shift, block_bytes, cost["references"])
    generator = torch.Generator().manual_seed(0)
    references = torch.rand((min(r_block, 16), size, size), generator=generator).to(device)
    queries = centre_windows(torch.rand((min(q_block, 256), size, size), generator=generator).to(device), max_shift)
    reference_windows(references[:1], max_shift)  # warm-up
    per_reference = _timed(lambda: reference_windows(references, max_shift), device) / len(references)
    windows = reference_windows(references, max_shift)
    (queries @ windows.T).amax(dim=1)  # warm-up
    product = _timed(lambda: (queries @ windows.T).view(len(queries), len(references), -1).amax(dim=2).max(dim=1), device)
    rate = queries.shape[0] * windows.shape[0] * windows.shape[1] / product
    query_blocks = math.ceil(cost["queries"] / q_block)
    return query_blocks * cost["references"] * per_reference + cost["multiply_adds"] / rate, rate


def describe_cost(cost: dict[str, Any], estimate: tuple[float, float] | None = None, device: str = "") -> str:
    """One line: the search's counted work, and the estimate of `estimate_seconds` if given."""
    text = (f"audit search: {cost['queries']:,} queries x {cost['references']:,} training images x "
            f"{cost['windows']} windows of {cost['window_side']}² px = {cost['multiply_adds']:.3g} multiply-adds "
            f"({cost['flop'] / 1e12:.3g} TFLOP)")
    if estimate:
        seconds, rate = estimate
        text += (f"; about {format_seconds(seconds)} on {device or 'this device'} "
                 f"(block product measured at {2 * rate / 1e9:.3g} GFLOP/s)")
    return text


def format_seconds(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def peak_rss_growth(run) -> tuple[Any, int | None]:
    """Run `run()` and return (its result, growth of the process's peak resident memory in bytes),
    resetting the kernel's high-water mark first (/proc/self/clear_refs); None where unsupported."""
    def status(key: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return run(), None
    before = status("VmRSS")
    result = run()
    peak = status("VmHWM")
    return result, (peak - before) if peak is not None and before is not None else None


@run_stage
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, required=True, help="synthetic + calibration + control images")
    parser.add_argument("--references", type=int, required=True, help="training images")
    parser.add_argument("--size", type=int, default=64, help="evaluation.audit_size")
    parser.add_argument("--max-shift", type=int, default=3, help="evaluation.audit_max_shift")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--block-mb", type=int, default=DEFAULT_BLOCK_MB, help="working memory of one block, MiB")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--run", action="store_true", help="run the search on random thumbnails and time it")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    block = args.block_mb << 20
    cost = search_cost(args.queries, args.references, args.size, args.max_shift)
    estimate = estimate_seconds(cost, args.size, args.max_shift, device, block)
    print(describe_cost(cost, estimate, f"{device}, {torch.get_num_threads()} threads"), flush=True)
    print(f"blocks: {block_sizes(args.size, args.max_shift, block)} (queries, references) for --block-mb {args.block_mb}")
    if args.run:
        generator = torch.Generator().manual_seed(1)
        query = torch.rand((args.queries, args.size, args.size), generator=generator)
        reference = torch.rand((args.references, args.size, args.size), generator=generator)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        _, growth = peak_rss_growth(lambda: nearest_aligned(query, reference, args.max_shift, device, block, progress=True))
        elapsed = time.perf_counter() - start
        memory = (f"peak device memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB" if device.startswith("cuda")
                  else f"peak host memory growth {growth / 2**20:.0f} MiB" if growth is not None else "")
        print(f"ran: {format_seconds(elapsed)}, {2 * cost['multiply_adds'] / elapsed / 1e9:.3g} GFLOP/s; {memory} "
              f"(inputs {(query.numel() + reference.numel()) * FLOAT / 2**20:.0f} MiB on the host, block budget {args.block_mb} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
