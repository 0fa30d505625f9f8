"""Generation: synthetic chest X-rays per label from the trained LoRA, as three steps that take plain
values, one per rule: `write_plan` (labels and counts from the training split), `generate` (the
images of some keys) and `merge` (one list of every image). The CLIs are `plan_generation`,
`generate_xrays` and `merge_generation`.

Images go to `<output-dir>/<key>/<key>_<0000>.png` (8-bit grayscale at the model resolution), where
key is the label (`No_Finding`) or combination (`Effusion+Mass`), with `generation_results.csv`
beside them: file, prompt, labels, seed, steps, guidance, scheduler, checkpoint, dtype, device (the
same settings give the same image on the same kind of device and dtype). The LoRA is fused into the
base weights (in fp32, then cast to the sampling dtype; the VAE stays fp32 under fp16, where SD's VAE
overflows), so sampling costs what the base model costs. Every image has its own recorded seed, so
any one image can be regenerated alone, and a re-run makes only the images that are missing.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from workflow_scripts.models.base_model import load_pipeline, make_scheduler
from workflow_scripts.common.errors import GenerationError
from workflow_scripts.common.faults import maybe_fail
from workflow_scripts.common.hardware import DTYPES, apply_cuda_levers, compile_settings
from workflow_scripts.lora.lora_checkpoints import LORA_FILE
from workflow_scripts.common.tables import (LABEL_JOIN, RESULT_COLUMNS, file_key, label_counts, load_split, make_prompt,
                                            save_png_atomically)
from workflow_scripts.study.design import pool_size_needed

PLAN_COLUMNS = ["key", "labels", "prompt", "count"]
KEY_JOIN = "+"


# ----------------------------------------------------------------------------- what to generate


def label_key(labels: Sequence[str]) -> str:
    """["Effusion", "No Finding"] -> "Effusion+No_Finding": a file- and wildcard-safe name, unique per
    label set (tables.file_key: a label of any script gets a hashed ASCII key)."""
    return KEY_JOIN.join(file_key(label) for label in labels)


def parse_labels(text: str, vocabulary: Sequence[str]) -> list[str]:
    """A key (`Effusion+Mass`, `No_Finding`) or label text (`No Finding`) -> labels in vocabulary order."""
    by_key = {label_key([label]): label for label in vocabulary}
    parts = [part.strip() for part in re.split(r"[+|]", text) if part.strip()]
    labels = []
    for part in parts:
        label = part if part in vocabulary else by_key.get(part)
        if label is None:
            raise GenerationError(f"unknown label {part!r}; known labels (dataset.labels): {list(vocabulary)}")
        labels.append(label)
    if "No Finding" in labels and len(labels) > 1:
        raise GenerationError(f"'No Finding' cannot be combined with findings: {text!r}")
    return sorted(set(labels), key=list(vocabulary).index)


def generation_plan(config: dict[str, Any], train: pd.DataFrame) -> pd.DataFrame:
    """How many images each label (and, if asked, each label combination of the training split) gets.

    `fixed`: `images_per_label` each. `balance`: enough that real + synthetic reaches
    `target_per_label`, so the rarest labels get the most. Either way the total covers the largest
    arm's draw times `classifier.pool_headroom` (study.pool_size_needed), so that every seed of that
    arm draws a different subset; every label gets an equal share of any shortfall. Labels with no
    training image get no row."""
    vocabulary, settings = config["dataset"]["labels"], config["generation"]
    # A label without training images (allowed only by dataset.allow_absent_labels) gets none: its
    # prompt was never seen by the LoRA, so its images would be unlabelled noise.
    present = set(label_counts(train))
    groups = [[label] for label in vocabulary if label in present]
    if settings["all_label_combinations"]:
        combos = sorted({labels for labels in train["labels"] if LABEL_JOIN in labels})
        groups += [labels.split(LABEL_JOIN) for labels in combos]
    single_counts = Counter(label_counts(train))
    combo_counts = Counter(train["labels"])
    rows = []
    for labels in groups:
        if settings["plan"] == "fixed":
            count = settings["images_per_label"]
        else:
            real = single_counts[labels[0]] if len(labels) == 1 else combo_counts[LABEL_JOIN.join(labels)]
            count = max(0, settings["target_per_label"] - real)
        rows.append({"key": label_key(labels), "labels": LABEL_JOIN.join(labels),
                     "prompt": make_prompt(labels, config["prompt"]["template"]), "count": count})
    plan = pd.DataFrame(rows, columns=PLAN_COLUMNS)
    # Enough images for the largest synthetic arm, with headroom, spread evenly.
    needed = pool_size_needed(config, len(train))
    shortfall = needed - int(plan["count"].sum())
    if shortfall > 0:
        plan["count"] += -(-shortfall // len(plan))
    return plan


def image_seed(base_seed: int, key: str, index: int) -> int:
    """A stable per-image seed: the same image comes out whatever else is generated with it."""
    digest = hashlib.sha256(f"{base_seed}/{key}/{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


# ----------------------------------------------------------------------------- the model


def lora_checkpoint(path: Path) -> tuple[Path, str | None]:
    """The LoRA file in a `final/` or `checkpoint-N/` folder, and the base model recorded beside it."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        path = path.parent
    if not (path / LORA_FILE).is_file():
        raise GenerationError(f"{path}: no {LORA_FILE} here; pass results/lora/final or a results/lora/checkpoints/checkpoint-N folder")
    base = None
    if (path / "training_summary.json").is_file():
        base = json.loads((path / "training_summary.json").read_text()).get("base_model")
    elif (path / "position.json").is_file():
        base = json.loads((path / "position.json").read_text())["fingerprint"].get("base_model")
    return path, base


