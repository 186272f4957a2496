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
instead of 49: masked taps are never read, and their weights' gradient is exactly zero. Each is an implicit GEMM: a tile
of output pixels times a tile of output channels, accumulated in fp32 with ``tl.dot`` over channel blocks, one
kept tap at a time, reading the zero padding through masked loads (no padded copy) and the input through its
strides (no contiguous copy). A colour centre tap is summed one reduced colour group at a time into a tile of its
own that ``tl.where`` adds only to the channels seeing that group, so nothing hidden by the mask (a masked weight
entry, a later sub-pixel, a later pixel) is ever multiplied into an output: NaN/Inf there cannot reach it. The eager
reference keeps the same promise by convolving only the kept taps. fp32 tiles use TF32 on a GPU when
``torch.backends.cudnn.allow_tf32`` is set (PyTorch's default for its own fp32 convolutions), exact fp32
otherwise; index arithmetic is int64.

FLOPs per forward call, counting kept taps only: ``2 * N * C_out * C_in * kept_taps * H * W`` (the centre tap of a
colour mask counts fully). The backward does the same twice (input and weight gradients).
"""
from __future__ import annotations

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
# Weight-gradient programs to aim for on a GPU before splitting the pixel reduction further (a few per SM).
WEIGHT_GRAD_TARGET_PROGRAMS = 512


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
def _centre_sees(reduce_channel, out_channel, reduce_group_size, out_group_size, MASK_A: tl.constexpr,
                 TRANSPOSED: tl.constexpr):
    """``[R, O]`` booleans: which (reduced, produced) channel pairs the colour rule keeps at the centre tap.
    Forward: reduce = input, out = output channel. Transposed (input gradient): reduce = output, out = input."""
    reduce_group = (reduce_channel // reduce_group_size)[:, None]
    out_group = (out_channel // out_group_size)[None, :]
    if TRANSPOSED:
        in_group, conv_out_group = out_group, reduce_group
    else:
        in_group, conv_out_group = reduce_group, out_group
    if MASK_A:
        return in_group < conv_out_group
    else:
        return in_group <= conv_out_group


@triton.jit
def _accumulate_tap(acc, src_pixel_ptr, w_out_ptr, row, col, pixel_ok, out_ok, reduce_start, reduce_end, height,
                    width, src_sc, src_sh, src_sw, w_s_reduce, tap_offset, SHIFT_Y: tl.constexpr,
                    SHIFT_X: tl.constexpr, NATIVE_DOT: tl.constexpr, IEEE: tl.constexpr,
                    BLOCK_REDUCE: tl.constexpr):
    """``acc[P, O] += src[P, R] @ w[R, O]`` for one tap: ``src`` read at ``(row + SHIFT_Y, col + SHIFT_X)`` (zero
    outside the image), ``w`` the tap's ``[reduced, produced]`` weight slice (``tap_offset`` from the weight's
    first tap, int64), over reduced channels ``[reduce_start, reduce_end)`` in blocks. The shifts are constants,
    so only the image edges a tap can cross are tested."""
    in_image = pixel_ok
    if SHIFT_Y < 0:
        in_image = in_image & (row >= -SHIFT_Y)
    if SHIFT_Y > 0:
        in_image = in_image & (row < height - SHIFT_Y)
    if SHIFT_X < 0:
        in_image = in_image & (col >= -SHIFT_X)
    if SHIFT_X > 0:
        in_image = in_image & (col < width - SHIFT_X)
    src_ptrs = (src_pixel_ptr + (SHIFT_Y * tl.cast(src_sh, tl.int64) + SHIFT_X * tl.cast(src_sw, tl.int64)))[:, None]
    w_ptrs = (w_out_ptr + tap_offset)[None, :]
    for start in range(reduce_start, reduce_end, BLOCK_REDUCE):
        channel = (start + tl.arange(0, BLOCK_REDUCE)).to(tl.int64)
        channel_ok = channel < reduce_end
        src = tl.load(src_ptrs + channel[None, :] * src_sc, mask=in_image[:, None] & channel_ok[None, :], other=0.0)
        w = tl.load(w_ptrs + channel[:, None] * w_s_reduce, mask=channel_ok[:, None] & out_ok[None, :], other=0.0)
        acc = dot(src, w, acc, NATIVE_DOT, IEEE)
    return acc


@triton.jit
def _accumulate_colour_centre(acc, src_pixel_ptr, w_out_ptr, pixel_ok, out_channel, out_ok, first_group, last_group,
                              n_reduce, src_sc, w_s_reduce, tap_offset, reduce_group_size, out_group_size,
                              MASK_A: tl.constexpr, TRANSPOSED: tl.constexpr, NATIVE_DOT: tl.constexpr,
                              IEEE: tl.constexpr, BLOCK_REDUCE: tl.constexpr):
    """The centre tap under the colour rule, one reduced colour group at a time (``first_group .. last_group``):
    the group's product goes into a tile of its own, which ``tl.where`` adds only to the produced channels that
    see the group. A masked (reduced, produced) pair is so never multiplied into an output it is hidden from:
    NaN or Inf in a hidden sub-pixel (or in a masked weight entry) cannot reach it, as in the eager reference."""
    produced_group = out_channel // out_group_size
    for group in range(first_group, last_group + 1):
        start = group * reduce_group_size
        end = tl.minimum(start + reduce_group_size, n_reduce)
        part = tl.zeros(acc.shape, dtype=tl.float32)
        part = _accumulate_tap(part, src_pixel_ptr, w_out_ptr, produced_group, produced_group, pixel_ok, out_ok,
                               start, end, 1, 1, src_sc, 0, 0, w_s_reduce, tap_offset, 0, 0, NATIVE_DOT, IEEE,
                               BLOCK_REDUCE)
        if TRANSPOSED:  # reduced: an output group; produced: input channels, seen by the outputs of later groups
            sees = (produced_group < group) if MASK_A else (produced_group <= group)
        else:  # reduced: an input group; produced: output channels
            sees = (group < produced_group) if MASK_A else (group <= produced_group)
        acc += tl.where(sees[None, :], part, 0.0)
    return acc


@triton.jit
def _masked_conv2d_gather_kernel(
    src_ptr, w_ptr, bias_ptr, out_ptr,
    batch, n_reduce, n_out, height, width,
    src_sn, src_sc, src_sh, src_sw,
    w_s_reduce, w_s_out, w_sh, w_sw, bias_s,
    reduce_group_size, out_group_size,
    KSIZE: tl.constexpr, MASK_A: tl.constexpr, COLOR: tl.constexpr, TRANSPOSED: tl.constexpr,
    HAS_BIAS: tl.constexpr, NATIVE_DOT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_REDUCE: tl.constexpr, BLOCK_CENTRE: tl.constexpr,
):
    """The forward (``TRANSPOSED=False``: src = x, reduce over input channels, taps read at ``+(d - p)``) and the
    input gradient (``TRANSPOSED=True``: src = grad_out, reduce over output channels, taps read at ``-(d - p)``,
    the weight read transposed). Output: contiguous ``[N, n_out, H, W]``, one ``[BLOCK_P, BLOCK_OUT]`` tile whose
    rows run over the flattened (sample, pixel) index, so small images still fill a tile. Pixel, channel and
    weight-tap offsets are int64 (``tl.cast`` also takes the scalars a launch specializes to the constant 1)."""
    PAD: tl.constexpr = KSIZE // 2
    SIGN: tl.constexpr = -1 if TRANSPOSED else 1
    plane = tl.cast(height, tl.int64) * width
    flat = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    pixel_ok = flat < batch * plane
    n = flat // plane
    pixel = flat % plane
    row = pixel // width
    col = pixel % width
    src_pixel_ptr = src_ptr + (n * src_sn + row * src_sh + col * src_sw)
    out_channel = (tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)).to(tl.int64)
    out_ok = out_channel < n_out
    w_out_ptr = w_ptr + out_channel * w_s_out
    w_sh64 = tl.cast(w_sh, tl.int64)
    w_sw64 = tl.cast(w_sw, tl.int64)
    acc = tl.zeros((BLOCK_P, BLOCK_OUT), dtype=tl.float32)

    # rows above the centre, whole
    for dy in tl.static_range(PAD):
        for dx in tl.static_range(KSIZE):
            acc = _accumulate_tap(acc, src_pixel_ptr, w_out_ptr, row, col, pixel_ok, out_ok, 0, n_reduce, height,
                                  width, src_sc, src_sh, src_sw, w_s_reduce, dy * w_sh64 + dx * w_sw64,
                                  SIGN * (dy - PAD), SIGN * (dx - PAD), NATIVE_DOT, IEEE, BLOCK_REDUCE)
    # the centre row, left of the centre
    for dx in tl.static_range(PAD):
        acc = _accumulate_tap(acc, src_pixel_ptr, w_out_ptr, row, col, pixel_ok, out_ok, 0, n_reduce, height,
                              width, src_sc, src_sh, src_sw, w_s_reduce, PAD * w_sh64 + dx * w_sw64,
                              0, SIGN * (dx - PAD), NATIVE_DOT, IEEE, BLOCK_REDUCE)
    # the centre tap: whole (B), absent (A), or by colour group
    centre_offset = PAD * w_sh64 + PAD * w_sw64
    if COLOR:
        # Only the reduced groups some produced channel of this tile may see: forward, input groups up to the
        # tile's last output group; transposed, output groups from the tile's first input group on.
        if TRANSPOSED:
            first_group = (tl.program_id(1) * BLOCK_OUT) // out_group_size + MASK_A
            last_group = 2
        else:
            last_out = tl.minimum(tl.program_id(1) * BLOCK_OUT + BLOCK_OUT, n_out) - 1
            first_group = 0
            last_group = last_out // out_group_size - MASK_A
        acc = _accumulate_colour_centre(acc, src_pixel_ptr, w_out_ptr, pixel_ok, out_channel, out_ok, first_group,
                                        last_group, n_reduce, src_sc, w_s_reduce, centre_offset, reduce_group_size,
                                        out_group_size, MASK_A, TRANSPOSED, NATIVE_DOT, IEEE, BLOCK_CENTRE)
    elif not MASK_A:
        acc = _accumulate_tap(acc, src_pixel_ptr, w_out_ptr, row, col, pixel_ok, out_ok, 0, n_reduce, height,
                              width, src_sc, src_sh, src_sw, w_s_reduce, centre_offset, 0, 0, NATIVE_DOT, IEEE,
                              BLOCK_REDUCE)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + out_channel * bias_s, mask=out_ok, other=0.0).to(tl.float32)[None, :]
    out_offsets = (n * n_out * plane + pixel)[:, None] + out_channel[None, :] * plane
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=pixel_ok[:, None] & out_ok[None, :])


@triton.jit
def _masked_conv2d_weight_grad_kernel(
    x_ptr, grad_out_ptr, grad_w_ptr, grad_b_ptr,
    batch, in_channels, out_channels, height, width, num_splits, num_taps,
    x_sn, x_sc, x_sh, x_sw,
    g_sn, g_sc, g_sh, g_sw,
    in_group_size, out_group_size,
    KSIZE: tl.constexpr, MASK_A: tl.constexpr, COLOR: tl.constexpr, NATIVE_DOT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
):
    """``grad_w[o, i, tap] = sum_{n, h, w} grad_out[n, o, h, w] * x[n, i, h + dy - p, w + dx - p]`` for one kept
    tap and one ``[BLOCK_CO, BLOCK_CI]`` tile, over this split's share of the blocks of (sample, pixel) rows.
    Writes fp32 partial sums ``[num_splits, C_out, C_in, num_taps]`` (and ``[num_splits, C_out]`` for the bias
    from the programs of tap 0 and the first input-channel block); the launcher adds the splits. At a colour
    centre tap the pairs the rule masks are selected to exactly zero (``tl.where``: NaN there stays out)."""
    PAD: tl.constexpr = KSIZE // 2
    tap = tl.program_id(0)
    split = tl.program_id(2)
    ci_blocks = tl.cdiv(in_channels, BLOCK_CI)
    co_block = tl.program_id(1) // ci_blocks
    ci_block = tl.program_id(1) % ci_blocks
    dy = tl.where(tap < PAD * KSIZE, tap // KSIZE, PAD)
    dx = tl.where(tap < PAD * KSIZE, tap % KSIZE, tap - PAD * KSIZE)
    out_channel = (co_block * BLOCK_CO + tl.arange(0, BLOCK_CO)).to(tl.int64)
    in_channel = (ci_block * BLOCK_CI + tl.arange(0, BLOCK_CI)).to(tl.int64)
    co_ok = out_channel < out_channels
    ci_ok = in_channel < in_channels
    with_bias = (tap == 0) & (ci_block == 0)

    acc = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_CO,), dtype=tl.float32)
    plane = tl.cast(height, tl.int64) * width
    rows = tl.cast(batch, tl.int64) * plane
    for block in range(tl.cast(split, tl.int64), tl.cdiv(rows, BLOCK_P), num_splits):
        # rows of the reduction: the flattened (sample, pixel) index, as in the gather kernel
        flat = block * BLOCK_P + tl.arange(0, BLOCK_P)
        pixel_ok = flat < rows
        n = flat // plane
        pixel = flat % plane
        row = pixel // width
        col = pixel % width
        grad = tl.load(grad_out_ptr + out_channel[:, None] * g_sc + (n * g_sn + row * g_sh + col * g_sw)[None, :],
                       mask=co_ok[:, None] & pixel_ok[None, :], other=0.0)
        src_row = row + (dy - PAD)
        src_col = col + (dx - PAD)
        in_image = pixel_ok & (src_row >= 0) & (src_row < height) & (src_col >= 0) & (src_col < width)
        src = tl.load(x_ptr + (n * x_sn + src_row * x_sh + src_col * x_sw)[:, None] + in_channel[None, :] * x_sc,
                      mask=in_image[:, None] & ci_ok[None, :], other=0.0)
        acc = dot(grad, src, acc, NATIVE_DOT, IEEE)
        if with_bias:
            bias_acc += tl.sum(grad.to(tl.float32), axis=1)

    keep = co_ok[:, None] & ci_ok[None, :]
    if COLOR:
        is_centre = tap == PAD * KSIZE + PAD
        # [C_out, C_in] roles are those of the transposed gather: reduce = output channel, out = input channel
        sees = _centre_sees(out_channel, in_channel, out_group_size, in_group_size, MASK_A, True)
        acc = tl.where(is_centre & ~sees, 0.0, acc)
    part = tl.cast(split, tl.int64) * out_channels + out_channel
    offsets = (part[:, None] * in_channels + in_channel[None, :]) * num_taps + tap
    tl.store(grad_w_ptr + offsets, acc, mask=keep)
    if with_bias:
        tl.store(grad_b_ptr + part, bias_acc, mask=co_ok)


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


def _launch_gather(src, weight, bias, n_out, mask_type, color_channels, transposed):
    batch, n_reduce, height, width = src.shape
    out = torch.empty((batch, n_out, height, width), device=src.device, dtype=src.dtype)
    if out.numel() == 0:
        return out
    w_s_out, w_s_reduce = weight.stride(0), weight.stride(1)
    if transposed:
        w_s_out, w_s_reduce = w_s_reduce, w_s_out
    block_out = _channel_block(n_out, MAX_BLOCK_CHANNELS_OUT)
    block_reduce = _channel_block(n_reduce, MAX_BLOCK_CHANNELS_IN)
    reduce_group = _group_size(n_reduce, color_channels)
    grid = (triton.cdiv(batch * height * width, BLOCK_PIXELS), triton.cdiv(n_out, block_out))
    _masked_conv2d_gather_kernel[grid](
        src, weight, bias if bias is not None else weight, out,
        batch, n_reduce, n_out, height, width,
        *src.stride(), w_s_reduce, w_s_out, weight.stride(2), weight.stride(3),
        bias.stride(0) if bias is not None else 0,
        reduce_group, _group_size(n_out, color_channels),
        KSIZE=weight.shape[-1], MASK_A=mask_type == "A", COLOR=color_channels == 3, TRANSPOSED=transposed,
        HAS_BIAS=bias is not None, NATIVE_DOT=launch.native_dot(src.device), IEEE=_ieee_dot(),
        BLOCK_P=BLOCK_PIXELS, BLOCK_OUT=block_out, BLOCK_REDUCE=block_reduce,
        BLOCK_CENTRE=_channel_block(reduce_group, MAX_BLOCK_CHANNELS_IN) if color_channels == 3 else block_reduce,
        num_warps=4,
    )
    return out


def _weight_grad_splits(programs: int, reduction_blocks: int, device: torch.device) -> int:
    """Splits of the weight gradient's pixel reduction: a few programs per SM on a GPU, one in the interpreter
    (its cost is programs x iterations). Tests force it with
    ``force_launch_settings("masked_conv2d", weight_grad_splits=n)``."""
    if device.type != "cuda" or interpreter_enabled():
        splits = 1
    else:
        splits = max(1, min(reduction_blocks, WEIGHT_GRAD_TARGET_PROGRAMS // max(1, programs)))
    return max(1, int(launch_setting("masked_conv2d", "weight_grad_splits", splits)))


def _launch_weight_grad(grad_out, x, weight, mask_type, color_channels):
    batch, in_channels, height, width = x.shape
    out_channels, _, kernel_size, _ = weight.shape
    num_taps = kept_taps(kernel_size, mask_type, color_channels)
    grad_w = torch.zeros(weight.shape, device=weight.device, dtype=weight.dtype)
    if batch * height * width == 0 or num_taps == 0 or in_channels == 0 or out_channels == 0:
        # no product to differentiate (an empty image or channel axis, or a 1x1 mask-A kernel without colours):
        # the bias gradient is a plain sum
        return grad_w, grad_out.sum((0, 2, 3), dtype=torch.float32).to(grad_out.dtype)
    block_co = _channel_block(out_channels, MAX_BLOCK_CHANNELS_OUT)
    block_ci = _channel_block(in_channels, MAX_BLOCK_CHANNELS_IN)
    tiles = triton.cdiv(out_channels, block_co) * triton.cdiv(in_channels, block_ci)
    reduction_blocks = triton.cdiv(batch * height * width, BLOCK_PIXELS)
    splits = _weight_grad_splits(num_taps * tiles, reduction_blocks, x.device)
    partial_w = torch.empty((splits, out_channels, in_channels, num_taps), device=x.device, dtype=torch.float32)
    partial_b = torch.empty((splits, out_channels), device=x.device, dtype=torch.float32)
    _masked_conv2d_weight_grad_kernel[(num_taps, tiles, splits)](
        x, grad_out, partial_w, partial_b,
        batch, in_channels, out_channels, height, width, splits, num_taps,
        *x.stride(), *grad_out.stride(),
        _group_size(in_channels, color_channels), _group_size(out_channels, color_channels),
        KSIZE=kernel_size, MASK_A=mask_type == "A", COLOR=color_channels == 3,
        NATIVE_DOT=launch.native_dot(x.device), IEEE=_ieee_dot(), BLOCK_P=BLOCK_PIXELS, BLOCK_CO=block_co,
        BLOCK_CI=block_ci, num_warps=4,
    )
    kept = partial_w.sum(0) if splits > 1 else partial_w[0]
    # The kept taps are exactly the first num_taps in row-major (dy, dx) order: the rows above the centre, the
    # centre row's left half, the centre. Every other tap keeps its zero gradient.
    grad_w.view(out_channels, in_channels, kernel_size * kernel_size)[:, :, :num_taps] = kept.to(weight.dtype)
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
    return torch.ops.genkernels.masked_conv2d(x, weight, bias, mask_type, color_channels)


__all__ = ["MASK_TYPES", "check_masked_conv2d_config", "kept_taps", "masked_conv2d", "masked_conv2d_flops",
           "masked_conv2d_mask", "masked_conv2d_reference"]
