"""Fused GroupNorm + SiLU (the normalization of every DDPM / Stable Diffusion U-Net block), forward and backward.

    y = act((x - mean_g) * rstd_g * weight[c] + bias[c]),   rstd_g = 1 / sqrt(var_g + eps)

with ``mean_g`` and the biased ``var_g`` taken over each (sample, group) of ``C / G`` channels times every spatial
position (Wu & He 2018, eq. 1-3), ``act`` SiLU (``z * sigmoid(z)``) or the identity, math in fp32.

Design (memory traffic first: the op is memory-bound, a few dozen flops per element against 2 element transfers
in the forward and 3 more in the backward):

* Tensors are walked as ``[N, C, S]`` views (the spatial dims collapsed into one), with strides passed to the
  kernels: NCHW (spatial contiguous) and channels_last / channels_last_3d (channels contiguous) are both read in
  place. A program's tile is ``[BLOCK_C, BLOCK_S]``, 4 KB of x (32 bytes, two 16-byte vectors, a thread at 4
  warps: 48-165 registers, 3-12 CTAs per SM on sm_90); for NCHW it spans one group's channels and a long spatial
  run, for channels_last it spans ``K`` whole groups (16 to 256 contiguous channels) so every row it reads is a
  long contiguous run rather than the 8-32 bytes one group owns. Strides equal to 1 are compile-time constants
  (Triton specializes them), so the compiler knows which tile axis is contiguous; for channels_last the launcher
  also passes ``ALIGN``, a power of two dividing every block's first channel and channel count, so rows load and
  store 16 bytes at a time; with a power-of-two group size the tile's channels are regrouped by a reshape
  (``GROUP_C``) instead of a ``[groups, channels]`` membership matrix (any other group size takes the matrix).
  A tensor whose spatial dims cannot be collapsed into one stride (e.g. a transposed H/W view) is copied once
  into NCHW first.
* Work unit = (sample, block of ``K`` groups, spatial chunk). PyTorch launches one program per (sample, group):
  32 programs at batch 1, a quarter of an H100's 132 SMs. When ``N * ceil(G / K)`` fills less than half a wave,
  each group's spatial extent is cut into chunks, balanced runs of whole tiles (:func:`plan_launch`), and the
  reduction goes in two kernels, each with its own chunk count so that each grid is whole waves of what its
  kernel holds per SM (:data:`CTAS_PER_SM`, from the compiled code):

  - forward: ``_group_norm_stats_kernel`` writes per-chunk ``(count, mean, M2 / M)``; ``_group_norm_forward_kernel``
    merges the chunks of its groups (Chan et al.'s parallel variance formula; reading a few KB of partials from L2)
    and normalizes its chunk. HBM traffic: x read twice, y written once; the second read of x mostly hits L2 at
    the sizes that need splitting (a batch-1 256x256x128 bf16 activation is 16 MB; an H100 has 50 MB of L2).
  - backward: ``_group_norm_backward_reduce_kernel`` writes per-(sample, channel, chunk) sums of
    ``dz * x_hat`` and ``dz`` (``dz`` = dy times the activation's derivative; they give dweight and dbias) and
    per-(sample, group, chunk) sums of ``dy_hat * x_hat`` and ``dy_hat`` (``dy_hat = dz * weight``);
    ``_group_norm_backward_kernel`` merges its groups' chunks and writes
    ``dx = rstd * (dy_hat - mean(dy_hat) - x_hat * mean(dy_hat * x_hat))``. x and dy are read twice (the second
    time mostly from L2), dx written once. The tile follows x's layout; a dy in another layout (rare: autograd
    hands back y's layout, which is x's) is read through its strides, correct but less coalesced.

  When the grid is already full, one program owns whole groups: the same forward / backward kernels run their
  statistics loop first (FUSED) and re-read their groups (64 KB or so: an L2 hit) for the elementwise loop, so
  the traffic is one HBM read of x (and dy) plus one write.
* The first read of x (and dy) is an ``evict_last`` load and the second an ``evict_first`` one, so L2 keeps what is
  about to be re-read rather than what was just written.
* Statistics are numerically two-pass: each tile's per-channel mean and M2 around that mean are computed in
  registers, and tiles, channels, chunks are merged with Chan's formula, so an input like ``1000 + noise`` keeps
  its variance (naive ``E[x^2] - E[x]^2`` in fp32 would lose every digit). They are also overflow-free: sums of
  values are taken of values scaled by a power of two (the tile width), and what is accumulated is ``M2 / M``
  (squared deviations scaled by ``1/sqrt(M)``, ``M`` the group's size), which no partial lets exceed the group's
  variance. Any finite fp32 input whose variance is finite in fp32 (values up to ~3e38) is normalized as in fp64;
  a variance past fp32's range gives ``rstd = 0``, as the fp32 reference does.
* The backward recomputes ``x_hat`` and the pre-activation from x and the saved ``[N, G]`` fp32 mean / rstd
  instead of saving them. ``dweight`` / ``dbias`` are the per-(sample, channel, chunk) partials above summed by
  torch reductions (fixed order, no atomics: bitwise reproducible run to run).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .checks import FLOAT_DTYPES, check_float_tensor, check_int, check_real, check_same_device, describe
from .launch import device_limits, launch_setting
from .runtime import choose_impl, compute_dtype
from .triton_helpers import sigmoid

ACTIVATIONS = ("silu", None)
# Bytes of x in one program's [BLOCK_C, BLOCK_S] tile and the warps that hold it: 32 bytes (two 16-byte vectors)
# a thread, so registers stay under 128 in the stats / forward kernels and every kernel keeps >= 3 CTAs per SM
# (8 warps and 16 bf16 elements a thread took 155-240 registers: one CTA per SM). TILE: the 16-bit tile's elements.
TILE_BYTES = 4096
TILE_WARPS = 4
TILE = TILE_BYTES // 2
# Contiguous channels a channels_last program reads per spatial position (512 bytes of bf16), and the most groups
# one program's [BLOCK_G, BLOCK_C] channel-to-group merge spans.
MAX_CHANNELS_INNER = 256
MAX_GROUPS_PER_BLOCK = 32
# Narrowest channels_last tile row when fewer groups per program are needed to fill the GPU (one 32-byte sector),
# and the shortest NCHW spatial tile a split may ask for.
MIN_ROW_BYTES = 32
WARP_VECTOR_BYTES = 32 * 16  # one 16-byte vector for each thread of a warp
MIN_SPATIAL_TILE = 64
# Partials of one group merged per step of the merge loop.
MAX_BLOCK_P = 64
# CTAs per SM each split kernel reaches on sm_90 at its 16-bit split tiles (TILE_WARPS warps; registers limit
# them: 48-96 registers in the stats and forward kernels, 72-165 in the backward pair, as the compiled-code report
# shows for triton 3.9; triton 3.6 allocates differently, e.g. 40 rather than 48 in the NCHW forward: 12, not 10,
# CTAs per SM), keyed by (kernel, channels_last) as (low, high); channels_last forward tiles spanning 16 or more groups
# and NCHW stats tiles 512 or more positions long hold more registers (the entries below). A split sizes each
# pass's grid so that it is whole waves (or >= 4 waves) at every count from low to high.
CTAS_PER_SM = {
    ("stats", False): (10, 10), ("stats", True): (5, 5),
    ("forward", False): (10, 10), ("forward", True): (7, 7),
    ("backward_reduce", False): (5, 5), ("backward_reduce", True): (3, 3),
    ("backward", False): (7, 7), ("backward", True): (4, 4),
}
CTAS_PER_SM_WIDE_FORWARD = (5, 5)
CTAS_PER_SM_LONG_STATS = (9, 9)
# A launch splits each group's positions over several programs when one program per group block would fill less
# than this fraction of one wave (below it, the second read of x a split costs buys the parallelism back).
SPLIT_BELOW = 0.5


# ----------------------------------------------------------------------------------------------------------------
# Eager reference: the specification, the fallback and the test oracle
# ----------------------------------------------------------------------------------------------------------------
def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format of the op's outputs: channels_last(_3d) when ``x`` keeps its channels innermost (like
    ``F.group_norm``), else contiguous (also when both describe ``x``, e.g. 1x1 spatial)."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.stride(1) == 1 and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.stride(1) == 1 and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def group_norm_silu_reference(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
                              bias: Optional[torch.Tensor] = None, eps: float = 1e-5,
                              activation: Optional[str] = "silu") -> torch.Tensor:
    """GroupNorm (Wu & He 2018, eq. 1-3) followed by SiLU, in plain PyTorch.

        mean_g = 1/M sum_{i in g} x_i,   var_g = 1/M sum_{i in g} (x_i - mean_g)^2   (M = C/G * prod(spatial))
        z = (x - mean_g) / sqrt(var_g + eps) * weight[c] + bias[c]
        y = z * sigmoid(z)  (activation "silu"; Elfwing et al. 2018)   or   y = z  (activation None)

    The variance is two-pass (around the mean). Computes in fp32 (fp64 for fp64 inputs) and returns ``x``'s dtype
    in :func:`output_memory_format`; differentiable by autograd.
    """
    dtype = compute_dtype(x.dtype)
    batch, channels = x.shape[:2]
    grouped = x.to(dtype).reshape(batch, num_groups, channels // num_groups * math.prod(x.shape[2:]))
    mean = grouped.mean(dim=-1, keepdim=True)
    centered = grouped - mean
    var = (centered * centered).mean(dim=-1, keepdim=True)
    z = (centered * torch.rsqrt(var + eps)).reshape(x.shape)
    per_channel = [1, channels] + [1] * (x.dim() - 2)
    if weight is not None:
        z = z * weight.to(dtype).reshape(per_channel)
    if bias is not None:
        z = z + bias.to(dtype).reshape(per_channel)
    y = F.silu(z) if activation == "silu" else z
    return y.to(x.dtype).contiguous(memory_format=output_memory_format(x))


# ----------------------------------------------------------------------------------------------------------------
# Launch planning: tile shape, groups per program, and the split of each group's spatial extent
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """How the kernels cover ``[N, C, S]``: programs own ``groups_per_block`` whole groups of one sample and a
    spatial chunk: each group's ``tiles`` tiles of ``block_s`` positions cut into ``chunks`` balanced runs. When
    split, the reducing pass (stats / backward reduce) runs its own grid of ``part_chunks`` chunks (each pass's grid
    sized to whole waves of its own kernel) and the normalizing pass merges those partials."""

    groups_per_block: int
    blocks_per_sample: int
    chunks: int
    part_chunks: int
    tiles: int
    block_c: int
    block_s: int
    block_g: int
    block_p: int
    num_warps: int
    align: int
    group_c: int

    @property
    def chunk_len(self) -> int:
        """Positions of the longest chunk of the normalizing pass."""
        return triton.cdiv(self.tiles, self.chunks) * self.block_s

    @property
    def split(self) -> bool:
        return self.chunks > 1 or self.part_chunks > 1

    def programs(self, batch: int, chunks: Optional[int] = None) -> int:
        return batch * self.blocks_per_sample * (self.chunks if chunks is None else chunks)


def split_waves(kernel: str, channels_inner: bool, block_g: int, block_s: int, sm_count: int) -> tuple[int, ...]:
    """The programs one wave of split ``kernel`` holds on ``sm_count`` SMs, for each CTAs-per-SM count the
    kernel may reach (:data:`CTAS_PER_SM`)."""
    low, high = CTAS_PER_SM[kernel, channels_inner]
    if kernel == "forward" and channels_inner and block_g >= 16:
        low, high = CTAS_PER_SM_WIDE_FORWARD
    if kernel == "stats" and not channels_inner and block_s >= 512:
        low, high = CTAS_PER_SM_LONG_STATS
    return tuple(ctas * sm_count for ctas in range(low, high + 1))


def _wave_fit(programs: int, waves: tuple[int, ...]) -> tuple[bool, float]:
    """Whether a grid of ``programs`` is at least 4 waves or fills 90% of its last wave for every wave size in
    ``waves``, and the least fraction of its slots it fills."""
    fits, worst = True, 1.0
    for wave in waves:
        count = programs / wave
        efficiency = programs / (math.ceil(count) * wave)
        fits = fits and (count >= 4 or efficiency >= 0.9)
        worst = min(worst, efficiency)
    return fits, worst


def _whole_wave_chunks(units: int, most: int, waves: tuple[int, ...]) -> int:
    """Chunks (at most ``most``) per each of ``units`` work units so that the grid is whole waves (>= 90% of its
    last wave, or >= 4 waves) of every wave size in ``waves``: the fewest that fill at least one wave, else the
    count that fills the most of its last wave."""
    best, best_score = 1, None
    for chunks in range(1, most + 1):
        fits, efficiency = _wave_fit(units * chunks, waves)
        if fits and units * chunks >= max(waves):
            return chunks
        score = (fits, efficiency, chunks)
        if best_score is None or score > best_score:
            best, best_score = chunks, score
    return best


@functools.lru_cache(maxsize=1024)
def plan_launch(batch: int, channels: int, num_groups: int, spatial: int, channels_inner: bool,
                target_programs: int, tile: int = TILE, element_size: int = 2, backward: bool = False,
                sm_count: int = 0) -> LaunchPlan:
    """Choose the tile, the groups per program and the split.

    ``target_programs``: the programs one wave holds (both passes), or 0: the waves of the kernels of the forward
    (stats, forward) or the ``backward`` pass (reduce, backward) on ``sm_count`` SMs (:func:`split_waves`).
    ``element_size``: bytes per element of x (the tile holds 32 bytes per thread).
    ``channels_inner``: the channel axis is the contiguous one (channels_last); the tile then spans up to
    ``MAX_CHANNELS_INNER`` channels of ``K`` whole groups, fewer (down to ``MIN_ROW_BYTES``) when more
    programs are needed. Otherwise (NCHW) a program owns one group and the tile is long along the spatial axis,
    or several whole groups when one is too small for a warp of 16-byte vectors (while the grid stays above the
    split threshold).
    Each group's spatial extent is cut into chunks when ``batch * ceil(G / K)`` programs fill less than
    ``SPLIT_BELOW`` of a wave; each pass's chunk count then makes its grid whole waves
    (:func:`_whole_wave_chunks`). Chunks are balanced runs of at least one tile, and at most
    ``sqrt(C/G * S / 24)`` of them so that the partials every program merges (3 per chunk and group) stay below
    ~1/8 of the elements it reads. Cached: it runs on every call.
    """
    group_channels = channels // num_groups
    spatial = max(spatial, 1)
    spatial_pow2 = triton.next_power_of_2(spatial)
    max_chunks = max(1, math.isqrt(group_channels * spatial // 24))
    normalize_kernel, reduce_kernel = ("backward", "backward_reduce") if backward else ("forward", "stats")

    def waves(kernel: str, block_g: int = 1, block_s: int = 1) -> tuple[int, ...]:
        if target_programs > 0:
            return (target_programs,)
        return split_waves(kernel, channels_inner, block_g, block_s, max(sm_count, 1))

    wave = max(waves(normalize_kernel) + waves(reduce_kernel))
    if channels_inner:
        groups_per_block = max(1, min(num_groups, MAX_CHANNELS_INNER // group_channels, MAX_GROUPS_PER_BLOCK))
        groups_per_block = _floor_power_of_2(groups_per_block)
        while (groups_per_block > 1 and groups_per_block * group_channels * element_size > MIN_ROW_BYTES
               and batch * triton.cdiv(num_groups, groups_per_block) < SPLIT_BELOW * wave
               and batch * triton.cdiv(num_groups, groups_per_block) * max_chunks < wave):
            groups_per_block //= 2
        block_c = min(triton.next_power_of_2(groups_per_block * group_channels), MAX_CHANNELS_INNER, tile)
        block_s = max(1, min(spatial_pow2, tile // block_c))
    else:
        groups_per_block = 1
        block_s = min(spatial_pow2, tile)
        if batch * num_groups < SPLIT_BELOW * wave:  # a split: tiles of all the group's channels, chosen finely
            block_s = min(block_s, max(MIN_SPATIAL_TILE, tile // triton.next_power_of_2(group_channels)))
        block_c = max(1, min(triton.next_power_of_2(group_channels), tile // block_s))
        group_bytes = group_channels * block_s * element_size
        if block_c >= group_channels and block_s >= spatial and group_bytes < WARP_VECTOR_BYTES:
            # a group too small for one warp of 16-byte vectors (a deep U-Net level: 8 bf16 channels of 4x4) is
            # contiguous with its neighbours in NCHW too: a program takes just enough of them for one warp's
            # vectors, as long as the grid stays above the split threshold
            groups_per_block = min(triton.next_power_of_2(-(-WARP_VECTOR_BYTES // group_bytes)),
                                   _floor_power_of_2(num_groups), MAX_GROUPS_PER_BLOCK)
            while groups_per_block > 1 and batch * triton.cdiv(num_groups, groups_per_block) < SPLIT_BELOW * wave:
                groups_per_block //= 2
            block_c = triton.next_power_of_2(groups_per_block * group_channels)
    blocks_per_sample = triton.cdiv(num_groups, groups_per_block)
    tiles = triton.cdiv(spatial, block_s)
    units = max(1, batch * blocks_per_sample)
    block_g = triton.next_power_of_2(groups_per_block)
    chunks = part_chunks = 1
    if units < SPLIT_BELOW * wave and min(tiles, max_chunks) > 1:
        chunks = _whole_wave_chunks(units, min(tiles, max_chunks), waves(normalize_kernel, block_g, block_s))
        part_chunks = _whole_wave_chunks(units, min(tiles, max_chunks), waves(reduce_kernel, block_g, block_s))
    block_p = min(triton.next_power_of_2(part_chunks), MAX_BLOCK_P)
    # 32 bytes (two 16-byte vectors) of the tile per thread
    num_warps = max(1, min(TILE_WARPS, block_c * block_s * element_size // 1024))
    align = 1
    if channels_inner:
        block_channels = groups_per_block * group_channels if num_groups % groups_per_block == 0 else group_channels
        align = min(16, block_channels & -block_channels)
    # whole groups of a power-of-two channel count fill the tile's channel axis: group by reshaping
    grouped = (block_g > 1 and group_channels & (group_channels - 1) == 0 and block_c == block_g * group_channels)
    return LaunchPlan(groups_per_block, blocks_per_sample, chunks, part_chunks, tiles, block_c, block_s, block_g,
                      block_p, num_warps, align, group_channels if grouped else 0)


def _floor_power_of_2(value: int) -> int:
    return 1 << (max(value, 1).bit_length() - 1)


def _collapsed_strides(t: torch.Tensor) -> Optional[tuple[int, int, int]]:
    """``(batch, channel, spatial)`` strides of ``t`` seen as ``[N, C, S]``, or None when its spatial dims are not
    one evenly strided run."""
    spatial = [(size, stride) for size, stride in zip(t.shape[2:], t.stride()[2:]) if size != 1]
    for (_, outer), (size, inner) in zip(spatial, spatial[1:]):
        if outer != inner * size:
            return None
    return t.stride(0), t.stride(1), (spatial[-1][1] if spatial else 1)


def _as_ncs(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``t`` and its ``[N, C, S]`` strides; the one copy this module makes is here, for spatial dims that do not
    collapse (e.g. a transposed H/W view), into NCHW."""
    strides = _collapsed_strides(t)
    if strides is None:
        t = t.contiguous()
        strides = _collapsed_strides(t)
    return t, strides


