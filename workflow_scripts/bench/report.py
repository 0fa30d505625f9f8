"""The benchmark's markdown report (stdout) and strict-JSON helpers."""

from __future__ import annotations

from typing import Any

from workflow_scripts.common.cells import quantity

GUIDANCE = 7.5
SCHEDULER = "dpmsolver++"
# Model FLOPs per image of SD 1.5 at 512 px (shared/REFERENCES.md), for comparison with the count.
REFERENCE_TFLOP_PER_IMAGE = {"ours": 1.6, "reference": 2.7}


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:,.1f} MiB"


def render(result: dict[str, Any]) -> str:
    machine, training, compute = result["machine"], result["training"], result["compute"]
    lines = ["# LoRA training and sampling benchmark", "", "| | |", "|---|---|"]
    device = machine["gpu"] if machine["gpu"] else f"CPU ({machine['torch_threads']} torch threads)"
    facts = [("date", result["date"]), ("device", device), ("CPU", f"{machine['cpu']} ({machine['cpu_cores']} cores)"),
             ("torch", result["versions"]["torch"]), ("diffusers", result["versions"]["diffusers"]),
             ("model", f"{result['model']}: {result['model_source']}"),
             ("parameters", ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in result["parameters"].items())),
             ("dtype", result["dtype"] + (" (autocast)" if result["autocast"] else "")),
             ("resolution", f"{result['resolution']} px"), ("training batch size", result["batch_size"]),
             ("LoRA", f"rank {result['lora']['rank']}, alpha {result['lora']['alpha']}, {'/'.join(result['lora']['targets'])}"),
             ("levers", ", ".join(k for k, v in result["levers"].items() if v) or "none"),
             ("latent cache", result["latent_cache_mode"] + " mode"),
             ("timing", f"{training['steps_per_repeat']} steps x {training['repeats']} alternating repeats per loop, "
                        f"{training['warmup_steps']} warm-up steps each")]
    lines += [f"| {k} | {v} |" for k, v in facts]

    peak = compute["matmul_peak"]
    lines += ["", f"## Training (batch {result['batch_size']}, {result['resolution']} px, {result['dtype']})", "",
              "| loop | images/s (median) | per repeat | s/step | TFLOP/image (counted) | achieved TFLOP/s | of matmul peak |",
              "|---|---|---|---|---|---|---|"]
    names = {"ours": "ours (cached latents + embeddings)", "reference": "reference (VAE + text encoder every step)"}
    for loop in ("ours", "reference"):
        row = training[loop]
        lines.append(f"| {names[loop]} | {quantity(row['images_per_second'])} | "
                     + " ".join(quantity(v) for v in row["per_repeat_images_per_second"])
                     + f" | {row['seconds_per_step']:.4f} | {row['tflop_per_image']:.4g} | {row['achieved_tflops']:.4g} | "
                     f"{100 * row['fraction_of_matmul_peak']:.1f}% |")
    lines += ["", f"Speed-up ours / reference, median of per-repeat ratios: **{training['speedup']:.2f}x** "
                  f"(ratios {' '.join(f'{r:.2f}' for r in training['per_repeat_ratios'])}). "
                  f"Ours' one-time cache of {training['cached_images']} images took {training['one_time_cache_seconds']:.2f} s "
                  "(not in the timed loop).",
              f"Matmul peak: {peak['tflops']:.3g} TFLOP/s ({peak['size']}^3 {peak['dtype']} torch.matmul). "
              f"FLOPs: {compute['flop_counter']}; shared/REFERENCES.md gives "
              f"{REFERENCE_TFLOP_PER_IMAGE['ours']} (cached) and {REFERENCE_TFLOP_PER_IMAGE['reference']} (VAE every step) "
              "TFLOP/image for SD 1.5 at 512 px."]

    if "lever_sweep" in result:
        sweep = result["lever_sweep"]
        lines += ["", "## GPU levers (`hardware:` keys), one at a time, ours", "",
                  f"Main run above: {quantity(sweep['baseline_images_per_second'])} images/s.", "",
                  "| lever | images/s | vs main run |", "|---|---|---|"]
        for row in sweep["rows"]:
            if row["images_per_second"] is None:
                lines.append(f"| {row['lever']} | n/a | off on CPU |")
            else:
                lines.append(f"| {row['lever']} | {quantity(row['images_per_second'])} | {row.get('speedup_vs_main', 1.0):.2f}x |")
        lines += ["", f"Note: {sweep['note']}."]
    if "generation" in result:
        lines += ["", f"## Generation (CFG {GUIDANCE}, {SCHEDULER}, VAE decode included)", "",
                  "| LoRA | steps | batch | images/s | s/batch |", "|---|---|---|---|---|"]
        for row in result["generation"]:
            lines.append(f"| {row['variant']} | {row['steps']} | {row['batch_size']} | {quantity(row['images_per_second'])} | "
                         f"{row['seconds_per_batch']:.3f} |")
    if "memory" in result:
        lines += ["", "## Peak memory of a training step (batch 1)", "",
                  "| loop | gradient checkpointing | GPU peak allocated | GPU above resident | CPU RSS peak delta |",
                  "|---|---|---|---|---|"]
        for row in result["memory"]["rows"]:
            lines.append(f"| {row['loop']} | {'on' if row['gradient_checkpointing'] else 'off'} | "
                         f"{_mib(row['gpu_peak_allocated_bytes'])} | {_mib(row['gpu_peak_above_resident_bytes'])} | "
                         f"{_mib(row['cpu_rss_peak_delta_bytes'])} |")
        lines += ["", f"Note: {result['memory']['note']}."]
    return "\n".join(lines)


def speedup_line(result: dict[str, Any]) -> str:
    return f"train speed-up vs reference: {result['training']['speedup']:.2f}x"
