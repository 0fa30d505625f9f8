"""Generation stage: synthetic chest X-rays per label from the trained LoRA (rule generate_label).

    python -m workflow_scripts.generation.generate_xrays --checkpoint results/lora/final --label Mass --num-images 20
    python -m workflow_scripts.generation.generate_xrays --checkpoint results/lora/checkpoint-500 --prompt "A chest X-ray with Edema"
    python -m workflow_scripts.generation.generate_xrays --checkpoint results/lora/final --generate-all-labels
    python -m workflow_scripts.generation.generate_xrays --no-lora --plan results/synthetic/plan.csv \
        --output-dir results/synthetic_base --merged results/synthetic_base/generation_results.csv

`--checkpoint` alone suffices: the checkpoint records the base model it was trained on
(`--pretrained-model` overrides). `--no-lora` draws from the base model alone (model.pretrained): the
LoRA-off control, with the same prompts and seeds. Without --label/--prompt, the labels are those of
`--plan` (else a plan made from `--train`). Image counts come from `--num-images`, else from `--plan` (the
plan_generation rule's plan.csv), else from a plan made here from `--train`. Sampling settings default
to the config's `generation:` section; flags override them. Files and formats: workflow_scripts/generation/pipeline.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from workflow_scripts.common import paths
from workflow_scripts.models.base_model import DEFAULT_TINY_DIR
from workflow_scripts.common.config import add_config_arguments, config_from_args
from workflow_scripts.common.errors import run_stage
from workflow_scripts.generation.pipeline import generate, generation_plan, label_job, lora_checkpoint, merge, prompt_job
from workflow_scripts.generation.provenance import refresh_stale_images
from workflow_scripts.common.tables import LABEL_JOIN, load_split


def all_combinations(config: dict) -> dict:
    return {**config, "generation": {**config["generation"], "all_label_combinations": True}}


@run_stage
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--label", help="a label or combination key (Mass, No_Finding, Effusion+Mass)")
    what.add_argument("--prompt", help="a free prompt (labels taken from it where it is a label prompt)")
    what.add_argument("--generate-all-labels", action="store_true",
                      help="every label, and every label combination of the training split")
    parser.add_argument("--checkpoint", type=Path, default=Path(paths.LORA_FINAL),
                        help="final/ or checkpoint-N/ folder, or the LoRA file in it")
    parser.add_argument("--no-lora", action="store_true",
                        help="the base model alone (model.pretrained or --pretrained-model): the LoRA-off control")
    parser.add_argument("--merged", type=Path, help="also write every label's results into this one CSV")
    parser.add_argument("--pretrained-model", help="base model (default: the one the checkpoint records)")
    parser.add_argument("--plan", type=Path, help="plan CSV to take the image count from (the rule passes it)")
    parser.add_argument("--num-images", type=int, help="images per label (default: the plan)")
    parser.add_argument("--num-inference-steps", type=int, help="sampling steps (config generation.num_inference_steps; 50)")
    parser.add_argument("--guidance-scale", type=float, help="classifier-free guidance (generation.guidance_scale; 7.5)")
    parser.add_argument("--scheduler", choices=["ddim", "dpmsolver++", "euler", "euler_a", "pndm"])
    parser.add_argument("--negative-prompt")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seed", type=int, help="base seed (generation.seed)")
    parser.add_argument("--train", type=Path, default=Path(paths.split_csv("train")),
                        help="the training split, for plans made here (--generate-all-labels, or no --plan)")
    parser.add_argument("--tiny-dir", type=Path, default=DEFAULT_TINY_DIR, help="where model.pretrained: tiny lives")
    parser.add_argument("--output-dir", type=Path, default=Path(paths.SYNTHETIC))
    args = parser.parse_args(argv)
    config = config_from_args(args, "generate_label")
    if not args.no_lora:
        lora_checkpoint(args.checkpoint)  # a folder without LoRA weights fails first, before any data is read

    def train() -> pd.DataFrame:
        return load_split({"train": args.train}, "train")

    # Which keys, with what prompt and count.
    if args.prompt:
        jobs = [prompt_job(config, args.prompt)]
    elif args.label:
        jobs = [label_job(config, args.label)]
    else:
        plan = (pd.read_csv(args.plan, dtype={"key": str, "labels": str, "prompt": str})
                if args.plan and not args.generate_all_labels
                else generation_plan(all_combinations(config) if args.generate_all_labels else config, train()))
        jobs = [(row.key, row.labels.split(LABEL_JOIN), row.prompt) for row in plan.itertuples()]
    counts = {}
    if args.num_images is None:
        plan = pd.read_csv(args.plan) if args.plan else generation_plan(all_combinations(config), train())
        counts = dict(zip(plan["key"], plan["count"]))
    fallback = config["generation"]["images_per_label"]
    counted = [(key, labels, prompt, args.num_images if args.num_images is not None else int(counts.get(key, fallback)))
               for key, labels, prompt in jobs]
    sampling = {"num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale,
                "scheduler": args.scheduler, "seed": args.seed, "batch_size": args.batch_size,
                "negative_prompt": args.negative_prompt}
    checkpoint = None if args.no_lora else args.checkpoint
    # Images another LoRA or other settings made are removed first: generate makes only the missing ones.
    refresh_stale_images(config, counted, checkpoint, args.output_dir, tiny_dir=args.tiny_dir,
                         pretrained=args.pretrained_model, sampling=sampling)
    total = generate(config, counted, checkpoint, args.output_dir, tiny_dir=args.tiny_dir,
                     pretrained=args.pretrained_model, sampling=sampling)
    if args.merged:
        merge([args.output_dir / key / "generation_results.csv" for key, *_ in counted], args.merged)
    print(f"{total} images in {args.output_dir} ({len(jobs)} label(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
