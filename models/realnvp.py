"""RealNVP (Dinh, Sohl-Dickstein & Bengio 2017, "Density estimation using Real NVP").

Each scale but the last: three checkerboard couplings (alternating masks), a squeeze, three channel-wise couplings
(alternating halves), then half of the channels factored out (section 3.6). The last scale: four checkerboard
couplings. Couplings use ``s = exp(scale * tanh(raw))``; the factored-out latents have a standard normal prior,
and so does the last scale's unless the model is class-conditional (``num_classes``), where the last scale's latent
gets a learned Gaussian per class.
Architecture simplifications for a compact reference model: the coupling networks are Glow's three-layer conv nets
(not ResNets) and there is no batch normalization.
"""
from __future__ import annotations

from typing import Optional, Sequence

from genkernels.kernels.checks import check_int

from .flows import AffineCoupling, LearnedPrior, MultiScaleFlow, Split, Squeeze, check_image_shape

CHECKERBOARD_PER_SCALE = 3
CHANNEL_PER_SCALE = 3
CHECKERBOARD_LAST_SCALE = 4


def _couplings(channels: int, hidden_channels: int, mask: str, count: int) -> list[AffineCoupling]:
    return [AffineCoupling(channels, hidden_channels, mask=mask, parity=i % 2, scale_fn="exp")
            for i in range(count)]


class RealNVP(MultiScaleFlow):
    """RealNVP on ``image_shape = (C, H, W)`` images with ``num_scales`` scales (H and W divisible by
    ``2 ** (num_scales - 1)``); ``num_classes`` makes it class-conditional, ``p(x | y)``. See
    :class:`~genkernels.models.flows.MultiScaleFlow` for ``forward``, ``inverse``,
    ``log_prob``, ``bits_per_dim`` and ``sample``."""

    def __init__(self, image_shape: Sequence[int] = (3, 32, 32), num_scales: int = 2, hidden_channels: int = 64,
                 num_classes: Optional[int] = None):
        channels, height, width = check_image_shape(image_shape)
        check_int(num_scales, "num_scales", low=1)
        check_int(hidden_channels, "hidden_channels", low=1)
        factor = 2 ** (num_scales - 1)
        if height % factor or width % factor:
            raise ValueError(f"height and width must be divisible by 2**(num_scales - 1) = {factor}; "
                             f"got image_shape {tuple(image_shape)}")
        layers = []
        for _ in range(num_scales - 1):
            layers += _couplings(channels, hidden_channels, "checkerboard", CHECKERBOARD_PER_SCALE)
            layers.append(Squeeze())
            channels *= 4
            layers += _couplings(channels, hidden_channels, "channel", CHANNEL_PER_SCALE)
            split = Split(channels, learned_prior=False)
            layers.append(split)
            channels = split.kept_channels
        layers += _couplings(channels, hidden_channels, "checkerboard", CHECKERBOARD_LAST_SCALE)
        top_prior = None if num_classes is None else LearnedPrior((channels, height // factor, width // factor),
                                                                    num_classes)
        super().__init__(image_shape, layers, top_prior)
