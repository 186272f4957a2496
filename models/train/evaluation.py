"""A trained model's held-out figures beside classical baselines fitted and scored on the same split.

:func:`evaluate` runs after training (:mod:`~genkernels.models.train.cli` writes its result into
``OUT/metrics.json`` next to the family's own held-out figure). Every key names its unit. By kind of data:

* images: the sample quality of ``num_samples`` model samples (as many as training images, at most
  ``max_samples``: on the digits one VAE's Frechet distance over four draws of 180 samples ranged from 9.7 to
  16.4, a similar VAE's over three draws of 1617 from 8.7 to 9.1, and with every training image the floor is no
  longer a random subset; the classifier of
  :func:`~genkernels.models.train.metrics.fit_image_classifier`: Frechet distance to the held-out images, its
  train-vs-test floor, confidence, class coverage) next to that of as many samples of the Gaussian kernel density
  and mixture baselines (:func:`~genkernels.models.train.baselines.likelihood_baselines`); for the likelihood
  families (a ``test_bits_per_dim`` figure: vae, pixelcnn, realnvp, glow) also the baselines' bits per dim, with
  the same uniform dequantization as the flows. The vae adds its importance-weighted bound
  (:func:`importance_weighted_bits_per_dim`, ``k`` = :data:`IWAE_SAMPLES`).
* text (gpt): lzma and a Kneser-Ney character n-gram on exactly the held-out characters the model is scored on
  (every one after the first), each given all the text before it
  (:func:`~genkernels.models.train.baselines.text_baselines`).
* audio (wavenet): a mu-law unigram and linear prediction on the held-out segments
  (:func:`~genkernels.models.train.baselines.audio_baselines`).

``comparisons`` pairs the model's figure with each baseline's (lower is better for every one of them). A family
that samples in more than one way (:meth:`~genkernels.models.train.families.Family.sample_variants`: the vae's
mixture and N(0, I) priors) gets ``sample_quality_<variant>`` and ``frechet_distance (<variant>) vs ...`` for each
way besides its own.

The baselines and the classifier depend only on the data and on the code that fits them, so they are cached on
disk (:func:`cache_directory`): the file name is a hash of the data, the settings and the source of this module,
:mod:`~genkernels.models.train.metrics` and :mod:`~genkernels.models.train.baselines`, so a change to any of them
refits. A ``--quick`` run fits every baseline with the cheap settings of :data:`QUICK_SETTINGS` (fewer bandwidths,
mixtures, classifier epochs, n-gram orders, scale memories, samples); metrics.json records the settings used, and
quick figures are not comparable with those of a default run.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import baselines, metrics
from .families import Family, RunSettings, vae_bits_per_dim, vae_inputs

IWAE_SAMPLES = 64
SAMPLE_BATCH = 512  # model samples drawn per call (bounds the sampler's memory, not its result's distribution)
CACHE_ENVIRONMENT_VARIABLE = "GENKERNELS_CACHE_DIR"

DEFAULT_SETTINGS = {
    "classifier_epochs": 40,
    "kde_bandwidths": np.logspace(-2.0, 0.0, 21).tolist(),
    "gmm_components": [1, 2, 4, 8, 16, 32, 64],
    "gmm_covariance_types": ["full", "diag"],
    "max_samples": 2000,  # samples per model and baseline: as many as training images, at most this many
    "iwae_samples": IWAE_SAMPLES,
    "ngram_orders": list(range(1, 13)),
    "lpc_order": 16,
    "lpc_scale_memories": list(baselines.SCALE_MEMORIES),
}
QUICK_SETTINGS = {
    "classifier_epochs": 5,
    "kde_bandwidths": np.logspace(-1.5, -0.5, 5).tolist(),
    "gmm_components": [1, 4],
    "gmm_covariance_types": ["diag"],
    "max_samples": 32,
    "iwae_samples": 8,
    "ngram_orders": [1, 2, 3],
    "lpc_order": 4,
    "lpc_scale_memories": [1.0],
}
LIKELIHOOD_METRIC = "test_bits_per_dim"


def cache_directory() -> Path:
    """Where fitted baselines are kept: ``$GENKERNELS_CACHE_DIR/baselines`` when that variable is set, else
    ``~/.cache/genkernels/baselines``."""
    root = os.environ.get(CACHE_ENVIRONMENT_VARIABLE)
    return (Path(root) if root else Path.home() / ".cache" / "genkernels") / "baselines"


# Read when this module is imported, with the code it runs: a source file edited afterwards must not key results
# that the code loaded before the edit computes.
_LOADED_SOURCE = b"".join(Path(module.__file__).read_bytes() for module in (metrics, baselines)) + Path(
    __file__).read_bytes()


def _code_digest() -> bytes:
    """The source of every module whose code decides a cached result, as loaded by this process."""
    return _LOADED_SOURCE


def cache_key(kind: str, settings: dict, *data: object) -> str:
    """A hex SHA-256 of ``kind``, ``settings`` (JSON), every tensor or string in ``data`` (values and shape) and
    the baselines' code: equal keys mean the cached result is the one a refit would give."""
    digest = hashlib.sha256(_code_digest())
    digest.update(json.dumps([kind, settings], sort_keys=True).encode())
    for item in data:
        if isinstance(item, torch.Tensor):
            digest.update(str(list(item.shape)).encode() + item.detach().cpu().contiguous().numpy().tobytes())
        else:
            digest.update(str(item).encode("utf-8"))
    return digest.hexdigest()


