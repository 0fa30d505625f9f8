"""Generation stage: synthetic chest X-rays per label from the trained LoRA.

    python -m workflow_scripts.generate_xrays --checkpoint results/lora/final --label Mass --num-images 20
    python -m workflow_scripts.generate_xrays --checkpoint results/lora/checkpoint-500 --prompt "A chest X-ray with Edema"
    python -m workflow_scripts.generate_xrays --checkpoint results/lora/final --generate-all-labels

`--checkpoint` alone suffices: the checkpoint records the base model it was trained on
(`--pretrained-model` overrides). Images go to `<output-dir>/<key>/<key>_<0000>.png` (8-bit grayscale
at the model resolution), where key is the label (`No_Finding`) or combination (`Effusion+Mass`),
with `generation_results.csv` beside them: file, prompt, labels, seed, steps, guidance, scheduler,
checkpoint, dtype, device (the same settings give the same image on the same kind of device and
dtype). The LoRA is fused into the base weights (in fp32, then cast to the sampling dtype), so
sampling costs what the base model costs. Every image has its own recorded seed, so any one image can be regenerated alone, and
a re-run makes only the images that are missing. Sampling settings default to the config's
`generation:` section; flags override them.
"""

from __future__ import annotations

import argparse
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

from workflow_scripts.base_model import ModelNotFoundError, load_pipeline, make_scheduler
from workflow_scripts.config import ConfigError, add_config_arguments, config_from_args
from workflow_scripts.faults import maybe_fail
from workflow_scripts.labels import DataError
from workflow_scripts.lora_training import LORA_FILE
from workflow_scripts.tables import LABEL_JOIN, RESULT_COLUMNS, label_counts, load_split, make_prompt, save_png_atomically
from workflow_scripts.study import pool_size_needed

PLAN_COLUMNS = ["key", "labels", "prompt", "count"]
KEY_JOIN = "+"


class GenerationError(RuntimeError):
    """Generation cannot run as asked; the message says what to change."""


# ----------------------------------------------------------------------------- what to generate


