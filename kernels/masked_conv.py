"""Masked 2-D convolution of PixelCNN (van den Oord et al. 2016, "Pixel Recurrent Neural Networks", section 3.4).

A PixelCNN makes a convolution autoregressive over pixels in raster order (and over the R, G, B sub-pixels of a
pixel) by zeroing part of a ``k x k`` kernel: with ``p = k // 2`` the centre is tap ``(p, p)``, and

- taps in the rows above the centre (``dy < p``) are kept whole,
- in the centre row the taps left of the centre (``dx < p``) are kept,
- the centre tap is dropped by mask A and kept by mask B; with ``color_channels=3`` the input and output channels
  are split into R, G, B thirds and at the centre tap output group ``g`` sees input groups ``< g`` (mask A) or
  ``<= g`` (mask B),
- everything right of or below the centre is dropped.

The kernels walk only the kept taps (``p * k + p`` of them, plus the centre), so a 7x7 kernel costs 24-25 taps
instead of 49: masked taps are never read, and their weight's gradient is exactly zero. Each is an implicit GEMM: a
tile of output pixels times a tile of output channels, accumulated in fp32 with ``tl.dot``, one (kept tap, channel
block) per step of a single loop, reading the zero padding through masked loads (no padded copy). The launcher packs
the weight once per call into the layout the reduction walks (``[kept taps, C_in, C_out]``, contiguous) and hands
the kernels channels_last activations, so tiles load 16 bytes at a time; a tile's pixel rows and columns are
computed once, each tap's shift is a scalar. At a colour centre tap a tile of produced channels never straddles a
colour group, so the whole tile sees the same reduced channels and only those are read: nothing hidden by the mask
(a masked weight entry, a later sub-pixel, a later pixel) is ever multiplied into an output, and NaN/Inf there
cannot reach it. The eager reference keeps the same promise by convolving only the kept taps. fp32 tiles use TF32
on a GPU when ``torch.backends.cudnn.allow_tf32`` is set (PyTorch's default for its own fp32 convolutions), exact
fp32 otherwise. Offsets are int32, or int64 when a tensor spans 2**31 elements. Tiles, pipeline depth and the
weight gradient's split of its pixel reduction come from the device's SM count and shared memory
(``launch.device_limits``), so they fit every architecture from sm_80 on.

FLOPs per forward call, counting kept taps only: ``2 * N * C_out * C_in * kept_taps * H * W`` (the centre tap of a
colour mask counts fully). The backward does the same twice (input and weight gradients).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .checks import check_choice, check_float_tensor, check_int, check_same_device, check_same_dtype, describe
from . import launch
from .launch import launch_setting
from .runtime import choose_impl, compute_dtype, interpreter_enabled
from .triton_helpers import dot

MASK_TYPES = ("A", "B")
COLOR_CHANNELS = (1, 3)
# Output pixels per tile: the M side of the implicit GEMM.
BLOCK_PIXELS = 64
# Largest channel tiles; smaller channel counts get the next power of two (at least 16, tl.dot's minimum).
MAX_BLOCK_CHANNELS_OUT = 128
MAX_BLOCK_CHANNELS_IN = 64
# Pixels per step of the weight gradient's reduction (halved for fp32 operands, to keep the pipeline in shared
# memory), and the CTAs per SM its split is sized for (4 warps at up to 255 registers: at least 2 fit; the
# compiled-code report shows the figure).
WEIGHT_GRAD_BLOCK_PIXELS = 64
# Registers per thread of the compiled tiles (sm_90, from the compiled-code report), by produced-channel tile for
# the gather kernel: what the launchers' occupancy (and so wave) estimates use.
GATHER_REGISTERS = {128: 136, 64: 96, 32: 88, 16: 88}
# How far the compiled registers may exceed those estimates (another Triton release) with the occupancy unchanged.
REGISTER_MARGIN = 32
WEIGHT_GRAD_BASE_REGISTERS = 96


# ----------------------------------------------------------------------------------------------------------------
# Eager reference: the specification, the fallback and the test oracle
# ----------------------------------------------------------------------------------------------------------------
def masked_conv2d_mask(out_channels: int, in_channels: int, kernel_size: int, mask_type: str = "B",
                       color_channels: int = 1, *, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The 0/1 mask ``[out_channels, in_channels, k, k]`` of a PixelCNN convolution (the module docstring's rule).

    With ``p = k // 2``: ``mask[:, :, dy, dx] = 1`` for ``dy < p`` or (``dy == p`` and ``dx < p``); at the centre
    ``mask[o, i, p, p] = [group(i) < group(o)]`` (A) or ``[group(i) <= group(o)]`` (B), where ``group`` is the
    colour third of a channel (every channel is group 0 when ``color_channels == 1``).
    """
    pad = kernel_size // 2
    mask = torch.zeros(out_channels, in_channels, kernel_size, kernel_size, device=device, dtype=dtype)
    mask[:, :, :pad, :] = 1
    mask[:, :, pad, :pad] = 1
    out_group = torch.arange(out_channels, device=device) * color_channels // out_channels
    in_group = torch.arange(in_channels, device=device) * color_channels // in_channels
    sees = in_group[None, :] < out_group[:, None] if mask_type == "A" else in_group[None, :] <= out_group[:, None]
    mask[:, :, pad, pad] = sees.to(dtype)
    return mask


