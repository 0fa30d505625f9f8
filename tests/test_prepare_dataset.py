"""The data stage: parsers, checks, patient split, balancing, prompts, bad input."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from conftest import SHARED_DATA, VOCAB, break_dataset, make_config, make_nih_dataset, tree_checksum, write_png
from workflow_scripts.common.errors import DataError
from workflow_scripts.common.labels import check_rows, read_chexpert, read_dataset, read_nih
from workflow_scripts.data.prepare_dataset import balance_training, main, prepare, split_by_patient
from workflow_scripts.common.tables import assert_patient_disjoint, load_split, make_prompt

NIH_VOCAB = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis",
             "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax", "No Finding"]


# ----------------------------------------------------------------------------- parsers and prompts


def test_nih_parser_reads_labels_patients_and_line_numbers(tmp_path: Path) -> None:
    csv = tmp_path / "Data_Entry_2017.csv"
    csv.write_text("Image Index,Finding Labels,Patient ID,View Position\n"
                   "00000001_000.png,Pneumonia|Fibrosis,1,PA\n00000002_000.png,No Finding,2,AP\n")
    frame = read_nih(csv)
    assert frame["labels"].tolist() == [["Pneumonia", "Fibrosis"], ["No Finding"]]
    assert frame["patient"].tolist() == ["1", "2"]
    assert frame["row"].tolist() == [2, 3]  # editor line numbers: header is line 1


def test_prompts_follow_vocabulary_order_joined_with_and(tmp_path: Path) -> None:
    frame = pd.DataFrame({"row": [2], "image": ["a.png"], "labels": [["Pneumonia", "Fibrosis"]], "patient": ["1"]})
    ordered = check_rows(frame, VOCAB, tmp_path / "x.csv")
    assert ordered["labels"][0] == ["Fibrosis", "Pneumonia"]
    assert make_prompt(ordered["labels"][0]) == "A chest X-ray with Fibrosis and Pneumonia"
    assert make_prompt(["No Finding"]) == "A chest X-ray with No Finding"
    assert make_prompt(["Mass"], "Frontal radiograph, {labels}") == "Frontal radiograph, Mass"


CHEXPERT = (
    "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Cardiomegaly,Edema,Pleural Effusion\n"
    "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,F,68,Frontal,AP,,1,-1,\n"
    "CheXpert-v1.0-small/train/patient00001/study1/view2_lateral.jpg,F,68,Lateral,,,1,-1,\n"
    "CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg,M,50,Frontal,PA,1,,0,\n"
    "CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg,M,50,Frontal,PA,,0,-1,\n"
)
CHEXPERT_VOCAB = ["Cardiomegaly", "Edema", "Pleural Effusion", "No Finding"]


@pytest.mark.parametrize(("policy", "expected", "skipped"), [
    ("positive", [["Cardiomegaly", "Edema"], ["No Finding"], ["Edema"]], 0),
    ("negative", [["Cardiomegaly"], ["No Finding"], ["No Finding"]], 0),  # patient 3: a negative, kept
    ("exclude", [["No Finding"]], 2),
])
def test_chexpert_uncertain_policy_and_frontal_filter(tmp_path: Path, policy: str, expected, skipped: int) -> None:
    csv = tmp_path / "train.csv"
    csv.write_text(CHEXPERT)
    frame, skip_report = read_chexpert(csv, CHEXPERT_VOCAB, policy, frontal_only=True)
    assert frame["labels"].tolist() == expected
    assert all("lateral" not in image for image in frame["image"])
    assert len(skip_report) == skipped
    assert set(frame["patient"]) <= {"patient00001", "patient00002", "patient00003"}


def test_chexpert_rejects_values_other_than_1_0_minus1_blank(tmp_path: Path) -> None:
    csv = tmp_path / "train.csv"
    csv.write_text(CHEXPERT.replace(",1,-1,\n", ",yes,-1,\n", 1))
    with pytest.raises(DataError, match=r"line 2.*unexpected value"):
        read_chexpert(csv, CHEXPERT_VOCAB, "negative", frontal_only=True)


def test_generic_csv_with_dicom_16bit_and_rgba_images(tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    write_png(images / "a.png", 1)
    Image.fromarray(np.linspace(0, 4095, 40 * 40).astype(np.uint16).reshape(40, 40)).save(images / "b16.png")
    Image.fromarray(np.stack([np.tile(np.arange(40, dtype=np.uint8) * 6, (40, 1))] * 3 + [np.full((40, 40), 255, np.uint8)], -1),
                    "RGBA").save(images / "c_rgba.png")
    write_dicom(images / "d.dcm", monochrome1=True)
    rows = ["file,findings,subject"] + [f"{name},Nodule;Fibrosis,p{i}" for i, name in enumerate(["a.png", "b16.png", "c_rgba.png", "d.dcm"])]
    rows += [f"a{i}.png,No Finding,q{i}" for i in range(6)]
    for i in range(6):
        write_png(images / f"a{i}.png", 10 + i)
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    config = make_config({"format": "csv", "csv": str(tmp_path / "labels.csv"), "images": str(images),
                          "labels": ["Nodule", "Fibrosis", "No Finding"], "path_column": "file",
                          "labels_column": "findings", "label_separator": ";", "patient_column": "subject"})
    summary = prepare(config, tmp_path / "out")
    assert sum(summary["images"].values()) == 10
    everything = pd.concat([load_split(tmp_path / "out", split) for split in ("train", "val", "test")])
    assert set(everything.loc[everything["path"].str.contains("b16|rgba|dcm"), "prompt"]) == {"A chest X-ray with Nodule and Fibrosis"}


def write_dicom(path: Path, monochrome1: bool) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    pixels = np.linspace(0, 4095, 32 * 32).astype(np.uint16).reshape(32, 32)
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path).Rows == 32


# ----------------------------------------------------------------------------- split and balance


def test_split_is_patient_disjoint_deterministic_and_covers_rare_labels(nih_config) -> None:
    frame, _ = read_dataset(nih_config["dataset"])
    frame = check_rows(frame, VOCAB, Path("x.csv"))
    splits = split_by_patient(frame, 0.15, 0.2, seed=3)
    assert splits.tolist() == split_by_patient(frame, 0.15, 0.2, seed=3).tolist()
    assert splits.tolist() != split_by_patient(frame, 0.15, 0.2, seed=4).tolist()
    per_patient = frame.assign(split=splits).groupby("patient")["split"].nunique()
    assert (per_patient == 1).all()
    # Every label carried by at least 3 patients as their rarest label reaches the test split.
    test_labels = {label for labels in frame[splits == "test"]["labels"] for label in labels}
    assert {"Pneumonia", "Fibrosis"} & test_labels
    shares = Counter(splits)
    assert shares["train"] > shares["test"] > 0 and shares["val"] > 0


def test_balancing_caps_every_label_and_keeps_rare_ones() -> None:
    labels = [["Effusion"]] * 50 + [["Effusion", "Pneumonia"]] * 3 + [["Pneumonia"]] * 2 + [["No Finding"]] * 40
    frame = pd.DataFrame({"labels": labels, "patient": [str(i) for i in range(len(labels))]})
    balanced = balance_training(frame, max_per_label=10, seed=0)
    counts = Counter(label for row in balanced["labels"] for label in row)
    assert max(counts.values()) <= 10
    assert counts["Pneumonia"] == 5  # the rare label keeps all its images
    assert counts["Effusion"] == 10 and counts["No Finding"] == 10
    assert balance_training(frame, None, 0) is frame


def test_prepare_writes_splits_with_prompts_and_never_touches_user_data(nih_config, nih_dataset, tmp_path) -> None:
    before = tree_checksum(nih_dataset[0].parent)
    summary = prepare(nih_config, tmp_path / "out")
    assert tree_checksum(nih_dataset[0].parent) == before
    splits = {name: load_split(tmp_path / "out", name) for name in ("train", "val", "test")}
    assert_patient_disjoint(splits)
    for frame in splits.values():
        assert list(frame.columns) == ["path", "labels", "prompt", "patient", "split"]
        assert all(Path(path).is_file() for path in frame["path"])
        assert all(prompt == "A chest X-ray with " + labels.replace("|", " and ") for prompt, labels in zip(frame["prompt"], frame["labels"]))
    assert sum(summary["images"].values()) == 60 and summary["skipped"] == 0


def test_nested_nih_image_folders_are_found(tmp_path: Path) -> None:
    csv, images = make_nih_dataset(tmp_path / "nih", num_patients=16, films=1)
    nested = images / "images_001" / "images"
    nested.mkdir(parents=True)
    for png in images.glob("*.png"):
        png.rename(nested / png.name)
    summary = prepare(make_config({"csv": str(csv), "images": str(images), "labels": VOCAB}), tmp_path / "out")
    assert sum(summary["images"].values()) == 16


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kind", ["missing image", "truncated image", "zero-byte image", "unknown label",
                                  "missing column", "empty csv", "header only", "duplicate rows"])
def test_bad_input_names_the_culprit(tmp_path: Path, kind: str, capsys) -> None:
    csv, images = make_nih_dataset(tmp_path / "nih", num_patients=12, films=1)
    pattern = break_dataset(kind, csv.parent)
    config = make_config({"csv": str(csv), "images": str(images), "labels": VOCAB})
    with pytest.raises(DataError, match=pattern):
        prepare(config, tmp_path / "out")
    assert not (tmp_path / "out" / "train.csv").exists()


def test_cli_reports_error_without_traceback_and_exit_2(tmp_path: Path, capsys) -> None:
    csv, images = make_nih_dataset(tmp_path / "nih", num_patients=12, films=1)
    break_dataset("unknown label", csv.parent)
    code = main(["--set", f"dataset.csv={csv}", "--set", f"dataset.images={images}",
                 "--set", f"dataset.labels={VOCAB}", "--out-dir", str(tmp_path / "out")])
    assert code == 2
    assert "error:" in capsys.readouterr().err


def test_skip_policy_leaves_bad_images_out_with_a_report(tmp_path: Path) -> None:
    csv, images = make_nih_dataset(tmp_path / "nih", num_patients=16, films=2)
    victims = sorted(images.glob("*.png"))[:2]
    victims[0].unlink()
    victims[1].write_bytes(victims[1].read_bytes()[:100])
    before = tree_checksum(csv.parent)
    config = make_config({"csv": str(csv), "images": str(images), "labels": VOCAB, "on_bad_image": "skip"})
    summary = prepare(config, tmp_path / "out")
    assert tree_checksum(csv.parent) == before
    report = pd.read_csv(tmp_path / "out" / "skipped.csv")
    assert sorted(report["path"]) == sorted(v.name for v in victims)
    assert report["reason"].str.contains("not found").any() and report["reason"].str.contains("truncated|corrupt").any()
    assert summary["skipped"] == 2 and sum(summary["images"].values()) == 30


def test_a_patient_in_two_splits_is_refused(tmp_path: Path, nih_config) -> None:
    prepare(nih_config, tmp_path / "out")
    train, test = (tmp_path / "out" / "train.csv"), (tmp_path / "out" / "test.csv")
    leaked = pd.read_csv(train, dtype=str).iloc[[0]].assign(split="test")
    pd.concat([pd.read_csv(test, dtype=str), leaked]).to_csv(test, index=False)
    splits = {name: load_split(tmp_path / "out", name) for name in ("train", "val", "test")}
    with pytest.raises(DataError, match=f"patient {leaked['patient'].iloc[0]} is in both the train and the test split"):
        assert_patient_disjoint(splits)


def test_load_split_refuses_rows_of_another_split(tmp_path: Path, nih_config) -> None:
    prepare(nih_config, tmp_path / "out")
    train = tmp_path / "out" / "train.csv"
    frame = pd.read_csv(train, dtype=str)
    frame.loc[1, "split"] = "test"
    frame.to_csv(train, index=False)
    with pytest.raises(DataError, match=r"train.csv line 3: row of split 'test'"):
        load_split(tmp_path / "out", "train")


# ----------------------------------------------------------------------------- real data


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data/cxr-dev not present")
def test_real_nih_images_prepare_with_balancing(tmp_path: Path) -> None:
    before = tree_checksum(SHARED_DATA)
    config = make_config({"csv": str(SHARED_DATA / "labels.csv"), "images": str(SHARED_DATA / "images"), "labels": NIH_VOCAB},
                         )
    config["balance"]["max_per_label"] = 15  # below the commonest label's count under the demo's split
    summary = prepare(config, tmp_path / "out")
    assert tree_checksum(SHARED_DATA) == before
    assert summary["images"]["test"] > 30 and summary["skipped"] == 0
    assert max(summary["label_counts"]["train"].values()) <= 15
    assert summary["train_images_before_balance"] > summary["images"]["train"]
    # Rare NIH labels (Edema 9, Hernia 10 images) reach the test split thanks to the stratified split.
    assert {"Edema", "Hernia"} <= set(summary["label_counts"]["test"])
    # The real radiographs load through the training Dataset as the model will see them.
    from workflow_scripts.data.verify_dataset import verify

    config["verify"].update(max_images=24, contact_sheet_images=4)
    report = verify(config, tmp_path / "out")
    assert report["tensor_shape"] == [3, 64, 64] and -1.0 <= report["min"] < report["max"] <= 1.0
