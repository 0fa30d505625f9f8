"""Shared fixtures: small datasets made in the test, and validated configs pointing at them."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from workflow_scripts.common.config import apply_overrides, load_config

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "cxr-dev"

# Under pytest-xdist each worker gets one torch thread: two workers on two cores at two OpenMP threads
# each spin against each other and run many times slower than one worker alone.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, "1")

# Keep tests offline and quiet even where a network exists.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

VOCAB = ["Cardiomegaly", "Effusion", "Nodule", "Fibrosis", "Pneumonia", "No Finding"]


def split_flags(folder: Path, *splits: str) -> list[str]:
    """--train/--val/--test flags naming the split CSVs in `folder` (default: all three), as a rule does."""
    return [item for split in splits or ("train", "val", "test") for item in (f"--{split}", str(Path(folder) / f"{split}.csv"))]


def write_png(path: Path, seed: int, size: int = 40) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def make_nih_dataset(root: Path, num_patients: int = 30, films: int = 2, seed: int = 0) -> tuple[Path, Path]:
    """An NIH-format dataset of random-noise PNGs: a long-tailed label mix, several films per patient."""
    rng = np.random.default_rng(seed)
    weights = np.array([0.25, 0.3, 0.15, 0.1, 0.05, 0.15])
    rows = ["Image Index,Finding Labels,Patient ID"]
    for patient in range(1, num_patients + 1):
        labels = sorted(set(rng.choice(VOCAB, size=rng.integers(1, 3), p=weights)), key=VOCAB.index)
        if "No Finding" in labels and len(labels) > 1:
            labels.remove("No Finding")
        for film in range(films):
            name = f"{patient:08d}_{film:03d}.png"
            write_png(root / "images" / name, seed=patient * 100 + film)
            rows.append(f"{name},{'|'.join(labels)},{patient}")
    csv = root / "Data_Entry_2017.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv, root / "images"


def make_config(dataset: dict[str, Any] | None = None, *overrides: str) -> dict[str, Any]:
    """The demo config with `dataset` keys replaced, validated (defaults filled in)."""
    config = load_config([REPO / "config" / "config.yaml"], overrides)
    if dataset:
        config["dataset"].update(dataset)
    return config


def tree_checksum(root: Path) -> dict[str, str]:
    """Content hash and mtime of every file below root: proves a run never wrote into user data."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest() + f"@{path.stat().st_mtime_ns}"
        for path in sorted(root.rglob("*")) if path.is_file()
    }


def break_dataset(kind: str, dataset_dir: Path) -> str:
    """Break the dataset in one way; return the text the error must contain."""
    csv = dataset_dir / "Data_Entry_2017.csv"
    first_image = sorted((dataset_dir / "images").glob("*.png"))[0]
    if kind == "missing image":
        first_image.unlink()
        return f"{first_image.name}.*file not found"
    if kind == "truncated image":
        data = first_image.read_bytes()
        first_image.write_bytes(data[: len(data) // 2])
        return f"{first_image.name}.*(truncated|corrupt)"
    if kind == "zero-byte image":
        first_image.write_bytes(b"")
        return f"{first_image.name}.*empty"
    lines = csv.read_text().splitlines()
    if kind == "unknown label":
        lines[3] = lines[3].replace(lines[3].split(",")[1], "Dragon")
        csv.write_text("\n".join(lines) + "\n")
        return r"line 4 .*unknown label.*Dragon.*dataset.labels"
    if kind == "missing column":
        csv.write_text("\n".join(line.rsplit(",", 1)[0] for line in lines) + "\n")
        return r"missing column.*Patient ID"
    if kind == "empty csv":
        csv.write_text("")
        return "empty"
    if kind == "header only":
        csv.write_text(lines[0] + "\n")
        return "no rows"
    if kind == "duplicate rows":
        csv.write_text("\n".join(lines + [lines[5]]) + "\n")
        return r"listed more than once \(lines \[6, "
    raise AssertionError(kind)



@pytest.fixture
def nih_dataset(tmp_path: Path) -> tuple[Path, Path]:
    return make_nih_dataset(tmp_path / "nih")


@pytest.fixture
def nih_config(nih_dataset: tuple[Path, Path]) -> dict[str, Any]:
    csv, images = nih_dataset
    return make_config({"format": "nih", "csv": str(csv), "images": str(images), "labels": VOCAB})


__all__ = ["REPO", "SHARED_DATA", "VOCAB", "apply_overrides", "break_dataset", "make_config", "make_nih_dataset",
           "tree_checksum", "write_png"]


# pytest-xdist (pyproject's addopts: -n auto --dist loadgroup): a module's tests stay on one worker, so a
# module-scoped fixture (a Snakemake run, a trained LoRA) is built once; modules whose tests share no
# fixture and take long spread over the workers. The longest modules start first: the suite ends when
# its longest module does, not later.
SPREAD_MODULES = {"test_stats.py", "test_train_lora.py"}
LONGEST_FIRST = ("test_workflow.py", "test_faults.py", "test_lora_learns.py", "test_documented_commands.py")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each module keeps its own order
    for item in items:
        if item.path.name not in SPREAD_MODULES:
            item.add_marker(pytest.mark.xdist_group(item.path.name))
