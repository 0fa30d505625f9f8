"""Fidelity stage: Fréchet distance and KID maths, pytorch-fid's Inception loading offline (random
weights stand in for the FID weights), the weights check, the memorization audit and the whole
stage with a stand-in feature extractor."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from PIL import Image

from tests.conftest import REPO, make_config
from workflow_scripts import evaluate_fidelity as ef
from workflow_scripts.demo_dataset import make_demo_dataset
from workflow_scripts.prepare_dataset import load_split, prepare

FID_FILE = "pt_inception-2015-12-05-6726825d.pth"


# ----------------------------------------------------------------------------- helpers and fixtures


def pixel_features(paths: list[str]) -> np.ndarray:
    """Stand-in for the classifier: 8x8 thumbnails, mean removed."""
    x = ef.load_pixels(paths, size=8).astype(np.float64)
    return x - x.mean(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state dict of pytorch-fid's FID Inception architecture with random weights: its own
    `fid_inception_v3()` with the download and the load skipped."""
    import pytorch_fid.inception as fid_inception

    patch = pytest.MonkeyPatch()
    try:
        patch.setattr(fid_inception, "load_state_dict_from_url", lambda *args, **kwargs: None)
        patch.setattr(torchvision.models.Inception3, "load_state_dict", lambda self, *args, **kwargs: None)
        torch.manual_seed(0)
        network = fid_inception.fid_inception_v3()
    finally:
        patch.undo()
    path = tmp_path_factory.mktemp("weights") / "random_inception.pth"
    torch.save(network.state_dict(), path)
    return path


@pytest.fixture
def empty_torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "torch_home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # get_dir() follows TORCH_HOME
    return home


@pytest.fixture
def torch_home_with_random_weights(empty_torch_home: Path, random_inception_weights: Path) -> Path:
    """Random weights placed where pytorch-fid looks: <TORCH_HOME>/hub/checkpoints/<FID file>."""
    target = empty_torch_home / "hub" / "checkpoints" / FID_FILE
    target.parent.mkdir(parents=True)
    shutil.copyfile(random_inception_weights, target)
    return target


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Demo phantoms prepared into splits; synthetic set = other phantoms + one exact copy of a train image."""
    root = tmp_path_factory.mktemp("fidelity")
    make_demo_dataset(root / "demo", 12, 64, 0)
    config = make_config({"format": "nih", "csv": str(root / "demo" / "Data_Entry_2017.csv"),
                          "images": str(root / "demo" / "images")})
    prepare(config, root / "data")
    train = load_split(root / "data", "train")

    other = make_demo_dataset(root / "other", 10, 64, 1)
    rows = [{"file": str(root / "other" / "images" / name), "labels": labels}
            for name, labels in zip(other["Image Index"], other["Finding Labels"])][:12]
    copy = root / "other" / "images" / "copy_of_train.png"
    shutil.copyfile(train["path"].iloc[0], copy)
    rows.append({"file": str(copy), "labels": train["labels"].iloc[0]})
    synthetic = pd.DataFrame(rows)
    synthetic = synthetic.assign(prompt="A chest X-ray", seed=range(len(rows)), steps=20, guidance=7.5,
                                 scheduler="ddim", checkpoint="final")
    synthetic_csv = root / "other" / "generation_results.csv"
    synthetic.to_csv(synthetic_csv, index=False)
    return {"config": config, "data_dir": root / "data", "train": train, "synthetic_csv": synthetic_csv,
            "synthetic": synthetic, "copy": str(copy), "copied": train["path"].iloc[0]}


def write_images(folder: Path) -> list[str]:
    """Small PNGs of mixed sizes and depths (8-bit 40 px, 8-bit 52 px, 16-bit 40 px)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for index, (size, dtype) in enumerate([(40, np.uint8), (52, np.uint8), (40, np.uint16), (40, np.uint8)]):
        high = 256 if dtype == np.uint8 else 4096
        pixels = rng.integers(0, high, (size, size)).astype(dtype)
        path = folder / f"image_{index}.png"
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return paths


