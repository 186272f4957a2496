"""Drop-in DDPM and DDIM schedulers for sampling loops, running the fused denoise step.

They take diffusers' ``DDPMScheduler`` / ``DDIMScheduler`` configuration (the same keys, defaults and meaning) and
follow their interface (``config``, ``from_config``, ``save_config`` / ``from_pretrained`` of a local folder,
``set_timesteps``, ``timesteps``, ``step(model_output, timestep, sample, ...)`` returning ``prev_sample`` and
``pred_original_sample``, ``scale_model_input``, ``add_noise``, ``order``, ``init_noise_sigma``) and math, so a
diffusers loop or pipeline swaps them in::

    scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)   # or DDIMScheduler(NoiseSchedule.linear())
    pipeline.scheduler = scheduler                                      # diffusers.DDIMPipeline / DDPMPipeline
    scheduler.set_timesteps(50)
    for t in scheduler.timesteps:
        sample = scheduler.step(unet(sample, t).sample, t, sample).prev_sample

Every step is one :func:`genkernels.kernels.ddpm_step` / :func:`~genkernels.kernels.ddim_step` call (the
implementation follows :func:`genkernels.kernels.use_impl` like every other op), except where an option is one the
fused kernels do not have; :meth:`DDPMScheduler.fused_step_reasons` lists those:

* ``thresholding`` (dynamic thresholding, Saharia et al. 2022) needs a per-sample quantile of the predicted ``x0``:
  that ``x0`` is computed and thresholded in PyTorch, then the DDPM step (and the DDIM step with
  ``use_clipped_model_output=True``) runs fused from it (the kernels' ``prediction_type="sample"`` reads ``x0``);
  DDIM's step with the unclipped noise estimate runs in PyTorch.
* ``variance_type="learned"`` / ``"learned_range"`` (a per-element variance predicted by the network) runs in
  PyTorch.

The noise of a step is drawn as diffusers draws it (``torch.randn`` of ``model_output``'s shape and dtype from
``generator``, a list of per-sample generators included), so a loop gives diffusers' samples for the same
generator. ``in_kernel_noise=True`` draws it inside the fused kernel instead (Philox, no noise tensor in memory;
different numbers).

``pred_original_sample`` of a fused step is computed when first read (a diffusers pipeline never reads it, and the
fused step does not write it): read it before modifying the step's inputs in place.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any, Mapping, Optional, Sequence

import numpy as np
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
from genkernels.kernels.diffusion import PREDICTION_TYPES, schedule_terms
from genkernels.kernels.runtime import compute_dtype

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
DDPM_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")
DDIM_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
DDPM_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned",
                       "learned_range")
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")
CONFIG_NAME = "scheduler_config.json"
# diffusers clamps the DDPM posterior variance from below before its logarithm / square root.
MIN_VARIANCE = 1e-20

# The configuration keys, in diffusers' order, with diffusers' defaults.
_COMMON_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                        trained_betas=None)
DDPM_CONFIG_DEFAULTS = dict(
    **_COMMON_DEFAULTS, variance_type="fixed_small", clip_sample=True, prediction_type="epsilon",
    thresholding=False, dynamic_thresholding_ratio=0.995, clip_sample_range=1.0, sample_max_value=1.0,
    timestep_spacing="leading", steps_offset=0, rescale_betas_zero_snr=False)
DDIM_CONFIG_DEFAULTS = dict(
    **_COMMON_DEFAULTS, clip_sample=True, set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon",
    thresholding=False, dynamic_thresholding_ratio=0.995, clip_sample_range=1.0, sample_max_value=1.0,
    timestep_spacing="leading", rescale_betas_zero_snr=False)


class FrozenConfig(dict):
    """A scheduler's configuration: a read-only ``dict`` whose keys are also attributes (``config.prediction_type``),
    as diffusers' ``FrozenDict`` (a ``dict``, so diffusers' ``from_config`` takes it)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"the scheduler config has no key {name!r}; keys: {', '.join(self)}") from None

    def _frozen(self, *args, **kwargs):
        raise TypeError("a scheduler's config is read-only; build a new scheduler with "
                        "Scheduler.from_config(config, key=value)")

    __setattr__ = __setitem__ = __delitem__ = __delattr__ = _frozen
    update = pop = popitem = setdefault = clear = _frozen

    def __reduce__(self):
        return (FrozenConfig, (dict(self),))

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return FrozenConfig(dict(self))


class SchedulerOutput:
    """A step's result, as diffusers' ``DDPMSchedulerOutput`` / ``DDIMSchedulerOutput``: ``prev_sample`` (the
    next loop input) and ``pred_original_sample`` (the predicted ``x0``, clipped or thresholded as the step used
    it). Indexing works too: ``output[0]``, ``output["prev_sample"]``, ``output.to_tuple()``.

    A fused step leaves ``pred_original_sample`` to be computed on first read from the step's inputs; modifying
    those in place before that read raises an error rather than returning a wrong ``x0``."""

    _fields = ("prev_sample", "pred_original_sample")

    def __init__(self, prev_sample: torch.Tensor, pred_original_sample: Optional[torch.Tensor] = None, *,
                 compute_original=None, inputs: Sequence[Optional[torch.Tensor]] = ()):
        self.prev_sample = prev_sample
        self._pred_original_sample = pred_original_sample
        self._compute_original = compute_original
        lazy = compute_original is not None and not torch.compiler.is_compiling()
        self._inputs = [(t, t._version) for t in inputs if t is not None] if lazy else []

    @property
    def pred_original_sample(self) -> Optional[torch.Tensor]:
        if self._compute_original is not None:
            for tensor, version in self._inputs:
                if tensor._version != version:
                    raise RuntimeError(
                        "pred_original_sample is computed from the step's inputs when first read, and an input "
                        f"({describe(tensor)}) was modified in place after the step; read pred_original_sample "
                        "before modifying model_output or sample in place")
            self._pred_original_sample = self._compute_original()
            self._compute_original, self._inputs = None, []
        return self._pred_original_sample

    def to_tuple(self) -> tuple:
        return (self.prev_sample, self.pred_original_sample)

    def keys(self):
        return list(self._fields)

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self._fields:
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __len__(self) -> int:
        return len(self._fields)

    def __repr__(self) -> str:
        pending = " (pred_original_sample not computed yet)" if self._compute_original is not None else ""
        return f"SchedulerOutput(prev_sample={describe(self.prev_sample)}){pending}"


