"""Fused attention (kernels/attention.py): flash_attention forward and gradients and decode_attention against an
fp64 plain matmul + softmax reference, itself checked against F.scaled_dot_product_attention."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from reference_checks import assert_close_to_reference, random_tensor

from genkernels.kernels.attention import (
    attention_reference,
    causal_visibility,
    decode_attention,
    decode_attention_reference,
    attention_tiles,
    decode_ctas_per_sm,
    decode_split_plan,
    decode_tiles,
    flash_attention,
)
from genkernels.kernels import launch


def _qkv(batch, heads_q, heads_kv, seq_q, seq_k, head_dim, dtype, device, seed=0):
    q = random_tensor((batch, heads_q, seq_q, head_dim), dtype, seed, device)
    k = random_tensor((batch, heads_kv, seq_k, head_dim), dtype, seed + 1, device)
    v = random_tensor((batch, heads_kv, seq_k, head_dim), dtype, seed + 2, device)
    return q, k, v


def _forward_backward(fn, inputs, grad_out):
    leaves = [x.detach().requires_grad_() for x in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out.detach(), grads


def _assert_attention_matches(q, k, v, causal=False, softmax_scale=None, grad_seed=7, grad_out=None):
    """Kernel and same-dtype eager, output and dq/dk/dv, against the fp64 reference (tolerance rule)."""
    if grad_out is None:
        grad_out = random_tensor(q.shape, q.dtype, grad_seed, q.device)
    options = dict(causal=causal, softmax_scale=softmax_scale)
    kernel = _forward_backward(lambda *t: flash_attention(*t, impl="triton", **options), (q, k, v), grad_out)
    eager = _forward_backward(lambda *t: flash_attention(*t, impl="eager", **options), (q, k, v), grad_out)
    reference = _forward_backward(lambda *t: attention_reference(*t, causal, softmax_scale),
                                  [x.double() for x in (q, k, v)], grad_out.double())
    assert_close_to_reference(kernel[0], reference[0], eager[0], "output")
    for name, got, want, same_dtype in zip(("dq", "dk", "dv"), kernel[1], reference[1], eager[1]):
        assert_close_to_reference(got, want, same_dtype, name)
    return kernel


# ---------------------------------------------------------------------------------------------------------------
# The reference itself
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_sdpa(causal):
    q, k, v = _qkv(2, 4, 2, 37, 37, 24, torch.float64, "cpu")
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    torch.testing.assert_close(attention_reference(q, k, v, causal), expected, rtol=1e-12, atol=1e-12)


def test_reference_matches_sdpa_with_a_bottom_right_mask():
    q, k, v = _qkv(1, 2, 1, 9, 23, 16, torch.float64, "cpu")
    mask = causal_visibility(9, 23, "cpu")
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(attention_reference(q, k, v, True, 0.3), expected, rtol=1e-12, atol=1e-12)


def test_reference_gradients_match_sdpa():
    q, k, v = _qkv(1, 4, 2, 13, 13, 16, torch.float64, "cpu")
    grad_out = random_tensor(q.shape, torch.float64, 5, "cpu")
    _, got = _forward_backward(lambda *t: attention_reference(*t, True), (q, k, v), grad_out)
    _, want = _forward_backward(lambda *t: F.scaled_dot_product_attention(*t, is_causal=True, enable_gqa=True),
                                (q, k, v), grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# flash_attention
# ---------------------------------------------------------------------------------------------------------------
# (batch, heads_q, heads_kv, seq_q, seq_k, head_dim, dtype, causal, softmax_scale): a covering subset of
# {causal, not} x {seq_q == seq_k, <, >} x seq {1, 17, 100, 257, 600} x head_dim {16, 48, 64, 80, 128}
# x {MHA, GQA, MQA} x {fp32, fp16, bf16}.
CASES = [
    (2, 2, 2, 17, 17, 16, torch.float32, True, None),
    (1, 4, 2, 100, 100, 64, torch.float16, True, None),
    (1, 4, 1, 57, 257, 48, torch.bfloat16, False, None),
    (1, 4, 1, 33, 257, 48, torch.bfloat16, True, None),
    (1, 2, 2, 257, 100, 80, torch.float32, True, None),
    (2, 2, 1, 1, 17, 128, torch.bfloat16, True, None),
    (1, 1, 1, 600, 600, 64, torch.float32, True, None),
    (1, 3, 3, 100, 1, 96, torch.float16, False, 0.5),
    (1, 2, 1, 1, 1, 32, torch.float32, False, None),
    (1, 2, 2, 17, 100, 128, torch.float32, False, None),
    (1, 2, 2, 100, 17, 80, torch.bfloat16, False, 0.05),
]


@pytest.mark.parametrize("batch,heads_q,heads_kv,seq_q,seq_k,head_dim,dtype,causal,scale", CASES,
                         ids=lambda value: str(value).replace("torch.", ""))
def test_flash_attention_matches_reference(batch, heads_q, heads_kv, seq_q, seq_k, head_dim, dtype, causal, scale,
                                           device):
    q, k, v = _qkv(batch, heads_q, heads_kv, seq_q, seq_k, head_dim, dtype, device)
    _assert_attention_matches(q, k, v, causal, scale)


@pytest.mark.parametrize("heads_kv", [4, 2])
def test_flash_attention_reads_packed_qkv_slices_in_place(heads_kv, device):
    """q, k, v as strided views of one packed projection output [batch, seq, (heads_q + 2 heads_kv) * d]."""
    batch, seq, heads_q, head_dim = 2, 37, 4, 48
    packed = random_tensor((batch, seq, heads_q + 2 * heads_kv, head_dim), torch.float16, 3, device)
    q, k, v = packed.split([heads_q, heads_kv, heads_kv], dim=2)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    assert not any(x.is_contiguous() for x in (q, k, v))
    # The gradient arrives as the transpose a [batch, seq, heads * d] output projection sends back.
    grad_out = random_tensor((batch, seq, heads_q, head_dim), torch.float16, 5, device).transpose(1, 2)
    _assert_attention_matches(q, k, v, causal=True, grad_out=grad_out)


def test_flash_attention_gradients_flow_into_the_packed_tensor(device):
    packed = random_tensor((1, 21, 3, 2, 16), torch.float32, 4, device).requires_grad_()
    q, k, v = (packed[:, :, i].transpose(1, 2) for i in range(3))
    flash_attention(q, k, v, causal=True, impl="triton").square().sum().backward()
    expected_packed = packed.detach().double().requires_grad_()
    q, k, v = (expected_packed[:, :, i].transpose(1, 2) for i in range(3))
    attention_reference(q, k, v, True).square().sum().backward()
    torch.testing.assert_close(packed.grad.double(), expected_packed.grad, rtol=1e-5, atol=1e-5)


def test_flash_attention_rows_that_see_no_key_are_zero_with_zero_gradients(device):
    # seq_q > seq_k with the bottom-right causal mask: the first seq_q - seq_k rows see no key.
    q, k, v = _qkv(1, 2, 1, 80, 20, 32, torch.float32, device)
    out, (dq, dk, dv) = _assert_attention_matches(q, k, v, causal=True)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert torch.equal(out[:, :, :60], torch.zeros_like(out[:, :, :60]))
    assert torch.equal(dq[:, :, :60], torch.zeros_like(dq[:, :, :60]))
    assert out[:, :, 60:].abs().amax() > 0


def test_flash_attention_without_keys_is_zero(device):
    q, k, v = _qkv(2, 2, 2, 5, 0, 16, torch.float32, device)
    out, grads = _forward_backward(lambda *t: flash_attention(*t, impl="triton"), (q, k, v), torch.ones_like(q))
    assert torch.equal(out, torch.zeros_like(q))
    assert torch.equal(grads[0], torch.zeros_like(q)) and grads[1].shape == k.shape


def test_flash_attention_empty_batch(device):
    q, k, v = _qkv(0, 2, 1, 9, 9, 64, torch.bfloat16, device)
    out, grads = _forward_backward(lambda *t: flash_attention(*t, causal=True, impl="triton"), (q, k, v),
                                   torch.ones_like(q))
    assert out.shape == q.shape and out.dtype == q.dtype
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


def test_flash_attention_default_scale_is_inverse_sqrt_head_dim(device):
    q, k, v = _qkv(1, 1, 1, 17, 17, 64, torch.float32, device)
    torch.testing.assert_close(flash_attention(q, k, v, impl="triton"),
                               flash_attention(q, k, v, softmax_scale=1 / math.sqrt(64), impl="triton"))


# ---------------------------------------------------------------------------------------------------------------
# decode_attention
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,heads_q,heads_kv,head_dim", [
    (torch.float32, 4, 4, 64),
    (torch.bfloat16, 8, 2, 80),
    (torch.float16, 4, 1, 128),
])
def test_decode_attention_matches_reference(dtype, heads_q, heads_kv, head_dim, device):
    max_seq = 300
    q = random_tensor((4, heads_q, 1, head_dim), dtype, 0, device)
    # The caches are a prefix of bigger buffers (strided along seq), as a pre-allocated KV cache is.
    k_cache = random_tensor((4, heads_kv, max_seq + 20, head_dim), dtype, 1, device)[:, :, :max_seq]
    v_cache = random_tensor((4, heads_kv, max_seq + 20, head_dim), dtype, 2, device)[:, :, :max_seq]
    seqlens = torch.tensor([0, max_seq, 1, 129], dtype=torch.int32, device=device)
    kernel = decode_attention(q, k_cache, v_cache, seqlens, impl="triton")
    eager = decode_attention(q, k_cache, v_cache, seqlens, impl="eager")
    reference = decode_attention_reference(q.double(), k_cache.double(), v_cache.double(), seqlens)
    assert_close_to_reference(kernel, reference, eager)
    assert torch.equal(kernel[0], torch.zeros_like(kernel[0]))


def test_decode_reference_matches_attention_over_the_prefix():
    q, k, v = _qkv(2, 4, 2, 1, 30, 16, torch.float64, "cpu")
    seqlens = torch.tensor([30, 11])
    out = decode_attention_reference(q, k, v, seqlens, 0.7)
    for b, n in enumerate(seqlens.tolist()):
        expected = attention_reference(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], False, 0.7)
        torch.testing.assert_close(out[b:b + 1], expected, rtol=1e-12, atol=1e-12)


def test_decode_split_plan_fills_the_gpu_from_one_long_sequence():
    splits, split_size = decode_split_plan(pairs=8, max_seq=32768, block_n=64, slots=264)
    assert splits == 32 and split_size % 64 == 0 and splits * split_size >= 32768 > (splits - 1) * split_size
    assert decode_split_plan(pairs=256 * 32, max_seq=1000, block_n=64, slots=264) == (1, 1024)


@pytest.mark.parametrize("sm_count,ctas_per_sm", [(132, 2), (132, 4), (142, 2)])
@pytest.mark.parametrize("max_seq", [1024, 2048, 4096, 8192, 16384, 32768, 1000])
def test_decode_split_plan_makes_whole_waves(sm_count, ctas_per_sm, max_seq):
    """The benchmark's decode (8 sequences x 8 key/value heads) used to launch a fixed 512-program grid: 1.29
    waves on 132 SMs at 3 CTAs per SM whatever the cache length. Sized from the SM count, the grid fills at
    least 90% of its last wave, and every split holds whole key blocks that together cover the cache."""
    slots = sm_count * ctas_per_sm
    splits, split_size = decode_split_plan(pairs=64, max_seq=max_seq, block_n=64, slots=slots)
    assert split_size % 64 == 0 and splits * split_size >= max_seq > (splits - 1) * split_size
    programs = 64 * splits
    assert programs / (math.ceil(programs / slots) * slots) >= 0.9


def test_decode_grid_is_sized_from_the_device_limits():
    """Captured as on each architecture, the partial kernel's grid follows that GPU's SM count (not a fixed
    512 programs) and the rows of its dots follow its tensor cores (64 stacked query heads for sm_90's warpgroup
    MMA, 16 elsewhere)."""
    for arch in (80, 86, 90):
        device_limits = launch.ARCH_LIMITS[arch]
        with launch.capturing_for(device_limits):
            block_h, block_n, stages, warps, registers = decode_tiles(128, torch.bfloat16, torch.device("meta"))
            per_sm = decode_ctas_per_sm(device_limits, block_h, block_n, 128, stages, warps, registers, 2)
            splits, _ = decode_split_plan(64, 4096, block_n, device_limits.sm_count * per_sm)
        assert block_h == (64 if arch >= 90 else 16)
        slots = device_limits.sm_count * per_sm
        assert 64 * splits / (math.ceil(64 * splits / slots) * slots) >= 0.75


def _pipelined_shared_bytes(kernel, tiles, block_d, element_size):
    """Shared memory a tensor-core tile config needs: the tiles a program keeps for its whole life plus
    ``num_stages`` copies of the tiles it streams (the compiled figure on sm_90, an upper bound before)."""
    block_m, block_n, _, stages = tiles
    resident, streamed = {"forward": (block_m, 2 * block_n), "dkdv": (2 * block_n, 2 * block_m),
                          "dq": (2 * block_m, 2 * block_n)}[kernel]
    return (resident + stages * streamed) * block_d * element_size


@pytest.mark.parametrize("arch", [80, 86, 89, 90])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_attention_tiles_fit_the_shared_memory_of_each_architecture(arch, head_dim):
    """Tiles used to be one table written for Hopper: bf16 d256 backward needed 160 KB (115 KB compiled off
    Hopper) where sm_86/sm_89 have 99 KB per CTA. The launcher now picks them from the device's limits."""
    limits = launch.ARCH_LIMITS[arch]
    with launch.capturing_for(limits):
        tiles = attention_tiles(head_dim, torch.bfloat16, torch.device("meta"))
    for kernel in ("forward", "dkdv", "dq"):
        need = _pipelined_shared_bytes(kernel, tiles[kernel], head_dim, 2)
        assert need <= limits.shared_memory_per_cta, (kernel, tiles[kernel], need)


