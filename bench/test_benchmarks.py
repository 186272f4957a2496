"""The benchmark cases through pytest-benchmark: ``pytest bench/ --benchmark-only -p no:xdist``.

Same registry as ``python -m genkernels.bench`` (quick sizes on a GPU, tiny interpreter sizes on the CPU), so
runs can be saved and compared with ``--benchmark-save`` / ``--benchmark-compare``. pytest-benchmark times with the
host clock around a synchronized call; the CLI's CUDA-event medians are the figures to report.
"""
import pytest
import torch

from genkernels.bench.registry import all_cases

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = all_cases("quick" if DEVICE.type == "cuda" else "cpu")
PROVIDERS = ("eager", "triton", "compile")


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
    call = _synchronized(workload.providers[provider])
    call()  # compilation and autotuning stay out of the timing
    benchmark.group = case.name
    benchmark.extra_info.update(case.params, provider=provider, bytes_moved=workload.bytes_moved,
                                flops=workload.flops)
    benchmark(call)
