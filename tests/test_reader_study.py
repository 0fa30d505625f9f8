"""The reader study: the page is blind to the key, the draw is matched, answers are scored and checked."""

from __future__ import annotations

import base64
import io
import json
import re
import struct
import subprocess
import sys
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.conftest import REPO, tree_checksum
from tests.reader_study_inputs import LABELS, PHI, build_study, make_study_inputs, study_config, write_answers
from workflow_scripts.reader_study import score as score_stage
from workflow_scripts.reader_study.answers import read_answers
from workflow_scripts.reader_study.design import StudyError, read_study


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reader_study")
    data, synthetic = make_study_inputs(root)
    build_study(study_config(), data, synthetic, root / "study")
    return root


@pytest.fixture
def study(built: Path, tmp_path: Path) -> Path:
    """A fresh copy of one built study (inputs beside it, as make_study_inputs wrote them) per test."""
    for name in ("data", "films", "synthetic", "study"):
        shutil.copytree(built / name, tmp_path / name)
    for table in [*(tmp_path / "data").glob("*.csv"), *(tmp_path / "synthetic").glob("*.csv"), tmp_path / "study" / "key" / "key.csv"]:
        table.write_text(table.read_text().replace(str(built), str(tmp_path)))  # the copy's own files
    return tmp_path / "study"


def page_data(page: Path) -> dict:
    match = re.search(r"const DATA = (\{.*?\});\n", page.read_text())
    assert match, "the page holds its data in one JSON literal"
    return json.loads(match.group(1).replace("<\\/", "</"))


def png_chunks(data: bytes) -> list[str]:
    chunks, offset = [], 8
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        chunks.append(kind.decode())
        offset += 12 + length
    return chunks


def key_answers(key: pd.DataFrame, flip: bool = False) -> list[tuple[str, str, int, str]]:
    """Answers of a reader who knows the key (or says the opposite, with `flip`), marking the true labels."""
    rows = []
    for row in key.itertuples():
        answer = row.source if not flip else ("real" if row.source == "synthetic" else "synthetic")
        rows.append((row.image_id, answer, 5, row.labels))
    return rows


def test_the_draw_is_matched_per_label_and_never_uses_training_films(study: Path, tmp_path: Path) -> None:
    key = pd.read_csv(study / "key" / "key.csv", dtype=str, keep_default_na=False)
    first = key[key["repeat_of"] == ""]
    for label in LABELS:
        real = first[(first["source"] == "real") & first["labels"].str.split("|").map(lambda labels: label in labels)]
        synthetic = first[(first["source"] == "synthetic") & (first["labels"] == label)]
        assert len(synthetic) == 3 and len(real) >= 3, label
    assert (first["source"] == "real").sum() == (first["source"] == "synthetic").sum() == 9
    train = set(pd.read_csv(tmp_path / "data" / "train.csv")["path"])
    assert not train & set(key["file"]), "a training film reached the reader study"
    assert first["file"].is_unique
    repeats = key[key["repeat_of"] != ""]
    assert len(repeats) == 2 and set(repeats["repeat_of"]) <= set(first["image_id"])
    assert key["image_id"].is_unique and key["image_id"].str.match(r"^[0-9a-f]{8}-\d{3}$").all()


def test_the_order_follows_the_seed(study: Path, tmp_path: Path) -> None:
    data, synthetic = tmp_path / "data", tmp_path / "synthetic" / "generation_results.csv"
    build_study(study_config(), data, synthetic, tmp_path / "again")
    build_study(study_config(seed=1), data, synthetic, tmp_path / "other")
    files = [list(pd.read_csv(folder / "key" / "key.csv")["file"]) for folder in (study, tmp_path / "again", tmp_path / "other")]
    assert files[0] == files[1] and files[0] != files[2]
    sources = list(pd.read_csv(study / "key" / "key.csv")["source"])
    assert sources != sorted(sources) and sources != sorted(sources, reverse=True)


def test_the_page_does_not_reveal_the_key(study: Path) -> None:
    page = (study / "page" / "index.html").read_text()
    key = pd.read_csv(study / "key" / "key.csv", dtype=str)
    data = page_data(study / "page" / "index.html")
    assert [image["id"] for image in data["images"]] == list(key["image_id"])
    assert all(set(image) == {"id", "src"} for image in data["images"]), "an image carries more than its id and pixels"
    for file in key["file"]:
        assert Path(file).stem not in page and str(Path(file).parent) not in page
    assert PHI.split(":")[1].strip() not in page
    assert not re.search(r"""(src|href)=["'](?!data:)""", page), "the page loads something from outside itself"
    assert "fetch(" not in page and "XMLHttpRequest" not in page
    assert "key.csv" not in page and "study.json" not in page


