"""Masks and dropout inside the flash-attention kernels, forward and backward (through
genkernels.kernels.scaled_dot_product_attention): masks against torch's SDPA in fp64, dropout against the eager
reference drawing the same Philox mask, and the dropout mask's own statistics."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from reference_checks import assert_close_to_reference, random_tensor

from genkernels.kernels import scaled_dot_product_attention
from genkernels.kernels.philox import philox_uniform_grid
from genkernels.kernels.runtime import triton_can_run_on
from genkernels.kernels.sdpa import dropout_weights_reference

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture
def kernel_device(device):
    if not triton_can_run_on(torch.device(device)):
        pytest.skip("the kernels need a GPU or the interpreter")
    return device


def _inputs(batch, heads_q, heads_kv, seq_q, seq_k, dtype, device, seed=0):
    return (random_tensor((batch, heads_q, seq_q, 16), dtype, seed, device),
            random_tensor((batch, heads_kv, seq_k, 16), dtype, seed + 1, device),
            random_tensor((batch, heads_kv, seq_k, 16), dtype, seed + 2, device))


def _run(fn, tensors, dtype, grad_seed=7):
    leaves = [t.detach().to(dtype).requires_grad_() for t in tensors]
    out = fn(*leaves)
    grad_out = random_tensor(out.shape, dtype, grad_seed, out.device)
    return [out.detach(), *torch.autograd.grad(out, leaves, grad_out)]


def _assert_all_close(ours, reference, baseline):
    for name, got, want, base in zip(("output", "grad q", "grad k", "grad v"), ours, reference, baseline):
        assert_close_to_reference(got, want, base, name)


def _key_padding(lengths, seq_k, device):
    """[batch, 1, 1, seq_k] bool: True for the first lengths[b] keys of sequence b."""
    keys = torch.arange(seq_k, device=device)
    return (keys[None, :] < torch.tensor(lengths, device=device)[:, None])[:, None, None, :]


def _mask(kind, seq_q, seq_k, dtype, device):
    generator = torch.Generator().manual_seed(3)
    if kind == "bool":
        return (torch.rand(2, 1, seq_q, seq_k, generator=generator) > 0.4).to(device)
    if kind == "additive":
        return (torch.randn(seq_q, seq_k, generator=generator) * 2).to(device=device, dtype=dtype)
    if kind == "additive_-inf":  # -inf entries hide keys; one row hidden throughout gives zeros
        bias = torch.randn(1, 4, seq_q, seq_k, generator=generator) * 2
        bias = bias.masked_fill(torch.rand(1, 4, seq_q, seq_k, generator=generator) > 0.6, float("-inf"))
        bias[..., 2, :] = float("-inf")
        return bias.to(device=device, dtype=dtype)
    if kind == "key_padding":  # ragged lengths, one sequence with no key at all
        return _key_padding([seq_k, 0], seq_k, device)
    if kind == "finfo_min_padding":  # transformers' additive padding: finfo.min, never -inf
        padding = ~_key_padding([seq_k, 5], seq_k, device)
        return torch.zeros(padding.shape, dtype=dtype, device=device).masked_fill(padding, torch.finfo(dtype).min)
    raise AssertionError(kind)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("kind", ["bool", "additive", "additive_-inf", "key_padding", "finfo_min_padding"])
def test_masks_match_sdpa_forward_and_backward(kind, dtype, kernel_device):
    """Ragged lengths (37 queries, 45 keys: partial blocks), 4 query heads over 2 key/value heads."""
    q, k, v = _inputs(2, 4, 2, 37, 45, dtype, kernel_device)
    mask = _mask(kind, 37, 45, dtype, kernel_device)

    def sdpa(mask_dtype):
        def attend(*t):
            m = mask if mask.dtype == torch.bool else mask.to(mask_dtype)
            return F.scaled_dot_product_attention(*t, attn_mask=m, enable_gqa=True)
        return attend

    ours = _run(lambda *t: scaled_dot_product_attention(*t, attn_mask=mask, enable_gqa=True, impl="triton"),
                (q, k, v), dtype)
    reference = _run(sdpa(torch.float64), (q, k, v), torch.float64)
    baseline = _run(sdpa(dtype), (q, k, v), dtype)
    _assert_all_close(ours, reference, baseline)
    if kind == "key_padding":  # the sequence with no key: zeros and zero gradients, as SDPA gives
        for tensor in ours:
            assert torch.equal(tensor[1], torch.zeros_like(tensor[1]))


def test_mask_broadcast_over_leading_dims_and_3d_inputs(kernel_device):
    q = random_tensor((3, 5, 16), torch.float32, 0, kernel_device)
    k = random_tensor((3, 9, 16), torch.float32, 1, kernel_device)
    v = random_tensor((3, 9, 16), torch.float32, 2, kernel_device)
    mask = torch.rand(5, 9, generator=torch.Generator().manual_seed(1)).to(kernel_device) > 0.5
    ours = _run(lambda *t: scaled_dot_product_attention(*t, attn_mask=mask, impl="triton"), (q, k, v),
                torch.float32)
    reference = _run(lambda *t: F.scaled_dot_product_attention(*t, attn_mask=mask), (q, k, v), torch.float64)
    baseline = _run(lambda *t: F.scaled_dot_product_attention(*t, attn_mask=mask), (q, k, v), torch.float32)
    _assert_all_close(ours, reference, baseline)


def test_a_hidden_keys_nan_value_never_reaches_a_row(kernel_device):
    """The kernels select hidden keys away (their NaN/Inf too); the eager reference multiplies them by 0."""
    q, k, v = _inputs(2, 2, 2, 20, 24, torch.float32, kernel_device)
    v[:, :, 20] = float("nan")
    mask = _key_padding([20, 12], 24, kernel_device)
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask, impl="triton")
    want = F.scaled_dot_product_attention(q.double(), k[:, :, :20].double(), v[:, :, :20].double(),
                                          attn_mask=mask[..., :20])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------------------------
def _dropout_call(impl, seed, **kwargs):
    def attend(*t):
        generator = torch.Generator(t[0].device).manual_seed(seed)
        return scaled_dot_product_attention(*t, generator=generator, impl=impl, **kwargs)
    return attend


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("kwargs", [dict(dropout_p=0.3), dict(dropout_p=0.15, is_causal=True),
                                    dict(dropout_p=0.5, mask="key_padding")], ids=["plain", "causal", "masked"])
def test_dropout_matches_the_eager_reference_with_the_same_philox_mask(kwargs, dtype, kernel_device):
    """Forward and backward (the backward regenerates the mask), GQA, ragged lengths: against the eager
    reference in fp64 drawing the same mask from the same seed; the eager reference in the tested dtype is the
    baseline of the tolerance rule."""
    kwargs = dict(kwargs)
    q, k, v = _inputs(2, 4, 2, 37, 45, dtype, kernel_device)
    if kwargs.pop("mask", None):
        kwargs["attn_mask"] = _key_padding([45, 17], 45, kernel_device)
    ours = _run(_dropout_call("triton", 11, enable_gqa=True, **kwargs), (q, k, v), dtype)
    reference = _run(_dropout_call("eager", 11, enable_gqa=True, **kwargs), (q, k, v), torch.float64)
    baseline = _run(_dropout_call("eager", 11, enable_gqa=True, **kwargs), (q, k, v), dtype)
    _assert_all_close(ours, reference, baseline)


def _kernel_dropout_weights(batch, heads, seq, dropout_p, seed, device):
    """The kernel's dropout weights W read off its output: zero queries and keys give probabilities 1/seq, and
    identity values make O = W / seq."""
    q = torch.zeros(batch, heads, seq, seq, device=device)
    v = torch.eye(seq, device=device).expand(batch, heads, seq, seq)
    out = _dropout_call("triton", seed, dropout_p=dropout_p)(q, q, v)
    return out * seq


def test_dropout_mask_is_the_documented_philox_stream_with_the_right_keep_rate(kernel_device):
    """Every weight is 0 or 1 / (1 - p), equal to dropout_weights_reference for the drawn seed; the keep rate
    is 1 - p within 5 binomial standard deviations; another head, batch or seed draws another mask."""
    batch, heads, seq, p = 2, 2, 64, 0.3
    weights = _kernel_dropout_weights(batch, heads, seq, p, seed=5, device=kernel_device)
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, generator=torch.Generator(kernel_device).manual_seed(5),
                         device=kernel_device)
    want = dropout_weights_reference(seed, (batch, heads, seq, seq), p)
    torch.testing.assert_close(weights, want, rtol=1e-5, atol=1e-5)
    kept = (weights > 0.5).double()
    assert torch.allclose(weights[kept.bool()], torch.full((), 1 / (1 - p), device=kernel_device), rtol=1e-5)
    n = kept.numel()
    assert abs(kept.mean().item() - (1 - p)) <= 5 * math.sqrt(p * (1 - p) / n)
    assert not torch.equal(kept[0, 0], kept[0, 1]) and not torch.equal(kept[0, 0], kept[1, 0])
    other = _kernel_dropout_weights(batch, heads, seq, p, seed=6, device=kernel_device)
    assert not torch.equal(other, weights)


def test_philox_uniform_grid_layout():
    """Element (p, i, j) is word j mod 4 of the Philox call at (j div 4, i, p): the four words of one call fill
    four neighbouring columns, so the grid of 8 columns equals two calls' words side by side."""
    from genkernels.kernels.philox import philox4x32
    seed = torch.tensor(123456789012345, dtype=torch.int64)
    grid = philox_uniform_grid(seed, 3, 2, 8)
    key = (seed & 0xFFFFFFFF, seed >> 32)
    for plane in range(3):
        for row in range(2):
            for group in range(2):
                words = philox4x32([torch.tensor(group), torch.tensor(row), torch.tensor(plane), torch.tensor(0)],
                                   key)
                expected = [((w if w < 2**31 else 2**32 - 1 - w) * 4.6566127342e-10) for w in map(int, words)]
                torch.testing.assert_close(grid[plane, row, 4 * group:4 * group + 4],
                                           torch.tensor(expected, dtype=torch.float32))


def test_dropout_one_gives_zeros_and_zero_gradients(kernel_device):
    q, k, v = _inputs(1, 2, 2, 9, 11, torch.float32, kernel_device)
    outputs = _run(_dropout_call("triton", 0, dropout_p=1.0), (q, k, v), torch.float32)
    for tensor in outputs:
        assert torch.equal(tensor, torch.zeros_like(tensor))


def test_dropout_compiles_with_fullgraph(kernel_device):
    q, k, v = _inputs(1, 2, 1, 9, 11, torch.float32, kernel_device)

    def step(q, k, v):
        return scaled_dot_product_attention(q, k, v, dropout_p=0.2, enable_gqa=True, impl="triton")

    torch.manual_seed(0)
    eager = step(q, k, v)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v)
    torch.testing.assert_close(compiled, eager)
