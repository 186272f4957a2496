"""PixelCNN (van den Oord et al. 2016, "Pixel Recurrent Neural Networks") on genkernels' masked convolution.

``MaskedConv2d`` is a drop-in ``nn.Conv2d`` whose kernel is masked so that every output sees only earlier pixels
(raster order) and, with colour groups, earlier sub-pixels (R before G before B). ``PixelCNN`` stacks a 7x7 mask-A
input convolution, residual blocks (ReLU, 1x1, ReLU, 3x3, ReLU, 1x1, plus the block input; the paper's Figure 5)
and two 1x1 output convolutions into a 256-way softmax per sub-pixel:

    p(x) = prod_{i over pixels in raster order} p(x_i,R | x_<i) p(x_i,G | x_<i, x_i,R) p(x_i,B | x_<i, x_i,R, x_i,G)

With ``num_classes`` the model is class-conditional, ``p(x | y)`` (the conditional PixelCNN of van den Oord et
al. 2016, "Conditional Image Generation with PixelCNN Decoders"): a learned per-class bias is added to the residual
stream after the input convolution and to every block's hidden layer, the same at every position, so the masks'
ordering is untouched.

Sampling draws one sub-pixel at a time. The naive sampler runs the whole network per sub-pixel. The cached sampler
keeps, for every convolution wider than 1x1, its full input map, and per sub-pixel computes each layer at the one
pixel being drawn, from a crop of that layer's cached input to the window the mask lets the pixel see (rows
``h - p .. h``, columns ``w - p .. w + p``); 1x1 layers run on that single pixel. Every other position keeps the
values computed when it was drawn, which are final: nothing at a pixel depends on pixels after it, and at the
pixel itself the last sub-pixel's pass sees every colour it may see.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from genkernels.kernels.checks import (
    check_bool,
    check_conditioning_labels,
    check_generator,
    check_in_range,
    check_int,
    describe,
)
from genkernels.kernels.cross_entropy import cross_entropy
from genkernels.kernels.launch import draw_philox_seed
from genkernels.kernels.masked_conv import check_masked_conv2d_config, masked_conv2d
from genkernels.kernels.sampling import sample_categorical

NUM_CLASSES = 256


def _square_kernel_size(kernel_size) -> int:
    """An int ``k`` or a pair ``(k, k)`` of ints -> ``k`` (its value is checked by check_masked_conv2d_config)."""
    if isinstance(kernel_size, (tuple, list)):
        sizes = [check_int(k, "kernel_size") for k in kernel_size]
        if len(sizes) != 2 or sizes[0] != sizes[1]:
            raise ValueError(f"kernel_size must be an int or a square pair (k, k); got {kernel_size!r}")
        return sizes[0]
    return check_int(kernel_size, "kernel_size")


def _image_size(image_size) -> tuple[int, int]:
    """An int or an ``(height, width)`` pair of ints >= 1 -> ``(height, width)``."""
    if isinstance(image_size, (tuple, list)):
        if len(image_size) != 2:
            raise ValueError(f"image_size must be an int or a (height, width) pair; got {image_size!r}")
        return tuple(check_int(side, "image_size", low=1) for side in image_size)
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise TypeError(f"image_size must be an int or a (height, width) pair of ints, got "
                        f"{type(image_size).__name__} {image_size!r}")
    side = check_int(image_size, "image_size", low=1)
    return side, side


def _is_all(value, expected: int) -> bool:
    return value == expected or (isinstance(value, (tuple, list)) and all(v == expected for v in value))


class MaskedConv2d(nn.Conv2d):
    """``nn.Conv2d`` with a PixelCNN mask, running :func:`genkernels.kernels.masked_conv.masked_conv2d`.

    Takes ``nn.Conv2d``'s arguments plus ``mask_type`` ("A" excludes the centre tap, "B" includes it) and
    ``color_channels`` (1, or 3 for R, G, B channel thirds). The masked convolution is "same"-sized with stride 1,
    so ``stride``, ``dilation`` and ``groups`` must be 1, ``padding`` "same" (the default) or ``k // 2``, and
    ``padding_mode`` "zeros"; other values raise ``ValueError``. Channel counts are ints >= 1 and the kernel size
    an odd int >= 1 (or a square pair), else ``TypeError``/``ValueError`` naming the argument. The weight keeps
    its full ``[out, in, k, k]`` shape (so ``nn.Conv2d`` state dicts load); the masked entries are never read and
    get zero gradient.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding="same", dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 mask_type: str = "B", color_channels: int = 1):
        size = _square_kernel_size(kernel_size)
        check_int(in_channels, "in_channels", low=1)
        check_int(out_channels, "out_channels", low=1)
        check_masked_conv2d_config(out_channels, in_channels, size, mask_type, color_channels)
        check_bool(bias, "bias")
        unsupported = []
        if not _is_all(stride, 1):
            unsupported.append(f"stride={stride!r} (must be 1)")
        if not _is_all(dilation, 1):
            unsupported.append(f"dilation={dilation!r} (must be 1)")
        if groups != 1:
            unsupported.append(f"groups={groups!r} (must be 1)")
        if padding != "same" and not _is_all(padding, size // 2):
            unsupported.append(f"padding={padding!r} (must be 'same' or kernel_size // 2 = {size // 2})")
        if padding_mode != "zeros":
            unsupported.append(f"padding_mode={padding_mode!r} (must be 'zeros')")
        if unsupported:
            raise ValueError("MaskedConv2d computes a 'same'-sized masked convolution; unsupported: "
                             + "; ".join(unsupported))
        super().__init__(in_channels, out_channels, size, padding=size // 2, bias=bias, device=device, dtype=dtype)
        self.mask_type = mask_type
        self.color_channels = color_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return masked_conv2d(x, self.weight, self.bias, mask_type=self.mask_type,
                             color_channels=self.color_channels)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mask_type={self.mask_type}, color_channels={self.color_channels}"


class ResidualBlock(nn.Module):
    """``x + conv1x1(relu(conv3x3(relu(conv1x1(relu(x))))))`` with mask-B convolutions, ``2h -> h -> h -> 2h``
    channels (van den Oord et al. 2016, Figure 5)."""

    def __init__(self, channels: int, color_channels: int, num_classes: Optional[int] = None):
        super().__init__()
        self.reduce = MaskedConv2d(2 * channels, channels, 1, color_channels=color_channels)
        self.spatial = MaskedConv2d(channels, channels, 3, color_channels=color_channels)
        self.expand = MaskedConv2d(channels, 2 * channels, 1, color_channels=color_channels)
        # class-conditional: a per-class bias on the hidden layer (zero at the start: the unconditional block)
        self.class_bias = None if num_classes is None else _zero_embedding(num_classes, channels)

    def hidden(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The 3x3 convolution's input ``relu(conv1x1(relu(x)) + b[y])`` (``b[y]`` only when class-conditional)."""
        hidden = self.reduce(F.relu(x))
        if self.class_bias is not None:
            hidden = hidden + self.class_bias(labels)[:, :, None, None]
        return F.relu(hidden)

    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return x + self.expand(F.relu(self.spatial(self.hidden(x, labels))))


def _zero_embedding(num_classes: int, channels: int) -> nn.Embedding:
    embedding = nn.Embedding(num_classes, channels)
    nn.init.zeros_(embedding.weight)
    return embedding


class PixelCNN(nn.Module):
    """PixelCNN over 8-bit images with 1 (grey) or 3 (RGB) channels.

    Args:
        in_channels: 1 or 3; with 3 every layer splits its channels into R, G, B thirds.
        hidden_channels: ``h``; the residual stream has ``2h`` channels (divisible by 3 for RGB).
        num_blocks: residual blocks after the 7x7 mask-A input convolution.
        output_channels: channels of the first 1x1 output convolution (divisible by 3 for RGB).
        image_size: ``(height, width)`` (or one int) that :meth:`sample` draws; ``forward`` takes any size.
        num_classes: ``None`` (unconditional) or the number of classes ``K`` of a class-conditional model, whose
            ``forward``, ``loss`` and ``sample`` then take ``labels`` (int64 ``[batch]`` in ``0 .. K-1``).

    Every argument is an int (``TypeError`` otherwise) in range (``ValueError`` naming it): ``hidden_channels`` and
    ``output_channels`` >= 1 (multiples of 3 for RGB, so R, G, B get equal thirds), ``num_blocks`` >= 0, each side
    of ``image_size`` >= 1, ``num_classes`` >= 1. One set of weights runs under every implementation
    (``genkernels.kernels.use_impl``).
    """

    def __init__(self, in_channels: int = 1, hidden_channels: int = 64, num_blocks: int = 7,
                 output_channels: int = 256, image_size=28, num_classes: Optional[int] = None):
        super().__init__()
        in_channels = check_int(in_channels, "in_channels")
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels={in_channels} is not supported; expected 1 (grey) or 3 (RGB)")
        check_int(hidden_channels, "hidden_channels", low=1)
        check_int(num_blocks, "num_blocks", low=0)
        check_int(output_channels, "output_channels", low=1)
        if in_channels == 3:
            reasons = [f"{name}={value} is not divisible by 3" for name, value in
                       (("hidden_channels", hidden_channels), ("output_channels", output_channels)) if value % 3]
            if reasons:
                raise ValueError("in_channels=3 splits every layer's channels into R, G, B thirds: "
                                 + "; ".join(reasons))
        height, width = _image_size(image_size)
        if num_classes is not None:
            check_int(num_classes, "num_classes", low=1)
        self.in_channels = in_channels
        self.image_size = (height, width)
        self.num_classes = num_classes
        colors = in_channels
        self.input_conv = MaskedConv2d(in_channels, 2 * hidden_channels, 7, mask_type="A", color_channels=colors)
        self.class_bias = None if num_classes is None else _zero_embedding(num_classes, 2 * hidden_channels)
        self.blocks = nn.ModuleList(ResidualBlock(hidden_channels, colors, num_classes) for _ in range(num_blocks))
        self.output_hidden = MaskedConv2d(2 * hidden_channels, output_channels, 1, color_channels=colors)
        self.output_logits = MaskedConv2d(output_channels, NUM_CLASSES * in_channels, 1, color_channels=colors)

    # ------------------------------------------------------------------------------------------------------------
    # Density
    # ------------------------------------------------------------------------------------------------------------
    def _check_images(self, x: torch.Tensor) -> None:
        """``x``: an integer tensor ``[batch, C, H, W]`` of pixel values in [0, 255]: a host ``ValueError`` for CPU
        tensors, an asynchronous device assert on a GPU (no sync), nothing for ``meta`` tensors."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"x must hold integer pixel values in [0, 255] (e.g. uint8); got {describe(x)}")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape [batch, {self.in_channels}, height, width]; got {describe(x)}")
        check_in_range(x, "x (pixel values)", 0, NUM_CLASSES - 1, high_inclusive=True)

    def _with_class_bias(self, stream: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        """The input convolution's output plus the class bias ``b[y]`` of a class-conditional model."""
        if self.class_bias is None:
            return stream
        return stream + self.class_bias(labels)[:, :, None, None]

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel values 0..255 -> [-1, 1] in the parameters' dtype."""
        return x.to(self.input_conv.weight.dtype) / 127.5 - 1.0

    def _head(self, stream: torch.Tensor) -> torch.Tensor:
        """Residual stream ``[n, 2h, H, W]`` -> logits ``[n, 256, C, H, W]``."""
        logits = self.output_logits(F.relu(self.output_hidden(F.relu(stream))))
        n, _, height, width = logits.shape
        return logits.view(n, self.in_channels, NUM_CLASSES, height, width).transpose(1, 2)

    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits ``[batch, 256, channels, H, W]`` of ``p(x[:, c, h, w] | earlier sub-pixels[, y])``.

        ``x``: integer pixel values in [0, 255], ``[batch, channels, H, W]`` (a float tensor raises
        ``TypeError``; a value outside [0, 255] raises ``ValueError`` for a CPU tensor and trips an asynchronous
        device assert on a GPU, never a silent rescale). ``labels``: the classes ``y`` ``[batch]`` of a
        class-conditional model, ``None`` otherwise (either mismatch raises ``ValueError``). The class dimension
        comes second, as ``F.cross_entropy(logits, x.long())`` expects.
        """
        self._check_images(x)
        check_conditioning_labels(labels, self.num_classes, x.shape[0], x.device)
        labels = None if labels is None else labels.long()
        stream = self._with_class_bias(self.input_conv(self._scale(x)), labels)
        for block in self.blocks:
            stream = block(stream, labels)
        return self._head(stream)

    def loss(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Negative log-likelihood in bits per sub-pixel: ``mean(-log2 p(x_i | x_<i[, y]))`` over every
        dimension."""
        return cross_entropy(self(x, labels), x) / math.log(2.0)

    def log_likelihood(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-image ``log p(x[, | y]) = sum_i log p(x_i | x_<i[, y])`` in nats, ``[batch]`` (exact: the model
        is discrete)."""
        nats = cross_entropy(self(x, labels), x, reduction="none")
        return -nats.flatten(1).sum(1)

    # ------------------------------------------------------------------------------------------------------------
    # Sampling
    # ------------------------------------------------------------------------------------------------------------
    def _draw(self, logits: torch.Tensor, seed: torch.Tensor, row: int, col: int, channel: int) -> torch.Tensor:
        """One value per image from ``softmax(logits)`` ``[n, 256]`` for sub-pixel ``(row, col, channel)``: the
        fused sampler's Gumbel-max draw, its Philox counter offset by the sub-pixel's index in drawing order."""
        step = (row * self.image_size[1] + col) * self.in_channels + channel
        return sample_categorical(logits, seed=seed, offset=step)

    @torch.no_grad()
    def sample(self, n: int, use_cache: bool = True, generator: Optional[torch.Generator] = None,
               labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Draw ``n`` images ``[n, channels, H, W]`` (int64 values 0..255) of ``image_size``, image ``j`` of class
        ``labels[j]`` for a class-conditional model (``labels`` ``[n]``, required there, refused otherwise).

        Sub-pixels are drawn in raster order, R, G, B within a pixel, by
        :func:`~genkernels.kernels.sampling.sample_categorical` (Gumbel-max on Philox uniforms); one seed is drawn
        from ``generator`` up front and each sub-pixel's uniforms are keyed by it and the sub-pixel's index, so
        both samplers read the same ones.
        ``use_cache=False`` runs the whole network per sub-pixel; ``use_cache=True`` computes only the pixel being
        drawn, from per-layer caches (module docstring). Given the same logits both give the same images.
        """
        n = check_int(n, "n", low=0)
        check_bool(use_cache, "use_cache")
        height, width = self.image_size
        device = self.input_conv.weight.device
        check_generator(generator, device, "the model")
        check_conditioning_labels(labels, self.num_classes, n, device)
        labels = None if labels is None else labels.long()
        seed = draw_philox_seed(device, generator)
        images = torch.zeros((n, self.in_channels, height, width), dtype=torch.int64, device=device)
        if n == 0:
            return images
        if use_cache:
            self._sample_cached(images, seed, labels)
        else:
            self._sample_naive(images, seed, labels)
        return images

    def _sample_naive(self, images: torch.Tensor, seed: torch.Tensor, labels: Optional[torch.Tensor]) -> None:
        height, width = self.image_size
        for row in range(height):
            for col in range(width):
                for channel in range(self.in_channels):
                    logits = self(images, labels)[:, :, channel, row, col]
                    images[:, channel, row, col] = self._draw(logits, seed, row, col, channel)

    def _sample_cached(self, images: torch.Tensor, seed: torch.Tensor, labels: Optional[torch.Tensor]) -> None:
        height, width = self.image_size
        scaled = self._scale(images)
        block_caches = [scaled.new_zeros((images.shape[0], block.spatial.in_channels, height, width))
                        for block in self.blocks]
        for row in range(height):
            for col in range(width):
                for channel in range(self.in_channels):
                    logits = self._logits_at(scaled, block_caches, row, col, labels)[:, :, channel, 0, 0]
                    value = self._draw(logits, seed, row, col, channel)
                    images[:, channel, row, col] = value
                    scaled[:, channel, row, col] = self._scale(value)

    def _logits_at(self, scaled: torch.Tensor, block_caches: list[torch.Tensor], row: int, col: int,
                   labels: Optional[torch.Tensor]):
        """Logits ``[n, 256, C, 1, 1]`` at pixel ``(row, col)``, writing each block's 3x3 input there into its
        cache: the network of :meth:`forward`, evaluated at one pixel."""
        stream = self._with_class_bias(_masked_conv_at(self.input_conv, scaled, row, col), labels)
        for block, cache in zip(self.blocks, block_caches):
            cache[:, :, row:row + 1, col:col + 1] = block.hidden(stream, labels)
            stream = stream + block.expand(F.relu(_masked_conv_at(block.spatial, cache, row, col)))
        return self._head(stream)


def _masked_conv_at(conv: MaskedConv2d, source: torch.Tensor, row: int, col: int) -> torch.Tensor:
    """``conv(source)[:, :, row, col]`` as ``[n, C_out, 1, 1]``, from the crop of ``source`` the mask lets that
    pixel see (rows ``row - p .. row``, columns ``col - p .. col + p``, clipped to the image). Inside the crop the
    pixel reads the same taps as in the full image, and a tap outside the image is zero in both."""
    pad = conv.kernel_size[0] // 2
    top, left = max(0, row - pad), max(0, col - pad)
    crop = source[:, :, top:row + 1, left:col + pad + 1]
    return conv(crop)[:, :, row - top:row - top + 1, col - left:col - left + 1]


__all__ = ["MaskedConv2d", "PixelCNN", "ResidualBlock"]
