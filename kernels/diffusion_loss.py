"""The diffusion training step's memory-bound ops: the forward process ``q_sample`` and the fused training loss.

``q_sample`` noises a clean batch, ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps`` (Ho et al. 2020, eq. 4; diffusers'
``add_noise``), drawing ``eps`` inside the kernel when none is given. ``diffusion_loss`` forms the training target
(``eps``, ``x0`` or ``v``) and the mean squared error against the network's output in one pass. For an fp32
output it writes the gradient of the loss w.r.t. the output in the same pass (the fused-loss trick of
Liger-Kernel), so the backward is a scale by the incoming gradient; for fp16/bf16 outputs the backward recomputes
it from the inputs with the incoming gradient (a loss scaler's 2**16) applied in fp32 before the one rounding, as
plain PyTorch's autograd does (a 16-bit gradient stored before that scale loses its digits to underflow). When
the noise came from a seed it is regenerated from that seed instead of read: the loss pass reads only
``model_output`` and ``x0``.

Noise stream: element ``[b, *idx]`` gets draw ``i mod 4`` of Philox group ``i div 4`` of sample ``b``, ``i`` the
row-major index of ``idx`` (the convention of every in-kernel draw, see :class:`~genkernels.kernels.launch.SampleWalk`;
:mod:`genkernels.kernels.philox` computes the same stream in PyTorch for the eager path). It depends on the seed
and the shape only, never on strides or block sizes, so ``q_sample`` and ``diffusion_loss`` given one seed see the
same noise, under either impl.

Reductions are deterministic: every program writes one fp32 partial sum of squared errors, and the partials are
summed in a fixed order afterwards (no atomics).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .checks import (
    check_choice,
    check_float_like,
    check_float_tensor,
    check_generator,
    check_min_rank,
    check_same_device,
    check_same_shape,
    check_seed_tensor,
)
from .diffusion import (
    PREDICTION_TYPES,
    NoiseSchedule,
    batch_stride,
    check_timesteps,
    schedule_terms,
)
from .launch import SampleWalk, batch_chunks, draw_philox_seed, walk_is_contiguous, walk_noise_mode, wave_split
from .philox import philox_normal
from .runtime import choose_impl, compute_dtype
from .triton_helpers import sample_offsets, span_of_program, tile_of_span, walk_noise

REDUCTIONS = ("mean", "sum", "none", "per_sample")
_PREDICTION_CODES = {name: code for code, name in enumerate(PREDICTION_TYPES)}


# ----------------------------------------------------------------------------------------------------------------
# Eager reference: the specification, the fallback and the test oracle
# ----------------------------------------------------------------------------------------------------------------
def _sqrt_alpha_beta(schedule: NoiseSchedule, like: torch.Tensor, timestep: torch.Tensor):
    """``sqrt(a_t)`` and ``sqrt(1 - a_t)`` per sample, in ``like``'s compute dtype, shaped to broadcast over it."""
    alpha, _, beta, _ = schedule_terms(schedule, like, timestep, timestep, True)
    return alpha.sqrt(), beta.sqrt()


def q_sample_reference(x0: torch.Tensor, timestep: torch.Tensor, schedule: NoiseSchedule,
                       noise: torch.Tensor) -> torch.Tensor:
    """The forward process in closed form (Ho et al. 2020, eq. 4), plain PyTorch:

        x_t = sqrt(a_t) * x0 + sqrt(1 - a_t) * eps,      a_t = alphas_cumprod[t]

    ``timestep`` is an integer tensor ``[batch]``. Computes in fp32 (fp64 for fp64 inputs) and returns ``x0``'s
    dtype. Differentiable by autograd in ``x0`` and ``noise``.
    """
    dtype = compute_dtype(x0.dtype)
    sqrt_alpha, sqrt_beta = _sqrt_alpha_beta(schedule, x0.to(dtype), timestep)
    return (sqrt_alpha * x0.to(dtype) + sqrt_beta * noise.to(dtype)).to(x0.dtype)


