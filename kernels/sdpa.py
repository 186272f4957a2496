"""``torch.nn.functional.scaled_dot_product_attention``'s signature and semantics on genkernels' flash kernels.

:func:`scaled_dot_product_attention` takes SDPA's arguments (leading dims broadcast, ``attn_mask``, ``dropout_p``,
``is_causal`` with SDPA's top-left alignment, ``scale``, ``enable_gqa``) and runs the fused kernels of
:mod:`genkernels.kernels.attention`, forward and backward, for everything they take:

* **masks**, bool (True = takes part) or additive of query's dtype, broadcastable to ``[..., L, S]``: passed to
  the kernels as a strided view (broadcast dims with stride 0, never materialized); a mask that is the same for
  every query row (a key-padding mask ``[batch, 1, 1, S]``) is read as one row per block. A row that no key takes
  part in gives zeros (SDPA's safe softmax), with zero gradients.
* **dropout** on the attention probabilities, with the mask drawn inside the kernels from Philox (keyed by an int64
  seed drawn from torch's generator on the device, so no host sync) and regenerated in the backward pass, as
  FlashAttention does: ``O = (softmax(S) * W) V`` with ``W = Z / (1 - p)``, ``Z`` the keep mask. The eager
  reference draws the same mask from the same seed (:func:`dropout_weights_reference`), so ``impl="eager"`` and
  ``impl="triton"`` agree draw for draw; torch's own SDPA draws another one.

What the kernels cannot take (``Ev != E``, head dims outside [16, 256], a mask that requires grad, key and value
with different head counts) runs torch's SDPA under ``impl="auto"`` with a one-time :class:`AttentionFallbackWarning`
per reason, and raises a ``ValueError`` listing every reason under ``impl="triton"``.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from .attention import MAX_HEAD_DIM, MIN_HEAD_DIM, _check_scale, default_scale
from .checks import check_bool, check_float_tensor, check_real, check_same_device, check_same_dtype, check_tensor, describe
from .launch import draw_philox_seed
from .philox import philox_uniform_grid
from .runtime import KERNEL_DTYPES, choose_impl, compute_dtype, default_impl, triton_can_run_on


class AttentionFallbackWarning(UserWarning):
    """:func:`scaled_dot_product_attention` under ``impl="auto"`` ran torch's own SDPA because the Triton kernels
    cannot take its inputs (the message names the reason; each reason warns once per process)."""


_warned_fallback_reasons: set = set()


def _warn_fallback_once(reasons) -> None:
    new = [reason for reason in reasons if reason not in _warned_fallback_reasons]
    if not new or torch.compiler.is_compiling():
        return
    _warned_fallback_reasons.update(new)
    warnings.warn("scaled_dot_product_attention runs torch.nn.functional.scaled_dot_product_attention: "
                  + "; ".join(new), AttentionFallbackWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------------
def _sdpa_shapes(query, key, value, enable_gqa):
    """Check the shape rules of SDPA; return ``(batch_shape, heads_kv)``: the broadcast leading dims of the output
    (``[..., L, Ev]``) and key/value's head count after GQA (``None`` without GQA)."""
    for tensor, name in ((query, "query"), (key, "key"), (value, "value")):
        if tensor.dim() < (3 if enable_gqa else 2):
            need = "3 dimensions [..., heads, seq, dim] with enable_gqa=True" if enable_gqa else \
                "2 dimensions [..., seq, dim]"
            raise ValueError(f"{name} must have at least {need}; got {describe(tensor)}")
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(f"key must have the last dimension E of query ({query.shape[-1]}); got {describe(key)}")
    if value.shape[-2] != key.shape[-2]:
        raise ValueError(f"value must have the sequence length S of key ({key.shape[-2]}, its dimension -2); got "
                         f"{describe(value)}")
    heads_kv = None
    key_batch, value_batch = list(key.shape[:-2]), list(value.shape[:-2])
    if enable_gqa:
        heads_q = query.shape[-3]
        for tensor, name in ((key, "key"), (value, "value")):
            heads = tensor.shape[-3]
            if (heads == 0 and heads_q != 0) or (heads != 0 and heads_q % heads != 0):
                raise ValueError(f"with enable_gqa=True the heads of {name} (dimension -3, {heads}) must divide the "
                                 f"heads of query ({heads_q}); got {name} {describe(tensor)}, query "
                                 f"{describe(query)}")
        heads_kv = key.shape[-3]
        key_batch[-1] = value_batch[-1] = heads_q
    try:
        batch = torch.broadcast_shapes(tuple(query.shape[:-2]), tuple(key_batch))
    except RuntimeError:
        raise ValueError(f"the leading (batch) dimensions of key must broadcast with query's "
                         f"({list(query.shape[:-2])}); got key {describe(key)}"
                         + (" (key heads may differ from query heads only with enable_gqa=True)"
                            if not enable_gqa else "")) from None
    try:
        batch = torch.broadcast_shapes(batch, tuple(value_batch))
    except RuntimeError:
        raise ValueError(f"the leading (batch) dimensions of value must broadcast with query's and key's "
                         f"({list(batch)}); got value {describe(value)}") from None
    return tuple(batch), heads_kv


