"""GPT: a decoder-only Transformer language model (GPT-2 architecture) on the fused attention ops.

Token and learned position embeddings, ``n_layer`` pre-norm blocks
``x = x + Attn(LN(x)); x = x + MLP(LN(x))`` with causal (optionally grouped-query) self-attention and a GELU MLP
of width ``4 * n_embd`` (exact GELU, or GPT-2's tanh approximation with ``activation="gelu_tanh"``; its bias and
activation are one :func:`~genkernels.kernels.bias_act` pass), a final LayerNorm and an output head tied to the
token embedding (Radford et al. 2019). :meth:`GPT.from_hf` loads a transformers GPT-2 (``GPT2LMHeadModel`` /
``GPT2Model`` or their state_dict) and :meth:`GPT.to_hf_state_dict` / :meth:`GPT.to_hf` convert back.
Training runs :func:`~genkernels.kernels.attention.flash_attention`; :meth:`GPT.generate` fills a
:class:`~genkernels.models.attention.KVCache` with one ``flash_attention`` call per layer over the prompt, then
makes one :func:`~genkernels.kernels.attention.decode_attention` call per layer and new token.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from genkernels.kernels.bias_act import bias_act
from genkernels.kernels.checks import (
    check_bool,
    check_choice,
    check_in_range,
    check_int,
    check_integer_tensor,
    check_real,
    describe,
)
from genkernels.kernels.cross_entropy import linear_cross_entropy
from genkernels.kernels.sampling import sample_categorical

from .attention import KVCache, MultiheadSelfAttention, check_head_counts

# The index dtypes nn.Embedding takes; token ids of another integer dtype are widened to int64.
EMBEDDING_DTYPES = (torch.int64, torch.int32)
# The ignore_index of the loss: a target of -1 is left out of the mean.
IGNORE_INDEX = -1
# The MLP activations (names of genkernels.kernels.bias_act): exact GELU, and its tanh approximation (GPT-2's).
ACTIVATIONS = ("gelu", "gelu_tanh")


@dataclasses.dataclass
class GPTConfig:
    """Sizes of a :class:`GPT` (nanoGPT's names). ``n_kv_head=None`` means ``n_head`` (no grouping).

    Every size is a positive int (``TypeError`` for another type, ``ValueError`` for 0 or less, naming the
    field); ``n_embd`` must be divisible by ``n_head`` into a head dim the attention kernels take ([16, 256]),
    and ``n_kv_head`` must divide ``n_head``. ``activation`` is the MLP's: "gelu" (exact, erf) or "gelu_tanh"
    (the tanh approximation GPT-2 uses, transformers' "gelu_new"); ``norm_eps`` the LayerNorms' epsilon (> 0).
    No dropout (the model has none)."""

    vocab_size: int = 50304
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: Optional[int] = None
    n_embd: int = 768
    bias: bool = True
    activation: str = "gelu"
    norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer"):
            value = check_int(getattr(self, name), name)
            if value < 1:
                raise ValueError(f"{name}={value} must be a positive integer")
        self.n_kv_head = check_head_counts(self.n_embd, self.n_head, self.n_kv_head,
                                           ("n_embd", "n_head", "n_kv_head"))
        check_bool(self.bias, "bias")
        check_choice(self.activation, "activation", ACTIVATIONS)
        self.norm_eps = check_real(self.norm_eps, "norm_eps", low=0.0, low_inclusive=False)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


class MLP(nn.Module):
    """``c_proj(act(c_fc(x)))`` with hidden width ``4 * n_embd``; ``c_fc``'s bias and the activation (exact GELU
    or its tanh approximation, ``config.activation``) run as one :func:`bias_act` pass after the bias-free
    matmul (the parameters and state_dict keys of two ``nn.Linear`` layers)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.activation = config.activation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.linear(x, self.c_fc.weight)
        bias = self.c_fc.bias
        if bias is not None and bias.dtype != hidden.dtype:  # under autocast, as nn.Linear casts its bias
            bias = bias.to(hidden.dtype)
        return self.c_proj(bias_act(hidden, bias, dim=-1, act=self.activation))

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


class Block(nn.Module):
    """Pre-norm Transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)
        self.attn = MultiheadSelfAttention(config.n_embd, config.n_head, config.n_kv_head, causal=True,
                                           bias=config.bias)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)
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
            ln_f=nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias),
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
                kv_cache: Optional[KVCache] = None,
                return_logits: Optional[bool] = None) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``(logits, loss)``: logits ``[batch, seq, vocab_size]`` for token ids ``idx`` ``[batch, seq]`` and, with
        ``targets`` (token ids of ``idx``'s shape; ``-1`` is ignored), the mean cross-entropy
        ``-1/N sum_t log softmax(logits_t)[targets_t]`` over the ``N`` non-ignored positions; else ``None``.

        With targets the loss comes from :func:`~genkernels.kernels.linear_cross_entropy` on the final hidden
        states, chunk by chunk, so the ``[batch, seq, vocab_size]`` logits never exist; they are then not
        returned (``None``) unless ``return_logits=True`` asks for them (one more head matmul and the logits'
        memory). ``return_logits`` defaults to returning them exactly when there are no targets.

        Token ids have any integer dtype; ``idx`` must lie in ``[0, vocab_size)``, ``targets`` in
        ``[-1, vocab_size)``. Out-of-range ids raise ``ValueError`` for CPU tensors, and fail an asynchronous
        device assert on a GPU (checked without a host sync, before the embedding could read out of bounds).
        ``seq`` (plus the cached tokens) must not exceed ``block_size``.

        With ``kv_cache`` (see :meth:`new_kv_cache`) ``idx`` holds the next tokens after the cached ones: their
        positions are claimed in the cache and their keys/values stored. A cache whose sequences hold different
        lengths (after :meth:`KVCache.trim`) takes one token per sequence per call, each at its own position.
        """
        self._check_idx(idx, kv_cache)
        start = 0 if kv_cache is None else kv_cache.seq_len
        if targets is not None:
            self._check_targets(targets, idx)
        if kv_cache is not None:
            kv_cache.advance(idx.shape[1])
        positions = torch.arange(start, start + idx.shape[1], device=idx.device)
        if kv_cache is not None and kv_cache.is_ragged:  # each sequence continues from its own length
            positions = kv_cache.claim_starts.long()[:, None] + (positions - start)
        x = self.transformer.wte(_widened(idx)) + self.transformer.wpe(positions)
        for layer_idx, block in enumerate(self.transformer.h):
            x = block(x, kv_cache, layer_idx)
        hidden = self.transformer.ln_f(x)
        if return_logits is None:
            return_logits = targets is None
        logits = self.lm_head(hidden) if check_bool(return_logits, "return_logits") else None
        if targets is None:
            return logits, None
        # the loss and its gradients come from the hidden states chunk by chunk: no fp32 logits or logits
        # gradient exist whole; the tied weight (lm_head's is wte's) gets this term of its gradient once
        loss = linear_cross_entropy(hidden, self.lm_head.weight, targets, ignore_index=IGNORE_INDEX)
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
    def generate(self, idx, max_new_tokens, temperature: float = 1.0, top_k: Optional[int] = None,
                 use_cache: bool = True, generator: Optional[torch.Generator] = None, *, lengths=None,
                 eos_token_id=None, callback: Optional[Callable] = None):
        """Continue every prompt by up to ``max_new_tokens`` tokens.

        ``idx`` is ``[batch, seq]`` (every prompt ``seq`` tokens, or the first ``lengths[b]`` tokens of row ``b``
        with ``lengths``: right-padded prompts of different lengths) or a list of 1-D tensors (one prompt each,
        any lengths >= 1). With a plain ``[batch, seq]`` tensor and neither ``lengths`` nor ``eos_token_id`` the
        result is ``[batch, seq + max_new_tokens]`` (``idx`` followed by the new tokens); otherwise a list of 1-D
        tensors, prompt ``b`` followed by its new tokens: up to and including the first ``eos_token_id`` (an id or
        a collection of ids), or ``max_new_tokens`` of them (an int, or one per prompt). Each sequence of a batch
        gives the tokens it gives alone (greedy decoding; sampled draws follow the batch's generator stream).
        ``callback(step, tokens, active)``, if given, sees every step's new tokens (int64 ``[batch]``) and which
        sequences were still generating (bool ``[batch]``).

        Each new token is drawn from ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely
        tokens (all when ``top_k`` is None; ``top_k`` above ``vocab_size`` means all), by
        :func:`~genkernels.kernels.sampling.sample_categorical` (Gumbel-max on Philox draws seeded from
        ``generator``). **Greedy decoding** is ``temperature=0`` or ``top_k=1``: the token of largest logit
        (the lowest id among equal logits), and no random numbers are drawn.

        ``temperature`` is a finite number ``>= 0`` (``ValueError`` for NaN, Inf or a negative value). The
        softmax runs in fp32 on ``(logits - max) / temperature`` with the maximum's own term kept at 0, so any
        positive temperature is safe: one too small for fp32 (down to the smallest subnormal) makes every
        non-maximal token's probability 0 and draws among the tokens of largest logit (greedy, except that ties
        are broken at random).

        Prompts hold token ids in ``[0, vocab_size)`` of any integer dtype that can hold ``vocab_size - 1`` (one
        dtype for a list); the result has that dtype. An empty prompt is refused (there is nothing to condition
        on: start it with a token such as the tokenizer's BOS id).

        ``use_cache=True`` feeds the prompts once (prefill, right-padded) and then only the newest token per
        step, reading the earlier keys/values from a :class:`KVCache` that keeps each sequence's own length (the
        step's key/value is written at that position inside ``decode_attention``); ``use_cache=False`` recomputes
        the whole (right-padded) batch for every token. Both compute the same logits up to rounding, so greedy
        decoding gives the same tokens. Every step sees the whole sequence, so a prompt's length plus its
        ``max_new_tokens`` minus 1 must not exceed ``block_size``.
        """
        prompts, prompt_lengths = self._generation_prompts(idx, lengths)
        budgets = self._check_generate_args(prompts, prompt_lengths, max_new_tokens, temperature, top_k, use_cache,
                                            generator, eos_token_id, callback)
        stops = _stop_ids(eos_token_id, self.config.vocab_size)
        greedy = temperature == 0 or top_k == 1
        device = prompts.device
        steps = max(budgets, default=max_new_tokens if isinstance(max_new_tokens, int) else 0)
        tokens = torch.cat([prompts, prompts.new_zeros(prompts.shape[0], steps)], dim=1)
        ends = list(prompt_lengths)  # each sequence's length so far
        alive = [b for b, budget in enumerate(budgets) if budget > 0]  # the sequences still generating
        cache = None
        if use_cache and alive:
            capacity = max(prompts.shape[1], max(ends[b] + budgets[b] - 1 for b in alive))
            cache = self.new_kv_cache(len(alive), capacity, device=device)
        step_input = prompts[alive]
        rows = torch.tensor(alive, device=device)  # on the device: the alive sequences and their last positions
        last = torch.tensor([ends[b] - 1 for b in alive], device=device)
        for step in range(steps):
            if not alive:
                break
            if cache is None:
                logits = self(tokens[rows, :max(ends[b] for b in alive)])[0]
            else:
                logits = self(step_input, kv_cache=cache)[0]
                if step == 0 and cache.lengths != tuple(ends[b] for b in alive):
                    cache.trim([ends[b] for b in alive])  # right-padded prompts: forget the padding
            logits = logits[torch.arange(len(alive), device=device), last] if logits.shape[1] > 1 else logits[:, -1]
            new_tokens = _pick_token(logits.float(), greedy, temperature, top_k, generator).to(prompts.dtype)
            last = last + 1
            tokens[rows, last] = new_tokens[:, 0]
            if callback is not None:
                callback(step, rows, new_tokens[:, 0].long())
            new_ids = new_tokens[:, 0].tolist() if stops else None
            keep = []
            for i, b in enumerate(alive):
                ends[b] += 1
                budgets[b] -= 1
                if budgets[b] > 0 and not (new_ids is not None and new_ids[i] in stops):
                    keep.append(i)
            if len(keep) < len(alive):  # drop the finished sequences from the batch (and the cache)
                alive = [alive[i] for i in keep]
                new_tokens = new_tokens[keep]
                rows, last = rows[keep], last[keep]
                if cache is not None and keep:
                    cache.select(keep)
            step_input = new_tokens
        per_sequence = not isinstance(idx, torch.Tensor) or lengths is not None or eos_token_id is not None
        if not per_sequence:
            return tokens
        return [tokens[b, :ends[b]] for b in range(tokens.shape[0])]

    def _generation_prompts(self, idx: object, lengths: object) -> tuple[torch.Tensor, list[int]]:
        """The prompts as one right-padded ``[batch, longest]`` tensor and their lengths."""
        if isinstance(idx, (list, tuple)):
            if lengths is not None:
                raise ValueError("lengths is for a padded [batch, seq] idx; a list of prompts carries its own lengths")
            for b, prompt in enumerate(idx):
                check_integer_tensor(prompt, f"idx[{b}]")
                if prompt.dim() != 1:
                    raise ValueError(f"idx[{b}] must be a 1-D tensor of token ids; got {describe(prompt)}")
                if prompt.dtype != idx[0].dtype or prompt.device != idx[0].device:
                    raise ValueError(f"every prompt must have idx[0]'s dtype and device ({idx[0].dtype}, "
                                     f"{idx[0].device}); got idx[{b}] {describe(prompt)}")
            prompt_lengths = [int(prompt.shape[0]) for prompt in idx]
            if not idx:
                device = self.transformer.wte.weight.device
                return torch.zeros(0, 1, dtype=torch.long, device=device), []
            padded = idx[0].new_zeros(len(idx), max(max(prompt_lengths), 1))
            for b, prompt in enumerate(idx):
                padded[b, :prompt.shape[0]] = prompt
        else:
            check_integer_tensor(idx, "idx")
            if idx.dim() != 2:
                raise ValueError(f"idx must be [batch, seq] (or a list of 1-D prompts); got {describe(idx)}")
            padded = idx
            if lengths is None:
                prompt_lengths = [idx.shape[1]] * idx.shape[0]
            else:
                values = lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths
                if not isinstance(values, (list, tuple)) or len(values) != idx.shape[0]:
                    raise ValueError(f"lengths must hold one prompt length per row of idx ({idx.shape[0]}); got "
                                     f"{lengths!r}")
                prompt_lengths = [check_int(length, "lengths") for length in values]
                if any(not 0 <= length <= idx.shape[1] for length in prompt_lengths):
                    raise ValueError(f"lengths must lie in [0, seq={idx.shape[1]}]; got {prompt_lengths}")
        empty = [b for b, length in enumerate(prompt_lengths) if length == 0]
        if empty:
            raise ValueError(f"prompt {empty[0]} is empty: generation needs at least one token to condition on "
                             "(start the prompt with a token, e.g. the tokenizer's BOS id)")
        return padded, prompt_lengths

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

    def _check_generate_args(self, prompts, prompt_lengths, max_new_tokens, temperature, top_k, use_cache,
                             generator, eos_token_id, callback) -> list[int]:
        """Check generate's arguments; return each prompt's budget of new tokens."""
        if isinstance(max_new_tokens, (list, tuple)):
            if len(max_new_tokens) != len(prompt_lengths):
                raise ValueError(f"max_new_tokens must be an int or hold one count per prompt "
                                 f"({len(prompt_lengths)}); got {len(max_new_tokens)} counts")
            budgets = [check_int(count, "max_new_tokens") for count in max_new_tokens]
        else:
            budgets = [check_int(max_new_tokens, "max_new_tokens")] * len(prompt_lengths)
        negative = [count for count in budgets if count < 0]
        if negative:
            raise ValueError(f"max_new_tokens={negative[0]} must be >= 0")
        if prompts.shape[0] > 0:
            self._check_idx(prompts, None)
        largest_id = self.config.vocab_size - 1
        if prompts.dtype != torch.int64 and torch.iinfo(prompts.dtype).max < largest_id:
            raise TypeError(f"idx is {prompts.dtype}, which cannot hold the generated token ids (up to {largest_id}); "
                            "pass idx as torch.int64 or torch.int32")
        for b, (length, count) in enumerate(zip(prompt_lengths, budgets)):
            if length + count - 1 > self.config.block_size:
                raise ValueError(f"prompt {b} has {length} tokens and max_new_tokens={count}: its last step would "
                                 f"see {length + count - 1} tokens, more than block_size={self.config.block_size}")
        check_real(temperature, "temperature", low=0.0)
        if top_k is not None and check_int(top_k, "top_k") < 1:
            raise ValueError(f"top_k={top_k} must be None or >= 1")
        check_bool(use_cache, "use_cache")
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
            if generator.device.type != prompts.device.type:
                raise ValueError(f"generator is on {generator.device}; idx is on {prompts.device}")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable (step, sequence indices, new tokens); got "
                            f"{type(callback).__name__}")
        return budgets

    # ------------------------------------------------------------------------------------------------------------
    # transformers GPT-2 <-> GPT

    @classmethod
    def from_hf(cls, model_or_state_dict, config=None) -> "GPT":
        """The same language model as a transformers GPT-2, with its weights (copied).

        ``model_or_state_dict`` is a ``GPT2LMHeadModel`` or ``GPT2Model`` (its ``config`` is read; ``config`` must
        then be None), or the state_dict of either together with ``config``: a ``GPT2Config``, a mapping of its
        fields (missing ones take GPT-2's defaults) or a :class:`GPTConfig`. GPT-2's ``Conv1D`` weights (stored
        ``[in, out]``) are transposed into ``nn.Linear`` layout; ``c_attn``'s ``[q | k | v]`` columns are the
        packed QKV projection as they are. The result has the weights' dtype and device and, for a model, its
        training mode.

        The config maps as: ``n_positions`` -> ``block_size``, ``layer_norm_epsilon`` -> ``norm_eps``,
        ``activation_function`` "gelu" -> "gelu", "gelu_new" / "gelu_pytorch_tanh" -> "gelu_tanh"; ``vocab_size``,
        ``n_embd``, ``n_layer``, ``n_head`` as they are. ``GPT`` has no dropout: ``*_pdrop`` are ignored, so the
        outputs equal the GPT-2's in eval mode (or with zero dropout). ``ValueError`` naming the key for what
        ``GPT`` cannot express: ``n_inner`` other than ``4 * n_embd``, ``scale_attn_weights=False``,
        ``scale_attn_by_inverse_layer_idx``, ``reorder_and_upcast_attn``, ``add_cross_attention``, untied output
        embeddings (``tie_word_embeddings=False``), another ``activation_function`` or ``model_type``.
        """
        if isinstance(model_or_state_dict, nn.Module):
            name = type(model_or_state_dict).__name__
            if name not in ("GPT2LMHeadModel", "GPT2Model") or not hasattr(model_or_state_dict, "config"):
                raise TypeError(f"from_hf converts a transformers GPT2LMHeadModel or GPT2Model (or their state_dict "
                                f"with config=); got {name}")
            if config is not None:
                raise ValueError("config must be None when a GPT-2 model is given (its own config is read)")
            config, state = model_or_state_dict.config, model_or_state_dict.state_dict()
            training = model_or_state_dict.training
        elif isinstance(model_or_state_dict, Mapping):
            if config is None:
                raise ValueError("config is required with a state_dict (n_head cannot be read from the weights): "
                                 "pass the GPT2Config, a mapping of its fields, or a GPTConfig")
            state, training = model_or_state_dict, True
        else:
            raise TypeError(f"model_or_state_dict must be a transformers GPT-2 model or its state_dict; got "
                            f"{type(model_or_state_dict).__name__}")
        gpt_config = config if isinstance(config, GPTConfig) else gpt_config_from_hf(config)
        if gpt_config.n_kv_head != gpt_config.n_head or not gpt_config.bias:
            raise ValueError(f"config: n_kv_head={gpt_config.n_kv_head} with n_head={gpt_config.n_head} and "
                             f"bias={gpt_config.bias}: a GPT-2 has n_kv_head = n_head and bias=True")
        with torch.device("meta"):
            model = cls(gpt_config)
        model.load_state_dict(_state_dict_from_hf(state, gpt_config), strict=True, assign=True)
        model.lm_head.weight = model.transformer.wte.weight  # assign=True gave the two keys separate parameters
        left = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if left:
            raise RuntimeError(f"the conversion left {left[:4]} unloaded")
        return model.train(training)

    def hf_config_dict(self) -> dict:
        """The ``GPT2Config`` fields of this model (``GPT2Config(**gpt.hf_config_dict())``); dropout 0, as GPT has
        none. ``ValueError`` naming ``n_kv_head`` or ``bias`` for a model GPT-2 cannot express (grouped-query
        attention, no biases)."""
        config = self.config
        if config.n_kv_head != config.n_head:
            raise ValueError(f"n_kv_head={config.n_kv_head} (grouped-query attention) has no GPT-2 equivalent: "
                             f"GPT-2 has n_head={config.n_head} key/value heads")
        if not config.bias:
            raise ValueError("bias=False has no GPT-2 equivalent: GPT-2's layers and LayerNorms all have biases")
        return dict(vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
                    n_layer=config.n_layer, n_head=config.n_head, n_inner=None,
                    activation_function=_HF_ACTIVATION_NAMES[config.activation],
                    layer_norm_epsilon=config.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                    scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
                    add_cross_attention=False, tie_word_embeddings=True,
                    # GPT-2's <|endoftext|> where the vocabulary has it (transformers rejects ids outside it)
                    bos_token_id=_GPT2_END_OF_TEXT if config.vocab_size > _GPT2_END_OF_TEXT else None,
                    eos_token_id=_GPT2_END_OF_TEXT if config.vocab_size > _GPT2_END_OF_TEXT else None)

    def to_hf_state_dict(self) -> dict:
        """This model's weights under a ``GPT2LMHeadModel``'s state_dict keys (copies; ``Conv1D`` layout, i.e. the
        Linear weights transposed; ``lm_head.weight`` is the same tensor as ``transformer.wte.weight``). Raises
        as :meth:`hf_config_dict` for a model GPT-2 cannot express."""
        self.hf_config_dict()
        ours = {name: tensor.detach() for name, tensor in self.state_dict().items()}
        theirs = {}
        for name in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"):
            theirs[f"transformer.{name}"] = ours[f"transformer.{name}"].clone()
        for i in range(self.config.n_layer):
            for hf_name, our_name, transpose in _HF_BLOCK_LAYERS:
                for suffix in ("weight", "bias"):
                    tensor = ours[f"transformer.h.{i}.{our_name}.{suffix}"]
                    tensor = tensor.t() if transpose and suffix == "weight" else tensor
                    theirs[f"transformer.h.{i}.{hf_name}.{suffix}"] = tensor.contiguous().clone()
        theirs["lm_head.weight"] = theirs["transformer.wte.weight"]
        return theirs

    def to_hf(self):
        """A transformers ``GPT2LMHeadModel`` computing what this model computes (weights copied, tied output
        embedding; this model's dtype, device and training mode; dropout 0)."""
        from transformers import GPT2Config, GPT2LMHeadModel

        with torch.device("meta"):
            model = GPT2LMHeadModel(GPT2Config(**self.hf_config_dict()))
        model.load_state_dict(self.to_hf_state_dict(), strict=True, assign=True)
        model.lm_head.weight = model.transformer.wte.weight
        left = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if left:
            raise RuntimeError(f"the conversion left {left[:4]} unloaded")
        return model.train(self.training)

