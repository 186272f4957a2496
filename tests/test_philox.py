"""The eager Philox noise stream (kernels/philox.py) against Random123's known answers and Triton's own stream."""
import pytest
import torch
import triton
import triton.language as tl
from reference_checks import assert_standard_normal

from genkernels.kernels.philox import (
    MASK32,
    _mul_hi_lo,
    pair_uniform_to_normal,
    philox4x32,
    philox_normal,
    uint_to_uniform,
)
from genkernels.kernels.triton_helpers import philox_normal_block

# Random123 1.09, examples/kat_vectors: philox4x32 with 10 rounds, (counter, key) -> output
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK32,) * 4, (MASK32, MASK32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@triton.jit
def _philox_words_test_kernel(out_ptr, seed_ptr, counter_ptr):
    offsets = tl.arange(0, 1)
    c0, c1, c2, c3 = (tl.load(counter_ptr + 4 * offsets + k).to(tl.uint32) for k in range(4))
    r0, r1, r2, r3 = tl.philox(tl.load(seed_ptr), c0, c1, c2, c3)
    for k, word in enumerate((r0, r1, r2, r3)):
        tl.store(out_ptr + 4 * offsets + k, word.to(tl.int64))


@triton.jit
def _philox_block_test_kernel(out_ptr, seed_ptr, batch_index, first_index, BLOCK: tl.constexpr,
                              WIDE: tl.constexpr):
    values = philox_normal_block(tl.load(seed_ptr), batch_index, first_index, BLOCK, WIDE)
    tl.store(out_ptr + tl.arange(0, BLOCK), values)


def _seed_of_key(k0: int, k1: int) -> torch.Tensor:
    word = (k1 << 32) | k0
    return torch.tensor([word - 2**64 if word >= 2**63 else word], dtype=torch.int64)


def _words(values, device="cpu"):
    return [torch.tensor(v, dtype=torch.int64, device=device) for v in values]


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_eager_philox_matches_random123_known_answers(counter, key, expected):
    assert [int(w) for w in philox4x32(_words(counter), _words(key))] == list(expected)


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_triton_philox_matches_random123_known_answers(counter, key, expected):
    # tl.philox(seed, ...) keys Philox with (low word, high word) of the 64-bit seed
    out = torch.empty(4, dtype=torch.int64)
    _philox_words_test_kernel[(1,)](out, _seed_of_key(*key), torch.tensor(counter, dtype=torch.int64))
    assert [w & MASK32 for w in out.tolist()] == list(expected)


def test_mul_hi_lo_matches_python_integers():
    generator = torch.Generator().manual_seed(0)
    words = torch.randint(0, 2**32, (4096,), dtype=torch.int64, generator=generator)
    words = torch.cat([words, torch.tensor([0, 1, MASK32, 2**31, 2**31 - 1])])
    for constant in (0xD2511F53, 0xCD9E8D57, MASK32, 1):
        hi, lo = _mul_hi_lo(constant, words)
        products = [constant * w for w in words.tolist()]
        assert hi.tolist() == [p >> 32 for p in products]
        assert lo.tolist() == [p & MASK32 for p in products]


def test_uniform_is_in_unit_interval_at_the_extreme_words():
    u = uint_to_uniform(torch.tensor([0, 1, 2**31 - 1, 2**31, MASK32], dtype=torch.int64))
    assert u.dtype == torch.float32
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    # int32 s >= 0 maps to s * scale, negative s to ~s * scale: 2^31 (s = -2^31) folds onto 2^31 - 1
    assert u[0] == 0.0 and u[4] == 0.0 and u[2] == u[3]


def _expected_normals(seed: torch.Tensor, batch_index: int, first_index: int, count: int) -> torch.Tensor:
    """The stream spelled out from philox4x32 for arbitrary (e.g. > 2^32) group indices."""
    groups = torch.arange(first_index // 4, first_index // 4 + count // 4, dtype=torch.int64)
    seed = seed.reshape(())
    words = philox4x32((groups & MASK32, groups >> 32, torch.full_like(groups, batch_index),
                        torch.zeros_like(groups)), (seed & MASK32, (seed >> 32) & MASK32))
    n0, n1 = pair_uniform_to_normal(uint_to_uniform(words[0]), uint_to_uniform(words[1]))
    n2, n3 = pair_uniform_to_normal(uint_to_uniform(words[2]), uint_to_uniform(words[3]))
    return torch.stack([n0, n1, n2, n3], dim=-1).reshape(-1)


@pytest.mark.parametrize("seed_value", [0, 12345, 2**62 - 7, -3])
@pytest.mark.parametrize("batch_index,first_index", [(0, 0), (5, 1024), (70000, 4 * (2**32 + 3))])
def test_eager_stream_matches_philox_normal_block(seed_value, batch_index, first_index):
    seed = torch.tensor([seed_value], dtype=torch.int64)
    out = torch.empty(256, dtype=torch.float32)
    _philox_block_test_kernel[(1,)](out, seed, batch_index, first_index, BLOCK=256, WIDE=first_index >= 2**31)
    # Box-Muller's log may differ by an ulp between implementations, and the kernels' sin/cos polynomials
    # (triton_helpers.sincos_turns) are within 3e-7 of fp64, times a radius of up to 5.7
    torch.testing.assert_close(_expected_normals(seed, batch_index, first_index, 256), out, rtol=2e-6, atol=4e-6)


def test_philox_normal_tensor_layout_matches_the_kernel_stream():
    seed = torch.tensor([99], dtype=torch.int64)
    noise = philox_normal(seed, (3, 5, 7))  # 35 elements per sample: the last group is cut
    assert noise.shape == (3, 5, 7) and noise.dtype == torch.float32
    for b in range(3):
        out = torch.empty(64, dtype=torch.float32)
        _philox_block_test_kernel[(1,)](out, seed, b, 0, BLOCK=64, WIDE=False)
        torch.testing.assert_close(noise[b].reshape(-1), out[:35], rtol=2e-6, atol=4e-6)


def test_philox_normal_is_standard_normal_and_seeded():
    seed = torch.tensor([2024], dtype=torch.int64)
    noise = philox_normal(seed, (8, 3, 32, 32))
    assert_standard_normal(noise)
    torch.testing.assert_close(philox_normal(seed.clone(), (8, 3, 32, 32)), noise, rtol=0, atol=0)
    other = philox_normal(torch.tensor([2025]), (8, 3, 32, 32))
    assert (other - noise).abs().mean() > 0.5
    assert (noise[0] - noise[1]).abs().mean() > 0.5
    # a seed as a 0-d tensor gives the same stream
    torch.testing.assert_close(philox_normal(torch.tensor(2024), (8, 3, 32, 32)), noise, rtol=0, atol=0)


def test_philox_normal_rank_one_and_empty_shapes():
    seed = torch.tensor([1], dtype=torch.int64)
    assert philox_normal(seed, (5,)).shape == (5,)
    assert philox_normal(seed, (0, 3)).shape == (0, 3)
    assert philox_normal(seed, (2, 0)).shape == (2, 0)
    # rank one: one element per sample, draw 0 of its group
    torch.testing.assert_close(philox_normal(seed, (5,)), philox_normal(seed, (5, 4))[:, 0], rtol=0, atol=0)


def test_philox_normal_rejects_a_shape_without_batch():
    with pytest.raises(ValueError, match="shape"):
        philox_normal(torch.tensor([1]), ())


# ---------------------------------------------------------------------------------------------------------------
# Seed and shape checks
# ---------------------------------------------------------------------------------------------------------------
def test_philox_normal_takes_an_int_seed_or_any_integer_tensor():
    expected = philox_normal(torch.tensor([99], dtype=torch.int64), (3, 7))
    for seed in (99, torch.tensor(99), torch.tensor([[99]], dtype=torch.int32), torch.tensor([99], dtype=torch.uint8)):
        torch.testing.assert_close(philox_normal(seed, (3, 7)), expected, rtol=0, atol=0)
    torch.testing.assert_close(philox_normal(-3, [2, 5]), philox_normal(torch.tensor([-3]), (2, 5)), rtol=0, atol=0)
    for seed in (2**63 - 1, -2**63):
        assert philox_normal(seed, torch.Size([2, 4])).shape == (2, 4)


@pytest.mark.parametrize("seed", [1.0, 2.5, torch.tensor([1.0]), torch.tensor(3.0, dtype=torch.float64), True,
                                  torch.tensor([True]), "7", None])
def test_philox_normal_rejects_a_non_integer_seed(seed):
    """A float seed used to be truncated silently (2.5 and 2.9 drew the same noise)."""
    with pytest.raises(TypeError, match="seed"):
        philox_normal(seed, (2, 3))


@pytest.mark.parametrize("seed", [2**63, -2**63 - 1, torch.tensor([1, 2]), torch.zeros(0, dtype=torch.int64)])
def test_philox_normal_rejects_a_seed_out_of_range_or_of_several_elements(seed):
    with pytest.raises(ValueError, match="seed"):
        philox_normal(seed, (2, 3))


@pytest.mark.parametrize("shape,error", [
    (5, TypeError), ("23", TypeError), (torch.tensor([2, 3]), TypeError), ((2.0, 3), TypeError),
    ((2, 3.5), TypeError), ((True, 3), TypeError), ((2, -1), ValueError), ((-1,), ValueError), ((), ValueError),
    (None, TypeError),
])
def test_philox_normal_rejects_a_bad_shape(shape, error):
    with pytest.raises(error, match="shape"):
        philox_normal(torch.tensor([1]), shape)


def test_philox_normal_device_of_an_int_seed_and_meta_seeds():
    assert philox_normal(5, (2, 3)).device.type == "cpu"
    meta = philox_normal(5, (2, 3), device="meta")
    assert meta.device.type == "meta" and meta.shape == (2, 3)
    on_meta = philox_normal(torch.empty(1, dtype=torch.int64, device="meta"), (4, 0, 2))
    assert on_meta.device.type == "meta" and on_meta.shape == (4, 0, 2)
    with pytest.raises(ValueError, match="seed is on cpu but device=meta"):
        philox_normal(torch.tensor([1]), (2, 3), device="meta")


def test_philox_normal_compiles_with_dynamic_shapes():
    def noisy(seed, x):
        return x + philox_normal(seed, x.shape)

    compiled = torch.compile(noisy, fullgraph=True, dynamic=True, backend="aot_eager")
    seed = torch.tensor([11])
    for shape in ((2, 5), (3, 4, 7)):
        x = torch.zeros(shape)
        torch.testing.assert_close(compiled(seed, x), noisy(seed, x), rtol=0, atol=0)
