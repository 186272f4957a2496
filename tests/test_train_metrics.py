"""Held-out metrics (genkernels.models.train.metrics) against plain numpy / scipy computations."""
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from genkernels.models.train import metrics

DIGITS_LEVELS = 17
ACCURACY_FLOOR = 0.95  # the classifier's accuracy on the held-out digits must reach this


def digits_split():
    """scikit-learn's digits as int64 [N, 1, 8, 8] with labels; the last 300 of a seeded permutation held out."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.int64)).reshape(-1, 1, 8, 8)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(0))
    train, test = order[:-300], order[-300:]
    return images[train], labels[train], images[test], labels[test]


@pytest.fixture(scope="module")
def digits():
    return digits_split()


@pytest.fixture(scope="module")
def classifier(digits):
    train_images, train_labels, _, _ = digits
    return metrics.fit_image_classifier(train_images, train_labels, DIGITS_LEVELS, seed=0)


# ----------------------------------------------------------------------------------------------------------------
# dequantize, requantize, bits_per_dim
# ----------------------------------------------------------------------------------------------------------------
def test_dequantize_stays_in_each_cell_and_repeats_with_the_seed():
    images = torch.randint(0, 5, (3, 2, 4, 4), generator=torch.Generator().manual_seed(1))
    y = metrics.dequantize(images, 5, torch.Generator().manual_seed(7), dtype=torch.float64)
    assert y.dtype == torch.float64 and y.shape == images.shape
    assert torch.equal(torch.floor(y * 5).long(), images)
    assert ((y >= 0) & (y < 1)).all()
    again = metrics.dequantize(images, 5, torch.Generator().manual_seed(7), dtype=torch.float64)
    assert torch.equal(y, again)
    assert torch.equal(metrics.requantize(y, 5), images)
    # the noise is the generator's uniform draw, added before scaling
    expected = (images.double() + torch.rand(images.shape, generator=torch.Generator().manual_seed(7),
                                             dtype=torch.float64)) / 5
    assert torch.equal(y, expected)


def test_requantize_sends_values_outside_the_unit_interval_to_the_end_levels():
    values = torch.tensor([-0.3, 0.0, 0.49, 0.5, 0.99, 1.0, 7.0])
    assert metrics.requantize(values, 2).tolist() == [0, 0, 0, 1, 1, 1, 1]


def test_requantize_marks_images_with_a_nan_as_failed_and_clamps_infinities():
    values = torch.tensor([[[0.1, 0.9]], [[float("nan"), 0.5]], [[float("inf"), -float("inf")]]])
    assert metrics.requantize(values, 4).tolist() == [[[0, 3]], [[-1, -1]], [[3, 0]]]
    assert metrics.FAILED_SAMPLE == -1


def test_bits_per_dim_of_the_uniform_density_is_log2_levels():
    # q = 1 on [0, 1)^D is the uniform distribution over L^D images: exactly log2(L) bits per dimension
    for levels in (2, 17, 256):
        assert metrics.bits_per_dim(0.0, 64, levels) == pytest.approx(math.log2(levels), rel=1e-12)


def test_bits_per_dim_keeps_the_type_and_matches_the_formula():
    log_density = np.array([10.0, -3.5, 120.25])
    expected = -(log_density - 12 * np.log(17)) / (12 * np.log(2))
    np.testing.assert_allclose(metrics.bits_per_dim(log_density, 12, 17), expected, rtol=1e-13)
    result = metrics.bits_per_dim(torch.from_numpy(log_density), 12, 17)
    assert isinstance(result, torch.Tensor)
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-13)


@pytest.mark.parametrize("images, levels, error, words", [
    (torch.zeros(2, 1, 3, 3), 4, TypeError, "images"),
    (torch.zeros(0, 1, 3, 3, dtype=torch.int64), 4, ValueError, "images"),
    (torch.zeros(2, 3, 3, dtype=torch.int64), 4, ValueError, "[N, C, H, W]"),
    (torch.full((2, 1, 3, 3), 4, dtype=torch.int64), 4, ValueError, "images"),
    (torch.full((2, 1, 3, 3), -1, dtype=torch.int64), 4, ValueError, "images"),
    (torch.zeros(2, 1, 3, 3, dtype=torch.int64), 1, ValueError, "levels"),
])
def test_dequantize_rejects_bad_input(images, levels, error, words):
    with pytest.raises(error, match=words.replace("[", r"\[").replace("]", r"\]")):
        metrics.dequantize(images, levels)


def test_bits_per_dim_rejects_bad_input():
    with pytest.raises(ValueError, match="num_dims"):
        metrics.bits_per_dim(0.0, 0, 17)
    with pytest.raises(ValueError, match="levels"):
        metrics.bits_per_dim(0.0, 64, 1)
    with pytest.raises(TypeError, match="log_density"):
        metrics.bits_per_dim("1.0", 64, 17)


# ----------------------------------------------------------------------------------------------------------------
# Frechet distance
# ----------------------------------------------------------------------------------------------------------------
def scipy_frechet(mean_a, cov_a, mean_b, cov_b):
    """The textbook formula with scipy's general matrix square root."""
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a + cov_b - 2 * root))


