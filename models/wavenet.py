"""WaveNet (van den Oord et al. 2016): a causal, dilated convolutional model of 8-bit mu-law audio.

Input classes are embedded (a 1x1 convolution of the one-hot signal), pass a stack of gated residual layers with
dilations ``1, 2, ..., 512`` (repeated ``num_stacks`` times), and the sum of the layers' skip outputs goes through
``ReLU -> 1x1 conv -> ReLU -> 1x1 conv`` to 256-way logits. ``logits[:, :, t]`` is the distribution of sample
``t + 1`` given samples ``<= t`` (and an optional global conditioning vector).

Generation: ``use_cache=False`` runs the whole network on the last ``receptive_field`` samples for every new
sample;
``use_cache=True`` keeps each layer's past inputs in queues and advances every layer by one step per sample
(Fast WaveNet, Paine et al. 2016) with :func:`genkernels.kernels.wavenet.wavenet_step`. Both draw a sample as
``argmax(logits / temperature + Gumbel noise)`` with the fused sampler
(:func:`genkernels.kernels.sampling.sample_categorical`) from the same Philox uniforms (one seed, the step as the
counter offset), so they give the same samples.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from genkernels.kernels.causal_conv import causal_conv1d
from genkernels.kernels.checks import (
    check_bool,
    check_float_tensor,
    check_in_range,
    check_int,
    check_integer_tensor,
    check_real,
    describe,
)
from genkernels.kernels.cross_entropy import cross_entropy
from genkernels.kernels.launch import draw_philox_seed
from genkernels.kernels.sampling import sample_categorical
from genkernels.kernels.wavenet import WaveNetCache, wavenet_residual_layer, wavenet_step


# ----------------------------------------------------------------------------------------------------------------
# mu-law companding
# ----------------------------------------------------------------------------------------------------------------
def _check_classes(classes: torch.Tensor, name: str, num_classes: int) -> None:
    """Every value of the integer tensor ``classes`` in ``[0, num_classes)``: a host ``ValueError`` for CPU
    tensors, an asynchronous device assert on a GPU. Narrow dtypes are compared in int32, where the bound is
    representable (a uint8 tensor compared with 256 would compare with 256 wrapped to 0)."""
    check_in_range(classes.to(torch.int32) if classes.element_size() < 4 else classes, name, 0, num_classes)


def mu_law_encode(audio: torch.Tensor, quantization_channels: int = 256) -> torch.Tensor:
    """Audio in [-1, 1] to integer classes in [0, Q) (ITU-T G.711 mu-law; WaveNet Sec. 2.2), ``mu = Q - 1``:

        f(x) = sign(x) * ln(1 + mu |x|) / ln(1 + mu),    class = round((f(x) + 1) / 2 * mu)

    ``audio``: a floating-point tensor with every value in [-1, 1] (NaN, +-Inf and values outside are rejected:
    a ``ValueError`` for CPU tensors, a device assert on a GPU); ``quantization_channels``: an int ``Q >= 2``.
    Returns int64 classes of ``audio``'s shape."""
    check_float_tensor(audio, "audio")
    mu = check_int(quantization_channels, "quantization_channels", low=2) - 1
    check_in_range(audio, "audio", -1.0, 1.0, high_inclusive=True)
    x = audio.to(torch.float64)
    companded = torch.sign(x) * torch.log1p(mu * x.abs()) / math.log1p(mu)
    return torch.round((companded + 1) / 2 * mu).to(torch.int64)


