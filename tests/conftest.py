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

try:  # property-based tests (tests/test_properties_*.py); pick a profile with --hypothesis-profile NAME
    from hypothesis import HealthCheck, Phase, settings
except ImportError:  # hypothesis is in the dev extra; without it the property tests are skipped
    settings = None
if settings is not None:
    # ci (the default): the same examples every run, so CI never flakes; few examples, sized to the interpreter
    settings.register_profile("ci", derandomize=True, database=None, deadline=None, max_examples=20, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    # thorough: a long randomized local run
    settings.register_profile("thorough", derandomize=False, deadline=None, max_examples=500, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    # nightly: a randomized run of middling length (about ten times the CI one)
    settings.register_profile("nightly", parent=settings.get_profile("thorough"), max_examples=100)
    # smoke: a quick look that each property runs (3 examples, no shrinking)
    settings.register_profile("smoke", parent=settings.get_profile("ci"), max_examples=3,
                              phases=[Phase.explicit, Phase.generate])
    settings.load_profile("ci")


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
