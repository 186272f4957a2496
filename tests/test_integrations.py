"""genkernels.models.integrations: patching diffusers U-Nets and transformers GPT-2 with genkernels' ops.

The peer library's own unpatched model is the reference: the patched fp32 model must follow the unpatched fp64 one
within the tolerance rule (twice the unpatched fp32 model's error plus a floor), outputs and parameter gradients,
under the eager and the Triton impls (the interpreter on CPU: tiny sizes only).
"""
import copy
import subprocess
import sys

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

from genkernels import kernels
from genkernels.models import integrations
from reference_checks import assert_close_to_reference


# ----------------------------------------------------------------------------------------------------------------
# Tiny random models
# ----------------------------------------------------------------------------------------------------------------

def tiny_unet(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 16),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=16)


def tiny_cond_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
                                norm_num_groups=4, attention_head_dim=1)  # diffusers reads it as the head count


def tiny_gpt2(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    options = dict(n_embd=32, n_head=2, n_layer=2, vocab_size=61, n_positions=32, bos_token_id=0, eos_token_id=0,
                   pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    options.update(overrides)
    return GPT2LMHeadModel(GPT2Config(**options))


def unet_inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 8, 8, generator=g), torch.tensor([3, 700])


def cond_inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    encoder = torch.randn(2, 5, 24, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    return sample, torch.tensor([3, 700]), encoder, mask


def token_ids(shape=(2, 8), seed: int = 1, vocab: int = 61) -> torch.Tensor:
    return torch.randint(1, vocab, shape, generator=torch.Generator().manual_seed(seed))


def as_double(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.double()
    return value


class Spy:
    """Counts the calls of genkernels.kernels functions (and the impl each was given) and runs them."""

    def __init__(self, monkeypatch, *names):
        self.calls = {name: [] for name in names}
        for name in names:
            original = getattr(kernels, name)

            def spy(*args, _name=name, _original=original, **kwargs):
                self.calls[_name].append(kwargs.get("impl", "auto"))
                return _original(*args, **kwargs)
            monkeypatch.setattr(kernels, name, spy)

    def count(self, name: str) -> int:
        return len(self.calls[name])


def marked(module: nn.Module) -> bool:
    """Whether this very module (not a submodule) carries a patch."""
    return "_genkernels_patch" in module.__dict__


def run_and_grads(model: nn.Module, call, weight_seed: int = 7):
    """Output of ``call(model)`` and the gradients of a fixed random projection of it in every parameter."""
    model.zero_grad(set_to_none=True)
    out = call(model)
    g = torch.Generator().manual_seed(weight_seed)
    weights = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    (out * weights).sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def assert_follows_reference(make, call, call64, impl: str) -> None:
    """Patched fp32 vs the unpatched fp64 model, with the unpatched fp32 model's error as the budget."""
    base = make()
    ref = copy.deepcopy(base).double()
    patched = integrations.patch(copy.deepcopy(base))
    out_base, grads_base = run_and_grads(base, call)
    out_ref, grads_ref = run_and_grads(ref, call64)
    with kernels.use_impl(impl):
        out, grads = run_and_grads(patched, call)
    assert_close_to_reference(out, out_ref, out_base, "output")
    assert grads.keys() == grads_ref.keys() == grads_base.keys()
    for name in grads:
        assert_close_to_reference(grads[name], grads_ref[name], grads_base[name], f"grad of {name}")


# ----------------------------------------------------------------------------------------------------------------
# Patched models follow the peer library's own
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["eager", "triton"])
def test_unet2d_patched_matches_diffusers_outputs_and_grads(impl):
    sample, t = unet_inputs()
    assert_follows_reference(tiny_unet, lambda m: m(sample, t).sample, lambda m: m(sample.double(), t).sample, impl)


@pytest.mark.parametrize("impl,masked", [("eager", True), ("eager", False), ("triton", False), ("triton", True)])
def test_unet2d_condition_patched_matches_diffusers_with_cross_attention_and_mask(impl, masked):
    sample, t, encoder, mask = cond_inputs()
    mask = mask if masked else None

    def call(m, dtype=torch.float32):
        return m(sample.to(dtype), t, encoder.to(dtype), encoder_attention_mask=mask).sample
    assert_follows_reference(tiny_cond_unet, call, lambda m: call(m, torch.float64), impl)


@pytest.mark.parametrize("impl", ["eager", "triton"])
def test_gpt2_patched_matches_transformers_logits_and_grads_in_training(impl):
    ids = token_ids()

    def make():
        return tiny_gpt2().train()
    assert_follows_reference(make, lambda m: m(ids).logits, lambda m: m(ids).logits, impl)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_patched_models_follow_the_float64_reference(dtype):
    ids = token_ids()
    sample, t, encoder, mask = cond_inputs()
    cases = [
        (tiny_gpt2().eval(), lambda m, d: m(ids).logits),
        (tiny_cond_unet(), lambda m, d: m(sample.to(d), t, encoder.to(d), encoder_attention_mask=mask).sample
         + m(sample.to(d), t, encoder.to(d)).sample),
    ]
    for model, call in cases:
        ref = copy.deepcopy(model).double()
        base = copy.deepcopy(model).to(dtype)
        patched = integrations.patch(copy.deepcopy(model).to(dtype))
        with torch.no_grad():
            with kernels.use_impl("eager"):
                out = call(patched, dtype)
            assert_close_to_reference(out, call(ref, torch.float64), call(base, dtype), f"{type(model).__name__}")


def test_gpt2_loss_with_labels_matches():
    ids = token_ids()
    base = tiny_gpt2().train()
    ref = copy.deepcopy(base).double()
    patched = integrations.patch(copy.deepcopy(base))
    with kernels.use_impl("eager"):
        loss = patched(ids, labels=ids).loss
    assert_close_to_reference(loss, ref(ids, labels=ids).loss, base(ids, labels=ids).loss, "loss")


@pytest.mark.parametrize("impl,new_tokens", [("eager", 6), ("triton", 3)])
def test_gpt2_greedy_generate_gives_the_same_tokens_through_decode_attention(monkeypatch, impl, new_tokens):
    ids = token_ids((2, 5), seed=3)
    base = tiny_gpt2(seed=2).eval()
    expected = base.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    patched = integrations.patch(copy.deepcopy(base))
    spy = Spy(monkeypatch, "flash_attention", "decode_attention")
    with kernels.use_impl(impl):
        got = patched.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    assert torch.equal(got, expected)
    layers = base.config.n_layer
    assert spy.count("flash_attention") == layers  # the prefill
    assert spy.count("decode_attention") == layers * (new_tokens - 1)  # one-token steps over the cache


def test_gpt2_generate_with_a_static_cache_gives_the_same_tokens():
    # a static cache's keys run past the tokens seen: the patch hands those calls to transformers' attention
    ids = token_ids((2, 5), seed=3)
    base = tiny_gpt2(seed=2).eval()
    expected = base.generate(ids, max_new_tokens=4, do_sample=False)
    patched = integrations.patch(copy.deepcopy(base))
    with kernels.use_impl("eager"):
        got = patched.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation="static")
    assert torch.equal(got, expected)


def test_gpt2_cached_decoding_matches_uncached_logits():
    ids = token_ids((2, 7), seed=4)
    model = integrations.patch(tiny_gpt2(seed=5).eval())
    with torch.no_grad(), kernels.use_impl("eager"):
        full = model(ids).logits
        prefix = model(ids[:, :4], use_cache=True)
        cache, steps = prefix.cache, [prefix.logits]
        for i in range(4, 7):
            out = model(ids[:, i:i + 1], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["eager", "triton"])
def test_gpt2_padding_mask_runs_the_masked_kernels(monkeypatch, impl):
    ids = token_ids((2, 6), seed=6)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    base = tiny_gpt2().eval()
    ref = copy.deepcopy(base).double()
    patched = integrations.patch(copy.deepcopy(base))
    spy = Spy(monkeypatch, "scaled_dot_product_attention", "flash_attention", "bias_act")
    with kernels.use_impl(impl):
        out = patched(ids, attention_mask=mask).logits
    assert spy.count("flash_attention") == 0
    assert spy.count("scaled_dot_product_attention") == spy.count("bias_act") == base.config.n_layer
    keep = mask.bool()  # padded query rows are not specified
    assert_close_to_reference(out[keep], ref(ids, attention_mask=mask).logits[keep],
                              base(ids, attention_mask=mask).logits[keep], "logits")


def test_gpt2_attention_dropout_in_training_runs_the_kernels_dropout(monkeypatch):
    """Training with attention dropout: the kernels' dropout (p from the config, causal); eval: none."""
    ids = token_ids()
    model = integrations.patch(tiny_gpt2(attn_pdrop=0.5, resid_pdrop=0.0, embd_pdrop=0.0).train())
    calls = []
    original = kernels.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((kwargs["dropout_p"], kwargs["is_causal"]))
        return original(*args, **kwargs)
    monkeypatch.setattr(kernels, "scaled_dot_product_attention", spy)
    flash = Spy(monkeypatch, "flash_attention")
    with kernels.use_impl("eager"):
        torch.manual_seed(0)
        first = model(ids).logits
        torch.manual_seed(0)
        again = model(ids).logits
        torch.manual_seed(1)
        other = model(ids).logits
        model.eval()
        model(ids)
    assert calls == [(0.5, True)] * (3 * model.config.n_layer)
    assert flash.count("flash_attention") == model.config.n_layer
    torch.testing.assert_close(first, again, rtol=0, atol=0)  # the draws follow torch's generator
    assert not torch.allclose(first, other)


def test_importing_the_module_imports_neither_diffusers_nor_transformers():
    code = ("import sys, genkernels.models.integrations; "
            "print('diffusers' in sys.modules, 'transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_gpt2_eager_attention_keeps_output_attentions():
    ids = token_ids((1, 6), seed=8)
    base = tiny_gpt2(attn_implementation="eager").eval()
    patched = integrations.patch(copy.deepcopy(base))
    expected = base(ids, output_attentions=True)
    with kernels.use_impl("eager"):
        got = patched(ids, output_attentions=True)
    assert len(got.attentions) == len(expected.attentions) == base.config.n_layer
    for a, b in zip(got.attentions, expected.attentions):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)


def test_gpt2_cross_attention_runs_the_original_forward(monkeypatch):
    ids = token_ids((2, 5), seed=9)
    encoder = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(9))
    base = tiny_gpt2(add_cross_attention=True).eval()
    patched = integrations.patch(copy.deepcopy(base))
    for block in patched.transformer.h:
        assert not integrations.is_patched(block.crossattention)
        assert integrations.is_patched(block.attn)
    spy = Spy(monkeypatch, "flash_attention")
    with kernels.use_impl("eager"):
        got = patched(ids, encoder_hidden_states=encoder).logits
    assert spy.count("flash_attention") == base.config.n_layer  # the self-attention only
    torch.testing.assert_close(got, base(ids, encoder_hidden_states=encoder).logits, rtol=1e-5, atol=1e-5)


