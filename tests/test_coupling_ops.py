"""Fused affine coupling (kernels/coupling.py) against fp64 references, autograd and torch.library checks."""
import pytest
import torch
from reference_checks import DTYPES, PER_SAMPLE_LAYOUTS, assert_close_to_reference, random_tensor

from genkernels.kernels import use_impl
from genkernels.kernels.coupling import SCALE_FNS, affine_coupling, affine_coupling_reference

DIRECTIONS = (False, True)


def _inputs(shape, dtype, device, seed=0, log_scale_range=1.0):
    x = random_tensor(shape, dtype, seed, device)
    log_scale = random_tensor(shape, dtype, seed + 1, device, scale=log_scale_range)
    shift = random_tensor(shape, dtype, seed + 2, device)
    return x, log_scale, shift


def _outputs_and_grads(x, log_scale, shift, grad_y, grad_logdet, impl, **options):
    """``(y, logdet, dx, dlog_scale, dshift)`` of ``affine_coupling`` for the given upstream gradients."""
    inputs = [t.detach().requires_grad_() for t in (x, log_scale, shift)]
    if impl == "reference":
        y, logdet = affine_coupling_reference(*inputs, **options)
    else:
        y, logdet = affine_coupling(*inputs, impl=impl, **options)
    loss = (y.to(grad_y.dtype) * grad_y).sum() + (logdet.to(grad_logdet.dtype) * grad_logdet).sum()
    grads = torch.autograd.grad(loss, inputs) if y.numel() else [torch.zeros_like(t) for t in inputs]
    return (y.detach(), logdet.detach(), *grads)


def _check_against_reference(x, log_scale, shift, scale_fn, reverse, seed=10):
    """Kernel and eager (same dtype) vs the fp64 reference: y, logdet and the three gradients."""
    grad_y = random_tensor(x.shape, torch.float64, seed, x.device)
    grad_logdet = random_tensor((x.shape[0],), torch.float64, seed + 1, x.device)
    options = dict(scale_fn=scale_fn, reverse=reverse)
    reference = _outputs_and_grads(x.double(), log_scale.double(), shift.double(), grad_y, grad_logdet,
                                   "reference", **options)
    kernel = _outputs_and_grads(x, log_scale, shift, grad_y, grad_logdet, "triton", **options)
    eager = _outputs_and_grads(x, log_scale, shift, grad_y, grad_logdet, "eager", **options)
    for name, k, r, e in zip(("y", "logdet", "grad_x", "grad_log_scale", "grad_shift"), kernel, reference, eager):
        assert_close_to_reference(k, r, e, name)
    assert kernel[1].dtype == torch.float32
    return kernel


# ---------------------------------------------------------------------------------------------------------------
# The reference itself
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale_fn", SCALE_FNS)
def test_reference_logdet_is_log_det_of_autograd_jacobian(scale_fn):
    x, log_scale, shift = _inputs((2, 3, 2), torch.float64, "cpu")
    for b in range(2):
        jacobian = torch.autograd.functional.jacobian(
            lambda v: affine_coupling_reference(v[None], log_scale[b:b + 1], shift[b:b + 1], scale_fn)[0][0], x[b])
        expected = torch.linalg.slogdet(jacobian.reshape(6, 6)).logabsdet
        logdet = affine_coupling_reference(x, log_scale, shift, scale_fn)[1][b]
        torch.testing.assert_close(logdet, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scale_fn", SCALE_FNS)
def test_reference_reverse_inverts_forward_and_negates_logdet(scale_fn):
    x, log_scale, shift = _inputs((3, 7), torch.float64, "cpu", log_scale_range=3.0)
    y, logdet = affine_coupling_reference(x, log_scale, shift, scale_fn)
    back, logdet_back = affine_coupling_reference(y, log_scale, shift, scale_fn, reverse=True)
    torch.testing.assert_close(back, x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logdet_back, -logdet, rtol=1e-12, atol=1e-12)


def test_reference_scale_functions_by_closed_form():
    x, log_scale, shift = _inputs((2, 5), torch.float64, "cpu")
    y, logdet = affine_coupling_reference(x, log_scale, shift, "sigmoid")
    scale = 1 / (1 + torch.exp(-(log_scale + 2)))
    torch.testing.assert_close(y, x * scale + shift)
    torch.testing.assert_close(logdet, torch.log(scale).sum(1))
    y, logdet = affine_coupling_reference(x, log_scale, shift, "exp")
    torch.testing.assert_close(y, x * torch.exp(log_scale) + shift)
    torch.testing.assert_close(logdet, log_scale.sum(1))


@pytest.mark.parametrize("scale_fn", SCALE_FNS)
@pytest.mark.parametrize("reverse", DIRECTIONS)
def test_reference_gradcheck(scale_fn, reverse):
    inputs = [t.requires_grad_() for t in _inputs((2, 3), torch.float64, "cpu")]
    assert torch.autograd.gradcheck(lambda *v: affine_coupling_reference(*v, scale_fn, reverse), inputs)


# ---------------------------------------------------------------------------------------------------------------
# Kernel vs reference
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale_fn", SCALE_FNS)
@pytest.mark.parametrize("reverse", DIRECTIONS)
def test_matches_reference(dtype, scale_fn, reverse, device):
    x, log_scale, shift = _inputs((3, 5, 17, 13), dtype, device)
    _check_against_reference(x, log_scale, shift, scale_fn, reverse)


@pytest.mark.parametrize("layout", PER_SAMPLE_LAYOUTS, ids=lambda layout: layout.name)
@pytest.mark.parametrize("scale_fn,reverse", [("exp", False), ("sigmoid", True)])
def test_layouts(layout, scale_fn, reverse, device):
    x, log_scale, shift = (layout(t) for t in _inputs(layout.shape, torch.float32, device))
    y = _check_against_reference(x, log_scale, shift, scale_fn, reverse)[0]
    assert y.stride() == torch.empty_like(x).stride()


@pytest.mark.parametrize("shape", [(37, 5), (70, 3, 7), (5, 300), (3, 2000)])
def test_tiles_of_several_samples_and_several_blocks(shape, device):
    """Small samples packed many to a program (with a partly filled last tile) and samples spanning blocks."""
    x, log_scale, shift = _inputs(shape, torch.float32, device)
    _check_against_reference(x, log_scale, shift, "sigmoid", False)
    _check_against_reference(x[::2], log_scale[::2], shift[::2], "exp", True)


def test_mixed_layouts_and_gradient_layouts(device):
    """Each input in its own layout, and a broadcast (stride 0) logdet gradient from ``logdet.sum()``."""
    x, log_scale, shift = _inputs((2, 6, 5, 7), torch.float32, device)
    x = x.contiguous(memory_format=torch.channels_last)
    log_scale = log_scale.transpose(-1, -2).contiguous().transpose(-1, -2)
    _check_against_reference(x, log_scale, shift, "sigmoid", False)
    inputs = [t.detach().requires_grad_() for t in (x, log_scale, shift)]
    y, logdet = affine_coupling(*inputs, scale_fn="exp", impl="triton")
    grads = torch.autograd.grad(logdet.sum() + y.sum(), inputs)
    torch.testing.assert_close(grads[1], 1 + inputs[0].detach() * torch.exp(log_scale), rtol=1e-6, atol=1e-6)


def test_channel_halves_of_one_tensor(device):
    """The coupling use case: x and the conditioner's outputs are channel slices (views) of bigger tensors."""
    full = random_tensor((3, 8, 9, 5), torch.float32, 0, device)
    conditioner = random_tensor((3, 8, 9, 5), torch.float32, 1, device)
    x = full[:, 4:]
    log_scale, shift = conditioner[:, 0::2], conditioner[:, 1::2]
    for scale_fn in SCALE_FNS:
        _check_against_reference(x, log_scale, shift, scale_fn, True)


@pytest.mark.parametrize("scale_fn", SCALE_FNS)
@pytest.mark.parametrize("reverse", DIRECTIONS)
def test_extreme_log_scales_stay_finite(scale_fn, reverse, device):
    """Large |log_scale| with results that fp32 can hold: no inf/NaN where the fp64 reference is finite."""
    x, _, shift = _inputs((2, 9), torch.float32, device)
    if scale_fn == "exp":
        values = [-80.0, -40.0, -1e-3, 0.0, 1e-3, 20.0, 40.0, 80.0, -60.0]
    else:
        # sigmoid: log(scale) is finite for any raw value; 1/scale fits fp32 above about -85
        values = [-80.0, -30.0, -1e-3, 0.0, 1e-3, 30.0, 1e4, 1e6, -50.0] if reverse else \
                 [-1e6, -1e4, -200.0, -30.0, 0.0, 30.0, 200.0, 1e4, 1e6]
    log_scale = torch.tensor([values, values[::-1]], dtype=torch.float32, device=device)
    x = x.clamp(-1, 1) * 1e-3 if reverse else x
    y, logdet, *grads = _check_against_reference(x, log_scale, shift, scale_fn, reverse)
    for value in (y, logdet, *grads):
        assert torch.isfinite(value).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_slices_of_a_larger_buffer(dtype, device):
    """Inputs that are offset slices of one buffer: only their own elements are read."""
    buffer = random_tensor((4, 3, 40), dtype, 0, device)
    x, log_scale, shift = buffer[1:3, 0, 3:36], buffer[1:3, 1, 2:35], buffer[1:3, 2, 5:38]
    _check_against_reference(x, log_scale, shift, "sigmoid", False)


def test_logdet_is_deterministic_and_per_sample(device):
    """Per-sample sums over many blocks: every sample's logdet is its own, identical across runs."""
    x, log_scale, shift = _inputs((3, 2, 3000), torch.float32, device)
    log_scale[1] += 1.0
    _, first = affine_coupling(x, log_scale, shift, impl="triton")
    _, second = affine_coupling(x, log_scale, shift, impl="triton")
    assert torch.equal(first, second)
    torch.testing.assert_close(first, log_scale.double().sum((1, 2)).float(), rtol=1e-5, atol=1e-3)


def test_empty_batch_and_empty_samples(device):
    for shape in ((0, 3, 4), (2, 0)):
        x, log_scale, shift = _inputs(shape, torch.float32, device)
        inputs = [t.requires_grad_() for t in (x, log_scale, shift)]
        y, logdet = affine_coupling(*inputs, scale_fn="sigmoid", impl="triton")
        assert y.shape == shape and logdet.shape == (shape[0],) and (logdet == 0).all()
        (y.sum() + logdet.sum()).backward()
        assert all(t.grad.shape == shape for t in inputs)


def test_only_one_output_used_in_backward(device):
    """Gradients flow from y alone and from logdet alone (autograd passes no gradient for the other)."""
    x, log_scale, shift = _inputs((2, 3, 5), torch.float32, device)
    inputs = [t.requires_grad_() for t in (x, log_scale, shift)]
    _, logdet = affine_coupling(*inputs, scale_fn="sigmoid", impl="triton")
    grad_log_scale, = torch.autograd.grad(logdet.sum(), inputs[1])
    torch.testing.assert_close(grad_log_scale, torch.sigmoid(-(log_scale + 2)))
    y, _ = affine_coupling(*inputs, reverse=True, impl="triton")
    grad_shift, = torch.autograd.grad(y.sum(), inputs[2])
    torch.testing.assert_close(grad_shift, -torch.exp(-log_scale))


def test_use_impl_and_float64(device):
    x, log_scale, shift = _inputs((2, 5), torch.float64, device)
    expected = affine_coupling_reference(x, log_scale, shift)
    for result in (affine_coupling(x, log_scale, shift), affine_coupling(x, log_scale, shift, impl="eager")):
        torch.testing.assert_close(result, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="impl='triton' cannot run these inputs.*x is torch.float64.*"
                                         "log_scale is torch.float64.*shift is torch.float64"):
        affine_coupling(x, log_scale, shift, impl="triton")
    with use_impl("triton"), pytest.raises(ValueError, match="float64"):
        affine_coupling(x, log_scale, shift)
    inputs = [t.clone().requires_grad_() for t in (x, log_scale, shift)]
    for scale_fn in SCALE_FNS:
        assert torch.autograd.gradcheck(lambda *v: affine_coupling(*v, scale_fn=scale_fn, reverse=True), inputs)


SPECIAL = (0.0, 1.5, -1.0, float("nan"), float("inf"), float("-inf"))


@pytest.mark.parametrize("impl", ["triton", "eager"])
@pytest.mark.parametrize("scale_fn", SCALE_FNS)
@pytest.mark.parametrize("reverse", DIRECTIONS)
@pytest.mark.parametrize("used", ["both", "y", "logdet"])
def test_nan_and_inf_give_the_reference_pattern(impl, scale_fn, reverse, used, device):
    """Every combination of special values in (x, log_scale, shift): y, logdet and the three gradients are NaN
    exactly where the fp64 reference under autograd is, +-Inf where it is, numbers elsewhere. When only logdet is
    used, y's terms must not enter the gradients as inf * 0 (they did: the unused output's gradient was a zero
    tensor multiplied into exp(log_scale))."""
    grid = torch.cartesian_prod(*(torch.tensor(SPECIAL, dtype=torch.float64),) * 3).to(device)
    columns = [grid[:, k:k + 1] for k in range(3)]
    results = []
    for fn, dtype in ((lambda *v, **o: affine_coupling(*v, impl=impl, **o), torch.float32),
                      (affine_coupling_reference, torch.float64)):
        inputs = [c.to(dtype).requires_grad_() for c in columns]
        y, logdet = fn(*inputs, scale_fn=scale_fn, reverse=reverse)
        loss = {"both": y.sum() + logdet.sum(), "y": y.sum(), "logdet": logdet.sum()}[used]
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]
        results.append([y.detach(), logdet.detach(), *grads])
    for name, got, expected in zip(("y", "logdet", "grad_x", "grad_log_scale", "grad_shift"), *results):
        got, expected = got.double().flatten(), expected.flatten()
        assert torch.equal(got.isnan(), expected.isnan()), f"{name}: NaN pattern differs"
        infinite = expected.isinf()
        assert torch.equal(got[infinite], expected[infinite]), name
        finite = torch.isfinite(expected)
        torch.testing.assert_close(got[finite], expected[finite], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("impl", ["triton", "eager"])
def test_expanded_inputs_with_stride_zero(impl, device):
    x = random_tensor((1, 3, 5), torch.float32, 0, device).expand(4, 3, 5)
    log_scale = random_tensor((5,), torch.float32, 1, device).expand(4, 3, 5)
    shift = random_tensor((4, 3, 1), torch.float32, 2, device).expand(4, 3, 5)
    for scale_fn, reverse in (("exp", False), ("sigmoid", True)):
        inputs = [t.detach().requires_grad_() for t in (x, log_scale, shift)]
        y, logdet = affine_coupling(*inputs, scale_fn=scale_fn, reverse=reverse, impl=impl)
        grads = torch.autograd.grad((y * y).sum() + logdet.sum(), inputs)
        dense = [t.contiguous().double().requires_grad_() for t in (x, log_scale, shift)]
        y_ref, logdet_ref = affine_coupling_reference(*dense, scale_fn, reverse)
        expected = torch.autograd.grad((y_ref * y_ref).sum() + logdet_ref.sum(), dense)
        for got, want in zip((y, logdet) + grads, (y_ref, logdet_ref) + expected):
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(0, 3, 4), (3, 0, 4), (3, 4, 0), (2, 0)])
@pytest.mark.parametrize("impl", ["triton", "eager"])
def test_zero_size_in_every_dim_gives_the_reference_shapes_and_a_zero_logdet(shape, impl, device):
    inputs = [t.requires_grad_() for t in _inputs(shape, torch.float32, device)]
    y, logdet = affine_coupling(*inputs, scale_fn="sigmoid", impl=impl)
    assert y.shape == shape and logdet.shape == (shape[0],) and (logdet == 0).all()
    grads = torch.autograd.grad(y.sum() + logdet.sum(), inputs, allow_unused=True)
    assert all(g is None or g.shape == shape for g in grads)


