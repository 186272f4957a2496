"""WaveNet cases: the causal convolution and the fused residual layer (forward, forward + backward), training
throughput, and sampling throughput (naive, cached eager, cached triton).

FLOP formulas (multiply-adds count 2):
- ``causal_conv1d``: ``2 * batch * C_out * C_in * k * time`` per forward; forward + backward is 3x that (the
  input gradient and the weight gradient are each one more GEMM of the same size).
- ``residual_layer``: ``2 * batch * time * (2D * R * k + R * D + S * D)`` per forward (dilated conv, residual
  and skip projections); forward + backward 3x. The gate's elementwise math is not counted.

Providers: ``eager`` (the fp32-math reference), ``triton``, ``compile`` (``torch.compile`` of the reference) and
the peer ``cudnn``: ``F.conv1d`` on the left-padded input in the input's dtype (for the layer: that convolution,
the gate and two 1x1 ``F.conv1d`` projections, unfused), what a PyTorch WaveNet does.

Model cases: ``wavenet.train`` is one Adam step (forward, cross entropy, backward, step) on ``batch x time`` fp32
samples, ``items`` = audio samples; ``wavenet.sample`` generates ``num_samples`` per sequence from silence,
``items`` = generated audio samples, with providers ``eager`` (naive: the whole network over the last receptive
field per sample, the baseline), ``cached_eager`` (per-layer PyTorch steps) and ``cached_triton`` (one step kernel
per sample), as in the PixelCNN sampling cases. The error column compares each provider's samples (class ids) with
the naive ones: 0 means the same samples.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from genkernels.kernels import use_impl
from genkernels.kernels.causal_conv import causal_conv1d, causal_conv1d_reference
from genkernels.kernels.wavenet import gated_activation, wavenet_residual_layer, wavenet_residual_layer_reference
from genkernels.models.wavenet import WaveNet

from ..providers import (
    eager_triton_compile,
    eager_triton_compile_backward,
    forward_backward,
    torch_compile,
    training_step,
)
from ..registry import Case, Workload, case_builder, seeded_generator

# (batch, C_in, C_out, time, kernel_size, dilation)
CONV_SHAPES = {
    "cpu": [(2, 8, 16, 64, 2, 4)],
    "quick": [(16, 64, 128, 16000, 2, 256)],
    "full": [(16, 64, 128, 16000, 2, 256), (16, 64, 128, 16000, 3, 8), (16, 128, 256, 16000, 2, 1)],
}
# (batch, R, D, S, time, kernel_size, dilation)
LAYER_SHAPES = {
    "cpu": [(2, 8, 8, 16, 64, 2, 4)],
    "quick": [(16, 64, 64, 256, 16000, 2, 256)],
    "full": [(16, 64, 64, 256, 16000, 2, 256), (16, 128, 128, 256, 16000, 2, 16)],
}
DTYPES = {"cpu": [torch.float32], "quick": [torch.bfloat16], "full": [torch.bfloat16, torch.float32]}

TINY_MODEL = dict(residual_channels=8, dilation_channels=8, skip_channels=16, dilations=(1, 2, 4))
# Receptive field 1024 (one stack 1..512) and 3070 (the paper's three stacks)
ONE_STACK = dict(residual_channels=64, dilation_channels=64, skip_channels=256, num_stacks=1, layers_per_stack=10)
THREE_STACKS = dict(ONE_STACK, num_stacks=3)
# (name, config, batch, time) for training; (name, config, batch, num_samples) for sampling
TRAIN = {
    "cpu": [("tiny", TINY_MODEL, 2, 32)],
    "quick": [("3x10", THREE_STACKS, 8, 8000)],
    "full": [("3x10", THREE_STACKS, 8, 8000), ("1x10", ONE_STACK, 16, 16000)],
}
SAMPLE = {
    "cpu": [("tiny", TINY_MODEL, 2, 6)],
    "quick": [("rf1024", ONE_STACK, 16, 2048)],
    "full": [("rf1024", ONE_STACK, 16, 2048), ("rf1024", ONE_STACK, 1, 2048), ("rf3070", THREE_STACKS, 16, 4096)],
}


def _randn(shape, dtype, device, seed, scale=1.0):
    generator = seeded_generator(device, seed)
    return (torch.randn(shape, generator=generator, device=device) * scale).to(dtype)


def _label(dtype) -> str:
    return str(dtype).replace("torch.", "")


# ------------------------------------------------------------------------------------------------------------------
# causal_conv1d
# ------------------------------------------------------------------------------------------------------------------
def _cudnn_causal_conv(x, weight, bias, dilation):
    return F.conv1d(F.pad(x, ((weight.shape[2] - 1) * dilation, 0)), weight, bias, dilation=dilation)


def _conv_tensors(shape, dtype, device, requires_grad):
    batch, c_in, c_out, length, ksize, _ = shape
    tensors = (_randn((batch, c_in, length), dtype, device, 0), _randn((c_out, c_in, ksize), dtype, device, 1,
                                                                      (c_in * ksize) ** -0.5),
               _randn((c_out,), dtype, device, 2))
    return [t.requires_grad_(requires_grad) for t in tensors]


def _conv_flops(shape) -> int:
    batch, c_in, c_out, length, ksize, _ = shape
    return 2 * batch * c_out * c_in * ksize * length


def _conv_forward(shape, dtype):
    def setup(device):
        x, weight, bias = _conv_tensors(shape, dtype, device, False)
        dilation = shape[5]
        providers = eager_triton_compile(causal_conv1d, x, weight, bias, dilation=dilation)
        providers["cudnn"] = lambda: _cudnn_causal_conv(x, weight, bias, dilation)
        return Workload(providers, flops=_conv_flops(shape),
                        reference=lambda: causal_conv1d_reference(x.double(), weight.double(), bias.double(),
                                                                  dilation))
    return setup


def _conv_forward_backward(shape, dtype):
    def setup(device):
        inputs = _conv_tensors(shape, dtype, device, True)
        dilation = shape[5]
        grad_out = _randn((shape[0], shape[2], shape[3]), dtype, device, 3)
        def reference():
            doubles = [t.detach().double().requires_grad_() for t in inputs]
            out = causal_conv1d_reference(*doubles, dilation)
            return torch.autograd.grad(out, doubles, grad_out.double())[0]

        providers = eager_triton_compile_backward(causal_conv1d, inputs, grad_out, dilation=dilation)
        providers["cudnn"] = forward_backward(lambda x, w, b: _cudnn_causal_conv(x, w, b, dilation), inputs, grad_out)
        return Workload(providers, flops=3 * _conv_flops(shape), reference=reference,
                        notes="forward + input, weight and bias gradients; error column = grad_x")
    return setup


# ------------------------------------------------------------------------------------------------------------------
# The fused residual layer
# ------------------------------------------------------------------------------------------------------------------
def _unfused_layer(x, wc, bc, wr, br, ws, bs, dilation):
    """The layer as a PyTorch WaveNet writes it: cuDNN convolutions and the gate, in the input's dtype."""
    z = gated_activation(_cudnn_causal_conv(x, wc, bc, dilation))
    return x + F.conv1d(z, wr[..., None], br), F.conv1d(z, ws[..., None], bs)


