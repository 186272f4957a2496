"""Fused WaveNet residual layer and incremental step (kernels/wavenet.py) against fp64 references."""
import pytest
import torch
import torch.nn.functional as F
from reference_checks import LaunchRecorder, assert_close_to_reference, random_tensor

import genkernels.kernels.wavenet as wavenet_module
from genkernels.kernels.wavenet import (
    WaveNetCache,
    wavenet_residual_layer,
    wavenet_step,
)

NAMES = ("x", "conv_weight", "conv_bias", "residual_weight", "residual_bias", "skip_weight", "skip_bias")


def _layer_inputs(batch, channels, gate, skip, length, ksize, dtype, device, cond=None, seed=0):
    shapes = [(batch, channels, length), (2 * gate, channels, ksize), (2 * gate,), (channels, gate, 1),
              (channels,), (skip, gate), (skip,)]
    scales = [1.0, max(channels, 1)**-0.5, 0.5, max(gate, 1)**-0.5, 0.5, max(gate, 1)**-0.5, 0.5]
    tensors = [random_tensor(s, dtype, seed + i, device, scale) for i, (s, scale) in enumerate(zip(shapes, scales))]
    cond_args = {}
    if cond == "global":
        cond_args = dict(cond=random_tensor((batch, 3), dtype, seed + 10, device),
                         cond_weight=random_tensor((2 * gate, 3), dtype, seed + 11, device, 0.5))
    elif cond == "local":
        cond_args = dict(cond=random_tensor((batch, 3, length), dtype, seed + 10, device),
                         cond_weight=random_tensor((2 * gate, 3, 1), dtype, seed + 11, device, 0.5))
    return tensors, cond_args


def _run(tensors, cond_args, dilation, impl, seed=20):
    leaves = [t.detach().requires_grad_() for t in tensors]
    cond_leaves = {k: v.detach().requires_grad_() for k, v in cond_args.items()}
    residual, skip = wavenet_residual_layer(*leaves, dilation=dilation, impl=impl, **cond_leaves)
    grad_residual = random_tensor(residual.shape, tensors[0].dtype, seed, str(residual.device)).to(residual.dtype)
    grad_skip = random_tensor(skip.shape, tensors[0].dtype, seed + 1, str(skip.device)).to(skip.dtype)
    inputs = leaves + list(cond_leaves.values())
    grads = torch.autograd.grad((residual, skip), inputs, (grad_residual, grad_skip))
    return (residual, skip) + grads


def _check_layer(tensors, cond_args, dilation):
    kernel = _run(tensors, cond_args, dilation, "triton")
    eager = _run(tensors, cond_args, dilation, "eager")
    reference = _run([t.double() for t in tensors], {k: v.double() for k, v in cond_args.items()}, dilation,
                     "eager")
    names = ("residual", "skip") + tuple(f"grad_{n}" for n in NAMES + tuple(cond_args))
    for name, k, e, r in zip(names, kernel, eager, reference):
        assert_close_to_reference(k, r, e, name)


@pytest.mark.parametrize("ksize,dilation,length,dtype,cond", [
    (2, 1, 17, torch.float32, None),
    (3, 4, 50, torch.float32, "global"),
    (1, 1, 23, torch.float16, "local"),
    (2, 8, 70, torch.bfloat16, None),
    (2, 2, 1, torch.float32, "global"),
])
def test_residual_layer_matches_fp64_reference(ksize, dilation, length, dtype, cond, device):
    tensors, cond_args = _layer_inputs(2, 6, 5, 7, length, ksize, dtype, device, cond)
    _check_layer(tensors, cond_args, dilation)


def test_residual_layer_wide_channels_and_strided_input(device):
    """Channel counts past one block (ragged), and ``x`` a transposed view as the model's embedding makes."""
    tensors, _ = _layer_inputs(1, 37, 20, 40, 19, 2, torch.float32, device)
    tensors[0] = tensors[0].transpose(1, 2).contiguous().transpose(1, 2)
    tensors[2] = random_tensor((80,), torch.float32, 5, device)[::2]
    assert not tensors[0].is_contiguous() and not tensors[2].is_contiguous()
    _check_layer(tensors, {}, 3)


def test_residual_layer_empty_batch(device):
    tensors, _ = _layer_inputs(0, 4, 3, 5, 9, 2, torch.float32, device)
    residual, skip = wavenet_residual_layer(*tensors, dilation=2, impl="triton")
    assert residual.shape == (0, 4, 9) and skip.shape == (0, 5, 9)


