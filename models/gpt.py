"""GPT: a decoder-only Transformer language model (GPT-2 architecture) on the fused attention ops.

Token and learned position embeddings, ``n_layer`` pre-norm blocks
``x = x + Attn(LN(x)); x = x + MLP(LN(x))`` with causal (optionally grouped-query) self-attention and a GELU MLP
of width ``4 * n_embd``, a final LayerNorm and an output head tied to the token embedding (Radford et al. 2019).
Training runs :func:`~genkernels.kernels.attention.flash_attention`; :meth:`GPT.generate` fills a
:class:`~genkernels.models.attention.KVCache` with one ``flash_attention`` call per layer over the prompt, then
makes one :func:`~genkernels.kernels.attention.decode_attention` call per layer and new token.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from genkernels.kernels.checks import (
    check_bool,
    check_in_range,
    check_int,
    check_integer_tensor,
    check_real,
    describe,
)

from .attention import KVCache, MultiheadSelfAttention, check_head_counts

# The index dtypes nn.Embedding takes; token ids of another integer dtype are widened to int64.
EMBEDDING_DTYPES = (torch.int64, torch.int32)
# The ignore_index of the loss: a target of -1 is left out of the mean.
IGNORE_INDEX = -1


@dataclasses.dataclass
class GPTConfig:
    """Sizes of a :class:`GPT` (nanoGPT's names). ``n_kv_head=None`` means ``n_head`` (no grouping).

    Every size is a positive int (``TypeError`` for another type, ``ValueError`` for 0 or less, naming the
    field); ``n_embd`` must be divisible by ``n_head`` into a head dim the attention kernels take ([16, 256]),
    and ``n_kv_head`` must divide ``n_head``. No dropout (the model has none)."""

    vocab_size: int = 50304
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: Optional[int] = None
    n_embd: int = 768
    bias: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer"):
            value = check_int(getattr(self, name), name)
            if value < 1:
                raise ValueError(f"{name}={value} must be a positive integer")
        self.n_kv_head = check_head_counts(self.n_embd, self.n_head, self.n_kv_head,
                                           ("n_embd", "n_head", "n_kv_head"))
        check_bool(self.bias, "bias")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


class MLP(nn.Module):
    """``c_proj(GELU(c_fc(x)))`` with hidden width ``4 * n_embd`` (exact erf GELU)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    """Pre-norm Transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = MultiheadSelfAttention(config.n_embd, config.n_head, config.n_kv_head, causal=True,
                                           bias=config.bias)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: Optional[KVCache] = None, layer_idx: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache=kv_cache, layer_idx=layer_idx)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only Transformer language model; see the module docstring for the architecture.

    Initialization follows GPT-2: weights ``N(0, 0.02)``, the residual output projections ``N(0, 0.02 /
    sqrt(2 n_layer))``, biases zero. One set of weights runs under every implementation of the ops
    (:func:`genkernels.kernels.use_impl`).
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        for block in self.transformer.h:
            nn.init.normal_(block.attn.out_proj.weight, std=residual_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
                kv_cache: Optional[KVCache] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Logits ``[batch, seq, vocab_size]`` for token ids ``idx`` ``[batch, seq]`` and, with ``targets``
        (token ids of ``idx``'s shape; ``-1`` is ignored), the mean cross-entropy
        ``-1/N sum_t log softmax(logits_t)[targets_t]`` over the ``N`` non-ignored positions; else ``None``.

        Token ids have any integer dtype; ``idx`` must lie in ``[0, vocab_size)``, ``targets`` in
        ``[-1, vocab_size)``. Out-of-range ids raise ``ValueError`` for CPU tensors, and fail an asynchronous
        device assert on a GPU (checked without a host sync, before the embedding could read out of bounds).
        ``seq`` (plus the cached tokens) must not exceed ``block_size``.

        With ``kv_cache`` (see :meth:`new_kv_cache`) ``idx`` holds the next tokens after the ``kv_cache.seq_len``
        cached ones: their positions are claimed in the cache and their keys/values stored.
        """
        self._check_idx(idx, kv_cache)
        start = 0 if kv_cache is None else kv_cache.seq_len
        if targets is not None:
            self._check_targets(targets, idx)
        if kv_cache is not None:
            kv_cache.advance(idx.shape[1])
        positions = torch.arange(start, start + idx.shape[1], device=idx.device)
        x = self.transformer.wte(_widened(idx)) + self.transformer.wpe(positions)
        for layer_idx, block in enumerate(self.transformer.h):
            x = block(x, kv_cache, layer_idx)
        logits = self.lm_head(self.transformer.ln_f(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten().long(), ignore_index=IGNORE_INDEX)
        return logits, loss

    def new_kv_cache(self, batch_size: int, max_seq_len: Optional[int] = None, *, dtype: Optional[torch.dtype] = None,
                     device: torch.device | str | None = None) -> KVCache:
        """An empty :class:`KVCache` for this model (``max_seq_len`` defaults to ``block_size``; ``dtype`` and
        ``device`` to the parameters', or the autocast dtype when autocast is on for that device)."""
        device = self.transformer.wte.weight.device if device is None else torch.device(device)
        dtype = self._activation_dtype(device) if dtype is None else dtype
        max_seq_len = self.config.block_size if max_seq_len is None else max_seq_len
        if check_int(max_seq_len, "max_seq_len") > self.config.block_size:
            raise ValueError(f"max_seq_len={max_seq_len} exceeds the model's block_size={self.config.block_size}")
        config = self.config
        return KVCache(config.n_layer, batch_size, config.n_kv_head, max_seq_len, config.head_dim, dtype=dtype,
                       device=device)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, use_cache: bool = True,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Continue every sequence of ``idx`` ``[batch, seq]`` by ``max_new_tokens`` tokens; returns
        ``[batch, seq + max_new_tokens]`` (``idx`` followed by the new tokens).

        Each new token is drawn from ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely
        tokens (all when ``top_k`` is None; ``top_k`` above ``vocab_size`` means all), with ``torch.multinomial``
        and ``generator``. **Greedy decoding** is ``temperature=0`` or ``top_k=1``: the token of largest logit
        (the lowest id among equal logits), and no random numbers are drawn.

        ``temperature`` is a finite number ``>= 0`` (``ValueError`` for NaN, Inf or a negative value). The
        softmax runs in fp32 on ``(logits - max) / temperature`` with the maximum's own term kept at 0, so any
        positive temperature is safe: one too small for fp32 (down to the smallest subnormal) makes every
        non-maximal token's probability 0 and draws among the tokens of largest logit (greedy, except that ties
        are broken at random).

        ``idx`` holds token ids in ``[0, vocab_size)`` of any integer dtype that can hold ``vocab_size - 1``; the
        result has ``idx``'s dtype.

        ``use_cache=True`` feeds the prompt once (prefill) and then only the newest token per step, reading the
        earlier keys/values from a :class:`KVCache`; ``use_cache=False`` recomputes the whole sequence for every
        token. Both compute the same logits up to rounding, so greedy decoding gives the same tokens. Every
        step sees the whole sequence, so ``seq + max_new_tokens - 1`` must not exceed ``block_size``.
        """
        self._check_generate_args(idx, max_new_tokens, temperature, top_k, use_cache, generator)
        greedy = temperature == 0 or top_k == 1
        cache = None
        if use_cache and max_new_tokens > 0:
            cache = self.new_kv_cache(idx.shape[0], idx.shape[1] + max_new_tokens - 1, device=idx.device)
        tokens, step_input = idx, idx
        for _ in range(max_new_tokens):
            logits = self(step_input, kv_cache=cache)[0][:, -1].float()
            next_token = _pick_token(logits, greedy, temperature, top_k, generator).to(idx.dtype)
            tokens = torch.cat([tokens, next_token], dim=1)
            step_input = next_token if cache is not None else tokens
        return tokens

    def _activation_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype of the attention inputs: the autocast dtype when autocast is on for ``device``, else the
        weights' dtype."""
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.transformer.wte.weight.dtype

    def _check_idx(self, idx: object, kv_cache: Optional[KVCache]) -> None:
        if kv_cache is not None and not isinstance(kv_cache, KVCache):
            raise TypeError(f"kv_cache must be a KVCache, got {type(kv_cache).__name__}")
        start = 0 if kv_cache is None else kv_cache.seq_len
        check_integer_tensor(idx, "idx")
        if idx.dim() != 2 or idx.shape[1] < 1:
            raise ValueError(f"idx must be [batch, seq] with seq >= 1; got {describe(idx)}")
        if start + idx.shape[1] > self.config.block_size:
            cached = f" after {start} cached tokens" if kv_cache is not None else ""
            raise ValueError(f"idx holds {idx.shape[1]} tokens{cached}: more than the model's block_size="
                             f"{self.config.block_size} positions")
        if idx.device != self.transformer.wte.weight.device:
            raise ValueError(f"idx must be on the model's device {self.transformer.wte.weight.device}; "
                             f"got {describe(idx)}")
        check_in_range(_widened(idx), "idx (token ids)", 0, self.config.vocab_size)
        if kv_cache is None:
            return
        if kv_cache.batch_size != idx.shape[0]:
            raise ValueError(f"kv_cache holds {kv_cache.batch_size} sequences; idx has batch {idx.shape[0]}")
        if kv_cache.device != idx.device:
            raise ValueError(f"kv_cache is on {kv_cache.device}; idx is on {idx.device}")
        activation_dtype = self._activation_dtype(idx.device)
        if kv_cache.dtype != activation_dtype:
            raise TypeError(f"kv_cache holds {kv_cache.dtype}; this model's attention runs in {activation_dtype} "
                            "here (the weights' dtype, or the autocast dtype under autocast)")

    def _check_targets(self, targets: object, idx: torch.Tensor) -> None:
        check_integer_tensor(targets, "targets")
        if targets.shape != idx.shape or targets.device != idx.device:
            raise ValueError(f"targets must have idx's shape {list(idx.shape)} and device {idx.device}; "
                             f"got {describe(targets)}")
        check_in_range(_widened(targets), f"targets (token ids, or {IGNORE_INDEX} to ignore a position)",
                       IGNORE_INDEX, self.config.vocab_size)

    def _check_generate_args(self, idx, max_new_tokens, temperature, top_k, use_cache, generator) -> None:
        new_tokens = check_int(max_new_tokens, "max_new_tokens")
        if new_tokens < 0:
            raise ValueError(f"max_new_tokens={new_tokens} must be >= 0")
        self._check_idx(idx, None)
        largest_id = self.config.vocab_size - 1
        if idx.dtype != torch.int64 and torch.iinfo(idx.dtype).max < largest_id:
            raise TypeError(f"idx is {idx.dtype}, which cannot hold the generated token ids (up to {largest_id}); "
                            "pass idx as torch.int64 or torch.int32")
        longest = idx.shape[1] + new_tokens - 1
        if longest > self.config.block_size:
            raise ValueError(f"idx has {idx.shape[1]} tokens and max_new_tokens={new_tokens}: the last step would "
                             f"see {longest} tokens, more than block_size={self.config.block_size}")
        check_real(temperature, "temperature", low=0.0)
        if top_k is not None and check_int(top_k, "top_k") < 1:
            raise ValueError(f"top_k={top_k} must be None or >= 1")
        check_bool(use_cache, "use_cache")
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
            if generator.device.type != idx.device.type:
                raise ValueError(f"generator is on {generator.device}; idx is on {idx.device}")


def _widened(ids: torch.Tensor) -> torch.Tensor:
    """Token ids in a dtype nn.Embedding takes (and that compares with the vocabulary bounds exactly: a uint8 or
    int8 tensor would wrap the bound); int64/int32 ids as they are."""
    return ids if ids.dtype in EMBEDDING_DTYPES else ids.long()


def _pick_token(logits: torch.Tensor, greedy: bool, temperature: float, top_k: Optional[int],
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """One token id per row of ``logits`` ``[batch, vocab]`` (fp32), as ``[batch, 1]``: argmax when ``greedy``,
    else a draw from ``softmax(logits / temperature)`` over the ``top_k`` largest logits.

    The softmax takes ``(logits - max) / temperature``: every term is ``<= 0`` (``-inf`` once the quotient
    overflows, for a tiny temperature), and the maximum's own term is set to 0 rather than computed as
    ``0 / temperature`` (NaN where the temperature rounds to 0 in fp32), so the probabilities stay finite."""
    if greedy:
        return logits.argmax(dim=-1, keepdim=True)
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    scaled = torch.where(shifted == 0, torch.zeros_like(shifted), shifted / temperature)
    return torch.multinomial(scaled.softmax(dim=-1), 1, generator=generator)