def test_real_and_synthetic_images_are_encoded_alike_without_metadata(study: Path) -> None:
    key = pd.read_csv(study / "key" / "key.csv", dtype=str).set_index("image_id")
    seen = {}
    for image in page_data(study / "page" / "index.html")["images"]:
        assert image["src"].startswith("data:image/png;base64,")
        raw = base64.b64decode(image["src"].split(",", 1)[1])
        assert png_chunks(raw) == ["IHDR", "IDAT", "IEND"], "metadata chunks (text, dpi, ICC) reached the page"
        decoded = Image.open(io.BytesIO(raw))
        seen.setdefault(key.loc[image["id"], "source"], set()).add((decoded.size, decoded.mode))
    # Real films are 40 x 48 on disk, synthetic 32 x 32: on the page both are 32 x 32 8-bit grayscale.
    assert seen == {"real": {((32, 32), "L")}, "synthetic": {((32, 32), "L")}}


def test_a_study_with_nothing_to_pair_says_so(tmp_path: Path) -> None:
    data, synthetic = make_study_inputs(tmp_path)
    with pytest.raises(StudyError, match="real val/test"):
        build_study(study_config(real_splits=["val"], images_per_label=3), data, _only_label(synthetic, "Mass"), tmp_path / "out")


def _only_label(synthetic: Path, label: str) -> Path:
    frame = pd.read_csv(synthetic).assign(labels=label)
    frame.to_csv(synthetic, index=False)
    return synthetic


def run_score(study: Path, answers: Path, capsys: pytest.CaptureFixture) -> subprocess.CompletedProcess:
    """The scoring command line, in this process (as `python -m workflow_scripts.reader_study.score`)."""
    capsys.readouterr()
    code = score_stage.main(["--key", str(study / "key" / "key.csv"), "--answers-dir", str(answers), "--out-dir", str(study),
                             "--bootstrap-samples", "200"])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess([], code, out, err)


def test_a_reader_who_knows_the_key_scores_100_and_one_who_inverts_it_0(study: Path, capsys: pytest.CaptureFixture) -> None:
    key, meta = read_study(study / "key" / "key.csv")
    answers = study / "answers"
    write_answers(answers / "oracle.csv", "oracle", key_answers(key))
    write_answers(answers / "contrarian.csv", "contrarian", key_answers(key, flip=True))
    result = run_score(study, answers, capsys)
    assert result.returncode == 0, result.stderr
    scores = pd.read_csv(study / "scores.csv").set_index("reader")
    assert scores.loc["oracle", "accuracy"] == 1.0 and scores.loc["oracle", "auroc"] == 1.0
    assert scores.loc["oracle", "n"] == 18 and scores.loc["oracle", "consistency"] == 1.0
    assert scores.loc["contrarian", "accuracy"] == 0.0 and scores.loc["contrarian", "auroc"] == 0.0
    assert scores.loc["oracle", "real_marked_effusion"] == 1.0 and scores.loc["oracle", "synthetic_marked_nodule"] == 1.0
    pooled = scores.loc[score_stage.POOLED]
    assert pooled["n"] == 36 and pooled["accuracy"] == 0.5
    assert pooled["fleiss_kappa"] < 0, "two readers who always disagree agree less than chance"
    text = (study / "scores.md").read_text()
    assert "| oracle | 18 | 100 %" in text and "50 %" in text
    assert "Expert reader study" in (study / "pooled.md").read_text()


def test_a_coin_flipping_reader_has_an_interval_that_covers_50_percent(study: Path) -> None:
    key, meta = read_study(study / "key" / "key.csv")
    rng = np.random.default_rng(7)
    rows = [(image, str(rng.choice(["real", "synthetic"])), int(rng.integers(1, 6)), "No Finding") for image in key.index]
    write_answers(study / "answers" / "coin.csv", "coin", rows)
    answers = read_answers(study / "answers", key, meta)
    scores = score_stage.score(key, meta, answers, 200, 0).set_index("reader")
    for reader in ("coin", score_stage.POOLED):
        assert scores.loc[reader, "accuracy_ci_low"] < 0.5 < scores.loc[reader, "accuracy_ci_high"], reader
    assert np.isnan(scores.loc[score_stage.POOLED, "fleiss_kappa"]), "kappa needs two readers"


BAD_ANSWERS = {
    "unknown id": (["{study}-999,real,3,No Finding"], "line 2: unknown image id"),
    "another study": (["0badc0de-001,real,3,No Finding"], "line 2: image 0badc0de-001 belongs to another study"),
    "bad confidence": (["{first},real,7,No Finding"], "line 2: confidence '7'"),
    "bad answer": (["{first},fake,3,No Finding"], "line 2: answer 'fake'"),
    "short row": (["{first},real,3"], "line 2: 4 fields"),
    "unknown finding": (["{first},real,3,Hernia"], "line 2: finding(s) ['Hernia']"),
    "duplicate": (["{first},real,3,No Finding", "{first},synthetic,2,No Finding"], "line 3: reader 'r1' answered image"),
}


