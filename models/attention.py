"""Self-attention on the fused attention ops: a drop-in multi-head self-attention layer and a KV cache.

:class:`MultiheadSelfAttention` projects the input to queries, keys and values with one fused Linear, runs
:func:`~genkernels.kernels.attention.flash_attention` on strided views of the packed projection (no copies), and
projects the heads back. With fewer key/value heads than query heads it is grouped-query attention (GQA; one
key/value head is multi-query attention).

:class:`KVCache` holds every layer's keys and values for autoregressive sampling, preallocated as
``[batch, heads_kv, max_seq_len, head_dim]`` per layer with the number of filled positions of each sequence in
``cache_seqlens``, the layout :func:`~genkernels.kernels.attention.decode_attention` reads. Sequences may hold
different numbers of positions (ragged batches: prompts of different lengths). One sampling step is::

    cache.advance(num_new_tokens)          # claim the next positions, once per model call
    for i, layer in enumerate(layers):     # every layer stores its new keys/values there and attends
        x = layer(x, kv_cache=cache, layer_idx=i)

A one-token step writes each sequence's new key/value at its own position inside the decode launch
(``decode_attention(..., k=, v=)``); a step of several tokens needs every sequence at the same length.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from genkernels.kernels.attention import MAX_HEAD_DIM, MIN_HEAD_DIM, decode_attention, flash_attention
from genkernels.kernels.checks import check_bool, check_float_tensor, check_int, describe


def _check_positive(value: object, name: str) -> int:
    number = check_int(value, name)
    if number < 1:
        raise ValueError(f"{name}={number} must be a positive integer")
    return number


def check_head_counts(embed_dim: int, num_heads: int, num_kv_heads: Optional[int],
                      names: tuple[str, str, str] = ("embed_dim", "num_heads", "num_kv_heads")) -> int:
    """Validate the head layout of a self-attention layer; return the number of key/value heads. ``names`` are
    the caller's names of the three sizes, for the error messages."""
    embed_name, heads_name, kv_name = names
    _check_positive(embed_dim, embed_name)
    _check_positive(num_heads, heads_name)
    if embed_dim % num_heads:
        raise ValueError(f"{embed_name}={embed_dim} must be divisible by {heads_name}={num_heads}")
    head_dim = embed_dim // num_heads
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"{embed_name}={embed_dim} / {heads_name}={num_heads} gives head_dim={head_dim}; the "
                         f"attention ops take head dims in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]")
    kv_heads = num_heads if num_kv_heads is None else _check_positive(num_kv_heads, kv_name)
    if num_heads % kv_heads:
        raise ValueError(f"{heads_name}={num_heads} must be a multiple of {kv_name}={kv_heads} "
                         "(each key/value head serves a whole group of query heads)")
    return kv_heads


