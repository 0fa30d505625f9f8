# Shared helpers: config validation, the per-stage config files, input functions.
import os
import shlex
from pathlib import Path
import sys

from snakemake.exceptions import WorkflowError

# Stage logic lives in the workflow_scripts package. This process imports it for validation;
# jobs run it as `python -m workflow_scripts.<package>.<stage>`, from any working directory.
sys.path.insert(0, workflow.basedir)
shell.prefix(f"export PYTHONPATH={shlex.quote(workflow.basedir)}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; ")

from workflow_scripts.common import paths  # every folder under results/
from workflow_scripts.common.config import (
    STAGE_CONFIG,
    check_config_files,
    stage_config,
    validate_config,
    write_stage_config,
)
from workflow_scripts.common.rerun_reasons import stage_changes
from workflow_scripts.data.resolve import default_workers  # cores this process may use (affinity mask)
from workflow_scripts.study.arms import REFERENCE, arm_names, arm_pattern, controls, parse_arm
from workflow_scripts.models.weights import inventory as weights_inventory, render as render_weights, stop_message

# The demo overlay, only when no --configfile is given. Read strictly first: Snakemake's own reader
# names neither file nor line for a tab or an empty file. (A --configfile Snakemake reads before
# the workflow starts; the config CLI, workflow_scripts/common/config.py --config FILE, names the line there.)
if not workflow.overwrite_configfiles:
    check_config_files(["config/config.yaml"])

    configfile: "config/config.yaml"


# A key written twice in a config file is refused (naming the file and both lines), then friendly
# messages for every bad key, then snakemake.utils.validate fills in the defaults.
check_config_files(workflow.configfiles)
validate_config(config)

# The keys that re-run a stage, named (Snakemake's own reason prints both whole configurations).
if workflow.is_main_process:
    _changed = stage_changes({stage: stage_config(config, stage) for stage in STAGE_CONFIG})
    if _changed:
        print("Configuration changed since these stages last ran (they re-run):", *_changed, sep="\n", file=sys.stderr)

if os.path.isdir(config["dataset"]["csv"]):
    raise WorkflowError(f"dataset.csv: {config['dataset']['csv']} is a folder; point it at the label file itself.")
if os.path.realpath(config["dataset"]["images"]) == os.path.sep:  # Snakemake would only say "Empty file path"
    raise WorkflowError("dataset.images: '/' is the filesystem root; point it at the folder that holds the images.")
for key in ("csv", "images"):  # Snakemake reads {...} in an input path as a wildcard, with no escape
    if "{" in config["dataset"][key] or "}" in config["dataset"][key]:
        raise WorkflowError(
            f"dataset.{key}: {config['dataset'][key]!r} holds a brace, which Snakemake reads as a wildcard in the "
            f"rule's input path. Rename the folder, or point dataset.{key} at a symlink without braces "
            "(python -m workflow_scripts.data.prepare_dataset takes such paths as they are)."
        )
if config["dataset"]["csv"] != paths.DEMO_CSV and not os.path.isfile(config["dataset"]["csv"]):
    raise WorkflowError(
        f"dataset.csv: {config['dataset']['csv']} not found. Point dataset.csv and dataset.images at your "
        "dataset (docs/data.md), or run the demo: no --configfile."
    )


def stage_config_file(stage):
    """<paths.STAGE_CONFIG>/<stage>.yaml: the part of this run's configuration that `stage` declares
    (STAGE_CONFIG in workflow_scripts/common/config.py), written by write_stage_config. The stage reads
    only this file, and the job re-runs exactly when its content changes."""
    return f"{paths.STAGE_CONFIG}/{stage}.yaml"


def base_model_input(wildcards):
    """The offline tiny model is built by a rule; a hub id or local SD folder is loaded as is."""
    return rules.build_tiny_model.output.model if config["model"]["pretrained"] == "tiny" else []


def python_launcher(wildcards, resources):
    """`python`, or `accelerate launch` with one process per GPU when a job gets several
    (e.g. `--set-resources train_lora:gpu=4`): data-parallel training on existing engines."""
    if resources.gpu <= 1:
        return "python"
    return f"accelerate launch --multi_gpu --num_processes {resources.gpu}"


def job_cores(wildcards, threads):
    """CPU cores a CPU-bound job may use (the generator's OMP_NUM_THREADS, the classifier's seeds side
    by side, the phantoms' drawing processes). Under a local `--cores 1` Snakemake runs one job at a
    time, so that job may use every core this process may use instead of leaving the rest idle (the
    demo's LoRA loop: 1.5x on 2 cores; an arm's 4 seeds: 43 s -> 22 s); with more cores, or on a
    cluster, the job keeps the threads Snakemake gives it."""
    try:
        one_job_at_a_time = workflow.local_exec and workflow.cores == 1
    except WorkflowError:  # no --cores (a cluster executor)
        one_job_at_a_time = False
    return default_workers() if one_job_at_a_time else threads


