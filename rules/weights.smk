# Weights: checked while Snakemake builds the DAG, before any job runs (a dry run shows it too), and
# fetched by `snakemake download_weights` (python -m workflow_scripts.weights) where the hub is reachable.
from workflow_scripts.weights import inventory as weights_inventory, render as render_weights, stop_message

_weights_state = {}  # the check runs once per Snakemake process


def check_weights():
    """List every weight the configuration needs (once) and stop, naming all missing ones, when a
    required one is absent. Only the main process checks: a cluster job's own Snakemake does not."""
    if "done" in _weights_state or not workflow.is_main_process:
        return
    _weights_state["done"] = True
    weights = weights_inventory(config)
    message = stop_message(weights)
    if message:
        raise WorkflowError(message)
    print(render_weights(weights), file=sys.stderr)


def weights_ready(rule_name):
    """An input function (of the rules that load weights) that adds no file: it runs the check while
    the DAG is built, unless this job's outputs already exist (a finished job loads nothing)."""

    def check(wildcards):
        outputs = expand(list(getattr(rules, rule_name).output), **dict(wildcards.items()))
        if not all(os.path.exists(path) for path in outputs):
            check_weights()
        return []

    return check


rule download_weights:
    # No output: it runs whenever asked and fetches only what is missing.
    input:
        config=stage_config_file("download_weights"),
    log:
        "logs/download_weights/download_weights.log",
    conda:
        "../envs/cxr-synth.yaml"
    shell:
        "python -m workflow_scripts.weights --config {input.config} --download 2>&1 | tee {log}"


localrules:
    download_weights,
