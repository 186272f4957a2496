"""Checking a kernel against a reference: the tolerance rule, the layout catalog and the special-value catalog.

This is the testing layer genkernels' own tests use, public so that a kernel of yours is tested the same way::

    from genkernels.bench.correctness import check_function

    check_function(my_fused_gelu, lambda x: torch.nn.functional.gelu(x), {"x": torch.randn(7, 33)},
                   layouts=("contiguous", "sliced", "transposed", "expanded"), gradients=True,
                   special_fraction=0.1)

runs ``my_fused_gelu`` in fp32, fp16 and bf16 on each memory layout of the same values (NaN, +-Inf, huge and
subnormal values sprinkled in), the reference in fp64 on exactly those values, and requires every output (and
every input gradient) to pass :func:`assert_close_to_reference`.

The tolerance rule (flash-attn's, extended to non-finite values). With ``ref`` the result in fp64 and
``baseline`` the plain-PyTorch result in the tested dtype:

* shape and dtype are those of ``baseline``;
* NaN exactly where ``ref`` (rounded to the tested dtype) is NaN, and +-Inf exactly where it is +-Inf with the
  same sign; where plain PyTorch itself gets another class in that dtype (an fp32 intermediate overflowing where
  fp64 does not), the baseline's class is accepted too, and where it overflows a finite reference, any non-finite
  value (which one depends on the order of the arithmetic);
* on the positions where all three are finite,
  ``max|actual - ref| <= 2 * max|baseline - ref| + ATOL_FLOOR[dtype] * max(1, max|ref|)``:
  a kernel may be at most twice as wrong as plain PyTorch in the same dtype, plus a small floor.

Only torch and numpy are imported here; hypothesis is imported by the ``st_*`` strategies when they are called.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch

__all__ = [
    "ATOL_FLOOR", "DTYPES", "LAYOUTS", "Layout", "PER_SAMPLE_LAYOUTS", "SPECIAL_VALUE_KINDS",
    "as_layout", "assert_close_to_reference", "assert_standard_normal", "cast_floats", "check_function",
    "compare_outputs", "input_gradients", "layouts_for", "make_input", "max_abs_error", "random_tensor",
    "special_values", "with_special_values",
    "st_dtypes", "st_layouts", "st_shapes", "st_special_fills",
]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""The dtypes kernels take (fp32 math inside); fp64 is the reference's."""

ATOL_FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}
"""Per-dtype floor of the tolerance rule, relative to ``max(1, max|ref|)``: about 100 ulps of fp32, 1-2 of
fp16 and bf16 (a result one rounding away from the reference always passes)."""


# ----------------------------------------------------------------------------------------------------------------
# The tolerance rule
# ----------------------------------------------------------------------------------------------------------------
def _classes(t: torch.Tensor) -> torch.Tensor:
    """Per element: 0 finite, 1 NaN, 2 +Inf, 3 -Inf (int8, t's shape)."""
    out = torch.zeros(t.shape, dtype=torch.int8, device=t.device)
    if not (t.is_floating_point() or t.is_complex()):
        return out
    out[torch.isnan(t)] = 1
    out[t == math.inf] = 2
    out[t == -math.inf] = 3
    return out


_CLASS_NAMES = ("a finite number", "NaN", "+Inf", "-Inf")


def max_abs_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """``max_i |value_i - reference_i|`` computed in fp64, 0.0 for empty tensors.

    Positions where both hold NaN, or both the same infinity, count as exact; any other non-finite disagreement
    (NaN against a number, +Inf against -Inf or a number) counts as ``inf``. The shapes must broadcast.
    """
    if value.numel() == 0 or reference.numel() == 0:
        return 0.0
    a, b = torch.broadcast_tensors(value.detach().to(torch.float64), reference.detach().to(torch.float64))
    same_special = (torch.isnan(a) & torch.isnan(b)) | (torch.isinf(a) & (a == b))
    diff = torch.where(same_special, torch.zeros_like(a), (a - b).abs())
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, math.inf), diff)
    return diff.max().item()


def _cpu64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64)


def _describe_position(index: Sequence[int], actual, reference, baseline) -> str:
    return (f"at index {tuple(int(i) for i in index)}: got {actual!r}, reference {reference!r}"
            + ("" if baseline is None else f", plain PyTorch {baseline!r}"))


