"""Reader study stage: a blinded page of real and synthetic X-rays for radiologists, and its key.

    python -m workflow_scripts.reader_study.build --config results/config/reader_study.yaml \\
        --data-dir results/data --synthetic results/synthetic/generation_results.csv \\
        --out-dir results/reader_study [--images-per-label 10 --repeats 4 --seed 0 ...]

For every label key of the synthetic images (a label, or a combination with all_label_combinations)
it draws `images_per_label` synthetic images and as many real images of the val/test splits with the
same labels (exact label set first, then films that hold the key's labels among others). Both go
through one path: decoded, made square as the model saw its training images (model.crop), resized to
image_size, written as 8-bit grayscale PNG without metadata, embedded in the page as data URIs under
ids in shuffled order. Outputs: index.html (the page, the only file readers get), key.csv (which id is
which: keep it), study.json (study id and findings vocabulary, read by the scorer).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from workflow_scripts.errors import run_stage
from workflow_scripts.config import add_config_arguments, config_from_args
from workflow_scripts.images import read_xray
from workflow_scripts.reader_study.design import (
    KEY_COLUMNS, StudyError, findings_vocabulary, image_ids, study_id)
from workflow_scripts.tables import LABEL_JOIN, load_split, read_generation_results

TEMPLATE = Path(__file__).with_name("page.html")
DATA_MARK = "/*STUDY_DATA*/"


def label_set(text: str) -> frozenset[str]:
    return frozenset(label for label in str(text).split(LABEL_JOIN) if label)


def real_candidates(real: pd.DataFrame, key_labels: frozenset[str], used: set[str], rng: np.random.Generator) -> list[int]:
    """Rows of `real` not used yet: the exact label set first, then films holding the key's labels
    among others, each group in random order."""
    sets = real["labels"].map(label_set)
    free = ~real["path"].isin(used)
    exact = np.flatnonzero((free & (sets == key_labels)).to_numpy())
    wider = np.flatnonzero((free & sets.map(lambda labels: key_labels < labels)).to_numpy())
    return [*rng.permutation(exact), *rng.permutation(wider)]


def select_images(synthetic: pd.DataFrame, real: pd.DataFrame, per_label: int, seed: int,
                  notes: list[str]) -> pd.DataFrame:
    """Matched draw: per label key of `synthetic`, n synthetic and n real images, n = per_label or
    fewer where either side runs short (noted), so both sources keep the same label composition."""
    rng = np.random.default_rng(seed)
    used: set[str] = set()
    rows = []
    for key, group in synthetic.groupby("labels", sort=True):
        candidates = real_candidates(real, label_set(key), used, rng)
        n = min(per_label, len(group), len(candidates))
        if n < per_label:
            notes.append(f"{key}: {n} pair(s) instead of {per_label} ({len(group)} synthetic, "
                         f"{len(candidates)} unused real val/test images with these labels)")
        for index in rng.choice(len(group), size=n, replace=False):
            rows.append({"source": "synthetic", "labels": key, "file": group.iloc[index]["path"]})
        for index in candidates[:n]:
            film = real.iloc[index]
            used.add(film["path"])
            rows.append({"source": "real", "labels": film["labels"], "file": film["path"]})
    if not rows:
        raise StudyError("no label has both synthetic images and real val/test images: nothing to show "
                         "(notes: " + "; ".join(notes) + ")")
    return pd.DataFrame(rows)


def arrange(selected: pd.DataFrame, repeats: int, seed: int) -> pd.DataFrame:
    """Add `repeats` second showings (for consistency), shuffle, and give ids in display order, under
    a study id from the pixels shown: other images (a re-run generation) make another study."""
    rng = np.random.default_rng([seed, 1])
    entries = selected.assign(original=range(len(selected)))
    if repeats > len(selected):
        raise StudyError(f"reader_study.repeats: {repeats} repeats asked for, but the study has only "
                         f"{len(selected)} images")
    again = entries.iloc[rng.choice(len(entries), size=repeats, replace=False)].assign(is_repeat=True)
    entries = pd.concat([entries.assign(is_repeat=False), again], ignore_index=True)
    entries = entries.iloc[rng.permutation(len(entries))].reset_index(drop=True)
    study = study_id([(source, hashlib.sha256(src.encode()).hexdigest()) for source, src in zip(selected["source"], selected["src"])],
                     seed)
    entries["image_id"] = image_ids(study, len(entries))
    first = entries[~entries["is_repeat"]].set_index("original")["image_id"]
    entries["repeat_of"] = [first[o] if rep else "" for o, rep in zip(entries["original"], entries["is_repeat"])]
    return entries.assign(study=study)


def encode_image(path: str, size: int, crop: str) -> str:
    """One image as the page shows it: square as the model saw it, `size` px, 8-bit grayscale PNG
    with no metadata (a fresh image from the pixels: no ICC profile, text or EXIF carried over), as a data URI."""
    image = read_xray(path).convert("L")
    if crop == "pad":
        image = ImageOps.pad(image, (size, size), method=Image.Resampling.BILINEAR, color=0)
    else:
        image = ImageOps.fit(image, (size, size), method=Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def render_page(study: str, vocabulary: list[str], images: list[dict[str, str]]) -> str:
    """The page template with the study's data in it: ids and pixels only, never a source or a label."""
    data = {"study": study, "findings": vocabulary, "images": images}
    # "</" cannot end the script element early; JSON is a JavaScript literal.
    payload = json.dumps(data).replace("</", "<\\/")
    template = TEMPLATE.read_text()
    return template.replace("{{TITLE}}", html.escape(f"Chest X-ray reader study {study}")).replace(DATA_MARK, payload)


