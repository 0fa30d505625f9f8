# Evaluation stage: classifiers for every arm of the study (ratios and controls) and seed -> fidelity and audit
# -> the table.


rule train_classifier:
    input:
        unpack(classifier_inputs),
        config=stage_config_file("train_classifier"),
    output:
        metrics="results/classifier/{arm}_seed{seed}/metrics.json",
        predictions="results/classifier/{arm}_seed{seed}/predictions.csv",
        model="results/classifier/{arm}_seed{seed}/model.pt",
        composition="results/classifier/{arm}_seed{seed}/composition.csv",
    params:
        synthetic=lambda wildcards, input: f"--synthetic {input.synthetic}" if "synthetic" in input.keys() else "",
        exclude=lambda wildcards, input: f"--exclude-synthetic {input.exclude}" if "exclude" in input.keys() else "",
        out_dir=lambda wildcards, output: os.path.dirname(output.metrics),
    resources:
        gpu=1,
    log:
        "logs/train_classifier/{arm}_seed{seed}.log",
    benchmark:
        "benchmarks/train_classifier/{arm}_seed{seed}.tsv"
    conda:
        "../envs/cxr-synth.yaml"
    shell:
        "python -m workflow_scripts.train_classifier --config {input.config} --train {input.train} --val {input.val}"
        " --test {input.test}"
        " {params.synthetic} {params.exclude} --arm {wildcards.arm} --seed {wildcards.seed} --out-dir {params.out_dir} > {log} 2>&1"


# Each control is its own target (`snakemake train_noise_control`), run by `all` when listed in
# classifier.controls and skipped otherwise.
rule train_rebalanced_control:
    input:
        study_runs(["rebalanced"]),


rule train_noise_control:
    input:
        study_runs(["noise"]),


rule train_pretrain_control:
    input:
        study_runs(["pretrain"]),


rule audit_memorization:
    input:
        train=rules.prepare_dataset.output.train,
        val=rules.prepare_dataset.output.val,
        test=rules.prepare_dataset.output.test,
        synthetic=rules.merge_generation.output.results,
        config=stage_config_file("audit_memorization"),
    output:
        flagged="results/evaluation/audit/flagged.csv",
        audit="results/evaluation/audit/audit.csv",
        pairs="results/evaluation/audit/pairs.csv",
        summary="results/evaluation/audit_summary.json",
    params:
        out_dir=lambda wildcards, output: os.path.dirname(output.summary),
    resources:
        gpu=1,
    log:
        "logs/audit_memorization/audit_memorization.log",
    benchmark:
        "benchmarks/audit_memorization/audit_memorization.tsv"
    conda:
        "../envs/cxr-synth.yaml"
    shell:
        "python -m workflow_scripts.fidelity.audit --config {input.config} --train {input.train} --val {input.val}"
        " --test {input.test} --synthetic {input.synthetic} --out-dir {params.out_dir} > {log} 2>&1"


rule evaluate_fidelity:
    input:
        train=rules.prepare_dataset.output.train,
        val=rules.prepare_dataset.output.val,
        synthetic=rules.merge_generation.output.results,
        classifier=expand("results/classifier/ratio0_seed{seed}/model.pt", seed=config["classifier"]["seeds"][0]),
        audit_summary=rules.audit_memorization.output.summary,
        config=stage_config_file("evaluate_fidelity"),
    output:
        fidelity=report("results/evaluation/fidelity.csv", category="Fidelity"),
        fidelity_json="results/evaluation/fidelity.json",
        fidelity_md="results/evaluation/fidelity.md",
        diversity="results/evaluation/diversity.csv",
        adherence="results/evaluation/adherence.csv",
        plots=directory("results/evaluation/plots"),
    params:
        out_dir=lambda wildcards, output: os.path.dirname(output.fidelity),
    resources:
        gpu=1,
    log:
        "logs/evaluate_fidelity/evaluate_fidelity.log",
    benchmark:
        "benchmarks/evaluate_fidelity/evaluate_fidelity.tsv"
    conda:
        "../envs/cxr-synth.yaml"
    shell:
        "python -m workflow_scripts.evaluate_fidelity --config {input.config} --train {input.train} --val {input.val}"
        " --synthetic {input.synthetic} --classifier {input.classifier} --audit-summary {input.audit_summary}"
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
        config=stage_config_file("compare"),
    output:
        table_md=report("results/comparison.md", category="Comparison"),
        table_csv=report("results/comparison.csv", category="Comparison"),
        auroc_plot=report("results/plots/auroc_vs_ratio.png", category="Comparison"),
        grid=report("results/plots/real_vs_synthetic.png", category="Fidelity"),
    params:
        runs=lambda wildcards, input: " ".join(os.path.dirname(path) for path in input.metrics),
        out_dir=lambda wildcards, output: os.path.dirname(output.table_csv),
    log:
        "logs/compare/compare.log",
    benchmark:
        "benchmarks/compare/compare.tsv"
    conda:
        "../envs/cxr-synth.yaml"
    shell:
        "python -m workflow_scripts.compare --config {input.config} --runs {params.runs}"
        " --fidelity {input.fidelity} --lora-summary {input.lora_summary} --train {input.train} --test {input.test}"
        " --prepare-summary {input.prepare_summary} --synthetic {input.synthetic} --out-dir {params.out_dir} > {log} 2>&1"
