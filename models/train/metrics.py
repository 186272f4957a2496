"""Held-out metrics of trained models: likelihoods in bits and the quality of generated images.

Every function here is a pure function of tensors or arrays, so that a model and its baselines
(:mod:`genkernels.models.train.baselines`) are scored by the same code.

Likelihoods of images. Images are integer tensors ``[N, C, H, W]`` of levels ``0 .. L-1``. A continuous density
``q`` is scored on uniformly dequantized images (:func:`dequantize`, ``y = (x + u) / L``, ``u ~ U[0, 1)^D``), and
:func:`bits_per_dim` turns ``log q(y)`` into ``-(log q(y) - D log L) / (D ln 2)``: by Jensen's inequality this is
an upper bound on the bits per dimension of the discrete model ``P(x) = integral of q over x's cell``. A discrete
model's bits per dimension is ``-log2 P(x) / D`` directly.

Sample quality of images, from a small classifier fitted on the training split (:func:`fit_image_classifier`):

* :func:`frechet_distance` between the Gaussians fitted to its penultimate-layer features of two image sets (the
  Frechet Inception Distance of Heusel et al. 2017, with this classifier in place of Inception);
* :func:`image_sample_quality`: that distance between the samples and the held-out images, next to its floor (the
  distance between as many real training images and the same held-out images), the classifier's mean
  max-confidence on the samples, and the class histogram of the samples (coverage and entropy).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from genkernels.kernels.checks import (
    check_generator,
    check_in_range,
    check_int,
    check_integer_tensor,
    check_real,
    check_tensor,
    describe,
)

ArrayLike = Union[float, np.ndarray, torch.Tensor]
FAILED_SAMPLE = -1  # every level of a generated image that has no levels (a non-finite sample, see requantize)


# ----------------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------------
def check_level_images(images: object, name: str, levels: int) -> torch.Tensor:
    """Require a non-empty integer tensor ``[N, C, H, W]`` with every value in ``0 .. levels-1``."""
    images = check_integer_tensor(images, name)
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"{name} must be non-empty integer images [N, C, H, W] with N >= 1; got {describe(images)}")
    check_in_range(images, name, 0, levels)
    return images


def check_labels(labels: object, name: str, count: int) -> torch.Tensor:
    """Require integer class labels ``[count]`` with every value >= 0."""
    labels = check_integer_tensor(labels, name)
    if labels.shape != (count,):
        raise ValueError(f"{name} must have shape [{count}] (one label per image); got {describe(labels)}")
    check_in_range(labels, name, 0, math.inf)
    return labels


def check_features(features: object, name: str) -> np.ndarray:
    """Require a 2-D float array or tensor ``[N, F]`` with ``N >= 2`` (a covariance needs two rows); returns fp64."""
    if isinstance(features, torch.Tensor):
        shown = describe(features)
        features = features.detach().cpu().double().numpy()
    elif isinstance(features, np.ndarray):
        shown = f"shape {list(features.shape)}, dtype {features.dtype}"
    else:
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(features).__name__}")
    if not np.issubdtype(features.dtype, np.floating):
        raise TypeError(f"{name} must hold floating-point features; got {shown}")
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"{name} must be features [N, F] with N >= 2; got {shown}")
    if not np.isfinite(features).all():
        raise ValueError(f"{name} must be finite; got a NaN or infinite value in {shown}")
    return features.astype(np.float64)


# ----------------------------------------------------------------------------------------------------------------
# Likelihoods
# ----------------------------------------------------------------------------------------------------------------
def dequantize(images: torch.Tensor, levels: int, generator: torch.Generator | None = None, *,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform dequantization ``y = (x + u) / L`` with ``u ~ U[0, 1)`` drawn independently per value (from
    ``generator``; the same generator state gives the same ``y``).

    ``images``: non-empty integer images ``[N, C, H, W]`` of levels ``0 .. levels-1``; ``levels``: ``L >= 2``;
    ``dtype``: a floating-point dtype of the result (the draws depend on it). Returns ``y``, each value in its
    cell ``[x / L, (x + 1) / L)`` (in float32 and narrower, ``x + u`` can round up to the cell's upper
    edge, about once in ``2^24 / x`` values)."""
    levels = check_int(levels, "levels", low=2)
    images = check_level_images(images, "images", levels)
    check_generator(generator, images.device, "images")
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point dtype; got {dtype}")
    noise = torch.rand(images.shape, generator=generator, dtype=dtype, device=images.device)
    return (images.to(dtype) + noise) / levels


