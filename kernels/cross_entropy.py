"""Cross-entropy over a class axis, fused with its gradient, and the linear layer + cross-entropy of a language
model's output head without materializing the ``[tokens, vocab]`` logits.

``cross_entropy`` has ``F.cross_entropy``'s semantics for class-index targets (``ignore_index``,
``label_smoothing``, the "mean" / "sum" / "none" reductions) and its layouts: classes on dim 1 of ``[N, C]`` or
``[N, C, d1, ...]``, read in place whatever the strides (PixelCNN's ``[N, 256, 3, H, W]``, whose class axis is
not the last one, needs no permuted copy). One kernel launch per call walks each row (one position's ``C``
logits) once for its log-sum-exp by an online max / sum over class tiles (any ``C``), and, when the logits need
a gradient, walks it a second time to write ``d loss_row / d logits`` for a unit upstream gradient (the
fused-loss trick of Liger-Kernel): when the whole row fits one tile (``C <= 256`` on strided rows, ``C <= 2048``
on contiguous ones) it is read once and the gradient comes from the registers; longer contiguous rows (a
vocabulary) are walked in whole 16-byte vectors from their first 16-byte boundary.

The logits themselves are not saved for the backward: the stored gradient is all it needs, so the backward is
one scale by the incoming gradient (divided by the number of counted targets for "mean"). The gradient buffer
has the logits' dtype and layout and replaces what plain autograd would save (the logits, or the fp32 copy the
models made of 16-bit logits); the backward's result is one more buffer of that dtype, and no fp32 copy of the
logits exists at any point. It holds the unreduced row gradient ``softmax - target distribution`` (entries in
[-1, 1]), so fp16 keeps its digits (the ``1 / N`` of "mean" would push a vocabulary's probabilities into fp16's
subnormals), and the backward's scale is applied in fp32 before the one rounding of the result. The reductions
are deterministic: the kernel writes one loss per row, summed afterwards in a fixed order (no atomics).

``linear_cross_entropy`` runs the head in chunks of tokens: each chunk's logits (a torch matmul), their loss and
gradient (the cross-entropy kernel, writing the gradient over the logits) and their share of the gradients of
``hidden``, ``weight`` and ``bias`` (torch matmuls; ``weight``'s accumulated over the chunks in fp32) live only
inside the chunk. The gradients are computed in the forward pass, so the backward is a scale ("mean", "sum");
"none" needs the upstream gradient of every token, so its backward runs the chunks again.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .checks import (
    INTEGER_DTYPES,
    check_choice,
    check_float_tensor,
    check_int,
    check_integer_tensor,
    check_min_rank,
    check_real,
    check_same_device,
    check_same_dtype,
    check_tensor,
    check_values,
    describe,
)
from .launch import collapse_inner_dims
from .runtime import choose_impl, compute_dtype

REDUCTIONS = ("mean", "sum", "none")
# Row dims a launch addresses: up to three outer ones (unravelled once per program) and the innermost, tiled.
_MAX_ROW_DIMS = 4
# Tile sizes (elements): rows whose classes are contiguous take up to 4096 classes per tile, one row per tile for
# a vocabulary; rows with strided classes (the class axis not last) take up to 256 classes of 32+ neighbouring
# rows, which are contiguous in memory, so every load is a run of rows.
_CONTIGUOUS_TILE = 4096
_STRIDED_CLASSES = 256
_STRIDED_TILE = 8192
# Chunk rule of linear_cross_entropy: the chunk's logits (tokens x vocab in the input dtype) stay under this.
CHUNK_LOGITS_BYTES = 2**29


# ----------------------------------------------------------------------------------------------------------------
# Eager reference: the specification, the fallback and the test oracle
# ----------------------------------------------------------------------------------------------------------------
def cross_entropy_reference(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                            label_smoothing: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """Plain ``F.cross_entropy`` on the logits in fp32 (fp64 for fp64 logits); the reduced loss comes back in
    that dtype, the per-row losses of "none" in the logits' dtype:

        lse_i  = log sum_c exp(x_ic)
        loss_i = lse_i - (1 - eps) x_i,t_i - eps / C sum_c x_ic        (0 where t_i == ignore_index)
        mean   = sum_i loss_i / #{i : t_i != ignore_index}              (NaN when every target is ignored)
    """
    dtype = compute_dtype(logits.dtype)
    loss = F.cross_entropy(logits.to(dtype), target.long(), ignore_index=ignore_index,
                           label_smoothing=label_smoothing, reduction=reduction)
    return loss.to(logits.dtype) if reduction == "none" else loss


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                                   bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                                   label_smoothing: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """The materialized head and loss: ``cross_entropy_reference(hidden @ weight.T + bias, target)`` over the
    tokens of ``hidden`` ``[..., H]`` (``target`` ``[...]``)."""
    logits = F.linear(hidden, weight, bias)
    loss = cross_entropy_reference(logits.reshape(-1, weight.shape[0]), target.reshape(-1), ignore_index,
                                   label_smoothing, reduction)
    return loss.view(target.shape) if reduction == "none" else loss


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _fold_tile(x, mask, row_max, row_sum, row_total, row_seen, SMOOTH: tl.constexpr):
    """Fold the tile ``x`` ``[rows, classes]`` (masked lanes -inf) into the running max, ``sum exp(x - shift)``
    and, for smoothing, ``sum (x - shift)`` over the ``row_seen`` classes so far, ``shift`` being the max (0
    while no finite logit came: ``exp(-inf - 0)`` stays 0, not NaN). Sums relative to the max keep their digits
    where the logits are huge (``lse = max + log(sum)`` would round ``log(sum)`` away at 1e38)."""
    new_max = tl.maximum(row_max, tl.max(x, axis=1))
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    if SMOOTH:
        previous_shift = tl.where(row_max == float("-inf"), 0.0, row_max)
        row_total += row_seen * (previous_shift - shift) + tl.sum(tl.where(mask, x - shift[:, None], 0.0), axis=1)
        row_seen += tl.sum(mask.to(tl.float32), axis=1)
    row_sum = row_sum * tl.exp(row_max - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
    return new_max, row_sum, row_total, row_seen


@triton.jit
def _stats_of_tile(x_ptrs, mask, row_max, row_sum, row_total, row_seen, SMOOTH: tl.constexpr):
    """Read one tile of logits (masked lanes -inf) and fold it in (:func:`_fold_tile`)."""
    x = tl.load(x_ptrs, mask=mask, other=float("-inf")).to(tl.float32)
    return _fold_tile(x, mask, row_max, row_sum, row_total, row_seen, SMOOTH)


@triton.jit
def _row_gradient(x, cols, shift, log_sum, target, valid, smoothing, num_classes):
    """For the tile ``x`` at classes ``cols`` (``[1, classes]``), with ``softmax = exp(x - shift - log_sum)``:
    ``d loss_i / d x_ic = softmax_ic - (1 - eps) [c == t_i] - eps / C``; ``0 * softmax_ic`` on ignored rows,
    which is 0 unless the row's softmax is NaN (a NaN or +inf logit), as autograd's log-softmax backward gives."""
    softmax = tl.exp((x - shift[:, None]) - log_sum[:, None])
    grad = softmax - smoothing / num_classes - tl.where(cols == target[:, None], 1.0 - smoothing, 0.0)
    return tl.where(valid[:, None], grad, 0.0 * softmax)


@triton.jit
def _gradient_of_tile(x_ptrs, g_ptrs, c, mask, shift, log_sum, target, valid, smoothing, num_classes):
    """Read one tile of logits again and write its gradient (see :func:`_row_gradient`)."""
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    grad = _row_gradient(x, c, shift, log_sum, target, valid, smoothing, num_classes)
    tl.store(g_ptrs, grad.to(g_ptrs.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["ignore_index", "smoothing"])
def _cross_entropy_kernel(
    loss_ptr, grad_ptr, logits_ptr, target_ptr,
    ignore_index, smoothing, num_classes, inner_rows, row_tiles, outer1, outer2,
    x_so0, x_so1, x_so2, x_sr, x_sc,
    g_so0, g_so1, g_so2, g_sr, g_sc,
    t_so0, t_so1, t_so2, t_sr,
    l_so0, l_so1, l_so2, l_sr,
    WRITE_GRAD: tl.constexpr, SMOOTH: tl.constexpr, SINGLE_TILE: tl.constexpr, WIDE: tl.constexpr,
    ALIGN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Rows ``[tile * BLOCK_R, ...)`` of the innermost row dim at one outer position: their losses, and with
    WRITE_GRAD their gradients for a unit upstream gradient (``grad_ptr`` may alias ``logits_ptr``: every element
    is read before its gradient overwrites it, by the same program).

    SINGLE_TILE: the rows' classes fit one tile, read once (the gradient comes from the registers). Otherwise
    the classes are walked twice, for the online log-sum-exp and for the gradient. ALIGN (one row per program,
    contiguous classes, the gradient laid out as the logits; a vocabulary of 50,257 starts its rows anywhere):
    the walk is the row's classes before its first 16-byte boundary, whole 16-byte vectors from there (tiles
    whose masks are uniform per vector), and the classes after the last one."""
    pid = tl.program_id(0).to(tl.int64)
    outer = pid // row_tiles
    first_row = (pid % row_tiles) * BLOCK_R
    o2 = outer % outer2
    o1 = (outer // outer2) % outer1
    o0 = outer // outer2 // outer1
    # the tile's first row is found in 64 bits; offsets inside the tile are 32-bit unless it spans 2**31 elements
    x_offset = o0 * x_so0 + o1 * x_so1 + o2 * x_so2 + first_row * x_sr
    g_offset = o0 * g_so0 + o1 * g_so1 + o2 * g_so2 + first_row * g_sr
    x_ptr = logits_ptr + x_offset
    g_ptr = grad_ptr + g_offset
    t_ptr = target_ptr + (o0 * t_so0 + o1 * t_so1 + o2 * t_so2 + first_row * t_sr)
    l_ptr = loss_ptr + (o0 * l_so0 + o1 * l_so1 + o2 * l_so2 + first_row * l_sr)
    rows = tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    if WIDE:
        rows = rows.to(tl.int64)
        cols = cols.to(tl.int64)
    row_mask = first_row + rows < inner_rows
    target = tl.load(t_ptr + rows * t_sr, mask=row_mask, other=ignore_index).to(tl.int64)
    valid = row_mask & (target != ignore_index)
    # the host checked the targets; clamping only keeps an ignored or unchecked row's gather inside the row
    target = tl.minimum(tl.maximum(target, 0), num_classes - 1)
    x_rows = (rows * x_sr)[:, None]
    g_rows = (rows * g_sr)[:, None]
    target_logit = tl.load(x_ptr + rows * x_sr + target * x_sc, mask=valid, other=0.0).to(tl.float32)
    row_max = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BLOCK_R,), tl.float32)
    row_total = tl.zeros((BLOCK_R,), tl.float32)
    row_seen = tl.zeros((BLOCK_R,), tl.float32)
    if ALIGN:
        VECTOR: tl.constexpr = 128 // logits_ptr.dtype.element_ty.primitive_bitwidth
        lanes = tl.arange(0, VECTOR)[None, :]
        head = tl.minimum(((VECTOR - x_offset % VECTOR) % VECTOR).to(tl.int32), num_classes)
        body = (num_classes - head) // VECTOR * VECTOR
        body_x = logits_ptr + tl.multiple_of(x_offset + head, VECTOR)
        body_g = grad_ptr + tl.multiple_of(g_offset + head, VECTOR)
        tail = head + body
        row_max, row_sum, row_total, row_seen = _stats_of_tile(x_ptr + lanes, lanes < head, row_max, row_sum,
                                                               row_total, row_seen, SMOOTH)
        for start in range(0, body, BLOCK_C):
            q = tl.multiple_of(start, BLOCK_C) + cols[None, :]
            row_max, row_sum, row_total, row_seen = _stats_of_tile(body_x + q, q < body, row_max, row_sum,
                                                                   row_total, row_seen, SMOOTH)
        row_max, row_sum, row_total, row_seen = _stats_of_tile(x_ptr + tail + lanes, tail + lanes < num_classes,
                                                               row_max, row_sum, row_total, row_seen, SMOOTH)
    elif SINGLE_TILE:
        mask = row_mask[:, None] & (cols < num_classes)[None, :]
        x = tl.load(x_ptr + x_rows + cols[None, :] * x_sc, mask=mask, other=float("-inf")).to(tl.float32)
        row_max, row_sum, row_total, row_seen = _fold_tile(x, mask, row_max, row_sum, row_total, row_seen, SMOOTH)
    else:
        for start in range(0, num_classes, BLOCK_C):
            c = (start + cols)[None, :]
            row_max, row_sum, row_total, row_seen = _stats_of_tile(x_ptr + x_rows + c * x_sc,
                                                                   row_mask[:, None] & (c < num_classes), row_max,
                                                                   row_sum, row_total, row_seen, SMOOTH)
    # lse = shift + log_sum; rows past the end get log_sum 0 (no log(0), no -inf - -inf in never-stored lanes)
    shift = tl.where(row_max == float("-inf"), 0.0, row_max)
    log_sum = tl.log(tl.where(row_mask, row_sum, 1.0))
    if SMOOTH:  # only then: the term is NaN for a -inf logit even at eps = 0
        # lse - (1 - eps) x_t - eps / C sum_c x_c, the sum kept relative to the shift
        loss = (1.0 - smoothing) * (shift - target_logit) + log_sum - smoothing / num_classes * row_total
    else:
        loss = (shift - target_logit) + log_sum
    loss = tl.where(valid, loss, 0.0)
    tl.store(l_ptr + rows * l_sr, loss.to(loss_ptr.dtype.element_ty), mask=row_mask)
    if WRITE_GRAD:
        if ALIGN:
            _gradient_of_tile(x_ptr + lanes, g_ptr + lanes, lanes, lanes < head, shift, log_sum, target, valid,
                              smoothing, num_classes)
            for start in range(0, body, BLOCK_C):
                q = tl.multiple_of(start, BLOCK_C) + cols[None, :]
                _gradient_of_tile(body_x + q, body_g + q, head + q, q < body, shift, log_sum, target, valid, smoothing,
                                  num_classes)
            _gradient_of_tile(x_ptr + tail + lanes, g_ptr + tail + lanes, tail + lanes,
                              tail + lanes < num_classes, shift, log_sum, target, valid, smoothing, num_classes)
        elif SINGLE_TILE:
            grad = _row_gradient(x, cols[None, :], shift, log_sum, target, valid, smoothing, num_classes)
            tl.store(g_ptr + g_rows + cols[None, :] * g_sc, grad.to(grad_ptr.dtype.element_ty), mask=mask)
        else:
            for start in range(0, num_classes, BLOCK_C):
                c = (start + cols)[None, :]
                _gradient_of_tile(x_ptr + x_rows + c * x_sc, g_ptr + g_rows + c * g_sc, c,
                                  row_mask[:, None] & (c < num_classes), shift, log_sum, target, valid, smoothing,
                                  num_classes)


