"""Glow (Kingma & Dhariwal 2018, "Glow: Generative Flow with Invertible 1x1 Convolutions").

``num_levels`` levels; each: a squeeze, ``depth`` flow steps (ActNorm -> invertible 1x1 convolution (LU) ->
affine coupling with ``s = sigmoid(raw + 2)``), and, on every level but the last, a split whose factored-out half
gets a Gaussian prior conditioned on the kept half. The top latent has a learned Gaussian prior (``learn_top``),
one per class with ``num_classes`` (the paper's class-conditional model, ``y_cond``, without its auxiliary
classifier).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from genkernels.kernels.checks import check_generator, check_int

from .flows import (
    ActNorm,
    AffineCoupling,
    InvConv1x1,
    LearnedPrior,
    MultiScaleFlow,
    Split,
    Squeeze,
    check_image_shape,
)


class Glow(MultiScaleFlow):
    """Glow on ``image_shape = (C, H, W)`` images (H and W divisible by ``2 ** num_levels``). ``generator`` seeds
    the random rotations that initialize the 1x1 convolutions; ``num_classes`` makes the model class-conditional,
    ``p(x | y)`` (a top prior per class). See
    :class:`~genkernels.models.flows.MultiScaleFlow` for ``forward``, ``inverse``, ``log_prob``, ``bits_per_dim``
    and ``sample``."""

    def __init__(self, image_shape: Sequence[int] = (3, 32, 32), num_levels: int = 3, depth: int = 8,
                 hidden_channels: int = 128, generator: Optional[torch.Generator] = None,
                 num_classes: Optional[int] = None):
        channels, height, width = check_image_shape(image_shape)
        for name, value in (("num_levels", num_levels), ("depth", depth), ("hidden_channels", hidden_channels)):
            check_int(value, name, low=1)
        check_generator(generator, torch.device("cpu"), "the initial 1x1 convolution weights")
        factor = 2 ** num_levels
        if height % factor or width % factor:
            raise ValueError(f"height and width must be divisible by 2**num_levels = {factor}; "
                             f"got image_shape {tuple(image_shape)}")
        layers = []
        for level in range(num_levels):
            layers.append(Squeeze())
            channels, height, width = channels * 4, height // 2, width // 2
            for _ in range(depth):
                layers += [ActNorm(channels), InvConv1x1(channels, generator),
                           AffineCoupling(channels, hidden_channels, mask="channel", scale_fn="sigmoid")]
            if level < num_levels - 1:
                split = Split(channels, learned_prior=True)
                layers.append(split)
                channels = split.kept_channels
        super().__init__(image_shape, layers, LearnedPrior((channels, height, width), num_classes))
