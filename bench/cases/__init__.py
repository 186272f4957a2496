"""Benchmark cases, one module per family; importing this package registers them all."""
from . import diffusion  # noqa: F401
