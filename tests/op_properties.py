"""The properties every op's hypothesis test checks (tests/test_properties_*.py), written once.

``run(inputs, impl)`` calls the op under ``impl``; ``plain(inputs)`` is plain PyTorch's version of the same math;
``inputs`` maps argument names to values (floating tensors in the tested dtype). The rule, NaN/Inf pattern included,
is genkernels.bench.correctness.assert_close_to_reference.
"""
import pytest
import torch

from genkernels.bench.correctness import cast_floats, compare_outputs, input_gradients

FP64 = torch.float64


def assert_op_properties(run, plain, inputs, what):
    """impl="triton" vs the fp64 eager reference (baseline: eager in the same dtype) and vs plain PyTorch in fp64
    (baseline: plain PyTorch in the same dtype)."""
    out = run(inputs, "triton")
    compare_outputs(out, run(cast_floats(inputs, FP64), "eager"), run(inputs, "eager"),
                    f"{what}: triton vs the fp64 eager reference")
    compare_outputs(out, plain(cast_floats(inputs, FP64)), plain(inputs),
                    f"{what}: triton vs plain PyTorch")


def assert_eager_properties(run, plain, inputs, what):
    """impl="eager" vs plain PyTorch in fp64 (baseline: plain PyTorch in the same dtype)."""
    compare_outputs(run(inputs, "eager"), plain(cast_floats(inputs, FP64)), plain(inputs),
                    f"{what}: eager vs plain PyTorch")


def assert_fp64_properties(run, plain, inputs, what):
    """fp64 under impl="auto" runs the reference (it matches plain PyTorch); impl="triton" refuses it."""
    wide = cast_floats(inputs, FP64)
    expected = plain(wide)
    compare_outputs(run(wide, "auto"), expected, expected, f"{what}: fp64 under impl='auto' vs plain PyTorch")
    with pytest.raises(ValueError):
        run(wide, "triton")


def _tested_dtype(inputs) -> torch.dtype:
    return next((v.dtype for v in inputs.values() if isinstance(v, torch.Tensor) and v.is_floating_point()), FP64)


def assert_gradients(run, plain, inputs, names, what, seed=0):
    """Gradients of the inputs ``names``: triton vs the fp64 eager reference (baseline eager in the same dtype) and
    vs plain PyTorch's autograd in fp64 (baseline: the same in the tested dtype), for one random upstream gradient
    per output, rounded to the tested dtype for every side (the references see the kernel's upstream values)."""
    rounded_to = _tested_dtype(inputs)

    def pull(values, fn):
        values = dict(values)
        leaves = [k for k in names if values.get(k) is not None]
        for k in leaves:
            values[k] = values[k].detach().requires_grad_(True)
        return leaves, input_gradients(fn(values), [values[k] for k in leaves], seed, rounded_to)

    def eager(t):
        return run(t, "eager")

    leaves, got = pull(inputs, lambda t: run(t, "triton"))
    wide = cast_floats(inputs, FP64)
    for label, (_, want), (_, base) in (("the fp64 eager reference", pull(wide, eager), pull(inputs, eager)),
                                        ("plain PyTorch", pull(wide, plain), pull(inputs, plain))):
        for k, a, r, b in zip(leaves, got, want, base):
            if r is None:
                continue
            assert a is not None, f"{what}: no gradient for {k} under impl='triton', where {label} has one"
            b = torch.zeros_like(r) if b is None else b
            compare_outputs(a, r, b, f"{what}: gradient of {k}, triton vs {label}")
