"""The noise control's null generator: one seeded noise image per generated image, same size and labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from workflow_scripts.common.tables import RESULT_COLUMNS
from workflow_scripts.generation.noise_images import main


# The files the make_noise_images rule hands the stage (relative to the test's working directory).
STAGE_PATHS = ["--synthetic", "results/synthetic/generation_results.csv", "--train", "results/data/train.csv",
               "--output-dir", "results/synthetic_noise"]


def _png(path: Path, pixels: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return str(path)


def test_noise_images_mirror_the_generated_list(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    # Real training images: flat grays 160-200 (pixel mean 180, sd 14.1 whatever the resizing).
    real = [_png(Path(f"real/{i}.png"), np.full((48, 48), 160 + 10 * i)) for i in range(5)]
    data = tmp_path / "results" / "data"
    data.mkdir(parents=True)
    pd.DataFrame({"path": real, "labels": "Mass", "prompt": "A chest X-ray with Mass", "patient": range(5),
                  "split": "train"}).to_csv(data / "train.csv", index=False)
    rows = []
    for i, (key, labels, size) in enumerate([("Mass", "Mass", 64), ("Mass", "Mass", 64), ("No_Finding", "No Finding", 32),
                                             ("Effusion+Mass", "Effusion|Mass", 64)]):
        file = f"results/synthetic/{key}/{key}_{i:04d}.png"
        _png(Path(file), np.zeros((size, size)))
        rows.append({"file": file, "prompt": f"A chest X-ray with {labels}", "labels": labels, "seed": 100 + i, "steps": 10,
                     "guidance": 7.5, "scheduler": "dpmsolver++", "checkpoint": "final"})
    pd.DataFrame(rows, columns=RESULT_COLUMNS).to_csv("results/synthetic/generation_results.csv", index=False)

    assert main(["--config", str(Path(__file__).resolve().parents[1] / "config" / "config.yaml"), *STAGE_PATHS]) == 0
    noise = pd.read_csv("results/synthetic_noise/generation_results.csv", dtype=str, keep_default_na=False)
    assert list(noise.columns) == [*RESULT_COLUMNS, "source_file"]
    generated = pd.DataFrame(rows).astype(str)
    for column in ("labels", "prompt", "seed"):
        assert noise[column].tolist() == generated[column].tolist()  # row for row
    assert noise["source_file"].tolist() == generated["file"].tolist()
    assert noise["file"].str.startswith("results/synthetic_noise/").all()
    images = [np.asarray(Image.open(file)) for file in noise["file"]]
    assert [image.shape for image in images] == [(64, 64), (64, 64), (32, 32), (64, 64)]  # the generated sizes
    assert not np.array_equal(images[0], images[1])  # each image from its own seed
    summary = json.loads(Path("results/synthetic_noise/noise_summary.json").read_text())
    assert summary["mean"] == 180 and abs(summary["std"] - np.std([160, 170, 180, 190, 200])) < 1e-9
    pooled = np.concatenate([image.ravel() for image in images]).astype(float)
    assert abs(pooled.mean() - summary["mean"]) < 2 and abs(pooled.std() - summary["std"]) < 2  # matched intensity

    first = images[0].copy()
    assert main(["--config", str(Path(__file__).resolve().parents[1] / "config" / "config.yaml"), *STAGE_PATHS]) == 0
    assert np.array_equal(np.asarray(Image.open(noise["file"][0])), first)  # seeded: the same image again
