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


# On the CPU (a smoke run, not performance): at least CPU_MIN_SAMPLES calls, more while within CPU_BUDGET_S.
CPU_MIN_SAMPLES = 3
CPU_MAX_SAMPLES = 50
CPU_BUDGET_S = 0.25


def time_call(fn: Callable[[], object], device: torch.device, *, warm: bool = False,
              cpu_budget_s: float = CPU_BUDGET_S) -> Timing:
    """Median (and 20th/80th percentiles) of the time one call of ``fn`` takes. The first call is never timed:
    ``warm`` says the caller has made it already (on the CPU no other warm-up call is made then)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        probe = _cuda_event_ms(fn)  # long calls: a sample (the runner has made the first call); else discarded
        if probe > LONG_CALL_MS:
            return _summarize([probe] + [_cuda_event_ms(fn) for _ in range(LONG_CALL_REPEATS - 1)])
        median, p20, p80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return Timing(median, p20, p80)
    if not warm:
        fn()
    samples = []
    deadline = time.perf_counter() + cpu_budget_s
    while len(samples) < CPU_MIN_SAMPLES or (time.perf_counter() < deadline and len(samples) < CPU_MAX_SAMPLES):
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


@dataclasses.dataclass(frozen=True)
class Probe:
    """One measured limit of the device: ``value`` in ``unit``, and what was measured to get it."""
    value: float
    unit: str
    what: str

    def __str__(self) -> str:
        return f"{self.what}: {self.value:.3g} {self.unit}"


def copy_bandwidth_probe(device: torch.device) -> Probe:
    """GB/s of a large device-to-device copy (bytes read + bytes written), the memory roofline of this run."""
    numel = (1 << 28) if device.type == "cuda" else (1 << 22)  # 1 GiB of fp32 on the GPU, 16 MiB on the host
    source = torch.ones(numel, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    timing = time_call(lambda: target.copy_(source), device)
    where = "device-to-device" if device.type == "cuda" else "host memory"
    return Probe(2 * numel * 4 / (timing.median_ms * 1e6), "GB/s", f"{where} copy of {numel * 4 >> 20} MiB fp32")


def matmul_probe(device: torch.device) -> Probe:
    """TFLOP/s of a large matmul (2 n^3 FLOP), the compute roofline of this run: bf16 on a GPU, fp32 on the CPU
    (where it is a host figure, not a roofline of anything the suite runs)."""
    n = 8192 if device.type == "cuda" else 512
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    timing = time_call(lambda: a @ b, device)
    name = str(dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float32", "fp32")
    return Probe(2 * n**3 / (timing.median_ms * 1e9), "TFLOP/s", f"{name} matmul {n}x{n}x{n}")


def copy_bandwidth_gbs(device: torch.device) -> float:
    """:func:`copy_bandwidth_probe`'s GB/s."""
    return copy_bandwidth_probe(device).value


def matmul_tflops(device: torch.device) -> float:
    """:func:`matmul_probe`'s TFLOP/s."""
    return matmul_probe(device).value
