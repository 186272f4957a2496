"""Put genkernels' ops into Hugging Face models in place: ``patch(model)`` / ``unpatch(model)``.

Supported models (and any of their blocks passed on its own):

* diffusers ``UNet2DModel`` and ``UNet2DConditionModel``: their down/mid/up blocks, ``ResnetBlock2D``,
  ``Attention``, ``Transformer2DModel``, ``BasicTransformerBlock``, ``FeedForward``, ``TimestepEmbedding``;
* transformers ``GPT2Model`` and ``GPT2LMHeadModel`` (and the other GPT-2 heads, ``GPT2PreTrainedModel``
  subclasses, and ``GPT2Block``).

What is swapped (each flag of :func:`patch` turns one group on or off):

``norm`` (GroupNorm followed by SiLU -> :func:`genkernels.kernels.group_norm_silu`)
    ``ResnetBlock2D``: ``norm1`` + SiLU and ``norm2`` + SiLU become one fused op each. diffusers shares one
    ``nonlinearity`` module between these and the time-embedding path, so the block's forward is replaced (the
    activation module is left alone). Blocks whose ``nonlinearity`` is not SiLU, and the ``norm2`` of
    ``time_embedding_norm="scale_shift"`` blocks (a scale and shift sit between the norm and the SiLU), keep
    diffusers' code. The U-Net's final ``conv_norm_out`` + ``conv_act`` (SiLU) become one fused op too:
    ``conv_norm_out`` computes both and ``conv_act`` passes its input through (diffusers calls ``conv_act``
    only right after ``conv_norm_out``).
``attention``
    diffusers ``Attention`` modules whose processor is diffusers' default ``AttnProcessor2_0`` get a
    :class:`GenkernelsAttnProcessor` (``attn.set_processor``): self- and cross-attention through
    :func:`genkernels.kernels.flash_attention` (``[batch, heads, seq, head_dim]``); with an attention mask (e.g.
    ``encoder_attention_mask``, which diffusers turns into an additive ``[batch, heads, 1, seq_k]`` bias) through
    :func:`genkernels.kernels.scaled_dot_product_attention`, whose kernels read the mask in place (one row per
    sequence). Other processors (LoRA, IP-adapter, custom ones) are left as they are.
    GPT-2 self-attention (``GPT2Attention``): the projections and the cache update run as transformers writes
    them, and the attention itself is :func:`genkernels.kernels.flash_attention` (causal) for training and
    prefill, :func:`genkernels.kernels.decode_attention` for one-token decoding over the cached keys/values, and
    :func:`genkernels.kernels.scaled_dot_product_attention` (the same kernels, with SDPA's semantics, as
    transformers' ``"sdpa"`` attention calls it) for everything else: padding and any other mask transformers
    materializes (as it does while ``torch.compile`` traces), attention dropout in training (drawn in the kernels:
    another random stream than torch's, so masks differ draw for draw from the unpatched model's), chunked
    prefill. Masked calls under ``attn_implementation="eager"`` (which always masks, and whose attention weights
    ``output_attentions`` records), ``output_attentions=True`` and ``head_mask`` run transformers' own attention
    function, exactly as the unpatched model does: patch models running the default ``"sdpa"``. Cross-attention
    (``encoder_hidden_states``) runs the original forward.
``activations`` (a bias followed by its activation -> :func:`genkernels.kernels.bias_act`)
    GPT-2's MLP: ``c_fc``'s bias and the activation (``gelu_new``, ``gelu_pytorch_tanh``, ``gelu_fast`` ->
    ``"gelu_tanh"``; ``gelu`` -> ``"gelu"``; relu, silu, tanh, sigmoid, leaky relu) fused after the matmul;
    other activations keep transformers' MLP. diffusers: ``TimestepEmbedding``'s ``linear_1`` + SiLU,
    ``GELU``'s projection + GELU and ``GEGLU``'s gate bias + GELU.

Parameters and buffers are untouched (the state_dict is the same), so the patched model loads and saves as
before. :func:`unpatch` puts the original forwards and processors back: the model then computes bit for bit what
it computed before :func:`patch`. Patching an already patched module does nothing. The ops follow ``impl=`` (given
to :func:`patch`) or :func:`genkernels.kernels.use_impl` / ``GENKERNELS_IMPL`` as every genkernels op does, and the
patched models run under ``torch.compile(fullgraph=True)`` where the unpatched ones do.

diffusers and transformers are imported only when a model of theirs is patched (they are already imported then).
"""
from __future__ import annotations

