"""DCGAN (Radford et al. 2016) whose bias + activation pairs run through the fused :func:`bias_act`.

Architecture for an ``image_size = 4 * 2**U`` image (U = 3 for 32x32, 4 for 64x64; 8x8 and 16x16 also work):

* Generator: ``z [N, latent_dim]`` -> transposed conv 4x4 (stride 1, no padding) to a 4x4 map with
  ``base_channels * 2**(U-1)`` channels -> batch norm -> ReLU, then ``U - 1`` times: transposed conv 4x4 stride 2
  (doubles the map, halves the channels) -> batch norm -> ReLU; last, a transposed conv 4x4 stride 2 to
  ``channels`` -> bias -> tanh. Each batch norm's shift (beta) + ReLU is one :func:`bias_act` call.
* Discriminator: ``U`` strided convs 4x4 stride 2 (``base_channels``, doubling) each followed by bias + LeakyReLU(0.2)
  in one :func:`bias_act` call, then a 4x4 valid conv to one logit. The paper's discriminator batch norm is left
  out: it couples the samples of a batch, so the R1 penalty would no longer be a per-sample input gradient (the
  R1-regularized GANs of Mescheder et al. 2018 and StyleGAN2 have no batch norm in the discriminator either).
* ``extra_layers = k`` (the reference DCGAN code's ``n_extra_layers``) adds depth without changing the
  resolutions, which small images need (at 8x8, U = 1 leaves each network one hidden layer): k 3x3 stride-1 convs
  -> batch norm -> ReLU at the generator's last hidden resolution (before the output layer), and k 3x3 stride-1
  convs -> bias + LeakyReLU at the discriminator's first (after its first conv).

Activations keep the paper's scale (``gain=1``), not StyleGAN2's sqrt(2) default gain. The layers are subclasses
of the torch layers they replace (same parameters, same ``state_dict`` keys), so the weights load into a plain
``nn.Conv2d`` / ``nn.BatchNorm2d`` model and back.

Losses (``D`` returns logits): non-saturating (Goodfellow et al. 2014)
``L_D = softplus(-D(x)) + softplus(D(G(z)))``, ``L_G = softplus(-D(G(z)))``; hinge (Lim & Ye 2017, Miyato et al.
2018) ``L_D = relu(1 - D(x)) + relu(1 + D(G(z)))``, ``L_G = -D(G(z))``; each averaged over the batch. R1
(Mescheder et al. 2018) ``gamma / 2 * E_x ||grad_x D(x)||^2`` on real images, differentiated with
``create_graph=True`` (it needs :func:`bias_act`'s second-order gradients).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from genkernels.kernels.checks import (
    check_bool,
    check_choice,
    check_float_tensor,
    check_int,
    check_real,
    check_tensor,
    describe,
)

from .layers import BatchNormAct2d, Conv2dBiasAct, ConvTranspose2dBiasAct

LOSSES = ("non_saturating", "hinge")
TRUNCATION_MODES = ("resample", "clamp")


# ----------------------------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------------------------
def _upsamplings(image_size: int) -> int:
    """U with ``image_size = 4 * 2**U`` (U >= 1); ``ValueError`` for other sizes."""
    size = check_int(image_size, "image_size")
    if size < 8 or size & (size - 1):
        raise ValueError(f"image_size={size} is not supported; expected a power of two >= 8 (the paper's 32 or 64)")
    return int(math.log2(size)) - 2


class DCGANGenerator(nn.Module):
    """``z [N, latent_dim]`` -> images ``[N, channels, image_size, image_size]`` in [-1, 1] (see the module doc)."""

    def __init__(self, latent_dim: int = 100, channels: int = 3, image_size: int = 64, base_channels: int = 64,
                 extra_layers: int = 0):
        super().__init__()
        for name, value in (("latent_dim", latent_dim), ("channels", channels), ("base_channels", base_channels)):
            check_int(value, name, low=1)
        check_int(extra_layers, "extra_layers", low=0)
        upsamplings = _upsamplings(image_size)
        self.latent_dim, self.channels, self.image_size = latent_dim, channels, image_size
        widths = [base_channels * 2 ** (upsamplings - 1 - i) for i in range(upsamplings)]
        layers: list[nn.Module] = [nn.ConvTranspose2d(latent_dim, widths[0], 4, 1, 0, bias=False),
                                   BatchNormAct2d(widths[0], act="relu", gain=1.0)]
        for wide, narrow in zip(widths[:-1], widths[1:]):
            layers += [nn.ConvTranspose2d(wide, narrow, 4, 2, 1, bias=False),
                       BatchNormAct2d(narrow, act="relu", gain=1.0)]
        for _ in range(extra_layers):
            layers += [nn.Conv2d(widths[-1], widths[-1], 3, 1, 1, bias=False),
                       BatchNormAct2d(widths[-1], act="relu", gain=1.0)]
        layers.append(ConvTranspose2dBiasAct(widths[-1], channels, 4, 2, 1, act="tanh"))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        check_latents(z, self.latent_dim)
        return self.net(z[:, :, None, None])


class DCGANDiscriminator(nn.Module):
    """Images ``[N, channels, image_size, image_size]`` -> logits ``[N]`` (see the module doc)."""

    def __init__(self, channels: int = 3, image_size: int = 64, base_channels: int = 64, alpha: float = 0.2,
                 extra_layers: int = 0):
        super().__init__()
        for name, value in (("channels", channels), ("base_channels", base_channels)):
            check_int(value, name, low=1)
        check_int(extra_layers, "extra_layers", low=0)
        alpha = check_real(alpha, "alpha")
        downsamplings = _upsamplings(image_size)
        self.channels, self.image_size = channels, image_size
        widths = [base_channels * 2 ** i for i in range(downsamplings)]
        layers: list[nn.Module] = [Conv2dBiasAct(channels, widths[0], 4, 2, 1, act="lrelu", alpha=alpha, gain=1.0)]
        layers += [Conv2dBiasAct(widths[0], widths[0], 3, 1, 1, act="lrelu", alpha=alpha, gain=1.0)
                   for _ in range(extra_layers)]
        for narrow, wide in zip(widths[:-1], widths[1:]):
            layers.append(Conv2dBiasAct(narrow, wide, 4, 2, 1, act="lrelu", alpha=alpha, gain=1.0))
        layers.append(Conv2dBiasAct(widths[-1], 1, 4, 1, 0))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, "x", self.channels, self.image_size)
        return self.net(x).reshape(x.shape[0])


def check_latents(z: object, latent_dim: int) -> torch.Tensor:
    """Require a ``[batch, latent_dim]`` tensor named ``z``."""
    z = check_tensor(z, "z")
    if z.dim() != 2 or z.shape[1] != latent_dim:
        raise ValueError(f"z must have shape [batch, latent_dim={latent_dim}]; got {describe(z)}")
    return z


def check_images(x: object, name: str, channels: int, image_size: int) -> torch.Tensor:
    """Require a floating-point ``[batch, channels, image_size, image_size]`` tensor."""
    x = check_tensor(x, name)
    if x.dim() != 4 or tuple(x.shape[1:]) != (channels, image_size, image_size):
        raise ValueError(
            f"{name} must have shape [batch, {channels}, {image_size}, {image_size}]; got {describe(x)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got {describe(x)}")
    return x


# ----------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------
def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, loss: str = "non_saturating"):
    """Batch mean of ``softplus(-D(x)) + softplus(D(G(z)))`` (non-saturating) or
    ``relu(1 - D(x)) + relu(1 + D(G(z)))`` (hinge), in fp32 whatever the logits' dtype."""
    check_float_tensor(real_logits, "real_logits")
    check_float_tensor(fake_logits, "fake_logits")
    check_choice(loss, "loss", LOSSES)
    real_logits, fake_logits = real_logits.float(), fake_logits.float()
    if loss == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_loss(fake_logits: torch.Tensor, loss: str = "non_saturating") -> torch.Tensor:
    """Batch mean of ``softplus(-D(G(z)))`` (non-saturating) or ``-D(G(z))`` (hinge), in fp32."""
    check_float_tensor(fake_logits, "fake_logits")
    check_choice(loss, "loss", LOSSES)
    fake_logits = fake_logits.float()
    if loss == "hinge":
        return -fake_logits.mean()
    return F.softplus(-fake_logits).mean()