def test_residual_layer_reference_equals_unfused_layers():
    """The reference against the textbook layer: padded F.conv1d, gate, and 1x1 F.conv1d projections."""
    tensors, cond_args = _layer_inputs(2, 4, 3, 5, 30, 2, torch.float64, "cpu", "global")
    x, wc, bc, wr, br, ws, bs = tensors
    h = F.conv1d(F.pad(x, (4, 0)), wc, bc, dilation=4) + (cond_args["cond"] @ cond_args["cond_weight"].T)[..., None]
    z = torch.tanh(h[:, :3]) * torch.sigmoid(h[:, 3:])
    expected_residual = x + F.conv1d(z, wr, br)
    expected_skip = F.conv1d(z, ws[..., None], bs)
    residual, skip = wavenet_residual_layer(*tensors, dilation=4, impl="eager", **cond_args)
    torch.testing.assert_close(residual, expected_residual)
    torch.testing.assert_close(skip, expected_skip)


def test_residual_layer_is_causal(device):
    tensors, _ = _layer_inputs(1, 4, 3, 5, 40, 2, torch.float32, device)
    changed = tensors[0].clone()
    changed[:, :, 30] -= 5.0
    before = wavenet_residual_layer(*tensors, dilation=8, impl="triton")
    after = wavenet_residual_layer(changed, *tensors[1:], dilation=8, impl="triton")
    for b, a in zip(before, after):
        assert torch.equal(b[:, :, :30], a[:, :, :30])
        assert not torch.equal(b[:, :, 30:], a[:, :, 30:])


def _textbook_layer(x, wc, bc, wr, br, ws, bs, dilation, cond_proj=None):
    """Eq. 2 and Fig. 4 of the WaveNet paper, fp64, written independently of the library: each tap a shifted copy
    of ``x`` with zeros before t = 0 (no padded convolution, so every size may be 0 and any dilation works);
    ``cond_proj`` ``[batch, 2D]`` is a global conditioning projection."""
    x, wc, bc, wr, br, ws, bs = [t.double() for t in (x, wc, bc, wr, br, ws, bs)]
    wr, ws = wr.reshape(wr.shape[:2]), ws.reshape(ws.shape[:2])
    batch, _, length = x.shape
    two_d, _, ksize = wc.shape
    h = bc[None, :, None].repeat(batch, 1, length)
    for j in range(ksize):
        back = (ksize - 1 - j) * dilation
        shifted = torch.zeros_like(x)
        if back < length:
            shifted[:, :, back:] = x[:, :, :length - back]
        h = h + torch.einsum("oc,bct->bot", wc[:, :, j], shifted)
    if cond_proj is not None:
        h = h + cond_proj.double()[:, :, None]
    gate = two_d // 2
    z = torch.tanh(h[:, :gate]) * torch.sigmoid(h[:, gate:])
    return (x + torch.einsum("rd,bdt->brt", wr, z) + br[:, None],
            torch.einsum("sd,bdt->bst", ws, z) + bs[:, None])


@pytest.mark.parametrize("batch,channels,gate,skip,length,ksize", [
    (2, 0, 3, 5, 7, 2),  # no residual channels: h = conv bias, skip = W_skip z(bias) + b_skip (was uninitialized)
    (2, 4, 0, 5, 7, 2),  # no gate channels: skip = b_skip, residual = x + b_res
    (2, 4, 3, 0, 7, 2),  # no skip channels
    (2, 4, 3, 5, 0, 2),  # no time steps
    (2, 4, 3, 5, 0, 1),  # no time steps and no padding: F.conv1d raised
    (0, 4, 3, 5, 7, 2),  # no samples
    (1, 0, 0, 0, 3, 3),
])
def test_residual_layer_zero_sizes_give_the_math_under_both_impls(batch, channels, gate, skip, length, ksize,
                                                                   device):
    """Every output is written for every size, 0 in any dim, with the shape and values of the math, under both
    impls; gradients too (the triton backward against fp64 autograd of the reference)."""
    tensors, _ = _layer_inputs(batch, channels, gate, skip, length, ksize, torch.float32, device)
    expected = _textbook_layer(*tensors, 2)
    for impl in ("triton", "eager"):
        residual, skip_out = wavenet_residual_layer(*tensors, dilation=2, impl=impl)
        assert residual.shape == (batch, channels, length) and skip_out.shape == (batch, skip, length), impl
        assert_close_to_reference(residual, expected[0], expected[0].float(), f"{impl} residual")
        assert_close_to_reference(skip_out, expected[1], expected[1].float(), f"{impl} skip")
    _check_layer(tensors, {}, 2)


@pytest.mark.parametrize("dilation", [2**31 - 1, 2**33 + 1])
def test_residual_layer_huge_dilation_reads_no_future(dilation, device):
    """Tap shifts (k - 1 - j) * dilation are int64: 2 * (2**31 - 1) wrapped in int32 to -2, a read two steps into
    the future. At a tiny length every tap but the last reaches before the start, and the reference builds no
    padding as long as the shift."""
    tensors, _ = _layer_inputs(2, 3, 4, 5, 9, 3, torch.float32, device)
    expected = _textbook_layer(*tensors, dilation)
    for impl in ("triton", "eager"):
        residual, skip = wavenet_residual_layer(*tensors, dilation=dilation, impl=impl)
        assert_close_to_reference(residual, expected[0], expected[0].float(), f"{impl} residual")
        assert_close_to_reference(skip, expected[1], expected[1].float(), f"{impl} skip")
    _check_layer(tensors, {}, dilation)  # the backward's reverse conv and weight gradients too


