"""Fidelity stage: distances against the libraries, each extractor's loading path with random
weights (never used for a reported number), the held-out reference with its real-vs-real floor,
prompt adherence, and the calibrated memorization audit with planted copies."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from PIL import Image

from tests.conftest import REPO, make_config, split_flags
from workflow_scripts.fidelity import evaluate_fidelity as cli
from workflow_scripts.data.demo_dataset import make_demo_dataset
from workflow_scripts.fidelity import BASE, BASE_PROMPTED, MACRO, PROMPTED, REAL_VAL, audit, distances, features
from workflow_scripts.fidelity.evaluate import FLOOR, SYNTHETIC, adherence_rows, evaluate, label_sets
from workflow_scripts.data.prepare_dataset import prepare
from workflow_scripts.common.tables import load_split

FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
GENERATION_COLUMNS = dict(prompt="A chest X-ray", seed=0, steps=1, guidance=7.5, scheduler="ddim", checkpoint="final")


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def empty_homes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No weights anywhere: torch hub, torchxrayvision and Hugging Face caches all empty."""
    home = tmp_path / "home"
    monkeypatch.setenv("TORCH_HOME", str(home / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    import torchxrayvision as xrv

    monkeypatch.setattr(xrv.utils, "get_cache_dir", lambda: str(home / "xrv") + "/")
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *args, **kwargs: None)
    return home


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pytorch-fid's FID Inception architecture with random weights (its download and load skipped)."""
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


def write_generation_csv(path: Path, files: list[str], labels: list[str]) -> Path:
    pd.DataFrame({"file": files, "labels": labels}).assign(**GENERATION_COLUMNS).to_csv(path, index=False)
    return path


def save_gray(tensor: torch.Tensor, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((tensor.squeeze().clamp(0, 1).numpy() * 255).round().astype(np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Demo phantoms (64 px) split into train/val/test, and a config for small, fast evaluation."""
    root = tmp_path_factory.mktemp("fidelity")
    make_demo_dataset(root / "demo", 60, 64, 0)
    config = make_config({"format": "nih", "csv": str(root / "demo" / "Data_Entry_2017.csv"),
                          "images": str(root / "demo" / "images")},
                         "split.val_fraction=0.3", "split.test_fraction=0.3", "evaluation.kid_subsets=5",
                         "evaluation.diversity_pairs=20", "evaluation.diversity_images=8", "evaluation.audit_controls=40",
                         "evaluation.audit_top_k=3", "evaluation.extractors=[pixels]")
    prepare(config, root / "data")
    splits = {name: load_split(root / "data", name) for name in ("train", "val", "test")}
    return {"root": root, "config": config, "data_dir": root / "data", **splits}


# ----------------------------------------------------------------------------- distances


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning")
def test_fid_equals_pytorch_fid_and_is_na_below_the_feature_dims() -> None:
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(60, 8)), rng.normal(0.3, 1.5, size=(70, 8)) @ rng.normal(size=(8, 8))
    value, notes = distances.fid(a, b)
    stats = (*distances.gaussian_stats(a), *distances.gaussian_stats(b))
    assert value == pytest.approx(calculate_frechet_distance(*stats), rel=1e-10) and notes == []
    # 1-D closed form: (mu1 - mu2)² + (sigma1 - sigma2)²
    assert distances.frechet_distance_with_notes(np.array([0.0]), np.array([[4.0]]), np.array([3.0]), np.array([[1.0]]))[0] \
        == pytest.approx(10.0)
    assert distances.fid(rng.normal(size=(10, 20)), rng.normal(size=(30, 20))) == ("n/a (n < d: 10 < 20)", [])


def test_kid_is_torchmetrics_unbiased_mmd_and_tells_same_from_shifted() -> None:
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(6, 3)), rng.normal(0.5, 1.0, size=(6, 3))

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return (float(np.dot(a, b)) / 3 + 1) ** 3

    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i, j in itertools.permutations(range(6), 2)) / 30
    direct = within - 2 * sum(k(x[i], y[j]) for i in range(6) for j in range(6)) / 36
    assert distances.kid(x, y, subset_size=50, subsets=5) == (pytest.approx(direct, rel=1e-9), 0.0, 6)
    real, same, shifted = rng.normal(size=(300, 16)), rng.normal(size=(300, 16)), rng.normal(1.0, 1.0, size=(300, 16))
    same_mean, same_std, m = distances.kid(real, same, 100, 20)
    shifted_mean, _, _ = distances.kid(real, shifted, 100, 20)
    assert m == 100 and abs(same_mean) < 3 * same_std + 0.01 and shifted_mean > 0.3
    with pytest.raises(ValueError, match="at least 2"):
        distances.kid(x[:1], y, 10, 1)


def test_prdc_from_the_prdc_package() -> None:
    rng = np.random.default_rng(5)
    real = rng.normal(size=(50, 4))
    same = distances.prdc(real, real.copy(), 5)
    assert same["precision"] == 1.0 and same["recall"] == 1.0 and same["coverage"] == 1.0
    far = distances.prdc(real, real + 100.0, 5)
    assert far["precision"] == 0.0 and far["coverage"] == 0.0 and far["density"] == 0.0
    assert distances.prdc(real[:6], real[:6], 5) == "n/a (n <= k + 1: 6 <= 6)"
    assert isinstance(distances.prdc(real[:7], real[:7], 5), dict)


def test_ms_ssim_diversity_sees_mode_collapse() -> None:
    rng = torch.Generator().manual_seed(0)
    varied = torch.rand((6, 1, 64, 64), generator=rng)
    collapsed = varied[:1].repeat(6, 1, 1, 1)
    assert distances.pairwise_ms_ssim(collapsed, 100, 0)["ms_ssim"] == pytest.approx(1.0, abs=1e-5)
    result = distances.pairwise_ms_ssim(varied, 100, 0)
    assert result["pairs"] == 15 and result["ms_ssim"] < 0.2 and result["window"] == 3
    assert distances.pairwise_ms_ssim(varied, 4, 0)["pairs"] == 4
    assert distances.ms_ssim_window(512) == 11 and distances.ms_ssim_window(32) is None
    assert distances.pairwise_ms_ssim(varied[:1], 10, 0)["note"].startswith("n/a")


# ----------------------------------------------------------------------------- extractors


def test_without_weights_every_extractor_says_what_to_download(empty_homes: Path) -> None:
    built = {e.name: e for e in features.build_extractors(make_config()["evaluation"], "cpu", allow_download=False)}
    assert list(built) == ["pixels", "inception", "xrv", "rad_dino"] and built["pixels"].available
    for name, words in (("inception", [features.FID_WEIGHTS_URL, str(empty_homes / "torch")]),
                        ("xrv", ["github.com/mlmed/torchxrayvision", str(empty_homes / "xrv"), "evaluation.xrv_weights_dir"]),
                        ("rad_dino", ["hf download microsoft/rad-dino", "evaluation.rad_dino"])):
        assert not built[name].available and built[name].status.startswith("unavailable: ")
        assert all(word in built[name].status for word in words), built[name].status


def test_inception_path_with_random_weights(random_inception_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    evaluation = {"fid_dims": 64, "inception_weights": str(random_inception_weights)}
    assert not features.build_inception(evaluation, "cpu").available  # random weights fail the hash check
    digest = hashlib.sha256(random_inception_weights.read_bytes()).hexdigest()
    monkeypatch.setattr(features, "FID_WEIGHTS_SHA256_PREFIX", digest[:8])  # pretend they are the published ones
    extractor = features.build_inception(evaluation, "cpu")
    images = torch.rand((2, 1, 64, 64))
    out = extractor.embed(images)
    assert extractor.status.startswith("ok: ") and out.shape == (2, 64) and torch.isfinite(out).all()
    # one resize only: an image already at 299 px goes through unchanged
    at_input = features.resize_antialiased(images, 299)
    assert torch.allclose(extractor.embed(at_input), out, atol=1e-5)


def test_weights_status_checks_the_hash_and_reports_download_failure(
    empty_homes: Path, random_inception_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, status = features.inception_weights_status(str(random_inception_weights))
    assert path is None and "not the published FID Inception weights" in status
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("no route")))
    path, status = features.inception_weights_status(None, allow_download=True)
    assert path is None and "download failed: OSError: no route" in status
    assert features.FID_WEIGHTS_SHA256_PREFIX == "6726825d"


def test_xrv_densenet_loads_through_torchxrayvision(tmp_path: Path, empty_homes: Path) -> None:
    import torchxrayvision as xrv

    torch.manual_seed(0)
    random_model = xrv.models.DenseNet(weights=None, num_classes=18)  # architecture only
    path, url = features.xrv_weights_path(tmp_path / "xrv")
    path.parent.mkdir()
    torch.save(random_model, path)  # torchxrayvision's file holds the pickled model
    extractor = features.build_xrv({"xrv_weights_dir": str(path.parent)}, "cpu")
    assert extractor.status == f"ok: {path}" and url.endswith(path.name)
    out = extractor.embed(torch.rand((2, 1, 64, 64)))
    assert out.shape == (2, 1024) and torch.isfinite(out).all()
    path.write_bytes(b"truncated")
    assert features.build_xrv({"xrv_weights_dir": str(path.parent)}, "cpu").status.startswith("unavailable: ")


def test_rad_dino_loads_a_local_dinov2_folder(tmp_path: Path) -> None:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          image_size=56, patch_size=14)
    folder = tmp_path / "rad-dino"
    Dinov2Model(config).save_pretrained(folder)
    BitImageProcessor(crop_size={"height": 56, "width": 56}, image_mean=[0.53] * 3, image_std=[0.26] * 3).save_pretrained(folder)
    extractor = features.build_rad_dino({"rad_dino": str(folder)}, "cpu")
    assert extractor.status == f"ok: {folder}" and extractor.input_size == 56 and extractor.dims == 32
    out = extractor.embed(torch.rand((3, 1, 64, 64)))
    assert out.shape == (3, 32) and torch.isfinite(out).all()
    assert features.build_rad_dino({"rad_dino": str(tmp_path / "none")}, "cpu").status.startswith("unavailable: ")


def test_one_preprocessing_for_real_and_synthetic(tmp_path: Path) -> None:
    """A real film at native size and its model-resolution version (what the generator outputs)
    reach the extractors as the same tensor."""
    rng = np.random.default_rng(0)
    smooth = torch.nn.functional.interpolate(torch.tensor(rng.random((1, 1, 12, 16)), dtype=torch.float32),
                                             size=(96, 128), mode="bilinear", align_corners=False)
    real = save_gray(smooth, tmp_path / "real.png")  # non-square, larger than the model resolution
    as_model = save_gray(features.load_model_image(real, 48), tmp_path / "synthetic.png")
    a, b = features.load_model_image(real, 48), features.load_model_image(as_model, 48)
    assert a.shape == b.shape == (1, 48, 48) and float((a - b).abs().max()) <= 1 / 255 + 1e-6


# ----------------------------------------------------------------------------- the stage


def test_noise_is_far_above_the_floor_and_a_second_real_sample_sits_on_it(prepared: dict, tmp_path: Path) -> None:
    config, train, test = prepared["config"], prepared["train"], prepared["test"]
    noise = [save_gray(torch.rand((1, 64, 64), generator=torch.Generator().manual_seed(i)), tmp_path / "noise" / f"{i}.png")
             for i in range(len(train))]
    runs = {}
    for name, files, labels in (("noise", noise, train["labels"].tolist()),
                                ("real", test["path"].tolist(), test["labels"].tolist())):
        csv = write_generation_csv(tmp_path / f"{name}.csv", files, labels)
        runs[name] = evaluate(config, prepared["data_dir"], csv, tmp_path / name, [features.pixel_extractor()])
    for name in runs:
        table = pd.read_csv(tmp_path / name / "fidelity.csv")
        assert set(table["comparison"]) == {SYNTHETIC, FLOOR} and (tmp_path / name / "fidelity.md").is_file()

    def overall(run: dict, comparison: str) -> dict:
        return next(r for r in run["rows"] if r["label"] == "overall" and r["comparison"] == comparison)

    noise_syn, noise_floor = overall(runs["noise"], SYNTHETIC), overall(runs["noise"], FLOOR)
    real_syn, real_floor = overall(runs["real"], SYNTHETIC), overall(runs["real"], FLOOR)
    assert noise_syn["n"] == noise_floor["n"] == min(len(prepared["val"]), len(train))
    assert noise_syn["kid_mean"] > 20 * max(noise_floor["kid_mean"], 1e-3)
    assert noise_syn["coverage"] < 0.1 < noise_floor["coverage"]
    assert real_syn["n"] == min(len(prepared["val"]), len(test), len(train))  # the floor pairs val with train
    assert abs(real_syn["kid_mean"] - real_floor["kid_mean"]) < 3 * max(real_floor["kid_mean"], 1e-3)
    assert all(r["fid"] is None and r["fid_status"].startswith("n/a") for r in runs["noise"]["rows"])  # n < 256 dims
    # per label: equal n in both comparisons, the smallest of the three sets
    sets = {"syn": label_sets(train["labels"]), "val": label_sets(prepared["val"]["labels"])}
    for row in runs["noise"]["rows"]:
        if row["label"] != "overall":
            expected = min(sum(row["label"] in s for s in sets["syn"]), sum(row["label"] in s for s in sets["val"]))
            assert row["n"] == expected
    diversity = pd.read_csv(tmp_path / "noise" / "diversity.csv")
    over = diversity[diversity["label"] == "overall"].set_index("set")["ms_ssim"]
    assert over["synthetic"] < 0.2 < over["real val"]  # noise is diverse; phantoms look alike
    md = (tmp_path / "noise" / "fidelity.md").read_text()
    for heading in ("### Fidelity", "### Diversity", "### Prompt adherence", "### Memorization audit"):
        assert md.count(heading) == 1
    assert (tmp_path / "noise" / "plots" / "fidelity_pixels.png").is_file()


def test_adherence_auroc_per_prompted_label() -> None:
    classes = ["Mass", "Nodule"]
    syn_labels = ["Mass", "Nodule", "Mass|Nodule", "No Finding"] * 10
    sets = {"synthetic": label_sets(syn_labels), "val": label_sets(syn_labels)}
    y = np.array([[("Mass" in s), ("Nodule" in s)] for s in sets["synthetic"]], dtype=float)
    rng = np.random.default_rng(0)
    shows = y + 0.1 * rng.random(y.shape)  # images that show their prompt
    blind = rng.random(y.shape)             # images that show nothing
    rows = adherence_rows([(PROMPTED, blind, sets["synthetic"], None), (BASE_PROMPTED, shows, sets["synthetic"], None),
                           (REAL_VAL, shows, sets["val"], np.arange(len(syn_labels)) // 2)],
                          classes, ["Mass", "Nodule", "No Finding", "overall"], 50, 0)
    assert [(r["label"], r["set"]) for r in rows] == [(label, kind) for label in ("Mass", "Nodule", MACRO)
                                                      for kind in (PROMPTED, BASE_PROMPTED, REAL_VAL)]
    assert all(r["auroc"] == 1.0 for r in rows if r["set"] != PROMPTED)
    assert all(0.25 < r["auroc"] < 0.75 for r in rows if r["set"] == PROMPTED)
    assert rows[0]["positives"] == 20 and rows[0]["negatives"] == 20
    macro = rows[-3]  # the mean over labels, with its own bootstrap interval
    assert macro["label"] == MACRO and macro["ci_low"] < macro["auroc"] < macro["ci_high"]
    assert macro["auroc"] == pytest.approx(np.mean([r["auroc"] for r in rows[:-3] if r["set"] == PROMPTED]))


def test_cli_with_the_real_only_classifier(prepared: dict, tmp_path: Path, empty_homes: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    import timm

    classes = ["Cardiomegaly", "Effusion", "Nodule", "Mass", "Pneumothorax", "Fibrosis", "Pneumonia"]
    model = timm.create_model("resnet18", pretrained=False, num_classes=len(classes))
    classifier = tmp_path / "model.pt"
    torch.save({"state_dict": model.state_dict(), "model": "resnet18", "classes": classes, "image_size": 32,
                "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bilinear"}, classifier)
    test = prepared["test"]
    csv = write_generation_csv(tmp_path / "gen.csv", test["path"].tolist(), test["labels"].tolist())
    config_file = tmp_path / "config.yaml"
    config_file.write_text(json.dumps({"dataset": prepared["config"]["dataset"], "split": prepared["config"]["split"],
                                       "evaluation": {"extractors": ["pixels", "xrv"], "kid_subsets": 2,
                                                      "diversity_pairs": 5, "diversity_images": 4}}))
    args = ["--config", str(REPO / "config" / "config.yaml"), str(config_file), *split_flags(prepared["data_dir"], "train", "val"),
            "--synthetic", str(csv), "--out-dir", str(tmp_path / "out"), "--device", "cpu", "--no-download"]
    # the LoRA-off control's images are scored beside the LoRA's (here: the same films, so the same figures)
    assert cli.main(args + ["--classifier", str(classifier), "--base-synthetic", str(csv)]) == 0, capsys.readouterr().err
    assert "xrv: unavailable:" in capsys.readouterr().out
    adherence = pd.read_csv(tmp_path / "out" / "adherence.csv")
    assert set(adherence["label"]) <= {*classes, MACRO} and adherence["auroc"].notna().any()
    by_set = adherence.set_index(["label", "set"])["auroc"]
    assert by_set[(MACRO, BASE_PROMPTED)] == pytest.approx(by_set[(MACRO, PROMPTED)])
    fidelity = pd.read_csv(tmp_path / "out" / "fidelity.csv")
    pixels = fidelity[(fidelity["extractor"] == "pixels") & (fidelity["label"] == "overall")].set_index("comparison")
    assert pixels.loc[BASE, "n"] == pixels.loc[SYNTHETIC, "n"] and np.isfinite(pixels.loc[BASE, "kid_mean"])
    assert "without LoRA" in (tmp_path / "out" / "fidelity.md").read_text()
    assert "unavailable" in (tmp_path / "out" / "fidelity.md").read_text()
    assert cli.main(args[:7] + ["--synthetic", str(tmp_path / "none.csv"), "--out-dir", str(tmp_path / "x")]) == 2
    assert "none.csv" in capsys.readouterr().err


# ----------------------------------------------------------------------------- memorization audit


def test_planted_copies_are_caught_with_the_thresholds_the_pipeline_computes(prepared: dict, tmp_path: Path) -> None:
    """Perturbed copies of training images (shift, brightness, gamma, crop) among synthetic images
    are flagged (>= 95 %); real images of other patients are not (<= 5 %)."""
    config, train, test = prepared["config"], prepared["train"], prepared["test"]
    resolution = int(config["model"]["resolution"])
    originals = torch.stack([features.load_model_image(path, resolution) for path in train["path"]])
    copies, notes = audit.planted_copies(originals, seed=123)
    copy_files = [save_gray(copy, tmp_path / "copies" / f"copy_{i:03d}.png") for i, copy in enumerate(copies)]
    files = copy_files + test["path"].tolist()
    csv = write_generation_csv(tmp_path / "generation_results.csv", files, train["labels"].tolist() + test["labels"].tolist())

    summary = audit.audit(config, prepared["data_dir"], csv, tmp_path / "evaluation")
    table = pd.read_csv(tmp_path / "evaluation" / "audit" / "audit.csv")
    assert table["file"].tolist() == files
    is_copy = table["file"].isin(copy_files)
    assert table.loc[is_copy, "flagged"].mean() >= 0.95, table.loc[is_copy & ~table["flagged"]]
    for kind in audit.CONTROL_KINDS:
        assert table.loc[is_copy, "flagged"][[note.startswith(kind) for note in notes]].mean() >= 0.95, kind
    assert table.loc[~is_copy, "flagged"].mean() <= 0.05

    flagged = pd.read_csv(tmp_path / "evaluation" / "audit" / "flagged.csv")
    assert set(flagged["file"]) == set(table.loc[table["flagged"], "file"]) and "distance" in flagged.columns
    saved = json.loads((tmp_path / "evaluation" / "audit_summary.json").read_text())
    assert saved["thresholds"]["distance"] == pytest.approx(saved["real_floor_quantiles"]["q1"])  # computed, not set
    assert saved["thresholds"]["distance"] == summary["thresholds"]["distance"]
    assert saved["positive_control"]["rate"] >= 0.95 and saved["negative_control"]["rate"] <= 0.05
    pairs = sorted((tmp_path / "evaluation" / "audit" / "pairs").iterdir())
    assert len(pairs) == 3 and all(p.suffix == ".png" for p in pairs)


def test_a_second_sample_of_real_images_scores_at_the_floor(prepared: dict, tmp_path: Path) -> None:
    test = prepared["test"]
    csv = write_generation_csv(tmp_path / "generation_results.csv", test["path"].tolist(), test["labels"].tolist())
    summary = audit.audit(prepared["config"], prepared["data_dir"], csv, tmp_path / "evaluation")
    assert summary["flagged"] / summary["n"] <= 0.05
    floor, synthetic = summary["real_floor_quantiles"], summary["synthetic_quantiles"]
    assert synthetic["q50"] == pytest.approx(floor["q50"], rel=0.5)


def test_alignment_undoes_shift_and_intensity_changes() -> None:
    rng = torch.Generator().manual_seed(0)
    base = torch.nn.functional.interpolate(torch.rand((5, 1, 8, 8), generator=rng), size=(64, 64), mode="bilinear")
    shifted = torch.roll(base, shifts=(2, -1), dims=(2, 3)) * 0.9
    index, distance = audit.nearest_aligned(shifted[:, 0, 4:-4, 4:-4].contiguous(), base[:, 0, 4:-4, 4:-4].contiguous(), 3)
    assert index.tolist() == [0, 1, 2, 3, 4] and distance.max() < 1e-4
    _, unaligned = audit.nearest_aligned(shifted[:, 0, 4:-4, 4:-4].contiguous(), base[:, 0, 4:-4, 4:-4].contiguous(), 0)
    assert unaligned.min() > 10 * distance.max()


def test_the_audit_flags_the_same_images_in_small_blocks_and_says_its_cost_first(
        prepared: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    test = prepared["test"]
    csv = write_generation_csv(tmp_path / "generation_results.csv", test["path"].tolist(), test["labels"].tolist())
    whole = audit.audit(prepared["config"], prepared["data_dir"], csv, tmp_path / "whole")
    printed = capsys.readouterr().out
    assert printed.startswith("audit search: ") and f"x {len(prepared['train'])} training images x 196 windows" in printed
    assert whole["search"]["multiply_adds"] == whole["search"]["queries"] * len(prepared["train"]) * 196 * 58 ** 2
    blocked = audit.audit(prepared["config"], prepared["data_dir"], csv, tmp_path / "blocked", block_mb=1)
    assert blocked["thresholds"] == whole["thresholds"]
    tables = [pd.read_csv(tmp_path / run / "audit" / "audit.csv") for run in ("whole", "blocked")]
    pd.testing.assert_frame_equal(*tables, check_exact=False, atol=1e-6)


def test_audit_cli_names_a_missing_input(prepared: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = audit.main(["--config", str(REPO / "config" / "config.yaml"), *split_flags(prepared["data_dir"]),
                       "--synthetic", str(tmp_path / "missing.csv"), "--out-dir", str(tmp_path / "out"), "--device", "cpu"])
    assert code == 2 and "missing.csv" in capsys.readouterr().err
    assert not (tmp_path / "out" / "audit_summary.json").exists()
