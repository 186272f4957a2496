"""Classical baselines for held-out likelihoods and sample quality, scored by the code that scores the models.

Entry points (each returns a JSON-ready dict whose keys name their units; scikit-learn, for the mixture, is imported
inside the function that uses it):

* :func:`likelihood_baselines` ``(train_images, test_images, levels)``: a Gaussian kernel density estimate
  (:func:`kde_baseline`, evaluated exactly) and a Gaussian mixture (:func:`gmm_baseline`, scikit-learn's) fitted
  to the dequantized training images, in bits per dimension on the dequantized test images (the same
  :func:`~genkernels.models.train.metrics.dequantize` and :func:`~genkernels.models.train.metrics.bits_per_dim`
  as the flows); given a classifier, also the sample quality of the KDE's samples
  (:func:`~genkernels.models.train.metrics.image_sample_quality`).
* :func:`text_baselines` ``(train_text, test_text)``: lzma's compressed size (:func:`lzma_bits_per_char`) and a
  modified interpolated Kneser-Ney character n-gram model (:func:`ngram_baseline`), in bits per held-out character.
* :func:`audio_baselines` ``(train, test)``: on mu-law classes ``[N, T]``, an add-one smoothed histogram
  (:func:`mu_law_unigram_baseline`) and linear prediction with a discretized residual (:func:`lpc_baseline`), in
  bits per held-out sample.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import itertools
import lzma
import math
from typing import Optional, Sequence

import numpy as np
import torch

from genkernels.kernels.checks import (
    check_choice,
    check_in_range,
    check_int,
    check_integer_tensor,
    check_real,
    describe,
)

from .metrics import ImageClassifier, bits_per_dim, check_level_images, dequantize, image_sample_quality, requantize

MU_LAW_CLASSES = 256
RESIDUALS = ("laplace", "gaussian")


# ----------------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------------
def dequantized_splits(train_images: torch.Tensor, test_images: torch.Tensor, levels: int,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The flattened fp64 ``[N, D]`` dequantizations of both splits, drawn by :func:`dequantize` from one generator
    seeded with ``seed``, the training split first (so a model scored on the same draws can reproduce them)."""
    levels = check_int(levels, "levels", low=2)
    check_int(seed, "seed", low=0)
    train_images = check_level_images(train_images, "train_images", levels)
    test_images = check_level_images(test_images, "test_images", levels)
    if train_images.shape[1:] != test_images.shape[1:]:
        raise ValueError(f"test_images must have the image shape of train_images {list(train_images.shape[1:])}; "
                         f"got {describe(test_images)}")
    generator = torch.Generator(device=train_images.device).manual_seed(seed)
    train = dequantize(train_images, levels, generator, dtype=torch.float64)
    test = dequantize(test_images.to(train_images.device), levels, generator, dtype=torch.float64)
    return train.reshape(train.shape[0], -1).cpu().numpy(), test.reshape(test.shape[0], -1).cpu().numpy()


KDE_QUERY_CHUNK = 512  # query rows per block of the kernel sums (a block holds chunk x N distances)


def _log_kernel_means(points: np.ndarray, centres: np.ndarray, bandwidths: Sequence[float]) -> np.ndarray:
    """``log 1/N sum_i N(y; c_i, h^2 I)`` ``[len(bandwidths), len(points)]`` (fp64) of every row ``y`` of
    ``points`` for every bandwidth ``h``: each kernel summed exactly, by log-sum-exp over all ``N`` centres."""
    centres_t = torch.from_numpy(np.ascontiguousarray(centres, dtype=np.float64))
    centre_norms = centres_t.square().sum(1)
    dims, count = centres.shape[1], centres.shape[0]
    result = np.empty((len(bandwidths), points.shape[0]))
    for start in range(0, points.shape[0], KDE_QUERY_CHUNK):
        block = torch.from_numpy(np.ascontiguousarray(points[start:start + KDE_QUERY_CHUNK], dtype=np.float64))
        squared = (block.square().sum(1, keepdim=True) + centre_norms - 2 * block @ centres_t.T).clamp_min(0.0)
        for index, h in enumerate(bandwidths):
            log_sum = torch.logsumexp(-squared / (2 * h * h), dim=1)
            result[index, start:start + block.shape[0]] = (
                log_sum - math.log(count) - dims / 2 * math.log(2 * math.pi * h * h)).numpy()
    return result


