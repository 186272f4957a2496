"""Fused reparameterization + KL (kernels/reparameterize.py) against fp64 references and torch.distributions."""
import math

import pytest
import torch
from reference_checks import (
    DTYPES,
    PER_SAMPLE_LAYOUTS,
    assert_close_to_reference,
    assert_standard_normal,
    random_tensor,
)

from genkernels.kernels.launch import draw_philox_seed
from genkernels.kernels.philox import philox_normal
from genkernels.kernels.reparameterize import (
    reparameterize_kl,
    reparameterize_kl_backward_reference,
    reparameterize_kl_reference,
)


def _inputs(shape, dtype, device, seed=0):
    mu = random_tensor(shape, dtype, seed, device)
    logvar = random_tensor(shape, dtype, seed + 1, device, scale=1.5)
    noise = random_tensor(shape, dtype, seed + 2, device)
    return mu, logvar, noise


def _outputs_and_grads(fn, mu, logvar, noise, weight_z, weight_kl):
    """``(z, kl, dL/dmu, dL/dlogvar)`` for ``L = sum(z * weight_z) + sum(kl * weight_kl)``."""
    mu = mu.detach().requires_grad_()
    logvar = logvar.detach().requires_grad_()
    z, kl = fn(mu, logvar, noise)
    loss = 0
    if weight_z is not None:
        loss = loss + (z.double() * weight_z).sum()
    if weight_kl is not None:
        loss = loss + (kl.double() * weight_kl).sum()
    grad_mu, grad_logvar = torch.autograd.grad(loss, [mu, logvar])
    return z, kl, grad_mu, grad_logvar


def _check(mu, logvar, noise, with_grad_z=True, with_grad_kl=True):
    weight_z = random_tensor(mu.shape, torch.float64, 5, mu.device) if with_grad_z else None
    weight_kl = random_tensor(mu.shape[:1], torch.float64, 6, mu.device) if with_grad_kl else None
    kernel = _outputs_and_grads(lambda m, l, n: reparameterize_kl(m, l, noise=n, impl="triton"), mu, logvar, noise,
                                weight_z, weight_kl)
    eager = _outputs_and_grads(lambda m, l, n: reparameterize_kl(m, l, noise=n, impl="eager"), mu, logvar, noise,
                               weight_z, weight_kl)
    reference = _outputs_and_grads(reparameterize_kl_reference, mu.double(), logvar.double(), noise.double(),
                                   weight_z, weight_kl)
    assert kernel[0].stride() == torch.empty_like(mu).stride()
    assert kernel[1].dtype == torch.float32 and kernel[1].shape == (mu.shape[0],)
    for name, k, e, r in zip(("z", "kl", "grad_mu", "grad_logvar"), kernel, eager, reference):
        assert_close_to_reference(k, r, e, name)


