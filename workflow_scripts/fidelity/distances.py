"""Distances between a synthetic and a real image set, on features of one extractor.

* FID: pytorch-fid's Fréchet distance, reported only where both sets hold at least as many images
  as feature dims (below that the covariance is singular and FID is biased): "n/a (n < d)".
* KID: torchmetrics' unbiased polynomial-kernel MMD² (`poly_mmd`, kernel (x·y/d + 1)³), mean and
  standard deviation over random subsets, seeded; unbiased at small n, so always reported.
* Precision / recall / density / coverage (Naeem et al. 2020) by the `prdc` package.
* Diversity: mean pairwise MS-SSIM (pytorch-msssim) within a set of images; lower = more diverse.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from workflow_scripts.common.cells import finite, significant

KID_SEED = 0


def not_available(n: int, d: int) -> str:
    return f"n/a (n < d: {n} < {d})"


# ----------------------------------------------------------------------------- FID


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance as pytorch-fid's calculate_activation_statistics."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.atleast_2d(np.cov(features, rowvar=False))


def _frechet_numpy(mu1, sigma1, mu2, sigma2, eps: float, offset: bool) -> tuple[float, float]:
    """pytorch-fid's formula without its `disp` argument; returns (value, largest imaginary part)."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    eye = np.eye(sigma1.shape[0]) * (eps if offset else 0.0)
    covmean = linalg.sqrtm((sigma1 + eye).dot(sigma2 + eye))
    imaginary = float(np.max(np.abs(np.imag(covmean)))) if np.iscomplexobj(covmean) else 0.0
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(np.real(covmean))), imaginary


