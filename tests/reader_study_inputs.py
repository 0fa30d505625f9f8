"""Small reader-study inputs made in the test: split CSVs of real films and a synthetic image list."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

from tests.conftest import make_config

LABELS = ["Effusion", "Nodule", "No Finding"]
PHI = "Patient: DOE^JANE"  # a text chunk a real film might carry; it must never reach the page


def write_film(path: Path, seed: int, shape: tuple[int, int], metadata: bool) -> str:
    """A 'film' (height x width). Real ones (`metadata`): grainy noise with exact zeros, a PNG text
    chunk, a resolution and 8-bit grayscale. Synthetic ones: smooth (they compress far better), never
    below 20, saved as RGB: every difference of round 1's demo that the encoding could carry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if metadata:
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        info = PngImagePlugin.PngInfo()
        info.add_text("Comment", PHI)
        Image.fromarray(pixels).save(path, pnginfo=info, dpi=(72, 72))
    else:
        ramp = np.linspace(20, 200, shape[1])[None, :] + rng.normal(0, 2, shape)
        pixels = np.clip(ramp + 30 * rng.random(), 20, 255).astype(np.uint8)
        Image.fromarray(np.stack([pixels] * 3, axis=-1), mode="RGB").save(path)
    return str(path)


def write_split(path: Path, split: str, rows: list[tuple[str, str, str]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "labels", "prompt", "patient", "split"])
        for file, labels, patient in rows:
            writer.writerow([file, labels, f"A chest X-ray with {labels}", patient, split])


def make_study_inputs(root: Path, per_label: int = 3) -> tuple[Path, Path]:
    """results/data-like folder (train/val/test) and a generation_results.csv: `per_label` + 1 real
    val/test films per label (non-square, with metadata) and one more of a patient seen already,
    decoy training films with the same labels, and 2 * per_label square synthetic images per label."""
    data = root / "data"
    data.mkdir(parents=True)
    splits: dict[str, list[tuple[str, str, str]]] = {"train": [], "val": [], "test": []}
    for index, label in enumerate(LABELS):
        for film in range(per_label + 1):
            split = "val" if film % 2 else "test"
            name = f"real_{split}_{index}_{film}.png"
            splits[split].append((write_film(root / "films" / name, 100 * index + film, (48, 40), True), label,
                                  f"p{split}{index}{film}"))
        splits["train"].append((write_film(root / "films" / f"train_{index}.png", 900 + index, (48, 40), True), label,
                                f"ptrain{index}"))
        # a second film of a patient who has one already: the study shows one film per patient
        splits["val"].append((write_film(root / "films" / f"real_val_{index}_again.png", 700 + index, (48, 40), True), label,
                              f"pval{index}1"))
    # One film with two labels: a Nodule key may use it once exact matches run out.
    splits["test"].append((write_film(root / "films" / "real_test_both.png", 999, (48, 40), True), "Effusion|Nodule", "pboth"))
    for split, rows in splits.items():
        write_split(data / f"{split}.csv", split, rows)
    synthetic = root / "synthetic"
    lines = ["file,prompt,labels,seed"]
    for index, label in enumerate(LABELS):
        for image in range(2 * per_label):
            file = write_film(synthetic / f"{label.replace(' ', '_')}_{image:04d}.png", 5000 + 10 * index + image, (32, 32), False)
            lines.append(f"{file},A chest X-ray with {label},{label},{image}")
    (synthetic / "generation_results.csv").write_text("\n".join(lines) + "\n")
    return data, synthetic / "generation_results.csv"


def build_study(config: dict[str, Any], data: Path, synthetic: Path, folder: Path):
    """The page into folder/page, the key into folder/key, as the rule does."""
    from workflow_scripts.reader_study.build import build

    return build(config, data, synthetic, folder / "page", folder / "key")


def study_config(**settings: Any) -> dict[str, Any]:
    config = make_config({"labels": LABELS})
    config["model"]["resolution"] = 32
    config["reader_study"].update({"images_per_label": 3, "repeats": 2, "seed": 0, "bootstrap_samples": 200, **settings})
    return config


def write_answers(path: Path, reader: str, rows: list[tuple[str, str, int, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["reader", "image_id", "answer", "confidence", "findings"])
        for image_id, answer, confidence, findings in rows:
            writer.writerow([reader, image_id, answer, confidence, findings])
    return path
