"""Property-based tests (hypothesis) of the diffusion ops: ddpm_step, ddim_step, q_sample, diffusion_loss.

Each example draws a schedule, shapes (0 and 1 in every dim), layouts, dtypes, timesteps (Python ints, [] and
[batch] tensors, the final step), options and special values (NaN, +-Inf, huge, subnormal). impl="triton" must
match the fp64 eager reference (baseline: eager in the same dtype) and diffusers' formulas written in plain PyTorch
in fp64 (baseline: the same formulas in the tested dtype); impl="eager" must match the plain formulas; fp64 under
impl="auto" runs the reference and impl="triton" refuses fp64. The noise is always passed, so both impls use the
same. Rule: genkernels.bench.correctness.assert_close_to_reference, NaN/Inf pattern included.

The plain formulas leave out a term whose coefficient is structurally zero at the step (the final step's ``x_t``
term, the noise at t = 0 or where sigma = 0), as the op contract says: +-Inf there gives what the math gives, not
``0 * Inf = NaN``.
"""
import math

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from genkernels.bench.correctness import (  # noqa: E402
    make_input,
    st_dtypes,
    st_layouts,
    st_shapes,
    st_special_fills,
)
from op_properties import assert_eager_properties, assert_fp64_properties, assert_gradients, assert_op_properties  # noqa: E402
from genkernels.kernels import NoiseSchedule, ddim_step, ddpm_step, diffusion_loss, q_sample  # noqa: E402

FP64 = torch.float64
NUM_TRAIN = 40
SCHEDULES = {"linear": NoiseSchedule.linear(NUM_TRAIN), "cosine": NoiseSchedule.cosine(NUM_TRAIN),
             "scaled_linear": NoiseSchedule.scaled_linear(NUM_TRAIN)}


# ----------------------------------------------------------------------------------------------------------------
# Drawing timesteps and tensors
# ----------------------------------------------------------------------------------------------------------------
@st.composite
def _timesteps(draw, batch, low=0):
    """Per-sample timesteps in [low, NUM_TRAIN - 1]: a list (one per sample) and how to pass them."""
    form = draw(st.sampled_from(("int", "scalar_tensor", "tensor")))
    if form != "tensor" or batch == 0:
        value = draw(st.integers(low, NUM_TRAIN - 1))
        return [value] * batch, (value if form == "int" else torch.tensor(value)), value
    values = draw(st.lists(st.integers(low, NUM_TRAIN - 1), min_size=batch, max_size=batch))
    return values, torch.tensor(values), None


def _as_passed(values, like):
    """``values`` (a list per sample) in the form ``like`` was passed: an int, a [] tensor or a [batch] tensor."""
    if isinstance(like, int):
        return values[0] if values else like
    if like.dim() == 0:
        return torch.tensor(values[0] if values else int(like))
    return torch.tensor(values, dtype=torch.int64)


@st.composite
def _step_tensors(draw, dtypes, guidance, fills):
    shape = draw(st_shapes((1, 4), max_side=4))
    dtype = draw(dtypes)
    batch = shape[0]
    names = ["model_output", "sample", "noise"] + (["uncond_output"] if guidance else [])
    inputs = {}
    for name in names:
        tensor_dtype = draw(st.sampled_from((dtype, torch.float32))) if name == "noise" else dtype
        inputs[name] = make_input(shape, tensor_dtype, draw(st.integers(0, 99)), layout=draw(st_layouts(shape)),
                                  fill=draw(fills))
    return inputs, batch


@st.composite
def _step_times(draw, batch, required_prev):
    t_values, t_passed, t_scalar = draw(_timesteps(batch))
    if not required_prev and draw(st.booleans()):
        prev_values, prev_passed = [t - 1 for t in t_values], None
    elif isinstance(t_passed, int) or (t_passed.dim() == 0):
        value = draw(st.integers(-1, t_scalar - 1))
        prev_values = [value] * batch
        prev_passed = value if draw(st.booleans()) else torch.tensor(value)
    else:
        prev_values = [draw(st.integers(-1, t - 1)) for t in t_values]
        prev_passed = torch.tensor(prev_values)
    return t_values, t_passed, prev_values, prev_passed


