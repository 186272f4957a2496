"""genkernels.kernels.scaled_dot_product_attention: torch's SDPA signature and semantics, routed to the flash
attention kernels where they apply and to torch's SDPA (with a warning) or an error where they do not."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from reference_checks import assert_close_to_reference, random_tensor

import genkernels.kernels as gk
from genkernels.kernels import AttentionFallbackWarning, scaled_dot_product_attention
from genkernels.kernels import attention as attention_module
from genkernels.kernels import sdpa as sdpa_module
from genkernels.kernels.runtime import triton_can_run_on

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _sdpa_inputs(q_shape, k_shape, v_shape, dtype, device, seed=0):
    return (random_tensor(q_shape, dtype, seed, device), random_tensor(k_shape, dtype, seed + 1, device),
            random_tensor(v_shape, dtype, seed + 2, device))


def _check_against_sdpa(q, k, v, impl, grad=True, **kwargs):
    """Output (and gradients of q, k, v) of ours vs torch's SDPA: fp64 SDPA the reference, SDPA in the tested
    dtype the baseline of the tolerance rule."""
    def run(fn, dtype):
        leaves = [x.detach().to(dtype).requires_grad_(grad) for x in (q, k, v)]
        out = fn(*leaves)
        if not grad:
            return out.detach(), []
        grad_out = random_tensor(out.shape, dtype, 7, out.device)
        return out.detach(), list(torch.autograd.grad(out, leaves, grad_out))

    ours = run(lambda *t: scaled_dot_product_attention(*t, impl=impl, **kwargs), q.dtype)
    ref = run(lambda *t: F.scaled_dot_product_attention(*t, **kwargs), torch.float64)
    base = run(lambda *t: F.scaled_dot_product_attention(*t, **kwargs), q.dtype)
    assert_close_to_reference(ours[0], ref[0], base[0], "output")
    for name, got, want, baseline in zip("qkv", ours[1], ref[1], base[1]):
        assert_close_to_reference(got, want, baseline, f"grad of {name}")
    return ours[0]


def _kernels_available(device):
    return triton_can_run_on(torch.device(device))


# ---------------------------------------------------------------------------------------------------------------
# Numbers against torch's SDPA
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", ["auto", "eager"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_matches_sdpa_ragged_lengths(dtype, impl, is_causal, device):
    q, k, v = _sdpa_inputs((1, 2, 7, 16), (1, 2, 13, 16), (1, 2, 13, 16), dtype, device)
    _check_against_sdpa(q, k, v, impl, is_causal=is_causal)


@pytest.mark.parametrize("seq_q,seq_k", [(13, 7), (7, 13), (9, 9), (5, 0)])
@pytest.mark.parametrize("impl", ["triton", "eager"])
def test_top_left_causal_mask_for_every_length_pair(seq_q, seq_k, impl, device):
    """SDPA's is_causal is top-left aligned (flash_attention's causal is bottom-right): both L < S and L > S."""
    if impl == "triton" and not _kernels_available(device):
        pytest.skip("the kernels need a GPU or the interpreter")
    q, k, v = _sdpa_inputs((1, 2, seq_q, 16), (1, 2, seq_k, 16), (1, 2, seq_k, 16), torch.float32, device)
    _check_against_sdpa(q, k, v, impl, is_causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_path_matches_sdpa(dtype, device):
    if not _kernels_available(device):
        pytest.skip("the kernels need a GPU or the interpreter")
    q, k, v = _sdpa_inputs((2, 2, 13, 32), (2, 2, 7, 32), (2, 2, 7, 32), dtype, device)
    _check_against_sdpa(q, k, v, "triton", is_causal=True, scale=0.3)


@pytest.mark.parametrize("impl", ["auto", "eager"])
@pytest.mark.parametrize("heads_kv", [1, 2])
def test_grouped_query_attention(impl, heads_kv, device):
    q, k, v = _sdpa_inputs((1, 4, 7, 16), (1, heads_kv, 13, 16), (1, heads_kv, 13, 16), torch.float32, device)
    _check_against_sdpa(q, k, v, impl, enable_gqa=True, is_causal=True)


@pytest.mark.parametrize("impl", ["auto", "eager"])
def test_custom_scale(impl, device):
    q, k, v = _sdpa_inputs((1, 2, 9, 16), (1, 2, 9, 16), (1, 2, 9, 16), torch.float32, device)
    _check_against_sdpa(q, k, v, impl, scale=0.7)


@pytest.mark.parametrize("q_shape,k_shape,v_shape,kwargs", [
    ((3, 7, 16), (3, 13, 16), (3, 13, 16), {}),
    ((4, 7, 16), (2, 13, 16), (2, 13, 16), {"enable_gqa": True}),
    ((2, 2, 2, 7, 16), (2, 2, 2, 13, 16), (2, 2, 2, 13, 16), {"is_causal": True}),
    ((2, 1, 4, 7, 16), (2, 1, 2, 13, 16), (2, 1, 2, 13, 16), {"enable_gqa": True}),
    ((7, 16), (13, 16), (13, 16), {}),
    ((2, 2, 7, 16), (1, 2, 13, 16), (2, 13, 16), {}),  # broadcast leading dims
    ((0, 2, 7, 16), (0, 2, 13, 16), (0, 2, 13, 16), {"is_causal": True}),
    ((1, 0, 7, 16), (1, 0, 13, 16), (1, 0, 13, 16), {"enable_gqa": True}),
    ((1, 2, 0, 16), (1, 2, 13, 16), (1, 2, 13, 16), {}),
    ((1, 2, 7, 16), (1, 2, 0, 16), (1, 2, 0, 16), {"is_causal": True}),
])
@pytest.mark.parametrize("impl", ["auto", "eager"])
def test_leading_dims_3d_5d_2d_and_broadcast(q_shape, k_shape, v_shape, kwargs, impl, device):
    q, k, v = _sdpa_inputs(q_shape, k_shape, v_shape, torch.float32, device)
    out = _check_against_sdpa(q, k, v, impl, **kwargs)
    assert out.shape == F.scaled_dot_product_attention(q, k, v, **kwargs).shape


@pytest.mark.parametrize("mask_kind", ["bool", "float", "key_padding", "fully_masked_row"])
@pytest.mark.parametrize("impl", ["auto", "eager"])
def test_masks_match_sdpa(mask_kind, impl, device):
    q, k, v = _sdpa_inputs((2, 2, 7, 16), (2, 2, 13, 16), (2, 2, 13, 24), torch.float32, device)
    if mask_kind == "bool":
        mask = torch.rand(2, 1, 7, 13, generator=torch.Generator().manual_seed(0)) > 0.3
    elif mask_kind == "float":
        mask = random_tensor((7, 13), torch.float32, 5, "cpu")
    elif mask_kind == "key_padding":
        mask = torch.arange(13)[None, None, None, :] < torch.tensor([13, 5])[:, None, None, None]
    else:
        mask = torch.ones(7, 13, dtype=torch.bool)
        mask[3] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AttentionFallbackWarning)
        _check_against_sdpa(q, k, v, impl, attn_mask=mask.to(device))


@pytest.mark.parametrize("impl", ["auto", "triton", "eager"])
def test_dropout_keeps_sdpa_statistics(impl, device):
    """Dropout runs whenever dropout_p > 0 (as torch does): zeros at the rate p, the rest scaled by 1/(1-p);
    dropout_p = 1 is accepted (as torch accepts it) and gives zeros."""
    q = torch.zeros(1, 1, 64, 16, device=device)
    k = torch.zeros(1, 1, 64, 16, device=device)
    v = torch.ones(1, 1, 64, 16, device=device)  # uniform probabilities 1/64; out = sum of kept probs / (1 - p)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AttentionFallbackWarning)
        out = scaled_dot_product_attention(q, k, v, dropout_p=0.5, impl=impl)
        zero = scaled_dot_product_attention(q, k, v, dropout_p=1.0, impl=impl)
    assert abs(out[..., 0].mean().item() - 1.0) < 0.05
    assert 0 < out[..., 0].std().item()
    assert torch.equal(zero, torch.zeros_like(zero))


# ---------------------------------------------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------------------------------------------
class _Spy:
    def __init__(self, launch):
        self.launch, self.calls = launch, []

    def __call__(self, q, k, v, causal, scale, attn_mask=None, seed=None, dropout_p=0.0, top_left=False):
        mask = None if attn_mask is None else (tuple(attn_mask.shape), attn_mask.stride())
        self.calls.append((tuple(q.shape), tuple(k.shape), causal, scale, mask, dropout_p, top_left))
        return self.launch(q, k, v, causal, scale, attn_mask, seed, dropout_p, top_left)


@pytest.fixture
def spy(monkeypatch):
    """Records every launch of the flash-attention forward kernel (what the registered op runs)."""
    spy = _Spy(attention_module._launch_forward)
    monkeypatch.setattr(attention_module, "_launch_forward", spy)
    return spy


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(sdpa_module, "_warned_fallback_reasons", set())


def test_kernel_runs_without_a_mask(spy, device):
    if not _kernels_available(device):
        pytest.skip("the kernels need a GPU or the interpreter")
    q, k, v = _sdpa_inputs((1, 2, 7, 16), (1, 2, 13, 16), (1, 2, 13, 16), torch.float32, device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5)
    # SDPA's top-left causal alignment goes to the kernel as such (one launch whatever L and S)
    assert spy.calls == [((1, 2, 7, 16), (1, 2, 13, 16), True, 0.5, None, 0.0, True)]


def test_kernel_reads_masks_in_place(spy, device):
    """A key-padding mask reaches the kernel as a stride-0 view of the [batch, 1, 1, S] tensor, never
    materialized; dropout_p goes with it."""
    if not _kernels_available(device):
        pytest.skip("the kernels need a GPU or the interpreter")
    q, k, v = _sdpa_inputs((2, 3, 7, 16), (2, 3, 13, 16), (2, 3, 13, 16), torch.float32, device)
    mask = torch.arange(13, device=device)[None, None, None, :] < torch.tensor([13, 4], device=device)[:, None,
                                                                                                       None, None]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.25)
    assert spy.calls == [((2, 3, 7, 16), (2, 3, 13, 16), False, 0.25, ((2, 3, 7, 13), (13, 0, 0, 1)), 0.25, False)]


def test_kernel_folds_leading_dims_into_batch(spy, device):
    if not _kernels_available(device):
        pytest.skip("the kernels need a GPU or the interpreter")
    q, k, v = _sdpa_inputs((2, 3, 4, 5, 16), (2, 3, 2, 5, 16), (2, 3, 2, 5, 16), torch.float32, device)
    out = scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert out.shape == (2, 3, 4, 5, 16)
    assert spy.calls == [((6, 4, 5, 16), (6, 2, 5, 16), False, 0.25, None, 0.0, False)]


def test_fallback_warns_once_per_reason(spy, fresh_warnings, device):
    if not _kernels_available(device):
        pytest.skip("the fallback warning is for inputs the kernels could otherwise take")
    q, k, v = _sdpa_inputs((1, 2, 7, 16), (1, 2, 13, 16), (1, 2, 13, 24), torch.float32, device)
    with pytest.warns(AttentionFallbackWarning, match="Ev") as record:
        scaled_dot_product_attention(q, k, v)
    assert len(record) == 1 and issubclass(AttentionFallbackWarning, UserWarning)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scaled_dot_product_attention(q, k, v)  # the same reason: no second warning
    mask = torch.zeros(7, 13, device=device, requires_grad=True)
    with pytest.warns(AttentionFallbackWarning, match="attn_mask requires grad"):
        out = scaled_dot_product_attention(q, k, v[..., :16], attn_mask=mask)
    assert torch.autograd.grad(out.sum(), mask)[0].shape == mask.shape  # the mask's gradient is not lost
    assert spy.calls == []


def test_triton_impl_lists_every_reason(device):
    q, k, v = _sdpa_inputs((1, 2, 7, 8), (1, 2, 13, 8), (1, 2, 13, 4), torch.float32, device)
    mask = torch.ones(7, 13, device=device, requires_grad=True)
    with pytest.raises(ValueError) as error:
        scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.2, impl="triton")
    message = str(error.value)
    for reason in ("attn_mask requires grad", "Ev (4)", "head_dim"):
        assert reason in message


def test_eager_impl_and_cpu_do_not_warn(fresh_warnings, device):
    q, k, v = _sdpa_inputs((1, 2, 7, 16), (1, 2, 13, 16), (1, 2, 13, 16), torch.float32, device)
    mask = torch.ones(7, 13, dtype=torch.bool, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scaled_dot_product_attention(q, k, v, attn_mask=mask, impl="eager")
        with gk.use_impl("eager"):
            scaled_dot_product_attention(q, k, v, attn_mask=mask)
        scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)


def test_compiles_with_fullgraph_on_the_kernel_path(device):
    if not _kernels_available(device):
        pytest.skip("the kernels need a GPU or the interpreter")

    def step(q, k, v):
        return scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, impl="triton")

    q, k, v = _sdpa_inputs((1, 2, 9, 16), (1, 1, 5, 16), (1, 1, 5, 16), torch.float32, device)
    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")
    results = []
    for fn in (compiled, step):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = fn(*leaves)
        results.append((out, torch.autograd.grad(out.sum(), leaves)))
    torch.testing.assert_close(results[0][0], results[1][0])
    for got, want in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: each rejection names the argument
# ---------------------------------------------------------------------------------------------------------------
def _good():
    return _sdpa_inputs((1, 2, 7, 16), (1, 2, 13, 16), (1, 2, 13, 16), torch.float32, "cpu")


@pytest.mark.parametrize("case,error,name", [
    (lambda q, k, v: dict(query=q.numpy()), TypeError, "query"),
    (lambda q, k, v: dict(key=k.long()), TypeError, "key"),
    (lambda q, k, v: dict(value=v.double()), TypeError, "value"),
    (lambda q, k, v: dict(query=q[0, 0, 0]), ValueError, "query"),
    (lambda q, k, v: dict(key=k[..., :8]), ValueError, "key"),
    (lambda q, k, v: dict(value=v[..., :5, :]), ValueError, "value"),
    (lambda q, k, v: dict(key=k[:, :1].repeat(1, 3, 1, 1), value=v[:, :1].repeat(1, 3, 1, 1)), ValueError,
     "key"),
    (lambda q, k, v: dict(key=k[:, :1].repeat(1, 3, 1, 1), value=v[:, :1].repeat(1, 3, 1, 1), enable_gqa=True),
     ValueError, "key"),
    (lambda q, k, v: dict(dropout_p=1.5), ValueError, "dropout_p"),
    (lambda q, k, v: dict(dropout_p=-0.1), ValueError, "dropout_p"),
    (lambda q, k, v: dict(dropout_p=float("nan")), ValueError, "dropout_p"),
    (lambda q, k, v: dict(dropout_p="0.1"), TypeError, "dropout_p"),
    (lambda q, k, v: dict(is_causal=1), TypeError, "is_causal"),
    (lambda q, k, v: dict(enable_gqa="yes"), TypeError, "enable_gqa"),
    (lambda q, k, v: dict(scale=float("inf")), ValueError, "scale"),
    (lambda q, k, v: dict(attn_mask=torch.ones(7, 13, dtype=torch.int64)), TypeError, "attn_mask"),
    (lambda q, k, v: dict(attn_mask=torch.ones(7, 13, dtype=torch.float16)), TypeError, "attn_mask"),
    (lambda q, k, v: dict(attn_mask=torch.ones(7, 12, dtype=torch.bool)), ValueError, "attn_mask"),
    (lambda q, k, v: dict(attn_mask=torch.ones(3, 1, 2, 7, 13, dtype=torch.bool)), ValueError, "attn_mask"),
    (lambda q, k, v: dict(attn_mask=torch.ones(7, 13, dtype=torch.bool, device="meta")), ValueError,
     "attn_mask"),
    (lambda q, k, v: dict(attn_mask=torch.ones(7, 13, dtype=torch.bool), is_causal=True), ValueError,
     "attn_mask"),
    (lambda q, k, v: dict(impl="cuda"), ValueError, "impl"),
    (lambda q, k, v: dict(dropout_p=0.1, generator=7), TypeError, "generator"),
])
def test_rejects_bad_input(case, error, name):
    q, k, v = _good()
    kwargs = dict(query=q, key=k, value=v)
    kwargs.update(case(q, k, v))
    with pytest.raises(error, match=name):
        scaled_dot_product_attention(**kwargs)


def test_rejects_tensors_on_two_devices():
    q, k, v = _good()
    with pytest.raises(ValueError, match="key on meta"):
        scaled_dot_product_attention(q, k.to("meta"), v)


def test_float64_runs_the_reference_under_auto_and_is_refused_by_triton(device):
    q, k, v = _sdpa_inputs((1, 2, 7, 16), (1, 2, 13, 16), (1, 2, 13, 16), torch.float64, device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto = scaled_dot_product_attention(q, k, v, is_causal=True)
    eager = sdpa_module.sdpa_reference(q, k, v, is_causal=True)
    assert auto.dtype == torch.float64
    torch.testing.assert_close(auto, eager, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"scaled_dot_product_attention: impl='triton'.*float64"):
        scaled_dot_product_attention(q, k, v, impl="triton")


@pytest.mark.parametrize("with_mask", [False, True])
def test_meta_tensors_give_the_sdpa_shapes(with_mask):
    q, k, v = (torch.empty(shape, device="meta") for shape in ((2, 4, 7, 16), (2, 2, 13, 16), (2, 2, 13, 16)))
    mask = torch.ones(7, 13, dtype=torch.bool, device="meta") if with_mask else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AttentionFallbackWarning)
        out = scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert out.shape == (2, 4, 7, 16) and out.device.type == "meta"


def test_head_dims_the_kernels_cannot_take_warn_and_match_sdpa(fresh_warnings, device):
    if not _kernels_available(device):
        pytest.skip("the fallback warning is for inputs the kernels could otherwise take")
    q, k, v = _sdpa_inputs((1, 2, 7, 8), (1, 2, 13, 8), (1, 2, 13, 8), torch.float32, device)
    with pytest.warns(AttentionFallbackWarning, match="head_dim"):
        out = scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
