"""The op contract, checked over every public op at once (README, "The op contract").

Each case below calls one public op on small inputs (gradients included where the op has a backward). From those
calls the tests check: every registered ``genkernels::`` op passes ``torch.library.opcheck`` (schema, fake kernel,
autograd registration, AOT dispatch with static and dynamic shapes) with the arguments the public op really passed
it; every op compiles under ``torch.compile(fullgraph=True, dynamic=True)`` and gives its uncompiled result;
float64 runs the eager reference under ``impl="auto"`` and is refused with a reason under ``impl="triton"``;
``meta`` tensors give the eager output's shapes without reading a value.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import genkernels.kernels as gk


def _randn(*shape, dtype=torch.float32, device="cpu", grad=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tensor = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)
    return tensor.requires_grad_(grad)


SCHEDULE = gk.NoiseSchedule.linear(1000)


@dataclasses.dataclass(frozen=True)
class OpCase:
    """Small inputs for one public op and the call: ``call(impl, *make(dtype, device, grad))``."""

    make: Callable[..., tuple]
    call: Callable[..., object]

    def run(self, impl: str, dtype: torch.dtype, device: str, grad: bool):
        return self.call(impl, *self.make(dtype, device, grad))


def _tensors(*shapes, grad_count=None):
    """A ``make`` giving one random tensor per shape (the first ``grad_count`` require grad when asked)."""
    def make(dtype, device, grad):
        limit = len(shapes) if grad_count is None else grad_count
        return tuple(_randn(*shape, dtype=dtype, device=device, grad=grad and k < limit, seed=k)
                     for k, shape in enumerate(shapes))
    return make


def _with_timesteps(make):
    def with_timesteps(dtype, device, grad):
        return make(dtype, device, grad) + (torch.tensor([3, 700], device=device),)
    return with_timesteps


def _cross_entropy_inputs(dtype, device, grad):
    return (_randn(2, 5, 3, dtype=dtype, device=device, grad=grad),
            torch.tensor([[1, 4, -100], [0, 2, 3]], device=device))


def _linear_cross_entropy_inputs(dtype, device, grad):
    return (_randn(2, 3, 4, dtype=dtype, device=device, grad=grad),
            _randn(7, 4, dtype=dtype, device=device, grad=grad, seed=1),
            _randn(7, dtype=dtype, device=device, grad=grad, seed=2),
            torch.tensor([[1, 6, -100], [0, 2, 3]], device=device))


def _with_seed(make):
    def with_seed(dtype, device, grad):
        return make(dtype, device, grad) + (torch.tensor([12345], device=device),)
    return with_seed


def _decode_inputs(dtype, device, grad):
    q = _randn(2, 2, 1, 16, dtype=dtype, device=device)
    k_cache, v_cache = (_randn(2, 2, 11, 16, dtype=dtype, device=device, seed=s) for s in (1, 2))
    return q, k_cache, v_cache, torch.tensor([11, 4], device=device)


OP_CASES: dict[str, OpCase] = {
    "bias_act": OpCase(_tensors((3, 5, 4), (5,)),
                       lambda impl, x, b: gk.bias_act(x, b, act="lrelu", clamp=2.0, impl=impl)),
    "group_norm_silu": OpCase(_tensors((2, 6, 5, 3), (6,), (6,)),
                              lambda impl, x, w, b: gk.group_norm_silu(x, 3, w, b, impl=impl)),
    "ddpm_step": OpCase(_tensors((2, 3, 4), (2, 3, 4), (2, 3, 4)),
                        lambda impl, m, x, n: gk.ddpm_step(m, 500, x, SCHEDULE, noise=n, impl=impl)),
    "ddim_step": OpCase(_tensors((2, 3, 4), (2, 3, 4)),
                        lambda impl, m, x: gk.ddim_step(m, 500, x, SCHEDULE, prev_timestep=480, impl=impl)),
    "q_sample": OpCase(_with_timesteps(_tensors((2, 3, 4), (2, 3, 4))),
                       lambda impl, x0, n, t: gk.q_sample(x0, t, SCHEDULE, noise=n, impl=impl)),
    "diffusion_loss": OpCase(_with_timesteps(_tensors((2, 3, 4), (2, 3, 4), (2, 3, 4))),
                             lambda impl, m, x0, n, t: gk.diffusion_loss(m, x0, t, SCHEDULE, noise=n, impl=impl)),
    "reparameterize_kl": OpCase(_tensors((3, 7), (3, 7), (3, 7), grad_count=2),
                                lambda impl, mu, logvar, n: gk.reparameterize_kl(mu, logvar, noise=n, impl=impl)),
    "affine_coupling": OpCase(_tensors((2, 3, 5), (2, 3, 5), (2, 3, 5)),
                              lambda impl, x, s, t: gk.affine_coupling(x, s, t, impl=impl)),
    "flash_attention": OpCase(_tensors((1, 2, 9, 16), (1, 2, 9, 16), (1, 2, 9, 16)),
                              lambda impl, q, k, v: gk.flash_attention(q, k, v, causal=True, impl=impl)),
    "scaled_dot_product_attention": OpCase(
        _tensors((1, 2, 7, 16), (1, 2, 9, 16), (1, 2, 9, 16)),
        lambda impl, q, k, v: gk.scaled_dot_product_attention(q, k, v, is_causal=True, impl=impl)),
    "decode_attention": OpCase(_decode_inputs,
                               lambda impl, q, k, v, n: gk.decode_attention(q, k, v, n, impl=impl)),
    "cross_entropy": OpCase(_cross_entropy_inputs,
                            lambda impl, x, t: gk.cross_entropy(x, t, label_smoothing=0.1, impl=impl)),
    "linear_cross_entropy": OpCase(_linear_cross_entropy_inputs,
                                   lambda impl, h, w, b, t: gk.linear_cross_entropy(h, w, t, bias=b, chunk_size=4,
                                                                                    impl=impl)),
    "sample_categorical": OpCase(_with_seed(_tensors((3, 11), grad_count=0)),
                                 lambda impl, logits, seed: gk.sample_categorical(
                                     logits, temperature=0.9, top_k=6, top_p=0.8, seed=seed, impl=impl)),
    "causal_conv1d": OpCase(_tensors((2, 3, 9), (4, 3, 2), (4,)),
                            lambda impl, x, w, b: gk.causal_conv1d(x, w, b, dilation=2, impl=impl)),
    "masked_conv2d": OpCase(_tensors((2, 3, 5, 6), (6, 3, 3, 3), (6,)),
                            lambda impl, x, w, b: gk.masked_conv2d(x, w, b, mask_type="A", color_channels=3,
                                                                   impl=impl)),
    # residual channels 4, gate channels 3, skip channels 5
    "wavenet_residual_layer": OpCase(_tensors((2, 4, 7), (6, 4, 2), (6,), (4, 3), (4,), (5, 3), (5,)),
                                     lambda impl, *tensors: gk.wavenet_residual_layer(*tensors, dilation=2,
                                                                                      impl=impl)),
}


def _outputs(result) -> list[torch.Tensor]:
    return [t for t in (result if isinstance(result, (tuple, list)) else (result,)) if isinstance(t, torch.Tensor)]


def _backward(result) -> None:
    outputs = [t for t in _outputs(result) if t.requires_grad]
    if outputs:
        torch.autograd.backward(outputs, [torch.ones_like(t) for t in outputs])


class _RecordGenkernelsOps(TorchDispatchMode):
    """Records every ``genkernels::`` op call (the overload and its arguments) that reaches the dispatcher."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[object, tuple, dict]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "genkernels":
            clone = torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), (args, kwargs))
            self.calls.append((func, *clone))
        return func(*args, **kwargs)