def _layer_tensors(shape, dtype, device, requires_grad):
    batch, r, d, s, length, ksize, _ = shape
    shapes = [(batch, r, length), (2 * d, r, ksize), (2 * d,), (r, d), (r,), (s, d), (s,)]
    scales = [1.0, (r * ksize) ** -0.5, 0.1, d**-0.5, 0.1, d**-0.5, 0.1]
    return [_randn(sh, dtype, device, i, sc).requires_grad_(requires_grad)
            for i, (sh, sc) in enumerate(zip(shapes, scales))]


def _layer_flops(shape) -> int:
    batch, r, d, s, length, ksize, _ = shape
    return 2 * batch * length * (2 * d * r * ksize + r * d + s * d)


def _skip_output(provider):
    return lambda: provider()[1]


def _layer_forward(shape, dtype):
    def setup(device):
        tensors = _layer_tensors(shape, dtype, device, False)
        dilation = shape[6]
        providers = eager_triton_compile(wavenet_residual_layer, *tensors, dilation=dilation)
        providers["cudnn"] = lambda: _unfused_layer(*tensors, dilation)
        providers = {name: _skip_output(fn) for name, fn in providers.items()}
        return Workload(providers, flops=_layer_flops(shape),
                        reference=lambda: wavenet_residual_layer_reference(*[t.double() for t in tensors],
                                                                           dilation)[1],
                        notes="error column = skip output")
    return setup


