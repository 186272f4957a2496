"""Fused bias + activation (kernels/bias_act.py) against fp64 references: outputs, first- and second-order
gradients for x and bias, every activation, layouts, dtypes, extreme values and bad input."""
import math

import pytest
import torch
import torch.nn.functional as F
from reference_checks import ATOL_FLOOR, DTYPES, assert_close_to_reference, max_abs_error, random_tensor

from genkernels.kernels.bias_act import ACTIVATIONS, bias_act, bias_act_reference

ACTS = tuple(ACTIVATIONS)


def _first_and_second_order(fn, x, bias, weight, direction_x, direction_bias):
    """``y``, the gradients of ``L = sum(y * weight)`` in ``x``, ``bias`` (and ``weight``) with a graph, and the
    gradients of ``R = sum(dL/dx * direction_x) + sum(dL/dbias * direction_bias)`` in ``x``, ``bias`` and
    ``weight`` (the R1-penalty pattern: a loss on an input gradient, differentiated again)."""
    x = x.detach().requires_grad_()
    leaves = [x]
    if bias is not None:
        bias = bias.detach().requires_grad_()
        leaves.append(bias)
    weight = weight.detach().requires_grad_()
    y = fn(x, bias)
    first = torch.autograd.grad((y * weight).sum(), leaves, create_graph=True)
    penalty = (first[0] * direction_x).sum()
    if bias is not None:
        penalty = penalty + (first[1] * direction_bias).sum()
    second = torch.autograd.grad(penalty, leaves + [weight], allow_unused=True, materialize_grads=True)
    return [y.detach()] + [g.detach() for g in first] + [g.detach() for g in second]


NAMES = ("y", "dx", "dbias", "d2x", "d2bias", "d2weight")


def _check(x, bias=None, dim=1, act="lrelu", second_order=True, **options):
    dtype = x.dtype
    weight = random_tensor(x.shape, dtype, 11, x.device)
    direction_x = random_tensor(x.shape, dtype, 12, x.device)
    direction_bias = random_tensor(bias.shape, dtype, 13, x.device) if bias is not None else None

    def run(impl):
        return lambda xx, bb: bias_act(xx, bb, dim=dim, act=act, impl=impl, **options)

    def reference(xx, bb):
        return bias_act_reference(xx, bb, dim % x.dim(), act, options.get("alpha"), options.get("gain"),
                                  options.get("clamp"))

    kernel = _first_and_second_order(run("triton"), x, bias, weight, direction_x, direction_bias)
    eager = _first_and_second_order(run("eager"), x, bias, weight, direction_x, direction_bias)
    fp64 = _first_and_second_order(reference, x.double(), None if bias is None else bias.double(),
                                   weight.double(), direction_x.double(),
                                   None if bias is None else direction_bias.double())
    names = [n for n in NAMES if bias is not None or "bias" not in n]
    count = len(names) if second_order else 1 + (2 if bias is not None else 1)
    for name, k, e, r in list(zip(names, kernel, eager, fp64))[:count]:
        if name.startswith("d2") and ACTIVATIONS[act].ref == "y" and dtype != torch.float32:
            _assert_second_order_from_rounded_output(k, r, e, f"{act} {name}")
        else:
            assert_close_to_reference(k, r, e, f"{act} {name}")
    return kernel


def _assert_second_order_from_rounded_output(kernel, reference, eager, name):
    """The tolerance rule with twice the floor: activations whose backward reads ``y`` (as StyleGAN2's) see the
    16-bit output, rounded once more than eager's fp32 intermediates, in both ``act'(y)`` and ``act''(y)``, and
    the second-order result multiplies the two (about 2-3 ulps of the output dtype in all)."""
    scale = max(1.0, reference.abs().max().item())
    bound = 2 * max_abs_error(eager, reference) + 2 * ATOL_FLOOR[eager.dtype] * scale
    assert max_abs_error(kernel, reference) <= bound, f"{name}: {max_abs_error(kernel, reference):.3e} > {bound:.3e}"