# ----------------------------------------------------------------------------------------------------------------
# Betas from a configuration, as diffusers builds them
# ----------------------------------------------------------------------------------------------------------------
def _alpha_bar_betas(num: int, kind: str, max_beta: float = 0.999) -> torch.Tensor:
    """diffusers' ``betas_for_alpha_bar`` (Python floats, rounded to float32 as diffusers does)."""
    if kind == "cosine":
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    else:  # "laplace"
        def alpha_bar(t):
            lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
            snr = math.exp(lmb)
            return math.sqrt(snr / (1 + snr))
    betas = [min(1 - alpha_bar((i + 1) / num) / alpha_bar(i / num), max_beta) for i in range(num)]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas rescaled to a zero terminal SNR (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps
    are Flawed", Algorithm 1): ``sqrt(alpha_bar)`` is shifted so that its last value is 0 and scaled so that its
    first is unchanged. Computed in float64; the last beta becomes 1 (``alpha_bar_T = 0``)."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas.to(torch.float64), dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def _config_betas(config: Mapping[str, Any]) -> torch.Tensor:
    """The betas a diffusers scheduler with this configuration uses, in float64: the named schedules are computed
    as diffusers computes them (in float32) and widened; ``trained_betas`` are taken as given (float64)."""
    num = config["num_train_timesteps"]
    trained = config["trained_betas"]
    if trained is not None:
        betas = torch.tensor(trained, dtype=torch.float64)
        if betas.dim() != 1 or betas.numel() != num:
            raise ValueError(f"trained_betas must be a list of num_train_timesteps={num} numbers; got "
                             f"{describe(betas)}")
        return betas
    start, end, name = config["beta_start"], config["beta_end"], config["beta_schedule"]
    if name == "linear":
        betas = torch.linspace(start, end, num, dtype=torch.float32)
    elif name == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, num, dtype=torch.float32) ** 2
    elif name == "squaredcos_cap_v2":
        betas = _alpha_bar_betas(num, "cosine")
    elif name == "laplace":
        betas = _alpha_bar_betas(num, "laplace")
    else:  # "sigmoid"
        betas = torch.sigmoid(torch.linspace(-6, 6, num)) * (end - start) + start
    return betas.to(torch.float64)


def _check_trained_betas(value: object) -> Optional[list]:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().tolist()
    elif isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise TypeError(f"trained_betas must be None or a 1-D list of numbers; got {type(value).__name__}")
    return [float(v) for v in value]


