# Reader study: a blinded real-vs-synthetic page for radiologists -> the scores of their exported answers.
# The page is built into page/ (the one file to send), the key into key/ (never sent; it also keeps
# secret.txt and history/, which are not outputs, so a rebuild keeps them).
# Targets of their own (`snakemake reader_study`, `snakemake score_reader_study`); in `all` with reader_study.in_all.
# Input functions: rules/common.smk.


rule reader_study:
    input:
        val=rules.prepare_dataset.output.val,
        test=rules.prepare_dataset.output.test,
        synthetic=rules.merge_generation.output.results,
        config=stage_config_file("reader_study"),
    output:
        page=f"{paths.READER_STUDY_PAGE}/index.html",
        key=paths.READER_STUDY_KEY_CSV,
        study=f"{paths.READER_STUDY_KEY}/study.json",
    params:
        data_dir=folder_of("input", "val"),  # val.csv and test.csv above
        page_dir=folder_of("output", "page"),
        key_dir=folder_of("output", "key"),
    log:
        "logs/reader_study/reader_study.log",
    benchmark:
        "benchmarks/reader_study/reader_study.tsv"
    conda:
        "../envs/cxr-synth.yaml"
    shell:
        "python -m workflow_scripts.reader_study.build --config {input.config} --data-dir {params.data_dir}"
        " --synthetic {input.synthetic} --page-dir {params.page_dir} --key-dir {params.key_dir} > {log} 2>&1"


rule score_reader_study:
    input:
        key=rules.reader_study.output.key,
        study=rules.reader_study.output.study,
        answers=reader_study_answers,
        config=stage_config_file("score_reader_study"),
    output:
        scores=f"{paths.READER_STUDY}/scores.csv",
        scores_md=report(f"{paths.READER_STUDY}/scores.md", category="Reader study"),
        pooled=f"{paths.READER_STUDY}/pooled.md",
    params:
        out_dir=folder_of("output", "scores"),
    log:
        "logs/score_reader_study/score_reader_study.log",
    benchmark:
        "benchmarks/score_reader_study/score_reader_study.tsv"
    conda:
        "../envs/cxr-synth.yaml"
    shell:
        "python -m workflow_scripts.reader_study.score --config {input.config} --key {input.key}"
        " --out-dir {params.out_dir} > {log} 2>&1"