# ---------------------------------------------------------------------------------------------------------------
# The reference and the activation table
# ---------------------------------------------------------------------------------------------------------------
def _by_hand(act, s, alpha):
    """Each activation from its textbook formula (fp64)."""
    return {
        "linear": lambda: s,
        "relu": lambda: torch.where(s > 0, s, 0.0),
        "lrelu": lambda: torch.where(s > 0, s, alpha * s),
        "tanh": lambda: (torch.exp(2 * s) - 1) / (torch.exp(2 * s) + 1),
        "sigmoid": lambda: 1 / (1 + torch.exp(-s)),
        "silu": lambda: s / (1 + torch.exp(-s)),
        "elu": lambda: torch.where(s > 0, s, alpha * (torch.exp(s) - 1)),
        "softplus": lambda: torch.log(1 + torch.exp(s)),
        "gelu": lambda: s * s.clone().apply_(lambda v: 0.5 * (1 + math.erf(v / math.sqrt(2)))),
        "gelu_tanh": lambda: 0.5 * s * (1 + torch.tanh(math.sqrt(2 / math.pi) * (s + 0.044715 * s**3))),
        "selu": lambda: 1.0507009873554805 * torch.where(s > 0, s, 1.6732632423543772 * (torch.exp(s) - 1)),
        "swish": lambda: s / (1 + torch.exp(-s)),
    }[act]()


# StyleGAN2's activation table (torch_utils/ops/bias_act.py): default gains, and what each backward reads
STYLEGAN2_DEFAULT_GAINS = {"linear": 1, "relu": math.sqrt(2), "lrelu": math.sqrt(2), "tanh": 1, "sigmoid": 1,
                           "elu": 1, "selu": 1, "softplus": 1, "swish": math.sqrt(2)}


@pytest.mark.parametrize("act", ACTS)
def test_reference_matches_textbook_formulas_and_default_gains(act):
    x = random_tensor((3, 4, 5), torch.float64, 0, scale=3.0)
    bias = random_tensor((4,), torch.float64, 1)
    spec = ACTIVATIONS[act]
    expected_gain = STYLEGAN2_DEFAULT_GAINS.get(act, 1.0)
    assert spec.default_gain == expected_gain
    assert spec.default_alpha == {"lrelu": 0.2, "elu": 1.0}.get(act, 0.0)
    s = x + bias.reshape(1, 4, 1)
    expected = _by_hand(act, s, spec.default_alpha) * expected_gain
    torch.testing.assert_close(bias_act_reference(x, bias, 1, act), expected, rtol=1e-12, atol=1e-12)
    clamped = bias_act_reference(x, bias, 1, act, alpha=0.3 if act in ("lrelu", "elu") else None, gain=0.7,
                                 clamp=0.5)
    torch.testing.assert_close(clamped, (_by_hand(act, s, 0.3) * 0.7).clamp(-0.5, 0.5), rtol=1e-12, atol=1e-12)


def test_activation_table_records_what_the_backward_reads():
    # relu, lrelu, tanh, sigmoid, elu and softplus have derivatives that are functions of their output
    assert {name for name, spec in ACTIVATIONS.items() if spec.ref == "y"} == {
        "relu", "lrelu", "tanh", "sigmoid", "elu", "selu", "softplus"}
    assert set(STYLEGAN2_DEFAULT_GAINS) < set(ACTIVATIONS)
    assert {name for name, spec in ACTIVATIONS.items() if not spec.has_second_grad} == {"linear", "relu", "lrelu"}


@pytest.mark.parametrize("act", ACTS)
def test_reference_gradcheck_and_gradgradcheck(act):
    x = random_tensor((2, 3, 4), torch.float64, 2, scale=2.0).requires_grad_()
    bias = random_tensor((3,), torch.float64, 3).requires_grad_()

    def fn(xx, bb):
        return bias_act_reference(xx, bb, 1, act, None, 0.9, None)

    assert torch.autograd.gradcheck(fn, (x, bias))
    assert torch.autograd.gradgradcheck(fn, (x, bias))


@pytest.mark.parametrize("act", ["tanh", "elu", "softplus", "silu"])
def test_saved_tensors_follow_the_table(act, device):
    """Activations whose backward reads ``y`` keep the output alive, not the input."""
    x = random_tensor((2, 3, 40), torch.float32, 0, device).requires_grad_()
    bias = random_tensor((3,), torch.float32, 1, device).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = bias_act(x, bias, act=act, impl="triton")
    full_size = [t for t in saved if t.shape == x.shape]
    assert len(full_size) == 1
    if ACTIVATIONS[act].ref == "y":
        assert full_size[0].data_ptr() == y.data_ptr()
    else:
        assert full_size[0].data_ptr() == x.data_ptr()


# ---------------------------------------------------------------------------------------------------------------
# Kernel against the fp64 reference: outputs, first- and second-order gradients
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("clamp", [None, 0.8])
def test_every_activation_fp32(act, clamp, device):
    x = random_tensor((3, 5, 7, 4), torch.float32, 0, device, scale=2.0)
    bias = random_tensor((5,), torch.float32, 1, device)
    options = {"clamp": clamp, "gain": 1.3 if clamp is None else None}
    if act in ("lrelu", "elu"):
        options["alpha"] = 0.3
    _check(x, bias, act=act, **options)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ["lrelu", "tanh", "gelu", "gelu_tanh", "selu", "softplus"])