def _recorded_calls(name: str, device: str):
    recorder = _RecordGenkernelsOps()
    with recorder:
        if name in EXTRA_CALLS:
            EXTRA_CALLS[name](device)
        else:
            _backward(OP_CASES[name].run("triton", torch.float32, device, True))
    return recorder.calls


def _second_order_bias_act(device):
    """The gradient of a gradient (an R1 penalty's path): reaches bias_act_grad2."""
    x = _randn(3, 5, device=device, grad=True)
    (grad,) = torch.autograd.grad(gk.bias_act(x, act="silu", impl="triton").sum(), x, create_graph=True)
    grad.sum().backward()


def _half_precision_diffusion_loss(device):
    """A 16-bit loss recomputes its gradient in the backward: reaches diffusion_loss_backward."""
    model_output, x0, noise = (_randn(2, 3, 4, dtype=torch.bfloat16, device=device, grad=s == 0, seed=s)
                               for s in range(3))
    gk.diffusion_loss(model_output, x0, torch.tensor([3, 700], device=device), SCHEDULE, noise=noise,
                      impl="triton").backward()


def _ragged_decode_step(device):
    """A ragged decoding step, the sequences at lengths 7 and 3 appending one key/value each: reaches
    decode_attention_append."""
    q, k_cache, v_cache, _ = _decode_inputs(torch.float32, device, False)
    k, v = (_randn(2, 2, 1, 16, device=device, seed=s) for s in (3, 4))
    gk.decode_attention(q, k_cache, v_cache, torch.tensor([7, 3], device=device), k=k, v=v, impl="triton")


