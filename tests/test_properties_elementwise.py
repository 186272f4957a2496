"""Property-based tests (hypothesis) of the elementwise and per-sample ops: bias_act, group_norm_silu,
reparameterize_kl, affine_coupling.

Each example draws shapes (0 and 1 in every dim), layouts, dtypes, options and special values (NaN, +-Inf, huge,
subnormal). impl="triton" must match the fp64 eager reference (baseline: eager in the same dtype) and plain
PyTorch in fp64 (baseline: plain PyTorch in the same dtype); impl="eager" must match plain PyTorch; fp64 under
impl="auto" runs the reference, and impl="triton" refuses fp64 with a ValueError. The rule, NaN/Inf pattern
included, is genkernels.bench.correctness.assert_close_to_reference. Profiles: tests/conftest.py ("ci" default,
``--hypothesis-profile thorough`` for a long run).
"""
import math

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import example, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from genkernels.bench.correctness import (  # noqa: E402
    compare_outputs,
    make_input,
    st_dtypes,
    st_layouts,
    st_shapes,
    st_special_fills,
)
from op_properties import assert_eager_properties, assert_fp64_properties, assert_gradients, assert_op_properties  # noqa: E402
from genkernels.kernels import affine_coupling, bias_act, group_norm_silu, reparameterize_kl  # noqa: E402
from genkernels.kernels.bias_act import ACTIVATIONS  # noqa: E402

FP64 = torch.float64
VECTOR_LAYOUTS = ("contiguous", "sliced", "expanded", "storage_offset")


# ----------------------------------------------------------------------------------------------------------------
# bias_act
# ----------------------------------------------------------------------------------------------------------------
SQRT2 = math.sqrt(2.0)
# StyleGAN2's bias_act table, in plain PyTorch: (function of s and alpha, default alpha, default gain)
PLAIN_ACTIVATIONS = {
    "linear": (lambda s, a: s, 0.0, 1.0),
    "relu": (lambda s, a: F.relu(s), 0.0, SQRT2),
    "lrelu": (lambda s, a: F.leaky_relu(s, a), 0.2, SQRT2),
    "tanh": (lambda s, a: torch.tanh(s), 0.0, 1.0),
    "sigmoid": (lambda s, a: torch.sigmoid(s), 0.0, 1.0),
    "silu": (lambda s, a: F.silu(s), 0.0, 1.0),
    "elu": (lambda s, a: F.elu(s, a), 1.0, 1.0),
    "selu": (lambda s, a: F.selu(s), 0.0, 1.0),
    "softplus": (lambda s, a: F.softplus(s), 0.0, 1.0),
    "swish": (lambda s, a: s * torch.sigmoid(s), 0.0, SQRT2),
    "gelu": (lambda s, a: F.gelu(s), 0.0, 1.0),  # GELU's definition, erf (issue 11 item 13)
    "gelu_tanh": (lambda s, a: F.gelu(s, approximate="tanh"), 0.0, 1.0),
}


@st.composite
def bias_act_cases(draw, dtypes=st_dtypes(), fills=st_special_fills()):
    shape = draw(st_shapes((1, 4), max_side=5))
    dtype = draw(dtypes)
    dim = draw(st.integers(0, len(shape) - 1))
    x = make_input(shape, dtype, draw(st.integers(0, 99)), layout=draw(st_layouts(shape)), fill=draw(fills),
                   scale=draw(st.sampled_from((1.0, 4.0))))
    inputs = {"x": x, "bias": None}
    if draw(st.booleans()):
        inputs["bias"] = make_input((shape[dim],), dtype, draw(st.integers(0, 99)),
                                    layout=draw(st.sampled_from(VECTOR_LAYOUTS)), fill=draw(fills))
    act = draw(st.sampled_from(sorted(set(ACTIVATIONS) & set(PLAIN_ACTIVATIONS))))
    options = {"dim": dim, "act": act,
               "alpha": draw(st.sampled_from((None, 0.1, 0.5))) if act in ("lrelu", "elu") else None,
               "gain": draw(st.sampled_from((None, 1.0, 0.5))),
               "clamp": draw(st.sampled_from((None, None, 0.0, 0.7, 256.0)))}
    return inputs, options


def _bias_act_run(options):
    return lambda t, impl: bias_act(t["x"], t["bias"], impl=impl, **options)


