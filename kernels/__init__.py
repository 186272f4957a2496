"""genkernels.kernels: fused Triton kernels for the hot paths of deep generative models.

Every op takes ``impl="auto" | "triton" | "eager"``: Triton on CUDA tensors (or in Triton's CPU interpreter),
the plain PyTorch reference otherwise. :func:`use_impl` and the ``GENKERNELS_IMPL`` environment variable set the
default for a block of code or a whole process.
"""
from importlib.metadata import version as _distribution_version

from .attention import decode_attention, flash_attention
from .bias_act import ACTIVATIONS, bias_act
from .causal_conv import causal_conv1d
from .coupling import affine_coupling
from .cross_entropy import cross_entropy, linear_cross_entropy
from .diffusion import NoiseSchedule, ddim_step, ddpm_step
from .diffusion_loss import diffusion_loss, q_sample
from .group_norm import group_norm_silu
from .launch import draw_philox_seed
from .masked_conv import masked_conv2d
from .philox import philox_normal
from .reparameterize import reparameterize_kl
from .sdpa import AttentionFallbackWarning, scaled_dot_product_attention
from .runtime import IMPLS, default_impl, interpreter_enabled, use_impl
from .sampling import sample_categorical
from .wavenet import WaveNetCache, wavenet_residual_layer, wavenet_step

__version__ = _distribution_version("genkernels")

__all__ = [
    "ACTIVATIONS",
    "AttentionFallbackWarning",
    "IMPLS",
    "NoiseSchedule",
    "WaveNetCache",
    "affine_coupling",
    "bias_act",
    "causal_conv1d",
    "cross_entropy",
    "ddim_step",
    "ddpm_step",
    "decode_attention",
    "flash_attention",
    "default_impl",
    "diffusion_loss",
    "draw_philox_seed",
    "group_norm_silu",
    "interpreter_enabled",
    "linear_cross_entropy",
    "masked_conv2d",
    "philox_normal",
    "q_sample",
    "reparameterize_kl",
    "sample_categorical",
    "scaled_dot_product_attention",
    "use_impl",
    "wavenet_residual_layer",
    "wavenet_step",
]
