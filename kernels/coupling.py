"""Fused affine coupling: the transform of the half a coupling layer changes, with its log-determinant.

A coupling layer (Dinh et al. 2017, RealNVP; Kingma & Dhariwal 2018, Glow) splits its input, feeds one half to a
conditioner network that predicts a per-element ``log_scale`` and ``shift``, and transforms the other half:

    forward:  y = x * scale + shift,          logdet[b] = + sum_i log(scale[b, i])
    reverse:  y = (x - shift) / scale,        logdet[b] = - sum_i log(scale[b, i])

One Triton program (one warp) walks a span of one sample (the spans sized so the grid fills whole waves of the
GPU, see :func:`~genkernels.kernels.launch.wave_split`): it reads ``x``, ``log_scale`` and ``shift`` once,
writes ``y`` once, and writes the fp32 sum of ``log(scale)`` over its span. The per-sample
log-determinant is the sum of those few partial sums (one per block of the sample, added in a fixed order: the
result is deterministic, no atomics).

Scale functions (``scale_fn``), each computed stably from the raw conditioner output ``a = log_scale``:
    "exp":      scale = exp(a),            log(scale) = a                          (RealNVP)
    "sigmoid":  scale = sigmoid(a + 2),    log(scale) = -softplus(-(a + 2))        (Glow)
The reverse "sigmoid" transform multiplies by ``1 / scale = 1 + exp(-(a + 2))``, which never divides by an
underflowed scale.

Backward (both directions; ``g_y`` and ``g_logdet[b]`` are the incoming gradients, ``d = dlog(scale)/da`` is 1 for
"exp" and ``1 - scale`` for "sigmoid"):
    forward:  dx = g_y * scale,    dshift = g_y,     da = (g_y * x * scale + g_logdet) * d
    reverse:  dx = g_y / scale,    dshift = -dx,     da = -(g_y * y + g_logdet) * d
so the backward kernel reads ``log_scale``, ``g_y`` and ``x`` (forward) or the output ``y`` (reverse), and
writes ``dx`` and ``da``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .checks import (
    check_bool,
    check_choice,
    check_float_like,
    check_float_tensor,
    check_min_rank,
    check_same_device,
)
from .launch import batch_chunks, per_sample_layout, wave_split
from .runtime import choose_impl, compute_dtype
from .triton_helpers import sample_offsets, sigmoid, span_of_program, tile_of_span

SCALE_FNS = ("exp", "sigmoid")
# Glow's shift of the raw conditioner output: scale = sigmoid(a + 2) starts near 0.88 for a ~ 0.
SIGMOID_OFFSET = 2.0


# ----------------------------------------------------------------------------------------------------------------
# Eager reference: the specification, the fallback and the test oracle
# ----------------------------------------------------------------------------------------------------------------
def _log_scale_and_multiplier(raw: torch.Tensor, scale_fn: str, reverse: bool):
    """``(log(scale), scale)`` forward or ``(log(scale), 1 / scale)`` reverse, both stable for any ``raw``."""
    if scale_fn == "exp":
        return raw, torch.exp(-raw if reverse else raw)
    shifted = raw + SIGMOID_OFFSET
    log_scale = -F.softplus(-shifted)
    return log_scale, (1 + torch.exp(-shifted)) if reverse else torch.sigmoid(shifted)


def affine_coupling_reference(x: torch.Tensor, log_scale: torch.Tensor, shift: torch.Tensor,
                              scale_fn: str = "exp", reverse: bool = False):
    """Affine coupling transform and its log-determinant in plain PyTorch (RealNVP eq. 7-9; Glow table 1).

        forward:  y = x * s + shift,      logdet[b] =  sum_{i} log s[b, i]
        reverse:  y = (x - shift) / s,    logdet[b] = -sum_{i} log s[b, i]
    with ``s = exp(log_scale)`` ("exp") or ``s = sigmoid(log_scale + 2)`` ("sigmoid"), the sum over every
    non-batch dimension. Computes in fp32 (fp64 for fp64 inputs); returns ``y`` in ``x``'s dtype and ``logdet``
    of shape ``[batch]`` in fp32 (fp64 for fp64 inputs).
    """
    out_dtype, dtype = x.dtype, compute_dtype(x.dtype)
    log_s, multiplier = _log_scale_and_multiplier(log_scale.to(dtype), scale_fn, reverse)
    x, shift = x.to(dtype), shift.to(dtype)
    y = (x - shift) * multiplier if reverse else x * multiplier + shift
    logdet = log_s.sum(dim=tuple(range(1, x.dim())))
    return y.to(out_dtype), -logdet if reverse else logdet


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _softplus(t):
    """``log(1 + exp(t))`` in fp32 without overflow, keeping the digits of ``log1p`` for tiny ``exp(-|t|)``
    (Goldberg's ``log1p(e) = log(1 + e) * e / ((1 + e) - 1)``)."""
    e = tl.exp(-tl.abs(t))
    one_plus = 1.0 + e
    rounds_to_one = one_plus == 1.0
    # the correction e / ((1 + e) - 1) is a ratio near 1: a 2-ulp division (div.full) keeps its digits and, unlike
    # the IEEE division, holds the bf16 forward within 64 registers per thread (32 one-warp CTAs per SM)
    correction = tl.fdiv(e, tl.where(rounds_to_one, 1.0, one_plus - 1.0), ieee_rounding=False)
    log1p = tl.where(rounds_to_one, e, tl.log(one_plus) * correction)
    return tl.maximum(t, 0.0, propagate_nan=tl.PropagateNan.ALL) + log1p


@triton.jit
def _scale_terms(raw, SIGMOID: tl.constexpr, REVERSE: tl.constexpr):
    """``(log(scale), multiplier, dlog(scale)/d raw)``; the multiplier is ``scale`` forward and ``1 / scale``
    in reverse."""
    if SIGMOID:
        shifted = raw + 2.0  # SIGMOID_OFFSET
        log_scale = -_softplus(-shifted)
        if REVERSE:
            multiplier = 1.0 + tl.exp(-shifted)
        else:
            # sigmoid(shifted) = (1 or e) / (1 + e), e = exp(-|shifted|): the exp _softplus takes too (one exp)
            e = tl.exp(-tl.abs(shifted))
            multiplier = tl.where(shifted >= 0, 1.0, e) / (1.0 + e)
        dlog = sigmoid(-shifted)
    else:
        log_scale = raw
        if REVERSE:
            multiplier = tl.exp(-raw)
        else:
            multiplier = tl.exp(raw)
        dlog = tl.full(raw.shape, 1.0, tl.float32)
    return log_scale, multiplier, dlog


@triton.jit
def _affine_coupling_fwd_kernel(
    y_ptr, x_ptr, log_scale_ptr, shift_ptr, partial_ptr,
    batch_start, inner_numel, num_blocks, size1, size2, size3,
    y_sb, y_s0, y_s1, y_s2, y_s3,
    x_sb, x_s0, x_s1, x_s2, x_s3,
    a_sb, a_s0, a_s1, a_s2, a_s3,
    t_sb, t_s0, t_s1, t_s2, t_s3,
    SIGMOID: tl.constexpr, REVERSE: tl.constexpr, INNER_CONTIGUOUS: tl.constexpr, BLOCK: tl.constexpr,
):
    # program (p, b) walks span p of sample b in BLOCK steps and writes the sum of log(scale) over it
    batch_index = batch_start + tl.program_id(1)
    lo, hi, steps = span_of_program(inner_numel, BLOCK)
    log_scales = tl.zeros((BLOCK,), tl.float32)
    for step in range(steps):
        _, inner, mask = tile_of_span(lo, hi, step, BLOCK)
        x_offsets = sample_offsets(batch_index, inner, x_sb, x_s0, x_s1, x_s2, x_s3, size1, size2, size3,
                                   INNER_CONTIGUOUS)
        a_offsets = sample_offsets(batch_index, inner, a_sb, a_s0, a_s1, a_s2, a_s3, size1, size2, size3,
                                   INNER_CONTIGUOUS)
        t_offsets = sample_offsets(batch_index, inner, t_sb, t_s0, t_s1, t_s2, t_s3, size1, size2, size3,
                                   INNER_CONTIGUOUS)
        x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(tl.float32)
        raw = tl.load(log_scale_ptr + a_offsets, mask=mask, other=0.0).to(tl.float32)
        shift = tl.load(shift_ptr + t_offsets, mask=mask, other=0.0).to(tl.float32)

        log_scale, multiplier, _ = _scale_terms(raw, SIGMOID, REVERSE)
        if REVERSE:
            y = (x - shift) * multiplier
        else:
            y = x * multiplier + shift
        y_offsets = sample_offsets(batch_index, inner, y_sb, y_s0, y_s1, y_s2, y_s3, size1, size2, size3,
                                   INNER_CONTIGUOUS)
        tl.store(y_ptr + y_offsets, y.to(y_ptr.dtype.element_ty), mask=mask)
        log_scales += tl.where(mask, log_scale, 0.0)
    partial = tl.sum(log_scales, axis=0)
    if REVERSE:
        partial = -partial
    tl.store(partial_ptr + batch_index.to(tl.int64) * num_blocks + tl.program_id(0), partial)


@triton.jit
def _affine_coupling_bwd_kernel(
    grad_x_ptr, grad_a_ptr, saved_ptr, log_scale_ptr, grad_y_ptr, grad_logdet_ptr,
    batch_start, inner_numel, grad_logdet_stride, size1, size2, size3,
    gx_sb, gx_s0, gx_s1, gx_s2, gx_s3,
    ga_sb, ga_s0, ga_s1, ga_s2, ga_s3,
    u_sb, u_s0, u_s1, u_s2, u_s3,
    a_sb, a_s0, a_s1, a_s2, a_s3,
    gy_sb, gy_s0, gy_s1, gy_s2, gy_s3,
    SIGMOID: tl.constexpr, REVERSE: tl.constexpr, HAS_GRAD_Y: tl.constexpr, INNER_CONTIGUOUS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    batch_index = batch_start + tl.program_id(1)
    grad_logdet = tl.load(grad_logdet_ptr + batch_index.to(tl.int64) * grad_logdet_stride).to(tl.float32)
    lo, hi, steps = span_of_program(inner_numel, BLOCK)
    for step in range(steps):
        _, inner, mask = tile_of_span(lo, hi, step, BLOCK)
        u_offsets = sample_offsets(batch_index, inner, u_sb, u_s0, u_s1, u_s2, u_s3, size1, size2, size3,
                                   INNER_CONTIGUOUS)
        a_offsets = sample_offsets(batch_index, inner, a_sb, a_s0, a_s1, a_s2, a_s3, size1, size2, size3,
                                   INNER_CONTIGUOUS)
        raw = tl.load(log_scale_ptr + a_offsets, mask=mask, other=0.0).to(tl.float32)

        _, multiplier, dlog = _scale_terms(raw, SIGMOID, REVERSE)
        if HAS_GRAD_Y:
            gy_offsets = sample_offsets(batch_index, inner, gy_sb, gy_s0, gy_s1, gy_s2, gy_s3, size1, size2,
                                        size3, INNER_CONTIGUOUS)
            # saved = x (forward direction) or the output y (reverse direction)
            saved = tl.load(saved_ptr + u_offsets, mask=mask, other=0.0).to(tl.float32)
            grad_y = tl.load(grad_y_ptr + gy_offsets, mask=mask, other=0.0).to(tl.float32)
            grad_x = grad_y * multiplier
            if REVERSE:
                grad_a = -(grad_y * saved + grad_logdet) * dlog
            else:
                grad_a = (grad_x * saved + grad_logdet) * dlog
        else:
            # only logdet was used: y's terms are dropped, not multiplied by a zero gradient (inf * 0 = NaN)
            grad_x = tl.zeros_like(raw)
            if REVERSE:
                grad_a = -grad_logdet * dlog
            else:
                grad_a = grad_logdet * dlog

        gx_offsets = sample_offsets(batch_index, inner, gx_sb, gx_s0, gx_s1, gx_s2, gx_s3, size1, size2, size3,
                                    INNER_CONTIGUOUS)
        ga_offsets = sample_offsets(batch_index, inner, ga_sb, ga_s0, ga_s1, ga_s2, ga_s3, size1, size2, size3,
                                    INNER_CONTIGUOUS)
        tl.store(grad_x_ptr + gx_offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_a_ptr + ga_offsets, grad_a.to(grad_a_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
def _launch_forward(x, log_scale, shift, scale_fn: str, reverse: bool):
    y = torch.empty_like(x)
    batch = x.shape[0]
    if x.numel() == 0:
        return y, torch.zeros(batch, dtype=torch.float32, device=x.device)
    layout, (y_, x_, a_, t_) = per_sample_layout([y, x, log_scale, shift])
    split = wave_split("affine_coupling", layout.inner_numel, batch, x.element_size(), x.device)
    partials = torch.empty((batch, split.programs), dtype=torch.float32, device=x.device)
    for start, count in batch_chunks(batch):
        _affine_coupling_fwd_kernel[(split.programs, count)](
            y_, x_, a_, t_, partials,
            start, layout.inner_numel, split.programs, *layout.inner_sizes[1:],
            *layout.strides[0], *layout.strides[1], *layout.strides[2], *layout.strides[3],
            SIGMOID=scale_fn == "sigmoid", REVERSE=reverse, INNER_CONTIGUOUS=layout.inner_contiguous,
            BLOCK=split.tile, num_warps=split.num_warps,
        )
    return y, partials.sum(dim=1)


def _launch_backward(grad_y, grad_logdet, saved, log_scale, scale_fn: str, reverse: bool):
    # grad_log_scale takes grad_x's layout: in the one layout per_sample_layout cannot walk (rank > 5, scattered
    # strides) it returns a dense copy of every tensor after the first, and the kernel writes and we return ga_.
    # grad_y None: only logdet was used (the kernel drops y's terms).
    grad_x = torch.empty_like(saved)
    grad_a = torch.empty_like(grad_x)
    if saved.numel() == 0:
        return grad_x, grad_a
    walked = [grad_x, grad_a, saved, log_scale] + ([grad_y] if grad_y is not None else [])
    layout, tensors = per_sample_layout(walked)
    gx_, ga_, u_, a_ = tensors[:4]
    gy_ = tensors[4] if grad_y is not None else u_  # a pointer the HAS_GRAD_Y=False branch never reads
    gy_strides = layout.strides[4] if grad_y is not None else layout.strides[2]
    split = wave_split("affine_coupling", layout.inner_numel, layout.batch, saved.element_size(), saved.device)
    for start, count in batch_chunks(layout.batch):
        _affine_coupling_bwd_kernel[(split.programs, count)](
            gx_, ga_, u_, a_, gy_, grad_logdet,
            start, layout.inner_numel, grad_logdet.stride(0), *layout.inner_sizes[1:],
            *layout.strides[0], *layout.strides[1], *layout.strides[2], *layout.strides[3], *gy_strides,
            SIGMOID=scale_fn == "sigmoid", REVERSE=reverse, HAS_GRAD_Y=grad_y is not None,
            INNER_CONTIGUOUS=layout.inner_contiguous, BLOCK=split.tile, num_warps=split.num_warps,
        )
    return gx_, ga_


# ----------------------------------------------------------------------------------------------------------------
# torch.library registration (usable under torch.compile(fullgraph=True))
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("genkernels::affine_coupling", mutates_args=())
def _affine_coupling_op(x: torch.Tensor, log_scale: torch.Tensor, shift: torch.Tensor, scale_fn: str,
                        reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_forward(x, log_scale, shift, scale_fn, reverse)


@_affine_coupling_op.register_fake
def _affine_coupling_fake(x, log_scale, shift, scale_fn, reverse):
    return torch.empty_like(x), x.new_empty((x.shape[0],), dtype=torch.float32)


@torch.library.custom_op("genkernels::affine_coupling_backward", mutates_args=())
def _affine_coupling_backward_op(grad_y: Optional[torch.Tensor], grad_logdet: torch.Tensor, saved: torch.Tensor,
                                 log_scale: torch.Tensor, scale_fn: str,
                                 reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_backward(grad_y, grad_logdet, saved, log_scale, scale_fn, reverse)


@_affine_coupling_backward_op.register_fake
def _affine_coupling_backward_fake(grad_y, grad_logdet, saved, log_scale, scale_fn, reverse):
    grad_x = torch.empty_like(saved)
    return grad_x, torch.empty_like(grad_x)


def _setup_context(ctx, inputs, output):
    x, log_scale, _, scale_fn, reverse = inputs
    y, _ = output
    ctx.scale_fn, ctx.reverse = scale_fn, reverse
    # an unused output's gradient stays None (not a zero tensor), so the backward drops its terms
    ctx.set_materialize_grads(False)
    # The reverse gradient of log_scale needs y = (x - shift) / scale: keeping y saves reading x and shift.
    ctx.save_for_backward(y if reverse else x, log_scale)


def _backward(ctx, grad_y, grad_logdet):
    saved, log_scale = ctx.saved_tensors
    if grad_logdet is None:
        # added to y's term, never multiplied into one: a zero gradient is exact here
        grad_logdet = saved.new_zeros((saved.shape[0],), dtype=torch.float32)
    grad_x, grad_a = torch.ops.genkernels.affine_coupling_backward(grad_y, grad_logdet.float(), saved, log_scale,
                                                                   ctx.scale_fn, ctx.reverse)
    if grad_y is None:
        grad_shift = torch.zeros_like(grad_x)
    else:
        grad_shift = -grad_x if ctx.reverse else grad_y
    return grad_x, grad_a, grad_shift, None, None


_affine_coupling_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------
def _check_inputs(x, log_scale, shift, scale_fn, reverse) -> torch.device:
    check_float_tensor(x, "x")
    check_min_rank(x, "x", 2, "[batch, ...]")
    check_float_like(log_scale, "log_scale", x, "x", same_dtype=True)
    check_float_like(shift, "shift", x, "x", same_dtype=True)
    device = check_same_device([("x", x), ("log_scale", log_scale), ("shift", shift)])
    check_choice(scale_fn, "scale_fn", SCALE_FNS)
    check_bool(reverse, "reverse")
    return device


def affine_coupling(x: torch.Tensor, log_scale: torch.Tensor, shift: torch.Tensor, *, scale_fn: str = "exp",
                    reverse: bool = False, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Affine coupling transform of ``x`` fused with the per-sample reduction of its log-determinant.

        forward:  y = x * s + shift,      logdet[b] =  sum_i log s[b, i]
        reverse:  y = (x - shift) / s,    logdet[b] = -sum_i log s[b, i]
    with ``s = exp(log_scale)`` (``scale_fn="exp"``, RealNVP) or ``s = sigmoid(log_scale + 2)``
    (``scale_fn="sigmoid"``, Glow), computed stably from ``log_scale``. Differentiable in ``x``, ``log_scale`` and
    ``shift`` through both outputs.

    Args:
        x: the half being transformed, ``[batch, ...]`` (at least 2-D, any sizes including 0: an empty sample's
            logdet is 0), fp32/fp16/bf16 for the kernels (fp64 runs the reference in fp64), any strides.
        log_scale: the conditioner's raw scale output, same shape, dtype and device as ``x``.
        shift: the conditioner's shift output, same shape, dtype and device as ``x``.
        scale_fn: "exp" or "sigmoid".
        reverse: apply the inverse transform.
        impl: "auto", "triton" or "eager".

    Returns:
        ``(y, logdet)``: ``y`` with the shape and dtype of ``x``; ``logdet`` of shape ``[batch]`` in fp32 (fp64 for
        fp64 inputs).

    NaN and +-Inf follow the formulas above under both impls (``inf * 0 = NaN``, as plain PyTorch): a gradient
    that only flows from ``logdet`` leaves ``y``'s terms out rather than multiplying them by zero.
    """
    _check_inputs(x, log_scale, shift, scale_fn, reverse)
    if choose_impl(impl, "affine_coupling", {"x": x, "log_scale": log_scale, "shift": shift}) == "eager":
        return affine_coupling_reference(x, log_scale, shift, scale_fn, reverse)
    return torch.ops.genkernels.affine_coupling(x, log_scale, shift, scale_fn, reverse)
