"""Property-based tests (hypothesis) of the convolution ops: causal_conv1d, masked_conv2d, wavenet_residual_layer.

Each example draws batch, channels, lengths and image sizes (0 and 1 in every dim), kernel sizes, dilations
(some past the whole length), mask types, colour groups, conditioning, layouts (sliced,
transposed, expanded, channels_last), dtypes and special values (NaN, +-Inf, huge, subnormal). impl="triton" must
match the fp64 eager reference (baseline: eager in the same dtype) and plain PyTorch in fp64 (baseline: the same
in the tested dtype); impl="eager" must match plain PyTorch; fp64 under impl="auto" runs the reference and
impl="triton" refuses fp64. Rule: genkernels.bench.correctness.assert_close_to_reference, NaN/Inf pattern included.

The plain versions sum the taps, one shifted input at a time (checked against F.conv1d / F.conv2d where the sizes
allow): taps that fall before t = 0 or outside the image read zero padding, as in F.conv1d / F.conv2d (so a NaN
weight there still gives NaN), while the taps and channel pairs a PixelCNN mask hides are never read, as
masked_conv2d promises: NaN or Inf there must not reach the output (F.conv2d on ``weight * mask`` would let them
through as 0 * NaN).
"""
import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import example, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from genkernels.bench.correctness import (  # noqa: E402
    assert_close_to_reference,
    make_input,
    special_values,
    st_dtypes,
    st_layouts,
    st_special_fills,
)
from op_properties import assert_eager_properties, assert_fp64_properties, assert_gradients, assert_op_properties  # noqa: E402
from genkernels.kernels import causal_conv1d, masked_conv2d, wavenet_residual_layer  # noqa: E402

FP64 = torch.float64
VECTOR_LAYOUTS = ("contiguous", "sliced", "expanded", "storage_offset")


def _all_finite(tensors):
    return all(t is None or bool(torch.isfinite(t).all()) for t in tensors)


def _plain_causal_conv(x, weight, bias, dilation):
    """y[b, o, t] = bias[o] + sum_{i, j} W[o, i, j] xp[b, i, t + j d], xp = x left-padded by (k - 1) d zeros: the
    taps in the padding are zeros times the weight, as in F.conv1d(F.pad(x, ((k - 1) d, 0)), W) (a NaN weight
    there gives NaN, as plain PyTorch does)."""
    batch, _, length = x.shape
    out_channels, _, ksize = weight.shape
    pad = (ksize - 1) * dilation
    padded = F.pad(x, (pad, 0))
    y = torch.zeros((batch, out_channels, length), dtype=x.dtype)
    for j in range(ksize):
        y = y + torch.einsum("oi,bit->bot", weight[:, :, j], padded[:, :, j * dilation:j * dilation + length])
    if bias is not None:
        y = y + bias[:, None]
    if _all_finite((x, weight, bias)) and x.shape[1] and batch and length and out_channels:
        second = F.conv1d(padded, weight, bias, dilation=dilation)
        assert_close_to_reference(second, y, second, "the plain tap sum vs F.conv1d")
    return y


# ----------------------------------------------------------------------------------------------------------------
# causal_conv1d
# ----------------------------------------------------------------------------------------------------------------
@st.composite
def causal_conv_cases(draw, dtypes=st_dtypes(), fills=st_special_fills()):
    batch, c_in, c_out = draw(st.sampled_from((0, 1, 2))), draw(st.integers(0, 3)), draw(st.integers(0, 3))
    length, ksize = draw(st.integers(0, 9)), draw(st.sampled_from((1, 2, 3)))
    dtype = draw(dtypes)
    x_shape, w_shape = (batch, c_in, length), (c_out, c_in, ksize)
    inputs = {"x": make_input(x_shape, dtype, draw(st.integers(0, 99)), layout=draw(st_layouts(x_shape)),
                              fill=draw(fills)),
              "weight": make_input(w_shape, dtype, draw(st.integers(0, 99)), layout=draw(st_layouts(w_shape)),
                                   fill=draw(fills), scale=0.5),
              "bias": None}
    if draw(st.booleans()):
        inputs["bias"] = make_input((c_out,), dtype, draw(st.integers(0, 99)),
                                    layout=draw(st.sampled_from(VECTOR_LAYOUTS)), fill=draw(fills))
    # (dilations of 2**30 and more, issue 11 item 6, are left to the op's own tests: the eager reference pads
    # by (k - 1) * dilation zeros, gigabytes at that size)
    return inputs, {"dilation": draw(st.sampled_from((1, 2, 3, 7)))}