def test_residual_layer_any_strides_on_every_tensor(device):
    """Weights and biases as views too: a transposed conv weight, a sliced residual weight, an expanded (stride 0)
    skip weight and bias, a sliced conv bias; x a sliced view of a wider tensor."""
    tensors, cond_args = _layer_inputs(2, 5, 3, 4, 13, 2, torch.float32, device, "global")
    x, wc, bc, wr, br, ws, bs = tensors
    wide = random_tensor((2, 10, 13), torch.float32, 40, device)
    wide[:, ::2] = x
    x = wide[:, ::2]
    wc = wc.permute(2, 1, 0).contiguous().permute(2, 1, 0)
    bc = torch.stack([bc, torch.full_like(bc, float("nan"))], 1)[:, 0]
    wr = torch.cat([wr, torch.full_like(wr, float("nan"))], 1)[:, :3]
    ws = random_tensor((1, 3), torch.float32, 41, device).expand(4, 3)
    bs = random_tensor((1,), torch.float32, 42, device).expand(4)
    views = [x, wc, bc, wr, br, ws, bs]
    assert not any(t.is_contiguous() for t in (x, wc, bc, wr, ws, bs))
    assert ws.stride(0) == 0 and bs.stride(0) == 0
    _check_layer(views, cond_args, 2)


def test_residual_layer_meta_tensors_give_shapes(device):
    """meta tensors take the registered op's fake (auto and triton) or the reference (eager, fp64): shapes
    only, no value read."""
    tensors, cond_args = _layer_inputs(2, 4, 3, 5, 10, 2, torch.float32, device, "local")
    meta = [t.to("meta").requires_grad_() for t in tensors]
    meta_cond = {k: v.to("meta") for k, v in cond_args.items()}
    for impl in ("auto", "triton", "eager"):
        residual, skip = wavenet_residual_layer(*meta, dilation=3, impl=impl, **meta_cond)
        assert residual.device.type == "meta" and residual.shape == (2, 4, 10) and skip.shape == (2, 5, 10)
        grads = torch.autograd.grad((residual.sum() + skip.sum()), meta)
        assert [g.shape for g in grads] == [t.shape for t in meta]
    residual, skip = wavenet_residual_layer(*[t.detach().double() for t in meta], dilation=3)
    assert residual.dtype == torch.float64 and skip.shape == (2, 5, 10)


def test_residual_layer_nan_and_inf_follow_the_reference(device):
    """NaN and Inf in x reach the outputs where the fp64 reference has them, and nowhere else (the taps the
    causal conv cannot see stay numbers)."""
    tensors, _ = _layer_inputs(1, 4, 3, 5, 21, 2, torch.float32, device)
    x = tensors[0].clone()
    x[0, 1, 5] = float("nan")
    x[0, 2, 12] = float("inf")
    x[0, 0, 16] = float("-inf")
    tensors[0] = x
    expected = _textbook_layer(*tensors, 3)
    assert torch.isnan(expected[1]).any() and torch.isfinite(expected[1][..., :5]).all()
    for impl in ("triton", "eager"):
        residual, skip = wavenet_residual_layer(*tensors, dilation=3, impl=impl)
        assert_close_to_reference(residual, expected[0], expected[0].float(), f"{impl} residual")
        assert_close_to_reference(skip, expected[1], expected[1].float(), f"{impl} skip")


# ---------------------------------------------------------------------------------------------------------------
# Incremental step
# ---------------------------------------------------------------------------------------------------------------
def _stacked_weights(layers, channels, gate, skip, ksize, dtype, device, seed=30):
    shapes = [(layers, 2 * gate, channels, ksize), (layers, 2 * gate), (layers, channels, gate), (layers, channels),
              (layers, skip, gate), (layers, skip)]
    scales = [max(channels, 1)**-0.5, 0.5, max(gate, 1)**-0.5, 0.5, max(gate, 1)**-0.5, 0.5]
    return [random_tensor(s, dtype, seed + i, device, scale) for i, (s, scale) in enumerate(zip(shapes, scales))]


def _layered_skip_sum(x, weights, dilations, cond_proj):
    """The whole-sequence result the steps must reproduce: the layers one after another (fp64, textbook)."""
    wc, bc, wr, br, ws, bs = [w.double() for w in weights]
    h = x.double()
    total = torch.zeros((x.shape[0], ws.shape[1], x.shape[2]), dtype=torch.float64, device=x.device)
    for layer, dilation in enumerate(dilations):
        cond = None if cond_proj is None else cond_proj[layer]
        h, skip = _textbook_layer(h, wc[layer], bc[layer], wr[layer], br[layer], ws[layer], bs[layer], dilation,
                                  cond)
        total = total + skip
    return total


