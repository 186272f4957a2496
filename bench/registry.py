"""The case registry: every benchmark the suite knows, for the CLI and for pytest-benchmark alike.

A :class:`Case` is a named, parametrized workload. Its ``setup(device, size)`` builds inputs once and returns a
:class:`Workload`: one zero-argument callable per provider (``eager``, ``triton``, ``compile``, peers), the
traffic or arithmetic that one call performs (for GB/s or TFLOP/s), and an optional fp64 reference to report each
provider's max error against.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Callable, Iterable, Optional

import torch

SIZES = ("cpu", "quick", "full")


@dataclasses.dataclass
class Workload:
    providers: dict[str, Callable[[], object]]
    bytes_moved: Optional[int] = None  # bytes read + written once each, per call
    flops: Optional[int] = None  # floating-point operations per call (the case states its formula)
    items: Optional[tuple[int, str]] = None  # (count, unit) per call for throughput, e.g. (64, "images")
    reference: Optional[Callable[[], torch.Tensor]] = None  # fp64 oracle of the providers' output
    notes: str = ""


@dataclasses.dataclass(frozen=True)
class Case:
    name: str  # "<family>.<what>[...]", e.g. "diffusion.ddim_step[bf16,16M]"
    family: str
    kind: str  # "op", "train" or "sample"
    params: dict
    setup: Callable[[torch.device], Workload]

    def matches(self, pattern: Optional[str]) -> bool:
        """``pattern`` is a glob (``diffusion.*``) or a plain substring."""
        if not pattern:
            return True
        return fnmatch.fnmatch(self.name, pattern) or pattern in self.name


def seeded_generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator seeded with ``seed`` for drawing a case's inputs on ``device``: a CPU one for ``meta`` tensors
    (which draw nothing: the launches of a case are captured on them, see genkernels.bench.capture)."""
    device = torch.device(device)
    return torch.Generator(device="cpu" if device.type == "meta" else device).manual_seed(seed)


_CASE_BUILDERS: list[Callable[[str], Iterable[Case]]] = []


def case_builder(builder: Callable[[str], Iterable[Case]]):
    """Register ``builder(size) -> cases``; ``size`` is "cpu" (interpreter), "quick" or "full"."""
    _CASE_BUILDERS.append(builder)
    return builder


def all_cases(size: str, pattern: Optional[str] = None) -> list[Case]:
    """Every registered case at ``size`` whose name matches ``pattern``."""
    if size not in SIZES:
        raise ValueError(f"size={size!r} is not one of {SIZES}")
    from . import cases  # noqa: F401  (registers the builders)

    return [case for builder in _CASE_BUILDERS for case in builder(size) if case.matches(pattern)]
