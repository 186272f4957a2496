"""genkernels.kernels: fused Triton kernels for the hot paths of deep generative models.

Every op takes ``impl="auto" | "triton" | "eager"``: Triton on CUDA tensors (or in Triton's CPU interpreter),
the plain PyTorch reference otherwise. :func:`use_impl` and the ``GENKERNELS_IMPL`` environment variable set the
default for a block of code or a whole process.
"""
from .diffusion import NoiseSchedule, ddim_step, ddpm_step
from .runtime import IMPLS, default_impl, interpreter_enabled, use_impl

__all__ = [
    "IMPLS",
    "NoiseSchedule",
    "ddim_step",
    "ddpm_step",
    "default_impl",
    "interpreter_enabled",
    "use_impl",
]