def test_frechet_distance_of_identical_sets_is_zero():
    features = np.random.default_rng(0).normal(size=(200, 16)) @ np.random.default_rng(1).normal(size=(16, 16))
    assert metrics.frechet_distance(features, features) == pytest.approx(0.0, abs=1e-8 * np.trace(np.cov(features.T)))


def test_frechet_distance_of_two_diagonal_gaussians_has_its_closed_form():
    # for commuting covariances: |m1 - m2|^2 + sum (sqrt(a) - sqrt(b))^2
    first = metrics.FeatureGaussian(np.array([0.0, 1.0, 2.0]), np.diag([1.0, 4.0, 0.25]))
    second = metrics.FeatureGaussian(np.array([1.0, 1.0, 0.0]), np.diag([9.0, 1.0, 0.0]))
    expected = 1.0 + 4.0 + (1 - 3) ** 2 + (2 - 1) ** 2 + (0.5 - 0) ** 2
    assert metrics.gaussian_frechet_distance(first, second) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_matches_scipy_on_random_covariances():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(300, 8)), rng.normal(size=(250, 8)) @ rng.normal(size=(8, 8)) + 0.5
    expected = scipy_frechet(a.mean(0), np.cov(a.T), b.mean(0), np.cov(b.T))
    assert metrics.frechet_distance(torch.from_numpy(a).float(), b) == pytest.approx(expected, rel=1e-5)


def test_frechet_distance_rejects_bad_features():
    with pytest.raises(ValueError, match="features_a"):
        metrics.frechet_distance(np.zeros(5), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="features_b"):
        metrics.frechet_distance(np.zeros((5, 2)), np.zeros((1, 2)))
    with pytest.raises(TypeError, match="features_a"):
        metrics.frechet_distance(np.zeros((5, 2), dtype=np.int64), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="finite"):
        metrics.frechet_distance(np.full((5, 2), np.nan), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="dimension"):
        metrics.frechet_distance(np.zeros((5, 2)), np.zeros((5, 3)))


# ----------------------------------------------------------------------------------------------------------------
# Classifier and sample quality
# ----------------------------------------------------------------------------------------------------------------
def test_classifier_accuracy_on_held_out_digits(digits, classifier):
    _, _, test_images, test_labels = digits
    assert classifier.accuracy(test_images, test_labels) >= ACCURACY_FLOOR
    probabilities = classifier.probabilities(test_images)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(300), rtol=0, atol=1e-5)
    assert classifier.features(test_images).shape == (300, 64)


def test_classifier_is_a_function_of_the_seed(digits):
    train_images, train_labels, test_images, _ = digits
    fits = [metrics.fit_image_classifier(train_images[:200], train_labels[:200], DIGITS_LEVELS, seed=3, epochs=1)
            for _ in range(2)]
    assert torch.equal(fits[0].features(test_images), fits[1].features(test_images))


def test_class_histogram_statistics_against_numpy():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(40, 5)) + np.array([3.0, 0, 0, 0, -9.0])
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    result = metrics.class_histogram_statistics(torch.from_numpy(probabilities), coverage_fraction=0.1)
    histogram = np.bincount(probabilities.argmax(1), minlength=5) / 40
    present = histogram[histogram > 0]
    assert result["mean_max_confidence"] == pytest.approx(probabilities.max(1).mean(), rel=1e-12)
    assert result["class_coverage"] == pytest.approx(np.mean(histogram >= 0.1))
    assert result["class_entropy_bits"] == pytest.approx(-(present * np.log2(present)).sum(), rel=1e-12)
    np.testing.assert_allclose(result["class_histogram"], histogram)


