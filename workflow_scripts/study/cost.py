"""Cost before a run: the work a configuration implies, stage by stage, and a time range on a named GPU.

    python -m workflow_scripts.study.cost --config config/nih_chestxray14.yaml --gpu h100 --utilisation 0.4 \\
        --train-images 10000 --val-images 11200 --test-images 22400
    python -m workflow_scripts.study.cost --config config/config.yaml --data-dir results/data  # prepared splits
    snakemake estimate_cost      # results/cost.md, after prepare_dataset (not part of `all`)

Per stage: images, optimizer steps, sampling steps, classifier runs, image decodes and counted TFLOP.
FLOP per image are counted with FlopCounterMode (workflow_scripts/study/flops.py) on the SD 1.5
architecture and the timm classifier; the counts for the usual sizes are stored below (re-counted by
tests/test_cost.py) and any other size is counted on the meta device in seconds. Time = TFLOP /
(the GPU's dense bf16 peak x utilisation), given as a range from the stated utilisation down to
half of it; the classifier and the audit also decode images on the CPU (`--decode-ms` per image
per core over `--cores`), and a stage takes the longer of the two.

Split sizes come from the prepared splits (`--data-dir`, exact; the generation plan then follows
the per-label counts) or from `--train-images/--val-images/--test-images` (the generation pool is
then its lower bound, the largest arm's draw x classifier.pool_headroom).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workflow_scripts.common import paths
from workflow_scripts.common.errors import ConfigError, DataError, run_stage
from workflow_scripts.study import design as study
from workflow_scripts.study.arms import arm_names
from workflow_scripts.classifier.classifier_model import class_names
from workflow_scripts.common.config import add_config_arguments, config_from_args
from workflow_scripts.fidelity.audit_search import search_cost
from workflow_scripts.common.tables import LABEL_JOIN, load_split

# Dense bf16 tensor-core peaks in TFLOP/s (no sparsity), from NVIDIA's datasheets: H100 SXM5 and
# PCIe (H100 Tensor Core GPU datasheet), H200 SXM (H200 product brief), A100 SXM/PCIe (A100
# datasheet), L40S, L4 and A10 datasheets, B200 (DGX B200 datasheet, per GPU).
# The second figure is the plain fp32 peak (no TF32), which the audit's fp32 search runs at.
GPU_PEAK_TFLOPS = {
    "h100": ("H100 SXM", 989.4, 66.9), "h100-pcie": ("H100 PCIe", 756.0, 51.2), "h200": ("H200 SXM", 989.4, 66.9),
    "a100": ("A100 SXM or PCIe", 312.0, 19.5), "l40s": ("L40S", 362.05, 91.6), "l4": ("L4", 121.0, 30.3),
    "a10": ("A10", 125.0, 31.2), "b200": ("B200", 2250.0, 80.0),
}
# Counted by workflow_scripts.study.flops (FlopCounterMode, meta device): FLOP per image of SD 1.5 from
# ../shared/sd15-arch, per resolution, LoRA rank 4 on the UNet's attention projections.
SD15_FLOP = {
    64: {"unet_forward": 13627852800, "unet_train": 24171482112, "vae_encode": 16919306240,
         "vae_decode": 38760876032, "text_encode": 13298503680},
    128: {"unet_forward": 45846958080, "unet_train": 88510006272, "vae_encode": 67777888256,
         "vae_decode": 155144167424, "text_encode": 13298503680},
    256: {"unet_forward": 180106444800, "unet_train": 362013299712, "vae_encode": 272722165760,
         "vae_decode": 622187282432, "text_encode": 13298503680},
    512: {"unet_forward": 803273441280, "unet_train": 1714413622272, "vae_encode": 1116658466816,
         "vae_decode": 2514518933504, "text_encode": 13298503680},
    768: {"unet_forward": 2148121722880, "unet_train": 4887124022272, "vae_encode": 2609118314496,
         "vae_decode": 5754304364544, "text_encode": 13298503680},
    1024: {"unet_forward": 4674006220800, "unet_train": 11258209293312, "vae_encode": 4878950727680,
         "vae_decode": 10470392594432, "text_encode": 13298503680},
}
# FLOP per image of timm classifiers: (model, image size, classes) -> forward, training step.
CLASSIFIER_FLOP = {
    ("densenet121", 224, 15): {"classifier_forward": 5666306048, "classifier_train": 16762890240},
    ("densenet121", 224, 8): {"classifier_forward": 5666291712, "classifier_train": 16762847232},
    ("densenet121", 224, 14): {"classifier_forward": 5666304000, "classifier_train": 16762884096},
    ("resnet18", 64, 7): {"classifier_forward": 296098816, "classifier_train": 869028864},
    ("test_byobnet", 64, 7): {"classifier_forward": 9908224, "classifier_train": 28397568},
}
STORED_RANK = 4


@dataclass(frozen=True)
class Sizes:
    train: int
    val: int
    test: int
    train_labels: list[str] | None  # the label cell of every training image, when the splits are known
    source: str


def split_sizes(data_dir: Path | None, train: int | None, val: int | None, test: int | None) -> Sizes:
    """From the prepared splits in `data_dir` if given and present, else from the numbers given."""
    if data_dir is not None and (Path(data_dir) / "train.csv").is_file():
        splits = {name: load_split(data_dir, name) for name in ("train", "val", "test")}
        return Sizes(len(splits["train"]), len(splits["val"]), len(splits["test"]),
                     splits["train"]["labels"].astype(str).tolist(), f"the prepared splits in {data_dir}")
    if None in (train, val, test):
        where = f"no prepared splits in {data_dir}; " if data_dir is not None else ""
        raise DataError(f"{where}give --train-images, --val-images and --test-images (or --data-dir with "
                        "train/val/test.csv); docs/real-size.md has the figures for NIH ChestX-ray14")
    if min(train, val, test) < 1:
        raise DataError("--train-images, --val-images and --test-images must each be at least 1")
    return Sizes(int(train), int(val), int(test), None, "the split sizes given")


def generation_images(config: dict[str, Any], sizes: Sizes) -> tuple[int, bool]:
    """Images the generation plan makes (the same arithmetic as the plan_generation stage), and
    whether that is exact (per-label counts known) or the pool's lower bound."""
    needed = study.pool_size_needed(config, sizes.train)
    if sizes.train_labels is None:
        return needed, False
    settings, vocabulary = config["generation"], config["dataset"]["labels"]
    singles = Counter(label for cell in sizes.train_labels for label in set(cell.split(LABEL_JOIN)))
    groups = [(label, singles[label]) for label in vocabulary if singles[label]]
    if settings["all_label_combinations"]:
        combos = Counter(cell for cell in sizes.train_labels if LABEL_JOIN in cell)
        groups += sorted(combos.items())
    if settings["plan"] == "fixed":
        counts = [int(settings["images_per_label"]) for _ in groups]
    else:
        counts = [max(0, int(settings["target_per_label"]) - real) for _, real in groups]
    shortfall = needed - sum(counts)
    if shortfall > 0 and groups:
        counts = [count - (-shortfall // len(groups)) for count in counts]
    return sum(counts), True


def model_flop(config: dict[str, Any], arch_dir: Path | None = None) -> dict[str, int]:
    """FLOP per image of every model the run uses: the stored counts, or counted now on the SD 1.5
    configs in `arch_dir` (default: model.pretrained if it is a local diffusers folder, else
    ../shared/sd15-arch)."""
    from workflow_scripts.study import flops

    resolution, rank = int(config["model"]["resolution"]), int(config["model"]["lora_rank"])
    sd = SD15_FLOP.get(resolution) if rank == STORED_RANK else None
    if sd is None:
        local = Path(config["model"]["pretrained"])
        arch_dir = arch_dir or (local if (local / "unet" / "config.json").is_file() else flops.SD15_ARCH)
        sd = flops.count_sd15(arch_dir, [resolution], rank)[resolution]
    settings = config["classifier"]
    key = (settings["model"], int(settings["image_size"]), len(class_names(config["dataset"]["labels"])))
    classifier = CLASSIFIER_FLOP.get(key) or flops.count_classifier(*key)
    return {**sd, **classifier}


def validations(total_steps: int, every: int) -> int:
    return total_steps // every + (1 if total_steps % every else 0)


def lora_stage(config: dict[str, Any], sizes: Sizes, flop: dict[str, int]) -> dict[str, Any]:
    training = config["training"]
    batch, accumulation = int(training["train_batch_size"]), int(training["gradient_accumulation_steps"])
    steps = training["max_train_steps"] or math.ceil(training["num_train_epochs"] * (sizes.train // batch) / accumulation)
    prompts = len(training["validation_prompts"]) or len(config["dataset"]["labels"])
    samples = validations(steps, int(training["validation_steps"])) * prompts * int(training["num_validation_images"])
    sampling_steps = samples * int(training["validation_inference_steps"])
    total = (sizes.train * (flop["vae_encode"] + flop["text_encode"]) + steps * batch * accumulation * flop["unet_train"]
             + sampling_steps * 2 * flop["unet_forward"] + samples * flop["vae_decode"])
    return {"stage": "train_lora", "images": sizes.train, "optimizer_steps": steps, "sampling_steps": sampling_steps,
            "classifier_runs": 0, "decodes": sizes.train, "flop": total,
            "note": f"{steps * batch * accumulation:,} training images through the UNet; latent cache encoded once; "
                    f"{samples} validation images"}


def generation_stage(config: dict[str, Any], images: int, exact: bool, flop: dict[str, int]) -> dict[str, Any]:
    settings = config["generation"]
    steps = images * int(settings["num_inference_steps"])
    guided = 2 if float(settings["guidance_scale"]) > 1 else 1
    total = steps * guided * flop["unet_forward"] + images * (flop["vae_decode"] + guided * flop["text_encode"])
    return {"stage": "generate", "images": images, "optimizer_steps": 0, "sampling_steps": steps, "classifier_runs": 0,
            "decodes": 0, "flop": total,
            "note": ("the plan's images" if exact else "at least: the largest arm's draw x pool_headroom")
                    + (", classifier-free guidance (2 UNet passes a step)" if guided == 2 else "")}


def audit_stage(config: dict[str, Any], sizes: Sizes, images: int) -> dict[str, Any]:
    evaluation = config["evaluation"]
    controls = int(evaluation["audit_controls"])
    queries = images + min(int(evaluation["audit_calibration_images"]), sizes.val) + min(controls, sizes.train) \
        + min(controls, sizes.test)
    cost = search_cost(queries, sizes.train, int(evaluation["audit_size"]), int(evaluation["audit_max_shift"]))
    return {"stage": "audit_memorization", "images": queries, "optimizer_steps": 0, "sampling_steps": 0,
            "classifier_runs": 0, "decodes": queries + sizes.train, "flop": cost["flop"],
            "note": f"{queries:,} queries x {sizes.train:,} training images x {cost['windows']} windows (fp32: no "
                    "tensor cores; timed at the fp32 peak)", "fp32": True}


def classifier_stage(config: dict[str, Any], sizes: Sizes, flop: dict[str, int]) -> dict[str, Any]:
    arms, seeds = arm_names(config), config["classifier"]["seeds"]
    runs = len(arms) * len(seeds)
    steps = study.train_steps(config, sizes.train)
    items = steps * int(config["classifier"]["batch_size"])
    evaluated = len(study.validation_points(config, sizes.train)) * sizes.val + sizes.test
    total = runs * (items * flop["classifier_train"] + evaluated * flop["classifier_forward"])
    return {"stage": "train_classifier", "images": runs * (items + evaluated), "optimizer_steps": runs * steps,
            "sampling_steps": 0, "classifier_runs": runs, "decodes": runs * (items + evaluated), "flop": total,
            "note": f"{len(arms)} arms ({', '.join(arms)}) x {len(seeds)} seeds; per run {steps:,} steps of "
                    f"{config['classifier']['batch_size']}, {evaluated:,} images validated and tested; decodes "
                    "if every read decodes its film"}


def estimate(config: dict[str, Any], sizes: Sizes, flop: dict[str, int]) -> list[dict[str, Any]]:
    """Every stage's work, in the order the workflow runs them."""
    images, exact = generation_images(config, sizes)
    return [lora_stage(config, sizes, flop), generation_stage(config, images, exact, flop),
            audit_stage(config, sizes, images), classifier_stage(config, sizes, flop)]


def hours(stage: dict[str, Any], gpu: str, utilisation: float, cores: int, decode_ms: float) -> tuple[float, float]:
    """(fastest, slowest) hours of a stage: its FLOP at the GPU's peak x utilisation, down to half
    that utilisation, or its decodes on `cores` CPU cores, whichever is longer."""
    _, bf16, fp32 = GPU_PEAK_TFLOPS[gpu]
    peak = (fp32 if stage.get("fp32") else bf16) * 1e12
    decode = stage["decodes"] * decode_ms / 1000 / max(1, cores)
    fast, slow = stage["flop"] / (peak * utilisation), stage["flop"] / (peak * utilisation / 2)
    return max(fast, decode) / 3600, max(slow, decode) / 3600


def tflop_text(flop: float) -> str:
    tflop = flop / 1e12
    return f"{tflop:,.0f}" if tflop >= 10 else f"{tflop:.2g}"


def time_text(fast_hours: float, slow_hours: float) -> str:
    if slow_hours < 1 / 60:
        return "< 1 min"
    if slow_hours < 1:
        return f"{fast_hours * 60:.0f}–{slow_hours * 60:.0f} min"
    return f"{fast_hours:.1f}–{slow_hours:.1f} h"


def render(config: dict[str, Any], sizes: Sizes, stages: list[dict[str, Any]], gpu: str, utilisation: float,
           cores: int, decode_ms: float) -> str:
    name, bf16, fp32 = GPU_PEAK_TFLOPS[gpu]
    lines = [f"# Cost of this run on one {name}", "",
             f"Splits: {sizes.train:,} train, {sizes.val:,} val, {sizes.test:,} test images ({sizes.source}). "
             f"Model: SD 1.5 architecture at {config['model']['resolution']} px"
             + (" (the demo's tiny model does a small fraction of these FLOPs)"
                if config["model"]["pretrained"] == "tiny" or Path(str(config["model"]["pretrained"])).name == "demo-base"
                else "") + f"; classifier {config['classifier']['model']} at {config['classifier']['image_size']} px.",
             f"Time: counted FLOP at {utilisation:.0%} down to {utilisation / 2:.0%} of the {name}'s dense bf16 peak "
             f"({bf16:g} TFLOP/s; fp32 {fp32:g} for the audit), or the decodes at {decode_ms:g} ms per image on "
             f"{cores} CPU cores, whichever is longer.", "",
             "| stage | images | optimizer steps | sampling steps | classifier runs | decodes | TFLOP (counted) | time |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    total = [0.0, 0.0]
    for stage in stages:
        fast, slow = hours(stage, gpu, utilisation, cores, decode_ms)
        total = [total[0] + fast, total[1] + slow]
        lines.append(f"| {stage['stage']} | {stage['images']:,} | {stage['optimizer_steps']:,} | "
                     f"{stage['sampling_steps']:,} | {stage['classifier_runs']:,} | {stage['decodes']:,} | "
                     f"{tflop_text(stage['flop'])} | {time_text(fast, slow)} |")
    lines.append(f"| **total** | | | | | | **{tflop_text(sum(s['flop'] for s in stages))}** | "
                 f"**{time_text(*total)}** |")
    lines += ["", *[f"- {stage['stage']}: {stage['note']}" for stage in stages],
              "- not counted: prepare/verify (CPU, minutes), the noise images, evaluate_fidelity's feature extraction "
              "and the table."]
    return "\n".join(lines) + "\n"


@run_stage
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--data-dir", type=Path, default=Path(paths.DATA), help="prepared train/val/test.csv")
    parser.add_argument("--train-images", type=int, help="training images after balancing (without prepared splits)")
    parser.add_argument("--val-images", type=int, help="validation images (without prepared splits)")
    parser.add_argument("--test-images", type=int, help="test images (without prepared splits)")
    parser.add_argument("--gpu", default="h100", choices=sorted(GPU_PEAK_TFLOPS), help="GPU class (default h100)")
    parser.add_argument("--utilisation", type=float, default=0.4, help="share of the dense bf16 peak reached (0-1]")
    parser.add_argument("--cores", type=int, default=16, help="CPU cores decoding images")
    parser.add_argument("--decode-ms", type=float, default=20.0,
                        help="ms to decode and preprocess one film on one core (20: a 1024 px NIH PNG)")
    parser.add_argument("--arch", type=Path, help="diffusers SD 1.5 folder (configs suffice) to count sizes not stored")
    parser.add_argument("--out", type=Path, help="also write the table here (markdown)")
    args = parser.parse_args(argv)
    if not 0 < args.utilisation <= 1:
        raise ConfigError(f"--utilisation {args.utilisation}: a share of the peak, in (0, 1]")
    config = config_from_args(args, "estimate_cost")
    sizes = split_sizes(args.data_dir, args.train_images, args.val_images, args.test_images)
    stages = estimate(config, sizes, model_flop(config, args.arch))
    page = render(config, sizes, stages, args.gpu, args.utilisation, args.cores, args.decode_ms)
    print(page, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
