"""The audit's blocked search: the same nearest image and distance as the original exhaustive search
whatever the block size, working memory within the block budget, and its counted cost."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import REPO
from workflow_scripts.fidelity import audit_search
from workflow_scripts.fidelity.audit_search import (block_sizes, n_windows, nearest_aligned, reference_windows,
                                                    search_cost)


# The search as it was before blocking (commit f50c8f5, fidelity/audit.py), kept verbatim as the reference.
def _unit(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(*x.shape[:-2], -1) if x.dim() >= 3 else x
    x = x - x.mean(dim=-1, keepdim=True)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def _windows(reference: torch.Tensor, max_shift: int, zooms: Sequence[float] = (0.0,)) -> Iterator[torch.Tensor]:
    side = reference.shape[-1]
    window = side - 2 * max_shift
    margins = sorted({round(side * zoom) for zoom in zooms})
    for margin in margins:
        if margin:
            flat = reference.reshape(-1, 1, side, side)[:, :, margin:side - margin, margin:side - margin]
            scaled = F.interpolate(flat, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
            scaled = scaled.reshape(reference.shape)
        else:
            scaled = reference
        for dy in range(2 * max_shift + 1):
            for dx in range(2 * max_shift + 1):
                yield _unit(scaled[..., dy:dy + window, dx:dx + window])


def original_nearest_aligned(query: torch.Tensor, reference: torch.Tensor, max_shift: int, chunk: int = 2048
                             ) -> tuple[np.ndarray, np.ndarray]:
    m = int(max_shift)
    side = query.shape[-1]
    q = _unit(query.float()[..., m:side - m, m:side - m])
    best = torch.full((len(q),), -2.0)
    where = torch.zeros(len(q), dtype=torch.long)
    for start in range(0, len(reference), chunk):
        refs = reference[start:start + chunk].float()
        chunk_best = torch.full((len(q), len(refs)), -2.0)
        for r in _windows(refs, m, audit_search.ZOOMS):
            chunk_best = torch.maximum(chunk_best, q @ r.T)
        score, index = chunk_best.max(dim=1)
        better = score > best
        best, where = torch.where(better, score, best), torch.where(better, index + start, where)
    return where.cpu().numpy(), np.clip((1.0 - best).double().cpu().numpy(), 0.0, 2.0)


def smooth_thumbnails(n: int, size: int, seed: int) -> torch.Tensor:
    """Radiograph-like smooth images (look-alikes, as real films are)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand((n, 1, 6, 6), generator=generator)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[:, 0].clamp(0, 1)


@pytest.mark.parametrize("block_bytes", [40_000, 1_000_000, 1 << 30])
def test_the_blocked_search_equals_the_original_search(block_bytes: int) -> None:
    reference = smooth_thumbnails(23, 32, seed=0)
    # Queries: shifted, brightened copies of some references, and unrelated images.
    copies = torch.roll(reference[::3], shifts=(1, -2), dims=(1, 2)) * 0.9
    query = torch.cat([copies, smooth_thumbnails(29, 32, seed=1)])
    queries_per_block, references_per_block = block_sizes(32, 2, block_bytes)
    if block_bytes < 1 << 20:  # really blocked: references (and, in the smallest, queries too)
        assert references_per_block < len(reference) and (block_bytes > 40_000 or queries_per_block < len(query))

    expected_index, expected_distance = original_nearest_aligned(query, reference, 2)
    index, distance = nearest_aligned(query, reference, 2, block_bytes=block_bytes)
    np.testing.assert_array_equal(index, expected_index)
    np.testing.assert_allclose(distance, expected_distance, rtol=0, atol=2e-6)
    assert index[:len(copies)].tolist() == list(range(0, 23, 3))


def test_windows_are_the_shifted_and_zoomed_crops_normalised() -> None:
    reference = smooth_thumbnails(3, 32, seed=2)
    windows = reference_windows(reference, 2).reshape(3, n_windows(32, 2), -1)
    expected = torch.stack(list(_windows(reference, 2, audit_search.ZOOMS)), dim=1)
    torch.testing.assert_close(windows, expected, rtol=0, atol=1e-6)
    assert windows.shape[1] == 3 * 25  # margins 0, 1, 2 px at 32 px (0.02 and 0.035 of 32 round to 1), 5 x 5 shifts


def test_search_cost_counts_the_multiply_adds_the_search_does() -> None:
    reference = smooth_thumbnails(4, 64, seed=3)
    windows = reference_windows(reference, 3)
    cost = search_cost(10, 4, 64, 3)
    assert cost["windows"] == windows.shape[0] // 4 == 4 * 49
    assert cost["multiply_adds"] == 10 * windows.shape[0] * windows.shape[1] and cost["flop"] == 2 * cost["multiply_adds"]


MEMORY_PROBE = textwrap.dedent("""
    import json, sys, torch
    from workflow_scripts.fidelity.audit_search import nearest_aligned, peak_rss_growth
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    query, reference = torch.rand((4000, 16, 16), generator=generator), torch.rand((1000, 16, 16), generator=generator)
    nearest_aligned(query[:50], reference[:50], 0, block_bytes=1 << 20)  # allocator and BLAS warm-up
    _, growth = peak_rss_growth(lambda: nearest_aligned(query, reference, 0, block_bytes=int(sys.argv[1])))
    print(json.dumps({"growth": growth}))
""")


def peak_growth(block_bytes: int) -> int:
    run = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(block_bytes)], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    growth = json.loads(run.stdout.strip().splitlines()[-1])["growth"]
    if growth is None:
        pytest.skip("this kernel cannot reset the peak resident memory (/proc/self/clear_refs)")
    return growth


@pytest.mark.slow  # the full suite's (the quick tier stays under 3 minutes)
def test_working_memory_stays_within_the_block_budget() -> None:
    # One block of everything: 4000 x 1000 x 2 windows of scores (32 MB) alone; in 4 MiB blocks the
    # peak grows by about the budget, whatever the number of images.
    budget = 4 << 20
    small, whole = peak_growth(budget), peak_growth(1 << 30)
    print(f"peak growth: {small / 2**20:.1f} MiB in {budget >> 20} MiB blocks, {whole / 2**20:.1f} MiB in one block")
    assert small < budget + (4 << 20), f"{small / 2**20:.1f} MiB over a {budget / 2**20:.0f} MiB budget"
    assert whole > 30 << 20, f"the measurement sees the unblocked search's memory ({whole / 2**20:.1f} MiB)"


def test_the_cost_command_prints_counted_operations_and_an_estimate(capsys: pytest.CaptureFixture) -> None:
    assert audit_search.main(["--queries", "22400", "--references", "10000", "--block-mb", "16", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "22,400 queries x 10,000 training images x 196 windows of 58² px = 1.48e+14 multiply-adds" in out
    assert "on cpu" in out and "block product measured at" in out
