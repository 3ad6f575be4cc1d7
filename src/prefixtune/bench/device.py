"""The one place `prefixtune bench` knows its device: which one (`--device`), how a step is
timed (wall clock on the CPU; CUDA events after a synchronize on a GPU), how peak memory is read
(resident memory on the CPU; `torch.cuda.max_memory_allocated` on a GPU), the autocast dtype and
the attention kernels (SDPA flash/efficient on CUDA)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import torch

DEVICES = ("cpu", "cuda")


class DeviceError(RuntimeError):
    """`--device` names a device this machine does not have."""


def check_device(name: str, cuda: Any = None) -> str:
    """`name` when this machine has it; otherwise one clear DeviceError naming the flag."""
    cuda = cuda or torch.cuda
    if name not in DEVICES:
        raise DeviceError(f"--device {name!r}: choose one of {', '.join(DEVICES)}")
    if name == "cuda" and not cuda.is_available():
        raise DeviceError(
            "--device cuda: no CUDA device on this machine (torch.cuda.is_available() is False; "
            f"torch {torch.__version__} built {'with' if torch.version.cuda else 'without'} "
            "CUDA); run on a GPU machine or use --device cpu"
        )
    return name


def default_dtype(device: str) -> str:
    """The bench dtype `auto` means: bf16 on CUDA, the CPU's own choice (fp32 or bf16) there."""
    if device == "cuda":
        return "bf16"
    from prefixtune.core.runtime import autocast_dtype

    return "bf16" if autocast_dtype("auto", "cpu") == torch.bfloat16 else "fp32"


def autocast(dtype: str, device: str) -> contextlib.AbstractContextManager:
    """Autocast to a bench dtype name on `device` (fp32: a no-op)."""
    from prefixtune.core.runtime import autocast_context, autocast_dtype

    return autocast_context(autocast_dtype(dtype, device), device)


def attention_kernels(device: str) -> contextlib.AbstractContextManager:
    """On CUDA: SDPA may use the flash and memory-efficient kernels (math as the fallback for
    shapes they refuse); on the CPU: PyTorch's own choice."""
    if device != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(backends, set_priority=True)


class CpuMeter:
    """Wall-clock steps and the process's resident memory (peak since `reset`)."""

    device = "cpu"

    def __init__(self) -> None:
        from prefixtune.bench.common import Memory

        self.memory = Memory()

    def reset(self) -> None:
        self.memory.reset()

    def time(self, step: Callable[[], Any]) -> float:
        began = time.perf_counter()
        step()
        return time.perf_counter() - began

    def report(self) -> dict[str, Any]:
        return {**self.memory.report(), "memory_kind": "resident (RSS)"}


class CudaMeter:
    """CUDA-event timing of a step (synchronized before and after) and the allocator's peak
    (`max_memory_allocated`, reset with `reset_peak_memory_stats`). `cuda` is torch.cuda; tests
    pass a stand-in."""

    device = "cuda"

    def __init__(self, cuda: Any = None) -> None:
        self.cuda = cuda or torch.cuda
        self.at_reset = 0.0

    def reset(self) -> None:
        self.cuda.synchronize()
        self.cuda.empty_cache()
        self.cuda.reset_peak_memory_stats()
        self.at_reset = self.cuda.memory_allocated() / 2**20

    def time(self, step: Callable[[], Any]) -> float:
        start = self.cuda.Event(enable_timing=True)
        end = self.cuda.Event(enable_timing=True)
        self.cuda.synchronize()
        start.record()
        step()
        end.record()
        self.cuda.synchronize()
        return start.elapsed_time(end) / 1000.0  # ms -> s

    def report(self) -> dict[str, Any]:
        peak = self.cuda.max_memory_allocated() / 2**20
        return {
            "rss_before_mb": round(self.at_reset, 1),
            "peak_rss_mb": round(peak, 1),
            "step_extra_mb": round(peak - self.at_reset, 1),
            "peak_covers": "the measured steps",
            "memory_kind": "CUDA allocated (max_memory_allocated)",
        }


def meter(device: str) -> CpuMeter | CudaMeter:
    return CudaMeter() if device == "cuda" else CpuMeter()


def timed_steps(meter: CpuMeter | CudaMeter, step: Callable[[], Any], iters: int, warmup: int,
                cap_s: float = float("inf"),
                warm: Callable[[], Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Reset the peak, run `warmup` untimed steps (`warm`, else `step`), then up to `iters` timed
    ones (fewer once their total passes `cap_s`; at least one). Times, their median, and the
    memory report."""
    import statistics

    meter.reset()
    for _ in range(warmup):
        (warm or step)()
    times: list[float] = []
    while len(times) < max(iters, 1) and (not times or sum(times) < cap_s):
        times.append(meter.time(step))
    return {
        "times_s": [round(t, 6) for t in times],
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        **meter.report(),
    }


def measure(device: str, step: Callable[[], Any], iters: int, warmup: int,
            warm: Callable[[], Any] | None = None, cuda: Any = None) -> dict[str, Any]:  # fmt: skip
    """A suite worker's timing on its device: on the CPU exactly `common.measure` (wall clock,
    resident memory); on CUDA the CudaMeter (events between synchronizes, the allocator's peak
    over warm-up and timed steps)."""
    if device != "cuda":
        from prefixtune.bench.common import measure as cpu_measure

        return cpu_measure(step, iters, warmup, warm=warm)
    return timed_steps(CudaMeter(cuda), step, iters, warmup, warm=warm)


def on_device(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    """The batch's tensors on `device` (the CPU: the very same tensors)."""
    if device == "cpu":
        return batch
    return {key: value.to(device) for key, value in batch.items()}


def limit_memory(device: str, budget_mb: float, cuda: Any = None) -> str:
    """Hold this worker process to `budget_mb`: on CUDA a per-process memory fraction; on Linux
    CPUs the data-segment limit (RLIMIT_DATA), so an allocation past it fails as an out-of-memory
    error in this worker instead of starving the machine. Returns how it was enforced."""
    if device == "cuda":
        cuda = cuda or torch.cuda
        total = cuda.get_device_properties(0).total_memory
        cuda.set_per_process_memory_fraction(min(1.0, budget_mb * 2**20 / total))
        return "cuda memory fraction"
    try:
        import resource

        limit = int(budget_mb * 2**20)
        _soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
        return "RLIMIT_DATA"
    except (ImportError, ValueError, OSError):
        return "none"


def default_budget_gb(device: str, cuda: Any = None) -> float:
    """A safe share of what is free: on the CPU half the available memory, at most 8 GB (the
    machine is shared); on CUDA 90% of the device's free memory."""
    if device == "cuda":
        free, _total = (cuda or torch.cuda).mem_get_info()
        return round(0.9 * free / 2**30, 1)
    try:
        from pathlib import Path

        text = Path("/proc/meminfo").read_text()
        available_kb = int(text.split("MemAvailable:")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return 8.0
    return round(min(8.0, available_kb / 2**20 / 2), 1)
