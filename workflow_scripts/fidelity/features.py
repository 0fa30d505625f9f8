"""Feature extractors for fidelity metrics, behind one interface.

Every extractor takes the same images: grayscale radiographs read with `read_xray` and passed
through the transform the LoRA trained on (`xray_dataset.model_transform(model.resolution)`:
short side resized, centre crop), as (N, 1, R, R) tensors in [0, 1]. Each extractor then applies
ONE antialiased resize to its own input size and its own normalisation:

* ``inception``: pytorch-fid's FID Inception (pt_inception-2015-12-05-6726825d.pth, SHA-256
  checked), 299 px, 3 channels, pytorch-fid's [-1, 1] scaling; pool3 features (fid_dims).
* ``xrv``: torchxrayvision DenseNet-121 ``densenet121-res224-all``, 224 px, 1 channel, pixels scaled
  to [-1024, 1024] as torchxrayvision expects; its 1024-d pooled features (``features2``).
* ``pixels``: the 16x16 antialiased thumbnail itself (256 values): needs no weights, so it always
  gives a number; a weak sanity baseline, not comparable with published figures.
* ``rad_dino``: RAD-DINO (``microsoft/rad-dino``, DINOv2 ViT-B/14) through transformers, 518 px,
  3 channels, normalised with the checkpoint's image processor mean/std; the 768-d CLS embedding
  (``pooler_output``).

Weights are loaded the normal way (torch hub cache, torchxrayvision cache, Hugging Face cache or a
local path). Where they cannot be had, the extractor's status says
"unavailable: <what to download, where>" and it computes nothing; never random weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from pytorch_fid.inception import FID_WEIGHTS_URL, InceptionV3

from workflow_scripts.common.errors import ConfigError, DataError
from workflow_scripts.common.images import BadImageError, read_xray
from workflow_scripts.data.xray_dataset import model_transform

FID_WEIGHTS_FILE = os.path.basename(FID_WEIGHTS_URL)  # pt_inception-2015-12-05-6726825d.pth
# torch hub's naming convention (torch.hub.HASH_REGEX, used by load_state_dict_from_url's
# check_hash): the part after the last '-' is the leading digits of the file's SHA-256.
FID_WEIGHTS_SHA256_PREFIX = torch.hub.HASH_REGEX.search(FID_WEIGHTS_FILE).group(1)
XRV_WEIGHTS = "densenet121-res224-all"
RAD_DINO_ID = "microsoft/rad-dino"
PIXEL_SIZE = 16
EXTRACTORS = ("pixels", "inception", "xrv", "rad_dino")


# ----------------------------------------------------------------------------- the one interface


@dataclass
class Extractor:
    """A feature extractor: `embed` maps (N, 1, R, R) images in [0, 1] to (N, dims) features.
    `status` starts with "ok: " (weights loaded, `embed` set) or "unavailable: " (`embed` None)."""

    name: str
    status: str
    dims: int | None = None
    input_size: int | None = None
    embed: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)
    description: str = ""

    @property
    def available(self) -> bool:
        return self.embed is not None


def resize_antialiased(images: torch.Tensor, size: int) -> torch.Tensor:
    """The one resize from model resolution to an extractor's input: bilinear with antialiasing
    (as PIL; clean-fid shows non-antialiased resizing alone moves FID)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def load_model_image(path: str | Path, resolution: int) -> torch.Tensor:
    """(1, R, R) in [0, 1]: read_xray, then the LoRA training transform (short side to R, centre
    crop), the same for real and synthetic images."""
    try:
        image = read_xray(path)
    except BadImageError as error:
        raise DataError(str(error)) from None
    return (model_transform(resolution)(image)[:1] + 1.0) / 2.0


class ModelImages(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[str | Path], resolution: int) -> None:
        self.paths, self.resolution = [str(path) for path in paths], int(resolution)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return load_model_image(self.paths[index], self.resolution)


def load_images(paths: Sequence[str | Path], resolution: int) -> torch.Tensor:
    """(N, 1, R, R) in [0, 1] for a small set (diversity, audit)."""
    if not paths:
        return torch.empty((0, 1, resolution, resolution))
    return torch.stack([load_model_image(path, resolution) for path in paths])


