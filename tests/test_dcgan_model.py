"""DCGAN (models/dcgan.py): layers against plain torch layers, triton vs eager outputs and gradients (R1 included),
losses against their formulas, the truncation trick, the training step, and bad input."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genkernels.kernels import use_impl
from genkernels.models.dcgan import (
    DCGAN,
    DCGANDiscriminator,
    DCGANGenerator,
    discriminator_loss,
    generator_loss,
    r1_penalty,
    truncated_normal,
)
from genkernels.models.layers import BatchNormAct2d, Conv2dBiasAct, ConvTranspose2dBiasAct
from reference_checks import assert_close_to_reference

IMPLS = ("triton", "eager")


TORCH_ACTIVATIONS = {
    "linear": lambda x, alpha: x,
    "relu": lambda x, alpha: F.relu(x),
    "lrelu": lambda x, alpha: F.leaky_relu(x, alpha),
    "tanh": lambda x, alpha: torch.tanh(x),
}


def _tiny_gan(**kwargs) -> DCGAN:
    torch.manual_seed(0)
    options = dict(latent_dim=8, channels=3, image_size=16, base_channels=4)
    options.update(kwargs)
    return DCGAN(**options)


def _torch_forward(net: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The same network run by the torch layers our layers subclass, with torch's own activations."""
    for layer in net:
        torch_layer = next(base for base in type(layer).__mro__ if base.__module__.startswith("torch.nn"))
        x = torch_layer.forward(layer, x)
        if hasattr(layer, "act"):
            x = TORCH_ACTIVATIONS[layer.act](x, layer.alpha) * (1.0 if layer.gain is None else layer.gain)
    return x


def _images(batch=4, seed=1, size=16) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _latents(batch=4, seed=2) -> torch.Tensor:
    return torch.randn(batch, 8, generator=torch.Generator().manual_seed(seed))


def _torch_gan_pass(model, z, real):
    """fp64 reference with torch layers: (fake, fake logits, real logits)."""
    model = copy.deepcopy(model).double()
    fake = _torch_forward(model.generator.net, z.double()[:, :, None, None])
    return (fake, _torch_forward(model.discriminator.net, fake).flatten(),
            _torch_forward(model.discriminator.net, real.double()).flatten(), model)


def _gan_pass(model, z, real):
    fake = model.generator(z)
    return fake, model.discriminator(fake), model.discriminator(real)


def _parameter_grads(model, outputs):
    loss = sum((out.double() * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)).sum()
               for out in outputs)
    params = [p for p in model.parameters()]
    return torch.autograd.grad(loss, params), [name for name, _ in model.named_parameters()]


def test_layers_run_like_the_torch_layers_they_subclass():
    conv = Conv2dBiasAct(3, 5, 3, padding=1, act="lrelu", alpha=0.1, gain=2.0)
    convt = ConvTranspose2dBiasAct(3, 2, 4, 2, 1, act="tanh")
    norm = BatchNormAct2d(3, act="relu", gain=1.0)
    nn.init.normal_(norm.bias)
    x = torch.randn(2, 3, 7, 6)
    torch.testing.assert_close(conv(x), F.leaky_relu(nn.Conv2d.forward(conv, x), 0.1) * 2.0)
    torch.testing.assert_close(convt(x), torch.tanh(nn.ConvTranspose2d.forward(convt, x)))
    plain = nn.BatchNorm2d(3)
    plain.load_state_dict(norm.state_dict())
    torch.testing.assert_close(norm(x), F.relu(plain(x)))
    torch.testing.assert_close(norm.state_dict(), plain.state_dict())  # running stats updated alike
    norm.eval(), plain.eval()
    torch.testing.assert_close(norm(x), F.relu(plain(x)))


