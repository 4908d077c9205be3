"""This machine's physical limits and a small timer, for putting benchmark figures in context.

    gemm_gflops()        fp32 matmul rate (a large square torch.mm): the compute ceiling
    read_bandwidth_gbs() bytes/s summing a tensor far larger than the caches: the decode ceiling
    copy_bandwidth_gbs() bytes/s (read + write) copying it
    huge_pages()         whether torch's allocator gets transparent huge pages
    machine_info()       CPU model, threads, load average, library versions, huge pages (+ the GPU's name)
    synced(fn, device)   fn, then a wait for the device's queued work: what best_time must time on a GPU

The three rates take a device: on a GPU they are its fp32 GEMM rate (TF32 as torch's setting has it)
and its memory bandwidth.
    best_of(samples)     the best of repeated rates, with their spread

Figures are the best of `repeat` runs: on a shared machine the best run is the one least
disturbed by other processes, and a physical limit is a best case by definition.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch


def best_time(fn: Callable[[], object], repeat: int = 3, warmup: int = 1, min_time: float = 0.0) -> float:
    """Seconds per call: the fastest of `repeat` timed calls after `warmup` untimed ones.

    With min_time > 0, each timed sample loops fn until min_time has passed and reports the mean
    per call, so sub-millisecond calls are not dominated by timer resolution.
    """
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(max(1, repeat)):
        n, start = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_time:
                break
        best = min(best, elapsed / n)
    return best


def best_of(samples: list[float]) -> dict:
    """Rates (higher is better) from repeated runs -> {"best", "spread_pct": (max - min) / max, "samples"}."""
    best = max(samples)
    return {"best": best, "spread_pct": 100 * (best - min(samples)) / best, "samples": samples}


def synced(fn: Callable[[], object], device: torch.device | str = "cpu") -> Callable[[], object]:
    """fn for timing on `device`: on a GPU each call also waits for the kernels it queued."""
    device = torch.device(device)
    if device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


def gemm_gflops(n: int = 2048, repeat: int = 5, device: torch.device | str = "cpu") -> float:
    """fp32 GFLOP/s of an n x n x n torch.mm (2 n^3 FLOPs) at the current thread count (or on the GPU)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    out = torch.empty(n, n, device=device)
    return 2 * n**3 / best_time(synced(lambda: torch.mm(a, b, out=out), device), repeat) / 1e9


def read_bandwidth_gbs(mib: int = 512, repeat: int = 5, device: torch.device | str = "cpu") -> float:
    """GB/s reading (summing) an fp32 tensor of `mib` MiB: what streaming weights can reach."""
    x = torch.ones(mib * 2**20 // 4, device=device)
    return x.numel() * 4 / best_time(synced(lambda: x.sum(), device), repeat) / 1e9


def copy_bandwidth_gbs(mib: int = 512, repeat: int = 5, device: torch.device | str = "cpu") -> float:
    """GB/s (bytes read + bytes written) copying an fp32 tensor of `mib` MiB."""
    x = torch.ones(mib * 2**20 // 4, device=device)
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / best_time(synced(lambda: y.copy_(x), device), repeat) / 1e9


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def huge_pages() -> str:
    """Whether torch's CPU allocator gets 2 MiB pages for large buffers: the kernel's THP mode and
    THP_MEM_ALLOC_ENABLE (torch reads it once, at its first allocation; jambalab never sets it)."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
        mode = text[text.index("[") + 1:text.index("]")]
    except (OSError, ValueError):
        return "unknown"
    env = os.environ.get("THP_MEM_ALLOC_ENABLE")
    if mode == "always" or (mode == "madvise" and env not in (None, "", "0")):
        return f"on (kernel THP {mode})"
    return f"off (kernel THP {mode}, THP_MEM_ALLOC_ENABLE={'unset' if env is None else env})"


# Settings that hold a process below this CPU's own instruction set (set before the run, inherited by its
# children): jambalab's kernels (-march), ATen's dispatch, oneDNN, MKL, OpenBLAS.
ISA_LIMIT_ENV = ("JAMBALAB_MARCH", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA",
                 "MKL_ENABLE_INSTRUCTIONS", "OPENBLAS_CORETYPE")


def isa_limits() -> dict[str, str]:
    """Those of ISA_LIMIT_ENV that are set: a run under them measures a lesser CPU than this one."""
    return {k: os.environ[k].strip() for k in ISA_LIMIT_ENV if os.environ.get(k, "").strip()}


def machine_info(device: torch.device | str = "cpu") -> dict:
    device = torch.device(device)
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_1min": load_average(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "huge_pages": huge_pages(),
        "isa_limits": isa_limits(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    return info
