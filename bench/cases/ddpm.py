"""DDPM U-Net cases: training throughput and sampling throughput (DDPM and DDIM loops), per provider.

* ``diffusion.unet_train[<model>,b<batch>]``: one training step: ``DDPM.loss`` (timesteps drawn on the device; the
  noise drawn inside the fused kernels from one seed for ``triton``, by ``torch.randn`` and passed in for the
  others, as plain PyTorch does), backward, Adam step. bf16 autocast with fp32 weights on the
  GPU, fp32 on the CPU. Providers: ``eager`` and ``triton`` run the same model under
  :func:`~genkernels.kernels.use_impl`; ``compile`` is ``torch.compile`` of ``DDPM.loss`` under the eager impl.
  ``items`` = ``batch`` images per step.
* ``diffusion.unet_sample[<sampler><steps>,<model>,n<n>]``: ``DDPM.sample(n, steps)`` from a fixed starting noise
  (DDPM ancestral, or deterministic DDIM with ``eta = 0``), bf16 weights on the GPU. Providers: ``eager`` (the loop
  on the eager references), ``triton`` (fused GroupNorm+SiLU, attention and denoise step), ``triton_cuda_graph``
  (the same, one step captured as a CUDA graph and replayed; GPU only) and ``compile`` (``torch.compile`` of the
  U-Net's network, ``UNet.predict``, under the eager impl; the step on its eager reference). ``items`` = ``n``
  images per call. DDIM rows have an error column against the eager loop in fp32 (same noise); DDPM rows are
  random, so they have none.

No FLOP or byte counts: the throughput is the images/s column.
"""
from __future__ import annotations

import contextlib
import copy

import torch

from genkernels.kernels import NoiseSchedule, use_impl
from genkernels.models.ddpm import DDPM
from genkernels.models.unet import UNet

from ..providers import torch_compile
from ..registry import Case, Workload, case_builder

TINY = dict(in_channels=3, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
            dropout=0.0, num_groups=4, num_head_channels=16, image_size=8)
# Ho et al. 2020's CIFAR-10 model (35.7M parameters).
CIFAR10 = dict(in_channels=3, base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
               attention_resolutions=(16,), dropout=0.1, image_size=32)
# A 64x64 model: the channel multipliers of Ho et al.'s 256x256 models, (1, 1, 2, 2, 4, 4), less the last level.
CELEBA64 = dict(in_channels=3, base_channels=128, channel_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                attention_resolutions=(16,), dropout=0.0, image_size=64)
MODELS = {"tiny": TINY, "cifar10-32": CIFAR10, "64x64": CELEBA64}

# (model, batch) per size
TRAIN = {"cpu": [("tiny", 2)], "quick": [("cifar10-32", 128)], "full": [("cifar10-32", 128), ("64x64", 64)]}
# (model, sampler, steps, n) per size; DDPM 1000 steps keeps few images in "quick" to bound the time per provider
SAMPLE = {
    "cpu": [("tiny", "ddpm", 3, 2), ("tiny", "ddim", 2, 2)],
    "quick": [("cifar10-32", "ddpm", 1000, 16), ("cifar10-32", "ddim", 50, 64)],
    "full": [("cifar10-32", "ddpm", 1000, 64), ("cifar10-32", "ddim", 50, 64), ("cifar10-32", "ddim", 50, 256)],
}


def _ddpm(model: str, device: torch.device) -> DDPM:
    torch.manual_seed(0)
    ddpm = DDPM(UNet(**MODELS[model]), NoiseSchedule.linear()).to(device)
    # the schedule caches its kernel table per device on first use: filled here, a compiled provider's first call
    # does not change what its guards saw (which made every compile provider compile twice)
    if device.type != "meta":
        ddpm.schedule.kernel_table(device)
    return ddpm


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _train(model_name: str, batch: int):
    def setup(device):
        model = _ddpm(model_name, device)
        side = model.unet.image_size
        images = torch.rand(batch, 3, side, side, device=device) * 2 - 1

        def step_for(impl: str, compiled: bool):
            replica = copy.deepcopy(model)
            optimizer = torch.optim.Adam(replica.parameters(), lr=2e-4, fused=device.type == "cuda")
            loss_fn = torch_compile(replica.loss) if compiled else replica.loss

            def step():
                # plain PyTorch (eager, compile) draws the noise with torch.randn and reads it twice; the fused
                # path draws it inside q_sample's kernel and regenerates it in the loss's
                noise = {} if impl == "triton" else {"noise": torch.randn_like(images)}
                with use_impl(impl), _autocast(device):
                    loss = loss_fn(images, **noise)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                return loss.detach()
            return step

        precision = "bf16 autocast, fp32 weights" if device.type == "cuda" else "fp32"
        providers = {"eager": step_for("eager", False), "triton": step_for("triton", False),
                     "compile": step_for("eager", True)}
        return Workload(providers, items=(batch, "images"),
                        notes=f"DDPM.loss + backward + Adam, {precision}; weights train, so no error column")
    return setup


def _sample(model_name: str, sampler: str, steps: int, n: int):
    def setup(device):
        model = _ddpm(model_name, device).eval()
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        side = model.unet.image_size
        noise = torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(1)).to(device)
        options = dict(sampler=sampler, progress=False)
        if sampler == "ddim":
            options["noise"] = noise  # a deterministic loop: every provider denoises the same start
        fast_options = {**options, "noise": noise.to(dtype)} if sampler == "ddim" else options
        fast = copy.deepcopy(model).to(dtype)
        compiled = copy.deepcopy(fast)
        # forward() turns the loop's integer timestep into a tensor, then calls predict(): compiling predict keeps
        # the graph free of Python numbers (one compilation for every timestep)
        compiled.unet.predict = torch_compile(compiled.unet.predict)

        def run(ddpm: DDPM, impl: str, cuda_graph: bool = False):
            def call():
                with use_impl(impl):
                    return ddpm.sample(n, steps, cuda_graph=cuda_graph, **fast_options)
            return call

        providers = {"eager": run(fast, "eager"), "triton": run(fast, "triton")}
        if device.type == "cuda":
            providers["triton_cuda_graph"] = run(fast, "triton", cuda_graph=True)
        providers["compile"] = run(compiled, "eager")
        reference = _eager_loop(model, n, steps, options) if sampler == "ddim" else None
        precision = str(dtype).replace("torch.", "")
        return Workload(providers, items=(n, "images"), reference=reference,
                        notes=f"{sampler} {steps} steps, {precision} weights"
                              + (", eta 0, error vs the fp32 eager loop" if sampler == "ddim" else ", random"))
    return setup


def _eager_loop(model: DDPM, n: int, steps: int, options: dict):
    """The deterministic loop on the eager references in the model's fp32 weights: the error column's reference."""
    def reference():
        with use_impl("eager"):
            return model.sample(n, steps, **options)
    return reference


@case_builder
def ddpm_cases(size: str):
    for model, batch in TRAIN[size]:
        params = {"model": model, "batch": batch}
        yield Case(f"diffusion.unet_train[{model},b{batch}]", "diffusion", "train", params, _train(model, batch))
    for model, sampler, steps, n in SAMPLE[size]:
        params = {"model": model, "sampler": sampler, "steps": steps, "n": n}
        yield Case(f"diffusion.unet_sample[{sampler}{steps},{model},n{n}]", "diffusion", "sample", params,
                   _sample(model, sampler, steps, n))
