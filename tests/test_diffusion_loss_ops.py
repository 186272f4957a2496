"""Forward process and fused training loss (kernels/diffusion_loss.py) against fp64 references, diffusers and
F.mse_loss."""
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from reference_checks import (
    DTYPES,
    PER_SAMPLE_LAYOUTS,
    assert_close_to_reference,
    assert_standard_normal,
    random_tensor,
)

from genkernels.kernels.diffusion import PREDICTION_TYPES, NoiseSchedule
from genkernels.kernels.diffusion_loss import (
    REDUCTIONS,
    diffusion_loss,
    diffusion_loss_reference,
    q_sample,
    q_sample_reference,
)
from genkernels.kernels.philox import philox_normal

SCHEDULE = NoiseSchedule.linear()
T = SCHEDULE.num_train_timesteps
NOISE_PATHS = ("tensor", "seed")


def _timesteps(batch, device):
    """Per-sample timesteps spread over the schedule, both ends included."""
    return torch.tensor([0, T - 1, 500, 1, 250, 998][:batch] + [37] * max(0, batch - 6), device=device)


def _as_batch(timestep, batch, device):
    if isinstance(timestep, int):
        return torch.full((batch,), timestep, dtype=torch.int64, device=device)
    return timestep.reshape(-1).expand(batch).to(torch.int64)


def _seed(device, value=1234):
    return torch.tensor([value], dtype=torch.int64, device=device)


def _noise_source(path, shape, device, layout=None, dtype=torch.float32):
    """``(kwargs for the op, the fp64 noise it stands for)``."""
    if path == "seed":
        seed = _seed(device)
        return {"seed": seed}, philox_normal(seed, shape).double()
    noise = random_tensor(shape, dtype, 2, device)
    if layout is not None:
        noise = layout(noise)
    return {"noise": noise}, noise.double()


def _sqrt_terms(timesteps, ndim):
    view = (-1,) + (1,) * (ndim - 1)
    a = SCHEDULE.alphas_cumprod[timesteps.cpu()]
    return a.sqrt().reshape(view), (1 - a).sqrt().reshape(view)