# ----------------------------------------------------------------------------------------------------------------
# transformers GPT-2 configurations and weights

# GPT2Config's defaults of the fields the conversion reads (a mapping without a field means the default).
_GPT2_DEFAULTS = dict(model_type="gpt2", vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                      n_inner=None, activation_function="gelu_new", layer_norm_epsilon=1e-5,
                      scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
                      add_cross_attention=False, tie_word_embeddings=True)
# transformers' activation names -> GPTConfig.activation (the same function; gelu_new is GPT-2's tanh GELU)
_ACTIVATIONS_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
_HF_ACTIVATION_NAMES = {"gelu": "gelu", "gelu_tanh": "gelu_new"}
_GPT2_END_OF_TEXT = 50256
# (GPT-2 layer, our layer, Conv1D weight to transpose) inside block h.{i}
_HF_BLOCK_LAYERS = (("ln_1", "ln_1", False), ("attn.c_attn", "attn.qkv_proj", True),
                    ("attn.c_proj", "attn.out_proj", True), ("ln_2", "ln_2", False), ("mlp.c_fc", "mlp.c_fc", True),
                    ("mlp.c_proj", "mlp.c_proj", True))


def gpt_config_from_hf(config) -> GPTConfig:
    """The :class:`GPTConfig` of a transformers ``GPT2Config`` (or a mapping of its fields; missing fields take
    GPT-2's defaults). ``ValueError`` naming the key of a setting :class:`GPT` cannot express (see
    :meth:`GPT.from_hf`)."""
    if isinstance(config, Mapping):
        values = {key: config.get(key, default) for key, default in _GPT2_DEFAULTS.items()}
    elif hasattr(config, "n_embd") and hasattr(config, "to_dict"):
        values = {key: getattr(config, key, default) for key, default in _GPT2_DEFAULTS.items()}
    else:
        raise TypeError(f"config must be a GPT2Config, a mapping of its fields or a GPTConfig; got "
                        f"{type(config).__name__}")

    def refuse(key: str, expected: str) -> ValueError:
        return ValueError(f"cannot convert this GPT-2 config: {key}={values[key]!r} is not supported; GPT takes "
                          f"{expected}")

    if values["model_type"] != "gpt2":
        raise refuse("model_type", "'gpt2'")
    fixed = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
             "add_cross_attention": False, "tie_word_embeddings": True}
    for key, value in fixed.items():
        if values[key] is not value:
            raise refuse(key, f"{value} only")
    if values["activation_function"] not in _ACTIVATIONS_FROM_HF:
        raise refuse("activation_function", f"one of {sorted(_ACTIVATIONS_FROM_HF)}")
    n_embd = values["n_embd"]
    if values["n_inner"] is not None and values["n_inner"] != 4 * check_int(n_embd, "n_embd"):
        raise refuse("n_inner", f"None or 4 * n_embd = {4 * n_embd}")
    try:
        return GPTConfig(vocab_size=values["vocab_size"], block_size=values["n_positions"],
                         n_layer=values["n_layer"], n_head=values["n_head"], n_kv_head=None, n_embd=n_embd,
                         bias=True, activation=_ACTIVATIONS_FROM_HF[values["activation_function"]],
                         norm_eps=values["layer_norm_epsilon"])
    except (TypeError, ValueError) as error:
        raise type(error)(f"cannot convert this GPT-2 config: {error} (GPTConfig's block_size is GPT-2's "
                          "n_positions, norm_eps its layer_norm_epsilon)") from error


