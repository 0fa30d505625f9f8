# Evaluation stage: classifiers for every arm of the study (ratios and controls) and seed -> fidelity and audit
# -> the table.


# One job per arm runs its seeds one after another in one process (the imports, the model library and
# the decode-once caches are paid once per arm, not per seed); each seed keeps its own declared outputs.
rule train_classifier:
    input:
        unpack(classifier_inputs),
        config=stage_config_file("train_classifier"),
        weights=weights_ready("train_classifier"),  # the weights check, before any job (rules/weights.smk)
    output:
        metrics=arm_seed_outputs("metrics.json"),
        predictions=arm_seed_outputs("predictions.csv"),
        model=arm_seed_outputs("model.pt"),
        composition=arm_seed_outputs("composition.csv"),
        train_log=arm_seed_outputs("train_log.csv"),  # also in tensorboard/ beside it
    params:
        synthetic=lambda wildcards, input: f"--synthetic {input.synthetic}" if "synthetic" in input.keys() else "",
        exclude=lambda wildcards, input: f"--exclude-synthetic {input.exclude}" if "exclude" in input.keys() else "",
        seeds=" ".join(str(seed) for seed in config["classifier"]["seeds"]),
        out_dirs=folder_of("output", "metrics"),
        cache_dir=paths.CLASSIFIER_CACHE,
        job_cores=job_cores,  # under --cores 1 the seeds train side by side, one per core
    resources:
        gpu=1,
    log:
        "logs/train_classifier/{arm}.log",
    benchmark:
        "benchmarks/train_classifier/{arm}.tsv"
    conda:
        "../envs/cxr-synth.yaml"
    shell:
        "python -m workflow_scripts.classifier.train_classifier --config {input.config} --train {input.train} --val {input.val}"
        " --test {input.test}"
        " {params.synthetic} {params.exclude} --arm {wildcards.arm} --seed {params.seeds} --out-dir {params.out_dirs}"
        " --cache-dir {params.cache_dir} --threads {params.job_cores}"
        " > {log} 2>&1"


# One seed alone: what a seed outside classifier.seeds runs.
rule train_classifier_seed:
    input:
        unpack(classifier_inputs),
        config=stage_config_file("train_classifier"),
    output:
        metrics=f"{paths.CLASSIFIER_RUN}/metrics.json",
        predictions=f"{paths.CLASSIFIER_RUN}/predictions.csv",
        model=f"{paths.CLASSIFIER_RUN}/model.pt",
        composition=f"{paths.CLASSIFIER_RUN}/composition.csv",
        train_log=f"{paths.CLASSIFIER_RUN}/train_log.csv",  # also in tensorboard/ beside it
    params:
        synthetic=lambda wildcards, input: f"--synthetic {input.synthetic}" if "synthetic" in input.keys() else "",
        exclude=lambda wildcards, input: f"--exclude-synthetic {input.exclude}" if "exclude" in input.keys() else "",
        out_dir=folder_of("output", "metrics"),
        cache_dir=paths.CLASSIFIER_CACHE,
    resources:
        gpu=1,
    log:
        "logs/train_classifier_seed/{arm}_seed{seed}.log",
    benchmark:
        "benchmarks/train_classifier_seed/{arm}_seed{seed}.tsv"
    conda:
        "../envs/cxr-synth.yaml"
    shell:
        "python -m workflow_scripts.classifier.train_classifier --config {input.config} --train {input.train} --val {input.val}"
        " --test {input.test}"
        " {params.synthetic} {params.exclude} --arm {wildcards.arm} --seed {wildcards.seed} --out-dir {params.out_dir}"
        " --cache-dir {params.cache_dir} > {log} 2>&1"


ruleorder: train_classifier > train_classifier_seed


# Each control is its own target (`snakemake train_noise_control`), run by `all` when listed in
# classifier.controls and skipped otherwise: one per control of workflow_scripts.study.arms.
for _control in controls():

    rule:
        name:
            f"train_{_control}_control"
        input:
            study_runs([_control]),


rule audit_memorization:
    input:
        train=rules.prepare_dataset.output.train,
        val=rules.prepare_dataset.output.val,
        test=rules.prepare_dataset.output.test,
        synthetic=rules.merge_generation.output.results,
        config=stage_config_file("audit_memorization"),
    output:
        flagged=f"{paths.AUDIT}/flagged.csv",
        audit=f"{paths.AUDIT}/audit.csv",
        pairs=f"{paths.AUDIT}/pairs.csv",
        summary=f"{paths.EVALUATION}/audit_summary.json",
    params:
        out_dir=folder_of("output", "summary"),
        threads_env=threads_env,
    resources:
        gpu=1,
        # Working memory of one block of the search (MiB): --set-resources audit_memorization:audit_block_mb=8192
        audit_block_mb=512,
    log:
        "logs/audit_memorization/audit_memorization.log",
    benchmark:
        "benchmarks/audit_memorization/audit_memorization.tsv"
    conda:
        "../envs/cxr-synth.yaml"
    shell:
        "{params.threads_env} python -m workflow_scripts.fidelity.audit --config {input.config} --train {input.train} --val {input.val}"
        " --test {input.test} --synthetic {input.synthetic} --out-dir {params.out_dir}"
        " --block-mb {resources.audit_block_mb} > {log} 2>&1"