def test_half_precision(dtype, act, device):
    x = random_tensor((2, 6, 5, 3), dtype, 0, device, scale=2.0)
    bias = random_tensor((6,), dtype, 1, device)
    _check(x, bias, act=act)


# clamps that round DOWN in the dtype (0.7 rounds up in fp16, where a stored output can never sit below it)
@pytest.mark.parametrize("dtype,clamp", [(torch.bfloat16, 0.7), (torch.bfloat16, 0.6998), (torch.float16, 0.6998)])
@pytest.mark.parametrize("act", [name for name, spec in ACTIVATIONS.items() if spec.ref == "y"])
def test_output_stored_at_the_rounded_clamp_counts_as_clamped(dtype, act, clamp, device):
    """The backwards that read ``y`` see the clamp as stored in y's dtype: 0.7 is 0.69921875 in bf16, below the
    fp32 clamp, and a stored output equal to it is clamped (zero gradient, as eager and the fp64 reference
    give), not passed through (the property suite's case: bf16 x = 1.5391, elu, clamp 0.7 gave dx = 1.539)."""
    stored = torch.tensor(clamp, dtype=dtype).item()
    assert stored < clamp, "the case needs a clamp that rounds down in this dtype"
    x = torch.tensor([1.5391, 3.0, 2.0, 0.25, -0.3, 0.1, 5.0], dtype=dtype, device=device)
    kernel = _check(x, None, dim=0, act=act, gain=1.0, clamp=clamp)
    y, dx = kernel[0], kernel[1]
    saturated = y.float().abs() == stored
    assert saturated.any(), (act, y)
    assert (dx[saturated] == 0).all(), (act, y, dx)
    assert (kernel[2][saturated] == 0).all(), (act, y, kernel[2])  # the second order reads the same mask


@pytest.mark.parametrize("dim", [0, 2, -1])
@pytest.mark.parametrize("act", ["relu", "sigmoid", "silu"])
def test_bias_along_other_dims(dim, act, device):
    x = random_tensor((4, 3, 5), torch.float32, 0, device)
    bias = random_tensor((x.shape[dim],), torch.float32, 1, device)
    _check(x, bias, dim=dim, act=act)


@pytest.mark.parametrize("act", ["linear", "elu"])
def test_without_bias(act, device):
    _check(random_tensor((3, 17), torch.float32, 0, device, scale=2.0), act=act, clamp=1.0)


