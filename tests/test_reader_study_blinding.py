"""Blinding of the reader study page: nothing but the pixels tells real from synthetic.

The id cannot be recomputed from the page to test guesses of the key (round 1's could: a 20-image
study's key fell to an exhaustive search); no encoding feature separates the sources better than
chance; one film per patient; the page is built apart from the key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import itertools
import json
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.reader_study_inputs import build_study, make_study_inputs, study_config
from tests.test_reader_study import page_data, png_chunks
from workflow_scripts.reader_study.agreement import wilson_interval
from workflow_scripts.reader_study.design import SECRET_FILE


def round1_id(pairs: list[tuple[str, str]], seed: int) -> str:
    """Round 1's study id: a hash of the sorted (source, sha256(data URI)) pairs and the seed."""
    return hashlib.sha256(json.dumps([sorted(pairs), seed]).encode()).hexdigest()[:8]


def brute_force(hashes: list[str], targets: set[str], seed: int = 0) -> dict[str, list[set[int]]]:
    """Item 1's attack: every way to call half the images synthetic, hashed as round 1 did (with
    the seed guessed right): the assignments whose id is one of `targets`."""
    n = len(hashes)
    ranked = sorted(range(n), key=lambda i: hashes[i])  # sorted pairs: real ones, then synthetic, by hash
    real = [json.dumps(["real", hashes[i]]) for i in ranked]
    synthetic = [json.dumps(["synthetic", hashes[i]]) for i in ranked]
    found: dict[str, list[set[int]]] = {target: [] for target in targets}
    for chosen in itertools.combinations(range(n), n // 2):
        picked = set(chosen)
        pairs = ", ".join([real[r] for r in range(n) if r not in picked] + [synthetic[r] for r in chosen])
        digest = hashlib.sha256(f"[[{pairs}], {seed}]".encode()).hexdigest()[:8]
        if digest in found:
            found[digest].append({ranked[r] for r in chosen})
    return found


def test_the_study_id_cannot_be_searched_for_the_key(tmp_path: Path) -> None:
    data, synthetic = make_study_inputs(tmp_path, per_label=5)
    frame = pd.read_csv(synthetic)
    frame[frame["labels"] != "No Finding"].to_csv(synthetic, index=False)  # 2 labels x 5 pairs: 20 images
    build_study(study_config(images_per_label=5, repeats=0), data, synthetic, tmp_path / "study")
    images = page_data(tmp_path / "study" / "page" / "index.html")["images"]
    key = pd.read_csv(tmp_path / "study" / "key" / "key.csv").set_index("image_id").loc[[image["id"] for image in images]]
    assert len(images) == 20 and (key["source"] == "synthetic").sum() == 10
    hashes = [hashlib.sha256(image["src"].encode()).hexdigest() for image in images]
    truth = {i for i, source in enumerate(key["source"]) if source == "synthetic"}
    # the check that the search works: round 1's id of this very page gives the key away
    old = round1_id([(source, digest) for source, digest in zip(key["source"], hashes)], 0)
    page_id = images[0]["id"].split("-")[0]
    found = brute_force(hashes, {old, page_id})
    assert found[old] == [truth], "the search does not find round 1's key: the check is broken"
    assert found[page_id] == [], "the page's id is round 1's hash: it gives the key away"
    # reproducing the id takes the secret, which stays in the key folder
    content = json.dumps([[i + 1, source, digest, 0] for i, (source, digest) in enumerate(zip(key["source"], hashes))]).encode()
    secret = (tmp_path / "study" / "key" / SECRET_FILE).read_text().strip().encode()
    assert hmac.new(secret, content, hashlib.sha256).hexdigest()[:8] == page_id
    assert [path.name for path in (tmp_path / "study" / "page").iterdir()] == ["index.html"], "the page folder holds more than the page"
    assert secret.decode() not in (tmp_path / "study" / "page" / "index.html").read_text()


def loo_threshold_accuracy(values: np.ndarray, synthetic: np.ndarray) -> float:
    """Leave-one-out accuracy of the best one-threshold rule on a feature (either direction): fit
    on the others, predict the one left out; where no threshold splits the others, a coin (half)."""
    credit = 0.0
    for left in range(len(values)):
        keep = np.arange(len(values)) != left
        x, y = values[keep], synthetic[keep]
        levels = np.unique(x)
        if len(levels) < 2:
            credit += 0.5
            continue
        best = (-1.0, 0.0, True)
        for threshold in (levels[:-1] + levels[1:]) / 2:
            for above in (True, False):
                accuracy = float((((x > threshold) == above) == y).mean())
                best = max(best, (accuracy, threshold, above), key=lambda item: item[0])
        _, threshold, above = best
        credit += float(((values[left] > threshold) == above) == synthetic[left])
    return credit / len(values)


def encoding_features(images: list[dict], recompress: bool = False) -> dict[str, np.ndarray]:
    features: dict[str, list] = {name: [] for name in ("png bytes", "width", "height", "mode", "bit depth", "chunks",
                                                       "position", "id")}
    for position, image in enumerate(images):
        raw = base64.b64decode(image["src"].split(",", 1)[1])
        decoded = Image.open(io.BytesIO(raw))
        if recompress:  # round 1 wrote compressed PNGs: their size measures texture
            buffer = io.BytesIO()
            decoded.save(buffer, format="PNG")
            raw = buffer.getvalue()
        features["png bytes"].append(len(raw))
        features["width"].append(decoded.width)
        features["height"].append(decoded.height)
        features["mode"].append(decoded.mode)
        features["bit depth"].append(raw[24])  # IHDR: 8-byte signature, length, type, width, height, then depth
        features["chunks"].append(" ".join(png_chunks(raw)))
        features["position"].append(position)
        features["id"].append(int(image["id"].rsplit("-", 1)[1]))
    return {name: pd.factorize(pd.Series(values), sort=True)[0] if isinstance(values[0], str) else np.asarray(values, float)
            for name, values in features.items()}


@pytest.fixture(scope="module")
def wide_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], np.ndarray]:
    root = tmp_path_factory.mktemp("blinding")
    data, synthetic = make_study_inputs(root, per_label=8)
    build_study(study_config(images_per_label=8, repeats=4), data, synthetic, root / "study")
    images = page_data(root / "study" / "page" / "index.html")["images"]
    key = pd.read_csv(root / "study" / "key" / "key.csv").set_index("image_id")
    return images, (key.loc[[image["id"] for image in images], "source"] == "synthetic").to_numpy()


