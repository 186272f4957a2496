"""Drop-in schedulers (models/schedulers.py): whole sampling loops against diffusers' schedulers."""
import diffusers
import pytest
import torch

from genkernels.kernels import NoiseSchedule, ddpm_step, use_impl
from genkernels.models import DDIMScheduler, DDPMScheduler

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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


TRAILING_CASES = [(1000, 7), (1000, 3), (1000, 30), (1000, 999), (50, 7), (10, 3), (1000, 1)]


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("num_train,steps", TRAILING_CASES)
def test_ddpm_steps_land_on_the_next_listed_timestep_as_diffusers(spacing, num_train, steps):
    """(t, prev_t) of every step, against diffusers' DDPMScheduler.previous_timestep: with "trailing" spacing and
    steps not dividing T the list is not evenly spaced (7 of 1000: 999 -> 856, not 857; 142 -> -1, not 0)."""
    theirs = diffusers.DDPMScheduler(num_train_timesteps=num_train, timestep_spacing=spacing)
    theirs.set_timesteps(steps)
    ours = DDPMScheduler(NoiseSchedule.linear(num_train), timestep_spacing=spacing)
    ours.set_timesteps(steps)
    expected = [(t, int(theirs.previous_timestep(t))) for t in theirs.timesteps.tolist()]
    assert [(t, ours.previous_timestep(t)) for t in ours.timesteps.tolist()] == expected
    # the same on a device tensor (looked up without a host read) and on the scheduler's own 0-d tensors
    device_timesteps = ours.timesteps.to(DEVICE)
    assert [int(ours.previous_timestep(t)) for t in device_timesteps] == [prev for _, prev in expected]
    assert [ours.previous_timestep(t) for t in ours.timesteps] == [prev for _, prev in expected]