def _step_through(x, weights, dilations, ksize, impl, cond_proj=None, fill=None):
    """Skip sums of every time step of ``x [batch, R, time]`` from fresh caches (``fill``: the uninitialized
    buffer's contents, which no step may read before writing)."""
    cache = WaveNetCache(dilations, ksize, x.shape[0], x.shape[1], device=x.device, dtype=x.dtype)
    if fill is not None:
        cache.buffer.fill_(fill)
    steps = [wavenet_step(x[:, :, t], cache, *weights, cond_proj=cond_proj, impl=impl) for t in range(x.shape[2])]
    assert cache.position == x.shape[2]
    return torch.stack(steps, -1) if steps else None


@pytest.mark.parametrize("ksize,dilations,batch,dtype,with_cond", [
    (2, (1, 2, 4, 8), 3, torch.float32, False),
    (3, (1, 2), 17, torch.float32, True),  # a second batch tile, ragged
    (1, (1, 1), 2, torch.float32, False),
    (2, (1, 2), 2, torch.bfloat16, True),
])
def test_step_reproduces_the_layered_forward(ksize, dilations, batch, dtype, with_cond, device):
    channels, gate, skip, length = 5, 4, 6, 9
    weights = _stacked_weights(len(dilations), channels, gate, skip, ksize, dtype, device)
    x = random_tensor((batch, channels, length), dtype, 1, device)
    cond_proj = random_tensor((len(dilations), batch, 2 * gate), dtype, 2, device) if with_cond else None
    reference = _layered_skip_sum(x, weights, dilations, cond_proj)
    caches = {impl: WaveNetCache(dilations, ksize, batch, channels, device=device, dtype=dtype)
              for impl in ("triton", "eager")}
    for t in range(length):
        results = {impl: wavenet_step(x[:, :, t], caches[impl], *weights, cond_proj=cond_proj, impl=impl)
                   for impl in ("triton", "eager")}
        assert_close_to_reference(results["triton"], reference[:, :, t], results["eager"], f"skip at t={t}")
    assert caches["triton"].position == length


@pytest.mark.parametrize("channels,gate,skip,batch", [(0, 3, 4, 2), (4, 0, 4, 2), (4, 3, 0, 2), (4, 3, 4, 0)])
def test_step_zero_sizes_give_the_math_under_both_impls(channels, gate, skip, batch, device):
    dilations, ksize = (1, 2), 2
    weights = _stacked_weights(len(dilations), channels, gate, skip, ksize, torch.float32, device)
    x = random_tensor((batch, channels, 5), torch.float32, 1, device)
    reference = _layered_skip_sum(x, weights, dilations, None)
    results = {impl: _step_through(x, weights, dilations, ksize, impl) for impl in ("triton", "eager")}
    for impl, got in results.items():
        assert_close_to_reference(got, reference, results["eager"], impl)


def test_step_any_strides_on_every_tensor_and_never_reads_unwritten_slots(device):
    """Stacked weights as views (transposed, sliced, expanded with stride 0) and x a sliced view; the cache
    starts full of NaN, which no step may read (taps before time 0 are zeros, never loaded)."""
    dilations, ksize, batch, channels, gate, skip = (1, 3), 2, 3, 5, 4, 6
    wc, bc, wr, br, ws, bs = _stacked_weights(len(dilations), channels, gate, skip, ksize, torch.float32, device)
    wc = wc.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)
    bc = torch.stack([bc, torch.full_like(bc, float("nan"))], -1)[..., 0]  # every other element: NaN gaps
    wr = wr.transpose(1, 2).contiguous().transpose(1, 2)
    ws = random_tensor((len(dilations), 1, gate), torch.float32, 50, device).expand(-1, skip, -1)
    bs = random_tensor((1, skip), torch.float32, 51, device).expand(len(dilations), -1)
    weights = [wc, bc, wr, br, ws, bs]
    assert not any(t.is_contiguous() for t in (wc, bc, wr, ws, bs))
    x = random_tensor((batch, 2 * channels, 7), torch.float32, 52, device)[:, ::2]
    reference = _layered_skip_sum(x, weights, dilations, None)
    eager = _step_through(x, weights, dilations, ksize, "eager", fill=float("nan"))
    triton_skip = _step_through(x, weights, dilations, ksize, "triton", fill=float("nan"))
    assert torch.isfinite(triton_skip).all() and torch.isfinite(eager).all()
    assert_close_to_reference(triton_skip, reference, eager, "skip")