def test_attention_tiles_can_be_forced_for_tests(device):
    """launch.force_launch_settings reaches every tile of the launcher (small tiles at a small shape give
    several blocks per program loop), and forced tiles give the same numbers."""
    q, k, v = _qkv(1, 2, 1, 37, 29, 32, torch.float32, device)
    forced = dict(forward=(16, 16, 4, 1), repair=(16, 0, 4, 1), dkdv=(16, 16, 4, 1), dq=(16, 16, 4, 1))
    with launch.force_launch_settings("flash_attention", **forced):
        assert attention_tiles(32, torch.float32, q.device) == forced
        _assert_attention_matches(q, k, v, causal=True)


@pytest.mark.parametrize("block_h,split", [(16, (3, 64)), (None, None)])
def test_decode_attention_head_chunks_and_splits(block_h, split, device):
    """A group of 21 query heads per key/value head in chunks of 16 stacked rows (or 64 at once), the keys in
    forced splits, and a combine of several heads per program (with a masked last one)."""
    q = random_tensor((2, 42, 1, 32), torch.float16, 0, device)
    k_cache = random_tensor((2, 2, 150, 32), torch.float16, 1, device)
    v_cache = random_tensor((2, 2, 150, 32), torch.float16, 2, device)
    seqlens = torch.tensor([150, 70], dtype=torch.int32, device=device)
    settings = {name: value for name, value in (("block_h", block_h), ("split", split)) if value is not None}
    with launch.force_launch_settings("decode_attention", **settings):
        kernel = decode_attention(q, k_cache, v_cache, seqlens, impl="triton")
    eager = decode_attention(q, k_cache, v_cache, seqlens, impl="eager")
    reference = decode_attention_reference(q.double(), k_cache.double(), v_cache.double(), seqlens)
    assert_close_to_reference(kernel, reference, eager)


