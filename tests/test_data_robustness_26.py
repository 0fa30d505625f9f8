"""Issue #26, what to build 4, on copies of real NIH films (../shared/data/cxr-dev): patient ids 12 and
12.0 follow the documented zeros rule, like 007 and 7."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from conftest import SHARED_DATA, tree_checksum
from test_data_integrity import generic_copy, real_rows, run, splits

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