def cached_json(key: str, compute: Callable[[], dict]) -> tuple[dict, bool]:
    """``(result, hit)``: the JSON cached under ``key``, or ``compute()`` written there (atomically) first."""
    path = cache_directory() / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8")), True
    result = compute()
    _write_atomically(path, lambda partial: partial.write_text(json.dumps(result, indent=1), encoding="utf-8"))
    return result, False


def _write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """``write(partial)`` into a file of this process, then renamed to ``path``: concurrent runs that fit the same
    baseline never read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    write(partial)
    partial.replace(path)


def cached_classifier(train, settings: dict) -> metrics.ImageClassifier:
    """:func:`~genkernels.models.train.metrics.fit_image_classifier` of the labelled training images (seed 0),
    its weights cached under the data's key."""
    epochs = settings["classifier_epochs"]
    key = cache_key("classifier", {"epochs": epochs}, train.images, train.labels, train.levels)
    path = cache_directory() / f"{key}.pt"
    if path.exists():
        classifier = metrics.ImageClassifier(train.shape, train.levels, int(train.labels.max()) + 1)
        classifier.load_state_dict(torch.load(path, weights_only=True))
        return classifier.eval()
    classifier = metrics.fit_image_classifier(train.images, train.labels, train.levels, epochs=epochs)
    _write_atomically(path, lambda partial: torch.save(classifier.state_dict(), partial))
    return classifier


