"""What training each model family takes: its data, model, losses, held-out metric and samples.

Every family turns the shared data (:mod:`genkernels.models.train.data`) into what its model reads:

==========  ==================================================================================================
vae         the images' levels as ``x / (L - 1)`` and a discretized logistic likelihood over those L levels (or, with
            ``--likelihood gaussian``, dequantized images ``y = (x + u) / L`` and a Gaussian likelihood with a learned
            variance); loss the negative ELBO; held out: ELBO bits per dim, ``-ELBO / (D ln 2)`` of the discrete
            images (Gaussian: ``-(ELBO - D log L) / (D ln 2)``, a bound through the dequantization); samples decode
            latents of a Gaussian mixture fitted after training to the training images' posterior means (ex-post
            density estimation, Ghosh et al. 2020), or of the N(0, I) prior with ``--prior standard_normal``;
            both are scored
dcgan       images scaled to [-1, 1]; one discriminator then one generator update per step (non-saturating or
            hinge loss); held out: the discriminator loss on test images against fresh samples
pixelcnn    levels spread over the model's 256 classes (``round(x * 255 / (L - 1))``, a bijection, so the
            likelihood is that of the L-level data); held out: bits per dim
realnvp,    uniform dequantization ``y = (x + u) / L - 1/2`` (the flows' space is centred); loss and held-out
glow        metric bits per dim ``-(log q(y) - D log L) / (D ln 2)``; ActNorm (Glow) is initialized on the first
            global batch before training
ddpm        images scaled to [-1, 1], the epsilon-prediction loss, class-conditional with label dropout when the
            images have labels (classifier-free guidance); an EMA of the weights samples (DDIM) and is scored;
            held out: the denoising loss
gpt         character windows of ``block_size + 1``; held out: bits per character of every held-out character after
            the first, by windows half a block apart (each character given at least half a block of context)
wavenet     mu-law segments; held out: bits per sample
==========  ==================================================================================================

A family's training step is a list of :class:`Objective` modules, each with its own optimizer, run in order; each
module's ``forward(batch, generator)`` returns its loss, so ``DistributedDataParallel`` can wrap it. Image
families also turn their samples back into the data's levels (:meth:`Family.sample_levels`), which the
sample-quality metrics of :mod:`~genkernels.models.train.evaluation` read.
"""
from __future__ import annotations

import dataclasses
import math
import weakref
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from genkernels.kernels import sample_categorical
from genkernels.models.dcgan import DCGAN, discriminator_loss, generator_loss
from genkernels.models.ddpm import DDPM
from genkernels.models.glow import Glow
from genkernels.models.gpt import GPT, IGNORE_INDEX, GPTConfig
from genkernels.models.pixelcnn import NUM_CLASSES, PixelCNN
from genkernels.models.realnvp import RealNVP
from genkernels.models.unet import UNet
from genkernels.models.vae import VAE
from genkernels.models.wavenet import WaveNet, mu_law_decode

from . import data as train_data
from . import pictures
from .metrics import bits_per_dim, dequantize, mark_failed_samples, requantize

LN2 = math.log(2.0)
SAMPLE_GRID = 64
INTERPOLATION_ROWS, INTERPOLATION_STEPS = 8, 8
TEMPERATURES = (0.0, 0.25, 0.5, 0.7, 0.85, 1.0)
TRUNCATIONS = (8.0, 2.0, 1.0, 0.5, 0.25)  # DCGAN's truncation sweep, rows (|z| > 8 has probability 1e-15)
GUIDANCE_SCALES = (0.0, 1.0, 2.0, 4.0)  # DDPM's classifier-free guidance sweep, rows
STRENGTHS = (0.25, 0.5, 0.75, 1.0)  # DDPM's image-to-image strengths, rows
EXAMPLE_COLUMNS = 8  # held-out images shown in completions, reconstructions, inpainting and image-to-image


@dataclasses.dataclass(frozen=True)
class Option:
    """A family's command-line option ``--name-with-dashes``: its default and its ``--quick`` default.
    ``training=False`` marks options of sampling and scoring only, which a resumed run may change."""

    name: str
    default: Any
    help: str
    quick: Any = None
    training: bool = True
    choices: tuple = ()  # the values allowed, when the option is one of a few names

    def value(self, quick: bool) -> Any:
        """The default of a run (``quick``: of a ``--quick`` run)."""
        return self.quick if quick and self.quick is not None else self.default


@dataclasses.dataclass
class RunSettings:
    """What a family reads besides its own options: the data path, the run's size and where to write."""

    data: Optional[str]
    quick: bool
    out: Path
    device: torch.device


class Objective(nn.Module):
    """One loss of a training step: ``forward(batch, generator) -> scalar``; its trainable ``parameters()`` are
    what its optimizer updates."""


# ----------------------------------------------------------------------------------------------------------------
# Image helpers
# ----------------------------------------------------------------------------------------------------------------
def signed_images(levels_batch: torch.Tensor, levels: int) -> torch.Tensor:
    """Levels ``0 .. L-1`` -> floats in [-1, 1]."""
    return levels_batch.float() * (2.0 / (levels - 1)) - 1.0


def signed_to_levels(images: torch.Tensor, levels: int) -> torch.Tensor:
    """The inverse of :func:`signed_images` for generated images: the nearest level of each value (clamped; an
    image with a NaN becomes :data:`~genkernels.models.train.metrics.FAILED_SAMPLE`)."""
    return mark_failed_samples(torch.round((images.float().clamp(-1, 1) + 1) * ((levels - 1) / 2)), images)


def held_out_examples(test, device: torch.device) -> torch.Tensor:
    """The first :data:`EXAMPLE_COLUMNS` held-out images (levels), the ones every example picture shows."""
    return test.images[:EXAMPLE_COLUMNS].to(device)


@dataclasses.dataclass
class LabelledImageData(train_data.ImageData):
    """Labelled images whose batches carry their labels: ``batch(index)`` is ``[B, C*H*W + 1]``, each row the
    flattened image then its label (:func:`split_labelled`), so that one tensor takes the training loop's path
    (device transfer, data-parallel sharding) for both."""

    def subset(self, index: torch.Tensor) -> "LabelledImageData":
        return LabelledImageData(self.images[index], self.levels, self.labels[index], self.source)

    def batch(self, index: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.images[index].flatten(1), self.labels[index, None]], dim=1)