def masked_conv2d_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                            mask_type: str = "B", color_channels: int = 1) -> torch.Tensor:
    """The masked convolution in plain PyTorch, "same" padding, stride 1 (PixelCNN, van den Oord et al. 2016,
    eq. 1-2: ``p(x) = prod_i p(x_i | x_<i)`` needs every output to see only earlier pixels and sub-pixels):

        out[n, o, h, w] = bias[o] + sum_{(i, dy, dx) kept for o} weight[o, i, dy, dx] * x[n, i, h + dy - p, w + dx - p]

    with zeros outside the image: ``F.conv2d(x, mask * weight, bias, padding=p)`` for finite values. Only the
    kept taps are ever read, of the weight and of ``x``: a convolution over the rows above the centre (``x``
    padded above and cropped below, so the rows below are never touched), one over the centre row left of the
    centre (and the centre itself for mask B without colour groups), and with colour groups a 1x1 convolution
    per output group over the input groups it sees. So NaN or Inf in masked weight entries, or in the pixels and
    sub-pixels an output may not see, never reach it, and masked weight entries get exactly zero gradient
    (autograd of slices). Computes in fp32 (fp64 for fp64 inputs) and returns ``x``'s dtype. Zero-size dims
    give the math's shape (zero input channels: the bias everywhere).
    """
    dtype = compute_dtype(x.dtype)
    xc, wc = x.to(dtype), weight.to(dtype)
    bc = None if bias is None else bias.to(dtype)
    out_channels, in_channels, kernel_size, _ = weight.shape
    if x.numel() == 0 or out_channels == 0:
        # F.conv2d rejects some of these (zero out-channels, an empty image) and drops the bias for others (zero
        # in-channels). Every output sums nothing: the bias or zeros, with x and weight kept in the graph.
        out = torch.einsum("oi,nihw->nohw", wc[:, :, 0, 0], xc)
        return (out if bc is None else out + bc[None, :, None, None]).to(x.dtype)
    pad = kernel_size // 2
    centre_whole = mask_type == "B" and color_channels == 1
    out = None
    if pad > 0:  # the rows above the centre, every column: rows h - p .. h - 1
        out = F.conv2d(F.pad(xc, (pad, pad, pad, -1)), wc[:, :, :pad, :], bc)
        bc = None
    row_taps = pad + int(centre_whole)
    if row_taps > 0:  # the centre row: columns w - p .. w - 1, and w itself when the centre is kept whole
        term = F.conv2d(F.pad(xc, (pad, row_taps - pad - 1, 0, 0)), wc[:, :, pad:pad + 1, :row_taps], bc)
        out = term if out is None else out + term
        bc = None
    if color_channels == 3:
        # the centre tap by colour group: output group g sees input groups < g (A) or <= g (B)
        in_group, out_group = in_channels // 3, out_channels // 3
        pieces = []
        for group in range(3):
            visible = (group + int(mask_type == "B")) * in_group
            outputs = slice(group * out_group, (group + 1) * out_group)
            if visible == 0:
                pieces.append(xc.new_zeros((x.shape[0], out_group) + tuple(x.shape[2:])))
            else:
                pieces.append(F.conv2d(xc[:, :visible], wc[outputs, :visible, pad:pad + 1, pad:pad + 1]))
        term = torch.cat(pieces, dim=1)
        out = term if out is None else out + term
    if out is None:  # a 1x1 mask-A kernel without colour groups keeps no tap: the bias alone
        # (a sum over no input channel: zeros that keep x and weight in the graph without reading them)
        out = torch.einsum("oi,nihw->nohw", wc[:, :0, 0, 0], xc[:, :0])
    if bc is not None:
        out = out + bc[None, :, None, None]
    return out.to(x.dtype)


def kept_taps(kernel_size: int, mask_type: str, color_channels: int) -> int:
    """How many of the ``k * k`` taps the mask keeps (for any channel pair): ``p * k + p``, plus the centre unless
    the mask is A without colour groups."""
    pad = kernel_size // 2
    has_centre = not (mask_type == "A" and color_channels == 1)
    return pad * kernel_size + pad + int(has_centre)


