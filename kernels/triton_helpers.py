"""Small ``@triton.jit`` building blocks shared by the kernels.

Everything here runs both compiled on the GPU and in Triton's CPU interpreter: plain ``tl`` arithmetic only, no
libdevice or inline assembly, fp32 math.
"""
import triton
import triton.language as tl


@triton.jit
def unravel_inner(index, size1, size2, size3):
    """Coordinates ``(c0, c1, c2, c3)`` of the int64 ``index`` in a row-major ``[size0, size1, size2, size3]`` block
    (``size0`` is implied by the range of ``index``)."""
    c3 = index % size3
    rest = index // size3
    c2 = rest % size2
    rest = rest // size2
    c1 = rest % size1
    c0 = rest // size1
    return c0, c1, c2, c3


@triton.jit
def strided_offset(c0, c1, c2, c3, stride0, stride1, stride2, stride3):
    """Element offset of coordinates ``(c0..c3)`` in a tensor with those strides (int64 math)."""
    return c0 * stride0 + c1 * stride1 + c2 * stride2 + c3 * stride3


@triton.jit
def sample_block(batch_start, inner_numel, BLOCK: tl.constexpr):
    """The run of a per-sample elementwise kernel's program on grid ``(inner blocks, samples)``: its sample
    ``batch_start + program_id(1)``, its first inner index, the int64 inner indices of its block and their mask."""
    batch_index = batch_start + tl.program_id(1)
    first = tl.program_id(0).to(tl.int64) * BLOCK
    inner = first + tl.arange(0, BLOCK).to(tl.int64)
    return batch_index, first, inner, inner < inner_numel


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
def philox_normal_block(seed, batch_index, first_index, BLOCK: tl.constexpr):
    """Standard normal draws for elements ``first_index .. first_index + BLOCK - 1`` of sample ``batch_index``.

    Element ``i`` of sample ``b`` always gets the same draw for a given ``seed`` (whatever the block size or
    grid): Philox-4x32-10 is keyed by ``seed`` with counter ``(i // 4 as two 32-bit words, b, 0)``, and its four
    outputs become four normals by Box-Muller, one per element ``4 * (i // 4) + k``. ``first_index`` must be a
    multiple of 4 (it is a multiple of ``BLOCK``).
    """
    group = first_index // 4 + tl.arange(0, BLOCK // 4).to(tl.int64)
    group_lo = (group & 0xFFFFFFFF).to(tl.uint32)
    group_hi = (group >> 32).to(tl.uint32)
    sample_word = tl.zeros_like(group_lo) + batch_index.to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, group_lo, group_hi, sample_word, tl.zeros_like(group_lo))
    n0, n1 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r0), tl.uint_to_uniform_float(r1))
    n2, n3 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r2), tl.uint_to_uniform_float(r3))
    # interleave(interleave(n0, n2), interleave(n1, n3)) = [n0[0], n1[0], n2[0], n3[0], n0[1], ...]
    return tl.interleave(tl.interleave(n0, n2), tl.interleave(n1, n3))


@triton.jit
def philox_normal_at(seed, batch_index, index):
    """The draw of element ``index`` (an int64 block in any order) of sample ``batch_index``: the value
    :func:`philox_normal_block` gives that element, computed from its own Philox group (four times the Philox work
    of the block version; for walks whose order is not the index order)."""
    group = index // 4
    lane = index % 4
    group_lo = (group & 0xFFFFFFFF).to(tl.uint32)
    group_hi = (group >> 32).to(tl.uint32)
    sample_word = tl.zeros_like(group_lo) + batch_index.to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, group_lo, group_hi, sample_word, tl.zeros_like(group_lo))
    first_pair = lane < 2
    u_a = tl.uint_to_uniform_float(tl.where(first_pair, r0, r2))
    u_b = tl.uint_to_uniform_float(tl.where(first_pair, r1, r3))
    n_cos, n_sin = tl.pair_uniform_to_normal(u_a, u_b)
    return tl.where((lane & 1) == 0, n_cos, n_sin)


@triton.jit
def noise_values(noise_ptr, seed_ptr, batch_index, first, inner, mask, z_sb, z_s0, z_s1, z_s2, z_s3,
                 index_s0, index_s1, index_s2, index_s3, size1, size2, size3, NOISE_MODE: tl.constexpr,
                 INNER_CONTIGUOUS: tl.constexpr, BLOCK: tl.constexpr):
    """fp32 noise of elements ``inner`` (from ``first``) of sample ``batch_index``, by the ``NOISE_MODE`` of a
    :class:`genkernels.kernels.launch.SampleWalk`: read from ``noise_ptr`` (1), drawn four at a time when the walk
    is in row-major order (2), or drawn element by element at the row-major index given by the ``index_s*``
    strides (3); zeros for no noise (0)."""
    if NOISE_MODE == 1:
        offsets = sample_offsets(batch_index, inner, z_sb, z_s0, z_s1, z_s2, z_s3, size1, size2, size3,
                                 INNER_CONTIGUOUS)
        eps = tl.load(noise_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    elif NOISE_MODE == 2:
        eps = philox_normal_block(tl.load(seed_ptr), batch_index, first, BLOCK)
    elif NOISE_MODE == 3:
        c0, c1, c2, c3 = unravel_inner(inner, size1, size2, size3)
        index = strided_offset(c0, c1, c2, c3, index_s0, index_s1, index_s2, index_s3)
        eps = philox_normal_at(tl.load(seed_ptr), batch_index, index)
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
