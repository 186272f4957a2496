"""Fused VAE reparameterization with its KL term: ``z = mu + exp(logvar / 2) * eps`` and the per-sample KL
divergence ``KL(N(mu, exp(logvar)) || N(0, I))`` in one pass over ``mu`` and ``logvar``.

One Triton program handles a run of elements of one sample: it reads ``mu`` and ``logvar`` once, reads the noise
or draws it (Philox, keyed by a seed that lives on the device), writes ``z`` once and one fp32 partial KL sum for
its run. The few partials of a sample are summed afterwards (no atomics, so the result is deterministic). The
backward regenerates in-kernel noise from the same seed instead of storing it.

Numerics: every per-element KL term ``(mu^2 + exp(logvar) - 1 - logvar) / 2`` is non-negative, so the sum has no
cancellation. It is evaluated as ``(mu / sqrt 2)^2 + exp(logvar - ln 2) - (1 + logvar) / 2``, with a Taylor series
for ``exp(l) - 1 - l`` when ``|l| < 1/2``, so it stays finite wherever the exact value fits in fp32 and keeps its
relative accuracy near ``logvar = 0``. Products ``exp(v) * c`` (the noise term of ``z``, the gradient terms) are
formed as ``sign(c) exp(v + log|c|)`` once ``exp(v)`` alone could overflow fp32 although the product does not.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .checks import (
    check_float_like,
    check_float_tensor,
    check_generator,
    check_min_rank,
    check_same_device,
)
from .launch import SampleWalk, batch_chunks, draw_philox_seed, walk_is_contiguous, walk_noise_mode, wave_split
from .runtime import choose_impl, compute_dtype
from .triton_helpers import sample_offsets, span_of_program, tile_of_span, walk_noise

LN2 = math.log(2.0)
SQRT_HALF = math.sqrt(0.5)
# exp(v) overflows fp32 above ~88.7; from this v on, exp(v) * c is formed as sign(c) * exp(v + log|c|).
EXP_PRODUCT_IN_LOG_ABOVE = 64.0
# Below this |logvar| the KL term exp(l) - 1 - l is summed as its Taylor series (exp would cancel).
SERIES_BELOW = 0.5
# Above this logvar the KL term exp(l) - 1 - l is exp(l) to the last digit of fp64 (1 + l < 1e-26 exp(l)).
EXP_ONLY_ABOVE = 64.0


# ----------------------------------------------------------------------------------------------------------------
# Eager reference: the specification, the fallback and the test oracle
# ----------------------------------------------------------------------------------------------------------------
def _kl_terms(m: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """``mu^2 / 2 + (exp(l) - 1 - l) / 2`` per element. In fp32, as the kernel computes it: ``(mu / sqrt 2)^2``
    and ``exp(l - ln 2)`` (finite while the term is), and below ``|l| = 1/2`` the Taylor series
    ``sum_{k>=2} l^k / k!`` (to ``k = 9``, relative error < 1e-7) where ``exp(l) - 1 - l`` would cancel. In fp64
    (the test oracle) ``expm1(l) - l``."""
    half_mu = m * SQRT_HALF
    # above EXP_ONLY_ABOVE, 1 + l is below the last digit of exp(l) (fp32 and fp64): the term is exp(l) / 2, and
    # stays +inf at l = +inf (the KL of an infinite variance) where exp(l) - 1 - l would be inf - inf = NaN
    exp_only = torch.exp(l - LN2)
    if l.dtype == torch.float64:
        return half_mu * half_mu + torch.where(l > EXP_ONLY_ABOVE, exp_only, 0.5 * (torch.expm1(l) - l))
    series = torch.zeros_like(l)
    for k in range(9, 1, -1):
        series = (series + 1.0 / math.factorial(k)) * l
    series = series * l
    direct = torch.where(l > EXP_ONLY_ABOVE, exp_only, exp_only - 0.5 - 0.5 * l)
    return half_mu * half_mu + torch.where(l.abs() < SERIES_BELOW, 0.5 * series, direct)


def _exp_times(v: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``exp(v) * c``, finite whenever the product is (``exp`` alone overflows fp32 past 88.7)."""
    big = v > EXP_PRODUCT_IN_LOG_ABOVE
    # each branch only sees arguments it is finite for, so autograd through the unused one gives 0, not NaN
    direct = torch.exp(torch.clamp(v, max=EXP_PRODUCT_IN_LOG_ABOVE)) * c
    in_log = torch.sign(c) * torch.exp(torch.where(big, v, 0.0) + torch.log(c.abs()))
    return torch.where(big, in_log, direct)


