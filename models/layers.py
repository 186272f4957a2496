"""Drop-in layers: torch layers whose hot part runs through a fused genkernels op.

The layers below subclass the torch layer they replace (same arguments, parameters and ``state_dict`` keys). The
bias + activation layers run it without its bias, then add the bias, apply the activation and its gain in one
:func:`~genkernels.kernels.bias_act` pass; :class:`GroupNormAct` is GroupNorm and SiLU in one
:func:`~genkernels.kernels.group_norm_silu` pass. The other families' drop-in layers live with their models and are
re-exported here: attention (:class:`MultiheadSelfAttention`, :class:`KVCache`), flows (:class:`ActNorm`,
:class:`InvConv1x1`, :class:`AffineCoupling`, :class:`Squeeze`, :class:`Split`), autoregressive convolutions
(:class:`CausalConv1d`, :class:`MaskedConv2d`).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from genkernels.kernels.bias_act import bias_act, check_activation
from genkernels.kernels.checks import check_bool, check_choice, check_int, check_real
from genkernels.kernels.group_norm import group_norm_silu


# ----------------------------------------------------------------------------------------------------------------
# Construction checks: a clear error naming the argument before torch's own (ZeroDivisionError, or an error deep
# inside the first forward)
# ----------------------------------------------------------------------------------------------------------------
def _check_positive(value: object, name: str) -> int:
    return check_int(value, name, low=1)


def _check_pair(value: object, name: str, low: int) -> None:
    """An int, or a tuple/list of two ints, each >= ``low`` (a kernel size, stride, padding or dilation)."""
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if isinstance(value, (tuple, list)) and len(values) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints; got {value!r}")
    for item in values:
        if isinstance(item, bool) or not isinstance(item, int):
            raise TypeError(f"{name} must be an int or a pair of ints; got {value!r}")
        if item < low:
            raise ValueError(f"{name}={value!r} is out of range; expected values >= {low}")


def _check_groups(in_channels: int, out_channels: int, groups: object) -> None:
    _check_positive(groups, "groups")
    for name, channels in (("in_channels", in_channels), ("out_channels", out_channels)):
        if channels % groups != 0:
            raise ValueError(f"groups={groups} must divide {name}={channels}")


def _check_conv(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, allow_padding_mode):
    _check_positive(in_channels, "in_channels")
    _check_positive(out_channels, "out_channels")
    _check_pair(kernel_size, "kernel_size", 1)
    _check_pair(stride, "stride", 1)
    if isinstance(padding, str) and allow_padding_mode:
        check_choice(padding, "padding", ("same", "valid"))
    else:
        _check_pair(padding, "padding", 0)
    _check_pair(dilation, "dilation", 1)
    _check_groups(in_channels, out_channels, groups)


# ----------------------------------------------------------------------------------------------------------------
# Layers: torch layers whose bias (or batch-norm shift) and activation run as one bias_act call
# ----------------------------------------------------------------------------------------------------------------
class _ActivationOptions:
    """The activation a layer applies after its bias, as :func:`bias_act` arguments (checked at construction:
    ``act`` one of :data:`~genkernels.kernels.bias_act.ACTIVATIONS`, e.g. "lrelu", "gelu", "selu", "swish";
    ``alpha``, ``gain``, ``clamp`` finite numbers, ``clamp >= 0``)."""

    def _set_activation(self, act: str, alpha: Optional[float], gain: Optional[float],
                        clamp: Optional[float] = None) -> None:
        self.act, self.alpha, self.gain, self.clamp = check_activation(act, alpha, gain, clamp)

    def _bias_act(self, y: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if bias is not None and bias.dtype != y.dtype:  # under autocast, as the torch layer casts its bias
            bias = bias.to(y.dtype)
        return bias_act(y, bias, dim=1, act=self.act, alpha=self.alpha, gain=self.gain, clamp=self.clamp)

    def extra_repr(self) -> str:
        clamp = "" if self.clamp is None else f", clamp={self.clamp}"
        return f"{super().extra_repr()}, act={self.act!r}, alpha={self.alpha}, gain={self.gain}{clamp}"


IntOrPair = Union[int, tuple[int, int]]


class Conv2dBiasAct(_ActivationOptions, nn.Conv2d):
    """``nn.Conv2d`` run without its bias, then ``bias_act(y, self.bias, act=...)``: bias, activation, gain and
    clamp in one pass. Takes ``nn.Conv2d``'s arguments plus ``act``, ``alpha``, ``gain``, ``clamp``; channel
    counts, kernel size, stride, dilation and groups must be >= 1 (groups dividing both channel counts), padding
    >= 0 or "same"/"valid"."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrPair, stride: IntOrPair = 1,
                 padding: Union[str, IntOrPair] = 0, dilation: IntOrPair = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", device=None, dtype=None, *, act: str = "linear",
                 alpha: Optional[float] = None, gain: Optional[float] = None, clamp: Optional[float] = None):
        _check_conv(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, True)
        check_bool(bias, "bias")
        act, alpha, gain, clamp = check_activation(act, alpha, gain, clamp)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self._set_activation(act, alpha, gain, clamp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._bias_act(self._conv_forward(x, self.weight, None), self.bias)


class ConvTranspose2dBiasAct(_ActivationOptions, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` run without its bias, then ``bias_act(y, self.bias, act=...)``. Takes
    ``nn.ConvTranspose2d``'s arguments plus ``act``, ``alpha``, ``gain``, ``clamp``, checked as
    :class:`Conv2dBiasAct`'s (output_padding >= 0)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrPair, stride: IntOrPair = 1,
                 padding: IntOrPair = 0, output_padding: IntOrPair = 0, groups: int = 1, bias: bool = True,
                 dilation: IntOrPair = 1, padding_mode: str = "zeros", device=None, dtype=None, *,
                 act: str = "linear", alpha: Optional[float] = None, gain: Optional[float] = None,
                 clamp: Optional[float] = None):
        _check_conv(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, False)
        _check_pair(output_padding, "output_padding", 0)
        check_bool(bias, "bias")
        act, alpha, gain, clamp = check_activation(act, alpha, gain, clamp)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, output_padding, groups, bias,
                         dilation, padding_mode, device, dtype)
        self._set_activation(act, alpha, gain, clamp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv_transpose2d(x, self.weight, None, self.stride, self.padding, self.output_padding, self.groups,
                               self.dilation)
        return self._bias_act(y, self.bias)


class LinearBiasAct(_ActivationOptions, nn.Linear):
    """``nn.Linear`` run without its bias, then ``bias_act(y, self.bias, act=...)`` on ``[batch, features]``.
    Takes ``nn.Linear``'s arguments (feature counts >= 1) plus ``act``, ``alpha``, ``gain``, ``clamp``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 act: str = "linear", alpha: Optional[float] = None, gain: Optional[float] = None,
                 clamp: Optional[float] = None):
        _check_positive(in_features, "in_features")
        _check_positive(out_features, "out_features")
        check_bool(bias, "bias")
        act, alpha, gain, clamp = check_activation(act, alpha, gain, clamp)
        super().__init__(in_features, out_features, bias, device, dtype)
        self._set_activation(act, alpha, gain, clamp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._bias_act(F.linear(x, self.weight), self.bias)


class BatchNormAct2d(_ActivationOptions, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose shift (beta) and the following activation are one :func:`bias_act` call:
    ``act(gamma * (x - mean) / sqrt(var + eps) + beta) * gain``. Running statistics follow ``nn.BatchNorm2d``.
    Takes ``nn.BatchNorm2d``'s arguments (num_features >= 1, eps > 0, momentum None or in [0, 1]) plus ``act``,
    ``alpha``, ``gain``, ``clamp``."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, act: str = "relu",
                 alpha: Optional[float] = None, gain: Optional[float] = None, clamp: Optional[float] = None):
        _check_positive(num_features, "num_features")
        check_real(eps, "eps", low=0.0, low_inclusive=False)
        if momentum is not None:
            check_real(momentum, "momentum", low=0.0, high=1.0)
        check_bool(affine, "affine")
        check_bool(track_running_stats, "track_running_stats")
        act, alpha, gain, clamp = check_activation(act, alpha, gain, clamp)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self._set_activation(act, alpha, gain, clamp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        averaging = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm2d
                averaging = 1.0 / float(self.num_batches_tracked)
        batch_stats = self.training or self.running_mean is None
        keep_running = not self.training or self.track_running_stats
        normalized = F.batch_norm(x, self.running_mean if keep_running else None,
                                  self.running_var if keep_running else None, self.weight, None, batch_stats,
                                  averaging, self.eps)
        return self._bias_act(normalized, self.bias)


class GroupNormAct(nn.GroupNorm):
    """``nn.GroupNorm`` followed by SiLU (or nothing, ``activation=None``) as one
    :func:`~genkernels.kernels.group_norm_silu` pass: ``silu((x - mean_g) / sqrt(var_g + eps) * weight + bias)``.

    Takes ``nn.GroupNorm``'s arguments (same parameters and ``state_dict`` keys) plus ``activation``; with
    ``activation=None`` it is a drop-in ``nn.GroupNorm``. Keeps the input's memory format (NCHW or channels_last).
    ``num_groups`` and ``num_channels`` must be >= 1 with ``num_groups`` dividing ``num_channels``; ``eps > 0``.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device=None, dtype=None, *, activation: Optional[str] = "silu"):
        _check_positive(num_groups, "num_groups")
        _check_positive(num_channels, "num_channels")
        if num_channels % num_groups != 0:
            raise ValueError(f"num_groups={num_groups} must divide num_channels={num_channels}")
        check_real(eps, "eps", low=0.0, low_inclusive=False)
        check_bool(affine, "affine")
        if activation not in ("silu", None):
            raise ValueError(f"activation={activation!r} is not supported; expected 'silu' or None")
        super().__init__(num_groups, num_channels, eps, affine, device, dtype)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError(f"GroupNormAct expects input [batch, {self.num_channels}, ...]; got shape "
                             f"{list(x.shape)}")
        return group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps, activation=self.activation)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"


# The other families' drop-in layers, defined beside the models that use them.
from .attention import KVCache, MultiheadSelfAttention  # noqa: E402
from .flows import ActNorm, AffineCoupling, InvConv1x1, Split, Squeeze  # noqa: E402
from .pixelcnn import MaskedConv2d  # noqa: E402
from .wavenet import CausalConv1d  # noqa: E402

__all__ = [
    "ActNorm", "AffineCoupling", "BatchNormAct2d", "CausalConv1d", "Conv2dBiasAct", "ConvTranspose2dBiasAct",
    "GroupNormAct", "InvConv1x1", "KVCache", "LinearBiasAct", "MaskedConv2d", "MultiheadSelfAttention", "Split",
    "Squeeze",
]
