"""Flow layers (models/flows.py), RealNVP and Glow: exact inverses, log-determinants against autograd Jacobians,
Triton vs eager for the same weights, and a short training run under both implementations."""
import math

import pytest
import torch
from reference_checks import assert_close_to_reference

from genkernels.kernels import use_impl
from genkernels.models.flows import (
    ActNorm,
    AffineCoupling,
    InvConv1x1,
    LearnedPrior,
    Split,
    Squeeze,
)
from genkernels.models.glow import Glow
from genkernels.models.realnvp import RealNVP


def _perturb(module: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    """Move every parameter off its (often zero, identity-making) initialization."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return module


def _images(shape, seed):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) - 0.5


LAYERS = {
    "actnorm": lambda: ActNorm(4),
    "invconv1x1": lambda: InvConv1x1(4, torch.Generator().manual_seed(3)),
    "coupling_channel_sigmoid": lambda: AffineCoupling(4, 8, mask="channel", scale_fn="sigmoid"),
    "coupling_channel_exp_parity1": lambda: AffineCoupling(5, 8, mask="channel", parity=1, scale_fn="exp"),
    "coupling_checkerboard": lambda: AffineCoupling(4, 8, mask="checkerboard", scale_fn="exp"),
    "coupling_checkerboard_parity1": lambda: AffineCoupling(4, 8, mask="checkerboard", parity=1, scale_fn="exp"),
    "squeeze": lambda: Squeeze(),
    "split_learned_prior": lambda: Split(4, learned_prior=True),
    "split_standard_prior": lambda: Split(5, learned_prior=False),
    "learned_prior": lambda: LearnedPrior((4, 4, 4)),
}


def _channels(name):
    return 5 if name in ("coupling_channel_exp_parity1", "split_standard_prior") else 4


def _flat_forward(layer, x):
    """The layer as a map of flattened samples: ``(y, logdet)`` with ``y`` ``[batch, D]`` (Split: ``[h, eps]``)."""
    out = layer(x)
    if isinstance(layer, Split):
        h, eps, logdet = out
        return torch.cat([h.reshape(x.shape[0], -1), eps.reshape(x.shape[0], -1)], dim=1), logdet
    y, logdet = out
    return y.reshape(x.shape[0], -1), logdet


def _layer_inverse(layer, x, out):
    if isinstance(layer, Split):
        return layer.inverse(out[0], out[1])
    return layer.inverse(out[0])


def _log_abs_det_jacobians(function, x):
    """``log|det J|`` of ``function`` (flattened sample -> flattened sample) at each sample of ``x``."""
    values = []
    for b in range(x.shape[0]):
        def one_sample(v, b=b):
            return function(torch.cat([x[:b], v[None], x[b + 1:]]))[b]
        jacobian = torch.autograd.functional.jacobian(one_sample, x[b], vectorize=True)
        values.append(torch.linalg.slogdet(jacobian.reshape(jacobian.shape[0], -1)).logabsdet)
    return torch.stack(values)


# ---------------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", LAYERS)
def test_layer_inverse_is_exact(name):
    layer = _perturb(LAYERS[name](), seed=1)
    x = _images((3, _channels(name), 4, 6) if name != "learned_prior" else (3, 4, 4, 4), seed=2)
    layer(x)  # data-dependent initialization (ActNorm)
    out = layer(x)
    torch.testing.assert_close(_layer_inverse(layer, x, out), x, rtol=1e-5, atol=2e-6)
    assert out[-1].shape == (3,) and out[-1].dtype == torch.float32


@pytest.mark.parametrize("name", LAYERS)
def test_layer_logdet_equals_log_det_of_autograd_jacobian(name):
    layer = _perturb(LAYERS[name](), seed=4).double()
    x = _images((2, _channels(name), 4, 4), seed=5).double()
    layer(x)  # data-dependent initialization (ActNorm)
    expected = _log_abs_det_jacobians(lambda v: _flat_forward(layer, v)[0], x)
    torch.testing.assert_close(_flat_forward(layer, x)[1], expected, rtol=1e-9, atol=1e-9)


def test_actnorm_data_dependent_initialization():
    layer = ActNorm(3)
    x = _images((5, 3, 4, 4), seed=6) * torch.tensor([1.0, 3.0, 0.2]).view(1, 3, 1, 1) + 2.0
    y, _ = layer(x)
    assert bool(layer.initialized)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    before = layer.loc.detach().clone()
    layer(x * 2)  # initialized once only
    assert torch.equal(layer.loc, before)
    restored = ActNorm(3)
    restored.load_state_dict(layer.state_dict())
    restored(x * 2)  # an initialized state_dict is not re-initialized
    assert torch.equal(restored.loc, before)
    fresh = ActNorm(3)
    layer.load_state_dict(fresh.state_dict())
    layer(x * 2)  # a state_dict that was never initialized is, on the next training batch
    assert not torch.equal(layer.loc, before) and bool(layer.initialized)


def test_invconv_weight_is_the_lu_product_and_starts_as_a_rotation():
    layer = InvConv1x1(6, torch.Generator().manual_seed(0))
    weight = layer.weight()
    torch.testing.assert_close(weight @ weight.T, torch.eye(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.log_s.sum(), torch.linalg.slogdet(weight).logabsdet, atol=1e-5, rtol=0)


def test_squeeze_layout():
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).view(1, 2, 4, 4)
    y, _ = Squeeze()(x)
    assert y.shape == (1, 8, 2, 2)
    # channel 4c + 2i + j holds pixel (2h + i, 2w + j) of channel c
    torch.testing.assert_close(y[0, 4 * 1 + 2 * 1 + 0], x[0, 1, 1::2, 0::2])


def test_split_learned_prior_is_the_gaussian_log_density():
    """log N(eps; 0, I) + logdet == log N(z; mean(h), std(h)) from torch.distributions."""
    split = _perturb(Split(4), seed=7).double()
    x = _images((2, 4, 3, 3), seed=8).double()
    h, eps, logdet = split(x)
    out = split.prior(h)
    prior = torch.distributions.Normal(out[:, :2], torch.exp(out[:, 2:]))
    expected = prior.log_prob(x[:, 2:]).sum(dim=(1, 2, 3))
    standard = -0.5 * (eps.square() + math.log(2 * math.pi)).sum(dim=(1, 2, 3))
    torch.testing.assert_close(standard + logdet, expected)


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------
IMAGE_SHAPE = (3, 4, 4)
DIMS = 3 * 4 * 4
MODELS = {
    "realnvp": lambda: RealNVP(IMAGE_SHAPE, num_scales=2, hidden_channels=8),
    "glow": lambda: Glow(IMAGE_SHAPE, num_levels=2, depth=2, hidden_channels=8,
                         generator=torch.Generator().manual_seed(0)),
}


def _model(name, seed=0):
    torch.manual_seed(seed)
    model = _perturb(MODELS[name](), seed=seed + 1, scale=0.05)
    with use_impl("eager"):
        model(_images((4,) + IMAGE_SHAPE, seed=seed + 2))  # data-dependent initialization (ActNorm)
    return model


@pytest.mark.parametrize("name", MODELS)
def test_model_inverse_is_exact(name):
    model = _model(name)
    x = _images((3,) + IMAGE_SHAPE, seed=9)
    z, logdet = model(x)
    assert z.shape == (3, DIMS) and logdet.shape == (3,)
    torch.testing.assert_close(model.inverse(z), x, rtol=1e-5, atol=2e-6)
    samples = model.sample(2, temperature=0.7, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (2,) + IMAGE_SHAPE and torch.isfinite(samples).all()
    with use_impl("eager"):
        torch.testing.assert_close(model.sample(2, temperature=0.0), model.inverse(torch.zeros(2, DIMS)))


@pytest.mark.parametrize("name,model", [
    ("realnvp", lambda: RealNVP((2, 4, 4), num_scales=2, hidden_channels=4)),
    ("glow", lambda: Glow((2, 4, 4), num_levels=2, depth=1, hidden_channels=4,
                          generator=torch.Generator().manual_seed(0))),
])
def test_model_logdet_equals_log_det_of_autograd_jacobian(name, model):
    torch.manual_seed(0)
    model = _perturb(model(), seed=10).double()
    x = _images((2, 2, 4, 4), seed=11).double()
    model(x)  # data-dependent initialization (ActNorm)
    expected = _log_abs_det_jacobians(lambda v: model(v)[0], x)
    torch.testing.assert_close(model(x)[1], expected, rtol=1e-9, atol=1e-9)


def _outputs_and_grads(model, x, impl):
    """``(z, logdet, grads)``; the grads are of ``-log p(x)``'s mean, i.e. of both outputs."""
    with use_impl(impl):
        z, logdet = model(x)
    negative_log_likelihood = (0.5 * z.to(logdet.dtype).square().sum(dim=1) - logdet).mean()
    grads = torch.autograd.grad(negative_log_likelihood, list(model.parameters()))
    return z.detach(), logdet.detach(), grads


@pytest.mark.parametrize("name", MODELS)
def test_triton_matches_eager_for_the_same_weights(name):
    """Outputs and every parameter gradient: Triton (fp32) and eager (fp32) vs the eager model in fp64."""
    model = _model(name)
    x = _images((2,) + IMAGE_SHAPE, seed=12)
    triton_z, triton_logdet, triton_grads = _outputs_and_grads(model, x, "triton")
    eager_z, eager_logdet, eager_grads = _outputs_and_grads(model, x, "eager")
    reference_z, reference_logdet, reference_grads = _outputs_and_grads(_model(name).double(), x.double(), "eager")
    assert_close_to_reference(triton_z, reference_z, eager_z, "z")
    assert_close_to_reference(triton_logdet, reference_logdet, eager_logdet, "logdet")
    for (label, _), kernel, eager, reference in zip(model.named_parameters(), triton_grads, eager_grads,
                                                    reference_grads):
        assert_close_to_reference(kernel, reference, eager, f"grad {label}")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["realnvp", "glow"])