import sys
import types
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from genkernels import kernels
from genkernels.kernels.checks import check_bool
from genkernels.kernels.runtime import validate_impl_name

__all__ = ["GenkernelsAttnProcessor", "SUPPORTED_MODELS", "is_patched", "patch", "unpatch"]

SUPPORTED_MODELS = (
    "diffusers UNet2DModel", "diffusers UNet2DConditionModel",
    "diffusers U-Net blocks (DownBlock2D, AttnDownBlock2D, CrossAttnDownBlock2D, UNetMidBlock2D, "
    "UNetMidBlock2DCrossAttn, UpBlock2D, AttnUpBlock2D, CrossAttnUpBlock2D, ResnetBlock2D, Attention, "
    "Transformer2DModel, BasicTransformerBlock, FeedForward, TimestepEmbedding, GELU, GEGLU)",
    "transformers GPT2Model", "transformers GPT2LMHeadModel",
    "the other transformers GPT-2 models (GPT2PreTrainedModel subclasses: GPT2DoubleHeadsModel, "
    "GPT2ForSequenceClassification, ...) and GPT2Block",
)

# Where a patched module keeps what patching replaced (a plain attribute: not a parameter, buffer or submodule).
_STATE = "_genkernels_patch"
# Saved as the original forward of a module that had none of its own (it ran its class's): None, not a sentinel
# object, so that copy.deepcopy of a patched model keeps the meaning.
_NO_INSTANCE_FORWARD = None

_DIFFUSERS_BLOCKS = (
    "DownBlock2D", "AttnDownBlock2D", "CrossAttnDownBlock2D", "UNetMidBlock2D", "UNetMidBlock2DCrossAttn",
    "UpBlock2D", "AttnUpBlock2D", "CrossAttnUpBlock2D", "ResnetBlock2D", "Attention", "Transformer2DModel",
    "BasicTransformerBlock", "FeedForward", "TimestepEmbedding", "GELU", "GEGLU",
)


# ----------------------------------------------------------------------------------------------------------------
# Bookkeeping: replacing a module's forward and putting it back
# ----------------------------------------------------------------------------------------------------------------

def _is_patched(module: nn.Module) -> bool:
    return _STATE in module.__dict__


def _original_forward(module: nn.Module) -> Callable:
    """The forward the module had before patching (an instance-level one if it had one, else its class's)."""
    saved = module.__dict__[_STATE]["forward"]
    if saved is _NO_INSTANCE_FORWARD:
        return types.MethodType(type(module).forward, module)
    return saved


def _replace_forward(module: nn.Module, function: Callable, impl: str, **extra: Any) -> None:
    module.__dict__[_STATE] = {"forward": module.__dict__.get("forward", _NO_INSTANCE_FORWARD), "impl": impl,
                               **extra}
    module.forward = types.MethodType(function, module)


def _impl_of(module: nn.Module) -> str:
    return module.__dict__[_STATE]["impl"]


def _restore(module: nn.Module) -> None:
    state = module.__dict__.pop(_STATE)
    if "processor" in state:
        module.set_processor(state["processor"])
        return
    if state["forward"] is _NO_INSTANCE_FORWARD:
        module.__dict__.pop("forward", None)
    else:
        module.forward = state["forward"]


def _fused_group_norm_silu(norm: nn.GroupNorm, x: torch.Tensor, impl: str) -> torch.Tensor:
    return kernels.group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps, impl=impl)


def _layout_error(path: str, module: nn.Module, expected: str) -> ValueError:
    return ValueError(f"patch: module {path or '<root>'!r} ({type(module).__name__}) does not have the layout the "
                      f"patcher expects: {expected}; this version of the library may differ from the one genkernels "
                      "supports (diffusers 0.42, transformers 5.24)")


# ----------------------------------------------------------------------------------------------------------------
# diffusers
# ----------------------------------------------------------------------------------------------------------------

