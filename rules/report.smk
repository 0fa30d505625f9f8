# Report stage: the pages `snakemake --report results/report.html` shows, rendered to HTML (a .md result
# would be only a download link there); report/workflow.rst puts the summary on the landing page.


rule render_report_pages:
    input:
        comparison=rules.compare.output.table_md,
        comparison_csv=rules.compare.output.table_csv,
        fidelity=rules.evaluate_fidelity.output.fidelity_md,
        plots=rules.evaluate_fidelity.output.plots,
        verify=rules.verify_dataset.output.report_md,
    output:
        comparison=report(
            f"{paths.REPORT_PAGES}/comparison.html",
            caption="../report/comparison.rst",
            category="1. Answer",
            labels={"page": "comparison table"},
        ),
        fidelity=report(
            f"{paths.REPORT_PAGES}/fidelity.html",
            caption="../report/fidelity.rst",
            category="2. Fidelity",
            labels={"page": "fidelity, diversity, adherence, audit"},
        ),
        verify=report(
            f"{paths.REPORT_PAGES}/verify_report.html",
            caption="../report/verify.rst",
            category="3. Data",
            labels={"page": "data check"},
        ),
        summary=f"{paths.REPORT_PAGES}/summary.html",
    params:
        out_dir=folder_of("output", "summary"),
    log:
        "logs/render_report_pages/render_report_pages.log",
    benchmark:
        "benchmarks/render_report_pages/render_report_pages.tsv"
    conda:
        "../envs/cxr-synth.yaml"
    shell:
        "python -m workflow_scripts.report.report_pages --comparison {input.comparison} --comparison-csv {input.comparison_csv}"
        " --fidelity {input.fidelity} --verify {input.verify} --out-dir {params.out_dir} > {log} 2>&1"


rule plot_training_curves:
    # One plot per arm, every seed a line (the same values as tensorboard --logdir results/classifier).
    input:
        logs=study_runs(output="train_log"),
    output:
        plots=report(
            expand(f"{paths.PLOTS}/curves_{{arm}}.png", arm=arm_names(config)),
            category="4. Training curves",
        ),
    params:
        runs=folder_of("input", "logs"),
        out_dir=folder_of("output", "plots"),
    log:
        "logs/plot_training_curves/plot_training_curves.log",
    benchmark:
        "benchmarks/plot_training_curves/plot_training_curves.tsv"
    conda:
        "../envs/cxr-synth.yaml"
    shell:
        "python -m workflow_scripts.report.curves --runs {params.runs} --out-dir {params.out_dir} > {log} 2>&1"


localrules:
    render_report_pages,
    plot_training_curves,
