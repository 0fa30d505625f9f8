"""Read chest X-ray files (PNG, JPEG, DICOM) into one canonical form.

Canonical form: a fully loaded 8-bit grayscale ``PIL.Image.Image`` (mode ``'L'``),
bone bright.  Anything that cannot be read that way raises :class:`BadImageError`,
whose message names the file, the reason and what to do about it.

Input files are only ever opened ``'rb'``; nothing is written anywhere.

Conversion rules
----------------
* 8-bit grayscale is returned unchanged (pixel values round-trip exactly).
* 16-bit / 32-bit integer and float images are windowed to 0..255 between their
  own 0.5th and 99.5th percentiles (``ROBUST_PERCENTILES``; the image's min..max when
  those coincide), so a 12-bit image stored in 16 bits is not near-black and one hot
  pixel does not squash the film into the dark end.  NaN or infinite pixels are
  refused (there is no right grey for them).
* Colour / palette / alpha images are converted to luminance (ITU-R 601-2, as
  ``Image.convert('L')``).  Alpha is dropped, not composited: transparent pixels
  keep whatever grey their colour channels hold.
* EXIF orientation (phone photos of films) is applied to PNG/JPEG.
* DICOM: Modality LUT (rescale slope/intercept), then VOI LUT or windowing, then
  MONOCHROME1 is inverted so it looks like MONOCHROME2, then scaled to 8 bits.
  When a window / VOI LUT is applied the 8-bit scale spans the window's output
  range (values outside the window saturate at 0/255); otherwise the robust
  percentile window above.  Multi-frame DICOM and animated PNG are rejected (not a
  single radiograph).  A multi-picture JPEG (MPO, e.g. from a phone) is read as its
  first picture: by the MPO standard that is the primary image, the others are
  previews or the second eye of a stereo pair.

``check_image`` adds what a model needs on top of readability: both sides at least
``min_side`` pixels, not one constant grey, and not near-blank: 98 % of the pixels
(1st..99th percentile) spanning fewer than ``BLANK_SPREAD`` grey levels, as a
placeholder that is all 0 but a pixel or two.  The real NIH films of
shared/data/cxr-dev span 99 grey levels or more (tests/test_image_rules.py checks
every one), so the threshold leaves a wide margin for low-contrast films.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from workflow_scripts.common.errors import DataError

__all__ = ["MIN_SIDE", "SUPPORTED_SUFFIXES", "BadImageError", "check_image", "is_dicom", "read_xray", "usability_problem"]

SUPPORTED_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
_PIL_SUFFIXES = (".png", ".jpg", ".jpeg")
_DICOM_SUFFIXES = (".dcm", ".dicom")
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")

_FIX_HINT = "re-export or re-download the file, or remove it from the input folder"
MIN_SIDE = 32  # default of dataset.min_image_side
ROBUST_PERCENTILES = (0.5, 99.5)  # window of high-bit images without a DICOM window
BLANK_SPREAD = 8  # grey levels: a 1st..99th percentile span below this is a blank placeholder


class BadImageError(DataError):
    """An input image that cannot be read; ``str(err)`` is user-facing."""

    def __init__(self, path: str | Path, reason: str, hint: str = _FIX_HINT) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason} -- {hint}")


def is_dicom(path: Path) -> bool:
    """True for a ``.dcm``/``.dicom`` suffix or the 'DICM' magic at byte 128."""
    path = Path(path)
    if path.suffix.lower().rstrip() in _DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def check_image(path: str | Path, min_side: int = MIN_SIDE) -> str | None:
    """None if the file reads (``read_xray``) as an image a model can learn from, else the reason
    (the error message)."""
    try:
        image = read_xray(path)
    except BadImageError as err:
        return str(err)
    return usability_problem(image, path, min_side)


def usability_problem(image: Image.Image, path: str | Path, min_side: int = MIN_SIDE) -> str | None:
    """Why a readable 8-bit image is no radiograph to train on (too small, one constant grey), or None."""
    width, height = image.size
    if min(width, height) < min_side:
        return str(BadImageError(path, f"image is {width}x{height} px, smaller than the minimum side of {min_side} px "
                                       "(dataset.min_image_side)", "use the full-size image, or remove the row"))
    low, high = image.getextrema()
    stored = f"; {image.info['stored']}" if image.info.get("stored") else ""
    if low == high:
        return str(BadImageError(path, f"constant image (every pixel is {low}{stored}): no anatomy to learn from",
                                 "re-export the image; a blank placeholder is not a radiograph"))
    # Percentiles from the 256-bin histogram (computed in C): a sort of a 1024 px film would double the check.
    cumulative = np.cumsum(image.histogram())
    p1, p99 = (int(np.searchsorted(cumulative, share * cumulative[-1])) for share in (0.01, 0.99))
    if p99 - p1 < BLANK_SPREAD:
        return str(BadImageError(
            path, f"near-blank image (98% of pixels lie within {p1:g}..{p99:g}, fewer than {BLANK_SPREAD} grey levels; "
                  f"all pixels within {low}..{high}{stored}): a placeholder, not a radiograph",
            "re-export the image; a blank placeholder is not a radiograph"))
    return None


def read_xray(path: str | Path) -> Image.Image:
    """Read a PNG/JPEG/DICOM chest X-ray as a loaded 8-bit grayscale image."""
    p = Path(path)
    if not p.exists():
        raise BadImageError(path, "file not found", "check the path / input folder")
    if not p.is_file():
        raise BadImageError(path, "not a regular file", "point to an image file")
    try:
        size = p.stat().st_size
    except OSError as err:
        raise BadImageError(path, f"cannot access file ({err})", "check file permissions") from err
    if size == 0:
        raise BadImageError(path, "empty file (0 bytes)")
    if is_dicom(p):
        return _read_dicom(path)
    if p.suffix.lower().rstrip() not in _PIL_SUFFIXES:  # a name may end in a space
        raise BadImageError(
            path,
            f"unsupported file type {p.suffix or '(no suffix)'!r}",
            f"convert it to one of {', '.join(SUPPORTED_SUFFIXES)}",
        )
    return _read_pil(path)


# --------------------------------------------------------------------------- PIL


@contextlib.contextmanager
def _strict_truncation() -> Iterator[None]:
    # Another module may have set this global to True; truncated files must fail here.
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


_PIL_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, EOFError,
               Image.DecompressionBombError, IndexError, TypeError)


def _read_pil(path: str | Path) -> Image.Image:
    try:
        with _strict_truncation(), open(path, "rb") as fh:
            # verify() checks chunk CRCs and catches files cut after the pixel data;
            # it leaves the image unusable, so reopen for the real decode.
            with Image.open(fh, formats=["PNG", "JPEG"]) as probe:
                probe.verify()
            fh.seek(0)
            with Image.open(fh, formats=["PNG", "JPEG"]) as im:
                frames = getattr(im, "n_frames", 1)
                if im.format == "PNG" and frames > 1:  # APNG: PIL would silently give frame 0
                    raise BadImageError(path, f"animated PNG ({frames} frames), not a single radiograph",
                                        "export the single radiograph frame as its own file")
                im.load()  # force full decode while the file is open
                im = ImageOps.exif_transpose(im)
                return _pil_to_l(im, path)
    except BadImageError:
        raise
    except UnidentifiedImageError as err:
        raise BadImageError(path, "corrupt or not a PNG/JPEG image (content not recognised)") from err
    except Image.DecompressionBombError as err:
        raise BadImageError(path, f"image too large, refused as possible decompression bomb ({err})",
                            "downscale the image") from err
    except _PIL_ERRORS as err:
        raise BadImageError(path, f"truncated or corrupt image ({err})") from err


def _pil_to_l(im: Image.Image, path: str | Path = "") -> Image.Image:
    if im.mode == "L":
        return im.copy()
    if im.mode in _HIGH_BIT_MODES:
        values = np.asarray(im)
        _refuse_non_finite(path, values)
        what = "float image" if im.mode == "F" else "32-bit image" if im.mode == "I" and values.max() > 65535 else "16-bit image"
        return _with_stored(Image.fromarray(_window_to_uint8(values)), values, what)
    if im.mode == "La":  # premultiplied alpha has no direct path to L
        im = im.convert("LA")
    return im.convert("L")  # luminance; alpha is dropped


def _minmax_to_uint8(arr: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Linear map lo..hi (default: data range) to 0..255, saturating outside; constant -> 0.
    Callers refuse non-finite pixels first."""
    a = np.asarray(arr, dtype=np.float64)
    if lo is None or hi is None:
        lo, hi = float(a.min()), float(a.max())
    if not hi > lo:
        return np.zeros(a.shape, dtype=np.uint8)
    out = np.clip((a - lo) * (255.0 / (hi - lo)), 0.0, 255.0)
    return np.rint(out).astype(np.uint8)