@pytest.mark.parametrize("case", list(BAD_ANSWERS))
def test_bad_answers_are_named_by_file_and_line_and_left_alone(study: Path, case: str, capsys: pytest.CaptureFixture) -> None:
    key, meta = read_study(study / "key" / "key.csv")
    lines, message = BAD_ANSWERS[case]
    answers = study / "answers"
    answers.mkdir()
    bad = answers / "r1.csv"
    bad.write_text("reader,image_id,answer,confidence,findings\n"
                   + "".join("r1," + line.format(study=meta["study"], first=key.index[0]) + "\n" for line in lines))
    before = tree_checksum(answers)
    result = run_score(study, answers, capsys)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{bad} {message}" in result.stderr, result.stderr
    assert tree_checksum(answers) == before
    assert not (study / "scores.csv").exists()


def test_a_file_that_is_not_an_export_is_refused_by_its_header(study: Path, capsys: pytest.CaptureFixture) -> None:
    answers = study / "answers"
    answers.mkdir()
    (answers / "notes.csv").write_text("name,score\nA,1\n")
    result = run_score(study, answers, capsys)
    assert result.returncode == 2 and f"{answers / 'notes.csv'} line 1: header" in result.stderr


def test_an_empty_answers_folder_is_reported(study: Path, capsys: pytest.CaptureFixture) -> None:
    (study / "answers").mkdir()
    result = run_score(study, study / "answers", capsys)
    assert result.returncode == 2 and "no .csv files" in result.stderr


@pytest.mark.slow  # several Snakemake dry runs (about 3 CPU s each)
def test_snakemake_knows_the_targets_and_keeps_them_out_of_all(tmp_path: Path) -> None:
    def dry(*args: str, targets: tuple[str, ...] = ()) -> str:
        result = subprocess.run([sys.executable, "-m", "snakemake", *targets, "-n", "--cores", "1", "-s", str(REPO / "Snakefile"),
                                 "-d", str(tmp_path), "--configfile", str(REPO / "config" / "config.yaml"), *args],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return result.stdout

    jobs = lambda text: set(re.findall(r"^rule (\w+):", text, re.M))  # noqa: E731
    default = jobs(dry())
    assert {"reader_study"} <= jobs(dry(targets=("reader_study",))) and "score_reader_study" not in default
    assert "reader_study" not in default, "the page is not part of `all` by default"
    assert "reader_study" in jobs(dry("--config", "reader_study={in_all: true}"))
    write_answers(tmp_path / "results" / "reader_study" / "answers" / "r1.csv", "r1", [])
    assert {"reader_study", "score_reader_study", "compare"} <= jobs(dry()), "answers: scored, and in the table"


def test_comparison_includes_the_pooled_row_once_answers_are_scored(study: Path, tmp_path: Path, capsys) -> None:
    from tests.test_compare import run_compare  # the comparison's own small study

    key, _ = read_study(study / "key" / "key.csv")
    write_answers(study / "answers" / "oracle.csv", "oracle", key_answers(key))
    assert run_score(study, study / "answers", capsys).returncode == 0
    # compare includes the pooled row it is given (--reader-study: the rule passes it once answers exist)
    _, page, _ = run_compare(tmp_path / "cmp", reader_study=study / "pooled.md")
    section = page[page.index("## Expert reader study"):]
    assert "1 reader(s)" in section and "accuracy 100 %" in section
    assert page.index("## Memorization audit") < page.index("## Expert reader study") < page.index("## LoRA training")


def test_a_page_rebuilt_from_other_images_is_another_study(study: Path, tmp_path: Path, capsys) -> None:
    old_key, _ = read_study(study / "key" / "key.csv")
    write_answers(tmp_path / "old_answers" / "r1.csv", "r1", key_answers(old_key)[:1])
    # generation re-run: same file names, other pixels
    synthetic = tmp_path / "synthetic" / "generation_results.csv"
    for file in pd.read_csv(synthetic)["file"]:
        Image.fromarray(255 - np.asarray(Image.open(file))).save(file)
    build_study(study_config(), tmp_path / "data", synthetic, study)
    new_key, new_meta = read_study(study / "key" / "key.csv")
    assert new_meta["study"] != old_key.index[0][:8]
    result = run_score(study, tmp_path / "old_answers", capsys)
    assert result.returncode == 2 and "belongs to another study" in result.stderr
