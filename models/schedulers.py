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
from genkernels.kernels.checks import check_choice, check_int, check_real

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
        self.prediction_type = prediction_type
        self.clip_sample = clip_sample
        self.clip_sample_range = clip_sample_range
        self.timestep_spacing = check_choice(timestep_spacing, "timestep_spacing", TIMESTEP_SPACINGS)
        self.num_inference_steps = schedule.num_train_timesteps
        self.timesteps = torch.arange(schedule.num_train_timesteps - 1, -1, -1)

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
        else:
            timesteps = (torch.arange(num_train, 0, -num_train / steps).round() - 1).long()
        self.num_inference_steps = steps
        self.timesteps = timesteps.to(device) if device is not None else timesteps

    def previous_timestep(self, timestep):
        """The timestep a step from ``timestep`` lands on (negative past the end)."""
        return timestep - self.schedule.num_train_timesteps // self.num_inference_steps

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The forward process q(x_t | x_0): ``sqrt(a_t) * x0 + sqrt(1 - a_t) * noise`` per sample."""
        table = self.schedule.kernel_table(original_samples.device)
        view = (-1,) + (1,) * (original_samples.dim() - 1)
        t = torch.as_tensor(timesteps, device=original_samples.device).long().reshape(-1)
        sqrt_alpha = table[0, t].sqrt().reshape(view)
        sqrt_beta = table[1, t].sqrt().reshape(view)
        return (sqrt_alpha * original_samples.float() + sqrt_beta * noise.float()).to(original_samples.dtype)

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
        self.variance_type = variance_type

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
        self.set_alpha_to_one = set_alpha_to_one

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


def _as_host_int(timestep):
    """A loop's timestep as a Python int when it is one (or a CPU scalar tensor); device tensors stay tensors."""
    if isinstance(timestep, torch.Tensor) and timestep.device.type == "cpu" and timestep.numel() == 1:
        return int(timestep)
    return timestep