def _bias_act_plain(options):
    def plain(t):
        fn, default_alpha, default_gain = PLAIN_ACTIVATIONS[options["act"]]
        x, bias = t["x"], t["bias"]
        s = x if bias is None else x + bias.reshape([-1 if d == options["dim"] else 1 for d in range(x.dim())])
        alpha = default_alpha if options["alpha"] is None else options["alpha"]
        gain = default_gain if options["gain"] is None else options["gain"]
        y = fn(s, alpha) * gain
        if options["clamp"] is not None:
            y = y.clamp(-options["clamp"], options["clamp"])
        return y.to(x.dtype)
    return plain


def test_every_bias_act_activation_has_a_plain_pytorch_version_here():
    assert set(ACTIVATIONS) <= set(PLAIN_ACTIVATIONS), sorted(set(ACTIVATIONS) - set(PLAIN_ACTIVATIONS))


@given(case=bias_act_cases())
def test_bias_act_triton_matches_the_references(case):
    inputs, options = case
    assert_op_properties(_bias_act_run(options), _bias_act_plain(options), inputs, f"bias_act {options}")


@given(case=bias_act_cases())
def test_bias_act_eager_matches_plain_pytorch(case):
    inputs, options = case
    assert_eager_properties(_bias_act_run(options), _bias_act_plain(options), inputs, f"bias_act {options}")


@given(case=bias_act_cases(dtypes=st.just(torch.float32)))
def test_bias_act_fp64_runs_the_reference(case):
    inputs, options = case
    assert_fp64_properties(_bias_act_run(options), _bias_act_plain(options), inputs, f"bias_act {options}")


# ----------------------------------------------------------------------------------------------------------------
# group_norm_silu
# ----------------------------------------------------------------------------------------------------------------
@st.composite
def group_norm_cases(draw, dtypes=st_dtypes(), fills=st_special_fills()):
    groups = draw(st.integers(1, 3))
    channels = groups * draw(st.integers(1, 3))
    spatial = draw(st_shapes((0, 2), max_side=5))
    shape = (draw(st.sampled_from((0, 1, 2))), channels) + spatial
    dtype = draw(dtypes)
    inputs = {"x": make_input(shape, dtype, draw(st.integers(0, 99)), layout=draw(st_layouts(shape)),
                              fill=draw(fills), scale=draw(st.sampled_from((1.0, 3.0)))),
              "weight": None, "bias": None}
    for name in ("weight", "bias"):
        if draw(st.booleans()):
            param_dtype = draw(st.sampled_from((dtype, torch.float32)))
            inputs[name] = make_input((channels,), param_dtype, draw(st.integers(0, 99)),
                                      layout=draw(st.sampled_from(VECTOR_LAYOUTS)), fill=draw(fills))
    options = {"num_groups": groups, "eps": draw(st.sampled_from((1e-5, 1e-2))),
               "activation": draw(st.sampled_from(("silu", None)))}
    return inputs, options


def _group_norm_run(options):
    return lambda t, impl: group_norm_silu(t["x"], options["num_groups"], t["weight"], t["bias"], options["eps"],
                                           activation=options["activation"], impl=impl)


