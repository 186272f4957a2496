"""Attention cases: flash_attention forward, backward and forward+backward TFLOP/s against every SDPA backend,
and decode_attention GB/s over a KV cache.

Shapes follow FlashAttention's benchmarks: 16k tokens per batch (``batch = 16384 // seq``) and a model width of
2048 (``heads = 2048 // head_dim``), multi-head (``heads_kv = heads``) so every SDPA backend can run them.

FLOPs per call (matmuls only): forward ``4 * batch * heads * seq_q * seq_k * head_dim`` (QK^T and PV), halved when
causal; backward 2.5x forward (five matmuls, one of them the recomputed QK^T); forward+backward 3.5x forward.
Backward rows time ``torch.autograd.grad`` on a graph recorded once (``retain_graph``) and report dq's error.

Decode traffic per call: the key and value caches read once (``2 * batch * heads_kv * cache_len * head_dim``
elements), plus ``q`` read and the output written; grouped-query (32 query heads over 8 key/value heads), every
sequence attending to the whole cache.

Peak memory of forward+backward is recorded in the notes of the largest forward+backward cases on a GPU (one
extra call per provider in the case's setup, ``torch.cuda.max_memory_allocated`` above the inputs).

``attention.sdpa_{forward,fwd_bwd}[...]``: :func:`~genkernels.kernels.scaled_dot_product_attention` (SDPA's
signature; ``impl="triton"`` for ours) on the same shapes (two sequences at the CPU size, so that the mask is
ragged), in two variants:

* ``key_padding``: a boolean key-padding mask ``[batch, 1, 1, seq]`` (True = a real token), each sequence with its
  own valid length drawn in ``[seq / 2, seq]``. FLOPs count the visible keys only: ``4 * heads * seq * head_dim *
  sum(lengths)`` for the forward (times the pass factor above). The error column is against an fp64 reference
  computed one (sample, head) at a time.
* ``dropout0.1``: ``dropout_p=0.1`` and no mask; FLOPs as the unmasked forward. Every provider calls
  ``torch.manual_seed`` first. Dropout draws its Philox seed from torch's default generator, so the reference is
  the same call under ``impl="eager"`` in fp32 after the same seed: the same dropout mask. SDPA's backends and
  ``torch.compile`` (inductor's own random streams) draw other masks: their rows have no error column.

SDPA backends that cannot take a variant's inputs (the flash backend takes no mask; on a CPU it takes no dropout)
are found with a call on one (sample, head) in the case's setup and named in its notes instead of failing.
"""
from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from genkernels.kernels.attention import (
    attention_reference,
    decode_attention,
    decode_attention_reference,
    flash_attention,
)
from genkernels.kernels.sdpa import scaled_dot_product_attention, sdpa_reference

from ..providers import torch_compile, unavailable
from ..registry import Case, Workload, case_builder, seeded_generator

MODEL_WIDTH = 2048
TOKENS_PER_BATCH = 16384
SDPA_BACKENDS = {
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_math": SDPBackend.MATH,
}
# (head_dim, seq) pairs and causal flags per size; "full" is the grid: head dims 64/128, seq 1k-16k.
TRAINING_SHAPES = {
    "cpu": [(64, 64)],
    "quick": [(64, 4096), (128, 2048), (128, 8192)],
    "full": [(d, s) for d in (64, 128) for s in (1024, 2048, 4096, 8192, 16384)],
}
DECODE_CACHE_LENGTHS = {"cpu": [96], "quick": [4096, 32768], "full": [1024, 2048, 4096, 8192, 16384, 32768]}
DECODE_SHAPE = {"cpu": (2, 4, 2, 64), "quick": (8, 32, 8, 128), "full": (8, 32, 8, 128)}  # batch, hq, hkv, d
PASSES = ("forward", "backward", "fwd_bwd")
FLOP_FACTOR = {"forward": 1.0, "backward": 2.5, "fwd_bwd": 3.5}
# The key-padding-mask and dropout cases: (head_dim, seq) per size ("full": head dims 64/128, seq 1k-4k).
SDPA_SHAPES = {
    "cpu": [(64, 64)],
    "quick": [(64, 2048), (128, 4096)],
    "full": [(d, s) for d in (64, 128) for s in (1024, 2048, 4096)],
}
SDPA_VARIANTS = ("key_padding", "dropout")
SDPA_PASSES = ("forward", "fwd_bwd")
DROPOUT_P = 0.1
DROPOUT_SEED = 1234


