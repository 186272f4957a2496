"""Fused GroupNorm + SiLU cases at U-Net activation shapes, forward and forward + backward, NCHW and channels_last.

Traffic per call (``E = numel * element_size`` of the activation; weight and bias are negligible):
    fwd:      read x, write y                                  = 2 E
    fwd+bwd:  the forward, then read x and dy, write dx        = 5 E
Bytes read and written once each: the split path's second read of x (and dy), which mostly hits L2, is not
counted, so GB/s is the rate an ideal one-pass kernel would need.

Providers: ``eager`` is ``F.silu(F.group_norm(...))``, the two native PyTorch kernels a model would otherwise call
(PyTorch's GroupNorm launches one block per (sample, group)); ``compile`` is torch.compile of that; ``triton`` is
the fused op.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from genkernels.kernels.group_norm import group_norm_silu, group_norm_silu_reference

from ..providers import forward_backward, torch_compile
from ..registry import Case, Workload, case_builder, seeded_generator

NUM_GROUPS = {"cpu": 8, "quick": 32, "full": 32}
# [batch, channels, height, width]: a batch-1 high-resolution block (32 programs for PyTorch at 32 groups), a deep
# low-resolution block, and a training-batch mid-resolution block.
SHAPES = {
    "cpu": [(2, 32, 8, 8)],
    "quick": [(1, 128, 256, 256), (8, 512, 32, 32)],
    "full": [(1, 128, 256, 256), (8, 512, 32, 32), (32, 256, 64, 64)],
}
DTYPES = {"cpu": [torch.float32], "quick": [torch.bfloat16], "full": [torch.bfloat16]}
LAYOUTS = {"cpu": ["nchw", "channels_last"], "quick": ["nchw"], "full": ["nchw", "channels_last"]}


def _inputs(shape, dtype, layout, device):
    generator = seeded_generator(device, 0)
    x = (torch.randn(shape, generator=generator, device=device) * 2 + 0.5).to(dtype)
    dy = torch.randn(shape, generator=generator, device=device).to(dtype)
    if layout == "channels_last":
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    weight = (1 + 0.1 * torch.randn(shape[1], generator=generator, device=device)).to(dtype)
    bias = (0.1 * torch.randn(shape[1], generator=generator, device=device)).to(dtype)
    return x, dy, weight, bias


def _torch_group_norm_silu(x, num_groups, weight, bias):
    return F.silu(F.group_norm(x, num_groups, weight, bias))


def _forward(shape, dtype, layout, num_groups):
    def setup(device):
        x, _, weight, bias = _inputs(shape, dtype, layout, device)

        def reference():
            return group_norm_silu_reference(x.double(), num_groups, weight.double(), bias.double())

        compiled = torch_compile(_torch_group_norm_silu)
        providers = {
            "eager": lambda: _torch_group_norm_silu(x, num_groups, weight, bias),
            "triton": lambda: group_norm_silu(x, num_groups, weight, bias, impl="triton"),
            "compile": lambda: compiled(x, num_groups, weight, bias),
        }
        return Workload(providers,
                        bytes_moved=2 * x.numel() * x.element_size(), reference=reference,
                        notes=f"{num_groups} groups, SiLU, {layout}")
    return setup


def _forward_backward(shape, dtype, layout, num_groups):
    def setup(device):
        x, dy, weight, bias = _inputs(shape, dtype, layout, device)

        def fused(x, weight, bias):
            return group_norm_silu(x, num_groups, weight, bias, impl="triton")

        def native(x, weight, bias):
            return _torch_group_norm_silu(x, num_groups, weight, bias)

        def reference():
            leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
            y = group_norm_silu_reference(leaves[0], num_groups, leaves[1], leaves[2])
            return torch.autograd.grad(y, leaves[0], dy.double())[0]

        leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
        providers = {
            "eager": forward_backward(native, leaves, (dy,)),
            "triton": forward_backward(fused, leaves, (dy,)),
            "compile": forward_backward(torch_compile(native), leaves, (dy,)),
        }
        return Workload(providers,
                        bytes_moved=5 * x.numel() * x.element_size(), reference=reference,
                        notes=f"{num_groups} groups, SiLU, {layout}; gradients in x, weight, bias (error column: dx)")
    return setup


@case_builder
def group_norm_cases(size: str):
    num_groups = NUM_GROUPS[size]
    for dtype in DTYPES[size]:
        for layout in LAYOUTS[size]:
            for shape in SHAPES[size]:
                params = {"shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "layout": layout,
                          "num_groups": num_groups}
                suffix = "" if layout == "nchw" else ",channels_last"
                tag = f"{params['dtype']},{'x'.join(map(str, shape))}{suffix}"
                yield Case(f"diffusion.group_norm_silu[fwd,{tag}]", "diffusion", "op", params,
                           _forward(shape, dtype, layout, num_groups))
                yield Case(f"diffusion.group_norm_silu[fwd+bwd,{tag}]", "diffusion", "op", params,
                           _forward_backward(shape, dtype, layout, num_groups))
