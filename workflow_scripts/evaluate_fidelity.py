"""Evaluation stage: do the synthetic X-rays look real, and are any of them copies?

    python -m workflow_scripts.evaluate_fidelity --config config/config.yaml --data-dir results/data \\
        --synthetic results/synthetic/generation_results.csv \\
        --classifier results/classifier/ratio0_seed0/model.pt --out-dir results/evaluation

Per label (synthetic images whose labels contain L against the real *training* images with L) and
overall (all synthetic against all real training images) it reports:

* FID, with pytorch-fid's own Inception network and Fréchet distance (images read with
  `read_xray`, so DICOM and 16-bit files work, then RGB -> [0, 1] tensors; the network resizes to
  299x299 bilinear and normalises as pytorch-fid does);
* KID on the same Inception features: unbiased MMD² with the kernel (x·y/d + 1)³, the mean and
  standard deviation over `evaluation.kid_subsets` random subsets of
  min(`evaluation.kid_subset_size`, n_real, n_synthetic) images, seed fixed;
* the domain distance: the Fréchet distance in the penultimate features of the classifier trained
  on real images only (works offline).

FID/KID are reported only from the published FID Inception weights (SHA-256 checked against the
`6726825d` in their file name, torch hub's convention). Without them the cells say why and where to
put the file; no number from other weights is ever written.

The memorization audit finds, for every synthetic image, its nearest real training image in
classifier features (cosine distance, features centred on the real training mean) and in pixels (64x64 grayscale in [0, 1], mean absolute
difference), flags it when either distance is below its threshold and saves each flagged pair side
by side under `<out-dir>/audit_pairs/`.

Outputs in out-dir: fidelity.csv, fidelity.json, audit.csv, audit_summary.json, audit_pairs/*.png.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw, ImageFont
from pytorch_fid.fid_score import calculate_frechet_distance
from pytorch_fid.inception import FID_WEIGHTS_URL, InceptionV3

from workflow_scripts.config import ConfigError, add_config_arguments, config_from_args, config_hash
from workflow_scripts.generate_xrays import read_generation_results
from workflow_scripts.images import BadImageError, read_xray
from workflow_scripts.prepare_dataset import LABEL_JOIN, DataError, load_split

FeatureFn = Callable[[list[str]], np.ndarray]

FID_WEIGHTS_FILE = os.path.basename(FID_WEIGHTS_URL)  # pt_inception-2015-12-05-6726825d.pth
# torch hub's naming convention (torch.hub.HASH_REGEX, used by load_state_dict_from_url's
# check_hash): the part after the last '-' is the leading digits of the file's SHA-256.
FID_WEIGHTS_SHA256_PREFIX = torch.hub.HASH_REGEX.search(FID_WEIGHTS_FILE).group(1)
RESIZE = "bilinear 299 (pytorch-fid)"
KID_SEED = 0
AUDIT_SIZE = 64
QUANTILES = (0, 5, 25, 50, 75, 100)
FIDELITY_COLUMNS = ["label", "n_real", "n_synthetic", "fid", "kid_mean", "kid_std", "domain_fd", "notes"]
AUDIT_COLUMNS = ["synthetic_file", "labels", "nearest_real_feature", "feature_distance",
                 "nearest_real_pixel", "pixel_distance", "flagged"]
UNRELIABLE = "unreliable: fewer images than feature dims, covariance singular"


class EvaluationError(ValueError):
    """The inputs cannot be evaluated as they are; the message says which file and why."""


# ----------------------------------------------------------------------------- Inception weights


def default_weights_path() -> Path:
    """Where pytorch-fid loads (and would download) the weights: the torch hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _missing_message(path: Path, reason: str = "") -> str:
    return (f"unavailable: Inception weights not found at {path} and they cannot be downloaded here{reason}; "
            f"download {FID_WEIGHTS_URL} to {path} (or set evaluation.inception_weights)")


