"""DDPM: a denoising diffusion model around a noise-prediction network (genkernels'
:class:`~genkernels.models.unet.UNet`, a diffusers ``UNet2DModel``, or any module called as
``unet(sample, timestep[, class_labels])``), with its training loss and sampling loops (DDPM, DDIM, classifier-free
guidance, image-to-image, inpainting, CUDA graphs).

Training (Ho et al. 2020, Algorithm 1): ``t ~ U{0, T-1}``, ``eps ~ N(0, I)``,
``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps`` (:func:`~genkernels.kernels.diffusion_loss.q_sample`) and the mean
squared error between the network output and its target (``eps``, ``x0`` or ``v``) in one
:func:`~genkernels.kernels.diffusion_loss.diffusion_loss` pass. By default the noise never exists in memory: both
ops draw it inside the kernel from the same Philox seed. Class labels are replaced by the null class with
probability ``class_dropout_prob`` while training, so one network learns the conditional and the unconditional
prediction (classifier-free guidance, Ho & Salimans 2022).

Sampling walks the timesteps of :class:`~genkernels.models.schedulers.DDPMScheduler` /
:class:`~genkernels.models.schedulers.DDIMScheduler` and makes one U-Net call and one fused
:func:`~genkernels.kernels.ddpm_step` / :func:`~genkernels.kernels.ddim_step` per step. With guidance the
conditional and the null-class halves run as one batch of ``2n`` and the step combines them
(``uncond + scale * (cond - uncond)``) inside its kernel. The loop never waits for the GPU: timesteps are Python
ints (device fills), noise seeds are drawn on the device, and checks of device values are asynchronous asserts.
"""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from genkernels.kernels import NoiseSchedule, ddim_step, ddpm_step
from genkernels.kernels.checks import (
    check_bool,
    check_choice,
    check_float_tensor,
    check_generator,
    check_in_range,
    check_int,
    check_integer_tensor,
    check_real,
    check_tensor,
    describe,
)
from genkernels.kernels.diffusion import PREDICTION_TYPES
from genkernels.kernels.diffusion_loss import diffusion_loss, q_sample
from genkernels.kernels.launch import draw_philox_seed

from .schedulers import TIMESTEP_SPACINGS, DDIMScheduler, DDPMScheduler
from .unet import UNet, check_class_labels

SAMPLERS = ("ddpm", "ddim")
REDUCTIONS = ("mean", "sum", "none", "per_sample")
# diffusers' pipeline defaults: DDPM walks every training timestep, DDIM 50 of them.
DEFAULT_DDIM_STEPS = 50
NETWORK_SIGNATURE = ("unet(sample, timestep[, class_labels]) with sample [batch, C, H, W], timestep an int or an "
                     "integer tensor [] / [batch], class_labels integers [batch] (class-conditional networks only), "
                     "returning a tensor shaped like sample or an output whose .sample is one (diffusers' "
                     "UNet2DModel)")


@dataclasses.dataclass(frozen=True)
class NetworkInfo:
    """What :class:`DDPM` needs to know about its network, read from it (or given to DDPM)."""

    in_channels: Optional[int]
    out_channels: Optional[int]
    image_size: Union[int, tuple, None]
    num_classes: Optional[int]
    downsampling_factor: int


