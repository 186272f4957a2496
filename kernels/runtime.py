"""Choosing an implementation for every op: ``impl="auto" | "triton" | "eager"``.

Resolution order for ``impl="auto"``: the innermost :func:`use_impl` block, else the ``GENKERNELS_IMPL`` environment
variable, else automatic choice (Triton when the tensors live on a CUDA device or Triton's CPU interpreter is on,
eager PyTorch otherwise). An explicit ``impl="triton"`` or ``impl="eager"`` on a call always wins.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Iterator, Sequence

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


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


# Triton reads TRITON_INTERPRET when @triton.jit runs, that is when genkernels' kernel modules are imported (just
# after this one): the kernels are interpreted functions exactly when it was on then. Setting it later changes
# nothing about them, so the choice is taken once, here.
_INTERPRETED_AT_IMPORT = _interpret_requested()


def interpreter_enabled() -> bool:
    """True when genkernels' Triton kernels run in Triton's CPU interpreter: ``TRITON_INTERPRET=1`` was set before
    genkernels (and so triton) was imported."""
    return _INTERPRETED_AT_IMPORT


def interpreter_switched_on_late() -> bool:
    """True when ``TRITON_INTERPRET=1`` is set now but was not when genkernels was imported (it has no effect)."""
    return _interpret_requested() and not _INTERPRETED_AT_IMPORT


LATE_INTERPRETER_MESSAGE = (
    "TRITON_INTERPRET=1 was set after genkernels was imported, so its kernels were built for a GPU and cannot run "
    "in Triton's CPU interpreter; set TRITON_INTERPRET=1 in the environment before the process imports genkernels, "
    "triton or torch.compile (e.g. `TRITON_INTERPRET=1 python script.py`)")


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


# The dtypes the Triton kernels take (they compute in fp32 inside). float64 is accepted by every op, and runs the
# eager reference in float64 (the test oracle, gradient checks): impl="auto" picks it, impl="triton" is refused.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def choose_impl(impl: str, op_name: str, tensors: dict, reasons: Sequence[str] = ()) -> str:
    """The one place an op turns its ``impl`` argument into ``"triton"`` or ``"eager"``.

    ``tensors`` maps argument names to the op's tensors (None entries are skipped); the first one's device decides.
    ``reasons`` lists why the op's kernels cannot take these inputs (beyond device and dtype, which are checked
    here). ``impl="auto"`` then runs the eager reference; ``impl="triton"`` raises ``ValueError`` listing every
    reason, never a silent fallback. ``meta`` tensors take the registered op, whose fake kernel gives the output
    shapes without reading any value.
    """
    validate_impl_name(impl)
    named = [(name, t) for name, t in tensors.items() if isinstance(t, torch.Tensor)]
    device = named[0][1].device
    every_reason = list(reasons)
    if not triton_can_run_on(device):
        every_reason.insert(0, LATE_INTERPRETER_MESSAGE if device.type == "cpu" and interpreter_switched_on_late()
                            else f"the tensors are on {device}: the kernels need a CUDA device, or Triton's CPU "
                                 "interpreter switched on with TRITON_INTERPRET=1 before triton is imported")
    every_reason += [f"{name} is {t.dtype}: the kernels take {', '.join(map(str, KERNEL_DTYPES))} (fp32 math "
                     "inside); float64 runs the eager reference" for name, t in named
                     if t.is_floating_point() and t.dtype not in KERNEL_DTYPES]
    requested = default_impl() if impl == "auto" else impl
    if requested == "eager":
        return "eager"
    if requested == "triton" and every_reason:
        listing = "; ".join(f"({k}) {r}" for k, r in enumerate(every_reason, 1))
        raise ValueError(f"{op_name}: impl='triton' cannot run these inputs: {listing}. Use impl='eager' or "
                         "impl='auto' to run the PyTorch reference")
    if every_reason and device.type == "cpu" and interpreter_switched_on_late():
        warnings.warn(f"{op_name} runs its eager reference: {LATE_INTERPRETER_MESSAGE}", RuntimeWarning,
                      stacklevel=3)
    return "eager" if every_reason else "triton"


def triton_can_run_on(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors that live on ``device``."""
    if device.type in ("cuda", "meta"):
        return True
    return device.type == "cpu" and interpreter_enabled()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the eager references compute in: fp32 for fp32/fp16/bf16 inputs, fp64 for fp64 (the test oracle)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
