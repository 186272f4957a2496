"""GPT model cases: training throughput and cached generation throughput, eager vs triton vs torch.compile.

``gpt.train``: one training step (forward, cross-entropy, backward, AdamW step) on ``batch x seq`` tokens under
bf16 autocast with fp32 weights (fp32 throughout at the "cpu" size); ``items`` = ``batch * seq`` tokens. ``flops``
is the usual model-FLOPs count of a training step (PaLM, appendix B; nanoGPT's MFU estimate)::

    flops = tokens * (6 * N + 12 * n_layer * n_embd * seq)

with ``N`` the parameters outside the embeddings; the attention term counts the full ``seq x seq`` score matrix
although causal attention computes about half of it, so it is a model-FLOPs utilisation, not hardware FLOPs.

``gpt.generate``: ``model.generate(prompt, new_tokens, temperature=0)`` with the KV cache (prefill with
``flash_attention``, then one ``decode_attention`` per layer and token) with bf16 weights; ``items`` = ``batch *
new_tokens`` generated tokens. No error column (the output is token ids).

Providers: ``eager`` and ``triton`` run the same model under :func:`~genkernels.kernels.use_impl`; ``compile`` is
``torch.compile`` of the model under ``use_impl("eager")`` (what a user would pick instead of our kernels).
"""
from __future__ import annotations

import contextlib
import copy

import torch

from genkernels.kernels import use_impl
from genkernels.models.gpt import GPT, GPTConfig

from ..providers import torch_compile, training_step
from ..registry import Case, Workload, case_builder, seeded_generator

TINY = dict(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)
GPT2_SMALL = dict(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768)
GPT2_SMALL_GQA = dict(GPT2_SMALL, n_kv_head=4)

# (name, config, batch, seq) for training; (name, config, batch, prompt, new tokens) for generation
TRAIN = {
    "cpu": [("tiny", TINY, 2, 16)],
    "quick": [("gpt2-small", GPT2_SMALL, 8, 1024)],
    "full": [("gpt2-small", GPT2_SMALL, 8, 1024), ("gpt2-small-gqa4", GPT2_SMALL_GQA, 8, 1024)],
}
GENERATE = {
    "cpu": [("tiny", TINY, 2, 4, 4)],
    "quick": [("gpt2-small", GPT2_SMALL, 8, 128, 128)],
    "full": [("gpt2-small", GPT2_SMALL, 8, 128, 128), ("gpt2-small", GPT2_SMALL, 1, 512, 256),
             ("gpt2-small-gqa4", GPT2_SMALL_GQA, 8, 128, 128)],
}


def _model(config: dict, device: torch.device) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**config)).to(device)


def _tokens(shape, vocab_size: int, device: torch.device, seed: int) -> torch.Tensor:
    generator = seeded_generator(device, seed)
    return torch.randint(0, vocab_size, shape, generator=generator, device=device)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _training_flops(model: GPT, batch: int, seq: int) -> int:
    config = model.config
    embeddings = model.transformer.wte.weight.numel() + model.transformer.wpe.weight.numel()
    non_embedding = sum(p.numel() for p in model.parameters()) - embeddings
    return batch * seq * (6 * non_embedding + 12 * config.n_layer * config.n_embd * seq)


def _train(config: dict, batch: int, seq: int):
    def setup(device):
        model = _model(config, device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        compiled = torch_compile(model)
        data = _tokens((batch, seq + 1), config["vocab_size"], device, seed=1)
        inputs, targets = data[:, :-1], data[:, 1:]

        def loss_of(forward):
            def compute():
                with _autocast(device):
                    return forward(inputs, targets)[1]
            return compute

        providers = {"eager": training_step(loss_of(model), optimizer, "eager"),
                     "triton": training_step(loss_of(model), optimizer, "triton"),
                     "compile": training_step(loss_of(compiled), optimizer, "eager")}
        precision = "bf16 autocast, fp32 weights" if device.type == "cuda" else "fp32"
        return Workload(providers, flops=_training_flops(model, batch, seq), items=(batch * seq, "tokens"),
                        notes=f"forward + backward + AdamW step, {precision}; loss values drift as the weights "
                              "train, so no error column")
    return setup


def _generate(config: dict, batch: int, prompt_len: int, new_tokens: int):
    def setup(device):
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = _model(config, device).to(dtype)
        compiled = copy.deepcopy(model)
        compiled.compile(dynamic=True)  # generate() calls self(...), which now runs the compiled forward
        prompt = _tokens((batch, prompt_len), config["vocab_size"], device, seed=2)

        def run(module: GPT, impl: str):
            def call():
                with use_impl(impl):
                    return module.generate(prompt, new_tokens, temperature=0.0)
            return call

        providers = {"eager": run(model, "eager"), "triton": run(model, "triton"), "compile": run(compiled, "eager")}
        return Workload(providers, items=(batch * new_tokens, "tokens"),
                        notes=f"greedy, KV cache, {str(dtype).replace('torch.', '')} weights, prompt {prompt_len}")
    return setup


@case_builder
def gpt_cases(size: str):
    for name, config, batch, seq in TRAIN[size]:
        params = {"model": name, "batch": batch, "seq": seq}
        yield Case(f"gpt.train[{name},b{batch},s{seq}]", "gpt", "train", params, _train(config, batch, seq))
    for name, config, batch, prompt_len, new_tokens in GENERATE[size]:
        params = {"model": name, "batch": batch, "prompt": prompt_len, "new_tokens": new_tokens}
        yield Case(f"gpt.generate[{name},b{batch},p{prompt_len},n{new_tokens}]", "gpt", "sample", params,
                   _generate(config, batch, prompt_len, new_tokens))
