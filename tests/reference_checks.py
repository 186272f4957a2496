"""Shared test helpers: the error-relative tolerance rule and the catalog of shapes and memory layouts.

Tolerance rule: compute the reference in fp64, then require
    max|kernel - ref| <= 2 * max|eager_same_dtype - ref| + atol_floor(dtype) * max(1, max|ref|)
so a kernel may be at most twice as wrong as plain PyTorch in the same dtype.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

ATOL_FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def max_abs_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    if value.numel() == 0:
        return 0.0
    return (value.double() - reference.double()).abs().max().item()


def assert_close_to_reference(kernel: torch.Tensor, reference: torch.Tensor, eager: torch.Tensor,
                              name: str = "output") -> None:
    """The tolerance rule above; ``eager`` is the plain-PyTorch result in the kernel's dtype."""
    assert kernel.shape == reference.shape, f"{name}: shape {tuple(kernel.shape)} != {tuple(reference.shape)}"
    assert kernel.dtype == eager.dtype, f"{name}: dtype {kernel.dtype}, expected {eager.dtype}"
    assert torch.isfinite(kernel).all() or not torch.isfinite(reference).all(), f"{name}: non-finite values"
    kernel_error = max_abs_error(kernel, reference)
    eager_error = max_abs_error(eager, reference)
    scale = max(1.0, reference.double().abs().max().item()) if reference.numel() else 1.0
    bound = 2 * eager_error + ATOL_FLOOR[eager.dtype] * scale
    assert kernel_error <= bound, (
        f"{name}: max error {kernel_error:.3e} vs fp64 reference exceeds {bound:.3e} "
        f"(eager {eager.dtype} error {eager_error:.3e})")


@dataclasses.dataclass(frozen=True)
class Layout:
    """A shape and a way of laying it out in memory."""

    name: str
    shape: tuple[int, ...]
    make: Callable[[torch.Tensor], torch.Tensor]  # contiguous values -> the same values in this layout

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        out = self.make(values)
        assert out.shape == values.shape and torch.equal(out, values)
        return out


def _contiguous(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous()


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def _transposed_last_two(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-1, -2).contiguous().transpose(-1, -2)


def _every_other_channel(x: torch.Tensor) -> torch.Tensor:
    wide = torch.zeros((x.shape[0], 2 * x.shape[1]) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device)
    wide[:, ::2] = x
    return wide[:, ::2]


def _every_other_sample(x: torch.Tensor) -> torch.Tensor:
    wide = torch.zeros((2 * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    wide[::2] = x
    return wide[::2]


def _scattered_rank6(x: torch.Tensor) -> torch.Tensor:
    # A permutation no reordering of dims merges into <= 4 inner runs.
    order = (0, 5, 3, 1, 4, 2)
    inverse = [order.index(d) for d in range(6)]
    return x.permute(order).contiguous().permute(inverse)


# Shapes batch-first; ragged sizes, size 1, empty batch, and the strided layouts kernels must walk without copies.
PER_SAMPLE_LAYOUTS = (
    Layout("ragged_nchw", (3, 5, 17, 13), _contiguous),
    Layout("vector_1000", (2, 1000), _contiguous),
    Layout("size_one", (1, 1), _contiguous),
    Layout("empty_batch", (0, 3, 8, 8), _contiguous),
    Layout("channels_last", (2, 3, 9, 7), _channels_last),
    Layout("transposed_hw", (2, 4, 7, 9), _transposed_last_two),
    Layout("channel_slice", (3, 4, 10, 6), _every_other_channel),
    Layout("batch_slice", (3, 4, 33), _every_other_sample),
    Layout("rank6_scattered", (2, 2, 3, 2, 3, 2), _scattered_rank6),
)


def random_tensor(shape, dtype, seed: int, device: str = "cpu", scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def assert_standard_normal(z: torch.Tensor) -> None:
    """Moments and tails of ``z`` (flattened) are those of i.i.d. N(0, 1) draws, within 5-sigma sampling error, and
    the four draws of each Philox call (consecutive groups of 4) are uncorrelated."""
    z = z.double().flatten()
    n = z.numel()
    assert abs(z.mean().item()) < 5 / n**0.5
    assert abs(z.std().item() - 1) < 5 * (0.5 / n) ** 0.5
    # tails of a standard normal: P(|z| > 2) = 0.0455, P(|z| > 3) = 0.0027
    assert abs((z.abs() > 2).double().mean().item() - 0.0455) < 0.006
    assert abs((z.abs() > 3).double().mean().item() - 0.0027) < 0.0015
    groups = z[: n - n % 4].reshape(-1, 4)
    for a, b in ((0, 1), (0, 2), (1, 3)):
        assert abs(torch.corrcoef(torch.stack([groups[:, a], groups[:, b]]))[0, 1].item()) < 0.03