def test_decode_attention_empty_batch_and_empty_cache(device):
    q = random_tensor((0, 2, 1, 32), torch.float32, 0, device)
    cache = random_tensor((0, 2, 10, 32), torch.float32, 1, device)
    assert decode_attention(q, cache, cache, torch.zeros(0, dtype=torch.int64), impl="triton").shape == q.shape
    q = random_tensor((2, 2, 1, 32), torch.float32, 0, device)
    cache = random_tensor((2, 2, 0, 32), torch.float32, 1, device)
    out = decode_attention(q, cache, cache, torch.zeros(2, dtype=torch.int64), impl="triton")
    assert torch.equal(out, torch.zeros_like(q))


# ---------------------------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------------------------
def test_opcheck_flash_attention_forward_and_backward(device):
    q, k, v = _qkv(1, 4, 2, 19, 23, 16, torch.float32, device)
    torch.library.opcheck(torch.ops.genkernels.flash_attention_forward.default, (q, k, v, True, 0.25))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    torch.library.opcheck(torch.ops.genkernels.flash_attention_forward.default, (q, k, v, False, 0.25),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    out, lse = torch.ops.genkernels.flash_attention_forward(q.detach(), k.detach(), v.detach(), False, 0.25)
    torch.library.opcheck(torch.ops.genkernels.flash_attention_backward.default,
                          (torch.ones_like(out), q.detach(), k.detach(), v.detach(), out, lse, False, 0.25))


def test_opcheck_decode_attention(device):
    q = random_tensor((2, 4, 1, 16), torch.float32, 0, device)
    cache = random_tensor((2, 2, 40, 16), torch.float32, 1, device)
    torch.library.opcheck(torch.ops.genkernels.decode_attention.default,
                          (q, cache, cache, torch.tensor([40, 7], device=device), 0.25))


def test_attention_compiles_with_fullgraph(device):
    """Forward, backward and a decode step (inference only: detached inputs) in one compiled graph with dynamic
    shapes (the default scale of a symbolic head_dim included), matching the uncompiled ops."""
    def step(q, k, v, seqlens):
        out = flash_attention(q, k, v, causal=True, impl="triton")
        decoded = decode_attention(out.detach()[:, :, -1:], k.detach(), v.detach(), seqlens, impl="triton")
        return out, decoded

    q, k, v = _qkv(1, 2, 1, 20, 20, 16, torch.float32, device)
    seqlens = torch.tensor([13], device=device)
    grad_out = random_tensor(q.shape, q.dtype, 3, device)
    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")
    results = []
    for fn in (compiled, step):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out, decoded = fn(*leaves, seqlens)
        results.append((out, decoded, torch.autograd.grad(out, leaves, grad_out)))
    (out, decoded, grads), (want_out, want_decoded, want_grads) = results
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(decoded, want_decoded)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one test per rejection
# ---------------------------------------------------------------------------------------------------------------
def _good(batch=2, heads_q=4, heads_kv=2, seq=8, head_dim=16, dtype=torch.float32):
    return _qkv(batch, heads_q, heads_kv, seq, seq, head_dim, dtype, "cpu")


def _flash(q=None, k=None, v=None, **kwargs):
    good = _good()
    return lambda: flash_attention(q if q is not None else good[0], k if k is not None else good[1],
                                   v if v is not None else good[2], impl="triton", **kwargs)


FLASH_REJECTIONS = {
    "q_not_tensor": (_flash(q=[1.0]), TypeError, "q"),
    "k_integer": (_flash(k=torch.ones(2, 2, 8, 16, dtype=torch.int64)), TypeError, "k"),
    "v_rank3": (_flash(v=torch.randn(2, 8, 16)), ValueError, "v"),
    "q_rank5": (_flash(q=torch.randn(1, 2, 4, 8, 16)), ValueError, "q"),
    "dtype_mismatch": (_flash(k=_good()[1].half()), TypeError, "k"),
    "v_shape": (_flash(v=torch.randn(2, 2, 9, 16)), ValueError, "v"),
    "batch_mismatch": (_flash(k=torch.randn(3, 2, 8, 16), v=torch.randn(3, 2, 8, 16)), ValueError, "k"),
    "head_dim_mismatch": (_flash(k=torch.randn(2, 2, 8, 32), v=torch.randn(2, 2, 8, 32)), ValueError,
                          "head_dim"),
    "heads_not_multiple": (_flash(k=torch.randn(2, 3, 8, 16), v=torch.randn(2, 3, 8, 16)), ValueError, "heads"),
    "k_head_dim_only": (_flash(k=torch.randn(2, 2, 8, 32)), ValueError, "k must have the head_dim of q"),
    "v_head_dim_only": (_flash(v=torch.randn(2, 2, 8, 32)), ValueError, "v must have the shape of k"),
    "head_dim_too_small": (lambda: flash_attention(*_good(head_dim=8), impl="triton"), ValueError,
                           r"impl='triton' cannot run these inputs: \(1\) head_dim"),
    "head_dim_too_large": (lambda: flash_attention(*_good(heads_q=2, seq=2, head_dim=512), impl="triton"),
                           ValueError, "head_dim .* is 512"),
    "float64_triton": (lambda: flash_attention(*_good(dtype=torch.float64), impl="triton"), ValueError,
                       "q is torch.float64"),
    "causal_not_bool": (_flash(causal=1), TypeError, "causal"),
    "scale_nan": (_flash(softmax_scale=float("nan")), ValueError, "softmax_scale"),
    "scale_not_number": (_flash(softmax_scale="0.1"), TypeError, "softmax_scale"),
    "bad_impl": (lambda: flash_attention(*_good(), impl="cuda"), ValueError, "impl"),
}


@pytest.mark.parametrize("name", list(FLASH_REJECTIONS))
def test_flash_attention_rejects_bad_input(name):
    call, error, argument = FLASH_REJECTIONS[name]
    with pytest.raises(error, match=argument):
        call()


def test_flash_attention_rejects_tensors_on_two_devices():
    q, k, v = _good()
    with pytest.raises(ValueError, match="k on meta"):
        flash_attention(q, k.to("meta"), v, impl="eager")


def _decode(q=None, k_cache=None, v_cache=None, seqlens=None, **kwargs):
    def call():
        good_q = torch.randn(2, 4, 1, 16)
        good_cache = torch.randn(2, 2, 10, 16)
        return decode_attention(q if q is not None else good_q, k_cache if k_cache is not None else good_cache,
                                v_cache if v_cache is not None else good_cache,
                                seqlens if seqlens is not None else torch.tensor([3, 10]), impl="triton", **kwargs)
    return call


DECODE_REJECTIONS = {
    "q_two_tokens": (_decode(q=torch.randn(2, 4, 2, 16)), ValueError, "q"),
    "cache_rank3": (_decode(k_cache=torch.randn(2, 10, 16)), ValueError, "k_cache"),
    "cache_dtype": (_decode(v_cache=torch.randn(2, 2, 10, 16).half()), TypeError, "v_cache"),
    "cache_batch": (_decode(k_cache=torch.randn(3, 2, 10, 16), v_cache=torch.randn(3, 2, 10, 16)), ValueError,
                    "k_cache"),
    "cache_heads": (_decode(k_cache=torch.randn(2, 3, 10, 16), v_cache=torch.randn(2, 3, 10, 16)), ValueError,
                    "heads"),
    "seqlens_float": (_decode(seqlens=torch.tensor([3.0, 4.0])), TypeError, "cache_seqlens"),
    "seqlens_shape": (_decode(seqlens=torch.tensor([3, 4, 5])), ValueError, "cache_seqlens"),
    "seqlens_negative": (_decode(seqlens=torch.tensor([-1, 4])), ValueError, "cache_seqlens"),
    "seqlens_past_max_seq": (_decode(seqlens=torch.tensor([11, 4])), ValueError, "cache_seqlens"),
    "seqlens_not_tensor": (_decode(seqlens=[3, 4]), TypeError, "cache_seqlens"),
    "k_cache_head_dim_only": (_decode(k_cache=torch.randn(2, 2, 10, 32)), ValueError,
                              "k_cache must have the head_dim of q"),
    "float64_triton": (_decode(q=torch.randn(2, 4, 1, 16).double(), k_cache=torch.randn(2, 2, 10, 16).double(),
                               v_cache=torch.randn(2, 2, 10, 16).double()), ValueError, "float64"),
    "head_dim_triton": (_decode(q=torch.randn(2, 4, 1, 8), k_cache=torch.randn(2, 2, 10, 8),
                                v_cache=torch.randn(2, 2, 10, 8)), ValueError, "head_dim"),
}


@pytest.mark.parametrize("name", list(DECODE_REJECTIONS))
def test_decode_attention_rejects_bad_input(name):
    call, error, argument = DECODE_REJECTIONS[name]
    with pytest.raises(error, match=argument):
        call()


# ---------------------------------------------------------------------------------------------------------------
# NaN / Inf: softmax(q k^T) v in fp64 over the keys each row sees is the oracle (F.scaled_dot_product_attention's
# math backend, except for a row whose visible scores are all -inf: SDPA's _safe_softmax returns 0 there)
# ---------------------------------------------------------------------------------------------------------------
def _finite_pattern(t):
    """-1 / 1 for -inf / +inf, 2 for NaN, 0 for finite values."""
    return torch.where(torch.isnan(t), 2, torch.where(torch.isposinf(t), 1, torch.where(torch.isneginf(t), -1, 0)))


def _sdpa_fp64(q, k, v):
    """Attention in fp64 over all of k/v: torch.softmax of the scaled scores times v (SDPA's math backend gives
    the same, checked for finite inputs); zeros over no key (see test_*_empty_*)."""
    if k.shape[2] == 0:
        return torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    out = torch.softmax((q * q.shape[3] ** -0.5) @ k.transpose(-1, -2), dim=-1) @ v
    if all(torch.isfinite(t).all() for t in (q, k, v)):
        with sdpa_kernel(SDPBackend.MATH):
            torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-12, atol=1e-12)
    return out


