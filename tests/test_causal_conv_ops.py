"""Dilated causal 1-D convolution (kernels/causal_conv.py) against fp64 references, forward and gradients."""
import pytest
import torch
from reference_checks import LaunchRecorder, assert_close_to_reference, random_tensor

import genkernels.kernels.causal_conv as causal_conv_module
from genkernels.kernels.causal_conv import causal_conv1d, causal_conv1d_reference
from genkernels.kernels.launch import force_launch_settings


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


def _check_split_weight_gradient(splits: int, ksize: int, dilation: int, length: int, atol: float, device):
    """The weight and bias gradients of ``splits`` forced splits of the (sample, time block) reduction against the
    fp64 reference's autograd (a test knob outside the op's schema: the interpreter does not split by default)."""
    grad_out = random_tensor((3, 4, length), torch.float32, 0, device)
    x = random_tensor((3, 5, length), torch.float32, 1, device)
    with force_launch_settings("causal_conv1d", weight_grad_splits=splits):
        grad_w, grad_b = causal_conv_module.launch_conv_weight_grad(grad_out, x, ksize, dilation, True)
    xd = x.double().requires_grad_()
    weight = torch.zeros(4, 5, ksize, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    out = causal_conv1d_reference(xd, weight, bias, dilation)
    expected_w, expected_b = torch.autograd.grad(out, (weight, bias), grad_out.double())
    torch.testing.assert_close(grad_w.double(), expected_w, rtol=1e-5, atol=atol)
    torch.testing.assert_close(grad_b.double(), expected_b, rtol=1e-5, atol=atol)


def test_weight_gradient_split_over_programs(device):
    """The GPU launcher splits the (batch, time) reduction of the weight gradient over programs."""
    _check_split_weight_gradient(4, 2, 3, 200, 1e-4, device)


def test_empty_batch_and_empty_time(device):
    for shape in ((0, 3, 10), (2, 3, 0)):
        x = torch.zeros(shape, device=device, requires_grad=True)
        weight = torch.randn(4, 3, 2, device=device, requires_grad=True)
        out = causal_conv1d(x, weight, None, dilation=2, impl="triton")
        assert out.shape == (shape[0], 4, shape[2])
        grad_x, grad_w = torch.autograd.grad(out, (x, weight), torch.ones_like(out))
        assert grad_x.shape == x.shape and torch.equal(grad_w, torch.zeros_like(grad_w))


def _tap_sum(x, weight, bias, dilation):
    """The definition in fp64, tap by tap: a tap shifted by ``s >= length`` reads only zero padding."""
    batch, _, length = x.shape
    c_out, _, ksize = weight.shape
    x, weight = x.double(), weight.double()
    expected = torch.zeros((batch, c_out, length), dtype=torch.float64, device=x.device)
    if bias is not None:
        expected += bias.double()[None, :, None]
    for j in range(ksize):
        shift = (ksize - 1 - j) * dilation
        shifted = torch.zeros_like(x)
        if shift < length:
            shifted[:, :, shift:] = x[:, :, :length - shift]
        expected += torch.einsum("oi,bit->bot", weight[:, :, j], shifted)
    return expected


def test_reference_equals_tap_sum_definition():
    """The reference (F.conv1d on a left-padded input) against the definition, tap by tap in fp64."""
    x = random_tensor((2, 3, 30), torch.float64, 0)
    weight = random_tensor((4, 3, 3), torch.float64, 1)
    bias = random_tensor((4,), torch.float64, 2)
    for dilation in (5, 14, 15, 29, 30, 31, 2**40):
        torch.testing.assert_close(causal_conv1d_reference(x, weight, bias, dilation),
                                   _tap_sum(x, weight, bias, dilation))


@pytest.mark.parametrize("clamp", [True, False], ids=["launcher", "kernel_int64"])
@pytest.mark.parametrize("ksize,dilation", [(3, 2**31 - 1), (3, 2**30), (5, 2**30 + 1), (2, 2**31), (3, 2**45)])
def test_huge_dilation_reads_only_zero_padding(ksize, dilation, clamp, device):
    """Regression: tap shifts were int32, so (k - 1 - j) * dilation wrapped for dilations from 2**30 and the
    kernel read the future (3 taps, dilation 2**31 - 1: the shift 2**32 - 2 wrapped to -2). At a tiny length
    only the last tap sees the sequence. Checked through the launcher (which clamps the dilation to the length)
    and with the clamp off, so that the kernels' own int64 shift arithmetic is what keeps the result right."""
    x, weight, bias = _inputs(2, 3, 4, 6, ksize, torch.float32, device)
    with force_launch_settings("causal_conv1d", clamp_dilation=clamp):
        _check_forward_and_gradients(x, weight, bias, dilation)
        out = causal_conv1d(x, weight, bias, dilation=dilation, impl="triton")
    expected = _tap_sum(x, weight, bias, dilation)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    last_tap_only = torch.einsum("oi,bit->bot", weight[:, :, -1].double(), x.double()) + bias.double()[None, :, None]
    torch.testing.assert_close(expected, last_tap_only)


@pytest.mark.parametrize("impl", ["triton", "eager"])
@pytest.mark.parametrize("batch,c_in,c_out,length", [(2, 0, 4, 7), (2, 3, 0, 7), (2, 3, 4, 0), (0, 3, 4, 7),
                                                     (0, 0, 0, 0)])
def test_zero_size_dims(batch, c_in, c_out, length, impl, device):
    """Regression (eager): zero in-channels gave [2, 0, 7] instead of the bias [2, 4, 7]; zero out-channels or
    length raised. Both impls give the math's shape and values (the bias where the reduction is empty) and its
    gradients (the bias gradient sums the output gradient; x and weight get zeros)."""
    x = random_tensor((batch, c_in, length), torch.float32, 0, device).requires_grad_()
    weight = random_tensor((c_out, c_in, 2), torch.float32, 1, device).requires_grad_()
    bias = random_tensor((c_out,), torch.float32, 2, device).requires_grad_()
    out = causal_conv1d(x, weight, bias, dilation=3, impl=impl)
    assert out.shape == (batch, c_out, length) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _tap_sum(x.detach(), weight.detach(), bias.detach(), 3))
    grad_out = random_tensor(out.shape, torch.float32, 3, device)
    grad_x, grad_w, grad_b = torch.autograd.grad(out, (x, weight, bias), grad_out)
    assert grad_x.shape == x.shape and grad_w.shape == weight.shape
    if c_in == 0 or batch * length == 0 or c_out == 0:
        assert torch.equal(grad_x, torch.zeros_like(x)) and torch.equal(grad_w, torch.zeros_like(weight))
    torch.testing.assert_close(grad_b, grad_out.sum((0, 2)))


