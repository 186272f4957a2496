"""Tests of the public testing API, genkernels.bench.correctness: the rule, the catalogs and check_function."""
import math

import pytest
import torch
import torch.nn.functional as F

from genkernels.bench import correctness as c


# ----------------------------------------------------------------------------------------------------------------
# The tolerance rule
# ----------------------------------------------------------------------------------------------------------------
def _case(dtype=torch.float32):
    ref = torch.linspace(-3, 3, 12, dtype=torch.float64).reshape(3, 4)
    return ref, ref.to(dtype)


def test_rule_accepts_a_result_within_the_bound():
    ref, base = _case(torch.float16)
    err = c.max_abs_error(base, ref)
    actual = (ref + 1.5 * err).to(torch.float16)  # at most 2x the baseline error plus the floor
    c.assert_close_to_reference(actual, ref, base)
    c.assert_close_to_reference(base, ref, base)


def test_rule_rejects_a_result_outside_the_bound_and_says_where():
    ref, base = _case(torch.float32)
    actual = base.clone()
    actual[2, 1] += 1e-3
    with pytest.raises(AssertionError, match=r"y: max error .* exceeds the bound .* index \(2, 1\)"):
        c.assert_close_to_reference(actual, ref, base, "y")


def test_rule_floor_scales_with_the_reference_magnitude():
    ref = torch.full((4,), 1e6, dtype=torch.float64)
    base = ref.float()
    c.assert_close_to_reference(base + 5.0, ref, base)  # 5 <= 1e-5 * 1e6
    with pytest.raises(AssertionError):
        c.assert_close_to_reference(base + 20.0, ref, base)


def test_rule_rejects_nan_where_the_reference_has_a_number():
    ref, base = _case()
    actual = base.clone()
    actual[0, 3] = math.nan
    with pytest.raises(AssertionError, match=r"NaN/Inf pattern.*index \(0, 3\).*expected a finite number"):
        c.assert_close_to_reference(actual, ref, base)


def test_rule_rejects_a_number_where_the_reference_has_nan():
    ref, base = _case()
    ref = ref.clone()
    ref[1, 1] = math.nan
    base = ref.float()
    with pytest.raises(AssertionError, match=r"index \(1, 1\).*expected NaN"):
        c.assert_close_to_reference(ref.float().nan_to_num(0.0), ref, base)
    c.assert_close_to_reference(base, ref, base)


def test_rule_rejects_an_infinity_of_the_wrong_sign():
    ref, _ = _case()
    ref = ref.clone()
    ref[0, 0] = -math.inf
    base = ref.float()
    actual = base.clone()
    actual[0, 0] = math.inf
    with pytest.raises(AssertionError, match=r"expected -Inf"):
        c.assert_close_to_reference(actual, ref, base)
    actual[0, 0] = -1e30
    with pytest.raises(AssertionError, match=r"expected -Inf"):
        c.assert_close_to_reference(actual, ref, base)


def test_rule_expects_overflow_where_the_value_does_not_fit_the_dtype():
    ref = torch.tensor([1.0, 1e6], dtype=torch.float64)
    base = ref.half()  # 1e6 is +Inf in fp16
    c.assert_close_to_reference(base, ref, base)
    with pytest.raises(AssertionError, match="expected \\+Inf"):
        c.assert_close_to_reference(torch.tensor([1.0, 65504.0], dtype=torch.float16), ref, base)


def test_rule_accepts_the_class_plain_pytorch_gets_in_the_same_dtype():
    # an fp32 intermediate overflows where fp64 does not: plain PyTorch's NaN is accepted, another class is not
    ref = torch.tensor([1.0, 2.0], dtype=torch.float64)
    base = torch.tensor([1.0, math.nan])
    c.assert_close_to_reference(torch.tensor([1.0, math.nan]), ref, base)
    c.assert_close_to_reference(torch.tensor([1.0, 2.0]), ref, base)
    c.assert_close_to_reference(torch.tensor([1.0, math.inf]), ref, base)  # plain overflows: any non-finite
    with pytest.raises(AssertionError, match="NaN/Inf"):  # a non-finite value where plain PyTorch has a number
        c.assert_close_to_reference(torch.tensor([1.0, math.inf]), ref, torch.tensor([1.0, 2.0]))
    inf_ref = torch.tensor([math.inf], dtype=torch.float64)
    with pytest.raises(AssertionError, match="NaN/Inf"):  # the reference is +Inf, plain PyTorch NaN: not -Inf
        c.assert_close_to_reference(torch.tensor([-math.inf]), inf_ref, torch.tensor([math.nan]))


