"""Pixel rules (issue 18) on copies of real NIH films (../shared/data/cxr-dev): non-finite pixels
are refused, high-bit films are windowed robustly, near-blank placeholders are refused without
refusing any real film, constant-image messages show what the file stored, MPO reads its primary
picture."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from conftest import SHARED_DATA
from test_data_integrity import nih_copy, run
from workflow_scripts.common.images import BLANK_SPREAD, check_image, read_xray

pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data/cxr-dev not present")

FILM = SHARED_DATA / "images" / "00000075_000.png"


def film() -> np.ndarray:
    return np.asarray(Image.open(FILM).convert("L"))


def write_dicom(path: Path, pixels: np.ndarray, **attributes) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    if pixels.dtype == np.float32:
        ds.BitsAllocated = 32
        ds.FloatPixelData = pixels.tobytes()
    else:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    for key, value in attributes.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path).Rows == pixels.shape[0]
    return path


def test_float_dicom_with_nan_pixels_is_refused(tmp_path: Path) -> None:
    pixels = film().astype(np.float32) / 255
    pixels[10, 10:13] = [np.nan, np.inf, -np.inf]
    reason = check_image(write_dicom(tmp_path / "nan.dcm", pixels))
    assert reason and "3 of 65536 pixels are NaN or infinite" in reason
    assert check_image(write_dicom(tmp_path / "ok.dcm", np.nan_to_num(pixels, posinf=0, neginf=0))) is None


def test_12_bit_film_in_16_bits_with_one_hot_pixel_keeps_its_grey_levels(tmp_path: Path) -> None:
    original = film()
    twelve = original.astype(np.uint16) * 16  # 0..4080: 12-bit data
    twelve[0, 0] = 65535  # one hot pixel
    Image.fromarray(twelve).save(tmp_path / "hot.png")
    read = np.asarray(read_xray(tmp_path / "hot.png"), float)
    # min..max windowing gave a mean of about 9 of 255 here; the robust window keeps the film's look.
    assert abs(read.mean() - original.mean()) < 12, (read.mean(), original.mean())
    assert np.corrcoef(read.ravel(), original.ravel())[0, 1] > 0.99
    write_dicom(tmp_path / "hot.dcm", twelve)  # the same in a DICOM without a window
    assert abs(np.asarray(read_xray(tmp_path / "hot.dcm"), float).mean() - original.mean()) < 12


def test_near_blank_placeholder_is_refused(tmp_path: Path) -> None:
    pixels = np.zeros((256, 256), np.uint8)
    pixels[100, 100] = 1
    Image.fromarray(pixels).save(tmp_path / "blank.png")
    reason = check_image(tmp_path / "blank.png")
    assert reason and "near-blank image" in reason and "all pixels within 0..1" in reason
    noisy = np.random.default_rng(0).integers(118, 122, (256, 256)).astype(np.uint8)  # grey card with sensor noise
    Image.fromarray(noisy).save(tmp_path / "card.png")
    assert "near-blank image" in (check_image(tmp_path / "card.png") or "")


def test_no_real_dev_film_is_refused_as_blank() -> None:
    """The calibration: every film of cxr-dev (371 real NIH radiographs) passes, with a wide margin."""
    spreads = {}
    for path in sorted((SHARED_DATA / "images").glob("*.png")):
        assert check_image(path) is None, path
        p1, p99 = np.percentile(np.asarray(Image.open(path).convert("L")), [1, 99])
        spreads[path.name] = p99 - p1
    assert len(spreads) == 371
    assert min(spreads.values()) > 10 * BLANK_SPREAD, min(spreads.items(), key=lambda item: item[1])


def test_low_contrast_real_film_is_not_blank(tmp_path: Path) -> None:
    """A real film squeezed to a quarter of its contrast (a washed-out scan) is still a film."""
    faint = (film().astype(float) / 4 + 100).astype(np.uint8)
    Image.fromarray(faint).save(tmp_path / "faint.png")
    assert check_image(tmp_path / "faint.png") is None


def test_constant_16_bit_png_reports_the_stored_value(tmp_path: Path) -> None:
    Image.fromarray(np.full((256, 256), 1234, np.uint16)).save(tmp_path / "flat.png")
    reason = check_image(tmp_path / "flat.png")
    assert reason and "constant image" in reason and "every stored value of the 16-bit image is 1234" in reason


def test_dicom_window_making_the_film_constant_reports_values_and_window(tmp_path: Path) -> None:
    pixels = 1000 + film().astype(np.uint16) * 4  # 1000..2020
    path = write_dicom(tmp_path / "window.dcm", pixels, WindowCenter=10, WindowWidth=2)
    reason = check_image(path)
    assert reason and "constant image (every pixel is 255" in reason
    assert "stored values 1000..2020" in reason and "WindowCenter 10, WindowWidth 2" in reason


def test_mpo_jpeg_reads_its_primary_picture(tmp_path: Path) -> None:
    original = film()
    Image.fromarray(original).save(tmp_path / "stereo.jpg", format="MPO", save_all=True,
                                   append_images=[Image.fromarray(255 - original)], quality=95)
    assert Image.open(tmp_path / "stereo.jpg").n_frames == 2
    read = np.asarray(read_xray(tmp_path / "stereo.jpg"), float)
    assert np.abs(read - original).mean() < 3  # frame 0 (JPEG-lossy), not the inverted second picture


def test_nan_dicom_in_a_dataset_stops_the_run_naming_the_line(tmp_path: Path, capsys) -> None:
    csv, images, rows = nih_copy(tmp_path / "user")
    pixels = np.asarray(Image.open(images / rows["Image Index"][2]).convert("L")).astype(np.float32)
    pixels[5, 5] = np.nan
    write_dicom(images / "nan.dcm", pixels)
    csv.write_text(csv.read_text().replace(rows["Image Index"][2], "nan.dcm"))
    code, err = run(tmp_path, capsys, csv, images)
    assert code == 2 and "line 4: image nan.dcm" in err and "1 of 65536 pixels are NaN or infinite" in err