def test_gpt2_model_without_head_and_a_single_block_are_supported():
    ids = token_ids()
    base = GPT2Model(tiny_gpt2().config).eval()
    patched = integrations.patch(copy.deepcopy(base))
    with kernels.use_impl("eager"):
        torch.testing.assert_close(patched(ids).last_hidden_state, base(ids).last_hidden_state, rtol=1e-5,
                                   atol=1e-5)
    block = integrations.patch(copy.deepcopy(base.h[0]))
    assert integrations.is_patched(block.attn) and integrations.is_patched(block.mlp)


@pytest.mark.parametrize("activation,expected", [("gelu_new", "gelu_tanh"), ("gelu_pytorch_tanh", "gelu_tanh"),
                                                 ("gelu", "gelu"), ("relu", "relu")])
def test_gpt2_mlp_activation_maps_to_bias_act(monkeypatch, activation, expected):
    ids = token_ids()
    base = tiny_gpt2(activation_function=activation).eval()
    patched = integrations.patch(copy.deepcopy(base))
    acts = []
    original = kernels.bias_act

    def spy(*args, **kwargs):
        acts.append((kwargs["act"], kwargs["gain"]))
        return original(*args, **kwargs)
    monkeypatch.setattr(kernels, "bias_act", spy)
    with kernels.use_impl("eager"):
        got = patched(ids).logits
    assert acts == [(expected, 1.0)] * base.config.n_layer
    torch.testing.assert_close(got, base(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", [dict(scale_attn_weights=False), dict(scale_attn_by_inverse_layer_idx=True),
                                     dict(reorder_and_upcast_attn=True)])