def mu_law_decode(classes: torch.Tensor, quantization_channels: int = 256) -> torch.Tensor:
    """Integer classes in [0, Q) back to audio in [-1, 1], the inverse of the companding in :func:`mu_law_encode`:

        y = 2 * class / mu - 1,    x = sign(y) * ((1 + mu)^|y| - 1) / mu

    ``classes``: an integer tensor with every value in [0, Q) (checked: a ``ValueError`` for CPU tensors, a device
    assert on a GPU); ``quantization_channels``: an int ``Q >= 2``. Returns float32."""
    check_integer_tensor(classes, "classes")
    quantization_channels = check_int(quantization_channels, "quantization_channels", low=2)
    _check_classes(classes, "classes", quantization_channels)
    mu = quantization_channels - 1
    y = 2 * classes.to(torch.float64) / mu - 1
    return (torch.sign(y) * (torch.pow(1.0 + mu, y.abs()) - 1) / mu).to(torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------
class CausalConv1d(nn.Conv1d):
    """``nn.Conv1d`` made causal: the output is as long as the input and step ``t`` sees inputs
    ``t, t - d, ..., t - (k - 1) d`` (zeros before the start), via :func:`genkernels.kernels.causal_conv1d`.

    Takes ``nn.Conv1d``'s arguments. The causal left padding ``(k - 1) * dilation`` is implied, so ``padding``
    must stay 0 (or ``"causal"``); ``stride`` 1, ``groups`` 1 and ``padding_mode="zeros"`` are the supported case.
    Weights and ``state_dict`` are ``nn.Conv1d``'s.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None):
        reasons = []
        if stride not in (1, (1,)):
            reasons.append(f"stride={stride!r} (only 1)")
        if padding not in (0, (0,), "causal"):
            reasons.append(f"padding={padding!r} (the causal padding is implied: pass 0 or 'causal')")
        if groups != 1:
            reasons.append(f"groups={groups!r} (only 1)")
        if padding_mode != "zeros":
            reasons.append(f"padding_mode={padding_mode!r} (only 'zeros')")
        if reasons:
            raise ValueError("CausalConv1d does not support " + "; ".join(reasons))
        super().__init__(in_channels, out_channels, kernel_size, 1, 0, dilation, 1, bias, "zeros", device, dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() == 2:  # unbatched [channels, time], as nn.Conv1d accepts
            return causal_conv1d(input[None], self.weight, self.bias, dilation=self.dilation[0])[0]
        return causal_conv1d(input, self.weight, self.bias, dilation=self.dilation[0])


class WaveNetResidualLayer(nn.Module):
    """One gated residual layer: dilated causal conv to ``2 * dilation_channels`` (filter, gate), the gate
    ``tanh(filter) * sigmoid(gate)`` plus an optional global conditioning projection, and 1x1 residual and skip
    projections; all in :func:`genkernels.kernels.wavenet.wavenet_residual_layer`."""

    def __init__(self, residual_channels: int, dilation_channels: int, skip_channels: int, kernel_size: int,
                 dilation: int, global_cond_channels: int = 0):
        super().__init__()
        self.dilated = CausalConv1d(residual_channels, 2 * dilation_channels, kernel_size, dilation=dilation)
        self.residual = nn.Conv1d(dilation_channels, residual_channels, 1)
        self.skip = nn.Conv1d(dilation_channels, skip_channels, 1)
        self.cond = nn.Linear(global_cond_channels, 2 * dilation_channels, bias=False) \
            if global_cond_channels else None

    @property
    def dilation(self) -> int:
        return self.dilated.dilation[0]

    def forward(self, x: torch.Tensor, cond: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        return wavenet_residual_layer(
            x, self.dilated.weight, self.dilated.bias, self.residual.weight, self.residual.bias, self.skip.weight,
            self.skip.bias, dilation=self.dilation, cond=cond if self.cond is not None else None,
            cond_weight=self.cond.weight if self.cond is not None else None)


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------
class WaveNet(nn.Module):
    """WaveNet over ``num_classes``-level mu-law audio.

    Args:
        num_classes: quantization levels (256: 8-bit mu-law).
        residual_channels, dilation_channels, skip_channels: R, D (the gate width) and S.
        kernel_size: width of the dilated convolutions (2 in the paper).
        num_stacks, layers_per_stack: dilations ``2**0 .. 2**(layers_per_stack - 1)`` repeated per stack
            (10 layers: 1..512).
        dilations: an explicit list instead of the stacks.
        global_cond_channels: width of an optional global conditioning vector (e.g. a speaker embedding), 0 = none.

    Every size is an int: ``num_classes >= 2``, the widths, ``kernel_size``, ``num_stacks`` and
    ``layers_per_stack >= 1`` (a zero-width layer computes nothing), ``global_cond_channels >= 0``; ``dilations``
    a non-empty sequence of ints >= 1. Anything else raises an error that names the argument.
    """

    def __init__(self, num_classes: int = 256, residual_channels: int = 64, dilation_channels: int = 64,
                 skip_channels: int = 256, kernel_size: int = 2, num_stacks: int = 3, layers_per_stack: int = 10,
                 dilations: Optional[Sequence[int]] = None, global_cond_channels: int = 0):
        super().__init__()
        num_classes = check_int(num_classes, "num_classes", low=2)
        residual_channels = check_int(residual_channels, "residual_channels", low=1)
        dilation_channels = check_int(dilation_channels, "dilation_channels", low=1)
        skip_channels = check_int(skip_channels, "skip_channels", low=1)
        kernel_size = check_int(kernel_size, "kernel_size", low=1)
        num_stacks = check_int(num_stacks, "num_stacks", low=1)
        layers_per_stack = check_int(layers_per_stack, "layers_per_stack", low=1)
        global_cond_channels = check_int(global_cond_channels, "global_cond_channels", low=0)
        if dilations is None:
            dilations = [2**i for i in range(layers_per_stack)] * num_stacks
        elif isinstance(dilations, (str, bytes)) or not isinstance(dilations, Sequence):
            raise TypeError(f"dilations must be None or a sequence of ints >= 1 (a list or tuple), got "
                            f"{type(dilations).__name__} {dilations!r}")
        self.dilations = tuple(check_int(d, f"dilations[{i}]", low=1) for i, d in enumerate(dilations))
        if not self.dilations:
            raise ValueError("dilations must be a non-empty sequence of ints >= 1; got an empty sequence")
        self.num_classes = num_classes
        self.kernel_size = kernel_size
        self.global_cond_channels = global_cond_channels
        self.embedding = nn.Embedding(num_classes, residual_channels)
        self.layers = nn.ModuleList(
            WaveNetResidualLayer(residual_channels, dilation_channels, skip_channels, kernel_size, d,
                                 global_cond_channels) for d in self.dilations)
        self.output1 = nn.Conv1d(skip_channels, skip_channels, 1)
        self.output2 = nn.Conv1d(skip_channels, num_classes, 1)

    @property
    def receptive_field(self) -> int:
        """Samples the prediction at ``t`` depends on: ``(k - 1) * sum(dilations) + 1``."""
        return (self.kernel_size - 1) * sum(self.dilations) + 1

    def _check_cond(self, cond: Optional[torch.Tensor], batch: int) -> None:
        if self.global_cond_channels == 0:
            if cond is not None:
                raise ValueError("cond was given but the model has global_cond_channels=0")
            return
        if cond is not None:
            check_float_tensor(cond, "cond")
        if cond is None or cond.dim() != 2 or tuple(cond.shape) != (batch, self.global_cond_channels):
            got = "None" if cond is None else describe(cond)
            raise ValueError(f"cond must be [batch, global_cond_channels] = [{batch}, "
                             f"{self.global_cond_channels}]; got {got}")

    def _head(self, skip: torch.Tensor) -> torch.Tensor:
        """``[batch, S, ...]`` or ``[batch, S]`` skip sum to logits: ReLU -> 1x1 -> ReLU -> 1x1."""
        if skip.dim() == 2:
            hidden = F.relu(F.linear(F.relu(skip), self.output1.weight[..., 0], self.output1.bias))
            return F.linear(hidden, self.output2.weight[..., 0], self.output2.bias)
        return self.output2(F.relu(self.output1(F.relu(skip))))

    def _check_classes(self, x: object) -> torch.Tensor:
        check_integer_tensor(x, "x")
        if x.dim() != 2:
            raise ValueError(f"x must be integer classes [batch, time]; got {describe(x)}")
        # a host ValueError for CPU tensors; on a GPU an asynchronous device assert (no sync)
        _check_classes(x, "x", self.num_classes)
        return x

    def forward(self, x: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x``: integer classes in ``[0, num_classes)``, ``[batch, time]`` -> logits ``[batch, num_classes,
        time]``; ``logits[..., t]`` predicts ``x[:, t + 1]`` from ``x[:, :t + 1]``. ``cond``:
        ``[batch, global_cond_channels]`` or None."""
        self._check_classes(x)
        self._check_cond(cond, x.shape[0])
        h = self.embedding(x.long()).transpose(1, 2)  # [batch, R, time], a strided view the kernels read as is
        skip_sum = None
        for layer in self.layers:
            h, skip = layer(h, cond)
            skip_sum = skip if skip_sum is None else skip_sum + skip
        return self._head(skip_sum)

    def loss(self, x: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean next-sample cross entropy in nats: ``-log p(x[t + 1] | x[<= t])`` over ``t < time - 1``; ``x`` is
        range-checked as in :meth:`forward` (it holds the targets too)."""
        logits = self.forward(x, cond)
        # the whole logits tensor with the last step's target ignored (not the [:, :, :-1] slice, whose rows of
        # time - 1 break every sample's run of 16-byte vectors): the same mean over the same terms
        targets = F.pad(x[:, 1:].long(), (0, 1), value=-100)
        return cross_entropy(logits, targets, ignore_index=-100)

    # ------------------------------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, num_samples: int, batch_size: int = 1, temperature: float = 1.0, use_cache: bool = True,
                 generator: Optional[torch.Generator] = None, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Sample ``num_samples`` classes per sequence, starting from silence (class ``num_classes // 2``).

        Sample ``t + 1 = argmax(logits_t / temperature + g)``, ``g = -log(-log(u))``, ``u ~ U(0, 1)``
        (Gumbel-max: an exact draw from softmax(logits / T)), by
        :func:`~genkernels.kernels.sampling.sample_categorical`: its Philox uniforms are keyed by one seed drawn
        from ``generator`` and the step ``t``, so both paths read the same ones.

        Args:
            num_samples: samples to generate per sequence.
            batch_size: sequences generated together.
            temperature: > 0; lower is greedier.
            use_cache: True: one incremental step per sample (per-layer queues, one kernel for the layer stack);
                False: the whole network over the last ``receptive_field`` samples for every new sample.
            generator: draws the Philox seed of the uniforms.
            cond: ``[batch_size, global_cond_channels]`` for a conditioned model.

        Returns:
            int64 classes ``[batch_size, num_samples]`` (:func:`mu_law_decode` turns them into audio).
        """
        num_samples = check_int(num_samples, "num_samples")
        batch_size = check_int(batch_size, "batch_size")
        if num_samples < 0 or batch_size < 0:
            raise ValueError(f"num_samples and batch_size must be >= 0; got {num_samples}, {batch_size}")
        temperature = check_real(temperature, "temperature", low=0.0, low_inclusive=False)
        use_cache = check_bool(use_cache, "use_cache")
        self._check_cond(cond, batch_size)
        device = self.embedding.weight.device
        current = torch.full((batch_size,), self.num_classes // 2, dtype=torch.int64, device=device)
        step = self._cached_stepper(batch_size, cond) if use_cache else self._naive_stepper(cond)
        samples = torch.empty((batch_size, num_samples), dtype=torch.int64, device=device)
        seed = draw_philox_seed(device, generator)
        for t in range(num_samples):
            current = sample_categorical(step(current), temperature=temperature, seed=seed, offset=t)
            samples[:, t] = current
        return samples

    def _naive_stepper(self, cond: Optional[torch.Tensor]):
        history = []

        def step(current: torch.Tensor) -> torch.Tensor:
            history.append(current)
            # the last receptive_field inputs determine the last output exactly (earlier ones are out of reach)
            window = torch.stack(history[-self.receptive_field:], dim=1)
            return self.forward(window, cond)[:, :, -1]
        return step

    def _cached_stepper(self, batch_size: int, cond: Optional[torch.Tensor]):
        weights = self.stacked_layer_weights()
        dtype = self.embedding.weight.dtype
        cache = WaveNetCache(self.dilations, self.kernel_size, batch_size, self.embedding.weight.shape[1],
                             device=self.embedding.weight.device, dtype=dtype)
        cond_proj = None
        if cond is not None:
            cond_proj = torch.stack([F.linear(cond, layer.cond.weight) for layer in self.layers])

        def step(current: torch.Tensor) -> torch.Tensor:
            skip = wavenet_step(self.embedding(current), cache, *weights, cond_proj=cond_proj)
            return self._head(skip)
        return step

    def stacked_layer_weights(self) -> tuple[torch.Tensor, ...]:
        """The residual layers' weights stacked for :func:`wavenet_step`: conv ``[L, 2D, R, k]``, conv bias
        ``[L, 2D]``, residual ``[L, R, D]`` and bias, skip ``[L, S, D]`` and bias."""
        layers = self.layers
        return (torch.stack([layer.dilated.weight for layer in layers]),
                torch.stack([layer.dilated.bias for layer in layers]),
                torch.stack([layer.residual.weight[..., 0] for layer in layers]),
                torch.stack([layer.residual.bias for layer in layers]),
                torch.stack([layer.skip.weight[..., 0] for layer in layers]),
                torch.stack([layer.skip.bias for layer in layers]))