def reparameterize_kl_reference(mu: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor):
    """Reparameterization trick and Gaussian KL (Kingma & Welling 2014, eq. 10 and appendix B), plain PyTorch.

        z      = mu + exp(logvar / 2) * eps
        kl[b]  = -1/2 * sum_{i}(1 + logvar[b, i] - mu[b, i]^2 - exp(logvar[b, i]))
               = sum_i (mu^2 / 2 + (exp(logvar) - 1 - logvar) / 2)           (each term >= 0)

    the sum running over every non-batch dimension. Computes in fp32 (fp64 for fp64 inputs); returns ``z`` in
    ``mu``'s dtype and ``kl`` ``[batch]`` in fp32 (fp64 for fp64 inputs). Differentiable by autograd.
    """
    dtype = compute_dtype(mu.dtype)
    m, l, eps = mu.to(dtype), logvar.to(dtype), noise.to(dtype)
    z = m + _exp_times(0.5 * l, eps)
    terms = _kl_terms(m, l)
    return z.to(mu.dtype), terms.reshape(mu.shape[0], math.prod(mu.shape[1:])).sum(dim=1)


def reparameterize_kl_backward_reference(mu: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor,
                                         grad_z: Optional[torch.Tensor], grad_kl: Optional[torch.Tensor]):
    """The gradients the kernels compute, in closed form:

        dL/dmu     = grad_z + grad_kl[b] * mu
        dL/dlogvar = grad_z * exp(logvar / 2) * eps / 2 + grad_kl[b] * (exp(logvar) - 1) / 2

    A gradient that is None (that output unused) drops its terms, as autograd does: they are not multiplied by a
    zero gradient, which would turn an infinite ``eps`` or ``mu`` into NaN.
    """
    dtype = compute_dtype(mu.dtype)
    m, l = mu.to(dtype), logvar.to(dtype)
    grad_mu = torch.zeros_like(m)
    grad_logvar = torch.zeros_like(l)
    if grad_z is not None:
        gz = grad_z.to(dtype)
        grad_mu = grad_mu + gz
        grad_logvar = grad_logvar + 0.5 * _exp_times(0.5 * l, gz * noise.to(dtype))
    if grad_kl is not None:
        gkl = grad_kl.to(dtype).reshape((-1,) + (1,) * (mu.dim() - 1))
        grad_mu = grad_mu + gkl * m
        grad_logvar = grad_logvar + _exp_times(l - LN2, gkl) - 0.5 * gkl
    return grad_mu.to(mu.dtype), grad_logvar.to(logvar.dtype)


class _EagerReparameterizeKL(torch.autograd.Function):
    """The eager path: the reference forward with the closed-form backward, whose ``exp`` products stay finite
    where autograd's ``exp(logvar) * grad`` would overflow fp32."""

    @staticmethod
    def forward(ctx, mu, logvar, noise):
        ctx.save_for_backward(mu, logvar, noise)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: its terms are dropped
        return reparameterize_kl_reference(mu, logvar, noise)

    @staticmethod
    def backward(ctx, grad_z, grad_kl):
        mu, logvar, noise = ctx.saved_tensors
        return reparameterize_kl_backward_reference(mu, logvar, noise, grad_z, grad_kl) + (None,)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _exp_times_block(v, c):
    """``exp(v) * c`` in fp32, finite whenever the product is (see ``_exp_times``)."""
    # NaN v must stay NaN (tl.minimum returns the non-NaN operand by default)
    direct = tl.exp(tl.minimum(v, 64.0, propagate_nan=tl.PropagateNan.ALL)) * c
    in_log = tl.exp(v + tl.log(tl.abs(c)))
    return tl.where(v > 64.0, tl.where(c < 0, -in_log, in_log), direct)