# ---------------------------------------------------------------------------------------------------------------
# The references themselves, against independent implementations
# ---------------------------------------------------------------------------------------------------------------
def test_q_sample_reference_matches_diffusers_add_noise():
    theirs = DDPMScheduler()
    theirs.alphas_cumprod = SCHEDULE.alphas_cumprod.clone()
    x0 = random_tensor((4, 3, 5, 6), torch.float64, 0)
    noise = random_tensor((4, 3, 5, 6), torch.float64, 1)
    t = torch.tensor([0, 17, 500, 999])
    torch.testing.assert_close(q_sample_reference(x0, t, SCHEDULE, noise), theirs.add_noise(x0, noise, t),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_loss_reference_matches_mse_of_an_independent_target(prediction_type, reduction):
    theirs = DDPMScheduler()
    theirs.alphas_cumprod = SCHEDULE.alphas_cumprod.clone()
    mo, x0, noise = (random_tensor((4, 3, 5), torch.float64, seed) for seed in range(3))
    t = torch.tensor([3, 999, 0, 640])
    target = {"epsilon": noise, "sample": x0, "v_prediction": theirs.get_velocity(x0, noise, t)}[prediction_type]
    if reduction == "per_sample":
        expected = F.mse_loss(mo, target, reduction="none").mean(dim=(1, 2))
    else:
        expected = F.mse_loss(mo, target, reduction=reduction)
    ours = diffusion_loss_reference(mo, x0, t, SCHEDULE, noise, prediction_type, reduction)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# q_sample: kernel and eager vs the fp64 reference, outputs and gradients
# ---------------------------------------------------------------------------------------------------------------
def _q_sample_outputs_and_grads(fn, x0, noise, weight):
    x0 = x0.detach().requires_grad_()
    inputs = [x0]
    if noise is not None:
        noise = noise.detach().requires_grad_()
        inputs.append(noise)
    out = fn(x0, noise)
    return (out,) + torch.autograd.grad((out.double() * weight).sum(), inputs)


def _check_q_sample(shape, dtype, device, timestep, path, layout=None):
    x0 = random_tensor(shape, dtype, 0, device)
    if layout is not None:
        x0 = layout(x0)
    kwargs, noise64 = _noise_source(path, shape, device, layout, dtype)
    noise = kwargs.get("noise")
    seed = kwargs.get("seed")
    weight = random_tensor(shape, torch.float64, 5, device)
    kernel, eager = (
        _q_sample_outputs_and_grads(lambda x, n, impl=impl: q_sample(x, timestep, SCHEDULE, noise=n, seed=seed,
                                                                     impl=impl), x0, noise, weight)
        for impl in ("triton", "eager"))
    t = _as_batch(timestep, shape[0], device)
    reference = _q_sample_outputs_and_grads(lambda x, n: q_sample_reference(x, t, SCHEDULE, n if n is not None
                                                                            else noise64),
                                            x0.double(), None if noise is None else noise.double(), weight)
    assert kernel[0].stride() == torch.empty_like(x0).stride()
    for name, k, e, r in zip(("x_t", "grad_x0", "grad_noise"), kernel, eager, reference):
        assert_close_to_reference(k, r, e, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", NOISE_PATHS)
def test_q_sample_dtypes_and_noise_paths(dtype, path, device):
    _check_q_sample((5, 3, 17, 13), dtype, device, _timesteps(5, device), path)


@pytest.mark.parametrize("layout", PER_SAMPLE_LAYOUTS, ids=lambda layout: layout.name)
@pytest.mark.parametrize("path", NOISE_PATHS)
def test_q_sample_layouts(layout, path, device):
    _check_q_sample(layout.shape, torch.float32, device, 700, path, layout)


@pytest.mark.parametrize("timestep", [0, 999, "0-d", "[1]"])
def test_q_sample_timestep_forms(timestep, device):
    if timestep == "0-d":
        timestep = torch.tensor(321, device=device)
    elif timestep == "[1]":
        timestep = torch.tensor([654], device=device)
    _check_q_sample((3, 40), torch.float32, device, timestep, "seed")


def test_q_sample_draws_from_the_generator_the_same_under_both_impls(device):
    x0 = torch.zeros(2, 3, 9, device=device)
    drawn = [q_sample(x0, 999, SCHEDULE, generator=torch.Generator(device).manual_seed(3), impl=impl)
             for impl in ("triton", "eager")]
    torch.testing.assert_close(drawn[0], drawn[1], rtol=1e-5, atol=1e-6)
    again = q_sample(x0, 999, SCHEDULE, generator=torch.Generator(device).manual_seed(3), impl="triton")
    torch.testing.assert_close(again, drawn[0], rtol=0, atol=0)
    other = q_sample(x0, 999, SCHEDULE, generator=torch.Generator(device).manual_seed(4), impl="triton")
    assert (other - drawn[0]).abs().mean() > 0.5


def test_q_sample_seeded_noise_is_standard_normal(device):
    x0 = torch.zeros(4, 3, 32, 32, device=device)
    t = torch.tensor([999, 500, 10, 200], device=device)
    _, sqrt_beta = _sqrt_terms(t, 4)
    noise = q_sample(x0, t, SCHEDULE, seed=_seed(device, 77), impl="triton").double() / sqrt_beta.to(device)
    assert_standard_normal(noise)


def test_q_sample_seeded_noise_does_not_depend_on_layout(device):
    """channels_last walks the tensor in another order (each element draws its own Philox group); the noise of an
    element stays the same."""
    x0 = random_tensor((2, 5, 7, 9), torch.float32, 0, device)
    seed = _seed(device, 5)
    contiguous = q_sample(x0, 400, SCHEDULE, seed=seed, impl="triton")
    channels_last = q_sample(x0.contiguous(memory_format=torch.channels_last), 400, SCHEDULE, seed=seed,
                             impl="triton")
    assert channels_last.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(channels_last, contiguous, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# diffusion_loss: kernel and eager vs the fp64 reference, loss and gradients
# ---------------------------------------------------------------------------------------------------------------
def _loss_and_grads(fn, mo, x0, weight, with_x0_grad):
    mo = mo.detach().requires_grad_()
    x0 = x0.detach().requires_grad_(with_x0_grad)
    loss = fn(mo, x0)
    inputs = [mo, x0] if with_x0_grad else [mo]
    return (loss,) + torch.autograd.grad((loss.double() * weight).sum(), inputs)


def _check_loss(shape, device, prediction_type, reduction, path, timestep=None, dtype=torch.float32,
                x0_dtype=None, layout=None):
    mo = random_tensor(shape, dtype, 0, device)
    x0 = random_tensor(shape, x0_dtype or dtype, 1, device)
    if layout is not None:
        mo, x0 = layout(mo), layout(x0)
    kwargs, noise64 = _noise_source(path, shape, device, layout)
    timestep = _timesteps(shape[0], device) if timestep is None else timestep
    loss_shape = {"none": shape, "per_sample": shape[:1]}.get(reduction, ())
    weight = random_tensor(loss_shape, torch.float64, 7, device)
    with_x0_grad = prediction_type != "epsilon"
    kernel, eager = (
        _loss_and_grads(lambda m, x, impl=impl: diffusion_loss(m, x, timestep, SCHEDULE, **kwargs,
                                                               prediction_type=prediction_type,
                                                               reduction=reduction, impl=impl),
                        mo, x0, weight, with_x0_grad)
        for impl in ("triton", "eager"))
    t = _as_batch(timestep, shape[0], device)
    reference = _loss_and_grads(lambda m, x: diffusion_loss_reference(m, x, t, SCHEDULE, noise64, prediction_type,
                                                                      reduction),
                                mo.double(), x0.double(), weight, with_x0_grad)
    expected_dtype = mo.dtype if reduction == "none" else torch.float32
    assert kernel[0].dtype == expected_dtype and kernel[0].shape == loss_shape
    assert kernel[1].dtype == mo.dtype
    if mo.numel() == 0:  # means over no elements are NaN, as in F.mse_loss
        for k, e in zip(kernel, eager):
            torch.testing.assert_close(k, e, equal_nan=True)
        return
    assert kernel[1].stride() == torch.empty_like(mo).stride()
    for name, k, e, r in zip(("loss", "grad_model_output", "grad_x0"), kernel, eager, reference):
        assert_close_to_reference(k, r, e, name)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("path", NOISE_PATHS)
def test_loss_every_prediction_reduction_and_noise_path(prediction_type, reduction, path, device):
    _check_loss((5, 3, 17, 13), device, prediction_type, reduction, path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("path", NOISE_PATHS)
def test_loss_half_precision(dtype, prediction_type, path, device):
    _check_loss((3, 4, 9, 11), device, prediction_type, "mean", path, dtype=dtype)
    _check_loss((2, 100), device, prediction_type, "none", path, dtype=dtype)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_loss_model_output_in_bf16_and_x0_in_fp32(prediction_type, device):
    """Mixed precision: a bf16 network output against fp32 data."""
    _check_loss((3, 2, 9, 7), device, prediction_type, "per_sample", "seed", dtype=torch.bfloat16,
                x0_dtype=torch.float32)


@pytest.mark.parametrize("layout", PER_SAMPLE_LAYOUTS, ids=lambda layout: layout.name)
@pytest.mark.parametrize("path,reduction",
                         [("seed", "per_sample"), ("tensor", "none"), ("seed", "none"), ("seed", "mean")])
def test_loss_layouts(layout, path, reduction, device):
    _check_loss(layout.shape, device, "v_prediction", reduction, path, timestep=450, layout=layout)


@pytest.mark.parametrize("timestep", [0, 999, "0-d"])
def test_loss_int_and_scalar_timesteps(timestep, device):
    if timestep == "0-d":
        timestep = torch.tensor(123, device=device)
    _check_loss((3, 33), device, "v_prediction", "sum", "seed", timestep=timestep)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_loss_over_several_blocks_per_sample(reduction, device):
    """More elements per sample than one program takes: partial sums of several blocks, Philox groups past the
    first block."""
    _check_loss((2, 5000), device, "v_prediction", reduction, "seed")


def _embedded(values):
    """``values`` as a strided view into a NaN-filled buffer: any read outside the view turns results into NaN."""
    buffer = torch.full((values.shape[0] + 2, 2 * values.shape[1] + 3), float("nan"), device=values.device)
    view = buffer[1:-1, 3::2]
    view.copy_(values)
    return view


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_inputs_inside_larger_buffers_are_read_only_in_bounds(reduction, device):
    mo, x0, noise = (random_tensor((5, 77), torch.float32, seed, device) for seed in range(3))
    weight = random_tensor((5, 77) if reduction == "none" else (), torch.float64, 4, device)
    results = []
    for views in ((_embedded(mo), _embedded(x0), _embedded(noise)), (mo, x0, noise)):
        output, data = views[0].detach().requires_grad_(), views[1].detach().requires_grad_()
        loss = diffusion_loss(output, data, 400, SCHEDULE, noise=views[2], prediction_type="v_prediction",
                              reduction=reduction, impl="triton")
        grads = torch.autograd.grad((loss.double() * weight).sum(), [output, data])
        x_t = q_sample(views[1], 400, SCHEDULE, noise=views[2], impl="triton")
        results.append((loss, x_t) + grads)
    for got, expected in zip(*results):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_offsets_past_2_31_elements_are_computed_in_int64(device):
    # Views into one 8 GiB buffer (pages are only committed where written) whose last elements lie past 2**31:
    # int32 offsets would wrap around and read or write the wrong place.
    big = torch.empty(2**31 + 4096, dtype=torch.float32, device=device)
    batch_strided = [big.as_strided((3, 16), (2**30 + 8, 1), offset) for offset in (0, 32, 64)]
    inner_strided = [big.as_strided((2, 3), (1, 2**30 + 5), offset) for offset in (100, 200, 300)]
    for views in (batch_strided, inner_strided):
        for seed, view in enumerate(views):
            view.copy_(random_tensor(view.shape, torch.float32, seed, device))
        mo, x0, noise = views
        values = [t.clone() for t in views]
        for reduction in ("none", "per_sample"):
            kernel = diffusion_loss(mo, x0, 900, SCHEDULE, noise=noise, prediction_type="v_prediction",
                                    reduction=reduction, impl="triton")
            expected = diffusion_loss(*values[:2], 900, SCHEDULE, noise=values[2], prediction_type="v_prediction",
                                      reduction=reduction, impl="eager")
            torch.testing.assert_close(kernel, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(q_sample(x0, 900, SCHEDULE, noise=noise, impl="triton"),
                                   q_sample(values[1], 900, SCHEDULE, noise=values[2], impl="eager"),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reduction,expected", [("mean", float("nan")), ("sum", 0.0)])
def test_loss_of_an_empty_batch(reduction, expected, device):
    mo = torch.zeros(0, 3, 4, device=device, requires_grad=True)
    loss = diffusion_loss(mo, torch.zeros(0, 3, 4, device=device), 5, SCHEDULE, seed=_seed(device),
                          reduction=reduction, impl="triton")
    assert loss.shape == () and loss.dtype == torch.float32
    torch.testing.assert_close(loss, torch.tensor(expected, device=device), equal_nan=True)
    loss.backward()
    assert mo.grad.shape == mo.shape
    for reduction in ("none", "per_sample"):
        out = diffusion_loss(mo, torch.zeros(0, 3, 4, device=device), 5, SCHEDULE, seed=_seed(device),
                             reduction=reduction, impl="triton")
        assert out.shape == ((0, 3, 4) if reduction == "none" else (0,))


def test_loss_is_deterministic_and_scales_the_stored_gradient(device):
    mo = random_tensor((4, 3, 40, 40), torch.float32, 0, device).requires_grad_()
    x0 = random_tensor((4, 3, 40, 40), torch.float32, 1, device)
    args = (mo, x0, _timesteps(4, device), SCHEDULE)
    first = diffusion_loss(*args, seed=_seed(device), impl="triton")
    second = diffusion_loss(*args, seed=_seed(device), impl="triton")
    assert torch.equal(first, second), "reductions must be bitwise reproducible"
    (grad_one,) = torch.autograd.grad(first, mo)
    (grad_three,) = torch.autograd.grad(3.0 * second, mo)
    torch.testing.assert_close(grad_three, 3.0 * grad_one, rtol=1e-6, atol=0)


def test_loss_skips_the_gradient_write_without_requires_grad(device):
    mo, x0 = torch.randn(2, 3, 5, device=device), torch.randn(2, 3, 5, device=device)
    table = SCHEDULE.kernel_table(torch.device(device))
    args = (mo, x0, None, _seed(device), table, None, 10, "epsilon", "mean")
    _, no_grad = torch.ops.genkernels.diffusion_loss(*args, None)
    _, with_grad = torch.ops.genkernels.diffusion_loss(*args, torch.bfloat16)
    assert no_grad.numel() == 0 and with_grad.shape == mo.shape and with_grad.dtype == torch.bfloat16
    loss = diffusion_loss(mo, x0, 10, SCHEDULE, seed=_seed(device), impl="triton")
    assert not loss.requires_grad


# ---------------------------------------------------------------------------------------------------------------
# fp16 gradients under loss scaling, as accurate as plain PyTorch's
# ---------------------------------------------------------------------------------------------------------------
def _plain_pytorch_fp16_gradient(mo, target, reduction, upstream):
    """The gradient plain PyTorch gives an fp16 network output: the loss computed in fp32 from ``.float()``,
    the upstream gradient (a GradScaler's scale) applied in fp32 before the one rounding to fp16."""
    mo = mo.detach().requires_grad_()
    squared = (mo.float() - target.float()) ** 2
    loss = {"mean": squared.mean(), "sum": squared.sum(), "per_sample": squared.flatten(1).mean(1)}[reduction]
    (grad,) = torch.autograd.grad(loss, mo, upstream)
    return grad


def _fp64_gradient(mo, target, reduction, upstream):
    diff = mo.double() - target.double()
    count = {"mean": diff.numel(), "sum": 1, "per_sample": diff[0].numel()}[reduction]
    scale = upstream.double().reshape((-1,) + (1,) * (diff.dim() - 1)) if reduction == "per_sample" else upstream
    return 2 * diff / count * scale


@pytest.mark.parametrize("reduction", ["mean", "per_sample", "sum"])
@pytest.mark.parametrize("upstream_scale", [2.0**16, 2.0**-3], ids=["grad_scaler", "tiny"])
@pytest.mark.parametrize("path", NOISE_PATHS)
def test_fp16_gradient_under_loss_scaling_is_as_accurate_as_pytorch(reduction, upstream_scale, path, device):
    """An fp16 output close to its target (a trained network): 2 (mo - target) / N is ~1e-6, an fp16 subnormal.
    The gradient used to be stored in fp16 in the forward, before the upstream 2**16 was applied: percent-level
    errors, and zeros where PyTorch keeps numbers. Each element is now within the fp16 rounding PyTorch's own
    gradient has (against the fp64 gradient of the same inputs, scaled), and nonzero wherever PyTorch's is."""
    shape = (4, 3, 33, 35)
    kwargs, noise64 = _noise_source(path, shape, device)
    if path == "seed":
        # the noise exactly as the kernels draw it (philox_normal may differ from it by an ulp of log/cos/sin,
        # which the small differences below would magnify). x_t / sqrt(1 - a_T) from q_sample is not exact either
        # (the fp32 product's rounding): the fp32 gradient of the summed loss at a zero output is -2 eps, exactly
        zero = torch.zeros(shape, device=device, requires_grad=True)
        summed = diffusion_loss(zero, torch.zeros(shape, device=device), 300, SCHEDULE, **kwargs, reduction="sum",
                                impl="triton")
        noise64 = torch.autograd.grad(summed, zero)[0].double() / -2
    mo = (noise64 + 0.01 * random_tensor(shape, torch.float64, 3, device)).half()
    x0 = random_tensor(shape, torch.float16, 1, device)
    upstream = torch.tensor(upstream_scale, device=device)
    if reduction == "per_sample":
        upstream = upstream * torch.tensor([1.0, 0.5, 2.0, 0.25], device=device)
    leaf = mo.detach().requires_grad_()
    loss = diffusion_loss(leaf, x0, 300, SCHEDULE, **kwargs, reduction=reduction, impl="triton")
    (kernel,) = torch.autograd.grad(loss, leaf, upstream)
    target = noise64.float()  # the kernel's target: the fp32 noise (read, or drawn from the seed)
    plain = _plain_pytorch_fp16_gradient(mo, target, reduction, upstream)
    reference = _fp64_gradient(mo, target, reduction, upstream)
    assert kernel.dtype == torch.float16
    subnormal = 2.0**-24  # the spacing of fp16 subnormals
    bound = 2 * (plain.double() - reference).abs() + 2.0**-10 * reference.abs() + subnormal / 2
    assert ((kernel.double() - reference).abs() <= bound).all(), (kernel.double() - reference).abs().max()
    assert not ((kernel == 0) & (plain != 0)).any(), "gradients flushed to zero where PyTorch keeps them"
    if upstream_scale > 1:
        assert (plain.double().abs() > 1e-3).float().mean() > 0.9  # the scaled gradients are normal numbers


def test_fp16_gradient_of_x0_under_loss_scaling(device):
    """The x0 gradient of a v-prediction loss (fp16 output, x0 and noise), recomputed with the 2**16 scale applied
    first, within the tolerance rule per element (plain PyTorch's fp16 gradient against the fp64 one)."""
    shape = (2, 3, 40, 41)
    x0, noise = random_tensor(shape, torch.float16, 1, device), random_tensor(shape, torch.float16, 2, device)
    t = torch.tensor([700, 700], device=device)
    a_t = SCHEDULE.alphas_cumprod[700].item()
    target = a_t**0.5 * noise.double() - (1 - a_t) ** 0.5 * x0.double()
    mo = (target + 0.01 * random_tensor(shape, torch.float64, 0, device)).half()  # close to its target
    upstream = torch.tensor(2.0**16, device=device)
    grads = []
    for fn, dtype in ((lambda m, x: diffusion_loss(m, x, t, SCHEDULE, noise=noise, prediction_type="v_prediction",
                                                   impl="triton"), torch.float16),
                      (lambda m, x: diffusion_loss_reference(m, x, t, SCHEDULE, noise, "v_prediction"),
                       torch.float16),
                      (lambda m, x: diffusion_loss_reference(m, x, t, SCHEDULE, noise.double(), "v_prediction"),
                       torch.float64)):
        m, x = mo.to(dtype).requires_grad_(), x0.to(dtype).requires_grad_()
        grads.append(torch.autograd.grad(fn(m, x), [m, x], upstream.to(torch.float32 if dtype != torch.float64
                                                                       else dtype)))
    for got, eager, want in zip(*grads):
        assert got.dtype == torch.float16
        bound = 2 * (eager.double() - want).abs() + 2.0**-10 * want.abs() + 2.0**-25
        assert ((got.double() - want).abs() <= bound).all()
        assert not ((got == 0) & (eager != 0)).any()


def test_fp32_output_keeps_the_stored_gradient(device):
    """fp32 outputs store the fp32 gradient in the forward (the backward is one scale); fp16 ones store none."""
    for dtype, stored in ((torch.float32, torch.float32), (torch.float16, None), (torch.bfloat16, None)):
        mo = torch.randn(2, 3, 5, device=device, dtype=dtype, requires_grad=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            diffusion_loss(mo, torch.randn(2, 3, 5, device=device), 10, SCHEDULE, seed=_seed(device), impl="triton")
        full = [s for s in saved if s.shape == mo.shape]
        if stored is None:  # the backward recomputes from model_output (the epsilon target does not read x0)
            assert {s.data_ptr() for s in full} == {mo.data_ptr()}
        else:
            assert len(full) == 1 and full[0].dtype == stored and full[0].data_ptr() != mo.data_ptr()


# ---------------------------------------------------------------------------------------------------------------
# The op contract: fp64, meta tensors, zero sizes, NaN
# ---------------------------------------------------------------------------------------------------------------
def test_fp64_runs_the_reference_and_triton_refuses_it(device):
    mo, x0 = (random_tensor((3, 4, 5), torch.float64, seed, device) for seed in range(2))
    noise = random_tensor((3, 4, 5), torch.float64, 2, device)
    t = torch.tensor([3, 500, 999], device=device)
    loss = diffusion_loss(mo, x0, t, SCHEDULE, noise=noise, prediction_type="v_prediction")
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, diffusion_loss_reference(mo, x0, t, SCHEDULE, noise, "v_prediction"),
                               rtol=1e-12, atol=0)
    x_t = q_sample(x0, t, SCHEDULE, noise=noise)
    assert x_t.dtype == torch.float64
    torch.testing.assert_close(x_t, q_sample_reference(x0, t, SCHEDULE, noise), rtol=1e-12, atol=0)
    mm = mo.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda m: diffusion_loss(m, x0, t, SCHEDULE, noise=noise, reduction="per_sample"),
                                    (mm,))
    with pytest.raises(ValueError, match="impl='triton' cannot run.*model_output is torch.float64"):
        diffusion_loss(mo, x0, t, SCHEDULE, noise=noise, impl="triton")
    with pytest.raises(ValueError, match="impl='triton' cannot run.*noise is torch.float64"):
        q_sample(x0.float(), t, SCHEDULE, noise=noise, impl="triton")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_meta_inputs_give_shapes_through_the_fake(reduction):
    shape = (3, 4, 5, 6)
    mo = torch.empty(shape, device="meta", dtype=torch.float16, requires_grad=True)
    x0 = torch.empty(shape, device="meta", requires_grad=True)
    t = torch.empty(3, dtype=torch.int64, device="meta")
    loss = diffusion_loss(mo, x0, t, SCHEDULE, seed=torch.empty(1, dtype=torch.int64, device="meta"),
                          prediction_type="v_prediction", reduction=reduction)
    assert loss.device.type == "meta"
    assert loss.shape == {"none": shape, "per_sample": (3,)}.get(reduction, ())
    grad_mo, grad_x0 = torch.autograd.grad(loss, [mo, x0], torch.ones_like(loss))
    assert grad_mo.shape == shape and grad_mo.dtype == torch.float16 and grad_x0.shape == shape
    x_t = q_sample(x0, t, SCHEDULE)
    assert x_t.device.type == "meta" and x_t.shape == shape


@pytest.mark.parametrize("shape", [(2, 0), (0, 3), (2, 3, 0)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("impl", ["triton", "eager"])
def test_zero_size_dims(shape, reduction, impl, device):
    mo = torch.zeros(shape, device=device, requires_grad=True)
    x0 = torch.zeros(shape, device=device)
    loss = diffusion_loss(mo, x0, 5, SCHEDULE, seed=_seed(device), reduction=reduction, impl=impl)
    expected = diffusion_loss_reference(mo.detach(), x0, torch.full((shape[0],), 5, device=device), SCHEDULE,
                                        torch.zeros(shape, device=device), "epsilon", reduction)
    assert loss.shape == expected.shape
    torch.testing.assert_close(loss.detach(), expected, equal_nan=True)
    (grad,) = torch.autograd.grad(loss.sum(), mo)
    assert grad.shape == shape
    assert q_sample(x0, 5, SCHEDULE, impl=impl).shape == shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nan_and_inf_give_what_pytorch_gives(dtype, reduction, device):
    """A NaN output element makes the reduced loss NaN and only its own gradient NaN; +-Inf gives +-Inf."""
    mo = random_tensor((2, 3, 7), dtype, 0, device)
    mo[0, 1, 2], mo[1, 0, 0], mo[1, 2, 6] = float("nan"), float("inf"), -float("inf")
    x0 = random_tensor((2, 3, 7), dtype, 1, device)
    noise = random_tensor((2, 3, 7), dtype, 2, device)
    results = []
    for impl in ("triton", "eager"):
        m = mo.detach().requires_grad_()
        loss = diffusion_loss(m, x0, 200, SCHEDULE, noise=noise, prediction_type="v_prediction",
                              reduction=reduction, impl=impl)
        results.append((loss,) + torch.autograd.grad(loss, m, torch.ones_like(loss)))
    for kernel, eager in zip(*results):
        assert torch.equal(kernel.isnan(), eager.isnan()) and torch.equal(kernel.isinf(), eager.isinf())
        torch.testing.assert_close(kernel, eager, equal_nan=True, rtol=2e-3, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# One seed, one noise: q_sample and diffusion_loss agree, under both impls
# ---------------------------------------------------------------------------------------------------------------
def test_loss_regenerates_the_noise_q_sample_drew(device):
    """With x0 = 0, q_sample gives x_t = sqrt(1 - a_t) eps, and the epsilon loss's gradient at model_output = 0 is
    -2 eps / N: both expose the eps each op drew from the seed, element by element. The loss's output is
    channels_last (another walk order) to show the noise does not depend on layout."""
    shape = (3, 4, 6, 5)
    t = torch.tensor([999, 300, 50], device=device)
    _, sqrt_beta = _sqrt_terms(t, 4)
    seed = _seed(device, 31)
    x0 = torch.zeros(shape, device=device)
    for q_impl in ("triton", "eager"):
        eps_q = q_sample(x0, t, SCHEDULE, seed=seed, impl=q_impl).double() / sqrt_beta.to(device)
        for loss_impl in ("triton", "eager"):
            mo = torch.zeros(shape, device=device).contiguous(memory_format=torch.channels_last).requires_grad_()
            loss = diffusion_loss(mo, x0, t, SCHEDULE, seed=seed, reduction="sum", impl=loss_impl)
            (grad,) = torch.autograd.grad(loss, mo)
            torch.testing.assert_close(-grad.double() / 2, eps_q, rtol=1e-5, atol=1e-6)


def test_training_step_with_a_seed_matches_the_one_with_stored_noise(device):
    x0 = random_tensor((2, 3, 8, 8), torch.float32, 0, device)
    t = torch.tensor([100, 800], device=device)
    seed = _seed(device, 9)
    noise = philox_normal(seed, x0.shape)
    weight = random_tensor((2, 3, 8, 8), torch.float32, 3, device)
    losses = []
    for kwargs in ({"seed": seed}, {"noise": noise}):
        x_t = q_sample(x0, t, SCHEDULE, **kwargs, impl="triton")
        losses.append(diffusion_loss(x_t * weight, x0, t, SCHEDULE, **kwargs, prediction_type="v_prediction",
                                     impl="triton"))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Registration: opcheck and torch.compile
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_noise", [True, False])
@pytest.mark.parametrize("tensor_timesteps", [True, False])
def test_opcheck_q_sample(with_noise, tensor_timesteps, device):
    x0 = torch.randn(3, 4, 5, device=device, requires_grad=True)
    noise = torch.randn(3, 4, 5, device=device) if with_noise else None
    seed = None if with_noise else _seed(device)
    timestep = torch.tensor([5, 500, 999], device=device) if tensor_timesteps else None
    torch.library.opcheck(torch.ops.genkernels.q_sample.default,
                          (x0, noise, seed, SCHEDULE.kernel_table(torch.device(device)), timestep, 600))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("with_noise,prediction_type", [(True, "epsilon"), (False, "v_prediction")])
def test_opcheck_diffusion_loss(reduction, with_noise, prediction_type, device):
    mo = torch.randn(3, 4, 5, device=device, requires_grad=True)
    x0 = torch.randn(3, 4, 5, device=device, requires_grad=prediction_type != "epsilon")
    noise = torch.randn(3, 4, 5, device=device) if with_noise else None
    seed = None if with_noise else _seed(device)
    torch.library.opcheck(torch.ops.genkernels.diffusion_loss.default,
                          (mo, x0, noise, seed, SCHEDULE.kernel_table(torch.device(device)),
                           torch.tensor([5, 500, 999], device=device), 0, prediction_type, reduction,
                           None if reduction == "none" else torch.float32))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_opcheck_diffusion_loss_backward(reduction, device):
    mo, x0, grad = (torch.randn(3, 4, 5, device=device) for _ in range(3))
    grad = {"none": grad, "per_sample": grad[:, 0, 0], "mean": grad[0, 0, 0], "sum": grad[0, 0, 0]}[reduction]
    torch.library.opcheck(torch.ops.genkernels.diffusion_loss_backward.default,
                          (grad, mo, x0, None, _seed(device), SCHEDULE.kernel_table(torch.device(device)), None, 70,
                           "sample", reduction, True, True))


def test_training_loss_compiles_with_fullgraph(device):
    """q_sample, a stand-in network and the fused loss in one graph, forward and backward, as eager runs them."""
    weight = torch.randn(3, 8, 8, device=device, requires_grad=True)

    def step(x0, t, seed):
        x_t = q_sample(x0, t, SCHEDULE, seed=seed, impl="triton")
        return diffusion_loss(x_t * weight, x0, t, SCHEDULE, seed=seed, prediction_type="v_prediction",
                              reduction="mean", impl="triton")

    x0 = torch.randn(2, 3, 8, 8, device=device)
    t = torch.tensor([10, 900], device=device)
    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")
    results = []
    for fn in (compiled, step):
        loss = fn(x0, t, _seed(device))
        results.append((loss,) + torch.autograd.grad(loss, weight))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: named errors before any launch
# ---------------------------------------------------------------------------------------------------------------
def _good(device):
    return torch.randn(2, 3, 4, device=device), torch.randn(2, 3, 4, device=device), _seed(device)


def test_rejects_both_or_neither_noise_and_seed(device):
    mo, x0, seed = _good(device)
    with pytest.raises(ValueError, match="exactly one of noise .* and seed.*both"):
        diffusion_loss(mo, x0, 5, SCHEDULE, noise=torch.randn_like(mo), seed=seed)
    with pytest.raises(ValueError, match="exactly one of noise .* and seed.*neither"):
        diffusion_loss(mo, x0, 5, SCHEDULE)
    with pytest.raises(ValueError, match="noise, or seed, or generator.*noise and seed"):
        q_sample(x0, 5, SCHEDULE, noise=torch.randn_like(x0), seed=seed)
    with pytest.raises(ValueError, match="noise, or seed, or generator.*noise and generator"):
        q_sample(x0, 5, SCHEDULE, noise=torch.randn_like(x0), generator=torch.Generator(device))
    with pytest.raises(ValueError, match="seed or generator, not both"):
        q_sample(x0, 5, SCHEDULE, seed=seed, generator=torch.Generator(device))


@pytest.mark.parametrize("bad_seed", ["int32", "two_elements", "float", "meta", "python_int"])
def test_rejects_a_bad_seed(bad_seed, device):
    mo, x0, _ = _good(device)
    seed = {"int32": torch.tensor([1], dtype=torch.int32, device=device),
            "two_elements": torch.tensor([1, 2], device=device),
            "float": torch.tensor([1.0], device=device),
            "meta": torch.tensor([1], device="meta"),
            "python_int": 1}[bad_seed]
    error = TypeError if bad_seed == "python_int" else ValueError
    with pytest.raises(error, match="seed"):
        diffusion_loss(mo, x0, 5, SCHEDULE, seed=seed)
    with pytest.raises(error, match="seed"):
        q_sample(x0, 5, SCHEDULE, seed=seed)


def test_rejects_shape_mismatches(device):
    mo, x0, seed = _good(device)
    with pytest.raises(ValueError, match=r"x0 must have the shape of model_output \[2, 3, 4\]"):
        diffusion_loss(mo, x0[:, :2], 5, SCHEDULE, seed=seed)
    with pytest.raises(ValueError, match=r"noise must have the shape of model_output"):
        diffusion_loss(mo, x0, 5, SCHEDULE, noise=torch.randn(2, 3, 5, device=device))
    with pytest.raises(ValueError, match=r"noise must have the shape of x0"):
        q_sample(x0, 5, SCHEDULE, noise=torch.randn(3, 3, 4, device=device))
    with pytest.raises(ValueError, match="model_output must have at least 1 dimension"):
        diffusion_loss(torch.tensor(1.0, device=device), torch.tensor(1.0, device=device), 5, SCHEDULE, seed=seed)
    with pytest.raises(ValueError, match="x0 must have at least 1 dimension"):
        q_sample(torch.tensor(1.0, device=device), 5, SCHEDULE, seed=seed)


def test_rejects_non_float_dtypes(device):
    mo, x0, seed = _good(device)
    with pytest.raises(TypeError, match="model_output must have a floating-point dtype.*torch.int64"):
        diffusion_loss(mo.long(), x0, 5, SCHEDULE, seed=seed)
    with pytest.raises(TypeError, match="noise must have a floating-point dtype"):
        diffusion_loss(mo, x0, 5, SCHEDULE, noise=mo.int())
    with pytest.raises(TypeError, match="x0 must have a floating-point dtype"):
        q_sample(x0.int(), 5, SCHEDULE)


def test_rejects_tensors_on_different_devices(device):
    mo, x0, seed = _good(device)
    with pytest.raises(ValueError, match="one device.*x0 on meta"):
        diffusion_loss(mo, x0.to("meta"), 5, SCHEDULE, seed=seed)
    with pytest.raises(ValueError, match="one device.*noise on meta"):
        q_sample(x0, 5, SCHEDULE, noise=x0.to("meta"))
    with pytest.raises(ValueError, match="timestep must be on the device"):
        diffusion_loss(mo, x0, torch.tensor([1, 2], device="meta"), SCHEDULE, seed=seed)


def test_rejects_unknown_prediction_type_and_reduction(device):
    mo, x0, seed = _good(device)
    with pytest.raises(ValueError, match="prediction_type='x0'.*'epsilon'"):
        diffusion_loss(mo, x0, 5, SCHEDULE, seed=seed, prediction_type="x0")
    with pytest.raises(ValueError, match="reduction='batchmean'.*'per_sample'"):
        diffusion_loss(mo, x0, 5, SCHEDULE, seed=seed, reduction="batchmean")


@pytest.mark.parametrize("op", ["q_sample", "diffusion_loss"])
def test_rejects_bad_timesteps(op, device):
    mo, x0, seed = _good(device)

    def call(timestep):
        if op == "q_sample":
            return q_sample(x0, timestep, SCHEDULE, seed=seed)
        return diffusion_loss(mo, x0, timestep, SCHEDULE, seed=seed)

    with pytest.raises(ValueError, match=r"timestep=1000 must lie in \[0, 1000\)"):
        call(1000)
    with pytest.raises(ValueError, match=r"timestep=-1 must lie in \[0, 1000\)"):
        call(-1)
    with pytest.raises(TypeError, match="timestep must be an int"):
        call(3.0)
    with pytest.raises(TypeError, match="timestep must have an integer dtype"):
        call(torch.tensor([1.0, 2.0], device=device))
    with pytest.raises(ValueError, match=r"timestep must be a scalar or have shape \[batch\] = \[2\]"):
        call(torch.tensor([1, 2, 3], device=device))
    if device == "cpu":
        with pytest.raises(ValueError, match="timestep must lie in"):
            call(torch.tensor([1, 1000]))


def test_rejects_bad_schedule_generator_and_impl(device):
    mo, x0, seed = _good(device)
    with pytest.raises(TypeError, match="schedule must be a NoiseSchedule"):
        diffusion_loss(mo, x0, 5, SCHEDULE.alphas_cumprod, seed=seed)
    with pytest.raises(TypeError, match="schedule must be a NoiseSchedule"):
        q_sample(x0, 5, "linear")
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        q_sample(x0, 5, SCHEDULE, generator=0)
    with pytest.raises(ValueError, match="impl='cuda' is not a known implementation"):
        diffusion_loss(mo, x0, 5, SCHEDULE, seed=seed, impl="cuda")
    with pytest.raises(ValueError, match="impl='fast'"):
        q_sample(x0, 5, SCHEDULE, impl="fast")


# ---------------------------------------------------------------------------------------------------------------
# GPU: training-sized shapes
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(64, 4, 64, 64), (16, 3, 256, 256)])
@pytest.mark.parametrize("path", NOISE_PATHS)
def test_large_shapes_on_gpu(dtype, shape, path):
    _check_loss(shape, "cuda", "v_prediction", "mean", path, dtype=dtype)
    _check_loss(shape, "cuda", "epsilon", "per_sample", path, dtype=dtype,
                layout=PER_SAMPLE_LAYOUTS[4] if len(shape) == 4 else None)
    _check_q_sample(shape, dtype, "cuda", _timesteps(shape[0], "cuda"), path)


@pytest.mark.gpu
def test_seeded_noise_on_gpu_matches_the_eager_stream():
    seed = _seed("cuda", 2**40 + 17)
    x0 = torch.zeros(32, 4, 64, 64, device="cuda")
    x_t = q_sample(x0, 999, SCHEDULE, seed=seed, impl="triton")
    _, sqrt_beta = _sqrt_terms(torch.tensor([999]), 1)
    eps = x_t.double() / sqrt_beta.item()
    torch.testing.assert_close(eps, philox_normal(seed, x0.shape).double(), rtol=1e-5, atol=1e-5)
    assert_standard_normal(eps)


# ---------------------------------------------------------------------------------------------------------------
# Programs split over a sample (the GPU launch: whole waves of one-warp programs, each walking a span in tiles)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("programs", [2, 3])
def test_split_over_programs_keeps_outputs_noise_and_losses(device, programs):
    """Several programs per sample, each walking a span of several tiles (forced: in the interpreter one program
    walks each sample): q_sample's output and noise are bitwise those of one program per sample, and so are those
    of the channels_last batch (whose noise is drawn element by element at the row-major index c * H * W + p,
    computed from the memory-order walk without a 64-bit division); the loss's partial sums add up to the same
    losses and gradients."""
    from genkernels.kernels.launch import force_launch_settings

    x0 = random_tensor((2, 3, 13, 11), torch.float32, 0, device)  # 429 elements per sample: ragged spans and tiles
    t = torch.tensor([100, 800], device=device)
    seed = _seed(device, 3)
    one = q_sample(x0, t, SCHEDULE, seed=seed, impl="triton")
    with force_launch_settings("q_sample", programs_per_sample=programs):
        split = q_sample(x0, t, SCHEDULE, seed=seed, impl="triton")
        channels_last = q_sample(x0.contiguous(memory_format=torch.channels_last), t, SCHEDULE, seed=seed,
                                 impl="triton")
    assert torch.equal(split, one)
    assert torch.equal(channels_last, one)
    expected = q_sample_reference(x0.double(), t, SCHEDULE, philox_normal(seed, x0.shape).double())
    torch.testing.assert_close(split.double(), expected, rtol=1e-5, atol=1e-5)

    model_output = random_tensor((2, 3, 13, 11), torch.float32, 4, device).requires_grad_(True)
    results = []
    for forced in (None, programs):
        settings = {} if forced is None else {"programs_per_sample": forced}
        with force_launch_settings("diffusion_loss", **settings):
            loss = diffusion_loss(model_output, x0, t, SCHEDULE, seed=seed, prediction_type="v_prediction",
                                  reduction="per_sample", impl="triton")
            (grad,) = torch.autograd.grad(loss.sum(), model_output)
        results.append((loss, grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-7)
    assert torch.equal(results[1][1], results[0][1])
    reference = diffusion_loss_reference(model_output.detach().double(), x0.double(), t, SCHEDULE,
                                         philox_normal(seed, x0.shape).double(), "v_prediction", "per_sample")
    torch.testing.assert_close(results[1][0].double(), reference, rtol=1e-5, atol=1e-6)


def test_channels_last_batch_with_drawn_noise_is_walked_as_one_contiguous_run():
    """A channels_last (or permuted dense) batch with in-kernel noise: only the noise's row-major index splits the
    walk into (pixel, channel) dims, so its loads and stores take the contiguous path (16-byte accesses; before,
    every tensor was unravelled with int64 // and %: 230-255 registers and scalar accesses on sm_90) and the index
    alone is unravelled, in int32; a sliced view still takes the strided path."""
    from genkernels.kernels.launch import walk_is_contiguous
    from genkernels.kernels.launch import NOISE_PHILOX_GATHER, SampleWalk

    x = torch.empty(2, 5, 7, 9).contiguous(memory_format=torch.channels_last)
    walk = SampleWalk({"out": torch.empty_like(x), "x0": x}, ("out",), "drawn")
    assert walk.noise_mode == NOISE_PHILOX_GATHER and not walk.layout.inner_contiguous
    assert walk_is_contiguous(walk)
    sliced = torch.empty(2, 5, 7, 18)[..., ::2]
    walk = SampleWalk({"out": torch.empty_like(sliced), "x0": sliced}, ("out",), "drawn")
    assert not walk_is_contiguous(walk)
