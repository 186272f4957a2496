"""Dilated causal 1-D convolution (kernels/causal_conv.py) against fp64 references, forward and gradients."""
import pytest
import torch
from reference_checks import assert_close_to_reference, random_tensor

import genkernels.kernels.causal_conv as causal_conv_module
from genkernels.kernels.causal_conv import causal_conv1d, causal_conv1d_reference


def _inputs(batch, c_in, c_out, length, ksize, dtype, device, seed=0, with_bias=True):
    x = random_tensor((batch, c_in, length), dtype, seed, device)
    weight = random_tensor((c_out, c_in, ksize), dtype, seed + 1, device, scale=c_in**-0.5)
    bias = random_tensor((c_out,), dtype, seed + 2, device) if with_bias else None
    return x, weight, bias


def _check_forward_and_gradients(x, weight, bias, dilation, seed=3):
    """Kernel and eager-same-dtype against the fp64 reference, output and every gradient."""
    leaves = [t.detach().requires_grad_() for t in (x, weight) + ((bias,) if bias is not None else ())]
    results = {}
    for impl in ("triton", "eager"):
        args = leaves + ([None] if bias is None else [])
        out = causal_conv1d(*args, dilation=dilation, impl=impl)
        grad_out = random_tensor(out.shape, out.dtype, seed, str(out.device))
        results[impl] = (out,) + torch.autograd.grad(out, leaves, grad_out)
    doubles = [t.detach().double().requires_grad_() for t in leaves]
    reference = causal_conv1d_reference(doubles[0], doubles[1], doubles[2] if bias is not None else None, dilation)
    grad_out = random_tensor(reference.shape, x.dtype, seed, str(x.device)).double()
    expected = (reference,) + torch.autograd.grad(reference, doubles, grad_out)
    for name, kernel, eager, ref in zip(("output", "grad_x", "grad_weight", "grad_bias"), results["triton"],
                                        results["eager"], expected):
        assert_close_to_reference(kernel, ref.to(torch.float64), eager, name)


@pytest.mark.parametrize("ksize,dilation,length,dtype", [
    (1, 1, 17, torch.float32),
    (2, 1, 100, torch.float16),
    (3, 2, 33, torch.bfloat16),
    (2, 4, 70, torch.float32),
    (3, 8, 100, torch.float32),
    (2, 16, 20, torch.float32),  # every shifted tap falls before the start
    (3, 1, 1, torch.float16),  # one time step
])
def test_matches_fp64_reference(ksize, dilation, length, dtype, device):
    x, weight, bias = _inputs(2, 5, 7, length, ksize, dtype, device)
    _check_forward_and_gradients(x, weight, bias, dilation)


def test_many_channels_cross_channel_blocks(device):
    """Channel counts past one 64-wide block, ragged, so the GEMM loops over several channel blocks."""
    x, weight, bias = _inputs(1, 70, 67, 19, 2, torch.float32, device)
    _check_forward_and_gradients(x, weight, bias, 3)


def test_without_bias(device):
    x, weight, _ = _inputs(2, 3, 4, 25, 3, torch.float32, device)
    _check_forward_and_gradients(x, weight, None, 2)


def test_non_contiguous_inputs(device):
    """A [batch, time, channels] buffer read as [batch, channels, time], and a weight sliced from a wider one."""
    x = random_tensor((2, 40, 6), torch.float32, 0, device).transpose(1, 2)
    weight = random_tensor((5, 12, 2), torch.float32, 1, device)[:, ::2]
    bias = random_tensor((10,), torch.float32, 2, device)[::2]
    assert not x.is_contiguous() and not weight.is_contiguous() and not bias.is_contiguous()
    _check_forward_and_gradients(x, weight, bias, 4)