def _resnet_forward(self, input_tensor: torch.Tensor, temb: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """diffusers' ``ResnetBlock2D.forward`` with GroupNorm + SiLU fused (``group_norm_silu``)."""
    if len(args) > 0 or kwargs.get("scale", None) is not None:
        return _original_forward(self)(input_tensor, temb, *args, **kwargs)
    impl = _impl_of(self)
    hidden_states = _fused_group_norm_silu(self.norm1, input_tensor, impl)

    if self.upsample is not None:
        if hidden_states.shape[0] >= 64:
            input_tensor = input_tensor.contiguous()
            hidden_states = hidden_states.contiguous()
        input_tensor = self.upsample(input_tensor)
        hidden_states = self.upsample(hidden_states)
    elif self.downsample is not None:
        input_tensor = self.downsample(input_tensor)
        hidden_states = self.downsample(hidden_states)

    hidden_states = self.conv1(hidden_states)

    if self.time_emb_proj is not None:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        temb = self.time_emb_proj(temb)[:, :, None, None]

    if self.time_embedding_norm == "scale_shift":
        if temb is None:
            raise ValueError(f" `temb` should not be None when `time_embedding_norm` is {self.time_embedding_norm}")
        time_scale, time_shift = torch.chunk(temb, 2, dim=1)
        hidden_states = self.norm2(hidden_states)
        hidden_states = hidden_states * (1 + time_scale) + time_shift
        hidden_states = self.nonlinearity(hidden_states)
    else:
        if self.time_embedding_norm == "default" and temb is not None:
            hidden_states = hidden_states + temb
        hidden_states = _fused_group_norm_silu(self.norm2, hidden_states, impl)

    hidden_states = self.dropout(hidden_states)
    hidden_states = self.conv2(hidden_states)

    if self.conv_shortcut is not None:
        if self.training:
            input_tensor = input_tensor.contiguous()
        input_tensor = self.conv_shortcut(input_tensor)

    return (input_tensor + hidden_states) / self.output_scale_factor


def _norm_silu_forward(self, x: torch.Tensor) -> torch.Tensor:
    """A U-Net's ``conv_norm_out`` computing its GroupNorm and the ``conv_act`` SiLU after it in one op."""
    return _fused_group_norm_silu(self, x, _impl_of(self))


def _passthrough_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``conv_act`` after a fused ``conv_norm_out``: the SiLU is already applied."""
    return x


def _timestep_embedding_forward(self, sample: torch.Tensor, condition: Optional[torch.Tensor] = None):
    """diffusers' ``TimestepEmbedding.forward`` with ``linear_1``'s bias and the SiLU fused (``bias_act``)."""
    if condition is not None:
        sample = sample + self.cond_proj(condition)
    sample = F.linear(sample, self.linear_1.weight)
    sample = kernels.bias_act(sample, self.linear_1.bias, dim=sample.dim() - 1, act="silu", gain=1.0,
                              impl=_impl_of(self))
    sample = self.linear_2(sample)
    if self.post_act is not None:
        sample = self.post_act(sample)
    return sample


def _gelu_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """diffusers' ``GELU``: the projection's bias and the GELU fused (``bias_act``)."""
    act = "gelu_tanh" if self.approximate == "tanh" else "gelu"
    hidden_states = F.linear(hidden_states, self.proj.weight)
    return kernels.bias_act(hidden_states, self.proj.bias, dim=hidden_states.dim() - 1, act=act, gain=1.0,
                            impl=_impl_of(self))


def _geglu_forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """diffusers' ``GEGLU``: the gate's bias and its GELU fused (``bias_act``), the other half's bias added."""
    if len(args) > 0 or kwargs.get("scale", None) is not None:
        return _original_forward(self)(hidden_states, *args, **kwargs)
    projected = F.linear(hidden_states, self.proj.weight)
    hidden, gate = projected.chunk(2, dim=-1)
    bias_hidden, bias_gate = self.proj.bias.chunk(2, dim=0)
    gate = kernels.bias_act(gate, bias_gate, dim=gate.dim() - 1, act="gelu", gain=1.0, impl=_impl_of(self))
    return (hidden + bias_hidden) * gate


class GenkernelsAttnProcessor:
    """diffusers' ``AttnProcessor2_0`` with the attention through genkernels.

    Without a mask the product is :func:`genkernels.kernels.flash_attention` (``[batch, heads, seq, head_dim]``,
    the scale ``1/sqrt(head_dim)`` as ``AttnProcessor2_0`` uses); with one,
    :func:`genkernels.kernels.scaled_dot_product_attention` with the mask. Everything around it (spatial and group
    norms, projections, q/k norms, residual, rescale) is diffusers' code.
    """

    def __init__(self, impl: str = "auto"):
        self.impl = impl

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, temb: Optional[torch.Tensor] = None,
                 *args, **kwargs) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if attention_mask is None:
            hidden_states = kernels.flash_attention(query, key, value, impl=self.impl)
        else:
            hidden_states = kernels.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                                 impl=self.impl)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _diffusers_plan(model: nn.Module, attention: bool, norm: bool, activations: bool, impl: str) -> list:
    """Check every module the patch touches and return the list of changes (nothing is changed here)."""
    from diffusers.models.activations import GEGLU, GELU
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0
    from diffusers.models.embeddings import TimestepEmbedding
    from diffusers.models.resnet import ResnetBlock2D

    plan = []
    for path, module in model.named_modules():
        if _is_patched(module):
            continue
        if isinstance(module, ResnetBlock2D) and norm:
            for name in ("norm1", "norm2"):
                sub = getattr(module, name, None)
                if not isinstance(sub, nn.GroupNorm) or not sub.affine:
                    raise _layout_error(path, module, f"{name} must be an affine torch.nn.GroupNorm, got "
                                                      f"{type(sub).__name__}")
            for name in ("conv1", "conv2", "nonlinearity", "dropout"):
                if not hasattr(module, name):
                    raise _layout_error(path, module, f"a {name!r} submodule")
            if isinstance(module.nonlinearity, nn.SiLU):
                plan.append(lambda m=module: _replace_forward(m, _resnet_forward, impl))
        elif isinstance(module, Attention) and attention:
            if not hasattr(module, "processor") or not hasattr(module, "set_processor"):
                raise _layout_error(path, module, "an attention processor (processor / set_processor)")
            if type(module.processor) is AttnProcessor2_0:
                def swap(m=module):
                    m.__dict__[_STATE] = {"processor": m.processor, "impl": impl}
                    m.set_processor(GenkernelsAttnProcessor(impl))
                plan.append(swap)
        elif isinstance(module, TimestepEmbedding) and activations:
            linear = getattr(module, "linear_1", None)
            if not isinstance(linear, nn.Linear):
                raise _layout_error(path, module, "linear_1 must be a torch.nn.Linear")
            if isinstance(getattr(module, "act", None), nn.SiLU) and linear.bias is not None:
                plan.append(lambda m=module: _replace_forward(m, _timestep_embedding_forward, impl))
        elif isinstance(module, (GELU, GEGLU)) and activations:
            proj = getattr(module, "proj", None)
            if not isinstance(proj, nn.Linear):
                raise _layout_error(path, module, "proj must be a torch.nn.Linear")
            if proj.bias is None:
                continue
            if isinstance(module, GELU) and getattr(module, "approximate", None) in ("none", "tanh"):
                plan.append(lambda m=module: _replace_forward(m, _gelu_forward, impl))
            elif isinstance(module, GEGLU):
                plan.append(lambda m=module: _replace_forward(m, _geglu_forward, impl))

    norm_out, act = getattr(model, "conv_norm_out", None), getattr(model, "conv_act", None)
    if norm and _is_unet(model) and norm_out is not None and not _is_patched(norm_out):
        if not isinstance(norm_out, nn.GroupNorm) or not norm_out.affine:
            raise _layout_error("conv_norm_out", norm_out, "an affine torch.nn.GroupNorm")
        if isinstance(act, nn.SiLU):
            def fuse_out(n=norm_out, a=act):
                _replace_forward(n, _norm_silu_forward, impl)
                _replace_forward(a, _passthrough_forward, impl)
            plan.append(fuse_out)
    return plan


