# Data stage: (demo phantoms) -> patient-disjoint splits with prompts -> verification report.


rule demo_dataset:
    output:
        csv=paths.DEMO_CSV,
        images=directory(paths.DEMO_IMAGES),
    params:
        out_dir=folder_of("output", "csv"),
        num_patients=config["demo"]["num_patients"],
        size=config["demo"]["size"],
        seed=config["demo"]["seed"],
        job_cores=job_cores,
    log:
        "logs/demo_dataset/demo_dataset.log",
    benchmark:
        "benchmarks/demo_dataset/demo_dataset.tsv"
    conda:
        "../envs/cxr-synth.yaml"
    shell:
        "python -m workflow_scripts.data.demo_dataset --out-dir {params.out_dir}"
        " --num-patients {params.num_patients} --size {params.size} --seed {params.seed} --workers {params.job_cores}"
        " > {log} 2>&1"


rule prepare_dataset:
    input:
        config=stage_config_file("prepare_dataset"),
        csv=config["dataset"]["csv"],
        images=config["dataset"]["images"],
    output:
        train=paths.split_csv("train"),
        val=paths.split_csv("val"),
        test=paths.split_csv("test"),
        reserve=paths.split_csv("reserve"),  # patients kept for the more_real control (split.more_real_ratio)
        skipped=f"{paths.DATA}/skipped.csv",
        summary=paths.PREPARE_SUMMARY,
    params:
        out_dir=folder_of("output", "train"),
    threads: 64  # image decoding processes; Snakemake lowers this to --cores (SLURM: set-threads in the profile)
    log:
        "logs/prepare_dataset/prepare_dataset.log",
    benchmark:
        "benchmarks/prepare_dataset/prepare_dataset.tsv"
    conda:
        "../envs/cxr-synth.yaml"
    shell:
        "python -m workflow_scripts.data.prepare_dataset --config {input.config} --out-dir {params.out_dir}"
        " --workers {threads} > {log} 2>&1"


rule verify_dataset:
    input:
        train=rules.prepare_dataset.output.train,
        val=rules.prepare_dataset.output.val,
        test=rules.prepare_dataset.output.test,
        reserve=rules.prepare_dataset.output.reserve,
        config=stage_config_file("verify_dataset"),
    output:
        report_json=f"{paths.DATA}/verify_report.json",
        report_md=f"{paths.DATA}/verify_report.md",  # in the report as results/report/verify_report.html
        contact_sheet=report(
            f"{paths.DATA}/verify_contact_sheet.png", category="3. Data", labels={"page": "plot: contact sheet"}
        ),
    params:
        out_dir=folder_of("output", "report_json"),
    log:
        "logs/verify_dataset/verify_dataset.log",
    benchmark:
        "benchmarks/verify_dataset/verify_dataset.tsv"
    conda:
        "../envs/cxr-synth.yaml"
    shell:
        "python -m workflow_scripts.data.verify_dataset --config {input.config} --train {input.train} --val {input.val}"
        " --test {input.test} --reserve {input.reserve} --out-dir {params.out_dir} > {log} 2>&1"
