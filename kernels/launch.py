"""Launch helpers shared by the Triton launchers: block sizes, grids, and strided per-sample layouts.

Most generative-model hot paths are "per sample": an elementwise map over a tensor ``[batch, *rest]`` whose
coefficients depend on the sample (a timestep, a noise level), sometimes with a reduction over ``rest`` (a KL term,
a log-determinant). :func:`per_sample_layout` describes how to walk several same-shaped tensors that way without
copying them, whatever their strides: kernels get one batch stride and up to ``MAX_INNER_DIMS`` (size, stride)
pairs per tensor, and a constexpr fast path when every tensor's inner part is one contiguous run.
:class:`SampleWalk` wraps it for launchers with named tensors and in-kernel noise, which is keyed by each element's
row-major index so that every op draws the same noise for one seed whatever the layouts.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Iterator, Optional, Sequence

import torch
import triton

from .runtime import interpreter_enabled

MAX_INNER_DIMS = 4
NO_STRIDES = (0,) * (1 + MAX_INNER_DIMS)
# How a kernel gets its Gaussian noise (its NOISE_MODE constexpr): none, read from a tensor, or drawn with Philox,
# four draws at a time when the walk follows the row-major order, else element by element at its row-major index.
NOISE_NONE, NOISE_TENSOR, NOISE_PHILOX_BLOCK, NOISE_PHILOX_GATHER = 0, 1, 2, 3
# Largest grid size along CUDA's y and z axes.
MAX_GRID_YZ = 65535
# Launch settings forced by tests (to reach a code path at a small shape), keyed by op name. Never part of an op's
# schema: a registered op's arguments are what a user passes, and launchers read these through launch_setting().
_forced_settings: dict[str, dict[str, object]] = {}


@contextlib.contextmanager
def force_launch_settings(op_name: str, **settings: object) -> Iterator[None]:
    """Within the block, the launchers of ``op_name`` use ``settings`` (e.g. ``target_programs=1000`` to take
    GroupNorm's split path at a tiny shape) in place of what they would pick. For tests and experiments."""
    previous = _forced_settings.get(op_name)
    _forced_settings[op_name] = {**(previous or {}), **settings}
    try:
        yield
    finally:
        if previous is None:
            _forced_settings.pop(op_name)
        else:
            _forced_settings[op_name] = previous


def launch_setting(op_name: str, name: str, default: object) -> object:
    """The launch setting ``name`` of ``op_name``: forced by :func:`force_launch_settings`, else ``default``."""
    return _forced_settings.get(op_name, {}).get(name, default)


@dataclasses.dataclass(frozen=True)
class DeviceLimits:
    """What a launcher needs to know about the GPU it launches on (CUDA compute capability ``arch`` = 10 * major +
    minor): SM count, the shared memory one CTA may opt into and one SM holds, and the per-SM thread limits."""

    arch: int
    name: str
    sm_count: int
    shared_memory_per_cta: int
    shared_memory_per_sm: int
    max_warps_per_sm: int
    max_ctas_per_sm: int
    registers_per_sm: int = 65536


# The datacenter part of each architecture the kernels are built for (the SM count of the most common part; an
# actual device reports its own through device_limits()).
ARCH_LIMITS = {
    80: DeviceLimits(80, "A100", 108, 163 * 1024, 164 * 1024, 64, 32),
    86: DeviceLimits(86, "RTX A6000 / RTX 3090", 84, 99 * 1024, 100 * 1024, 48, 16),
    89: DeviceLimits(89, "L40S / RTX 4090", 142, 99 * 1024, 100 * 1024, 48, 24),
    90: DeviceLimits(90, "H100 SXM / H200", 132, 227 * 1024, 228 * 1024, 64, 32),
}

# Set while launches are captured for an architecture without running them (genkernels.bench.capture).
_capture_limits: Optional[DeviceLimits] = None


@contextlib.contextmanager
def capturing_for(limits: DeviceLimits) -> Iterator[None]:
    """Within the block, launchers behave as on a GPU with ``limits`` (its SM count, shared memory, native
    tensor-core dots), whatever device their tensors are on: how launches are captured for an architecture on a
    machine without one."""
    global _capture_limits
    previous, _capture_limits = _capture_limits, limits
    try:
        yield
    finally:
        _capture_limits = previous


def capturing() -> bool:
    """True inside :func:`capturing_for`."""
    return _capture_limits is not None


@functools.lru_cache(maxsize=None)
def _cuda_limits(index: int) -> DeviceLimits:
    properties = torch.cuda.get_device_properties(index)
    arch = 10 * properties.major + properties.minor
    known = ARCH_LIMITS.get(arch, ARCH_LIMITS[80])
    per_cta = getattr(properties, "shared_memory_per_block_optin", known.shared_memory_per_cta)
    per_sm = getattr(properties, "shared_memory_per_multiprocessor", known.shared_memory_per_sm)
    return dataclasses.replace(known, arch=arch, name=properties.name, sm_count=properties.multi_processor_count,
                               shared_memory_per_cta=per_cta, shared_memory_per_sm=per_sm)


def device_limits(device: torch.device) -> DeviceLimits:
    """The limits of ``device``: read once per CUDA device (cached); the captured architecture's inside
    :func:`capturing_for`; Hopper's for the CPU interpreter (which has no limits, so launches match an H100's)."""
    if _capture_limits is not None:
        return _capture_limits
    if device.type == "cuda":
        return _cuda_limits(device.index if device.index is not None else torch.cuda.current_device())
    return ARCH_LIMITS[90]


def native_dot(device: torch.device) -> bool:
    """Whether kernels hand fp16/bf16 tiles to ``tl.dot`` as they are (compiled on a GPU) rather than upcast to
    fp32 (the CPU interpreter multiplies 16-bit dot tiles wrongly); the ``NATIVE_DOT`` switch of
    :func:`genkernels.kernels.triton_helpers.dot`."""
    if _capture_limits is not None:
        return True
    return device.type == "cuda" and not interpreter_enabled()


def draw_philox_seed(device: torch.device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A Philox key for noise drawn inside a kernel, as a one-element int64 tensor on ``device``.

    Drawn on the device, not the host, so a CUDA-graph replay draws a fresh key (and no host sync is needed);
    kernels read it with ``tl.load(seed_ptr)``.
    """
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device, generator=generator)


def batch_chunks(batch: int, limit: int = MAX_GRID_YZ) -> Iterator[tuple[int, int]]:
    """Split ``batch`` into ``(start, count)`` chunks that fit a grid axis limited to ``limit`` programs."""
    for start in range(0, batch, limit):
        yield start, min(limit, batch - start)


@dataclasses.dataclass(frozen=True)
class PerSampleLayout:
    """How a kernel walks same-shaped tensors ``[batch, *rest]`` sample by sample.

    ``inner_sizes`` has ``MAX_INNER_DIMS`` entries, outermost first and padded with leading 1s; the inner index
    ``i`` in ``[0, inner_numel)`` unravels over them. ``strides[k]`` is ``(batch_stride, *inner_strides)`` of the
    k-th tensor, in elements. When ``inner_contiguous`` is true every tensor's element ``i`` of sample ``b`` sits
    at ``b * batch_stride + i`` and kernels skip the unravel.
    """

    batch: int
    inner_numel: int
    inner_sizes: tuple[int, ...]
    strides: tuple[tuple[int, ...], ...]
    inner_contiguous: bool


def collapse_inner_dims(shape: Sequence[int], strides: Sequence[Sequence[int]]) -> list[tuple[int, list[int]]]:
    """Order the non-batch dims of ``shape`` by the first tensor's strides (outermost first) and merge neighbours
    that every tensor walks as one contiguous run. Returns ``[(size, [stride per tensor]), ...]``."""
    dims = [d for d in range(1, len(shape)) if shape[d] != 1]
    # A stable sort keeps the logical order among dims the first tensor does not distinguish (e.g. broadcasts).
    dims.sort(key=lambda d: -abs(strides[0][d]))
    collapsed: list[tuple[int, list[int]]] = []
    for d in dims:
        size, tensor_strides = shape[d], [s[d] for s in strides]
        if collapsed:
            outer_size, outer_strides = collapsed[-1]
            if all(o == t * size for o, t in zip(outer_strides, tensor_strides)):
                collapsed[-1] = (outer_size * size, tensor_strides)
                continue
        collapsed.append((size, tensor_strides))
    return collapsed


def per_sample_layout(tensors: Sequence[torch.Tensor]) -> tuple[PerSampleLayout, list[torch.Tensor]]:
    """Describe how to walk ``tensors`` (same shape, batch first) sample by sample.

    The first tensor fixes the walking order: pass the output first so its writes are the coalesced ones.
    Returns the layout and the tensors to launch with. They are the given tensors, except in the one case a
    layout cannot express: more than ``MAX_INNER_DIMS`` inner dims that no reordering merges (a rank > 5 tensor
    with scattered strides). Then inputs after the first are copied into the first tensor's layout, which is
    dense, so the copies merge into one run.
    """
    shape = list(tensors[0].shape)
    batch = shape[0]
    inner_numel = 1
    for size in shape[1:]:
        inner_numel *= size
    strides = [list(t.stride()) for t in tensors]
    collapsed = collapse_inner_dims(shape, strides)
    if len(collapsed) > MAX_INNER_DIMS:
        first = tensors[0]
        if not is_dense(first):
            raise ValueError(f"cannot walk a first tensor of shape {list(first.shape)} and strides {first.stride()}")
        tensors = [first] + [torch.empty_like(first).copy_(t) for t in tensors[1:]]
        strides = [list(t.stride()) for t in tensors]
        collapsed = collapse_inner_dims(shape, strides)
    padding = MAX_INNER_DIMS - len(collapsed)
    inner_sizes = tuple([1] * padding + [size for size, _ in collapsed])
    per_tensor = []
    for k, tensor_strides in enumerate(strides):
        inner = [0] * padding + [dim_strides[k] for _, dim_strides in collapsed]
        per_tensor.append(tuple([tensor_strides[0] if batch > 1 else 0] + inner))
    inner_contiguous = len(collapsed) <= 1 and all(s[-1] == 1 for s in per_tensor)
    layout = PerSampleLayout(batch, inner_numel, inner_sizes, tuple(per_tensor), inner_contiguous)
    return layout, list(tensors)


def is_dense(tensor: torch.Tensor) -> bool:
    """True when ``tensor`` covers its storage span without gaps or overlap (any dim order)."""
    expected = 1
    for size, stride in sorted(zip(tensor.shape, tensor.stride()), key=lambda p: p[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


class _RowMajorIndex:
    """Stands in for a contiguous tensor of ``shape`` in :func:`per_sample_layout`: its walked offsets are the
    row-major indices that key in-kernel noise."""

    def __init__(self, shape: torch.Size):
        self.shape = shape
        strides, running = [], 1
        for size in reversed(shape):
            strides.append(running)
            running *= size
        self._strides = tuple(reversed(strides))

    def stride(self) -> tuple[int, ...]:
        return self._strides


class SampleWalk:
    """How an elementwise launcher walks named same-shaped tensors ``[batch, ...]`` (the first one coalesced),
    and where its Gaussian noise comes from.

    Noise drawn inside a kernel is keyed by (seed, sample, row-major index of the element), never by strides or
    block sizes, so every op draws the same noise for the same seed and shape whatever the layouts, and
    :func:`genkernels.kernels.philox.philox_normal` reproduces it in PyTorch. When the walk visits elements in
    row-major order the kernel draws four at a time (``NOISE_PHILOX_BLOCK``); otherwise (channels_last, permuted
    views) each element computes its own draw (``NOISE_PHILOX_GATHER``) from the row-major index strides
    ``index_strides``.

    Args:
        named: ``{name: tensor or None}``; None entries are left out (their strides read as zeros).
        outputs: names of tensors the kernel writes.
        noise: ``"tensor"`` (a tensor named "noise" is read), ``"drawn"`` (Philox) or ``None``.
    """

    def __init__(self, named: dict, outputs: tuple[str, ...] = (), noise: Optional[str] = None):
        named = {name: t for name, t in named.items() if t is not None}
        shape = next(iter(named.values())).shape
        drawn = noise == "drawn"
        index = [_RowMajorIndex(shape)] if drawn else []
        tensors = list(named.values())
        strides = [t.stride() for t in tensors + index]
        if len(collapse_inner_dims(shape, strides)) > MAX_INNER_DIMS:
            # more scattered dims than the kernels take (a rank > 5 permutation): walk contiguous copies, and copy
            # the outputs back into the given tensors afterwards (see output())
            tensors = [torch.empty(shape, dtype=t.dtype, device=t.device) if name in outputs else t.contiguous()
                       for name, t in named.items()]
        self.layout, walked = per_sample_layout(tensors + index)
        self.given = named
        self.tensors = dict(zip(named, walked))
        self._strides = dict(zip(named, self.layout.strides))
        self.index_strides = self.layout.strides[-1][1:] if drawn else NO_STRIDES[1:]
        if noise == "tensor":
            self.noise_mode = NOISE_TENSOR
        elif drawn:
            self.noise_mode = NOISE_PHILOX_BLOCK if self._walks_row_major() else NOISE_PHILOX_GATHER
        else:
            self.noise_mode = NOISE_NONE

    def _walks_row_major(self) -> bool:
        expected = 1
        for size, stride in reversed(list(zip(self.layout.inner_sizes, self.index_strides))):
            if size > 1 and stride != expected:
                return False
            expected *= size
        return True

    def strides(self, name: str) -> tuple[int, ...]:
        """``(batch_stride, *inner_strides)`` of tensor ``name`` (zeros for a tensor left out)."""
        return self._strides.get(name, NO_STRIDES)

    def tensor(self, name: str, placeholder: torch.Tensor) -> torch.Tensor:
        """The tensor to launch with for ``name``, or ``placeholder`` for one left out (a pointer a constexpr
        branch never reads)."""
        return self.tensors.get(name, placeholder)

    def output(self, name: str) -> torch.Tensor:
        """The given output tensor ``name``, holding what the kernels wrote."""
        walked, given = self.tensors[name], self.given[name]
        if walked is not given:
            given.copy_(walked)
        return given


# ----------------------------------------------------------------------------------------------------------------
# Per-sample elementwise kernels: contiguous walks, noise modes and whole-wave splits
# ----------------------------------------------------------------------------------------------------------------
# The kernels' NOISE_MODE: SampleWalk's modes (none, tensor, Philox four at a time, Philox element by element), the
# Philox modes computing the row-major index in int32 (a sample of < 2**31 elements, the launchers check), and
# their int64 versions for larger samples.
NOISE_BLOCK_64, NOISE_GATHER_64 = 4, 5


def walk_is_contiguous(walk: SampleWalk) -> bool:
    """Whether every tensor of ``walk`` holds element ``i`` of a sample at ``batch offset + i`` (``i`` the walk
    index), so kernels can address them with INNER_CONTIGUOUS. True for the layouts SampleWalk already calls
    inner-contiguous, and also when only the noise's row-major index splits the walk into several dims: a
    channels_last or permuted dense batch with drawn noise, whose loads and stores are then one 16-byte-aligned
    run (the index alone is unravelled, in int32)."""
    layout = walk.layout
    if layout.inner_contiguous:
        return True
    expected, running = [], 1
    for size in reversed(layout.inner_sizes):
        expected.append(running)
        running *= size
    expected.reverse()
    return all(all(size == 1 or stride == want for size, stride, want in zip(layout.inner_sizes, strides[1:], expected))
               for strides in (walk.strides(name) for name in walk.tensors))


def walk_noise_mode(walk: SampleWalk) -> int:
    """The NOISE_MODE for :func:`genkernels.kernels.triton_helpers.walk_noise`: the walk's, or the int64 versions of the Philox modes when a sample
    has 2**31 elements or more."""
    if walk.layout.inner_numel < 2**31:
        return walk.noise_mode
    return {NOISE_PHILOX_BLOCK: NOISE_BLOCK_64, NOISE_PHILOX_GATHER: NOISE_GATHER_64}.get(walk.noise_mode,
                                                                                        walk.noise_mode)


@dataclasses.dataclass(frozen=True)
class WaveSplit:
    """How a per-sample elementwise kernel covers ``[batch, inner]``: ``programs`` programs per sample (grid
    ``(programs, batch)``), program ``p`` walking units ``[p U / programs, (p + 1) U / programs)`` of the
    sample's ``U = cdiv(inner, tile / 16)`` units of ``tile / 16`` elements (two 16-byte vectors, and Philox
    groups of 4: every program starts 16-byte aligned and on a Philox group, and the spans differ by at most one
    unit; a unit of one vector made the spans' masks cost the bf16 coupling forward 8 registers), in steps of ``tile`` elements with ``num_warps`` warps."""

    tile: int
    programs: int
    num_warps: int = 1


# Launch settings the tests may force (launch.force_launch_settings(op, programs_per_sample=...)).
SPLIT_SETTING = "programs_per_sample"


def wave_split(op_name: str, inner_numel: int, batch: int, element_bytes: int, device: torch.device) -> WaveSplit:
    """Programs per sample so that the grid fills whole waves of the device.

    Every program is one warp, so at most ``max_ctas_per_sm`` of them are resident per SM (the CTA limit, 32 on
    sm_80/sm_90, binds before the register file while a kernel needs <= 64 registers per thread at one warp,
    which the compiled-code budgets hold): a wave is exactly ``sm_count * max_ctas_per_sm`` programs whatever the
    compiled register count. The grid ``programs * batch`` is the largest within one wave (within 2 or 3 for a
    batch too large for one) that fills >= 90% of it, else 4 waves; each program walks an equal share of its
    sample (to one unit) in tiles of one 16-byte vector per thread. A sample of fewer units than that gets one
    program per unit (a problem smaller than a wave). In the CPU interpreter (about 4 ms per program and tile) one
    program per sample walks it in tiles of up to 4096 elements, unless a test forces
    ``programs_per_sample``."""
    tile = 32 * max(4, 16 // element_bytes)  # one 16-byte vector per thread (at least one Philox group)
    units = max(1, triton.cdiv(inner_numel, tile // 16))
    forced = launch_setting(op_name, SPLIT_SETTING, None)
    if forced is not None:
        return WaveSplit(tile, max(1, min(int(forced), units)))
    if interpreter_enabled() and not capturing() and device.type != "cuda":
        tile = max(128, min(4096, triton.next_power_of_2(inner_numel)))
        return WaveSplit(tile, 1, max(1, min(8, tile // 512)))
    limits = device_limits(device)
    slots = limits.sm_count * limits.max_ctas_per_sm
    for waves in (1, 2, 3):
        programs = (waves * slots) // batch
        if programs >= 1 and programs * batch >= 0.9 * waves * slots:
            return WaveSplit(tile, min(programs, units))
    return WaveSplit(tile, min(units, triton.cdiv(4 * slots, batch)))