# ----------------------------------------------------------------------------------------------------------------
# The VAE's importance-weighted bound
# ----------------------------------------------------------------------------------------------------------------
def _log_normal(x: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """``sum_j log N(x_j; mean_j, exp(log_std_j)^2)`` over the last dimension."""
    return (-0.5 * ((x - mean) * torch.exp(-log_std)).square() - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


@torch.no_grad()
def importance_weighted_log_likelihood(model, y: torch.Tensor, samples: int,
                                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The importance-weighted lower bound of Burda et al. 2016 on ``log p(y)`` per image ``[N]`` (fp32):

        L_k(y) = log 1/k sum_i p(y | z_i) p(z_i) / q(z_i | y),   z_i ~ q(z | y) iid,

    with the VAE's Gaussian posterior ``q``, prior ``N(0, I)`` and likelihood (``model.reconstruction_nll``).
    ``L_1`` is the ELBO in expectation and ``L_k`` rises towards ``log p(y)`` as ``k`` grows. ``y``: images
    ``[N, C, H, W]`` the model reads; ``samples``: ``k >= 1``."""
    mu, logvar = model.encode(y)
    log_std = 0.5 * logvar
    noise = torch.randn((samples,) + tuple(mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
    z = mu + torch.exp(log_std) * noise  # [k, N, latent]
    flat = z.reshape(-1, z.shape[-1])
    targets = y.expand((samples,) + tuple(y.shape)).reshape((-1,) + tuple(y.shape[1:]))
    log_likelihood = -model.reconstruction_nll(model.decode(flat), targets).reshape(samples, -1)
    log_prior = _log_normal(z, torch.zeros_like(z), torch.zeros_like(z))
    log_posterior = _log_normal(z, mu, log_std)
    log_weights = log_likelihood + log_prior.float() - log_posterior.float()
    return torch.logsumexp(log_weights, dim=0) - math.log(samples)


def importance_weighted_bits_per_dim(model, images: torch.Tensor, levels: int, samples: int = IWAE_SAMPLES,
                                     generator: Optional[torch.Generator] = None, batch_size: int = 64) -> float:
    """The mean over ``images`` (integer levels ``[N, C, H, W]``) of the bits per dim
    (:func:`~genkernels.models.train.families.vae_bits_per_dim`) of :func:`importance_weighted_log_likelihood` on
    what the VAE reads (:func:`~genkernels.models.train.families.vae_inputs`: the images' grid for a discrete
    likelihood, one uniform dequantization of each image for a continuous one): an upper bound on the VAE's bits
    per dim, tighter than the ELBO's."""
    total = 0.0
    dims = math.prod(images.shape[1:])
    device = next(model.parameters()).device
    for start in range(0, images.shape[0], batch_size):
        batch = images[start:start + batch_size].to(device)
        y = vae_inputs(model, batch, levels, generator)
        log_likelihood = importance_weighted_log_likelihood(model, y, samples, generator)
        total += float(vae_bits_per_dim(model, log_likelihood.double(), dims, levels).sum())
    return total / images.shape[0]


# ----------------------------------------------------------------------------------------------------------------
# Per kind of data
# ----------------------------------------------------------------------------------------------------------------
def _image_baselines(train, test, settings: dict, classifier, count: int) -> dict:
    def fit() -> dict:
        return baselines.likelihood_baselines(
            train.images, test.images, train.levels, classifier=classifier, num_samples=count,
            bandwidths=settings["kde_bandwidths"], components=settings["gmm_components"],
            covariance_types=settings["gmm_covariance_types"])
    key = cache_key("images", {**settings, "num_samples": count}, train.images, train.labels, test.images,
                    train.levels)
    return cached_json(key, fit)


def _evaluate_images(family, model, train, test, config, run, generator, own: dict, settings: dict) -> dict:
    classifier = cached_classifier(train, settings) if train.labels is not None else None
    count = max(2, min(settings["max_samples"], len(train)))
    found, hit = _image_baselines(train, test, settings, classifier, count)
    likelihood = LIKELIHOOD_METRIC in own
    result: dict = {"baselines": {key: value for key, value in found.items()
                                  if likelihood or not key.endswith("_bits_per_dim")}}
    comparisons = {}
    if likelihood:
        if family.name == "vae":
            with torch.no_grad():
                result["test_iwae_bits_per_dim"] = importance_weighted_bits_per_dim(
                    model, test.images, test.levels, settings["iwae_samples"], generator)
            result["iwae_samples"] = settings["iwae_samples"]
        for name in ("kde", "gmm"):
            comparisons[f"test_bits_per_dim vs {name}_bits_per_dim"] = _comparison(
                own[LIKELIHOOD_METRIC], found[f"{name}_bits_per_dim"])
    if classifier is not None:
        for variant, variant_config in family.sample_variants(config):
            with torch.no_grad():
                samples = torch.cat([
                    family.sample_levels(model, len(chunk), train, variant_config, run, generator).cpu()
                    for chunk in torch.arange(count).split(SAMPLE_BATCH)])
            quality = metrics.image_sample_quality(samples, classifier, train.images, test.images)
            suffix = f" ({variant})" if variant else ""
            result["sample_quality" + (f"_{variant}" if variant else "")] = quality
            for name in ("kde", "gmm"):
                comparisons[f"frechet_distance{suffix} vs {name}_samples"] = _comparison(
                    quality["frechet_distance"], found[f"{name}_samples"]["frechet_distance"])
        result["classifier_test_accuracy"] = classifier.accuracy(test.images, test.labels)
    else:
        result["sample_quality"] = "not computed: the images have no labels to fit the feature classifier on"
    result["comparisons"] = comparisons
    return {**result, "baseline_cache_hit": hit}


def _evaluate_text(family, model, train, test, config, own: dict, settings: dict) -> dict:
    """The baselines on exactly the held-out characters the model is scored on (``family.scored_span``), each
    given the training text and the held-out text before it."""
    begin, end = family.scored_span(test, config)
    history, scored = test.decode(test.ids[:begin].tolist()), test.decode(test.ids[begin:end].tolist())
    train_text = train.decode(train.ids.tolist())
    found, hit = cached_json(cache_key("text", {"orders": settings["ngram_orders"]}, train_text, history, scored),
                             lambda: baselines.text_baselines(train_text, scored, test_history=history,
                                                              ngram_orders=settings["ngram_orders"]))
    comparisons = {f"test_bits_per_char vs {name}": _comparison(own["test_bits_per_char"], found[name])
                   for name in ("lzma_given_train_bits_per_char", "lzma_alone_bits_per_char",
                                "ngram_bits_per_char")}
    return {"baselines": found, "comparisons": comparisons, "baseline_cache_hit": hit}


def _evaluate_audio(train, test, own: dict, settings: dict) -> dict:
    options = {"lpc_order": settings["lpc_order"], "memories": settings["lpc_scale_memories"]}
    found, hit = cached_json(cache_key("audio", options, train.segments, test.segments),
                             lambda: baselines.audio_baselines(train.segments, test.segments,
                                                               lpc_order=options["lpc_order"],
                                                               memories=options["memories"]))
    comparisons = {f"test_bits_per_sample vs {name}": _comparison(own["test_bits_per_sample"], found[name])
                   for name in ("mu_law_unigram_bits_per_sample", "lpc_bits_per_sample")}
    return {"baselines": found, "comparisons": comparisons, "baseline_cache_hit": hit}


def _comparison(model_value: float, baseline_value: float) -> dict:
    return {"model": model_value, "baseline": baseline_value, "model_better": bool(model_value < baseline_value)}


def evaluate(family: Family, model: torch.nn.Module, train, test, config: dict, run: RunSettings,
             generator: torch.Generator, own: dict) -> dict:
    """The evaluation of the module doc for ``model`` (a trained ``family`` model in eval mode) on the run's
    ``(train, test)`` split, as a JSON-ready dict to merge into metrics.json beside ``own`` (the family's
    held-out figures, e.g. ``{"test_bits_per_dim": ...}``): ``baselines``, ``comparisons`` (``{"<model figure>
    vs <baseline figure>": {"model", "baseline", "model_better"}}``), the kind's extra figures, and
    ``evaluation_settings`` (:data:`DEFAULT_SETTINGS`, or :data:`QUICK_SETTINGS` for ``run.quick``)."""
    settings = QUICK_SETTINGS if run.quick else DEFAULT_SETTINGS
    if family.kind == "images":
        result = _evaluate_images(family, model, train, test, config, run, generator, own, settings)
    elif family.kind == "text":
        result = _evaluate_text(family, model, train, test, config, own, settings)
    else:
        result = _evaluate_audio(train, test, own, settings)
    result["evaluation_settings"] = {"quick": run.quick, **settings}
    return result