def network_info(unet: nn.Module, in_channels: Optional[int] = None, image_size=None) -> NetworkInfo:
    """Channels, image size, classes and downsampling factor of a noise-prediction network: genkernels'
    :class:`UNet` (its attributes), a diffusers ``UNet2DModel`` (its ``config``: ``in_channels``,
    ``out_channels``, ``sample_size``, ``block_out_channels``; with ``num_class_embeds`` = K, classes ``0..K-2``
    and ``K-1`` the null class of guidance, as genkernels' UNet's ``num_classes + 1`` embeddings), or any module
    (attributes ``in_channels``, ``out_channels``, ``image_size`` or ``sample_size``, ``num_classes``,
    ``downsampling_factor`` where it has them). ``in_channels`` / ``image_size`` given here take precedence."""
    if isinstance(unet, UNet):
        info = dict(in_channels=unet.in_channels, out_channels=unet.out_channels, image_size=unet.image_size,
                    num_classes=unet.num_classes, downsampling_factor=unet.downsampling_factor)
    elif isinstance(getattr(unet, "config", None), Mapping) and "sample_size" in unet.config:
        config = unet.config
        embeds = config.get("num_class_embeds")
        blocks = config.get("block_out_channels") or (None,)
        info = dict(in_channels=config.get("in_channels"), out_channels=config.get("out_channels"),
                    image_size=config.get("sample_size"),
                    num_classes=embeds - 1 if embeds and config.get("class_embed_type") is None else None,
                    downsampling_factor=2 ** (len(blocks) - 1))
    else:
        info = dict(in_channels=getattr(unet, "in_channels", None), out_channels=getattr(unet, "out_channels", None),
                    image_size=getattr(unet, "image_size", getattr(unet, "sample_size", None)),
                    num_classes=getattr(unet, "num_classes", None),
                    downsampling_factor=getattr(unet, "downsampling_factor", 1))
    if in_channels is not None:
        info["in_channels"] = check_int(in_channels, "in_channels", low=1)
    if image_size is not None:
        info["image_size"] = image_size
    size = info["image_size"]
    if isinstance(size, list):
        info["image_size"] = size = tuple(size)
    if size is not None and not (isinstance(size, int) and not isinstance(size, bool) and size >= 1) and not (
            isinstance(size, tuple) and len(size) == 2 and all(isinstance(v, int) and v >= 1 for v in size)):
        raise ValueError(f"image_size must be a positive int or (height, width); got {size!r}")
    for key in ("in_channels", "out_channels", "num_classes", "downsampling_factor"):
        value = info[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"the network's {key} must be a positive int; got {value!r}")
    return NetworkInfo(**info)


def _check_network(unet: object) -> None:
    """Require a module callable as :data:`NETWORK_SIGNATURE` (its ``forward`` takes two positional arguments)."""
    if not isinstance(unet, nn.Module):
        raise TypeError(f"unet must be a noise-prediction network (an nn.Module) called as {NETWORK_SIGNATURE}; "
                        f"got {type(unet).__name__}")
    try:
        signature = inspect.signature(unet.forward)
    except (TypeError, ValueError):  # no introspectable signature: trust the module
        return
    kinds = [parameter.kind for parameter in signature.parameters.values()]
    positional = sum(kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                     for kind in kinds)
    if positional < 2 and inspect.Parameter.VAR_POSITIONAL not in kinds:
        raise TypeError(f"unet must be a noise-prediction network called as {NETWORK_SIGNATURE}; got "
                        f"{type(unet).__name__}, whose forward{signature} does not take (sample, timestep)")


