"""The classifier stage: AUROC + bootstrap CIs, the real/synthetic mix, and a tiny end-to-end run (CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import split_flags
from workflow_scripts.classifier import classifier_cache
from workflow_scripts.classifier.classifier_model import (class_names, create_model, encode_labels, load_classifier,
                                                          preprocess)
from workflow_scripts.common.errors import ConfigError, DataError, TrainingError
from workflow_scripts.common.config import load_config
from workflow_scripts.data.demo_dataset import make_demo_dataset
from workflow_scripts.generation.noise_images import make_noise_images
from workflow_scripts.data.prepare_dataset import prepare
from workflow_scripts.study.arms import arm_training_set, parse_arm
from workflow_scripts.study.design import (
    synthetic_count,
    train_steps,
    validation_points,
)
from workflow_scripts.common.tables import PROB_PREFIX, load_split, read_generation_results
from workflow_scripts.classifier import train_classifier as train_classifier_module
from workflow_scripts.classifier.train_classifier import (OUTPUT_FILES, _clean_out_dir, _training_data, assert_no_leakage, main,
                                                         seed_processes, train_classifier)

REPO = Path(__file__).resolve().parents[1]
VOCAB = ["Cardiomegaly", "Effusion", "Nodule", "Mass", "Pneumothorax", "Fibrosis", "Pneumonia", "No Finding"]


# ----------------------------------------------------------------------------- metrics


# ----------------------------------------------------------------------------- labels, images


def test_classes_and_targets() -> None:
    classes = class_names(VOCAB)
    assert "No Finding" not in classes and len(classes) == 7
    targets = encode_labels(["Effusion|Mass", "No Finding"], classes)
    assert targets[0].tolist() == [0, 1, 0, 1, 0, 0, 0] and targets[1].sum() == 0
    with pytest.raises(DataError, match="Atelectasis"):
        encode_labels(["Atelectasis"], classes)
    with pytest.raises(DataError, match="no label"):
        encode_labels([""], classes)


def test_preprocess_resizes_crops_and_never_flips() -> None:
    pixels = np.zeros((60, 90), dtype=np.uint8)
    pixels[:, :45] = 255  # bright left half
    tensor = preprocess(Image.fromarray(pixels), 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert tensor.shape == (3, 32, 32)
    assert torch.equal(tensor[0], tensor[2])
    assert tensor[0, :, 0].mean() == pytest.approx(1.0) and tensor[0, :, -1].mean() == pytest.approx(-1.0)


# ----------------------------------------------------------------------------- model


def test_model_weights_are_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch
    import timm
    from huggingface_hub import constants

    with pytest.raises(ConfigError, match="not a timm model"):
        create_model("no_such_net", True, 3)
    assert create_model("resnet18", False, 3)[1] == "random initialisation (classifier.pretrained: false)"

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ConfigError, match="snakemake download_weights"):  # empty cache, offline: a stop...
        create_model("resnet18", True, 3)
    model, weights = create_model("resnet18", True, 3, allow_random_init=True)  # ...or random init, said so
    assert weights.startswith("random initialisation: no ImageNet weights") and "HF_HUB_OFFLINE is set" in weights
    assert model.fc.out_features == 3

    # Weights in the Hugging Face cache are used offline (a stand-in checkpoint here).
    repo = tmp_path / "hub" / "models--timm--resnet18.a1_in1k"
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    torch.manual_seed(5)
    reference = timm.create_model("resnet18")
    safetensors.torch.save_file(reference.state_dict(), repo / "snapshots" / "abc" / "model.safetensors")
    model, weights = create_model("resnet18", True, 3)
    assert weights == "ImageNet weights (timm: timm/resnet18.a1_in1k)"
    assert torch.equal(model.conv1.weight, reference.conv1.weight) and model.fc.out_features == 3


# ----------------------------------------------------------------------------- the mix


def _frames(n_real: int, n_syn: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    real = pd.DataFrame({"path": [f"real/{i}.png" for i in range(n_real)], "labels": "Effusion"})
    synthetic = pd.DataFrame({"path": [f"syn/{i}.png" for i in range(n_syn)], "labels": "Mass"})
    return real, synthetic


def mix_training_set(real: pd.DataFrame, synthetic: pd.DataFrame, ratio: int, seed: int) -> pd.DataFrame:
    config = {"classifier": {"ratios": [0, 10, 25, 50]}}  # parse_arm reads the ratios only
    return arm_training_set(parse_arm(f"ratio{ratio}", config), real, synthetic, seed)[0]


def test_held_out_path_in_mix_is_refused(tmp_path: Path) -> None:
    real, synthetic = _frames(10, 10)
    test = pd.DataFrame({"path": ["elsewhere/a.png", synthetic["path"][3]]})
    mix = mix_training_set(real, synthetic, 50, seed=0)
    with pytest.raises(DataError, match="test split"):
        assert_no_leakage(mix, {"val": pd.DataFrame({"path": []}), "test": test})
    assert_no_leakage(mix, {"test": pd.DataFrame({"path": ["elsewhere/a.png"]})})  # no overlap: fine


def test_out_dir_with_foreign_files_is_not_deleted(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(TrainingError, match="refusing"):
        _clean_out_dir(out)
    assert (out / "notes.txt").is_file()


# ----------------------------------------------------------------------------- end to end


OVERRIDES = [
    "classifier.model=resnet18", "classifier.image_size=32", "classifier.epochs=2", "classifier.batch_size=16",
    "classifier.bootstrap_samples=20", "classifier.pretrained=true", "classifier.num_workers=0",
    "classifier.train_steps=null", "classifier.validation_every=null",  # epochs decide, as the assertions count
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("clf")
    make_demo_dataset(root / "demo", num_patients=16, size=64, seed=0)
    overrides = [f"dataset.csv={root / 'demo' / 'Data_Entry_2017.csv'}", f"dataset.images={root / 'demo' / 'images'}",
                 *OVERRIDES]
    config = load_config([REPO / "config" / "config.yaml"], overrides)
    data_dir = root / "data"
    prepare(config, data_dir)
    # Fake generation output: random-noise PNGs, one label (or combination) each.
    rows = []
    labels = ["Cardiomegaly", "Effusion|Mass", "No Finding", "Nodule", "Pneumothorax", "Fibrosis", "Pneumonia"]
    for i in range(40):
        path = root / "synthetic" / f"syn_{i:03d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (64, 64), dtype=np.uint8)).save(path)
        rows.append({"file": str(path), "prompt": "A chest X-ray", "labels": labels[i % len(labels)], "seed": i,
                     "steps": 10, "guidance": 7.5, "scheduler": "dpmsolver++", "checkpoint": "final"})
    synthetic_csv = root / "synthetic" / "generation_results.csv"
    pd.DataFrame(rows).to_csv(synthetic_csv, index=False)
    out = root / "runs" / "ratio25_seed0"
    cache = root / "classifier_cache"
    metrics = train_classifier(config, data_dir, synthetic_csv, "ratio25", 0, out, show_progress=False, cache_dir=cache)
    # The noise control's pool, and one run of each other kind of arm, for the matched budget.
    noise, _ = make_noise_images(read_generation_results(synthetic_csv), load_split(data_dir, "train")["path"].tolist(),
                                 root / "synthetic_noise", show_progress=False)
    noise_csv = root / "synthetic_noise" / "generation_results.csv"
    noise.to_csv(noise_csv, index=False)
    arms = {"ratio25": metrics}
    for arm in ("ratio0", "rebalanced", "noise"):  # pretrain's two phases: tests/test_study.py
        pool = noise_csv if arm == "noise" else synthetic_csv
        arms[arm] = train_classifier(config, data_dir, pool, arm, 0, root / "runs" / f"{arm}_seed0", show_progress=False,
                                     cache_dir=cache)
    return {"root": root, "cache": cache, "config": config, "overrides": overrides, "data_dir": data_dir,
            "synthetic_csv": synthetic_csv, "noise_csv": noise_csv, "out": out, "metrics": metrics, "arms": arms}


def test_e2e_outputs(demo: dict) -> None:
    out, metrics, data_dir = demo["out"], demo["metrics"], demo["data_dir"]
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES)
    assert not out.with_name(out.name + ".partial").exists()
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    classes = class_names(VOCAB)
    for key in ("arm", "arm_kind", "ratio", "seed", "optimizer_steps", "model", "pretrained_weights", "classes",
                "n_real_train", "n_synthetic_train", "n_synthetic_excluded", "achieved_synthetic_share", "best_step",
                "val_macro_auroc", "test", "n_test", "test_positives", "seconds", "device", "versions", "config_hash"):
        assert key in metrics, key
    assert metrics["classes"] == classes and metrics["model"] == "resnet18"
    weights = metrics["pretrained_weights"]
    assert weights.startswith("ImageNet weights (timm: ") or weights.startswith("random initialisation: no ImageNet")
    train, val, test = (load_split(data_dir, split) for split in ("train", "val", "test"))
    assert metrics["n_real_train"] == len(train)
    assert metrics["n_synthetic_train"] == synthetic_count(len(train), 25) > 0
    assert metrics["n_test"] == len(test)
    assert set(metrics["versions"]) >= {"torch", "timm", "sklearn"}
    assert set(metrics["test"]["per_label"]) == set(classes) == set(metrics["test_positives"])
    assert metrics["best_step"] in metrics["validation_steps"]
    assert (metrics["arm"], metrics["arm_kind"], metrics["ratio"], metrics["n_synthetic_excluded"]) == ("ratio25", "synthetic", 25, 0)
    macro = metrics["test"]["macro"]
    assert macro["auroc"] is None or 0.0 <= macro["auroc"] <= 1.0

    predictions = pd.read_csv(out / "predictions.csv", dtype={"labels": str}, keep_default_na=False)
    assert list(predictions.columns) == ["path", "labels", *[PROB_PREFIX + c for c in classes]]
    assert predictions["path"].tolist() == test["path"].tolist()  # scored on the test split, in order
    assert predictions[[PROB_PREFIX + c for c in classes]].stack().between(0, 1).all()

    log = pd.read_csv(out / "train_log.csv")
    assert list(log.columns[:2]) == ["step", "train_loss"] and "val_macro_auroc" in log.columns
    assert log["step"].tolist() == validation_points(demo["config"], len(train)) == metrics["validation_steps"]
    assert len(log) == 2  # one validation per real-only epoch

    composition = pd.read_csv(out / "composition.csv")
    assert list(composition.columns) == ["label", "real_positives", "synthetic_positives", "effective_positives"]
    assert composition["label"].tolist() == VOCAB
    assert (composition["effective_positives"] == composition["real_positives"] + composition["synthetic_positives"]).all()
    assert composition["synthetic_positives"].sum() >= metrics["n_synthetic_train"] > 0

    mix = pd.read_csv(out / "training_set.csv")
    assert (mix["source"] == "synthetic").sum() == metrics["n_synthetic_train"]
    assert not set(mix["path"]) & (set(val["path"]) | set(test["path"]))  # val/test never trained on
    assert set(mix[mix["source"] == "real"]["path"]) == set(train["path"])


def test_e2e_every_arm_takes_the_same_steps(demo: dict) -> None:
    arms, train = demo["arms"], load_split(demo["data_dir"], "train")
    steps = {name: metrics["optimizer_steps"] for name, metrics in arms.items()}
    assert set(steps.values()) == {train_steps(demo["config"], len(train))}, steps
    assert len({metrics["config_hash"] for metrics in arms.values()}) == 1
    assert len({tuple(metrics["validation_steps"]) for metrics in arms.values()}) == 1
    kinds = {name: (metrics["arm_kind"], metrics["ratio"]) for name, metrics in arms.items()}
    assert kinds == {"ratio25": ("synthetic", 25), "ratio0": ("real", 0), "rebalanced": ("control_rebalanced", 0),
                     "noise": ("control_noise", 50)}
    for name, metrics in arms.items():  # each run's log has the same validation steps
        log = pd.read_csv(demo["root"] / "runs" / ("ratio25_seed0" if name == "ratio25" else f"{name}_seed0") / "train_log.csv")
        assert log["step"].tolist() == metrics["validation_steps"]


def test_e2e_controls_train_on_what_they_claim(demo: dict) -> None:
    runs = demo["root"] / "runs"
    noise = pd.read_csv(runs / "noise_seed0" / "training_set.csv")
    drawn = noise[noise["source"] == "noise"]
    assert len(drawn) == synthetic_count(len(load_split(demo["data_dir"], "train")), 50) == demo["arms"]["noise"]["n_synthetic_train"]
    assert drawn["path"].str.contains("synthetic_noise").all()
    rebalanced = pd.read_csv(runs / "rebalanced_seed0" / "training_set.csv")
    assert set(rebalanced["source"]) <= {"real", "oversampled"}
    metrics = demo["arms"]["rebalanced"]
    assert metrics["n_synthetic_train"] == 0 and metrics["n_oversampled_train"] + metrics["rebalance_shortfall"] == len(drawn)
    composition = pd.read_csv(runs / "rebalanced_seed0" / "composition.csv")
    assert (composition["effective_positives"] >= composition["real_positives"]).all()
    assert composition["synthetic_positives"].sum() == 0


def test_excluded_synthetic_images_are_not_trained_on(demo: dict, tmp_path: Path) -> None:
    pool = pd.read_csv(demo["synthetic_csv"])
    flagged = pool["file"].iloc[::4].tolist()  # a quarter of the pool: the noise arm (50%) still fits
    exclude = tmp_path / "flagged.csv"
    pd.DataFrame({"file": flagged, "reason": "memorized"}).to_csv(exclude, index=False)
    for arm, csv in (("ratio25", demo["synthetic_csv"]), ("noise", demo["noise_csv"])):
        data = _training_data(demo["config"], demo["data_dir"], csv, exclude, parse_arm(arm, demo["config"]), seed=0)
        assert data["n_excluded"] == len(flagged), arm
        drawn = data["mix"][data["mix"]["source"].isin(["synthetic", "noise"])]
        assert len(drawn) == data["n_drawn"] > 0
        assert not set(drawn["path"].str.replace("synthetic_noise", "synthetic")) & set(flagged)


def test_e2e_saved_model_loads_with_its_preprocessing(demo: dict) -> None:
    model, meta = load_classifier(demo["out"] / "model.pt")
    assert meta["classes"] == class_names(VOCAB) and meta["image_size"] == 32
    assert model.num_classes == len(meta["classes"])


@pytest.mark.slow  # the full suite's (the quick tier stays under 3 minutes)
def test_e2e_rerun_through_cli_is_reproducible(demo: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    # One process runs seed 1 then seed 0, as the workflow runs an arm's seeds: seed 0 must come out as
    # it did alone (nothing leaks from one seed to the next), and every film comes from the caches the
    # earlier arms built (a rebuild here would fail).
    out = demo["out"].with_name("cli_ratio25_seed0")
    other = demo["out"].with_name("cli_ratio25_seed1")
    argv = ["--config", str(REPO / "config" / "config.yaml"), *[f"--set={o}" for o in demo["overrides"]],
            *split_flags(demo["data_dir"]), "--synthetic", str(demo["synthetic_csv"]),
            "--arm", "ratio25", "--seed", "1", "0", "--out-dir", str(other), str(out), "--cache-dir", str(demo["cache"])]
    threads = torch.get_num_threads()  # the fixture's, in one process (side by side: the next test)
    monkeypatch.setattr(train_classifier_module, "seed_processes", lambda n_seeds, asked: (1, threads))
    (out).mkdir(parents=True)
    (out / "metrics.json").write_text("{}")  # an old result: replaced
    monkeypatch.setattr(classifier_cache, "_build", lambda *args, **kwargs: pytest.fail("cache rebuilt"))
    assert main(argv) == 0
    assert (out / "predictions.csv").read_bytes() == (demo["out"] / "predictions.csv").read_bytes()
    assert json.loads((other / "metrics.json").read_text())["seed"] == 1
    again = json.loads((out / "metrics.json").read_text())
    first = demo["metrics"]
    assert again["test"]["macro"] == first["test"]["macro"]
    assert again["val_macro_auroc"] == first["val_macro_auroc"] and again["best_step"] == first["best_step"]
    assert pd.read_csv(out / "training_set.csv").equals(pd.read_csv(demo["out"] / "training_set.csv"))


@pytest.mark.slow  # two more seeds trained
def test_e2e_seeds_side_by_side_give_what_they_give_alone(demo: dict, capsys: pytest.CaptureFixture[str]) -> None:
    # --threads 2 on a CPU: seed 1 and seed 0 train at once in two processes of one thread (the workflow
    # under --cores 1); seed 0's outputs are byte for byte those of its run alone at one thread.
    out, other, alone = (demo["out"].with_name(f"par_ratio25_{name}") for name in ("seed0", "seed1", "alone0"))
    base = ["--config", str(REPO / "config" / "config.yaml"), *[f"--set={o}" for o in demo["overrides"]],
            *split_flags(demo["data_dir"]), "--synthetic", str(demo["synthetic_csv"]), "--arm", "ratio25",
            "--cache-dir", str(demo["cache"])]
    assert main([*base, "--seed", "0", "--out-dir", str(alone), "--threads", "1"]) == 0
    argv = [*base, "--seed", "1", "0", "--out-dir", str(other), str(out), "--threads", "2"]
    assert main(argv) == 0
    assert "2 seeds in 2 processes of 1 thread(s) each" in capsys.readouterr().err
    for name in ("predictions.csv", "train_log.csv", "training_set.csv", "model.pt"):
        assert (out / name).read_bytes() == (alone / name).read_bytes(), name
    assert json.loads((other / "metrics.json").read_text())["seed"] == 1
    # A seed that fails in its process stops the job with its error, named as alone.
    (other / "notes.txt").write_text("not the stage's")
    assert main(argv) == 2
    assert "holds files this stage did not write" in capsys.readouterr().err


def test_seed_processes_split_the_threads_on_a_cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    assert seed_processes(4, 2) == (2, 1) and seed_processes(4, 8) == (4, 2) and seed_processes(3, 8) == (3, 2)
    assert seed_processes(1, 2) == (1, 2) and seed_processes(4, 1) == (1, 1)
    monkeypatch.setattr(train_classifier_module, "pick_device", lambda: torch.device("cuda"))
    assert seed_processes(4, 8) == (1, 8)  # one GPU: one seed at a time


def test_e2e_cache_gives_the_metrics_of_decoding_every_step(demo: dict) -> None:
    # Every split and pool was decoded once, into one cache each, shared by the four arms.
    names = sorted(folder.name.split("-")[0] for folder in demo["cache"].iterdir())
    assert names == ["synthetic", "synthetic_noise", "test", "train", "val"]
    assert all(len(list(folder.glob("*.npy"))) == 1 for folder in demo["cache"].iterdir())
    decoded = train_classifier(demo["config"], demo["data_dir"], demo["synthetic_csv"], "ratio25", 0,
                               demo["root"] / "runs" / "decoded_ratio25_seed0", show_progress=False, cache_dir=None)
    cached = demo["metrics"]
    assert decoded["data_path"] == "decoded at every access" and cached["data_path"] == "decode-once cache"
    assert decoded["test"] == cached["test"] and decoded["val_macro_auroc"] == cached["val_macro_auroc"]
    log = {name: pd.read_csv(demo["root"] / "runs" / f"{name}ratio25_seed0" / "train_log.csv") for name in ("", "decoded_")}
    pd.testing.assert_frame_equal(log[""], log["decoded_"], rtol=1e-6)


def test_e2e_errors(demo: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--config", str(REPO / "config" / "config.yaml"), *[f"--set={o}" for o in demo["overrides"]],
            *split_flags(demo["data_dir"]), "--seed", "0"]
    # The synthetic list is needed for ratio > 0 only.
    assert main([*base, "--synthetic", str(tmp_path / "none.csv"), "--arm", "ratio25", "--out-dir", str(tmp_path / "a")]) == 2
    assert "generation" in capsys.readouterr().err
    # A synthetic list that smuggles test images into training is refused before any training.
    test_paths = load_split(demo["data_dir"], "test")["path"].tolist()
    sneaky = tmp_path / "sneaky.csv"
    pd.DataFrame({"file": test_paths * 20, "labels": "No Finding"}).to_csv(sneaky, index=False)
    assert main([*base, "--synthetic", str(sneaky), "--arm", "ratio50", "--out-dir", str(tmp_path / "b")]) == 2
    assert "test split" in capsys.readouterr().err
    # A missing exclusion list is named.
    assert main([*base, "--synthetic", str(demo["synthetic_csv"]), "--exclude-synthetic", str(tmp_path / "flags.csv"),
                 "--arm", "ratio25", "--out-dir", str(tmp_path / "c")]) == 2
    assert "flags.csv: synthetic exclusion list" in capsys.readouterr().err
    # The noise arm refuses the generated list (it would train on generated images), and vice versa.
    assert main([*base, "--synthetic", str(demo["synthetic_csv"]), "--arm", "noise", "--out-dir", str(tmp_path / "e")]) == 2
    assert "needs a noise image list" in capsys.readouterr().err
    assert main([*base, "--synthetic", str(demo["noise_csv"]), "--arm", "ratio25", "--out-dir", str(tmp_path / "e")]) == 2
    assert "needs a generated image list" in capsys.readouterr().err
    assert main([*base, "--arm", "ratio_x", "--out-dir", str(tmp_path / "d")]) == 2
    assert "expected ratio<percent>" in capsys.readouterr().err
    # Seeds and output folders pair one to one.
    assert base[-2:] == ["--seed", "0"]
    assert main([*base[:-2], "--arm", "ratio0", "--seed", "0", "1", "--out-dir", str(tmp_path / "f")]) == 2
    assert "needs as many distinct --out-dir folders" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.partial").exists()