@dataclasses.dataclass
class GaussianKDE:
    """The Gaussian kernel density ``q(y) = 1/N sum_i N(y; c_i, h^2 I)`` of the rows ``c_i`` of ``centres``
    ``[N, D]``, evaluated exactly (every kernel, log-sum-exp in fp64). Not scikit-learn's ``KernelDensity``: its
    tree bounds return log-densities off by tens to thousands of nats on 64-dimensional digits at these bandwidths
    (scikit-learn issues 7492 and 27186)."""

    centres: np.ndarray
    bandwidth: float

    def score_samples(self, points: np.ndarray) -> np.ndarray:
        """``log q(y)`` ``[M]`` of the rows of ``points`` ``[M, D]``."""
        return _log_kernel_means(points, self.centres, [self.bandwidth])[0]

    def sample(self, count: int, seed: int = 0) -> np.ndarray:
        """``count`` draws ``[count, D]``: a centre chosen uniformly plus ``h`` times standard normal noise."""
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randint(0, self.centres.shape[0], (count,), generator=generator)
        noise = torch.randn((count, self.centres.shape[1]), generator=generator, dtype=torch.float64)
        return self.centres[chosen.numpy()] + self.bandwidth * noise.numpy()


@dataclasses.dataclass
class DensityBaseline:
    """A fitted density over dequantized images (:class:`GaussianKDE`, or scikit-learn's ``GaussianMixture``), its
    test bits per dimension and the hyperparameters it was chosen with."""

    kind: str  # "kde" or "gmm"
    bits_per_dim: float
    model: object
    levels: int
    image_shape: tuple[int, int, int]
    chosen: dict

    def sample(self, count: int, seed: int = 0) -> torch.Tensor:
        """``count`` images ``[count, C, H, W]`` drawn from the density (seeded by ``seed``) and requantized to
        levels (:func:`~genkernels.models.train.metrics.requantize`)."""
        check_int(count, "count", low=1)
        check_int(seed, "seed", low=0)
        if self.kind == "kde":
            drawn = self.model.sample(count, seed)
        else:  # a GaussianMixture draws from its random_state: a copy takes the seed
            model = copy.copy(self.model)
            model.random_state = seed
            drawn = model.sample(count)[0]
        values = torch.from_numpy(np.asarray(drawn, dtype=np.float64)).reshape(count, *self.image_shape)
        return requantize(values, self.levels)


def kde_baseline(train_images: torch.Tensor, test_images: torch.Tensor, levels: int, *, seed: int = 0,
                 bandwidths: Optional[Sequence[float]] = None, folds: int = 5) -> DensityBaseline:
    """A :class:`GaussianKDE` of the dequantized training images (:func:`dequantized_splits`), with the bandwidth
    ``h`` among ``bandwidths`` (default 21 points log-spaced over ``[0.01, 1]``, in units of ``y``'s range
    ``[0, 1)``) that maximizes the held-out log-likelihood of ``folds``-fold cross-validation on the training
    split (consecutive folds, as ``GridSearchCV(cv=folds)`` would split; summed over every training image), then
    scored on the dequantized test images. ``chosen``: ``{"bandwidth": h}``."""
    check_int(folds, "folds", low=2)
    grid = np.logspace(-2.0, 0.0, 21) if bandwidths is None else np.asarray(bandwidths, dtype=np.float64)
    if grid.ndim != 1 or grid.size == 0 or not (grid > 0).all() or not np.isfinite(grid).all():
        raise ValueError(f"bandwidths must be a non-empty sequence of finite positive numbers; got {bandwidths!r}")
    train, test = dequantized_splits(train_images, test_images, levels, seed)
    if train.shape[0] < folds:
        raise ValueError(f"train_images must hold at least folds={folds} images for cross-validation; got "
                         f"{describe(train_images)}")
    held_out = np.zeros(grid.size)
    for fold in np.array_split(np.arange(train.shape[0]), folds):
        rest = np.setdiff1d(np.arange(train.shape[0]), fold)
        held_out += _log_kernel_means(train[fold], train[rest], grid.tolist()).sum(axis=1)
    model = GaussianKDE(train, float(grid[int(np.argmax(held_out))]))
    score = float(np.mean(bits_per_dim(model.score_samples(test), train.shape[1], levels)))
    return DensityBaseline("kde", score, model, levels, tuple(train_images.shape[1:]),
                           {"bandwidth": model.bandwidth})


