"""Drop-in DDPM and DDIM schedulers for sampling loops, running the fused denoise step.

They follow diffusers' ``DDPMScheduler`` / ``DDIMScheduler`` interface (``set_timesteps``, ``timesteps``,
``step(model_output, timestep, sample, ...)``, ``add_noise``) and math, so a diffusers-style loop swaps them in:

    scheduler = DDIMScheduler(NoiseSchedule.linear())
    scheduler.set_timesteps(50)
    for t in scheduler.timesteps:
        sample = scheduler.step(unet(sample, t), t, sample).prev_sample

Every step is one :func:`genkernels.kernels.ddpm_step` / :func:`~genkernels.kernels.ddim_step` call; the
implementation follows :func:`genkernels.kernels.use_impl` like every other op.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from genkernels.kernels import NoiseSchedule, ddim_step, ddpm_step
from genkernels.kernels.checks import (
    check_bool,
    check_choice,
    check_float_like,
    check_float_tensor,
    check_in_range,
    check_int,
    check_real,
    check_values,
    describe,
)
from genkernels.kernels.diffusion import PREDICTION_TYPES, VARIANCE_TYPES, schedule_terms

TIMESTEP_SPACINGS = ("leading", "trailing")


@dataclasses.dataclass
class SchedulerOutput:
    prev_sample: torch.Tensor


class _Scheduler:
    def __init__(self, schedule: NoiseSchedule, prediction_type: str, clip_sample: bool, clip_sample_range: float,
                 timestep_spacing: str):
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        self.schedule = schedule
        self.prediction_type = check_choice(prediction_type, "prediction_type", PREDICTION_TYPES)
        self.clip_sample = check_bool(clip_sample, "clip_sample")
        self.clip_sample_range = check_real(clip_sample_range, "clip_sample_range", low=0.0, low_inclusive=False)
        self.timestep_spacing = check_choice(timestep_spacing, "timestep_spacing", TIMESTEP_SPACINGS)
        self.num_inference_steps = schedule.num_train_timesteps
        self.timesteps = torch.arange(schedule.num_train_timesteps - 1, -1, -1)
        self._timestep_list = self.timesteps.tolist()
        self._device_timesteps: dict[torch.device, torch.Tensor] = {}

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Choose ``num_inference_steps`` timesteps, descending: "leading" spacing ``[k * r, ..., r, 0]`` with
        ``r = T // num_inference_steps`` (diffusers' default), or "trailing" (``round(T - k * T / n) - 1``,
        ending at ``T - 1``)."""
        num_train = self.schedule.num_train_timesteps
        steps = check_int(num_inference_steps, "num_inference_steps")
        if not 1 <= steps <= num_train:
            raise ValueError(f"num_inference_steps={steps} must lie in [1, num_train_timesteps={num_train}]")
        if self.timestep_spacing == "leading":
            timesteps = torch.arange(steps - 1, -1, -1) * (num_train // steps)
        else:  # in float64, as diffusers' numpy arithmetic (float32 steps would round differently for large T)
            timesteps = (torch.arange(num_train, 0, -num_train / steps, dtype=torch.float64).round() - 1).long()
        self.num_inference_steps = steps
        self._timestep_list = timesteps.tolist()
        self._device_timesteps = {}
        self.timesteps = timesteps.to(device) if device is not None else timesteps

    def previous_timestep(self, timestep):
        """The timestep a step from ``timestep`` lands on (negative past the end)."""
        return timestep - self.schedule.num_train_timesteps // self.num_inference_steps

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """The forward process q(x_t | x_0): ``sqrt(a_t) * x0 + sqrt(1 - a_t) * noise`` per sample.

        ``timesteps``: integers in ``[0, num_train_timesteps)``, one per sample (``[batch]``) or one for all (an int
        or a one-element tensor); checked on the host for CPU tensors, by an asynchronous device assert on a GPU.
        Computes in fp32 (fp64 for fp64 samples) and returns the samples' dtype."""
        check_float_tensor(original_samples, "original_samples")
        if original_samples.dim() < 1:
            raise ValueError(f"original_samples must be [batch, ...]; got {describe(original_samples)}")
        check_float_like(noise, "noise", original_samples, "original_samples")
        t = _check_noise_timesteps(timesteps, original_samples, self.schedule.num_train_timesteps)
        sqrt_alpha, _, sqrt_beta, _ = (term.sqrt() for term in schedule_terms(self.schedule, original_samples, t, t,
                                                                             True))
        dtype = sqrt_alpha.dtype
        return (sqrt_alpha * original_samples.to(dtype) + sqrt_beta * noise.to(dtype)).to(original_samples.dtype)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """Identity (DDPM and DDIM do not rescale the model input); kept for interface compatibility."""
        return sample


class DDPMScheduler(_Scheduler):
    """Ancestral DDPM sampling (Ho et al. 2020) with the fused :func:`~genkernels.kernels.ddpm_step`."""

    def __init__(self, schedule: Optional[NoiseSchedule] = None, *, prediction_type: str = "epsilon",
                 variance_type: str = "fixed_small", clip_sample: bool = True, clip_sample_range: float = 1.0,
                 timestep_spacing: str = "leading"):
        super().__init__(schedule if schedule is not None else NoiseSchedule.linear(), prediction_type, clip_sample,
                         clip_sample_range, timestep_spacing)
        self.variance_type = check_choice(variance_type, "variance_type", VARIANCE_TYPES)

    def previous_timestep(self, timestep):
        """The timestep a step from ``timestep`` lands on: the next one of :attr:`timesteps` (-1 after the last),
        as diffusers' ``DDPMScheduler.previous_timestep``. For "leading" spacing that is ``timestep - T // n``;
        "trailing" timesteps are not evenly spaced when ``n`` does not divide ``T``, and are looked up.
        ``timestep`` must be one of :attr:`timesteps`; a device tensor is looked up on the device (no sync)."""
        timestep = _as_host_int(timestep)
        if self.timestep_spacing == "leading":
            prev = super().previous_timestep(timestep)
            return prev.clamp(min=-1) if isinstance(prev, torch.Tensor) else max(prev, -1)
        if isinstance(timestep, torch.Tensor):
            return self._device_previous_timestep(timestep)
        number = check_int(timestep, "timestep")
        listed = self._timestep_list
        if number not in listed:
            raise ValueError(f"timestep={number} is not one of the scheduler's {len(listed)} timesteps "
                             f"({listed[0]}, ..., {listed[-1]}); call set_timesteps() and step through timesteps")
        index = listed.index(number)
        return listed[index + 1] if index + 1 < len(listed) else -1

    def _device_previous_timestep(self, timestep: torch.Tensor) -> torch.Tensor:
        table = self._device_timesteps.get(timestep.device)
        if table is None:  # the list followed by -1 (the step after the last), once per device
            table = torch.tensor(self._timestep_list + [-1], dtype=torch.int64).to(timestep.device)
            self._device_timesteps[timestep.device] = table
        flat = timestep.reshape(-1).to(torch.int64)
        matches = table[:-1] == flat[:, None]
        check_values(flat, "timestep", matches.any(dim=1), "be one of the scheduler's timesteps")
        return table[matches.to(torch.int32).argmax(dim=1) + 1].reshape(timestep.shape)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, *, uncond_output: Optional[torch.Tensor] = None,
             guidance_scale: float = 1.0):
        """``x_t -> x_{t - T // num_inference_steps}``; returns ``SchedulerOutput(prev_sample)`` (or a tuple).
        With ``uncond_output``, classifier-free guidance ``uncond + guidance_scale * (model_output - uncond)`` is
        applied inside the fused step."""
        prev = self.previous_timestep(_as_host_int(timestep))
        prev_sample = ddpm_step(model_output, timestep, sample, self.schedule, prev_timestep=prev,
                                generator=generator, prediction_type=self.prediction_type,
                                variance_type=self.variance_type, clip_sample=self.clip_sample,
                                clip_sample_range=self.clip_sample_range, uncond_output=uncond_output,
                                guidance_scale=guidance_scale)
        return SchedulerOutput(prev_sample) if return_dict else (prev_sample,)