def _is_unet(model: nn.Module) -> bool:
    from diffusers import UNet2DConditionModel, UNet2DModel
    return isinstance(model, (UNet2DModel, UNet2DConditionModel))


def _is_diffusers_model(model: nn.Module) -> bool:
    if "diffusers" not in sys.modules:
        return False
    if _is_unet(model):
        return True
    return any(cls.__module__.startswith("diffusers.") and cls.__name__ in _DIFFUSERS_BLOCKS
               for cls in type(model).__mro__)


# ----------------------------------------------------------------------------------------------------------------
# transformers GPT-2
# ----------------------------------------------------------------------------------------------------------------

def _gpt2_attention(self, query, key, value, attention_mask, output_attentions, kwargs):
    """The attention product of GPT2Attention, as transformers' ``"sdpa"`` attention computes it, through
    genkernels' ops: causal (top-left) when there is no mask and more than one query token, the mask otherwise."""
    q_len, kv_len = query.shape[2], key.shape[2]
    dropout = self.attn_dropout.p if self.training else 0.0
    # transformers' eager attention returns the attention weights (what output_attentions records: a masked call,
    # as the eager implementation always masks), which the fused kernels never form
    weights_wanted = output_attentions or (attention_mask is not None and self.config._attn_implementation == "eager")
    if not weights_wanted and kwargs.get("head_mask") is None:
        impl = _impl_of(self)
        needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
        causal = kwargs.get("is_causal")
        causal = bool(getattr(self, "is_causal", True) if causal is None else causal) and q_len > 1
        if attention_mask is None and dropout == 0.0 and q_len == 1 and kv_len > 1 and not needs_grad:
            seqlens = torch.full((query.shape[0],), kv_len, dtype=torch.int32, device=query.device)
            out = kernels.decode_attention(query, key, value, seqlens, softmax_scale=self.scaling, impl=impl)
        elif attention_mask is None and dropout == 0.0 and (q_len == kv_len or not causal):
            out = kernels.flash_attention(query, key, value, causal=causal, softmax_scale=self.scaling, impl=impl)
        else:
            if attention_mask is not None and attention_mask.is_floating_point():
                attention_mask = attention_mask.to(query.dtype)  # the model's dtype, query's under autocast
            out = kernels.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                       dropout_p=dropout, is_causal=causal and attention_mask is None,
                                                       scale=self.scaling, impl=impl)
        return out.transpose(1, 2), None

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.gpt2.modeling_gpt2 import eager_attention_forward

    if self.config._attn_implementation == "eager" and self.reorder_and_upcast_attn:
        return self._upcast_and_reordered_attn(query, key, value, attention_mask)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
    return interface(self, query, key, value, attention_mask, dropout=dropout, scaling=self.scaling, **kwargs)