def test_no_encoding_feature_tells_the_sources_apart(wide_study) -> None:
    # The inputs differ the way round 1's demo did: real films 40 x 48 grayscale with metadata and
    # grain, synthetic 32 x 32 RGB and smooth. On the page, only the pixels may differ.
    images, synthetic = wide_study
    assert len(images) == 52
    for name, values in encoding_features(images).items():
        accuracy = loo_threshold_accuracy(values, synthetic)
        low, high = wilson_interval(accuracy * len(values), len(values))
        assert low <= 0.5 <= high, f"{name} tells real from synthetic: leave-one-out accuracy {accuracy:.0%}"


def test_the_leak_check_sees_round_1s_compressed_byte_size(wide_study) -> None:
    images, synthetic = wide_study
    values = encoding_features(images, recompress=True)["png bytes"]
    accuracy = loo_threshold_accuracy(values, synthetic)
    assert wilson_interval(accuracy * len(values), len(values))[0] > 0.5, "the check would miss a byte-size leak"


def test_every_image_is_an_uncompressed_8_bit_grayscale_png_of_one_size(wide_study) -> None:
    images, _ = wide_study
    sizes = set()
    for image in images:
        raw = base64.b64decode(image["src"].split(",", 1)[1])
        width, height, depth, colour = struct.unpack(">IIBB", raw[16:26])
        sizes.add((len(raw), width, height, depth, colour, " ".join(png_chunks(raw))))
    assert len(sizes) == 1 and next(iter(sizes))[1:] == (32, 32, 8, 0, "IHDR IDAT IEND")


def test_one_film_per_patient_and_the_key_apart(tmp_path: Path) -> None:
    data, synthetic = make_study_inputs(tmp_path, per_label=3)
    build_study(study_config(images_per_label=3), data, synthetic, tmp_path / "study")
    key = pd.read_csv(tmp_path / "study" / "key" / "key.csv", dtype=str, keep_default_na=False)
    split = pd.concat([pd.read_csv(data / f"{name}.csv", dtype=str) for name in ("val", "test")]).set_index("path")
    real = key[(key["source"] == "real") & (key["repeat_of"] == "")]
    assert split.loc[real["file"], "patient"].is_unique, "a patient appears twice in the study"
    assert sorted(path.name for path in (tmp_path / "study" / "key").iterdir()) == ["history", "key.csv", SECRET_FILE, "study.json"]