def test_cifar_sized_models_triton_matches_eager_on_gpu(name):
    def build():
        torch.manual_seed(0)
        if name == "realnvp":
            model = RealNVP((3, 32, 32), num_scales=3, hidden_channels=32)
        else:
            model = Glow((3, 32, 32), num_levels=3, depth=4, hidden_channels=64,
                         generator=torch.Generator().manual_seed(0))
        model = _perturb(model, seed=1, scale=0.02).cuda()
        with use_impl("eager"):
            model(_images((16, 3, 32, 32), seed=2).cuda())  # data-dependent initialization (ActNorm)
        return model

    model = build()
    x = _images((8, 3, 32, 32), seed=3).cuda()
    triton_z, triton_logdet, triton_grads = _outputs_and_grads(model, x, "triton")
    eager_z, eager_logdet, eager_grads = _outputs_and_grads(model, x, "eager")
    reference_z, reference_logdet, reference_grads = _outputs_and_grads(build().double(), x.double(), "eager")
    assert_close_to_reference(triton_z, reference_z, eager_z, "z")
    assert_close_to_reference(triton_logdet, reference_logdet, eager_logdet, "logdet")
    for (label, _), kernel, eager, reference in zip(model.named_parameters(), triton_grads, eager_grads,
                                                    reference_grads):
        assert_close_to_reference(kernel, reference, eager, f"grad {label}")
    torch.testing.assert_close(model.inverse(triton_z), x, rtol=1e-4, atol=1e-4)