class DDIMScheduler(_Scheduler):
    """DDIM sampling (Song et al. 2021) with the fused :func:`~genkernels.kernels.ddim_step`."""

    def __init__(self, schedule: Optional[NoiseSchedule] = None, *, prediction_type: str = "epsilon",
                 clip_sample: bool = True, clip_sample_range: float = 1.0, set_alpha_to_one: bool = True,
                 timestep_spacing: str = "leading"):
        super().__init__(schedule if schedule is not None else NoiseSchedule.linear(), prediction_type, clip_sample,
                         clip_sample_range, timestep_spacing)
        self.set_alpha_to_one = check_bool(set_alpha_to_one, "set_alpha_to_one")

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise=None, return_dict: bool = True,
             *, uncond_output: Optional[torch.Tensor] = None, guidance_scale: float = 1.0):
        """``x_t -> x_{t - T // num_inference_steps}``; returns ``SchedulerOutput(prev_sample)`` (or a tuple).
        ``uncond_output``/``guidance_scale``: classifier-free guidance inside the fused step, as in DDPM's."""
        check_real(eta, "eta", low=0.0, high=1.0)
        prev = self.previous_timestep(_as_host_int(timestep))
        prev_sample = ddim_step(model_output, timestep, sample, self.schedule, prev_timestep=prev, eta=eta,
                                noise=variance_noise, generator=generator, prediction_type=self.prediction_type,
                                clip_sample=self.clip_sample, clip_sample_range=self.clip_sample_range,
                                set_alpha_to_one=self.set_alpha_to_one,
                                use_clipped_model_output=use_clipped_model_output, uncond_output=uncond_output,
                                guidance_scale=guidance_scale)
        return SchedulerOutput(prev_sample) if return_dict else (prev_sample,)


def _check_noise_timesteps(timesteps, samples: torch.Tensor, num_train: int) -> torch.Tensor:
    """``add_noise``'s timesteps as a ``[batch]`` or ``[1]`` int64 tensor on the samples' device, range-checked."""
    if isinstance(timesteps, torch.Tensor):
        tensor = timesteps
    elif isinstance(timesteps, bool) or not isinstance(timesteps, (int, list, tuple)):
        raise TypeError(f"timesteps must be an integer tensor, an int or a list of ints; got "
                        f"{type(timesteps).__name__} {timesteps!r}")
    else:
        tensor = torch.tensor(timesteps)
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise TypeError(f"timesteps must hold integers; got {describe(tensor)}")
    batch = samples.shape[0]
    if tensor.dim() > 1 or tensor.numel() not in (1, batch):
        raise ValueError(f"timesteps must be one timestep or one per sample ([batch] = [{batch}]); got "
                         f"{describe(tensor)}")
    tensor = tensor.reshape(-1).to(device=samples.device, dtype=torch.int64)
    check_in_range(tensor, "timesteps", 0, num_train)
    return tensor


def _as_host_int(timestep):
    """A loop's timestep as a Python int when it is one (or a CPU scalar tensor); device tensors stay tensors."""
    if isinstance(timestep, torch.Tensor) and timestep.device.type == "cpu" and timestep.numel() == 1:
        return int(timestep)
    return timestep
