"""LoRA training on the offline tiny model, on CPU: learning, exact resume, atomic checkpoints, outputs."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from workflow_scripts.common import hardware
from workflow_scripts.lora import latent_cache, lora_checkpoints, lora_model, train_lora
from workflow_scripts.models.base_model import load_components
from workflow_scripts.models.tiny_model import build_tiny_pipeline
from workflow_scripts.common.config import load_config
from workflow_scripts.data.demo_dataset import make_demo_dataset
from workflow_scripts.data.prepare_dataset import prepare
from workflow_scripts.common.errors import TrainingError
from workflow_scripts.lora.lora_checkpoints import list_checkpoints
from workflow_scripts.lora.lora_model import diffusion_loss
from workflow_scripts.lora.train_lora import train


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
        "training.validation_prompts=[A chest X-ray with Cardiomegaly]", "model.pretrained=tiny", "training.lr_warmup_steps=0",
        "training.lr_scheduler=constant_with_warmup", *overrides,
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
    lora_model.add_lora(unet, rank=8, alpha=8, targets=lora_model.UNET_LORA_TARGETS)
    latents = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ids = lora_model.tokenize(components.tokenizer, ["A chest X-ray with Mass"] * 4)
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


@pytest.mark.slow  # three training runs; the quick tier keeps the other resume checks
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


@pytest.mark.slow  # three training runs; the quick tier keeps the other resume checks
def test_mid_epoch_resume_with_gradient_accumulation(setup) -> None:
    # 2 micro-batches per step; checkpoint-1 lies mid-epoch.
    straight, stopped = setup["root"] / "acc_straight", setup["root"] / "acc_stopped"
    run(setup, straight, "training.gradient_accumulation_steps=2", "training.save_steps=1", "training.max_train_steps=3")
    run(setup, stopped, "training.gradient_accumulation_steps=2", "training.save_steps=1", "training.max_train_steps=1")
    run(setup, stopped, "training.gradient_accumulation_steps=2", "training.save_steps=1", "training.max_train_steps=3")
    a, b = final_weights(straight), final_weights(stopped)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # the full suite's (the quick tier stays under 3 minutes)
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


@pytest.mark.slow  # the full suite's (the quick tier stays under 3 minutes)
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
    summary = run(setup, out, "training.learning_rate=5e-3", "model.lora_alpha=8")  # alpha != rank (16)
    pipe = StableDiffusionPipeline.from_pretrained(setup["tiny"], safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def sample():
        return pipe("A chest X-ray with Mass", num_inference_steps=3, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    base = sample()
    pipe.load_lora_weights(out / "final")
    with_lora = sample()
    assert abs(with_lora - base).max() > 1e-3
    # The kohya-format copy (WebUI / ComfyUI) holds the same LoRA: it converts back and samples alike.
    kohya = load_file(out / "final" / lora_checkpoints.KOHYA_FILE)
    assert any(key.startswith("lora_unet_") for key in kohya)
    assert all(key.startswith(("lora_unet_", "lora_te_")) for key in kohya)  # lora_te_: model.train_text_encoder
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {8.0}
    pipe.unload_lora_weights()
    pipe.load_lora_weights(out / "final", weight_name=lora_checkpoints.KOHYA_FILE)
    np.testing.assert_allclose(sample(), with_lora, atol=1e-5)
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
    real_loss = train_lora.diffusion_loss
    calls = {"n": 0}

    def goes_nan(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 2 else loss

    monkeypatch.setattr(train_lora, "diffusion_loss", goes_nan)  # the loss the loop calls
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


@pytest.mark.slow  # two torchrun launches of two processes, each importing torch and diffusers
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
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "workflow_scripts.lora.train_lora",
                   "--config", str(config_file), "--set", f"training.max_train_steps={steps}", "--train", str(setup["root"] / "data" / "train.csv"),
                   "--output-dir", str(out), "--tiny-dir", str(setup["tiny"])]
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                                env={**__import__("os").environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(REPO)})
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads((out / "final" / "training_summary.json").read_text())

    first = launch(2)
    # Each process encoded its share of the latent cache (whole batches of 4) into one file, equal to
    # the cache one process makes with as many threads (torchrun runs each process single-threaded,
    # and CPU convolutions round differently across thread counts).
    [shared] = (out / "cache").glob("latents-*")
    components = load_components("tiny", setup["tiny"])
    resolution = config["model"]["resolution"]
    count, batches = train_lora.image_batches(setup["root"] / "data", resolution, config["model"]["crop"], 4)
    assert latent_cache.shard(count, 4, 1, 2).start % 4 == 0 and len(latent_cache.shard(count, 4, 1, 2)) > 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = latent_cache.encode_latent_cache(components.vae, batches, count, 4, setup["root"] / "one_process_cache",
                                                  latent_cache.latent_shape(components.vae, resolution), torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(np.load(shared / "latents.npy"), np.load(alone / "latents.npy"))
    assert json.loads((shared / "prompts.json").read_text()) == json.loads((alone / "prompts.json").read_text())
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


# ----------------------------------------------------------------------------- real size (issue 14)


def test_every_result_changing_key_starts_fresh_and_only_listed_keys_resume(setup) -> None:
    config = make_train_config(setup)
    base = lora_checkpoints.resume_fingerprint(config, "src", "data", 1)
    changed = {bool: lambda v: not v, int: lambda v: v + 1, float: lambda v: v * 2 + 1, str: lambda v: v + "x",
               list: lambda v: [*v, "x"], type(None): lambda v: 3}
    for section in ("model", "training"):
        for key, value in config[section].items():
            other = {**config, section: {**config[section], key: changed[type(value)](value)}}
            moved = lora_checkpoints.resume_fingerprint(other, "src", "data", 1) != base
            resumable = f"{section}.{key}" in lora_checkpoints.RESUMABLE_TRAINING_KEYS or (section, key) == ("model", "pretrained")
            assert moved != resumable, f"{section}.{key}"  # pretrained counts through the resolved source


@pytest.mark.slow  # the full suite's (the quick tier stays under 3 minutes)
def test_changed_learning_rate_starts_fresh_and_a_longer_run_resumes(setup, capsys) -> None:
    out = setup["root"] / "changed_lr"
    run(setup, out, "training.max_train_steps=2", "training.learning_rate=1e-3")
    fresh = run(setup, out, "training.max_train_steps=2", "training.learning_rate=5e-3", "training.adam_weight_decay=0.5")
    assert fresh["resumed_from"] is None
    err = capsys.readouterr().err
    assert "made under another configuration" in err and "learning_rate: 0.001 -> 0.005" in err
    assert "adam_weight_decay: 0.01 -> 0.5" in err
    longer = run(setup, out, "training.max_train_steps=4", "training.learning_rate=5e-3", "training.adam_weight_decay=0.5",
                 "training.save_steps=1", "training.validation_steps=3")
    assert longer["resumed_from"].endswith("checkpoint-2")


@pytest.mark.slow  # the full suite's (the quick tier stays under 3 minutes)
def test_latent_cache_is_fp16_memory_mapped_and_host_mode_trains_like_device_mode(setup, capsys) -> None:
    device_run = setup["root"] / "cache_device"
    host_run = setup["root"] / "cache_host"
    a = run(setup, device_run, "training.max_train_steps=2")
    b = run(setup, host_run, "training.max_train_steps=2", "hardware.latent_cache_device_budget_gb=0.00001")
    err = capsys.readouterr().err
    assert a["latent_cache"]["mode"] == "device" and b["latent_cache"]["mode"] == "host"
    assert "device mode" in err and "host mode" in err  # the log says which was chosen
    assert a["final_loss"] == b["final_loss"]
    wa, wb = final_weights(device_run), final_weights(host_run)
    assert all(torch.equal(wa[name], wb[name]) for name in wa)
    # The cache: fp16 mean and std per image, memory-mapped from disk.
    [folder] = (host_run / "cache").glob("latents-*")
    array = np.load(folder / "latents.npy", mmap_mode="r")
    assert isinstance(array, np.memmap) and array.dtype == np.float16 and array.shape[1] == 2
    assert array.shape[2:] == (4, 16, 16)  # the tiny VAE's 4 x 16 x 16 latents at 64 px (SD's VAE: 4 x 64 x 64 at 512)
    assert b["latent_cache"]["bytes"] == array.nbytes == len(array) * 2 * 4 * 16 * 16 * 2  # mean and std, fp16
    cache = latent_cache.LatentCache(folder, torch.device("cpu"), budget_bytes=0)
    indices = torch.tensor([3, 0, 2])
    mean, _ = cache.gather(indices, indices)
    assert mean.dtype == torch.float32 and torch.equal(mean, torch.from_numpy(np.array(array[[3, 0, 2], 0])).float())


def test_val_loss_is_the_training_loss_at_fixed_timesteps_and_noise(setup) -> None:
    # ValLoss scores with `diffusion_loss(timesteps=...)`: the same value as the epsilon MSE it typed
    # out before, each val image at VAL_TIMESTEPS fixed timesteps under noise from one seeded generator.
    from workflow_scripts.lora.lora_validation import VAL_TIMESTEPS, ValLoss

    components = load_components("tiny", setup["tiny"])
    unet, scheduler = components.unet, components.noise_scheduler
    latents = torch.randn(5, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ids = lora_model.tokenize(components.tokenizer, ["A chest X-ray with Mass"] * 5)
    with torch.no_grad():
        embeds = components.text_encoder(ids)[0]
    scored = ValLoss(latents, embeds, ids, seed=3, batch_size=2)(unet, None, scheduler, contextlib.nullcontext)
    generator, total = torch.Generator().manual_seed(3), 0.0
    grid = torch.linspace(0, scheduler.config.num_train_timesteps - 1, VAL_TIMESTEPS + 2)[1:-1].round().long()
    with torch.no_grad():
        for start in range(0, 5, 2):
            batch = latents[start:start + 2]
            for t in grid:
                noise = torch.randn(batch.shape, generator=generator)
                timesteps = t.repeat(len(batch))
                prediction = unet(scheduler.add_noise(batch, noise, timesteps), timesteps, embeds[start:start + 2]).sample
                total += torch.nn.functional.mse_loss(prediction, noise, reduction="sum").item() / noise[0].numel()
    assert scored == pytest.approx(total / (5 * VAL_TIMESTEPS), rel=1e-6)
    _, _, given = lora_model.noise_batch(scheduler, latents, torch.Generator(), 0.0, timesteps=torch.full((5,), 7))
    assert given.tolist() == [7] * 5


def test_noising_is_fp32_so_sigma_at_t0_and_t1_is_exact(setup) -> None:
    components = load_components("tiny", setup["tiny"])
    scheduler = components.noise_scheduler
    latents = torch.zeros(4096, 1, 1, 1, dtype=torch.bfloat16)  # what a bf16 run would hand over
    noisy, target, timesteps = lora_model.noise_batch(scheduler, latents, torch.Generator().manual_seed(0), 0.0)
    assert noisy.dtype == torch.float32
    assert {0, 1} <= set(timesteps.tolist())
    sigma = (1 - scheduler.alphas_cumprod.double()) ** 0.5
    for t in (0, 1):
        rows = timesteps == t
        torch.testing.assert_close((noisy[rows] / target[rows]).double().flatten(),
                                   sigma[t].expand(int(rows.sum())), rtol=1e-6, atol=0)
    assert 0.02 < sigma[0] < 0.05  # not 0, as a bf16 schedule gives


def test_text_encoder_gradient_checkpointing_really_runs(setup, monkeypatch) -> None:
    calls = {"n": 0}
    real_build = train_lora.build_trainable_model

    def counting_build(*args, **kwargs):
        trained = real_build(*args, **kwargs)
        layer = next(module for name, module in trained.models["text_encoder"].named_modules() if name.endswith("layers.0.self_attn"))
        layer.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + torch.is_grad_enabled()))
        return trained

    monkeypatch.setattr(train_lora, "build_trainable_model", counting_build)
    run(setup, setup["root"] / "te_checkpointing", "model.train_text_encoder=true", "training.gradient_checkpointing=true",
        "training.max_train_steps=1", "training.train_batch_size=2")
    assert calls["n"] == 2  # forward, then recomputed in backward: checkpointing ran (1 without)


def test_cuda_rng_state_is_restored(monkeypatch) -> None:
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": __import__("random").getstate(),
           "cuda": ["sentinel"]}
    lora_checkpoints.restore_rng(rng)
    assert restored == [["sentinel"]]


def test_deterministic_option_sets_deterministic_kernels_for_the_run_only(setup, monkeypatch) -> None:
    seen = []
    real_setup = train_lora.setup_run

    def spy(*args, **kwargs):
        seen.append((torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic))
        return real_setup(*args, **kwargs)

    monkeypatch.setattr(train_lora, "setup_run", spy)
    summary = run(setup, setup["root"] / "deterministic", "training.deterministic=true", "training.max_train_steps=1")
    assert seen == [(True, True)] and summary["deterministic"] is True
    assert not torch.are_deterministic_algorithms_enabled()


def test_gpu_levers_follow_config_on_cuda_and_stay_off_on_cpu() -> None:
    on = {"allow_tf32": True, "cudnn_benchmark": True, "channels_last": True, "compile_unet": True, "compile_sampling": True}
    assert not any(hardware.gpu_levers(on, torch.device("cpu"), False).values())
    assert hardware.gpu_levers(on, torch.device("cuda"), False) == on
    assert hardware.gpu_levers(on, torch.device("cuda"), True)["cudnn_benchmark"] is False
    switches = lambda: (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,  # noqa: E731
                        torch.backends.cudnn.benchmark)
    before = switches()
    with hardware.hardware_settings(hardware.gpu_levers(on, torch.device("cuda"), False), False):
        assert switches() == ("tf32", "tf32", True)  # through torch's fp32_precision API, not the legacy allow_tf32
    with hardware.hardware_settings(hardware.gpu_levers({**on, "allow_tf32": False}, torch.device("cuda"), False), False):
        assert switches()[:2] == ("ieee", "ieee")
    assert switches() == before


def test_pad_crop_keeps_the_whole_film(tmp_path) -> None:
    from PIL import Image

    from workflow_scripts.data.xray_dataset import model_transform

    film = np.zeros((100, 80), dtype=np.uint8)
    film[:6] = 255  # an apex at the very top of a portrait film
    image = Image.fromarray(film)
    assert model_transform(32, "center")(image).max() < 0  # centre-crop cut the top away
    padded = model_transform(32, "pad")(image)
    assert padded.shape == (3, 32, 32) and padded[0, 0].max() > 0.9  # still there
    assert padded[0, :, 0].max() == -1  # black bars left and right


# ----------------------------------------------------------------------------- the LoRA in other clients (issue 20)

# ComfyUI's comfy/lora.py (LORA_CLIP_MAP, model_lora_keys_clip): an SD 1.5 text-encoder LoRA module
# is "lora_te_text_model_encoder_layers_{layer}_{LORA_CLIP_MAP[name]}"; kohya sd-scripts
# (networks/lora.py, prefix "lora_te") and AUTOMATIC1111 ("lora_te_" + module name) name it the same
# from CLIP's module names (text_model.encoder.layers.N.self_attn.q_proj). A UNet module is
# "lora_unet_" + its diffusers name with "." -> "_" (ComfyUI model_lora_keys_unet, A1111, kohya).
LORA_CLIP_MAP = {"self_attn.k_proj": "self_attn_k_proj", "self_attn.q_proj": "self_attn_q_proj",
                 "self_attn.v_proj": "self_attn_v_proj", "self_attn.out_proj": "self_attn_out_proj"}


def test_kohya_copy_of_an_sd15_lora_has_the_keys_webui_comfyui_and_kohya_read(tmp_path) -> None:
    """The SD 1.5 UNet and text encoder built from shared/sd15-arch on the meta device (no weights),
    LoRA on both, written by write_lora: every kohya key follows the clients' rules above."""
    import os
    import stat

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    arch = REPO.parent / "shared" / "sd15-arch"
    if not (arch / "unet" / "config.json").is_file():
        pytest.skip(f"no SD 1.5 component configs in {arch}")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(arch / "unet"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(arch / "text_encoder"))
    base_unet = {key.removesuffix(".weight") for key in unet.state_dict() if key.endswith(".weight")}
    rank = 4
    for model, targets in ((unet, lora_model.UNET_LORA_TARGETS), (text_encoder, lora_model.TEXT_LORA_TARGETS)):
        lora_model.add_lora(model, rank, 8, targets)
        for name, module in model.named_modules():
            if name.endswith(("lora_A.default", "lora_B.default")):  # only the LoRA weights get memory
                module.to_empty(device="cpu")
                torch.nn.init.normal_(module.weight)
    lora_checkpoints.write_lora(tmp_path, unet, text_encoder)

    kohya = load_file(tmp_path / lora_checkpoints.KOHYA_FILE)
    modules = {key.split(".", 1)[0] for key in kohya}
    unet_modules = {m for m in modules if m.startswith("lora_unet_")}
    te_modules = modules - unet_modules
    assert unet_modules == {"lora_unet_" + name.replace(".", "_") for name in base_unet
                            if name.endswith(tuple("." + t for t in lora_model.UNET_LORA_TARGETS))}
    assert len(unet_modules) == 128  # 16 transformer blocks x 2 attentions x (q, k, v, out)
    assert te_modules == {f"lora_te_text_model_encoder_layers_{layer}_{name}" for layer in range(12)
                          for name in LORA_CLIP_MAP.values()}
    assert len(te_modules) == 48  # 12 layers x (q, k, v, out)
    for module in modules:  # each as kohya writes it: down (rank x in), up (out x rank), alpha
        assert {f"{module}.lora_down.weight", f"{module}.lora_up.weight", f"{module}.alpha"} <= kohya.keys()
        assert kohya[f"{module}.lora_down.weight"].shape[0] == rank == kohya[f"{module}.lora_up.weight"].shape[1]
        assert float(kohya[f"{module}.alpha"]) == 8.0
    assert len(kohya) == 3 * len(modules)
    umask = os.umask(0)
    os.umask(umask)
    for name in (lora_checkpoints.KOHYA_FILE, lora_checkpoints.LORA_FILE):  # readable like every other output
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask
