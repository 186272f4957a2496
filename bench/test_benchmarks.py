"""The benchmark cases through pytest-benchmark: ``pytest bench/ --benchmark-only -n 0``.

(``-n 0``: the project's pytest options turn xdist on, and pytest-benchmark does not time under xdist workers.)
Same registry as ``python -m genkernels.bench`` (quick sizes on a GPU, tiny interpreter sizes on the CPU) and the
same plan of providers (:func:`genkernels.bench.runner.plan_providers`): without a GPU the model cases skip the
providers that run Triton kernels (set ``GENKERNELS_BENCH_INTERPRETER_MODELS=1`` to run them) and the op cases
skip ``compile``. Runs can be saved and compared with ``--benchmark-save`` / ``--benchmark-compare``.
pytest-benchmark times with the host clock around a synchronized call; the CLI's CUDA-event medians are the figures
to report. On the CPU each benchmark is three rounds of one call (timings there are not performance figures).
"""
import os

import pytest
import torch

from genkernels.bench.interpreter import configure_for_host
from genkernels.bench.registry import all_cases
from genkernels.bench.runner import plan_providers

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = configure_for_host()
INTERPRETER_MODELS = os.environ.get("GENKERNELS_BENCH_INTERPRETER_MODELS") == "1"
CASES = all_cases("quick" if DEVICE.type == "cuda" else "cpu")
PROVIDERS = ("eager", "triton", "compile")
CPU_ROUNDS = 3


def _synchronized(fn):
    def call():
        result = fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return result
    return call


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_case(benchmark, case, provider):
    workload = case.setup(DEVICE)
    if provider not in workload.providers:
        pytest.skip(f"{case.name} has no {provider} provider")
    plan = plan_providers(case.kind, [provider], DEVICE, interpreted=INTERPRETED,
                          interpreter_models=INTERPRETER_MODELS)
    if provider in plan.not_available:
        pytest.skip(f"{provider} is not available here: {plan.not_available[provider]}")
    if provider in plan.skipped:
        hint = " (GENKERNELS_BENCH_INTERPRETER_MODELS=1 runs it)" if case.kind != "op" else ""
        pytest.skip(f"{provider}: {plan.skipped[provider]}{hint}")
    call = _synchronized(workload.providers[provider])
    call()  # compilation and autotuning stay out of the timing
    benchmark.group = case.name
    benchmark.extra_info.update(case.params, provider=provider, bytes_moved=workload.bytes_moved,
                                flops=workload.flops)
    if DEVICE.type == "cuda":
        benchmark(call)
    else:
        benchmark.pedantic(call, rounds=CPU_ROUNDS, iterations=1)
    torch._dynamo.reset()  # each case's compile provider compiles for itself (no recompile limit across cases)
