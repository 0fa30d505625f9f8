"""The machine side of the benchmarks: what they run on, its matmul peak, FLOP counting on CPU,
host-memory sampling, the torch thread count of a run and how a finished run is reported. Used by
`workflow_scripts.bench` and `workflow_scripts.bench.classifier`."""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


# ----------------------------------------------------------------------------- a run


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with `threads` torch threads (None or 0: unchanged); restore the count after."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def report(result: dict[str, Any], json_path: str | Path | None, rendered: str, ratio_line: str) -> int:
    """Write the figures as JSON (when asked), print the report and its side-by-side ratio line."""
    from workflow_scripts.common.tables import write_json_atomically

    if json_path:
        write_json_atomically(json_path, result)
    print(rendered)
    print(ratio_line)
    sys.stdout.flush()
    return 0


# ----------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    info = {"cpu": cpu_model(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": device.type, "gpu": None, "platform": platform.platform()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=torch.cuda.get_device_name(device), gpu_memory_bytes=props.total_memory,
                    cuda=torch.version.cuda)
    return info


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def register_cpu_attention_flops() -> None:
    """FlopCounterMode knows SDPA's CUDA kernels but not the CPU one: count it with the same formula."""
    from torch.utils import flop_counter

    aten = torch.ops.aten
    pairs = [(getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None), flop_counter.sdpa_flop_count),
             (getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None),
              flop_counter.sdpa_backward_flop_count)]
    for op, formula in pairs:
        if op is None or op in flop_counter.flop_registry:
            continue

        def shaped(*args, _formula=formula, out_shape=None, **kwargs):
            return _formula(*args[:4 if _formula is flop_counter.sdpa_backward_flop_count else 3])

        flop_counter.register_flop_formula(op)(shaped)


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, size: int) -> dict[str, Any]:
    """Achieved TFLOP/s of a large square matmul: the practical peak the training step is measured against."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b)
    synchronize(device)
    iterations, seconds = 0, 0.0
    budget = 2.0 if device.type == "cuda" else 0.5
    started = time.perf_counter()
    while seconds < budget or iterations < 3:
        torch.matmul(a, b)
        iterations += 1
        if device.type == "cuda" and iterations % 10:
            continue
        synchronize(device)
        seconds = time.perf_counter() - started
    synchronize(device)
    seconds = time.perf_counter() - started
    del a, b
    return {"tflops": 2 * size**3 * iterations / seconds / 1e12, "size": size,
            "dtype": str(dtype).removeprefix("torch."), "iterations": iterations}


# ----------------------------------------------------------------------------- memory


def current_rss() -> int | None:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def release_host_memory() -> None:
    gc.collect()
    try:  # hand freed heap memory back to the OS so the RSS baseline is the live set
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RssSampler:
    """Peak resident set size while a block runs, polled every few ms (short spikes can be missed)."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def __enter__(self) -> RssSampler:
        self.baseline = current_rss() or 0
        self.peak = self.baseline
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss() or 0)
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss() or 0)
