"""Dilated causal 1-D convolution (WaveNet, van den Oord et al. 2016): ``[batch, channels, time]`` in, same length out.

Output step ``t`` sees inputs ``t, t - d, ..., t - (k - 1) d`` and zeros before the start of the sequence. The
kernels never build the left-padded copy: every tap is a shifted, masked load.

Kernels (tiled implicit GEMMs, ``tl.dot`` over channel blocks and the ``k`` taps):
- ``_causal_conv_kernel``: forward, and with ``REVERSE`` the input gradient (the same GEMM looking forward in
  time with the weight's channel axes swapped): ``grad_x[ci, s] = sum_{co, j} W[co, ci, j] g[co, s + (k-1-j) d]``.
- ``_conv_weight_grad_kernel``: ``grad_W[co, ci, j] = sum_{b, t} g[b, co, t] x[b, ci, t - (k-1-j) d]`` and
  ``grad_bias[co] = sum_{b, t} g[b, co, t]``, with the (batch, time) reduction split over programs into an fp32
  workspace that one small sum finishes (deterministic, no atomics).

Layouts: the launchers hand the kernel the weight packed ``[k, c_out, c_in]`` with the reduction axis contiguous
(a small copy; ``nn.Conv1d``'s ``[c_out, c_in, k]`` puts a stride of ``k`` on it, which loads 2 bytes at a time).
fp32 tiles reduce over 32 input channels per dot, 16-bit tiles over 64 (fp32 at 64 spilled).

Dot precision (``triton_helpers.dot``): fp16/bf16 tiles go to ``tl.dot`` as they are (fp32 accumulation) on the
GPU; fp32 tiles use TF32 when ``torch.backends.cudnn.allow_tf32`` is set (PyTorch's default for its own fp32
convolutions) and exact fp32 FMAs when it is not, read once per call. The CPU interpreter multiplies bf16 tiles
wrongly, so there (``NATIVE_DOT=False``) tiles are upcast to fp32 and multiplied in full fp32.

Index arithmetic is int64 wherever it can pass 2**31: tap shifts (``(k - 1 - j) * dilation``), shifted times, and
every index times a stride. Launchers also clamp the dilation to the sequence length: a tap shifted by ``length``
or more reads only the zero padding, whatever the exact shift, so the result is the same for any larger dilation.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import launch
from .checks import FLOAT_DTYPES, check_float_tensor, check_int, check_same_device, check_same_dtype, describe
from .launch import batch_chunks, launch_setting
from .runtime import KERNEL_DTYPES, choose_impl, compute_dtype, interpreter_enabled
from .triton_helpers import dot


# ----------------------------------------------------------------------------------------------------------------
# Eager reference: the specification, the fallback and the test oracle
# ----------------------------------------------------------------------------------------------------------------
def causal_conv1d_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            dilation: int = 1) -> torch.Tensor:
    """Dilated causal convolution in plain PyTorch (WaveNet, van den Oord et al. 2016, Sec. 2.1):

        y[b, o, t] = bias[o] + sum_{i, j} W[o, i, j] * x[b, i, t - (k - 1 - j) * d],   x[b, i, s < 0] = 0

    i.e. ``F.conv1d`` of ``x`` left-padded by ``(k - 1) * d`` zeros. Computes in fp32 (fp64 for fp64 inputs) and
    returns ``x``'s dtype. A dilation of ``length`` or more is applied as ``length`` (a tap shifted that far reads
    only padding either way), so a huge dilation never builds a huge padded copy. Empty reductions give the math's
    value: zero input channels give the bias everywhere, and zero-size outputs keep their shape (and gradients).
    """
    dtype = compute_dtype(x.dtype)
    xc, wc = x.to(dtype), weight.to(dtype)
    bc = None if bias is None else bias.to(dtype)
    batch, _, length = x.shape
    out_channels = weight.shape[0]
    if x.numel() == 0 or out_channels == 0:
        # F.conv1d rejects these (zero out-channels, zero length) or drops the bias (zero in-channels). Every
        # output sums nothing: the bias, or zeros; einsum keeps x and weight in the graph (zero gradients).
        out = torch.einsum("oi,bit->bot", wc.sum(2), xc)
        if bc is not None:
            out = out + bc[None, :, None]
        return out.to(x.dtype)
    dilation = min(dilation, length)
    pad = (weight.shape[-1] - 1) * dilation
    out = F.conv1d(F.pad(xc, (pad, 0)), wc, bc, dilation=dilation)
    return out.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _causal_conv_kernel(
    out_ptr, x_ptr, w_ptr, bias_ptr, add_ptr,
    c_in, c_out, length, dilation, batch_start,
    x_sb, x_sc, x_st, w_so, w_si, w_sk, bias_s, out_sb, out_sc, out_st, add_sb, add_sc, add_st,
    KSIZE: tl.constexpr, REVERSE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ADD: tl.constexpr,
    NATIVE_DOT: tl.constexpr, IEEE: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """``out[b, o, t] = bias[o] + add[b, o, t] + sum_{i, j} W[o, i, j] x[b, i, t -+ (KSIZE-1-j) dilation]``
    (minus: causal forward; plus with ``REVERSE``: the input gradient), one [BLOCK_CO, BLOCK_T] tile per program.
    Shifts, shifted times and every index times a stride are int64 (``tl.cast`` also takes the scalars the
    launch specializes to the constant 1)."""
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    co = (tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)).to(tl.int64)
    batch = (batch_start + tl.program_id(2)).to(tl.int64)
    co_mask = co < c_out
    x_base = x_ptr + batch * x_sb
    w_base = w_ptr + co[:, None] * w_so
    dilation64 = tl.cast(dilation, tl.int64)
    acc = tl.zeros((BLOCK_CO, BLOCK_T), dtype=tl.float32)
    for j in tl.static_range(KSIZE):
        shift = (KSIZE - 1 - j) * dilation64
        if REVERSE:
            src = t + shift
        else:
            src = t - shift
        src_mask = (src >= 0) & (src < length)
        w_tap = w_base + j * tl.cast(w_sk, tl.int64)
        for ci_start in range(0, c_in, BLOCK_CI):
            ci = (ci_start + tl.arange(0, BLOCK_CI)).to(tl.int64)
            ci_mask = ci < c_in
            w = tl.load(w_tap + ci[None, :] * w_si, mask=co_mask[:, None] & ci_mask[None, :], other=0.0)
            xs = tl.load(x_base + ci[:, None] * x_sc + src[None, :] * x_st,
                         mask=ci_mask[:, None] & src_mask[None, :], other=0.0)
            acc = dot(w, xs, acc, NATIVE_DOT, IEEE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + co * bias_s, mask=co_mask, other=0.0).to(tl.float32)[:, None]
    out_mask = co_mask[:, None] & (t < length)[None, :]
    if HAS_ADD:
        acc += tl.load(add_ptr + batch * add_sb + co[:, None] * add_sc + t[None, :] * add_st,
                       mask=out_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + batch * out_sb + co[:, None] * out_sc + t[None, :] * out_st,
             acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _conv_weight_grad_kernel(
    grad_w_ptr, grad_b_ptr, g_ptr, x_ptr,
    batch, c_out, c_in, length, dilation, num_splits,
    g_sb, g_sc, g_st, x_sb, x_sc, x_st,
    KSIZE: tl.constexpr, HAS_BIAS: tl.constexpr, NATIVE_DOT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Split ``s`` of ``grad_W[co, ci, j] = sum_{b, t} g[b, co, t] x[b, ci, t - (KSIZE-1-j) dilation]`` into the
    contiguous fp32 workspace ``grad_w[s, co, ci, j]`` (and ``grad_b[s, co] = sum g``). Split ``s`` owns the
    (batch, time-block) pairs ``r = s, s + num_splits, ...`` in order; the loop steps ``(b, time block)`` by
    ``num_splits`` with a carry (the quotient and remainder of ``num_splits`` by the time-block count are taken
    once, before the loop), so nothing is divided inside it. Index arithmetic as in ``_causal_conv_kernel``."""
    co_block = tl.program_id(0)
    ci_block = tl.program_id(1) // KSIZE
    j = tl.program_id(1) % KSIZE
    split = tl.program_id(2)
    co = (co_block * BLOCK_CO + tl.arange(0, BLOCK_CO)).to(tl.int64)
    ci = (ci_block * BLOCK_CI + tl.arange(0, BLOCK_CI)).to(tl.int64)
    co_mask = co < c_out
    ci_mask = ci < c_in
    shift = (KSIZE - 1 - j).to(tl.int64) * tl.cast(dilation, tl.int64)
    # the sample and time-block counters are int32 (the launcher keeps batch and the time-block count below 2**31)
    time_blocks = tl.cdiv(length, BLOCK_T).to(tl.int32)
    step_b = num_splits // time_blocks
    step_t = num_splits % time_blocks
    b = split // time_blocks
    tb = split % time_blocks
    acc = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_CO,), dtype=tl.float32)
    for _ in range(tl.cast(split, tl.int64), tl.cast(batch, tl.int64) * time_blocks, num_splits):
        t = tl.cast(tb, tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        src = t - shift
        b64 = tl.cast(b, tl.int64)
        g = tl.load(g_ptr + b64 * g_sb + co[:, None] * g_sc + t[None, :] * g_st,
                    mask=co_mask[:, None] & (t < length)[None, :], other=0.0)
        xs = tl.load(x_ptr + b64 * x_sb + ci[None, :] * x_sc + src[:, None] * x_st,
                     mask=ci_mask[None, :] & ((src >= 0) & (src < length))[:, None], other=0.0)
        acc = dot(g, xs, acc, NATIVE_DOT, IEEE)
        if HAS_BIAS:
            bias_acc += tl.sum(g.to(tl.float32), axis=1)
        tb += step_t
        b += step_b
        carry = tb >= time_blocks
        tb = tl.where(carry, tb - time_blocks, tb)
        b = tl.where(carry, b + 1, b)
    offsets = ((tl.cast(split, tl.int64) * c_out + co[:, None]) * c_in + ci[None, :]) * KSIZE + j
    tl.store(grad_w_ptr + offsets, acc, mask=co_mask[:, None] & ci_mask[None, :])
    if HAS_BIAS:
        if (ci_block == 0) & (j == 0):
            tl.store(grad_b_ptr + tl.cast(split, tl.int64) * c_out + co, bias_acc, mask=co_mask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers (shared with kernels/wavenet.py)
# ----------------------------------------------------------------------------------------------------------------
CONV_BLOCK_T = 64
MAX_CHANNEL_BLOCK = 64
# fp32 tiles stage 4-byte operands: a 32-wide reduction block keeps the 64x64 output tile's accumulators and
# operand fragments within the register file (64-wide: 255 registers and spills).
MAX_FP32_REDUCTION_BLOCK = 32
# Weight-gradient tiles: [64 output x 64 input channels] per tap, reduced over 64 time steps per dot; a 1x1
# projection's 16-bit gradient (few registers, so shared memory sets its CTAs per SM) takes 128 steps per dot,
# which also brings it from 5 CTAs per SM to 2. fp32 operands: 80 KB of shared memory, 2 CTAs per SM on sm_90,
# within sm_86's 99 KB.
WEIGHT_GRAD_BLOCK_T, WEIGHT_GRAD_BLOCK_T_1X1_16BIT = 64, 128
# Weight-gradient programs per SM the reduction split aims for: whole waves at the 1, 2 or 4 CTAs per SM these
# configs reach on sm_90, several per SM to hide the reduction loop's latency.
WEIGHT_GRAD_PROGRAMS_PER_SM = 4
WEIGHT_GRAD_WARPS = 8


def channel_block(channels: int, cap: int = MAX_CHANNEL_BLOCK) -> int:
    """A ``tl.dot`` operand block for ``channels``: a power of two in [16, cap]."""
    return max(16, min(cap, triton.next_power_of_2(max(channels, 1))))


def reduction_block(channels: int, dtype: torch.dtype) -> int:
    """The reduction (input-channel) block of a conv tile: at most 32 for fp32, 64 for 16-bit dtypes."""
    return channel_block(channels, MAX_FP32_REDUCTION_BLOCK if dtype == torch.float32 else MAX_CHANNEL_BLOCK)


def native_dot(device: Optional[torch.device] = None) -> bool:
    """Whether kernels hand fp16/bf16 tiles to ``tl.dot`` unconverted: :func:`genkernels.kernels.launch.native_dot`
    for ``device``. Without a device (the older call kernels/wavenet.py makes): everywhere but the interpreter."""
    if device is None:
        return not interpreter_enabled()
    return launch.native_dot(device)


def ieee_dot() -> bool:
    """The ``IEEE`` switch of :func:`genkernels.kernels.triton_helpers.dot` for fp32 tiles: exact fp32 unless
    ``torch.backends.cudnn.allow_tf32`` (PyTorch's default for fp32 convolutions) allows TF32. Read once per call."""
    return not torch.backends.cudnn.allow_tf32


def kernel_dilation(dilation: int, length: int) -> int:
    """The dilation a launcher passes: ``min(dilation, length)``, the same result (a tap shifted by ``length`` or
    more reads only zero padding) with shifts that stay far from int64 overflow however large ``dilation`` is.
    Tests turn the clamp off (``force_launch_settings("causal_conv1d", clamp_dilation=False)``) to reach the
    kernels' int64 shift arithmetic at a tiny length."""
    if not launch_setting("causal_conv1d", "clamp_dilation", True):
        return dilation
    return max(1, min(dilation, length))


def launch_causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dilation: int, *,
                       reverse: bool = False, add: Optional[torch.Tensor] = None,
                       out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``[batch, c_out, time]`` = the (reverse) causal convolution of ``x`` plus ``bias`` and ``add``.

    Forward: ``weight`` is ``[c_out, c_in, k]``. Reverse (input gradient): ``x`` is the output gradient and
    ``weight`` the forward weight ``[c_in_fwd, c_out_fwd, k]``; its first two axes are swapped by strides.
    Every tensor may have any strides (stride 0 included). Zero input channels give ``bias + add``."""
    batch, c_in, length = x.shape
    ksize = weight.shape[2]
    c_out = weight.shape[1] if reverse else weight.shape[0]
    out = torch.empty((batch, c_out, length), device=x.device, dtype=out_dtype or x.dtype)
    if out.numel() == 0:
        return out
    # The weight in the layout the reduction walks, [k, c_out, c_in] with c_in contiguous (a small copy): the
    # tile's rows then load 16 bytes at a time instead of one element per stride-k step.
    packed = weight.permute(2, 1, 0) if reverse else weight.permute(2, 0, 1)
    packed = packed.contiguous()
    w_sk, w_so, w_si = packed.stride()
    add_strides = add.stride() if add is not None else (0, 0, 0)
    block_co, block_ci = channel_block(c_out), reduction_block(c_in, x.dtype)
    grid_t, grid_co = triton.cdiv(length, CONV_BLOCK_T), triton.cdiv(c_out, block_co)
    for start, count in batch_chunks(batch):
        _causal_conv_kernel[(grid_t, grid_co, count)](
            out, x, packed, bias if bias is not None else packed, add if add is not None else x,
            c_in, c_out, length, kernel_dilation(dilation, length), start,
            *x.stride(), w_so, w_si, w_sk, bias.stride(0) if bias is not None else 0, *out.stride(), *add_strides,
            KSIZE=ksize, REVERSE=reverse, HAS_BIAS=bias is not None, HAS_ADD=add is not None,
            NATIVE_DOT=native_dot(x.device), IEEE=ieee_dot(), BLOCK_CO=block_co, BLOCK_CI=block_ci,
            BLOCK_T=CONV_BLOCK_T, num_warps=4,
        )
    return out


def weight_grad_splits(device: torch.device, tiles: int, reduction_steps: int) -> int:
    """Splits of the weight-gradient reduction: ``tiles * splits`` programs close to
    ``WEIGHT_GRAD_PROGRAMS_PER_SM`` per SM of ``device`` (:func:`launch.device_limits`), rounded down to a whole
    number of SMs' worth where the tiles allow it, and never more splits than (sample, time block) pairs."""
    sm_count = launch.device_limits(device).sm_count
    splits = max(1, (WEIGHT_GRAD_PROGRAMS_PER_SM * sm_count) // max(1, tiles))
    whole = sm_count // math.gcd(sm_count, tiles)  # the splits that make tiles * splits a multiple of sm_count
    if splits >= whole:
        splits -= splits % whole
    return max(1, min(reduction_steps, splits))


def launch_conv_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, ksize: int, dilation: int,
                            with_bias: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """fp32 ``(grad_weight [c_out, c_in, k], grad_bias [c_out] or None)`` of the causal convolution.

    The GPU splits the (batch, time) reduction over :func:`weight_grad_splits` programs; the interpreter does not
    (its cost is programs x iterations). Tests force a split count with
    ``force_launch_settings("causal_conv1d", weight_grad_splits=n)``."""
    batch, c_out, length = grad_out.shape
    c_in = x.shape[1]
    block_t = WEIGHT_GRAD_BLOCK_T
    if ksize == 1 and x.dtype in (torch.float16, torch.bfloat16):
        block_t = WEIGHT_GRAD_BLOCK_T_1X1_16BIT
    block_co, block_ci = channel_block(c_out), channel_block(c_in)
    tiles = triton.cdiv(c_out, block_co) * triton.cdiv(c_in, block_ci) * ksize
    reduction_steps = batch * triton.cdiv(length, block_t)
    if triton.cdiv(length, block_t) >= 2**31:  # the kernel counts time blocks in int32
        raise ValueError(f"causal_conv1d: the weight gradient takes fewer than 2**31 * {block_t} time steps; got "
                         f"grad_out {describe(grad_out)}")
    num_splits = 1 if interpreter_enabled() else weight_grad_splits(x.device, tiles, reduction_steps)
    num_splits = max(1, int(launch_setting("causal_conv1d", "weight_grad_splits", num_splits)))
    grad_w = torch.zeros((num_splits, c_out, c_in, ksize), device=x.device, dtype=torch.float32)
    grad_b = torch.zeros((num_splits, c_out), device=x.device, dtype=torch.float32) if with_bias else None
    if reduction_steps > 0 and c_out > 0 and c_in > 0:
        _conv_weight_grad_kernel[(triton.cdiv(c_out, block_co), triton.cdiv(c_in, block_ci) * ksize, num_splits)](
            grad_w, grad_b if with_bias else grad_w, grad_out, x,
            batch, c_out, c_in, length, kernel_dilation(dilation, length), num_splits,
            *grad_out.stride(), *x.stride(),
            KSIZE=ksize, HAS_BIAS=with_bias, NATIVE_DOT=native_dot(x.device), IEEE=ieee_dot(),
            BLOCK_CO=block_co, BLOCK_CI=block_ci, BLOCK_T=block_t, num_warps=WEIGHT_GRAD_WARPS,
        )
    elif with_bias and c_out > 0:
        grad_b[0] = grad_out.sum((0, 2), dtype=torch.float32)  # zero in-channels: the bias still has a gradient
    return grad_w.sum(0), (grad_b.sum(0) if with_bias else None)


# ----------------------------------------------------------------------------------------------------------------
# torch.library registration (usable under torch.compile(fullgraph=True))
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("genkernels::causal_conv1d", mutates_args=())
def _causal_conv1d_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      dilation: int) -> torch.Tensor:
    return launch_causal_conv(x, weight, bias, dilation)


@_causal_conv1d_op.register_fake
def _causal_conv1d_fake(x, weight, bias, dilation):
    return x.new_empty((x.shape[0], weight.shape[0], x.shape[2]))


@torch.library.custom_op("genkernels::causal_conv1d_backward", mutates_args=())
def _causal_conv1d_backward_op(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, dilation: int,
                               with_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_x = launch_causal_conv(grad_out, weight, None, dilation, reverse=True)
    grad_w, grad_b = launch_conv_weight_grad(grad_out, x, weight.shape[2], dilation, with_bias)
    if grad_b is None:
        grad_b = grad_w.new_zeros((0,))
    return grad_x, grad_w.to(weight.dtype), grad_b.to(weight.dtype)


@_causal_conv1d_backward_op.register_fake
def _causal_conv1d_backward_fake(grad_out, x, weight, dilation, with_bias):
    grad_b = weight.new_empty((weight.shape[0] if with_bias else 0,))
    return x.new_empty(x.shape), weight.new_empty(weight.shape), grad_b


def _causal_conv1d_setup_context(ctx, inputs, output):
    x, weight, bias, dilation = inputs
    ctx.save_for_backward(x, weight)
    ctx.dilation = dilation
    ctx.with_bias = bias is not None


def _causal_conv1d_backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    grad_x, grad_w, grad_b = torch.ops.genkernels.causal_conv1d_backward(grad_out, x, weight, ctx.dilation,
                                                                         ctx.with_bias)
    return grad_x, grad_w, (grad_b if ctx.with_bias else None), None


_causal_conv1d_op.register_autograd(_causal_conv1d_backward, setup_context=_causal_conv1d_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------
# Every op takes FLOAT_DTYPES (fp64 included: runtime.choose_impl runs the eager reference for it). The name stays
# for the modules that import it.
EAGER_DTYPES = FLOAT_DTYPES


def check_kernel_dtype(x: torch.Tensor, name: str, op: str) -> None:
    """Reject dtypes the kernels do not take (fp64) on a direct kernel path; ops that go through
    :func:`genkernels.kernels.runtime.choose_impl` get this (and every other reason) from it."""
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{op}: impl='triton' takes fp32/fp16/bf16; got {name} with {describe(x)}; "
                        "use impl='eager' for float64")


def check_conv_arguments(x: object, weight: object, bias: object, dilation: object, *, x_name: str = "x",
                         weight_name: str = "weight", bias_name: str = "bias") -> torch.device:
    """Validate a causal convolution's ``x [batch, c_in, time]``, ``weight [c_out, c_in, k]``, ``bias [c_out]``
    and ``dilation >= 1``; returns the device. Any kernel size ``k >= 1`` is allowed (even sizes too: WaveNet's
    filters are 2 wide); odd sizes are only required by the centred masked 2-D convolution."""
    check_float_tensor(x, x_name, EAGER_DTYPES)
    check_float_tensor(weight, weight_name, EAGER_DTYPES)
    if x.dim() != 3:
        raise ValueError(f"{x_name} must be 3-D [batch, channels, time]; got {describe(x)}")
    if weight.dim() != 3:
        raise ValueError(f"{weight_name} must be 3-D [out_channels, in_channels, kernel_size]; got {describe(weight)}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"{weight_name} must have in_channels = {x_name}.shape[1] = {x.shape[1]}; "
                         f"got {describe(weight)}")
    if weight.shape[2] < 1:
        raise ValueError(f"{weight_name} must have kernel_size >= 1; got {describe(weight)}")
    check_same_dtype(x, x_name, weight, weight_name)
    named = [(x_name, x), (weight_name, weight)]
    if bias is not None:
        check_float_tensor(bias, bias_name, EAGER_DTYPES)
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{bias_name} must have shape [out_channels] = [{weight.shape[0]}]; got {describe(bias)}")
        check_same_dtype(x, x_name, bias, bias_name)
        named.append((bias_name, bias))
    check_int(dilation, "dilation", low=1)
    return check_same_device(named)


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *, dilation: int = 1,
                  impl: str = "auto") -> torch.Tensor:
    """Dilated causal 1-D convolution, output as long as the input (WaveNet's building block).

        y[b, o, t] = bias[o] + sum_{i, j} W[o, i, j] * x[b, i, t - (k - 1 - j) * d]    (zeros before t = 0)

    Equal to ``F.conv1d(F.pad(x, ((k - 1) * d, 0)), weight, bias, dilation=d)`` without the padded copy.
    Differentiable in ``x``, ``weight`` and ``bias`` (Triton backward kernels).

    Args:
        x: ``[batch, in_channels, time]``, fp32/fp16/bf16/fp64, any strides (any size, 0 included: zero input
            channels give the bias).
        weight: ``[out_channels, in_channels, kernel_size]`` (``nn.Conv1d``'s layout), any kernel size >= 1, any
            strides.
        bias: ``[out_channels]`` or None, any stride.
        dilation: spacing of the taps, any int >= 1 (a dilation of ``time`` or more leaves only the last tap).
        impl: "auto", "triton" or "eager". fp64 runs the eager reference in fp64 (``impl="triton"`` raises
            ``ValueError`` listing why); ``meta`` tensors take the registered op's fake (shapes only).

    Returns:
        ``[batch, out_channels, time]`` in ``x``'s dtype, contiguous (fp32 accumulation; fp32 tiles in TF32 on a
        GPU when ``torch.backends.cudnn.allow_tf32``, as PyTorch's own convolutions). NaN/Inf propagate as in
        ``F.conv1d`` of the zero-padded input.
    """
    check_conv_arguments(x, weight, bias, dilation)
    impl = choose_impl(impl, "causal_conv1d", {"x": x, "weight": weight, "bias": bias})
    if impl == "eager":
        return causal_conv1d_reference(x, weight, bias, dilation)
    return torch.ops.genkernels.causal_conv1d(x, weight, bias, dilation)
