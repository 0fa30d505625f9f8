# Weights: checked while Snakemake builds the DAG, before any job runs (a dry run shows it too), and
# fetched by `snakemake download_weights` (python -m workflow_scripts.models.weights) where the hub is reachable.
rule download_weights:
    # No output: it runs whenever asked and fetches only what is missing.
    input:
        config=stage_config_file("download_weights"),
    log:
        "logs/download_weights/download_weights.log",
    conda:
        "../envs/cxr-synth.yaml"
    shell:
        "python -m workflow_scripts.models.weights --config {input.config} --download 2>&1 | tee {log}"


localrules:
    download_weights,
