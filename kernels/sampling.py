"""Fused categorical sampling: one class per row of a ``[rows, classes]`` logit matrix, with temperature, top-k
and top-p (nucleus) filtering, in a bounded number of passes over each row and no sort.

The draw is Gumbel-max (Gumbel 1954; Maddison et al. 2014, "A* sampling"): for ``z_c = (x_c - max_j x_j) / T``
and independent ``g_c = -log(-log(u_c))``, ``u_c ~ U(0, 1)``,

    argmax_c (z_c + g_c)  ~  softmax(z) = softmax(x / T),

and restricted to a kept set ``K`` (the argmax taken over ``c in K`` only) it draws from ``softmax(z)``
renormalized on ``K``. The uniforms come from Philox-4x32-10 inside the kernel, keyed by a device-side int64 seed,
at counter ``(c div 4, row, offset mod 2^32, offset div 2^32)``, class ``c`` taking word ``c mod 4`` (Triton's
``uint_to_uniform_float``, as :func:`genkernels.kernels.philox.philox_uniform_grid` lays them out): a row's draw
depends on the seed, its row index and the caller's ``offset`` (e.g. a generation step), never on the launch.

Kept sets, decided on the logits' values (so equal logits are always kept or dropped together):

* top-k (Hugging Face's ``TopKLogitsWarper``): ``x_c >= t_k``, ``t_k`` the k-th largest logit (counted with
  multiplicity; every class tied with it is kept, so more than ``k`` may be).
* top-p (``TopPLogitsWarper``, applied after top-k on the renormalized distribution): the classes whose logit
  exceeds ``x_c`` carry less than ``p`` of the mass. Hugging Face sorts and keeps the smallest prefix reaching
  ``p``; here ties at the threshold are all kept (a superset of Hugging Face's set by the tied classes only).

The kernel finds the thresholds by radix search on the logits' order-preserving 32-bit keys, four bits per pass:
eight passes count the classes (top-k) or sum their ``exp(z)`` mass (top-p) at or above fifteen candidate
thresholds at once. Passes per row: 1 (greedy), 2 (plain sampling: the row maximum, then the draw), +8 (top-k),
+9 (top-p: its normalizer, then the search).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .checks import (
    check_float_tensor,
    check_generator,
    check_int,
    check_real,
    check_seed_tensor,
    describe,
)
from .launch import capturing, device_limits, draw_philox_seed, launch_setting
from .philox import MASK32, philox4x32, uint_to_uniform
from .runtime import choose_impl, compute_dtype, interpreter_enabled

# Uniforms are clamped from below so that every Gumbel draw is finite: the row maximum's score then always beats
# the -inf of the dropped classes, and a row with one allowed class draws it (the kernel reads the same constant).
MIN_UNIFORM = 1.0e-20
_MIN_UNIFORM = tl.constexpr(MIN_UNIFORM)
INVALID_ROW = -1  # the result of a row without a distribution
FLOAT32_TINY = 1.0e-45  # the smallest fp32 subnormal (rounds to 2^-149)
FLOAT32_MAX = 3.4028234663852886e38


# ----------------------------------------------------------------------------------------------------------------
# Eager reference: the specification, the fallback and the test oracle
# ----------------------------------------------------------------------------------------------------------------
def philox_class_uniforms(seed: torch.Tensor, offset: int, rows: int, classes: int) -> torch.Tensor:
    """fp32 uniforms ``[rows, classes]`` in [0, 1): element ``(r, c)`` is word ``c mod 4`` of Philox-4x32-10
    keyed by ``seed`` (a one-element int64 tensor) at counter ``(c div 4, r, offset mod 2^32, offset div 2^32)``,
    the uniforms the sampling kernel draws."""
    seed = seed.reshape(()).to(torch.int64)
    device = seed.device
    groups = -(-classes // 4)
    key = (seed & MASK32, (seed >> 32) & MASK32)
    group = torch.arange(groups, dtype=torch.int64, device=device).reshape(1, groups)
    row = torch.arange(rows, dtype=torch.int64, device=device).reshape(rows, 1)
    offset_words = [torch.full((), word, dtype=torch.int64, device=device) for word in _offset_words(offset)]
    words = philox4x32((group, row, *offset_words), key)
    words = torch.stack([torch.broadcast_to(w, (rows, groups)) for w in words], dim=-1)
    return uint_to_uniform(words.reshape(rows, 4 * groups)[:, :classes])


def _offset_words(offset: int) -> tuple[int, int]:
    """The two 32-bit counter words of ``offset`` (low, high)."""
    return offset & MASK32, offset >> 32


def sample_categorical_reference(logits: torch.Tensor, seed: Optional[torch.Tensor], offset: int,
                                 inv_temperature: float, greedy: bool, top_k: Optional[int],
                                 top_p: Optional[float]) -> torch.Tensor:
    """One class per row in plain PyTorch, from the kernel's Philox uniforms: int64 ``[rows]``, ``-1`` for a row
    with a NaN or +inf logit or no logit above -inf.

    ``greedy``: ``argmax_c x_c`` (the lowest index among ties). Otherwise, with ``m = max_c x_c``,
    ``z_c = (x_c - m) * inv_temperature`` (0 at the maximum itself, so an infinite ``inv_temperature`` is safe),
    ``g_c = -log(-log(max(u_c, 1e-20)))`` and the kept set ``K = {c : x_c >= t}``::

        t_k = k-th largest x                                   (top-k; else -inf)
        t   = the largest x_c whose mass at or above it, sum_{j: x_j >= x_c, x_j >= t_k} exp(z_j),
              reaches p * sum_{j: x_j >= t_k} exp(z_j)       (top-p; else t_k)
        sample = argmax_{c in K} (z_c + g_c)

    ``-0.0`` logits are read as ``+0.0``. Math in fp32 (fp64 for fp64 logits; the uniforms stay fp32)."""
    dtype = compute_dtype(logits.dtype)
    x = logits.to(dtype)
    x = torch.where(x == 0, torch.zeros_like(x), x)
    rows, classes = x.shape
    valid = ~(torch.isnan(x) | (x == math.inf)).any(dim=1) & (x > -math.inf).any(dim=1)
    x = torch.where(valid[:, None], x, torch.zeros_like(x))  # a stand-in; these rows return -1
    if greedy:
        return torch.where(valid, x.argmax(dim=1), INVALID_ROW)
    top = x.amax(dim=1, keepdim=True)
    z = torch.where(x == top, torch.zeros_like(x), (x - top) * inv_temperature)
    threshold = torch.full_like(top, -math.inf)
    if top_k is not None:
        threshold = x.topk(top_k, dim=1).values[:, -1:]
    if top_p is not None:
        mass = torch.where(x >= threshold, z.exp(), torch.zeros_like(z))
        target = top_p * mass.sum(dim=1, keepdim=True)
        values, order = x.sort(dim=1, descending=True)
        reached = mass.gather(1, order).cumsum(dim=1) >= target
        first = (~reached).sum(dim=1, keepdim=True).clamp(max=classes - 1)
        threshold = values.gather(1, first)
    uniform = philox_class_uniforms(seed, offset, rows, classes)
    gumbel = -torch.log(-torch.log(uniform.clamp(min=MIN_UNIFORM)))
    score = torch.where(x >= threshold, z + gumbel, -math.inf)
    return torch.where(valid, score.argmax(dim=1), INVALID_ROW)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _load_tile(logits_ptr, row_offsets, lead, row_mask, start, num_classes, stride_class, BLOCK: tl.constexpr,
               VECTOR: tl.constexpr):
    """Tile ``start`` of this program's rows: the class of its first element per row, the mask of the elements
    that are classes of their row, and their logits in fp32 (-inf elsewhere, ``-0.0`` read as ``+0.0``).

    ``VECTOR == 0``: the tile is classes ``start .. start + BLOCK - 1`` (any class stride). Otherwise (contiguous
    classes, a 16-byte-aligned tensor, ``VECTOR`` elements per 16 bytes) it is positions ``start ..`` counted
    from each row's start rounded down by its ``lead`` (``row offset mod VECTOR``), read as whole 16-byte
    vectors: a row whose start or end is not on a 16-byte boundary also reads up to ``VECTOR - 1`` elements of
    its neighbours, or past the tensor's last element within that element's own aligned 16 bytes (no page
    boundary splits them), and masks those out. Rows of 50257 fp32 classes then load 16 bytes per thread."""
    position = start + tl.arange(0, BLOCK)
    if VECTOR == 0:
        first = tl.zeros_like(row_offsets) + start
        mask = row_mask[:, None] & (position < num_classes)[None, :]
        pointers = logits_ptr + row_offsets[:, None] + position.to(tl.int64)[None, :] * stride_class
        x = tl.load(pointers, mask=mask, other=float("-inf")).to(tl.float32)
    else:
        first = start - lead
        vectors = (position // VECTOR) * VECTOR  # the read mask is constant over each 16-byte vector
        read = row_mask[:, None] & (vectors[None, :] < (lead + num_classes)[:, None])
        base = tl.multiple_of(row_offsets - lead, VECTOR)
        x = tl.load(logits_ptr + base[:, None] + position[None, :], mask=read, other=float("-inf"))
        classes = position[None, :] - lead[:, None]
        mask = read & (classes >= 0) & (classes < num_classes)
        x = tl.where(mask, x.to(tl.float32), float("-inf"))
    return first, mask, tl.where(x == 0.0, 0.0, x)


@triton.jit
def _ordered_key(x):
    """int64 keys in [0, 2^32) whose order is the order of the fp32 values ``x`` (no NaN): the sign bit flips the
    other bits of negative values, and the int32 result is shifted by 2^31, the range the radix search walks."""
    bits = x.to(tl.int32, bitcast=True)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64) + 2147483648


@triton.jit
def _scaled(x, row_max, inv_temperature):
    """``z = (x - max) * inv_temperature``, exactly 0 at the maximum (never ``0 * inf``); rows without a finite
    maximum (padding rows, rows returning -1) shift by 0 instead of computing ``-inf - -inf``."""
    shift = tl.where(row_max > float("-inf"), row_max, 0.0)[:, None]
    return tl.where(x == shift, 0.0, (x - shift) * inv_temperature)


@triton.jit
def _radix_threshold(logits_ptr, row_offsets, lead, row_mask, num_classes, span, stride_class, row_max,
                     inv_temperature, floor, target, WEIGHTED: tl.constexpr, ROWS: tl.constexpr,
                     BLOCK: tl.constexpr, VECTOR: tl.constexpr):
    """The largest key ``t`` with ``F(t) >= target`` per row, ``F(t)`` the number (``WEIGHTED`` off) or the
    ``exp(z)`` mass (on) of the classes with key ``>= t`` among those with key ``>= floor``. ``F`` does not
    increase with ``t``, so four bits at a time are fixed from the top: each pass evaluates ``F`` at the sixteen
    thresholds ``prefix + d * 2^shift`` and keeps the largest ``d`` that still reaches ``target``."""
    DIGITS: tl.constexpr = 16
    digits = tl.arange(0, DIGITS).to(tl.int64)
    prefix = tl.zeros((ROWS,), tl.int64)
    for level in tl.static_range(8):
        shift = 28 - 4 * level
        candidates = prefix[:, None] + (digits << shift)[None, :]
        reach = tl.zeros((ROWS, DIGITS), tl.float32)
        for start in range(0, span, BLOCK):
            _, mask, x = _load_tile(logits_ptr, row_offsets, lead, row_mask, start, num_classes, stride_class,
                                    BLOCK, VECTOR)
            key = _ordered_key(x)
            counted = mask & (key >= floor[:, None])
            if WEIGHTED:
                weight = tl.where(counted, tl.exp(_scaled(x, row_max, inv_temperature)), 0.0)
            else:
                weight = counted.to(tl.float32)
            above = key[:, :, None] >= candidates[:, None, :]
            reach += tl.sum(tl.where(above, weight[:, :, None], 0.0), axis=1)
        # F at the prefix itself (d = 0) reaches the target by construction; rounding can only make it miss there,
        # and then the prefix stays (a threshold too low by rounding keeps more classes, never none)
        digit = tl.maximum(tl.sum((reach >= target[:, None]).to(tl.int64), axis=1) - 1, 0)
        prefix += digit << shift
    return prefix


@triton.jit(do_not_specialize=["inv_temperature", "top_k", "top_p", "offset_lo", "offset_hi"])
def _sample_categorical_kernel(out_ptr, logits_ptr, seed_ptr, rows, num_classes, span, stride_row, stride_class,
                               inv_temperature, top_k, top_p, offset_lo, offset_hi, GREEDY: tl.constexpr,
                               TOP_K: tl.constexpr, TOP_P: tl.constexpr, ROWS: tl.constexpr,
                               BLOCK: tl.constexpr, VECTOR: tl.constexpr):
    """One class per row for ``ROWS`` rows, ``BLOCK`` classes at a time (see the eager reference for the math):
    the row maximum (and argmax when ``GREEDY``), the top-k and top-p thresholds by radix search, then the
    Gumbel-max draw over the kept classes. Writes -1 for a row with a NaN or +inf logit or none above -inf.
    Every pass but the draw walks ``span`` positions in 16-byte vectors when ``VECTOR`` (see _load_tile); the
    draw walks classes from 0, so that each tile's classes are whole Philox groups."""
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_mask = row < rows
    row_offsets = row.to(tl.int64) * stride_row
    lead = row_offsets % VECTOR if VECTOR else row_offsets * 0
    row_max = tl.full((ROWS,), float("-inf"), tl.float32)
    bad = tl.zeros((ROWS,), tl.int32)
    best = tl.zeros((ROWS,), tl.int64)
    for start in range(0, span, BLOCK):
        first, mask, x = _load_tile(logits_ptr, row_offsets, lead, row_mask, start, num_classes, stride_class,
                                    BLOCK, VECTOR)
        bad = tl.maximum(bad, tl.max(((x != x) | (x == float("inf"))).to(tl.int32), axis=1))
        tile_max = tl.max(x, axis=1)
        if GREEDY:  # strictly larger only: among equal maxima the earlier tile's (lower) index stays
            best = tl.where(tile_max > row_max, first + tl.argmax(x, axis=1, tie_break_left=True), best)
        row_max = tl.maximum(row_max, tile_max)
    valid = (bad == 0) & (row_max > float("-inf"))
    if not GREEDY:
        threshold = tl.zeros((ROWS,), tl.int64)
        if TOP_K:
            target = tl.full((ROWS,), 0.0, tl.float32) + top_k
            threshold = _radix_threshold(logits_ptr, row_offsets, lead, row_mask, num_classes, span, stride_class,
                                         row_max, inv_temperature, threshold, target, False, ROWS, BLOCK, VECTOR)
        if TOP_P:
            total = tl.zeros((ROWS,), tl.float32)
            for start in range(0, span, BLOCK):
                _, mask, x = _load_tile(logits_ptr, row_offsets, lead, row_mask, start, num_classes, stride_class,
                                        BLOCK, VECTOR)
                kept = mask & (_ordered_key(x) >= threshold[:, None])
                total += tl.sum(tl.where(kept, tl.exp(_scaled(x, row_max, inv_temperature)), 0.0), axis=1)
            nucleus = _radix_threshold(logits_ptr, row_offsets, lead, row_mask, num_classes, span, stride_class,
                                       row_max, inv_temperature, threshold, top_p * total, True, ROWS, BLOCK,
                                       VECTOR)
            threshold = tl.maximum(threshold, nucleus)
        seed = tl.load(seed_ptr)
        best_score = tl.full((ROWS,), float("-inf"), tl.float32)
        zero = tl.zeros((ROWS, BLOCK // 4), tl.uint32)
        counter_row = zero + row.to(tl.uint32)[:, None]
        counter_lo = zero + offset_lo.to(tl.uint32)
        counter_hi = zero + offset_hi.to(tl.uint32)
        for start in range(0, num_classes, BLOCK):
            _, mask, x = _load_tile(logits_ptr, row_offsets, lead, row_mask, start, num_classes, stride_class,
                                    BLOCK, 0)
            group = zero + (start // 4 + tl.arange(0, BLOCK // 4)).to(tl.uint32)[None, :]
            r0, r1, r2, r3 = tl.philox(seed, group, counter_row, counter_lo, counter_hi)
            words = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))  # class 4g + w takes word w
            uniform = tl.maximum(tl.uint_to_uniform_float(words), _MIN_UNIFORM)
            gumbel = -tl.log(-tl.log(uniform))
            kept = mask & (_ordered_key(x) >= threshold[:, None])
            score = tl.where(kept, _scaled(x, row_max, inv_temperature) + gumbel, float("-inf"))
            tile_best = tl.max(score, axis=1)
            best = tl.where(tile_best > best_score, start + tl.argmax(score, axis=1, tie_break_left=True), best)
            best_score = tl.maximum(best_score, tile_best)
    tl.store(out_ptr + row, tl.where(valid, best.to(tl.int64), -1), mask=row_mask)


# ----------------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------------
# Elements of one tile: a multiple of 4 (a Philox group per 4 classes). On a GPU an unfiltered tile is one 16-byte
# vector per thread; the radix passes of a filtered draw compare every element with sixteen candidates, so their
# tiles hold 4 elements per thread of 4 warps (at 8 warps and 1024 elements: 184 registers, 1 CTA per SM).
GPU_TILE = 1024
FILTERED_TILE, FILTERED_WARPS = 512, 4
INTERPRETER_TILE = 1 << 15


def sample_launch_config(rows: int, classes: int, element_size: int, filtered: bool,
                         device: torch.device) -> tuple[int, int, int]:
    """``(ROWS, BLOCK, num_warps)``: ``BLOCK`` classes per tile (the row length rounded up to a power of two, at
    most one tile), ``ROWS`` rows per program. On a GPU rows are packed into a program only while the grid keeps
    two programs per SM, and every thread loads one 16-byte vector per tile (``filtered``, top-k or top-p: four
    elements, see FILTERED_TILE); in the CPU interpreter (about 4 ms
    per program and tile) tiles are as large as practical. Tests may force ``block`` (a power of two >= 4) with
    ``launch.force_launch_settings("sample_categorical", block=...)`` to reach several tiles per row."""
    if interpreter_enabled() and not capturing() and device.type != "cuda":
        block = max(4, min(INTERPRETER_TILE, triton.next_power_of_2(classes)))
        block = int(launch_setting("sample_categorical", "block", block))
        return max(1, min(triton.next_power_of_2(max(rows, 1)), INTERPRETER_TILE // block)), block, 4
    tile = FILTERED_TILE if filtered else GPU_TILE
    block = max(4, min(tile, triton.next_power_of_2(classes)))
    block = int(launch_setting("sample_categorical", "block", block))
    limits = device_limits(device)
    packed = max(1, min(tile // block, rows // (2 * limits.sm_count)))
    packed = 1 << (packed.bit_length() - 1)  # a power of two
    per_thread = 4 if filtered else 16 // element_size
    num_warps = max(1, min(FILTERED_WARPS if filtered else 8, packed * block // (32 * per_thread)))
    return packed, block, num_warps


def _vector_walk(logits: torch.Tensor) -> tuple[int, int]:
    """``(VECTOR, span)`` of the kernel: elements per 16-byte vector where the rows can be read as whole vectors
    (contiguous classes, a 16-byte-aligned tensor; ``meta`` tensors count as aligned, as a GPU allocation is),
    else 0; and the positions a row's walk covers, its classes plus the lead of a row that starts inside a
    vector."""
    rows, classes = logits.shape
    if logits.stride(1) != 1 and classes > 1 or logits.data_ptr() % 16:
        return 0, classes
    vector = 16 // logits.element_size()
    starts_inside = rows > 1 and logits.stride(0) % vector != 0
    return vector, classes + (vector - 1 if starts_inside else 0)


def _sample_categorical_launch(logits: torch.Tensor, seed: Optional[torch.Tensor], inv_temperature: float,
                               greedy: bool, top_k: int, top_p: float, offset: int) -> torch.Tensor:
    rows, classes = logits.shape
    out = torch.empty((rows,), dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    filtered = not greedy and (top_k > 0 or top_p < 1.0)
    packed, block, num_warps = sample_launch_config(rows, classes, logits.element_size(), filtered, logits.device)
    offset_lo, offset_hi = _offset_words(offset)
    vector, span = _vector_walk(logits)
    _sample_categorical_kernel[(triton.cdiv(rows, packed),)](
        out, logits, seed if seed is not None else out, rows, classes, span, logits.stride(0), logits.stride(1),
        inv_temperature, top_k, top_p, offset_lo, offset_hi, GREEDY=greedy, TOP_K=top_k > 0, TOP_P=top_p < 1.0,
        ROWS=packed, BLOCK=block, VECTOR=vector, num_warps=num_warps)
    return out


# ----------------------------------------------------------------------------------------------------------------
# torch.library registration (usable under torch.compile(fullgraph=True))
# ----------------------------------------------------------------------------------------------------------------
_sample_categorical_op = torch.library.custom_op("genkernels::sample_categorical", _sample_categorical_launch,
                                                 mutates_args=())


@_sample_categorical_op.register_fake
def _sample_categorical_fake(logits, *args):
    return logits.new_empty((logits.shape[0],), dtype=torch.int64)


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------
def _inverse_temperature(temperature: float) -> float:
    """``1 / temperature`` for the fp32 multiplications of both impls (each rounds it to fp32 the same way): +inf
    where it exceeds fp32's range, and at least the smallest fp32 subnormal (a huge temperature must not scale a
    -inf logit by 0). Plain Python arithmetic, so torch.compile traces it."""
    if temperature * FLOAT32_MAX < 1.0:
        return math.inf
    return max(1.0 / temperature, FLOAT32_TINY)



def _check_rows_valid(samples: torch.Tensor, logits: torch.Tensor) -> None:
    """Raise for rows the draw marked invalid: ``ValueError`` naming the first one where the result is on the host
    (CPU, not while torch.compile traces), an asynchronous device assert on a GPU; nothing for meta tensors."""
    if samples.device.type == "meta":
        return
    message = "logits must hold no NaN or +inf and at least one value above -inf in every row"
    ok = samples >= 0
    if samples.device.type == "cpu" and not torch.compiler.is_compiling():
        if samples.numel() and not bool(ok.all()):
            row = int((~ok).nonzero()[0, 0])
            raise ValueError(f"{message}; row {row} does not ({describe(logits)})")
        return
    torch._assert_async(ok.all(), message)


def sample_categorical(logits: torch.Tensor, *, temperature: float = 1.0, top_k: Optional[int] = None,
                       top_p: Optional[float] = None, generator: Optional[torch.Generator] = None,
                       seed: Optional[torch.Tensor] = None, offset: int = 0, impl: str = "auto") -> torch.Tensor:
    """Draw one class per row of ``logits`` ``[rows, classes]`` from ``softmax(logits / temperature)``, optionally
    restricted to the top-k and then the top-p (nucleus) classes, fused: a bounded number of passes over each row,
    no sort, no probability tensor.

    The draw is Gumbel-max, ``argmax_{c kept} ((x_c - max x) / T - log(-log u_c))``, with uniforms ``u`` from
    Philox inside the kernel: an exact draw from the renormalized softmax (up to the uniforms' 2^-31 resolution).
    ``impl="eager"`` computes the same uniforms and the same draw in PyTorch, so both impls give the same classes
    for the same seed, except where two scores or a top-p cumulative mass and its target agree to float rounding.

    Kept classes (module docstring): top-k keeps the classes whose logit is at least the k-th largest (ties with
    it included); top-p, applied to the top-k distribution renormalized, keeps a class when the classes of larger
    logit carry less than ``top_p`` of the mass (ties at the threshold all kept: Hugging Face's
    ``TopPLogitsWarper`` plus the classes tied with its last one). ``top_p`` near 0 keeps the largest logit(s);
    ``top_p=1`` and ``top_k >= classes`` keep everything.

    ``temperature=0`` or ``top_k=1`` is greedy: ``argmax`` with the lowest index among equal logits (as
    ``torch.argmax``), and nothing is drawn from ``generator``. A tiny positive temperature is safe (the maximum's
    own term is exactly 0): all mass goes to the largest logit(s), ties broken at random.

    Logits of -inf are legal and never drawn. A row with a NaN or +inf logit, or with every logit -inf, has no
    distribution (``torch.multinomial`` refuses the softmax of such a row): ``ValueError`` naming the row on the
    CPU, an asynchronous device assert on a GPU. This is checked from the kernel's verdict per row, after the draw,
    so it costs no extra pass over the logits.

    Args:
        logits: ``[rows, classes]``, any strides, ``classes >= 1``: fp32/fp16/bf16 (the kernel, fp32 math) or fp64
            (the eager reference in fp64; ``impl="triton"`` refuses it).
        temperature: a finite number ``>= 0``.
        top_k: None or an int ``>= 1``.
        top_p: None or a number in ``(0, 1]``.
        generator: seeds the draw when ``seed`` is None (one int64 drawn on ``logits``' device, see
            :func:`~genkernels.kernels.draw_philox_seed`).
        seed: a one-element int64 tensor on ``logits``' device: the Philox key, read on the device (a CUDA graph
            replays with whatever it holds). Pass either ``seed`` or ``generator``.
        offset: an int in ``[0, 2^63)`` in the Philox counter: draws with the same seed and different offsets
            (generation steps) are independent, and a row's draw does not depend on the other rows.
        impl: "auto", "triton" or "eager".

    Returns:
        int64 ``[rows]``: the drawn class of every row.
    """
    check_float_tensor(logits, "logits")
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must be [rows, classes] with classes >= 1; got {describe(logits)}")
    rows, classes = logits.shape
    temperature = check_real(temperature, "temperature", low=0.0)
    if top_k is not None:
        check_int(top_k, "top_k", low=1)
    if top_p is not None:
        top_p = check_real(top_p, "top_p", low=0.0, high=1.0, low_inclusive=False)
    offset = check_int(offset, "offset", low=0, high=2**63 - 1)
    device = logits.device
    check_generator(generator, device, "logits")
    if seed is not None:
        check_seed_tensor(seed, device)
        if generator is not None:
            raise ValueError("pass either seed or generator, not both: the generator only draws a seed")
    greedy = temperature == 0 or top_k == 1
    if top_k is not None and top_k >= classes:
        top_k = None
    if top_p == 1.0:
        top_p = None
    inv_temperature = 0.0 if greedy else _inverse_temperature(temperature)
    impl = choose_impl(impl, "sample_categorical", {"logits": logits})
    if not greedy and seed is None:
        seed = draw_philox_seed(device, generator)
    if impl == "eager":
        samples = sample_categorical_reference(logits, seed, offset, inv_temperature, greedy, top_k, top_p)
    else:
        samples = torch.ops.genkernels.sample_categorical(logits, seed, inv_temperature, greedy, top_k or 0,
                                                          1.0 if top_p is None else top_p, offset)
    _check_rows_valid(samples, logits)
    return samples