def masked_conv2d_flops(x_shape, weight_shape, mask_type: str, color_channels: int) -> int:
    """``2 * N * C_out * C_in * kept_taps * H * W``: the multiply-adds the kernel performs in the forward."""
    batch, in_channels, height, width = x_shape
    out_channels, _, kernel_size, _ = weight_shape
    return 2 * batch * out_channels * in_channels * kept_taps(kernel_size, mask_type, color_channels) * height * width


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _masked_conv2d_gather_kernel(
    src_ptr, w_ptr, bias_ptr, out_ptr,
    total_pixels, plane, height, width, n_reduce, n_out,
    src_sn, src_sc, src_sh, src_sw, bias_s,
    reduce_group_size, produced_group_size, group_tiles,
    KSIZE: tl.constexpr, MASK_A: tl.constexpr, COLOR: tl.constexpr, TRANSPOSED: tl.constexpr,
    HAS_BIAS: tl.constexpr, NATIVE_DOT: tl.constexpr, IEEE: tl.constexpr, INDEX64: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_REDUCE: tl.constexpr,
):
    """The forward (``TRANSPOSED=False``: src = x, reduce over input channels, taps read at ``+(d - p)``) and the
    input gradient (``TRANSPOSED=True``: src = grad_out, reduce over output channels, taps read at ``-(d - p)``)
    as one implicit GEMM: ``out[P, O] = sum_taps src[P + shift, R] @ w[tap, R, O]``.

    ``w`` is the weight packed by the launcher as ``[kept taps, R, O]``, contiguous (the kept taps are the first
    ``kept_taps`` of the row-major ``(dy, dx)`` order), so a tile of it is 16-byte rows of produced channels; the
    source is read through its strides (the launcher hands it channels_last, so a tile is 16-byte rows of
    reduced channels). A program's rows are ``BLOCK_P`` consecutive (sample, pixel) indices whose row and column
    are computed once; every (tap, channel block) is one iteration of a single loop, the tap's shift a scalar and
    the image edges a mask. A program's produced channels never straddle a colour group (``group_tiles`` tiles
    per group of ``produced_group_size``), so at a colour centre tap the whole tile sees the same reduced channels
    ``[lo, hi)``: only those are read and multiplied, and nothing the mask hides (a masked weight entry, a hidden
    sub-pixel) reaches an output. Offsets are int32 unless ``INDEX64`` (a tensor spans 2**31 elements or more)."""
    PAD: tl.constexpr = KSIZE // 2
    SIGN: tl.constexpr = -1 if TRANSPOSED else 1
    A_SHIFT: tl.constexpr = 1 if MASK_A else 0
    # taps the main loop walks: the rows above the centre, the centre row's left part, and the centre itself when
    # every channel pair keeps it (mask B without colour groups)
    MAIN_TAPS: tl.constexpr = PAD * KSIZE + PAD + (1 if (not MASK_A and not COLOR) else 0)
    CENTRE: tl.constexpr = PAD * KSIZE + PAD
    pid_p = tl.program_id(0)
    pid_o = tl.program_id(1)
    group = pid_o // group_tiles
    out_channel = group * produced_group_size + (pid_o - group * group_tiles) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    out_ok = out_channel < (group + 1) * produced_group_size
    if INDEX64:
        flat = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    else:
        flat = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pixel_ok = flat < total_pixels
    n = flat // plane
    pixel = flat - n * plane
    row = pixel // width
    col = pixel - row * width
    src_pixel = n * src_sn + row * src_sh + col * src_sw
    channels = tl.arange(0, BLOCK_REDUCE)
    tap_size = n_reduce * n_out
    acc = tl.zeros((BLOCK_P, BLOCK_OUT), dtype=tl.float32)

    reduce_blocks = tl.cdiv(n_reduce, BLOCK_REDUCE)
    for step in range(0, MAIN_TAPS * reduce_blocks):
        tap = step // reduce_blocks
        channel = (step - tap * reduce_blocks) * BLOCK_REDUCE + channels
        dy = tap // KSIZE
        shift_y = SIGN * (dy - PAD)
        shift_x = SIGN * (tap - dy * KSIZE - PAD)
        src_row = row + shift_y
        src_col = col + shift_x
        in_image = pixel_ok & (src_row >= 0) & (src_row < height) & (src_col >= 0) & (src_col < width)
        channel_ok = channel < n_reduce
        src = tl.load(src_ptr + (src_pixel + (shift_y * src_sh + shift_x * src_sw))[:, None]
                      + channel[None, :] * src_sc, mask=in_image[:, None] & channel_ok[None, :], other=0.0)
        w = tl.load(w_ptr + tap * tap_size + channel[:, None] * n_out + out_channel[None, :],
                    mask=channel_ok[:, None] & out_ok[None, :], other=0.0)
        acc = dot(src, w, acc, NATIVE_DOT, IEEE)

    if COLOR:
        # the centre tap under the colour rule. Forward: output group g sees input groups < g (A) or <= g (B).
        # Transposed: input group g is seen by output groups > g (A) or >= g (B).
        if TRANSPOSED:
            lo = (group + A_SHIFT) * reduce_group_size
            hi = n_reduce
        else:
            lo = 0
            hi = (group + 1 - A_SHIFT) * reduce_group_size
        for start in range(lo, hi, BLOCK_REDUCE):
            channel = start + channels
            channel_ok = channel < hi
            src = tl.load(src_ptr + src_pixel[:, None] + channel[None, :] * src_sc,
                          mask=pixel_ok[:, None] & channel_ok[None, :], other=0.0)
            w = tl.load(w_ptr + CENTRE * tap_size + channel[:, None] * n_out + out_channel[None, :],
                        mask=channel_ok[:, None] & out_ok[None, :], other=0.0)
            acc = dot(src, w, acc, NATIVE_DOT, IEEE)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + out_channel * bias_s, mask=out_ok, other=0.0).to(tl.float32)[None, :]
    out_offsets = (n * n_out * plane + pixel)[:, None] + out_channel[None, :] * plane
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=pixel_ok[:, None] & out_ok[None, :])


