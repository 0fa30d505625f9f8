"""Fidelity, diversity and prompt adherence of the synthetic images against held-out real ones.

Reference set: the real *val* split (patients the generator never saw). Every figure comes with a
real-vs-real floor: real *train* images against the same val images at the same n, i.e. what real
radiographs score. Per label (images whose labels contain it) and overall, every set is subsampled
to one n: the smallest of synthetic, real val and real train (and evaluation.max_images_per_label).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from workflow_scripts.common.config import config_hash
from workflow_scripts.fidelity import BASE, BASE_PROMPTED, FLOOR, MACRO, PROMPTED, REAL_VAL, SYNTHETIC, distances
from workflow_scripts.fidelity.features import Extractor, compute_features, load_images
from workflow_scripts.common.errors import DataError
from workflow_scripts.common.tables import LABEL_JOIN, Splits, json_safe, load_split, read_generation_results, split_path

ROW_KEYS = ["extractor", "label", "comparison", "n"]  # then every set metric's columns, then notes
DIVERSITY_COLUMNS = ["label", "set", "images", "pairs", "ms_ssim", "window", "notes"]
ADHERENCE_COLUMNS = ["label", "set", "positives", "negatives", "auroc", "ci_low", "ci_high", "notes"]
OVERALL = "overall"


def label_sets(cells: Sequence[str]) -> list[set[str]]:
    return [{label.strip() for label in str(cell).split(LABEL_JOIN) if label.strip()} for cell in cells]


def has_label(sets: list[set[str]], label: str) -> np.ndarray:
    return np.array([True] * len(sets)) if label == OVERALL else np.array([label in s for s in sets], dtype=bool)


def plan_samples(sets: dict[str, list[set[str]]], labels: list[str], cap: int | None, seed: int
                 ) -> dict[str, dict[str, np.ndarray]]:
    """{label: {set name: row indices}}: per label, every set subsampled to the same n."""
    plan = {}
    for number, label in enumerate(labels):
        rows = {name: np.flatnonzero(has_label(cells, label)) for name, cells in sets.items()}
        n = distances.equal_n({name: len(r) for name, r in rows.items()}, cap)
        plan[label] = {name: distances.subsample(r, n, seed + 1000 * number + k) for k, (name, r) in enumerate(rows.items())}
    return plan


def _distance_row(extractor: str, label: str, comparison: str, real: np.ndarray, other: np.ndarray,
                  evaluation: dict[str, Any], seed: int) -> dict[str, Any]:
    n = min(len(real), len(other))
    row: dict[str, Any] = {"extractor": extractor, "label": label, "comparison": comparison, "n": n}
    if n < 2:
        return {**row, "fid": None, "fid_status": f"n/a (n < 2: {n})", "notes": f"n/a: {n} image(s) per set"}
    notes: list[str] = []
    for metric in distances.SET_METRICS:
        scores = metric.compute(real, other, {**evaluation, "seed": seed})
        if isinstance(scores, dict):
            notes += scores.pop(distances.NOTES, [])
            row.update(scores)
        else:
            notes.append(f"{metric.name} {scores}")
    return {**row, "notes": "; ".join(notes)}


def fidelity_columns() -> list[str]:
    """fidelity.csv's columns. fid is a number or empty; fid_status says which: "ok", or why there is
    none (n < dims, extractor unavailable)."""
    return [*ROW_KEYS, *(column for metric in distances.SET_METRICS for column in metric.columns), "notes"]


def fidelity_rows(extractors: Sequence[Extractor], features: dict[str, dict[str, np.ndarray]],
                  plan: dict[str, dict[str, np.ndarray]], positions: dict[str, dict[int, int]],
                  evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per extractor, label and comparison (synthetic vs val; train vs val floor; the base
    without LoRA vs val where its images are given)."""
    rows = []
    others = [(SYNTHETIC, "synthetic"), (FLOOR, "train")] + ([(BASE, "base")] if "base" in features else [])
    for extractor in extractors:
        for label, picked in plan.items():
            if not extractor.available:
                for comparison, _ in others:
                    rows.append({"extractor": extractor.name, "label": label, "comparison": comparison,
                                 "n": len(picked["val"]), "fid": None, "fid_status": extractor.status,
                                 "notes": extractor.status})
                continue

            def take(name: str) -> np.ndarray:
                return features[name][extractor.name][[positions[name][i] for i in picked[name]]]

            real = take("val")
            for comparison, name in others:
                rows.append(_distance_row(extractor.name, label, comparison, real, take(name), evaluation,
                                          int(evaluation["seed"])))
    return rows


