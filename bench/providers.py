"""The standard providers of a case: the eager reference, the Triton kernels, and torch.compile of the reference,
for a forward call, a forward + backward, or a whole training step."""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch

from genkernels.kernels import use_impl


def eager_triton_compile(op: Callable, *args, **kwargs) -> dict[str, Callable[[], object]]:
    """Providers for ``op(*args, **kwargs, impl=...)``: ``eager``, ``triton`` and ``compile`` (torch.compile of
    the eager reference, compiled on its first call, which the runner never times)."""
    compiled = torch_compile(functools.partial(op, impl="eager"))
    return {
        "eager": lambda: op(*args, impl="eager", **kwargs),
        "triton": lambda: op(*args, impl="triton", **kwargs),
        "compile": lambda: compiled(*args, **kwargs),
    }


def forward_backward(forward: Callable, inputs: Sequence[torch.Tensor],
                     grad_outputs) -> Callable[[], torch.Tensor]:
    """A provider running ``forward(*inputs)`` and the gradients of its outputs (weighted by ``grad_outputs``) in
    every input; it returns the first input's gradient, for the error column. ``inputs`` must require grad."""
    def call():
        outputs = forward(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return torch.autograd.grad(outputs, inputs, grad_outputs)[0]
    return call


def eager_triton_compile_backward(op: Callable, inputs: Sequence[torch.Tensor], grad_outputs,
                                  **kwargs) -> dict[str, Callable[[], torch.Tensor]]:
    """:func:`eager_triton_compile` for ``op``'s forward + backward (see :func:`forward_backward`)."""
    def with_impl(impl):
        return lambda *tensors: op(*tensors, impl=impl, **kwargs)

    return {
        "eager": forward_backward(with_impl("eager"), inputs, grad_outputs),
        "triton": forward_backward(with_impl("triton"), inputs, grad_outputs),
        "compile": forward_backward(torch_compile(with_impl("eager")), inputs, grad_outputs),
    }


def training_step(compute_loss: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer,
                  impl: str) -> Callable[[], torch.Tensor]:
    """A provider taking one optimizer step on ``compute_loss()`` (forward and backward under ``use_impl(impl)``);
    it returns the detached loss."""
    def call():
        with use_impl(impl):
            loss = compute_loss()
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return call


def torch_compile(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)


# ----------------------------------------------------------------------------------------------------------------
# Which providers can exist on a device, decided from their names before a case runs
# ----------------------------------------------------------------------------------------------------------------
# provider name (a glob) -> what it needs besides PyTorch itself; the first matching pattern applies
# (in the order they are checked: the first one missing is the reason given)
REQUIRES: dict[str, tuple[str, ...]] = {
    "sdpa_flash": ("flash_attention",),
    "sdpa_efficient": ("cuda",),
    "sdpa_cudnn": ("cuda", "cudnn"),
    "*cuda_graph*": ("cuda",),
    "cudnn*": ("cuda", "cudnn"),
}

# requirement -> (is it met on this device?, why not)
_CHECKS: dict[str, tuple[Callable[[torch.device], bool], str]] = {
    "cuda": (lambda device: device.type == "cuda", "needs a CUDA device"),
    "cudnn": (lambda device: torch.backends.cudnn.is_available(), "needs cuDNN"),
    "flash_attention": (
        lambda device: device.type == "cuda" or (
            device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")),
        "needs a CUDA device or PyTorch's CPU flash-attention kernel"),
}


def requirements(provider: str) -> tuple[str, ...]:
    """What ``provider`` needs (see :data:`REQUIRES`); nothing for the standard eager/triton/compile."""
    import fnmatch

    for pattern, needs in REQUIRES.items():
        if fnmatch.fnmatchcase(provider, pattern):
            return needs
    return ()


def unavailable(provider: str, device: torch.device) -> str | None:
    """Why ``provider`` cannot run on ``device`` (e.g. SDPA's cuDNN backend on a CPU), or None if it can."""
    device = torch.device(device)
    for need in requirements(provider):
        met, reason = _CHECKS[need]
        if not met(device):
            return reason
    return None


def runs_triton(provider: str) -> bool:
    """Whether ``provider`` runs genkernels' Triton kernels (``triton``, ``cached_triton``, ``triton_cuda_graph``)."""
    return "triton" in provider
