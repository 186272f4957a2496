"""Drop-in schedulers (models/schedulers.py) against diffusers' own DDPMScheduler / DDIMScheduler: timesteps, every
step's prev_sample and pred_original_sample for the same inputs and noise (tolerance rule against diffusers' math in
float64), whole loops, diffusers' DDPMPipeline / DDIMPipeline, the diffusers configuration (from_config, config,
save_config / from_pretrained) and bad configurations."""
import copy
import json
import warnings

import diffusers
import diffusers.pipelines.ddim.pipeline_ddim as ddim_pipeline_module
import diffusers.pipelines.ddpm.pipeline_ddpm as ddpm_pipeline_module
import diffusers.schedulers.scheduling_ddim as ddim_module
import diffusers.schedulers.scheduling_ddpm as ddpm_module
import pytest
import torch

from genkernels.kernels import NoiseSchedule, ddpm_step, use_impl
from genkernels.models import DDIMScheduler, DDPMScheduler
from genkernels.models.schedulers import FrozenConfig, SchedulerOutput
from reference_checks import tiny_unet2d

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLOOR = {torch.float32: 2e-6, torch.float64: 1e-12}  # relative to max|ref| (+1)


def _toy_model(sample, t):
    """A fixed smooth 'network': enough to make every step depend on its input and timestep."""
    return torch.tanh(sample * 0.7 + 0.001 * float(t)) * 0.9


def _loop(scheduler, steps, sample, generator=None, **step_kwargs):
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        sample = scheduler.step(_toy_model(sample, t), t, sample, generator=generator, **step_kwargs).prev_sample
    return sample


def fp64_twin(theirs):
    """diffusers' scheduler with its tables in float64 (its own float32 betas widened, cumprod in float64, zero-SNR
    rescaling by diffusers' function in float64): the oracle of the tolerance rule."""
    config = dict(theirs.config)
    betas = type(theirs).from_config({**config, "rescale_betas_zero_snr": False}).betas.double()
    if config["rescale_betas_zero_snr"]:
        betas = ddpm_module.rescale_zero_terminal_snr(betas)
    twin = type(theirs).from_config(config)
    twin.betas, twin.alphas = betas, 1.0 - betas
    twin.alphas_cumprod = torch.cumprod(twin.alphas, dim=0)
    twin.one = torch.tensor(1.0, dtype=torch.float64)
    if isinstance(theirs, diffusers.DDIMScheduler):
        twin.final_alpha_cumprod = twin.one if config["set_alpha_to_one"] else twin.alphas_cumprod[0]
    return twin


def assert_rule(ours, theirs, ref, dtype, what=""):
    """``max|ours - ref| <= 2 * max|theirs - ref| + floor``: ours is at least as accurate as diffusers itself."""
    ref = ref.double()
    assert torch.isfinite(ref).all(), what
    error = (ours.double() - ref).abs().max().item()
    budget = 2 * (theirs.double() - ref).abs().max().item() + FLOOR[dtype] * (1 + ref.abs().max().item())
    assert error <= budget, f"{what}: max error {error:.3g} > {budget:.3g}"


@pytest.fixture
def fp32_draws(monkeypatch):
    """diffusers' noise drawn in float32 then cast (for the float64 oracle to see the float32 run's numbers)."""
    def patch(module):
        real = module.randn_tensor

        def draw(shape, generator=None, device=None, dtype=None, layout=None):
            return real(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)
        monkeypatch.setattr(module, "randn_tensor", draw)
    for module in (ddpm_module, ddim_module, ddpm_pipeline_module, ddim_pipeline_module):
        patch(module)


def _seed(t) -> torch.Generator:
    return torch.Generator().manual_seed(1000 + int(t))


def _outputs(model_output_channels, sample, t, variance_type):
    out = _toy_model(sample, t)
    if model_output_channels == sample.shape[1]:
        return out
    extra = torch.sin(sample * 1.3 + 0.002 * float(t))
    extra = 0.02 * torch.sigmoid(extra) if variance_type == "learned" else extra  # a variance / a [-1, 1] mix
    return torch.cat([out, extra], dim=1)