def gmm_baseline(train_images: torch.Tensor, test_images: torch.Tensor, levels: int, *, seed: int = 0,
                 components: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
                 covariance_types: Sequence[str] = ("full", "diag")) -> DensityBaseline:
    """A Gaussian mixture ``q(y) = sum_k w_k N(y; m_k, S_k)`` over the dequantized training images
    (:func:`dequantized_splits`), fitted by EM (k-means initialization, seeded with ``seed``) for every number of
    ``components`` (those below the number of training images) and covariance type (``"full"``: one ``S_k`` per
    component; ``"diag"``: diagonal ``S_k``), keeping the fit of lowest BIC on the training split
    (``-2 log L + parameters * ln N``). ``chosen``: ``{"components", "covariance_type", "bic"}``."""
    from sklearn.mixture import GaussianMixture

    for covariance_type in covariance_types:
        check_choice(covariance_type, "covariance_types", ("full", "diag"))
    train, test = dequantized_splits(train_images, test_images, levels, seed)
    counts = [check_int(count, "components", low=1) for count in components]
    counts = [count for count in counts if count < train.shape[0]]
    if not counts or not covariance_types:
        raise ValueError(f"components {list(components)} and covariance_types {list(covariance_types)} leave no "
                         f"mixture below the {train.shape[0]} training images to fit")
    best, best_bic, best_choice = None, math.inf, None
    for covariance_type, count in itertools.product(covariance_types, counts):
        mixture = GaussianMixture(count, covariance_type=covariance_type, max_iter=200, random_state=seed).fit(train)
        bic = mixture.bic(train)
        if bic < best_bic:
            best, best_bic, best_choice = mixture, bic, (count, covariance_type)
    score = float(np.mean(bits_per_dim(best.score_samples(test), train.shape[1], levels)))
    return DensityBaseline("gmm", score, best, levels, tuple(train_images.shape[1:]),
                           {"components": best_choice[0], "covariance_type": best_choice[1], "bic": float(best_bic)})


def likelihood_baselines(train_images: torch.Tensor, test_images: torch.Tensor, levels: int, *, seed: int = 0,
                         classifier: Optional[ImageClassifier] = None, num_samples: Optional[int] = None,
                         bandwidths: Optional[Sequence[float]] = None,
                         components: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
                         covariance_types: Sequence[str] = ("full", "diag")) -> dict:
    """The KDE and GMM baselines (:func:`kde_baseline` over ``bandwidths``, :func:`gmm_baseline` over
    ``components`` and ``covariance_types``) as a JSON-ready dict:
    ``kde_bits_per_dim``, ``kde_bandwidth``, ``gmm_bits_per_dim``, ``gmm_components``, ``gmm_covariance_type``;
    given a ``classifier`` (:func:`~genkernels.models.train.metrics.fit_image_classifier`), also
    ``kde_samples`` and ``gmm_samples``: :func:`~genkernels.models.train.metrics.image_sample_quality` of
    ``num_samples`` (default: as many as test images) requantized samples of each, the sample-quality
    baselines."""
    kde = kde_baseline(train_images, test_images, levels, seed=seed, bandwidths=bandwidths)
    gmm = gmm_baseline(train_images, test_images, levels, seed=seed, components=components,
                       covariance_types=covariance_types)
    result = {
        "kde_bits_per_dim": kde.bits_per_dim, "kde_bandwidth": kde.chosen["bandwidth"],
        "gmm_bits_per_dim": gmm.bits_per_dim, "gmm_components": gmm.chosen["components"],
        "gmm_covariance_type": gmm.chosen["covariance_type"],
    }
    if classifier is not None:
        count = test_images.shape[0] if num_samples is None else check_int(num_samples, "num_samples", low=2)
        for name, baseline in (("kde", kde), ("gmm", gmm)):
            result[f"{name}_samples"] = image_sample_quality(baseline.sample(count, seed), classifier, train_images,
                                                             test_images, seed=seed)
    return result


