"""Fused bias + activation + gain + clamp, with first- and second-order gradients (StyleGAN2's ``bias_act``).

    y = clamp(act(x + b) * gain, -clamp, clamp)        b broadcast along dimension ``dim``

Three elementwise Triton kernels (one kernel source, a constexpr ``MODE``) walk the tensors in memory order, so
channels_last and other permuted dense layouts are read and written as they are and the output keeps the input's
layout:

* forward: ``y`` from ``x`` and ``b``;
* gradient (a registered op of its own): ``dx = dy * gain * act'(.) * [not clamped]``; its derivative in ``dy`` is
  the same op, so it is differentiable again, which a GAN's R1 penalty needs;
* second derivative: ``ddx * dy * gain * act''(.)``, the part of the gradient op's derivative that reaches ``x``.

Like StyleGAN2, each activation's backward reads either the input ``x`` (and ``b``) or the output ``y``
(:data:`ACTIVATIONS`): reading ``y`` lets the input be freed after the forward, at the price of derivatives taken
from the output rounded to its dtype (in bf16, second-order gradients of tanh or sigmoid carry a few output ulps
more error than an fp32 recomputation would). The bias gradient is the sum of ``dx`` over every dimension but
``dim``, a torch reduction accumulated in fp32. Non-dense inputs (a sliced or expanded view) are copied once into
a dense layout first; the 1-D bias is read through its stride (a sliced or expanded bias is not copied).

NaN and Inf follow PyTorch: a NaN in ``x`` or ``bias`` gives NaN in ``y`` (relu, elu and the clamp propagate it, as
``torch.relu`` and ``torch.clamp`` do), and the gradients are NaN, or numbers, where PyTorch's autograd of
:func:`bias_act_reference` gives NaN or numbers: relu's gradient at a NaN input is ``dy * gain`` and an Inf ``dy``
where relu is flat gives 0 (``threshold_backward`` selects), the clamp masks ``dy`` before the activation's
derivative multiplies it (a NaN derivative stays NaN), and derivatives at +-Inf inputs are NaN where torch's
formulas give ``inf * 0`` (silu, gelu). elu and selu give NaN at a NaN input, as torch's vectorized CPU loop does
(its scalar loop passes the gradient through; PyTorch is not consistent there).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .checks import check_choice, check_float_tensor, check_int, check_real, check_same_device, check_same_dtype
from .checks import describe
from .launch import is_dense, wave_split
from .runtime import choose_impl, compute_dtype
from .triton_helpers import sigmoid, span_of_program, tanh

# gelu_tanh: the tanh approximation of GELU (Hendrycks & Gimpel 2016, eq. 2; torch's approximate="tanh").
GELU_K = math.sqrt(2.0 / math.pi)
GELU_C = 0.044715
# torch.nn.functional.softplus returns x itself above this input.
SOFTPLUS_THRESHOLD = 20.0
# SELU's constants (Klambauer et al. 2017; torch.nn.functional.selu).
SELU_SCALE = 1.0507009873554804934193349852946
SELU_ALPHA = 1.6732632423543772848170429916717


@dataclasses.dataclass(frozen=True)
class Activation:
    """One activation of :func:`bias_act`.

    ``code`` is the kernel's constexpr switch (two names may share one: silu and swish are one function with
    different default gains). ``ref`` is what its backward reads: ``"x"`` (the input and bias; the derivatives
    are functions of ``x + b``) or ``"y"`` (the output; the derivatives are functions of ``act(x + b) = y /
    gain``). ``has_second_grad`` is False where the second derivative is zero almost everywhere
    (piecewise-linear activations).
    """

    code: int
    func: Callable[[torch.Tensor, float], torch.Tensor]
    default_alpha: float
    default_gain: float
    ref: str
    has_second_grad: bool


# Kernel codes of the activations (the ACT constexpr).
ACT_LINEAR, ACT_RELU, ACT_LRELU, ACT_TANH, ACT_SIGMOID, ACT_SILU, ACT_ELU, ACT_SOFTPLUS = range(8)
ACT_GELU_TANH, ACT_GELU, ACT_SELU = 8, 9, 10

# Defaults as in StyleGAN2's activation table (torch_utils/ops/bias_act.py), plus tanh-approximate and exact GELU.
ACTIVATIONS = {
    "linear": Activation(ACT_LINEAR, lambda s, alpha: s, 0.0, 1.0, "x", False),
    "relu": Activation(ACT_RELU, lambda s, alpha: torch.relu(s), 0.0, math.sqrt(2.0), "y", False),
    "lrelu": Activation(ACT_LRELU, lambda s, alpha: F.leaky_relu(s, alpha), 0.2, math.sqrt(2.0), "y", False),
    "tanh": Activation(ACT_TANH, lambda s, alpha: torch.tanh(s), 0.0, 1.0, "y", True),
    "sigmoid": Activation(ACT_SIGMOID, lambda s, alpha: torch.sigmoid(s), 0.0, 1.0, "y", True),
    "silu": Activation(ACT_SILU, lambda s, alpha: F.silu(s), 0.0, 1.0, "x", True),
    "elu": Activation(ACT_ELU, lambda s, alpha: F.elu(s, alpha), 1.0, 1.0, "y", True),
    "softplus": Activation(ACT_SOFTPLUS, lambda s, alpha: F.softplus(s, threshold=SOFTPLUS_THRESHOLD), 0.0, 1.0,
                           "y", True),
    "gelu": Activation(ACT_GELU, lambda s, alpha: F.gelu(s, approximate="none"), 0.0, 1.0, "x", True),
    "gelu_tanh": Activation(ACT_GELU_TANH, lambda s, alpha: F.gelu(s, approximate="tanh"), 0.0, 1.0, "x", True),
    "selu": Activation(ACT_SELU, lambda s, alpha: F.selu(s), 0.0, 1.0, "y", True),
    "swish": Activation(ACT_SILU, lambda s, alpha: torch.sigmoid(s) * s, 0.0, math.sqrt(2.0), "x", True),
}


# ----------------------------------------------------------------------------------------------------------------
# Eager reference: the specification, the fallback and the test oracle
# ----------------------------------------------------------------------------------------------------------------
def _bias_shape(ndim: int, dim: int) -> list[int]:
    return [-1 if d == dim else 1 for d in range(ndim)]


def bias_act_reference(x: torch.Tensor, bias: Optional[torch.Tensor] = None, dim: int = 1, act: str = "linear",
                       alpha: Optional[float] = None, gain: Optional[float] = None,
                       clamp: Optional[float] = None) -> torch.Tensor:
    """``clamp(act(x + b) * gain, -clamp, clamp)`` in plain PyTorch (Karras et al. 2020, StyleGAN2's bias_act).

    ``b`` is broadcast along ``dim``; ``alpha`` and ``gain`` default to the activation's entries in
    :data:`ACTIVATIONS`. Activations: linear ``s``; relu ``max(s, 0)``; lrelu ``s if s > 0 else alpha s``; tanh;
    sigmoid ``1 / (1 + e^-s)``; silu and swish ``s sigmoid(s)`` (swish's default gain is sqrt(2), as in
    StyleGAN2); elu ``s if s > 0 else alpha (e^s - 1)``; selu ``scale (s if s > 0 else alpha_selu (e^s - 1))``
    (``F.selu``); softplus ``log(1 + e^s)`` (``s`` above 20); gelu ``s/2 (1 + erf(s / sqrt 2))`` (exact,
    ``F.gelu``); gelu_tanh ``s/2 (1 + tanh(sqrt(2/pi) (s + 0.044715 s^3)))`` (``F.gelu(approximate="tanh")``).
    Computes in fp32 (fp64 for fp64 inputs) and returns ``x``'s dtype; differentiable to any order by autograd.
    """
    spec = ACTIVATIONS[act]
    alpha = spec.default_alpha if alpha is None else float(alpha)
    gain = spec.default_gain if gain is None else float(gain)
    dtype = compute_dtype(x.dtype)
    s = x.to(dtype)
    if bias is not None:
        s = s + bias.to(dtype).reshape(_bias_shape(x.dim(), dim))
    y = spec.func(s, alpha) * gain
    if clamp is not None:
        y = y.clamp(-clamp, clamp)
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
MODE_FORWARD, MODE_GRAD, MODE_GRAD2 = 0, 1, 2


@triton.jit
def _expm1(v):
    """``exp(v) - 1`` with full relative accuracy near 0 (Kahan: ``(u - 1) * v / log(u)``, ``u = exp(v)``)."""
    u = tl.exp(v)
    um1 = u - 1.0
    ratio = um1 * v / tl.log(tl.where(u == 1.0, 2.0, u))
    return tl.where(u == 1.0, v, tl.where(um1 == -1.0, -1.0, ratio))


@triton.jit
def _log1p(v):
    """``log(1 + v)`` for ``v >= 0`` with full relative accuracy near 0 (Goldberg: ``log(u) * v / (u - 1)``)."""
    u = 1.0 + v
    return tl.where(u == 1.0, v, tl.log(u) * v / tl.where(u == 1.0, 1.0, u - 1.0))


@triton.jit
def _activate(s, alpha, ACT: tl.constexpr):
    """The activation of the pre-activation ``s = x + b`` (fp32). NaN in gives NaN out (every min/max propagates
    it, as torch's relu and elu do)."""
    if ACT == 0:
        a = s
    elif ACT == 1:
        a = tl.maximum(s, 0.0, propagate_nan=tl.PropagateNan.ALL)
    elif ACT == 2:
        a = tl.where(s > 0, s, alpha * s)
    elif ACT == 3:
        a = tanh(s)
    elif ACT == 4:
        a = sigmoid(s)
    elif ACT == 5:
        a = s * sigmoid(s)
    elif ACT == 6:
        a = tl.where(s > 0, s, alpha * _expm1(tl.minimum(s, 0.0, propagate_nan=tl.PropagateNan.ALL)))
    elif ACT == 7:
        a = tl.where(s > 20.0, s, tl.maximum(s, 0.0, propagate_nan=tl.PropagateNan.ALL) + _log1p(tl.exp(-tl.abs(s))))
    elif ACT == 8:
        u = 0.7978845608028654 * (s + 0.044715 * s * s * s)
        a = 0.5 * s * (1.0 + tanh(u))
    elif ACT == 9:
        a = 0.5 * s * (1.0 + tl.math.erf(s * 0.7071067811865476))
    else:
        negative = 1.7580993408473766 * _expm1(tl.minimum(s, 0.0, propagate_nan=tl.PropagateNan.ALL))
        a = tl.where(s > 0, 1.0507009873554805 * s, negative)
    return a


@triton.jit
def _derivatives_from_x(s, ACT: tl.constexpr):
    """``(act'(s), act''(s))`` for the activations whose backward reads the input (linear, silu/swish, gelu,
    gelu_tanh). At ``s = +-inf`` they are NaN, as torch's silu and gelu backward give (``inf * 0``)."""
    if ACT == 5:
        sig = sigmoid(s)
        d1 = sig * (1.0 + s * (1.0 - sig))
        d2 = sig * (1.0 - sig) * (2.0 + s * (1.0 - 2.0 * sig))
    elif ACT == 9:
        # torch's gelu_backward and gelu double backward: Phi(s) + s phi(s) and (2 - s^2) phi(s). The product
        # s * (s * phi) keeps finite |s| > 1.8e19 (s^2 = inf, phi = 0) at 0 where (2 - s^2) * phi would be NaN.
        cdf = 0.5 * (1.0 + tl.math.erf(s * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * s * s)
        s_pdf = s * pdf
        d1 = cdf + s_pdf
        d2 = 2.0 * pdf - s * s_pdf
    elif ACT == 8:
        # tanh(u) is +-1 in fp32 beyond |s| = 10, so clamping there changes nothing but keeps s^2 finite (the clamp
        # propagates NaN); +-inf gives NaN, as torch's tanh-approximate gelu backward.
        infinite = tl.abs(s) == float("inf")
        s = tl.minimum(tl.maximum(s, -10.0, propagate_nan=tl.PropagateNan.ALL), 10.0,
                       propagate_nan=tl.PropagateNan.ALL)
        s2 = s * s
        t = tanh(0.7978845608028654 * (s + 0.044715 * s2 * s))
        du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * s2)
        d2u = 0.7978845608028654 * 6.0 * 0.044715 * s
        sech2 = 1.0 - t * t
        d1 = tl.where(infinite, float("nan"), 0.5 * (1.0 + t) + 0.5 * s * sech2 * du)
        d2 = tl.where(infinite, float("nan"), sech2 * (du + 0.5 * s * (d2u - 2.0 * t * du * du)))
    else:
        d1 = tl.full(s.shape, 1.0, tl.float32)
        d2 = tl.zeros(s.shape, tl.float32)
    return d1, d2


@triton.jit
def _derivatives_from_y(a, alpha, ACT: tl.constexpr):
    """``(act'(s), d act'(s) / d a)`` written in ``a = act(s)`` for the activations whose backward reads the
    output (relu, lrelu, tanh, sigmoid, elu, selu, softplus). At a NaN ``a`` they give what torch's backward
    gives: relu's ``threshold_backward`` passes the gradient, leaky_relu scales it by alpha, the others are NaN."""
    zero = tl.zeros(a.shape, tl.float32)
    if ACT == 1:
        d1 = tl.where(a <= 0, 0.0, 1.0)
        d2 = zero
    elif ACT == 2:
        d1 = tl.where(a > 0, 1.0, alpha)
        d2 = zero
    elif ACT == 3:
        d1 = 1.0 - a * a
        d2 = -2.0 * a
    elif ACT == 4:
        d1 = a * (1.0 - a)
        d2 = 1.0 - 2.0 * a
    elif ACT == 6:
        d1 = tl.where(a > 0, 1.0, a + alpha)
        d2 = tl.where(a < 0, 1.0, 0.0)  # at the kink s = 0, torch's elu double backward takes the right side
    elif ACT == 10:
        # selu = scale * elu(s, alpha_selu): act' = a + scale * alpha_selu below 0, scale above
        d1 = tl.where(a > 0, 1.0507009873554805, a + 1.7580993408473766)
        d2 = tl.where(a < 0, 1.0, 0.0)
    else:
        e = tl.exp(-a)
        d1 = 1.0 - e
        d2 = e
    return d1, d2


@triton.jit(do_not_specialize=["alpha", "gain", "inv_gain", "clamp", "grad2_scale"])
def _bias_act_kernel(
    out_ptr, x_ptr, bias_ptr, y_ptr, dy_ptr, ddx_ptr,
    numel, dim_stride, channels, bias_stride, alpha, gain, inv_gain, clamp, grad2_scale,
    MODE: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, REF_Y: tl.constexpr, CLAMP: tl.constexpr,
    MASK_FIRST: tl.constexpr, DIM_INNERMOST: tl.constexpr, OFFSETS_64: tl.constexpr, BLOCK: tl.constexpr,
):
    # Every tensor but the bias shares one dense layout: element k of the walk sits at offset k in each of them.
    # The bias is read through its own stride (any: sliced, or 0 for an expanded one). Each program walks its
    # share of the tensor (span_of_program: whole units of two 16-byte vectors) in steps of BLOCK.
    lo, hi, steps = span_of_program(numel, BLOCK)
    if OFFSETS_64:
        lanes = tl.arange(0, BLOCK).to(tl.int64)
    else:
        lo, hi, steps = lo.to(tl.int32), hi.to(tl.int32), steps.to(tl.int32)
        lanes = tl.arange(0, BLOCK)
    for step in range(steps):
        offsets = tl.multiple_of(lo + step * BLOCK, BLOCK // 16) + lanes
        mask = offsets < hi

        if MODE == 0 or not REF_Y:
            s = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                if DIM_INNERMOST:
                    channel = offsets % channels
                else:
                    channel = (offsets // dim_stride) % channels
                s += tl.load(bias_ptr + channel * bias_stride, mask=mask, other=0.0).to(tl.float32)

        if MODE == 0:
            y = _activate(s, alpha, ACT) * gain
            if CLAMP:
                y = tl.minimum(tl.maximum(y, -clamp, propagate_nan=tl.PropagateNan.ALL), clamp,
                               propagate_nan=tl.PropagateNan.ALL)
            tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            if REF_Y:
                y = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
                d1, d2 = _derivatives_from_y(y * inv_gain, alpha, ACT)
            else:
                d1, d2 = _derivatives_from_x(s, ACT)
            dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            if MODE == 2:
                dy *= tl.load(ddx_ptr + offsets, mask=mask, other=0.0).to(tl.float32) * grad2_scale
                derivative = d2
            else:
                dy *= gain
                derivative = d1
            if CLAMP:
                # torch.clamp's gradient mask (self >= min) & (self <= max), false at a NaN output. As in torch's
                # autograd, the gradient (MASK_FIRST) masks dy before the product, so a NaN derivative still gives
                # NaN; its adjoint (the derivative in dy) masks the product, so a masked NaN derivative is dropped.
                if REF_Y:
                    # a stored output at +-clamp is taken as saturated: the forward stored the clamp rounded to y's
                    # dtype (0.7 is 0.69921875 in bf16), so compare with that rounded bound, not the fp32 one
                    y_clamp = (tl.zeros_like(y) + clamp).to(y_ptr.dtype.element_ty).to(tl.float32)
                    passes = tl.abs(y) < y_clamp
                else:
                    passes = tl.abs(_activate(s, alpha, ACT) * gain) <= clamp
                if MASK_FIRST:
                    result = tl.where(passes, dy, 0.0) * derivative
                else:
                    result = tl.where(passes, dy * derivative, 0.0)
            else:
                result = dy * derivative
            if ACT == 1:
                # relu's zero derivative is a selection (threshold_backward), not a product: an Inf dy gives 0
                result = tl.where(derivative == 0.0, 0.0, result)
            tl.store(out_ptr + offsets, result.to(out_ptr.dtype.element_ty), mask=mask)


def _same_strides(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal strides in every dimension of more than one element (the others are never stepped along)."""
    return all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


def _walk_template(first: torch.Tensor) -> torch.Tensor:
    """The dense layout the kernel walks: ``first``'s own when it is dense (channels_last, permuted), else
    contiguous (a sliced view with gaps, an expanded one with stride 0). Only its strides are used."""
    return first if is_dense(first) else torch.empty_like(first, memory_format=torch.contiguous_format)


def _walk_layout(tensors: list[Optional[torch.Tensor]]) -> list[Optional[torch.Tensor]]:
    """The tensors in one dense layout (the first given tensor's, when it is dense; else contiguous): the ones
    already in it unchanged, the others copied into it once (each keeping its dtype)."""
    like = _walk_template(next(t for t in tensors if t is not None))
    return [None if t is None else (t if _same_strides(t, like) else torch.empty_like(like, dtype=t.dtype).copy_(t))
            for t in tensors]


def _launch(mode: int, act: str, out_dtype: torch.dtype, x, bias, y, dy, ddx, dim: int, alpha: float, gain: float,
            clamp: Optional[float], grad2_scale: float = 1.0, mask_first: bool = True) -> torch.Tensor:
    """Run one mode of the kernel; the output takes the walking layout of the given tensors."""
    x, y, dy, ddx = _walk_layout([x, y, dy, ddx])
    like = next(t for t in (x, y, dy, ddx) if t is not None)
    out = torch.empty_like(like, dtype=out_dtype)
    numel = out.numel()
    if numel == 0:
        return out
    spec = ACTIVATIONS[act]
    has_bias = bias is not None and x is not None
    channels = like.shape[dim] if has_bias else 1
    # a dim of one element may carry any stride (even 0): it is never stepped along, every element is channel 0
    dim_stride = like.stride(dim) if channels > 1 else 1
    bias_stride = bias.stride(0) if has_bias and channels > 1 else 0
    # the widest tensor read or written sets the tile (one 16-byte vector per thread for it)
    element_bytes = max(t.element_size() for t in (out, x, y, dy, ddx) if t is not None)
    split = wave_split("bias_act", numel, 1, element_bytes, out.device)
    offsets_64 = numel + split.tile >= 2**31 or (channels - 1) * bias_stride >= 2**31
    _bias_act_kernel[(split.programs,)](
        out, x if x is not None else like, bias if has_bias else like, y if y is not None else like,
        dy if dy is not None else like, ddx if ddx is not None else like,
        numel, dim_stride, channels, bias_stride, alpha, gain, 1.0 / gain if gain != 0 else 0.0,
        clamp if clamp is not None else 0.0, grad2_scale,
        MODE=mode, ACT=spec.code, HAS_BIAS=has_bias, REF_Y=mode != MODE_FORWARD and spec.ref == "y",
        CLAMP=clamp is not None, MASK_FIRST=mask_first, DIM_INNERMOST=dim_stride == 1, OFFSETS_64=offsets_64,
        BLOCK=split.tile, num_warps=split.num_warps,
    )
    return out


# ----------------------------------------------------------------------------------------------------------------
# torch.library registration: forward, gradient (differentiable), second derivative
# ----------------------------------------------------------------------------------------------------------------
def _resolved(act: str, alpha: Optional[float], gain: Optional[float]) -> tuple[float, float]:
    spec = ACTIVATIONS[act]
    return (spec.default_alpha if alpha is None else alpha), (spec.default_gain if gain is None else gain)


@torch.library.custom_op("genkernels::bias_act", mutates_args=())
def _bias_act_op(x: torch.Tensor, bias: Optional[torch.Tensor], dim: int, act: str, alpha: float, gain: float,
                 clamp: Optional[float]) -> torch.Tensor:
    return _launch(MODE_FORWARD, act, x.dtype, x, bias, None, None, None, dim, alpha, gain, clamp)


@_bias_act_op.register_fake
def _bias_act_fake(x, bias, dim, act, alpha, gain, clamp):
    return torch.empty_like(_walk_template(x))


@torch.library.custom_op("genkernels::bias_act_grad", mutates_args=())
def _bias_act_grad_op(dy: torch.Tensor, x: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                      y: Optional[torch.Tensor], dim: int, act: str, alpha: float, gain: float,
                      clamp: Optional[float], mask_first: bool) -> torch.Tensor:
    """``dx = dy * gain * act'(x + b)``, zero where the forward clamped: with ``mask_first`` (the gradient) dy is
    masked before the product, else (its adjoint, the derivative in dy) the product is."""
    return _launch(MODE_GRAD, act, dy.dtype, x, bias, y, dy, None, dim, alpha, gain, clamp, 1.0, mask_first)


@_bias_act_grad_op.register_fake
def _bias_act_grad_fake(dy, x, bias, y, dim, act, alpha, gain, clamp, mask_first):
    like = next(t for t in (x, y, dy) if t is not None)
    return torch.empty_like(_walk_template(like), dtype=dy.dtype)


@torch.library.custom_op("genkernels::bias_act_grad2", mutates_args=())
def _bias_act_grad2_op(ddx: torch.Tensor, dy: torch.Tensor, x: Optional[torch.Tensor],
                       bias: Optional[torch.Tensor], y: Optional[torch.Tensor], dim: int, act: str, alpha: float,
                       gain: float, clamp: Optional[float], mask_first: bool) -> torch.Tensor:
    """The gradient op's derivative toward its reference: ``ddx * dy * gain * act''(s)`` (to ``x``) or
    ``ddx * dy * d act'/d a`` (to ``y``, where ``a = y / gain``), zero where the forward clamped (masked as the
    gradient op it differentiates, ``mask_first``)."""
    grad2_scale = gain if ACTIVATIONS[act].ref == "x" else 1.0
    return _launch(MODE_GRAD2, act, ddx.dtype, x, bias, y, dy, ddx, dim, alpha, gain, clamp, grad2_scale,
                   mask_first)


@_bias_act_grad2_op.register_fake
def _bias_act_grad2_fake(ddx, dy, x, bias, y, dim, act, alpha, gain, clamp, mask_first):
    like = next(t for t in (x, y, dy) if t is not None)
    return torch.empty_like(_walk_template(like), dtype=ddx.dtype)


def _bias_grad(grad: torch.Tensor, bias: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum of ``grad`` over every dimension but ``dim``, accumulated in fp32."""
    other = [d for d in range(grad.dim()) if d != dim]
    if not other:  # a 1-D input: the bias gradient is dx itself (sum(dim=[]) would reduce every dim)
        return grad.to(bias.dtype)
    return grad.sum(dim=other, dtype=torch.float32).to(bias.dtype)


def _saved_references(act: str, clamp: Optional[float], x, bias, y):
    """``(x, bias, y)`` as the backward needs them: the input side for ``ref == "x"`` activations (only when there
    is something to read: linear without clamp needs nothing), the output for ``ref == "y"``."""
    spec = ACTIVATIONS[act]
    if spec.ref == "y":
        return None, None, y
    if act == "linear" and clamp is None:
        return None, None, None
    return x, bias, None


def _bias_act_setup(ctx, inputs, output):
    x, bias, dim, act, alpha, gain, clamp = inputs
    ctx.options = (dim, act, alpha, gain, clamp)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(*_saved_references(act, clamp, x, bias, output), bias)


def _bias_act_backward(ctx, dy):
    x, bias_ref, y, bias = ctx.saved_tensors
    dim = ctx.options[0]
    dx = torch.ops.genkernels.bias_act_grad(dy, x, bias_ref, y, *ctx.options, True)
    dbias = _bias_grad(dx, bias, dim) if ctx.has_bias and ctx.needs_input_grad[1] else None
    return dx, dbias, None, None, None, None, None


def _bias_act_grad_setup(ctx, inputs, output):
    dy, x, bias, y, dim, act, alpha, gain, clamp, mask_first = inputs
    ctx.options = (dim, act, alpha, gain, clamp)
    ctx.mask_first = mask_first
    ctx.save_for_backward(dy, x, bias, y)


def _bias_act_grad_backward(ctx, ddx):
    dy, x, bias, y = ctx.saved_tensors
    dim, act = ctx.options[:2]
    grad_dy = None
    if ctx.needs_input_grad[0]:  # the adjoint of the masking: masked after the product, or before
        grad_dy = torch.ops.genkernels.bias_act_grad(ddx, x, bias, y, *ctx.options, not ctx.mask_first)
    grad_x = grad_bias = grad_y = None
    if ACTIVATIONS[act].has_second_grad and any(ctx.needs_input_grad[1:4]):
        second = torch.ops.genkernels.bias_act_grad2(ddx, dy, x, bias, y, *ctx.options, ctx.mask_first)
        if y is not None:
            grad_y = second
        else:
            grad_x = second
            grad_bias = _bias_grad(second, bias, dim) if bias is not None and ctx.needs_input_grad[2] else None
    return grad_dy, grad_x, grad_bias, grad_y, None, None, None, None, None, None


_bias_act_op.register_autograd(_bias_act_backward, setup_context=_bias_act_setup)
_bias_act_grad_op.register_autograd(_bias_act_grad_backward, setup_context=_bias_act_grad_setup)


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------
def check_activation(act: object, alpha: object = None, gain: object = None,
                     clamp: object = None) -> tuple[str, Optional[float], Optional[float], Optional[float]]:
    """Check :func:`bias_act`'s activation options (also used by layers at construction) and return them as
    ``(act, alpha, gain, clamp)`` with the numbers as Python floats (None stays None: the activation's default).

    ``act`` must name an entry of :data:`ACTIVATIONS`; ``alpha``, ``gain`` and ``clamp`` must be finite real
    numbers (``TypeError`` for other types), ``clamp >= 0``, and ``alpha >= 0`` for lrelu, ``> 0`` for elu.
    """
    check_choice(act, "act", tuple(ACTIVATIONS))
    if alpha is not None:
        alpha = check_real(alpha, "alpha")
        if act == "lrelu" and alpha < 0:
            raise ValueError(f"alpha={alpha} must be >= 0 for act='lrelu'")
        if act == "elu" and alpha <= 0:
            raise ValueError(f"alpha={alpha} must be > 0 for act='elu'")
    if gain is not None:
        gain = check_real(gain, "gain")
    if clamp is not None:
        clamp = check_real(clamp, "clamp", low=0.0)
    return act, alpha, gain, clamp


def _check_arguments(x, bias, dim, act, alpha, gain, clamp):
    """Every argument checked before any launch; returns ``dim`` normalized and the activation options."""
    check_float_tensor(x, "x")
    check_int(dim, "dim")
    options = check_activation(act, alpha, gain, clamp)
    if bias is not None:
        check_float_tensor(bias, "bias")
        check_same_dtype(x, "x", bias, "bias")
        check_same_device([("x", x), ("bias", bias)])
        if not -x.dim() <= dim < x.dim():
            raise ValueError(f"dim={dim} is out of range for x with {describe(x)}; expected "
                             f"{-x.dim()} <= dim < {x.dim()}")
        dim %= x.dim()
        if bias.dim() != 1 or bias.shape[0] != x.shape[dim]:
            raise ValueError(f"bias must be 1-D of length x.shape[{dim}] = {x.shape[dim]}; got {describe(bias)}")
    return dim, options


def bias_act(x: torch.Tensor, bias: Optional[torch.Tensor] = None, *, dim: int = 1, act: str = "linear",
             alpha: Optional[float] = None, gain: Optional[float] = None, clamp: Optional[float] = None,
             impl: str = "auto") -> torch.Tensor:
    """Fused ``clamp(act(x + bias) * gain, -clamp, clamp)`` with first- and second-order gradients.

        y = clamp(act(x + b[broadcast along dim]) * gain, -clamp, clamp)

    (StyleGAN2's ``bias_act``, Karras et al. 2020.) Differentiable twice in ``x`` and ``bias`` under every impl
    (the R1 penalty of a GAN differentiates the gradient of the discriminator's input).

    Args:
        x: input of any shape and strides, fp32/fp16/bf16 (fp64 runs the eager reference in fp64); the output
            keeps a dense layout of ``x`` (channels_last stays channels_last; a view with gaps comes back
            contiguous).
        bias: None or a 1-D tensor of length ``x.shape[dim]`` (any stride), ``x``'s dtype and device.
        dim: the dimension ``bias`` runs along (checked when ``bias`` is given).
        act: one of :data:`ACTIVATIONS`: linear, relu, lrelu, tanh, sigmoid, silu, elu, softplus, gelu (exact,
            ``F.gelu``), gelu_tanh (the tanh approximation, ``F.gelu(approximate="tanh")``), selu (``F.selu``)
            and swish (``x sigmoid(x)``, StyleGAN2's, default gain sqrt(2)).
        alpha: lrelu's negative slope (default 0.2, >= 0) or elu's scale (default 1, > 0); ignored otherwise.
        gain: output scale; default ``sqrt(2)`` for relu, lrelu and swish, 1 otherwise.
        clamp: None or a bound >= 0 on ``|y|``. The gradient is zero where the output is clamped; for the
            activations whose backward reads ``y``, an output stored as exactly ``+-clamp`` counts as clamped.
        impl: "auto", "triton" or "eager".

    Returns:
        ``y`` with ``x``'s shape and dtype. NaN in ``x`` or ``bias`` gives NaN in ``y``; gradients are NaN where
        PyTorch's are (see the module notes).
    """
    dim, (act, alpha, gain, clamp) = _check_arguments(x, bias, dim, act, alpha, gain, clamp)
    impl = choose_impl(impl, "bias_act", {"x": x, "bias": bias})
    alpha, gain = _resolved(act, alpha, gain)
    if impl == "eager":
        return bias_act_reference(x, bias, dim, act, alpha, gain, clamp)
    return torch.ops.genkernels.bias_act(x, bias, dim, act, float(alpha), float(gain), clamp)
