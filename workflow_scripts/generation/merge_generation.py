"""Generation stage, step 3 (rule merge_generation): every label's generation_results.csv in one list.

    python -m workflow_scripts.generation.merge_generation --results results/synthetic/*/generation_results.csv \
        --merged results/synthetic/generation_results.csv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from workflow_scripts.common import paths
from workflow_scripts.common.config import add_config_arguments, config_from_args
from workflow_scripts.common.errors import run_stage
from workflow_scripts.generation.pipeline import merge


@run_stage
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--results", nargs="*", type=Path, default=[], metavar="CSV", help="per-label generation_results.csv files")
    parser.add_argument("--merged", type=Path, default=Path(paths.GENERATED), help="the list to write")
    parser.add_argument("--plan", type=Path, help="plan.csv: each list must hold its key's planned count (a cut list is refused)")
    args = parser.parse_args(argv)
    config_from_args(args, "merge_generation")  # a bad configuration is refused here as in every stage
    counts = None
    if args.plan:
        plan = pd.read_csv(args.plan, dtype={"key": str})
        counts = dict(zip(plan["key"], plan["count"].astype(int)))
    merged = merge(args.results, args.merged, counts)
    print(f"merged {len(merged)} images from {len(args.results)} label(s) into {args.merged}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
