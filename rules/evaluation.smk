# Evaluation stage: classifiers at each synthetic ratio and seed -> fidelity and audit -> the table.


rule train_classifier:
    input:
        unpack(classifier_inputs),
    output:
        metrics="results/classifier/ratio{ratio}_seed{seed}/metrics.json",
        predictions="results/classifier/ratio{ratio}_seed{seed}/predictions.csv",
        model="results/classifier/ratio{ratio}_seed{seed}/model.pt",
    params:
        settings=config_sections("dataset", "classifier"),
        stage_config=STAGE_CONFIG,
        data_dir=lambda wildcards, input: os.path.dirname(input.train),
        synthetic=lambda wildcards, input: f"--synthetic {input.synthetic}" if "synthetic" in input.keys() else "",
        out_dir=lambda wildcards, output: os.path.dirname(output.metrics),
    resources:
        gpu=1,
    log:
        "logs/train_classifier/ratio{ratio}_seed{seed}.log",
    benchmark:
        "benchmarks/train_classifier/ratio{ratio}_seed{seed}.tsv"
    conda:
        "../envs/cxr-synth.yaml"
    shell:
        "python -m workflow_scripts.train_classifier {params.stage_config} --data-dir {params.data_dir}"
        " {params.synthetic} --ratio {wildcards.ratio} --seed {wildcards.seed} --out-dir {params.out_dir} > {log} 2>&1"


rule audit_memorization:
    input:
        train=rules.prepare_dataset.output.train,
        val=rules.prepare_dataset.output.val,
        test=rules.prepare_dataset.output.test,
        synthetic=rules.merge_generation.output.results,
    output:
        flagged="results/evaluation/audit/flagged.csv",
        audit="results/evaluation/audit/audit.csv",
        pairs="results/evaluation/audit/pairs.csv",
        summary="results/evaluation/audit_summary.json",
    params:
        settings=config_sections("model", "evaluation"),
        stage_config=STAGE_CONFIG,
        data_dir=lambda wildcards, input: os.path.dirname(input.train),
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
        "python -m workflow_scripts.fidelity.audit {params.stage_config} --data-dir {params.data_dir}"
        " --synthetic {input.synthetic} --out-dir {params.out_dir} > {log} 2>&1"


rule evaluate_fidelity:
    input:
        train=rules.prepare_dataset.output.train,
        val=rules.prepare_dataset.output.val,
        synthetic=rules.merge_generation.output.results,
        classifier=expand(
            "results/classifier/ratio0_seed{seed}/model.pt", seed=config["classifier"]["seeds"][0]
        ),
        audit_summary=rules.audit_memorization.output.summary,
    output:
        fidelity=report("results/evaluation/fidelity.csv", category="Fidelity"),
        fidelity_json="results/evaluation/fidelity.json",
        fidelity_md="results/evaluation/fidelity.md",
        diversity="results/evaluation/diversity.csv",
        adherence="results/evaluation/adherence.csv",
        plots=directory("results/evaluation/plots"),
    params:
        settings=config_sections("dataset", "model", "evaluation", "classifier"),
        stage_config=STAGE_CONFIG,
        data_dir=lambda wildcards, input: os.path.dirname(input.train),
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
        "python -m workflow_scripts.evaluate_fidelity {params.stage_config} --data-dir {params.data_dir}"
        " --synthetic {input.synthetic} --classifier {input.classifier} --audit-summary {input.audit_summary}"
        " --out-dir {params.out_dir} > {log} 2>&1"


rule compare:
    input:
        metrics=expand(
            "results/classifier/ratio{ratio}_seed{seed}/metrics.json",
            ratio=config["classifier"]["ratios"],
            seed=config["classifier"]["seeds"],
        ),
        fidelity=rules.evaluate_fidelity.output.fidelity,
        audit=rules.audit_memorization.output.summary,
        lora=rules.train_lora.output.final,
        synthetic=rules.merge_generation.output.results,
        train=rules.prepare_dataset.output.train,
    output:
        table_md=report("results/comparison.md", category="Comparison"),
        table_csv=report("results/comparison.csv", category="Comparison"),
        auroc_plot=report("results/plots/auroc_vs_ratio.png", category="Comparison"),
        fidelity_plot=report("results/plots/fidelity_per_label.png", category="Fidelity"),
        grid=report("results/plots/real_vs_synthetic.png", category="Fidelity"),
    params:
        settings=config_sections("classifier", "generation", "model"),
        stage_config=STAGE_CONFIG,
        classifier_dir=lambda wildcards, input: os.path.dirname(os.path.dirname(input.metrics[0])),
        evaluation_dir=lambda wildcards, input: os.path.dirname(input.fidelity),
        data_dir=lambda wildcards, input: os.path.dirname(input.train),
        out_dir=lambda wildcards, output: os.path.dirname(output.table_csv),
    log:
        "logs/compare/compare.log",
    benchmark:
        "benchmarks/compare/compare.tsv"
    conda:
        "../envs/cxr-synth.yaml"
    shell:
        "python -m workflow_scripts.compare {params.stage_config} --classifier-dir {params.classifier_dir}"
        " --evaluation-dir {params.evaluation_dir} --lora-summary {input.lora}/training_summary.json"
        " --data-dir {params.data_dir} --synthetic {input.synthetic} --out-dir {params.out_dir} > {log} 2>&1"