# ----------------------------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------------------------
def check_text(text: object, name: str, min_length: int = 1) -> str:
    """Require a ``str`` of at least ``min_length`` characters."""
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str (character-level text); got {type(text).__name__}")
    if len(text) < min_length:
        raise ValueError(f"{name} must hold at least {min_length} character(s); got {len(text)}")
    return text


def _compressed_bits(text: str) -> int:
    return 8 * len(lzma.compress(text.encode("utf-8"), preset=9 | lzma.PRESET_EXTREME))


def lzma_bits_per_char(text: str, context: str = "") -> float:
    """lzma's (xz, preset ``9 | PRESET_EXTREME``) size of ``text`` in bits per character of ``text`` (UTF-8):
    ``8 * len(compress(text)) / len(text)`` without ``context``; with it, the extra size of compressing
    ``context + text`` over ``context`` alone, ``8 * (len(compress(context + text)) - len(compress(context))) /
    len(text)``: the training text as lzma's dictionary, as a model trained on it sees it."""
    check_text(text, "text")
    check_text(context, "context", min_length=0)
    if not context:
        return _compressed_bits(text) / len(text)
    return (_compressed_bits(context + text) - _compressed_bits(context)) / len(text)


class CharNGram:
    """Modified interpolated Kneser-Ney character n-grams (Chen & Goodman 1999, Sec. 3.5 and 4.1.6) of ``text``,
    for every order up to ``max_order``.

    The alphabet is ``text``'s characters plus one unknown symbol that stands for every other character. With
    ``h`` the last ``n - 1`` characters and ``h'`` its last ``n - 2``, the order-``n`` probability is

        P_n(w | h) = (max(c(h w) - D(c(h w)), 0) + B(h) * P_{n-1}(w | h')) / c(h .),
        B(h) = D_1 N_1(h .) + D_2 N_2(h .) + D_3+ N_3+(h .)

    where ``c`` is the raw count of ``h w`` in ``text`` at the top order and the continuation count (the number of
    distinct characters seen before ``h w``) at every lower order; ``c(h .)`` sums ``c(h w)`` over ``w``;
    ``N_k(h .)`` counts the ``w`` with ``c(h w) = k`` (``N_3+``: ``>= 3``); ``D(c)`` is ``D_1``, ``D_2`` or
    ``D_3+`` for ``c = 1, 2, >= 3`` (0 for ``c = 0``), from the numbers ``n_k`` of the level's n-grams of count
    ``k``: ``Y = n_1 / (n_1 + 2 n_2)``, ``D_k = k - (k + 1) Y n_{k+1} / n_k``, falling back to ``D = Y`` (0.5 if
    undefined) for every count where some ``n_k`` is 0 or a ``D_k`` leaves ``(0, k]``. A history never seen
    (``c(h .) = 0``) takes ``P_{n-1}`` whole, and ``P_0`` is uniform over the alphabet. Each level sums to 1 over
    the alphabet. The first characters of a scored text use the shorter history they have (the levels up to its
    length).
    """

    def __init__(self, text: str, max_order: int):
        check_text(text, "text")
        self.max_order = check_int(max_order, "max_order", low=1)
        seen = set(text)
        self.unknown = next(chr(code) for code in itertools.count(0xE000) if chr(code) not in seen)
        self.alphabet = "".join(sorted(seen)) + self.unknown
        raw = [collections.Counter(text[i:i + n] for i in range(len(text) - n + 1)) for n in
               range(1, max_order + 1)]
        continuation = []
        for n in range(1, max_order):
            counts = collections.Counter()
            for gram in raw[n]:  # the (n + 1)-grams: each distinct one adds 1 to its last n characters
                counts[gram[1:]] += 1
            continuation.append(counts)
        raw, continuation = [self._level(counts) for counts in raw], [self._level(counts) for counts in continuation]
        # the levels of the order-n model: continuation counts below n, raw counts at n
        self._levels = {n: continuation[:n - 1] + [raw[n - 1]] for n in range(1, max_order + 1)}
        self._known = frozenset(self.alphabet)

    @staticmethod
    def discounts(counts: collections.Counter) -> tuple[float, float, float]:
        """``(D_1, D_2, D_3+)`` of a level's n-gram counts (see the class docstring)."""
        n = [sum(1 for count in counts.values() if count == k) for k in (1, 2, 3, 4)]
        y = n[0] / (n[0] + 2 * n[1]) if n[0] else 0.5
        if all(n):
            modified = tuple(k - (k + 1) * y * n[k] / n[k - 1] for k in (1, 2, 3))
            if all(0 < d <= k for k, d in enumerate(modified, start=1)):
                return modified
        return (y, y, y) if 0 < y <= 1 else (0.5, 0.5, 0.5)

    @classmethod
    def _level(cls, counts: collections.Counter) -> tuple[collections.Counter, dict, dict, tuple]:
        """The counts, their totals and discounted mass ``B`` per history, and the discounts."""
        discounts = cls.discounts(counts)
        totals, backoff = collections.Counter(), collections.Counter()
        for gram, count in counts.items():
            totals[gram[:-1]] += count
            backoff[gram[:-1]] += discounts[min(count, 3) - 1]
        return counts, totals, backoff, discounts

    def _check_order(self, order: int) -> int:
        return check_int(order, "order", low=1, high=self.max_order)

    def probability(self, history: str, char: str, order: int) -> float:
        """``P_order(char | the last order - 1 characters of history)``; characters outside the alphabet count as
        the unknown symbol."""
        context = history[max(0, len(history) - order + 1):] if order > 1 else ""
        context = "".join(c if c in self._known else self.unknown for c in context)
        char = char if char in self._known else self.unknown
        probability = 1.0 / len(self.alphabet)
        for level, (counts, totals, backoff, discounts) in enumerate(self._levels[order][:len(context) + 1]):
            h = context[len(context) - level:]
            total = totals.get(h, 0)
            if total:
                count = counts.get(h + char, 0)
                kept = count - discounts[min(count, 3) - 1] if count else 0.0
                probability = (kept + backoff[h] * probability) / total
        return probability

    def distribution(self, history: str, order: int) -> dict[str, float]:
        """``{w: P_order(w | history)}`` over the alphabet (the unknown symbol is ``self.unknown``)."""
        order = self._check_order(order)
        check_text(history, "history", min_length=0)
        return {char: self.probability(history, char, order) for char in self.alphabet}

    def bits_per_char(self, text: str, order: int, history: str = "") -> float:
        """``-1/T sum_t log2 P_order(text[t] | history + text[:t])`` over the ``T`` characters of ``text``
        (``history``: the characters before ``text``, context only)."""
        order = self._check_order(order)
        check_text(text, "text")
        check_text(history, "history", min_length=0)
        whole, offset = history + text, len(history)
        return -math.fsum(math.log2(self.probability(whole[max(0, offset + t - order + 1):offset + t], char, order))
                          for t, char in enumerate(text)) / len(text)