def _schedule_terms(schedule, t_values, prev_values, final_alpha_is_one, like):
    """alpha_prod_t, alpha_prod_prev, 1 - alpha_prod_t, 1 - alpha_prod_prev per sample in ``like``'s dtype (the
    fp64 tables rounded), shaped to broadcast over ``like``."""
    ac, one_minus = schedule.alphas_cumprod, schedule.one_minus_alphas_cumprod
    t = torch.tensor(t_values, dtype=torch.int64)
    prev = torch.tensor(prev_values, dtype=torch.int64)
    final_a = torch.tensor(1.0, dtype=FP64) if final_alpha_is_one else ac[0]
    final_b = torch.tensor(0.0, dtype=FP64) if final_alpha_is_one else one_minus[0]
    a_prev = torch.where(prev < 0, final_a, ac[prev.clamp(min=0)])
    b_prev = torch.where(prev < 0, final_b, one_minus[prev.clamp(min=0)])
    view = (-1,) + (1,) * (like.dim() - 1)
    dtype = like.dtype
    return tuple(v.to(dtype).reshape(view) for v in (ac[t], a_prev, one_minus[t], b_prev))


def _term(coefficient, value):
    """``coefficient * value``, the term left out where its coefficient is structurally zero (see the docstring)."""
    return torch.where(coefficient == 0, torch.zeros_like(value), coefficient * value)


def _x0_and_eps(model_output, sample, a_t, b_t, prediction_type):
    """diffusers' pred_original_sample and pred_epsilon."""
    if prediction_type == "epsilon":
        return (sample - b_t.sqrt() * model_output) / a_t.sqrt(), model_output
    if prediction_type == "sample":
        return model_output, (sample - a_t.sqrt() * model_output) / b_t.sqrt()
    return a_t.sqrt() * sample - b_t.sqrt() * model_output, a_t.sqrt() * model_output + b_t.sqrt() * sample


def _guided(t, options):
    if "uncond_output" not in t:
        return t["model_output"]
    return t["uncond_output"] + options["guidance_scale"] * (t["model_output"] - t["uncond_output"])


# ----------------------------------------------------------------------------------------------------------------
# ddpm_step
# ----------------------------------------------------------------------------------------------------------------
@st.composite
def ddpm_cases(draw, dtypes=st_dtypes(), fills=st_special_fills()):
    guidance = draw(st.booleans())
    inputs, batch = draw(_step_tensors(dtypes, guidance, fills))
    t_values, t_passed, prev_values, prev_passed = draw(_step_times(batch, required_prev=False))
    options = {"schedule": draw(st.sampled_from(sorted(SCHEDULES))), "timestep": t_passed,
               "prev_timestep": prev_passed, "t_values": t_values, "prev_values": prev_values,
               "prediction_type": draw(st.sampled_from(("epsilon", "sample", "v_prediction"))),
               "variance_type": draw(st.sampled_from(("fixed_small", "fixed_large"))),
               "clip_sample": draw(st.booleans()), "clip_sample_range": draw(st.sampled_from((1.0, 0.5))),
               "guidance_scale": draw(st.sampled_from((1.5, 7.5))) if guidance else 1.0}
    return inputs, options


def _ddpm_run(options):
    def run(t, impl):
        return ddpm_step(t["model_output"], options["timestep"], t["sample"], SCHEDULES[options["schedule"]],
                         prev_timestep=options["prev_timestep"], noise=t["noise"],
                         prediction_type=options["prediction_type"], variance_type=options["variance_type"],
                         clip_sample=options["clip_sample"], clip_sample_range=options["clip_sample_range"],
                         uncond_output=t.get("uncond_output"), guidance_scale=options["guidance_scale"], impl=impl)
    return run