def _try_download(path: Path, timeout_s: float = 60.0) -> str | None:
    """pytorch-fid's own download (torch hub, to the hub cache), hash-checked. None on success,
    else the reason."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(FID_WEIGHTS_URL, str(path), hash_prefix=FID_WEIGHTS_SHA256_PREFIX, progress=False)
        return None
    except Exception as error:  # no network, proxy, bad hash, disk: all end as "unavailable"
        return f"{type(error).__name__}: {error}"
    finally:
        socket.setdefaulttimeout(previous)


def inception_weights_status(configured: str | Path | None, allow_download: bool = False) -> tuple[Path | None, str]:
    """(weights file, status). The status starts with "ok: " only for a file whose SHA-256 starts
    with the published prefix; otherwise with "unavailable: " and what to do. `configured` is
    evaluation.inception_weights (None: the torch hub cache, as pytorch-fid). With
    `allow_download`, a missing hub-cache file is downloaded the way pytorch-fid would."""
    path = Path(configured).expanduser() if configured else default_weights_path()
    if not path.exists() and configured is None and allow_download:
        failure = _try_download(path)
        if failure:
            return None, _missing_message(path, f" (download failed: {failure})")
    if not path.exists():
        return None, _missing_message(path)
    if not path.is_file():
        return None, f"unavailable: {path} is not a file (expected {FID_WEIGHTS_FILE})"
    try:
        digest = sha256_file(path)
    except OSError as error:
        return None, f"unavailable: {path} cannot be read ({error})"
    if not digest.startswith(FID_WEIGHTS_SHA256_PREFIX):
        return None, (f"unavailable: {path} is not the published FID Inception weights (SHA-256 {digest[:16]}... "
                      f"does not start with {FID_WEIGHTS_SHA256_PREFIX}); download {FID_WEIGHTS_URL}")
    return path, f"ok: {path}"


@contextlib.contextmanager
def _hub_dir_holding(weights_path: Path | None) -> Iterator[None]:
    """Make pytorch-fid's `load_state_dict_from_url(FID_WEIGHTS_URL)` load `weights_path`: torch hub
    points, for the duration, at a temporary folder holding a symlink named as pytorch-fid
    expects. Nothing is written next to the user's file. None or the hub-cache file itself: as is."""
    if weights_path is None or Path(weights_path).resolve() == default_weights_path().resolve():
        yield
        return
    weights_path = Path(weights_path).resolve()
    if not weights_path.is_file():
        raise FileNotFoundError(f"Inception weights not found: {weights_path}")
    previous = getattr(torch.hub, "_hub_dir", None)
    with tempfile.TemporaryDirectory(prefix="fid_hub_") as hub:
        (Path(hub) / "checkpoints").mkdir()
        os.symlink(weights_path, Path(hub) / "checkpoints" / FID_WEIGHTS_FILE)
        torch.hub.set_dir(hub)
        try:
            yield
        finally:
            torch.hub._hub_dir = previous  # set_dir cannot restore "unset" (env-derived default)


def load_inception(dims: int, weights_path: str | Path | None = None, device: str | torch.device = "cpu") -> InceptionV3:
    """pytorch-fid's InceptionV3 for `dims`, its weights read from `weights_path` (or the hub
    cache). Any state dict of the FID Inception layout loads: the hash check is the caller's
    (`inception_weights_status`)."""
    if dims not in InceptionV3.BLOCK_INDEX_BY_DIM:
        raise ConfigError(f"evaluation.fid_dims: {dims} is not one of {sorted(InceptionV3.BLOCK_INDEX_BY_DIM)}")
    with _hub_dir_holding(Path(weights_path) if weights_path else None):
        model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[dims]])
    return model.to(device).eval()


class XrayRGBDataset(torch.utils.data.Dataset):
    """pytorch-fid's ImagePathDataset, reading with `read_xray` (PNG/JPEG/16-bit/DICOM) first:
    read_xray -> convert('RGB') -> ToTensor (values in [0, 1])."""

    def __init__(self, files: Sequence[str | Path]):
        self.files = [str(file) for file in files]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        import torchvision.transforms as TF

        return TF.ToTensor()(read_xray(self.files[index]).convert("RGB"))


def _collate_299(batch: list[torch.Tensor]) -> torch.Tensor:
    """Stack like the default collate; images of mixed sizes are first resized to 299x299 one by
    one exactly as InceptionV3 would (bilinear, align_corners=False), after which its own resize
    is the identity."""
    if all(item.shape == batch[0].shape for item in batch):
        return torch.stack(batch)
    return torch.cat([
        torch.nn.functional.interpolate(item[None], size=(299, 299), mode="bilinear", align_corners=False)
        for item in batch
    ])