# ----------------------------------------------------------------------------- maths


def test_frechet_distance_closed_form_for_diagonal_gaussians() -> None:
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.5, 0.0])
    var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    assert ef.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-9)
    # 1-D: (mu1 - mu2)^2 + (sigma1 - sigma2)^2
    assert ef.frechet_distance(np.array([0.0]), np.array([[4.0]]), np.array([3.0]), np.array([[1.0]])) == pytest.approx(9 + 1)
    assert ef.frechet_distance(mu1, np.diag(var1), mu1, np.diag(var1)) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning")
def test_frechet_distance_equals_pytorch_fid_on_random_data() -> None:
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(60, 8)), rng.normal(0.3, 1.5, size=(70, 8)) @ rng.normal(size=(8, 8))
    stats = (*ef.gaussian_stats(a), *ef.gaussian_stats(b))
    assert ef.frechet_distance(*stats) == pytest.approx(calculate_frechet_distance(*stats), rel=1e-10)
    value, notes = ef.feature_frechet_distance(a, b)
    assert value == pytest.approx(calculate_frechet_distance(*stats), rel=1e-10) and notes == []


def test_frechet_distance_survives_singular_covariances() -> None:
    rng = np.random.default_rng(2)
    value, _ = ef.feature_frechet_distance(rng.normal(size=(5, 40)), rng.normal(size=(6, 40)))  # n < d
    assert math.isfinite(value) and value > 0


def test_kid_near_zero_for_one_distribution_and_positive_for_shifted() -> None:
    rng = np.random.default_rng(3)
    real, same, shifted = rng.normal(size=(300, 16)), rng.normal(size=(300, 16)), rng.normal(1.0, 1.0, size=(300, 16))
    same_mean, same_std, m = ef.kernel_inception_distance(real, same, 100, 20)
    shifted_mean, shifted_std, _ = ef.kernel_inception_distance(real, shifted, 100, 20)
    assert m == 100
    assert abs(same_mean) < 3 * same_std + 0.01
    assert shifted_mean > 10 * max(abs(same_mean), same_std) and shifted_mean > 0.3
    # fixed seed: the same numbers every time
    assert ef.kernel_inception_distance(real, shifted, 100, 20) == (shifted_mean, shifted_std, 100)


def test_kid_equals_direct_computation_on_a_small_case() -> None:
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(6, 3)), rng.normal(0.5, 1.0, size=(6, 3))

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return (float(np.dot(a, b)) / 3 + 1) ** 3

    n = 6
    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    cross = sum(k(x[i], y[j]) for i in range(n) for j in range(n)) / (n * n)
    direct = within - 2 * cross
    # subsets of the whole set are permutations of it: every subset gives the same value
    mean, std, m = ef.kernel_inception_distance(x, y, subset_size=50, subsets=5)
    assert m == 6 and mean == pytest.approx(direct, rel=1e-10) and std == pytest.approx(0.0, abs=1e-10)
    assert ef.mmd2_unbiased(y, x) == pytest.approx(direct, rel=1e-10)
    with pytest.raises(ValueError, match="at least 2"):
        ef.kernel_inception_distance(x[:1], y, 10, 1)


# ----------------------------------------------------------------------------- Inception, offline