def build(config: dict[str, Any], data_dir: Path, synthetic_csv: Path, out_dir: Path) -> pd.DataFrame:
    settings = config["reader_study"]
    size = settings["image_size"] or config["model"]["resolution"]
    real = pd.concat([load_split(data_dir, split) for split in settings["real_splits"]], ignore_index=True)
    synthetic = read_generation_results(synthetic_csv)
    notes: list[str] = []
    selected = select_images(synthetic, real, settings["images_per_label"], settings["seed"], notes)
    selected["src"] = [encode_image(file, size, config["model"]["crop"]) for file in selected["file"]]
    entries = arrange(selected, settings["repeats"], settings["seed"])
    study = entries["study"].iloc[0]
    images = [{"id": row.image_id, "src": row.src} for row in entries.itertuples()]
    vocabulary = findings_vocabulary(config["dataset"]["labels"])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "index.html").write_text(render_page(study, vocabulary, images))
    entries[KEY_COLUMNS].to_csv(out_dir / "key.csv", index=False)
    counts = entries[entries["repeat_of"] == ""]["source"].value_counts().to_dict()
    meta = {"study": study, "findings": vocabulary, "seed": settings["seed"], "image_size": size,
            "crop": config["model"]["crop"], "real_splits": settings["real_splits"], "images": counts,
            "repeats": settings["repeats"], "notes": notes}
    (out_dir / "study.json").write_text(json.dumps(meta, indent=2) + "\n")
    for note in notes:
        print(f"note: {note}")
    return entries


@run_stage
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--data-dir", type=Path, default=Path("results/data"), help="folder with val/test.csv")
    parser.add_argument("--synthetic", type=Path, default=Path("results/synthetic/generation_results.csv"))
    parser.add_argument("--out-dir", type=Path, default=Path("results/reader_study"))
    for key, kind in [("images_per_label", int), ("repeats", int), ("seed", int), ("image_size", int)]:
        parser.add_argument(f"--{key.replace('_', '-')}", type=kind, help=f"override reader_study.{key}")
    parser.add_argument("--real-splits", nargs="+", choices=["val", "test"], help="override reader_study.real_splits")
    args = parser.parse_args(argv)
    config = config_from_args(args, "reader_study")
    for key in ("images_per_label", "repeats", "seed", "image_size", "real_splits"):
        if getattr(args, key) is not None:
            config["reader_study"][key] = getattr(args, key)
    entries = build(config, args.data_dir, args.synthetic, args.out_dir)
    print(f"page: {args.out_dir / 'index.html'} ({len(entries)} images); key: {args.out_dir / 'key.csv'} (keep it private)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