def requantize(values: torch.Tensor, levels: int) -> torch.Tensor:
    """Continuous images back to levels: ``x = clamp(floor(L y), 0, L - 1)`` as int64, the cell of ``y`` under
    :func:`dequantize` (values outside ``[0, 1)``, such as samples of a density on all of ``R^D``, go to the nearest
    end level, infinities included). ``values``: a floating-point tensor ``[N, ...]`` of ``N`` images; ``levels``:
    ``L >= 2``. An image with a NaN value has no levels: all its values become :data:`FAILED_SAMPLE`, which
    :func:`image_sample_quality` counts (an invertible flow's inverse can overflow for a latent far in its tail)."""
    levels = check_int(levels, "levels", low=2)
    values = check_tensor(values, "values")
    if not values.dtype.is_floating_point:
        raise TypeError(f"values must be a floating-point tensor; got {describe(values)}")
    return mark_failed_samples(torch.floor(values.nan_to_num(nan=0.0) * levels).clamp(0, levels - 1), values)


def mark_failed_samples(quantized: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``quantized`` (levels computed from the generated ``values`` ``[N, ...]``) as int64, with every level of
    each image whose ``values`` hold a NaN set to :data:`FAILED_SAMPLE`."""
    quantized, values = check_tensor(quantized, "quantized"), check_tensor(values, "values")
    if quantized.shape != values.shape:
        raise ValueError(f"quantized must have the shape of values {list(values.shape)}; got {describe(quantized)}")
    failed = torch.isnan(values).reshape(values.shape[0], -1).any(dim=1) if values.dim() else torch.isnan(values)
    return quantized.to(torch.int64).masked_fill(failed.reshape((-1,) + (1,) * (values.dim() - 1)), FAILED_SAMPLE)


def bits_per_dim(log_density: ArrayLike, num_dims: int, levels: int) -> ArrayLike:
    """``-(log q(y) - D log L) / (D ln 2)``: the bits per dimension that a density ``q`` over dequantized images
    ``y = (x + u) / L`` in ``[0, 1)^D`` gives the discrete images ``x`` (an upper bound on the discrete model's; see
    the module docstring). Elementwise: ``log_density`` (natural log, per image) is a number, array or tensor,
    and the result has its type; average over images afterwards. ``num_dims``: ``D >= 1``; ``levels``: ``L >= 2``.
    """
    num_dims = check_int(num_dims, "num_dims", low=1)
    levels = check_int(levels, "levels", low=2)
    if not isinstance(log_density, (float, int, np.ndarray, torch.Tensor)) or isinstance(log_density, bool):
        raise TypeError(f"log_density must be a number, numpy array or torch.Tensor; got "
                        f"{type(log_density).__name__}")
    return -(log_density - num_dims * math.log(levels)) / (num_dims * math.log(2.0))


# ----------------------------------------------------------------------------------------------------------------
# Classifier
# ----------------------------------------------------------------------------------------------------------------
class ImageClassifier(nn.Module):
    """An MLP on images scaled to ``x / (L - 1)`` and flattened: ``D -> 256 -> ReLU -> 64 -> ReLU -> classes``.
    The 64 ReLU outputs are the :meth:`features` of the Frechet distance."""

    def __init__(self, image_shape: tuple[int, int, int], levels: int, num_classes: int, hidden: int = 256,
                 features: int = 64):
        super().__init__()
        self.image_shape, self.levels, self.num_classes = tuple(image_shape), levels, num_classes
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(image_shape), hidden), nn.ReLU(),
                                  nn.Linear(hidden, features), nn.ReLU())
        self.head = nn.Linear(features, num_classes)

    def check_images(self, images: object, name: str) -> torch.Tensor:
        """Require non-empty integer images of the shape and levels the classifier was fitted on."""
        images = check_level_images(images, name, self.levels)
        if tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"{name} must be images [N, {', '.join(map(str, self.image_shape))}] (the shape the "
                             f"classifier was fitted on); got {describe(images)}")
        return images

    def _inputs(self, images: torch.Tensor) -> torch.Tensor:
        images = self.check_images(images, "images").to(self.head.weight.device, torch.float32)
        return images / (self.levels - 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits ``[N, classes]`` of integer images ``[N, C, H, W]``."""
        return self.head(self.body(self._inputs(images)))

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features ``[N, 64]`` (float32) of integer images."""
        return self.body(self._inputs(images))

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``softmax(logits)`` ``[N, classes]`` of integer images."""
        return torch.softmax(self(images), dim=1)

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """The fraction of ``images`` whose most probable class is their label."""
        labels = check_labels(labels, "labels", images.shape[0])
        return float((self.probabilities(images).argmax(dim=1) == labels).double().mean())


def fit_image_classifier(images: torch.Tensor, labels: torch.Tensor, levels: int, *, seed: int = 0,
                         epochs: int = 40, batch_size: int = 64) -> ImageClassifier:
    """An :class:`ImageClassifier` fitted to ``images`` (integer ``[N, C, H, W]``, levels ``0 .. levels-1``) and
    their ``labels`` (int ``[N]``; ``max(labels) + 1`` classes) by cross-entropy with Adam (lr 1e-3, weight decay
    1e-4) over ``epochs`` shuffled passes in batches of ``batch_size``. The weights and the batch order are a pure
    function of ``seed`` (the global random state is left as it was). Returned in eval mode."""
    levels = check_int(levels, "levels", low=2)
    images = check_level_images(images, "images", levels)
    labels = check_labels(labels, "labels", images.shape[0])
    check_int(seed, "seed", low=0)
    check_int(epochs, "epochs", low=1)
    check_int(batch_size, "batch_size", low=1)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ImageClassifier(tuple(images.shape[1:]), levels, int(labels.max()) + 1)
    images, labels = images.cpu(), labels.cpu().long()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(images.shape[0], generator=generator)
        for start in range(0, images.shape[0], batch_size):
            batch = order[start:start + batch_size]
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# Frechet distance
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FeatureGaussian:
    """The mean ``[F]`` and covariance ``[F, F]`` (unbiased, fp64) of a feature set."""

    mean: np.ndarray
    covariance: np.ndarray

    @classmethod
    def of(cls, features: ArrayLike, name: str = "features") -> "FeatureGaussian":
        """The Gaussian of a feature set ``[N, F]`` (tensor or array, ``N >= 2``; ``name`` for errors)."""
        features = check_features(features, name)
        return cls(features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], -1))


