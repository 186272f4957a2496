"""VAE and GAN op cases: fused reparameterization + KL, and fused bias + activation, forward and forward+backward.

Traffic per call (``N`` elements, ``e`` bytes each; the per-sample KL and the bias are negligible):
* ``reparameterize_kl`` with noise given: ``mu``, ``logvar``, ``noise`` read, ``z`` written: ``4 N e``.
* ``reparameterize_kl_drawn`` (noise drawn inside the kernel): ``3 N e``.
* ``reparameterize_kl_fwd_bwd`` (drawn noise, gradients from both ``z`` and ``kl``): the forward's ``3 N e``, then
  ``mu``, ``logvar``, ``grad_z`` read and ``grad_mu``, ``grad_logvar`` written: ``8 N e`` in all.
* ``bias_act`` (lrelu): ``x`` read, ``y`` written: ``2 N e``.
* ``bias_act_fwd_bwd``: the forward's ``2 N e``, then ``grad_y`` and ``y`` read and ``grad_x`` written: ``5 N e``
  (the bias gradient, a reduction of ``grad_x`` over everything but the channels, reads ``grad_x`` once more;
  that read is not counted, so it shows up as lost bandwidth).
"""
from __future__ import annotations

import torch

from genkernels.kernels.bias_act import bias_act, bias_act_reference
from genkernels.kernels.reparameterize import reparameterize_kl, reparameterize_kl_reference

from ..providers import eager_triton_compile, eager_triton_compile_backward
from ..registry import Case, Workload, case_builder, seeded_generator

LATENT_SHAPES = {
    "cpu": [(4, 32)],
    "quick": [(256, 512), (64, 4, 64, 64)],
    "full": [(256, 512), (64, 4, 64, 64), (256, 16, 64, 64)],
}
ACTIVATION_SHAPES = {
    "cpu": [(2, 8, 4, 4)],
    "quick": [(64, 512, 32, 32)],
    "full": [(64, 512, 32, 32), (64, 128, 64, 64)],
}
DTYPES = {"cpu": [torch.float32], "quick": [torch.bfloat16, torch.float32],
          "full": [torch.bfloat16, torch.float32]}


def _numel(shape) -> int:
    numel = 1
    for size in shape:
        numel *= size
    return numel


def _label(shape, dtype) -> str:
    return f"[{str(dtype).replace('torch.', '')},{'x'.join(map(str, shape))}]"


def _params(shape, dtype) -> dict:
    return {"shape": list(shape), "dtype": str(dtype).replace("torch.", "")}


def _randn(shape, dtype, device, seed, scale=1.0):
    generator = seeded_generator(device, seed)
    return (torch.randn(shape, generator=generator, device=device) * scale).to(dtype)


def _leaves(*tensors):
    """Copies of ``tensors`` that require grad, for forward + backward providers."""
    return [t.detach().requires_grad_() for t in tensors]


def _first_output(providers: dict) -> dict:
    """Providers that return ``z`` of ``(z, kl)``, so the runner can compare it with the reference."""
    return {name: (lambda fn=fn: fn()[0]) for name, fn in providers.items()}


# ---------------------------------------------------------------------------------------------------------------
# reparameterize_kl
# ---------------------------------------------------------------------------------------------------------------
def _latents(shape, dtype, device):
    return _randn(shape, dtype, device, 0), _randn(shape, dtype, device, 1, scale=0.5)


def _reparameterize_given_noise(shape, dtype):
    def setup(device):
        mu, logvar = _latents(shape, dtype, device)
        noise = _randn(shape, dtype, device, 2)
        return Workload(_first_output(eager_triton_compile(reparameterize_kl, mu, logvar, noise=noise)),
                        bytes_moved=4 * mu.numel() * mu.element_size(),
                        reference=lambda: reparameterize_kl_reference(mu.double(), logvar.double(), noise.double())[0],
                        notes="noise given; error column on z")
    return setup


def _reparameterize_drawn_noise(shape, dtype):
    def setup(device):
        mu, logvar = _latents(shape, dtype, device)
        generator = seeded_generator(device, 3)
        return Workload(eager_triton_compile(reparameterize_kl, mu, logvar, generator=generator),
                        bytes_moved=3 * mu.numel() * mu.element_size(),
                        notes="noise drawn (Philox in the kernel, torch.randn in eager): random outputs, no error "
                              "column")
    return setup


def _reparameterize_fwd_bwd(shape, dtype):
    def setup(device):
        mu, logvar = _latents(shape, dtype, device)
        grads = (_randn(shape, dtype, device, 4), torch.ones(shape[0], device=device))
        generator = seeded_generator(device, 5)
        providers = eager_triton_compile_backward(reparameterize_kl, _leaves(mu, logvar), grads, generator=generator)
        return Workload(providers,
                        bytes_moved=8 * mu.numel() * mu.element_size(),
                        notes="drawn noise, regenerated in the backward; gradients from z and kl")
    return setup


# ---------------------------------------------------------------------------------------------------------------
# bias_act
# ---------------------------------------------------------------------------------------------------------------
def _activations(shape, dtype, device):
    return _randn(shape, dtype, device, 0), _randn(shape[1:2], dtype, device, 1)


def _bias_act_forward(shape, dtype):
    def setup(device):
        x, bias = _activations(shape, dtype, device)
        return Workload(eager_triton_compile(bias_act, x, bias, act="lrelu"),
                        bytes_moved=2 * x.numel() * x.element_size(),
                        reference=lambda: bias_act_reference(x.double(), bias.double(), 1, "lrelu"),
                        notes="lrelu, alpha 0.2, gain sqrt(2)")
    return setup


def _bias_act_fwd_bwd(shape, dtype):
    def setup(device):
        x, bias = _activations(shape, dtype, device)
        grad_y = _randn(shape, dtype, device, 2)
        return Workload(eager_triton_compile_backward(bias_act, _leaves(x, bias), (grad_y,), act="lrelu"),
                        bytes_moved=5 * x.numel() * x.element_size(),
                        notes="lrelu; gradients in x and bias")
    return setup


@case_builder
def vae_gan_op_cases(size: str):
    for dtype in DTYPES[size]:
        for shape in LATENT_SHAPES[size]:
            tag, params = _label(shape, dtype), _params(shape, dtype)
            yield Case(f"vae_gan_ops.reparameterize_kl{tag}", "vae_gan_ops", "op", params,
                       _reparameterize_given_noise(shape, dtype))
            yield Case(f"vae_gan_ops.reparameterize_kl_drawn{tag}", "vae_gan_ops", "op", params,
                       _reparameterize_drawn_noise(shape, dtype))
            yield Case(f"vae_gan_ops.reparameterize_kl_fwd_bwd{tag}", "vae_gan_ops", "op", params,
                       _reparameterize_fwd_bwd(shape, dtype))
        for shape in ACTIVATION_SHAPES[size]:
            tag, params = _label(shape, dtype), _params(shape, dtype)
            yield Case(f"vae_gan_ops.bias_act{tag}", "vae_gan_ops", "op", params, _bias_act_forward(shape, dtype))
            yield Case(f"vae_gan_ops.bias_act_fwd_bwd{tag}", "vae_gan_ops", "op", params,
                       _bias_act_fwd_bwd(shape, dtype))