def _elementwise_linear_cross_entropy(device):
    """reduction="none" keeps a gradient per token: reaches linear_cross_entropy_backward."""
    h, w, b, t = _linear_cross_entropy_inputs(torch.float32, device, True)
    gk.linear_cross_entropy(h, w, t, bias=b, reduction="none", chunk_size=4, impl="triton").sum().backward()


# Calls beyond OP_CASES' first-order fp32 ones, for the ops only they reach.
EXTRA_CALLS = {"bias_act_second_order": _second_order_bias_act,
               "diffusion_loss_bf16": _half_precision_diffusion_loss,
               "decode_attention_append": _ragged_decode_step,
               "linear_cross_entropy_none": _elementwise_linear_cross_entropy}


def _registered_op_names() -> set[str]:
    return {name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("genkernels::")}


@pytest.mark.parametrize("name", sorted(OP_CASES) + sorted(EXTRA_CALLS))
def test_opcheck_every_op_the_public_function_calls(name, device):
    calls = _recorded_calls(name, device)
    assert calls, f"{name}: impl='triton' reached no registered op"
    for op, args, kwargs in calls:
        torch.library.opcheck(op, args, kwargs)


def test_every_registered_op_is_reached_by_a_case(device):
    reached = {op.name().split("::", 1)[1] for name in [*OP_CASES, *EXTRA_CALLS]
               for op, _, _ in _recorded_calls(name, device)}
    # wavenet_step runs one whole-network time step from a cache; its opcheck lives with its own tests.
    missing = _registered_op_names() - reached - {"wavenet_step"}
    assert not missing, f"registered ops no contract case reaches: {sorted(missing)}"


@pytest.mark.parametrize("impl", ["triton", "eager"])
@pytest.mark.parametrize("name", sorted(OP_CASES))
def test_every_op_compiles_with_fullgraph_and_dynamic_shapes(name, impl, device):
    case = OP_CASES[name]
    inputs = case.make(torch.float32, device, False)

    def call(*tensors):
        return case.call(impl, *tensors)

    torch._dynamo.reset()
    compiled = torch.compile(call, fullgraph=True, dynamic=True, backend="aot_eager")
    for got, expected in zip(_outputs(compiled(*inputs)), _outputs(call(*inputs)), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(OP_CASES))
def test_float64_runs_the_reference_under_auto_and_is_refused_by_triton(name, device):
    case = OP_CASES[name]
    with gk.use_impl("auto"):
        auto = _outputs(case.run("auto", torch.float64, device, False))
    eager = _outputs(case.run("eager", torch.float64, device, False))
    for got, expected in zip(auto, eager, strict=True):
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match=rf"{name}: impl='triton'.*float64"):
        case.run("triton", torch.float64, device, False)


@pytest.mark.parametrize("name", sorted(OP_CASES))
def test_meta_tensors_give_the_eager_shapes(name):
    case = OP_CASES[name]
    eager = _outputs(case.run("eager", torch.float32, "cpu", False))
    meta = _outputs(case.run("auto", torch.float32, "meta", False))
    assert [(t.shape, t.dtype) for t in meta] == [(t.shape, t.dtype) for t in eager]
    assert all(t.device.type == "meta" for t in meta)
