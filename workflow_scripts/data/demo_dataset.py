"""Draw a synthetic *phantom* chest-radiograph dataset in NIH ChestX-ray14 format.

THESE IMAGES ARE PHANTOMS FOR TRYING THE PIPELINE, NOT MEDICAL DATA. They are drawn from
simple geometric shapes and noise, contain no patient information, and nothing learned
from them says anything about real radiographs or real disease.

The phantoms (drawn by ``workflow_scripts.data.phantom``) show coarse chest anatomy (body outline, lung fields with vessel markings,
mediastinum, heart bulging to the image's right = the patient's left, diaphragm domes,
ribs, clavicles, spine) with per-patient variation in size, position, contrast and noise,
plus a clearly visible sign for each finding:

- Cardiomegaly: enlarged heart (cardiothoracic ratio about 0.6-0.68 instead of 0.42-0.48)
- Effusion: basal opacity with a meniscus that blunts the costophrenic angle
- Nodule: one to three small round opacities in a lung
- Mass: one large lobulated opacity in a lung
- Pneumothorax: a thin pleural line with a dark, marking-free band lateral/apical to it
- Fibrosis: reticular (net-like) texture, basal and peripheral
- Pneumonia: patchy, fuzzy consolidation in one zone of a lung

The dataset is written like NIH ChestX-ray14: ``images/00000001_000.png`` (patient 1,
film 0, 8-bit grayscale) and ``Data_Entry_2017.csv`` with the columns
``Image Index,Finding Labels,Patient ID`` (labels joined by ``|``, ``No Finding`` for
normal images). Everything is deterministic given the seed: the same arguments give
byte-identical PNGs and CSV.

Command line::

    python -m workflow_scripts.data.demo_dataset --out-dir results/demo_data \\
        --num-patients 80 --size 128 --seed 0
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from workflow_scripts.common.errors import run_stage
from workflow_scripts.data.phantom import LABELS, draw_phantom, sample_anatomy
from workflow_scripts.data.phantom_patients import plan_patients
from workflow_scripts.data.resolve import default_workers, ordered_map

CSV_NAME = "Data_Entry_2017.csv"
IMAGE_DIR = "images"
CSV_COLUMNS = ("Image Index", "Finding Labels", "Patient ID")
MIN_PATIENTS = 10
MIN_SIZE = 64
NIH_NAME = re.compile(r"^\d{8}_\d{3}\.png$")

FILM_DROP_P = 0.15  # chance one film of a multi-finding patient lacks one finding
FILMS_PER_PATIENT = (1, 2, 3, 4)
FILMS_P = (0.2, 0.3, 0.3, 0.2)

# --------------------------------------------------------------------------- dataset


def make_demo_dataset(out_dir: Path, num_patients: int, size: int, seed: int,
                      workers: int | None = None) -> pd.DataFrame:
    """Write ``out_dir/images/*.png`` and ``out_dir/Data_Entry_2017.csv``; return the CSV frame.

    Patients are numbered from 1 and have 1-4 films each (``00000001_000.png`` ...). Stale
    NIH-named PNGs in ``out_dir/images`` from an earlier, larger run are removed so the
    folder matches the CSV. ``workers`` processes draw (default: one per usable core); the files
    are the same for any number.
    """
    num_patients, size, seed = int(num_patients), int(size), int(seed)
    if num_patients < MIN_PATIENTS:
        raise ValueError(
            f"num_patients must be at least {MIN_PATIENTS} (got {num_patients}) so every split gets patients"
        )
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} pixels (got {size}); smaller phantoms lose the findings")
    out_dir = Path(out_dir)
    image_dir = out_dir / IMAGE_DIR
    image_dir.mkdir(parents=True, exist_ok=True)

    plan_rng = np.random.default_rng([seed, 0])
    plan = plan_patients(num_patients, plan_rng)
    films = plan_rng.choice(FILMS_PER_PATIENT, size=num_patients, p=FILMS_P)

    # Each patient's films depend only on (seed, patient, film): drawn in any order, by any process,
    # they are the same bytes.
    patients: list[tuple[int, list[tuple[int, list[str]]]]] = []
    for index, (findings, n_films) in enumerate(zip(plan, films)):
        patient_films = []
        for film in range(int(n_films)):
            labels = list(findings)
            if len(labels) > 1 and plan_rng.random() < FILM_DROP_P:
                labels.pop(int(plan_rng.integers(len(labels))))  # a finding not seen on this film
            patient_films.append((film, labels))
        patients.append((index + 1, patient_films))

    draw = functools.partial(_draw_patient, image_dir=image_dir, size=size, seed=seed)
    processes = min(int(workers or default_workers()), len(patients))
    rows = []
    with tqdm(total=int(films.sum()), desc="drawing phantoms", unit="img", file=sys.stderr) as progress:
        for patient_rows in ordered_map(draw, patients, processes, chunksize=8):
            rows.extend(patient_rows)
            progress.update(len(patient_rows))

    written = {row[0] for row in rows}
    for stale in image_dir.glob("*.png"):
        if NIH_NAME.match(stale.name) and stale.name not in written:
            stale.unlink()

    frame = pd.DataFrame(rows, columns=list(CSV_COLUMNS))
    frame.to_csv(out_dir / CSV_NAME, index=False, lineterminator="\n")
    return frame


def _draw_patient(patient_films: tuple[int, list[tuple[int, list[str]]]], image_dir: Path, size: int,
                  seed: int) -> list[tuple[str, str, int]]:
    """Draw and write one patient's films; their CSV rows."""
    patient, films = patient_films
    anatomy = sample_anatomy(np.random.default_rng([seed, 1, patient]))
    rows = []
    for film, labels in films:
        array = draw_phantom(labels, size, np.random.default_rng([seed, 2, patient, film]), anatomy)
        name = f"{patient:08d}_{film:03d}.png"
        Image.fromarray(array).save(image_dir / name, format="PNG")
        rows.append((name, "|".join(labels), patient))
    return rows


def label_counts(frame: pd.DataFrame) -> dict[str, int]:
    """Images per label (vocabulary order) in a frame with a ``Finding Labels`` column."""
    split = frame["Finding Labels"].str.split("|")
    return {label: int(split.apply(lambda labels: label in labels).sum()) for label in LABELS}


@run_stage
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m workflow_scripts.data.demo_dataset",
        description="Draw a phantom chest X-ray dataset in NIH ChestX-ray14 format "
        "(synthetic shapes for trying the pipeline, NOT medical data).",
    )
    parser.add_argument("--out-dir", type=Path, required=True, help="folder for images/ and Data_Entry_2017.csv")
    parser.add_argument("--num-patients", type=int, default=80, help=f"number of patients (>= {MIN_PATIENTS})")
    parser.add_argument("--size", type=int, default=128, help=f"image side in pixels (>= {MIN_SIZE})")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed = identical files)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes that draw (default: one per usable core; the files are the same for any number)")
    args = parser.parse_args(argv)
    if args.num_patients < MIN_PATIENTS:
        parser.error(f"--num-patients must be at least {MIN_PATIENTS}, got {args.num_patients}")
    if args.size < MIN_SIZE:
        parser.error(f"--size must be at least {MIN_SIZE}, got {args.size}")
    frame = make_demo_dataset(args.out_dir, args.num_patients, args.size, args.seed, args.workers)
    counts = ", ".join(f"{k}={v}" for k, v in label_counts(frame).items())
    print(
        f"demo_dataset: {len(frame)} phantom images of {frame['Patient ID'].nunique()} patients "
        f"({args.size}px, seed {args.seed}) in {args.out_dir}; labels: {counts}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