@triton.jit
def _grad_out_patch(grad_out_ptr, block, tiles_per_sample, tiles_w, patch_row, patch_col, height, width,
                    out_channel, co_ok, g_sn, g_sc, g_sh, g_sw, INDEX64: tl.constexpr, BLOCK_H: tl.constexpr,
                    BLOCK_W: tl.constexpr):
    """Pixel block ``block`` of the weight gradient's walk (a ``BLOCK_H x BLOCK_W`` patch of one sample, numbered
    sample-major): its sample ``n`` (int64 with ``INDEX64``), the patch's rows, columns and in-image mask, and the
    ``[BLOCK_CO, BLOCK_P]`` tile of ``grad_out`` there. Int32 scalar divisions only."""
    n = block // tiles_per_sample
    tile = block - n * tiles_per_sample
    tile_y = tile // tiles_w
    row = tile_y * BLOCK_H + patch_row
    col = (tile - tile_y * tiles_w) * BLOCK_W + patch_col
    if INDEX64:
        n = n.to(tl.int64)
    pixel_ok = (row < height) & (col < width)
    grad = tl.load(grad_out_ptr + (n * g_sn + row * g_sh + col * g_sw)[None, :] + out_channel[:, None] * g_sc,
                   mask=co_ok[:, None] & pixel_ok[None, :], other=0.0)
    return n, row, col, pixel_ok, grad


