"""Issue #26, what to build 4, on copies of real NIH films (../shared/data/cxr-dev): patient ids 12 and
12.0 follow the documented zeros rule, like 007 and 7."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from conftest import SHARED_DATA, tree_checksum
from test_data_integrity import SINGLE_FILM_PATIENTS, chexpert_copy, generic_copy, nih_copy, real_rows, run, splits

pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data/cxr-dev not present")


@pytest.mark.parametrize(("policy", "patients"), [("refuse", None), ("merge", 1), ("keep", 2)])
def test_patient_ids_12_and_12_0_follow_the_zeros_rule(tmp_path: Path, capsys, policy: str, patients) -> None:
    csv = generic_copy(tmp_path / "user", real_rows())
    frame = pd.read_csv(csv, dtype=str)
    frame.loc[[0, 1], "patient"] = ["12", "12.0"]  # a spreadsheet round trip of part of the file
    frame.loc[[0, 1], "labels"] = "Mass"
    frame.to_csv(csv, index=False)
    before = tree_checksum(tmp_path / "user")
    code, err = run(tmp_path, capsys, csv, tmp_path / "user", f"dataset.patient_id_zeros={policy}", fmt="csv")
    assert tree_checksum(tmp_path / "user") == before
    if patients is None:
        assert code == 2 and "patient ids '12' (line 2), '12.0' (line 3) differ only by leading zeros" in err
        return
    mine = splits(tmp_path).set_index("path").loc[[str(tmp_path / "user" / path) for path in frame["path"][:2]]]
    assert code == 0 and mine["patient"].nunique() == patients
    if policy == "merge":
        assert set(mine["patient"]) == {"12"} and mine["split"].nunique() == 1  # never one in reserve, one in test


@pytest.mark.parametrize(("cell", "message"), [("x" * 300 + ".png", "has a name of 304 bytes (at most 255)"),
                                               ("images/a\0b.png", "holds a NUL byte")])
def test_a_path_cell_no_filesystem_accepts_is_refused_with_its_line(tmp_path: Path, capsys, cell: str, message: str) -> None:
    csv = generic_copy(tmp_path / "user", real_rows())
    frame = pd.read_csv(csv, dtype=str)
    frame.loc[3, "path"] = cell
    frame.to_csv(csv, index=False)
    before = tree_checksum(tmp_path / "user")
    code, err = run(tmp_path, capsys, csv, tmp_path / "user", fmt="csv")
    assert code == 2 and f"{csv} line 5: image path" in err and message in err and "Traceback" not in err
    assert tree_checksum(tmp_path / "user") == before


# ----------------------------------------------------------------------------- round 3, the rest (robust-26b)


def test_chexpert_no_finding_together_with_a_finding_is_refused_naming_the_line(tmp_path: Path, capsys) -> None:
    csv = chexpert_copy(tmp_path / "user", real_rows())
    lines = csv.read_text().splitlines()
    assert lines[1].endswith(",PA,1,")  # the first row: Mass=1, No Finding blank
    lines[1] = lines[1].removesuffix(",PA,1,") + ",PA,1,1"  # ... and No Finding=1 too
    csv.write_text("\n".join(lines) + "\n")
    before = tree_checksum(tmp_path / "user")
    code, err = run(tmp_path, capsys, csv, tmp_path / "user", fmt="chexpert")
    assert code == 2 and f"{csv} line 2 (" in err and "'No Finding' is positive together with finding(s) ['Mass']" in err
    assert tree_checksum(tmp_path / "user") == before  # on main: exit 0, the row kept as Mass without a word


def test_chexpert_no_finding_beside_support_devices_stands(tmp_path: Path) -> None:
    # CheXpert's own rule: No Finding excludes every pathology, and Support Devices is none.
    from workflow_scripts.common.labels import read_chexpert

    csv = chexpert_copy(tmp_path / "user", real_rows())
    lines = csv.read_text().splitlines()
    lines = [lines[0] + ",Support Devices"] + [line + "," for line in lines[1:]]
    lines[1] = lines[1].removesuffix(",PA,1,,") + ",PA,,1,1"  # a normal film with a device
    csv.write_text("\n".join(lines) + "\n")
    frame, _ = read_chexpert(csv, ["Mass", "No Finding", "Support Devices"], "negative", True)
    assert frame["labels"][0] == ["Support Devices"]


def test_nih_images_001_as_a_symlinked_folder_is_followed(tmp_path: Path, capsys) -> None:
    csv, _, rows = nih_copy(tmp_path / "store")  # the films live on another disk ...
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "images_001").symlink_to(tmp_path / "store", target_is_directory=True)  # ... linked in
    (tmp_path / "user" / "images_002").symlink_to(tmp_path / "user", target_is_directory=True)  # a link back up: no endless walk
    before = tree_checksum(tmp_path / "store")
    code, err = run(tmp_path, capsys, csv, tmp_path / "user")
    assert code == 0, err  # on main: "None of the images was found"
    assert sorted(Path(path).name for path in splits(tmp_path)["path"]) == sorted(rows["Image Index"])
    assert tree_checksum(tmp_path / "store") == before


@pytest.mark.parametrize("above", ["patient2_backup", "patient2"])
def test_a_patient_folder_above_the_chexpert_tree_is_not_every_films_patient(tmp_path: Path, capsys, above: str) -> None:
    csv = chexpert_copy(tmp_path / "user" / above, real_rows())
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join([lines[0], *(f"{above}/{line}" for line in lines[1:])]) + "\n")
    before = tree_checksum(tmp_path / "user")
    code, err = run(tmp_path, capsys, csv, tmp_path / "user", fmt="chexpert")
    assert code == 0, err  # on main: every row patient00002, "the test split is empty"
    expected = {f"patient{int(patient):05d}" for patient in real_rows()["Patient ID"]}
    assert set(splits(tmp_path)["patient"]) == expected and len(expected) == 2 * SINGLE_FILM_PATIENTS
    assert tree_checksum(tmp_path / "user") == before


def _raw_dicom(path: Path, pixels, implicit: bool, cut: int = 0) -> Path:
    """A DICOM dataset written without the 128-byte preamble, 'DICM' and file meta (old PACS exports)."""
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype("uint16").tobytes()[: len(pixels.tobytes()) - cut]
    ds.save_as(path, implicit_vr=implicit, little_endian=True, enforce_file_format=False)
    assert path.read_bytes()[:4] == b"\x28\x00\x02\x00"  # starts with the first element: no preamble, no DICM
    return path


@pytest.mark.parametrize("implicit", [True, False])
def test_a_dicom_without_preamble_and_file_meta_is_read(tmp_path: Path, implicit: bool) -> None:
    import numpy as np
    from PIL import Image
    from test_image_rules import write_dicom

    from workflow_scripts.common.images import check_image, read_xray

    film = np.asarray(Image.open(SHARED_DATA / "images" / real_rows()["Image Index"][0]).convert("L")).astype("uint16") * 16
    raw = _raw_dicom(tmp_path / "raw.dcm", film, implicit)
    before = tree_checksum(tmp_path)
    assert check_image(raw) is None  # on main: "cannot decode ... install a decoder"
    assert tree_checksum(tmp_path) == before  # the transfer syntax is set on the dataset read, never in the file
    assert np.array_equal(np.asarray(read_xray(raw)), np.asarray(read_xray(write_dicom(tmp_path / "whole.dcm", film))))
    reason = check_image(_raw_dicom(tmp_path / "cut.dcm", film, implicit, cut=1000))
    assert reason and "without preamble and file meta" in reason and "install a decoder" not in reason


def test_a_homoglyph_label_is_shown_distinguishably(tmp_path: Path, capsys) -> None:
    csv = generic_copy(tmp_path / "user", real_rows())
    lines = csv.read_text().splitlines()
    assert ",Mass," in lines[1]
    lines[1] = lines[1].replace(",Mass,", ",\u041cass,")  # a Cyrillic capital Em: 'Мass'
    csv.write_text("\n".join(lines) + "\n")
    before = tree_checksum(tmp_path / "user")
    code, err = run(tmp_path, capsys, csv, tmp_path / "user", fmt="csv")
    assert code == 2 and f"{csv} line 2" in err  # on main the message showed 'Мass' beside 'Mass', nothing else
    assert "character 1 is U+041C CYRILLIC CAPITAL LETTER EM" in err and "is not 'Mass'" in err
    assert tree_checksum(tmp_path / "user") == before


def test_a_blank_line_before_the_header_is_ignored_and_lines_stay_right(tmp_path: Path, capsys) -> None:
    csv = generic_copy(tmp_path / "user", real_rows())
    lines = csv.read_text().splitlines()
    spoiled = lines[:3] + [lines[3].replace(",Mass,", ",Nodule,").replace(",No Finding,", ",Nodule,")] + lines[4:]
    csv.write_text("\n" + "\n".join(spoiled) + "\n")  # line 1 blank, the header on line 2, the spoiled row on line 5
    code, err = run(tmp_path, capsys, csv, tmp_path / "user", fmt="csv")
    assert code == 2 and f"{csv} line 5 " in err and "unknown label(s) ['Nodule']" in err, err  # on main: "found []"
    csv.write_text("\n \n" + "\n".join(lines) + "\n")
    before = tree_checksum(tmp_path / "user")
    code, err = run(tmp_path, capsys, csv, tmp_path / "user", fmt="csv")
    assert tree_checksum(tmp_path / "user") == before
    assert code == 0 and "2 blank line(s) before the header ignored (the header is line 3)" in err
    assert len(splits(tmp_path)) == 2 * SINGLE_FILM_PATIENTS