def _sdpa_over_visible_keys(q, k, v, causal):
    """Row by row SDPA over exactly the keys the row sees (bottom-right causal alignment)."""
    if not causal:
        return _sdpa_fp64(q, k, v)
    seq_q, seq_k = q.shape[2], k.shape[2]
    seen = [max(0, i + seq_k - seq_q + 1) for i in range(seq_q)]
    rows = [_sdpa_fp64(q[:, :, i:i + 1], k[:, :, :n], v[:, :, :n]) for i, n in enumerate(seen)]
    return torch.cat(rows, dim=2)


def _assert_matches_sdpa_with_its_nan_pattern(out, reference, eager=None):
    assert torch.equal(_finite_pattern(out), _finite_pattern(reference))
    finite = torch.isfinite(reference)
    if eager is None:
        torch.testing.assert_close(out.double()[finite], reference[finite], rtol=1e-4, atol=1e-4)
    else:
        assert_close_to_reference(torch.where(finite, out, 0), torch.where(finite, reference, 0),
                                  torch.where(finite, eager, 0))


def _with_specials(t, entries):
    t = t.clone()
    for index, value in entries:
        t[index] = value
    return t


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("impl", ["triton", "eager"])
def test_decode_attention_never_reads_cache_slots_past_the_length(impl, device):
    """NaN/Inf stored past cache_seqlens (stale or uninitialized slots) must not reach the output (the eager
    reference used to multiply them by a zero probability: 0 * NaN = NaN)."""
    q = random_tensor((3, 4, 1, 16), torch.float32, 0, device)
    k_cache = random_tensor((3, 2, 21, 16), torch.float32, 1, device)
    v_cache = random_tensor((3, 2, 21, 16), torch.float32, 2, device)
    seqlens = torch.tensor([5, 0, 20], device=device)
    poisoned_k, poisoned_v = k_cache.clone(), v_cache.clone()
    for b, n in enumerate(seqlens.tolist()):
        poisoned_k[b, :, n:] = NAN
        poisoned_v[b, :, n:, ::2] = INF
        poisoned_v[b, :, n:, 1::2] = NAN
    out = decode_attention(q, poisoned_k, poisoned_v, seqlens, impl=impl)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, decode_attention(q, k_cache, v_cache, seqlens, impl=impl), rtol=0, atol=0)
    reference = torch.cat([_sdpa_fp64(q[b:b + 1], k_cache[b:b + 1, :, :n], v_cache[b:b + 1, :, :n])
                           for b, n in enumerate(seqlens.tolist())])
    torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["triton", "eager"])