def test_rule_rejects_a_wrong_dtype_or_shape():
    ref, base = _case()
    with pytest.raises(AssertionError, match="dtype torch.float16, expected torch.float32"):
        c.assert_close_to_reference(base.half(), ref, base)
    with pytest.raises(AssertionError, match="shape"):
        c.assert_close_to_reference(base.reshape(4, 3), ref, base)
    with pytest.raises(AssertionError, match="shape"):
        c.assert_close_to_reference(base, ref, base[:2])


def test_rule_accepts_empty_tensors():
    empty = torch.empty(0, 3)
    c.assert_close_to_reference(empty, empty.double(), empty)


def test_max_abs_error_counts_matching_specials_as_exact_and_mismatches_as_infinite():
    a = torch.tensor([1.0, math.nan, math.inf, 2.0])
    assert c.max_abs_error(a, a) == 0.0
    assert c.max_abs_error(a, torch.tensor([1.5, math.nan, math.inf, 2.0])) == 0.5
    assert c.max_abs_error(a, torch.tensor([1.0, 0.0, math.inf, 2.0])) == math.inf
    assert c.max_abs_error(a, torch.tensor([1.0, math.nan, -math.inf, 2.0])) == math.inf
    assert c.max_abs_error(torch.empty(0), torch.empty(0)) == 0.0


# ----------------------------------------------------------------------------------------------------------------
# The layout catalog
# ----------------------------------------------------------------------------------------------------------------
VALUES = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", [n for n in c.LAYOUTS if n != "expanded"])
def test_layout_keeps_the_values_in_fresh_memory(name):
    out = c.as_layout(VALUES, name)
    assert out.shape == VALUES.shape and torch.equal(out, VALUES)
    assert out.data_ptr() != VALUES.data_ptr()


def test_layouts_have_the_promised_strides():
    assert c.as_layout(VALUES, "contiguous").is_contiguous()
    channels_last = c.as_layout(VALUES, "channels_last")
    assert channels_last.is_contiguous(memory_format=torch.channels_last) and not channels_last.is_contiguous()
    assert c.as_layout(VALUES, "transposed").stride()[-2:] == (1, 4)
    assert c.as_layout(VALUES, "sliced").stride() == (120, 40, 5, 1)
    assert c.as_layout(VALUES, "sliced", dim=3).stride() == (120, 40, 10, 2)
    assert c.as_layout(VALUES, "batch_sliced").stride() == (120, 20, 5, 1)
    offset = c.as_layout(VALUES, "storage_offset")
    assert offset.is_contiguous() and offset.storage_offset() > 0
    scattered = c.as_layout(torch.randn(2, 2, 3, 2, 3, 2), "scattered")
    assert scattered.stride() == (72, 9, 1, 18, 3, 36)  # memory order of dims: 0, 5, 3, 1, 4, 2
    with pytest.raises(ValueError, match="channels_last"):
        c.as_layout(torch.randn(3, 4), "channels_last")
    with pytest.raises(ValueError, match="unknown layout"):
        c.as_layout(VALUES, "diagonal")


