"""Drop-in GroupNormAct (models/layers.py) against the torch layers it replaces."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genkernels.kernels import use_impl
from genkernels.models.layers import GroupNormAct


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