def test_flash_attention_hidden_keys_never_reach_the_rows_they_are_hidden_from(impl, device):
    """Causal: NaN/Inf in a key or value that a row does not see leaves that row finite and exact (the kernel
    used to multiply a hidden NaN value by its zero probability inside the diagonal block, the reference in every
    row); rows that do see it follow SDPA."""
    q, k, v = _qkv(1, 2, 1, 70, 70, 16, torch.float32, device)
    k_bad = _with_specials(k, [((0, 0, 50, 3), INF), ((0, 0, 60, 0), NAN)])
    v_bad = _with_specials(v, [((0, 0, 40, 5), NAN), ((0, 0, 45, 7), INF), ((0, 0, 45, 8), -INF)])
    out = flash_attention(q, k_bad, v_bad, causal=True, impl=impl)
    clean = flash_attention(q, k, v, causal=True, impl=impl)
    assert torch.isfinite(out[:, :, :40]).all()
    torch.testing.assert_close(out[:, :, :40], clean[:, :, :40], rtol=1e-5, atol=1e-6)
    reference = _sdpa_over_visible_keys(q, k_bad, v_bad, causal=True)
    assert torch.isnan(reference[:, :, 40:, 5]).all() and torch.isposinf(reference[:, :, 45:50, 7]).all()
    _assert_matches_sdpa_with_its_nan_pattern(out, reference)


SPECIAL_QUERIES = {
    # every score -inf: softmax's 0 / 0 is NaN (SDPA's _safe_softmax returns 0, hiding the Inf; issue 11, item 11)
    "inf_query_all_scores_minus_inf": lambda q, k: (_with_specials(q, [((..., 0), INF)]), k.abs().neg()),
    "inf_query_some_scores_plus_inf": lambda q, k: (_with_specials(q, [((..., 0), INF)]), k),
    "minus_inf_query": lambda q, k: (_with_specials(q, [((..., 2), -INF)]), k),
    "nan_query": lambda q, k: (_with_specials(q, [((0, 1, ..., 3), NAN)]), k),
    "inf_query_times_zero_key": lambda q, k: (_with_specials(q, [((..., 0), INF)]),
                                              _with_specials(k, [((..., 0), 0.0)])),
}


@pytest.mark.parametrize("impl", ["triton", "eager"])
@pytest.mark.parametrize("case", list(SPECIAL_QUERIES))
def test_nan_and_inf_queries_give_the_softmax_nan_pattern(case, impl, device):
    """A NaN/Inf query gives softmax attention's NaN/Inf pattern under both ops and both impls: NaN where a
    score is NaN or +inf, and where every visible score is -inf (the ops used to return 0 there)."""
    q, k, v = _qkv(2, 4, 2, 9, 23, 16, torch.float32, device)
    k = k.abs() + 0.1
    q, k = SPECIAL_QUERIES[case](q, k)
    for causal in (False, True):
        out = flash_attention(q, k, v, causal=causal, impl=impl)
        _assert_matches_sdpa_with_its_nan_pattern(out, _sdpa_over_visible_keys(q, k, v, causal))
    seqlens = torch.tensor([23, 7], device=device)
    out = decode_attention(q[:, :, :1], k, v, seqlens, impl=impl)
    reference = torch.cat([_sdpa_fp64(q[b:b + 1, :, :1], k[b:b + 1, :, :n], v[b:b + 1, :, :n])
                           for b, n in enumerate(seqlens.tolist())])
    _assert_matches_sdpa_with_its_nan_pattern(out, reference)
    if case == "inf_query_all_scores_minus_inf":
        assert torch.isnan(out).all()