# ----------------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------------
def _row_strides(tensor: torch.Tensor, has_classes: bool) -> list[int]:
    """Strides of the row dims ``[N, d1, ...]``: every dim but the class dim 1 of a logits-shaped tensor."""
    strides = list(tensor.stride())
    return strides[:1] + strides[2:] if has_classes else strides


def _tile_config(num_classes: int, inner_rows: int, classes_contiguous: bool) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_C, num_warps)``: contiguous classes take a tile of up to 4096 classes (one vocabulary
    row, or several short rows); strided classes up to 256 classes of the neighbouring rows, 8192 elements."""
    if classes_contiguous:
        block_c = min(triton.next_power_of_2(num_classes), _CONTIGUOUS_TILE)
        block_r = min(triton.next_power_of_2(inner_rows), _CONTIGUOUS_TILE // block_c)
    else:
        block_c = min(triton.next_power_of_2(num_classes), _STRIDED_CLASSES)
        block_r = min(triton.next_power_of_2(inner_rows), _STRIDED_TILE // block_c)
    return block_r, block_c, max(1, min(8, block_r * block_c // 512))


def _launch_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, label_smoothing: float,
                          loss_dtype: torch.dtype, grad: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-row losses (``target``'s shape, contiguous, ``loss_dtype``), and the unit-upstream gradient written
    into ``grad`` (logits' shape, any strides, may be ``logits`` itself) when it is given."""
    losses = torch.empty(target.shape, dtype=loss_dtype, device=logits.device)
    if losses.numel() == 0:
        return losses
    num_classes = logits.shape[1]
    row_shape = [logits.shape[0]] + list(logits.shape[2:])
    named = [logits, grad if grad is not None else logits]
    strides = [_row_strides(t, True) for t in named] + [_row_strides(target, False), _row_strides(losses, False)]
    dims = collapse_inner_dims([1] + row_shape, [[0] + s for s in strides])
    if len(dims) > _MAX_ROW_DIMS:
        # more scattered row dims than a launch addresses (a rank > 5 permutation): walk dense copies
        dense_grad = None if grad is None else torch.empty(logits.shape, dtype=grad.dtype, device=grad.device)
        losses = _launch_cross_entropy(logits.contiguous(), target.contiguous(), ignore_index, label_smoothing,
                                       loss_dtype, dense_grad)
        if grad is not None:
            grad.copy_(dense_grad)
        return losses
    dims = [(1, [0, 0, 0, 0])] * (_MAX_ROW_DIMS - len(dims)) + dims
    (outer0, s0), (outer1, s1), (outer2, s2), (inner_rows, s_in) = dims
    classes_contiguous = logits.stride(1) == 1 or num_classes == 1
    block_r, block_c, num_warps = _tile_config(num_classes, inner_rows, classes_contiguous)
    # one row per program on contiguous classes: walked in whole 16-byte vectors from the row's first boundary
    align = (classes_contiguous and block_r == 1 and num_classes > 16 // logits.element_size()
             and (grad is None or grad.stride() == logits.stride()))
    span = block_r * max(abs(s_in[0]), abs(s_in[1])) + num_classes * max(abs(logits.stride(1)),
                                                                         abs(named[1].stride(1)))
    row_tiles = triton.cdiv(inner_rows, block_r)
    class_strides = [logits.stride(1), named[1].stride(1)]
    per_tensor = [(s0[k], s1[k], s2[k], s_in[k]) for k in range(4)]
    _cross_entropy_kernel[(outer0 * outer1 * outer2 * row_tiles,)](
        losses, named[1], logits, target,
        ignore_index, float(label_smoothing), num_classes, inner_rows, row_tiles, outer1, outer2,
        *per_tensor[0], class_strides[0], *per_tensor[1], class_strides[1], *per_tensor[2], *per_tensor[3],
        WRITE_GRAD=grad is not None, SMOOTH=label_smoothing > 0, SINGLE_TILE=num_classes <= block_c and not align,
        WIDE=span >= 2**31, ALIGN=align, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps,
    )
    return losses


