"""The augmentation study's classifier: one arm of the study (workflow_scripts.study.design) for one seed.

    python -m workflow_scripts.classifier.train_classifier --config config/config.yaml \\
        --train results/data/train.csv --val results/data/val.csv --test results/data/test.csv \\
        --synthetic results/synthetic/generation_results.csv \\
        --arm ratio25 --seed 0 --out-dir results/classifier/ratio25_seed0

Several seeds of one arm in one process (`--seed 0 1 2 --out-dir D0 D1 D2`, as the workflow runs
an arm) give each seed the outputs it would get alone: the imports and the cache are paid once.

One run, read top to bottom:
1. the real training images come only from `load_split(data_dir, "train")`; the arm adds its
   synthetic draw (stratified by label, seeded; `--exclude-synthetic` images left out of the pool),
   noise images (noise control) or oversampled real duplicates (rebalanced control). No val or test
   image may be in the mix;
2. a timm model (ImageNet weights where they can be had, else random init, recorded either way) is
   trained multi-label (BCE with logits; classes = dataset.labels without "No Finding", which is the
   all-zero target) with AdamW for the study's step budget, the same for every arm; at the same
   steps for every arm the real val split's macro AUROC is measured and the best step's weights kept;
3. the best weights are scored once on the real, patient-disjoint test split: AUROC per label and
   macro, each with a 95% CI from a bootstrap over test patients (stats.run_aurocs).
Images: read_xray -> short side resized to classifier.image_size -> center crop -> 3 channels ->
the model's ImageNet mean/std. No flips: left and right matter in a chest X-ray.

Outputs (written to OUT.partial, then renamed to OUT): metrics.json, predictions.csv (test images:
path, labels, prob_<class> per class), composition.csv (label, real_positives, synthetic_positives,
effective_positives), train_log.csv (step, train_loss, val_loss, val_macro_auroc; the same curves in
tensorboard/), training_set.csv (the mix: path, labels, source, phase) and model.pt, which
`classifier_model.load_classifier` reads back.
The model, its images and its metrics are in workflow_scripts.classifier.classifier_model.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import random
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from workflow_scripts.common import paths
from workflow_scripts.common.errors import ConfigError, DataError, TrainingError, run_stage
from workflow_scripts.classifier.classifier_cache import CachedBatches, decoded_batches, sequential, source_name, study_store
from workflow_scripts.classifier.classifier_device import (Precision, describe_device, host_value, loader_workers,
                                                           pick_device, precision_for, predict)
from workflow_scripts.common.hardware import apply_cuda_levers
from workflow_scripts.classifier.classifier_model import class_names, create_model, encode_labels, macro_auroc, model_data_config
from workflow_scripts.common.config import add_config_arguments, config_from_args
from workflow_scripts.study import stats
from workflow_scripts.common.faults import maybe_fail
from workflow_scripts.common.tables import PROB_PREFIX, Splits, add_split_arguments, load_split, split_path, splits_from_args
from workflow_scripts.study.arms import (SYNTHETIC_SOURCES, Arm, arm_training_set, composition, controls, parse_arm,
                                         phase_steps, read_pool)
from workflow_scripts.study.design import batch_schedule, study_hash, train_steps, validation_points

EVALUATION_SPLITS = ("train", "val", "test")  # the more_real arm reads the reserve as its --synthetic pool
OUTPUT_FILES = ("metrics.json", "predictions.csv", "train_log.csv", "training_set.csv", "composition.csv", "model.pt",
                "tensorboard")


# ----------------------------------------------------------------------------- labels and data


def _canonical(path: str) -> str:
    return os.path.normcase(os.path.realpath(path))


def assert_no_leakage(training: pd.DataFrame, held_out: Mapping[str, pd.DataFrame]) -> None:
    """Raise DataError if any training image (same file, after resolving links) is in a held-out split."""
    train_paths = {_canonical(path): path for path in training["path"].astype(str)}
    for name, frame in held_out.items():
        for path in frame["path"].astype(str):
            if _canonical(path) in train_paths:
                raise DataError(
                    f"image {train_paths[_canonical(path)]} is in the training mix and in the {name} split "
                    f"({path}): {name} images must never be trained on. Check the synthetic image list "
                    "and re-run prepare_dataset"
                )


def assert_files_exist(frame: pd.DataFrame, what: str) -> None:
    missing = [path for path in frame["path"].astype(str) if not Path(path).is_file()]
    if missing:
        raise DataError(f"{len(missing)} {what} image(s) not found, e.g. {missing[0]} "
                        f"(working directory: {Path.cwd()})")


# ----------------------------------------------------------------------------- training


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _clean_out_dir(out_dir: Path) -> Path:
    """Remove an earlier result in `out_dir` (and a stale .partial); return the fresh .partial folder.
    A folder holding anything but this stage's outputs is left alone and refused."""
    partial = out_dir.with_name(out_dir.name + ".partial")
    if out_dir.exists():
        foreign = [p.name for p in out_dir.iterdir() if p.name not in OUTPUT_FILES] if out_dir.is_dir() else [out_dir.name]
        if foreign:
            raise TrainingError(f"--out-dir {out_dir} holds files this stage did not write ({foreign[:3]}); "
                                "refusing to delete it: choose another --out-dir or empty it")
        shutil.rmtree(out_dir)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def train_classifier(config: dict[str, Any], data_dir: Splits, synthetic_csv: str | Path | None, arm: str,
                     seed: int, out_dir: str | Path, exclude_csv: str | Path | None = None,
                     show_progress: bool = True, cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Train one arm of the study (arms.parse_arm) for the study's step budget, select on real val,
    score on real test; write the outputs to `out_dir` (atomically) and return metrics.json's content.
    `cache_dir`: where the decode-once caches live (classifier_cache); None decodes every film at
    every access (the same numbers, far slower)."""
    started = time.time()
    study_arm = parse_arm(arm, config)
    if seed < 0:
        raise ConfigError(f"--seed {seed}: expected a non-negative integer")
    classes = class_names(config["dataset"]["labels"])
    out_dir = Path(out_dir)
    partial = _clean_out_dir(out_dir)
    try:
        metrics = _run(config, data_dir, (synthetic_csv, exclude_csv, cache_dir), study_arm, int(seed), classes, partial,
                       show_progress)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    metrics["seconds"] = round(time.time() - started, 2)
    (partial / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    os.replace(partial, out_dir)
    return metrics


def _training_data(config: dict[str, Any], data_dir: Path, synthetic_csv: str | Path | None,
                   exclude_csv: str | Path | None, arm: Arm, seed: int) -> dict[str, Any]:
    """The real splits (only through load_split), the arm's mix and what went into it."""
    real_train, val, test = (load_split(data_dir, split) for split in ("train", "val", "test"))
    if real_train.empty or val.empty or test.empty:
        raise DataError(f"{split_path(data_dir, 'train').parent}: empty split (train {len(real_train)}, val {len(val)}, test {len(test)} images)")
    pool, n_excluded = read_pool(arm, synthetic_csv, exclude_csv)
    mix, info = arm_training_set(arm, real_train, pool, seed)
    assert_no_leakage(mix, {"val": val, "test": test})
    assert_no_leakage(mix[mix["source"].isin(SYNTHETIC_SOURCES)], {"train": real_train})
    assert_files_exist(mix, "training")
    return {"real_train": real_train, "val": val, "test": test, "mix": mix, "pool": pool, "n_excluded": n_excluded,
            **info}


def _batches(data: Mapping[str, Any], targets: Sequence[np.ndarray], schedule: list[list[int]],
             settings: Mapping[str, Any], data_config: Mapping[str, Any], synthetic_csv: str | Path | None,
             cache_dir: str | Path | None, show_progress: bool) -> tuple[Iterable, Iterable, Iterable]:
    """(uint8 films, targets) batches of the training schedule, of val and of test: read from the
    decode-once caches (the splits and the arm's pool, each decoded once for every arm and seed), or
    with `cache_dir` None decoded from the files at every access."""
    mix, val, test = data["mix"], data["val"], data["test"]
    size, interpolation, batch_size = settings["image_size"], data_config["interpolation"], settings["batch_size"]
    paths = [frame["path"].astype(str).tolist() for frame in (mix, val, test)]
    orders = [schedule, sequential(len(val), batch_size), sequential(len(test), batch_size)]
    if cache_dir is None:
        workers = loader_workers(settings["num_workers"])
        return tuple(decoded_batches(p, t, order, size, interpolation, workers)
                     for p, t, order in zip(paths, targets, orders))
    sources = {split: data[key]["path"].astype(str).tolist() for split, key in
               (("train", "real_train"), ("val", "val"), ("test", "test"))}
    if mix["source"].isin(SYNTHETIC_SOURCES).any():  # the rebalanced control reads no pool image
        sources[source_name(synthetic_csv)] = data["pool"]["path"].astype(str).tolist()
    store = study_store(sources, paths[0], cache_dir, size, interpolation, show_progress)
    return tuple(CachedBatches(store, p, t, order) for p, t, order in zip(paths, targets, orders))


@contextlib.contextmanager
def tensorboard_curves(log_dir: Path) -> Iterator[Callable[[Mapping[str, Any]], None]]:
    """A callback writing a validation point's train loss, val loss and val macro AUROC to TensorBoard
    (one run per arm and seed: `tensorboard --logdir results/classifier`), flushed at once so that a
    running job can be followed."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(log_dir))

    def write(row: Mapping[str, Any]) -> None:
        writer.add_scalar("loss/train", row["train_loss"], row["step"])
        writer.add_scalar("loss/val", row["val_loss"], row["step"])
        if row["val_macro_auroc"] is not None:
            writer.add_scalar("auroc/val_macro", row["val_macro_auroc"], row["step"])
        writer.flush()

    try:
        yield write
    finally:
        writer.close()


def _fit(model: torch.nn.Module, train_batches: Iterable, val_batches: Iterable, val_targets: np.ndarray,
         points: Sequence[int], settings: Mapping[str, Any], precision: Precision, data_config: Mapping[str, Any],
         desc: str, show_progress: bool, curves: Callable[[Mapping[str, Any]], None] | None = None,
         ) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor], int]:
    """One optimizer step per batch of `train_batches` (uint8 films, targets); validation on the real
    val split after each step in `points`, keeping the best weights (val macro AUROC, earliest on
    ties; lowest val loss where no val label has both classes). The loss stays on the device
    between validation points (no host sync per step); `curves` gets each validation point's row as it
    is measured. Returns the log, the best weights and their step."""
    fused = {"fused": True} if precision.device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["learning_rate"],
                                  weight_decay=settings["weight_decay"], **fused)
    scaler = precision.scaler()
    loss_fn = torch.nn.BCEWithLogitsLoss()
    mean, std = data_config["mean"], data_config["std"]
    log, best_key, best_state, best_step = [], None, None, 0
    points, seen, last = set(points), 0, 0
    total = torch.zeros((), device=precision.device)
    progress = tqdm(total=len(train_batches), desc=desc, unit="step", disable=not show_progress, file=sys.stderr)
    model.train()
    for step, (films, targets) in enumerate(train_batches, start=1):
        images = precision.model_input(films, mean, std)
        targets = targets.to(precision.device, non_blocking=True)
        with precision.autocast():
            loss = loss_fn(model(images).float(), targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total += loss.detach()
        seen += 1
        progress.update(1)
        if step not in points:
            continue
        train_loss = host_value(total) / seen
        if not np.isfinite(train_loss):
            raise TrainingError(f"loss became {train_loss} between steps {last + 1} and {step}; lower classifier.learning_rate")
        val_probs, val_loss = predict(model, val_batches, precision, mean, std)
        model.train()
        val_auroc = macro_auroc(val_targets, val_probs)
        log.append({"step": step, "train_loss": train_loss, "val_loss": val_loss, "val_macro_auroc": val_auroc})
        if curves is not None:
            curves(log[-1])
        total, seen, last = torch.zeros((), device=precision.device), 0, step
        maybe_fail("classifier_validation")
        key = (val_auroc, -step) if val_auroc is not None else (float("-inf"), -val_loss, -step)
        if best_key is None or key > best_key:
            best_key, best_step = key, step
            best_state = {name: value.detach().cpu().clone() for name, value in model.state_dict().items()}
        shown = f"{val_auroc:.4f}" if val_auroc is not None else "n/a"
        progress.set_postfix(loss=f"{train_loss:.4f}")
        if show_progress:
            progress.write(f"step {step}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
                           f"val macro AUROC {shown}", file=sys.stderr)
    progress.close()
    return log, best_state, best_step


def _run(config: dict[str, Any], data_dir: Path, files: tuple[str | Path | None, ...], arm: Arm, seed: int,
         classes: list[str], partial: Path, show_progress: bool) -> dict[str, Any]:
    import sklearn
    import timm

    synthetic_csv, exclude_csv, cache_dir = files

    settings = config["classifier"]
    data = _training_data(config, data_dir, synthetic_csv, exclude_csv, arm, seed)
    mix, val, test = data["mix"], data["val"], data["test"]
    train_targets = encode_labels(mix["labels"].tolist(), classes, "training mix", mix["path"].tolist())
    val_targets = encode_labels(val["labels"].tolist(), classes, f"{split_path(data_dir, 'val')}")
    test_targets = encode_labels(test["labels"].tolist(), classes, f"{split_path(data_dir, 'test')}")

    # The study's budget: the same steps and validation points for every arm.
    n_real = len(data["real_train"])
    steps, points = train_steps(config, n_real), validation_points(config, n_real)
    phases = phase_steps(arm, config, steps)
    schedule = batch_schedule(mix["phase"].tolist(), phases, settings["batch_size"], seed)

    seed_everything(seed)
    model, pretrained_weights = create_model(settings["model"], settings["pretrained"], len(classes),
                                             settings["allow_random_init"])
    data_config = model_data_config(model)
    device = pick_device()
    precision = precision_for(device)
    model = precision.prepare_model(model)
    size = settings["image_size"]
    train_batches, val_batches, test_batches = _batches(data, (train_targets, val_targets, test_targets), schedule,
                                                        settings, data_config, synthetic_csv, cache_dir, show_progress)
    cuda = device.type == "cuda"
    # classifier.deterministic: cuDNN's deterministic kernels only (timm's pooling has no deterministic
    # CUDA backward, so torch's strict deterministic mode would refuse to train).
    with apply_cuda_levers(cuda and config["hardware"]["allow_tf32"], cuda and config["hardware"]["cudnn_benchmark"],
                           deterministic=cuda and settings["deterministic"], strict=False):
        with tensorboard_curves(partial / "tensorboard") as curves:
            log, best_state, best_step = _fit(model, train_batches, val_batches, val_targets, points, settings, precision,
                                              data_config, f"classifier {arm.name} seed {seed}", show_progress, curves)
        # Test with the best step's weights.
        model.load_state_dict(best_state)
        test_probs, _ = predict(model, test_batches, precision, data_config["mean"], data_config["std"])
    n_boot = settings["bootstrap_samples"]
    # Patient-clustered intervals (films of one patient are not independent), as in the table.
    scored = stats.run_aurocs(test_targets, test_probs, test["patient"].astype(str).to_numpy(), n_boot, seed)
    macro = {**scored["macro"], "labels_used": [classes[j] for j in scored["macro"]["labels_used"]]}
    per_label = dict(zip(classes, scored["per_label"]))
    best = next(row for row in log if row["step"] == best_step)

    n_real_seen = int((mix["source"] == "real").sum())
    n_syn = int(mix["source"].isin(SYNTHETIC_SOURCES).sum())
    metrics = {
        "arm": arm.name,
        "arm_kind": arm.kind.value,
        "ratio": arm.ratio,
        "seed": int(seed),
        "optimizer_steps": steps,
        "validation_steps": list(points),
        "phases": [{"phase": phase, "steps": count} for phase, count in phases],
        "model": settings["model"],
        "pretrained_weights": pretrained_weights,
        "classes": classes,
        "n_real_train": n_real_seen,
        "n_synthetic_train": n_syn,
        "n_oversampled_train": int((mix["source"] == "oversampled").sum()),
        "n_synthetic_excluded": data["n_excluded"],
        "achieved_synthetic_share": round(n_syn / len(mix), 6),
        "rebalance_shortfall": data.get("rebalance_shortfall"),
        "more_real_shortfall": data.get("more_real_shortfall"),
        "best_step": best_step,
        "selection": "val macro AUROC" if best["val_macro_auroc"] is not None
                     else "val loss (no val label has both positive and negative images)",
        "val_macro_auroc": best["val_macro_auroc"],
        "n_val": len(val),
        "test": {"macro": macro, "per_label": per_label},
        "n_test": len(test),
        "test_positives": {label: int(test_targets[:, j].sum()) for j, label in enumerate(classes)},
        "bootstrap_samples": n_boot,
        "image_size": size,
        "batch_size": settings["batch_size"],
        "seconds": None,
        "device": describe_device(device),
        "precision": precision.describe(),
        "data_path": "decode-once cache" if cache_dir is not None else "decoded at every access",
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "sklearn": sklearn.__version__,
                     "python": platform.python_version()},
        "config_hash": study_hash(config),
        "splits": {name: str(split_path(data_dir, name)) for name in EVALUATION_SPLITS},
        "synthetic_csv": str(synthetic_csv) if arm.pool else None,
        "exclude_synthetic_csv": str(exclude_csv) if exclude_csv is not None else None,
    }

    predictions = pd.DataFrame({"path": test["path"].to_numpy(), "labels": test["labels"].to_numpy()})
    for j, label in enumerate(classes):
        predictions[PROB_PREFIX + label] = test_probs[:, j]
    predictions.to_csv(partial / "predictions.csv", index=False)
    mix.to_csv(partial / "training_set.csv", index=False)
    composition(mix, config["dataset"]["labels"]).to_csv(partial / "composition.csv", index=False)
    pd.DataFrame(log, columns=["step", "train_loss", "val_loss", "val_macro_auroc"]).to_csv(partial / "train_log.csv", index=False)
    torch.save({"state_dict": best_state, "model": settings["model"], "classes": classes, "image_size": size,
                **data_config, "pretrained_weights": pretrained_weights, "best_step": best_step,
                "arm": arm.name, "ratio": arm.ratio, "seed": int(seed)}, partial / "model.pt")
    return metrics


# ----------------------------------------------------------------------------- CLI


@run_stage
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    add_split_arguments(parser, EVALUATION_SPLITS)
    parser.add_argument("--arm", required=True, metavar="NAME",
                        help=f"ratio<percent> (ratio0 = real only, ratio25, ...) or a control: {', '.join(controls())}")
    parser.add_argument("--synthetic", type=Path, default=None,
                        help="the list of images the arm draws from (default: its pool's, the merged "
                             "generation_results.csv; for --arm noise make_noise_images'; not read for ratio0)")
    parser.add_argument("--exclude-synthetic", type=Path, default=None, metavar="CSV",
                        help="CSV with a `file` column: synthetic images (as in generation_results.csv) left out of the pool")
    parser.add_argument("--seed", type=int, nargs="+", required=True,
                        help="training seed (synthetic draw, init, order); several run one after another")
    parser.add_argument("--out-dir", type=Path, nargs="+", required=True,
                        help="e.g. results/classifier/ratio25_seed0; one per --seed, in the same order")
    parser.add_argument("--cache-dir", type=Path, default=Path(paths.CLASSIFIER_CACHE),
                        help="decode-once caches of the splits and pools, shared by every arm and seed")
    parser.add_argument("--no-cache", action="store_true", help="decode every film at every access instead (slow)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads for the run (default: torch's); on a CPU, several seeds train at once in "
                             "min(seeds, N) processes that share them (the workflow passes its job_cores)")
    args = parser.parse_args(argv)
    if len(args.seed) != len(args.out_dir) or len(set(args.out_dir)) != len(args.out_dir):
        raise ConfigError(f"--seed {' '.join(map(str, args.seed))} needs as many distinct --out-dir folders, "
                          f"got {len(args.out_dir)}: {' '.join(map(str, args.out_dir))}")
    config, splits = config_from_args(args, "train_classifier"), splits_from_args(args, EVALUATION_SPLITS)
    pool = parse_arm(args.arm, config).pool
    synthetic = args.synthetic or (Path(pool.default) if pool else None)
    if len(args.seed) > 1:  # the arm's job runs every seed; this is how to run one of them again alone
        flags = one_seed_flags(sys.argv[1:] if argv is None else argv)
        for seed, out_dir in zip(args.seed, args.out_dir):
            print(f"re-run seed {seed} alone: python -m workflow_scripts.classifier.train_classifier "
                  f"{shlex.join([*flags, '--seed', str(seed), '--out-dir', str(out_dir)])}", flush=True)
    run = functools.partial(train_classifier, config, splits, synthetic, args.arm, exclude_csv=args.exclude_synthetic,
                            cache_dir=None if args.no_cache else args.cache_dir)
    for metrics, out_dir in train_seeds(run, args.seed, args.out_dir, seed_processes(len(args.seed), args.threads)):
        print(summary_line(metrics, out_dir), flush=True)
    return 0


def one_seed_flags(argv: Sequence[str]) -> list[str]:
    """The command line without its --seed and --out-dir lists (and --threads: one seed needs one process)."""
    kept, skipping = [], False
    for token in argv:
        if token.startswith("--"):
            skipping = token in ("--seed", "--out-dir", "--threads")
        if not skipping:
            kept.append(token)
    return kept


def seed_processes(n_seeds: int, threads: int | None) -> tuple[int, int]:
    """(processes, torch threads each) for an arm's seeds. On a CPU the seeds split the threads: a small
    model gains little from a second thread but a second seed in its own process nearly halves the
    arm's time (the demo: 4 seeds 43 s -> 22 s on 2 cores). A GPU trains one seed at a time."""
    threads = threads or torch.get_num_threads()
    if threads <= 1 or n_seeds <= 1 or pick_device().type != "cpu":
        return 1, threads
    processes = min(n_seeds, threads)
    return processes, threads // processes


def _train_one(run: Callable[..., dict[str, Any]], threads: int, seed: int, out_dir: Path,
               show_progress: bool) -> dict[str, Any]:
    torch.set_num_threads(threads)
    return run(seed=seed, out_dir=out_dir, show_progress=show_progress)


def train_seeds(run: Callable[..., dict[str, Any]], seeds: Sequence[int], out_dirs: Sequence[Path],
                processes: tuple[int, int]) -> Iterator[tuple[dict[str, Any], Path]]:
    """(metrics, out_dir) per seed, in seed order: one after another in this process, or in a pool of
    processes. Each seed reseeds everything, so it gives what it gives alone either way (on a CPU
    bit-identical; tests/test_train_classifier.py)."""
    count, threads = processes
    if count == 1:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for seed, out_dir in zip(seeds, out_dirs):
                yield run(seed=seed, out_dir=out_dir, show_progress=True), out_dir
        finally:
            torch.set_num_threads(before)
        return
    print(f"{len(seeds)} seeds in {count} processes of {threads} thread(s) each", file=sys.stderr, flush=True)
    with ProcessPoolExecutor(max_workers=count) as pool:  # one progress bar: the first seed's
        futures = [pool.submit(_train_one, run, threads, seed, out_dir, index == 0)
                   for index, (seed, out_dir) in enumerate(zip(seeds, out_dirs))]
        try:
            for future, out_dir in zip(futures, out_dirs):
                yield future.result(), out_dir
        except BaseException:
            for future in futures:  # a failed seed fails the job: the seeds not yet started do not start
                future.cancel()
            raise


def summary_line(metrics: Mapping[str, Any], out_dir: Path) -> str:
    """One line per finished run for the log."""
    macro = metrics["test"]["macro"]
    shown = (f"{macro['auroc']:.3f} (95% CI {macro['ci_low']:.3f}-{macro['ci_high']:.3f})"
             if macro["auroc"] is not None and macro["ci_low"] is not None else str(macro["auroc"]))
    return (f"arm {metrics['arm']} seed {metrics['seed']}: {metrics['n_real_train']} real + {metrics['n_oversampled_train']} "
            f"oversampled + {metrics['n_synthetic_train']} synthetic, {metrics['optimizer_steps']} steps, best step "
            f"{metrics['best_step']}, test macro AUROC {shown} in {metrics['seconds']:.0f} s; weights: "
            f"{metrics['pretrained_weights']}; outputs in {out_dir}")


if __name__ == "__main__":
    sys.exit(main())