def _gpt2_attention_forward(self, hidden_states, cache=None, attention_mask=None, encoder_hidden_states=None,
                            encoder_attention_mask=None, output_attentions=False, **kwargs):
    """transformers' ``GPT2Attention.forward`` (self-attention) with the product through :func:`_gpt2_attention`."""
    if encoder_hidden_states is not None or "past_key_values" in kwargs:
        return _original_forward(self)(hidden_states, cache=cache, attention_mask=attention_mask,
                                       encoder_hidden_states=encoder_hidden_states,
                                       encoder_attention_mask=encoder_attention_mask,
                                       output_attentions=output_attentions, **kwargs)
    from transformers.cache_utils import EncoderDecoderCache

    query_states, key_states, value_states = self.c_attn(hidden_states).split(self.split_size, dim=2)
    shape_kv = (*key_states.shape[:-1], -1, self.head_dim)
    key_states = key_states.view(shape_kv).transpose(1, 2)
    value_states = value_states.view(shape_kv).transpose(1, 2)
    shape_q = (*query_states.shape[:-1], -1, self.head_dim)
    query_states = query_states.view(shape_q).transpose(1, 2)

    if cache is not None:
        curr_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
        key_states, value_states = curr_cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)

    attn_output, attn_weights = _gpt2_attention(self, query_states, key_states, value_states, attention_mask,
                                                output_attentions, kwargs)

    attn_output = attn_output.reshape(*attn_output.shape[:-2], -1).contiguous()
    attn_output = self.c_proj(attn_output)
    attn_output = self.resid_dropout(attn_output)
    return attn_output, attn_weights


def _gpt2_activation(act: nn.Module) -> Optional[dict]:
    """The bias_act arguments equal to transformers' activation module ``act``, or None if it has none."""
    from transformers import activations as hf

    tanh_gelus = tuple(getattr(hf, name) for name in ("NewGELUActivation", "GELUTanh", "FastGELUActivation")
                       if hasattr(hf, name))
    if isinstance(act, tanh_gelus):
        return {"act": "gelu_tanh"}
    if type(act) is hf.GELUActivation:
        return {"act": "gelu"}
    if isinstance(act, (nn.SiLU, hf.SiLUActivation)):
        return {"act": "silu"}
    if type(act) is nn.ReLU:
        return {"act": "relu"}
    if type(act) is nn.Tanh:
        return {"act": "tanh"}
    if type(act) is nn.Sigmoid:
        return {"act": "sigmoid"}
    if type(act) is nn.LeakyReLU:
        return {"act": "lrelu", "alpha": float(act.negative_slope)}
    return None


def _gpt2_mlp_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """transformers' ``GPT2MLP.forward`` with ``c_fc``'s bias and the activation fused (``bias_act``)."""
    state = self.__dict__[_STATE]
    fc = self.c_fc
    rows = torch.mm(hidden_states.reshape(-1, hidden_states.size(-1)), fc.weight)
    rows = kernels.bias_act(rows, fc.bias, dim=1, gain=1.0, impl=state["impl"], **state["activation"])
    hidden_states = rows.view(*hidden_states.shape[:-1], fc.nf)
    hidden_states = self.c_proj(hidden_states)
    return self.dropout(hidden_states)