def test_gpt2_attention_scaling_options_are_followed(monkeypatch, options):
    ids = token_ids()
    base = tiny_gpt2(**options).eval()
    patched = integrations.patch(copy.deepcopy(base))
    spy = Spy(monkeypatch, "flash_attention")
    with kernels.use_impl("eager"):
        got = patched(ids).logits
    assert spy.count("flash_attention") == base.config.n_layer
    torch.testing.assert_close(got, base(ids).logits, rtol=1e-5, atol=1e-5)


def test_other_gpt2_heads_are_supported():
    from transformers import GPT2ForSequenceClassification
    ids = token_ids()
    base = GPT2ForSequenceClassification(tiny_gpt2(num_labels=3).config).eval()
    patched = integrations.patch(copy.deepcopy(base))
    assert integrations.is_patched(patched.transformer)
    with kernels.use_impl("eager"):
        torch.testing.assert_close(patched(ids).logits, base(ids).logits, rtol=1e-5, atol=1e-5)


def test_gpt2_mlp_with_an_unfusable_activation_is_left_alone():
    model = integrations.patch(tiny_gpt2(activation_function="quick_gelu"))
    assert all(integrations.is_patched(b.attn) and not integrations.is_patched(b.mlp) for b in model.transformer.h)


# ----------------------------------------------------------------------------------------------------------------
# The patched models call genkernels' ops
# ----------------------------------------------------------------------------------------------------------------

