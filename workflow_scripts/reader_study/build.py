"""Reader study stage: a blinded page of real and synthetic X-rays for radiologists, and its key.

    python -m workflow_scripts.reader_study.build --config results/config/reader_study.yaml \\
        --data-dir results/data --synthetic results/synthetic/generation_results.csv \\
        --page-dir results/reader_study/page --key-dir results/reader_study/key [--images-per-label 10 ...]

For every label key of the synthetic images (a label, or a combination with all_label_combinations)
it draws `images_per_label` synthetic images and as many real images of the val/test splits with the
same labels (exact label set first, then films that hold the key's labels among others), one film per
patient. Both sources go through one path (`page_pixels`): decoded to 8-bit grayscale, made square at
model.resolution the way the model saw its training films (model.crop), resampled to image_size with
one resampler, written as uncompressed PNG with no chunk but IHDR/IDAT/IEND (so the byte size depends
on the side only, not on texture), embedded as data URIs under ids in shuffled order.
Outputs: <page-dir>/index.html (the only file readers get), <key-dir>/key.csv (which id is which)
and <key-dir>/study.json (study id, vocabulary); the key folder also keeps secret.txt (the study id's
HMAC key) and history/<id>/ (every key built there, so old answers can still be scored).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import io
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from workflow_scripts.common import paths
from workflow_scripts.common.errors import run_stage
from workflow_scripts.common.config import add_config_arguments, config_from_args
from workflow_scripts.common.images import read_xray
from workflow_scripts.reader_study.design import (
    KEY_COLUMNS, StudyError, findings_vocabulary, image_ids, study_id, study_secret)
from workflow_scripts.common.tables import LABEL_JOIN, load_split, read_generation_results

TEMPLATE = Path(__file__).with_name("page.html")
DATA_MARK = "/*STUDY_DATA*/"


def label_set(text: str) -> frozenset[str]:
    return frozenset(label for label in str(text).split(LABEL_JOIN) if label)


def real_candidates(real: pd.DataFrame, key_labels: frozenset[str], used: set[str], rng: np.random.Generator) -> list[int]:
    """Rows of `real` whose patient is not in the study yet: the exact label set first, then films
    holding the key's labels among others, each group in random order."""
    sets = real["labels"].map(label_set)
    free = ~real["patient"].astype(str).isin(used)
    exact = np.flatnonzero((free & (sets == key_labels)).to_numpy())
    wider = np.flatnonzero((free & sets.map(lambda labels: key_labels < labels)).to_numpy())
    return [*rng.permutation(exact), *rng.permutation(wider)]


def one_per_patient(real: pd.DataFrame, candidates: list[int], n: int, used: set[str]) -> list[int]:
    """The first `n` candidates of distinct patients not used yet (recognising a patient's anatomy
    on a second film would say "real"); marks their patients used."""
    chosen = []
    for index in candidates:
        patient = str(real.iloc[index]["patient"])
        if len(chosen) < n and patient not in used:
            used.add(patient)
            chosen.append(index)
    return chosen


def select_images(synthetic: pd.DataFrame, real: pd.DataFrame, per_label: int, seed: int,
                  notes: list[str]) -> pd.DataFrame:
    """Matched draw: per label key of `synthetic`, n synthetic and n real images, n = per_label or
    fewer where either side runs short (noted), so both sources keep the same label composition."""
    rng = np.random.default_rng(seed)
    used: set[str] = set()
    rows = []
    for key, group in synthetic.groupby("labels", sort=True):
        candidates = real_candidates(real, label_set(key), used, rng)
        patients = len({str(real.iloc[index]["patient"]) for index in candidates})
        n = min(per_label, len(group), patients)
        if n < per_label:
            notes.append(f"{key}: {n} pair(s) instead of {per_label} ({len(group)} synthetic, "
                         f"{patients} unused patients with real val/test films with these labels)")
        for index in rng.choice(len(group), size=n, replace=False):
            rows.append({"source": "synthetic", "labels": key, "file": group.iloc[index]["path"]})
        chosen = one_per_patient(real, candidates, n, used)
        wider = [real.iloc[index]["labels"] for index in chosen if label_set(real.iloc[index]["labels"]) != label_set(key)]
        if wider:
            notes.append(f"{key}: {len(wider)} of its {n} real film(s) carry other findings too "
                         f"({', '.join(sorted(set(wider)))}); the synthetic images were prompted with {key} only")
        rows += [{"source": "real", "labels": real.iloc[index]["labels"], "file": real.iloc[index]["path"]} for index in chosen]
    if not rows:
        raise StudyError("no label has both synthetic images and real val/test images: nothing to show "
                         "(notes: " + "; ".join(notes) + ")")
    return pd.DataFrame(rows)