def test_real_held_out_images_score_as_real(digits, classifier):
    train_images, _, test_images, test_labels = digits
    quality = metrics.image_sample_quality(test_images, classifier, train_images, test_images)
    assert quality["frechet_distance"] == pytest.approx(0.0, abs=1e-6)
    assert quality["frechet_floor_train_vs_test"] > 0
    assert quality["class_coverage"] == 1.0
    assert quality["class_entropy_bits"] > 0.95 * math.log2(10)
    assert quality["num_samples"] == 300
    # a model that draws only zeros covers one class of ten, with no entropy, and sits far from the test set
    zeros = test_images[test_labels == 0]
    collapsed = metrics.image_sample_quality(zeros, classifier, train_images, test_images)
    assert collapsed["class_coverage"] == pytest.approx(0.1)
    assert collapsed["class_entropy_bits"] < 0.2
    assert collapsed["frechet_distance"] > 5 * collapsed["frechet_floor_train_vs_test"]


def test_failed_samples_are_counted_and_scored_as_blank_images(digits, classifier):
    train_images, _, test_images, _ = digits
    samples = test_images[:50].clone()
    samples[[3, 17]] = metrics.FAILED_SAMPLE
    quality = metrics.image_sample_quality(samples, classifier, train_images, test_images)
    blank = samples.clamp(min=0)
    expected = metrics.image_sample_quality(blank, classifier, train_images, test_images)
    assert quality["failed_samples"] == 2 and expected["failed_samples"] == 0
    assert quality["frechet_distance"] == expected["frechet_distance"]
    assert quality["class_histogram"] == expected["class_histogram"]
    samples[5, 0, 0, 0] = metrics.FAILED_SAMPLE  # a failed value in an otherwise generated image is a bad level
    with pytest.raises(ValueError, match=r"samples must lie in \[0, 17\)"):
        metrics.image_sample_quality(samples, classifier, train_images, test_images)


def test_nearest_neighbour_distance_against_a_loop():
    images = torch.randint(0, 5, (7, 1, 3, 3), generator=torch.Generator().manual_seed(1))
    references = torch.randint(0, 5, (11, 1, 3, 3), generator=torch.Generator().manual_seed(2))
    expected = np.mean([min(float(((a.double() - b.double()) / 4).square().sum().sqrt()) for b in references)
                        for a in images])
    assert metrics.nearest_neighbour_distance(images, references, 5, batch_size=3) == pytest.approx(expected)
    assert metrics.nearest_neighbour_distance(references[:4], references, 5) == 0.0
    with pytest.raises(ValueError, match=r"references must be images of the shape of images' \[1, 3, 3\]"):
        metrics.nearest_neighbour_distance(images, references[:, :, :2], 5)
    with pytest.raises(ValueError, match=r"images must lie in \[0, 3\)"):
        metrics.nearest_neighbour_distance(images, references, 3)
    with pytest.raises(TypeError, match="images"):
        metrics.nearest_neighbour_distance(images.float(), references, 5)
    with pytest.raises(ValueError, match=r"quantized must have the shape of values \[2, 3\]"):
        metrics.mark_failed_samples(torch.zeros(2, 2), torch.zeros(2, 3))


def test_copies_of_training_images_sit_closer_to_them_than_held_out_images(digits, classifier):
    train_images, _, test_images, _ = digits
    quality = metrics.image_sample_quality(train_images[:100], classifier, train_images, test_images)
    assert quality["nearest_train_distance"] == 0.0 < quality["nearest_train_distance_held_out"]


def test_sample_quality_rejects_bad_samples(digits, classifier):
    train_images, _, test_images, _ = digits
    with pytest.raises(ValueError, match="samples"):
        metrics.image_sample_quality(torch.full((4, 1, 8, 8), 17), classifier, train_images, test_images)
    with pytest.raises(ValueError, match=r"samples must be images \[N, 1, 8, 8\]"):
        metrics.image_sample_quality(torch.zeros(4, 1, 4, 4, dtype=torch.int64), classifier, train_images,
                                     test_images)
    with pytest.raises(ValueError, match="at least 2"):
        metrics.image_sample_quality(test_images[:1], classifier, train_images, test_images)
    with pytest.raises(TypeError, match="samples"):
        metrics.image_sample_quality(test_images.float(), classifier, train_images, test_images)
    with pytest.raises(TypeError, match="classifier"):
        metrics.image_sample_quality(test_images, object(), train_images, test_images)


def test_fit_image_classifier_rejects_bad_labels(digits):
    train_images, train_labels, _, _ = digits
    with pytest.raises(ValueError, match="labels"):
        metrics.fit_image_classifier(train_images, train_labels[:-1], DIGITS_LEVELS)
    with pytest.raises(TypeError, match="labels"):
        metrics.fit_image_classifier(train_images, train_labels.float(), DIGITS_LEVELS)