def test_patched_unets_call_genkernels_ops(monkeypatch):
    spy = Spy(monkeypatch, "group_norm_silu", "flash_attention", "bias_act")
    unet = integrations.patch(tiny_unet())
    resnets = sum(type(m).__name__ == "ResnetBlock2D" for m in unet.modules())
    attentions = sum(type(m).__name__ == "Attention" for m in unet.modules())
    sample, t = unet_inputs()
    with kernels.use_impl("eager"):
        unet(sample, t)
    assert spy.count("group_norm_silu") == 2 * resnets + 1  # norm1, norm2 of each block, conv_norm_out
    assert spy.count("flash_attention") == attentions
    assert spy.count("bias_act") == 1  # the time embedding's linear_1 + SiLU

    spy = Spy(monkeypatch, "group_norm_silu", "flash_attention", "bias_act")
    cond = integrations.patch(tiny_cond_unet())
    attn = [m for m in cond.modules() if type(m).__name__ == "Attention"]
    assert all(isinstance(m.processor, integrations.GenkernelsAttnProcessor) for m in attn)
    sample, t, encoder, mask = cond_inputs()
    calls = []
    original = kernels.scaled_dot_product_attention

    def masked_spy(*args, **kwargs):
        calls.append(kwargs["attn_mask"].shape)
        return original(*args, **kwargs)
    monkeypatch.setattr(kernels, "scaled_dot_product_attention", masked_spy)
    with kernels.use_impl("eager"):
        cond(sample, t, encoder, encoder_attention_mask=mask)
    cross = sum(1 for m in attn if m.is_cross_attention)
    assert len(calls) == cross  # the cross-attention layers take the encoder mask
    assert all(shape[2] == 1 for shape in calls)  # one row per sequence, broadcast over the queries
    assert spy.count("flash_attention") == len(attn) - cross
    geglus = sum(type(m).__name__ == "GEGLU" for m in cond.modules())
    assert spy.count("bias_act") == 1 + geglus


def test_gpt2_patched_calls_genkernels_ops_with_the_impl_given(monkeypatch):
    spy = Spy(monkeypatch, "flash_attention", "bias_act")
    model = integrations.patch(tiny_gpt2(), impl="eager")
    model(token_ids())
    assert spy.calls["flash_attention"] == ["eager"] * model.config.n_layer
    assert spy.calls["bias_act"] == ["eager"] * model.config.n_layer


def test_flags_choose_what_is_patched():
    unet = integrations.patch(tiny_cond_unet(), attention=False, norm=False, activations=False)
    assert not integrations.is_patched(unet)
    unet = integrations.patch(tiny_cond_unet(), norm=False, activations=False)
    assert {type(m).__name__ for m in unet.modules() if marked(m)} == {"Attention"}
    unet = integrations.patch(tiny_cond_unet(), attention=False, activations=False)
    patched = {type(m).__name__ for m in unet.modules() if marked(m)}
    assert patched == {"ResnetBlock2D", "GroupNorm", "SiLU"}
    gpt = integrations.patch(tiny_gpt2(), attention=False)
    assert {type(m).__name__ for m in gpt.modules() if marked(m)} == {"GPT2MLP"}


def test_patching_a_single_block():
    unet = tiny_unet()
    block = integrations.patch(unet.down_blocks[1])
    assert integrations.is_patched(block.resnets[0]) and integrations.is_patched(block.attentions[0])
    assert not integrations.is_patched(unet.mid_block)
    integrations.patch(unet)  # the rest; the block stays as it was patched
    assert integrations.is_patched(unet.mid_block)


