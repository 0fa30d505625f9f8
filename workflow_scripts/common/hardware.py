"""Device-wide torch settings and precision names, shared by every stage that runs on a GPU.

`apply_cuda_levers` sets the configured `hardware.allow_tf32` / `hardware.cudnn_benchmark` levers
through torch's current per-backend `fp32_precision` API (the legacy `allow_tf32` flags raise once
anything has used the new API) and restores them after; `DTYPES` is the one map from precision
names (config keys, CLI flags) to torch dtypes. `gpu_levers` says which `hardware:` levers apply on a
device and `hardware_settings` applies them for a block; `compile_settings` prepares torch.compile.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}


# The TF32 switches, through torch's fp32_precision API ("tf32" or "ieee"); the legacy allow_tf32
# flags raise once anything in the process has used this API.
TF32_SWITCHES = (torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn.rnn)


@contextlib.contextmanager
def apply_cuda_levers(allow_tf32: bool, cudnn_benchmark: bool, deterministic: bool = False,
                      strict: bool = True) -> Iterator[None]:
    """For the block: TF32 matmuls and convolutions (`allow_tf32`), cudnn kernel autotuning
    (`cudnn_benchmark`, never with `deterministic`), and, with `deterministic`, cuDNN's deterministic
    kernels plus (`strict`) torch's deterministic-algorithms mode, which raises on an op without a
    deterministic kernel. The caller passes False for levers that do not apply (e.g. on CPU).
    Restores the previous settings."""
    precision = "tf32" if allow_tf32 else "ieee"
    saved = ([switch.fp32_precision for switch in TF32_SWITCHES], torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled())
    for switch in TF32_SWITCHES:
        switch.fp32_precision = precision
    torch.backends.cudnn.benchmark = cudnn_benchmark and not deterministic
    if deterministic:
        torch.backends.cudnn.deterministic = True
    if deterministic and strict:
        # cuBLAS needs a fixed workspace to be deterministic; read when CUDA starts (before any GPU work).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        for switch, saved_precision in zip(TF32_SWITCHES, saved[0]):
            switch.fp32_precision = saved_precision
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[1], saved[2]
        torch.use_deterministic_algorithms(saved[3])


def gpu_levers(hardware: dict[str, Any], device: torch.device, deterministic: bool) -> dict[str, bool]:
    """The GPU levers that apply: as configured on CUDA, all off on CPU (where they gain nothing or
    only add compile time). Deterministic training turns cudnn.benchmark off (it picks kernels by timing)."""
    cuda = device.type == "cuda"
    return {
        "allow_tf32": cuda and hardware["allow_tf32"],
        "cudnn_benchmark": cuda and hardware["cudnn_benchmark"] and not deterministic,
        "channels_last": cuda and hardware["channels_last"],
        "compile_unet": cuda and hardware["compile_unet"],
        "compile_sampling": cuda and hardware["compile_sampling"],
    }


def hardware_settings(levers: dict[str, bool], deterministic: bool) -> contextlib.AbstractContextManager[None]:
    """Process-wide torch flags for the block (TF32, cudnn.benchmark, deterministic kernels), restored after."""
    return apply_cuda_levers(levers["allow_tf32"], levers["cudnn_benchmark"], deterministic)


def compile_settings() -> None:
    """Several graphs are met (training batch, validation / sampling batches): raise dynamo's
    recompile limit so it does not fall back to eager."""
    import torch._dynamo as dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, max(getattr(dynamo.config, name), 64))