def test_bits_per_dim_of_an_identity_flow_is_the_gaussian_code_length():
    """RealNVP at initialization is the identity up to a permutation (zero-initialized coupling nets): its
    bits/dim is the standard normal's density of the dequantized data, plus 8 bits for the bin width."""
    model = RealNVP(IMAGE_SHAPE, num_scales=2, hidden_channels=4)
    images = torch.randint(0, 256, (2,) + IMAGE_SHAPE, generator=torch.Generator().manual_seed(13))
    x = model.dequantize(images, torch.Generator().manual_seed(1))
    log_density = torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(dim=(1, 2, 3))
    expected = -log_density / (DIMS * math.log(2)) + 8
    torch.testing.assert_close(model.bits_per_dim(images, torch.Generator().manual_seed(1)), expected)
    assert ((x >= -0.5) & (x < 0.5)).all()


# Smallest models that still train: one Glow level of one step; one RealNVP scale (four checkerboard couplings).
CONVERGENCE_MODELS = {
    "realnvp": lambda: RealNVP(IMAGE_SHAPE, num_scales=1, hidden_channels=8),
    "glow": lambda: Glow(IMAGE_SHAPE, num_levels=1, depth=1, hidden_channels=8,
                         generator=torch.Generator().manual_seed(0)),
}