# ---------------------------------------------------------------------------------------------------------------
# The reference itself
# ---------------------------------------------------------------------------------------------------------------
def test_reference_matches_torch_distributions():
    mu, logvar, noise = _inputs((4, 3, 5), torch.float64, "cpu")
    z, kl = reparameterize_kl_reference(mu, logvar, noise)
    posterior = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    prior = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    expected_kl = torch.distributions.kl_divergence(posterior, prior).sum(dim=(1, 2))
    torch.testing.assert_close(kl, expected_kl, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(z, mu + posterior.stddev * noise, rtol=1e-12, atol=1e-12)


def test_reference_kl_is_accurate_near_zero_logvar():
    # exp(l) - 1 - l cancels in the direct formula; the series keeps ~7 digits in fp32
    logvar = torch.tensor([[1e-4, -3e-3, 0.2, -0.45, 0.49, 0.51]], dtype=torch.float32)
    mu = torch.zeros_like(logvar)
    _, kl32 = reparameterize_kl_reference(mu, logvar, torch.zeros_like(mu))
    l64 = logvar.double()
    expected = 0.5 * (torch.expm1(l64) - l64).sum()
    assert abs(kl32.item() - expected.item()) <= 1e-6 * expected.item()


def test_reference_gradients_match_closed_form_and_gradcheck():
    mu, logvar, noise = _inputs((3, 7), torch.float64, "cpu")
    mu.requires_grad_()
    logvar.requires_grad_()
    torch.autograd.gradcheck(lambda m, l: reparameterize_kl_reference(m, l, noise), (mu, logvar))
    grad_z = random_tensor(mu.shape, torch.float64, 9)
    grad_kl = random_tensor((3,), torch.float64, 10)
    z, kl = reparameterize_kl_reference(mu, logvar, noise)
    autograd = torch.autograd.grad((z * grad_z).sum() + (kl * grad_kl).sum(), [mu, logvar])
    closed_form = reparameterize_kl_backward_reference(mu, logvar, noise, grad_z, grad_kl)
    for a, c in zip(autograd, closed_form):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Kernel against the fp64 reference: outputs and gradients
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", PER_SAMPLE_LAYOUTS, ids=lambda layout: layout.name)
def test_layouts_and_dtypes(dtype, layout, device):
    mu, logvar, noise = _inputs(layout.shape, dtype, device)
    _check(layout(mu), layout(logvar), layout(noise))


@pytest.mark.parametrize("with_grad_z, with_grad_kl", [(True, False), (False, True)])
def test_gradient_from_one_output_only(with_grad_z, with_grad_kl, device):
    mu, logvar, noise = _inputs((3, 257), torch.float32, device)
    _check(mu, logvar, noise, with_grad_z, with_grad_kl)


def test_several_blocks_per_sample_and_fp32_noise_with_bf16_latents(device):
    mu, logvar, _ = _inputs((2, 3, 50, 41), torch.bfloat16, device)  # 6150 elements: two blocks per sample
    _check(mu, logvar, random_tensor(mu.shape, torch.float32, 3, device))


def test_output_keeps_channels_last(device):
    mu, logvar, noise = (t.contiguous(memory_format=torch.channels_last) for t in _inputs((2, 4, 5, 3), torch.float32,
                                                                                        device))
    z, _ = reparameterize_kl(mu, logvar, noise=noise, impl="triton")
    assert z.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("impl", ["triton", "eager"])
def test_extreme_logvar_stays_finite_where_the_fp64_result_is(impl, device):
    logvar = torch.tensor([[-300.0, -100.0, -30.0, -1e-6, 0.0, 1e-6, 40.0, 88.0, 89.0, 89.3],
                           [120.0, 170.0, 176.0, 180.0, 200.0, -87.0, 60.0, 2.0, -2.0, 0.3]], device=device)
    mu = torch.tensor([[0.0, 1e19, -1.8e19, 3.0, -2.0, 0.5, 1e3, 0.0, 0.0, 0.0],
                       [0.0, 1.0, -1.0, 0.0, 0.0, 1e10, 0.0, -1e-20, 1.0, 2.0]], device=device)
    noise = torch.tensor([[1.0, -2.0, 0.5, 1.0, -1.0, 0.1, 2.0, 1.0, -1.0, 0.3],
                          [1e-3, 2.0, 0.7, 1e-12, 1e-30, -1.0, 0.2, 1.0, 1.0, -1.0]], device=device)
    grad_z = torch.full_like(mu, 0.5)
    grad_kl = torch.tensor([1e-3, 1e-30], device=device)
    mu_g, logvar_g = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
    z, kl = reparameterize_kl(mu_g, logvar_g, noise=noise, impl=impl)
    grads = torch.autograd.grad([z, kl], [mu_g, logvar_g], [grad_z, grad_kl])
    per_element = [(z, reparameterize_kl_reference(mu.double(), logvar.double(), noise.double())[0])]
    per_element += list(zip(grads, reparameterize_kl_backward_reference(mu.double(), logvar.double(),
                                                                        noise.double(), grad_z.double(),
                                                                        grad_kl.double())))
    kl_rows = [(kl[i:i + 1], reparameterize_kl_reference(mu[i:i + 1].double(), logvar[i:i + 1].double(),
                                                         noise[i:i + 1].double())[1]) for i in range(2)]
    for value, reference in per_element + kl_rows:
        representable = reference.abs() < torch.finfo(torch.float32).max
        assert torch.isfinite(value[representable]).all(), (value, reference)
        error = (value.double() - reference)[representable].abs()
        assert (error <= 2e-5 * reference[representable].abs() + 1e-30).all(), (value, reference)
        assert (value[~representable].abs() == math.inf).all()


SPECIAL = (0.0, 1.0, -1.5, float("nan"), float("inf"), float("-inf"))


def _special_value_grid(device):
    """Every combination of special values in ``(mu, logvar, noise)``, one per row of ``[216, 1]`` tensors."""
    grid = torch.cartesian_prod(*(torch.tensor(SPECIAL, dtype=torch.float64),) * 3).to(device)
    return grid[:, 0:1], grid[:, 1:2], grid[:, 2:3]


def _plain_pytorch(mu, logvar, noise):
    """The textbook formulas, as a plain PyTorch VAE writes them."""
    z = mu + torch.exp(0.5 * logvar) * noise
    kl = -0.5 * (1 + logvar - mu.square() - torch.exp(logvar)).sum(dim=1)
    return z, kl


@pytest.mark.parametrize("impl", ["triton", "eager"])
@pytest.mark.parametrize("used", ["both", "z", "kl"])
def test_nan_and_inf_give_the_plain_pytorch_pattern(impl, used, device):
    """NaN in gives NaN out in z, kl and both gradients exactly where plain PyTorch (fp64 autograd) gives NaN,
    +-Inf where it gives +-Inf, numbers where it gives numbers; the one difference is kl at logvar = +inf, where
    plain PyTorch's inf - inf is NaN and the KL of an infinite variance is +inf. A NaN logvar used to give
    z = -1.36e27 (tl.minimum dropped the NaN) and an output that is not used must not bring its inf * 0 terms in."""
    mu, logvar, noise = _special_value_grid(device)
    results = []
    for fn, dtype in ((lambda m, l, n: reparameterize_kl(m, l, noise=n, impl=impl), torch.float32),
                      (_plain_pytorch, torch.float64)):
        m, l = mu.to(dtype).requires_grad_(), logvar.to(dtype).requires_grad_()
        z, kl = fn(m, l, noise.to(dtype))
        loss = {"both": z.sum() + kl.sum(), "z": z.sum(), "kl": kl.sum()}[used]
        results.append([z.detach(), kl.detach(), *torch.autograd.grad(loss, [m, l])])
    infinite_kl = (logvar[:, 0] == math.inf) & ~mu[:, 0].isnan()
    results[1][1] = torch.where(infinite_kl, math.inf, results[1][1])
    for name, got, expected in zip(("z", "kl", "grad_mu", "grad_logvar"), *results):
        got, expected = got.double().flatten(), expected.flatten()
        assert torch.equal(got.isnan(), expected.isnan()), f"{name}: NaN pattern differs"
        finite = torch.isfinite(expected)
        assert torch.equal(got[~finite & ~expected.isnan()], expected[~finite & ~expected.isnan()]), name
        torch.testing.assert_close(got[finite], expected[finite], rtol=1e-6, atol=1e-6, msg=name)


def test_nan_logvar_gives_nan_not_a_huge_number(device):
    mu = torch.zeros(1, 3, device=device)
    logvar = torch.tensor([[float("nan"), 0.0, float("nan")]], device=device)
    noise = torch.tensor([[-1.0, 1.0, 0.0]], device=device)
    z, kl = reparameterize_kl(mu, logvar, noise=noise, impl="triton")
    assert z[0, 0].isnan() and z[0, 2].isnan() and z[0, 1] == 1.0 and kl.isnan().all()


def test_inputs_inside_larger_buffers_are_read_only_in_bounds(device):
    # Views into NaN-filled buffers: any read outside a view would turn the result into NaN.
    def embedded(values):
        buffer = torch.full((values.shape[0] + 2, 2 * values.shape[1] + 3), float("nan"), device=device)
        view = buffer[1:-1, 3::2]
        view.copy_(values)
        return view

    mu, logvar, noise = _inputs((5, 77), torch.float32, device)
    z, kl = reparameterize_kl(embedded(mu), embedded(logvar), noise=embedded(noise), impl="triton")
    z_eager, kl_eager = reparameterize_kl(mu, logvar, noise=noise, impl="eager")
    torch.testing.assert_close(z, z_eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kl, kl_eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(0, 3, 4), (3, 0), (2,)])