def _causal_run(options):
    return lambda t, impl: causal_conv1d(t["x"], t["weight"], t["bias"], impl=impl, **options)


def _causal_plain(options):
    return lambda t: _plain_causal_conv(t["x"], t["weight"], t["bias"], options["dilation"])


@given(case=causal_conv_cases())
def test_causal_conv1d_triton_matches_the_references(case):
    inputs, options = case
    assert_op_properties(_causal_run(options), _causal_plain(options), inputs, f"causal_conv1d {options}")


@given(case=causal_conv_cases())
def test_causal_conv1d_eager_matches_plain_pytorch(case):
    inputs, options = case
    assert_eager_properties(_causal_run(options), _causal_plain(options), inputs, f"causal_conv1d {options}")


@given(case=causal_conv_cases(dtypes=st.just(torch.float32)))
def test_causal_conv1d_fp64_runs_the_reference(case):
    inputs, options = case
    assert_fp64_properties(_causal_run(options), _causal_plain(options), inputs, f"causal_conv1d {options}")


# ----------------------------------------------------------------------------------------------------------------
# masked_conv2d
# ----------------------------------------------------------------------------------------------------------------
def _pixelcnn_mask(out_channels, in_channels, ksize, mask_type, color_channels):
    """[O, I, k, k] bool: taps above the centre row and left of the centre; at the centre, input colour group
    before (A) or up to (B) the output's (van den Oord et al. 2016, Fig. 2)."""
    pad = ksize // 2
    mask = torch.zeros(out_channels, in_channels, ksize, ksize, dtype=torch.bool)
    mask[:, :, :pad] = True
    mask[:, :, pad, :pad] = True
    out_group = torch.arange(out_channels) * color_channels // max(out_channels, 1)
    in_group = torch.arange(in_channels) * color_channels // max(in_channels, 1)
    if mask_type == "A":
        mask[:, :, pad, pad] = in_group[None, :] < out_group[:, None]
    else:
        mask[:, :, pad, pad] = in_group[None, :] <= out_group[:, None]
    return mask


@st.composite
def masked_conv_cases(draw, dtypes=st_dtypes(), fills=st_special_fills(), hidden_specials=True):
    color = draw(st.sampled_from((1, 3)))
    step = 3 if color == 3 else 1
    low = 0 if color == 1 else 1
    c_in, c_out = step * draw(st.integers(low, 2)), step * draw(st.integers(low, 2))
    batch, height, width = draw(st.sampled_from((0, 1, 2))), draw(st.integers(0, 5)), draw(st.integers(0, 5))
    ksize = draw(st.sampled_from((1, 3, 5)))
    dtype = draw(dtypes)
    x_shape, w_shape = (batch, c_in, height, width), (c_out, c_in, ksize, ksize)
    inputs = {"x": make_input(x_shape, dtype, draw(st.integers(0, 99)), layout=draw(st_layouts(x_shape)),
                              fill=draw(fills)),
              "weight": make_input(w_shape, dtype, draw(st.integers(0, 99)), layout=draw(st_layouts(w_shape)),
                                   fill=draw(fills), scale=0.5),
              "bias": None}
    if hidden_specials and draw(st.booleans()):  # masked-out weights hold NaN and Inf, never to be read
        hidden = ~_pixelcnn_mask(c_out, c_in, ksize, "B", color)  # hidden by both mask types
        if 0 not in inputs["weight"].stride():
            inputs["weight"][hidden & torch.rand(hidden.shape, generator=torch.Generator().manual_seed(7)).lt(0.5)] = \
                float(draw(st.sampled_from(("nan", "inf"))))
    if draw(st.booleans()):
        inputs["bias"] = make_input((c_out,), dtype, draw(st.integers(0, 99)),
                                    layout=draw(st.sampled_from(VECTOR_LAYOUTS)), fill=draw(fills))
    return inputs, {"mask_type": draw(st.sampled_from(("A", "B"))), "color_channels": color}