def diversity_rows(paths: dict[str, list[str]], sets: dict[str, list[set[str]]], labels: list[str],
                   evaluation: dict[str, Any], resolution: int) -> list[dict[str, Any]]:
    """Mean pairwise MS-SSIM within each label, synthetic and real val at the same number of images."""
    rows, seed = [], int(evaluation["seed"])
    for number, label in enumerate(tqdm(labels, desc="MS-SSIM diversity", unit="label", file=sys.stderr)):
        picked = plan_samples({"synthetic": sets["synthetic"], "val": sets["val"]}, [label],
                              int(evaluation["diversity_images"]), seed + 7 + number)[label]
        for name, what in (("synthetic", "synthetic"), ("val", "real val")):
            images = load_images([paths[name][i] for i in picked[name]], resolution)
            result = distances.pairwise_ms_ssim(images, int(evaluation["diversity_pairs"]), seed + number)
            rows.append({"label": label, "set": what, "images": result["images"], "pairs": result["pairs"],
                         "ms_ssim": result["ms_ssim"], "window": result.get("window"), "notes": result.get("note", "")})
    return rows


def classifier_scores(model: torch.nn.Module, meta: dict[str, Any], paths: Sequence[str], device: str,
                      batch_size: int = 64) -> np.ndarray:
    """Sigmoid probabilities (images, classes) of a classifier saved by train_classifier, scored as its
    test split was (classifier_device.predict; the loss against placeholder targets is not used)."""
    from workflow_scripts.classifier.classifier_device import precision_for, predict
    from workflow_scripts.classifier.classifier_model import FilmDataset, make_loader

    if not len(paths):
        return np.zeros((0, len(meta["classes"])))
    targets = np.zeros((len(paths), len(meta["classes"])), dtype=np.float32)
    dataset = FilmDataset(list(paths), targets, int(meta["image_size"]), meta.get("interpolation", "bicubic"))
    precision = precision_for(torch.device(device))
    probs, _ = predict(precision.prepare_model(model), make_loader(dataset, batch_size, 0), precision,
                       meta["mean"], meta["std"])
    return probs


def adherence_rows(scored: Sequence[tuple[str, np.ndarray, list[set[str]], np.ndarray | None]], classes: list[str],
                   labels: list[str], n_boot: int, seed: int) -> list[dict[str, Any]]:
    """Per label, and macro over labels: the AUROC of the classifier's score for the label, prompted (or
    true) label vs the rest, for each (set name, scores, label sets, patient clusters) given. Synthetic
    images are independent draws (clusters None); real val films cluster by patient."""
    from workflow_scripts.study.stats import run_aurocs

    used = [label for label in labels if label in classes]
    if not used:
        return []
    results = {}
    for what, scores, cells, clusters in scored:
        y = np.stack([has_label(cells, label) for label in used], axis=1)
        results[what] = (y, run_aurocs(y, scores[:, [classes.index(label) for label in used]],
                                       np.arange(len(y)) if clusters is None else clusters, n_boot, seed))
    rows = []
    for number, label in enumerate([*used, MACRO]):
        for what, (y, result) in results.items():
            cell = result["macro"] if label == MACRO else result["per_label"][number]
            positives = int(y.sum()) if label == MACRO else int(y[:, number].sum())
            negatives = int((~y).sum()) if label == MACRO else int((~y[:, number]).sum())
            rows.append({"label": label, "set": what, "positives": positives, "negatives": negatives,
                         "auroc": cell["auroc"], "ci_low": cell["ci_low"], "ci_high": cell["ci_high"],
                         "notes": cell.get("note", "")})
    return rows