@triton.jit
def _masked_conv2d_weight_grad_kernel(
    x_ptr, grad_out_ptr, grad_w_ptr, grad_b_ptr,
    in_channels, out_channels, height, width, num_taps,
    tiles_w, tiles_per_sample, total_blocks, blocks_per_split,
    x_sn, x_sc, x_sh, x_sw,
    g_sn, g_sc, g_sh, g_sw,
    in_group_size, out_group_size,
    KSIZE: tl.constexpr, MASK_A: tl.constexpr, COLOR: tl.constexpr, NATIVE_DOT: tl.constexpr, IEEE: tl.constexpr,
    INDEX64: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_CO: tl.constexpr,
    BLOCK_CI: tl.constexpr,
):
    """``grad_w[o, i, tap] = sum_{n, h, w} grad_out[n, o, h, w] * x[n, i, h + dy - p, w + dx - p]`` for one kept
    tap and one ``[BLOCK_CO, BLOCK_CI]`` tile, over this split's contiguous share of the pixel blocks (a block is a
    ``BLOCK_H x BLOCK_W`` patch of one sample: its rows and columns are shifts and masks of one ``arange``, and the
    block's sample and corner come from int32 scalar divisions, so the loop holds no 64-bit division). Writes fp32
    partial sums ``[num_splits, num_taps, C_out, C_in]`` (and ``[num_splits, C_out]`` for the bias from the programs
    of tap 0 and the first input-channel block); the launcher adds the splits in a fixed order (deterministic). At a
    colour centre tap the pairs the rule masks are selected to exactly zero (``tl.where``: NaN there stays out)."""
    PAD: tl.constexpr = KSIZE // 2
    BLOCK_P: tl.constexpr = BLOCK_H * BLOCK_W
    tap = tl.program_id(0)
    split = tl.program_id(2)
    ci_blocks = tl.cdiv(in_channels, BLOCK_CI)
    co_block = tl.program_id(1) // ci_blocks
    ci_block = tl.program_id(1) - co_block * ci_blocks
    dy = tap // KSIZE
    shift_y = dy - PAD
    shift_x = tap - dy * KSIZE - PAD
    out_channel = co_block * BLOCK_CO + tl.arange(0, BLOCK_CO)
    in_channel = ci_block * BLOCK_CI + tl.arange(0, BLOCK_CI)
    co_ok = out_channel < out_channels
    ci_ok = in_channel < in_channels
    with_bias = (tap == 0) & (ci_block == 0)
    patch = tl.arange(0, BLOCK_P)
    patch_row = patch // BLOCK_W
    patch_col = patch % BLOCK_W

    acc = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_CO,), dtype=tl.float32)
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, total_blocks)
    for block in range(first, last):
        n, row, col, pixel_ok, grad = _grad_out_patch(grad_out_ptr, block, tiles_per_sample, tiles_w, patch_row,
                                                      patch_col, height, width, out_channel, co_ok, g_sn, g_sc,
                                                      g_sh, g_sw, INDEX64, BLOCK_H, BLOCK_W)
        src_row = row + shift_y
        src_col = col + shift_x
        in_image = pixel_ok & (src_row >= 0) & (src_row < height) & (src_col >= 0) & (src_col < width)
        src = tl.load(x_ptr + (n * x_sn + src_row * x_sh + src_col * x_sw)[:, None] + in_channel[None, :] * x_sc,
                      mask=in_image[:, None] & ci_ok[None, :], other=0.0)
        acc = dot(grad, src, acc, NATIVE_DOT, IEEE)

    if with_bias:
        # the bias gradient: the same pixel blocks once more, in the programs of tap 0 and the first input-channel
        # block only (kept out of the main loop, whose registers and pipeline it would otherwise share)
        for block in range(first, last):
            grad = _grad_out_patch(grad_out_ptr, block, tiles_per_sample, tiles_w, patch_row, patch_col, height,
                                   width, out_channel, co_ok, g_sn, g_sc, g_sh, g_sw, INDEX64, BLOCK_H, BLOCK_W)[4]
            bias_acc += tl.sum(grad.to(tl.float32), axis=1)

    keep = co_ok[:, None] & ci_ok[None, :]
    if COLOR:
        is_centre = tap == PAD * KSIZE + PAD
        # [C_out, C_in]: output group go sees input group gi at the centre when gi < go (A) or gi <= go (B)
        in_group = (in_channel // in_group_size)[None, :]
        out_group = (out_channel // out_group_size)[:, None]
        sees = (in_group < out_group) if MASK_A else (in_group <= out_group)
        acc = tl.where(is_centre & ~sees, 0.0, acc)
    part = split.to(tl.int64) * num_taps + tap
    offsets = (part * out_channels + out_channel)[:, None] * in_channels + in_channel[None, :]
    tl.store(grad_w_ptr + offsets, acc, mask=keep)
    if with_bias:
        tl.store(grad_b_ptr + split.to(tl.int64) * out_channels + out_channel, bias_acc, mask=co_ok)


def _channel_block(channels: int, largest: int) -> int:
    """A ``tl.dot`` operand block for ``channels``: a power of two in [16, ``largest``]."""
    return max(16, min(largest, triton.next_power_of_2(max(channels, 1))))


def _ieee_dot() -> bool:
    """The ``IEEE`` switch of :func:`genkernels.kernels.triton_helpers.dot` for fp32 tiles: exact fp32 unless
    ``torch.backends.cudnn.allow_tf32`` (PyTorch's default for its own fp32 convolutions) allows TF32 on the
    tensor cores. Read once per call, on the host."""
    return not torch.backends.cudnn.allow_tf32


def _group_size(channels: int, color_channels: int) -> int:
    return max(1, channels // color_channels)


def _needs_index64(*tensors: torch.Tensor) -> bool:
    """Whether some offset into one of ``tensors`` (the largest: the sum of ``(size - 1) * |stride|``, or its
    element count) can reach 2**31: the kernels then index in int64, else in int32."""
    limit = 2**31 - 1
    for t in tensors:
        span = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()) if size > 0)
        if span >= limit or t.numel() >= limit:
            return True
    return False


def _pipeline(stage_bytes: int, registers: int, device: torch.device) -> tuple[int, int]:
    """``(num_stages, CTAs per SM)``: a software pipeline of operand buffers (``stage_bytes`` each) within 3/4 of
    the device's shared memory per CTA (``launch.device_limits``: 99 KB on sm_86/89, 163 KB on sm_80, 227 KB on
    sm_90), 3 stages or, where that leaves the CTAs per SM to the registers, the fewest more that make shared memory
    the limit. Shared memory is known exactly here; registers only roughly (``registers`` is the compiled-code
    report's figure, and Triton releases differ by a few dozen), so with shared memory binding up to
    ``REGISTER_MARGIN`` more registers per thread leave the occupancy, and so the waves a grid is sized for,
    unchanged."""
    limits = launch.device_limits(device)
    most = max(1, limits.shared_memory_per_cta * 3 // 4 // max(stage_bytes, 1))
    by_registers = _ctas_per_sm(limits, registers + REGISTER_MARGIN, 0)
    first = min(3, most)
    for stages in range(first, min(most, 8) + 1):
        by_shared = limits.shared_memory_per_sm // (stages * stage_bytes + 1024)
        if by_shared <= by_registers:
            return stages, max(1, by_shared)
    return first, _ctas_per_sm(limits, registers, first * stage_bytes)


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` with channels innermost (a no-op when it already is, or broadcast along channels): the kernels read
    their activations as 16-byte rows of channels."""
    if t.stride(1) in (0, 1) or t.shape[1] == 1:
        return t
    return t.contiguous(memory_format=torch.channels_last)


def _pack_weight(weight: torch.Tensor, num_taps: int, transposed: bool) -> torch.Tensor:
    """The kept taps of ``weight`` ``[C_out, C_in, k, k]`` as a contiguous ``[num_taps, R, O]``: ``R, O = C_in,
    C_out`` for the forward, ``C_out, C_in`` for the input gradient (the layout the reduction walks). Masked taps
    are not copied; masked pairs of a colour centre tap are copied but never read."""
    kernel_size = weight.shape[-1]
    order = (2, 3, 0, 1) if transposed else (2, 3, 1, 0)
    taps = weight.permute(*order).reshape(kernel_size * kernel_size, *(weight.shape[i] for i in order[2:]))
    return taps[:num_taps].contiguous()


def _ctas_per_sm(limits, registers: int, shared_bytes: int, num_warps: int = 4) -> int:
    """CTAs of a kernel resident per SM (what bench/resources.py reads from the compiled code), from an estimate of
    its registers per thread and shared memory: registers go per warp in units of 256, and every CTA reserves
    1 KB of shared memory beyond its own."""
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    return max(1, min(limits.registers_per_sm // (per_warp * num_warps),
                      limits.shared_memory_per_sm // (shared_bytes + 1024),
                      limits.max_warps_per_sm // num_warps, limits.max_ctas_per_sm))


def _wave_fill(ctas: int, ctas_per_sm: int, sm_count: int) -> tuple[float, float]:
    """``(waves, efficiency)`` of ``ctas`` programs on ``sm_count`` SMs holding ``ctas_per_sm`` each."""
    slots = ctas_per_sm * sm_count
    waves = ctas / slots
    return waves, ctas / (math.ceil(waves) * slots) if ctas else 1.0


def _fills_waves(waves: float, efficiency: float) -> bool:
    """The wave budget of the compiled-code report: 4 waves or more, or at least 90% of the last wave's slots."""
    return waves >= 4 or efficiency >= 0.9


def _gather_config(pixel_tiles: int, groups: int, produced_group: int, block_reduce: int, element_size: int,
                   device: torch.device) -> tuple[int, int]:
    """``(BLOCK_OUT, num_stages)`` of the gather kernel: the widest produced-channel tile (up to 128) whose grid
    fills the device's waves (``launch.device_limits``: SM count, shared memory), halving it while the grid would
    leave more than 10% of a last wave under 4 waves; the pipeline and the occupancy it pins from
    :func:`_pipeline`, with ``GATHER_REGISTERS`` (the registers per thread of the compiled tiles, from the
    compiled-code report)."""
    limits = launch.device_limits(device)
    widest = _channel_block(produced_group, MAX_BLOCK_CHANNELS_OUT)
    candidates = []
    for block_out in (widest, widest // 2, widest // 4):
        if block_out < 32 and block_out != widest:
            break
        stage_bytes = (BLOCK_PIXELS + block_out) * block_reduce * element_size
        stages, per_sm = _pipeline(stage_bytes, GATHER_REGISTERS.get(block_out, 128), device)
        ctas = pixel_tiles * groups * triton.cdiv(produced_group, block_out)
        waves, efficiency = _wave_fill(ctas, per_sm, limits.sm_count)
        if _fills_waves(waves, efficiency):
            return block_out, stages
        candidates.append((efficiency, block_out, stages))
    _, block_out, stages = max(candidates, key=lambda c: (c[0], c[1]))
    return block_out, stages


def _launch_gather(src, weight, bias, n_out, mask_type, color_channels, transposed):
    batch, n_reduce, height, width = src.shape
    out = torch.empty((batch, n_out, height, width), device=src.device, dtype=src.dtype)
    if out.numel() == 0:
        return out
    kernel_size = weight.shape[-1]
    src = _channels_last(src)
    packed = _pack_weight(weight, kept_taps(kernel_size, mask_type, color_channels), transposed)
    groups = color_channels if color_channels == 3 else 1
    produced_group = n_out // groups
    reduce_group = n_reduce // groups
    wide = src.dtype == torch.float32
    block_reduce = _channel_block(n_reduce if groups == 1 else reduce_group,
                                  MAX_BLOCK_CHANNELS_IN // (2 if wide else 1))
    pixel_tiles = triton.cdiv(batch * height * width, BLOCK_PIXELS)
    block_out, stages = _gather_config(pixel_tiles, groups, produced_group, block_reduce, src.element_size(),
                                       src.device)
    block_out = int(launch_setting("masked_conv2d", "gather_block_out", block_out))
    group_tiles = triton.cdiv(produced_group, block_out)
    grid = (pixel_tiles, groups * group_tiles)
    _masked_conv2d_gather_kernel[grid](
        src, packed, bias if bias is not None else packed, out,
        batch * height * width, height * width, height, width, n_reduce, n_out,
        *src.stride(), bias.stride(0) if bias is not None else 0,
        reduce_group, produced_group, group_tiles,
        KSIZE=kernel_size, MASK_A=mask_type == "A", COLOR=color_channels == 3, TRANSPOSED=transposed,
        HAS_BIAS=bias is not None, NATIVE_DOT=launch.native_dot(src.device), IEEE=_ieee_dot(),
        INDEX64=bool(launch_setting("masked_conv2d", "index64", _needs_index64(src, out, packed))),
        BLOCK_P=BLOCK_PIXELS, BLOCK_OUT=block_out, BLOCK_REDUCE=block_reduce,
        num_warps=4, num_stages=stages,
    )
    return out


def _weight_grad_registers(block_co: int, block_ci: int) -> int:
    """Registers per thread of a compiled weight-gradient tile (sm_90, from the compiled-code report): the fp32
    accumulator's share of 128 threads plus the loop's addresses and masks."""
    return WEIGHT_GRAD_BASE_REGISTERS + block_co * block_ci // 128


def _weight_grad_splits(programs: int, total_blocks: int, per_sm: int, device: torch.device) -> int:
    """Splits of the weight gradient's pixel reduction (each a contiguous share of the ``total_blocks`` pixel
    blocks). On a GPU (and when launches are captured for one): the fewest that fill at least 90% of one wave of
    the device's SMs (``launch.device_limits``) and 90% of their last wave, or make 4 waves or more, at the
    occupancy of ``per_sm`` CTAs per SM (:func:`_pipeline`); one in the interpreter (its cost is programs x iterations).
    Tests force it with ``force_launch_settings("masked_conv2d", weight_grad_splits=n)``."""
    splits = 1
    if (device.type == "cuda" and not interpreter_enabled()) or launch.capturing():
        limits = launch.device_limits(device)
        best = (-1.0, total_blocks)
        for count in range(1, total_blocks + 1):
            count = triton.cdiv(total_blocks, triton.cdiv(total_blocks, count))  # the splits that run
            waves, efficiency = _wave_fill(programs * count, per_sm, limits.sm_count)
            if waves >= 0.9 and _fills_waves(waves, efficiency):
                best = (2.0, count)
                break
            if efficiency > best[0] + 1e-9:
                best = (efficiency, count)
        splits = best[1]
    splits = max(1, int(launch_setting("masked_conv2d", "weight_grad_splits", splits)))
    return triton.cdiv(total_blocks, triton.cdiv(total_blocks, min(splits, total_blocks)))


def _launch_weight_grad(grad_out, x, weight, mask_type, color_channels):
    batch, in_channels, height, width = x.shape
    out_channels, _, kernel_size, _ = weight.shape
    num_taps = kept_taps(kernel_size, mask_type, color_channels)
    grad_w = torch.zeros(weight.shape, device=weight.device, dtype=weight.dtype)
    if batch * height * width == 0 or num_taps == 0 or in_channels == 0 or out_channels == 0:
        # no product to differentiate (an empty image or channel axis, or a 1x1 mask-A kernel without colours):
        # the bias gradient is a plain sum
        return grad_w, grad_out.sum((0, 2, 3), dtype=torch.float32).to(grad_out.dtype)
    x, grad_out = _channels_last(x), _channels_last(grad_out)
    wide = x.dtype == torch.float32
    block_co = _channel_block(out_channels, MAX_BLOCK_CHANNELS_OUT)
    block_ci = _channel_block(in_channels, MAX_BLOCK_CHANNELS_IN)
    block_pixels = WEIGHT_GRAD_BLOCK_PIXELS // (2 if wide else 1)
    block_w = min(triton.next_power_of_2(width), block_pixels)
    block_h = block_pixels // block_w
    tiles_w = triton.cdiv(width, block_w)
    tiles_per_sample = triton.cdiv(height, block_h) * tiles_w
    total_blocks = batch * tiles_per_sample
    tiles = triton.cdiv(out_channels, block_co) * triton.cdiv(in_channels, block_ci)
    stage_bytes = (block_co + block_ci) * block_pixels * x.element_size()
    stages, per_sm = _pipeline(stage_bytes, _weight_grad_registers(block_co, block_ci), x.device)
    splits = _weight_grad_splits(num_taps * tiles, total_blocks, per_sm, x.device)
    blocks_per_split = triton.cdiv(total_blocks, splits)
    partial_w = torch.empty((splits, num_taps, out_channels, in_channels), device=x.device, dtype=torch.float32)
    partial_b = torch.empty((splits, out_channels), device=x.device, dtype=torch.float32)
    _masked_conv2d_weight_grad_kernel[(num_taps, tiles, splits)](
        x, grad_out, partial_w, partial_b,
        in_channels, out_channels, height, width, num_taps,
        tiles_w, tiles_per_sample, total_blocks, blocks_per_split,
        *x.stride(), *grad_out.stride(),
        _group_size(in_channels, color_channels), _group_size(out_channels, color_channels),
        KSIZE=kernel_size, MASK_A=mask_type == "A", COLOR=color_channels == 3,
        NATIVE_DOT=launch.native_dot(x.device), IEEE=_ieee_dot(),
        INDEX64=bool(launch_setting("masked_conv2d", "index64", _needs_index64(x, grad_out, partial_w))),
        BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_CO=block_co, BLOCK_CI=block_ci,
        num_warps=4, num_stages=stages,
    )
    kept = partial_w.sum(0) if splits > 1 else partial_w[0]
    # The kept taps are exactly the first num_taps in row-major (dy, dx) order: the rows above the centre, the
    # centre row's left half, the centre. Every other tap keeps its zero gradient.
    grad_w.view(out_channels, in_channels, kernel_size * kernel_size)[:, :, :num_taps] = \
        kept.permute(1, 2, 0).to(weight.dtype)
    grad_b = partial_b.sum(0) if splits > 1 else partial_b[0]
    return grad_w, grad_b.to(grad_out.dtype)

# ----------------------------------------------------------------------------------------------------------------
# torch.library registration (usable under torch.compile(fullgraph=True))
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("genkernels::masked_conv2d", mutates_args=())
def _masked_conv2d_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], mask_type: str,
                      color_channels: int) -> torch.Tensor:
    return _launch_gather(x, weight, bias, weight.shape[0], mask_type, color_channels, transposed=False)


@torch.library.custom_op("genkernels::masked_conv2d_input_grad", mutates_args=())
def _masked_conv2d_input_grad_op(grad_out: torch.Tensor, weight: torch.Tensor, mask_type: str,
                                 color_channels: int) -> torch.Tensor:
    return _launch_gather(grad_out, weight, None, weight.shape[1], mask_type, color_channels, transposed=True)


@torch.library.custom_op("genkernels::masked_conv2d_weight_grad", mutates_args=())
def _masked_conv2d_weight_grad_op(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mask_type: str,
                                  color_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_weight_grad(grad_out, x, weight, mask_type, color_channels)


@_masked_conv2d_op.register_fake
def _masked_conv2d_fake(x, weight, bias, mask_type, color_channels):
    return x.new_empty((x.shape[0], weight.shape[0], x.shape[2], x.shape[3]))


@_masked_conv2d_input_grad_op.register_fake
def _masked_conv2d_input_grad_fake(grad_out, weight, mask_type, color_channels):
    return grad_out.new_empty((grad_out.shape[0], weight.shape[1], grad_out.shape[2], grad_out.shape[3]))


@_masked_conv2d_weight_grad_op.register_fake
def _masked_conv2d_weight_grad_fake(grad_out, x, weight, mask_type, color_channels):
    return torch.empty_like(weight, memory_format=torch.contiguous_format), grad_out.new_empty(weight.shape[0])


def _setup_context(ctx, inputs, output):
    x, weight, bias, mask_type, color_channels = inputs
    ctx.save_for_backward(x, weight)
    ctx.mask_type, ctx.color_channels = mask_type, color_channels


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    grad_out = grad_out.contiguous(memory_format=torch.channels_last)  # once, for both kernels
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.genkernels.masked_conv2d_input_grad(grad_out, weight, ctx.mask_type, ctx.color_channels)
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        grad_w, grad_b = torch.ops.genkernels.masked_conv2d_weight_grad(grad_out, x, weight, ctx.mask_type,
                                                                        ctx.color_channels)
    return grad_x, grad_w, grad_b if ctx.needs_input_grad[2] else None, None, None


_masked_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------
def check_masked_conv2d_config(out_channels: int, in_channels: int, kernel_size: int, mask_type: str,
                               color_channels: int) -> None:
    """The checks on a masked convolution's configuration shared by the op and ``MaskedConv2d``: an odd
    ``kernel_size >= 1``, ``mask_type`` "A" or "B", ``color_channels`` 1 or 3 (then both channel counts divisible
    by 3). The sizes are ints (the op passes its weight's shape, symbolic under torch.compile; ``MaskedConv2d``
    checks their types first)."""
    if kernel_size < 1:
        raise ValueError(f"kernel_size must be an odd int >= 1; got {kernel_size}")
    check_choice(mask_type, "mask_type", MASK_TYPES)
    color_channels = check_int(color_channels, "color_channels")
    if color_channels not in COLOR_CHANNELS:
        raise ValueError(f"color_channels={color_channels} is not supported; expected 1 or 3")
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd (a centre tap); got {kernel_size}")
    if color_channels == 3:
        reasons = [f"{name}={count} is not divisible by 3" for name, count in
                   (("in_channels", in_channels), ("out_channels", out_channels)) if count % 3]
        if reasons:
            raise ValueError("color_channels=3 splits channels into R, G, B thirds: " + "; ".join(reasons))


def masked_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                  mask_type: str = "B", color_channels: int = 1, impl: str = "auto") -> torch.Tensor:
    """PixelCNN masked convolution: ``F.conv2d(x, mask * weight, bias, padding=k // 2)`` computing only the taps
    the mask keeps (see the module docstring and :func:`masked_conv2d_reference` for the math).

    Masked taps are never read, under either impl: neither the masked weight entries nor the pixels and
    sub-pixels an output may not see, so NaN or Inf there never reaches it (where ``F.conv2d`` on the masked
    weight would give NaN). Every other NaN/Inf propagates as in ``F.conv2d``.

    Args:
        x: ``[N, C_in, H, W]``, fp32/fp16/bf16/fp64, any strides (channels_last, sliced, expanded) and any size
            (0 included: zero input channels give the bias).
        weight: ``[C_out, C_in, k, k]`` with ``k`` odd, dtype and device of ``x``, any strides; masked entries are
            ignored.
        bias: optional ``[C_out]``, any stride.
        mask_type: "A" (centre tap excluded; the first layer) or "B" (centre included).
        color_channels: 1, or 3 for R, G, B channel thirds with the colour rule at the centre tap.
        impl: "auto", "triton" or "eager". fp64 runs the eager reference in fp64 (``impl="triton"`` raises
            ``ValueError`` listing why); ``meta`` tensors take the registered op's fake (shapes only).

    Returns:
        ``[N, C_out, H, W]`` contiguous, dtype of ``x`` (fp32 accumulation; fp32 tiles in TF32 on a GPU when
        ``torch.backends.cudnn.allow_tf32``, as PyTorch's own convolutions, exact fp32 when it is off).
        Differentiable in ``x``, ``weight`` and ``bias``; masked weight entries get exactly zero gradient.
    """
    check_float_tensor(x, "x")
    check_float_tensor(weight, "weight")
    if x.dim() != 4:
        raise ValueError(f"x must have 4 dimensions [batch, channels, height, width]; got {describe(x)}")
    if weight.dim() != 4:
        raise ValueError(f"weight must have 4 dimensions [out_channels, in_channels, k, k]; got {describe(weight)}")
    out_channels, in_channels, kernel_h, kernel_w = weight.shape
    if kernel_h != kernel_w:
        raise ValueError(f"weight must have a square kernel; got {describe(weight)}")
    if kernel_h % 2 == 0:
        raise ValueError(f"weight must have an odd kernel size (a centre tap); got {describe(weight)}")
    if in_channels != x.shape[1]:
        raise ValueError(f"weight must have in_channels = x.shape[1] = {x.shape[1]}; got {describe(weight)}")
    check_same_dtype(x, "x", weight, "weight")
    named = [("x", x), ("weight", weight)]
    if bias is not None:
        check_float_tensor(bias, "bias")
        if bias.shape != (out_channels,):
            raise ValueError(f"bias must have shape [out_channels] = [{out_channels}]; got {describe(bias)}")
        check_same_dtype(x, "x", bias, "bias")
        named.append(("bias", bias))
    check_same_device(named)
    check_masked_conv2d_config(out_channels, in_channels, kernel_h, mask_type, color_channels)
    impl = choose_impl(impl, "masked_conv2d", {"x": x, "weight": weight, "bias": bias})
    if impl == "eager":
        return masked_conv2d_reference(x, weight, bias, mask_type, color_channels)
    # channels innermost (the kernels read 16-byte rows of channels); saved so for the weight gradient too
    x = x.contiguous(memory_format=torch.channels_last)
    return torch.ops.genkernels.masked_conv2d(x, weight, bias, mask_type, color_channels)


__all__ = ["MASK_TYPES", "check_masked_conv2d_config", "kept_taps", "masked_conv2d", "masked_conv2d_flops",
           "masked_conv2d_mask", "masked_conv2d_reference"]
