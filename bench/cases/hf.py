"""Hugging Face model cases: a diffusers ``UNet2DModel`` in google/ddpm-cifar10-32's configuration and a
transformers GPT-2 small (``GPT2LMHeadModel(GPT2Config())``, 124M), trained and sampled, unpatched vs patched vs
torch.compile.

* ``hf.unet_train[<model>,b<batch>]``: one step of DDPM's epsilon-prediction training: timesteps drawn uniformly
  in ``[0, 1000)``, the images noised by :meth:`~genkernels.models.schedulers.DDPMScheduler.add_noise` (linear
  betas, the checkpoint's schedule), the MSE between the U-Net's output and the noise, backward, AdamW step;
  ``items`` = ``batch`` images.
* ``hf.unet_sample[ddim<steps>,<model>,n<n>]``: a deterministic DDIM loop (``eta = 0``) with genkernels'
  :class:`~genkernels.models.schedulers.DDIMScheduler` (its fused step under ``triton``) from a fixed starting
  noise, bf16 weights on the GPU; ``items`` = ``n`` images. Error column: the same loop on the unpatched fp32 model
  under the eager impl.
* ``hf.gpt2_train[<model>,b<batch>,s<seq>]``: one step of the LM loss of ``model(ids, labels=ids)``, backward,
  AdamW; ``items`` = ``batch * seq`` tokens, ``flops`` the model-FLOPs count of ``gpt.train`` (bench/cases/gpt.py).
  ``gpt2`` keeps ``GPT2Config()``'s dropout of 0.1: the patched attention runs
  :func:`~genkernels.kernels.scaled_dot_product_attention` with its dropout drawn in the kernels;
  ``gpt2-nodropout`` (full size) turns dropout off, as nanoGPT pretrains: the patched attention runs
  :func:`~genkernels.kernels.flash_attention`.
* ``hf.gpt2_generate[<model>,b<batch>,p<prompt>,n<new>]``: greedy ``generate`` of exactly ``new`` tokens
  (``min_new_tokens``: EOS cannot end it early) with transformers' KV cache, bf16 weights on the GPU; ``items`` =
  ``batch * new`` generated tokens. No error column (the output is token ids).

Training runs under bf16 autocast with fp32 weights on the GPU, fp32 on the CPU; each provider trains its own copy
of the same initial weights, and as the weights train the losses drift apart, so training has no error column.

Providers: ``eager`` is the unpatched model, ``triton`` a copy of the same weights after
:func:`genkernels.models.integrations.patch` run under ``use_impl("triton")``, ``compile`` ``torch.compile`` of the
unpatched model. diffusers and transformers are imported inside the setups only; the cases of a library that is
not installed are not registered.
"""
from __future__ import annotations

import copy
import importlib.util

import torch
import torch.nn.functional as F

from genkernels.kernels import use_impl
from genkernels.models.integrations import patch
from genkernels.models.schedulers import DDIMScheduler, DDPMScheduler

from ..providers import torch_compile, training_step
from ..registry import Case, Workload, case_builder, seeded_generator
from .gpt import _autocast, _tokens, _training_flops

# google/ddpm-cifar10-32's UNet2DModel configuration: Ho et al. 2020's CIFAR-10 model (35.7M parameters).
DDPM_CIFAR10 = dict(
    sample_size=32, in_channels=3, out_channels=3, center_input_sample=False, time_embedding_type="positional",
    freq_shift=1, flip_sin_to_cos=False, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), mid_block_scale_factor=1,
    downsample_padding=0, act_fn="silu", attention_head_dim=None, norm_num_groups=32, norm_eps=1e-6)
UNETS = {
    "tiny": dict(DDPM_CIFAR10, sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                 norm_num_groups=4),
    "ddpm-cifar10-32": DDPM_CIFAR10,
}
# GPT2Config() overrides: none for GPT-2 small (12 layers, 12 heads, width 768, 1024 positions, dropout 0.1)
GPT2S = {
    "tiny": dict(n_embd=32, n_head=2, n_layer=2, vocab_size=64, n_positions=32, bos_token_id=63, eos_token_id=63),
    "gpt2": {},
    "gpt2-nodropout": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
}

