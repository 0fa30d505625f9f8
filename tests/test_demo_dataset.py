"""Tests for the phantom chest X-ray dataset (workflow_scripts/data/demo_dataset.py, phantom.py)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.ndimage import binary_erosion, gaussian_filter

from workflow_scripts.data.demo_dataset import main, make_demo_dataset
from workflow_scripts.data.phantom import LABELS, anatomy_masks, draw_phantom, sample_anatomy

NIH_NAME = re.compile(r"^(\d{8})_(\d{3})\.png$")
FINDINGS = [label for label in LABELS if label != "No Finding"]
SIZE = 128


# --------------------------------------------------------------------------- dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    out = tmp_path_factory.mktemp("demo")
    frame = make_demo_dataset(out, num_patients=24, size=64, seed=3)
    return out, frame


def read_csv(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "Data_Entry_2017.csv", dtype=str, keep_default_na=False)


def test_labels_vocabulary() -> None:
    assert LABELS == (
        "Cardiomegaly", "Effusion", "Nodule", "Mass", "Pneumothorax", "Fibrosis", "Pneumonia", "No Finding",
    )


def test_csv_has_nih_columns_and_matches_files(dataset: tuple[Path, pd.DataFrame]) -> None:
    out, frame = dataset
    csv = read_csv(out)
    assert list(csv.columns) == ["Image Index", "Finding Labels", "Patient ID"]
    assert csv["Image Index"].tolist() == frame["Image Index"].tolist()
    assert csv["Image Index"].is_unique
    on_disk = sorted(p.name for p in (out / "images").iterdir())
    assert on_disk == sorted(csv["Image Index"])
    for name, patient in zip(csv["Image Index"], csv["Patient ID"]):
        match = NIH_NAME.match(name)
        assert match, name
        assert patient.isdigit() and int(match.group(1)) == int(patient)


def test_films_numbered_per_patient(dataset: tuple[Path, pd.DataFrame]) -> None:
    out, _ = dataset
    csv = read_csv(out)
    csv["film"] = csv["Image Index"].str.slice(9, 12).astype(int)
    for _, group in csv.groupby("Patient ID"):
        assert sorted(group["film"]) == list(range(len(group)))
    per_patient = csv.groupby("Patient ID").size()
    assert per_patient.nunique() > 1  # 1..4 films, not a constant
    assert (per_patient >= 2).mean() >= 0.5  # most patients have several films
    assert csv["Patient ID"].nunique() == 24


def test_images_are_8bit_grayscale_of_requested_size(dataset: tuple[Path, pd.DataFrame]) -> None:
    out, frame = dataset
    for name in frame["Image Index"][:10]:
        with Image.open(out / "images" / name) as image:
            assert image.format == "PNG"
            assert image.mode == "L"
            assert image.size == (64, 64)
            array = np.asarray(image)
        assert array.std() > 20  # not blank: anatomy is drawn


def test_label_cells_are_well_formed(dataset: tuple[Path, pd.DataFrame]) -> None:
    out, _ = dataset
    for cell in read_csv(out)["Finding Labels"]:
        labels = cell.split("|")
        assert all(label in LABELS for label in labels), cell
        assert len(set(labels)) == len(labels)
        assert labels == sorted(labels, key=LABELS.index), cell  # vocabulary order
        assert "No Finding" not in labels or labels == ["No Finding"], cell


def test_label_distribution_is_long_tailed_and_multi_label(dataset: tuple[Path, pd.DataFrame]) -> None:
    out, _ = dataset
    cells = read_csv(out)["Finding Labels"].str.split("|")
    counts = {label: int(cells.apply(lambda labels, label=label: label in labels).sum()) for label in LABELS}
    finding_counts = [counts[label] for label in FINDINGS]
    assert min(finding_counts) >= 1, counts
    assert max(finding_counts) / min(finding_counts) >= 3, counts
    assert counts["No Finding"] > 0
    abnormal = cells[cells.apply(lambda labels: labels != ["No Finding"])]
    multi = abnormal.apply(len) >= 2
    assert multi.any()
    assert 0.1 <= multi.mean() <= 0.5, multi.mean()


def test_patient_findings_are_stable_across_films(dataset: tuple[Path, pd.DataFrame]) -> None:
    out, _ = dataset
    csv = read_csv(out)
    for _, group in csv.groupby("Patient ID"):
        sets = [set(cell.split("|")) for cell in group["Finding Labels"]]
        union = set.union(*sets)
        if "No Finding" in union:
            assert union == {"No Finding"}  # normal patients stay normal
        for labels in sets:
            assert len(union - labels) <= 1  # at most one finding missing on a film


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path: Path) -> None:
    # One process or three: the same bytes (the workflow draws with one process per core).
    first = make_demo_dataset(tmp_path / "a", 10, 64, seed=7, workers=1)
    second = make_demo_dataset(tmp_path / "b", 10, 64, seed=7, workers=3)
    other = make_demo_dataset(tmp_path / "c", 10, 64, seed=8)
    pd.testing.assert_frame_equal(first, second)
    assert (tmp_path / "a/Data_Entry_2017.csv").read_bytes() == (tmp_path / "b/Data_Entry_2017.csv").read_bytes()
    for name in first["Image Index"]:
        assert (tmp_path / "a/images" / name).read_bytes() == (tmp_path / "b/images" / name).read_bytes()
    name = first["Image Index"][0]
    assert name in set(other["Image Index"])
    a = np.asarray(Image.open(tmp_path / "a/images" / name))
    c = np.asarray(Image.open(tmp_path / "c/images" / name))
    assert not np.array_equal(a, c)


def test_stale_images_are_removed(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    stale = tmp_path / "images" / "00009999_000.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(stale)
    make_demo_dataset(tmp_path, 10, 64, seed=0)
    assert not stale.exists()


@pytest.mark.parametrize(("patients", "size"), [(9, 64), (10, 63)])
def test_make_demo_dataset_refuses_tiny_requests(tmp_path: Path, patients: int, size: int) -> None:
    with pytest.raises(ValueError, match="at least"):
        make_demo_dataset(tmp_path, patients, size, seed=0)


# --------------------------------------------------------------------------- drawing


def draw(labels: list[str], anatomy: dict, seed: int) -> np.ndarray:
    return draw_phantom(labels, SIZE, np.random.default_rng(seed), anatomy).astype(np.float64)


def highpass(image: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    return image - gaussian_filter(image, sigma)


def grids() -> tuple[np.ndarray, np.ndarray]:
    yy, xx = (np.mgrid[0:SIZE, 0:SIZE] + 0.5) / SIZE
    return yy, xx


@pytest.fixture(params=[0, 4], ids=["anatomy0", "anatomy4"])
def anatomy(request: pytest.FixtureRequest) -> dict:
    return sample_anatomy(np.random.default_rng(request.param))


def test_draw_phantom_shape_dtype_and_determinism() -> None:
    a = draw_phantom(["Nodule", "Effusion"], 96, np.random.default_rng(1))
    b = draw_phantom(["Nodule", "Effusion"], 96, np.random.default_rng(1))
    c = draw_phantom(["Nodule", "Effusion"], 96, np.random.default_rng(2))
    assert a.dtype == np.uint8 and a.shape == (96, 96)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_films_of_one_patient_look_alike(anatomy: dict) -> None:
    def coarse(image: np.ndarray) -> np.ndarray:
        return gaussian_filter(image, 3.0)  # compare layout, not noise or 1-pixel shifts

    film1, film2 = coarse(draw([], anatomy, 1)), coarse(draw([], anatomy, 2))
    stranger = coarse(draw([], sample_anatomy(np.random.default_rng(99)), 1))
    same = np.abs(film1 - film2).mean()
    assert 0 < same < 0.8 * np.abs(film1 - stranger).mean()


def test_anatomy_lungs_dark_mediastinum_bright(anatomy: dict) -> None:
    image = draw([], anatomy, 3)
    masks = anatomy_masks(SIZE, anatomy)
    lungs, heart = masks["lungs"] > 0.5, masks["heart"] > 0.5
    assert image[lungs].mean() + 60 < image[heart & ~lungs].mean()
    yy, xx = grids()
    below = (yy > anatomy["diaphragm"] + 0.05) & (np.abs(xx - anatomy["cx"]) < 0.3)
    assert image[lungs].mean() + 60 < image[below].mean()  # diaphragm / abdomen bright
    # the heart bulges to the image's right (patient's left)
    cols = np.nonzero(heart.any(axis=0))[0]
    centre = anatomy["cx"] * SIZE
    assert cols.max() - centre > centre - cols.min()


def test_no_finding_is_the_normal_film(anatomy: dict) -> None:
    assert np.array_equal(draw(["No Finding"], anatomy, 5), draw([], anatomy, 5))


def heart_width(image: np.ndarray, anatomy: dict, threshold: float) -> int:
    """Widest run of bright pixels through the heart, on rows above the diaphragm domes."""
    start = int((anatomy["cx"] + 0.05) * SIZE)
    best = 0
    for row in range(int(0.5 * SIZE), int((anatomy["diaphragm"] - anatomy["dome"] - 0.03) * SIZE)):
        line = image[row - 1 : row + 2].mean(axis=0)
        if line[start] < threshold:
            continue
        bright = line >= threshold
        left = start
        while left > 0 and bright[left - 1]:
            left -= 1
        right = start
        while right < SIZE - 1 and bright[right + 1]:
            right += 1
        best = max(best, right - left + 1)
    return best


def test_cardiomegaly_widens_the_heart(anatomy: dict) -> None:
    normal, big = draw([], anatomy, 11), draw(["Cardiomegaly"], anatomy, 11)
    masks = anatomy_masks(SIZE, anatomy)
    threshold = 0.5 * (np.median(normal[masks["lungs"] > 0.5]) + np.median(normal[masks["heart"] > 0.5]))
    thorax = 2 * (anatomy["gap"] + anatomy["lung_width"]) * SIZE
    w_normal, w_big = heart_width(normal, anatomy, threshold), heart_width(big, anatomy, threshold)
    assert w_big > w_normal + 0.06 * SIZE
    assert w_normal / thorax < 0.5 < w_big / thorax  # cardiothoracic ratio


def test_effusion_opacifies_a_lung_base(anatomy: dict) -> None:
    normal, effusion = draw([], anatomy, 12), draw(["Effusion"], anatomy, 12)
    lungs = anatomy_masks(SIZE, anatomy)["lungs"] > 0.5
    yy, xx = grids()
    a = anatomy
    lower_lateral = (
        lungs
        & (yy > a["lung_top"] + 0.7 * (a["diaphragm"] - a["lung_top"]))
        & (np.abs(xx - a["cx"]) > a["gap"] + a["lung_width"] / 2)
    )
    rises = [(effusion - normal)[lower_lateral & side].mean() for side in (xx < a["cx"], xx > a["cx"])]
    assert max(rises) > 25
    upper = lungs & (yy < a["lung_top"] + 0.4 * (a["diaphragm"] - a["lung_top"]))
    assert np.abs(effusion - normal)[upper].mean() < 2  # the apices stay clear


def test_mass_is_a_bigger_opacity_than_nodule(anatomy: dict) -> None:
    normal = draw([], anatomy, 13)
    lungs = anatomy_masks(SIZE, anatomy)["lungs"] > 0.5
    nodule = (draw(["Nodule"], anatomy, 13) - normal)[lungs].mean()
    mass = (draw(["Mass"], anatomy, 13) - normal)[lungs].mean()
    assert nodule > 0.2
    assert mass > 1.4 * nodule


def test_pneumothorax_region_is_dark_and_marking_free(anatomy: dict) -> None:
    normal, ptx = draw([], anatomy, 14), draw(["Pneumothorax"], anatomy, 14)
    darker = gaussian_filter(ptx - normal, 1.0) < -8
    region = binary_erosion(darker, iterations=2)  # drop the chest wall edge and pleural line
    assert region.sum() > 50
    assert highpass(ptx)[region].std() < 0.85 * highpass(normal)[region].std()
    # confined to one lung
    cx = int(anatomy["cx"] * SIZE)
    assert region[:, :cx].sum() == 0 or region[:, cx:].sum() == 0


def test_fibrosis_adds_fine_texture(anatomy: dict) -> None:
    normal, fibrosis = draw([], anatomy, 15), draw(["Fibrosis"], anatomy, 15)
    lungs = anatomy_masks(SIZE, anatomy)["lungs"] > 0.5
    energy = lambda image: (highpass(image, 1.5)[lungs] ** 2).mean()  # noqa: E731
    assert energy(fibrosis) > 1.15 * energy(normal)


def test_pneumonia_adds_a_patchy_opacity(anatomy: dict) -> None:
    normal, pneumonia = draw([], anatomy, 16), draw(["Pneumonia"], anatomy, 16)
    lungs = anatomy_masks(SIZE, anatomy)["lungs"] > 0.5
    diff = (pneumonia - normal) * lungs
    assert diff[lungs].mean() > 1.5
    assert (diff > 30).sum() > 40  # a real consolidation, not a speck


def test_unknown_label_raises() -> None:
    with pytest.raises(ValueError, match="unknown label"):
        draw_phantom(["Atelectasis"], 64, np.random.default_rng(0))
    with pytest.raises(ValueError, match="No Finding"):
        draw_phantom(["No Finding", "Mass"], 64, np.random.default_rng(0))


# --------------------------------------------------------------------------- CLI


def test_cli_writes_dataset_and_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "nested" / "demo"
    assert main(["--out-dir", str(out), "--num-patients", "10", "--size", "64", "--seed", "1"]) == 0
    csv = read_csv(out)
    assert csv["Patient ID"].nunique() == 10
    assert len(list((out / "images").glob("*.png"))) == len(csv)
    summary = capsys.readouterr().out.strip()
    assert len(summary.splitlines()) == 1
    assert f"{len(csv)} phantom images" in summary and "10 patients" in summary and "Effusion=" in summary


@pytest.mark.parametrize("bad", [["--num-patients", "5"], ["--size", "32"]])
def test_cli_refuses_tiny_requests(tmp_path: Path, bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as error:
        main(["--out-dir", str(tmp_path / "x"), *bad])
    assert error.value.code != 0
    assert "at least" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