def test_step_meta_tensors_give_shapes():
    """meta caches and weights: the registered op's fake (auto, triton) or the reference (eager, fp64), with no
    host read of the layer table; the position still advances."""
    weights = [w.to("meta") for w in _stacked_weights(2, 4, 3, 5, 2, torch.float32, "cpu")]
    for impl, dtype in (("auto", torch.float32), ("triton", torch.float32), ("eager", torch.float32),
                        ("auto", torch.float64)):
        cache = WaveNetCache((1, 2), 2, 3, 4, device="meta", dtype=dtype)
        for _ in range(3):
            skip = wavenet_step(torch.empty(3, 4, device="meta", dtype=dtype), cache,
                                *[w.to(dtype) for w in weights], impl=impl)
            assert skip.device.type == "meta" and skip.shape == (3, 5) and skip.dtype == dtype
        assert cache.position == 3


def test_step_float64_runs_the_reference_and_triton_lists_every_reason(device):
    dilations, ksize = (1, 2), 2
    weights = _stacked_weights(len(dilations), 4, 3, 5, ksize, torch.float64, device)
    x = random_tensor((2, 4, 6), torch.float64, 1, device)
    reference = _layered_skip_sum(x, weights, dilations, None)
    torch.testing.assert_close(_step_through(x, weights, dilations, ksize, "auto"), reference)
    cache = WaveNetCache(dilations, ksize, 2, 4, device=device, dtype=torch.float64)
    with pytest.raises(ValueError, match="x is torch.float64"):
        wavenet_step(x[:, :, 0], cache, *weights, impl="triton")
    wide = _stacked_weights(1, 4, 65, 5, 2, torch.float32, device)
    cache = WaveNetCache((1,), 2, 2, 4, device=device)
    skip = wavenet_step(torch.randn(2, 4, device=device), cache, *wide)  # auto: the reference takes any width
    assert skip.shape == (2, 5)


def test_step_gradients_are_never_lost(device):
    """The step kernel has no backward: with an input that requires grad, impl='triton' raises before launching
    and impl='auto' runs the differentiable reference; under no_grad the kernel runs."""
    dilations, ksize = (1, 2), 2
    weights = _stacked_weights(len(dilations), 3, 2, 4, ksize, torch.float32, device)
    weights[0].requires_grad_()
    x = random_tensor((2, 3), torch.float32, 3, device)
    cache = WaveNetCache(dilations, ksize, 2, 3, device=device)
    with pytest.raises(ValueError, match="conv_weight require"):
        wavenet_step(x, cache, *weights, impl="triton")
    assert cache.position == 0
    skip = wavenet_step(x, cache, *weights)
    (grad,) = torch.autograd.grad(skip.sum(), weights[0])
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    with torch.no_grad():
        assert not wavenet_step(x, cache, *weights, impl="triton").requires_grad


@pytest.mark.parametrize("kwargs,error,name", [
    (dict(dilations=None), TypeError, "dilations"),
    (dict(dilations=3), TypeError, "dilations"),
    (dict(dilations=()), ValueError, "dilations"),
    (dict(dilations=(1, 2.0)), TypeError, "dilations"),
    (dict(dilations=(1, -2)), ValueError, "dilations"),
    (dict(kernel_size=0), ValueError, "kernel_size"),
    (dict(kernel_size=2.0), TypeError, "kernel_size"),
    (dict(batch_size=-1), ValueError, "batch_size"),
    (dict(batch_size=2.0), TypeError, "batch_size"),
    (dict(channels="4"), TypeError, "channels"),
    (dict(channels=-4), ValueError, "channels"),
    (dict(dtype=torch.int64), TypeError, "dtype"),
    (dict(dtype="float32"), TypeError, "dtype"),
])
def test_cache_rejects_bad_arguments(kwargs, error, name):
    arguments = dict(dilations=(1, 2), kernel_size=2, batch_size=2, channels=4)
    arguments.update(kwargs)
    with pytest.raises(error, match=name):
        WaveNetCache(**arguments)


@pytest.mark.parametrize("case,error,name", [
    ("x_rank", ValueError, "x"),
    ("cache_batch", ValueError, "cache"),
    ("conv_weight_layers", ValueError, "conv_weight"),
    ("residual_shape", ValueError, "residual_weight"),
    ("skip_bias_shape", ValueError, "skip_bias"),
    ("dtype", TypeError, "conv_bias"),
    ("cond_shape", ValueError, "cond_proj"),
    ("not_a_cache", TypeError, "cache"),
])
def test_step_rejects_bad_input(case, error, name):
    weights = _stacked_weights(2, 4, 3, 5, 2, torch.float32, "cpu")
    x = torch.randn(2, 4)
    cache = WaveNetCache((1, 2), 2, 2, 4)
    cond_proj = None
    if case == "x_rank":
        x = x[None]
    elif case == "cache_batch":
        cache = WaveNetCache((1, 2), 2, 3, 4)
    elif case == "conv_weight_layers":
        weights[0] = weights[0][:1]
    elif case == "residual_shape":
        weights[2] = weights[2][:, :3]
    elif case == "skip_bias_shape":
        weights[5] = weights[5][:, :4]
    elif case == "dtype":
        weights[1] = weights[1].half()
    elif case == "cond_shape":
        cond_proj = torch.randn(2, 2, 5)
    elif case == "not_a_cache":
        cache = cache.buffer
    with pytest.raises(error, match=name):
        wavenet_step(x, cache, *weights, cond_proj=cond_proj)


