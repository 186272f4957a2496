"""sample_categorical: its distribution against exact probabilities (chi-square), the Triton kernel against the
eager reference draw for draw, greedy decoding against torch.argmax, the Philox counter layout, edge cases and
rejections."""
import math

import numpy as np
import pytest
import torch

from genkernels.kernels import sample_categorical, use_impl
from genkernels.kernels.launch import force_launch_settings
from genkernels.kernels.philox import philox_uniform_grid
from genkernels.kernels.sampling import philox_class_uniforms

ROWS = 5000  # draws per distribution test
# A chi-square test fails a correct sampler with probability P_VALUE_FLOOR (and the seeds are fixed, so it does
# not flake); a kept class dropped, a dropped class kept or a wrong temperature gives p-values far below it.
P_VALUE_FLOOR = 1e-6


def _seed(value: int) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.int64)


def exact_probabilities(logits, temperature=1.0, top_k=None, top_p=None) -> np.ndarray:
    """The target distribution in fp64, from the definitions: softmax(x / T); top-k keeps the classes at least as
    large as the k-th largest logit; top-p then keeps a class when the larger logits hold less than p of the
    renormalized mass (ties all kept)."""
    x = np.asarray(logits, dtype=np.float64)
    keep = np.ones(x.shape, dtype=bool)
    if top_k is not None:
        keep &= x >= np.sort(x)[::-1][top_k - 1]
    weights = np.where(keep, np.exp((x - x.max()) / temperature), 0.0)
    if top_p is not None:
        q = weights / weights.sum()
        keep &= np.array([q[x > value].sum() < top_p for value in x])
        weights = np.where(keep, weights, 0.0)
    return weights / weights.sum()


def chi_square_p_value(counts: np.ndarray, probabilities: np.ndarray) -> float:
    """Pearson's test of ``counts`` against ``probabilities`` over the classes of positive probability."""
    support = probabilities > 0
    expected = counts.sum() * probabilities[support]
    statistic = float(((counts[support] - expected) ** 2 / expected).sum())
    dof = int(support.sum()) - 1
    if dof == 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


LOGITS = [0.3, -1.2, 2.0, 0.9, -0.4, 1.5, -2.5, 0.0]
TIED = [1.0, 2.0, 1.0, 0.5, 1.0, -1.0, 2.0]  # ties at the top and at the top-3 threshold
DISTRIBUTIONS = {
    "plain": (LOGITS, dict()),
    "hot": (LOGITS, dict(temperature=2.5)),
    "cold": (LOGITS, dict(temperature=0.4)),
    "top_k": (LOGITS, dict(top_k=3)),
    "top_p": (LOGITS, dict(top_p=0.6)),
    "top_k_top_p": (LOGITS, dict(temperature=0.8, top_k=5, top_p=0.75)),
    "ties_top_k": (TIED, dict(top_k=3)),
    "ties_top_p": (TIED, dict(top_p=0.3)),
    "minus_inf": ([0.5, -math.inf, 1.0, -math.inf, 0.0], dict(temperature=1.5)),
}


@pytest.mark.parametrize("name", list(DISTRIBUTIONS))
def test_draws_follow_the_filtered_softmax(name):
    """``ROWS`` rows of the same logits (a stride-0 expand) drawn at once: the class counts fit the exact
    probabilities, and a class of probability 0 is never drawn."""
    logits, options = DISTRIBUTIONS[name]
    probabilities = exact_probabilities(logits, **options)
    rows = torch.tensor(logits, dtype=torch.float32).expand(ROWS, -1)
    draws = sample_categorical(rows, seed=_seed(1234 + len(name)), impl="triton", **options)
    counts = np.bincount(draws.numpy(), minlength=len(logits))
    assert counts[probabilities == 0].sum() == 0
    assert chi_square_p_value(counts, probabilities) > P_VALUE_FLOOR


def test_the_chi_square_test_rejects_a_wrong_distribution():
    """The test above can fail: draws of the untempered logits do not fit the tempered probabilities."""
    rows = torch.tensor(LOGITS).expand(ROWS, -1)
    counts = np.bincount(sample_categorical(rows, seed=_seed(3), impl="triton").numpy(), minlength=len(LOGITS))
    assert chi_square_p_value(counts, exact_probabilities(LOGITS, temperature=1.3)) < P_VALUE_FLOOR


BOTH_FILTERS = dict(temperature=1.3, top_k=20, top_p=0.5)


@pytest.mark.parametrize("dtype, options", [
    (torch.float32, dict()), (torch.float32, dict(temperature=0.7, top_k=9)), (torch.float32, dict(top_p=0.8)),
    (torch.float32, BOTH_FILTERS), (torch.float32, dict(temperature=1e-30)), (torch.float16, BOTH_FILTERS),
    (torch.bfloat16, BOTH_FILTERS)])