def _window_to_uint8(arr: np.ndarray) -> np.ndarray:
    """The robust window: ROBUST_PERCENTILES of the data, or min..max where they coincide."""
    lo, hi = (float(value) for value in np.percentile(arr, ROBUST_PERCENTILES))
    return _minmax_to_uint8(arr, lo, hi) if hi > lo else _minmax_to_uint8(arr)


def _refuse_non_finite(path: str | Path, values: np.ndarray) -> None:
    bad = int(values.size - np.count_nonzero(np.isfinite(values))) if values.dtype.kind == "f" else 0
    if bad:
        raise BadImageError(path, f"{bad} of {values.size} pixels are NaN or infinite (float pixel data)",
                            "re-export the image with finite pixel values")


def _with_stored(image: Image.Image, values: np.ndarray, what: str, window: str = "") -> Image.Image:
    """Keep, for the constant / near-blank messages, what the file stored (not the 8-bit result)."""
    low, high = float(np.min(values)), float(np.max(values))
    stored = f"every stored value of the {what} is {low:g}" if low == high else f"stored values {low:g}..{high:g}"
    image.info["stored"] = stored + (f", {window}" if window else "")
    return image


# ------------------------------------------------------------------------- DICOM


_Lut = Callable[..., np.ndarray]


def _dicom_luts() -> tuple[_Lut, _Lut]:
    try:  # pydicom >= 3
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut
    return apply_modality_lut, apply_voi_lut


