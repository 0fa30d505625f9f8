# Shared helpers: config validation and how each stage's command line gets the configuration.
import os
import shlex
import sys

from snakemake.exceptions import WorkflowError

# Stage logic lives in the workflow_scripts package. This process imports it for validation;
# jobs run it as `python -m workflow_scripts.<stage>`, from any working directory.
sys.path.insert(0, workflow.basedir)
shell.prefix(f"export PYTHONPATH={shlex.quote(workflow.basedir)}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; ")

from workflow_scripts.config import load_config, overrides_between, validate_config
from workflow_scripts.study import ARM_PATTERN, arm_names, parse_arm, plan_settings, study_settings

# Friendly messages for every bad key, then snakemake.utils.validate fills in the defaults.
validate_config(config)

DEMO_CSV = "results/demo_data/Data_Entry_2017.csv"  # made by the demo_dataset rule
if config["dataset"]["csv"] != DEMO_CSV and not os.path.isfile(config["dataset"]["csv"]):
    raise WorkflowError(
        f"dataset.csv: {config['dataset']['csv']} not found. Point dataset.csv and dataset.images at your "
        "dataset (README: 'Using a real dataset'), or run the demo with the default config/config.yaml."
    )


def stage_config_args():
    """`--config FILE... [--set KEY=VALUE...]` giving a stage exactly this run's configuration:
    the config files in Snakemake's merge order plus any `snakemake --config` overrides."""
    from_command_line = list(workflow.overwrite_configfiles or [])
    files = [f for f in workflow.configfiles if f not in from_command_line] + from_command_line
    overrides = overrides_between(load_config(files), config)
    return " ".join(
        ["--config", *map(shlex.quote, map(str, files))]
        + [f"--set {shlex.quote(item)}" for item in overrides]
    )


STAGE_CONFIG = stage_config_args()


def config_sections(*names):
    """Config sections as a params value, so that Snakemake re-runs a job when they change."""
    return {name: config[name] for name in names}


def base_model_input(wildcards):
    """The offline tiny model is built by a rule; a hub id or local SD folder is loaded as is."""
    return rules.build_tiny_model.output.model if config["model"]["pretrained"] == "tiny" else []


def python_launcher(wildcards, resources):
    """`python`, or `accelerate launch` with one process per GPU when a job gets several
    (e.g. `--set-resources train_lora:gpu=4`): data-parallel training on existing engines."""
    if resources.gpu <= 1:
        return "python"
    return f"accelerate launch --multi_gpu --num_processes {resources.gpu}"


wildcard_constraints:
    label=r"[A-Za-z0-9_]+(\+[A-Za-z0-9_]+)*",
    ratio=r"\d+",
    seed=r"\d+",
    arm=ARM_PATTERN,


def planned_generation_results(wildcards):
    """One generation_results.csv per label of the plan with images to make (known after the
    plan_generation checkpoint has run)."""
    import pandas as pd

    plan = pd.read_csv(checkpoints.plan_generation.get().output.plan)
    keys = plan.loc[plan["count"] > 0, "key"]
    return expand("results/synthetic/{label}/generation_results.csv", label=keys)


def classifier_inputs(wildcards):
    """The splits, plus the synthetic pool the arm draws from: the generated images (synthetic arms,
    the pretrain control, and the rebalanced control, which mirrors their labels with real images)
    or the noise images (noise control). The real-only baseline does not wait for generation."""
    inputs = {
        "train": rules.prepare_dataset.output.train,
        "val": rules.prepare_dataset.output.val,
        "test": rules.prepare_dataset.output.test,
    }
    pool = parse_arm(wildcards.arm, config).pool
    if pool == "generated":
        inputs["synthetic"] = rules.merge_generation.output.results
    elif pool == "noise":
        inputs["synthetic"] = rules.make_noise_images.output.results
    return inputs


def study_runs(arms=None):
    """metrics.json of every seed of `arms` (default: every arm of the study, classifier.ratios then
    classifier.controls)."""
    return expand(
        "results/classifier/{arm}_seed{seed}/metrics.json",
        arm=arms if arms is not None else arm_names(config),
        seed=config["classifier"]["seeds"],
    )
