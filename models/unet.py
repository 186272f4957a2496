"""The DDPM U-Net (Ho et al. 2020, appendix B) on the fused GroupNorm+SiLU and attention ops.

Architecture (the PixelCNN++-style backbone of the DDPM paper):

* the timestep ``t`` -> sinusoidal embedding of width ``base_channels`` -> ``Linear -> SiLU -> Linear`` of width
  ``4 * base_channels`` (``temb``); with ``num_classes`` a learned class embedding is added to it, index
  ``num_classes`` being the null class of classifier-free guidance (Ho & Salimans 2022);
* ``conv_in`` (3x3), then one level per entry of ``channel_mult`` (width ``base_channels * mult``), each with
  ``num_res_blocks`` residual blocks (followed by self-attention where the level's resolution is in
  ``attention_resolutions``) and a stride-2 3x3 convolution between levels;
* the middle: residual block, self-attention, residual block;
* the decoder mirrors the encoder with ``num_res_blocks + 1`` residual blocks per level, each taking the
  concatenation of the running features and one encoder skip, and nearest-neighbour x2 upsampling + 3x3 conv
  between levels;
* the output: GroupNorm -> SiLU -> 3x3 conv.

Residual block: ``h = conv1(SiLU(GN(x))) + Linear(SiLU(temb)); h = conv2(dropout(SiLU(GN(h)))); out = skip(x) + h``
with a 1x1 ``skip`` when the width changes. Attention block: ``out = x + proj(Attention(qkv(GN(x))))`` over the
``H * W`` positions, multi-head. Each GroupNorm(+SiLU) is one :func:`~genkernels.kernels.group_norm.group_norm_silu`
pass (through :class:`~genkernels.models.layers.GroupNormAct`), attention is
:func:`~genkernels.kernels.attention.flash_attention` on strided views of the qkv convolution's output. As in the
DDPM code, the last convolution of every residual branch, the attention output projection and ``conv_out`` start at
zero, so every block starts as the identity.
"""
from __future__ import annotations

import inspect
import math
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from genkernels.kernels.attention import flash_attention
from genkernels.kernels.checks import (
    check_bool,
    check_class_indices,
    check_float_tensor,
    check_int,
    check_real,
    describe,
)