def _read_dicom(path: str | Path) -> Image.Image:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with open(path, "rb") as fh:
            # force=True: accept preamble-less .dcm files; junk then fails on PixelData.
            ds = pydicom.dcmread(fh, force=True)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError,
            AttributeError, IndexError, OverflowError, NotImplementedError) as err:
        raise BadImageError(path, f"truncated or corrupt DICOM ({type(err).__name__}: {err})") from err

    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        if ds.preamble is None:  # no 'DICM' header either: junk parsed by force=True
            raise BadImageError(path, "corrupt or not a DICOM file (no DICM header, no pixel data)")
        raise BadImageError(path, "DICOM file has no pixel data",
                            "export the image itself, not a report/structured object")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise BadImageError(path, f"multi-frame DICOM ({frames} frames), not a single radiograph",
                            "export the single radiograph frame as its own file")
    raw = _raw_dataset_syntax(ds)
    try:
        arr = ds.pixel_array
    except Exception as err:  # decoder boundary: missing codec, bad length, odd syntax...
        if raw:
            raise BadImageError(
                path, f"DICOM without preamble and file meta information (no transfer syntax): read as {raw}, its "
                f"pixel data does not decode ({type(err).__name__}: {err})",
                "re-export it as a DICOM file (with the 128-byte preamble, 'DICM' and the file meta header)") from err
        raise BadImageError(
            path, f"cannot decode DICOM pixel data ({type(err).__name__}: {err})",
            "re-export the file; if it is compressed, install a decoder (pylibjpeg / python-gdcm)",
        ) from err

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):  # colour DICOM (rare): luminance
        luma = arr[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        return Image.fromarray(_window_to_uint8(luma))
    if arr.ndim != 2:
        raise BadImageError(path, f"unexpected DICOM pixel array shape {arr.shape}",
                            "export a single 2-D grayscale radiograph")

    try:
        apply_modality_lut, apply_voi_lut = _dicom_luts()
        values = apply_modality_lut(arr, ds)
    except Exception as err:  # malformed rescale attributes
        raise BadImageError(path, f"invalid DICOM rescale attributes ({type(err).__name__}: {err})") from err
    _refuse_non_finite(path, np.asarray(values))
    out, window = _dicom_window(path, ds, values, apply_voi_lut)
    if photometric == "MONOCHROME1":  # low values are white in MONOCHROME1
        out = 255 - out
    return _with_stored(Image.fromarray(out), np.asarray(values), "DICOM", window)


def _raw_dataset_syntax(ds) -> str | None:
    """For a DICOM written without preamble and file meta (older PACS exports; pydicom reads it with
    force=True): set the transfer syntax its encoding shows and return its name, so that the pixels
    decode. Such a file cannot hold compressed pixels (those need the file meta), so the syntax is
    one of the uncompressed ones. None for a file with file meta."""
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if "TransferSyntaxUID" in ds.file_meta:
        return None
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        return None
    syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    ds.file_meta.TransferSyntaxUID = syntax
    return syntax.name


def _numbers(value) -> str:
    """A DICOM decimal string, or several (a multi-valued window), as '40' / '40, 80'."""
    values = list(value) if hasattr(value, "__len__") and not isinstance(value, (str, bytes)) else [value]
    return ", ".join(f"{float(item):g}" for item in values)


def _dicom_window(path: str | Path, ds, values: np.ndarray, apply_voi_lut: _Lut) -> tuple[np.ndarray, str]:
    """8-bit pixels through the file's VOI LUT or window where it has one (scaled to the window's
    output range, so the window is honoured, not re-stretched), else the robust window; and the
    window in words for messages."""
    has_voi_lut = bool(ds.get("VOILUTSequence"))
    if not (has_voi_lut or ("WindowCenter" in ds and "WindowWidth" in ds)):
        return _window_to_uint8(values), ""
    try:
        windowed = apply_voi_lut(values, ds)  # prefers the VOI LUT over a window
        if has_voi_lut:
            return _minmax_to_uint8(windowed), "through the file's VOI LUT"
        with np.errstate(over="ignore"):  # probe the window's two saturated ends
            ends = apply_voi_lut(np.array([-1e30, 1e30]), ds)
    except Exception as err:  # malformed LUT / window attributes
        raise BadImageError(path, f"invalid DICOM LUT/window attributes ({type(err).__name__}: {err})") from err
    center, width = (_numbers(ds.WindowCenter), _numbers(ds.WindowWidth))
    window = f"through the file's window (WindowCenter {center}, WindowWidth {width})"
    return _minmax_to_uint8(windowed, float(np.min(ends)), float(np.max(ends))), window
