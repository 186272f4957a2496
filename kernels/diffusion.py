"""Fused diffusion denoise step: the DDPM and DDIM reverse-process updates in one pass.

One Triton program handles a run of elements of one sample. It gathers that sample's schedule coefficients on
the device from its timestep (no host synchronization: a sampling loop can be captured in a CUDA graph), reads
``sample`` and ``model_output`` once, draws or reads the noise, and writes the previous sample once. A second
kernel computes the step's gradient (registered with ``register_autograd``).

Both launchers pass every kernel argument by keyword, from dicts built per named tensor of the walk: ``{name}_ptr``
and ``{name}_strides``, a ``(batch, 4 inner)`` tuple (Triton specializes each tuple element as it would a separate
argument), so a stride cannot land in another tensor's slot unnoticed.

Notation (diffusers' names): ``alpha_prod_t`` = alpha-bar_t, the cumulative product of ``1 - beta``;
``beta_prod_t = 1 - alpha_prod_t``; ``x0`` is the predicted original sample; ``eps`` the predicted noise.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from .checks import (
    check_bool,
    check_choice,
    check_float_like,
    check_float_tensor,
    check_generator,
    check_in_range,
    check_int,
    check_integer_tensor,
    check_min_rank,
    check_real,
    check_same_device,
    check_tensor,
    check_values,
    describe,
)
from .launch import SampleWalk, batch_chunks, draw_philox_seed, walk_is_contiguous, walk_noise_mode, wave_split
from .runtime import choose_impl, compute_dtype
from .triton_helpers import sample_offsets, span_of_program, tile_of_span, walk_noise

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_large")
# diffusers clamps the DDPM posterior variance from below before its square root.
MIN_VARIANCE = 1e-20


# ----------------------------------------------------------------------------------------------------------------
# Noise schedules
# ----------------------------------------------------------------------------------------------------------------
class NoiseSchedule:
    """A discrete forward-process noise schedule ``beta_1..beta_T`` (Ho et al. 2020) and its cumulative products.

    ``alphas_cumprod[t] = prod_{s<=t} (1 - betas[s])``. Tables are kept in float64; the kernels read float32
    copies of ``alphas_cumprod`` and ``1 - alphas_cumprod`` (both rounded from float64, so ``1 - alpha_prod`` near
    ``t = 0`` keeps its digits), made once per device and cached.
    """

    def __init__(self, betas: torch.Tensor):
        betas = check_tensor(betas, "betas")
        if betas.dim() != 1 or betas.numel() == 0:
            raise ValueError(f"betas must be a non-empty 1-D tensor; got {describe(betas)}")
        if not betas.is_floating_point():
            raise TypeError(f"betas must be a floating-point tensor; got {describe(betas)}")
        betas = betas.detach().to(torch.float64)
        # a host check on the CPU, an asynchronous device assert on a GPU, nothing for meta tensors (no values)
        check_values(betas, "betas", (betas > 0) & (betas <= 1), "lie in (0, 1]")
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self._kernel_tables: dict[torch.device, torch.Tensor] = {}

    @property
    def num_train_timesteps(self) -> int:
        return self.betas.numel()

    @property
    def device(self) -> torch.device:
        return self.betas.device

    @classmethod
    def linear(cls, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        """Betas evenly spaced from ``beta_start`` to ``beta_end`` (DDPM; diffusers' ``"linear"``)."""
        num = _check_num_timesteps(num_train_timesteps)
        beta_start, beta_end = _check_beta(beta_start, "beta_start"), _check_beta(beta_end, "beta_end")
        return cls(torch.linspace(beta_start, beta_end, num, dtype=torch.float64))

    @classmethod
    def scaled_linear(cls, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012):
        """Square roots of the betas evenly spaced (latent diffusion; diffusers' ``"scaled_linear"``)."""
        num = _check_num_timesteps(num_train_timesteps)
        beta_start, beta_end = _check_beta(beta_start, "beta_start"), _check_beta(beta_end, "beta_end")
        return cls(torch.linspace(beta_start**0.5, beta_end**0.5, num, dtype=torch.float64) ** 2)

    @classmethod
    def cosine(cls, num_train_timesteps: int = 1000, max_beta: float = 0.999):
        """The cosine schedule of Nichol & Dhariwal 2021 (diffusers' ``"squaredcos_cap_v2"``):
        ``alpha_bar(s) = cos((s + 0.008) / 1.008 * pi / 2)^2`` and
        ``beta_i = min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta)``."""
        num = _check_num_timesteps(num_train_timesteps)
        max_beta = _check_beta(max_beta, "max_beta")

        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / num) / alpha_bar(i / num), max_beta) for i in range(num)]
        return cls(torch.tensor(betas, dtype=torch.float64))

    def to(self, device) -> "NoiseSchedule":
        """The same schedule with its tables on ``device``."""
        return NoiseSchedule(self.betas.to(device))

    def kernel_table(self, device: torch.device) -> torch.Tensor:
        """``[2, T]`` float32 on ``device``: row 0 ``alphas_cumprod``, row 1 ``1 - alphas_cumprod``; cached."""
        table = self._kernel_tables.get(device)
        if table is None:
            table = torch.stack([self.alphas_cumprod, self.one_minus_alphas_cumprod]).to(device, torch.float32)
            self._kernel_tables[device] = table
        return table

    def __repr__(self) -> str:
        return f"NoiseSchedule(num_train_timesteps={self.num_train_timesteps}, device={self.device})"


def _check_num_timesteps(value: object) -> int:
    num = check_int(value, "num_train_timesteps")
    if num < 1:
        raise ValueError(f"num_train_timesteps must be >= 1; got {num}")
    return num


def _check_beta(value: object, name: str) -> float:
    """A beta of a schedule factory: a real number in (0, 1]."""
    return check_real(value, name, low=0.0, high=1.0, low_inclusive=False)


# ----------------------------------------------------------------------------------------------------------------
# Eager reference: the specification, the fallback and the test oracle
# ----------------------------------------------------------------------------------------------------------------
def schedule_terms(schedule: NoiseSchedule, sample: torch.Tensor, timestep: torch.Tensor,
                   prev_timestep: torch.Tensor, final_alpha_is_one: bool):
    """``alpha_prod_t, alpha_prod_t_prev, beta_prod_t, beta_prod_t_prev`` per sample, in ``sample``'s compute
    dtype, shaped to broadcast over it. A negative ``prev_timestep`` is the final step: ``alpha_prod_t_prev`` is 1,
    or ``alphas_cumprod[0]`` when ``final_alpha_is_one`` is False. ``beta_prod`` is read from the schedule's own
    ``1 - alphas_cumprod`` table rather than recomputed, which would cancel near ``t = 0``."""
    if compute_dtype(sample.dtype) == torch.float64:
        table = torch.stack([schedule.alphas_cumprod, schedule.one_minus_alphas_cumprod]).to(sample.device)
    else:
        table = schedule.kernel_table(sample.device)
    view = (-1,) + (1,) * (sample.dim() - 1)
    t = timestep.long().reshape(-1)
    prev = prev_timestep.long().reshape(-1)
    is_final = prev < 0
    prev_index = prev.clamp(min=0)
    final_alpha, final_beta = (table.new_ones(()), table.new_zeros(())) if final_alpha_is_one else table[:, 0]
    alpha_prod_t = table[0, t]
    beta_prod_t = table[1, t]
    alpha_prod_t_prev = torch.where(is_final, final_alpha, table[0, prev_index])
    beta_prod_t_prev = torch.where(is_final, final_beta, table[1, prev_index])
    return tuple(term.reshape(view) for term in (alpha_prod_t, alpha_prod_t_prev, beta_prod_t, beta_prod_t_prev))




