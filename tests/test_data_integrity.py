"""Data integrity on copies of real NIH radiographs (../shared/data/cxr-dev): every row resolves to
its own file, every patient is one patient, unusable images are refused or reported, and every
refusal exits 2 naming its real cause. Each test copies only the few files it needs into tmp_path."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from conftest import REPO, SHARED_DATA, split_flags, tree_checksum
from workflow_scripts.data import prepare_dataset, verify_dataset
from workflow_scripts.data.resolve import find_bad_images
from workflow_scripts.common.tables import SPLITS, load_split

pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data/cxr-dev not present")

VOCAB = ["Mass", "No Finding"]
SINGLE_FILM_PATIENTS = 6  # per label: enough for every label to reach train, val and test


def real_rows(per_label: dict[str, int] | None = None, patients: tuple[int, ...] = ()) -> pd.DataFrame:
    """Rows of the real label file: the first N single-film patients of each label (one label per
    image), plus every film of `patients`."""
    frame = pd.read_csv(SHARED_DATA / "labels.csv", dtype=str)
    films = frame.groupby("Patient ID")["Image Index"].transform("size")
    picked = [frame[frame["Patient ID"].astype(int).isin(patients)]]
    for label, count in (per_label or {label: SINGLE_FILM_PATIENTS for label in VOCAB}).items():
        picked.append(frame[(frame["Finding Labels"] == label) & (films == 1)].head(count))
    return pd.concat(picked, ignore_index=True)


def copy_images(rows: pd.DataFrame, images: Path) -> Path:
    images.mkdir(parents=True, exist_ok=True)
    for name in rows["Image Index"]:
        shutil.copyfile(SHARED_DATA / "images" / name, images / name)
    return images


def nih_copy(root: Path, rows: pd.DataFrame | None = None) -> tuple[Path, Path, pd.DataFrame]:
    """An NIH-format copy: root/Data_Entry_2017.csv and root/images/."""
    rows = real_rows() if rows is None else rows
    images = copy_images(rows, root / "images")
    csv = root / "Data_Entry_2017.csv"
    rows.to_csv(csv, index=False)
    return csv, images, rows


def run(tmp_path: Path, capsys, csv: Path, images: Path | str, *sets: str, labels=VOCAB, fmt: str = "nih",
        command=prepare_dataset.main, extra: tuple[str, ...] = ()) -> tuple[int, str]:
    flags = ["--set", f"dataset.format={fmt}", "--set", f"dataset.csv={csv}", "--set", f"dataset.images={images}",
             "--set", f"dataset.labels=[{', '.join(labels)}]"]
    for item in sets:
        flags += ["--set", item]
    out = ["--out-dir", str(tmp_path / "out")]
    if command is not prepare_dataset.main:
        out = [*split_flags(tmp_path / "out", *SPLITS), *out]
    code = command([*flags, *out, *extra])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def splits(tmp_path: Path) -> pd.DataFrame:
    return pd.concat([load_split(tmp_path / "out", name) for name in SPLITS])


def generic_copy(root: Path, rows: pd.DataFrame, patient_column: bool = True) -> Path:
    """The README's generic layout: one folder per patient, every file named film0.png."""
    lines = ["path,labels" + (",patient" if patient_column else "")]
    for record in rows.itertuples():
        path = f"p{int(record[3])}/film0.png"
        (root / f"p{int(record[3])}").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SHARED_DATA / "images" / record[1], root / path)
        lines.append(f"{path},{record[2]}" + (f",p{int(record[3])}" if patient_column else ""))
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root / "labels.csv"