# ----------------------------------------------------------------------------------------------------------------
# The shared scheduler
# ----------------------------------------------------------------------------------------------------------------
class _Scheduler:
    config_name = CONFIG_NAME
    order = 1
    init_noise_sigma = 1.0
    _defaults: dict = {}
    _beta_schedules: tuple = ()

    def _setup(self, schedule: Optional[NoiseSchedule], options: dict, in_kernel_noise: bool) -> None:
        config = dict(options)
        config["num_train_timesteps"] = check_int(config["num_train_timesteps"], "num_train_timesteps", low=1)
        config["beta_start"] = check_real(config["beta_start"], "beta_start", low=0.0, high=1.0)
        config["beta_end"] = check_real(config["beta_end"], "beta_end", low=0.0, high=1.0)
        config["beta_schedule"] = check_choice(config["beta_schedule"], "beta_schedule", self._beta_schedules)
        config["trained_betas"] = _check_trained_betas(config["trained_betas"])
        config["prediction_type"] = check_choice(config["prediction_type"], "prediction_type", PREDICTION_TYPES)
        for key in ("clip_sample", "thresholding", "rescale_betas_zero_snr"):
            config[key] = check_bool(config[key], key)
        config["clip_sample_range"] = check_real(config["clip_sample_range"], "clip_sample_range", low=0.0,
                                                 low_inclusive=False)
        config["dynamic_thresholding_ratio"] = check_real(config["dynamic_thresholding_ratio"],
                                                          "dynamic_thresholding_ratio", low=0.0, high=1.0)
        config["sample_max_value"] = check_real(config["sample_max_value"], "sample_max_value", low=0.0,
                                                low_inclusive=False)
        config["timestep_spacing"] = check_choice(config["timestep_spacing"], "timestep_spacing",
                                                  TIMESTEP_SPACINGS)
        config["steps_offset"] = check_int(config["steps_offset"], "steps_offset", low=0)
        if schedule is not None:
            if not isinstance(schedule, NoiseSchedule):
                hint = "; pass num_train_timesteps= by keyword" if isinstance(schedule, int) else ""
                raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}{hint}")
            given = [key for key in _COMMON_DEFAULTS if config[key] != _COMMON_DEFAULTS[key]
                     and key != "num_train_timesteps"]
            if given or config["num_train_timesteps"] not in (1000, schedule.num_train_timesteps):
                raise ValueError(f"pass either schedule or the beta keys (num_train_timesteps, beta_start, "
                                 f"beta_end, beta_schedule, trained_betas), not both; got schedule and "
                                 f"{', '.join(given) or 'num_train_timesteps'}")
            if schedule.device.type == "meta":
                raise ValueError("schedule must hold values (it is on the meta device)")
            config["num_train_timesteps"] = schedule.num_train_timesteps
            config["trained_betas"] = schedule.betas.cpu().tolist()
            betas = schedule.betas
        else:
            betas = _config_betas(config)
        if config["rescale_betas_zero_snr"]:
            betas = rescale_zero_terminal_snr(betas.cpu()).to(betas.device)
            schedule = NoiseSchedule(betas)
        elif schedule is None:
            schedule = NoiseSchedule(betas)
        self._config = FrozenConfig({key: config[key] for key in self._defaults})
        self.schedule = schedule
        self.in_kernel_noise = check_bool(in_kernel_noise, "in_kernel_noise")
        self.custom_timesteps = False
        self.num_inference_steps: Optional[int] = None
        self._set_timestep_list(list(range(schedule.num_train_timesteps - 1, -1, -1)), None)

    # -- configuration ----------------------------------------------------------------------------------------
    @property
    def config(self) -> FrozenConfig:
        """The diffusers configuration of this scheduler (read-only; keys are also attributes)."""
        return self._config

    @classmethod
    def from_config(cls, config: Mapping[str, Any] = None, **kwargs):
        """A scheduler from a diffusers scheduler configuration (``diffusers_scheduler.config``, our ``config``,
        a plain dict, or a diffusers scheduler itself); ``kwargs`` override keys. Keys starting with ``_``, keys
        diffusers marked as defaults (``_use_default_values``) and the other scheduler's keys (DDPM's
        ``variance_type`` for DDIM, DDIM's ``set_alpha_to_one`` for DDPM) are ignored, as diffusers does; other
        unknown keys are ignored with a warning."""
        if config is not None and not isinstance(config, Mapping) and isinstance(
                getattr(config, "config", None), Mapping):
            config = config.config
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a mapping (a scheduler's .config or a dict); got "
                            f"{type(config).__name__}")
        used_defaults = set(config.get("_use_default_values", ()) or ())
        known = set(DDPM_CONFIG_DEFAULTS) | set(DDIM_CONFIG_DEFAULTS)
        options, unknown = {}, []
        for key, value in config.items():
            if not isinstance(key, str) or key.startswith("_") or key in used_defaults:
                continue
            if key in cls._defaults:
                options[key] = value
            elif key not in known:
                unknown.append(key)
        if unknown:
            warnings.warn(f"{cls.__name__}.from_config ignores the config keys {sorted(unknown)} (not "
                          f"{cls.__name__} options)", stacklevel=2)
        for key in kwargs:
            if key not in cls._defaults and key != "in_kernel_noise":
                raise TypeError(f"{cls.__name__}.from_config got an unknown option {key!r}; options: "
                                f"{', '.join(cls._defaults)}, in_kernel_noise")
        return cls(**{**options, **kwargs})

    def save_config(self, save_directory) -> str:
        """Write ``scheduler_config.json`` (diffusers' layout: the config, ``_class_name``) into
        ``save_directory`` (created if needed); return the file's path. diffusers' ``from_pretrained`` reads it."""
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory={save_directory!r} is a file; expected a directory")
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        payload = {**self.config, "_class_name": type(self).__name__}
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load_config(cls, pretrained_model_name_or_path, subfolder: Optional[str] = None) -> dict:
        """The configuration dict in ``<path>[/<subfolder>]/scheduler_config.json`` (a local folder)."""
        folder = os.fspath(pretrained_model_name_or_path)
        if subfolder is not None:
            folder = os.path.join(folder, subfolder)
        path = os.path.join(folder, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"pretrained_model_name_or_path: no {CONFIG_NAME} in {folder!r}; {cls.__name__}.from_pretrained "
                f"reads local folders only (for a Hub id: {cls.__name__}.from_config("
                f"diffusers.{cls.__name__}.load_config(repo_id, subfolder='scheduler')))")
        with open(path, encoding="utf-8") as handle:
            try:
                config = json.load(handle)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} is not valid JSON: {error}") from None
        if not isinstance(config, dict):
            raise ValueError(f"{path} must hold a JSON object; got {type(config).__name__}")
        return config

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: Optional[str] = None, **kwargs):
        """A scheduler from a local folder holding ``scheduler_config.json`` (written by :meth:`save_config` or by
        diffusers' ``save_config`` / ``save_pretrained``; a pipeline folder with ``subfolder="scheduler"``)."""
        return cls.from_config(cls.load_config(pretrained_model_name_or_path, subfolder), **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({json.dumps(dict(self.config), default=str)[:400]})"

    def __len__(self) -> int:
        return self.schedule.num_train_timesteps

    # -- diffusers' tables ------------------------------------------------------------------------------------
    @property
    def betas(self) -> torch.Tensor:
        """float32, as diffusers' ``betas`` (the schedule keeps float64)."""
        return self.schedule.betas.to(torch.float32)

    @property
    def alphas(self) -> torch.Tensor:
        return (1.0 - self.schedule.betas).to(torch.float32)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """float32, as diffusers' ``alphas_cumprod`` (computed in float64)."""
        return self.schedule.alphas_cumprod.to(torch.float32)

    # -- timesteps ----------------------------------------------------------------------------------------------
    def _set_timestep_list(self, timesteps: list, device) -> None:
        self._timestep_list = timesteps
        self._timestep_index = {t: i for i, t in enumerate(timesteps)}
        self._device_timesteps: dict = {}
        tensor = torch.tensor(timesteps, dtype=torch.int64)
        self.timesteps = tensor.to(device) if device is not None else tensor

    def _spaced_timesteps(self, num_inference_steps: object) -> list:
        """diffusers' timesteps (numpy arithmetic, so the rounding is the same)."""
        num_train = self.schedule.num_train_timesteps
        steps = check_int(num_inference_steps, "num_inference_steps")
        if not 1 <= steps <= num_train:
            raise ValueError(f"num_inference_steps={steps} must lie in [1, num_train_timesteps={num_train}]")
        spacing, offset = self.config.timestep_spacing, self.config.steps_offset
        if spacing == "linspace":
            timesteps = np.linspace(0, num_train - 1, steps).round()[::-1].astype(np.int64)
        elif spacing == "leading":
            timesteps = (np.arange(0, steps) * (num_train // steps)).round()[::-1].astype(np.int64) + offset
            if timesteps[0] >= num_train:
                raise ValueError(f"steps_offset={offset} moves the first of {steps} 'leading' timesteps to "
                                 f"{int(timesteps[0])}, past num_train_timesteps - 1 = {num_train - 1}")
        else:
            timesteps = np.round(np.arange(num_train, 0, -num_train / steps)).astype(np.int64) - 1
        return [int(t) for t in timesteps]

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None) -> None:
        """Choose ``num_inference_steps`` timesteps, descending, as diffusers does: "leading" spacing
        ``[k * r, ..., r, 0] + steps_offset`` with ``r = T // n`` (the default), "trailing"
        (``round(T - k * T / n) - 1``, ending at ``T - 1``) or "linspace" (``round(linspace(0, T - 1, n))``).
        ``device``: where :attr:`timesteps` live."""
        timesteps = self._spaced_timesteps(num_inference_steps)
        self.num_inference_steps = len(timesteps)
        self.custom_timesteps = False
        self._set_timestep_list(timesteps, device)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """Identity (DDPM and DDIM do not rescale the model input); kept for interface compatibility."""
        return sample

    # -- forward process ----------------------------------------------------------------------------------------
    def _noise_coefficients(self, samples: torch.Tensor, timesteps, sample_name: str):
        check_float_tensor(samples, sample_name)
        if samples.dim() < 1:
            raise ValueError(f"{sample_name} must be [batch, ...]; got {describe(samples)}")
        t = _check_noise_timesteps(timesteps, samples, self.schedule.num_train_timesteps)
        alpha, _, beta, _ = schedule_terms(self.schedule, samples, t, t, True)
        return alpha.sqrt(), beta.sqrt()

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """The forward process q(x_t | x_0): ``sqrt(a_t) * x0 + sqrt(1 - a_t) * noise`` per sample.

        ``timesteps``: integers in ``[0, num_train_timesteps)``, one per sample (``[batch]``) or one for all (an int
        or a one-element tensor); checked on the host for CPU tensors, by an asynchronous device assert on a GPU.
        Computes in fp32 (fp64 for fp64 samples) and returns the samples' dtype."""
        sqrt_alpha, sqrt_beta = self._noise_coefficients(original_samples, timesteps, "original_samples")
        check_float_like(noise, "noise", original_samples, "original_samples")
        dtype = sqrt_alpha.dtype
        return (sqrt_alpha * original_samples.to(dtype) + sqrt_beta * noise.to(dtype)).to(original_samples.dtype)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """The v-prediction target ``sqrt(a_t) * noise - sqrt(1 - a_t) * sample`` (Salimans & Ho 2022)."""
        sqrt_alpha, sqrt_beta = self._noise_coefficients(sample, timesteps, "sample")
        check_float_like(noise, "noise", sample, "sample")
        dtype = sqrt_alpha.dtype
        return (sqrt_alpha * noise.to(dtype) - sqrt_beta * sample.to(dtype)).to(sample.dtype)

    # -- step helpers ---------------------------------------------------------------------------------------------
    def _check_step_inputs(self, model_output, sample) -> None:
        check_float_tensor(sample, "sample")
        check_float_tensor(model_output, "model_output")
        if sample.dim() < 1:
            raise ValueError(f"sample must be [batch, ...]; got {describe(sample)}")

    def _predicted_original(self, model_output, uncond_output, guidance_scale, sample, timestep, threshold: bool):
        """``x0`` from the network output in the compute dtype, with guidance and then dynamic thresholding (or
        clipping, when ``clip_sample`` is set and thresholding is not), and the noise estimate ``eps``."""
        dtype = compute_dtype(sample.dtype)
        t = _timestep_tensor(timestep, sample)
        alpha, _, beta, _ = schedule_terms(self.schedule, sample, t, t, True)
        output = model_output.to(dtype)
        if uncond_output is not None and guidance_scale != 1.0:
            uncond = uncond_output.to(dtype)
            output = uncond if guidance_scale == 0 else uncond + guidance_scale * (output - uncond)
        x_t = sample.to(dtype)
        sqrt_alpha, sqrt_beta = alpha.sqrt(), beta.sqrt()
        kind = self.config.prediction_type
        if kind == "epsilon":
            x0, eps = (x_t - sqrt_beta * output) / sqrt_alpha, output
        elif kind == "sample":
            x0, eps = output, (x_t - sqrt_alpha * output) / sqrt_beta
        else:
            x0, eps = sqrt_alpha * x_t - sqrt_beta * output, sqrt_alpha * output + sqrt_beta * x_t
        if threshold and self.config.thresholding:
            x0 = dynamic_threshold(x0, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
        elif threshold and self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        return x0, eps, (alpha, sqrt_alpha, sqrt_beta)

    def _lazy_original(self, model_output, uncond_output, guidance_scale, sample, timestep):
        def compute():
            x0, _, _ = self._predicted_original(model_output, uncond_output, guidance_scale, sample, timestep, True)
            return x0.to(sample.dtype)
        return compute

    def _draw_noise(self, model_output: torch.Tensor, generator, fused: bool):
        """The step's noise as diffusers draws it, or None where the fused kernel draws it (``in_kernel_noise``,
        a fused step, and a generator the kernel can take: None or one of the samples' device)."""
        if fused and self.in_kernel_noise and (generator is None or (
                isinstance(generator, torch.Generator) and generator.device.type == model_output.device.type)):
            return None
        return randn_like_diffusers(model_output.shape, generator, model_output.device, model_output.dtype)

    def _step_inputs(self, model_output, uncond_output, sample, guidance_scale, timestep):
        """The step's outputs in the sample's dtype, the guidance checked, and ``(timestep, previous timestep)``
        with a host timestep read as an int."""
        if model_output.dtype != sample.dtype:
            model_output = model_output.to(sample.dtype)
        if uncond_output is not None and uncond_output.dtype != sample.dtype:
            uncond_output = uncond_output.to(sample.dtype)
        self._check_guidance(uncond_output, guidance_scale)
        timestep = _as_host_int(timestep)
        return model_output, uncond_output, timestep, self.previous_timestep(timestep)

    def _check_guidance(self, uncond_output, guidance_scale) -> None:
        scale = check_real(guidance_scale, "guidance_scale")
        if uncond_output is None and scale != 1.0:
            raise ValueError(f"guidance_scale={guidance_scale!r} needs uncond_output (the unconditional "
                             "prediction); pass it, or leave guidance_scale at 1.0")


class DDPMScheduler(_Scheduler):
    """Ancestral DDPM sampling (Ho et al. 2020) with the fused :func:`~genkernels.kernels.ddpm_step`, configured as
    diffusers' ``DDPMScheduler`` (same keys, defaults and math).

    Args:
        schedule: a :class:`NoiseSchedule` to use instead of the beta keys (recorded in :attr:`config` as
            ``trained_betas``).
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the betas, as diffusers builds
            them ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace" in float32 like diffusers;
            ``trained_betas`` taken in float64).
        variance_type: "fixed_small" (``fixed_small_log`` is the same standard deviation), "fixed_large"
            (``fixed_large_log`` too: diffusers' step takes the square root of a logarithm there and returns NaN;
            here it is ``exp(0.5 * log beta)``), "learned" or "learned_range" (``model_output`` holds twice the
            channels: the prediction and the variance; runs in PyTorch).
        clip_sample, clip_sample_range: clamp the predicted ``x0`` to ``[-range, range]``.
        prediction_type: "epsilon", "sample" or "v_prediction".
        thresholding, dynamic_thresholding_ratio, sample_max_value: dynamic thresholding of ``x0`` (instead of
            clipping): per sample, ``s = clamp(quantile(|x0|, ratio), 1, sample_max_value)`` and
            ``x0 = clamp(x0, -s, s) / s``.
        timestep_spacing, steps_offset: see :meth:`set_timesteps`.
        rescale_betas_zero_snr: rescale the betas to a zero terminal SNR (use with "v_prediction").
        in_kernel_noise: draw the step noise inside the fused kernel (not diffusers' draws); not part of the
            config.
    """

    _defaults = DDPM_CONFIG_DEFAULTS
    _beta_schedules = DDPM_BETA_SCHEDULES

    def __init__(self, schedule: Optional[NoiseSchedule] = None, *, num_train_timesteps: int = 1000,
                 beta_start: float = 0.0001, beta_end: float = 0.02, beta_schedule: str = "linear",
                 trained_betas=None, variance_type: str = "fixed_small", clip_sample: bool = True,
                 prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False, in_kernel_noise: bool = False):
        options = dict(locals())
        variance_type = check_choice(variance_type, "variance_type", DDPM_VARIANCE_TYPES)
        self._setup(schedule, {key: options[key] for key in self._defaults}, in_kernel_noise)
        self.variance_type = variance_type

    prediction_type = property(lambda self: self.config.prediction_type)
    clip_sample = property(lambda self: self.config.clip_sample)
    clip_sample_range = property(lambda self: self.config.clip_sample_range)
    timestep_spacing = property(lambda self: self.config.timestep_spacing)

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None,
                      timesteps: Optional[Sequence[int]] = None) -> None:
        """As :meth:`_Scheduler.set_timesteps`, or custom descending ``timesteps`` (diffusers' option)."""
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps and timesteps")
        if timesteps is None:
            return super().set_timesteps(num_inference_steps, device)
        if isinstance(timesteps, torch.Tensor):
            timesteps = timesteps.tolist()
        values = [check_int(t, "timesteps") for t in timesteps]
        num_train = self.schedule.num_train_timesteps
        if not values or any(b >= a for a, b in zip(values, values[1:])) or values[0] >= num_train or \
                values[-1] < 0:
            raise ValueError(f"timesteps must be a non-empty descending list in [0, {num_train}); got {values}")
        self.num_inference_steps = None
        self.custom_timesteps = True
        self._set_timestep_list(values, device)

    def previous_timestep(self, timestep):
        """The timestep a step from ``timestep`` lands on: the next one of :attr:`timesteps` (-1 after the last),
        as diffusers' ``DDPMScheduler.previous_timestep`` (``timestep - 1`` before :meth:`set_timesteps`).
        ``timestep`` must be one of :attr:`timesteps`; a device tensor is looked up on the device (no sync)."""
        timestep = _as_host_int(timestep)
        if isinstance(timestep, torch.Tensor):
            if self._evenly_spaced():
                step = self.schedule.num_train_timesteps // (self.num_inference_steps or
                                                             self.schedule.num_train_timesteps)
                return (timestep - step).clamp(min=-1)
            return self._device_previous_timestep(timestep)
        number = check_int(timestep, "timestep")
        index = self._timestep_index.get(number)
        if index is None:
            listed = self._timestep_list
            raise ValueError(f"timestep={number} is not one of the scheduler's {len(listed)} timesteps "
                             f"({listed[0]}, ..., {listed[-1]}); call set_timesteps() and step through timesteps")
        return self._timestep_list[index + 1] if index + 1 < len(self._timestep_list) else -1

    def _evenly_spaced(self) -> bool:
        return not self.custom_timesteps and (self.num_inference_steps is None or (
            self.config.timestep_spacing == "leading" and self.config.steps_offset == 0))

    def _device_previous_timestep(self, timestep: torch.Tensor) -> torch.Tensor:
        table = self._device_timesteps.get(timestep.device)
        if table is None:  # the list followed by -1 (the step after the last), once per device
            table = torch.tensor(self._timestep_list + [-1], dtype=torch.int64).to(timestep.device)
            self._device_timesteps[timestep.device] = table
        flat = timestep.reshape(-1).to(torch.int64)
        matches = table[:-1] == flat[:, None]
        check_values(flat, "timestep", matches.any(dim=1), "be one of the scheduler's timesteps")
        return table[matches.to(torch.int32).argmax(dim=1) + 1].reshape(timestep.shape)

    def fused_step_reasons(self) -> list:
        """Why :meth:`step` cannot run as one fused kernel call with these options ([] when it does)."""
        if self.variance_type in LEARNED_VARIANCE_TYPES:
            return [f"variance_type={self.variance_type!r}: a per-element variance from the network (PyTorch)"]
        return []

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, *, uncond_output: Optional[torch.Tensor] = None,
             guidance_scale: float = 1.0):
        """``x_t -> x_{prev}`` (the next of :attr:`timesteps`), as diffusers' ``DDPMScheduler.step``; returns
        :class:`SchedulerOutput` ``(prev_sample, pred_original_sample)`` (or that tuple).

        ``generator``: a ``torch.Generator`` or a list of one per sample, drawing the noise as diffusers does.
        With ``uncond_output``, classifier-free guidance ``uncond + guidance_scale * (model_output - uncond)`` is
        applied inside the fused step. ``model_output`` is read in ``sample``'s dtype; the result has ``sample``'s
        dtype (math in fp32, fp64 for fp64)."""
        self._check_step_inputs(model_output, sample)
        predicted_variance = None
        if self.variance_type in LEARNED_VARIANCE_TYPES:
            channels = sample.shape[1] if sample.dim() > 1 else None
            if channels is None or model_output.dim() < 2 or model_output.shape[1] != 2 * channels:
                raise ValueError(f"variance_type={self.variance_type!r} needs model_output with twice sample's "
                                 f"channels (the prediction, then the variance); got model_output "
                                 f"{describe(model_output)} for sample {describe(sample)}")
            model_output, predicted_variance = model_output.split(channels, dim=1)
            if uncond_output is not None:
                uncond_output = uncond_output.split(channels, dim=1)[0]
        model_output, uncond_output, timestep, prev = self._step_inputs(model_output, uncond_output, sample,
                                                                        guidance_scale, timestep)
        final = isinstance(timestep, int) and timestep == 0
        noise = None if final else self._draw_noise(model_output, generator, predicted_variance is None)
        kernel_generator = generator if noise is None and not final else None  # in-kernel noise
        if predicted_variance is not None:
            prev_sample, x0 = self._eager_step(model_output, uncond_output, guidance_scale, timestep, prev, sample,
                                               noise, predicted_variance)
            output = SchedulerOutput(prev_sample, x0)
        elif self.config.thresholding:
            x0, _, _ = self._predicted_original(model_output, uncond_output, guidance_scale, sample, timestep, True)
            x0 = x0.to(sample.dtype)
            prev_sample = ddpm_step(x0, timestep, sample, self.schedule, prev_timestep=prev, noise=noise,
                                    generator=kernel_generator, prediction_type="sample",
                                    variance_type=self._kernel_variance_type(), clip_sample=False)
            output = SchedulerOutput(prev_sample, x0)
        else:
            prev_sample = ddpm_step(model_output, timestep, sample, self.schedule, prev_timestep=prev, noise=noise,
                                    generator=kernel_generator, prediction_type=self.config.prediction_type,
                                    variance_type=self._kernel_variance_type(), clip_sample=self.config.clip_sample,
                                    clip_sample_range=self.config.clip_sample_range, uncond_output=uncond_output,
                                    guidance_scale=guidance_scale)
            output = SchedulerOutput(prev_sample, compute_original=self._lazy_original(
                model_output, uncond_output, guidance_scale, sample, timestep),
                inputs=(model_output, uncond_output, sample))
        return output if return_dict else output.to_tuple()

    def _kernel_variance_type(self) -> str:
        return "fixed_large" if self.variance_type.startswith("fixed_large") else "fixed_small"

    def _eager_step(self, model_output, uncond_output, guidance_scale, timestep, prev, sample, noise,
                    predicted_variance):
        """The DDPM step in PyTorch for the learned variances (diffusers' ``step`` and ``_get_variance``)."""
        x0, _, (alpha_t, _, _) = self._predicted_original(model_output, uncond_output, guidance_scale, sample,
                                                          timestep, True)
        dtype = x0.dtype
        t, p = _timestep_tensor(timestep, sample), _timestep_tensor(prev, sample)
        _, alpha_prev, beta_t, beta_prev = schedule_terms(self.schedule, sample, t, p, True)
        current_alpha = alpha_t / alpha_prev
        current_beta = torch.where(alpha_prev > 0.5, (beta_t - beta_prev) / alpha_prev, 1 - current_alpha)
        mean = (alpha_prev.sqrt() * current_beta / beta_t * x0
                + _term(current_alpha.sqrt() * beta_prev / beta_t, sample.to(dtype)))
        small = (beta_prev / beta_t * current_beta).clamp(min=MIN_VARIANCE)
        predicted = predicted_variance.to(dtype)
        if self.variance_type == "learned":
            std = predicted.sqrt()
        else:  # "learned_range": interpolate the log variance between the small and the large one
            frac = (predicted + 1) / 2
            std = torch.exp(0.5 * (frac * current_beta.log() + (1 - frac) * small.log()))
        prev_sample = mean
        if noise is not None:
            prev_sample = torch.where(t.reshape(mean.shape[:1] + (1,) * (mean.dim() - 1)) > 0,
                                      mean + std * noise.to(dtype), mean)
        return prev_sample.to(sample.dtype), x0.to(sample.dtype)


