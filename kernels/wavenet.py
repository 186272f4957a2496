"""WaveNet's gated residual layer, fused, and the incremental step that advances a whole WaveNet by one sample.

Residual layer (van den Oord et al. 2016, eq. 2 and Fig. 4), with ``R`` residual, ``D`` gate ("dilation") and
``S`` skip channels:

    h        = causal_conv_d(x; W_conv [2D, R, k]) + b_conv (+ V c)        h = [filter (first D) ; gate (last D)]
    z        = tanh(filter) * sigmoid(gate)                                 [batch, D, time]
    residual = x + W_res z + b_res                                          [batch, R, time]
    skip     = W_skip z + b_skip                                            [batch, S, time]

Passes over the activations (``[batch, *, time]`` tensors):
- forward, one kernel: reads ``x`` (its ``k`` shifted tiles come from cache), writes ``residual`` and ``skip``,
  and, when a gradient is needed, the pre-activation ``h`` (2D channels) for the backward.
- backward, three passes: (1) one kernel reads ``grad_residual``, ``grad_skip`` and ``h``, forms
  ``dz = W_res^T grad_residual + W_skip^T grad_skip`` and the gate derivatives, writes ``dh`` and ``z``;
  (2) ``grad_x = grad_residual + (reverse causal conv of dh)``, one kernel: it needs ``dh`` at later times owned by
  other tiles, hence a pass of its own; (3) the three weight/bias-gradient reductions (``dh`` with ``x``,
  ``grad_residual`` and ``grad_skip`` with ``z``).

Conditioning (``V c`` above): a global ``c [batch, C]`` or local ``c [batch, C, time]`` projected by
``cond_weight [2D, C]`` with one PyTorch GEMM outside the kernel; the kernel adds the projection before the gate.

Incremental step (Fast WaveNet, Paine et al. 2016): see :class:`WaveNetCache` for the cache layout.

Dots: :func:`genkernels.kernels.triton_helpers.dot`: fp16/bf16 tiles go to the tensor cores as they are; fp32 tiles
follow ``torch.backends.cudnn.allow_tf32`` as PyTorch's own fp32 convolutions do (TF32 tensor cores when set, the
default; exact fp32 FMAs when not), read once per call, in the layer, its backward and the step alike. With exact
fp32 (``allow_tf32=False``) the cached step and the layered forward give the same logits up to fp32 summation
order, so an fp32 model samples the same values both ways (the model tests hold this); with TF32 both round their
operands to TF32, but the step multiplies [batch x channels] tiles and the layer [channels x time] tiles, so
their last bits may differ on a GPU. Index arithmetic is
int64 (tap shifts ``(k - 1 - j) * dilation`` pass 2**31 for dilations near 2**30), and every tensor argument may
have any strides (weights and biases too) and any size, 0 included.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .causal_conv import ieee_dot, launch_causal_conv, launch_conv_weight_grad
from .checks import (
    FLOAT_DTYPES,
    check_float_tensor,
    check_int,
    check_same_device,
    check_same_dtype,
    describe,
)
from .launch import batch_chunks, device_limits, native_dot
from .runtime import choose_impl, compute_dtype
from .triton_helpers import dot, sigmoid, tanh

# The fused kernels keep all D gate channels of a time tile in registers.
MAX_GATE_CHANNELS = 256
# The step kernel keeps a layer's weights in registers/shared memory: the widest residual/gate channels that fit
# Hopper's 227 KB (fp32 dots stage fp32 operands, twice the bytes), and the widest skip width.
MAX_STEP_CHANNELS = {torch.float32: 64, torch.float16: 128, torch.bfloat16: 128}
MAX_STEP_SKIP_CHANNELS = 256
COND_NONE, COND_GLOBAL, COND_LOCAL = 0, 1, 2


# ----------------------------------------------------------------------------------------------------------------
# Eager references: the specification, the fallback and the test oracle
# ----------------------------------------------------------------------------------------------------------------
def _add_cond(h: torch.Tensor, cond_proj: Optional[torch.Tensor]) -> torch.Tensor:
    if cond_proj is None:
        return h
    return h + (cond_proj.to(h.dtype)[..., None] if cond_proj.dim() == 2 else cond_proj.to(h.dtype))


def gated_activation(h: torch.Tensor) -> torch.Tensor:
    """``tanh(filter) * sigmoid(gate)`` with ``h = [filter ; gate]`` split along channels (eq. 2)."""
    half = h.shape[1] // 2
    return torch.tanh(h[:, :half]) * torch.sigmoid(h[:, half:])


def _dilated_causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dilation: int) -> torch.Tensor:
    """``h[b, o, t] = bias[o] + sum_{i, j} W[o, i, j] x[b, i, t - (k - 1 - j) d]`` with zeros before ``t = 0``, in
    ``x``'s dtype (the caller picks the compute dtype), for every size including 0 in any dim (no input channels:
    the bias) and any dilation: taps that reach before the start multiply zeros, as the padded convolution does,
    without materializing a padding longer than the sequence."""
    batch, channels, length = x.shape
    out_channels, _, ksize = weight.shape
    pad = (ksize - 1) * dilation
    if min(batch, channels, out_channels, length) > 0 and pad <= length:
        return F.conv1d(F.pad(x, (pad, 0)), weight, bias, dilation=dilation)
    h = bias[None, :, None].expand(batch, out_channels, length)
    for j in range(ksize):
        back = (ksize - 1 - j) * dilation
        if back == 0:
            tap = x
        elif back >= length:
            tap = torch.zeros_like(x)
        else:
            tap = F.pad(x[:, :, :length - back], (back, 0))
        h = h + torch.einsum("oi,bit->bot", weight[:, :, j], tap)
    return h


def wavenet_residual_layer_reference(x, conv_weight, conv_bias, residual_weight, residual_bias, skip_weight,
                                     skip_bias, dilation: int, cond_proj: Optional[torch.Tensor] = None):
    """WaveNet's gated residual layer in plain PyTorch (eq. 2 and Fig. 4 of van den Oord et al. 2016):

        h = causal_conv_d(x, W_conv) + b_conv + cond_proj,  z = tanh(h[:D]) * sigmoid(h[D:])
        residual = x + W_res z + b_res,  skip = W_skip z + b_skip

    ``residual_weight``/``skip_weight`` are ``[out, D]``; ``cond_proj`` is ``[batch, 2D]`` (global) or
    ``[batch, 2D, time]`` (local) or None. Computes in fp32 (fp64 for fp64 inputs); returns ``x``'s dtype. Any size
    may be 0 (an empty reduction gives the bias, e.g. ``skip = b_skip`` for ``D = 0``).
    """
    dtype = compute_dtype(x.dtype)
    h = _add_cond(_dilated_causal_conv(x.to(dtype), conv_weight.to(dtype), conv_bias.to(dtype), dilation),
                  cond_proj)
    z = gated_activation(h)
    residual = x.to(dtype) + torch.einsum("od,bdt->bot", residual_weight.to(dtype), z) \
        + residual_bias.to(dtype)[:, None]
    skip = torch.einsum("od,bdt->bot", skip_weight.to(dtype), z) + skip_bias.to(dtype)[:, None]
    return residual.to(x.dtype), skip.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels: the fused layer
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _residual_layer_fwd_kernel(
    res_ptr, skip_ptr, h_ptr, x_ptr, wc_ptr, bc_ptr, cond_ptr, wr_ptr, br_ptr, ws_ptr, bs_ptr,
    channels, gate_channels, skip_channels, length, dilation, batch_start,
    x_sb, x_sc, x_st, wc_so, wc_si, wc_sk, wr_so, wr_si, ws_so, ws_si, bc_s, br_s, bs_s, cond_sb, cond_sc, cond_st,
    res_sb, res_sc, res_st, skip_sb, skip_sc, skip_st,
    KSIZE: tl.constexpr, HAS_COND: tl.constexpr, STORE_H: tl.constexpr, NATIVE_DOT: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """One [all channels, BLOCK_T] time tile of one sample: conv -> gate -> residual and skip projections.
    The conv reduces over BLOCK_C residual channels per dot; the projections write BLOCK_P (64: warpgroup MMA's
    row count) output channels per dot. The conv weight arrives packed ``[k, 2D, R]`` (R contiguous).
    Every index product (tap shifts ``(k - 1 - j) * dilation``, offsets times strides) is int64."""
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    batch = (batch_start + tl.program_id(1)).to(tl.int64)
    t_mask = t < length
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    d_mask = d < gate_channels
    gate_rows = tl.cast(gate_channels, tl.int64)  # the gate half starts gate_channels rows down
    x_base = x_ptr + batch * x_sb

    # h = dilated causal conv: filter and gate halves as two [BLOCK_D, BLOCK_T] accumulators
    filt = tl.zeros((BLOCK_D, BLOCK_T), dtype=tl.float32)
    gate = tl.zeros((BLOCK_D, BLOCK_T), dtype=tl.float32)
    for j in tl.static_range(KSIZE):
        src = t - (KSIZE - 1 - j) * tl.cast(dilation, tl.int64)
        src_mask = (src >= 0) & t_mask
        for c_start in range(0, channels, BLOCK_C):
            c = (c_start + tl.arange(0, BLOCK_C)).to(tl.int64)
            c_mask = c < channels
            xs = tl.load(x_base + c[:, None] * x_sc + src[None, :] * x_st,
                         mask=c_mask[:, None] & src_mask[None, :], other=0.0)
            w_offsets = d[:, None] * wc_so + c[None, :] * wc_si + j * wc_sk
            w_mask = d_mask[:, None] & c_mask[None, :]
            filt = dot(tl.load(wc_ptr + w_offsets, mask=w_mask, other=0.0), xs, filt, NATIVE_DOT, IEEE)
            gate = dot(tl.load(wc_ptr + gate_rows * wc_so + w_offsets, mask=w_mask, other=0.0), xs, gate,
                       NATIVE_DOT, IEEE)
    filt += tl.load(bc_ptr + d * bc_s, mask=d_mask, other=0.0).to(tl.float32)[:, None]
    gate += tl.load(bc_ptr + (gate_rows + d) * bc_s, mask=d_mask, other=0.0).to(tl.float32)[:, None]
    dt_mask = d_mask[:, None] & t_mask[None, :]
    if HAS_COND:  # global conditioning arrives with cond_st == 0
        cond_offsets = batch * cond_sb + d[:, None] * cond_sc + t[None, :] * cond_st
        filt += tl.load(cond_ptr + cond_offsets, mask=dt_mask, other=0.0).to(tl.float32)
        gate += tl.load(cond_ptr + gate_rows * cond_sc + cond_offsets, mask=dt_mask, other=0.0).to(tl.float32)
    if STORE_H:  # h is a fresh contiguous [batch, 2D, time]
        h_offsets = (batch * 2 * gate_rows + d[:, None]) * length + t[None, :]
        tl.store(h_ptr + h_offsets, filt.to(h_ptr.dtype.element_ty), mask=dt_mask)
        tl.store(h_ptr + gate_rows * length + h_offsets, gate.to(h_ptr.dtype.element_ty), mask=dt_mask)
    z = tanh(filt) * sigmoid(gate)
    z = tl.where(dt_mask, z, 0.0).to(x_ptr.dtype.element_ty)

    # residual = x + W_res z + b_res, one block of output channels at a time
    for c_start in range(0, channels, BLOCK_P):
        c = (c_start + tl.arange(0, BLOCK_P)).to(tl.int64)
        c_mask = c < channels
        w = tl.load(wr_ptr + c[:, None] * wr_so + d[None, :] * wr_si, mask=c_mask[:, None] & d_mask[None, :],
                    other=0.0)
        out = dot(w, z, tl.zeros((BLOCK_P, BLOCK_T), dtype=tl.float32), NATIVE_DOT, IEEE)
        out += tl.load(br_ptr + c * br_s, mask=c_mask, other=0.0).to(tl.float32)[:, None]
        out_mask = c_mask[:, None] & t_mask[None, :]
        out += tl.load(x_base + c[:, None] * x_sc + t[None, :] * x_st, mask=out_mask, other=0.0).to(tl.float32)
        tl.store(res_ptr + batch * res_sb + c[:, None] * res_sc + t[None, :] * res_st,
                 out.to(res_ptr.dtype.element_ty), mask=out_mask)
    # skip = W_skip z + b_skip (just the bias when D = 0)
    for s_start in range(0, skip_channels, BLOCK_P):
        s = (s_start + tl.arange(0, BLOCK_P)).to(tl.int64)
        s_mask = s < skip_channels
        w = tl.load(ws_ptr + s[:, None] * ws_so + d[None, :] * ws_si, mask=s_mask[:, None] & d_mask[None, :],
                    other=0.0)
        out = dot(w, z, tl.zeros((BLOCK_P, BLOCK_T), dtype=tl.float32), NATIVE_DOT, IEEE)
        out += tl.load(bs_ptr + s * bs_s, mask=s_mask, other=0.0).to(tl.float32)[:, None]
        tl.store(skip_ptr + batch * skip_sb + s[:, None] * skip_sc + t[None, :] * skip_st,
                 out.to(skip_ptr.dtype.element_ty), mask=s_mask[:, None] & t_mask[None, :])


@triton.jit
def _accumulate_transposed_projection(acc, g_ptr, g_sb, g_sc, g_st, w_ptr, w_so, w_si, out_channels, batch, d,
                                      d_mask, t, t_mask, NATIVE_DOT: tl.constexpr, IEEE: tl.constexpr,
                                      BLOCK_C: tl.constexpr):
    """``acc + W^T g`` for a 1x1 projection ``W`` ``[out_channels, D]`` and the gradient ``g`` of its output
    ``[out_channels, time]`` at sample ``batch``, rows ``d`` and times ``t`` (int64) of the tile."""
    for c_start in range(0, out_channels, BLOCK_C):
        c = (c_start + tl.arange(0, BLOCK_C)).to(tl.int64)
        c_mask = c < out_channels
        g = tl.load(g_ptr + batch * g_sb + c[:, None] * g_sc + t[None, :] * g_st,
                    mask=c_mask[:, None] & t_mask[None, :], other=0.0)
        w_t = tl.load(w_ptr + c[None, :] * w_so + d[:, None] * w_si, mask=c_mask[None, :] & d_mask[:, None],
                      other=0.0)
        acc = dot(w_t, g, acc, NATIVE_DOT, IEEE)
    return acc


@triton.jit
def _residual_layer_bwd_gate_kernel(
    dh_ptr, z_ptr, h_ptr, g_res_ptr, g_skip_ptr, wr_ptr, ws_ptr,
    channels, gate_channels, skip_channels, length, batch_start,
    g_res_sb, g_res_sc, g_res_st, g_skip_sb, g_skip_sc, g_skip_st, wr_so, wr_si, ws_so, ws_si,
    NATIVE_DOT: tl.constexpr, IEEE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Backward pass 1: ``dz = W_res^T g_res + W_skip^T g_skip``, then through the gate:
    ``d filter = dz * sigmoid(gate) * (1 - tanh(filter)^2)``, ``d gate = dz * tanh(filter) * s (1 - s)``.
    Writes ``dh`` and ``z`` (both fresh contiguous tensors) for the input- and weight-gradient passes."""
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    batch = (batch_start + tl.program_id(1)).to(tl.int64)
    t_mask = t < length
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    d_mask = d < gate_channels
    gate_rows = tl.cast(gate_channels, tl.int64)
    dz = tl.zeros((BLOCK_D, BLOCK_T), dtype=tl.float32)
    dz = _accumulate_transposed_projection(dz, g_res_ptr, g_res_sb, g_res_sc, g_res_st, wr_ptr, wr_so, wr_si,
                                           channels, batch, d, d_mask, t, t_mask, NATIVE_DOT, IEEE, BLOCK_C)
    dz = _accumulate_transposed_projection(dz, g_skip_ptr, g_skip_sb, g_skip_sc, g_skip_st, ws_ptr, ws_so, ws_si,
                                           skip_channels, batch, d, d_mask, t, t_mask, NATIVE_DOT, IEEE,
                                           BLOCK_C)
    dt_mask = d_mask[:, None] & t_mask[None, :]
    h_offsets = (batch * 2 * gate_rows + d[:, None]) * length + t[None, :]
    filt = tl.load(h_ptr + h_offsets, mask=dt_mask, other=0.0).to(tl.float32)
    gate = tl.load(h_ptr + gate_rows * length + h_offsets, mask=dt_mask, other=0.0).to(tl.float32)
    tanh_f = tanh(filt)
    sig_g = sigmoid(gate)
    d_filt = dz * sig_g * (1.0 - tanh_f * tanh_f)
    d_gate = dz * tanh_f * sig_g * (1.0 - sig_g)
    tl.store(dh_ptr + h_offsets, d_filt.to(dh_ptr.dtype.element_ty), mask=dt_mask)
    tl.store(dh_ptr + gate_rows * length + h_offsets, d_gate.to(dh_ptr.dtype.element_ty), mask=dt_mask)
    z_offsets = (batch * gate_rows + d[:, None]) * length + t[None, :]
    tl.store(z_ptr + z_offsets, (tanh_f * sig_g).to(z_ptr.dtype.element_ty), mask=dt_mask)


