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
``dim``, a torch reduction accumulated in fp32. Non-dense inputs (a sliced view with gaps) are copied once into a
dense layout first.
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
from .launch import CompileVariant, elementwise_block, elementwise_block_configs
from .runtime import compute_dtype, resolve_impl
from .triton_helpers import sigmoid, tanh

# gelu uses the tanh approximation (Hendrycks & Gimpel 2016, eq. 2; torch's approximate="tanh"): the exact
# erf form needs libdevice, which does not run in Triton's interpreter.
GELU_K = math.sqrt(2.0 / math.pi)
GELU_C = 0.044715
# torch.nn.functional.softplus returns x itself above this input.
SOFTPLUS_THRESHOLD = 20.0


@dataclasses.dataclass(frozen=True)
class Activation:
    """One activation of :func:`bias_act`.

    ``ref`` is what its backward reads: ``"x"`` (the input and bias; the derivatives are functions of ``x + b``)
    or ``"y"`` (the output; the derivatives are functions of ``act(x + b) = y / gain``). ``has_second_grad`` is
    False where the second derivative is zero almost everywhere (piecewise-linear activations).
    """

    code: int
    func: Callable[[torch.Tensor, float], torch.Tensor]
    default_alpha: float
    default_gain: float
    ref: str
    has_second_grad: bool


ACTIVATIONS = {
    "linear": Activation(0, lambda s, alpha: s, 0.0, 1.0, "x", False),
    "relu": Activation(1, lambda s, alpha: torch.relu(s), 0.0, math.sqrt(2.0), "y", False),
    "lrelu": Activation(2, lambda s, alpha: F.leaky_relu(s, alpha), 0.2, math.sqrt(2.0), "y", False),
    "tanh": Activation(3, lambda s, alpha: torch.tanh(s), 0.0, 1.0, "y", True),
    "sigmoid": Activation(4, lambda s, alpha: torch.sigmoid(s), 0.0, 1.0, "y", True),
    "silu": Activation(5, lambda s, alpha: F.silu(s), 0.0, 1.0, "x", True),
    "elu": Activation(6, lambda s, alpha: F.elu(s, alpha), 1.0, 1.0, "y", True),
    "softplus": Activation(7, lambda s, alpha: F.softplus(s, threshold=SOFTPLUS_THRESHOLD), 0.0, 1.0, "y", True),
    "gelu": Activation(8, lambda s, alpha: F.gelu(s, approximate="tanh"), 0.0, 1.0, "x", True),
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
    sigmoid ``1 / (1 + e^-s)``; silu ``s sigmoid(s)``; elu ``s if s > 0 else alpha (e^s - 1)``; softplus
    ``log(1 + e^s)`` (``s`` above 20); gelu ``s/2 (1 + tanh(sqrt(2/pi) (s + 0.044715 s^3)))``. Computes in fp32
    (fp64 for fp64 inputs) and returns ``x``'s dtype; differentiable to any order by autograd.
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
    """The activation of the pre-activation ``s = x + b`` (fp32)."""
    if ACT == 0:
        a = s
    elif ACT == 1:
        a = tl.maximum(s, 0.0)
    elif ACT == 2:
        a = tl.where(s > 0, s, alpha * s)
    elif ACT == 3:
        a = tanh(s)
    elif ACT == 4:
        a = sigmoid(s)
    elif ACT == 5:
        a = s * sigmoid(s)
    elif ACT == 6:
        a = tl.where(s > 0, s, alpha * _expm1(tl.minimum(s, 0.0)))
    elif ACT == 7:
        a = tl.where(s > 20.0, s, tl.maximum(s, 0.0) + _log1p(tl.exp(-tl.abs(s))))
    else:
        u = 0.7978845608028654 * (s + 0.044715 * s * s * s)
        a = 0.5 * s * (1.0 + tanh(u))
    return a


@triton.jit
def _derivatives_from_x(s, ACT: tl.constexpr):
    """``(act'(s), act''(s))`` for the activations whose backward reads the input (linear, silu, gelu)."""
    if ACT == 5:
        sig = sigmoid(s)
        d1 = sig * (1.0 + s * (1.0 - sig))
        d2 = sig * (1.0 - sig) * (2.0 + s * (1.0 - 2.0 * sig))
    elif ACT == 8:
        # tanh(u) is +-1 in fp32 beyond |s| = 10, so clamping there changes nothing but keeps s^2 finite
        s = tl.minimum(tl.maximum(s, -10.0), 10.0)
        s2 = s * s
        t = tanh(0.7978845608028654 * (s + 0.044715 * s2 * s))
        du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * s2)
        d2u = 0.7978845608028654 * 6.0 * 0.044715 * s
        sech2 = 1.0 - t * t
        d1 = 0.5 * (1.0 + t) + 0.5 * s * sech2 * du
        d2 = sech2 * (du + 0.5 * s * (d2u - 2.0 * t * du * du))
    else:
        d1 = tl.full(s.shape, 1.0, tl.float32)
        d2 = tl.zeros(s.shape, tl.float32)
    return d1, d2


