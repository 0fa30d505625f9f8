"""LoRA training on the offline tiny model, on CPU: learning, exact resume, atomic checkpoints, outputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from workflow_scripts import lora_training, train_lora
from workflow_scripts.base_model import build_tiny_pipeline, load_components
from workflow_scripts.config import load_config
from workflow_scripts.demo_dataset import make_demo_dataset
from workflow_scripts.prepare_dataset import prepare
from workflow_scripts.train_lora import TrainingError, diffusion_loss, list_checkpoints, train


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("lora")
    make_demo_dataset(root / "demo", num_patients=16, size=64, seed=0)
    tiny = build_tiny_pipeline(root / "tiny-sd", resolution=64, seed=0)
    return {"root": root, "tiny": Path(tiny)}


def make_train_config(setup: dict[str, Any], *overrides: str) -> dict[str, Any]:
    demo = setup["root"] / "demo"
    config = load_config([REPO / "config" / "config.yaml"], [
        f"dataset.csv={demo / 'Data_Entry_2017.csv'}", f"dataset.images={demo / 'images'}",
        "training.train_batch_size=4", "training.max_train_steps=4", "training.save_steps=2",
        "training.validation_steps=1000", "training.num_validation_images=1", "training.validation_inference_steps=2",
        "training.validation_prompts=[A chest X-ray with Cardiomegaly]", *overrides,
    ])
    data_dir = setup["root"] / "data"
    if not (data_dir / "train.csv").exists():
        prepare(config, data_dir)
    return config


def run(setup, out: Path, *overrides: str, resume: str = "latest") -> dict[str, Any]:
    return train(make_train_config(setup, *overrides), setup["root"] / "data", out, setup["tiny"], resume)


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "pytorch_lora_weights.safetensors")


def test_a_few_steps_on_a_fixed_batch_lower_the_loss(setup) -> None:
    components = load_components("tiny", setup["tiny"])
    unet = components.unet
    train_lora.add_lora(unet, rank=8, alpha=8, targets=train_lora.UNET_LORA_TARGETS)
    latents = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ids = train_lora.tokenize(components.tokenizer, ["A chest X-ray with Mass"] * 4)
    with torch.no_grad():
        embeds = components.text_encoder(ids)[0]

    def loss_now() -> float:
        with torch.no_grad():
            return diffusion_loss(unet, components.noise_scheduler, latents, embeds, torch.Generator().manual_seed(1), None, 0.0).item()

    before = loss_now()
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(30):
        loss = diffusion_loss(unet, components.noise_scheduler, latents, embeds, torch.Generator().manual_seed(1), None, 0.0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss_now() < 0.8 * before


def test_train_2n_equals_train_n_then_resume_n(setup) -> None:
    straight = setup["root"] / "straight"
    summary = run(setup, straight)
    assert summary["steps"] == 4 and summary["resumed_from"] is None
    stopped = setup["root"] / "stopped"
    run(setup, stopped, "training.max_train_steps=2")
    resumed = run(setup, stopped)  # a longer target: picks up checkpoint-2 by itself
    assert resumed["resumed_from"].endswith("checkpoint-2")
    a, b = final_weights(straight), final_weights(stopped)
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    # ... and differs from a run with another seed, so the comparison can fail.
    other = setup["root"] / "other_seed"
    run(setup, other, "training.seed=99")
    assert any(not torch.allclose(a[name], final_weights(other)[name]) for name in a)


def test_mid_epoch_resume_with_gradient_accumulation(setup) -> None:
    # 2 micro-batches per step; checkpoint-1 lies mid-epoch.
    straight, stopped = setup["root"] / "acc_straight", setup["root"] / "acc_stopped"
    run(setup, straight, "training.gradient_accumulation_steps=2", "training.save_steps=1", "training.max_train_steps=3")
    run(setup, stopped, "training.gradient_accumulation_steps=2", "training.save_steps=1", "training.max_train_steps=1")
    run(setup, stopped, "training.gradient_accumulation_steps=2", "training.save_steps=1", "training.max_train_steps=3")
    a, b = final_weights(straight), final_weights(stopped)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_killed_while_saving_leaves_the_previous_checkpoint_usable(setup, monkeypatch) -> None:
    out = setup["root"] / "killed"
    real_save = train_lora.save_checkpoint

    def dies_on_second_save(checkpoints_dir, step, *args, **kwargs):
        if step == 4:
            # What a SIGKILL mid-write leaves: a partial folder with some files in it.
            (checkpoints_dir / f"checkpoint-{step}.partial").mkdir()
            (checkpoints_dir / f"checkpoint-{step}.partial" / "lora_unet.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt
        return real_save(checkpoints_dir, step, *args, **kwargs)

    monkeypatch.setattr(train_lora, "save_checkpoint", dies_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        run(setup, out)
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-2"]
    monkeypatch.setattr(train_lora, "save_checkpoint", real_save)
    summary = run(setup, out)
    assert summary["resumed_from"].endswith("checkpoint-2")
    assert not list((out / "checkpoints").glob("*.partial"))
    straight = final_weights(setup["root"] / "straight") if (setup["root"] / "straight" / "final").exists() else None
    if straight is not None:
        for name, value in final_weights(out).items():
            torch.testing.assert_close(value, straight[name], rtol=1e-5, atol=1e-6)


def test_checkpoint_from_another_configuration_is_not_resumed(setup, capsys) -> None:
    out = setup["root"] / "changed"
    run(setup, out, "training.max_train_steps=2", "model.lora_rank=4")
    summary = run(setup, out, "model.lora_rank=8")
    assert summary["resumed_from"] is None
    assert "made under another configuration (lora_rank: 4 -> 8)" in capsys.readouterr().err
    assert list(out.glob("checkpoints_stale_*/checkpoint-2"))
    with pytest.raises(TrainingError, match="made under another configuration"):
        run(setup, out, "model.lora_rank=4", resume=str(out / "checkpoints" / "checkpoint-2"))


def test_final_lora_loads_with_diffusers_and_changes_the_output(setup) -> None:
    from diffusers import StableDiffusionPipeline

    out = setup["root"] / "strong"
    summary = run(setup, out, "training.learning_rate=5e-3")
    pipe = StableDiffusionPipeline.from_pretrained(setup["tiny"], safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def sample():
        return pipe("A chest X-ray with Mass", num_inference_steps=3, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    base = sample()
    pipe.load_lora_weights(out / "final")
    assert abs(sample() - base).max() > 1e-3
    recorded = json.loads((out / "final" / "training_summary.json").read_text())
    assert recorded == summary
    for key in ("steps", "epochs", "final_loss", "train_seconds", "images_per_second", "peak_memory_bytes", "seed", "versions", "config_hash"):
        assert key in recorded


def test_validation_images_and_scalars_reach_tensorboard(setup) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = setup["root"] / "tb"
    run(setup, out, "training.validation_steps=2", "training.validation_prompts=[]")
    events = EventAccumulator(str(out / "logs"), size_guidance={"images": 0}).Reload()
    images = events.Tags()["images"]
    assert "validation/image_Cardiomegaly" in images and "validation/image_No_Finding" in images
    assert {"train/loss", "train/lr"} <= set(events.Tags()["scalars"])
    assert [event.step for event in events.Images("validation/image_Mass")] == [2, 4]
    assert (out / "validation" / "step-4" / "Mass.png").is_file()


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(setup, monkeypatch) -> None:
    out = setup["root"] / "nan"
    real_loss = lora_training.diffusion_loss
    calls = {"n": 0}

    def goes_nan(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 2 else loss

    monkeypatch.setattr(lora_training, "diffusion_loss", goes_nan)
    with pytest.raises(TrainingError, match=r"loss became nan by step 4.*last good checkpoint is .*checkpoint-2"):
        run(setup, out)
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-2"]
    assert not (out / "final").exists()


@pytest.mark.parametrize(("override", "message"), [
    ("training.use_8bit_adam=true", "use_8bit_adam needs a CUDA GPU"),
    ("training.mixed_precision=fp16", "fp16 needs a CUDA GPU"),
    ("hardware.enable_xformers=true", "hardware.enable_xformers: .*set it to false"),
])
def test_gpu_only_options_fail_clearly_on_cpu(setup, override: str, message: str) -> None:
    if torch.cuda.is_available():
        pytest.skip("checks the CPU message")
    with pytest.raises(TrainingError, match=message):
        run(setup, setup["root"] / "gpu_only", override)


def test_bf16_mixed_precision_trains_on_cpu(setup) -> None:
    summary = run(setup, setup["root"] / "bf16", "training.mixed_precision=bf16", "training.max_train_steps=2")
    assert summary["mixed_precision"] == "bf16" and summary["final_loss"] == summary["final_loss"]  # not NaN


def test_data_parallel_training_with_two_processes_trains_and_resumes(setup) -> None:
    """The multi-GPU path (DDP: sharded batches, main-process checkpoints, broadcast resume choice),
    run with two CPU processes (gloo) under torchrun."""
    import subprocess
    import sys

    config = make_train_config(setup)
    config_file = setup["root"] / "ddp_config.json"
    config_file.write_text(json.dumps(config))
    out = setup["root"] / "ddp"

    def launch(steps: int) -> dict[str, Any]:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "workflow_scripts.train_lora",
                   "--config", str(config_file), "--set", f"training.max_train_steps={steps}", "--data-dir", str(setup["root"] / "data"),
                   "--output-dir", str(out), "--tiny-dir", str(setup["tiny"])]
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                                env={**__import__("os").environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(REPO)})
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads((out / "final" / "training_summary.json").read_text())

    first = launch(2)
    assert first["processes"] == 2 and first["images_seen"] == 2 * 2 * config["training"]["train_batch_size"]
    resumed = launch(4)
    assert resumed["resumed_from"].endswith("checkpoint-2") and resumed["steps"] == 4
    assert resumed["images_seen"] == 4 * 2 * config["training"]["train_batch_size"]


def test_optional_text_encoder_lora_is_trained_saved_and_loaded(setup) -> None:
    from diffusers import StableDiffusionPipeline

    out = setup["root"] / "text_encoder"
    run(setup, out, "model.train_text_encoder=true", "training.max_train_steps=2")
    weights = final_weights(out)
    assert any(name.startswith("text_encoder.") for name in weights) and any(name.startswith("unet.") for name in weights)
    pipe = StableDiffusionPipeline.from_pretrained(setup["tiny"], safety_checker=None)
    pipe.load_lora_weights(out / "final")
    assert getattr(pipe.text_encoder, "peft_config", None)  # the text encoder got its LoRA back
