"""The CUDA levers go through torch's current fp32_precision API and are restored after the block."""

from __future__ import annotations

import torch

from workflow_scripts.common.hardware import DTYPE_NAMES, DTYPES, apply_cuda_levers


def test_levers_set_the_new_api_and_restore_it() -> None:
    backends = torch.backends
    before = (backends.cuda.matmul.fp32_precision, backends.cudnn.conv.fp32_precision, backends.cudnn.benchmark,
              backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled())
    with apply_cuda_levers(allow_tf32=True, cudnn_benchmark=True):
        assert backends.cuda.matmul.fp32_precision == backends.cudnn.conv.fp32_precision == "tf32"
        assert backends.cudnn.benchmark
        with apply_cuda_levers(allow_tf32=False, cudnn_benchmark=True, deterministic=True):
            assert backends.cuda.matmul.fp32_precision == backends.cudnn.conv.fp32_precision == "ieee"
            assert not backends.cudnn.benchmark and backends.cudnn.deterministic  # autotuning picks kernels by timing
            assert torch.are_deterministic_algorithms_enabled()
        assert backends.cudnn.benchmark and not backends.cudnn.deterministic
    assert (backends.cuda.matmul.fp32_precision, backends.cudnn.conv.fp32_precision, backends.cudnn.benchmark,
            backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled()) == before


def test_the_classifier_asks_for_cudnn_determinism_without_torchs_strict_mode() -> None:
    # timm's adaptive pooling has no deterministic CUDA backward: strict mode would refuse to train.
    backends = torch.backends
    before = (backends.cudnn.benchmark, backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled())
    with apply_cuda_levers(allow_tf32=False, cudnn_benchmark=True, deterministic=True, strict=False):
        assert backends.cudnn.deterministic and not backends.cudnn.benchmark
        assert not torch.are_deterministic_algorithms_enabled()
    assert (backends.cudnn.benchmark, backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled()) == before


def test_one_dtype_map_both_ways() -> None:
    assert DTYPES == {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    assert all(DTYPES[DTYPE_NAMES[dtype]] == dtype for dtype in DTYPES.values())