@pytest.mark.parametrize("impl", ["triton", "eager"])
def test_nan_and_inf_keys_and_values_follow_sdpa(impl, device):
    """Specials in the keys and values every row sees: NaN for a NaN key or a +inf score, +-Inf in the dims of an
    Inf value, NaN where +Inf meets -Inf; fp16 and bf16 as fp32."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        q, k, v = _qkv(1, 2, 1, 5, 13, 16, dtype, device)
        k = _with_specials(k, [((0, 0, 3, 0), NAN)])
        v = _with_specials(v, [((0, 0, 5, 1), INF), ((0, 0, 6, 2), -INF), ((0, 0, 7, 4), INF), ((0, 0, 8, 4), -INF)])
        for causal in (False, True):
            out = flash_attention(q, k, v, causal=causal, impl=impl)
            _assert_matches_sdpa_with_its_nan_pattern(out, _sdpa_over_visible_keys(q, k, v, causal))


@pytest.mark.parametrize("impl", ["triton", "eager"])
def test_an_inf_value_of_a_tiny_probability_stays_inf_in_half_precision(impl, device):
    """p = e^-24 rounds to 0 in an fp16 tile, and 0 * Inf = NaN; the probability is positive (fp32, fp64), so
    softmax attention gives +Inf there (the program recomputes such an output exactly)."""
    q = torch.zeros(1, 2, 1, 16, device=device)
    k = torch.zeros(1, 1, 2, 16, device=device)
    q[..., 0], k[0, 0, 0, 0], k[0, 0, 1, 0] = 8.0, 8.0, -4.0
    v = random_tensor((1, 1, 2, 16), torch.float32, 3, device)
    v[0, 0, 1, 3] = INF
    q, k, v = q.half(), k.half(), v.half()
    for out in (flash_attention(q, k, v, impl=impl),
                decode_attention(q, k, v, torch.tensor([2], device=device), impl=impl)):
        reference = _sdpa_fp64(q, k, v)
        assert torch.isposinf(reference[..., 3]).all()
        _assert_matches_sdpa_with_its_nan_pattern(out, reference, flash_attention(q, k, v, impl="eager"))


@pytest.mark.parametrize("impl", ["triton", "eager"])
def test_fp32_scores_are_scaled_before_they_can_overflow(impl, device):
    """q . k = -1.6 * 3.4e38 overflows fp32, scale * q . k does not: q is scaled first (as SDPA does), so the one
    key keeps its probability 1 instead of a -inf score turning the row NaN."""
    for dtype in (torch.float32, torch.bfloat16):  # bf16 has fp32's range
        q, k, v = _qkv(1, 2, 1, 3, 1, 16, dtype, device)
        q = _with_specials(q, [((..., 11), -1.6)])
        k = _with_specials(k, [((..., 11), 3.3e38)])
        out = flash_attention(q, k, v, impl=impl)
        torch.testing.assert_close(out, v.expand(1, 2, 3, 16), rtol=0, atol=0)
        out = flash_attention(q, k, v, causal=True, impl=impl)  # the last row alone sees the key
        torch.testing.assert_close(out[:, :, -1:], v.expand(1, 2, 1, 16), rtol=0, atol=0)
        decoded = decode_attention(q[:, :, :1], k, v, torch.tensor([1], device=device), impl=impl)
        torch.testing.assert_close(decoded, v.expand(1, 2, 1, 16), rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["triton", "eager"])
def test_rows_that_see_no_key_and_empty_caches_are_zero_whatever_the_query(impl, device):
    """No visible key: zeros, as SDPA gives for a finite query (a fully masked row, zero keys). SDPA over zero
    keys turns its whole output NaN when any query entry is NaN/Inf; here the output does not depend on q."""
    q = _with_specials(random_tensor((2, 2, 1, 16), torch.float32, 0, device), [((0, 0, 0, 1), NAN),
                                                                                 ((1, 1, 0, 2), INF)])
    cache = random_tensor((2, 1, 9, 16), torch.float32, 1, device)
    out = decode_attention(q, cache, cache, torch.tensor([0, 0], device=device), impl=impl)
    assert torch.equal(out, torch.zeros_like(q))
    finite_q = random_tensor((2, 2, 1, 16), torch.float32, 0, device)
    assert torch.equal(decode_attention(finite_q, cache, cache, torch.tensor([0, 0], device=device), impl=impl),
                       _sdpa_fp64(finite_q, cache[:, :, :0], cache[:, :, :0]).float())
    out = flash_attention(q, cache[:, :, :0], cache[:, :, :0], impl=impl)
    assert torch.equal(out, torch.zeros_like(q))
    # seq_q > seq_k, causal: the first rows see no key; SDPA (math, fp64) gives them zeros too
    q, k, v = _qkv(1, 2, 1, 9, 4, 16, torch.float32, device)
    out = flash_attention(q, k, v, causal=True, impl=impl)
    mask = causal_visibility(9, 4, device)
    with sdpa_kernel(SDPBackend.MATH):
        expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask,
                                                  enable_gqa=True)
    assert torch.equal(out[:, :, :5], torch.zeros_like(out[:, :, :5]))
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# The op contract: fp64, head dims the kernels do not take, zero sizes, strides, meta tensors
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
def test_float64_runs_the_eager_reference_in_float64(causal, device):
    q, k, v = _qkv(2, 4, 2, 7, 13, 16, torch.float64, device)
    out = flash_attention(q, k, v, causal=causal)
    mask = causal_visibility(7, 13, device) if causal else None
    with sdpa_kernel(SDPBackend.MATH):
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    seqlens = torch.tensor([13, 4], device=device)
    out = decode_attention(q[:, :, :1], k, v, seqlens)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, decode_attention_reference(q[:, :, :1], k, v, seqlens), rtol=0, atol=0)
    torch.testing.assert_close(out[1:], _sdpa_fp64(q[1:, :, :1], k[1:, :, :4], v[1:, :, :4]), rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("head_dim", [1, 8, 300])
def test_head_dims_outside_the_kernels_run_the_reference_under_auto(head_dim, device):
    q, k, v = _qkv(1, 2, 1, 5, 6, head_dim, torch.float32, device)
    out = flash_attention(q, k, v, causal=True)
    with sdpa_kernel(SDPBackend.MATH):
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_visibility(5, 6, device),
                                                  enable_gqa=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    decoded = decode_attention(q[:, :, :1], k, v, torch.tensor([3], device=device))
    torch.testing.assert_close(decoded, _sdpa_fp64(q[:, :, :1], k[:, :, :3], v[:, :, :3]).float(), rtol=1e-5,
                               atol=1e-5)


ZERO_SIZES = [  # (q shape, k shape)
    ((0, 2, 5, 16), (0, 1, 5, 16)),
    ((2, 0, 5, 16), (2, 0, 5, 16)),
    ((2, 0, 5, 16), (2, 1, 5, 16)),
    ((2, 2, 0, 16), (2, 1, 5, 16)),
    ((2, 2, 5, 16), (2, 1, 0, 16)),
    ((2, 2, 5, 0), (2, 1, 5, 0)),
]


@pytest.mark.parametrize("q_shape,k_shape", ZERO_SIZES, ids=lambda s: "x".join(map(str, s)))
def test_zero_sizes_give_the_shapes_sdpa_gives(q_shape, k_shape, device):
    q = random_tensor(q_shape, torch.float32, 0, device)
    k = random_tensor(k_shape, torch.float32, 1, device)
    expected = F.scaled_dot_product_attention(q, k, k, enable_gqa=True)
    impls = ["eager", "auto"] + (["triton"] if q_shape[3] >= 16 else [])
    for impl in impls:
        for causal in (False, True):
            out = flash_attention(q, k, k, causal=causal, impl=impl)
            assert out.shape == expected.shape
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        if q_shape[2] == 1 or q_shape[2] == 0:
            continue
        seqlens = torch.full((q_shape[0],), k_shape[2], dtype=torch.int32, device=device)
        decoded = decode_attention(q[:, :, :1], k, k, seqlens, impl=impl)
        assert decoded.shape == q[:, :, :1].shape
        torch.testing.assert_close(decoded, expected[:, :, :1] if k_shape[2] else torch.zeros_like(decoded),
                                   rtol=1e-5, atol=1e-5)


def test_flash_attention_reads_expanded_and_transposed_layouts(device):
    """GQA keys/values expanded to every query head with stride 0, a transposed query, a sliced head_dim."""
    q, k, v = _qkv(2, 4, 1, 19, 19, 32, torch.float32, device)
    q_t = q.transpose(2, 3).contiguous().transpose(2, 3)
    k_wide = random_tensor((2, 1, 19, 64), torch.float32, 8, device)[..., ::2]
    k_expanded, v_expanded = k_wide.expand(2, 4, 19, 32), v.expand(2, 4, 19, 32)
    assert k_expanded.stride(1) == 0 and k_expanded.stride(3) == 2
    reference = _forward_backward(lambda *t: attention_reference(*t, True), [x.double() for x in (q, k_wide, v)],
                                  random_tensor(q.shape, torch.float64, 9, device))
    for impl in ("triton", "eager"):
        out = flash_attention(q_t, k_expanded, v_expanded, causal=True, impl=impl)
        torch.testing.assert_close(out.double(), reference[0], rtol=1e-5, atol=1e-5)
    seqlens = torch.tensor([19, 6], device=device)
    decoded = decode_attention(q_t[:, :, :1], k_expanded, v_expanded, seqlens, impl="triton")
    torch.testing.assert_close(decoded, decode_attention_reference(q[:, :, :1], k_wide, v, seqlens), rtol=1e-5,
                               atol=1e-5)


def test_meta_tensors_take_the_registered_op_and_its_fake():
    q = torch.empty(2, 4, 9, 16, device="meta")
    k = torch.empty(2, 2, 9, 16, device="meta")
    for impl in ("auto", "triton"):
        assert flash_attention(q, k, k, causal=True, impl=impl).shape == q.shape
        seqlens = torch.empty(2, dtype=torch.int32, device="meta")
        assert decode_attention(q[:, :, :1], k, k, seqlens, impl=impl).shape == (2, 4, 1, 16)
    small = torch.empty(2, 2, 9, 8, device="meta")
    assert flash_attention(small, small, small, impl="triton").device.type == "meta"


@pytest.mark.parametrize("seqlens, bad", [([3, 11], 11), ([-1, 4], -1)])
def test_cache_seqlens_range_is_checked_on_the_host_for_cpu_tensors(seqlens, bad):
    q, cache = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 10, 16)
    for impl in ("eager", "triton"):
        with pytest.raises(ValueError, match=rf"cache_seqlens must lie in \[0, 10\]; got a value {bad}"):
            decode_attention(q, cache, cache, torch.tensor(seqlens), impl=impl)


# ---------------------------------------------------------------------------------------------------------------
# Big shapes (GPU machine)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_flash_attention_long_sequences_bf16(causal, head_dim):
    """At 4k tokens the same-dtype peer is PyTorch's own bf16 SDPA (fused kernels round probabilities to bf16 as
    ours do); the oracle is the fp32 reference (fp64 matmuls are slow on the GPU)."""
    q, k, v = _qkv(2, 8, 2, 4096, 4096, head_dim, torch.bfloat16, "cuda")
    grad_out = random_tensor(q.shape, q.dtype, 7, "cuda")
    kernel = _forward_backward(lambda *t: flash_attention(*t, causal=causal, impl="triton"), (q, k, v), grad_out)
    peer = _forward_backward(lambda *t: F.scaled_dot_product_attention(*t, is_causal=causal, enable_gqa=True),
                             (q, k, v), grad_out)
    reference = _forward_backward(lambda *t: attention_reference(*t, causal), [x.float() for x in (q, k, v)],
                                  grad_out.float())
    for name, got, want, same in zip(("output", "dq", "dk", "dv"), (kernel[0], *kernel[1]),
                                     (reference[0], *reference[1]), (peer[0], *peer[1])):
        assert_close_to_reference(got, want, same, name)


@pytest.mark.gpu
def test_decode_attention_long_cache_bf16():
    q = random_tensor((4, 32, 1, 128), torch.bfloat16, 0, "cuda")
    k_cache = random_tensor((4, 8, 32768, 128), torch.bfloat16, 1, "cuda")
    v_cache = random_tensor((4, 8, 32768, 128), torch.bfloat16, 2, "cuda")
    seqlens = torch.tensor([0, 32768, 5000, 1], device="cuda", dtype=torch.int32)
    kernel = decode_attention(q, k_cache, v_cache, seqlens, impl="triton")
    eager = decode_attention(q, k_cache, v_cache, seqlens, impl="eager")
    reference = decode_attention_reference(q.float(), k_cache.float(), v_cache.float(), seqlens)
    assert_close_to_reference(kernel, reference, eager)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nan_and_inf_semantics_of_the_compiled_kernels(dtype):
    """The compiled kernels (native 16-bit dots, the runtime branch of a masked block holding NaN/Inf values, the
    pre-scaled query) give what the interpreter gives: hidden NaN values never reach the rows they are hidden
    from, an all -inf row is NaN, an empty cache is zero."""
    q, k, v = _qkv(2, 4, 2, 300, 300, 64, dtype, "cuda")
    v_bad = _with_specials(v, [((0, 0, 200, 5), NAN), ((1, 1, 130, 7), INF)])
    out = flash_attention(q, k, v_bad, causal=True, impl="triton")
    clean = flash_attention(q, k, v, causal=True, impl="triton")
    assert torch.isfinite(out[0, :2, :200]).all() and torch.isfinite(out[1, 2:, :130]).all()
    assert torch.isfinite(clean).all()
    assert torch.isnan(out[0, :2, 200:, 5]).all() and torch.isposinf(out[1, 2:, 130:, 7]).all()
    reference = attention_reference(q.double(), k.double(), v_bad.double(), True)
    _assert_matches_sdpa_with_its_nan_pattern(out, reference, flash_attention(q, k, v_bad, causal=True,
                                                                              impl="eager"))
    q_inf = _with_specials(q, [((0, 0, 3, 0), INF)])
    k_neg = _with_specials(k, [((0, 0, ..., 0), -1.0)])
    out = flash_attention(q_inf, k_neg, v, impl="triton")
    assert torch.isnan(out[0, 0, 3]).all() and torch.isfinite(out[0, 0, :3]).all()
    seqlens = torch.tensor([0, 250], device="cuda", dtype=torch.int32)
    decoded = decode_attention(q_inf[:, :, 3:4], k_neg, v_bad, seqlens, impl="triton")
    assert torch.equal(decoded[0], torch.zeros_like(decoded[0]))
    reference = decode_attention_reference(q_inf[:, :, 3:4].double(), k_neg.double(), v_bad.double(), seqlens)
    eager = decode_attention(q_inf[:, :, 3:4], k_neg, v_bad, seqlens, impl="eager")
    _assert_matches_sdpa_with_its_nan_pattern(decoded, reference, eager)


# ---------------------------------------------------------------------------------------------------------------
# decode_attention appending the step's key/value (ragged KV caches)
# ---------------------------------------------------------------------------------------------------------------
def _append_inputs(dtype, device, heads_q=4, heads_kv=2, max_seq=40, head_dim=32):
    q = random_tensor((3, heads_q, 1, head_dim), dtype, 0, device)
    # strided caches: a prefix of bigger buffers, as a preallocated cache is
    k_cache = random_tensor((3, heads_kv, max_seq + 5, head_dim), dtype, 1, device)[:, :, :max_seq]
    v_cache = random_tensor((3, heads_kv, max_seq + 5, head_dim), dtype, 2, device)[:, :, :max_seq]
    k_new = random_tensor((3, heads_kv, 1, head_dim), dtype, 3, device)
    v_new = random_tensor((3, heads_kv, 4, head_dim), dtype, 4, device)[:, :, 1:2]  # a strided view
    seqlens = torch.tensor([0, 17, max_seq - 1], dtype=torch.int32, device=device)
    return q, k_cache, v_cache, k_new, v_new, seqlens


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decode_attention_appends_each_sequence_at_its_own_length(dtype, device):
    """Ragged lengths (an empty cache, a middle one, the last free slot): the new key/value land at position n_b
    of each sequence (nothing else in the caches changes) and the output is attention over n_b + 1 positions."""
    q, k_cache, v_cache, k_new, v_new, seqlens = _append_inputs(dtype, device)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    for b, n in enumerate(seqlens.tolist()):
        expected_k[b, :, n], expected_v[b, :, n] = k_new[b, :, 0], v_new[b, :, 0]
    reference = decode_attention_reference(q.double(), expected_k.double(), expected_v.double(), seqlens + 1)
    eager_caches = (k_cache.clone(), v_cache.clone())
    eager = decode_attention(q, *eager_caches, seqlens, k=k_new, v=v_new, impl="eager")
    kernel = decode_attention(q, k_cache, v_cache, seqlens, k=k_new, v=v_new, impl="triton")
    assert_close_to_reference(kernel, reference, eager)
    for written, want in ((k_cache, expected_k), (v_cache, expected_v), (eager_caches[0], expected_k),
                          (eager_caches[1], expected_v)):
        assert torch.equal(written, want)
    assert seqlens.tolist() == [0, 17, 39]  # the caller advances the lengths


@pytest.mark.parametrize("split", [(3, 16), (5, 8)])
def test_decode_attention_append_with_forced_splits(split, device):
    q, k_cache, v_cache, k_new, v_new, seqlens = _append_inputs(torch.float32, device)
    eager_caches = (k_cache.clone(), v_cache.clone())
    eager = decode_attention(q, *eager_caches, seqlens, k=k_new, v=v_new, impl="eager")
    with launch.force_launch_settings("decode_attention", split=split):
        kernel = decode_attention(q, k_cache, v_cache, seqlens, k=k_new, v=v_new, impl="triton")
    torch.testing.assert_close(kernel, eager, rtol=1e-5, atol=1e-5)
    assert torch.equal(k_cache, eager_caches[0]) and torch.equal(v_cache, eager_caches[1])


def test_opcheck_decode_attention_append(device):
    q, k_cache, v_cache, k_new, v_new, seqlens = _append_inputs(torch.float32, device)
    torch.library.opcheck(torch.ops.genkernels.decode_attention_append.default,
                          (q, k_cache.clone(), v_cache.clone(), seqlens, k_new, v_new, 0.25),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("change,error,name", [
    (lambda a: dict(v=None), ValueError, "k and v must be given together"),
    (lambda a: dict(k=a["k"][:, :, :0]), ValueError, "k must be"),
    (lambda a: dict(v=a["v"].double()), TypeError, "v"),
    (lambda a: dict(k_cache=a["k_cache"][:, :, :1].expand(-1, -1, 40, -1)), ValueError, "k_cache must be writable"),
    (lambda a: dict(cache_seqlens=torch.tensor([0, 17, 40], dtype=torch.int32)), ValueError, "cache_seqlens"),
])
def test_decode_attention_append_rejects_bad_input(change, error, name):
    q, k_cache, v_cache, k_new, v_new, seqlens = _append_inputs(torch.float32, "cpu")
    arguments = dict(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=seqlens, k=k_new, v=v_new)
    arguments.update(change(arguments))
    with pytest.raises(error, match=name):
        decode_attention(**arguments)
