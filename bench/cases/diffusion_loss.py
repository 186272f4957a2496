"""Diffusion training-step op cases: the forward process ``q_sample`` and the fused training loss ``diffusion_loss``
(v-prediction, mean reduction, per-sample timesteps), forward and forward + backward, with the noise regenerated
from a seed (the fused path) or read from a tensor.

Traffic per call, ``N`` elements of ``e`` bytes each (the noise tensor in the same dtype; the scalar loss, the
per-block partial sums and the timesteps are negligible), as the Triton kernels perform it:
* ``q_sample``: ``x0`` read, ``x_t`` written: ``2 N e``; ``q_sample_given_noise``: ``3 N e``.
* ``diffusion_loss[fwd]``: ``model_output`` and ``x0`` read: ``2 N e``; ``diffusion_loss_given_noise[fwd]``:
  ``3 N e``.
* ``diffusion_loss[fwd+bwd]`` (gradient for ``model_output`` only): the forward's reads plus the stored gradient
  written (``N e``), then the backward's scale reads it and writes ``grad_model_output`` (``2 N e``): ``5 N e``;
  ``6 N e`` with the noise given.
The eager and compiled providers are charged the same bytes (what the op needs at least in this design), so their
GB/s compare times.

Providers of the seeded cases do what plain PyTorch would: ``q_sample``'s eager and compiled providers draw the
noise with ``torch.randn`` (so those rows have no error column: the triton row's accuracy is the tests' business),
and the loss's read a stored noise tensor holding the seed's draws (the same values, so the error column stands).
"""
from __future__ import annotations

import torch

from genkernels.kernels.diffusion import NoiseSchedule
from genkernels.kernels.diffusion_loss import diffusion_loss, diffusion_loss_reference, q_sample, q_sample_reference
from genkernels.kernels.philox import philox_normal

from ..providers import eager_triton_compile, eager_triton_compile_backward, torch_compile
from ..registry import Case, Workload, case_builder, seeded_generator

# U-Net training batches: pixel space at 64x64 and 256x256, latents of 4 channels
SHAPES = {
    "cpu": [(2, 3, 16, 16)],
    "quick": [(128, 3, 64, 64), (64, 4, 128, 128)],
    "full": [(128, 3, 64, 64), (64, 4, 128, 128), (16, 3, 256, 256), (64, 4, 64, 64)],
}
DTYPES = {"cpu": [torch.float32], "quick": [torch.bfloat16], "full": [torch.bfloat16, torch.float32]}
SCHEDULE = NoiseSchedule.linear()
PREDICTION_TYPE = "v_prediction"


def _randn(shape, dtype, device, seed):
    generator = seeded_generator(device, seed)
    return torch.randn(shape, generator=generator, device=device).to(dtype)


def _batch_inputs(shape, dtype, device):
    """``x0``, per-sample timesteps spread over the schedule, a Philox seed and the fp64 noise it stands for."""
    x0 = _randn(shape, dtype, device, 0)
    timesteps = torch.arange(shape[0], device=device) * (SCHEDULE.num_train_timesteps // shape[0])
    seed = torch.tensor([20240], dtype=torch.int64, device=device)
    return x0, timesteps, seed, philox_normal(seed, shape).double()


def _noise_kwargs(given_noise, seed, noise64, dtype):
    return {"noise": noise64.to(dtype)} if given_noise else {"seed": seed}


def _q_sample(shape, dtype, given_noise):
    def setup(device):
        x0, timesteps, seed, noise64 = _batch_inputs(shape, dtype, device)
        kwargs = _noise_kwargs(given_noise, seed, noise64, dtype)
        reference_noise = kwargs["noise"].double() if given_noise else noise64
        providers = eager_triton_compile(q_sample, x0, timesteps, SCHEDULE, **kwargs)
        if not given_noise:
            def drawn_eagerly(x0, timesteps):
                return q_sample(x0, timesteps, SCHEDULE, noise=torch.randn_like(x0), impl="eager")

            compiled = torch_compile(drawn_eagerly)
            providers.update(eager=lambda: drawn_eagerly(x0, timesteps), compile=lambda: compiled(x0, timesteps))
        return Workload(providers, bytes_moved=(3 if given_noise else 2) * x0.numel() * x0.element_size(),
                        reference=(lambda: q_sample_reference(x0.double(), timesteps, SCHEDULE, reference_noise))
                        if given_noise else None,
                        notes="noise read from a tensor" if given_noise else
                        "triton: noise drawn in the kernel from a seed; eager, compile: torch.randn")
    return setup


def _loss_forward(shape, dtype, given_noise):
    def setup(device):
        x0, timesteps, seed, noise64 = _batch_inputs(shape, dtype, device)
        model_output = _randn(shape, dtype, device, 1)
        kwargs = _noise_kwargs(given_noise, seed, noise64, dtype)
        reference_noise = kwargs["noise"].double() if given_noise else noise64

        def reference():
            return diffusion_loss_reference(model_output.double(), x0.double(), timesteps, SCHEDULE,
                                            reference_noise, PREDICTION_TYPE)

        providers = eager_triton_compile(diffusion_loss, model_output, x0, timesteps, SCHEDULE, **kwargs,
                                         prediction_type=PREDICTION_TYPE)
        if not given_noise:  # plain PyTorch reads the noise it drew for q_sample
            stored = eager_triton_compile(diffusion_loss, model_output, x0, timesteps, SCHEDULE,
                                          noise=noise64.to(dtype), prediction_type=PREDICTION_TYPE)
            providers.update(eager=stored["eager"], compile=stored["compile"])
        return Workload(providers, bytes_moved=(3 if given_noise else 2) * x0.numel() * x0.element_size(),
                        reference=reference, notes="v-prediction, mean, per-sample timesteps; "
                        + ("noise read" if given_noise else "noise regenerated from the seed"))
    return setup


def _loss_forward_backward(shape, dtype, given_noise):
    def setup(device):
        x0, timesteps, seed, noise64 = _batch_inputs(shape, dtype, device)
        model_output = _randn(shape, dtype, device, 1).requires_grad_()
        kwargs = _noise_kwargs(given_noise, seed, noise64, dtype)
        reference_noise = kwargs["noise"].double() if given_noise else noise64

        def loss(output, impl):
            # plain PyTorch (eager, compile) reads the noise it drew for q_sample: the seed's draws, stored
            noise_source = kwargs if impl == "triton" else {"noise": noise64.to(dtype)}
            return diffusion_loss(output, x0, timesteps, SCHEDULE, **noise_source, prediction_type=PREDICTION_TYPE,
                                  impl=impl)

        def reference():
            output = model_output.detach().double().requires_grad_()
            value = diffusion_loss_reference(output, x0.double(), timesteps, SCHEDULE, reference_noise,
                                             PREDICTION_TYPE)
            return torch.autograd.grad(value, output)[0]

        providers = eager_triton_compile_backward(loss, [model_output], torch.ones((), device=device))
        return Workload(providers, bytes_moved=(6 if given_noise else 5) * x0.numel() * x0.element_size(),
                        reference=reference, notes="gradient of model_output (the error column); "
                        + ("noise read" if given_noise else "noise regenerated from the seed"))
    return setup


@case_builder
def diffusion_loss_cases(size: str):
    for dtype in DTYPES[size]:
        for shape in SHAPES[size]:
            params = {"shape": list(shape), "dtype": str(dtype).replace("torch.", "")}
            tag = f"{params['dtype']},{'x'.join(map(str, shape))}"
            for given_noise in (False, True):
                suffix = "_given_noise" if given_noise else ""
                noise_params = dict(params, noise="tensor" if given_noise else "seed")
                yield Case(f"diffusion.q_sample{suffix}[{tag}]", "diffusion", "op", noise_params,
                           _q_sample(shape, dtype, given_noise))
                yield Case(f"diffusion.diffusion_loss{suffix}[fwd,{tag}]", "diffusion", "op", noise_params,
                           _loss_forward(shape, dtype, given_noise))
                yield Case(f"diffusion.diffusion_loss{suffix}[fwd+bwd,{tag}]", "diffusion", "op", noise_params,
                           _loss_forward_backward(shape, dtype, given_noise))