@pytest.mark.parametrize("impl", ["triton", "eager"])
def test_empty_and_one_dimensional_inputs(shape, impl, device):
    mu, logvar, noise = _inputs(shape, torch.float32, device)
    z, kl = reparameterize_kl(mu, logvar, noise=noise, impl=impl)
    assert z.shape == mu.shape and kl.shape == (shape[0],) and kl.dtype == torch.float32
    _, expected_kl = reparameterize_kl_reference(mu.double(), logvar.double(), noise.double())
    torch.testing.assert_close(kl.double(), expected_kl, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(0, 3, 4), (3, 0, 4), (3, 4, 0), (0,)])
@pytest.mark.parametrize("impl", ["triton", "eager"])
def test_zero_size_in_every_dim_gives_the_reference_shapes_and_a_zero_kl(shape, impl, device):
    mu, logvar, noise = (t.requires_grad_() for t in _inputs(shape, torch.float32, device))
    z, kl = reparameterize_kl(mu, logvar, noise=noise, impl=impl)
    assert z.shape == shape and kl.shape == (shape[0],) and (kl == 0).all()
    grads = torch.autograd.grad(z.sum() + kl.sum(), [mu, logvar], allow_unused=True)
    assert all(g is None or g.shape == shape for g in grads)


@pytest.mark.parametrize("impl", ["triton", "eager"])
def test_expanded_inputs_with_stride_zero(impl, device):
    """Broadcast views (stride 0 in the batch or the inner dims) read each element where it is."""
    mu = random_tensor((1, 7), torch.float32, 0, device).expand(3, 7)
    logvar = random_tensor((7,), torch.float32, 1, device).expand(3, 7)
    noise = random_tensor((3, 1), torch.float32, 2, device).expand(3, 7)
    mu_g, logvar_g = mu.detach().requires_grad_(), logvar.detach().requires_grad_()
    z, kl = reparameterize_kl(mu_g, logvar_g, noise=noise, impl=impl)
    grads = torch.autograd.grad((z * z).sum() + kl.sum(), [mu_g, logvar_g])
    dense = [t.contiguous().double().requires_grad_() for t in (mu, logvar)]
    z_ref, kl_ref = reparameterize_kl_reference(*dense, noise.contiguous().double())
    expected = torch.autograd.grad((z_ref * z_ref).sum() + kl_ref.sum(), dense)
    for got, want in zip((z, kl) + grads, (z_ref, kl_ref) + expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_float64_runs_the_reference_in_float64_and_triton_refuses_it(device):
    mu, logvar, noise = _inputs((3, 7), torch.float64, device)
    expected = reparameterize_kl_reference(mu, logvar, noise)
    for impl in ("auto", "eager"):
        z, kl = reparameterize_kl(mu, logvar, noise=noise, impl=impl)
        assert z.dtype == kl.dtype == torch.float64
        torch.testing.assert_close((z, kl), expected, rtol=0, atol=0)
    z, _ = reparameterize_kl(mu, logvar, generator=torch.Generator(device).manual_seed(0))
    assert z.dtype == torch.float64
    m, l = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: reparameterize_kl(a, b, noise=noise), (m, l))
    with pytest.raises(ValueError, match="impl='triton' cannot run these inputs.*mu is torch.float64"):
        reparameterize_kl(mu, logvar, noise=noise, impl="triton")
    with pytest.raises(ValueError, match="noise is torch.float64"):
        reparameterize_kl(mu.float(), logvar.float(), noise=noise, impl="triton")