def test_meta_tensors_give_the_output_shapes_through_the_fake():
    inputs = [torch.empty(3, 4, 5, device="meta", requires_grad=True) for _ in range(3)]
    y, logdet = affine_coupling(*inputs, scale_fn="sigmoid", reverse=True)
    assert y.device.type == "meta" and y.shape == (3, 4, 5) and logdet.shape == (3,)
    grads = torch.autograd.grad(y.sum() + logdet.sum(), inputs)
    assert all(g.shape == (3, 4, 5) and g.device.type == "meta" for g in grads)


def test_compiles_with_dynamic_shapes(device):
    def step(x, log_scale, shift):
        y, logdet = affine_coupling(x, log_scale, shift, scale_fn="sigmoid", impl="triton")
        return y.square().sum() + logdet.sum()

    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")
    for shape in ((2, 3, 5), (3, 4, 7)):
        results = []
        for fn in (compiled, step):
            inputs = [t.requires_grad_() for t in _inputs(shape, torch.float32, device)]
            loss = fn(*inputs)
            results.append((loss,) + torch.autograd.grad(loss, inputs))
        for got, expected in zip(*results):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_int64_offsets_on_large_tensors():
    """More than 2**31 elements in one tensor (8.6 GB in bf16 x 4 tensors): offsets must not wrap."""
    shape = (2, 2**30 + 17)
    x = torch.ones(shape, dtype=torch.bfloat16, device="cuda")
    log_scale = torch.zeros_like(x)
    log_scale[1, -5:] = 1.0
    y, logdet = affine_coupling(x, log_scale, torch.zeros_like(x), impl="triton")
    assert y[1, -1].item() == pytest.approx(2.71875) and y[0, -1].item() == 1.0
    assert logdet.tolist() == [0.0, 5.0]


