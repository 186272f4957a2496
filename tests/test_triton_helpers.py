"""Shared @triton.jit helpers (kernels/triton_helpers.py) against torch, and the interpreter set-up of conftest."""
import pytest
import torch
import triton
import triton.language as tl

from genkernels.kernels.triton_helpers import philox_normal_block, sigmoid, tanh

EXTREMES = torch.tensor([-1e4, -88.0, -30.0, -3.0, -0.5, -0.09, -1e-3, -1e-8, 0.0, 1e-8, 1e-3, 0.09, 0.1, 0.11,
                         0.5, 3.0, 30.0, 88.0, 1e4])


@triton.jit
def _activations_kernel(x_ptr, tanh_ptr, sigmoid_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask)
    tl.store(tanh_ptr + offsets, tanh(x), mask=mask)
    tl.store(sigmoid_ptr + offsets, sigmoid(x), mask=mask)


def test_tanh_and_sigmoid_match_torch_in_relative_terms():
    x = torch.cat([EXTREMES, torch.linspace(-6, 6, 1001)])
    t, s = torch.empty_like(x), torch.empty_like(x)
    _activations_kernel[(1,)](x, t, s, x.numel(), BLOCK=2048)
    expected_t, expected_s = torch.tanh(x.double()), torch.sigmoid(x.double())
    assert torch.isfinite(t).all() and torch.isfinite(s).all()
    rel_t = (t.double() - expected_t).abs() / expected_t.abs().clamp(min=1e-300)
    rel_s = (s.double() - expected_s).abs() / expected_s.clamp(min=1e-300)
    assert rel_t[x != 0].max() < 1e-6 and t[x == 0].abs().max() == 0
    assert rel_s[expected_s > 1e-30].max() < 1e-6


@triton.jit
def _normal_kernel(out_ptr, seed, sample, first, BLOCK: tl.constexpr):
    tl.store(out_ptr + tl.arange(0, BLOCK), philox_normal_block(seed, sample, first, BLOCK, False))


def test_philox_normals_do_not_depend_on_the_block_size():
    wide = torch.empty(256)
    _normal_kernel[(1,)](wide, 42, 3, 512, BLOCK=256)
    narrow = torch.empty(64)
    _normal_kernel[(1,)](narrow, 42, 3, 512 + 128, BLOCK=64)
    torch.testing.assert_close(narrow, wide[128:192], rtol=0, atol=0)
    other_sample = torch.empty(256)
    _normal_kernel[(1,)](other_sample, 42, 4, 512, BLOCK=256)
    assert (other_sample - wide).abs().mean() > 0.5


@triton.autotune(configs=[triton.Config({"BLOCK": 32}), triton.Config({"BLOCK": 64})], key=["n"])
@triton.jit
def _autotuned_copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(y_ptr + offsets, tl.load(x_ptr + offsets, mask=mask), mask=mask)


def test_autotune_runs_with_the_cpu_timer():
    if torch.cuda.is_available():
        pytest.skip("the CPU timer is only installed where the interpreter runs")
    x = torch.randn(200)
    y = torch.empty_like(x)
    _autotuned_copy_kernel[lambda meta: (triton.cdiv(200, meta["BLOCK"]),)](x, y, 200)
    torch.testing.assert_close(y, x, rtol=0, atol=0)


@triton.jit
def _asserting_kernel(x_ptr):
    x = tl.load(x_ptr)
    tl.device_assert(x > 0, "x must be positive")


def test_device_assert_fires_in_the_interpreter():
    if torch.cuda.is_available():
        pytest.skip("checks the interpreter's debug mode")
    _asserting_kernel[(1,)](torch.ones(1))
    with pytest.raises(Exception, match="x must be positive"):
        _asserting_kernel[(1,)](-torch.ones(1))