def r1_penalty(discriminator: nn.Module, real: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """R1 (Mescheder et al. 2018, eq. 9): ``gamma / 2 * E_x ||grad_x D(x)||^2`` over real images.

    Returns ``(penalty, real_logits)``: the logits of the same forward pass, so a discriminator step that also needs
    ``D(real)`` runs it once. The input gradient is taken with ``create_graph=True``, so ``penalty.backward()``
    differentiates through it (second-order gradients of every layer). ``gamma`` is a finite number >= 0.
    """
    if not callable(discriminator):
        raise TypeError(f"discriminator must be a module (or callable) mapping images to logits; got "
                        f"{type(discriminator).__name__}")
    check_float_tensor(real, "real")
    gamma = check_real(gamma, "gamma", low=0.0)
    real = real.detach().requires_grad_(True)
    logits = discriminator(real)
    (grad,) = torch.autograd.grad(logits.sum(), real, create_graph=True)
    penalty = 0.5 * gamma * grad.float().square().reshape(grad.shape[0], -1).sum(dim=1).mean()
    return penalty, logits


def truncated_normal(shape, threshold: float, generator: Optional[torch.Generator] = None,
                     device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normal samples conditioned on ``|z| <= threshold`` (the distribution that redrawing every entry
    beyond the threshold until it falls inside converges to), drawn exactly in one pass by inverse-CDF sampling:
    ``z = sqrt(2) * erfinv(erf(threshold / sqrt(2)) * (2u - 1))`` with ``u ~ U(0, 1)``, computed in float64."""
    threshold = check_real(threshold, "threshold", low=0.0, low_inclusive=False)
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
    inside = math.erf(threshold / math.sqrt(2.0))
    z = math.sqrt(2.0) * torch.erfinv(inside * (2 * u - 1))
    return z.clamp(-threshold, threshold).to(dtype)


@dataclasses.dataclass
class GANLosses:
    """The losses of one :meth:`DCGAN.train_step` (detached). ``r1`` is the penalty as added to the discriminator
    loss (times ``r1_every`` under lazy regularization), None on steps without it."""

    d_loss: torch.Tensor
    g_loss: torch.Tensor
    r1: Optional[torch.Tensor]
    real_logits_mean: torch.Tensor
    fake_logits_mean: torch.Tensor


class DCGAN(nn.Module):
    """Generator + discriminator + losses + training step (see the module doc for the architecture).

    Args:
        latent_dim, channels, image_size: ``z`` size, image channels, and image side (32 or 64; any power of two
            >= 8 works).
        base_channels: width of the generator's last hidden layer and the discriminator's first (the paper's 64).
        extra_layers: 3x3 stride-1 layers added to each network (see the module doc; 0 is the paper's).
        loss: ``"non_saturating"`` or ``"hinge"``.
        r1_gamma: R1 weight gamma (0 turns it off).
        r1_every: apply R1 on every ``r1_every``-th discriminator step (1 = every step).
        lazy_r1: when R1 skips steps, scale it by ``r1_every`` so its average strength matches ``r1_every=1``
            (StyleGAN2's lazy regularization).
    """

    def __init__(self, latent_dim: int = 100, channels: int = 3, image_size: int = 64, base_channels: int = 64,
                 loss: str = "non_saturating", r1_gamma: float = 0.0, r1_every: int = 1, lazy_r1: bool = True,
                 extra_layers: int = 0):
        super().__init__()
        for name, value in (("latent_dim", latent_dim), ("channels", channels), ("base_channels", base_channels),
                            ("r1_every", r1_every)):
            check_int(value, name, low=1)
        self.loss_type = check_choice(loss, "loss", LOSSES)
        self.r1_gamma = check_real(r1_gamma, "r1_gamma", low=0.0)
        self.r1_every = r1_every
        self.lazy_r1 = check_bool(lazy_r1, "lazy_r1")
        self.generator = DCGANGenerator(latent_dim, channels, image_size, base_channels, extra_layers)
        self.discriminator = DCGANDiscriminator(channels, image_size, base_channels, extra_layers=extra_layers)
        self.latent_dim, self.channels, self.image_size = latent_dim, channels, image_size
        self.steps = 0  # discriminator updates so far (a Python int: no device sync to schedule R1)
        self.apply(_dcgan_init)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``G(z)``."""
        return self.generator(z)

    def latents(self, n: int, generator: Optional[torch.Generator] = None,
                truncation: Optional[float] = None, truncation_mode: str = "resample") -> torch.Tensor:
        """``[n, latent_dim]`` latents from N(0, I); with ``truncation`` every entry lies in ``[-t, t]``."""
        n = check_int(n, "n", low=0)
        check_choice(truncation_mode, "truncation_mode", TRUNCATION_MODES)
        device = next(self.generator.parameters()).device
        shape = (n, self.latent_dim)
        if truncation is None:
            return torch.randn(shape, generator=generator, device=device)
        threshold = check_real(truncation, "truncation", low=0.0, low_inclusive=False)
        if truncation_mode == "resample":
            return truncated_normal(shape, threshold, generator, device)
        return torch.randn(shape, generator=generator, device=device).clamp(-threshold, threshold)

    @torch.no_grad()
    def sample(self, n: int, truncation: Optional[float] = 1.0, generator: Optional[torch.Generator] = None,
               truncation_mode: str = "resample") -> torch.Tensor:
        """``n`` images ``G(z)`` with the truncation trick (Brock et al. 2019, sec. 3.1).

        ``truncation`` is the threshold t on every latent entry: with ``truncation_mode="resample"`` entries are
        drawn from the standard normal truncated to ``[-t, t]`` (as if redrawn until inside; see
        :func:`truncated_normal`), with ``"clamp"`` they are clamped to it. ``truncation=None`` samples plain
        N(0, I). Smaller t trades variety for fidelity. Runs in the module's current train/eval mode (call
        ``.eval()`` first to use batch norm's running statistics).
        """
        return self.generator(self.latents(n, generator, truncation, truncation_mode))

    def r1_penalty(self, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`r1_penalty` of this discriminator with ``self.r1_gamma``: ``(penalty, real_logits)``."""
        check_images(real, "real", self.channels, self.image_size)
        return r1_penalty(self.discriminator, real, self.r1_gamma)

    def train_step(self, real: torch.Tensor, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer,
                   generator: Optional[torch.Generator] = None) -> GANLosses:
        """One discriminator update, then one generator update, on a batch of ``real`` images in [-1, 1].

        Discriminator: ``L_D`` on ``real`` and ``G(z).detach()``, plus R1 on this step when ``r1_gamma > 0`` and the
        step count is a multiple of ``r1_every`` (times ``r1_every`` if ``lazy_r1``). Generator: ``L_G`` on a fresh
        ``G(z)`` with the discriminator's parameters frozen. Latents come from ``generator`` when given.
        """
        check_images(real, "real", self.channels, self.image_size)
        batch = real.shape[0]
        if batch == 0:
            raise ValueError(f"real must hold at least one image; got {describe(real)}")
        with_r1 = self.r1_gamma > 0 and self.steps % self.r1_every == 0
        self.steps += 1

        with torch.no_grad():
            fake = self.generator(self.latents(batch, generator))
        if with_r1:
            r1, real_logits = self.r1_penalty(real)
            if self.lazy_r1:
                r1 = r1 * self.r1_every
        else:
            r1, real_logits = None, self.discriminator(real)
        fake_logits = self.discriminator(fake)
        d_loss = discriminator_loss(real_logits, fake_logits, self.loss_type)
        opt_d.zero_grad(set_to_none=True)
        (d_loss if r1 is None else d_loss + r1).backward()
        opt_d.step()

        self.discriminator.requires_grad_(False)
        try:
            g_loss = generator_loss(self.discriminator(self.generator(self.latents(batch, generator))),
                                    self.loss_type)
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_g.step()
        finally:
            self.discriminator.requires_grad_(True)
        return GANLosses(d_loss.detach(), g_loss.detach(), None if r1 is None else r1.detach(),
                         real_logits.detach().mean(), fake_logits.detach().mean())


def _dcgan_init(module: nn.Module) -> None:
    """The paper's initialization: conv weights ~ N(0, 0.02), batch-norm scale ~ N(1, 0.02), biases 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