class DDIMScheduler(_Scheduler):
    """DDIM sampling (Song et al. 2021) with the fused :func:`~genkernels.kernels.ddim_step`, configured as
    diffusers' ``DDIMScheduler`` (same keys, defaults and math).

    Args: as :class:`DDPMScheduler` (without ``variance_type``; beta schedules "linear", "scaled_linear",
    "squaredcos_cap_v2"), and ``set_alpha_to_one``: the final step goes to ``alpha_bar = 1`` (True) or to
    ``alphas_cumprod[0]``.
    """

    _defaults = DDIM_CONFIG_DEFAULTS
    _beta_schedules = DDIM_BETA_SCHEDULES

    def __init__(self, schedule: Optional[NoiseSchedule] = None, *, num_train_timesteps: int = 1000,
                 beta_start: float = 0.0001, beta_end: float = 0.02, beta_schedule: str = "linear",
                 trained_betas=None, clip_sample: bool = True, set_alpha_to_one: bool = True,
                 steps_offset: int = 0, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading",
                 rescale_betas_zero_snr: bool = False, in_kernel_noise: bool = False):
        options = dict(locals())
        check_bool(set_alpha_to_one, "set_alpha_to_one")
        self._setup(schedule, {key: options[key] for key in self._defaults}, in_kernel_noise)

    prediction_type = property(lambda self: self.config.prediction_type)
    clip_sample = property(lambda self: self.config.clip_sample)
    clip_sample_range = property(lambda self: self.config.clip_sample_range)
    set_alpha_to_one = property(lambda self: self.config.set_alpha_to_one)
    timestep_spacing = property(lambda self: self.config.timestep_spacing)

    @property
    def final_alpha_cumprod(self) -> torch.Tensor:
        """The ``alpha_bar`` a final step goes to (diffusers' attribute)."""
        return torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    def previous_timestep(self, timestep):
        """``timestep - T // num_inference_steps`` (diffusers' ``DDIMScheduler.step``, whatever the spacing;
        negative is the final step)."""
        timestep = _as_host_int(timestep)
        if not isinstance(timestep, torch.Tensor):
            timestep = check_int(timestep, "timestep")
        num_train = self.schedule.num_train_timesteps
        return timestep - num_train // (self.num_inference_steps or num_train)

    def fused_step_reasons(self, use_clipped_model_output: bool = False) -> list:
        """Why :meth:`step` cannot run as one fused kernel call with these options ([] when it does)."""
        if self.config.thresholding and not use_clipped_model_output:
            return ["thresholding with the unclipped noise estimate (use_clipped_model_output=False): the kernel "
                    "derives the noise from x0 when it reads x0 (PyTorch)"]
        return []

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise=None, return_dict: bool = True,
             *, uncond_output: Optional[torch.Tensor] = None, guidance_scale: float = 1.0):
        """``x_t -> x_{t - T // num_inference_steps}``, as diffusers' ``DDIMScheduler.step``; returns
        :class:`SchedulerOutput` ``(prev_sample, pred_original_sample)`` (or that tuple).

        ``eta`` in [0, 1]; for ``eta > 0`` the noise is ``variance_noise`` or drawn from ``generator`` (a
        ``torch.Generator`` or one per sample) as diffusers draws it. ``uncond_output``/``guidance_scale``:
        classifier-free guidance inside the fused step, as in DDPM's."""
        self._check_step_inputs(model_output, sample)
        eta = check_real(eta, "eta", low=0.0, high=1.0)
        if use_clipped_model_output is None:  # DDIMPipeline passes None for "not given"
            use_clipped_model_output = False
        check_bool(use_clipped_model_output, "use_clipped_model_output")
        model_output, uncond_output, timestep, prev = self._step_inputs(model_output, uncond_output, sample,
                                                                        guidance_scale, timestep)
        fused = not self.fused_step_reasons(use_clipped_model_output)
        noise = None
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("pass either generator or variance_noise, not both (variance_noise is the noise "
                                 "itself)")
            noise = variance_noise if variance_noise is not None else self._draw_noise(model_output, generator,
                                                                                       fused)
        kernel_generator = generator if eta > 0 and noise is None else None  # in-kernel noise
        options = dict(prev_timestep=prev, eta=eta, noise=noise, generator=kernel_generator,
                       set_alpha_to_one=self.config.set_alpha_to_one)
        if self.config.thresholding:
            x0, eps, _ = self._predicted_original(model_output, uncond_output, guidance_scale, sample, timestep,
                                                  True)
            if use_clipped_model_output:
                prev_sample = ddim_step(x0.to(sample.dtype), timestep, sample, self.schedule,
                                        prediction_type="sample", clip_sample=False, **options)
            else:
                prev_sample = self._eager_step(x0, eps, timestep, prev, sample, eta, noise)
            output = SchedulerOutput(prev_sample, x0.to(sample.dtype))
        else:
            prev_sample = ddim_step(model_output, timestep, sample, self.schedule,
                                    prediction_type=self.config.prediction_type, clip_sample=self.config.clip_sample,
                                    clip_sample_range=self.config.clip_sample_range,
                                    use_clipped_model_output=use_clipped_model_output, uncond_output=uncond_output,
                                    guidance_scale=guidance_scale, **options)
            output = SchedulerOutput(prev_sample, compute_original=self._lazy_original(
                model_output, uncond_output, guidance_scale, sample, timestep),
                inputs=(model_output, uncond_output, sample))
        return output if return_dict else output.to_tuple()

    def _eager_step(self, x0, eps, timestep, prev, sample, eta, noise) -> torch.Tensor:
        """The DDIM update in PyTorch from a given ``x0`` and ``eps`` (Song et al. 2021, eq. 12)."""
        dtype = x0.dtype
        t, p = _timestep_tensor(timestep, sample), _timestep_tensor(prev, sample)
        if isinstance(prev, int) and prev >= 0 and isinstance(timestep, int) and prev >= timestep:
            raise ValueError(f"prev_timestep={prev} must be smaller than timestep={timestep}")
        alpha_t, alpha_prev, beta_t, beta_prev = schedule_terms(self.schedule, sample, t, p,
                                                                self.config.set_alpha_to_one)
        current_beta = torch.where(alpha_prev > 0.5, (beta_t - beta_prev) / alpha_prev, 1 - alpha_t / alpha_prev)
        std = eta * (beta_prev / beta_t * current_beta).sqrt()
        prev_sample = alpha_prev.sqrt() * x0 + _term((beta_prev - std**2).clamp(min=0).sqrt(), eps)
        if eta > 0:
            prev_sample = prev_sample + _term(std, noise.to(dtype))
        return prev_sample.to(sample.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------
def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding (Saharia et al. 2022), as diffusers' ``_threshold_sample``: per sample,
    ``s = clamp(quantile(|x0|, ratio), min=1, max=max_value)`` and ``x0 = clamp(x0, -s, s) / s`` (computed in
    fp32, or fp64 for fp64)."""
    dtype = compute_dtype(x0.dtype)
    flat = x0.to(dtype).reshape(x0.shape[0], -1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape)


def randn_like_diffusers(shape, generator, device, dtype) -> torch.Tensor:
    """``torch.randn`` drawn as diffusers' ``randn_tensor`` draws it: from ``generator`` (one, or a list of one per
    sample drawn one sample at a time), on the generator's device when that is the CPU, then moved to ``device``."""
    device = torch.device(device)
    generators = generator if isinstance(generator, (list, tuple)) else None
    if generators is not None:
        if not all(isinstance(g, torch.Generator) for g in generators):
            raise TypeError("generator must be a torch.Generator or a list of them")
        if len(generators) == 1:
            generator, generators = generators[0], None
        elif len(generators) != shape[0]:
            raise ValueError(f"generator: a list of {len(generators)} generators for a batch of {shape[0]}; pass "
                             "one per sample")
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}")
    first = generators[0] if generators is not None else generator
    draw_device = device
    if first is not None and first.device.type != device.type:
        if first.device.type != "cpu":
            raise ValueError(f"generator is on {first.device} but the samples are on {device}")
        draw_device = torch.device("cpu")
    if generators is not None:
        return torch.cat([torch.randn((1,) + tuple(shape[1:]), generator=g, device=draw_device, dtype=dtype)
                          for g in generators]).to(device)
    return torch.randn(tuple(shape), generator=generator, device=draw_device, dtype=dtype).to(device)


def _term(coefficient: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``coefficient * value``, exactly 0 where the coefficient is 0 (so +-Inf there does not become NaN)."""
    return torch.where(coefficient == 0, 0.0, coefficient * value)


def _timestep_tensor(timestep, sample: torch.Tensor) -> torch.Tensor:
    """A step's timestep (int or integer tensor ``[]``/``[batch]``) as ``[batch]`` int64 on the sample's device."""
    batch = sample.shape[0]
    if isinstance(timestep, torch.Tensor):
        return timestep.to(device=sample.device, dtype=torch.int64).reshape(-1).expand(batch)
    return torch.full((batch,), timestep, dtype=torch.int64, device=sample.device)


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