def chexpert_copy(root: Path, rows: pd.DataFrame, view: str = "Frontal", patient_folders: bool = True) -> Path:
    """A CheXpert-format copy (JPEG files, every one named view1_frontal.jpg)."""
    lines = ["Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(VOCAB)]
    for record in rows.itertuples():
        folder = f"patient{int(record[3]):05d}/study1" if patient_folders else f"study{int(record[3])}"
        path = f"CheXpert-v1.0-small/train/{folder}/view1_frontal.jpg"
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        Image.open(SHARED_DATA / "images" / record[1]).save(root / path, quality=95)
        values = ",".join("1" if record[2] == label else "" for label in VOCAB)
        lines.append(f"{path},Female,61,{view},PA,{values}")
    (root / "CheXpert-v1.0-small" / "train.csv").write_text("\n".join(lines) + "\n")
    return root / "CheXpert-v1.0-small" / "train.csv"


# ----------------------------------------------------------------------------- one row, one file


def test_missing_file_is_missing_not_a_namesake_of_another_patient(tmp_path: Path, capsys) -> None:
    csv = generic_copy(tmp_path / "user", real_rows())
    victim = sorted((tmp_path / "user").glob("p*/film0.png"))[0]
    victim.unlink()
    name = f"{victim.parent.name}/film0.png"
    line = csv.read_text().splitlines().index(next(row for row in csv.read_text().splitlines() if row.startswith(name))) + 1
    code, err = run(tmp_path, capsys, csv, tmp_path / "user", fmt="csv")
    assert code == 2 and f"line {line}: image {name} " in err and "file not found" in err
    code, err = run(tmp_path, capsys, csv, tmp_path / "user", "dataset.on_bad_image=skip", fmt="csv")
    assert code == 0
    assert pd.read_csv(tmp_path / "out" / "skipped.csv")["path"].tolist() == [name]
    kept = splits(tmp_path)
    assert len(kept) == 2 * SINGLE_FILM_PATIENTS - 1 and kept["path"].is_unique


def test_chexpert_images_folder_one_level_too_deep_finds_nothing(tmp_path: Path, capsys) -> None:
    csv = chexpert_copy(tmp_path / "user", real_rows())
    too_deep = tmp_path / "user" / "CheXpert-v1.0-small"
    code, err = run(tmp_path, capsys, csv, too_deep, fmt="chexpert")
    assert code == 2 and "None of the images was found: check dataset.images" in err
    code, err = run(tmp_path, capsys, csv, too_deep, "dataset.on_bad_image=skip", fmt="chexpert")
    assert code == 2 and f"all {2 * SINGLE_FILM_PATIENTS} images unusable" in err and "line 2 CheXpert-v1.0-small" in err
    assert len(pd.read_csv(tmp_path / "out" / "skipped.csv")) == 2 * SINGLE_FILM_PATIENTS
    code, _ = run(tmp_path, capsys, csv, tmp_path / "user", fmt="chexpert")
    assert code == 0 and splits(tmp_path)["path"].is_unique  # the right folder: 12 distinct files


def test_nih_name_found_in_two_nested_folders_is_refused_with_the_candidates(tmp_path: Path, capsys) -> None:
    csv, images, rows = nih_copy(tmp_path / "user")
    for index, png in enumerate(sorted(images.glob("*.png"))):
        nested = images / f"images_00{1 + index % 2}" / "images"
        nested.mkdir(parents=True, exist_ok=True)
        png.rename(nested / png.name)
    name = rows["Image Index"].iloc[0]
    twin = images / "images_003" / "images" / name
    twin.parent.mkdir(parents=True)
    shutil.copyfile(SHARED_DATA / "images" / rows["Image Index"].iloc[1], twin)  # same name, other pixels
    code, err = run(tmp_path, capsys, csv, images)
    assert code == 2 and f"line 2: image {name}" in err and "2 files of that name" in err
    assert str(twin) in err and str(images / "images_001" / "images" / name) in err


@pytest.mark.parametrize("alias", ["./{name}", "{folder}/../{name}", "link-{name}"])
def test_one_file_under_two_names_is_refused(tmp_path: Path, capsys, alias: str) -> None:
    csv = generic_copy(tmp_path / "user", real_rows())
    first, second = (line.split(",")[0] for line in csv.read_text().splitlines()[1:3])
    other = alias.format(name=first, folder=Path(second).parent)
    if other.startswith("link-"):
        other = f"link-{Path(first).parent.name}.png"
        (tmp_path / "user" / other).symlink_to(tmp_path / "user" / first)
    csv.write_text(csv.read_text() + f"{other},Mass,p999999\n")
    code, err = run(tmp_path, capsys, csv, tmp_path / "user", fmt="csv")
    line = len(csv.read_text().splitlines())
    assert code == 2 and f"lines 2 and {line}: {first} and {other} are the same file" in err


# ----------------------------------------------------------------------------- one patient, one id


def test_nih_patient_ids_with_and_without_leading_zeros_are_one_patient(tmp_path: Path, capsys) -> None:
    rows = real_rows(patients=(30006, 30183))
    rows["Patient ID"] = [pid.zfill(8) if i % 2 else pid for i, pid in enumerate(rows["Patient ID"])]
    csv, images, _ = nih_copy(tmp_path / "user", rows)
    labels = sorted({label for cell in rows["Finding Labels"] for label in cell.split("|")})
    code, _ = run(tmp_path, capsys, csv, images, "dataset.allow_absent_labels=true", labels=labels)
    assert code == 0
    kept = splits(tmp_path)
    for patient in ("30006", "30183"):
        films = kept[kept["path"].str.contains(f"000{patient}_")]
        assert set(films["patient"]) == {patient} and films["split"].nunique() == 1 and len(films) >= 4


def test_nih_patient_id_contradicting_the_image_name_is_refused(tmp_path: Path, capsys) -> None:
    rows = real_rows()
    rows.loc[3, "Patient ID"] = "12345"
    csv, images, _ = nih_copy(tmp_path / "user", rows)
    code, err = run(tmp_path, capsys, csv, images)
    assert code == 2 and f"line 5 ({rows['Image Index'][3]}): the image name says patient" in err and "12345" in err


def test_generic_csv_without_patient_column_needs_the_opt_in(tmp_path: Path, capsys) -> None:
    csv = generic_copy(tmp_path / "user", real_rows(), patient_column=False)
    code, err = run(tmp_path, capsys, csv, tmp_path / "user", "dataset.patient_column=null", fmt="csv")
    assert code == 2 and "dataset.patient_column is null" in err and "dataset.allow_missing_patient: true" in err
    code, err = run(tmp_path, capsys, csv, tmp_path / "user", "dataset.patient_column=null",
                    "dataset.allow_missing_patient=true", fmt="csv")
    assert code == 0 and "every image counts as its own patient" in err


def test_chexpert_path_without_patient_folder_gets_the_note(tmp_path: Path, capsys) -> None:
    csv = chexpert_copy(tmp_path / "user", real_rows(), patient_folders=False)
    code, err = run(tmp_path, capsys, csv, tmp_path / "user", fmt="chexpert")
    assert code == 0 and "have no patientNNNNN folder (first: line 2)" in err
    summary = json.loads((tmp_path / "out" / "prepare_summary.json").read_text())
    assert any("no patientNNNNN folder" in note for note in summary["notes"])


# ----------------------------------------------------------------------------- images a model can learn from


def _one_pixel(path: Path) -> str:
    Image.new("L", (1, 1), 90).save(path)
    return "1x1 px, smaller than the minimum side of 32 px"


def _all_black(path: Path) -> str:
    Image.new("L", (256, 256), 0).save(path)
    return "constant image (every pixel is 0)"


def _animated(path: Path) -> str:
    frames = [Image.open(SHARED_DATA / "images" / path.name).copy(), Image.new("L", (256, 256), 40)]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    return "animated PNG (2 frames)"


@pytest.mark.parametrize("spoil", [_one_pixel, _all_black, _animated])
def test_degenerate_images_are_refused_or_skipped_with_their_reason(tmp_path: Path, capsys, spoil) -> None:
    csv, images, rows = nih_copy(tmp_path / "user")
    name = rows["Image Index"].iloc[4]
    reason = spoil(images / name)
    code, err = run(tmp_path, capsys, csv, images)
    assert code == 2 and f"line 6: image {name}" in err and reason in err
    code, _ = run(tmp_path, capsys, csv, images, "dataset.on_bad_image=skip")
    skipped = pd.read_csv(tmp_path / "out" / "skipped.csv")
    assert code == 0 and skipped["path"].tolist() == [name] and reason in skipped["reason"].iloc[0]


def test_parallel_image_check_gives_the_serial_result(tmp_path: Path, capsys) -> None:
    csv, images, rows = nih_copy(tmp_path / "user")
    paths = [images / name for name in rows["Image Index"]]
    _one_pixel(paths[1]), _all_black(paths[5]), paths[7].write_bytes(paths[7].read_bytes()[:500])
    serial = find_bad_images(paths, decode=True, workers=1)
    assert find_bad_images(paths, decode=True, workers=2) == serial
    assert [i for i, reason in enumerate(serial) if reason] == [1, 5, 7]
    outputs = {}
    for workers in ("1", "2"):
        code, err = run(tmp_path, capsys, csv, images, extra=("--workers", workers))
        assert code == 2 and f"line 3: image {rows['Image Index'][1]}" in err
        outputs[workers] = err
        assert run(tmp_path, capsys, csv, images, "dataset.on_bad_image=skip", extra=("--workers", workers))[0] == 0
        outputs[workers] += "".join((tmp_path / "out" / f"{name}.csv").read_text() for name in ("train", "val", "test", "skipped"))
    assert outputs["1"] == outputs["2"]


# ----------------------------------------------------------------------------- refusals that name their cause


def test_split_failure_names_the_groups_that_are_too_small(tmp_path: Path, capsys) -> None:
    labels = ["Atelectasis", "Cardiomegaly", "Consolidation", "Effusion", "Emphysema", "Fibrosis", "Infiltration",
              "Mass", "Nodule", "Pneumothorax", "Pleural_Thickening", "Pneumonia", "Edema", "Hernia", "No Finding"]
    csv, images, _ = nih_copy(tmp_path / "user", real_rows({label: 1 for label in labels}))
    code, err = run(tmp_path, capsys, csv, images, labels=labels)
    assert code == 2 and "the test split is empty" in err and "15 patients" in err
    assert "Groups too small: ['Atelectasis', 'Cardiomegaly'" in err and "raise split.test_fraction" in err


def test_all_lateral_chexpert_says_so(tmp_path: Path, capsys) -> None:
    csv = chexpert_copy(tmp_path / "user", real_rows(), view="Lateral")
    code, err = run(tmp_path, capsys, csv, tmp_path / "user", fmt="chexpert")
    assert code == 2 and f"all {2 * SINGLE_FILM_PATIENTS} rows are lateral views" in err and "dataset.frontal_only" in err


def test_chexpert_image_without_positive_finding_stays_as_a_negative(tmp_path: Path, capsys) -> None:
    csv = chexpert_copy(tmp_path / "user", real_rows())
    csv.write_text(csv.read_text().replace(",PA,,1\n", ",PA,,\n"))  # no positive at all: still a normal film
    code, _ = run(tmp_path, capsys, csv, tmp_path / "user", fmt="chexpert")
    kept = splits(tmp_path)
    assert code == 0 and len(kept) == 2 * SINGLE_FILM_PATIENTS and pd.read_csv(tmp_path / "out" / "skipped.csv").empty
    assert (kept["labels"] == "No Finding").sum() == SINGLE_FILM_PATIENTS and (kept[kept["split"] != "train"]["labels"] == "No Finding").any()


def test_label_file_or_images_folder_of_the_wrong_kind(tmp_path: Path, capsys) -> None:
    csv, images, _ = nih_copy(tmp_path / "user")
    code, err = run(tmp_path, capsys, csv.parent, images)
    assert code == 2 and f"{csv.parent}: is a folder, not a CSV file" in err
    code, err = run(tmp_path, capsys, csv, "/")
    assert code == 2 and "dataset.images: '/' is the filesystem root" in err
    code, err = run(tmp_path, capsys, csv, csv)
    assert code == 2 and f"{csv}: is a file, not a folder" in err


@pytest.mark.parametrize("case", ["images at /", "csv is a folder"])
def test_snakemake_refuses_paths_of_the_wrong_kind(tmp_path: Path, case: str) -> None:
    csv, images, _ = nih_copy(tmp_path / "user", real_rows({"Mass": 1}))
    dataset, message = ((f"{{csv: {csv}, images: /}}", "dataset.images: '/' is the filesystem root") if case == "images at /"
                        else (f"{{csv: {csv.parent}, images: {images}}}", f"dataset.csv: {csv.parent} is a folder"))
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                             "--configfile", str(REPO / "config" / "config.yaml"), "--config", f"dataset={dataset}"],
                            capture_output=True, text=True)
    assert result.returncode != 0 and message in result.stdout + result.stderr