class KVCache:
    """Keys and values of every layer of a decoder, preallocated for ``max_seq_len`` positions.

    ``keys[layer]`` and ``values[layer]`` are ``[batch, heads_kv, max_seq_len, head_dim]``; sequence ``b`` holds
    ``lengths[b]`` positions (a host tuple), which ``cache_seqlens`` (int32 ``[batch]``, on the cache's device)
    repeats for :func:`decode_attention`; ``seq_len`` is the longest. Positions past a sequence's length hold
    stale values that no attention reads.

    Protocol: :meth:`advance` claims ``n`` new positions of every sequence once per model call
    (``claim_starts``, on the device, keeps where the claim began); then every layer writes the keys and values
    of those positions, with :meth:`store` (every sequence at the same length) or, for one token per sequence,
    inside :func:`decode_attention` at ``claim_starts`` (any lengths), and attends to each sequence's positions.
    :meth:`trim` shortens sequences after a right-padded prefill of prompts of different lengths.

    ``num_layers``, ``num_kv_heads``, ``max_seq_len`` and ``head_dim`` are positive ints, ``batch_size`` an int
    ``>= 0`` (``TypeError`` for another type, ``ValueError`` out of range, naming the argument).
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_seq_len: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        self.num_layers = _check_positive(num_layers, "num_layers")
        batch = check_int(batch_size, "batch_size")
        if batch < 0:
            raise ValueError(f"batch_size={batch} must be >= 0")
        shape = (batch, _check_positive(num_kv_heads, "num_kv_heads"), _check_positive(max_seq_len, "max_seq_len"),
                 _check_positive(head_dim, "head_dim"))
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.is_complex:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.cache_seqlens = torch.zeros(batch, dtype=torch.int32, device=self.keys[0].device)
        self.claim_starts = torch.zeros_like(self.cache_seqlens)
        self.lengths: tuple[int, ...] = (0,) * batch

    @property
    def seq_len(self) -> int:
        """The longest sequence's number of positions (every sequence's, when they are all equal)."""
        return max(self.lengths, default=0)

    @property
    def is_ragged(self) -> bool:
        """Whether sequences hold different numbers of positions."""
        return len(set(self.lengths)) > 1

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.keys[0].shape[1]

    @property
    def max_seq_len(self) -> int:
        return self.keys[0].shape[2]

    @property
    def head_dim(self) -> int:
        return self.keys[0].shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    @property
    def device(self) -> torch.device:
        return self.keys[0].device

    def advance(self, num_tokens: int) -> None:
        """Claim the next ``num_tokens`` positions of every sequence: ``lengths[b] += num_tokens``."""
        count = _check_positive(num_tokens, "num_tokens")
        if self.seq_len + count > self.max_seq_len:
            raise ValueError(f"KVCache is full: {self.seq_len} positions cached + num_tokens={count} exceeds "
                             f"max_seq_len={self.max_seq_len}")
        self.lengths = tuple(length + count for length in self.lengths)
        self.claim_starts.copy_(self.cache_seqlens)
        self.cache_seqlens.add_(count)

    def trim(self, lengths) -> None:
        """Keep the first ``lengths[b]`` positions of sequence ``b`` (each ``<=`` its current length), e.g. the
        true prompt lengths after a prefill of right-padded prompts: the positions past them are forgotten."""
        if isinstance(lengths, torch.Tensor):
            lengths = lengths.tolist()
        lengths = tuple(check_int(length, "lengths") for length in lengths)
        if len(lengths) != self.batch_size or any(not 0 <= new <= old for new, old in zip(lengths, self.lengths)):
            raise ValueError(f"lengths must give each of the {self.batch_size} sequences a length in [0, its current "
                             f"length] (current {list(self.lengths)}); got {list(lengths)}")
        self.lengths = lengths
        self.cache_seqlens.copy_(torch.tensor(lengths, dtype=torch.int32))

    def store(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``key``/``value`` (``[batch, heads_kv, n, head_dim]``, any strides) into the ``n`` positions
        claimed last, ``[seq_len - n, seq_len)``, of layer ``layer_idx``; return that layer's whole caches."""
        layer = check_int(layer_idx, "layer_idx")
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer_idx={layer} is out of range for a KVCache of {self.num_layers} layers")
        for name, tensor in (("key", key), ("value", value)):
            check_float_tensor(tensor, name, (self.dtype,))
            expected = (self.batch_size, self.num_kv_heads, tensor.shape[2] if tensor.dim() == 4 else -1,
                        self.head_dim)
            if tensor.dim() != 4 or tuple(tensor.shape) != expected or tensor.device != self.device:
                raise ValueError(f"{name} must be [batch={self.batch_size}, heads_kv={self.num_kv_heads}, n, "
                                 f"head_dim={self.head_dim}] on {self.device}; got {describe(tensor)}")
        count = key.shape[2]
        if self.is_ragged:
            raise ValueError(f"store() writes the same positions of every sequence, but they hold different "
                             f"lengths {list(self.lengths)}: append one token per sequence with "
                             "decode_attention(..., k=, v=) instead")
        if value.shape[2] != count or not 1 <= count <= self.seq_len:
            raise ValueError(f"key and value must hold the same number n of new positions with 1 <= n <= seq_len "
                             f"(the positions claimed with advance(), seq_len={self.seq_len}); got key "
                             f"{describe(key)}, value {describe(value)}")
        start = self.seq_len - count
        self.keys[layer][:, :, start:self.seq_len].copy_(key)
        self.values[layer][:, :, start:self.seq_len].copy_(value)
        return self.keys[layer], self.values[layer]

    def select(self, rows) -> None:
        """Keep only the sequences ``rows`` (indices, in that order), e.g. to drop finished ones from a batch."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        if index.dim() != 1 or (index.numel() and not 0 <= int(index.min()) <= int(index.max()) < self.batch_size):
            raise ValueError(f"rows must be indices of the cache's {self.batch_size} sequences; got {rows!r}")
        self.keys = [keys.index_select(0, index) for keys in self.keys]
        self.values = [values.index_select(0, index) for values in self.values]
        self.cache_seqlens = self.cache_seqlens.index_select(0, index)
        self.claim_starts = self.claim_starts.index_select(0, index)
        self.lengths = tuple(self.lengths[i] for i in index.tolist())

    def reset(self) -> None:
        """Forget every cached position (the storage is kept for the next sequence)."""
        self.lengths = (0,) * self.batch_size
        self.cache_seqlens.zero_()
        self.claim_starts.zero_()


class MultiheadSelfAttention(nn.Module):
    """Multi-head self-attention with a fused QKV projection, optional causal mask and grouped-query attention.

    For ``x`` of shape ``[batch, seq, embed_dim]`` (batch first, like ``nn.MultiheadAttention(batch_first=True)``)
    and head dim ``d = embed_dim / num_heads``::

        [q | k | v] = x W_qkv^T + b_qkv          q: num_heads heads, k and v: num_kv_heads heads of size d
        o_h = softmax(q_h k_g^T / sqrt(d) + M) v_g,   g = h // (num_heads / num_kv_heads)
        y = concat_h(o_h) W_out^T + b_out

    with ``M`` the causal mask (``-inf`` above the diagonal) when ``causal``. ``num_kv_heads=None`` is standard
    multi-head attention, ``num_kv_heads=1`` multi-query attention. No dropout (for dropout-free training and
    inference, the common setting of modern decoders). :meth:`from_torch` loads the weights of an
    ``nn.MultiheadAttention``.
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: Optional[int] = None, *, causal: bool = False,
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.num_kv_heads = check_head_counts(embed_dim, num_heads, num_kv_heads)
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.causal = check_bool(causal, "causal")
        check_bool(bias, "bias")
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"dtype must be None or a floating-point torch.dtype, got {dtype!r}")
        factory = dict(device=device, dtype=dtype)
        self.qkv_proj = nn.Linear(embed_dim, (num_heads + 2 * self.num_kv_heads) * self.head_dim, bias=bias,
                                  **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention, *, causal: bool = False) -> "MultiheadSelfAttention":
        """The same layer as an ``nn.MultiheadAttention`` used for self-attention (its packed ``in_proj_weight``
        holds ``[W_q; W_k; W_v]``, which is this layer's QKV layout with ``num_kv_heads = num_heads``)."""
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"module must be an nn.MultiheadAttention, got {type(module).__name__}")
        reasons = []
        if not module._qkv_same_embed_dim:
            reasons.append("separate kdim/vdim projections")
        if module.bias_k is not None:
            reasons.append("add_bias_kv=True")
        if module.add_zero_attn:
            reasons.append("add_zero_attn=True")
        if module.dropout:
            reasons.append(f"dropout={module.dropout}")
        if reasons:
            raise ValueError(f"cannot convert this nn.MultiheadAttention: {'; '.join(reasons)}")
        weight = module.in_proj_weight
        layer = cls(module.embed_dim, module.num_heads, causal=causal, bias=module.in_proj_bias is not None,
                    device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.qkv_proj.weight.copy_(weight)
            layer.out_proj.weight.copy_(module.out_proj.weight)
            if module.in_proj_bias is not None:
                layer.qkv_proj.bias.copy_(module.in_proj_bias)
                layer.out_proj.bias.copy_(module.out_proj.bias)
        return layer

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"causal={self.causal}")

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``q, k, v`` as ``[batch, heads, seq, head_dim]`` strided views of the packed projection of ``x``."""
        batch, seq, _ = x.shape
        packed = self.qkv_proj(x).view(batch, seq, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        q, k, v = packed.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: torch.Tensor, *, kv_cache: Optional[KVCache] = None, layer_idx: int = 0) -> torch.Tensor:
        """Self-attention of ``x`` ``[batch, seq, embed_dim]``; returns ``[batch, seq, embed_dim]``.

        With ``kv_cache`` (causal layers only) ``x`` holds the newest ``seq`` tokens, whose positions the caller
        claimed with ``kv_cache.advance(seq)``: their keys/values are stored in layer ``layer_idx`` of the cache
        and the queries attend to every cached position. A single new token after earlier ones is one
        :func:`decode_attention` call; a prompt (or a chunk) uses :func:`flash_attention`.
        """
        self._check_input(x, kv_cache)
        q, k, v = self.split_heads(x)
        if kv_cache is None:
            out = flash_attention(q, k, v, causal=self.causal)
        else:
            out = self._attend_with_cache(q, k, v, kv_cache, layer_idx)
        batch, seq, _ = x.shape
        return self.out_proj(out.transpose(1, 2).reshape(batch, seq, self.embed_dim))

    def _attend_with_cache(self, q, k, v, cache: KVCache, layer_idx: int) -> torch.Tensor:
        new_tokens = q.shape[2]
        if new_tokens == 1 and cache.seq_len > 1:
            # one token after earlier ones: written at each sequence's own position inside the decode launch
            return decode_attention(q, cache.keys[layer_idx], cache.values[layer_idx], cache.claim_starts, k=k, v=v)
        k_cache, v_cache = cache.store(layer_idx, k, v)
        if new_tokens == cache.seq_len:  # prefill: nothing cached before, attend to the new keys directly
            return flash_attention(q, k, v, causal=True)
        # A chunk after cached tokens: bottom-right causal alignment lets query i see cached keys j <= i + offset.
        return flash_attention(q, k_cache[:, :, :cache.seq_len], v_cache[:, :, :cache.seq_len], causal=True)

    def _check_input(self, x: object, kv_cache: Optional[KVCache]) -> None:
        check_float_tensor(x, "x")
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be [batch, seq, embed_dim={self.embed_dim}]; got {describe(x)}")
        if kv_cache is None:
            return
        if not isinstance(kv_cache, KVCache):
            raise TypeError(f"kv_cache must be a KVCache, got {type(kv_cache).__name__}")
        if not self.causal:
            raise ValueError("kv_cache needs a causal layer (causal=True): a non-causal layer's earlier outputs "
                             "would change with every new token")
        if kv_cache.num_kv_heads != self.num_kv_heads or kv_cache.head_dim != self.head_dim:
            raise ValueError(f"kv_cache holds {kv_cache.num_kv_heads} key/value heads of dim {kv_cache.head_dim}; "
                             f"this layer has {self.num_kv_heads} of dim {self.head_dim}")