def _masked_run(options):
    return lambda t, impl: masked_conv2d(t["x"], t["weight"], t["bias"], impl=impl, **options)


def _masked_plain(options):
    def plain(t):
        x, weight, bias = t["x"], t["weight"], t["bias"]
        batch, c_in, height, width = x.shape
        c_out, _, ksize, _ = weight.shape
        pad = ksize // 2
        mask = _pixelcnn_mask(c_out, c_in, ksize, options["mask_type"], options["color_channels"])
        y = torch.zeros((batch, c_out, height, width), dtype=x.dtype)
        padded = F.pad(x, (pad, pad, pad, pad))
        for dy in range(ksize):
            for dx in range(ksize):
                kept = mask[:, :, dy, dx]
                if not kept.any():
                    continue
                window = padded[:, :, dy:dy + height, dx:dx + width]            # [B, I, H, W]
                products = weight[None, :, :, dy, dx, None, None] * window[:, None]  # [B, O, I, H, W]
                y += torch.where(kept[None, :, :, None, None], products, 0).sum(dim=2)
        if bias is not None:
            y = y + bias[:, None, None]
        masked = torch.where(mask, weight, 0)
        if _all_finite((x, masked, bias)) and batch and c_in and c_out and height and width:
            second = F.conv2d(x, masked, bias, padding=pad)
            assert_close_to_reference(second, y, second, "the plain tap sum vs F.conv2d")
        return y
    return plain


def _subnormal_weight_example():
    """Found by this suite: the centre weight is bf16's smallest subnormal and the pixel under it +Inf, so the
    output is -Inf (the math, eager and F.conv2d in bf16); the kernel gives NaN (the subnormal weight read as 0)."""
    weight = torch.tensor([[0.7695, -0.1465, -1.0859], [0.2852, 0.0, -0.6992], [0.2021, 0.4199, -0.3594]])
    weight = weight.to(torch.bfloat16)
    weight[1, 1] = -special_values(torch.bfloat16)["subnormal"]
    x = torch.tensor([1.5391, -0.2930, float("inf")], dtype=torch.bfloat16)
    return ({"x": x.reshape(1, 1, 1, 3), "weight": weight.reshape(1, 1, 3, 3), "bias": None},
            {"mask_type": "B", "color_channels": 1})


@given(case=masked_conv_cases())
@example(case=_subnormal_weight_example())
def test_masked_conv2d_triton_matches_the_references(case):
    inputs, options = case
    assert_op_properties(_masked_run(options), _masked_plain(options), inputs, f"masked_conv2d {options}")


@given(case=masked_conv_cases())
def test_masked_conv2d_eager_matches_plain_pytorch(case):
    inputs, options = case
    assert_eager_properties(_masked_run(options), _masked_plain(options), inputs, f"masked_conv2d {options}")


@given(case=masked_conv_cases(dtypes=st.just(torch.float32)))
def test_masked_conv2d_fp64_runs_the_reference(case):
    inputs, options = case
    assert_fp64_properties(_masked_run(options), _masked_plain(options), inputs, f"masked_conv2d {options}")


# ----------------------------------------------------------------------------------------------------------------
# wavenet_residual_layer
# ----------------------------------------------------------------------------------------------------------------
@st.composite
def wavenet_cases(draw, dtypes=st_dtypes(), fills=st_special_fills()):
    batch, residual, gate = draw(st.sampled_from((0, 1, 2))), draw(st.integers(0, 3)), draw(st.integers(1, 3))
    skip, length, ksize = draw(st.integers(0, 3)), draw(st.integers(0, 7)), draw(st.sampled_from((1, 2, 3)))
    dtype = draw(dtypes)
    shapes = {"x": (batch, residual, length), "conv_weight": (2 * gate, residual, ksize), "conv_bias": (2 * gate,),
              "residual_weight": (residual, gate), "residual_bias": (residual,), "skip_weight": (skip, gate),
              "skip_bias": (skip,)}
    cond = draw(st.sampled_from((None, "global", "local")))
    if cond is not None:
        c = draw(st.integers(0, 2))
        shapes["cond"] = (batch, c) if cond == "global" else (batch, c, length)
        shapes["cond_weight"] = (2 * gate, c)
    inputs = {}
    for name, shape in shapes.items():
        if name.endswith("bias") and draw(st.booleans()):
            inputs[name] = None
            continue
        layouts = VECTOR_LAYOUTS if len(shape) == 1 else None
        layout = draw(st.sampled_from(layouts)) if layouts else draw(st_layouts(shape))
        inputs[name] = make_input(shape, dtype, draw(st.integers(0, 99)), layout=layout,
                                  fill=draw(fills), scale=1.0 if name in ("x", "cond") else 0.5)
    inputs.setdefault("cond", None)
    inputs.setdefault("cond_weight", None)
    return inputs, {"dilation": draw(st.sampled_from((1, 2, 3)))}


