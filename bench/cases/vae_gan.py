"""VAE and DCGAN model cases: training throughput and sampling throughput, eager vs triton vs torch.compile.

Case names: ``vae_gan.<model>.<what>[<dtype>,<channels>x<side>x<side>,b<batch>]``.

* ``vae.train``: one optimizer step (``VAE.loss`` forward, backward, Adam step) on a batch of images in [0, 1].
* ``vae.sample``: ``VAE.sample(batch)`` (decoder only).
* ``dcgan.train_step``: one ``DCGAN.train_step`` (a discriminator update and a generator update, Adam, non-saturating
  loss); ``dcgan.train_step_r1`` adds the R1 penalty on every step (double backward through the discriminator).
* ``dcgan.sample``: ``DCGAN.sample(batch)`` in eval mode (generator only, truncation 1.0).

Throughput is ``items = (batch, "images")`` per call: images/s. Providers: ``eager`` and ``triton`` run the same
weights under :func:`use_impl`; ``compile`` runs the eager model through ``torch.compile`` (the VAE's loss, the
DCGAN's generator and discriminator; with R1 only the generator, as compiled graphs have no double backward).
Every provider starts from a copy of the same model and optimizer. Training is stateful, so there is no reference
output and no error column. "bf16" runs under ``torch.autocast(bfloat16)`` with fp32 weights.
"""
from __future__ import annotations

import contextlib
import copy

import torch

from genkernels.kernels import use_impl
from genkernels.models.dcgan import DCGAN
from genkernels.models.vae import VAE

from ..providers import torch_compile
from ..registry import Case, Workload, case_builder

# (channels, image side, batch) per size; "cpu" sizes are for a smoke run in Triton's interpreter.
VAE_SHAPES = {"cpu": [(1, 16, 4)], "quick": [(3, 64, 128)], "full": [(1, 28, 256), (3, 64, 128)]}
GAN_SHAPES = {"cpu": [(3, 16, 4)], "quick": [(3, 64, 128)], "full": [(3, 32, 128), (3, 64, 128)]}
DTYPES = {"cpu": ["fp32"], "quick": ["bf16"], "full": ["fp32", "bf16"]}
VAE_OPTIONS = {"cpu": dict(latent_dim=4, hidden_channels=(4, 8)), "quick": dict(latent_dim=128),
               "full": dict(latent_dim=128)}
GAN_OPTIONS = {"cpu": dict(latent_dim=8, base_channels=4), "quick": dict(latent_dim=100, base_channels=64),
               "full": dict(latent_dim=100, base_channels=64)}


def _precision(dtype: str, device: torch.device):
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _providers(step_for, dtype: str, device: torch.device) -> dict:
    """``step_for(compiled)`` -> a zero-argument step on a fresh copy of the model; one copy per provider."""
    def run(step, impl):
        def call():
            with use_impl(impl), _precision(dtype, device):
                return step()
        return call

    return {"eager": run(step_for(False), "eager"), "triton": run(step_for(False), "triton"),
            "compile": run(step_for(True), "eager")}


def _vae_train(channels, side, batch, dtype, size):
    def setup(device):
        torch.manual_seed(0)
        model = VAE(channels=channels, image_size=side, **VAE_OPTIONS[size]).to(device)
        images = torch.rand(batch, channels, side, side, device=device)

        def step_for(compiled):
            replica = copy.deepcopy(model)
            optimizer = torch.optim.Adam(replica.parameters(), lr=1e-3)
            loss_fn = torch_compile(replica.loss) if compiled else replica.loss

            def step():
                loss = loss_fn(images).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                return loss.detach()
            return step

        return Workload(_providers(step_for, dtype, device), items=(batch, "images"),
                        notes="forward + backward + Adam step, Bernoulli likelihood, noise drawn per step")
    return setup


def _vae_sample(channels, side, batch, dtype, size):
    def setup(device):
        torch.manual_seed(0)
        model = VAE(channels=channels, image_size=side, **VAE_OPTIONS[size]).to(device)

        def step_for(compiled):
            replica = copy.deepcopy(model)
            sample = torch_compile(replica.sample) if compiled else replica.sample
            return lambda: sample(batch)

        return Workload(_providers(step_for, dtype, device), items=(batch, "images"),
                        notes="decode z ~ N(0, I) to Bernoulli means")
    return setup


def _gan_train(channels, side, batch, dtype, size, r1: bool):
    def setup(device):
        torch.manual_seed(0)
        model = DCGAN(channels=channels, image_size=side, r1_gamma=1.0 if r1 else 0.0,
                      **GAN_OPTIONS[size]).to(device)
        real = torch.rand(batch, channels, side, side, device=device) * 2 - 1

        def step_for(compiled):
            replica = copy.deepcopy(model)
            opt_g = torch.optim.Adam(replica.generator.parameters(), lr=2e-4, betas=(0.5, 0.999))
            opt_d = torch.optim.Adam(replica.discriminator.parameters(), lr=2e-4, betas=(0.5, 0.999))
            if compiled:
                replica.generator = torch_compile(replica.generator)
                if not r1:
                    replica.discriminator = torch_compile(replica.discriminator)
            return lambda: replica.train_step(real, opt_g, opt_d).d_loss

        note = "R1 (gamma 1) on every discriminator step" if r1 else "no R1"
        if r1:
            note += "; compile: generator only (compiled graphs have no double backward)"
        return Workload(_providers(step_for, dtype, device), items=(batch, "images"),
                        notes=f"one D + one G Adam update, non-saturating loss, {note}")
    return setup


def _gan_sample(channels, side, batch, dtype, size):
    def setup(device):
        torch.manual_seed(0)
        model = DCGAN(channels=channels, image_size=side, **GAN_OPTIONS[size]).to(device).eval()

        def step_for(compiled):
            replica = copy.deepcopy(model)
            if compiled:
                replica.generator = torch_compile(replica.generator)
            return lambda: replica.sample(batch)

        return Workload(_providers(step_for, dtype, device), items=(batch, "images"),
                        notes="eval mode, truncation 1.0 (resampled)")
    return setup


@case_builder
def vae_gan_cases(size: str):
    for dtype in DTYPES[size]:
        for channels, side, batch in VAE_SHAPES[size]:
            params = {"channels": channels, "image_size": side, "batch": batch, "dtype": dtype}
            tag = f"[{dtype},{channels}x{side}x{side},b{batch}]"
            yield Case(f"vae_gan.vae.train{tag}", "vae_gan", "train", params,
                       _vae_train(channels, side, batch, dtype, size))
            yield Case(f"vae_gan.vae.sample{tag}", "vae_gan", "sample", params,
                       _vae_sample(channels, side, batch, dtype, size))
        for channels, side, batch in GAN_SHAPES[size]:
            params = {"channels": channels, "image_size": side, "batch": batch, "dtype": dtype}
            tag = f"[{dtype},{channels}x{side}x{side},b{batch}]"
            yield Case(f"vae_gan.dcgan.train_step{tag}", "vae_gan", "train", params,
                       _gan_train(channels, side, batch, dtype, size, r1=False))
            yield Case(f"vae_gan.dcgan.train_step_r1{tag}", "vae_gan", "train", params,
                       _gan_train(channels, side, batch, dtype, size, r1=True))
            yield Case(f"vae_gan.dcgan.sample{tag}", "vae_gan", "sample", params,
                       _gan_sample(channels, side, batch, dtype, size))