def test_any_strides_expanded_and_sliced(device):
    """Stride-0 (expanded) x, weight and bias, and a bias sliced from a wider one, forward and gradients."""
    x = random_tensor((1, 3, 13), torch.float32, 0, device).expand(2, 3, 13)
    weight = random_tensor((1, 3, 2), torch.float32, 1, device).expand(4, 3, 2)
    bias = random_tensor((1,), torch.float32, 2, device).expand(4)
    assert 0 in x.stride() and 0 in weight.stride() and bias.stride() == (0,)
    _check_forward_and_gradients(x, weight, bias, 2)
    sliced_bias = random_tensor((12,), torch.float32, 2, device)[1::3]
    channels_last_like = random_tensor((2, 13, 3), torch.float32, 0, device).permute(0, 2, 1)
    _check_forward_and_gradients(channels_last_like, weight.contiguous(), sliced_bias, 5)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN matmuls
def test_nan_and_inf_propagate_as_in_the_padded_conv(device):
    """NaN in x reaches exactly the outputs whose taps read it; an Inf weight multiplies the zero padding too,
    so (as in F.conv1d of the padded input) its output channel is NaN wherever padding is read."""
    x, weight, bias = _inputs(1, 3, 4, 20, 3, torch.float32, device)
    x[0, 1, 7] = float("nan")
    weight[2, 0, 0] = float("inf")
    out = {impl: causal_conv1d(x, weight, bias, dilation=4, impl=impl) for impl in ("triton", "eager")}
    padded = torch.nn.functional.conv1d(torch.nn.functional.pad(x.double(), (8, 0)), weight.double(),
                                        bias.double(), dilation=4)
    for got in out.values():
        assert torch.equal(torch.isnan(got), torch.isnan(padded))
        assert torch.equal(torch.isinf(got), torch.isinf(padded))
        finite = torch.isfinite(padded)
        torch.testing.assert_close(got[finite].double(), padded[finite], rtol=1e-5, atol=1e-5)
    assert torch.isnan(padded[0, 0, 7]) and not torch.isnan(padded[0, 0, 6])  # the NaN reaches t = 7, 11, 15