@dataclasses.dataclass
class NGramBaseline:
    """The held-out bits per character of the chosen order's :class:`CharNGram` (fitted on all the training
    text), and every order's bits per character on the validation slice."""

    bits_per_char: float
    order: int
    validation_bits_per_char: dict[int, float]
    model: CharNGram


def ngram_baseline(train_text: str, test_text: str, *, orders: Sequence[int] = tuple(range(1, 13)),
                   validation_fraction: float = 0.1, test_history: str = "") -> NGramBaseline:
    """:class:`CharNGram` bits per character of ``test_text`` given ``test_history`` (the held-out characters
    before it, context only), with the order chosen among ``orders`` on a validation slice (the last
    ``validation_fraction`` of ``train_text``, scored by a model of the rest), then refitted on the whole
    ``train_text``."""
    check_text(train_text, "train_text", min_length=2)
    check_text(test_text, "test_text")
    validation_fraction = check_real(validation_fraction, "validation_fraction", low=0.0, high=1.0,
                                     low_inclusive=False)
    orders = sorted({check_int(order, "orders", low=1) for order in orders})
    if not orders:
        raise ValueError("orders must name at least one order")
    cut = min(len(train_text) - 1, max(1, len(train_text) - round(len(train_text) * validation_fraction)))
    held_in, validation = train_text[:cut], train_text[cut:]
    selector = CharNGram(held_in, orders[-1])
    scores = {order: selector.bits_per_char(validation, order) for order in orders}
    order = min(scores, key=scores.get)
    model = CharNGram(train_text, order)
    return NGramBaseline(model.bits_per_char(test_text, order, test_history), order, scores, model)


