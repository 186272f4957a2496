"""Timing and the device's own limits, measured in the same run as the cases.

On a GPU: CUDA events through ``triton.testing.do_bench`` (warm-up, L2 flushed between calls, quantiles). On the
CPU: the host clock, for a smoke run of the suite in Triton's interpreter; such numbers are not performance.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import torch


@dataclasses.dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


def time_call(fn: Callable[[], object], device: torch.device, *, cpu_budget_s: float = 2.0) -> Timing:
    """Median (and 20th/80th percentiles) of the time one call of ``fn`` takes. The first call is never timed."""
    if device.type == "cuda":
        from triton.testing import do_bench

        median, p20, p80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return Timing(median, p20, p80)
    fn()
    samples = []
    deadline = time.perf_counter() + cpu_budget_s
    while len(samples) < 3 or (time.perf_counter() < deadline and len(samples) < 50):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    pick = lambda q: samples[min(len(samples) - 1, int(q * len(samples)))]  # noqa: E731
    return Timing(statistics.median(samples), pick(0.2), pick(0.8))


def copy_bandwidth_gbs(device: torch.device) -> float:
    """GB/s of a large device-to-device copy (bytes read + bytes written), the memory roofline of this run."""
    numel = (1 << 28) if device.type == "cuda" else (1 << 20)  # 1 GiB of fp32 on the GPU
    source = torch.ones(numel, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    timing = time_call(lambda: target.copy_(source), device)
    return 2 * numel * 4 / (timing.median_ms * 1e6)


def matmul_tflops(device: torch.device) -> float:
    """TFLOP/s of a large bf16 matmul (2 n^3 FLOP), the compute roofline of this run."""
    n = 8192 if device.type == "cuda" else 256
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    timing = time_call(lambda: a @ b, device)
    return 2 * n**3 / (timing.median_ms * 1e9)
