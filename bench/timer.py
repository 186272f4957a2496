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


# A GPU call longer than this (a whole sampling loop) is timed LONG_CALL_REPEATS times with CUDA events instead of
# through do_bench, whose estimate, warm-up and repeat phases would run a multi-second call about ten times.
LONG_CALL_MS = 250.0
LONG_CALL_REPEATS = 3


def time_call(fn: Callable[[], object], device: torch.device, *, cpu_budget_s: float = 2.0) -> Timing:
    """Median (and 20th/80th percentiles) of the time one call of ``fn`` takes. The first call is never timed."""
    if device.type == "cuda":
        from triton.testing import do_bench

        probe = _cuda_event_ms(fn)  # long calls: a sample (the runner has made the first call); else discarded
        if probe > LONG_CALL_MS:
            return _summarize([probe] + [_cuda_event_ms(fn) for _ in range(LONG_CALL_REPEATS - 1)])
        median, p20, p80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return Timing(median, p20, p80)
    fn()
    samples = []
    deadline = time.perf_counter() + cpu_budget_s
    while len(samples) < 3 or (time.perf_counter() < deadline and len(samples) < 50):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return _summarize(samples)


def _cuda_event_ms(fn: Callable[[], object]) -> float:
    """Milliseconds of one call of ``fn`` on the current CUDA stream, between two events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _summarize(samples: list[float]) -> Timing:
    samples = sorted(samples)
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