def test_triton_draws_the_eager_reference_samples(dtype, options):
    """Both impls read the same Philox uniforms for a seed and offset: equal samples on every row (random logits,
    so no two scores tie to rounding). Ragged rows and classes, several class tiles per row (a forced tile of 16),
    a sliced, transposed view (read class by class) and contiguous rows of 74 classes (read in 16-byte vectors,
    most rows starting inside one)."""
    generator = torch.Generator().manual_seed(7)
    wide = (3 * torch.randn(77, 45, generator=generator)).to(dtype)
    for logits in (wide.t()[:, 3:], wide.t()[:, 3:].contiguous()):  # [45, 74]
        with force_launch_settings("sample_categorical", block=16):
            got = sample_categorical(logits, seed=_seed(99), offset=5, impl="triton", **options)
        expected = sample_categorical(logits, seed=_seed(99), offset=5, impl="eager", **options)
        assert got.dtype == torch.int64 and got.shape == (45,)
        assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_vector_reads_of_odd_rows_see_only_their_own_classes(dtype):
    """Rows of 13 classes, each smaller than every class of the next row in memory: the 16-byte vectors that
    straddle two rows must count for neither (else greedy and top-k would pick a neighbour's class)."""
    logits = torch.arange(6 * 13, dtype=torch.float32).reshape(6, 13).to(dtype)
    with force_launch_settings("sample_categorical", block=8):
        assert sample_categorical(logits, temperature=0.0, impl="triton").tolist() == [12] * 6
        drawn = sample_categorical(logits, top_k=2, top_p=0.99, seed=_seed(4), impl="triton")
    assert set(drawn.tolist()) <= {11, 12}


@pytest.mark.parametrize("impl", ["triton", "eager"])
def test_greedy_is_torch_argmax_with_the_lowest_index_among_ties(impl):
    """temperature=0 and top_k=1 give torch.argmax (integer logits: many exact ties, across class tiles too)."""
    generator = torch.Generator().manual_seed(8)
    logits = torch.randint(-3, 3, (40, 37), generator=generator).float()
    logits[5] = -math.inf
    logits[5, 30] = -1.0  # one finite logit, in the last tile
    expected = logits.argmax(dim=1)
    with force_launch_settings("sample_categorical", block=8):
        assert torch.equal(sample_categorical(logits, temperature=0.0, impl=impl), expected)
        assert torch.equal(sample_categorical(logits, top_k=1, impl=impl), expected)


@pytest.mark.parametrize("impl", ["triton", "eager"])
def test_limits_of_the_filters(impl):
    """k >= classes and p = 1 keep everything (the same draws as no filter); p near 0 and a tiny temperature keep
    the largest logit only (no ties here); -inf classes are never drawn and a row with one finite logit draws
    it; a row's draw does not depend on the other rows of the launch."""
    generator = torch.Generator().manual_seed(9)
    logits = torch.randn(64, 13, generator=generator)
    logits[:, 4] = -math.inf
    logits[3, :] = -math.inf
    logits[3, 11] = 2.0
    seed = _seed(5)
    plain = sample_categorical(logits, seed=seed, impl=impl)
    assert torch.equal(sample_categorical(logits, seed=seed, top_k=13, impl=impl), plain)
    assert torch.equal(sample_categorical(logits, seed=seed, top_k=50, top_p=1.0, impl=impl), plain)
    argmax = logits.argmax(dim=1)
    assert torch.equal(sample_categorical(logits, seed=seed, top_p=1e-6, impl=impl), argmax)
    assert torch.equal(sample_categorical(logits, seed=seed, temperature=1e-45, impl=impl), argmax)
    assert not (plain == 4).any() and plain[3] == 11
    assert torch.equal(sample_categorical(logits[:20], seed=seed, impl=impl), plain[:20])


def test_draws_depend_on_the_seed_and_offset_only():
    logits = torch.zeros(200, 16)
    draw = lambda **kw: sample_categorical(logits, impl="triton", **kw)  # noqa: E731
    first = draw(generator=torch.Generator().manual_seed(1))
    assert torch.equal(draw(generator=torch.Generator().manual_seed(1)), first)
    assert not torch.equal(draw(generator=torch.Generator().manual_seed(2)), first)
    assert torch.equal(draw(seed=_seed(3), offset=4), draw(seed=_seed(3), offset=4))
    assert not torch.equal(draw(seed=_seed(3), offset=4), draw(seed=_seed(3), offset=5))
    large = 2**40 + 2**31 + 7  # both counter words of the offset in use, the low one above 2^31
    assert torch.equal(draw(seed=_seed(-5), offset=large),
                       sample_categorical(logits, seed=_seed(-5), offset=large, impl="eager"))


def test_uniforms_are_the_philox_grid_at_the_offset():
    """The reference's uniforms are the attention dropout grid's (an independent implementation of the same
    counter layout) at plane = offset."""
    seed = _seed(2**40 + 17)
    grid = philox_uniform_grid(seed, 3, 6, 10)
    assert torch.equal(philox_class_uniforms(seed, 2, 6, 10), grid[2])
    assert torch.equal(philox_class_uniforms(seed, 0, 6, 10), grid[0])


@pytest.mark.parametrize("impl", ["triton", "eager"])
@pytest.mark.parametrize("bad", [float("nan"), math.inf, "all -inf"])
def test_rows_without_a_distribution_are_refused(impl, bad):
    logits = torch.randn(6, 9)
    if bad == "all -inf":
        logits[4] = -math.inf
    else:
        logits[4, 2] = bad
    for options in (dict(), dict(temperature=0.0), dict(top_k=3, top_p=0.5)):
        with pytest.raises(ValueError, match="logits .*row 4"):
            sample_categorical(logits, seed=_seed(1), impl=impl, **options)


def test_empty_and_meta_inputs_give_shapes():
    assert sample_categorical(torch.zeros(0, 5), impl="triton").shape == (0,)
    out = sample_categorical(torch.zeros(3, 7, device="meta"), top_k=2, top_p=0.5)
    assert out.shape == (3,) and out.dtype == torch.int64 and out.device.type == "meta"


@pytest.mark.parametrize("kwargs, error, argument", [
    (dict(temperature=-0.1), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature="1"), TypeError, "temperature"),
    (dict(top_k=0), ValueError, "top_k"),
    (dict(top_k=2.0), TypeError, "top_k"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(offset=-1), ValueError, "offset"),
    (dict(seed=torch.tensor([1.0])), ValueError, "seed"),
    (dict(seed=torch.tensor([1, 2])), ValueError, "seed"),
    (dict(seed=_seed(1), generator=torch.Generator()), ValueError, "seed or generator"),
    (dict(generator=1), TypeError, "generator"),
    (dict(impl="fast"), ValueError, "impl"),
])
def test_bad_arguments_are_refused(kwargs, error, argument):
    with pytest.raises(error, match=argument):
        sample_categorical(torch.zeros(2, 5), **kwargs)


@pytest.mark.parametrize("logits, error", [
    (torch.zeros(5), ValueError),
    (torch.zeros(2, 3, 4), ValueError),
    (torch.zeros(2, 0), ValueError),
    (torch.zeros(2, 5, dtype=torch.int64), TypeError),
    ([[0.0, 1.0]], TypeError),
])
def test_bad_logits_are_refused(logits, error):
    with pytest.raises(error, match="logits"):
        sample_categorical(logits)


def test_triton_refuses_float64_logits():
    with pytest.raises(ValueError, match="float64"):
        sample_categorical(torch.zeros(2, 5, dtype=torch.float64), impl="triton")
    with use_impl("eager"):
        assert sample_categorical(torch.zeros(2, 5, dtype=torch.float64), temperature=0.0).tolist() == [0, 0]


def test_sampling_compiles_with_fullgraph():
    """The registered op under torch.compile(fullgraph=True): the compiled call draws what the eager call draws
    for the same seed (the per-row check becomes a device assert inside the graph)."""
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(10))
    seed = _seed(21)

    def draw(logits, seed):
        return sample_categorical(logits, temperature=0.9, top_k=7, top_p=0.8, seed=seed, offset=3)

    compiled = torch.compile(draw, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(logits, seed), draw(logits, seed))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt2_sized_rows_on_gpu(dtype, device):
    """[8, 50257] logits on the GPU (rows starting inside a 16-byte vector): the compiled kernel draws the eager
    reference's classes, plain and filtered, and greedy is torch.argmax."""
    generator = torch.Generator(device).manual_seed(11)
    logits = (2 * torch.randn(8, 50257, generator=generator, device=device)).to(dtype)
    seed = torch.tensor([77], device=device)
    for options in (dict(), dict(temperature=0.8, top_k=50, top_p=0.9)):
        got = sample_categorical(logits, seed=seed, offset=2, impl="triton", **options)
        assert torch.equal(got, sample_categorical(logits, seed=seed, offset=2, impl="eager", **options))
    assert torch.equal(sample_categorical(logits, temperature=0.0, impl="triton"), logits.argmax(dim=1))