rule evaluate_fidelity:
    input:
        train=rules.prepare_dataset.output.train,
        val=rules.prepare_dataset.output.val,
        synthetic=rules.merge_generation.output.results,
        base_synthetic=rules.generate_without_lora.output.results,
        classifier=reference_classifier,
        audit_summary=rules.audit_memorization.output.summary,
        config=stage_config_file("evaluate_fidelity"),
    output:
        fidelity=report(
            f"{paths.EVALUATION}/fidelity.csv", category="2. Fidelity", labels={"page": "fidelity.csv (download)"}
        ),
        fidelity_json=f"{paths.EVALUATION}/fidelity.json",
        fidelity_md=paths.FIDELITY_PAGE,
        diversity=f"{paths.EVALUATION}/diversity.csv",
        adherence=f"{paths.EVALUATION}/adherence.csv",
        plots=report(
            directory(f"{paths.EVALUATION}/plots"),
            patterns=["{name}.png"],
            category="2. Fidelity",
            labels={"page": "plot: {name}"},
        ),
    params:
        out_dir=folder_of("output", "fidelity_md"),
        threads_env=threads_env,
    resources:
        gpu=1,
    log:
        "logs/evaluate_fidelity/evaluate_fidelity.log",
    benchmark:
        "benchmarks/evaluate_fidelity/evaluate_fidelity.tsv"
    conda:
        "../envs/cxr-synth.yaml"
    shell:
        "{params.threads_env} python -m workflow_scripts.fidelity.evaluate_fidelity --config {input.config} --train {input.train} --val {input.val}"
        " --synthetic {input.synthetic} --base-synthetic {input.base_synthetic} --classifier {input.classifier}"
        " --audit-summary {input.audit_summary}"
        " --out-dir {params.out_dir} > {log} 2>&1"


rule compare:
    input:
        metrics=study_runs(),
        predictions=study_runs(output="predictions"),
        composition=study_runs(output="composition"),
        fidelity=rules.evaluate_fidelity.output.fidelity_md,
        lora_summary=rules.train_lora.output.summary,
        synthetic=rules.merge_generation.output.results,
        train=rules.prepare_dataset.output.train,
        test=rules.prepare_dataset.output.test,
        prepare_summary=rules.prepare_dataset.output.summary,
        reader_study=reader_study_scores,  # the reader study's pooled row, once answers exist
        config=stage_config_file("compare"),
    output:
        table_md=f"{paths.RESULTS}/comparison.md",  # in the report as results/report/comparison.html
        table_csv=report(
            f"{paths.RESULTS}/comparison.csv", category="1. Answer", labels={"page": "comparison.csv (download)"}
        ),
        auroc_plot=report(
            f"{paths.PLOTS}/auroc_vs_ratio.png",
            category="1. Answer",
            labels={"page": "plot: AUROC vs synthetic share"},
        ),
        grid=report(
            f"{paths.PLOTS}/real_vs_synthetic.png", category="2. Fidelity", labels={"page": "plot: real vs synthetic"}
        ),
    params:
        runs=folder_of("input", "metrics"),
        out_dir=folder_of("output", "table_csv"),  # comparison.md/.csv, and its plots in plots/
        reader_study=lambda wildcards, input: f"--reader-study {input.reader_study}" if input.reader_study else "",
    log:
        "logs/compare/compare.log",
    benchmark:
        "benchmarks/compare/compare.tsv"
    conda:
        "../envs/cxr-synth.yaml"
    shell:
        "python -m workflow_scripts.study.compare --config {input.config} --runs {params.runs}"
        " --fidelity {input.fidelity} --lora-summary {input.lora_summary} --train {input.train} --test {input.test}"
        " --prepare-summary {input.prepare_summary} --synthetic {input.synthetic} {params.reader_study}"
        " --out-dir {params.out_dir} > {log} 2>&1"


# Not part of `all`: `snakemake plan_power` after a pilot (or a whole study) prints the seeds and
# test patients needed for classifier.target_mde (docs/reading-the-table.md).
rule plan_power:
    input:
        metrics=study_runs(),
        test=rules.prepare_dataset.output.test,
        config=stage_config_file("plan_power"),
    output:
        page=f"{paths.RESULTS}/power.md",
    params:
        runs=folder_of("input", "metrics"),
    log:
        "logs/plan_power/plan_power.log",
    benchmark:
        "benchmarks/plan_power/plan_power.tsv"
    conda:
        "../envs/cxr-synth.yaml"
    shell:
        "python -m workflow_scripts.study.power --config {input.config} --runs {params.runs} --test {input.test}"
        " --out {output.page} > {log} 2>&1"
