"""PixelCNN masked convolution (kernels/masked_conv.py) against fp64 F.conv2d on the masked weight."""
import pytest
import torch
import torch.nn.functional as F
from reference_checks import assert_close_to_reference, random_tensor

from genkernels.kernels.masked_conv import kept_taps, masked_conv2d, masked_conv2d_mask, masked_conv2d_reference


def _mask_from_definition(out_channels, in_channels, k, mask_type, colors):
    """The mask rule written out tap by tap, independently of masked_conv2d_mask."""
    p = k // 2
    mask = torch.zeros(out_channels, in_channels, k, k, dtype=torch.float64)
    for o in range(out_channels):
        for i in range(in_channels):
            for dy in range(k):
                for dx in range(k):
                    if dy < p or (dy == p and dx < p):
                        mask[o, i, dy, dx] = 1
                    elif dy == p and dx == p:
                        go = o * colors // out_channels
                        gi = i * colors // in_channels
                        mask[o, i, dy, dx] = float(gi < go if mask_type == "A" else gi <= go)
    return mask


def _inputs(shape, out_channels, k, dtype, device, seed=0, bias=True):
    x = random_tensor(shape, dtype, seed, device)
    weight = random_tensor((out_channels, shape[1], k, k), dtype, seed + 1, device, scale=0.3)
    b = random_tensor((out_channels,), dtype, seed + 2, device) if bias else None
    return x, weight, b


def _check(shape, out_channels, k, mask_type, colors, dtype, device, layout=None, bias=True):
    """Forward and every gradient of the kernel vs fp64 reference, eager in the same dtype as the yardstick;
    masked weights get exactly zero gradient."""
    x, weight, b = _inputs(shape, out_channels, k, dtype, device, bias=bias)
    grad_out = random_tensor((shape[0], out_channels) + tuple(shape[2:]), dtype, 7, device)
    leaves = [x, weight] + ([b] if bias else [])
    results = {}
    for impl in ("triton", "eager"):
        args = [t.detach().clone().requires_grad_() for t in leaves]
        if layout is not None:
            args[0] = layout(args[0].detach()).requires_grad_()
        out = masked_conv2d(args[0], args[1], args[2] if bias else None, mask_type=mask_type, color_channels=colors,
                            impl=impl)
        results[impl] = (out,) + torch.autograd.grad(out, args, grad_out)
    args64 = [t.detach().double().requires_grad_() for t in leaves]
    # The fp64 oracle: F.conv2d on the weight masked by the rule written out tap by tap.
    mask = _mask_from_definition(out_channels, shape[1], k, mask_type, colors).to(device)
    ref = F.conv2d(args64[0], args64[1] * mask, args64[2] if bias else None, padding=k // 2)
    reference = (ref,) + torch.autograd.grad(ref, args64, grad_out.double())
    names = ["output", "grad_x", "grad_weight", "grad_bias"]
    for name, kernel, eager, expected in zip(names, results["triton"], results["eager"], reference):
        assert_close_to_reference(kernel, expected, eager, name)
    grad_weight = results["triton"][2]
    assert torch.equal(grad_weight * (1 - mask.to(dtype)), torch.zeros_like(grad_weight))
    return results["triton"][0]


def test_mask_matches_definition_and_counts_kept_taps():
    for k in (1, 3, 5, 7):
        for mask_type in ("A", "B"):
            for colors, channels in ((1, 4), (3, 6)):
                mask = masked_conv2d_mask(channels, channels, k, mask_type, colors, dtype=torch.float64)
                assert torch.equal(mask, _mask_from_definition(channels, channels, k, mask_type, colors))
                taps_used = int((mask.sum((0, 1)) > 0).sum())
                assert kept_taps(k, mask_type, colors) == taps_used


def test_reference_is_conv_on_masked_weight():
    x, weight, b = _inputs((2, 6, 5, 4), 9, 5, torch.float64, "cpu")
    mask = _mask_from_definition(9, 6, 5, "A", 3)
    torch.testing.assert_close(masked_conv2d_reference(x, weight, b, "A", 3),
                               F.conv2d(x, weight * mask, b, padding=2), rtol=0, atol=0)


@pytest.mark.parametrize("mask_type", ["A", "B"])
@pytest.mark.parametrize("colors", [1, 3])
def test_kernel_size_3_every_mask(mask_type, colors, device):
    _check((2, 6, 9, 7), 9, 3, mask_type, colors, torch.float32, device)


@pytest.mark.parametrize("k, mask_type, colors", [(1, "B", 3), (1, "A", 3), (5, "B", 1), (7, "A", 3), (7, "A", 1)])
def test_kernel_sizes(k, mask_type, colors, device):
    _check((1, 3, 6, 5), 6, k, mask_type, colors, torch.float32, device)


def test_one_by_one_mask_a_without_colours_is_bias_only(device):
    out = _check((2, 4, 3, 3), 5, 1, "A", 1, torch.float32, device)
    assert torch.equal(out, out[:, :, :1, :1].expand_as(out))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype, device):
    _check((2, 6, 5, 7), 6, 3, "B", 3, dtype, device)


@pytest.mark.parametrize("layout", [
    lambda t: t.contiguous(memory_format=torch.channels_last),
    lambda t: torch.cat([t, t], dim=1)[:, ::2],
    lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2),
], ids=["channels_last", "channel_slice", "transposed_hw"])
def test_non_contiguous_input(layout, device):
    _check((2, 3, 5, 6), 6, 3, "A", 3, torch.float32, device, layout=layout)