# --------------------------------------------------------------------------------------------------------------
# every step against diffusers' own scheduler

DDPM_CONFIGS = [
    dict(),
    dict(timestep_spacing="trailing"),
    dict(timestep_spacing="linspace", clip_sample=False),
    dict(steps_offset=1),
    dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"),
    dict(prediction_type="sample", clip_sample_range=0.5),
    dict(prediction_type="v_prediction", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5),
    dict(variance_type="fixed_large", beta_schedule="squaredcos_cap_v2"),
    dict(variance_type="fixed_small_log"),
    dict(variance_type="learned_range"),
    dict(variance_type="learned", thresholding=True, sample_max_value=2.0),
]


def _ddpm_steps(config, dtype, impl, steps=6, batch=2):
    theirs = diffusers.DDPMScheduler(**config)
    ours = DDPMScheduler.from_config(theirs.config)
    twin = fp64_twin(theirs)
    for scheduler in (theirs, ours, twin):
        scheduler.set_timesteps(steps)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    channels = 6 if "learned" in config.get("variance_type", "") else 3
    x = torch.randn(batch, 3, 5, 7, generator=torch.Generator().manual_seed(0), dtype=dtype) * 1.5
    for t in ours.timesteps:
        model_output = _outputs(channels, x, t, config.get("variance_type"))
        expected = theirs.step(model_output, t, x, generator=_seed(t)) if dtype == torch.float32 else None
        ref = twin.step(model_output.double(), t, x.double(), generator=_seed(t))
        with use_impl(impl):
            got = ours.step(model_output, t, x, generator=_seed(t))
        for name in ("prev_sample", "pred_original_sample"):
            assert getattr(got, name).dtype == dtype
            assert_rule(getattr(got, name), getattr(expected or ref, name), getattr(ref, name), dtype,
                        f"{name} at t={int(t)}")
        x = ref.prev_sample.to(dtype)
    return ours


@pytest.mark.parametrize("impl", ["eager", "triton"])
@pytest.mark.parametrize("config", DDPM_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_ddpm_steps_equal_diffusers_for_the_same_inputs_and_noise(fp32_draws, config, impl):
    _ddpm_steps(config, torch.float32, impl)


@pytest.mark.parametrize("config", DDPM_CONFIGS[:8:2], ids=str)
def test_ddpm_steps_in_fp64_equal_diffusers_in_fp64(config):
    _ddpm_steps(config, torch.float64, "eager")


DDIM_CONFIGS = [
    (dict(), 0.0, False),
    (dict(timestep_spacing="trailing"), 1.0, False),
    (dict(timestep_spacing="linspace"), 0.5, True),
    (dict(steps_offset=1, set_alpha_to_one=False), 0.3, False),
    (dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"), 0.0, False),
    (dict(prediction_type="sample", clip_sample=False), 0.7, False),
    (dict(prediction_type="v_prediction", clip_sample_range=0.8), 0.0, True),
    (dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5), 0.5, False),
    (dict(thresholding=True, sample_max_value=2.0), 0.0, True),
    (dict(beta_schedule="squaredcos_cap_v2", clip_sample=False), 1.0, True),
]


def _ddim_steps(config, eta, clipped, dtype, impl, steps=6):
    theirs = diffusers.DDIMScheduler(**config)
    ours = DDIMScheduler.from_config(theirs.config)
    twin = fp64_twin(theirs)
    for scheduler in (theirs, ours, twin):
        scheduler.set_timesteps(steps)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    x = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(0), dtype=dtype) * 1.5
    for t in ours.timesteps:
        model_output = _toy_model(x, t)
        noise = torch.randn(x.shape, generator=_seed(t), dtype=dtype)
        options = dict(eta=eta, use_clipped_model_output=clipped)
        expected = theirs.step(model_output, t, x, variance_noise=noise, **options)
        ref = twin.step(model_output.double(), t, x.double(), variance_noise=noise.double(), **options)
        with use_impl(impl):
            got = ours.step(model_output, t, x, variance_noise=noise, **options)
        for name in ("prev_sample", "pred_original_sample"):
            assert getattr(got, name).dtype == dtype
            assert_rule(getattr(got, name), getattr(expected, name), getattr(ref, name), dtype,
                        f"{name} at t={int(t)}")
        x = ref.prev_sample.to(dtype)


