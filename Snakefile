# cxr-synth: label-conditioned synthetic chest X-rays, and whether they help a classifier.
# The pipeline reads top to bottom: data -> LoRA training -> generation -> evaluation -> table.
from snakemake.utils import min_version

min_version("9.0")


# The landing page of `snakemake --report`: the study in a paragraph, its headline and one row per arm.
report: "report/workflow.rst"


# Defaults live in config/schema.yaml (SD 1.5). The demo overlay (config/config.yaml) applies only
# when no --configfile is given, so a real-data config stands alone: rules/common.smk reads it.
include: "rules/common.smk"
include: "rules/config.smk"
include: "rules/weights.smk"
include: "rules/data.smk"
include: "rules/lora.smk"
include: "rules/generation.smk"
include: "rules/evaluation.smk"
include: "rules/cost.smk"
include: "rules/reader_study.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        rules.verify_dataset.output,
        rules.compare.output,
        rules.render_report_pages.output,
        rules.plot_training_curves.output,
        reader_study_targets,