def _training_shape(size: str, head_dim: int, seq: int) -> tuple[int, int]:
    """(batch, heads) for ``seq``: FlashAttention's 16k tokens and width 2048 on a GPU, tiny on the CPU."""
    if size == "cpu":
        return 1, 2
    return max(1, TOKENS_PER_BATCH // seq), MODEL_WIDTH // head_dim


def _sdpa(backend):
    def attention(q, k, v, **options):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, **options)
    return attention


def _attention_functions(causal: bool) -> dict:
    """``name -> fn(q, k, v)`` for every provider: ours, the eager reference, torch.compile of it, SDPA."""
    compiled = torch_compile(functools.partial(flash_attention, impl="eager", causal=causal))
    functions = {
        "triton": lambda q, k, v: flash_attention(q, k, v, causal=causal, impl="triton"),
        "eager": lambda q, k, v: flash_attention(q, k, v, causal=causal, impl="eager"),
        "compile": compiled,
    }
    for name, backend in SDPA_BACKENDS.items():
        functions[name] = functools.partial(_sdpa(backend), is_causal=causal)
    return functions


def _per_head_reference(q, k, v, grad_out, want_grad: bool, attend) -> torch.Tensor:
    """fp64 output (or dq) computed one (sample, head) at a time, so the score matrix of one head fits;
    ``attend(sample, q, k, v)`` is the reference attention of one head of ``sample``."""
    result = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            qh, kh, vh = (x[b:b + 1, h:h + 1].double() for x in (q, k, v))
            if want_grad:
                qh.requires_grad_()
                out = attend(b, qh, kh, vh)
                result[b, h] = torch.autograd.grad(out, qh, grad_out[b:b + 1, h:h + 1].double())[0][0, 0]
            else:
                result[b, h] = attend(b, qh, kh, vh)[0, 0]
    return result


def _pass_call(fn, q, k, v, grad_out, which: str):
    """A zero-argument call that runs pass ``which`` of ``fn``; backward and fwd_bwd return dq."""
    if which == "forward":
        return lambda: fn(q, k, v)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    if which == "fwd_bwd":
        return lambda: torch.autograd.grad(fn(*leaves), leaves, grad_out)[0]
    recorded = {}

    def backward():
        if "out" not in recorded:  # the untimed first call records the graph
            recorded["out"] = fn(*leaves)
        return torch.autograd.grad(recorded["out"], leaves, grad_out, retain_graph=True)[0]
    return backward


def _peak_memory_notes(calls: dict, device: torch.device) -> str:
    """``peak MiB above the inputs`` of one call per provider (CUDA only)."""
    if device.type != "cuda":
        return ""
    parts = []
    for name, call in calls.items():
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            call()
            torch.cuda.synchronize(device)
            parts.append(f"{name} {(torch.cuda.max_memory_allocated(device) - base) / 2**20:.0f}")
        except torch.cuda.OutOfMemoryError:
            parts.append(f"{name} out of memory")
        except RuntimeError as error:  # a backend that does not support the shape
            parts.append(f"{name} failed ({str(error).splitlines()[0][:60]})")
    return "; peak MiB of fwd+bwd above the inputs: " + ", ".join(parts)