@pytest.mark.parametrize("impl", ["eager", "triton"])
@pytest.mark.parametrize("config,eta,clipped", DDIM_CONFIGS, ids=str)
def test_ddim_steps_equal_diffusers_for_the_same_inputs_and_noise(config, eta, clipped, impl):
    _ddim_steps(config, eta, clipped, torch.float32, impl)


@pytest.mark.parametrize("config,eta,clipped", DDIM_CONFIGS[1::3], ids=str)
def test_ddim_steps_in_fp64_equal_diffusers_in_fp64(config, eta, clipped):
    _ddim_steps(config, eta, clipped, torch.float64, "eager")


def test_ddim_step_draws_its_noise_from_the_generator_as_diffusers(fp32_draws):
    theirs, ours = diffusers.DDIMScheduler(), DDIMScheduler()
    twin = fp64_twin(theirs)
    for scheduler in (theirs, ours, twin):
        scheduler.set_timesteps(5)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    for t in ours.timesteps:
        expected = theirs.step(_toy_model(x, t), t, x, eta=0.8, generator=_seed(t))
        ref = twin.step(_toy_model(x, t).double(), t, x.double(), eta=0.8, generator=_seed(t))
        got = ours.step(_toy_model(x, t), t, x, eta=0.8, generator=_seed(t))
        assert_rule(got.prev_sample, expected.prev_sample, ref.prev_sample, torch.float32, f"t={int(t)}")
        x = expected.prev_sample


def test_ddpm_step_with_one_generator_per_sample_draws_as_diffusers():
    theirs, ours = diffusers.DDPMScheduler(), DDPMScheduler()
    theirs.set_timesteps(4)
    ours.set_timesteps(4)
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    for t in ours.timesteps:
        generators = [torch.Generator().manual_seed(int(t) + i) for i in range(3)]
        expected = theirs.step(_toy_model(x, t), t, x, generator=generators).prev_sample
        generators = [torch.Generator().manual_seed(int(t) + i) for i in range(3)]
        got = ours.step(_toy_model(x, t), t, x, generator=generators).prev_sample
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        x = expected
    with pytest.raises(ValueError, match="generator: a list of 2 generators for a batch of 3"):
        ours.step(_toy_model(x, 1), ours.timesteps[0], x, generator=[torch.Generator()] * 2)


def test_in_kernel_noise_is_the_fused_op_with_the_generator():
    """in_kernel_noise=True hands the generator to the fused op (Philox noise inside the kernel)."""
    ours = DDPMScheduler(in_kernel_noise=True)
    ours.set_timesteps(4)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    t = int(ours.timesteps[1])
    with use_impl("triton"):
        got = ours.step(_toy_model(x, t), t, x, generator=torch.Generator().manual_seed(5)).prev_sample
        expected = ddpm_step(_toy_model(x, t), t, x, ours.schedule, prev_timestep=ours.previous_timestep(t),
                             generator=torch.Generator().manual_seed(5), clip_sample=True)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert "in_kernel_noise" not in ours.config


def test_step_output_holds_the_predicted_original_sample_like_diffusers():
    ours = DDIMScheduler()
    ours.set_timesteps(10)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    model_output = _toy_model(x, 900)
    out = ours.step(model_output, 900, x)
    assert isinstance(out, SchedulerOutput) and out.keys() == ["prev_sample", "pred_original_sample"]
    assert out[0] is out.prev_sample and out["pred_original_sample"] is out.pred_original_sample
    prev, x0 = ours.step(model_output, 900, x, return_dict=False)
    torch.testing.assert_close(prev, out.prev_sample, rtol=0, atol=0)
    torch.testing.assert_close(x0, out.pred_original_sample, rtol=0, atol=0)
    # computed when first read: modifying an input in place before that read is refused, not silently wrong
    late = ours.step(model_output, 900, x)
    x.add_(1.0)
    with pytest.raises(RuntimeError, match="read pred_original_sample before modifying"):
        late.pred_original_sample


