"""The attention layer, the KV cache and the GPT model (models/attention.py, models/gpt.py).

Oracles: ``F.scaled_dot_product_attention`` in float64 on the same weights (the layer and a functional GPT written
here), ``nn.MultiheadAttention`` for the drop-in conversion, and generation without a cache for generation with one.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

from genkernels.kernels import use_impl
from genkernels.models import attention as attention_module
from genkernels.models import gpt as gpt_module
from genkernels.models.attention import KVCache, MultiheadSelfAttention
from genkernels.models.gpt import GPT, GPTConfig
from reference_checks import assert_close_to_reference, random_tensor

IMPLS = ("triton", "eager")
TINY = dict(vocab_size=50, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)  # head_dim 16
# Half the heads (two query heads sharing one key/value head) for the tests that run many interpreted kernels.
NARROW = dict(n_head=2, n_kv_head=1, n_embd=32)


def tiny_gpt(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides}))


def token_ids(shape, seed: int, vocab: int = TINY["vocab_size"]) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------------------
# float64 oracles written with torch's own attention


def sdpa_self_attention(layer: MultiheadSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """The layer's math: fused projection, SDPA with grouped key/value heads, output projection."""
    batch, seq, embed = x.shape
    heads, kv_heads, dim = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q, k, v = F.linear(x, layer.qkv_proj.weight, layer.qkv_proj.bias).split(
        [heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k, v = (t.reshape(batch, seq, t.shape[-1] // dim, dim).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=layer.causal, enable_gqa=True)
    return F.linear(out.transpose(1, 2).reshape(batch, seq, embed), layer.out_proj.weight, layer.out_proj.bias)


def functional_gpt(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """GPT-2's forward written out with functional ops on ``model``'s weights (the head reuses ``wte``)."""
    t, eps = model.transformer, model.config.norm_eps
    approximate = {"gelu": "none", "gelu_tanh": "tanh"}[model.config.activation]
    x = t.wte.weight[idx] + t.wpe.weight[: idx.shape[1]]
    for block in t.h:
        x = x + sdpa_self_attention(block.attn, F.layer_norm(x, x.shape[-1:], block.ln_1.weight, block.ln_1.bias,
                                                             eps))
        hidden = F.layer_norm(x, x.shape[-1:], block.ln_2.weight, block.ln_2.bias, eps)
        hidden = F.gelu(F.linear(hidden, block.mlp.c_fc.weight, block.mlp.c_fc.bias), approximate=approximate)
        x = x + F.linear(hidden, block.mlp.c_proj.weight, block.mlp.c_proj.bias)
    return F.linear(F.layer_norm(x, x.shape[-1:], t.ln_f.weight, t.ln_f.bias, eps), t.wte.weight)


def grads_of(module: nn.Module, output: torch.Tensor, grad_output: torch.Tensor, *extra: torch.Tensor) -> dict:
    names, tensors = zip(*module.named_parameters())
    grads = torch.autograd.grad(output, list(tensors) + list(extra), grad_output)
    named = dict(zip(names, grads[: len(names)]))
    named.update({f"input{i}": g for i, g in enumerate(grads[len(names):])})
    return named


def assert_grads_close(kernel: dict, reference: dict, eager: dict, what: str) -> None:
    assert kernel.keys() == reference.keys()
    for name in reference:
        assert_close_to_reference(kernel[name], reference[name], eager[name], f"{what} grad {name}")


# --------------------------------------------------------------------------------------------------------------
# the layer


@pytest.mark.parametrize("causal, num_kv_heads, dtype", [
    (True, 4, torch.float32), (True, 2, torch.float32), (True, 1, torch.float32), (False, 2, torch.float32),
    (True, 2, torch.bfloat16),
], ids=["causal-mha", "causal-gqa", "causal-mqa", "full-gqa", "causal-gqa-bf16"])
def test_layer_matches_sdpa_reference_forward_and_grads(causal, num_kv_heads, dtype):
    torch.manual_seed(1)
    layer = MultiheadSelfAttention(64, 4, num_kv_heads, causal=causal).to(dtype)
    reference_layer = copy.deepcopy(layer).double()
    x = random_tensor((1, 17, 64), dtype, seed=2)
    grad_out = random_tensor((1, 17, 64), dtype, seed=3)

    x64 = x.double().requires_grad_()
    reference = sdpa_self_attention(reference_layer, x64)
    reference_grads = grads_of(reference_layer, reference, grad_out.double(), x64)
    results = {}
    for impl in IMPLS:
        xi = x.clone().requires_grad_()
        with use_impl(impl):
            out = layer(xi)
        results[impl] = out, grads_of(layer, out, grad_out, xi)
    assert_close_to_reference(results["triton"][0], reference, results["eager"][0], "layer output")
    assert_close_to_reference(results["eager"][0], reference, results["eager"][0], "eager layer output")
    assert_grads_close(results["triton"][1], reference_grads, results["eager"][1], "layer")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_layer_from_torch_multihead_attention_matches_it(causal):
    torch.manual_seed(4)
    torch_layer = nn.MultiheadAttention(48, 3, batch_first=True)  # head_dim 16
    layer = MultiheadSelfAttention.from_torch(torch_layer, causal=causal)
    x = random_tensor((3, 10, 48), torch.float32, seed=5)
    mask = nn.Transformer.generate_square_subsequent_mask(10) if causal else None
    expected, _ = torch_layer(x, x, x, attn_mask=mask, need_weights=False)
    for impl in IMPLS:
        with use_impl(impl):
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_layer_feeds_flash_attention_views_of_the_packed_projection(monkeypatch):
    seen = []
    real = attention_module.flash_attention

    def spy(q, k, v, **kwargs):
        seen.append((q, k, v, kwargs))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(attention_module, "flash_attention", spy)
    layer = MultiheadSelfAttention(64, 4, 2, causal=True)
    packed = []
    layer.qkv_proj.register_forward_hook(lambda module, args, out: packed.append(out))
    with use_impl("eager"):
        layer(random_tensor((2, 5, 64), torch.float32, seed=6))
    (q, k, v, kwargs), = seen
    assert kwargs == {"causal": True}
    assert [tuple(t.shape) for t in (q, k, v)] == [(2, 4, 5, 16), (2, 2, 5, 16), (2, 2, 5, 16)]
    storage = packed[0].untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == storage for t in (q, k, v))
    assert not q.is_contiguous()


def test_layer_handles_an_empty_batch_and_a_single_token():
    layer = MultiheadSelfAttention(64, 4, 2, causal=True)
    for shape in ((0, 7, 64), (3, 1, 64)):
        x = random_tensor(shape, torch.float32, seed=7)
        with use_impl("triton"):
            out = layer(x)
        torch.testing.assert_close(out, sdpa_self_attention(layer, x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# the whole model: triton vs eager vs the float64 functional oracle


def test_functional_oracle_matches_the_model_under_eager():
    model = tiny_gpt()
    idx = token_ids((2, 9), seed=8)
    with use_impl("eager"):
        logits, loss = model(idx, idx, return_logits=True)
    expected = functional_gpt(model, idx)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, F.cross_entropy(expected.flatten(0, 1), idx.flatten()))


def test_gpt_triton_matches_eager_and_float64_reference_logits_loss_and_grads():
    model = tiny_gpt(seed=9)
    reference_model = copy.deepcopy(model).double()
    idx, targets = token_ids((2, 17), seed=10), token_ids((2, 17), seed=11)
    targets[0, :3] = -1  # ignored positions

    reference_logits = functional_gpt(reference_model, idx)
    reference_loss = F.cross_entropy(reference_logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
    reference_grads = grads_of(reference_model, reference_loss, torch.tensor(1.0, dtype=torch.float64))
    results = {}
    for impl in IMPLS:
        with use_impl(impl):
            logits, loss = model(idx, targets, return_logits=True)
        results[impl] = logits, loss, grads_of(model, loss, torch.tensor(1.0))
    (logits, loss, grads), (eager_logits, eager_loss, eager_grads) = results["triton"], results["eager"]
    assert_close_to_reference(logits, reference_logits, eager_logits, "logits")
    assert_close_to_reference(loss, reference_loss, eager_loss, "loss")
    assert_grads_close(grads, reference_grads, eager_grads, "gpt")
    assert "lm_head.weight" not in grads  # tied to transformer.wte.weight, one parameter


def test_output_head_is_tied_to_the_token_embedding():
    model = tiny_gpt()
    assert model.lm_head.weight is model.transformer.wte.weight
    restored = tiny_gpt(seed=1)
    restored.load_state_dict(model.state_dict())
    assert restored.lm_head.weight is restored.transformer.wte.weight
    assert torch.equal(restored.lm_head.weight, model.transformer.wte.weight)


def test_gpt_under_bf16_autocast_follows_the_float64_reference():
    model = tiny_gpt(seed=12)
    idx = token_ids((2, 11), seed=13)
    reference = functional_gpt(copy.deepcopy(model).double(), idx)
    outputs = {}
    for impl in IMPLS:
        with use_impl(impl), torch.autocast("cpu", dtype=torch.bfloat16):
            outputs[impl] = model(idx)[0]
    assert outputs["triton"].dtype == torch.bfloat16
    assert_close_to_reference(outputs["triton"], reference, outputs["eager"], "bf16 autocast logits")


def test_gpt_forward_on_an_empty_batch():
    model = tiny_gpt()
    with use_impl("triton"):
        logits, loss = model(token_ids((0, 6), seed=0), token_ids((0, 6), seed=0), return_logits=True)
    assert logits.shape == (0, 6, TINY["vocab_size"])
    assert loss is not None and torch.isnan(loss)  # the mean over no target, as F.cross_entropy gives


# --------------------------------------------------------------------------------------------------------------
# generation and the KV cache


SAMPLING = {"greedy": dict(temperature=0.0), "top_k_1": dict(top_k=1), "top_k_10": dict(temperature=0.8, top_k=10),
            "full_vocab": dict(temperature=1.3)}


@pytest.mark.parametrize("impl, sampling", [("triton", "greedy"), ("triton", "top_k_10")] + [
    ("eager", name) for name in SAMPLING])
def test_cached_generation_gives_the_tokens_of_uncached_generation(impl, sampling):
    model = tiny_gpt(seed=14, **NARROW)
    prompt = token_ids((2, 5), seed=15)
    outputs = {}
    with use_impl(impl):
        for use_cache in (True, False):
            generator = torch.Generator().manual_seed(16)
            outputs[use_cache] = model.generate(prompt, 6, use_cache=use_cache, generator=generator,
                                                **SAMPLING[sampling])
    assert outputs[True].shape == (2, 11)
    assert torch.equal(outputs[True][:, :5], prompt)
    assert torch.equal(outputs[True], outputs[False])


def test_greedy_generation_is_the_argmax_of_the_reference_logits():
    model = tiny_gpt(seed=17)
    tokens = token_ids((2, 4), seed=18)
    with use_impl("eager"):
        generated = model.generate(tokens, 6, temperature=0.0)
    for _ in range(6):
        logits = functional_gpt(model, tokens)[:, -1]
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, tokens)


def test_sampled_generation_depends_on_the_generator_only():
    model = tiny_gpt(seed=19)
    prompt = token_ids((2, 3), seed=20)
    with use_impl("eager"):
        first = model.generate(prompt, 8, generator=torch.Generator().manual_seed(1))
        again = model.generate(prompt, 8, generator=torch.Generator().manual_seed(1))
        other = model.generate(prompt, 8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_top_k_restricts_samples_to_the_k_most_likely_tokens():
    model = tiny_gpt(seed=21)
    prompt = token_ids((64, 2), seed=22)
    with use_impl("eager"):
        generated = model.generate(prompt, 1, top_k=3, generator=torch.Generator().manual_seed(0))
        allowed = model(prompt)[0][:, -1].topk(3, dim=-1).indices
    assert (allowed == generated[:, -1:]).any(dim=1).all()


def test_cached_generation_prefills_once_then_decodes_one_token_per_step(monkeypatch):
    calls = []
    for name in ("flash_attention", "decode_attention"):
        real = getattr(attention_module, name)
        monkeypatch.setattr(attention_module, name,
                            lambda *args, _real=real, _name=name, **kw: calls.append(_name) or _real(*args, **kw))
    model = tiny_gpt()
    with use_impl("eager"):
        model.generate(token_ids((2, 4), seed=0), 5, temperature=0.0)
    layers = TINY["n_layer"]
    assert calls == ["flash_attention"] * layers + ["decode_attention"] * layers * 4


def test_chunked_forward_through_the_cache_matches_one_full_forward():
    model = tiny_gpt(seed=23, **NARROW)
    idx = token_ids((2, 12), seed=24)
    with use_impl("triton"):
        expected = model(idx)[0]
        cache = model.new_kv_cache(2)
        chunks = [model(part, kv_cache=cache)[0] for part in idx.split([5, 4, 1, 2], dim=1)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), expected, rtol=1e-5, atol=1e-5)
    assert cache.seq_len == 12 and cache.cache_seqlens.tolist() == [12, 12]


def test_kv_cache_bookkeeping():
    cache = KVCache(2, 3, 2, 6, 16)
    assert cache.keys[0].shape == (3, 2, 6, 16) and len(cache.values) == 2
    assert cache.cache_seqlens.dtype == torch.int32 and cache.cache_seqlens.tolist() == [0, 0, 0]
    key, value = random_tensor((3, 2, 4, 16), torch.float32, 0), random_tensor((3, 2, 4, 16), torch.float32, 1)
    cache.advance(4)
    k_all, v_all = cache.store(1, key, value)
    assert k_all is cache.keys[1] and torch.equal(k_all[:, :, :4], key) and torch.equal(v_all[:, :, :4], value)
    assert not cache.keys[0].any()  # the other layer is untouched
    step = random_tensor((3, 2, 1, 16), torch.float32, 2)
    cache.advance(1)
    cache.store(1, step, step)
    assert torch.equal(cache.keys[1][:, :, 4:5], step) and torch.equal(cache.keys[1][:, :, :4], key)
    assert not cache.keys[1][:, :, 5:].any()
    assert cache.seq_len == 5 and cache.cache_seqlens.tolist() == [5, 5, 5]
    with pytest.raises(ValueError, match="max_seq_len=6"):
        cache.advance(2)
    cache.reset()
    assert cache.seq_len == 0 and cache.cache_seqlens.tolist() == [0, 0, 0]


def test_generation_without_new_tokens_or_with_an_empty_batch():
    model = tiny_gpt()
    prompt = token_ids((2, 4), seed=0)
    assert torch.equal(model.generate(prompt, 0), prompt)
    with use_impl("triton"):
        assert model.generate(prompt[:0], 3, temperature=0.0).shape == (0, 7)


# --------------------------------------------------------------------------------------------------------------
# training


def test_short_training_run_converges_identically_under_both_impls():
    data = torch.arange(8).repeat(1, 3)[:, :17]  # a repeating sequence the model can learn
    inputs, targets = data[:, :-1], data[:, 1:]
    curves = {}
    for impl in IMPLS:
        model = tiny_gpt(seed=25, n_layer=1, **NARROW)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
        curve = []
        with use_impl(impl):
            for _ in range(24):
                _, loss = model(inputs, targets)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                curve.append(loss.item())
        curves[impl] = torch.tensor(curve)
    assert curves["triton"][-1] < 0.2 * curves["triton"][0]
    assert math.isclose(curves["triton"][0], math.log(TINY["vocab_size"]), rel_tol=0.05)
    torch.testing.assert_close(curves["triton"], curves["eager"], rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("overrides, error, argument", [
    (dict(n_embd=60, n_head=8), ValueError, "n_embd=60"),
    (dict(n_kv_head=3), ValueError, "n_kv_head=3"),
    (dict(n_embd=32, n_head=4), ValueError, "head_dim=8"),
    (dict(n_kv_head=0), ValueError, "n_kv_head=0"),
    (dict(vocab_size=0), ValueError, "vocab_size=0"),
    (dict(block_size=2.5), TypeError, "block_size"),
    (dict(bias=1), TypeError, "bias"),
    (dict(vocab_size=-3), ValueError, "vocab_size=-3"),
    (dict(vocab_size="50"), TypeError, "vocab_size"),
    (dict(block_size=0), ValueError, "block_size=0"),
    (dict(n_layer=0), ValueError, "n_layer=0"),
    (dict(n_layer=True), TypeError, "n_layer"),
    (dict(n_head=0), ValueError, "n_head=0"),
    (dict(n_head=2.0), TypeError, "n_head"),
    (dict(n_kv_head=-2), ValueError, "n_kv_head=-2"),
    (dict(n_embd=0), ValueError, "n_embd=0"),
    (dict(n_embd=64.0), TypeError, "n_embd"),
    (dict(activation="relu"), ValueError, "activation"),
    (dict(activation="gelu_new"), ValueError, "activation"),
    (dict(norm_eps=0.0), ValueError, "norm_eps"),
    (dict(norm_eps=float("nan")), ValueError, "norm_eps"),
    (dict(norm_eps="1e-5"), TypeError, "norm_eps"),
])
def test_config_rejects_bad_sizes(overrides, error, argument):
    with pytest.raises(error, match=argument):
        GPTConfig(**{**TINY, **overrides})


@pytest.mark.parametrize("idx, error, argument", [
    (torch.zeros(2, 5), TypeError, "idx must have an integer dtype"),
    (torch.tensor([[1, 50]]), ValueError, r"idx \(token ids\) must lie in \[0, 50\); got a value 50"),
    (torch.tensor([[-1, 3]]), ValueError, r"idx \(token ids\) must lie in \[0, 50\); got a value -1"),
    (torch.tensor([[1, 250]], dtype=torch.uint8), ValueError, "idx .* got a value 250"),
    (torch.zeros(5, dtype=torch.long), ValueError, r"idx must be \[batch, seq\]"),
    (torch.zeros(2, 0, dtype=torch.long), ValueError, r"idx must be \[batch, seq\]"),
    (torch.zeros(1, 33, dtype=torch.long), ValueError, "block_size=32"),
    ([[1, 2]], TypeError, "idx must be a torch.Tensor"),
])
def test_forward_rejects_bad_idx(idx, error, argument):
    with pytest.raises(error, match=argument):
        tiny_gpt()(idx)


@pytest.mark.parametrize("targets, error, message", [
    (torch.zeros(2, 4, dtype=torch.long), ValueError, "targets must have idx's shape"),
    (torch.zeros(2, 5), TypeError, "targets must have an integer dtype"),
    (torch.full((2, 5), 50), ValueError, r"targets .* must lie in \[-1, 50\); got a value 50"),
    (torch.full((2, 5), -2), ValueError, r"targets .* must lie in \[-1, 50\); got a value -2"),
])
def test_forward_rejects_bad_targets(targets, error, message):
    with pytest.raises(error, match=message):
        tiny_gpt()(torch.zeros(2, 5, dtype=torch.long), targets)


def test_token_ids_of_any_integer_dtype_give_the_int64_results():
    """uint8/int16/int32 ids (checked against the vocabulary after widening: a uint8 comparison with 50 would
    wrap) give the logits and loss of int64 ids; -1 targets are ignored."""
    model = tiny_gpt()
    idx, targets = token_ids((2, 6), seed=1), token_ids((2, 6), seed=2)
    targets[1, :2] = -1
    with use_impl("eager"):
        expected = model(idx, targets, return_logits=True)
        for dtype in (torch.uint8, torch.int16, torch.int32):
            logits, loss = model(idx.to(dtype), targets.to(torch.int16 if dtype == torch.uint8 else dtype),
                                 return_logits=True)
            torch.testing.assert_close(logits, expected[0], rtol=0, atol=0)
            torch.testing.assert_close(loss, expected[1], rtol=0, atol=0)
        generated = model.generate(idx.to(torch.uint8), 2, temperature=0.0)
    assert generated.dtype == torch.uint8
    with pytest.raises(TypeError, match="idx is torch.uint8, which cannot hold"):
        tiny_gpt(vocab_size=300).generate(idx.to(torch.uint8), 2)


@pytest.mark.parametrize("temperature", [1e-45, 5e-324, 1e-300, 1e-30])
def test_a_tiny_temperature_samples_the_greedy_tokens(temperature):
    """logits / 1e-45 used to overflow to +-inf, softmax gave NaN and torch.multinomial raised; the shifted,
    fp32-safe softmax gives probability 1 to the largest logit (no ties here), as greedy decoding."""
    model = tiny_gpt(seed=3)
    prompt = token_ids((3, 4), seed=4)
    with use_impl("eager"):
        greedy = model.generate(prompt, 5, temperature=0.0)
        sampled = model.generate(prompt, 5, temperature=temperature, generator=torch.Generator().manual_seed(0))
        with_top_k = model.generate(prompt, 5, temperature=temperature, top_k=5,
                                    generator=torch.Generator().manual_seed(1))
    assert torch.equal(sampled, greedy) and torch.equal(with_top_k, greedy)


def test_sampling_probabilities_are_the_softmax_of_the_scaled_logits():
    """The shifted form draws from softmax(logits / temperature): a two-token case sampled many times."""
    from genkernels.models.gpt import _pick_token

    logits = torch.tensor([[0.0, math.log(3.0)]]).expand(4000, 2)
    draws = _pick_token(logits * 0.5, False, 0.5, None, torch.Generator().manual_seed(0))
    assert abs(draws.float().mean().item() - 0.75) < 0.03


@pytest.mark.parametrize("kwargs, error, argument", [
    (dict(max_new_tokens=-1), ValueError, "max_new_tokens=-1"),
    (dict(max_new_tokens=2.0), TypeError, "max_new_tokens"),
    (dict(max_new_tokens=30), ValueError, "block_size=32"),
    (dict(temperature=-0.5), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature=nan"),
    (dict(temperature=float("inf")), ValueError, "temperature=inf"),
    (dict(temperature="0.5"), TypeError, "temperature"),
    (dict(top_k=0), ValueError, "top_k=0"),
    (dict(use_cache=1), TypeError, "use_cache"),
    (dict(generator=0), TypeError, "generator"),
])
def test_generate_rejects_bad_arguments(kwargs, error, argument):
    kwargs = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(error, match=argument):
        tiny_gpt().generate(torch.zeros(2, 4, dtype=torch.long), **kwargs)


def test_generate_rejects_a_prompt_with_out_of_range_token_ids():
    with pytest.raises(ValueError, match=r"idx \(token ids\) must lie in \[0, 50\)"):
        tiny_gpt().generate(torch.tensor([[3, 50]]), 2)


def test_generate_accepts_the_longest_sequence_that_fits_the_block():
    model = tiny_gpt()
    with use_impl("eager"):
        assert model.generate(torch.zeros(1, 4, dtype=torch.long), 29, temperature=0.0).shape == (1, 33)


def test_forward_rejects_a_kv_cache_of_another_batch_or_past_the_block():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="kv_cache holds 3 sequences"):
        model(torch.zeros(2, 4, dtype=torch.long), kv_cache=model.new_kv_cache(3))
    cache = model.new_kv_cache(1)
    with use_impl("eager"):
        model(torch.zeros(1, 30, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="after 30 cached tokens"):
        model(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="max_seq_len=40"):
        model.new_kv_cache(1, 40)


def test_forward_rejects_a_kv_cache_of_another_type_or_dtype():
    model = tiny_gpt()
    idx = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(TypeError, match="kv_cache must be a KVCache"):
        model(idx, kv_cache={})
    with pytest.raises(TypeError, match="kv_cache holds torch.bfloat16"):
        model(idx, kv_cache=model.new_kv_cache(1, dtype=torch.bfloat16))
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="kv_cache holds torch.float32"):
        model(idx, kv_cache=KVCache(2, 1, 2, 32, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.new_kv_cache(1).dtype == torch.bfloat16


@pytest.mark.parametrize("args, kwargs, error, argument", [
    ((64, 5), {}, ValueError, "embed_dim=64"),
    ((64, 4, 3), {}, ValueError, "num_kv_heads=3"),
    ((2048, 4), {}, ValueError, "head_dim=512"),
    ((64, 4), dict(causal=1), TypeError, "causal"),
    ((0, 4), {}, ValueError, "embed_dim=0"),
    ((64, 0), {}, ValueError, "num_heads=0"),
    ((64, -4), {}, ValueError, "num_heads=-4"),
    ((64.0, 4), {}, TypeError, "embed_dim"),
    ((64, 4, 0), {}, ValueError, "num_kv_heads=0"),
    ((64, 4), dict(bias=None), TypeError, "bias"),
    ((64, 4), dict(dtype=torch.int64), TypeError, "dtype"),
])
def test_layer_rejects_bad_head_layouts(args, kwargs, error, argument):
    with pytest.raises(error, match=argument):
        MultiheadSelfAttention(*args, **kwargs)


def test_layer_rejects_bad_input():
    layer = MultiheadSelfAttention(64, 4, 2, causal=True)
    with pytest.raises(ValueError, match=r"x must be \[batch, seq, embed_dim=64\]"):
        layer(torch.zeros(2, 5, 32))
    with pytest.raises(TypeError, match="x must have a floating-point dtype"):
        layer(torch.zeros(2, 5, 64, dtype=torch.long))
    with pytest.raises(TypeError, match="kv_cache must be a KVCache"):
        layer(torch.zeros(2, 5, 64), kv_cache=object())
    with pytest.raises(ValueError, match="kv_cache holds 4 key/value heads"):
        layer(torch.zeros(2, 5, 64), kv_cache=KVCache(1, 2, 4, 8, 16))
    with pytest.raises(ValueError, match="kv_cache needs a causal layer"):
        MultiheadSelfAttention(64, 4)(torch.zeros(2, 5, 64), kv_cache=KVCache(1, 2, 4, 8, 16))


def test_from_torch_rejects_layers_it_cannot_express():
    with pytest.raises(ValueError, match="kdim/vdim"):
        MultiheadSelfAttention.from_torch(nn.MultiheadAttention(32, 2, kdim=16, vdim=16))
    with pytest.raises(ValueError, match="dropout=0.1"):
        MultiheadSelfAttention.from_torch(nn.MultiheadAttention(32, 2, dropout=0.1))
    with pytest.raises(TypeError, match="module must be an nn.MultiheadAttention"):
        MultiheadSelfAttention.from_torch(nn.Linear(2, 2))


def test_kv_cache_rejects_bad_writes():
    cache = KVCache(2, 3, 2, 6, 16)
    good = torch.zeros(3, 2, 1, 16)
    with pytest.raises(ValueError, match="positions claimed with advance"):
        cache.store(0, good, good)  # nothing claimed yet
    cache.advance(1)
    with pytest.raises(ValueError, match="layer_idx=2"):
        cache.store(2, good, good)
    with pytest.raises(ValueError, match=r"key must be \[batch=3, heads_kv=2"):
        cache.store(0, torch.zeros(3, 4, 1, 16), good)
    with pytest.raises(TypeError, match="value must have a floating-point dtype"):
        cache.store(0, good, good.half())
    with pytest.raises(ValueError, match="num_tokens=0"):
        cache.advance(0)
    with pytest.raises(ValueError, match="batch_size=-1"):
        KVCache(1, -1, 2, 6, 16)
    with pytest.raises(TypeError, match="dtype"):
        KVCache(1, 1, 2, 6, 16, dtype=torch.long)


@pytest.mark.parametrize("args, error, argument", [
    ((0, 1, 2, 6, 16), ValueError, "num_layers=0"),
    ((1, 1.0, 2, 6, 16), TypeError, "batch_size"),
    ((1, 1, 0, 6, 16), ValueError, "num_kv_heads=0"),
    ((1, 1, 2, -6, 16), ValueError, "max_seq_len=-6"),
    ((1, 1, 2, 6, 0), ValueError, "head_dim=0"),
    ((1, 1, 2, 6, "16"), TypeError, "head_dim"),
])
def test_kv_cache_rejects_bad_sizes(args, error, argument):
    with pytest.raises(error, match=argument):
        KVCache(*args)


# --------------------------------------------------------------------------------------------------------------
# the MLP activation and the transformers GPT-2 converters

# GPT-2 at a tiny size (head_dim 16: the attention kernels take head dims in [16, 256]); no dropout, so the
# transformers model computes the same function in training mode too.
HF_TINY = dict(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
               attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)


def tiny_hf_gpt2(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    """A tiny transformers GPT-2 with weights drawn wider than its init (so that every layer matters and greedy
    generation does not get stuck on one token)."""
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**{**HF_TINY, **overrides}))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
    return model


def hf_logits_loss_grads(model: GPT2LMHeadModel, idx: torch.Tensor):
    """transformers' logits, loss (its labels are shifted inside) and parameter gradients (by state_dict name)."""
    out = model(idx, labels=idx)
    names, parameters = zip(*model.named_parameters())
    return out.logits, out.loss, dict(zip(names, torch.autograd.grad(out.loss, parameters)))


def gpt_logits_loss_grads(model: GPT, idx: torch.Tensor):
    """Our logits, loss and gradients for transformers' next-token objective (the last position has no target)."""
    targets = torch.cat([idx[:, 1:], torch.full_like(idx[:, :1], -1)], dim=1)
    logits, loss = model(idx, targets, return_logits=True)
    names, parameters = zip(*model.named_parameters())
    return logits, loss, dict(zip(names, torch.autograd.grad(loss, parameters)))


def as_gpt_grads(hf_grads: dict, config) -> dict:
    """transformers' gradients under our parameter names: the converter applied to a state_dict of gradients."""
    return dict(GPT.from_hf(hf_grads, config=config).named_parameters())


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_activation_option_is_the_exact_or_tanh_gelu_fused_with_the_bias(activation, monkeypatch):
    model = tiny_gpt(seed=30, activation=activation, norm_eps=1e-3)
    calls = []
    real = gpt_module.bias_act
    monkeypatch.setattr(gpt_module, "bias_act", lambda *a, **k: calls.append(k["act"]) or real(*a, **k))
    idx = token_ids((2, 7), seed=31)
    with use_impl("eager"):
        logits = model(idx)[0]
    assert calls == [activation] * TINY["n_layer"]
    torch.testing.assert_close(logits.double(), functional_gpt(copy.deepcopy(model).double(), idx), rtol=1e-5,
                               atol=1e-5)
    mlp = copy.deepcopy(model.transformer.h[0].mlp)
    with torch.no_grad():  # wider weights than the init's, to tell the two GELUs apart
        for parameter in mlp.parameters():
            parameter.normal_(0.0, 0.3)
    x = random_tensor((2, 5, TINY["n_embd"]), torch.float32, seed=32)
    hidden = F.linear(x.double(), mlp.c_fc.weight.double(), mlp.c_fc.bias.double())
    results = {}
    for approximate in ("none", "tanh"):
        results[approximate] = F.linear(F.gelu(hidden, approximate=approximate), mlp.c_proj.weight.double(),
                                        mlp.c_proj.bias.double())
    assert (results["none"] - results["tanh"]).abs().max() > 1e-3
    reference = results["none" if activation == "gelu" else "tanh"]
    for impl in IMPLS:
        with use_impl(impl):
            torch.testing.assert_close(mlp(x).double(), reference, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("activation_function", ["gelu_new", "gelu", "gelu_pytorch_tanh"])
def test_from_hf_matches_transformers_logits_loss_and_grads(activation_function):
    hf = tiny_hf_gpt2(seed=32, activation_function=activation_function, layer_norm_epsilon=1e-4)
    model = GPT.from_hf(hf)
    assert model.config.activation == ("gelu" if activation_function == "gelu" else "gelu_tanh")
    assert model.config.norm_eps == 1e-4 and model.config.block_size == 32
    idx = token_ids((2, 13), seed=33, vocab=64)
    reference = hf_logits_loss_grads(copy.deepcopy(hf).double(), idx)
    baseline = hf_logits_loss_grads(hf, idx)
    with use_impl("eager"):
        ours = gpt_logits_loss_grads(model, idx)
    for what, i in (("logits", 0), ("loss", 1)):
        assert_close_to_reference(ours[i], reference[i], baseline[i], what)
    reference_grads, baseline_grads = (as_gpt_grads(grads, hf.config) for grads in (reference[2], baseline[2]))
    assert ours[2].keys() == reference_grads.keys()
    for name, grad in ours[2].items():
        assert_close_to_reference(grad, reference_grads[name], baseline_grads[name], f"grad {name}")


def test_triton_impl_of_a_converted_gpt_matches_transformers():
    hf = tiny_hf_gpt2(seed=34, n_layer=1)
    model = GPT.from_hf(hf)
    idx = token_ids((1, 9), seed=35, vocab=64)
    reference = hf_logits_loss_grads(copy.deepcopy(hf).double(), idx)
    baseline = hf_logits_loss_grads(hf, idx)
    with use_impl("triton"):
        ours = gpt_logits_loss_grads(model, idx)
    assert_close_to_reference(ours[0], reference[0], baseline[0], "logits")
    assert_close_to_reference(ours[1], reference[1], baseline[1], "loss")
    reference_grads, baseline_grads = (as_gpt_grads(grads, hf.config) for grads in (reference[2], baseline[2]))
    for name, grad in ours[2].items():
        assert_close_to_reference(grad, reference_grads[name], baseline_grads[name], f"grad {name}")


@pytest.mark.parametrize("impl", IMPLS)
def test_greedy_cached_generation_gives_the_tokens_of_transformers(impl):
    hf = tiny_hf_gpt2(seed=36).eval()
    model = GPT.from_hf(hf)
    prompt = token_ids((2, 5), seed=37, vocab=64)
    expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                           pad_token_id=0)
    with use_impl(impl):
        tokens = model.generate(prompt, 8, temperature=0.0)
    assert torch.equal(tokens, expected)
    assert len(set(tokens[:, 5:].flatten().tolist())) > 2  # not one repeated token


def test_from_hf_reads_a_gpt2_model_or_a_state_dict_with_its_config():
    hf = tiny_hf_gpt2(seed=38).train()
    reference = GPT.from_hf(hf)
    assert reference.training and reference.lm_head.weight is reference.transformer.wte.weight
    bare = GPT2Model(hf.config)
    bare.load_state_dict(hf.transformer.state_dict())
    config_as_dict = {key: getattr(hf.config, key) for key in ("vocab_size", "n_positions", "n_embd", "n_layer",
                                                               "n_head", "activation_function")}
    for model in (GPT.from_hf(bare), GPT.from_hf(hf.state_dict(), config=hf.config),
                  GPT.from_hf(bare.state_dict(), config=config_as_dict),
                  GPT.from_hf(hf.state_dict(), config=reference.config)):
        assert model.config == reference.config
        assert model.lm_head.weight is model.transformer.wte.weight
        for (name, tensor), expected in zip(model.state_dict().items(), reference.state_dict().values()):
            assert torch.equal(tensor, expected), name
    # copies, not views of the transformers model's weights
    assert reference.transformer.wte.weight.data_ptr() != hf.transformer.wte.weight.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt_to_hf_to_gpt_round_trips_bit_exactly(dtype):
    model = tiny_gpt(seed=39, n_kv_head=None, activation="gelu_tanh", norm_eps=1e-6).to(dtype)
    with torch.no_grad():  # non-trivial LayerNorm affines
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    hf = model.to_hf()
    assert isinstance(hf, GPT2LMHeadModel) and hf.lm_head.weight is hf.transformer.wte.weight
    assert hf.config.activation_function == "gelu_new" and hf.config.layer_norm_epsilon == 1e-6
    assert hf.transformer.wte.weight.dtype == dtype
    for back in (GPT.from_hf(hf), GPT.from_hf(model.to_hf_state_dict(), config=model.hf_config_dict())):
        assert back.config == model.config
        ours, theirs = model.state_dict(), back.state_dict()
        assert ours.keys() == theirs.keys()
        for name in ours:
            assert theirs[name].dtype == dtype and torch.equal(theirs[name], ours[name]), name
    hf_state = hf.state_dict()
    again = GPT.from_hf(hf).to_hf_state_dict()
    assert hf_state.keys() == again.keys()
    assert all(torch.equal(hf_state[name], again[name]) for name in hf_state)


def test_gpt_to_hf_matches_our_logits():
    model = tiny_gpt(seed=40, n_kv_head=None)
    idx = token_ids((2, 11), seed=41)
    with use_impl("eager"):
        expected = model(idx)[0]
    hf = model.to_hf()
    assert hf.config.activation_function == "gelu"
    reference = functional_gpt(copy.deepcopy(model).double(), idx)
    assert_close_to_reference(hf(idx).logits, reference, expected, "transformers logits")


@pytest.mark.parametrize("key, value", [
    ("scale_attn_by_inverse_layer_idx", True),
    ("reorder_and_upcast_attn", True),
    ("add_cross_attention", True),
    ("scale_attn_weights", False),
    ("tie_word_embeddings", False),
    ("activation_function", "relu"),
    ("activation_function", "quick_gelu"),
    ("n_inner", 100),
    ("model_type", "gpt_neo"),
])
def test_from_hf_rejects_configs_gpt_cannot_express(key, value):
    config = {**HF_TINY, key: value}
    with pytest.raises(ValueError, match=key):
        GPT.from_hf(tiny_hf_gpt2().state_dict(), config=config)


@pytest.mark.parametrize("key, value", [("add_cross_attention", True), ("scale_attn_by_inverse_layer_idx", True),
                                        ("activation_function", "silu")])
def test_from_hf_rejects_a_transformers_model_it_cannot_express(key, value):
    with pytest.raises(ValueError, match=key):
        GPT.from_hf(tiny_hf_gpt2(**{key: value}))


@pytest.mark.parametrize("make, error, argument", [
    (lambda: GPT.from_hf(nn.Linear(2, 2)), TypeError, "Linear"),
    (lambda: GPT.from_hf("gpt2"), TypeError, "str"),
    (lambda: GPT.from_hf(tiny_hf_gpt2().state_dict()), ValueError, "config is required"),
    (lambda: GPT.from_hf(tiny_hf_gpt2(), config=HF_TINY), ValueError, "config must be None"),
    (lambda: GPT.from_hf({}, config=[1]), TypeError, "config"),
    (lambda: GPT.from_hf({}, config={**HF_TINY, "n_head": 4}), ValueError, "n_embd=32"),  # head_dim 8
    (lambda: GPT.from_hf({}, config={**HF_TINY, "n_positions": 0}), ValueError, "n_positions"),
    (lambda: GPT.from_hf({}, config=GPTConfig(**TINY)), ValueError, "n_kv_head=2"),
    (lambda: GPT.from_hf({}, config=GPTConfig(**{**TINY, "n_kv_head": None, "bias": False})), ValueError,
     "bias=False"),
    (lambda: GPT.from_hf(tiny_hf_gpt2().state_dict(), config={**HF_TINY, "n_layer": 3}), ValueError, "h.2"),
    (lambda: GPT.from_hf(tiny_hf_gpt2().state_dict(), config={**HF_TINY, "n_layer": 1}), ValueError, "h.1"),
    (lambda: GPT.from_hf(tiny_hf_gpt2().state_dict(), config={**HF_TINY, "n_embd": 48, "n_head": 3}), ValueError,
     "does not match its config"),
])
def test_from_hf_rejects_bad_arguments(make, error, argument):
    with pytest.raises(error, match=argument):
        make()


def test_from_hf_rejects_an_output_head_that_is_not_the_token_embedding():
    state = dict(tiny_hf_gpt2().state_dict())
    state["lm_head.weight"] = state["lm_head.weight"] + 1
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        GPT.from_hf(state, config=HF_TINY)


@pytest.mark.parametrize("overrides, argument", [(dict(n_kv_head=2), "n_kv_head=2"),
                                                (dict(n_kv_head=None, bias=False), "bias=False")])
def test_to_hf_rejects_models_gpt2_cannot_express(overrides, argument):
    model = tiny_gpt(**overrides)
    for convert in (model.to_hf, model.to_hf_state_dict, model.hf_config_dict):
        with pytest.raises(ValueError, match=argument):
            convert()

# --------------------------------------------------------------------------------------------------------------
# GPU sizes


@pytest.mark.gpu
def test_gpt_on_the_gpu_under_bf16_autocast_follows_the_float64_reference():
    model = tiny_gpt(seed=26, vocab_size=1000, block_size=512, n_layer=4, n_head=8, n_kv_head=2, n_embd=512).cuda()
    idx = token_ids((4, 333), seed=27, vocab=1000).cuda()
    reference_model = copy.deepcopy(model).double()
    reference_logits = functional_gpt(reference_model, idx)
    reference_loss = F.cross_entropy(reference_logits.flatten(0, 1), idx.flatten())
    reference_grads = grads_of(reference_model, reference_loss, torch.tensor(1.0, dtype=torch.float64, device="cuda"))
    results = {}
    for impl in IMPLS:
        with use_impl(impl), torch.autocast("cuda", dtype=torch.bfloat16):
            logits, loss = model(idx, idx)
        results[impl] = logits, loss, grads_of(model, loss, torch.ones((), device="cuda"))
    (logits, loss, grads), (eager_logits, eager_loss, eager_grads) = results["triton"], results["eager"]
    assert_close_to_reference(logits, reference_logits, eager_logits, "logits")
    assert_close_to_reference(loss, reference_loss, eager_loss, "loss")
    assert_grads_close(grads, reference_grads, eager_grads, "gpt")


@pytest.mark.gpu
def test_cached_generation_on_the_gpu_gives_the_tokens_of_uncached_generation():
    model = tiny_gpt(seed=28, vocab_size=1000, block_size=512, n_layer=4, n_head=8, n_kv_head=2, n_embd=512).cuda()
    prompt = token_ids((3, 100), seed=29, vocab=1000).cuda()
    with use_impl("triton"):
        cached = model.generate(prompt, 64, temperature=0.0)
        uncached = model.generate(prompt, 64, temperature=0.0, use_cache=False)
    assert torch.equal(cached, uncached)


# ---------------------------------------------------------------------------------------------------------------
# Ragged batched generation
# ---------------------------------------------------------------------------------------------------------------
def _ragged_prompts(lengths=(5, 1, 9), seed=40):
    return [token_ids((1, n), seed=seed + i)[0] for i, n in enumerate(lengths)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("use_cache", [True, False])
def test_ragged_greedy_generation_equals_each_prompt_alone(impl, use_cache):
    """Prompts of 5, 1 and 9 tokens with their own budgets: each output equals that prompt generated alone."""
    model = tiny_gpt(seed=41, **NARROW)
    prompts, budgets = _ragged_prompts(), [6, 3, 7]
    with use_impl(impl):
        batch = model.generate(prompts, budgets, temperature=0, use_cache=use_cache)
        alone = [model.generate(p[None], n, temperature=0, use_cache=use_cache)[0] for p, n in zip(prompts, budgets)]
    assert isinstance(batch, list) and [len(x) for x in batch] == [11, 4, 16]
    for got, want in zip(batch, alone):
        assert torch.equal(got, want)


def test_ragged_cached_decoding_appends_inside_decode_attention(monkeypatch):
    """After a right-padded prefill the cache holds each prompt's own length; every decode step is one
    decode_attention call per layer that appends the step's key/value (no KVCache.store)."""
    model = tiny_gpt(seed=42, **NARROW)
    calls = []
    original = attention_module.decode_attention

    def spy(q, k_cache, v_cache, seqlens, **kwargs):
        calls.append((seqlens.tolist(), kwargs.get("k") is not None))
        return original(q, k_cache, v_cache, seqlens, **kwargs)
    monkeypatch.setattr(attention_module, "decode_attention", spy)
    with use_impl("triton"):
        model.generate(_ragged_prompts((4, 2)), 3, temperature=0)
    layers = model.config.n_layer
    assert calls == [([4, 2], True)] * layers + [([5, 3], True)] * layers


def test_padded_prompts_with_lengths_and_eos_stop_each_sequence():
    model = tiny_gpt(seed=43, **NARROW)
    prompts = _ragged_prompts((3, 6))
    padded = torch.zeros(2, 6, dtype=torch.long)
    padded[0, :3], padded[1] = prompts[0], prompts[1]
    with use_impl("eager"):
        free = model.generate(prompts, 8, temperature=0)
        eos = int(free[1][6 + 2])  # the third new token of the second prompt
        stopped = model.generate(padded, 8, temperature=0, lengths=[3, 6], eos_token_id=eos)
    for got, full, prompt_length in zip(stopped, free, (3, 6)):
        new = full[prompt_length:].tolist()
        end = new.index(eos) + 1 if eos in new else len(new)
        assert got.tolist() == full[:prompt_length + end].tolist()  # up to and including the first eos
    assert len(stopped[1]) <= 6 + 3 and int(stopped[1][-1]) == eos  # stopped early, at the eos


def test_generation_callback_streams_every_step():
    model = tiny_gpt(seed=44, **NARROW)
    seen = []
    with use_impl("eager"):
        out = model.generate(_ragged_prompts((2, 3)), [2, 4], temperature=0,
                             callback=lambda step, rows, tokens: seen.append((step, rows.tolist(), tokens.tolist())))
    assert [(step, rows) for step, rows, _ in seen] == [(0, [0, 1]), (1, [0, 1]), (2, [1]), (3, [1])]
    assert [tokens for _, _, tokens in seen] == [[int(out[0][2]), int(out[1][3])], [int(out[0][3]), int(out[1][4])],
                                                 [int(out[1][5])], [int(out[1][6])]]


def test_kv_cache_trim_select_and_ragged_store():
    cache = KVCache(1, 3, 2, 8, 16)
    cache.advance(4)
    cache.trim([4, 1, 2])
    assert cache.lengths == (4, 1, 2) and cache.cache_seqlens.tolist() == [4, 1, 2] and cache.is_ragged
    with pytest.raises(ValueError, match="different lengths"):
        cache.advance(1) or cache.store(0, torch.zeros(3, 2, 1, 16), torch.zeros(3, 2, 1, 16))
    assert cache.claim_starts.tolist() == [4, 1, 2] and cache.seq_len == 5
    cache.select([2, 0])
    assert cache.lengths == (3, 5) and cache.cache_seqlens.tolist() == [3, 5] and cache.keys[0].shape[0] == 2
    with pytest.raises(ValueError, match="lengths must give each"):
        cache.trim([6, 1])
    with pytest.raises(ValueError, match="rows must be indices"):
        cache.select([0, 2])


@pytest.mark.parametrize("call, error, match", [
    (lambda m: m.generate([torch.tensor([1, 2]), torch.tensor([], dtype=torch.long)], 2), ValueError,
     "prompt 1 is empty"),
    (lambda m: m.generate(torch.zeros(2, 3, dtype=torch.long), 2, lengths=[3]), ValueError, "lengths"),
    (lambda m: m.generate(torch.zeros(2, 3, dtype=torch.long), 2, lengths=[3, 4]), ValueError, "lengths"),
    (lambda m: m.generate([torch.tensor([1, 2])], 2, lengths=[2]), ValueError, "lengths"),
    (lambda m: m.generate([torch.tensor([1, 2]), torch.tensor([1], dtype=torch.int32)], 2), ValueError, "idx"),
    (lambda m: m.generate(torch.zeros(2, 3, dtype=torch.long), [2]), ValueError, "max_new_tokens"),
    (lambda m: m.generate(torch.zeros(1, 3, dtype=torch.long), 2, eos_token_id=50), ValueError, "eos_token_id"),
    (lambda m: m.generate(torch.zeros(1, 3, dtype=torch.long), 2, eos_token_id="a"), TypeError, "eos_token_id"),
    (lambda m: m.generate(torch.zeros(1, 3, dtype=torch.long), 2, callback=3), TypeError, "callback"),
    (lambda m: m.generate([torch.zeros(30, dtype=torch.long)], [4]), ValueError, "prompt 0 has 30 tokens"),
])
def test_ragged_generation_rejects_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(tiny_gpt())


def test_training_forward_never_forms_the_logits(monkeypatch):
    """With targets the loss is the fused linear cross-entropy of the hidden states: the head's matmul does not
    run and no logits come back, unless return_logits=True asks for them (the same loss)."""
    model = tiny_gpt(seed=45)
    idx, targets = token_ids((2, 9), seed=46), token_ids((2, 9), seed=47)
    calls = []
    model.lm_head.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    with use_impl("triton"):
        logits, loss = model(idx, targets)
        assert logits is None and calls == []
        full_logits, same_loss = model(idx, targets, return_logits=True)
    assert calls == [(2, 9, TINY["vocab_size"])]
    torch.testing.assert_close(loss, same_loss, rtol=0, atol=0)
    torch.testing.assert_close(loss, F.cross_entropy(full_logits.flatten(0, 1), targets.flatten()), rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(TypeError, match="return_logits"):
        model(idx, targets, return_logits=1)