def assert_close_to_reference(actual: torch.Tensor, reference: torch.Tensor, baseline: torch.Tensor,
                              name: str = "output") -> None:
    """Assert the tolerance rule (module docstring) for one result; raise ``AssertionError`` saying where.

    Args:
        actual: the result under test.
        reference: the same result in fp64 (or the highest precision available), same shape.
        baseline: the plain-PyTorch result in the tested dtype; fixes the expected dtype and the error budget
            ``2 * max|baseline - ref|``. Pass ``actual``'s own rounding of the reference
            (``reference.to(actual.dtype)``) when there is no plain-PyTorch version.
        name: what the message calls the result.

    The rule, with ``r = reference`` and ``e = reference`` rounded to ``baseline.dtype``:
        shape(actual) == shape(reference) == shape(baseline), dtype(actual) == dtype(baseline);
        class(actual_i) == class(e_i) for classes {finite, NaN, +Inf, -Inf}, or == class(baseline_i), or
            actual_i and baseline_i are both non-finite where e_i is finite;
        max_{i finite} |actual_i - r_i| <= 2 * max_{i finite} |baseline_i - r_i| + ATOL_FLOOR[dtype] * max(1, max|r|)
    where "i finite" runs over the positions where actual, e and baseline are all finite.
    """
    if tuple(actual.shape) != tuple(reference.shape) or tuple(baseline.shape) != tuple(reference.shape):
        raise AssertionError(f"{name}: shape {tuple(actual.shape)}, reference {tuple(reference.shape)}, "
                             f"plain PyTorch {tuple(baseline.shape)}: all three must agree")
    if actual.dtype != baseline.dtype:
        raise AssertionError(f"{name}: dtype {actual.dtype}, expected {baseline.dtype} (plain PyTorch's)")
    if actual.numel() == 0:
        return
    got, ref, base = _cpu64(actual), _cpu64(reference), _cpu64(baseline)
    rounded = _cpu64(reference.detach().to(baseline.dtype)) if baseline.is_floating_point() else ref
    got_class, want_class, base_class = _classes(got), _classes(rounded), _classes(base)
    # where plain PyTorch overflows in this dtype (non-finite where the reference is finite), which non-finite
    # value comes out depends on the order of the arithmetic: any is accepted there
    plain_overflows = (want_class == 0) & (base_class != 0) & (got_class != 0)
    bad_class = (got_class != want_class) & (got_class != base_class) & ~plain_overflows
    if bool(bad_class.any()):
        index = bad_class.nonzero()[0].tolist()
        count = int(bad_class.sum())
        raise AssertionError(
            f"{name}: {count} of {got.numel()} elements have the wrong NaN/Inf pattern; first "
            + _describe_position(index, got[tuple(index)].item(), ref[tuple(index)].item(), base[tuple(index)].item())
            + f" (expected {_CLASS_NAMES[int(want_class[tuple(index)])]})")
    # the accuracy bound holds where the result, the reference and plain PyTorch are all finite: where plain
    # PyTorch itself is not, it sets no error budget there (and the class check above already ran)
    finite = (got_class == 0) & (want_class == 0) & torch.isfinite(ref) & (base_class == 0)
    if not bool(finite.any()):
        return
    base_ok = finite
    got_err = torch.where(finite, (got - ref).abs(), torch.zeros_like(got))
    base_err = torch.where(base_ok, (base - ref).abs(), torch.zeros_like(base))
    scale = max(1.0, torch.where(finite, ref.abs(), torch.zeros_like(ref)).max().item())
    floor = ATOL_FLOOR.get(baseline.dtype, 0.0) * scale
    bound = 2 * base_err.max().item() + floor
    worst = got_err.argmax()
    error = got_err.flatten()[worst].item()
    if not error <= bound:
        index = [int(i) for i in torch.unravel_index(worst, got.shape)]
        raise AssertionError(
            f"{name}: max error {error:.3e} vs the fp64 reference exceeds the bound {bound:.3e} "
            f"(2 x plain PyTorch's {baseline.dtype} error {base_err.max().item():.3e} + floor {floor:.3e}); worst "
            + _describe_position(index, got[tuple(index)].item(), ref[tuple(index)].item(),
                                 base[tuple(index)].item()))


