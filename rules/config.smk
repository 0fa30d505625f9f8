# Config stage: the part of the configuration each stage declares, one file per stage.


rule write_stage_config:
    output:
        f"{paths.STAGE_CONFIG}/{{stage}}.yaml",
    params:
        # The declared part itself is the params value: Snakemake re-runs this job, and so the
        # stage's job, when it changes, and only then.
        declared=lambda wildcards: stage_config(config, wildcards.stage),
    log:
        "logs/write_stage_config/{stage}.log",
    run:
        write_stage_config(output[0], wildcards.stage, params.declared)


localrules:
    write_stage_config,
