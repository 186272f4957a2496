"""Fused WaveNet residual layer and incremental step (kernels/wavenet.py) against fp64 references."""
import pytest
import torch
import torch.nn.functional as F
from reference_checks import assert_close_to_reference, random_tensor

from genkernels.kernels.wavenet import (
    WaveNetCache,
    wavenet_residual_layer,
    wavenet_residual_layer_reference,
    wavenet_step,
)

NAMES = ("x", "conv_weight", "conv_bias", "residual_weight", "residual_bias", "skip_weight", "skip_bias")


def _layer_inputs(batch, channels, gate, skip, length, ksize, dtype, device, cond=None, seed=0):
    shapes = [(batch, channels, length), (2 * gate, channels, ksize), (2 * gate,), (channels, gate, 1),
              (channels,), (skip, gate), (skip,)]
    scales = [1.0, channels**-0.5, 0.5, gate**-0.5, 0.5, gate**-0.5, 0.5]
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


# ---------------------------------------------------------------------------------------------------------------
# Incremental step
# ---------------------------------------------------------------------------------------------------------------
def _stacked_weights(layers, channels, gate, skip, ksize, dtype, device, seed=30):
    shapes = [(layers, 2 * gate, channels, ksize), (layers, 2 * gate), (layers, channels, gate), (layers, channels),
              (layers, skip, gate), (layers, skip)]
    scales = [channels**-0.5, 0.5, gate**-0.5, 0.5, gate**-0.5, 0.5]
    return [random_tensor(s, dtype, seed + i, device, scale) for i, (s, scale) in enumerate(zip(shapes, scales))]


def _layered_skip_sum(x, weights, dilations, cond_proj):
    """The whole-sequence result the steps must reproduce: the layers one after another (eager, fp64)."""
    wc, bc, wr, br, ws, bs = [w.double() for w in weights]
    h, total = x.double(), 0.0
    for layer, dilation in enumerate(dilations):
        cond = None if cond_proj is None else cond_proj[layer].double()
        h, skip = wavenet_residual_layer_reference(h, wc[layer], bc[layer], wr[layer], br[layer], ws[layer],
                                                   bs[layer], dilation, cond)
        total = total + skip
    return total


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
    elif case == "cond_without_weight":
        cond_args = dict(cond=torch.randn(2, 3))
    elif case == "cond_batch":
        cond_args = dict(cond=torch.randn(3, 3), cond_weight=torch.randn(6, 3))
    with pytest.raises(error, match=name):
        wavenet_residual_layer(*tensors, dilation=dilation, **cond_args)


def test_residual_layer_triton_rejects_float64_and_too_wide_gates(device):
    tensors, _ = _layer_inputs(2, 4, 3, 5, 10, 2, torch.float64, device)
    with pytest.raises(TypeError, match="x"):
        wavenet_residual_layer(*tensors, dilation=1, impl="triton")
    tensors, _ = _layer_inputs(1, 2, 257, 2, 3, 1, torch.float32, device)
    with pytest.raises(ValueError, match="conv_weight"):
        wavenet_residual_layer(*tensors, dilation=1, impl="triton")


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
                          (x, cache.buffer, cache.layer_table, 3, *weights[:2], None, *weights[2:]))


def test_residual_layer_compiles_with_fullgraph(device):
    tensors, _ = _layer_inputs(2, 3, 2, 4, 11, 2, torch.float32, device)
    leaves = [t.requires_grad_() for t in tensors]

    def two_layers(x, *weights):
        h, skip1 = wavenet_residual_layer(x, *weights, dilation=1, impl="triton")
        h, skip2 = wavenet_residual_layer(h, *weights, dilation=2, impl="triton")
        return (skip1 + skip2).square().sum() + h.sum()

    compiled = torch.compile(two_layers, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(*leaves), leaves)
    expected = torch.autograd.grad(two_layers(*leaves), leaves)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_layer_wavenet_sized_on_gpu(dtype, device):
    tensors, cond_args = _layer_inputs(4, 64, 64, 256, 4000, 2, dtype, device, "global")
    _check_layer(tensors, cond_args, 256)