def _wavenet_run(options):
    return lambda t, impl: wavenet_residual_layer(
        t["x"], t["conv_weight"], t["conv_bias"], t["residual_weight"], t["residual_bias"], t["skip_weight"],
        t["skip_bias"], cond=t["cond"], cond_weight=t["cond_weight"], impl=impl, **options)


def _wavenet_plain(options):
    def plain(t):
        """van den Oord et al. 2016, eq. 2-3 and Fig. 4."""
        x = t["x"]
        h = _plain_causal_conv(x, t["conv_weight"], t["conv_bias"], options["dilation"])
        if t["cond"] is not None:
            projected = torch.einsum("oc,bc...->bo...", t["cond_weight"], t["cond"])
            h = h + (projected[..., None] if projected.dim() == 2 else projected)
        gate = h.shape[1] // 2
        z = torch.tanh(h[:, :gate]) * torch.sigmoid(h[:, gate:])
        residual = x + torch.einsum("rd,bdt->brt", t["residual_weight"], z)
        skip = torch.einsum("sd,bdt->bst", t["skip_weight"], z)
        if t["residual_bias"] is not None:
            residual = residual + t["residual_bias"][:, None]
        if t["skip_bias"] is not None:
            skip = skip + t["skip_bias"][:, None]
        return residual, skip
    return plain


@given(case=wavenet_cases())
def test_wavenet_residual_layer_triton_matches_the_references(case):
    inputs, options = case
    assert_op_properties(_wavenet_run(options), _wavenet_plain(options), inputs, f"wavenet_residual_layer {options}")


@given(case=wavenet_cases())
def test_wavenet_residual_layer_eager_matches_plain_pytorch(case):
    inputs, options = case
    assert_eager_properties(_wavenet_run(options), _wavenet_plain(options), inputs, f"wavenet_residual_layer {options}")


@given(case=wavenet_cases(dtypes=st.just(torch.float32)))
def test_wavenet_residual_layer_fp64_runs_the_reference(case):
    inputs, options = case
    assert_fp64_properties(_wavenet_run(options), _wavenet_plain(options), inputs, f"wavenet_residual_layer {options}")


# ----------------------------------------------------------------------------------------------------------------
# Gradients (finite inputs)
# ----------------------------------------------------------------------------------------------------------------
@given(case=causal_conv_cases(fills=st.just(None)))
def test_causal_conv1d_triton_gradients_match_the_references(case):
    inputs, options = case
    assert_gradients(_causal_run(options), _causal_plain(options), inputs, ("x", "weight", "bias"),
                      f"causal_conv1d {options}")


@given(case=masked_conv_cases(fills=st.just(None), hidden_specials=False))
def test_masked_conv2d_triton_gradients_match_the_references(case):
    inputs, options = case
    assert_gradients(_masked_run(options), _masked_plain(options), inputs, ("x", "weight", "bias"),
                      f"masked_conv2d {options}")


@given(case=wavenet_cases(fills=st.just(None)))
def test_wavenet_residual_layer_triton_gradients_match_the_references(case):
    inputs, options = case
    names = ("x", "conv_weight", "conv_bias", "residual_weight", "residual_bias", "skip_weight", "skip_bias", "cond",
             "cond_weight")
    assert_gradients(_wavenet_run(options), _wavenet_plain(options), inputs, names,
                      f"wavenet_residual_layer {options}")