@pytest.mark.parametrize("with_noise", [True, False])
def test_meta_tensors_give_the_output_shapes_through_the_fake(with_noise):
    mu = torch.empty(3, 4, 5, device="meta", requires_grad=True)
    logvar = torch.empty(3, 4, 5, device="meta", requires_grad=True)
    noise = torch.empty(3, 4, 5, device="meta") if with_noise else None
    z, kl = reparameterize_kl(mu, logvar, noise=noise)
    assert z.device.type == kl.device.type == "meta" and z.shape == (3, 4, 5) and kl.shape == (3,)
    grads = torch.autograd.grad(z.sum() + kl.sum(), [mu, logvar])
    assert all(g.shape == (3, 4, 5) and g.device.type == "meta" for g in grads)


def test_offsets_past_2_31_elements_are_computed_in_int64(device):
    # Views into one 8 GiB buffer (pages are only committed where written) whose last elements lie past 2**31.
    big = torch.empty(2**31 + 4096, dtype=torch.float32, device=device)
    batch_strided = [big.as_strided((3, 16), (2**30 + 8, 1), offset) for offset in (0, 32, 64)]
    inner_strided = [big.as_strided((2, 3), (1, 2**30 + 5), offset) for offset in (100, 200, 300)]
    for views in (batch_strided, inner_strided):
        for view, seed in zip(views, range(3)):
            view.copy_(random_tensor(view.shape, torch.float32, seed, device))
        values = [t.clone() for t in views]
        z, kl = reparameterize_kl(views[0], views[1], noise=views[2], impl="triton")
        z_eager, kl_eager = reparameterize_kl(values[0], values[1], noise=values[2], impl="eager")
        torch.testing.assert_close(z, z_eager, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kl, kl_eager, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# In-kernel Philox noise
# ---------------------------------------------------------------------------------------------------------------
def _drawn_noise(shape, seed, device):
    """The kernel's noise: with mu = 0 and logvar = 0, z is eps itself."""
    zeros = torch.zeros(shape, device=device)
    z, _ = reparameterize_kl(zeros, zeros, generator=torch.Generator(device).manual_seed(seed), impl="triton")
    return z


def test_in_kernel_noise_is_standard_normal(device):
    assert_standard_normal(_drawn_noise((4, 3, 64, 64), 1234, device))


def test_in_kernel_noise_is_reproducible_and_seeded(device):
    first = _drawn_noise((3, 1000), 7, device)
    again = _drawn_noise((3, 1000), 7, device)
    other = _drawn_noise((3, 1000), 8, device)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert (first - other).abs().mean() > 0.5
    assert (first[0] - first[1]).abs().mean() > 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_with_in_kernel_noise_match_eager_given_that_noise(dtype, device):
    shape = (3, 5, 13)
    mu, logvar, _ = _inputs(shape, dtype, device)
    eps = _drawn_noise(shape, 21, device)  # the same key draws the same noise at every position
    mu.requires_grad_()
    logvar.requires_grad_()
    weight_z = random_tensor(shape, dtype, 4, device)
    weight_kl = random_tensor((3,), torch.float32, 5, device)
    results = []
    for impl, noise, generator in (("triton", None, torch.Generator(device).manual_seed(21)),
                                   ("eager", eps, None)):
        z, kl = reparameterize_kl(mu, logvar, noise=noise, generator=generator, impl=impl)
        results.append((z, kl) + torch.autograd.grad((z * weight_z).sum() + (kl * weight_kl).sum(), [mu, logvar]))
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    for kernel, eager in zip(*results):
        torch.testing.assert_close(kernel, eager, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_in_kernel_noise_is_the_philox_normal_stream_in_forward_and_backward(memory_format, device):
    """Noise is keyed by each element's row-major index (block draws for NCHW, per-element draws for channels_last,
    in the forward and again in the backward): the eager op given philox_normal of the same seed agrees."""
    mu, logvar, _ = _inputs((2, 6, 5, 3), torch.float32, device)
    mu = mu.to(memory_format=memory_format).requires_grad_()
    logvar = logvar.to(memory_format=memory_format).requires_grad_()
    weight_z = random_tensor((2, 6, 5, 3), torch.float32, 4, device)
    seed = draw_philox_seed(torch.device(device), torch.Generator(device).manual_seed(13))
    results = []
    for impl, options in (("triton", dict(generator=torch.Generator(device).manual_seed(13))),
                          ("eager", dict(noise=philox_normal(seed, mu.shape)))):
        z, kl = reparameterize_kl(mu, logvar, impl=impl, **options)
        results.append((z, kl) + torch.autograd.grad((z * weight_z).sum() + kl.sum(), [mu, logvar]))
    for kernel, eager in zip(*results):
        torch.testing.assert_close(kernel, eager, rtol=1e-5, atol=1e-5)


def test_in_kernel_noise_is_regenerated_not_stored(device):
    mu, logvar, _ = _inputs((2, 300), torch.float32, device)
    mu.requires_grad_()
    logvar.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        reparameterize_kl(mu, logvar, generator=torch.Generator(device).manual_seed(0), impl="triton")
    full_size = [t for t in saved if t.numel() == mu.numel()]
    assert len(full_size) == 2  # mu and logvar; the noise is a one-element key
    assert all(t.numel() in (mu.numel(), 1) for t in saved)


# ---------------------------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_noise", [True, False])
def test_opcheck_forward(with_noise, device):
    mu, logvar, noise = _inputs((3, 4, 5), torch.float32, device)
    seed = None if with_noise else torch.tensor([11], device=device)
    torch.library.opcheck(torch.ops.genkernels.reparameterize_kl.default,
                          (mu.requires_grad_(), logvar.requires_grad_(), noise if with_noise else None, seed))


@pytest.mark.parametrize("with_noise, with_grad_z, with_grad_kl",
                         [(False, True, True), (True, True, False), (False, False, True)])
def test_opcheck_backward(with_noise, with_grad_z, with_grad_kl, device):
    mu, logvar, noise = _inputs((3, 4, 5), torch.float32, device)
    grad_z = torch.randn_like(mu) if with_grad_z else None
    grad_kl = torch.randn(3, device=device) if with_grad_kl else None
    seed = None if with_noise else torch.tensor([5], device=device)
    torch.library.opcheck(torch.ops.genkernels.reparameterize_kl_backward.default,
                          (mu, logvar, noise if with_noise else None, seed, grad_z, grad_kl))


def test_compiles_with_fullgraph(device):
    def elbo_terms(mu, logvar, noise):
        z, kl = reparameterize_kl(mu * 2, logvar, noise=noise, impl="triton")
        return (z * z).sum() + kl.mean()

    mu, logvar, noise = _inputs((2, 3, 8), torch.float32, device)
    compiled = torch.compile(elbo_terms, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, elbo_terms):
        m, l = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
        loss = fn(m, l, noise)
        results.append((loss,) + torch.autograd.grad(loss, [m, l]))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_compiles_with_dynamic_shapes(device):
    def step(mu, logvar, noise):
        z, kl = reparameterize_kl(mu, logvar, noise=noise, impl="triton")
        return z.square().sum() + kl.sum()

    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")
    for batch, width in ((2, 5), (3, 7)):
        mu, logvar, noise = _inputs((batch, width), torch.float32, device)
        results = []
        for fn in (compiled, step):
            m, l = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
            loss = fn(m, l, noise)
            results.append((loss,) + torch.autograd.grad(loss, [m, l]))
        for got, expected in zip(*results):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one test per rejection, each naming the argument
# ---------------------------------------------------------------------------------------------------------------
def test_rejects_shape_mismatch(device):
    mu, logvar, noise = _inputs((2, 3), torch.float32, device)
    with pytest.raises(ValueError, match=r"logvar must have the shape of mu \[2, 3\]"):
        reparameterize_kl(mu, logvar[:, :2])
    with pytest.raises(ValueError, match="noise must have the shape of mu"):
        reparameterize_kl(mu, logvar, noise=noise[:1])


def test_rejects_scalar_latents(device):
    with pytest.raises(ValueError, match=r"mu must have at least 1 dimension"):
        reparameterize_kl(torch.tensor(1.0, device=device), torch.tensor(0.0, device=device))


def test_rejects_bad_dtypes(device):
    mu, logvar, noise = _inputs((2, 3), torch.float32, device)
    with pytest.raises(TypeError, match="mu must have a floating-point dtype.*torch.int64"):
        reparameterize_kl(mu.long(), logvar)
    with pytest.raises(TypeError, match="logvar must have the dtype of mu"):
        reparameterize_kl(mu, logvar.half())
    with pytest.raises(TypeError, match="noise must have a floating-point dtype"):
        reparameterize_kl(mu, logvar, noise=noise.long())


def test_rejects_tensors_on_different_devices(device):
    mu, logvar, noise = _inputs((2, 3), torch.float32, device)
    with pytest.raises(ValueError, match="one device.*logvar on meta"):
        reparameterize_kl(mu, logvar.to("meta"))


def test_rejects_bad_generator(device):
    mu, logvar, _ = _inputs((2, 3), torch.float32, device)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        reparameterize_kl(mu, logvar, generator=3)
    if device == "cuda":
        with pytest.raises(ValueError, match="generator is on cpu"):
            reparameterize_kl(mu, logvar, generator=torch.Generator("cpu"))


def test_rejects_unknown_impl(device):
    mu, logvar, _ = _inputs((2, 3), torch.float32, device)
    with pytest.raises(ValueError, match="impl='cuda'"):
        reparameterize_kl(mu, logvar, impl="cuda")


# ---------------------------------------------------------------------------------------------------------------
# GPU sizes
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(256, 512), (64, 4, 64, 64)])
def test_large_shapes_on_gpu(dtype, shape):
    mu, logvar, noise = _inputs(shape, dtype, "cuda")
    _check(mu, logvar, noise)


