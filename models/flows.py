"""Normalizing-flow layers and the multi-scale flow both RealNVP and Glow are built from.

Every layer is a bijection on ``[batch, channels, height, width]`` tensors with a tractable log-determinant:

    forward(x) -> (y, logdet)   with logdet[b] = log |det dy_b / dx_b|   (fp32, fp64 for fp64 inputs)
    inverse(y) -> x

so a stack of layers gives ``log p(x) = log N(z; 0, I) + sum of the layers' logdets`` (Dinh et al. 2017, eq. 3).
Layers and models take floating-point tensors only (a ``TypeError`` otherwise): 8-bit images are turned into the
model's continuous space by :meth:`MultiScaleFlow.dequantize` (or scored directly by
:meth:`MultiScaleFlow.bits_per_dim`), which take integer pixel values in [0, 255].
The multi-scale :class:`Split` factors half of the channels out as latents and standardizes them under a learned
Gaussian prior conditioned on the other half (Glow's "split" with a learned prior), which is itself an affine
bijection, so every latent of a :class:`MultiScaleFlow` is standard normal. The affine coupling transforms and
their log-determinants run through :func:`genkernels.kernels.coupling.affine_coupling` (fused Triton kernel or
PyTorch reference, chosen by ``genkernels.kernels.use_impl``).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from genkernels.kernels.checks import (
    check_bool,
    check_choice,
    check_conditioning_labels,
    check_generator,
    check_int,
    check_real,
    check_tensor,
    check_values,
    describe,
)
from genkernels.kernels.coupling import SCALE_FNS, affine_coupling
from genkernels.kernels.runtime import compute_dtype

MASKS = ("channel", "checkerboard")
# 8-bit data: 256 levels per dimension.
NUM_BINS = 256


def _spatial_size(x: torch.Tensor) -> int:
    return math.prod(x.shape[2:])


def _check_image(x: object, name: str, channels: int, hint: str = "") -> torch.Tensor:
    """Require a floating-point ``[batch, channels, height, width]`` tensor (``hint`` is added to a dtype error)."""
    x = check_tensor(x, name)
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{name} must have shape [batch, {channels}, height, width]; got {describe(x)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (flows are bijections of real-valued images); "
                        f"got {describe(x)}{hint}")
    return x


def _check_same_batch_and_spatial(reference: torch.Tensor, reference_name: str, other: torch.Tensor,
                                  other_name: str, channels: int) -> None:
    expected = [reference.shape[0], channels] + list(reference.shape[2:])
    if list(other.shape) != expected:
        raise ValueError(f"{other_name} must have shape {expected} (the batch and spatial size of "
                         f"{reference_name}, {channels} channels); got {describe(other)}")


def check_image_shape(image_shape: object, name: str = "image_shape") -> tuple[int, int, int]:
    """Require ``(channels, height, width)``: a sequence of three positive ints."""
    if isinstance(image_shape, (str, bytes, torch.Tensor)) or not isinstance(image_shape, Sequence):
        raise TypeError(f"{name} must be a sequence (channels, height, width) of 3 ints; got "
                        f"{type(image_shape).__name__} {image_shape!r}")
    if len(image_shape) != 3:
        raise ValueError(f"{name} must be (channels, height, width), 3 ints; got {tuple(image_shape)!r} "
                         f"({len(image_shape)} entries)")
    for label, value in zip(("channels", "height", "width"), image_shape):
        check_int(value, f"{name} {label}", low=1)
    return tuple(image_shape)


# ----------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------
class ActNorm(nn.Module):
    """Per-channel affine normalization with data-dependent initialization (Glow, section 3.1).

        y = (x + loc) * exp(log_scale),    logdet = (height * width) * sum_c log_scale[c]

    The first forward pass in training mode sets ``loc = -mean`` and ``log_scale = -log(std)`` of that batch per
    channel, so the first batch comes out with zero mean and unit variance; the ``initialized`` buffer records it
    (and travels in the ``state_dict``).
    """

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.num_channels = check_int(num_channels, "num_channels", low=1)
        self.eps = check_real(eps, "eps", low=0.0, low_inclusive=False)
        self.loc = nn.Parameter(torch.zeros(num_channels))
        self.log_scale = nn.Parameter(torch.zeros(num_channels))
        self.register_buffer("initialized", torch.tensor(False))
        # Host copy of ``initialized`` once it is True: reading the buffer on every call would synchronize with
        # the device and break torch.compile graphs.
        self._known_initialized = False

    def _is_initialized(self) -> bool:
        if not self._known_initialized:
            self._known_initialized = bool(self.initialized)
        return self._known_initialized

    def _load_from_state_dict(self, *args, **kwargs):
        self._known_initialized = False
        super()._load_from_state_dict(*args, **kwargs)

    def _view(self, param: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return param.view((1, -1) + (1,) * (x.dim() - 2))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set ``loc`` and ``log_scale`` from the per-channel statistics of the batch ``x``."""
        _check_image(x, "x", self.num_channels)
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dim=dims)
        std = x.std(dim=dims, unbiased=False)
        self.loc.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + self.eps))
        self.initialized.fill_(True)
        self._known_initialized = True

    def forward(self, x: torch.Tensor):
        _check_image(x, "x", self.num_channels)
        if self.training and not self._is_initialized():
            self.initialize(x)
        y = (x + self._view(self.loc, x)) * torch.exp(self._view(self.log_scale, x))
        logdet = (_spatial_size(x) * self.log_scale.sum()).to(compute_dtype(x.dtype)).expand(x.shape[0])
        return y, logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        _check_image(y, "y", self.num_channels)
        return y * torch.exp(-self._view(self.log_scale, y)) - self._view(self.loc, y)