def _symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The PSD square root of a symmetric PSD matrix (eigenvalues below zero from rounding clipped to zero)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def gaussian_frechet_distance(first: FeatureGaussian, second: FeatureGaussian) -> float:
    """The squared 2-Wasserstein (Frechet) distance between ``N(m1, S1)`` and ``N(m2, S2)``:

        |m1 - m2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2)

    (``tr((S1 S2)^1/2)`` written with symmetric matrices only: both square roots come from symmetric
    eigendecompositions in fp64, so no complex parts or non-symmetric square roots arise, and singular
    covariances are fine). Clipped at 0 against rounding."""
    if first.mean.shape != second.mean.shape:
        raise ValueError(f"the two Gaussians must have one dimension; got {first.mean.shape[0]} and "
                         f"{second.mean.shape[0]} features")
    root = _symmetric_sqrt(first.covariance)
    cross = root @ second.covariance @ root
    cross_trace = np.sqrt(np.clip(np.linalg.eigvalsh((cross + cross.T) / 2), 0.0, None)).sum()
    difference = first.mean - second.mean
    distance = difference @ difference + np.trace(first.covariance) + np.trace(second.covariance) - 2 * cross_trace
    return float(max(distance, 0.0))


def frechet_distance(features_a: ArrayLike, features_b: ArrayLike) -> float:
    """:func:`gaussian_frechet_distance` between the Gaussians (mean, unbiased covariance) of two feature sets
    ``[N_a, F]`` and ``[N_b, F]`` (tensors or arrays; ``N >= 2``). It is biased upwards for finite sets, more so
    for fewer rows: compare distances computed from sets of equal sizes."""
    return gaussian_frechet_distance(FeatureGaussian.of(features_a, "features_a"),
                                     FeatureGaussian.of(features_b, "features_b"))


# ----------------------------------------------------------------------------------------------------------------
# Sample quality
# ----------------------------------------------------------------------------------------------------------------
def class_histogram_statistics(probabilities: torch.Tensor, coverage_fraction: float = 0.05) -> dict:
    """Statistics of predicted classes ``argmax`` of ``probabilities`` ``[N, K]`` (rows summing to 1):

    * ``mean_max_confidence``: the mean over rows of ``max_k p_k`` (confident classifications of samples suggest
      recognisable images);
    * ``class_coverage``: the fraction of the ``K`` classes predicted for at least ``coverage_fraction`` of the
      rows (0.05 is half a uniform share of 10 classes);
    * ``class_entropy_bits``: the entropy of the predicted-class histogram (``log2 K`` when uniform);
    * ``class_histogram``: the fraction of rows predicted as each class."""
    probabilities = check_tensor(probabilities, "probabilities")
    if probabilities.dim() != 2 or probabilities.shape[0] == 0 or not probabilities.dtype.is_floating_point:
        raise ValueError(f"probabilities must be floating-point [N, classes] with N >= 1; got "
                         f"{describe(probabilities)}")
    coverage_fraction = check_real(coverage_fraction, "coverage_fraction", low=0.0, high=1.0, low_inclusive=False)
    probabilities = probabilities.double()
    histogram = torch.bincount(probabilities.argmax(dim=1), minlength=probabilities.shape[1]).double()
    histogram /= histogram.sum()
    present = histogram[histogram > 0]
    return {
        "mean_max_confidence": float(probabilities.max(dim=1).values.mean()),
        "class_coverage": float((histogram >= coverage_fraction).double().mean()),
        "class_entropy_bits": float(-(present * present.log2()).sum()),
        "class_histogram": histogram.tolist(),
    }


