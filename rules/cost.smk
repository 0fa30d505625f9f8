# Cost before a run: the work of every stage and a time range on one GPU, from the prepared splits.
# Not part of `all`: `snakemake estimate_cost` (add -n to see that only the data stage runs first).


rule estimate_cost:
    input:
        train=rules.prepare_dataset.output.train,
        val=rules.prepare_dataset.output.val,
        test=rules.prepare_dataset.output.test,
        config=stage_config_file("estimate_cost"),
    output:
        cost=f"{paths.RESULTS}/cost.md",
    params:
        data_dir=folder_of("input", "train"),  # the split files above
    log:
        "logs/estimate_cost/estimate_cost.log",
    benchmark:
        "benchmarks/estimate_cost/estimate_cost.tsv"
    conda:
        "../envs/cxr-synth.yaml"
    shell:
        "python -m workflow_scripts.study.cost --config {input.config} --data-dir {params.data_dir} --out {output.cost}"
        " > {log} 2>&1"