def _ddpm_plain(options):
    def plain(t):
        """diffusers' DDPMScheduler.step (Ho et al. 2020 eq. 6-7, 15), per-sample timesteps."""
        x_t = t["sample"]
        if x_t.numel() == 0:
            return x_t.clone()
        a_t, a_prev, b_t, b_prev = _schedule_terms(SCHEDULES[options["schedule"]], options["t_values"],
                                                   options["prev_values"], True, x_t)
        x0, _ = _x0_and_eps(_guided(t, options), x_t, a_t, b_t, options["prediction_type"])
        if options["clip_sample"]:
            x0 = x0.clamp(-options["clip_sample_range"], options["clip_sample_range"])
        current_alpha = a_t / a_prev
        current_beta = 1 - current_alpha
        mean = _term(a_prev.sqrt() * current_beta / b_t, x0) + _term(current_alpha.sqrt() * b_prev / b_t, x_t)
        if options["variance_type"] == "fixed_small":
            variance = (b_prev / b_t * current_beta).clamp(min=1e-20)
        else:
            variance = current_beta
        has_noise = torch.tensor(options["t_values"]).reshape(variance.shape[:1] + (1,) * (x_t.dim() - 1)) > 0
        noise_coefficient = torch.where(has_noise, variance.sqrt(), torch.zeros_like(variance))
        return (mean + _term(noise_coefficient, t["noise"].to(x_t.dtype))).to(x_t.dtype)
    return plain


def _ddpm_name(options):
    return "ddpm_step " + str({k: v for k, v in options.items() if k not in ("t_values", "prev_values")})


@given(case=ddpm_cases())
def test_ddpm_step_triton_matches_the_references(case):
    inputs, options = case
    assert_op_properties(_ddpm_run(options), _ddpm_plain(options), inputs, _ddpm_name(options))


@given(case=ddpm_cases())
def test_ddpm_step_eager_matches_plain_pytorch(case):
    inputs, options = case
    assert_eager_properties(_ddpm_run(options), _ddpm_plain(options), inputs, _ddpm_name(options))


@given(case=ddpm_cases(dtypes=st.just(torch.float32)))
def test_ddpm_step_fp64_runs_the_reference(case):
    inputs, options = case
    assert_fp64_properties(_ddpm_run(options), _ddpm_plain(options), inputs, _ddpm_name(options))


# ----------------------------------------------------------------------------------------------------------------
# ddim_step
# ----------------------------------------------------------------------------------------------------------------
@st.composite
def ddim_cases(draw, dtypes=st_dtypes(), fills=st_special_fills()):
    guidance = draw(st.booleans())
    inputs, batch = draw(_step_tensors(dtypes, guidance, fills))
    t_values, t_passed, prev_values, prev_passed = draw(_step_times(batch, required_prev=True))
    options = {"schedule": draw(st.sampled_from(sorted(SCHEDULES))), "timestep": t_passed,
               "prev_timestep": prev_passed, "t_values": t_values, "prev_values": prev_values,
               "eta": draw(st.sampled_from((0.0, 0.5, 1.0))),
               "prediction_type": draw(st.sampled_from(("epsilon", "sample", "v_prediction"))),
               "clip_sample": draw(st.booleans()), "clip_sample_range": draw(st.sampled_from((1.0, 0.5))),
               "set_alpha_to_one": draw(st.booleans()), "use_clipped_model_output": draw(st.booleans()),
               "guidance_scale": draw(st.sampled_from((1.5, 7.5))) if guidance else 1.0}
    return inputs, options


def _ddim_run(options):
    def run(t, impl):
        return ddim_step(t["model_output"], options["timestep"], t["sample"], SCHEDULES[options["schedule"]],
                         prev_timestep=options["prev_timestep"], eta=options["eta"], noise=t["noise"],
                         prediction_type=options["prediction_type"], clip_sample=options["clip_sample"],
                         clip_sample_range=options["clip_sample_range"], set_alpha_to_one=options["set_alpha_to_one"],
                         use_clipped_model_output=options["use_clipped_model_output"],
                         uncond_output=t.get("uncond_output"), guidance_scale=options["guidance_scale"], impl=impl)
    return run