def test_inception_features_load_through_pytorch_fid_offline(
    tmp_path: Path, torch_home_with_random_weights: Path, random_inception_weights: Path
) -> None:
    paths = write_images(tmp_path / "images")
    assert ef.default_weights_path() == torch_home_with_random_weights
    from_hub = ef.inception_features(paths, dims=64, batch_size=4, device="cpu")  # one batch of mixed sizes
    assert from_hub.shape == (4, 64) and np.isfinite(from_hub).all() and from_hub.std() > 0

    # an explicit file elsewhere is loaded through a temporary hub dir; nothing is written beside it
    elsewhere = tmp_path / "user_weights" / "my_inception.pth"
    elsewhere.parent.mkdir()
    shutil.copyfile(random_inception_weights, elsewhere)
    hub_before = torch.hub.get_dir()
    explicit = ef.inception_features(paths, dims=64, weights_path=elsewhere, batch_size=1)
    assert torch.hub.get_dir() == hub_before
    assert sorted(p.name for p in elsewhere.parent.iterdir()) == ["my_inception.pth"]
    # batch of mixed sizes == one image at a time (the per-image resize matches the network's)
    np.testing.assert_allclose(explicit, from_hub, rtol=1e-4, atol=1e-6)


def test_inception_features_fail_without_weights_and_no_network(tmp_path: Path, empty_torch_home: Path) -> None:
    with pytest.raises(FileNotFoundError):
        ef.inception_features(write_images(tmp_path / "images")[:1], dims=64, weights_path=tmp_path / "none.pth")


def test_weights_status_missing(tmp_path: Path, empty_torch_home: Path) -> None:
    path, status = ef.inception_weights_status(None)
    expected = empty_torch_home / "hub" / "checkpoints" / FID_FILE
    assert path is None and status.startswith("unavailable: Inception weights not found at ")
    assert str(expected) in status and ef.FID_WEIGHTS_URL in status and "evaluation.inception_weights" in status
    assert not expected.exists()  # no download attempted by default

    path, status = ef.inception_weights_status(str(tmp_path / "nowhere" / "w.pth"))
    assert path is None and str(tmp_path / "nowhere" / "w.pth") in status and status.startswith("unavailable:")


