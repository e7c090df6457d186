"""Shared measuring helpers: every benchmark reports time, useful TFLOP/s and peak memory side by side."""

from __future__ import annotations

import platform
from collections.abc import Callable

import torch


def environment() -> dict:
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
    }


def peak_memory_delta(fn: Callable[[], object]) -> int:
    """Bytes of peak CUDA memory ``fn`` allocates above what was allocated before it ran."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def run_benchmark(benchmark, fn: Callable[[], object], *, flops: float, name: str, **info) -> None:
    """Time ``fn`` with pytest-benchmark (CUDA-synchronised), and record TFLOP/s and peak memory in extra_info."""
    fn()  # warm-up / compile
    mem = peak_memory_delta(fn)

    def timed():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=20, iterations=1, warmup_rounds=3)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(environment())
    benchmark.extra_info.update(
        name=name,
        median_ms=median * 1e3,
        tflops=flops / median / 1e12 if median > 0 else float("nan"),
        peak_mem_gib=mem / 2**30,
        **info,
    )
