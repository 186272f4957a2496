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

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from genkernels.kernels.attention import MAX_HEAD_DIM, MIN_HEAD_DIM, flash_attention
from genkernels.kernels.checks import (
    check_float_tensor,
    check_int,
    check_integer_tensor,
    check_real,
    check_values,
    describe,
)

from .layers import GroupNormAct, LinearBiasAct


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal timestep embedding ``[batch, dim]`` in fp32 (Vaswani et al. 2017, sec. 3.5, as in the DDPM code).

    With ``half = dim // 2`` and frequencies ``w_k = max_period ** (-k / (half - 1))``, ``k = 0 .. half - 1``:
    ``emb[:, k] = sin(t * w_k)`` and ``emb[:, half + k] = cos(t * w_k)`` (a zero column is appended for odd ``dim``).
    ``timesteps`` is ``[batch]``, integer or float.
    """
    dim = _positive(dim, "dim")
    max_period = check_real(max_period, "max_period", low=0.0, low_inclusive=False)
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) / max(half - 1, 1)
    frequencies = torch.exp(-math.log(max_period) * exponent)
    angles = timesteps.to(torch.float32)[:, None] * frequencies[None, :]
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


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
    """A 3x3 convolution with stride 2."""

    def __init__(self, channels: int):
        super().__init__()
        channels = _positive(channels, "channels")
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
            self-attention runs; each must be one of the levels' sides ``image_size // 2**i``.
        dropout: dropout probability inside the residual blocks.
        num_groups: GroupNorm groups; must divide ``base_channels * m`` for every multiplier ``m``.
        num_heads: heads of every attention block; when None, ``channels // num_head_channels`` heads.
        num_head_channels: channels per head when ``num_heads`` is None.
        image_size: side of the training images, to place ``attention_resolutions`` (inputs of other sizes divisible
            by ``2**(len(channel_mult) - 1)`` run too, with attention at the same levels).
        num_classes: number of classes for class conditioning (None: unconditional); class ``num_classes`` is the
            null class (unconditional prediction for classifier-free guidance).
        norm_eps: GroupNorm epsilon.
    """

    def __init__(self, in_channels: int = 3, out_channels: Optional[int] = None, base_channels: int = 128,
                 channel_mult: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attention_resolutions: Sequence[int] = (16,), dropout: float = 0.1, num_groups: int = 32,
                 num_heads: Optional[int] = None, num_head_channels: int = 64, image_size: int = 32,
                 num_classes: Optional[int] = None, norm_eps: float = 1e-5):
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
        dropout = check_real(dropout, "dropout", low=0.0, high=1.0)
        norm_eps = check_real(norm_eps, "norm_eps", low=0.0, low_inclusive=False)
        num_groups = _positive(num_groups, "num_groups")
        if num_heads is not None:
            num_heads = _positive(num_heads, "num_heads")
        num_head_channels = _positive(num_head_channels, "num_head_channels")
        widths = [self.base_channels * m for m in self.channel_mult]
        self._check_sizes(widths, num_groups)
        level_sides = [self.image_size // 2**i for i in range(len(widths))]
        self.attention_levels = _attention_levels(attention_resolutions, level_sides)
        temb = 4 * self.base_channels
        blocks = _BlockFactory(temb, dropout, num_groups, norm_eps, num_heads, num_head_channels)

        self.time_embed = nn.Sequential(LinearBiasAct(self.base_channels, temb, act="silu"), nn.Linear(temb, temb))
        self.class_embed = nn.Embedding(self.num_classes + 1, temb) if self.num_classes is not None else None
        self.conv_in = nn.Conv2d(self.in_channels, self.base_channels, 3, padding=1)
        self.down, skip_widths = self._encoder(widths, blocks)
        width = widths[-1]
        self.mid = Level([blocks.res(width, width), blocks.res(width, width)], [blocks.attention(width)], None)
        self.up = self._decoder(widths, skip_widths, blocks)
        self.norm_out = GroupNormAct(num_groups, widths[0], eps=norm_eps, activation="silu")
        self.conv_out = nn.Conv2d(widths[0], self.out_channels, 3, padding=1)
        _zero_init(self.conv_out)

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
                                None if last else Downsample(width)))
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
        temb = self.time_embed(timestep_embedding(timesteps, self.base_channels).to(first.dtype))
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
        """Validated labels ``[batch]`` (the null class when None on a class-conditional network). Values are
        checked on the host for CPU tensors and asserted on the device otherwise (no synchronization)."""
        if class_labels is None:
            if self.num_classes is None:
                return None
            return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        if self.num_classes is None:
            raise ValueError("class_labels were given but the network is unconditional (num_classes=None)")
        check_integer_tensor(class_labels, "class_labels")
        if class_labels.shape != (batch,):
            raise ValueError(f"class_labels must have shape [batch] = [{batch}]; got {describe(class_labels)}")
        if class_labels.device != device:
            raise ValueError(f"class_labels must be on x's device ({device}); got {describe(class_labels)}")
        check_values(class_labels, "class_labels", (class_labels >= 0) & (class_labels <= self.num_classes),
                     f"lie in [0, num_classes={self.num_classes}] (num_classes is the null class)")
        return class_labels


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
    """Heads of an attention block over ``channels``, with a head dim :func:`flash_attention` supports."""
    if num_heads is not None:
        heads = _positive(num_heads, "num_heads")
        if channels % heads:
            raise ValueError(f"num_heads={heads} must divide the attention width {channels}")
    else:
        head_channels = _positive(num_head_channels, "num_head_channels")
        if channels % head_channels:
            raise ValueError(f"num_head_channels={head_channels} must divide the attention width {channels}")
        heads = channels // head_channels
    head_dim = channels // heads
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"attention head dim {channels} / {heads} heads = {head_dim} must lie in "
                         f"[{MIN_HEAD_DIM}, {MAX_HEAD_DIM}] (set num_heads or num_head_channels)")
    return heads
