# Generation stage: plan (labels and counts from the training split) -> one job per label -> merge.


checkpoint plan_generation:
    input:
        train=rules.prepare_dataset.output.train,
        config=stage_config_file("plan_generation"),
    output:
        plan=paths.PLAN,
    log:
        "logs/plan_generation/plan_generation.log",
    conda:
        "../envs/cxr-synth.yaml"
    shell:
        "python -m workflow_scripts.generation.plan_generation --config {input.config} --train {input.train}"
        " --plan {output.plan} > {log} 2>&1"


rule generate_label:
    input:
        plan=rules.plan_generation.output.plan,
        lora=rules.train_lora.output.adapter,
        base_model=base_model_input,
        config=stage_config_file("generate_label"),
    output:
        # Images are not declared one by one: after a failure they stay, and the re-run makes only
        # the missing ones (each is written atomically, so none is ever truncated); images another
        # LoRA or other settings made are made again (provenance.json in each label folder).
        results=f"{paths.SYNTHETIC_LABEL}/generation_results.csv",
    params:
        output_dir=folder_of("output", "results", up=2),  # the label's folder below it is the CLI's
        tiny_dir=rules.build_tiny_model.output.model,
        threads_env=threads_env,
    resources:
        gpu=1,
    log:
        "logs/generate_label/{label}.log",
    benchmark:
        "benchmarks/generate_label/{label}.tsv"
    conda:
        "../envs/cxr-synth.yaml"
    shell:
        "{params.threads_env} python -m workflow_scripts.generation.generate_xrays --config {input.config} --label {wildcards.label}"
        " --plan {input.plan} --checkpoint {input.lora} --tiny-dir {params.tiny_dir}"
        " --output-dir {params.output_dir} > {log} 2>&1"


rule generate_without_lora:
    # The LoRA-off control: the plan's prompts and seeds drawn from the base model alone, scored beside
    # the LoRA's images by evaluate_fidelity (what the LoRA adds). One job: no LoRA to wait for.
    input:
        plan=rules.plan_generation.output.plan,
        base_model=base_model_input,
        config=stage_config_file("generate_label"),
    output:
        results=f"{paths.SYNTHETIC_BASE}/generation_results.csv",
    params:
        output_dir=folder_of("output", "results"),
        tiny_dir=rules.build_tiny_model.output.model,
        threads_env=threads_env,
    resources:
        gpu=1,
    log:
        "logs/generate_without_lora/generate_without_lora.log",
    benchmark:
        "benchmarks/generate_without_lora/generate_without_lora.tsv"
    conda:
        "../envs/cxr-synth.yaml"
    shell:
        "{params.threads_env} python -m workflow_scripts.generation.generate_xrays --config {input.config} --no-lora --plan {input.plan}"
        " --tiny-dir {params.tiny_dir} --output-dir {params.output_dir} --merged {output.results} > {log} 2>&1"


rule merge_generation:
    input:
        results=planned_generation_results,
        plan=rules.plan_generation.output.plan,
        config=stage_config_file("merge_generation"),
    output:
        results=paths.GENERATED,
    log:
        "logs/merge_generation/merge_generation.log",
    conda:
        "../envs/cxr-synth.yaml"
    shell:
        "python -m workflow_scripts.generation.merge_generation --config {input.config} --results {input.results}"
        " --plan {input.plan} --merged {output.results} > {log} 2>&1"


rule make_noise_images:
    # The noise control's null generator: one noise image per generated image, same size and labels.
    input:
        synthetic=rules.merge_generation.output.results,
        train=rules.prepare_dataset.output.train,
        config=stage_config_file("make_noise_images"),
    output:
        results=paths.NOISE_GENERATED,
        summary=f"{paths.SYNTHETIC_NOISE}/noise_summary.json",
    params:
        output_dir=folder_of("output", "results"),
    log:
        "logs/make_noise_images/make_noise_images.log",
    benchmark:
        "benchmarks/make_noise_images/make_noise_images.tsv"
    conda:
        "../envs/cxr-synth.yaml"
    shell:
        "python -m workflow_scripts.generation.noise_images --config {input.config} --synthetic {input.synthetic}"
        " --train {input.train} --output-dir {params.output_dir} > {log} 2>&1"
