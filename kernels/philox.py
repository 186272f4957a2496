"""The in-kernel Gaussian noise stream, reproduced in plain PyTorch.

:func:`genkernels.kernels.triton_helpers.philox_normal_block` draws the noise of the fused kernels inside them.
:func:`philox_normal` computes the same stream with vectorized integer tensor ops, so that the eager references
(``impl="eager"``) see the noise the kernels draw for a given seed, on any device and without a host sync.

The stream (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3"; Triton's ``tl.philox``):

* Philox-4x32-10, key ``(k0, k1)`` = the low and high 32-bit words of the int64 seed, counter
  ``(c0, c1, c2, c3) = (g mod 2^32, g div 2^32, b, 0)`` for group ``g`` of sample ``b``. One round, with
  ``M0 = 0xD2511F53``, ``M1 = 0xCD9E8D57``:
  ``(c0, c1, c2, c3) <- (hi(M1 c2) ^ c1 ^ k0, lo(M1 c2), hi(M0 c0) ^ c3 ^ k1, lo(M0 c0))``, then the key is bumped
  by the Weyl constants ``(0x9E3779B9, 0xBB67AE85)``.
* Each 32-bit output ``r`` becomes a uniform ``u`` in [0, 1): read as int32 ``s``, ``u = float32(s if s >= 0 else ~s)
  * 4.6566127342e-10`` (Triton's ``uint_to_uniform_float``).
* Pairs ``(u0, u1)``, ``(u2, u3)`` become normals by Box-Muller (Box & Muller 1958):
  ``rho = sqrt(-2 ln max(u_a, 1e-7))``, ``n_a = rho cos(2 pi u_b)``, ``n_b = rho sin(2 pi u_b)``.
* Element ``i`` of sample ``b`` (``i`` the row-major index over the non-batch dims) gets normal ``i mod 4`` of
  group ``g = i div 4``.

The dropout stream of the attention kernels uses the same Philox-4x32-10 and uniforms on a grid of
``(plane, row, col)`` elements (``plane`` a (batch, head) pair): counter ``(col div 4, row, plane mod 2^32,
plane div 2^32)``, element ``col`` taking word ``col mod 4`` (:func:`philox_uniform_grid`).

Integer tensors are int64 holding 32-bit words; 32x32-bit products are split into 16-bit halves so no
intermediate leaves the int64 range.
"""
from __future__ import annotations

import math
import operator
from typing import Sequence

import torch

from .checks import check_int, check_integer_tensor, describe

MASK32 = 0xFFFFFFFF
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10
# Triton's uint_to_uniform_float scale, (2^23 - 1) / 2^23 * 2^-31 rounded to fp32: the largest int32 maps below 1.
UNIFORM_SCALE = 4.6566127342e-10
BOX_MULLER_MIN_UNIFORM = 1.0e-7
TWO_PI = 6.283185307179586