LAYER_BLOCK_C = 32
# Output channels per projection dot: warpgroup MMA (sm_90) takes 64-row tiles (32 rows fell back to mma.sync).
LAYER_BLOCK_P = 64


def _layer_blocks(gate_channels: int) -> tuple[int, int, int]:
    """``(BLOCK_D, BLOCK_T, num_warps)``: every gate channel in one tile; shorter time tiles and 8 warps for wide
    gates (128 gate channels at 4 warps: 255 registers and spills)."""
    block_d = max(16, triton.next_power_of_2(gate_channels))
    return block_d, (64 if block_d <= 64 else 32), (4 if block_d <= 64 else 8)


def _layer_stages(x: torch.Tensor, block_d: int) -> int:
    """Software-pipeline depth of the fused forward: 3, or 2 for fp32 wide-gate tiles on a GPU whose CTAs get less
    than 128 KB of shared memory (3 stages need 120 KB there: sm_86/sm_89 give 99 KB)."""
    if x.dtype == torch.float32 and block_d > 64 and device_limits(x.device).shared_memory_per_cta < 128 * 1024:
        return 2
    return 3


def _launch_residual_layer_forward(x, conv_weight, conv_bias, cond_proj, residual_weight, residual_bias,
                                   skip_weight, skip_bias, dilation: int, save_h: bool):
    batch, channels, length = x.shape
    gate_channels = conv_weight.shape[0] // 2
    skip_channels = skip_weight.shape[0]
    residual = torch.empty_like(x, memory_format=torch.contiguous_format)
    skip = x.new_empty((batch, skip_channels, length))
    h = x.new_empty((batch, 2 * gate_channels, length) if save_h else (0,))
    if batch == 0 or length == 0:  # every output is empty; any other zero size (R, D, S) still writes the rest
        return residual, skip, h
    if cond_proj is None:
        cond_strides = (0, 0, 0)
    elif cond_proj.dim() == 2:
        cond_strides = (cond_proj.stride(0), cond_proj.stride(1), 0)
    else:
        cond_strides = cond_proj.stride()
    block_d, block_t, num_warps = _layer_blocks(gate_channels)
    # the conv weight in the layout the reduction walks, [k, 2D, R] with R contiguous (a small copy): its tiles
    # load 16 bytes at a time, not one element per stride-k step
    packed = conv_weight.permute(2, 0, 1).contiguous()
    wc_sk, wc_so, wc_si = packed.stride()
    for start, count in batch_chunks(batch):
        _residual_layer_fwd_kernel[(triton.cdiv(length, block_t), count)](
            residual, skip, h if save_h else residual, x, packed, conv_bias,
            cond_proj if cond_proj is not None else x, residual_weight, residual_bias, skip_weight, skip_bias,
            channels, gate_channels, skip_channels, length, dilation, start,
            *x.stride(), wc_so, wc_si, wc_sk, *residual_weight.stride(), *skip_weight.stride(),
            conv_bias.stride(0), residual_bias.stride(0), skip_bias.stride(0), *cond_strides,
            *residual.stride(), *skip.stride(),
            KSIZE=conv_weight.shape[2], HAS_COND=cond_proj is not None, STORE_H=save_h,
            NATIVE_DOT=native_dot(x.device), IEEE=ieee_dot(), BLOCK_D=block_d, BLOCK_C=LAYER_BLOCK_C,
            BLOCK_P=LAYER_BLOCK_P, BLOCK_T=block_t, num_warps=num_warps, num_stages=_layer_stages(x, block_d),
        )
    return residual, skip, h