@triton.jit
def _kl_terms_block(mu, logvar):
    """``mu^2 / 2 + (exp(logvar) - 1 - logvar) / 2`` in fp32 (see ``_kl_terms``)."""
    series = tl.zeros_like(logvar)
    series = (series + 1.0 / 362880.0) * logvar
    series = (series + 1.0 / 40320.0) * logvar
    series = (series + 1.0 / 5040.0) * logvar
    series = (series + 1.0 / 720.0) * logvar
    series = (series + 1.0 / 120.0) * logvar
    series = (series + 1.0 / 24.0) * logvar
    series = (series + 1.0 / 6.0) * logvar
    series = (series + 0.5) * logvar * logvar
    exp_only = tl.exp(logvar - 0.6931471805599453)
    # exp(l) / 2 alone above EXP_ONLY_ABOVE: +inf at l = +inf, not inf - inf
    direct = tl.where(logvar > 64.0, exp_only, exp_only - 0.5 - 0.5 * logvar)
    half_mu = mu * 0.7071067811865476
    return half_mu * half_mu + tl.where(tl.abs(logvar) < 0.5, 0.5 * series, direct)


@triton.jit
def _reparameterize_kl_fwd_kernel(
    z_ptr, partial_ptr, mu_ptr, logvar_ptr, noise_ptr, seed_ptr,
    batch_start, inner_numel, num_blocks, size1, size2, size3,
    out_sb, out_s0, out_s1, out_s2, out_s3,
    mu_sb, mu_s0, mu_s1, mu_s2, mu_s3,
    lv_sb, lv_s0, lv_s1, lv_s2, lv_s3,
    z_sb, z_s0, z_s1, z_s2, z_s3,
    index_s0, index_s1, index_s2, index_s3,
    NOISE_MODE: tl.constexpr, INNER_CONTIGUOUS: tl.constexpr, BLOCK: tl.constexpr,
):
    batch_index = batch_start + tl.program_id(1)
    lo, hi, steps = span_of_program(inner_numel, BLOCK)
    terms = tl.zeros((BLOCK,), tl.float32)
    for step in range(steps):
        first, inner, mask = tile_of_span(lo, hi, step, BLOCK)
        mu_offsets = sample_offsets(batch_index, inner, mu_sb, mu_s0, mu_s1, mu_s2, mu_s3, size1, size2, size3,
                                    INNER_CONTIGUOUS)
        lv_offsets = sample_offsets(batch_index, inner, lv_sb, lv_s0, lv_s1, lv_s2, lv_s3, size1, size2, size3,
                                    INNER_CONTIGUOUS)
        mu = tl.load(mu_ptr + mu_offsets, mask=mask, other=0.0).to(tl.float32)
        logvar = tl.load(logvar_ptr + lv_offsets, mask=mask, other=0.0).to(tl.float32)
        eps = walk_noise(noise_ptr, seed_ptr, batch_index, first, inner, mask, z_sb, z_s0, z_s1, z_s2, z_s3,
                           index_s0, index_s1, index_s2, index_s3, size1, size2, size3, NOISE_MODE, INNER_CONTIGUOUS,
                           BLOCK)
        z = mu + _exp_times_block(0.5 * logvar, eps)
        out_offsets = sample_offsets(batch_index, inner, out_sb, out_s0, out_s1, out_s2, out_s3, size1, size2, size3,
                                     INNER_CONTIGUOUS)
        tl.store(z_ptr + out_offsets, z.to(z_ptr.dtype.element_ty), mask=mask)
        # masked lanes load mu = logvar = 0, whose KL term is exactly 0
        terms += _kl_terms_block(mu, logvar)
    tl.store(partial_ptr + batch_index.to(tl.int64) * num_blocks + tl.program_id(0), tl.sum(terms, axis=0))


