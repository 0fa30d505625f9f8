"""Data robustness, round 2 (issue 18), on copies of real NIH films (../shared/data/cxr-dev): one
file is one file whatever its names, one patient is one patient whatever its id's spelling, the
label file is read as written (line numbers, headers, paths), and every refusal names its cause."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from conftest import REPO, SHARED_DATA, tree_checksum
from test_data_integrity import SINGLE_FILM_PATIENTS, chexpert_copy, generic_copy, nih_copy, real_rows, run, splits
from workflow_scripts.data import verify_dataset

pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data/cxr-dev not present")


def csv_lines(csv: Path) -> list[str]:
    return csv.read_text().splitlines()


def add_row(csv: Path, row: str) -> int:
    """Append a row; its line number."""
    csv.write_text(csv.read_text() + row + "\n")
    return len(csv_lines(csv))


# ----------------------------------------------------------------------------- one file, one film


def test_hard_link_under_another_name_and_patient_is_refused(tmp_path: Path, capsys) -> None:
    csv = generic_copy(tmp_path / "user", real_rows())
    first = csv_lines(csv)[1].split(",")[0]
    os.link(tmp_path / "user" / first, tmp_path / "user" / "other.png")
    line = add_row(csv, "other.png,Mass,p999999")
    code, err = run(tmp_path, capsys, csv, tmp_path / "user", fmt="csv")
    assert code == 2 and f"lines 2 and {line}: {first} and other.png are the same file" in err
    assert "one device and inode" in err


def test_every_row_of_one_file_is_named(tmp_path: Path, capsys) -> None:
    csv = generic_copy(tmp_path / "user", real_rows())
    first = csv_lines(csv)[1].split(",")[0]
    os.link(tmp_path / "user" / first, tmp_path / "user" / "a.png")
    (tmp_path / "user" / "b.png").symlink_to(tmp_path / "user" / first)
    lines = [add_row(csv, "a.png,Mass,p999998"), add_row(csv, "b.png,Mass,p999999")]
    code, err = run(tmp_path, capsys, csv, tmp_path / "user", fmt="csv")
    assert code == 2 and f"lines 2, {lines[0]} and {lines[1]}: {first}, a.png and b.png are the same file" in err


def test_byte_identical_copy_under_another_patient_is_refused(tmp_path: Path, capsys) -> None:
    csv = generic_copy(tmp_path / "user", real_rows())
    first = csv_lines(csv)[1].split(",")[0]
    shutil.copyfile(tmp_path / "user" / first, tmp_path / "user" / "copy.png")  # another inode, same bytes
    line = add_row(csv, "copy.png,Mass,p999999")
    code, err = run(tmp_path, capsys, csv, tmp_path / "user", fmt="csv")
    assert code == 2 and f"lines 2 and {line}: {first} and copy.png are byte-identical copies of one file" in err
    assert "patient p999999" in err
    # Documented: without decoding (image_check: exists) files are not read, so content is not compared.
    assert run(tmp_path, capsys, csv, tmp_path / "user", "dataset.image_check=exists", fmt="csv")[0] == 0


def test_verify_refuses_a_hard_link_across_splits(tmp_path: Path, capsys) -> None:
    csv, images, _ = nih_copy(tmp_path / "user")
    sets = ("model.resolution=32", "verify.max_images=4", "verify.contact_sheet_images=2")
    assert run(tmp_path, capsys, csv, images, *sets)[0] == 0
    train, test = (pd.read_csv(tmp_path / "out" / f"{name}.csv", dtype=str) for name in ("train", "test"))
    os.link(train["path"].iloc[0], tmp_path / "linked.png")
    extra = train.iloc[[0]].assign(split="test", patient="999999", path=str(tmp_path / "linked.png"))
    pd.concat([test, extra]).to_csv(tmp_path / "out" / "test.csv", index=False)
    code, err = run(tmp_path, capsys, csv, images, *sets, command=verify_dataset.main)
    assert code == 2 and "is in the train split" in err and "and in the test split" in err


# ----------------------------------------------------------------------------- one patient, one id


def test_chexpert_patient_ids_with_and_without_zero_padding_are_one_patient(tmp_path: Path, capsys) -> None:
    csv = chexpert_copy(tmp_path / "user", real_rows())
    films = ["00030006_000.png", "00030006_001.png"]
    for study, (folder, name) in enumerate(zip(["patient00042", "patient42"], films)):
        path = f"CheXpert-v1.0-small/train/{folder}/study{study}/view1_frontal.jpg"
        (tmp_path / "user" / path).parent.mkdir(parents=True)
        Image.open(SHARED_DATA / "images" / name).save(tmp_path / "user" / path, quality=95)
        add_row(csv, f"{path},Female,61,Frontal,PA,1,")
    assert run(tmp_path, capsys, csv, tmp_path / "user", fmt="chexpert")[0] == 0
    kept = splits(tmp_path)
    mine = kept[kept["path"].str.contains("patient00042|patient42/", regex=True)]
    assert len(mine) == 2 and set(mine["patient"]) == {"patient00042"} and mine["split"].nunique() == 1


@pytest.mark.parametrize("spelling", ["NaN", "nan", "None", "null", "NA", "N/A", "#N/A"])
def test_missing_value_spellings_are_refused_like_an_empty_id(tmp_path: Path, capsys, spelling: str) -> None:
    csv = generic_copy(tmp_path / "user", real_rows())
    frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    frame.loc[[1, 7], "patient"] = spelling  # films of two different patients
    frame.to_csv(csv, index=False)
    code, err = run(tmp_path, capsys, csv, tmp_path / "user", fmt="csv")
    assert code == 2 and f"line 3 ({frame['path'][1]}): empty patient id ({spelling!r}" in err
    rows, images, _ = nih_copy(tmp_path / "nih")
    frame = pd.read_csv(rows, dtype=str)
    frame.loc[2, "Patient ID"] = spelling
    frame.to_csv(rows, index=False)
    code, err = run(tmp_path, capsys, rows, images)
    assert code == 2 and f"line 4 ({frame['Image Index'][2]}): empty patient id ({spelling!r}" in err


@pytest.mark.parametrize(("policy", "patients"), [("refuse", None), ("merge", 1), ("keep", 2)])
def test_generic_ids_007_and_7_follow_the_documented_policy(tmp_path: Path, capsys, policy: str, patients) -> None:
    csv = generic_copy(tmp_path / "user", real_rows())
    frame = pd.read_csv(csv, dtype=str)
    frame.loc[[0, 1], "patient"] = ["007", "7"]
    frame.loc[[0, 1], "labels"] = "Mass"
    frame.to_csv(csv, index=False)
    code, err = run(tmp_path, capsys, csv, tmp_path / "user", f"dataset.patient_id_zeros={policy}", fmt="csv")
    if patients is None:
        assert code == 2 and "patient ids '007' (line 2), '7' (line 3) differ only by leading zeros" in err
        assert "dataset.patient_id_zeros: merge" in err
        return
    mine = splits(tmp_path).set_index("path").loc[[str(tmp_path / "user" / path) for path in frame["path"][:2]]]
    assert code == 0 and mine["patient"].nunique() == patients
    if policy == "merge":
        assert set(mine["patient"]) == {"7"} and mine["split"].nunique() == 1


def test_patient_column_naming_the_path_column_needs_the_opt_in(tmp_path: Path, capsys) -> None:
    csv = generic_copy(tmp_path / "user", real_rows())
    code, err = run(tmp_path, capsys, csv, tmp_path / "user", "dataset.patient_column=path", fmt="csv")
    assert code == 2 and "dataset.patient_column and dataset.path_column both name 'path'" in err
    code, err = run(tmp_path, capsys, csv, tmp_path / "user", "dataset.patient_column=path",
                    "dataset.allow_missing_patient=true", fmt="csv")
    assert code == 0 and "every image counts as its own patient" in err


# ----------------------------------------------------------------------------- the label file as written


def test_duplicate_header_name_is_refused(tmp_path: Path, capsys) -> None:
    csv = generic_copy(tmp_path / "user", real_rows())
    lines = csv_lines(csv)
    csv.write_text("\n".join([lines[0] + ",patient"] + [line + ",p1" for line in lines[1:]]) + "\n")
    code, err = run(tmp_path, capsys, csv, tmp_path / "user", fmt="csv")
    assert code == 2 and "'patient' in columns [3, 4]" in err and "Rename or remove the extra column" in err


def test_line_numbers_are_true_across_quoted_newlines(tmp_path: Path, capsys) -> None:
    rows = real_rows()
    rows["Note"] = ""
    rows.loc[1, "Note"] = "first line\nsecond line\nthird line"  # row 2 spans lines 3 to 5
    rows.loc[3, "Finding Labels"] = "Dragon"
    csv, images, _ = nih_copy(tmp_path / "user", rows)
    code, err = run(tmp_path, capsys, csv, images)
    assert code == 2 and f"line 7 ({rows['Image Index'][3]}): unknown label(s) ['Dragon']" in err


def test_label_holding_the_join_character_is_refused_at_config_time(tmp_path: Path, capsys) -> None:
    csv = generic_copy(tmp_path / "user", real_rows())
    csv.write_text(csv.read_text().replace(",Mass,", ",Nodule|left,"))
    code, err = run(tmp_path, capsys, csv, tmp_path / "user", "dataset.label_separator=;",
                    labels=["Nodule|left", "No Finding"], fmt="csv")
    assert code == 2 and "dataset.labels: ['Nodule|left'] contain '|'" in err


@pytest.mark.parametrize("where", ["absolute", "dotdot"])
def test_paths_leaving_the_images_folder_need_the_opt_in(tmp_path: Path, capsys, where: str) -> None:
    csv = generic_copy(tmp_path / "user", real_rows())
    outside = tmp_path / "elsewhere" / "x.png"
    outside.parent.mkdir()
    shutil.copyfile(SHARED_DATA / "images" / "00000075_000.png", outside)
    path = str(outside) if where == "absolute" else "../elsewhere/x.png"
    line = add_row(csv, f"{path},Mass,p999999")
    code, err = run(tmp_path, capsys, csv, tmp_path / "user", fmt="csv")
    assert code == 2 and f"line {line}: image {path} is outside dataset.images" in err
    assert "dataset.allow_outside_paths: true" in err
    code, _ = run(tmp_path, capsys, csv, tmp_path / "user", "dataset.allow_outside_paths=true", fmt="csv")
    assert code == 0 and (splits(tmp_path)["patient"] == "p999999").sum() == 1


# ----------------------------------------------------------------------------- files that are not plain files


def _fifo(path: Path) -> str:
    os.mkfifo(path)
    return "is not a regular file (a FIFO (named pipe))"


def _loop(path: Path) -> str:
    path.symlink_to(path)
    return "is a symbolic link loop"


def _dangling(path: Path) -> str:
    path.symlink_to(path.parent / "gone.png")
    return "is a symbolic link to a missing file"


@pytest.mark.parametrize("spoil", [_fifo, _loop, _dangling])
def test_special_files_are_named_for_what_they_are(tmp_path: Path, capsys, spoil) -> None:
    csv = generic_copy(tmp_path / "user", real_rows())
    first = csv_lines(csv)[1].split(",")[0]
    (tmp_path / "user" / first).unlink()
    reason = spoil(tmp_path / "user" / first)
    code, err = run(tmp_path, capsys, csv, tmp_path / "user", fmt="csv")
    assert code == 2 and f"line 2: image {first}" in err and reason in err and "file not found" not in err


def test_tilde_is_named_as_not_expanded(tmp_path: Path, capsys) -> None:
    csv = generic_copy(tmp_path / "user", real_rows())
    first = csv_lines(csv)[1].split(",")[0]
    csv.write_text(csv.read_text().replace(first, "~/" + first, 1))
    code, err = run(tmp_path, capsys, csv, tmp_path / "user", fmt="csv")
    assert code == 2 and "line 2" in err and "starts with '~', which is not expanded" in err
    code, err = run(tmp_path, capsys, csv, "~/user", fmt="csv")
    assert code == 2 and "dataset.images: '~/user' starts with '~'" in err


@pytest.mark.parametrize("disk", ["nfd", "trailing space"])
def test_names_matching_only_after_normalisation_resolve_with_a_note(tmp_path: Path, capsys, disk: str) -> None:
    csv = generic_copy(tmp_path / "user", real_rows())
    first = csv_lines(csv)[1].split(",")[0]
    written = first.replace("film0", "Ren\u00e9e")  # NFC in the CSV
    on_disk = unicodedata.normalize("NFD", written) if disk == "nfd" else written + " "
    (tmp_path / "user" / first).rename(tmp_path / "user" / on_disk)
    csv.write_text(csv.read_text().replace(first, written + (" " if disk != "nfd" else ""), 1))
    before = tree_checksum(tmp_path / "user")
    code, err = run(tmp_path, capsys, csv, tmp_path / "user", fmt="csv")
    assert code == 0 and "1 path(s) match their file only after Unicode normalisation" in err
    assert str(tmp_path / "user" / on_disk) in splits(tmp_path)["path"].tolist()
    assert tree_checksum(tmp_path / "user") == before
    notes = json.loads((tmp_path / "out" / "prepare_summary.json").read_text())["notes"]
    assert any("Unicode normalisation" in note for note in notes)


def test_dataset_folder_with_braces_works_by_hand_and_snakemake_names_the_key(tmp_path: Path, capsys) -> None:
    csv, images, _ = nih_copy(tmp_path / "set{1}")
    assert run(tmp_path, capsys, csv, images)[0] == 0 and len(splits(tmp_path)) == 2 * SINGLE_FILM_PATIENTS
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                             "--configfile", str(REPO / "config" / "config.yaml"),
                             "--config", f"dataset={{csv: '{csv}', images: '{images}'}}"], capture_output=True, text=True)
    assert result.returncode != 0 and f"dataset.csv: '{csv}' holds a brace" in result.stdout + result.stderr
    assert "WildcardError" not in result.stdout + result.stderr


# ----------------------------------------------------------------------------- CheXpert views, coverage


def test_chexpert_blank_view_takes_the_view_from_the_path(tmp_path: Path, capsys) -> None:
    csv = chexpert_copy(tmp_path / "user", real_rows(), view="")
    code, err = run(tmp_path, capsys, csv, tmp_path / "user", fmt="chexpert")
    assert code == 0 and len(splits(tmp_path)) == 2 * SINGLE_FILM_PATIENTS and "lateral" not in err
    first = csv_lines(csv)[1].split(",")[0]
    (tmp_path / "user" / first).rename(tmp_path / "user" / first.replace("view1_frontal", "image"))
    csv.write_text(csv.read_text().replace(first, first.replace("view1_frontal", "image"), 1))
    code, err = run(tmp_path, capsys, csv, tmp_path / "user", fmt="chexpert")
    assert code == 2 and "line 2" in err and "Frontal/Lateral is 'blank' and the file name does not say the view" in err


def test_no_training_image_says_they_were_skipped_as_bad(tmp_path: Path, capsys) -> None:
    csv, images, rows = nih_copy(tmp_path / "user")
    for name in rows[rows["Finding Labels"] == "Mass"]["Image Index"]:
        Image.new("L", (256, 256), 0).save(images / name)
    code, err = run(tmp_path, capsys, csv, images, "dataset.on_bad_image=skip")
    assert code == 2 and "Mass: 6 image(s) in the label file, " in err
    assert "training image(s) skipped as unusable (line " in err and "constant image (every pixel is 0)" in err


def test_val_fraction_zero_is_refused_by_key(tmp_path: Path, capsys) -> None:
    csv, images, _ = nih_copy(tmp_path / "user")
    code, err = run(tmp_path, capsys, csv, images, "split.val_fraction=0")
    assert code == 2 and "split.val_fraction: 0 leaves the val split empty" in err

