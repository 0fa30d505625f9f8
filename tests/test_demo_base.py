"""The demo's pretrained base: the shipped copy is intact and loads like SD 1.5, and the command that
rebuilds it from scratch runs its first steps and records a fingerprint that it then checks."""

from __future__ import annotations

import json

from workflow_scripts.models import demo_base
from workflow_scripts.models.base_model import load_components
from workflow_scripts.models.demo_base import FINGERPRINT_FILE, SHIPPED_DIR, verify_fingerprint


def test_shipped_base_matches_its_fingerprint_and_fits_the_repository() -> None:
    assert verify_fingerprint(SHIPPED_DIR) == []
    record = json.loads((SHIPPED_DIR / FINGERPRINT_FILE).read_text())
    assert record["bytes"] <= 10 * 2**20
    assert set(record["files"]) >= {"model_index.json", "unet/diffusion_pytorch_model.safetensors",
                                    "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                                    "tokenizer/vocab.json", "scheduler/scheduler_config.json"}
    # what it was made of and how long it took, for whoever rebuilds it
    assert record["recipe"]["caption"] == "A chest X-ray" and record["seconds"]["unet"] > 0


def test_shipped_base_loads_through_the_sd15_code_path() -> None:
    components = load_components(str(SHIPPED_DIR))
    assert components.kind == "local"
    assert type(components.unet).__name__ == "UNet2DConditionModel"
    assert type(components.vae).__name__ == "AutoencoderKL"
    # the VAE was trained: its latent scaling is measured, not SD's constant
    assert components.vae.config.scaling_factor != 0.18215


def test_a_changed_file_breaks_the_fingerprint(tmp_path, capsys) -> None:
    import shutil

    copy = tmp_path / "base"
    shutil.copytree(SHIPPED_DIR, copy)
    vocab = copy / "tokenizer" / "vocab.json"
    vocab.write_text(vocab.read_text().replace('"a</w>"', '"b</w>"', 1))
    assert verify_fingerprint(copy) == ["tokenizer/vocab.json"]
    assert demo_base.main(["--out", str(copy), "--verify"]) == 2
    assert "tokenizer/vocab.json" in capsys.readouterr().err


def test_the_rebuild_command_runs_its_first_steps(tmp_path) -> None:
    out = tmp_path / "demo-base"
    small = ["--films", "24", "--vae-steps", "2", "--unet-steps", "2", "--caption-steps", "2", "--vae-batch", "4",
             "--unet-batch", "4", "--threads", "1"]
    assert demo_base.main(["--out", str(out), *small]) == 0
    record = json.loads((out / FINGERPRINT_FILE).read_text())
    assert record["recipe"]["films"] == 24 and len(record["unet_loss_every_50"]) == len(record["caption_loss_every_50"]) == 2
    assert set(record["seconds"]) == {"draw_films", "vae", "unet", "captions"}
    # captions say how a film looks, never what it shows
    assert all(caption.startswith("A chest X-ray") and not any(label in caption for label in demo_base_labels())
               for caption in record["captions"])
    assert verify_fingerprint(out) == []
    assert demo_base.main(["--out", str(out), "--verify"]) == 0
    components = load_components(str(out))
    assert components.unet.config.block_out_channels == list(demo_base.Recipe().unet_blocks)

    # --resume runs only the caption phase on a base of the same recipe, and keeps the record of the rest
    again = tmp_path / "resumed"
    assert demo_base.main(["--out", str(again), "--resume", str(out), *small]) == 0
    resumed = json.loads((again / FINGERPRINT_FILE).read_text())
    assert resumed["resumed_from"] == str(out) and resumed["seconds"]["vae"] == record["seconds"]["vae"]
    assert demo_base.main(["--out", str(tmp_path / "x"), "--resume", str(out), *small[:-2], "--threads", "1",
                           "--seed", "5"]) == 2  # another recipe: refused


def demo_base_labels() -> list[str]:
    from workflow_scripts.data.phantom import LABELS

    return list(LABELS)
