"""Runs cases: every provider of a case is warmed up, checked against the case's reference, then timed."""
from __future__ import annotations

import dataclasses
import gc
from typing import Callable, Iterable, Optional

import torch

from .registry import Case
from .timer import time_call


@dataclasses.dataclass
class Row:
    case: str
    family: str
    kind: str
    params: dict
    provider: str
    median_ms: Optional[float] = None
    p20_ms: Optional[float] = None
    p80_ms: Optional[float] = None
    gb_per_s: Optional[float] = None
    pct_copy_bandwidth: Optional[float] = None
    tflop_per_s: Optional[float] = None
    pct_matmul_peak: Optional[float] = None
    items_per_s: Optional[float] = None
    item_unit: Optional[str] = None
    speedup_vs_eager: Optional[float] = None
    speedup_vs_compile: Optional[float] = None
    max_error: Optional[float] = None
    peak_memory_mib: Optional[float] = None  # GPU memory one call allocates beyond what existed before it
    notes: str = ""
    failure: Optional[str] = None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _max_error(output, reference: Optional[torch.Tensor]) -> Optional[float]:
    if reference is None or not isinstance(output, torch.Tensor):
        return None
    if output.numel() == 0:
        return 0.0
    return (output.double() - reference.double()).abs().max().item()


def _peak_memory_mib(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """MiB that one call allocates at its peak beyond what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    output = fn()
    torch.cuda.synchronize(device)
    del output
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def run_case(case: Case, device: torch.device, *, providers: Optional[Iterable[str]] = None,
             copy_gbs: Optional[float] = None, matmul_tflops: Optional[float] = None) -> list[Row]:
    """Rows for one case, one per provider; a provider that fails gets a row with its ``failure``."""
    workload = case.setup(device)
    reference = workload.reference() if workload.reference is not None else None
    wanted = [name for name in workload.providers if providers is None or name in providers]
    rows = []
    for name in wanted:
        row = Row(case.name, case.family, case.kind, case.params, name, notes=workload.notes)
        fn: Callable[[], object] = workload.providers[name]
        try:
            output = fn()  # first call: compilation and autotuning, never timed
            _synchronize(device)
            row.max_error = _max_error(output, reference)
            del output
            row.peak_memory_mib = _peak_memory_mib(fn, device)
            timing = time_call(fn, device)
        except Exception as error:  # a failing provider is reported in its row, the suite goes on
            row.failure = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
            rows.append(row)
            continue
        row.median_ms, row.p20_ms, row.p80_ms = timing.median_ms, timing.p20_ms, timing.p80_ms
        seconds = timing.median_ms / 1e3
        if workload.bytes_moved:
            row.gb_per_s = workload.bytes_moved / seconds / 1e9
            if copy_gbs:
                row.pct_copy_bandwidth = 100 * row.gb_per_s / copy_gbs
        if workload.flops:
            row.tflop_per_s = workload.flops / seconds / 1e12
            if matmul_tflops:
                row.pct_matmul_peak = 100 * row.tflop_per_s / matmul_tflops
        if workload.items:
            row.items_per_s, row.item_unit = workload.items[0] / seconds, workload.items[1]
        rows.append(row)
    timed = {row.provider: row.median_ms for row in rows if row.median_ms}
    for row in rows:
        if row.median_ms:
            if "eager" in timed:
                row.speedup_vs_eager = timed["eager"] / row.median_ms
            if "compile" in timed:
                row.speedup_vs_compile = timed["compile"] / row.median_ms
    del workload, reference
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows
