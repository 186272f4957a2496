"""Diffusion denoise step cases: DDPM with given noise, DDPM drawing its own noise, deterministic DDIM, and DDIM
forward + backward (the gradient through a step, as guided or differentiable sampling takes it).

Traffic per call: ``sample`` and ``model_output`` read once, the result written once (and ``noise`` read once
when it is given), each ``numel * element_size`` bytes; forward + backward adds the incoming gradient read and the
two input gradients written.
"""
from __future__ import annotations

import torch

from genkernels.kernels import NoiseSchedule, ddim_step, ddpm_step
from genkernels.kernels.diffusion import ddim_step_reference, ddpm_step_reference

from ..providers import eager_triton_compile, eager_triton_compile_backward
from ..registry import Case, Workload, case_builder, seeded_generator

# [batch, channels, height, width] with 4M, 16M and 64M elements (e.g. 64 latents of 4x256x256)
SHAPES = {
    "cpu": [(2, 3, 16, 16)],
    "quick": [(16, 4, 256, 256), (64, 16, 256, 256)],
    "full": [(16, 4, 256, 256), (64, 4, 256, 256), (64, 16, 256, 256)],
}
DTYPES = {"cpu": [torch.float32], "quick": [torch.bfloat16], "full": [torch.bfloat16, torch.float32]}
SCHEDULE = NoiseSchedule.linear()


def _label(shape) -> str:
    numel = 1
    for size in shape:
        numel *= size
    return f"{numel // 2**20}M" if numel >= 2**20 else str(numel)


def _tensors(shape, dtype, device, count):
    generator = seeded_generator(device, 0)
    return [torch.randn(shape, generator=generator, device=device).to(dtype) for _ in range(count)]


def _ddpm_given_noise(shape, dtype):
    def setup(device):
        model_output, sample, noise = _tensors(shape, dtype, device, 3)
        timesteps = torch.arange(shape[0], device=device) * (SCHEDULE.num_train_timesteps // shape[0])
        options = dict(noise=noise, prediction_type="epsilon", clip_sample=True)

        def reference():
            return ddpm_step_reference(model_output.double(), timesteps, sample.double(), SCHEDULE,
                                       timesteps - 1, noise.double(), "epsilon", "fixed_small", True, 1.0)

        return Workload(eager_triton_compile(ddpm_step, model_output, timesteps, sample, SCHEDULE, **options),
                        bytes_moved=4 * sample.numel() * sample.element_size(), reference=reference,
                        notes="per-sample timesteps, clip_sample, noise given")
    return setup


def _ddpm_drawn_noise(shape, dtype):
    def setup(device):
        model_output, sample = _tensors(shape, dtype, device, 2)
        generator = seeded_generator(device, 1)
        return Workload(eager_triton_compile(ddpm_step, model_output, 500, sample, SCHEDULE, generator=generator),
                        bytes_moved=3 * sample.numel() * sample.element_size(),
                        notes="noise drawn inside the step (Philox in the kernel, torch.randn in eager); "
                              "outputs are random, so no error column")
    return setup


def _ddim(shape, dtype):
    def setup(device):
        model_output, sample = _tensors(shape, dtype, device, 2)

        def reference():
            t = torch.full((shape[0],), 500, device=device)
            return ddim_step_reference(model_output.double(), t, sample.double(), SCHEDULE, t - 20, None, 0.0)

        return Workload(eager_triton_compile(ddim_step, model_output, 500, sample, SCHEDULE, prev_timestep=480),
                        bytes_moved=3 * sample.numel() * sample.element_size(), reference=reference,
                        notes="eta = 0 (deterministic DDIM)")
    return setup


def _ddim_forward_backward(shape, dtype):
    def setup(device):
        model_output, sample, grad_out = _tensors(shape, dtype, device, 3)
        leaves = [t.requires_grad_(True) for t in (model_output, sample)]

        def step(model_output, sample, impl):
            return ddim_step(model_output, 500, sample, SCHEDULE, prev_timestep=480, impl=impl)

        def reference():
            m, x = (t.detach().double().requires_grad_(True) for t in leaves)
            t = torch.full((shape[0],), 500, device=device)
            out = ddim_step_reference(m, t, x, SCHEDULE, t - 20, None, 0.0)
            return torch.autograd.grad(out, (m, x), grad_out.double())[0]

        return Workload(eager_triton_compile_backward(step, leaves, (grad_out,)),
                        bytes_moved=6 * sample.numel() * sample.element_size(), reference=reference,
                        notes="eta = 0; gradients of model_output and sample (the error column: model_output's)")
    return setup


@case_builder
def diffusion_cases(size: str):
    for dtype in DTYPES[size]:
        for shape in SHAPES[size]:
            params = {"shape": list(shape), "dtype": str(dtype).replace("torch.", "")}
            tag = f"[{params['dtype']},{_label(shape)}]"
            yield Case(f"diffusion.ddpm_step{tag}", "diffusion", "op", params, _ddpm_given_noise(shape, dtype))
            yield Case(f"diffusion.ddpm_step_drawn_noise{tag}", "diffusion", "op", params,
                       _ddpm_drawn_noise(shape, dtype))
            yield Case(f"diffusion.ddim_step{tag}", "diffusion", "op", params, _ddim(shape, dtype))
            if shape == SHAPES[size][0]:
                yield Case(f"diffusion.ddim_step_fwd_bwd{tag}", "diffusion", "op", params,
                           _ddim_forward_backward(shape, dtype))