# ----------------------------------------------------------------------------------------------------------------
# unpatch, state_dict, patching twice
# ----------------------------------------------------------------------------------------------------------------

def _models_and_calls():
    sample, t = unet_inputs()
    csample, ct, encoder, mask = cond_inputs()
    ids = token_ids()
    return [
        (tiny_unet(), lambda m: m(sample, t).sample),
        (tiny_cond_unet(), lambda m: m(csample, ct, encoder, encoder_attention_mask=mask).sample
         + m(csample, ct, encoder).sample),
        (tiny_gpt2().eval(), lambda m: m(ids).logits),
    ]


def _forwards_and_processors(model):
    return [(m, m.__dict__.get("forward"), getattr(m, "processor", None)) for m in model.modules()]


def test_unpatch_restores_bit_identical_behaviour_and_modules():
    for model, call in _models_and_calls():
        before_modules = _forwards_and_processors(model)
        expected = call(model)
        integrations.patch(model)
        with kernels.use_impl("eager"):
            patched = call(model)
        assert not torch.equal(patched, expected)  # the patch did change the computation
        assert integrations.unpatch(model) is model
        assert not integrations.is_patched(model)
        assert torch.equal(call(model), expected)
        after_modules = _forwards_and_processors(model)
        for (m, fwd, proc), (m2, fwd2, proc2) in zip(before_modules, after_modules):
            assert m is m2 and fwd is fwd2 and proc is proc2
            assert "_genkernels_patch" not in m.__dict__
        assert all(type(m.processor) is AttnProcessor2_0 for m in model.modules() if hasattr(m, "processor"))


def test_a_deep_copy_of_a_patched_model_is_patched_and_unpatches():
    ids = token_ids()
    base = tiny_gpt2().eval()
    expected = base(ids).logits
    copied = copy.deepcopy(integrations.patch(copy.deepcopy(base)))
    assert all(integrations.is_patched(b.attn) and b.attn.forward.__self__ is b.attn for b in copied.transformer.h)
    with kernels.use_impl("eager"):
        torch.testing.assert_close(copied(ids).logits, expected, rtol=1e-5, atol=1e-5)
    integrations.unpatch(copied)
    assert not integrations.is_patched(copied)
    assert torch.equal(copied(ids).logits, expected)


def test_an_instance_level_forward_is_kept_and_restored():
    model = tiny_gpt2().eval()
    attn = model.transformer.h[0].attn
    seen = []
    class_forward = attn.forward

    def hooked(*args, **kwargs):
        seen.append(kwargs.get("encoder_hidden_states") is not None)
        return class_forward(*args, **kwargs)
    attn.forward = hooked
    integrations.patch(model)
    assert attn.forward is not hooked
    hidden = torch.randn(1, 4, 32)
    with pytest.raises(ValueError, match="q_attn"):  # what the patch does not take runs the forward it replaced
        attn(hidden, encoder_hidden_states=hidden)
    assert seen == [True]
    integrations.unpatch(model)
    assert attn.forward is hooked


def test_unpatch_of_an_unpatched_model_changes_nothing():
    model = tiny_gpt2()
    before = _forwards_and_processors(model)
    integrations.unpatch(model)
    assert [(f, p) for _, f, p in before] == [(f, p) for _, f, p in _forwards_and_processors(model)]


def test_state_dict_is_unchanged_by_patching():
    for model, _ in _models_and_calls():
        before = model.state_dict()
        names = [n for n, _ in model.named_parameters()], [n for n, _ in model.named_buffers()]
        integrations.patch(model)
        after = model.state_dict()
        assert list(after.keys()) == list(before.keys())
        for key in before:
            assert after[key] is before[key] or (torch.equal(after[key], before[key])
                                                 and after[key].data_ptr() == before[key].data_ptr())
        assert ([n for n, _ in model.named_parameters()], [n for n, _ in model.named_buffers()]) == names
        integrations.unpatch(model)
        assert list(model.state_dict().keys()) == list(before.keys())