def test_step_triton_rejects_channels_too_wide(device):
    weights = _stacked_weights(1, 4, 65, 5, 2, torch.float32, device)
    cache = WaveNetCache((1,), 2, 2, 4, device=device)
    with pytest.raises(ValueError, match="conv_weight"):
        wavenet_step(torch.randn(2, 4, device=device), cache, *weights, impl="triton")


def test_cache_rejects_bad_dilations():
    with pytest.raises(ValueError, match="dilations"):
        WaveNetCache((1, 0), 2, 1, 4)


# ---------------------------------------------------------------------------------------------------------------
# Residual layer bad input
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case,error,name", [
    ("x_rank", ValueError, "x"),
    ("odd_conv_channels", ValueError, "conv_weight"),
    ("conv_in_channels", ValueError, "conv_weight"),
    ("residual_shape", ValueError, "residual_weight"),
    ("skip_rank", ValueError, "skip_weight"),
    ("skip_bias_shape", ValueError, "skip_bias"),
    ("dtype", TypeError, "residual_bias"),
    ("device", ValueError, "skip_weight"),
    ("dilation", ValueError, "dilation"),
    ("dilation_float", TypeError, "dilation"),
    ("kernel_size_zero", ValueError, "conv_weight"),
    ("x_list", TypeError, "x"),
    ("skip_bias_int", TypeError, "skip_bias"),
    ("cond_without_weight", ValueError, "cond_weight"),
    ("cond_batch", ValueError, "cond"),
])
def test_residual_layer_rejects_bad_input(case, error, name):
    tensors, cond_args = _layer_inputs(2, 4, 3, 5, 10, 2, torch.float32, "cpu")
    dilation = 1
    if case == "x_rank":
        tensors[0] = tensors[0][0]
    elif case == "odd_conv_channels":
        tensors[1], tensors[2] = tensors[1][:5], tensors[2][:5]
    elif case == "conv_in_channels":
        tensors[1] = torch.randn(6, 5, 2)
    elif case == "residual_shape":
        tensors[3] = torch.randn(4, 2)
    elif case == "skip_rank":
        tensors[5] = torch.randn(5, 3, 2)
    elif case == "skip_bias_shape":
        tensors[6] = torch.randn(4)
    elif case == "dtype":
        tensors[4] = tensors[4].half()
    elif case == "device":
        tensors[5] = tensors[5].to("meta")
    elif case == "dilation":
        dilation = 0
    elif case == "dilation_float":
        dilation = 2.0
    elif case == "kernel_size_zero":
        tensors[1] = torch.randn(6, 4, 0)
    elif case == "x_list":
        tensors[0] = tensors[0].tolist()
    elif case == "skip_bias_int":
        tensors[6] = torch.ones(5, dtype=torch.int64)
    elif case == "cond_without_weight":
        cond_args = dict(cond=torch.randn(2, 3))
    elif case == "cond_batch":
        cond_args = dict(cond=torch.randn(3, 3), cond_weight=torch.randn(6, 3))
    with pytest.raises(error, match=name):
        wavenet_residual_layer(*tensors, dilation=dilation, **cond_args)


def test_residual_layer_float64_runs_the_reference_and_triton_lists_every_reason(device):
    """fp64: impl='auto' runs the eager reference in fp64; impl='triton' raises a ValueError listing why (the
    dtype, and here also a gate too wide for the kernels' registers)."""
    tensors, _ = _layer_inputs(2, 4, 3, 5, 10, 2, torch.float64, device)
    residual, skip = wavenet_residual_layer(*tensors, dilation=2)
    expected = _textbook_layer(*tensors, 2)
    assert residual.dtype == torch.float64
    torch.testing.assert_close(residual, expected[0])
    torch.testing.assert_close(skip, expected[1])
    with pytest.raises(ValueError, match="x is torch.float64"):
        wavenet_residual_layer(*tensors, dilation=1, impl="triton")
    tensors, _ = _layer_inputs(1, 2, 257, 2, 3, 1, torch.float64, device)
    with pytest.raises(ValueError, match=r"D = 257.*\(2\) x is torch.float64") as error:
        wavenet_residual_layer(*tensors, dilation=1, impl="triton")
    assert "conv_weight" in str(error.value)
    tensors = [t.float() for t in tensors]
    with pytest.raises(ValueError, match="D = 257"):
        wavenet_residual_layer(*tensors, dilation=1, impl="triton")
    residual, _ = wavenet_residual_layer(*tensors, dilation=1)  # auto: the reference takes any width
    assert residual.shape == (1, 2, 3)