def image_sample_quality(samples: torch.Tensor, classifier: ImageClassifier, train_images: torch.Tensor,
                         test_images: torch.Tensor, *, coverage_fraction: float = 0.05, seed: int = 0) -> dict:
    """How the ``samples`` of a model (integer images ``[N, C, H, W]`` of the classifier's levels) compare with
    held-out images, as a JSON-ready dict:

    * ``frechet_distance``: :func:`frechet_distance` of the ``classifier``'s features (see
      :func:`fit_image_classifier`) between the samples and ``test_images``;
    * ``frechet_floor_train_vs_test``: the same for ``min(N, len(train_images))`` real training images drawn
      without replacement (seeded by ``seed``) in place of the samples: what a perfect model's samples would score
      with as many images (the distance is biased by the set sizes, so the floor uses the samples' count);
    * ``mean_max_confidence``, ``class_coverage``, ``class_entropy_bits``, ``class_histogram`` of the samples
      (:func:`class_histogram_statistics`), and ``num_samples``;
    * ``nearest_train_distance``: the mean over samples of the Euclidean distance (pixels scaled to ``x / (L-1)``)
      to the nearest training image, beside ``nearest_train_distance_held_out``, the same for the held-out
      images: samples much closer to the training images than new real images are copy them (a kernel density
      with a small bandwidth does; the Frechet distance alone rewards that);
    * ``failed_samples``: how many samples are all :data:`FAILED_SAMPLE` (non-finite model outputs, see
      :func:`requantize`); they stay in every figure above as blank images (every level 0), so a model that fails
      to produce an image is scored for it rather than spared.
    """
    if not isinstance(classifier, ImageClassifier):
        raise TypeError(f"classifier must be an ImageClassifier (fit_image_classifier); got "
                        f"{type(classifier).__name__}")
    check_int(seed, "seed", low=0)
    samples = check_integer_tensor(samples, "samples")
    failed = (samples == FAILED_SAMPLE).reshape(samples.shape[0], -1).all(dim=1) if samples.dim() == 4 else None
    if failed is not None:
        samples = samples.masked_fill(failed.reshape(-1, 1, 1, 1), 0)
    samples = classifier.check_images(samples, "samples")
    if samples.shape[0] < 2:
        raise ValueError(f"samples must hold at least 2 images (a feature covariance); got {describe(samples)}")
    train_images = classifier.check_images(train_images, "train_images")
    test_features = classifier.features(classifier.check_images(test_images, "test_images"))
    sample_features = classifier.features(samples)
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(train_images.shape[0], generator=generator)[:samples.shape[0]]
    floor = frechet_distance(classifier.features(train_images[chosen]), test_features)
    return {
        "frechet_distance": frechet_distance(sample_features, test_features),
        "frechet_floor_train_vs_test": floor,
        **class_histogram_statistics(classifier.probabilities(samples), coverage_fraction),
        "nearest_train_distance": nearest_neighbour_distance(samples, train_images, classifier.levels),
        "nearest_train_distance_held_out": nearest_neighbour_distance(test_images, train_images, classifier.levels),
        "num_samples": int(samples.shape[0]),
        "failed_samples": int(failed.sum()),
    }


def nearest_neighbour_distance(images: torch.Tensor, references: torch.Tensor, levels: int,
                               batch_size: int = 1024) -> float:
    """The mean over ``images`` of ``min_j |x / (L - 1) - r_j / (L - 1)|_2``: the Euclidean distance of each
    integer image to its nearest image among ``references`` (integer images of the same shape), in fp64."""
    levels = check_int(levels, "levels", low=2)
    images = check_level_images(images, "images", levels)
    references = check_level_images(references, "references", levels)
    if images.shape[1:] != references.shape[1:]:
        raise ValueError(f"references must be images of the shape of images' {list(images.shape[1:])}; got "
                         f"{describe(references)}")
    check_int(batch_size, "batch_size", low=1)
    flat_references = references.reshape(references.shape[0], -1).double() / (levels - 1)
    total = 0.0
    for chunk in images.reshape(images.shape[0], -1).split(batch_size):
        total += float(torch.cdist(chunk.double() / (levels - 1), flat_references).min(dim=1).values.sum())
    return total / images.shape[0]
