"""Fused diffusion denoise step: the DDPM and DDIM reverse-process updates in one pass.

One Triton program handles a run of elements of one sample. It gathers that sample's schedule coefficients on
the device from its timestep (no host synchronization: a sampling loop can be captured in a CUDA graph), reads
``sample`` and ``model_output`` once, draws or reads the noise, and writes the previous sample once.

Notation (diffusers' names): ``alpha_prod_t`` = alpha-bar_t, the cumulative product of ``1 - beta``;
``beta_prod_t = 1 - alpha_prod_t``; ``x0`` is the predicted original sample; ``eps`` the predicted noise.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .checks import (
    check_bool,
    check_choice,
    check_float_like,
    check_float_tensor,
    check_generator,
    check_int,
    check_min_rank,
    check_real,
    check_same_device,
    check_tensor,
    describe,
)
from .launch import (
    NOISE_NONE,
    NOISE_PHILOX_BLOCK,
    NOISE_PHILOX_GATHER,
    NOISE_TENSOR,
    CompileVariant,
    SampleWalk,
    batch_chunks,
    draw_philox_seed,
    elementwise_block_configs,
)
from .runtime import compute_dtype, resolve_impl
from .triton_helpers import noise_values, sample_block, sample_offsets

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
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError(f"betas must lie in (0, 1]; got values in [{betas.min().item()}, {betas.max().item()}]")
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
        return cls(torch.linspace(beta_start, beta_end, num, dtype=torch.float64))

    @classmethod
    def scaled_linear(cls, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012):
        """Square roots of the betas evenly spaced (latent diffusion; diffusers' ``"scaled_linear"``)."""
        num = _check_num_timesteps(num_train_timesteps)
        return cls(torch.linspace(beta_start**0.5, beta_end**0.5, num, dtype=torch.float64) ** 2)

    @classmethod
    def cosine(cls, num_train_timesteps: int = 1000, max_beta: float = 0.999):
        """The cosine schedule of Nichol & Dhariwal 2021 (diffusers' ``"squaredcos_cap_v2"``):
        ``alpha_bar(s) = cos((s + 0.008) / 1.008 * pi / 2)^2`` and
        ``beta_i = min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta)``."""
        num = _check_num_timesteps(num_train_timesteps)

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


# ----------------------------------------------------------------------------------------------------------------
# Eager reference: the specification, the fallback and the test oracle
# ----------------------------------------------------------------------------------------------------------------
def _schedule_terms(schedule: NoiseSchedule, sample: torch.Tensor, timestep: torch.Tensor,
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
    ``model_output`` is the conditional prediction ``cond``; just ``model_output`` without ``uncond_output``."""
    if uncond_output is None:
        return model_output.to(dtype)
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
    alpha_prod_t, alpha_prod_t_prev, beta_prod_t, beta_prod_t_prev = _schedule_terms(
        schedule, sample, timestep, prev_timestep, True)
    x_t, model_output = sample.to(dtype), _guided_output(model_output, uncond_output, guidance_scale, dtype)
    x0, _ = _predict_original_and_noise(model_output, x_t, alpha_prod_t, beta_prod_t, prediction_type)
    if clip_sample:
        x0 = x0.clamp(-clip_sample_range, clip_sample_range)
    current_alpha_t = alpha_prod_t / alpha_prod_t_prev
    current_beta_t = _current_beta(alpha_prod_t, alpha_prod_t_prev, beta_prod_t, beta_prod_t_prev)
    mean = (alpha_prod_t_prev.sqrt() * current_beta_t / beta_prod_t * x0
            + current_alpha_t.sqrt() * beta_prod_t_prev / beta_prod_t * x_t)
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
    alpha_prod_t, alpha_prod_t_prev, beta_prod_t, beta_prod_t_prev = _schedule_terms(
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
    direction = (beta_prod_t_prev - std_dev_t**2).clamp(min=0).sqrt() * eps
    prev_sample = alpha_prod_t_prev.sqrt() * x0 + direction
    if eta > 0:
        prev_sample = prev_sample + std_dev_t * noise.to(dtype)
    return prev_sample.to(sample.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------------------
SCHEDULER_DDPM, SCHEDULER_DDIM = 0, 1
_PREDICTION_CODES = {name: code for code, name in enumerate(PREDICTION_TYPES)}


@triton.jit(do_not_specialize=["timestep_value", "prev_timestep_value", "eta", "clip_range", "guidance_scale"])
def _denoise_step_kernel(
    out_ptr, model_output_ptr, sample_ptr, noise_ptr, uncond_ptr, seed_ptr, table_ptr, timestep_ptr,
    prev_timestep_ptr,
    timestep_value, prev_timestep_value, timestep_stride, prev_timestep_stride, num_train_timesteps,
    batch_start, inner_numel, size1, size2, size3,
    out_sb, out_s0, out_s1, out_s2, out_s3,
    mo_sb, mo_s0, mo_s1, mo_s2, mo_s3,
    x_sb, x_s0, x_s1, x_s2, x_s3,
    z_sb, z_s0, z_s1, z_s2, z_s3,
    u_sb, u_s0, u_s1, u_s2, u_s3,
    index_s0, index_s1, index_s2, index_s3,
    eta, clip_range, guidance_scale,
    SCHEDULER: tl.constexpr, PREDICTION: tl.constexpr, FIXED_LARGE: tl.constexpr, CLIP: tl.constexpr,
    USE_CLIPPED_MODEL_OUTPUT: tl.constexpr, FINAL_ALPHA_IS_ONE: tl.constexpr, NOISE_MODE: tl.constexpr,
    TIMESTEP_IN_TENSOR: tl.constexpr, PREV_TIMESTEP_IN_TENSOR: tl.constexpr, INNER_CONTIGUOUS: tl.constexpr,
    GUIDANCE: tl.constexpr, BLOCK: tl.constexpr,
):
    batch_index, first, inner, mask = sample_block(batch_start, inner_numel, BLOCK)
    # The bulk loads go first so that their latency overlaps the dependent gathers of the schedule terms below.
    mo_offsets = sample_offsets(batch_index, inner, mo_sb, mo_s0, mo_s1, mo_s2, mo_s3, size1, size2, size3,
                                INNER_CONTIGUOUS)
    x_offsets = sample_offsets(batch_index, inner, x_sb, x_s0, x_s1, x_s2, x_s3, size1, size2, size3,
                               INNER_CONTIGUOUS)
    model_output = tl.load(model_output_ptr + mo_offsets, mask=mask, other=0.0).to(tl.float32)
    x_t = tl.load(sample_ptr + x_offsets, mask=mask, other=0.0).to(tl.float32)
    if GUIDANCE:  # classifier-free guidance: model_output holds the conditional prediction
        u_offsets = sample_offsets(batch_index, inner, u_sb, u_s0, u_s1, u_s2, u_s3, size1, size2, size3,
                                   INNER_CONTIGUOUS)
        uncond = tl.load(uncond_ptr + u_offsets, mask=mask, other=0.0).to(tl.float32)
        model_output = uncond + guidance_scale * (model_output - uncond)
    if NOISE_MODE == 1:
        z_offsets = sample_offsets(batch_index, inner, z_sb, z_s0, z_s1, z_s2, z_s3, size1, size2, size3,
                                   INNER_CONTIGUOUS)
        z = tl.load(noise_ptr + z_offsets, mask=mask, other=0.0).to(tl.float32)

    # --- this sample's schedule terms, gathered on the device --------------------------------------------------
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

    sqrt_alpha = tl.sqrt(alpha_prod_t)
    sqrt_beta = tl.sqrt(beta_prod_t)
    # x0 = x0_from_sample * x_t + x0_from_output * model_output, eps likewise (see _predict_original_and_noise)
    if PREDICTION == 0:  # epsilon
        x0_from_sample, x0_from_output = 1.0 / sqrt_alpha, -sqrt_beta / sqrt_alpha
        eps_from_sample, eps_from_output = 0.0, 1.0
    elif PREDICTION == 1:  # sample
        x0_from_sample, x0_from_output = 0.0, 1.0
        eps_from_sample, eps_from_output = 1.0 / sqrt_beta, -sqrt_alpha / sqrt_beta
    else:  # v_prediction
        x0_from_sample, x0_from_output = sqrt_alpha, -sqrt_beta
        eps_from_sample, eps_from_output = sqrt_beta, sqrt_alpha
    # 1 - a_t / a_prev, without cancellation (see _current_beta)
    current_beta = tl.where(alpha_prod_prev > 0.5, (beta_prod_t - beta_prod_prev) / alpha_prod_prev,
                            1.0 - alpha_prod_t / alpha_prod_prev)
    # x_prev = coef_x0 * x0 + coef_sample * x_t + coef_eps * eps + sigma * z
    if SCHEDULER == 0:  # DDPM
        coef_x0 = tl.sqrt(alpha_prod_prev) * current_beta / beta_prod_t
        coef_sample = tl.sqrt(alpha_prod_t / alpha_prod_prev) * beta_prod_prev / beta_prod_t
        coef_eps = 0.0
        if FIXED_LARGE:
            variance = current_beta
        else:
            variance = tl.maximum(beta_prod_prev / beta_prod_t * current_beta, 1e-20)
        sigma = tl.where(t > 0, tl.sqrt(variance), 0.0)
    else:  # DDIM
        std_dev = eta * tl.sqrt(beta_prod_prev / beta_prod_t * current_beta)
        coef_x0 = tl.sqrt(alpha_prod_prev)
        coef_sample = 0.0
        coef_eps = tl.sqrt(tl.maximum(beta_prod_prev - std_dev * std_dev, 0.0))
        sigma = std_dev

    # --- the elementwise update --------------------------------------------------------------------------------
    x0 = x0_from_sample * x_t + x0_from_output * model_output
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -clip_range), clip_range)
    if USE_CLIPPED_MODEL_OUTPUT:
        eps = (x_t - sqrt_alpha * x0) / sqrt_beta
    else:
        eps = eps_from_sample * x_t + eps_from_output * model_output
    prev_sample = coef_x0 * x0 + coef_sample * x_t + coef_eps * eps
    if NOISE_MODE == 1:
        if sigma != 0.0:
            prev_sample += sigma * z
    elif NOISE_MODE != 0:  # drawn with Philox, keyed by the row-major index
        if sigma != 0.0:
            prev_sample += sigma * noise_values(noise_ptr, seed_ptr, batch_index, first, inner, mask, z_sb, z_s0,
                                                z_s1, z_s2, z_s3, index_s0, index_s1, index_s2, index_s3, size1,
                                                size2, size3, NOISE_MODE, INNER_CONTIGUOUS, BLOCK)
    out_offsets = sample_offsets(batch_index, inner, out_sb, out_s0, out_s1, out_s2, out_s3, size1, size2, size3,
                                 INNER_CONTIGUOUS)
    tl.store(out_ptr + out_offsets, prev_sample.to(out_ptr.dtype.element_ty), mask=mask)


def _launch_denoise_step(scheduler: int, model_output, sample, noise, seed, table, timestep, timestep_value,
                         prev_timestep, prev_timestep_value, prediction_type, variance_type, eta, clip_sample,
                         clip_sample_range, use_clipped_model_output, set_alpha_to_one, uncond_output,
                         guidance_scale) -> torch.Tensor:
    out = torch.empty_like(sample)
    if out.numel() == 0:
        return out
    noise_source = "tensor" if noise is not None else ("drawn" if seed is not None else None)
    walk = SampleWalk({"out": out, "model_output": model_output, "sample": sample, "noise": noise,
                       "uncond": uncond_output}, ("out",), noise_source)
    layout, tensors = walk.layout, walk.tensors
    placeholder = tensors["sample"]  # stands in for pointers a constexpr branch never reads
    for start, count in batch_chunks(layout.batch):
        _denoise_step_kernel[(walk.num_blocks, count)](
            tensors["out"], tensors["model_output"], tensors["sample"],
            walk.tensor("noise", placeholder), walk.tensor("uncond", placeholder),
            seed if seed is not None else table,
            table,
            timestep if timestep is not None else table,
            prev_timestep if prev_timestep is not None else table,
            timestep_value, prev_timestep_value,
            _batch_stride(timestep), _batch_stride(prev_timestep), table.shape[1],
            start, layout.inner_numel, *layout.inner_sizes[1:],
            *walk.strides("out"), *walk.strides("model_output"), *walk.strides("sample"),
            *walk.strides("noise"), *walk.strides("uncond"), *walk.index_strides,
            eta, clip_sample_range, guidance_scale,
            SCHEDULER=scheduler, PREDICTION=_PREDICTION_CODES[prediction_type],
            FIXED_LARGE=variance_type == "fixed_large", CLIP=clip_sample,
            USE_CLIPPED_MODEL_OUTPUT=use_clipped_model_output, FINAL_ALPHA_IS_ONE=set_alpha_to_one,
            NOISE_MODE=walk.noise_mode, TIMESTEP_IN_TENSOR=timestep is not None,
            PREV_TIMESTEP_IN_TENSOR=prev_timestep is not None, INNER_CONTIGUOUS=layout.inner_contiguous,
            GUIDANCE=uncond_output is not None, BLOCK=walk.block, num_warps=walk.num_warps,
        )
    return walk.output("out")


def compile_variants() -> list[CompileVariant]:
    """Every block config the launcher can pick, each data dtype, and each constexpr switch at least once."""
    base = dict(SCHEDULER=SCHEDULER_DDPM, PREDICTION=0, FIXED_LARGE=False, CLIP=False, USE_CLIPPED_MODEL_OUTPUT=False,
                FINAL_ALPHA_IS_ONE=True, NOISE_MODE=NOISE_PHILOX_BLOCK, TIMESTEP_IN_TENSOR=False,
                PREV_TIMESTEP_IN_TENSOR=False, INNER_CONTIGUOUS=True, GUIDANCE=False)
    switches = [
        dict(SCHEDULER=SCHEDULER_DDIM, CLIP=True, USE_CLIPPED_MODEL_OUTPUT=True, FINAL_ALPHA_IS_ONE=False),
        dict(PREDICTION=1, FIXED_LARGE=True, NOISE_MODE=NOISE_TENSOR, TIMESTEP_IN_TENSOR=True,
             PREV_TIMESTEP_IN_TENSOR=True, INNER_CONTIGUOUS=False),
        dict(SCHEDULER=SCHEDULER_DDIM, PREDICTION=2, NOISE_MODE=NOISE_NONE, CLIP=True, GUIDANCE=True),
        dict(GUIDANCE=True, INNER_CONTIGUOUS=False, NOISE_MODE=NOISE_PHILOX_GATHER),
    ]
    scalars = {"eta": "fp32", "clip_range": "fp32", "guidance_scale": "fp32"}
    index_pointers = {"seed_ptr": "*i64", "table_ptr": "*fp32", "timestep_ptr": "*i64", "prev_timestep_ptr": "*i64"}
    configs = elementwise_block_configs()
    variants = []
    for data_type in ("fp32", "fp16", "bf16"):
        block, num_warps = configs[-1]
        variants.append(CompileVariant(_denoise_step_kernel, {"*": f"*{data_type}", **index_pointers},
                                       dict(base, BLOCK=block), num_warps, scalars))
    for block, num_warps in configs[:-1]:
        variants.append(CompileVariant(_denoise_step_kernel, {"*": "*fp32", **index_pointers},
                                       dict(base, BLOCK=block), num_warps, scalars))
    for switch in switches:
        block, num_warps = configs[-1]
        variants.append(CompileVariant(_denoise_step_kernel, {"*": "*bf16", **index_pointers},
                                       dict(base, BLOCK=block, **switch), num_warps, scalars))
    return variants


def _batch_stride(timestep: Optional[torch.Tensor]) -> int:
    """Stride between samples' timesteps: 0 for one timestep shared by the whole batch."""
    if timestep is None or timestep.dim() == 0 or timestep.numel() == 1:
        return 0
    return timestep.stride(0)


# ----------------------------------------------------------------------------------------------------------------
# torch.library registration (usable under torch.compile(fullgraph=True))
# ----------------------------------------------------------------------------------------------------------------
def _ddpm_step_launch(model_output: torch.Tensor, sample: torch.Tensor, noise: Optional[torch.Tensor],
                  seed: Optional[torch.Tensor], table: torch.Tensor, timestep: Optional[torch.Tensor],
                  timestep_value: int, prev_timestep: Optional[torch.Tensor], prev_timestep_value: int,
                  prediction_type: str, variance_type: str, clip_sample: bool, clip_sample_range: float,
                  uncond_output: Optional[torch.Tensor], guidance_scale: float) -> torch.Tensor:
    return _launch_denoise_step(SCHEDULER_DDPM, model_output, sample, noise, seed, table, timestep, timestep_value,
                                prev_timestep, prev_timestep_value, prediction_type, variance_type, 0.0,
                                clip_sample, clip_sample_range, False, True, uncond_output, guidance_scale)


def _ddim_step_launch(model_output: torch.Tensor, sample: torch.Tensor, noise: Optional[torch.Tensor],
                  seed: Optional[torch.Tensor], table: torch.Tensor, timestep: Optional[torch.Tensor],
                  timestep_value: int, prev_timestep: Optional[torch.Tensor], prev_timestep_value: int,
                  eta: float, prediction_type: str, clip_sample: bool, clip_sample_range: float,
                  set_alpha_to_one: bool, use_clipped_model_output: bool, uncond_output: Optional[torch.Tensor],
                  guidance_scale: float) -> torch.Tensor:
    return _launch_denoise_step(SCHEDULER_DDIM, model_output, sample, noise, seed, table, timestep, timestep_value,
                                prev_timestep, prev_timestep_value, prediction_type, "fixed_small", eta,
                                clip_sample, clip_sample_range, use_clipped_model_output, set_alpha_to_one,
                                uncond_output, guidance_scale)


_ddpm_step_op = torch.library.custom_op("genkernels::ddpm_step", _ddpm_step_launch, mutates_args=())
_ddim_step_op = torch.library.custom_op("genkernels::ddim_step", _ddim_step_launch, mutates_args=())


@_ddpm_step_op.register_fake
def _ddpm_step_fake(model_output, sample, *args):
    return torch.empty_like(sample)


@_ddim_step_op.register_fake
def _ddim_step_fake(model_output, sample, *args):
    return torch.empty_like(sample)


# ----------------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------------
class _Timesteps:
    """A timestep argument normalized for dispatch: a Python int, or an integer tensor of shape [] or [batch]."""

    def __init__(self, value: int | None, tensor: torch.Tensor | None):
        self.value = value
        self.tensor = tensor

    def as_tensor(self, batch: int, device: torch.device) -> torch.Tensor:
        """``[batch]`` int64 on ``device`` (made with a fill kernel, never a host-to-device copy)."""
        if self.tensor is None:
            return torch.full((batch,), self.value, dtype=torch.int64, device=device)
        return self.tensor.to(torch.int64).reshape(-1).expand(batch)


def _check_timesteps(value: object, name: str, batch: int, device: torch.device, num_train: int,
                     allow_negative: bool) -> _Timesteps:
    """Validate a timestep argument. Python ints and CPU tensors are checked on the host (``ValueError``); for a
    tensor on the GPU a host check would synchronize the stream, so its range is asserted asynchronously
    (a device-side error at the next synchronization) and the kernel clamps its gathers to the table."""
    low = "-inf" if allow_negative else "0"
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name} must be an int or an integer tensor; got {describe(value)}")
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] not in (1, batch)):
            raise ValueError(f"{name} must be a scalar or have shape [batch] = [{batch}]; got {describe(value)}")
        if value.device != device and not (value.device.type == "cpu" and value.dim() == 0):
            raise ValueError(f"{name} must be on the device of sample ({device}); got {describe(value)}")
        if value.device.type == "cpu" and value.dim() == 0:
            return _check_timesteps(int(value), name, batch, device, num_train, allow_negative)
        in_range = (value < num_train) if allow_negative else ((value >= 0) & (value < num_train))
        if value.device.type == "cpu" and not torch.compiler.is_compiling():
            if not bool(in_range.all()):
                bad = value[~in_range].reshape(-1)[0].item()
                raise ValueError(f"{name} must lie in [{low}, {num_train}); got a value {bad} in {describe(value)}")
        else:
            torch._assert_async(in_range.all(), f"{name} out of range [{low}, {num_train})")
        return _Timesteps(None, value.to(torch.int64))
    number = check_int(value, name)
    if number >= num_train or (number < 0 and not allow_negative):
        raise ValueError(f"{name}={number} must lie in [{low}, {num_train})")
    return _Timesteps(number, None)