def frechet_distance_with_notes(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> tuple[float, list[str]]:
    """pytorch-fid's `calculate_frechet_distance`, plus what it had to do to get a number. Where
    pytorch-fid itself fails on this SciPy (sqrtm's `disp` removed, 1x1 matrices, imaginary parts),
    the same formula is computed here and the fallback is noted."""
    from pytorch_fid.fid_score import calculate_frechet_distance
    from scipy import linalg

    notes: list[str] = []
    printed = io.StringIO()
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(printed):
            warnings.simplefilter("always")
            value = float(calculate_frechet_distance(mu1, sigma1, mu2, sigma2, eps=eps))
    except (TypeError, ValueError) as error:
        caught = []
        value, imaginary = _frechet_numpy(mu1, sigma1, mu2, sigma2, eps, offset=False)
        if not math.isfinite(value) or imaginary > 1e-3:
            value, imaginary = _frechet_numpy(mu1, sigma1, mu2, sigma2, eps, offset=True)
            notes.append(f"singular covariance product: {eps} added to the diagonal")
        if "Imaginary" in str(error) or imaginary > 1e-3:
            notes.append(f"imaginary part up to {imaginary:.3g} of the matrix square root discarded")
    for warning in caught:
        if issubclass(warning.category, DeprecationWarning) and "disp" in str(warning.message):
            continue  # pytorch-fid's sqrtm(disp=False) on SciPy >= 1.16
        if issubclass(warning.category, linalg.LinAlgWarning):
            notes.append(f"matrix square root: {str(warning.message).split('.')[0].lower()}, the result may be inaccurate")
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    if "singular product" in printed.getvalue():
        notes.append(f"singular covariance product: {eps} added to the diagonal (pytorch-fid)")
    return value, notes


def fid(real: np.ndarray, synthetic: np.ndarray) -> tuple[float | str, list[str]]:
    """FID of two feature sets, or "n/a (n < d: ...)" when the smaller set has fewer images than dims."""
    n, d = min(len(real), len(synthetic)), real.shape[1]
    if n < d or n < 2:
        return not_available(n, d), []
    return frechet_distance_with_notes(*gaussian_stats(real), *gaussian_stats(synthetic))


# ----------------------------------------------------------------------------- KID


def kid(real: np.ndarray, synthetic: np.ndarray, subset_size: int, subsets: int, seed: int = KID_SEED
        ) -> tuple[float, float, int]:
    """(mean, std, subset size m) of torchmetrics' unbiased MMD² over `subsets` random subsets of
    m = min(subset_size, n_real, n_synthetic) images of each set, drawn without replacement."""
    from torchmetrics.image.kid import poly_mmd

    real_t = torch.as_tensor(np.asarray(real, dtype=np.float64))
    syn_t = torch.as_tensor(np.asarray(synthetic, dtype=np.float64))
    m = min(int(subset_size), len(real_t), len(syn_t))
    if m < 2:
        raise ValueError(f"KID needs at least 2 images per set (n_real={len(real_t)}, n_synthetic={len(syn_t)})")
    if m == len(real_t) == len(syn_t):  # every "subset" is the whole set: one value, no spread
        return float(poly_mmd(real_t, syn_t)), 0.0, m
    rng = np.random.default_rng(seed)
    values = np.array([
        float(poly_mmd(real_t[rng.choice(len(real_t), m, replace=False)], syn_t[rng.choice(len(syn_t), m, replace=False)]))
        for _ in range(int(subsets))
    ])
    return float(values.mean()), float(values.std()), m


# ----------------------------------------------------------------------------- PRDC


def prdc(real: np.ndarray, synthetic: np.ndarray, nearest_k: int) -> dict[str, float] | str:
    """precision, recall, density, coverage (the `prdc` package, k nearest neighbours in the real
    set); "n/a ..." unless each set holds more than k + 1 images (prdc's neighbour search needs that)."""
    from prdc import compute_prdc

    n = min(len(real), len(synthetic))
    if n <= nearest_k + 1:
        return f"n/a (n <= k + 1: {n} <= {nearest_k + 1})"
    with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the set sizes
        scores = compute_prdc(real_features=np.asarray(real, dtype=np.float64),
                              fake_features=np.asarray(synthetic, dtype=np.float64), nearest_k=int(nearest_k))
    return {key: float(value) for key, value in scores.items()}


# ----------------------------------------------------------------------------- MS-SSIM diversity


# ----------------------------------------------------------------------------- the set metrics

NOTES = "notes"  # a scores key that is no column: notes for fidelity.csv's notes column


def pair(synthetic: Any, floor: Any, digits: int = 3) -> str:
    """A fidelity-table cell: "synthetic (floor)", or the one reason where neither is a number."""
    if finite(synthetic) is None and finite(floor) is None:
        return significant(synthetic, digits)  # one reason is enough
    return f"{significant(synthetic, digits)} ({significant(floor, digits)})"


def fid_shown(row: Mapping[str, Any]) -> Any:
    """The row's FID, or why there is none (fid_status)."""
    return row.get("fid") if finite(row.get("fid")) is not None else row.get("fid_status")


def kid_shown(row: Mapping[str, Any], floor: Mapping[str, Any]) -> str:
    """KID ± its spread over subsets (the floor's KID), or why there is none."""
    if finite(row.get("kid_mean")) is None:
        return significant(fid_shown(row))
    spread = f" ± {significant(row.get('kid_std'), 2)}" if (finite(row.get("kid_std")) or 0) > 0 else ""
    return f"{significant(row.get('kid_mean'))}{spread} ({significant(floor.get('kid_mean'))})"


def _fid_scores(real: np.ndarray, synthetic: np.ndarray, evaluation: Mapping[str, Any]) -> dict[str, Any]:
    value, notes = fid(real, synthetic)
    if isinstance(value, str):  # not computable: the reason
        return {"fid": None, "fid_status": value, NOTES: notes}
    return {"fid": value, "fid_status": "ok" if np.isfinite(value) else "n/a", NOTES: notes}


def _kid_scores(real: np.ndarray, synthetic: np.ndarray, evaluation: Mapping[str, Any]) -> dict[str, Any]:
    mean, std, m = kid(real, synthetic, evaluation["kid_subset_size"], evaluation["kid_subsets"], int(evaluation["seed"]))
    return {"kid_mean": mean, "kid_std": std, "kid_subset_size": m}


@dataclass(frozen=True)
class SetMetric:
    """A distance between the real and the synthetic feature sets. It fills `columns` of fidelity.csv;
    `compute` returns their values (plus, under NOTES, notes for the row), or a text saying why there
    are none. The fidelity table shows `headers`, one cell each from `cells(synthetic row, floor row)`
    (default: each column as "synthetic (floor)"); `plot` (value column, spread column or None,
    title) draws it beside the floor in fidelity_<extractor>.png. A new metric is one entry in
    SET_METRICS (plus its test): evaluate and report read this list."""

    name: str
    columns: tuple[str, ...]
    compute: Callable[[np.ndarray, np.ndarray, Mapping[str, Any]], dict[str, Any] | str]
    headers: tuple[str, ...] = ()
    cells: Callable[[Mapping[str, Any], Mapping[str, Any]], list[str]] | None = None
    plot: tuple[str, str | None, str] | None = None

    @property
    def table_headers(self) -> tuple[str, ...]:
        return self.headers or self.columns

    def shown(self, synthetic: Mapping[str, Any], floor: Mapping[str, Any]) -> list[str]:
        if self.cells is not None:
            return self.cells(synthetic, floor)
        return [pair(synthetic.get(column), floor.get(column)) for column in self.columns]


# In the fidelity table's column order. KID first: it is unbiased at any n >= 2, so the plots keep
# the labels where KID is a number; FID only where n >= feature dims.
SET_METRICS: tuple[SetMetric, ...] = (
    SetMetric("kid", ("kid_mean", "kid_std", "kid_subset_size"), _kid_scores, ("KID",),
              lambda synthetic, floor: [kid_shown(synthetic, floor)], ("kid_mean", "kid_std", "KID")),
    SetMetric("fid", ("fid", "fid_status"), _fid_scores, ("FID",),
              lambda synthetic, floor: [pair(fid_shown(synthetic), fid_shown(floor), 4)],
              ("fid", None, "FID (only where n >= dims)")),
    SetMetric("prdc", ("precision", "recall", "density", "coverage"),
              lambda real, synthetic, evaluation: prdc(real, synthetic, int(evaluation["prdc_k"])),
              ("precision", "recall", "density", "coverage")),
)


# ----------------------------------------------------------------------------- diversity


def ms_ssim_window(side: int) -> int | None:
    """The Gaussian window for 5-scale MS-SSIM at this image side: 11 (the standard) where the side
    allows it (> 160 px), else the largest odd window pytorch-msssim accepts; None below 33 px."""
    for window in (11, 9, 7, 5, 3):
        if side > (window - 1) * 16:
            return window
    return None


def pairwise_ms_ssim(images: torch.Tensor, max_pairs: int, seed: int, batch_size: int = 64) -> dict[str, Any]:
    """Mean MS-SSIM over image pairs of one set ((N, 1, R, R) in [0, 1]): every pair, or `max_pairs`
    pairs drawn without replacement. Returns {"ms_ssim", "pairs", "images", "window"} or a note."""
    from pytorch_msssim import ms_ssim

    n = len(images)
    window = ms_ssim_window(min(images.shape[-2:])) if n else None
    if n < 2 or window is None:
        reason = f"fewer than 2 images ({n})" if n < 2 else f"images smaller than 33 px ({tuple(images.shape[-2:])})"
        return {"ms_ssim": None, "pairs": 0, "images": n, "note": f"n/a ({reason})"}
    first, second = np.triu_indices(n, k=1)
    if len(first) > max_pairs:
        keep = np.sort(np.random.default_rng(seed).choice(len(first), int(max_pairs), replace=False))
        first, second = first[keep], second[keep]
    values = []
    with torch.no_grad():
        for start in range(0, len(first), batch_size):
            a = images[first[start:start + batch_size]].float()
            b = images[second[start:start + batch_size]].float()
            values.append(ms_ssim(a, b, data_range=1.0, size_average=False, win_size=window).cpu().numpy())
    scores = np.concatenate(values)
    return {"ms_ssim": float(scores.mean()), "pairs": int(len(scores)), "images": n, "window": window}


# ----------------------------------------------------------------------------- equal n


def equal_n(sizes: dict[str, int], cap: int | None) -> int:
    """The n every set is subsampled to: the smallest set (and at most `cap`)."""
    n = min(sizes.values()) if sizes else 0
    return min(n, int(cap)) if cap else n


def subsample(indices: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n of `indices`, drawn without replacement with `seed`, in their original order."""
    indices = np.asarray(indices)
    if n >= len(indices):
        return indices
    return np.sort(np.random.default_rng(seed).choice(indices, n, replace=False))
