"""Data stage check: load the prepared splits the way training will and report what it sees.

    python -m workflow_scripts.data.verify_dataset --config config/config.yaml \\
        --train results/data/train.csv --val results/data/val.csv --test results/data/test.csv --out-dir results/data

Loads the training split through `XrayPromptDataset` (the class training uses) and writes
`verify_report.json`, a readable `verify_report.md` and `verify_contact_sheet.png` (samples
captioned with their prompts). Exits non-zero with a clear message when the data cannot be used:
a patient in two splits, one file listed twice, an unreadable image, tensors of the wrong shape or range.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from workflow_scripts.common import paths
from workflow_scripts.common.errors import DataError, run_stage
from workflow_scripts.common.config import add_config_arguments, config_from_args
from workflow_scripts.common.tables import (SPLITS, Splits, add_split_arguments, assert_files_disjoint,
                                            assert_patient_disjoint, label_counts, load_split, split_path,
                                            splits_from_args)
from workflow_scripts.data.xray_dataset import XrayPromptDataset


def evenly_spaced(count: int, total: int) -> list[int]:
    """`count` indices spread over range(total), deterministic (first and last included)."""
    if total <= count:
        return list(range(total))
    return sorted({int(round(i)) for i in np.linspace(0, total - 1, count)})


def tensor_stats(dataset: XrayPromptDataset, indices: list[int], resolution: int) -> dict[str, Any]:
    """Load `indices` through the Dataset; check every tensor is [3, R, R], finite and in [-1, 1]."""
    loader = DataLoader(Subset(dataset, indices), batch_size=16, num_workers=0)
    low, high, shape = float("inf"), float("-inf"), None
    for batch in tqdm(loader, desc="loading train images", unit="batch", file=sys.stderr):
        pixels = batch["pixel_values"]
        shape = list(pixels.shape[1:])
        if shape != [3, resolution, resolution]:
            raise DataError(f"{batch['path'][0]}: tensor shape {shape}, expected [3, {resolution}, {resolution}]")
        if not torch.isfinite(pixels).all():
            raise DataError(f"a batch starting at {batch['path'][0]} holds NaN or inf values")
        low, high = min(low, pixels.min().item()), max(high, pixels.max().item())
    if low < -1.0 - 1e-6 or high > 1.0 + 1e-6:
        raise DataError(f"pixel values span [{low}, {high}], expected within [-1, 1]")
    return {"checked_images": len(indices), "tensor_shape": shape, "min": low, "max": high}


def save_contact_sheet(dataset: XrayPromptDataset, indices: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(4, len(indices))
    rows = int(np.ceil(len(indices) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.4 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, index in zip(axes.flat, indices):
        sample = dataset[index]
        axis.imshow((sample["pixel_values"][0].numpy() + 1) / 2, cmap="gray", vmin=0, vmax=1)
        axis.set_title("\n".join(textwrap.wrap(sample["prompt"], 32)), fontsize=8)
    figure.suptitle("Training split as the model sees it (after resize, crop and scaling)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def verify(config: dict[str, Any], data_dir: Splits, out_dir: Path | None = None) -> dict[str, Any]:
    """Check the prepared splits and write the JSON and Markdown reports and the contact sheet into
    `out_dir` (default: `data_dir`, a folder of split CSVs)."""
    out_dir = Path(out_dir if out_dir is not None else data_dir)
    resolution = config["model"]["resolution"]
    splits = {name: load_split(data_dir, name) for name in SPLITS}
    assert_patient_disjoint(splits)
    assert_files_disjoint(splits)
    if splits["train"].empty:
        raise DataError(f"{split_path(data_dir, 'train')}: no training images")

    dataset = XrayPromptDataset(data_dir, resolution, split="train", crop=config["model"]["crop"])
    stats = tensor_stats(dataset, evenly_spaced(config["verify"]["max_images"], len(dataset)), resolution)
    sheet_indices = evenly_spaced(config["verify"]["contact_sheet_images"], len(dataset))
    save_contact_sheet(dataset, sheet_indices, out_dir / "verify_contact_sheet.png")

    report = {
        "samples_per_split": {name: len(frame) for name, frame in splits.items()},
        "patients_per_split": {name: int(frame["patient"].nunique()) for name, frame in splits.items()},
        "resolution": resolution,
        **stats,
        "label_counts": {name: label_counts(frame) for name, frame in splits.items()},
        "label_combination_counts": {
            name: dict(Counter(frame["labels"]).most_common()) for name, frame in splits.items()
        },
        "sample_prompts": [dataset.frame["prompt"].iloc[i] for i in evenly_spaced(10, len(dataset))],
        "contact_sheet": "verify_contact_sheet.png",
    }
    if "sex" in splits["train"].columns or "age" in splits["train"].columns:
        report["demographics"] = {name: demographics(frame) for name, frame in splits.items()}
    (out_dir / "verify_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "verify_report.md").write_text(render_markdown(report, config["dataset"]["labels"]))
    return report


def demographics(frame: pd.DataFrame) -> dict[str, Any]:
    """Images per sex (M, F, unknown) and the age distribution of one split, where the splits carry them."""
    result: dict[str, Any] = {}
    if "sex" in frame.columns:
        sex = frame["sex"].replace("", "unknown")
        result["sex"] = {key: int((sex == key).sum()) for key in ("M", "F", "unknown")}
    if "age" in frame.columns:
        ages = pd.to_numeric(frame["age"], errors="coerce").dropna()
        result["age"] = {"known": len(ages), "unknown": int(len(frame) - len(ages)),
                         "median": float(ages.median()) if len(ages) else None,
                         "min": int(ages.min()) if len(ages) else None, "max": int(ages.max()) if len(ages) else None}
    return result


def render_markdown(report: dict[str, Any], vocabulary: list[str]) -> str:
    lines = [
        "# Dataset verification",
        "",
        f"Training images load as tensors of shape `{report['tensor_shape']}` with values in "
        f"[{report['min']:.3f}, {report['max']:.3f}] (checked {report['checked_images']} images "
        f"through the training Dataset at {report['resolution']} px).",
        "",
        "| split | images | patients |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {report['samples_per_split'][name]} | {report['patients_per_split'][name]} |" for name in SPLITS]
    lines += ["", "## Images per label", "", "| label | " + " | ".join(SPLITS) + " |", "|---|" + "---:|" * len(SPLITS)]
    for label in vocabulary:
        lines.append(f"| {label} | " + " | ".join(str(report["label_counts"][name].get(label, 0)) for name in SPLITS) + " |")
    lines += ["", "## Label combinations (training split)", "", "| labels | images |", "|---|---:|"]
    lines += [f"| {combo.replace('|', ' + ')} | {count} |" for combo, count in report["label_combination_counts"]["train"].items()]
    if "demographics" in report:
        lines += ["", "## Demographics (images)", "", "| split | M | F | sex unknown | age median [min, max] | age unknown |",
                  "|---|---:|---:|---:|---|---:|"]
        for name in SPLITS:
            sex, age = report["demographics"][name].get("sex", {}), report["demographics"][name].get("age", {})
            ages = f"{age['median']:g} [{age['min']}, {age['max']}]" if age.get("known") else "n/a"
            lines.append(f"| {name} | {sex.get('M', 'n/a')} | {sex.get('F', 'n/a')} | {sex.get('unknown', 'n/a')} | "
                         f"{ages} | {age.get('unknown', 'n/a')} |")
    lines += ["", "## Sample prompts", ""] + [f"- {prompt}" for prompt in report["sample_prompts"]]
    lines += ["", f"![contact sheet]({report['contact_sheet']})", ""]
    return "\n".join(lines)


@run_stage
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    add_split_arguments(parser)
    parser.add_argument("--out-dir", default=paths.DATA, type=Path, help="where the reports and the contact sheet go")
    args = parser.parse_args(argv)
    report = verify(config_from_args(args, "verify_dataset"), splits_from_args(args), args.out_dir)
    print(f"verified: {report['samples_per_split']} images, tensors {report['tensor_shape']} in "
          f"[{report['min']:.2f}, {report['max']:.2f}]; report in {args.out_dir / 'verify_report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