def inception_features(
    paths: Sequence[str | Path],
    dims: int = 2048,
    weights_path: str | Path | None = None,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    num_workers: int | None = None,
    model: InceptionV3 | None = None,
) -> np.ndarray:
    """(n, dims) float64 activations, computed as `pytorch_fid.fid_score.get_activations` does."""
    if not paths:
        return np.empty((0, dims))
    model = model or load_inception(dims, weights_path, device)
    model.eval()
    if num_workers is None:
        num_workers = 0 if len(paths) <= batch_size else min(8, os.cpu_count() or 1)
    loader = torch.utils.data.DataLoader(
        XrayRGBDataset(paths), batch_size=min(batch_size, len(paths)), shuffle=False, drop_last=False,
        num_workers=num_workers, collate_fn=_collate_299,
    )
    out = np.empty((len(paths), dims))
    start = 0
    for batch in loader:
        with torch.no_grad():
            pred = model(batch.to(device))[0]
        if pred.size(2) != 1 or pred.size(3) != 1:  # blocks below pool3: global average, as pytorch-fid
            pred = torch.nn.functional.adaptive_avg_pool2d(pred, output_size=(1, 1))
        pred = pred.squeeze(3).squeeze(2).cpu().numpy()
        out[start:start + len(pred)] = pred
        start += len(pred)
    return out


# ----------------------------------------------------------------------------- distances


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance as pytorch-fid's calculate_activation_statistics."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.atleast_2d(np.cov(features, rowvar=False))


def _frechet_numpy(mu1, sigma1, mu2, sigma2, eps: float, offset: bool) -> tuple[float, float]:
    """pytorch-fid's formula, without its `disp` argument; returns (value, largest imaginary part)."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if offset:
        eye = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + eye).dot(sigma2 + eye))
    else:
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
    imaginary = float(np.max(np.abs(np.imag(covmean)))) if np.iscomplexobj(covmean) else 0.0
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(np.real(covmean))), imaginary


def frechet_distance_with_notes(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> tuple[float, list[str]]:
    """pytorch-fid's `calculate_frechet_distance`, plus what it had to do to get a number."""
    from scipy import linalg

    notes: list[str] = []
    printed = io.StringIO()
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(printed):
            warnings.simplefilter("always")
            value = float(calculate_frechet_distance(mu1, sigma1, mu2, sigma2, eps=eps))
        for warning in caught:
            if issubclass(warning.category, DeprecationWarning) and "disp" in str(warning.message):
                continue  # pytorch-fid's sqrtm(disp=False) on SciPy >= 1.16
            if issubclass(warning.category, linalg.LinAlgWarning):  # "Matrix is singular/ill-conditioned. ..."
                notes.append(f"matrix square root: {str(warning.message).split('.')[0].lower()}, the result may be inaccurate")
            else:
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    except TypeError:  # a SciPy without sqrtm's `disp`: the same computation here
        value, imaginary = _frechet_numpy(mu1, sigma1, mu2, sigma2, eps, offset=False)
        if not math.isfinite(value) or imaginary > 1e-3:
            value, imaginary = _frechet_numpy(mu1, sigma1, mu2, sigma2, eps, offset=True)
            notes.append(f"singular covariance product: {eps} added to the diagonal")
        if imaginary > 1e-3:
            notes.append(f"imaginary part up to {imaginary:.3g} of the matrix square root discarded")
    except ValueError as error:  # pytorch-fid: "Imaginary component ..." (singular covariances)
        value, imaginary = _frechet_numpy(mu1, sigma1, mu2, sigma2, eps, offset=True)
        notes.append(f"{error}; recomputed with {eps} on the covariance diagonals, real part kept")
    if "singular product" in printed.getvalue():
        notes.append(f"singular covariance product: {eps} added to the diagonal (pytorch-fid)")
    return value, notes


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """d² = ||mu1 - mu2||² + Tr(S1 + S2 - 2 sqrt(S1 S2)), by pytorch-fid."""
    return frechet_distance_with_notes(mu1, sigma1, mu2, sigma2, eps)[0]


def feature_frechet_distance(first: np.ndarray, second: np.ndarray) -> tuple[float, list[str]]:
    return frechet_distance_with_notes(*gaussian_stats(first), *gaussian_stats(second))


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x·y / d + 1)³, KID's kernel."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² (Bińkowski et al. 2018): within-set sums without the diagonal."""
    m, n = len(x), len(y)
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2.0 * kxy.mean())