def load_generator(checkpoint: Path | None, pretrained: str | None, tiny_dir: Path, scheduler: str,
                   hardware: dict[str, Any], dtype: torch.dtype, device: torch.device):
    """The base pipeline with the LoRA fused into its weights; refuses a LoRA that does not fit the base model.
    `checkpoint` None: the base alone (the LoRA-off control), `pretrained` required.

    Loaded and fused in fp32 (the LoRA delta added once to full-precision weights), then cast to
    the sampling dtype, and the adapter layers removed: no LoRA call per UNet step."""
    if checkpoint is None:
        pipe = load_pipeline(pretrained, tiny_dir, torch.float32)
        return finish_pipeline(pipe, scheduler, hardware, dtype, device), pretrained, None
    lora_dir, recorded_base = lora_checkpoint(checkpoint)
    base = pretrained or recorded_base
    if base is None:
        raise GenerationError(f"{lora_dir} does not record its base model; pass --pretrained-model")
    pipe = load_pipeline(base, tiny_dir, torch.float32)
    try:
        pipe.load_lora_weights(lora_dir, weight_name=LORA_FILE)
    except (ValueError, RuntimeError, KeyError) as error:
        raise GenerationError(f"the LoRA in {lora_dir} (trained on {recorded_base}) does not fit base model {base}: "
                              f"{str(error).splitlines()[0][:300]}") from None
    if not getattr(pipe.unet, "peft_config", None):
        raise GenerationError(f"no weight of the LoRA in {lora_dir} matched base model {base}: it was trained on {recorded_base}")
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # keeps the fused weights, drops the adapter layers
    return finish_pipeline(pipe, scheduler, hardware, dtype, device), base, lora_dir


def finish_pipeline(pipe, scheduler: str, hardware: dict[str, Any], dtype: torch.dtype, device: torch.device):
    """The sampling scheduler, memory levers, device and dtype of a loaded pipeline."""
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    if hardware["enable_attention_slicing"]:
        pipe.enable_attention_slicing()
    if hardware["enable_vae_slicing"]:
        pipe.vae.enable_slicing()
    if hardware["enable_xformers"]:
        pipe.enable_xformers_memory_efficient_attention()
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if dtype != torch.float32:
        pipe = pipe.to(dtype=dtype)
    if dtype == torch.float16:
        pipe.vae.to(dtype=torch.float32)  # SD's VAE overflows in fp16 (as in training); generate_key decodes in fp32
    if device.type == "cuda" and hardware["compile_sampling"]:
        compile_settings()
        pipe.unet.compile()
    return pipe