from .layers import GroupNormAct, LinearBiasAct


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0, *,
                       flip_sin_to_cos: bool = False, freq_shift: float = 1.0) -> torch.Tensor:
    """Sinusoidal timestep embedding ``[batch, dim]`` in fp32 (Vaswani et al. 2017, sec. 3.5, as in the DDPM code).

    With ``half = dim // 2`` and frequencies ``w_k = max_period ** (-k / (half - freq_shift))``, ``k = 0 .. half -
    1``: ``emb[:, k] = sin(t * w_k)`` and ``emb[:, half + k] = cos(t * w_k)``, the cosines first with
    ``flip_sin_to_cos`` (a zero column is appended for odd ``dim``). The defaults are the DDPM code's embedding;
    ``flip_sin_to_cos`` and ``freq_shift`` are diffusers' ``Timesteps`` options of the same names, computed in the
    same order of fp32 operations as diffusers' ``get_timestep_embedding``. ``timesteps`` is ``[batch]``, integer
    or float. ``half - freq_shift`` must not be 0 unless ``half == 1`` (one frequency, ``w_0 = 1``).
    """
    dim = _positive(dim, "dim")
    max_period = check_real(max_period, "max_period", low=0.0, low_inclusive=False)
    flip_sin_to_cos = check_bool(flip_sin_to_cos, "flip_sin_to_cos")
    half = dim // 2
    denominator = _frequency_denominator(half, check_real(freq_shift, "freq_shift"), "dim", dim)
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    frequencies = torch.exp(exponent / denominator)
    angles = timesteps.to(torch.float32)[:, None] * frequencies[None, :]
    parts = [torch.cos(angles), torch.sin(angles)] if flip_sin_to_cos else [torch.sin(angles), torch.cos(angles)]
    embedding = torch.cat(parts, dim=1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


def _frequency_denominator(half: int, freq_shift: float, dim_name: str, dim: int) -> float:
    """``half - freq_shift``, the divisor of the frequency exponents (1 when there is one frequency)."""
    if half <= 1:
        return 1.0
    denominator = half - freq_shift
    if denominator == 0:
        raise ValueError(f"freq_shift={freq_shift} equals {dim_name}={dim} // 2: the frequencies "
                         f"max_period ** (-k / ({dim_name} // 2 - freq_shift)) would divide by zero")
    return float(denominator)


class ResBlock(nn.Module):
    """``skip(x) + conv2(dropout(SiLU(GN(conv1(SiLU(GN(x))) + Linear(emb)))))``; ``emb`` is ``SiLU(temb)``."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float, num_groups: int,
                 eps: float):
        super().__init__()
        in_channels, out_channels = _positive(in_channels, "in_channels"), _positive(out_channels, "out_channels")
        temb_channels = _positive(temb_channels, "temb_channels")
        dropout = check_real(dropout, "dropout", low=0.0, high=1.0)
        num_groups = _groups(num_groups, {"in_channels": in_channels, "out_channels": out_channels})
        eps = check_real(eps, "eps", low=0.0, low_inclusive=False)
        self.norm1 = GroupNormAct(num_groups, in_channels, eps=eps, activation="silu")
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = GroupNormAct(num_groups, out_channels, eps=eps, activation="silu")
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        _zero_init(self.conv2)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1(x))
        h = h + self.temb_proj(emb)[:, :, None, None]
        h = self.conv2(self.dropout(self.norm2(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the ``H * W`` positions: ``x + proj(softmax(q k^T / sqrt(d)) v)`` with
    ``q, k, v`` from one 1x1 convolution of ``GN(x)`` (no activation).

    The heads are strided views of the qkv convolution's output (NCHW: ``[b, 3, heads, d, HW]`` transposed;
    channels-last: ``[b, HW, 3, heads, d]``), read in place by :func:`flash_attention`; the attention output is
    copied once, back to the image layout, before the projection.
    """

    def __init__(self, channels: int, num_heads: int, num_groups: int, eps: float):
        super().__init__()
        channels = _positive(channels, "channels")
        num_heads = _head_count(channels, _positive(num_heads, "num_heads"), 1)
        num_groups = _groups(num_groups, {"channels": channels})
        eps = check_real(eps, "eps", low=0.0, low_inclusive=False)
        self.num_heads = num_heads
        self.norm = GroupNormAct(num_groups, channels, eps=eps, activation=None)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        _zero_init(self.proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split_heads(self.qkv(self.norm(x)))
        out = flash_attention(q, k, v)
        return x + self.proj(self.merge_heads(out, x.shape))

    def split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views ``[batch, heads, H * W, head_dim]`` of q, k and v inside ``qkv`` ``[batch, 3C, H, W]``."""
        batch, channels3, height, width = qkv.shape
        head_dim = channels3 // (3 * self.num_heads)
        positions = height * width
        if not qkv.is_contiguous() and qkv.is_contiguous(memory_format=torch.channels_last):
            packed = qkv.permute(0, 2, 3, 1).view(batch, positions, 3, self.num_heads, head_dim)
            return tuple(packed[:, :, i].transpose(1, 2) for i in range(3))
        packed = qkv.reshape(batch, 3, self.num_heads, head_dim, positions)
        return tuple(packed[:, i].transpose(2, 3) for i in range(3))

    @staticmethod
    def merge_heads(out: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """``[batch, heads, H * W, head_dim]`` -> ``[batch, heads * head_dim, H, W]`` (one copy)."""
        batch, channels, height, width = shape
        return out.transpose(2, 3).reshape(batch, channels, height, width)


class Downsample(nn.Module):
    """A 3x3 convolution with stride 2. ``padding=1`` (the default) pads one pixel on every side; ``padding=0``
    pads one row and one column at the bottom and right only, then convolves without padding (TensorFlow's "SAME"
    padding of the DDPM code, diffusers' ``downsample_padding=0``). Both halve even sides (the U-Net downsamples
    only even sides)."""

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        channels = _positive(channels, "channels")
        self.padding = _downsample_padding(padding, "padding")
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=self.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        channels = _positive(channels, "channels")
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the encoder or decoder: residual blocks, each optionally followed by attention, then an
    optional resampling layer."""

    def __init__(self, res_blocks: Sequence[ResBlock], attentions: Optional[Sequence[AttentionBlock]],
                 resample: Optional[nn.Module]):
        super().__init__()
        self.res_blocks = nn.ModuleList(res_blocks)
        self.attentions = nn.ModuleList(attentions) if attentions is not None else None
        self.resample = resample

    def block(self, i: int, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.res_blocks[i](h, emb)
        return self.attentions[i](h) if self.attentions is not None else h


class _BlockFactory:
    """Builds the residual and attention blocks of one U-Net with its shared settings."""

    def __init__(self, temb_channels: int, dropout: float, num_groups: int, eps: float, num_heads: Optional[int],
                 num_head_channels: int):
        self.temb_channels, self.dropout, self.num_groups, self.eps = temb_channels, dropout, num_groups, eps
        self.num_heads, self.num_head_channels = num_heads, num_head_channels

    def res(self, in_channels: int, out_channels: int) -> ResBlock:
        return ResBlock(in_channels, out_channels, self.temb_channels, self.dropout, self.num_groups, self.eps)

    def attention(self, channels: int) -> AttentionBlock:
        heads = _head_count(channels, self.num_heads, self.num_head_channels)
        return AttentionBlock(channels, heads, self.num_groups, self.eps)


def check_class_labels(class_labels: Optional[torch.Tensor], batch: int, num_classes: Optional[int],
                       device: torch.device) -> Optional[torch.Tensor]:
    """Validated class labels ``[batch]`` for a network of ``num_classes`` classes (None: unconditional), the null
    class ``num_classes`` when None on a class-conditional network. Values are checked on the host for CPU tensors
    and asserted on the device otherwise (no synchronization)."""
    if class_labels is None:
        if num_classes is None:
            return None
        return torch.full((batch,), num_classes, dtype=torch.long, device=device)
    if num_classes is None:
        raise ValueError("class_labels were given but the network is unconditional (num_classes=None)")
    return check_class_indices(class_labels, "class_labels", batch, device, num_classes + 1,
                               f"lie in [0, num_classes={num_classes}] (num_classes is the null class)")


class UNet(nn.Module):
    """The DDPM U-Net (Ho et al. 2020): predicts the noise (or ``x0`` / ``v``) of ``x_t`` at timestep ``t``.

    Args:
        in_channels: image channels.
        out_channels: output channels (default ``in_channels``).
        base_channels: width of the first level; level ``i`` has ``base_channels * channel_mult[i]`` channels and
            the timestep embedding ``4 * base_channels``.
        channel_mult: width multiplier per level; there are ``len(channel_mult) - 1`` downsamplings.
        num_res_blocks: residual blocks per encoder level (the decoder has one more per level).
        attention_resolutions: feature-map sides (for ``image_size`` inputs) after whose residual blocks
            self-attention runs; each must be one of the levels' sides ``image_size // 2**i``. The middle block
            always has one attention block, at the deepest level's width.
        dropout: dropout probability inside the residual blocks.
        num_groups: GroupNorm groups; must divide ``base_channels * m`` for every multiplier ``m``.
        num_heads: heads of every attention block; when None, ``channels // num_head_channels`` heads. It must
            divide the width of every attention block.
        num_head_channels: channels per head when ``num_heads`` is None; it must divide the width of every
            attention block (the levels in ``attention_resolutions`` and the deepest level, for the middle block).
            Head dims outside the attention kernels' [16, 256] are allowed: those blocks run
            :func:`flash_attention`'s PyTorch reference under ``impl="auto"`` (and raise under ``impl="triton"``).
        image_size: side of the training images, to place ``attention_resolutions`` (inputs of other sizes divisible
            by ``2**(len(channel_mult) - 1)`` run too, with attention at the same levels).
        num_classes: number of classes for class conditioning (None: unconditional); class ``num_classes`` is the
            null class (unconditional prediction for classifier-free guidance).
        norm_eps: GroupNorm epsilon.
        flip_sin_to_cos, freq_shift: the sinusoidal timestep embedding's options (:func:`timestep_embedding`); the
            defaults are the DDPM code's (sines first, frequencies ``10000 ** (-k / (half - 1))``).
        downsample_padding: 1 (default) pads the stride-2 convolutions by one pixel on every side; 0 pads one row
            and column at the bottom/right only, as the DDPM code (TensorFlow's "SAME") and diffusers'
            ``downsample_padding=0`` (the DDPM checkpoints' setting) do.

    Every argument is checked before any layer is built (``TypeError`` for a wrong type, ``ValueError`` for a
    wrong value, naming the argument and, for sizes that do not fit together, the options to change).
    :meth:`from_diffusers` / :meth:`to_diffusers` convert to and from a diffusers ``UNet2DModel``.
    """

    def __init__(self, in_channels: int = 3, out_channels: Optional[int] = None, base_channels: int = 128,
                 channel_mult: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attention_resolutions: Sequence[int] = (16,), dropout: float = 0.1, num_groups: int = 32,
                 num_heads: Optional[int] = None, num_head_channels: int = 64, image_size: int = 32,
                 num_classes: Optional[int] = None, norm_eps: float = 1e-5, flip_sin_to_cos: bool = False,
                 freq_shift: float = 1.0, downsample_padding: int = 1):
        super().__init__()
        self.in_channels = _positive(in_channels, "in_channels")
        self.out_channels = self.in_channels if out_channels is None else _positive(out_channels, "out_channels")
        self.base_channels = _positive(base_channels, "base_channels")
        self.channel_mult = tuple(_positive(m, "channel_mult entries") for m in _sequence(channel_mult,
                                                                                          "channel_mult"))
        if not self.channel_mult:
            raise ValueError("channel_mult must have at least one entry")
        self.num_res_blocks = _positive(num_res_blocks, "num_res_blocks")
        self.image_size = _positive(image_size, "image_size")
        self.num_classes = None if num_classes is None else _positive(num_classes, "num_classes")
        self.dropout = check_real(dropout, "dropout", low=0.0, high=1.0)
        self.norm_eps = check_real(norm_eps, "norm_eps", low=0.0, low_inclusive=False)
        self.num_groups = _positive(num_groups, "num_groups")
        self.num_heads = None if num_heads is None else _positive(num_heads, "num_heads")
        self.num_head_channels = _positive(num_head_channels, "num_head_channels")
        self.flip_sin_to_cos = check_bool(flip_sin_to_cos, "flip_sin_to_cos")
        self.freq_shift = check_real(freq_shift, "freq_shift")
        _frequency_denominator(self.base_channels // 2, self.freq_shift, "base_channels", self.base_channels)
        self.downsample_padding = _downsample_padding(downsample_padding, "downsample_padding")
        widths = [self.base_channels * m for m in self.channel_mult]
        self._check_sizes(widths, self.num_groups)
        level_sides = [self.image_size // 2**i for i in range(len(widths))]
        self.attention_levels = _attention_levels(attention_resolutions, level_sides)
        self._check_attention_widths(widths, level_sides)
        temb = 4 * self.base_channels
        blocks = _BlockFactory(temb, self.dropout, self.num_groups, self.norm_eps, self.num_heads,
                               self.num_head_channels)

        self.time_embed = nn.Sequential(LinearBiasAct(self.base_channels, temb, act="silu"), nn.Linear(temb, temb))
        self.class_embed = nn.Embedding(self.num_classes + 1, temb) if self.num_classes is not None else None
        self.conv_in = nn.Conv2d(self.in_channels, self.base_channels, 3, padding=1)
        self.down, skip_widths = self._encoder(widths, blocks)
        width = widths[-1]
        self.mid = Level([blocks.res(width, width), blocks.res(width, width)], [blocks.attention(width)], None)
        self.up = self._decoder(widths, skip_widths, blocks)
        self.norm_out = GroupNormAct(self.num_groups, widths[0], eps=self.norm_eps, activation="silu")
        self.conv_out = nn.Conv2d(widths[0], self.out_channels, 3, padding=1)
        _zero_init(self.conv_out)

    @property
    def widths(self) -> list[int]:
        """The channels of every level, ``base_channels * channel_mult[i]``."""
        return [self.base_channels * m for m in self.channel_mult]

    def _check_attention_widths(self, widths: list[int], level_sides: list[int]) -> None:
        """The head layout fits every attention block (the attention levels' and the middle block's): an error
        naming the block, its width, and the options that fix it."""
        deepest = len(widths) - 1
        for level in sorted(self.attention_levels | {deepest}):
            width = widths[level]
            blocks = []
            if level in self.attention_levels:
                blocks.append(f"the attention blocks at level {level} ({level_sides[level]}x{level_sides[level]} "
                              f"for image_size={self.image_size})")
            if level == deepest:
                blocks.append("the middle block's attention (at the deepest level)")
            where = (f"{' and '.join(blocks)}, {width} channels wide (base_channels={self.base_channels} x "
                     f"channel_mult[{level}]={self.channel_mult[level]})")
            if self.num_heads is not None and width % self.num_heads:
                suggestion = _largest_divisor(width, self.num_heads)
                raise ValueError(f"num_heads={self.num_heads} must divide the width of {where}: set num_heads to a "
                                 f"divisor of {width} (e.g. {suggestion}), or num_heads=None and num_head_channels "
                                 f"to a divisor of {width}, or change base_channels / channel_mult")
            if self.num_heads is None and width % self.num_head_channels:
                suggestion = _largest_divisor(width, self.num_head_channels)
                hint = "" if level == deepest else (f", or leave {level_sides[level]} out of "
                                                    f"attention_resolutions={tuple(sorted(self._resolutions()))}")
                raise ValueError(f"num_head_channels={self.num_head_channels} must divide the width of {where}: "
                                 f"set num_head_channels to a divisor of {width} (e.g. {suggestion}), or set "
                                 f"num_heads, or change base_channels / channel_mult{hint}")

    def _resolutions(self) -> set[int]:
        return {self.image_size // 2**level for level in self.attention_levels}

    def _encoder(self, widths: list[int], blocks: "_BlockFactory") -> tuple[nn.ModuleList, list[int]]:
        """The encoder levels, and the widths of the skips they leave (``conv_in``'s first), in push order."""
        levels, skip_widths, width = nn.ModuleList(), [self.base_channels], self.base_channels
        for level, out_width in enumerate(widths):
            res_blocks = []
            for _ in range(self.num_res_blocks):
                res_blocks.append(blocks.res(width, out_width))
                width = out_width
                skip_widths.append(width)
            last = level == len(widths) - 1
            levels.append(Level(res_blocks, self._attentions(level, width, len(res_blocks), blocks),
                                None if last else Downsample(width, self.downsample_padding)))
            if not last:
                skip_widths.append(width)
        return levels, skip_widths

    def _decoder(self, widths: list[int], skip_widths: list[int], blocks: "_BlockFactory") -> nn.ModuleList:
        """The decoder levels, deepest first; each residual block reads the running features and one skip."""
        levels, width = nn.ModuleList(), widths[-1]
        for level in reversed(range(len(widths))):
            res_blocks = []
            for _ in range(self.num_res_blocks + 1):
                res_blocks.append(blocks.res(width + skip_widths.pop(), widths[level]))
                width = widths[level]
            levels.append(Level(res_blocks, self._attentions(level, width, len(res_blocks), blocks),
                                Upsample(width) if level > 0 else None))
        return levels

    def _attentions(self, level: int, width: int, count: int,
                    blocks: "_BlockFactory") -> Optional[list[AttentionBlock]]:
        if level not in self.attention_levels:
            return None
        return [blocks.attention(width) for _ in range(count)]

    def _check_sizes(self, widths: list[int], num_groups: int) -> None:
        for width in widths:
            if width % num_groups:
                raise ValueError(f"num_groups={num_groups} must divide every level's width; base_channels="
                                 f"{self.base_channels} x channel_mult={self.channel_mult} gives {widths}")
        factor = 2 ** (len(widths) - 1)
        if self.image_size % factor:
            raise ValueError(f"image_size={self.image_size} must be divisible by 2**(len(channel_mult) - 1) = "
                             f"{factor}")

    @property
    def downsampling_factor(self) -> int:
        """Input sides must be multiples of this (``2**(len(channel_mult) - 1)``)."""
        return 2 ** (len(self.channel_mult) - 1)

    def forward(self, x: torch.Tensor, timestep, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The network output for ``x`` ``[batch, in_channels, H, W]`` at ``timestep``.

        ``timestep``: a Python number or a tensor of shape ``[]`` or ``[batch]`` (integer or float; the embedding
        is continuous in ``t``). ``class_labels``: integers ``[batch]`` in ``[0, num_classes]`` (``num_classes`` =
        the null class); None means the null class for a class-conditional network.
        Returns ``[batch, out_channels, H, W]``.
        """
        self.check_input(x)
        labels = self.check_class_labels(class_labels, x.shape[0], x.device)
        return self.predict(x, self._timesteps(timestep, x), labels)

    def predict(self, x: torch.Tensor, timesteps: torch.Tensor, class_labels: Optional[torch.Tensor]) -> torch.Tensor:
        """The network on checked inputs: ``timesteps`` a ``[batch]`` tensor on ``x``'s device, ``class_labels``
        ``[batch]`` integers (None only for an unconditional network). :meth:`forward` validates and converts its
        arguments, then calls this; it holds no Python-number inputs, so ``torch.compile`` of it never recompiles
        for a new timestep."""
        emb = self.embedding(timesteps, class_labels)
        h = self.conv_in(x)
        skips = [h]
        for level in self.down:
            for i in range(len(level.res_blocks)):
                h = level.block(i, h, emb)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)
        h = self.mid.res_blocks[0](h, emb)
        h = self.mid.attentions[0](h)
        h = self.mid.res_blocks[1](h, emb)
        for level in self.up:
            for i in range(len(level.res_blocks)):
                h = level.block(i, torch.cat([h, skips.pop()], dim=1), emb)
            if level.resample is not None:
                h = level.resample(h)
        return self.conv_out(self.norm_out(h))

    def embedding(self, timesteps: torch.Tensor, class_labels: Optional[torch.Tensor]) -> torch.Tensor:
        """``SiLU(temb)``, the conditioning every residual block reads: ``temb = MLP(sinusoid(t)) (+ class emb)``."""
        first = self.time_embed[0].weight
        sinusoid = timestep_embedding(timesteps, self.base_channels, flip_sin_to_cos=self.flip_sin_to_cos,
                                      freq_shift=self.freq_shift)
        temb = self.time_embed(sinusoid.to(first.dtype))
        if self.class_embed is not None:
            temb = temb + self.class_embed(class_labels)
        return F.silu(temb)

    def check_input(self, x: object) -> None:
        check_float_tensor(x, "x")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be [batch, in_channels={self.in_channels}, H, W]; got {describe(x)}")
        factor = self.downsampling_factor
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"x's height and width must be multiples of 2**(len(channel_mult) - 1) = {factor}; "
                             f"got {describe(x)}")

    @staticmethod
    def _timesteps(timestep: object, x: torch.Tensor) -> torch.Tensor:
        """``[batch]`` timesteps on ``x``'s device (a Python number becomes a fill, never a host-to-device copy)."""
        batch = x.shape[0]
        if isinstance(timestep, torch.Tensor):
            if timestep.dtype in (torch.bool, torch.complex64, torch.complex128):
                raise TypeError(f"timestep must be a number or a real tensor; got {describe(timestep)}")
            if timestep.dim() > 1 or (timestep.dim() == 1 and timestep.shape[0] != batch):
                raise ValueError(f"timestep must have shape [] or [batch] = [{batch}]; got {describe(timestep)}")
            if timestep.device != x.device:
                if timestep.device.type == "cpu" and timestep.dim() == 0:
                    return torch.full((batch,), timestep.item(), dtype=torch.float32, device=x.device)
                raise ValueError(f"timestep must be on x's device ({x.device}); got {describe(timestep)}")
            return timestep.expand(batch) if timestep.dim() == 0 else timestep
        if isinstance(timestep, bool) or not isinstance(timestep, (int, float)):
            raise TypeError(f"timestep must be a number or a tensor, got {type(timestep).__name__}")
        return torch.full((batch,), float(timestep), dtype=torch.float32, device=x.device)

    def check_class_labels(self, class_labels: Optional[torch.Tensor], batch: int,
                           device: torch.device) -> Optional[torch.Tensor]:
        """:func:`check_class_labels` for this network's ``num_classes``."""
        return check_class_labels(class_labels, batch, self.num_classes, device)

    # ------------------------------------------------------------------------------------------------------------
    # diffusers UNet2DModel <-> UNet

    @classmethod
    def from_diffusers(cls, model_or_state_dict, config: Optional[Mapping] = None) -> "UNet":
        """The same network as a diffusers ``UNet2DModel`` of the DDPM architecture, with its weights (copied).

        ``model_or_state_dict`` is a ``UNet2DModel`` (its ``config`` is read; ``config`` must then be None) or its
        ``state_dict()`` together with ``config`` (the model's config as a mapping; keys it lacks take
        ``UNet2DModel``'s defaults). The result has the weights' dtype and device and, for a model, its
        training mode; it computes what the diffusers model computes for the same ``sample``, ``timestep`` and
        ``class_labels`` (``unet(x, t, labels)`` is ``model(x, t, labels).sample``).

        The DDPM configurations map: ``DownBlock2D`` / ``AttnDownBlock2D`` down blocks mirrored by ``UpBlock2D`` /
        ``AttnUpBlock2D`` up blocks, ``UNetMidBlock2D`` with attention, ``block_out_channels`` multiples of the
        first, "positional" time embedding (any ``flip_sin_to_cos`` / ``freq_shift``), ``downsample_padding`` 0 or
        1, conv resampling, SiLU, ``resnet_time_scale_shift="default"``, ``mid_block_scale_factor=1``, and a class
        embedding table (``num_class_embeds`` ``N`` is ``num_classes = N - 1``: the table's last row is this
        U-Net's null class). Any other setting raises ``ValueError`` naming the config key.
        """
        if isinstance(model_or_state_dict, nn.Module):
            if type(model_or_state_dict).__name__ != "UNet2DModel" or not hasattr(model_or_state_dict, "config"):
                raise TypeError(f"from_diffusers converts a diffusers UNet2DModel (or its state_dict with config=); "
                                f"got {type(model_or_state_dict).__name__}")
            if config is not None:
                raise ValueError("config must be None when a UNet2DModel is given (its own config is read)")
            config, state, training = model_or_state_dict.config, model_or_state_dict.state_dict(), \
                model_or_state_dict.training
        elif isinstance(model_or_state_dict, Mapping):
            if config is None:
                raise ValueError("config is required with a state_dict: pass the UNet2DModel's config (a mapping)")
            if not isinstance(config, Mapping):
                raise TypeError(f"config must be a mapping (a UNet2DModel's config), got {type(config).__name__}")
            state, training = model_or_state_dict, True
        else:
            raise TypeError(f"model_or_state_dict must be a diffusers UNet2DModel or its state_dict; got "
                            f"{type(model_or_state_dict).__name__}")
        kwargs = _unet_arguments_from_diffusers(_with_diffusers_defaults(config))
        with torch.device("meta"):
            unet = cls(**kwargs)
        unet.load_state_dict(unet._state_dict_from_diffusers(state), strict=True, assign=True)
        _check_materialized(unet)
        return unet.train(training)

    def diffusers_config(self) -> dict:
        """The ``UNet2DModel`` configuration of this network (``UNet2DModel(**unet.diffusers_config())``).

        ``ValueError`` naming ``num_heads`` when a fixed head count over attention blocks of different widths has
        no ``attention_head_dim`` equivalent (diffusers fixes the head dim)."""
        widths = self.widths
        attention_widths = {widths[level] for level in self.attention_levels} | {widths[-1]}
        if self.num_heads is None:
            head_dim = self.num_head_channels
        elif self.num_heads == 1:
            head_dim = None  # one head over each block's width (the DDPM checkpoints' setting)
        elif len(attention_widths) == 1:
            head_dim = attention_widths.pop() // self.num_heads
        else:
            raise ValueError(f"num_heads={self.num_heads} over attention blocks of widths {sorted(attention_widths)} "
                             "has no UNet2DModel equivalent (its attention_head_dim fixes the channels per head): "
                             "use num_head_channels")
        levels = range(len(widths))
        return dict(
            sample_size=self.image_size, in_channels=self.in_channels, out_channels=self.out_channels,
            center_input_sample=False, time_embedding_type="positional",
            freq_shift=int(self.freq_shift) if float(self.freq_shift).is_integer() else self.freq_shift,
            flip_sin_to_cos=self.flip_sin_to_cos,
            down_block_types=tuple("AttnDownBlock2D" if level in self.attention_levels else "DownBlock2D"
                                   for level in levels),
            mid_block_type="UNetMidBlock2D",
            up_block_types=tuple("AttnUpBlock2D" if level in self.attention_levels else "UpBlock2D"
                                 for level in reversed(levels)),
            block_out_channels=tuple(widths), layers_per_block=self.num_res_blocks, mid_block_scale_factor=1,
            downsample_padding=self.downsample_padding, downsample_type="conv", upsample_type="conv",
            dropout=self.dropout, act_fn="silu", attention_head_dim=head_dim, norm_num_groups=self.num_groups,
            attn_norm_num_groups=None, norm_eps=self.norm_eps, resnet_time_scale_shift="default",
            add_attention=True, class_embed_type=None,
            num_class_embeds=None if self.num_classes is None else self.num_classes + 1,
        )

    def to_diffusers_state_dict(self) -> dict:
        """This network's weights under a ``UNet2DModel``'s state_dict keys (copies; :meth:`diffusers_config`
        gives the matching model). Each attention block's qkv 1x1 convolution becomes ``to_q``/``to_k``/``to_v``
        and its output projection ``to_out.0`` (Linear layers)."""
        ours = self.state_dict()
        theirs, used = {}, set()
        for ours_name, their_name in self._diffusers_modules():
            for suffix in ("weight", "bias"):
                key = f"{ours_name}.{suffix}"
                if key in ours:
                    theirs[f"{their_name}.{suffix}"] = ours[key].detach().clone()
                    used.add(key)
        for ours_name, their_name in self._diffusers_attentions():
            for suffix in ("weight", "bias"):
                theirs[f"{their_name}.group_norm.{suffix}"] = ours[f"{ours_name}.norm.{suffix}"].detach().clone()
                qkv = ours[f"{ours_name}.qkv.{suffix}"].detach()
                for part, name in zip(qkv.flatten(1).chunk(3) if suffix == "weight" else qkv.chunk(3),
                                      ("to_q", "to_k", "to_v")):
                    theirs[f"{their_name}.{name}.{suffix}"] = part.clone()
                proj = ours[f"{ours_name}.proj.{suffix}"].detach()
                theirs[f"{their_name}.to_out.0.{suffix}"] = (proj.flatten(1) if suffix == "weight" else proj).clone()
                used.update(f"{ours_name}.{module}.{suffix}" for module in ("norm", "qkv", "proj"))
        missed = sorted(set(ours) - used)
        if missed:
            raise RuntimeError(f"no UNet2DModel counterpart for {missed}")  # a layer the mapping does not know
        return theirs

    def to_diffusers(self):
        """A diffusers ``UNet2DModel`` computing what this network computes (weights copied; this network's dtype,
        device and training mode)."""
        from diffusers import UNet2DModel

        with torch.device("meta"):
            model = UNet2DModel(**self.diffusers_config())
        model.load_state_dict(self.to_diffusers_state_dict(), strict=True, assign=True)
        _check_materialized(model)
        return model.train(self.training)

    def _diffusers_modules(self) -> list[tuple[str, str]]:
        """``(our module, its UNet2DModel counterpart)`` for the layers whose weights carry over unchanged."""
        pairs = [("time_embed.0", "time_embedding.linear_1"), ("time_embed.1", "time_embedding.linear_2"),
                 ("conv_in", "conv_in"), ("norm_out", "conv_norm_out"), ("conv_out", "conv_out")]
        if self.class_embed is not None:
            pairs.append(("class_embed", "class_embedding"))
        for ours, theirs, level in self._diffusers_levels():
            for j, block in enumerate(level.res_blocks):
                for our_layer, their_layer in _DIFFUSERS_RESNET_LAYERS:
                    if our_layer != "skip" or not isinstance(block.skip, nn.Identity):
                        pairs.append((f"{ours}.res_blocks.{j}.{our_layer}", f"{theirs}.resnets.{j}.{their_layer}"))
            if level.resample is not None:
                resamplers = "downsamplers" if ours.startswith("down") else "upsamplers"
                pairs.append((f"{ours}.resample.conv", f"{theirs}.{resamplers}.0.conv"))
        return pairs

    def _diffusers_attentions(self) -> list[tuple[str, str]]:
        """``(our AttentionBlock, its diffusers Attention)`` pairs."""
        return [(f"{ours}.attentions.{j}", f"{theirs}.attentions.{j}") for ours, theirs, level in
                self._diffusers_levels() if level.attentions is not None for j in range(len(level.attentions))]

    def _diffusers_levels(self) -> list[tuple[str, str, "Level"]]:
        return ([(f"down.{i}", f"down_blocks.{i}", level) for i, level in enumerate(self.down)]
                + [("mid", "mid_block", self.mid)]
                + [(f"up.{i}", f"up_blocks.{i}", level) for i, level in enumerate(self.up)])

    def _state_dict_from_diffusers(self, theirs: Mapping) -> dict:
        """A state_dict of this network from a ``UNet2DModel`` state_dict of the matching configuration (copies).
        ``ValueError`` listing the keys that are missing, unexpected, or of another shape."""
        ours_shapes = {name: tuple(t.shape) for name, t in self.state_dict().items()}
        ours, used = {}, set()

        def take(key: str) -> torch.Tensor:
            if key not in theirs:
                raise ValueError(f"the UNet2DModel state_dict has no {key!r}: its layers do not match its config")
            used.add(key)
            return theirs[key].detach()

        for ours_name, their_name in self._diffusers_modules():
            for suffix in ("weight", "bias"):
                if f"{ours_name}.{suffix}" in ours_shapes:
                    ours[f"{ours_name}.{suffix}"] = take(f"{their_name}.{suffix}").clone()
        for ours_name, their_name in self._diffusers_attentions():
            for suffix in ("weight", "bias"):
                ours[f"{ours_name}.norm.{suffix}"] = take(f"{their_name}.group_norm.{suffix}").clone()
                qkv = torch.cat([take(f"{their_name}.{name}.{suffix}") for name in ("to_q", "to_k", "to_v")])
                proj = take(f"{their_name}.to_out.0.{suffix}")
                ours[f"{ours_name}.qkv.{suffix}"] = qkv[:, :, None, None] if suffix == "weight" else qkv
                ours[f"{ours_name}.proj.{suffix}"] = (proj[:, :, None, None] if suffix == "weight" else proj).clone()
        unexpected = sorted(set(theirs) - used)
        if unexpected:
            raise ValueError(f"the UNet2DModel state_dict holds weights this conversion does not know: "
                             f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        wrong = [f"{name}: {tuple(t.shape)}, expected {ours_shapes[name]}" for name, t in ours.items()
                 if tuple(t.shape) != ours_shapes[name]]
        if wrong:
            raise ValueError(f"the UNet2DModel state_dict does not match its config: {'; '.join(wrong[:4])}")
        return ours

def _zero_init(conv: nn.Conv2d) -> None:
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)


def _positive(value: object, name: str) -> int:
    number = check_int(value, name)
    if number < 1:
        raise ValueError(f"{name}={number} must be a positive integer")
    return number


def _groups(num_groups: object, widths: dict) -> int:
    """GroupNorm's group count: a positive int dividing every width it normalizes (``{name: width}``)."""
    groups = _positive(num_groups, "num_groups")
    for name, width in widths.items():
        if width % groups:
            raise ValueError(f"num_groups={groups} must divide {name}={width}")
    return groups


def _sequence(value: object, name: str) -> tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of ints, got {type(value).__name__} {value!r}")
    return tuple(value)


def _attention_levels(attention_resolutions: object, level_sides: list[int]) -> set[int]:
    """Indices of the levels whose side (for ``image_size`` inputs) is in ``attention_resolutions``."""
    resolutions = [_positive(r, "attention_resolutions entries")
                   for r in _sequence(attention_resolutions, "attention_resolutions")]
    unknown = [r for r in resolutions if r not in level_sides]
    if unknown:
        raise ValueError(f"attention_resolutions={tuple(resolutions)} must be sides the levels have; {unknown} "
                         f"is not among {level_sides} (image_size // 2**level)")
    return {level for level, side in enumerate(level_sides) if side in resolutions}


def _head_count(channels: int, num_heads: Optional[int], num_head_channels: int) -> int:
    """Heads of an attention block over ``channels``: ``num_heads``, or ``channels // num_head_channels``."""
    if num_heads is not None:
        heads = _positive(num_heads, "num_heads")
        if channels % heads:
            raise ValueError(f"num_heads={heads} must divide the attention width channels={channels}")
        return heads
    head_channels = _positive(num_head_channels, "num_head_channels")
    if channels % head_channels:
        raise ValueError(f"num_head_channels={head_channels} must divide the attention width channels={channels}")
    return channels // head_channels


def _largest_divisor(width: int, at_most: int) -> int:
    """The largest divisor of ``width`` that is ``<= at_most`` (a suggestion for an error message)."""
    return max(d for d in range(1, min(width, at_most) + 1) if width % d == 0)


def _downsample_padding(value: object, name: str) -> int:
    padding = check_int(value, name)
    if padding not in (0, 1):
        raise ValueError(f"{name}={padding} is not supported; expected 1 (one pixel on every side) or 0 (one row "
                         "and column at the bottom/right, TensorFlow's 'SAME')")
    return padding


# ----------------------------------------------------------------------------------------------------------------
# diffusers UNet2DModel configurations

# (our ResBlock layer, diffusers ResnetBlock2D layer)
_DIFFUSERS_RESNET_LAYERS = (("norm1", "norm1"), ("conv1", "conv1"), ("temb_proj", "time_emb_proj"),
                            ("norm2", "norm2"), ("conv2", "conv2"), ("skip", "conv_shortcut"))


def _with_diffusers_defaults(config: Mapping) -> dict:
    """``config`` with the keys it lacks set to ``UNet2DModel``'s defaults (a model's own config has them all)."""
    config = dict(config)
    from diffusers import UNet2DModel

    for name, parameter in inspect.signature(UNet2DModel.__init__).parameters.items():
        if name != "self" and parameter.default is not inspect.Parameter.empty:
            config.setdefault(name, parameter.default)
    return config


def _unsupported(key: str, value: object, expected: str) -> ValueError:
    return ValueError(f"cannot convert this UNet2DModel: {key}={value!r} is not supported; UNet.from_diffusers "
                      f"takes {expected}")


def _unet_arguments_from_diffusers(config: dict) -> dict:
    """The :class:`UNet` arguments of a ``UNet2DModel`` config (every key the architecture depends on checked)."""
    fixed = {"center_input_sample": (False, "False"), "time_embedding_type": ("positional", "'positional'"),
             "mid_block_type": ("UNetMidBlock2D", "'UNetMidBlock2D'"), "mid_block_scale_factor": (1, "1"),
             "downsample_type": ("conv", "'conv'"), "upsample_type": ("conv", "'conv'"),
             "resnet_time_scale_shift": ("default", "'default'"), "add_attention": (True, "True"),
             "class_embed_type": (None, "None (a class embedding table, num_class_embeds)")}
    for key, (value, expected) in fixed.items():
        if config[key] != value:
            raise _unsupported(key, config[key], expected)
    if config["act_fn"] not in ("silu", "swish"):
        raise _unsupported("act_fn", config["act_fn"], "'silu' (or 'swish')")
    widths = config["block_out_channels"]
    if (isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence) or not widths
            or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths)):
        raise _unsupported("block_out_channels", widths, "a non-empty sequence of positive ints")
    widths, base = tuple(widths), widths[0]
    if any(width % base for width in widths):
        raise _unsupported("block_out_channels", widths, "widths that are multiples of the first (UNet's "
                                                         "base_channels x channel_mult)")
    if config["time_embedding_dim"] not in (None, 4 * base):
        raise _unsupported("time_embedding_dim", config["time_embedding_dim"],
                           f"None or 4 * block_out_channels[0] = {4 * base}")
    attention_levels = _diffusers_attention_levels(config, len(widths))
    layers = config["layers_per_block"]
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise _unsupported("layers_per_block", layers, "a positive int")
    if config["downsample_padding"] not in (0, 1):
        raise _unsupported("downsample_padding", config["downsample_padding"], "0 or 1")
    groups = config["norm_num_groups"]
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or any(w % groups for w in widths):
        raise _unsupported("norm_num_groups", groups, f"a positive int dividing every width of {widths}")
    if config["attn_norm_num_groups"] not in (None, groups):
        raise _unsupported("attn_norm_num_groups", config["attn_norm_num_groups"], f"None or norm_num_groups={groups}")
    head_dim = config["attention_head_dim"]
    attention_widths = sorted({widths[level] for level in attention_levels} | {widths[-1]})
    if head_dim is not None and (isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1
                                 or any(width % head_dim for width in attention_widths)):
        raise _unsupported("attention_head_dim", head_dim,
                           f"None or a positive int dividing the attention blocks' widths {attention_widths}")
    class_embeds = config["num_class_embeds"]
    if class_embeds is not None and (isinstance(class_embeds, bool) or not isinstance(class_embeds, int)
                                     or class_embeds < 2):
        raise _unsupported("num_class_embeds", class_embeds, "None or an int >= 2 (the last row is the null class)")
    factor = 2 ** (len(widths) - 1)
    size = config["sample_size"]
    if isinstance(size, (tuple, list)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if size is None:
        size = factor
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % factor:
        raise _unsupported("sample_size", config["sample_size"],
                           f"None or a square side divisible by 2**(len(block_out_channels) - 1) = {factor}")
    return dict(
        in_channels=config["in_channels"], out_channels=config["out_channels"], base_channels=base,
        channel_mult=tuple(width // base for width in widths), num_res_blocks=config["layers_per_block"],
        attention_resolutions=tuple(size // 2**level for level in sorted(attention_levels)),
        dropout=config["dropout"], num_groups=groups,
        num_heads=1 if head_dim is None else None, num_head_channels=64 if head_dim is None else head_dim,
        image_size=size, num_classes=None if class_embeds is None else class_embeds - 1,
        norm_eps=config["norm_eps"], flip_sin_to_cos=config["flip_sin_to_cos"], freq_shift=config["freq_shift"],
        downsample_padding=config["downsample_padding"],
    )


def _diffusers_attention_levels(config: dict, num_levels: int) -> set[int]:
    """The levels with attention, from ``down_block_types`` (``up_block_types`` must mirror them)."""
    down, up = config["down_block_types"], config["up_block_types"]
    for key, types, kinds in (("down_block_types", down, ("DownBlock2D", "AttnDownBlock2D")),
                              ("up_block_types", up, ("UpBlock2D", "AttnUpBlock2D"))):
        if isinstance(types, (str, bytes)) or not isinstance(types, Sequence) or len(types) != num_levels \
                or any(kind not in kinds for kind in types):
            raise _unsupported(key, types, f"{num_levels} entries (one per block_out_channels entry) of "
                                           f"{' / '.join(kinds)}")
    levels = {level for level, kind in enumerate(down) if kind == "AttnDownBlock2D"}
    mirrored = {num_levels - 1 - i for i, kind in enumerate(up) if kind == "AttnUpBlock2D"}
    if mirrored != levels:
        raise _unsupported("up_block_types", up, f"the mirror of down_block_types={tuple(down)} (attention at the "
                                                 "same levels in the decoder as in the encoder)")
    return levels


def _check_materialized(module: nn.Module) -> None:
    """Every parameter and buffer of a module built on the meta device was loaded."""
    left = [name for name, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"the conversion left {left[:4]} unloaded")