def _layer_forward_backward(shape, dtype):
    def setup(device):
        inputs = _layer_tensors(shape, dtype, device, True)
        batch, r, _, s, length, _, dilation = shape
        grads = (_randn((batch, r, length), dtype, device, 10), _randn((batch, s, length), dtype, device, 11))
        def reference():
            doubles = [t.detach().double().requires_grad_() for t in inputs]
            outputs = wavenet_residual_layer_reference(*doubles, dilation)
            return torch.autograd.grad(outputs, doubles, [g.double() for g in grads])[0]

        providers = eager_triton_compile_backward(wavenet_residual_layer, inputs, grads, dilation=dilation)
        providers["cudnn"] = forward_backward(lambda *t: _unfused_layer(*t, dilation), inputs, grads)
        return Workload(providers, flops=3 * _layer_flops(shape), reference=reference,
                        notes="forward + every gradient; error column = grad_x")
    return setup


# ------------------------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------------------------
def _model(config: dict, device) -> WaveNet:
    torch.manual_seed(0)
    return WaveNet(**config).to(device)


def _train(config: dict, batch: int, length: int):
    def setup(device):
        model = _model(config, device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        compiled = torch_compile(model.loss)
        generator = seeded_generator(device, 1)
        audio = torch.randint(0, 256, (batch, length), generator=generator, device=device)
        providers = {"eager": training_step(lambda: model.loss(audio), optimizer, "eager"),
                     "triton": training_step(lambda: model.loss(audio), optimizer, "triton"),
                     "compile": training_step(lambda: compiled(audio), optimizer, "eager")}
        return Workload(providers, items=(batch * length, "samples"),
                        notes=f"fp32, receptive field {model.receptive_field}; forward + backward + Adam step")
    return setup


def _sample(config: dict, batch: int, num_samples: int):
    def setup(device):
        model = _model(config, device)

        def run(impl: str, use_cache: bool):
            def call():
                with use_impl(impl):
                    return model.generate(num_samples, batch, use_cache=use_cache,
                                          generator=seeded_generator(device, 0))
            return call

        providers = {"eager": run("eager", False), "cached_eager": run("eager", True),
                     "cached_triton": run("triton", True)}
        return Workload(providers, items=(batch * num_samples, "audio samples"), reference=run("eager", False),
                        notes=f"fp32, receptive field {model.receptive_field}; eager = naive sampling")
    return setup


@case_builder
def wavenet_cases(size: str):
    for dtype in DTYPES[size]:
        for shape in CONV_SHAPES[size]:
            batch, c_in, c_out, length, ksize, dilation = shape
            params = {"shape": [batch, c_in, c_out, length], "kernel_size": ksize, "dilation": dilation,
                      "dtype": _label(dtype)}
            tag = f"[{_label(dtype)},{batch}x{c_in}->{c_out}x{length},k{ksize},d{dilation}]"
            yield Case(f"wavenet.causal_conv1d{tag}", "wavenet", "op", params, _conv_forward(shape, dtype))
            yield Case(f"wavenet.causal_conv1d_fwd_bwd{tag}", "wavenet", "op", params,
                       _conv_forward_backward(shape, dtype))
        for shape in LAYER_SHAPES[size]:
            batch, r, d, s, length, ksize, dilation = shape
            params = {"batch": batch, "residual": r, "dilation_channels": d, "skip": s, "time": length,
                      "kernel_size": ksize, "dilation": dilation, "dtype": _label(dtype)}
            tag = f"[{_label(dtype)},b{batch},r{r},d{d},s{s},t{length},dil{dilation}]"
            yield Case(f"wavenet.residual_layer{tag}", "wavenet", "op", params, _layer_forward(shape, dtype))
            yield Case(f"wavenet.residual_layer_fwd_bwd{tag}", "wavenet", "op", params,
                       _layer_forward_backward(shape, dtype))
    for name, config, batch, length in TRAIN[size]:
        params = {"model": name, "batch": batch, "time": length}
        yield Case(f"wavenet.train[{name},b{batch},t{length}]", "wavenet", "train", params,
                   _train(config, batch, length))
    for name, config, batch, num_samples in SAMPLE[size]:
        params = {"model": name, "batch": batch, "num_samples": num_samples}
        yield Case(f"wavenet.sample[{name},b{batch},n{num_samples}]", "wavenet", "sample", params,
                   _sample(config, batch, num_samples))