def text_baselines(train_text: str, test_text: str, *, test_history: str = "",
                   ngram_orders: Sequence[int] = tuple(range(1, 13))) -> dict:
    """Held-out bits per character of ``test_text``, each character given everything before it, as a JSON-ready
    dict; ``test_history`` is the held-out text before ``test_text`` (context only, never scored), so the
    baselines can score exactly the characters a model scores, with at least the model's context:

    * ``lzma_given_train_bits_per_char``: :func:`lzma_bits_per_char` with the training text and ``test_history``
      as context (the fair comparison with a trained model); ``lzma_alone_bits_per_char``: with ``test_history``
      alone as context (the held-out text on its own);
    * ``ngram_bits_per_char`` and ``ngram_order``: :func:`ngram_baseline` over ``ngram_orders``;
      ``test_chars_unseen_in_train``: how many test characters fall outside the training alphabet (scored as the
      n-gram's unknown symbol)."""
    check_text(train_text, "train_text", min_length=2)
    check_text(test_text, "test_text")
    check_text(test_history, "test_history", min_length=0)
    ngram = ngram_baseline(train_text, test_text, orders=ngram_orders, test_history=test_history)
    alphabet = set(train_text)
    return {
        "lzma_given_train_bits_per_char": lzma_bits_per_char(test_text, train_text + test_history),
        "lzma_alone_bits_per_char": lzma_bits_per_char(test_text, test_history),
        "ngram_bits_per_char": ngram.bits_per_char,
        "ngram_order": ngram.order,
        "test_chars_unseen_in_train": sum(1 for char in test_text if char not in alphabet),
        "test_chars": len(test_text),
    }


# ----------------------------------------------------------------------------------------------------------------
# Audio
# ----------------------------------------------------------------------------------------------------------------
def check_mu_law(classes: object, name: str) -> torch.Tensor:
    """Require non-empty integer mu-law classes ``[N, T]`` in ``0 .. 255``."""
    classes = check_integer_tensor(classes, name)
    if classes.dim() != 2 or classes.numel() == 0:
        raise ValueError(f"{name} must be non-empty mu-law classes [N, T]; got {describe(classes)}")
    check_in_range(classes, name, 0, MU_LAW_CLASSES)
    return classes.cpu().long()


def mu_law_unigram_baseline(train: torch.Tensor, test: torch.Tensor) -> float:
    """Bits per sample of ``test`` under the add-one smoothed class histogram of ``train``,
    ``p(c) = (count(c) + 1) / (N + 256)``; both int mu-law classes ``[N, T]``."""
    train, test = check_mu_law(train, "train"), check_mu_law(test, "test")
    counts = torch.bincount(train.reshape(-1), minlength=MU_LAW_CLASSES).double() + 1
    return float(-(counts / counts.sum()).log2()[test.reshape(-1)].mean())


def mu_law_bin_edges() -> torch.Tensor:
    """The 257 fp64 edges in the linear domain of the 256 mu-law classes of
    :func:`~genkernels.models.wavenet.mu_law_encode`: class ``c`` holds the companded values within half a step
    of ``2 c / 255 - 1``, mapped back by the inverse companding; the outer edges are ``-inf`` and ``+inf`` (class 0
    and 255 take everything beyond), so the classes cover the real line."""
    mu = MU_LAW_CLASSES - 1
    companded = (2 * torch.arange(MU_LAW_CLASSES + 1, dtype=torch.float64) - 1) / mu - 1
    edges = torch.sign(companded) * torch.expm1(companded.abs() * math.log1p(mu)) / mu
    edges[0], edges[-1] = -math.inf, math.inf
    return edges


def _residual_cdf(residual: torch.Tensor, scale: torch.Tensor, family: str) -> torch.Tensor:
    if family == "gaussian":
        return torch.special.ndtr(residual / scale)
    return torch.where(residual < 0, 0.5 * torch.exp(residual / scale), 1 - 0.5 * torch.exp(-residual / scale))


