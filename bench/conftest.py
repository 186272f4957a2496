"""pytest-benchmark session set-up: Triton's CPU interpreter on machines without a GPU (before triton loads)."""
from genkernels.bench.interpreter import configure_for_host, enable_interpreter_checks

if configure_for_host():
    enable_interpreter_checks()