def threads_env(wildcards, threads):
    """The shell prefix that gives a torch job its job_cores: Snakemake sets both OMP_NUM_THREADS and
    MKL_NUM_THREADS to the job's threads, and MKL's count alone caps torch's matrix products (the
    demo's LoRA loop ran at 103 images/s with MKL_NUM_THREADS=1 beside OMP_NUM_THREADS=2, 173 with both 2)."""
    cores = job_cores(wildcards, threads)
    return f"OMP_NUM_THREADS={cores} MKL_NUM_THREADS={cores}"


wildcard_constraints:
    stage="|".join(STAGE_CONFIG),
    label=r"[A-Za-z0-9_]+(\+[A-Za-z0-9_]+)*",
    ratio=r"\d+",
    seed=r"\d+",
    arm=arm_pattern(),


def planned_generation_results(wildcards):
    """One generation_results.csv per label of the plan with images to make (known after the
    plan_generation checkpoint has run)."""
    import pandas as pd

    plan = pd.read_csv(checkpoints.plan_generation.get().output.plan)
    keys = plan.loc[plan["count"] > 0, "key"]
    return expand(rules.generate_label.output.results, label=keys)


def classifier_inputs(wildcards):
    """The splits, plus the list of images the arm's kind draws from (workflow_scripts.study.arms: its
    pool names the rule and output that make it). An arm without a pool (the real-only baseline)
    does not wait for generation."""
    inputs = {
        "train": rules.prepare_dataset.output.train,
        "val": rules.prepare_dataset.output.val,
        "test": rules.prepare_dataset.output.test,
    }
    pool = parse_arm(wildcards.arm, config).pool
    if pool is not None:
        inputs["synthetic"] = getattr(getattr(rules, pool.rule).output, pool.output)
        if pool.audited:
            # Near-copies of training images found by the memorization audit never reach a classifier
            # (the noise pool drops the rows that mirror them, so the noise arm stays a mirror).
            inputs["exclude"] = rules.audit_memorization.output.flagged
    return inputs


def arm_seed_outputs(name):
    """`name` (metrics.json, ...) in the run folder of every seed of classifier.seeds, for the arm wildcard."""
    return expand(f"{paths.CLASSIFIER_RUN}/{{name}}", arm="{arm}", seed=config["classifier"]["seeds"], name=name)


def folder_of(kind, name, up=1):
    """A params function: the folder `up` levels above the rule's declared `kind` ("input" or "output")
    file `name` (a list of files: their folders, each once, space-separated). The one place rules derive a
    folder: from a declared file, never a hard-coded one, since with remote storage Snakemake rewrites
    declared files only (snakemake --lint says so). The files themselves are named by paths.*."""

    def folder(wildcards, input, output):
        files = getattr(input if kind == "input" else output, name)
        files = [files] if isinstance(files, str) else list(files)
        return " ".join(dict.fromkeys(str(Path(file).parents[up - 1]) for file in files))  # each folder once

    return folder


def study_runs(arms=None, output="metrics"):
    """One output of train_classifier (metrics.json by default) for every seed of `arms` (default:
    every arm of the study, classifier.ratios then classifier.controls)."""
    return expand(
        getattr(rules.train_classifier_seed.output, output),
        arm=arms if arms is not None else arm_names(config),
        seed=config["classifier"]["seeds"],
    )


def reader_study_answers(wildcards):
    """The readers' exported CSVs in reader_study.answers_dir; a new file re-runs the scoring."""
    import glob

    folder = config["reader_study"]["answers_dir"]
    return sorted(path for path in glob.glob(os.path.join(folder, "*")) if path.lower().endswith(".csv"))


def reader_study_scores(wildcards):
    """The reader study's pooled row for comparison.md, once answers exist (nothing before)."""
    return rules.score_reader_study.output.pooled if reader_study_answers(wildcards) else []


def reader_study_targets(wildcards):
    """rule all builds the reader study's page only with reader_study.in_all."""
    return rules.reader_study.output.page if config["reader_study"]["in_all"] else []


def reference_classifier(wildcards=None):
    """model.pt of the real-only arm's first seed: the classifier that scores prompt adherence."""
    seed = config["classifier"]["seeds"][0]
    return f"{paths.classifier_run(REFERENCE, seed)}/model.pt"


# The weights check (rules/weights.smk): it runs while Snakemake builds the DAG, before any job.
_weights_state = {}  # the check runs once per Snakemake process


def check_weights():
    """List every weight the configuration needs (once) and stop, naming all missing ones, when a
    required one is absent. Only the main process checks: a cluster job's own Snakemake does not."""
    if "done" in _weights_state or not workflow.is_main_process:
        return
    _weights_state["done"] = True
    weights = weights_inventory(config)
    message = stop_message(weights)
    if message:
        raise WorkflowError(message)
    print(render_weights(weights), file=sys.stderr)


def weights_ready(rule_name):
    """An input function (of the rules that load weights) that adds no file: it runs the check while
    the DAG is built, unless this job's outputs already exist (a finished job loads nothing)."""

    def check(wildcards):
        outputs = expand(list(getattr(rules, rule_name).output), **dict(wildcards.items()))
        if not all(os.path.exists(path) for path in outputs):
            check_weights()
        return []

    return check