def _ddim_plain(options):
    def plain(t):
        """diffusers' DDIMScheduler.step (Song et al. 2021 eq. 12 and 16), per-sample timesteps."""
        x_t = t["sample"]
        if x_t.numel() == 0:
            return x_t.clone()
        a_t, a_prev, b_t, b_prev = _schedule_terms(SCHEDULES[options["schedule"]], options["t_values"],
                                                   options["prev_values"], options["set_alpha_to_one"], x_t)
        x0, eps = _x0_and_eps(_guided(t, options), x_t, a_t, b_t, options["prediction_type"])
        if options["clip_sample"]:
            x0 = x0.clamp(-options["clip_sample_range"], options["clip_sample_range"])
        variance = (b_prev / b_t) * (1 - a_t / a_prev)
        std = options["eta"] * variance.sqrt()
        if options["use_clipped_model_output"]:
            eps = (x_t - a_t.sqrt() * x0) / b_t.sqrt()
        direction = _term((1 - a_prev - std**2).clamp(min=0).sqrt(), eps)
        prev = _term(a_prev.sqrt(), x0) + direction
        if options["eta"] > 0:
            prev = prev + _term(std, t["noise"].to(x_t.dtype))
        return prev.to(x_t.dtype)
    return plain


def _ddim_name(options):
    return "ddim_step " + str({k: v for k, v in options.items() if k not in ("t_values", "prev_values")})


@given(case=ddim_cases())
def test_ddim_step_triton_matches_the_references(case):
    inputs, options = case
    assert_op_properties(_ddim_run(options), _ddim_plain(options), inputs, _ddim_name(options))


@given(case=ddim_cases())
def test_ddim_step_eager_matches_plain_pytorch(case):
    inputs, options = case
    assert_eager_properties(_ddim_run(options), _ddim_plain(options), inputs, _ddim_name(options))


@given(case=ddim_cases(dtypes=st.just(torch.float32)))
def test_ddim_step_fp64_runs_the_reference(case):
    inputs, options = case
    assert_fp64_properties(_ddim_run(options), _ddim_plain(options), inputs, _ddim_name(options))


# ----------------------------------------------------------------------------------------------------------------
# q_sample and diffusion_loss
# ----------------------------------------------------------------------------------------------------------------
@st.composite
def loss_cases(draw, dtypes=st_dtypes(), fills=st_special_fills()):
    shape = draw(st_shapes((1, 4), max_side=4))
    dtype = draw(dtypes)
    inputs = {}
    for name in ("model_output", "x0", "noise"):
        tensor_dtype = dtype if name == "model_output" else draw(st.sampled_from((dtype, torch.float32)))
        inputs[name] = make_input(shape, tensor_dtype, draw(st.integers(0, 99)), layout=draw(st_layouts(shape)),
                                  fill=draw(fills))
    t_values, t_passed, _ = draw(_timesteps(shape[0]))
    options = {"schedule": draw(st.sampled_from(sorted(SCHEDULES))), "timestep": t_passed, "t_values": t_values,
               "prediction_type": draw(st.sampled_from(("epsilon", "sample", "v_prediction"))),
               "reduction": draw(st.sampled_from(("mean", "sum", "none", "per_sample")))}
    return inputs, options


def _sqrt_terms(options, like):
    a_t, _, b_t, _ = _schedule_terms(SCHEDULES[options["schedule"]], options["t_values"], options["t_values"], True,
                                     like)
    return a_t.sqrt(), b_t.sqrt()


def _q_sample_run(options):
    return lambda t, impl: q_sample(t["x0"], options["timestep"], SCHEDULES[options["schedule"]], noise=t["noise"],
                                    impl=impl)


def _q_sample_plain(options):
    def plain(t):
        """diffusers' add_noise (Ho et al. 2020 eq. 4)."""
        x0 = t["x0"]
        if x0.numel() == 0:
            return x0.clone()
        sqrt_a, sqrt_b = _sqrt_terms(options, x0)
        return sqrt_a * x0 + sqrt_b * t["noise"].to(x0.dtype)
    return plain


def _loss_run(options):
    return lambda t, impl: diffusion_loss(t["model_output"], t["x0"], options["timestep"],
                                          SCHEDULES[options["schedule"]], noise=t["noise"],
                                          prediction_type=options["prediction_type"],
                                          reduction=options["reduction"], impl=impl)