def _spatial_size(x: torch.Tensor) -> int:
    return math.prod(x.shape[2:])


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
# Largest finite fp32: a merge whose mean difference overflows past it takes the overflow-free mean formula.
FP32_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _chan_merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b, inv_sqrt_size):
    """Merge two sets' (count, mean, M2 / M) (Chan, Golub & LeVeque 1979): exact, no cancellation.

    ``M2 / M`` (the sum of squared deviations divided by the group's size ``M``, ``inv_sqrt_size = 1/sqrt(M)``)
    is at most the group's variance, and so is every intermediate here: nothing overflows unless the variance
    itself does. The mean takes the convex form when the two means are too far apart to subtract."""
    total = count_a + count_b
    weight_b = count_b / tl.maximum(total, 1.0)
    delta = mean_b - mean_a
    mean = mean_a + delta * weight_b
    mean = tl.where(tl.abs(delta) <= FP32_MAX, mean, mean_a * (1.0 - weight_b) + mean_b * weight_b)
    scaled = delta * inv_sqrt_size
    m2 = m2_a + m2_b + scaled * (scaled * (count_a * weight_b))
    return total, mean, m2


@triton.jit
def _program_coordinates(blocks_per_sample, chunks, groups_per_block, num_groups, group_channels,
                         ALIGN: tl.constexpr):
    """(sample, first group, groups in the block, first channel, channels in the block, chunk) of this program.

    ``ALIGN``: a power of two the launcher knows divides the block's first channel and channel count (a multiple
    of the group's channel count, or of the block's when every block holds the same groups): with it the compiler
    sees channels_last rows start on vector boundaries and end on them, and loads and stores them 16 bytes at a
    time."""
    pid = tl.program_id(0)
    chunk = pid % chunks
    rest = pid // chunks
    block = rest % blocks_per_sample
    sample = rest // blocks_per_sample
    first_group = block * groups_per_block
    block_groups = tl.minimum(groups_per_block, num_groups - first_group)
    first_channel = first_group * group_channels
    block_channels = block_groups * group_channels
    if ALIGN > 1:
        first_channel = tl.multiple_of(first_channel, ALIGN)
        block_channels = tl.multiple_of(block_channels, ALIGN)
    return sample, first_group, block_groups, first_channel, block_channels, chunk


