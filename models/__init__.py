"""genkernels.models: drop-in layers and the reference models of the five families, running on genkernels' ops.

Models hold no Triton code and take no impl flag: one set of weights runs under every implementation, chosen with
:func:`genkernels.kernels.use_impl` or ``GENKERNELS_IMPL``.
"""
from importlib.metadata import version as _distribution_version

from . import integrations
from .attention import KVCache, MultiheadSelfAttention
from .ddpm import DDPM
from .dcgan import DCGAN, DCGANDiscriminator, DCGANGenerator, GANLosses, discriminator_loss, generator_loss, r1_penalty
from .flows import ActNorm, AffineCoupling, InvConv1x1, LearnedPrior, MultiScaleFlow, Split, Squeeze
from .glow import Glow
from .gpt import GPT, GPTConfig
from .layers import BatchNormAct2d, Conv2dBiasAct, ConvTranspose2dBiasAct, GroupNormAct, LinearBiasAct
from .pixelcnn import MaskedConv2d, PixelCNN
from .realnvp import RealNVP
from .schedulers import DDIMScheduler, DDPMScheduler, SchedulerOutput
from .unet import UNet
from .vae import VAE, VAELoss
from .wavenet import CausalConv1d, WaveNet, mu_law_decode, mu_law_encode

__version__ = _distribution_version("genkernels")

__all__ = [
    "integrations",
    "ActNorm", "AffineCoupling", "BatchNormAct2d", "CausalConv1d", "Conv2dBiasAct", "ConvTranspose2dBiasAct",
    "DCGAN", "DCGANDiscriminator", "DCGANGenerator", "DDIMScheduler", "DDPM", "DDPMScheduler", "GANLosses", "GPT",
    "GPTConfig", "Glow", "GroupNormAct", "InvConv1x1", "KVCache", "LearnedPrior", "LinearBiasAct", "MaskedConv2d",
    "MultiScaleFlow", "MultiheadSelfAttention", "PixelCNN", "RealNVP", "SchedulerOutput", "Split", "Squeeze", "UNet",
    "VAE", "VAELoss", "WaveNet", "discriminator_loss", "generator_loss", "mu_law_decode", "mu_law_encode", "r1_penalty",
]