@pytest.mark.gpu
@pytest.mark.parametrize("scale_fn", SCALE_FNS)
def test_glow_sized_activations(scale_fn):
    for shape in ((64, 48, 32, 32), (64, 24, 64, 64)):
        x, log_scale, shift = _inputs(shape, torch.bfloat16, "cuda")
        _check_against_reference(x, log_scale, shift, scale_fn, False)


# ---------------------------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale_fn,reverse", [("exp", False), ("sigmoid", True)])
def test_opcheck(scale_fn, reverse, device):
    x, log_scale, shift = (t.requires_grad_() for t in _inputs((2, 3, 5), torch.float32, device))
    torch.library.opcheck(torch.ops.genkernels.affine_coupling.default, (x, log_scale, shift, scale_fn, reverse))
    grad_y, grad_logdet = torch.randn(2, 3, 5, device=device), torch.randn(2, device=device)
    torch.library.opcheck(torch.ops.genkernels.affine_coupling_backward.default,
                          (grad_y, grad_logdet, x.detach(), log_scale.detach(), scale_fn, reverse))
    torch.library.opcheck(torch.ops.genkernels.affine_coupling_backward.default,
                          (None, grad_logdet, x.detach(), log_scale.detach(), scale_fn, reverse))


def test_compiles_with_fullgraph(device):
    """A coupling step (forward then reverse) compiles into one graph, forward and backward."""
    def round_trip(x, log_scale, shift):
        y, logdet = affine_coupling(x, log_scale, shift, scale_fn="sigmoid", impl="triton")
        back, logdet_back = affine_coupling(y * 2, log_scale, shift, reverse=True, impl="triton")
        return back.square().sum() + (logdet * logdet_back).sum()

    inputs = [t.requires_grad_() for t in _inputs((2, 3, 4), torch.float32, device)]
    compiled = torch.compile(round_trip, fullgraph=True, backend="aot_eager")
    loss = compiled(*inputs)
    grads = torch.autograd.grad(loss, inputs)
    expected_loss = round_trip(*inputs)
    expected = torch.autograd.grad(expected_loss, inputs)
    torch.testing.assert_close(loss, expected_loss)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------