@torch.no_grad()
def compute_features(extractors: Sequence[Extractor], paths: Sequence[str | Path], resolution: int,
                     batch_size: int = 32, num_workers: int = 0, desc: str | None = None) -> dict[str, np.ndarray]:
    """{extractor name: (len(paths), dims) float64} for every available extractor; each image is
    read and transformed once for all of them. `desc`: a progress bar (stderr, the rule's log) by that name."""
    usable = [extractor for extractor in extractors if extractor.available]
    out: dict[str, list[np.ndarray]] = {extractor.name: [] for extractor in usable}
    if usable and paths:
        loader = torch.utils.data.DataLoader(ModelImages(paths, resolution), batch_size=batch_size,
                                             shuffle=False, num_workers=num_workers)
        for batch in tqdm(loader, desc=desc, unit="batch", disable=desc is None, file=sys.stderr):
            for extractor in usable:
                out[extractor.name].append(extractor.embed(batch).double().cpu().numpy())
    return {name: (np.concatenate(parts) if parts else np.empty((0, next(e.dims for e in usable if e.name == name))))
            for name, parts in out.items()}


# ----------------------------------------------------------------------------- Inception (pytorch-fid)


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
        model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[dims]], resize_input=False, normalize_input=True)
    return model.to(device).eval()


def inception_extractor(model: InceptionV3, dims: int, device: str | torch.device, status: str) -> Extractor:
    """pytorch-fid's network on our preprocessing: antialiased resize to 299, grey to 3 channels;
    the network scales [0, 1] to [-1, 1] itself (normalize_input)."""
    def embed(images: torch.Tensor) -> torch.Tensor:
        x = resize_antialiased(images.to(device), 299).expand(-1, 3, -1, -1)
        pred = model(x)[0]
        if pred.shape[2] != 1 or pred.shape[3] != 1:  # blocks below pool3: global average, as pytorch-fid
            pred = F.adaptive_avg_pool2d(pred, output_size=(1, 1))
        return pred.flatten(1)

    return Extractor("inception", status, dims, 299, embed, f"pytorch-fid Inception pool features, {dims} dims")


def build_inception(evaluation: dict[str, Any], device: str | torch.device, allow_download: bool = False) -> Extractor:
    dims = int(evaluation["fid_dims"])
    weights, status = inception_weights_status(evaluation.get("inception_weights"), allow_download)
    if weights is None:
        return Extractor("inception", status, dims, 299)
    return inception_extractor(load_inception(dims, weights, device), dims, device, status)


# ----------------------------------------------------------------------------- torchxrayvision DenseNet


def xrv_weights_path(weights_dir: str | Path | None = None) -> tuple[Path, str]:
    """Where torchxrayvision keeps `densenet121-res224-all` (its cache or `weights_dir`), and its URL."""
    import torchxrayvision as xrv

    url = xrv.models.model_urls[XRV_WEIGHTS]["weights_url"]
    folder = Path(weights_dir).expanduser() if weights_dir else Path(xrv.utils.get_cache_dir()).expanduser()
    return folder / os.path.basename(url), url


def xrv_extractor(model: torch.nn.Module, device: str | torch.device, status: str) -> Extractor:
    """DenseNet-121 on our preprocessing: antialiased resize to 224, one channel, [0, 1] ->
    [-1024, 1024] (torchxrayvision's `normalize(img, 255)` of an 8-bit image); `features2`."""
    def embed(images: torch.Tensor) -> torch.Tensor:
        x = resize_antialiased(images.to(device), 224) * 2048.0 - 1024.0
        return model.features2(x)

    return Extractor("xrv", status, 1024, 224, embed, f"torchxrayvision DenseNet-121 {XRV_WEIGHTS}, 1024-d pooled features")


def build_xrv(evaluation: dict[str, Any], device: str | torch.device) -> Extractor:
    """torchxrayvision's own loading (`DenseNet(weights=..., cache_dir=...)`) when the file is
    there; no download attempt (torchxrayvision's would block without a network)."""
    try:
        import torchxrayvision as xrv
    except ImportError as error:
        return Extractor("xrv", f"unavailable: torchxrayvision is not installed ({error}); pip install -r envs/requirements.txt")
    path, url = xrv_weights_path(evaluation.get("xrv_weights_dir"))
    if not path.is_file():
        return Extractor("xrv", f"unavailable: {XRV_WEIGHTS} weights not found at {path}; download {url} to {path} "
                                "(or set evaluation.xrv_weights_dir to the folder holding it)", 1024, 224)
    try:
        model = xrv.models.DenseNet(weights=XRV_WEIGHTS, cache_dir=str(path.parent))
    except Exception as error:  # a truncated or foreign file
        return Extractor("xrv", f"unavailable: {path} does not load as {XRV_WEIGHTS} ({type(error).__name__}: {error}); "
                                f"download {url} again", 1024, 224)
    return xrv_extractor(model.to(device).eval(), device, f"ok: {path}")


