"""Convolutional variational autoencoder (Kingma & Welling 2014) on the fused ops.

The posterior sample and its KL term come from one :func:`reparameterize_kl` call; every hidden layer's bias and
activation is one :func:`bias_act` call (layers from :mod:`genkernels.models.dcgan`, torch-compatible weights).

Architecture, for ``channels``-channel images of side ``image_size`` (1 or 3 channels, 28x28 to 64x64):

* Encoder: ``L`` convs 4x4 stride 2 padding 1, each halving the map, with bias + LeakyReLU(0.2); flatten; a linear
  layer to ``2 * latent_dim`` numbers, split into the posterior mean ``mu`` and log-variance ``logvar``.
* Decoder: linear ``latent_dim -> hidden[-1] * s * s`` + bias + ReLU, reshape to ``s x s``, then ``L`` transposed
  convs 4x4 stride 2 (each doubling the map; ReLU after all but the last), ending in the likelihood's parameter
  maps: ``channels`` maps of Bernoulli logits or of the Gaussian mean, or ``2 * channels`` maps (the means, then
  the log-scales) of the discretized logistic.
* ``L`` and the widths: by default the map is halved while its side is even and at least 8, so 28 -> 7 (L=2),
  32 -> 4 (L=3), 64 -> 4 (L=4), with widths 32, 64, 128, 256. Given ``hidden_channels``, ``L`` is its length and
  ``image_size`` must be divisible by ``2**L``.

Loss (per image, then averaged over the batch): the negative ELBO
``-log p(x | z) + beta * KL(q(z | x) || N(0, I))`` with one posterior sample ``z = mu + exp(logvar / 2) * eps`` and
``KL = -1/2 * sum(1 + logvar - mu^2 - exp(logvar))`` (Kingma & Welling 2014, appendix B; beta-VAE of Higgins et al.
2017 for ``beta != 1``). Likelihoods, summed over pixels:

* ``"bernoulli"``: ``-log p(x | z) = BCE(logits, x)`` for targets in [0, 1] (binary or grey levels).
* ``"gaussian"``: ``-log p(x | z) = (x - mean)^2 / (2 sigma^2) + log(sigma) + log(2 pi) / 2`` with
  ``variance="fixed"`` (``sigma`` given) or ``"learned"`` (one log-sigma per channel, a parameter trained with the
  rest, initialized at ``log(sigma)``: the calibrated decoder of Rybkin et al. 2021).
* ``"discretized_logistic"``: a discrete likelihood over ``levels`` grey levels, for images on the grid
  ``x = k / (levels - 1)``, ``k = 0 .. levels-1`` (Kingma et al. 2016; Salimans et al. 2017 with one component):
  a logistic of per-pixel mean ``m`` and log-scale ``log s`` (both decoder outputs) integrated over the pixel's
  bin, ``P(x) = F(x + h) - F(x - h)`` with ``F(t) = sigmoid((t - m) / s)`` and ``h = 1 / (2 (levels - 1))``; the
  first bin extends to ``-inf`` and the last to ``+inf``, so ``P`` sums to 1 over the levels. ``-log p(x | z)``
  is then a number of nats of the discrete image, and the ELBO bounds the discrete log-likelihood: no
  dequantization. See :func:`discretized_logistic_nll`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from genkernels.kernels.checks import (
    check_choice,
    check_in_range,
    check_int,
    check_real,
    check_tensor,
    check_values,
    describe,
)
from genkernels.kernels.reparameterize import reparameterize_kl

from .dcgan import check_images, check_latents
from .layers import Conv2dBiasAct, ConvTranspose2dBiasAct, LinearBiasAct

LIKELIHOODS = ("bernoulli", "gaussian", "discretized_logistic")
VARIANCES = ("fixed", "learned")
DEFAULT_WIDTHS = (32, 64, 128, 256)
MIN_LOG_SCALE = -7.0  # the discretized logistic's log-scales are clamped here (s >= 9e-4: a bin of 256 levels)
GRID_TOLERANCE = 1e-4  # how far (in levels) a discretized-logistic target may sit from the grid k / (levels - 1)


def discretized_logistic_nll(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor,
                             levels: int) -> torch.Tensor:
    """``-log P(x)`` elementwise (fp32) for the discretized logistic of the module doc: ``x`` on the grid
    ``k / (levels - 1)``, ``mean`` and ``log_scale`` of ``x``'s shape (``log_scale`` clamped below at
    :data:`MIN_LOG_SCALE`).

    With ``a = (x + h - m) / s``, ``b = (x - h - m) / s`` and the bin's width ``w = a - b = 2h / s``: the first
    level gets ``-log sigmoid(a)``, the last ``-log sigmoid(-b)``, the others ``-log(sigmoid(a) - sigmoid(b))``,
    written without a difference of nearly equal numbers through the identity
    ``sigmoid(a) - sigmoid(b) = sigmoid(a) * sigmoid(-b) * (1 - exp(-w))``: ``log sigmoid(a) + log sigmoid(-b) +
    log(-expm1(-w))``, each term accurate in fp32 however far the bin lies in a tail and however narrow it is
    against the scale."""
    levels = check_int(levels, "levels", low=2)
    for name, tensor in (("x", x), ("mean", mean), ("log_scale", log_scale)):
        if not check_tensor(tensor, name).dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor; got {describe(tensor)}")
    for name, tensor in (("mean", mean), ("log_scale", log_scale)):
        if tensor.shape != x.shape:
            raise ValueError(f"{name} must have the shape of x {list(x.shape)}; got {describe(tensor)}")
    x, mean = x.float(), mean.float()
    log_scale = log_scale.float().clamp(min=MIN_LOG_SCALE)
    half_bin = 0.5 / (levels - 1)
    inverse_scale = torch.exp(-log_scale)
    centred = x - mean
    log_below_upper = F.logsigmoid((centred + half_bin) * inverse_scale)  # log F(x + h)
    log_above_lower = F.logsigmoid(-(centred - half_bin) * inverse_scale)  # log (1 - F(x - h))
    width = (2 * half_bin) * inverse_scale
    log_interior = log_below_upper + log_above_lower + torch.log(-torch.expm1(-width))
    first, last = x < half_bin, x > 1 - half_bin
    log_mass = torch.where(first, log_below_upper, torch.where(last, log_above_lower, log_interior))
    return -log_mass


@dataclasses.dataclass
class VAELoss:
    """Batch means: ``loss = reconstruction + beta * kl`` (the negative ELBO when ``beta == 1``)."""

    loss: torch.Tensor
    reconstruction: torch.Tensor  # -log p(x | z), summed over pixels
    kl: torch.Tensor  # KL(q(z | x) || N(0, I)), summed over latent dimensions

    @property
    def elbo(self) -> torch.Tensor:
        """The evidence lower bound ``-(reconstruction + kl)`` (whatever ``beta``)."""
        return -(self.reconstruction + self.kl)


def default_hidden_channels(image_size: int) -> tuple[int, ...]:
    """Encoder widths for ``image_size``: halve while the side is even and >= 8 (see the module doc)."""
    widths, side = [], image_size
    while side % 2 == 0 and side >= 8 and len(widths) < len(DEFAULT_WIDTHS):
        widths.append(DEFAULT_WIDTHS[len(widths)])
        side //= 2
    return tuple(widths)


class VAE(nn.Module):
    """Convolutional VAE with a Gaussian posterior (see the module doc for the architecture and the loss).

    Args:
        channels: image channels (1 or 3 typically).
        image_size: image side (square images).
        latent_dim: size of z.
        hidden_channels: encoder widths (decoder mirrors them); default from :func:`default_hidden_channels`.
        likelihood: ``"bernoulli"`` (decoder outputs logits), ``"gaussian"`` (decoder outputs the mean) or
            ``"discretized_logistic"`` (decoder outputs the means and log-scales of ``levels`` grey levels).
        beta: weight of the KL term.
        variance: Gaussian likelihood only: ``"fixed"`` or ``"learned"``.
        sigma: Gaussian likelihood only: the fixed standard deviation, or the learned one's initial value.
        levels: discretized logistic only: the grey levels ``L >= 2`` of the images, read as ``k / (L - 1)``.
    """

    def __init__(self, channels: int = 1, image_size: int = 28, latent_dim: int = 16,
                 hidden_channels: Optional[Sequence[int]] = None, likelihood: str = "bernoulli", beta: float = 1.0,
                 variance: str = "fixed", sigma: float = 1.0, levels: int = 256):
        super().__init__()
        for name, value in (("channels", channels), ("image_size", image_size), ("latent_dim", latent_dim)):
            check_int(value, name, low=1)
        self.channels, self.image_size, self.latent_dim = channels, image_size, latent_dim
        self.likelihood = check_choice(likelihood, "likelihood", LIKELIHOODS)
        self.variance = check_choice(variance, "variance", VARIANCES)
        self.beta = check_real(beta, "beta", low=0.0)
        sigma = check_real(sigma, "sigma", low=0.0, low_inclusive=False)
        self.levels = check_int(levels, "levels", low=2)
        widths = self._widths(hidden_channels)
        side = image_size // 2 ** len(widths)
        self.map_shape = (widths[-1], side, side)  # the encoder's last feature map

        encoder: list[nn.Module] = []
        for narrow, wide in zip((channels,) + widths[:-1], widths):
            encoder.append(Conv2dBiasAct(narrow, wide, 4, 2, 1, act="lrelu", alpha=0.2, gain=1.0))
        self.encoder = nn.Sequential(*encoder, nn.Flatten())
        self.to_posterior = nn.Linear(widths[-1] * side * side, 2 * latent_dim)

        self.from_latent = LinearBiasAct(latent_dim, widths[-1] * side * side, act="relu", gain=1.0)
        decoder: list[nn.Module] = []
        for wide, narrow in zip(widths[::-1][:-1], widths[::-1][1:]):
            decoder.append(ConvTranspose2dBiasAct(wide, narrow, 4, 2, 1, act="relu", gain=1.0))
        maps = 2 * channels if self.likelihood == "discretized_logistic" else channels
        decoder.append(ConvTranspose2dBiasAct(widths[0], maps, 4, 2, 1))
        self.decoder = nn.Sequential(*decoder)

        log_sigma = torch.full((channels,), math.log(sigma))
        if self.likelihood == "gaussian" and self.variance == "learned":
            self.log_sigma = nn.Parameter(log_sigma)
        else:
            self.register_buffer("log_sigma", log_sigma)

    def _widths(self, hidden_channels: Optional[Sequence[int]]) -> tuple[int, ...]:
        if hidden_channels is None:
            widths = default_hidden_channels(self.image_size)
            if not widths:
                raise ValueError(f"image_size={self.image_size} cannot be halved (it must be even and >= 8); "
                                 "pass hidden_channels to choose the depth")
            return widths
        if isinstance(hidden_channels, (str, bytes, torch.Tensor)) or not isinstance(hidden_channels, Sequence):
            raise TypeError(f"hidden_channels must be a sequence of ints (the encoder widths); got "
                            f"{type(hidden_channels).__name__} {hidden_channels!r}")
        widths = tuple(hidden_channels)
        if not widths:
            raise ValueError(f"hidden_channels={hidden_channels!r} must be a non-empty sequence of positive ints")
        for i, width in enumerate(widths):
            check_int(width, f"hidden_channels[{i}]", low=1)
        if self.image_size % 2 ** len(widths):
            raise ValueError(f"image_size={self.image_size} must be divisible by 2**len(hidden_channels) = "
                             f"{2 ** len(widths)}")
        return widths

    # ------------------------------------------------------------------------------------------------------------
    def _check_images(self, x: object, name: str = "x") -> torch.Tensor:
        return check_images(x, name, self.channels, self.image_size)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior q(z | x) = N(mu, exp(logvar)): ``(mu, logvar)``, each ``[batch, latent_dim]``."""
        self._check_images(x)
        mu, logvar = self.to_posterior(self.encoder(x)).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The likelihood's parameter for latents ``z [batch, latent_dim]``: Bernoulli logits or the Gaussian
        mean, ``[batch, channels, image_size, image_size]``; for the discretized logistic the means then the
        log-scales, ``[batch, 2 * channels, image_size, image_size]``."""
        check_latents(z, self.latent_dim)
        hidden = self.from_latent(z).reshape((z.shape[0],) + self.map_shape)
        return self.decoder(hidden)

    def mean_image(self, params: torch.Tensor) -> torch.Tensor:
        """The likelihood's mean from its parameter: ``sigmoid(logits)`` (Bernoulli), the mean itself (Gaussian),
        or the discretized logistic's expectation ``E[x] = 1/(L-1) * sum_{k=1}^{L-1} P(x >= k/(L-1))
        = 1/(L-1) * sum_k sigmoid((m - (k - 1/2)/(L-1)) / s)`` (in [0, 1])."""
        if self.likelihood == "bernoulli":
            return torch.sigmoid(params)
        if self.likelihood == "gaussian":
            return params
        mean, log_scale = params.float().chunk(2, dim=1)
        inverse_scale = torch.exp(-log_scale.clamp(min=MIN_LOG_SCALE))
        expectation = torch.zeros_like(mean)
        for k in range(1, self.levels):  # one map at a time: [..., levels] at once would not fit for 256 levels
            expectation += torch.sigmoid((mean - (k - 0.5) / (self.levels - 1)) * inverse_scale)
        return expectation / (self.levels - 1)

    def _posterior_sample(self, x, noise, generator):
        mu, logvar = self.encode(x)
        z, kl = reparameterize_kl(mu, logvar, noise=noise, generator=generator)
        return z, kl, mu, logvar

    def forward(self, x: torch.Tensor, noise: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(recon, mu, logvar)``: ``recon`` is the likelihood's parameter (logits or mean, see :meth:`decode`)
        at one posterior sample ``z = mu + exp(logvar / 2) * noise`` (``noise`` drawn when not given)."""
        z, _, mu, logvar = self._posterior_sample(x, noise, generator)
        return self.decode(z), mu, logvar

    def _check_targets(self, x: torch.Tensor, name: str = "x") -> None:
        """Bernoulli targets are probabilities: every value in [0, 1]; discretized-logistic targets lie on the grid
        ``k / (levels - 1)`` (within :data:`GRID_TOLERANCE` of a level). A host ``ValueError`` for CPU tensors, an
        asynchronous device assert on a GPU."""
        if self.likelihood == "bernoulli":
            check_in_range(x, name, 0.0, 1.0, high_inclusive=True)
        elif self.likelihood == "discretized_logistic":
            scaled = x.float() * (self.levels - 1)
            on_grid = ((scaled - scaled.round()).abs() <= GRID_TOLERANCE) & (scaled > -0.5) & (
                scaled < self.levels - 0.5)
            check_values(x, name, on_grid, f"lie on the grid k / {self.levels - 1} for k = 0 .. {self.levels - 1} "
                                           f"(the discretized logistic's levels)")

    def reconstruction_nll(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``-log p(x | z)`` per image ``[batch]`` for the decoder's output ``params`` (see the module doc), in fp32
        whatever the decoder's dtype (e.g. under autocast). Bernoulli targets ``x`` must lie in [0, 1]."""
        params = check_tensor(params, "params")
        self._check_images(x)
        expected = list(x.shape)
        if self.likelihood == "discretized_logistic":
            expected[1] *= 2  # the means, then the log-scales
        if list(params.shape) != expected:
            raise ValueError(f"params must have shape {expected} (the decoder's output for x {list(x.shape)}); got "
                             f"{describe(params)}")
        self._check_targets(x)
        return self._nll(params, x)

    def _nll(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        params, x = params.float(), x.float()
        if self.likelihood == "bernoulli":
            nll = F.binary_cross_entropy_with_logits(params, x, reduction="none")
        elif self.likelihood == "discretized_logistic":
            mean, log_scale = params.chunk(2, dim=1)
            nll = discretized_logistic_nll(x, mean, log_scale, self.levels)
        else:
            log_sigma = self.log_sigma.reshape(1, -1, 1, 1)
            nll = 0.5 * (x - params).square() * torch.exp(-2 * log_sigma) + log_sigma + 0.5 * math.log(2 * math.pi)
        return nll.reshape(x.shape[0], -1).sum(dim=1)

    def loss(self, x: torch.Tensor, noise: Optional[torch.Tensor] = None,
             generator: Optional[torch.Generator] = None) -> VAELoss:
        """The beta-weighted negative ELBO of the batch ``x`` and its two terms (batch means), with one posterior
        sample per image (``noise`` = its standard-normal draw, drawn when not given). With the Bernoulli likelihood
        the pixels of ``x`` must lie in [0, 1], with the discretized logistic on its grid (``ValueError`` for CPU
        tensors, a device assert on a GPU)."""
        if self._check_images(x).shape[0] == 0:
            raise ValueError(f"x must hold at least one image to average a loss over; got {describe(x)}")
        self._check_targets(x)
        z, kl, _, _ = self._posterior_sample(x, noise, generator)
        reconstruction = self._nll(self.decode(z), x).mean()
        kl = kl.float().mean()
        return VAELoss(reconstruction + self.beta * kl, reconstruction, kl)

    @torch.no_grad()
    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``n`` images: the likelihood's mean at ``z ~ N(0, I)``."""
        n = check_int(n, "n", low=0)
        device = self.to_posterior.weight.device
        z = torch.randn(n, self.latent_dim, generator=generator, device=device)
        return self.mean_image(self.decode(z))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction: the likelihood's mean decoded from the posterior mean ``mu``."""
        mu, _ = self.encode(x)
        return self.mean_image(self.decode(mu))

    @torch.no_grad()
    def interpolate(self, x_a: torch.Tensor, x_b: torch.Tensor, steps: int = 8) -> torch.Tensor:
        """Images along the straight line between the posterior means of ``x_a`` and ``x_b``:
        ``decode((1 - t) * mu_a + t * mu_b)`` for ``t = 0, 1/(steps-1), ..., 1``.

        ``x_a``, ``x_b``: one image ``[C, H, W]`` each, or equal batches ``[N, C, H, W]``. Returns
        ``[steps, C, H, W]`` or ``[steps, N, C, H, W]``; the first and last entries are the endpoints'
        reconstructions (:meth:`reconstruct`).
        """
        x_a, x_b = check_tensor(x_a, "x_a"), check_tensor(x_b, "x_b")
        if x_a.shape != x_b.shape:
            raise ValueError(f"x_b must have the shape of x_a {list(x_a.shape)}; got {describe(x_b)}")
        steps = check_int(steps, "steps", low=2)  # the two endpoints at least
        single = x_a.dim() == 3
        batch_a, batch_b = (x_a[None], x_b[None]) if single else (x_a, x_b)
        mu_a, _ = self.encode(self._check_images(batch_a, "x_a"))
        mu_b, _ = self.encode(self._check_images(batch_b, "x_b"))
        t = torch.linspace(0, 1, steps, device=mu_a.device, dtype=mu_a.dtype).reshape(steps, 1, 1)
        path = torch.lerp(mu_a[None], mu_b[None], t)  # [steps, N, latent]
        images = self.mean_image(self.decode(path.reshape(-1, self.latent_dim)))
        images = images.reshape((steps, mu_a.shape[0]) + tuple(images.shape[1:]))
        return images[:, 0] if single else images