class DDPM(nn.Module):
    """A diffusion model: a noise-predicting network and the forward-process schedule it was trained with.

    Args:
        unet: the denoising network, an ``nn.Module`` called as
            ``unet(sample, timestep[, class_labels])`` (:data:`NETWORK_SIGNATURE`): genkernels' :class:`UNet`, a
            diffusers ``UNet2DModel`` (its output's ``.sample`` is read), or any module of that signature returning
            a tensor shaped like ``sample`` (``out_channels == in_channels``). ``class_labels`` is passed only to a
            class-conditional network (see :func:`network_info`).
        schedule: the forward-process betas (default: DDPM's linear schedule, 1000 steps).
        prediction_type: what the network predicts: "epsilon" (the noise), "sample" (``x0``) or "v_prediction".
        class_dropout_prob: probability of replacing a class label by the null class while training.
        in_channels, image_size: the image channels and size (an int or ``(height, width)``), for networks that
            do not say (genkernels' UNet and diffusers' UNet2DModel do); needed to draw samples from noise.
    """

    def __init__(self, unet: nn.Module, schedule: Optional[NoiseSchedule] = None, prediction_type: str = "epsilon",
                 class_dropout_prob: float = 0.1, *, in_channels: Optional[int] = None, image_size=None):
        super().__init__()
        _check_network(unet)
        info = network_info(unet, in_channels, image_size)
        if None not in (info.in_channels, info.out_channels) and info.out_channels != info.in_channels:
            raise ValueError(f"unet must output as many channels as it reads; got in_channels={info.in_channels}, "
                             f"out_channels={info.out_channels}")
        self.network = info
        schedule = NoiseSchedule.linear() if schedule is None else schedule
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        self.unet = unet
        self.schedule = schedule
        self.prediction_type = check_choice(prediction_type, "prediction_type", PREDICTION_TYPES)
        self.class_dropout_prob = check_real(class_dropout_prob, "class_dropout_prob", low=0.0, high=1.0)

    @property
    def num_classes(self) -> Optional[int]:
        return self.network.num_classes

    def network_output(self, x: torch.Tensor, timesteps, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The network's prediction for ``x`` at ``timesteps``: ``unet(x, timesteps[, class_labels])``, unwrapped
        from an output object (``.sample``) or a tuple, checked to have ``x``'s shape."""
        out = self.unet(x, timesteps) if class_labels is None else self.unet(x, timesteps, class_labels)
        if not isinstance(out, torch.Tensor):
            if isinstance(getattr(out, "sample", None), torch.Tensor):
                out = out.sample
            elif isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
                out = out[0]
            else:
                raise TypeError(f"unet returned {type(out).__name__}; expected a tensor or an output with a .sample "
                                f"tensor ({NETWORK_SIGNATURE})")
        if out.shape != x.shape:
            raise ValueError(f"unet must return its input's shape {list(x.shape)}; got {describe(out)}")
        return out

    def check_class_labels(self, class_labels: Optional[torch.Tensor], batch: int,
                           device: torch.device) -> Optional[torch.Tensor]:
        """Validated labels ``[batch]`` (the null class ``num_classes`` when None on a class-conditional network):
        :func:`genkernels.models.unet.check_class_labels`."""
        return check_class_labels(class_labels, batch, self.num_classes, device)

    @property
    def num_train_timesteps(self) -> int:
        return self.schedule.num_train_timesteps

    # ------------------------------------------------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------------------------------------------------
    def forward(self, x0: torch.Tensor, class_labels: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        """:meth:`loss` (so that wrappers that call the module, such as ``DistributedDataParallel``, train it)."""
        return self.loss(x0, class_labels, **kwargs)

    def loss(self, x0: torch.Tensor, class_labels: Optional[torch.Tensor] = None, *,
             generator: Optional[torch.Generator] = None, noise: Optional[torch.Tensor] = None,
             timesteps: Optional[torch.Tensor] = None, reduction: str = "mean") -> torch.Tensor:
        """The denoising loss ``|| f(x_t, t) - target ||^2`` (Ho et al. 2020, eq. 14; ``target`` = ``eps``, ``x0``
        or ``v = sqrt(a_t) eps - sqrt(1 - a_t) x0`` per ``prediction_type``).

        Args:
            x0: clean images ``[batch, in_channels, H, W]`` (scaled to [-1, 1] as in DDPM).
            class_labels: integers ``[batch]`` in ``[0, num_classes]`` for a class-conditional U-Net (None or
                ``num_classes``: the null class). In training mode each is dropped to the null class with
                probability ``class_dropout_prob`` (drawn on the device).
            generator: draws the timesteps, the label dropout and the noise seed.
            noise: the Gaussian ``eps`` (shape of ``x0``); by default drawn inside the kernels from one seed.
            timesteps: integers ``[batch]`` in ``[0, T)``; by default uniform.
            reduction: "mean", "sum", "none" (elementwise) or "per_sample" (mean over each sample).

        Returns:
            An fp32 scalar ("mean", "sum"), fp32 ``[batch]`` ("per_sample") or the elementwise loss ("none");
            differentiable in the U-Net's parameters.
        """
        self._check_images(x0, "x0")
        device, batch = x0.device, x0.shape[0]
        check_generator(generator, device, "x0")
        check_choice(reduction, "reduction", REDUCTIONS)
        if noise is not None:
            _check_like(noise, "noise", x0, "x0")
        timesteps = self._training_timesteps(timesteps, batch, device, generator)
        labels = self._training_labels(class_labels, batch, device, generator)
        noise_source = dict(noise=noise) if noise is not None else dict(seed=draw_philox_seed(device, generator))
        x_t = q_sample(x0, timesteps, self.schedule, **noise_source)
        model_output = self.network_output(x_t, timesteps, labels)
        return diffusion_loss(model_output, x0, timesteps, self.schedule, prediction_type=self.prediction_type,
                              reduction=reduction, **noise_source)

    def _training_timesteps(self, timesteps, batch: int, device: torch.device, generator) -> torch.Tensor:
        num_train = self.num_train_timesteps
        if timesteps is None:
            return torch.randint(0, num_train, (batch,), device=device, generator=generator)
        check_integer_tensor(timesteps, "timesteps")
        if timesteps.shape != (batch,) or timesteps.device != device:
            raise ValueError(f"timesteps must have shape [batch] = [{batch}] on {device}; got {describe(timesteps)}")
        check_in_range(timesteps, "timesteps", 0, num_train)
        return timesteps

    def _training_labels(self, class_labels, batch: int, device: torch.device, generator) -> Optional[torch.Tensor]:
        labels = self.check_class_labels(class_labels, batch, device)
        if labels is None or class_labels is None or not self.training or self.class_dropout_prob == 0:
            return labels
        dropped = torch.rand(batch, device=device, generator=generator) < self.class_dropout_prob
        return torch.where(dropped, self.num_classes, labels)

    # ------------------------------------------------------------------------------------------------------------
    # Sampling
    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, num_steps: Optional[int] = None, *, sampler: str = "ddpm", eta: float = 0.0,
               guidance_scale: float = 1.0, class_labels=None, generator: Optional[torch.Generator] = None,
               noise: Optional[torch.Tensor] = None, init: Optional[torch.Tensor] = None, strength: float = 1.0,
               mask: Optional[torch.Tensor] = None, timestep_spacing: str = "leading", clip_sample: bool = True,
               cuda_graph: bool = False, progress: bool = True) -> torch.Tensor:
        """Draw ``n`` images by running the reverse process from noise (or from a noised ``init``).

        Args:
            n: number of images.
            num_steps: denoising steps (default: every training timestep for "ddpm", 50 for "ddim").
            sampler: "ddpm" (ancestral, Ho et al. 2020) or "ddim" (Song et al. 2021).
            eta: DDIM's stochasticity in [0, 1] (0: deterministic); "ddim" only.
            guidance_scale: classifier-free guidance weight ``w`` in ``uncond + w * (cond - uncond)``; 1 is plain
                conditional sampling, 0 unconditional. Needs a class-conditional U-Net and ``class_labels``.
            class_labels: an int or integers ``[n]`` in ``[0, num_classes]`` (None: the null class).
            generator: draws the starting noise and every step's noise.
            noise: the starting Gaussian noise ``[n, C, H, W]``: ``x_T`` itself, or the noise added to ``init``.
            init: an image ``[n, C, H, W]`` to start from (image-to-image, SDEdit; Meng et al. 2022): it is noised
                to the step at fraction ``strength`` of the schedule and denoised from there.
            strength: in [0, 1]; 0 returns ``init`` unchanged, 1 starts from the first timestep.
            mask: inpainting mask ``[n, 1 or C, H, W]`` with values in [0, 1], 1 where new content is generated and
                0 where ``init`` is kept: after every step the sample becomes
                ``lerp(q_sample(init, t_prev), sample, mask)``, and at the end exactly ``init`` where ``mask`` is 0.
            timestep_spacing: "leading", "trailing" or "linspace" (the schedulers' spacings).
            clip_sample: clamp the predicted ``x0`` to [-1, 1] in every step.
            cuda_graph: capture one step (U-Net + fused update) as a CUDA graph and replay it (CUDA only).
            progress: show a progress bar.

        Returns:
            ``[n, C, H, W]`` in the U-Net's parameter dtype.
        """
        plan = self._plan_sampling(n, num_steps, sampler, eta, guidance_scale, class_labels, generator, noise, init,
                                   strength, mask, timestep_spacing, clip_sample, cuda_graph, progress)
        if not plan.steps:
            return init.clone()
        was_training = self.training
        self.eval()
        try:
            return self._run_loop(plan)
        finally:
            self.train(was_training)

    def _plan_sampling(self, n, num_steps, sampler, eta, guidance_scale, class_labels, generator, noise, init,
                       strength, mask, timestep_spacing, clip_sample, cuda_graph, progress) -> "_SamplingPlan":
        """Validate every argument (before any work) and fix the timesteps and the starting point."""
        n = check_int(n, "n")
        if n < 1:
            raise ValueError(f"n={n} must be >= 1")
        num_steps, eta = self._check_sampler(sampler, num_steps, eta)
        check_choice(timestep_spacing, "timestep_spacing", TIMESTEP_SPACINGS)
        for value, name in ((clip_sample, "clip_sample"), (cuda_graph, "cuda_graph"), (progress, "progress")):
            check_bool(value, name)
        parameter = next(iter(self.unet.parameters()), None)
        if parameter is None:
            parameter = next(iter(self.unet.buffers()), torch.empty(()))
        device = parameter.device
        dtype = parameter.dtype if parameter.is_floating_point() else torch.get_default_dtype()
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device; it is on {device}")
        check_generator(generator, device, "the model")
        guidance_scale = check_real(guidance_scale, "guidance_scale", low=0.0)
        labels = self._sampling_labels(class_labels, n, device, guidance_scale)
        shape = self._sample_shape(n, init, device)
        if noise is not None:
            check_float_tensor(noise, "noise")
            if tuple(noise.shape) != shape or noise.device != device:
                raise ValueError(f"noise must have shape {list(shape)} on {device}; got {describe(noise)}")
        strength = check_real(strength, "strength", low=0.0, high=1.0)
        if init is None and (strength != 1.0 or mask is not None):
            raise ValueError("strength and mask need an init image (image-to-image / inpainting)")
        if mask is not None:
            mask = _check_mask(mask, shape, device, dtype)
        plan = _SamplingPlan(sampler, eta, guidance_scale, labels, generator, clip_sample, cuda_graph, progress,
                             self._steps(sampler, num_steps, timestep_spacing, clip_sample, strength, init), mask,
                             shape, dtype, device)
        if plan.steps:
            plan.init = None if init is None else init.to(dtype)
            plan.start = self._starting_point(plan, noise, plan.init, plan.steps[0][0])
        return plan

    def _check_sampler(self, sampler: str, num_steps: Optional[int], eta: float) -> tuple[int, float]:
        check_choice(sampler, "sampler", SAMPLERS)
        eta = check_real(eta, "eta", low=0.0, high=1.0)
        if sampler == "ddpm" and eta != 0:
            raise ValueError(f"eta={eta} applies to the 'ddim' sampler only; the 'ddpm' sampler's noise is fixed")
        num_train = self.num_train_timesteps
        if num_steps is None:
            num_steps = num_train if sampler == "ddpm" else min(DEFAULT_DDIM_STEPS, num_train)
        num_steps = check_int(num_steps, "num_steps")
        if not 1 <= num_steps <= num_train:
            raise ValueError(f"num_steps={num_steps} must lie in [1, num_train_timesteps={num_train}]")
        return num_steps, eta

    def _steps(self, sampler: str, num_steps: int, timestep_spacing: str, clip_sample: bool, strength: float,
               init: Optional[torch.Tensor]) -> list[tuple[int, int]]:
        """``(t, t_prev)`` of every step to run, as Python ints: the scheduler's timesteps, without the first
        ``1 - strength`` of them for image-to-image (SDEdit, as diffusers' img2img pipelines)."""
        scheduler_type = DDPMScheduler if sampler == "ddpm" else DDIMScheduler
        scheduler = scheduler_type(self.schedule, prediction_type=self.prediction_type, clip_sample=clip_sample,
                                   timestep_spacing=timestep_spacing)
        scheduler.set_timesteps(num_steps)
        timesteps = scheduler.timesteps.tolist()  # a CPU tensor: no device synchronization
        first = num_steps - min(int(num_steps * strength), num_steps) if init is not None else 0
        return [(t, scheduler.previous_timestep(t)) for t in timesteps[first:]]

    def _sampling_labels(self, class_labels, n: int, device: torch.device,
                         guidance_scale: float) -> Optional[torch.Tensor]:
        guided = guidance_scale != 1.0
        if guided and self.num_classes is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs a class-conditional U-Net (num_classes set); "
                             "this one is unconditional")
        if guided and class_labels is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs class_labels to guide towards")
        if isinstance(class_labels, int) and not isinstance(class_labels, bool):
            if self.num_classes is None:
                raise ValueError("class_labels were given but the U-Net is unconditional (num_classes=None)")
            if not 0 <= class_labels <= self.num_classes:
                raise ValueError(f"class_labels={class_labels} must lie in [0, num_classes={self.num_classes}]")
            return torch.full((n,), class_labels, dtype=torch.long, device=device)
        return self.check_class_labels(class_labels, n, device)

    def _sample_shape(self, n: int, init: Optional[torch.Tensor], device: torch.device) -> tuple[int, ...]:
        if init is None:
            info = self.network
            if info.in_channels is None or info.image_size is None:
                raise ValueError(f"sampling from noise needs the image shape, and {type(self.unet).__name__} does "
                                 "not say it: pass DDPM(..., in_channels=C, image_size=S), or init / noise")
            height, width = (info.image_size, info.image_size) if isinstance(info.image_size, int) else info.image_size
            return (n, info.in_channels, height, width)
        self._check_images(init, "init")
        if init.shape[0] != n or init.device != device:
            raise ValueError(f"init must hold n={n} images on the model's device {device}; got {describe(init)}")
        return tuple(init.shape)

    def _check_images(self, x: object, name: str) -> None:
        check_float_tensor(x, name)
        channels, factor = self.network.in_channels, self.network.downsampling_factor
        if x.dim() != 4 or (channels is not None and x.shape[1] != channels) or x.shape[2] % factor or \
                x.shape[3] % factor:
            raise ValueError(f"{name} must be [batch, {channels or 'C'}, H, W] with H and W multiples of {factor}; "
                             f"got {describe(x)}")

    def _starting_point(self, plan: "_SamplingPlan", noise, init, first_timestep: int) -> torch.Tensor:
        """``x_T ~ N(0, I)`` (or the given noise); with ``init``, ``q_sample(init, t_first)`` with that noise."""
        if init is None:
            if noise is not None:
                return noise.to(plan.dtype, copy=True)
            return torch.randn(plan.shape, generator=plan.generator, device=plan.device, dtype=plan.dtype)
        if noise is not None:
            return q_sample(init, first_timestep, self.schedule, noise=noise.to(plan.dtype))
        return q_sample(init, first_timestep, self.schedule, generator=plan.generator)

    def _run_loop(self, plan: "_SamplingPlan") -> torch.Tensor:
        step = _StepFunction(self, plan)
        if plan.cuda_graph:
            step = _CudaGraphStep(step, plan.start, plan.steps[0], plan.generator)
        x = plan.start
        for t, prev in tqdm(plan.steps, desc=f"{plan.sampler} sampling", disable=not plan.progress):
            x = step(x, t, prev)
            if plan.mask is not None:
                x = self._keep_known_region(x, plan, prev)
        return x.clone() if plan.cuda_graph else x

    def _keep_known_region(self, x: torch.Tensor, plan: "_SamplingPlan", prev: int) -> torch.Tensor:
        """Inpainting: ``lerp(known, x, mask)`` with ``known = q_sample(init, prev)`` (exactly ``init`` after the
        final step), so the known region follows the forward process (exact at mask 0 and 1)."""
        if prev < 0:
            known = plan.init
        else:
            known = q_sample(plan.init, prev, self.schedule, generator=plan.generator)
        return torch.lerp(known, x, plan.mask)