LAYOUTS = {
    "channels_last": lambda x: x.contiguous(memory_format=torch.channels_last),
    "transposed_hw": lambda x: x.transpose(-1, -2).contiguous().transpose(-1, -2),
    "channel_slice": lambda x: torch.cat([x, x], dim=1)[:, ::2],
    "size_one": lambda x: x[:1, :, :1, :1].contiguous(),
    # not dense: copied once into a contiguous layout
    "expanded_channels": lambda x: x[:, :1].expand(x.shape),
    "expanded_width": lambda x: x[..., :1].expand(x.shape),
    "sliced_width": lambda x: torch.cat([x, x], dim=-1)[..., 1::2],
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("act", ["lrelu", "gelu"])
def test_layouts(layout, act, device):
    x = LAYOUTS[layout](random_tensor((2, 5, 9, 7), torch.float32, 0, device))
    bias = random_tensor((5,), torch.float32, 1, device)
    y = _check(x, bias, act=act)[0]
    if layout in ("channel_slice", "expanded_channels", "expanded_width", "sliced_width"):
        assert y.is_contiguous()  # a view with gaps or repeats is copied once into a dense layout
    else:
        # dense layouts, channels_last included, are kept (strides of size-1 dims carry no layout)
        assert all(sy == sx for sy, sx, n in zip(y.stride(), x.stride(), x.shape) if n > 1)


def test_gradient_in_another_layout_than_the_output(device):
    x = random_tensor((2, 5, 9, 7), torch.float32, 0, device).contiguous(memory_format=torch.channels_last)
    bias = random_tensor((5,), torch.float32, 1, device)
    grad_y = random_tensor(x.shape, torch.float32, 2, device)  # contiguous, unlike y
    grads = []
    for impl in ("triton", "eager"):
        xx, bb = x.clone().requires_grad_(), bias.clone().requires_grad_()
        grads.append(torch.autograd.grad(bias_act(xx, bb, act="tanh", impl=impl), [xx, bb], grad_y))
    for kernel, eager in zip(*grads):
        torch.testing.assert_close(kernel, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act", ACTS)
def test_extreme_values(act, device):
    values = torch.tensor([-1e30, -1e4, -100.0, -30.0, -21.0, -1e-3, 0.0, 1e-3, 19.0, 21.0, 30.0, 100.0, 1e4,
                           3e37], device=device)
    x = values.reshape(1, 1, -1).repeat(2, 2, 1)
    bias = torch.tensor([0.0, 0.5], device=device)
    kernel = _first_and_second_order(lambda xx, bb: bias_act(xx, bb, act=act, gain=1.0, impl="triton"), x, bias,
                                     torch.ones_like(x), torch.ones_like(x), torch.ones_like(bias))
    reference = _first_and_second_order(lambda xx, bb: bias_act_reference(xx, bb, 1, act, None, 1.0, None),
                                        x.double(), bias.double(), torch.ones_like(x).double(),
                                        torch.ones_like(x).double(), torch.ones_like(bias).double())
    for name, k, r in zip(NAMES, kernel, reference):
        finite = torch.isfinite(r) & (r.abs() < torch.finfo(torch.float32).max)
        assert torch.isfinite(k[finite]).all(), (act, name, k, r)
        # elementwise terms to 1e-5 relative; bias gradients sum terms of very different sizes
        error = (k.double() - r)[finite].abs()
        tolerance = 1e-5 * r[finite].abs() + (1e-5 * r.abs().max() if "bias" in name else 1e-6)
        assert (error <= tolerance).all(), (act, name, k, r)


NAN, INF = float("nan"), float("inf")
SPECIAL_VALUES = [NAN, INF, -INF, -1e30, -3.0, -0.0, 0.0, 0.7, 25.0, 1e30]


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("clamp", [None, 0.4])
def test_nan_and_inf_give_what_pytorch_gives(act, clamp, device):
    """NaN and +-Inf in x (and a NaN bias for a whole channel): the output and the first- and second-order
    gradients are NaN exactly where PyTorch's autograd of the reference (fp64) gives NaN, +-Inf where it gives
    +-Inf, and the same numbers elsewhere. relu/elu/clamp used to turn a NaN into a number (tl.maximum drops
    NaN), and the clamp's gradient used to hide a NaN derivative that PyTorch's keeps."""
    x = torch.tensor(SPECIAL_VALUES, device=device).reshape(1, 1, -1).repeat(2, 2, 1)
    bias = torch.tensor([0.0, NAN], device=device)
    ones = [torch.ones_like(x), torch.ones_like(x), torch.ones_like(bias)]
    kernel = _first_and_second_order(lambda xx, bb: bias_act(xx, bb, act=act, clamp=clamp, impl="triton"), x,
                                     bias, *ones)
    reference = _first_and_second_order(lambda xx, bb: bias_act_reference(xx, bb, 1, act, None, None, clamp),
                                        x.double(), bias.double(), *(t.double() for t in ones))
    undefined = torch.zeros_like(x, dtype=torch.bool)
    if act in ("elu", "selu"):
        # torch's elu backward at a NaN input is NaN in its vectorized loop and the gradient itself in its scalar
        # loop (and on CUDA): either is PyTorch's. The kernel gives NaN there.
        undefined = (x + bias.reshape(1, 2, 1)).isnan()
        assert kernel[1][undefined].isnan().all()
    for name, k, r in zip(NAMES, kernel, reference):
        if k.shape == undefined.shape:
            k, r = k[~undefined], r[~undefined]
        elif "bias" in name and act in ("elu", "selu"):
            continue  # sums over the undefined elements
        assert torch.equal(k.isnan(), r.isnan()), (act, name, k, r)
        fits = r.abs() <= torch.finfo(torch.float32).max  # fp64 values beyond fp32's range are inf in fp32
        assert torch.equal(k[~fits & ~r.isnan()], r[~fits & ~r.isnan()].float()), (act, name, k, r)
        finite = fits & ~r.isnan()
        if not finite.any():
            continue
        tolerance = 1e-5 * r[finite].abs() + (1e-5 * r[finite].abs().max() if "bias" in name else 1e-6)
        assert ((k[finite].double() - r[finite]).abs() <= tolerance).all(), (act, name, k, r)


def test_nan_stays_nan_through_relu_elu_and_clamp(device):
    """The cases of the issue, against plain PyTorch: a NaN is not turned into 0 or into -clamp."""
    x = torch.tensor([[NAN, -1.0, 2.0]], device=device)
    for act, torch_fn in (("relu", torch.relu), ("elu", F.elu), ("selu", F.selu)):
        y = bias_act(x, act=act, gain=1.0, clamp=1.5, impl="triton")
        torch.testing.assert_close(y, torch_fn(x).clamp(-1.5, 1.5), equal_nan=True)
        assert torch.isnan(y[0, 0])
    xx = x.clone().requires_grad_()
    for act, torch_fn in (("relu", torch.relu), ("tanh", torch.tanh), ("silu", F.silu)):
        (dx,) = torch.autograd.grad(bias_act(xx, act=act, gain=1.0, impl="triton").sum(), xx)
        (expected,) = torch.autograd.grad(torch_fn(xx.double()).sum(), xx)
        torch.testing.assert_close(dx, expected.float(), equal_nan=True)  # relu passes dy at NaN, as torch
    # an Inf upstream gradient where relu is flat: torch selects 0 (threshold_backward), never Inf * 0 = NaN
    dy = torch.full_like(x, float("inf"))
    for clamp in (None, 1.5):
        (dx,) = torch.autograd.grad(bias_act(xx, act="relu", gain=1.0, clamp=clamp, impl="triton"), xx, dy)
        (expected,) = torch.autograd.grad(torch.relu(xx) if clamp is None else torch.relu(xx).clamp(-1.5, 1.5),
                                          xx, dy)
        torch.testing.assert_close(dx, expected, equal_nan=True)


# ---------------------------------------------------------------------------------------------------------------
# The exact GELU, gelu_tanh, selu and swish against plain PyTorch
# ---------------------------------------------------------------------------------------------------------------
TORCH_ACTIVATIONS = {
    "gelu": lambda s: F.gelu(s),
    "gelu_tanh": lambda s: F.gelu(s, approximate="tanh"),
    "selu": F.selu,
    "swish": lambda s: torch.sigmoid(s) * s * math.sqrt(2),
    "silu": F.silu,
}


@pytest.mark.parametrize("act", TORCH_ACTIVATIONS)
def test_new_activations_match_plain_pytorch_to_second_order(act, device):
    """bias_act(x, b, act) in place of PyTorch's own function of x + b: outputs, gradients and the gradient of a
    gradient penalty (double backward) against PyTorch's autograd in fp64. ``gelu`` is the exact erf GELU
    (F.gelu's default); it used to be the tanh approximation, 5e-4 away."""
    x = random_tensor((3, 5, 13), torch.float32, 0, device, scale=3.0)
    bias = random_tensor((5,), torch.float32, 1, device)
    weight, direction_x = random_tensor(x.shape, torch.float32, 2, device), random_tensor(x.shape, torch.float32, 3,
                                                                                            device)
    direction_bias = random_tensor(bias.shape, torch.float32, 4, device)
    kernel = _first_and_second_order(lambda xx, bb: bias_act(xx, bb, act=act, impl="triton"), x, bias, weight,
                                     direction_x, direction_bias)
    plain = _first_and_second_order(lambda xx, bb: TORCH_ACTIVATIONS[act](xx + bb.reshape(1, -1, 1)),
                                    x.double(), bias.double(), weight.double(), direction_x.double(),
                                    direction_bias.double())
    for name, k, r in zip(NAMES, kernel, plain):
        scale = max(1.0, r.abs().max().item())
        assert max_abs_error(k, r) <= 2e-5 * scale, (act, name, max_abs_error(k, r))


def test_gelu_is_not_the_tanh_approximation(device):
    x = torch.linspace(-4, 4, 101, device=device).reshape(1, -1)
    exact = bias_act(x, act="gelu", impl="triton")
    approximate = bias_act(x, act="gelu_tanh", impl="triton")
    assert max_abs_error(exact, F.gelu(x.double())) < 1e-6
    assert max_abs_error(approximate, F.gelu(x.double(), approximate="tanh")) < 1e-6
    assert max_abs_error(exact, approximate) > 1e-4


def test_swish_is_silu_with_the_stylegan2_gain(device):
    x = random_tensor((2, 3, 7), torch.float32, 0, device)
    bias = random_tensor((3,), torch.float32, 1, device)
    swish = bias_act(x, bias, act="swish", impl="triton")
    torch.testing.assert_close(swish, bias_act(x, bias, act="silu", gain=math.sqrt(2), impl="triton"), rtol=0,
                               atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Strides: the 1-D bias read through its stride, x and dy of any strides
# ---------------------------------------------------------------------------------------------------------------
def _bias_views(channels, device):
    """Biases inside NaN-filled buffers: every other element (stride 2), and one element expanded (stride 0).
    Read as if contiguous, they pick up NaN (or read past the buffer)."""
    values = random_tensor((channels,), torch.float32, 1, device)
    strided = torch.full((2 * channels + 3,), NAN, device=device)[1::2][:channels]
    strided.copy_(values)
    single = torch.full((channels + 4,), NAN, device=device)
    single[2] = 0.4
    return {"strided": strided, "expanded": single[2:3].expand(channels)}


@pytest.mark.parametrize("view", ["strided", "expanded"])
@pytest.mark.parametrize("dim", [1, -1])
@pytest.mark.parametrize("act", ["lrelu", "gelu", "tanh"])
def test_bias_of_any_stride(view, dim, act, device):
    x = random_tensor((3, 5, 7) if dim == 1 else (3, 4, 5), torch.float32, 0, device)
    bias = _bias_views(5, device)[view]
    assert bias.stride(0) == (2 if view == "strided" else 0)
    _check(x, bias, dim=dim, act=act, clamp=0.9)


def test_the_sliced_bias_of_the_issue(device):
    x = random_tensor((2, 3, 4), torch.float32, 0, device)
    bias = random_tensor((6,), torch.float32, 1, device)[::2]
    for act in ("linear", "relu", "silu"):
        torch.testing.assert_close(bias_act(x, bias, act=act, impl="triton"),
                                   bias_act_reference(x, bias.contiguous(), 1, act), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("act", ["silu", "elu"])
def test_expanded_input_and_gradient(act, device):
    """x expanded with stride 0 (copied once), and the stride-0 gradient that ``y.sum()`` sends back."""
    x = random_tensor((3, 1, 7), torch.float32, 0, device).expand(3, 4, 7)
    bias = random_tensor((4,), torch.float32, 1, device)
    results = []
    for impl in ("triton", "eager"):
        xx, bb = x.detach().requires_grad_(), bias.clone().requires_grad_()
        y = bias_act(xx, bb, act=act, impl=impl)
        results.append((y,) + torch.autograd.grad(y.sum(), [xx, bb]))
    for kernel, eager in zip(*results):
        torch.testing.assert_close(kernel, eager, rtol=1e-5, atol=1e-6)


def test_one_dimensional_input_with_bias(device):
    """bias along the only dim: its gradient is dx itself (a sum over no dims, which torch's sum(dim=[]) would
    take over every dim)."""
    x = random_tensor((9,), torch.float32, 0, device)
    bias = random_tensor((9,), torch.float32, 1, device)
    _check(x, bias, dim=0, act="softplus")


@pytest.mark.parametrize("shape,dim", [((2, 0, 3), 1), ((0, 4), 1), ((3, 4, 0), 1), ((0,), 0)])
@pytest.mark.parametrize("impl", ["triton", "eager"])
def test_zero_size_dims(shape, dim, impl, device):
    x = torch.zeros(shape, device=device, requires_grad=True)
    bias = torch.zeros(shape[dim], device=device, requires_grad=True)
    y = bias_act(x, bias, dim=dim, act="gelu", clamp=1.0, impl=impl)
    assert y.shape == x.shape
    dx, dbias = torch.autograd.grad(y.sum(), [x, bias])
    assert dx.shape == x.shape and torch.equal(dbias, torch.zeros_like(bias))


@pytest.mark.parametrize("act", ["gelu", "tanh"])
def test_meta_inputs_give_shapes_through_the_fake(act):
    """A meta input under impl="auto" takes the registered op, whose fake gives the output's shape and layout
    (no value is read), forward and backward."""
    x = torch.empty(2, 5, 3, 4, device="meta").contiguous(memory_format=torch.channels_last).requires_grad_()
    bias = torch.empty(5, device="meta", requires_grad=True)
    y = bias_act(x, bias, act=act, clamp=1.0)
    assert y.device.type == "meta" and y.shape == x.shape and y.stride() == x.stride()
    dx, dbias = torch.autograd.grad(y.sum(), [x, bias], create_graph=True)
    assert dx.shape == x.shape and dbias.shape == bias.shape
    (d2x,) = torch.autograd.grad(dx.sum(), [x])
    assert d2x.shape == x.shape


@pytest.mark.parametrize("impl", ["triton", "eager"])
def test_empty_input(impl, device):
    x = torch.empty(0, 3, 4, device=device, requires_grad=True)
    bias = torch.zeros(3, device=device, requires_grad=True)
    y = bias_act(x, bias, act="silu", impl=impl)
    assert y.shape == x.shape
    dx, dbias = torch.autograd.grad(y.sum(), [x, bias])
    assert dx.shape == x.shape and torch.equal(dbias, torch.zeros_like(bias))


def test_inputs_inside_larger_buffers_are_read_only_in_bounds(device):
    # Dense views into NaN-filled buffers (102 elements: the last block has masked lanes): a read outside a view
    # would turn results into NaN.
    buffer = torch.full((400,), float("nan"), device=device)
    x = buffer[100:202].view(2, 3, 17)
    x.copy_(random_tensor(x.shape, torch.float32, 0, device))
    bias = torch.full((8,), float("nan"), device=device)[2:5]
    bias.copy_(torch.tensor([0.1, -0.2, 0.3], device=device))
    grad_y = torch.full((400,), float("nan"), device=device)[7:109].view(2, 3, 17)
    grad_y.copy_(random_tensor(x.shape, torch.float32, 1, device))
    results = []
    for impl in ("triton", "eager"):
        xx, bb = x.clone().requires_grad_(), bias.clone().requires_grad_()
        with torch.no_grad():
            y = bias_act(x, bias, act="silu", impl=impl)
        results.append((y,) + torch.autograd.grad(bias_act(xx, bb, act="silu", impl=impl), [xx, bb], grad_y))
    for kernel, eager in zip(*results):
        assert torch.isfinite(kernel).all()
        torch.testing.assert_close(kernel, eager, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------------------------
def _op_inputs(device):
    x = random_tensor((2, 3, 5), torch.float32, 0, device)
    bias = random_tensor((3,), torch.float32, 1, device)
    return x, bias, torch.ones_like(x) * 0.3


@pytest.mark.parametrize("act, clamp", [("gelu", 0.5), ("tanh", None), ("gelu_tanh", None), ("swish", 1.0)])
def test_opcheck_forward(act, clamp, device):
    x, bias, _ = _op_inputs(device)
    torch.library.opcheck(torch.ops.genkernels.bias_act.default,
                          (x.requires_grad_(), bias.requires_grad_(), 1, act, 0.0, 1.0, clamp))


@pytest.mark.parametrize("act, ref", [("silu", "x"), ("elu", "y"), ("gelu", "x"), ("selu", "y")])
@pytest.mark.parametrize("mask_first", [True, False])
def test_opcheck_gradient_ops(act, ref, mask_first, device):
    x, bias, dy = _op_inputs(device)
    y = bias_act(x, bias, act=act, impl="triton")
    refs = (x, bias, None) if ref == "x" else (None, None, y)
    args = (1, act, 1.0, 1.0, 0.9, mask_first)
    torch.library.opcheck(torch.ops.genkernels.bias_act_grad.default,
                          (dy.requires_grad_(),) + tuple(t if t is None else t.requires_grad_() for t in refs) + args)
    plain = tuple(t if t is None else t.detach() for t in refs)  # the second derivative is not differentiable
    torch.library.opcheck(torch.ops.genkernels.bias_act_grad2.default, (dy.detach() * 2, dy.detach()) + plain + args)


def test_compiles_with_fullgraph(device):
    def layer(x, bias):
        return bias_act(x * 2, bias, act="lrelu", clamp=3.0, impl="triton").square().sum()

    x, bias, _ = _op_inputs(device)
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    results = []
    for fn in (compiled, layer):
        xx, bb = x.clone().requires_grad_(), bias.clone().requires_grad_()
        loss = fn(xx, bb)
        results.append((loss,) + torch.autograd.grad(loss, [xx, bb]))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one test per rejection, each naming the argument
# ---------------------------------------------------------------------------------------------------------------
def _good(device):
    return random_tensor((2, 3, 4), torch.float32, 0, device), random_tensor((3,), torch.float32, 1, device)


def test_rejects_bias_of_wrong_length_or_rank(device):
    x, bias = _good(device)
    with pytest.raises(ValueError, match=r"bias must be 1-D of length x.shape\[1\] = 3; got shape \[4\]"):
        bias_act(x, torch.zeros(4, device=device))
    with pytest.raises(ValueError, match=r"bias must be 1-D.*shape \[3, 1\]"):
        bias_act(x, bias[:, None])


def test_rejects_bad_dim(device):
    x, bias = _good(device)
    with pytest.raises(ValueError, match=r"dim=3 is out of range for x with shape \[2, 3, 4\]"):
        bias_act(x, bias, dim=3)
    with pytest.raises(TypeError, match="dim must be an int"):
        bias_act(x, bias, dim=1.0)


def test_rejects_bad_dtypes(device):
    x, bias = _good(device)
    with pytest.raises(TypeError, match="x must have a floating-point dtype.*torch.int64"):
        bias_act(x.long(), bias)
    with pytest.raises(TypeError, match="bias must have the dtype of x"):
        bias_act(x, bias.half())
    with pytest.raises(TypeError, match="bias must have a floating-point dtype"):
        bias_act(x, bias.int())


def test_fp64_runs_the_reference_and_triton_refuses_it(device):
    """The op contract's fp64 policy: accepted under impl="auto"/"eager" (the reference in fp64, differentiable
    twice), refused by impl="triton" with the reason named."""
    x, bias = (t.double() for t in _good(device))
    y = bias_act(x, bias, act="gelu", clamp=0.5)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, F.gelu(x + bias.reshape(1, 3, 1)).clamp(-0.5, 0.5), rtol=1e-12, atol=1e-12)
    xx, bb = x.clone().requires_grad_(), bias.clone().requires_grad_()
    assert torch.autograd.gradgradcheck(lambda a, b: bias_act(a, b, act="selu", gain=0.8), (xx, bb))
    with pytest.raises(ValueError, match="impl='triton' cannot run.*x is torch.float64"):
        bias_act(x, bias, impl="triton")


def test_rejects_tensors_on_different_devices(device):
    x, bias = _good(device)
    with pytest.raises(ValueError, match="one device.*bias on meta"):
        bias_act(x, bias.to("meta"))


def test_rejects_unknown_activation(device):
    x, bias = _good(device)
    with pytest.raises(ValueError, match="act='mish' is not supported; expected one of 'linear'"):
        bias_act(x, bias, act="mish")
    with pytest.raises(ValueError, match="act=None is not supported"):
        bias_act(x, bias, act=None)


def test_rejects_negative_clamp(device):
    x, bias = _good(device)
    with pytest.raises(ValueError, match=r"clamp=-1.0 is out of range"):
        bias_act(x, bias, clamp=-1.0)


def test_rejects_bad_alpha_and_gain(device):
    x, bias = _good(device)
    with pytest.raises(ValueError, match="alpha=-0.1 must be >= 0 for act='lrelu'"):
        bias_act(x, bias, act="lrelu", alpha=-0.1)
    with pytest.raises(ValueError, match="alpha=0.0 must be > 0 for act='elu'"):
        bias_act(x, bias, act="elu", alpha=0.0)
    with pytest.raises(TypeError, match="gain must be a real number"):
        bias_act(x, bias, gain="2")
    with pytest.raises(ValueError, match="gain=nan is out of range"):
        bias_act(x, bias, gain=float("nan"))
    with pytest.raises(ValueError, match="alpha=inf is out of range"):
        bias_act(x, bias, act="elu", alpha=float("inf"))
    with pytest.raises(TypeError, match="clamp must be a real number"):
        bias_act(x, bias, clamp=torch.tensor(1.0))


def test_rejects_unknown_impl(device):
    x, bias = _good(device)
    with pytest.raises(ValueError, match="impl='cuda'"):
        bias_act(x, bias, impl="cuda")


# ---------------------------------------------------------------------------------------------------------------
# GPU sizes
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["lrelu", "silu"])
def test_large_shapes_on_gpu(dtype, act):
    x = random_tensor((64, 512, 32, 32), dtype, 0, "cuda").contiguous(memory_format=torch.channels_last)
    _check(x, random_tensor((512,), dtype, 1, "cuda"), act=act, clamp=256.0)


@pytest.mark.gpu
def test_more_than_2_31_elements_on_gpu():
    x = torch.randn(2, 2**30 + 3, device="cuda")
    bias = torch.randn(2 ** 30 + 3, device="cuda")
    y = bias_act(x, bias, dim=1, act="lrelu", impl="triton")
    tail = slice(2**30 - 5, None)
    expected = bias_act(x[:, tail], bias[tail], dim=1, act="lrelu", impl="eager")
    torch.testing.assert_close(y[:, tail], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("programs", [2, 5])
def test_split_over_programs_keeps_outputs_and_gradients(programs, device):
    """Several programs, each walking a span of several tiles (forced: in the interpreter one program walks the
    tensor): the forward and both gradients (channels_last, a bias along dim 1) are bitwise those of one program
    and match the fp64 reference."""
    from genkernels.kernels.launch import force_launch_settings

    x = random_tensor((2, 5, 11, 13), torch.float32, 0, device).contiguous(memory_format=torch.channels_last)
    bias = random_tensor((5,), torch.float32, 1, device)
    results = []
    for forced in (None, programs):
        settings = {} if forced is None else {"programs_per_sample": forced}
        xs, bs = x.clone().requires_grad_(True), bias.clone().requires_grad_(True)
        with force_launch_settings("bias_act", **settings):
            y = bias_act(xs, bs, act="silu", clamp=0.8, impl="triton")
            grads = torch.autograd.grad((y * y).sum(), (xs, bs))
        results.append((y, *grads))
    for a, b in zip(results[1], results[0]):
        assert torch.equal(a, b)
    reference = bias_act_reference(x.double(), bias.double(), act="silu", clamp=0.8)
    torch.testing.assert_close(results[1][0].double(), reference, rtol=1e-5, atol=1e-6)