def _loss_plain(options):
    def plain(t):
        """F.mse_loss against diffusers' training targets; fp32 losses (fp64 for fp64 inputs), "none" in
        model_output's dtype, "per_sample" the mean over each sample."""
        out = t["model_output"]
        wide = FP64 if FP64 in (out.dtype, t["x0"].dtype) else torch.float32
        x0, noise, prediction = t["x0"].to(wide), t["noise"].to(wide), out.to(wide)
        if options["prediction_type"] == "epsilon":
            target = noise
        elif options["prediction_type"] == "sample":
            target = x0
        else:
            sqrt_a, sqrt_b = _sqrt_terms(options, x0) if x0.numel() else (x0.new_ones(()), x0.new_ones(()))
            target = sqrt_a * noise - sqrt_b * x0
        reduction = options["reduction"]
        if reduction == "per_sample":
            squared = F.mse_loss(prediction, target, reduction="none")
            return squared.reshape(squared.shape[0], math.prod(squared.shape[1:])).mean(dim=1)
        loss = F.mse_loss(prediction, target, reduction=reduction)
        return loss.to(out.dtype) if reduction == "none" else loss
    return plain


def _loss_name(options, op):
    return op + " " + str({k: v for k, v in options.items() if k != "t_values"})


@given(case=loss_cases())
def test_q_sample_triton_matches_the_references(case):
    inputs, options = case
    assert_op_properties(_q_sample_run(options), _q_sample_plain(options), inputs, _loss_name(options, "q_sample"))


@given(case=loss_cases())
def test_q_sample_eager_matches_plain_pytorch(case):
    inputs, options = case
    assert_eager_properties(_q_sample_run(options), _q_sample_plain(options), inputs, _loss_name(options, "q_sample"))


@given(case=loss_cases(dtypes=st.just(torch.float32)))
def test_q_sample_fp64_runs_the_reference(case):
    inputs, options = case
    assert_fp64_properties(_q_sample_run(options), _q_sample_plain(options), inputs, _loss_name(options, "q_sample"))


@given(case=loss_cases())
def test_diffusion_loss_triton_matches_the_references(case):
    inputs, options = case
    assert_op_properties(_loss_run(options), _loss_plain(options), inputs, _loss_name(options, "diffusion_loss"))


@given(case=loss_cases())
def test_diffusion_loss_eager_matches_plain_pytorch(case):
    inputs, options = case
    assert_eager_properties(_loss_run(options), _loss_plain(options), inputs, _loss_name(options, "diffusion_loss"))


@given(case=loss_cases(dtypes=st.just(torch.float32)))
def test_diffusion_loss_fp64_runs_the_reference(case):
    inputs, options = case
    assert_fp64_properties(_loss_run(options), _loss_plain(options), inputs, _loss_name(options, "diffusion_loss"))


# ----------------------------------------------------------------------------------------------------------------
# Gradients (finite inputs)
# ----------------------------------------------------------------------------------------------------------------
@given(case=ddpm_cases(fills=st.just(None)))
def test_ddpm_step_triton_gradients_match_the_references(case):
    inputs, options = case
    assert_gradients(_ddpm_run(options), _ddpm_plain(options), inputs, ("model_output", "sample", "uncond_output"),
                      _ddpm_name(options))


@given(case=ddim_cases(fills=st.just(None)))
def test_ddim_step_triton_gradients_match_the_references(case):
    inputs, options = case
    assert_gradients(_ddim_run(options), _ddim_plain(options), inputs, ("model_output", "sample", "uncond_output"),
                      _ddim_name(options))


@given(case=loss_cases(fills=st.just(None)))
def test_q_sample_triton_gradients_match_the_references(case):
    inputs, options = case
    assert_gradients(_q_sample_run(options), _q_sample_plain(options), inputs, ("x0", "noise"),
                      _loss_name(options, "q_sample"))


@given(case=loss_cases(fills=st.just(None)))
def test_diffusion_loss_triton_gradients_match_the_references(case):
    inputs, options = case
    assert_gradients(_loss_run(options), _loss_plain(options), inputs, ("model_output", "x0"),
                      _loss_name(options, "diffusion_loss"))