def key_content(entries: pd.DataFrame) -> list[tuple[int, str, str, int]]:
    """What the key says, without the study id: per position, the source, the image's hash and the
    position it repeats (0: a first showing). Any change of it is another study."""
    first_position = {original: position for position, (original, repeat) in
                      enumerate(zip(entries["original"], entries["is_repeat"]), start=1) if not repeat}
    return [(position, row.source, hashlib.sha256(row.src.encode()).hexdigest(),
             first_position[row.original] if row.is_repeat else 0)
            for position, row in enumerate(entries.itertuples(), start=1)]


def arrange(selected: pd.DataFrame, repeats: int, seed: int, secret: bytes) -> pd.DataFrame:
    """Add `repeats` second showings (for consistency), shuffle, and give ids in display order under
    the study id. Of an image shown twice, the showing displayed first is the original (scored for
    accuracy); the later one points to it in `repeat_of`."""
    rng = np.random.default_rng([seed, 1])
    entries = selected.assign(original=range(len(selected)))
    if repeats > len(selected):
        raise StudyError(f"reader_study.repeats: {repeats} repeats asked for, but the study has only "
                         f"{len(selected)} images")
    again = entries.iloc[rng.choice(len(entries), size=repeats, replace=False)]
    entries = pd.concat([entries, again], ignore_index=True)
    entries = entries.iloc[rng.permutation(len(entries))].reset_index(drop=True)
    entries["is_repeat"] = entries["original"].duplicated()  # display order: the earlier showing is the original
    study = study_id(secret, key_content(entries))
    entries["image_id"] = image_ids(study, len(entries))
    first = entries[~entries["is_repeat"]].set_index("original")["image_id"]
    entries["repeat_of"] = [first[o] if rep else "" for o, rep in zip(entries["original"], entries["is_repeat"])]
    return entries.assign(study=study)


def page_pixels(path: str, resolution: int, size: int, crop: str) -> Image.Image:
    """One image as the page shows it, by the same steps whatever its source: 8-bit grayscale, square
    at `resolution` as the model saw its training films (a synthetic image is already that), then
    `size` px with one resampler. The pixels are all that is kept (no ICC profile, text or EXIF)."""
    image = read_xray(path).convert("L")
    if crop == "pad":
        image = ImageOps.pad(image, (resolution, resolution), method=Image.Resampling.BILINEAR, color=0)
    else:
        image = ImageOps.fit(image, (resolution, resolution), method=Image.Resampling.BILINEAR)
    if size != resolution:
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    return Image.fromarray(np.asarray(image, dtype=np.uint8), mode="L")


def encode_png(image: Image.Image) -> str:
    """Uncompressed 8-bit grayscale PNG as a data URI: the byte size is a function of the side only
    (compressed, it would measure noise and texture and tell the sources apart without a look)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=0)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def render_page(study: str, vocabulary: list[str], images: list[dict[str, str]]) -> str:
    """The page template with the study's data in it: ids and pixels only, never a source or a label."""
    data = {"study": study, "findings": vocabulary, "images": images}
    # "</" cannot end the script element early; JSON is a JavaScript literal.
    payload = json.dumps(data).replace("</", "<\\/")
    template = TEMPLATE.read_text()
    return template.replace("{{TITLE}}", html.escape(f"Chest X-ray reader study {study}")).replace(DATA_MARK, payload)