def _training(size: str, head_dim: int, seq: int, causal: bool, which: str, record_memory: bool):
    def setup(device):
        batch, heads = _training_shape(size, head_dim, seq)
        generator = seeded_generator(device, 0)
        q, k, v, grad_out = (torch.randn((batch, heads, seq, head_dim), generator=generator, device=device)
                             .to(torch.bfloat16) for _ in range(4))
        calls = {name: _pass_call(fn, q, k, v, grad_out, which) for name, fn in _attention_functions(causal).items()}
        flops = 4 * batch * heads * seq * seq * head_dim * (0.5 if causal else 1.0) * FLOP_FACTOR[which]
        notes = "error column: dq" if which != "forward" else ""
        if record_memory:
            notes += _peak_memory_notes(calls, device)
        return Workload(calls, flops=int(flops), notes=notes.lstrip("; "),
                        reference=lambda: _per_head_reference(
                            q, k, v, grad_out, which != "forward",
                            lambda sample, qh, kh, vh: attention_reference(qh, kh, vh, causal)))
    return setup


def _valid_lengths(batch: int, seq: int) -> torch.Tensor:
    """Each sequence's count of real tokens, drawn in ``[seq / 2, seq]`` on the host (the FLOP count reads them)."""
    return torch.randint(seq // 2, seq + 1, (batch,), generator=torch.Generator().manual_seed(2))


def _key_padding_mask(lengths: torch.Tensor, seq: int, device: torch.device) -> torch.Tensor:
    """``[batch, 1, 1, seq]`` bool: key ``j`` of sequence ``b`` takes part iff ``j < lengths[b]``."""
    keys = torch.arange(seq, device=device)
    return (keys < lengths.to(device)[:, None])[:, None, None, :]


def _seeded(fn):
    """``fn`` after ``torch.manual_seed(DROPOUT_SEED)``: every call draws the same dropout mask."""
    def call(*tensors):
        torch.manual_seed(DROPOUT_SEED)
        return fn(*tensors)
    return call


def _without_error_column(call):
    """``call`` returning nothing, so that its row has no error column: its dropout mask is drawn from another
    random stream than the reference's, so its output cannot be compared with it."""
    def run():
        call()
    return run


def _backends_taking(q, k, v, options: dict, device: torch.device) -> tuple[dict, list[str]]:
    """``(name -> backend, refused names)``: the SDPA backends that take these inputs, found by a call on one
    (sample, head). Backends that cannot exist on ``device`` are kept (the runner lists them as not available
    here), and on meta tensors nothing is tried (peers are never run there)."""
    taking, refused = {}, []
    one_head = [x[:1, :1] for x in (q, k, v)]
    head_options = {name: value[:1] if isinstance(value, torch.Tensor) else value for name, value in options.items()}
    for name, backend in SDPA_BACKENDS.items():
        if device.type != "meta" and unavailable(name, device) is None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # a backend says why it refuses before raising
                    _sdpa(backend)(*one_head, **head_options)
            except RuntimeError:
                refused.append(name)
                continue
        taking[name] = backend
    return taking, refused


def _dropout_reference(q, k, v, grad_out, which: str):
    """The dropout call under ``impl="eager"`` in fp32 after the same seed (so the same mask): output, or dq."""
    def attention(*tensors):
        return scaled_dot_product_attention(*tensors, dropout_p=DROPOUT_P, impl="eager")
    return _pass_call(_seeded(attention), q.float(), k.float(), v.float(), grad_out.float(), which)


def _sdpa_masked_or_dropout(size: str, head_dim: int, seq: int, variant: str, which: str):
    def setup(device):
        batch, heads = (2, 2) if size == "cpu" else _training_shape(size, head_dim, seq)
        generator = seeded_generator(device, 0)
        q, k, v, grad_out = (torch.randn((batch, heads, seq, head_dim), generator=generator, device=device)
                             .to(torch.bfloat16) for _ in range(4))
        if variant == "key_padding":
            lengths = _valid_lengths(batch, seq)
            mask = _key_padding_mask(lengths, seq, device)
            options = {"attn_mask": mask}
            flops = 4 * heads * seq * head_dim * int(lengths.sum()) * FLOP_FACTOR[which]
            notes = [f"key-padding mask, valid lengths {lengths.tolist()}"]
        else:
            options = {"dropout_p": DROPOUT_P}
            flops = 4 * batch * heads * seq * seq * head_dim * FLOP_FACTOR[which]
            notes = [f"dropout_p {DROPOUT_P}, torch.manual_seed before every call; compile and SDPA draw other "
                     "masks: no error column"]
        compiled = torch_compile(functools.partial(scaled_dot_product_attention, impl="eager"))
        functions = {
            "triton": lambda q, k, v: scaled_dot_product_attention(q, k, v, impl="triton", **options),
            "eager": lambda q, k, v: scaled_dot_product_attention(q, k, v, impl="eager", **options),
            "compile": lambda q, k, v: compiled(q, k, v, **options),
        }
        backends, refused = _backends_taking(q, k, v, options, device)
        functions.update({name: functools.partial(_sdpa(backend), **options) for name, backend in backends.items()})
        if variant == "dropout":
            functions = {name: _seeded(fn) for name, fn in functions.items()}
        calls = {name: _pass_call(fn, q, k, v, grad_out, which) for name, fn in functions.items()}
        if variant == "dropout":
            calls = {name: call if name in ("triton", "eager") else _without_error_column(call)
                     for name, call in calls.items()}
            reference = _dropout_reference(q, k, v, grad_out, which)
        else:
            reference = functools.partial(_per_head_reference, q, k, v, grad_out, which != "forward",
                                          lambda sample, qh, kh, vh: sdpa_reference(qh, kh, vh,
                                                                                    mask[sample:sample + 1]))
        if which != "forward":
            notes.append("error column: dq")
        if refused:
            notes.append(f"{', '.join(refused)} cannot take these inputs")
        return Workload(calls, flops=int(flops), reference=reference, notes="; ".join(notes))
    return setup


def _decode_tensors(size: str, cache_len: int, device, generator):
    """bf16 ``q [batch, heads_q, 1, d]`` and the caches ``[batch, heads_kv, cache_len, d]`` of a decode case."""
    batch, heads_q, heads_kv, head_dim = DECODE_SHAPE[size]
    q = torch.randn((batch, heads_q, 1, head_dim), generator=generator, device=device).to(torch.bfloat16)
    k_cache, v_cache = (torch.randn((batch, heads_kv, cache_len, head_dim), generator=generator, device=device)
                        .to(torch.bfloat16) for _ in range(2))
    return q, k_cache, v_cache


def _decode(size: str, cache_len: int):
    def setup(device):
        batch = DECODE_SHAPE[size][0]
        q, k_cache, v_cache = _decode_tensors(size, cache_len, device, seeded_generator(device, 0))
        seqlens = torch.full((batch,), cache_len, dtype=torch.int32, device=device)
        compiled = torch_compile(functools.partial(decode_attention, impl="eager"))
        calls = {
            "triton": lambda: decode_attention(q, k_cache, v_cache, seqlens, impl="triton"),
            "eager": lambda: decode_attention(q, k_cache, v_cache, seqlens, impl="eager"),
            "compile": lambda: compiled(q, k_cache, v_cache, seqlens),
        }
        for name, backend in SDPA_BACKENDS.items():
            def sdpa(backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k_cache, v_cache, enable_gqa=True)
            calls[name] = sdpa
        traffic = (2 * k_cache.numel() + 2 * q.numel()) * q.element_size()
        return Workload(calls, bytes_moved=traffic,
                        reference=lambda: decode_attention_reference(q.double(), k_cache.double(),
                                                                     v_cache.double(), seqlens),
                        notes="every sequence attends to the whole cache (SDPA runs on the full cache)")
    return setup


def _decode_append(size: str, cache_len: int):
    """A ragged decoding step: every sequence at its own length (between half the cache and its last free slot)
    appends the step's key/value inside the decode launch and attends to them with its cached positions."""
    def setup(device):
        batch, _, heads_kv, head_dim = DECODE_SHAPE[size]
        generator = seeded_generator(device, 1)
        q, k_cache, v_cache = _decode_tensors(size, cache_len, device, generator)
        k_new, v_new = (torch.randn((batch, heads_kv, 1, head_dim), generator=generator, device=device)
                        .to(torch.bfloat16) for _ in range(2))
        seqlens = torch.randint(cache_len // 2, cache_len, (batch,), generator=generator, device=device,
                                dtype=torch.int32)
        compiled = torch_compile(functools.partial(decode_attention, impl="eager"))
        calls = {  # the step writes the same slots every call, so repeated calls time the same work
            "triton": lambda: decode_attention(q, k_cache, v_cache, seqlens, k=k_new, v=v_new, impl="triton"),
            "eager": lambda: decode_attention(q, k_cache, v_cache, seqlens, k=k_new, v=v_new, impl="eager"),
            "compile": lambda: compiled(q, k_cache, v_cache, seqlens, k=k_new, v=v_new),
        }

        def reference():
            keys, values = k_cache.double(), v_cache.double()
            rows = torch.arange(batch, device=device)
            keys[rows, :, seqlens.long()] = k_new[:, :, 0].double()
            values[rows, :, seqlens.long()] = v_new[:, :, 0].double()
            return decode_attention_reference(q.double(), keys, values, seqlens + 1)
        positions = int(seqlens.sum()) + batch if device.type != "meta" else batch * cache_len
        traffic = (2 * positions * heads_kv * head_dim + 2 * q.numel() + 2 * k_new.numel()) * q.element_size()
        return Workload(calls, bytes_moved=traffic, reference=reference,
                        notes="ragged lengths; the step's key/value written into the cache by the same launch")
    return setup


@case_builder
def attention_cases(size: str):
    shapes = TRAINING_SHAPES[size]
    longest = max(seq for _, seq in shapes)
    for head_dim, seq in shapes:
        for causal in (False, True):
            for which in PASSES:
                if size == "cpu" and (which, causal) not in (("forward", True), ("backward", False),
                                                             ("fwd_bwd", True)):
                    continue  # the interpreter smoke run keeps three cases
                params = {"dtype": "bfloat16", "head_dim": head_dim, "seq": seq, "causal": causal, "pass": which}
                tag = f"[bf16,d{head_dim},{'causal' if causal else 'full'},s{seq}]"
                record_memory = which == "fwd_bwd" and seq == longest
                yield Case(f"attention.{which}{tag}", "attention", "op", params,
                           _training(size, head_dim, seq, causal, which, record_memory))
    for cache_len in DECODE_CACHE_LENGTHS[size]:
        params = {"dtype": "bfloat16", "cache_len": cache_len, "shape": list(DECODE_SHAPE[size])}
        yield Case(f"attention.decode[bf16,cache{cache_len}]", "attention", "op", params, _decode(size, cache_len))
        yield Case(f"attention.decode_append[bf16,cache{cache_len},ragged]", "attention", "op", params,
                   _decode_append(size, cache_len))
    for head_dim, seq in SDPA_SHAPES[size]:
        for variant in SDPA_VARIANTS:
            for which in SDPA_PASSES:
                params = {"dtype": "bfloat16", "head_dim": head_dim, "seq": seq, "variant": variant, "pass": which}
                label = variant
                if variant == "dropout":
                    params["dropout_p"] = DROPOUT_P
                    label = f"dropout{DROPOUT_P}"
                yield Case(f"attention.sdpa_{which}[bf16,d{head_dim},{label},s{seq}]", "attention", "op", params,
                           _sdpa_masked_or_dropout(size, head_dim, seq, variant, which))