def test_patching_twice_is_a_no_op():
    for model, call in _models_and_calls():
        integrations.patch(model)
        first = _forwards_and_processors(model)
        states = [dict(m.__dict__.get("_genkernels_patch", {})) for m in model.modules()]
        with kernels.use_impl("eager"):
            once = call(model)
        assert integrations.patch(model) is model
        assert first == _forwards_and_processors(model)
        assert states == [dict(m.__dict__.get("_genkernels_patch", {})) for m in model.modules()]
        with kernels.use_impl("eager"):
            assert torch.equal(call(model), once)
        integrations.unpatch(model)
        assert not integrations.is_patched(model)


# ----------------------------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------------------------

def _compiles(model, *args, **kwargs) -> bool:
    try:
        torch.compile(copy.deepcopy(model), fullgraph=True, backend="aot_eager")(*args, **kwargs)
    except Exception:
        return False
    return True


def test_patched_gpt2_compiles_with_fullgraph(monkeypatch):
    torch._dynamo.reset()
    ids = token_ids()
    base = tiny_gpt2().eval()
    with torch.no_grad():
        if not _compiles(base, ids, use_cache=False):  # the precondition: the unpatched model compiles here
            pytest.skip("the unpatched GPT-2 does not compile with fullgraph=True here")
        expected = base(ids, use_cache=False).logits
        patched = integrations.patch(copy.deepcopy(base), impl="eager")
        spy = Spy(monkeypatch, "bias_act", "flash_attention", "scaled_dot_product_attention")
        got = torch.compile(patched, fullgraph=True, backend="aot_eager")(ids, use_cache=False).logits
    # traced through genkernels' ops; transformers materializes the causal mask while compiling (torch < 2.14),
    # which the masked kernels take
    assert spy.count("bias_act") == base.config.n_layer
    assert spy.count("flash_attention") + spy.count("scaled_dot_product_attention") == base.config.n_layer
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_patched_unet2d_compiles_with_fullgraph(monkeypatch):
    torch._dynamo.reset()
    sample, t = unet_inputs()
    base = tiny_unet()
    with torch.no_grad():
        if not _compiles(base, sample, t):
            pytest.skip("the unpatched UNet2DModel does not compile with fullgraph=True here")
        expected = base(sample, t).sample
        patched = integrations.patch(copy.deepcopy(base), impl="eager")
        spy = Spy(monkeypatch, "group_norm_silu", "flash_attention")
        got = torch.compile(patched, fullgraph=True, backend="aot_eager")(sample, t).sample
    assert spy.count("group_norm_silu") > 0 and spy.count("flash_attention") > 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------

def test_unsupported_model_type_is_refused_naming_the_class_and_the_supported_ones():
    with pytest.raises(TypeError, match=r"modules\.linear\.Linear is not a supported model.*GPT2LMHeadModel"):
        integrations.patch(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="UNet2DModel"):
        integrations.patch(nn.Sequential(tiny_gpt2()))


def test_a_non_module_is_refused():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module; got str"):
        integrations.patch("gpt2")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        integrations.unpatch(3)


@pytest.mark.parametrize("flag", ["attention", "norm", "activations"])
def test_flags_must_be_bools(flag):
    with pytest.raises(TypeError, match=flag):
        integrations.patch(tiny_gpt2(), **{flag: 1})


def test_an_unknown_impl_is_refused():
    with pytest.raises(ValueError, match="impl"):
        integrations.patch(tiny_gpt2(), impl="cuda")


def test_an_unexpected_diffusers_layout_is_refused_naming_the_module_and_nothing_is_patched():
    unet = tiny_unet()
    unet.down_blocks[1].resnets[0].norm1 = nn.Identity()
    with pytest.raises(ValueError, match=r"'down_blocks\.1\.resnets\.0' \(ResnetBlock2D\).*norm1"):
        integrations.patch(unet)
    assert not integrations.is_patched(unet)


def test_an_unexpected_gpt2_layout_is_refused_naming_the_module_and_nothing_is_patched():
    model = tiny_gpt2()
    model.transformer.h[1].attn.c_attn = nn.Linear(32, 96)
    with pytest.raises(ValueError, match=r"'transformer\.h\.1\.attn' \(GPT2Attention\).*c_attn"):
        integrations.patch(model)
    assert not integrations.is_patched(model)


def test_triton_impl_refusal_reaches_the_caller():
    # head_dim 8 is outside the kernels' [16, 256]: impl="triton" must refuse, not silently run something else
    model = integrations.patch(tiny_gpt2(n_head=4), impl="triton")
    with pytest.raises(ValueError, match="impl='triton' cannot run"):
        model(token_ids())