@dataclasses.dataclass
class _SamplingPlan:
    """The validated arguments of one :meth:`DDPM.sample` call, its ``(t, t_prev)`` steps and starting sample."""

    sampler: str
    eta: float
    guidance_scale: float
    labels: Optional[torch.Tensor]
    generator: Optional[torch.Generator]
    clip_sample: bool
    cuda_graph: bool
    progress: bool
    steps: list[tuple[int, int]]
    mask: Optional[torch.Tensor]
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    init: Optional[torch.Tensor] = None
    start: Optional[torch.Tensor] = None

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0


class _StepFunction:
    """One denoising step ``x_t -> x_{t_prev}``: the U-Net call (cond and null-class halves as one batch under
    guidance) and the fused DDPM/DDIM update. ``t``/``t_prev`` are Python ints or 0-d device tensors."""

    def __init__(self, model: DDPM, plan: _SamplingPlan):
        self.network_output, self.schedule, self.plan = model.network_output, model.schedule, plan
        self.options = dict(prediction_type=model.prediction_type, clip_sample=plan.clip_sample,
                            generator=plan.generator)
        if plan.sampler == "ddim":
            self.options["eta"] = plan.eta
        self.labels = plan.labels
        if plan.guided:
            null = torch.full_like(plan.labels, model.num_classes)
            self.labels = torch.cat([plan.labels, null])
        self.update = ddpm_step if plan.sampler == "ddpm" else ddim_step

    def __call__(self, x: torch.Tensor, t, prev) -> torch.Tensor:
        # Under autocast the U-Net answers in the autocast dtype; the step reads it in the sample's dtype.
        if self.plan.guided:
            cond, uncond = self.network_output(torch.cat([x, x]), t, self.labels).to(x.dtype).chunk(2)
            guidance = dict(uncond_output=uncond, guidance_scale=self.plan.guidance_scale)
        else:
            cond, guidance = self.network_output(x, t, self.labels).to(x.dtype), {}
        return self.update(cond, t, x, self.schedule, prev_timestep=prev, **guidance, **self.options)