@pytest.mark.parametrize("name", ["sliced", "batch_sliced", "storage_offset"])
def test_gapped_layouts_fill_the_memory_they_skip_with_nan(name):
    out = c.as_layout(VALUES, name)
    storage = torch.empty(0).set_(out.untyped_storage(), 0, (out.untyped_storage().nbytes() // 4,))
    assert int(storage.isnan().sum()) == storage.numel() - VALUES.numel()
    assert storage.isnan().any()


def test_expanded_has_stride_zero_and_broadcasts_the_first_slice():
    out = c.as_layout(VALUES, "expanded")
    assert out.shape == VALUES.shape and out.stride()[1] == 0
    assert torch.equal(out, VALUES[:, :1].expand_as(VALUES))
    bias = c.as_layout(torch.randn(6), "expanded")
    assert bias.stride() == (0,) and torch.all(bias == bias[0])


def test_layouts_for_lists_the_layouts_a_shape_takes():
    assert "channels_last" in c.layouts_for((2, 3, 4, 5)) and "channels_last" not in c.layouts_for((2, 3, 4))
    assert c.layouts_for(()) == ("contiguous",)
    assert "transposed" not in c.layouts_for((7,))


@pytest.mark.parametrize("layout", c.PER_SAMPLE_LAYOUTS, ids=lambda layout: layout.name)
def test_shape_catalog_entries_keep_their_values(layout):
    values = c.random_tensor(layout.shape, torch.float32, seed=1)
    out = layout(values)
    assert out.shape == values.shape and torch.equal(out, values)


def test_shape_catalog_holds_ragged_size_one_empty_and_strided_entries():
    names = {layout.name for layout in c.PER_SAMPLE_LAYOUTS}
    assert {"ragged_nchw", "size_one", "empty_batch", "channels_last", "channel_slice", "batch_slice"} <= names
    assert any(0 in layout.shape for layout in c.PER_SAMPLE_LAYOUTS)


# ----------------------------------------------------------------------------------------------------------------
# The special-value catalog
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_special_values_are_representable_and_complete(dtype):
    values = c.special_values(dtype)
    assert set(values) == set(c.SPECIAL_VALUE_KINDS)
    info = torch.finfo(dtype)
    stored = {k: torch.tensor(v, dtype=dtype).item() for k, v in values.items()}
    assert math.isnan(stored["nan"]) and stored["inf"] == math.inf and stored["-inf"] == -math.inf
    assert stored["zero"] == 0.0 and math.copysign(1.0, stored["-zero"]) == -1.0
    assert stored["max"] == info.max
    assert 0 < stored["subnormal"] < info.smallest_normal
    assert torch.tensor(stored["subnormal"] / 2, dtype=dtype).item() == 0.0  # the smallest one
    assert stored["tiny"] == info.smallest_normal
    assert math.isfinite(stored["huge"]) and not math.isfinite(torch.tensor(stored["huge"], dtype=dtype).square()
                                                               .item())


def test_with_special_values_places_every_kind_and_keeps_the_rest():
    x = torch.randn(4000).to(torch.bfloat16)
    out = c.with_special_values(x, 0.3, torch.Generator().manual_seed(0))
    assert out.dtype == x.dtype and out.shape == x.shape
    for kind, value in c.special_values(torch.bfloat16).items():
        if kind == "nan":
            assert out.isnan().any()
        elif kind in ("zero", "-zero"):
            zeros = out[out == 0]
            assert (torch.signbit(zeros).any() and (~torch.signbit(zeros)).any())
        else:
            assert (out.abs() == abs(torch.tensor(value, dtype=torch.bfloat16))).any(), kind
    changed = ~((out == x) | (out.isnan() & x.isnan()))
    assert 0.2 < changed.double().mean().item() < 0.4
    same = c.with_special_values(x, 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(same.nan_to_num(7.0), out.nan_to_num(7.0))
    assert torch.equal(c.with_special_values(x, 0.0), x)


def test_with_special_values_keeps_the_layout_and_takes_a_subset():
    x = c.as_layout(torch.randn(2, 3, 4, 5), "channels_last")
    out = c.with_special_values(x, 0.5, torch.Generator().manual_seed(3), kinds=("nan",))
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert out.isnan().any() and torch.isfinite(out[~out.isnan()]).all()
    with pytest.raises(ValueError, match="fraction"):
        c.with_special_values(x, 1.5)
    with pytest.raises(ValueError, match="unknown special"):
        c.special_values(torch.float32, ["big"])


# ----------------------------------------------------------------------------------------------------------------
# check_function
# ----------------------------------------------------------------------------------------------------------------
def _silu(x):
    return x * torch.sigmoid(x)


def _ignores_strides(x):
    """Reads the storage as if the tensor were contiguous (the classic launcher bug)."""
    flat = torch.empty(0, dtype=x.dtype).set_(x.untyped_storage(), x.storage_offset(), (x.numel(),))
    return _silu(flat.view(x.shape).float()).to(x.dtype)


def _drops_nan(x):
    return torch.nan_to_num(_silu(x.float()), nan=0.0).to(x.dtype)


def _rounds_badly(x):
    return _silu(x.float()).to(torch.bfloat16).to(x.dtype)


def test_check_function_passes_a_right_function_in_every_dtype_and_layout():
    x = torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(0))
    layouts = c.layouts_for(x.shape)
    cases = c.check_function(lambda x: F.silu(x.float()).to(x.dtype), _silu, {"x": x}, layouts=layouts,
                             special_fraction=0.1, gradients=True, name="silu")
    assert len(cases) == len(c.DTYPES) * len(layouts)


@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded", "channels_last", "scattered"])
def test_check_function_catches_a_function_that_ignores_strides(layout):
    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(1))
    c.check_function(_ignores_strides, _silu, (x,), layouts=("contiguous",))
    with pytest.raises(AssertionError, match=f"layout {layout}"):
        c.check_function(_ignores_strides, _silu, (x,), layouts=(layout,))


def test_check_function_catches_a_function_that_ignores_the_storage_offset():
    def ignores_offset(x):
        flat = torch.empty(0, dtype=x.dtype).set_(x.untyped_storage(), 0, (x.numel(),))
        return _silu(flat.view(x.shape).float()).to(x.dtype)

    x = torch.randn(3, 7, generator=torch.Generator().manual_seed(1))
    c.check_function(ignores_offset, _silu, (x,), layouts=("contiguous",))
    with pytest.raises(AssertionError, match="layout storage_offset"):
        c.check_function(ignores_offset, _silu, (x,), layouts=("storage_offset",))


def test_check_function_catches_a_function_that_drops_nan():
    x = torch.randn(50, generator=torch.Generator().manual_seed(2))
    c.check_function(_drops_nan, _silu, {"x": x})
    with pytest.raises(AssertionError, match="NaN/Inf pattern"):
        c.check_function(_drops_nan, _silu, {"x": x}, special_fraction=0.2, special_kinds=("nan",))


def test_check_function_catches_an_inaccurate_function_but_not_in_its_own_dtype():
    x = torch.randn(50, generator=torch.Generator().manual_seed(3))
    c.check_function(_rounds_badly, _silu, {"x": x}, dtypes=(torch.bfloat16,))
    with pytest.raises(AssertionError, match=r"torch.float32.*max error"):
        c.check_function(_rounds_badly, _silu, {"x": x}, dtypes=(torch.float32,))


def test_check_function_checks_every_output_and_passes_non_tensor_arguments():
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(4))

    def both(x, dim):
        return x.float().softmax(dim).to(x.dtype), x.float().sum(dim)

    def wrong_second(x, dim):
        return x.float().softmax(dim).to(x.dtype), x.float().sum(dim) + 1

    reference = lambda x, dim: (x.softmax(dim), x.sum(dim))  # noqa: E731
    c.check_function(both, reference, {"x": x, "dim": 1}, baseline=both, layouts=("contiguous", "transposed"))
    with pytest.raises(AssertionError, match="output 1"):
        c.check_function(wrong_second, reference, {"x": x, "dim": 1}, baseline=both)


