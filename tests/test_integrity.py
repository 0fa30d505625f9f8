"""Issue #26, what to build 1 and 3: the LoRA's latent cache and its checkpoints, damaged on disk, are
rebuilt or skipped with a note (the previous checkpoint used), never a traceback, never used."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train_lora import final_weights, run, setup  # noqa: F401 (setup: the module's fixture)

from workflow_scripts.lora.integrity import array_crc, checkpoint_problem
from workflow_scripts.lora.lora_checkpoints import list_checkpoints


def cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def swap_rows(path: Path) -> None:
    array = np.load(path, mmap_mode="r+")
    first = np.array(array[0])
    array[0], array[1] = array[1], first
    array.flush()


def demo_hashes(setup) -> dict[str, str]:  # noqa: F811
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((setup["root"] / "demo").rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(setup) -> dict[str, Path]:  # noqa: F811
    """One finished 4-step run (checkpoints at steps 2 and 4) whose outputs each test copies."""
    out = setup["root"] / "finished"
    summary = run(setup, out)
    return {"out": out, "summary": summary}


def copy_of(finished, tmp_path: Path) -> Path:
    shutil.copytree(finished["out"], tmp_path / "out")
    return tmp_path / "out"


@pytest.mark.parametrize("damage", ["cut latents.npy", "swapped rows of latents.npy", "cut prompts.json"])
def test_a_cut_or_corrupt_latent_cache_is_rebuilt_with_a_note(setup, finished, tmp_path, capsys, damage) -> None:  # noqa: F811
    out = copy_of(finished, tmp_path)
    inputs = demo_hashes(setup)
    [folder] = (out / "cache").glob("latents-*")
    written = np.array(np.load(folder / "latents.npy"))
    {"cut latents.npy": lambda: cut(folder / "latents.npy"),
     "swapped rows of latents.npy": lambda: swap_rows(folder / "latents.npy"),
     "cut prompts.json": lambda: cut(folder / "prompts.json")}[damage]()
    capsys.readouterr()
    again = run(setup, out, "training.max_train_steps=4")  # resumes from step 4: no step, the cache still read
    err = capsys.readouterr().err
    assert f"latent cache {folder}:" in err and "rebuilding it" in err
    assert np.array_equal(np.load(folder / "latents.npy"), written)  # rebuilt as it was
    assert again["resumed_from"].endswith("checkpoint-4")
    assert demo_hashes(setup) == inputs


@pytest.mark.parametrize("damaged_file", ["position.json", "lora_unet.safetensors"])
def test_a_cut_checkpoint_is_skipped_with_a_note_and_the_previous_one_used(
        setup, finished, tmp_path, capsys, damaged_file) -> None:  # noqa: F811
    out = copy_of(finished, tmp_path)
    assert [p.name for p in list_checkpoints(out / "checkpoints")][-2:] == ["checkpoint-2", "checkpoint-4"]
    cut(out / "checkpoints" / "checkpoint-4" / damaged_file)
    capsys.readouterr()
    resumed = run(setup, out)
    err = capsys.readouterr().err
    assert f"checkpoint {out / 'checkpoints' / 'checkpoint-4'} is damaged: {damaged_file}" in err
    assert "using the previous one" in err and resumed["resumed_from"].endswith("checkpoint-2")
    assert (out / "checkpoints" / "checkpoint-4.damaged").is_dir()
    expected = final_weights(finished["out"])
    for name, value in final_weights(out).items():  # continued from step 2, it ends where the straight run ended
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6)


def test_a_damaged_checkpoint_named_by_resume_is_refused_naming_the_file(setup, finished, tmp_path) -> None:  # noqa: F811
    from workflow_scripts.common.errors import TrainingError

    out = copy_of(finished, tmp_path)
    checkpoint = out / "checkpoints" / "checkpoint-2"
    assert checkpoint_problem(checkpoint) is None
    cut(checkpoint / "training_state.pt")
    with pytest.raises(TrainingError, match=r"checkpoint-2: the checkpoint is damaged: training_state.pt does not read back"):
        run(setup, out, resume=str(checkpoint))


def test_array_crc_sees_moved_rows_and_reads_in_chunks(monkeypatch) -> None:
    from workflow_scripts.lora import integrity

    array = np.arange(4 * 5, dtype=np.uint8).reshape(4, 5)
    whole = array_crc(array)
    monkeypatch.setattr(integrity, "CHUNK_BYTES", 5)  # one row per chunk: the same CRC
    assert array_crc(array) == whole
    assert array_crc(array[[1, 0, 2, 3]]) != whole


# ----------------------------------------------------------------------------- NaN latents (round 3, robust-26b)


def test_nan_in_the_cached_latents_is_rebuilt_not_blamed_on_the_learning_rate(setup, finished, tmp_path, capsys) -> None:  # noqa: F811
    from workflow_scripts.lora.integrity import write_latent_check

    out = copy_of(finished, tmp_path)
    inputs = demo_hashes(setup)
    [folder] = (out / "cache").glob("latents-*")
    written = np.array(np.load(folder / "latents.npy"))
    array = np.load(folder / "latents.npy", mmap_mode="r+")
    array[:, 0, 0, 0, 0] = np.nan  # as an fp16 VAE that overflowed would have cached it: the CRC is of these bytes
    array.flush()
    del array
    write_latent_check(folder)
    checkpoints = {p.name: hashlib.sha256((p / "lora_unet.safetensors").read_bytes()).hexdigest()
                   for p in list_checkpoints(out / "checkpoints")}
    capsys.readouterr()
    longer = run(setup, out, "training.max_train_steps=6")  # on main: "loss became nan ... try a lower learning_rate"
    err = capsys.readouterr().err
    assert f"latent cache {folder}: latents.npy holds NaN or infinite values for {len(written)} image(s); rebuilding it" in err
    assert np.array_equal(np.load(folder / "latents.npy"), written) and longer["resumed_from"].endswith("checkpoint-4")
    resumed = out / "checkpoints" / "checkpoint-4" / "lora_unet.safetensors"  # the good checkpoint stays where it was
    assert hashlib.sha256(resumed.read_bytes()).hexdigest() == checkpoints["checkpoint-4"]
    assert not list(out.glob("checkpoints_stale_*")) and demo_hashes(setup) == inputs


@pytest.mark.parametrize("named", [True, False])
def test_a_vae_giving_nan_latents_is_named_with_the_image_before_anything_is_cached(tmp_path, named: bool) -> None:
    from types import SimpleNamespace

    from workflow_scripts.common.errors import TrainingError
    from workflow_scripts.lora.latent_cache import encode_latent_cache

    class OverflowingVae:  # an fp16 VAE that overflows on one film
        dtype = torch.float16

        def encode(self, pixels):
            mean = torch.zeros(len(pixels), 4, 2, 2)
            mean[1, 0, 0, 0] = float("inf")
            return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, std=torch.ones_like(mean)))

    def batches(rows):  # train_lora's batches name their images; the benchmark's do not
        names = [[f"films/{i}.png" for i in rows]] if named else []
        yield torch.zeros(len(rows), 3, 16, 16), ["A chest X-ray with Mass"] * len(rows), *names

    shown = "films/1.png" if named else "image 1 of the split (file order)"
    with pytest.raises(TrainingError, match=rf"NaN or infinite latents for 1 image\(s\) of a batch \({re.escape(shown)}\).*"
                                            r"not the learning rate"):
        encode_latent_cache(OverflowingVae(), batches, 3, 3, tmp_path / "latents-x", (4, 2, 2), torch.device("cpu"))
    assert not (tmp_path / "latents-x").exists()  # on main: cached, then every loss NaN