def generation_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The sampling dtype: fp32 on CPU (half precision there is slow and gains nothing); on a GPU the
    `generation.dtype` key, whose `auto` is bf16 where supported, else fp16, whatever the training precision."""
    if device.type != "cuda":
        return torch.float32
    if setting == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return DTYPES[setting]


# ----------------------------------------------------------------------------- sampling


def to_grayscale_uint8(image: np.ndarray) -> np.ndarray:
    """Pipeline output (H, W, 3) in [0, 1] -> (H, W) uint8."""
    return (np.clip(image, 0, 1).mean(axis=-1) * 255).round().astype(np.uint8)


def generate_key(pipe, key: str, labels: list[str], prompt: str, count: int, out_dir: Path, *, steps: int,
                 guidance: float, scheduler: str, seed: int, batch_size: int, negative_prompt: str,
                 resolution: int, checkpoint: str) -> pd.DataFrame:
    """Make the missing images of one key and write its generation_results.csv (all `count` images)."""
    key_dir = out_dir / key
    key_dir.mkdir(parents=True, exist_ok=True)
    for stale in key_dir.glob("*.partial"):
        stale.unlink()
    files = [key_dir / f"{key}_{index:04d}.png" for index in range(count)]
    seeds = [image_seed(seed, key, index) for index in range(count)]
    missing = [index for index, file in enumerate(files) if not file.is_file()]
    device = pipe.device
    progress = tqdm(total=len(missing), desc=f"generating {key}", unit="img", file=sys.stderr)
    started = time.perf_counter()
    for start in range(0, len(missing), batch_size):
        batch = missing[start:start + batch_size]
        generators = [torch.Generator(device=device).manual_seed(seeds[index]) for index in batch]
        images = sample(pipe, [prompt] * len(batch), [negative_prompt] * len(batch) if negative_prompt else None,
                        steps=steps, guidance=guidance, resolution=resolution, generators=generators)
        for index, image in zip(batch, images):
            save_png_atomically(to_grayscale_uint8(image), files[index])
            maybe_fail("image_saved")
        progress.update(len(batch))
        progress.set_postfix(img_s=f"{progress.n / max(time.perf_counter() - started, 1e-9):.2f}")
    progress.close()
    results = pd.DataFrame({
        "file": [str(file) for file in files], "prompt": prompt, "labels": LABEL_JOIN.join(labels), "seed": seeds,
        "steps": steps, "guidance": guidance, "scheduler": scheduler, "checkpoint": checkpoint,
        "dtype": str(pipe.unet.dtype).removeprefix("torch."), "device": device_name(device),
    }, columns=RESULT_COLUMNS)
    partial = key_dir / "generation_results.csv.partial"  # written whole or not at all
    results.to_csv(partial, index=False)
    partial.replace(key_dir / "generation_results.csv")
    return results


@torch.inference_mode()
def sample(pipe, prompts: list[str], negative_prompts: list[str] | None, *, steps: int, guidance: float,
           resolution: int, generators: list[torch.Generator]) -> np.ndarray:
    """Images (N, H, W, 3) in [0, 1]. With the VAE in another dtype than the UNet (fp32 beside an fp16
    UNet), the pipeline stops at the latents and they are decoded here in the VAE's dtype."""
    split_decode = pipe.vae.dtype != pipe.unet.dtype
    output = pipe(prompts, negative_prompt=negative_prompts, num_inference_steps=steps, guidance_scale=guidance,
                  height=resolution, width=resolution, generator=generators, output_type="latent" if split_decode else "np")
    if not split_decode:
        return output.images
    vae = pipe.vae
    decoded = vae.decode(output.images.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(decoded, output_type="np")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


# ----------------------------------------------------------------------------- the three steps


def write_plan(config: dict[str, Any], train_csv: Path, plan_csv: Path) -> pd.DataFrame:
    """Step 1 (rule plan_generation): the plan from config and the training split, written to `plan_csv`."""
    plan = generation_plan(config, load_split({"train": train_csv}, "train"))
    plan_csv.parent.mkdir(parents=True, exist_ok=True)
    plan.to_csv(plan_csv, index=False)
    return plan


def prompt_job(config: dict[str, Any], prompt: str) -> tuple[str, list[str], str]:
    """A free prompt as a job: keyed by its labels where it is a label prompt, else `custom`."""
    match = re.fullmatch(re.escape(config["prompt"]["template"]).replace(r"\{labels\}", "(.+)"), prompt)
    try:
        labels = parse_labels(match.group(1).replace(" and ", "+"), config["dataset"]["labels"]) if match else []
    except GenerationError:
        labels = []
    return label_key(labels) if labels else "custom", labels, prompt


def label_job(config: dict[str, Any], label: str) -> tuple[str, list[str], str]:
    labels = parse_labels(label, config["dataset"]["labels"])
    return label_key(labels), labels, make_prompt(labels, config["prompt"]["template"])


#: The `checkpoint` column of images drawn by the base model alone (the LoRA-off control).
NO_LORA = "none (base without LoRA)"


def generate(config: dict[str, Any], jobs: Sequence[tuple[str, list[str], str, int]], checkpoint: Path | None, output_dir: Path, *,
             tiny_dir: Path, pretrained: str | None = None, sampling: dict[str, Any] | None = None) -> int:
    """Step 2 (rule generate_label): the missing images of each (key, labels, prompt, count) job.
    `sampling` overrides keys of the config's `generation:` section (num_inference_steps,
    guidance_scale, scheduler, seed, batch_size, negative_prompt). `checkpoint` None: the base model
    (`pretrained`, else model.pretrained) without LoRA. Returns the number of images listed."""
    settings = {**config["generation"], **{key: value for key, value in (sampling or {}).items() if value is not None}}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = generation_dtype(settings["dtype"], device)
    hardware, cuda = config["hardware"], device.type == "cuda"
    # The same levers as training (off on CPU); sampling is never asked to be bit-deterministic across kernels.
    with apply_cuda_levers(cuda and hardware["allow_tf32"], cuda and hardware["cudnn_benchmark"]):
        if checkpoint is None:
            pretrained = pretrained or config["model"]["pretrained"]
        pipe, base, lora_dir = load_generator(checkpoint, pretrained, tiny_dir, settings["scheduler"], hardware, dtype, device)
        lora = f"{lora_dir} (fused)" if lora_dir else "none"
        print(f"base model {base}, LoRA {lora}, scheduler {settings['scheduler']}, device {device}, dtype {dtype}",
              file=sys.stderr)
        total = 0
        for key, labels, prompt, count in jobs:
            results = generate_key(
                pipe, key, labels, prompt, count, output_dir, steps=settings["num_inference_steps"],
                guidance=settings["guidance_scale"], scheduler=settings["scheduler"], seed=settings["seed"],
                batch_size=settings["batch_size"], negative_prompt=settings["negative_prompt"],
                resolution=config["model"]["resolution"], checkpoint=str(lora_dir) if lora_dir else NO_LORA)
            total += len(results)
    return total


def key_results_problem(csv: Path, count: int | None) -> str | None:
    """What shows a key's generation_results.csv cut short or damaged (generate_key writes it whole,
    `count` rows, ending in a newline), or None. `count`: the plan's, where known."""
    data = csv.read_bytes()
    if not data.endswith(b"\n"):
        return "its last line ends without a line break, so it was cut short"
    try:
        frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        return f"it is not a readable CSV ({str(error).splitlines()[0]})"
    if list(frame.columns) != RESULT_COLUMNS:
        return f"its columns are {list(frame.columns)}, not {RESULT_COLUMNS}"
    empty = frame.index[(frame.drop(columns=["labels", "prompt"]) == "").any(axis=1)]  # labels: "" for a free prompt
    if len(empty):
        return f"line {empty[0] + 2} has empty cells"
    if count is not None and len(frame) != count:
        return f"it lists {len(frame)} images where the plan (results/synthetic/plan.csv) asks for {count}"
    return None


def merge(csvs: Sequence[Path], merged: Path, counts: dict[str, int] | None = None) -> pd.DataFrame:
    """Step 3 (rule merge_generation): every key's generation_results.csv in one list, in the order
    given. A list cut short or damaged is refused naming it and what re-makes it: its few rows
    missing would otherwise surface only as a pool too small for an arm. `counts`: the plan's per key."""
    for csv in csvs:
        problem = key_results_problem(Path(csv), None if counts is None else counts.get(Path(csv).parent.name))
        if problem:
            raise GenerationError(
                f"{csv}: {problem}; the list is damaged, not the generation settings. Delete it and re-run the "
                f"workflow: Snakemake re-runs generate_label for {Path(csv).parent.name}, which keeps the images this LoRA "
                "and these settings made and writes the list again")
    frames = [pd.read_csv(csv, dtype={"labels": str, "prompt": str}) for csv in csvs]
    result = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=RESULT_COLUMNS)
    merged.parent.mkdir(parents=True, exist_ok=True)
    result.to_csv(merged, index=False)
    return result