def test_check_function_catches_a_wrong_or_lost_gradient():
    x = torch.randn(20, generator=torch.Generator().manual_seed(5))

    class WrongGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return _silu(x)

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return grad * torch.sigmoid(x)  # misses the x * sigmoid'(x) term

    with pytest.raises(AssertionError, match="gradient of 'x'"):
        c.check_function(WrongGrad.apply, _silu, {"x": x}, gradients=True)
    with pytest.raises(AssertionError, match="no gradient|detached"):
        c.check_function(lambda x: _silu(x).detach(), _silu, {"x": x}, gradients=True)
    with pytest.raises(ValueError, match="grad_inputs"):
        c.check_function(_silu, _silu, {"x": x}, gradients=True, grad_inputs=["y"])


# ----------------------------------------------------------------------------------------------------------------
# The hypothesis strategies
# ----------------------------------------------------------------------------------------------------------------
def test_strategies_draw_edge_sizes_applicable_layouts_and_special_fills():
    pytest.importorskip("hypothesis")
    from hypothesis import given, settings
    from hypothesis import strategies as st

    seen = {"zero": False, "one": False}

    @settings(max_examples=60, derandomize=True, deadline=None)
    @given(shape=c.st_shapes((1, 4), max_side=6), dtype=c.st_dtypes(), fill=c.st_special_fills(), data=st.data())
    def run(shape, dtype, fill, data):
        assert 1 <= len(shape) <= 4 and all(0 <= s <= 6 for s in shape)
        seen["zero"] |= 0 in shape
        seen["one"] |= 1 in shape
        assert dtype in c.DTYPES
        layout = data.draw(c.st_layouts(shape))
        x = c.as_layout(torch.randn(shape).to(dtype), layout)
        assert x.shape == shape
        fraction, kinds, seed = fill
        out = c.with_special_values(x, fraction, torch.Generator().manual_seed(seed), kinds)
        assert out.shape == shape

    run()
    assert seen["zero"] and seen["one"]


