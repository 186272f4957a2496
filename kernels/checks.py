"""Input checks shared by every public op.

Every check raises before any kernel launches, with a message that names the argument, says what it got (shape,
dtype, device or value) and what was expected. Wrong types raise ``TypeError``, wrong values ``ValueError``.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

# Every op accepts these; the kernels take the first three and float64 runs the eager reference (runtime.choose_impl).
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def describe(tensor: torch.Tensor) -> str:
    """``shape [2, 3], dtype torch.float16, device cpu`` for error messages."""
    return f"shape {list(tensor.shape)}, dtype {tensor.dtype}, device {tensor.device}"


def check_tensor(value: object, name: str) -> torch.Tensor:
    """Require a ``torch.Tensor``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_seed_tensor(seed: object, device: torch.device) -> torch.Tensor:
    """Require an in-kernel noise key: a one-element int64 tensor on ``device`` (``launch.draw_philox_seed``)."""
    seed = check_tensor(seed, "seed")
    if seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != device:
        raise ValueError(f"seed must be a one-element int64 tensor on {device} (e.g. from "
                         f"genkernels.kernels.draw_philox_seed); got {describe(seed)}")
    return seed


def check_float_tensor(value: object, name: str, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> torch.Tensor:
    """Require a floating-point tensor of one of ``dtypes``."""
    tensor = check_tensor(value, name)
    if tensor.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have a floating-point dtype ({allowed}); got {describe(tensor)}")
    return tensor


def check_min_rank(tensor: torch.Tensor, name: str, rank: int, meaning: str) -> None:
    """Require at least ``rank`` dimensions; ``meaning`` names the layout (e.g. ``[batch, ...]``)."""
    if tensor.dim() < rank:
        raise ValueError(f"{name} must have at least {rank} dimension(s) {meaning}; got {describe(tensor)}")


def check_same_shape(reference: torch.Tensor, reference_name: str, other: torch.Tensor, other_name: str) -> None:
    """Require ``other`` to have the shape of ``reference``."""
    if other.shape != reference.shape:
        raise ValueError(
            f"{other_name} must have the shape of {reference_name} {list(reference.shape)}; got {describe(other)}"
        )


def check_same_dtype(reference: torch.Tensor, reference_name: str, other: torch.Tensor, other_name: str) -> None:
    """Require ``other`` to have the dtype of ``reference``."""
    if other.dtype != reference.dtype:
        raise TypeError(
            f"{other_name} must have the dtype of {reference_name} ({reference.dtype}); got {describe(other)}"
        )


def check_same_device(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> torch.device:
    """Require every tensor on one device and return it; the message lists every tensor's device."""
    named = [(name, t) for name, t in named_tensors if t is not None]
    devices = {t.device for _, t in named}
    if len(devices) > 1:
        listing = ", ".join(f"{name} on {t.device}" for name, t in named)
        raise ValueError(f"all tensors must be on one device; got {listing}")
    return named[0][1].device


def check_float_like(value: object, name: str, reference: torch.Tensor, reference_name: str, *,
                     same_dtype: bool = False) -> torch.Tensor:
    """Require a floating-point tensor with the shape of ``reference`` (and its dtype when ``same_dtype``): the
    companion inputs of an elementwise op (noise, a second prediction, ...)."""
    tensor = check_float_tensor(value, name)
    check_same_shape(reference, reference_name, tensor, name)
    if same_dtype:
        check_same_dtype(reference, reference_name, tensor, name)
    return tensor


def check_choice(value: object, name: str, choices: Sequence[str]) -> str:
    """Require ``value`` to be one of the string ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; expected one of {', '.join(map(repr, choices))}")
    return value


def check_bool(value: object, name: str) -> bool:
    """Require a Python bool (a tensor or a number here is almost always a misplaced argument)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def check_real(value: object, name: str, *, low: float | None = None, high: float | None = None,
               low_inclusive: bool = True) -> float:
    """Require a finite Python number in ``[low, high]`` (or ``(low, high]`` when ``low_inclusive`` is False)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    number = float(value)
    too_low = low is not None and (number < low or (not low_inclusive and number == low))
    too_high = high is not None and number > high
    if number != number or too_low or too_high or number in (float("inf"), float("-inf")):
        left = "[" if low_inclusive else "("
        interval = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise ValueError(f"{name}={value!r} is out of range; expected a finite number in {interval}")
    return number


def check_int(value: object, name: str, *, low: int | None = None, high: int | None = None) -> int:
    """Require a Python integer (not a bool), in ``[low, high]`` when those are given (``ValueError`` outside)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        interval = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise ValueError(f"{name}={value} is out of range; expected an int in {interval}")
    return value


def check_integer_tensor(value: object, name: str) -> torch.Tensor:
    """Require a tensor of an integer dtype (token ids, class labels, timesteps, pixel values)."""
    tensor = check_tensor(value, name)
    if tensor.dtype not in INTEGER_DTYPES:
        raise TypeError(f"{name} must have an integer dtype ({', '.join(map(str, INTEGER_DTYPES))}); "
                        f"got {describe(tensor)}")
    return tensor


def check_values(tensor: torch.Tensor, name: str, ok: torch.Tensor, expected: str) -> None:
    """Require ``ok`` (a bool tensor of ``tensor``'s shape, computed from it) to be all true; ``expected`` says what the values
    must be (``"lie in [0, 256)"``).

    Where the values are on the host (a CPU tensor, not while torch.compile traces) this raises ``ValueError``
    naming the first bad value. On a GPU a host check would synchronize the stream, so it becomes an asynchronous
    device assert (a device-side error at the next synchronization, before any result can be used). ``meta``
    tensors have no values and pass.
    """
    if tensor.device.type == "meta":
        return
    if tensor.device.type == "cpu" and not torch.compiler.is_compiling():
        if tensor.numel() and not bool(ok.all()):
            bad = tensor[~ok].reshape(-1)[0].item()
            raise ValueError(f"{name} must {expected}; got a value {bad} in {describe(tensor)}")
        return
    torch._assert_async(ok.all(), f"{name} must {expected}")


def check_in_range(tensor: torch.Tensor, name: str, low: float, high: float, *, high_inclusive: bool = False) -> None:
    """Require every value of ``tensor`` in ``[low, high)`` (``[low, high]`` when ``high_inclusive``); NaN fails.
    Host check or device assert as :func:`check_values`."""
    # narrow integer dtypes compare in int64: a bound they cannot hold (uint8 < 256) would wrap
    wide = tensor.to(torch.int64) if tensor.dtype in INTEGER_DTYPES and tensor.dtype != torch.int64 else tensor
    upper = wide <= high if high_inclusive else wide < high
    check_values(tensor, name, (wide >= low) & upper,
                 f"lie in [{low}, {high}{']' if high_inclusive else ')'}")


def check_class_indices(value: object, name: str, batch: int, device: torch.device, num_values: int,
                        expected: Optional[str] = None) -> torch.Tensor:
    """Require an integer tensor ``[batch]`` on ``device`` of indices in ``[0, num_values)`` (class labels),
    values checked as :func:`check_values` (``expected``: what the error says the values must do)."""
    tensor = check_integer_tensor(value, name)
    if tensor.shape != (batch,):
        raise ValueError(f"{name} must have shape [batch] = [{batch}]; got {describe(tensor)}")
    if tensor.device != device:
        raise ValueError(f"{name} must be on the model's device ({device}); got {describe(tensor)}")
    check_values(tensor, name, (tensor >= 0) & (tensor < num_values), expected or f"lie in [0, {num_values})")
    return tensor


def check_conditioning_labels(labels: object, num_classes: Optional[int], batch: int, device: torch.device) -> None:
    """The ``labels`` argument of a model that is class-conditional when ``num_classes`` is an int: ``None`` for an
    unconditional model, required there and checked by :func:`check_class_indices` otherwise."""
    if num_classes is None:
        if labels is not None:
            raise ValueError("labels were given to an unconditional model (num_classes=None)")
        return
    if labels is None:
        raise ValueError(f"this model is class-conditional (num_classes={num_classes}): labels [{batch}] are "
                         f"required")
    check_class_indices(labels, "labels", batch, device, num_classes)


def check_generator(generator: object, device: torch.device, owner: str) -> None:
    """Require ``generator`` to be None or a ``torch.Generator`` of ``device``'s type (the device of ``owner``)."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != device.type and device.type != "meta":  # meta tensors draw nothing
        raise ValueError(f"generator is on {generator.device} but {owner} is on {device}; "
                         f"pass a generator of {owner}'s device")
