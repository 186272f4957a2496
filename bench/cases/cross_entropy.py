"""Cross-entropy cases: the fused loss of the three autoregressive families' logits, and GPT-2's output head with
its loss chunked over tokens, forward + backward.

``cross_entropy.cross_entropy[fwd+bwd,...]``: the loss and ``d loss / d logits`` of PixelCNN's logits
``[N, 256, 3, H, W]`` (the transposed view of its head's ``[N, 3, 256, H, W]``, read in place), WaveNet's
``[N, 256, T]`` and GPT-2's ``[tokens, 50257]``, mean over the targets. Traffic, ``N`` logits of ``e`` bytes (the
targets and the row losses are negligible), as the Triton kernel performs it: the forward reads the logits and
writes the unit-upstream gradient (``2 N e``; ``3 N e`` for GPT-2's vocabulary, whose rows are read a second time
for the gradient after the online log-sum-exp), the backward's scale reads it and writes ``grad_logits``
(``2 N e``): ``4 N e``, ``5 N e`` for GPT-2. The eager and compiled providers are charged the same bytes, so their
GB/s compare times; the eager one is ``F.cross_entropy`` on an fp32 copy of the logits, what the models ran
before (``logits.float()``).

``cross_entropy.linear_cross_entropy[fwd+bwd,...]``: GPT-2 small's head, ``hidden [tokens, 768] @ weight.T`` with
the 50,257-token vocabulary, and the loss, gradients of ``hidden`` and ``weight``; ``flops = 6 * tokens * 768 *
vocab`` (the logits and the two gradient products; the softmax is negligible). ``eager`` materializes the logits
(``F.linear`` then ``F.cross_entropy`` in fp32), ``triton`` chunks over tokens (one chunk's logits at a time).

Peak memory: every row of a CUDA run records ``peak_memory_mib`` (what one call allocates beyond its inputs, see
``genkernels.bench.runner``); the comparison the issue asks for is that column of the eager, compile and triton
rows. The error column is the max error of ``grad_logits`` (``grad_hidden`` for the head) against fp64.
"""
from __future__ import annotations

import torch

from genkernels.kernels.cross_entropy import (
    cross_entropy,
    cross_entropy_reference,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)

from ..providers import eager_triton_compile_backward
from ..registry import Case, Workload, case_builder, seeded_generator

# (name, logits shape as the model produces it, transposed to put the classes on dim 1)
LOSSES = {
    "cpu": [("pixelcnn", (2, 3, 256, 4, 4), True), ("wavenet", (2, 256, 64), False),
            ("gpt2", (8, 5000), False)],
    "quick": [("pixelcnn", (64, 3, 256, 32, 32), True), ("wavenet", (16, 256, 16000), False),
              ("gpt2", (8 * 1024, 50257), False)],
}
LOSSES["full"] = LOSSES["quick"]
# (name, tokens, hidden size, vocabulary)
HEADS = {"cpu": [("tiny", 64, 32, 500)], "quick": [("gpt2-small", 8 * 1024, 768, 50257)]}
HEADS["full"] = HEADS["quick"]
DTYPES = {"cpu": torch.float32, "quick": torch.bfloat16, "full": torch.bfloat16}
# a class-tile's worth: GPT-2's rows (classes contiguous) are read twice above it
_SINGLE_PASS_CLASSES = 4096


def _randn(shape, dtype, device, seed, scale=1.0):
    generator = seeded_generator(device, seed)
    return (torch.randn(shape, generator=generator, device=device) * scale).to(dtype)


def _classes(shape, num_classes, device, seed):
    generator = seeded_generator(device, seed)
    return torch.randint(0, num_classes, shape, generator=generator, device=device)


def _loss(shape, transposed, dtype):
    def setup(device):
        head = _randn(shape, dtype, device, 0, scale=2.0).requires_grad_()
        num_classes = shape[2] if transposed else shape[1]
        target_shape = (shape[0], shape[1]) + tuple(shape[3:]) if transposed else (shape[0],) + tuple(shape[2:])
        target = _classes(target_shape, num_classes, device, 1)

        def loss(logits, impl):
            return cross_entropy(logits.transpose(1, 2) if transposed else logits, target, impl=impl)

        def reference():
            logits = head.detach().double().requires_grad_()
            value = cross_entropy_reference(logits.transpose(1, 2) if transposed else logits, target)
            return torch.autograd.grad(value, logits)[0]

        passes = 5 if num_classes > _SINGLE_PASS_CLASSES else 4
        providers = eager_triton_compile_backward(loss, [head], torch.ones((), device=device))
        return Workload(providers, bytes_moved=passes * head.numel() * head.element_size(), reference=reference,
                        notes=f"mean over {target.numel()} targets, {num_classes} classes; eager: F.cross_entropy "
                              "on an fp32 copy")
    return setup


def _head(tokens, hidden_size, vocab, dtype):
    def setup(device):
        hidden = _randn((tokens, hidden_size), dtype, device, 2).requires_grad_()
        weight = _randn((vocab, hidden_size), dtype, device, 3, scale=0.02).requires_grad_()
        target = _classes((tokens,), vocab, device, 4)

        def loss(h, w, impl):
            return linear_cross_entropy(h, w, target, impl=impl)

        def reference():
            h, w = hidden.detach().double().requires_grad_(), weight.detach().double()
            return torch.autograd.grad(linear_cross_entropy_reference(h, w, target), h)[0]

        providers = eager_triton_compile_backward(loss, [hidden, weight], torch.ones((), device=device))
        return Workload(providers, flops=6 * tokens * hidden_size * vocab, reference=reference,
                        notes="gradients of hidden and weight; eager materializes the logits, triton chunks "
                              "over tokens")
    return setup


@case_builder
def cross_entropy_cases(size: str):
    dtype = DTYPES[size]
    dtype_name = str(dtype).replace("torch.", "")
    for name, shape, transposed in LOSSES[size]:
        params = {"model": name, "logits": list(shape), "dtype": dtype_name}
        yield Case(f"cross_entropy.cross_entropy[fwd+bwd,{name},{dtype_name},{'x'.join(map(str, shape))}]",
                   "cross_entropy", "op", params, _loss(shape, transposed, dtype))
    for name, tokens, hidden_size, vocab in HEADS[size]:
        params = {"model": name, "tokens": tokens, "hidden": hidden_size, "vocab": vocab, "dtype": dtype_name}
        yield Case(f"cross_entropy.linear_cross_entropy[fwd+bwd,{name},{dtype_name},{tokens}x{hidden_size}x{vocab}]",
                   "cross_entropy", "op", params, _head(tokens, hidden_size, vocab, dtype))
