"""Running Triton kernels on a machine without a GPU, in Triton's CPU interpreter.

Import this module before anything imports triton (``torch.compile`` does): :func:`configure_for_host` must set
``TRITON_INTERPRET`` before ``import triton`` because triton reads it when its own helpers are decorated.
This module imports neither triton nor anything that does.
"""
from __future__ import annotations

import os
import sys
import time

import torch


def configure_for_host() -> bool:
    """Switch Triton to its CPU interpreter when this machine has no CUDA device. Returns whether it is on.

    Raises ``RuntimeError`` if triton was already imported without the interpreter on a machine without a GPU.
    """
    if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
        if "triton" in sys.modules:
            raise RuntimeError("triton was imported before genkernels could switch on its CPU interpreter; "
                               "set TRITON_INTERPRET=1 in the environment instead")
        os.environ["TRITON_INTERPRET"] = "1"
    return os.environ.get("TRITON_INTERPRET") == "1"


def enable_interpreter_checks() -> None:
    """Turn on the interpreter's debug mode (so ``tl.device_assert`` fires) and give ``@triton.autotune`` a
    wall-clock timer in place of the CUDA-event benchmarker it cannot use without a GPU driver."""
    import dataclasses

    from triton.runtime import autotuner, interpreter

    builder = interpreter.interpreter_builder
    builder.options = dataclasses.replace(builder.options, debug=True)
    autotuner.Autotuner.do_bench = property(lambda self: wall_clock_bench)


def wall_clock_bench(kernel_call, quantiles=(0.5, 0.2, 0.8), repeats: int = 1) -> list[float]:
    """Milliseconds per call by the host clock, at the requested quantiles (used only to rank configs)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        kernel_call()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return [times[min(len(times) - 1, int(q * len(times)))] for q in quantiles]
