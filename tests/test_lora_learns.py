"""LoRA training teaches the prompt. From the shipped pretrained base (which draws films with findings
at random, knowing no label), a short LoRA run on labelled phantom films must

1. lower the diffusion loss of the val split (patients it never trained on) under the labelled
   prompts, below what the base alone scores (step 0 of the curve), and
2. make the prompted finding appear: a fixed scorer (a logistic regression on thumbnails of freshly
   drawn phantoms, fitted here and never shown a generated image) must tell the Cardiomegaly-prompted
   images from the Effusion-prompted ones far better than it can for the same prompts and seeds drawn
   by the base without LoRA.

Either fails when training stops teaching the prompt: a learning rate of 0, LoRA targets that miss
the attention layers (the prompt reaches the UNet only through cross-attention), or the empty prompt
at training time (the LoRA then learns the films, not the labels).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from workflow_scripts.common.config import load_config
from workflow_scripts.models.demo_base import SHIPPED_DIR
from workflow_scripts.data.phantom import draw_phantom

LABELS = ["Cardiomegaly", "Effusion", "No Finding"]
PROMPTED = ["Cardiomegaly", "Effusion"]
IMAGES_PER_PROMPT = 16


def thumbnails(images: list[np.ndarray]) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(a).resize((16, 16), Image.Resampling.BILINEAR), dtype=float).ravel() / 255
                     for a in images])


def draw(labels: list[str], count: int, seed: int, size: int = 96) -> list[np.ndarray]:
    return [draw_phantom([] if label == "No Finding" else [label], size, np.random.default_rng([seed, k]))
            for k in range(count) for label in labels]


@pytest.fixture(scope="module")
def scorer():
    """P(Cardiomegaly), P(Effusion) from 16 px thumbnails: fitted on phantoms of their own seed."""
    from sklearn.linear_model import LogisticRegression

    films = draw(LABELS, 60, seed=424242)
    y = np.array(LABELS * 60)
    # the generator's films are 64 px; the scorer sees the same thumbnail whatever the source size
    model = LogisticRegression(C=1.0, max_iter=2000).fit(thumbnails(films), y)
    return lambda images: {label: model.predict_proba(thumbnails(images))[:, list(model.classes_).index(label)]
                           for label in PROMPTED}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    """One film per patient, 40 patients per label, in NIH format; split by prepare_dataset."""
    from workflow_scripts.data.prepare_dataset import prepare

    root = tmp_path_factory.mktemp("learns")
    (root / "images").mkdir()
    rows = ["Image Index,Finding Labels,Patient ID"]
    for k, film in enumerate(draw(LABELS, 40, seed=777)):
        name = f"{k + 1:08d}_000.png"
        Image.fromarray(film).save(root / "images" / name)
        rows.append(f"{name},{LABELS[k % 3]},{k + 1}")
    (root / "Data_Entry_2017.csv").write_text("\n".join(rows) + "\n")
    config = load_config([REPO / "config" / "config.yaml"], [
        f"dataset.csv={root / 'Data_Entry_2017.csv'}", f"dataset.images={root / 'images'}",
        f"dataset.labels=[{', '.join(LABELS)}]", "split.val_fraction=0.2", "split.test_fraction=0.1",
        "split.more_real_ratio=null", "balance.max_per_label=null", f"model.pretrained={SHIPPED_DIR}",
        "training.max_train_steps=400", "training.train_batch_size=8", "training.learning_rate=3e-3",
        "training.lr_scheduler=constant", "training.lr_warmup_steps=0",
        "training.save_steps=200", "training.validation_steps=1000", "training.num_validation_images=1",
        "training.validation_inference_steps=2", "training.validation_prompts=[A chest X-ray with Effusion]",
        "generation.num_inference_steps=10", "generation.batch_size=16",
    ])
    prepare(config, root / "data")
    return root, config


def draw_prompts(config: dict, checkpoint: Path | None, out: Path) -> dict[str, list]:
    """Each prompt's images, with the LoRA at `checkpoint` or (None) by the base alone, same seeds."""
    from workflow_scripts.generation.pipeline import generate, label_job

    jobs = [(*label_job(config, label), IMAGES_PER_PROMPT) for label in PROMPTED]
    generate(config, jobs, checkpoint, out, tiny_dir=out.parent / "unused-tiny")
    return {label: [np.asarray(Image.open(path)) for path in sorted((out / label).glob("*.png"))] for label in PROMPTED}


@pytest.fixture(scope="module")
def base_drawn(dataset, tmp_path_factory) -> dict[str, list]:
    """The prompts drawn by the base without LoRA: what both tests compare their LoRA's images with."""
    return draw_prompts(dataset[1], None, tmp_path_factory.mktemp("base") / "base")


def train_and_draw(dataset, out: Path, learning_rate: float = 3e-3, steps: int | None = None) -> tuple[dict, dict[str, list]]:
    """Train (fresh), then draw each prompt with the LoRA."""
    from workflow_scripts.lora.train_lora import train

    root, config = dataset
    training = {**config["training"], "learning_rate": learning_rate}
    if steps is not None:
        training.update(max_train_steps=steps, save_steps=steps)
    config = {**config, "training": training}
    summary = train(config, root / "data", out / "lora", out / "unused-tiny", resume="none")
    return summary, draw_prompts(config, out / "lora" / "final", out / "lora-drawn")


def separation(scorer, drawn: dict[str, list]) -> float:
    """How far apart the scorer puts the two prompts' images: mean over the two findings of
    P(finding | prompted for it) - P(finding | prompted for the other one)."""
    scores = {label: scorer(images) for label, images in drawn.items()}
    cardio = scores["Cardiomegaly"]["Cardiomegaly"].mean() - scores["Effusion"]["Cardiomegaly"].mean()
    effusion = scores["Effusion"]["Effusion"].mean() - scores["Cardiomegaly"]["Effusion"].mean()
    return float((cardio + effusion) / 2)


@pytest.mark.slow  # 400 LoRA steps and 40 generations: about a minute of CPU; the quick tier trains in test_train_lora.py
def test_a_short_lora_run_teaches_the_prompted_findings(dataset, scorer, base_drawn, tmp_path) -> None:
    summary, lora = train_and_draw(dataset, tmp_path)
    base = base_drawn
    curve = summary["val_loss"]
    assert curve[0]["step"] == 0 and curve[-1]["step"] == 400
    # held-out loss under the labelled prompts falls (by ~2 % here: most of the loss is noise no label explains)
    assert curve[-1]["loss"] < 0.99 * curve[0]["loss"], curve
    with_lora, without = separation(scorer, lora), separation(scorer, base)
    assert abs(without) < 0.15, without  # the base alone cannot be asked for a finding
    assert with_lora > without + 0.25, (with_lora, without)


@pytest.mark.slow
def test_a_learning_rate_of_zero_teaches_nothing(dataset, scorer, base_drawn, tmp_path) -> None:
    """The control of the test above: the same run with nothing learned fails both of its checks. At a
    learning rate of 0 no step moves a weight, so 40 steps stand for 400."""
    summary, lora = train_and_draw(dataset, tmp_path, learning_rate=0.0, steps=40)
    base = base_drawn
    curve = summary["val_loss"]
    assert curve[-1]["loss"] == pytest.approx(curve[0]["loss"], abs=1e-6)
    assert separation(scorer, lora) == pytest.approx(separation(scorer, base), abs=0.02)