def _good(device):
    return _inputs((2, 3, 4), torch.float32, device)


@pytest.mark.parametrize("impl", ["triton", "eager"])
@pytest.mark.parametrize("name", ["log_scale", "shift"])
def test_rejects_shape_mismatch(name, impl, device):
    args = dict(zip(("x", "log_scale", "shift"), _good(device)))
    args[name] = args[name][:, :2]
    with pytest.raises(ValueError, match=f"{name} must have the shape of x \\[2, 3, 4\\]; got shape \\[2, 2, 4\\]"):
        affine_coupling(**args, impl=impl)


@pytest.mark.parametrize("name", ["log_scale", "shift"])
def test_rejects_dtype_mismatch(name, device):
    args = dict(zip(("x", "log_scale", "shift"), _good(device)))
    args[name] = args[name].half()
    with pytest.raises(TypeError, match=f"{name} must have the dtype of x .*float16"):
        affine_coupling(**args)


@pytest.mark.parametrize("name", ["x", "log_scale", "shift"])
def test_rejects_non_float_dtype(name, device):
    args = dict(zip(("x", "log_scale", "shift"), _good(device)))
    args[name] = args[name].long()
    with pytest.raises(TypeError, match=f"{name} must have a floating-point dtype.*torch.int64"):
        affine_coupling(**args)


