"""Evaluation stage: fidelity, diversity and prompt adherence of the synthetic X-rays.

    python -m workflow_scripts.fidelity.evaluate_fidelity --config config/config.yaml \\
        --train results/data/train.csv --val results/data/val.csv \\
        --synthetic results/synthetic/generation_results.csv \\
        --base-synthetic results/synthetic_base/generation_results.csv \\
        --classifier results/classifier/ratio0_seed0/model.pt \\
        --audit-summary results/evaluation/audit_summary.json --out-dir results/evaluation

Reference set: the real val split; floor: real train vs real val at the same n. Features from
evaluation.extractors (Inception, torchxrayvision DenseNet, RAD-DINO), each "unavailable: ..."
without its weights. Prompt adherence from the real-only classifier. The memorization audit is its
own stage (python -m workflow_scripts.fidelity.audit); its summary is included in fidelity.md.

Outputs in out-dir: fidelity.csv, fidelity.json, fidelity.md, diversity.csv, adherence.csv, plots/.
See docs/fidelity.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from workflow_scripts.common import paths
from workflow_scripts.common.errors import DataError, run_stage
from workflow_scripts.common.config import add_config_arguments, config_from_args
from workflow_scripts.fidelity import BASE, SYNTHETIC
from workflow_scripts.fidelity.evaluate import evaluate
from workflow_scripts.fidelity.features import build_extractors
from workflow_scripts.common.tables import add_split_arguments, splits_from_args


@run_stage
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    add_split_arguments(parser, ["train", "val"])
    parser.add_argument("--synthetic", type=Path, default=Path(paths.GENERATED),
                        help="generation_results.csv of the synthetic images")
    parser.add_argument("--base-synthetic", type=Path, default=None,
                        help="generation_results.csv of the LoRA-off control (same prompts and seeds, base model alone)")
    parser.add_argument("--classifier", type=Path, default=None,
                        help="model.pt of the real-only classifier, for prompt adherence (omit: adherence unavailable)")
    parser.add_argument("--audit-summary", type=Path, default=None, help="audit_summary.json of the memorization audit")
    parser.add_argument("--out-dir", type=Path, default=Path(paths.EVALUATION))
    parser.add_argument("--device", default=None, help="cuda, cuda:0 or cpu (default: cuda if available)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--download", dest="allow_download", action=argparse.BooleanOptionalAction, default=True,
                        help="download missing Inception weights to the torch hub cache where the network allows, "
                             "as pytorch-fid does (hash-checked); torchxrayvision and RAD-DINO weights are never downloaded here")
    args = parser.parse_args(argv)
    config = config_from_args(args, "evaluate_fidelity")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    classifier = None
    if args.classifier is not None:
        from workflow_scripts.classifier.classifier_model import load_classifier

        model, meta = load_classifier(args.classifier)  # DataError when missing
        classifier = (model, {**meta, "source": str(args.classifier)})
    audit_summary = None
    if args.audit_summary is not None:
        if not args.audit_summary.is_file():
            raise DataError(f"{args.audit_summary}: audit summary not found; run the audit_memorization stage first")
        audit_summary = json.loads(args.audit_summary.read_text())
    extractors = build_extractors(config["evaluation"], device, args.allow_download)
    result = evaluate(config, splits_from_args(args, ["train", "val"]), args.synthetic, args.out_dir, extractors, classifier,
                      audit_summary, device=device, batch_size=args.batch_size, base_csv=args.base_synthetic)
    for name, info in result["settings"]["extractors"].items():
        print(f"{name}: {info['status']}")
    for row in result["rows"]:
        if row["comparison"] in (SYNTHETIC, BASE) and "kid_mean" in row:
            print(f"{row['extractor']:>9} {row['label']:>14} {row['comparison'].split(' vs ')[0]:>22}: n {row['n']:>4}, "
                  f"KID {row['kid_mean']:.4g}, "
                  f"FID {row['fid'] if row['fid'] is not None else row['fid_status']}")
    print(f"wrote {args.out_dir / 'fidelity.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