def test_weights_status_checks_the_hash(
    torch_home_with_random_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, status = ef.inception_weights_status(None)
    assert path is None
    assert status.startswith(f"unavailable: {torch_home_with_random_weights} is not the published FID Inception weights (SHA-256 ")
    path, status = ef.inception_weights_status(str(torch_home_with_random_weights))
    assert path is None and "not the published" in status

    digest = hashlib.sha256(torch_home_with_random_weights.read_bytes()).hexdigest()
    monkeypatch.setattr(ef, "FID_WEIGHTS_SHA256_PREFIX", digest[:8])
    assert ef.inception_weights_status(None) == (torch_home_with_random_weights, f"ok: {torch_home_with_random_weights}")
    assert ef.FID_WEIGHTS_SHA256_PREFIX != "6726825d" and digest[:8] != "6726825d"


def test_expected_hash_prefix_is_torch_hubs_file_name_convention() -> None:
    assert ef.FID_WEIGHTS_FILE == FID_FILE and ef.FID_WEIGHTS_SHA256_PREFIX == "6726825d"


# ----------------------------------------------------------------------------- audit


def test_audit_flags_exactly_the_planted_copy(prepared: dict, tmp_path: Path) -> None:
    train_paths = prepared["train"]["path"].tolist()
    synthetic = prepared["synthetic"]
    syn_paths = synthetic["file"].tolist()
    audit, summary = ef.memorization_audit(
        syn_paths, synthetic["labels"].tolist(), train_paths, pixel_features(syn_paths), pixel_features(train_paths),
        tmp_path, feature_threshold=0.0, pixel_threshold=0.02)

    assert list(audit.columns) == ef.AUDIT_COLUMNS and len(audit) == len(syn_paths)
    flagged = audit[audit["flagged"]]
    assert flagged["synthetic_file"].tolist() == [prepared["copy"]]
    copy_row = flagged.iloc[0]
    assert copy_row["nearest_real_pixel"] == prepared["copied"] and copy_row["pixel_distance"] == 0.0
    assert copy_row["nearest_real_feature"] == prepared["copied"] and copy_row["feature_distance"] < 1e-9
    assert audit.loc[~audit["flagged"], "pixel_distance"].min() > 0.02  # other phantoms are clearly different

    assert summary["n"] == len(syn_paths) and summary["flagged"] == 1 and summary["flagged_by_pixel"] == 1
    assert set(summary["pixel_distance_quantiles"]) == {"q0", "q5", "q25", "q50", "q75", "q100"}
    assert "centred on the real training mean" in summary["feature_space"]
    pair = Path(summary["pairs"][0]["pair_png"])
    assert pair.parent == tmp_path / "audit_pairs" and pair.is_file()
    assert list(tmp_path.joinpath("audit_pairs").iterdir()) == [pair]
    with Image.open(pair) as image:
        assert image.size == (2 * 256, 256 + 34)  # synthetic | real, caption strip below
    on_disk = pd.read_csv(tmp_path / "audit.csv")
    assert list(on_disk.columns) == ef.AUDIT_COLUMNS and on_disk["flagged"].sum() == 1
    assert json.loads((tmp_path / "audit_summary.json").read_text())["thresholds"]["pixel_mean_abs_difference"] == 0.02


def test_nearest_neighbours_match_brute_force() -> None:
    rng = np.random.default_rng(5)
    query, reference = rng.random((7, 20)), rng.random((30, 20))
    index, distance = ef.nearest_mean_abs(query, reference, chunk=3)
    brute = np.abs(query[:, None, :] - reference[None, :, :]).mean(axis=2)
    np.testing.assert_array_equal(index, brute.argmin(axis=1))
    np.testing.assert_allclose(distance, brute.min(axis=1), rtol=1e-5)
    index, distance = ef.nearest_cosine(query, reference, chunk=4)
    cos = 1 - (query @ reference.T) / np.linalg.norm(query, axis=1)[:, None] / np.linalg.norm(reference, axis=1)[None]
    np.testing.assert_array_equal(index, cos.argmin(axis=1))
    np.testing.assert_allclose(distance, cos.min(axis=1), atol=1e-12)


# ----------------------------------------------------------------------------- the stage


def _check_table(out_dir: Path, prepared: dict) -> pd.DataFrame:
    table = pd.read_csv(out_dir / "fidelity.csv", keep_default_na=False)
    assert list(table.columns) == ef.FIDELITY_COLUMNS
    vocabulary = prepared["config"]["dataset"]["labels"]
    present = {label for cell in prepared["synthetic"]["labels"] for label in cell.split("|")}
    assert table["label"].tolist() == [label for label in vocabulary if label in present] + ["overall"]
    overall = table.iloc[-1]
    assert overall["n_real"] == len(prepared["train"]) and overall["n_synthetic"] == len(prepared["synthetic"])
    for _, row in table.iterrows():
        if min(row["n_real"], row["n_synthetic"]) >= 2:
            assert math.isfinite(float(row["domain_fd"])) and float(row["domain_fd"]) >= 0
        else:
            assert "fewer than 2 images" in row["notes"]
    return table


def test_evaluate_without_inception_weights(prepared: dict, tmp_path: Path, empty_torch_home: Path) -> None:
    out = tmp_path / "evaluation"
    result = ef.evaluate(prepared["config"], prepared["data_dir"], prepared["synthetic_csv"], pixel_features, out,
                         device="cpu")
    table = _check_table(out, prepared)
    assert table["fid"].str.startswith("unavailable: Inception weights not found").all()
    assert table["kid_mean"].str.startswith("unavailable:").all()
    assert sum(math.isfinite(float(value or "nan")) for value in table["domain_fd"]) >= 2  # overall and at least one label
    saved = json.loads((out / "fidelity.json").read_text())
    settings = saved["settings"]
    assert settings["tool"] == "pytorch-fid 0.3.0" and settings["resize"] == "bilinear 299 (pytorch-fid)"
    assert settings["dims"] == 2048 and settings["inception_status"].startswith("unavailable:")
    assert settings["n"] == {"real_train": len(prepared["train"]), "synthetic": len(prepared["synthetic"])}
    assert settings["seeds"]["kid"] == ef.KID_SEED and len(saved["rows"]) == len(table)
    assert result["audit"]["flagged"] >= 1  # the planted copy (the 0.02 cosine threshold may flag more)
    assert (out / "audit.csv").is_file() and (out / "audit_summary.json").is_file()
    assert not any((empty_torch_home).rglob("*.pth"))


def test_evaluate_with_verified_weights_reports_numbers(
    prepared: dict, tmp_path: Path, torch_home_with_random_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    digest = hashlib.sha256(torch_home_with_random_weights.read_bytes()).hexdigest()
    monkeypatch.setattr(ef, "FID_WEIGHTS_SHA256_PREFIX", digest[:8])  # pretend the random file is the published one
    config = {**prepared["config"], "evaluation": {**prepared["config"]["evaluation"], "fid_dims": 64,
                                                  "kid_subset_size": 10, "kid_subsets": 5}}
    out = tmp_path / "evaluation"
    ef.evaluate(config, prepared["data_dir"], prepared["synthetic_csv"], pixel_features, out, device="cpu")
    table = _check_table(out, prepared)
    for _, row in table.iterrows():
        if min(row["n_real"], row["n_synthetic"]) >= 2:
            assert float(row["fid"]) >= 0 and math.isfinite(float(row["kid_mean"])) and float(row["kid_std"]) >= 0
            assert ef.UNRELIABLE in row["notes"]  # far fewer images than 64 dims
        else:
            assert row["fid"].startswith("unavailable: fewer than 2 images")
    assert json.loads((out / "fidelity.json").read_text())["settings"]["inception_status"].startswith("ok: ")


def test_cli_uses_the_classifier_features(prepared: dict, tmp_path: Path, empty_torch_home: Path,
                                          monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    calls = []
    fake = types.ModuleType("workflow_scripts.train_classifier")
    fake.load_classifier = lambda path: (torch.nn.Linear(1, 1), {"path": str(path)})
    fake.extract_features = lambda model, meta, paths, batch_size=64: calls.append(len(paths)) or pixel_features(paths)
    monkeypatch.setitem(sys.modules, "workflow_scripts.train_classifier", fake)
    classifier = tmp_path / "model.pt"
    classifier.write_bytes(b"stand-in")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(json.dumps({key: prepared["config"][key] for key in ("dataset",)}))
    out = tmp_path / "evaluation"
    code = ef.main(["--config", str(REPO / "config" / "config.yaml"), str(config_file),
                    "--data-dir", str(prepared["data_dir"]), "--synthetic", str(prepared["synthetic_csv"]),
                    "--classifier", str(classifier), "--out-dir", str(out), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert calls == [len(prepared["train"]), len(prepared["synthetic"])]
    assert (out / "fidelity.csv").is_file() and "Inception: unavailable" in capsys.readouterr().out

    missing = ef.main(["--config", str(REPO / "config" / "config.yaml"), str(config_file),
                       "--data-dir", str(prepared["data_dir"]), "--synthetic", str(tmp_path / "none.csv"),
                       "--classifier", str(classifier), "--out-dir", str(out)])
    assert missing == 2 and "none.csv" in capsys.readouterr().err


def test_weights_download_failure_is_reported_not_raised(empty_torch_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def no_network(url: str, dst: str, hash_prefix: str | None = None, progress: bool = True) -> None:
        seen.update(url=url, dst=dst, hash_prefix=hash_prefix)
        raise OSError("no route to host")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    path, status = ef.inception_weights_status(None, allow_download=True)
    assert path is None and "download failed: OSError: no route to host" in status and ef.FID_WEIGHTS_URL in status
    assert seen == {"url": ef.FID_WEIGHTS_URL, "dst": str(ef.default_weights_path()), "hash_prefix": "6726825d"}
    # a configured path is never downloaded to
    seen.clear()
    ef.inception_weights_status(str(empty_torch_home / "mine.pth"), allow_download=True)
    assert seen == {}