# ---------------------------------------------------------------------------------------------------------------
# Registration: opcheck and torch.compile
# ---------------------------------------------------------------------------------------------------------------
def test_opcheck_residual_layer(device):
    tensors, cond_args = _layer_inputs(1, 3, 2, 4, 9, 2, torch.float32, device, "local")
    x, wc, bc, wr, br, ws, bs = [t.requires_grad_() for t in tensors]
    cond_proj = torch.randn(1, 4, 9, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.genkernels.wavenet_residual_layer.default,
                          (x, wc, bc, cond_proj, wr[..., 0], br, ws, bs, 2, True))
    h = torch.randn(1, 4, 9, device=device)
    torch.library.opcheck(torch.ops.genkernels.wavenet_residual_layer_backward.default,
                          (torch.randn_like(x), torch.randn(1, 4, 9, device=device), x.detach(), h, wc.detach(),
                           wr.detach()[..., 0], ws.detach(), 2))


def test_opcheck_step(device):
    weights = _stacked_weights(2, 3, 2, 4, 2, torch.float32, device)
    cache = WaveNetCache((1, 2), 2, 2, 3, device=device)
    cache.buffer.zero_()
    x = torch.randn(2, 3, device=device)
    torch.library.opcheck(torch.ops.genkernels.wavenet_step.default,
                          (x, cache.buffer, cache.layer_table, cache.ring_heads, 3, *weights[:2], None,
                           *weights[2:]))


def test_residual_layer_compiles_with_fullgraph(device):
    tensors, _ = _layer_inputs(2, 3, 2, 4, 11, 2, torch.float32, device)
    leaves = [t.requires_grad_() for t in tensors]

    def two_layers(x, *weights):
        h, skip1 = wavenet_residual_layer(x, *weights, dilation=1, impl="triton")
        h, skip2 = wavenet_residual_layer(h, *weights, dilation=2, impl="triton")
        return (skip1 + skip2).square().sum() + h.sum()

    compiled = torch.compile(two_layers, fullgraph=True, dynamic=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(*leaves), leaves)
    expected = torch.autograd.grad(two_layers(*leaves), leaves)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_layer_wavenet_sized_on_gpu(dtype, device):
    """Exact fp32 (allow_tf32 off: the kernels' fp32 dots follow it, as cuDNN's convolutions in the eager path)."""
    tensors, cond_args = _layer_inputs(4, 64, 64, 256, 4000, 2, dtype, device, "global")
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        _check_layer(tensors, cond_args, 256)


@pytest.mark.gpu
def test_residual_layer_fp32_tf32_on_gpu(device):
    """allow_tf32 on (PyTorch's default for fp32 convolutions): the fp32 layer multiplies on TF32 tensor cores,
    10 mantissa bits per operand, so its outputs stay within a TF32-sized error of the fp64 reference."""
    tensors, cond_args = _layer_inputs(4, 64, 64, 256, 4000, 2, torch.float32, device, "global")
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
        got = _run(tensors, cond_args, 256, "triton")[:2]
    doubles = [t.double() for t in tensors]
    cond = {k: v.double() for k, v in cond_args.items()}
    want = wavenet_residual_layer(*doubles, dilation=256, impl="eager", **cond)
    for g, w, name in zip(got, want, ("residual", "skip")):
        bound = 2.0**-8 * w.abs().max().item() + 1e-3
        assert (g.double() - w).abs().max().item() <= bound, name


@pytest.mark.parametrize("impl", ["triton", "eager"])
def test_step_compiles_with_fullgraph_and_dynamic_shapes(impl, device):
    """The step under torch.compile(fullgraph=True, dynamic=True): the cache's position (a Python int) advances
    inside the graph, and the results equal the uncompiled steps."""
    dilations, ksize = (1, 2), 2
    weights = _stacked_weights(len(dilations), 3, 2, 4, ksize, torch.float32, device)
    x = random_tensor((2, 3, 5), torch.float32, 3, device)
    compiled = torch.compile(wavenet_step, fullgraph=True, dynamic=True, backend="aot_eager")
    results = []
    for step in (compiled, wavenet_step):
        cache = WaveNetCache(dilations, ksize, 2, 3, device=device)
        results.append(torch.stack([step(x[:, :, t], cache, *weights, impl=impl) for t in range(5)]))
        assert cache.position == 5
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Launch configuration (issue 12: compiled-code budgets), recorded from the launchers' real calls
# ---------------------------------------------------------------------------------------------------------------
def _record(monkeypatch, name):
    recorder = LaunchRecorder(getattr(wavenet_module, name))
    monkeypatch.setattr(wavenet_module, name, recorder)
    return recorder