def _weight_and_bias_grad(grad_out: torch.Tensor, x: torch.Tensor, ksize: int,
                          dilation: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 gradients of a causal conv's weight ``[c_out, c_in, k]`` and bias ``[c_out]``; an empty reduction
    (no samples, time steps or input channels) or no output channels gives zeros and the bias its plain sum."""
    batch, c_out, length = grad_out.shape
    if min(batch, c_out, x.shape[1], length) == 0:
        grad_w = torch.zeros((c_out, x.shape[1], ksize), device=x.device, dtype=torch.float32)
        return grad_w, grad_out.sum((0, 2), dtype=torch.float32)
    return launch_conv_weight_grad(grad_out, x, ksize, dilation, True)


def _launch_residual_layer_backward(grad_residual, grad_skip, x, h, conv_weight, residual_weight, skip_weight,
                                    dilation: int):
    batch, channels, length = x.shape
    gate_channels = conv_weight.shape[0] // 2
    dh = x.new_empty((batch, 2 * gate_channels, length))
    z = x.new_empty((batch, gate_channels, length))
    block_d, block_t, num_warps = _layer_blocks(gate_channels)
    if batch > 0 and length > 0:
        for start, count in batch_chunks(batch):
            _residual_layer_bwd_gate_kernel[(triton.cdiv(length, block_t), count)](
                dh, z, h, grad_residual, grad_skip, residual_weight, skip_weight,
                channels, gate_channels, skip_weight.shape[0], length, start,
                *grad_residual.stride(), *grad_skip.stride(), *residual_weight.stride(), *skip_weight.stride(),
                NATIVE_DOT=native_dot(x.device), IEEE=ieee_dot(), BLOCK_D=block_d, BLOCK_C=LAYER_BLOCK_C,
                BLOCK_T=block_t, num_warps=num_warps,
            )
    grad_x = launch_causal_conv(dh, conv_weight, None, dilation, reverse=True, add=grad_residual)
    grad_wc, grad_bc = _weight_and_bias_grad(dh, x, conv_weight.shape[2], dilation)
    grad_wr, grad_br = _weight_and_bias_grad(grad_residual, z, 1, 1)
    grad_ws, grad_bs = _weight_and_bias_grad(grad_skip, z, 1, 1)
    return grad_x, dh, grad_wc, grad_bc, grad_wr[..., 0], grad_br, grad_ws[..., 0], grad_bs


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel: the incremental step
# ----------------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["position"])
def _wavenet_step_kernel(
    skip_out_ptr, x_ptr, cache_ptr, table_ptr, heads_ptr, wc_ptr, bc_ptr, cond_ptr, wr_ptr, br_ptr, ws_ptr, bs_ptr,
    batch, num_layers, channels, gate_channels, skip_channels, position,
    x_sb, x_sc, cache_ss, cache_sb, cache_sc, wc_sl, wc_so, wc_si, wc_sk, bc_sl, bc_so, cond_sl, cond_sb, cond_sc,
    wr_sl, wr_so, wr_si, br_sl, br_so, ws_sl, ws_so, ws_si, bs_sl, bs_so, skip_sb, skip_sc,
    KSIZE: tl.constexpr, HAS_COND: tl.constexpr, NATIVE_DOT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Time step ``position`` of every residual layer for BLOCK_B samples and BLOCK_S skip channels (program
    ``(i, k)``: samples ``i * BLOCK_B + ...``, skip channels ``k * BLOCK_S + ...``). Every program runs the whole
    residual chain of its samples (each layer needs all R channels of the last); the skip projection, the widest
    matrix, is split over the programs. Programs ``(i, 0)`` write the layers' inputs to the ring buffers, and
    program ``(0, 0)`` the next ring heads. Each layer's taps are read from its ring before its input is
    written there (the extra slot keeps that write off every slot read).

    Ring slots without division: ``heads[position % 2, l]`` holds ``position mod q_l`` (the launcher keeps it
    current); tap ``j`` sits ``back = (KSIZE-1-j) d_l < q_l`` slots behind, wrapped by one conditional add, and
    ``heads[(position + 1) % 2, l]`` gets ``(position + 1) mod q_l`` by one conditional subtract. The table's
    dilations, offsets and queue lengths, and so the slots, are int64."""
    # Offsets inside one layer's weights, inside one cache slot and inside one layer's conditioning are int32 (the
    # launcher makes sure they stay below 2**31); layer and slot bases, and x and the output, are int64.
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    b64 = b.to(tl.int64)
    skip_block = tl.program_id(1)
    b_mask = b < batch
    c = tl.arange(0, BLOCK_C)
    d = tl.arange(0, BLOCK_D)
    s = skip_block * BLOCK_S + tl.arange(0, BLOCK_S)
    c_mask = c < channels
    d_mask = d < gate_channels
    s_mask = s < skip_channels
    now = tl.cast(position, tl.int64)
    parity = now & 1
    heads_now = heads_ptr + parity * num_layers
    heads_next = heads_ptr + (1 - parity) * num_layers
    writes_cache = skip_block == 0
    writes_heads = writes_cache & (tl.program_id(0) == 0)
    bc_mask = b_mask[:, None] & c_mask[None, :]
    cd_mask = c_mask[:, None] & d_mask[None, :]
    x = tl.load(x_ptr + b64[:, None] * x_sb + c[None, :].to(tl.int64) * x_sc, mask=bc_mask, other=0.0).to(
        tl.float32)
    skip = tl.zeros((BLOCK_B, BLOCK_S), dtype=tl.float32)
    cache_rows = b[:, None] * cache_sb + c[None, :] * cache_sc
    wc_offsets = d[None, :] * wc_so + c[:, None] * wc_si  # [C, D] = W[d, c, j]^T at tap j
    wc_gate = gate_channels * wc_so
    wr_offsets = c[None, :] * wr_so + d[:, None] * wr_si  # [D, C]
    ws_offsets = s[None, :] * ws_so + d[:, None] * ws_si  # [D, BLOCK_S]
    for layer_index in range(num_layers):
        layer = tl.cast(layer_index, tl.int64)
        dilation = tl.load(table_ptr + 3 * layer)
        first_slot = tl.load(table_ptr + 3 * layer + 1)
        queue = tl.load(table_ptr + 3 * layer + 2)
        head = tl.load(heads_now + layer)  # position mod queue
        wc_layer = wc_ptr + layer * wc_sl
        # the taps: [BLOCK_B, C] rows of past inputs (tap KSIZE-1 is the current input x)
        filt = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
        gate = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
        for j in range(KSIZE):  # a loop, not unrolled: one tap's weights on chip at a time
            if j == KSIZE - 1:
                tap = x.to(cache_ptr.dtype.element_ty)
            else:
                back = (KSIZE - 1 - j) * dilation
                behind = head - back
                slot = first_slot + tl.where(behind < 0, behind + queue, behind)
                valid = (tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.int32) + (back <= now).to(tl.int32)) != 0
                tap = tl.load(cache_ptr + slot * cache_ss + cache_rows, mask=bc_mask & valid, other=0.0)
            w_tap = wc_layer + j * wc_sk
            filt = dot(tap, tl.load(w_tap + wc_offsets, mask=cd_mask, other=0.0), filt, NATIVE_DOT, IEEE)
            gate = dot(tap, tl.load(w_tap + wc_gate + wc_offsets, mask=cd_mask, other=0.0), gate, NATIVE_DOT, IEEE)
        if KSIZE > 1:
            if writes_cache:
                tl.store(cache_ptr + (first_slot + head) * cache_ss + cache_rows,
                         x.to(cache_ptr.dtype.element_ty), mask=bc_mask)
        if writes_heads:
            next_head = head + 1
            tl.store(heads_next + layer, tl.where(next_head == queue, 0, next_head))
        bc_layer = bc_ptr + layer * bc_sl
        filt += tl.load(bc_layer + d * bc_so, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        gate += tl.load(bc_layer + (gate_channels + d) * bc_so, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_COND:
            cond_offsets = b[:, None] * cond_sb + d[None, :] * cond_sc
            cond_layer = cond_ptr + layer * cond_sl
            bd_mask = b_mask[:, None] & d_mask[None, :]
            filt += tl.load(cond_layer + cond_offsets, mask=bd_mask, other=0.0).to(tl.float32)
            gate += tl.load(cond_layer + gate_channels * cond_sc + cond_offsets, mask=bd_mask, other=0.0).to(
                tl.float32)
        z = tanh(filt) * sigmoid(gate)
        z = tl.where(d_mask[None, :], z, 0.0).to(cache_ptr.dtype.element_ty)
        w_res = tl.load(wr_ptr + layer * wr_sl + wr_offsets, mask=d_mask[:, None] & c_mask[None, :], other=0.0)
        x = dot(z, w_res, x, NATIVE_DOT, IEEE)
        x += tl.load(br_ptr + layer * br_sl + c * br_so, mask=c_mask, other=0.0).to(tl.float32)[None, :]
        # the layered forward stores each residual output in the model's dtype: round the same way
        x = x.to(cache_ptr.dtype.element_ty).to(tl.float32)
        w_skip = tl.load(ws_ptr + layer * ws_sl + ws_offsets, mask=d_mask[:, None] & s_mask[None, :], other=0.0)
        skip = dot(z, w_skip, skip, NATIVE_DOT, IEEE)
        skip += tl.load(bs_ptr + layer * bs_sl + s * bs_so, mask=s_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(skip_out_ptr + b64[:, None] * skip_sb + s[None, :].to(tl.int64) * skip_sc,
             skip.to(skip_out_ptr.dtype.element_ty), mask=b_mask[:, None] & s_mask[None, :])


STEP_BLOCK_B = 16
# Skip channels per step program: the skip projection is split over programs (a 64-wide block each).
STEP_BLOCK_S = 64
STEP_STAGES = 1


def _step_num_warps(block_c: int, block_d: int, block_s: int) -> int:
    return 8


def _inner_extent(tensor: torch.Tensor) -> int:
    """The largest offset inside one ``tensor[i]`` (0 for empty tensors)."""
    if tensor.numel() == 0:
        return 0
    return sum((size - 1) * abs(stride) for size, stride in zip(tensor.shape[1:], tensor.stride()[1:]))


def _int32_layers(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``tensor`` as is when offsets inside one layer fit int32 (the step kernel's index width there), else a
    contiguous copy (whose layers are the tensor's own size, which the channel limits keep small)."""
    if tensor is None or _inner_extent(tensor) < 2**31 - 1:
        return tensor
    return tensor.contiguous()


def _launch_wavenet_step(x, cache_buffer, layer_table, ring_heads, position, conv_weight, conv_bias, cond_proj,
                         residual_weight, residual_bias, skip_weight, skip_bias):
    batch, channels = x.shape
    num_layers, two_d, _, ksize = conv_weight.shape
    gate_channels, skip_channels = two_d // 2, skip_weight.shape[1]
    skip = x.new_empty((batch, skip_channels))
    if batch == 0:
        return skip
    # the kernel's offsets inside one layer (and one cache slot) are int32: copy any stacked tensor whose
    # per-layer extent could pass 2**31 (strided views of small weights; a contiguous layer is tiny)
    conv_weight, conv_bias, residual_weight, residual_bias, skip_weight, skip_bias, cond_proj = (
        _int32_layers(t) for t in (conv_weight, conv_bias, residual_weight, residual_bias, skip_weight, skip_bias,
                                   cond_proj))
    cond_strides = cond_proj.stride() if cond_proj is not None else (0, 0, 0)
    block_c, block_d = (max(16, triton.next_power_of_2(n)) for n in (channels, gate_channels))
    block_s = max(16, min(STEP_BLOCK_S, triton.next_power_of_2(skip_channels)))
    grid = (triton.cdiv(batch, STEP_BLOCK_B), max(1, triton.cdiv(skip_channels, block_s)))
    _wavenet_step_kernel[grid](
        skip, x, cache_buffer, layer_table, ring_heads, conv_weight, conv_bias,
        cond_proj if cond_proj is not None else x, residual_weight, residual_bias, skip_weight, skip_bias,
        batch, num_layers, channels, gate_channels, skip_channels, position,
        *x.stride(), *cache_buffer.stride(), *conv_weight.stride(), *conv_bias.stride(), *cond_strides,
        *residual_weight.stride(), *residual_bias.stride(), *skip_weight.stride(), *skip_bias.stride(),
        *skip.stride(),
        KSIZE=ksize, HAS_COND=cond_proj is not None, NATIVE_DOT=native_dot(x.device), IEEE=ieee_dot(),
        BLOCK_B=STEP_BLOCK_B, BLOCK_C=block_c, BLOCK_D=block_d, BLOCK_S=block_s,
        num_warps=_step_num_warps(block_c, block_d, block_s), num_stages=STEP_STAGES,
    )
    return skip


# ----------------------------------------------------------------------------------------------------------------
# torch.library registration (usable under torch.compile(fullgraph=True))
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("genkernels::wavenet_residual_layer", mutates_args=())
def _residual_layer_op(x: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor,
                       cond_proj: Optional[torch.Tensor], residual_weight: torch.Tensor, residual_bias: torch.Tensor,
                       skip_weight: torch.Tensor, skip_bias: torch.Tensor, dilation: int,
                       save_for_backward: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_residual_layer_forward(x, conv_weight, conv_bias, cond_proj, residual_weight, residual_bias,
                                          skip_weight, skip_bias, dilation, save_for_backward)


@_residual_layer_op.register_fake
def _residual_layer_fake(x, conv_weight, conv_bias, cond_proj, residual_weight, residual_bias, skip_weight,
                         skip_bias, dilation, save_for_backward):
    batch, _, length = x.shape
    h_shape = (batch, conv_weight.shape[0], length) if save_for_backward else (0,)
    return (x.new_empty(x.shape), x.new_empty((batch, skip_weight.shape[0], length)), x.new_empty(h_shape))


# grad_x, dh, and the gradients of conv weight, conv bias, residual weight, residual bias, skip weight, skip bias
_LayerGradients = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                        torch.Tensor, torch.Tensor]


@torch.library.custom_op("genkernels::wavenet_residual_layer_backward", mutates_args=())
def _residual_layer_backward_op(grad_residual: torch.Tensor, grad_skip: torch.Tensor, x: torch.Tensor,
                                h: torch.Tensor, conv_weight: torch.Tensor, residual_weight: torch.Tensor,
                                skip_weight: torch.Tensor, dilation: int) -> _LayerGradients:
    grad_x, dh, *weight_grads = _launch_residual_layer_backward(grad_residual, grad_skip, x, h, conv_weight,
                                                                residual_weight, skip_weight, dilation)
    return (grad_x, dh) + tuple(g.to(conv_weight.dtype) for g in weight_grads)


@_residual_layer_backward_op.register_fake
def _residual_layer_backward_fake(grad_residual, grad_skip, x, h, conv_weight, residual_weight, skip_weight,
                                  dilation):
    two_d = conv_weight.shape[0]
    return (x.new_empty(x.shape), x.new_empty((x.shape[0], two_d, x.shape[2])), torch.empty_like(conv_weight),
            conv_weight.new_empty((two_d,)), torch.empty_like(residual_weight),
            residual_weight.new_empty((residual_weight.shape[0],)), torch.empty_like(skip_weight),
            skip_weight.new_empty((skip_weight.shape[0],)))


def _residual_layer_setup_context(ctx, inputs, output):
    x, conv_weight, _, cond_proj, residual_weight, _, skip_weight, _, dilation, _ = inputs
    ctx.save_for_backward(x, output[2], conv_weight, residual_weight, skip_weight)
    ctx.dilation = dilation
    ctx.cond_rank = None if cond_proj is None else cond_proj.dim()


def _residual_layer_backward(ctx, grad_residual, grad_skip, _grad_h):
    x, h, conv_weight, residual_weight, skip_weight = ctx.saved_tensors
    if h.dim() != 3:  # the forward kept no pre-activation (the placeholder [0])
        raise RuntimeError("wavenet_residual_layer was called with save_for_backward=False; cannot differentiate")
    if grad_residual is None:
        grad_residual = torch.zeros_like(x)
    if grad_skip is None:
        grad_skip = x.new_zeros((x.shape[0], skip_weight.shape[0], x.shape[2]))
    grad_x, dh, grad_wc, grad_bc, grad_wr, grad_br, grad_ws, grad_bs = \
        torch.ops.genkernels.wavenet_residual_layer_backward(grad_residual, grad_skip, x, h, conv_weight,
                                                             residual_weight, skip_weight, ctx.dilation)
    grad_cond = None
    if ctx.cond_rank == 2:
        grad_cond = dh.sum(-1, dtype=torch.float32).to(dh.dtype)
    elif ctx.cond_rank == 3:
        grad_cond = dh
    return grad_x, grad_wc, grad_bc, grad_cond, grad_wr, grad_br, grad_ws, grad_bs, None, None


_residual_layer_op.register_autograd(_residual_layer_backward, setup_context=_residual_layer_setup_context)


@torch.library.custom_op("genkernels::wavenet_step", mutates_args=("cache_buffer", "ring_heads"))
def _wavenet_step_op(x: torch.Tensor, cache_buffer: torch.Tensor, layer_table: torch.Tensor,
                     ring_heads: torch.Tensor, position: int, conv_weight: torch.Tensor, conv_bias: torch.Tensor,
                     cond_proj: Optional[torch.Tensor], residual_weight: torch.Tensor, residual_bias: torch.Tensor,
                     skip_weight: torch.Tensor, skip_bias: torch.Tensor) -> torch.Tensor:
    return _launch_wavenet_step(x, cache_buffer, layer_table, ring_heads, position, conv_weight, conv_bias,
                                cond_proj, residual_weight, residual_bias, skip_weight, skip_bias)


@_wavenet_step_op.register_fake
def _wavenet_step_fake(x, cache_buffer, layer_table, ring_heads, position, conv_weight, conv_bias, cond_proj,
                       residual_weight, residual_bias, skip_weight, skip_bias):
    return x.new_empty((x.shape[0], skip_weight.shape[1]))


# ----------------------------------------------------------------------------------------------------------------
# Public functions: the fused layer
# ----------------------------------------------------------------------------------------------------------------
def _as_projection(weight: object, name: str, out_channels: Optional[int], in_channels: int) -> torch.Tensor:
    """A 1x1 projection weight as ``[out, in]``: accepts ``[out, in]`` or ``nn.Conv1d``'s ``[out, in, 1]``."""
    check_float_tensor(weight, name)
    if weight.dim() == 3 and weight.shape[2] == 1:
        weight = weight[..., 0]
    if weight.dim() != 2 or weight.shape[1] != in_channels or (out_channels is not None
                                                               and weight.shape[0] != out_channels):
        expected = f"[{'out' if out_channels is None else out_channels}, {in_channels}]"
        raise ValueError(f"{name} must have shape {expected} (or {expected[:-1]}, 1]); got {describe(weight)}")
    return weight


def _bias_or_zeros(bias: object, name: str, size: int, like: torch.Tensor) -> torch.Tensor:
    if bias is None:
        return like.new_zeros((size,))
    check_float_tensor(bias, name)
    if bias.dim() != 1 or bias.shape[0] != size:
        raise ValueError(f"{name} must have shape [{size}]; got {describe(bias)}")
    return bias


def _check_layer_conv(x: object, conv_weight: object) -> int:
    """Validate ``x [batch, R, time]`` and ``conv_weight [2D, R, k]``; returns ``D`` (0 is allowed)."""
    check_float_tensor(x, "x")
    if x.dim() != 3:
        raise ValueError(f"x must be 3-D [batch, residual_channels, time]; got {describe(x)}")
    check_float_tensor(conv_weight, "conv_weight")
    if conv_weight.dim() != 3 or conv_weight.shape[1] != x.shape[1] or conv_weight.shape[2] < 1 \
            or conv_weight.shape[0] % 2 != 0:
        raise ValueError(f"conv_weight must be [2D, R, k] with R = x.shape[1] = {x.shape[1]}, an even number 2D of "
                         f"output channels (filter and gate halves) and k >= 1; got {describe(conv_weight)}")
    check_same_dtype(x, "x", conv_weight, "conv_weight")
    return conv_weight.shape[0] // 2


def _cond_projection(cond, cond_weight, gate_width: int, x: torch.Tensor) -> Optional[torch.Tensor]:
    """``V c``: ``[batch, 2D]`` for global ``c [batch, C]``, ``[batch, 2D, time]`` for local ``c [batch, C, time]``."""
    if cond is None and cond_weight is None:
        return None
    if cond is None or cond_weight is None:
        missing = "cond" if cond is None else "cond_weight"
        raise ValueError(f"{missing} is None: conditioning needs both cond and cond_weight")
    check_float_tensor(cond, "cond")
    check_same_dtype(x, "x", cond, "cond")
    if cond.dim() not in (2, 3) or cond.shape[0] != x.shape[0] or (cond.dim() == 3 and cond.shape[2] != x.shape[2]):
        raise ValueError(f"cond must be [batch, C] = [{x.shape[0]}, C] (global) or [batch, C, time] = "
                         f"[{x.shape[0]}, C, {x.shape[2]}] (local); got {describe(cond)}")
    weight = _as_projection(cond_weight, "cond_weight", gate_width, cond.shape[1])
    check_same_dtype(x, "x", weight, "cond_weight")
    check_same_device([("x", x), ("cond", cond), ("cond_weight", weight)])
    if cond.dim() == 2:
        return F.linear(cond, weight)
    return torch.einsum("oc,bct->bot", weight, cond)


def wavenet_residual_layer(x: torch.Tensor, conv_weight: torch.Tensor, conv_bias: Optional[torch.Tensor],
                           residual_weight: torch.Tensor, residual_bias: Optional[torch.Tensor],
                           skip_weight: torch.Tensor, skip_bias: Optional[torch.Tensor], *, dilation: int,
                           cond: Optional[torch.Tensor] = None, cond_weight: Optional[torch.Tensor] = None,
                           impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """One gated residual WaveNet layer, fused (van den Oord et al. 2016, eq. 2-3 and Fig. 4):

        h = causal_conv_d(x, W_conv) + b_conv (+ V c),   z = tanh(h[:, :D]) * sigmoid(h[:, D:])
        residual_out = x + W_res z + b_res,              skip_out = W_skip z + b_skip

    Forward is one pass over the activations, backward three (see the module docstring).

    Args:
        x: ``[batch, R, time]`` (R residual channels), fp32/fp16/bf16 (fp64 runs the eager reference), any strides.
        conv_weight: ``[2D, R, k]``: the first D output channels are the filter, the last D the gate; any k >= 1.
        conv_bias: ``[2D]`` or None.
        residual_weight: ``[R, D]`` or ``[R, D, 1]``; residual_bias ``[R]`` or None.
        skip_weight: ``[S, D]`` or ``[S, D, 1]``; skip_bias ``[S]`` or None.
        dilation: spacing of the causal taps, an int >= 1 (any size: taps before the start read zeros).
        cond, cond_weight: optional conditioning ``c``: global ``[batch, C]`` or local ``[batch, C, time]``,
            projected by ``cond_weight [2D, C]`` (or ``[2D, C, 1]``) and added to ``h`` before the gate.
        impl: "auto", "triton" or "eager".

    Every tensor may have any strides (weights and biases included) and any size may be 0: an empty reduction
    gives the math's value (``R = 0``: ``h`` is the bias; ``D = 0``: ``skip_out = b_skip``).

    Returns:
        ``(residual_out [batch, R, time], skip_out [batch, S, time])`` in ``x``'s dtype.
    """
    gate_channels = _check_layer_conv(x, conv_weight)
    two_d, channels = conv_weight.shape[0], x.shape[1]
    dilation = check_int(dilation, "dilation", low=1)
    residual_weight = _as_projection(residual_weight, "residual_weight", channels, gate_channels)
    skip_weight = _as_projection(skip_weight, "skip_weight", None, gate_channels)
    conv_bias = _bias_or_zeros(conv_bias, "conv_bias", two_d, conv_weight)
    residual_bias = _bias_or_zeros(residual_bias, "residual_bias", channels, residual_weight)
    skip_bias = _bias_or_zeros(skip_bias, "skip_bias", skip_weight.shape[0], skip_weight)
    named = {"x": x, "conv_weight": conv_weight, "conv_bias": conv_bias, "residual_weight": residual_weight,
             "residual_bias": residual_bias, "skip_weight": skip_weight, "skip_bias": skip_bias}
    for name, tensor in named.items():
        check_same_dtype(x, "x", tensor, name)
    check_same_device(named.items())
    cond_proj = _cond_projection(cond, cond_weight, two_d, x)
    reasons = []
    if gate_channels > MAX_GATE_CHANNELS:
        reasons.append(f"the kernels keep the D = {gate_channels} gate channels of conv_weight {describe(conv_weight)}"
                       f" in registers and take D <= {MAX_GATE_CHANNELS}")
    # every tensor was checked to share x's dtype and device: x stands for them all in the dtype and device reasons
    impl = choose_impl(impl, "wavenet_residual_layer", {"x": x}, reasons)
    if impl == "eager":
        return wavenet_residual_layer_reference(x, conv_weight, conv_bias, residual_weight, residual_bias,
                                                skip_weight, skip_bias, dilation, cond_proj)
    tensors = (x, conv_weight, conv_bias, cond_proj, residual_weight, residual_bias, skip_weight, skip_bias)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    residual, skip, _ = torch.ops.genkernels.wavenet_residual_layer(*tensors, dilation, save)
    return residual, skip


# ----------------------------------------------------------------------------------------------------------------
# Public functions: incremental sampling
# ----------------------------------------------------------------------------------------------------------------
class WaveNetCache:
    """Per-layer ring buffers of past layer inputs for one-sample-at-a-time WaveNet generation.

    Layout: ``buffer`` is ``[slots, batch, R]``; layer ``l`` (dilation ``d_l``, kernel size ``k``) owns the
    ``q_l = (k - 1) * d_l + 1`` slots starting at ``offset_l`` and stores its input of time ``t`` in slot
    ``offset_l + t mod q_l``. A step at time ``t`` reads tap ``j < k - 1`` (time ``t - (k - 1 - j) d_l``) from
    its slot before writing time ``t``; the extra slot keeps that write off every slot the step reads. Taps before
    time 0 are zeros (masked), so the buffer needs no initialization. ``layer_table`` (int64
    ``[layers, 3]``, on the device) holds ``(d_l, offset_l, q_l)``, and ``offsets``/``queues`` the same numbers on
    the host; ``position`` is the next time step. ``ring_heads`` (int64 ``[2, layers]``, on the device) holds
    ``position mod q_l`` in row ``position % 2`` while ``heads_position == position``: the Triton step reads its
    slots from it without dividing and writes the next row; the eager step leaves it, and the Triton step
    rebuilds it (on the device, no host sync) when ``heads_position`` is behind.

    Args:
        dilations: the layers' dilations, a non-empty sequence of ints >= 1.
        kernel_size: the width ``k >= 1`` of the layers' dilated convolutions.
        batch_size: sequences generated together (>= 0); channels: the residual width ``R`` (>= 0).
        device, dtype: where the queues live and their floating-point dtype (the model's).
    """

    def __init__(self, dilations: Sequence[int], kernel_size: int, batch_size: int, channels: int,
                 device=None, dtype: torch.dtype = torch.float32):
        if isinstance(dilations, (str, bytes)) or not isinstance(dilations, Sequence):
            raise TypeError(f"dilations must be a sequence of ints >= 1 (a list or tuple), got "
                            f"{type(dilations).__name__} {dilations!r}")
        self.dilations = tuple(check_int(d, f"dilations[{i}]", low=1) for i, d in enumerate(dilations))
        if not self.dilations:
            raise ValueError("dilations must be a non-empty sequence of ints >= 1; got an empty sequence")
        self.kernel_size = check_int(kernel_size, "kernel_size", low=1)
        batch_size = check_int(batch_size, "batch_size", low=0)
        channels = check_int(channels, "channels", low=0)
        if not isinstance(dtype, torch.dtype) or dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be a floating-point torch.dtype ({', '.join(map(str, FLOAT_DTYPES))}); "
                            f"got {dtype!r}")
        self.queues = tuple((self.kernel_size - 1) * d + 1 for d in self.dilations)
        self.offsets = tuple(sum(self.queues[:i]) for i in range(len(self.queues)))
        self.layer_table = torch.tensor(list(zip(self.dilations, self.offsets, self.queues)), dtype=torch.int64,
                                        device=device)
        self.buffer = torch.empty((sum(self.queues), batch_size, channels), device=device, dtype=dtype)
        self.position = 0
        # ring_heads[p, l] = (the position of parity p) mod q_l, for the step kernel's division-free slots; row
        # position % 2 is current whenever heads_position == position (else the Triton step refreshes it first)
        self.ring_heads = torch.zeros((2, len(self.dilations)), dtype=torch.int64, device=device)
        self.heads_position = 0

    @property
    def batch_size(self) -> int:
        return self.buffer.shape[1]

    @property
    def channels(self) -> int:
        return self.buffer.shape[2]


def wavenet_step_reference(x, cache: WaveNetCache, conv_weight, conv_bias, residual_weight, residual_bias,
                           skip_weight, skip_bias, cond_proj=None) -> torch.Tensor:
    """One time step of a stack of residual layers in plain PyTorch, updating ``cache`` (Fast WaveNet):
    for each layer ``l``, with ``x^(t-s)`` read from the layer's queue (zeros before time 0),

        h = sum_j W_conv[l, :, :, j] x^(t - (k-1-j) d_l) + b_conv[l] (+ cond_proj[l]),  z = tanh(h_f) sigmoid(h_g)
        x <- x + W_res[l] z + b_res[l],   skip += W_skip[l] z + b_skip[l]

    and the layer's input at time ``t`` is pushed to its queue. Returns the skip sum ``[batch, S]``. Reads the
    layer table from the cache's host copy (no device read: works on ``meta`` tensors too)."""
    dtype = compute_dtype(x.dtype)
    ksize, t = cache.kernel_size, cache.position
    current = x.to(dtype)
    skip = torch.zeros((x.shape[0], skip_weight.shape[1]), device=x.device, dtype=dtype)
    for layer, (dilation, first, queue) in enumerate(zip(cache.dilations, cache.offsets, cache.queues)):
        h = conv_bias[layer].to(dtype).expand(x.shape[0], -1)
        for j in range(ksize):
            back = (ksize - 1 - j) * dilation
            if back == 0:
                tap = current
            elif t >= back:
                tap = cache.buffer[first + (t - back) % queue].to(dtype)
            else:  # before time 0: zeros, multiplied as the layered forward's padding is
                tap = torch.zeros_like(current)
            h = h + tap @ conv_weight[layer, :, :, j].to(dtype).T
        if ksize > 1:
            cache.buffer[first + t % queue] = current.to(cache.buffer.dtype)
        if cond_proj is not None:
            h = h + cond_proj[layer].to(dtype)
        z = gated_activation(h)
        current = (current + z @ residual_weight[layer].to(dtype).T + residual_bias[layer].to(dtype))
        current = current.to(x.dtype).to(dtype)
        skip = skip + z @ skip_weight[layer].to(dtype).T + skip_bias[layer].to(dtype)
    return skip.to(x.dtype)


def _check_stacked(tensor: object, name: str, shape: tuple, x: torch.Tensor) -> None:
    check_float_tensor(tensor, name)
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}; got {describe(tensor)}")
    check_same_dtype(x, "x", tensor, name)


def wavenet_step(x: torch.Tensor, cache: WaveNetCache, conv_weight: torch.Tensor, conv_bias: torch.Tensor,
                 residual_weight: torch.Tensor, residual_bias: torch.Tensor, skip_weight: torch.Tensor,
                 skip_bias: torch.Tensor, *, cond_proj: Optional[torch.Tensor] = None,
                 impl: str = "auto") -> torch.Tensor:
    """Advance a stack of ``L`` gated residual layers by one time step for the whole batch (Fast WaveNet, Paine
    et al. 2016): the math of :func:`wavenet_residual_layer` at time ``cache.position`` for every layer in turn,
    reading the dilated taps from the per-layer queues of :class:`WaveNetCache` and pushing each layer's input.
    One kernel launch for all layers; ``cache.position`` advances by one.

    Args:
        x: ``[batch, R]``: the first layer's input at this time step (fp64 runs the eager reference).
        cache: the queues, made for these layers' dilations and kernel size, ``x``'s batch, channels and dtype.
        conv_weight ``[L, 2D, R, k]``, conv_bias ``[L, 2D]``, residual_weight ``[L, R, D]``,
        residual_bias ``[L, R]``, skip_weight ``[L, S, D]``, skip_bias ``[L, S]``: the layers' weights stacked,
            any strides.
        cond_proj: ``[L, batch, 2D]``, each layer's global conditioning projection, or None.
        impl: "auto", "triton" or "eager".

    Returns:
        the skip sum ``sum_l skip_l`` at this time step, ``[batch, S]`` in ``x``'s dtype.
    """
    check_float_tensor(x, "x")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [batch, channels]; got {describe(x)}")
    if not isinstance(cache, WaveNetCache):
        raise TypeError(f"cache must be a WaveNetCache, got {type(cache).__name__}")
    batch, channels = x.shape
    if (cache.batch_size, cache.channels) != (batch, channels) or cache.buffer.dtype != x.dtype:
        raise ValueError(f"cache was made for batch {cache.batch_size}, {cache.channels} channels, dtype "
                         f"{cache.buffer.dtype}; x has {describe(x)}")
    check_float_tensor(conv_weight, "conv_weight")
    if conv_weight.dim() != 4 or conv_weight.shape[0] != len(cache.dilations) or conv_weight.shape[2] != channels \
            or conv_weight.shape[3] != cache.kernel_size or conv_weight.shape[1] % 2 != 0:
        raise ValueError(f"conv_weight must be [layers, 2D, R, k] = [{len(cache.dilations)}, 2D, {channels}, "
                         f"{cache.kernel_size}]; got {describe(conv_weight)}")
    layers, two_d = conv_weight.shape[:2]
    gate_channels = two_d // 2
    check_same_dtype(x, "x", conv_weight, "conv_weight")
    check_float_tensor(skip_weight, "skip_weight")
    skip_channels = skip_weight.shape[1] if skip_weight.dim() == 3 else -1
    _check_stacked(conv_bias, "conv_bias", (layers, two_d), x)
    _check_stacked(residual_weight, "residual_weight", (layers, channels, gate_channels), x)
    _check_stacked(residual_bias, "residual_bias", (layers, channels), x)
    _check_stacked(skip_weight, "skip_weight", (layers, skip_channels, gate_channels), x)
    _check_stacked(skip_bias, "skip_bias", (layers, skip_channels), x)
    named = {"x": x, "cache.buffer": cache.buffer, "conv_weight": conv_weight, "conv_bias": conv_bias,
             "residual_weight": residual_weight, "residual_bias": residual_bias, "skip_weight": skip_weight,
             "skip_bias": skip_bias}
    if cond_proj is not None:
        _check_stacked(cond_proj, "cond_proj", (layers, batch, two_d), x)
        named["cond_proj"] = cond_proj
    check_same_device(list(named.items()) + [("cache.layer_table", cache.layer_table),
                                             ("cache.ring_heads", cache.ring_heads)])
    reasons = []
    if x.dtype in MAX_STEP_CHANNELS:
        limit = MAX_STEP_CHANNELS[x.dtype]
        wide = [f"{name}={value} > {bound}" for name, value, bound in (
            ("R", channels, limit), ("D", gate_channels, limit), ("S", skip_channels, MAX_STEP_SKIP_CHANNELS))
            if value > bound]
        if wide:
            reasons.append(f"the kernel keeps a layer's weights on chip and takes R, D <= {limit} for {x.dtype} and "
                           f"S <= {MAX_STEP_SKIP_CHANNELS}; got {', '.join(wide)} (conv_weight "
                           f"{describe(conv_weight)}, skip_weight {describe(skip_weight)})")
    if _inner_extent(cache.buffer) >= 2**31 - 1:
        reasons.append(f"the step kernel indexes inside one cache slot in int32 and takes batch * R < 2**31; got "
                       f"cache.buffer {describe(cache.buffer)}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in named.values()):
        wanting = [name for name, t in named.items() if t.requires_grad]
        reasons.append(f"{', '.join(wanting)} require(s) grad: the step kernel has no backward (it is for sampling, "
                       "under torch.no_grad()); the eager reference differentiates")
    impl = choose_impl(impl, "wavenet_step", {"x": x}, reasons)  # the rest share x's dtype and device
    if impl == "triton":
        if cache.heads_position != cache.position:  # stepped eagerly since: rebuild the current row on the device
            cache.ring_heads[cache.position % 2] = torch.remainder(
                torch.full_like(cache.layer_table[:, 2], cache.position), cache.layer_table[:, 2])
        skip = torch.ops.genkernels.wavenet_step(x, cache.buffer, cache.layer_table, cache.ring_heads,
                                                 cache.position, conv_weight, conv_bias, cond_proj,
                                                 residual_weight, residual_bias, skip_weight, skip_bias)
        cache.heads_position = cache.position + 1
    else:
        skip = wavenet_step_reference(x, cache, conv_weight, conv_bias, residual_weight, residual_bias,
                                      skip_weight, skip_bias, cond_proj)
    cache.position += 1
    return skip