@pytest.mark.parametrize("image_size, widths", [(32, [32, 16, 8]), (64, [64, 32, 16, 8])])
def test_paper_image_sizes_build_the_paper_architecture(image_size, widths):
    model = _tiny_gan(image_size=image_size, channels=1, base_channels=8)
    deconvs = [m for m in model.generator.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [m.out_channels for m in deconvs] == widths + [1]
    assert [m.stride for m in deconvs] == [(1, 1)] + [(2, 2)] * len(widths)
    convs = [m for m in model.discriminator.modules() if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in convs] == widths[::-1] + [1]
    with use_impl("eager"):
        images = model.generator(_latents(2))
        assert images.shape == (2, 1, image_size, image_size)
        assert model.discriminator(images).shape == (2,)


def test_extra_layers_add_3x3_layers_at_the_first_and_last_hidden_resolutions():
    model = _tiny_gan(image_size=16, channels=1, base_channels=4, extra_layers=2)
    generator_convs = [m for m in model.generator.net if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert [(type(m), m.out_channels, m.kernel_size, m.stride) for m in generator_convs] == [
        (nn.ConvTranspose2d, 8, (4, 4), (1, 1)), (nn.ConvTranspose2d, 4, (4, 4), (2, 2)),
        (nn.Conv2d, 4, (3, 3), (1, 1)), (nn.Conv2d, 4, (3, 3), (1, 1)), (ConvTranspose2dBiasAct, 1, (4, 4), (2, 2))]
    assert sum(isinstance(m, BatchNormAct2d) for m in model.generator.net) == 4
    assert [(m.out_channels, m.kernel_size, m.stride, m.act) for m in model.discriminator.net] == [
        (4, (4, 4), (2, 2), "lrelu"), (4, (3, 3), (1, 1), "lrelu"), (4, (3, 3), (1, 1), "lrelu"),
        (8, (4, 4), (2, 2), "lrelu"), (1, (4, 4), (1, 1), "linear")]
    with use_impl("eager"):
        assert model.discriminator(model.generator(_latents(2))).shape == (2,)


@pytest.mark.parametrize("extra_layers", [0, 1])
@pytest.mark.parametrize("impl", IMPLS)
def test_outputs_and_parameter_gradients_match_torch_layers_in_fp64(impl, extra_layers):
    model = _tiny_gan(extra_layers=extra_layers)
    z, real = _latents(), _images()
    ref_outputs = _torch_gan_pass(model, z, real)
    ref_grads, names = _parameter_grads(ref_outputs[3], ref_outputs[:3])
    with use_impl("eager"):
        eager_outputs = _gan_pass(copy.deepcopy(model), z, real)
    with use_impl(impl):
        outputs = _gan_pass(model, z, real)
        grads, _ = _parameter_grads(model, outputs)
    for name, out, ref, eager in zip(("fake", "fake_logits", "real_logits"), outputs, ref_outputs, eager_outputs):
        assert_close_to_reference(out, ref, eager, name)
    eager_model = copy.deepcopy(model)
    with use_impl("eager"):
        eager_grads, _ = _parameter_grads(eager_model, _gan_pass(eager_model, z, real))
    for name, grad, ref, eager in zip(names, grads, ref_grads, eager_grads):
        assert_close_to_reference(grad, ref, eager, f"grad {name}")


def test_triton_and_eager_agree_on_outputs_and_parameter_gradients():
    model = _tiny_gan()
    z, real = _latents(), _images()
    results = {}
    for impl in IMPLS:
        replica = copy.deepcopy(model)
        with use_impl(impl):
            outputs = _gan_pass(replica, z, real)
            results[impl] = (outputs, _parameter_grads(replica, outputs)[0])
    for triton_out, eager_out in zip(results["triton"][0], results["eager"][0]):
        torch.testing.assert_close(triton_out, eager_out, rtol=1e-5, atol=1e-6)
    for triton_grad, eager_grad in zip(results["triton"][1], results["eager"][1]):
        torch.testing.assert_close(triton_grad, eager_grad, rtol=1e-4, atol=1e-6)


def test_generator_and_discriminator_compile_as_one_graph_with_the_fused_op():
    model, z = _tiny_gan(), _latents()
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(lambda z: compiled_model.discriminator(compiled_model.generator(z)),
                             backend="aot_eager", fullgraph=True)
    with use_impl("triton"):
        logits = compiled(z)
        expected = model.discriminator(model.generator(z))
        grads, _ = _parameter_grads(compiled_model, [logits])
        expected_grads, _ = _parameter_grads(model, [expected])
    torch.testing.assert_close(logits, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)


def _r1_and_gradients(model, real):
    penalty, _ = model.r1_penalty(real)
    params = list(model.discriminator.parameters())
    return penalty, torch.autograd.grad(penalty, params, materialize_grads=True)


def _torch_r1_and_gradients(model, real):
    model = copy.deepcopy(model).double()
    real = real.double().requires_grad_(True)
    (grad,) = torch.autograd.grad(_torch_forward(model.discriminator.net, real).sum(), real, create_graph=True)
    penalty = 0.5 * model.r1_gamma * grad.square().sum(dim=(1, 2, 3)).mean()
    return penalty, torch.autograd.grad(penalty, list(model.discriminator.parameters()), materialize_grads=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_r1_penalty_and_its_gradients_match_torch_layers_in_fp64(impl):
    model = _tiny_gan(r1_gamma=10.0)
    # Larger weights than the paper's init so the penalty and its second-order gradients are far from zero.
    for param in model.discriminator.parameters():
        nn.init.normal_(param, 0.0, 0.3)
    real = _images()
    ref_penalty, ref_grads = _torch_r1_and_gradients(model, real)
    with use_impl("eager"):
        eager_penalty, eager_grads = _r1_and_gradients(copy.deepcopy(model), real)
    with use_impl(impl):
        penalty, grads = _r1_and_gradients(model, real)
    assert ref_penalty.item() > 1e-3
    assert_close_to_reference(penalty, ref_penalty, eager_penalty, "r1")
    names = [name for name, _ in model.discriminator.named_parameters()]
    for name, grad, ref, eager in zip(names, grads, ref_grads, eager_grads):
        # D is piecewise linear in x, so grad_x D does not change with the biases (a.e.): only weights get R1
        # gradients, which flow through the double backward of every bias_act.
        assert (ref.abs().max() > 0) == name.endswith("weight"), name
        assert_close_to_reference(grad, ref, eager, f"r1 grad {name}")


def test_the_fused_op_runs_under_triton_and_not_under_eager():
    model, ran = _tiny_gan(r1_gamma=1.0), {}
    for impl in IMPLS:
        with use_impl(impl), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            model.r1_penalty(_images())[0].backward()
        ran[impl] = {event.name for event in profile.events() if event.name.startswith("genkernels::")}
    assert {"genkernels::bias_act", "genkernels::bias_act_grad"} <= ran["triton"]
    assert ran["eager"] == set()


def test_r1_penalty_of_a_linear_discriminator_is_gamma_half_weight_norm():
    # D(x) = <w, x> + b has input gradient w for every image: R1 = gamma / 2 * ||w||^2 exactly.
    model = _tiny_gan(image_size=8, r1_gamma=3.0, base_channels=2)
    model.discriminator.net = nn.Sequential(Conv2dBiasAct(3, 1, 8, 1, 0))
    nn.init.normal_(model.discriminator.net[0].weight)
    for impl in IMPLS:
        with use_impl(impl):
            penalty, _ = model.r1_penalty(_images(3, size=8))
        expected = 1.5 * model.discriminator.net[0].weight.detach().double().square().sum()
        torch.testing.assert_close(penalty.double(), expected, rtol=1e-5, atol=0)


def test_losses_match_their_formulas():
    real, fake = torch.randn(6), torch.randn(6)
    ones, zeros = torch.ones(6), torch.zeros(6)
    bce = F.binary_cross_entropy_with_logits
    torch.testing.assert_close(discriminator_loss(real, fake, "non_saturating"),
                               bce(real, ones) + bce(fake, zeros))
    torch.testing.assert_close(generator_loss(fake, "non_saturating"), bce(fake, ones))
    hinge_d = torch.clamp(1 - real, min=0).mean() + torch.clamp(1 + fake, min=0).mean()
    torch.testing.assert_close(discriminator_loss(real, fake, "hinge"), hinge_d)
    torch.testing.assert_close(generator_loss(fake, "hinge"), -fake.mean())


def test_truncated_normal_has_the_truncated_distribution():
    threshold = 0.7
    z = truncated_normal((200_000,), threshold, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert z.abs().max() <= threshold
    # Variance of N(0, 1) truncated to [-t, t]: 1 - 2 t phi(t) / (2 Phi(t) - 1).
    phi = math.exp(-threshold**2 / 2) / math.sqrt(2 * math.pi)
    variance = 1 - 2 * threshold * phi / math.erf(threshold / math.sqrt(2))
    assert abs(z.mean().item()) < 4 * math.sqrt(variance / z.numel())
    assert abs(z.var().item() / variance - 1) < 0.02
    # Shape of the density: the fraction inside [-t/2, t/2] is (2 Phi(t/2) - 1) / (2 Phi(t) - 1).
    inner = math.erf(threshold / 2 / math.sqrt(2)) / math.erf(threshold / math.sqrt(2))
    assert abs((z.abs() <= threshold / 2).double().mean().item() - inner) < 0.01


def test_sample_truncation_bounds_latents_and_generator_makes_it_reproducible():
    model = _tiny_gan()
    for mode in ("resample", "clamp"):
        z = model.latents(500, torch.Generator().manual_seed(0), truncation=0.5, truncation_mode=mode)
        assert z.shape == (500, 8) and z.abs().max() <= 0.5
        if mode == "clamp":
            assert (z.abs() == 0.5).float().mean() > 0.5  # most of N(0, 1) lies beyond 0.5
    assert model.latents(500, truncation=None).abs().max() > 2.0
    model.eval()
    for impl in IMPLS:
        with use_impl(impl):
            first = model.sample(3, truncation=0.5, generator=torch.Generator().manual_seed(4))
            again = model.sample(3, truncation=0.5, generator=torch.Generator().manual_seed(4))
        assert first.shape == (3, 3, 16, 16) and first.abs().max() <= 1
        torch.testing.assert_close(first, again)
        z = truncated_normal((3, 8), 0.5, torch.Generator().manual_seed(4))
        with use_impl(impl):
            torch.testing.assert_close(first, model.generator(z))


def _train(impl, steps, **kwargs):
    model = _tiny_gan(**kwargs)
    opt_g = torch.optim.Adam(model.generator.parameters(), lr=2e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(model.discriminator.parameters(), lr=2e-3, betas=(0.5, 0.999))
    latents = torch.Generator().manual_seed(7)
    history = []
    with use_impl(impl):
        for step in range(steps):
            history.append(model.train_step(_images(seed=step), opt_g, opt_d, generator=latents))
    return model, history


@pytest.mark.parametrize("loss", ["non_saturating", "hinge"])
def test_train_step_losses_are_finite_and_agree_across_impls(loss):
    runs = {impl: _train(impl, 3, loss=loss, r1_gamma=1.0, r1_every=2)[1] for impl in IMPLS}
    for history in runs.values():
        for step, losses in enumerate(history):
            assert torch.isfinite(losses.d_loss) and torch.isfinite(losses.g_loss)
            assert (losses.r1 is not None) == (step % 2 == 0)
    for name in ("d_loss", "g_loss", "r1", "real_logits_mean", "fake_logits_mean"):
        torch.testing.assert_close(getattr(runs["triton"][0], name), getattr(runs["eager"][0], name),
                                   rtol=1e-4, atol=1e-6)
    # The first step's losses are those of the untrained networks on the same images and latents.
    first = runs["eager"][0]
    model = _tiny_gan(loss=loss, r1_gamma=1.0)
    z = torch.randn(4, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        real_logits, fake_logits = model.discriminator(_images(seed=0)), model.discriminator(model.generator(z))
    torch.testing.assert_close(first.d_loss, discriminator_loss(real_logits, fake_logits, loss))
    torch.testing.assert_close(first.r1 * 0.5, model.r1_penalty(_images(seed=0))[0].detach())  # lazy: x r1_every


def test_train_step_with_r1_runs_under_bf16_autocast():
    for impl in IMPLS:
        model = _tiny_gan(r1_gamma=1.0)
        opt_g, opt_d = _sgd(model)
        with use_impl(impl), torch.autocast("cpu", dtype=torch.bfloat16):
            losses = model.train_step(_images(), opt_g, opt_d, generator=torch.Generator().manual_seed(0))
        assert losses.d_loss.dtype == losses.r1.dtype == torch.float32
        assert torch.isfinite(torch.stack([losses.d_loss, losses.g_loss, losses.r1])).all()
        assert abs(losses.d_loss.item() - 2 * math.log(2)) < 0.05  # near-zero logits at the paper's init


def test_train_step_updates_both_networks_and_only_them():
    model, _ = _train("eager", 1)
    fresh = _tiny_gan()
    for part in ("generator", "discriminator"):
        before = dict(getattr(fresh, part).named_parameters())
        for name, param in getattr(model, part).named_parameters():
            assert not torch.equal(param, before[name]), f"{part}.{name} not updated"
        assert all(p.requires_grad for p in getattr(model, part).parameters())
    assert model.steps == 1


BAD_INPUT = [
    (lambda model: _tiny_gan(image_size=24), ValueError, "image_size=24"),
    (lambda model: _tiny_gan(loss="wasserstein"), ValueError, "loss='wasserstein'"),
    (lambda model: _tiny_gan(r1_every=0), ValueError, "r1_every=0"),
    (lambda model: _tiny_gan(r1_gamma=-1.0), ValueError, "r1_gamma=-1.0"),
    (lambda model: model.discriminator(torch.zeros(2, 1, 16, 16)), ValueError, r"x must have shape \[batch, 3, 16"),
    (lambda model: model.discriminator(torch.zeros(2, 3, 16, 16, dtype=torch.long)), TypeError,
     "x must be a floating-point tensor"),
    (lambda model: model.generator(torch.zeros(2, 5)), ValueError, r"z must have shape \[batch, latent_dim=8\]"),
    (lambda model: model.sample(2, truncation=0.0), ValueError, "truncation=0.0"),
    (lambda model: model.sample(2, truncation_mode="wrap"), ValueError, "truncation_mode='wrap'"),
    (lambda model: model.sample(-1), ValueError, "n=-1"),
    (lambda model: model.r1_penalty([1.0]), TypeError, "real must be a torch.Tensor"),
    (lambda model: model.train_step(torch.zeros(0, 3, 16, 16), *_sgd(model)), ValueError,
     "real must hold at least one image"),
    (lambda model: model.train_step(torch.zeros(2, 3, 8, 8), *_sgd(model)), ValueError, r"real must have shape"),
    (lambda model: _tiny_gan(latent_dim=0), ValueError, "latent_dim=0"),
    (lambda model: _tiny_gan(extra_layers=-1), ValueError, "extra_layers=-1"),
    (lambda model: DCGANDiscriminator(image_size=16, extra_layers=1.5), TypeError, "extra_layers"),
    (lambda model: _tiny_gan(base_channels=-8), ValueError, "base_channels=-8"),
    (lambda model: _tiny_gan(channels=3.0), TypeError, "channels must be an int"),
    (lambda model: _tiny_gan(r1_gamma=float("nan")), ValueError, "r1_gamma=nan"),
    (lambda model: DCGANGenerator(latent_dim=0, image_size=16), ValueError, "latent_dim=0"),
    (lambda model: DCGANGenerator(latent_dim=8, channels=0, image_size=16), ValueError, "channels=0"),
    (lambda model: DCGANGenerator(latent_dim=8, image_size=16, base_channels=0), ValueError, "base_channels=0"),
    (lambda model: DCGANGenerator(latent_dim=8.0, image_size=16), TypeError, "latent_dim must be an int"),
    (lambda model: DCGANGenerator(image_size=16.0), TypeError, "image_size must be an int"),
    (lambda model: DCGANDiscriminator(channels=-1, image_size=16), ValueError, "channels=-1"),
    (lambda model: DCGANDiscriminator(image_size=16, base_channels=0), ValueError, "base_channels=0"),
    (lambda model: DCGANDiscriminator(image_size=16, base_channels=4.0), TypeError, "base_channels must be an int"),
    (lambda model: DCGANDiscriminator(image_size=16, alpha=float("inf")), ValueError, "alpha=inf"),
    (lambda model: discriminator_loss([0.5], torch.zeros(2)), TypeError, "real_logits must be a torch.Tensor"),
    (lambda model: discriminator_loss(torch.zeros(2), [0.5]), TypeError, "fake_logits must be a torch.Tensor"),
    (lambda model: discriminator_loss(torch.zeros(2, dtype=torch.long), torch.zeros(2)), TypeError,
     "real_logits must have a floating-point dtype"),
    (lambda model: generator_loss((0.5, 1.0)), TypeError, "fake_logits must be a torch.Tensor"),
    (lambda model: generator_loss(torch.zeros(2), loss="wgan"), ValueError, "loss='wgan'"),
    (lambda model: r1_penalty(model.discriminator, torch.zeros(2, 3, 16, 16), float("nan")), ValueError,
     "gamma=nan"),
    (lambda model: r1_penalty(model.discriminator, torch.zeros(2, 3, 16, 16), -1.0), ValueError, "gamma=-1.0"),
    (lambda model: r1_penalty(model.discriminator, torch.zeros(2, 3, 16, 16), "1"), TypeError,
     "gamma must be a real number"),
    (lambda model: r1_penalty(model.discriminator, [0.0], 1.0), TypeError, "real must be a torch.Tensor"),
    (lambda model: r1_penalty("D", torch.zeros(2, 3, 16, 16), 1.0), TypeError, "discriminator must be a module"),
    (lambda model: truncated_normal((2, 3), float("nan")), ValueError, "threshold=nan"),
    (lambda model: truncated_normal((2, 3), 0.0), ValueError, "threshold=0.0"),
]


def _sgd(model):
    return (torch.optim.SGD(model.generator.parameters(), lr=0.1),
            torch.optim.SGD(model.discriminator.parameters(), lr=0.1))


@pytest.mark.parametrize("call, error, message", BAD_INPUT, ids=[case[2] for case in BAD_INPUT])
def test_bad_input_is_rejected(call, error, message):
    model = _tiny_gan()
    with pytest.raises(error, match=message):
        call(model)
    assert model.steps == 0
