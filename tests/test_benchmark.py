"""The benchmark CLI on the tiny model, on CPU: output format, JSON content, consistency (no timing thresholds)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import statistics
from typing import Any

import pytest
import torch

from workflow_scripts.bench import benchmark

GEN_STEPS = [2, 3]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("benchmark")
    json_path = root / "out" / "benchmark.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = benchmark.main(["--quick", "--device", "cpu", "--threads", "1", "--tiny-dir", str(root / "tiny-sd"),
                               "--gen-steps", *map(str, GEN_STEPS), "--gen-batch-sizes", "1", "--json", str(json_path)])
    return {"code": code, "stdout": stdout.getvalue(), "json": json.loads(json_path.read_text()), "root": root}


@pytest.mark.slow  # the benchmark's run: the full suite's (the quick tier stays under 3 minutes)
def test_last_line_is_the_speed_up(quick_run) -> None:
    assert quick_run["code"] == 0
    last = quick_run["stdout"].rstrip("\n").splitlines()[-1]
    assert re.fullmatch(r"train speed-up vs reference: \d+\.\d\dx", last), last
    assert float(last.split(": ")[1].rstrip("x")) == pytest.approx(quick_run["json"]["training"]["speedup"], abs=0.005)


@pytest.mark.slow  # the benchmark's run: the full suite's (the quick tier stays under 3 minutes)
def test_training_rows_and_ratio(quick_run) -> None:
    training = quick_run["json"]["training"]
    ours, reference = training["ours"], training["reference"]
    assert ours["images_per_second"] > 0 and reference["images_per_second"] > 0
    assert len(ours["per_repeat_images_per_second"]) == len(reference["per_repeat_images_per_second"]) == training["repeats"]
    for o, r, ratio in zip(ours["per_repeat_images_per_second"], reference["per_repeat_images_per_second"],
                           training["per_repeat_ratios"]):
        assert ratio == pytest.approx(o / r, rel=1e-9)
    assert training["speedup"] == pytest.approx(statistics.median(training["per_repeat_ratios"]), rel=1e-9)
    # The reference also runs the VAE encoder and text encoder: it counts more FLOPs per image.
    assert reference["flops_per_step"] > ours["flops_per_step"] > 0
    assert quick_run["json"]["compute"]["matmul_peak"]["tflops"] > 0


@pytest.mark.slow  # the benchmark's run: the full suite's (the quick tier stays under 3 minutes)
def test_generation_rows_for_each_step_count(quick_run) -> None:
    rows = quick_run["json"]["generation"]
    for variant in ("lora attached", "lora fused"):  # the old figure beside generate_xrays' fused LoRA
        assert sorted(row["steps"] for row in rows if row["variant"] == variant) == GEN_STEPS
    assert len(rows) == 2 * len(GEN_STEPS) and "| lora fused | 2 | 1 |" in quick_run["stdout"]
    for row in rows:
        assert row["batch_size"] == 1 and row["images_per_second"] > 0
        assert row["guidance"] == 7.5 and row["scheduler"] == "dpmsolver++" and row["vae_decode"]


@pytest.mark.slow  # the benchmark's run: the full suite's (the quick tier stays under 3 minutes)
def test_memory_rows_say_gpu_numbers_are_absent_on_cpu(quick_run) -> None:
    memory = quick_run["json"]["memory"]
    settings = {(row["loop"], row["gradient_checkpointing"]) for row in memory["rows"]}
    assert settings == {(loop, gc) for loop in ("ours", "reference") for gc in (False, True)}
    for row in memory["rows"]:
        assert row["batch_size"] == 1
        assert row["gpu_peak_allocated_bytes"] is None
    assert "n/a on CPU" in memory["note"]
    assert "n/a on CPU" in quick_run["stdout"]


@pytest.mark.slow  # the benchmark's run: the full suite's (the quick tier stays under 3 minutes)
def test_table_and_json_describe_the_run(quick_run) -> None:
    result, out = quick_run["json"], quick_run["stdout"]
    assert result["model"] == "tiny" and result["dtype"] == "fp32" and result["resolution"] == 64
    assert result["batch_size"] == 2 and result["lora"]["rank"] == 4
    assert result["machine"]["device"] == "cpu" and result["machine"]["cpu"]
    assert result["versions"]["torch"] == torch.__version__
    for text in ("| date |", "| torch |", torch.__version__, "| model | tiny", "| dtype | fp32", "| resolution | 64 px",
                 "| training batch size | 2", "## Training", "## Generation", "## Peak memory"):
        assert text in out, text
    assert (quick_run["root"] / "tiny-sd" / "model_index.json").is_file()  # --tiny-dir: built there, kept


@pytest.mark.slow  # the benchmark's run: the full suite's (the quick tier stays under 3 minutes)
def test_lever_rows_say_levers_are_off_on_cpu(quick_run) -> None:
    sweep = quick_run["json"]["lever_sweep"]
    assert [row["lever"] for row in sweep["rows"]] == ["allow_tf32", "cudnn_benchmark", "channels_last", "compile_unet"]
    assert all(row["images_per_second"] is None and not row["applied"] for row in sweep["rows"])
    assert "## GPU levers" in quick_run["stdout"] and "| allow_tf32 | n/a | off on CPU |" in quick_run["stdout"]
    assert not any(quick_run["json"]["levers"].values())


@pytest.mark.slow  # the benchmark's run: the full suite's (the quick tier stays under 3 minutes)
def test_ours_runs_the_training_code_and_keeps_the_epoch_order(quick_run, capsys, monkeypatch) -> None:
    from workflow_scripts.lora import train_lora
    from workflow_scripts.bench import training as bench_training

    calls = {"micro_batch_loss": 0, "epoch_order": 0}
    real_loss, real_order = bench_training.micro_batch_loss, train_lora.epoch_order

    def counting_loss(*args):
        calls["micro_batch_loss"] += 1
        return real_loss(*args)

    def counting_order(*args):
        calls["epoch_order"] += 1
        return real_order(*args)

    assert bench_training.micro_batch_loss is train_lora.micro_batch_loss  # the piece train_lora's loop runs
    monkeypatch.setattr(bench_training, "micro_batch_loss", counting_loss)
    monkeypatch.setattr(train_lora, "epoch_order", counting_order)  # both loops' BatchOrder
    # Host-memory cache path (budget 0); 4 steps of batch 2 over 8 cached images: one epoch per loop.
    code = benchmark.main(["--quick", "--device", "cpu", "--threads", "1", "--tiny-dir", str(quick_run["root"] / "tiny-sd"),
                           "--steps", "4", "--repeats", "1", "--warmup", "0", "--skip-generation", "--skip-memory",
                           "--skip-levers", "--cache-budget-gb", "0"])
    out = capsys.readouterr().out
    assert code == 0 and "| latent cache | host mode |" in out
    assert calls["micro_batch_loss"] == 1 + 4  # ours is train_lora's step: the FLOP count's, then 4 timed
    assert calls["epoch_order"] == 2  # once per epoch and loop, not once per step
    assert "## Generation" not in out and "## Peak memory" not in out and "## GPU levers" not in out
    assert re.fullmatch(r"train speed-up vs reference: \d+\.\d\dx", out.rstrip("\n").splitlines()[-1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusals")
@pytest.mark.parametrize("flags", [["--device", "cuda"], ["--device", "cpu", "--dtype", "fp16"]])
def test_impossible_device_settings_are_refused(flags, capsys) -> None:
    assert benchmark.main(["--quick", *flags]) == 2
    assert "error:" in capsys.readouterr().err


def test_cpu_attention_flops_are_counted() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    benchmark.register_cpu_attention_flops()
    b, h, s, d = 2, 4, 16, 8
    q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False) as forward:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert forward.get_total_flops() == 2 * (2 * b * h * s * s * d)
    with FlopCounterMode(display=False) as backward:
        out.sum().backward()
    assert backward.get_total_flops() > forward.get_total_flops()


def test_classifier_stage_prints_the_data_path_speed_up(tmp_path) -> None:
    # `--stage classifier` dispatches to bench.classifier: NIH-style films (upscaled dev films, or
    # --source), decoded every step vs the decode-once cache, side by side.
    stdout = io.StringIO()
    json_path = tmp_path / "classifier.json"
    with contextlib.redirect_stdout(stdout):
        code = benchmark.main(["--stage", "classifier", "--quick", "--threads", "1", "--device", "cpu",
                               "--scratch", str(tmp_path / "scratch"), "--json", str(json_path)])
    assert code == 0
    lines = stdout.getvalue().rstrip("\n").splitlines()
    assert re.fullmatch(r"classifier data path speed-up vs decoding every step: \d+\.\d×", lines[-1]), lines[-1]
    result = json.loads(json_path.read_text())
    data = result["data_path"]
    assert float(lines[-1].split(": ")[1].rstrip("×")) == pytest.approx(data["speedup"], abs=0.05)
    for figures in (data, result["training"]):
        rates = figures["per_repeat"]
        assert len(rates["decoded"]) == len(rates["cached"]) == result["repeats"] == 2
        assert all(rate > 0 for rate in rates["decoded"] + rates["cached"])
        assert figures["per_repeat_ratios"] == pytest.approx([c / d for c, d in zip(rates["cached"], rates["decoded"])])
        assert figures["speedup"] == pytest.approx(statistics.median(figures["per_repeat_ratios"]))
    assert result["films"] == 8 and result["film_size"] == 128 and result["cache_build"]["films_per_second"] > 0
    assert len(list((tmp_path / "scratch" / "films").glob("*.png"))) == 8
    assert any(line.startswith("| decoded every step") for line in lines)
    assert any(line.startswith("| decode-once cache") for line in lines)