def _group_norm_plain(options):
    def plain(t):
        """Wu & He 2018: biased mean and variance over each sample's groups, then the affine and SiLU; written out
        (F.group_norm refuses a group of one element and its backward fails on an empty batch), and checked
        against F.group_norm where it runs."""
        x, groups, eps = t["x"], options["num_groups"], options["eps"]
        weight = None if t["weight"] is None else t["weight"].to(x.dtype)
        bias = None if t["bias"] is None else t["bias"].to(x.dtype)
        grouped = x.reshape(x.shape[0], groups, math.prod(x.shape[1:]) // groups)
        mean = grouped.mean(dim=2, keepdim=True)
        var = ((grouped - mean) ** 2).mean(dim=2, keepdim=True)
        y = ((grouped - mean) / torch.sqrt(var + eps)).reshape(x.shape)
        view = (1, -1) + (1,) * (x.dim() - 2)
        if weight is not None:
            y = y * weight.reshape(view)
        if bias is not None:
            y = y + bias.reshape(view)
        if x.numel() and grouped.shape[2] > 1 and x.dtype == FP64 and _all_finite((x, weight, bias)):
            second = F.group_norm(x.detach(), groups, None if weight is None else weight.detach(),
                                  None if bias is None else bias.detach(), eps)
            compare_outputs(y.detach(), second, second, "the written-out group norm vs F.group_norm")
        return F.silu(y) if options["activation"] == "silu" else y
    return plain


def _all_finite(tensors):
    return all(t is None or bool(torch.isfinite(t).all()) for t in tensors)


@given(case=group_norm_cases())
def test_group_norm_silu_triton_matches_the_references(case):
    inputs, options = case
    assert_op_properties(_group_norm_run(options), _group_norm_plain(options), inputs, f"group_norm_silu {options}")


@given(case=group_norm_cases())
def test_group_norm_silu_eager_matches_plain_pytorch(case):
    inputs, options = case
    assert_eager_properties(_group_norm_run(options), _group_norm_plain(options), inputs,
                             f"group_norm_silu {options}")


@given(case=group_norm_cases(dtypes=st.just(torch.float32)))
def test_group_norm_silu_fp64_runs_the_reference(case):
    inputs, options = case
    assert_fp64_properties(_group_norm_run(options), _group_norm_plain(options), inputs,
                            f"group_norm_silu {options}")


# ----------------------------------------------------------------------------------------------------------------
# reparameterize_kl
# ----------------------------------------------------------------------------------------------------------------
@st.composite
def reparameterize_cases(draw, dtypes=st_dtypes(), fills=st_special_fills()):
    shape = draw(st_shapes((1, 4), max_side=5))
    dtype = draw(dtypes)
    inputs = {}
    for name, scale in (("mu", 1.0), ("logvar", draw(st.sampled_from((1.0, 8.0)))), ("noise", 1.0)):
        tensor_dtype = draw(st.sampled_from((dtype, torch.float32))) if name == "noise" else dtype
        inputs[name] = make_input(shape, tensor_dtype, draw(st.integers(0, 99)), layout=draw(st_layouts(shape)),
                                  fill=draw(fills), scale=scale)
    return inputs


def _reparameterize_run(t, impl):
    return reparameterize_kl(t["mu"], t["logvar"], noise=t["noise"], impl=impl)


def _reparameterize_plain(t):
    """Kingma & Welling 2014, eq. 10 and appendix B; the KL term written as (e^l - 1 - l) / 2 + mu^2 / 2."""
    mu, logvar, noise = t["mu"], t["logvar"], t["noise"].to(t["mu"].dtype)
    # exp(logvar / 2) * 0 is 0 for any finite logvar (the op's documented "finite whenever the product is"), where
    # the formula overflows exp to Inf first even in fp64 (logvar near the fp32 max) and gives Inf * 0 = NaN
    z = mu + torch.where((noise == 0) & torch.isfinite(logvar), torch.zeros_like(noise),
                         torch.exp(0.5 * logvar) * noise)
    terms = -0.5 * (1 + logvar - mu * mu - torch.exp(logvar))
    # the math's limit where logvar = +Inf (the KL of an infinite variance is +Inf), where the formula's
    # exp(logvar) - logvar is Inf - Inf = NaN: the contract asks for +-Inf where the math gives +-Inf
    terms = torch.where(logvar == float("inf"), torch.where(mu.isnan(), mu, torch.full_like(terms, float("inf"))),
                        terms)
    return z, terms.reshape(mu.shape[0], math.prod(mu.shape[1:])).sum(dim=1)


@given(inputs=reparameterize_cases())
def test_reparameterize_kl_triton_matches_the_references(inputs):
    assert_op_properties(_reparameterize_run, _reparameterize_plain, inputs, "reparameterize_kl")


@given(inputs=reparameterize_cases())
def test_reparameterize_kl_eager_matches_plain_pytorch(inputs):
    assert_eager_properties(_reparameterize_run, _reparameterize_plain, inputs, "reparameterize_kl")


@given(inputs=reparameterize_cases(dtypes=st.just(torch.float32)))
def test_reparameterize_kl_fp64_runs_the_reference(inputs):
    assert_fp64_properties(_reparameterize_run, _reparameterize_plain, inputs, "reparameterize_kl")


# ----------------------------------------------------------------------------------------------------------------
# affine_coupling
# ----------------------------------------------------------------------------------------------------------------
@st.composite
def coupling_cases(draw, dtypes=st_dtypes(), fills=st_special_fills()):
    shape = draw(st_shapes((2, 4), max_side=5))
    dtype = draw(dtypes)
    inputs = {name: make_input(shape, dtype, draw(st.integers(0, 99)), layout=draw(st_layouts(shape)),
                               fill=draw(fills), scale=draw(st.sampled_from((1.0, 4.0))))
              for name in ("x", "log_scale", "shift")}
    return inputs, {"scale_fn": draw(st.sampled_from(("exp", "sigmoid"))), "reverse": draw(st.booleans())}


def _coupling_run(options):
    return lambda t, impl: affine_coupling(t["x"], t["log_scale"], t["shift"], impl=impl, **options)


def _coupling_plain(options):
    def plain(t):
        """RealNVP eq. 7-9 (exp) and Glow's sigmoid(raw + 2) scale; log s by F.logsigmoid, PyTorch's stable form."""
        x, raw, shift = t["x"], t["log_scale"], t["shift"]
        if options["scale_fn"] == "exp":
            log_s = raw
            y = (x - shift) * torch.exp(-raw) if options["reverse"] else x * torch.exp(raw) + shift
        else:
            log_s = F.logsigmoid(raw + 2)
            s = torch.sigmoid(raw + 2)
            y = (x - shift) / s if options["reverse"] else x * s + shift
        logdet = log_s.sum(dim=tuple(range(1, x.dim())))
        return y, -logdet if options["reverse"] else logdet
    return plain


@given(case=coupling_cases())
def test_affine_coupling_triton_matches_the_references(case):
    inputs, options = case
    assert_op_properties(_coupling_run(options), _coupling_plain(options), inputs, f"affine_coupling {options}")


@given(case=coupling_cases())
def test_affine_coupling_eager_matches_plain_pytorch(case):
    inputs, options = case
    assert_eager_properties(_coupling_run(options), _coupling_plain(options), inputs, f"affine_coupling {options}")


@given(case=coupling_cases(dtypes=st.just(torch.float32)))
def test_affine_coupling_fp64_runs_the_reference(case):
    inputs, options = case
    assert_fp64_properties(_coupling_run(options), _coupling_plain(options), inputs, f"affine_coupling {options}")


# ----------------------------------------------------------------------------------------------------------------
# Gradients (finite inputs: the backward's own NaN/Inf handling follows the forward's, tested above)
# ----------------------------------------------------------------------------------------------------------------
@given(case=bias_act_cases(fills=st.just(None)))
# found by this suite: bf16 output 0.69921875 (0.7 rounded) not counted as clamped, so the gradient passes through
@example(case=({"x": torch.tensor([1.5391], dtype=torch.bfloat16), "bias": None},
               {"dim": 0, "act": "elu", "alpha": None, "gain": None, "clamp": 0.7}))
def test_bias_act_triton_gradients_match_the_references(case):
    inputs, options = case
    assert_gradients(_bias_act_run(options), _bias_act_plain(options), inputs, ("x", "bias"), f"bias_act {options}")


@given(case=group_norm_cases(fills=st.just(None)))
# found by this suite: the fp32 bias gradient of a bf16 input, about one bf16 ulp off
@example(case=({"x": torch.tensor([[1.5391], [-0.2930]], dtype=torch.bfloat16), "weight": None,
                "bias": torch.tensor([0.6614])}, {"num_groups": 1, "eps": 1e-5, "activation": "silu"}))
def test_group_norm_silu_triton_gradients_match_the_references(case):
    inputs, options = case
    assert_gradients(_group_norm_run(options), _group_norm_plain(options), inputs, ("x", "weight", "bias"),
                      f"group_norm_silu {options}")


@given(inputs=reparameterize_cases(fills=st.just(None)))
def test_reparameterize_kl_triton_gradients_match_the_references(inputs):
    assert_gradients(_reparameterize_run, _reparameterize_plain, inputs, ("mu", "logvar"), "reparameterize_kl")


@given(case=coupling_cases(fills=st.just(None)))
def test_affine_coupling_triton_gradients_match_the_references(case):
    inputs, options = case
    assert_gradients(_coupling_run(options), _coupling_plain(options), inputs, ("x", "log_scale", "shift"),
                      f"affine_coupling {options}")
