"""Fused exact attention: FlashAttention-2 style training kernels and flash-decoding over a KV cache.

Layout ``[batch, heads, seq, head_dim]`` as in ``F.scaled_dot_product_attention``, any strides (slices of one packed
QKV tensor are read in place). ``k``/``v`` may have fewer heads than ``q`` (grouped-query / multi-query attention):
query head ``h`` reads key/value head ``h // (heads_q // heads_kv)``.

Forward (Dao 2023, Algorithm 1): one program owns ``BLOCK_M`` query rows and streams key/value blocks through an
online softmax, keeping the running row maximum ``m``, the running sum ``l`` and the unnormalized output; the
``[seq_q, seq_k]`` score matrix never exists in memory. It stores the row logsumexp for the backward pass.
Backward (Dao 2023, Algorithm 2, split in two kernels so that no program needs atomics):
``delta_i = sum_d dO_id O_id``; with ``P = exp(S - lse)`` and ``dS = P * (dO V^T - delta)``,
``dQ = scale * dS K`` (one program per query block, looping over key blocks; it runs first and also writes
``delta`` for its rows, so no separate pass re-reads ``dO``) and ``dV = P^T dO``, ``dK = scale * dS^T Q`` (one
program per key block, looping over the query blocks of every query head of its group).

Causal masking is aligned to the bottom-right corner: query ``i`` sees key ``j`` iff ``j <= i + seq_k - seq_q``
(SDPA's ``is_causal=True`` when the lengths are equal). Key blocks that no row of a query block can see are never
visited (loop bounds), and in the forward pass the blocks every row sees completely skip the mask. A query row that
sees no key returns zeros and gets zero gradients; one that sees keys whose scores are all ``-inf`` is NaN.

Internally scores are kept in base 2 (``s2 = scale * log2(e) * q.k``, so softmax uses ``exp2``); the stored
logsumexp is ``log2(sum_j exp2(s2_j))`` (``+inf`` for a row that sees no key, so its probabilities are 0). ``q`` is
scaled before the product, as SDPA does (fp32 tiles by the whole factor, 16-bit tiles by its power-of-two part,
which is exact, and the rest after), so a product that only overflows unscaled stays finite.

Precision: fp16/bf16 inputs feed the tensor cores in their own dtype (probabilities and ``dS`` are rounded to it
before their matmuls, as FlashAttention does) with fp32 accumulation and fp32 softmax statistics; fp32 inputs use
``input_precision="ieee"`` dots, so fp32 keeps fp32 accuracy on the GPU (every product goes through
``triton_helpers.dot``, its ``NATIVE_DOT`` switch from ``launch.native_dot``). Triton's CPU interpreter cannot
multiply 16-bit tiles, so there the dots run in fp32 and bf16 tiles are upcast right after loading (``UPCAST``).

NaN/Inf follow softmax attention for everything a row sees (see :func:`flash_attention`); keys a row does not see
never reach it: their scores are selected away with ``tl.where``, and a program whose output came out with a NaN
(which a hidden NaN/Inf value times its zero probability makes) recomputes it key by key
(:func:`_exact_values_pass`), so the hot loop stays the plain product. fp64 inputs and head dims outside
[16, 256] run the eager reference (``runtime.choose_impl``).

Decode (flash-decoding): the keys of each sequence are split over ``num_splits`` programs, each writing its
partial ``(max, sum, unnormalized output)``; a combine kernel merges the splits with the same rescaling rule. The
split count is sized from the GPU's SM count so that the grid is whole waves (:func:`decode_split_plan`).

Tiles, pipeline depths and decode rows are chosen per device from ``launch.device_limits`` (SM count, shared
memory per CTA), so every config fits sm_80 (163 KB), sm_86/sm_89 (99 KB) and sm_90 (227 KB): see :data:`_TILES`.
TMA is not used (plain pointer loads, pipelined by Triton).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .checks import (
    check_bool,
    check_float_tensor,
    check_in_range,
    check_real,
    check_same_device,
    check_same_dtype,
    check_tensor,
    describe,
)
from .launch import batch_chunks, device_limits, launch_setting, native_dot
from .runtime import choose_impl, compute_dtype
from .triton_helpers import dot

MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
LOG2_E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------------------------
# Eager reference: the specification, the fallback and the test oracle
# ----------------------------------------------------------------------------------------------------------------
def _expand_kv_heads(kv: torch.Tensor, heads_q: int) -> torch.Tensor:
    """Repeat each key/value head for the ``heads_q // heads_kv`` query heads that share it."""
    return kv.repeat_interleave(heads_q // kv.shape[1], dim=1)


def _no_keys_output(q: torch.Tensor) -> torch.Tensor:
    """The output of attention over zero keys: zeros of ``q``'s shape whatever ``q`` holds, still differentiable
    in ``q`` (zero gradients; a select, never ``q * 0``, which would turn a NaN/Inf query into NaN)."""
    return torch.where(torch.zeros((), dtype=torch.bool, device=q.device), q, torch.zeros((), dtype=q.dtype,
                                                                                          device=q.device))


def _values_on_the_host(values: torch.Tensor) -> bool:
    return values.device.type == "cpu" and not torch.compiler.is_compiling()


def _visible_product(probs: torch.Tensor, visible: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``probs @ values`` summed over the ``visible`` (row, key) pairs only.

    ``probs`` is 0 where a key is hidden, but ``0 * NaN`` and ``0 * Inf`` are NaN, so a plain product would let a
    hidden key's NaN/Inf value reach the rows it is hidden from. The finite part of ``values`` goes through the
    product; each non-finite value of a visible key adds what the plain product gives it (NaN for NaN, or for Inf
    at probability 0; +-Inf at positive probability; NaN where +Inf and -Inf meet), counted with products of 0/1
    matrices. CPU inputs whose values are all finite (checked on the host, where it costs no sync) take the plain
    product."""
    finite = torch.isfinite(values)
    if _values_on_the_host(values) and bool(finite.all()):
        return probs @ values
    out = probs @ torch.where(finite, values, torch.zeros((), dtype=values.dtype, device=values.device))
    with torch.no_grad():
        dtype = probs.dtype
        # (hidden pairs have probability exactly 0, so `probs > 0` is already restricted to visible pairs)
        nan_hits = visible.to(dtype) @ torch.isnan(values).to(dtype)
        nan_hits = nan_hits + ((probs == 0) & visible).to(dtype) @ torch.isinf(values).to(dtype)
        up, down = ((probs > 0).to(dtype) @ torch.cat([torch.isposinf(values), torch.isneginf(values)], dim=-1)
                    .to(dtype)).chunk(2, dim=-1)
        special = torch.where(up > 0, float("inf"), 0.0).to(dtype)
        special = torch.where(down > 0, float("-inf"), special)
        special = torch.where((nan_hits > 0) | ((up > 0) & (down > 0)), float("nan"), special)
    return out + special


def _masked_softmax_attention(scores: torch.Tensor, visible: Optional[torch.Tensor], v: torch.Tensor,
                              per_row: bool = True) -> torch.Tensor:
    """``softmax(scores) @ v`` over the ``visible`` entries.

    Hidden entries are selected away (their scores, and their values' NaN/Inf: see :func:`_visible_product`); a
    row with no visible entry gives zeros (and zero gradients). NaN/Inf follow softmax: a NaN or ``+inf`` visible
    score makes the row NaN, and so does a row whose visible scores are all ``-inf`` (an Inf query: softmax's
    0 / 0, as ``torch.softmax`` gives; SDPA's ``_safe_softmax`` returns 0 there, which hides the Inf).
    ``per_row=False`` says ``visible`` depends on the key only (the caller already zeroed the hidden values)."""
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    total = weights.sum(dim=-1, keepdim=True)
    # total is 0 for a row that sees no key (zeros) and for one whose visible scores are all -inf (0 / 0 = NaN)
    if visible is None:
        probs = weights / total
    else:
        probs = weights / torch.where(visible.any(dim=-1, keepdim=True), total, torch.ones_like(total))
    if visible is None or not per_row:
        return probs @ v
    return _visible_product(probs, visible, v)


def causal_visibility(seq_q: int, seq_k: int, device) -> torch.Tensor:
    """``[seq_q, seq_k]`` bool: query ``i`` sees key ``j`` iff ``j <= i + seq_k - seq_q`` (bottom-right aligned)."""
    rows = torch.arange(seq_q, device=device)[:, None]
    cols = torch.arange(seq_k, device=device)[None, :]
    return cols <= rows + (seq_k - seq_q)


def default_scale(head_dim) -> float:
    """``1 / sqrt(head_dim)``, SDPA's default softmax scale (1 for ``head_dim = 0``, where it multiplies nothing);
    symbolic sizes under ``torch.compile`` stay symbolic."""
    if isinstance(head_dim, int):
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    return 1.0 / torch.sym_sqrt(head_dim)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                        softmax_scale: Optional[float] = None) -> torch.Tensor:
    """Exact softmax attention in plain PyTorch (Vaswani et al. 2017, eq. 1), materializing the score matrix.

        O = softmax(scale * Q K^T + M) V,   M_ij = -inf where key j is hidden from query i, else 0

    ``q`` is ``[batch, heads_q, seq_q, d]``, ``k``/``v`` ``[batch, heads_kv, seq_k, d]`` with ``heads_kv`` dividing
    ``heads_q`` (query head ``h`` uses key/value head ``h // (heads_q // heads_kv)``). With ``causal`` query ``i``
    sees keys ``j <= i + seq_k - seq_q``. ``scale`` defaults to ``1/sqrt(d)``. A row that sees no key is 0, and
    hidden keys never reach the output (not even their NaN/Inf). Computes in fp32 (fp64 for fp64 inputs) and
    returns ``q``'s dtype; differentiable.
    """
    dtype = compute_dtype(q.dtype)
    heads_q, seq_q, head_dim = q.shape[1], q.shape[2], q.shape[3]
    seq_k = k.shape[2]
    scale = default_scale(head_dim) if softmax_scale is None else softmax_scale
    if seq_k == 0 or k.shape[1] == 0:
        return _no_keys_output(q)
    keys = _expand_kv_heads(k.to(dtype), heads_q)
    values = _expand_kv_heads(v.to(dtype), heads_q)
    scores = (q.to(dtype) * scale) @ keys.transpose(-1, -2)  # q scaled first, as SDPA does
    visible = causal_visibility(seq_q, seq_k, q.device) if causal else None
    return _masked_softmax_attention(scores, visible, values).to(q.dtype)


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               cache_seqlens: torch.Tensor, softmax_scale: Optional[float] = None) -> torch.Tensor:
    """One decoding step over a KV cache in plain PyTorch.

        O_b = softmax(scale * q_b K_b[:n_b]^T) V_b[:n_b],   n_b = cache_seqlens[b]

    ``q`` is ``[batch, heads_q, 1, d]``, the caches ``[batch, heads_kv, max_seq, d]``; a sequence with
    ``n_b = 0`` gives zeros. Cache slots from ``n_b`` on are never used: their keys' scores and their values are
    selected away (``torch.where``), so NaN/Inf stored there cannot reach the output. Computes in fp32 (fp64 for
    fp64 inputs) and returns ``q``'s dtype.
    """
    dtype = compute_dtype(q.dtype)
    heads_q, head_dim = q.shape[1], q.shape[3]
    max_seq = k_cache.shape[2]
    scale = default_scale(head_dim) if softmax_scale is None else softmax_scale
    if max_seq == 0 or k_cache.shape[1] == 0:
        return _no_keys_output(q)
    positions = torch.arange(max_seq, device=q.device)
    filled = positions[None, :] < cache_seqlens.to(q.device).long()[:, None]  # [batch, max_seq]
    zero = torch.zeros((), dtype=dtype, device=q.device)
    keys = _expand_kv_heads(torch.where(filled[:, None, :, None], k_cache.to(dtype), zero), heads_q)
    values = _expand_kv_heads(torch.where(filled[:, None, :, None], v_cache.to(dtype), zero), heads_q)
    scores = (q.to(dtype) * scale) @ keys.transpose(-1, -2)
    return _masked_softmax_attention(scores, filled[:, None, None, :], values, per_row=False).to(q.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _load_tile(base, index, index_ok, stride_index, dims, dim_ok, stride_dim, UPCAST: tl.constexpr):
    """Rows ``index`` x columns ``dims`` of one head (masked, zeros outside), fp32 when ``UPCAST``."""
    offsets = index[:, None].to(tl.int64) * stride_index + dims[None, :].to(tl.int64) * stride_dim
    tile = tl.load(base + offsets, mask=index_ok[:, None] & dim_ok[None, :], other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _store_tile(base, value, index, index_ok, stride_index, dims, dim_ok, stride_dim):
    offsets = index[:, None].to(tl.int64) * stride_index + dims[None, :].to(tl.int64) * stride_dim
    tl.store(base + offsets, value.to(base.dtype.element_ty), mask=index_ok[:, None] & dim_ok[None, :])


@triton.jit
def _prescaled_query(q, scale_log2, IEEE: tl.constexpr):
    """``(q', factor)`` with ``dot(q', k^T) * factor = scale_log2 * q.k``, ``q`` scaled before the product as SDPA
    and the eager reference do (a product that only overflows unscaled stays finite). fp32 tiles (``IEEE``) take
    the whole scale (factor 1); 16-bit tiles its power-of-two part, exact in their dtype, and the rest after. (The
    dK/dV kernel scales its key block instead, once: the same scores.)"""
    if IEEE:
        return q * scale_log2, 1.0
    bits = tl.cast(tl.cast(scale_log2, tl.float32), tl.int32, bitcast=True)
    pow2 = tl.cast(bits & 0x7F800000, tl.float32, bitcast=True)
    pow2 = tl.where(pow2 == 0, 1.0, pow2)
    return (q.to(tl.float32) * pow2).to(q.dtype), scale_log2 / pow2


@triton.jit
def _mask_bias(mask_base, rows, row_ok, cols, col_ok, mask_sm, mask_sn, MASK: tl.constexpr,
               MASK_ROWS: tl.constexpr):
    """``attn_mask`` for query ``rows`` x key ``cols`` as a base-2 score bias: ``[rows, cols]``, or ``[1, cols]``
    when the mask is the same for every row (``MASK_ROWS`` false: a key-padding mask, one row read per block).

    ``MASK == 1`` (bool): 0 where True, ``-inf`` where False. ``MASK == 2`` (additive): ``bias * log2(e)``, a
    finite bias kept finite (clamped at -2.35e38 first: transformers pads with ``finfo.min``, which ``* log2(e)``
    would turn into ``-inf``; a row padded throughout then averages its keys, as SDPA gives), NaN kept NaN. Keys past
    ``seq_k`` (and rows past ``seq_q``) get ``-inf``."""
    if MASK_ROWS:
        offsets = rows[:, None].to(tl.int64) * mask_sm + cols[None, :].to(tl.int64) * mask_sn
        inside = row_ok[:, None] & col_ok[None, :]
    else:
        offsets = cols[None, :].to(tl.int64) * mask_sn
        inside = col_ok[None, :]
    if MASK == 1:
        taken = tl.load(mask_base + offsets, mask=inside, other=0)
        bias = tl.where(taken != 0, 0.0, float("-inf"))
    else:
        natural = tl.load(mask_base + offsets, mask=inside, other=float("-inf")).to(tl.float32)
        # clamped before the product (so it cannot overflow): -2.35e38 * log2(e) = -3.39e38 > -FLT_MAX
        bias = tl.maximum(natural, -2.35e38, propagate_nan=tl.PropagateNan.ALL) * 1.4426950408889634
        bias = tl.where(natural == float("-inf"), natural, bias)
    return bias


@triton.jit
def _dropout_weights(seed_ptr, plane, rows, first_col, dropout_p, keep_scale, BLOCK_N: tl.constexpr):
    """``[rows, BLOCK_N]`` dropout weights for keys ``first_col ..`` (a multiple of 4) of query ``rows`` of the
    (batch, query head) ``plane``: ``keep_scale = 1 / (1 - p)`` where kept, 0 where dropped.

    Element (plane, i, j) keeps iff ``u >= p``, ``u`` the uniform of word ``j mod 4`` of Philox-4x32-10 keyed by
    the int64 seed at counter ``(j div 4, i, plane mod 2^32, plane div 2^32)`` (one Philox call per four keys;
    :func:`dropout_weights_reference` draws the same). The backward kernels regenerate the same weights."""
    groups = first_col // 4 + tl.arange(0, BLOCK_N // 4)
    zero = tl.zeros((rows.shape[0], BLOCK_N // 4), tl.uint32)
    plane_lo = (plane & 0xFFFFFFFF).to(tl.uint32)
    plane_hi = (plane >> 32).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(tl.load(seed_ptr), zero + groups[None, :].to(tl.uint32),
                               zero + rows[:, None].to(tl.uint32), zero + plane_lo, zero + plane_hi)
    words = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))
    return tl.where(tl.uint_to_uniform_float(words) >= dropout_p, keep_scale, 0.0)


@triton.jit
def _dropout_weight_at(seed_ptr, plane, rows, col, dropout_p, keep_scale):
    """:func:`_dropout_weights` of one key ``col`` for query ``rows`` (from its own Philox group)."""
    zero = tl.zeros(rows.shape, tl.uint32)
    r0, r1, r2, r3 = tl.philox(tl.load(seed_ptr), zero + (col // 4).to(tl.uint32), rows.to(tl.uint32),
                               zero + (plane & 0xFFFFFFFF).to(tl.uint32), zero + (plane >> 32).to(tl.uint32))
    lane = col % 4
    word = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
    return tl.where(tl.uint_to_uniform_float(word) >= dropout_p, keep_scale, 0.0)


@triton.jit
def _exact_values_pass(q, scale_log2, k_base, v_base, k_ss, k_sd, v_ss, v_sd, key_start, key_end, rows, row_ok,
                       offset, dims, dim_ok, mask_base, mask_sm, mask_sn, seed_ptr, plane, dropout_p, keep_scale,
                       CAUSAL: tl.constexpr, MASK: tl.constexpr, MASK_ROWS: tl.constexpr, DROPOUT: tl.constexpr,
                       IEEE: tl.constexpr):
    """``(acc, row_sum, row_max)`` of a query block over keys ``[key_start, key_end)`` again, one key at a time in
    fp32 (the same online softmax, mask and dropout), each (row, key) term on its own and hidden pairs selected
    away.

    For the rare program whose product-based output holds a NaN: it may come from NaN inputs the rows see (then
    it stays), or from a NaN/Inf value multiplied by a zero probability (a key hidden from the row by the causal
    mask or ``attn_mask``, a dropped one, or a probability that only underflowed when rounded to a 16-bit tile),
    which the exact terms avoid: a hidden or dropped key never reaches a row, a visible Inf value gives +-Inf
    unless its fp32 probability is 0 (SDPA's ``0 * Inf = NaN``). Costs one pass over the keys per program, only
    where a NaN appeared (run by :func:`_attention_forward_repair_kernel`)."""
    q_scaled, factor = _prescaled_query(q, scale_log2, IEEE)
    q_scaled = q_scaled.to(tl.float32)
    acc = tl.zeros(q_scaled.shape, tl.float32)
    row_sum = tl.zeros((q_scaled.shape[0],), tl.float32)
    row_max = tl.full((q_scaled.shape[0],), float("-inf"), tl.float32)
    for j in range(key_start, key_end):
        offset_j = tl.cast(j, tl.int64)
        k_row = tl.load(k_base + offset_j * k_ss + dims.to(tl.int64) * k_sd, mask=dim_ok, other=0.0)
        v_row = tl.load(v_base + offset_j * v_ss + dims.to(tl.int64) * v_sd, mask=dim_ok, other=0.0)
        scores = tl.sum(q_scaled * k_row[None, :].to(tl.float32), 1)
        if not IEEE:
            scores = scores * factor
        if CAUSAL:
            visible = j <= rows + offset
        else:
            visible = rows == rows
        if MASK != 0:
            key = tl.full((1,), j, tl.int32)
            bias = tl.sum(_mask_bias(mask_base, rows, row_ok, key, key == key, mask_sm, mask_sn, MASK, True), 1)
            scores = scores + bias
            visible = visible & (bias != float("-inf"))
        scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(row_max, scores, propagate_nan=tl.PropagateNan.ALL)
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        probs = tl.exp2(scores - safe_max)
        rescale = tl.exp2(row_max - safe_max)
        row_sum = row_sum * rescale + probs
        if DROPOUT:
            weights = _dropout_weight_at(seed_ptr, plane, rows, j, dropout_p, keep_scale)
            visible = visible & (weights != 0)
            probs = probs * weights
        term = tl.where(visible[:, None], probs[:, None] * v_row[None, :].to(tl.float32), 0.0)
        acc = acc * rescale[:, None] + term
        row_max = new_max
    return acc, row_sum, row_max


@triton.jit
def _online_softmax_blocks(acc, row_sum, row_max, q, k_base, v_base, k_ss, k_sd, v_ss, v_sd, key_start, key_end,
                           seq_k, rows, row_ok, offset, dims, dim_ok, scale_log2, mask_base, mask_sm, mask_sn,
                           seed_ptr, plane, dropout_p, keep_scale,
                           MASKED: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr, MASK_ROWS: tl.constexpr,
                           DROPOUT: tl.constexpr, UPCAST: tl.constexpr, NATIVE_DOT: tl.constexpr,
                           IEEE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Fold key blocks ``[key_start, key_end)`` into the running ``(acc, row_sum, row_max)`` of a query block.

    ``MASKED`` blocks may hold keys past ``seq_k`` (never loaded: zeros) or (``CAUSAL``) keys hidden from some
    rows, whose scores are selected away (their values only reach the product with probability 0, which
    :func:`_exact_values_pass` undoes where that made a NaN); the other blocks are seen completely by every row and
    skip that mask. An ``attn_mask`` (``MASK``) biases every block's scores; dropout (``DROPOUT``) weights the
    probabilities that multiply the values, after ``row_sum`` took them undropped (the softmax normalizes before
    dropout)."""
    q_scaled, factor = _prescaled_query(q, scale_log2, IEEE)
    for start_n in range(key_start, key_end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < seq_k
        k = _load_tile(k_base, cols, col_ok, k_ss, dims, dim_ok, k_sd, UPCAST)
        scores = dot(q_scaled, tl.trans(k), tl.zeros((q.shape[0], BLOCK_N), tl.float32), NATIVE_DOT, IEEE)
        if not IEEE:
            scores = scores * factor
        if MASK != 0:
            scores = scores + _mask_bias(mask_base, rows, row_ok, cols, col_ok, mask_sm, mask_sn, MASK, MASK_ROWS)
        visible = col_ok[None, :]
        if MASKED:
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None] + offset)
            scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1), propagate_nan=tl.PropagateNan.ALL)
        # A row that has seen no key yet keeps max -inf; a finite stand-in avoids inf - inf.
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        probs = tl.exp2(scores - safe_max[:, None])
        rescale = tl.exp2(row_max - safe_max)
        row_sum = row_sum * rescale + tl.sum(probs, 1)
        if DROPOUT:
            probs = probs * _dropout_weights(seed_ptr, plane, rows, start_n, dropout_p, keep_scale, BLOCK_N)
        v = _load_tile(v_base, cols, col_ok, v_ss, dims, dim_ok, v_sd, UPCAST)
        acc = dot(probs.to(v.dtype), v, acc * rescale[:, None], NATIVE_DOT, IEEE)
        row_max = new_max
    return acc, row_sum, row_max


@triton.jit
def _causal_stages(first_row, offset, seq_k, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``(full_end, key_end)`` of a query block: the key blocks before ``full_end`` are seen completely by every
    row (no mask needed), keys from ``key_end`` on by none (never visited)."""
    if CAUSAL:
        full_end = tl.minimum(tl.maximum(first_row + offset + 1, 0), seq_k) // BLOCK_N * BLOCK_N
        key_end = tl.minimum(seq_k, tl.maximum(first_row + BLOCK_M + offset, 0))
    else:
        full_end = seq_k // BLOCK_N * BLOCK_N
        key_end = seq_k
    return full_end, key_end


@triton.jit
def _attention_forward_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, mask_ptr, seed_ptr,
    batch_start, seq_q, seq_k, offset, head_dim, group_size, scale_log2, dropout_p, keep_scale,
    q_sb, q_sh, q_ss, q_sd, k_sb, k_sh, k_ss, k_sd, v_sb, v_sh, v_ss, v_sd, o_sb, o_sh, o_ss, o_sd,
    m_sb, m_sh, m_sm, m_sn,
    CAUSAL: tl.constexpr, MASK: tl.constexpr, MASK_ROWS: tl.constexpr, DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, NATIVE_DOT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    block_m = tl.program_id(0)
    head = tl.program_id(1)
    heads_q = tl.num_programs(1)
    batch = (batch_start + tl.program_id(2)).to(tl.int64)
    kv_head = (head // group_size).to(tl.int64)
    first_row = block_m * BLOCK_M
    rows = first_row + tl.arange(0, BLOCK_M)
    row_ok = rows < seq_q
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    q = _load_tile(q_ptr + batch * q_sb + head.to(tl.int64) * q_sh, rows, row_ok, q_ss, dims, dim_ok, q_sd, UPCAST)
    k_base = k_ptr + batch * k_sb + kv_head * k_sh
    v_base = v_ptr + batch * v_sb + kv_head * v_sh
    mask_base = mask_ptr + batch * m_sb + head.to(tl.int64) * m_sh
    plane = batch * heads_q + head

    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    full_end, key_end = _causal_stages(first_row, offset, seq_k, CAUSAL, BLOCK_M, BLOCK_N)
    acc, row_sum, row_max = _online_softmax_blocks(
        acc, row_sum, row_max, q, k_base, v_base, k_ss, k_sd, v_ss, v_sd, 0, full_end, seq_k, rows, row_ok, offset,
        dims, dim_ok, scale_log2, mask_base, m_sm, m_sn, seed_ptr, plane, dropout_p, keep_scale,
        False, CAUSAL, MASK, MASK_ROWS, DROPOUT, UPCAST, NATIVE_DOT, IEEE, BLOCK_N)
    acc, row_sum, row_max = _online_softmax_blocks(
        acc, row_sum, row_max, q, k_base, v_base, k_ss, k_sd, v_ss, v_sd, full_end, key_end, seq_k, rows, row_ok,
        offset, dims, dim_ok, scale_log2, mask_base, m_sm, m_sn, seed_ptr, plane, dropout_p, keep_scale,
        True, CAUSAL, MASK, MASK_ROWS, DROPOUT, UPCAST, NATIVE_DOT, IEEE, BLOCK_N)
    _store_rows(acc, row_sum, row_max, rows, row_ok, offset, dims, dim_ok,
                out_ptr + batch * o_sb + head.to(tl.int64) * o_sh, o_ss, o_sd,
                lse_ptr + (batch * heads_q + head) * seq_q, CAUSAL, MASK)


@triton.jit
def _store_rows(acc, row_sum, row_max, rows, row_ok, offset, dims, dim_ok, out_base, o_ss, o_sd, lse_base,
                CAUSAL: tl.constexpr, MASK: tl.constexpr):
    """Write a query block's output ``acc / row_sum`` and its log-sum-exp (base 2).

    row_sum is 0 for a row that sees no key (output 0, lse +inf: probabilities 0 in the backward pass) or whose
    visible scores are all -inf (softmax's 0 / 0: NaN, as the eager reference; under an ``attn_mask``, SDPA's
    rule instead: 0, as for a row the mask hides throughout), and NaN for a row whose scores hold NaN (or +inf),
    which stays NaN in the output and in lse."""
    unseen = row_sum == 0
    if MASK != 0:
        sees_keys = rows < 0
    elif CAUSAL:
        sees_keys = rows + offset >= 0
    else:
        sees_keys = rows >= 0
    safe_sum = tl.where(unseen, 1.0, row_sum)
    out = tl.where((unseen & sees_keys)[:, None], float("nan"), acc / safe_sum[:, None])
    _store_tile(out_base, out, rows, row_ok, o_ss, dims, dim_ok, o_sd)
    lse = tl.where(unseen, tl.where(sees_keys, float("nan"), float("inf")), row_max + tl.log2(safe_sum))
    tl.store(lse_base + rows, lse, mask=row_ok)


@triton.jit
def _attention_forward_repair_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, mask_ptr, seed_ptr,
    batch_start, seq_q, seq_k, offset, head_dim, group_size, scale_log2, dropout_p, keep_scale,
    q_sb, q_sh, q_ss, q_sd, k_sb, k_sh, k_ss, k_sd, v_sb, v_sh, v_ss, v_sd, o_sb, o_sh, o_ss, o_sd,
    m_sb, m_sh, m_sm, m_sn,
    CAUSAL: tl.constexpr, MASK: tl.constexpr, MASK_ROWS: tl.constexpr, DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Run after the forward kernel, over row blocks of its own (smaller than the forward's, so several CTAs fit
    an SM: a memory-bound pass): a block whose output holds a NaN is recomputed by :func:`_exact_values_pass`
    (row by row: its rows and lse rewritten); every other block only reads its output once. A kernel of its own,
    so the exact pass costs the forward kernel no registers (in it, it made the d64 tiles spill)."""
    block_m = tl.program_id(0)
    head = tl.program_id(1)
    heads_q = tl.num_programs(1)
    batch = (batch_start + tl.program_id(2)).to(tl.int64)
    first_row = block_m * BLOCK_M
    rows = first_row + tl.arange(0, BLOCK_M)
    row_ok = rows < seq_q
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    out_base = out_ptr + batch * o_sb + head.to(tl.int64) * o_sh
    out = _load_tile(out_base, rows, row_ok, o_ss, dims, dim_ok, o_sd, True)
    if tl.sum(tl.where(out != out, 1, 0)) > 0:
        kv_head = (head // group_size).to(tl.int64)
        q = _load_tile(q_ptr + batch * q_sb + head.to(tl.int64) * q_sh, rows, row_ok, q_ss, dims, dim_ok, q_sd,
                       UPCAST)
        if CAUSAL:
            key_end = tl.minimum(seq_k, tl.maximum(first_row + BLOCK_M + offset, 0))
        else:
            key_end = seq_k
        acc, row_sum, row_max = _exact_values_pass(
            q, scale_log2, k_ptr + batch * k_sb + kv_head * k_sh, v_ptr + batch * v_sb + kv_head * v_sh, k_ss, k_sd,
            v_ss, v_sd, 0, key_end, rows, row_ok, offset, dims, dim_ok,
            mask_ptr + batch * m_sb + head.to(tl.int64) * m_sh, m_sm, m_sn, seed_ptr, batch * heads_q + head,
            dropout_p, keep_scale, CAUSAL, MASK, MASK_ROWS, DROPOUT, IEEE)
        _store_rows(acc, row_sum, row_max, rows, row_ok, offset, dims, dim_ok, out_base, o_ss, o_sd,
                    lse_ptr + (batch * heads_q + head) * seq_q, CAUSAL, MASK)


@triton.jit
def _dkdv_query_blocks(dk, dv, k_scaled, factor, v, q_base, do_base, lse_ptr, delta_ptr, q_ss, q_sd, do_ss, do_sd,
                       row_start, row_end, seq_q, cols, col_ok, offset, dims, dim_ok, mask_base, mask_sm, mask_sn,
                       seed_ptr, plane, dropout_p, keep_scale, first_col,
                       MASKED: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr, MASK_ROWS: tl.constexpr,
                       DROPOUT: tl.constexpr, UPCAST: tl.constexpr, NATIVE_DOT: tl.constexpr, IEEE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Add the query blocks ``[row_start, row_end)`` of one query head to a key block's ``dk`` (unscaled) and
    ``dv``; ``(k_scaled, factor)`` is the key block as :func:`_prescaled_query` scales it (the scores as the
    forward pass has them). ``MASKED`` blocks may pair keys past ``seq_k`` or (``CAUSAL``) hidden keys with some
    rows. With dropout weights ``W``: ``dV += (P * W)^T dO`` and ``dP = (V dO^T)^T * W``."""
    for start_m in range(row_start, row_end, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < seq_q
        q = _load_tile(q_base, rows, row_ok, q_ss, dims, dim_ok, q_sd, UPCAST)
        grad_out = _load_tile(do_base, rows, row_ok, do_ss, dims, dim_ok, do_sd, UPCAST)
        # Rows past seq_q (and rows that see no key) have lse = +inf: probability 0.
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0)
        zeros = tl.zeros((k_scaled.shape[0], BLOCK_M), tl.float32)
        scores_t = dot(k_scaled, tl.trans(q), zeros, NATIVE_DOT, IEEE)
        if not IEEE:
            scores_t = scores_t * factor
        if MASK != 0:
            bias_t = tl.trans(_mask_bias(mask_base, rows, row_ok, cols, col_ok, mask_sm, mask_sn, MASK, MASK_ROWS))
            scores_t = scores_t + bias_t
        probs_t = tl.exp2(scores_t - lse[None, :])
        if MASKED:
            # Keys past seq_k are zero-padded: masked too, as their exp2(0 - lse) may overflow the input dtype.
            visible = col_ok[:, None]
            if CAUSAL:
                visible = visible & (cols[:, None] <= rows[None, :] + offset)
            probs_t = tl.where(visible, probs_t, 0.0)
        grad_probs_t = dot(v, tl.trans(grad_out), zeros, NATIVE_DOT, IEEE)
        if DROPOUT:
            weights_t = tl.trans(_dropout_weights(seed_ptr, plane, rows, first_col, dropout_p, keep_scale, BLOCK_N))
            dv = dot((probs_t * weights_t).to(grad_out.dtype), grad_out, dv, NATIVE_DOT, IEEE)
            grad_probs_t = grad_probs_t * weights_t
        else:
            dv = dot(probs_t.to(grad_out.dtype), grad_out, dv, NATIVE_DOT, IEEE)
        grad_scores_t = probs_t * (grad_probs_t - delta[None, :])
        if MASKED:  # a hidden key's NaN/Inf value must not reach dK through 0 * NaN
            grad_scores_t = tl.where(visible, grad_scores_t, 0.0)
        if MASK != 0:
            grad_scores_t = tl.where(bias_t == float("-inf"), 0.0, grad_scores_t)
        dk = dot(grad_scores_t.to(q.dtype), q, dk, NATIVE_DOT, IEEE)
    return dk, dv


@triton.jit
def _attention_backward_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, grad_out_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, mask_ptr, seed_ptr,
    batch_start, seq_q, seq_k, offset, head_dim, group_size, scale_log2, scale, dropout_p, keep_scale,
    q_sb, q_sh, q_ss, q_sd, k_sb, k_sh, k_ss, k_sd, v_sb, v_sh, v_ss, v_sd, do_sb, do_sh, do_ss, do_sd,
    dk_sb, dk_sh, dk_ss, dk_sd, dv_sb, dv_sh, dv_ss, dv_sd, m_sb, m_sh, m_sm, m_sn,
    CAUSAL: tl.constexpr, MASK: tl.constexpr, MASK_ROWS: tl.constexpr, DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, NATIVE_DOT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per key block of one key/value head: dK and dV summed over every query block of every query
    head in the head's group (no atomics)."""
    block_n = tl.program_id(0)
    kv_head = tl.program_id(1).to(tl.int64)
    heads_q = tl.num_programs(1) * group_size
    batch = (batch_start + tl.program_id(2)).to(tl.int64)
    first_col = block_n * BLOCK_N
    cols = first_col + tl.arange(0, BLOCK_N)
    col_ok = cols < seq_k
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    k = _load_tile(k_ptr + batch * k_sb + kv_head * k_sh, cols, col_ok, k_ss, dims, dim_ok, k_sd, UPCAST)
    v = _load_tile(v_ptr + batch * v_sb + kv_head * v_sh, cols, col_ok, v_ss, dims, dim_ok, v_sd, UPCAST)
    k_scaled, factor = _prescaled_query(k, scale_log2, IEEE)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if CAUSAL:
        # Rows before `row_start` see none of this block; rows from `full_start` on see all of it.
        row_start = tl.maximum(first_col - offset, 0) // BLOCK_M * BLOCK_M
        full_start = tl.maximum(tl.cdiv(tl.maximum(first_col + BLOCK_N - 1 - offset, 0), BLOCK_M) * BLOCK_M,
                                row_start)
    else:
        row_start = 0
        full_start = 0
    # A partial last key block keeps the mask for every row.
    full_start = tl.where(first_col + BLOCK_N > seq_k, seq_q, full_start)
    masked_end = tl.minimum(full_start, seq_q)
    for member in range(0, group_size):
        head = kv_head * group_size + member
        q_base = q_ptr + batch * q_sb + head * q_sh
        do_base = grad_out_ptr + batch * do_sb + head * do_sh
        mask_base = mask_ptr + batch * m_sb + head * m_sh
        plane = batch * heads_q + head
        stats = plane * seq_q
        dk, dv = _dkdv_query_blocks(dk, dv, k_scaled, factor, v, q_base, do_base, lse_ptr + stats, delta_ptr + stats,
                                    q_ss, q_sd, do_ss, do_sd, row_start, masked_end, seq_q, cols, col_ok, offset, dims,
                                    dim_ok, mask_base, m_sm, m_sn, seed_ptr, plane, dropout_p, keep_scale, first_col,
                                    True, CAUSAL, MASK, MASK_ROWS, DROPOUT, UPCAST, NATIVE_DOT, IEEE, BLOCK_M,
                                    BLOCK_N)
        dk, dv = _dkdv_query_blocks(dk, dv, k_scaled, factor, v, q_base, do_base, lse_ptr + stats, delta_ptr + stats,
                                    q_ss, q_sd, do_ss, do_sd, full_start, seq_q, seq_q, cols, col_ok, offset, dims,
                                    dim_ok, mask_base, m_sm, m_sn, seed_ptr, plane, dropout_p, keep_scale, first_col,
                                    False, CAUSAL, MASK, MASK_ROWS, DROPOUT, UPCAST, NATIVE_DOT, IEEE, BLOCK_M,
                                    BLOCK_N)
    _store_tile(dk_ptr + batch * dk_sb + kv_head * dk_sh, dk * scale, cols, col_ok, dk_ss, dims, dim_ok, dk_sd)
    _store_tile(dv_ptr + batch * dv_sb + kv_head * dv_sh, dv, cols, col_ok, dv_ss, dims, dim_ok, dv_sd)


@triton.jit
def _dq_key_blocks(dq, q, grad_out, lse, delta, k_base, v_base, k_ss, k_sd, v_ss, v_sd, key_start, key_end, seq_k,
                   rows, row_ok, offset, dims, dim_ok, scale_log2, mask_base, mask_sm, mask_sn, seed_ptr, plane,
                   dropout_p, keep_scale,
                   MASKED: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr, MASK_ROWS: tl.constexpr,
                   DROPOUT: tl.constexpr, UPCAST: tl.constexpr, NATIVE_DOT: tl.constexpr, IEEE: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """Add the key blocks ``[key_start, key_end)`` to a query block's ``dq`` (unscaled); ``MASKED``, ``MASK`` and
    ``DROPOUT`` as in :func:`_online_softmax_blocks` (``dP = (dO V^T) * W``)."""
    q_scaled, factor = _prescaled_query(q, scale_log2, IEEE)  # the scores exactly as the forward pass has them
    for start_n in range(key_start, key_end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < seq_k
        k = _load_tile(k_base, cols, col_ok, k_ss, dims, dim_ok, k_sd, UPCAST)
        v = _load_tile(v_base, cols, col_ok, v_ss, dims, dim_ok, v_sd, UPCAST)
        zeros = tl.zeros((q.shape[0], BLOCK_N), tl.float32)
        scores = dot(q_scaled, tl.trans(k), zeros, NATIVE_DOT, IEEE)
        if not IEEE:
            scores = scores * factor
        if MASK != 0:
            bias = _mask_bias(mask_base, rows, row_ok, cols, col_ok, mask_sm, mask_sn, MASK, MASK_ROWS)
            scores = scores + bias
        probs = tl.exp2(scores - lse[:, None])
        if MASKED:
            visible = col_ok[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None] + offset)
            probs = tl.where(visible, probs, 0.0)
        grad_probs = dot(grad_out, tl.trans(v), zeros, NATIVE_DOT, IEEE)
        if DROPOUT:
            grad_probs = grad_probs * _dropout_weights(seed_ptr, plane, rows, start_n, dropout_p, keep_scale,
                                                       BLOCK_N)
        grad_scores = probs * (grad_probs - delta[:, None])
        if MASKED:
            grad_scores = tl.where(visible, grad_scores, 0.0)
        if MASK != 0:
            grad_scores = tl.where(bias == float("-inf"), 0.0, grad_scores)
        dq = dot(grad_scores.to(k.dtype), k, dq, NATIVE_DOT, IEEE)
    return dq


@triton.jit
def _attention_backward_dq_kernel(
    q_ptr, k_ptr, v_ptr, grad_out_ptr, out_ptr, lse_ptr, delta_ptr, dq_ptr, mask_ptr, seed_ptr,
    batch_start, seq_q, seq_k, offset, head_dim, group_size, scale_log2, scale, dropout_p, keep_scale,
    q_sb, q_sh, q_ss, q_sd, k_sb, k_sh, k_ss, k_sd, v_sb, v_sh, v_ss, v_sd, do_sb, do_sh, do_ss, do_sd,
    o_sb, o_sh, o_ss, o_sd, dq_sb, dq_sh, dq_ss, dq_sd, m_sb, m_sh, m_sm, m_sn,
    CAUSAL: tl.constexpr, MASK: tl.constexpr, MASK_ROWS: tl.constexpr, DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, NATIVE_DOT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per query block: ``delta = rowsum(dO * O)`` (fp32, stored for the dK/dV kernel, which runs
    after this one; with dropout ``O`` is the dropped output, and ``delta_i = sum_j P_ij dP_ij`` still holds) and
    dQ = scale * sum over visible key blocks of dS K."""
    block_m = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    heads_q = tl.num_programs(1)
    batch = (batch_start + tl.program_id(2)).to(tl.int64)
    kv_head = head // group_size
    first_row = block_m * BLOCK_M
    rows = first_row + tl.arange(0, BLOCK_M)
    row_ok = rows < seq_q
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    q = _load_tile(q_ptr + batch * q_sb + head * q_sh, rows, row_ok, q_ss, dims, dim_ok, q_sd, UPCAST)
    grad_out = _load_tile(grad_out_ptr + batch * do_sb + head * do_sh, rows, row_ok, do_ss, dims, dim_ok, do_sd,
                          UPCAST)
    plane = batch * heads_q + head
    stats_base = plane * seq_q
    lse = tl.load(lse_ptr + stats_base + rows, mask=row_ok, other=float("inf"))
    out = _load_tile(out_ptr + batch * o_sb + head * o_sh, rows, row_ok, o_ss, dims, dim_ok, o_sd, True)
    delta = tl.sum(out * grad_out.to(tl.float32), 1)
    tl.store(delta_ptr + stats_base + rows, delta, mask=row_ok)
    k_base = k_ptr + batch * k_sb + kv_head * k_sh
    v_base = v_ptr + batch * v_sb + kv_head * v_sh
    mask_base = mask_ptr + batch * m_sb + head * m_sh
    full_end, key_end = _causal_stages(first_row, offset, seq_k, CAUSAL, BLOCK_M, BLOCK_N)  # as the forward pass
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq = _dq_key_blocks(dq, q, grad_out, lse, delta, k_base, v_base, k_ss, k_sd, v_ss, v_sd, 0, full_end, seq_k,
                        rows, row_ok, offset, dims, dim_ok, scale_log2, mask_base, m_sm, m_sn, seed_ptr, plane,
                        dropout_p, keep_scale, False, CAUSAL, MASK, MASK_ROWS, DROPOUT, UPCAST, NATIVE_DOT, IEEE,
                        BLOCK_N)
    dq = _dq_key_blocks(dq, q, grad_out, lse, delta, k_base, v_base, k_ss, k_sd, v_ss, v_sd, full_end, key_end,
                        seq_k, rows, row_ok, offset, dims, dim_ok, scale_log2, mask_base, m_sm, m_sn, seed_ptr, plane,
                        dropout_p, keep_scale, True, CAUSAL, MASK, MASK_ROWS, DROPOUT, UPCAST, NATIVE_DOT, IEEE,
                        BLOCK_N)
    _store_tile(dq_ptr + batch * dq_sb + head * dq_sh, dq * scale, rows, row_ok, dq_ss, dims, dim_ok, dq_sd)


@triton.jit
def _decode_cache_partial(q, k_base, v_base, k_ss, k_sd, v_ss, v_sd, key_start, key_end, heads, member_ok, dims,
                          dim_ok, scale_log2, UPCAST: tl.constexpr, NATIVE_DOT: tl.constexpr, IEEE: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    """``(acc, row_sum, row_max)`` of stacked query heads over the cached keys ``[key_start, key_end)``."""
    acc = tl.zeros(q.shape, tl.float32)
    row_sum = tl.zeros((q.shape[0],), tl.float32)
    row_max = tl.full((q.shape[0],), float("-inf"), tl.float32)
    acc, row_sum, row_max = _online_softmax_blocks(
        acc, row_sum, row_max, q, k_base, v_base, k_ss, k_sd, v_ss, v_sd, key_start, key_end, key_end, heads,
        member_ok, 0, dims, dim_ok, scale_log2, k_base, 0, 0, k_base, 0, 0.0, 1.0, True, False, 0, False, False,
        UPCAST, NATIVE_DOT, IEEE, BLOCK_N)
    if tl.sum(tl.where(acc != acc, 1, 0)) > 0:  # rare: see _exact_values_pass
        acc, row_sum, row_max = _exact_values_pass(q, scale_log2, k_base, v_base, k_ss, k_sd, v_ss, v_sd, key_start,
                                                   key_end, heads, member_ok, 0, dims, dim_ok, k_base, 0, 0, k_base,
                                                   0, 0.0, 1.0, False, 0, False, False, IEEE)
    return acc, row_sum, row_max


@triton.jit
def _decode_partial_kernel(
    q_ptr, k_ptr, v_ptr, seqlens_ptr, max_ptr, sum_ptr, acc_ptr, k_new_ptr, v_new_ptr,
    batch_start, head_dim, group_size, head_chunks, split_size, num_splits, scale_log2,
    q_sb, q_sh, q_sd, k_sb, k_sh, k_ss, k_sd, v_sb, v_sh, v_ss, v_sd, seqlens_stride,
    kn_sb, kn_sh, kn_sd, vn_sb, vn_sh, vn_sd,
    APPEND: tl.constexpr, UPCAST: tl.constexpr, NATIVE_DOT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Split ``program_id(0)`` of the keys of one sequence, for up to ``BLOCK_H`` query heads sharing one
    key/value head: writes the split's row max, row sum and unnormalized output (fp32).

    ``APPEND``: the split holding position ``n_b = cache_seqlens[b]`` first writes the step's new key/value
    (``k_new``/``v_new``) into the cache at ``n_b``, then attends to ``n_b + 1`` positions like the others."""
    split = tl.program_id(0)
    kv_head = (tl.program_id(1) // head_chunks).to(tl.int64)
    chunk = tl.program_id(1) % head_chunks
    heads_q = tl.num_programs(1) // head_chunks * group_size
    batch = (batch_start + tl.program_id(2)).to(tl.int64)
    members = chunk * BLOCK_H + tl.arange(0, BLOCK_H)
    member_ok = members < group_size
    heads = kv_head * group_size + members
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    q = _load_tile(q_ptr + batch * q_sb, heads, member_ok, q_sh, dims, dim_ok, q_sd, UPCAST)
    seqlen = tl.load(seqlens_ptr + batch * seqlens_stride).to(tl.int32)
    k_base = k_ptr + batch * k_sb + kv_head * k_sh
    v_base = v_ptr + batch * v_sb + kv_head * v_sh
    key_start = split * split_size
    if APPEND:
        if (seqlen >= key_start) & (seqlen < key_start + split_size):
            # The split holding position n_b writes the new key/value there first and then reads it with its
            # other keys (no other split's range reaches n_b). Every head chunk's program of that split writes
            # (the same values), so each reads back at least its own write after the barrier.
            slot = seqlen.to(tl.int64)
            offsets = dims.to(tl.int64)
            k_new = tl.load(k_new_ptr + batch * kn_sb + kv_head * kn_sh + offsets * kn_sd, mask=dim_ok)
            v_new = tl.load(v_new_ptr + batch * vn_sb + kv_head * vn_sh + offsets * vn_sd, mask=dim_ok)
            tl.store(k_base + slot * k_ss + offsets * k_sd, k_new, mask=dim_ok)
            tl.store(v_base + slot * v_ss + offsets * v_sd, v_new, mask=dim_ok)
        tl.debug_barrier()
        seqlen = seqlen + 1
    key_end = tl.minimum(key_start + split_size, seqlen)
    acc, row_sum, row_max = _decode_cache_partial(q, k_base, v_base, k_ss, k_sd, v_ss, v_sd, key_start, key_end,
                                                  heads, member_ok, dims, dim_ok, scale_log2, UPCAST, NATIVE_DOT,
                                                  IEEE, BLOCK_N)
    stats = (batch * heads_q + heads) * num_splits + split
    tl.store(max_ptr + stats, row_max, mask=member_ok)
    tl.store(sum_ptr + stats, row_sum, mask=member_ok)
    _store_tile(acc_ptr, acc, stats, member_ok, head_dim, dims, dim_ok, 1)


@triton.jit
def _decode_combine_kernel(
    max_ptr, sum_ptr, acc_ptr, seqlens_ptr, out_ptr, batch_start, heads_q, head_dim, num_splits, seqlens_stride,
    o_sb, o_sh, o_sd, APPEND: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Merge the splits of ``BLOCK_HEADS`` query heads of one sequence: ``O = sum_s w_s acc_s / sum_s w_s l_s``
    with ``w_s = exp2(m_s - max_s m_s)``; 0 when the sequence is empty, NaN when it is not but every score is
    -inf (the softmax's 0 / 0). The splits are folded one at a time with the same rescaling."""
    heads = tl.program_id(0) * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)
    head_ok = heads < heads_q
    batch = (batch_start + tl.program_id(1)).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    stats = (batch * heads_q + heads) * num_splits
    overall_max = tl.full([BLOCK_HEADS], float("-inf"), tl.float32)
    for split in range(0, num_splits):
        split_max = tl.load(max_ptr + stats + split, mask=head_ok, other=float("-inf"))
        overall_max = tl.maximum(overall_max, split_max)
    safe_max = tl.where(overall_max == float("-inf"), 0.0, overall_max)
    total = tl.zeros([BLOCK_HEADS], tl.float32)
    out = tl.zeros([BLOCK_HEADS, BLOCK_D], tl.float32)
    for split in range(0, num_splits):
        weight = tl.exp2(tl.load(max_ptr + stats + split, mask=head_ok, other=float("-inf")) - safe_max)
        total += weight * tl.load(sum_ptr + stats + split, mask=head_ok, other=0.0)
        acc = _load_tile(acc_ptr, stats + split, head_ok, head_dim, dims, dim_ok, 1, False)
        out += weight[:, None] * acc
    out = out / tl.where(total == 0, 1.0, total)[:, None]
    seqlen = tl.load(seqlens_ptr + batch * seqlens_stride)
    if APPEND:  # the appended key is always there
        has_keys = seqlen >= 0
    else:
        has_keys = seqlen > 0
    out = tl.where(((total == 0) & has_keys)[:, None], float("nan"), out)
    _store_tile(out_ptr + batch * o_sb, out, heads, head_ok, o_sh, dims, dim_ok, o_sd)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
# Tiles (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, by how the dots run ("mma": fp16/bf16 on the tensor
# cores; "fma": fp32 in exact FMA) and BLOCK_D, each a list of (shared memory per CTA it needs, tiles) from the
# largest GPU down: the launcher takes the first entry that fits the device's per-CTA shared memory
# (launch.device_limits: 227 KB on sm_90, 163 KB on sm_80, 99 KB on sm_86/sm_89), so every config fits every
# architecture from sm_80 on. Fitted to the compiled code (genkernels.bench.resources): no spills at 255
# registers, warpgroup MMA on sm_90. Backward follows Triton's fused-attention tutorial: dK/dV keeps a tall key
# block and streams short query blocks, dQ the other way round. The repair kernel's BLOCK_N is unused (it walks the
# keys one at a time); its row block is its own, small enough for several CTAs per SM.
KB = 1024
_ANY = 0
_TILES = {
    "mma": {
        64: {"forward": [(_ANY, (128, 64, 4, 3))],
             "forward_dropout": [(_ANY, (128, 64, 8, 3))],
             "dkdv": [(_ANY, (32, 64, 4, 3))],
             "dq": [(_ANY, (128, 32, 4, 3))],
             "repair": [(_ANY, (32, 0, 4, 1))]},
        128: {"forward": [(160 * KB, (128, 64, 8, 3)), (_ANY, (128, 64, 8, 2))],
              "forward_dropout": [(160 * KB, (128, 32, 8, 3)), (_ANY, (128, 32, 8, 2))],
              "dkdv": [(_ANY, (16, 64, 8, 3))],
              "dq": [(160 * KB, (128, 32, 8, 3)), (_ANY, (128, 32, 8, 2))],
              "repair": [(_ANY, (32, 0, 4, 1))]},
        256: {"forward": [(_ANY, (64, 32, 8, 2))],
              "dkdv": [(_ANY, (16, 32, 8, 2))],
              "dq": [(160 * KB, (64, 32, 8, 2)), (_ANY, (64, 16, 8, 2))],
              "repair": [(_ANY, (16, 0, 4, 1))]},
    },
    "fma": {
        64: {"forward": [(_ANY, (32, 32, 4, 2))],
             "dkdv": [(_ANY, (32, 16, 8, 2))],
             "dq": [(_ANY, (32, 16, 4, 2))],
             "repair": [(_ANY, (32, 0, 8, 1))]},
        128: {"forward": [(_ANY, (16, 32, 8, 2))],
              "dkdv": [(_ANY, (16, 16, 8, 2))],
              "dq": [(_ANY, (16, 32, 8, 2))],
              "repair": [(_ANY, (16, 0, 4, 1))]},
        256: {"forward": [(_ANY, (16, 32, 8, 2))],
              "dkdv": [(_ANY, (16, 16, 8, 2))],
              "dq": [(_ANY, (16, 16, 8, 2))],
              "repair": [(_ANY, (16, 0, 4, 1))]},
    },
}
ATTENTION_KERNELS = ("forward", "repair", "dkdv", "dq")


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def attention_tiles(head_dim: int, dtype: torch.dtype, device: torch.device, dropout: bool = False) -> dict:
    """``{kernel: (BLOCK_M, BLOCK_N, num_warps, num_stages)}`` for flash attention on ``device`` (the first
    entry of :data:`_TILES` that fits its shared memory per CTA; a ``<kernel>_dropout`` entry, where there is one,
    with dropout: its Philox words need registers). Tests force tiles with
    ``launch.force_launch_settings("flash_attention", forward=(...), ...)``."""
    limits = device_limits(device)
    table = _TILES["fma" if dtype == torch.float32 else "mma"][max(64, _block_d(head_dim))]
    chosen = {}
    for kernel in ATTENTION_KERNELS:
        entries = table.get(f"{kernel}_dropout", table[kernel]) if dropout else table[kernel]
        tiles = next(tiles for needed, tiles in entries if limits.shared_memory_per_cta >= needed)
        chosen[kernel] = tuple(launch_setting("flash_attention", kernel, tiles))
    return chosen


def _kernel_flags(dtype: torch.dtype, device: torch.device) -> dict:
    """The dot switches of a launch: fp16/bf16 tiles straight to the tensor cores on a GPU (``NATIVE_DOT``), fp32
    tiles in full fp32 (``IEEE``), bf16 tiles upcast right after loading where the dots are not native (the
    interpreter)."""
    native = native_dot(device)
    return dict(UPCAST=dtype == torch.bfloat16 and not native, NATIVE_DOT=native, IEEE=dtype == torch.float32)


def _score_modifiers(q: torch.Tensor, attn_mask: Optional[torch.Tensor], seed: Optional[torch.Tensor],
                     dropout_p: float) -> tuple[tuple, tuple, tuple, dict]:
    """What the kernels take for an ``attn_mask`` (``[batch, heads_q, seq_q, seq_k]``, broadcast dims with stride
    0) and dropout: ``(pointers, scalars, mask strides, constexprs)``. Without a mask or dropout their pointers are
    ``q`` (never read)."""
    if attn_mask is None:
        mask, strides, kind, per_row = q, (0, 0, 0, 0), 0, False
    else:
        boolean = attn_mask.dtype == torch.bool
        mask = attn_mask.view(torch.uint8) if boolean else attn_mask
        strides = attn_mask.stride()
        kind = 1 if boolean else 2
        per_row = attn_mask.shape[2] > 1 and strides[2] != 0  # else one row per (batch, head): key padding
    dropout = dropout_p > 0
    keep_scale = 1.0 / (1.0 - dropout_p) if dropout_p < 1 else 0.0
    pointers = (mask, seed if dropout else q)
    return pointers, (dropout_p, keep_scale), strides, dict(MASK=kind, MASK_ROWS=per_row, DROPOUT=dropout)


def _causal_offset(seq_q: int, seq_k: int, top_left: bool) -> int:
    """Query ``i`` sees key ``j <= i + offset``: bottom-right aligned ``seq_k - seq_q``, or SDPA's top-left 0."""
    return 0 if top_left else seq_k - seq_q


def _launch_forward(q, k, v, causal: bool, scale: float, attn_mask=None, seed=None, dropout_p: float = 0.0,
                    top_left: bool = False):
    batch, heads_q, seq_q, head_dim = q.shape
    heads_kv, seq_k = k.shape[1], k.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads_q, seq_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    if seq_k == 0:
        return out.zero_(), lse.fill_(float("inf"))
    tiles = attention_tiles(head_dim, q.dtype, q.device, dropout=dropout_p > 0)
    flags = _kernel_flags(q.dtype, q.device)
    block_d = _block_d(head_dim)
    pointers, scalars, mask_strides, modifiers = _score_modifiers(q, attn_mask, seed, dropout_p)
    for start, count in batch_chunks(batch):
        args = (q, k, v, out, lse, *pointers, start, seq_q, seq_k, _causal_offset(seq_q, seq_k, top_left), head_dim,
                heads_q // heads_kv, scale * LOG2_E, *scalars, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                *mask_strides)
        block_m, block_n, num_warps, num_stages = tiles["forward"]
        _attention_forward_kernel[(triton.cdiv(seq_q, block_m), heads_q, count)](
            *args, CAUSAL=causal, **modifiers, **flags, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
            num_warps=num_warps, num_stages=num_stages)
        block_m, _, num_warps, num_stages = tiles["repair"]
        _attention_forward_repair_kernel[(triton.cdiv(seq_q, block_m), heads_q, count)](
            *args, CAUSAL=causal, **modifiers, UPCAST=flags["UPCAST"], IEEE=flags["IEEE"], BLOCK_M=block_m,
            BLOCK_D=block_d, num_warps=num_warps, num_stages=num_stages)
    return out, lse


def _launch_backward(grad_out, q, k, v, out, lse, causal: bool, scale: float, attn_mask=None, seed=None,
                     dropout_p: float = 0.0, top_left: bool = False):
    batch, heads_q, seq_q, head_dim = q.shape
    heads_kv, seq_k = k.shape[1], k.shape[2]
    dq = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
    if q.numel() == 0 or k.numel() == 0:
        return dq, dk, dv
    tiles = attention_tiles(head_dim, q.dtype, q.device, dropout=dropout_p > 0)
    # delta_i = sum_d dO_id O_id, written by the dQ kernel (which holds dO's rows anyway) for the dK/dV kernel
    delta = torch.empty((batch, heads_q, seq_q), dtype=torch.float32, device=q.device)
    pointers, scalars, mask_strides, modifiers = _score_modifiers(q, attn_mask, seed, dropout_p)
    flags = dict(CAUSAL=causal, **modifiers, **_kernel_flags(q.dtype, q.device), BLOCK_D=_block_d(head_dim))
    sizes = (seq_q, seq_k, _causal_offset(seq_q, seq_k, top_left), head_dim, heads_q // heads_kv, scale * LOG2_E,
             scale, *scalars)
    for start, count in batch_chunks(batch):
        block_m, block_n, num_warps, num_stages = tiles["dq"]
        _attention_backward_dq_kernel[(triton.cdiv(seq_q, block_m), heads_q, count)](
            q, k, v, grad_out, out, lse, delta, dq, *pointers, start, *sizes, *q.stride(), *k.stride(), *v.stride(),
            *grad_out.stride(), *out.stride(), *dq.stride(), *mask_strides,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, **flags)
        block_m, block_n, num_warps, num_stages = tiles["dkdv"]
        _attention_backward_dkdv_kernel[(triton.cdiv(seq_k, block_n), heads_kv, count)](
            q, k, v, grad_out, lse, delta, dk, dv, *pointers, start, *sizes, *q.stride(), *k.stride(), *v.stride(),
            *grad_out.stride(), *dk.stride(), *dv.stride(), *mask_strides,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, **flags)
    return dq, dk, dv


# Flash-decoding. The query heads of one key/value head are stacked into the rows of the partial kernel's dots:
# for fp16/bf16, 64 rows on sm_90 (warpgroup MMA takes M = 64 per warpgroup; the rows past the group are padding,
# free in a kernel bound by reading the cache) and 16 elsewhere (mma.sync's M); fp32 (exact FMA) takes 16. A group
# larger than that runs in chunks. Keys per block and pipeline stages by dot kind and BLOCK_D (fitting 99 KB per
# CTA). The CTAs per SM that the split plan sizes its grid with model the compiled partial kernel, whose limit is
# its shared memory (report: genkernels.bench.resources).
DECODE_MAX_SPLITS = 128
DECODE_SPLIT_OVERHEAD_BLOCKS = 2  # what a split costs beyond its key blocks (prologue, partials, combine), in blocks
# (dot kind, BLOCK_D): BLOCK_N, num_stages, num_warps, and the registers per thread of the compiled partial kernel
# at 64 stacked rows on sm_90 (triton 3.6-3.9; the CTAs-per-SM model below reads them)
_DECODE_TILES = {
    ("mma", 64): (64, 3, 4, 168), ("mma", 128): (64, 3, 4, 255), ("mma", 256): (32, 2, 8, 255),
    ("fma", 64): (32, 2, 4, 176), ("fma", 128): (16, 2, 4, 255), ("fma", 256): (16, 2, 4, 255),
}


def decode_tiles(head_dim: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int, int, int]:
    """``(BLOCK_H, BLOCK_N, num_stages, num_warps, registers)`` of the decode partial kernel."""
    fma = dtype == torch.float32
    block_h = 16 if fma or device_limits(device).arch < 90 else 64
    return (block_h, *_DECODE_TILES[("fma" if fma else "mma", max(64, _block_d(head_dim)))])


def decode_ctas_per_sm(limits, block_h: int, block_n: int, block_d: int, num_stages: int, num_warps: int,
                       registers: int, element_size: int) -> int:
    """CTAs of the decode partial kernel resident per SM, as the compiled kernel's resources give them: its shared
    memory (the query rows and the pipelined key and value blocks: ``num_stages`` buffers on sm_90, one fewer
    before) and its registers (allocated per warp in units of 256)."""
    buffers = num_stages if limits.arch >= 90 else max(1, num_stages - 1)
    smem = (2 * buffers * block_n + block_h) * block_d * element_size + 1024
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = limits.registers_per_sm // (per_warp * num_warps)
    return max(1, min(limits.max_ctas_per_sm, limits.shared_memory_per_sm // smem, by_registers))


@functools.lru_cache(maxsize=4096)
def decode_split_plan(pairs: int, max_seq: int, block_n: int, slots: int) -> tuple[int, int]:
    """``(num_splits, split_size)`` for ``pairs`` (batch x key/value head chunks) sequences of ``max_seq`` keys on
    a GPU holding ``slots`` partial-kernel CTAs at once (SMs x CTAs per SM): the split, in whole ``block_n``
    blocks, that minimizes ``waves x (blocks per split + DECODE_SPLIT_OVERHEAD_BLOCKS)``, so the grid comes out as
    whole waves (a lone long sequence is split across the GPU; a large batch is not split at all)."""
    blocks = max(1, triton.cdiv(max_seq, block_n))
    best = None
    for wanted in range(1, min(blocks, DECODE_MAX_SPLITS) + 1):
        per_split = triton.cdiv(blocks, wanted)
        splits = triton.cdiv(blocks, per_split)
        cost = (triton.cdiv(pairs * splits, slots) * (per_split + DECODE_SPLIT_OVERHEAD_BLOCKS), splits)
        if best is None or cost < best[0]:
            best = (cost, splits, per_split)
    _, splits, per_split = best
    return splits, per_split * block_n


def _launch_decode(q, k_cache, v_cache, cache_seqlens, scale: float, k_new=None, v_new=None):
    """Flash-decoding; with ``k_new``/``v_new`` (``[batch, heads_kv, 1, head_dim]``) they are written into the
    caches at ``cache_seqlens[b]`` by the split holding that position, which then attends to them."""
    batch, heads_q, _, head_dim = q.shape
    heads_kv, max_seq = k_cache.shape[1], k_cache.shape[2]
    append = k_new is not None
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if max_seq == 0:
        return out.zero_()
    limits = device_limits(q.device)
    block_d = _block_d(head_dim)
    block_h, block_n, num_stages, num_warps, registers = decode_tiles(head_dim, q.dtype, q.device)
    block_h = launch_setting("decode_attention", "block_h", block_h)
    group_size = heads_q // heads_kv
    head_chunks = triton.cdiv(group_size, block_h)
    per_sm = decode_ctas_per_sm(limits, block_h, block_n, block_d, num_stages, num_warps, registers,
                                q.element_size())
    num_splits, split_size = launch_setting("decode_attention", "split", None) or decode_split_plan(
        batch * heads_kv * head_chunks, max_seq, block_n, limits.sm_count * per_sm)
    if not append:
        k_new = v_new = q  # never read
    split_max = torch.empty((batch, heads_q, num_splits), dtype=torch.float32, device=q.device)
    split_sum = torch.empty_like(split_max)
    split_acc = torch.empty((batch, heads_q, num_splits, head_dim), dtype=torch.float32, device=q.device)
    # the combine kernel: a few heads per program, so that its output rows go out 16 bytes per thread
    combine_heads = max(1, min(triton.next_power_of_2(heads_q), 256 // block_d))
    for start, count in batch_chunks(batch):
        _decode_partial_kernel[(num_splits, heads_kv * head_chunks, count)](
            q, k_cache, v_cache, cache_seqlens, split_max, split_sum, split_acc, k_new, v_new, start, head_dim,
            group_size, head_chunks, split_size, num_splits, scale * LOG2_E,
            q.stride(0), q.stride(1), q.stride(3), *k_cache.stride(), *v_cache.stride(), cache_seqlens.stride(0),
            k_new.stride(0), k_new.stride(1), k_new.stride(3), v_new.stride(0), v_new.stride(1), v_new.stride(3),
            APPEND=append, **_kernel_flags(q.dtype, q.device), BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_D=block_d,
            num_warps=num_warps, num_stages=num_stages)
        _decode_combine_kernel[(triton.cdiv(heads_q, combine_heads), count)](
            split_max, split_sum, split_acc, cache_seqlens, out, start, heads_q, head_dim, num_splits,
            cache_seqlens.stride(0), out.stride(0), out.stride(1), out.stride(3), APPEND=append,
            BLOCK_HEADS=combine_heads, BLOCK_D=block_d, num_warps=1)
    return out


# ----------------------------------------------------------------------------------------------------------------
# torch.library registration (usable under torch.compile(fullgraph=True))
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("genkernels::flash_attention_forward", mutates_args=())
def _flash_attention_forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                                softmax_scale: float, attn_mask: Optional[torch.Tensor] = None,
                                seed: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                                top_left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and base-2 logsumexp. ``attn_mask``: bool or additive ``[batch, heads_q, seq_q, seq_k]`` (broadcast
    dims stride 0); ``seed``: the int64 Philox key of the dropout mask (read when ``dropout_p > 0``);
    ``top_left``: the causal mask aligned as SDPA's (query ``i`` sees keys ``j <= i``)."""
    return _launch_forward(q, k, v, causal, softmax_scale, attn_mask, seed, dropout_p, top_left)


@_flash_attention_forward_op.register_fake
def _flash_attention_forward_fake(q, k, v, causal, softmax_scale, attn_mask=None, seed=None, dropout_p=0.0,
                                  top_left=False):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("genkernels::flash_attention_backward", mutates_args=())
def _flash_attention_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 out: torch.Tensor, lse: torch.Tensor, causal: bool, softmax_scale: float,
                                 attn_mask: Optional[torch.Tensor] = None, seed: Optional[torch.Tensor] = None,
                                 dropout_p: float = 0.0,
                                 top_left: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_backward(grad_out, q, k, v, out, lse, causal, softmax_scale, attn_mask, seed, dropout_p, top_left)


@_flash_attention_backward_op.register_fake
def _flash_attention_backward_fake(grad_out, q, k, v, out, lse, causal, softmax_scale, attn_mask=None, seed=None,
                                   dropout_p=0.0, top_left=False):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _flash_attention_setup_context(ctx, inputs, output):
    q, k, v, causal, softmax_scale, attn_mask, seed, dropout_p, top_left = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, attn_mask, seed)
    ctx.causal, ctx.softmax_scale, ctx.dropout_p, ctx.top_left = causal, softmax_scale, dropout_p, top_left


def _flash_attention_backward(ctx, grad_out, grad_lse):
    """Gradients of q, k, v (the mask gets none: the public functions route a mask that requires grad away from
    the kernels)."""
    q, k, v, out, lse, attn_mask, seed = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.genkernels.flash_attention_backward(grad_out, q, k, v, out, lse, ctx.causal,
                                                               ctx.softmax_scale, attn_mask, seed, ctx.dropout_p,
                                                               ctx.top_left)
    return dq, dk, dv, None, None, None, None, None, None


_flash_attention_forward_op.register_autograd(_flash_attention_backward, setup_context=_flash_attention_setup_context)


@torch.library.custom_op("genkernels::decode_attention", mutates_args=())
def _decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                         softmax_scale: float) -> torch.Tensor:
    return _launch_decode(q, k_cache, v_cache, cache_seqlens, softmax_scale)


@_decode_attention_op.register_fake
def _decode_attention_fake(q, k_cache, v_cache, cache_seqlens, softmax_scale):
    return q.new_empty(q.shape)


@torch.library.custom_op("genkernels::decode_attention_append", mutates_args=("k_cache", "v_cache"))
def _decode_attention_append_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                cache_seqlens: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                softmax_scale: float) -> torch.Tensor:
    """:func:`decode_attention` that first appends ``k``/``v`` to the caches at ``cache_seqlens`` (in place)."""
    return _launch_decode(q, k_cache, v_cache, cache_seqlens, softmax_scale, k, v)


@_decode_attention_append_op.register_fake
def _decode_attention_append_fake(q, k_cache, v_cache, cache_seqlens, k, v, softmax_scale):
    return q.new_empty(q.shape)


# ----------------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------------
def _check_rank4(tensor: torch.Tensor, name: str, layout: str) -> None:
    if tensor.dim() != 4:
        raise ValueError(f"{name} must have 4 dimensions {layout}; got {describe(tensor)}")


def _check_heads_and_dims(q, q_name, k, k_name, v, v_name) -> None:
    """Shared shape rules of both ops: ``k`` with q's batch and head_dim, ``v`` with k's shape, and heads_kv
    dividing heads_q (both may be 0). Each message names the argument that breaks the rule."""
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"{k_name} must have the batch size of {q_name} ({q.shape[0]}); got {describe(k)}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"{k_name} must have the head_dim of {q_name} ({q.shape[3]}, its last dimension); got "
                         f"{describe(k)}")
    if v.shape != k.shape:
        raise ValueError(f"{v_name} must have the shape of {k_name} {list(k.shape)}; got {describe(v)}")
    heads_q, heads_kv = q.shape[1], k.shape[1]
    if (heads_kv == 0 and heads_q != 0) or (heads_kv != 0 and heads_q % heads_kv != 0):
        raise ValueError(f"the heads of {q_name} ({heads_q}) must be a multiple of the heads of {k_name} "
                         f"({heads_kv}); got {q_name} {describe(q)} and {k_name} {describe(k)}")


def _kernel_reasons(q: torch.Tensor, q_name: str) -> list[str]:
    """Why the kernels cannot take these inputs (for :func:`runtime.choose_impl`); [] when they can."""
    head_dim = q.shape[3]
    if q.device.type != "meta" and not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        return [f"head_dim (last dimension of {q_name}) is {head_dim}: the kernels take head dims in "
                f"[{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]"]
    return []


def _check_scale(softmax_scale: object, head_dim) -> float:
    if softmax_scale is None:
        return default_scale(head_dim)
    return check_real(softmax_scale, "softmax_scale")


def _check_qkv(q, k, v, names) -> torch.device:
    for tensor, name in zip((q, k, v), names):
        check_float_tensor(tensor, name)
    for tensor, name in zip((q, k, v), names):
        _check_rank4(tensor, name, "[batch, heads, seq, head_dim]")
    check_same_dtype(q, names[0], k, names[1])
    check_same_dtype(q, names[0], v, names[2])
    return check_same_device(zip(names, (q, k, v)))


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    softmax_scale: Optional[float] = None, impl: str = "auto") -> torch.Tensor:
    """Exact softmax attention, fused (FlashAttention-2): ``softmax(scale * Q K^T + mask) V``.

    The ``[seq_q, seq_k]`` score matrix is never stored: forward keeps an online softmax per query block, backward
    recomputes the probabilities from the stored logsumexp (memory linear in the sequence length).

    Args:
        q: ``[batch, heads_q, seq_q, head_dim]``, fp32/fp16/bf16/fp64, any strides (expanded ones included).
        k, v: ``[batch, heads_kv, seq_k, head_dim]`` with ``heads_q % heads_kv == 0`` (GQA / MQA), q's dtype.
        causal: hide key ``j`` from query ``i`` unless ``j <= i + seq_k - seq_q`` (bottom-right aligned; SDPA's
            ``is_causal`` for equal lengths).
        softmax_scale: multiplies ``Q K^T``; default ``1/sqrt(head_dim)``.
        impl: "auto", "triton" or "eager". The kernels take fp32/fp16/bf16 and head dims in [16, 256]; other
            inputs (fp64, other head dims) run the eager reference under "auto" and raise ``ValueError`` listing
            the reasons under "triton".

    Returns:
        ``[batch, heads_q, seq_q, head_dim]`` in q's dtype (softmax in fp32); differentiable in q, k, v.
        Any size may be 0 (the shapes SDPA gives).

    NaN/Inf (both impls; softmax attention over the keys each row sees, in fp64): a NaN in a query row, in a key
    it sees or a ``+inf`` score makes that output row NaN; a NaN/Inf value reaches the rows that see its key as
    ``P @ V`` gives it (``+-inf``, NaN for ``0 * inf`` or ``inf - inf``); a row whose visible scores are all
    ``-inf`` (an Inf query) is NaN, softmax's ``0 / 0`` (``F.scaled_dot_product_attention`` returns 0 there, its
    ``_safe_softmax``, which hides the Inf). A row that sees no key (``seq_k = 0``, or hidden by the causal mask)
    gives zeros whatever ``q`` holds, as SDPA gives for a finite query. Keys a row does not see never reach it,
    not even their NaN/Inf: here SDPA's backends differ (its math backend adds the mask, so a hidden NaN key or
    value turns every row NaN; its CPU flash backend does so for the rows of its tile). Gradients of non-finite
    inputs are not specified.
    """
    _check_qkv(q, k, v, ("q", "k", "v"))
    _check_heads_and_dims(q, "q", k, "k", v, "v")
    check_bool(causal, "causal")
    scale = _check_scale(softmax_scale, q.shape[3])
    impl = choose_impl(impl, "flash_attention", {"q": q, "k": k, "v": v}, _kernel_reasons(q, "q"))
    if impl == "eager":
        return attention_reference(q, k, v, causal, scale)
    out, _ = torch.ops.genkernels.flash_attention_forward(q, k, v, causal, scale)
    return out


def _check_cache_seqlens(cache_seqlens: object, batch: int, max_seq: int, device: torch.device) -> torch.Tensor:
    """An int32/int64 tensor ``[batch]`` on the caches' device with values in ``[0, max_seq]``: checked on the
    host for CPU values, asserted asynchronously on the GPU (the kernel never reads past ``max_seq`` whatever the
    values), not at all for ``meta`` tensors."""
    seqlens = check_tensor(cache_seqlens, "cache_seqlens")
    if seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cache_seqlens must be an int32 or int64 tensor; got {describe(seqlens)}")
    if seqlens.dim() != 1 or seqlens.shape[0] != batch:
        raise ValueError(f"cache_seqlens must have shape [batch] = [{batch}]; got {describe(seqlens)}")
    if seqlens.device != device:
        raise ValueError(f"cache_seqlens must be on the caches' device ({device}); got {describe(seqlens)}")
    check_in_range(seqlens, "cache_seqlens", 0, max_seq, high_inclusive=True)
    return seqlens


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                     *, k: Optional[torch.Tensor] = None, v: Optional[torch.Tensor] = None,
                     softmax_scale: Optional[float] = None, impl: str = "auto") -> torch.Tensor:
    """Attention of one new query token per sequence over a KV cache (flash-decoding).

        O_b = softmax(scale * q_b K_b[:n_b]^T) V_b[:n_b],   n_b = cache_seqlens[b]

    The cached keys are split across programs (each computes a partial softmax over its run of keys), and a
    second kernel merges the splits, so a batch of one long sequence still fills the GPU. Inference only (no
    backward).

    With ``k`` and ``v`` (the step's new key and value, ``[batch, heads_kv, 1, head_dim]``) they are first
    written into the caches at position ``n_b`` of each sequence, in place, and attended to with the cached ones
    (``n_b + 1`` positions), as flash-attn's ``flash_attn_with_kvcache`` does: the write happens inside the
    decode launch (no copy kernel), so sequences of different lengths append each at its own position.
    ``cache_seqlens`` itself is not changed (the caller advances it), and needs ``n_b < max_seq``.

    Args:
        q: ``[batch, heads_q, 1, head_dim]``, fp32/fp16/bf16/fp64, any strides.
        k_cache, v_cache: ``[batch, heads_kv, max_seq, head_dim]`` with ``heads_q % heads_kv == 0``, any strides
            (expanded heads included).
        cache_seqlens: int32/int64 ``[batch]``, how many cached positions each sequence attends to, in
            ``[0, max_seq]`` (``[0, max_seq)`` with ``k``/``v``; a host ``ValueError`` for CPU tensors, an
            asynchronous device assert on a GPU).
        k, v: optional, both or neither: ``[batch, heads_kv, 1, head_dim]`` of q's dtype and device, any strides;
            the caches must then be writable (no expanded, stride-0 dimension).
        softmax_scale: default ``1/sqrt(head_dim)``.
        impl: "auto", "triton" or "eager" (fp64 and head dims outside [16, 256] as in :func:`flash_attention`).

    Returns:
        ``[batch, heads_q, 1, head_dim]`` in q's dtype.

    Cache slots from ``n_b`` on are never read (the kernel masks their loads, the eager reference selects them
    away): NaN/Inf stored there cannot reach the output. A sequence with ``n_b = 0`` (an empty cache) returns
    zeros whatever ``q`` holds (SDPA over zero keys gives zeros too, but turns its whole output NaN when any query
    entry is NaN/Inf). NaN/Inf in ``q`` or in the filled slots as in :func:`flash_attention`: NaN where softmax
    attention over the first ``n_b`` positions gives NaN, including a query whose scores are all ``-inf``.
    """
    device = _check_qkv(q, k_cache, v_cache, ("q", "k_cache", "v_cache"))
    if q.shape[2] != 1:
        raise ValueError(f"q must hold one query token per sequence, [batch, heads_q, 1, head_dim]; got {describe(q)}")
    _check_heads_and_dims(q, "q", k_cache, "k_cache", v_cache, "v_cache")
    append = _check_appended(k, v, k_cache, v_cache)
    seqlens = _check_cache_seqlens(cache_seqlens, q.shape[0], k_cache.shape[2] - append, device)
    scale = _check_scale(softmax_scale, q.shape[3])
    impl = choose_impl(impl, "decode_attention", {"q": q, "k_cache": k_cache, "v_cache": v_cache, "k": k, "v": v},
                       _kernel_reasons(q, "q"))
    if impl == "eager":
        if append:
            _append_to_caches(k_cache, v_cache, seqlens, k, v)
            seqlens = seqlens + 1
        return decode_attention_reference(q, k_cache, v_cache, seqlens, scale)
    if append:
        return torch.ops.genkernels.decode_attention_append(q, k_cache, v_cache, seqlens, k, v, scale)
    return torch.ops.genkernels.decode_attention(q, k_cache, v_cache, seqlens, scale)


def _check_appended(k, v, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether a new key/value is appended: both given (each ``[batch, heads_kv, 1, head_dim]`` of the caches'
    dtype and device) with writable caches, or neither."""
    if (k is None) != (v is None):
        raise ValueError(f"k and v must be given together (the step's new key and value); got k "
                         f"{'None' if k is None else describe(k)} and v {'None' if v is None else describe(v)}")
    if k is None:
        return False
    expected = (k_cache.shape[0], k_cache.shape[1], 1, k_cache.shape[3])
    for tensor, name in ((k, "k"), (v, "v")):
        check_float_tensor(tensor, name)
        check_same_dtype(k_cache, "k_cache", tensor, name)
        if tuple(tensor.shape) != expected or tensor.device != k_cache.device:
            raise ValueError(f"{name} must be [batch, heads_kv, 1, head_dim] = {list(expected)} on {k_cache.device} "
                             f"(one new position per sequence); got {describe(tensor)}")
    for cache, name in ((k_cache, "k_cache"), (v_cache, "v_cache")):
        if any(stride == 0 and size > 1 for size, stride in zip(cache.shape, cache.stride())):
            raise ValueError(f"{name} must be writable to append k/v: it has an expanded (stride-0) dimension; got "
                             f"{describe(cache)}")
    if k_cache.shape[2] == 0:
        raise ValueError(f"k_cache has no position to append k/v to (max_seq = 0); got {describe(k_cache)}")
    return True


def _append_to_caches(k_cache, v_cache, seqlens, k, v) -> None:
    """The eager append: ``cache[b, :, n_b] = new[b, :, 0]`` for every sequence ``b``, in place."""
    rows = torch.arange(k_cache.shape[0], device=k_cache.device)
    positions = seqlens.long()
    k_cache[rows, :, positions] = k[:, :, 0]
    v_cache[rows, :, positions] = v[:, :, 0]