def test_rejects_device_mismatch(device):
    x, log_scale, shift = _good(device)
    with pytest.raises(ValueError, match="shift on meta"):
        affine_coupling(x, log_scale, shift.to("meta"))


def test_rejects_unknown_scale_fn(device):
    with pytest.raises(ValueError, match="scale_fn='softplus' is not supported.*'exp', 'sigmoid'"):
        affine_coupling(*_good(device), scale_fn="softplus")


def test_rejects_non_bool_reverse_and_rank_one(device):
    with pytest.raises(TypeError, match="reverse must be a bool"):
        affine_coupling(*_good(device), reverse=1)
    x = torch.randn(5, device=device)
    with pytest.raises(ValueError, match="x must have at least 2 dimension"):
        affine_coupling(x, x, x)


def test_rejects_non_tensor_and_unknown_impl(device):
    x, log_scale, _ = _good(device)
    with pytest.raises(TypeError, match="shift must be a torch.Tensor"):
        affine_coupling(x, log_scale, 0.0)
    with pytest.raises(ValueError, match="impl='fast'"):
        affine_coupling(*_good(device), impl="fast")


@pytest.mark.parametrize("programs", [2, 3])
@pytest.mark.parametrize("reverse", [False, True])
def test_split_over_programs_keeps_outputs_logdet_and_gradients(programs, reverse, device):
    """Several programs per sample, each walking a span of several tiles and writing one logdet partial
    (forced: in the interpreter one program walks each sample): y and the gradients are bitwise those of one
    program per sample, the logdet the same sum, and all match the fp64 reference."""
    from genkernels.kernels.launch import force_launch_settings

    x, log_scale, shift = _inputs((3, 3, 13, 11), torch.float32, device)
    grad_y = random_tensor(x.shape, torch.float64, 10, device)
    grad_logdet = random_tensor((3,), torch.float64, 11, device)
    options = dict(scale_fn="sigmoid", reverse=reverse)
    one = _outputs_and_grads(x, log_scale, shift, grad_y, grad_logdet, "triton", **options)
    with force_launch_settings("affine_coupling", programs_per_sample=programs):
        split = _outputs_and_grads(x, log_scale, shift, grad_y, grad_logdet, "triton", **options)
    reference = _outputs_and_grads(x.double(), log_scale.double(), shift.double(), grad_y, grad_logdet,
                                   "reference", **options)
    for name, a, b, r in zip(("y", "logdet", "grad_x", "grad_log_scale", "grad_shift"), split, one, reference):
        if name == "logdet":
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)
        else:
            assert torch.equal(a, b), name
        torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-4)