class InvConv1x1(nn.Module):
    """Invertible 1x1 convolution with an LU-decomposed weight (Glow, section 3.2, eq. 10).

        W = P L (U + diag(sign_s * exp(log_s))),   y[:, :, h, w] = W x[:, :, h, w],
        logdet = (height * width) * sum(log_s)

    ``P`` (a permutation) and ``sign_s`` are fixed; ``L`` (unit lower-triangular), ``U`` (strictly upper) and
    ``log_s`` are learned. Initialized from a random rotation, so the layer starts volume-preserving.
    """

    def __init__(self, num_channels: int, generator: Optional[torch.Generator] = None):
        super().__init__()
        self.num_channels = check_int(num_channels, "num_channels", low=1)
        check_generator(generator, torch.device("cpu"), "the initial weight")
        rotation = torch.linalg.qr(torch.randn(num_channels, num_channels, generator=generator))[0]
        permutation, lower, upper = torch.linalg.lu(rotation)
        diagonal = torch.diagonal(upper)
        self.register_buffer("permutation", permutation)
        self.register_buffer("sign_s", torch.sign(diagonal))
        self.lower = nn.Parameter(torch.tril(lower, -1))
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(diagonal.abs()))

    def weight(self) -> torch.Tensor:
        """The ``[C, C]`` matrix ``W = P L U``."""
        eye = torch.eye(self.num_channels, dtype=self.lower.dtype, device=self.lower.device)
        lower = torch.tril(self.lower, -1) + eye
        upper = torch.triu(self.upper, 1) + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.permutation @ lower @ upper

    def forward(self, x: torch.Tensor):
        _check_image(x, "x", self.num_channels)
        y = F.conv2d(x, self.weight().view(self.num_channels, self.num_channels, 1, 1))
        logdet = (_spatial_size(x) * self.log_s.sum()).to(compute_dtype(x.dtype)).expand(x.shape[0])
        return y, logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        _check_image(y, "y", self.num_channels)
        weight_inverse = torch.linalg.inv(self.weight())
        return F.conv2d(y, weight_inverse.view(self.num_channels, self.num_channels, 1, 1))