def kernel_inception_distance(
    real: np.ndarray, synthetic: np.ndarray, subset_size: int, subsets: int, seed: int = KID_SEED
) -> tuple[float, float, int]:
    """(mean, std, subset size) of MMD² over `subsets` random subsets of
    min(subset_size, n_real, n_synthetic) images of each set, drawn without replacement."""
    real, synthetic = np.asarray(real, dtype=np.float64), np.asarray(synthetic, dtype=np.float64)
    m = min(int(subset_size), len(real), len(synthetic))
    if m < 2:
        raise ValueError(f"KID needs at least 2 images per set (n_real={len(real)}, n_synthetic={len(synthetic)})")
    rng = np.random.default_rng(seed)
    values = np.array([
        mmd2_unbiased(synthetic[rng.choice(len(synthetic), m, replace=False)], real[rng.choice(len(real), m, replace=False)])
        for _ in range(int(subsets))
    ])
    return float(values.mean()), float(values.std()), m


# ----------------------------------------------------------------------------- memorization audit


def load_pixels(paths: Sequence[str | Path], size: int = AUDIT_SIZE, workers: int | None = None) -> np.ndarray:
    """(n, size*size) float32 in [0, 1]: read_xray, resized to size x size (bilinear)."""
    def one(path: str | Path) -> np.ndarray:
        image = read_xray(path).resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.float32).reshape(-1) / 255.0

    if not paths:
        return np.empty((0, size * size), dtype=np.float32)
    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
        return np.stack(list(pool.map(one, paths)))