def test_line_numbers_count_blank_lines(tmp_path: Path, capsys) -> None:
    csv, images, _ = nih_copy(tmp_path / "user")
    lines = csv.read_text().splitlines()
    lines[4] = lines[4].replace(",Mass,", ",Dragon,").replace(",No Finding,", ",Dragon,")
    csv.write_text("\n".join(lines[:2] + ["", ""] + lines[2:]) + "\n")  # the bad row is now on line 7
    code, err = run(tmp_path, capsys, csv, images)
    assert code == 2 and re.search(r"line 7 \(\d+_\d+\.png\): unknown label\(s\) \['Dragon'\]", err), err
    assert "2 blank line(s) ignored (first: line 3)" in err


def test_vocabulary_label_without_training_images_is_an_error_or_left_out(tmp_path: Path, capsys) -> None:
    csv, images, _ = nih_copy(tmp_path / "user")
    code, err = run(tmp_path, capsys, csv, images, labels=[*VOCAB, "Hernia"])
    assert code == 2 and "label(s) ['Hernia'] of dataset.labels have no training image (Hernia: 0 image(s)" in err
    code, err = run(tmp_path, capsys, csv, images, "dataset.allow_absent_labels=true", labels=[*VOCAB, "Hernia"])
    summary = json.loads((tmp_path / "out" / "prepare_summary.json").read_text())
    assert code == 0 and summary["labels_absent"] == ["Hernia"] and "['Hernia']" in err