def _state_dict_from_hf(state: Mapping, config: GPTConfig) -> dict:
    """A :class:`GPT` state_dict from a ``GPT2LMHeadModel`` / ``GPT2Model`` state_dict (copies). ``ValueError``
    for missing, unexpected or misshapen weights, and for an output head that is not the token embedding."""
    prefix = "transformer."
    theirs = {(key[len(prefix):] if key.startswith(prefix) else key): tensor for key, tensor in state.items()}
    head = theirs.pop("lm_head.weight", None)
    for i in range(config.n_layer):  # the causal-mask buffers of older transformers releases
        for buffer in (f"h.{i}.attn.bias", f"h.{i}.attn.masked_bias"):
            theirs.pop(buffer, None)
    used, ours = set(), {}

    def take(key: str) -> torch.Tensor:
        if key not in theirs:
            raise ValueError(f"the GPT-2 state_dict has no {key!r} (expected n_layer={config.n_layer} blocks)")
        used.add(key)
        return theirs[key].detach()

    for name in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"):
        ours[f"transformer.{name}"] = take(name).clone()
    for i in range(config.n_layer):
        for hf_name, our_name, transpose in _HF_BLOCK_LAYERS:
            for suffix in ("weight", "bias"):
                tensor = take(f"h.{i}.{hf_name}.{suffix}")
                tensor = tensor.t() if transpose and suffix == "weight" else tensor
                ours[f"transformer.h.{i}.{our_name}.{suffix}"] = tensor.contiguous().clone()
    unexpected = sorted(set(theirs) - used)
    if unexpected:
        raise ValueError(f"the GPT-2 state_dict holds weights GPT has no place for: {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''} (n_layer={config.n_layer})")
    wte = ours["transformer.wte.weight"]
    if head is not None and not (head.shape == wte.shape and torch.equal(head.detach().to(wte.device), wte)):
        raise ValueError("tie_word_embeddings: the state_dict's lm_head.weight differs from transformer.wte.weight, "
                         "and GPT's output head is tied to its token embedding")
    ours["lm_head.weight"] = wte
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in GPT(config).state_dict().items()}
    wrong = [f"{name}: {tuple(t.shape)}, expected {expected[name]}" for name, t in ours.items()
             if tuple(t.shape) != expected[name]]
    if wrong:
        raise ValueError(f"the GPT-2 state_dict does not match its config: {'; '.join(wrong[:4])}")
    return ours