@triton.jit
def _derivatives_from_y(a, alpha, ACT: tl.constexpr):
    """``(act'(s), d act'(s) / d a)`` written in ``a = act(s)`` for the activations whose backward reads the
    output (relu, lrelu, tanh, sigmoid, elu, softplus)."""
    zero = tl.zeros(a.shape, tl.float32)
    if ACT == 1:
        d1 = tl.where(a > 0, 1.0, 0.0)
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
    else:
        e = tl.exp(-a)
        d1 = 1.0 - e
        d2 = e
    return d1, d2


@triton.jit(do_not_specialize=["alpha", "gain", "inv_gain", "clamp", "grad2_scale"])
def _bias_act_kernel(
    out_ptr, x_ptr, bias_ptr, y_ptr, dy_ptr, ddx_ptr,
    numel, dim_stride, channels, alpha, gain, inv_gain, clamp, grad2_scale,
    MODE: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, REF_Y: tl.constexpr, CLAMP: tl.constexpr,
    DIM_INNERMOST: tl.constexpr, OFFSETS_64: tl.constexpr, BLOCK: tl.constexpr,
):
    # Every tensor shares one dense layout: element k of the walk sits at offset k in each of them.
    if OFFSETS_64:
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    else:
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel

    if MODE == 0 or not REF_Y:
        s = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            if DIM_INNERMOST:
                channel = offsets % channels
            else:
                channel = (offsets // dim_stride) % channels
            s += tl.load(bias_ptr + channel, mask=mask, other=0.0).to(tl.float32)

    if MODE == 0:
        y = _activate(s, alpha, ACT) * gain
        if CLAMP:
            y = tl.minimum(tl.maximum(y, -clamp), clamp)
        tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        if REF_Y:
            y = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            d1, d2 = _derivatives_from_y(y * inv_gain, alpha, ACT)
        else:
            d1, d2 = _derivatives_from_x(s, ACT)
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if MODE == 1:
            result = dy * gain * d1
        else:
            ddx = tl.load(ddx_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            result = ddx * dy * grad2_scale * d2
        if CLAMP:
            if REF_Y:
                passes = tl.abs(y) < clamp  # a stored output at +-clamp is taken as saturated
            else:
                passes = tl.abs(_activate(s, alpha, ACT) * gain) <= clamp  # torch.clamp's gradient
            result = tl.where(passes, result, 0.0)
        tl.store(out_ptr + offsets, result.to(out_ptr.dtype.element_ty), mask=mask)


def _same_strides(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal strides in every dimension of more than one element (the others are never stepped along)."""
    return all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


def _is_dense(tensor: torch.Tensor) -> bool:
    """Dense and non-overlapping in some dim order: exactly then ``empty_like`` reproduces its strides."""
    return _same_strides(torch.empty_like(tensor), tensor)


def _walk_layout(tensors: list[Optional[torch.Tensor]]) -> list[Optional[torch.Tensor]]:
    """The tensors in one dense layout (the first given tensor's, when it is dense; else contiguous): the ones
    already in it unchanged, the others copied into it."""
    present = [t for t in tensors if t is not None]
    first = present[0]
    like = first if _is_dense(first) else first.contiguous()
    return [None if t is None else (t if _same_strides(t, like) else torch.empty_like(like).copy_(t))
            for t in tensors]


def _launch(mode: int, act: str, out_dtype: torch.dtype, x, bias, y, dy, ddx, dim: int, alpha: float, gain: float,
            clamp: Optional[float], grad2_scale: float = 1.0) -> torch.Tensor:
    """Run one mode of the kernel; the output takes the walking layout of the given tensors."""
    x, y, dy, ddx = _walk_layout([x, y, dy, ddx])
    like = next(t for t in (x, y, dy, ddx) if t is not None)
    out = torch.empty_like(like, dtype=out_dtype)
    numel = out.numel()
    if numel == 0:
        return out
    spec = ACTIVATIONS[act]
    has_bias = bias is not None and x is not None
    dim_stride = like.stride(dim) if has_bias else 1
    block, num_warps = elementwise_block(numel)
    _bias_act_kernel[(triton.cdiv(numel, block),)](
        out, x if x is not None else like, bias if has_bias else like, y if y is not None else like,
        dy if dy is not None else like, ddx if ddx is not None else like,
        numel, dim_stride, like.shape[dim] if has_bias else 1, alpha, gain, 1.0 / gain if gain != 0 else 0.0,
        clamp if clamp is not None else 0.0, grad2_scale,
        MODE=mode, ACT=spec.code, HAS_BIAS=has_bias, REF_Y=mode != MODE_FORWARD and spec.ref == "y",
        CLAMP=clamp is not None, DIM_INNERMOST=dim_stride == 1, OFFSETS_64=numel >= 2**31,
        BLOCK=block, num_warps=num_warps,
    )
    return out


def compile_variants() -> list[CompileVariant]:
    """Every block config, each dtype, each mode and each activation at least once."""
    configs = elementwise_block_configs()
    block, num_warps = configs[-1]
    scalars = {"alpha": "fp32", "gain": "fp32", "inv_gain": "fp32", "clamp": "fp32", "grad2_scale": "fp32"}
    base = dict(MODE=MODE_FORWARD, ACT=2, HAS_BIAS=True, REF_Y=False, CLAMP=False, DIM_INNERMOST=False,
                OFFSETS_64=False, BLOCK=block)
    variants = [CompileVariant(_bias_act_kernel, {"*": f"*{data_type}"}, base, num_warps, scalars)
                for data_type in ("fp32", "fp16", "bf16")]
    for small_block, small_warps in configs[:-1]:
        variants.append(CompileVariant(_bias_act_kernel, {"*": "*fp32"}, dict(base, BLOCK=small_block),
                                       small_warps, scalars))
    for name, spec in ACTIVATIONS.items():
        mode = MODE_GRAD2 if spec.has_second_grad else MODE_GRAD
        switches = dict(MODE=mode, ACT=spec.code, REF_Y=spec.ref == "y", CLAMP=spec.code % 2 == 0,
                        DIM_INNERMOST=spec.code % 3 == 0, OFFSETS_64=spec.code == 8)
        variants.append(CompileVariant(_bias_act_kernel, {"*": "*bf16"}, dict(base, **switches), num_warps, scalars))
    return variants


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
    return torch.empty_like(x if _is_dense(x) else x.contiguous())


@torch.library.custom_op("genkernels::bias_act_grad", mutates_args=())
def _bias_act_grad_op(dy: torch.Tensor, x: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                      y: Optional[torch.Tensor], dim: int, act: str, alpha: float, gain: float,
                      clamp: Optional[float]) -> torch.Tensor:
    """``dx = dy * gain * act'(x + b)``, zero where the forward clamped."""
    return _launch(MODE_GRAD, act, dy.dtype, x, bias, y, dy, None, dim, alpha, gain, clamp)


@_bias_act_grad_op.register_fake
def _bias_act_grad_fake(dy, x, bias, y, dim, act, alpha, gain, clamp):
    like = next(t for t in (x, y, dy) if t is not None)
    return torch.empty_like(like if _is_dense(like) else like.contiguous(), dtype=dy.dtype)


@torch.library.custom_op("genkernels::bias_act_grad2", mutates_args=())
def _bias_act_grad2_op(ddx: torch.Tensor, dy: torch.Tensor, x: Optional[torch.Tensor],
                       bias: Optional[torch.Tensor], y: Optional[torch.Tensor], dim: int, act: str, alpha: float,
                       gain: float, clamp: Optional[float]) -> torch.Tensor:
    """The gradient op's derivative toward its reference: ``ddx * dy * gain * act''(s)`` (to ``x``) or
    ``ddx * dy * d act'/d a`` (to ``y``, where ``a = y / gain``), zero where the forward clamped."""
    grad2_scale = gain if ACTIVATIONS[act].ref == "x" else 1.0
    return _launch(MODE_GRAD2, act, ddx.dtype, x, bias, y, dy, ddx, dim, alpha, gain, clamp, grad2_scale)


@_bias_act_grad2_op.register_fake
def _bias_act_grad2_fake(ddx, dy, x, bias, y, dim, act, alpha, gain, clamp):
    like = next(t for t in (x, y, dy) if t is not None)
    return torch.empty_like(like if _is_dense(like) else like.contiguous(), dtype=ddx.dtype)


def _bias_grad(grad: torch.Tensor, bias: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum of ``grad`` over every dimension but ``dim``, accumulated in fp32."""
    other = [d for d in range(grad.dim()) if d != dim]
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
    dx = torch.ops.genkernels.bias_act_grad(dy, x, bias_ref, y, *ctx.options)
    dbias = _bias_grad(dx, bias, dim) if ctx.has_bias and ctx.needs_input_grad[1] else None
    return dx, dbias, None, None, None, None, None


def _bias_act_grad_setup(ctx, inputs, output):
    dy, x, bias, y, dim, act, alpha, gain, clamp = inputs
    ctx.options = (dim, act, alpha, gain, clamp)
    ctx.save_for_backward(dy, x, bias, y)


def _bias_act_grad_backward(ctx, ddx):
    dy, x, bias, y = ctx.saved_tensors
    dim, act = ctx.options[:2]
    grad_dy = torch.ops.genkernels.bias_act_grad(ddx, x, bias, y, *ctx.options) if ctx.needs_input_grad[0] else None
    grad_x = grad_bias = grad_y = None
    if ACTIVATIONS[act].has_second_grad and any(ctx.needs_input_grad[1:4]):
        second = torch.ops.genkernels.bias_act_grad2(ddx, dy, x, bias, y, *ctx.options)
        if y is not None:
            grad_y = second
        else:
            grad_x = second
            grad_bias = _bias_grad(second, bias, dim) if bias is not None and ctx.needs_input_grad[2] else None
    return grad_dy, grad_x, grad_bias, grad_y, None, None, None, None, None


_bias_act_op.register_autograd(_bias_act_backward, setup_context=_bias_act_setup)
_bias_act_grad_op.register_autograd(_bias_act_grad_backward, setup_context=_bias_act_grad_setup)


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------
def _check_arguments(x, bias, dim, act, alpha, gain, clamp) -> tuple[torch.device, int]:
    check_float_tensor(x, "x")
    check_int(dim, "dim")
    check_choice(act, "act", tuple(ACTIVATIONS))
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
    if alpha is not None:
        alpha = check_real(alpha, "alpha")
        if act == "lrelu" and alpha < 0:
            raise ValueError(f"alpha={alpha} must be >= 0 for act='lrelu'")
        if act == "elu" and alpha <= 0:
            raise ValueError(f"alpha={alpha} must be > 0 for act='elu'")
    if gain is not None:
        check_real(gain, "gain")
    if clamp is not None:
        check_real(clamp, "clamp", low=0.0)
    return x.device, dim


def bias_act(x: torch.Tensor, bias: Optional[torch.Tensor] = None, *, dim: int = 1, act: str = "linear",
             alpha: Optional[float] = None, gain: Optional[float] = None, clamp: Optional[float] = None,
             impl: str = "auto") -> torch.Tensor:
    """Fused ``clamp(act(x + bias) * gain, -clamp, clamp)`` with first- and second-order gradients.

        y = clamp(act(x + b[broadcast along dim]) * gain, -clamp, clamp)

    (StyleGAN2's ``bias_act``, Karras et al. 2020.) Differentiable twice in ``x`` and ``bias`` under every impl
    (the R1 penalty of a GAN differentiates the gradient of the discriminator's input).

    Args:
        x: input of any shape, fp32/fp16/bf16; the output keeps its layout (channels_last stays channels_last).
        bias: None or a 1-D tensor of length ``x.shape[dim]``, ``x``'s dtype and device.
        dim: the dimension ``bias`` runs along (checked when ``bias`` is given).
        act: one of :data:`ACTIVATIONS`: linear, relu, lrelu, tanh, sigmoid, silu, elu, softplus, gelu (gelu is
            the tanh approximation, torch's ``approximate="tanh"``).
        alpha: lrelu's negative slope (default 0.2, >= 0) or elu's scale (default 1, > 0); ignored otherwise.
        gain: output scale; default ``sqrt(2)`` for relu and lrelu, 1 otherwise.
        clamp: None or a bound >= 0 on ``|y|``. The gradient is zero where the output is clamped; for the
            activations whose backward reads ``y``, an output stored as exactly ``+-clamp`` counts as clamped.
        impl: "auto", "triton" or "eager".

    Returns:
        ``y`` with ``x``'s shape and dtype.
    """
    device, dim = _check_arguments(x, bias, dim, act, alpha, gain, clamp)
    impl = resolve_impl(impl, device, "bias_act")
    alpha, gain = _resolved(act, alpha, gain)
    if clamp is not None:
        clamp = float(clamp)
    if impl == "eager":
        return bias_act_reference(x, bias, dim, act, alpha, gain, clamp)
    return torch.ops.genkernels.bias_act(x, bias, dim, act, float(alpha), float(gain), clamp)

