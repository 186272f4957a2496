"""Categorical sampling cases: one sampling step of each autoregressive family, on random logits of its shape.

- ``gpt2``: GPT-2's vocabulary, ``[8, 50257]`` fp32 logits (``GPT.generate`` samples the fp32 last-position
  logits of a batch of 8), plain (temperature 1) and filtered (temperature 0.8, top-k 50, top-p 0.9); and the
  vocabulary padded to 50304, whose rows start on 16-byte boundaries (50257-class rows do not, so the kernel
  reads them 4 bytes per thread).
- ``pixelcnn``: one sub-pixel of a batch of 64 RGB images, ``[64, 256]`` (PixelCNN draws the three colours of a
  pixel one after another, each ``[batch, 256]``); at full size also ``[192, 256]``, three such steps at once.
- ``wavenet``: one audio sample of 16 sequences, ``[16, 256]`` mu-law classes.

Traffic per call: the logits read once and the int64 samples written once (``rows * (classes * element_size +
8)`` bytes); the filtered kernel reads each row 19 times (mostly from L2), which the GB/s column does not count.
``items`` = one step (the rows are one step of the family's sampler), so items/s is sampling steps per second.

Providers: ``eager`` (the reference: the same Philox draw in PyTorch), ``triton`` (the fused kernel),
``compile`` (``torch.compile`` of the reference) and the peer ``multinomial``: softmax, Hugging Face's top-k and
top-p warpers (sort, cumulative sum) and ``torch.multinomial``, what the models ran before. Every provider but the
peer draws from the same seed, so the error column (the largest class-id difference from the eager draw) is 0 when
they agree; the peer draws from torch's own stream and its error column only says that it sampled.
"""
from __future__ import annotations

import math

import torch

from genkernels.kernels import draw_philox_seed, sample_categorical

from ..providers import eager_triton_compile
from ..registry import Case, Workload, case_builder, seeded_generator

GPT2_VOCAB = 50257
PADDED_VOCAB = 50304  # GPT-2's vocabulary padded to a multiple of 64 (nanoGPT; the gpt cases' models)
FILTERED = dict(temperature=0.8, top_k=50, top_p=0.9)
# (family, rows, classes, options)
STEPS = {
    "cpu": [("gpt2", 2, 300, {}), ("gpt2", 2, 300, FILTERED), ("pixelcnn", 8, 256, {})],
    "quick": [("gpt2", 8, GPT2_VOCAB, {}), ("gpt2", 8, GPT2_VOCAB, FILTERED), ("gpt2", 8, PADDED_VOCAB, {}),
              ("pixelcnn", 64, 256, {}), ("wavenet", 16, 256, {})],
    "full": [("gpt2", 8, GPT2_VOCAB, {}), ("gpt2", 8, GPT2_VOCAB, FILTERED), ("gpt2", 8, PADDED_VOCAB, {}),
             ("gpt2", 8, PADDED_VOCAB, FILTERED), ("gpt2", 64, GPT2_VOCAB, FILTERED),
             ("pixelcnn", 64, 256, {}), ("pixelcnn", 192, 256, {}), ("wavenet", 16, 256, {})],
}


def softmax_multinomial(logits: torch.Tensor, temperature: float = 1.0, top_k=None, top_p=None,
                        generator=None) -> torch.Tensor:
    """The unfused peer: ``softmax(logits / T)`` after Hugging Face's ``TopKLogitsWarper`` and
    ``TopPLogitsWarper`` (sorted cumulative probabilities), then one ``torch.multinomial`` draw per row."""
    scores = logits.float() / temperature
    if top_k is not None:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if top_p is not None:
        sorted_scores, order = scores.sort(dim=-1)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= 1 - top_p
        remove[:, -1] = False  # the most likely class always stays
        scores = scores.masked_fill(remove.scatter(1, order, remove), -math.inf)
    return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator)[:, 0]


def _step(rows: int, classes: int, options: dict):
    def setup(device):
        generator = seeded_generator(device, 0)
        logits = 2 * torch.randn((rows, classes), generator=generator, device=device)
        seed = draw_philox_seed(device, seeded_generator(device, 1))
        providers = eager_triton_compile(sample_categorical, logits, seed=seed, **options)
        peer_generator = seeded_generator(device, 2)
        providers["multinomial"] = lambda: softmax_multinomial(logits, generator=peer_generator, **options)
        return Workload(providers, bytes_moved=rows * (classes * logits.element_size() + 8), items=(1, "steps"),
                        reference=lambda: sample_categorical(logits, seed=seed, impl="eager", **options).double(),
                        notes="fp32 logits; " + (", ".join(f"{k}={v}" for k, v in options.items()) or "temperature=1"))
    return setup


@case_builder
def sampling_cases(size: str):
    for family, rows, classes, options in STEPS[size]:
        mode = "filtered" if options else "plain"
        params = {"family": family, "rows": rows, "classes": classes, **options}
        yield Case(f"sampling.categorical[{family},{mode},{rows}x{classes}]", "sampling", "op", params,
                   _step(rows, classes, options))