def keep_history(key_dir: Path, study: str) -> None:
    """Copy the key under history/<study>/ (answers to an earlier build stay scorable); an id already
    there with another key is refused (an HMAC collision of 8 hex digits: about 1 in 4 billion)."""
    folder = key_dir / "history" / study

    def answers_key(path: Path) -> pd.DataFrame:  # what scoring reads (file paths may move with the data)
        return pd.read_csv(path, dtype=str, keep_default_na=False)[["image_id", "source", "labels", "repeat_of"]]

    if (folder / "key.csv").is_file() and not answers_key(folder / "key.csv").equals(answers_key(key_dir / "key.csv")):
        raise StudyError(f"{folder}: study id {study} was given to another key before; delete {key_dir / 'secret.txt'} "
                         "and rebuild (answers to earlier pages then need their key from history/)")
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("key.csv", "study.json"):
        shutil.copyfile(key_dir / name, folder / name)


def build(config: dict[str, Any], data_dir: Path, synthetic_csv: Path, page_dir: Path, key_dir: Path) -> pd.DataFrame:
    if page_dir.resolve() == key_dir.resolve() or key_dir.resolve().is_relative_to(page_dir.resolve()):
        raise StudyError(f"--key-dir {key_dir} is (inside) --page-dir {page_dir}: the key would travel with the page")
    settings, resolution = config["reader_study"], config["model"]["resolution"]
    size = settings["image_size"] or resolution
    real = pd.concat([load_split(data_dir, split) for split in settings["real_splits"]], ignore_index=True)
    synthetic = read_generation_results(synthetic_csv)
    notes: list[str] = []
    if config["model"]["crop"] == "pad":
        notes.append("model.crop is pad: real films that are not square show black bars; synthetic images show them "
                     "only where the model learnt to draw them (a tell a reader may use)")
    selected = select_images(synthetic, real, settings["images_per_label"], settings["seed"], notes)
    selected["src"] = [encode_png(page_pixels(file, resolution, size, config["model"]["crop"])) for file in selected["file"]]
    entries = arrange(selected, settings["repeats"], settings["seed"], study_secret(key_dir))
    study = entries["study"].iloc[0]
    images = [{"id": row.image_id, "src": row.src} for row in entries.itertuples()]
    vocabulary = findings_vocabulary(config["dataset"]["labels"])
    page_dir.mkdir(parents=True, exist_ok=True)
    (page_dir / "index.html").write_text(render_page(study, vocabulary, images))
    entries[KEY_COLUMNS].to_csv(key_dir / "key.csv", index=False)
    counts = entries[entries["repeat_of"] == ""]["source"].value_counts().to_dict()
    meta = {"study": study, "findings": vocabulary, "seed": settings["seed"], "image_size": size,
            "crop": config["model"]["crop"], "real_splits": settings["real_splits"], "images": counts,
            "repeats": settings["repeats"], "notes": notes}
    (key_dir / "study.json").write_text(json.dumps(meta, indent=2) + "\n")
    keep_history(key_dir, study)
    for note in notes:
        print(f"note: {note}")
    return entries


@run_stage
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--data-dir", type=Path, default=Path(paths.DATA), help="folder with val/test.csv")
    parser.add_argument("--synthetic", type=Path, default=Path(paths.GENERATED))
    parser.add_argument("--page-dir", type=Path, default=Path(paths.READER_STUDY_PAGE),
                        help="folder of index.html, the one file to send")
    parser.add_argument("--key-dir", type=Path, default=Path(paths.READER_STUDY_KEY),
                        help="folder of key.csv, study.json, secret.txt and history/ (keep private)")
    for key, kind in [("images_per_label", int), ("repeats", int), ("seed", int), ("image_size", int)]:
        parser.add_argument(f"--{key.replace('_', '-')}", type=kind, help=f"override reader_study.{key}")
    parser.add_argument("--real-splits", nargs="+", choices=["val", "test"], help="override reader_study.real_splits")
    args = parser.parse_args(argv)
    config = config_from_args(args, "reader_study")
    for key in ("images_per_label", "repeats", "seed", "image_size", "real_splits"):
        if getattr(args, key) is not None:
            config["reader_study"][key] = getattr(args, key)
    entries = build(config, args.data_dir, args.synthetic, args.page_dir, args.key_dir)
    print(f"page to send: {args.page_dir / 'index.html'} ({len(entries)} images); "
          f"key: {args.key_dir} (keep it private, never send it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
