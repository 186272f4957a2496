"""What training each model family takes: its data, model, losses, held-out metric and samples.

Every family turns the shared data (:mod:`genkernels.models.train.data`) into what its model reads:

==========  ==================================================================================================
vae         dequantized images ``y = (x + u) / L`` in [0, 1]; Gaussian likelihood with a learned variance; loss the
            negative ELBO; held out: ELBO bits per dim ``-(ELBO - D log L) / (D ln 2)``
dcgan       images scaled to [-1, 1]; one discriminator then one generator update per step (non-saturating or
            hinge loss); held out: the discriminator loss on test images against fresh samples
pixelcnn    levels spread over the model's 256 classes (``round(x * 255 / (L - 1))``, a bijection, so the
            likelihood is that of the L-level data); held out: bits per dim
realnvp,    uniform dequantization ``y = (x + u) / L - 1/2`` (the flows' space is centred); loss and held-out
glow        metric bits per dim ``-(log q(y) - D log L) / (D ln 2)``; ActNorm (Glow) is initialized on the first
            global batch before training
ddpm        images scaled to [-1, 1], the epsilon-prediction loss; an EMA of the weights samples (DDIM) and is
            scored; held out: the denoising loss
gpt         character windows of ``block_size + 1``; held out: bits per character on non-overlapping test windows
wavenet     mu-law segments; held out: bits per sample
==========  ==================================================================================================

A family's training step is a list of :class:`Objective` modules, each with its own optimizer, run in order; each
module's ``forward(batch, generator)`` returns its loss, so ``DistributedDataParallel`` can wrap it.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from genkernels.models.dcgan import DCGAN, discriminator_loss, generator_loss
from genkernels.models.ddpm import DDPM
from genkernels.models.glow import Glow
from genkernels.models.gpt import GPT, GPTConfig
from genkernels.models.pixelcnn import NUM_CLASSES, PixelCNN
from genkernels.models.realnvp import RealNVP
from genkernels.models.unet import UNet
from genkernels.models.vae import VAE
from genkernels.models.wavenet import WaveNet, mu_law_decode

from . import data as train_data
from . import pictures
from .metrics import bits_per_dim, dequantize

LN2 = math.log(2.0)
SAMPLE_GRID = 64
INTERPOLATION_ROWS, INTERPOLATION_STEPS = 8, 8
TEMPERATURES = (0.0, 0.25, 0.5, 0.7, 0.85, 1.0)


@dataclasses.dataclass(frozen=True)
class Option:
    """A family's command-line option ``--name-with-dashes``: its default and its ``--quick`` default.
    ``training=False`` marks options of sampling and scoring only, which a resumed run may change."""

    name: str
    default: Any
    help: str
    quick: Any = None
    training: bool = True

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


class Family:
    """The interface every family implements (see the module doc for what each one does)."""

    name: str
    kind: str  # "images", "text" or "audio"
    steps: int
    quick_steps: int
    batch_size: int
    lr: float
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

    def uses_ema(self) -> bool:
        """Whether an exponential moving average of the weights (option ``ema_decay``) is kept, sampled and
        scored in place of the last weights."""
        return False

    def evaluate(self, model: nn.Module, test, config: dict, settings: RunSettings,
                 generator: torch.Generator) -> dict[str, float]:
        """The held-out metric(s) of ``model`` (in eval mode) on the test split."""
        raise NotImplementedError

    def write_samples(self, model: nn.Module, train, config: dict, settings: RunSettings,
                      generator: torch.Generator) -> None:
        """Draw samples from ``model`` and write them into ``settings.out``."""
        raise NotImplementedError


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
        return self.model.loss(dequantize(batch, self.levels, generator), generator=generator).loss


class VAEFamily(Family):
    name, kind = "vae", "images"
    steps, quick_steps, batch_size, lr = 5000, 30, 64, 1e-3
    options = (Option("latent_dim", 16, "size of the latent z"),
               Option("sigma", 0.1, "initial standard deviation of the learned Gaussian likelihood"))

    def build(self, config: dict, train) -> VAE:
        channels, height, width = train.shape
        if height != width:
            raise train_data.DataError(f"vae needs square images; {train.source} holds {height}x{width}")
        return VAE(channels, height, config["latent_dim"], likelihood="gaussian", variance="learned",
                   sigma=config["sigma"])

    def objectives(self, model: VAE, train):
        return [("model", _VAEObjective(model, train.levels))]

    def evaluate(self, model, test, config, settings, generator):
        def elbo_bits(images):
            return bits_per_dim(model.loss(dequantize(images, test.levels, generator), generator=generator).elbo,
                                math.prod(test.shape), test.levels)
        with torch.no_grad():
            return {"test_bits_per_dim": _image_eval(test, settings.device, elbo_bits)}

    def write_samples(self, model, train, config, settings, generator):
        pictures.save_image_grid(model.sample(SAMPLE_GRID, generator=generator), settings.out / "samples.png",
                                 "VAE samples (likelihood mean)")
        # Rows: the decoded straight line between the posterior means of two training images (bin centres).
        pairs = (train.images[:2 * INTERPOLATION_ROWS].to(settings.device).float() + 0.5) / train.levels
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
    steps, quick_steps, batch_size, lr = 5000, 30, 64, 2e-4
    options = (Option("latent_dim", 32, "size of the latent z"),
               Option("base_channels", 32, "width of the generator's last and the discriminator's first layer"),
               Option("gan_loss", "non_saturating", "non_saturating or hinge"))
    supports_fsdp = False
    fsdp_refusal = ("dcgan trains two networks with alternating optimizers on one batch; it trains data-parallel "
                    "with DDP (drop --fsdp)")

    def build(self, config: dict, train) -> DCGAN:
        channels, height, width = train.shape
        if height != width:
            raise train_data.DataError(f"dcgan needs square images; {train.source} holds {height}x{width}")
        return DCGAN(config["latent_dim"], channels, height, config["base_channels"], loss=config["gan_loss"])

    def objectives(self, model: DCGAN, train):
        return [("discriminator", _DiscriminatorObjective(model, train.levels)),
                ("generator", _GeneratorObjective(model))]

    def adam(self, name, parameters, lr):
        return torch.optim.Adam(parameters, lr=lr, betas=(0.5, 0.999))  # the DCGAN paper's

    def evaluate(self, model, test, config, settings, generator):
        objective = _DiscriminatorObjective(model, test.levels)
        with torch.no_grad():
            return {"test_discriminator_loss": _image_eval(test, settings.device,
                                                          lambda images: objective(images, generator))}

    def write_samples(self, model, train, config, settings, generator):
        model.eval()
        images = model.sample(SAMPLE_GRID, truncation=None, generator=generator)
        pictures.save_image_grid((images + 1) / 2, settings.out / "samples.png", "DCGAN samples")


# ----------------------------------------------------------------------------------------------------------------
# PixelCNN
# ----------------------------------------------------------------------------------------------------------------
def pixel_classes(levels_batch: torch.Tensor, levels: int) -> torch.Tensor:
    """Levels ``0 .. L-1`` spread over PixelCNN's 256 classes: ``round(x * 255 / (L - 1))`` (one-to-one)."""
    return torch.round(levels_batch.float() * ((NUM_CLASSES - 1) / (levels - 1))).long()