@triton.jit
def _reparameterize_kl_bwd_kernel(
    grad_mu_ptr, grad_logvar_ptr, mu_ptr, logvar_ptr, noise_ptr, seed_ptr, grad_z_ptr, grad_kl_ptr,
    batch_start, inner_numel, grad_kl_stride, size1, size2, size3,
    gm_sb, gm_s0, gm_s1, gm_s2, gm_s3,
    gl_sb, gl_s0, gl_s1, gl_s2, gl_s3,
    mu_sb, mu_s0, mu_s1, mu_s2, mu_s3,
    lv_sb, lv_s0, lv_s1, lv_s2, lv_s3,
    z_sb, z_s0, z_s1, z_s2, z_s3,
    gz_sb, gz_s0, gz_s1, gz_s2, gz_s3,
    index_s0, index_s1, index_s2, index_s3,
    NOISE_MODE: tl.constexpr, HAS_GRAD_Z: tl.constexpr, HAS_GRAD_KL: tl.constexpr,
    INNER_CONTIGUOUS: tl.constexpr, BLOCK: tl.constexpr,
):
    batch_index = batch_start + tl.program_id(1)
    lo, hi, steps = span_of_program(inner_numel, BLOCK)
    for step in range(steps):
        first, inner, mask = tile_of_span(lo, hi, step, BLOCK)
        lv_offsets = sample_offsets(batch_index, inner, lv_sb, lv_s0, lv_s1, lv_s2, lv_s3, size1, size2, size3,
                                    INNER_CONTIGUOUS)
        logvar = tl.load(logvar_ptr + lv_offsets, mask=mask, other=0.0).to(tl.float32)
        grad_mu = tl.zeros((BLOCK,), tl.float32)
        grad_logvar = tl.zeros((BLOCK,), tl.float32)
        if HAS_GRAD_Z:
            gz_offsets = sample_offsets(batch_index, inner, gz_sb, gz_s0, gz_s1, gz_s2, gz_s3, size1, size2, size3,
                                        INNER_CONTIGUOUS)
            grad_z = tl.load(grad_z_ptr + gz_offsets, mask=mask, other=0.0).to(tl.float32)
            eps = walk_noise(noise_ptr, seed_ptr, batch_index, first, inner, mask, z_sb, z_s0, z_s1, z_s2, z_s3,
                               index_s0, index_s1, index_s2, index_s3, size1, size2, size3, NOISE_MODE,
                               INNER_CONTIGUOUS, BLOCK)
            grad_mu += grad_z
            grad_logvar += 0.5 * _exp_times_block(0.5 * logvar, grad_z * eps)
        if HAS_GRAD_KL:
            mu_offsets = sample_offsets(batch_index, inner, mu_sb, mu_s0, mu_s1, mu_s2, mu_s3, size1, size2, size3,
                                        INNER_CONTIGUOUS)
            mu = tl.load(mu_ptr + mu_offsets, mask=mask, other=0.0).to(tl.float32)
            grad_kl = tl.load(grad_kl_ptr + batch_index.to(tl.int64) * grad_kl_stride).to(tl.float32)
            grad_mu += grad_kl * mu
            grad_logvar += _exp_times_block(logvar - 0.6931471805599453, grad_kl) - 0.5 * grad_kl
        gm_offsets = sample_offsets(batch_index, inner, gm_sb, gm_s0, gm_s1, gm_s2, gm_s3, size1, size2, size3,
                                    INNER_CONTIGUOUS)
        gl_offsets = sample_offsets(batch_index, inner, gl_sb, gl_s0, gl_s1, gl_s2, gl_s3, size1, size2, size3,
                                    INNER_CONTIGUOUS)
        tl.store(grad_mu_ptr + gm_offsets, grad_mu.to(grad_mu_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_logvar_ptr + gl_offsets, grad_logvar.to(grad_logvar_ptr.dtype.element_ty), mask=mask)


def _noise_source(noise: Optional[torch.Tensor]) -> str:
    return "tensor" if noise is not None else "drawn"


def _launch_forward(mu, logvar, noise, seed):
    z = torch.empty_like(mu)
    batch = mu.shape[0]
    if mu.numel() == 0:
        return z, torch.zeros(batch, dtype=torch.float32, device=mu.device)
    walk = SampleWalk({"z": z, "mu": mu, "logvar": logvar, "noise": noise}, ("z",), _noise_source(noise))
    tensors = walk.tensors
    # one fp32 partial KL sum per (sample, block); with one block per sample they are the result itself
    split = wave_split("reparameterize_kl", walk.layout.inner_numel, batch, mu.element_size(), mu.device)
    partials = torch.empty(batch * split.programs, dtype=torch.float32, device=mu.device)
    for start, count in batch_chunks(batch):
        _reparameterize_kl_fwd_kernel[(split.programs, count)](
            tensors["z"], partials, tensors["mu"], tensors["logvar"], walk.tensor("noise", tensors["mu"]),
            seed if seed is not None else partials,
            start, walk.layout.inner_numel, split.programs, *walk.layout.inner_sizes[1:],
            *walk.strides("z"), *walk.strides("mu"), *walk.strides("logvar"), *walk.strides("noise"),
            *walk.index_strides,
            NOISE_MODE=walk_noise_mode(walk), INNER_CONTIGUOUS=walk_is_contiguous(walk),
            BLOCK=split.tile, num_warps=split.num_warps,
        )
    kl = partials if split.programs == 1 else partials.view(batch, split.programs).sum(dim=1)
    return walk.output("z"), kl


def _launch_backward(mu, logvar, noise, seed, grad_z, grad_kl):
    grad_mu = torch.empty_like(mu)
    grad_logvar = torch.empty_like(logvar)
    if mu.numel() == 0:
        return grad_mu, grad_logvar
    walk = SampleWalk({"grad_mu": grad_mu, "grad_logvar": grad_logvar, "mu": mu, "logvar": logvar, "noise": noise,
                       "grad_z": grad_z}, ("grad_mu", "grad_logvar"), _noise_source(noise))
    tensors = walk.tensors
    placeholder = mu  # stands in for pointers a constexpr branch never reads
    split = wave_split("reparameterize_kl", walk.layout.inner_numel, walk.layout.batch, mu.element_size(),
                       mu.device)
    for start, count in batch_chunks(walk.layout.batch):
        _reparameterize_kl_bwd_kernel[(split.programs, count)](
            tensors["grad_mu"], tensors["grad_logvar"], tensors["mu"], tensors["logvar"],
            walk.tensor("noise", placeholder), seed if seed is not None else placeholder,
            walk.tensor("grad_z", placeholder), grad_kl if grad_kl is not None else placeholder,
            start, walk.layout.inner_numel, grad_kl.stride(0) if grad_kl is not None else 0,
            *walk.layout.inner_sizes[1:],
            *walk.strides("grad_mu"), *walk.strides("grad_logvar"), *walk.strides("mu"), *walk.strides("logvar"),
            *walk.strides("noise"), *walk.strides("grad_z"), *walk.index_strides,
            NOISE_MODE=walk_noise_mode(walk), HAS_GRAD_Z=grad_z is not None, HAS_GRAD_KL=grad_kl is not None,
            INNER_CONTIGUOUS=walk_is_contiguous(walk), BLOCK=split.tile, num_warps=split.num_warps,
        )
    return walk.output("grad_mu"), walk.output("grad_logvar")


# ----------------------------------------------------------------------------------------------------------------
# torch.library registration (usable under torch.compile(fullgraph=True))
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("genkernels::reparameterize_kl", mutates_args=())
def _reparameterize_kl_op(mu: torch.Tensor, logvar: torch.Tensor, noise: Optional[torch.Tensor],
                          seed: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_forward(mu, logvar, noise, seed)


@_reparameterize_kl_op.register_fake
def _reparameterize_kl_fake(mu, logvar, noise, seed):
    return torch.empty_like(mu), mu.new_empty((mu.shape[0],), dtype=torch.float32)


@torch.library.custom_op("genkernels::reparameterize_kl_backward", mutates_args=())
def _reparameterize_kl_backward_op(mu: torch.Tensor, logvar: torch.Tensor, noise: Optional[torch.Tensor],
                                   seed: Optional[torch.Tensor], grad_z: Optional[torch.Tensor],
                                   grad_kl: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_backward(mu, logvar, noise, seed, grad_z, grad_kl)


@_reparameterize_kl_backward_op.register_fake
def _reparameterize_kl_backward_fake(mu, logvar, noise, seed, grad_z, grad_kl):
    return torch.empty_like(mu), torch.empty_like(logvar)


def _setup_context(ctx, inputs, output):
    mu, logvar, noise, seed = inputs
    ctx.save_for_backward(mu, logvar, noise, seed)
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None: the kernel drops its terms


def _backward(ctx, grad_z, grad_kl):
    mu, logvar, noise, seed = ctx.saved_tensors
    grad_mu, grad_logvar = torch.ops.genkernels.reparameterize_kl_backward(mu, logvar, noise, seed, grad_z,
                                                                           grad_kl)
    return grad_mu, grad_logvar, None, None


_reparameterize_kl_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------
def _check_inputs(mu, logvar, noise, generator) -> torch.device:
    check_float_tensor(mu, "mu")
    check_min_rank(mu, "mu", 1, "[batch, ...]")
    check_float_like(logvar, "logvar", mu, "mu", same_dtype=True)
    if noise is not None:
        check_float_like(noise, "noise", mu, "mu")
    device = check_same_device([("mu", mu), ("logvar", logvar), ("noise", noise)])
    check_generator(generator, device, "mu")
    return device


def reparameterize_kl(mu: torch.Tensor, logvar: torch.Tensor, *, noise: Optional[torch.Tensor] = None,
                      generator: Optional[torch.Generator] = None, impl: str = "auto"):
    """Sample a diagonal Gaussian posterior by reparameterization and return its KL to ``N(0, I)``, fused.

        z     = mu + exp(logvar / 2) * eps,                  eps ~ N(0, I)
        kl[b] = -1/2 * sum_i (1 + logvar - mu^2 - exp(logvar))     over every non-batch dimension

    (Kingma & Welling 2014, eq. 10.) Differentiable in ``mu`` and ``logvar`` through both outputs; ``noise`` is
    treated as a constant. When ``noise`` is None it is drawn from ``generator``: inside the kernel by Philox
    (keyed by a seed and each element's row-major index; regenerated in the backward, never stored; the stream
    :func:`~genkernels.kernels.philox_normal` reproduces) for ``impl="triton"``, by ``torch.randn`` for ``"eager"``
    (what a plain PyTorch VAE does), so the two impls draw different noise.

    Args:
        mu, logvar: ``[batch, ...]`` posterior means and log-variances, same shape and dtype (fp32/fp16/bf16 for
            the kernels; fp64 runs the reference in fp64), any strides and sizes (an empty sample's KL is 0).
        noise: the standard normal ``eps`` to use, shape of ``mu``, any float dtype; None to draw it.
        generator: the ``torch.Generator`` the noise (or its Philox key) is drawn from.
        impl: "auto", "triton" or "eager".

    Returns:
        ``(z, kl)``: ``z`` in ``mu``'s dtype and layout, ``kl`` of shape ``[batch]`` in fp32 (fp64 for fp64 inputs).

    NaN in ``mu``, ``logvar`` or ``noise`` gives NaN in ``z`` and ``kl`` (and their gradients) where plain PyTorch
    does; ``kl`` is ``+inf`` for ``logvar = +-inf`` or ``mu = +-inf`` (an infinite KL), and ``z`` follows
    ``mu + exp(logvar / 2) * eps`` (``inf * 0 = NaN``).
    """
    device = _check_inputs(mu, logvar, noise, generator)
    impl = choose_impl(impl, "reparameterize_kl", {"mu": mu, "logvar": logvar, "noise": noise})
    if impl == "eager":
        if noise is None:
            noise = torch.randn(mu.shape, generator=generator, device=device, dtype=compute_dtype(mu.dtype))
        return _EagerReparameterizeKL.apply(mu, logvar, noise)
    seed = draw_philox_seed(device, generator) if noise is None else None
    return torch.ops.genkernels.reparameterize_kl(mu, logvar, noise, seed)