def test_fused_step_reasons_name_the_options_the_kernels_lack():
    assert DDPMScheduler().fused_step_reasons() == [] and DDIMScheduler().fused_step_reasons() == []
    assert DDPMScheduler(thresholding=True).fused_step_reasons() == []  # fused from the thresholded x0
    assert "variance_type='learned'" in DDPMScheduler(variance_type="learned").fused_step_reasons()[0]
    ddim = DDIMScheduler(thresholding=True)
    assert "thresholding" in ddim.fused_step_reasons()[0] and ddim.fused_step_reasons(True) == []


def test_learned_variance_needs_twice_the_channels():
    ours = DDPMScheduler(variance_type="learned_range")
    with pytest.raises(ValueError, match="variance_type='learned_range' needs model_output with twice"):
        ours.step(torch.zeros(1, 3, 4, 4), 10, torch.zeros(1, 3, 4, 4))


def test_fixed_large_log_is_the_fixed_large_standard_deviation():
    """diffusers' step takes the square root of log(beta) for fixed_large_log (NaN); ours uses exp(0.5 log beta)."""
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    outs = []
    for variance_type in ("fixed_large_log", "fixed_large"):
        scheduler = DDPMScheduler(variance_type=variance_type)
        scheduler.set_timesteps(10)
        outs.append(scheduler.step(_toy_model(x, 500), 500, x, generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(outs[0].prev_sample, outs[1].prev_sample, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------------------
# diffusers' pipelines

def _run(pipeline, **kwargs):
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=5,
                    output_type="pt", **kwargs).images


@pytest.mark.parametrize("impl", ["eager", "triton"])
@pytest.mark.parametrize("config", [dict(), dict(timestep_spacing="trailing", variance_type="fixed_large"),
                                    dict(thresholding=True, sample_max_value=1.2)], ids=str)
def test_ddpm_pipeline_runs_our_scheduler_and_gives_diffusers_images(fp32_draws, config, impl):
    unet = tiny_unet2d()
    theirs = diffusers.DDPMScheduler(**config)
    ours = DDPMScheduler.from_config(theirs.config)
    pipeline = diffusers.DDPMPipeline(unet=unet, scheduler=ours)
    assert pipeline.scheduler is ours
    with use_impl(impl):
        got = _run(pipeline)
        assert torch.equal(got, _run(diffusers.DDPMPipeline(unet=unet, scheduler=ours)))  # reproducible
    expected = _run(diffusers.DDPMPipeline(unet=unet, scheduler=theirs))
    ref = _run(diffusers.DDPMPipeline(unet=copy.deepcopy(unet).double(), scheduler=fp64_twin(theirs)))
    assert got.shape == (2, 3, 8, 8) and got.dtype == torch.float32
    assert_rule(got, expected, ref, torch.float32, "DDPMPipeline images")


@pytest.mark.parametrize("impl", ["eager", "triton"])
@pytest.mark.parametrize("config,eta", [(dict(), 0.0), (dict(timestep_spacing="trailing", set_alpha_to_one=False),
                                                        0.6)], ids=str)
def test_ddim_pipeline_runs_our_scheduler_and_gives_diffusers_images(fp32_draws, config, eta, impl):
    unet = tiny_unet2d()
    theirs = diffusers.DDIMScheduler(**config)
    ours = DDIMScheduler.from_config(theirs.config)
    pipeline = diffusers.DDIMPipeline(unet=unet, scheduler=ours)
    # DDIMPipeline's constructor converts any scheduler to diffusers' DDIMScheduler via its config: ours converts
    assert type(pipeline.scheduler) is diffusers.DDIMScheduler
    assert {k: v for k, v in pipeline.scheduler.config.items() if not k.startswith("_")} == dict(ours.config)
    pipeline.scheduler = ours  # diffusers' way of swapping a scheduler in
    assert pipeline.scheduler is ours
    with use_impl(impl):
        got = _run(pipeline, eta=eta)
    expected = _run(diffusers.DDIMPipeline(unet=unet, scheduler=theirs), eta=eta)
    reference = diffusers.DDIMPipeline(unet=copy.deepcopy(unet).double(), scheduler=theirs)
    reference.scheduler = fp64_twin(theirs)
    assert_rule(got, expected, _run(reference, eta=eta), torch.float32, "DDIMPipeline images")


# --------------------------------------------------------------------------------------------------------------
# configuration

def test_config_is_diffusers_config_frozen_with_attribute_access():
    theirs = diffusers.DDPMScheduler(num_train_timesteps=50, timestep_spacing="trailing", steps_offset=1)
    ours = DDPMScheduler.from_config(theirs.config)
    assert isinstance(ours.config, dict) and isinstance(ours.config, FrozenConfig)
    assert {k: v for k, v in theirs.config.items() if not k.startswith("_")} == dict(ours.config)
    assert ours.config.timestep_spacing == "trailing" and ours.config["steps_offset"] == 1
    assert ours.order == 1 and ours.init_noise_sigma == 1.0 and len(ours) == 50
    with pytest.raises(TypeError, match="read-only"):
        ours.config["steps_offset"] = 2
    with pytest.raises(TypeError, match="read-only"):
        ours.config.steps_offset = 2
    with pytest.raises(AttributeError, match="no key 'nonsense'"):
        ours.config.nonsense
    # a plain dict, a diffusers scheduler itself, and overrides by keyword
    assert DDPMScheduler.from_config({"num_train_timesteps": 50}).config.num_train_timesteps == 50
    assert DDPMScheduler.from_config(theirs).config == ours.config
    assert DDPMScheduler.from_config(theirs.config, steps_offset=0).config.steps_offset == 0
    # diffusers builds its own scheduler from ours
    back = diffusers.DDPMScheduler.from_config(ours.config)
    assert {k: v for k, v in back.config.items() if not k.startswith("_")} == dict(ours.config)


def test_ddim_from_a_ddpm_config_and_back_ignores_the_other_schedulers_keys_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ddim = DDIMScheduler.from_config(DDPMScheduler(variance_type="fixed_large").config)
        ddpm = DDPMScheduler.from_config(ddim.config)
        ddim_theirs = DDIMScheduler.from_config(diffusers.DDPMScheduler().config)
    assert "variance_type" not in ddim.config and "set_alpha_to_one" not in ddpm.config
    assert ddim_theirs.config == DDIMScheduler().config
    with pytest.warns(UserWarning, match=r"ignores the config keys \['skip_prk_steps'\]"):
        DDIMScheduler.from_config({**DDIMScheduler().config, "skip_prk_steps": True})


@pytest.mark.parametrize("ours_type,theirs_type,config", [
    (DDPMScheduler, diffusers.DDPMScheduler, dict(num_train_timesteps=60, beta_schedule="scaled_linear",
                                                  timestep_spacing="linspace", thresholding=True)),
    (DDIMScheduler, diffusers.DDIMScheduler, dict(rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                                  set_alpha_to_one=False, trained_betas=[0.25, 0.5, 0.75],
                                                  num_train_timesteps=3)),
])
def test_config_round_trips_through_save_config_and_from_pretrained(tmp_path, ours_type, theirs_type, config):
    ours = ours_type(**config)
    path = ours.save_config(tmp_path / "ours")
    saved = json.loads(open(path).read())
    assert saved["_class_name"] == ours_type.__name__ and path.endswith("scheduler_config.json")
    again = ours_type.from_pretrained(tmp_path / "ours")
    assert again.config == ours.config
    torch.testing.assert_close(again.schedule.alphas_cumprod, ours.schedule.alphas_cumprod, rtol=0, atol=0)
    # diffusers reads our folder, and we read diffusers' folder (a pipeline's "scheduler" subfolder)
    theirs = theirs_type.from_pretrained(tmp_path / "ours")
    assert {k: v for k, v in theirs.config.items() if not k.startswith("_")} == dict(ours.config)
    theirs.save_config(tmp_path / "pipeline" / "scheduler")
    assert ours_type.from_pretrained(tmp_path / "pipeline", subfolder="scheduler").config == ours.config


def test_a_noise_schedule_is_recorded_as_trained_betas():
    schedule = NoiseSchedule.linear(20, beta_start=1e-3, beta_end=0.2)
    ours = DDIMScheduler(schedule, prediction_type="v_prediction")
    assert ours.schedule is schedule and ours.config.trained_betas == schedule.betas.tolist()
    again = DDIMScheduler.from_config(ours.config)
    torch.testing.assert_close(again.schedule.alphas_cumprod, schedule.alphas_cumprod, rtol=0, atol=0)


def test_betas_and_rescaled_betas_are_diffusers_betas():
    """The named schedules are diffusers' float32 betas exactly (the schedule widens them to float64 and takes the
    cumulative product in float64); the zero-SNR rescaling is diffusers' function, computed in float64 (diffusers'
    float32 rescaling cancels: its small betas are off by up to 5e-4 relative)."""
    for config in (dict(), dict(beta_schedule="scaled_linear"), dict(beta_schedule="squaredcos_cap_v2"),
                   dict(beta_schedule="sigmoid"), dict(beta_schedule="laplace")):
        theirs, ours = diffusers.DDPMScheduler(**config), DDPMScheduler(**config)
        assert torch.equal(ours.schedule.betas, theirs.betas.double()), config
        torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod, rtol=2e-5, atol=1e-7)
    rescaled = DDPMScheduler(rescale_betas_zero_snr=True).schedule
    expected = ddpm_module.rescale_zero_terminal_snr(diffusers.DDPMScheduler().betas.double())
    torch.testing.assert_close(rescaled.betas, expected, rtol=1e-12, atol=1e-15)
    assert rescaled.alphas_cumprod[-1] == 0 and rescaled.betas[-1] == 1  # zero terminal SNR


@pytest.mark.parametrize("scheduler_type,config,error,key", [
    (DDPMScheduler, dict(timestep_spacing="uniform"), ValueError, "timestep_spacing='uniform'"),
    (DDIMScheduler, dict(timestep_spacing=None), ValueError, "timestep_spacing"),
    (DDPMScheduler, dict(beta_schedule="cubic"), ValueError, "beta_schedule='cubic'"),
    (DDIMScheduler, dict(beta_schedule="sigmoid"), ValueError, "beta_schedule='sigmoid'"),  # DDPM's only
    (DDPMScheduler, dict(steps_offset=-1), ValueError, "steps_offset=-1"),
    (DDIMScheduler, dict(steps_offset=1.5), TypeError, "steps_offset"),
    (DDPMScheduler, dict(num_train_timesteps=0), ValueError, "num_train_timesteps=0"),
    (DDPMScheduler, dict(variance_type="learned_small"), ValueError, "variance_type='learned_small'"),
    (DDIMScheduler, dict(prediction_type="noise"), ValueError, "prediction_type='noise'"),
    (DDPMScheduler, dict(thresholding="yes"), TypeError, "thresholding"),
    (DDPMScheduler, dict(dynamic_thresholding_ratio=1.5), ValueError, "dynamic_thresholding_ratio"),
    (DDIMScheduler, dict(sample_max_value=0.0), ValueError, "sample_max_value"),
    (DDPMScheduler, dict(clip_sample_range=-1.0), ValueError, "clip_sample_range"),
    (DDIMScheduler, dict(rescale_betas_zero_snr=1), TypeError, "rescale_betas_zero_snr"),
    (DDPMScheduler, dict(trained_betas=[0.1, 0.2], num_train_timesteps=3), ValueError, "trained_betas"),
    (DDPMScheduler, dict(trained_betas="0.1"), TypeError, "trained_betas"),
    (DDPMScheduler, dict(beta_end=2.0), ValueError, "beta_end"),
])
def test_bad_configs_name_the_key(scheduler_type, config, error, key):
    with pytest.raises(error, match=key):
        scheduler_type(**config)
    with pytest.raises(error, match=key):
        scheduler_type.from_config({**scheduler_type().config, **config})


def test_bad_config_sources_are_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match="steps_offset=1 moves the first of 1000 'leading' timesteps to 1000"):
        DDPMScheduler(steps_offset=1).set_timesteps(1000)
    with pytest.raises(TypeError, match="config must be a mapping"):
        DDPMScheduler.from_config("google/ddpm-cifar10-32")
    with pytest.raises(TypeError, match="unknown option 'num_steps'"):
        DDPMScheduler.from_config({}, num_steps=3)
    with pytest.raises(FileNotFoundError, match="no scheduler_config.json in"):
        DDIMScheduler.from_pretrained(tmp_path)
    (tmp_path / "scheduler_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        DDIMScheduler.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="pass either schedule or the beta keys"):
        DDPMScheduler(NoiseSchedule.linear(), beta_schedule="scaled_linear")
    with pytest.raises(TypeError, match="pass num_train_timesteps= by keyword"):
        DDPMScheduler(1000)


# --------------------------------------------------------------------------------------------------------------
# loops and timesteps

@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_timesteps_match_diffusers(spacing, steps_offset):
    for num_train, steps in ((1000, 37), (1000, 7), (50, 50), (10, 3), (1000, 1)):
        for ours_type, theirs_type in ((DDIMScheduler, diffusers.DDIMScheduler),
                                       (DDPMScheduler, diffusers.DDPMScheduler)):
            if spacing == "leading" and steps_offset and num_train == steps:
                continue  # the offset moves the first timestep past the table (refused, see the bad-config test)
            config = dict(num_train_timesteps=num_train, timestep_spacing=spacing, steps_offset=steps_offset)
            ours, theirs = ours_type(**config), theirs_type(**config)
            ours.set_timesteps(steps, device=DEVICE)
            theirs.set_timesteps(steps)
            assert ours.timesteps.tolist() == theirs.timesteps.tolist()
            assert ours.timesteps.dtype == torch.int64 and ours.timesteps.device.type == DEVICE


def test_ddpm_custom_timesteps_are_walked_as_diffusers():
    theirs, ours = diffusers.DDPMScheduler(), DDPMScheduler()
    theirs.set_timesteps(timesteps=[900, 500, 20, 3])
    ours.set_timesteps(timesteps=[900, 500, 20, 3])
    assert [ours.previous_timestep(t) for t in ours.timesteps] == [
        int(theirs.previous_timestep(t)) for t in theirs.timesteps]
    with pytest.raises(ValueError, match="descending"):
        ours.set_timesteps(timesteps=[3, 20])


@pytest.mark.parametrize("impl", ["triton", "eager"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_loop_matches_diffusers(impl, prediction_type):
    start = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    theirs = _loop(diffusers.DDIMScheduler(prediction_type=prediction_type), 25, start.clone())
    with use_impl(impl):
        ours = _loop(DDIMScheduler(prediction_type=prediction_type), 25, start.clone())
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
            out = theirs.step(uncond + 3.0 * (cond - uncond), t, expected)
            expected = out.prev_sample
            cond, uncond = predictions(sample, t)
            got = ours.step(cond, t, sample, uncond_output=uncond, guidance_scale=3.0)
            torch.testing.assert_close(got.pred_original_sample, out.pred_original_sample, rtol=1e-4, atol=1e-4)
            sample = got.prev_sample
    torch.testing.assert_close(sample, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="guidance_scale=3.0 needs uncond_output"):
        ours.step(cond, t, sample, guidance_scale=3.0)


@pytest.mark.parametrize("impl", ["triton", "eager"])
def test_ddpm_loop_matches_diffusers_with_the_same_generator(impl):
    """diffusers draws each step's noise with torch.randn from its generator (except at t = 0); ours draws the same
    numbers under both impls."""
    start = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    theirs = _loop(diffusers.DDPMScheduler(), 20, start.clone(), generator=torch.Generator().manual_seed(3))
    with use_impl(impl):
        ours = _loop(DDPMScheduler(), 20, start.clone(), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


TRAILING_CASES = [(1000, 7), (1000, 3), (1000, 30), (1000, 999), (50, 7), (10, 3), (1000, 1)]


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
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


def test_previous_timestep_rejects_a_timestep_off_the_list():
    scheduler = DDPMScheduler(timestep_spacing="trailing")
    scheduler.set_timesteps(7)
    with pytest.raises(ValueError, match="timestep=857 is not one of the scheduler's"):
        scheduler.previous_timestep(857)
    with pytest.raises(ValueError, match="timestep must be one of the scheduler's timesteps"):
        scheduler.previous_timestep(torch.tensor([856, 857]))


# --------------------------------------------------------------------------------------------------------------
# forward process

def test_add_noise_and_velocity_match_diffusers():
    x0 = torch.randn(4, 3, 5, 5)
    noise = torch.randn(4, 3, 5, 5)
    timesteps = torch.tensor([0, 10, 500, 999])
    theirs, ours = diffusers.DDPMScheduler(), DDPMScheduler()
    torch.testing.assert_close(ours.add_noise(x0, noise, timesteps), theirs.add_noise(x0, noise, timesteps),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.get_velocity(x0, noise, timesteps), theirs.get_velocity(x0, noise, timesteps),
                               rtol=1e-5, atol=1e-5)
    # one timestep for every sample, as an int or a one-element tensor; fp64 computes in fp64
    one = theirs.add_noise(x0, noise, torch.tensor([500]))
    torch.testing.assert_close(ours.add_noise(x0, noise, 500), one, rtol=1e-5, atol=1e-5)
    twin = fp64_twin(theirs)
    torch.testing.assert_close(ours.add_noise(x0.double(), noise.double(), timesteps),
                               twin.add_noise(x0.double(), noise.double(), timesteps), rtol=1e-12, atol=1e-12)
    assert ours.scale_model_input(x0, 3) is x0


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


# --------------------------------------------------------------------------------------------------------------
# bad arguments

def test_scheduler_rejects_bad_arguments():
    with pytest.raises(TypeError, match="schedule must be a NoiseSchedule"):
        DDIMScheduler(torch.ones(10))
    with pytest.raises(ValueError, match="num_inference_steps=0"):
        DDIMScheduler().set_timesteps(0)
    with pytest.raises(ValueError, match="eta=2"):
        DDIMScheduler().step(torch.zeros(1, 2), 10, torch.zeros(1, 2), eta=2)
    with pytest.raises(ValueError, match="either generator or variance_noise"):
        DDIMScheduler().step(torch.zeros(1, 2), 10, torch.zeros(1, 2), eta=0.5, generator=torch.Generator(),
                             variance_noise=torch.zeros(1, 2))
    with pytest.raises(TypeError, match="use_clipped_model_output"):
        DDIMScheduler().step(torch.zeros(1, 2), 10, torch.zeros(1, 2), use_clipped_model_output=1)


@pytest.mark.parametrize("scheduler,kwargs,error,argument", [
    (DDPMScheduler, dict(prediction_type="noise"), ValueError, "prediction_type"),
    (DDIMScheduler, dict(prediction_type=1), ValueError, "prediction_type"),
    (DDPMScheduler, dict(variance_type="learned_small"), ValueError, "variance_type"),
    (DDPMScheduler, dict(clip_sample=1), TypeError, "clip_sample"),
    (DDIMScheduler, dict(clip_sample_range=0.0), ValueError, "clip_sample_range"),
    (DDIMScheduler, dict(clip_sample_range="1"), TypeError, "clip_sample_range"),
    (DDIMScheduler, dict(set_alpha_to_one=None), TypeError, "set_alpha_to_one"),
    (DDPMScheduler, dict(timestep_spacing=None), ValueError, "timestep_spacing"),
    (DDPMScheduler, dict(in_kernel_noise="yes"), TypeError, "in_kernel_noise"),
])
def test_scheduler_constructors_name_the_bad_argument(scheduler, kwargs, error, argument):
    """Wrong values used to be stored and fail later, inside the step."""
    with pytest.raises(error, match=argument):
        scheduler(**kwargs)


def test_set_timesteps_rejects_wrong_types():
    with pytest.raises(TypeError, match="num_inference_steps"):
        DDPMScheduler().set_timesteps(7.0)