@pytest.mark.parametrize("name", CONVERGENCE_MODELS)
def test_training_converges_with_the_same_curve_under_both_impls(name):
    """A few Adam steps on 4 tiny images: bits/dim goes down, and Triton's curve follows eager's."""
    images = torch.randint(0, 256, (4,) + IMAGE_SHAPE, generator=torch.Generator().manual_seed(14)) // 64 * 64
    curves = {}
    for impl in ("eager", "triton"):
        torch.manual_seed(0)
        model = _perturb(CONVERGENCE_MODELS[name](), seed=1, scale=0.05)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        curve = []
        for step in range(8):
            with use_impl(impl):
                loss = model.bits_per_dim(images, torch.Generator().manual_seed(step)).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            curve.append(loss.item())
        curves[impl] = torch.tensor(curve)
    assert curves["eager"][-3:].mean() < curves["eager"][:3].mean() - 0.1
    torch.testing.assert_close(curves["triton"], curves["eager"], rtol=2e-3, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one case per rejection, each naming the argument
# ---------------------------------------------------------------------------------------------------------------
def _tiny_realnvp():
    return RealNVP((3, 4, 4), num_scales=1, hidden_channels=4)


def _tiny_glow():
    return Glow((3, 4, 4), num_levels=1, depth=1, hidden_channels=4, generator=torch.Generator().manual_seed(0))


BAD_LAYER_ARGUMENTS = [
    (lambda: AffineCoupling(4, mask="checkerboard", scale_fn="sigmoid"), ValueError, "checkerboard.*scale_fn='exp'"),
    (lambda: AffineCoupling(4, mask="stripes"), ValueError, "mask='stripes'"),
    (lambda: AffineCoupling(4, scale_fn="tanh"), ValueError, "scale_fn='tanh'"),
    (lambda: AffineCoupling(0, mask="checkerboard", scale_fn="exp"), ValueError, "num_channels=0"),
    (lambda: AffineCoupling(1), ValueError, "num_channels=1"),
    (lambda: AffineCoupling(4, 0), ValueError, "hidden_channels=0"),
    (lambda: AffineCoupling(4, -3), ValueError, "hidden_channels=-3"),
    (lambda: AffineCoupling(4.0), TypeError, "num_channels must be an int"),
    (lambda: AffineCoupling(4, 8.0), TypeError, "hidden_channels must be an int"),
    (lambda: AffineCoupling(4, parity=2), ValueError, "parity=2"),
    (lambda: AffineCoupling(4, conditioner=lambda x: x), TypeError, "conditioner must be an nn.Module"),
    (lambda: ActNorm(0), ValueError, "num_channels=0"),
    (lambda: ActNorm(2.5), TypeError, "num_channels must be an int"),
    (lambda: ActNorm(4, eps=-1.0), ValueError, "eps=-1.0"),
    (lambda: ActNorm(4, eps=0.0), ValueError, "eps=0.0"),
    (lambda: ActNorm(4, eps=float("nan")), ValueError, "eps=nan"),
    (lambda: InvConv1x1(0), ValueError, "num_channels=0"),
    (lambda: InvConv1x1(-2), ValueError, "num_channels=-2"),
    (lambda: InvConv1x1(4, generator=3), TypeError, "generator must be a torch.Generator"),
    (lambda: Split(1), ValueError, "num_channels=1"),
    (lambda: Split(4.0), TypeError, "num_channels must be an int"),
    (lambda: Split(4, learned_prior=1), TypeError, "learned_prior must be a bool"),
    (lambda: LearnedPrior((4, 0, 4)), ValueError, r"shape\[1\]=0"),
    (lambda: LearnedPrior((4, 2.0, 4)), TypeError, r"shape\[1\] must be an int"),
    (lambda: LearnedPrior(4), TypeError, "shape must be a non-empty sequence"),
]


@pytest.mark.parametrize("call, error, message", BAD_LAYER_ARGUMENTS,
                         ids=[str(i) for i in range(len(BAD_LAYER_ARGUMENTS))])
def test_layer_constructors_reject_bad_arguments(call, error, message):
    with pytest.raises(error, match=message):
        call()


BAD_LAYER_INPUTS = [
    (lambda: Squeeze()(torch.zeros(1, 2, 3, 4)), ValueError, r"even height and width; got shape \[1, 2, 3, 4\]"),
    (lambda: Squeeze()(torch.zeros(1, 2, 4, 5)), ValueError, r"x of shape.*even.*got shape \[1, 2, 4, 5\]"),
    (lambda: Squeeze()(torch.zeros(2, 4, 4)), ValueError, r"x of shape \[batch, channels, height, width\]"),
    (lambda: Squeeze()([1.0]), TypeError, "x must be a torch.Tensor"),
    (lambda: Squeeze()(torch.zeros(1, 2, 4, 4, dtype=torch.int64)), TypeError, "x must be a floating-point"),
    (lambda: Squeeze().inverse(torch.zeros(1, 6, 2, 2)), ValueError, r"y of shape \[batch, 4 \* channels"),
    (lambda: ActNorm(4)(torch.zeros(1, 3, 2, 2)), ValueError,
     r"x must have shape \[batch, 4, height, width\]; got shape \[1, 3, 2, 2\]"),
    (lambda: ActNorm(4)(torch.zeros(1, 4, 2, 2, dtype=torch.uint8)), TypeError, "x must be a floating-point"),
    (lambda: InvConv1x1(4)(torch.zeros(4, 2, 2)), ValueError, r"x must have shape \[batch, 4, height, width\]"),
    (lambda: AffineCoupling(4, 4, mask="checkerboard", scale_fn="exp")(torch.zeros(2, 4, 5)), ValueError,
     r"x must have shape \[batch, 4, height, width\]; got shape \[2, 4, 5\]"),
    (lambda: AffineCoupling(4, 4, mask="checkerboard", scale_fn="exp").inverse(torch.zeros(2, 3, 4, 4)),
     ValueError, r"y must have shape \[batch, 4, height, width\]"),
    (lambda: AffineCoupling(4, conditioner=torch.nn.Conv2d(2, 3, 1))(torch.zeros(1, 4, 2, 2)), ValueError,
     r"conditioner must map the kept part \[1, 2, 2, 2\] to \[1, 4, 2, 2\]"),
    (lambda: Split(4).inverse(torch.zeros(2, 2, 3, 3), torch.zeros(2, 3, 3, 3)), ValueError,
     r"eps must have shape \[2, 2, 3, 3\]"),
    (lambda: Split(4).inverse(torch.zeros(2, 2, 3, 3), torch.zeros(2, 2, 3, 4)), ValueError,
     r"eps must have shape \[2, 2, 3, 3\]"),
    (lambda: Split(4).inverse(torch.zeros(2, 3, 3, 3), torch.zeros(2, 2, 3, 3)), ValueError,
     r"h must have shape \[batch, 2, height, width\]"),
    (lambda: Split(4).inverse(torch.zeros(2, 2, 3, 3), None), TypeError, "eps must be a torch.Tensor"),
    (lambda: LearnedPrior((4, 2, 2))(torch.zeros(3, 4, 2, 3)), ValueError,
     r"z must have shape \[batch, 4, 2, 2\]; got shape \[3, 4, 2, 3\]"),
    (lambda: LearnedPrior((4, 2, 2)).inverse(torch.zeros(4, 2, 2)), ValueError, r"eps must have shape \[batch, 4"),
    (lambda: LearnedPrior((4, 2, 2))(torch.zeros(3, 4, 2, 2, dtype=torch.int32)), TypeError,
     "z must be a floating-point"),
]


@pytest.mark.parametrize("call, error, message", BAD_LAYER_INPUTS, ids=[str(i) for i in range(len(BAD_LAYER_INPUTS))])
def test_layers_reject_bad_inputs_up_front(call, error, message):
    with pytest.raises(error, match=message):
        call()


BAD_MODEL_ARGUMENTS = [
    (lambda: Glow((3, 12, 12), num_levels=3), ValueError, "divisible by 2\\*\\*num_levels = 8"),
    (lambda: RealNVP((3, 6, 6), num_scales=3), ValueError, "divisible by 2\\*\\*\\(num_scales - 1\\) = 4"),
    (lambda: Glow(image_shape=(1, 4)), ValueError, r"image_shape must be \(channels, height, width\).*\(1, 4\)"),
    (lambda: RealNVP(image_shape=(3, 4, 4, 1)), ValueError, "image_shape must be \\(channels, height, width\\)"),
    (lambda: Glow(image_shape=32), TypeError, "image_shape must be a sequence"),
    (lambda: Glow(image_shape=(3, 8.0, 8)), TypeError, "image_shape height must be an int"),
    (lambda: RealNVP(image_shape=(0, 4, 4)), ValueError, "image_shape channels=0"),
    (lambda: Glow((3, 4, 4), num_levels=0), ValueError, "num_levels=0"),
    (lambda: Glow((3, 4, 4), num_levels=1.0), TypeError, "num_levels must be an int"),
    (lambda: Glow((3, 4, 4), num_levels=1, depth=0), ValueError, "depth=0"),
    (lambda: Glow((3, 4, 4), num_levels=1, depth=2.0), TypeError, "depth must be an int"),
    (lambda: Glow((3, 4, 4), num_levels=1, depth=1, hidden_channels=0), ValueError, "hidden_channels=0"),
    (lambda: RealNVP((3, 4, 4), num_scales=0), ValueError, "num_scales=0"),
    (lambda: RealNVP((3, 4, 4), num_scales=2.0), TypeError, "num_scales must be an int"),
    (lambda: RealNVP((3, 4, 4), num_scales=1, hidden_channels=-1), ValueError, "hidden_channels=-1"),
    (lambda: RealNVP((3, 4, 4), num_scales=1, hidden_channels=4.5), TypeError, "hidden_channels must be an int"),
]


@pytest.mark.parametrize("call, error, message", BAD_MODEL_ARGUMENTS,
                         ids=[str(i) for i in range(len(BAD_MODEL_ARGUMENTS))])
def test_model_constructors_reject_bad_arguments(call, error, message):
    with pytest.raises(error, match=message):
        call()


BAD_MODEL_INPUTS = [
    (lambda model: model(torch.zeros(2, 3, 8, 8)), ValueError,
     r"x must have shape \[batch, 3, 4, 4\]; got shape \[2, 3, 8, 8\]"),
    (lambda model: model(torch.zeros(2, 3, 4, 4, dtype=torch.uint8)), TypeError,
     "x must be a floating-point tensor.*dequantize"),
    (lambda model: model(torch.zeros(2, 3, 4, 4, dtype=torch.int64)), TypeError, "x must be a floating-point"),
    (lambda model: model.log_prob(torch.zeros(2, 3, 4, 4, dtype=torch.int64)), TypeError, "x must be a floating"),
    (lambda model: model.inverse(torch.zeros(2, 47)), ValueError,
     r"z must have shape \[batch, 48\]; got shape \[2, 47\]"),
    (lambda model: model.inverse(torch.zeros(2, 48, dtype=torch.int64)), TypeError, "z must be a floating-point"),
    (lambda model: model.sample(-1), ValueError, "n=-1"),
    (lambda model: model.sample(2.0), TypeError, "n must be an int"),
    (lambda model: model.sample(1, temperature=-1.0), ValueError, "temperature=-1.0"),
    (lambda model: model.sample(1, temperature=float("nan")), ValueError, "temperature=nan"),
    (lambda model: model.bits_per_dim(torch.full((2, 3, 4, 4), 256)), ValueError,
     r"images must hold 8-bit pixel values: integers in \[0, 255\]; got a value 256"),
    (lambda model: model.bits_per_dim(torch.full((2, 3, 4, 4), -1)), ValueError, "images must hold 8-bit pixel"),
    (lambda model: model.bits_per_dim(torch.full((2, 3, 4, 4), 0.5)), ValueError,
     "images must hold 8-bit pixel values.*got a value 0.5"),
    (lambda model: model.bits_per_dim(torch.full((2, 3, 4, 4), float("nan"))), ValueError,
     "images must hold 8-bit pixel values"),
    (lambda model: model.bits_per_dim(torch.zeros(2, 3, 4, 4, dtype=torch.bool)), TypeError, "images must hold 8-bit"),
    (lambda model: model.bits_per_dim(torch.zeros(2, 3, 4)), ValueError, r"images must have shape \[batch, 3, 4, 4\]"),
    (lambda model: model.bits_per_dim([0, 1]), TypeError, "images must be a torch.Tensor"),
    (lambda model: model.dequantize(torch.full((2, 3, 4, 4), 300)), ValueError, "images must hold 8-bit pixel"),
]


@pytest.mark.parametrize("name, build", [("realnvp", _tiny_realnvp), ("glow", _tiny_glow)])
@pytest.mark.parametrize("call, error, message", BAD_MODEL_INPUTS, ids=[str(i) for i in range(len(BAD_MODEL_INPUTS))])
def test_models_reject_bad_inputs_up_front(call, error, message, name, build):
    with pytest.raises(error, match=message):
        call(build())


def test_bits_per_dim_takes_integer_valued_float_pixels_like_integer_ones():
    model = _tiny_realnvp()
    images = torch.randint(0, 256, (2, 3, 4, 4), generator=torch.Generator().manual_seed(0))
    expected = model.bits_per_dim(images, torch.Generator().manual_seed(1))
    torch.testing.assert_close(model.bits_per_dim(images.float(), torch.Generator().manual_seed(1)), expected)
    edges = torch.tensor([0, 255]).repeat(48)[:48].reshape(1, 3, 4, 4)
    assert torch.isfinite(model.bits_per_dim(edges)).all()


def test_checkerboard_coupling_ignores_nan_and_inf_in_the_pixels_it_changes():
    """The conditioner sees the kept pixels only: a NaN or Inf in a changed pixel stays in that pixel (the mask
    selects it away rather than multiplying it by 0, which gave NaN everywhere the conditioner's 3x3 convs reach)."""
    layer = _perturb(AffineCoupling(2, 8, mask="checkerboard", parity=0, scale_fn="exp"), seed=3)
    x = _images((1, 2, 4, 4), seed=4)
    changed = (0, 0, 0, 1)  # h + w + parity odd: a pixel this coupling changes
    for value in (float("nan"), float("inf")):
        poisoned = x.clone()
        poisoned[changed] = value
        for impl in ("triton", "eager"):
            with use_impl(impl):
                y, logdet = layer(poisoned)
                clean, clean_logdet = layer(x)
            others = torch.ones_like(y, dtype=torch.bool)
            others[changed] = False
            torch.testing.assert_close(y[others], clean[others])
            torch.testing.assert_close(logdet, clean_logdet)
            assert y[changed].isnan() if value != value else y[changed].isinf()


# ---------------------------------------------------------------------------------------------------------------
# Class-conditional flows (a top prior per class)
# ---------------------------------------------------------------------------------------------------------------
NUM_CLASSES = 3
CONDITIONAL_MODELS = {
    "realnvp": lambda num_classes: RealNVP(IMAGE_SHAPE, num_scales=2, hidden_channels=8, num_classes=num_classes),
    "glow": lambda num_classes: Glow(IMAGE_SHAPE, num_levels=2, depth=2, hidden_channels=8,
                                     generator=torch.Generator().manual_seed(0), num_classes=num_classes),
}
LABELS = torch.tensor([2, 0, 1])


def _conditional_model(name, seed=0):
    torch.manual_seed(seed)
    model = _perturb(CONDITIONAL_MODELS[name](NUM_CLASSES), seed=seed + 1, scale=0.05)
    with use_impl("eager"):
        model(_images((4,) + IMAGE_SHAPE, seed=seed + 2), torch.tensor([0, 1, 2, 0]))  # ActNorm initialization
    return model


def test_conditional_learned_prior_is_the_gaussian_of_each_label():
    prior = _perturb(LearnedPrior((2, 3, 3), num_classes=NUM_CLASSES), seed=4, scale=0.5)
    z = torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(5))
    with use_impl("eager"):
        eps, logdet = prior(z, LABELS)
        back = prior.inverse(eps, LABELS)
    mean, std = prior.mean[LABELS], prior.log_std[LABELS].exp()
    expected = torch.distributions.Normal(mean, std).log_prob(z).flatten(1).sum(1)
    standard = torch.distributions.Normal(0.0, 1.0).log_prob(eps).flatten(1).sum(1)
    torch.testing.assert_close(standard + logdet, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(back, z, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", CONDITIONAL_MODELS)
def test_conditional_flow_is_the_unconditional_flow_with_a_gaussian_per_class_on_the_top_latent(name):
    """log p(x | y) of the class-conditional flow = the unconditional flow with the same bijections (and a
    standard normal top prior), its top latent rescored under N(mean[y], std[y]) (torch.distributions)."""
    model = _conditional_model(name)
    twin = CONDITIONAL_MODELS[name](None)
    state = {key: value for key, value in model.state_dict().items() if not key.startswith("top_prior.")}
    missing = twin.load_state_dict(state, strict=False).missing_keys
    assert all(key.startswith("top_prior.") for key in missing)
    x = _images((3,) + IMAGE_SHAPE, seed=13)
    with use_impl("eager"):
        log_p = model.log_prob(x, LABELS)
        z, logdet = twin(x)  # twin's top prior (if any) is zero-initialized: the identity
    top = math.prod(model.top_prior.shape)
    rest, top_latent = z[:, :-top], z[:, -top:]
    top_prior = torch.distributions.Normal(model.top_prior.mean[LABELS].flatten(1),
                                           model.top_prior.log_std[LABELS].exp().flatten(1))
    expected = (torch.distributions.Normal(0.0, 1.0).log_prob(rest).sum(1) + top_prior.log_prob(top_latent).sum(1)
                + logdet)
    torch.testing.assert_close(log_p, expected.detach(), rtol=1e-5, atol=1e-4)
    assert not torch.allclose(model.log_prob(x, LABELS), model.log_prob(x, LABELS.roll(1)))


@pytest.mark.parametrize("name", CONDITIONAL_MODELS)
def test_conditional_flow_inverse_is_exact_and_samples_follow_the_labels(name):
    model = _conditional_model(name)
    x = _images((3,) + IMAGE_SHAPE, seed=9)
    with use_impl("eager"):
        z, _ = model(x, LABELS)
        torch.testing.assert_close(model.inverse(z, LABELS), x, rtol=1e-5, atol=2e-6)
        # temperature 0: each class's prior mean, pushed through the inverse
        modes = model.sample(3, temperature=0.0, labels=LABELS)
        expected = model.inverse(torch.zeros(3, DIMS), LABELS)
    torch.testing.assert_close(modes, expected)
    assert not torch.allclose(modes[0], modes[1])


@pytest.mark.parametrize("name", CONDITIONAL_MODELS)
def test_conditional_flow_logdet_equals_log_det_of_autograd_jacobian(name):
    model = _conditional_model(name).double()
    x = _images((2,) + IMAGE_SHAPE, seed=11).double()
    labels = LABELS[:2]
    expected = _log_abs_det_jacobians(lambda v: model(v, labels)[0], x)
    torch.testing.assert_close(model(x, labels)[1], expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", CONDITIONAL_MODELS)
def test_conditional_flow_triton_matches_eager_for_the_same_weights(name):
    """Outputs and every parameter gradient (the class tables' too) against the eager model in fp64."""
    model = _conditional_model(name)
    x = _images((3,) + IMAGE_SHAPE, seed=12)

    def outputs_and_grads(flow, inputs, impl):
        with use_impl(impl):
            log_p = flow.log_prob(inputs, LABELS)
        return log_p.detach(), torch.autograd.grad(-log_p.mean(), list(flow.parameters()))

    triton_log_p, triton_grads = outputs_and_grads(model, x, "triton")
    eager_log_p, eager_grads = outputs_and_grads(model, x, "eager")
    reference_log_p, reference_grads = outputs_and_grads(_conditional_model(name).double(), x.double(), "eager")
    assert_close_to_reference(triton_log_p, reference_log_p, eager_log_p, "log p(x | y)")
    for (label, _), kernel, eager, reference in zip(model.named_parameters(), triton_grads, eager_grads,
                                                    reference_grads):
        assert_close_to_reference(kernel, reference, eager, f"grad {label}")
    assert reference_grads[-1].abs().sum() > 0  # the top prior's tables learn


BAD_LABELS = [
    (lambda model: model(_images((3,) + IMAGE_SHAPE, 0)), ValueError,
     r"class-conditional \(num_classes=3\): labels \[3\] are required"),
    (lambda model: model.log_prob(_images((3,) + IMAGE_SHAPE, 0), LABELS.float()), TypeError,
     "labels must have an integer dtype"),
    (lambda model: model.log_prob(_images((3,) + IMAGE_SHAPE, 0), LABELS[:2]), ValueError,
     r"labels must have shape \[batch\] = \[3\]"),
    (lambda model: model.log_prob(_images((3,) + IMAGE_SHAPE, 0), torch.tensor([0, 3, 1])), ValueError,
     r"labels must lie in \[0, 3\); got a value 3"),
    (lambda model: model.inverse(torch.zeros(3, DIMS), torch.tensor([0, -1, 1])), ValueError,
     "labels must lie in .*got a value -1"),
    (lambda model: model.sample(2), ValueError, r"labels \[2\] are required"),
    (lambda model: model.bits_per_dim(torch.zeros(3, *IMAGE_SHAPE, dtype=torch.int64)), ValueError,
     "labels .* are required"),
]


@pytest.mark.parametrize("name", CONDITIONAL_MODELS)
@pytest.mark.parametrize("call, error, message", BAD_LABELS, ids=[str(i) for i in range(len(BAD_LABELS))])
def test_conditional_flows_reject_bad_labels_up_front(call, error, message, name):
    with pytest.raises(error, match=message):
        call(CONDITIONAL_MODELS[name](NUM_CLASSES))


@pytest.mark.parametrize("name", CONDITIONAL_MODELS)
def test_unconditional_flows_refuse_labels(name):
    with pytest.raises(ValueError, match=r"labels were given to an unconditional model \(num_classes=None\)"):
        CONDITIONAL_MODELS[name](None).log_prob(_images((3,) + IMAGE_SHAPE, 0), LABELS)
    with pytest.raises(ValueError, match="num_classes=0"):
        CONDITIONAL_MODELS[name](0)
