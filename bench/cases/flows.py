"""Normalizing-flow cases: the fused affine coupling op, and RealNVP / Glow training and sampling throughput.

``flows.affine_coupling`` (forward): reads ``x``, ``log_scale``, ``shift`` and writes ``y`` once each, plus the
fp32 per-sample ``logdet``:  ``bytes = 4 * numel * element_size + 4 * batch``.

``flows.affine_coupling_fwd_bwd``: the forward above, then the backward from gradients of ``y`` and ``logdet``:
reads ``x``, ``log_scale`` and ``grad_y``, writes ``grad_x`` and ``grad_log_scale`` (``grad_shift`` is ``grad_y``
itself in the forward direction) and reads ``grad_logdet``:
``bytes = (4 + 5) * numel * element_size + (4 + 4) * batch``.
The provider output is ``y`` (forward) or ``grad_log_scale`` (fwd+bwd), checked against the fp64 reference.

``flows.<model>.train``: one training step (bits/dim of a dequantized 8-bit batch, backward, Adam step);
``flows.<model>.sample``: ``model.sample(batch)`` (latents drawn, then the inverse flow); ``items`` = images.
Providers: ``eager`` and ``triton`` run one model under :func:`~genkernels.kernels.use_impl`; ``compile`` is
``torch.compile`` of the model's ``bits_per_dim`` / ``sample`` under ``use_impl("eager")``.
"""
from __future__ import annotations

import torch

from genkernels.kernels import use_impl
from genkernels.kernels.coupling import affine_coupling, affine_coupling_reference
from genkernels.models.glow import Glow
from genkernels.models.realnvp import RealNVP

from ..providers import torch_compile, training_step
from ..registry import Case, Workload, case_builder, seeded_generator

# Glow-sized coupling activations, batch 64: the changed half of a 96-channel 32x32 and of a 48-channel 64x64
# level (3.1M and 6.3M elements).
OP_SHAPES = {
    "cpu": [(2, 6, 8, 8)],
    "quick": [(64, 48, 32, 32)],
    "full": [(64, 48, 32, 32), (64, 24, 64, 64)],
}
OP_DTYPES = {"cpu": [torch.float32], "quick": [torch.float32], "full": [torch.float32, torch.bfloat16]}
OP_SCALE_FNS = {"cpu": ["sigmoid"], "quick": ["sigmoid"], "full": ["sigmoid", "exp"]}

# (name, constructor, batch) on CIFAR-sized images at "quick"/"full".
MODELS = {
    "cpu": [("realnvp-tiny", lambda: RealNVP((3, 8, 8), num_scales=2, hidden_channels=8), 4),
            ("glow-tiny", lambda: Glow((3, 8, 8), num_levels=2, depth=2, hidden_channels=8), 4)],
    "quick": [("realnvp-cifar", lambda: RealNVP((3, 32, 32), num_scales=3, hidden_channels=64), 64),
              ("glow-cifar-k8", lambda: Glow((3, 32, 32), num_levels=3, depth=8, hidden_channels=256), 64)],
    "full": [("realnvp-cifar", lambda: RealNVP((3, 32, 32), num_scales=3, hidden_channels=64), 64),
             ("glow-cifar-k32", lambda: Glow((3, 32, 32), num_levels=3, depth=32, hidden_channels=512), 64)],
}


def _op_inputs(shape, dtype, device):
    generator = seeded_generator(device, 0)
    return [torch.randn(shape, generator=generator, device=device).to(dtype) for _ in range(4)]


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _coupling_forward(shape, dtype, scale_fn):
    def setup(device):
        x, log_scale, shift, _ = _op_inputs(shape, dtype, device)
        compiled = torch_compile(lambda *args: affine_coupling(*args, scale_fn=scale_fn, impl="eager")[0])

        def run(impl):
            return lambda: affine_coupling(x, log_scale, shift, scale_fn=scale_fn, impl=impl)[0]

        def reference():
            return affine_coupling_reference(x.double(), log_scale.double(), shift.double(), scale_fn)[0]

        return Workload({"eager": run("eager"), "triton": run("triton"),
                         "compile": lambda: compiled(x, log_scale, shift)},
                        bytes_moved=4 * x.numel() * x.element_size() + 4 * shape[0], reference=reference,
                        notes=f"scale_fn={scale_fn}, forward direction")
    return setup


