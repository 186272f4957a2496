"""Drop-in layers (models/layers.py) against the torch layers they replace, and their construction checks."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genkernels.kernels import use_impl
from genkernels.models.layers import (
    BatchNormAct2d,
    Conv2dBiasAct,
    ConvTranspose2dBiasAct,
    GroupNormAct,
    LinearBiasAct,
)


def _pair(activation, affine=True):
    torch.manual_seed(0)
    ours = GroupNormAct(4, 12, eps=1e-4, affine=affine, activation=activation)
    theirs = nn.GroupNorm(4, 12, eps=1e-4, affine=affine).double()
    if affine:
        with torch.no_grad():
            ours.weight.normal_()
            ours.bias.normal_()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


@pytest.mark.parametrize("impl", ["triton", "eager"])
@pytest.mark.parametrize("activation", ["silu", None])
def test_matches_torch_group_norm_and_silu_with_gradients(impl, activation, device):
    ours, theirs = _pair(activation)
    ours, theirs = ours.to(device), theirs.to(device)
    x = torch.randn(3, 12, 5, 7, device=device, requires_grad=True)
    with use_impl(impl):
        y = ours(x)
    expected = theirs(x.double())
    if activation == "silu":
        expected = F.silu(expected)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(expected)
    ours_grads = torch.autograd.grad(y, [x, ours.weight, ours.bias], grad)
    theirs_grads = torch.autograd.grad(expected, [x, theirs.weight, theirs.bias], grad)
    for mine, reference in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(mine.double(), reference.double(), rtol=1e-4, atol=1e-4)


def test_state_dict_is_interchangeable_with_nn_group_norm():
    ours, theirs = _pair("silu")
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    plain, _ = _pair(None, affine=False)
    assert plain.weight is None and plain.bias is None and not list(plain.parameters())


def test_keeps_channels_last(device):
    layer = GroupNormAct(2, 8).to(device)
    x = torch.randn(2, 8, 4, 5, device=device).to(memory_format=torch.channels_last)
    with use_impl("triton"):
        y = layer(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, F.silu(F.group_norm(x, 2, layer.weight, layer.bias)), rtol=1e-5, atol=1e-5)


def test_rejects_bad_arguments(device):
    with pytest.raises(ValueError, match="activation"):
        GroupNormAct(2, 8, activation="relu")
    with pytest.raises(ValueError, match="num_groups"):
        GroupNormAct(3, 8)
    with pytest.raises(ValueError, match=r"\[batch, 8, \.\.\.\]"):
        GroupNormAct(2, 8).to(device)(torch.randn(2, 6, 4, device=device))


# ---------------------------------------------------------------------------------------------------------------
# Construction checks: a clear error naming the argument
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,kwargs,error,name", [
    ((0, 8), {}, ValueError, "num_groups"),
    ((-2, 8), {}, ValueError, "num_groups"),
    ((2, 0), {}, ValueError, "num_channels"),
    ((3, 8), {}, ValueError, "num_groups=3 must divide num_channels=8"),
    ((2.0, 8), {}, TypeError, "num_groups"),
    ((2, 8), {"eps": 0.0}, ValueError, "eps"),
    ((2, 8), {"eps": float("nan")}, ValueError, "eps"),
    ((2, 8), {"affine": 1}, TypeError, "affine"),
])
def test_group_norm_act_rejects_bad_configurations(args, kwargs, error, name):
    with pytest.raises(error, match=name):
        GroupNormAct(*args, **kwargs)


CONV_CASES = [
    ((0, 4, 3), {}, ValueError, "in_channels"),
    ((3, 0, 3), {}, ValueError, "out_channels"),
    ((3, -4, 3), {}, ValueError, "out_channels"),
    ((3, 4, 0), {}, ValueError, "kernel_size"),
    ((3, 4, (3, 0)), {}, ValueError, "kernel_size"),
    ((3, 4, 3.0), {}, TypeError, "kernel_size"),
    ((3, 4, 3), {"stride": 0}, ValueError, "stride"),
    ((3, 4, 3), {"padding": -1}, ValueError, "padding"),
    ((3, 4, 3), {"dilation": 0}, ValueError, "dilation"),
    ((3, 4, 3), {"groups": 0}, ValueError, "groups"),
    ((3, 4, 3), {"groups": 2}, ValueError, "groups=2 must divide in_channels=3"),
    ((4, 3, 3), {"groups": 2}, ValueError, "groups=2 must divide out_channels=3"),
    ((3, 4, 3), {"act": "mish"}, ValueError, "act='mish'"),
    ((3, 4, 3), {"act": "lrelu", "alpha": -0.1}, ValueError, "alpha"),
    ((3, 4, 3), {"gain": "2"}, TypeError, "gain"),
    ((3, 4, 3), {"gain": float("inf")}, ValueError, "gain"),
    ((3, 4, 3), {"clamp": -1.0}, ValueError, "clamp"),
]


@pytest.mark.parametrize("layer", [Conv2dBiasAct, ConvTranspose2dBiasAct])
@pytest.mark.parametrize("args,kwargs,error,name", CONV_CASES)
def test_conv_layers_reject_bad_configurations(layer, args, kwargs, error, name):
    with pytest.raises(error, match=name):
        layer(*args, **kwargs)


@pytest.mark.parametrize("make,error,name", [
    (lambda: LinearBiasAct(0, 4), ValueError, "in_features"),
    (lambda: LinearBiasAct(4, 0), ValueError, "out_features"),
    (lambda: LinearBiasAct(4, 3, act="gelu", clamp=float("nan")), ValueError, "clamp"),
    (lambda: BatchNormAct2d(0), ValueError, "num_features"),
    (lambda: BatchNormAct2d(3, eps=-1.0), ValueError, "eps"),
    (lambda: BatchNormAct2d(3, momentum=2.0), ValueError, "momentum"),
    (lambda: BatchNormAct2d(3, act="elu", alpha=0.0), ValueError, "alpha"),
    (lambda: ConvTranspose2dBiasAct(3, 4, 3, output_padding=-1), ValueError, "output_padding"),
    (lambda: Conv2dBiasAct(3, 4, 3, padding="full"), ValueError, "padding"),
])
def test_other_layers_reject_bad_configurations(make, error, name):
    with pytest.raises(error, match=name):
        make()


def test_valid_configurations_still_build():
    Conv2dBiasAct(4, 6, (3, 1), stride=(2, 1), padding=1, groups=2, act="swish")
    Conv2dBiasAct(3, 5, 3, padding="same", act="gelu_tanh", clamp=0.0)
    ConvTranspose2dBiasAct(4, 2, 4, 2, 1, output_padding=1, groups=2, act="selu")
    LinearBiasAct(3, 2, bias=False, act="lrelu", alpha=0.0)
    BatchNormAct2d(3, momentum=None, act="gelu")


# ---------------------------------------------------------------------------------------------------------------
# The bias + activation layers with the new activations and clamp, against torch layers
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["triton", "eager"])
@pytest.mark.parametrize("act,torch_act", [
    ("gelu", lambda y: F.gelu(y)),
    ("gelu_tanh", lambda y: F.gelu(y, approximate="tanh")),
    ("selu", F.selu),
    ("swish", lambda y: torch.sigmoid(y) * y * math.sqrt(2)),
])
def test_bias_act_layers_match_torch_layers(act, torch_act, impl, device):
    torch.manual_seed(0)
    conv = Conv2dBiasAct(3, 4, 3, padding=1, act=act, clamp=1.5).to(device)
    plain_conv = nn.Conv2d(3, 4, 3, padding=1).to(device).double()
    plain_conv.load_state_dict(conv.state_dict())
    linear = LinearBiasAct(5, 6, act=act).to(device)
    plain_linear = nn.Linear(5, 6).to(device).double()
    plain_linear.load_state_dict(linear.state_dict())
    x = torch.randn(2, 3, 6, 7, device=device)
    v = torch.randn(4, 5, device=device)
    with use_impl(impl):
        got = [conv(x), linear(v)]
    expected = [torch_act(plain_conv(x.double())).clamp(-1.5, 1.5), torch_act(plain_linear(v.double()))]
    for mine, reference in zip(got, expected):
        torch.testing.assert_close(mine.double(), reference, rtol=1e-5, atol=1e-5)
    assert "clamp=1.5" in repr(conv)


def test_group_norm_act_compiles_with_dynamic_shapes(device):
    layer = GroupNormAct(2, 8).to(device)
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    for shape in ((2, 8, 4, 5), (3, 8, 6, 7)):
        x = torch.randn(shape, device=device)
        with use_impl("triton"):
            torch.testing.assert_close(compiled(x), F.silu(F.group_norm(x, 2, layer.weight, layer.bias)),
                                       rtol=1e-5, atol=1e-5)


def test_bias_act_layers_compile_with_dynamic_shapes(device):
    torch.manual_seed(0)
    layers = nn.Sequential(Conv2dBiasAct(3, 4, 3, padding=1, act="swish", clamp=2.0), nn.Flatten(1),
                           LinearBiasAct(4 * 5 * 6, 3, act="gelu")).to(device)
    compiled = torch.compile(layers, fullgraph=True, dynamic=True, backend="aot_eager")
    for batch in (2, 3):
        x = torch.randn(batch, 3, 5, 6, device=device)
        with use_impl("triton"):
            torch.testing.assert_close(compiled(x), layers(x), rtol=1e-5, atol=1e-6)