def _check_steps_backward(t: _Timesteps, prev: _Timesteps) -> None:
    """Require ``prev_timestep < timestep`` (a step forward in time has a negative variance). Checked on the host
    where both are known there, else asserted asynchronously like the range check."""
    if t.tensor is None and prev.tensor is None:
        if prev.value >= t.value:
            raise ValueError(f"prev_timestep={prev.value} must be smaller than timestep={t.value}")
        return
    current = t.tensor if t.tensor is not None else t.value
    previous = prev.tensor if prev.tensor is not None else prev.value
    ordered = torch.as_tensor(previous < current)
    device = ordered.device
    if device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ordered.all()):
            raise ValueError(f"prev_timestep must be smaller than timestep for every sample; got timestep "
                             f"{_show(current)} and prev_timestep {_show(previous)}")
    else:
        torch._assert_async(ordered.all(), "prev_timestep must be smaller than timestep")


def _show(value) -> str:
    return str(value.tolist()) if isinstance(value, torch.Tensor) else str(value)


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


def _check_guidance(uncond_output: Optional[torch.Tensor], guidance_scale: object) -> Optional[torch.Tensor]:
    """Validate the guidance arguments; return the unconditional output the step must read (None when the
    guided output is just ``model_output``: no ``uncond_output``, or a scale of exactly 1)."""
    scale = check_real(guidance_scale, "guidance_scale")
    if uncond_output is None:
        if scale != 1.0:
            raise ValueError(f"guidance_scale={guidance_scale!r} needs uncond_output (the unconditional "
                             "prediction); pass it, or leave guidance_scale at 1.0")
        return None
    return uncond_output if scale != 1.0 else None


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

    Args:
        model_output: the network's prediction, shape of ``sample``.
        timestep: current timestep, a Python int or an integer tensor of shape ``[]`` or ``[batch]``.
        sample: the current sample ``x_t``, ``[batch, ...]``, fp32/fp16/bf16, any strides.
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
        guidance_scale: the guidance weight ``w``; 1 means no guidance (``uncond_output`` is not read).
        impl: "auto", "triton" or "eager".

    Returns:
        ``x_prev`` with the shape and dtype of ``sample`` (math in fp32).
    """
    device = _check_step_tensors("ddpm_step", model_output, sample, noise, uncond_output, schedule, generator)
    uncond_output = _check_guidance(uncond_output, guidance_scale)
    check_choice(prediction_type, "prediction_type", PREDICTION_TYPES)
    check_choice(variance_type, "variance_type", VARIANCE_TYPES)
    check_bool(clip_sample, "clip_sample")
    clip_sample_range = check_real(clip_sample_range, "clip_sample_range", low=0.0, low_inclusive=False)
    batch, num_train = sample.shape[0], schedule.num_train_timesteps
    t = _check_timesteps(timestep, "timestep", batch, device, num_train, allow_negative=False)
    if prev_timestep is None:
        prev = _Timesteps(t.value - 1, None) if t.tensor is None else _Timesteps(None, t.tensor - 1)
    else:
        prev = _check_timesteps(prev_timestep, "prev_timestep", batch, device, num_train, allow_negative=True)
        _check_steps_backward(t, prev)
    impl = resolve_impl(impl, device, "ddpm_step")
    if sample.numel() == 0:
        return torch.empty_like(sample)
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
    uncond_output = _check_guidance(uncond_output, guidance_scale)
    check_choice(prediction_type, "prediction_type", PREDICTION_TYPES)
    eta = check_real(eta, "eta", low=0.0, high=1.0)
    check_bool(clip_sample, "clip_sample")
    check_bool(set_alpha_to_one, "set_alpha_to_one")
    check_bool(use_clipped_model_output, "use_clipped_model_output")
    clip_sample_range = check_real(clip_sample_range, "clip_sample_range", low=0.0, low_inclusive=False)
    batch, num_train = sample.shape[0], schedule.num_train_timesteps
    t = _check_timesteps(timestep, "timestep", batch, device, num_train, allow_negative=False)
    prev = _check_timesteps(prev_timestep, "prev_timestep", batch, device, num_train, allow_negative=True)
    _check_steps_backward(t, prev)
    impl = resolve_impl(impl, device, "ddim_step")
    if sample.numel() == 0:
        return torch.empty_like(sample)
    if impl == "eager":
        if noise is None and eta > 0:
            noise = torch.randn(sample.shape, generator=generator, device=device, dtype=torch.float32)
        return ddim_step_reference(model_output, t.as_tensor(batch, device), sample, schedule,
                                   prev.as_tensor(batch, device), noise, eta, prediction_type, clip_sample,
                                   clip_sample_range, set_alpha_to_one, use_clipped_model_output, uncond_output,
                                   guidance_scale)
    seed = draw_philox_seed(device, generator) if noise is None and eta > 0 else None
    if eta == 0:
        noise = None
    return torch.ops.genkernels.ddim_step(
        model_output, sample, noise, seed,
        schedule.kernel_table(device), t.tensor, t.value or 0, prev.tensor, prev.value or 0, eta, prediction_type,
        clip_sample, clip_sample_range, set_alpha_to_one, use_clipped_model_output, uncond_output,
        float(guidance_scale))