def nearest_cosine(query: np.ndarray, reference: np.ndarray, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Index of and cosine distance (1 - cos) to each query row's nearest reference row."""
    def unit(a: np.ndarray) -> np.ndarray:
        a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    q, r = unit(query), unit(reference)
    index, distance = np.empty(len(q), dtype=np.int64), np.empty(len(q))
    for start in range(0, len(q), chunk):
        similarity = q[start:start + chunk] @ r.T
        best = similarity.argmax(axis=1)
        index[start:start + chunk] = best
        distance[start:start + chunk] = 1.0 - similarity[np.arange(len(best)), best]
    return index, np.clip(distance, 0.0, 2.0)


def nearest_mean_abs(query: np.ndarray, reference: np.ndarray, chunk: int = 256,
                     device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Index of and mean absolute difference to each query row's nearest reference row (exact,
    torch.cdist p=1 in chunks of query rows)."""
    ref = torch.as_tensor(np.ascontiguousarray(reference, dtype=np.float32), device=device)
    dims = ref.shape[1]
    index, distance = np.empty(len(query), dtype=np.int64), np.empty(len(query))
    for start in range(0, len(query), chunk):
        q = torch.as_tensor(np.ascontiguousarray(query[start:start + chunk], dtype=np.float32), device=device)
        best, where = torch.cdist(q, ref, p=1).min(dim=1)
        index[start:start + chunk] = where.cpu().numpy()
        distance[start:start + chunk] = best.double().cpu().numpy() / dims
    return index, distance


def _font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def save_pair(synthetic_path: str, reals: Sequence[tuple[str, str]], out_path: Path, panel: int = 256) -> Path:
    """synthetic | real [| real], each `panel` px square, with a caption strip under each."""
    items = [(synthetic_path, f"synthetic: {Path(synthetic_path).name}")] + list(reals)
    strip = 34
    canvas = Image.new("L", (panel * len(items), panel + strip), color=0)
    draw = ImageDraw.Draw(canvas)
    font = _font(11)
    for column, (path, caption) in enumerate(items):
        canvas.paste(read_xray(path).resize((panel, panel), Image.Resampling.BILINEAR), (column * panel, 0))
        for line_number, line in enumerate(caption.split("\n")[:2]):
            draw.text((column * panel + 4, panel + 3 + 15 * line_number), line[:48], fill=255, font=font)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_path, format="PNG")
    return out_path


def _quantiles(values: np.ndarray) -> dict[str, float]:
    return {f"q{q}": float(np.percentile(values, q)) for q in QUANTILES} if len(values) else {}


def memorization_audit(
    synthetic_files: Sequence[str],
    synthetic_labels: Sequence[str],
    train_files: Sequence[str],
    synthetic_features: np.ndarray,
    train_features: np.ndarray,
    out_dir: str | Path,
    feature_threshold: float,
    pixel_threshold: float,
    device: str | torch.device = "cpu",
    center: bool = True,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Nearest real training image per synthetic image, in classifier features (cosine) and pixels
    (64 px, mean absolute difference); writes audit.csv, audit_summary.json and audit_pairs/*.png.

    With `center`, both feature sets are first centred on the mean real training feature: penultimate
    features after a ReLU are all non-negative, so raw cosine distances between any two chest X-rays
    crowd near 0 and a threshold cannot tell a copy from a look-alike. Identical images stay at 0."""
    out_dir = Path(out_dir)
    synthetic_features = np.asarray(synthetic_features, dtype=np.float64)
    train_features = np.asarray(train_features, dtype=np.float64)
    if center:
        mean = train_features.mean(axis=0)
        synthetic_features, train_features = synthetic_features - mean, train_features - mean
    pairs_dir = out_dir / "audit_pairs"
    if pairs_dir.exists():
        shutil.rmtree(pairs_dir)  # our own output: stale pairs of an earlier run must not linger
    feature_index, feature_distance = nearest_cosine(synthetic_features, train_features)
    pixel_index, pixel_distance = nearest_mean_abs(load_pixels(synthetic_files), load_pixels(train_files), device=device)
    by_feature, by_pixel = feature_distance < feature_threshold, pixel_distance < pixel_threshold
    audit = pd.DataFrame({
        "synthetic_file": list(synthetic_files),
        "labels": list(synthetic_labels),
        "nearest_real_feature": [train_files[i] for i in feature_index],
        "feature_distance": feature_distance,
        "nearest_real_pixel": [train_files[i] for i in pixel_index],
        "pixel_distance": pixel_distance,
        "flagged": by_feature | by_pixel,
    })[AUDIT_COLUMNS]
    pairs = []
    for row in np.flatnonzero(audit["flagged"].to_numpy()):
        reals, criteria = [], []
        if by_pixel[row]:
            criteria.append("pixel")
            reals.append((train_files[pixel_index[row]], f"nearest real (pixels): {Path(train_files[pixel_index[row]]).name}\n"
                                                          f"mean abs diff {pixel_distance[row]:.4f}"))
        if by_feature[row]:
            criteria.append("feature")
            if not (by_pixel[row] and feature_index[row] == pixel_index[row]):
                reals.append((train_files[feature_index[row]], f"nearest real (features): {Path(train_files[feature_index[row]]).name}\n"
                                                                f"cosine distance {feature_distance[row]:.4f}"))
            else:
                reals[0] = (reals[0][0], reals[0][1] + f", cosine {feature_distance[row]:.4f}")
        png = pairs_dir / f"{row:05d}_{Path(synthetic_files[row]).stem}.png"
        save_pair(str(synthetic_files[row]), reals, png)
        pairs.append({"synthetic_file": synthetic_files[row], "flagged_by": "+".join(criteria), "pair_png": str(png)})
    summary = {
        "n": len(audit),
        "flagged": int(audit["flagged"].sum()),
        "flagged_by_feature": int(by_feature.sum()),
        "flagged_by_pixel": int(by_pixel.sum()),
        "thresholds": {"feature_cosine_distance": feature_threshold, "pixel_mean_abs_difference": pixel_threshold},
        "feature_space": "cosine distance of classifier features" + (" centred on the real training mean" if center else ""),
        "pixel_space": f"{AUDIT_SIZE}x{AUDIT_SIZE} grayscale, values in [0, 1], bilinear resize",
        "n_real_train": len(train_files),
        "feature_distance_quantiles": _quantiles(feature_distance),
        "pixel_distance_quantiles": _quantiles(pixel_distance),
        "pairs": pairs,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    audit.to_csv(out_dir / "audit.csv", index=False)
    (out_dir / "audit_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return audit, summary


# ----------------------------------------------------------------------------- the stage


def _label_sets(cells: Sequence[str]) -> list[set[str]]:
    return [{label.strip() for label in str(cell).split(LABEL_JOIN) if label.strip()} for cell in cells]


def _features(feature_fn: FeatureFn, paths: list[str], what: str) -> np.ndarray:
    features = np.asarray(feature_fn(list(paths)), dtype=np.float64)
    if features.ndim != 2 or len(features) != len(paths):
        raise EvaluationError(f"feature extractor returned shape {features.shape} for {len(paths)} {what} images; expected (n, d)")
    if not np.isfinite(features).all():
        raise EvaluationError(f"feature extractor returned non-finite values for the {what} images")
    return features


def _frechet_noted(what: str, real: np.ndarray, syn: np.ndarray, notes: list[str]) -> float:
    """The Fréchet distance of two feature sets; its warnings, and a warning when a set has fewer
    images than feature dims (singular covariance), go into `notes`."""
    value, extra = feature_frechet_distance(real, syn)
    notes += [f"{what}: {note}" for note in extra]
    smaller = min(len(real), len(syn))
    if smaller < real.shape[1]:
        notes.append(f"{what} {UNRELIABLE} ({smaller} < {real.shape[1]})")
    return value


def _score(
    name: str, real_mask: np.ndarray, syn_mask: np.ndarray, inception: tuple[np.ndarray, np.ndarray] | None,
    inception_status: str, domain: tuple[np.ndarray, np.ndarray], evaluation: dict[str, Any], extra_notes: list[str],
) -> dict[str, Any]:
    n_real, n_syn = int(real_mask.sum()), int(syn_mask.sum())
    notes = list(extra_notes)
    row: dict[str, Any] = {"label": name, "n_real": n_real, "n_synthetic": n_syn}
    too_few = f"unavailable: fewer than 2 images in a set (n_real={n_real}, n_synthetic={n_syn})"
    if inception is None:
        row.update(fid=inception_status, kid_mean=inception_status, kid_std=inception_status, kid_subset_size=None)
    elif min(n_real, n_syn) < 2:
        row.update(fid=too_few, kid_mean=too_few, kid_std=too_few, kid_subset_size=None)
    else:
        real, syn = inception[0][real_mask], inception[1][syn_mask]
        row["fid"] = _frechet_noted("fid", real, syn, notes)
        row["kid_mean"], row["kid_std"], row["kid_subset_size"] = kernel_inception_distance(
            real, syn, evaluation["kid_subset_size"], evaluation["kid_subsets"], KID_SEED)
    if min(n_real, n_syn) < 2:
        row["domain_fd"] = float("nan")
        notes.append(f"domain_fd {too_few}")
    else:
        row["domain_fd"] = _frechet_noted("domain_fd", domain[0][real_mask], domain[1][syn_mask], notes)
    row["notes"] = "; ".join(notes)
    return row


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return value


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def evaluate(
    config: dict[str, Any],
    data_dir: str | Path,
    synthetic_csv: str | Path,
    feature_fn: FeatureFn,
    out_dir: str | Path,
    *,
    device: str | None = None,
    batch_size: int = 32,
    allow_download: bool = False,
    feature_source: str = "classifier penultimate features",
) -> dict[str, Any]:
    """Write fidelity.csv/.json and the audit files to `out_dir`; return what fidelity.json holds.
    `feature_fn(paths) -> (n, d)` gives the domain features (the real-only classifier's)."""
    evaluation, vocabulary = config["evaluation"], list(config["dataset"]["labels"])
    device = device or default_device()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    train = load_split(data_dir, "train")
    if train.empty:
        raise EvaluationError(f"{Path(data_dir) / 'train.csv'}: no training images")
    synthetic = read_generation_results(synthetic_csv)
    train_paths, syn_paths = train["path"].tolist(), synthetic["path"].tolist()
    real_sets, syn_sets = _label_sets(train["labels"]), _label_sets(synthetic["labels"])
    present = set().union(*syn_sets)
    labels = [label for label in vocabulary if label in present] + sorted(present - set(vocabulary))

    start = time.perf_counter()
    domain = (_features(feature_fn, train_paths, "real training"), _features(feature_fn, syn_paths, "synthetic"))
    timings["domain_features"] = time.perf_counter() - start

    weights, status = inception_weights_status(evaluation.get("inception_weights"), allow_download)
    dims = int(evaluation["fid_dims"])
    inception = None
    if weights is not None:
        start = time.perf_counter()
        model = load_inception(dims, weights, device)
        inception = (inception_features(train_paths, dims, batch_size=batch_size, device=device, model=model),
                     inception_features(syn_paths, dims, batch_size=batch_size, device=device, model=model))
        del model
        timings["inception_features"] = time.perf_counter() - start

    start = time.perf_counter()
    rows = []
    for label in labels + ["overall"]:
        if label == "overall":
            real_mask, syn_mask = np.ones(len(train), bool), np.ones(len(synthetic), bool)
        else:
            real_mask = np.array([label in labels_ for labels_ in real_sets])
            syn_mask = np.array([label in labels_ for labels_ in syn_sets])
        extra = [] if label == "overall" or label in vocabulary else ["label not in dataset.labels"]
        rows.append(_score(label, real_mask, syn_mask, inception, status, domain, evaluation, extra))
    timings["scores"] = time.perf_counter() - start
    table = pd.DataFrame(rows)
    table[FIDELITY_COLUMNS].to_csv(out_dir / "fidelity.csv", index=False)

    start = time.perf_counter()
    _, audit_summary = memorization_audit(
        syn_paths, synthetic["labels"].tolist(), train_paths, domain[1], domain[0], out_dir,
        float(evaluation["audit_feature_threshold"]), float(evaluation["audit_pixel_threshold"]), device=device)
    timings["audit"] = time.perf_counter() - start

    try:
        tool = f"pytorch-fid {metadata.version('pytorch-fid')}"
    except metadata.PackageNotFoundError:
        tool = "pytorch-fid"
    result = {
        "rows": rows,
        "settings": {
            "tool": tool,
            "dims": dims,
            "resize": RESIZE,
            "inception_status": status,
            "inception_weights": str(weights) if weights else None,
            "inception_weights_sha256_prefix": FID_WEIGHTS_SHA256_PREFIX,
            "kid": {"kernel": "(x.y/d + 1)^3", "estimator": "unbiased MMD^2", "subset_size": evaluation["kid_subset_size"],
                    "subsets": evaluation["kid_subsets"]},
            "domain_features": {"source": feature_source, "dims": int(domain[0].shape[1])},
            "n": {"real_train": len(train), "synthetic": len(synthetic)},
            "seeds": {"kid": KID_SEED},
            "real_set": "training split (load_split(data_dir, 'train'))",
            "device": str(device),
            "config_hash": config_hash(evaluation),
        },
        "audit": {key: audit_summary[key] for key in ("n", "flagged", "thresholds")},
        "timings_s": {key: round(value, 3) for key, value in timings.items()},
    }
    (out_dir / "fidelity.json").write_text(json.dumps(_json_safe(result), indent=2) + "\n")
    return result


def _format(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--data-dir", type=Path, default=Path("results/data"), help="folder with train.csv (prepare_dataset)")
    parser.add_argument("--synthetic", type=Path, default=Path("results/synthetic/generation_results.csv"),
                        help="generation_results.csv of the synthetic images")
    parser.add_argument("--classifier", type=Path, default=Path("results/classifier/ratio0_seed0/model.pt"),
                        help="the real-only classifier whose penultimate features give the domain distance and audit")
    parser.add_argument("--out-dir", type=Path, default=Path("results/evaluation"))
    parser.add_argument("--device", default=None, help="cuda, cuda:0 or cpu (default: cuda if available)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--download", dest="allow_download", action=argparse.BooleanOptionalAction, default=True,
                        help="download missing Inception weights to the torch hub cache where the network allows, "
                             "as pytorch-fid does (checked against the published hash either way)")
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args, "evaluate_fidelity")
        try:
            from workflow_scripts.train_classifier import extract_features, load_classifier
        except ImportError as error:
            raise EvaluationError(f"the classifier module is not available ({error})") from None
        device = args.device or default_device()
        model, meta = load_classifier(args.classifier)  # DataError when missing
        model = model.to(device)

        def feature_fn(paths: list[str]) -> np.ndarray:
            return extract_features(model, meta, paths, batch_size=64)

        result = evaluate(config, args.data_dir, args.synthetic, feature_fn, args.out_dir, device=device,
                          batch_size=args.batch_size, allow_download=args.allow_download,
                          feature_source=f"penultimate features of {args.classifier}")
    except (ConfigError, DataError, EvaluationError, BadImageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    status = result["settings"]["inception_status"]
    print(f"Inception: {status}")
    for row in result["rows"]:
        fid = _format(row["fid"]) if not str(row["fid"]).startswith("unavailable") else "-"
        kid = _format(row["kid_mean"]) if not str(row["kid_mean"]).startswith("unavailable") else "-"
        print(f"{row['label']:>14}: n_real {row['n_real']:>5}, n_syn {row['n_synthetic']:>5}, FID {fid}, KID {kid}, "
              f"domain FD {_format(row['domain_fd'])}" + (f"  [{row['notes']}]" if row["notes"] else ""))
    audit = result["audit"]
    print(f"audit: {audit['flagged']} of {audit['n']} synthetic images flagged (see {args.out_dir / 'audit.csv'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
