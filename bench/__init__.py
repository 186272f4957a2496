"""genkernels.bench: throughput of every kernel and model against eager PyTorch and torch.compile.

Run ``python -m genkernels.bench`` (see ``--help``), or ``pytest bench/ --benchmark-only -n 0`` for
pytest-benchmark.
This package's ``__init__`` imports nothing heavy, so :mod:`genkernels.bench.interpreter` can switch Triton to its
CPU interpreter before triton is imported.
"""
from importlib.metadata import version as _distribution_version

__version__ = _distribution_version("genkernels")