def diffusion_target_reference(x0: torch.Tensor, noise: torch.Tensor, sqrt_alpha: torch.Tensor,
                               sqrt_beta: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The regression target of a network trained with ``prediction_type``:

        epsilon:       eps
        sample:        x0
        v_prediction:  v = sqrt(a_t) eps - sqrt(1 - a_t) x0        (Salimans & Ho 2022, section 4)
    """
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    return sqrt_alpha * noise - sqrt_beta * x0


def diffusion_loss_reference(model_output: torch.Tensor, x0: torch.Tensor, timestep: torch.Tensor,
                             schedule: NoiseSchedule, noise: torch.Tensor, prediction_type: str = "epsilon",
                             reduction: str = "mean") -> torch.Tensor:
    """The denoising training loss (Ho et al. 2020, eq. 14, with the ``x0`` and ``v`` targets), plain PyTorch:

        loss = reduce((model_output - target)^2)

    with ``target`` from :func:`diffusion_target_reference`. ``reduction``: "mean" (over every element),
    "sum", "none" (elementwise, as ``F.mse_loss``) or "per_sample" (mean over each sample, ``[batch]``, for
    per-timestep weightings such as min-SNR). Computes in fp32 (fp64 when an input is fp64); reduced losses come
    back in that dtype, the elementwise loss in ``model_output``'s dtype. Differentiable by autograd in
    ``model_output`` and ``x0``; ``noise`` is a constant.
    """
    dtype = compute_dtype(torch.promote_types(model_output.dtype, x0.dtype))
    x0_c = x0.to(dtype)
    sqrt_alpha, sqrt_beta = _sqrt_alpha_beta(schedule, x0_c, timestep)
    target = diffusion_target_reference(x0_c, noise.detach().to(dtype), sqrt_alpha, sqrt_beta, prediction_type)
    squared = (model_output.to(dtype) - target) ** 2
    if reduction == "none":
        return squared.to(model_output.dtype)
    if reduction == "per_sample":
        return squared.flatten(1).mean(dim=1) if squared.dim() > 1 else squared
    return squared.sum() if reduction == "sum" else squared.mean()


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _schedule_sqrt_terms(table_ptr, timestep_ptr, timestep_value, timestep_stride, num_train_timesteps,
                         batch_index, TIMESTEP_IN_TENSOR: tl.constexpr):
    """``sqrt(a_t), sqrt(1 - a_t)`` of sample ``batch_index``, gathered on the device from the ``[2, T]`` table."""
    if TIMESTEP_IN_TENSOR:
        t = tl.load(timestep_ptr + batch_index.to(tl.int64) * timestep_stride).to(tl.int64)
    else:
        t = tl.full((), timestep_value, tl.int64)
    # The host validated the timesteps; clamping only guarantees that no gather can leave the table.
    t = tl.minimum(tl.maximum(t, 0), num_train_timesteps - 1)
    return tl.sqrt(tl.load(table_ptr + t)), tl.sqrt(tl.load(table_ptr + num_train_timesteps + t))


@triton.jit
def _target_and_x0_coef(x0, eps, sqrt_alpha, sqrt_beta, PREDICTION: tl.constexpr):
    """The training target and ``d target / d x0`` (see ``diffusion_target_reference``)."""
    if PREDICTION == 0:  # epsilon
        target, coef = eps, 0.0
    elif PREDICTION == 1:  # sample
        target, coef = x0, 1.0
    else:  # v_prediction
        target, coef = sqrt_alpha * eps - sqrt_beta * x0, -sqrt_beta
    return target, coef


@triton.jit
def _loss_target(x0_ptr, noise_ptr, seed_ptr, table_ptr, timestep_ptr, timestep_value, timestep_stride,
                 num_train_timesteps, batch_index, first, inner, mask, x_sb, x_s0, x_s1, x_s2, x_s3,
                 z_sb, z_s0, z_s1, z_s2, z_s3, l_s0, l_s1, l_s2, l_s3, size1, size2, size3,
                 PREDICTION: tl.constexpr, NOISE_MODE: tl.constexpr, TIMESTEP_IN_TENSOR: tl.constexpr,
                 INNER_CONTIGUOUS: tl.constexpr, BLOCK: tl.constexpr):
    """The training target of elements ``inner`` of sample ``batch_index`` and ``d target / d x0``, reading only
    what the prediction type needs (``x0`` unless "epsilon", the noise unless "sample")."""
    if PREDICTION != 0:
        x_offsets = sample_offsets(batch_index, inner, x_sb, x_s0, x_s1, x_s2, x_s3, size1, size2, size3,
                                   INNER_CONTIGUOUS)
        x0 = tl.load(x0_ptr + x_offsets, mask=mask, other=0.0).to(tl.float32)
    else:
        x0 = tl.zeros((BLOCK,), tl.float32)
    if PREDICTION != 1:
        eps = walk_noise(noise_ptr, seed_ptr, batch_index, first, inner, mask, z_sb, z_s0, z_s1, z_s2, z_s3,
                           l_s0, l_s1, l_s2, l_s3, size1, size2, size3, NOISE_MODE, INNER_CONTIGUOUS, BLOCK)
    else:
        eps = tl.zeros((BLOCK,), tl.float32)
    sqrt_alpha, sqrt_beta = _schedule_sqrt_terms(table_ptr, timestep_ptr, timestep_value, timestep_stride,
                                                 num_train_timesteps, batch_index, TIMESTEP_IN_TENSOR)
    return _target_and_x0_coef(x0, eps, sqrt_alpha, sqrt_beta, PREDICTION)


@triton.jit(do_not_specialize=["timestep_value"])
def _q_sample_kernel(
    out_ptr, x0_ptr, noise_ptr, seed_ptr, table_ptr, timestep_ptr,
    timestep_value, timestep_stride, num_train_timesteps, batch_start, inner_numel, size1, size2, size3,
    out_sb, out_s0, out_s1, out_s2, out_s3,
    x_sb, x_s0, x_s1, x_s2, x_s3,
    z_sb, z_s0, z_s1, z_s2, z_s3,
    l_s0, l_s1, l_s2, l_s3,
    NOISE_MODE: tl.constexpr, TIMESTEP_IN_TENSOR: tl.constexpr, INNER_CONTIGUOUS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    batch_index = batch_start + tl.program_id(1)
    sqrt_alpha, sqrt_beta = _schedule_sqrt_terms(table_ptr, timestep_ptr, timestep_value, timestep_stride,
                                                 num_train_timesteps, batch_index, TIMESTEP_IN_TENSOR)
    lo, hi, steps = span_of_program(inner_numel, BLOCK)
    for step in range(steps):
        first, inner, mask = tile_of_span(lo, hi, step, BLOCK)
        x_offsets = sample_offsets(batch_index, inner, x_sb, x_s0, x_s1, x_s2, x_s3, size1, size2, size3,
                                   INNER_CONTIGUOUS)
        x0 = tl.load(x0_ptr + x_offsets, mask=mask, other=0.0).to(tl.float32)
        eps = walk_noise(noise_ptr, seed_ptr, batch_index, first, inner, mask, z_sb, z_s0, z_s1, z_s2, z_s3,
                         l_s0, l_s1, l_s2, l_s3, size1, size2, size3, NOISE_MODE, INNER_CONTIGUOUS, BLOCK)
        x_t = sqrt_alpha * x0 + sqrt_beta * eps
        out_offsets = sample_offsets(batch_index, inner, out_sb, out_s0, out_s1, out_s2, out_s3, size1, size2,
                                     size3, INNER_CONTIGUOUS)
        tl.store(out_ptr + out_offsets, x_t.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["timestep_value", "grad_scale"])
def _diffusion_loss_fwd_kernel(
    out_ptr, partial_ptr, model_output_ptr, x0_ptr, noise_ptr, seed_ptr, table_ptr, timestep_ptr,
    timestep_value, timestep_stride, num_train_timesteps, grad_scale,
    batch_start, inner_numel, num_blocks, size1, size2, size3,
    out_sb, out_s0, out_s1, out_s2, out_s3,
    mo_sb, mo_s0, mo_s1, mo_s2, mo_s3,
    x_sb, x_s0, x_s1, x_s2, x_s3,
    z_sb, z_s0, z_s1, z_s2, z_s3,
    l_s0, l_s1, l_s2, l_s3,
    PREDICTION: tl.constexpr, ELEMENTWISE: tl.constexpr, WRITE_GRAD: tl.constexpr, NOISE_MODE: tl.constexpr,
    TIMESTEP_IN_TENSOR: tl.constexpr, INNER_CONTIGUOUS: tl.constexpr, BLOCK: tl.constexpr,
):
    """ELEMENTWISE: ``out = (model_output - target)^2``. Otherwise one partial sum of squared errors per program
    (over its span), and with WRITE_GRAD ``out = 2 * grad_scale * (model_output - target)``, the gradient of the
    reduced loss."""
    batch_index = batch_start + tl.program_id(1)
    lo, hi, steps = span_of_program(inner_numel, BLOCK)
    squares = tl.zeros((BLOCK,), tl.float32)
    for step in range(steps):
        first, inner, mask = tile_of_span(lo, hi, step, BLOCK)
        mo_offsets = sample_offsets(batch_index, inner, mo_sb, mo_s0, mo_s1, mo_s2, mo_s3, size1, size2, size3,
                                    INNER_CONTIGUOUS)
        model_output = tl.load(model_output_ptr + mo_offsets, mask=mask, other=0.0).to(tl.float32)
        target, _ = _loss_target(x0_ptr, noise_ptr, seed_ptr, table_ptr, timestep_ptr, timestep_value,
                                 timestep_stride, num_train_timesteps, batch_index, first, inner, mask,
                                 x_sb, x_s0, x_s1, x_s2, x_s3, z_sb, z_s0, z_s1, z_s2, z_s3, l_s0, l_s1, l_s2, l_s3,
                                 size1, size2, size3, PREDICTION, NOISE_MODE, TIMESTEP_IN_TENSOR, INNER_CONTIGUOUS,
                                 BLOCK)
        # drawn noise is not zero on masked lanes: zero their difference so the partial sums only see real elements
        diff = tl.where(mask, model_output - target, 0.0)
        out_offsets = sample_offsets(batch_index, inner, out_sb, out_s0, out_s1, out_s2, out_s3, size1, size2,
                                     size3, INNER_CONTIGUOUS)
        if ELEMENTWISE:
            tl.store(out_ptr + out_offsets, (diff * diff).to(out_ptr.dtype.element_ty), mask=mask)
        else:
            squares += diff * diff
            if WRITE_GRAD:
                tl.store(out_ptr + out_offsets, (2.0 * grad_scale * diff).to(out_ptr.dtype.element_ty), mask=mask)
    if not ELEMENTWISE:
        tl.store(partial_ptr + batch_index.to(tl.int64) * num_blocks + tl.program_id(0), tl.sum(squares, axis=0))


@triton.jit(do_not_specialize=["timestep_value", "grad_scale"])
def _diffusion_loss_bwd_kernel(
    grad_mo_ptr, grad_x0_ptr, grad_loss_ptr, model_output_ptr, x0_ptr, noise_ptr, seed_ptr, table_ptr,
    timestep_ptr, timestep_value, timestep_stride, num_train_timesteps, grad_scale,
    batch_start, inner_numel, size1, size2, size3,
    gm_sb, gm_s0, gm_s1, gm_s2, gm_s3,
    gx_sb, gx_s0, gx_s1, gx_s2, gx_s3,
    gl_sb, gl_s0, gl_s1, gl_s2, gl_s3,
    mo_sb, mo_s0, mo_s1, mo_s2, mo_s3,
    x_sb, x_s0, x_s1, x_s2, x_s3,
    z_sb, z_s0, z_s1, z_s2, z_s3,
    l_s0, l_s1, l_s2, l_s3,
    PREDICTION: tl.constexpr, WRITE_GRAD_MO: tl.constexpr, WRITE_GRAD_X0: tl.constexpr,
    GRAD_PER_SAMPLE: tl.constexpr, NOISE_MODE: tl.constexpr, TIMESTEP_IN_TENSOR: tl.constexpr,
    INNER_CONTIGUOUS: tl.constexpr, BLOCK: tl.constexpr,
):
    """The loss's gradients recomputed from the inputs: ``grad_mo = 2 grad_scale (model_output - target)
    grad_loss`` and ``grad_x0 = -(d target / d x0) grad_mo``, in fp32 until the store. ``grad_loss`` is the
    elementwise upstream gradient, or with GRAD_PER_SAMPLE one value per sample (``gl_sb`` apart: 0 for the
    scalar of "mean"/"sum"), and ``grad_scale`` the reduction's ``1/N``."""
    batch_index = batch_start + tl.program_id(1)
    lo, hi, steps = span_of_program(inner_numel, BLOCK)
    for step in range(steps):
        first, inner, mask = tile_of_span(lo, hi, step, BLOCK)
        mo_offsets = sample_offsets(batch_index, inner, mo_sb, mo_s0, mo_s1, mo_s2, mo_s3, size1, size2, size3,
                                    INNER_CONTIGUOUS)
        model_output = tl.load(model_output_ptr + mo_offsets, mask=mask, other=0.0).to(tl.float32)
        if GRAD_PER_SAMPLE:
            grad_loss = tl.load(grad_loss_ptr + batch_index.to(tl.int64) * gl_sb).to(tl.float32)
        else:
            gl_offsets = sample_offsets(batch_index, inner, gl_sb, gl_s0, gl_s1, gl_s2, gl_s3, size1, size2, size3,
                                        INNER_CONTIGUOUS)
            grad_loss = tl.load(grad_loss_ptr + gl_offsets, mask=mask, other=0.0).to(tl.float32)
        target, x0_coef = _loss_target(x0_ptr, noise_ptr, seed_ptr, table_ptr, timestep_ptr, timestep_value,
                                     timestep_stride, num_train_timesteps, batch_index, first, inner, mask,
                                     x_sb, x_s0, x_s1, x_s2, x_s3, z_sb, z_s0, z_s1, z_s2, z_s3, l_s0, l_s1, l_s2, l_s3,
                                     size1, size2, size3, PREDICTION, NOISE_MODE, TIMESTEP_IN_TENSOR, INNER_CONTIGUOUS,
                                     BLOCK)
        grad_mo = 2.0 * grad_scale * (model_output - target) * grad_loss
        if WRITE_GRAD_MO:
            gm_offsets = sample_offsets(batch_index, inner, gm_sb, gm_s0, gm_s1, gm_s2, gm_s3, size1, size2, size3,
                                        INNER_CONTIGUOUS)
            tl.store(grad_mo_ptr + gm_offsets, grad_mo.to(grad_mo_ptr.dtype.element_ty), mask=mask)
        if WRITE_GRAD_X0:
            gx_offsets = sample_offsets(batch_index, inner, gx_sb, gx_s0, gx_s1, gx_s2, gx_s3, size1, size2, size3,
                                        INNER_CONTIGUOUS)
            tl.store(grad_x0_ptr + gx_offsets, (-x0_coef * grad_mo).to(grad_x0_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
def _launch_q_sample(x0, noise, seed, table, timestep, timestep_value):
    out = torch.empty_like(x0)
    if out.numel() == 0:
        return out
    named = {"out": out, "x0": x0}
    if noise is not None:
        named["noise"] = noise
    walk = SampleWalk(named, ("out",), "tensor" if noise is not None else "drawn")
    tensors, layout = walk.tensors, walk.layout
    split = wave_split("q_sample", layout.inner_numel, layout.batch, x0.element_size(), x0.device)
    for start, count in batch_chunks(layout.batch):
        _q_sample_kernel[(split.programs, count)](
            tensors["out"], tensors["x0"], tensors.get("noise", tensors["x0"]),
            seed if seed is not None else table, table, timestep if timestep is not None else table,
            timestep_value, batch_stride(timestep), table.shape[1], start, layout.inner_numel,
            *layout.inner_sizes[1:],
            *walk.strides("out"), *walk.strides("x0"), *walk.strides("noise"), *walk.index_strides,
            NOISE_MODE=walk_noise_mode(walk), TIMESTEP_IN_TENSOR=timestep is not None,
            INNER_CONTIGUOUS=walk_is_contiguous(walk), BLOCK=split.tile, num_warps=split.num_warps,
        )
    return walk.output("out")


def _loss_shape(model_output: torch.Tensor, reduction: str) -> tuple[int, ...]:
    if reduction == "none":
        return tuple(model_output.shape)
    return (model_output.shape[0],) if reduction == "per_sample" else ()


def _launch_loss_forward(model_output, x0, noise, seed, table, timestep, timestep_value, prediction_type,
                         reduction, grad_dtype):
    elementwise = reduction == "none"
    write_grad = grad_dtype is not None and not elementwise
    batch, numel = model_output.shape[0], model_output.numel()
    inner_numel = numel // batch if batch else 0
    if elementwise:
        out = torch.empty_like(model_output)
    else:
        out = torch.empty_like(model_output, dtype=grad_dtype) if write_grad else model_output.new_empty(0)
    if numel == 0:
        if elementwise:
            return out, model_output.new_empty(0)
        empty_sums = torch.zeros(batch, dtype=torch.float32, device=model_output.device)
        return _reduce(empty_sums.view(batch, 1), reduction, numel, inner_numel, model_output), out
    named = {"out": out} if out.numel() else {}
    named.update(model_output=model_output, x0=x0)
    if noise is not None:
        named["noise"] = noise
    walk = SampleWalk(named, ("out",), "tensor" if noise is not None else "drawn")
    tensors, layout = walk.tensors, walk.layout
    split = wave_split("diffusion_loss", layout.inner_numel, batch, model_output.element_size(),
                       model_output.device)
    partials = torch.empty(1 if elementwise else batch * split.programs, dtype=torch.float32,
                           device=model_output.device)
    grad_scale = _grad_scale(reduction, numel, inner_numel)
    placeholder = tensors["model_output"]  # stands in for pointers a constexpr branch never reads
    for start, count in batch_chunks(batch):
        _diffusion_loss_fwd_kernel[(split.programs, count)](
            tensors.get("out", placeholder), partials, tensors["model_output"], tensors["x0"],
            tensors.get("noise", placeholder), seed if seed is not None else table, table,
            timestep if timestep is not None else table,
            timestep_value, batch_stride(timestep), table.shape[1], grad_scale,
            start, layout.inner_numel, split.programs, *layout.inner_sizes[1:],
            *walk.strides("out"), *walk.strides("model_output"), *walk.strides("x0"),
            *walk.strides("noise"), *walk.index_strides,
            PREDICTION=_PREDICTION_CODES[prediction_type], ELEMENTWISE=elementwise, WRITE_GRAD=write_grad,
            NOISE_MODE=walk_noise_mode(walk), TIMESTEP_IN_TENSOR=timestep is not None,
            INNER_CONTIGUOUS=walk_is_contiguous(walk), BLOCK=split.tile, num_warps=split.num_warps,
        )
    out = walk.output("out") if "out" in named else out
    if elementwise:
        return out, model_output.new_empty(0)
    return _reduce(partials.view(batch, split.programs), reduction, numel, inner_numel, model_output), out


def _reduce(partials: torch.Tensor, reduction: str, numel: int, inner_numel: int, model_output) -> torch.Tensor:
    """The loss from ``[batch, blocks]`` fp32 partial sums, added in a fixed order (deterministic). Means over no
    elements are NaN, as in ``F.mse_loss``."""
    if reduction == "per_sample":
        sums = partials.sum(dim=1)
        return sums / inner_numel if inner_numel else torch.full_like(sums, float("nan"))
    total = partials.sum()
    if reduction == "sum":
        return total
    return total / numel if numel else torch.full_like(total, float("nan"))


def _grad_scale(reduction: str, numel: int, inner_numel: int) -> float:
    """d(reduced loss) / d(squared error of one element): ``1/N`` for "mean", ``1/inner`` for "per_sample"."""
    return {"mean": 1.0 / max(numel, 1), "per_sample": 1.0 / max(inner_numel, 1)}.get(reduction, 1.0)


def _launch_loss_backward(grad_loss, model_output, x0, noise, seed, table, timestep, timestep_value,
                          prediction_type, reduction, need_grad_mo, need_grad_x0):
    write_grad_x0 = need_grad_x0 and prediction_type != "epsilon"
    grad_mo = torch.empty_like(model_output) if need_grad_mo else model_output.new_empty(0)
    grad_x0 = torch.empty_like(x0) if write_grad_x0 else x0.new_empty(0)
    if model_output.numel() == 0 or not (need_grad_mo or write_grad_x0):
        return grad_mo, grad_x0
    per_sample_grad = reduction != "none"  # grad_loss is the scalar ("mean", "sum") or [batch] ("per_sample")
    named = {}
    if need_grad_mo:
        named["grad_mo"] = grad_mo
    if write_grad_x0:
        named["grad_x0"] = grad_x0
    if not per_sample_grad:
        named["grad_loss"] = grad_loss
    named.update(model_output=model_output, x0=x0)
    if noise is not None:
        named["noise"] = noise
    walk = SampleWalk(named, ("grad_mo", "grad_x0"), "tensor" if noise is not None else "drawn")
    tensors, layout = walk.tensors, walk.layout
    if per_sample_grad:
        grad_loss_strides = (grad_loss.stride(0) if grad_loss.dim() == 1 and grad_loss.shape[0] > 1 else 0,
                             0, 0, 0, 0)
    else:
        grad_loss_strides = walk.strides("grad_loss")
    numel = model_output.numel()
    grad_scale = _grad_scale(reduction, numel, numel // model_output.shape[0])
    placeholder = tensors["model_output"]
    split = wave_split("diffusion_loss", layout.inner_numel, layout.batch, model_output.element_size(),
                       model_output.device)
    for start, count in batch_chunks(layout.batch):
        _diffusion_loss_bwd_kernel[(split.programs, count)](
            tensors.get("grad_mo", placeholder), tensors.get("grad_x0", placeholder),
            tensors.get("grad_loss", grad_loss), tensors["model_output"], tensors["x0"],
            tensors.get("noise", placeholder), seed if seed is not None else table, table,
            timestep if timestep is not None else table,
            timestep_value, batch_stride(timestep), table.shape[1], grad_scale, start, layout.inner_numel,
            *layout.inner_sizes[1:],
            *walk.strides("grad_mo"), *walk.strides("grad_x0"), *grad_loss_strides,
            *walk.strides("model_output"), *walk.strides("x0"), *walk.strides("noise"),
            *walk.index_strides,
            PREDICTION=_PREDICTION_CODES[prediction_type], WRITE_GRAD_MO=need_grad_mo, WRITE_GRAD_X0=write_grad_x0,
            GRAD_PER_SAMPLE=per_sample_grad, NOISE_MODE=walk_noise_mode(walk), TIMESTEP_IN_TENSOR=timestep is not None,
            INNER_CONTIGUOUS=walk_is_contiguous(walk), BLOCK=split.tile, num_warps=split.num_warps,
        )
    return (walk.output("grad_mo") if need_grad_mo else grad_mo,
            walk.output("grad_x0") if write_grad_x0 else grad_x0)


# ----------------------------------------------------------------------------------------------------------------
# torch.library registration (usable under torch.compile(fullgraph=True))
# ----------------------------------------------------------------------------------------------------------------
def _per_sample_coef(table: torch.Tensor, timestep: Optional[torch.Tensor], timestep_value: int, batch: int,
                     row: int) -> torch.Tensor:
    """``sqrt(table[row, t])`` per sample as ``[batch]`` fp32: row 0 gives ``sqrt(a_t)``, row 1 ``sqrt(1 - a_t)``."""
    if timestep is None:
        return table[row, timestep_value].sqrt().expand(batch)
    return table[row].index_select(0, timestep.reshape(-1).clamp(0, table.shape[1] - 1)).sqrt().expand(batch)


def _broadcast_over(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return coef.reshape((-1,) + (1,) * (like.dim() - 1))


@torch.library.custom_op("genkernels::q_sample", mutates_args=())
def _q_sample_op(x0: torch.Tensor, noise: Optional[torch.Tensor], seed: Optional[torch.Tensor], table: torch.Tensor,
                 timestep: Optional[torch.Tensor], timestep_value: int) -> torch.Tensor:
    return _launch_q_sample(x0, noise, seed, table, timestep, timestep_value)


@_q_sample_op.register_fake
def _q_sample_fake(x0, noise, seed, table, timestep, timestep_value):
    return torch.empty_like(x0)


def _q_sample_setup_context(ctx, inputs, output):
    x0, noise, seed, table, timestep, timestep_value = inputs
    ctx.save_for_backward(table, timestep)
    ctx.timestep_value = timestep_value
    ctx.x0_dtype = x0.dtype
    ctx.noise_dtype = noise.dtype if noise is not None else None


def _q_sample_backward(ctx, grad_out):
    """``d x_t / d x0 = sqrt(a_t)``, ``d x_t / d eps = sqrt(1 - a_t)``: a per-sample scale."""
    table, timestep = ctx.saved_tensors
    grads = []
    for row, dtype, needed in ((0, ctx.x0_dtype, ctx.needs_input_grad[0]), (1, ctx.noise_dtype,
                                                                             ctx.needs_input_grad[1])):
        if not needed:
            grads.append(None)
            continue
        coef = _per_sample_coef(table, timestep, ctx.timestep_value, grad_out.shape[0], row)
        grads.append((grad_out.to(torch.float32) * _broadcast_over(coef, grad_out)).to(dtype))
    return grads[0], grads[1], None, None, None, None


_q_sample_op.register_autograd(_q_sample_backward, setup_context=_q_sample_setup_context)


@torch.library.custom_op("genkernels::diffusion_loss", mutates_args=())
def _diffusion_loss_op(model_output: torch.Tensor, x0: torch.Tensor, noise: Optional[torch.Tensor],
                       seed: Optional[torch.Tensor], table: torch.Tensor, timestep: Optional[torch.Tensor],
                       timestep_value: int, prediction_type: str, reduction: str,
                       grad_dtype: Optional[torch.dtype]) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(loss, grad)``: ``grad`` is d(reduced loss)/d(model_output) in ``grad_dtype`` when that is given
    and the loss is reduced, else an empty tensor."""
    return _launch_loss_forward(model_output, x0, noise, seed, table, timestep, timestep_value, prediction_type,
                                reduction, grad_dtype)


@_diffusion_loss_op.register_fake
def _diffusion_loss_fake(model_output, x0, noise, seed, table, timestep, timestep_value, prediction_type,
                         reduction, grad_dtype):
    if reduction == "none":
        return torch.empty_like(model_output), model_output.new_empty(0)
    loss = model_output.new_empty(_loss_shape(model_output, reduction), dtype=torch.float32)
    grad = model_output.new_empty(0) if grad_dtype is None else torch.empty_like(model_output, dtype=grad_dtype)
    return loss, grad


@torch.library.custom_op("genkernels::diffusion_loss_backward", mutates_args=())
def _diffusion_loss_backward_op(grad_loss: torch.Tensor, model_output: torch.Tensor, x0: torch.Tensor,
                                noise: Optional[torch.Tensor], seed: Optional[torch.Tensor], table: torch.Tensor,
                                timestep: Optional[torch.Tensor], timestep_value: int, prediction_type: str,
                                reduction: str, need_grad_mo: bool,
                                need_grad_x0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the loss recomputed from the inputs, ``grad_loss`` being the upstream gradient of the
    ``reduction``'s output (elementwise, ``[batch]`` or a scalar); empty tensors where not needed."""
    return _launch_loss_backward(grad_loss, model_output, x0, noise, seed, table, timestep, timestep_value,
                                 prediction_type, reduction, need_grad_mo, need_grad_x0)


@_diffusion_loss_backward_op.register_fake
def _diffusion_loss_backward_fake(grad_loss, model_output, x0, noise, seed, table, timestep, timestep_value,
                                  prediction_type, reduction, need_grad_mo, need_grad_x0):
    grad_mo = torch.empty_like(model_output) if need_grad_mo else model_output.new_empty(0)
    write_grad_x0 = need_grad_x0 and prediction_type != "epsilon"
    return grad_mo, torch.empty_like(x0) if write_grad_x0 else x0.new_empty(0)


def _loss_setup_context(ctx, inputs, output):
    model_output, x0, noise, seed, table, timestep, timestep_value, prediction_type, reduction, grad_dtype = inputs
    ctx.timestep_value, ctx.prediction_type, ctx.reduction = timestep_value, prediction_type, reduction
    ctx.mo_dtype, ctx.x0_dtype = model_output.dtype, x0.dtype
    ctx.stored = reduction != "none" and grad_dtype is not None
    if ctx.stored:
        ctx.save_for_backward(output[1], table, timestep)
    else:
        # the epsilon target does not read x0: model_output stands in for it (never read) so x0 can be freed
        x0_read = model_output if prediction_type == "epsilon" else x0
        ctx.save_for_backward(model_output, x0_read, noise, seed, table, timestep)


def _loss_backward(ctx, grad_loss, _grad_of_stored_grad):
    need_mo, need_x0 = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_x0 = need_x0 and ctx.prediction_type != "epsilon"  # the epsilon target does not depend on x0
    if ctx.stored:
        grad_mo, grad_x0 = _scale_stored_gradient(ctx, grad_loss, need_mo, need_x0)
    else:
        grad_mo, grad_x0 = torch.ops.genkernels.diffusion_loss_backward(
            grad_loss, *ctx.saved_tensors, ctx.timestep_value, ctx.prediction_type, ctx.reduction, need_mo,
            need_x0)
    return (grad_mo if need_mo else None, grad_x0 if need_x0 else None) + (None,) * 8


def _scale_stored_gradient(ctx, grad_loss, need_mo, need_x0):
    """The chain rule on the gradient the forward stored: ``grad_mo = stored * grad_loss`` and
    ``grad_x0 = -(d target / d x0) * grad_mo``, with ``d target / d x0`` = 1 (sample) or ``-sqrt(1 - a_t)`` (v)."""
    stored, table, timestep = ctx.saved_tensors
    scale = grad_loss.to(torch.float32)
    if ctx.reduction == "per_sample":
        scale = _broadcast_over(scale, stored)
    grad_mo = (stored * scale).to(ctx.mo_dtype) if need_mo else None
    grad_x0 = None
    if need_x0:
        if ctx.prediction_type == "sample":
            x0_scale = -scale
        else:
            sqrt_beta = _per_sample_coef(table, timestep, ctx.timestep_value, stored.shape[0], 1)
            x0_scale = scale * _broadcast_over(sqrt_beta, stored)
        grad_x0 = (stored * x0_scale).to(ctx.x0_dtype)
    return grad_mo, grad_x0


_diffusion_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------------
def _check_schedule(schedule: object, op: str) -> None:
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"{op}: schedule must be a NoiseSchedule, got {type(schedule).__name__}")



def q_sample(x0: torch.Tensor, timestep, schedule: NoiseSchedule, *, noise: Optional[torch.Tensor] = None,
             generator: Optional[torch.Generator] = None, seed: Optional[torch.Tensor] = None,
             impl: str = "auto") -> torch.Tensor:
    """Noise a clean batch to timestep ``t`` by the forward process (diffusers' ``add_noise``; Ho et al. 2020,
    eq. 4):

        x_t = sqrt(a_t) * x0 + sqrt(1 - a_t) * eps,      a_t = schedule.alphas_cumprod[t], per sample

    Args:
        x0: clean samples ``[batch, ...]``, fp32/fp16/bf16 (fp64 runs the eager reference in fp64), any
            strides.
        timestep: a Python int or an integer tensor of shape ``[]`` or ``[batch]``.
        schedule: the :class:`NoiseSchedule`.
        noise: the standard normal ``eps`` (shape of ``x0``, any float dtype), read when given.
        generator: when ``noise`` and ``seed`` are None, the Philox key is drawn from it.
        seed: a one-element int64 tensor on ``x0``'s device (``draw_philox_seed``): ``eps`` is drawn from it
            inside the kernel. Pass the same seed to :func:`diffusion_loss` to regenerate the same ``eps`` there
            instead of storing it. Both impls draw the same noise for a seed (up to an ulp).
        impl: "auto", "triton" or "eager".

    Returns:
        ``x_t`` with ``x0``'s shape and dtype (math in fp32); differentiable in ``x0`` and ``noise``.
    """
    check_float_tensor(x0, "x0")
    check_min_rank(x0, "x0", 1, "[batch, ...]")
    if noise is not None:
        check_float_like(noise, "noise", x0, "x0")
    device = check_same_device([("x0", x0), ("noise", noise)])
    _check_schedule(schedule, "q_sample")
    check_generator(generator, device, "x0")
    if noise is not None and (seed is not None or generator is not None):
        raise ValueError("q_sample: pass noise, or seed, or generator, not several; got noise and "
                         + ("seed" if seed is not None else "generator"))
    if seed is not None:
        if generator is not None:
            raise ValueError("q_sample: pass seed or generator, not both (the seed already fixes the noise)")
        check_seed_tensor(seed, device)
    t = check_timesteps(timestep, "timestep", x0.shape[0], device, schedule.num_train_timesteps,
                        allow_negative=False)
    impl = choose_impl(impl, "q_sample", {"x0": x0, "noise": noise})
    if noise is None and seed is None:
        seed = draw_philox_seed(device, generator)
    if impl == "eager":
        if noise is None:
            noise = philox_normal(seed, x0.shape)
        return q_sample_reference(x0, t.as_tensor(x0.shape[0], device), schedule, noise)
    return torch.ops.genkernels.q_sample(x0, noise, None if noise is not None else seed,
                                         schedule.kernel_table(device), t.tensor, t.value or 0)


def diffusion_loss(model_output: torch.Tensor, x0: torch.Tensor, timestep, schedule: NoiseSchedule, *,
                   noise: Optional[torch.Tensor] = None, seed: Optional[torch.Tensor] = None,
                   prediction_type: str = "epsilon", reduction: str = "mean", impl: str = "auto") -> torch.Tensor:
    """The denoising training loss, fused: target, squared error, reduction and its gradient in one pass.

        target = eps                                   ("epsilon", Ho et al. 2020, eq. 14)
               = x0                                    ("sample")
               = sqrt(a_t) eps - sqrt(1 - a_t) x0      ("v_prediction", Salimans & Ho 2022)
        loss   = reduce((model_output - target)^2)

    For an fp32 ``model_output`` the gradient w.r.t. it (``2 (model_output - target) / N`` for "mean") is
    written in fp32 in the forward pass when it will be needed, so the backward only scales it by the incoming
    gradient; for fp16/bf16 outputs the backward recomputes it with the incoming gradient (a loss scaler's
    2**16) applied in fp32 before rounding, as accurate as plain PyTorch's. ``x0`` gets the gradient
    ``-(d target / d x0) * grad_model_output`` (``d target / d x0`` = 0, 1 or ``-sqrt(1 - a_t)``); ``noise``
    gets none.

    Args:
        model_output: the network's prediction ``[batch, ...]``, fp32/fp16/bf16 (fp64 runs the eager reference
            in fp64), any strides.
        x0: the clean samples, shape of ``model_output``, a float dtype (may differ from ``model_output``'s).
        timestep: the timesteps ``x_t`` was noised to: a Python int or an integer tensor ``[]`` / ``[batch]``.
        schedule: the :class:`NoiseSchedule`.
        noise: the ``eps`` that :func:`q_sample` used, read from memory; or
        seed: the seed :func:`q_sample` drew ``eps`` from, which is regenerated here instead of read.
            Exactly one of ``noise`` and ``seed``.
        prediction_type: "epsilon", "sample" or "v_prediction".
        reduction: "mean", "sum", "none" (elementwise) or "per_sample" (mean over each sample, ``[batch]``).
        impl: "auto", "triton" or "eager".

    Returns:
        fp32 scalar ("mean", "sum"), fp32 ``[batch]`` ("per_sample"), or the elementwise loss in
        ``model_output``'s dtype ("none"). Deterministic.
    """
    check_float_tensor(model_output, "model_output")
    check_float_tensor(x0, "x0")
    check_min_rank(model_output, "model_output", 1, "[batch, ...]")
    check_same_shape(model_output, "model_output", x0, "x0")
    if noise is not None:
        check_float_like(noise, "noise", model_output, "model_output")
    device = check_same_device([("model_output", model_output), ("x0", x0), ("noise", noise)])
    _check_schedule(schedule, "diffusion_loss")
    if (noise is None) == (seed is None):
        raise ValueError("diffusion_loss: pass exactly one of noise (the eps q_sample used) and seed (the seed "
                         "q_sample drew it from); got " + ("both" if noise is not None else "neither"))
    if seed is not None:
        check_seed_tensor(seed, device)
    check_choice(prediction_type, "prediction_type", PREDICTION_TYPES)
    check_choice(reduction, "reduction", REDUCTIONS)
    batch = model_output.shape[0]
    t = check_timesteps(timestep, "timestep", batch, device, schedule.num_train_timesteps, allow_negative=False)
    impl = choose_impl(impl, "diffusion_loss", {"model_output": model_output, "x0": x0, "noise": noise})
    if impl == "eager":
        if noise is None:
            noise = philox_normal(seed, model_output.shape)
        return diffusion_loss_reference(model_output, x0, t.as_tensor(batch, device), schedule, noise,
                                        prediction_type, reduction)
    loss, _ = torch.ops.genkernels.diffusion_loss(model_output, x0, noise, seed, schedule.kernel_table(device),
                                                  t.tensor, t.value or 0, prediction_type, reduction,
                                                  _stored_gradient_dtype(model_output, x0, prediction_type, reduction))
    return loss


def _stored_gradient_dtype(model_output, x0, prediction_type, reduction) -> Optional[torch.dtype]:
    """The dtype the forward stores d(loss)/d(model_output) in, or None for no stored gradient.

    None when no gradient will be asked for, when the loss is elementwise, and when ``model_output`` is 16-bit:
    the backward then recomputes the gradient from the inputs (``diffusion_loss_backward``), scaled by the
    upstream gradient in fp32 before the one rounding to the output's dtype, as plain PyTorch's autograd does.
    Stored in fp16 before that scale, ``2 (model_output - target) / N`` is ~1e-6 for a training batch: fp16
    subnormals there have a spacing of 6e-8, so a GradScaler's 2**16 multiplied percent-level errors and
    zeros. An fp32 buffer would keep the digits but write 4 bytes per element in the forward and read them back
    in the backward, on top of the 2-byte gradient write; recomputing reads the 2-byte inputs again instead (a
    seeded noise is regenerated, not read), less memory traffic in all but the case of an fp32 noise tensor, and
    the saved 16-bit model_output (with x0 for the "sample" and "v" targets) takes about the memory a 16-bit
    gradient buffer would. fp32 outputs keep the stored fp32
    gradient (the fused-loss trick): exact, and the backward is one scale."""
    if reduction == "none" or not torch.is_grad_enabled():
        return None
    x0_grad = x0.requires_grad and prediction_type != "epsilon"
    if not (model_output.requires_grad or x0_grad) or model_output.dtype != torch.float32:
        return None
    return torch.float32