def test_meta_tensors_give_shapes_through_the_fake(device):
    x = torch.empty(2, 3, 11, device="meta", requires_grad=True)
    weight = torch.empty(5, 3, 2, device="meta", requires_grad=True)
    bias = torch.empty(5, device="meta", requires_grad=True)
    for impl in ("auto", "triton"):
        out = causal_conv1d(x, weight, bias, dilation=2, impl=impl)
        assert out.shape == (2, 5, 11) and out.device.type == "meta"
        grads = torch.autograd.grad(out.sum(), (x, weight, bias))
        assert [g.shape for g in grads] == [x.shape, weight.shape, bias.shape]


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


def test_float64_runs_the_reference_and_triton_says_why_not(device):
    """fp64 is accepted: impl="auto" runs the eager reference in fp64; impl="triton" raises ValueError naming the
    dtype (runtime.choose_impl), never a silent fallback."""
    x, weight, bias = (t.double().to(device) for t in _good())
    out = causal_conv1d(x, weight, bias, dilation=2)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, causal_conv1d_reference(x, weight, bias, 2), rtol=0, atol=0)
    with pytest.raises(ValueError, match="x is torch.float64"):
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

    compiled = torch.compile(stacked, fullgraph=True, dynamic=True, backend="aot_eager")
    for length in (21, 10):
        x = torch.randn(2, 3, length, device=device, requires_grad=True)
        w1 = torch.randn(4, 3, 2, device=device, requires_grad=True)
        w2 = torch.randn(3, 4, 3, device=device, requires_grad=True)
        got = torch.autograd.grad(compiled(x, w1, w2), (x, w1, w2))
        expected = torch.autograd.grad(stacked(x, w1, w2), (x, w1, w2))
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_eager_reference_compiles_with_dynamic_shapes(device):
    """The eager path (its zero-size and dilation-clamp branches are on shapes only) under
    torch.compile(fullgraph=True, dynamic=True)."""
    compiled = torch.compile(lambda x, w, b: causal_conv1d(x, w, b, dilation=4, impl="eager"), fullgraph=True,
                             dynamic=True, backend="aot_eager")
    for length in (9, 3, 0):
        x, weight, bias = _inputs(2, 3, 4, length, 3, torch.float32, device)
        torch.testing.assert_close(compiled(x, weight, bias), causal_conv1d_reference(x, weight, bias, 4))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wavenet_sized_shapes_on_gpu(dtype, device):
    x, weight, bias = _inputs(16, 64, 128, 16000, 2, dtype, device)
    _check_forward_and_gradients(x, weight, bias, 512)


@pytest.mark.gpu
def test_fp32_follows_cudnn_allow_tf32(device, monkeypatch):
    """fp32 tiles multiply in TF32 when torch.backends.cudnn.allow_tf32 is set (PyTorch's default for its own fp32
    convolutions, read once per call) and in exact fp32 when it is off; both within the tolerance rule of cuDNN
    under the same setting."""
    x, weight, bias = _inputs(4, 64, 64, 1000, 2, torch.float32, device)
    reference = causal_conv1d_reference(x.double(), weight.double(), bias.double(), 8)
    # TF32 keeps 10 of fp32's 23 mantissa bits: each product is off by less than 2**-9 of its magnitude.
    tf32_bound = 2.0**-9 * causal_conv1d_reference(x.double().abs(), weight.double().abs(), None, 8) + 1e-4
    errors = {}
    for allow in (False, True):
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow)
        out = causal_conv1d(x, weight, bias, dilation=8, impl="triton")
        error = (out.double() - reference).abs()
        if allow:
            assert (error <= tf32_bound).all()
        else:
            cudnn = torch.nn.functional.conv1d(torch.nn.functional.pad(x, (8, 0)), weight, bias, dilation=8)
            assert_close_to_reference(out, reference, cudnn)
        errors[allow] = error.max().item()
    assert errors[True] > 4 * errors[False]