def test_all_images_missing_writes_the_skip_report(tmp_path: Path, capsys) -> None:
    csv, images, _ = nih_copy(tmp_path / "user")
    for png in images.glob("*.png"):
        png.unlink()
    code, err = run(tmp_path, capsys, csv, images, "dataset.on_bad_image=skip")
    assert code == 2 and f"all {2 * SINGLE_FILM_PATIENTS} images unusable" in err and "first reasons: line 2 " in err
    assert f"By reason: file not found x {2 * SINGLE_FILM_PATIENTS}." in err
    assert len(pd.read_csv(tmp_path / "out" / "skipped.csv")) == 2 * SINGLE_FILM_PATIENTS


# ----------------------------------------------------------------------------- what the splits carry


def test_demographics_are_carried_into_the_splits(tmp_path: Path, capsys) -> None:
    rows = real_rows()
    rows["Patient Gender"] = ["M", "F", "m", "X"] * (len(rows) // 4)
    rows["Patient Age"] = ["58", "058Y", "412", ""] * (len(rows) // 4)
    csv, images, _ = nih_copy(tmp_path / "user", rows)
    before = tree_checksum(csv.parent)
    assert run(tmp_path, capsys, csv, images)[0] == 0
    assert tree_checksum(csv.parent) == before
    kept = splits(tmp_path).set_index(splits(tmp_path)["path"].map(lambda path: Path(path).name))
    assert list(kept.columns) == ["path", "labels", "prompt", "patient", "split", "sex", "age"]
    expected = {name: (sex, age) for name, sex, age in zip(rows["Image Index"], ["M", "F", "M", ""] * 3, ["58", "58", "", ""] * 3)}
    assert {name: (kept.loc[name, "sex"], kept.loc[name, "age"]) for name in expected} == expected
    summary = json.loads((tmp_path / "out" / "prepare_summary.json").read_text())
    assert summary["demographics"] == ["sex", "age"]
    sets = ("model.resolution=32", "verify.max_images=4", "verify.contact_sheet_images=2")
    assert run(tmp_path, capsys, csv, images, *sets, command=verify_dataset.main)[0] == 0
    report = json.loads((tmp_path / "out" / "verify_report.json").read_text())
    assert sum(report["demographics"][name]["sex"]["M"] for name in SPLITS) == 6
    assert sum(report["demographics"][name]["age"]["known"] for name in SPLITS) == 6
    assert "## Demographics (images)" in (tmp_path / "out" / "verify_report.md").read_text()


def test_chexpert_and_generic_demographics(tmp_path: Path, capsys) -> None:
    csv = chexpert_copy(tmp_path / "chex", real_rows())
    assert run(tmp_path, capsys, csv, tmp_path / "chex", fmt="chexpert")[0] == 0
    assert set(splits(tmp_path)["sex"]) == {"F"} and set(splits(tmp_path)["age"]) == {"61"}
    csv = generic_copy(tmp_path / "generic", real_rows())
    frame = pd.read_csv(csv)
    frame.assign(gender=["Female", "male"] * (len(frame) // 2), years=[70.0, 3] * (len(frame) // 2)).to_csv(csv, index=False)
    code, _ = run(tmp_path, capsys, csv, tmp_path / "generic", "dataset.sex_column=gender", "dataset.age_column=years", fmt="csv")
    assert code == 0 and set(splits(tmp_path)["sex"]) == {"F", "M"} and set(splits(tmp_path)["age"]) == {"70", "3"}


def test_label_counts_before_balance_are_the_real_training_counts(tmp_path: Path, capsys) -> None:
    csv, images, _ = nih_copy(tmp_path / "user", real_rows({"Mass": 10, "No Finding": 10}))
    # a cap of 1 cuts both labels whatever share of the patients the config's split leaves for training
    assert run(tmp_path, capsys, csv, images, "balance.max_per_label=1")[0] == 0
    summary = json.loads((tmp_path / "out" / "prepare_summary.json").read_text())
    before = summary["label_counts_before_balance"]["train"]
    assert sum(before.values()) == summary["train_images_before_balance"] > summary["images"]["train"]
    assert summary["label_counts"]["train"] == {"Mass": 1, "No Finding": 1} and min(before.values()) > 1


def test_verify_refuses_one_file_in_two_splits(tmp_path: Path, capsys) -> None:
    csv, images, _ = nih_copy(tmp_path / "user")
    sets = ("model.resolution=32", "verify.max_images=4", "verify.contact_sheet_images=2")
    assert run(tmp_path, capsys, csv, images, *sets)[0] == 0
    train, test = pd.read_csv(tmp_path / "out" / "train.csv", dtype=str), pd.read_csv(tmp_path / "out" / "test.csv", dtype=str)
    pd.concat([test, train.iloc[[0]].assign(split="test", patient="999999")]).to_csv(tmp_path / "out" / "test.csv", index=False)
    code, err = run(tmp_path, capsys, csv, images, *sets, command=verify_dataset.main)
    assert code == 2 and f"{os.path.realpath(train['path'].iloc[0])} is in the train split" in err and "and in the test split" in err
