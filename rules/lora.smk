# LoRA stage: (offline tiny base model) -> LoRA fine-tuning on the training split.


rule build_tiny_model:
    output:
        model=directory(paths.TINY_SD),
    params:
        resolution=config["model"]["resolution"],
    log:
        "logs/build_tiny_model/build_tiny_model.log",
    benchmark:
        "benchmarks/build_tiny_model/build_tiny_model.tsv"
    conda:
        "../envs/cxr-synth.yaml"
    shell:
        "python -m workflow_scripts.models.build_tiny_model --build-tiny {output.model} --resolution {params.resolution} > {log} 2>&1"


rule pretrain_demo_base:
    # Rebuilds the demo's shipped base (resources/demo-base) from scratch: about 40 minutes on 2 CPU cores.
    # Not part of `all`; to use the rebuilt one, set model.pretrained to that folder (paths.DEMO_BASE_REBUILT).
    output:
        model=directory(paths.DEMO_BASE_REBUILT),
    log:
        "logs/pretrain_demo_base/pretrain_demo_base.log",
    benchmark:
        "benchmarks/pretrain_demo_base/pretrain_demo_base.tsv"
    threads: 2
    conda:
        "../envs/cxr-synth.yaml"
    shell:
        "python -m workflow_scripts.models.demo_base --out {output.model} --threads {threads} > {log} 2>&1"


rule train_lora:
    input:
        train=rules.prepare_dataset.output.train,
        val=rules.prepare_dataset.output.val,
        verified=rules.verify_dataset.output.report_json,
        base_model=base_model_input,
        config=stage_config_file("train_lora"),
        weights=weights_ready("train_lora"),  # the weights check, before any job (rules/weights.smk)
    output:
        # Only the final LoRA files are declared: checkpoints/ survives a failed or re-run job and the
        # next run resumes from its latest checkpoint. final/ is written whole, by one rename.
        adapter=f"{paths.LORA_FINAL}/pytorch_lora_weights.safetensors",
        kohya=f"{paths.LORA_FINAL}/lora_kohya.safetensors",
        summary=paths.LORA_SUMMARY,
        curve=report(f"{paths.LORA_FINAL}/loss_curve.png", category="Generator"),
    params:
        output_dir=folder_of("output", "summary", up=2),
        tiny_dir=rules.build_tiny_model.output.model,
        launcher=python_launcher,
        threads_env=threads_env,
    resources:
        gpu=1,
    log:
        "logs/train_lora/train_lora.log",
    benchmark:
        "benchmarks/train_lora/train_lora.tsv"
    conda:
        "../envs/cxr-synth.yaml"
    shell:
        "{params.threads_env} {params.launcher} -m workflow_scripts.lora.train_lora --config {input.config} --train {input.train} --val {input.val}"
        " --output-dir {params.output_dir} --tiny-dir {params.tiny_dir} > {log} 2>&1"