class _CudaGraphStep:
    """A :class:`_StepFunction` captured once as a CUDA graph on static buffers and replayed per step.

    Capture follows ``torch.cuda.graphs``' recipe: warm-up calls on a side stream (Triton compiles and autotunes
    there), then one captured call on that stream. The timesteps live in 0-d int64 buffers filled on the device
    before each replay. Random draws inside the step (the Philox seed of the fused update) come from ``generator``
    registered with the graph (``CUDAGraph.register_generator_state``; ``capture_begin`` registers the default
    CUDA generator itself), so every replay draws fresh noise; the generator's state is restored after the warm-up,
    so the draws are those of the uncaptured loop.
    """

    WARMUP_CALLS = 2

    def __init__(self, step: _StepFunction, x: torch.Tensor, first_step: tuple[int, int],
                 generator: Optional[torch.Generator]):
        self.x = x.clone()
        self.t = torch.full((), first_step[0], dtype=torch.int64, device=x.device)
        self.prev = torch.full((), first_step[1], dtype=torch.int64, device=x.device)
        device = x.device
        saved = _rng_state(generator, device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP_CALLS):
                step(self.x, self.t, self.prev)
            _restore_rng_state(generator, device, saved)
            self.graph = torch.cuda.CUDAGraph()
            if generator is not None:
                self.graph.register_generator_state(generator)
            # capture_begin directly rather than torch.cuda.graph(), whose entry synchronizes the device
            self.graph.capture_begin()
            try:
                self.out = step(self.x, self.t, self.prev)
            finally:
                self.graph.capture_end()
        torch.cuda.current_stream(device).wait_stream(side)

    def __call__(self, x: torch.Tensor, t: int, prev: int) -> torch.Tensor:
        self.x.copy_(x)
        self.t.fill_(t)
        self.prev.fill_(prev)
        self.graph.replay()
        return self.out


