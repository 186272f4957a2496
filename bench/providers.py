"""The standard providers of a case: the eager reference, the Triton kernels, and torch.compile of the reference."""
from __future__ import annotations

import functools
from typing import Callable


def eager_triton_compile(op: Callable, *args, **kwargs) -> dict[str, Callable[[], object]]:
    """Providers for ``op(*args, **kwargs, impl=...)``: ``eager``, ``triton`` and ``compile`` (torch.compile of
    the eager reference, compiled on its first call, which the runner never times)."""
    compiled = torch_compile(functools.partial(op, impl="eager"))
    return {
        "eager": lambda: op(*args, impl="eager", **kwargs),
        "triton": lambda: op(*args, impl="triton", **kwargs),
        "compile": lambda: compiled(*args, **kwargs),
    }


def torch_compile(fn: Callable) -> Callable:
    import torch

    return torch.compile(fn, dynamic=False)