def _term(coefficient: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``coefficient * value``, and exactly 0 where the coefficient is 0: a term the math does not have at this
    step (the final step's ``x_t`` or ``eps`` term, DDIM's noise where ``sigma = 0``) is left out, so +-Inf there
    gives what the math gives rather than ``0 * Inf = NaN``."""
    return torch.where(coefficient == 0, 0.0, coefficient * value)


def _current_beta(alpha_prod_t, alpha_prod_t_prev, beta_prod_t, beta_prod_t_prev):
    """``1 - a_t / a_prev``, the beta of the (possibly multi-step) transition prev -> t, without cancellation:
    while ``a_prev`` is large the ``1 - a`` terms carry the digits, once it is small the ratio does."""
    return torch.where(alpha_prod_t_prev > 0.5, (beta_prod_t - beta_prod_t_prev) / alpha_prod_t_prev,
                       1 - alpha_prod_t / alpha_prod_t_prev)


def _predict_original_and_noise(model_output, sample, alpha_prod_t, beta_prod_t, prediction_type):
    """``(x0, eps)`` from the network output (Ho et al. 2020 eq. 15; Salimans & Ho 2022 for ``v``).

    epsilon:       x0 = (x_t - sqrt(1 - a_t) * eps_theta) / sqrt(a_t),   eps = eps_theta
    sample:        x0 = x0_theta,                                         eps = (x_t - sqrt(a_t) x0) / sqrt(1 - a_t)
    v_prediction:  x0 = sqrt(a_t) x_t - sqrt(1 - a_t) v,                  eps = sqrt(a_t) v + sqrt(1 - a_t) x_t
    """
    sqrt_alpha, sqrt_beta = alpha_prod_t.sqrt(), beta_prod_t.sqrt()
    if prediction_type == "epsilon":
        return (sample - sqrt_beta * model_output) / sqrt_alpha, model_output
    if prediction_type == "sample":
        return model_output, (sample - sqrt_alpha * model_output) / sqrt_beta
    return sqrt_alpha * sample - sqrt_beta * model_output, sqrt_alpha * model_output + sqrt_beta * sample


def _guided_output(model_output, uncond_output, guidance_scale, dtype):
    """Classifier-free guidance (Ho & Salimans 2022): ``uncond + w * (cond - uncond)`` in ``dtype``, where
    ``model_output`` is the conditional prediction ``cond``; just ``model_output`` without ``uncond_output`` or at
    ``w = 1``, just ``uncond`` at ``w = 0`` (the zero-weight term is left out, never multiplied by 0)."""
    if uncond_output is None or guidance_scale == 1:
        return model_output.to(dtype)
    if guidance_scale == 0:
        return uncond_output.to(dtype)
    uncond = uncond_output.to(dtype)
    return uncond + guidance_scale * (model_output.to(dtype) - uncond)


def ddpm_step_reference(model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor,
                        schedule: NoiseSchedule, prev_timestep: torch.Tensor, noise: Optional[torch.Tensor],
                        prediction_type: str = "epsilon", variance_type: str = "fixed_small",
                        clip_sample: bool = False, clip_sample_range: float = 1.0,
                        uncond_output: Optional[torch.Tensor] = None, guidance_scale: float = 1.0) -> torch.Tensor:
    """DDPM ancestral step x_t -> x_{t_prev} in plain PyTorch (Ho et al. 2020, eq. 6-7 and 15).

    With ``current_alpha_t = a_t / a_prev`` and ``current_beta_t = 1 - current_alpha_t``:
        mu = sqrt(a_prev) * current_beta_t / (1 - a_t) * x0 + sqrt(current_alpha_t) * (1 - a_prev) / (1 - a_t) * x_t
        x_{t_prev} = mu + sigma_t * z,   z ~ N(0, I), and no noise where t == 0
        sigma_t^2 = (1 - a_prev) / (1 - a_t) * current_beta_t  ("fixed_small", floored at 1e-20)
                  = current_beta_t                             ("fixed_large")
    ``timestep``/``prev_timestep`` are integer tensors of shape ``[batch]``; a negative ``prev_timestep`` means
    ``a_prev = 1``. ``noise`` may be None when every timestep is 0. With ``uncond_output`` the network output is
    first combined by classifier-free guidance (see :func:`_guided_output`). Computes in fp32 (fp64 for fp64
    inputs) and returns ``sample``'s dtype.
    """
    dtype = compute_dtype(sample.dtype)
    alpha_prod_t, alpha_prod_t_prev, beta_prod_t, beta_prod_t_prev = schedule_terms(
        schedule, sample, timestep, prev_timestep, True)
    x_t, model_output = sample.to(dtype), _guided_output(model_output, uncond_output, guidance_scale, dtype)
    x0, _ = _predict_original_and_noise(model_output, x_t, alpha_prod_t, beta_prod_t, prediction_type)
    if clip_sample:
        x0 = x0.clamp(-clip_sample_range, clip_sample_range)
    current_alpha_t = alpha_prod_t / alpha_prod_t_prev
    current_beta_t = _current_beta(alpha_prod_t, alpha_prod_t_prev, beta_prod_t, beta_prod_t_prev)
    mean = (alpha_prod_t_prev.sqrt() * current_beta_t / beta_prod_t * x0
            + _term(current_alpha_t.sqrt() * beta_prod_t_prev / beta_prod_t, x_t))
    if variance_type == "fixed_small":
        variance = (beta_prod_t_prev / beta_prod_t * current_beta_t).clamp(min=MIN_VARIANCE)
    else:
        variance = current_beta_t
    if noise is None:
        return mean.to(sample.dtype)
    has_noise = timestep.reshape(variance.shape) > 0
    noise_term = torch.where(has_noise, variance.sqrt() * noise.to(dtype), torch.zeros_like(mean))
    return (mean + noise_term).to(sample.dtype)


def ddim_step_reference(model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor,
                        schedule: NoiseSchedule, prev_timestep: torch.Tensor, noise: Optional[torch.Tensor],
                        eta: float = 0.0, prediction_type: str = "epsilon", clip_sample: bool = False,
                        clip_sample_range: float = 1.0, set_alpha_to_one: bool = True,
                        use_clipped_model_output: bool = False, uncond_output: Optional[torch.Tensor] = None,
                        guidance_scale: float = 1.0) -> torch.Tensor:
    """DDIM step x_t -> x_{t_prev} in plain PyTorch (Song et al. 2021, eq. 12 and 16).

        sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        x_{t_prev} = sqrt(a_prev) * x0 + sqrt(1 - a_prev - sigma_t^2) * eps + sigma_t * z
    A negative ``prev_timestep`` means ``a_prev = 1`` (``set_alpha_to_one``) or ``a_prev = a_0``.
    With ``use_clipped_model_output`` the noise is re-derived from the clipped ``x0``. ``noise`` may be None when
    ``eta == 0``. ``uncond_output`` and ``guidance_scale`` as in :func:`ddpm_step_reference`. Computes in fp32
    (fp64 for fp64 inputs) and returns ``sample``'s dtype.
    """
    dtype = compute_dtype(sample.dtype)
    alpha_prod_t, alpha_prod_t_prev, beta_prod_t, beta_prod_t_prev = schedule_terms(
        schedule, sample, timestep, prev_timestep, set_alpha_to_one)
    x_t, model_output = sample.to(dtype), _guided_output(model_output, uncond_output, guidance_scale, dtype)
    x0, eps = _predict_original_and_noise(model_output, x_t, alpha_prod_t, beta_prod_t, prediction_type)
    if clip_sample:
        x0 = x0.clamp(-clip_sample_range, clip_sample_range)
    if use_clipped_model_output:
        eps = (x_t - alpha_prod_t.sqrt() * x0) / beta_prod_t.sqrt()
    variance = beta_prod_t_prev / beta_prod_t * _current_beta(alpha_prod_t, alpha_prod_t_prev, beta_prod_t,
                                                              beta_prod_t_prev)
    std_dev_t = eta * variance.sqrt()
    direction = _term((beta_prod_t_prev - std_dev_t**2).clamp(min=0).sqrt(), eps)
    prev_sample = alpha_prod_t_prev.sqrt() * x0 + direction
    if eta > 0:
        prev_sample = prev_sample + _term(std_dev_t, noise.to(dtype))
    return prev_sample.to(sample.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels: the step and its gradient
# ----------------------------------------------------------------------------------------------------------------
SCHEDULER_DDPM, SCHEDULER_DDIM = 0, 1
_PREDICTION_CODES = {name: code for code, name in enumerate(PREDICTION_TYPES)}
PREDICT_EPSILON, PREDICT_SAMPLE, PREDICT_V = 0, 1, 2
# Runtime scalars compiled once for every value (a timestep of 1 must not compile a kernel of its own).
_STEP_SCALARS = ["timestep_value", "prev_timestep_value", "eta", "clip_range", "guidance_scale"]


@triton.jit
def _walk_offsets(batch_index, inner, strides, sizes, INNER_CONTIGUOUS: tl.constexpr):
    """Offsets of the elements ``inner`` of sample ``batch_index`` in one tensor of a
    :class:`~genkernels.kernels.launch.SampleWalk`: ``strides`` is that tensor's ``(batch, 4 inner)`` stride tuple,
    ``sizes`` the walk's inner sizes 1..3."""
    return sample_offsets(batch_index, inner, strides[0], strides[1], strides[2], strides[3], strides[4],
                          sizes[0], sizes[1], sizes[2], INNER_CONTIGUOUS)


@triton.jit
def _step_coefficients(table_ptr, timestep_ptr, prev_timestep_ptr, timestep_value, prev_timestep_value,
                       timestep_stride, prev_timestep_stride, num_train_timesteps, batch_index, eta,
                       SCHEDULER: tl.constexpr, FIXED_LARGE: tl.constexpr, FINAL_ALPHA_IS_ONE: tl.constexpr,
                       TIMESTEP_IN_TENSOR: tl.constexpr, PREV_TIMESTEP_IN_TENSOR: tl.constexpr):
    """This sample's schedule terms, gathered on the device from its timesteps:
    ``sqrt(a_t), sqrt(1 - a_t)`` and the coefficients of ``x_prev = coef_x0 * x0 + coef_sample * x_t +
    coef_eps * eps + sigma * z`` (see the eager references; DDPM has no ``eps`` term, DDIM no ``x_t`` term)."""
    if TIMESTEP_IN_TENSOR:
        t = tl.load(timestep_ptr + batch_index.to(tl.int64) * timestep_stride).to(tl.int64)
    else:
        t = tl.full((), timestep_value, tl.int64)
    if PREV_TIMESTEP_IN_TENSOR:
        prev = tl.load(prev_timestep_ptr + batch_index.to(tl.int64) * prev_timestep_stride).to(tl.int64)
    else:
        prev = tl.full((), prev_timestep_value, tl.int64)
    # The host validated the timesteps; clamping only guarantees that no gather can leave the table.
    t = tl.minimum(tl.maximum(t, 0), num_train_timesteps - 1)
    prev_index = tl.minimum(tl.maximum(prev, 0), num_train_timesteps - 1)
    alpha_prod_t = tl.load(table_ptr + t)
    beta_prod_t = tl.load(table_ptr + num_train_timesteps + t)
    if FINAL_ALPHA_IS_ONE:
        final_alpha, final_beta = 1.0, 0.0
    else:
        final_alpha, final_beta = tl.load(table_ptr), tl.load(table_ptr + num_train_timesteps)
    alpha_prod_prev = tl.where(prev < 0, final_alpha, tl.load(table_ptr + prev_index))
    beta_prod_prev = tl.where(prev < 0, final_beta, tl.load(table_ptr + num_train_timesteps + prev_index))
    # 1 - a_t / a_prev, without cancellation (see _current_beta)
    current_beta = tl.where(alpha_prod_prev > 0.5, (beta_prod_t - beta_prod_prev) / alpha_prod_prev,
                            1.0 - alpha_prod_t / alpha_prod_prev)
    if SCHEDULER == 0:  # DDPM
        coef_x0 = tl.sqrt(alpha_prod_prev) * current_beta / beta_prod_t
        coef_sample = tl.sqrt(alpha_prod_t / alpha_prod_prev) * beta_prod_prev / beta_prod_t
        coef_eps = coef_sample * 0.0
        if FIXED_LARGE:
            variance = current_beta
        else:
            variance = tl.maximum(beta_prod_prev / beta_prod_t * current_beta, 1e-20)
        sigma = tl.where(t > 0, tl.sqrt(variance), 0.0)
    else:  # DDIM
        std_dev = eta * tl.sqrt(beta_prod_prev / beta_prod_t * current_beta)
        coef_x0 = tl.sqrt(alpha_prod_prev)
        coef_sample = coef_x0 * 0.0
        coef_eps = tl.sqrt(tl.maximum(beta_prod_prev - std_dev * std_dev, 0.0))
        sigma = std_dev
    return tl.sqrt(alpha_prod_t), tl.sqrt(beta_prod_t), coef_x0, coef_sample, coef_eps, sigma


@triton.jit
def _load_guided(model_output_ptr, uncond_ptr, batch_index, inner, mask, model_output_strides, uncond_strides,
                 sizes, guidance_scale, GUIDANCE: tl.constexpr, INNER_CONTIGUOUS: tl.constexpr):
    """The network output the step reads, in fp32: ``model_output``, or with classifier-free guidance
    ``uncond + w * (model_output - uncond)`` (``model_output`` holds the conditional prediction)."""
    offsets = _walk_offsets(batch_index, inner, model_output_strides, sizes, INNER_CONTIGUOUS)
    model_output = tl.load(model_output_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if GUIDANCE:
        offsets = _walk_offsets(batch_index, inner, uncond_strides, sizes, INNER_CONTIGUOUS)
        uncond = tl.load(uncond_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        model_output = uncond + guidance_scale * (model_output - uncond)
    return model_output


@triton.jit
def _predict_original(x_t, model_output, sqrt_alpha, sqrt_beta, clip_range, PREDICTION: tl.constexpr,
                      CLIP: tl.constexpr):
    """``x0`` from the network output (see _predict_original_and_noise), clamped when ``CLIP`` (NaN stays NaN, as
    in torch.clamp); each prediction type reads only the inputs its formula has (no ``0 * x``)."""
    if PREDICTION == 0:  # epsilon
        x0 = (x_t - sqrt_beta * model_output) * (1.0 / sqrt_alpha)
    elif PREDICTION == 1:  # sample
        x0 = model_output
    else:  # v_prediction
        x0 = sqrt_alpha * x_t - sqrt_beta * model_output
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -clip_range, propagate_nan=tl.PropagateNan.ALL), clip_range,
                        propagate_nan=tl.PropagateNan.ALL)
    return x0


@triton.jit(do_not_specialize=_STEP_SCALARS)
def _denoise_step_kernel(
    out_ptr, model_output_ptr, sample_ptr, noise_ptr, uncond_ptr, seed_ptr, table_ptr, timestep_ptr,
    prev_timestep_ptr,
    timestep_value, prev_timestep_value, timestep_stride, prev_timestep_stride, num_train_timesteps,
    batch_start, inner_numel, sizes,
    out_strides, model_output_strides, sample_strides, noise_strides, uncond_strides, index_strides,
    eta, clip_range, guidance_scale,
    SCHEDULER: tl.constexpr, PREDICTION: tl.constexpr, FIXED_LARGE: tl.constexpr, CLIP: tl.constexpr,
    USE_CLIPPED_MODEL_OUTPUT: tl.constexpr, FINAL_ALPHA_IS_ONE: tl.constexpr, NOISE_MODE: tl.constexpr,
    TIMESTEP_IN_TENSOR: tl.constexpr, PREV_TIMESTEP_IN_TENSOR: tl.constexpr, INNER_CONTIGUOUS: tl.constexpr,
    GUIDANCE: tl.constexpr, BLOCK: tl.constexpr,
):
    """``x_prev = coef_x0 * x0 + coef_sample * x_t + coef_eps * eps + sigma * z`` over one block of one sample.
    Each ``*_strides`` is a ``(batch, 4 inner)`` tuple, ``sizes`` the inner sizes 1..3 of the walk. A term whose
    coefficient is zero (a constexpr zero, or this sample's final step) is left out rather than multiplied by 0,
    so +-Inf inputs give what the math gives."""
    batch_index = batch_start + tl.program_id(1)
    sqrt_alpha, sqrt_beta, coef_x0, coef_sample, coef_eps, sigma = _step_coefficients(
        table_ptr, timestep_ptr, prev_timestep_ptr, timestep_value, prev_timestep_value, timestep_stride,
        prev_timestep_stride, num_train_timesteps, batch_index, eta, SCHEDULER, FIXED_LARGE, FINAL_ALPHA_IS_ONE,
        TIMESTEP_IN_TENSOR, PREV_TIMESTEP_IN_TENSOR)
    lo, hi, steps = span_of_program(inner_numel, BLOCK)
    for step in range(steps):
        first, inner, mask = tile_of_span(lo, hi, step, BLOCK)
        # The bulk loads go first so that their latency overlaps the dependent gathers of the schedule terms below.
        model_output = _load_guided(model_output_ptr, uncond_ptr, batch_index, inner, mask, model_output_strides,
                                    uncond_strides, sizes, guidance_scale, GUIDANCE, INNER_CONTIGUOUS)
        x_offsets = _walk_offsets(batch_index, inner, sample_strides, sizes, INNER_CONTIGUOUS)
        x_t = tl.load(sample_ptr + x_offsets, mask=mask, other=0.0).to(tl.float32)

        x0 = _predict_original(x_t, model_output, sqrt_alpha, sqrt_beta, clip_range, PREDICTION, CLIP)
        prev_sample = coef_x0 * x0
        if SCHEDULER == 0:  # DDPM: the x_t term (absent at a final step to a_prev = 1)
            if coef_sample != 0.0:
                prev_sample += coef_sample * x_t
        else:  # DDIM: the eps term (absent at a final step to a_prev = 1, and where sigma takes all of 1 - a_prev)
            if coef_eps != 0.0:
                if USE_CLIPPED_MODEL_OUTPUT:
                    eps = (x_t - sqrt_alpha * x0) * (1.0 / sqrt_beta)
                elif PREDICTION == 0:
                    eps = model_output
                elif PREDICTION == 1:
                    eps = (x_t - sqrt_alpha * model_output) * (1.0 / sqrt_beta)
                else:
                    eps = sqrt_alpha * model_output + sqrt_beta * x_t
                prev_sample += coef_eps * eps
        if NOISE_MODE != 0:
            if sigma != 0.0:  # no noise at DDPM's t = 0, nor at a DDIM step with sigma = 0
                prev_sample += sigma * walk_noise(
                    noise_ptr, seed_ptr, batch_index, first, inner, mask, noise_strides[0], noise_strides[1],
                    noise_strides[2], noise_strides[3], noise_strides[4], index_strides[0], index_strides[1],
                    index_strides[2], index_strides[3], sizes[0], sizes[1], sizes[2], NOISE_MODE, INNER_CONTIGUOUS,
                    BLOCK)
        out_offsets = _walk_offsets(batch_index, inner, out_strides, sizes, INNER_CONTIGUOUS)
        tl.store(out_ptr + out_offsets, prev_sample.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_STEP_SCALARS)
def _denoise_step_backward_kernel(
    grad_model_output_ptr, grad_sample_ptr, grad_noise_ptr, grad_uncond_ptr, grad_ptr, model_output_ptr,
    sample_ptr, uncond_ptr, table_ptr, timestep_ptr, prev_timestep_ptr,
    timestep_value, prev_timestep_value, timestep_stride, prev_timestep_stride, num_train_timesteps,
    batch_start, inner_numel, sizes,
    grad_model_output_strides, grad_sample_strides, grad_noise_strides, grad_uncond_strides, grad_strides,
    model_output_strides, sample_strides, uncond_strides,
    eta, clip_range, guidance_scale,
    SCHEDULER: tl.constexpr, PREDICTION: tl.constexpr, FIXED_LARGE: tl.constexpr, CLIP: tl.constexpr,
    USE_CLIPPED_MODEL_OUTPUT: tl.constexpr, FINAL_ALPHA_IS_ONE: tl.constexpr,
    TIMESTEP_IN_TENSOR: tl.constexpr, PREV_TIMESTEP_IN_TENSOR: tl.constexpr, INNER_CONTIGUOUS: tl.constexpr,
    GUIDANCE: tl.constexpr, NEED_MODEL_OUTPUT: tl.constexpr, NEED_SAMPLE: tl.constexpr,
    NEED_NOISE: tl.constexpr, NEED_UNCOND: tl.constexpr, BLOCK: tl.constexpr,
):
    """The step's gradient: for fixed timesteps ``x_prev`` is linear in ``x_t``, the (guided) network output
    ``m`` and ``z``, except for the clamp of ``x0``, whose derivative is 0 outside ``[-range, range]`` (and at NaN),
    as torch.clamp's. ``x0``, and so ``model_output``/``sample``/``uncond``, is only read when ``CLIP``."""
    batch_index = batch_start + tl.program_id(1)
    sqrt_alpha, sqrt_beta, coef_x0, coef_sample, coef_eps, sigma = _step_coefficients(
        table_ptr, timestep_ptr, prev_timestep_ptr, timestep_value, prev_timestep_value, timestep_stride,
        prev_timestep_stride, num_train_timesteps, batch_index, eta, SCHEDULER, FIXED_LARGE, FINAL_ALPHA_IS_ONE,
        TIMESTEP_IN_TENSOR, PREV_TIMESTEP_IN_TENSOR)
    lo, hi, steps = span_of_program(inner_numel, BLOCK)
    for step in range(steps):
        first, inner, mask = tile_of_span(lo, hi, step, BLOCK)
        g_offsets = _walk_offsets(batch_index, inner, grad_strides, sizes, INNER_CONTIGUOUS)
        g = tl.load(grad_ptr + g_offsets, mask=mask, other=0.0).to(tl.float32)
        inv_sqrt_alpha = 1.0 / sqrt_alpha
        inv_sqrt_beta = 1.0 / sqrt_beta
        # The coefficient of the clamped x0 in x_prev (with USE_CLIPPED_MODEL_OUTPUT, eps = (x_t - sqrt(a_t) x0) /
        # sqrt(1 - a_t) depends on it too)
        x0_weight = coef_x0
        if SCHEDULER == 1:
            if USE_CLIPPED_MODEL_OUTPUT:
                x0_weight = coef_x0 - coef_eps * sqrt_alpha * inv_sqrt_beta
        grad_x0 = x0_weight * g
        if CLIP:
            model_output = _load_guided(model_output_ptr, uncond_ptr, batch_index, inner, mask, model_output_strides,
                                        uncond_strides, sizes, guidance_scale, GUIDANCE, INNER_CONTIGUOUS)
            x_offsets = _walk_offsets(batch_index, inner, sample_strides, sizes, INNER_CONTIGUOUS)
            x_t = tl.load(sample_ptr + x_offsets, mask=mask, other=0.0).to(tl.float32)
            x0 = _predict_original(x_t, model_output, sqrt_alpha, sqrt_beta, clip_range, PREDICTION, False)
            grad_x0 = tl.where((x0 >= -clip_range) & (x0 <= clip_range), grad_x0, 0.0)
        # through x0 (d x0 / d x_t and d x0 / d m)
        if PREDICTION == 0:
            grad_sample = grad_x0 * inv_sqrt_alpha
            grad_output = -(sqrt_beta * inv_sqrt_alpha) * grad_x0
        elif PREDICTION == 1:
            grad_sample = tl.zeros_like(g)
            grad_output = grad_x0
        else:
            grad_sample = sqrt_alpha * grad_x0
            grad_output = -sqrt_beta * grad_x0
        # the direct terms: DDPM's coef_sample * x_t, DDIM's coef_eps * eps (left out where zero, as in the forward)
        if SCHEDULER == 0:
            if coef_sample != 0.0:
                grad_sample += coef_sample * g
        else:
            if coef_eps != 0.0:
                if USE_CLIPPED_MODEL_OUTPUT:
                    grad_sample += (coef_eps * inv_sqrt_beta) * g
                elif PREDICTION == 0:
                    grad_output += coef_eps * g
                elif PREDICTION == 1:
                    grad_sample += (coef_eps * inv_sqrt_beta) * g
                    grad_output += -(coef_eps * sqrt_alpha * inv_sqrt_beta) * g
                else:
                    grad_sample += (coef_eps * sqrt_beta) * g
                    grad_output += (coef_eps * sqrt_alpha) * g
        if NEED_SAMPLE:
            offsets = _walk_offsets(batch_index, inner, grad_sample_strides, sizes, INNER_CONTIGUOUS)
            tl.store(grad_sample_ptr + offsets, grad_sample.to(grad_sample_ptr.dtype.element_ty), mask=mask)
        if NEED_MODEL_OUTPUT:
            grad_model_output = grad_output
            if GUIDANCE:
                grad_model_output = guidance_scale * grad_output
            offsets = _walk_offsets(batch_index, inner, grad_model_output_strides, sizes, INNER_CONTIGUOUS)
            tl.store(grad_model_output_ptr + offsets, grad_model_output.to(grad_model_output_ptr.dtype.element_ty),
                     mask=mask)
        if NEED_UNCOND:
            offsets = _walk_offsets(batch_index, inner, grad_uncond_strides, sizes, INNER_CONTIGUOUS)
            tl.store(grad_uncond_ptr + offsets, ((1.0 - guidance_scale) * grad_output).to(
                grad_uncond_ptr.dtype.element_ty), mask=mask)
        if NEED_NOISE:
            grad_noise = tl.zeros_like(g)
            if sigma != 0.0:
                grad_noise = sigma * g
            offsets = _walk_offsets(batch_index, inner, grad_noise_strides, sizes, INNER_CONTIGUOUS)
            tl.store(grad_noise_ptr + offsets, grad_noise.to(grad_noise_ptr.dtype.element_ty), mask=mask)


@dataclasses.dataclass(frozen=True)
class _StepOptions:
    """The step's settings shared by the forward and gradient launchers (constexpr switches and scalars)."""

    scheduler: int
    prediction_type: str
    variance_type: str = "fixed_small"
    eta: float = 0.0
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    use_clipped_model_output: bool = False
    guidance_scale: float = 1.0

    def constexprs(self) -> dict:
        return dict(SCHEDULER=self.scheduler, PREDICTION=_PREDICTION_CODES[self.prediction_type],
                    FIXED_LARGE=self.variance_type == "fixed_large", CLIP=self.clip_sample,
                    USE_CLIPPED_MODEL_OUTPUT=self.use_clipped_model_output,
                    FINAL_ALPHA_IS_ONE=self.set_alpha_to_one)

    def scalars(self) -> dict:
        return dict(eta=self.eta, clip_range=self.clip_sample_range, guidance_scale=self.guidance_scale)


def _timestep_arguments(table: torch.Tensor, timestep: Optional[torch.Tensor], timestep_value: int,
                        prev_timestep: Optional[torch.Tensor], prev_timestep_value: int) -> dict:
    """The schedule and timestep arguments of both kernels, by name (a missing tensor's pointer is the table's,
    never read: its constexpr switch is off)."""
    return dict(table_ptr=table, timestep_ptr=timestep if timestep is not None else table,
                prev_timestep_ptr=prev_timestep if prev_timestep is not None else table,
                timestep_value=timestep_value, prev_timestep_value=prev_timestep_value,
                timestep_stride=batch_stride(timestep), prev_timestep_stride=batch_stride(prev_timestep),
                num_train_timesteps=table.shape[1], TIMESTEP_IN_TENSOR=timestep is not None,
                PREV_TIMESTEP_IN_TENSOR=prev_timestep is not None)


def _walk_arguments(walk: SampleWalk, pointers: dict) -> dict:
    """``{name}_ptr`` and ``{name}_strides`` of every tensor of ``walk`` (``pointers`` maps kernel names to walk
    names; a tensor left out gets a placeholder pointer and zero strides), and the walk's sizes and layout."""
    placeholder = next(iter(walk.tensors.values()))
    arguments = dict(inner_numel=walk.layout.inner_numel, sizes=tuple(walk.layout.inner_sizes[1:]),
                     INNER_CONTIGUOUS=walk_is_contiguous(walk))
    for kernel_name, walk_name in pointers.items():
        arguments[f"{kernel_name}_ptr"] = walk.tensor(walk_name, placeholder)
        arguments[f"{kernel_name}_strides"] = tuple(walk.strides(walk_name))
    return arguments


def _launch_denoise_step(options: _StepOptions, model_output, sample, noise, seed, table, timestep,
                         timestep_value, prev_timestep, prev_timestep_value, uncond_output) -> torch.Tensor:
    out = torch.empty_like(sample)
    if out.numel() == 0:
        return out
    noise_source = "tensor" if noise is not None else ("drawn" if seed is not None else None)
    walk = SampleWalk({"out": out, "model_output": model_output, "sample": sample, "noise": noise,
                       "uncond": uncond_output}, ("out",), noise_source)
    arguments = dict(
        _walk_arguments(walk, {"out": "out", "model_output": "model_output", "sample": "sample", "noise": "noise",
                               "uncond": "uncond"}),
        **_timestep_arguments(table, timestep, timestep_value, prev_timestep, prev_timestep_value),
        **options.scalars(), **options.constexprs(),
        seed_ptr=seed if seed is not None else table, index_strides=tuple(walk.index_strides),
        NOISE_MODE=walk_noise_mode(walk), GUIDANCE=uncond_output is not None)
    split = wave_split("denoise_step", walk.layout.inner_numel, walk.layout.batch, sample.element_size(),
                       sample.device)
    for start, count in batch_chunks(walk.layout.batch):
        _denoise_step_kernel[(split.programs, count)](batch_start=start, BLOCK=split.tile,
                                                      num_warps=split.num_warps, **arguments)
    return walk.output("out")


def _launch_denoise_step_backward(options: _StepOptions, grad, model_output, sample, noise, uncond_output, table,
                                  timestep, timestep_value, prev_timestep, prev_timestep_value,
                                  needs: Sequence[bool]) -> list[torch.Tensor]:
    """Gradients ``[model_output, sample, noise, uncond_output]``, each an empty ``[0]`` tensor where
    ``needs`` is False (or the input is None)."""
    inputs = (model_output, sample, noise, uncond_output)
    grads = [torch.empty_like(t) if need and t is not None else grad.new_empty(0) for t, need in zip(inputs, needs)]
    wanted = [need and t is not None for t, need in zip(inputs, needs)]
    if grad.numel() == 0 or not any(wanted):
        return grads
    names = ("grad_model_output", "grad_sample", "grad_noise", "grad_uncond")
    outputs = {name: g for name, g, w in zip(names, grads, wanted) if w}
    walk = SampleWalk({**outputs, "grad": grad, "model_output": model_output, "sample": sample,
                       "uncond": uncond_output}, tuple(outputs))
    arguments = dict(
        _walk_arguments(walk, {name: name for name in names + ("grad", "model_output", "sample", "uncond")}),
        **_timestep_arguments(table, timestep, timestep_value, prev_timestep, prev_timestep_value),
        **options.scalars(), **options.constexprs(), GUIDANCE=uncond_output is not None,
        NEED_MODEL_OUTPUT=wanted[0], NEED_SAMPLE=wanted[1], NEED_NOISE=wanted[2], NEED_UNCOND=wanted[3])
    split = wave_split("denoise_step", walk.layout.inner_numel, walk.layout.batch, grad.element_size(),
                       grad.device)
    for start, count in batch_chunks(walk.layout.batch):
        _denoise_step_backward_kernel[(split.programs, count)](batch_start=start,
                                                               BLOCK=split.tile, num_warps=split.num_warps,
                                                               **arguments)
    return [walk.output(name) if name in outputs else g for name, g in zip(names, grads)]


_STRIDES = ("i64",) * 5


def batch_stride(timestep: Optional[torch.Tensor]) -> int:
    """Stride between samples' timesteps: 0 for one timestep shared by the whole batch (or no tensor)."""
    if timestep is None or timestep.dim() == 0 or timestep.numel() == 1:
        return 0
    return timestep.stride(0)




# ----------------------------------------------------------------------------------------------------------------
# torch.library registration (usable under torch.compile(fullgraph=True)), with the gradient
# ----------------------------------------------------------------------------------------------------------------
def _ddpm_step_launch(model_output: torch.Tensor, sample: torch.Tensor, noise: Optional[torch.Tensor],
                      seed: Optional[torch.Tensor], table: torch.Tensor, timestep: Optional[torch.Tensor],
                      timestep_value: int, prev_timestep: Optional[torch.Tensor], prev_timestep_value: int,
                      prediction_type: str, variance_type: str, clip_sample: bool, clip_sample_range: float,
                      uncond_output: Optional[torch.Tensor], guidance_scale: float) -> torch.Tensor:
    options = _StepOptions(SCHEDULER_DDPM, prediction_type, variance_type, clip_sample=clip_sample,
                           clip_sample_range=clip_sample_range, guidance_scale=guidance_scale)
    return _launch_denoise_step(options, model_output, sample, noise, seed, table, timestep, timestep_value,
                                prev_timestep, prev_timestep_value, uncond_output)


def _ddim_step_launch(model_output: torch.Tensor, sample: torch.Tensor, noise: Optional[torch.Tensor],
                      seed: Optional[torch.Tensor], table: torch.Tensor, timestep: Optional[torch.Tensor],
                      timestep_value: int, prev_timestep: Optional[torch.Tensor], prev_timestep_value: int,
                      eta: float, prediction_type: str, clip_sample: bool, clip_sample_range: float,
                      set_alpha_to_one: bool, use_clipped_model_output: bool, uncond_output: Optional[torch.Tensor],
                      guidance_scale: float) -> torch.Tensor:
    options = _StepOptions(SCHEDULER_DDIM, prediction_type, eta=eta, clip_sample=clip_sample,
                           clip_sample_range=clip_sample_range, set_alpha_to_one=set_alpha_to_one,
                           use_clipped_model_output=use_clipped_model_output, guidance_scale=guidance_scale)
    return _launch_denoise_step(options, model_output, sample, noise, seed, table, timestep, timestep_value,
                                prev_timestep, prev_timestep_value, uncond_output)


def _denoise_step_backward_launch(grad: torch.Tensor, model_output: torch.Tensor, sample: torch.Tensor,
                                  noise: Optional[torch.Tensor], uncond_output: Optional[torch.Tensor],
                                  table: torch.Tensor, timestep: Optional[torch.Tensor], timestep_value: int,
                                  prev_timestep: Optional[torch.Tensor], prev_timestep_value: int, scheduler: int,
                                  prediction_type: str, variance_type: str, eta: float, clip_sample: bool,
                                  clip_sample_range: float, set_alpha_to_one: bool, use_clipped_model_output: bool,
                                  guidance_scale: float, needs: list[bool]
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    options = _StepOptions(scheduler, prediction_type, variance_type, eta, clip_sample, clip_sample_range,
                           set_alpha_to_one, use_clipped_model_output, guidance_scale)
    return tuple(_launch_denoise_step_backward(options, grad, model_output, sample, noise, uncond_output, table,
                                               timestep, timestep_value, prev_timestep, prev_timestep_value, needs))


_ddpm_step_op = torch.library.custom_op("genkernels::ddpm_step", _ddpm_step_launch, mutates_args=())
_ddim_step_op = torch.library.custom_op("genkernels::ddim_step", _ddim_step_launch, mutates_args=())
_denoise_step_backward_op = torch.library.custom_op("genkernels::denoise_step_backward",
                                                    _denoise_step_backward_launch, mutates_args=())


@_ddpm_step_op.register_fake
def _ddpm_step_fake(model_output, sample, *args):
    return torch.empty_like(sample)


@_ddim_step_op.register_fake
def _ddim_step_fake(model_output, sample, *args):
    return torch.empty_like(sample)


@_denoise_step_backward_op.register_fake
def _denoise_step_backward_fake(grad, model_output, sample, noise, uncond_output, *args):
    needs = args[-1]
    return tuple(torch.empty_like(t) if need and t is not None else grad.new_empty(0)
                 for t, need in zip((model_output, sample, noise, uncond_output), needs))


def _step_setup_context(ctx, scheduler: int, model_output, sample, noise, table, timestep, timestep_value,
                        prev_timestep, prev_timestep_value, uncond_output, options: tuple) -> None:
    ctx.save_for_backward(model_output, sample, noise, uncond_output, table, timestep, prev_timestep)
    ctx.scheduler = scheduler
    ctx.timestep_values = (timestep_value, prev_timestep_value)
    ctx.options = options  # (prediction_type, variance_type, eta, clip, range, set_alpha_to_one, use_clipped, w)


def _step_backward(ctx, grad: torch.Tensor, needs: list[bool]):
    """Gradients ``(model_output, sample, noise, uncond_output)`` (None where not needed)."""
    model_output, sample, noise, uncond_output, table, timestep, prev_timestep = ctx.saved_tensors
    grads = torch.ops.genkernels.denoise_step_backward(
        grad, model_output, sample, noise, uncond_output, table, timestep, ctx.timestep_values[0], prev_timestep,
        ctx.timestep_values[1], ctx.scheduler, *ctx.options, needs)
    return [g if need else None for g, need in zip(grads, needs)]


def _ddpm_step_setup_context(ctx, inputs, output) -> None:
    (model_output, sample, noise, _, table, timestep, timestep_value, prev_timestep, prev_timestep_value,
     prediction_type, variance_type, clip_sample, clip_sample_range, uncond_output, guidance_scale) = inputs
    _step_setup_context(ctx, SCHEDULER_DDPM, model_output, sample, noise, table, timestep, timestep_value,
                        prev_timestep, prev_timestep_value, uncond_output,
                        (prediction_type, variance_type, 0.0, clip_sample, clip_sample_range, True, False,
                         guidance_scale))


def _ddpm_step_backward(ctx, grad):
    need = ctx.needs_input_grad
    mo, x, z, u = _step_backward(ctx, grad, [need[0], need[1], need[2], need[13]])
    return mo, x, z, None, None, None, None, None, None, None, None, None, None, u, None


def _ddim_step_setup_context(ctx, inputs, output) -> None:
    (model_output, sample, noise, _, table, timestep, timestep_value, prev_timestep, prev_timestep_value, eta,
     prediction_type, clip_sample, clip_sample_range, set_alpha_to_one, use_clipped_model_output, uncond_output,
     guidance_scale) = inputs
    _step_setup_context(ctx, SCHEDULER_DDIM, model_output, sample, noise, table, timestep, timestep_value,
                        prev_timestep, prev_timestep_value, uncond_output,
                        (prediction_type, "fixed_small", eta, clip_sample, clip_sample_range, set_alpha_to_one,
                         use_clipped_model_output, guidance_scale))


def _ddim_step_backward(ctx, grad):
    need = ctx.needs_input_grad
    mo, x, z, u = _step_backward(ctx, grad, [need[0], need[1], need[2], need[15]])
    return mo, x, z, None, None, None, None, None, None, None, None, None, None, None, None, u, None


_ddpm_step_op.register_autograd(_ddpm_step_backward, setup_context=_ddpm_step_setup_context)
_ddim_step_op.register_autograd(_ddim_step_backward, setup_context=_ddim_step_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------------
class Timesteps:
    """A timestep argument normalized for dispatch: a Python int, or an integer tensor of shape [] or [batch]."""

    def __init__(self, value: int | None, tensor: torch.Tensor | None):
        self.value = value
        self.tensor = tensor

    def as_tensor(self, batch: int, device: torch.device) -> torch.Tensor:
        """``[batch]`` int64 on ``device`` (made with a fill kernel, never a host-to-device copy)."""
        if self.tensor is None:
            return torch.full((batch,), self.value, dtype=torch.int64, device=device)
        return self.tensor.to(torch.int64).reshape(-1).expand(batch)


def check_timesteps(value: object, name: str, batch: int, device: torch.device, num_train: int,
                    allow_negative: bool) -> Timesteps:
    """Validate a timestep argument: a Python int or an integer tensor of shape ``[]``/``[batch]`` on ``device``
    (a CPU scalar tensor is read as an int), in ``[0, num_train)`` (below ``num_train`` when ``allow_negative``:
    a negative previous timestep is the final step). Tensor values are checked by
    :func:`~genkernels.kernels.checks.check_values`: on the host for CPU tensors, as an asynchronous device assert
    on the GPU (the kernels also clamp their gathers to the table), not at all for meta tensors."""
    if isinstance(value, torch.Tensor):
        check_integer_tensor(value, name)
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] not in (1, batch)):
            raise ValueError(f"{name} must be a scalar or have shape [batch] = [{batch}]; got {describe(value)}")
        if value.device.type == "cpu" and value.dim() == 0:
            return check_timesteps(int(value), name, batch, device, num_train, allow_negative)
        if value.device != device:
            raise ValueError(f"{name} must be on the device of sample ({device}); got {describe(value)}")
        if allow_negative:
            check_values(value, name, value < num_train,
                         f"lie below num_train_timesteps={num_train} (a negative value is the final step)")
        else:
            check_in_range(value, name, 0, num_train)
        return Timesteps(None, value.to(torch.int64))
    number = check_int(value, name)
    if number >= num_train or (number < 0 and not allow_negative):
        low = "-inf" if allow_negative else "0"
        raise ValueError(f"{name}={number} must lie in [{low}, {num_train})")
    return Timesteps(number, None)




def _check_steps_backward(t: Timesteps, prev: Timesteps) -> None:
    """Require ``prev_timestep < timestep`` (a step forward in time has a negative variance): on the host where
    both are known there, else by :func:`~genkernels.kernels.checks.check_values`."""
    if t.tensor is None and prev.tensor is None:
        if prev.value >= t.value:
            raise ValueError(f"prev_timestep={prev.value} must be smaller than timestep={t.value}")
        return
    current = t.tensor if t.tensor is not None else torch.full_like(prev.tensor, t.value)
    previous = prev.tensor if prev.tensor is not None else torch.full_like(t.tensor, prev.value)
    current, previous = torch.broadcast_tensors(current, previous)
    check_values(previous, "prev_timestep", previous < current,
                 f"be smaller than timestep for every sample (timestep {_show(current)})")


def _show(value: torch.Tensor) -> str:
    return str(value.tolist()) if value.device.type == "cpu" and not torch.compiler.is_compiling() else "on device"


def _check_step_tensors(op: str, model_output, sample, noise, uncond_output, schedule, generator):
    check_float_tensor(sample, "sample")
    check_min_rank(sample, "sample", 1, "(batch first)")
    check_float_like(model_output, "model_output", sample, "sample", same_dtype=True)
    if noise is not None:
        check_float_like(noise, "noise", sample, "sample")
    if uncond_output is not None:
        check_float_like(uncond_output, "uncond_output", model_output, "model_output", same_dtype=True)
    device = check_same_device([("model_output", model_output), ("sample", sample), ("noise", noise),
                                ("uncond_output", uncond_output)])
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"{op}: schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    check_generator(generator, device, "sample")
    return device


def _check_guidance(model_output: torch.Tensor, uncond_output: Optional[torch.Tensor], guidance_scale: object):
    """Validate the guidance arguments; return ``(output, uncond, scale)``: what the step must read. A scale of
    exactly 1 reads only ``model_output`` and a scale of 0 only ``uncond_output`` (the other term's coefficient is
    zero, so it is left out rather than multiplied by 0: +-Inf there cannot turn the result into NaN)."""
    scale = check_real(guidance_scale, "guidance_scale")
    if uncond_output is None:
        if scale != 1.0:
            raise ValueError(f"guidance_scale={guidance_scale!r} needs uncond_output (the unconditional "
                             "prediction); pass it, or leave guidance_scale at 1.0")
        return model_output, None, 1.0
    if scale == 1.0:
        return model_output, None, 1.0
    if scale == 0.0:
        return uncond_output, None, 1.0
    return model_output, uncond_output, scale


def _step_tensors(sample, model_output, noise, uncond_output) -> dict:
    return {"sample": sample, "model_output": model_output, "noise": noise, "uncond_output": uncond_output}


def ddpm_step(model_output: torch.Tensor, timestep, sample: torch.Tensor, schedule: NoiseSchedule, *,
              prev_timestep=None, noise: Optional[torch.Tensor] = None,
              generator: Optional[torch.Generator] = None, prediction_type: str = "epsilon",
              variance_type: str = "fixed_small", clip_sample: bool = False, clip_sample_range: float = 1.0,
              uncond_output: Optional[torch.Tensor] = None, guidance_scale: float = 1.0,
              impl: str = "auto") -> torch.Tensor:
    """One DDPM reverse step ``x_t -> x_{prev_timestep}``, fused (diffusers' ``DDPMScheduler.step``).

    x0   = (x_t - sqrt(1 - a_t) eps_theta) / sqrt(a_t)      (or the sample / v parametrizations)
    x_prev = sqrt(a_prev) (1 - a_t/a_prev) / (1 - a_t) * x0 + sqrt(a_t/a_prev) (1 - a_prev) / (1 - a_t) * x_t
             + sigma_t z,   sigma_t^2 = (1 - a_prev)/(1 - a_t) (1 - a_t/a_prev) ("fixed_small") or
             1 - a_t/a_prev ("fixed_large"); no noise where t == 0.
    With classifier-free guidance (Ho & Salimans 2022) the network output is first combined, in the same pass,
    as ``uncond_output + guidance_scale * (model_output - uncond_output)``.

    The step is differentiable in ``model_output``, ``sample``, ``noise`` and ``uncond_output`` under both impls
    (the Triton path has a fused gradient kernel; for fixed timesteps the step is linear in them, except for the
    clamp of ``clip_sample``, whose derivative is 0 outside the range, as torch.clamp's). A term whose coefficient
    is zero (the ``x_t`` term of a final step to ``a_prev = 1``, the noise at ``t = 0``, ``model_output`` at
    ``guidance_scale = 0``) is left out rather than multiplied by 0, so +-Inf there gives what the math gives, not
    NaN; the clamp keeps NaN, as torch.clamp does.

    Args:
        model_output: the network's prediction, shape of ``sample``.
        timestep: current timestep, a Python int or an integer tensor of shape ``[]`` or ``[batch]``.
        sample: the current sample ``x_t``, ``[batch, ...]``, any strides: fp32/fp16/bf16 (the kernels, fp32 math),
            or fp64 (the eager reference in fp64; ``impl="triton"`` refuses it).
        schedule: the :class:`NoiseSchedule` the model was trained with.
        prev_timestep: the timestep to step to, below ``timestep`` (default ``timestep - 1``); negative means the
            final step.
        noise: the Gaussian ``z`` to add; when None it is drawn from ``generator``: inside the kernel by Philox
            (keyed by a seed taken from ``generator`` and each element's row-major index, whatever the layout; the
            stream :func:`~genkernels.kernels.philox_normal` reproduces), or by ``torch.randn`` on the eager path,
            as diffusers and a plain PyTorch loop draw it. The two impls therefore draw different noise; pass
            ``noise`` to compare them.
        prediction_type: "epsilon", "sample" or "v_prediction".
        variance_type: "fixed_small" or "fixed_large".
        clip_sample, clip_sample_range: clamp ``x0`` to ``[-range, range]``.
        uncond_output: the unconditional prediction for classifier-free guidance (``model_output`` is then the
            conditional one), shape and dtype of ``model_output``, any strides (e.g. the halves of one batched
            network call).
        guidance_scale: the guidance weight ``w``; 1 means no guidance (``uncond_output`` is not read), 0 the
            unconditional step (``model_output`` is not read).
        impl: "auto", "triton" or "eager".

    Returns:
        ``x_prev`` with the shape and dtype of ``sample`` (math in fp32, fp64 for fp64).
    """
    device = _check_step_tensors("ddpm_step", model_output, sample, noise, uncond_output, schedule, generator)
    model_output, uncond_output, guidance_scale = _check_guidance(model_output, uncond_output, guidance_scale)
    check_choice(prediction_type, "prediction_type", PREDICTION_TYPES)
    check_choice(variance_type, "variance_type", VARIANCE_TYPES)
    check_bool(clip_sample, "clip_sample")
    clip_sample_range = check_real(clip_sample_range, "clip_sample_range", low=0.0, low_inclusive=False)
    batch, num_train = sample.shape[0], schedule.num_train_timesteps
    t = check_timesteps(timestep, "timestep", batch, device, num_train, allow_negative=False)
    if prev_timestep is None:
        prev = Timesteps(t.value - 1, None) if t.tensor is None else Timesteps(None, t.tensor - 1)
    else:
        prev = check_timesteps(prev_timestep, "prev_timestep", batch, device, num_train, allow_negative=True)
        _check_steps_backward(t, prev)
    impl = choose_impl(impl, "ddpm_step", _step_tensors(sample, model_output, noise, uncond_output))
    needs_noise = t.tensor is not None or t.value > 0
    if impl == "eager":
        if noise is None and needs_noise:
            noise = torch.randn(sample.shape, generator=generator, device=device, dtype=torch.float32)
        return ddpm_step_reference(model_output, t.as_tensor(batch, device), sample, schedule,
                                   prev.as_tensor(batch, device), noise if needs_noise else None, prediction_type,
                                   variance_type, clip_sample, clip_sample_range, uncond_output, guidance_scale)
    seed = draw_philox_seed(device, generator) if noise is None and needs_noise else None
    return torch.ops.genkernels.ddpm_step(
        model_output, sample, noise, seed,
        schedule.kernel_table(device), t.tensor, t.value or 0, prev.tensor, prev.value or 0, prediction_type,
        variance_type, clip_sample, clip_sample_range, uncond_output, float(guidance_scale))


def ddim_step(model_output: torch.Tensor, timestep, sample: torch.Tensor, schedule: NoiseSchedule, *,
              prev_timestep, eta: float = 0.0, noise: Optional[torch.Tensor] = None,
              generator: Optional[torch.Generator] = None, prediction_type: str = "epsilon",
              clip_sample: bool = False, clip_sample_range: float = 1.0, set_alpha_to_one: bool = True,
              use_clipped_model_output: bool = False, uncond_output: Optional[torch.Tensor] = None,
              guidance_scale: float = 1.0, impl: str = "auto") -> torch.Tensor:
    """One DDIM step ``x_t -> x_{prev_timestep}``, fused (diffusers' ``DDIMScheduler.step``; Song et al. 2021).

    sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    x_prev  = sqrt(a_prev) * x0 + sqrt(1 - a_prev - sigma_t^2) * eps + sigma_t * z

    ``eta = 0`` is the deterministic DDIM sampler (no noise drawn), ``eta = 1`` matches DDPM's variance.
    Gradients, dtypes and non-finite inputs as in :func:`ddpm_step` (the ``eps`` term of a final step to
    ``a_prev = 1`` and the noise where ``sigma_t = 0`` are left out).

    Args:
        model_output, timestep, sample, schedule, noise, generator, prediction_type, clip_sample,
        clip_sample_range, uncond_output, guidance_scale, impl: as in :func:`ddpm_step` (guidance combines the
        two predictions before ``x0`` and ``eps`` are derived).
        prev_timestep: the timestep to step to (required), below ``timestep``; negative means the final step,
            where ``a_prev`` is 1 (``set_alpha_to_one=True``) or ``alphas_cumprod[0]``.
        eta: weight of the stochastic part, in [0, 1].
        use_clipped_model_output: re-derive ``eps`` from the clipped ``x0``.

    Returns:
        ``x_prev`` with the shape and dtype of ``sample`` (math in fp32).
    """
    device = _check_step_tensors("ddim_step", model_output, sample, noise, uncond_output, schedule, generator)
    model_output, uncond_output, guidance_scale = _check_guidance(model_output, uncond_output, guidance_scale)
    check_choice(prediction_type, "prediction_type", PREDICTION_TYPES)
    eta = check_real(eta, "eta", low=0.0, high=1.0)
    check_bool(clip_sample, "clip_sample")
    check_bool(set_alpha_to_one, "set_alpha_to_one")
    check_bool(use_clipped_model_output, "use_clipped_model_output")
    clip_sample_range = check_real(clip_sample_range, "clip_sample_range", low=0.0, low_inclusive=False)
    batch, num_train = sample.shape[0], schedule.num_train_timesteps
    t = check_timesteps(timestep, "timestep", batch, device, num_train, allow_negative=False)
    prev = check_timesteps(prev_timestep, "prev_timestep", batch, device, num_train, allow_negative=True)
    _check_steps_backward(t, prev)
    if eta == 0:
        noise = None  # sigma is 0: the noise is not read
    impl = choose_impl(impl, "ddim_step", _step_tensors(sample, model_output, noise, uncond_output))
    if impl == "eager":
        if noise is None and eta > 0:
            noise = torch.randn(sample.shape, generator=generator, device=device, dtype=torch.float32)
        return ddim_step_reference(model_output, t.as_tensor(batch, device), sample, schedule,
                                   prev.as_tensor(batch, device), noise, eta, prediction_type, clip_sample,
                                   clip_sample_range, set_alpha_to_one, use_clipped_model_output, uncond_output,
                                   guidance_scale)
    seed = draw_philox_seed(device, generator) if noise is None and eta > 0 else None
    return torch.ops.genkernels.ddim_step(
        model_output, sample, noise, seed,
        schedule.kernel_table(device), t.tensor, t.value or 0, prev.tensor, prev.value or 0, eta, prediction_type,
        clip_sample, clip_sample_range, set_alpha_to_one, use_clipped_model_output, uncond_output,
        float(guidance_scale))