class Squeeze(nn.Module):
    """Space-to-channel reshape ``[B, C, H, W] -> [B, 4C, H/2, W/2]`` (RealNVP, figure 3); a permutation, so
    ``logdet = 0``. Channel ``4c + 2i + j`` of the output holds pixel ``(2h + i, 2w + j)`` of channel ``c``."""

    def forward(self, x: torch.Tensor):
        x = check_tensor(x, "x")
        if x.dim() != 4 or x.shape[2] % 2 or x.shape[3] % 2:
            raise ValueError(f"Squeeze needs x of shape [batch, channels, height, width] with an even height and "
                             f"width; got {describe(x)}")
        _check_image(x, "x", x.shape[1])
        batch, channels, height, width = x.shape
        y = x.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 1, 3, 5, 2, 4)
        y = y.reshape(batch, channels * 4, height // 2, width // 2)
        return y, x.new_zeros(batch, dtype=compute_dtype(x.dtype))

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        y = check_tensor(y, "y")
        if y.dim() != 4 or y.shape[1] % 4:
            raise ValueError(f"Squeeze.inverse needs y of shape [batch, 4 * channels, height, width] (channels a "
                             f"multiple of 4); got {describe(y)}")
        _check_image(y, "y", y.shape[1])
        batch, channels, height, width = y.shape
        x = y.view(batch, channels // 4, 2, 2, height, width).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(batch, channels // 4, height * 2, width * 2)


class ZeroConv2d(nn.Conv2d):
    """A 3x3 convolution initialized to zero (Glow's last conditioner layer): a new coupling starts as the
    identity ("exp") or a constant scale ("sigmoid")."""

    def __init__(self, in_channels: int, out_channels: int):
        check_int(in_channels, "in_channels", low=1)
        check_int(out_channels, "out_channels", low=1)
        super().__init__(in_channels, out_channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)


def conditioner_network(in_channels: int, hidden_channels: int, out_channels: int) -> nn.Sequential:
    """Glow's coupling network: conv3x3 -> ReLU -> conv1x1 -> ReLU -> zero-initialized conv3x3."""
    for name, value in (("in_channels", in_channels), ("hidden_channels", hidden_channels),
                        ("out_channels", out_channels)):
        check_int(value, name, low=1)
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden_channels, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(hidden_channels, hidden_channels, kernel_size=1), nn.ReLU(),
        ZeroConv2d(hidden_channels, out_channels),
    )


def checkerboard_mask(height: int, width: int, parity: int, like: torch.Tensor) -> torch.Tensor:
    """``[1, 1, H, W]`` mask, 1 where ``(h + w + parity)`` is even: the pixels a checkerboard coupling keeps."""
    rows = torch.arange(height, device=like.device).view(-1, 1)
    cols = torch.arange(width, device=like.device).view(1, -1)
    return ((rows + cols + parity) % 2 == 0).to(like.dtype).view(1, 1, height, width)


class AffineCoupling(nn.Module):
    """Affine coupling layer (RealNVP eq. 7-9 with masks; Glow's affine coupling).

    The kept part ``x_a`` passes unchanged and conditions the transform of the other part ``x_b``:

        (raw_log_scale, shift) = NN(x_a),   y_b = x_b * s + shift,   logdet = sum log s

    ``mask="channel"`` keeps the first half of the channels (``parity=1``: the second half);
    ``mask="checkerboard"`` keeps the pixels where ``h + w + parity`` is even (the network sees the masked input and
    its outputs are masked to the other pixels, which then get ``s = 1`` and ``shift = 0``; needs "exp").
    ``scale_fn="exp"`` uses ``s = exp(scale * tanh(raw))`` with a learned per-channel ``scale`` (RealNVP's bounded
    log-scale); ``scale_fn="sigmoid"`` uses ``s = sigmoid(raw + 2)`` (Glow). ``conditioner`` overrides the default
    :func:`conditioner_network`; it maps the kept channels to ``2 * changed`` channels: the raw log-scales, then
    the shifts (channel halves, so each is one contiguous run per sample, the fused op's fastest layout).
    """

    def __init__(self, num_channels: int, hidden_channels: int = 64, *, mask: str = "channel", parity: int = 0,
                 scale_fn: str = "sigmoid", conditioner: Optional[nn.Module] = None):
        super().__init__()
        check_int(num_channels, "num_channels", low=1)
        check_int(hidden_channels, "hidden_channels", low=1)
        check_choice(mask, "mask", MASKS)
        check_choice(scale_fn, "scale_fn", SCALE_FNS)
        check_int(parity, "parity", low=0, high=1)
        if conditioner is not None and not isinstance(conditioner, nn.Module):
            raise TypeError(f"conditioner must be an nn.Module or None; got {type(conditioner).__name__}")
        if mask == "checkerboard" and scale_fn != "exp":
            raise ValueError("mask='checkerboard' needs scale_fn='exp' (masked pixels need log-scale 0 <=> s = 1)")
        if mask == "channel" and num_channels < 2:
            raise ValueError(f"a channel coupling needs at least 2 channels; got num_channels={num_channels}")
        self.num_channels, self.mask, self.parity, self.scale_fn = num_channels, mask, parity, scale_fn
        first = num_channels // 2
        if mask == "channel":
            kept, changed = (first, num_channels - first) if parity == 0 else (num_channels - first, first)
        else:
            kept, changed = num_channels, num_channels
        self.conditioner = conditioner if conditioner is not None else \
            conditioner_network(kept, hidden_channels, 2 * changed)
        self.changed_channels = changed
        self.log_scale_factor = nn.Parameter(torch.ones(changed, 1, 1)) if scale_fn == "exp" else None

    def _halves(self, x: torch.Tensor):
        first = self.num_channels // 2
        a, b = x[:, :first], x[:, first:]
        return (a, b) if self.parity == 0 else (b, a)

    def _join(self, kept: torch.Tensor, changed: torch.Tensor) -> torch.Tensor:
        return torch.cat([kept, changed] if self.parity == 0 else [changed, kept], dim=1)

    def _scale_and_shift(self, kept: torch.Tensor, keep: Optional[torch.Tensor]):
        out = self.conditioner(kept)
        expected = [kept.shape[0], 2 * self.changed_channels] + list(kept.shape[2:])
        if not isinstance(out, torch.Tensor) or list(out.shape) != expected:
            got = describe(out) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"conditioner must map the kept part {list(kept.shape)} to {expected} (raw log-scales, "
                             f"then shifts); got {got}")
        raw_log_scale, shift = out.chunk(2, dim=1)
        if self.log_scale_factor is not None:
            raw_log_scale = self.log_scale_factor * torch.tanh(raw_log_scale)
        if keep is not None:
            # kept pixels get log-scale 0 and shift 0, selected (never multiplied by 0: inf * 0 = NaN)
            raw_log_scale, shift = torch.where(keep, 0.0, raw_log_scale), torch.where(keep, 0.0, shift)
        return raw_log_scale, shift

    def _transform(self, x: torch.Tensor, reverse: bool):
        _check_image(x, "y" if reverse else "x", self.num_channels)
        if self.mask == "checkerboard":
            keep = checkerboard_mask(x.shape[2], x.shape[3], self.parity, x) != 0
            # the conditioner sees the kept pixels only (the changed ones are selected away, not multiplied by 0)
            log_scale, shift = self._scale_and_shift(torch.where(keep, x, 0.0), keep)
            return affine_coupling(x, log_scale, shift, scale_fn=self.scale_fn, reverse=reverse)
        kept, changed = self._halves(x)
        log_scale, shift = self._scale_and_shift(kept, None)
        changed, logdet = affine_coupling(changed, log_scale, shift, scale_fn=self.scale_fn, reverse=reverse)
        return self._join(kept, changed), logdet

    def forward(self, x: torch.Tensor):
        return self._transform(x, reverse=False)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self._transform(y, reverse=True)[0]