# ---------------------------------------------------------------------------------------------------------------
# Launch configuration (issue 12: compiled-code budgets), recorded from the launcher's real calls
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reverse", [False, True])
def test_weight_reaches_the_kernel_packed_with_the_reduction_axis_contiguous(reverse, device, monkeypatch):
    """The tile's reduction axis (input channels; output channels of the forward weight when reversed) is
    contiguous in the weight the kernel reads, so a row loads 16 bytes at a time (it had stride k: 2-byte loads)."""
    recorder = LaunchRecorder(causal_conv_module._causal_conv_kernel)
    monkeypatch.setattr(causal_conv_module, "_causal_conv_kernel", recorder)
    x, weight, bias = _inputs(2, 5, 7, 13, 3, torch.float32, device)
    if reverse:
        x = random_tensor((2, 7, 13), torch.float32, 4, device)
    out = causal_conv_module.launch_causal_conv(x, weight, None if reverse else bias, 2, reverse=reverse)
    (_, args, _), = recorder.calls
    packed = args[2]
    c_out, c_in = (5, 7) if reverse else (7, 5)
    assert packed.shape == (3, c_out, c_in) and packed.is_contiguous()
    w_so, w_si, w_sk = args[13:16]
    assert (w_so, w_si, w_sk) == (c_in, 1, c_out * c_in)
    if not reverse:
        expected = causal_conv1d_reference(x.double(), weight.double(), bias.double(), 2)
        assert_close_to_reference(out, expected, causal_conv1d_reference(x, weight, bias, 2), "output")


@pytest.mark.parametrize("dtype,block_ci", [(torch.float32, 32), (torch.bfloat16, 64), (torch.float16, 64)])
def test_fp32_tiles_reduce_over_32_channels(dtype, block_ci, device, monkeypatch):
    """fp32 tiles (TF32 operands, 4 bytes each) reduce over 32 input channels per dot (64 reached 255 registers
    and spilled); 16-bit tiles keep 64."""
    recorder = LaunchRecorder(causal_conv_module._causal_conv_kernel)
    monkeypatch.setattr(causal_conv_module, "_causal_conv_kernel", recorder)
    x, weight, bias = _inputs(1, 70, 67, 19, 2, dtype, device)
    causal_conv_module.launch_causal_conv(x, weight, bias, 3)
    (_, _, kwargs), = recorder.calls
    assert kwargs["BLOCK_CI"] == block_ci and kwargs["BLOCK_CO"] == 64


def test_fp32_many_channels_at_the_fp32_reduction_block(device):
    """Ragged channel counts past two 32-wide fp32 reduction blocks, forward and every gradient."""
    x, weight, bias = _inputs(1, 70, 33, 13, 2, torch.float32, device, seed=9)
    _check_forward_and_gradients(x, weight, bias, 2)


@pytest.mark.parametrize("tiles", [1, 2, 3, 4, 8, 24, 200])
def test_weight_gradient_splits_make_whole_waves(tiles):
    """The split count makes tiles * splits a whole number of SMs' worth of programs (the 1x1 projection's
    gradient was 0.8 waves), close to WEIGHT_GRAD_PROGRAMS_PER_SM per SM, and never exceeds the reduction steps."""
    device = torch.device("cpu")
    sm_count = causal_conv_module.launch.device_limits(device).sm_count
    splits = causal_conv_module.weight_grad_splits(device, tiles, 10**6)
    programs = tiles * splits
    if tiles < sm_count:
        assert programs % sm_count == 0
    assert programs <= causal_conv_module.WEIGHT_GRAD_PROGRAMS_PER_SM * sm_count or splits == 1
    assert causal_conv_module.weight_grad_splits(device, tiles, 3) <= 3


@pytest.mark.parametrize("splits", [1, 5, 7, 11])
def test_weight_gradient_any_split_count_walks_every_pair_once(splits, device):
    """Split counts that divide neither the batch nor the time-block count (and one above their product: empty
    splits) step the (sample, time block) pair with a carry instead of dividing; every pair is summed once
    (3 samples x 3 time blocks of 64)."""
    _check_split_weight_gradient(splits, 3, 2, 150, 1e-5, device)