@pytest.mark.parametrize("num_train,steps", TRAILING_CASES)
def test_ddim_steps_keep_diffusers_formula(num_train, steps):
    theirs = diffusers.DDIMScheduler(num_train_timesteps=num_train, timestep_spacing="trailing")
    theirs.set_timesteps(steps)
    ours = DDIMScheduler(NoiseSchedule.linear(num_train), timestep_spacing="trailing")
    ours.set_timesteps(steps)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    assert [ours.previous_timestep(t) for t in ours.timesteps.tolist()] == [
        t - num_train // steps for t in theirs.timesteps.tolist()]  # diffusers' DDIMScheduler.step


@pytest.mark.parametrize("impl", ["triton", "eager"])
def test_trailing_ddpm_loop_matches_diffusers_with_the_same_outputs_and_noise(impl):
    start = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    theirs = diffusers.DDPMScheduler(timestep_spacing="trailing")
    theirs = _loop(theirs, 7, start.clone(), generator=torch.Generator().manual_seed(3))
    scheduler, sample, draws = DDPMScheduler(timestep_spacing="trailing"), start.clone(), torch.Generator()
    draws.manual_seed(3)
    scheduler.set_timesteps(7)
    with use_impl(impl):
        for t in scheduler.timesteps.tolist():
            noise = torch.randn(sample.shape, generator=draws) if t > 0 else None
            sample = ddpm_step(_toy_model(sample, t), t, sample, scheduler.schedule,
                               prev_timestep=scheduler.previous_timestep(t), noise=noise, clip_sample=True)
    torch.testing.assert_close(sample, theirs, rtol=1e-4, atol=1e-4)


def test_trailing_ddpm_scheduler_step_matches_diffusers_step_by_step():
    theirs, ours = diffusers.DDPMScheduler(timestep_spacing="trailing"), DDPMScheduler(timestep_spacing="trailing")
    theirs.set_timesteps(7)
    ours.set_timesteps(7)
    sample = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with use_impl("eager"):  # draws its noise with torch.randn from the generator, as diffusers
        for t in ours.timesteps:
            model_output = _toy_model(sample, t)
            expected = theirs.step(model_output, t, sample, generator=torch.Generator().manual_seed(int(t)))
            got = ours.step(model_output, t, sample, generator=torch.Generator().manual_seed(int(t)))
            torch.testing.assert_close(got.prev_sample, expected.prev_sample, rtol=1e-5, atol=1e-5)
            sample = expected.prev_sample


def test_previous_timestep_rejects_a_timestep_off_the_list():
    scheduler = DDPMScheduler(timestep_spacing="trailing")
    scheduler.set_timesteps(7)
    with pytest.raises(ValueError, match="timestep=857 is not one of the scheduler's"):
        scheduler.previous_timestep(857)
    with pytest.raises(ValueError, match="timestep must be one of the scheduler's timesteps"):
        scheduler.previous_timestep(torch.tensor([856, 857]))


def test_add_noise_matches_diffusers():
    x0 = torch.randn(4, 3, 5, 5)
    noise = torch.randn(4, 3, 5, 5)
    timesteps = torch.tensor([0, 10, 500, 999])
    expected = diffusers.DDPMScheduler().add_noise(x0, noise, timesteps)
    torch.testing.assert_close(DDPMScheduler().add_noise(x0, noise, timesteps), expected, rtol=1e-5, atol=1e-5)
    # one timestep for every sample, as an int or a one-element tensor; fp64 computes in fp64
    one = diffusers.DDPMScheduler().add_noise(x0, noise, torch.tensor([500]))
    torch.testing.assert_close(DDPMScheduler().add_noise(x0, noise, 500), one, rtol=1e-5, atol=1e-5)
    theirs64 = diffusers.DDPMScheduler()
    theirs64.alphas_cumprod = NoiseSchedule.linear().alphas_cumprod
    torch.testing.assert_close(DDPMScheduler().add_noise(x0.double(), noise.double(), timesteps),
                               theirs64.add_noise(x0.double(), noise.double(), timesteps), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("timesteps,error,match", [
    (torch.tensor([0, 10, 500, 1000]), ValueError, r"timesteps must lie in \[0, 1000\); got a value 1000"),
    (torch.tensor([0, -1, 500, 999]), ValueError, r"timesteps must lie in \[0, 1000\); got a value -1"),
    (-1, ValueError, "timesteps must lie in"),
    (torch.tensor([0.0, 1.0, 2.0, 3.0]), TypeError, "timesteps must hold integers"),
    (2.5, TypeError, "timesteps must be an integer tensor"),
    (torch.tensor([1, 2]), ValueError, r"timesteps must be one timestep or one per sample"),
])
def test_add_noise_checks_its_timesteps(timesteps, error, match):
    """t = -1 used to wrap around to the last entry of the table silently, t = T to raise an IndexError."""
    x0, noise = torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    with pytest.raises(error, match=match):
        DDPMScheduler().add_noise(x0, noise, timesteps)


def test_add_noise_checks_its_samples():
    with pytest.raises(TypeError, match="original_samples"):
        DDPMScheduler().add_noise(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3), 5)
    with pytest.raises(ValueError, match="noise"):
        DDPMScheduler().add_noise(torch.zeros(2, 3), torch.zeros(2, 4), 5)


def test_add_noise_on_meta_tensors_gives_the_shape():
    x0 = torch.empty(4, 3, 5, device="meta")
    out = DDPMScheduler().add_noise(x0, torch.empty_like(x0), torch.tensor([0, 1, 2, 3], device="meta"))
    assert out.shape == x0.shape and out.device.type == "meta"


def test_scheduler_rejects_bad_arguments():
    with pytest.raises(TypeError, match="schedule must be a NoiseSchedule"):
        DDIMScheduler(torch.ones(10))
    with pytest.raises(ValueError, match="timestep_spacing='linspace'"):
        DDIMScheduler(timestep_spacing="linspace")
    with pytest.raises(ValueError, match="num_inference_steps=0"):
        DDIMScheduler().set_timesteps(0)
    with pytest.raises(ValueError, match="eta=2"):
        DDIMScheduler().step(torch.zeros(1, 2), 10, torch.zeros(1, 2), eta=2)


@pytest.mark.parametrize("scheduler,kwargs,error,argument", [
    (DDPMScheduler, dict(prediction_type="noise"), ValueError, "prediction_type"),
    (DDIMScheduler, dict(prediction_type=1), ValueError, "prediction_type"),
    (DDPMScheduler, dict(variance_type="learned"), ValueError, "variance_type"),
    (DDPMScheduler, dict(clip_sample=1), TypeError, "clip_sample"),
    (DDIMScheduler, dict(clip_sample_range=0.0), ValueError, "clip_sample_range"),
    (DDIMScheduler, dict(clip_sample_range="1"), TypeError, "clip_sample_range"),
    (DDIMScheduler, dict(set_alpha_to_one=None), TypeError, "set_alpha_to_one"),
    (DDPMScheduler, dict(timestep_spacing=None), ValueError, "timestep_spacing"),
])
def test_scheduler_constructors_name_the_bad_argument(scheduler, kwargs, error, argument):
    """Wrong values used to be stored and fail later, inside the step."""
    with pytest.raises(error, match=argument):
        scheduler(**kwargs)


def test_set_timesteps_rejects_wrong_types():
    with pytest.raises(TypeError, match="num_inference_steps"):
        DDPMScheduler().set_timesteps(7.0)
