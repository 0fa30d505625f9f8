"""Tests for workflow_scripts.models.base_model: the offline tiny SD 1.5 look-alike and clear-error loading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from workflow_scripts.models import base_model, build_tiny_model, tiny_model
from workflow_scripts.common.errors import ModelNotFoundError
from workflow_scripts.models.base_model import load_components, load_pipeline, resolve_pretrained
from workflow_scripts.models.tiny_model import build_tiny_pipeline

SD15_SCHEDULER = Path(__file__).resolve().parents[1].parent / "shared" / "sd15-arch" / "scheduler" / "scheduler_config.json"
LABEL_PROMPT = "A chest X-ray with Pleural_Thickening and Mass"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "tiny-sd", prompts_words=["Kerley lines"])


@pytest.fixture(scope="module")
def components(tiny_dir):
    return load_components("tiny", tiny_dir)


def test_layout_like_sd15(tiny_dir):
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_dir / sub).is_dir(), sub
    assert (tiny_dir / "model_index.json").is_file()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tiny_dir / "tokenizer" / name).is_file(), name
    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    # no temporary folders left beside the output
    assert [p.name for p in tiny_dir.parent.iterdir()] == [tiny_dir.name]


def test_deterministic(tiny_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    other = build_tiny_pipeline(tmp_path / "again", prompts_words=["Kerley lines"])
    a = UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet").state_dict()
    b = UNet2DConditionModel.from_pretrained(other, subfolder="unet").state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (tiny_dir / "tokenizer" / "vocab.json").read_bytes() == (other / "tokenizer" / "vocab.json").read_bytes()
    assert (tiny_dir / "tokenizer" / "merges.txt").read_bytes() == (other / "tokenizer" / "merges.txt").read_bytes()


def test_rebuild_replaces_existing(tmp_path):
    out = tmp_path / "m"
    build_tiny_pipeline(out, seed=1)
    (out / "stale.txt").write_text("x")
    build_tiny_pipeline(out, seed=1)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_pipeline_generates(tiny_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir)
    assert pipe.vae_scale_factor == 4
    out = pipe(
        LABEL_PROMPT,
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    img = out.images
    assert img.shape == (1, 64, 64, 3)
    assert np.isfinite(img).all()


def test_load_pipeline_helper(tiny_dir):
    pipe = load_pipeline("tiny", tiny_dir)
    assert pipe.safety_checker is None
    assert pipe.unet.config.sample_size == 16


def test_tokenizer_whole_words(tiny_dir):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_dir, subfolder="tokenizer")
    ids = tok(LABEL_PROMPT).input_ids
    pieces = tok.convert_ids_to_tokens(ids)
    # CLIP lowercases and splits punctuation off: x - ray, pleural _ thickening
    assert pieces == [
        "<|startoftext|>", "a</w>", "chest</w>", "x</w>", "-</w>", "ray</w>", "with</w>",
        "pleural</w>", "_</w>", "thickening</w>", "and</w>", "mass</w>", "<|endoftext|>",
    ]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    # every label of both datasets, and words given at build time, are single tokens
    for label in tiny_model.NIH_LABELS + tiny_model.CHEXPERT_LABELS + ("Kerley lines", "and ..."):
        words = label.lower().replace("_", " _ ").split()
        assert len(tok(label, add_special_tokens=False).input_ids) == len(words), label
    # unseen text (and non-ASCII) still tokenizes, via bytes, and round-trips
    text = "zygomatic fracture 12 (ünsure)"
    unseen = tok(text, add_special_tokens=False).input_ids
    assert len(unseen) > len(text.split())
    assert tok.decode(unseen).replace(" ", "") == text.replace(" ", "")
    # SD-style padding to 77
    padded = tok(LABEL_PROMPT, padding="max_length", max_length=tok.model_max_length, truncation=True,
                 return_tensors="pt").input_ids
    assert tok.model_max_length == 77
    assert padded.shape == (1, 77)
    assert padded[0, -1].item() == tok.pad_token_id == tok.eos_token_id


def test_text_encoder_matches_tokenizer(components):
    tok, te = components.tokenizer, components.text_encoder
    assert te.config.vocab_size == len(tok)
    assert te.config.bos_token_id == tok.bos_token_id
    assert te.config.eos_token_id == tok.eos_token_id
    assert te.config.hidden_size == components.unet.config.cross_attention_dim
    ids = tok([LABEL_PROMPT, "no finding"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out = te(ids)
    assert out.last_hidden_state.shape == (2, 77, 32)
    assert torch.isfinite(out.pooler_output).all()


def test_unet_lora_targets_and_training_step(tiny_dir):
    from peft import LoraConfig

    components = load_components("tiny", tiny_dir)  # fresh copy: the adapter is added in place
    unet, vae = components.unet, components.vae
    names = [n for n, _ in unet.named_modules()]
    for target in ("to_q", "to_k", "to_v", "to_out.0"):
        assert any(n.endswith("." + target) for n in names), target
    # cross-attention in the down, mid and up blocks, as in SD 1.5
    for part in ("down_blocks", "mid_block", "up_blocks"):
        assert any(n.startswith(part) and n.endswith("attn2.to_k") for n in names), part
    assert vae.config.scaling_factor == pytest.approx(0.18215)
    assert vae.config.latent_channels == 4

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    trainable = [p for p in unet.parameters() if p.requires_grad]
    assert trainable and sum(p.numel() for p in trainable) < sum(p.numel() for p in unet.parameters())

    # one LoRA training step, SD-style, on 16x16 latents of 64 px images
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.sample(generator=g) * vae.config.scaling_factor
        ids = components.tokenizer(["a chest x-ray with mass"] * 2, padding="max_length", max_length=77,
                                   return_tensors="pt").input_ids
        hidden = components.text_encoder(ids)[0]
    assert latents.shape == (2, 4, 16, 16)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, components.noise_scheduler.config.num_train_timesteps, (2,), generator=g)
    noisy = components.noise_scheduler.add_noise(latents, noise, t)
    pred = unet(noisy, t, hidden).sample
    loss = torch.nn.functional.mse_loss(pred, noise)
    loss.backward()
    assert all(p.grad is not None for p in trainable)


def test_scheduler_matches_sd15(components, tiny_dir):
    from diffusers import DDPMScheduler

    sched = components.noise_scheduler
    assert isinstance(sched, DDPMScheduler)
    expected = base_model.SD15_SCHEDULER_DEFAULTS
    if SD15_SCHEDULER.is_file():
        expected = {k: v for k, v in json.loads(SD15_SCHEDULER.read_text()).items() if not k.startswith("_")}
    saved = json.loads((tiny_dir / "scheduler" / "scheduler_config.json").read_text())
    for key, value in expected.items():
        assert saved[key] == value, key
    for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
                "steps_offset", "clip_sample"):
        assert sched.config[key] == expected[key], key


def test_resolve_pretrained(tmp_path, tiny_dir):
    assert resolve_pretrained("tiny", tiny_dir) == str(tiny_dir)
    assert resolve_pretrained(str(tiny_dir), tmp_path / "nope") == str(tiny_dir)
    assert resolve_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5", tiny_dir) == (
        "stable-diffusion-v1-5/stable-diffusion-v1-5"
    )
    with pytest.raises(ModelNotFoundError, match="build_tiny_model|--build-tiny"):
        resolve_pretrained("tiny", tmp_path / "missing")
    not_a_model = tmp_path / "some_folder"
    not_a_model.mkdir()
    (not_a_model / "weights.ckpt").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="model_index.json"):
        resolve_pretrained(str(not_a_model), tiny_dir)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_pretrained(str(tmp_path / "a" / "b" / "sd15"), tiny_dir)


def test_hub_id_offline_raises_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    repo = "no-such-org-xyz/no-such-sd-model"
    with pytest.raises(ModelNotFoundError) as info:
        load_components(repo, tmp_path / "tiny")
    msg = str(info.value)
    assert f"hf download {repo} --local-dir" in msg
    assert "model.pretrained: tiny" in msg
    assert isinstance(info.value, RuntimeError)
    with pytest.raises(ModelNotFoundError, match="hf download"):
        load_pipeline(repo, tmp_path / "tiny")


def test_a_broken_local_folder_is_named_with_what_to_check(tmp_path):
    """A folder with a model_index.json that diffusers cannot read (no "_class_name", no component
    folders) stops both loaders with the folder's name, never a bare KeyError or OSError."""
    broken = tmp_path / "sd15"
    broken.mkdir()
    (broken / "model_index.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match=r"could not load the Stable Diffusion folder .*sd15.*Is it complete"):
        load_components(str(broken), tmp_path / "tiny")
    with pytest.raises(ModelNotFoundError, match=r"could not load the Stable Diffusion folder .*sd15.*KeyError"):
        load_pipeline(str(broken), tmp_path / "tiny")


def test_check_cli(tiny_dir, tmp_path, monkeypatch, capsys):
    assert build_tiny_model.main(["--check", "tiny", "--tiny-dir", str(tiny_dir)]) == 0
    assert "UNet2DConditionModel" in capsys.readouterr().out
    assert build_tiny_model.main(["--check", "tiny", "--tiny-dir", str(tmp_path / "missing")]) == 2
    assert "--build-tiny" in capsys.readouterr().err


def test_atomic_build(monkeypatch, tmp_path):
    from diffusers import StableDiffusionPipeline

    def boom(self, *args, **kwargs):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(StableDiffusionPipeline, "save_pretrained", boom)
    out = tmp_path / "models" / "tiny-sd"
    with pytest.raises(RuntimeError, match="simulated"):
        build_tiny_pipeline(out)
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # no temporary leftovers either