def split_labelled(batch: torch.Tensor, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A :class:`LabelledImageData` batch back to images ``[B, C, H, W]`` and labels ``[B]``."""
    return batch[:, :-1].reshape(batch.shape[0], *shape), batch[:, -1]


def labelled_splits(train, test) -> tuple[Any, Any]:
    """``(train, test)`` as :class:`LabelledImageData` when the images have labels, else unchanged."""
    if train.labels is None:
        return train, test
    return tuple(LabelledImageData(part.images, part.levels, part.labels, part.source) for part in (train, test))


def num_labels(train) -> Optional[int]:
    """The classes ``K`` of labelled training images (labels ``0 .. K-1``), ``None`` without labels."""
    return None if train.labels is None else int(train.labels.max()) + 1


def training_labels(train, count: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """The labels of ``count`` training images drawn at random: what class-conditional samples are drawn for, so
    that their class mix is the data's."""
    index = torch.randint(0, len(train), (count,), generator=generator, device=generator.device)
    return train.labels[index.cpu()].to(device)


class Family:
    """The interface every family implements (see the module doc for what each one does)."""

    name: str
    kind: str  # "images", "text" or "audio"
    steps: int
    quick_steps: int
    batch_size: int
    lr: float
    lr_schedule: str = "constant"  # the default --lr-schedule
    warmup_steps: int = 0  # the default --warmup-steps (not in --quick runs)
    options: tuple[Option, ...] = ()
    supports_fsdp: bool = True
    fsdp_refusal: str = ""

    def load_data(self, settings: RunSettings, config: dict) -> tuple[Any, Any]:
        """``(train, test)`` items for this family."""
        images = train_data.load_images(settings.data)
        return train_data.split_items(images)

    def describe_data(self, train) -> dict:
        """What identifies the data (saved in a checkpoint's config)."""
        return {"source": train.source, "items": len(train), "shape": list(train.shape), "levels": train.levels}

    def build(self, config: dict, train) -> nn.Module:
        """A freshly initialized model for the resolved options ``config`` and the training data."""
        raise NotImplementedError

    def objectives(self, model: nn.Module, train) -> list[tuple[str, Objective]]:
        """``(name, objective)`` pairs, each trained by its own optimizer, in the order of a step."""
        raise NotImplementedError

    def adam(self, name: str, parameters, lr: float) -> torch.optim.Optimizer:
        """The optimizer of the objective ``name``: Adam at ``lr`` (torch's betas unless the family says)."""
        return torch.optim.Adam(parameters, lr=lr)

    def prepare(self, model: nn.Module, first_batch: torch.Tensor, train, generator: torch.Generator) -> None:
        """Anything the model needs before its first step (the same on every process)."""

    def sample_variants(self, config: dict) -> list[tuple[str, dict]]:
        """``(name, config)`` of every way of sampling whose quality is scored: the run's own (name ``""``) first,
        then any alternatives a user of the family would compare it with."""
        return [("", config)]

    def uses_ema(self) -> bool:
        """Whether an exponential moving average of the weights (option ``ema_decay``) is kept, sampled and
        scored in place of the last weights."""
        return False

    def evaluate(self, model: nn.Module, train, test, config: dict, settings: RunSettings,
                 generator: torch.Generator) -> dict[str, float]:
        """The held-out metric(s) of ``model`` (in eval mode) on the test split (``train``: the training split,
        for what a metric reads from it, such as a class prior)."""
        raise NotImplementedError

    def write_samples(self, model: nn.Module, train, test, config: dict, settings: RunSettings,
                      generator: torch.Generator) -> None:
        """Draw samples from ``model`` and write them into ``settings.out`` (``test``: the held-out split, for
        pictures that start from held-out items)."""
        raise NotImplementedError

    def sample_levels(self, model: nn.Module, count: int, train, config: dict, settings: RunSettings,
                      generator: torch.Generator) -> torch.Tensor:
        """Image families: ``count`` samples of ``model`` as integer images of the data's levels ``0 .. L-1``
        (what the sample-quality metrics read)."""
        raise NotImplementedError(f"{self.name} does not generate images")


def _image_eval(test, device: torch.device, score, batch_size: int = 256) -> float:
    """Item-weighted mean of ``score(levels_batch)`` (a per-batch mean) over the test images, read on ``device``."""
    values = [(float(score(test.images[index].to(device))), len(index))
              for index in train_data.evaluation_batches(len(test), batch_size)]
    return train_data.mean_over_batches(values)


# ----------------------------------------------------------------------------------------------------------------
# VAE
# ----------------------------------------------------------------------------------------------------------------
class _VAEObjective(Objective):
    def __init__(self, model: VAE, levels: int):
        super().__init__()
        self.model, self.levels = model, levels

    def forward(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.model.loss(vae_inputs(self.model, batch, self.levels, generator), generator=generator).loss


def vae_inputs(model: VAE, levels_batch: torch.Tensor, levels: int,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """What ``model`` reads for integer images of ``levels`` levels: the grid ``x / (L - 1)`` for a discretized
    logistic likelihood; for the others a uniform dequantization ``(x + u) / L`` drawn from ``generator``, or the
    cells' centres ``(x + 1/2) / L`` when ``generator`` is None (the pictures' deterministic inputs)."""
    if model.likelihood == "discretized_logistic":
        return levels_batch.float() / (levels - 1)
    if generator is None:
        return (levels_batch.float() + 0.5) / levels
    return dequantize(levels_batch, levels, generator)


@dataclasses.dataclass(frozen=True)
class LatentMixture:
    """A Gaussian mixture over a VAE's latents: component ``weights [K]``, ``means [K, Z]`` and the lower
    Cholesky factors ``scale_tril [K, Z, Z]`` of the covariances."""

    weights: torch.Tensor
    means: torch.Tensor
    scale_tril: torch.Tensor

    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` latents ``[count, Z]``: a component ``k ~ weights``, then ``means[k] + scale_tril[k] @ e``
        with ``e ~ N(0, I)``, every draw from ``generator``."""
        component = torch.multinomial(self.weights, count, replacement=True, generator=generator)
        noise = torch.randn(count, self.means.shape[1], 1, generator=generator, device=self.means.device)
        return self.means[component] + (self.scale_tril[component] @ noise)[..., 0]


def fit_latent_mixture(model: VAE, images: torch.Tensor, levels: int, components: int, seed: int) -> LatentMixture:
    """scikit-learn's full-covariance ``GaussianMixture`` of ``components`` components (``random_state=seed``)
    fitted to the posterior means ``mu(x)`` of ``images`` (integer levels): ex-post density estimation of the
    aggregate posterior (Ghosh et al. 2020), whose samples avoid the regions of ``N(0, I)`` that no training image
    encodes to."""
    from sklearn.mixture import GaussianMixture  # the train extra

    device = next(model.parameters()).device
    with torch.no_grad():
        means = torch.cat([model.encode(vae_inputs(model, images[index].to(device), levels))[0].cpu()
                           for index in train_data.evaluation_batches(images.shape[0], 256)])
    if means.shape[0] < components:
        raise train_data.DataError(f"vae --prior-components {components} exceeds the {means.shape[0]} training "
                                   f"images the mixture is fitted to")
    mixture = GaussianMixture(components, covariance_type="full", random_state=seed).fit(means.double().numpy())
    covariances = torch.from_numpy(mixture.covariances_)
    return LatentMixture(torch.from_numpy(mixture.weights_).float().to(device),
                         torch.from_numpy(mixture.means_).float().to(device),
                         torch.linalg.cholesky(covariances).float().to(device))


def vae_levels(model: VAE, values: torch.Tensor, levels: int) -> torch.Tensor:
    """The inverse of :func:`vae_inputs` for generated values: the nearest grid level ``round(v (L - 1))`` for the
    discretized logistic, the dequantization cell (:func:`~genkernels.models.train.metrics.requantize`) otherwise;
    clamped to ``0 .. L-1`` (an image with a NaN: :data:`~genkernels.models.train.metrics.FAILED_SAMPLE`)."""
    if model.likelihood == "discretized_logistic":
        return mark_failed_samples(torch.round(values.float() * (levels - 1)).clamp(0, levels - 1), values)
    return requantize(values, levels)


def vae_bits_per_dim(model: VAE, log_likelihood: torch.Tensor, num_dims: int, levels: int) -> torch.Tensor:
    """Bits per dim of the discrete images from ``log_likelihood`` (nats per image) of what ``model`` read
    (:func:`vae_inputs`): ``-log p / (D ln 2)`` for the discretized logistic, the dequantized bound
    ``-(log p - D log L) / (D ln 2)`` (:func:`~genkernels.models.train.metrics.bits_per_dim`) otherwise."""
    if model.likelihood == "discretized_logistic":
        return -log_likelihood / (num_dims * LN2)
    return bits_per_dim(log_likelihood, num_dims, levels)


class VAEFamily(Family):
    name, kind = "vae", "images"
    steps, quick_steps, batch_size, lr = 5000, 30, 64, 1e-3
    options = (Option("latent_dim", 16, "size of the latent z"),
               Option("width", 64, "channels of the encoder's first convolution (doubled by each further one)"),
               Option("depth", 2, "encoder convolutions, each halving the side (mirrored by the decoder)"),
               Option("likelihood", "discretized_logistic", "p(x | z): a discretized logistic over the images' "
                      "levels, or a Gaussian of dequantized images", choices=("discretized_logistic", "gaussian")),
               Option("sigma", 0.1, "gaussian likelihood: initial standard deviation of the learned Gaussian"),
               Option("prior", "mixture", "latents of the samples: a Gaussian mixture fitted to the training images' "
                      "posterior means after training, or the model's N(0, I) prior",
                      choices=("mixture", "standard_normal"), training=False),
               Option("prior_components", 10, "mixture prior: full-covariance components", quick=2,
                      training=False))

    def __init__(self):
        self._mixtures = weakref.WeakKeyDictionary()  # model -> (components, seed, LatentMixture), fitted once

    def latents(self, model: VAE, count: int, train, config: dict, generator: torch.Generator) -> torch.Tensor:
        """``count`` latents of the sampling prior that ``config["prior"]`` names (see the module doc)."""
        if config["prior"] == "standard_normal":
            device = next(model.parameters()).device
            return torch.randn(count, model.latent_dim, generator=generator, device=device)
        key = (config["prior_components"], config["seed"])
        if self._mixtures.get(model, (None,))[:2] != key:
            mixture = fit_latent_mixture(model, train.images, train.levels, *key)
            self._mixtures[model] = key + (mixture,)
        return self._mixtures[model][2].sample(count, generator)

    def sample_images(self, model: VAE, count: int, train, config: dict, generator: torch.Generator) -> torch.Tensor:
        """``count`` samples in [0, 1]: the likelihood's means at latents of the sampling prior."""
        with torch.no_grad():
            return model.mean_image(model.decode(self.latents(model, count, train, config, generator)))

    def sample_variants(self, config):
        if config["prior"] == "mixture":
            return [("", config), ("standard_normal_prior", {**config, "prior": "standard_normal"})]
        return [("", config)]

    def build(self, config: dict, train) -> VAE:
        channels, height, width = train.shape
        if height != width:
            raise train_data.DataError(f"vae needs square images; {train.source} holds {height}x{width}")
        if height % 2 ** config["depth"]:
            raise train_data.DataError(f"vae --depth {config['depth']} halves the side {height} too often (it must "
                                       f"be divisible by 2**depth)")
        widths = tuple(config["width"] * 2 ** i for i in range(config["depth"]))
        return VAE(channels, height, config["latent_dim"], hidden_channels=widths, likelihood=config["likelihood"],
                   variance="learned", sigma=config["sigma"], levels=train.levels)

    def objectives(self, model: VAE, train):
        return [("model", _VAEObjective(model, train.levels))]

    def evaluate(self, model, train, test, config, settings, generator):
        def elbo_bits(images):
            elbo = model.loss(vae_inputs(model, images, test.levels, generator), generator=generator).elbo
            return vae_bits_per_dim(model, elbo, math.prod(test.shape), test.levels)
        with torch.no_grad():
            return {"test_bits_per_dim": _image_eval(test, settings.device, elbo_bits)}

    def sample_levels(self, model, count, train, config, settings, generator):
        return vae_levels(model, self.sample_images(model, count, train, config, generator), train.levels)

    def write_samples(self, model, train, test, config, settings, generator):
        prior = "mixture prior" if config["prior"] == "mixture" else "N(0, I) prior"
        pictures.save_image_grid(self.sample_images(model, SAMPLE_GRID, train, config, generator),
                                 settings.out / "samples.png", f"VAE samples (likelihood means, {prior})")
        # Top row: held-out images; bottom row: their reconstructions from the posterior mean.
        held_out = vae_inputs(model, held_out_examples(test, settings.device), test.levels)
        pictures.save_image_grid(torch.cat([held_out, model.reconstruct(held_out)]),
                                 settings.out / "reconstructions.png", "VAE: held-out images (top), reconstructions",
                                 columns=EXAMPLE_COLUMNS)
        # Rows: the decoded straight line between the posterior means of two training images.
        pairs = vae_inputs(model, train.images[:2 * INTERPOLATION_ROWS].to(settings.device), train.levels)
        path = model.interpolate(pairs[0::2], pairs[1::2], steps=INTERPOLATION_STEPS)
        pictures.save_image_grid(path.transpose(0, 1).flatten(0, 1), settings.out / "interpolations.png",
                                 "VAE latent interpolations", columns=INTERPOLATION_STEPS)


# ----------------------------------------------------------------------------------------------------------------
# DCGAN
# ----------------------------------------------------------------------------------------------------------------
class _DiscriminatorObjective(Objective):
    """``L_D`` on real images and ``G(z)`` (drawn without gradients), as one discriminator call on both."""

    def __init__(self, model: DCGAN, levels: int):
        super().__init__()
        self.discriminator, self.levels = model.discriminator, levels
        self._model = (model,)  # not a submodule: only the discriminator's parameters belong to this objective

    def forward(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        model = self._model[0]
        real = signed_images(batch, self.levels)
        with torch.no_grad():
            fake = model.generator(model.latents(batch.shape[0], generator))
        logits = self.discriminator(torch.cat([real, fake]))
        return discriminator_loss(logits[:batch.shape[0]], logits[batch.shape[0]:], model.loss_type)


class _GeneratorObjective(Objective):
    """``L_G`` on a fresh ``G(z)`` through the discriminator, whose parameters stay frozen."""

    def __init__(self, model: DCGAN):
        super().__init__()
        self.generator = model.generator
        self._model = (model,)

    def forward(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        model = self._model[0]
        model.discriminator.requires_grad_(False)
        try:
            fake = self.generator(model.latents(batch.shape[0], generator))
            return generator_loss(model.discriminator(fake), model.loss_type)
        finally:
            model.discriminator.requires_grad_(True)


class DCGANFamily(Family):
    name, kind = "dcgan", "images"
    steps, quick_steps, batch_size, lr = 24000, 30, 64, 2e-4
    options = (Option("latent_dim", 32, "size of the latent z"),
               Option("base_channels", 32, "width of the generator's last and the discriminator's first layer"),
               Option("gan_loss", "non_saturating", "non_saturating or hinge"),
               Option("extra_layers", 1, "3x3 stride-1 layers added to each network (at the generator's last and the "
                                            "discriminator's first hidden resolution)"))
    supports_fsdp = False
    fsdp_refusal = ("dcgan trains two networks with alternating optimizers on one batch; it trains data-parallel "
                    "with DDP (drop --fsdp)")

    def build(self, config: dict, train) -> DCGAN:
        channels, height, width = train.shape
        if height != width:
            raise train_data.DataError(f"dcgan needs square images; {train.source} holds {height}x{width}")
        return DCGAN(config["latent_dim"], channels, height, config["base_channels"], loss=config["gan_loss"],
                     extra_layers=config["extra_layers"])

    def objectives(self, model: DCGAN, train):
        return [("discriminator", _DiscriminatorObjective(model, train.levels)),
                ("generator", _GeneratorObjective(model))]

    def adam(self, name, parameters, lr):
        return torch.optim.Adam(parameters, lr=lr, betas=(0.5, 0.999))  # the DCGAN paper's

    def evaluate(self, model, train, test, config, settings, generator):
        objective = _DiscriminatorObjective(model, test.levels)
        with torch.no_grad():
            return {"test_discriminator_loss": _image_eval(test, settings.device,
                                                          lambda images: objective(images, generator))}

    def sample_levels(self, model, count, train, config, settings, generator):
        model.eval()
        return signed_to_levels(model.sample(count, truncation=None, generator=generator), train.levels)

    def write_samples(self, model, train, test, config, settings, generator):
        model.eval()
        images = model.sample(SAMPLE_GRID, truncation=None, generator=generator)
        pictures.save_image_grid((images + 1) / 2, settings.out / "samples.png", "DCGAN samples")
        # Rows: the same uniforms through each truncation's inverse CDF (truncated_normal), so a column keeps its
        # latent's direction while the threshold shrinks.
        start, rows = generator.get_state(), []
        for truncation in TRUNCATIONS:
            generator.set_state(start)
            rows.append(model.generator(model.latents(EXAMPLE_COLUMNS, generator, truncation=truncation)))
        pictures.save_image_grid((torch.cat(rows) + 1) / 2, settings.out / "truncation.png",
                                 f"DCGAN: truncation {', '.join(map(str, TRUNCATIONS))} (rows)",
                                 columns=EXAMPLE_COLUMNS)


# ----------------------------------------------------------------------------------------------------------------
# Class-conditional likelihood models (pixelcnn, realnvp, glow)
# ----------------------------------------------------------------------------------------------------------------
CONDITIONING = Option("conditioning", "class",
                      "class: model p(x | y) on the images' labels (the held-out bits are of the exact marginal "
                      "p(x) = sum_y p(y) p(x | y); images without labels train p(x)); none: model p(x)",
                      choices=("class", "none"))


def label_log_prior(train, device: torch.device) -> torch.Tensor:
    """``log p(y)`` ``[K]`` (float64): the training labels' frequencies."""
    counts = torch.bincount(train.labels, minlength=num_labels(train)).double()
    return (counts / counts.sum()).log().to(device)


def marginal_log_likelihood(log_likelihood_given, batch: int, log_prior: torch.Tensor) -> torch.Tensor:
    """``log p(x) = log sum_y p(y) p(x | y)`` ``[batch]`` (float64) from ``log_likelihood_given(labels)``, the
    ``[batch]`` values of ``log p(x | y)`` for one label per image: one call per class, summed in log space."""
    per_class = [log_likelihood_given(torch.full((batch,), label, device=log_prior.device))
                 for label in range(log_prior.shape[0])]
    return torch.logsumexp(torch.stack(per_class, 1).double() + log_prior, dim=1)


class _ConditionalImageFamily(Family):
    """An image family whose model is class-conditional, ``p(x | y)``, when the images have labels (the digits do)
    and ``--conditioning class`` (the default). Its batches then carry the labels (:class:`LabelledImageData`),
    its samples are drawn for the labels of random training images (so the class mix is the data's), and its
    held-out bits per dim are of the exact marginal ``p(x) = sum_y p(y) p(x | y)`` with ``p(y)`` the training
    labels' frequencies, which compare with the unconditional baselines."""

    kind = "images"

    def load_data(self, settings, config):
        train, test = super().load_data(settings, config)
        return labelled_splits(train, test) if config["conditioning"] == "class" else (train, test)

    @staticmethod
    def num_classes(config: dict, train) -> Optional[int]:
        """The model's ``num_classes``: the labels' classes, or ``None`` for an unconditional model."""
        return num_labels(train) if config["conditioning"] == "class" else None

    @staticmethod
    def split_batch(model, batch: torch.Tensor, shape: tuple[int, int, int]):
        """A training batch as ``(images, labels)``; labels ``None`` for an unconditional model."""
        return (batch, None) if model.num_classes is None else split_labelled(batch, shape)

    @staticmethod
    def sample_labels(model, count: int, train, generator: torch.Generator,
                      device: torch.device) -> Optional[torch.Tensor]:
        """Labels to draw ``count`` scored samples for: random training images' (``None`` if unconditional)."""
        return None if model.num_classes is None else training_labels(train, count, generator, device)

    @staticmethod
    def grid_labels(model, count: int, columns: int, device: torch.device) -> tuple[int, Optional[torch.Tensor]]:
        """``(samples, labels)`` of a picture with ``columns`` per row: ``count`` unlabelled samples of an
        unconditional model, else one row per class (row ``r`` class ``r``)."""
        if model.num_classes is None:
            return count, None
        return model.num_classes * columns, torch.arange(model.num_classes, device=device).repeat_interleave(columns)

    @staticmethod
    def held_out_labels(model, test, count: int, device: torch.device) -> Optional[torch.Tensor]:
        """The labels of :func:`held_out_examples` (``None`` if unconditional)."""
        return None if model.num_classes is None else test.labels[:count].to(device)


# ----------------------------------------------------------------------------------------------------------------
# PixelCNN
# ----------------------------------------------------------------------------------------------------------------
def pixel_classes(levels_batch: torch.Tensor, levels: int) -> torch.Tensor:
    """Levels ``0 .. L-1`` spread over PixelCNN's 256 classes: ``round(x * 255 / (L - 1))`` (one-to-one)."""
    return torch.round(levels_batch.float() * ((NUM_CLASSES - 1) / (levels - 1))).long()


def class_levels(classes: torch.Tensor, levels: int) -> torch.Tensor:
    """PixelCNN's classes ``0 .. 255`` back to levels ``0 .. L-1``: the inverse of :func:`pixel_classes` on its
    image, the nearest level elsewhere (a sample may take classes between the data's)."""
    return torch.round(classes.float() * ((levels - 1) / (NUM_CLASSES - 1))).long()


COMPLETIONS = 3  # completions drawn per held-out image


@torch.no_grad()
def complete_bottom_half(model: PixelCNN, classes: torch.Tensor, generator: torch.Generator,
                         labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``classes`` ``[N, C, H, W]`` (PixelCNN's 0..255) with the rows from ``H // 2`` on redrawn from
    ``p(x_i | x_<i[, y])`` in raster order (channels within a pixel), given the kept top rows (and the images'
    labels for a class-conditional model); the whole network runs once per redrawn sub-pixel, which is cheap at
    these sizes."""
    images = classes.clone()
    _, channels, height, width = images.shape
    for row in range(height // 2, height):
        for col in range(width):
            for channel in range(channels):
                logits = model(images, labels)[:, :, channel, row, col]
                images[:, channel, row, col] = sample_categorical(logits, generator=generator)
    return images


class _PixelCNNObjective(Objective):
    def __init__(self, model: PixelCNN, levels: int, shape: tuple[int, int, int]):
        super().__init__()
        self.model, self.levels, self.shape = model, levels, shape

    def forward(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        images, labels = _ConditionalImageFamily.split_batch(self.model, batch, self.shape)
        return self.model.loss(pixel_classes(images, self.levels), labels)


class PixelCNNFamily(_ConditionalImageFamily):
    """Class-conditional by default on labelled images (:class:`_ConditionalImageFamily`); the held-out bits
    are exact."""

    name = "pixelcnn"
    steps, quick_steps, batch_size, lr = 4500, 20, 32, 1e-3
    lr_schedule = "cosine"
    options = (Option("hidden_channels", 48, "h: the residual stream has 2h channels (a multiple of 3 for RGB)"),
               Option("num_blocks", 6, "residual blocks"),
               Option("output_channels", 96, "channels of the first output convolution"), CONDITIONING)

    def build(self, config: dict, train) -> PixelCNN:
        channels, height, width = train.shape
        if train.levels > NUM_CLASSES:
            raise train_data.DataError(f"pixelcnn models at most {NUM_CLASSES} levels; {train.source} has "
                                       f"{train.levels}")
        return PixelCNN(channels, config["hidden_channels"], config["num_blocks"], config["output_channels"],
                        (height, width), num_classes=self.num_classes(config, train))

    def objectives(self, model: PixelCNN, train):
        return [("model", _PixelCNNObjective(model, train.levels, train.shape))]

    def evaluate(self, model, train, test, config, settings, generator):
        if model.num_classes is None:
            score = lambda x: model.loss(pixel_classes(x, test.levels))  # noqa: E731
        else:
            log_prior = label_log_prior(train, settings.device)

            def score(images):
                classes = pixel_classes(images, test.levels)
                log_p = marginal_log_likelihood(lambda labels: model.log_likelihood(classes, labels),
                                                classes.shape[0], log_prior)
                return (-log_p / (classes[0].numel() * math.log(2.0))).mean()
        with torch.no_grad():
            return {"test_bits_per_dim": _image_eval(test, settings.device, score, 128)}

    def sample_levels(self, model, count, train, config, settings, generator):
        labels = self.sample_labels(model, count, train, generator, settings.device)
        return class_levels(model.sample(count, generator=generator, labels=labels), train.levels)

    def write_samples(self, model, train, test, config, settings, generator):
        count, labels = self.grid_labels(model, 16 if settings.quick else SAMPLE_GRID, 8, settings.device)
        images = model.sample(count, generator=generator, labels=labels).float() / (NUM_CLASSES - 1)
        pictures.save_image_grid(images, settings.out / "samples.png",
                                 "PixelCNN samples" + (" (row r: class r)" if labels is not None else ""))
        # Top row: held-out images; below: completions of their top halves (given their labels when the model is
        # class-conditional), each drawn independently.
        held_out = pixel_classes(held_out_examples(test, settings.device), test.levels)
        labels = self.held_out_labels(model, test, held_out.shape[0], settings.device)
        completions = complete_bottom_half(model, held_out.repeat(COMPLETIONS, 1, 1, 1), generator,
                                           None if labels is None else labels.repeat(COMPLETIONS))
        pictures.save_image_grid(torch.cat([held_out, completions]).float() / (NUM_CLASSES - 1),
                                 settings.out / "completions.png",
                                 "PixelCNN: held-out (top), completions of the top half"
                                 + (" given its label" if labels is not None else ""),
                                 columns=held_out.shape[0])


# ----------------------------------------------------------------------------------------------------------------
# Flows
# ----------------------------------------------------------------------------------------------------------------
class _FlowObjective(Objective):
    def __init__(self, model, levels: int, shape: tuple[int, int, int]):
        super().__init__()
        self.model, self.levels, self.shape = model, levels, shape

    def forward(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        images, labels = _ConditionalImageFamily.split_batch(self.model, batch, self.shape)
        return flow_bits_per_dim(self.model, images, self.levels, generator, labels).mean()


def flow_space(levels_batch: torch.Tensor, levels: int, generator: torch.Generator) -> torch.Tensor:
    """L-level images uniformly dequantized into the flows' centred space, ``(x + u) / L - 1/2``."""
    return dequantize(levels_batch, levels, generator) - 0.5


def flow_bits_per_dim(model, levels_batch: torch.Tensor, levels: int, generator: torch.Generator,
                      labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-image bits per dim of L-level images under ``model`` (given ``labels`` if it is class-conditional)
    with uniform dequantization (module doc)."""
    return bits_per_dim(model.log_prob(flow_space(levels_batch, levels, generator), labels), model.num_dims, levels)


FLOW_TEMPERATURE = Option("temperature", 0.8, "the latents' scale in samples.png (the sample-quality metrics read "
                                            "the model's own distribution, temperature 1)", training=False)


class _FlowFamily(_ConditionalImageFamily):
    """Class-conditional by default on labelled images (:class:`_ConditionalImageFamily`: a top prior per class);
    the held-out bits are of the marginal over the labels of one dequantization of each image."""

    batch_size = 64

    def objectives(self, model, train):
        return [("model", _FlowObjective(model, train.levels, train.shape))]

    def prepare(self, model, first_batch, train, generator):
        images, labels = self.split_batch(model, first_batch, train.shape)
        with torch.no_grad():  # data-dependent initialization (ActNorm) on the batch every process shares
            model.log_prob(flow_space(images, train.levels, generator), labels)

    def evaluate(self, model, train, test, config, settings, generator):
        if model.num_classes is None:
            score = lambda images: flow_bits_per_dim(model, images, test.levels, generator).mean()  # noqa: E731
        else:
            log_prior = label_log_prior(train, settings.device)

            def score(images):
                y = flow_space(images, test.levels, generator)
                log_p = marginal_log_likelihood(lambda labels: model.log_prob(y, labels), y.shape[0], log_prior)
                return bits_per_dim(log_p, model.num_dims, test.levels).mean()
        with torch.no_grad():
            return {"test_bits_per_dim": _image_eval(test, settings.device, score)}

    def sample_levels(self, model, count, train, config, settings, generator):
        # the model's own distribution: lower temperatures scored worse Frechet distances on the digits
        labels = self.sample_labels(model, count, train, generator, settings.device)
        return requantize(model.sample(count, temperature=1.0, generator=generator, labels=labels) + 0.5,
                          train.levels)

    def write_samples(self, model, train, test, config, settings, generator):
        temperature = config["temperature"]
        count, labels = self.grid_labels(model, SAMPLE_GRID, 8, settings.device)
        images = model.sample(count, temperature=temperature, generator=generator, labels=labels) + 0.5
        pictures.save_image_grid(images, settings.out / "samples.png",
                                 f"{self.name} samples (temperature {temperature:g}"
                                 + ("; row r: class r)" if labels is not None else ")"))
        # Rows: the same latents scaled by each temperature (the generator restarts from one state per row);
        # column c of a class-conditional model shows class c.
        count, labels = self.grid_labels(model, INTERPOLATION_STEPS, 1, settings.device)
        start = generator.get_state()
        rows = []
        for temperature in TEMPERATURES:
            generator.set_state(start)
            rows.append(model.sample(count, temperature=temperature, generator=generator, labels=labels) + 0.5)
        pictures.save_image_grid(torch.cat(rows), settings.out / "temperatures.png",
                                 f"{self.name}: temperatures {', '.join(f'{t:g}' for t in TEMPERATURES)} by row"
                                 + (", classes by column" if labels is not None else ""), columns=count)


class RealNVPFamily(_FlowFamily):
    name = "realnvp"
    steps, quick_steps, lr = 12000, 20, 1e-3
    options = (Option("num_scales", 2, "scales (H and W divisible by 2**(num_scales - 1))"),
               Option("hidden_channels", 32, "width of the coupling networks"), FLOW_TEMPERATURE, CONDITIONING)

    def build(self, config, train):
        return RealNVP(train.shape, config["num_scales"], config["hidden_channels"],
                       num_classes=self.num_classes(config, train))


class GlowFamily(_FlowFamily):
    name = "glow"
    steps, quick_steps, lr = 12000, 20, 1e-3
    options = (Option("num_levels", 2, "levels (H and W divisible by 2**num_levels)"),
               Option("depth", 4, "flow steps per level"),
               Option("hidden_channels", 32, "width of the coupling networks"), FLOW_TEMPERATURE, CONDITIONING)

    def build(self, config, train):
        return Glow(train.shape, config["num_levels"], config["depth"], config["hidden_channels"],
                    generator=torch.Generator().manual_seed(config["seed"]),
                    num_classes=self.num_classes(config, train))


# ----------------------------------------------------------------------------------------------------------------
# DDPM
# ----------------------------------------------------------------------------------------------------------------
class _DDPMObjective(Objective):
    def __init__(self, model: DDPM, levels: int, shape: tuple[int, int, int]):
        super().__init__()
        self.model, self.levels, self.shape = model, levels, shape

    def forward(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.model.num_classes is None:
            return self.model.loss(signed_images(batch, self.levels), generator=generator)
        images, labels = split_labelled(batch, self.shape)  # labels dropped to the null class at class_dropout
        return self.model.loss(signed_images(images, self.levels), labels, generator=generator)


class DDPMFamily(Family):
    """Class-conditional when the images have labels (the digits do), trained with label dropout so that one
    network also models the unconditional distribution, for classifier-free guidance (Ho & Salimans 2022)."""

    name, kind = "ddpm", "images"
    steps, quick_steps, batch_size, lr = 2000, 20, 64, 1e-3
    options = (Option("base_channels", 32, "width of the U-Net's first level"),
               Option("num_res_blocks", 1, "residual blocks per level"),
               Option("ema_decay", 0.995, "decay of the exponential moving average of the weights"),
               Option("class_dropout", 0.1, "probability of training an image with the null class in place of "
                                            "its label (labelled images only)"),
               Option("sample_steps", 50, "DDIM steps when sampling", quick=10, training=False))
    supports_fsdp = False
    fsdp_refusal = ("ddpm keeps an exponential moving average of its whole weights on every process; it trains "
                    "data-parallel with DDP (drop --fsdp)")

    def load_data(self, settings, config):
        return labelled_splits(*super().load_data(settings, config))

    def build(self, config, train):
        channels, height, width = train.shape
        if height != width:
            raise train_data.DataError(f"ddpm needs square images; {train.source} holds {height}x{width}")
        base = config["base_channels"]
        num_classes = num_labels(train)
        unet = UNet(channels, base_channels=base, channel_mult=(1, 2), num_res_blocks=config["num_res_blocks"],
                    attention_resolutions=(height // 2,), dropout=0.0, num_groups=min(8, base),
                    num_head_channels=min(2 * base, 64), image_size=height, num_classes=num_classes)
        return DDPM(unet, class_dropout_prob=config["class_dropout"])

    def objectives(self, model, train):
        return [("model", _DDPMObjective(model, train.levels, train.shape))]

    def uses_ema(self):
        return True

    @staticmethod
    def _labels(model: DDPM, data, index: torch.Tensor, device: torch.device) -> Optional[torch.Tensor]:
        return None if model.num_classes is None else data.labels[index].to(device)

    def evaluate(self, model, train, test, config, settings, generator):
        """The denoising loss of the held-out images given their labels (class-conditional models)."""
        model.eval()
        values = []
        with torch.no_grad():
            for index in train_data.evaluation_batches(len(test), 256):
                images = signed_images(test.images[index].to(settings.device), test.levels)
                loss = model.loss(images, self._labels(model, test, index, settings.device), generator=generator)
                values.append((float(loss), len(index)))
        return {"test_denoising_mse": train_data.mean_over_batches(values)}

    def sample_levels(self, model, count, train, config, settings, generator):
        """Class-conditional models sample each image for the label of a training image drawn at random
        (guidance scale 1: the conditional model itself), so the class mix is the data's."""
        labels = None
        if model.num_classes is not None:
            labels = training_labels(train, count, generator, settings.device)
        images = model.sample(count, config["sample_steps"], sampler="ddim", class_labels=labels,
                              generator=generator, progress=False)
        return signed_to_levels(images, train.levels)

    def write_samples(self, model, train, test, config, settings, generator):
        steps = config["sample_steps"]
        ddim = dict(sampler="ddim", generator=generator, progress=False)
        images = model.sample(SAMPLE_GRID, steps, **ddim)
        pictures.save_image_grid((images + 1) / 2, settings.out / "samples.png",
                                 f"DDPM samples (EMA weights, DDIM {steps} steps"
                                 f"{', unconditional' if model.num_classes is not None else ''})")
        if model.num_classes is not None:
            self._write_guidance_sweep(model, steps, settings, generator)
        # Image-to-image: held-out images noised to each strength's step and denoised (unconditional).
        held_out = signed_images(held_out_examples(test, settings.device), test.levels)
        rows = [held_out] + [model.sample(held_out.shape[0], steps, init=held_out, strength=strength, **ddim)
                             for strength in STRENGTHS]
        pictures.save_image_grid((torch.cat(rows) + 1) / 2, settings.out / "image_to_image.png",
                                 f"DDPM image-to-image: held-out (top), strengths {', '.join(map(str, STRENGTHS))}",
                                 columns=held_out.shape[0])
        # Inpainting: the bottom half (mask 1) regenerated around the kept top half, twice.
        mask = torch.zeros_like(held_out[:, :1])
        mask[:, :, held_out.shape[2] // 2:] = 1
        inpainted = [model.sample(held_out.shape[0], steps, init=held_out, mask=mask, **ddim) for _ in range(2)]
        pictures.save_image_grid((torch.cat([held_out, held_out * (1 - mask)] + inpainted) + 1) / 2,
                                 settings.out / "inpainting.png",
                                 "DDPM inpainting: held-out, top half kept, two inpaintings",
                                 columns=held_out.shape[0])

    @staticmethod
    def _write_guidance_sweep(model: DDPM, steps: int, settings: RunSettings, generator) -> None:
        """Rows: guidance scales; columns: classes; one starting noise per column, the same in every row."""
        classes = torch.arange(model.num_classes, device=settings.device)
        rows = []
        start = generator.get_state()
        for scale in GUIDANCE_SCALES:
            generator.set_state(start)
            rows.append(model.sample(classes.shape[0], steps, sampler="ddim", guidance_scale=scale,
                                     class_labels=classes, generator=generator, progress=False))
        pictures.save_image_grid((torch.cat(rows) + 1) / 2, settings.out / "guidance.png",
                                 f"DDPM guidance {', '.join(map(str, GUIDANCE_SCALES))} (rows) by class",
                                 columns=classes.shape[0])


# ----------------------------------------------------------------------------------------------------------------
# GPT
# ----------------------------------------------------------------------------------------------------------------
class _GPTObjective(Objective):
    """The next-character cross-entropy ``-1/(B T) sum_{b,t} log p(w_{b,t+1} | w_{b,<=t})`` (nats) of a batch of
    windows ``w`` ``[B, T + 1]``."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.model(batch[:, :-1], batch[:, 1:])[1]


class GPTFamily(Family):
    name, kind = "gpt", "text"
    steps, quick_steps, batch_size, lr = 1600, 20, 32, 6e-3
    lr_schedule, warmup_steps = "cosine", 100
    weight_decay = 0.1  # AdamW's, of the weight matrices and embeddings (:meth:`adam`)
    options = (Option("block_size", 128, "context length in characters", quick=32),
               Option("n_layer", 3, "Transformer blocks"),
               Option("n_head", 3, "attention heads"),
               Option("n_embd", 96, "width"),
               Option("sample_chars", 1000, "characters to generate for samples.txt", quick=100, training=False),
               Option("eval_windows", 4096, "at most this many held-out windows scored, from the start, each "
                                            "half a block after the one before (the default covers the default "
                                            "corpus's held-out text at every --block-size from 24 up)",
                      quick=16, training=False))

    def load_data(self, settings, config):
        text = train_data.load_text(settings.data)
        train, test = train_data.split_text(text)
        window = config["block_size"] + 1
        return train.with_window(window), test.with_window(window)

    def describe_data(self, train):
        return {"source": train.source, "characters": int(train.ids.shape[0]), "alphabet": train.alphabet}

    def build(self, config, train):
        return GPT(GPTConfig(vocab_size=len(train.alphabet), block_size=config["block_size"],
                             n_layer=config["n_layer"], n_head=config["n_head"], n_embd=config["n_embd"]))

    def objectives(self, model, train):
        return [("model", _GPTObjective(model))]

    def adam(self, name, parameters, lr):
        """AdamW (decoupled weight decay, Loshchilov & Hutter 2019) with betas (0.9, 0.99): each step also
        shrinks every weight matrix and embedding by ``lr * weight_decay``; biases and LayerNorm gains (the
        parameters of fewer than 2 dims) are not decayed."""
        parameters = list(parameters)
        groups = [{"params": [p for p in parameters if p.dim() >= 2], "weight_decay": self.weight_decay},
                  {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99))

    @staticmethod
    def scored_windows(test, config: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(starts, first)``: the held-out windows :meth:`evaluate` scores, at most ``eval_windows`` of them,
        from :func:`~genkernels.models.train.data.sliding_windows`: a stride of half a block, each held-out
        character after the first scored once, given at least half a block of the characters before it."""
        return train_data.sliding_windows(test.ids.shape[0], config["block_size"], config["eval_windows"])

    @classmethod
    def scored_span(cls, test, config: dict) -> tuple[int, int]:
        """``(begin, end)``: :meth:`evaluate` scores exactly the held-out characters ``test.ids[begin:end]``,
        each once, each given (some of) the characters before it; the baselines score the same ones."""
        starts, first = cls.scored_windows(test, config)
        return int(starts[0] + first[0]) + 1, int(starts[-1]) + config["block_size"] + 1

    def evaluate(self, model, train, test, config, settings, generator):
        """Bits per character ``-1/N sum_t log2 p(c_t | context)`` over the held-out characters of
        :meth:`scored_span`: each window of :meth:`scored_windows` runs the model on its ``block_size`` inputs,
        and its targets before ``first`` (scored by the previous window) are ignored."""
        starts, first = self.scored_windows(test, config)
        offsets = torch.arange(config["block_size"])
        values = []
        with torch.no_grad():
            for index in train_data.evaluation_batches(starts.shape[0], 64):
                windows = test.batch(starts[index])
                targets = windows[:, 1:].masked_fill(offsets < first[index, None], IGNORE_INDEX)
                loss = model(windows[:, :-1].to(settings.device), targets.to(settings.device))[1]
                values.append((float(loss), int((targets != IGNORE_INDEX).sum())))
        return {"test_bits_per_char": train_data.mean_over_batches(values) / LN2}

    def write_samples(self, model, train, test, config, settings, generator):
        start = train.alphabet.index("\n") if "\n" in train.alphabet else 0
        context = torch.tensor([[start]], device=settings.device)
        text, remaining = [], config["sample_chars"]
        while remaining > 0:  # the context never exceeds block_size: continue from the last half of it
            length = min(remaining, config["block_size"] - context.shape[1] + 1)
            tokens = model.generate(context, length, generator=generator)
            text.append(train.decode(tokens[0, context.shape[1]:].tolist()))
            remaining -= length
            context = tokens[:, -(config["block_size"] // 2):]
        (settings.out / "samples.txt").write_text(train.decode([start]) + "".join(text), encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------------
# WaveNet
# ----------------------------------------------------------------------------------------------------------------
class _WaveNetObjective(Objective):
    def __init__(self, model: WaveNet):
        super().__init__()
        self.model = model

    def forward(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.model.loss(batch)


class WaveNetFamily(Family):
    name, kind = "wavenet", "audio"
    steps, quick_steps, batch_size, lr = 1500, 10, 8, 1e-3
    options = (Option("residual_channels", 32, "R: residual width"),
               Option("skip_channels", 64, "S: skip width"),
               Option("layers_per_stack", 8, "dilations 1 .. 2**(layers - 1) per stack"),
               Option("num_stacks", 1, "stacks of dilated layers"),
               Option("segment_length", 1024, "samples per training segment", quick=512),
               Option("sample_seconds", 1.0, "seconds of audio to generate per sample", quick=0.1,
                      training=False))

    def load_data(self, settings, config):
        return train_data.split_items(train_data.load_audio(settings.data, config["segment_length"]))

    def describe_data(self, train):
        return {"source": train.source, "items": len(train), "segment_length": int(train.segments.shape[1])}

    def build(self, config, train):
        width = config["residual_channels"]
        return WaveNet(train_data.MU_LAW_CLASSES, width, width, config["skip_channels"],
                       num_stacks=config["num_stacks"], layers_per_stack=config["layers_per_stack"])

    def objectives(self, model, train):
        return [("model", _WaveNetObjective(model))]

    def evaluate(self, model, train, test, config, settings, generator):
        with torch.no_grad():
            values = [(float(model.loss(test.segments[index].to(settings.device))), len(index))
                      for index in train_data.evaluation_batches(len(test), 16)]
        return {"test_bits_per_sample": train_data.mean_over_batches(values) / LN2}

    def write_samples(self, model, train, test, config, settings, generator):
        samples = round(config["sample_seconds"] * train.sample_rate)
        classes = model.generate(samples, batch_size=4, generator=generator)
        clips = mu_law_decode(classes, train_data.MU_LAW_CLASSES).cpu().numpy()
        for i, clip in enumerate(clips):
            train_data.write_wav(settings.out / f"sample_{i}.wav", clip, train.sample_rate)
        pictures.save_spectrograms(clips, train.sample_rate, settings.out / "spectrogram.png")


FAMILIES: dict[str, Family] = {family.name: family for family in (
    VAEFamily(), DCGANFamily(), PixelCNNFamily(), RealNVPFamily(), GlowFamily(), DDPMFamily(), GPTFamily(),
    WaveNetFamily())}


def ema_model(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """An exponential moving average of ``model``'s parameters and buffers:
    ``ema <- decay * ema + (1 - decay) * weights`` after every optimizer step (torch's ``AveragedModel``)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
