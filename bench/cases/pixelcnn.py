"""PixelCNN cases: the masked convolution (forward, forward + backward), a PixelCNN training step, and sampling.

FLOPs of one masked convolution forward, counting only the taps the mask keeps (the ones the kernel computes):
``2 * N * C_out * C_in * kept_taps * H * W``, ``kept_taps = p * k + p + 1`` for mask B (and for mask A with colour
groups), ``p * k + p`` for mask A without (``p = k // 2``): 5 of 9 taps for 3x3 B, 24 of 49 for 7x7 A. The
backward does that twice (input and weight gradients), so forward + backward counts 3x. The eager provider is
``F.conv2d`` (cuDNN on a GPU) on the masked weight, i.e. it runs the full ``k * k`` kernel; its TFLOP/s column
uses the same kept-tap count, so the columns compare useful work per second.

Model cases: training images/s (forward, bits/dim loss, backward, Adam step), and sampling images/s at 28x28:
naive eager (the whole network per sub-pixel), cached eager and cached triton (only the pixel being drawn, from
per-layer caches); all three draw the same images from the same generator seed.
"""
from __future__ import annotations


import torch

from genkernels.kernels import use_impl
from genkernels.kernels.masked_conv import masked_conv2d, masked_conv2d_flops, masked_conv2d_reference
from genkernels.models.pixelcnn import PixelCNN

from ..providers import eager_triton_compile, eager_triton_compile_backward, torch_compile, training_step
from ..registry import Case, Workload, case_builder, seeded_generator

# (batch, channels, height, width, kernel size, mask type)
CONV_SHAPES = {
    "cpu": [(2, 6, 9, 7, 3, "B"), (1, 6, 6, 5, 7, "A")],
    "quick": [(64, 128, 32, 32, 3, "B"), (64, 128, 32, 32, 7, "A")],
    "full": [(64, 128, 32, 32, 3, "B"), (64, 128, 32, 32, 7, "A"), (64, 96, 32, 32, 7, "A")],
}
DTYPES = {"cpu": [torch.float32], "quick": [torch.bfloat16], "full": [torch.bfloat16, torch.float32]}
# (colour channels, hidden channels h, residual blocks, output channels, image side, batch)
TRAIN_MODELS = {"cpu": [(1, 3, 1, 9, 4, 2)], "quick": [(1, 64, 7, 256, 28, 64)],
                "full": [(1, 64, 7, 256, 28, 64), (3, 96, 7, 384, 32, 32)]}
SAMPLE_MODELS = {"cpu": [(1, 3, 1, 9, 2, 2)], "quick": [(1, 32, 5, 128, 28, 16)],
                 "full": [(1, 32, 5, 128, 28, 16), (1, 64, 7, 256, 28, 64)]}


def _conv_inputs(shape, dtype, device, requires_grad=False):
    batch, channels, height, width, kernel_size, _ = shape
    generator = seeded_generator(device, 0)
    x = torch.randn((batch, channels, height, width), generator=generator, device=device).to(dtype)
    weight = (torch.randn((channels, channels, kernel_size, kernel_size), generator=generator, device=device)
              / (channels * kernel_size) ** 0.5).to(dtype)
    bias = torch.randn((channels,), generator=generator, device=device).to(dtype)
    return [t.requires_grad_(requires_grad) for t in (x, weight, bias)]


def _conv_forward(shape, dtype):
    def setup(device):
        x, weight, bias = _conv_inputs(shape, dtype, device)
        mask_type = shape[-1]
        return Workload(eager_triton_compile(masked_conv2d, x, weight, bias, mask_type=mask_type),
                        flops=masked_conv2d_flops(x.shape, weight.shape, mask_type, 1),
                        reference=lambda: masked_conv2d_reference(x.double(), weight.double(), bias.double(),
                                                                  mask_type),
                        notes="eager: F.conv2d on the masked weight (all k*k taps)")
    return setup


def _conv_forward_backward(shape, dtype):
    def setup(device):
        x, weight, bias = _conv_inputs(shape, dtype, device, requires_grad=True)
        mask_type = shape[-1]
        grad_out = torch.randn_like(x)

        def reference():
            leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
            out = masked_conv2d_reference(*leaves, mask_type)
            return torch.autograd.grad(out, leaves, grad_out.double())[0]

        providers = eager_triton_compile_backward(masked_conv2d, (x, weight, bias), grad_out, mask_type=mask_type)
        return Workload(providers, flops=3 * masked_conv2d_flops(x.shape, weight.shape, mask_type, 1),
                        reference=reference, notes="forward + input, weight and bias gradients; error on grad_x")
    return setup


def _model(config, device):
    colors, hidden, blocks, output_channels, side, _ = config
    torch.manual_seed(0)
    return PixelCNN(colors, hidden, blocks, output_channels, image_size=side).to(device)


def _train(config):
    def setup(device):
        model = _model(config, device)
        colors, _, _, _, side, batch = config
        images = torch.randint(0, 256, (batch, colors, side, side), device=device,
                               generator=seeded_generator(device, 1))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        compiled_loss = torch_compile(model.loss)

        providers = {"eager": training_step(lambda: model.loss(images), optimizer, "eager"),
                     "triton": training_step(lambda: model.loss(images), optimizer, "triton"),
                     "compile": training_step(lambda: compiled_loss(images), optimizer, "eager")}
        return Workload(providers, items=(batch, "images"),
                        notes="forward + bits/dim loss + backward + Adam; compile: torch.compile of the eager loss")
    return setup


def _sample(config):
    def setup(device):
        model = _model(config, device)
        batch = config[-1]

        def draw(impl, use_cache):
            with use_impl(impl):
                return model.sample(batch, use_cache=use_cache,
                                    generator=seeded_generator(device, 2))

        providers = {"eager": lambda: draw("eager", False),
                     "cached_eager": lambda: draw("eager", True),
                     "cached_triton": lambda: draw("triton", True)}
        return Workload(providers, items=(batch, "images"), reference=lambda: draw("eager", False).double(),
                        notes="eager = naive eager sampler; max error 0 means the same images as naive")
    return setup


def _conv_tag(shape, dtype) -> str:
    batch, channels, height, width, kernel_size, mask_type = shape
    return f"[{str(dtype).replace('torch.', '')},{batch}x{channels}x{height}x{width},{kernel_size}x{kernel_size}" \
           f"{mask_type}]"


@case_builder
def pixelcnn_cases(size: str):
    for dtype in DTYPES[size]:
        for shape in CONV_SHAPES[size]:
            params = {"shape": list(shape[:4]), "kernel_size": shape[4], "mask_type": shape[5],
                      "dtype": str(dtype).replace("torch.", "")}
            tag = _conv_tag(shape, dtype)
            yield Case(f"pixelcnn.masked_conv2d{tag}", "pixelcnn", "op", params, _conv_forward(shape, dtype))
            yield Case(f"pixelcnn.masked_conv2d_fwd_bwd{tag}", "pixelcnn", "op", params,
                       _conv_forward_backward(shape, dtype))
    for kind, configs, builder in (("train", TRAIN_MODELS, _train), ("sample", SAMPLE_MODELS, _sample)):
        for config in configs[size]:
            colors, hidden, blocks, output_channels, side, batch = config
            params = {"colors": colors, "hidden_channels": hidden, "num_blocks": blocks,
                      "output_channels": output_channels, "image_size": side, "batch": batch}
            name = f"pixelcnn.{kind}[c{colors},h{hidden},b{blocks},{side}x{side},n{batch}]"
            yield Case(name, "pixelcnn", kind, params, builder(config))