def _stop_ids(eos_token_id: object, vocab_size: int) -> set:
    """``eos_token_id`` (None, an id, or a collection of ids in ``[0, vocab_size)``) as a set of ids."""
    if eos_token_id is None:
        return set()
    ids = [eos_token_id] if isinstance(eos_token_id, int) and not isinstance(eos_token_id, bool) else eos_token_id
    if not isinstance(ids, (list, tuple, set, frozenset)):
        raise TypeError(f"eos_token_id must be None, an int or a collection of ints; got {eos_token_id!r}")
    ids = {check_int(token, "eos_token_id") for token in ids}
    if any(not 0 <= token < vocab_size for token in ids):
        raise ValueError(f"eos_token_id must lie in [0, vocab_size={vocab_size}); got {sorted(ids)}")
    return ids


def _widened(ids: torch.Tensor) -> torch.Tensor:
    """Token ids in a dtype nn.Embedding takes (and that compares with the vocabulary bounds exactly: a uint8 or
    int8 tensor would wrap the bound); int64/int32 ids as they are."""
    return ids if ids.dtype in EMBEDDING_DTYPES else ids.long()


def _pick_token(logits: torch.Tensor, greedy: bool, temperature: float, top_k: Optional[int],
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """One token id per row of ``logits`` ``[batch, vocab]`` (fp32), as ``[batch, 1]``: argmax when ``greedy``
    (the lowest id among equal logits), else a draw from ``softmax(logits / temperature)`` over the ``top_k``
    largest logits, by the fused sampler :func:`~genkernels.kernels.sampling.sample_categorical` (Gumbel-max on
    Philox uniforms seeded from ``generator``).

    The sampler scales ``logits - max`` with the maximum's own term kept at exactly 0, so a temperature too small
    for fp32 gives all the probability to the largest logit(s) instead of NaN."""
    return sample_categorical(logits, temperature=0.0 if greedy else temperature, top_k=top_k,
                              generator=generator).unsqueeze(1)
