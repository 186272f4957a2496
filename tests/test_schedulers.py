"""Drop-in schedulers (models/schedulers.py): whole sampling loops against diffusers' schedulers."""
import diffusers
import pytest
import torch

from genkernels.kernels import NoiseSchedule, ddpm_step, use_impl
from genkernels.models import DDIMScheduler, DDPMScheduler


def _toy_model(sample, t):
    """A fixed smooth 'network': enough to make every step depend on its input and timestep."""
    return torch.tanh(sample * 0.7 + 0.001 * float(t)) * 0.9


def _loop(scheduler, steps, sample, generator=None, **step_kwargs):
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        sample = scheduler.step(_toy_model(sample, t), t, sample, generator=generator, **step_kwargs).prev_sample
    return sample


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_timesteps_match_diffusers(spacing):
    ours, theirs = DDIMScheduler(timestep_spacing=spacing), diffusers.DDIMScheduler(timestep_spacing=spacing)
    ours.set_timesteps(37)
    theirs.set_timesteps(37)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()


@pytest.mark.parametrize("impl", ["triton", "eager"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_loop_matches_diffusers(impl, prediction_type):
    start = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    theirs = _loop(diffusers.DDIMScheduler(prediction_type=prediction_type), 25, start.clone())
    with use_impl(impl):
        ours = _loop(DDIMScheduler(NoiseSchedule.linear(), prediction_type=prediction_type), 25, start.clone())
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["triton", "eager"])
def test_guided_ddim_loop_matches_diffusers_on_the_guided_output(impl):
    """Guidance inside the step == a diffusers loop fed the guided output (a pipeline's usual arithmetic)."""
    def predictions(sample, t):
        return _toy_model(sample, t), _toy_model(sample * 0.5, t) - 0.1

    start = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    theirs, ours = diffusers.DDIMScheduler(), DDIMScheduler(NoiseSchedule.linear())
    theirs.set_timesteps(20)
    ours.set_timesteps(20)
    expected, sample = start.clone(), start.clone()
    with use_impl(impl):
        for t in ours.timesteps:
            cond, uncond = predictions(expected, t)
            expected = theirs.step(uncond + 3.0 * (cond - uncond), t, expected).prev_sample
            cond, uncond = predictions(sample, t)
            sample = ours.step(cond, t, sample, uncond_output=uncond, guidance_scale=3.0).prev_sample
    torch.testing.assert_close(sample, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["triton", "eager"])
def test_ddpm_loop_matches_diffusers_given_the_noise_diffusers_draws(impl):
    """diffusers draws each step's noise with torch.randn from its generator (except at t = 0); the same draws,
    passed as ``noise``, must give the same loop."""
    start = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    theirs = _loop(diffusers.DDPMScheduler(), 20, start.clone(), generator=torch.Generator().manual_seed(3))
    scheduler, sample, draws = DDPMScheduler(), start.clone(), torch.Generator().manual_seed(3)
    scheduler.set_timesteps(20)
    with use_impl(impl):
        for t in scheduler.timesteps.tolist():
            noise = torch.randn(sample.shape, generator=draws) if t > 0 else None
            sample = ddpm_step(_toy_model(sample, t), t, sample, scheduler.schedule,
                               prev_timestep=scheduler.previous_timestep(t), noise=noise, clip_sample=True)
    torch.testing.assert_close(sample, theirs, rtol=1e-4, atol=1e-4)


def test_eager_ddpm_loop_draws_its_noise_as_diffusers_does():
    # The eager path draws its noise with torch.randn from the generator, as diffusers does.
    start = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    theirs = _loop(diffusers.DDPMScheduler(), 20, start.clone(), generator=torch.Generator().manual_seed(3))
    with use_impl("eager"):
        ours = _loop(DDPMScheduler(), 20, start.clone(), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_add_noise_matches_diffusers():
    x0 = torch.randn(4, 3, 5, 5)
    noise = torch.randn(4, 3, 5, 5)
    timesteps = torch.tensor([0, 10, 500, 999])
    expected = diffusers.DDPMScheduler().add_noise(x0, noise, timesteps)
    torch.testing.assert_close(DDPMScheduler().add_noise(x0, noise, timesteps), expected, rtol=1e-5, atol=1e-5)


def test_scheduler_rejects_bad_arguments():
    with pytest.raises(TypeError, match="schedule must be a NoiseSchedule"):
        DDIMScheduler(torch.ones(10))
    with pytest.raises(ValueError, match="timestep_spacing='linspace'"):
        DDIMScheduler(timestep_spacing="linspace")
    with pytest.raises(ValueError, match="num_inference_steps=0"):
        DDIMScheduler().set_timesteps(0)
    with pytest.raises(ValueError, match="eta=2"):
        DDIMScheduler().step(torch.zeros(1, 2), 10, torch.zeros(1, 2), eta=2)