@pytest.mark.parametrize("programs", [2, 3])
def test_split_over_programs_keeps_z_kl_and_gradients(programs, device):
    """Several programs per sample, each walking a span of several tiles and writing one KL partial (forced: in
    the interpreter one program walks each sample): ``z`` and the gradients are bitwise those of one program per
    sample, the KL the same sum, for contiguous and channels_last inputs with in-kernel noise."""
    from genkernels.kernels.launch import force_launch_settings

    mu = random_tensor((2, 3, 13, 11), torch.float32, 0, device)
    logvar = random_tensor((2, 3, 13, 11), torch.float32, 1, device) * 0.5
    for layout in (torch.contiguous_format, torch.channels_last):
        results = []
        for forced in (None, programs):
            settings = {} if forced is None else {"programs_per_sample": forced}
            m = mu.contiguous(memory_format=layout).requires_grad_(True)
            l = logvar.contiguous(memory_format=layout).requires_grad_(True)
            with force_launch_settings("reparameterize_kl", **settings):
                z, kl = reparameterize_kl(m, l, generator=torch.Generator(device).manual_seed(11), impl="triton")
                grads = torch.autograd.grad((z * z).sum() + kl.sum(), (m, l))
            results.append((z, kl, grads))
        (z1, kl1, g1), (z2, kl2, g2) = results
        assert torch.equal(z2, z1)
        torch.testing.assert_close(kl2, kl1, rtol=1e-6, atol=1e-6)
        assert all(torch.equal(a, b) for a, b in zip(g2, g1))