def _rng_state(generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    """The (host-side) seed and offset of ``generator``, or of the device's default generator."""
    return generator.get_state() if generator is not None else torch.cuda.get_rng_state(device)


def _restore_rng_state(generator: Optional[torch.Generator], device: torch.device, state: torch.Tensor) -> None:
    if generator is not None:
        generator.set_state(state)
    else:
        torch.cuda.set_rng_state(state, device)


def _check_like(tensor: object, name: str, reference: torch.Tensor, reference_name: str) -> None:
    check_float_tensor(tensor, name)
    if tensor.shape != reference.shape or tensor.device != reference.device:
        raise ValueError(f"{name} must have the shape and device of {reference_name} ({list(reference.shape)}, "
                         f"{reference.device}); got {describe(tensor)}")


def _check_mask(mask: object, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """An inpainting mask ``[n, 1 or C, H, W]`` (float or bool, values in [0, 1]) in the sample's dtype."""
    check_tensor(mask, "mask")
    n, channels, height, width = shape
    if mask.dim() != 4 or mask.shape[0] != n or mask.shape[1] not in (1, channels) or tuple(mask.shape[2:]) != (
            height, width):
        raise ValueError(f"mask must have shape [{n}, 1 or {channels}, {height}, {width}]; got {describe(mask)}")
    if mask.device != device:
        raise ValueError(f"mask must be on the model's device {device}; got {describe(mask)}")
    if mask.dtype != torch.bool:
        check_float_tensor(mask, "mask")
        check_in_range(mask, "mask", 0, 1, high_inclusive=True)
    return mask.to(dtype)
