"""Generation stage, step 1 (rule plan_generation): how many images each label gets.

    python -m workflow_scripts.generation.plan_generation --train results/data/train.csv --plan results/synthetic/plan.csv

Columns: key, labels, prompt, count (workflow_scripts/generation/pipeline.py: generation_plan).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from workflow_scripts.common import paths
from workflow_scripts.common.config import add_config_arguments, config_from_args
from workflow_scripts.common.errors import run_stage
from workflow_scripts.generation.pipeline import write_plan


@run_stage
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--train", type=Path, default=Path(paths.split_csv("train")), help="the training split")
    parser.add_argument("--plan", type=Path, default=Path(paths.PLAN), help="the plan CSV to write")
    args = parser.parse_args(argv)
    plan = write_plan(config_from_args(args, "plan_generation"), args.train, args.plan)
    print(f"plan: {int(plan['count'].sum())} images over {len(plan)} label(s) -> {args.plan}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