def label_key(labels: Sequence[str]) -> str:
    """["Effusion", "No Finding"] -> "Effusion+No_Finding": a file- and wildcard-safe name."""
    return KEY_JOIN.join(re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_") for label in labels)


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


def load_generator(checkpoint: Path, pretrained: str | None, tiny_dir: Path, scheduler: str,
                   hardware: dict[str, Any], dtype: torch.dtype, device: torch.device):
    """The base pipeline with the LoRA fused into its weights; refuses a LoRA that does not fit the base model.

    Loaded and fused in fp32 (the LoRA delta added once to full-precision weights), then cast to
    the sampling dtype, and the adapter layers removed: no LoRA call per UNet step."""
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
    if device.type == "cuda" and hardware["compile_sampling"]:
        from workflow_scripts.lora_training import compile_settings

        compile_settings()
        pipe.unet.compile()
    return pipe, base, lora_dir


GENERATION_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def generation_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The sampling dtype: fp32 on CPU (half precision there is slow and gains nothing); on a GPU the
    `generation.dtype` key, whose `auto` is bf16 where supported, else fp16, whatever the training precision."""
    if device.type != "cuda":
        return torch.float32
    if setting == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return GENERATION_DTYPES[setting]


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
        with torch.inference_mode():
            images = pipe([prompt] * len(batch), negative_prompt=[negative_prompt] * len(batch) if negative_prompt else None,
                          num_inference_steps=steps, guidance_scale=guidance, height=resolution, width=resolution,
                          generator=generators, output_type="np").images
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
    results.to_csv(key_dir / "generation_results.csv", index=False)
    return results


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def merge_results(csvs: Sequence[Path], merged: Path) -> pd.DataFrame:
    frames = [pd.read_csv(csv, dtype={"labels": str, "prompt": str}) for csv in csvs]
    result = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=RESULT_COLUMNS)
    merged.parent.mkdir(parents=True, exist_ok=True)
    result.to_csv(merged, index=False)
    return result


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--label", help="a label or combination key (Mass, No_Finding, Effusion+Mass)")
    what.add_argument("--prompt", help="a free prompt (labels taken from it where it is a label prompt)")
    what.add_argument("--generate-all-labels", action="store_true",
                      help="every label, and every label combination of the training split")
    what.add_argument("--write-plan", type=Path, metavar="CSV", help="only write the generation plan from config")
    what.add_argument("--merge", nargs="*", type=Path, metavar="CSV", help="only merge per-label result CSVs into --output-dir")
    parser.add_argument("--checkpoint", type=Path, default=Path("results/lora/final"), help="final/ or checkpoint-N/ folder")
    parser.add_argument("--pretrained-model", help="base model (default: the one the checkpoint records)")
    parser.add_argument("--plan", type=Path, help="plan CSV to take the image count from (the rule passes it)")
    parser.add_argument("--num-images", type=int, help="images per label (default: the plan from config)")
    parser.add_argument("--num-inference-steps", type=int, help="sampling steps (config generation.num_inference_steps; 50)")
    parser.add_argument("--guidance-scale", type=float, help="classifier-free guidance (generation.guidance_scale; 7.5)")
    parser.add_argument("--scheduler", choices=["ddim", "dpmsolver++", "euler", "euler_a", "pndm"])
    parser.add_argument("--negative-prompt")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seed", type=int, help="base seed (generation.seed)")
    parser.add_argument("--data-dir", type=Path, default=Path("results/data"), help="prepared splits (for plans)")
    parser.add_argument("--tiny-dir", type=Path, default=Path("results/models/tiny-sd"))
    parser.add_argument("--output-dir", type=Path, default=Path("results/synthetic"))
    args = parser.parse_args(argv)
    try:
        stage = "plan_generation" if args.write_plan else "merge_generation" if args.merge is not None else "generate_label"
        return run(args, config_from_args(args, stage))
    except (ConfigError, DataError, GenerationError, ModelNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace, config: dict[str, Any]) -> int:
    if args.merge is not None:
        merged = merge_results(args.merge, args.output_dir / "generation_results.csv")
        print(f"merged {len(merged)} images from {len(args.merge)} label(s) into {args.output_dir / 'generation_results.csv'}")
        return 0
    if args.write_plan:
        plan = generation_plan(config, load_split(args.data_dir, "train"))
        args.write_plan.parent.mkdir(parents=True, exist_ok=True)
        plan.to_csv(args.write_plan, index=False)
        print(f"plan: {int(plan['count'].sum())} images over {len(plan)} label(s) -> {args.write_plan}")
        return 0

    lora_checkpoint(args.checkpoint)  # a folder without LoRA weights fails first, before any data is read
    vocabulary, settings = config["dataset"]["labels"], config["generation"]

    # Which keys, with what prompt and count.
    if args.prompt:
        match = re.fullmatch(re.escape(config["prompt"]["template"]).replace(r"\{labels\}", "(.+)"), args.prompt)
        try:
            labels = parse_labels(match.group(1).replace(" and ", "+"), vocabulary) if match else []
        except GenerationError:
            labels = []
        jobs = [(label_key(labels) if labels else "custom", labels, args.prompt)]
    elif args.label:
        labels = parse_labels(args.label, vocabulary)
        jobs = [(label_key(labels), labels, make_prompt(labels, config["prompt"]["template"]))]
    else:
        plan = generation_plan({**config, "generation": {**settings, "all_label_combinations": True}} if args.generate_all_labels
                               else config, load_split(args.data_dir, "train"))
        jobs = [(row.key, row.labels.split(LABEL_JOIN), row.prompt) for row in plan.itertuples()]
    counts = {}
    if args.num_images is None:
        plan = pd.read_csv(args.plan) if args.plan else generation_plan(
            {**config, "generation": {**settings, "all_label_combinations": True}}, load_split(args.data_dir, "train"))
        counts = dict(zip(plan["key"], plan["count"]))
    fallback = settings["images_per_label"]

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scheduler = args.scheduler or settings["scheduler"]
    dtype = generation_dtype(settings["dtype"], device)
    pipe, base, lora_dir = load_generator(args.checkpoint, args.pretrained_model, args.tiny_dir, scheduler,
                                          config["hardware"], dtype, device)
    print(f"base model {base}, LoRA {lora_dir} (fused), scheduler {scheduler}, device {device}, dtype {dtype}", file=sys.stderr)
    total = 0
    for key, labels, prompt in jobs:
        count = args.num_images if args.num_images is not None else int(counts.get(key, fallback))
        results = generate_key(
            pipe, key, labels, prompt, count, args.output_dir,
            steps=args.num_inference_steps or settings["num_inference_steps"],
            guidance=args.guidance_scale if args.guidance_scale is not None else settings["guidance_scale"],
            scheduler=scheduler, seed=args.seed if args.seed is not None else settings["seed"],
            batch_size=args.batch_size or settings["batch_size"],
            negative_prompt=args.negative_prompt if args.negative_prompt is not None else settings["negative_prompt"],
            resolution=config["model"]["resolution"], checkpoint=str(lora_dir),
        )
        total += len(results)
    print(f"{total} images in {args.output_dir} ({len(jobs)} label(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