# ----------------------------------------------------------------------------------------------------------------
# The layout catalog: the same values laid out in memory in different ways
# ----------------------------------------------------------------------------------------------------------------
def _gap_fill(dtype: torch.dtype) -> float:
    """What fills memory a view skips: NaN for floats (a kernel reading a gap shows up), the max for ints."""
    if dtype.is_floating_point:
        return math.nan
    if dtype == torch.bool:
        return True
    return torch.iinfo(dtype).max


def _default_dim(x: torch.Tensor) -> int:
    return 1 if x.dim() > 1 else 0


def _contiguous(x: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    return x.contiguous()


def _channels_last(x: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    if x.dim() != 4:
        raise ValueError(f"layout 'channels_last' needs a 4-D tensor; got shape {tuple(x.shape)}")
    return x.contiguous(memory_format=torch.channels_last)


def _transposed(x: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    if x.dim() < 2:
        raise ValueError(f"layout 'transposed' needs at least 2 dims; got shape {tuple(x.shape)}")
    return x.transpose(-1, -2).contiguous().transpose(-1, -2)


def _sliced(x: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    dim = _default_dim(x) if dim is None else dim % max(x.dim(), 1)
    if x.dim() == 0:
        raise ValueError("layout 'sliced' needs at least 1 dim")
    shape = list(x.shape)
    shape[dim] *= 2
    wide = torch.full(shape, _gap_fill(x.dtype), dtype=x.dtype, device=x.device)
    view = wide[(slice(None),) * dim + (slice(None, None, 2),)]
    view.copy_(x)
    return view


def _batch_sliced(x: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    return _sliced(x, 0)


def _storage_offset(x: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    offset = 3
    buffer = torch.full((x.numel() + offset,), _gap_fill(x.dtype), dtype=x.dtype, device=x.device)
    view = buffer[offset:].view(x.shape)
    view.copy_(x)
    return view


def _expanded(x: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    if x.dim() == 0:
        raise ValueError("layout 'expanded' needs at least 1 dim")
    dim = _default_dim(x) if dim is None else dim % x.dim()
    if x.shape[dim] == 0:
        return x.contiguous()
    return x.narrow(dim, 0, 1).clone().expand(x.shape)


def _scattered(x: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    if x.dim() < 2:
        raise ValueError(f"layout 'scattered' needs at least 2 dims; got shape {tuple(x.shape)}")
    # rank 6: a permutation no reordering of dims merges into <= 4 inner runs; other ranks: inner dims reversed
    order = (0, 5, 3, 1, 4, 2) if x.dim() == 6 else (0,) + tuple(range(x.dim() - 1, 0, -1))
    inverse = [order.index(d) for d in range(x.dim())]
    return x.permute(order).contiguous().permute(inverse)


LAYOUTS: dict[str, Callable[..., torch.Tensor]] = {
    "contiguous": _contiguous,
    "channels_last": _channels_last,
    "transposed": _transposed,
    "sliced": _sliced,
    "batch_sliced": _batch_sliced,
    "storage_offset": _storage_offset,
    "expanded": _expanded,
    "scattered": _scattered,
}
"""Named memory layouts, ``name -> fn(values, dim=None)``; use :func:`as_layout`.

contiguous; channels_last (4-D, NHWC memory); transposed (last two dims swapped in memory); sliced (every other
element along ``dim``, default 1, the gaps NaN); batch_sliced (sliced along dim 0); storage_offset (contiguous,
starting 3 elements into a NaN-filled buffer); expanded (stride 0 along ``dim``: the first slice broadcast, so the
VALUES change); scattered (a permutation of the dims in memory: rank 6 one that no kernel can merge into <= 4 runs).
"""


def layouts_for(shape: Sequence[int], names: Iterable[str] = tuple(LAYOUTS)) -> tuple[str, ...]:
    """The layouts of ``names`` that apply to a tensor of ``shape`` (channels_last needs 4-D, transposed and
    scattered 2-D, every other layout 1-D)."""
    ndim = len(shape)
    return tuple(n for n in names if _LAYOUT_DIMS.get(n, (1, None))[0] <= ndim
                 and (_LAYOUT_DIMS.get(n, (1, None))[1] is None or ndim <= _LAYOUT_DIMS[n][1]))


# (fewest dims, most dims or None) each layout applies to; 1 and None when not listed
_LAYOUT_DIMS = {"contiguous": (0, None), "channels_last": (4, 4), "transposed": (2, None), "scattered": (2, None)}


def as_layout(values: torch.Tensor, name: str, dim: Optional[int] = None) -> torch.Tensor:
    """``values`` laid out in memory as the layout ``name`` of :data:`LAYOUTS` (a fresh tensor; never a view of
    ``values``). Every layout keeps the shape and the values, except "expanded", which replaces each slice along
    ``dim`` by the first one: compute the reference from the returned tensor, not from ``values``.

    Raises ``ValueError`` for an unknown name or a layout that needs more dims than ``values`` has.
    """
    if name not in LAYOUTS:
        raise ValueError(f"unknown layout {name!r}; expected one of {', '.join(LAYOUTS)}")
    out = LAYOUTS[name](values.detach(), dim)
    if out.data_ptr() == values.data_ptr() and out.numel():
        out = out.clone(memory_format=torch.preserve_format)
    return out


@dataclasses.dataclass(frozen=True)
class Layout:
    """A shape and a way of laying it out in memory (an entry of the shape catalog)."""

    name: str
    shape: tuple[int, ...]
    make: Callable[[torch.Tensor], torch.Tensor]  # contiguous values -> the same values in this layout

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` (of ``shape``) in this layout; asserts the values are unchanged."""
        out = self.make(values)
        if tuple(out.shape) != tuple(values.shape) or not torch.equal(out.isnan(), values.isnan()) \
                or not torch.equal(out.nan_to_num(0.0), values.nan_to_num(0.0)):
            raise AssertionError(f"layout {self.name} changed the values")
        return out


def _layout_fn(name: str, dim: Optional[int] = None) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: LAYOUTS[name](x, dim)


PER_SAMPLE_LAYOUTS = (
    Layout("ragged_nchw", (3, 5, 17, 13), _layout_fn("contiguous")),
    Layout("vector_1000", (2, 1000), _layout_fn("contiguous")),
    Layout("size_one", (1, 1), _layout_fn("contiguous")),
    Layout("empty_batch", (0, 3, 8, 8), _layout_fn("contiguous")),
    Layout("channels_last", (2, 3, 9, 7), _layout_fn("channels_last")),
    Layout("transposed_hw", (2, 4, 7, 9), _layout_fn("transposed")),
    Layout("channel_slice", (3, 4, 10, 6), _layout_fn("sliced", 1)),
    Layout("batch_slice", (3, 4, 33), _layout_fn("batch_sliced")),
    Layout("storage_offset", (2, 5, 7), _layout_fn("storage_offset")),
    Layout("rank6_scattered", (2, 2, 3, 2, 3, 2), _layout_fn("scattered")),
)
"""The shape catalog of batch-first tensors: ragged sizes (not multiples of a block), a long vector, size one, an
empty batch, and the strided layouts a per-sample kernel must walk without copies."""


# ----------------------------------------------------------------------------------------------------------------
# The special-value catalog
# ----------------------------------------------------------------------------------------------------------------
SPECIAL_VALUE_KINDS = ("nan", "inf", "-inf", "zero", "-zero", "max", "huge", "subnormal", "tiny")
_HUGE = {torch.float16: 1e4, torch.bfloat16: 1e30, torch.float32: 1e30, torch.float64: 1e200}


def special_values(dtype: torch.dtype, kinds: Optional[Iterable[str]] = None) -> dict[str, float]:
    """The values that break careless kernels, each exactly representable in ``dtype``:

    nan, inf, -inf, zero (+0), -zero (-0), max (``finfo.max``), huge (a value whose square overflows:
    1e30 in fp32 and bf16, 1e4 in fp16, 1e200 in fp64), subnormal (the smallest positive subnormal,
    ``finfo.smallest_normal * finfo.eps``) and tiny (the smallest positive normal). ``kinds`` picks a subset of
    :data:`SPECIAL_VALUE_KINDS`.
    """
    info = torch.finfo(dtype)
    table = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "zero": 0.0, "-zero": -0.0, "max": info.max,
             "huge": _HUGE.get(dtype, 1e30), "subnormal": info.smallest_normal * info.eps,
             "tiny": info.smallest_normal}
    chosen = SPECIAL_VALUE_KINDS if kinds is None else tuple(kinds)
    unknown = [k for k in chosen if k not in table]
    if unknown:
        raise ValueError(f"unknown special value kinds {unknown}; expected some of {', '.join(SPECIAL_VALUE_KINDS)}")
    return {k: table[k] for k in chosen}


def with_special_values(tensor: torch.Tensor, fraction: float, generator: Optional[torch.Generator] = None,
                        kinds: Optional[Iterable[str]] = None, signed: bool = True) -> torch.Tensor:
    """A copy of ``tensor`` (same layout) with about ``fraction`` of its elements replaced by special values
    (:func:`special_values` of its dtype, or those of ``kinds``) at random positions, chosen by ``generator``.

    Each replaced position gets one kind uniformly; with ``signed`` the finite ones get a random sign.
    ``fraction`` lies in [0, 1]; 0 returns an unchanged copy.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1]; got {fraction}")
    values = list(special_values(tensor.dtype, kinds).values())
    out = tensor.detach().clone()
    if fraction == 0.0 or tensor.numel() == 0 or not values:
        return out
    flat = torch.empty(out.shape, dtype=out.dtype, device="cpu")
    flat.copy_(out)
    n = flat.numel()
    pick = torch.rand(n, generator=generator) < fraction
    kind = torch.randint(len(values), (n,), generator=generator)
    sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if signed else torch.ones(n)
    table = torch.tensor(values, dtype=torch.float64)[kind]
    table = torch.where(torch.isfinite(table), table * sign.double(), table)
    flat_view = flat.reshape(-1)
    flat_view[pick] = table[pick].to(flat.dtype)
    out.copy_(flat_view.reshape(out.shape))
    return out


def random_tensor(shape, dtype, seed: int, device: str = "cpu", scale: float = 1.0) -> torch.Tensor:
    """Standard normal values (times ``scale``) drawn in fp64 from ``seed`` and rounded to ``dtype``: the same
    values, up to rounding, in every dtype and on every device."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def assert_standard_normal(z: torch.Tensor) -> None:
    """Moments and tails of ``z`` (flattened) are those of i.i.d. N(0, 1) draws within 5-sigma sampling error:
    |mean| < 5/sqrt(n), |std - 1| < 5 sqrt(1/(2n)), P(|z| > 2) = 0.0455 and P(|z| > 3) = 0.0027 within a few
    sigma; and the four draws of each Philox call (consecutive groups of 4) are uncorrelated (|corr| < 0.03)."""
    z = z.double().flatten()
    n = z.numel()
    assert abs(z.mean().item()) < 5 / n**0.5
    assert abs(z.std().item() - 1) < 5 * (0.5 / n) ** 0.5
    assert abs((z.abs() > 2).double().mean().item() - 0.0455) < 0.006
    assert abs((z.abs() > 3).double().mean().item() - 0.0027) < 0.0015
    groups = z[: n - n % 4].reshape(-1, 4)
    for a, b in ((0, 1), (0, 2), (1, 3)):
        assert abs(torch.corrcoef(torch.stack([groups[:, a], groups[:, b]]))[0, 1].item()) < 0.03


def make_input(shape: Sequence[int], dtype: torch.dtype, seed: int, *, layout: str = "contiguous",
               dim: Optional[int] = None, fill: Optional[tuple] = None, scale: float = 1.0,
               device: str = "cpu") -> torch.Tensor:
    """One test input: :func:`random_tensor` values (``scale`` times N(0, 1), rounded to ``dtype``), special values
    sprinkled in by ``fill = (fraction, kinds, seed)`` (as :func:`st_special_fills` draws it; None for none), laid
    out as ``layout`` of :data:`LAYOUTS` (along ``dim``), or contiguous when that layout needs more dims."""
    x = random_tensor(tuple(shape), dtype, seed, device, scale)
    if fill is not None and fill[0] > 0:
        fraction, kinds, fill_seed = fill
        x = with_special_values(x, fraction, torch.Generator().manual_seed(fill_seed), kinds)
    if layout not in layouts_for(x.shape, (layout,)):
        layout = "contiguous"
    return as_layout(x, layout, dim)


def cast_floats(values: Mapping[str, Any], dtype: torch.dtype) -> dict:
    """``values`` with every floating tensor cast to ``dtype`` (same strides; values rounded), the rest as is:
    the fp64 inputs of a reference, or the fp32 inputs of a plain-PyTorch baseline with fp32 math."""
    return {k: v.detach().to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in values.items()}


def compare_outputs(actual: Any, reference: Any, baseline: Any, name: str = "output") -> None:
    """:func:`assert_close_to_reference` on each output of a tensor or a tuple of tensors. A baseline output of
    another dtype than ``actual``'s (a plain-PyTorch baseline computed with fp32 math) is first rounded to it."""
    actual, reference, baseline = _as_tuple(actual), _as_tuple(reference), _as_tuple(baseline)
    if not len(actual) == len(reference) == len(baseline):
        raise AssertionError(f"{name}: {len(actual)} outputs, reference {len(reference)}, baseline {len(baseline)}")
    for i, (a, r, b) in enumerate(zip(actual, reference, baseline)):
        label = f"{name} output {i}" if len(actual) > 1 else name
        if b.dtype != a.dtype and b.is_floating_point() and a.is_floating_point():
            b = b.detach().to(a.dtype)
        assert_close_to_reference(a.detach(), r.detach(), b.detach(), label)


def input_gradients(outputs: Any, inputs: Sequence[torch.Tensor], seed: int = 0,
                    rounded_to: Optional[torch.dtype] = None) -> list[Optional[torch.Tensor]]:
    """``d <sum_i g_i . outputs_i> / d inputs`` for a random upstream gradient ``g_i`` per output: standard normal
    values drawn in fp64 from ``seed``, rounded to ``rounded_to`` when given, then to each output's dtype, so calls
    with the same seed and shapes pull back the same ``g`` through a kernel, its fp64 reference (pass the kernel's
    dtype as ``rounded_to``: the reference then sees exactly the kernel's upstream values) and its baseline.
    Outputs that carry no gradient (integer, or not requiring grad) are skipped; an input no output depends on
    gets None."""
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for out in _as_tuple(outputs):
        upstream = torch.randn(tuple(out.shape), generator=generator, dtype=torch.float64)
        if rounded_to is not None:
            upstream = upstream.to(rounded_to).to(torch.float64)
        if out.is_floating_point() and out.requires_grad:
            pairs.append((out, upstream.to(device=out.device, dtype=out.dtype)))
    if not pairs:
        return [None] * len(inputs)
    return list(torch.autograd.grad([o for o, _ in pairs], list(inputs), [g for _, g in pairs], allow_unused=True))


# ----------------------------------------------------------------------------------------------------------------
# One call: a function against a reference over dtypes, layouts and special values
# ----------------------------------------------------------------------------------------------------------------
def _as_tuple(out: Any) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _call(fn: Callable, inputs: Mapping[str, Any] | Sequence[Any], values: dict) -> Any:
    if isinstance(inputs, Mapping):
        return fn(**values)
    return fn(*[values[i] for i in range(len(inputs))])


def check_function(fn: Callable, reference: Callable, inputs: Mapping[str, Any] | Sequence[Any], *,
                   baseline: Optional[Callable] = None, dtypes: Sequence[torch.dtype] = DTYPES,
                   layouts: Sequence[str] = ("contiguous",), layout_dims: Optional[Mapping[Any, int]] = None,
                   special_fraction: float = 0.0, special_kinds: Optional[Iterable[str]] = None,
                   gradients: bool = False, grad_inputs: Optional[Iterable[Any]] = None, seed: int = 0,
                   name: str = "fn") -> list[tuple[torch.dtype, str]]:
    """Check ``fn`` against ``reference`` by the tolerance rule in every dtype and layout; raise on the first
    failure, naming the dtype, layout and output; return the ``(dtype, layout)`` cases checked.

    For each dtype ``d`` in ``dtypes`` and layout ``L`` in ``layouts``:
        v      = every floating tensor of ``inputs`` rounded to ``d`` (special values sprinkled in when
                 ``special_fraction`` > 0), laid out as ``L`` (tensors ``L`` does not apply to stay contiguous);
        out    = fn(v),  ref = reference(v in fp64),  base = (baseline or reference)(v contiguous, in d);
        every output i: assert_close_to_reference(out_i, ref_i, base_i).
    With ``gradients``, a random upstream gradient ``g_i`` (standard normal, in each output's dtype) is pulled
    back through all three, and every input gradient ``d<sum_i g_i . out_i>/dv`` is checked the same way (a
    missing gradient where the reference has one fails).

    Args:
        fn: the function under test; called as ``fn(**v)`` when ``inputs`` is a mapping, else ``fn(*v)``.
        reference: the specification; it must compute in its inputs' dtype (it is run in fp64).
        inputs: the argument values. Floating tensors are cast and laid out; anything else (ints, integer
            tensors, options) is passed unchanged to all three functions.
        baseline: plain PyTorch in the tested dtype (default: ``reference`` itself run in that dtype).
        dtypes: the dtypes to test.
        layouts: names from :data:`LAYOUTS`; "expanded" changes the values, which all three functions then see.
        layout_dims: per input key (name or position) the ``dim`` a layout slices or expands (default 1, or 0).
        special_fraction, special_kinds: see :func:`with_special_values`.
        gradients: also check the input gradients; ``grad_inputs`` picks which inputs (default: every floating
            tensor).
        seed: seeds the special-value positions and the upstream gradients.
        name: names ``fn`` in failure messages.
    """
    keys = list(inputs.keys()) if isinstance(inputs, Mapping) else list(range(len(inputs)))
    raw = dict(inputs.items()) if isinstance(inputs, Mapping) else dict(enumerate(inputs))
    floats = [k for k in keys if isinstance(raw[k], torch.Tensor) and raw[k].is_floating_point()]
    wanted = floats if grad_inputs is None else [k for k in grad_inputs]
    for k in wanted:
        if k not in floats:
            raise ValueError(f"grad_inputs names {k!r}, which is not a floating tensor input")
    dims = dict(layout_dims or {})
    checked = []
    for dtype in dtypes:
        generator = torch.Generator().manual_seed(seed)
        rounded = {k: raw[k].detach().to(dtype) for k in floats}
        if special_fraction > 0:
            rounded = {k: with_special_values(t, special_fraction, generator, special_kinds)
                       for k, t in rounded.items()}
        for layout in layouts:
            laid = {}
            for k in keys:
                if k in floats:
                    applies = layout in layouts_for(rounded[k].shape, (layout,))
                    laid[k] = as_layout(rounded[k], layout if applies else "contiguous", dims.get(k)).detach()
                else:
                    laid[k] = raw[k]
            ref_in = {k: laid[k].to(torch.float64).contiguous() if k in floats else laid[k] for k in keys}
            base_in = {k: laid[k].contiguous() if k in floats else laid[k] for k in keys}
            for group in (laid, ref_in, base_in):
                for k in wanted if gradients else ():
                    group[k] = group[k].detach().requires_grad_(True)
            outs = _as_tuple(_call(fn, inputs, laid))
            refs = _as_tuple(_call(reference, inputs, ref_in))
            bases = _as_tuple(_call(baseline or reference, inputs, base_in))
            where = f"{name} [{dtype}, layout {layout}]"
            if not len(outs) == len(refs) == len(bases):
                raise AssertionError(f"{where}: {len(outs)} outputs, the reference gives {len(refs)}, the "
                                     f"baseline {len(bases)}")
            for i, (out, ref, base) in enumerate(zip(outs, refs, bases)):
                label = f"{where} output {i}" if len(outs) > 1 else f"{where} output"
                if not isinstance(out, torch.Tensor):
                    raise AssertionError(f"{label}: got {type(out).__name__}, expected a tensor")
                assert_close_to_reference(out.detach(), ref.detach(), base.detach(), label)
            if gradients and wanted:
                _check_gradients(where, outs, refs, bases, laid, ref_in, base_in, wanted, generator)
            checked.append((dtype, layout))
    return checked


def _check_gradients(where, outs, refs, bases, laid, ref_in, base_in, wanted, generator) -> None:
    """Pull one random upstream gradient back through the three functions and compare the input gradients."""
    differentiable = [i for i, r in enumerate(refs) if isinstance(r, torch.Tensor) and r.requires_grad]
    if not differentiable:
        return
    upstream = [torch.randn(refs[i].shape, generator=generator, dtype=torch.float64) for i in differentiable]

    def pull(results, values):
        pairs = [(results[i], g.to(device=results[i].device, dtype=results[i].dtype))
                 for i, g in zip(differentiable, upstream)]
        missing = [i for i, (r, _) in zip(differentiable, pairs) if not r.requires_grad]
        live = [(r, g) for r, g in pairs if r.requires_grad]
        if not live:
            return [None] * len(wanted), missing
        grads = torch.autograd.grad([r for r, _ in live], [values[k] for k in wanted], [g for _, g in live],
                                    allow_unused=True)
        return list(grads), missing

    got, missing = pull(outs, laid)
    if missing:
        raise AssertionError(f"{where}: outputs {missing} carry no gradient (detached), where the reference "
                             "differentiates")
    want, _ = pull(refs, ref_in)
    base, _ = pull(bases, base_in)
    for k, g, r, b in zip(wanted, got, want, base):
        if r is None:
            continue
        if g is None:
            raise AssertionError(f"{where}: no gradient for input {k!r}, where the reference has one")
        b = b if b is not None else torch.zeros_like(laid[k])
        assert_close_to_reference(g, r, b, f"{where} gradient of {k!r}")


# ----------------------------------------------------------------------------------------------------------------
# Hypothesis strategies (hypothesis is imported when one is called)
# ----------------------------------------------------------------------------------------------------------------
def st_shapes(ndim: int | tuple[int, int] = (1, 4), max_side: int = 5, min_side: int = 0):
    """Shapes with ``ndim`` dims (an int, or an inclusive ``(min, max)`` range): ragged sides in
    ``[max(min_side, 1), max_side]``, and in about half of the shapes one dim (a random one) set to an edge size,
    0 or 1 (as ``min_side`` allows): empty tensors and size-one dims in every position, without most examples
    being empty. Shrinks towards few dims of size 1."""
    from hypothesis import strategies as st

    low, high = (ndim, ndim) if isinstance(ndim, int) else ndim
    edges = [s for s in (0, 1) if min_side <= s <= max_side]
    side = st.integers(max(min_side, 1), max_side)

    @st.composite
    def shapes(draw):
        shape = list(draw(st.lists(side, min_size=low, max_size=high)))
        edge = draw(st.sampled_from([None, None] + edges)) if shape else None
        if edge is not None:
            shape[draw(st.integers(0, len(shape) - 1))] = edge
        return tuple(shape)

    return shapes()


def st_layouts(shape: Optional[Sequence[int]] = None, names: Iterable[str] = tuple(LAYOUTS)):
    """A layout name of :data:`LAYOUTS` (those that apply to ``shape`` when given); shrinks to "contiguous"."""
    from hypothesis import strategies as st

    names = tuple(names) if shape is None else layouts_for(shape, names)
    ordered = tuple(sorted(names, key=lambda n: n != "contiguous"))
    return st.sampled_from(ordered)


def st_dtypes(dtypes: Sequence[torch.dtype] = DTYPES):
    """A dtype of ``dtypes`` (default fp32, fp16, bf16); shrinks to the first."""
    from hypothesis import strategies as st

    return st.sampled_from(tuple(dtypes))


def st_special_fills(kinds: Iterable[str] = SPECIAL_VALUE_KINDS, max_fraction: float = 0.3):
    """``(fraction, kinds, seed)`` for :func:`with_special_values`: often no special values at all (fraction 0),
    else a fraction up to ``max_fraction`` of a non-empty subset of ``kinds``. Shrinks to (0, one kind, 0)."""
    from hypothesis import strategies as st

    kinds = tuple(kinds)
    fraction = st.sampled_from((0.0, 0.05, 0.2, max_fraction))
    subset = st.lists(st.sampled_from(kinds), min_size=1, max_size=len(kinds), unique=True).map(tuple)
    return st.tuples(fraction, subset, st.integers(0, 2**16))
