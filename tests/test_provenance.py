"""Issue #26, what to build 1: a generated image is kept only when the LoRA, the base model, the prompt
and the sampling settings that made it are those of the re-run; otherwise it is made again."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file
from test_generate_xrays import generate, pixels, trained  # noqa: F401 (trained: the module's fixture)

from workflow_scripts.lora.lora_checkpoints import LORA_FILE
from workflow_scripts.generation.provenance import PROVENANCE_FILE


def tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def retrained(trained, tmp_path: Path) -> Path:  # noqa: F811
    """A copy of the final LoRA with other weights: what training again with other settings gives."""
    folder = tmp_path / "retrained"
    shutil.copytree(trained["root"] / "lora" / "final", folder)
    weights = load_file(folder / LORA_FILE)
    save_file({name: tensor * 3 for name, tensor in weights.items()}, folder / LORA_FILE)
    return folder


def images(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: pixels(p) for p in sorted(folder.glob("*.png"))}


def assert_all_remade(before: dict[str, np.ndarray], after: dict[str, np.ndarray], fresh: dict[str, np.ndarray]) -> None:
    assert before.keys() == after.keys() == fresh.keys() and after
    for name in after:
        assert not np.array_equal(before[name], after[name]), f"{name} kept the old pixels"
        assert np.array_equal(after[name], fresh[name]), f"{name} is not the image the new settings make"


@pytest.mark.slow  # the full suite's (the quick tier stays under 3 minutes)
def test_a_retrained_lora_keeps_none_of_the_old_loras_images(trained, tmp_path) -> None:  # noqa: F811
    out, new_lora = tmp_path / "out", retrained(trained, tmp_path)
    final = trained["root"] / "lora" / "final"
    inputs = tree_hashes(final), tree_hashes(new_lora)
    generate(trained, out, "--label", "Mass", "--num-images", "3")
    before = images(out / "Mass")
    new = ["--checkpoint", str(new_lora), "--label", "Mass", "--num-images", "3"]
    generate(trained, out, *new)
    generate(trained, tmp_path / "fresh", *new)
    assert_all_remade(before, images(out / "Mass"), images(tmp_path / "fresh" / "Mass"))
    assert json.loads((out / "Mass" / PROVENANCE_FILE).read_text()) == json.loads(
        (tmp_path / "fresh" / "Mass" / PROVENANCE_FILE).read_text())
    assert (tree_hashes(final), tree_hashes(new_lora)) == inputs  # no input file changed


# One setting in the quick tier; each of the others regenerates the same images the same way (slow tier).
@pytest.mark.parametrize("flag, value", [("--seed", "5"), *(pytest.param(*case, marks=pytest.mark.slow) for case in (
    ("--num-inference-steps", "2"), ("--guidance-scale", "2.0"), ("--scheduler", "ddim"), ("--negative-prompt", "blurry")))])
def test_a_changed_sampling_setting_remakes_every_image(trained, tmp_path, flag, value) -> None:  # noqa: F811
    out = tmp_path / "out"
    generate(trained, out, "--label", "Effusion", "--num-images", "2")
    before = images(out / "Effusion")
    generate(trained, out, "--label", "Effusion", "--num-images", "2", flag, value)
    generate(trained, tmp_path / "fresh", "--label", "Effusion", "--num-images", "2", flag, value)
    assert_all_remade(before, images(out / "Effusion"), images(tmp_path / "fresh" / "Effusion"))


def test_a_rerun_with_nothing_changed_remakes_none(trained, tmp_path, capsys) -> None:  # noqa: F811
    out = tmp_path / "out"
    generate(trained, out, "--label", "Mass", "--num-images", "2")
    made = {p.name: p.stat().st_mtime_ns for p in (out / "Mass").glob("*.png")}
    capsys.readouterr()
    generate(trained, out, "--label", "Mass", "--num-images", "3")  # one more image: the two kept
    assert {name: (out / "Mass" / name).stat().st_mtime_ns for name in made} == made
    assert len(list((out / "Mass").glob("*.png"))) == 3 and "made again" not in capsys.readouterr().err


def test_images_without_a_record_are_made_again_with_a_note(trained, tmp_path, capsys) -> None:  # noqa: F811
    out = tmp_path / "out"
    generate(trained, out, "--label", "Mass", "--num-images", "2", "--seed", "9")
    (out / "Mass" / PROVENANCE_FILE).unlink()  # a folder of an older version: what made its images is unknown
    generate(trained, tmp_path / "other", "--label", "Mass", "--num-images", "2")
    for name in ("Mass_0000.png", "Mass_0001.png"):  # other images put in place of the folder's own
        shutil.copy(tmp_path / "other" / "Mass" / name, out / "Mass" / name)
    capsys.readouterr()
    generate(trained, out, "--label", "Mass", "--num-images", "2", "--seed", "9")
    assert "Mass: 2 existing image(s) were not made by this LoRA and these settings (no provenance record)" \
        in capsys.readouterr().err
    generate(trained, tmp_path / "fresh", "--label", "Mass", "--num-images", "2", "--seed", "9")
    after, fresh = images(out / "Mass"), images(tmp_path / "fresh" / "Mass")
    assert all(np.array_equal(after[name], fresh[name]) for name in fresh)
