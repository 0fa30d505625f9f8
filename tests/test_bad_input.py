"""Bad input through the real entry points (the stage CLIs and Snakemake): each case ends in a clear
message naming the culprit with exit code 2, or in the documented skip report; user data never changes.
(A LoRA for another base model: tests/test_generate_xrays.py::test_bad_input_gives_clear_messages.)"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import REPO, VOCAB, break_dataset, make_nih_dataset, split_flags, tree_checksum
from test_prepare_dataset import write_dicom
from workflow_scripts.data import prepare_dataset, verify_dataset
from workflow_scripts.common.tables import SPLITS
from workflow_scripts.common.images import read_xray


def stage_flags(csv: Path, images: Path, *extra: str) -> list[str]:
    return ["--set", f"dataset.csv={csv}", "--set", f"dataset.images={images}", "--set", f"dataset.labels={VOCAB}",
            "--set", "model.resolution=32", "--set", "verify.max_images=8", "--set", "verify.contact_sheet_images=2", *extra]


@pytest.mark.parametrize("kind", ["missing image", "truncated image", "zero-byte image", "unknown label",
                                  "missing column", "empty csv", "header only", "duplicate rows"])
def test_prepare_cli_names_the_culprit(tmp_path: Path, kind: str, capsys) -> None:
    csv, images = make_nih_dataset(tmp_path / "user", num_patients=16, films=1)
    pattern = break_dataset(kind, csv.parent)
    before = tree_checksum(csv.parent)
    code = prepare_dataset.main([*stage_flags(csv, images), "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err
    assert re.search(pattern, err), err
    assert tree_checksum(csv.parent) == before
    assert not (tmp_path / "out" / "train.csv").exists()


def test_skip_policy_reports_instead_of_stopping(tmp_path: Path) -> None:
    csv, images = make_nih_dataset(tmp_path / "user", num_patients=16, films=1)
    break_dataset("truncated image", csv.parent)
    code = prepare_dataset.main([*stage_flags(csv, images, "--set", "dataset.on_bad_image=skip"), "--out-dir", str(tmp_path / "out")])
    assert code == 0
    report = pd.read_csv(tmp_path / "out" / "skipped.csv")
    assert len(report) == 1 and "truncated" in report["reason"].iloc[0] and report["row"].iloc[0] == 2


def test_16_bit_rgba_and_monochrome1_dicom_are_read_not_refused(tmp_path: Path) -> None:
    csv, images = make_nih_dataset(tmp_path / "user", num_patients=16, films=1)
    names = sorted(p.name for p in images.glob("*.png"))
    Image.fromarray(np.arange(40 * 40, dtype=np.uint16).reshape(40, 40) * 2).save(images / names[0])  # 16-bit
    Image.fromarray(np.dstack([np.tile(np.arange(40, dtype=np.uint8) * 5, (40, 1))] * 3 + [np.full((40, 40), 128, np.uint8)]),
                    "RGBA").save(images / names[1])
    write_dicom(tmp_path / "m1.dcm", monochrome1=True)
    write_dicom(tmp_path / "m2.dcm", monochrome1=False)
    inverted, plain = np.asarray(read_xray(tmp_path / "m1.dcm"), int), np.asarray(read_xray(tmp_path / "m2.dcm"), int)
    assert np.abs(inverted + plain - 255).max() <= 1  # MONOCHROME1 comes out inverted
    (images / "m1.dcm").write_bytes((tmp_path / "m1.dcm").read_bytes())
    frame = pd.read_csv(csv)
    frame.loc[2, "Image Index"] = "m1.dcm"
    frame.to_csv(csv, index=False)
    out = tmp_path / "out"
    assert prepare_dataset.main([*stage_flags(csv, images), "--out-dir", str(out)]) == 0
    assert verify_dataset.main([*stage_flags(csv, images), *split_flags(out, *SPLITS), "--out-dir", str(out)]) == 0
    assert pd.read_csv(out / "skipped.csv").empty


def test_verify_refuses_a_patient_in_two_splits(tmp_path: Path, capsys) -> None:
    csv, images = make_nih_dataset(tmp_path / "user", num_patients=16, films=1)
    out = tmp_path / "out"
    assert prepare_dataset.main([*stage_flags(csv, images), "--out-dir", str(out)]) == 0
    train, test = pd.read_csv(out / "train.csv", dtype=str), pd.read_csv(out / "test.csv", dtype=str)
    pd.concat([test, train.iloc[[0]].assign(split="test")]).to_csv(out / "test.csv", index=False)
    assert verify_dataset.main([*stage_flags(csv, images), *split_flags(out, *SPLITS), "--out-dir", str(out)]) == 2
    assert f"patient {train['patient'].iloc[0]} is in both the train and the test split" in capsys.readouterr().err


def test_out_of_range_config_value_stops_cli_and_snakemake(tmp_path: Path, capsys) -> None:
    assert prepare_dataset.main(["--set", "split.test_fraction=0.9", "--out-dir", str(tmp_path / "out")]) == 2
    assert "split.test_fraction: 0.9 is greater than or equal to the maximum of 0.5" in capsys.readouterr().err
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                             "--configfile", str(REPO / "config" / "config.yaml"), "--config", "model={lora_rank: 0}"],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "model.lora_rank: 0 is less than the minimum of 1" in result.stdout + result.stderr