@pytest.mark.parametrize("allow_tf32", [True, False])
def test_layer_projections_take_64_rows_packed_conv_weight_and_follow_tf32(allow_tf32, device, monkeypatch):
    """The fused layer's 1x1 projections write 64 output channels per dot (32 fell back to mma.sync on sm_90),
    its conv weight arrives packed [k, 2D, R] with R contiguous (it had stride k: 2-byte loads), and fp32 dots
    follow torch.backends.cudnn.allow_tf32 in the forward and the backward (they were always exact)."""
    forward = _record(monkeypatch, "_residual_layer_fwd_kernel")
    backward = _record(monkeypatch, "_residual_layer_bwd_gate_kernel")
    tensors, cond_args = _layer_inputs(2, 5, 3, 70, 11, 2, torch.float32, device)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=allow_tf32):
        results = _run(tensors, cond_args, 2, "triton")
    (_, args, kwargs), = forward.calls
    assert kwargs["BLOCK_P"] == 64 and kwargs["IEEE"] == (not allow_tf32)
    packed = args[4]
    assert packed.shape == (2, 6, 5) and packed.is_contiguous()
    wc_so, wc_si, wc_sk = args[20:23]
    assert (wc_so, wc_si, wc_sk) == (5, 1, 30)
    (_, _, kwargs), = backward.calls
    assert kwargs["IEEE"] == (not allow_tf32)
    eager = _run(tensors, cond_args, 2, "eager")
    for got, want, name in zip(results, eager, ("residual", "skip") + NAMES):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=name)


def test_wide_gate_layer_runs_eight_warps(device, monkeypatch):
    """128 gate channels: 8 warps (at 4 the bf16 tile sat at 255 registers and spilled), results unchanged."""
    forward = _record(monkeypatch, "_residual_layer_fwd_kernel")
    tensors, cond_args = _layer_inputs(1, 3, 65, 4, 5, 2, torch.float32, device)
    _check_layer(tensors, cond_args, 1)
    assert all(kwargs["num_warps"] == 8 and kwargs["BLOCK_D"] == 128 for _, _, kwargs in forward.calls)


@pytest.mark.parametrize("allow_tf32", [True, False])
def test_step_splits_the_skip_projection_and_follows_tf32(allow_tf32, device, monkeypatch):
    """The step launches a (sample block, 64-wide skip block) grid (it was one program for the whole batch) and
    follows allow_tf32 like the layer; a second sample block and a second, ragged skip block match the layers."""
    step = _record(monkeypatch, "_wavenet_step_kernel")
    dilations, ksize, batch, channels, gate, skip = (1, 2, 4), 2, 17, 5, 4, 70
    weights = _stacked_weights(len(dilations), channels, gate, skip, ksize, torch.float32, device)
    x = random_tensor((batch, channels, 6), torch.float32, 1, device)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=allow_tf32):
        got = _step_through(x, weights, dilations, ksize, "triton", fill=float("nan"))
    assert all(grid == (2, 2) and kwargs["IEEE"] == (not allow_tf32) for grid, _, kwargs in step.calls)
    reference = _layered_skip_sum(x, weights, dilations, None)
    eager = _step_through(x, weights, dilations, ksize, "eager")
    assert_close_to_reference(got, reference, eager, "skip sums")


def test_step_ring_heads_track_the_position_without_division(device):
    """The Triton step reads its ring slots from ring_heads[position % 2] = position mod q_l (no modulo in the
    layer loop) and writes the next row; after each step the heads hold the next position's slots."""
    dilations, ksize, batch, channels, gate, skip = (1, 3, 2), 3, 2, 4, 3, 5
    weights = _stacked_weights(len(dilations), channels, gate, skip, ksize, torch.float32, device)
    cache = WaveNetCache(dilations, ksize, batch, channels, device=device)
    x = random_tensor((batch, channels, 9), torch.float32, 3, device)
    for t in range(9):
        wavenet_step(x[:, :, t], cache, *weights, impl="triton")
        assert cache.heads_position == cache.position == t + 1
        expected = torch.tensor([(t + 1) % q for q in cache.queues], dtype=torch.int64)
        assert torch.equal(cache.ring_heads[(t + 1) % 2].cpu(), expected)


def test_step_mixing_impls_and_far_positions_match_the_eager_step(device):
    """Eager steps leave ring_heads behind; the next Triton step rebuilds them on the device. Also a position
    past 2**31 (set by hand on both caches, same buffers): slots and tap validity come out as the eager step's."""
    dilations, ksize, batch, channels, gate, skip = (1, 2, 5), 2, 3, 4, 3, 6
    weights = _stacked_weights(len(dilations), channels, gate, skip, ksize, torch.float32, device)
    x = random_tensor((batch, channels, 12), torch.float32, 4, device)
    caches = {impl: WaveNetCache(dilations, ksize, batch, channels, device=device) for impl in ("mixed", "eager")}
    for t in range(12):
        if t == 6:
            for cache in caches.values():
                cache.position = 2**31 + 3
        impl = "eager" if t % 3 == 1 else "triton"
        got = wavenet_step(x[:, :, t], caches["mixed"], *weights, impl=impl)
        want = wavenet_step(x[:, :, t], caches["eager"], *weights, impl="eager")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"step {t}")
    torch.testing.assert_close(caches["mixed"].buffer, caches["eager"].buffer, rtol=1e-5, atol=1e-5)
