"""Small ``@triton.jit`` building blocks shared by the kernels.

Everything here runs both compiled on the GPU and in Triton's CPU interpreter: plain ``tl`` arithmetic only, no
libdevice or inline assembly, fp32 math.
"""
import triton
import triton.language as tl


@triton.jit
def unravel_inner(index, size1, size2, size3):
    """Coordinates ``(c0, c1, c2, c3)`` of ``index`` (an int32 or int64 block; the math keeps its width) in a
    row-major ``[size0, size1, size2, size3]`` block (``size0`` is implied by the range of ``index``)."""
    c3 = index % size3
    rest = index // size3
    c2 = rest % size2
    rest = rest // size2
    c1 = rest % size1
    c0 = rest // size1
    return c0, c1, c2, c3


@triton.jit
def strided_offset(c0, c1, c2, c3, stride0, stride1, stride2, stride3):
    """Element offset of coordinates ``(c0..c3)`` in a tensor with those strides (in the coordinates' width:
    int64 for int64 coordinates)."""
    return c0 * stride0 + c1 * stride1 + c2 * stride2 + c3 * stride3


@triton.jit
def sample_offsets(batch_index, inner_index, batch_stride, stride0, stride1, stride2, stride3,
                   size1, size2, size3, INNER_CONTIGUOUS: tl.constexpr):
    """Offsets of elements ``inner_index`` (int64 block) of sample ``batch_index`` in one tensor of a
    :class:`genkernels.kernels.launch.PerSampleLayout`."""
    base = batch_index.to(tl.int64) * batch_stride
    if INNER_CONTIGUOUS:
        return base + inner_index
    c0, c1, c2, c3 = unravel_inner(inner_index, size1, size2, size3)
    return base + strided_offset(c0, c1, c2, c3, stride0, stride1, stride2, stride3)


