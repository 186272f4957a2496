"""Fused diffusion denoise step (kernels/diffusion.py) against fp64 references and diffusers' schedulers."""
import math

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from diffusers import DDIMScheduler, DDPMScheduler
from reference_checks import (
    DTYPES,
    PER_SAMPLE_LAYOUTS,
    assert_close_to_reference,
    assert_standard_normal,
    random_tensor,
)

from genkernels.kernels import NoiseSchedule, ddim_step, ddpm_step
from genkernels.kernels.diffusion import PREDICTION_TYPES, ddim_step_reference, ddpm_step_reference
from genkernels.kernels.triton_helpers import sincos_turns
from genkernels.kernels.launch import draw_philox_seed
from genkernels.kernels.philox import philox_normal

SCHEDULE = NoiseSchedule.linear()
T = SCHEDULE.num_train_timesteps
LAST = T - 1


def _inputs(shape, dtype, device, seed=0):
    model_output = random_tensor(shape, dtype, seed, device)
    sample = random_tensor(shape, dtype, seed + 1, device)
    noise = random_tensor(shape, dtype, seed + 2, device)
    return model_output, sample, noise


def _as_batch(timestep, batch):
    if isinstance(timestep, int):
        return torch.full((batch,), timestep, dtype=torch.int64)
    return timestep.reshape(-1).expand(batch).to(torch.int64)


def _check_ddpm(shape, dtype, device, timestep, prev_timestep=None, layout=None, **options):
    model_output, sample, noise = _inputs(shape, dtype, device)
    if layout is not None:
        model_output, sample, noise = layout(model_output), layout(sample), layout(noise)
    kernel = ddpm_step(model_output, timestep, sample, SCHEDULE, prev_timestep=prev_timestep, noise=noise,
                       impl="triton", **options)
    eager = ddpm_step(model_output, timestep, sample, SCHEDULE, prev_timestep=prev_timestep, noise=noise,
                      impl="eager", **options)
    batch = shape[0]
    t = _as_batch(timestep, batch)
    prev = t - 1 if prev_timestep is None else _as_batch(prev_timestep, batch)
    reference = ddpm_step_reference(model_output.double(), t, sample.double(), SCHEDULE, prev, noise.double(),
                                    **options)
    assert kernel.stride() == torch.empty_like(sample).stride()
    assert_close_to_reference(kernel, reference, eager)


def _check_ddim(shape, dtype, device, timestep, prev_timestep, layout=None, eta=0.0, **options):
    model_output, sample, noise = _inputs(shape, dtype, device)
    if layout is not None:
        model_output, sample, noise = layout(model_output), layout(sample), layout(noise)
    kernel = ddim_step(model_output, timestep, sample, SCHEDULE, prev_timestep=prev_timestep, eta=eta,
                       noise=noise, impl="triton", **options)
    eager = ddim_step(model_output, timestep, sample, SCHEDULE, prev_timestep=prev_timestep, eta=eta, noise=noise,
                      impl="eager", **options)
    batch = shape[0]
    reference = ddim_step_reference(model_output.double(), _as_batch(timestep, batch), sample.double(), SCHEDULE,
                                    _as_batch(prev_timestep, batch), noise.double(), eta, **options)
    assert_close_to_reference(kernel, reference, eager)


# ---------------------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------------------
def test_linear_schedule_matches_closed_form():
    schedule = NoiseSchedule.linear(10, beta_start=0.1, beta_end=0.5)
    betas = np.linspace(0.1, 0.5, 10)
    np.testing.assert_allclose(schedule.betas.numpy(), betas, rtol=1e-12)
    np.testing.assert_allclose(schedule.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-12)
    assert schedule.num_train_timesteps == 10


def test_scaled_linear_schedule_matches_closed_form():
    schedule = NoiseSchedule.scaled_linear(7)
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 7) ** 2
    np.testing.assert_allclose(schedule.betas.numpy(), betas, rtol=1e-12)