# ----------------------------------------------------------------------------- RAD-DINO (transformers)


def rad_dino_extractor(model: torch.nn.Module, mean: Sequence[float], std: Sequence[float], size: int,
                       device: str | torch.device, status: str) -> Extractor:
    """DINOv2 on our preprocessing: antialiased resize to `size` (518 for RAD-DINO), 3 channels,
    the processor's mean/std; the CLS embedding after the final layer norm (pooler_output)."""
    mean_t = torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1)

    def embed(images: torch.Tensor) -> torch.Tensor:
        x = resize_antialiased(images.to(device), size).expand(-1, 3, -1, -1)
        x = (x - mean_t.to(x.device)) / std_t.to(x.device)
        return model(pixel_values=x).pooler_output

    return Extractor("rad_dino", status, int(model.config.hidden_size), size, embed,
                     f"RAD-DINO CLS embedding, {model.config.hidden_size} dims")


def _local_hub_folder(source: str) -> str | None:
    """A local folder holding `source`'s config.json: the folder itself, or its snapshot in the
    Hugging Face cache. None when neither: from_pretrained would then retry the network for a minute."""
    if Path(source).expanduser().is_dir():
        return str(Path(source).expanduser()) if (Path(source).expanduser() / "config.json").is_file() else None
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(source, "config.json")
    except ValueError:  # HFValidationError: neither a folder nor a valid hub id
        return None
    return str(Path(cached).parent) if isinstance(cached, str) else None


def build_rad_dino(evaluation: dict[str, Any], device: str | torch.device) -> Extractor:
    """`AutoModel.from_pretrained(evaluation.rad_dino)` from the local Hugging Face cache or a local
    folder only (local_files_only: no network retries in the pipeline)."""
    from transformers import AutoImageProcessor, AutoModel

    source = evaluation.get("rad_dino") or RAD_DINO_ID
    folder = _local_hub_folder(source)
    if folder is None:
        return Extractor("rad_dino", f"unavailable: {source} not found locally (no config.json in the Hugging Face cache "
                                     f"or at that path); run `hf download {RAD_DINO_ID}` (Hugging Face cache, "
                                     "HF_HOME) or set evaluation.rad_dino to a local folder holding it", 768, 518)
    try:
        model = AutoModel.from_pretrained(folder, local_files_only=True)
        processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return Extractor("rad_dino", f"unavailable: {source} not found locally ({first[:160]}); run "
                                     f"`hf download {RAD_DINO_ID}` (Hugging Face cache, HF_HOME) or set "
                                     "evaluation.rad_dino to a local folder holding it", 768, 518)
    crop = getattr(processor, "crop_size", None)
    height = crop.get("height") if isinstance(crop, dict) else getattr(crop, "height", None)  # dict or SizeDict
    size = int(height or 518)
    return rad_dino_extractor(model.to(device).eval(), processor.image_mean, processor.image_std, size, device,
                              f"ok: {source}")


def pixel_extractor() -> Extractor:
    def embed(images: torch.Tensor) -> torch.Tensor:
        return resize_antialiased(images.float(), PIXEL_SIZE).flatten(1)

    return Extractor("pixels", "ok: no weights needed", PIXEL_SIZE * PIXEL_SIZE, PIXEL_SIZE, embed,
                     f"{PIXEL_SIZE}x{PIXEL_SIZE} pixel thumbnails, a weights-free sanity baseline")


def build_extractors(evaluation: dict[str, Any], device: str | torch.device, allow_download: bool = False) -> list[Extractor]:
    """The extractors named in evaluation.extractors, each available or saying why not."""
    builders = {
        "pixels": pixel_extractor,
        "inception": lambda: build_inception(evaluation, device, allow_download),
        "xrv": lambda: build_xrv(evaluation, device),
        "rad_dino": lambda: build_rad_dino(evaluation, device),
    }
    names = list(evaluation.get("extractors") or EXTRACTORS)
    unknown = [name for name in names if name not in builders]
    if unknown:
        raise ConfigError(f"evaluation.extractors: unknown {unknown}; choose from {list(EXTRACTORS)}")
    return [builders[name]() for name in names]