def test_no_bias_and_single_pixel(device):
    _check((1, 3, 1, 1), 3, 3, "B", 3, torch.float32, device, bias=False)


def test_strided_weight_and_bias(device):
    """A weight and bias that are views (every other output channel) give the result of their copies."""
    x, weight, b = _inputs((1, 3, 4, 5), 12, 3, torch.float32, device)
    strided = masked_conv2d(x, weight[::2], b[::2], mask_type="A", color_channels=3, impl="triton")
    dense = masked_conv2d(x, weight[::2].contiguous(), b[::2].contiguous(), mask_type="A", color_channels=3,
                          impl="triton")
    assert torch.equal(strided, dense)


def test_empty_batch(device):
    x, weight, b = _inputs((0, 3, 4, 4), 6, 3, torch.float32, device)
    x.requires_grad_()
    weight.requires_grad_()
    out = masked_conv2d(x, weight, b, impl="triton")
    assert out.shape == (0, 6, 4, 4)
    grad_x, grad_w = torch.autograd.grad(out.sum(), (x, weight))
    assert grad_x.shape == x.shape and torch.equal(grad_w, torch.zeros_like(weight))


@pytest.mark.parametrize("mask_type", ["A", "B"])
def test_causality(mask_type, device):
    """Changing the G input of pixel q changes no output the mask hides from it: every output before q in raster
    order, R outputs at q, and (mask A) G outputs at q; the outputs that may see it do change."""
    x, weight, b = _inputs((1, 3, 6, 6), 6, 5, torch.float32, device)
    q = (2, 3)
    changed = x.clone()
    changed[0, 1, q[0], q[1]] += 5.0
    before = masked_conv2d(x, weight, b, mask_type=mask_type, color_channels=3, impl="triton")
    after = masked_conv2d(changed, weight, b, mask_type=mask_type, color_channels=3, impl="triton")
    differs = (before != after)[0]  # [channels, H, W]; output channels 0-1 R, 2-3 G, 4-5 B
    raster = torch.arange(36, device=device).view(6, 6)
    earlier = raster < q[0] * 6 + q[1]
    assert not differs[:, earlier].any()
    at_q = differs[:, q[0], q[1]]
    assert not at_q[:2].any()
    if mask_type == "B":
        assert at_q[2:4].all()
    else:
        assert not at_q[2:4].any()
    assert at_q[4:].all()
    assert differs[:, q[0] + 1, q[1]].all()  # the pixel below sees q through the row above


def test_bad_input():
    x, weight, b = _inputs((1, 3, 4, 4), 6, 3, torch.float32, "cpu")
    cases = [
        (TypeError, "x", dict(x=x.long())),
        (ValueError, "x", dict(x=x[0])),
        (ValueError, "weight", dict(weight=weight[0])),
        (ValueError, "weight", dict(weight=torch.randn(6, 3, 4, 4))),
        (ValueError, "weight", dict(weight=torch.randn(6, 3, 3, 5))),
        (ValueError, "weight", dict(weight=torch.randn(6, 4, 3, 3))),
        (TypeError, "weight", dict(weight=weight.double())),
        (ValueError, "bias", dict(bias=torch.randn(5))),
        (TypeError, "bias", dict(bias=b.half())),
        (ValueError, "weight on meta", dict(weight=weight.to("meta"))),
        (ValueError, "in_channels=4", dict(x=torch.randn(1, 4, 4, 4), weight=torch.randn(6, 4, 3, 3),
                                           color_channels=3)),
        (ValueError, "out_channels=5", dict(weight=torch.randn(5, 3, 3, 3), bias=None, color_channels=3)),
        (ValueError, "mask_type", dict(mask_type="C")),
        (ValueError, "color_channels", dict(color_channels=2)),
        (ValueError, "impl", dict(impl="cuda")),
    ]
    for error, name, change in cases:
        args = dict(x=x, weight=weight, bias=b)
        args.update(change)
        with pytest.raises(error, match=name):
            masked_conv2d(**args)


def test_opcheck(device):
    x, weight, b = _inputs((1, 3, 3, 4), 6, 3, torch.float32, device)
    args = (x.requires_grad_(), weight.requires_grad_(), b.requires_grad_(), "A", 3)
    torch.library.opcheck(torch.ops.genkernels.masked_conv2d.default, args)


def test_compiles_with_fullgraph(device):
    """Two masked layers and their backward in one aot_eager graph, matching the uncompiled run."""
    x, weight, b = _inputs((1, 3, 4, 5), 6, 3, torch.float32, device)
    weight2 = random_tensor((3, 6, 1, 1), torch.float32, 9, device)

    def layers(x, weight, weight2):
        hidden = masked_conv2d(x, weight, b, mask_type="A", color_channels=3, impl="triton")
        return masked_conv2d(torch.relu(hidden), weight2, mask_type="B", color_channels=3, impl="triton")

    compiled = torch.compile(layers, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, layers):
        args = [t.detach().clone().requires_grad_() for t in (x, weight, weight2)]
        out = fn(*args)
        results.append((out,) + torch.autograd.grad(out.square().sum(), args))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pixelcnn_size_on_gpu(dtype, device):
    _check((8, 96, 32, 32), 96, 7, "A", 3, dtype, device)
    _check((8, 128, 33, 31), 128, 3, "B", 1, dtype, device)