def _check_attn_mask(attn_mask, query, target) -> Optional[torch.Tensor]:
    if attn_mask is None:
        return None
    mask = check_tensor(attn_mask, "attn_mask")
    if mask.dtype != torch.bool and mask.dtype != query.dtype:
        raise TypeError(f"attn_mask must be bool (True = takes part) or an additive mask of query's dtype "
                        f"({query.dtype}); got {describe(mask)}")
    if mask.device != query.device:
        raise ValueError(f"attn_mask must be on query's device ({query.device}); got {describe(mask)}")
    try:
        ok = torch.broadcast_shapes(tuple(mask.shape), tuple(target)) == tuple(target)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"attn_mask must broadcast to the attention shape [..., L, S] = {list(target)}; got "
                         f"{describe(mask)}")
    return mask


def _check_generator(generator, device: torch.device) -> Optional[torch.Generator]:
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(f"generator must be on query's device type ({device.type}); got a generator on "
                         f"{generator.device}")
    return generator


# ----------------------------------------------------------------------------------------------------------------
# Eager reference
# ----------------------------------------------------------------------------------------------------------------
def dropout_weights_reference(seed: torch.Tensor, shape, dropout_p: float) -> torch.Tensor:
    """fp32 dropout weights of shape ``[..., L, S]`` as the kernels draw them: ``1 / (1 - p)`` where element
    ``(plane, i, j)`` keeps (its Philox uniform ``u >= p``, :func:`genkernels.kernels.philox.philox_uniform_grid`;
    ``plane`` the row-major index over the leading dims), 0 where it drops; all 0 for ``p = 1``."""
    *leading, seq_q, seq_k = shape
    uniforms = philox_uniform_grid(seed, math.prod(leading), seq_q, seq_k).reshape(shape)
    keep_scale = 1.0 / (1.0 - dropout_p) if dropout_p < 1 else 0.0
    return torch.where(uniforms >= dropout_p, keep_scale, 0.0)


