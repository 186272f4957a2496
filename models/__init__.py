"""genkernels.models: drop-in layers and the reference models of the five families, running on genkernels' ops.

Models hold no Triton code and take no impl flag: one set of weights runs under every implementation, chosen with
:func:`genkernels.kernels.use_impl` or ``GENKERNELS_IMPL``.
"""
from importlib.metadata import version as _distribution_version

# Absolute imports: from the repository root this folder is also importable under its bare name (transformers
# imports a package called "kernels" when it probes for one), and a second copy of the submodules would
# register the ops again over the real ones; the bare name then only re-exports the installed package.
from genkernels.models import integrations
from genkernels.models.attention import KVCache, MultiheadSelfAttention
from genkernels.models.ddpm import DDPM
from genkernels.models.dcgan import DCGAN, DCGANDiscriminator, DCGANGenerator, GANLosses, discriminator_loss, generator_loss, r1_penalty
from genkernels.models.flows import ActNorm, AffineCoupling, InvConv1x1, LearnedPrior, MultiScaleFlow, Split, Squeeze
from genkernels.models.glow import Glow
from genkernels.models.gpt import GPT, GPTConfig
from genkernels.models.layers import BatchNormAct2d, Conv2dBiasAct, ConvTranspose2dBiasAct, GroupNormAct, LinearBiasAct
from genkernels.models.pixelcnn import MaskedConv2d, PixelCNN
from genkernels.models.realnvp import RealNVP
from genkernels.models.schedulers import DDIMScheduler, DDPMScheduler, SchedulerOutput
from genkernels.models.unet import UNet
from genkernels.models.vae import VAE, VAELoss
from genkernels.models.wavenet import CausalConv1d, WaveNet, mu_law_decode, mu_law_encode

__version__ = _distribution_version("genkernels")

__all__ = [
    "integrations",
    "ActNorm", "AffineCoupling", "BatchNormAct2d", "CausalConv1d", "Conv2dBiasAct", "ConvTranspose2dBiasAct",
    "DCGAN", "DCGANDiscriminator", "DCGANGenerator", "DDIMScheduler", "DDPM", "DDPMScheduler", "GANLosses", "GPT",
    "GPTConfig", "Glow", "GroupNormAct", "InvConv1x1", "KVCache", "LearnedPrior", "LinearBiasAct", "MaskedConv2d",
    "MultiScaleFlow", "MultiheadSelfAttention", "PixelCNN", "RealNVP", "SchedulerOutput", "Split", "Squeeze", "UNet",
    "VAE", "VAELoss", "WaveNet", "discriminator_loss", "generator_loss", "mu_law_decode", "mu_law_encode", "r1_penalty",
]
