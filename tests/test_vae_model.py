"""VAE (models/vae.py): the ELBO and its gradients against a hand-written fp64 reference, triton vs eager,
likelihoods, sampling, reconstruction, interpolation, bad input, and a short convergence run under both impls."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from genkernels.kernels import use_impl
from genkernels.models.vae import VAE, default_hidden_channels, discretized_logistic_nll
from reference_checks import assert_close_to_reference

IMPLS = ("triton", "eager")
LATENT = 4


def _tiny_vae(**kwargs) -> VAE:
    torch.manual_seed(0)
    options = dict(channels=1, image_size=16, latent_dim=LATENT, hidden_channels=(4, 8))
    options.update(kwargs)
    return VAE(**options)


def _images(batch=4, channels=1, size=16, seed=1) -> torch.Tensor:
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _noise(batch=4, seed=2) -> torch.Tensor:
    return torch.randn(batch, LATENT, generator=torch.Generator().manual_seed(seed))


def _hand_written_elbo(model: VAE, x: torch.Tensor, noise: torch.Tensor):
    """fp64, plain torch functions: (logits, mu, logvar, reconstruction, kl) with BCE and the closed-form KL."""
    model = copy.deepcopy(model).double()
    x, noise = x.double(), noise.double()
    h = x
    for conv in model.encoder[:-1]:
        h = F.leaky_relu(F.conv2d(h, conv.weight, conv.bias, stride=2, padding=1), 0.2)
    mu, logvar = F.linear(h.flatten(1), model.to_posterior.weight, model.to_posterior.bias).chunk(2, dim=1)
    z = mu + torch.exp(0.5 * logvar) * noise
    h = F.relu(F.linear(z, model.from_latent.weight, model.from_latent.bias))
    h = h.reshape((x.shape[0],) + model.map_shape)
    for i, deconv in enumerate(model.decoder):
        h = F.conv_transpose2d(h, deconv.weight, deconv.bias, stride=2, padding=1)
        h = h if i == len(model.decoder) - 1 else F.relu(h)
    logits = h
    # -log Bernoulli(x | sigmoid(l)) = x * softplus(-l) + (1 - x) * softplus(l)
    bce = x * F.softplus(-logits) + (1 - x) * F.softplus(logits)
    kl = -0.5 * (1 + logvar - mu.square() - logvar.exp()).sum(dim=1)
    return logits, mu, logvar, bce.sum(dim=(1, 2, 3)).mean(), kl.mean(), model


def _run(model, x, noise):
    recon, mu, logvar = model(x, noise=noise)
    terms = model.loss(x, noise=noise)
    return (recon, mu, logvar, terms.reconstruction, terms.kl), terms.loss


def _fused_ops_run(fn) -> set:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fn()
    return {event.name for event in profile.events() if event.name.startswith("genkernels::")}


def test_the_fused_ops_run_under_triton_and_not_under_eager():
    model, x, noise = _tiny_vae(), _images(), _noise()
    ran = {}
    for impl in IMPLS:
        with use_impl(impl):
            ran[impl] = _fused_ops_run(lambda: model.loss(x, noise=noise).loss.backward())
    assert {"genkernels::bias_act", "genkernels::bias_act_grad", "genkernels::reparameterize_kl",
            "genkernels::reparameterize_kl_backward"} <= ran["triton"]
    assert ran["eager"] == set()


def _parameter_grads(model, loss):
    return torch.autograd.grad(loss, list(model.parameters()))


@pytest.mark.parametrize("impl", IMPLS)
def test_elbo_terms_and_parameter_gradients_match_a_hand_written_fp64_reference(impl):
    model, x, noise = _tiny_vae(beta=0.5), _images(), _noise()
    *ref_outputs, ref_model = _hand_written_elbo(model, x, noise)
    ref_loss = ref_outputs[3] + 0.5 * ref_outputs[4]
    ref_grads = _parameter_grads(ref_model, ref_loss)
    eager_model = copy.deepcopy(model)
    with use_impl("eager"):
        eager_outputs, eager_loss = _run(eager_model, x, noise)
        eager_grads = _parameter_grads(eager_model, eager_loss)
    with use_impl(impl):
        outputs, loss = _run(model, x, noise)
        grads = _parameter_grads(model, loss)
    names = ("recon", "mu", "logvar", "reconstruction", "kl")
    for name, out, ref, eager in zip(names, outputs, ref_outputs, eager_outputs):
        assert_close_to_reference(out, ref, eager, name)
    assert_close_to_reference(loss, ref_loss, eager_loss, "loss")
    for (name, _), grad, ref, eager in zip(model.named_parameters(), grads, ref_grads, eager_grads):
        assert ref.abs().max() > 0, name
        assert_close_to_reference(grad, ref, eager, f"grad {name}")
    # Same weights, same noise: the two impls agree directly too.
    for out, eager in zip(outputs + grads, eager_outputs + eager_grads):
        torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)


def test_loss_compiles_as_one_graph_with_the_fused_ops():
    model, x, noise = _tiny_vae(), _images(), _noise()
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(lambda x, noise: compiled_model.loss(x, noise=noise).loss, backend="aot_eager",
                             fullgraph=True)
    with use_impl("triton"):
        loss = compiled(x, noise)
        expected = model.loss(x, noise=noise).loss
    torch.testing.assert_close(loss, expected)
    grads = _parameter_grads(compiled_model, loss)
    for grad, expected_grad in zip(grads, _parameter_grads(model, expected)):
        torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("channels, size, widths, side", [(1, 28, (32, 64), 7), (1, 32, (32, 64, 128), 4),
                                                          (3, 64, (32, 64, 128, 256), 4)])
def test_default_architecture_handles_28_to_64_pixel_images(channels, size, widths, side):
    assert default_hidden_channels(size) == widths
    model = VAE(channels=channels, image_size=size, latent_dim=8)
    assert model.map_shape == (widths[-1], side, side)
    x = _images(2, channels, size)
    with use_impl("eager"):
        recon, mu, logvar = model(x)
        assert recon.shape == x.shape and mu.shape == logvar.shape == (2, 8)
        assert model.reconstruct(x).shape == x.shape


@pytest.mark.parametrize("variance", ["fixed", "learned"])
def test_gaussian_likelihood_is_the_normal_log_density(variance):
    model = _tiny_vae(channels=3, likelihood="gaussian", variance=variance, sigma=0.3)
    if variance == "learned":
        with torch.no_grad():
            model.log_sigma.copy_(torch.tensor([-1.0, 0.0, 0.5]))
    x, mean = _images(2, 3), _images(2, 3, seed=5)
    sigma = model.log_sigma.detach().exp().reshape(1, 3, 1, 1)
    expected = -torch.distributions.Normal(mean, sigma.expand_as(mean)).log_prob(x).sum(dim=(1, 2, 3))
    torch.testing.assert_close(model.reconstruction_nll(mean, x), expected)
    is_parameter = any(param is model.log_sigma for param in model.parameters())
    assert is_parameter == (variance == "learned")
    with use_impl("eager"):
        model.loss(x, noise=_noise(2)).loss.backward()
    assert (model.log_sigma.grad is not None) == (variance == "learned")


def _logistic_bin_masses_fp64(mean, log_scale, levels):
    """Reference: P(k) for k = 0 .. L-1 [..., L] in fp64 as differences of the logistic CDF at the bin edges
    (k +- 1/2) / (L - 1), the outer edges at -inf and +inf."""
    mean, scale = mean.double()[..., None], log_scale.double().clamp(min=-7.0).exp()[..., None]
    edges = (torch.arange(levels - 1, dtype=torch.float64) + 0.5) / (levels - 1)
    cdf = torch.sigmoid((edges - mean) / scale)
    zeros, ones = torch.zeros_like(cdf[..., :1]), torch.ones_like(cdf[..., :1])
    return torch.cat([cdf, ones], dim=-1) - torch.cat([zeros, cdf], dim=-1)


def test_discretized_logistic_nll_is_minus_the_log_of_the_bin_mass():
    generator = torch.Generator().manual_seed(7)
    levels = 17
    k = torch.randint(0, levels, (4000,), generator=generator)
    mean = torch.randn(4000, generator=generator) * 0.7 + 0.5
    log_scale = torch.randn(4000, generator=generator) * 2 - 2
    masses = _logistic_bin_masses_fp64(mean, log_scale, levels)
    expected = -masses.gather(-1, k[:, None])[:, 0].log()
    got = discretized_logistic_nll(k.float() / (levels - 1), mean, log_scale, levels)
    assert got.dtype == torch.float32
    conditioned = expected < 20  # the fp64 differences of CDFs near 1 lose all digits beyond that
    assert conditioned.float().mean() > 0.8
    torch.testing.assert_close(got[conditioned].double(), expected[conditioned], rtol=1e-5, atol=1e-5)
    # Far tails: the reflection x -> 1 - x, m -> 1 - m maps the distribution onto itself, so upper-tail bins
    # (computed after the reflection) must equal their mirrored lower-tail bins (computed without it).
    mirrored = discretized_logistic_nll(1 - k.float() / (levels - 1), 1 - mean, log_scale, levels)
    torch.testing.assert_close(got, mirrored, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(got).all() and (got >= 0).all()


def test_discretized_logistic_masses_sum_to_one_and_gradients_stay_finite_at_extremes():
    levels = 5
    grid = torch.arange(levels).float() / (levels - 1)
    for mean, log_scale in ((0.3, -1.5), (-4.0, -7.0), (5.0, 3.0), (0.5, 12.0), (0.51, -9.0)):
        nll = discretized_logistic_nll(grid, torch.full((levels,), mean), torch.full((levels,), log_scale), levels)
        torch.testing.assert_close(torch.exp(-nll.double()).sum(), torch.tensor(1.0, dtype=torch.float64),
                                   rtol=1e-5, atol=1e-6)
    mean = torch.tensor([-30.0, 0.5, 30.0, 0.25]).requires_grad_()
    log_scale = torch.tensor([-7.0, 15.0, -7.0, 0.0]).requires_grad_()
    discretized_logistic_nll(grid[1:], mean, log_scale, levels).sum().backward()
    assert torch.isfinite(mean.grad).all() and torch.isfinite(log_scale.grad).all()
    with pytest.raises(ValueError, match=r"mean must have the shape of x \[5\]"):
        discretized_logistic_nll(grid, torch.zeros(4), torch.zeros(5), levels)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        discretized_logistic_nll(torch.arange(5), torch.zeros(5), torch.zeros(5), levels)
    with pytest.raises(ValueError, match="levels"):
        discretized_logistic_nll(grid, torch.zeros(5), torch.zeros(5), 1)


def test_discretized_logistic_vae_reads_the_grid_and_its_mean_is_the_expectation():
    levels = 17
    model = _tiny_vae(likelihood="discretized_logistic", levels=levels)
    x = torch.randint(0, levels, (2, 1, 16, 16), generator=torch.Generator().manual_seed(8)).float() / (levels - 1)
    with use_impl("eager"):
        params = model(x, noise=_noise(2))[0]
        terms = model.loss(x, noise=_noise(2))
    assert params.shape == (2, 2, 16, 16)
    mean, log_scale = params.detach().chunk(2, dim=1)
    masses = _logistic_bin_masses_fp64(mean, log_scale, levels)
    k = torch.round(x * (levels - 1)).long()
    expected = -masses.gather(-1, k[..., None])[..., 0].log().sum(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(terms.reconstruction.double(), expected, rtol=1e-5, atol=1e-4)
    values = torch.arange(levels, dtype=torch.float64) / (levels - 1)
    torch.testing.assert_close(model.mean_image(params.detach()).double(), (masses * values).sum(-1),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"x must lie on the grid k / 16 for k = 0 \.\. 16"):
        model.loss(x + 0.01, noise=_noise(2))
    with pytest.raises(ValueError, match=r"params must have shape \[2, 2, 16, 16\]"):
        model.reconstruction_nll(mean, x)


def test_bf16_autocast_runs_under_both_impls():
    x, noise = _images(), _noise().bfloat16()
    losses = {}
    for impl in IMPLS:
        model = _tiny_vae()
        with use_impl(impl), torch.autocast("cpu", dtype=torch.bfloat16):
            losses[impl] = model.loss(x, noise=noise)
        assert losses[impl].loss.dtype == losses[impl].kl.dtype == torch.float32
        losses[impl].loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    with use_impl("eager"):
        fp32 = _tiny_vae().loss(x, noise=noise.float())
    for impl in IMPLS:
        torch.testing.assert_close(losses[impl].loss, fp32.loss, rtol=2e-2, atol=0)
    torch.testing.assert_close(losses["triton"].loss, losses["eager"].loss, rtol=1e-2, atol=0)


def test_beta_weights_the_kl_term_only():
    x, noise = _images(), _noise()
    with use_impl("eager"):
        plain, weighted = _tiny_vae().loss(x, noise=noise), _tiny_vae(beta=4.0).loss(x, noise=noise)
    torch.testing.assert_close(weighted.reconstruction, plain.reconstruction)
    torch.testing.assert_close(weighted.kl, plain.kl)
    torch.testing.assert_close(weighted.loss, plain.reconstruction + 4.0 * plain.kl)
    torch.testing.assert_close(plain.elbo, -plain.loss)


@pytest.mark.parametrize("impl", IMPLS)
def test_interpolate_starts_and_ends_at_the_endpoints_reconstructions(impl):
    model = _tiny_vae()
    x_a, x_b = _images(2, seed=3), _images(2, seed=4)
    with use_impl(impl):
        path = model.interpolate(x_a, x_b, steps=5)
        single = model.interpolate(x_a[1], x_b[1], steps=3)
        ends = model.reconstruct(x_a), model.reconstruct(x_b)
        (mu_a, _), (mu_b, _) = model.encode(x_a), model.encode(x_b)
        middle = torch.sigmoid(model.decode((mu_a + mu_b) / 2))
    assert path.shape == (5, 2, 1, 16, 16) and single.shape == (3, 1, 16, 16)
    torch.testing.assert_close(path[0], ends[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(path[-1], ends[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(path[2], middle.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(single, path[::2, 1], rtol=1e-5, atol=1e-6)


def test_sample_decodes_standard_normal_latents_reproducibly():
    model = _tiny_vae()
    with use_impl("eager"):
        images = model.sample(3, generator=torch.Generator().manual_seed(6))
        z = torch.randn(3, LATENT, generator=torch.Generator().manual_seed(6))
        expected = torch.sigmoid(model.decode(z)).detach()
    assert images.shape == (3, 1, 16, 16) and images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(images, expected)
    assert model.sample(0).shape == (0, 1, 16, 16)


@pytest.mark.parametrize("impl", IMPLS)
def test_drawn_noise_is_reproducible_with_a_generator_and_varies_without(impl):
    model, x = _tiny_vae(), _images()
    with use_impl(impl):
        first = model.loss(x, generator=torch.Generator().manual_seed(9)).loss
        again = model.loss(x, generator=torch.Generator().manual_seed(9)).loss
        other = model.loss(x, generator=torch.Generator().manual_seed(10)).loss
    torch.testing.assert_close(first, again)
    assert first.item() != other.item()


BAD_INPUT = [
    (lambda model: VAE(image_size=28, hidden_channels=(8, 8, 8)), ValueError, "image_size=28 must be divisible"),
    (lambda model: VAE(image_size=27), ValueError, "image_size=27 cannot be halved"),
    (lambda model: VAE(hidden_channels=(8, 0)), ValueError, r"hidden_channels\[1\]=0"),
    (lambda model: VAE(hidden_channels=(8, -4)), ValueError, r"hidden_channels\[1\]=-4"),
    (lambda model: VAE(hidden_channels=(8, 16.0)), TypeError, r"hidden_channels\[1\] must be an int"),
    (lambda model: VAE(hidden_channels=()), ValueError, r"hidden_channels=\(\) must be a non-empty"),
    (lambda model: VAE(hidden_channels=32), TypeError, "hidden_channels must be a sequence of ints"),
    (lambda model: VAE(channels=0), ValueError, "channels=0"),
    (lambda model: VAE(channels=-1), ValueError, "channels=-1"),
    (lambda model: VAE(channels=1.0), TypeError, "channels must be an int"),
    (lambda model: VAE(image_size=28.0), TypeError, "image_size must be an int"),
    (lambda model: VAE(latent_dim=16.0), TypeError, "latent_dim must be an int"),
    (lambda model: VAE(beta=float("nan")), ValueError, "beta=nan"),
    (lambda model: model.loss(_images() * 2), ValueError, r"x must lie in \[0.0, 1.0\]; got a value 1\.\d+"),
    (lambda model: model.loss(_images() - 0.5), ValueError, r"x must lie in \[0.0, 1.0\]; got a value -0\.\d+"),
    (lambda model: model.loss(torch.full((2, 1, 16, 16), float("nan"))), ValueError, r"x must lie in \[0.0, 1.0\]"),
    (lambda model: model.reconstruction_nll(torch.zeros(2, 1, 16, 16), torch.full((2, 1, 16, 16), 1.5)), ValueError,
     r"x must lie in \[0.0, 1.0\]"),
    (lambda model: model.reconstruction_nll(torch.zeros(2, 1, 16, 8), _images(2)), ValueError,
     r"params must have shape \[2, 1, 16, 16\] \(the decoder's output for x \[2, 1, 16, 16\]\)"),
    (lambda model: model.sample(2.0), TypeError, "n must be an int"),
    (lambda model: VAE(likelihood="poisson"), ValueError, "likelihood='poisson'"),
    (lambda model: VAE(variance="diagonal"), ValueError, "variance='diagonal'"),
    (lambda model: VAE(beta=-1.0), ValueError, "beta=-1.0"),
    (lambda model: VAE(sigma=0.0), ValueError, "sigma=0.0"),
    (lambda model: VAE(latent_dim=0), ValueError, "latent_dim=0"),
    (lambda model: model(torch.zeros(2, 3, 16, 16)), ValueError, r"x must have shape \[batch, 1, 16, 16\]"),
    (lambda model: model(torch.zeros(2, 1, 16, 16, dtype=torch.int64)), TypeError, "x must be a floating-point"),
    (lambda model: model.loss(torch.zeros(0, 1, 16, 16)), ValueError, "x must hold at least one image"),
    (lambda model: model.decode(torch.zeros(2, LATENT + 1)), ValueError, r"z must have shape \[batch, latent_dim"),
    (lambda model: model.interpolate(_images(1)[0], _images(2)), ValueError, "x_b must have the shape of x_a"),
    (lambda model: model.interpolate(_images(1), _images(1), steps=1), ValueError, "steps=1"),
    (lambda model: model.interpolate(torch.zeros(2, 16, 16), torch.zeros(2, 16, 16)), ValueError,
     r"x_a must have shape \[batch, 1, 16, 16\]"),
    (lambda model: model.sample(-2), ValueError, "n=-2"),
]


@pytest.mark.parametrize("call, error, message", BAD_INPUT, ids=[str(i) for i in range(len(BAD_INPUT))])
def test_bad_input_is_rejected(call, error, message):
    with pytest.raises(error, match=message):
        call(_tiny_vae())


def test_bernoulli_targets_on_the_edges_of_0_1_are_accepted_and_gaussian_targets_are_not_range_checked():
    model, noise = _tiny_vae(), _noise(2)
    edges = (_images(2) > 0.5).float()  # binary images: 0 and 1 exactly
    assert torch.isfinite(model.loss(edges, noise=noise).loss)
    gaussian = _tiny_vae(likelihood="gaussian")
    assert torch.isfinite(gaussian.loss(_images(2) * 4 - 2, noise=noise).loss)


def _dataset() -> torch.Tensor:
    """8 binary 16x16 images: a bright square at one of two places, a horizontal or a vertical bar, each twice."""
    images = torch.zeros(8, 1, 16, 16)
    for i in range(8):
        kind, offset = i % 4, 6 * (i // 4)
        if kind == 0:
            images[i, 0, 2 + offset:7 + offset, 3:8] = 1
        elif kind == 1:
            images[i, 0, 3:8, 8 - offset:13 - offset] = 1
        elif kind == 2:
            images[i, 0, 4 + offset, :] = 1
        else:
            images[i, 0, :, 4 + offset] = 1
    return images


def _train(impl, steps=16):
    model = _tiny_vae()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = _dataset()
    noise = torch.randn(steps, data.shape[0], LATENT, generator=torch.Generator().manual_seed(3))
    losses = []
    with use_impl(impl):
        for step in range(steps):
            loss = model.loss(data, noise=noise[step]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return torch.tensor(losses)


def test_training_lowers_the_loss_with_the_same_curve_under_both_impls():
    curves = {impl: _train(impl) for impl in IMPLS}
    for curve in curves.values():
        assert curve[-5:].mean() < 0.7 * curve[:3].mean(), curve
    torch.testing.assert_close(curves["triton"], curves["eager"], rtol=2e-3, atol=1e-3)
    assert math.isfinite(curves["triton"].sum().item())