# ----------------------------------------------------------------------------------------------------------------
# The small helpers the property suite is built from
# ----------------------------------------------------------------------------------------------------------------
def test_make_input_rounds_fills_and_lays_out():
    x = c.make_input((3, 4), torch.float16, seed=5, layout="transposed", fill=(0.5, ("nan",), 1))
    assert x.dtype == torch.float16 and x.stride() == (1, 3) and x.isnan().any()
    assert torch.equal(x.nan_to_num(0.0) != 0, (~x.isnan()) & (c.random_tensor((3, 4), torch.float16, 5) != 0))
    assert c.make_input((5,), torch.float32, seed=0, layout="channels_last").is_contiguous()  # needs 4-D


def test_cast_floats_casts_only_floating_tensors_and_keeps_strides():
    x = c.as_layout(torch.randn(3, 4), "transposed")
    cast = c.cast_floats({"x": x, "t": torch.tensor([1, 2]), "n": 3, "none": None}, torch.float64)
    assert cast["x"].dtype == torch.float64 and cast["x"].stride() == x.stride()
    assert cast["t"].dtype == torch.int64 and cast["n"] == 3 and cast["none"] is None


def test_compare_outputs_checks_each_output_and_rounds_a_wider_baseline():
    ref = torch.linspace(-2, 2, 9, dtype=torch.float64)
    c.compare_outputs((ref.half(), ref.float()), (ref, ref), (ref.float(), ref.float()))
    with pytest.raises(AssertionError, match="output 1"):
        c.compare_outputs((ref.half(), ref.float() + 1), (ref, ref), (ref.float(), ref.float()))
    with pytest.raises(AssertionError, match="outputs"):
        c.compare_outputs((ref.float(),), (ref, ref), (ref, ref))


def test_input_gradients_pull_the_same_upstream_gradient_back_in_every_dtype():
    x64 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    x32 = x64.detach().float().requires_grad_(True)
    (g64,) = c.input_gradients((x64 * 2, x64.sum(1).long()), [x64], seed=3)
    (g32,) = c.input_gradients((x32 * 2, x32.sum(1).long()), [x32], seed=3)
    assert torch.allclose(g64.float(), g32, atol=1e-6) and g64.abs().sum() > 0
    unused = torch.randn(2, requires_grad=True)
    assert c.input_gradients(x64 * 2, [x64, unused])[1] is None
    assert c.input_gradients(torch.ones(2), [unused]) == [None]