def test_weight_gradient_split_over_programs(device, monkeypatch):
    """The GPU launcher splits the (batch, time) reduction of the weight gradient over programs; the interpreter
    does not by default, so force the GPU choice (fp32: the same dot path) and check the split sum."""
    monkeypatch.setattr(causal_conv_module, "interpreter_enabled", lambda: False)
    grad_out = random_tensor((3, 4, 200), torch.float32, 0, device)
    x = random_tensor((3, 5, 200), torch.float32, 1, device)
    grad_w, grad_b = causal_conv_module.launch_conv_weight_grad(grad_out, x, 2, 3, True)
    xd = x.double().requires_grad_()
    weight = torch.zeros(4, 5, 2, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    out = causal_conv1d_reference(xd, weight, bias, 3)
    expected_w, expected_b = torch.autograd.grad(out, (weight, bias), grad_out.double())
    torch.testing.assert_close(grad_w.double(), expected_w, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad_b.double(), expected_b, rtol=1e-5, atol=1e-4)


def test_empty_batch_and_empty_time(device):
    for shape in ((0, 3, 10), (2, 3, 0)):
        x = torch.zeros(shape, device=device, requires_grad=True)
        weight = torch.randn(4, 3, 2, device=device, requires_grad=True)
        out = causal_conv1d(x, weight, None, dilation=2, impl="triton")
        assert out.shape == (shape[0], 4, shape[2])
        grad_x, grad_w = torch.autograd.grad(out, (x, weight), torch.ones_like(out))
        assert grad_x.shape == x.shape and torch.equal(grad_w, torch.zeros_like(grad_w))


def test_reference_equals_tap_sum_definition():
    """The reference (F.conv1d on a left-padded input) against the definition, tap by tap in fp64."""
    x = random_tensor((2, 3, 30), torch.float64, 0)
    weight = random_tensor((4, 3, 3), torch.float64, 1)
    bias = random_tensor((4,), torch.float64, 2)
    dilation = 5
    expected = bias[None, :, None].expand(2, 4, 30).clone()
    for j in range(3):
        shift = (3 - 1 - j) * dilation
        shifted = torch.zeros_like(x)
        shifted[:, :, shift:] = x[:, :, :30 - shift]
        expected += torch.einsum("oi,bit->bot", weight[:, :, j], shifted)
    torch.testing.assert_close(causal_conv1d_reference(x, weight, bias, dilation), expected)


def test_output_is_causal(device):
    """Changing the input at time t changes no output before t."""
    x, weight, bias = _inputs(1, 3, 3, 40, 3, torch.float32, device)
    changed = x.clone()
    changed[:, :, 25] += 10.0
    before = causal_conv1d(x, weight, bias, dilation=4, impl="triton")
    after = causal_conv1d(changed, weight, bias, dilation=4, impl="triton")
    assert torch.equal(before[:, :, :25], after[:, :, :25])
    assert not torch.equal(before[:, :, 25], after[:, :, 25])


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one test per rejection, each naming the argument
# ---------------------------------------------------------------------------------------------------------------
def _good():
    return torch.randn(2, 3, 10), torch.randn(4, 3, 2), torch.randn(4)


@pytest.mark.parametrize("case,error,names", [
    ("x_rank", ValueError, "x"),
    ("weight_rank", ValueError, "weight"),
    ("in_channels", ValueError, "weight"),
    ("bias_shape", ValueError, "bias"),
    ("dtype_mismatch", TypeError, "weight"),
    ("integer_x", TypeError, "x"),
    ("device_mismatch", ValueError, "weight"),
    ("dilation_zero", ValueError, "dilation"),
    ("dilation_float", TypeError, "dilation"),
    ("not_a_tensor", TypeError, "x"),
])
def test_rejects_bad_input(case, error, names):
    x, weight, bias = _good()
    dilation = 1
    if case == "x_rank":
        x = x[0]
    elif case == "weight_rank":
        weight = weight[..., 0]
    elif case == "in_channels":
        weight = torch.randn(4, 5, 2)
    elif case == "bias_shape":
        bias = torch.randn(5)
    elif case == "dtype_mismatch":
        weight = weight.half()
    elif case == "integer_x":
        x = x.long()
    elif case == "device_mismatch":
        weight = weight.to("meta")
    elif case == "dilation_zero":
        dilation = 0
    elif case == "dilation_float":
        dilation = 2.0
    elif case == "not_a_tensor":
        x = x.tolist()
    with pytest.raises(error, match=names):
        causal_conv1d(x, weight, bias, dilation=dilation)


def test_triton_rejects_float64(device):
    x, weight, bias = (t.double().to(device) for t in _good())
    with pytest.raises(TypeError, match="x"):
        causal_conv1d(x, weight, bias, impl="triton")


# ---------------------------------------------------------------------------------------------------------------
# Registration: opcheck and torch.compile
# ---------------------------------------------------------------------------------------------------------------
def test_opcheck(device):
    x = torch.randn(1, 3, 9, device=device, requires_grad=True)
    weight = torch.randn(4, 3, 2, device=device, requires_grad=True)
    bias = torch.randn(4, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.genkernels.causal_conv1d.default, (x, weight, bias, 3))
    grad_out = torch.randn(1, 4, 9, device=device)
    torch.library.opcheck(torch.ops.genkernels.causal_conv1d_backward.default,
                          (grad_out, x.detach(), weight.detach(), 3, False))


def test_compiles_with_fullgraph(device):
    def stacked(x, w1, w2):
        return causal_conv1d(torch.tanh(causal_conv1d(x, w1, None, dilation=1, impl="triton")), w2, None,
                             dilation=2, impl="triton").square().sum()

    x = torch.randn(2, 3, 21, device=device, requires_grad=True)
    w1 = torch.randn(4, 3, 2, device=device, requires_grad=True)
    w2 = torch.randn(3, 4, 3, device=device, requires_grad=True)
    compiled = torch.compile(stacked, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, w1, w2), (x, w1, w2))
    expected = torch.autograd.grad(stacked(x, w1, w2), (x, w1, w2))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wavenet_sized_shapes_on_gpu(dtype, device):
    x, weight, bias = _inputs(16, 64, 128, 16000, 2, dtype, device)
    _check_forward_and_gradients(x, weight, bias, 512)
