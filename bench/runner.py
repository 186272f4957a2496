"""Runs cases: every provider of a case is warmed up, checked against the case's reference, then timed.

Which providers of a case run is decided before any of them is called (:func:`plan_providers`): those that cannot
exist on the device (SDPA's cuDNN backend on a CPU, CUDA graphs without CUDA, ...) are "not available here", not
failures; in Triton's CPU interpreter whole models skip the providers that run Triton kernels (one U-Net training
step takes minutes there; the op cases cover the same kernels at tiny sizes) and the op cases skip ``compile``
(torch.compile of the reference compiles C++ for every tiny op and checks inductor, not genkernels), unless asked
for.
"""
from __future__ import annotations

import dataclasses
import gc
import time
from typing import Callable, Iterable, Optional

import torch

from .providers import runs_triton, unavailable
from .registry import Case
from .timer import time_call

INTERPRETER_MODELS_SKIPPED = (
    "whole models (train/sample cases) skip the providers that run Triton kernels in Triton's CPU interpreter: "
    "a single model call takes minutes there (one U-Net training step about 20 minutes), and the op cases above "
    "check the same kernels at tiny sizes; --interpreter-models runs them anyway")
INTERPRETER_OPS_COMPILE_SKIPPED = (
    "op cases skip 'compile' in the CPU smoke run: torch.compile of the reference builds C++ for every tiny op "
    "(seconds each) and checks inductor, not genkernels; --providers ...,compile runs it")
# the same, one line per provider in the list of what a run left out
MODEL_SKIP_REASON = "runs Triton kernels: whole models in the interpreter are skipped (--interpreter-models)"
OP_COMPILE_SKIP_REASON = "torch.compile of a tiny op's reference on the CPU (--providers ...,compile)"


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
    first_call_s: Optional[float] = None  # the untimed first call: compilation, autotuning (host clock)
    notes: str = ""
    failure: Optional[str] = None


@dataclasses.dataclass
class ProviderPlan:
    """What a case's providers do on this device, decided before any of them runs."""
    run: list[str]
    not_available: dict[str, str] = dataclasses.field(default_factory=dict)  # provider -> why it cannot exist
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # provider -> why this run leaves it out


def plan_providers(kind: str, names: Iterable[str], device: torch.device, *,
                   requested: Optional[Iterable[str]] = None, interpreted: bool = False,
                   interpreter_models: bool = False) -> ProviderPlan:
    """Split a case's provider ``names`` into those to run, those that cannot exist on ``device`` and those this run
    leaves out (see the module docstring). ``requested`` (``--providers``) keeps only the named ones; naming
    ``compile`` brings it back to the op cases in the interpreter."""
    requested = list(requested) if requested is not None else None
    plan = ProviderPlan(run=[])
    for name in names:
        if requested is not None and name not in requested:
            continue
        reason = unavailable(name, device)
        if reason:
            plan.not_available[name] = reason
        elif interpreted and kind != "op" and runs_triton(name) and not interpreter_models:
            plan.skipped[name] = MODEL_SKIP_REASON
        elif interpreted and kind == "op" and name == "compile" and requested is None:
            plan.skipped[name] = OP_COMPILE_SKIP_REASON
        else:
            plan.run.append(name)
    return plan


@dataclasses.dataclass
class CaseResult:
    rows: list[Row]
    plan: ProviderPlan


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
    """Rows for one case, one per provider that can run here; a provider that fails gets a row with its
    ``failure``. See :func:`run_planned` for what is left out and why."""
    return run_planned(case, device, providers=providers, copy_gbs=copy_gbs, matmul_tflops=matmul_tflops).rows


def run_planned(case: Case, device: torch.device, *, providers: Optional[Iterable[str]] = None,
                copy_gbs: Optional[float] = None, matmul_tflops: Optional[float] = None,
                interpreted: bool = False, interpreter_models: bool = False) -> CaseResult:
    """Set the case up, plan its providers (:func:`plan_providers`), then run, check and time those planned."""
    workload = case.setup(device)
    plan = plan_providers(case.kind, workload.providers, device, requested=providers, interpreted=interpreted,
                          interpreter_models=interpreter_models)
    try:
        rows = _run_providers(case, workload, plan.run, device, copy_gbs, matmul_tflops) if plan.run else []
    finally:
        del workload
        gc.collect()
        # each compile provider compiles once for its own case: without a reset, the compiled references of every
        # case pile up on the same code objects (the op, a model's loss) until dynamo's recompile limit
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return CaseResult(rows, plan)


def _run_providers(case: Case, workload, names: list[str], device: torch.device, copy_gbs: Optional[float],
                   matmul_tflops: Optional[float]) -> list[Row]:
    reference = workload.reference() if workload.reference is not None else None
    rows = []
    for name in names:
        row = Row(case.name, case.family, case.kind, case.params, name, notes=workload.notes)
        fn: Callable[[], object] = workload.providers[name]
        try:
            start = time.perf_counter()
            output = fn()  # first call: compilation and autotuning, never timed
            _synchronize(device)
            row.first_call_s = time.perf_counter() - start
            row.max_error = _max_error(output, reference)
            del output
            row.peak_memory_mib = _peak_memory_mib(fn, device)
            timing = time_call(fn, device, warm=True)
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
    return rows