UNET_TRAIN = {"cpu": [("tiny", 2)], "quick": [("ddpm-cifar10-32", 64)], "full": [("ddpm-cifar10-32", 64)]}
# (model, DDIM steps, images)
UNET_SAMPLE = {"cpu": [("tiny", 2, 2)], "quick": [("ddpm-cifar10-32", 10, 64)],
               "full": [("ddpm-cifar10-32", 10, 64)]}
# (model, batch, seq)
GPT2_TRAIN = {"cpu": [("tiny", 2, 16)], "quick": [("gpt2", 8, 1024)],
              "full": [("gpt2", 8, 1024), ("gpt2-nodropout", 8, 1024)]}
# (model, batch, prompt, new tokens)
GPT2_GENERATE = {"cpu": [("tiny", 2, 4, 4)], "quick": [("gpt2", 8, 128, 128)], "full": [("gpt2", 8, 128, 128)]}


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _unet(name: str, device: torch.device):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    with torch.device(device):
        return UNet2DModel(**UNETS[name])


def _gpt2(name: str, device: torch.device):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    with torch.device(device):
        model = GPT2LMHeadModel(GPT2Config(**GPT2S[name]))
    # the causal-LM loss named, not looked up: the lookup's warning is a graph break inside a compiled forward
    model.loss_type = "ForCausalLM"
    return model


def _sampling_dtype(device: torch.device) -> torch.dtype:
    """The weights' dtype of sampling: bf16 on a GPU and on meta tensors (whose launch capture stands for a GPU
    run), fp32 on the CPU."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def _precision(device: torch.device) -> str:
    return "bf16 autocast, fp32 weights" if device.type == "cuda" else "fp32"


def _training_providers(model: torch.nn.Module, device: torch.device, loss_of) -> dict:
    """``eager``, ``triton`` and ``compile`` training steps, each on its own copy of ``model`` (the same weights)
    with its own AdamW; ``loss_of(forward)`` computes the step's loss with ``forward`` (the copy, or its compiled
    form)."""
    copies = {"eager": copy.deepcopy(model), "triton": patch(copy.deepcopy(model)), "compile": copy.deepcopy(model)}
    providers = {}
    for name, module in copies.items():
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=device.type == "cuda")
        forward = torch_compile(module) if name == "compile" else module
        providers[name] = training_step(loss_of(forward), optimizer, "triton" if name == "triton" else "eager")
    return providers


def _unet_train(name: str, batch: int):
    def setup(device):
        model = _unet(name, device).train()
        side = model.config.sample_size
        images = torch.rand(batch, 3, side, side, generator=seeded_generator(device, 1), device=device) * 2 - 1
        scheduler = DDPMScheduler()

        def loss_of(forward):
            def compute():
                noise = torch.randn_like(images)
                timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device)
                noisy = scheduler.add_noise(images, noise, timesteps)
                with _autocast(device):
                    prediction = forward(noisy, timesteps).sample
                return F.mse_loss(prediction.float(), noise)
            return compute

        return Workload(_training_providers(model, device, loss_of), items=(batch, "images"),
                        notes=f"epsilon MSE + backward + AdamW, {_precision(device)}; weights train, so no error "
                              "column")
    return setup


def _ddim_loop(unet, scheduler: DDIMScheduler, noise: torch.Tensor, impl: str):
    """A call running ``scheduler``'s deterministic DDIM loop (eta 0) on ``unet`` from ``noise`` under ``impl``."""
    def call():
        sample = noise
        with use_impl(impl), torch.no_grad():
            for t in scheduler.timesteps:
                sample = scheduler.step(unet(sample, t).sample, t, sample).prev_sample
        return sample
    return call