def sdpa_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0, is_causal: bool = False,
                   scale: Optional[float] = None, enable_gqa: bool = False,
                   seed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention``'s math in plain PyTorch (arguments already checked):

        O = (softmax(scale * Q K^T + B) * W) V

    ``B`` is ``-inf`` where a bool ``attn_mask`` is False, the float ``attn_mask`` itself, or ``-inf`` above the
    top-left diagonal (key ``j > i``) with ``is_causal``. A row whose scores are all ``-inf`` gives zeros (SDPA's
    safe softmax), with zero gradients. ``W`` is 1 without dropout; with ``dropout_p > 0`` it is
    :func:`dropout_weights_reference` of the int64 ``seed`` (the kernels' mask). Computes in fp32 (fp64 for fp64
    inputs), returns query's dtype.
    """
    dtype = compute_dtype(query.dtype)
    seq_q, seq_k = query.shape[-2], key.shape[-2]
    scale = default_scale(query.shape[-1]) if scale is None else scale
    keys, values = key.to(dtype), value.to(dtype)
    if enable_gqa:
        heads_q = query.shape[-3]
        keys = keys.repeat_interleave(heads_q // key.shape[-3] if key.shape[-3] else 1, dim=-3)
        values = values.repeat_interleave(heads_q // value.shape[-3] if value.shape[-3] else 1, dim=-3)
    scores = (query.to(dtype) * scale) @ keys.transpose(-1, -2)
    if is_causal:
        visible = torch.ones(seq_q, seq_k, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~visible, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(dtype)
    if seq_k > 0:
        hidden_row = (scores == float("-inf")).all(dim=-1, keepdim=True)
        scores = torch.where(hidden_row, torch.zeros((), dtype=dtype, device=query.device), scores)
        probs = torch.softmax(scores, dim=-1)
        probs = torch.where(hidden_row, torch.zeros((), dtype=dtype, device=query.device), probs)
    else:
        probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        if seed is None:
            raise ValueError("sdpa_reference: dropout_p > 0 needs the seed of the dropout mask (an int64 tensor, "
                             "genkernels.kernels.draw_philox_seed)")
        probs = probs * dropout_weights_reference(seed, tuple(probs.shape), dropout_p).to(dtype)
    return (probs @ values).to(query.dtype)


# ----------------------------------------------------------------------------------------------------------------
# The kernel path
# ----------------------------------------------------------------------------------------------------------------
def _sdpa_kernel_reasons(query, key, value, attn_mask, enable_gqa) -> list[str]:
    """Why the Triton kernels cannot take these SDPA inputs ([] when they can)."""
    reasons = []
    if attn_mask is not None and attn_mask.requires_grad and torch.is_grad_enabled():
        reasons.append("attn_mask requires grad: the kernels give no gradient for the mask")
    if value.shape[-1] != query.shape[-1]:
        reasons.append(f"value's head dim Ev ({value.shape[-1]}) differs from query's E ({query.shape[-1]}): the "
                       "kernels need Ev == E")
    if enable_gqa and key.shape[-3] != value.shape[-3]:
        reasons.append(f"key and value have different head counts ({key.shape[-3]} and {value.shape[-3]}): the "
                       "kernels need one key/value head count")
    head_dim = query.shape[-1]
    if query.device.type != "meta" and not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        reasons.append(f"head_dim (last dimension of query) is {head_dim}: the kernels take head dims in "
                       f"[{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]")
    return reasons


def _as_rank4(tensor: torch.Tensor, batch, heads: int, last_two) -> torch.Tensor:
    """``tensor`` broadcast to ``batch`` (its head dim at ``heads``) and ``last_two``, viewed ``[batch', heads,
    *last_two]`` (a view wherever the leading dims fold, as they do for the usual 4-d inputs)."""
    shape = list(batch[:-1]) + [heads] if batch else []
    tensor = tensor.expand(shape + list(last_two))
    return tensor.reshape(math.prod(batch[:-1]), heads, *last_two)


def _sdpa_kernels(query, key, value, mask, dropout_p, seed, is_causal, scale, batch, heads_kv):
    """The Triton path: leading dims folded into ``[batch', heads, seq, dim]``, the mask into ``[batch', heads_q,
    L, S]`` (stride 0 where it broadcasts), SDPA's top-left causal alignment passed to the kernels."""
    heads_q = batch[-1] if batch else 1
    heads = heads_q if heads_kv is None else heads_kv
    q = _as_rank4(query, batch, heads_q, query.shape[-2:])
    k = _as_rank4(key, batch, heads, key.shape[-2:])
    v = _as_rank4(value, batch, heads, value.shape[-2:])
    seq_q, seq_k = q.shape[2], k.shape[2]
    mask4 = None if mask is None else _as_rank4(mask, batch, heads_q, (seq_q, seq_k))
    out, _ = torch.ops.genkernels.flash_attention_forward(q, k, v, is_causal, scale, mask4, seed, dropout_p,
                                                          is_causal)
    return out.reshape(tuple(batch) + (seq_q, v.shape[-1]))


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False,
                                 *, generator: Optional[torch.Generator] = None, impl: str = "auto") -> torch.Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` with genkernels' fused kernels where they apply.

        O = (softmax(scale * Q K^T + B) * W) V,   W = dropout mask / (1 - dropout_p)

    Args:
        query: ``[..., L, E]``; key ``[..., S, E]``; value ``[..., S, Ev]``: one float dtype
            (fp32/fp16/bf16/fp64) and device, leading dims broadcast as SDPA does.
        attn_mask: optional, broadcastable to ``[..., L, S]``: bool (True = takes part) or additive, of query's
            dtype. Not together with ``is_causal``. The kernels read it in place (key-padding masks
            ``[batch, 1, 1, S]`` one row per sequence). A row no key takes part in gives zeros.
        dropout_p: dropout probability in [0, 1], applied whenever it is > 0 (as torch does: pass 0.0 in eval);
            the mask is drawn in the kernels from Philox, regenerated in the backward pass.
        is_causal: query ``i`` sees keys ``j <= i`` (top-left aligned, SDPA's rule when L != S).
        scale: multiplies ``Q K^T``; default ``1/sqrt(E)``.
        enable_gqa: key/value heads (dimension -3) may divide query's (grouped-query attention).
        generator: draws the dropout seed (default: torch's generator of query's device); ``impl="eager"`` and
            ``impl="triton"`` give the same dropout mask for the same generator state.
        impl: "auto", "triton" or "eager". The Triton path (:func:`flash_attention`'s kernels, forward and
            backward) takes masks, dropout, GQA, Ev == E in [16, 256] and fp32/fp16/bf16. Otherwise "auto" runs
            torch's own SDPA (an :class:`AttentionFallbackWarning` once per reason) and "triton" raises
            ``ValueError`` listing every reason; fp64 and devices the kernels cannot use run the eager reference
            (:func:`sdpa_reference`) under "auto". "eager" runs :func:`sdpa_reference`.

    Returns:
        ``[..., L, Ev]`` in query's dtype; differentiable in query, key and value (and in a float ``attn_mask``
        that requires grad, which runs torch's SDPA or the eager reference).
    """
    for tensor, name in ((query, "query"), (key, "key"), (value, "value")):
        check_float_tensor(tensor, name)
    check_same_dtype(query, "query", key, "key")
    check_same_dtype(query, "query", value, "value")
    check_same_device(zip(("query", "key", "value"), (query, key, value)))
    check_bool(is_causal, "is_causal")
    check_bool(enable_gqa, "enable_gqa")
    dropout_p = check_real(dropout_p, "dropout_p", low=0.0, high=1.0)
    generator = _check_generator(generator, query.device)
    batch, heads_kv = _sdpa_shapes(query, key, value, enable_gqa)
    mask = _check_attn_mask(attn_mask, query, tuple(batch) + (query.shape[-2], key.shape[-2]))
    if mask is not None and is_causal:
        raise ValueError("attn_mask must be None when is_causal=True (SDPA's rule: fold the causal mask into "
                         "attn_mask instead)")
    scale = _check_scale(scale, query.shape[-1])
    reasons = _sdpa_kernel_reasons(query, key, value, mask, enable_gqa)
    tensors = {"query": query, "key": key, "value": value, "attn_mask": mask}
    choice = choose_impl(impl, "scaled_dot_product_attention", tensors, reasons)
    requested = default_impl() if impl == "auto" else impl
    kernels_usable = triton_can_run_on(query.device) and query.dtype in KERNEL_DTYPES
    if choice != "triton" and requested != "eager" and reasons and kernels_usable:
        _warn_fallback_once(reasons)  # torch's SDPA draws its own dropout mask
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                                                dropout_p=dropout_p, is_causal=is_causal,
                                                                scale=scale, enable_gqa=enable_gqa)
    # the kernels and the eager reference draw the same mask from this seed
    seed = draw_philox_seed(query.device, generator) if dropout_p > 0 else None
    if choice == "triton":
        return _sdpa_kernels(query, key, value, mask, dropout_p, seed, is_causal, scale, batch, heads_kv)
    return sdpa_reference(query, key, value, mask, dropout_p, is_causal, scale, enable_gqa, seed)