class Split(nn.Module):
    """Multi-scale factor-out (RealNVP section 3.6) with Glow's learned conditional prior.

    ``x = [h, z]`` along channels (``h``: the first ``C // 2``). With ``learned_prior`` a zero-initialized conv of
    ``h`` predicts ``(mean, log_std)`` of ``z``, and the layer outputs the standardized latent

        eps = (z - mean) * exp(-log_std),   logdet = -sum log_std

    (the affine coupling op in reverse), so ``log N(z; mean, std) = log N(eps; 0, I) + logdet``. Without it,
    ``eps = z`` (RealNVP's standard normal prior). ``forward(x) -> (h, eps, logdet)``, ``inverse(h, eps) -> x``.
    """

    def __init__(self, num_channels: int, learned_prior: bool = True):
        super().__init__()
        check_int(num_channels, "num_channels", low=2)  # a kept and a factored-out part
        check_bool(learned_prior, "learned_prior")
        self.num_channels = num_channels
        self.kept_channels = num_channels // 2
        factored = num_channels - self.kept_channels
        self.prior = ZeroConv2d(self.kept_channels, 2 * factored) if learned_prior else None

    def _mean_and_log_std(self, h: torch.Tensor):
        out = self.prior(h)
        return out.chunk(2, dim=1)

    def forward(self, x: torch.Tensor):
        _check_image(x, "x", self.num_channels)
        h, z = x[:, :self.kept_channels], x[:, self.kept_channels:]
        if self.prior is None:
            return h, z, x.new_zeros(x.shape[0], dtype=compute_dtype(x.dtype))
        mean, log_std = self._mean_and_log_std(h)
        eps, logdet = affine_coupling(z, log_std, mean, scale_fn="exp", reverse=True)
        return h, eps, logdet

    def inverse(self, h: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        _check_image(h, "h", self.kept_channels)
        eps = check_tensor(eps, "eps")
        _check_same_batch_and_spatial(h, "h", eps, "eps", self.num_channels - self.kept_channels)
        _check_image(eps, "eps", self.num_channels - self.kept_channels)
        if self.prior is not None:
            mean, log_std = self._mean_and_log_std(h)
            eps, _ = affine_coupling(eps, log_std, mean, scale_fn="exp", reverse=False)
        return torch.cat([h, eps], dim=1)


class LearnedPrior(nn.Module):
    """The top-level prior ``N(mean, exp(log_std)^2)`` with a learned mean and log-std per element (Glow's
    ``learn_top``), applied as the standardizing bijection ``eps = (z - mean) * exp(-log_std)``; zero-initialized
    (a standard normal).

    With ``num_classes = K`` the prior is class-conditional (Glow's ``y_cond``): a mean and a log-std per class,
    ``p(z | y) = N(mean[y], exp(log_std[y])^2)``, and ``forward``/``inverse`` take ``labels`` ``[batch]`` (int64
    in ``0 .. K-1``).
    """

    def __init__(self, shape: Sequence[int], num_classes: Optional[int] = None):
        super().__init__()
        if isinstance(shape, (str, bytes, torch.Tensor)) or not isinstance(shape, Sequence) or not shape:
            raise TypeError(f"shape must be a non-empty sequence of ints (one sample's shape, e.g. (C, H, W)); got "
                            f"{type(shape).__name__} {shape!r}")
        for i, size in enumerate(shape):
            check_int(size, f"shape[{i}]", low=1)
        if num_classes is not None:
            check_int(num_classes, "num_classes", low=1)
        self.shape = tuple(shape)
        self.num_classes = num_classes
        table = self.shape if num_classes is None else (num_classes,) + self.shape
        self.mean = nn.Parameter(torch.zeros(table))
        self.log_std = nn.Parameter(torch.zeros(table))

    def _expanded(self, z: object, name: str, labels: Optional[torch.Tensor]):
        z = check_tensor(z, name)
        if tuple(z.shape[1:]) != self.shape or z.dim() != len(self.shape) + 1:
            raise ValueError(f"{name} must have shape [batch, {', '.join(map(str, self.shape))}]; got {describe(z)}")
        if not z.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor; got {describe(z)}")
        check_conditioning_labels(labels, self.num_classes, z.shape[0], z.device)
        if self.num_classes is None:
            return z, self.log_std.expand_as(z), self.mean.expand_as(z)
        return z, self.log_std[labels], self.mean[labels]

    def forward(self, z: torch.Tensor, labels: Optional[torch.Tensor] = None):
        return affine_coupling(*self._expanded(z, "z", labels), scale_fn="exp", reverse=True)

    def inverse(self, eps: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return affine_coupling(*self._expanded(eps, "eps", labels), scale_fn="exp", reverse=False)[0]


# ----------------------------------------------------------------------------------------------------------------
# The multi-scale flow
# ----------------------------------------------------------------------------------------------------------------
class MultiScaleFlow(nn.Module):
    """A stack of bijections with multi-scale factor-out, and everything a flow model offers on top.

    ``forward(x) -> (z, logdet)``: ``z`` is ``[batch, C*H*W]``, the standardized latents of every :class:`Split` in
    order followed by the final level's (each flattened), all standard normal under the model;
    ``log p(x) = log N(z; 0, I) + logdet`` (the change of variables, Dinh et al. 2017 eq. 3).
    ``x`` lives in the model's continuous space, ``[-1/2, 1/2]`` for 8-bit images (see :meth:`bits_per_dim`).
    A class-conditional top prior (a :class:`LearnedPrior` with ``num_classes``) makes the flow ``p(x | y)``:
    ``forward``, ``inverse``, ``log_prob``, ``bits_per_dim`` and ``sample`` then take ``labels`` ``[batch]``.
    """

    def __init__(self, image_shape: Sequence[int], layers: Sequence[nn.Module],
                 top_prior: Optional[nn.Module] = None):
        super().__init__()
        self.image_shape = check_image_shape(image_shape)
        if isinstance(layers, nn.Module) or not all(isinstance(layer, nn.Module) for layer in layers):
            raise TypeError("layers must be a sequence of nn.Module bijections")
        if top_prior is not None and not isinstance(top_prior, nn.Module):
            raise TypeError(f"top_prior must be an nn.Module or None; got {type(top_prior).__name__}")
        self.layers = nn.ModuleList(layers)
        self.top_prior = top_prior
        self.num_classes = getattr(top_prior, "num_classes", None)
        self.latent_shapes = self._latent_shapes()

    def _latent_shapes(self) -> list[tuple[int, ...]]:
        """``[C, H, W]`` of each factored-out latent, then of the final one, from the layer sequence."""
        channels, height, width = self.image_shape
        shapes = []
        for layer in self.layers:
            if isinstance(layer, Squeeze):
                channels, height, width = channels * 4, height // 2, width // 2
            elif isinstance(layer, Split):
                shapes.append((channels - layer.kept_channels, height, width))
                channels = layer.kept_channels
        return shapes + [(channels, height, width)]

    @property
    def num_dims(self) -> int:
        """Dimensions ``D = C * H * W`` of one image."""
        return math.prod(self.image_shape)

    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None):
        x = check_tensor(x, "x")
        if tuple(x.shape[1:]) != self.image_shape or x.dim() != 4:
            raise ValueError(f"x must have shape [batch, {', '.join(map(str, self.image_shape))}]; "
                             f"got {describe(x)}")
        _check_image(x, "x", self.image_shape[0],
                     hint=": x lives in the model's continuous space; turn 8-bit images (integers 0..255) into it "
                          "with dequantize(images), or score them directly with bits_per_dim(images)")
        check_conditioning_labels(labels, self.num_classes, x.shape[0], x.device)
        logdet = x.new_zeros(x.shape[0], dtype=compute_dtype(x.dtype))
        latents = []
        h = x
        for layer in self.layers:
            if isinstance(layer, Split):
                h, eps, layer_logdet = layer(h)
                latents.append(eps)
            else:
                h, layer_logdet = layer(h)
            logdet = logdet + layer_logdet
        if self.top_prior is not None:
            h, layer_logdet = self.top_prior(h, labels) if self.num_classes is not None else self.top_prior(h)
            logdet = logdet + layer_logdet
        latents.append(h)
        return torch.cat([latent.reshape(x.shape[0], -1) for latent in latents], dim=1), logdet

    def inverse(self, z: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The image whose latent is ``z`` (``[batch, C*H*W]``), the exact inverse of :meth:`forward`."""
        z = check_tensor(z, "z")
        if z.dim() != 2 or z.shape[1] != self.num_dims:
            raise ValueError(f"z must have shape [batch, {self.num_dims}]; got {describe(z)}")
        if not z.is_floating_point():
            raise TypeError(f"z must be a floating-point tensor; got {describe(z)}")
        check_conditioning_labels(labels, self.num_classes, z.shape[0], z.device)
        sizes = [math.prod(shape) for shape in self.latent_shapes]
        latents = [chunk.reshape((z.shape[0],) + shape)
                   for chunk, shape in zip(torch.split(z, sizes, dim=1), self.latent_shapes)]
        h = latents.pop()
        if self.top_prior is not None:
            h = self.top_prior.inverse(h, labels) if self.num_classes is not None else self.top_prior.inverse(h)
        for layer in reversed(self.layers):
            h = layer.inverse(h, latents.pop()) if isinstance(layer, Split) else layer.inverse(h)
        return h

    def log_prob(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``log p(x)`` (``log p(x | y)`` given ``labels``) per sample (nats), for ``x`` in the model's continuous
        space."""
        z, logdet = self(x, labels)
        log_normal = -0.5 * (z.to(logdet.dtype).square() + math.log(2 * math.pi)).sum(dim=1)
        return log_normal + logdet

    def dequantize(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Uniform dequantization of 8-bit ``images`` (integers 0..255, any dtype) into the model's space:
        ``x = (images + u) / 256 - 1/2`` with ``u ~ U[0, 1)`` per dimension (Theis et al. 2016). ``images`` is
        ``[batch, C, H, W]`` (the model's ``image_shape``) of integer values in [0, 255], in an integer or a
        floating-point dtype (a host ``ValueError`` for CPU tensors, an asynchronous device assert on a GPU)."""
        self._check_pixels(images)
        check_generator(generator, images.device, "images")
        dtype = self._parameter_dtype()
        noise = torch.rand(images.shape, generator=generator, device=images.device, dtype=dtype)
        return (images.to(dtype) + noise) / NUM_BINS - 0.5

    def bits_per_dim(self, images: torch.Tensor, generator: Optional[torch.Generator] = None,
                     labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-sample bits per dimension of 8-bit ``images`` under uniform dequantization:

            bpd = -(log p(x) - D log 256) / (D log 2),   x = dequantize(images)

        (``- D log 256`` is the log-determinant of mapping ``[0, 256)^D`` to the model's unit cube). Its mean
        over the data upper-bounds the discrete model's negative log-likelihood in bits. ``images`` as in
        :meth:`dequantize`: integer values in [0, 255]; ``labels`` those of a class-conditional flow.
        """
        log_density = self.log_prob(self.dequantize(images, generator), labels) - self.num_dims * math.log(NUM_BINS)
        return -log_density / (self.num_dims * math.log(2))

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, generator: Optional[torch.Generator] = None,
               labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``n`` images in the model's space: ``x = inverse(temperature * eps)``, ``eps ~ N(0, I)``; a temperature
        below 1 samples the typical set more tightly (Glow, section 5.2). A class-conditional flow draws image
        ``j`` for class ``labels[j]`` (``labels`` ``[n]``, required there)."""
        check_int(n, "n", low=0)
        check_real(temperature, "temperature", low=0.0)
        parameter = next(self.parameters())
        check_generator(generator, parameter.device, "the model")
        check_conditioning_labels(labels, self.num_classes, n, parameter.device)
        eps = torch.randn((n, self.num_dims), generator=generator, device=parameter.device, dtype=parameter.dtype)
        return self.inverse(eps * temperature, labels)

    def _check_pixels(self, images: object) -> None:
        images = check_tensor(images, "images")
        if tuple(images.shape[1:]) != self.image_shape or images.dim() != 4:
            raise ValueError(f"images must have shape [batch, {', '.join(map(str, self.image_shape))}]; "
                             f"got {describe(images)}")
        if images.dtype == torch.bool or images.is_complex():
            raise TypeError(f"images must hold 8-bit pixel values (integers 0..255) in an integer or floating-point "
                            f"dtype; got {describe(images)}")
        ok = (images >= 0) & (images <= NUM_BINS - 1)
        if images.is_floating_point():
            ok = ok & (images == torch.floor(images))
        check_values(images, "images", ok, f"hold 8-bit pixel values: integers in [0, {NUM_BINS - 1}]")

    def _parameter_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype
