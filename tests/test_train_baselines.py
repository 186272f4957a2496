"""Baselines (genkernels.models.train.baselines) against independent numpy / scipy computations."""
import collections
import lzma
import math

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch

from genkernels.models.train import baselines, metrics
from genkernels.models.wavenet import mu_law_encode

from test_train_metrics import DIGITS_LEVELS, digits_split


@pytest.fixture(scope="module")
def digits_subset():
    """300 training and 100 held-out digits: enough for the statistics, small enough to fit in a second."""
    train_images, _, test_images, _ = digits_split()
    return train_images[:300], test_images[:100]


def reproduced_dequantization(train_images, test_images, seed):
    """The documented draw order: one generator seeded with ``seed``, the training split first."""
    generator = torch.Generator().manual_seed(seed)
    train = metrics.dequantize(train_images, DIGITS_LEVELS, generator, dtype=torch.float64)
    test = metrics.dequantize(test_images, DIGITS_LEVELS, generator, dtype=torch.float64)
    return train.reshape(len(train), -1).numpy(), test.reshape(len(test), -1).numpy()


def kernel_log_density(points, centres, h):
    """log 1/N sum_i N(y; c_i, h^2 I) from the pairwise differences, with scipy's logsumexp."""
    squared = ((points[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
    dims = points.shape[1]
    return scipy.special.logsumexp(-squared / (2 * h * h), axis=1) - math.log(len(centres)) \
        - dims / 2 * math.log(2 * math.pi * h * h)


# ----------------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------------
def test_kde_bits_per_dim_is_the_direct_gaussian_kernel_sum(digits_subset):
    train_images, test_images = digits_subset
    kde = baselines.kde_baseline(train_images, test_images, DIGITS_LEVELS, seed=5,
                                 bandwidths=[0.03, 0.06, 0.12, 0.25], folds=3)
    assert kde.chosen["bandwidth"] in (0.03, 0.06, 0.12, 0.25)
    train, test = reproduced_dequantization(train_images, test_images, 5)
    # the bandwidth of the best 3-fold held-out log-likelihood (consecutive folds of 100)
    cross_validated = [sum(kernel_log_density(train[i:i + 100], np.delete(train, np.s_[i:i + 100], axis=0), h).sum()
                           for i in (0, 100, 200)) for h in (0.03, 0.06, 0.12, 0.25)]
    assert kde.chosen["bandwidth"] == (0.03, 0.06, 0.12, 0.25)[int(np.argmax(cross_validated))]
    dims = train.shape[1]
    log_q = kernel_log_density(test, train, kde.chosen["bandwidth"])
    expected = np.mean(-(log_q - dims * math.log(DIGITS_LEVELS)) / (dims * math.log(2)))
    assert kde.bits_per_dim == pytest.approx(expected, rel=1e-9)
    samples = kde.sample(7, seed=1)
    assert samples.shape == (7, 1, 8, 8) and samples.dtype == torch.int64
    assert samples.min() >= 0 and samples.max() < DIGITS_LEVELS
    assert torch.equal(samples, kde.sample(7, seed=1))


def test_gmm_bits_per_dim_is_the_direct_mixture_density_with_the_lowest_bic(digits_subset):
    train_images, test_images = digits_subset
    gmm = baselines.gmm_baseline(train_images, test_images, DIGITS_LEVELS, components=(1, 3),
                                 covariance_types=("full", "diag"))
    model = gmm.model
    train, test = reproduced_dequantization(train_images, test_images, 0)
    covariances = model.covariances_ if gmm.chosen["covariance_type"] == "full" else \
        [np.diag(variances) for variances in model.covariances_]
    log_q = scipy.special.logsumexp(
        [math.log(w) + scipy.stats.multivariate_normal(m, c).logpdf(test)
         for w, m, c in zip(model.weights_, model.means_, covariances)], axis=0)
    dims, k = train.shape[1], gmm.chosen["components"]
    assert gmm.bits_per_dim == pytest.approx(np.mean(-(log_q - dims * math.log(17)) / (dims * math.log(2))),
                                             rel=1e-9)
    # BIC = -2 log L(train) + parameters * ln N, with k means, k covariances and k - 1 free weights
    covariance_parameters = dims * (dims + 1) // 2 if gmm.chosen["covariance_type"] == "full" else dims
    parameters = k * dims + k * covariance_parameters + k - 1
    train_log_q = scipy.special.logsumexp(
        [math.log(w) + scipy.stats.multivariate_normal(m, c).logpdf(train)
         for w, m, c in zip(model.weights_, model.means_, covariances)], axis=0)
    assert gmm.chosen["bic"] == pytest.approx(-2 * train_log_q.sum() + parameters * math.log(len(train)), rel=1e-9)
    samples = gmm.sample(5, seed=2)
    assert samples.shape == (5, 1, 8, 8) and torch.equal(samples, gmm.sample(5, seed=2))


def test_likelihood_baselines_report_both_densities_and_the_kde_samples(digits_subset):
    train_images, test_images = digits_subset
    labels = torch.arange(300) % 10  # any labels will do: the classifier only supplies features here
    classifier = metrics.fit_image_classifier(train_images, labels, DIGITS_LEVELS, epochs=1)
    result = baselines.likelihood_baselines(train_images, test_images, DIGITS_LEVELS, classifier=classifier,
                                            num_samples=50, bandwidths=[0.06, 0.12], components=(1, 2))
    kde = baselines.kde_baseline(train_images, test_images, DIGITS_LEVELS, bandwidths=[0.06, 0.12])
    assert result["kde_bits_per_dim"] == kde.bits_per_dim
    assert result["kde_bandwidth"] == kde.chosen["bandwidth"]
    assert result["gmm_components"] in (1, 2) and result["gmm_covariance_type"] in ("full", "diag")
    assert result["kde_samples"]["num_samples"] == 50
    expected = metrics.image_sample_quality(kde.sample(50, 0), classifier, train_images, test_images)
    assert result["kde_samples"]["frechet_distance"] == pytest.approx(expected["frechet_distance"], rel=1e-12)
    assert result["gmm_samples"]["num_samples"] == 50


def test_image_baselines_reject_bad_input(digits_subset):
    train_images, test_images = digits_subset
    with pytest.raises(ValueError, match="test_images"):
        baselines.kde_baseline(train_images, test_images[:, :, :4], DIGITS_LEVELS)
    with pytest.raises(ValueError, match="train_images"):
        baselines.kde_baseline(train_images, test_images, 16)  # digits have 17 levels
    with pytest.raises(TypeError, match="test_images"):
        baselines.gmm_baseline(train_images, test_images.float(), DIGITS_LEVELS)
    with pytest.raises(ValueError, match="train_images"):
        baselines.gmm_baseline(train_images[:0], test_images, DIGITS_LEVELS)
    with pytest.raises(ValueError, match="covariance_types"):
        baselines.gmm_baseline(train_images, test_images, DIGITS_LEVELS, covariance_types=("spherical!",))
    with pytest.raises(ValueError, match="bandwidths"):
        baselines.kde_baseline(train_images, test_images, DIGITS_LEVELS, bandwidths=[0.1, -1.0])


# ----------------------------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------------------------
TRAIN_TEXT = "the cat sat on the mat. the dog sat on the log. " * 6 + "a cat and a dog met on a mat."
TEST_TEXT = "the dog sat on the mat; a cat met the log!"  # ';' and '!' are not in the training text


def test_lzma_bits_per_char_is_the_compressed_size():
    def size(text):
        return len(lzma.compress(text.encode(), preset=9 | lzma.PRESET_EXTREME))

    assert baselines.lzma_bits_per_char(TEST_TEXT) == size(TEST_TEXT) * 8 / len(TEST_TEXT)
    assert baselines.lzma_bits_per_char(TEST_TEXT, TRAIN_TEXT) == \
        (size(TRAIN_TEXT + TEST_TEXT) - size(TRAIN_TEXT)) * 8 / len(TEST_TEXT)


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_ngram_probabilities_sum_to_one_over_the_alphabet(order):
    model = baselines.CharNGram(TRAIN_TEXT, 5)
    for history in ("", "t", "the c", "zzzz", "on th", "x!y;q"):  # seen, short, unseen, unknown characters
        distribution = model.distribution(history, order)
        assert set(distribution) == set(TRAIN_TEXT) | {model.unknown}
        assert math.fsum(distribution.values()) == pytest.approx(1.0, abs=1e-12)
        assert min(distribution.values()) > 0


def modified_discounts(counts):
    """Chen & Goodman's D_1, D_2, D_3+ from the counts of counts, or Y for every count where they are undefined."""
    n1, n2, n3, n4 = (sum(c == k for c in counts.values()) for k in (1, 2, 3, 4))
    y = n1 / (n1 + 2 * n2) if n1 else 0.5
    if n1 and n2 and n3 and n4:
        d = (1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3)
        if 0 < d[0] <= 1 and 0 < d[1] <= 2 and 0 < d[2] <= 3:
            return d
    return (y, y, y) if 0 < y <= 1 else (0.5, 0.5, 0.5)


def brute_force_kneser_ney_bigram(text, history_char, char):
    """Modified interpolated Kneser-Ney of order 2 from its definition, counting by scanning the text."""
    alphabet = set(text) | {"<unk>"}
    bigrams = [text[i:i + 2] for i in range(len(text) - 1)]
    raw = collections.Counter(bigrams)
    continuation = collections.Counter(gram[1] for gram in set(bigrams))  # distinct left neighbours of each char

    def interpolate(counts, lower):
        d = modified_discounts(counts)
        discount = {c: d[min(c, 3) - 1] for c in range(1, max(counts.values()) + 1)}
        return lambda following, w: (max(following.get(w, 0) - discount.get(following.get(w, 0), 0), 0)
                                     + sum(discount[c] for c in following.values()) * lower(w)) \
            / sum(following.values())

    unigram = interpolate(continuation, lambda w: 1 / len(alphabet))
    bigram = interpolate(raw, lambda w: unigram(continuation, w))
    return bigram({gram[1]: count for gram, count in raw.items() if gram[0] == history_char}, char)


def test_ngram_bigram_matches_its_definition():
    model = baselines.CharNGram(TRAIN_TEXT, 2)
    for history_char, char in (("t", "h"), ("t", " "), ("a", "q"), (" ", "c"), (".", " ")):
        expected = brute_force_kneser_ney_bigram(TRAIN_TEXT, history_char, char if char in TRAIN_TEXT else "<unk>")
        assert model.probability(history_char, char, 2) == pytest.approx(expected, rel=1e-12)


def test_ngram_bits_per_char_scores_each_character_given_its_history():
    model = baselines.CharNGram(TRAIN_TEXT, 4)
    expected = -np.mean([math.log2(model.distribution(TEST_TEXT[max(0, t - 3):t], 4).get(
        char, model.distribution(TEST_TEXT[max(0, t - 3):t], 4)[model.unknown])) for t, char in enumerate(TEST_TEXT)])
    assert model.bits_per_char(TEST_TEXT, 4) == pytest.approx(expected, rel=1e-12)


def test_ngram_bits_per_char_with_a_history_scores_only_the_text():
    model = baselines.CharNGram(TRAIN_TEXT, 4)
    history, text = TEST_TEXT[:10], TEST_TEXT[10:]
    whole = history + text
    expected = -math.fsum(math.log2(model.probability(whole[max(0, t - 3):t], whole[t], 4))
                          for t in range(len(history), len(whole))) / len(text)
    assert model.bits_per_char(text, 4, history) == pytest.approx(expected, rel=1e-12)
    assert model.bits_per_char(text, 4, history) != model.bits_per_char(text, 4)


def test_ngram_baseline_picks_a_long_order_for_a_periodic_text():
    periodic = "abcd" * 200
    result = baselines.ngram_baseline(periodic, "abcd" * 10, orders=(1, 2, 3))
    assert result.order >= 2
    assert result.bits_per_char < 0.1 < baselines.CharNGram(periodic, 1).bits_per_char("abcd" * 10, 1)
    assert set(result.validation_bits_per_char) == {1, 2, 3}


def test_text_baselines_report_every_figure():
    result = baselines.text_baselines(TRAIN_TEXT, TEST_TEXT)
    assert result["lzma_given_train_bits_per_char"] == baselines.lzma_bits_per_char(TEST_TEXT, TRAIN_TEXT)
    assert result["lzma_alone_bits_per_char"] == baselines.lzma_bits_per_char(TEST_TEXT)
    assert result["test_chars_unseen_in_train"] == 2 and result["test_chars"] == len(TEST_TEXT)
    assert 0 < result["ngram_bits_per_char"] < math.log2(len(set(TRAIN_TEXT)) + 1)


def test_text_baselines_score_only_the_text_after_its_history():
    history, text = TEST_TEXT[:7], TEST_TEXT[7:]
    result = baselines.text_baselines(TRAIN_TEXT, text, test_history=history, ngram_orders=(1, 2, 3))
    assert result["lzma_given_train_bits_per_char"] == baselines.lzma_bits_per_char(text, TRAIN_TEXT + history)
    assert result["lzma_alone_bits_per_char"] == baselines.lzma_bits_per_char(text, history)
    ngram = baselines.ngram_baseline(TRAIN_TEXT, text, orders=(1, 2, 3))
    assert result["ngram_order"] == ngram.order
    assert result["ngram_bits_per_char"] == ngram.model.bits_per_char(text, ngram.order, history)
    assert result["test_chars"] == len(text) and result["test_chars_unseen_in_train"] == 2


def test_text_baselines_reject_bad_input():
    with pytest.raises(TypeError, match="train_text"):
        baselines.text_baselines(b"bytes are not text", TEST_TEXT)
    with pytest.raises(ValueError, match="test_text"):
        baselines.text_baselines(TRAIN_TEXT, "")
    with pytest.raises(ValueError, match="order"):
        baselines.CharNGram(TRAIN_TEXT, 2).distribution("ab", 3)
    with pytest.raises(TypeError, match="test_history"):
        baselines.text_baselines(TRAIN_TEXT, TEST_TEXT, test_history=b"bytes")
    with pytest.raises(TypeError, match="history"):
        baselines.CharNGram(TRAIN_TEXT, 2).bits_per_char(TEST_TEXT, 2, history=None)


# ----------------------------------------------------------------------------------------------------------------
# Audio
# ----------------------------------------------------------------------------------------------------------------
def ar2_classes(count, length, seed):
    """An AR(2) resonance x_t = 1.8 x_{t-1} - 0.9 x_{t-2} + e_t, scaled to a peak of 0.9, as mu-law classes."""
    rng = np.random.default_rng(seed)
    signal = np.zeros((count, length))
    noise = rng.normal(size=(count, length))
    for t in range(2, length):
        signal[:, t] = 1.8 * signal[:, t - 1] - 0.9 * signal[:, t - 2] + noise[:, t]
    signal *= 0.9 / np.abs(signal).max()
    return mu_law_encode(torch.from_numpy(signal), 256)


@pytest.fixture(scope="module")
def ar2():
    return ar2_classes(4, 2000, seed=0), ar2_classes(2, 1000, seed=1)


def test_mu_law_unigram_is_the_add_one_histogram(ar2):
    train, test = ar2
    counts = np.bincount(train.numpy().ravel(), minlength=256) + 1.0
    expected = -np.mean(np.log2(counts / counts.sum())[test.numpy().ravel()])
    assert baselines.mu_law_unigram_baseline(train, test) == pytest.approx(expected, rel=1e-12)


def test_mu_law_bin_edges_separate_the_encoders_classes():
    edges = baselines.mu_law_bin_edges()
    assert torch.isinf(edges[[0, -1]]).all()
    inner = edges[1:-1]  # the boundary between classes c - 1 and c, for c = 1 .. 255
    assert torch.equal(mu_law_encode(inner - 1e-8, 256), torch.arange(255))
    assert torch.equal(mu_law_encode(inner + 1e-8, 256), torch.arange(1, 256))


def decoded(classes):
    """mu-law classes back to the linear domain from the companding formula (float32, as mu_law_decode)."""
    y = 2 * classes.double() / 255 - 1
    return (torch.sign(y) * (256.0 ** y.abs() - 1) / 255).float().double()


def test_lpc_fits_least_squares_and_gives_a_distribution_over_classes(ar2):
    train, test = ar2
    predictor = baselines.fit_linear_predictor(train, order=3, memories=(1.0, 0.8))
    signal = decoded(train).numpy()
    design = np.concatenate([np.stack([row[3 - k:len(row) - k] for k in (1, 2, 3)], axis=1) for row in signal])
    targets = np.concatenate([row[3:] for row in signal])
    expected = np.linalg.lstsq(design, targets, rcond=None)[0]
    np.testing.assert_allclose(predictor.coefficients.numpy(), expected, rtol=1e-6, atol=1e-9)
    probabilities = predictor.class_probabilities(test[:, :200])
    assert probabilities.shape == (2, 200, 256)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(2, 200, dtype=torch.float64), rtol=0, atol=1e-12)
    observed = probabilities.gather(-1, test[:, :200, None])[..., 0]
    assert predictor.bits_per_sample(test[:, :200]) == pytest.approx(float(-observed.log2().mean()), rel=1e-10)


def test_lpc_scale_follows_only_past_residuals(ar2):
    train, test = ar2
    predictor = baselines.fit_linear_predictor(train, order=2, family="laplace", memories=(0.8,))
    assert predictor.memory == 0.8 and predictor.gain > 0
    changed = test[:, :300].clone()
    changed[:, 200] = 255 - changed[:, 200]
    before, after = predictor.class_probabilities(test[:, :300]), predictor.class_probabilities(changed)
    assert torch.equal(before[:, :201], after[:, :201])  # step 200's distribution depends on steps < 200 only
    assert not torch.equal(before[:, 201], after[:, 201])
    # the running level by its definition, from the decoded signal and the predictions
    predicted, scale = predictor.predictions_and_scales(test[:, :300])
    residual = (decoded(test[:, :300]) - predicted).abs()
    level = torch.full((2,), predictor.initial, dtype=torch.float64)
    for t in range(300):
        torch.testing.assert_close(scale[:, t], (predictor.gain * level).clamp_min(baselines.MIN_SCALE))
        level = 0.8 * level + 0.2 * residual[:, t]


def test_lpc_beats_the_unigram_on_an_ar2_signal(ar2):
    train, test = ar2
    result = baselines.audio_baselines(train, test, lpc_order=2)
    assert result["lpc_bits_per_sample"] < result["mu_law_unigram_bits_per_sample"] - 1.0
    assert result["lpc_bits_per_sample"] <= result["lpc_fixed_scale_bits_per_sample"] + 0.05
    assert result["lpc_residual"] in ("laplace", "gaussian") and result["lpc_scale_memory"] in (1.0, 0.95, 0.8, 0.5)


@pytest.mark.parametrize("train, error, words", [
    (torch.zeros(2, 10), TypeError, "train"),
    (torch.zeros(20, dtype=torch.int64), ValueError, r"train must be non-empty mu-law classes \[N, T\]"),
    (torch.zeros(2, 0, dtype=torch.int64), ValueError, "train"),
    (torch.full((2, 10), 256), ValueError, "train"),
])
def test_audio_baselines_reject_bad_input(ar2, train, error, words):
    with pytest.raises(error, match=words):
        baselines.audio_baselines(train, ar2[1])


def test_lpc_needs_more_samples_than_its_order(ar2):
    with pytest.raises(ValueError, match="order"):
        baselines.fit_linear_predictor(ar2[0][:, :4], order=4)