class _PixelCNNObjective(Objective):
    def __init__(self, model: PixelCNN, levels: int):
        super().__init__()
        self.model, self.levels = model, levels

    def forward(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.model.loss(pixel_classes(batch, self.levels))


class PixelCNNFamily(Family):
    name, kind = "pixelcnn", "images"
    steps, quick_steps, batch_size, lr = 3000, 20, 32, 1e-3
    options = (Option("hidden_channels", 24, "h: the residual stream has 2h channels (a multiple of 3 for RGB)"),
               Option("num_blocks", 4, "residual blocks"),
               Option("output_channels", 48, "channels of the first output convolution"))

    def build(self, config: dict, train) -> PixelCNN:
        channels, height, width = train.shape
        if train.levels > NUM_CLASSES:
            raise train_data.DataError(f"pixelcnn models at most {NUM_CLASSES} levels; {train.source} has "
                                       f"{train.levels}")
        return PixelCNN(channels, config["hidden_channels"], config["num_blocks"], config["output_channels"],
                        (height, width))

    def objectives(self, model: PixelCNN, train):
        return [("model", _PixelCNNObjective(model, train.levels))]

    def evaluate(self, model, test, config, settings, generator):
        with torch.no_grad():
            return {"test_bits_per_dim": _image_eval(test, settings.device,
                                                     lambda x: model.loss(pixel_classes(x, test.levels)), 128)}

    def write_samples(self, model, train, config, settings, generator):
        count = 16 if settings.quick else SAMPLE_GRID
        images = model.sample(count, generator=generator).float() / (NUM_CLASSES - 1)
        pictures.save_image_grid(images, settings.out / "samples.png", "PixelCNN samples")


# ----------------------------------------------------------------------------------------------------------------
# Flows
# ----------------------------------------------------------------------------------------------------------------
class _FlowObjective(Objective):
    def __init__(self, model, levels: int):
        super().__init__()
        self.model, self.levels = model, levels

    def forward(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return flow_bits_per_dim(self.model, batch, self.levels, generator).mean()


def flow_bits_per_dim(model, levels_batch: torch.Tensor, levels: int, generator: torch.Generator) -> torch.Tensor:
    """Per-image bits per dim of L-level images under ``model`` with uniform dequantization (module doc)."""
    y = dequantize(levels_batch, levels, generator) - 0.5  # the flows' space is centred
    return bits_per_dim(model.log_prob(y), model.num_dims, levels)


class _FlowFamily(Family):
    kind = "images"
    batch_size = 64

    def objectives(self, model, train):
        return [("model", _FlowObjective(model, train.levels))]

    def prepare(self, model, first_batch, train, generator):
        with torch.no_grad():  # data-dependent initialization (ActNorm) on the batch every process shares
            model.log_prob(dequantize(first_batch, train.levels, generator) - 0.5)

    def evaluate(self, model, test, config, settings, generator):
        with torch.no_grad():
            score = lambda images: flow_bits_per_dim(model, images, test.levels, generator).mean()  # noqa: E731
            return {"test_bits_per_dim": _image_eval(test, settings.device, score)}

    def write_samples(self, model, train, config, settings, generator):
        images = model.sample(SAMPLE_GRID, temperature=0.8, generator=generator) + 0.5
        pictures.save_image_grid(images, settings.out / "samples.png",
                                 f"{self.name} samples (temperature 0.8)")
        # Rows: the same latents scaled by each temperature (the generator restarts from one state per row).
        start = generator.get_state()
        rows = []
        for temperature in TEMPERATURES:
            generator.set_state(start)
            rows.append(model.sample(INTERPOLATION_STEPS, temperature=temperature, generator=generator) + 0.5)
        pictures.save_image_grid(torch.cat(rows), settings.out / "temperatures.png",
                                 f"{self.name}: temperatures {', '.join(map(str, TEMPERATURES))} (rows)",
                                 columns=INTERPOLATION_STEPS)


class RealNVPFamily(_FlowFamily):
    name = "realnvp"
    steps, quick_steps, lr = 3000, 20, 1e-3
    options = (Option("num_scales", 2, "scales (H and W divisible by 2**(num_scales - 1))"),
               Option("hidden_channels", 32, "width of the coupling networks"))

    def build(self, config, train):
        return RealNVP(train.shape, config["num_scales"], config["hidden_channels"])


class GlowFamily(_FlowFamily):
    name = "glow"
    steps, quick_steps, lr = 3000, 20, 1e-3
    options = (Option("num_levels", 2, "levels (H and W divisible by 2**num_levels)"),
               Option("depth", 4, "flow steps per level"),
               Option("hidden_channels", 32, "width of the coupling networks"))

    def build(self, config, train):
        return Glow(train.shape, config["num_levels"], config["depth"], config["hidden_channels"],
                    generator=torch.Generator().manual_seed(config["seed"]))


# ----------------------------------------------------------------------------------------------------------------
# DDPM
# ----------------------------------------------------------------------------------------------------------------
class _DDPMObjective(Objective):
    def __init__(self, model: DDPM, levels: int):
        super().__init__()
        self.model, self.levels = model, levels

    def forward(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.model.loss(signed_images(batch, self.levels), generator=generator)


class DDPMFamily(Family):
    name, kind = "ddpm", "images"
    steps, quick_steps, batch_size, lr = 2000, 20, 64, 1e-3
    options = (Option("base_channels", 32, "width of the U-Net's first level"),
               Option("num_res_blocks", 1, "residual blocks per level"),
               Option("ema_decay", 0.995, "decay of the exponential moving average of the weights"),
               Option("sample_steps", 50, "DDIM steps when sampling", quick=10, training=False))
    supports_fsdp = False
    fsdp_refusal = ("ddpm keeps an exponential moving average of its whole weights on every process; it trains "
                    "data-parallel with DDP (drop --fsdp)")

    def build(self, config, train):
        channels, height, width = train.shape
        if height != width:
            raise train_data.DataError(f"ddpm needs square images; {train.source} holds {height}x{width}")
        base = config["base_channels"]
        unet = UNet(channels, base_channels=base, channel_mult=(1, 2), num_res_blocks=config["num_res_blocks"],
                    attention_resolutions=(height // 2,), dropout=0.0, num_groups=min(8, base),
                    num_head_channels=min(2 * base, 64), image_size=height)
        return DDPM(unet)

    def objectives(self, model, train):
        return [("model", _DDPMObjective(model, train.levels))]

    def uses_ema(self):
        return True

    def evaluate(self, model, test, config, settings, generator):
        model.eval()
        with torch.no_grad():
            score = lambda images: model.loss(signed_images(images, test.levels), generator=generator)  # noqa: E731
            return {"test_denoising_mse": _image_eval(test, settings.device, score)}

    def write_samples(self, model, train, config, settings, generator):
        images = model.sample(SAMPLE_GRID, config["sample_steps"], sampler="ddim", generator=generator,
                              progress=False)
        pictures.save_image_grid((images + 1) / 2, settings.out / "samples.png",
                                 f"DDPM samples (EMA weights, DDIM {config['sample_steps']} steps)")


# ----------------------------------------------------------------------------------------------------------------
# GPT
# ----------------------------------------------------------------------------------------------------------------
class _GPTObjective(Objective):
    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.model(batch[:, :-1], batch[:, 1:])[1]


class GPTFamily(Family):
    name, kind = "gpt", "text"
    steps, quick_steps, batch_size, lr = 3000, 20, 32, 1e-3
    options = (Option("block_size", 64, "context length in characters", quick=32),
               Option("n_layer", 2, "Transformer blocks"),
               Option("n_head", 2, "attention heads"),
               Option("n_embd", 64, "width"),
               Option("sample_chars", 1000, "characters to generate for samples.txt", quick=100, training=False),
               Option("eval_windows", 256, "held-out windows scored", quick=16, training=False))

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

    def evaluate(self, model, test, config, settings, generator):
        starts = torch.arange(0, len(test), test.window)[:config["eval_windows"]]
        values = []
        with torch.no_grad():
            for index in train_data.evaluation_batches(starts.shape[0], 64):
                windows = test.batch(starts[index]).to(settings.device)
                values.append((float(model(windows[:, :-1], windows[:, 1:])[1]), len(index)))
        return {"test_bits_per_char": train_data.mean_over_batches(values) / LN2}

    def write_samples(self, model, train, config, settings, generator):
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

    def evaluate(self, model, test, config, settings, generator):
        with torch.no_grad():
            values = [(float(model.loss(test.segments[index].to(settings.device))), len(index))
                      for index in train_data.evaluation_batches(len(test), 16)]
        return {"test_bits_per_sample": train_data.mean_over_batches(values) / LN2}

    def write_samples(self, model, train, config, settings, generator):
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
