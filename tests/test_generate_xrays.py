"""Generation on the tiny model, on CPU: determinism, files, plans, resume, LoRA applied, fp32 VAE under fp16, the
three CLIs (plan, generate, merge), bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import REPO
from workflow_scripts.generation import pipeline as generation, merge_generation, plan_generation
from workflow_scripts.models.base_model import load_pipeline, make_scheduler
from workflow_scripts.models.tiny_model import build_tiny_pipeline
from workflow_scripts.common.config import load_config
from workflow_scripts.data.demo_dataset import make_demo_dataset
from workflow_scripts.common.errors import GenerationError
from workflow_scripts.generation.generate_xrays import main
from workflow_scripts.generation.pipeline import generation_plan, label_key, parse_labels
from workflow_scripts.data.prepare_dataset import prepare
from workflow_scripts.study.design import pool_size_needed
from workflow_scripts.common.tables import load_split
from workflow_scripts.lora.train_lora import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("gen")
    make_demo_dataset(root / "demo", num_patients=16, size=64, seed=0)
    overrides = [f"dataset.csv={root / 'demo' / 'Data_Entry_2017.csv'}", f"dataset.images={root / 'demo' / 'images'}",
                 "training.train_batch_size=4", "training.max_train_steps=3", "training.save_steps=2",
                 "training.validation_steps=1000", "training.validation_inference_steps=1", "training.num_validation_images=1",
                 "training.validation_prompts=[A chest X-ray with Mass]", "training.learning_rate=5e-3",
                 "split.more_real_ratio=null", "classifier.controls=[rebalanced, noise]",  # 16 patients: keep them all
                 "split.test_fraction=0.25", "balance.max_per_label=null",  # not the demo's data-limited split
                 "model.pretrained=tiny", "training.lr_warmup_steps=0",
                 "training.lr_scheduler=constant_with_warmup"]  # random weights: plumbing, not learning
    config_file = root / "config.yaml"
    config = load_config([REPO / "config" / "config.yaml"], overrides)
    config_file.write_text(json.dumps(config))  # JSON is YAML: the CLI reads it like a config file
    prepare(config, root / "data")
    tiny = build_tiny_pipeline(root / "tiny-sd", resolution=64, seed=0)
    train(config, root / "data", root / "lora", Path(tiny))
    return {"root": root, "config": config, "config_file": config_file, "tiny": Path(tiny)}


def generate(trained, out: Path, *flags: str) -> int:
    return main(["--config", str(trained["config_file"]), "--checkpoint", str(trained["root"] / "lora" / "final"),
                 "--tiny-dir", str(trained["tiny"]), "--train", str(trained["root"] / "data" / "train.csv"),
                 "--num-inference-steps", "3", "--output-dir", str(out), *flags])


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def test_keys_and_label_parsing() -> None:
    vocabulary = ["Effusion", "Mass", "No Finding"]
    assert label_key(["No Finding"]) == "No_Finding"
    assert label_key(["Effusion", "Mass"]) == "Effusion+Mass"
    assert parse_labels("Mass+Effusion", vocabulary) == ["Effusion", "Mass"]
    assert parse_labels("No_Finding", vocabulary) == ["No Finding"]
    with pytest.raises(GenerationError, match=r"unknown label 'Dragon'.*dataset.labels"):
        parse_labels("Dragon", vocabulary)


def test_plans_fixed_balance_and_all_combinations(trained) -> None:
    train_split = load_split(trained["root"] / "data", "train")
    config = trained["config"]
    fixed = generation_plan(config, train_split)
    assert list(fixed["key"]) == [label_key([label]) for label in config["dataset"]["labels"]]
    assert set(fixed["count"]) == {config["generation"]["images_per_label"]}
    balance = generation_plan({**config, "generation": {**config["generation"], "plan": "balance", "target_per_label": 30}}, train_split)
    real = {label: sum(label in labels.split("|") for labels in train_split["labels"]) for label in config["dataset"]["labels"]}
    assert dict(zip(balance["labels"], balance["count"])) == {label: max(0, 30 - n) for label, n in real.items()}
    everything = generation_plan({**config, "generation": {**config["generation"], "all_label_combinations": True}}, train_split)
    combos = {labels for labels in train_split["labels"] if "|" in labels}
    assert combos and combos <= set(everything["labels"])
    assert all(prompt.count(" and ") == labels.count("|") for prompt, labels in zip(everything["prompt"], everything["labels"]))


def test_a_label_without_training_images_gets_no_synthetic_images(trained) -> None:
    # dataset.allow_absent_labels lets such a label through the data stage; its prompt was never
    # trained on, so the plan must not ask the LoRA for it.
    train_split = load_split(trained["root"] / "data", "train")
    config = trained["config"]
    absent = config["dataset"]["labels"][0]
    without = train_split[~train_split["labels"].str.split("|").map(lambda labels: absent in labels)]
    plan = generation_plan(config, without)
    assert absent not in set(plan["labels"]) and len(plan) == len(config["dataset"]["labels"]) - 1


def test_plan_covers_the_largest_classifier_ratio(trained) -> None:
    train_split = load_split(trained["root"] / "data", "train")
    config = {**trained["config"], "generation": {**trained["config"]["generation"], "images_per_label": 1},
              "classifier": {**trained["config"]["classifier"], "ratios": [0, 50], "pool_headroom": 2.0}}
    plan = generation_plan(config, train_split)
    # 50% synthetic needs as many synthetic as real images, times the headroom for different draws per seed.
    needed = 2 * len(train_split)
    assert config["classifier"]["pool_headroom"] == 2.0 and pool_size_needed(config, len(train_split)) == needed
    assert plan["count"].sum() >= needed
    assert plan["count"].nunique() == 1  # the shortfall is spread evenly
    assert plan["count"].iloc[0] - 1 == -(-(needed - len(plan)) // len(plan))
    more = generation_plan({**config, "classifier": {**config["classifier"], "pool_headroom": 3.0}}, train_split)
    assert more["count"].sum() >= 3 * len(train_split) > plan["count"].sum()


@pytest.mark.slow  # the full suite's (the quick tier stays under 3 minutes)
def test_files_csv_and_determinism(trained, tmp_path) -> None:
    assert generate(trained, tmp_path / "a", "--label", "Mass", "--num-images", "3", "--seed", "5") == 0
    assert generate(trained, tmp_path / "b", "--label", "Mass", "--num-images", "3", "--seed", "5") == 0
    assert generate(trained, tmp_path / "c", "--label", "Mass", "--num-images", "3", "--seed", "6") == 0
    files = sorted((tmp_path / "a" / "Mass").glob("*.png"))
    assert [f.name for f in files] == ["Mass_0000.png", "Mass_0001.png", "Mass_0002.png"]
    image = Image.open(files[0])
    assert image.mode == "L" and image.size == (64, 64)
    for name in [f.name for f in files]:
        assert np.array_equal(pixels(tmp_path / "a" / "Mass" / name), pixels(tmp_path / "b" / "Mass" / name))
        assert not np.array_equal(pixels(tmp_path / "a" / "Mass" / name), pixels(tmp_path / "c" / "Mass" / name))
    results = pd.read_csv(tmp_path / "a" / "Mass" / "generation_results.csv")
    assert list(results.columns) == ["file", "prompt", "labels", "seed", "steps", "guidance", "scheduler", "checkpoint",
                                     "dtype", "device"]
    assert set(results["dtype"]) == {"float32"} and set(results["device"]) == {"cpu"}  # same settings, same image: where
    assert set(results["prompt"]) == {"A chest X-ray with Mass"} and set(results["labels"]) == {"Mass"}
    assert set(results["steps"]) == {3} and set(results["guidance"]) == {7.5} and set(results["scheduler"]) == {"dpmsolver++"}
    assert results["seed"].nunique() == 3


def test_one_image_regenerates_alone_and_resume_makes_only_missing(trained, tmp_path) -> None:
    out = tmp_path / "out"
    generate(trained, out, "--label", "Effusion", "--num-images", "4", "--batch-size", "4")
    folder = out / "Effusion"
    original = {f.name: pixels(f) for f in folder.glob("*.png")}
    kept_mtime = (folder / "Effusion_0000.png").stat().st_mtime_ns
    (folder / "Effusion_0002.png").unlink()
    (folder / "Effusion_0003.png").unlink()
    (folder / "Effusion_0003.png.partial").write_bytes(b"half a png")  # what a kill mid-write leaves
    generate(trained, out, "--label", "Effusion", "--num-images", "4", "--batch-size", "4")
    assert (folder / "Effusion_0000.png").stat().st_mtime_ns == kept_mtime  # not regenerated
    assert not list(folder.glob("*.partial"))
    # Made alone (batch of 2 instead of 4), images 2 and 3 are the very same images.
    for name in ("Effusion_0002.png", "Effusion_0003.png"):
        assert np.abs(pixels(folder / name) - original[name]).max() <= 1


def test_generate_all_labels_covers_labels_and_combinations(trained, tmp_path) -> None:
    generate(trained, tmp_path, "--generate-all-labels", "--num-images", "1", "--num-inference-steps", "1")
    train_split = load_split(trained["root"] / "data", "train")
    combos = {label_key(labels.split("|")) for labels in train_split["labels"] if "|" in labels}
    made = {p.name for p in tmp_path.iterdir() if p.is_dir()}
    assert {label_key([label]) for label in trained["config"]["dataset"]["labels"]} | combos == made


def test_the_lora_is_really_applied(trained, tmp_path) -> None:
    generate(trained, tmp_path, "--label", "Mass", "--num-images", "1", "--seed", "3")
    row = pd.read_csv(tmp_path / "Mass" / "generation_results.csv").iloc[0]
    base = load_pipeline(str(trained["tiny"]), trained["tiny"])
    base.scheduler = make_scheduler("dpmsolver++", base.scheduler.config)
    base.set_progress_bar_config(disable=True)
    image = base(row["prompt"], num_inference_steps=3, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(int(row["seed"]))).images[0]
    without_lora = generation.to_grayscale_uint8(image).astype(np.int16)
    assert np.abs(pixels(tmp_path / "Mass" / "Mass_0000.png") - without_lora).mean() > 1.0


def test_the_lora_is_fused_and_samples_as_the_unfused_adapter(trained) -> None:
    from diffusers import StableDiffusionPipeline

    final = trained["root"] / "lora" / "final"
    fused, _, _ = generation.load_generator(final, None, trained["tiny"], "dpmsolver++", trained["config"]["hardware"],
                                             torch.float32, torch.device("cpu"))
    assert not any("lora" in name for name, _ in fused.unet.named_modules())  # no adapter call per UNet step
    unfused = StableDiffusionPipeline.from_pretrained(trained["tiny"], safety_checker=None)
    unfused.load_lora_weights(final)
    unfused.scheduler = make_scheduler("dpmsolver++", unfused.scheduler.config)
    unfused.set_progress_bar_config(disable=True)

    def sample(pipe):
        return pipe("A chest X-ray with Mass", num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    np.testing.assert_allclose(sample(fused), sample(unfused), atol=1e-4)


def test_sampling_dtype_is_half_on_a_gpu_whatever_the_training_precision(monkeypatch) -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert generation.generation_dtype("auto", cpu) == torch.float32
    assert generation.generation_dtype("fp16", cpu) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert generation.generation_dtype("auto", cuda) == torch.bfloat16
    assert generation.generation_dtype("fp16", cuda) == torch.float16
    assert generation.generation_dtype("fp32", cuda) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert generation.generation_dtype("auto", cuda) == torch.float16


def test_under_fp16_the_vae_stays_fp32_and_decodes_the_fp16_latents(trained) -> None:
    # SD's VAE overflows in fp16: with an fp16 UNet the VAE is kept fp32 and decodes the latents itself.
    final = trained["root"] / "lora" / "final"
    pipe, _, _ = generation.load_generator(final, None, trained["tiny"], "dpmsolver++", trained["config"]["hardware"],
                                           torch.float16, torch.device("cpu"))
    assert pipe.unet.dtype == torch.float16 and pipe.text_encoder.dtype == torch.float16 and pipe.vae.dtype == torch.float32
    images = generation.sample(pipe, ["A chest X-ray with Mass"] * 2, None, steps=2, guidance=7.5, resolution=64,
                               generators=[torch.Generator().manual_seed(seed) for seed in (0, 1)])
    assert images.shape == (2, 64, 64, 3) and np.isfinite(images).all() and 0 <= images.min() <= images.max() <= 1
    # Same seeds in fp32: the fp16 UNet gives nearly the same image (the decode path is the pipeline's own).
    full, _, _ = generation.load_generator(final, None, trained["tiny"], "dpmsolver++", trained["config"]["hardware"],
                                           torch.float32, torch.device("cpu"))
    reference = generation.sample(full, ["A chest X-ray with Mass"] * 2, None, steps=2, guidance=7.5, resolution=64,
                                  generators=[torch.Generator().manual_seed(seed) for seed in (0, 1)])
    assert np.abs(images - reference).mean() < 0.05


@pytest.mark.slow  # the full suite's (the quick tier stays under 3 minutes)
def test_plan_and_merge_clis_write_what_the_generation_rules_read(trained, tmp_path) -> None:
    train_csv = trained["root"] / "data" / "train.csv"
    plan_csv = tmp_path / "synthetic" / "plan.csv"
    assert plan_generation.main(["--config", str(trained["config_file"]), "--train", str(train_csv), "--plan", str(plan_csv)]) == 0
    expected = generation_plan(trained["config"], load_split({"train": train_csv}, "train"))
    pd.testing.assert_frame_equal(pd.read_csv(plan_csv, dtype={"labels": str, "prompt": str}), expected, check_dtype=False)
    out = tmp_path / "synthetic"
    for label in ("Mass", "Effusion"):
        assert generate(trained, out, "--label", label, "--plan", str(plan_csv), "--num-inference-steps", "1") == 0
    merged = tmp_path / "synthetic" / "generation_results.csv"
    parts = [str(out / label / "generation_results.csv") for label in ("Mass", "Effusion")]
    assert merge_generation.main(["--config", str(trained["config_file"]), "--results", *parts, "--plan", str(plan_csv),
                                  "--merged", str(merged)]) == 0  # as the rule runs it: each list holds its planned count
    frame = pd.read_csv(merged)
    counts = dict(zip(expected["key"], expected["count"]))
    assert frame["labels"].tolist() == ["Mass"] * counts["Mass"] + ["Effusion"] * counts["Effusion"]
    assert all(Path(file).is_file() for file in frame["file"])


def test_real_configs_do_not_slow_a_gpu_with_vae_slicing() -> None:
    for name in ("nih_chestxray14.yaml", "chexpert.yaml"):
        config = load_config([REPO / "config" / "config.yaml", REPO / "config" / name])
        assert config["hardware"]["enable_vae_slicing"] is False, name
        assert config["generation"]["dtype"] == "auto", name


def test_checkpoint_folder_records_its_base_model(trained, tmp_path) -> None:
    checkpoint = trained["root"] / "lora" / "checkpoints" / "checkpoint-2"
    code = main(["--config", str(trained["config_file"]), "--checkpoint", str(checkpoint), "--label", "Mass",
                 "--num-images", "1", "--num-inference-steps", "1", "--tiny-dir", str(trained["tiny"]), "--output-dir", str(tmp_path)])
    assert code == 0
    assert pd.read_csv(tmp_path / "Mass" / "generation_results.csv")["checkpoint"].iloc[0] == str(checkpoint)


def test_bad_input_gives_clear_messages(trained, tmp_path, capsys) -> None:
    assert generate(trained, tmp_path, "--label", "Dragon", "--num-images", "1") == 2
    assert "unknown label 'Dragon'" in capsys.readouterr().err
    empty = tmp_path / "empty_checkpoint"
    empty.mkdir()
    assert main(["--config", str(trained["config_file"]), "--checkpoint", str(empty), "--label", "Mass",
                 "--output-dir", str(tmp_path / "out")]) == 2
    assert "no pytorch_lora_weights.safetensors here" in capsys.readouterr().err
    # A base model of another architecture (wider UNet): the LoRA does not fit it.
    other = tmp_path / "other-base"
    shutil.copytree(trained["tiny"], other)
    unet_config = json.loads((other / "unet" / "config.json").read_text())
    from diffusers import UNet2DConditionModel

    unet_config["block_out_channels"] = [64, 96]
    UNet2DConditionModel.from_config({k: v for k, v in unet_config.items() if not k.startswith("_")}).save_pretrained(other / "unet")
    assert generate(trained, tmp_path / "x", "--label", "Mass", "--num-images", "1", "--pretrained-model", str(other)) == 2
    assert "does not fit base model" in capsys.readouterr().err