def _mul_hi_lo(constant: int, word: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``constant * word`` (both < 2^32), without int64 overflow."""
    low_product = word * (constant & 0xFFFF)  # < 2^48
    high_product = word * (constant >> 16)  # < 2^48, weighs 2^16
    middle = ((high_product & 0xFFFF) << 16) + low_product  # < 2^49
    return (high_product >> 16) + (middle >> 32), middle & MASK32


def philox4x32(counter: Sequence[torch.Tensor], key: Sequence[torch.Tensor],
               rounds: int = PHILOX_ROUNDS) -> tuple[torch.Tensor, ...]:
    """Philox-4x32 with ``rounds`` rounds on int64 tensors holding 32-bit words (broadcast together).

    Returns the four output words as int64 tensors in ``[0, 2^32)``.
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(rounds):
        hi_b, lo_b = _mul_hi_lo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def uint_to_uniform(word: torch.Tensor) -> torch.Tensor:
    """fp32 uniform in [0, 1) from a 32-bit word, as Triton's ``uint_to_uniform_float``."""
    folded = torch.where(word >= 2**31, MASK32 - word, word)  # ~s for the negative int32 s
    return folded.to(torch.float32) * UNIFORM_SCALE


def pair_uniform_to_normal(u_a: torch.Tensor, u_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Box-Muller in fp32, as Triton's ``pair_uniform_to_normal``."""
    u_a = torch.clamp(u_a, min=BOX_MULLER_MIN_UNIFORM)
    theta = TWO_PI * u_b
    radius = torch.sqrt(-2.0 * torch.log(u_a))
    return radius * torch.cos(theta), radius * torch.sin(theta)


def _check_seed(seed: object, device: object) -> torch.Tensor:
    """The seed as a 0-d int64 tensor: a one-element integer tensor (on its own device), or a Python int in the
    int64 range (on ``device``, default CPU). Floats and bools are refused, never truncated."""
    if isinstance(seed, torch.Tensor):
        check_integer_tensor(seed, "seed")
        if seed.numel() != 1:
            raise ValueError(f"seed must have exactly one element; got {describe(seed)}")
        if device is not None:
            wanted = torch.device(device)
            if wanted.type != seed.device.type or wanted.index not in (None, seed.device.index):
                raise ValueError(f"seed is on {seed.device} but device={wanted} was given; pass one or the other")
        return seed.reshape(()).to(torch.int64)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or a one-element integer tensor, got {type(seed).__name__} {seed!r}")
    check_int(seed, "seed", low=-2**63, high=2**63 - 1)
    return torch.tensor(seed, dtype=torch.int64, device=device)


def _check_shape(shape: object) -> tuple:
    """``shape`` as a tuple of non-negative sizes (ints, or symbolic sizes while torch.compile traces)."""
    if not isinstance(shape, (tuple, list, torch.Size)):
        raise TypeError(f"shape must be a sequence of ints (a tuple, list or torch.Size), got "
                        f"{type(shape).__name__} {shape!r}")
    sizes = []
    for k, size in enumerate(shape):
        if isinstance(size, (bool, torch.Tensor, float)):
            raise TypeError(f"shape must hold ints; got {type(size).__name__} {size!r} at position {k} of "
                            f"{tuple(shape)!r}")
        if not isinstance(size, (int, torch.SymInt)):
            if not hasattr(size, "__index__"):
                raise TypeError(f"shape must hold ints; got {type(size).__name__} {size!r} at position {k} of "
                                f"{tuple(shape)!r}")
            size = operator.index(size)  # e.g. a numpy integer
        # (while torch.compile traces, sizes may be symbolic: a tensor's sizes, never negative)
        if not torch.compiler.is_compiling() and size < 0:
            raise ValueError(f"shape must hold sizes >= 0; got {size} at position {k} of {tuple(shape)!r}")
        sizes.append(size)
    if len(sizes) == 0:
        raise ValueError("philox_normal: shape must have a batch dimension; got shape ()")
    return tuple(sizes)


def philox_normal(seed: torch.Tensor | int, shape: Sequence[int], *, device=None) -> torch.Tensor:
    """Standard normal fp32 noise of ``shape`` (batch first) on ``seed``'s device: exactly the draws the kernels
    make with ``philox_normal_block`` for the int64 ``seed`` (up to an ulp of ``log`` and the kernels' sin/cos
    polynomials, within 3e-7 of fp64: a few 1e-6 in the draw).

    Element ``[b, *idx]`` is draw ``i mod 4`` of Philox group ``i div 4`` of sample ``b``, ``i`` the row-major
    index of ``idx``; so the noise of an element depends on the seed and the shape only, never on strides.

    Args:
        seed: a one-element integer tensor (any shape, e.g. from ``draw_philox_seed``; read as int64 on its own
            device, no host sync), or a Python int in ``[-2**63, 2**63)``. A float is refused (``TypeError``),
            never truncated.
        shape: a sequence of at least one non-negative int, batch first.
        device: for a Python-int seed, the device of the noise (default CPU); for a tensor seed it must be the
            seed's device, or None.
    """
    shape = _check_shape(shape)
    seed = _check_seed(seed, device)
    device = seed.device
    batch, inner = shape[0], math.prod(shape[1:])
    groups = -(-inner // 4)
    key = (seed & MASK32, (seed >> 32) & MASK32)
    group = torch.arange(groups, dtype=torch.int64, device=device).reshape(1, groups)
    sample = torch.arange(batch, dtype=torch.int64, device=device).reshape(batch, 1)
    zero = torch.zeros((), dtype=torch.int64, device=device)
    words = philox4x32((group & MASK32, group >> 32, sample, zero), key)
    r0, r1, r2, r3 = (torch.broadcast_to(w, (batch, groups)) for w in words)
    n0, n1 = pair_uniform_to_normal(uint_to_uniform(r0), uint_to_uniform(r1))
    n2, n3 = pair_uniform_to_normal(uint_to_uniform(r2), uint_to_uniform(r3))
    normals = torch.stack([n0, n1, n2, n3], dim=-1).reshape(batch, 4 * groups)
    return normals[:, :inner].reshape(shape)


def philox_uniform_grid(seed: torch.Tensor, planes: int, rows: int, cols: int) -> torch.Tensor:
    """fp32 uniforms in [0, 1) of shape ``[planes, rows, cols]``: element ``(p, i, j)`` is word ``j mod 4`` of
    Philox-4x32-10 keyed by the int64 ``seed`` (a one-element tensor) at counter ``(j div 4, i, p mod 2^32,
    p div 2^32)``, as the attention kernels draw their dropout mask (``_dropout_weights``)."""
    seed = _check_seed(seed, None)
    device = seed.device
    groups = -(-cols // 4)
    key = (seed & MASK32, (seed >> 32) & MASK32)
    group = torch.arange(groups, dtype=torch.int64, device=device).reshape(1, 1, groups)
    row = torch.arange(rows, dtype=torch.int64, device=device).reshape(1, rows, 1)
    plane = torch.arange(planes, dtype=torch.int64, device=device).reshape(planes, 1, 1)
    words = philox4x32((group, row, plane & MASK32, plane >> 32), key)
    words = torch.stack([torch.broadcast_to(w, (planes, rows, groups)) for w in words], dim=-1)
    return uint_to_uniform(words.reshape(planes, rows, 4 * groups)[..., :cols])