def _gpt2_plan(model: nn.Module, attention: bool, activations: bool, impl: str) -> list:
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention, GPT2MLP
    from transformers.pytorch_utils import Conv1D

    plan = []
    for path, module in model.named_modules():
        if _is_patched(module):
            continue
        if isinstance(module, GPT2Attention) and attention:
            for name in ("c_attn", "c_proj"):
                if not isinstance(getattr(module, name, None), Conv1D):
                    raise _layout_error(path, module, f"{name} must be a transformers Conv1D")
            for name in ("split_size", "head_dim", "scaling", "attn_dropout", "resid_dropout", "config"):
                if not hasattr(module, name):
                    raise _layout_error(path, module, f"an attribute {name!r}")
            if not getattr(module, "is_cross_attention", False):
                plan.append(lambda m=module: _replace_forward(m, _gpt2_attention_forward, impl))
        elif isinstance(module, GPT2MLP) and activations:
            for name in ("c_fc", "c_proj"):
                if not isinstance(getattr(module, name, None), Conv1D):
                    raise _layout_error(path, module, f"{name} must be a transformers Conv1D")
            for name in ("act", "dropout"):
                if not hasattr(module, name):
                    raise _layout_error(path, module, f"a {name!r} submodule")
            activation = _gpt2_activation(module.act)
            if activation is not None and module.c_fc.bias is not None:
                plan.append(lambda m=module, a=activation: _replace_forward(m, _gpt2_mlp_forward, impl,
                                                                             activation=a))
    return plan


def _is_gpt2_model(model: nn.Module) -> bool:
    if "transformers" not in sys.modules:
        return False
    if not any(cls.__module__.startswith("transformers.") for cls in type(model).__mro__):
        return False
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block, GPT2PreTrainedModel
    return isinstance(model, (GPT2PreTrainedModel, GPT2Block))


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------

def patch(model: nn.Module, *, attention: bool = True, norm: bool = True, activations: bool = True,
          impl: str = "auto") -> nn.Module:
    """Swap, in place, the hot paths of a diffusers U-Net or a transformers GPT-2 for genkernels' ops.

    Args:
        model: a diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` (or one of their blocks) or a transformers
            ``GPT2Model`` / ``GPT2LMHeadModel`` (or a ``GPT2Block``); see :data:`SUPPORTED_MODELS`.
        attention: attention through genkernels (diffusers attention processors, GPT-2 self-attention).
        norm: GroupNorm + SiLU fused (diffusers resnet blocks and the U-Net's output norm).
        activations: bias + activation fused (GPT-2's MLP, diffusers' time embedding and GELU / GEGLU).
        impl: the ``impl`` every patched op is called with; "auto" (default) follows
            :func:`genkernels.kernels.use_impl` / ``GENKERNELS_IMPL``.

    Returns:
        ``model`` itself. Its parameters and buffers are not changed; modules already patched are skipped (patching
        twice changes nothing). See the module notes for exactly what is replaced.

    Raises:
        TypeError: ``model`` is not a supported model (the message lists the supported ones), or a flag is not
            a bool.
        ValueError: a supported model whose submodules are not laid out as the patcher expects (the message names
            the module); nothing is changed then.
    """
    check_bool(attention, "attention")
    check_bool(norm, "norm")
    check_bool(activations, "activations")
    validate_impl_name(impl)
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch: model must be a torch.nn.Module; got {type(model).__name__}. Supported: "
                        + "; ".join(SUPPORTED_MODELS))
    if _is_diffusers_model(model):
        plan = _diffusers_plan(model, attention, norm, activations, impl)
    elif _is_gpt2_model(model):
        plan = _gpt2_plan(model, attention, activations, impl)
    else:
        cls = type(model)
        raise TypeError(f"patch: {cls.__module__}.{cls.__qualname__} is not a supported model. Supported: "
                        + "; ".join(SUPPORTED_MODELS))
    for change in plan:
        change()
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch` on ``model`` and every submodule: the original forwards and attention processors come
    back, so the model computes bit for bit what it did before patching. A model that was never patched is
    returned unchanged. Returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"unpatch: model must be a torch.nn.Module; got {type(model).__name__}")
    for module in list(model.modules()):
        if _is_patched(module):
            _restore(module)
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` or any of its submodules carries a genkernels patch."""
    return any(_is_patched(module) for module in model.modules())