def test_cosine_schedule_matches_closed_form():
    schedule = NoiseSchedule.cosine(50)

    def alpha_bar(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    # alphas_cumprod telescopes to alpha_bar(t + 1) / alpha_bar(0) wherever no beta was capped
    capped = schedule.betas >= 0.999
    expected = np.array([alpha_bar((t + 1) / 50) / alpha_bar(0) for t in range(50)])
    np.testing.assert_allclose(schedule.alphas_cumprod.numpy()[~capped.numpy()], expected[~capped.numpy()],
                               rtol=1e-10)
    assert capped.any(), "the cosine schedule caps its last beta at 0.999"


@pytest.mark.parametrize("name,factory,kwargs", [
    ("linear", NoiseSchedule.linear, {}),
    ("scaled_linear", NoiseSchedule.scaled_linear, {"beta_start": 0.00085, "beta_end": 0.012}),
    ("squaredcos_cap_v2", NoiseSchedule.cosine, {}),
])
def test_schedules_match_diffusers(name, factory, kwargs):
    theirs = DDPMScheduler(beta_schedule=name, **kwargs)
    ours = factory()
    torch.testing.assert_close(ours.betas, theirs.betas.double(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod.double(), rtol=1e-4, atol=1e-7)


def test_schedule_to_device_and_kernel_table(device):
    moved = SCHEDULE.to(device)
    assert moved.betas.device.type == torch.device(device).type
    table = moved.kernel_table(torch.device(device))
    assert table.dtype == torch.float32 and table.shape == (2, T)
    torch.testing.assert_close(table[1].double(), 1 - SCHEDULE.alphas_cumprod.to(device), rtol=1e-6, atol=0)
    assert moved.kernel_table(torch.device(device)) is table, "the per-device table is cached"


# ---------------------------------------------------------------------------------------------------------------
# The math, against diffusers (independent implementation), in fp64 with the same table
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("timestep", [LAST, 500, 1, 0])
def test_ddpm_reference_matches_diffusers(prediction_type, variance_type, timestep):
    theirs = DDPMScheduler(prediction_type=prediction_type, variance_type=variance_type, clip_sample=True)
    theirs.alphas_cumprod = SCHEDULE.alphas_cumprod.clone()
    model_output, sample, _ = _inputs((2, 3, 4, 4), torch.float64, "cpu")
    expected = theirs.step(model_output, timestep, sample, generator=torch.Generator().manual_seed(5)).prev_sample
    noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ours = ddpm_step_reference(model_output, _as_batch(timestep, 2), sample, SCHEDULE, _as_batch(timestep - 1, 2),
                               noise, prediction_type, variance_type, True, 1.0)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("eta", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("use_clipped_model_output", [False, True])
def test_ddim_reference_matches_diffusers(prediction_type, set_alpha_to_one, eta, use_clipped_model_output):
    theirs = DDIMScheduler(prediction_type=prediction_type, set_alpha_to_one=set_alpha_to_one, clip_sample=True,
                           clip_sample_range=1.5)
    theirs.set_timesteps(20)
    theirs.alphas_cumprod = SCHEDULE.alphas_cumprod.clone()
    theirs.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64) if set_alpha_to_one \
        else SCHEDULE.alphas_cumprod[0].clone()
    model_output, sample, _ = _inputs((2, 3, 4, 4), torch.float64, "cpu", seed=3)
    for timestep in (950, 500, 0):  # 0 steps to prev_timestep -50: the final step
        expected = theirs.step(model_output, timestep, sample, eta=eta,
                               use_clipped_model_output=use_clipped_model_output,
                               generator=torch.Generator().manual_seed(7)).prev_sample
        noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        ours = ddim_step_reference(model_output, _as_batch(timestep, 2), sample, SCHEDULE,
                                   _as_batch(timestep - 50, 2), noise, eta, prediction_type, True, 1.5,
                                   set_alpha_to_one, use_clipped_model_output)
        torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-9)


def test_ddpm_reference_spot_value_by_hand():
    # epsilon prediction, t = 1 -> 0 of a 2-step schedule, computed from the paper's formulas by hand
    schedule = NoiseSchedule(torch.tensor([0.1, 0.2], dtype=torch.float64))
    a0, a1 = 0.9, 0.9 * 0.8
    x, eps, z = 0.7, -0.3, 0.5
    x0 = (x - math.sqrt(1 - a1) * eps) / math.sqrt(a1)
    mean = math.sqrt(a0) * 0.2 / (1 - a1) * x0 + math.sqrt(0.8) * (1 - a0) / (1 - a1) * x
    sigma = math.sqrt((1 - a0) / (1 - a1) * 0.2)
    out = ddpm_step_reference(torch.tensor([[eps]], dtype=torch.float64), torch.tensor([1]),
                              torch.tensor([[x]], dtype=torch.float64), schedule, torch.tensor([0]),
                              torch.tensor([[z]], dtype=torch.float64))
    assert out.item() == pytest.approx(mean + sigma * z, rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Kernel vs fp64 reference
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("clip_sample", [False, True])
def test_ddpm_step_options(dtype, prediction_type, variance_type, clip_sample, device):
    timesteps = torch.tensor([0, 1, 500, LAST], device=device)
    _check_ddpm((4, 3, 5, 7), dtype, device, timesteps, prediction_type=prediction_type,
                variance_type=variance_type, clip_sample=clip_sample, clip_sample_range=0.8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", PER_SAMPLE_LAYOUTS, ids=lambda layout: layout.name)
def test_ddpm_step_layouts(dtype, layout, device):
    _check_ddpm(layout.shape, dtype, device, 700, prev_timestep=650, layout=layout, prediction_type="v_prediction")


@pytest.mark.parametrize("timestep,prev_timestep", [(LAST, None), (0, None), (1, -1), (999, 0)])
def test_ddpm_step_int_timesteps(timestep, prev_timestep, device):
    _check_ddpm((2, 33), torch.float32, device, timestep, prev_timestep=prev_timestep, clip_sample=True)


def test_ddpm_step_scalar_tensor_timestep(device):
    _check_ddpm((3, 40), torch.float32, device, torch.tensor(321, device=device))
    _check_ddpm((3, 40), torch.float32, device, torch.tensor([321], device=device),
                prev_timestep=torch.tensor([300, 200, -1], device=device))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_options(dtype, prediction_type, eta, device):
    timesteps = torch.tensor([0, 20, 480, LAST], device=device)
    _check_ddim((4, 2, 9, 5), dtype, device, timesteps, timesteps - 20, eta=eta, prediction_type=prediction_type,
                clip_sample=True, clip_sample_range=1.2)


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("use_clipped_model_output", [True, False])
def test_ddim_step_final_alpha_and_clipped_output(set_alpha_to_one, use_clipped_model_output, device):
    _check_ddim((3, 50), torch.float32, device, torch.tensor([0, 5, 10], device=device), -1, eta=0.3,
                prediction_type="sample", clip_sample=True, set_alpha_to_one=set_alpha_to_one,
                use_clipped_model_output=use_clipped_model_output)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", PER_SAMPLE_LAYOUTS, ids=lambda layout: layout.name)
def test_ddim_step_layouts(dtype, layout, device):
    _check_ddim(layout.shape, dtype, device, 600, 550, layout=layout, eta=0.8)


# ---------------------------------------------------------------------------------------------------------------
# Classifier-free guidance fused into the step
# ---------------------------------------------------------------------------------------------------------------
def test_guided_reference_equals_reference_on_the_combined_output():
    """The guided reference is the plain reference applied to uncond + w * (cond - uncond), formed by hand."""
    cond, sample, noise = _inputs((3, 2, 5), torch.float64, "cpu")
    uncond = random_tensor((3, 2, 5), torch.float64, 9, "cpu")
    t, prev = torch.tensor([10, 400, 999]), torch.tensor([-1, 380, 979])
    combined = uncond + 4.0 * (cond - uncond)
    torch.testing.assert_close(
        ddpm_step_reference(cond, t, sample, SCHEDULE, prev, noise, uncond_output=uncond, guidance_scale=4.0),
        ddpm_step_reference(combined, t, sample, SCHEDULE, prev, noise), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        ddim_step_reference(cond, t, sample, SCHEDULE, prev, noise, 0.5, uncond_output=uncond, guidance_scale=4.0),
        ddim_step_reference(combined, t, sample, SCHEDULE, prev, noise, 0.5), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheduler", ["ddpm", "ddim"])
def test_guided_step_reads_halves_of_one_batched_output(dtype, scheduler, device):
    """cond and uncond as the two halves of one [2n, ...] network output (how samplers batch them)."""
    batch, shape = 3, (3, 4, 6, 5)
    both = random_tensor((2 * batch,) + shape[1:], dtype, 21, device).to(memory_format=torch.channels_last)
    cond, uncond = both[:batch], both[batch:]
    _, sample, noise = _inputs(shape, dtype, device)
    t = torch.tensor([999, 500, 3], device=device)
    prev = t - 3
    if scheduler == "ddpm":
        def run(impl):
            return ddpm_step(cond, t, sample, SCHEDULE, prev_timestep=prev, noise=noise, uncond_output=uncond,
                             guidance_scale=7.5, prediction_type="v_prediction", impl=impl)
        reference = ddpm_step_reference(cond.double(), t, sample.double(), SCHEDULE, prev, noise.double(),
                                        "v_prediction", uncond_output=uncond.double(), guidance_scale=7.5)
    else:
        def run(impl):
            return ddim_step(cond, t, sample, SCHEDULE, prev_timestep=prev, eta=0.5, noise=noise,
                             uncond_output=uncond, guidance_scale=7.5, impl=impl)
        reference = ddim_step_reference(cond.double(), t, sample.double(), SCHEDULE, prev, noise.double(), 0.5,
                                        uncond_output=uncond.double(), guidance_scale=7.5)
    assert_close_to_reference(run("triton"), reference, run("eager"))


@pytest.mark.parametrize("impl", ["triton", "eager"])
def test_guidance_scale_one_is_the_conditional_step(impl, device):
    cond, sample, noise = _inputs((2, 40), torch.float32, device)
    uncond = torch.full_like(cond, float("nan"))  # must not be read at scale 1
    guided = ddim_step(cond, 300, sample, SCHEDULE, prev_timestep=250, uncond_output=uncond, guidance_scale=1.0,
                       impl=impl)
    plain = ddim_step(cond, 300, sample, SCHEDULE, prev_timestep=250, impl=impl)
    torch.testing.assert_close(guided, plain, rtol=0, atol=0)


def test_guidance_scale_zero_is_the_unconditional_step(device):
    cond, sample, noise = _inputs((2, 40), torch.float32, device)
    uncond = random_tensor((2, 40), torch.float32, 5, device)
    guided = ddpm_step(cond, 300, sample, SCHEDULE, noise=noise, uncond_output=uncond, guidance_scale=0.0,
                       impl="triton")
    plain = ddpm_step(uncond, 300, sample, SCHEDULE, noise=noise, impl="triton")
    torch.testing.assert_close(guided, plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", ["triton", "eager"])
def test_rejects_bad_guidance_arguments(impl, device):
    cond, sample, _ = _inputs((2, 3, 4), torch.float32, device)
    with pytest.raises(ValueError, match="guidance_scale=3.0 needs uncond_output"):
        ddpm_step(cond, 5, sample, SCHEDULE, guidance_scale=3.0, impl=impl)
    with pytest.raises(ValueError, match="uncond_output"):
        ddpm_step(cond, 5, sample, SCHEDULE, uncond_output=cond[:, :2], guidance_scale=3.0, impl=impl)
    with pytest.raises(TypeError, match="uncond_output"):
        ddim_step(cond, 5, sample, SCHEDULE, prev_timestep=1, uncond_output=cond.half(), guidance_scale=3.0,
                  impl=impl)
    with pytest.raises(ValueError, match="guidance_scale"):
        ddim_step(cond, 5, sample, SCHEDULE, prev_timestep=1, uncond_output=cond, guidance_scale=float("nan"),
                  impl=impl)
    with pytest.raises(TypeError, match="guidance_scale"):
        ddim_step(cond, 5, sample, SCHEDULE, prev_timestep=1, uncond_output=cond, guidance_scale=None, impl=impl)


def test_inputs_inside_larger_buffers_are_read_only_in_bounds(device):
    # Views into NaN-filled buffers: any read outside a view would turn the result into NaN.
    def embedded(values):
        buffer = torch.full((values.shape[0] + 2, 2 * values.shape[1] + 3), float("nan"), device=device)
        view = buffer[1:-1, 3::2]
        view.copy_(values)
        return view

    model_output, sample, noise = _inputs((5, 77), torch.float32, device)
    out = ddpm_step(embedded(model_output), 400, embedded(sample), SCHEDULE, noise=embedded(noise), impl="triton")
    expected = ddpm_step(model_output, 400, sample, SCHEDULE, noise=noise, impl="eager")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_empty_batch_returns_empty(device):
    sample = torch.empty(0, 3, 4, device=device)
    for impl in ("triton", "eager"):
        out = ddpm_step(torch.empty_like(sample), 10, sample, SCHEDULE, impl=impl)
        assert out.shape == sample.shape and out.dtype == sample.dtype
        out = ddim_step(torch.empty_like(sample), 10, sample, SCHEDULE, prev_timestep=5, eta=1.0, impl=impl)
        assert out.shape == sample.shape


def test_schedule_table_moves_to_the_sample_device_once(device):
    schedule = NoiseSchedule.cosine(100)  # tables on the CPU; samples may live elsewhere
    model_output, sample, noise = _inputs((2, 10), torch.float32, device)
    ddpm_step(model_output, 50, sample, schedule, noise=noise, impl="triton")
    assert torch.device(device) in schedule._kernel_tables


# ---------------------------------------------------------------------------------------------------------------
# In-kernel Philox noise
# ---------------------------------------------------------------------------------------------------------------
def _kernel_noise(sample, timestep, generator):
    """The noise the kernel drew, recovered as (step with in-kernel noise - step without noise) / sigma."""
    model_output = torch.zeros_like(sample)
    noisy = ddpm_step(model_output, timestep, sample, SCHEDULE, generator=generator, variance_type="fixed_large",
                      impl="triton")
    clean = ddpm_step(model_output, timestep, sample, SCHEDULE, noise=torch.zeros_like(sample),
                      variance_type="fixed_large", impl="triton")
    sigma = SCHEDULE.betas[timestep].sqrt().item()
    return (noisy.double() - clean.double()) / sigma


def test_in_kernel_noise_is_standard_normal(device):
    sample = torch.zeros(4, 3, 64, 64, device=device)
    assert_standard_normal(_kernel_noise(sample, 800, torch.Generator(device).manual_seed(1234)))


def test_in_kernel_noise_is_reproducible_and_seeded(device):
    sample = torch.zeros(3, 1000, device=device)
    first = _kernel_noise(sample, 300, torch.Generator(device).manual_seed(7))
    again = _kernel_noise(sample, 300, torch.Generator(device).manual_seed(7))
    other = _kernel_noise(sample, 300, torch.Generator(device).manual_seed(8))
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert (first - other).abs().mean() > 0.5
    # samples of the batch get different draws
    assert (first[0] - first[1]).abs().mean() > 0.5


def test_in_kernel_noise_does_not_depend_on_input_strides(device):
    values = torch.zeros(3, 8, 20, device=device)
    contiguous = _kernel_noise(values, 300, torch.Generator(device).manual_seed(3))
    strided_input = torch.zeros(3, 16, 20, device=device)[:, ::2]
    strided = _kernel_noise(strided_input, 300, torch.Generator(device).manual_seed(3))
    torch.testing.assert_close(contiguous, strided, rtol=0, atol=0)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_in_kernel_noise_is_the_philox_normal_stream_of_the_drawn_seed(memory_format, device):
    """Each element's draw is keyed by its row-major index (four at a time for NCHW, one by one for
    channels_last), so philox_normal on the seed the generator gives reproduces it."""
    sample = torch.zeros(3, 5, 6, 7, device=device).to(memory_format=memory_format)
    drawn = _kernel_noise(sample, 300, torch.Generator(device).manual_seed(9))
    seed = draw_philox_seed(torch.device(device), torch.Generator(device).manual_seed(9))
    torch.testing.assert_close(drawn, philox_normal(seed, sample.shape).double(), rtol=1e-5, atol=1e-5)


def test_no_noise_at_timestep_zero(device):
    model_output, sample, noise = _inputs((2, 64), torch.float32, device)
    with_noise = ddpm_step(model_output, 0, sample, SCHEDULE, noise=noise, impl="triton")
    drawn = ddpm_step(model_output, 0, sample, SCHEDULE, generator=torch.Generator(device).manual_seed(0),
                      impl="triton")
    without = ddpm_step(model_output, 0, sample, SCHEDULE, noise=torch.zeros_like(noise), impl="triton")
    torch.testing.assert_close(with_noise, without, rtol=0, atol=0)
    torch.testing.assert_close(drawn, without, rtol=0, atol=0)


def test_ddim_eta_zero_is_deterministic_without_noise(device):
    model_output, sample, _ = _inputs((2, 64), torch.float32, device)
    first = ddim_step(model_output, 500, sample, SCHEDULE, prev_timestep=480, impl="triton")
    second = ddim_step(model_output, 500, sample, SCHEDULE, prev_timestep=480, impl="triton")
    torch.testing.assert_close(first, second, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one test per rejection, each naming the argument
# ---------------------------------------------------------------------------------------------------------------
def _good(device, dtype=torch.float32):
    model_output, sample, noise = _inputs((2, 3, 4), dtype, device)
    return model_output, sample, noise


@pytest.mark.parametrize("impl", ["triton", "eager"])
def test_rejects_shape_mismatch(impl, device):
    model_output, sample, noise = _good(device)
    with pytest.raises(ValueError, match="model_output"):
        ddpm_step(model_output[:, :2], 5, sample, SCHEDULE, impl=impl)
    with pytest.raises(ValueError, match="noise"):
        ddpm_step(model_output, 5, sample, SCHEDULE, noise=noise[:1], impl=impl)


def test_rejects_timestep_out_of_range(device):
    model_output, sample, _ = _good(device)
    with pytest.raises(ValueError, match=r"timestep=1000"):
        ddpm_step(model_output, T, sample, SCHEDULE)
    with pytest.raises(ValueError, match=r"timestep=-1"):
        ddpm_step(model_output, -1, sample, SCHEDULE)
    with pytest.raises(ValueError, match="timestep must lie in"):
        ddpm_step(model_output, torch.tensor([3, T]), sample.cpu(), SCHEDULE)
    with pytest.raises(ValueError, match="prev_timestep=1000"):
        ddim_step(model_output, 5, sample, SCHEDULE, prev_timestep=T)


def test_rejects_prev_timestep_not_before_timestep(device):
    model_output, sample, _ = _good(device)
    with pytest.raises(ValueError, match="prev_timestep=5 must be smaller than timestep=5"):
        ddpm_step(model_output, 5, sample, SCHEDULE, prev_timestep=5)
    with pytest.raises(ValueError, match=r"prev_timestep must be smaller than timestep.*\[4, 8\].*value 9"):
        ddim_step(model_output.cpu(), torch.tensor([4, 8]), sample.cpu(), SCHEDULE, prev_timestep=torch.tensor([3, 9]))


def test_rejects_timestep_tensor_of_wrong_length(device):
    model_output, sample, _ = _good(device)
    with pytest.raises(ValueError, match=r"timestep must be a scalar or have shape \[batch\] = \[2\]"):
        ddpm_step(model_output, torch.tensor([1, 2, 3], device=device), sample, SCHEDULE)


def test_rejects_float_timestep_tensor(device):
    model_output, sample, _ = _good(device)
    with pytest.raises(TypeError, match="timestep must have an integer dtype"):
        ddpm_step(model_output, torch.tensor([1.0, 2.0], device=device), sample, SCHEDULE)
    with pytest.raises(TypeError, match="timestep must be an int"):
        ddpm_step(model_output, 3.0, sample, SCHEDULE)


def test_rejects_unknown_prediction_type(device):
    model_output, sample, _ = _good(device)
    with pytest.raises(ValueError, match="prediction_type='x0'.*'epsilon'"):
        ddpm_step(model_output, 5, sample, SCHEDULE, prediction_type="x0")
    with pytest.raises(ValueError, match="prediction_type"):
        ddim_step(model_output, 5, sample, SCHEDULE, prev_timestep=1, prediction_type="eps")


def test_rejects_unknown_variance_type(device):
    model_output, sample, _ = _good(device)
    with pytest.raises(ValueError, match="variance_type='learned'"):
        ddpm_step(model_output, 5, sample, SCHEDULE, variance_type="learned")


def test_rejects_non_float_dtypes(device):
    model_output, sample, _ = _good(device)
    with pytest.raises(TypeError, match="sample must have a floating-point dtype.*torch.int64"):
        ddpm_step(model_output, 5, sample.long(), SCHEDULE)
    with pytest.raises(TypeError, match="model_output must have a floating-point dtype"):
        ddpm_step(model_output.int(), 5, sample, SCHEDULE)
    with pytest.raises(TypeError, match="model_output must have the dtype of sample"):
        ddpm_step(model_output.half(), 5, sample, SCHEDULE)


def test_rejects_tensors_on_different_devices(device):
    model_output, sample, noise = _good(device)
    with pytest.raises(ValueError, match="one device.*noise on meta"):
        ddpm_step(model_output, 5, sample, SCHEDULE, noise=noise.to("meta"))
    with pytest.raises(ValueError, match="timestep must be on the device of sample"):
        ddpm_step(model_output, torch.tensor([1, 2], device="meta"), sample, SCHEDULE)


def test_rejects_bad_eta_and_clip_range(device):
    model_output, sample, _ = _good(device)
    with pytest.raises(ValueError, match="eta=-0.1"):
        ddim_step(model_output, 5, sample, SCHEDULE, prev_timestep=1, eta=-0.1)
    with pytest.raises(ValueError, match="eta=1.5"):
        ddim_step(model_output, 5, sample, SCHEDULE, prev_timestep=1, eta=1.5)
    with pytest.raises(ValueError, match="clip_sample_range=0"):
        ddpm_step(model_output, 5, sample, SCHEDULE, clip_sample=True, clip_sample_range=0)


def test_rejects_bad_schedule_and_generator(device):
    model_output, sample, _ = _good(device)
    with pytest.raises(TypeError, match="schedule must be a NoiseSchedule"):
        ddpm_step(model_output, 5, sample, SCHEDULE.betas)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        ddpm_step(model_output, 5, sample, SCHEDULE, generator=0)
    with pytest.raises(TypeError, match="clip_sample must be a bool"):
        ddpm_step(model_output, 5, sample, SCHEDULE, clip_sample=1)


def test_rejects_bad_betas():
    with pytest.raises(ValueError, match="betas must lie in"):
        NoiseSchedule(torch.tensor([0.1, 0.0]))
    with pytest.raises(ValueError, match="betas must be a non-empty 1-D tensor"):
        NoiseSchedule(torch.ones(2, 2) * 0.1)
    with pytest.raises(ValueError, match="num_train_timesteps must be >= 1"):
        NoiseSchedule.linear(0)


def test_rejects_unknown_impl(device):
    model_output, sample, _ = _good(device)
    with pytest.raises(ValueError, match="impl='cuda'.*auto, triton, eager"):
        ddpm_step(model_output, 5, sample, SCHEDULE, impl="cuda")


# ---------------------------------------------------------------------------------------------------------------
# Indexing past 2**31 elements, and GPU-only checks at real sizes
# ---------------------------------------------------------------------------------------------------------------
def test_offsets_past_2_31_elements_are_computed_in_int64(device):
    # Views into one 8 GiB buffer (pages are only committed where written) whose last elements lie past 2**31:
    # int32 offsets would wrap around and read or write the wrong place.
    big = torch.empty(2**31 + 4096, dtype=torch.float32, device=device)
    batch_strided = [big.as_strided((3, 16), (2**30 + 8, 1), offset) for offset in (0, 32, 64)]
    inner_strided = [big.as_strided((2, 3), (1, 2**30 + 5), offset) for offset in (100, 200, 300)]
    for model_output, sample, noise in (batch_strided, inner_strided):
        for view, seed in ((model_output, 0), (sample, 1), (noise, 2)):
            view.copy_(random_tensor(view.shape, torch.float32, seed, device))
        values = [t.clone() for t in (model_output, sample, noise)]
        kernel = ddpm_step(model_output, 900, sample, SCHEDULE, noise=noise, impl="triton")
        expected = ddpm_step(values[0], 900, values[1], SCHEDULE, noise=values[2], impl="eager")
        torch.testing.assert_close(kernel, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_shapes_on_gpu(dtype):
    shape = (64, 16, 256, 256)  # 64M elements
    _check_ddpm(shape, dtype, "cuda", torch.arange(64, device="cuda") * 15, prediction_type="v_prediction",
                clip_sample=True)
    _check_ddim(shape, dtype, "cuda", 800, 780, eta=0.3)


@pytest.mark.gpu
def test_more_than_2_31_elements_on_gpu():
    shape = (2, 2**30 + 3)  # 2**31 + 6 elements per tensor
    model_output, sample = (torch.randn(shape, device="cuda") for _ in range(2))
    kernel = ddim_step(model_output, 400, sample, SCHEDULE, prev_timestep=380, impl="triton")
    tail = slice(2**30 - 5, None)
    expected = ddim_step(model_output[:, tail], 400, sample[:, tail], SCHEDULE, prev_timestep=380, impl="eager")
    torch.testing.assert_close(kernel[:, tail], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_sampling_loop_is_captured_in_a_cuda_graph():
    """No host synchronization inside the step: a whole DDPM loop with per-sample timesteps and in-kernel noise
    replays from a CUDA graph, and each replay draws fresh noise."""
    sample = torch.randn(4, 3, 32, 32, device="cuda")
    timesteps = [torch.full((4,), t, device="cuda") for t in range(999, 989, -1)]
    SCHEDULE.kernel_table(torch.device("cuda"))  # created outside the capture
    static = sample.clone()

    def loop():
        x = static
        for t in timesteps:
            x = ddpm_step(torch.tanh(x), t, x, SCHEDULE, impl="triton")
        return x

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        loop()  # warm-up: compile the kernel outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = loop()
    graph.replay()
    first = out.clone()
    graph.replay()
    assert torch.isfinite(first).all()
    assert (first - out).abs().mean() > 1e-3, "each replay draws new noise"


# ---------------------------------------------------------------------------------------------------------------
# Gradients: the fused step differentiates like the eager reference (it used to return a detached result)
# ---------------------------------------------------------------------------------------------------------------
_GRAD_SHAPE = (4, 3, 5, 7)
# per-sample steps: the first, a middle one, DDPM's noiseless t = 0, and final steps to a_prev = 1
_GRAD_TIMESTEPS = ([999, 500, 1, 0], [960, 480, 0, -1])
_DDIM_GRAD_OPTIONS = [dict(eta=0.0), dict(eta=0.6, set_alpha_to_one=False, use_clipped_model_output=True),
                      dict(eta=1.0)]


def _call_step(scheduler, impl, model_output, sample, noise, uncond, guidance, **options):
    t, prev = (torch.tensor(v, device=sample.device) for v in _GRAD_TIMESTEPS)
    guided = dict(uncond_output=uncond, guidance_scale=3.5) if guidance else {}
    step = ddpm_step if scheduler == "ddpm" else ddim_step
    return step(model_output, t, sample, SCHEDULE, prev_timestep=prev, noise=noise, impl=impl, **guided, **options)


def _check_step_gradients(scheduler, dtype, device, guidance=False, layout=None, **options):
    values = [random_tensor(_GRAD_SHAPE, dtype, seed, device) for seed in range(4)]
    grad_out = random_tensor(_GRAD_SHAPE, dtype, 9, device)

    def gradients(impl, cast):
        inputs = [cast(v).requires_grad_() for v in values]
        laid = [layout(x) if layout is not None else x for x in inputs]
        out = _call_step(scheduler, impl, *laid, guidance, **options)
        assert out.requires_grad
        wanted = inputs if guidance else inputs[:3]
        return torch.autograd.grad(out, wanted, cast(grad_out), allow_unused=True)

    kernel = gradients("triton", lambda v: v.clone())
    eager = gradients("eager", lambda v: v.clone())
    reference = gradients("eager", lambda v: v.double())
    for name, k, e, r in zip(("model_output", "sample", "noise", "uncond_output"), kernel, eager, reference):
        assert (k is None) == (e is None) == (r is None), name
        if k is not None:
            assert k.dtype == e.dtype and k.shape == e.shape, name
            assert_close_to_reference(k, r, e)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("clip_sample", [False, True])
@pytest.mark.parametrize("guidance", [False, True])
def test_ddpm_step_gradients_match_autograd_of_the_reference(prediction_type, variance_type, clip_sample, guidance,
                                                              device):
    _check_step_gradients("ddpm", torch.float32, device, guidance, prediction_type=prediction_type,
                          variance_type=variance_type, clip_sample=clip_sample, clip_sample_range=0.8)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("options", _DDIM_GRAD_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("clip_sample", [False, True])
@pytest.mark.parametrize("guidance", [False, True])
def test_ddim_step_gradients_match_autograd_of_the_reference(prediction_type, options, clip_sample, guidance,
                                                              device):
    _check_step_gradients("ddim", torch.float32, device, guidance, prediction_type=prediction_type,
                          clip_sample=clip_sample, clip_sample_range=0.8, **options)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheduler", ["ddpm", "ddim"])
def test_step_gradients_in_every_dtype(dtype, scheduler, device):
    options = dict(eta=0.5) if scheduler == "ddim" else {}
    _check_step_gradients(scheduler, dtype, device, True, prediction_type="v_prediction", clip_sample=True,
                          **options)


_GRAD_LAYOUTS = {
    "channels_last": lambda x: x.to(memory_format=torch.channels_last),
    "transposed": lambda x: x.transpose(2, 3).contiguous().transpose(2, 3),
    "sliced": lambda x: torch.cat([x, x], dim=1)[:, ::2],
    "batch_sliced": lambda x: torch.cat([x, x], dim=0)[::2],
}


@pytest.mark.parametrize("layout", sorted(_GRAD_LAYOUTS))
def test_step_gradients_on_strided_inputs(layout, device):
    _check_step_gradients("ddim", torch.float32, device, True, layout=_GRAD_LAYOUTS[layout], eta=0.4,
                          clip_sample=True)
    _check_step_gradients("ddpm", torch.float32, device, False, layout=_GRAD_LAYOUTS[layout],
                          prediction_type="sample", clip_sample=True)


def test_step_gradient_of_a_sum_reads_an_expanded_gradient_and_only_the_inputs_that_need_one(device):
    model_output, sample, noise = _inputs((3, 2, 9), torch.float32, device)
    sample.requires_grad_()
    results = {}
    for impl in ("triton", "eager"):
        sample.grad = None
        ddpm_step(model_output, torch.tensor([30, 20, 0], device=device), sample, SCHEDULE, noise=noise,
                  clip_sample=True, impl=impl).sum().backward()  # d sum / d out is an expanded (stride 0) tensor
        results[impl] = sample.grad.clone()
    torch.testing.assert_close(results["triton"], results["eager"], rtol=1e-5, atol=1e-6)
    assert model_output.grad is None and noise.grad is None


def test_gradients_pass_through_the_compiled_step(device):
    def step(model_output, sample):
        return ddim_step(model_output, 600, sample, SCHEDULE, prev_timestep=550, clip_sample=True, impl="triton")

    model_output, sample, _ = _inputs((2, 3, 8), torch.float32, device)
    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")
    grads = []
    for fn in (compiled, step):
        inputs = [model_output.clone().requires_grad_(), sample.clone().requires_grad_()]
        fn(*inputs).square().sum().backward()
        grads.append([x.grad for x in inputs])
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# NaN and +-Inf: NaN stays NaN through the clamp; a term with a zero coefficient is left out, never 0 * Inf
# ---------------------------------------------------------------------------------------------------------------
def _with_specials(shape, dtype, device):
    """Inputs with +Inf, -Inf and NaN in sample, model_output and noise, each at positions of its own."""
    model_output, sample, noise = _inputs(shape, dtype, device)
    for k, tensor in enumerate((sample, model_output, noise)):
        flat = tensor.view(shape[0], -1)
        for j, value in enumerate((math.inf, -math.inf, math.nan)):
            flat[:, 3 * k + j] = value
    return model_output, sample, noise


def _check_special(scheduler, shape, timestep, prev_timestep, device, **options):
    model_output, sample, noise = _with_specials(shape, torch.float32, device)
    step = ddpm_step if scheduler == "ddpm" else ddim_step
    outs = [step(m, timestep, x, SCHEDULE, prev_timestep=prev_timestep, noise=z, impl=impl, **options)
            for impl, (m, x, z) in (("triton", (model_output, sample, noise)), ("eager", (model_output, sample, noise)),
                                    ("eager", (model_output.double(), sample.double(), noise.double())))]
    assert_close_to_reference(*outs[0::2], outs[1])
    return outs[0]


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("clip_sample", [False, True])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ddpm_step_special_values_follow_the_reference(prediction_type, clip_sample, variance_type, device):
    _check_special("ddpm", (4, 12), torch.tensor([999, 500, 1, 0], device=device),
                   torch.tensor([960, 480, 0, -1], device=device), device, prediction_type=prediction_type,
                   clip_sample=clip_sample, variance_type=variance_type)
    _check_special("ddpm", (2, 12), 0, None, device, prediction_type=prediction_type, clip_sample=clip_sample)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("clip_sample", [False, True])
@pytest.mark.parametrize("options", _DDIM_GRAD_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_ddim_step_special_values_follow_the_reference(prediction_type, clip_sample, options, device):
    _check_special("ddim", (4, 12), torch.tensor([999, 500, 20, 0], device=device),
                   torch.tensor([960, 480, -1, -1], device=device), device, prediction_type=prediction_type,
                   clip_sample=clip_sample, **options)


def test_clip_sample_keeps_nan(device):
    """torch.clamp keeps NaN; tl.minimum/tl.maximum drop it unless told to propagate it."""
    model_output, sample, noise = _inputs((2, 8), torch.float32, device)
    model_output[:, 3] = math.nan
    ddpm = ddpm_step(model_output, 300, sample, SCHEDULE, noise=noise, clip_sample=True, impl="triton")
    ddim = ddim_step(model_output, 300, sample, SCHEDULE, prev_timestep=250, clip_sample=True,
                     use_clipped_model_output=True, impl="triton")
    for out in (ddpm, ddim):
        assert torch.isnan(out[:, 3]).all() and torch.isfinite(out[:, [0, 1, 2, 4, 5, 6, 7]]).all()


def _diffusers_ddim(prediction_type="epsilon"):
    theirs = DDIMScheduler(prediction_type=prediction_type, clip_sample=False)
    theirs.set_timesteps(20)
    theirs.alphas_cumprod = SCHEDULE.alphas_cumprod.clone()
    return theirs


def _diffusers_ddpm(prediction_type="epsilon"):
    theirs = DDPMScheduler(prediction_type=prediction_type, clip_sample=False)
    theirs.alphas_cumprod = SCHEDULE.alphas_cumprod.clone()
    return theirs


@pytest.mark.parametrize("case", ["ddim-epsilon-inf-sample", "ddpm-sample-inf-sample", "ddpm-epsilon-inf-output",
                                  "ddpm-v-inf-sample"])
def test_inf_inputs_give_diffusers_values_where_no_coefficient_is_zero(case, device):
    """Mid-schedule steps have no zero coefficient in diffusers' formulas: +-Inf must come out as +-Inf (the fused
    step used to multiply the structural zeros of its generic form, e.g. eps = 0 * x_t + model_output, into NaN)."""
    scheduler, prediction, _, where = case.split("-", 3)
    prediction = {"epsilon": "epsilon", "sample": "sample", "v": "v_prediction"}[prediction]
    model_output, sample, _ = _inputs((2, 3, 4), torch.float64, "cpu")
    target = sample if where == "sample" else model_output
    target[:, 0, 0], target[:, 1, 1], target[:, 2, 2] = math.inf, -math.inf, math.nan
    noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    if scheduler == "ddim":
        expected = _diffusers_ddim(prediction).step(model_output, 500, sample, eta=0.0).prev_sample

        def ours(impl, cast):
            return ddim_step(cast(model_output), 500, cast(sample), SCHEDULE, prev_timestep=450,
                             prediction_type=prediction, impl=impl)
    else:
        expected = _diffusers_ddpm(prediction).step(model_output, 500, sample,
                                                    generator=torch.Generator().manual_seed(5)).prev_sample

        def ours(impl, cast):
            return ddpm_step(cast(model_output), 500, cast(sample), SCHEDULE, noise=cast(noise),
                             prediction_type=prediction, impl=impl)
    assert torch.isinf(expected).any()

    def to_device(x):
        return x.to(device, torch.float32)
    assert_close_to_reference(ours("triton", to_device), expected, ours("eager", to_device))


def test_final_steps_leave_out_the_terms_whose_coefficient_is_zero(device):
    """At a final step to a_prev = 1 the DDPM x_t term and the DDIM eps term have coefficient 0 and the step is
    x_prev = x0: +-Inf in the input the term would read gives x0's value (+-Inf), not 0 * Inf = NaN."""
    model_output, sample, noise = _inputs((2, 6), torch.float64, "cpu")
    sample[:, 0], model_output[:, 1] = math.inf, -math.inf
    noise[:, 2] = math.inf
    a0 = SCHEDULE.alphas_cumprod[0]
    x0 = (sample - (1 - a0).sqrt() * model_output) / a0.sqrt()  # epsilon prediction at t = 0
    ddpm = ddpm_step(model_output.float().to(device), 0, sample.float().to(device), SCHEDULE,
                     noise=noise.float().to(device), impl="triton")
    assert_close_to_reference(ddpm, x0, x0.float())
    a20 = SCHEDULE.alphas_cumprod[20]
    x0 = (sample - (1 - a20).sqrt() * model_output) / a20.sqrt()
    for eta in (0.0, 0.7):  # sigma = 0 at a final step to a_prev = 1: the noise is left out as well
        ddim = [ddim_step(model_output.to(device, dtype), 20, sample.to(device, dtype), SCHEDULE, prev_timestep=-1,
                          eta=eta, noise=noise.to(device, dtype), impl=impl)
                for impl, dtype in (("triton", torch.float32), ("eager", torch.float32))]
        assert_close_to_reference(ddim[0], x0, ddim[1])
        assert torch.isinf(ddim[0][:, :2]).all() and torch.isfinite(ddim[0][:, 2:]).all()


@pytest.mark.parametrize("impl", ["triton", "eager"])
def test_guidance_scale_zero_reads_only_the_unconditional_output(impl, device):
    cond, sample, noise = _inputs((2, 40), torch.float32, device)
    cond[:, :3] = torch.tensor([math.inf, -math.inf, math.nan])
    uncond = random_tensor((2, 40), torch.float32, 5, device)
    guided = ddim_step(cond, 300, sample, SCHEDULE, prev_timestep=250, uncond_output=uncond, guidance_scale=0.0,
                       impl=impl)
    plain = ddim_step(uncond, 300, sample, SCHEDULE, prev_timestep=250, impl=impl)
    torch.testing.assert_close(guided, plain, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# The op contract: fp64, meta tensors, configuration values
# ---------------------------------------------------------------------------------------------------------------
def test_float64_runs_the_reference_under_auto_and_is_refused_by_triton(device):
    model_output, sample, noise = _inputs((2, 3, 4), torch.float64, device)
    for step, options in ((ddpm_step, {}), (ddim_step, dict(prev_timestep=450, eta=0.5))):
        auto = step(model_output, 500, sample, SCHEDULE, noise=noise, **options)
        eager = step(model_output, 500, sample, SCHEDULE, noise=noise, impl="eager", **options)
        assert auto.dtype == torch.float64
        torch.testing.assert_close(auto, eager, rtol=0, atol=0)
        with pytest.raises(ValueError, match=r"impl='triton'.*sample is torch.float64"):
            step(model_output, 500, sample, SCHEDULE, noise=noise, impl="triton", **options)


@pytest.mark.parametrize("tensor_timesteps", [False, True])
def test_meta_tensors_give_the_output_shape(tensor_timesteps):
    sample = torch.empty(3, 4, 5, device="meta", dtype=torch.float16)
    t = torch.tensor([9, 5, 999], device="meta") if tensor_timesteps else 9
    prev = torch.tensor([8, -1, 3], device="meta") if tensor_timesteps else 3
    for impl in ("auto", "eager"):
        outs = [ddpm_step(torch.empty_like(sample), t, sample, SCHEDULE, prev_timestep=prev, impl=impl),
                ddim_step(torch.empty_like(sample), t, sample, SCHEDULE, prev_timestep=prev, eta=0.5,
                          uncond_output=torch.empty_like(sample), guidance_scale=2.0, impl=impl)]
        for out in outs:
            assert out.shape == sample.shape and out.dtype == sample.dtype and out.device.type == "meta"


def test_schedule_on_meta_tensors_has_no_host_reads():
    schedule = NoiseSchedule(torch.linspace(1e-4, 0.02, 50, device="meta"))
    assert schedule.num_train_timesteps == 50 and schedule.alphas_cumprod.device.type == "meta"
    sample = torch.empty(2, 7, device="meta")
    assert ddpm_step(torch.empty_like(sample), 10, sample, schedule).shape == (2, 7)
    assert SCHEDULE.to("meta").kernel_table(torch.device("meta")).shape == (2, T)


@pytest.mark.parametrize("call,error,argument", [
    (lambda: NoiseSchedule.cosine(max_beta="x"), TypeError, "max_beta"),
    (lambda: NoiseSchedule.cosine(max_beta=0.0), ValueError, "max_beta"),
    (lambda: NoiseSchedule.linear(10.0), TypeError, "num_train_timesteps"),
    (lambda: NoiseSchedule.linear(beta_start=-0.1), ValueError, "beta_start"),
    (lambda: NoiseSchedule.scaled_linear(beta_end=float("nan")), ValueError, "beta_end"),
    (lambda: NoiseSchedule.linear(beta_end="0.02"), TypeError, "beta_end"),
    (lambda: NoiseSchedule(torch.tensor([0.1, -0.2])), ValueError, "betas"),
    (lambda: NoiseSchedule(torch.tensor([0.1, float("nan")])), ValueError, "betas"),
    (lambda: NoiseSchedule(torch.tensor([1, 2])), TypeError, "betas"),
    (lambda: NoiseSchedule([0.1, 0.2]), TypeError, "betas"),
])
def test_schedule_rejects_bad_configuration_values(call, error, argument):
    with pytest.raises(error, match=argument):
        call()


@pytest.mark.parametrize("op", ["ddpm_step", "ddim_step"])
def test_opcheck_with_inputs_that_require_grad(op, device):
    """The registered step ops with their autograd (and the gradient op their backward calls) pass opcheck."""
    model_output, sample, noise = (t.requires_grad_() for t in _inputs((3, 4, 5), torch.float32, device))
    uncond = random_tensor((3, 4, 5), torch.float32, 7, device).requires_grad_()
    table = SCHEDULE.kernel_table(torch.device(device))
    timesteps = (torch.tensor([5, 500, 999], device=device), 0, torch.tensor([4, 480, -1], device=device), 0)
    options = ("v_prediction", "fixed_small", True, 0.9) if op == "ddpm_step" else (0.5, "sample", True, 0.9, True,
                                                                                       True)
    args = (model_output, sample, noise, None, table, *timesteps) + options + (uncond, 3.0)
    torch.library.opcheck(getattr(torch.ops.genkernels, op).default, args)
    out = getattr(torch.ops.genkernels, op)(*args)
    grads = torch.autograd.grad(out, (model_output, sample, noise, uncond), torch.ones_like(out))
    # (scheduler, prediction_type, variance_type, eta, clip_sample, range, set_alpha_to_one, use_clipped, scale)
    settings = (0, "v_prediction", "fixed_small", 0.0, True, 0.9, True, False, 3.0) if op == "ddpm_step" else \
        (1, "sample", "fixed_small", 0.5, True, 0.9, True, True, 3.0)
    backward_args = (torch.ones_like(out), model_output.detach(), sample.detach(), noise.detach(), uncond.detach(),
                     table, *timesteps, *settings, [True] * 4)
    torch.library.opcheck(torch.ops.genkernels.denoise_step_backward.default, backward_args)
    for got, expected in zip(torch.ops.genkernels.denoise_step_backward(*backward_args), grads):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Launch geometry and the in-kernel noise transform
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", [80, 86, 89, 90])
def test_wave_split_fills_whole_waves_of_one_warp_programs(arch):
    """At the benchmark shapes the grid is >= 90% of whole waves (or 4 waves and more) of the arch's
    ``sm_count * max_ctas_per_sm`` one-warp slots (the fixed 4096-element blocks gave 0.03-0.86 of a wave here),
    with one 16-byte vector per thread per tile; only a problem with fewer units (two 16-byte vectors) than that gets
    fewer programs, one per unit."""
    from genkernels.kernels.launch import wave_split
    from genkernels.kernels.launch import ARCH_LIMITS, capturing_for

    limits = ARCH_LIMITS[arch]
    slots = limits.sm_count * limits.max_ctas_per_sm
    shapes = [(64, 4 * 64 * 64), (128, 3 * 64 * 64), (128, 3 * 32 * 32), (16, 3 * 256 * 256), (256, 512),
              (64, 3 * 32 * 32), (64, 6 * 16 * 16), (256, 16 * 64 * 64), (1, 64 * 512 * 32 * 32), (7, 13 * 11),
              (300, 1000), (5000, 64)]
    with capturing_for(limits):
        for batch, inner in shapes:
            for element_bytes in (2, 4):
                split = wave_split("ddpm_step", inner, batch, element_bytes, torch.device("meta"))
                grid = split.programs * batch
                waves = grid / slots
                efficiency = grid / (math.ceil(waves) * slots)
                units = math.ceil(inner / (split.tile // 16))
                assert waves >= 4 or efficiency >= 0.9 or split.programs == units, (arch, batch, inner, split)
                assert 1 <= split.programs <= units and split.num_warps == 1
                assert split.tile * element_bytes == 32 * 16  # one 16-byte vector per thread


@triton.jit
def _sincos_kernel(u_ptr, sin_ptr, cos_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    sin_t, cos_t = sincos_turns(tl.load(u_ptr + offsets))
    tl.store(sin_ptr + offsets, sin_t)
    tl.store(cos_ptr + offsets, cos_t)


def test_sincos_of_the_box_muller_angle_is_accurate():
    """The sine and cosine of ``2 pi u`` the kernels' Box-Muller uses (quarter turns taken out exactly, Taylor
    polynomials on [-pi/4, pi/4], no libdevice range reduction) are within 3e-7 of fp64 for u in [0, 1), quarter
    and eighth turns included."""
    edges = torch.tensor([0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1 - 2**-24])
    u = torch.cat([edges, torch.rand(4096 - edges.numel(), generator=torch.Generator().manual_seed(0))])
    sin_t, cos_t = torch.empty_like(u), torch.empty_like(u)
    _sincos_kernel[(1,)](u, sin_t, cos_t, BLOCK=4096)
    angle = 2 * math.pi * u.double()
    assert (sin_t.double() - angle.sin()).abs().max() < 3e-7
    assert (cos_t.double() - angle.cos()).abs().max() < 3e-7


@pytest.mark.parametrize("programs", [2, 3])
def test_split_over_programs_keeps_the_step_its_noise_and_gradients(programs, device):
    """Several programs per sample, each walking a span of several tiles (forced: in the interpreter one program
    walks each sample): the DDPM step with in-kernel noise, for NCHW and channels_last, and the DDIM step's
    gradients are bitwise those of one program per sample."""
    from genkernels.kernels.launch import force_launch_settings

    model_output, sample, _ = _inputs((2, 3, 13, 11), torch.float32, device)
    t = torch.tensor([500, 20], device=device)
    results = []
    for forced in (None, programs):
        settings = {} if forced is None else {"programs_per_sample": forced}
        with force_launch_settings("denoise_step", **settings):
            steps = [ddpm_step(model_output.contiguous(memory_format=layout), t,
                               sample.contiguous(memory_format=layout), SCHEDULE,
                               generator=torch.Generator(device).manual_seed(5), impl="triton")
                     for layout in (torch.contiguous_format, torch.channels_last)]
            mo = model_output.clone().requires_grad_(True)
            x = sample.clone().requires_grad_(True)
            out = ddim_step(mo, t, x, SCHEDULE, prev_timestep=t - 10, clip_sample=True, impl="triton")
            grads = torch.autograd.grad(out, (mo, x), torch.ones_like(out))
        results.append((steps, grads))
    (steps1, grads1), (steps2, grads2) = results
    assert torch.equal(steps1[0], steps1[1])  # the channels_last step draws the same noise
    assert all(torch.equal(a, b) for a, b in zip(steps2, steps1))
    assert all(torch.equal(a, b) for a, b in zip(grads2, grads1))