def _unet_sample(name: str, steps: int, n: int):
    def setup(device):
        dtype = _sampling_dtype(device)
        model = _unet(name, device).eval()
        side = model.config.sample_size
        noise = torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(1)).to(device)
        scheduler = DDIMScheduler()  # linear betas over 1000 steps: google/ddpm-cifar10-32's schedule
        scheduler.set_timesteps(steps, device=device)
        fast = copy.deepcopy(model).to(dtype)
        start = noise.to(dtype)
        providers = {"eager": _ddim_loop(fast, scheduler, start, "eager"),
                     "triton": _ddim_loop(patch(copy.deepcopy(fast)), scheduler, start, "triton"),
                     "compile": _ddim_loop(torch_compile(fast), scheduler, start, "eager")}
        return Workload(providers, items=(n, "images"), reference=_ddim_loop(model, scheduler, noise, "eager"),
                        notes=f"DDIM {steps} steps, eta 0, {str(dtype).replace('torch.', '')} weights; error vs "
                              "the unpatched fp32 loop")
    return setup


def _gpt2_train(name: str, batch: int, seq: int):
    def setup(device):
        model = _gpt2(name, device).train()
        ids = _tokens((batch, seq), model.config.vocab_size, device, seed=1)

        def loss_of(forward):
            def compute():
                with _autocast(device):
                    return forward(input_ids=ids, labels=ids).loss
            return compute

        attention = (f"dropout {model.config.attn_pdrop}: the patched attention runs scaled_dot_product_attention"
                     if model.config.attn_pdrop > 0 else "no dropout: the patched attention runs flash_attention")
        return Workload(_training_providers(model, device, loss_of), flops=_training_flops(model, batch, seq),
                        items=(batch * seq, "tokens"),
                        notes=f"LM loss + backward + AdamW, {_precision(device)}; {attention}; weights train, so no "
                              "error column")
    return setup


def _gpt2_generate(name: str, batch: int, prompt_len: int, new_tokens: int):
    def setup(device):
        dtype = _sampling_dtype(device)
        model = _gpt2(name, device).to(dtype).eval()
        eos = model.config.eos_token_id
        prompt = _tokens((batch, prompt_len), eos, device, seed=2)  # below EOS, the vocabulary's last token
        padding = torch.ones_like(prompt)  # transformers drops an all-ones mask: the patched attention still applies
        compiled = copy.deepcopy(model)
        compiled.compile(dynamic=True)  # generate() calls self(...), which now runs the compiled forward

        def run(module, impl: str):
            def call():
                with use_impl(impl):
                    return module.generate(prompt, attention_mask=padding, max_new_tokens=new_tokens,
                                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=eos)
            return call

        providers = {"eager": run(model, "eager"), "triton": run(patch(copy.deepcopy(model)), "triton"),
                     "compile": run(compiled, "eager")}
        return Workload(providers, items=(batch * new_tokens, "tokens"),
                        notes=f"greedy, KV cache, {str(dtype).replace('torch.', '')} weights, prompt {prompt_len}")
    return setup


@case_builder
def hf_cases(size: str):
    if _installed("diffusers"):
        for model, batch in UNET_TRAIN[size]:
            yield Case(f"hf.unet_train[{model},b{batch}]", "hf", "train", {"model": model, "batch": batch},
                       _unet_train(model, batch))
        for model, steps, n in UNET_SAMPLE[size]:
            params = {"model": model, "sampler": "ddim", "steps": steps, "n": n}
            yield Case(f"hf.unet_sample[ddim{steps},{model},n{n}]", "hf", "sample", params,
                       _unet_sample(model, steps, n))
    if _installed("transformers"):
        for model, batch, seq in GPT2_TRAIN[size]:
            yield Case(f"hf.gpt2_train[{model},b{batch},s{seq}]", "hf", "train",
                       {"model": model, "batch": batch, "seq": seq}, _gpt2_train(model, batch, seq))
        for model, batch, prompt_len, new_tokens in GPT2_GENERATE[size]:
            params = {"model": model, "batch": batch, "prompt": prompt_len, "new_tokens": new_tokens}
            yield Case(f"hf.gpt2_generate[{model},b{batch},p{prompt_len},n{new_tokens}]", "hf", "sample", params,
                       _gpt2_generate(model, batch, prompt_len, new_tokens))