@triton.jit
def _chunk_positions(chunk, chunks, tiles, spatial, BLOCK_S: tl.constexpr):
    """``[s_begin, s_end)``: chunk ``chunk`` of ``chunks`` balanced runs of whole tiles over a group's ``tiles``
    tiles of ``BLOCK_S`` positions (run lengths differ by at most one tile, so any chunk count is possible)."""
    s_begin = (chunk.to(tl.int64) * tiles // chunks) * BLOCK_S
    s_end = tl.minimum(((chunk + 1).to(tl.int64) * tiles // chunks) * BLOCK_S, spatial)
    return s_begin, s_end


@triton.jit
def _block_stats(x_ptr, x_base, x_sc, x_ss, first_channel, block_channels, group_channels, s_begin, s_end,
                 inv_sqrt_size, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr,
                 GROUP_C: tl.constexpr):
    """``(count, mean, M2 / M)`` of each of the block's groups (``[BLOCK_G]``) over positions ``[s_begin, s_end)``.

    Per channel sub-tile: per-channel statistics over the spatial loop (two-pass inside each tile, Chan-merged
    across tiles), then merged into the groups (a channel's spread around its group's mean is added to M2).
    Overflow-free for any finite fp32 input whose group variance is finite: values are summed scaled by the
    (power-of-two) tile width, deviations are squared scaled by ``1/sqrt(M)``."""
    g = tl.arange(0, BLOCK_G)
    count = tl.zeros([BLOCK_G], tl.float32)
    mean = tl.zeros([BLOCK_G], tl.float32)
    m2 = tl.zeros([BLOCK_G], tl.float32)
    for c0 in range(0, block_channels, BLOCK_C):
        local = c0 + tl.arange(0, BLOCK_C)
        c_mask = local < block_channels
        channel = first_channel + local
        ch_count = tl.zeros([BLOCK_C], tl.float32)
        ch_mean = tl.zeros([BLOCK_C], tl.float32)
        ch_m2 = tl.zeros([BLOCK_C], tl.float32)
        x_rows = x_ptr + x_base + channel.to(tl.int64)[:, None] * x_sc
        for s0 in range(s_begin, s_end, BLOCK_S):
            position = s0 + tl.arange(0, BLOCK_S).to(tl.int64)
            mask = c_mask[:, None] & (position < s_end)[None, :]
            x = tl.load(x_rows + position[None, :] * x_ss, mask=mask, other=0.0,
                        eviction_policy="evict_last").to(tl.float32)
            tile_count = tl.minimum(s_end - s0, BLOCK_S).to(tl.float32)
            # scaled by 1 / BLOCK_S (a power of two: exact) the sum of up to BLOCK_S values stays finite, and the
            # mean is the same number as sum(x) / count
            tile_mean = tl.sum(x * (1.0 / BLOCK_S), axis=1) / (tile_count * (1.0 / BLOCK_S))
            centered = tl.where(mask, (x - tile_mean[:, None]) * inv_sqrt_size, 0.0)
            ch_count, ch_mean, ch_m2 = _chan_merge(ch_count, ch_mean, ch_m2, tile_count, tile_mean,
                                                   tl.sum(centered * centered, axis=1), inv_sqrt_size)
        positions = tl.max(ch_count, axis=0)  # every channel saw the same positions
        by_group_mean, member = _by_group(ch_mean, local, c_mask, group_channels, BLOCK_G, GROUP_C)
        by_group_m2, _ = _by_group(ch_m2, local, c_mask, group_channels, BLOCK_G, GROUP_C)
        channels_in = tl.sum(member.to(tl.float32), axis=1)
        sub_mean = (tl.sum(tl.where(member, by_group_mean * (1.0 / BLOCK_C), 0.0), axis=1)
                    / (tl.maximum(channels_in, 1.0) * (1.0 / BLOCK_C)))
        spread = tl.where(member, (by_group_mean - sub_mean[:, None]) * inv_sqrt_size, 0.0)
        sub_m2 = (tl.sum(tl.where(member, by_group_m2, 0.0), axis=1)
                  + tl.sum(spread * spread * positions, axis=1))
        count, mean, m2 = _chan_merge(count, mean, m2, channels_in * positions, sub_mean, sub_m2, inv_sqrt_size)
    return count, mean, m2


@triton.jit
def _merge_partials(part_ptr, plane, row, block_groups, chunks, inv_sqrt_size, BLOCK_G: tl.constexpr,
                    BLOCK_P: tl.constexpr):
    """Merge the ``chunks`` partial (count, mean, M2 / M) of groups ``row .. row + block_groups``
    (``[BLOCK_G]``; ``row`` int64), overflow-free as :func:`_chan_merge`."""
    g = tl.arange(0, BLOCK_G)
    count = tl.zeros([BLOCK_G], tl.float32)
    mean = tl.zeros([BLOCK_G], tl.float32)
    m2 = tl.zeros([BLOCK_G], tl.float32)
    for p0 in range(0, chunks, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (g < block_groups)[:, None] & (p < chunks)[None, :]
        offsets = (row + g)[:, None] * chunks + p[None, :]
        part_count = tl.load(part_ptr + offsets, mask=mask, other=0.0)
        part_mean = tl.load(part_ptr + (offsets + plane), mask=mask, other=0.0)
        part_m2 = tl.load(part_ptr + (offsets + plane + plane), mask=mask, other=0.0)
        step_count = tl.sum(part_count, axis=1)
        share = part_count / tl.maximum(step_count, 1.0)[:, None]
        # the mean around the first chunk's (exact for close means), or, when the means are too far apart to
        # subtract, their convex combination (no overflow)
        pivot = tl.sum(tl.where(p[None, :] == p0, part_mean, 0.0), axis=1)
        shift = tl.sum(tl.where(mask, share * (part_mean - pivot[:, None]), 0.0), axis=1)
        step_mean = tl.where(tl.abs(shift) <= FP32_MAX, pivot + shift, tl.sum(share * part_mean, axis=1))
        spread = tl.where(mask, (part_mean - step_mean[:, None]) * inv_sqrt_size, 0.0)
        step_m2 = tl.sum(part_m2 + spread * spread * part_count, axis=1)
        count, mean, m2 = _chan_merge(count, mean, m2, step_count, step_mean, step_m2, inv_sqrt_size)
    return count, mean, m2


@triton.jit
def _by_group(values, local, c_mask, group_channels, BLOCK_G: tl.constexpr, GROUP_C: tl.constexpr):
    """Per-channel ``values`` ``[BLOCK_C]`` seen by group: ``(values, member)``, both broadcastable to
    ``[BLOCK_G, X]``, ``member`` true where a channel of the block belongs to the row's group.

    ``GROUP_C > 0``: the block's ``BLOCK_C`` channels are ``BLOCK_G`` whole groups of ``GROUP_C`` channels (a power
    of two), so a reshape to ``[BLOCK_G, GROUP_C]`` is the grouping (no ``[BLOCK_G, BLOCK_C]`` membership matrix in
    registers); otherwise (any channel count) the membership matrix."""
    if GROUP_C > 0:
        grouped = tl.reshape(values, [BLOCK_G, GROUP_C])
        member = tl.reshape(c_mask, [BLOCK_G, GROUP_C])
    else:
        grouped = values[None, :]
        member = (tl.arange(0, BLOCK_G)[:, None] == (local // group_channels)[None, :]) & c_mask[None, :]
    return grouped, member


@triton.jit
def _groups_to_channels(values, local, group_channels, BLOCK_G: tl.constexpr, GROUP_C: tl.constexpr):
    """Spread per-group ``values`` ``[BLOCK_G]`` to the block's channels ``local`` ``[BLOCK_C]``."""
    if GROUP_C > 0:
        spread = tl.reshape(tl.broadcast_to(values[:, None], [BLOCK_G, GROUP_C]), [BLOCK_G * GROUP_C])
    else:
        member = tl.arange(0, BLOCK_G)[:, None] == (local // group_channels)[None, :]
        spread = tl.sum(tl.where(member, values[:, None], 0.0), axis=0)
    return spread


@triton.jit
def _channels_to_groups(values, local, c_mask, group_channels, BLOCK_G: tl.constexpr, GROUP_C: tl.constexpr):
    """Sum per-channel ``values`` ``[BLOCK_C]`` into the block's groups ``[BLOCK_G]``."""
    grouped, member = _by_group(values, local, c_mask, group_channels, BLOCK_G, GROUP_C)
    return tl.sum(tl.where(member, grouped, 0.0), axis=1)


@triton.jit
def _affine(w_ptr, b_ptr, w_sc, b_sc, channel, c_mask, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """``weight[c]`` and ``bias[c]`` of channels ``channel`` as fp32 (1 and 0 when absent), read through the
    parameters' strides ``w_sc`` / ``b_sc`` (a sliced or expanded parameter is read in place)."""
    if HAS_WEIGHT:
        w = tl.load(w_ptr + channel.to(tl.int64) * w_sc, mask=c_mask, other=0.0).to(tl.float32)
    else:
        w = tl.where(c_mask, 1.0, 0.0)
    if HAS_BIAS:
        b = tl.load(b_ptr + channel.to(tl.int64) * b_sc, mask=c_mask, other=0.0).to(tl.float32)
    else:
        b = tl.zeros_like(w)
    return w, b


@triton.jit
def _group_norm_stats_kernel(
    x_ptr, part_ptr, num_groups, group_channels, spatial, blocks_per_sample, groups_per_block, chunks, tiles,
    part_plane, x_sn, x_sc, x_ss, inv_sqrt_size,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr, ALIGN: tl.constexpr,
    GROUP_C: tl.constexpr,
):
    """Split forward, pass 1: (count, mean, M2 / M) of each group of the block over this program's chunk, stored
    at ``part[plane, sample * G + group, chunk]`` (planes: count, mean, M2 / M)."""
    sample, first_group, block_groups, first_channel, block_channels, chunk = _program_coordinates(
        blocks_per_sample, chunks, groups_per_block, num_groups, group_channels, ALIGN)
    s_begin, s_end = _chunk_positions(chunk, chunks, tiles, spatial, BLOCK_S)
    count, mean, m2 = _block_stats(x_ptr, sample.to(tl.int64) * x_sn, x_sc, x_ss, first_channel, block_channels,
                                   group_channels, s_begin, s_end, inv_sqrt_size, BLOCK_C, BLOCK_S, BLOCK_G,
                                   GROUP_C)
    g = tl.arange(0, BLOCK_G)
    offsets = (sample.to(tl.int64) * num_groups + first_group + g) * chunks + chunk
    mask = g < block_groups
    tl.store(part_ptr + offsets, count, mask=mask)
    tl.store(part_ptr + (offsets + part_plane), mean, mask=mask)
    tl.store(part_ptr + (offsets + part_plane + part_plane), m2, mask=mask)


@triton.jit
def _group_norm_forward_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, part_ptr,
    num_groups, group_channels, spatial, blocks_per_sample, groups_per_block, chunks, tiles, part_chunks,
    part_plane, x_sn, x_sc, x_ss, y_sn, y_sc, y_ss, w_sc, b_sc, eps, inv_sqrt_size,
    SILU: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, FUSED_STATS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr,
    ALIGN: tl.constexpr, GROUP_C: tl.constexpr,
):
    """The block's group statistics (its own loop when FUSED_STATS, else merged from the stats kernel's
    partials), then ``y = act((x - mean) * rstd * w + b)`` over this program's chunk. A variance past fp32's range
    gives ``rstd = 0``, as the fp32 reference does."""
    sample, first_group, block_groups, first_channel, block_channels, chunk = _program_coordinates(
        blocks_per_sample, chunks, groups_per_block, num_groups, group_channels, ALIGN)
    x_base = sample.to(tl.int64) * x_sn
    y_base = sample.to(tl.int64) * y_sn
    s_begin, s_end = _chunk_positions(chunk, chunks, tiles, spatial, BLOCK_S)
    row = sample.to(tl.int64) * num_groups + first_group
    if FUSED_STATS:
        count, mean, var = _block_stats(x_ptr, x_base, x_sc, x_ss, first_channel, block_channels, group_channels,
                                        s_begin, s_end, inv_sqrt_size, BLOCK_C, BLOCK_S, BLOCK_G, GROUP_C)
    else:
        count, mean, var = _merge_partials(part_ptr, part_plane, row, block_groups, part_chunks, inv_sqrt_size,
                                           BLOCK_G, BLOCK_P)
    rstd = 1.0 / tl.sqrt(var + eps)
    g = tl.arange(0, BLOCK_G)
    first_chunk = g < tl.where(chunk == 0, block_groups, 0)  # one program per group stores its statistics
    tl.store(mean_ptr + row + g, mean, mask=first_chunk)
    tl.store(rstd_ptr + row + g, rstd, mask=first_chunk)
    for c0 in range(0, block_channels, BLOCK_C):
        local = c0 + tl.arange(0, BLOCK_C)
        c_mask = local < block_channels
        channel = first_channel + local
        w, b = _affine(w_ptr, b_ptr, w_sc, b_sc, channel, c_mask, HAS_WEIGHT, HAS_BIAS)
        ch_mean = _groups_to_channels(mean, local, group_channels, BLOCK_G, GROUP_C)
        ch_scale = _groups_to_channels(rstd, local, group_channels, BLOCK_G, GROUP_C) * w
        x_rows = x_ptr + x_base + channel.to(tl.int64)[:, None] * x_sc
        y_rows = y_ptr + y_base + channel.to(tl.int64)[:, None] * y_sc
        for s0 in range(s_begin, s_end, BLOCK_S):
            position = s0 + tl.arange(0, BLOCK_S).to(tl.int64)
            mask = c_mask[:, None] & (position < s_end)[None, :]
            x = tl.load(x_rows + position[None, :] * x_ss, mask=mask, other=0.0,
                        eviction_policy="evict_first").to(tl.float32)
            z = (x - ch_mean[:, None]) * ch_scale[:, None] + b[:, None]
            if SILU:
                z = z * sigmoid(z)
            tl.store(y_rows + position[None, :] * y_ss, z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_tile(x_rows, dy_rows, position, mask, x_ss, dy_ss, ch_mean, ch_rstd, w, b, SILU: tl.constexpr,
                   EVICTION: tl.constexpr):
    """``(x_hat, dz)`` of one tile: the normalized input and the gradient at the pre-activation
    ``z = x_hat * w + b``: ``dz = dy * silu'(z)``, ``silu'(z) = s (1 + z (1 - s))`` with ``s = sigmoid(z)``.
    ``EVICTION``: the reduction pass asks L2 to keep x and dy for the pass that writes dx, which drops them."""
    x = tl.load(x_rows + position[None, :] * x_ss, mask=mask, other=0.0, eviction_policy=EVICTION).to(tl.float32)
    dy = tl.load(dy_rows + position[None, :] * dy_ss, mask=mask, other=0.0, eviction_policy=EVICTION).to(tl.float32)
    x_hat = tl.where(mask, (x - ch_mean[:, None]) * ch_rstd[:, None], 0.0)
    if SILU:
        z = x_hat * w[:, None] + b[:, None]
        s = sigmoid(z)
        dy = dy * (s * (1.0 + z * (1.0 - s)))
    return x_hat, dy


@triton.jit
def _saved_stats(mean_ptr, rstd_ptr, sample, num_groups, channel, c_mask, group_channels):
    row = sample.to(tl.int64) * num_groups + channel // group_channels
    return (tl.load(mean_ptr + row, mask=c_mask, other=0.0), tl.load(rstd_ptr + row, mask=c_mask, other=0.0))


@triton.jit
def _block_grad_sums(x_ptr, dy_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, part_ptr, sample, num_groups,
                     group_channels, first_channel, block_channels, s_begin, s_end, chunks, chunk, part_plane,
                     x_base, dy_base, x_sc, x_ss, dy_sc, dy_ss, w_sc, b_sc,
                     SILU: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr,
                     GROUP_C: tl.constexpr):
    """Per channel over ``[s_begin, s_end)``: ``sum(dz * x_hat)`` and ``sum(dz)``, stored at
    ``part[plane, sample * C + channel, chunk]`` (for dweight / dbias); returns their weighted per-group sums
    ``sum(dy_hat * x_hat)`` and ``sum(dy_hat)`` ``[BLOCK_G]``, ``dy_hat = dz * w``."""
    group_dot = tl.zeros([BLOCK_G], tl.float32)
    group_sum = tl.zeros([BLOCK_G], tl.float32)
    channels = num_groups * group_channels
    for c0 in range(0, block_channels, BLOCK_C):
        local = c0 + tl.arange(0, BLOCK_C)
        c_mask = local < block_channels
        channel = first_channel + local
        w, b = _affine(w_ptr, b_ptr, w_sc, b_sc, channel, c_mask, HAS_WEIGHT, HAS_BIAS)
        ch_mean, ch_rstd = _saved_stats(mean_ptr, rstd_ptr, sample, num_groups, channel, c_mask, group_channels)
        # Elementwise accumulators, reduced once after the loop (no cross-thread reduction per tile).
        dot_acc = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
        total_acc = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
        x_rows = x_ptr + x_base + channel.to(tl.int64)[:, None] * x_sc
        dy_rows = dy_ptr + dy_base + channel.to(tl.int64)[:, None] * dy_sc
        for s0 in range(s_begin, s_end, BLOCK_S):
            position = s0 + tl.arange(0, BLOCK_S).to(tl.int64)
            mask = c_mask[:, None] & (position < s_end)[None, :]
            x_hat, dz = _backward_tile(x_rows, dy_rows, position, mask, x_ss, dy_ss, ch_mean, ch_rstd, w, b, SILU,
                                       "evict_last")
            dot_acc += dz * x_hat
            total_acc += dz
        dot = tl.sum(dot_acc, axis=1)
        total = tl.sum(total_acc, axis=1)
        offsets = (sample.to(tl.int64) * channels + channel) * chunks + chunk
        tl.store(part_ptr + offsets, dot, mask=c_mask)
        tl.store(part_ptr + (offsets + part_plane), total, mask=c_mask)
        group_dot += _channels_to_groups(dot * w, local, c_mask, group_channels, BLOCK_G, GROUP_C)
        group_sum += _channels_to_groups(total * w, local, c_mask, group_channels, BLOCK_G, GROUP_C)
    return group_dot, group_sum


@triton.jit
def _group_norm_backward_reduce_kernel(
    x_ptr, dy_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, part_ptr, group_part_ptr,
    num_groups, group_channels, spatial, blocks_per_sample, groups_per_block, chunks, tiles, part_plane,
    group_part_plane, x_sn, x_sc, x_ss, dy_sn, dy_sc, dy_ss, w_sc, b_sc,
    SILU: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr, ALIGN: tl.constexpr,
    GROUP_C: tl.constexpr,
):
    """Split backward, pass 1: per-(sample, channel, chunk) ``sum(dz * x_hat)`` and ``sum(dz)`` (for dweight and
    dbias), and per-(sample, group, chunk) ``sum(dy_hat * x_hat)`` and ``sum(dy_hat)`` at
    ``group_part[plane, sample * G + group, chunk]``."""
    sample, first_group, block_groups, first_channel, block_channels, chunk = _program_coordinates(
        blocks_per_sample, chunks, groups_per_block, num_groups, group_channels, ALIGN)
    s_begin, s_end = _chunk_positions(chunk, chunks, tiles, spatial, BLOCK_S)
    group_dot, group_sum = _block_grad_sums(
        x_ptr, dy_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, part_ptr, sample, num_groups, group_channels, first_channel,
        block_channels, s_begin, s_end, chunks, chunk, part_plane, sample.to(tl.int64) * x_sn,
        sample.to(tl.int64) * dy_sn, x_sc, x_ss, dy_sc, dy_ss, w_sc, b_sc, SILU, HAS_WEIGHT, HAS_BIAS, BLOCK_C,
        BLOCK_S, BLOCK_G, GROUP_C)
    g = tl.arange(0, BLOCK_G)
    offsets = (sample.to(tl.int64) * num_groups + first_group + g) * chunks + chunk
    tl.store(group_part_ptr + offsets, group_dot, mask=g < block_groups)
    tl.store(group_part_ptr + (offsets + group_part_plane), group_sum, mask=g < block_groups)


@triton.jit
def _group_norm_backward_kernel(
    x_ptr, dy_ptr, dx_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, part_ptr, group_part_ptr,
    num_groups, group_channels, spatial, blocks_per_sample, groups_per_block, chunks, tiles, part_plane,
    group_part_plane, part_chunks, x_sn, x_sc, x_ss, dy_sn, dy_sc, dy_ss, dx_sn, dx_sc, dx_ss, w_sc, b_sc,
    inv_group_size,
    SILU: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, FUSED_REDUCE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr,
    ALIGN: tl.constexpr, GROUP_C: tl.constexpr,
):
    """``dx = rstd * (dy_hat - mean_g(dy_hat) - x_hat * mean_g(dy_hat * x_hat))`` over this program's chunk.

    The group means come from the block's own reduction loop (FUSED_REDUCE, one chunk per group) or from the
    reduce kernel's per-(group, chunk) partials."""
    sample, first_group, block_groups, first_channel, block_channels, chunk = _program_coordinates(
        blocks_per_sample, chunks, groups_per_block, num_groups, group_channels, ALIGN)
    x_base = sample.to(tl.int64) * x_sn
    dy_base = sample.to(tl.int64) * dy_sn
    dx_base = sample.to(tl.int64) * dx_sn
    s_begin, s_end = _chunk_positions(chunk, chunks, tiles, spatial, BLOCK_S)
    if FUSED_REDUCE:
        group_dot, group_sum = _block_grad_sums(
            x_ptr, dy_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, part_ptr, sample, num_groups, group_channels,
            first_channel, block_channels, s_begin, s_end, chunks, chunk, part_plane, x_base, dy_base, x_sc, x_ss,
            dy_sc, dy_ss, w_sc, b_sc, SILU, HAS_WEIGHT, HAS_BIAS, BLOCK_C, BLOCK_S, BLOCK_G, GROUP_C)
    else:
        g = tl.arange(0, BLOCK_G)
        group_dot = tl.zeros([BLOCK_G], tl.float32)
        group_sum = tl.zeros([BLOCK_G], tl.float32)
        for p0 in range(0, part_chunks, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            mask = (g < block_groups)[:, None] & (p < part_chunks)[None, :]
            offsets = (sample.to(tl.int64) * num_groups + first_group + g)[:, None] * part_chunks + p[None, :]
            group_dot += tl.sum(tl.load(group_part_ptr + offsets, mask=mask, other=0.0), axis=1)
            group_sum += tl.sum(tl.load(group_part_ptr + (offsets + group_part_plane), mask=mask, other=0.0),
                                axis=1)
    group_dot = group_dot * inv_group_size
    group_sum = group_sum * inv_group_size
    for c0 in range(0, block_channels, BLOCK_C):
        local = c0 + tl.arange(0, BLOCK_C)
        c_mask = local < block_channels
        channel = first_channel + local
        w, b = _affine(w_ptr, b_ptr, w_sc, b_sc, channel, c_mask, HAS_WEIGHT, HAS_BIAS)
        ch_mean, ch_rstd = _saved_stats(mean_ptr, rstd_ptr, sample, num_groups, channel, c_mask, group_channels)
        ch_dot = _groups_to_channels(group_dot, local, group_channels, BLOCK_G, GROUP_C)
        ch_sum = _groups_to_channels(group_sum, local, group_channels, BLOCK_G, GROUP_C)
        x_rows = x_ptr + x_base + channel.to(tl.int64)[:, None] * x_sc
        dy_rows = dy_ptr + dy_base + channel.to(tl.int64)[:, None] * dy_sc
        dx_rows = dx_ptr + dx_base + channel.to(tl.int64)[:, None] * dx_sc
        for s0 in range(s_begin, s_end, BLOCK_S):
            position = s0 + tl.arange(0, BLOCK_S).to(tl.int64)
            mask = c_mask[:, None] & (position < s_end)[None, :]
            x_hat, dz = _backward_tile(x_rows, dy_rows, position, mask, x_ss, dy_ss, ch_mean, ch_rstd, w, b, SILU,
                                       "evict_first")
            dx = ch_rstd[:, None] * (dz * w[:, None] - ch_sum[:, None] - x_hat * ch_dot[:, None])
            tl.store(dx_rows + position[None, :] * dx_ss, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
OP_NAME = "group_norm_silu"


def _plan_for(x: torch.Tensor, x_strides, num_groups: int, backward: bool = False) -> LaunchPlan:
    """The launch plan of ``x`` for the forward (stats + forward kernels) or the backward (reduce + backward
    kernels), for the SMs of x's device; tests force ``target_programs`` / ``tile`` / ``sm_count`` (0 =
    automatic) with ``launch.force_launch_settings("group_norm_silu", ...)`` to reach the split paths at small
    shapes."""
    target_programs = int(launch_setting(OP_NAME, "target_programs", 0))
    tile = int(launch_setting(OP_NAME, "tile", 0))
    sm_count = int(launch_setting(OP_NAME, "sm_count", 0)) or device_limits(x.device).sm_count
    channels_inner = x_strides[1] == 1 and x.shape[1] > 1
    return plan_launch(x.shape[0], x.shape[1], num_groups, _spatial_size(x), channels_inner, max(target_programs, 0),
                       tile if tile > 0 else TILE_BYTES // x.element_size(), x.element_size(), backward, sm_count)


def _empty_output(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))


def _parameter_args(param: Optional[torch.Tensor], placeholder: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A per-channel parameter and its stride (any stride, 0 included); a placeholder the HAS_* switch never reads
    when it is absent."""
    return (param, param.stride(0)) if param is not None else (placeholder, 1)


def _launch_forward(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], num_groups: int,
                    eps: float, activation: str):
    batch = x.shape[0]
    y = _empty_output(x)
    mean = x.new_empty((batch, num_groups), dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if y.numel() == 0:
        return y, mean.zero_(), rstd.zero_()
    x, x_strides = _as_ncs(x)
    y_strides = _collapsed_strides(y)
    plan = _plan_for(x, x_strides, num_groups)
    group_channels, spatial = x.shape[1] // num_groups, _spatial_size(x)
    inv_sqrt_size = 1.0 / math.sqrt(group_channels * spatial)
    layout = (num_groups, group_channels, spatial, plan.blocks_per_sample, plan.groups_per_block)
    blocks = dict(BLOCK_C=plan.block_c, BLOCK_S=plan.block_s, BLOCK_G=plan.block_g, ALIGN=plan.align,
                  GROUP_C=plan.group_c, num_warps=plan.num_warps)
    partials = mean
    if plan.split:
        partials = x.new_empty((3, batch * num_groups * plan.part_chunks), dtype=torch.float32)
        _group_norm_stats_kernel[(plan.programs(batch, plan.part_chunks),)](
            x, partials, *layout, plan.part_chunks, plan.tiles, partials.shape[-1], *x_strides,
            inv_sqrt_size, **blocks)
    w, w_stride = _parameter_args(weight, mean)
    b, b_stride = _parameter_args(bias, mean)
    _group_norm_forward_kernel[(plan.programs(batch),)](
        x, y, w, b, mean, rstd, partials, *layout, plan.chunks, plan.tiles, plan.part_chunks, partials.shape[-1],
        *x_strides, *y_strides, w_stride, b_stride, eps, inv_sqrt_size,
        SILU=activation == "silu", HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        FUSED_STATS=not plan.split, BLOCK_P=plan.block_p, **blocks)
    return y, mean, rstd


def _launch_backward(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                     mean: torch.Tensor, rstd: torch.Tensor, num_groups: int, activation: str):
    batch, channels = x.shape[:2]
    dx = _empty_output(x)
    if dx.numel() == 0:
        zeros = x.new_zeros((channels,), dtype=torch.float32)
        return dx, zeros, zeros.clone()
    x, x_strides = _as_ncs(x)
    dy, dy_strides = _as_ncs(dy)
    dx_strides = _collapsed_strides(dx)
    # the saved [N, G] statistics are read as dense fp32 rows (what the forward op returns)
    mean = mean.to(torch.float32).contiguous()
    rstd = rstd.to(torch.float32).contiguous()
    plan = _plan_for(x, x_strides, num_groups, backward=True)
    group_channels, spatial = channels // num_groups, _spatial_size(x)
    # per-(sample, channel, chunk) sums for dweight / dbias, written by the pass that reduces over the chunks
    partials = x.new_empty((2, batch, channels, plan.part_chunks), dtype=torch.float32)
    group_partials = x.new_empty((2, batch * num_groups * plan.part_chunks) if plan.split else (2, 1),
                                 dtype=torch.float32)
    layout = (num_groups, group_channels, spatial, plan.blocks_per_sample, plan.groups_per_block)
    planes = (partials[0].numel(), group_partials.shape[1])
    common = dict(SILU=activation == "silu", HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                  BLOCK_C=plan.block_c, BLOCK_S=plan.block_s, BLOCK_G=plan.block_g, ALIGN=plan.align,
                  GROUP_C=plan.group_c, num_warps=plan.num_warps)
    w, w_stride = _parameter_args(weight, mean)
    b, b_stride = _parameter_args(bias, mean)
    if plan.split:
        _group_norm_backward_reduce_kernel[(plan.programs(batch, plan.part_chunks),)](
            x, dy, w, b, mean, rstd, partials, group_partials, *layout, plan.part_chunks, plan.tiles,
            *planes, *x_strides, *dy_strides, w_stride, b_stride, **common)
    _group_norm_backward_kernel[(plan.programs(batch),)](
        x, dy, dx, w, b, mean, rstd, partials, group_partials, *layout, plan.chunks, plan.tiles, *planes,
        plan.part_chunks, *x_strides, *dy_strides, *dx_strides, w_stride, b_stride, 1.0 / (group_channels * spatial),
        FUSED_REDUCE=not plan.split, BLOCK_P=plan.block_p, **common)
    return dx, partials[0].sum(dim=(0, 2)), partials[1].sum(dim=(0, 2))


# ----------------------------------------------------------------------------------------------------------------
# torch.library registration (usable under torch.compile(fullgraph=True)); the schemas hold only what a user passes
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("genkernels::group_norm_silu", mutates_args=())
def _group_norm_silu_op(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                        num_groups: int, eps: float,
                        activation: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, mean, rstd)``; ``activation`` is "silu" or "none"."""
    return _launch_forward(x, weight, bias, num_groups, eps, activation)


@_group_norm_silu_op.register_fake
def _group_norm_silu_fake(x, weight, bias, num_groups, eps, activation):
    stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    return _empty_output(x), stats, torch.empty_like(stats)


@torch.library.custom_op("genkernels::group_norm_silu_backward", mutates_args=())
def _group_norm_silu_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                                 bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
                                 num_groups: int,
                                 activation: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dweight, dbias)``, the parameter gradients in fp32, shape ``[C]`` (computed also when there is no
    parameter)."""
    return _launch_backward(dy, x, weight, bias, mean, rstd, num_groups, activation)


@_group_norm_silu_backward_op.register_fake
def _group_norm_silu_backward_fake(dy, x, weight, bias, mean, rstd, num_groups, activation):
    param_grad = x.new_empty((x.shape[1],), dtype=torch.float32)
    return _empty_output(x), param_grad, torch.empty_like(param_grad)


def _setup_context(ctx, inputs, output):
    x, weight, bias, num_groups, eps, activation = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.options = (num_groups, activation)
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, grad_mean, grad_rstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = torch.ops.genkernels.group_norm_silu_backward(dy, x, weight, bias, mean, rstd, *ctx.options)
    # fresh dense [C] gradients in each parameter's dtype, whatever the parameter's strides
    dweight = dweight.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
    dbias = dbias.to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
    return dx, dweight, dbias, None, None, None


_group_norm_silu_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------
def _check_parameter(param: Optional[torch.Tensor], name: str, x: torch.Tensor) -> None:
    if param is None:
        return
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(param).__name__}")
    channels = x.shape[1]
    if param.dim() != 1 or param.shape[0] != channels:
        raise ValueError(f"{name} must have shape [C] = [{channels}] (the channels of x); got {describe(param)}")
    allowed = (torch.float32, x.dtype) if x.dtype != torch.float64 else (torch.float64, torch.float32)
    if param.dtype not in allowed:
        raise TypeError(f"{name} must have dtype {' or '.join(str(d) for d in dict.fromkeys(allowed))} "
                        f"(fp32 or the dtype of x); got {describe(param)}")
    check_same_device([("x", x), (name, param)])


def _check_arguments(x, num_groups, weight, bias, eps, activation) -> float:
    """Every argument check (before any launch); works while torch.compile traces with dynamic shapes (no
    ``math.*`` on values that may be symbolic)."""
    check_float_tensor(x, "x", FLOAT_DTYPES)
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dimensions [N, C, *spatial]; got {describe(x)}")
    check_int(num_groups, "num_groups", low=1)
    channels = x.shape[1]
    if channels % num_groups != 0:
        raise ValueError(f"num_groups: channels not divisible by groups: x has C={channels} channels, which "
                         f"num_groups={num_groups} does not divide ({describe(x)})")
    _check_parameter(weight, "weight", x)
    _check_parameter(bias, "bias", x)
    eps = check_real(eps, "eps", low=0.0, low_inclusive=False)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not supported; expected 'silu' or None")
    return eps


def group_norm_silu(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
                    bias: Optional[torch.Tensor] = None, eps: float = 1e-5, *, activation: Optional[str] = "silu",
                    impl: str = "auto") -> torch.Tensor:
    """Fused GroupNorm + SiLU: ``F.silu(F.group_norm(x, num_groups, weight, bias, eps))`` in one pass.

        z = (x - mean_g) / sqrt(var_g + eps) * weight[c] + bias[c],   y = z * sigmoid(z)

    ``mean_g`` / ``var_g`` (biased) are taken over each sample's group of ``C / num_groups`` channels and every
    spatial position (Wu & He 2018). The kernels' statistics do not overflow for any finite input whose group
    variance is finite in fp32 (up to fp32's largest values); a variance past that gives ``rstd = 0`` as the fp32
    reference does. NaN or Inf in a group makes that group's outputs NaN, as ``F.group_norm``.

    Args:
        x: ``[N, C, *spatial]`` (rank >= 2), fp32/fp16/bf16, or fp64 (runs the reference in fp64), any strides;
            NCHW and channels_last(_3d) are read in place. Any size, 0 included.
        num_groups: groups G, dividing C.
        weight, bias: optional ``[C]`` affine parameters, fp32 or x's dtype, on x's device, any stride (sliced or
            expanded views are read in place).
        eps: added to the variance, a finite number > 0.
        activation: "silu" (default) or None for plain GroupNorm.
        impl: "auto", "triton" or "eager". ``"triton"`` raises ``ValueError`` (listing every reason) for inputs
            the kernels cannot take (fp64, a device without Triton); ``"auto"`` runs the reference for them.

    Returns:
        ``y`` with x's shape and dtype, channels_last when x is (math in fp32). Differentiable in x, weight, bias.
    """
    eps = _check_arguments(x, num_groups, weight, bias, eps, activation)
    impl = choose_impl(impl, OP_NAME, {"x": x, "weight": weight, "bias": bias})
    if impl == "eager":
        return group_norm_silu_reference(x, num_groups, weight, bias, eps, activation)
    y, _, _ = torch.ops.genkernels.group_norm_silu(x, weight, bias, num_groups, eps, activation or "none")
    return y
