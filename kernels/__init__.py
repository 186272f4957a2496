"""genkernels.kernels: fused Triton kernels for the hot paths of deep generative models.

Every op takes ``impl="auto" | "triton" | "eager"``: Triton on CUDA tensors (or in Triton's CPU interpreter),
the plain PyTorch reference otherwise. :func:`use_impl` and the ``GENKERNELS_IMPL`` environment variable set the
default for a block of code or a whole process.
"""
from importlib.metadata import version as _distribution_version

# Absolute imports: from the repository root this folder is also importable under its bare name (transformers
# imports a package called "kernels" when it probes for one), and a second copy of the submodules would
# register the ops again over the real ones; the bare name then only re-exports the installed package.
from genkernels.kernels.attention import decode_attention, flash_attention
from genkernels.kernels.bias_act import ACTIVATIONS, bias_act
from genkernels.kernels.causal_conv import causal_conv1d
from genkernels.kernels.coupling import affine_coupling
from genkernels.kernels.cross_entropy import cross_entropy, linear_cross_entropy
from genkernels.kernels.diffusion import NoiseSchedule, ddim_step, ddpm_step
from genkernels.kernels.diffusion_loss import diffusion_loss, q_sample
from genkernels.kernels.group_norm import group_norm_silu
from genkernels.kernels.launch import draw_philox_seed
from genkernels.kernels.masked_conv import masked_conv2d
from genkernels.kernels.philox import philox_normal
from genkernels.kernels.reparameterize import reparameterize_kl
from genkernels.kernels.sdpa import AttentionFallbackWarning, scaled_dot_product_attention
from genkernels.kernels.runtime import IMPLS, default_impl, interpreter_enabled, use_impl
from genkernels.kernels.sampling import sample_categorical
from genkernels.kernels.wavenet import WaveNetCache, wavenet_residual_layer, wavenet_step

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
