"""Training curves of the study's classifiers: one plot per arm, every seed a line, training loss and
validation loss on the left, validation macro AUROC on the right, at the validation steps the arms share.

Read from each run's train_log.csv (the same values are in its tensorboard/ folder). The plots sit
beside the table (results/plots/curves_<arm>.png) and in `snakemake --report`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from workflow_scripts.common.errors import DataError, run_stage

COLUMNS = ("step", "train_loss", "val_loss", "val_macro_auroc")


def read_logs(run_dirs: Sequence[Path]) -> dict[str, dict[str, pd.DataFrame]]:
    """{arm: {"seed<k>": train_log}} from run folders named <arm>_seed<k>."""
    logs: dict[str, dict[str, pd.DataFrame]] = {}
    for run in map(Path, run_dirs):
        arm, _, seed = run.name.rpartition("_seed")
        path = run / "train_log.csv"
        if not arm or not seed.isdigit():
            raise DataError(f"{run}: expected a run folder named <arm>_seed<k>, e.g. results/classifier/ratio0_seed0")
        if not path.is_file():
            raise DataError(f"{path} not found: run train_classifier for {run.name} first")
        log = pd.read_csv(path)
        missing = [column for column in COLUMNS if column not in log]
        if missing:
            raise DataError(f"{path}: columns {missing} missing (expected {list(COLUMNS)})")
        logs.setdefault(arm, {})[f"seed {seed}"] = log
    return logs


def plot_arm(arm: str, seeds: dict[str, pd.DataFrame], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, auroc_axis) = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    for k, (seed, log) in enumerate(sorted(seeds.items())):
        color = f"C{k % 10}"
        loss_axis.plot(log["step"], log["train_loss"], color=color, marker="o", markersize=3, label=f"{seed} train")
        loss_axis.plot(log["step"], log["val_loss"], color=color, linestyle="--", label=f"{seed} val")
        auroc_axis.plot(log["step"], log["val_macro_auroc"], color=color, marker="o", markersize=3, label=seed)
    loss_axis.set(xlabel="optimizer step", ylabel="BCE loss", title=f"{arm}: loss (solid train, dashed val)")
    auroc_axis.set(xlabel="optimizer step", ylabel="val macro AUROC", title=f"{arm}: validation macro AUROC")
    figure.legend(*loss_axis.get_legend_handles_labels(), loc="outside right upper", fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


@run_stage
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workflow_scripts.report.curves",
                                     description="Plot the classifiers' training curves, one plot per arm.")
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="run folders, e.g. results/classifier/*_seed*")
    parser.add_argument("--out-dir", type=Path, required=True, help="writes curves_<arm>.png here")
    args = parser.parse_args(argv)
    for arm, seeds in read_logs(args.runs).items():
        plot_arm(arm, seeds, args.out_dir / f"curves_{arm}.png")
        print(f"{args.out_dir / f'curves_{arm}.png'}: {len(seeds)} seed(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