def evaluate(config: dict[str, Any], data_dir: Splits, synthetic_csv: str | Path, out_dir: str | Path,
             extractors: Sequence[Extractor], classifier: tuple[torch.nn.Module, dict[str, Any]] | None = None,
             audit_summary: dict[str, Any] | None = None, device: str = "cpu", batch_size: int = 32,
             base_csv: str | Path | None = None) -> dict[str, Any]:
    """Compute everything, write fidelity.csv/.json/.md, diversity.csv, adherence.csv and plots/.
    `base_csv`: the LoRA-off control's images (same prompts and seeds, base model alone), scored beside."""
    from workflow_scripts.fidelity.report import make_plots, render_markdown

    evaluation, vocabulary = config["evaluation"], list(config["dataset"]["labels"])
    resolution, seed = int(config["model"]["resolution"]), int(evaluation["seed"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frames = {"synthetic": read_generation_results(synthetic_csv), "val": load_split(data_dir, "val"),
              "train": load_split(data_dir, "train")}
    if base_csv is not None:
        frames["base"] = read_generation_results(base_csv)
    for name in ("val", "train"):
        if frames[name].empty:
            raise DataError(f"{split_path(data_dir, name)}: no images; fidelity needs real {name} images")
    paths = {name: frame["path"].tolist() for name, frame in frames.items()}
    sets = {name: label_sets(frame["labels"]) for name, frame in frames.items()}
    present = set().union(*sets["synthetic"])
    labels = [label for label in vocabulary if label in present] + sorted(present - set(vocabulary)) + [OVERALL]

    plan = plan_samples(sets, labels, evaluation.get("max_images_per_label"), seed)
    needed = {name: sorted({int(i) for picked in plan.values() for i in picked[name]}) for name in frames}
    positions = {name: {row: k for k, row in enumerate(rows)} for name, rows in needed.items()}
    features = {name: compute_features(extractors, [paths[name][i] for i in rows], resolution, batch_size,
                                       desc=f"features of {name} images")
                for name, rows in needed.items()}
    rows = fidelity_rows(extractors, features, plan, positions, evaluation)
    diversity = diversity_rows(paths, sets, labels, evaluation, resolution)
    adherence, adherence_note = [], "unavailable: no real-only classifier given"
    if classifier is not None:
        model, meta = classifier
        classes = list(meta["classes"])
        scored = [(PROMPTED, "synthetic", None), *([(BASE_PROMPTED, "base", None)] if "base" in frames else []),
                  (REAL_VAL, "val", frames["val"]["patient"].astype(str).to_numpy())]
        adherence = adherence_rows([(what, classifier_scores(model, meta, paths[name], device), sets[name], clusters)
                                    for what, name, clusters in scored], classes, labels,
                                   int(config["classifier"]["bootstrap_samples"]), seed)
        adherence_note = f"real-only classifier {meta.get('model', '?')} ({meta.get('source', 'ratio 0')})"

    pd.DataFrame(rows, columns=fidelity_columns()).to_csv(out_dir / "fidelity.csv", index=False)
    pd.DataFrame(diversity, columns=DIVERSITY_COLUMNS).to_csv(out_dir / "diversity.csv", index=False)
    pd.DataFrame(adherence, columns=ADHERENCE_COLUMNS).to_csv(out_dir / "adherence.csv", index=False)
    result = {
        "rows": rows, "diversity": diversity, "adherence": adherence,
        "settings": {
            "reference": f"real val split ({len(frames['val'])} images, patients the generator never saw)",
            "base_control": ("the same prompts and seeds drawn by the base model without LoRA "
                             f"({len(frames['base'])} images)" if "base" in frames else None),
            "floor": "real train images against the same real val images, same n",
            "preprocessing": f"read_xray -> LoRA training transform to {resolution} px -> one antialiased bilinear "
                             "resize to each extractor's input",
            "extractors": {e.name: {"status": e.status, "dims": e.dims, "input_size": e.input_size,
                                    "description": e.description} for e in extractors},
            "n_per_label": {label: len(picked["val"]) for label, picked in plan.items()},
            "n": {name: len(frame) for name, frame in frames.items()},
            "kid": {"implementation": "torchmetrics poly_mmd (unbiased MMD^2, kernel (x.y/d + 1)^3)",
                    "subset_size": evaluation["kid_subset_size"], "subsets": evaluation["kid_subsets"]},
            "fid": "pytorch-fid Frechet distance, only where n >= feature dims",
            "prdc": {"implementation": "prdc (Naeem et al. 2020)", "k": evaluation["prdc_k"]},
            "diversity": "mean pairwise MS-SSIM (pytorch-msssim, 5 scales) at the training resolution",
            "adherence": adherence_note,
            "seed": seed, "device": device, "config_hash": config_hash(evaluation),
        },
        "audit": audit_summary,
    }
    (out_dir / "fidelity.json").write_text(json.dumps(json_safe(result), indent=2) + "\n")
    plots = make_plots(pd.DataFrame(rows, columns=fidelity_columns()), pd.DataFrame(diversity, columns=DIVERSITY_COLUMNS),
                       pd.DataFrame(adherence, columns=ADHERENCE_COLUMNS), out_dir / "plots")
    (out_dir / "fidelity.md").write_text(render_markdown(result, plots, out_dir))
    return result