def _interval_mass(low: torch.Tensor, high: torch.Tensor, scale: torch.Tensor, family: str) -> torch.Tensor:
    """``F(high) - F(low)`` of the zero-mean residual distribution, as ``S(low) - S(high)`` above 0 (``S(r) =
    F(-r)``, exact for a symmetric ``F``) so that tail intervals keep their precision."""
    upper = _residual_cdf(-low, scale, family) - _residual_cdf(-high, scale, family)
    return torch.where(low > 0, upper, _residual_cdf(high, scale, family) - _residual_cdf(low, scale, family))


SCALE_MEMORIES = (1.0, 0.95, 0.8, 0.5)  # the residual scale's memory: 1 holds it fixed
MIN_SCALE = 1e-5  # below the narrowest mu-law bin (about 1.7e-4 wide at 0)


@dataclasses.dataclass
class LinearPredictor:
    """Linear prediction of mu-law audio: ``x_t ~ sum_k a_k x_{t-k} + r_t`` in the linear domain (``x`` the
    decoded classes, zeros before the start), with the residual ``r_t`` Laplace or Gaussian of scale ``s_t``,
    discretized over the mu-law bins (:func:`mu_law_bin_edges`) and mixed with ``floor`` of the uniform
    distribution, so that every class has a positive probability:

        p(c_t = c | past) = (1 - floor) * (F_t(e_{c+1} - x^_t) - F_t(e_c - x^_t)) + floor / 256

    The scale follows the past residuals (backward-adaptive, as in ADPCM, so it is known before step ``t``):
    ``s_t = gain * m_t`` with ``m_t = memory * m_{t-1} + (1 - memory) * |r_{t-1}|`` and ``m_0 = initial``;
    ``memory = 1`` keeps the scale fixed at ``gain * initial`` (never below :data:`MIN_SCALE`).
    """

    coefficients: torch.Tensor  # [p] fp64, a_1 .. a_p
    family: str
    gain: float
    memory: float
    initial: float
    floor: float = 1e-6

    def _decoded_and_predicted(self, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from genkernels.models.wavenet import mu_law_decode

        signal = mu_law_decode(classes, MU_LAW_CLASSES).double()
        order = self.coefficients.shape[0]
        padded = torch.nn.functional.pad(signal, (order, 0))
        lags = torch.stack([padded[:, order - k:padded.shape[1] - k] for k in range(1, order + 1)], dim=-1)
        return signal, lags @ self.coefficients

    def predictions_and_scales(self, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x^_t`` and ``s_t`` ``[N, T]`` (fp64) of mu-law classes ``[N, T]``."""
        signal, predicted = self._decoded_and_predicted(classes)
        levels = torch.full_like(signal, self.initial)
        if self.memory < 1:
            magnitude = (signal - predicted).abs()
            level = levels[:, 0].clone()
            for t in range(1, signal.shape[1]):
                level = self.memory * level + (1 - self.memory) * magnitude[:, t - 1]
                levels[:, t] = level
        return predicted, (self.gain * levels).clamp_min(MIN_SCALE)

    def _mass(self, low: torch.Tensor, high: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return (1 - self.floor) * _interval_mass(low, high, scale, self.family) + self.floor / MU_LAW_CLASSES

    def class_probabilities(self, classes: torch.Tensor) -> torch.Tensor:
        """``p(c_t = c | c_<t)`` ``[N, T, 256]`` for every step of ``classes`` ``[N, T]``."""
        classes = check_mu_law(classes, "classes")
        predicted, scale = self.predictions_and_scales(classes)
        centred = mu_law_bin_edges() - predicted[..., None]
        return self._mass(centred[..., :-1], centred[..., 1:], scale[..., None])

    def bits_per_sample(self, classes: torch.Tensor) -> float:
        """``-mean log2 p(c_t | c_<t)`` over every sample of ``classes`` ``[N, T]``."""
        classes = check_mu_law(classes, "classes")
        predicted, scale = self.predictions_and_scales(classes)
        edges = mu_law_bin_edges()
        mass = self._mass(edges[classes] - predicted, edges[classes + 1] - predicted, scale)
        return float(-mass.log2().mean())


def fit_linear_predictor(train: torch.Tensor, order: int = 16, family: Optional[str] = None,
                         memories: Sequence[float] = SCALE_MEMORIES) -> LinearPredictor:
    """A :class:`LinearPredictor` of ``order`` fitted to mu-law classes ``train`` ``[N, T]`` (``T > order``): the
    coefficients by least squares over every step ``t >= order`` of every waveform (no intercept); ``initial``
    the mean ``|r|`` of those residuals; for each scale memory in ``memories`` and residual ``family``
    (``"laplace"``, ``"gaussian"``; default both), the gain by maximum likelihood of the continuous residual
    (``mean |r_t| / m_t`` for Laplace, ``sqrt(mean r_t^2 / m_t^2)`` for Gaussian); the pair that gives ``train``
    the fewest bits per sample is kept."""
    from genkernels.models.wavenet import mu_law_decode

    train = check_mu_law(train, "train")
    order = check_int(order, "order", low=1)
    if train.shape[1] <= order:
        raise ValueError(f"train must have more than order={order} samples per waveform; got {describe(train)}")
    families = RESIDUALS if family is None else (check_choice(family, "family", RESIDUALS),)
    memories = [check_real(memory, "memories", low=0.0, high=1.0) for memory in memories]
    if not memories:
        raise ValueError("memories must hold at least one scale memory in [0, 1]")
    signal = mu_law_decode(train, MU_LAW_CLASSES).double()
    steps = signal.shape[1] - order
    lags = torch.stack([signal[:, order - k:order - k + steps] for k in range(1, order + 1)], dim=-1)
    lags, targets = lags.reshape(-1, order), signal[:, order:].reshape(-1)
    coefficients = torch.linalg.lstsq(lags, targets[:, None], driver="gelsd").solution[:, 0]
    initial = max(float((targets - lags @ coefficients).abs().mean()), MIN_SCALE)
    candidates = []
    for name, memory in itertools.product(families, memories):
        unit = LinearPredictor(coefficients, name, 1.0, memory, initial)
        predicted, levels = unit.predictions_and_scales(train)
        ratio = ((signal - predicted) / levels)[:, order:]
        gain = float(ratio.abs().mean()) if name == "laplace" else float(ratio.square().mean().sqrt())
        candidates.append(dataclasses.replace(unit, gain=max(gain, 1e-6)))
    return min(candidates, key=lambda predictor: predictor.bits_per_sample(train))


def lpc_baseline(train: torch.Tensor, test: torch.Tensor, order: int = 16,
                 memories: Sequence[float] = SCALE_MEMORIES) -> tuple[float, LinearPredictor]:
    """Bits per sample of ``test`` under :func:`fit_linear_predictor` of ``train`` (both mu-law ``[N, T]``) with
    the scale memory chosen among ``memories``."""
    predictor = fit_linear_predictor(train, order, memories=memories)
    return predictor.bits_per_sample(check_mu_law(test, "test")), predictor


def audio_baselines(train: torch.Tensor, test: torch.Tensor, *, lpc_order: int = 16,
                    memories: Sequence[float] = SCALE_MEMORIES) -> dict:
    """Held-out bits per sample of mu-law ``test`` ``[N, T]`` as a JSON-ready dict:
    ``mu_law_unigram_bits_per_sample`` (:func:`mu_law_unigram_baseline`), ``lpc_bits_per_sample`` with
    ``lpc_order`` and the chosen ``lpc_residual`` family and ``lpc_scale_memory`` among ``memories``
    (:func:`lpc_baseline`), and
    ``lpc_fixed_scale_bits_per_sample``: the same fit with its residual scale held fixed (memory 1)."""
    lpc_bits, predictor = lpc_baseline(train, test, lpc_order, memories)
    fixed = fit_linear_predictor(train, lpc_order, predictor.family, memories=(1.0,))
    return {
        "mu_law_unigram_bits_per_sample": mu_law_unigram_baseline(train, test),
        "lpc_bits_per_sample": lpc_bits,
        "lpc_fixed_scale_bits_per_sample": fixed.bits_per_sample(check_mu_law(test, "test")),
        "lpc_order": lpc_order,
        "lpc_residual": predictor.family,
        "lpc_scale_memory": predictor.memory,
    }
