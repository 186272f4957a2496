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

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from genkernels.kernels.bias_act import bias_act
from genkernels.kernels.group_norm import group_norm_silu


# ----------------------------------------------------------------------------------------------------------------
# Layers: torch layers whose bias (or batch-norm shift) and activation run as one bias_act call
# ----------------------------------------------------------------------------------------------------------------
class _ActivationOptions:
    """The activation a layer applies after its bias, as :func:`bias_act` arguments."""

    def _set_activation(self, act: str, alpha: Optional[float], gain: Optional[float]) -> None:
        self.act, self.alpha, self.gain = act, alpha, gain

    def _bias_act(self, y: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if bias is not None and bias.dtype != y.dtype:  # under autocast, as the torch layer casts its bias
            bias = bias.to(y.dtype)
        return bias_act(y, bias, dim=1, act=self.act, alpha=self.alpha, gain=self.gain)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act={self.act!r}, alpha={self.alpha}, gain={self.gain}"


class Conv2dBiasAct(_ActivationOptions, nn.Conv2d):
    """``nn.Conv2d`` run without its bias, then ``bias_act(y, self.bias, act=...)``: bias, activation and gain in one
    pass. Takes ``nn.Conv2d``'s arguments plus ``act``, ``alpha``, ``gain``."""

    def __init__(self, *args, act: str = "linear", alpha: Optional[float] = None, gain: Optional[float] = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self._set_activation(act, alpha, gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._bias_act(self._conv_forward(x, self.weight, None), self.bias)


class ConvTranspose2dBiasAct(_ActivationOptions, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` run without its bias, then ``bias_act(y, self.bias, act=...)``."""

    def __init__(self, *args, act: str = "linear", alpha: Optional[float] = None, gain: Optional[float] = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self._set_activation(act, alpha, gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv_transpose2d(x, self.weight, None, self.stride, self.padding, self.output_padding, self.groups,
                               self.dilation)
        return self._bias_act(y, self.bias)


class LinearBiasAct(_ActivationOptions, nn.Linear):
    """``nn.Linear`` run without its bias, then ``bias_act(y, self.bias, act=...)`` on ``[batch, features]``."""

    def __init__(self, *args, act: str = "linear", alpha: Optional[float] = None, gain: Optional[float] = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self._set_activation(act, alpha, gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._bias_act(F.linear(x, self.weight), self.bias)


class BatchNormAct2d(_ActivationOptions, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose shift (beta) and the following activation are one :func:`bias_act` call:
    ``act(gamma * (x - mean) / sqrt(var + eps) + beta) * gain``. Running statistics follow ``nn.BatchNorm2d``."""

    def __init__(self, *args, act: str = "relu", alpha: Optional[float] = None, gain: Optional[float] = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self._set_activation(act, alpha, gain)

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
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device=None, dtype=None, *, activation: Optional[str] = "silu"):
        super().__init__(num_groups, num_channels, eps, affine, device, dtype)
        if activation not in ("silu", None):
            raise ValueError(f"activation={activation!r} is not supported; expected 'silu' or None")
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