@triton.jit
def span_of_program(inner_numel, TILE: tl.constexpr):
    """This program's run ``[lo, hi)`` of its sample (its share of the sample's units of ``TILE // 16`` elements,
    two 16-byte vectors, among the ``num_programs(0)`` programs of the sample, see :class:`genkernels.kernels.launch.WaveSplit`)
    and the number of ``TILE`` steps that cover it (int32)."""
    UNIT: tl.constexpr = TILE // 16
    units = (inner_numel.to(tl.int64) + (UNIT - 1)) // UNIT
    programs = tl.num_programs(0).to(tl.int64)
    program = tl.program_id(0).to(tl.int64)
    lo = (program * units // programs) * UNIT
    hi = tl.minimum(((program + 1) * units // programs) * UNIT, inner_numel)
    return lo, hi, tl.cdiv(hi - lo, TILE)


@triton.jit
def tile_of_span(lo, hi, step, TILE: tl.constexpr):
    """The ``step``-th tile of a span: its first index (a multiple of ``TILE // 16``), its int64 indices and their
    mask."""
    first = tl.multiple_of(lo + step * TILE, TILE // 16)
    inner = first + tl.arange(0, TILE).to(tl.int64)
    return first, inner, inner < hi


@triton.jit
def sincos_turns(u):
    """``(sin(2 pi u), cos(2 pi u))`` in fp32 for ``u`` in [0, 1), to about 1e-7: the quarter turn ``q =
    round(4 u)`` is taken out exactly, and the rest ``x = 2 pi (u - q / 4)``, ``|x| <= pi / 4``, goes through
    Taylor polynomials (to x^9 and x^10). libdevice's ``sinf``/``cosf`` would reduce any argument (Payne-Hanek,
    a local-memory table: the stack frame of every kernel with drawn noise) although the angle is known to be
    below 2 pi."""
    quarter = tl.floor(4.0 * u + 0.5)
    x = (u - 0.25 * quarter) * 6.283185307179586
    x2 = x * x
    sin_x = x * (1.0 + x2 * (-1.0 / 6.0 + x2 * (1.0 / 120.0 + x2 * (-1.0 / 5040.0 + x2 * (1.0 / 362880.0)))))
    cos_x = 1.0 + x2 * (-0.5 + x2 * (1.0 / 24.0 + x2 * (-1.0 / 720.0 + x2 * (1.0 / 40320.0
                                                                                  + x2 * (-1.0 / 3628800.0)))))
    q = quarter.to(tl.int32) & 3
    sin_t = tl.where(q == 0, sin_x, tl.where(q == 1, cos_x, tl.where(q == 2, -sin_x, -cos_x)))
    cos_t = tl.where(q == 0, cos_x, tl.where(q == 1, -sin_x, tl.where(q == 2, -cos_x, sin_x)))
    return sin_t, cos_t


@triton.jit
def box_muller(u_a, u_b):
    """Triton's ``pair_uniform_to_normal``, ``rho (cos, sin)(2 pi u_b)`` with ``rho = sqrt(-2 ln max(u_a,
    1e-7))``, its sine and cosine from :func:`sincos_turns`."""
    radius = tl.sqrt(-2.0 * tl.log(tl.maximum(u_a, 1.0e-7)))
    sin_t, cos_t = sincos_turns(u_b)
    return radius * cos_t, radius * sin_t


@triton.jit
def philox_words(seed, group, batch_index, WIDE: tl.constexpr):
    """The four Philox words of groups ``group`` of sample ``batch_index``; ``WIDE``: int64 groups (a sample of
    2**31 elements or more), else int32 ones (high counter word 0)."""
    if WIDE:
        group_lo = (group & 0xFFFFFFFF).to(tl.uint32)
        group_hi = (group >> 32).to(tl.uint32)
    else:
        group_lo = group.to(tl.uint32)
        group_hi = tl.zeros_like(group_lo)
    zero = tl.zeros_like(group_lo)
    return tl.philox(seed, group_lo, group_hi, zero + batch_index.to(tl.uint32), zero)


@triton.jit
def philox_normal_block(seed, batch_index, first, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    """Standard normal draws for elements ``first .. first + BLOCK - 1`` of sample ``batch_index``.

    Element ``i`` of sample ``b`` always gets the same draw for a given ``seed`` (whatever the block size or
    grid): Philox-4x32-10 keyed by ``seed`` with counter ``(i // 4 as two 32-bit words, b, 0)``, its four outputs
    turned into four normals by Box-Muller, one per element ``4 * (i // 4) + k``. ``first`` is a multiple of 4;
    ``WIDE``: int64 indices (a sample of 2**31 elements or more)."""
    if WIDE:
        group = first // 4 + tl.arange(0, BLOCK // 4).to(tl.int64)
    else:
        group = first.to(tl.int32) // 4 + tl.arange(0, BLOCK // 4)
    r0, r1, r2, r3 = philox_words(seed, group, batch_index, WIDE)
    n0, n1 = box_muller(tl.uint_to_uniform_float(r0), tl.uint_to_uniform_float(r1))
    n2, n3 = box_muller(tl.uint_to_uniform_float(r2), tl.uint_to_uniform_float(r3))
    return tl.interleave(tl.interleave(n0, n2), tl.interleave(n1, n3))


@triton.jit
def philox_normal_at(seed, batch_index, index, WIDE: tl.constexpr):
    """The draw :func:`philox_normal_block` gives element ``index`` (a block of row-major indices in any order), from
    that element's own Philox group."""
    r0, r1, r2, r3 = philox_words(seed, index >> 2, batch_index, WIDE)
    lane = index & 3
    first_pair = lane < 2
    n_cos, n_sin = box_muller(tl.uint_to_uniform_float(tl.where(first_pair, r0, r2)),
                               tl.uint_to_uniform_float(tl.where(first_pair, r1, r3)))
    return tl.where((lane & 1) == 0, n_cos, n_sin)


@triton.jit
def walk_noise(noise_ptr, seed_ptr, batch_index, first, inner, mask, z_sb, z_s0, z_s1, z_s2, z_s3,
               index_s0, index_s1, index_s2, index_s3, size1, size2, size3, NOISE_MODE: tl.constexpr,
               INNER_CONTIGUOUS: tl.constexpr, BLOCK: tl.constexpr):
    """fp32 noise of elements ``inner`` (from ``first``) of sample ``batch_index``, by the NOISE_MODE of
    :func:`genkernels.kernels.launch.walk_noise_mode`: none (0), read from ``noise_ptr`` (1), Philox four at a time (2, 4 for int64
    indices) or element by element at its row-major index (3, 5). Element by element, the row-major index of each
    walked element is its walk coordinates dotted with the index strides, in int32 below 2**31 elements: for a
    channels_last batch walked in memory order (pixel p, channel c) that is ``p + c * H * W``, one 32-bit division
    by the channel count per element and no 64-bit ones."""
    if NOISE_MODE == 1:
        offsets = sample_offsets(batch_index, inner, z_sb, z_s0, z_s1, z_s2, z_s3, size1, size2, size3,
                                 INNER_CONTIGUOUS)
        eps = tl.load(noise_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    elif NOISE_MODE == 2 or NOISE_MODE == 4:
        eps = philox_normal_block(tl.load(seed_ptr), batch_index, first, BLOCK, NOISE_MODE == 4)
    elif NOISE_MODE == 3 or NOISE_MODE == 5:
        if NOISE_MODE == 3:
            i = inner.to(tl.int32)
        else:
            i = inner
        c0, c1, c2, c3 = unravel_inner(i, size1, size2, size3)
        index = strided_offset(c0, c1, c2, c3, index_s0, index_s1, index_s2, index_s3)
        eps = philox_normal_at(tl.load(seed_ptr), batch_index, index, NOISE_MODE == 5)
    else:
        eps = tl.zeros((BLOCK,), tl.float32)
    return eps


@triton.jit
def sigmoid(x):
    """Logistic function of fp32 ``x``, overflow-free for any magnitude: ``1 / (1 + exp(-x))`` for ``x >= 0`` and
    ``exp(x) / (1 + exp(x))`` below."""
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def tanh(x):
    """Hyperbolic tangent of fp32 ``x`` (``tl.tanh`` and libdevice do not run in the interpreter):
    ``(1 - e) / (1 + e)`` with ``e = exp(-2|x|)``, signed, and its Taylor series below ``|x| = 0.1``, where
    ``1 - e`` would cancel (the series' first omitted term is below 1e-9 relative there)."""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    magnitude = (1.0 - e) / (1.0 + e)
    a2 = a * a
    series = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0))))
    magnitude = tl.where(a < 0.1, series, magnitude)
    return tl.where(x >= 0, magnitude, -magnitude)


@triton.jit
def dot(a, b, acc, NATIVE_DOT: tl.constexpr, IEEE: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation, the one matrix product of every kernel.

    ``NATIVE_DOT`` (compiled on a GPU): the operands go to the tensor cores in ``b``'s storage dtype (fp16/bf16
    tiles as they are; ``a`` is cast to it). Off (the CPU interpreter, whose 16-bit dots are wrong): both operands
    in fp32. ``IEEE``: fp32 operands multiply in full fp32 (FMA, exact); else in TF32 on the tensor cores (10-bit
    mantissa, what PyTorch's fp32 convolutions use by default under ``torch.backends.cudnn.allow_tf32``).
    """
    if NATIVE_DOT:
        if b.dtype == tl.float32:
            if IEEE:
                return tl.dot(a.to(tl.float32), b, acc, input_precision="ieee")
            return tl.dot(a.to(tl.float32), b, acc, input_precision="tf32")
        return tl.dot(a.to(b.dtype), b, acc)
    return tl.dot(exact_fp32(a), exact_fp32(b), acc, input_precision="ieee")


@triton.jit
def exact_fp32(x):
    """``x`` in fp32, exact for every value: bf16 is widened through its bits (its 16 bits are the top half of
    the fp32 with the same value), since the CPU interpreter's bf16 cast loses subnormals; other dtypes cast."""
    if x.dtype == tl.bfloat16:
        bits = x.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        return (bits << 16).to(tl.float32, bitcast=True)
    return x.to(tl.float32)