def _reduce(losses: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: str):
    """The loss from the row losses (fp32 unless "none"), summed in a fixed order (deterministic), and the count
    of targets that "mean" divides by (an fp32 scalar; an empty tensor for the other reductions)."""
    if reduction == "none":
        return losses, losses.new_empty(0)
    total = losses.sum()
    if reduction == "sum":
        return total, losses.new_empty(0)
    count = (target != ignore_index).sum().to(torch.float32)
    return total / count, count  # 0 / 0 = NaN when every target is ignored, as in F.cross_entropy


def _launch_forward(logits, target, ignore_index, label_smoothing, reduction, write_grad):
    grad = torch.empty_like(logits) if write_grad else logits.new_empty(0)
    loss_dtype = logits.dtype if reduction == "none" else torch.float32
    losses = _launch_cross_entropy(logits, target, ignore_index, label_smoothing, loss_dtype,
                                   grad if write_grad else None)
    loss, count = _reduce(losses, target, ignore_index, reduction)
    return loss, grad, count


def _upstream_scale(grad_loss: torch.Tensor, count: torch.Tensor, reduction: str) -> torch.Tensor:
    """What the stored unit-upstream row gradients are multiplied by: the upstream gradient (per row for "none",
    as ``[N, 1, d1, ...]``), divided by the counted targets for "mean" (a count of 0 leaves only ignored rows,
    whose stored gradient is 0, and gives 0 as F.cross_entropy does, not 0 * inf)."""
    if reduction == "none":
        return grad_loss.unsqueeze(1)
    if reduction == "mean":
        return grad_loss.to(torch.float32) / count.clamp(min=1.0)
    return grad_loss.to(torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# torch.library registration (usable under torch.compile(fullgraph=True))
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("genkernels::cross_entropy", mutates_args=())
def _cross_entropy_op(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, label_smoothing: float,
                      reduction: str, write_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(loss, grad, count)``: ``grad`` is d(loss_row)/d(logits) for unit upstream gradients (an empty
    tensor unless ``write_grad``), ``count`` the targets "mean" divides by (empty for other reductions)."""
    return _launch_forward(logits, target, ignore_index, label_smoothing, reduction, write_grad)


@_cross_entropy_op.register_fake
def _cross_entropy_fake(logits, target, ignore_index, label_smoothing, reduction, write_grad):
    loss = logits.new_empty(target.shape) if reduction == "none" else logits.new_empty((), dtype=torch.float32)
    grad = torch.empty_like(logits) if write_grad else logits.new_empty(0)
    count = logits.new_empty(() if reduction == "mean" else (0,), dtype=torch.float32)
    return loss, grad, count


def _cross_entropy_setup_context(ctx, inputs, output):
    _, _, _, _, reduction, write_grad = inputs
    ctx.reduction, ctx.stored = reduction, write_grad
    ctx.save_for_backward(output[1], output[2])


def _cross_entropy_backward(ctx, grad_loss, _grad_of_grad, _grad_of_count):
    if not ctx.stored:
        raise RuntimeError("cross_entropy: the forward stored no gradient (the logits did not require one)")
    stored, count = ctx.saved_tensors
    return stored * _upstream_scale(grad_loss, count, ctx.reduction), None, None, None, None, None


_cross_entropy_op.register_autograd(_cross_entropy_backward, setup_context=_cross_entropy_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------
def _check_loss_options(ignore_index: object, label_smoothing: object, reduction: object) -> None:
    check_int(ignore_index, "ignore_index")
    check_real(label_smoothing, "label_smoothing", low=0.0, high=1.0)
    check_choice(reduction, "reduction", REDUCTIONS)


def _check_target(target: object, expected_shape: tuple[int, ...], layout: str) -> torch.Tensor:
    check_tensor(target, "target")
    if target.is_floating_point() or target.is_complex():
        raise TypeError(f"target must hold class indices (an integer dtype; class-probability targets are not "
                        f"supported); got {describe(target)}")
    check_integer_tensor(target, "target")
    if tuple(target.shape) != expected_shape:
        raise ValueError(f"target must have shape {list(expected_shape)} ({layout}); got {describe(target)}")
    return target


def _check_target_values(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Every target in ``[0, num_classes)`` or equal to ``ignore_index``: a host check for CPU tensors, an
    asynchronous device assert on a GPU (:func:`~genkernels.kernels.checks.check_values`)."""
    wide = target.to(torch.int64) if target.dtype in INTEGER_DTYPES and target.dtype != torch.int64 else target
    ok = (wide == ignore_index) | ((wide >= 0) & (wide < num_classes))
    check_values(target, "target", ok, f"lie in [0, {num_classes}) or equal ignore_index={ignore_index}")


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100,
                  label_smoothing: float = 0.0, reduction: str = "mean", impl: str = "auto") -> torch.Tensor:
    """Cross-entropy of class-index targets, ``F.cross_entropy``'s semantics, fused with its gradient:

        lse_i  = log sum_c exp(x_ic)                                     (online max / sum over class tiles)
        loss_i = lse_i - (1 - eps) x_i,t_i - eps / C sum_c x_ic          (eps = label_smoothing; torch's definition)
               = 0                                                       where t_i == ignore_index
        "mean" = sum_i loss_i / #{i : t_i != ignore_index} (NaN when all are ignored), "sum" = sum_i loss_i,
        "none" = loss_i

    and ``d loss_i / d x_ic = softmax_ic - (1 - eps) [c == t_i] - eps / C``. The forward writes that gradient
    (for a unit upstream gradient, in the logits' dtype and layout) when the logits require a gradient and keeps
    it instead of the logits: the backward only scales it by the incoming gradient (over the count for "mean"),
    in fp32 before its one rounding. Math in fp32 for fp16/bf16/fp32 logits; any ``C``; any strides (the class
    axis is read in place); 64-bit addressing where offsets pass 2**31.

    Args:
        logits: ``[N, C]`` or ``[N, C, d1, ...]`` (classes on dim 1), fp32/fp16/bf16 (fp64 runs the reference in
            fp64).
        target: class indices ``[N]`` or ``[N, d1, ...]``, any integer dtype, each in ``[0, C)`` or equal to
            ``ignore_index`` (checked: ``ValueError`` for CPU tensors, an asynchronous device assert on a GPU).
        ignore_index: the target value that is left out of the loss and the mean.
        label_smoothing: ``eps`` in ``[0, 1]``.
        reduction: "mean", "sum" or "none".
        impl: "auto", "triton" or "eager".

    Returns:
        An fp32 scalar ("mean", "sum"; fp64 for fp64 logits), or the losses of ``target``'s shape in the logits'
        dtype ("none"); differentiable in ``logits``. Unlike ``F.cross_entropy``, which rounds a reduced loss
        to the logits' dtype, the reduced loss stays fp32, as every loss of this library (a bf16 mean keeps
        three digits).
    """
    check_float_tensor(logits, "logits")
    check_min_rank(logits, "logits", 2, "[N, C, d1, ...] with classes on dim 1")
    expected = (logits.shape[0],) + tuple(logits.shape[2:])
    _check_target(target, expected, "logits' shape without the class dim 1")
    check_same_device([("logits", logits), ("target", target)])
    _check_loss_options(ignore_index, label_smoothing, reduction)
    num_classes = logits.shape[1]
    if num_classes == 0 and target.numel():
        raise ValueError(f"logits must have at least one class on dim 1; got {describe(logits)}")
    _check_target_values(target, num_classes, ignore_index)
    impl = choose_impl(impl, "cross_entropy", {"logits": logits, "target": target})
    if impl == "eager":
        return cross_entropy_reference(logits, target, ignore_index, label_smoothing, reduction)
    write_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, _, _ = torch.ops.genkernels.cross_entropy(logits, target, ignore_index, float(label_smoothing),
                                                    reduction, write_grad)
    return loss


# ----------------------------------------------------------------------------------------------------------------
# Linear layer + cross-entropy, chunked over tokens
# ----------------------------------------------------------------------------------------------------------------
def default_chunk_size(tokens: int, vocab: int, element_size: int) -> int:
    """Tokens per chunk of :func:`linear_cross_entropy`: the largest power of two whose logits
    (``chunk * vocab`` elements of ``element_size`` bytes) fit ``CHUNK_LOGITS_BYTES`` (512 MiB), at least 1 and
    at most ``tokens``. GPT-2's 50,257-token vocabulary in bf16 gets 4096 tokens (a 412 MB chunk, whose gradient
    is written over it; the materialized head holds 0.8 GB of bf16 logits, a 1.6 GB fp32 copy and their
    gradients), so a batch of 8 x 1024 tokens runs in 2 chunks. The bound keeps the chunk's matmuls near the
    tensor cores' rate and gives the loss kernel (one program per token) over 4 waves of a 132-SM GPU at its 6
    CTAs per SM; half of it (2048 tokens) would be 2.6 waves, the last 59% full."""
    fitting = max(1, CHUNK_LOGITS_BYTES // max(1, vocab * element_size))
    return max(1, min(max(tokens, 1), 1 << (fitting.bit_length() - 1)))


def _linear_chunks(hidden, weight, bias, target, ignore_index, label_smoothing, chunk, row_scale, need_hidden,
                   need_weight, need_bias):
    """Row losses (fp32 ``[tokens]``) and the gradients of ``sum_i row_scale_i loss_i`` (``row_scale`` 1 when
    None) with respect to ``hidden``, ``weight`` and ``bias``: ``weight``'s and ``bias``'s in fp32 accumulators,
    None where not needed. Only one chunk's logits ``[chunk, vocab]`` exist at a time; the kernel writes their
    gradient over them."""
    tokens, vocab = hidden.shape[0], weight.shape[0]
    write_grad = need_hidden or need_weight or need_bias
    losses = torch.empty(tokens, dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_bias else None
    # the inputs are already in the dtype autocast would pick (the public function cast them); meta tensors (a
    # launch capture) have no autocast state
    device_type = hidden.device.type
    with torch.autocast(device_type, enabled=False) if device_type in ("cuda", "cpu") else contextlib.nullcontext():
        for start in range(0, tokens, chunk):
            end = min(start + chunk, tokens)
            rows = hidden[start:end]
            logits = rows @ weight.t() if bias is None else torch.addmm(bias, rows, weight.t())
            losses[start:end] = _launch_cross_entropy(logits, target[start:end], ignore_index, label_smoothing,
                                                      torch.float32, logits if write_grad else None)
            if not write_grad:
                continue
            grad = logits
            if row_scale is not None:
                grad.mul_(row_scale[start:end, None])
            if need_hidden:
                torch.mm(grad, weight, out=grad_hidden[start:end])
            if need_weight:
                if weight.dtype == torch.float32:
                    grad_weight.addmm_(grad.t(), rows)
                else:  # 16-bit products, rounded once per chunk, summed in fp32
                    grad_weight += grad.t() @ rows
            if need_bias:
                grad_bias += grad.sum(dim=0, dtype=torch.float32)
    return losses, grad_hidden, grad_weight, grad_bias


def _finish_gradients(grads, scale, hidden, weight, bias):
    """The gradients in their parameters' dtypes, multiplied by ``scale`` (a tensor, or None) in fp32; empty
    tensors for the ones not computed."""
    out = []
    for grad, like in zip(grads, (hidden, weight, bias if bias is not None else weight)):
        if grad is None:
            out.append(like.new_empty(0))
            continue
        if scale is not None:
            grad.mul_(scale)
        out.append(grad.to(like.dtype))
    return tuple(out)


def _launch_linear_forward(hidden, weight, bias, target, ignore_index, label_smoothing, reduction, chunk,
                           need_hidden, need_weight, need_bias):
    elementwise = reduction == "none"  # its upstream gradient is per token: the backward runs the chunks again
    losses, *grads = _linear_chunks(hidden, weight, bias, target, ignore_index, label_smoothing, chunk, None,
                                    need_hidden and not elementwise, need_weight and not elementwise,
                                    need_bias and not elementwise)
    loss, count = _reduce(losses.to(hidden.dtype) if elementwise else losses, target, ignore_index, reduction)
    scale = 1.0 / count.clamp(min=1.0) if reduction == "mean" else None
    return (loss,) + _finish_gradients(grads, scale, hidden, weight, bias)


@torch.library.custom_op("genkernels::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                             target: torch.Tensor, ignore_index: int, label_smoothing: float, reduction: str,
                             chunk: int, need_hidden: bool, need_weight: bool,
                             need_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(loss, grad_hidden, grad_weight, grad_bias)``: the gradients of the reduced loss for a unit
    upstream gradient ("mean", "sum"; empty tensors where not asked for, and for "none")."""
    return _launch_linear_forward(hidden, weight, bias, target, ignore_index, label_smoothing, reduction, chunk,
                                  need_hidden, need_weight, need_bias)


def _linear_grads_fake(hidden, weight, bias, need_hidden, need_weight, need_bias):
    return (torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_hidden
            else hidden.new_empty(0),
            torch.empty_like(weight) if need_weight else weight.new_empty(0),
            torch.empty_like(bias) if need_bias and bias is not None else weight.new_empty(0))


@_linear_cross_entropy_op.register_fake
def _linear_cross_entropy_fake(hidden, weight, bias, target, ignore_index, label_smoothing, reduction, chunk,
                               need_hidden, need_weight, need_bias):
    loss = hidden.new_empty(target.shape) if reduction == "none" else hidden.new_empty((), dtype=torch.float32)
    stored = reduction != "none"
    return (loss,) + _linear_grads_fake(hidden, weight, bias, need_hidden and stored, need_weight and stored,
                                        need_bias and stored)


@torch.library.custom_op("genkernels::linear_cross_entropy_backward", mutates_args=())
def _linear_cross_entropy_backward_op(grad_loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                                      bias: Optional[torch.Tensor], target: torch.Tensor, ignore_index: int,
                                      label_smoothing: float, chunk: int, need_hidden: bool, need_weight: bool,
                                      need_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of ``sum_i grad_loss_i loss_i`` (the "none" reduction's backward), the chunks run again."""
    _, *grads = _linear_chunks(hidden, weight, bias, target, ignore_index, label_smoothing, chunk,
                               grad_loss.to(torch.float32), need_hidden, need_weight, need_bias)
    return _finish_gradients(grads, None, hidden, weight, bias)


@_linear_cross_entropy_backward_op.register_fake
def _linear_cross_entropy_backward_fake(grad_loss, hidden, weight, bias, target, ignore_index, label_smoothing,
                                        chunk, need_hidden, need_weight, need_bias):
    return _linear_grads_fake(hidden, weight, bias, need_hidden, need_weight, need_bias)


def _linear_setup_context(ctx, inputs, output):
    hidden, weight, bias, target, ignore_index, label_smoothing, reduction, chunk, *needs = inputs
    ctx.reduction, ctx.options, ctx.needs = reduction, (ignore_index, label_smoothing, chunk), needs
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, bias, target)
    else:
        ctx.save_for_backward(*output[1:])


def _linear_backward(ctx, grad_loss, *_grads_of_grads):
    if ctx.reduction == "none":
        hidden, weight, bias, target = ctx.saved_tensors
        grads = torch.ops.genkernels.linear_cross_entropy_backward(grad_loss, hidden, weight, bias, target,
                                                                   *ctx.options, *ctx.needs)
    else:
        scale = grad_loss.to(torch.float32)
        grads = [stored * scale if need else None for stored, need in zip(ctx.saved_tensors, ctx.needs)]
    grads = [grad if need else None for grad, need in zip(grads, ctx.needs)]
    return (*grads, None, None, None, None, None, None, None, None)


_linear_cross_entropy_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)


def _autocast_inputs(tensors: list[Optional[torch.Tensor]], device: torch.device) -> list[Optional[torch.Tensor]]:
    """The fp32 inputs cast to the autocast dtype when autocast is on for their device, as ``F.linear`` would."""
    if device.type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device.type):
        return tensors
    dtype = torch.get_autocast_dtype(device.type)
    return [t.to(dtype) if t is not None and t.dtype == torch.float32 else t for t in tensors]


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *,
                         bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                         label_smoothing: float = 0.0, reduction: str = "mean", chunk_size: Optional[int] = None,
                         impl: str = "auto") -> torch.Tensor:
    """A language model's output head and its loss, ``cross_entropy(hidden @ weight.T + bias, target)``, without
    the ``[tokens, vocab]`` logits ever existing whole:

        logits_i = W h_i + b                  for the tokens i of one chunk at a time (torch matmuls)
        loss     = cross_entropy(logits, target)   (:func:`cross_entropy`'s math, ignore_index, label smoothing)
        dL/dh_i = sum_c g_ic W_c,  dL/dW = sum_i g_i h_i^T,  dL/db = sum_i g_i     (g = d loss / d logits)

    computed in the forward pass, chunk by chunk (``dL/dW`` and ``dL/db`` accumulated in fp32), so the backward is
    a scale by the incoming gradient; for "none" the backward runs the chunks again with each token's upstream
    gradient. Peak memory beyond the inputs and gradients: one chunk's logits (``chunk_size x vocab`` in the
    input dtype, their gradient written over them), ``weight``'s fp32 accumulator, and for 16-bit weights one
    chunk's 16-bit ``dL/dW`` product. Under autocast fp32 inputs are cast to the autocast dtype first, as
    ``F.linear`` does. A weight tied to an embedding gets this term of its gradient once.

    Args:
        hidden: ``[..., H]`` hidden states of the tokens, fp32/fp16/bf16 (fp64 runs the reference).
        weight: ``[V, H]``, ``hidden``'s dtype.
        target: class indices of ``hidden.shape[:-1]``, any integer dtype, in ``[0, V)`` or ``ignore_index``.
        bias: ``[V]`` or None.
        ignore_index, label_smoothing, reduction: as in :func:`cross_entropy`.
        chunk_size: tokens per chunk; None picks :func:`default_chunk_size` (chunk logits <= 512 MiB).
        impl: "auto", "triton" or "eager" (the materialized ``F.linear`` + ``F.cross_entropy``).

    Returns:
        An fp32 scalar ("mean", "sum"; fp64 for fp64 inputs) or ``target``-shaped losses in ``hidden``'s dtype
        ("none"), as :func:`cross_entropy`; differentiable in ``hidden``, ``weight`` and ``bias``.
    """
    check_float_tensor(hidden, "hidden")
    check_min_rank(hidden, "hidden", 1, "[..., hidden_size]")
    check_float_tensor(weight, "weight")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape [vocab, {hidden.shape[-1]}] (vocab >= 1, hidden's last dim "
                         f"{hidden.shape[-1]}); got {describe(weight)}")
    check_same_dtype(hidden, "hidden", weight, "weight")
    if bias is not None:
        check_float_tensor(bias, "bias")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape [{weight.shape[0]}] (weight's vocab); got {describe(bias)}")
        check_same_dtype(hidden, "hidden", bias, "bias")
    _check_target(target, tuple(hidden.shape[:-1]), "hidden's shape without its last dim")
    device = check_same_device([("hidden", hidden), ("weight", weight), ("bias", bias), ("target", target)])
    _check_loss_options(ignore_index, label_smoothing, reduction)
    if chunk_size is not None:
        check_int(chunk_size, "chunk_size", low=1)
    _check_target_values(target, weight.shape[0], ignore_index)
    impl = choose_impl(impl, "linear_cross_entropy",
                       {"hidden": hidden, "weight": weight, "bias": bias, "target": target})
    if impl == "eager":
        return linear_cross_entropy_reference(hidden, weight, target, bias, ignore_index, label_smoothing,
                                              reduction)
    hidden, weight, bias = _autocast_inputs([hidden, weight, bias], device)
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    chunk = chunk_size or default_chunk_size(hidden_2d.shape[0], weight.shape[0], weight.element_size())
    grad_on = torch.is_grad_enabled()
    loss = torch.ops.genkernels.linear_cross_entropy(
        hidden_2d, weight, bias, target.reshape(-1), ignore_index, float(label_smoothing), reduction, chunk,
        grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad)[0]
    return loss.view(target.shape) if reduction == "none" else loss
