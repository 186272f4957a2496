"""Choosing an implementation for every op: ``impl="auto" | "triton" | "eager"``.

Resolution order for ``impl="auto"``: the innermost :func:`use_impl` block, else the ``GENKERNELS_IMPL`` environment
variable, else automatic choice (Triton when the tensors live on a CUDA device or Triton's CPU interpreter is on,
eager PyTorch otherwise). An explicit ``impl="triton"`` or ``impl="eager"`` on a call always wins.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

IMPLS = ("auto", "triton", "eager")
ENV_VAR = "GENKERNELS_IMPL"

# The use_impl blocks entered and not yet left, innermost last. A plain list (not a ContextVar) so that
# torch.compile can read it while tracing, and guards on it: a compiled model recompiles under another impl.
_impl_stack: list[str] = []


def validate_impl_name(impl: object, argument: str = "impl") -> str:
    """Return ``impl`` if it names a known implementation, else raise ``ValueError`` listing the valid names."""
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"{argument}={impl!r} is not a known implementation; expected one of {', '.join(IMPLS)}")
    return impl


def interpreter_enabled() -> bool:
    """True when Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def use_impl(name: str) -> Iterator[None]:
    """Make ``name`` the default implementation of every op called inside the block (models included).

    Ops called with an explicit ``impl="triton"``/``"eager"`` keep their own choice. Blocks nest; the innermost wins.

    >>> with use_impl("eager"):
    ...     y = model(x)  # every genkernels op inside runs its eager PyTorch reference
    """
    validate_impl_name(name, "use_impl(name)")
    _impl_stack.append(name)
    try:
        yield
    finally:
        _impl_stack.pop()


def default_impl() -> str:
    """The implementation ``impl="auto"`` stands for here: the :func:`use_impl` scope, else ``GENKERNELS_IMPL``."""
    if _impl_stack:
        return _impl_stack[-1]
    env = os.environ.get(ENV_VAR)
    if env is None or env.strip() == "":
        return "auto"
    return validate_impl_name(env.strip().lower(), f"environment variable {ENV_VAR}")


def resolve_impl(impl: str, device: torch.device, op_name: str) -> str:
    """Turn the ``impl`` a caller passed into ``"triton"`` or ``"eager"`` for tensors on ``device``.

    Raises ``ValueError`` for an unknown name, and for ``"triton"`` on a device Triton cannot run on.
    """
    validate_impl_name(impl)
    if impl == "auto":
        impl = default_impl()
    if impl == "auto":
        return "triton" if triton_can_run_on(device) else "eager"
    if impl == "triton" and not triton_can_run_on(device):
        raise ValueError(
            f"{op_name}: impl='triton' needs tensors on a CUDA device (got device {device}), or Triton's CPU "
            "interpreter switched on with TRITON_INTERPRET=1 before triton is imported; use impl='eager' or "
            "impl='auto' to run the PyTorch reference instead"
        )
    return impl


def triton_can_run_on(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors that live on ``device``."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreter_enabled()


def call_registered(op, launcher, *args):
    """Run a registered op: through the dispatcher while torch.compile traces (so the graph holds one opaque op),
    else straight to its ``launcher``. The dispatcher costs ~10 us of host time per call, as long as a
    memory-bound kernel on a few million elements runs; ops with an autograd formula always take the dispatcher."""
    if torch.compiler.is_compiling():
        return op(*args)
    return launcher(*args)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the eager references compute in: fp32 for fp32/fp16/bf16 inputs, fp64 for fp64 (the test oracle)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
