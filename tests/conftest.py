"""Test session set-up: Triton's CPU interpreter on machines without a GPU (before triton is imported)."""
from genkernels.bench.interpreter import configure_for_host, enable_interpreter_checks

INTERPRETED = configure_for_host()

import pytest  # noqa: E402
import torch  # noqa: E402

if INTERPRETED:
    enable_interpreter_checks()

# Test tensors are tiny and pytest-xdist runs a worker per core: more than one intra-op thread per worker only
# oversubscribes the cores (small ops then run many times slower).
torch.set_num_threads(1)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    needs_gpu = pytest.mark.skip(reason="needs a CUDA GPU (runs on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(needs_gpu)


@pytest.fixture
def device() -> str:
    return DEVICE
