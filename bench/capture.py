"""Launch capture: run any genkernels code at any shape without running a kernel, recording every launch.

Inside :func:`capture`, every ``kernel[grid](...)`` call is recorded instead of run: the kernel, its grid, and its
arguments specialized by Triton's own binder exactly as a launch on a GPU specializes them (pointer dtypes,
divisibility-16 hints, ints equal to 1 as constants, i32 or i64 by value), its constexprs, ``num_warps`` and
``num_stages``. The code under capture runs on ``meta`` tensors (nothing is allocated or computed; genkernels'
registered ops run their launchers on them in place of their fake kernels), and the launchers behave as on a GPU of
the requested architecture (its SM count and shared memory, native tensor-core dots: ``launch.capturing_for``).
What is captured is what a GPU run of the same code would launch, so the ahead-of-time compile, the compiled-code
report and its budgets all compile exactly that.

Capture needs compiled kernels, so it runs in a process where Triton's interpreter is off (``TRITON_INTERPRET``
unset when genkernels is imported); :mod:`genkernels.bench.resources` starts such a process itself.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
from typing import Callable, Iterator, Optional

from genkernels.kernels import launch as launch_helpers
from genkernels.kernels.launch import ARCH_LIMITS, DeviceLimits
from genkernels.kernels.runtime import interpreter_enabled


@dataclasses.dataclass(frozen=True)
class Launch:
    """One captured ``kernel[grid](...)`` call, as Triton would compile and launch it (picklable)."""

    kernel_module: str
    kernel_name: str
    grid: tuple[int, int, int]
    signature: dict  # argument name -> Triton type ("*bf16", "i32", "constexpr", ...)
    constexprs: dict  # argument path -> value (Triton's form: {(index,): value})
    attrs: dict  # argument path -> [["tt.divisibility", 16]], ...
    num_warps: int
    num_stages: int
    arch: int

    def kernel(self):
        """The ``@triton.jit`` function launched."""
        return getattr(importlib.import_module(self.kernel_module), self.kernel_name)

    @property
    def ctas(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def pointer_dtypes(self) -> list[str]:
        """The element types of the pointer arguments (``["bf16", "fp32"]``), tuple arguments included."""
        def flat(types):
            for t in types:
                if isinstance(t, (tuple, list)):
                    yield from flat(t)
                else:
                    yield t
        return sorted({t[1:] for t in flat(self.signature.values()) if isinstance(t, str) and t.startswith("*")})

    def constexpr_values(self) -> dict[str, object]:
        """``{name: value}`` of the constexpr arguments (the kernel's config)."""
        names = list(self.signature)
        return {names[path[0]]: value for path, value in self.constexprs.items() if len(path) == 1}

    def config_label(self) -> str:
        """A short label of the config: block-size constexprs, dtypes of the pointers, warps and stages."""
        values = self.constexpr_values()
        dtypes = self.pointer_dtypes()
        parts = [f"{k}={v}" for k, v in values.items() if isinstance(v, (int, bool)) and not isinstance(v, bool)]
        switches = [k for k, v in values.items() if v is True]
        return " ".join(["/".join(dtypes)] + parts + switches + [f"w{self.num_warps}", f"s{self.num_stages}"])

    def compile_key(self) -> tuple:
        """Equal for two launches that compile to the same binary (the grid does not enter the binary)."""
        return (self.kernel_module, self.kernel_name, repr(sorted(self.signature.items())),
                tuple(sorted((k, repr(v)) for k, v in self.constexprs.items())),
                tuple(sorted((k, repr(v)) for k, v in self.attrs.items())), self.num_warps, self.num_stages,
                self.arch)


def _grid_3d(grid, bound_args: dict) -> tuple[int, int, int]:
    if callable(grid):
        grid = grid(bound_args)
    grid = tuple(int(g) for g in grid)
    return (grid + (1, 1, 1))[:3]


# A sampling loop repeats the same launches step after step: once this many launches in a row brought nothing new,
# the capture of that call stops (every distinct launch of the loop has been seen by then).
REPEATS_TO_STOP = 2000


class _LoopRepeats(Exception):
    """Raised inside a captured call whose launches have stopped bringing anything new."""


@contextlib.contextmanager
def _recording(limits: DeviceLimits, launches: list[Launch]) -> Iterator[None]:
    """Patch Triton's launch path to record (not run) launches, and genkernels' registered ops to run their
    launchers on meta tensors; undo both on the way out."""
    import torch._library.custom_ops as custom_ops
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    backend = make_backend(GPUTarget("cuda", limits.arch, 32))
    binders: dict[int, Callable] = {}
    distinct: set = set()
    launches_since_new = [0]

    def record(self, *args, grid, warmup, **kwargs):
        if launches_since_new[0] >= REPEATS_TO_STOP:
            raise _LoopRepeats()
        binder = binders.get(id(self))
        if binder is None:
            binder = binders[id(self)] = create_function_from_signature(self.signature, self.params, backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound_args, specialization, options)
        launch = Launch(self.fn.__module__, self.fn.__name__, _grid_3d(grid, bound_args), dict(signature),
                        dict(constexprs), dict(attrs), options.num_warps, options.num_stages, limits.arch)
        key = (launch.compile_key(), launch.grid)
        if key in distinct:
            launches_since_new[0] += 1
        else:
            distinct.add(key)
            launches_since_new[0] = 0
            launches.append(launch)
        return None

    ops = [op for name, op in custom_ops.OPDEFS.items() if name.startswith("genkernels::")]
    fakes = [op._abstract_fn for op in ops]
    original_run = JITFunction.run
    JITFunction.run = record
    for op in ops:
        op._abstract_fn = op._init_fn
    try:
        with launch_helpers.capturing_for(limits):
            yield
    finally:
        JITFunction.run = original_run
        for op, fake in zip(ops, fakes):
            op._abstract_fn = fake


@dataclasses.dataclass
class Capture:
    launches: list[Launch]
    result: object = None
    error: Optional[str] = None  # why the captured code failed, if it did
    stopped_early: bool = False  # a loop whose last REPEATS_TO_STOP launches repeated earlier ones was cut short


def capture(fn: Callable[[], object], arch: int = 90) -> Capture:
    """Run ``fn()`` (code that calls genkernels ops on ``meta`` tensors) and return every distinct launch it makes
    (kernel binary and grid), as on a GPU of compute capability ``arch`` (80, 86, 89 or 90). An exception inside
    ``fn`` ends the capture early; the launches before it are kept and the error is reported. A call that goes on
    repeating launches it already made (a sampling loop) is cut short after ``REPEATS_TO_STOP`` repeats in a row."""
    if interpreter_enabled():
        raise RuntimeError("launch capture needs compiled kernels: run it in a process without TRITON_INTERPRET "
                           "(python -m genkernels.bench --resources starts one)")
    if arch not in ARCH_LIMITS:
        raise ValueError(f"arch={arch!r} is not one of {sorted(ARCH_LIMITS)}")
    launches: list[Launch] = []
    with _recording(ARCH_LIMITS[arch], launches):
        try:
            result = fn()
        except _LoopRepeats:
            return Capture(launches, None, None, stopped_early=True)
        except Exception as error:  # a case that cannot run on meta tensors is reported, not fatal
            return Capture(launches, None, f"{type(error).__name__}: {str(error).splitlines()[0][:300]}")
    return Capture(launches, result)