def _coupling_forward_backward(shape, dtype, scale_fn):
    def setup(device):
        x, log_scale, shift, grad_y = (t.requires_grad_() for t in _op_inputs(shape, dtype, device))
        grad_y = grad_y.detach()
        grad_logdet = torch.randn(shape[0], device=device)
        compiled = torch_compile(lambda *args: affine_coupling(*args, scale_fn=scale_fn, impl="eager"))

        def grad_log_scale(forward):
            y, logdet = forward(x, log_scale, shift)
            return torch.autograd.grad((y, logdet), log_scale, (grad_y, grad_logdet))[0]

        def run(impl):
            return lambda: grad_log_scale(lambda *args: affine_coupling(*args, scale_fn=scale_fn, impl=impl))

        def reference():
            inputs = [t.detach().double().requires_grad_() for t in (x, log_scale, shift)]
            y, logdet = affine_coupling_reference(*inputs, scale_fn)
            return torch.autograd.grad((y, logdet), inputs[1], (grad_y.double(), grad_logdet.double()))[0]

        return Workload({"eager": run("eager"), "triton": run("triton"), "compile": lambda: grad_log_scale(compiled)},
                        bytes_moved=9 * x.numel() * x.element_size() + 8 * shape[0], reference=reference,
                        notes=f"scale_fn={scale_fn}, forward + backward from grads of y and logdet")
    return setup


def _initialized_model(factory, batch, device):
    torch.manual_seed(0)
    model = factory().to(device)
    images = torch.randint(0, 256, (batch,) + model.image_shape, device=device)
    with use_impl("eager"), torch.no_grad():
        model.bits_per_dim(images)  # data-dependent ActNorm initialization, outside the timed calls
    return model, images


def _train(factory, batch):
    def setup(device):
        model, images = _initialized_model(factory, batch, device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        compiled = torch_compile(model.bits_per_dim)

        providers = {"eager": training_step(lambda: model.bits_per_dim(images).mean(), optimizer, "eager"),
                     "triton": training_step(lambda: model.bits_per_dim(images).mean(), optimizer, "triton"),
                     "compile": training_step(lambda: compiled(images).mean(), optimizer, "eager")}
        return Workload(providers, items=(batch, "images"),
                        notes="bits/dim with uniform dequantization, backward, Adam step, fp32; the loss drifts "
                              "as the weights train, so no error column")
    return setup


def _sample(factory, batch):
    def setup(device):
        model, _ = _initialized_model(factory, batch, device)
        model.eval()
        compiled = torch_compile(model.sample)

        def run(sample_fn, impl):
            def call():
                with use_impl(impl):
                    return sample_fn(batch, 0.7)
            return call

        providers = {"eager": run(model.sample, "eager"), "triton": run(model.sample, "triton"),
                     "compile": run(compiled, "eager")}
        return Workload(providers, items=(batch, "images"),
                        notes="temperature 0.7, fp32; random latents, so no error column")
    return setup


@case_builder
def flow_cases(size: str):
    for dtype in OP_DTYPES[size]:
        for shape in OP_SHAPES[size]:
            for scale_fn in OP_SCALE_FNS[size]:
                params = {"shape": list(shape), "dtype": _dtype_name(dtype), "scale_fn": scale_fn}
                tag = f"[{params['dtype']},{scale_fn},{'x'.join(map(str, shape))}]"
                yield Case(f"flows.affine_coupling{tag}", "flows", "op", params,
                           _coupling_forward(shape, dtype, scale_fn))
                yield Case(f"flows.affine_coupling_fwd_bwd{tag}", "flows", "op", params,
                           _coupling_forward_backward(shape, dtype, scale_fn))
    for name, factory, batch in MODELS[size]:
        params = {"model": name, "batch": batch}
        yield Case(f"flows.{name}.train[b{batch}]", "flows", "train", params, _train(factory, batch))
        yield Case(f"flows.{name}.sample[b{batch}]", "flows", "sample", params, _sample(factory, batch))
